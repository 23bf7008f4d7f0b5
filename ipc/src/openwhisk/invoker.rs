//! The invoker contract: the controller's `ActivationMessage` (`POST /invoke`'s body,
//! byte for byte the message upstream sends on Kafka's `invoker<N>` topic) and the
//! acknowledgement written back (the combined completion and result).
//!
//! Field names are OpenWhisk's (`Message.scala`'s `ActivationMessage`, jsonFormat12;
//! `CombinedCompletionAndResultMessage`). Unknown fields are accepted, as a newer
//! controller may add some. [`ActivationMessage::parse`] also checks what serde's
//! shapes cannot say: the `transid` array's first two elements, `content` being an
//! object or an array, `initArgs` naming keys.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::activation::WhiskActivation;
use super::KeyValue;
use crate::api::ActivationId;

/// A controller's request to run one activation.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ActivationMessage {
    pub transid: TransId,
    pub action: ActionName,
    /// The action document's CouchDB `_rev`; `null`: the latest.
    #[serde(default)]
    pub revision: Option<String>,
    pub user: Identity,
    #[serde(rename = "activationId")]
    pub activation_id: ActivationId,
    #[serde(rename = "rootControllerIndex")]
    pub root_controller_index: ControllerInstance,
    pub blocking: bool,
    /// Every parameter (the action's and its package's defaults merged with the
    /// invocation's): an object, or an array passed through unchanged; absent or
    /// `null`: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<serde_json::Value>,
    /// Keys of `content` whose values go to the action's environment, not `main`.
    #[serde(default, rename = "initArgs", skip_serializing_if = "Vec::is_empty")]
    pub init_args: Vec<String>,
    /// Keys of `content` whose values are encrypted, with the key's name.
    #[serde(
        default,
        rename = "lockedArgs",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub locked_args: BTreeMap<String, String>,
    /// The activation (a sequence's) that caused this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<ActivationId>,
    #[serde(
        default,
        rename = "traceContext",
        skip_serializing_if = "Option::is_none"
    )]
    pub trace_context: Option<BTreeMap<String, String>>,
}

/// `transid`: `[id, startEpochMs, (extraLogging)?, (parent)?]`, kept as sent so the
/// acknowledgement carries it back unchanged.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(transparent)]
pub struct TransId(pub Vec<serde_json::Value>);

impl TransId {
    /// The transaction's id (the array's first element).
    pub fn id(&self) -> &str {
        self.0.first().and_then(|v| v.as_str()).unwrap_or_default()
    }

    /// When the controller started the transaction, epoch milliseconds.
    pub fn start_ms(&self) -> Option<u64> {
        self.0.get(1).and_then(|v| v.as_u64())
    }
}

/// `action`: the fully qualified name of the action to run.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ActionName {
    /// `ns` or `ns/pkg`.
    pub path: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The package binding it was invoked through (`ns/pkg`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding: Option<String>,
}

impl ActionName {
    /// The namespace (the path's first segment).
    pub fn namespace(&self) -> &str {
        self.path.split('/').next().unwrap_or_default()
    }

    /// The name within its namespace: `pkg/act` or `act`.
    pub fn name_in_namespace(&self) -> String {
        match self.path.split_once('/') {
            Some((_, package)) => format!("{package}/{}", self.name),
            None => self.name.clone(),
        }
    }

    /// `ns/pkg/act`: the `whisks` document's id and the `path` annotation.
    pub fn fully_qualified(&self) -> String {
        format!("{}/{}", self.path, self.name)
    }
}

/// `user`: who invoked it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Identity {
    pub subject: String,
    pub namespace: UserNamespace,
    pub authkey: AuthKey,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rights: Vec<String>,
    #[serde(default)]
    pub limits: UserLimits,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct UserNamespace {
    pub name: String,
    pub uuid: String,
    /// DigitalOcean's fork: the namespace's annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<Vec<KeyValue>>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct AuthKey {
    /// `uuid:secret`.
    pub api_key: String,
}

