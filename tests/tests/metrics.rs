//! `GET /metrics` parsed as a Prometheus scraper parses it (the text format 0.0.4,
//! with `prometheus-parse`), its values checked against what the test did and
//! against `GET /status`; and `GET /namespaces/{ns}/usage` after a known number of
//! invocations of a known memory limit.

use std::path::Path;
use std::time::Duration;

use prometheus_parse::{Sample, Scrape, Value as Metric};
use sprout_tests::{body_json, json, require_root, text, wait_for, Daemon, Value, ECHO_LOGS_PY};

fn scrape(d: &Daemon) -> Scrape {
    let r = d.request("GET", "/metrics", None, b"");
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let body = text(&r);
    // Every line is a comment or a sample: nothing the parser would skip.
    for line in body.lines() {
        assert!(
            line.starts_with("# HELP ")
                || line.starts_with("# TYPE ")
                || line.starts_with("sprout_"),
            "not Prometheus text: {line:?}"
        );
    }
    Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("parse /metrics")
}

/// The samples of `name` whose labels include every one of `labels`.
fn samples<'a>(s: &'a Scrape, name: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    s.samples
        .iter()
        .filter(|x| x.metric == name)
        .filter(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .collect()
}

fn number(v: &Metric) -> f64 {
    match v {
        Metric::Counter(n) | Metric::Gauge(n) | Metric::Untyped(n) => *n,
        other => panic!("not a number: {other:?}"),
    }
}

/// The sum of the samples of `name` with `labels`.
fn sum(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(s, name, labels)
        .iter()
        .map(|x| number(&x.value))
        .sum()
}

/// Asserts that `name` is a counter (or gauge) with `labels` whose values add up to
/// `want`.
#[track_caller]
fn assert_sum(s: &Scrape, name: &str, labels: &[(&str, &str)], want: f64) {
    let found = samples(s, name, labels);
    assert!(!found.is_empty(), "no {name} {labels:?}");
    let got = sum(s, name, labels);
    assert!(
        (got - want).abs() < 1e-9,
        "{name} {labels:?}: {got}, not {want}"
    );
}

fn register(d: &Daemon, ns: &str, name: &str, dir: &Path, memory_mb: u64) {
    let body = json!({ "path": dir.to_str().unwrap(), "memory_mb": memory_mb });
    let r = d.request(
        "PUT",
        &format!("/namespaces/{ns}/functions/{name}"),
        Some("application/json"),
        body.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "register {ns}/{name}: {}", text(&r));
}

/// Invokes `ns/name` with `event`; its status and its `X-Sprout-Duration-Us`.
fn invoke(d: &Daemon, ns: &str, name: &str, event: Value) -> (u16, Option<u64>) {
    let r = d.request(
        "POST",
        &format!("/namespaces/{ns}/functions/{name}/invoke"),
        Some("application/json"),
        event.to_string().as_bytes(),
    );
    let us = r.header("x-sprout-duration-us").map(|v| v.parse().unwrap());
    (r.status, us)
}

