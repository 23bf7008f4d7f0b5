//! OpenWhisk's action semantics in the core, for activations that arrive through
//! OpenWhisk's REST API (`/api/v1`) or as an invoker's `ActivationMessage`
//! (`POST /invoke`); sprout's own API keeps its own. The HTTP shapes are
//! `ipc::openwhisk`'s; this module knows no transport.
//!
//! An [`Activate`] is checked ([`event_of`], `context::Context::new`) and becomes a
//! `context::Context` that rides with the invocation through the invoker (and the
//! asynchronous runner): it makes the activation's environment (the `__OW_*`
//! variables and its init parameters, `Context::env`) when the instance is about
//! to run it, and [`result`] turns its outcome into OpenWhisk's status and result,
//! which its record keeps.

use std::collections::BTreeMap;

use ipc::api::ActivationId;
use ipc::proto::Runtime;

/// One OpenWhisk activation of a registered function ([`crate::Request::Activate`]).
///
/// Answered with [`crate::Response::Activated`] (the whole activation) when
/// blocking, else [`crate::Response::Accepted`] once its acceptance is durable.
#[derive(Debug, Clone)]
pub struct Activate {
    /// sprout's namespace and name of the action (after the name rule).
    pub namespace: String,
    pub name: String,
    /// The invocation's parameters: a JSON object (the action's defaults are merged
    /// under it) or an array (passed through unchanged).
    pub params: serde_json::Value,
    /// Exported to the action's process for this activation (`initArgs`' values, as
    /// strings), beside the `__OW_*` context.
    pub init_env: BTreeMap<String, String>,
    /// The caller's id for it (a controller's `activationId`), else one is made.
    pub activation_id: Option<ActivationId>,
    /// `__OW_TRANSACTION_ID`; default: the activation id.
    pub transaction_id: Option<String>,
    /// `__OW_API_KEY`: the caller's key (`uuid:secret`), when the action may have it.
    pub api_key: Option<String>,
    /// Who invoked it (the record's `subject`).
    pub subject: String,
    /// The activation of a sequence that caused it (`causedBy`).
    pub cause: Option<ActivationId>,
    pub blocking: bool,
    /// A blocking activation still running after this long is answered
    /// [`crate::Response::Accepted`] and finishes in the background (OpenWhisk's
    /// 60 s rule); `None`: wait for it.
    pub wait_at_most: Option<std::time::Duration>,
}

pub mod action;
pub mod activation;
pub mod context;
pub mod error;
pub mod result;

pub use error::Error;

/// Init parameters one activation may export, at most.
pub const MAX_INIT_PARAMS: usize = 256;
/// The longest name of an init parameter, in bytes.
pub const MAX_ENV_NAME: usize = 256;
/// The longest `api_key`, `transaction_id`, `subject` or `--api-host`, in bytes.
pub const MAX_FIELD: usize = 1024;

/// The event an activation's instance gets: `params` as JSON text, if it is an
/// object or an array (OpenWhisk passes an array through unchanged).
pub fn event_of(params: &serde_json::Value) -> Result<Vec<u8>, Error> {
    use serde_json::Value;
    let found = match params {
        Value::Object(_) | Value::Array(_) => {
            return Ok(serde_json::to_vec(params).expect("a JSON value serializes"))
        }
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
    };
    Err(Error::Params { found })
}

/// The exec kind OpenWhisk shows for a function of `runtime`.
pub fn kind_of(runtime: Runtime) -> &'static str {
    match runtime {
        Runtime::Python => "python:3",
        Runtime::Nodejs => "nodejs:20",
        Runtime::Native => "blackbox",
    }
}
pub mod invoker;
pub mod whisks;

/// The semantic version OpenWhisk shows for sprout's registration version `n`.
pub fn semver(version: u64) -> String {
    format!("0.0.{version}")
}
