//! What a function can reach on the network: its own loopback always, the host's
//! never; nothing outside without `network: egress`.

use std::io::Read;
use std::net::TcpListener;

use sprout_tests::{json, require_root, Env, Value};

/// Listens and connects on the sandbox's own 127.0.0.1, then tries each address in
/// `event["reach"]` (`"host:port"`). Never raises: every observation is a value.
const NET_PY: &str = r#"import errno, os, socket

def _try(host, port):
    try:
        s = socket.create_connection((host, port), timeout=2)
        s.sendall(b"ping")
        got = s.recv(64)
        s.close()
        return "connected:" + got.decode(errors="replace")
    except OSError as e:
        return errno.errorcode.get(e.errno, type(e).__name__) if e.errno else type(e).__name__

def f(event):
    out = {}
    srv = socket.socket()
    try:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        c = socket.create_connection(("127.0.0.1", port), timeout=2)
        peer, _ = srv.accept()
        c.sendall(b"hello")
        out["loopback"] = peer.recv(64).decode()
        peer.close(); c.close()
    except OSError as e:
        out["loopback"] = errno.errorcode.get(e.errno, str(e))
    finally:
        srv.close()
    out["reach"] = {a: _try(a.rsplit(":", 1)[0], int(a.rsplit(":", 1)[1])) for a in event.get("reach", [])}
    out["resolv_conf"] = os.path.exists("/etc/resolv.conf") and open("/etc/resolv.conf").read() != ""
    return out
"#;

/// A listener on the host's loopback that counts nothing but the connections it
/// accepts (answers "pong" to each).
fn host_listener() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    l.set_nonblocking(true).unwrap();
    (l, addr)
}

/// Whether `l` accepted any connection.
fn accepted_any(l: &TcpListener) -> bool {
    match l.accept() {
        Ok((mut s, _)) => {
            let mut b = [0u8; 4];
            let _ = s.read(&mut b);
            true
        }
        Err(_) => false,
    }
}

fn run(env: &Env, args: &[&str], event: Value) -> Value {
    let dir = env.function("net", &[("f.py", NET_PY)]);
    let run = env
        .sprout()
        .arg("invoke")
        .arg(&dir)
        .args(args)
        .arg(event.to_string())
        .run();
    run.success();
    let out = run.json();
    env.assert_clean(run.pid);
    out
}

#[test]
fn a_function_uses_its_own_loopback_but_not_the_hosts() {
    let env = require_root!();
    let (host, addr) = host_listener();
    let out = run(&env, &[], json!({"reach": [addr]}));
    assert_eq!(out["loopback"], "hello", "{out}");
    let tried = &out["reach"][&addr];
    assert!(
        !tried.as_str().unwrap_or("").starts_with("connected"),
        "the sandbox reached the host's loopback: {out}"
    );
    assert!(!accepted_any(&host), "the host's listener saw a connection");
}
