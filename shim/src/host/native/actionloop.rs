//! OpenWhisk's actionloop protocol, for an executable that is not `bootstrap`.
//!
//! Per invocation the host writes one line on the executable's stdin,
//! `{"value": EVENT, "activation_id": "<32 hex>", "deadline": "<epoch ms>",
//! "action_name": "/<namespace>/<function>", "namespace": ..., "action_version": ...}`,
//! and reads one JSON line from the executable's descriptor 3: the result. The
//! event's own newlines can only be JSON whitespace and become spaces. The environment
//! carries `__OW_ACTION_NAME`, `__OW_NAMESPACE` and `__OW_ACTION_VERSION` (what
//! OpenWhisk's proxy would pass that still means something here; there is no
//! OpenWhisk API host or key). An OpenWhisk activation (its invoke carries an
//! `env`) gets OpenWhisk's own fields instead: every `__OW_*` variable as a
//! lower-case key without the prefix (`api_key`, `activation_id`, `deadline`, ...).
//! `__OW_WAIT_FOR_ACK` is not set: an executable that
//! exits or prints garbage before its first invocation is seen at that invocation
//! (one that cannot start at all fails the load).
//!
//! Answers are taken in step: before writing each event the host drops what the
//! executable wrote on descriptor 3 since its last answer (extra lines, anything
//! written before the first invocation) and says in the instance's stderr, its logs,
//! how many bytes it dropped. (Bytes written after the next event goes out cannot be
//! told from its answer.)
//!
//! A hop costs a zero-timeout `poll` of descriptor 3, one `write` of the line (built
//! in a buffer kept between invocations: one copy of the event) and the `read`s of the
//! answer (one for a line that fits the 64 KiB buffer).

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Child, ChildStdin, Stdio};

use ipc::proto::{FunctionError, LoadSpec};

use super::process::{
    check_json, command, ended, epoch_ms, payload, read_line, start_failed, LineError, KIND,
    MAX_ANSWER,
};
use crate::host::backend::{function_error, Error, Invocation, Outcome};

pub struct Actionloop {
    child: Child,
    stdin: ChildStdin,
    answers: BufReader<File>,
    /// `,"action_name":…,"namespace":…,"action_version":…}` + `\n`: the same for
    /// every line.
    suffix: Vec<u8>,
    /// The line being written, kept to save an allocation per invocation.
    line: Vec<u8>,
}

