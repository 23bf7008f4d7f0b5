//! `sprout serve --listen`: the API over TCP next to the Unix socket, with keys
//! (`--auth FILE`), TLS (`--tls-cert`, `--tls-key`) and without keys on loopback
//! (`--no-auth`); the CLI over `--url`; OpenLambda's client calls, made from Python
//! with `urllib` as its client makes them. Loopback addresses only, port 0.

use std::path::PathBuf;
use std::process::Command;

use sprout_tests::{body_json, json, require_root, text, Env, Value, HELLO_PY};

const ALPHA: &str =
    "3f2c7a1e-0001-4c4e-9a55-000000000001:alpha-secret-0123456789abcdef0123456789ab";
const BETA: &str = "3f2c7a1e-0002-4c4e-9a55-000000000002:beta-secret-0123456789abcdef0123456789abc";
const STAR: &str = "3f2c7a1e-00ff-4c4e-9a55-0000000000ff:controller-secret-0123456789abcdef012345";

const ADD_PY: &str = "def f(event):\n    return {\"sum\": event[\"a\"] + event[\"b\"]}\n";

/// A key file in the test's directory, mode 0600 unless `mode` says otherwise.
fn key_file(env: &Env, text: &str, mode: u32) -> PathBuf {
    sprout_tests::invoker::key_file(env, &format!("keys-{mode:o}"), text, mode)
}

fn keys(env: &Env) -> PathBuf {
    key_file(
        env,
        &format!("# namespace uuid:key\nalpha {ALPHA}\n\nbeta {BETA}\n* {STAR}\n"),
        0o600,
    )
}

