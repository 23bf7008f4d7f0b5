//! The server end to end, over a real socket, with a fake [`Handle`].

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener as StdListener, UnixStream as StdStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use ipc::api::{ErrorBody, FunctionConfig, FunctionInfo, InvocationRecord, Logs, Status};
use ipc::client::{Client, ClientResponse};
use ipc::proto::FunctionError;

use super::*;
use crate::request::{FunctionSource, Invocation, Start};

/// Records every request; answers by function name.
#[derive(Default)]
struct Fake {
    seen: Mutex<Vec<Request>>,
}

fn info(name: &str, config: &FunctionConfig) -> FunctionInfo {
    FunctionInfo {
        name: name.to_owned(),
        path: format!("/srv/{name}"),
        handler: config.handler.clone().unwrap_or_else(|| "f:f".to_owned()),
        memory_mb: config.memory_mb.unwrap_or(128),
        timeout_ms: config.timeout_ms.unwrap_or(30_000),
        pids: config.pids.unwrap_or(64),
        cpus: config.cpus.unwrap_or(1.0),
        max_instances: config.max_instances.unwrap_or(4),
        warm_instances: 0,
    }
}

fn logs(stdout: &str) -> Logs {
    Logs {
        stdout: stdout.to_owned(),
        stderr: String::new(),
        truncated: false,
    }
}

impl Handle for Fake {
    fn handle(&self, req: Request) -> Result<Response, Error> {
        let answer = match &req {
            Request::RegisterFunction { name, config, .. } => {
                Ok(Response::Registered(info(name, config)))
            }
            Request::ListFunctions => Ok(Response::Functions(vec![
                info("a", &FunctionConfig::default()),
                info("b", &FunctionConfig::default()),
            ])),
            Request::RemoveFunction { name } if name == "missing" => {
                Err(Error::NotFound { name: name.clone() })
            }
            Request::RemoveFunction { name } => Ok(Response::Removed { name: name.clone() }),
            Request::RunWorkflow { name, .. } => {
                Err(Error::WorkflowNotFound { name: name.clone() })
            }
            Request::RegisterWorkflow { .. }
            | Request::ListWorkflows
            | Request::RemoveWorkflow { .. } => Ok(Response::Workflows(Vec::new())),
            Request::Status => Ok(Response::Status(Status {
                version: "test".into(),
                cgroup: "/sys/fs/cgroup/sprout".into(),
                functions: 2,
                sandboxes: 1,
                stem_cells: 2,
                frozen: 1,
                queued: 0,
                reserved_mb: 384,
                memory_budget_mb: 1024,
                invocations: 7,
                uptime_ms: 42,
            })),
            Request::Invoke { name, event } => {
                let function = name.clone();
                match name.as_str() {
                    "bad" => Err(Error::InvalidName { name: function }),
                    "missing" => Err(Error::NotFound { name: function }),
                    "raise" => Err(Error::Handler {
                        function,
                        error: FunctionError {
                            kind: "ValueError".into(),
                            message: "nope".into(),
                            traceback: "Traceback...".into(),
                        },
                        logs: logs("before\n"),
                    }),
                    "timeout" => Err(Error::Timeout {
                        function,
                        timeout_ms: 10,
                        logs: logs(""),
                    }),
                    "broken" => Err(Error::State {
                        path: "/var/lib/sprout".into(),
                        source: io::Error::from(io::ErrorKind::PermissionDenied),
                    }),
                    "down" => Err(Error::ShuttingDown),
                    "panic" => panic!("fake handler panics on purpose"),
                    _ => {
                        if name == "slow" {
                            thread::sleep(Duration::from_millis(100));
                        }
                        Ok(Response::Invoked(Invocation {
                            result: event.clone(),
                            raw: false,
                            logs: logs("hello\n"),
                            duration: Duration::from_micros(1500),
                            start: if name == "warm" {
                                Start::Warm
                            } else {
                                Start::StemCell
                            },
                        }))
                    }
                }
            }
        };
        self.seen.lock().unwrap().push(req);
        answer
    }
}

