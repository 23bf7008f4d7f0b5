//! OpenWhisk's result rules: how an activation's outcome reads as OpenWhisk's status
//! and result (`compat.md` A.2/A.3), with its runtime's texts. Only OpenWhisk
//! activations are read this way; sprout's own invocations keep sprout's.
//!
//! A result that is a JSON object or array is a success, unless the object has an
//! `error` key (an application error whose result is the whole object); anything
//! else is a developer error. Failures read as OpenWhisk's invoker and runtimes
//! word them (`{"error": "<text>"}`).

use std::borrow::Cow;
use std::collections::BTreeMap;

use ipc::api::ActivationStatus;
use ipc::proto::{FunctionError, Runtime};

use crate::error::Error;

/// OpenWhisk's texts.
pub const NOT_A_DICTIONARY_OR_ARRAY: &str = "The action did not return a dictionary or array.";
pub const NOT_A_DICTIONARY: &str = "The action did not return a dictionary.";
pub const EXHAUSTED_MEMORY: &str = "The action exhausted its memory and was aborted.";
pub const EXITED: &str = "The action did not produce a valid response and exited unexpectedly.";
pub const NOT_JSON: &str = "The action did not produce a valid JSON or JSON Array response.";
pub const NO_BINARY: &str =
    "The action failed to generate or locate a binary. See logs for details.";
pub const CANNOT_START: &str = "Cannot start action. Check logs for details.";

/// "The action exceeded its time limits of N milliseconds."
pub fn time_limits(timeout_ms: u64) -> String {
    format!("The action exceeded its time limits of {timeout_ms} milliseconds.")
}

/// An activation's outcome as OpenWhisk reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub status: ActivationStatus,
    /// JSON text.
    pub result: Vec<u8>,
    /// What OpenWhisk's runtime would have written to stderr (a failed init's
    /// detail), for the record's logs.
    pub stderr: Option<String>,
}

/// `{"error": text}`.
fn error_json(text: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "error": text })).expect("JSON")
}

fn developer(text: &str) -> Verdict {
    Verdict {
        status: ActivationStatus::ActionDeveloperError,
        result: error_json(text),
        stderr: None,
    }
}

/// The text for a result that is not a dictionary, in `runtime`'s words.
fn not_a_dictionary(runtime: Runtime) -> &'static str {
    match runtime {
        Runtime::Nodejs => NOT_A_DICTIONARY,
        Runtime::Python | Runtime::Native => NOT_A_DICTIONARY_OR_ARRAY,
    }
}

/// The largest result an OpenWhisk activation may return (OpenWhisk's default
/// `whisk.activation.payload.max`, 1 MiB): a larger one is a developer error. Its
/// record keeps it whole.
pub const MAX_RESULT: usize = 1 << 20;

/// What an activation of `runtime` returned: JSON text (checked), or bytes (`raw`).
pub fn of_success(runtime: Runtime, payload: &[u8], raw: bool) -> Verdict {
    if raw {
        return developer(not_a_dictionary(runtime));
    }
    if payload.len() > MAX_RESULT {
        return developer(&format!(
            "The action produced a response that exceeded the allowed length: {} > {MAX_RESULT} bytes.",
            payload.len()
        ));
    }
    of_result(runtime, payload)
}

/// A result (JSON text, checked) returned by an activation of `runtime`.
pub fn of_result(runtime: Runtime, json: &[u8]) -> Verdict {
    let first = json.iter().find(|b| !b.is_ascii_whitespace());
    match first {
        Some(b'[') => Verdict {
            status: ActivationStatus::Success,
            result: json.to_vec(),
            stderr: None,
        },
        Some(b'{') => {
            let has_error =
                serde_json::from_slice::<BTreeMap<Cow<'_, str>, serde::de::IgnoredAny>>(json)
                    .is_ok_and(|top| top.contains_key("error"));
            Verdict {
                status: if has_error {
                    ActivationStatus::ApplicationError
                } else {
                    ActivationStatus::Success
                },
                result: json.to_vec(),
                stderr: None,
            }
        }
        _ => developer(not_a_dictionary(runtime)),
    }
}

