//! The invoker contract's core: an OpenWhisk controller's `ActivationMessage` to one
//! [`Activate`] (after fetching its action from the `whisks` database when sprout
//! does not have it at that revision), and the outcome to the acknowledgement the
//! controller reads ([`Acknowledgement`]). No transport: `POST /invoke` (the HTTP
//! path with the early acknowledgement) is the HTTP server's.
//!
//! The message is run as:
//! - the function `from_openwhisk(pkg/act)` of namespace `ns` (`action.path` is `ns`
//!   or `ns/pkg`);
//! - `content` without the `initArgs` keys as its parameters (an array unchanged),
//!   the `initArgs` values, as strings, in its environment;
//! - always blocking: the acknowledgement of a non-blocking message carries the id
//!   alone, and its record goes to the `activations` database (with `--whisks-db`).
//!
//! Whatever happens, the answer is an acknowledgement: an action that is not there
//! is an application error ("Action could not be found or may have been
//! deleted."), one that could not be fetched a whisk error, encrypted parameters
//! (`lockedArgs`: sprout has no keys to decrypt them) an application error saying so.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ipc::api::ActivationStatus;
use ipc::openwhisk::activation::{ActivationResponse, WhiskActivation};
use ipc::openwhisk::invoker::{AckKey, Acknowledgement, ActivationMessage, InvokerInstance};
use ipc::openwhisk::KeyValue;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tracing::{debug, info_span, warn};

use super::activation::status_text;
use super::whisks::{self, CouchDb, Writer};
use super::Activate;
use crate::error::Error;
use crate::request::{Request, Response};

/// OpenWhisk's text for an action the invoker cannot find.
pub const NOT_FOUND: &str = "Action could not be found or may have been deleted.";
/// OpenWhisk's text for an action the invoker could not fetch.
pub const NOT_FETCHED: &str = "Action could not be fetched.";

/// Revisions remembered at most (a forgotten one costs a fetch).
const MAX_REVISIONS: usize = 16_384;

/// How the node acts as an OpenWhisk invoker (`sprout serve --invoker-id`,
/// `--user-memory`, `--ack-key`, `--whisks-db`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    /// The invoker's instance number (`invoker<N>`).
    pub instance: u64,
    /// The memory it offers for activations, MB (its identity's `userMemory`).
    pub user_memory_mb: u64,
    /// Which key the acknowledgement names the invoker under.
    pub ack_key: AckKey,
    /// OpenWhisk's CouchDB (`http[s]://[user:pass@]host:port`): actions are fetched
    /// from its `whisks` database, non-blocking records written to `activations`.
    pub whisks_db: Option<String>,
}

/// What runs a request through the agent (the agent's own `handle`).
pub type Run<'a> = &'a dyn Fn(Request) -> Result<Response, Error>;

/// The invoker side of the node: its identity, and the `whisks` database if any.
#[derive(Debug)]
pub struct WhiskInvoker {
    settings: Settings,
    db: Option<Whisks>,
}

#[derive(Debug)]
struct Whisks {
    db: CouchDb,
    /// The revision each action (`ns/pkg/act`) was last registered at from the
    /// database, and the revisions asked for that it answered (gone, so the latest
    /// was taken): asking again is not another fetch.
    registered: Mutex<HashMap<String, Registered>>,
    /// One fetch at a time per action: messages that arrive while it is fetched
    /// wait for it and take its outcome (registered, or the same failure) instead
    /// of fetching again.
    fetching: Mutex<HashMap<String, Arc<FetchTurn>>>,
    writer: Writer,
}

/// One action's fetch: held by the message fetching it, then holding its outcome
/// for the messages that waited.
type FetchTurn = Mutex<Option<Result<(), Fetch>>>;

/// An action registered from the database.
#[derive(Debug)]
struct Registered {
    revision: String,
    /// Revisions asked for that this one answered, the latest few.
    answers: Vec<String>,
}

/// A CouchDB revision's generation (`3` of `3-9f1c...`); 0 when it has none.
fn generation(revision: &str) -> u64 {
    revision
        .split_once('-')
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or(0)
}

