//! Admission control through the daemon: a full function queue answers 429 and
//! what was queued still runs; a namespace over its concurrency or per-minute limit
//! answers 429 while other namespaces run; a bad limits file stops `serve`.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use sprout_tests::{body_json, json, require_root, text, wait_for, ClientResponse, Daemon, Value};

/// Sleeps `event["sleep"]` seconds, then returns the event.
const SLEEPY_PY: &str =
    "import time\n\ndef f(event):\n    time.sleep(event.get(\"sleep\", 0))\n    return event\n";

/// `PUT /namespaces/{ns}/functions/{name}` of `dir` with `config`; asserts 200.
#[track_caller]
fn register(d: &Daemon, ns: &str, name: &str, dir: &Path, config: Value) {
    let mut body = json!({ "path": dir.to_str().unwrap() });
    body.as_object_mut()
        .unwrap()
        .extend(config.as_object().unwrap().clone());
    let r = d.request(
        "PUT",
        &format!("/namespaces/{ns}/functions/{name}"),
        Some("application/json"),
        body.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "register {ns}/{name}: {}", text(&r));
}

fn invoke(d: &Daemon, ns: &str, name: &str, event: &Value) -> ClientResponse {
    d.request(
        "POST",
        &format!("/namespaces/{ns}/functions/{name}/invoke"),
        Some("application/json"),
        event.to_string().as_bytes(),
    )
}

/// Asserts a 429 whose message says `says`.
#[track_caller]
fn assert_refused(r: &ClientResponse, says: &str) {
    assert_eq!(r.status, 429, "{}", text(r));
    let e = &body_json(r)["error"];
    assert_eq!(e["kind"], "too_many_requests", "{e}");
    let message = e["message"].as_str().unwrap();
    assert!(message.contains(says), "{message}");
}

/// Waits until `GET /status` reports `queued` requests waiting.
#[track_caller]
fn wait_queued(d: &Daemon, queued: u64) {
    wait_for(Duration::from_secs(30), || {
        let q = d.status()["queued"].as_u64().unwrap();
        (q == queued).then_some(()).ok_or(q)
    })
    .unwrap_or_else(|q| panic!("{q} requests queued, not {queued}; log:\n{}", d.log()));
}

/// Waits until the daemon's metrics show `n` invocations of `ns/f` in flight.
#[track_caller]
fn wait_in_flight(d: &Daemon, ns: &str, n: u64) {
    let line = format!("sprout_in_flight{{namespace=\"{ns}\",function=\"f\"}} {n}");
    wait_for(Duration::from_secs(30), || {
        let metrics = text(&d.request("GET", "/metrics", None, b""));
        metrics
            .lines()
            .any(|l| l == line)
            .then_some(())
            .ok_or(metrics)
    })
    .unwrap_or_else(|m| panic!("no {line:?} in:\n{m}"));
}

#[test]
fn a_full_queue_answers_429_and_nothing_queued_is_lost() {
    let env = require_root!();
    let d = env.daemon_with(&["--stem-cells", "0", "--max-queue", "2"]);
    let dir = env.function("sleepy", &[("f.py", SLEEPY_PY)]);
    register(&d, "default", "f", &dir, json!({ "max_instances": 1 }));
    // Warm: the instance exists, so the long call below starts at once.
    assert_eq!(invoke(&d, "default", "f", &json!({})).status, 200);

    thread::scope(|s| {
        let running = s.spawn(|| invoke(&d, "default", "f", &json!({"sleep": 4, "id": "running"})));
        wait_in_flight(&d, "default", 1);
        let queued: Vec<_> = ["q1", "q2"]
            .into_iter()
            .map(|id| {
                let d = &d;
                let waiter = s.spawn(move || invoke(d, "default", "f", &json!({ "id": id })));
                (id, waiter)
            })
            .collect();
        wait_queued(&d, 2);
        // The queue holds two: a third is refused at once, over HTTP and the CLI.
        let asked = Instant::now();
        let r = invoke(&d, "default", "f", &json!({"id": "refused"}));
        assert_refused(&r, "function default/f: queue is full (2 requests waiting");
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "{:?}",
            asked.elapsed()
        );
        let run = d.cli(&env).args(["invoke", "f", r#"{"id":"cli"}"#]).run();
        run.expect_code(4);
        assert!(run.stderr.contains("queue is full"), "{run}");
        // The refused requests never entered the queue.
        assert_eq!(d.status()["queued"], 2);

        // Everything that was queued (and the one running) runs and answers.
        let r = running.join().unwrap();
        assert_eq!(
            (r.status, body_json(&r)["id"].clone()),
            (200, json!("running"))
        );
        for (id, waiter) in queued {
            let r = waiter.join().unwrap();
            assert_eq!(r.status, 200, "{id}: {}", text(&r));
            assert_eq!(body_json(&r)["id"], id);
        }
    });
    assert_eq!(d.status()["queued"], 0);
    // The refusals are counted; the refused requests are not invocations.
    let metrics = text(&d.request("GET", "/metrics", None, b""));
    for line in [
        "sprout_admission_refusals_total{namespace=\"default\",reason=\"queue_full\"} 2",
        "sprout_namespace_invocations_total{namespace=\"default\"} 4",
        "sprout_queue_depth{namespace=\"default\",function=\"f\"} 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in:\n{metrics}"
        );
    }
    // With room again, the next one runs.
    assert_eq!(invoke(&d, "default", "f", &json!({})).status, 200);
}

