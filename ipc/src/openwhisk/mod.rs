//! OpenWhisk's JSON shapes, as sprout speaks them: its REST API's action and
//! activation bodies (`action`, `activation`) and its invoker contract's
//! `ActivationMessage` and acknowledgements (`invoker`). Field names are
//! OpenWhisk's (`../docs/api.md`, "OpenWhisk"); every difference from upstream is
//! listed there.

pub mod action;
pub mod activation;
pub mod invoker;

use serde::{Deserialize, Serialize};

/// One of OpenWhisk's `{"key": ..., "value": ...}` pairs (parameters, annotations).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct KeyValue {
    pub key: String,
    pub value: serde_json::Value,
    /// A parameter that goes to the action's environment at init (`initArgs`), not
    /// to `main`'s argument.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub init: bool,
}