/// Revisions remembered as answered by another, per action.
const ANSWERS: usize = 8;

impl Registered {
    fn answers(&self, want: Option<&str>) -> bool {
        want.is_none_or(|w| w == self.revision || self.answers.iter().any(|a| a == w))
    }
}

/// Why an action could not be made ready.
#[derive(Debug, Clone)]
enum Fetch {
    NotFound,
    /// The database failed (why).
    Failed(String),
    /// The action's document was read and sprout refused it (why).
    Refused(String),
}

impl WhiskInvoker {
    /// Starts the `activations` writer when there is a database.
    pub fn start(settings: Settings) -> Result<WhiskInvoker, whisks::Error> {
        let db = match &settings.whisks_db {
            Some(url) => {
                let db = CouchDb::new(url)?;
                Some(Whisks {
                    writer: Writer::start(db.clone())?,
                    db,
                    registered: Mutex::new(HashMap::new()),
                    fetching: Mutex::new(HashMap::new()),
                })
            }
            None => None,
        };
        Ok(WhiskInvoker { settings, db })
    }

    /// Checks `--whisks-db URL` without starting anything.
    pub fn check_url(url: &str) -> Result<(), whisks::Error> {
        CouchDb::new(url).map(drop)
    }

    /// Writes the records still queued for the `activations` database.
    pub fn stop(&self) {
        if let Some(db) = &self.db {
            db.writer.stop();
        }
    }

    /// The invoker's identity as its acknowledgements show it.
    pub fn identity(&self) -> InvokerInstance {
        InvokerInstance::new(
            self.settings.ack_key,
            self.settings.instance,
            self.settings.user_memory_mb,
        )
    }

    /// Runs `msg` with `run` and answers its acknowledgement.
    pub fn acknowledge(&self, mut msg: ActivationMessage, run: Run) -> Acknowledgement {
        let span = info_span!("openwhisk_activation", activation_id = %msg.activation_id,
            action = %msg.action.fully_qualified(), transid = %msg.transid.id());
        let _entered = span.enter();
        let activation = self.activation(&mut msg, run);
        if !msg.blocking && msg.user.limits.store_activations != Some(false) {
            if let Some(db) = &self.db {
                db.writer.push(&activation);
            }
        }
        debug!(
            status_code = activation.response.status_code,
            "acknowledged"
        );
        Acknowledgement::new(
            msg.transid,
            activation,
            msg.blocking,
            self.settings.ack_key,
            self.identity(),
        )
    }

    /// The activation `msg` ends in; its `content` is taken (not copied) for the run.
    fn activation(&self, msg: &mut ActivationMessage, run: Run) -> WhiskActivation {
        if !msg.locked_args.is_empty() {
            return failure(
                msg,
                ActivationStatus::ApplicationError,
                &format!(
                    "The parameters {} are encrypted (lockedArgs), and this invoker (sprout) does not decrypt parameters.",
                    some_names(msg.locked_args.keys())
                ),
            );
        }
        if let Some(db) = &self.db {
            match db.ensure(msg, run) {
                Ok(()) => {}
                Err(Fetch::NotFound) => {
                    return failure(msg, ActivationStatus::ApplicationError, NOT_FOUND)
                }
                Err(Fetch::Failed(e)) => {
                    warn!(error = %e, "action not fetched");
                    return failure(msg, ActivationStatus::WhiskInternalError, NOT_FETCHED);
                }
                Err(Fetch::Refused(e)) => {
                    return failure(
                        msg,
                        ActivationStatus::ApplicationError,
                        &format!("The action could not be installed on this invoker: {e}"),
                    )
                }
            }
        }
        let activate = match activate(msg) {
            Ok(a) => a,
            // A name sprout cannot hold names no action it has.
            Err(_) => return failure(msg, ActivationStatus::ApplicationError, NOT_FOUND),
        };
        match run(Request::Activate(Box::new(activate))) {
            Ok(Response::Activated(mut activation)) => {
                // OpenWhisk's record names the invoking namespace and the action's
                // OpenWhisk name and path.
                activation.namespace = msg.user.namespace.name.clone();
                activation.name = msg.action.name.clone();
                for a in &mut activation.annotations {
                    if a.key == "path" {
                        a.value = json!(msg.action.fully_qualified());
                    }
                }
                *activation
            }
            Ok(Response::Accepted(_)) | Ok(_) => failure(
                msg,
                ActivationStatus::WhiskInternalError,
                "The activation was not run to its end.",
            ),
            Err(Error::NotFound { .. }) => {
                failure(msg, ActivationStatus::ApplicationError, NOT_FOUND)
            }
            Err(e) => {
                warn!(error = %ipc::chain(&e), "activation failed");
                failure(msg, ActivationStatus::WhiskInternalError, &e.to_string())
            }
        }
    }
}

