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
use crate::http::{COLD_HEADER, DURATION_HEADER};
use crate::request::{FunctionSource, Invocation, Request, Response, Start};
use crate::transport::Abandon;
use std::fs;

/// Records every request; answers by function name.
#[derive(Default)]
struct Fake {
    seen: Mutex<Vec<Request>>,
    /// Requests of `queued` that started waiting (as for an instance).
    waiting: std::sync::atomic::AtomicUsize,
    /// Invocations that reached the handler.
    started: std::sync::atomic::AtomicUsize,
    /// Why each `queued` request stopped waiting.
    abandoned: Mutex<Vec<Abandoned>>,
}

/// Polls `f` until it is true, for at most `within`.
fn until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while !f() {
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
    true
}

fn info(name: &str, config: &FunctionConfig) -> FunctionInfo {
    FunctionInfo {
        namespace: "default".to_owned(),
        name: name.to_owned(),
        runtime: config
            .runtime
            .clone()
            .unwrap_or_else(|| "python".to_owned()),
        network: config.network.clone().unwrap_or_else(|| "none".to_owned()),
        path: format!("/srv/{name}"),
        handler: config.handler.clone().unwrap_or_else(|| "f:f".to_owned()),
        memory_mb: config.memory_mb.unwrap_or(128),
        timeout_ms: config.timeout_ms.unwrap_or(30_000),
        pids: config.pids.unwrap_or(64),
        cpus: config.cpus.unwrap_or(1.0),
        max_instances: config.max_instances.unwrap_or(4),
        warm_instances: 0,
        packages: Vec::new(),
    }
}

fn logs(stdout: &str) -> Logs {
    Logs {
        stdout: stdout.to_owned(),
        stderr: String::new(),
        truncated: false,
    }
}

/// `/run` as the fake sees it: a plain function's invoke (its body the event, `{}`
/// when empty), but for `app` (an HTTP app) and `getonly` (allows GET only).
fn as_invoke(req: Request) -> Request {
    match req {
        Request::Run {
            namespace,
            name,
            run,
            activation_id,
        } if name != "app" && name != "getonly" => Request::Invoke {
            namespace,
            name,
            event: if run.body.is_empty() {
                b"{}".to_vec()
            } else {
                run.body
            },
            activation_id,
            blocking: true,
        },
        other => other,
    }
}

