//! OpenLambda's conventions through the real daemon: `ol.yaml` (its environment in
//! `os.environ`, `triggers.http` and the 405 it answers), HTTP apps behind
//! `/run/{name}[/path]` (WSGI and ASGI written by hand, found as `app` or named by
//! `OL_ENTRY_FILE` / `OL_WSGI_ENTRY`) whose status, headers and body come back as
//! they answered them, and plain `f(event)` functions on any method.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

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
