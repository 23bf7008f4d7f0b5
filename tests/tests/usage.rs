//! Accounting against the records, through a real daemon: a namespace's usage
//! (`GET /namespaces/{ns}/usage`) equals the sums over its activation records
//! (invocations, errors, milliseconds and memory × milliseconds at each record's
//! `limits.memory`) after a mix of successes, failures of each kind, asynchronous
//! invocations and a call through the agent; `/metrics`' `sprout_activations_stored`
//! counts the records; a restart on the same data directory keeps the records and the
//! functions; a records database of the old schema stops the daemon.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use prometheus_parse::{Scrape, Value as Metric};
use sprout_tests::*;

const OK_PY: &str = r#"
def f(event):
    print("ok", event.get("n"))
    return {"n": event.get("n")}
"#;
const RAISE_PY: &str = r#"
def f(event):
    raise ValueError("nope")
"#;
const SLOW_PY: &str = r#"
import time
def f(event):
    time.sleep(event.get("sleep", 5))
    return {"slept": event.get("sleep", 5)}
"#;
const HOG_PY: &str = r#"
def f(event):
    blocks = []
    while True:
        blocks.append(bytearray(16 << 20))
"#;
const CALLER_PY: &str = r#"
import sprout
def f(event):
    return sprout.call_async("ok", {"n": "from caller"}).result()
"#;

const NS: &str = "billed";

fn register(d: &Daemon, name: &str, dir: &Path, config: Value) {
    let mut body = json!({ "path": dir.to_str().unwrap() });
    body.as_object_mut()
        .unwrap()
        .extend(config.as_object().unwrap().clone());
    let r = d.request(
        "PUT",
        &format!("/namespaces/{NS}/functions/{name}"),
        Some("application/json"),
        body.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "register {NS}/{name}: {}", text(&r));
}

/// `POST /namespaces/billed/functions/{name}/invoke{query}`: its status and body.
fn invoke(d: &Daemon, name: &str, query: &str, event: Value) -> (u16, Value) {
    let r = d.request(
        "POST",
        &format!("/namespaces/{NS}/functions/{name}/invoke{query}"),
        Some("application/json"),
        event.to_string().as_bytes(),
    );
    let body = serde_json::from_slice(&r.body).unwrap_or_else(|_| json!(text(&r)));
    (r.status, body)
}

/// `GET /activations?{query}&limit=200`, every page.
fn records(d: &Daemon, query: &str) -> Vec<Value> {
    let mut all = Vec::new();
    for skip in (0..).step_by(200) {
        let r = d.request(
            "GET",
            &format!("/activations?{query}&limit=200&skip={skip}"),
            None,
            b"",
        );
        assert_eq!(r.status, 200, "{}", text(&r));
        let page = body_json(&r).as_array().unwrap().clone();
        if page.is_empty() {
            return all;
        }
        all.extend(page);
    }
    unreachable!()
}