impl Handle for Fake {
    fn handle(&self, req: Request) -> Result<Response, Error> {
        let req = as_invoke(req);
        let answer = match &req {
            Request::Run { name, run, .. } if name == "getonly" && run.request.method != "GET" => {
                Err(Error::MethodNotAllowed {
                    function: name.clone(),
                    method: run.request.method.clone(),
                    allowed: vec!["GET".into(), "POST".into()],
                })
            }
            Request::GetActivation { .. } | Request::ListActivations { .. } => {
                Err(Error::RecordsOff)
            }
            Request::Run { run, .. } => Ok(Response::Invoked(Invocation {
                activation_id: ipc::api::ActivationId::from_u128(1),
                result: run.body.clone().into(),
                raw: false,
                logs: logs(""),
                duration: Duration::from_micros(5),
                start: Start::Warm,
                http: Some(ipc::proto::HttpHead {
                    status: 418,
                    headers: vec![
                        ("A".into(), "B".into()),
                        ("Content-Type".into(), "text/plain".into()),
                    ],
                }),
            })),
            Request::RegisterFunction { name, config, .. } => {
                Ok(Response::Registered(info(name, config)))
            }
            Request::ListFunctions { .. } => Ok(Response::Functions(vec![
                info("a", &FunctionConfig::default()),
                info("b", &FunctionConfig::default()),
            ])),
            Request::RemoveFunction { namespace, name } if name == "missing" => {
                Err(Error::NotFound {
                    namespace: namespace.clone(),
                    name: name.clone(),
                })
            }
            Request::RemoveFunction { namespace, name } => Ok(Response::Removed {
                namespace: namespace.clone(),
                name: name.clone(),
            }),
            Request::RunWorkflow {
                namespace, name, ..
            } => Err(Error::WorkflowNotFound {
                namespace: namespace.clone(),
                name: name.clone(),
            }),
            Request::ListPackages | Request::CollectPackages => {
                Ok(Response::Packages(vec![ipc::api::PackageInfo {
                    kind: "python".into(),
                    key: "six-1.16.0-cpython-311-linux-x86_64-0123456789abcdef".into(),
                    name: "six".into(),
                    version: "1.16.0".into(),
                    sha256: "0".repeat(64),
                    modules: vec!["six".into()],
                    bytes: 34_549,
                    users: vec!["default/f".into()],
                }]))
            }
            Request::RegisterWorkflow { .. }
            | Request::ListWorkflows { .. }
            | Request::RemoveWorkflow { .. } => Ok(Response::Workflows(Vec::new())),
            Request::Usage { namespace } => Ok(Response::Usage(ipc::api::NamespaceUsage {
                namespace: namespace.clone(),
                invocations: 3,
                errors: 1,
                duration_ms: 2000,
                mb_ms: 256_000,
                gb_seconds: 0.25,
                statuses: [
                    ("success".to_owned(), 2),
                    ("application_error".to_owned(), 1),
                ]
                .into(),
            })),
            Request::Metrics => Ok(Response::Metrics(
                "# HELP x_total X.\n# TYPE x_total counter\nx_total 1\n".into(),
            )),
            Request::Status => Ok(Response::Status(Status {
                version: "test".into(),
                cgroup: "/sys/fs/cgroup/sprout".into(),
                functions: 2,
                sandboxes: 1,
                stem_cells: 2,
                stem_cells_by_runtime: [("python".to_owned(), 2)].into(),
                sandboxes_forked: 3,
                sandboxes_created: 1,
                frozen: 1,
                queued: 0,
                reserved_mb: 384,
                memory_budget_mb: 1024,
                invocations: 7,
                uptime_ms: 42,
                packages_installed: 2,
                package_cache_hits: 1,
                package_zygotes: 0,
                namespaces: ["alpha", "beta"]
                    .map(|ns| ipc::api::NamespaceStatus {
                        namespace: ns.to_owned(),
                        functions: 1,
                        workflows: 0,
                        sandboxes: 0,
                    })
                    .to_vec(),
            })),
            Request::Invoke {
                namespace,
                name,
                event,
                ..
            } => {
                let function = name.clone();
                match name.as_str() {
                    "bad" => Err(Error::InvalidName { name: function }),
                    "missing" => Err(Error::NotFound {
                        namespace: namespace.clone(),
                        name: function,
                    }),
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
                    "full" => Err(Error::QueueFull {
                        function: format!("{namespace}/{function}"),
                        max_queue: 8,
                    }),
                    "huge" => Err(Error::ResultTooLarge {
                        function,
                        len: 100 << 20,
                        max: crate::request::MAX_RESULT,
                    }),
                    "panic" => panic!("fake handler panics on purpose"),
                    _ => {
                        if name == "slow" {
                            thread::sleep(Duration::from_millis(100));
                        }
                        Ok(Response::Invoked(Invocation {
                            activation_id: ipc::api::ActivationId::from_u128(1),
                            result: event.clone().into(),
                            raw: false,
                            logs: logs("hello\n"),
                            duration: Duration::from_micros(1500),
                            start: if name == "warm" {
                                Start::Warm
                            } else {
                                Start::StemCell
                            },
                            http: None,
                        }))
                    }
                }
            }
            Request::GetAction { name, namespace } if name == "pkg/known" => {
                Ok(Response::Action(Box::new(ipc::openwhisk::action::Action {
                    namespace: Some(namespace.clone()),
                    name: Some(name.clone()),
                    ..Default::default()
                })))
            }
            Request::GetAction { namespace, name } => Err(Error::not_found_in(namespace, name)),
            Request::PutAction { .. }
            | Request::Activate(_)
            | Request::ListActions { .. }
            | Request::DeleteAction { .. }
            | Request::InvokeAction { .. }
            | Request::WhiskActivations { .. }
            | Request::GetWhiskActivation { .. } => {
                Err(Error::InvalidConfig("not in the fake".into()))
            }
            Request::Invoker(msg) => Ok(Response::Acknowledged(Box::new(fake_invoker(msg)))),
        };
        self.seen.lock().unwrap().push(req);
        answer
    }

