//! What an invocation hands the record store, and how it becomes a record's columns:
//! the result capped, the logs cut into timestamped lines (`TIME stdout: text`).
//!
//! The hot path (an invocation ending, possibly on the HTTP event loop) only moves
//! owned values into a [`Finished`] and copies a small result; the lines are cut,
//! stamped and formatted by the writer thread ([`format_logs`]).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipc::api::{ActivationId, ActivationLimits, ActivationStatus};

/// The largest result a record keeps, in bytes; a larger one is kept as
/// `{"truncated": true, "size": N, "head": "..."}` (its first [`RESULT_HEAD`] bytes).
pub const MAX_RESULT: usize = 64 << 10;
/// How much of a result over [`MAX_RESULT`] a record keeps, as text.
pub const RESULT_HEAD: usize = 1 << 10;
/// The most log lines a record keeps (OpenWhisk keeps lines too, capped by size).
pub const MAX_LOG_LINES: usize = 1000;
/// The most bytes of formatted log lines a record keeps.
pub const MAX_LOG_BYTES: usize = 64 << 10;

/// Milliseconds since the Unix epoch.
pub fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// An asynchronous activation accepted: its row is written pending, durably, before
/// its client hears of it.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub id: ActivationId,
    pub namespace: String,
    pub name: String,
    pub version: u64,
    /// When it was accepted (ms since the epoch).
    pub at_ms: u64,
    /// The function's limits at acceptance.
    pub limits: ActivationLimits,
    /// An OpenWhisk activation's action kind and subject.
    pub openwhisk: Option<OpenWhiskFields>,
}

/// What an OpenWhisk activation's record holds besides sprout's (what
/// `whisk_activation` needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenWhiskFields {
    pub kind: String,
    pub subject: String,
}

/// A finished activation, as the invocation hands it to the writer.
#[derive(Debug)]
pub struct Finished {
    pub id: ActivationId,
    pub namespace: String,
    pub name: String,
    pub version: u64,
    pub start_ms: u64,
    pub end_ms: u64,
    pub wait_ms: u64,
    pub init_ms: u64,
    pub start_path: Option<&'static str>,
    pub status: ActivationStatus,
    /// JSON text: the result (capped by [`cap_result`]) or `{"error": {...}}`.
    pub result: Vec<u8>,
    pub logs: TimedLogs,
    pub cause: Option<ActivationId>,
    pub called: bool,
    pub blocking: bool,
    /// The function's limits when it was activated (its memory time is billed at
    /// `limits.memory`).
    pub limits: ActivationLimits,
    /// An OpenWhisk activation's action kind and subject.
    pub openwhisk: Option<OpenWhiskFields>,
}

impl Finished {
    /// The record this becomes once written (what reading it back gives).
    pub fn to_record(&self) -> ipc::api::ActivationRecord {
        let (logs, logs_truncated) = format_logs(&self.logs, from_epoch_ms(self.end_ms));
        let result = serde_json::value::RawValue::from_string(
            String::from_utf8_lossy(&self.result).into_owned(),
        )
        .ok();
        ipc::api::ActivationRecord {
            activation_id: self.id,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            version: self.version,
            start: self.start_ms,
            end: self.end_ms,
            duration: self.end_ms.saturating_sub(self.start_ms),
            wait_time: self.wait_ms,
            init_time: self.init_ms,
            start_path: self.start_path.map(str::to_owned),
            status: self.status,
            status_code: self.status.code(),
            result,
            logs: Some(logs),
            logs_truncated,
            cause: self.cause,
            called: self.called,
            blocking: self.blocking,
            limits: self.limits,
            kind: self.openwhisk.as_ref().map(|o| o.kind.clone()),
            subject: self.openwhisk.as_ref().map(|o| o.subject.clone()),
        }
    }
}