#[test]
fn accepted_asynchronous_invocations_are_bounded_by_the_queue_and_all_run() {
    let env = require_root!();
    let d = env.daemon_with(&[
        "--stem-cells",
        "0",
        "--max-queue",
        "2",
        "--async-workers",
        "1",
    ]);
    let dir = env.function("sleepy", &[("f.py", SLEEPY_PY)]);
    register(&d, "default", "f", &dir, json!({ "max_instances": 1 }));
    // One runs (its thread took it), two wait for the thread (the backlog holds
    // `--max-queue`); before this was bounded, every one was accepted and held in
    // memory, whatever `--max-queue` said.
    let mut accepted = Vec::new();
    let mut refused = None;
    for i in 0..12 {
        let r = d.request(
            "POST",
            "/functions/f/invoke?blocking=false",
            Some("application/json"),
            json!({"sleep": 2, "i": i}).to_string().as_bytes(),
        );
        match r.status {
            202 => accepted.push(body_json(&r)["activationId"].as_str().unwrap().to_owned()),
            _ => {
                refused = Some(r);
                break;
            }
        }
    }
    let refused = refused.unwrap_or_else(|| {
        panic!(
            "{} asynchronous invocations accepted with --max-queue 2",
            accepted.len()
        )
    });
    assert_refused(
        &refused,
        "function default/f: queue is full (2 requests waiting",
    );
    assert!(
        (2..=3).contains(&accepted.len()),
        "{} accepted",
        accepted.len()
    );
    let metrics = text(&d.request("GET", "/metrics", None, b""));
    let line = "sprout_admission_refusals_total{namespace=\"default\",reason=\"queue_full\"} 1";
    assert!(
        metrics.lines().any(|l| l == line),
        "no {line:?} in:\n{metrics}"
    );
    // Every accepted one runs.
    for id in &accepted {
        let rec = wait_for(Duration::from_secs(60), || {
            let r = d.request("GET", &format!("/activations/{id}"), None, b"");
            (r.status == 200).then(|| body_json(&r)).ok_or(r.status)
        })
        .unwrap_or_else(|s| panic!("activation {id}: {s}; log:\n{}", d.log()));
        assert_eq!(rec["status"], "success", "{rec}");
    }
    // With room again, the next one is accepted.
    let r = d.request("POST", "/functions/f/invoke?blocking=false", None, b"{}");
    assert_eq!(r.status, 202, "{}", text(&r));
}

#[test]
fn a_namespace_over_its_limits_answers_429_and_others_run() {
    let env = require_root!();
    let limits = env.work_dir().join("limits");
    std::fs::write(
        &limits,
        "# per tenant\ntight concurrent=1\nrated per_minute=2\n",
    )
    .unwrap();
    let d = env.daemon_with(&[
        "--stem-cells",
        "0",
        "--namespace-concurrent",
        "0",
        "--namespace-limits",
        limits.to_str().unwrap(),
    ]);
    let dir = env.function("sleepy", &[("f.py", SLEEPY_PY)]);
    for ns in ["tight", "rated", "free"] {
        register(&d, ns, "f", &dir, json!({ "max_instances": 2 }));
    }

    thread::scope(|s| {
        let long = s.spawn(|| invoke(&d, "tight", "f", &json!({"sleep": 3})));
        wait_in_flight(&d, "tight", 1);
        // A second invocation of the namespace is refused before it is queued, and
        // the instance it could have used stays free.
        let r = invoke(&d, "tight", "f", &json!({}));
        assert_refused(
            &r,
            "namespace \"tight\" has too many invocations in flight: its limit is 1 concurrent",
        );
        // Another namespace, with no limit, runs meanwhile.
        assert_eq!(invoke(&d, "free", "f", &json!({})).status, 200);
        let r = long.join().unwrap();
        assert_eq!(r.status, 200, "{}", text(&r));
    });
    // The ticket ended with the invocation: the next one runs (a warm one, on the
    // event loop's fast path, is admitted the same way).
    for _ in 0..3 {
        let r = invoke(&d, "tight", "f", &json!({}));
        assert_eq!(r.status, 200, "{}", text(&r));
    }

    // Two a minute: the third within the minute is refused.
    for _ in 0..2 {
        assert_eq!(invoke(&d, "rated", "f", &json!({})).status, 200);
    }
    let r = invoke(&d, "rated", "f", &json!({}));
    assert_refused(
        &r,
        "namespace \"rated\" is over its limit of 2 invocations per minute",
    );

    let metrics = text(&d.request("GET", "/metrics", None, b""));
    for line in [
        "sprout_admission_refusals_total{namespace=\"tight\",reason=\"concurrent\"} 1",
        "sprout_admission_refusals_total{namespace=\"rated\",reason=\"per_minute\"} 1",
        "sprout_namespace_invocations_total{namespace=\"tight\"} 4",
        "sprout_namespace_invocations_total{namespace=\"rated\"} 2",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in:\n{metrics}"
        );
    }
    let usage = body_json(&d.request("GET", "/namespaces/rated/usage", None, b""));
    assert_eq!(usage["invocations"], 2, "{usage}");
}

#[test]
fn a_bad_limits_file_stops_serve_naming_the_line() {
    let env = require_root!();
    let limits = env.work_dir().join("limits");
    std::fs::write(&limits, "ok concurrent=1\nbad concurrent=lots\n").unwrap();
    let run = env
        .sprout()
        .arg("--socket")
        .arg(env.work_dir().join("never.sock"))
        .args(["serve", "--data-dir"])
        .arg(env.work_dir().join("data"))
        .arg("--namespace-limits")
        .arg(&limits)
        .run();
    run.expect_code(2);
    assert!(
        run.stderr.contains("line 2") && run.stderr.contains("concurrent=\"lots\""),
        "{run}"
    );
    assert!(!env.work_dir().join("never.sock").exists());
}
