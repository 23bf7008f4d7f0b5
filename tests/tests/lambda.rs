//! AWS Lambda shapes: a custom runtime's `bootstrap` served Lambda's runtime API in
//! its sandbox (`--runtime native --handler bootstrap`), and Python handlers taking
//! `(event, context)`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use sprout_tests::{body_json, example, json, require_root, text, Env, Value};

fn bootstrap() -> Value {
    json!({ "runtime": "native", "handler": "bootstrap" })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A function directory holding one executable `bootstrap` with `script` in it.
fn bootstrap_function(env: &Env, name: &str, script: &str) -> PathBuf {
    let dir = env.function(name, &[("bootstrap", script)]);
    fs::set_permissions(dir.join("bootstrap"), fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[test]
fn a_shell_bootstrap_responds_stays_warm_and_sees_its_deadline() {
    let env = require_root!();
    let d = env.daemon();
    d.register(
        "shell",
        &example("lambda-bootstrap"),
        json!({ "runtime": "native", "handler": "bootstrap", "memory_mb": 96, "timeout_ms": 7000 }),
    );
    for n in 1..=3 {
        let before = now_ms();
        let r = d.request(
            "POST",
            "/functions/shell/invoke?logs=true",
            Some("application/json"),
            format!("{{\"n\": {n}}}").as_bytes(),
        );
        assert_eq!(r.status, 200, "{}; log:\n{}", text(&r), d.log());
        let rec = body_json(&r);
        let result = &rec["result"];
        assert_eq!(result["count"], n, "one warm bootstrap: {rec}");
        assert_eq!(result["event"], json!({ "n": n }), "{rec}");
        assert_eq!(result["function"], "shell", "{rec}");
        assert_eq!(result["memory"], 96, "{rec}");
        let id = result["request_id"].as_str().unwrap();
        assert!(
            id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{rec}"
        );
        let deadline = result["deadline_ms"].as_u64().unwrap();
        assert!(
            deadline >= before + 6000 && deadline <= now_ms() + 7000,
            "deadline {deadline} for a 7 s limit from {before}: {rec}"
        );
        assert!(
            rec["logs"]["stdout"]
                .as_str()
                .unwrap()
                .contains(&format!("bootstrap: invocation {n} ({id})")),
            "{rec}"
        );
    }
}

#[test]
fn a_bootstrap_error_is_a_handler_error_and_the_function_stays_warm() {
    let env = require_root!();
    let d = env.daemon();
    d.register("shell", &example("lambda-bootstrap"), bootstrap());
    let r = d.invoke("shell", r#"{"please": "fail"}"#);
    let err = &body_json(&r)["error"];
    assert_eq!(err["kind"], "handler_error", "{err}");
    assert_eq!(err["type"], "DeliberateFailure", "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("the event asked to fail"),
        "{err}"
    );
    assert_eq!(err["traceback"], "bootstrap: case fail", "{err}");
    let r = d.invoke("shell", "{}");
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(body_json(&r)["count"], 2, "the same bootstrap served both");
}

#[test]
fn an_init_error_or_an_early_exit_fails_the_load() {
    let env = require_root!();
    let dir = bootstrap_function(
        &env,
        "initfail",
        "#!/bin/sh\ncurl -sS -d '{\"errorType\":\"Runtime.ConfigError\",\"errorMessage\":\"no config\"}' \"http://$AWS_LAMBDA_RUNTIME_API/2018-06-01/runtime/init/error\"\nsleep 30\n",
    );
    let run = env
        .sprout()
        .arg("invoke")
        .arg(&dir)
        .args(["--runtime", "native", "--handler", "bootstrap"])
        .run();
    run.expect_code(1);
    let err = run.assert_error("load_error", "message", "no config");
    assert_eq!(err["type"], "Runtime.ConfigError", "{run}");
    env.assert_clean(run.pid);

    let dir = bootstrap_function(
        &env,
        "quitter",
        "#!/bin/sh\necho 'missing setting' >&2\nexit 4\n",
    );
    let run = env
        .sprout()
        .arg("invoke")
        .arg(&dir)
        .args(["--runtime", "native", "--handler", "bootstrap"])
        .run();
    run.expect_code(1);
    run.assert_error(
        "load_error",
        "message",
        "the bootstrap exited with status 4 before asking for an invocation",
    );
    env.assert_clean(run.pid);
}

#[test]
fn the_runtime_api_environment() {
    let env = require_root!();
    let dir = bootstrap_function(
        &env,
        "envprobe",
        r#"#!/bin/sh
api="http://$AWS_LAMBDA_RUNTIME_API/2018-06-01/runtime"
id=$(curl -sS -D - -o /dev/null "$api/invocation/next" | grep -i request-id | tr -d '\r' | cut -d' ' -f2)
curl -sS -o /dev/null -d "{\"api\":\"$AWS_LAMBDA_RUNTIME_API\",\"handler\":\"$_HANDLER\",\"root\":\"$LAMBDA_TASK_ROOT\",\"name\":\"$AWS_LAMBDA_FUNCTION_NAME\",\"version\":\"$AWS_LAMBDA_FUNCTION_VERSION\",\"memory\":\"$AWS_LAMBDA_FUNCTION_MEMORY_SIZE\",\"cwd\":\"$(pwd)\"}" "$api/invocation/$id/response"
sleep 30
"#,
    );
    let run = env
        .sprout()
        .arg("invoke")
        .arg(&dir)
        .args([
            "--runtime",
            "native",
            "--handler",
            "bootstrap",
            "--memory",
            "80",
        ])
        .run();
    run.success();
    let v = run.json();
    assert!(
        v["api"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{run}"
    );
    assert_eq!(
        v,
        json!({
            "api": v["api"], "handler": "bootstrap", "root": "/code", "name": "envprobe",
            "version": "1", "memory": "80", "cwd": "/code",
        }),
        "{run}"
    );
    env.assert_clean(run.pid);
}

#[test]
fn a_python_handler_with_event_and_context() {
    let env = require_root!();
    let d = env.daemon();
    d.register(
        "bench",
        &example("lambda-python"),
        json!({ "handler": "lambda_function:lambda_handler", "memory_mb": 160, "timeout_ms": 4000 }),
    );
    let r = d.invoke("bench", r#"{"n": 1000}"#);
    assert_eq!(r.status, 200, "{}; log:\n{}", text(&r), d.log());
    let v = body_json(&r);
    assert_eq!(v["n"], 1000, "{v}");
    assert!(v["total"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(v["function"], "bench", "{v}");
    assert_eq!(v["version"], "1", "{v}");
    assert_eq!(v["memory_mb"], "160", "{v}");
    let id = v["request_id"].as_str().unwrap();
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{v}"
    );
    let remaining = v["remaining_ms"].as_u64().unwrap();
    assert!((2000..=4000).contains(&remaining), "{v}");
    // Another invocation has its own id.
    let r = d.invoke("bench", r#"{"n": 10}"#);
    let w = body_json(&r);
    assert_ne!(w["request_id"], v["request_id"], "{w}");
}
