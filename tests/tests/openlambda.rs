//! OpenLambda's conventions through the real daemon: `ol.yaml` (its environment in
//! `os.environ`, `triggers.http` and the 405 it answers), HTTP apps behind
//! `/run/{name}[/path]` (WSGI and ASGI written by hand, found as `app` or named by
//! `OL_ENTRY_FILE` / `OL_WSGI_ENTRY`) whose status, headers and body come back as
//! they answered them, and plain `f(event)` functions on any method.
//!
//! And what a function could do to them (issue 13's review): a body answered to
//! `HEAD` never reaches the client (it would be read as the next response on the
//! connection), a `responded` to a plain invoke is refused, and an `ol.yaml` whose
//! aliases expand it past its bound is refused without the agent growing.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use sprout_tests::{body_json, json, require_root, text, Value};

const WSGI_APP: &str = r#"import json

def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path in ("", "/") and environ["REQUEST_METHOD"] == "GET":
        start_response("418 I'M A TEAPOT", [("A", "B"), ("Content-Type", "text/plain")])
        return [b"hi\n"]
    if path == "/echo":
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        start_response("200 OK", [("Content-Type", environ.get("CONTENT_TYPE", "x/unknown"))])
        return [body]
    if path == "/bad":
        start_response("200 OK", [("A", "x\r\nSet-Cookie: evil=1")])
        return [b"no"]
    keys = ("REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "HTTP_X_TEST")
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps({k: environ.get(k) for k in keys}).encode()]
"#;

const ASGI_APP: &str = r#"import json

class App:
    async def __call__(self, scope, receive, send):
        assert scope["type"] == "http", scope["type"]
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"][len(scope["root_path"]):]
        if path in ("", "/") and scope["method"] == "GET":
            status, headers, out = 418, [(b"a", b"B"), (b"content-type", b"text/plain")], b"hi\n"
        elif path == "/echo":
            ctype = dict(scope["headers"]).get(b"content-type", b"x/unknown")
            status, headers, out = 200, [(b"content-type", ctype)], body
        else:
            info = {
                "method": scope["method"],
                "root_path": scope["root_path"],
                "path": scope["path"],
                "query": scope["query_string"].decode(),
                "x_test": dict(scope["headers"]).get(b"x-test", b"").decode(),
            }
            status, headers, out = 200, [(b"content-type", b"application/json")], json.dumps(info).encode()
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": out})

app = App()
"#;

/// One raw request with `headers` on a new connection (the API client sends only its
/// own): the status, the head's text and the body.
fn raw(
    socket: &Path,
    method: &str,
    target: &str,
    headers: &str,
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let mut s = UnixStream::connect(socket).unwrap();
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: sprout\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let at = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&out[..at]).into_owned();
    let status = head[9..12].parse().unwrap();
    (status, head, out[at + 4..].to_vec())
}

