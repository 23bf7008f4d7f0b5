//! `sprout serve` as an OpenWhisk invoker: `POST /invoke` with an
//! `ActivationMessage` on the TCP listener, the early acknowledgement observed on
//! the wire (the head arrives before the body; the gap is measured), the
//! acknowledgement's shapes, the refusals before any acknowledgement (401, 403,
//! 400), `GET /ping`, and `--whisks-db`: an action fetched from a CouchDB (express-
//! pouchdb over PouchDB's in-memory adapter, started here on loopback) with a
//! `mem:` attachment, and non-blocking records written to its `activations`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use sprout_tests::invoker::{
    activation_message as message, basic_auth as basic, connect, invoke, key_file, read_until,
    Couch,
};
use sprout_tests::{json, require_root, wait_for, Env};

const ALPHA: &str =
    "3f2c7a1e-0001-4c4e-9a55-000000000001:alpha-secret-0123456789abcdef0123456789ab";
const STAR: &str = "3f2c7a1e-00ff-4c4e-9a55-0000000000ff:controller-secret-0123456789abcdef012345";

const SLOW_ECHO_PY: &str =
    "import time\n\ndef f(event):\n    time.sleep(event.get(\"sleep_ms\", 0) / 1000)\n    return event\n";

fn keys(env: &Env) -> PathBuf {
    key_file(env, "keys", &format!("alpha {ALPHA}\n* {STAR}\n"), 0o600)
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
    read_until(&mut s, &mut buf, b"{\"ok\":true}").unwrap();
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
    d.register_in(
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

/// Needs `Request::PutAction` (slice 2) and `Request::Activate` (slice 1).
#[test]
fn an_action_with_a_mem_attachment_is_fetched_run_and_its_record_stored() {
    let env = require_root!();
    let Some(couch) = Couch::start() else { return };
    couch.put("/whisks", None);
    couch.put("/activations", None);
    let code =
        "def main(args):\n    return {\"greeting\": \"hello \" + args.get(\"name\", \"?\")}\n";
    let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(code);
    let doc = json!({
        "namespace": "alpha", "name": "greet", "entityType": "action", "version": "0.0.1",
        "publish": false,
        "exec": {"kind": "python:3", "binary": false,
                 "code": {"attachmentName": format!("mem:{encoded}"), "attachmentType": "text/plain",
                          "length": code.len()}},
        "limits": {"timeout": 60000, "memory": 256, "logs": 10, "concurrency": 1},
        "parameters": [], "annotations": []
    });
    let put = couch.put("/whisks/alpha%2Fgreet", Some(&doc));
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

    let version = ack["response"]["version"].clone();
    // An older revision that is gone: the latest is taken, once; asking for it
    // again is neither another fetch nor another registration (which would retire
    // the warm instances and bump the version).
    for id in [33, 34] {
        let mut msg = message("alpha", "alpha/greet", id, true, json!({"name": "gone"}));
        msg["revision"] = json!("0-00000000000000000000000000000000");
        let ack = invoke(&mut s, STAR, &msg).ack();
        assert_eq!(
            ack["response"]["response"]["result"],
            json!({"greeting": "hello gone"}),
            "{ack}"
        );
        assert_eq!(ack["response"]["version"], version, "{ack}");
    }

    // Non-blocking: the id, and the record in `activations` as `alpha/<id>`.
    let mut msg = message("alpha", "alpha/greet", 31, false, json!({"name": "couch"}));
    msg["revision"] = json!(rev);
    assert_eq!(
        invoke(&mut s, STAR, &msg).ack()["response"],
        format!("{:032x}", 31)
    );
    let id = format!("alpha%2F{:032x}", 31);
    let record = wait_for(Duration::from_secs(10), || {
        let doc = couch.request("GET", &format!("/activations/{id}"), None);
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