#[test]
fn metrics_and_usage_count_what_was_done() {
    let env = require_root!();
    let d = env.daemon_with(&["--stem-cells", "python=1"]);
    let dir = env.function("echo", &[("f.py", ECHO_LOGS_PY)]);
    register(&d, "team-a", "f", &dir, 128);
    register(&d, "team-b", "g", &dir, 256);

    // team-a: four successes; their durations as the responses said.
    let mut micros = Vec::new();
    for i in 0..4 {
        let (status, us) = invoke(&d, "team-a", "f", json!({ "ret": i }));
        assert_eq!(status, 200);
        micros.push(us.expect("X-Sprout-Duration-Us"));
    }
    // team-b: one success, two raised errors (application errors), and one
    // invocation of a function that does not exist (not an invocation at all).
    assert_eq!(invoke(&d, "team-b", "g", json!({})).0, 200);
    for _ in 0..2 {
        assert_eq!(invoke(&d, "team-b", "g", json!({ "raise": "no" })).0, 502);
    }
    assert_eq!(invoke(&d, "team-b", "missing", json!({})).0, 404);

    let s = scrape(&d);
    let status = d.status();

    // Invocations by function, start path and status.
    let f = [("namespace", "team-a"), ("function", "f")];
    assert_sum(&s, "sprout_invocations_total", &f, 4.0);
    assert_sum(
        &s,
        "sprout_invocations_total",
        &[f[0], f[1], ("status", "success")],
        4.0,
    );
    // The first was a cold start (from the stem cell or in a new sandbox), the rest
    // warm (or thawed, had the instance been frozen between two).
    let cold = sum(
        &s,
        "sprout_invocations_total",
        &[f[0], f[1], ("start", "stem_cell")],
    ) + sum(
        &s,
        "sprout_invocations_total",
        &[f[0], f[1], ("start", "new_sandbox")],
    );
    assert_eq!(cold, 1.0);
    let g = [("namespace", "team-b"), ("function", "g")];
    assert_sum(
        &s,
        "sprout_invocations_total",
        &[g[0], g[1], ("status", "application_error")],
        2.0,
    );
    assert_sum(&s, "sprout_invocations_total", &g, 3.0);
    assert!(samples(&s, "sprout_invocations_total", &[("function", "missing")]).is_empty());
    assert_sum(
        &s,
        "sprout_invocations_started_total",
        &[],
        status["invocations"].as_f64().unwrap(),
    );

    // Latency: one histogram per namespace and start path, four observations for
    // team-a in all, every one at most 60 s.
    let histograms = samples(
        &s,
        "sprout_invocation_duration_seconds",
        &[("namespace", "team-a")],
    );
    let mut observed = 0.0;
    for h in &histograms {
        let Metric::Histogram(buckets) = &h.value else {
            panic!("not a histogram: {h:?}");
        };
        let inf = buckets.iter().find(|b| b.less_than.is_infinite()).unwrap();
        let sixty = buckets.iter().find(|b| b.less_than == 60.0).unwrap();
        assert_eq!(inf.count, sixty.count, "{h:?}");
        assert!(
            buckets.windows(2).all(|w| w[0].count <= w[1].count),
            "{h:?}"
        );
        observed += inf.count;
    }
    assert_eq!(observed, 4.0);

    // Per-namespace usage, in the metrics and in GET /namespaces/{ns}/usage: the
    // whole milliseconds of each record's duration (from when its instance took it),
    // never more than its client's duration (which includes its wait).
    let records = wait_for(Duration::from_secs(10), || {
        let r = d.request("GET", "/activations?namespace=team-a&limit=200", None, b"");
        let list = body_json(&r);
        match list.as_array() {
            Some(l) if l.len() == 4 => Ok(l.clone()),
            _ => Err(list),
        }
    })
    .unwrap_or_else(|seen| panic!("team-a's four records never came: {seen}"));
    let ms: u64 = records
        .iter()
        .map(|r| r["duration"].as_u64().expect("a record's duration"))
        .sum();
    let client_ms: u64 = micros.iter().map(|us| us.div_ceil(1000)).sum();
    assert!(ms <= client_ms, "records {ms} ms, responses {client_ms} ms");
    let a = [("namespace", "team-a")];
    assert_sum(&s, "sprout_namespace_invocations_total", &a, 4.0);
    assert_sum(&s, "sprout_namespace_errors_total", &a, 0.0);
    assert_sum(
        &s,
        "sprout_namespace_execution_milliseconds_total",
        &a,
        ms as f64,
    );
    let b = [("namespace", "team-b")];
    assert_sum(&s, "sprout_namespace_invocations_total", &b, 3.0);
    assert_sum(&s, "sprout_namespace_errors_total", &b, 2.0);

    let r = d.request("GET", "/namespaces/team-a/usage", None, b"");
    assert_eq!(r.status, 200, "{}", text(&r));
    let usage = body_json(&r);
    assert_eq!(usage["namespace"], "team-a");
    assert_eq!(usage["invocations"], 4, "{usage}");
    assert_eq!(usage["errors"], 0, "{usage}");
    assert_eq!(usage["duration_ms"], ms, "{usage}");
    assert_eq!(usage["mb_ms"], ms * 128, "{usage}");
    let gb_s = usage["gb_seconds"].as_f64().unwrap();
    assert!(
        (gb_s - (ms * 128) as f64 / 1024.0 / 1000.0).abs() < 1e-9,
        "{usage}"
    );
    assert_sum(&s, "sprout_namespace_gb_seconds_total", &a, gb_s);
    assert_eq!(usage["statuses"]["success"], 4, "{usage}");

    let usage = body_json(&d.request("GET", "/namespaces/team-b/usage", None, b""));
    assert_eq!(
        (usage["invocations"].as_u64(), usage["errors"].as_u64()),
        (Some(3), Some(2))
    );
    assert_eq!(usage["statuses"]["application_error"], 2, "{usage}");
    assert_eq!(
        usage["mb_ms"].as_u64().unwrap(),
        usage["duration_ms"].as_u64().unwrap() * 256,
        "{usage}"
    );
    // A namespace never invoked has zeros; an invalid one is a 400.
    let usage = body_json(&d.request("GET", "/namespaces/nobody/usage", None, b""));
    assert_eq!(
        (usage["invocations"].as_u64(), usage["mb_ms"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(
        d.request("GET", "/namespaces/_/usage", None, b"").status,
        400
    );

    // What the components know, as GET /status says it (once the pool manager has
    // refilled the stem cell, so that both read the same pool).
    let (s, status) = wait_for(Duration::from_secs(30), || {
        let before = d.status();
        let s = scrape(&d);
        let after = d.status();
        let same = before["sandboxes"] == after["sandboxes"]
            && before["stem_cells"] == after["stem_cells"]
            && sum(&s, "sprout_sandboxes", &[]) == after["sandboxes"].as_f64().unwrap();
        if same {
            Ok((s, after))
        } else {
            Err(after)
        }
    })
    .unwrap_or_else(|status| panic!("the sandboxes never settled: {status}"));
    assert_sum(&s, "sprout_queue_depth", &f, 0.0);
    assert_sum(&s, "sprout_in_flight", &f, 0.0);
    assert_sum(
        &s,
        "sprout_sandboxes",
        &[("state", "stem_cell")],
        status["stem_cells"].as_f64().unwrap(),
    );
    for (runtime, n) in status["stem_cells_by_runtime"].as_object().unwrap() {
        assert_sum(
            &s,
            "sprout_stem_cells",
            &[("runtime", runtime.as_str())],
            n.as_f64().unwrap(),
        );
    }
    assert_sum(&s, "sprout_functions", &[], 2.0);
    assert_sum(
        &s,
        "sprout_memory_budget_bytes",
        &[],
        status["memory_budget_mb"].as_f64().unwrap() * 1048576.0,
    );
    assert!(sum(&s, "sprout_memory_reserved_bytes", &[]) >= 384.0 * 1048576.0);
    assert_sum(
        &s,
        "sprout_package_installs_total",
        &[],
        status["packages_installed"].as_f64().unwrap(),
    );
    assert_sum(
        &s,
        "sprout_package_cache_hits_total",
        &[],
        status["package_cache_hits"].as_f64().unwrap(),
    );
    assert!(samples(&s, "sprout_admission_refusals_total", &[]).is_empty());
}