/// Waits until the namespace has `n` finished records (blocking ones are written in
/// batches; asynchronous ones finish later) and returns them.
#[track_caller]
fn finished_records(d: &Daemon, n: usize) -> Vec<Value> {
    wait_for(Duration::from_secs(30), || {
        let list = records(d, &format!("namespace={NS}"));
        if list.len() == n {
            Ok(list)
        } else {
            Err(list.len())
        }
    })
    .unwrap_or_else(|got| panic!("{got} records of {NS}, want {n}"))
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// What the records add up to, in the shape of `GET /namespaces/{ns}/usage`.
fn sums(records: &[Value]) -> Value {
    let mut statuses: BTreeMap<String, u64> = [
        "success",
        "application_error",
        "action_developer_error",
        "whisk_internal_error",
    ]
    .iter()
    .map(|s| (s.to_string(), 0))
    .collect();
    let (mut duration, mut mb_ms, mut errors) = (0, 0, 0);
    for r in records {
        let status = r["status"].as_str().unwrap();
        *statuses.get_mut(status).unwrap() += 1;
        errors += u64::from(status != "success");
        duration += u(&r["duration"]);
        mb_ms += u(&r["limits"]["memory"]) * u(&r["duration"]);
    }
    json!({
        "namespace": NS,
        "invocations": records.len(),
        "errors": errors,
        "duration_ms": duration,
        "mb_ms": mb_ms,
        "statuses": statuses,
    })
}

/// `GET /metrics`, parsed as Prometheus parses it.
fn scrape(d: &Daemon) -> Scrape {
    let r = d.request("GET", "/metrics", None, b"");
    assert_eq!(r.status, 200, "{}", text(&r));
    Scrape::parse(text(&r).lines().map(|l| Ok(l.to_owned()))).expect("parse /metrics")
}

/// The one sample of `name` with `labels`.
#[track_caller]
fn metric(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = s
        .samples
        .iter()
        .filter(|x| x.metric == name)
        .filter(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match x.value {
            Metric::Counter(n) | Metric::Gauge(n) | Metric::Untyped(n) => n,
            ref other => panic!("{name}: not a number: {other:?}"),
        })
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
    found[0]
}

#[test]
fn usage_equals_the_sums_over_the_records_and_metrics_count_them() {
    let env = require_root!();
    let d = env.daemon_with(&["--stem-cells", "python=1"]);
    // Each function's memory limit (MiB) and timeout (ms; 60000 is the default).
    let limits: BTreeMap<&str, Value> = [
        ("ok", json!({"memory": 128, "timeout": 60_000})),
        ("raise", json!({"memory": 192, "timeout": 60_000})),
        ("slow", json!({"memory": 160, "timeout": 400})),
        ("hog", json!({"memory": 64, "timeout": 60_000})),
        ("caller", json!({"memory": 256, "timeout": 60_000})),
    ]
    .into_iter()
    .collect();
    register(
        &d,
        "ok",
        &env.function("ok", &[("f.py", OK_PY)]),
        json!({"memory_mb": 128}),
    );
    register(
        &d,
        "raise",
        &env.function("raise", &[("f.py", RAISE_PY)]),
        json!({"memory_mb": 192}),
    );
    register(
        &d,
        "slow",
        &env.function("slow", &[("f.py", SLOW_PY)]),
        json!({"memory_mb": 160, "timeout_ms": 400}),
    );
    register(
        &d,
        "hog",
        &env.function("hog", &[("f.py", HOG_PY)]),
        json!({"memory_mb": 64}),
    );
    register(
        &d,
        "caller",
        &env.function("caller", &[("f.py", CALLER_PY)]),
        json!({"memory_mb": 256}),
    );

    // Blocking: three successes, a raised error, a timeout, an out-of-memory kill,
    // and a call through the agent (two records: the caller's and the callee's).
    for n in 0..3 {
        let (status, body) = invoke(&d, "ok", "", json!({ "n": n }));
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(invoke(&d, "raise", "", json!({})).0, 502);
    assert_eq!(invoke(&d, "slow", "", json!({"sleep": 5})).0, 504);
    let (status, body) = invoke(&d, "hog", "", json!({}));
    assert_eq!(status, 502, "{body}");
    let (status, body) = invoke(&d, "caller", "", json!({}));
    assert_eq!((status, &body), (200, &json!({"n": "from caller"})));
    // Asynchronous: four accepted, one that times out.
    let mut accepted = Vec::new();
    for n in 10..14 {
        let (status, body) = invoke(&d, "ok", "?blocking=false", json!({ "n": n }));
        assert_eq!(status, 202, "{body}");
        accepted.push(body["activationId"].as_str().unwrap().to_owned());
    }
    let (status, body) = invoke(&d, "slow", "?blocking=false", json!({"sleep": 5}));
    assert_eq!(status, 202, "{body}");
    accepted.push(body["activationId"].as_str().unwrap().to_owned());
    // Refused requests are neither invocations nor records.
    assert_eq!(invoke(&d, "missing", "", json!({})).0, 404);
    let r = d.request(
        "POST",
        &format!("/namespaces/{NS}/functions/ok/invoke"),
        Some("application/json"),
        b"{",
    );
    assert_eq!(r.status, 400, "{}", text(&r));

    let list = finished_records(&d, 13);
    for id in &accepted {
        let rec = list
            .iter()
            .find(|r| r["activation_id"] == json!(id))
            .unwrap_or_else(|| panic!("no record of accepted {id}"));
        assert_eq!(rec["blocking"], json!(false), "{rec}");
    }
    // Each record carries its function's limits at the time.
    for r in &list {
        assert_eq!(r["limits"], limits[r["name"].as_str().unwrap()], "{r}");
    }
    let callee = list
        .iter()
        .find(|r| r["name"] == "ok" && !r["cause"].is_null())
        .expect("the callee's record");
    assert!(
        list.iter()
            .any(|r| r["name"] == "caller" && r["activation_id"] == callee["cause"]),
        "{callee}"
    );

    let want = sums(&list);
    // What the test did, as the records say it.
    assert_eq!(want["invocations"], 13, "{want}");
    assert_eq!(
        want["statuses"],
        json!({"success": 9, "application_error": 1, "action_developer_error": 3,
               "whisk_internal_error": 0}),
        "{want}"
    );
    assert!(
        u(&want["duration_ms"]) >= 800,
        "two timeouts of 400 ms: {want}"
    );

    let usage = body_json(&d.request("GET", &format!("/namespaces/{NS}/usage"), None, b""));
    for key in [
        "namespace",
        "invocations",
        "errors",
        "duration_ms",
        "mb_ms",
        "statuses",
    ] {
        assert_eq!(
            usage[key], want[key],
            "{key}: usage {usage}, records {want}"
        );
    }
    let gb_s = u(&want["mb_ms"]) as f64 / 1024.0 / 1000.0;
    assert!(
        (usage["gb_seconds"].as_f64().unwrap() - gb_s).abs() < 1e-9,
        "usage {usage}, records {gb_s} GB-s"
    );

    // The metrics say the same, and count every record the store holds.
    let s = scrape(&d);
    let ns = [("namespace", NS)];
    assert_eq!(metric(&s, "sprout_namespace_invocations_total", &ns), 13.0);
    assert_eq!(
        metric(&s, "sprout_namespace_errors_total", &ns),
        u(&want["errors"]) as f64
    );
    assert_eq!(
        metric(&s, "sprout_namespace_execution_milliseconds_total", &ns),
        u(&want["duration_ms"]) as f64
    );
    assert!((metric(&s, "sprout_namespace_gb_seconds_total", &ns) - gb_s).abs() < 1e-9);
    let stored = records(&d, "").len();
    assert_eq!(stored, 13, "only {NS} was invoked");
    assert_eq!(metric(&s, "sprout_activations_stored", &[]), stored as f64);
}

/// A graceful stop commits every record; a restart on the same data directory
/// serves them and the functions (durable registrations) without registering again.
///
/// What a `kill -9` (or a power loss) may lose instead, as docs/design.md's
/// "Activation records" says: the records of the last batch of *blocking*
/// invocations not yet committed (their clients had their answers). It never loses
/// an acceptance (`202` is sent after its pending row is durable); an accepted
/// activation that had not finished is recorded `whisk_internal_error` at the next
/// start and never run again (tests/activations.rs's
/// `a_killed_daemon_loses_no_accepted_activation_and_runs_none_twice`).
#[test]
fn a_restart_keeps_the_records_and_the_functions() {
    let env = require_root!();
    let data = env.work_dir().join("data-kept");
    let mut d = Daemon::start_on(&env, &data, &["--stem-cells", "0"]);
    register(
        &d,
        "ok",
        &env.function("ok", &[("f.py", OK_PY)]),
        json!({"memory_mb": 128}),
    );
    register(
        &d,
        "raise",
        &env.function("raise", &[("f.py", RAISE_PY)]),
        json!({}),
    );
    for n in 0..5 {
        assert_eq!(invoke(&d, "ok", "", json!({ "n": n })).0, 200);
    }
    assert_eq!(invoke(&d, "raise", "", json!({})).0, 502);
    for n in 0..2 {
        assert_eq!(
            invoke(&d, "ok", "?blocking=false", json!({ "n": n })).0,
            202
        );
    }
    let before = finished_records(&d, 8);
    // Whole records, results and logs included.
    let full = |d: &Daemon, r: &Value| -> Value {
        let id = r["activation_id"].as_str().unwrap();
        let resp = d.request("GET", &format!("/activations/{id}"), None, b"");
        assert_eq!(resp.status, 200, "{id}: {}", text(&resp));
        body_json(&resp)
    };
    let whole: Vec<Value> = before.iter().map(|r| full(&d, r)).collect();
    let status = d.terminate();
    assert!(status.success(), "{status}");
    drop(d);

    let d = Daemon::start_on(&env, &data, &["--stem-cells", "0"]);
    assert_eq!(records(&d, &format!("namespace={NS}")), before);
    for (r, w) in before.iter().zip(&whole) {
        assert_eq!(&full(&d, r), w);
    }
    // The functions answer without being registered again, at the same version.
    let (status, body) = invoke(&d, "ok", "", json!({"n": "again"}));
    assert_eq!((status, &body), (200, &json!({"n": "again"})));
    let list = finished_records(&d, 9);
    let newest = &list[0];
    assert_eq!(newest["name"], "ok", "{newest}");
    let old_ok = before.iter().find(|r| r["name"] == "ok").unwrap();
    assert_eq!(newest["version"], old_ok["version"], "{newest}");
    assert_eq!(u(&newest["limits"]["memory"]), 128, "{newest}");
    assert_eq!(invoke(&d, "raise", "", json!({})).0, 502);
    // Usage is counted in memory since this daemon started (docs/api.md); the
    // records are what survive.
    let usage = body_json(&d.request("GET", &format!("/namespaces/{NS}/usage"), None, b""));
    assert_eq!(
        (u(&usage["invocations"]), u(&usage["errors"])),
        (2, 1),
        "{usage}"
    );
}

/// sprout before records held their limits wrote schema 1: such a database stops
/// the daemon at start, naming the file and both versions, and is left as it was.
#[test]
fn a_records_database_of_schema_1_is_refused_and_left_alone() {
    let env = require_root!();
    let data = env.work_dir().join("data-v1");
    let mut d = Daemon::start_on(&env, &data, &["--stem-cells", "0"]);
    d.terminate();
    drop(d);
    let db = data.join("activations/records.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(
            "CREATE TABLE activations (id TEXT NOT NULL PRIMARY KEY, namespace TEXT NOT NULL, \
             name TEXT NOT NULL, version INTEGER NOT NULL, pending INTEGER NOT NULL, \
             blocking INTEGER NOT NULL, start_ms INTEGER NOT NULL, end_ms INTEGER NOT NULL, \
             wait_ms INTEGER NOT NULL, init_ms INTEGER NOT NULL, start_path TEXT, \
             status INTEGER NOT NULL, result TEXT, logs TEXT, \
             logs_truncated INTEGER NOT NULL DEFAULT 0, cause TEXT, \
             called INTEGER NOT NULL DEFAULT 0); PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    let socket = env.work_dir().join("refused.sock");
    let run = env
        .sprout()
        .arg("--socket")
        .arg(&socket)
        .arg("serve")
        .arg("--stem-cells")
        .arg("0")
        .arg("--data-dir")
        .arg(&data)
        .run();
    assert_ne!(run.code(), Some(0), "{run}");
    assert!(
        run.stderr.contains(&format!(
            "activation records {}: schema version 1, this sprout reads version 3",
            db.display()
        )),
        "{run}"
    );
    env.assert_clean(run.pid);
    assert!(!socket.exists());
    let conn = rusqlite::Connection::open(&db).unwrap();
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, 1);
}
