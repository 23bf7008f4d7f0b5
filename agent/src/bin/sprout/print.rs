//! Printing outcomes: a result on stdout; a failure as one line on stderr (and, when
//! it is the function's, its error JSON on stdout); captured function output on
//! stderr. The exit code comes from the error's kind, through [`agent::ErrorKind`].

use std::io::Write;
use std::process::ExitCode;

use agent::ErrorKind;
use anyhow::Context as _;
use ipc::api::{ErrorBody, ErrorDetail, Logs};

/// The exit code for an error of this kind.
pub fn exit_code(kind: ErrorKind) -> ExitCode {
    ExitCode::from(kind.exit_code())
}

/// What the function wrote to stdout and stderr, on stderr.
pub fn logs(logs: &Logs) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(logs.stdout.as_bytes());
    let _ = err.write_all(logs.stderr.as_bytes());
    if logs.truncated {
        let _ = writeln!(err, "sprout: (output truncated)");
    }
}

/// A result: the bytes as text on stdout.
pub fn result(bytes: &[u8]) -> ExitCode {
    println!("{}", String::from_utf8_lossy(bytes));
    ExitCode::SUCCESS
}

/// A failed request: the error JSON on stdout when it is the invocation's outcome
/// (the function's failure), one line on stderr; with `with_logs`, the function's
/// output first.
pub fn error(detail: &ErrorDetail, code: ExitCode, with_logs: bool) -> ExitCode {
    if with_logs {
        if let Some(l) = &detail.logs {
            logs(l);
        }
    }
    let mut shown = detail.clone();
    if !with_logs {
        shown.logs = None;
    }
    if matches!(
        detail.kind.as_str(),
        "handler_error"
            | "load_error"
            | "timeout"
            | "out_of_memory"
            | "instance_died"
            | "bad_result"
            | "call_failed"
            | "cancelled"
    ) {
        println!(
            "{}",
            serde_json::to_string(&ErrorBody { error: shown }).unwrap_or_default()
        );
    }
    eprintln!("sprout: {}", detail.message);
    code
}

/// An agent's error, as [`error`] prints it.
pub fn agent_error(e: &agent::Error, with_logs: bool) -> ExitCode {
    error(&e.detail(), exit_code(e.kind()), with_logs)
}

/// A daemon's answer: the body on success, the error otherwise.
pub fn remote(status: u16, body: &[u8], with_logs: bool) -> anyhow::Result<ExitCode> {
    if status == 200 {
        return Ok(result(body));
    }
    let err: ErrorBody = serde_json::from_slice(body).with_context(|| {
        format!(
            "daemon answered {status} with {}",
            String::from_utf8_lossy(body)
        )
    })?;
    let code = exit_code(ErrorKind::from_http_status(status));
    Ok(error(&err.error, code, with_logs))
}