impl Actionloop {
    /// Starts `program` with its stdin a pipe from the host and its descriptor 3 a
    /// pipe to the host.
    pub fn start(spec: &LoadSpec, program: &Path) -> Result<Actionloop, FunctionError> {
        let about = &spec.about;
        let action_name = format!("/{}/{}", about.namespace, spec.function);
        let version = about.version.to_string();
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| function_error(KIND, format!("pipe for the answers: {e}")))?;
        let mut cmd = command(
            spec,
            program,
            &[
                ("__OW_ACTION_NAME", action_name.clone()),
                ("__OW_NAMESPACE", about.namespace.clone()),
                ("__OW_ACTION_VERSION", version.clone()),
            ],
        );
        cmd.stdin(Stdio::piped());
        crate::sys::with_fds_and_clean_mask(&mut cmd, &[write.as_fd()]);
        let mut child = cmd.spawn().map_err(|e| start_failed(program, e))?;
        drop(write); // the executable holds the only write end: its exit is EOF here
        let stdin = child.stdin.take().expect("stdin is piped");
        let mut suffix = Vec::new();
        let json = |s: &str| serde_json::to_string(s).expect("a string serializes");
        writeln!(
            suffix,
            ",\"action_name\":{},\"namespace\":{},\"action_version\":{}}}",
            json(&action_name),
            json(&about.namespace),
            json(&version)
        )
        .expect("writing to a vector");
        Ok(Actionloop {
            child,
            stdin,
            answers: BufReader::with_capacity(64 << 10, File::from(read)),
            suffix,
            line: Vec::new(),
        })
    }

    pub fn invoke(&mut self, invocation: Invocation) -> Result<Outcome, Error> {
        if invocation.raw {
            return Ok(refused(
                "a native function takes JSON events; its caller sent raw bytes",
            ));
        }
        // Events from calling functions reach the host unchecked: one that is not a
        // single JSON value would break the line, or add fields of its own to it.
        if !invocation.event.is_empty() {
            if let Err(why) = check_json(&invocation.event) {
                return Ok(refused(&format!("the event is not JSON: {why}")));
            }
        }
        let line = &mut self.line;
        line.clear();
        line.extend_from_slice(b"{\"value\":");
        let event: &[u8] = &invocation.event;
        if event.is_empty() {
            line.extend_from_slice(b"{}");
        } else {
            line.extend(event.iter().map(|&b| match b {
                b'\n' | b'\r' => b' ',
                b => b,
            }));
        }
        match &invocation.env {
            None => {
                write!(
                    line,
                    ",\"activation_id\":\"{:032x}\",\"deadline\":\"{}\"",
                    invocation.id, // as `Invocation::activation_id`, without a string of its own
                    epoch_ms(invocation.deadline)
                )
                .expect("writing to a vector");
                line.extend_from_slice(&self.suffix);
            }
            Some(env) => openwhisk_fields(line, env),
        }
        let dropped = drop_stray(&mut self.answers);
        if dropped > 0 {
            let _ = writeln!(
                std::io::stderr(),
                "sprout-shim host: dropped {dropped} bytes the executable wrote on descriptor 3 \
                 outside an answer"
            );
        }
        if self.stdin.write_all(line).is_err() {
            return Err(ended(&mut self.child, "closed its stdin"));
        }
        // The buffer grows to the largest event seen; do not keep a huge one.
        if line.capacity() > 1 << 20 {
            *line = Vec::new();
        }
        let mut answer = Vec::new();
        match read_line(&mut self.answers, &mut answer, MAX_ANSWER) {
            Ok(true) => {}
            Ok(false) => return Err(ended(&mut self.child, "closed descriptor 3")),
            Err(LineError::TooLong) => {
                return Ok(refused(&format!(
                    "the executable's answer is longer than {} MiB",
                    MAX_ANSWER >> 20
                )))
            }
            Err(LineError::Io(e)) => {
                return Err(Error::Runtime(format!(
                    "reading the executable's answer: {e}"
                )))
            }
        }
        if let Err(e) = check_json(&answer) {
            return Ok(refused(&format!(
                "the executable's answer on descriptor 3 is not JSON: {e}"
            )));
        }
        Ok(Outcome::Returned {
            result: payload(answer)?,
            raw: false,
        })
    }
}

/// Drops what is buffered from descriptor 3 and what is readable on it now (up to
/// [`MAX_ANSWER`] bytes: an executable that writes on without pause is read as
/// answering garbage); returns how many bytes.
fn drop_stray(answers: &mut BufReader<File>) -> usize {
    let mut dropped = 0;
    loop {
        let buffered = answers.buffer().len();
        answers.consume(buffered);
        dropped += buffered;
        if dropped >= MAX_ANSWER || !crate::sys::readable_now(answers.get_ref().as_fd()) {
            return dropped;
        }
        // Readable: this read does not wait. At the end (0 bytes) or on an error the
        // invocation's own read finds it again.
        match answers.fill_buf() {
            Ok([]) | Err(_) => return dropped,
            Ok(_) => {}
        }
    }
}

/// An OpenWhisk activation's context as OpenWhisk's `/run` body carries it: each
/// `__OW_NAME` variable a top-level key `name`, lower-case, a string (its init
/// parameters, which OpenWhisk's proxy exports when it starts the executable, have
/// no place on the line: an executable started once for its sandbox cannot take
/// them per activation). Ends the line.
fn openwhisk_fields(line: &mut Vec<u8>, env: &std::collections::BTreeMap<String, String>) {
    for (name, value) in env {
        let Some(key) = name.strip_prefix("__OW_") else {
            continue;
        };
        let key = key.to_ascii_lowercase();
        if key == "value" {
            continue;
        }
        line.push(b',');
        serde_json::to_writer(&mut *line, &key).expect("writing to a vector");
        line.push(b':');
        serde_json::to_writer(&mut *line, value).expect("writing to a vector");
    }
    line.extend_from_slice(b"}\n");
}

fn refused(message: &str) -> Outcome {
    Outcome::Raised(function_error(KIND, message))
}
