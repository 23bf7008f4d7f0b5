//! The native function's process as both protocols start and read it: its command
//! (a clean environment, death with the host), why it could not start, how it ended,
//! bounded line reads and the checks on what it answers.

use std::io::{self, BufRead};
use std::path::Path;
use std::process::{Child, Command, ExitStatus};

use ipc::proto::{FunctionError, LoadSpec};
use ipc::Payload;

use crate::host::backend::{function_error, Error};

/// The error kind of a native function's failures that the host reports for it (a
/// refused event, an answer that is not JSON, an executable that cannot start).
pub const KIND: &str = "NativeError";

/// The largest answer (result, error body) the host reads from an executable: larger
/// answers are refused, and the executable pays for the memory they take while read.
pub const MAX_ANSWER: usize = 16 << 20;

/// The command that starts `program` for `spec`: cwd the code directory, a clean
/// environment (`PATH`, `HOME=/tmp`, `LANG`, sprout's `SPROUT_SANDBOX` and
/// `SPROUT_FUNCTION` as a Python function has them, the function's own environment
/// (`spec.env`, its `ol.yaml`'s), then the protocol's `env`), and death with the host.
pub fn command(spec: &LoadSpec, program: &Path, env: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(&spec.code_dir)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", "/tmp")
        .env("LANG", "C.UTF-8")
        .env("SPROUT_FUNCTION", &spec.function);
    if let Some(sandbox) = std::env::var_os("SPROUT_SANDBOX") {
        cmd.env("SPROUT_SANDBOX", sandbox);
    }
    cmd.envs(&spec.env);
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    crate::sys::die_with_parent_on_exec(&mut cmd);
    cmd
}

/// Why `program` could not start, as the function's load failure.
pub fn start_failed(program: &Path, e: io::Error) -> FunctionError {
    let why = match e.kind() {
        io::ErrorKind::NotFound => "not found (or its #! interpreter is missing)".to_owned(),
        io::ErrorKind::PermissionDenied => "not executable".to_owned(),
        _ => e.to_string(),
    };
    function_error(KIND, format!("cannot start {}: {why}", program.display()))
}

/// The executable's end, as the error that ends the instance: it closed its side of
/// the protocol (`what`) because it exited, or it is killed for it. Reaps it.
pub fn ended(child: &mut Child, what: &str) -> Error {
    // A process closes its descriptors as it exits, a moment before it can be reaped.
    for _ in 0..100 {
        match child.try_wait() {
            Ok(Some(status)) => {
                let status = describe(status);
                return Error::Runtime(format!("the function's executable {what}: it {status}"));
            }
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(1)),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    Error::Runtime(format!(
        "the function's executable {what} and was killed for it"
    ))
}

pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        _ => format!("ended ({status})"),
    }
}

/// Reads one line (without its `\n`, or `\r\n`) of at most `max` bytes into `out`.
/// `Ok(true)`: a line; `Ok(false)`: end of stream before a newline. A longer line
/// is read to its end and dropped, and is `Err(TooLong)`.
pub fn read_line(r: &mut impl BufRead, out: &mut Vec<u8>, max: usize) -> Result<bool, LineError> {
    out.clear();
    let mut too_long = false;
    loop {
        let buf = match r.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(LineError::Io(e)),
        };
        if buf.is_empty() {
            return Ok(false);
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if !too_long && out.len() + chunk.len() <= max {
            out.extend_from_slice(chunk);
        } else {
            too_long = true;
            out.clear();
        }
        let used = done.unwrap_or(buf.len());
        r.consume(used);
        if done.is_some() {
            if too_long {
                return Err(LineError::TooLong);
            }
            if out.last() == Some(&b'\r') {
                out.pop();
            }
            return Ok(true);
        }
    }
}

#[derive(Debug)]
pub enum LineError {
    Io(io::Error),
    TooLong,
}

/// `bytes` as a payload to send to the agent (shared memory above the inline limit).
pub fn payload(bytes: Vec<u8>) -> Result<Payload, Error> {
    if bytes.len() <= ipc::payload::SHARED_THRESHOLD {
        return Ok(Payload::Inline(bytes));
    }
    Payload::share(&bytes).map_err(|source| Error::Sys {
        what: "share a large result",
        source,
    })
}

/// Checks that `bytes` are one JSON value; the error names what is wrong.
pub fn check_json(bytes: &[u8]) -> Result<(), String> {
    serde_json::from_slice::<&serde_json::value::RawValue>(bytes)
        .map(|_| ())
        .map_err(|e| {
            let start = String::from_utf8_lossy(&bytes[..bytes.len().min(80)]).into_owned();
            format!("{e} (it starts {start:?})")
        })
}

/// The deadline as milliseconds since the epoch, as OpenWhisk and Lambda give it.
pub fn epoch_ms(deadline: std::time::Instant) -> u128 {
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (now + left).as_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_bounded_and_the_stream_stays_in_step() {
        let mut r = io::Cursor::new(b"ok\r\nlooooong\nnext\npartial".to_vec());
        let mut out = Vec::new();
        assert!(read_line(&mut r, &mut out, 4).unwrap());
        assert_eq!(out, b"ok");
        assert!(matches!(
            read_line(&mut r, &mut out, 4),
            Err(LineError::TooLong)
        ));
        assert!(read_line(&mut r, &mut out, 4).unwrap());
        assert_eq!(out, b"next");
        assert!(!read_line(&mut r, &mut out, 4).unwrap());
    }

    #[test]
    fn answers_must_be_json() {
        assert!(check_json(b" {\"a\": 1} ").is_ok());
        assert!(check_json(b"42").is_ok());
        let e = check_json(b"hello").unwrap_err();
        assert!(e.contains("\"hello\""), "{e}");
        assert!(check_json(b"").is_err());
    }
}
