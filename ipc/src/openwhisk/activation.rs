//! An activation as OpenWhisk shows it (`WhiskActivation`): its REST API's
//! `GET .../activations/{id}` and a blocking invoke's answer, and the `response` of
//! an invoker's acknowledgement.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::KeyValue;
use crate::api::ActivationId;

/// OpenWhisk's activation record, user-facing shape (`response.status` and
/// `response.success` beside `statusCode`; a controller reading it as an
/// acknowledgement ignores the two).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct WhiskActivation {
    /// The namespace it ran in.
    pub namespace: String,
    /// The action's name (without its package).
    pub name: String,
    /// Who invoked it (the key's namespace, or the controller's `user.subject`).
    pub subject: String,
    #[serde(rename = "activationId")]
    pub activation_id: ActivationId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<ActivationId>,
    /// Epoch milliseconds.
    pub start: u64,
    pub end: u64,
    /// Milliseconds.
    pub duration: u64,
    pub response: ActivationResponse,
    /// `TIME stream: text` lines.
    pub logs: Vec<String>,
    /// Semantic version: `0.0.N` for sprout's registration version N.
    pub version: String,
    pub publish: bool,
    /// `path`, `kind`, `limits`, `timeout`, `waitTime`, `initTime` (cold only),
    /// `causedBy` (when `cause` is set).
    pub annotations: Vec<KeyValue>,
}

/// `response` of a [`WhiskActivation`].
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ActivationResponse {
    /// `success`, `application error`, `action developer error`, `whisk internal error`.
    pub status: String,
    #[serde(rename = "statusCode")]
    pub status_code: u8,
    pub success: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}