impl Whisks {
    /// Makes sure sprout has the message's action at its revision: fetched and
    /// registered when it is not known at that revision (a message without one takes
    /// the revision last registered, else the latest).
    fn ensure(&self, msg: &ActivationMessage, run: Run) -> Result<(), Fetch> {
        let id = msg.action.fully_qualified();
        let want = msg.revision.as_deref();
        let known = |registered: &HashMap<String, Registered>| {
            registered.get(&id).is_some_and(|r| r.answers(want))
        };
        if known(&self.registered.lock()) {
            return Ok(());
        }
        let turn = Arc::clone(self.fetching.lock().entry(id.clone()).or_default());
        let result = {
            let mut outcome = turn.lock();
            match &*outcome {
                // The fetch this message waited for ended: its outcome is this one's.
                Some(done) => done.clone(),
                None if known(&self.registered.lock()) => Ok(()),
                None => {
                    let done = self.fetch(&id, msg, run);
                    *outcome = Some(done.clone());
                    done
                }
            }
        };
        let mut fetching = self.fetching.lock();
        if Arc::strong_count(&turn) == 2 {
            fetching.remove(&id);
        }
        result
    }

    /// Fetches and registers action `id` at the message's revision (or the latest).
    fn fetch(&self, id: &str, msg: &ActivationMessage, run: Run) -> Result<(), Fetch> {
        let (action, rev) = match self.db.action(id, msg.revision.as_deref()) {
            Ok(Some(found)) => found,
            Ok(None) => return Err(Fetch::NotFound),
            Err(e) => return Err(Fetch::Failed(ipc::chain(&e))),
        };
        debug!(revision = %rev, "action fetched from the whisks database");
        let mut registered = self.registered.lock();
        if let Some(r) = registered.get_mut(id).filter(|r| r.revision == rev) {
            // The revision asked for is gone, and the latest is the one registered;
            // one the latest supersedes (an older generation) is answered by it for
            // good, one not yet seen (a newer generation: the database lags) is asked
            // again next time.
            if let Some(asked) = msg
                .revision
                .as_ref()
                .filter(|a| generation(a) < generation(&rev))
            {
                if r.answers.len() >= ANSWERS {
                    r.answers.remove(0);
                }
                r.answers.push(asked.clone());
            }
            return Ok(());
        }
        drop(registered);
        let put = Request::PutAction {
            namespace: msg.action.namespace().to_owned(),
            name: msg.action.name_in_namespace(),
            action: Box::new(action),
            overwrite: true,
        };
        run(put).map_err(|e| Fetch::Refused(e.to_string()))?;
        let mut registered = self.registered.lock();
        if registered.len() >= MAX_REVISIONS {
            registered.clear();
        }
        let answers = msg
            .revision
            .iter()
            .filter(|asked| generation(asked) < generation(&rev))
            .cloned()
            .collect();
        registered.insert(
            id.to_owned(),
            Registered {
                revision: rev,
                answers,
            },
        );
        Ok(())
    }
}