/// `user.limits` (all optional); only `storeActivations` is read, the rest kept.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct UserLimits {
    /// `false`: a non-blocking activation's record is not written to the
    /// `activations` database.
    #[serde(
        default,
        rename = "storeActivations",
        skip_serializing_if = "Option::is_none"
    )]
    pub store_activations: Option<bool>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// `rootControllerIndex`: the controller the acknowledgement goes back to.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ControllerInstance {
    #[serde(rename = "asString")]
    pub as_string: String,
    #[serde(
        default,
        rename = "instanceType",
        skip_serializing_if = "Option::is_none"
    )]
    pub instance_type: Option<String>,
}

/// Why a body is not an `ActivationMessage`.
#[derive(Debug, thiserror::Error)]
pub enum InvalidMessage {
    #[error("the body is not an ActivationMessage: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    TooLarge(#[from] super::TooManyValues),
    #[error("transid must be an array starting with the transaction's id (a string) and its start (epoch milliseconds)")]
    TransId,
    #[error("content must be a JSON object or array")]
    Content,
    #[error("initArgs names {key:?}, which content does not have")]
    InitArg { key: String },
    #[error("action.path and action.name must not be empty")]
    EmptyName,
}

impl ActivationMessage {
    /// Parses and checks a message (`POST /invoke`'s body).
    pub fn parse(body: &[u8]) -> Result<ActivationMessage, InvalidMessage> {
        super::check_json_values(body, super::MAX_JSON_VALUES)?;
        let mut msg: ActivationMessage = serde_json::from_slice(body)?;
        if msg.transid.0.first().is_none_or(|v| !v.is_string()) || msg.transid.start_ms().is_none()
        {
            return Err(InvalidMessage::TransId);
        }
        if msg.action.path.is_empty() || msg.action.name.is_empty() {
            return Err(InvalidMessage::EmptyName);
        }
        match &msg.content {
            None | Some(serde_json::Value::Object(_) | serde_json::Value::Array(_)) => {}
            Some(serde_json::Value::Null) => msg.content = None,
            Some(_) => return Err(InvalidMessage::Content),
        }
        if let Some(serde_json::Value::Object(content)) = &msg.content {
            if let Some(key) = msg.init_args.iter().find(|k| !content.contains_key(*k)) {
                return Err(InvalidMessage::InitArg { key: key.clone() });
            }
        }
        Ok(msg)
    }
}

/// The acknowledgement: OpenWhisk's `CombinedCompletionAndResultMessage`, which is
/// both the result (a blocking activation's) and the completion (the slot is free).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Acknowledgement {
    pub transid: TransId,
    pub response: AckResponse,
    #[serde(rename = "isSystemError")]
    pub is_system_error: bool,
    /// The invoker, under DigitalOcean's key (and upstream's before 2020).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invoker: Option<InvokerInstance>,
    /// The invoker, under upstream's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<InvokerInstance>,
}

/// An acknowledgement's `response`: the whole activation (blocking), or its id alone.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum AckResponse {
    Id(ActivationId),
    Activation(Box<WhiskActivation>),
}

/// Which key an acknowledgement names the invoker under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AckKey {
    /// `"invoker": {"instance", "userMemory"}`: DigitalOcean's functions-invoker.
    #[default]
    Invoker,
    /// `"instance": {..., "instanceType": "invoker"}`: upstream's `InvokerInstanceId`.
    Instance,
}

/// The invoker's identity (`InvokerInstanceId`; DigitalOcean's has only the first
/// two fields).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct InvokerInstance {
    pub instance: u64,
    /// `"<n> MB"`.
    #[serde(rename = "userMemory")]
    pub user_memory: String,
    #[serde(
        default,
        rename = "instanceType",
        skip_serializing_if = "Option::is_none"
    )]
    pub instance_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    #[serde(
        default,
        rename = "dedicatedNamespaces",
        skip_serializing_if = "Option::is_none"
    )]
    pub dedicated_namespaces: Option<Vec<String>>,
}

impl InvokerInstance {
    /// Invoker `instance` with `user_memory_mb` for activations, in `key`'s form.
    pub fn new(key: AckKey, instance: u64, user_memory_mb: u64) -> InvokerInstance {
        let upstream = key == AckKey::Instance;
        InvokerInstance {
            instance,
            user_memory: format!("{user_memory_mb} MB"),
            instance_type: upstream.then(|| "invoker".to_owned()),
            tags: upstream.then(Vec::new),
            dedicated_namespaces: upstream.then(Vec::new),
        }
    }
}