    /// `queued` waits (up to 10 s) until it is taken back, as a request waiting for
    /// an instance does; `stuck` runs for 3 s, `running` for 1 s.
    fn handle_abandonable(&self, req: Request, abandon: &Abandon) -> Result<Response, Error> {
        let req = as_invoke(req);
        let name = match &req {
            Request::Invoke { name, .. } => name.clone(),
            _ => return self.handle(req),
        };
        self.started.fetch_add(1, Ordering::SeqCst);
        match name.as_str() {
            "queued" => {
                self.waiting.fetch_add(1, Ordering::SeqCst);
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline {
                    if let Some(why) = abandon.get() {
                        self.abandoned.lock().unwrap().push(why);
                        return Err(abandon.error(&name).unwrap());
                    }
                    thread::sleep(Duration::from_millis(2));
                }
                self.handle(req)
            }
            "stuck" => {
                thread::sleep(Duration::from_secs(3));
                self.handle(req)
            }
            "running" => {
                thread::sleep(Duration::from_secs(1));
                self.handle(req)
            }
            _ => self.handle(req),
        }
    }
}

/// The invoker contract over a fake agent: the message's action runs after
/// `content.sleep_ms`; `missing` is not registered, `panic` panics; the result is
/// the parameters.
fn fake_invoker(
    msg: &ipc::openwhisk::invoker::ActivationMessage,
) -> ipc::openwhisk::invoker::Acknowledgement {
    let invoker = crate::openwhisk::invoker::WhiskInvoker::start(Default::default()).unwrap();
    let run = |req: Request| -> Result<Response, Error> {
        let Request::Activate(a) = req else {
            panic!("the invoker asks only to activate")
        };
        if let Some(ms) = a.params.get("sleep_ms").and_then(|v| v.as_u64()) {
            thread::sleep(Duration::from_millis(ms));
        }
        match a.name.as_str() {
            "missing" => Err(Error::NotFound {
                namespace: a.namespace.clone(),
                name: a.name.clone(),
            }),
            "panic" => panic!("fake handler panics on purpose"),
            _ => Ok(Response::Activated(Box::new(
                serde_json::from_value(serde_json::json!({
                    "namespace": a.namespace, "name": a.name, "subject": a.subject,
                    "activationId": a.activation_id.unwrap().to_string(),
                    "start": 1, "end": 2, "duration": 1,
                    "response": {"status": "success", "statusCode": 0, "success": true,
                                 "result": a.params},
                    "logs": [], "version": "0.0.1", "publish": false,
                    "annotations": [{"key": "path", "value": "x"}]
                }))
                .unwrap(),
            ))),
        }
    };
    invoker.acknowledge(msg.clone(), &run)
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
        runtime: None,
        network: None,
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
            ..
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
        runtime: None,
        network: None,
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
            ..
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
        [Request::ListFunctions { .. }, Request::RemoveFunction { name, .. }, Request::Status] if name == "old"
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
            Request::Invoke { name, event, .. } => (name, event),
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
        ("huge", 502, "bad_result"),
        ("full", 429, "too_many_requests"),
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
        if name == "full" {
            assert_eq!(
                e.message,
                "function default/full: queue is full (8 requests waiting, the most max_queue allows)"
            );
        }
        if name == "huge" {
            assert_eq!(
                e.message,
                "function huge returned a result of 104857600 bytes, over the limit of 67108864 bytes for a result"
            );
        }
    }
    let r = c
        .request("DELETE", "/functions/missing", None, b"")
        .unwrap();
    assert_eq!(r.status, 404);
}

#[test]
fn usage_is_json_and_metrics_are_prometheus_text() {
    let t = TestServer::start();
    let mut c = t.client();
    let r = c
        .request("GET", "/namespaces/team-a/usage", None, b"")
        .unwrap();
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.header("content-type"), Some("application/json"));
    let usage: ipc::api::NamespaceUsage = serde_json::from_slice(&r.body).unwrap();
    assert_eq!((usage.namespace.as_str(), usage.invocations), ("team-a", 3));
    let r = c.request("GET", "/metrics", None, b"").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert_eq!(
        text(&r),
        "# HELP x_total X.\n# TYPE x_total counter\nx_total 1\n"
    );
    let r = c.request("GET", "/metrics?x=1", None, b"").unwrap();
    assert_eq!(r.status, 400, "{}", text(&r));
    let seen = t.take_seen();
    assert!(
        matches!(
            seen.as_slice(),
            [Request::Usage { namespace }, Request::Metrics] if namespace == "team-a"
        ),
        "{seen:?}"
    );
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
        (
            "TRACE",
            "/run/f",
            "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS",
        ),
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
            ..Limits::default()
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
            ..Limits::default()
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
            ..Limits::default()
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
            Request::ListFunctions { .. } => "ListFunctions".to_owned(),
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