/// `error` as a line of stderr: `Type: message` and its traceback.
fn described(error: &FunctionError) -> String {
    match error.traceback.is_empty() {
        true => format!("{}: {}", error.kind, error.message),
        false => format!(
            "{}\n{}: {}",
            error.traceback.trim_end(),
            error.kind,
            error.message
        ),
    }
}

/// A failed activation of `runtime`.
pub fn of_error(runtime: Runtime, e: &Error) -> Verdict {
    match e {
        Error::Handler { error, .. } => match runtime {
            // OpenWhisk's Python runtime answers an exception `{"error": str(ex)}`; a
            // `sys.exit` ends its process.
            Runtime::Python if error.kind == "SystemExit" => developer(EXITED),
            Runtime::Python => Verdict {
                status: ActivationStatus::ApplicationError,
                result: error_json(&error.message),
                stderr: None,
            },
            // Node.js: a synchronous throw (a rejection is a result, made by the
            // runtime).
            Runtime::Nodejs => developer(&format!(
                "An error has occurred: {}: {}",
                error.kind, error.message
            )),
            Runtime::Native => developer(&error.message),
        },
        Error::LoadFailed { error, .. } => {
            let mut verdict = match runtime {
                Runtime::Nodejs => developer(&format!(
                    "Initialization has failed due to: {}",
                    described(error)
                )),
                Runtime::Python if error.kind == "SyntaxError" => developer(NO_BINARY),
                Runtime::Python | Runtime::Native => developer(CANNOT_START),
            };
            verdict.stderr = Some(described(error));
            verdict
        }
        Error::Timeout { timeout_ms, .. } => developer(&time_limits(*timeout_ms)),
        Error::OutOfMemory { .. } => developer(EXHAUSTED_MEMORY),
        Error::InstanceDied { .. } => developer(EXITED),
        Error::BadResult { .. } => developer(NOT_JSON),
        Error::BytesResult { .. } => developer(not_a_dictionary(runtime)),
        Error::ResultTooLarge { len, max, .. } => developer(&format!(
            "The action produced a response that exceeded the allowed length: {len} > {max} bytes."
        )),
        other => Verdict {
            status: other.activation_status(),
            result: error_json(&ipc::chain(other)),
            stderr: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc::api::{ActivationStatus as S, Logs};

    fn text(v: &Verdict) -> String {
        String::from_utf8(v.result.clone()).unwrap()
    }

    fn raised(kind: &str, message: &str) -> Error {
        Error::Handler {
            function: "f".into(),
            error: FunctionError {
                kind: kind.into(),
                message: message.into(),
                traceback: "Traceback (most recent call last):\n  File \"f.py\"".into(),
            },
            logs: Logs::default(),
        }
    }

    #[test]
    fn objects_and_arrays_succeed_an_error_key_is_an_application_error() {
        for (json, status) in [
            (&b"{\"a\":1}"[..], S::Success),
            (b" [1,2]", S::Success),
            (b"[]", S::Success),
            (b"{}", S::Success),
            (b"{\"error\":\"no\"}", S::ApplicationError),
            (b"{\"a\":{\"error\":1}}", S::Success),
            // An escaped key is still `error`.
            (b"{\"\\u0065rror\":{}}", S::ApplicationError),
        ] {
            let v = of_result(Runtime::Python, json);
            assert_eq!(v.status, status, "{}", String::from_utf8_lossy(json));
            assert_eq!(v.result, json, "the whole object is the result");
        }
    }

    #[test]
    fn a_result_over_a_mebibyte_or_of_bytes_is_a_developer_error() {
        let big = format!("{{\"a\":\"{}\"}}", "x".repeat(MAX_RESULT));
        let v = of_success(Runtime::Python, big.as_bytes(), false);
        assert_eq!(v.status, S::ActionDeveloperError);
        assert!(
            text(&v).contains("exceeded the allowed length"),
            "{}",
            text(&v)
        );
        let fits = format!("{{\"arg\":\"{}\"}}", "a".repeat(1048561));
        assert_eq!(
            of_success(Runtime::Python, fits.as_bytes(), false).status,
            S::Success
        );
        let bytes = of_success(Runtime::Nodejs, b"{}", true);
        assert_eq!(
            text(&bytes),
            r#"{"error":"The action did not return a dictionary."}"#
        );
    }

    #[test]
    fn anything_else_is_a_developer_error_in_the_runtimes_words() {
        for json in [&b"1"[..], b"\"s\"", b"null", b"true"] {
            let py = of_result(Runtime::Python, json);
            assert_eq!(py.status, S::ActionDeveloperError);
            assert_eq!(
                text(&py),
                r#"{"error":"The action did not return a dictionary or array."}"#
            );
            let node = of_result(Runtime::Nodejs, json);
            assert_eq!(
                text(&node),
                r#"{"error":"The action did not return a dictionary."}"#
            );
            assert_eq!(
                of_result(Runtime::Native, json).result,
                py.result,
                "native answers as the Go proxy"
            );
        }
    }

    #[test]
    fn exceptions_throws_and_exits_read_as_openwhisk_says() {
        let py = of_error(
            Runtime::Python,
            &raised("ZeroDivisionError", "division by zero"),
        );
        assert_eq!(
            (py.status, text(&py)),
            (
                S::ApplicationError,
                r#"{"error":"division by zero"}"#.into()
            )
        );
        let exit = of_error(Runtime::Python, &raised("SystemExit", "1"));
        assert_eq!(exit.status, S::ActionDeveloperError);
        assert!(text(&exit).contains("exited unexpectedly"));
        let node = of_error(Runtime::Nodejs, &raised("Error", "app error"));
        assert_eq!(
            (node.status, text(&node)),
            (
                S::ActionDeveloperError,
                r#"{"error":"An error has occurred: Error: app error"}"#.into()
            )
        );
    }

    #[test]
    fn limits_and_crashes_have_openwhisks_texts() {
        let logs = Logs::default();
        let cases = [
            (
                Error::Timeout {
                    function: "f".into(),
                    timeout_ms: 1500,
                    logs: logs.clone(),
                },
                "The action exceeded its time limits of 1500 milliseconds.",
            ),
            (
                Error::OutOfMemory {
                    function: "f".into(),
                    limit_mb: 128,
                    logs: logs.clone(),
                },
                EXHAUSTED_MEMORY,
            ),
            (
                Error::InstanceDied {
                    function: "f".into(),
                    sandbox: "s".into(),
                    pid: 1,
                    logs,
                },
                EXITED,
            ),
        ];
        for (e, want) in cases {
            for runtime in Runtime::ALL {
                let v = of_error(runtime, &e);
                assert_eq!(v.status, S::ActionDeveloperError);
                assert_eq!(text(&v), serde_json::json!({ "error": want }).to_string());
            }
        }
    }

    #[test]
    fn a_failed_load_reads_as_a_failed_init_with_the_detail_in_the_logs() {
        let e = |kind: &str| Error::LoadFailed {
            function: "f".into(),
            handler: "main".into(),
            error: FunctionError {
                kind: kind.into(),
                message: "No module named 'iamnotsupported'".into(),
                traceback: String::new(),
            },
        };
        let py = of_error(Runtime::Python, &e("ModuleNotFoundError"));
        assert_eq!(py.status, S::ActionDeveloperError);
        assert_eq!(
            text(&py),
            serde_json::json!({ "error": CANNOT_START }).to_string()
        );
        assert_eq!(
            py.stderr.as_deref(),
            Some("ModuleNotFoundError: No module named 'iamnotsupported'")
        );
        let syntax = of_error(Runtime::Python, &e("SyntaxError"));
        assert_eq!(
            text(&syntax),
            serde_json::json!({ "error": NO_BINARY }).to_string()
        );
        let node = of_error(Runtime::Nodejs, &e("Error"));
        assert!(text(&node).starts_with("{\"error\":\"Initialization has failed due to: Error: "));
    }

    #[test]
    fn sprouts_own_refusals_keep_their_status() {
        let v = of_error(Runtime::Python, &Error::ShuttingDown);
        assert_eq!(v.status, S::WhiskInternalError);
        assert!(text(&v).starts_with("{\"error\":"));
    }
}
