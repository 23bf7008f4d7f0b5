//! The controller's side of sprout's OpenWhisk invoker contract, for the tests that
//! play OpenWhisk's controller: key files for `--auth`, HTTP basic credentials,
//! `ActivationMessage`s, and `POST /invoke` on the wire with the early
//! acknowledgement (the head) and the body (the completion) read apart, timed; and
//! a CouchDB-compatible server standing for OpenWhisk's database.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::{under_ci, workspace_root, Daemon, Env};

/// Writes the key file `<work>/<name>` (`--auth`) holding `text`, with `mode`.
pub fn key_file(env: &Env, name: &str, text: &str, mode: u32) -> PathBuf {
    let path = env.work_dir().join(name);
    fs::write(&path, text).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    path
}

/// `Basic <base64 of credentials>`: how OpenWhisk's clients send a `UUID:KEY`.
pub fn basic_auth(credentials: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(credentials)
    )
}

/// An `ActivationMessage` of namespace `ns` for `action` (`ns/name`), with the
/// activation id `id` (32 hex digits) and the transaction id `tid-<id>`.
pub fn activation_message(
    ns: &str,
    action: &str,
    id: u128,
    blocking: bool,
    content: Value,
) -> Value {
    let (path, name) = action.rsplit_once('/').expect("an action is ns/name");
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

/// A connection to the daemon's TCP listener that gives up reading after 60 s.
pub fn connect(d: &Daemon) -> TcpStream {
    let s = TcpStream::connect(d.tcp_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

/// What one `POST /invoke` got: the head, when it and the body's end arrived after
/// the request was sent, and the body (de-chunked).
pub struct Answer {
    pub head: String,
    pub to_head: Duration,
    pub to_body: Duration,
    pub body: Vec<u8>,
}

impl Answer {
    /// The body as JSON (the acknowledgement, or a refusal).
    pub fn ack(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

/// The head of a `POST /invoke` answer, read up to its blank line, and what came
/// after it.
pub struct Head {
    pub text: String,
    pub sent: Instant,
    pub at: Instant,
    rest: Vec<u8>,
}

/// Reads from `s` into `buf` until `buf` holds `end`; `UnexpectedEof` when the peer
/// closes first.
pub fn read_until(s: &mut TcpStream, buf: &mut Vec<u8>, end: &[u8]) -> io::Result<Instant> {
    let mut chunk = [0u8; 8192];
    while !buf.windows(end.len()).any(|w| w == end) {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("closed after {:?}", String::from_utf8_lossy(buf)),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(Instant::now())
}

/// Sends `POST /invoke` with `msg` and `key` on `s` and reads the answer's head.
pub fn send_invoke(s: &mut TcpStream, key: &str, msg: &Value) -> io::Result<Head> {
    let body = msg.to_string();
    let req = format!(
        "POST /invoke HTTP/1.1\r\nHost: sprout\r\nAuthorization: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        basic_auth(key),
        body.len()
    );
    let sent = Instant::now();
    s.write_all(req.as_bytes())?;
    let mut buf = Vec::new();
    let at = read_until(s, &mut buf, b"\r\n\r\n")?;
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    Ok(Head {
        text: String::from_utf8_lossy(&buf[..split]).into_owned(),
        sent,
        at,
        rest: buf[split..].to_vec(),
    })
}

/// Reads the body that follows `head` on `s`: the one chunk of an acknowledged
/// activation, or the `Content-Length` body of a refusal. `UnexpectedEof` when the
/// invoker goes away first.
pub fn read_body(s: &mut TcpStream, head: Head) -> io::Result<Answer> {
    let mut rest = head.rest;
    if !head.text.contains("Transfer-Encoding: chunked") {
        let len: usize = head
            .text
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        while rest.len() < len {
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            rest.extend_from_slice(&chunk[..n]);
        }
        return Ok(Answer {
            to_head: head.at - head.sent,
            to_body: head.at - head.sent,
            head: head.text,
            body: rest,
        });
    }
    let at_body = read_until(s, &mut rest, b"\r\n0\r\n\r\n")?;
    let text = String::from_utf8(rest).expect("a UTF-8 body");
    let (size, tail) = text.split_once("\r\n").expect("a chunk");
    let size = usize::from_str_radix(size, 16).expect("a chunk size");
    Ok(Answer {
        to_head: head.at - head.sent,
        to_body: at_body - head.sent,
        head: head.text,
        body: tail.as_bytes()[..size].to_vec(),
    })
}

/// `POST /invoke` on a kept connection `s`: the whole answer; panics when the
/// invoker closes the connection before it.
#[track_caller]
pub fn invoke(s: &mut TcpStream, key: &str, msg: &Value) -> Answer {
    send_invoke(s, key, msg)
        .and_then(|head| read_body(s, head))
        .unwrap_or_else(|e| panic!("POST /invoke {}: {e}", msg["activationId"]))
}

/// Where `.ci/setup` installs express-pouchdb and PouchDB's in-memory adapter.
pub const POUCHDB: &str = "/opt/sprout-ci/pouchdb";

/// A CouchDB-compatible server (express-pouchdb over PouchDB's in-memory adapter,
/// `tests/openwhisk/couchdb.js`) on loopback, standing for OpenWhisk's database;
/// stopped (its stdin closed, then killed by pid) when dropped.
pub struct Couch {
    child: Child,
    _stdin: ChildStdin,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Drop for Couch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Couch {
    /// Starts the server, or `None` (a skip, said on stderr; a failure under
    /// `CI=true`) without node or the modules.
    pub fn start() -> Option<Couch> {
        let modules = Path::new(POUCHDB).join("node_modules/express-pouchdb");
        if !modules.is_dir() || !Path::new("/usr/bin/node").is_file() {
            let why = format!(
                "{} or /usr/bin/node is missing: run .ci/setup",
                modules.display()
            );
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
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("couchdb.js said {line:?}"))
            .trim()
            .to_owned();
        Some(Couch {
            child,
            _stdin: stdin,
            url: format!("http://127.0.0.1:{port}"),
        })
    }

    /// `method` on `path` (below the server's URL) with a JSON `body`, as the
    /// controller's side of the database: the JSON answer, whatever its status.
    pub fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let url = format!("{}{path}", self.url);
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-X", method, &url]);
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

    /// [`Couch::request`] that must succeed (an answer without `error`).
    #[track_caller]
    pub fn put(&self, path: &str, body: Option<&Value>) -> Value {
        let answer = self.request("PUT", path, body);
        assert!(answer.get("error").is_none(), "PUT {path}: {answer}");
        answer
    }
}
