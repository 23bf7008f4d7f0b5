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

/// `record` as OpenWhisk shows it. `kind` is the action's exec kind (`python:3`,
/// `nodejs:20`, `blackbox`), `subject` who invoked it.
pub fn whisk_activation(record: &ActivationRecord, kind: &str, subject: &str) -> WhiskActivation {
    let kv = |key: &str, value: serde_json::Value| KeyValue {
        key: key.to_owned(),
        value,
        init: false,
    };
    // OpenWhisk's name (`pkg/act`): the path holds it whole, `name` its action.
    let full = crate::names::to_openwhisk(&record.name);
    let action = full.rsplit_once('/').map_or(full.as_str(), |(_, a)| a);
    let mut annotations = vec![
        kv("path", json!(format!("{}/{}", record.namespace, full))),
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
        name: action.to_owned(),
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
        version: super::semver(record.version),
        publish: false,
        annotations,
    }
}

/// Whether the record is of an activation that ran out of time (OpenWhisk's
/// `timeout` annotation): a developer error whose duration reached the limit.
fn is_timeout(record: &ActivationRecord) -> bool {
    let said_so = record.result.as_ref().is_some_and(|r| {
        r.get()
            .starts_with("{\"error\":\"The action exceeded its time limits of ")
    });
    record.status == ActivationStatus::ActionDeveloperError
        && (said_so || (record.limits.timeout > 0 && record.duration >= record.limits.timeout))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc::api::{ActivationId, ActivationLimits};
    use serde_json::value::RawValue;

    fn record(name: &str, status: ActivationStatus, result: &str) -> ActivationRecord {
        ActivationRecord {
            activation_id: ActivationId::from_u128(7),
            namespace: "ns".into(),
            name: name.into(),
            version: 2,
            start: 1000,
            end: 1010,
            duration: 10,
            wait_time: 3,
            init_time: 0,
            start_path: Some("warm".into()),
            status,
            status_code: status.code(),
            result: Some(RawValue::from_string(result.into()).unwrap()),
            logs: Some(vec!["t stdout: hi".into()]),
            logs_truncated: false,
            cause: None,
            called: false,
            blocking: true,
            limits: ActivationLimits {
                memory: 256,
                timeout: 60_000,
            },
            kind: Some("python:3".into()),
            subject: Some("alice".into()),
        }
    }

    #[test]
    fn a_packaged_actions_record_shows_its_openwhisk_name_and_path() {
        let r = record("pkg~2fact~40v1", ActivationStatus::Success, "{}");
        let w = whisk_activation(&r, "python:3", "alice");
        assert_eq!((w.name.as_str(), w.version.as_str()), ("act@v1", "0.0.2"));
        let path = w.annotations.iter().find(|a| a.key == "path").unwrap();
        assert_eq!(path.value, json!("ns/pkg/act@v1"));
        assert!(w.annotations.iter().all(|a| a.key != "initTime"));
    }

    #[test]
    fn the_timeout_annotation_follows_the_time_limits_text() {
        let text = r#"{"error":"The action exceeded its time limits of 60000 milliseconds."}"#;
        let timed = whisk_activation(
            &record("f", ActivationStatus::ActionDeveloperError, text),
            "python:3",
            "s",
        );
        let other = whisk_activation(
            &record("f", ActivationStatus::ApplicationError, r#"{"error":"no"}"#),
            "python:3",
            "s",
        );
        let timeout = |w: &WhiskActivation| {
            w.annotations
                .iter()
                .find(|a| a.key == "timeout")
                .unwrap()
                .value
                .clone()
        };
        assert_eq!(timeout(&timed), json!(true));
        assert_eq!(timeout(&other), json!(false));
        assert_eq!(timed.response.status, "action developer error");
        assert_eq!(timed.response.status_code, 2);
    }
}
