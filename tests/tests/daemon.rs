//! `sprout serve`: registration, invocation over the CLI and HTTP, warm instances,
//! logs, removal, status, errors, shutdown, and concurrency.

use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use sprout_tests::{
    body_json, example, json, require_root, tar_dir, tar_files, text, Value, ECHO_LOGS_PY, HELLO_PY,
};

fn header<'a>(r: &'a sprout_tests::ClientResponse, name: &str) -> &'a str {
    r.header(name)
        .unwrap_or_else(|| panic!("response has no {name} header: {:?}", r.headers))
}

/// The CLI sends names as written: one holding `%` is refused by the name rules, not
/// percent-decoded by the agent into another name (`a%41` is not `aA`).
#[test]
fn the_cli_sends_a_name_with_a_percent_sign_as_written() {
    let env = require_root!();
    let d = env.daemon();
    d.register("aA", &example("hello"), json!({}));
    let run = d
        .cli(&env)
        .args(["invoke", "a%41", r#"{"name":"Pct"}"#])
        .run();
    run.expect_code(2);
    assert!(
        run.stderr.contains(r#"invalid function name "a%41""#),
        "{run}"
    );
    let run = d
        .cli(&env)
        .args(["fn", "add", "a%41"])
        .arg(example("hello"))
        .run();
    run.expect_code(2);
    assert!(
        run.stderr.contains(r#"invalid function name "a%41""#),
        "{run}"
    );
}

#[test]
fn register_by_path_and_invoke_via_cli_and_http() {
    let env = require_root!();
    let d = env.daemon();

    let run = d
        .cli(&env)
        .args(["fn", "add", "hello"])
        .arg(example("hello"))
        .run();
    run.success();
    let info = run.json();
    assert_eq!(info["name"], "hello", "{run}");
    assert_eq!(info["handler"], "f:f", "{run}");
    assert_eq!(
        info["path"],
        example("hello").canonicalize().unwrap().to_str().unwrap(),
        "{run}"
    );

    // CLI.
    let run = d
        .cli(&env)
        .args(["invoke", "hello", r#"{"name":"Cli"}"#])
        .run();
    run.success();
    assert_eq!(run.stdout, "\"Hello, Cli!\"\n", "{run}");

    // SPROUT_SOCKET instead of --socket.
    let run = env
        .sprout()
        .env("SPROUT_SOCKET", d.socket())
        .args(["invoke", "hello", r#"{"name":"Env"}"#])
        .run();
    run.success();
    assert_eq!(run.json(), json!("Hello, Env!"), "{run}");

    // HTTP, both routes.
    let r = d.invoke("hello", r#"{"name":"Http"}"#);
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(body_json(&r), json!("Hello, Http!"));
    let r = d.request(
        "POST",
        "/run/hello",
        Some("application/json"),
        br#"{"name":"OpenLambda"}"#,
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(body_json(&r), json!("Hello, OpenLambda!"));
    // An empty body is the empty event.
    let r = d.request("POST", "/run/hello", None, b"");
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(body_json(&r), json!("Hello, world!"));
}

#[test]
fn register_with_limits_and_handler_over_http() {
    let env = require_root!();
    let d = env.daemon();
    let info = d.register(
        "ow",
        &example("owhello"),
        json!({"handler": "__main__:main", "memory_mb": 96, "timeout_ms": 3000, "pids": 20, "cpus": 0.5}),
    );
    assert_eq!(info["handler"], "__main__:main");
    assert_eq!(info["memory_mb"], 96);
    assert_eq!(info["timeout_ms"], 3000);
    assert_eq!(info["pids"], 20);
    assert_eq!(info["cpus"], 0.5);
    let r = d.invoke("ow", r#"{"name":"Whisk"}"#);
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(body_json(&r), json!({"greeting": "Hello, Whisk!"}));
}

#[test]
fn upload_with_cli_and_raw_tar() {
    let env = require_root!();
    let d = env.daemon();

    // `fn add --upload` sends the directory as a tar archive.
    let src = env.function("uploaded", &[("f.py", HELLO_PY)]);
    let run = d
        .cli(&env)
        .args(["fn", "add", "up", "--upload"])
        .arg(&src)
        .run();
    run.success();
    // The daemon runs its own copy: changing or removing the source does nothing.
    std::fs::remove_dir_all(&src).unwrap();
    let run = d
        .cli(&env)
        .args(["invoke", "up", r#"{"name":"Upload"}"#])
        .run();
    run.success();
    assert_eq!(run.json(), json!("Hello, Upload!"), "{run}");

    // A raw PUT with an x-tar body and the configuration in the query string.
    let archive = tar_files(&[
        (
            "app.py",
            "import helper\n\ndef main(args):\n    return helper.shout(args.get('word', 'tar'))\n",
        ),
        ("helper.py", "def shout(w):\n    return w.upper() + '!'\n"),
    ]);
    let r = d.request(
        "PUT",
        "/functions/raw?handler=app%3Amain&memory_mb=80&timeout_ms=4000",
        Some("application/x-tar"),
        &archive,
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    let info = body_json(&r);
    assert_eq!(info["handler"], "app:main");
    assert_eq!(info["memory_mb"], 80);
    assert_eq!(info["timeout_ms"], 4000);
    let r = d.invoke("raw", r#"{"word":"sprout"}"#);
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(body_json(&r), json!("SPROUT!"));

    // Same through the helper that archives a directory.
    let r = d.request(
        "PUT",
        "/functions/raw2",
        Some("application/x-tar"),
        &tar_dir(&example("hello")),
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(body_json(&d.invoke("raw2", "{}")), json!("Hello, world!"));

    // Unpacked archives live in the daemon's state and go with the functions.
    let run = d.cli(&env).args(["fn", "rm", "raw"]).run();
    run.success();
}

#[test]
fn fn_ls_lists_registered_functions() {
    let env = require_root!();
    let d = env.daemon();
    d.register("alpha", &example("hello"), json!({}));
    d.register(
        "beta",
        &example("owhello"),
        json!({"handler": "__main__:main", "memory_mb": 77}),
    );

    let run = d.cli(&env).args(["fn", "ls"]).run();
    run.success();
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "a header and two functions:\n{run}");
    assert!(lines[0].contains("NAME"), "{run}");
    assert!(
        lines[1].starts_with("alpha") && lines[1].contains("f:f"),
        "{run}"
    );
    assert!(
        lines[2].starts_with("beta")
            && lines[2].contains("__main__:main")
            && lines[2].contains("77"),
        "{run}"
    );

    let r = d.request("GET", "/functions", None, b"");
    assert_eq!(r.status, 200, "{}", text(&r));
    let list = body_json(&r);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpha", "beta"]);
}

#[test]
fn second_invoke_is_warm_and_fast() {
    let env = require_root!();
    let d = env.daemon();
    d.register("hello", &example("hello"), json!({}));

    let r = d.invoke("hello", r#"{"name":"Cold"}"#);
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(header(&r, "X-Sprout-Cold"), "true");
    let cold_us: u64 = header(&r, "X-Sprout-Duration-Us").parse().unwrap();

    let mut client = d.client();
    let mut warm = Vec::new();
    for i in 0..5 {
        let started = Instant::now();
        let r = client
            .request(
                "POST",
                "/functions/hello/invoke",
                Some("application/json"),
                format!(r#"{{"name":"Warm{i}"}}"#).as_bytes(),
            )
            .unwrap();
        let wall = started.elapsed();
        assert_eq!(r.status, 200, "{}", text(&r));
        assert_eq!(body_json(&r), json!(format!("Hello, Warm{i}!")));
        assert_eq!(header(&r, "X-Sprout-Cold"), "false", "invoke {i}");
        let us: u64 = header(&r, "X-Sprout-Duration-Us").parse().unwrap();
        warm.push((us, wall));
    }
    let best = warm.iter().map(|(us, _)| *us).min().unwrap();
    assert!(
        best < 20_000,
        "a warm invoke should take well under 20 ms; took {warm:?} (cold {cold_us} us)"
    );
    assert!(
        best < cold_us,
        "warm ({warm:?}) should beat cold ({cold_us} us)"
    );
    assert!(
        warm.iter()
            .all(|(_, wall)| *wall < Duration::from_millis(500)),
        "{warm:?}"
    );
    // One sandbox served all of them.
    assert_eq!(d.sandboxes().len(), 1, "{:?}", d.sandboxes());
}

#[test]
fn logs_query_returns_the_record() {
    let env = require_root!();
    let d = env.daemon();
    let dir = env.function("echologs", &[("f.py", ECHO_LOGS_PY)]);
    d.register("echo", &dir, json!({}));

    let event = json!({"out": "hello-stdout", "err": "hello-stderr", "ret": {"n": 1}});
    let r = d.request(
        "POST",
        "/functions/echo/invoke?logs=true",
        Some("application/json"),
        event.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    let rec = body_json(&r);
    assert_eq!(rec["result"], json!({"n": 1}), "{rec}");
    assert_eq!(rec["logs"]["stdout"], "hello-stdout\n", "{rec}");
    assert_eq!(rec["logs"]["stderr"], "hello-stderr\n", "{rec}");
    assert_eq!(rec["cold"], true, "{rec}");
    assert!(rec["duration_us"].as_u64().unwrap() > 0, "{rec}");

    // The CLI's --logs against the daemon.
    let run = d
        .cli(&env)
        .args([
            "invoke",
            "echo",
            &json!({"out": "cli-out", "ret": 5}).to_string(),
            "--logs",
        ])
        .run();
    run.success();
    assert_eq!(run.json(), json!(5), "{run}");
    assert!(run.stderr.contains("cli-out"), "{run}");

    // Without ?logs only the result.
    let r = d.invoke("echo", &json!({"out": "quiet", "ret": [1]}).to_string());
    assert_eq!(body_json(&r), json!([1]));
}

#[test]
fn logs_do_not_leak_between_invocations() {
    let env = require_root!();
    let d = env.daemon();
    let dir = env.function("echologs", &[("f.py", ECHO_LOGS_PY)]);
    d.register("echo", &dir, json!({}));

    let logs_of = |event: Value| -> Value {
        let r = d.request(
            "POST",
            "/functions/echo/invoke?logs=true",
            Some("application/json"),
            event.to_string().as_bytes(),
        );
        let body = body_json(&r);
        if r.status == 200 {
            body["logs"].clone()
        } else {
            body["error"]["logs"].clone()
        }
    };

    let first = logs_of(json!({"out": "first-out", "err": "first-err"}));
    assert_eq!(first["stdout"], "first-out\n", "{first}");
    assert_eq!(first["stderr"], "first-err\n", "{first}");
    let second = logs_of(json!({"out": "second-out"}));
    assert_eq!(second["stdout"], "second-out\n", "{second}");
    assert_eq!(second["stderr"], "", "{second}");
    // A failed invocation's output stays with it too.
    let failed = logs_of(json!({"out": "failing-out", "raise": "boom"}));
    assert!(
        failed.to_string().contains("failing-out"),
        "a failed invocation carries its logs: {failed}"
    );
    let after = logs_of(json!({"err": "after-err"}));
    assert_eq!(after["stdout"], "", "{after}");
    assert_eq!(after["stderr"], "after-err\n", "{after}");
    // All on one warm instance.
    assert_eq!(d.sandboxes().len(), 1, "{:?}", d.sandboxes());
}

#[test]
fn reregistering_replaces_the_code() {
    let env = require_root!();
    let d = env.daemon();
    let v1 = "def f(event):\n    return 'v1'\n";
    let v2 = "def f(event):\n    return 'v2'\n";
    let dir = env.function("versioned", &[("f.py", v1)]);
    d.register("v", &dir, json!({}));
    assert_eq!(body_json(&d.invoke("v", "{}")), json!("v1"));
    // Warm now: a changed file is not seen until the function is registered again.
    let old = d.sandboxes();
    assert_eq!(old.len(), 1);

    std::fs::write(dir.join("f.py"), v2).unwrap();
    d.register("v", &dir, json!({}));
    let r = d.invoke("v", "{}");
    assert_eq!(body_json(&r), json!("v2"));
    assert_eq!(
        header(&r, "X-Sprout-Cold"),
        "true",
        "new code needs a new sandbox"
    );
    let now = d.sandboxes();
    assert_eq!(now.len(), 1, "the old sandbox was destroyed: {now:?}");
    assert_ne!(now, old);

    // Another directory, then an upload, under the same name.
    let other = env.function("other", &[("f.py", "def f(event):\n    return 'other'\n")]);
    d.register("v", &other, json!({}));
    assert_eq!(body_json(&d.invoke("v", "{}")), json!("other"));
    let r = d.request(
        "PUT",
        "/functions/v",
        Some("application/x-tar"),
        &tar_files(&[("f.py", "def f(event):\n    return 'tarred'\n")]),
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(body_json(&d.invoke("v", "{}")), json!("tarred"));
    let run = d.cli(&env).args(["fn", "ls"]).run();
    run.success();
    assert_eq!(run.stdout.lines().count(), 2, "still one function:\n{run}");
}

#[test]
fn removed_function_is_not_found() {
    let env = require_root!();
    let d = env.daemon();
    d.register("gone", &example("hello"), json!({}));
    assert_eq!(d.invoke("gone", "{}").status, 200);
    assert_eq!(d.sandboxes().len(), 1);

    let run = d.cli(&env).args(["fn", "rm", "gone"]).run();
    run.success();
    assert_eq!(run.json(), json!({"removed": "gone"}), "{run}");
    assert_eq!(
        d.sandboxes(),
        Vec::<String>::new(),
        "its warm sandbox goes too"
    );

    let r = d.invoke("gone", "{}");
    assert_eq!(r.status, 404, "{}", text(&r));
    assert_eq!(body_json(&r)["error"]["kind"], "not_found");
    let run = d.cli(&env).args(["invoke", "gone"]).run();
    run.expect_code(2);
    assert!(run.stderr.contains("gone"), "{run}");
    let run = d.cli(&env).args(["fn", "rm", "gone"]).run();
    run.expect_code(2);
    let run = d.cli(&env).args(["fn", "ls"]).run();
    run.success();
    assert_eq!(run.stdout.lines().count(), 1, "{run}");
}

#[test]
fn status_reports_counts() {
    let env = require_root!();
    let d = env.daemon();
    let r = d.request("GET", "/status", None, b"");
    assert_eq!(r.status, 200, "{}", text(&r));
    let s = body_json(&r);
    assert_eq!(s["cgroup"], "v1", "{s}");
    assert_eq!(s["functions"], 0, "{s}");
    assert_eq!(s["invocations"], 0, "{s}");
    assert_eq!(s["sandboxes"], 0, "{s}");
    assert!(s["version"].is_string(), "{s}");

    d.register("hello", &example("hello"), json!({}));
    for _ in 0..3 {
        assert_eq!(d.invoke("hello", "{}").status, 200);
    }
    let run = d.cli(&env).arg("status").run();
    run.success();
    let s = run.json();
    assert_eq!(s["functions"], 1, "{s}");
    assert_eq!(s["invocations"], 3, "{s}");
    assert_eq!(s["sandboxes"], 1, "{s}");
    assert!(s["uptime_ms"].as_u64().is_some(), "{s}");
}

#[test]
fn invalid_event_is_400_and_starts_nothing() {
    let env = require_root!();
    let d = env.daemon();
    d.register("hello", &example("hello"), json!({}));
    let r = d.invoke("hello", "{nope");
    assert_eq!(r.status, 400, "{}", text(&r));
    let err = body_json(&r)["error"].clone();
    assert_eq!(err["kind"], "invalid_event", "{err}");
    assert_eq!(
        d.sandboxes(),
        Vec::<String>::new(),
        "no sandbox was created"
    );

    // The CLI refuses it before talking to the daemon.
    let run = d.cli(&env).args(["invoke", "hello", "[1,"]).run();
    run.expect_code(2);
    assert!(run.stderr.contains("invalid event JSON"), "{run}");

    let s = body_json(&d.request("GET", "/status", None, b""));
    assert_eq!(s["sandboxes"], 0, "{s}");
    assert_eq!(d.sandboxes(), Vec::<String>::new());
}

#[test]
fn unknown_function_and_bad_requests() {
    let env = require_root!();
    let d = env.daemon();
    let r = d.invoke("nobody", "{}");
    assert_eq!(r.status, 404, "{}", text(&r));
    let err = body_json(&r)["error"].clone();
    assert_eq!(err["kind"], "not_found", "{err}");
    assert!(err["message"].as_str().unwrap().contains("nobody"), "{err}");
    assert_eq!(d.request("POST", "/run/nobody", None, b"{}").status, 404);
    assert_eq!(
        d.request("DELETE", "/functions/nobody", None, b"").status,
        404
    );

    // Registration errors.
    let r = d.request(
        "PUT",
        "/functions/x",
        Some("application/json"),
        br#"{"path": "/no/such/dir"}"#,
    );
    assert_eq!(r.status, 400, "{}", text(&r));
    let r = d.request("PUT", "/functions/x", Some("application/json"), b"{bad");
    assert_eq!(r.status, 400, "{}", text(&r));
    let r = d.request(
        "PUT",
        "/functions/x",
        Some("application/json"),
        json!({"path": example("hello"), "handler": "missing:f"})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(r.status, 400, "{}", text(&r));
    assert_eq!(
        body_json(&d.request("GET", "/functions", None, b"")),
        json!([])
    );
    assert_eq!(d.sandboxes(), Vec::<String>::new());
}

#[test]
fn function_errors_over_http() {
    let env = require_root!();
    let d = env.daemon();
    let raiser = env.function(
        "raiser",
        &[("f.py", "def f(event):\n    raise KeyError('missing')\n")],
    );
    d.register("raiser", &raiser, json!({}));
    let r = d.invoke("raiser", "{}");
    assert_eq!(r.status, 502, "{}", text(&r));
    let err = body_json(&r)["error"].clone();
    assert_eq!(err["kind"], "handler_error", "{err}");
    assert_eq!(err["type"], "KeyError", "{err}");
    assert!(err["traceback"].as_str().unwrap().contains("f.py"), "{err}");
    // The instance survives a raised exception.
    assert_eq!(d.invoke("raiser", "{}").status, 502);
    assert_eq!(d.sandboxes().len(), 1, "{:?}", d.sandboxes());
    let run = d.cli(&env).args(["invoke", "raiser"]).run();
    run.expect_code(1);
    assert_eq!(run.error()["type"], "KeyError", "{run}");

    let sleepy = env.function(
        "sleepy",
        &[("f.py", "import time\n\ndef f(event):\n    time.sleep(10)\n")],
    );
    d.register("sleepy", &sleepy, json!({"timeout_ms": 400}));
    let started = Instant::now();
    let r = d.invoke("sleepy", "{}");
    assert_eq!(r.status, 504, "{}", text(&r));
    assert!(started.elapsed() < Duration::from_secs(5));
    let err = body_json(&r)["error"].clone();
    assert_eq!(err["kind"], "timeout", "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("timed out after 400 ms"),
        "{err}"
    );
    let run = d.cli(&env).args(["invoke", "sleepy"]).run();
    run.expect_code(1);
    // The timed-out sandboxes are gone; the raiser's stays warm.
    assert_eq!(d.sandboxes().len(), 1, "{:?}", d.sandboxes());
}

#[test]
fn sigterm_shuts_down_cleanly() {
    let env = require_root!();
    let mut d = env.daemon();
    d.register("hello", &example("hello"), json!({}));
    assert_eq!(d.invoke("hello", "{}").status, 200);
    assert_eq!(d.sandboxes().len(), 1);
    let pid = d.pid();

    let status = d.terminate();
    assert!(
        status.success(),
        "sprout serve should exit 0 after SIGTERM, got {status}; log:\n{}",
        d.log()
    );
    assert!(!d.socket().exists(), "the socket file is removed");
    // Everything is gone by the time the process has exited.
    env.assert_clean(pid);
}

/// Shutting down does not depend on the call socket's path: with the socket file gone
/// (someone removed it, or the state directory under it), SIGTERM still ends the
/// daemon at once and cleanly.
#[test]
fn sigterm_shuts_down_cleanly_without_the_call_socket_file() {
    let env = require_root!();
    let mut d = env.daemon();
    d.register("hello", &example("hello"), json!({}));
    assert_eq!(d.invoke("hello", "{}").status, 200);
    let pid = d.pid();
    let call_socket = env
        .state_dir()
        .join(pid.to_string())
        .join("runtime/agent.sock");
    std::fs::remove_file(&call_socket)
        .unwrap_or_else(|e| panic!("remove {}: {e}", call_socket.display()));

    let status = d.terminate();
    assert!(
        status.success(),
        "sprout serve should exit 0 after SIGTERM, got {status}; log:\n{}",
        d.log()
    );
    env.assert_clean(pid);
}

#[test]
fn sigint_shuts_down_cleanly() {
    let env = require_root!();
    let mut d = env.daemon();
    d.register("hello", &example("hello"), json!({}));
    assert_eq!(d.invoke("hello", "{}").status, 200);
    let pid = d.pid();
    let status = d.stop(nix::sys::signal::Signal::SIGINT);
    assert!(
        status.success(),
        "sprout serve should exit 0 after SIGINT, got {status}; log:\n{}",
        d.log()
    );
    assert!(!d.socket().exists(), "the socket file is removed");
    env.assert_clean(pid);
}

#[test]
fn curl_over_the_unix_socket() {
    let env = require_root!();
    let d = env.daemon();
    let curl = Path::new("/usr/bin/curl");
    assert!(curl.is_file(), "/usr/bin/curl is required for this test");
    let sock = d.socket().to_str().unwrap().to_owned();

    let put = Command::new(curl)
        .args(["-sS", "--unix-socket", &sock, "-X", "PUT"])
        .args(["-H", "Content-Type: application/json"])
        .arg("--data-binary")
        .arg(json!({"path": example("hello")}).to_string())
        .args(["-w", "\n%{http_code}", "http://localhost/functions/curled"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&put.stdout).into_owned();
    assert!(put.status.success(), "curl PUT failed: {put:?}");
    assert!(out.ends_with("\n200"), "{out}");
    assert!(out.contains("\"name\":\"curled\""), "{out}");

    for path in ["/functions/curled/invoke", "/run/curled"] {
        let post = Command::new(curl)
            .args(["-sS", "-i", "--unix-socket", &sock, "-X", "POST"])
            .args(["-H", "Content-Type: application/json"])
            .args(["--data-binary", r#"{"name":"Curl"}"#])
            .arg(format!("http://localhost{path}"))
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&post.stdout).into_owned();
        assert!(post.status.success(), "curl POST failed: {post:?}");
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.to_lowercase().contains("x-sprout-cold:"), "{out}");
        assert!(out.ends_with("\"Hello, Curl!\""), "{out}");
    }
}

#[test]
fn twenty_concurrent_invokes() {
    let env = require_root!();
    let d = env.daemon();
    d.register("hello", &example("hello"), json!({}));
    let results: Vec<(usize, u16, String)> = thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let d = &d;
                s.spawn(move || {
                    let r = d.invoke("hello", &json!({"name": format!("n{i}")}).to_string());
                    (i, r.status, text(&r))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, status, body) in &results {
        assert_eq!(*status, 200, "invoke {i}: {body}");
        assert_eq!(body, &format!("\"Hello, n{i}!\""), "invoke {i}");
    }
    let s = body_json(&d.request("GET", "/status", None, b""));
    assert_eq!(s["invocations"], 20, "{s}");
    // And it still works afterwards, warm.
    let r = d.invoke("hello", r#"{"name":"after"}"#);
    assert_eq!(body_json(&r), json!("Hello, after!"));
    assert_eq!(header(&r, "X-Sprout-Cold"), "false");
}
