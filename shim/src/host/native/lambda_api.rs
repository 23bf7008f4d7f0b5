//! AWS Lambda's runtime API, for an executable named `bootstrap`.
//!
//! The host listens on `127.0.0.1:<port>` in the sandbox's own network namespace
//! (`AWS_LAMBDA_RUNTIME_API`) and serves, with HTTP/1.1 keep-alive and one thread per
//! connection (at most [`MAX_CONNECTIONS`]):
//! - `GET /2018-06-01/runtime/invocation/next`: a long poll answered with the next
//!   event and `Lambda-Runtime-Aws-Request-Id` (the activation id, 32 hex digits),
//!   `Lambda-Runtime-Deadline-Ms`, `Lambda-Runtime-Invoked-Function-Arn`
//!   (`arn:aws:lambda:sprout:<namespace>:function:<function>`), `Lambda-Runtime-Trace-Id`;
//! - `POST /2018-06-01/runtime/invocation/<id>/response`: the result (JSON);
//! - `POST /2018-06-01/runtime/invocation/<id>/error`: the function's error, from the
//!   body's `errorType`, `errorMessage` and `stackTrace`;
//! - `POST /2018-06-01/runtime/init/error`: the load failed.
//!
//! The load is done when the bootstrap first asks for `next`, and fails when it posts
//! an init error or exits first. A request id that is not the invocation in flight is
//! answered 400 (`InvalidRequestID`), an unknown path 404, a head over
//! [`MAX_HEAD`] 431, a body over [`MAX_ANSWER`] 413, a body without a length 411.
//!
//! A long poll whose client went away is not handed an event: before taking one, the
//! parked `next` checks its peer is still there, and an event whose write fails is put
//! back for the next `next`. A connection over [`MAX_CONNECTIONS`] first makes the
//! parked polls check their peers (those whose clients left give their slots back);
//! if none does within [`SWEEP_WAIT`], it is answered 503 (`TooManyConnections`) and
//! closed.
//!
//! A hop costs the condition-variable hand-offs between the host's thread and the
//! connection's (two wake-ups), a nonblocking peek at the client, the event's
//! `write` (one copy into the head's buffer up to 64 KiB) and the result's `read`s
//! into one buffer.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use ipc::proto::{FunctionError, LoadSpec};
use ipc::Payload;

use super::process::{check_json, command, describe, epoch_ms, payload, start_failed};
use super::process::{KIND, MAX_ANSWER};
use crate::host::backend::{function_error, Error, Invocation, Outcome};

/// Connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 8;
/// How long a connection over the limit waits for a parked poll whose client left to
/// give its slot back.
pub const SWEEP_WAIT: std::time::Duration = std::time::Duration::from_millis(50);
/// The largest request head (request line and headers).
pub const MAX_HEAD: usize = 16 << 10;
const PREFIX: &str = "/2018-06-01/runtime/";

pub struct LambdaApi {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    arn: String,
}

#[derive(Default)]
struct State {
    /// The bootstrap asked for its first invocation: the load is done.
    asked: bool,
    init_error: Option<FunctionError>,
    /// How the bootstrap ended, once it has.
    exited: Option<String>,
    /// The invocation waiting for a `next` to take it.
    pending: Option<Event>,
    /// The request id handed out and not answered yet.
    current: Option<String>,
    outcome: Option<Outcome>,
    connections: usize,
    /// Bumped to make every parked `next` check that its client is still there.
    sweep: u64,
}

struct Event {
    id: String,
    deadline_ms: u128,
    body: Payload,
}