struct TestServer {
    _dir: tempfile::TempDir,
    path: PathBuf,
    fake: Arc<Fake>,
    shutdown: ShutdownHandle,
    thread: Option<JoinHandle<Result<(), HttpError>>>,
}

impl TestServer {
    fn start() -> TestServer {
        TestServer::with(Limits::default(), 4)
    }

    fn with(limits: Limits, workers: usize) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let server = Server::bind(&path, limits).unwrap();
        let shutdown = server.shutdown_handle();
        let fake = Arc::new(Fake::default());
        let handler: Arc<dyn Handle> = fake.clone();
        let thread = thread::spawn(move || server.run(handler, workers));
        TestServer {
            _dir: dir,
            path,
            fake,
            shutdown,
            thread: Some(thread),
        }
    }

    fn client(&self) -> Client {
        Client::connect(&self.path).unwrap()
    }

    fn raw(&self) -> Raw {
        let s = StdStream::connect(&self.path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw { s, buf: Vec::new() }
    }

    fn take_seen(&self) -> Vec<Request> {
        std::mem::take(&mut *self.fake.seen.lock().unwrap())
    }

    fn stop(mut self) -> Result<(), HttpError> {
        self.shutdown.shutdown();
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.shutdown.shutdown();
            let _ = thread.join();
        }
    }
}

/// A hand-driven connection, for what the client does not do.
struct Raw {
    s: StdStream,
    buf: Vec<u8>,
}

impl Raw {
    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 65536];
        let n = self.s.read(&mut chunk).expect("read from server");
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// Reads one response (an interim one has an empty body).
    fn response(&mut self) -> ClientResponse {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(len) = resp.parse(&self.buf).unwrap() {
                let status = resp.code.unwrap();
                let headers: Vec<(String, String)> = resp
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_owned(),
                            String::from_utf8(h.value.to_vec()).unwrap(),
                        )
                    })
                    .collect();
                let mut r = ClientResponse {
                    status,
                    headers,
                    body: Vec::new(),
                };
                let body_len: usize = r.header("content-length").map_or(0, |v| v.parse().unwrap());
                if status >= 200 {
                    assert!(
                        r.header("content-length").is_some(),
                        "every response has a length"
                    );
                    assert_eq!(r.header("content-type"), Some("application/json"));
                }
                while self.buf.len() < len + body_len {
                    assert!(self.fill() > 0, "server closed mid-response");
                }
                r.body = self.buf[len..len + body_len].to_vec();
                self.buf.drain(..len + body_len);
                return r;
            }
            assert!(self.fill() > 0, "server closed before responding");
        }
    }

    /// True if the server closed the connection.
    fn closed(&mut self) -> bool {
        assert!(
            self.buf.is_empty(),
            "unread data: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        self.fill() == 0
    }

    /// True if nothing arrives within `ms`.
    fn quiet_for(&mut self, ms: u64) -> bool {
        self.s
            .set_read_timeout(Some(Duration::from_millis(ms)))
            .unwrap();
        let mut chunk = [0u8; 1];
        let quiet =
            matches!(self.s.read(&mut chunk), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        self.s
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        quiet
    }
}

fn error_of(r: &ClientResponse) -> ErrorBody {
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&r.body)))
}

fn text(r: &ClientResponse) -> &str {
    std::str::from_utf8(&r.body).unwrap()
}

