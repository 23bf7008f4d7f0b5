//! A sprout activation record in OpenWhisk's shape ([`WhiskActivation`]).

use ipc::api::{ActivationRecord, ActivationStatus};
use ipc::openwhisk::activation::{ActivationResponse, WhiskActivation};
use ipc::openwhisk::KeyValue;
use serde_json::json;

/// OpenWhisk's user-facing name of a status (`response.status`).
pub fn status_text(status: ActivationStatus) -> &'static str {
    match status {
        ActivationStatus::Success => "success",
        ActivationStatus::ApplicationError => "application error",
        ActivationStatus::ActionDeveloperError => "action developer error",
        ActivationStatus::WhiskInternalError => "whisk internal error",
    }
}

/// The semantic version OpenWhisk shows for sprout's registration version `n`.
pub fn semver(version: u64) -> String {
    format!("0.0.{version}")
}

/// `record` as OpenWhisk shows it. `kind` is the action's exec kind (`python:3`,
/// `nodejs:20`, `blackbox`), `subject` who invoked it.
pub fn whisk_activation(record: &ActivationRecord, kind: &str, subject: &str) -> WhiskActivation {
    let kv = |key: &str, value: serde_json::Value| KeyValue {
        key: key.to_owned(),
        value,
        init: false,
    };
    let mut annotations = vec![
        kv(
            "path",
            json!(format!("{}/{}", record.namespace, record.name)),
        ),
        kv("kind", json!(kind)),
        kv(
            "limits",
            json!({"timeout": record.limits.timeout, "memory": record.limits.memory,
                   "logs": 10, "concurrency": 1}),
        ),
        kv("timeout", json!(is_timeout(record))),
        kv("waitTime", json!(record.wait_time)),
    ];
    if record.init_time > 0 {
        annotations.push(kv("initTime", json!(record.init_time)));
    }
    if record.cause.is_some() {
        annotations.push(kv("causedBy", json!("sequence")));
    }
    let size = record.result.as_ref().map(|r| r.get().len() as u64);
    WhiskActivation {
        namespace: record.namespace.clone(),
        name: record.name.clone(),
        subject: subject.to_owned(),
        activation_id: record.activation_id,
        cause: record.cause,
        start: record.start,
        end: record.end,
        duration: record.duration,
        response: ActivationResponse {
            status: status_text(record.status).to_owned(),
            status_code: record.status.code(),
            success: record.status == ActivationStatus::Success,
            result: record.result.clone(),
            size,
        },
        logs: record.logs.clone().unwrap_or_default(),
        version: semver(record.version),
        publish: false,
        annotations,
    }
}

/// Whether the record is of an activation that ran out of time (OpenWhisk's
/// `timeout` annotation): a developer error whose duration reached the limit.
fn is_timeout(record: &ActivationRecord) -> bool {
    record.status == ActivationStatus::ActionDeveloperError
        && record.limits.timeout > 0
        && record.duration >= record.limits.timeout
}