impl LambdaApi {
    /// Listens, starts the bootstrap, and waits for it to ask for an invocation.
    pub fn start(spec: &LoadSpec, program: &Path) -> Result<LambdaApi, FunctionError> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| {
            function_error(
                KIND,
                format!("cannot serve the Lambda runtime API on 127.0.0.1 in the sandbox: {e}"),
            )
        })?;
        let port = listener
            .local_addr()
            .map_err(|e| function_error(KIND, format!("the runtime API's port: {e}")))?
            .port();
        let about = &spec.about;
        let namespace = if about.namespace.is_empty() {
            "_"
        } else {
            &about.namespace
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            arn: format!(
                "arn:aws:lambda:sprout:{namespace}:function:{}",
                spec.function
            ),
        });
        let mut cmd = command(
            spec,
            program,
            &[
                ("AWS_LAMBDA_RUNTIME_API", format!("127.0.0.1:{port}")),
                ("_HANDLER", spec.handler.to_string()),
                ("LAMBDA_TASK_ROOT", spec.code_dir.clone()),
                ("AWS_LAMBDA_FUNCTION_NAME", spec.function.clone()),
                ("AWS_LAMBDA_FUNCTION_VERSION", about.version.to_string()),
                (
                    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
                    about.memory_mb.to_string(),
                ),
            ],
        );
        cmd.stdin(std::process::Stdio::null());
        let mut child = cmd.spawn().map_err(|e| start_failed(program, e))?;
        let spawned = |e: io::Error| function_error(KIND, format!("a thread of the host: {e}"));
        let waiter = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("bootstrap-wait".into())
            .stack_size(64 << 10)
            .spawn(move || {
                let how = match child.wait() {
                    Ok(status) => describe(status),
                    Err(e) => format!("cannot be waited for: {e}"),
                };
                waiter.lock().exited = Some(how);
                waiter.changed.notify_all();
            })
            .map_err(spawned)?;
        let acceptor = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("runtime-api".into())
            .stack_size(64 << 10)
            .spawn(move || accept(listener, acceptor))
            .map_err(spawned)?;

        let mut state = shared.lock();
        loop {
            if let Some(error) = state.init_error.take() {
                return Err(error);
            }
            if state.asked {
                break;
            }
            if let Some(how) = &state.exited {
                return Err(function_error(
                    KIND,
                    format!("the bootstrap {how} before asking for an invocation"),
                ));
            }
            state = shared.wait(state);
        }
        drop(state);
        Ok(LambdaApi { shared })
    }

    pub fn invoke(&mut self, invocation: Invocation) -> Result<Outcome, Error> {
        if invocation.raw {
            return Ok(Outcome::Raised(function_error(
                KIND,
                "a native function takes JSON events; its caller sent raw bytes",
            )));
        }
        let shared = &self.shared;
        let mut state = shared.lock();
        state.outcome = None;
        state.pending = Some(Event {
            id: invocation.activation_id(),
            deadline_ms: epoch_ms(invocation.deadline),
            body: invocation.event,
        });
        shared.changed.notify_all();
        loop {
            if let Some(outcome) = state.outcome.take() {
                return Ok(outcome);
            }
            if let Some(how) = &state.exited {
                return Err(Error::Runtime(format!("the function's bootstrap {how}")));
            }
            state = shared.wait(state);
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed
            .wait(guard)
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Puts back an event whose write to its `next`'s client failed, for the next one.
    fn put_back(&self, event: Event) {
        let mut state = self.lock();
        if state.current.as_deref() == Some(event.id.as_str()) && state.pending.is_none() {
            state.current = None;
            state.pending = Some(event);
            self.changed.notify_all();
        }
    }
}

fn accept(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        {
            let mut state = shared.lock();
            if state.connections >= MAX_CONNECTIONS {
                // Parked polls whose clients left give their slots back.
                state.sweep += 1;
                shared.changed.notify_all();
                let until = std::time::Instant::now() + SWEEP_WAIT;
                while state.connections >= MAX_CONNECTIONS {
                    let left = until.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    state = shared
                        .changed
                        .wait_timeout(state, left)
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .0;
                }
            }
            if state.connections >= MAX_CONNECTIONS {
                drop(state);
                too_many(stream);
                continue;
            }
            state.connections += 1;
        }
        let conn = Arc::clone(&shared);
        let started = std::thread::Builder::new()
            .name("runtime-api-conn".into())
            .stack_size(128 << 10)
            .spawn(move || {
                let _ = serve(stream, &conn);
                conn.lock().connections -= 1;
                conn.changed.notify_all();
            });
        if started.is_err() {
            shared.lock().connections -= 1;
        }
    }
}

/// Answers a connection over the limit 503 and closes it, from the acceptor's thread:
/// it reads what of the request has arrived (so the close does not reset the answer
/// away) and waits for nothing else.
fn too_many(mut stream: TcpStream) {
    let response = Response {
        close: true,
        ..error_response(
            503,
            "Service Unavailable",
            "TooManyConnections",
            &format!("at most {MAX_CONNECTIONS} connections to the runtime API at once"),
        )
    };
    let _ = stream.set_nonblocking(true);
    let mut sink = [0u8; 4096];
    let _ = stream.read(&mut sink);
    let _ = write_response(&mut stream, &response);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.read(&mut sink);
}

/// One request as the API sees it.
struct Request {
    method: String,
    path: String,
    close: bool,
    body: Vec<u8>,
}

/// An answer: status, reason, extra headers, body.
struct Response {
    status: u16,
    reason: &'static str,
    headers: String,
    body: Body,
    close: bool,
}

enum Body {
    Text(String),
    Event(Event),
}