/// The [`Activate`] a message asks for; its `content` is taken for the parameters.
pub fn activate(msg: &mut ActivationMessage) -> Result<Activate, Error> {
    let namespace = msg.action.namespace().to_owned();
    crate::names::validate_namespace(&namespace)?;
    let name = crate::names::from_openwhisk(&msg.action.name_in_namespace())?;
    let mut init_env = BTreeMap::new();
    let params = match msg.content.take() {
        None => json!({}),
        Some(Value::Object(mut params)) => {
            for key in &msg.init_args {
                if let Some(value) = params.remove(key) {
                    init_env.insert(key.clone(), env_value(&value));
                }
            }
            Value::Object(params)
        }
        // An array goes through unchanged; there are no keys to take out.
        Some(other) => other,
    };
    Ok(Activate {
        namespace,
        name,
        params,
        init_env,
        activation_id: Some(msg.activation_id),
        transaction_id: Some(msg.transid.id().to_owned()),
        api_key: Some(msg.user.authkey.api_key.clone()),
        subject: msg.user.subject.clone(),
        cause: msg.cause,
        blocking: true,
        wait_at_most: None,
    })
}

/// An init parameter as the action's environment holds it: a string as it is, `null`
/// as `""`, anything else as its compact JSON.
pub fn env_value(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The first names of `names` for a message, each cut at 64 characters (a message's
/// keys are the sender's and of any size), with how many more there are.
fn some_names<'a>(names: impl ExactSizeIterator<Item = &'a String>) -> String {
    const SHOWN: usize = 8;
    let total = names.len();
    let mut text = names
        .take(SHOWN)
        .map(|n| match n.char_indices().nth(64) {
            Some((cut, _)) => format!("{}...", &n[..cut]),
            None => n.clone(),
        })
        .collect::<Vec<_>>()
        .join(", ");
    if total > SHOWN {
        text.push_str(&format!(" and {} more", total - SHOWN));
    }
    text
}

/// The activation of a message that did not run: `status` with `{"error": text}`.
fn failure(msg: &ActivationMessage, status: ActivationStatus, text: &str) -> WhiskActivation {
    let now = now_ms();
    let result = serde_json::value::to_raw_value(&json!({ "error": text })).ok();
    let size = result.as_ref().map(|r| r.get().len() as u64);
    WhiskActivation {
        namespace: msg.user.namespace.name.clone(),
        name: msg.action.name.clone(),
        subject: msg.user.subject.clone(),
        activation_id: msg.activation_id,
        cause: msg.cause,
        start: now,
        end: now,
        duration: 0,
        response: ActivationResponse {
            status: status_text(status).to_owned(),
            status_code: status.code(),
            success: false,
            result,
            size,
        },
        logs: Vec::new(),
        version: msg
            .action
            .version
            .clone()
            .unwrap_or_else(|| "0.0.1".to_owned()),
        publish: false,
        annotations: vec![KeyValue {
            key: "path".into(),
            value: json!(msg.action.fully_qualified()),
            init: false,
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc::openwhisk::invoker::AckResponse;
    use std::cell::RefCell;

    #[test]
    fn a_message_names_a_few_names_each_cut() {
        let names: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
        assert_eq!(
            some_names(names.iter()),
            "k0, k1, k2, k3, k4, k5, k6, k7 and 12 more"
        );
        let long = ["é".repeat(10_000)];
        let text = some_names(long.iter());
        assert_eq!(text, format!("{}...", "é".repeat(64)));
    }

    fn message(extra: Value) -> ActivationMessage {
        let mut m = json!({
            "transid": ["tid-1", 1700000000000_u64],
            "action": {"path": "alpha/pkg", "name": "my act", "version": "0.0.3"},
            "revision": null,
            "user": {"subject": "alice", "namespace": {"name": "alpha", "uuid": "u"},
                     "authkey": {"api_key": "uuid:secret"}},
            "activationId": "0123456789abcdef0123456789abcdef",
            "rootControllerIndex": {"asString": "0"},
            "blocking": true,
            "content": {"a": 1, "K": "v", "N": null, "O": {"x": [1, true]}, "B": false},
            "initArgs": ["K", "N", "O", "B"]
        });
        if let (Value::Object(m), Value::Object(extra)) = (&mut m, extra) {
            m.extend(extra);
        }
        ActivationMessage::parse(&serde_json::to_vec(&m).unwrap()).unwrap()
    }

    fn invoker(key: AckKey) -> WhiskInvoker {
        WhiskInvoker::start(Settings {
            instance: 7,
            user_memory_mb: 1024,
            ack_key: key,
            whisks_db: None,
        })
        .unwrap()
    }

    #[test]
    fn a_message_becomes_one_activate() {
        let a = activate(&mut message(json!({}))).unwrap();
        assert_eq!(a.namespace, "alpha");
        assert_eq!(a.name, "pkg~2fmy~20act");
        assert_eq!(a.params, json!({"a": 1}));
        let env: Vec<(&str, &str)> = a
            .init_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            env,
            [
                ("B", "false"),
                ("K", "v"),
                ("N", ""),
                ("O", "{\"x\":[1,true]}")
            ]
        );
        assert_eq!(a.transaction_id.as_deref(), Some("tid-1"));
        assert_eq!(a.api_key.as_deref(), Some("uuid:secret"));
        assert_eq!(a.subject, "alice");
        assert!(a.blocking, "the invoker always waits");
        let a = activate(&mut message(json!({"content": [1, 2], "initArgs": []}))).unwrap();
        assert_eq!(a.params, json!([1, 2]));
        let a = activate(&mut message(json!({"content": null, "initArgs": []}))).unwrap();
        assert_eq!(a.params, json!({}));
    }

    #[test]
    fn outcomes_are_acknowledgements() {
        let me = invoker(AckKey::Invoker);
        // Not registered: OpenWhisk's application error, not a system error.
        let asked = RefCell::new(Vec::new());
        let ack = me.acknowledge(message(json!({})), &|req| {
            if let Request::Activate(a) = &req {
                asked.borrow_mut().push(a.name.clone());
            }
            Err(Error::NotFound {
                namespace: "alpha".into(),
                name: "pkg~2fmy~20act".into(),
            })
        });
        assert_eq!(asked.borrow().as_slice(), ["pkg~2fmy~20act"]);
        assert!(!ack.is_system_error);
        let AckResponse::Activation(a) = &ack.response else {
            panic!("blocking: the whole activation")
        };
        assert_eq!(a.response.status_code, 1);
        assert_eq!(
            a.response.result.as_ref().unwrap().get(),
            format!("{{\"error\":\"{NOT_FOUND}\"}}")
        );
        assert_eq!((a.namespace.as_str(), a.name.as_str()), ("alpha", "my act"));
        assert_eq!(a.version, "0.0.3");
        assert_eq!(
            ack.invoker,
            Some(InvokerInstance::new(AckKey::Invoker, 7, 1024))
        );

        // Another failure of the agent: a system error, whose id alone is answered
        // for a non-blocking message.
        let ack = me.acknowledge(message(json!({"blocking": false})), &|_| {
            Err(Error::ShuttingDown)
        });
        assert!(ack.is_system_error);
        assert!(
            matches!(ack.response, AckResponse::Id(id) if id.to_string() == "0123456789abcdef0123456789abcdef")
        );

        // Encrypted parameters are refused without running anything.
        let me = invoker(AckKey::Instance);
        let ack = me.acknowledge(message(json!({"lockedArgs": {"K": "key1"}})), &|_| {
            panic!("nothing runs")
        });
        let AckResponse::Activation(a) = &ack.response else {
            panic!()
        };
        assert_eq!(a.response.status_code, 1);
        assert!(a
            .response
            .result
            .as_ref()
            .unwrap()
            .get()
            .contains("K are encrypted (lockedArgs)"));
        assert!(ack.invoker.is_none() && ack.instance.is_some());
    }

    #[test]
    fn init_values_are_strings_as_openwhisk_sends_them() {
        assert_eq!(env_value(&json!("a b")), "a b");
        assert_eq!(env_value(&json!(null)), "");
        assert_eq!(env_value(&json!(1.5)), "1.5");
        assert_eq!(env_value(&json!({"k": "v"})), "{\"k\":\"v\"}");
    }
}
