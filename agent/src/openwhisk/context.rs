//! An OpenWhisk activation as it rides with its invocation ([`Context`]): made from
//! a checked [`Activate`], it makes the activation's environment and keeps the record
//! its invocation wrote, which [`answer`] turns into OpenWhisk's shape.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use ipc::api::{ActivationId, ActivationRecord};
use ipc::proto::Runtime;
use parking_lot::Mutex;

use super::error::Error;
use super::{activation, kind_of, Activate, MAX_ENV_NAME, MAX_FIELD, MAX_INIT_PARAMS};
use crate::error::Error as AgentError;
use crate::registry::Function;
use crate::request::Response;

/// An OpenWhisk activation as it rides with its invocation: what its environment is
/// made of, how its outcome reads (its runtime's texts), what its record adds (the
/// action's kind, the subject), and, once written, its record (the blocking answer).
#[derive(Debug)]
pub struct Context {
    pub runtime: Runtime,
    /// The action's exec kind (`python:3`, `nodejs:20`, `blackbox`).
    pub kind: String,
    pub subject: String,
    api_key: Option<String>,
    transaction_id: Option<String>,
    api_host: Option<String>,
    init_env: BTreeMap<String, String>,
    /// The record its invocation wrote (or would have, records off).
    written: Mutex<Option<ActivationRecord>>,
}

fn check_field(field: &'static str, value: &str) -> Result<(), Error> {
    if value.len() > MAX_FIELD {
        return Err(Error::TooLong {
            field,
            len: value.len(),
            max: MAX_FIELD,
        });
    }
    if value.chars().any(char::is_control) {
        return Err(Error::Control { field });
    }
    Ok(())
}

impl Context {
    /// Checks `activate`'s fields (they come from clients: bounded, no control
    /// characters, init parameters that can be environment variables and do not
    /// forge the `__OW_` context) for an activation of `function`.
    pub fn new(
        activate: &Activate,
        function: &Function,
        api_host: Option<&str>,
    ) -> Result<Context, Error> {
        for (field, value) in [
            ("api_key", activate.api_key.as_deref()),
            ("transaction_id", activate.transaction_id.as_deref()),
            ("subject", Some(activate.subject.as_str())),
            ("the API host", api_host),
        ] {
            if let Some(value) = value {
                check_field(field, value)?;
            }
        }
        if activate.init_env.len() > MAX_INIT_PARAMS {
            return Err(Error::TooManyInitParams {
                count: activate.init_env.len(),
                max: MAX_INIT_PARAMS,
            });
        }
        for (name, value) in &activate.init_env {
            let why = if name.is_empty() {
                Some("an empty name")
            } else if name.len() > MAX_ENV_NAME {
                Some("a name longer than 256 bytes")
            } else if name.contains('=') || name.contains('\0') {
                Some("a name holding '=' or NUL cannot be a variable")
            } else if name.starts_with(|c: char| c.is_ascii_digit())
                || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                Some("a variable's name is [A-Za-z_][A-Za-z0-9_]*")
            } else if crate::runtime::env_names::reserved_env(name).is_some() {
                Some("the name is reserved (__OW_*, SPROUT_*, AWS_LAMBDA_*, _HANDLER, LAMBDA_TASK_ROOT): sprout or the runtime's protocol sets it")
            } else if value.contains('\0') {
                Some("a value holding NUL cannot be a variable's")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(Error::InitEnv {
                    name: name.chars().take(MAX_ENV_NAME).collect(),
                    why,
                });
            }
        }
        let context = Context {
            runtime: function.runtime,
            kind: kind_of(function.runtime).to_owned(),
            subject: activate.subject.clone(),
            api_key: activate.api_key.clone(),
            transaction_id: activate.transaction_id.clone(),
            api_host: api_host.map(str::to_owned),
            init_env: activate.init_env.clone(),
            written: Mutex::new(None),
        };
        // The largest it can be (the longest name, version and deadline): refused
        // now rather than at the instance.
        let widest = context.env(
            function,
            ActivationId::from_u128(u128::MAX),
            SystemTime::now(),
        );
        let len = serde_json::to_vec(&widest).map_or(usize::MAX, |v| v.len()) + 64;
        if len > ipc::proto::MAX_ACTIVATION_ENV {
            return Err(Error::EnvTooLarge {
                len,
                max: ipc::proto::MAX_ACTIVATION_ENV,
            });
        }
        Ok(context)
    }

    /// The variables activation `id` of `function` runs with, its deadline
    /// `deadline`: its init parameters and OpenWhisk's context.
    pub fn env(
        &self,
        function: &Function,
        id: ActivationId,
        deadline: SystemTime,
    ) -> BTreeMap<String, String> {
        let mut env = self.init_env.clone();
        let mut set = |k: &str, v: String| {
            env.insert(k.to_owned(), v);
        };
        if let Some(key) = &self.api_key {
            set("__OW_API_KEY", key.clone());
        }
        if let Some(host) = &self.api_host {
            set("__OW_API_HOST", host.clone());
        }
        set("__OW_NAMESPACE", function.namespace.clone());
        set(
            "__OW_ACTION_NAME",
            format!(
                "/{}/{}",
                function.namespace,
                crate::names::to_openwhisk(&function.name)
            ),
        );
        set("__OW_ACTION_VERSION", super::semver(function.version));
        set("__OW_ACTIVATION_ID", id.to_string());
        set(
            "__OW_TRANSACTION_ID",
            self.transaction_id
                .clone()
                .unwrap_or_else(|| id.to_string()),
        );
        set(
            "__OW_DEADLINE",
            crate::activations::record::epoch_ms(deadline).to_string(),
        );
        env
    }

    /// Keeps the record its invocation wrote.
    pub(crate) fn keep(&self, record: ActivationRecord) {
        *self.written.lock() = Some(record);
    }

    /// The record its invocation wrote, if it got that far.
    pub fn take_record(&self) -> Option<ActivationRecord> {
        self.written.lock().take()
    }
}

