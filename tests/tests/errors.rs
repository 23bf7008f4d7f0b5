//! Failures of `sprout invoke DIR`: what is printed, the exit code, and that each
//! leaves nothing behind.

use std::fs;
use std::time::Duration;

use sprout_tests::{example, require_root, Env, Run, HELLO_PY};

/// The state directory of a dead agent, planted in the test's state directory before
/// a command runs: every agent that starts removes it with the other leftovers of
/// stopped agents, so while it is there, no agent started (one that did and cleaned
/// up after itself leaves the state directory just as empty as it found it).
const CANARY: &str = "999999999";

fn plant_canary(env: &Env) {
    let dir = env.state_dir().join(CANARY);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("lock"), "").unwrap();
}

/// What shows that an agent was started since [`plant_canary`], if anything did.
fn agent_started(env: &Env) -> Option<String> {
    let entries: Vec<_> = match fs::read_dir(env.state_dir()) {
        Ok(it) => it.filter_map(Result::ok).map(|e| e.file_name()).collect(),
        Err(e) => return Some(format!("the state directory is gone ({e})")),
    };
    if entries != [CANARY] {
        return Some(format!(
            "the state directory holds {entries:?} instead of the planted {CANARY:?} alone"
        ));
    }
    if !env.state_dir().join(CANARY).join("lock").is_file() {
        return Some(format!("the planted {CANARY}/lock is gone"));
    }
    None
}

/// Asserts that no agent was started by `run` (the canary planted before it is
/// untouched, and nothing else is there), then removes the canary.
#[track_caller]
fn assert_nothing_started(env: &Env, run: &Run) {
    if let Some(why) = agent_started(env) {
        panic!("an agent was started: {why}\n{run}");
    }
    fs::remove_dir_all(env.state_dir().join(CANARY)).unwrap();
    env.assert_clean(run.pid);
}