fn invoke_bytes(name: &str) -> Vec<u8> {
    format!("POST /functions/{name}/invoke HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}").into_bytes()
}

#[test]
fn a_client_that_goes_away_takes_its_waiting_request_with_it() {
    let t = TestServer::start();
    let mut raw = t.raw();
    raw.send(&invoke_bytes("queued"));
    assert!(until(Duration::from_secs(10), || t
        .fake
        .waiting
        .load(Ordering::SeqCst)
        == 1));
    drop(raw);
    assert!(
        until(Duration::from_secs(5), || !t
            .fake
            .abandoned
            .lock()
            .unwrap()
            .is_empty()),
        "the waiting request was never taken back"
    );
    assert_eq!(
        t.fake.abandoned.lock().unwrap().as_slice(),
        [Abandoned::ClientGone]
    );

    // A half-close (the client is done sending) is not going away: it gets its answer.
    let mut raw = t.raw();
    raw.send(&invoke_bytes("running"));
    raw.s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(raw.response().status, 200);
    assert!(raw.closed());
    t.stop().unwrap();
}

#[test]
fn draining_refuses_what_has_not_started_and_lets_the_rest_finish() {
    let mut t = TestServer::start();
    let mut running = t.raw();
    running.send(&invoke_bytes("running"));
    let mut queued = t.raw();
    queued.send(&invoke_bytes("queued"));
    let mut idle = t.raw();
    assert!(until(Duration::from_secs(10), || t
        .fake
        .started
        .load(Ordering::SeqCst)
        == 2));

    t.shutdown.drain(Duration::from_secs(20));
    let r = queued.response();
    assert_eq!(r.status, 503, "{}", text(&r));
    assert_eq!(error_of(&r).error.kind, "unavailable");
    assert!(text(&r).contains("shutting down"), "{}", text(&r));
    assert_eq!(r.header("connection"), Some("close"));
    assert!(queued.closed());
    // New connections are refused; a request on an open one gets 503.
    assert!(until(Duration::from_secs(5), || StdStream::connect(
        &t.path
    )
    .is_err()));
    idle.send(b"GET /status HTTP/1.1\r\n\r\n");
    let r = idle.response();
    assert_eq!(
        (r.status, error_of(&r).error.kind.as_str()),
        (503, "unavailable")
    );
    // The running one finishes, then the server stops well before the grace.
    let r = running.response();
    assert_eq!(r.status, 200, "{}", text(&r));
    let started = Instant::now();
    let thread = t.thread.take().unwrap();
    thread.join().unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        t.fake.abandoned.lock().unwrap().as_slice(),
        [Abandoned::Draining]
    );
    assert!(!t.path.exists());
}

#[test]
fn draining_answers_every_request_it_began_to_read() {
    let mut t = TestServer::start();
    // Part of a head, and a head whose body has not all come.
    let mut half_head = t.raw();
    half_head.send(b"GET /status HTTP/1.1\r\nHo");
    let mut half_body = t.raw();
    half_body
        .send(b"POST /run/echo HTTP/1.1\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n");
    assert_eq!(half_body.response().status, 100);
    half_body.send(b"{\"a\"");
    // A request being handled, and one pipelined behind it.
    let mut pipelined = t.raw();
    let mut two = invoke_bytes("running");
    two.extend_from_slice(b"GET /status HTTP/1.1\r\n\r\n");
    pipelined.send(&two);
    assert!(until(Duration::from_secs(10), || t
        .fake
        .started
        .load(Ordering::SeqCst)
        == 1));

    t.shutdown.drain(Duration::from_secs(20));
    let r = pipelined.response();
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.header("connection"), Some("close"));
    let r = pipelined.response();
    assert_eq!(
        (r.status, error_of(&r).error.kind.as_str()),
        (503, "unavailable"),
        "{}",
        text(&r)
    );
    assert!(pipelined.closed());
    for (raw, what) in [(&mut half_body, "body"), (&mut half_head, "request head")] {
        let r = raw.response();
        assert_eq!(r.status, 503, "{what}: {}", text(&r));
        assert_eq!(r.header("connection"), Some("close"));
        assert!(
            text(&r).contains(&format!("{what} had not arrived in full")),
            "{}",
            text(&r)
        );
        assert!(raw.closed());
    }
    t.thread.take().unwrap().join().unwrap().unwrap();
}