/// The two ways an app is written answer the same requests the same way.
fn check_app(d: &sprout_tests::Daemon, name: &str) {
    // The teapot: status, header and body as the app answered them.
    let r = d.request("GET", &format!("/run/{name}"), None, b"");
    assert_eq!(r.status, 418, "{}", text(&r));
    assert_eq!(r.header("a"), Some("B"));
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert_eq!(r.body, b"hi\n");
    assert!(r.header("x-sprout-start").is_some());

    // POST bodies are echoed, text and JSON.
    for (ctype, body) in [
        ("text/plain", &b"hello, app"[..]),
        ("application/json", br#"{"a":[1,2]}"#),
    ] {
        let r = d.request("POST", &format!("/run/{name}/echo"), Some(ctype), body);
        assert_eq!(r.status, 200, "{}", text(&r));
        assert_eq!(r.body, body);
        assert_eq!(r.header("content-type"), Some(ctype));
    }
}

#[test]
fn a_wsgi_app_gets_the_whole_request_and_answers_as_it_likes() {
    let env = require_root!();
    let d = env.daemon();
    let dir = env.function("wsgi", &[("f.py", WSGI_APP)]);
    d.register("wsgi", &dir, json!({}));
    check_app(&d, "wsgi");

    let (status, _, body) = raw(
        d.socket(),
        "PATCH",
        "/run/wsgi/env/x%20y?q=1&r=2",
        "X-Test: yes\r\n",
        b"",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let seen: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        seen,
        json!({"REQUEST_METHOD": "PATCH", "SCRIPT_NAME": "/run/wsgi", "PATH_INFO": "/env/x y",
               "QUERY_STRING": "q=1&r=2", "HTTP_X_TEST": "yes"})
    );

    // A header that would split the response is refused; the instance stays.
    let r = d.request("GET", "/run/wsgi/bad", None, b"");
    assert_eq!(r.status, 502, "{}", text(&r));
    let e = body_json(&r);
    assert_eq!(e["error"]["kind"], "bad_result", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("control character"),
        "{e}"
    );
    let r = d.request("GET", "/run/wsgi", None, b"");
    assert_eq!((r.status, r.header("x-sprout-start")), (418, Some("warm")));

    // The JSON invoke route is not the app's: it says how to call it.
    let r = d.invoke("wsgi", "{}");
    assert_eq!(r.status, 502);
    assert!(text(&r).contains("is an HTTP app (wsgi)"), "{}", text(&r));
}

#[test]
fn an_asgi_app_gets_the_whole_request_and_answers_as_it_likes() {
    let env = require_root!();
    let d = env.daemon();
    let dir = env.function("asgi", &[("f.py", ASGI_APP)]);
    d.register("asgi", &dir, json!({}));
    check_app(&d, "asgi");

    let (status, _, body) = raw(
        d.socket(),
        "DELETE",
        "/run/asgi/x%20y/z?q=1",
        "X-Test: yes\r\n",
        b"",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let seen: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        seen,
        json!({"method": "DELETE", "root_path": "/run/asgi", "path": "/run/asgi/x y/z",
               "query": "q=1", "x_test": "yes"})
    );
}

#[test]
fn ol_entry_file_and_ol_wsgi_entry_name_the_app() {
    let env = require_root!();
    let d = env.daemon();
    let main = r#"import os

def my_wsgi_app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [("Hello from main.py! " + os.environ["GREETING"] + "\n").encode()]
"#;
    let ol =
        "environment:\n  OL_ENTRY_FILE: main.py\n  OL_WSGI_ENTRY: my_wsgi_app\n  GREETING: hi\n";
    let dir = env.function("entry", &[("main.py", main), ("ol.yaml", ol)]);
    let info = d.register("entry", &dir, json!({}));
    assert_eq!(info["runtime"], "python", "{info}");
    assert_eq!(info["handler"], "main:f", "{info}");
    let r = d.request("GET", "/run/entry", None, b"");
    assert_eq!(
        (r.status, text(&r).as_str()),
        (200, "Hello from main.py! hi\n")
    );
    assert_eq!(r.header("content-type"), Some("text/plain"));
}

#[test]
fn ol_yaml_environment_and_http_triggers() {
    let env = require_root!();
    let d = env.daemon();
    let f = r#"import os

AT_IMPORT = os.environ.get("MY_ENV_VAR")

def f(event):
    keys = ("MY_ENV_VAR", "DEBUG_MODE", "PORT", "CUSTOM_PATH")
    return {"env": {k: os.environ.get(k) for k in keys}, "at_import": AT_IMPORT, "event": event}
"#;
    let ol = "triggers:\n  http:\n    - method: GET\n    - method: POST\n  cron:\n    - schedule: '*/5 * * * *'\nenvironment:\n  MY_ENV_VAR: Hello from environment\n  DEBUG_MODE: true\n  PORT: 8080\n  CUSTOM_PATH: /usr/local/bin\nreuse-sandbox: true\n";
    let dir = env.function("envf", &[("f.py", f), ("ol.yaml", ol)]);
    d.register("envf", &dir, json!({}));

    // GET with no body: the event is {}; the environment was there at import.
    let r = d.request("GET", "/run/envf", None, b"");
    assert_eq!(r.status, 200, "{}", text(&r));
    let out = body_json(&r);
    assert_eq!(
        out,
        json!({"env": {"MY_ENV_VAR": "Hello from environment", "DEBUG_MODE": "true",
                       "PORT": "8080", "CUSTOM_PATH": "/usr/local/bin"},
               "at_import": "Hello from environment", "event": {}})
    );
    let r = d.request("POST", "/run/envf/any/path", None, br#"{"a":1}"#);
    assert_eq!(body_json(&r)["event"], json!({"a": 1}));

    // Other methods: OpenLambda's 405, its text exactly.
    for method in ["PUT", "DELETE"] {
        let r = d.request(method, "/run/envf", None, b"");
        assert_eq!(r.status, 405);
        assert_eq!(
            text(&r),
            format!("HTTP method not allowed. Sent: {method}, Allowed: [GET POST]\n")
        );
        assert_eq!(r.header("allow"), Some("GET, POST"));
    }
    // A plain function's body must be JSON.
    let r = d.request("POST", "/run/envf", None, b"not json");
    assert_eq!(r.status, 400);
    assert_eq!(body_json(&r)["error"]["kind"], "invalid_event");
}

#[test]
fn a_plain_function_takes_any_method_without_triggers() {
    let env = require_root!();
    let d = env.daemon();
    let dir = env.function("echo", &[("f.py", "def f(event):\n    return event\n")]);
    d.register("echo", &dir, json!({}));
    for method in ["GET", "PUT", "DELETE", "OPTIONS"] {
        let r = d.request(method, "/run/echo", None, b"");
        assert_eq!((r.status, text(&r).as_str()), (200, "{}"), "{method}");
        assert_eq!(r.header("content-type"), Some("application/json"));
    }
    let r = d.request("POST", "/run/echo", None, b"[1,2]");
    assert_eq!(text(&r), "[1,2]");
    // Warm, so through the event loop's fast path too.
    let r = d.request("GET", "/run/echo/sub", None, b"");
    assert_eq!(
        (text(&r).as_str(), r.header("x-sprout-start")),
        ("{}", Some("warm"))
    );
}

#[test]
fn a_bad_ol_yaml_is_refused_at_registration() {
    let env = require_root!();
    let d = env.daemon();
    for (name, ol, expect) in [
        ("list", "environment:\n  A: [1, 2]\n", "line 2"),
        ("yaml", "environment: {A: b\n", "ol.yaml in "),
        (
            "reserved",
            "environment:\n  SPROUT_FUNCTION: x\n",
            "is reserved",
        ),
        ("badname", "environment:\n  A-B: x\n", "is not a name"),
        (
            "method",
            "triggers:\n  http:\n    - method: 'G T'\n",
            "triggers.http[0].method",
        ),
        (
            "entry",
            "environment:\n  OL_ENTRY_FILE: ../x.py\n",
            "OL_ENTRY_FILE",
        ),
    ] {
        let dir = env.function(
            name,
            &[("f.py", "def f(e):\n    return e\n"), ("ol.yaml", ol)],
        );
        let r = d.request(
            "PUT",
            &format!("/functions/{name}"),
            Some("application/json"),
            json!({"path": dir}).to_string().as_bytes(),
        );
        assert_eq!(r.status, 400, "{name}: {}", text(&r));
        let message = body_json(&r)["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(message.contains("ol.yaml"), "{name}: {message}");
        assert!(message.contains(expect), "{name}: {message}");
        let r = d.request("GET", &format!("/run/{name}"), None, b"");
        assert_eq!(r.status, 404, "{name}: nothing registered");
    }
}

/// On one keep-alive connection: `HEAD target`, then, once its response's head has
/// arrived, `GET target`. Returns the HEAD's head and everything read after it, which
/// must be the GET's response and nothing else.
fn head_then_get(socket: &Path, target: &str) -> (String, Vec<u8>) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "HEAD {target} HTTP/1.1\r\nHost: sprout\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let end = loop {
        if let Some(at) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).expect("the HEAD's response");
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    };
    // A body sent after the head (if any) has had time to arrive by now.
    std::thread::sleep(Duration::from_millis(200));
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: sprout\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    s.read_to_end(&mut got).unwrap();
    let head = String::from_utf8_lossy(&got[..end]).into_owned();
    (head, got[end..].to_vec())
}

