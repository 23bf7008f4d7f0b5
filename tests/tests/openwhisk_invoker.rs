//! `sprout serve` as an OpenWhisk invoker: `POST /invoke` with an
//! `ActivationMessage` on the TCP listener, the early acknowledgement observed on
//! the wire (the head arrives before the body; the gap is measured), the
//! acknowledgement's shapes, the refusals before any acknowledgement (401, 403,
//! 400), `GET /ping`, and `--whisks-db`: an action fetched from a CouchDB (express-
//! pouchdb over PouchDB's in-memory adapter, started here on loopback) with a
//! `mem:` attachment, and non-blocking records written to its `activations`.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use sprout_tests::{json, require_root, text, under_ci, wait_for, workspace_root, Env, Value};

const ALPHA: &str =
    "3f2c7a1e-0001-4c4e-9a55-000000000001:alpha-secret-0123456789abcdef0123456789ab";
const STAR: &str = "3f2c7a1e-00ff-4c4e-9a55-0000000000ff:controller-secret-0123456789abcdef012345";
const POUCHDB: &str = "/opt/sprout-ci/pouchdb";

const SLOW_ECHO_PY: &str =
    "import time\n\ndef f(event):\n    time.sleep(event.get(\"sleep_ms\", 0) / 1000)\n    return event\n";

