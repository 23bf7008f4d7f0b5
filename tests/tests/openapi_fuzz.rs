//! A property-based run of the whole API against `docs/openapi.yaml` on the TCP
//! listener: schemathesis (installed by `.ci/setup` into
//! `/opt/sprout-ci/schemathesis`) generates requests for every operation from the
//! spec, with the `*` key, and fails on any 5xx, any status or content type the spec
//! does not list, and any body outside its schema. Examples are capped to keep the
//! run short; the seed is fixed so a failure can be replayed.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use sprout_tests::{json, require_root, under_ci, workspace_root};

const SCHEMATHESIS: &str = "/opt/sprout-ci/schemathesis/bin/schemathesis";
const STAR: &str =
    "3f2c7a1e-00ff-4c4e-9a55-0000000000ff:fuzz-secret-0123456789abcdef0123456789abcd";

#[test]
fn the_api_answers_every_generated_request_within_its_spec_and_never_with_a_5xx() {
    let env = require_root!();
    if !Path::new(SCHEMATHESIS).is_file() {
        let why = format!("{SCHEMATHESIS} is missing: run .ci/setup");
        assert!(
            !under_ci(),
            "{why} (CI is set: a skipped test is a failure)"
        );
        eprintln!("skipped: {why}");
        return;
    }
    let keys = env.work_dir().join("keys");
    fs::write(&keys, format!("* {STAR}\n")).unwrap();
    fs::set_permissions(&keys, fs::Permissions::from_mode(0o600)).unwrap();
    let d = env.daemon_with(&["--listen", "127.0.0.1:0", "--auth", keys.to_str().unwrap()]);
    // Something to find: a function in `default` that answers any event (a failing
    // function is a 502, which the run would count as a server error), registered
    // by path on the socket (over TCP only uploads register), and one record.
    let dir = env.function(
        "hello",
        &[("f.py", "def f(event):\n    return {\"ok\": True}\n")],
    );
    let body = json!({ "path": dir.to_str().unwrap() }).to_string();
    let r = d.request(
        "PUT",
        "/functions/hello",
        Some("application/json"),
        body.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = d.request(
        "POST",
        "/functions/hello/invoke",
        Some("application/json"),
        b"{}",
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    let report = env.work_dir().join("schemathesis");
    let out = Command::new(SCHEMATHESIS)
        .current_dir(env.work_dir())
        .arg("run")
        .arg(workspace_root().join("docs/openapi.yaml"))
        .args(["--url", &d.tcp_url()])
        .args(["--auth", STAR])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        ])
        .args(["--phases", "coverage,fuzzing,stateful"])
        .args(["--max-examples", "50", "--seed", "14", "--workers", "1", "--no-shrink"])
        .args(["--request-timeout", "30"])
        .args(["--suppress-health-check", "all"])
        .args(["--report", "junit", "--report-dir"])
        .arg(&report)
        .env("NO_COLOR", "1")
        .env("SCHEMATHESIS_TELEMETRY", "false")
        .output()
        .expect("run schemathesis");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "schemathesis found responses outside docs/openapi.yaml (exit {:?}):\n{stdout}\n{stderr}",
        out.status.code()
    );
    // It ran: requests were generated and sent ("N generated, N passed").
    let generated: u64 = stdout
        .lines()
        .find_map(|l| l.trim().split_once(" generated,"))
        .and_then(|(n, _)| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        generated > 500,
        "schemathesis sent only {generated} requests:\n{stdout}"
    );
    // The daemon is still whole: it answers its status after the run.
    let r = d.request("GET", "/status", None, b"");
    assert_eq!(r.status, 200);
}