#[test]
fn keys_decide_who_acts_where() {
    let env = require_root!();
    let auth = keys(&env);
    let d = env.daemon_with(&[
        "--stem-cells",
        "0",
        "--listen",
        "127.0.0.1:0",
        "--auth",
        auth.to_str().unwrap(),
    ]);
    let add = env.function("add", &[("f.py", ADD_PY)]);
    d.register_in("alpha", "add", &add);
    let invoke = "/namespaces/alpha/functions/add/invoke";
    let event = br#"{"a": 2, "b": 40}"#;

    // The namespace's own key, and the `*` key.
    for key in [ALPHA, STAR] {
        let r = d
            .tcp_client(Some(key), None)
            .request("POST", invoke, Some("application/json"), event)
            .unwrap();
        assert_eq!(r.status, 200, "{}", text(&r));
        assert_eq!(body_json(&r), json!({"sum": 42}));
    }
    let invocations = d.status()["invocations"].as_u64().unwrap();
    assert_eq!(invocations, 2);

    // No key, a wrong one, another namespace's: refused, and nothing ran.
    let (uuid, _) = ALPHA.split_once(':').unwrap();
    let wrong = format!("{uuid}:not-the-secret-0123456789abcdef0123456789");
    for (key, status) in [(None, 401), (Some(wrong.as_str()), 401), (Some(BETA), 403)] {
        let r = d
            .tcp_client(key, None)
            .request("POST", invoke, Some("application/json"), event)
            .unwrap();
        assert_eq!(r.status, status, "{key:?}: {}", text(&r));
        let body = text(&r);
        if status == 401 {
            assert_eq!(r.header("www-authenticate"), Some("Basic realm=\"sprout\""));
        } else {
            // Nothing of the other namespace is named.
            assert!(!body.contains("alpha") && !body.contains("add"), "{body}");
        }
    }
    // Node-wide: the `*` key only; counters for any key.
    let r = d
        .tcp_client(Some(BETA), None)
        .request("GET", "/packages", None, b"")
        .unwrap();
    assert_eq!(r.status, 403);
    let r = d
        .tcp_client(Some(STAR), None)
        .request("GET", "/packages", None, b"")
        .unwrap();
    assert_eq!(r.status, 200, "{}", text(&r));
    let r = d
        .tcp_client(Some(BETA), None)
        .request("GET", "/stats", None, b"")
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(body_json(&r)["invocations"], json!(2));
    // Beta's status lists no other namespace.
    let r = d
        .tcp_client(Some(BETA), None)
        .request("GET", "/status", None, b"")
        .unwrap();
    let listed: Vec<Value> = body_json(&r)["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["namespace"].clone())
        .collect();
    assert!(listed.iter().all(|n| n == "beta"), "{listed:?}");
    assert_eq!(
        d.status()["invocations"].as_u64().unwrap(),
        2,
        "nothing ran"
    );

    // The CLI over --url, its key from SPROUT_KEY: upload, invoke, list.
    let url = d.tcp_url();
    let hello = env.function("hello", &[("f.py", HELLO_PY)]);
    let cli = |key: &str| {
        env.sprout()
            .args(["--url", &url, "--namespace", "alpha"])
            .env("SPROUT_KEY", key)
    };
    let run = cli(ALPHA).args(["fn", "add", "hello"]).arg(&hello).run();
    run.success();
    assert_eq!(run.json()["namespace"], "alpha", "{run}");
    // Uploaded: the daemon holds its own copy, not the test's directory.
    assert_ne!(run.json()["path"], json!(hello.to_str().unwrap()), "{run}");
    let run = cli(ALPHA)
        .args(["invoke", "hello", r#"{"name":"TCP"}"#])
        .run();
    run.success();
    assert_eq!(run.stdout.trim(), "\"Hello, TCP!\"", "{run}");
    let run = cli(BETA).args(["invoke", "hello", "{}"]).run();
    run.expect_code(2);
    assert!(
        run.stderr.contains("forbidden") || run.stderr.contains("own namespace"),
        "{run}"
    );
    let run = cli("nobody:nothing").args(["fn", "ls"]).run();
    run.expect_code(2);
    assert!(run.stderr.contains("valid key"), "{run}");
    // A workflow file over --url: its functions are uploaded.
    let run = cli(ALPHA)
        .args(["workflow", "run"])
        .arg(sprout_tests::example("wordcount").join("wordcount.json"))
        .arg(r#"{"text": "a b c\nd e", "chunks": 2}"#)
        .run();
    run.success();
    assert_eq!(run.json(), json!({"words": 5, "chunks": 2}), "{run}");
    // --key on the command line works too; a key without --url is refused.
    let run = env
        .sprout()
        .args(["--url", &url, "--key", STAR, "status"])
        .run();
    run.success();
    let run = d.cli(&env).args(["--key", STAR, "status"]).run();
    run.expect_code(2);
    assert!(run.stderr.contains("--key"), "{run}");
}

#[test]
fn serve_refuses_a_listener_it_cannot_secure() {
    let env = require_root!();
    let socket = env.work_dir().join("refused.sock");
    let serve = |args: &[&str]| {
        env.sprout()
            .args(["serve", "--stem-cells", "0", "--socket"])
            .arg(&socket)
            .args(args)
            .run()
    };
    // Without keys on an address that is not loopback.
    for addr in ["0.0.0.0:0", "[::]:0"] {
        let run = serve(&["--listen", addr, "--no-auth"]);
        run.expect_code(2);
        assert!(run.stderr.contains(&format!("--listen {addr}")), "{run}");
        assert!(run.stderr.contains("loopback"), "{run}");
    }
    // Neither --auth nor --no-auth.
    let run = serve(&["--listen", "127.0.0.1:0"]);
    run.expect_code(2);
    assert!(
        run.stderr.contains("--listen 127.0.0.1:0") && run.stderr.contains("--auth FILE"),
        "{run}"
    );
    // A bad line, named by its number.
    let bad = key_file(&env, &format!("# ok\nalpha {ALPHA}\nbeta\n"), 0o600);
    let run = serve(&["--listen", "127.0.0.1:0", "--auth", bad.to_str().unwrap()]);
    run.expect_code(2);
    assert!(run.stderr.contains("line 3"), "{run}");
    // A key file others can read.
    let open = key_file(&env, &format!("alpha {ALPHA}\n"), 0o644);
    let run = serve(&["--listen", "127.0.0.1:0", "--auth", open.to_str().unwrap()]);
    run.expect_code(2);
    assert!(run.stderr.contains("chmod 600"), "{run}");
    // Nothing was started: no socket left.
    assert!(!socket.exists());
}

#[test]
fn tls_with_a_certificate_the_test_made() {
    let env = require_root!();
    let (ca, cert, key) = sprout_tests::tls_files(env.work_dir());
    let auth = keys(&env);
    let d = env.daemon_with(&[
        "--stem-cells",
        "0",
        "--listen",
        "127.0.0.1:0",
        "--auth",
        auth.to_str().unwrap(),
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let url = d.tcp_url();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    d.register_in("alpha", "add", &env.function("add", &[("f.py", ADD_PY)]));
    let mut c = d.tcp_client(Some(ALPHA), Some(&ca));
    for i in 0..3 {
        let event = format!(r#"{{"a": {i}, "b": 1}}"#);
        let r = c
            .request(
                "POST",
                "/namespaces/alpha/functions/add/invoke",
                Some("application/json"),
                event.as_bytes(),
            )
            .unwrap();
        assert_eq!(r.status, 200, "{}", text(&r));
        assert_eq!(body_json(&r), json!({"sum": i + 1}));
    }
    // The CLI, trusting the CA.
    let run = env
        .sprout()
        .args(["--url", &url, "--namespace", "alpha", "--ca-cert"])
        .arg(&ca)
        .env("SPROUT_KEY", ALPHA)
        .args(["invoke", "add", r#"{"a": 1, "b": 1}"#])
        .run();
    run.success();
    assert_eq!(run.json(), json!({"sum": 2}), "{run}");
    // Not trusting it (the system's CAs): refused, naming the certificate.
    let run = env
        .sprout()
        .args(["--url", &url])
        .env("SPROUT_KEY", ALPHA)
        .arg("status")
        .run();
    assert_ne!(run.code(), Some(0), "{run}");
    assert!(run.stderr.to_lowercase().contains("certificate"), "{run}");
    // Plain HTTP to the TLS port: a plain 400 that says so, and the connection closed.
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-i"])
        .arg(format!("http://{}/stats", d.tcp_addr()))
        .output()
        .expect("run curl");
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("speaks TLS"), "{answer}");
    // And the daemon still serves.
    let r = c.request("GET", "/stats", None, b"").unwrap();
    assert_eq!(r.status, 200);
}

/// OpenLambda's Python client makes three calls: `POST /run/NAME` with the JSON
/// arguments as the body (no content type of its own), `GET /status` (it checks for
/// a 200) and `GET /stats` (JSON). The same calls with Python's `urllib`.
const OPENLAMBDA_CALLS: &str = r#"
import json, sys, urllib.request

address, name = sys.argv[1], sys.argv[2]

def call(method, path, data=None):
    request = urllib.request.Request("http://%s/%s" % (address, path), data=data, method=method)
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, response.read()

status, _ = call("GET", "status")
assert status == 200, status
_, before = call("GET", "stats")
results = []
for args in ({"a": 1, "b": 2}, {"a": 20, "b": 22}):
    status, body = call("POST", "run/" + name, json.dumps(args).encode())
    assert status == 200, (status, body)
    results.append(json.loads(body))
status, after = call("GET", "stats")
assert status == 200, status
print(json.dumps({"results": results, "before": json.loads(before), "after": json.loads(after)}))
"#;

#[test]
fn openlambdas_client_calls_work_against_listen() {
    let env = require_root!();
    let d = env.daemon_with(&["--stem-cells", "0", "--listen", "127.0.0.1:0", "--no-auth"]);
    let add = env.function("add", &[("f.py", ADD_PY)]);
    d.register("add", &add, json!({}));
    let addr = d.tcp_addr();
    assert!(addr.ip().is_loopback());
    let out = Command::new("/usr/bin/python3")
        .args(["-c", OPENLAMBDA_CALLS, &addr.to_string(), "add"])
        .output()
        .expect("run /usr/bin/python3");
    assert!(
        out.status.success(),
        "python: {}\n{}\ndaemon log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["results"], json!([{"sum": 3}, {"sum": 42}]));
    let (before, after) = (&got["before"], &got["after"]);
    for stats in [before, after] {
        let map = stats.as_object().expect("stats is an object");
        assert!(map.values().all(Value::is_u64), "{stats}");
    }
    assert_eq!(
        after["invocations"].as_u64().unwrap() - before["invocations"].as_u64().unwrap(),
        2,
        "{before} -> {after}"
    );
    assert_eq!(after["functions"], json!(1));
    // The same counters as the status's, over the Unix socket.
    assert_eq!(d.status()["invocations"], after["invocations"]);
}