/// A shared [`Context`] (the invocation, a background thread and the agent hold it).
pub type SharedContext = Arc<Context>;

/// A blocking activation's answer: the record its invocation wrote, in OpenWhisk's
/// shape; without one (it was refused before it was an activation: no room, no such
/// function) its error.
pub(crate) fn answer(
    context: &Context,
    out: Result<(), AgentError>,
) -> Result<Response, AgentError> {
    match (context.take_record(), out) {
        (Some(record), _) => Ok(Response::Activated(Box::new(activation::whisk_activation(
            &record,
            &context.kind,
            &context.subject,
        )))),
        (None, Err(e)) => Err(e),
        (None, Ok(())) => Err(AgentError::State {
            path: "OpenWhisk activation".into(),
            source: std::io::Error::other("it ended without a record"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::names::FunctionKey;
    use crate::openwhisk::event_of;
    use crate::registry::Rules;

    fn function(dir: &std::path::Path, name: &str) -> Function {
        std::fs::write(dir.join("main.py"), "def main(a):\n    return a\n").unwrap();
        let rules = Rules {
            defaults: crate::config::Defaults::default(),
            memory_budget_mb: 1024,
            machine_cpus: 2,
            state_root: PathBuf::from("/nonexistent/sprout-state"),
            data_dir: None,
        };
        let config = ipc::api::FunctionConfig {
            handler: Some("main:main".into()),
            ..Default::default()
        };
        let key = FunctionKey::new("guest", name).unwrap();
        Function::checked(&key, dir, &config, &rules, 4, false).unwrap()
    }

    fn activate() -> Activate {
        Activate {
            namespace: "guest".into(),
            name: "pkg~2fact".into(),
            params: serde_json::json!({}),
            init_env: BTreeMap::new(),
            activation_id: None,
            transaction_id: None,
            api_key: None,
            subject: "alice".into(),
            cause: None,
            blocking: true,
            wait_at_most: None,
        }
    }

    #[test]
    fn parameters_are_an_object_or_an_array() {
        assert_eq!(
            event_of(&serde_json::json!({"a": 1})).unwrap(),
            b"{\"a\":1}"
        );
        assert_eq!(event_of(&serde_json::json!([1])).unwrap(), b"[1]");
        for (bad, found) in [
            (serde_json::json!("s"), "a string"),
            (serde_json::json!(1), "a number"),
            (serde_json::json!(null), "null"),
            (serde_json::json!(true), "a boolean"),
        ] {
            let e = event_of(&bad).unwrap_err();
            assert!(e.to_string().contains(found), "{e}");
        }
    }

    #[test]
    fn the_environment_holds_openwhisks_context_and_the_init_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let f = function(dir.path(), "pkg~2fact");
        let mut a = activate();
        a.api_key = Some("uuid:secret".into());
        a.init_env.insert("SOME_VAR".into(), "".into());
        let ctx = Context::new(&a, &f, Some("https://h")).unwrap();
        let id = ActivationId::from_u128(0xab);
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        let env = ctx.env(&f, id, at);
        let want: BTreeMap<String, String> = [
            ("SOME_VAR", ""),
            ("__OW_API_HOST", "https://h"),
            ("__OW_API_KEY", "uuid:secret"),
            ("__OW_ACTION_NAME", "/guest/pkg/act"),
            ("__OW_ACTION_VERSION", "0.0.4"),
            ("__OW_ACTIVATION_ID", "000000000000000000000000000000ab"),
            ("__OW_DEADLINE", "1700000000123"),
            ("__OW_NAMESPACE", "guest"),
            ("__OW_TRANSACTION_ID", "000000000000000000000000000000ab"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(env, want);
        assert_eq!(
            (ctx.kind.as_str(), ctx.subject.as_str()),
            ("python:3", "alice")
        );
        // No key, no host: not there.
        let plain = Context::new(&activate(), &f, None).unwrap().env(&f, id, at);
        assert!(!plain.contains_key("__OW_API_KEY") && !plain.contains_key("__OW_API_HOST"));
    }

    #[test]
    fn what_clients_send_is_bounded_and_cannot_forge_the_context() {
        let dir = tempfile::tempdir().unwrap();
        let f = function(dir.path(), "act");
        let refused = |change: &dyn Fn(&mut Activate), host: Option<&str>, says: &str| {
            let mut a = activate();
            change(&mut a);
            let e = Context::new(&a, &f, host).unwrap_err();
            assert!(e.to_string().contains(says), "{e} (wanted {says:?})");
        };
        refused(
            &|a| {
                a.init_env.insert("__OW_NAMESPACE".into(), "forged".into());
            },
            None,
            "__OW_",
        );
        refused(
            &|a| {
                a.init_env.insert("a-b".into(), "x".into());
            },
            None,
            "[A-Za-z_]",
        );
        refused(
            &|a| {
                a.init_env
                    .insert("SPROUT_SOCKET".into(), "/elsewhere".into());
            },
            None,
            "reserved",
        );
        refused(
            &|a| {
                a.init_env.insert("A=B".into(), "x".into());
            },
            None,
            "'='",
        );
        refused(
            &|a| {
                a.init_env.insert(String::new(), "x".into());
            },
            None,
            "empty name",
        );
        refused(
            &|a| {
                a.init_env.insert("A".into(), "x\0y".into());
            },
            None,
            "NUL",
        );
        refused(
            &|a| {
                a.init_env.insert("N".repeat(300), "x".into());
            },
            None,
            "256 bytes",
        );
        refused(
            &|a| a.api_key = Some("k\nInjected: 1".into()),
            None,
            "api_key holds a control",
        );
        refused(
            &|a| a.transaction_id = Some("t".repeat(2000)),
            None,
            "transaction_id is 2000 bytes",
        );
        refused(&|_| {}, Some("h\u{7}"), "the API host holds a control");
        refused(
            &|a| {
                for i in 0..300 {
                    a.init_env.insert(format!("V{i}"), String::new());
                }
            },
            None,
            "300, more than 256",
        );
        refused(
            &|a| {
                for i in 0..10 {
                    a.init_env.insert(format!("V{i}"), "x".repeat(10_000));
                }
            },
            None,
            "more than 65536",
        );
        // Ten values of 1 KiB fit.
        let mut a = activate();
        for i in 0..10 {
            a.init_env.insert(format!("V{i}"), "x".repeat(1024));
        }
        assert!(Context::new(&a, &f, None).is_ok());
    }
}