#[test]
fn a_shared_result_is_sent_from_its_mapping() {
    let big = format!("\"{}\"", "x".repeat(200 << 10)).into_bytes();
    let inv = |result: ipc::Payload| {
        Ok(Response::Invoked(Invocation {
            activation_id: ipc::api::ActivationId::from_u128(1),
            result,
            raw: false,
            logs: logs("hi\n"),
            duration: Duration::from_micros(7),
            start: Start::Warm,
            http: None,
        }))
    };
    // The body is the payload itself: no copy in the agent.
    let out = reply::reply_for(
        inv(ipc::Payload::share(&big).unwrap()),
        &reply::Answer::default(),
    );
    assert!(out.body.is_shared());
    assert_eq!(&*out.body, &big[..]);
    // With the logs, the record holds the result once, as it was.
    let out = reply::reply_for(
        inv(ipc::Payload::share(&big).unwrap()),
        &reply::Answer {
            logs: true,
            ..Default::default()
        },
    );
    let record: InvocationRecord = serde_json::from_slice(&out.body).unwrap();
    assert_eq!(record.result.get().as_bytes(), &big[..]);
    assert_eq!((record.logs, record.duration_us), (logs("hi\n"), 7));
    assert_eq!((record.cold, record.start.as_str()), (false, "warm"));
}

#[test]
fn the_grace_ends_with_503_and_a_second_stop_ends_it_early() {
    for early in [false, true] {
        let mut t = TestServer::start();
        let mut stuck = t.raw();
        stuck.send(&invoke_bytes("stuck"));
        // The request reaches the handler before the drain begins.
        assert!(until(Duration::from_secs(5), || t
            .fake
            .started
            .load(Ordering::SeqCst)
            == 1));
        let started = Instant::now();
        if early {
            t.shutdown.drain(Duration::from_secs(60));
            t.shutdown.shutdown();
        } else {
            t.shutdown.drain(Duration::from_millis(100));
        }
        let r = stuck.response();
        let waited = started.elapsed();
        assert_eq!(r.status, 503, "{}", text(&r));
        let message = error_of(&r).error.message;
        if early {
            assert!(message.contains("cut off"), "{message}");
        } else {
            assert!(message.contains("grace of 100 ms"), "{message}");
        }
        assert!(waited < Duration::from_millis(2500), "{waited:?}");
        assert!(stuck.closed());
        t.thread.take().unwrap().join().unwrap().unwrap();
    }
}

#[test]
fn slow_heads_bodies_and_idle_connections_time_out() {
    let t = TestServer::with(
        Limits {
            read_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(600),
            ..Limits::default()
        },
        2,
    );
    let mut head = t.raw();
    head.send(b"GET /status HTTP/1.1\r\nHost: x");
    let mut body = t.raw();
    body.send(b"POST /run/echo HTTP/1.1\r\nContent-Length: 10\r\n\r\n{\"a\"");
    let mut idle = t.raw();
    let mut used = t.raw();
    used.send(b"GET /status HTTP/1.1\r\n\r\n");
    assert_eq!(used.response().status, 200);
    let started = Instant::now();

    let r = head.response();
    assert_eq!(
        (r.status, error_of(&r).error.kind.as_str()),
        (408, "request_timeout")
    );
    assert!(text(&r).contains("request head"), "{}", text(&r));
    assert!(head.closed());
    let r = body.response();
    assert_eq!(r.status, 408);
    assert!(text(&r).contains("request body"), "{}", text(&r));
    assert!(body.closed());
    // Idle ones are closed without a word, later.
    assert!(idle.closed());
    assert!(used.closed());
    assert!(started.elapsed() >= Duration::from_millis(500));

    // A head that keeps trickling in still has to be complete in time.
    let mut trickle = t.raw();
    let started = Instant::now();
    let mut refused = false;
    for b in b"GET /status HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
        if trickle.s.write_all(&[*b]).is_err() {
            refused = true;
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        refused,
        "still open after {:?} of a trickling head",
        started.elapsed()
    );
    let r = trickle.response();
    assert_eq!(r.status, 408);
}

