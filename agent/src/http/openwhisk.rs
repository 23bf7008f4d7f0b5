//! OpenWhisk's REST API under `/api/v1` ([`OwOp`]): its requests to the library's
//! [`Request`]s, and the library's answers in OpenWhisk's shapes, errors included
//! (`{"error": "...", "code": "<transaction id>"}` with OpenWhisk's statuses).
//!
//! Namespaces: the path's `{ns}` is an OpenWhisk namespace, which is sprout's; `_`
//! is the key's own (`default` for a caller without one: a `*` key, `--no-auth`, the
//! Unix socket). An action's name is one segment (`act`, or `pkg%2Fact`) or two
//! (`pkg/act`, as the npm client sends it), mapped to sprout's by
//! [`crate::names::from_openwhisk`].

use ipc::api::{ActivationId, DEFAULT_NAMESPACE};
use serde_json::{json, Value};

use super::reply::{OwAnswer, Reject};
use crate::activations::{Activations, Query};
use crate::request::{ActivationPart, Request};

/// How long a blocking invocation is waited for before it is answered 202
/// (OpenWhisk's 60 s), unless the server was given another.
pub const DEFAULT_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// The operations of OpenWhisk's API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OwOp {
    Namespaces,
    ListActions,
    PutAction,
    GetAction,
    DeleteAction,
    InvokeAction,
    ListActivations,
    GetActivation(ActivationPart),
}

/// An OpenWhisk request matched, waiting for its body.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct OwRoute {
    op: OwOp,
    namespace: String,
    name: String,
    query: Vec<(String, String)>,
    /// The caller's key (`uuid:secret`), when it sent one.
    api_key: Option<String>,
    /// The caller's namespace: the key's, else the path's.
    subject: String,
    /// A namespace key's view (`GET /namespaces`).
    own: Option<String>,
    wait: std::time::Duration,
}

impl OwRoute {
    /// Sets how long a blocking invocation is waited for (the server's setting).
    pub fn with_wait(mut self, wait: std::time::Duration) -> OwRoute {
        self.wait = wait;
        self
    }
}

/// The namespace a path's `{ns}` names for a caller whose key's namespace is `own`
/// (`_`: its own).
pub(super) fn namespace_of(ns: String, own: Option<&str>) -> String {
    match ns.as_str() {
        "_" => own.unwrap_or(DEFAULT_NAMESPACE).to_owned(),
        _ => ns,
    }
}

/// Who calls: its key's namespace and the key itself, as it sent it.
#[derive(Debug, Clone, Default)]
pub(super) struct Caller {
    pub own: Option<String>,
    pub api_key: Option<String>,
}

/// The route for `op` on `namespace` (already resolved) and `name` (decoded, with
/// its package).
pub(super) fn route(
    op: OwOp,
    namespace: String,
    name: String,
    query: Vec<(String, String)>,
    caller: Caller,
) -> Result<OwRoute, Reject> {
    let known: &[&str] = match op {
        OwOp::Namespaces | OwOp::DeleteAction | OwOp::GetActivation(_) => &[],
        OwOp::ListActions => &["limit", "skip", "count"],
        OwOp::PutAction => &["overwrite"],
        OwOp::GetAction => &["code"],
        OwOp::InvokeAction => &["blocking", "result", "timeout"],
        OwOp::ListActivations => &["name", "limit", "skip", "since", "upto", "docs", "count"],
    };
    if let Some((key, _)) = query.iter().find(|(k, _)| !known.contains(&k.as_str())) {
        return Err(Reject::bad_request(format!(
            "unknown query parameter {key:?}"
        )));
    }
    Ok(OwRoute {
        op,
        subject: caller.own.clone().unwrap_or_else(|| namespace.clone()),
        namespace,
        name,
        query,
        api_key: caller.api_key,
        own: caller.own,
        wait: DEFAULT_WAIT,
    })
}

fn flag(query: &[(String, String)], key: &str) -> Result<bool, Reject> {
    match query
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
    {
        None | Some("false") | Some("0") => Ok(false),
        Some("") | Some("true") | Some("1") => Ok(true),
        Some(v) => Err(Reject::bad_request(format!(
            "query parameter {key:?} has an invalid value {v:?}"
        ))),
    }
}

fn int(query: &[(String, String)], key: &str) -> Result<Option<u64>, Reject> {
    match query.iter().find(|(k, _)| k == key) {
        None => Ok(None),
        Some((_, v)) => v.parse().map(Some).map_err(|_| {
            Reject::bad_request(format!("The value '{v}' is not an integer for {key}."))
        }),
    }
}