/// The check above can fail: an agent that starts and cleans up after itself is seen.
#[test]
fn the_nothing_started_check_sees_an_agent_that_started_and_cleaned_up() {
    let env = require_root!();
    plant_canary(&env);
    let dir = env.function("hello", &[("f.py", HELLO_PY)]);
    let run = env.sprout().arg("invoke").arg(&dir).run();
    run.success();
    assert_eq!(run.stdout.trim(), r#""Hello, world!""#, "{run}");
    let seen = agent_started(&env);
    assert!(
        seen.is_some(),
        "an agent ran and the check saw nothing\n{run}"
    );
    let _ = fs::remove_dir_all(env.state_dir().join(CANARY));
    env.assert_clean(run.pid);
}

#[test]
fn raised_exception() {
    let env = require_root!();
    let dir = env.function(
        "raiser",
        &[(
            "f.py",
            "def helper(x):\n    raise ValueError('bad value: ' + str(x))\n\ndef f(event):\n    return helper(event.get('x'))\n",
        )],
    );
    let run = env
        .sprout()
        .arg("invoke")
        .arg(&dir)
        .arg(r#"{"x": 42}"#)
        .run();
    run.expect_code(1);
    let err = run.error();
    assert_eq!(err["kind"], "handler_error", "{run}");
    assert_eq!(err["type"], "ValueError", "{run}");
    let message = err["message"].as_str().unwrap();
    assert!(
        message.contains("function raiser raised ValueError: bad value: 42"),
        "{run}"
    );
    let tb = err["traceback"].as_str().expect("a traceback");
    assert!(tb.contains("f.py"), "traceback names the file:\n{tb}");
    assert!(tb.contains("helper"), "traceback names the frames:\n{tb}");
    assert!(
        run.stderr
            .contains("sprout: function raiser raised ValueError: bad value: 42"),
        "{run}"
    );
    env.assert_clean(run.pid);
}

#[test]
fn out_of_memory() {
    let env = require_root!();
    let dir = env.function(
        "hog",
        &[(
            "f.py",
            "def f(event):\n    chunks = []\n    for _ in range(200):\n        chunks.append(bytearray(1 << 20))\n    return len(chunks)\n",
        )],
    );
    let run = env
        .sprout()
        .arg("invoke")
        .arg(&dir)
        .args(["--memory", "64"])
        .run();
    run.expect_code(1);
    let err = run.assert_error("out_of_memory", "message", "out of memory");
    assert!(err["message"].as_str().unwrap().contains("64 MiB"), "{run}");
    assert!(run.stderr.contains("ran out of memory"), "{run}");
    env.assert_clean(run.pid);
}

#[test]
fn timeout() {
    let env = require_root!();
    let dir = env.function(
        "sleepy",
        &[(
            "f.py",
            "import time\n\ndef f(event):\n    time.sleep(10)\n    return 'woke up'\n",
        )],
    );
    let run = env
        .sprout()
        .arg("invoke")
        .arg(&dir)
        .args(["--timeout", "500"])
        .run();
    run.expect_code(1);
    run.assert_error(
        "timeout",
        "message",
        "function sleepy timed out after 500 ms",
    );
    assert!(run.stderr.contains("timed out after 500 ms"), "{run}");
    assert!(
        run.elapsed < Duration::from_secs(5),
        "sprout should give up after 500 ms, not wait for the function: {:?}",
        run.elapsed
    );
    env.assert_clean(run.pid);
}

#[test]
fn timeout_with_a_busy_loop() {
    let env = require_root!();
    let dir = env.function(
        "spinner",
        &[("f.py", "def f(event):\n    while True:\n        pass\n")],
    );
    let run = env
        .sprout()
        .arg("invoke")
        .arg(&dir)
        .args(["--timeout", "300"])
        .run();
    run.expect_code(1);
    assert_eq!(run.error()["kind"], "timeout", "{run}");
    assert!(run.elapsed < Duration::from_secs(5), "{:?}", run.elapsed);
    env.assert_clean(run.pid);
}

#[test]
fn invalid_event_json_starts_nothing() {
    let env = require_root!();
    plant_canary(&env);
    let run = env
        .sprout()
        .arg("invoke")
        .arg(example("hello"))
        .arg("{not json")
        .run();
    run.expect_code(2);
    assert!(run.stderr.contains("sprout: invalid event JSON"), "{run}");
    assert_eq!(run.stdout, "", "{run}");
    assert_nothing_started(&env, &run);
}

#[test]
fn missing_directory_starts_nothing() {
    let env = require_root!();
    plant_canary(&env);
    let missing = env.work_dir().join("no-such-function");
    let run = env.sprout().arg("invoke").arg(&missing).run();
    run.expect_code(2);
    assert!(
        run.stderr.contains(&format!(
            "function directory {} does not exist",
            missing.display()
        )),
        "{run}"
    );
    assert_eq!(run.stdout, "", "{run}");
    assert_nothing_started(&env, &run);
}

/// Bad input is refused before anything starts, a missing handler file included.
#[test]
fn missing_handler_file_starts_nothing() {
    let env = require_root!();
    let dir = env.function("nohandler", &[("f.py", "def f(event):\n    return 1\n")]);
    plant_canary(&env);
    let run = env
        .sprout()
        .arg("invoke")
        .arg(&dir)
        .args(["--handler", "app:main"])
        .run();
    run.expect_code(2);
    assert!(
        run.stderr.contains(&format!(
            "handler app:main needs app.py in {}, which does not exist",
            dir.display()
        )),
        "{run}"
    );
    assert_eq!(run.stdout, "", "{run}");
    assert_nothing_started(&env, &run);
}

#[test]
fn handler_function_missing_in_existing_file() {
    let env = require_root!();
    let dir = env.function("nofunc", &[("f.py", "def f(event):\n    return 1\n")]);
    let run = env
        .sprout()
        .arg("invoke")
        .arg(&dir)
        .args(["--handler", "f:g"])
        .run();
    run.expect_code(1);
    let err = run.assert_error(
        "load_error",
        "message",
        "function nofunc: handler f:g failed to load: AttributeError",
    );
    assert_eq!(err["type"], "AttributeError", "{run}");
    env.assert_clean(run.pid);
}

#[test]
fn handler_module_fails_to_import() {
    let env = require_root!();
    let dir = env.function(
        "badimport",
        &[(
            "f.py",
            "import module_that_does_not_exist\n\ndef f(event):\n    return 1\n",
        )],
    );
    let run = env.sprout().arg("invoke").arg(&dir).run();
    run.expect_code(1);
    let err = run.assert_error("load_error", "traceback", "f.py");
    assert_eq!(err["type"], "ModuleNotFoundError", "{run}");
    env.assert_clean(run.pid);
}

#[test]
fn write_to_usr_fails_read_only() {
    let env = require_root!();
    let dir = env.function(
        "usrwriter",
        &[(
            "f.py",
            "def f(event):\n    with open('/usr/sprout-was-here', 'w') as fh:\n        fh.write('x')\n    return 'wrote'\n",
        )],
    );
    let run = env.sprout().arg("invoke").arg(&dir).run();
    run.expect_code(1);
    run.assert_error("handler_error", "message", "Read-only file system");
    assert!(
        !std::path::Path::new("/usr/sprout-was-here").exists(),
        "the host's /usr was written to"
    );
    env.assert_clean(run.pid);
}

#[test]
fn result_not_json_serialisable() {
    let env = require_root!();
    let dir = env.function(
        "badresult",
        &[("f.py", "def f(event):\n    return {1, 2, 3}\n")],
    );
    let run = env.sprout().arg("invoke").arg(&dir).run();
    run.expect_code(1);
    let err = run.error();
    let kind = err["kind"].as_str().unwrap();
    assert!(
        kind == "handler_error" || kind == "bad_result",
        "kind {kind}\n{run}"
    );
    let message = err["message"].as_str().unwrap();
    assert!(
        message.contains("function badresult")
            && (message.contains("result is not JSON")
                || message.contains("result that is not JSON")),
        "the message says the result is not JSON:\n{run}"
    );
    env.assert_clean(run.pid);
}

#[test]
fn function_that_exits_the_process() {
    let env = require_root!();
    let dir = env.function(
        "quitter",
        &[("f.py", "import os\n\ndef f(event):\n    os._exit(3)\n")],
    );
    let run = env.sprout().arg("invoke").arg(&dir).run();
    run.expect_code(1);
    assert_eq!(run.error()["kind"], "instance_died", "{run}");
    env.assert_clean(run.pid);
}

#[test]
fn daemon_flags_without_a_daemon() {
    let env = require_root!();
    let run = env.sprout().args(["fn", "ls"]).run();
    run.expect_code(2);
    assert!(run.stderr.contains("--socket"), "{run}");
    env.assert_clean(run.pid);
}

/// Exit code 3, sprout itself failed: the embedded agent cannot make its state
/// directory. The message names the directory and why; nothing is left behind.
#[test]
fn an_unusable_state_directory_is_sprouts_own_failure() {
    let env = require_root!();
    let file = env.work_dir().join("sprout-not-a-directory");
    fs::write(&file, "a file").unwrap();
    let state = file.join("state");
    let run = env
        .sprout_in(&state)
        .arg("invoke")
        .arg(example("hello"))
        .arg(r#"{"name": "Alice"}"#)
        .run();
    run.expect_code(3);
    // The state root is made first (private, if sprout makes it), then the agent's own
    // directory in it: the root is what cannot be made here.
    assert!(
        run.stderr.contains(&format!(
            "sprout: start the embedded agent: create {}: Not a directory",
            state.display()
        )),
        "{run}"
    );
    assert_eq!(run.stdout, "", "{run}");
    assert_eq!(fs::read_to_string(&file).unwrap(), "a file");
    env.assert_clean(run.pid);
}

/// Exit code 3 from a failed invocation: a `sprout-shim` that is not one (here
/// `true`, which exits at once) cannot run the function. The message names the
/// sandbox and the shim; no error JSON (that is for the function's own failures);
/// the sandbox, its cgroups and the agent's state are gone.
#[test]
fn a_broken_shim_is_sprouts_own_failure() {
    let env = require_root!();
    let run = env
        .sprout()
        .env("SPROUT_SHIM", "/bin/true")
        .arg("invoke")
        .arg(example("hello"))
        .run();
    run.expect_code(3);
    let sandbox = format!("sandbox sprout-{}-", run.pid);
    assert!(
        run.stderr.contains(&format!("sprout: {sandbox}"))
            && run.stderr.contains(": talking to shim: "),
        "{run}"
    );
    assert_eq!(run.stdout, "", "{run}");
    env.assert_clean(run.pid);
}
