//! OpenWhisk's action semantics in the core, for activations that arrive through
//! OpenWhisk's REST API (`/api/v1`) or as an invoker's `ActivationMessage`
//! (`POST /invoke`); sprout's own API keeps its own. The HTTP shapes are
//! `ipc::openwhisk`'s; this module knows no transport.

use std::collections::BTreeMap;

use ipc::api::ActivationId;

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

pub mod activation;
pub mod invoker;
pub mod whisks;