/// A response's status, a header and its body, parsed from `bytes`, which must hold
/// exactly one response.
fn one_response(bytes: &[u8], header: &str) -> (u16, Option<String>, Vec<u8>) {
    let text = String::from_utf8_lossy(bytes);
    assert!(text.starts_with("HTTP/1.1 "), "not a response: {text:?}");
    let end = text.find("\r\n\r\n").expect("a head") + 4;
    let value = |name: &str| {
        text[..end].lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    };
    let len: usize = value("content-length").unwrap().parse().unwrap();
    assert_eq!(
        bytes.len(),
        end + len,
        "one response, framed by its length: {text:?}"
    );
    (
        text[9..12].parse().unwrap(),
        value(header),
        bytes[end..].to_vec(),
    )
}

fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("Content-Length")
        .parse()
        .unwrap()
}

#[test]
fn a_head_is_answered_without_a_body_whatever_the_function_answers() {
    let env = require_root!();
    let d = env.daemon();
    // The app answers HEAD with a body; so does a plain function (its result).
    let app = "def app(environ, start_response):\n    start_response('200 OK', [('Content-Type', 'text/plain'), ('X-Method', environ['REQUEST_METHOD'])])\n    return [b'the body the app sends on every method\\n']\n";
    let dir = env.function("headapp", &[("f.py", app)]);
    d.register("headapp", &dir, json!({}));
    let dir = env.function(
        "headplain",
        &[(
            "f.py",
            "def f(event):\n    return {'a': 'result of a plain function'}\n",
        )],
    );
    d.register("headplain", &dir, json!({}));
    // Twice each: a new sandbox, then a warm one (the event loop's fast path).
    for (name, header, get_body) in [
        (
            "headapp",
            "x-method",
            &b"the body the app sends on every method\n"[..],
        ),
        (
            "headplain",
            "content-type",
            br#"{"a":"result of a plain function"}"#,
        ),
    ] {
        for round in 0..2 {
            let (head, rest) = head_then_get(d.socket(), &format!("/run/{name}"));
            assert!(head.starts_with("HTTP/1.1 200 "), "{name}: {head}");
            // Content-Length is the body the GET gets (RFC 9110 §8.6); none is sent.
            assert_eq!(content_length(&head), get_body.len(), "{name}: {head}");
            let (status, value, body) = one_response(&rest, header);
            assert_eq!(status, 200, "{name} round {round}");
            assert_eq!(body, get_body, "{name} round {round}");
            if name == "headapp" {
                assert!(head.contains("X-Method: HEAD\r\n"), "{head}");
                assert_eq!(value.as_deref(), Some("GET"));
            }
        }
    }
    // An error answered to a HEAD has no body either (here the router's 405).
    let (head, rest) = head_then_get(d.socket(), "/status");
    assert!(head.starts_with("HTTP/1.1 405 "), "{head}");
    assert!(content_length(&head) > 0, "{head}");
    let (status, _, body) = one_response(&rest, "content-type");
    assert_eq!(status, 200);
    assert!(serde_json::from_slice::<Value>(&body).is_ok());
}