fn serve(mut stream: TcpStream, shared: &Shared) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(4096);
    loop {
        let response = match read_request(&mut stream, &mut buf)? {
            None => return Ok(()),
            Some(Err(response)) => response,
            Some(Ok(request)) => {
                let close = request.close;
                // None: a long poll's client went away.
                let Some(mut response) = route(request, shared, &stream) else {
                    return Ok(());
                };
                response.close |= close;
                response
            }
        };
        if let Err(e) = write_response(&mut stream, &response) {
            if let Body::Event(event) = response.body {
                shared.put_back(event);
            }
            return Err(e);
        }
        if response.close {
            // A lingering close: the client may still be sending what was refused,
            // and closing with unread bytes would reset the answer away.
            stream.shutdown(std::net::Shutdown::Write)?;
            stream.set_read_timeout(Some(std::time::Duration::from_millis(100)))?;
            let mut sink = [0u8; 4096];
            for _ in 0..64 {
                if matches!(stream.read(&mut sink), Ok(0) | Err(_)) {
                    break;
                }
            }
            return Ok(());
        }
    }
}

/// Reads one request; `None` at a clean end of the connection, `Some(Err(answer))`
/// for a request refused before routing (the connection closes after the answer).
fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> io::Result<Option<Result<Request, Response>>> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let method = req.method.unwrap_or_default().to_owned();
                let path = req.path.unwrap_or_default().to_owned();
                let mut close = req.version == Some(0);
                let mut length = None;
                let mut chunked = false;
                for h in req.headers.iter() {
                    let value = String::from_utf8_lossy(h.value);
                    if h.name.eq_ignore_ascii_case("content-length") {
                        match value.trim().parse::<usize>() {
                            Ok(n) => length = Some(n),
                            Err(_) => {
                                return Ok(Some(Err(refuse(
                                    400,
                                    "Bad Request",
                                    "bad Content-Length",
                                ))))
                            }
                        }
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        chunked = true;
                    } else if h.name.eq_ignore_ascii_case("connection") {
                        let v = value.to_ascii_lowercase();
                        close = v.contains("close") || (close && !v.contains("keep-alive"));
                    }
                }
                if chunked {
                    return Ok(Some(Err(refuse(
                        411,
                        "Length Required",
                        "send a Content-Length, not chunks",
                    ))));
                }
                let length = length.unwrap_or(0);
                if length > MAX_ANSWER {
                    return Ok(Some(Err(refuse(
                        413,
                        "Payload Too Large",
                        &format!("a body is at most {} MiB", MAX_ANSWER >> 20),
                    ))));
                }
                buf.drain(..head_len);
                while buf.len() < length {
                    let have = buf.len();
                    buf.resize(length, 0);
                    let n = stream.read(&mut buf[have..])?;
                    buf.truncate(have + n);
                    if n == 0 {
                        return Ok(None);
                    }
                }
                let rest = buf.split_off(length);
                let body = std::mem::replace(buf, rest);
                return Ok(Some(Ok(Request {
                    method,
                    path,
                    close,
                    body,
                })));
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() >= MAX_HEAD {
                    return Ok(Some(Err(refuse(
                        431,
                        "Request Header Fields Too Large",
                        "the request head is too long",
                    ))));
                }
                let have = buf.len();
                buf.resize(MAX_HEAD, 0);
                let n = stream.read(&mut buf[have..]);
                buf.truncate(have + *n.as_ref().unwrap_or(&0));
                match n? {
                    0 => return Ok(None),
                    _ => continue,
                }
            }
            Err(e) => return Ok(Some(Err(refuse(400, "Bad Request", &format!("{e}"))))),
        }
    }
}

fn refuse(status: u16, reason: &'static str, message: &str) -> Response {
    let mut r = error_response(status, reason, "InvalidRequest", message);
    r.close = true;
    r
}

fn error_response(status: u16, reason: &'static str, kind: &str, message: &str) -> Response {
    let body = serde_json::json!({"errorType": kind, "errorMessage": message});
    Response {
        status,
        reason,
        headers: String::new(),
        body: Body::Text(body.to_string()),
        close: false,
    }
}

fn accepted() -> Response {
    Response {
        status: 202,
        reason: "Accepted",
        headers: String::new(),
        body: Body::Text("{\"status\":\"OK\"}".into()),
        close: false,
    }
}

