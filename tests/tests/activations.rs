//! Activation records and asynchronous invocations through a real daemon: the id
//! header, records of successes and of each kind of failure, timestamped logs,
//! retention, `?blocking=false`, and a `kill -9` in the middle of a burst of
//! asynchronous invocations (every accepted id has one record, nothing ran twice,
//! nothing is left on the machine).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use sprout_tests::*;

const OK_PY: &str = r#"
import sys
def f(event):
    print("first")
    print("second")
    print("to stderr", file=sys.stderr)
    return {"ok": True, "echo": event}
"#;
const RAISE_PY: &str = r#"
def f(event):
    raise ValueError("nope")
"#;
const SLOW_PY: &str = r#"
import time
def f(event):
    time.sleep(event.get("sleep", 5))
    return {"slept": event.get("sleep", 5), "n": event.get("n")}
"#;
const HOG_PY: &str = r#"
def f(event):
    blocks = []
    while True:
        blocks.append(bytearray(16 << 20))
"#;

/// 32 lowercase hex digits.
fn is_id(text: &str) -> bool {
    text.len() == 32 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The response's `X-Sprout-Activation-Id`, checked.
#[track_caller]
fn id_of(r: &ClientResponse) -> String {
    let id = r
        .header("X-Sprout-Activation-Id")
        .unwrap_or_else(|| panic!("no activation id header: {}", text(r)))
        .to_owned();
    assert!(is_id(&id), "{id:?}");
    id
}

/// `GET /activations/{id}{rest}` until it is 200 (records are written in batches).
#[track_caller]
fn record(d: &Daemon, id: &str, rest: &str) -> Value {
    let path = format!("/activations/{id}{rest}");
    let found = wait_for(Duration::from_secs(10), || {
        let r = d.request("GET", &path, None, b"");
        if r.status == 200 {
            Ok(body_json(&r))
        } else {
            Err((r.status, text(&r)))
        }
    });
    found.unwrap_or_else(|e| panic!("GET {path}: {e:?}"))
}

fn is_log_line(line: &str, stream: &str, text: &str) -> bool {
    let Some((time, rest)) = line.split_once(' ') else {
        return false;
    };
    // 2026-11-30T12:00:00.123456789Z
    let b = time.as_bytes();
    time.len() == 30
        && b[4] == b'-'
        && b[10] == b'T'
        && b[19] == b'.'
        && b[29] == b'Z'
        && b[20..29].iter().all(u8::is_ascii_digit)
        && rest == format!("{stream}: {text}")
}

fn invoke_json(d: &Daemon, name: &str, event: &str) -> ClientResponse {
    d.invoke(name, event)
}

#[test]
fn every_invocation_is_recorded_with_its_status_result_and_logs() {
    let env = require_root!();
    let d = env.daemon_with(&["--stem-cells", "0"]);
    d.register("ok", &env.function("ok", &[("f.py", OK_PY)]), json!({}));
    d.register(
        "raise",
        &env.function("raise", &[("f.py", RAISE_PY)]),
        json!({}),
    );
    d.register(
        "slow",
        &env.function("slow", &[("f.py", SLOW_PY)]),
        json!({"timeout_ms": 1000}),
    );
    d.register(
        "hog",
        &env.function("hog", &[("f.py", HOG_PY)]),
        json!({"memory_mb": 64}),
    );

    // Success: the header, the record, its logs stamped line by line.
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let r = invoke_json(&d, "ok", r#"{"a":1}"#);
    assert_eq!(r.status, 200, "{}", text(&r));
    let ok_id = id_of(&r);
    let rec = record(&d, &ok_id, "");
    assert_eq!(rec["activation_id"], json!(ok_id));
    assert_eq!(
        (
            &rec["namespace"],
            &rec["name"],
            &rec["status"],
            &rec["status_code"]
        ),
        (
            &json!("default"),
            &json!("ok"),
            &json!("success"),
            &json!(0)
        ),
        "{rec}"
    );
    assert_eq!(rec["result"], json!({"ok": true, "echo": {"a": 1}}));
    assert_eq!(rec["blocking"], json!(true));
    assert_eq!(rec["cause"], Value::Null);
    let (start, end) = (rec["start"].as_u64().unwrap(), rec["end"].as_u64().unwrap());
    assert!(start >= before && end >= start, "{rec}");
    assert_eq!(rec["duration"].as_u64().unwrap(), end - start);
    // The first invocation started a new instance: its init time counts.
    assert!(
        matches!(
            rec["start_path"].as_str(),
            Some("new_sandbox" | "stem_cell")
        ),
        "{rec}"
    );
    assert!(rec["init_time"].as_u64().unwrap() > 0, "{rec}");
    let logs: Vec<String> = serde_json::from_value(rec["logs"].clone()).unwrap();
    assert_eq!(logs.len(), 3, "{logs:?}");
    assert!(
        logs.iter().any(|l| is_log_line(l, "stdout", "first")),
        "{logs:?}"
    );
    assert!(
        logs.iter().any(|l| is_log_line(l, "stdout", "second")),
        "{logs:?}"
    );
    assert!(
        logs.iter().any(|l| is_log_line(l, "stderr", "to stderr")),
        "{logs:?}"
    );
    let first = logs
        .iter()
        .position(|l| l.ends_with("stdout: first"))
        .unwrap();
    let second = logs
        .iter()
        .position(|l| l.ends_with("stdout: second"))
        .unwrap();
    assert!(first < second, "{logs:?}");
    // A warm one: no init time.
    let warm = id_of(&invoke_json(&d, "ok", "{}"));
    let rec = record(&d, &warm, "");
    assert_eq!(
        (&rec["start_path"], &rec["init_time"]),
        (&json!("warm"), &json!(0)),
        "{rec}"
    );
    assert_eq!(
        record(&d, &ok_id, "/logs")["logs"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    let result = record(&d, &ok_id, "/result");
    assert_eq!(
        result,
        json!({"result": {"ok": true, "echo": {"a": 1}}, "status": "success", "success": true})
    );

    // A raised error: application_error, the error body as the result.
    let r = invoke_json(&d, "raise", "{}");
    assert_eq!(r.status, 502, "{}", text(&r));
    let rec = record(&d, &id_of(&r), "");
    assert_eq!(
        (&rec["status"], &rec["status_code"]),
        (&json!("application_error"), &json!(1))
    );
    assert_eq!(
        rec["result"]["error"]["kind"],
        json!("handler_error"),
        "{rec}"
    );
    assert!(
        rec["result"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nope"),
        "{rec}"
    );

    // A timeout: action_developer_error.
    let r = invoke_json(&d, "slow", r#"{"sleep": 5}"#);
    assert_eq!(r.status, 504, "{}", text(&r));
    let rec = record(&d, &id_of(&r), "");
    assert_eq!(
        (
            &rec["status"],
            &rec["status_code"],
            &rec["result"]["error"]["kind"]
        ),
        (
            &json!("action_developer_error"),
            &json!(2),
            &json!("timeout")
        ),
        "{rec}"
    );
    assert!(
        rec["result"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("timed out after 1000 ms"),
        "{rec}"
    );

    // Out of memory: action_developer_error.
    let r = invoke_json(&d, "hog", "{}");
    assert_eq!(r.status, 502, "{}", text(&r));
    let rec = record(&d, &id_of(&r), "");
    assert_eq!(rec["status"], json!("action_developer_error"), "{rec}");
    assert!(
        matches!(
            rec["result"]["error"]["kind"].as_str(),
            Some("out_of_memory" | "instance_died")
        ),
        "{rec}"
    );

    // A refused request still answers an id, and activates nothing.
    let r = invoke_json(&d, "missing", "{}");
    assert_eq!(r.status, 404, "{}", text(&r));
    let missing = id_of(&r);
    let r = d.request("GET", &format!("/activations/{missing}"), None, b"");
    assert_eq!(r.status, 404, "{}", text(&r));

    // Bad and unknown ids.
    let r = d.request("GET", "/activations/not-an-id/logs", None, b"");
    assert_eq!(r.status, 400, "{}", text(&r));
    assert!(text(&r).contains("\\\"not-an-id\\\""), "{}", text(&r));
    let r = d.request(
        "GET",
        &format!("/activations/{}", "0".repeat(32)),
        None,
        b"",
    );
    assert_eq!(
        (r.status, body_json(&r)["error"]["kind"].clone()),
        (404, json!("not_found"))
    );

    // The listing: newest first, filtered by name; the CLI prints it.
    let r = d.request("GET", "/activations?name=ok", None, b"");
    assert_eq!(r.status, 200, "{}", text(&r));
    let ids: Vec<String> = body_json(&r)
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["activation_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, [warm.clone(), ok_id.clone()]);
    let run = d.cli(&env).args(["activation", "ls", "--name", "ok"]).run();
    run.success();
    assert!(
        run.stdout.contains(&warm) && run.stdout.contains(&ok_id),
        "{run}"
    );
    let run = d.cli(&env).args(["activation", "logs", &ok_id]).run();
    run.success();
    assert!(run.stdout.contains("stdout: first"), "{run}");
    let all = d.request("GET", "/activations?limit=200", None, b"");
    // ok twice, raise, slow, hog: the refused invoke of `missing` has none.
    assert_eq!(
        body_json(&all).as_array().unwrap().len(),
        5,
        "{}",
        text(&all)
    );
}

#[test]
fn retention_keeps_the_newest_records_and_none_past_their_age() {
    let env = require_root!();
    let dir = env.function("ok", &[("f.py", OK_PY)]);
    {
        let d = env.daemon_with(&["--stem-cells", "0", "--activations-max", "3"]);
        d.register("ok", &dir, json!({}));
        let ids: Vec<String> = (0..6)
            .map(|_| id_of(&invoke_json(&d, "ok", "{}")))
            .collect();
        let newest: Vec<String> = ids[3..].iter().rev().cloned().collect();
        let kept = wait_for(Duration::from_secs(5), || {
            let list = body_json(&d.request("GET", "/activations", None, b""));
            let got: Vec<String> = list
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["activation_id"].as_str().unwrap().to_owned())
                .collect();
            (got == newest).then_some(()).ok_or(got)
        });
        kept.unwrap_or_else(|got| panic!("kept {got:?}, want {newest:?}"));
        let r = d.request("GET", &format!("/activations/{}", ids[0]), None, b"");
        assert_eq!(r.status, 404, "{}", text(&r));
    }
    let d = env.daemon_with(&["--stem-cells", "0", "--activations-max-age", "2s"]);
    d.register("ok", &dir, json!({}));
    let id = id_of(&invoke_json(&d, "ok", "{}"));
    record(&d, &id, "");
    let gone = wait_for(Duration::from_secs(8), || {
        let r = d.request("GET", &format!("/activations/{id}"), None, b"");
        (r.status == 404).then_some(()).ok_or(r.status)
    });
    assert!(
        gone.is_ok(),
        "a record older than --activations-max-age is kept"
    );
}

#[test]
fn an_asynchronous_invocation_is_accepted_then_recorded() {
    let env = require_root!();
    let d = env.daemon_with(&["--stem-cells", "0"]);
    d.register(
        "slow",
        &env.function("slow", &[("f.py", SLOW_PY)]),
        json!({}),
    );
    let r = d.request(
        "POST",
        "/functions/slow/invoke?blocking=false",
        Some("application/json"),
        br#"{"sleep": 0.5, "n": 7}"#,
    );
    assert_eq!(r.status, 202, "{}", text(&r));
    let id = body_json(&r)["activationId"].as_str().unwrap().to_owned();
    assert_eq!(id_of(&r), id);
    // Not finished yet: 404, saying so.
    let r = d.request("GET", &format!("/activations/{id}"), None, b"");
    assert_eq!(r.status, 404, "{}", text(&r));
    assert_eq!(
        body_json(&r)["error"]["kind"],
        json!("pending"),
        "{}",
        text(&r)
    );
    let rec = record(&d, &id, "");
    assert_eq!(
        (&rec["status"], &rec["result"], &rec["blocking"]),
        (
            &json!("success"),
            &json!({"slept": 0.5, "n": 7}),
            &json!(false)
        ),
        "{rec}"
    );
    assert!(rec["duration"].as_u64().unwrap() >= 500, "{rec}");

    // The CLI: --async prints the id; `activation result` its result.
    let run = d
        .cli(&env)
        .args(["invoke", "slow", r#"{"sleep": 0}"#, "--async"])
        .run();
    run.success();
    let id = run.stdout.trim().to_owned();
    assert!(is_id(&id), "{run}");
    record(&d, &id, "");
    let run = d.cli(&env).args(["activation", "result", &id]).run();
    run.success();
    assert!(run.stdout.contains("\"slept\":0"), "{run}");

    // Checked before it is accepted: no such function, an event that is not JSON.
    let r = d.request("POST", "/functions/nope/invoke?blocking=false", None, b"{}");
    assert_eq!(r.status, 404, "{}", text(&r));
    let r = d.request("POST", "/functions/slow/invoke?blocking=false", None, b"{");
    assert_eq!(r.status, 400, "{}", text(&r));
}

#[test]
fn no_records_still_answers_ids_and_refuses_asynchronous_invocations() {
    let env = require_root!();
    let d = env.daemon_with(&["--stem-cells", "0", "--no-records"]);
    d.register("ok", &env.function("ok", &[("f.py", OK_PY)]), json!({}));
    let r = invoke_json(&d, "ok", "{}");
    assert_eq!(r.status, 200, "{}", text(&r));
    let id = id_of(&r);
    let r = d.request("GET", &format!("/activations/{id}"), None, b"");
    assert_eq!(
        (r.status, body_json(&r)["error"]["kind"].clone()),
        (404, json!("records_off"))
    );
    let r = d.request("POST", "/functions/ok/invoke?blocking=false", None, b"{}");
    assert_eq!(r.status, 400, "{}", text(&r));
}

#[test]
fn a_killed_daemon_loses_no_accepted_activation_and_runs_none_twice() {
    let env = require_root!();
    let data = env.work_dir().join("data-burst");
    let dir = env.function("slow", &[("f.py", SLOW_PY)]);
    let mut d = Daemon::start_on(&env, &data, &["--stem-cells", "0"]);
    d.register("slow", &dir, json!({"max_instances": 4}));
    let pid = d.pid();
    let socket = d.socket().to_path_buf();
    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let sent = 200;
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (accepted, socket) = (accepted.clone(), socket.clone());
            thread::spawn(move || {
                let Ok(mut client) = Client::connect(&socket) else {
                    return;
                };
                for n in 0..sent / 4 {
                    let event = format!(r#"{{"sleep": 0.05, "n": {}}}"#, c * 1000 + n);
                    match client.request(
                        "POST",
                        "/functions/slow/invoke?blocking=false",
                        Some("application/json"),
                        event.as_bytes(),
                    ) {
                        Ok(r) if r.status == 202 => {
                            let id = body_json(&r)["activationId"].as_str().unwrap().to_owned();
                            accepted.lock().unwrap().push(id);
                        }
                        Ok(r) => panic!("{}: {}", r.status, text(&r)),
                        // The daemon was killed.
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    // Kill it in the middle: some activations finished, some wait, some run.
    let started = Instant::now();
    while accepted.lock().unwrap().len() < 100 && started.elapsed() < Duration::from_secs(30) {
        thread::sleep(Duration::from_millis(2));
    }
    thread::sleep(Duration::from_millis(300));
    d.kill();
    for c in clients {
        c.join().unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    assert!(accepted.len() >= 100, "only {} accepted", accepted.len());
    // The spawner cleans up after its agent.
    env.assert_clean_within(pid, Duration::from_secs(10));
    drop(d);

    let d = Daemon::start_on(&env, &data, &["--stem-cells", "0"]);
    let (mut ran, mut lost) = (0, 0);
    for id in &accepted {
        let r = d.request("GET", &format!("/activations/{id}"), None, b"");
        assert_eq!(r.status, 200, "{id}: {}", text(&r));
        let rec = body_json(&r);
        match rec["status"].as_str() {
            Some("success") => ran += 1,
            Some("whisk_internal_error") => {
                let message = rec["result"]["error"]["message"].as_str().unwrap();
                assert!(message.contains("it was not run again"), "{rec}");
                lost += 1;
            }
            other => panic!("{id}: {other:?}: {rec}"),
        }
    }
    assert!(ran > 0 && lost > 0, "ran {ran}, lost {lost}");
    // Each id has one record, and nothing was run again by the new agent.
    let mut listed = Vec::new();
    for skip in (0..).step_by(200) {
        let r = d.request(
            "GET",
            &format!("/activations?limit=200&skip={skip}"),
            None,
            b"",
        );
        let page = body_json(&r);
        let page = page.as_array().unwrap();
        if page.is_empty() {
            break;
        }
        listed.extend(
            page.iter()
                .map(|r| r["activation_id"].as_str().unwrap().to_owned()),
        );
    }
    let unique: HashSet<&String> = listed.iter().collect();
    assert_eq!(unique.len(), listed.len(), "an id is listed twice");
    assert_eq!(
        unique,
        accepted.iter().collect::<HashSet<_>>(),
        "the records are exactly the accepted activations"
    );
    assert_eq!(
        d.status()["invocations"],
        json!(0),
        "the new agent ran something"
    );
    // Functions are registered again after a restart; new work runs.
    d.register("slow", &dir, json!({}));
    let r = d.request(
        "POST",
        "/functions/slow/invoke?blocking=false",
        None,
        br#"{"sleep": 0}"#,
    );
    assert_eq!(r.status, 202, "{}", text(&r));
    let rec = record(&d, body_json(&r)["activationId"].as_str().unwrap(), "");
    assert_eq!(rec["status"], json!("success"), "{rec}");
}

#[test]
fn a_call_through_the_agent_names_its_caller_as_cause() {
    let env = require_root!();
    let d = env.daemon_with(&["--stem-cells", "0"]);
    d.register("ok", &env.function("ok", &[("f.py", OK_PY)]), json!({}));
    let caller = r#"
import sprout
def f(event):
    return sprout.call_async("ok", {"from": "caller"}).result()
"#;
    d.register(
        "caller",
        &env.function("caller", &[("f.py", caller)]),
        json!({}),
    );
    let r = invoke_json(&d, "caller", "{}");
    assert_eq!(r.status, 200, "{}", text(&r));
    let caller_id = id_of(&r);
    let rec = record(&d, &caller_id, "");
    assert_eq!(rec["called"], json!(true), "{rec}");
    let callee = wait_for(Duration::from_secs(10), || {
        let list = body_json(&d.request("GET", "/activations?name=ok", None, b""));
        list.as_array().and_then(|l| l.first().cloned()).ok_or(())
    })
    .expect("the callee's record");
    assert_eq!(callee["cause"], json!(caller_id), "{callee}");
    assert_eq!(callee["status"], json!("success"), "{callee}");
}