#[test]
fn a_responded_answer_to_a_plain_invoke_is_refused() {
    let env = require_root!();
    let d = env.daemon();
    // An HTTP app that answers every frame `responded`, with a status, headers and a
    // body of its choice, whatever it was asked.
    let app = r#"import sys

# The runtime's instance module (the frame importing this one is in it): its
# `serve` is replaced before it is called.
_frame = sys._getframe()
while "_recv_no_fds" not in _frame.f_globals:
    _frame = _frame.f_back
_runtime = _frame.f_globals

def _serve(channel, handler):
    while True:
        header, _ = _runtime["_recv_no_fds"](channel)
        channel.send({"op": "responded", "id": header.get("id"), "status": 299,
                      "headers": [["X-Chosen", "by the instance"]]}, b"not JSON")

_runtime["serve"] = _serve

def app(environ, start_response):
    start_response("200 OK", [])
    return [b""]
"#;
    let dir = env.function("responder", &[("f.py", app)]);
    d.register("responder", &dir, json!({}));
    // Its answer to an http request is its to choose.
    let r = d.request("GET", "/run/responder", None, b"");
    assert_eq!(
        (r.status, r.header("x-chosen")),
        (299, Some("by the instance")),
        "{}",
        text(&r)
    );
    assert_eq!(r.body, b"not JSON");
    // Not to an invoke: the JSON route's answer is the agent's.
    let r = d.invoke("responder", "{}");
    assert_eq!(r.status, 500, "{}", text(&r));
    assert_eq!(r.header("x-chosen"), None);
    let e = body_json(&r);
    let message = e["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("Responded"), "{e}");
    assert!(
        message.contains("responded answers only an http request"),
        "{e}"
    );
}

/// The agent's peak resident memory, KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[test]
fn an_ol_yaml_that_aliases_expand_is_refused_without_growing_the_agent() {
    let env = require_root!();
    let d = env.daemon();
    // 64 KiB: one 32 KiB anchored value named by an alias in each of 2,500 or more
    // variables, over 80 MiB once expanded.
    let mut ol = format!("anchor: &b \"{}\"\nenvironment:\n", "x".repeat(32 << 10));
    let mut i = 0;
    while ol.len() + 20 < 64 << 10 {
        ol.push_str(&format!("  V{i}: *b\n"));
        i += 1;
    }
    let dir = env.function(
        "bomb",
        &[("f.py", "def f(e):\n    return e\n"), ("ol.yaml", &ol)],
    );
    let before = peak_rss_kib(d.pid());
    let started = Instant::now();
    let r = d.request(
        "PUT",
        "/functions/bomb",
        Some("application/json"),
        json!({"path": dir}).to_string().as_bytes(),
    );
    let took = started.elapsed();
    assert_eq!(r.status, 400, "{}", text(&r));
    let message = body_json(&r)["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("ol.yaml in "), "{message}");
    assert!(message.contains("aliases"), "{message}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let grown = peak_rss_kib(d.pid()).saturating_sub(before);
    assert!(grown < 16 << 10, "the agent's peak RSS grew by {grown} KiB");
    let r = d.request("GET", "/run/bomb", None, b"");
    assert_eq!(r.status, 404, "nothing registered");
}