/// The answer to `request` on `stream`; `None` when it is a long poll whose client
/// went away.
fn route(request: Request, shared: &Shared, stream: &TcpStream) -> Option<Response> {
    let Some(rest) = request.path.strip_prefix(PREFIX) else {
        return Some(error_response(404, "Not Found", "NotFound", "no such path"));
    };
    let parts: Vec<&str> = rest.split('/').collect();
    Some(match (request.method.as_str(), parts.as_slice()) {
        ("GET", ["invocation", "next"]) => return next(shared, stream),
        ("POST", ["invocation", id, what @ ("response" | "error")]) => {
            let mut state = shared.lock();
            if state.current.as_deref() != Some(*id) {
                return Some(error_response(
                    400,
                    "Bad Request",
                    "InvalidRequestID",
                    &format!("{id:?} is not the invocation in flight"),
                ));
            }
            state.current = None;
            state.outcome = Some(if *what == "response" {
                match check_json(&request.body) {
                    Ok(()) => match payload(request.body) {
                        Ok(result) => Outcome::Returned { result, raw: false },
                        Err(e) => Outcome::Raised(function_error(KIND, e.to_string())),
                    },
                    Err(e) => Outcome::Raised(function_error(
                        KIND,
                        format!("the bootstrap's response is not JSON: {e}"),
                    )),
                }
            } else {
                Outcome::Raised(function_failure(&request.body))
            });
            shared.changed.notify_all();
            accepted()
        }
        ("POST", ["init", "error"]) => {
            let mut state = shared.lock();
            if state.asked {
                return Some(error_response(
                    403,
                    "Forbidden",
                    "InvalidStateTransition",
                    "the function is already initialized",
                ));
            }
            state.init_error = Some(function_failure(&request.body));
            shared.changed.notify_all();
            accepted()
        }
        _ => error_response(404, "Not Found", "NotFound", "no such path"),
    })
}

/// Waits for the next invocation and hands it out to `stream`'s client, if it is
/// still there when the invocation comes (`None` if it went away).
fn next(shared: &Shared, stream: &TcpStream) -> Option<Response> {
    use std::os::fd::AsFd;
    let mut state = shared.lock();
    if !state.asked {
        state.asked = true;
        shared.changed.notify_all();
    }
    let mut swept = state.sweep;
    let event = loop {
        if state.pending.is_some() || state.sweep != swept {
            swept = state.sweep;
            if crate::sys::peer_gone(stream.as_fd()) {
                return None; // the event, if any, stays for another `next`
            }
            if let Some(event) = state.pending.take() {
                break event;
            }
        }
        state = shared.wait(state);
    };
    state.current = Some(event.id.clone());
    drop(state);
    // The activation id's 32 hex digits double as the trace id's 24 after the time.
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let headers = format!(
        "Lambda-Runtime-Aws-Request-Id: {id}\r\nLambda-Runtime-Deadline-Ms: {}\r\n\
         Lambda-Runtime-Invoked-Function-Arn: {}\r\n\
         Lambda-Runtime-Trace-Id: Root=1-{seconds:08x}-{};Sampled=0\r\n",
        event.deadline_ms,
        shared.arn,
        &event.id[8..],
        id = event.id,
    );
    Some(Response {
        status: 200,
        reason: "OK",
        headers,
        body: Body::Event(event),
        close: false,
    })
}

/// The function's error from an error body: `errorType`, `errorMessage`, `stackTrace`
/// (lines or one string); a body that is not such JSON is the message itself.
fn function_failure(body: &[u8]) -> FunctionError {
    let value: Option<HashMap<String, serde_json::Value>> = serde_json::from_slice(body).ok();
    let text = |v: Option<&serde_json::Value>| match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Array(lines)) => lines
            .iter()
            .map(|l| {
                l.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| l.to_string())
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Some(serde_json::Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    };
    match value {
        Some(map) => FunctionError {
            kind: Some(text(map.get("errorType")))
                .filter(|k| !k.is_empty())
                .unwrap_or_else(|| "Error".into()),
            message: text(map.get("errorMessage")),
            traceback: text(map.get("stackTrace")),
        },
        None => function_error("Error", String::from_utf8_lossy(body).into_owned()),
    }
}

fn write_response(stream: &mut TcpStream, r: &Response) -> io::Result<()> {
    let body: &[u8] = match &r.body {
        Body::Text(t) => t.as_bytes(),
        Body::Event(e) if e.body.is_empty() => b"{}",
        Body::Event(e) => &e.body,
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\n{}Content-Length: {}\r\n{}\r\n",
        r.status,
        r.reason,
        r.headers,
        body.len(),
        if r.close { "Connection: close\r\n" } else { "" },
    );
    if body.len() <= 64 << 10 {
        let mut all = head.into_bytes();
        all.extend_from_slice(body);
        stream.write_all(&all)
    } else {
        stream.write_all(head.as_bytes())?;
        stream.write_all(body)
    }
}