#[test]
fn registers_from_a_directory_or_a_tar() {
    let t = TestServer::start();
    let mut c = t.client();

    let body = br#"{"path":"/srv/hello","handler":"app:main","memory_mb":256,"timeout_ms":500,"pids":16,"cpus":0.5}"#;
    let r = c
        .request("PUT", "/functions/hello", Some("application/json"), body)
        .unwrap();
    assert_eq!(r.status, 200, "{}", text(&r));
    let info: FunctionInfo = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        (info.name.as_str(), info.handler.as_str(), info.memory_mb),
        ("hello", "app:main", 256)
    );
    let expected = FunctionConfig {
        handler: Some("app:main".into()),
        memory_mb: Some(256),
        timeout_ms: Some(500),
        pids: Some(16),
        cpus: Some(0.5),
        max_instances: None,
    };
    match t.take_seen().as_slice() {
        [Request::RegisterFunction {
            name,
            source: FunctionSource::Dir(dir),
            config,
        }] => {
            assert_eq!(
                (name.as_str(), dir.as_path(), config),
                ("hello", Path::new("/srv/hello"), &expected)
            );
        }
        other => panic!("{other:?}"),
    }

    // No content type means JSON.
    let r = c
        .request("PUT", "/functions/plain", None, br#"{"path":"/srv/plain"}"#)
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(matches!(
        t.take_seen().as_slice(),
        [Request::RegisterFunction {
            source: FunctionSource::Dir(_),
            ..
        }]
    ));

    let tar = b"not really a tar, but the agent unpacks it".to_vec();
    let r = c
        .request(
            "PUT",
            "/functions/packed?handler=f:f&memory_mb=128&timeout_ms=1000&pids=64&cpus=1",
            Some("application/x-tar"),
            &tar,
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", text(&r));
    let expected = FunctionConfig {
        handler: Some("f:f".into()),
        memory_mb: Some(128),
        timeout_ms: Some(1000),
        pids: Some(64),
        cpus: Some(1.0),
        max_instances: None,
    };
    match t.take_seen().as_slice() {
        [Request::RegisterFunction {
            name,
            source: FunctionSource::Tar(bytes),
            config,
        }] => {
            assert_eq!((name.as_str(), bytes, config), ("packed", &tar, &expected));
        }
        other => panic!("{other:?}"),
    }

    let r = c
        .request(
            "PUT",
            "/functions/packed?memory_mb=big",
            Some("application/x-tar"),
            &tar,
        )
        .unwrap();
    assert_eq!(r.status, 400);
    let e = error_of(&r).error;
    assert_eq!(e.kind, "bad_request");
    assert!(e.message.contains("memory_mb"), "{}", e.message);
    let r = c
        .request(
            "PUT",
            "/functions/packed?colour=red",
            Some("application/x-tar"),
            &tar,
        )
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(error_of(&r).error.message.contains("colour"));

    let r = c
        .request(
            "PUT",
            "/functions/hello",
            Some("application/json"),
            b"{\"path\":",
        )
        .unwrap();
    assert_eq!(
        (r.status, error_of(&r).error.kind.as_str()),
        (400, "bad_request")
    );

    let r = c
        .request("PUT", "/functions/hello", Some("text/plain"), b"x")
        .unwrap();
    assert_eq!(
        (r.status, error_of(&r).error.kind.as_str()),
        (415, "unsupported_media_type")
    );
    // The connection survived all the refusals, and nothing reached the agent.
    assert_eq!(c.request("GET", "/status", None, b"").unwrap().status, 200);
    assert!(matches!(t.take_seen().as_slice(), [Request::Status]));
}

#[test]
fn lists_removes_and_reports_status() {
    let t = TestServer::start();
    let mut c = t.client();

    let r = c.request("GET", "/functions", None, b"").unwrap();
    assert_eq!(r.status, 200);
    let list: Vec<FunctionInfo> = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        list.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );

    let r = c.request("DELETE", "/functions/old", None, b"").unwrap();
    assert_eq!((r.status, text(&r)), (200, r#"{"removed":"old"}"#));

    let r = c.request("GET", "/status", None, b"").unwrap();
    assert_eq!(r.status, 200);
    let status: Status = serde_json::from_slice(&r.body).unwrap();
    assert_eq!((status.functions, status.invocations), (2, 7));

    let seen = t.take_seen();
    assert!(matches!(
        seen.as_slice(),
        [Request::ListFunctions, Request::RemoveFunction { name }, Request::Status] if name == "old"
    ));
}

#[test]
fn invokes_with_and_without_logs() {
    let t = TestServer::start();
    let mut c = t.client();

    let event = br#"{"n": 1,  "spaced": true}"#;
    let r = c
        .request(
            "POST",
            "/functions/echo/invoke",
            Some("application/json"),
            event,
        )
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, event, "the result's bytes, untouched");
    assert_eq!(r.header(DURATION_HEADER), Some("1500"));
    assert_eq!(r.header(COLD_HEADER), Some("true"));

    // The OpenLambda alias, with an empty body meaning {}.
    let r = c.request("POST", "/run/warm", None, b"").unwrap();
    assert_eq!((r.status, text(&r)), (200, "{}"));
    assert_eq!(r.header("x-sprout-cold"), Some("false"));

    for query in ["logs=true", "logs=1"] {
        let r = c
            .request("POST", &format!("/run/echo?{query}"), None, event)
            .unwrap();
        assert_eq!(r.status, 200);
        let record: InvocationRecord = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(record.result.get().as_bytes(), event);
        assert_eq!(record.logs, logs("hello\n"));
        assert_eq!((record.duration_us, record.cold), (1500, true));
        assert_eq!(r.header(DURATION_HEADER), Some("1500"));
    }
    let r = c.request("POST", "/run/echo?logs=0", None, b"[1]").unwrap();
    assert_eq!(text(&r), "[1]");

    let events: Vec<(String, Vec<u8>)> = t
        .take_seen()
        .into_iter()
        .map(|r| match r {
            Request::Invoke { name, event } => (name, event),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(events.len(), 5);
    assert_eq!(events[0], ("echo".to_owned(), event.to_vec()));
    assert_eq!(events[1], ("warm".to_owned(), b"{}".to_vec()));
}

#[test]
fn agent_errors_map_to_statuses() {
    let t = TestServer::start();
    let mut c = t.client();
    for (name, status, kind) in [
        ("bad", 400, "bad_request"),
        ("missing", 404, "not_found"),
        ("raise", 502, "handler_error"),
        ("timeout", 504, "timeout"),
        ("broken", 500, "internal"),
        ("down", 503, "unavailable"),
        ("panic", 500, "internal"),
    ] {
        let r = c
            .request("POST", &format!("/functions/{name}/invoke"), None, b"{}")
            .unwrap();
        assert_eq!(r.status, status, "{name}: {}", text(&r));
        let e = error_of(&r).error;
        assert_eq!(e.kind, kind, "{name}");
        if name == "raise" {
            assert_eq!(e.exception.as_deref(), Some("ValueError"));
            assert_eq!(e.traceback.as_deref(), Some("Traceback..."));
            assert_eq!(e.logs, Some(logs("before\n")));
        }
        if name == "broken" {
            assert!(e.message.contains("/var/lib/sprout"), "{}", e.message);
        }
    }
    let r = c
        .request("DELETE", "/functions/missing", None, b"")
        .unwrap();
    assert_eq!(r.status, 404);
}

#[test]
fn unknown_routes_and_methods() {
    let t = TestServer::start();
    let mut c = t.client();
    let r = c.request("GET", "/x", None, b"").unwrap();
    assert_eq!(r.status, 404);
    let e = error_of(&r).error;
    assert_eq!(
        (e.kind.as_str(), e.message.as_str()),
        ("not_found", "no route for GET /x")
    );

    for (method, path, allow) in [
        ("POST", "/functions", "GET"),
        ("POST", "/functions/f", "PUT, DELETE"),
        ("GET", "/functions/f/invoke", "POST"),
        ("GET", "/run/f", "POST"),
        ("PUT", "/status", "GET"),
    ] {
        let r = c.request(method, path, None, b"{}").unwrap();
        assert_eq!(r.status, 405, "{method} {path}");
        assert_eq!(r.header("allow"), Some(allow));
        assert_eq!(error_of(&r).error.kind, "method_not_allowed");
    }
    assert!(t.take_seen().is_empty());
}

#[test]
fn oversized_bodies_are_refused_unread() {
    let t = TestServer::with(
        Limits {
            max_body: 1024,
            max_head: 64 << 10,
        },
        2,
    );
    let mut raw = t.raw();
    raw.send(b"POST /run/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n");
    let r = raw.response();
    assert_eq!(
        (r.status, error_of(&r).error.kind.as_str()),
        (413, "payload_too_large")
    );
    assert_eq!(r.header("connection"), Some("close"));
    assert!(raw.closed());

    // Chunked: refused as soon as a chunk would cross the limit.
    let mut raw = t.raw();
    raw.send(b"POST /run/echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n");
    raw.send(&[b' '; 1024]);
    raw.send(b"\r\n1\r\n");
    let r = raw.response();
    assert_eq!(r.status, 413);
    assert!(raw.closed());

    // Exactly at the limit is fine.
    let mut c = t.client();
    let body = format!("\"{}\"", "a".repeat(1022));
    let r = c
        .request("POST", "/run/echo", None, body.as_bytes())
        .unwrap();
    assert_eq!((r.status, r.body.len()), (200, 1024));
}

#[test]
fn oversized_and_malformed_heads_close_the_connection() {
    let t = TestServer::with(
        Limits {
            max_body: 1024,
            max_head: 512,
        },
        2,
    );
    let mut raw = t.raw();
    raw.send(format!("GET /status HTTP/1.1\r\nX-Big: {}\r\n", "b".repeat(600)).as_bytes());
    let r = raw.response();
    assert_eq!(
        (r.status, error_of(&r).error.kind.as_str()),
        (431, "headers_too_large")
    );
    assert!(raw.closed());

    let mut raw = t.raw();
    raw.send(b"GET /status HTTP/1.1\r\nBad Header\r\n\r\n");
    let r = raw.response();
    assert_eq!(
        (r.status, error_of(&r).error.kind.as_str()),
        (400, "bad_request")
    );
    assert_eq!(r.header("connection"), Some("close"));
    assert!(raw.closed());

    let mut raw = t.raw();
    raw.send(b"GET /status HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n");
    assert_eq!(raw.response().status, 400);
    assert!(raw.closed());
    assert!(t.take_seen().is_empty());
}

#[test]
fn keep_alive_and_connection_close() {
    let t = TestServer::start();
    let mut raw = t.raw();
    raw.send(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n");
    let r = raw.response();
    assert_eq!((r.status, r.header("connection")), (200, None));
    raw.send(b"POST /run/echo HTTP/1.1\r\nContent-Length: 2\r\n\r\n[]");
    assert_eq!(text(&raw.response()), "[]");
    assert!(raw.quiet_for(50), "the connection stays open");
    raw.send(b"GET /status HTTP/1.1\r\nConnection: close\r\n\r\n");
    let r = raw.response();
    assert_eq!((r.status, r.header("connection")), (200, Some("close")));
    assert!(raw.closed());

    // HTTP/1.0 closes unless asked not to.
    let mut raw = t.raw();
    raw.send(b"GET /status HTTP/1.0\r\n\r\n");
    let r = raw.response();
    assert_eq!(r.header("connection"), Some("close"));
    assert!(raw.closed());
    let mut raw = t.raw();
    raw.send(b"GET /status HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert_eq!(raw.response().header("connection"), Some("keep-alive"));
    raw.send(b"GET /status HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert_eq!(raw.response().status, 200);

    // The client keeps one connection for many requests.
    let mut c = t.client();
    for _ in 0..3 {
        assert_eq!(c.request("GET", "/status", None, b"").unwrap().status, 200);
    }
}

#[test]
fn chunked_request_bodies() {
    let t = TestServer::start();
    let mut raw = t.raw();
    raw.send(b"POST /functions/echo/invoke HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;note=x\r\n{\"a\":");
    thread::sleep(Duration::from_millis(20));
    raw.send(b"\r\n");
    thread::sleep(Duration::from_millis(20));
    raw.send(b"3\r\n42}\r\n0\r\nX-Trailer: yes\r\n\r\n");
    let r = raw.response();
    assert_eq!((r.status, text(&r)), (200, "{\"a\":42}"));
    // And the connection is still good.
    raw.send(b"PUT /functions/c HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Type: application/x-tar\r\n\r\n3\r\ntar\r\n0\r\n\r\n");
    assert_eq!(raw.response().status, 200);
    let seen = t.take_seen();
    assert!(matches!(&seen[0], Request::Invoke { event, .. } if event == b"{\"a\":42}"));
    assert!(
        matches!(&seen[1], Request::RegisterFunction { source: FunctionSource::Tar(b), .. } if b == b"tar")
    );
}

#[test]
fn expect_100_continue() {
    let t = TestServer::start();
    let mut raw = t.raw();
    raw.send(b"POST /run/echo HTTP/1.1\r\nContent-Length: 7\r\nExpect: 100-continue\r\n\r\n");
    let r = raw.response();
    assert_eq!(r.status, 100);
    raw.send(b"{\"x\":1}");
    let r = raw.response();
    assert_eq!((r.status, text(&r)), (200, "{\"x\":1}"));

    // Chunked bodies are invited too.
    raw.send(
        b"POST /run/echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n",
    );
    assert_eq!(raw.response().status, 100);
    raw.send(b"2\r\n[]\r\n0\r\n\r\n");
    assert_eq!(text(&raw.response()), "[]");

    // A request that will be refused gets its final answer instead of 100, and no
    // body is read.
    raw.send(b"POST /nowhere HTTP/1.1\r\nContent-Length: 7\r\nExpect: 100-continue\r\n\r\n");
    let r = raw.response();
    assert_eq!((r.status, r.header("connection")), (404, Some("close")));
    assert!(raw.closed());

    let t = TestServer::with(
        Limits {
            max_body: 10,
            max_head: 4096,
        },
        1,
    );
    let mut raw = t.raw();
    raw.send(b"POST /run/echo HTTP/1.1\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n");
    assert_eq!(raw.response().status, 413);
    assert!(raw.closed());
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let t = TestServer::with(Limits::default(), 4);
    let mut raw = t.raw();
    raw.send(
        b"POST /run/slow HTTP/1.1\r\nContent-Length: 3\r\n\r\n[1]\
          GET /status HTTP/1.1\r\n\r\n\
          GET /nowhere HTTP/1.1\r\n\r\n\
          POST /run/echo HTTP/1.1\r\nContent-Length: 3\r\n\r\n[4]\
          GET /functions HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    let r = raw.response();
    assert_eq!((r.status, text(&r)), (200, "[1]"));
    assert!(text(&raw.response()).contains("\"uptime_ms\""));
    assert_eq!(raw.response().status, 404);
    assert_eq!(text(&raw.response()), "[4]");
    assert!(text(&raw.response()).starts_with('['));
    assert!(raw.closed());
    // One at a time: the agent saw them in order.
    let names: Vec<String> = t
        .take_seen()
        .iter()
        .map(|r| match r {
            Request::Invoke { name, .. } => name.clone(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(names, ["slow", "Status", "echo", "ListFunctions"]);
}

#[test]
fn many_concurrent_clients() {
    let t = TestServer::with(Limits::default(), 8);
    let threads: Vec<_> = (0..50)
        .map(|i| {
            let path = t.path.clone();
            thread::spawn(move || {
                let mut c = Client::connect(&path).unwrap();
                for j in 0..20 {
                    let event = format!("{{\"client\":{i},\"n\":{j}}}");
                    let name = if j % 10 == 0 { "slow" } else { "echo" };
                    let r = c
                        .request("POST", &format!("/run/{name}"), None, event.as_bytes())
                        .unwrap();
                    assert_eq!((r.status, text(&r)), (200, event.as_str()));
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    assert_eq!(t.take_seen().len(), 1000);
}

#[test]
fn stale_sockets_are_replaced_and_live_ones_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");

    // Bound and closed: the file stays, nobody listens.
    drop(StdListener::bind(&path).unwrap());
    assert!(path.exists());
    let server = Server::bind(&path, Limits::default()).unwrap();

    let err = Server::bind(&path, Limits::default()).unwrap_err();
    assert!(matches!(err, HttpError::InUse { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("another agent serves on {}", path.display())
    );
    drop(server);
    assert!(
        !path.exists(),
        "dropping an unstarted server removes its socket"
    );

    let _live = StdListener::bind(&path).unwrap();
    assert!(matches!(
        Server::bind(&path, Limits::default()),
        Err(HttpError::InUse { .. })
    ));

    let file = dir.path().join("file");
    fs::write(&file, b"").unwrap();
    assert!(matches!(
        Server::bind(&file, Limits::default()),
        Err(HttpError::NotASocket { .. })
    ));
    assert!(file.exists());
}

#[test]
fn shutdown_stops_the_loop_and_removes_the_socket() {
    let t = TestServer::start();
    let path = t.path.clone();
    let mut raw = t.raw();
    raw.send(b"GET /status HTTP/1.1\r\n\r\n");
    assert_eq!(raw.response().status, 200);

    let shutdown = t.shutdown.clone();
    let stopper = thread::spawn(move || shutdown.shutdown());
    stopper.join().unwrap();
    t.stop().unwrap();
    assert!(!path.exists());
    assert!(raw.closed(), "open connections are closed");
    assert!(StdStream::connect(&path).is_err());

    // Asked to stop before it runs: returns at once.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let server = Server::bind(&path, Limits::default()).unwrap();
    server.shutdown_handle().shutdown();
    server.run(Arc::new(Fake::default()), 1).unwrap();
    assert!(!path.exists());
}

#[test]
fn curl_talks_to_the_server() {
    let curl = Path::new("/usr/bin/curl");
    assert!(curl.exists(), "curl is expected at /usr/bin/curl");
    let t = TestServer::start();
    let socket = t.path.to_str().unwrap();

    let out = Command::new(curl)
        .args([
            "-sS",
            "--unix-socket",
            socket,
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/json",
        ])
        .args([
            "-d",
            r#"{"path":"/srv/hello","memory_mb":64}"#,
            "http://localhost/functions/hello",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: FunctionInfo = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((info.name.as_str(), info.memory_mb), ("hello", 64));

    let event = format!("{{\"data\":\"{}\"}}", "x".repeat(4000));
    let file = t._dir.path().join("event.json");
    fs::write(&file, &event).unwrap();
    let out = Command::new(curl)
        .args([
            "-sS",
            "-v",
            "--unix-socket",
            socket,
            "-H",
            "Expect: 100-continue",
        ])
        .args([
            "-d",
            &format!("@{}", file.display()),
            "http://localhost/run/hello",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(out.stdout, event.as_bytes());
    assert!(stderr.contains("HTTP/1.1 100 Continue"), "{stderr}");
    assert!(
        stderr.to_ascii_lowercase().contains("x-sprout-cold: true"),
        "{stderr}"
    );
    assert!(
        matches!(t.take_seen().as_slice(), [_, Request::Invoke { event: e, .. }] if e == event.as_bytes())
    );
}