impl Acknowledgement {
    /// The acknowledgement of `activation`: the whole of it for a `blocking`
    /// message, its id for another; the invoker named under `key`.
    pub fn new(
        transid: TransId,
        activation: WhiskActivation,
        blocking: bool,
        key: AckKey,
        invoker: InvokerInstance,
    ) -> Acknowledgement {
        let is_system_error = activation.response.status_code == 3;
        let response = if blocking {
            AckResponse::Activation(Box::new(activation))
        } else {
            AckResponse::Id(activation.activation_id)
        };
        let (invoker, instance) = match key {
            AckKey::Invoker => (Some(invoker), None),
            AckKey::Instance => (None, Some(invoker)),
        };
        Acknowledgement {
            transid,
            response,
            is_system_error,
            invoker,
            instance,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A message as an upstream controller writes it (DigitalOcean's namespace
    /// annotations and a field from a newer controller included).
    fn upstream() -> serde_json::Value {
        json!({
            "transid": ["sid_invokerHealth", 1669276664249_u64, false],
            "action": {"path": "guest/utils", "name": "echo", "version": "0.0.1"},
            "revision": "1-c8cf1c5a0fb5bb1b4b0a0d0e8a12c3d4",
            "user": {
                "subject": "guest",
                "namespace": {"name": "guest", "uuid": "7759a935-55f3-4d5e-a0a5-c2d1f8a0b0c1",
                              "annotations": [{"key": "tier", "value": "free"}]},
                "authkey": {"api_key": "23bc46b1-71f6-4ed5-8c54-816aa4f8c502:123zO3xZCLrMN6v2BKK1dXYFpXlPkccOFqm12CdAsMgRU4VrNZ9lyGVCGuMDGIwP"},
                "rights": ["READ", "PUT", "DELETE", "ACTIVATE"],
                "limits": {"storeActivations": false, "invocationsPerMinute": 60}
            },
            "activationId": "40547988d96d441e947988d96d141e6f",
            "rootControllerIndex": {"asString": "0", "instanceType": "controller"},
            "blocking": true,
            "content": {"name": "Jane", "SECRET": "s", "n": 3},
            "initArgs": ["SECRET"],
            "traceContext": {"traceparent": "00-abc-def-01"},
            "someFutureField": 1
        })
    }

    #[test]
    fn parses_an_upstream_message_keeping_what_it_does_not_read() {
        let body = serde_json::to_vec(&upstream()).unwrap();
        let msg = ActivationMessage::parse(&body).unwrap();
        assert_eq!(msg.transid.id(), "sid_invokerHealth");
        assert_eq!(msg.transid.start_ms(), Some(1669276664249));
        assert_eq!(msg.action.namespace(), "guest");
        assert_eq!(msg.action.name_in_namespace(), "utils/echo");
        assert_eq!(msg.action.fully_qualified(), "guest/utils/echo");
        assert_eq!(msg.user.limits.store_activations, Some(false));
        assert_eq!(msg.user.limits.other["invocationsPerMinute"], json!(60));
        assert_eq!(msg.init_args, vec!["SECRET".to_owned()]);
        assert_eq!(
            msg.activation_id.to_string(),
            "40547988d96d441e947988d96d141e6f"
        );
        assert_eq!(msg.root_controller_index.as_string, "0");
        // What it was given is what it writes back (the transid in particular).
        let again = serde_json::to_value(&msg).unwrap();
        assert_eq!(
            again["transid"],
            json!(["sid_invokerHealth", 1669276664249_u64, false])
        );
        assert_eq!(again["user"]["limits"]["invocationsPerMinute"], json!(60));
    }

    #[test]
    fn minimal_messages_parse_with_defaults() {
        // The health action's message: no revision, no content, no instanceType.
        let body = json!({
            "transid": ["t", 1],
            "action": {"path": "whisk.system", "name": "invokerHealthTestAction0"},
            "revision": null,
            "user": {"subject": "s", "namespace": {"name": "whisk.system", "uuid": "u"},
                     "authkey": {"api_key": "a:b"}},
            "activationId": "0123456789abcdef0123456789abcdef",
            "rootControllerIndex": {"asString": "0"},
            "blocking": false,
            "content": null
        });
        let msg = ActivationMessage::parse(&serde_json::to_vec(&body).unwrap()).unwrap();
        assert_eq!(msg.revision, None);
        assert_eq!(msg.content, None);
        assert!(msg.init_args.is_empty() && msg.locked_args.is_empty());
        assert_eq!(msg.user.limits, UserLimits::default());
        // An array is passed through.
        let mut with_array = body.clone();
        with_array["content"] = json!([1, 2]);
        let msg = ActivationMessage::parse(&serde_json::to_vec(&with_array).unwrap()).unwrap();
        assert_eq!(msg.content, Some(json!([1, 2])));
    }

    type Change = Box<dyn Fn(&mut serde_json::Value)>;

    #[test]
    fn bad_messages_are_refused_saying_why() {
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|m| m["transid"] = json!("t")), "ActivationMessage"),
            (Box::new(|m| m["transid"] = json!([1, 2])), "transid"),
            (Box::new(|m| m["transid"] = json!(["t"])), "transid"),
            (
                Box::new(|m| m["content"] = json!("text")),
                "content must be",
            ),
            (Box::new(|m| m["initArgs"] = json!(["nope"])), "\"nope\""),
            (
                Box::new(|m| m["activationId"] = json!("xyz")),
                "activation id",
            ),
            (
                Box::new(|m| m.as_object_mut().unwrap().remove("user").map(drop).unwrap()),
                "user",
            ),
            (
                Box::new(|m| m["action"]["name"] = json!("")),
                "must not be empty",
            ),
        ];
        for (change, says) in cases {
            let mut m = upstream();
            change(&mut m);
            let e = ActivationMessage::parse(&serde_json::to_vec(&m).unwrap()).unwrap_err();
            assert!(e.to_string().contains(says), "{e} should say {says}");
        }
        assert!(ActivationMessage::parse(b"{").is_err());
    }