fn keys(env: &Env) -> PathBuf {
    let path = env.work_dir().join("keys");
    fs::write(&path, format!("alpha {ALPHA}\n* {STAR}\n")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    path
}

const STANDARD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const URL_SAFE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Base64 of `bytes` with the alphabet `table`, padded.
fn base64(bytes: &[u8], table: &[u8; 64]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(table[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn basic(credentials: &str) -> String {
    format!("Basic {}", base64(credentials.as_bytes(), STANDARD))
}

/// An `ActivationMessage` of namespace `ns` for `action` (`ns/name`), id `id`.
fn message(ns: &str, action: &str, id: u128, blocking: bool, content: Value) -> Value {
    let (path, name) = action.rsplit_once('/').unwrap();
    json!({
        "transid": [format!("tid-{id}"), 1700000000000_u64],
        "action": {"path": path, "name": name, "version": "0.0.1"},
        "revision": null,
        "user": {"subject": format!("{ns}-user"), "namespace": {"name": ns, "uuid": "4c1d0a6e"},
                 "authkey": {"api_key": "4c1d0a6e:key"}, "rights": ["READ", "ACTIVATE"],
                 "limits": {}},
        "activationId": format!("{id:032x}"),
        "rootControllerIndex": {"asString": "0", "instanceType": "controller"},
        "blocking": blocking,
        "content": content
    })
}

/// What one `POST /invoke` got: the head, when it and the body's end arrived after
/// the request was sent, and the body (de-chunked).
struct Answer {
    head: String,
    to_head: Duration,
    to_body: Duration,
    body: Vec<u8>,
}

impl Answer {
    fn ack(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

fn read_until(s: &mut TcpStream, buf: &mut Vec<u8>, end: &[u8]) -> Instant {
    let mut chunk = [0u8; 8192];
    while !buf.windows(end.len()).any(|w| w == end) {
        let n = s.read(&mut chunk).expect("read");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(buf));
        buf.extend_from_slice(&chunk[..n]);
    }
    Instant::now()
}

/// `POST /invoke` on a kept connection `s`.
fn invoke(s: &mut TcpStream, key: &str, msg: &Value) -> Answer {
    let body = msg.to_string();
    let req = format!(
        "POST /invoke HTTP/1.1\r\nHost: sprout\r\nAuthorization: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        basic(key),
        body.len()
    );
    let sent = Instant::now();
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let at_head = read_until(s, &mut buf, b"\r\n\r\n");
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut rest = buf[split..].to_vec();
    if !head.contains("Transfer-Encoding: chunked") {
        // A refusal: a Content-Length body.
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        while rest.len() < len {
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0);
            rest.extend_from_slice(&chunk[..n]);
        }
        return Answer {
            head,
            to_head: at_head - sent,
            to_body: at_head - sent,
            body: rest,
        };
    }
    let at_body = read_until(s, &mut rest, b"\r\n0\r\n\r\n");
    let text = String::from_utf8(rest).unwrap();
    let (size, tail) = text.split_once("\r\n").unwrap();
    let size = usize::from_str_radix(size, 16).unwrap();
    Answer {
        head,
        to_head: at_head - sent,
        to_body: at_body - sent,
        body: tail.as_bytes()[..size].to_vec(),
    }
}

fn connect(d: &sprout_tests::Daemon) -> TcpStream {
    let s = TcpStream::connect(d.tcp_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

fn register_in(d: &sprout_tests::Daemon, ns: &str, name: &str, dir: &Path) {
    let body = json!({ "path": dir.to_str().unwrap() }).to_string();
    let r = d.request(
        "PUT",
        &format!("/namespaces/{ns}/functions/{name}"),
        Some("application/json"),
        body.as_bytes(),
    );
    assert_eq!(r.status, 200, "register {ns}/{name}: {}", text(&r));
}

fn serve(env: &Env, extra: &[&str]) -> sprout_tests::Daemon {
    let auth = keys(env);
    let mut args = vec![
        "--stem-cells",
        "0",
        "--listen",
        "127.0.0.1:0",
        "--auth",
        auth.to_str().unwrap(),
        "--invoker-id",
        "3",
        "--user-memory",
        "2048",
    ];
    args.extend_from_slice(extra);
    env.daemon_with(&args)
}

/// Works on this branch alone: nothing here runs an action.
#[test]
fn ping_and_every_refusal_come_before_any_acknowledgement() {
    let env = require_root!();
    let d = serve(&env, &[]);
    let mut s = connect(&d);
    s.write_all(
        format!(
            "GET /ping HTTP/1.1\r\nAuthorization: {}\r\n\r\n",
            basic(ALPHA)
        )
        .as_bytes(),
    )
    .unwrap();
    let mut buf = Vec::new();
    read_until(&mut s, &mut buf, b"{\"ok\":true}");
    assert!(buf.starts_with(b"HTTP/1.1 200 OK\r\n"));

    let wrong = format!(
        "{}:not-the-secret-0123456789abcdef0123456789",
        ALPHA.split_once(':').unwrap().0
    );
    let cases = [
        (
            wrong.as_str(),
            message("alpha", "alpha/echo", 1, true, json!({})),
            401,
            "unauthorized",
        ),
        (
            ALPHA,
            message("beta", "beta/echo", 2, true, json!({})),
            403,
            "its own namespace",
        ),
        (
            ALPHA,
            json!({"transid": "x"}),
            400,
            "not an ActivationMessage",
        ),
        (
            STAR,
            message("alpha", "alpha/echo", 3, true, json!(42)),
            400,
            "content must be",
        ),
    ];
    for (key, msg, status, says) in cases {
        let mut s = connect(&d);
        let a = invoke(&mut s, key, &msg);
        assert!(
            a.head.starts_with(&format!("HTTP/1.1 {status} ")),
            "{}",
            a.head
        );
        let body = String::from_utf8_lossy(&a.body);
        assert!(body.contains(says), "{status}: {body}");
    }

    // Encrypted parameters: acknowledged, an application error that says why.
    let mut msg = message("alpha", "alpha/echo", 4, true, json!({"p": "c2VjcmV0"}));
    msg["lockedArgs"] = json!({"p": "aes-key-1"});
    let a = invoke(&mut s, STAR, &msg);
    let ack = a.ack();
    assert_eq!(ack["response"]["response"]["statusCode"], 1, "{ack}");
    assert!(ack["response"]["response"]["result"]["error"]
        .as_str()
        .unwrap()
        .contains("does not decrypt"));
    assert_eq!(
        ack["invoker"],
        json!({"instance": 3, "userMemory": "2048 MB"})
    );
    assert_eq!(d.status()["invocations"], 0, "nothing ran");
}

/// Needs `Request::Activate` (issue 15, slice 1).
#[test]
fn invoke_acknowledges_early_then_answers_the_activation() {
    let env = require_root!();
    let d = serve(&env, &["--ack-key", "instance"]);
    register_in(
        &d,
        "alpha",
        "echo",
        &env.function("echo", &[("f.py", SLOW_ECHO_PY)]),
    );
    let mut s = connect(&d);
    // Warm it first.
    let a = invoke(
        &mut s,
        STAR,
        &message("alpha", "alpha/echo", 10, true, json!({})),
    );
    assert_eq!(
        a.ack()["response"]["response"]["statusCode"],
        0,
        "{}",
        a.ack()
    );

    let mut gaps = Vec::new();
    for i in 0..3 {
        let msg = message(
            "alpha",
            "alpha/echo",
            11 + i,
            true,
            json!({"sleep_ms": 300, "n": i as u64}),
        );
        let a = invoke(&mut s, ALPHA, &msg);
        assert!(a.head.starts_with("HTTP/1.1 200 OK\r\n"), "{}", a.head);
        assert!(
            a.head.contains("Content-Type: application/json\r\n"),
            "{}",
            a.head
        );
        assert!(
            a.to_head < Duration::from_millis(250),
            "head after {:?}",
            a.to_head
        );
        assert!(
            a.to_body >= a.to_head + Duration::from_millis(280),
            "{:?} {:?}",
            a.to_head,
            a.to_body
        );
        gaps.push((a.to_head, a.to_body));
        let ack = a.ack();
        assert_eq!(
            ack["transid"],
            json!([format!("tid-{}", 11 + i), 1700000000000_u64])
        );
        assert_eq!(ack["isSystemError"], false);
        assert_eq!(ack["instance"]["instance"], 3);
        assert_eq!(ack["instance"]["instanceType"], "invoker");
        let activation = &ack["response"];
        assert_eq!(activation["activationId"], format!("{:032x}", 11 + i));
        assert_eq!(activation["namespace"], "alpha");
        assert_eq!(activation["name"], "echo");
        assert_eq!(activation["response"]["result"]["n"], i as u64);
    }
    eprintln!("early acknowledgement, body (request to each): {gaps:?}");

    // Non-blocking: the id alone; an unknown action: OpenWhisk's application error.
    let a = invoke(
        &mut s,
        STAR,
        &message("alpha", "alpha/echo", 20, false, json!({})),
    );
    assert_eq!(a.ack()["response"], format!("{:032x}", 20));
    let a = invoke(
        &mut s,
        STAR,
        &message("alpha", "alpha/nothing", 21, true, json!({})),
    );
    let ack = a.ack();
    assert_eq!(ack["isSystemError"], false);
    assert_eq!(ack["response"]["response"]["statusCode"], 1);
    assert_eq!(
        ack["response"]["response"]["result"]["error"],
        "Action could not be found or may have been deleted."
    );
}

/// The CouchDB-compatible server, stopped when dropped.
struct Couch {
    child: Child,
    _stdin: ChildStdin,
    url: String,
}

impl Drop for Couch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn couch() -> Option<Couch> {
    if !Path::new(POUCHDB)
        .join("node_modules/express-pouchdb")
        .is_dir()
    {
        let why = format!("{POUCHDB} is missing: run .ci/setup");
        assert!(
            !under_ci(),
            "{why} (CI is set: a skipped test is a failure)"
        );
        eprintln!("skipped: {why}");
        return None;
    }
    let mut child = Command::new("/usr/bin/node")
        .arg(workspace_root().join("tests/openwhisk/couchdb.js"))
        .env("SPROUT_POUCHDB", POUCHDB)
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start node");
    let stdin = child.stdin.take().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .trim()
        .strip_prefix("listening ")
        .expect("a port")
        .to_owned();
    Some(Couch {
        child,
        _stdin: stdin,
        url: format!("http://127.0.0.1:{port}"),
    })
}

/// `curl` as the controller's side of the database.
fn curl(method: &str, url: &str, body: Option<&Value>) -> Value {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-X", method, url]);
    if let Some(b) = body {
        cmd.args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &b.to_string(),
        ]);
    }
    let out = cmd.output().expect("curl");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{method} {url}: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Needs `Request::PutAction` (slice 2) and `Request::Activate` (slice 1).
#[test]
fn an_action_with_a_mem_attachment_is_fetched_run_and_its_record_stored() {
    let env = require_root!();
    let Some(couch) = couch() else { return };
    curl("PUT", &format!("{}/whisks", couch.url), None);
    curl("PUT", &format!("{}/activations", couch.url), None);
    let code =
        "def main(args):\n    return {\"greeting\": \"hello \" + args.get(\"name\", \"?\")}\n";
    let encoded = base64(code.as_bytes(), URL_SAFE)
        .trim_end_matches('=')
        .to_owned();
    let doc = json!({
        "namespace": "alpha", "name": "greet", "entityType": "action", "version": "0.0.1",
        "publish": false,
        "exec": {"kind": "python:3", "binary": false,
                 "code": {"attachmentName": format!("mem:{encoded}"), "attachmentType": "text/plain",
                          "length": code.len()}},
        "limits": {"timeout": 60000, "memory": 256, "logs": 10, "concurrency": 1},
        "parameters": [], "annotations": []
    });
    let put = curl(
        "PUT",
        &format!("{}/whisks/alpha%2Fgreet", couch.url),
        Some(&doc),
    );
    let rev = put["rev"].as_str().unwrap().to_owned();
    let d = serve(&env, &["--whisks-db", &couch.url]);
    let mut s = connect(&d);
    let mut msg = message("alpha", "alpha/greet", 30, true, json!({"name": "world"}));
    msg["revision"] = json!(rev);
    let ack = invoke(&mut s, STAR, &msg).ack();
    assert_eq!(
        ack["response"]["response"]["result"],
        json!({"greeting": "hello world"}),
        "{ack}"
    );

    // Non-blocking: the id, and the record in `activations` as `alpha/<id>`.
    let mut msg = message("alpha", "alpha/greet", 31, false, json!({"name": "couch"}));
    msg["revision"] = json!(rev);
    assert_eq!(
        invoke(&mut s, STAR, &msg).ack()["response"],
        format!("{:032x}", 31)
    );
    let id = format!("alpha%2F{:032x}", 31);
    let record = wait_for(Duration::from_secs(10), || {
        let doc = curl("GET", &format!("{}/activations/{id}", couch.url), None);
        if doc.get("error").is_some() {
            Err(doc)
        } else {
            Ok(doc)
        }
    })
    .unwrap_or_else(|e| panic!("no record: {e}"));
    assert_eq!(record["entityType"], "activation");
    assert_eq!(
        record["response"]["result"],
        json!({"greeting": "hello couch"})
    );
    // An action the database does not have: OpenWhisk's application error.
    let ack = invoke(
        &mut s,
        STAR,
        &message("alpha", "alpha/absent", 32, true, json!({})),
    )
    .ack();
    assert_eq!(ack["response"]["response"]["statusCode"], 1, "{ack}");
}