/// What one output stream captured, with when each chunk of it was read.
#[derive(Debug, Default, Clone)]
pub struct StreamLog {
    pub text: String,
    /// For each chunk read, in order: the newlines captured up to its end, and when
    /// it was read.
    pub marks: Vec<Mark>,
}

/// A chunk read from an output pipe: `lines` newlines had been captured by its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    pub lines: usize,
    pub at: SystemTime,
}

/// An invocation's output, as captured.
#[derive(Debug, Default, Clone)]
pub struct TimedLogs {
    pub stdout: StreamLog,
    pub stderr: StreamLog,
    /// Output past the capture limit was dropped.
    pub truncated: bool,
}

impl TimedLogs {
    /// Output without read times (e.g. a failure's, kept in its error): every line is
    /// stamped `at`.
    pub fn untimed(logs: &ipc::api::Logs, at: SystemTime) -> TimedLogs {
        let stream = |text: &str| StreamLog {
            text: text.to_owned(),
            marks: vec![Mark {
                lines: usize::MAX,
                at,
            }],
        };
        TimedLogs {
            stdout: stream(&logs.stdout),
            stderr: stream(&logs.stderr),
            truncated: logs.truncated,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.stdout.text.is_empty() && self.stderr.text.is_empty()
    }
}

/// A result (JSON text) as a record keeps it: whole up to [`MAX_RESULT`], else a
/// note with its size and its head.
pub fn cap_result(json: &[u8]) -> Vec<u8> {
    if json.len() <= MAX_RESULT {
        return json.to_vec();
    }
    let head = String::from_utf8_lossy(&json[..RESULT_HEAD]);
    serde_json::to_vec(&serde_json::json!({
        "truncated": true,
        "size": json.len(),
        "head": head,
    }))
    .unwrap_or_else(|_| b"null".to_vec())
}

/// The lines of `logs`, each `TIME STREAM: text` with the time its chunk was read
/// (the chunk holding the line's end; a last line without a newline: the last
/// chunk's), stdout's and stderr's merged by time; at most [`MAX_LOG_LINES`] lines
/// and [`MAX_LOG_BYTES`] bytes. `fallback` stamps lines no mark covers. Returns the
/// lines and whether any were left out (or the capture was cut already).
pub fn format_logs(logs: &TimedLogs, fallback: SystemTime) -> (Vec<String>, bool) {
    let mut stamped: Vec<(SystemTime, u8, &str)> = Vec::new();
    for (order, stream) in [(0u8, &logs.stdout), (1u8, &logs.stderr)] {
        let text = stream.text.strip_suffix('\n').unwrap_or(&stream.text);
        if stream.text.is_empty() {
            continue;
        }
        let mut marks = stream.marks.iter().peekable();
        for (k, line) in text.split('\n').enumerate() {
            // Line k ends with newline k + 1: the first chunk that had captured it.
            while marks.peek().is_some_and(|m| m.lines < k + 1) {
                marks.next();
            }
            let at = marks
                .peek()
                .map(|m| m.at)
                .or_else(|| stream.marks.last().map(|m| m.at))
                .unwrap_or(fallback);
            stamped.push((at, order, line));
        }
    }
    // Stable: a stream's lines keep their order at equal times.
    stamped.sort_by_key(|(at, order, _)| (*at, *order));
    let mut lines = Vec::with_capacity(stamped.len().min(MAX_LOG_LINES));
    let mut bytes = 0;
    let mut cut = logs.truncated;
    for (at, order, line) in stamped {
        let stream = if order == 0 { "stdout" } else { "stderr" };
        let formatted = format!("{} {stream}: {line}", humantime::format_rfc3339_nanos(at));
        if lines.len() >= MAX_LOG_LINES || bytes + formatted.len() > MAX_LOG_BYTES {
            cut = true;
            break;
        }
        bytes += formatted.len();
        lines.push(formatted);
    }
    (lines, cut)
}

/// `since` milliseconds after the epoch as a time.
pub fn from_epoch_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}