    fn activation(status_code: u8) -> WhiskActivation {
        serde_json::from_value(json!({
            "namespace": "guest", "name": "echo", "subject": "guest",
            "activationId": "40547988d96d441e947988d96d141e6f",
            "start": 1, "end": 2, "duration": 1,
            "response": {"status": "x", "statusCode": status_code, "success": status_code == 0,
                         "result": {"a": 1}},
            "logs": [], "version": "0.0.1", "publish": false, "annotations": []
        }))
        .unwrap()
    }

    #[test]
    fn acknowledgements_in_both_forms() {
        let transid = TransId(vec![json!("t"), json!(5)]);
        let me = InvokerInstance::new(AckKey::Invoker, 3, 2048);
        let ack = Acknowledgement::new(transid.clone(), activation(0), true, AckKey::Invoker, me);
        let v = serde_json::to_value(&ack).unwrap();
        assert_eq!(v["transid"], json!(["t", 5]));
        assert_eq!(v["isSystemError"], json!(false));
        assert_eq!(
            v["invoker"],
            json!({"instance": 3, "userMemory": "2048 MB"})
        );
        assert!(v.get("instance").is_none());
        assert_eq!(v["response"]["response"]["result"], json!({"a": 1}));

        let me = InvokerInstance::new(AckKey::Instance, 3, 2048);
        let ack = Acknowledgement::new(transid, activation(3), false, AckKey::Instance, me);
        let v = serde_json::to_value(&ack).unwrap();
        assert_eq!(v["response"], json!("40547988d96d441e947988d96d141e6f"));
        assert_eq!(v["isSystemError"], json!(true));
        assert!(v.get("invoker").is_none());
        assert_eq!(
            v["instance"],
            json!({"instance": 3, "userMemory": "2048 MB", "instanceType": "invoker",
                   "tags": [], "dedicatedNamespaces": []})
        );
        // And read back (a client of the contract, the bench's and the tests').
        let back: Acknowledgement = serde_json::from_value(v).unwrap();
        assert!(matches!(back.response, AckResponse::Id(_)));
    }
}