impl OwRoute {
    /// The request for the body, and how its answer is written.
    pub fn into_dispatch(self, body: Vec<u8>) -> Result<(Request, OwAnswer), Reject> {
        let id = Activations::new_id();
        let mut answer = OwAnswer {
            code: id.to_string(),
            ..OwAnswer::default()
        };
        let json_body = |body: &[u8]| -> Result<Value, Reject> {
            if body.iter().all(u8::is_ascii_whitespace) {
                return Ok(json!({}));
            }
            ipc::openwhisk::check_json_values(body, ipc::openwhisk::MAX_JSON_VALUES).map_err(
                |e| Reject::payload_too_large(format!("The request content was too large: {e}.")),
            )?;
            serde_json::from_slice(body)
                .map_err(|e| Reject::bad_request(format!("The request content was malformed: {e}")))
        };
        let OwRoute {
            op,
            namespace,
            name,
            query,
            ..
        } = &self;
        let (namespace, name) = (namespace.clone(), name.clone());
        let request = match op {
            OwOp::Namespaces => {
                answer.namespaces = true;
                answer.own = self.own.clone();
                Request::Status
            }
            OwOp::ListActions => Request::ListActions {
                namespace,
                limit: int(query, "limit")?.unwrap_or(crate::openwhisk::action::DEFAULT_LIST),
                skip: int(query, "skip")?.unwrap_or(0),
            },
            OwOp::PutAction => {
                let action = serde_json::from_value(json_body(&body)?).map_err(|e| {
                    Reject::bad_request(format!("The request content was malformed: {e}"))
                })?;
                Request::PutAction {
                    namespace,
                    name,
                    action: Box::new(action),
                    overwrite: flag(query, "overwrite")?,
                }
            }
            OwOp::GetAction => Request::GetAction { namespace, name },
            OwOp::DeleteAction => Request::DeleteAction { namespace, name },
            OwOp::InvokeAction => {
                let params = json_body(&body)?;
                if !params.is_object() && !params.is_array() {
                    return Err(Reject::bad_request(
                        "The request content was malformed: the parameters must be a JSON object",
                    ));
                }
                let blocking = flag(query, "blocking")?;
                answer.result_only = blocking && flag(query, "result")?;
                Request::InvokeAction {
                    namespace,
                    name,
                    call: Box::new(crate::openwhisk::action::Invocation {
                        params,
                        api_key: self.api_key.clone(),
                        subject: self.subject.clone(),
                        blocking,
                        wait_at_most: Some(self.wait),
                        activation_id: Some(id),
                    }),
                }
            }
            OwOp::ListActivations => {
                let name = match query.iter().find(|(k, _)| k == "name") {
                    Some((_, n)) => Some(crate::names::from_openwhisk(n).map_err(|_| {
                        Reject::bad_request(format!(
                            "Parameter may be a 'simple' name or 'package-name/simple' name: {n}"
                        ))
                    })?),
                    None => None,
                };
                let limit = int(query, "limit")?.unwrap_or(crate::activations::DEFAULT_LIMIT);
                if limit > crate::activations::MAX_LIMIT {
                    return Err(Reject::bad_request(format!(
                        "The value '{limit}' is not in the range of 0 to {} for activations.",
                        crate::activations::MAX_LIMIT
                    )));
                }
                if int(query, "upto")?.is_some() || flag(query, "count")? {
                    return Err(Reject::bad_request(
                        "query parameters \"upto\" and \"count\" are not supported by sprout",
                    ));
                }
                Request::WhiskActivations {
                    query: Query {
                        namespace: Some(namespace),
                        name,
                        since: int(query, "since")?,
                        limit: if limit == 0 {
                            crate::activations::MAX_LIMIT
                        } else {
                            limit
                        },
                        skip: int(query, "skip")?.unwrap_or(0),
                    },
                    docs: flag(query, "docs")?,
                }
            }
            OwOp::GetActivation(part) => {
                let id = ActivationId::parse(&self.name)
                    .map_err(|_| Reject::bad_request("The activation id is not valid."))?;
                match part {
                    ActivationPart::Record => Request::GetWhiskActivation {
                        namespace: Some(namespace),
                        id,
                    },
                    part => Request::GetActivation {
                        namespace: Some(namespace),
                        id,
                        part: *part,
                    },
                }
            }
        };
        Ok((request, answer))
    }
}