#[test]
fn connections_past_the_cap_are_refused_at_once() {
    let t = TestServer::with(
        Limits {
            max_connections: 2,
            ..Limits::default()
        },
        2,
    );
    let mut a = t.raw();
    a.send(b"GET /status HTTP/1.1\r\n\r\n");
    assert_eq!(a.response().status, 200);
    let mut b = t.raw();
    b.send(b"GET /status HTTP/1.1\r\n\r\n");
    assert_eq!(b.response().status, 200);

    let mut c = t.raw();
    let r = c.response();
    assert_eq!(
        (r.status, error_of(&r).error.kind.as_str()),
        (503, "too_many_connections")
    );
    assert!(text(&r).contains("2 connections"), "{}", text(&r));
    assert!(c.closed());

    // The ones open still work; once one goes, a new one is served.
    a.send(b"GET /status HTTP/1.1\r\n\r\n");
    assert_eq!(a.response().status, 200);
    drop(b);
    assert!(until(Duration::from_secs(5), || {
        let mut d = t.raw();
        d.send(b"GET /status HTTP/1.1\r\n\r\n");
        d.response().status == 200
    }));
}

#[test]
fn run_hands_an_app_the_whole_request_and_sends_its_response_as_it_is() {
    let t = TestServer::start();
    let mut c = t.client();
    let r = c
        .request("PUT", "/run/app/a%20b/c?x=1&y", Some("text/csv"), b"a,b")
        .unwrap();
    assert_eq!(r.status, 418);
    assert_eq!(r.body, b"a,b");
    assert_eq!(r.header("a"), Some("B"));
    assert_eq!(
        r.header("content-type"),
        Some("text/plain"),
        "the app's, not sprout's"
    );
    assert_eq!(r.header("x-sprout-start"), Some("warm"));
    let seen = t.take_seen();
    let Request::Run {
        namespace,
        name,
        run,
        ..
    } = &seen[0]
    else {
        panic!("{seen:?}")
    };
    assert_eq!((namespace.as_str(), name.as_str()), ("default", "app"));
    let h = &run.request;
    assert_eq!(
        (
            h.method.as_str(),
            h.script_name.as_str(),
            h.path.as_str(),
            h.query.as_str()
        ),
        ("PUT", "/run/app", "/a%20b/c", "x=1&y")
    );
    assert!(h
        .headers
        .iter()
        .any(|(n, v)| n == "Content-Type" && v == "text/csv"));
    assert!(h.headers.iter().any(|(n, _)| n == "Host"));
    assert_eq!(run.body, b"a,b");

    // Namespaced, no rest of the path, and a query sprout does not know is the app's.
    let r = c
        .request("DELETE", "/namespaces/t/run/app?logs=maybe", None, b"")
        .unwrap();
    assert_eq!(r.status, 418);
    let seen = t.take_seen();
    let Request::Run { namespace, run, .. } = &seen[0] else {
        panic!("{seen:?}")
    };
    assert_eq!(namespace, "t");
    assert_eq!(
        (run.request.script_name.as_str(), run.request.path.as_str()),
        ("/namespaces/t/run/app", "")
    );
    // A trailing slash is a path of its own.
    c.request("GET", "/run/app/", None, b"").unwrap();
    let seen = t.take_seen();
    let Request::Run { run, .. } = &seen[0] else {
        panic!("{seen:?}")
    };
    assert_eq!(run.request.path, "/");
}

#[test]
fn a_method_triggers_http_refuses_gets_openlambdas_text() {
    let t = TestServer::start();
    let mut c = t.client();
    let r = c.request("PUT", "/run/getonly", None, b"").unwrap();
    assert_eq!(r.status, 405);
    assert_eq!(
        text(&r),
        "HTTP method not allowed. Sent: PUT, Allowed: [GET POST]\n"
    );
    assert_eq!(r.header("allow"), Some("GET, POST"));
    let r = c.request("GET", "/run/getonly", None, b"").unwrap();
    assert_eq!(r.status, 418);
}

#[path = "tcp_tests.rs"]
mod tcp;
