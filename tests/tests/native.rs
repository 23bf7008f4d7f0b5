//! Native executables speaking OpenWhisk's actionloop protocol (`--runtime native`):
//! a C one built from `examples/native-c` and shell scripts. Results, warm state,
//! logs, broken answers, exits, limits (time, memory, pids), the isolation probe from
//! inside, freezing, and clean-up.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::Duration;

use sprout_tests::{
    body_json, example, json, require_root, sandbox_frozen, text, wait_for, Env, Value,
};

/// Builds `examples/native-c/exec.c` into `<work>/fns/native-c/exec`.
fn c_function(env: &Env) -> PathBuf {
    let dir = env.work_dir().join("fns").join("native-c");
    fs::create_dir_all(&dir).unwrap();
    let out = Command::new("cc")
        .args(["-O2", "-Wall", "-o"])
        .arg(dir.join("exec"))
        .arg(example("native-c").join("exec.c"))
        .output()
        .expect("run cc (.ci/setup installs gcc)");
    assert!(
        out.status.success(),
        "cc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// A function directory holding one executable `exec` with `script` in it.
fn script_function(env: &Env, name: &str, script: &str) -> PathBuf {
    let dir = env.function(name, &[("exec", script)]);
    make_executable(&dir.join("exec"));
    dir
}

fn make_executable(path: &Path) {
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

fn native() -> Value {
    json!({ "runtime": "native" })
}

#[test]
fn c_actionloop_answers_keeps_its_state_and_logs() {
    let env = require_root!();
    let d = env.daemon();
    d.register("counter", &c_function(&env), native());
    let mut counts = Vec::new();
    for i in 0..3 {
        let r = d.request(
            "POST",
            "/functions/counter/invoke?logs=true",
            Some("application/json"),
            format!("{{\"i\": {i},\n \"s\": \"❄\"}}").as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", text(&r));
        let rec = body_json(&r);
        let result = &rec["result"];
        assert_eq!(result["input"]["value"], json!({"i": i, "s": "❄"}), "{rec}");
        assert_eq!(result["input"]["action_name"], "/default/counter", "{rec}");
        let id = result["input"]["activation_id"].as_str().unwrap();
        assert_eq!(id.len(), 32, "{rec}");
        let count = result["count"].as_u64().unwrap();
        assert!(
            rec["logs"]["stdout"]
                .as_str()
                .unwrap()
                .contains(&format!("invocation {count}:")),
            "{rec}"
        );
        assert_eq!(
            rec["logs"]["stderr"],
            format!("stderr of invocation {count}\n"),
            "{rec}"
        );
        counts.push(count);
    }
    // One warm process served all three.
    assert_eq!(counts, [1, 2, 3], "{}", d.log());
}

#[test]
fn shell_actionloop_through_the_cli() {
    let env = require_root!();
    let run = env
        .sprout()
        .arg("invoke")
        .arg(example("native-sh"))
        .args(["--runtime", "native", "--logs", r#"{"name": "sprout"}"#])
        .run();
    run.success();
    let result = run.json();
    assert_eq!(result["count"], 1, "{run}");
    assert_eq!(result["action"], "/default/native-sh", "{run}");
    assert_eq!(result["input"]["value"], json!({"name": "sprout"}), "{run}");
    let deadline: u128 = result["input"]["deadline"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    // The default time limit is 60 s.
    assert!(
        deadline > now + 50_000 && deadline <= now + 61_000,
        "{deadline} vs {now}"
    );
    assert!(
        run.stderr.contains("hello from the shell, invocation 1"),
        "{run}"
    );
    env.assert_clean(run.pid);
}

#[test]
fn an_answer_that_is_not_json_is_a_handler_error_and_the_instance_stays() {
    let env = require_root!();
    let dir = script_function(
        &env,
        "garbage",
        "#!/bin/sh\nwhile read -r line; do\n  case \"$line\" in\n    *bad*) echo 'this is not json' >&3 ;;\n    *) echo '\"fine\"' >&3 ;;\n  esac\ndone\n",
    );
    let d = env.daemon();
    d.register("garbage", &dir, native());
    let r = d.invoke("garbage", r#""bad""#);
    let err = body_json(&r);
    assert_eq!(err["error"]["kind"], "handler_error", "{err}");
    let message = err["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("not JSON") && message.contains("this is not json"),
        "{err}"
    );
    let sandboxes = d.sandboxes();
    let r = d.invoke("garbage", "{}");
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(body_json(&r), json!("fine"));
    assert_eq!(d.sandboxes(), sandboxes, "the instance was kept");
}

#[test]
fn an_executable_that_exits_during_an_invocation_died() {
    let env = require_root!();
    let dir = script_function(
        &env,
        "quitter",
        "#!/bin/sh\nread -r line\necho 'leaving now' >&2\nexit 3\n",
    );
    let run = env
        .sprout()
        .arg("invoke")
        .arg(&dir)
        .args(["--runtime", "native", "--logs"])
        .run();
    run.expect_code(1);
    let err = run.error();
    assert_eq!(err["kind"], "instance_died", "{run}");
    assert!(run.stderr.contains("leaving now"), "{run}");
    assert!(run.stderr.contains("exited with status 3"), "{run}");
    env.assert_clean(run.pid);
}

#[test]
fn an_executable_that_cannot_start_fails_the_load() {
    let env = require_root!();
    let dir = script_function(&env, "nointerp", "#!/no/such/interpreter\n");
    let run = env
        .sprout()
        .arg("invoke")
        .arg(&dir)
        .args(["--runtime", "native"])
        .run();
    run.expect_code(1);
    run.assert_error("load_error", "message", "cannot start /code/exec");
    env.assert_clean(run.pid);
}

#[test]
fn a_slow_executable_times_out() {
    let env = require_root!();
    let dir = script_function(
        &env,
        "sleepy",
        "#!/bin/sh\nwhile read -r line; do sleep 10; echo 1 >&3; done\n",
    );
    let run = env
        .sprout()
        .arg("invoke")
        .arg(&dir)
        .args(["--runtime", "native", "--timeout", "500"])
        .run();
    run.expect_code(1);
    run.assert_error(
        "timeout",
        "message",
        "function sleepy timed out after 500 ms",
    );
    assert!(run.elapsed < Duration::from_secs(5), "{:?}", run.elapsed);
    env.assert_clean(run.pid);
}

#[test]
fn an_executable_over_its_memory_limit_is_out_of_memory() {
    let env = require_root!();
    let run = env
        .sprout()
        .arg("invoke")
        .arg(c_function(&env))
        .args(["--runtime", "native", "--memory", "64", r#""allocate""#])
        .run();
    run.expect_code(1);
    let err = run.assert_error("out_of_memory", "message", "out of memory");
    assert!(err["message"].as_str().unwrap().contains("64 MiB"), "{run}");
    env.assert_clean(run.pid);
}

#[test]
fn an_executable_cannot_start_more_processes_than_its_pids_limit() {
    let env = require_root!();
    let run = env
        .sprout()
        .arg("invoke")
        .arg(c_function(&env))
        .args(["--runtime", "native", "--pids", "16", r#""fork""#])
        .run();
    run.success();
    let result = run.json();
    // The shim, the host and the executable count too.
    let children = result["children"].as_u64().unwrap();
    assert!((1..16).contains(&children), "{run}");
    assert_eq!(result["error"], "EAGAIN", "{run}");
    env.assert_clean(run.pid);
}

/// What a native executable sees of its sandbox (the Python probe's essentials).
const PROBE_SH: &str = r#"#!/bin/sh
try_write() { if (echo x > "$1") 2>/dev/null; then echo ok; else echo refused; fi; }
while read -r line; do
  status() { grep "^$1:" /proc/self/status | tr -d ' \t' | cut -d: -f2; }
  printf '{"uid":%s,"pid1":"%s","hostname":"%s","sandbox":"%s","cap_eff":"%s","no_new_privs":%s,"seccomp":%s,"usr":"%s","code":"%s","tmp":"%s","ifaces":"%s","env":"%s","root":"%s"}\n' \
    "$(id -u)" "$(tr '\0' ' ' < /proc/1/cmdline | cut -d' ' -f1)" "$(cat /proc/sys/kernel/hostname)" \
    "$SPROUT_SANDBOX" "$(status CapEff)" "$(status NoNewPrivs)" "$(status Seccomp)" \
    "$(try_write /usr/sprout-probe)" "$(try_write /code/sprout-probe)" "$(try_write /tmp/sprout-probe)" \
    "$(ls /sys/class/net | tr '\n' ' ')" "$(env | cut -d= -f1 | sort | tr '\n' ' ')" \
    "$(ls / | tr '\n' ' ')" >&3
done
"#;

#[test]
fn the_isolation_probe_from_a_native_executable() {
    let env = require_root!();
    let dir = script_function(&env, "probe", PROBE_SH);
    let run = env
        .sprout()
        .arg("invoke")
        .arg(&dir)
        .args(["--runtime", "native"])
        .run();
    run.success();
    let p = run.json();
    assert_ne!(p["uid"], 0, "{p}");
    assert_eq!(p["pid1"], "/.sprout/shim", "{p}");
    assert_eq!(p["hostname"], p["sandbox"], "{p}");
    assert_eq!(p["cap_eff"], "0000000000000000", "{p}");
    assert_eq!(p["no_new_privs"], 1, "{p}");
    assert_eq!(p["seccomp"], 2, "{p}");
    assert_eq!(
        (&p["usr"], &p["code"], &p["tmp"]),
        (&json!("refused"), &json!("refused"), &json!("ok")),
        "{p}"
    );
    assert_eq!(p["ifaces"], "lo ", "{p}");
    // A clean environment: nothing of the host's or the agent's.
    assert_eq!(
        p["env"],
        "HOME LANG PATH PWD SPROUT_FUNCTION SPROUT_SANDBOX __OW_ACTION_NAME __OW_ACTION_VERSION __OW_NAMESPACE ",
        "{p}"
    );
    // The root is the sandbox's skeleton (as `isolation.rs` allows), not the host's.
    let allowed = [
        "bin", "code", "deps", "dev", "etc", "fns", "lib", "lib64", "proc", "root", "sbin", "sys",
        "tmp", "usr", "workflow",
    ];
    let root = p["root"].as_str().unwrap();
    let extra: Vec<&str> = root
        .split_whitespace()
        .filter(|e| !allowed.contains(e))
        .collect();
    assert!(extra.is_empty(), "unexpected entries in /: {extra:?} ({p})");
    assert!(
        ["code", "usr", "tmp", "proc"]
            .iter()
            .all(|e| root.split_whitespace().any(|r| r == *e)),
        "{p}"
    );
    env.assert_clean(run.pid);
}

#[test]
fn a_native_sandbox_is_frozen_when_idle_and_thawed_by_an_invoke() {
    let env = require_root!();
    // A busy background loop that would use CPU if the sandbox were not frozen.
    let dir = script_function(
        &env,
        "spinner",
        "#!/bin/sh\n(while :; do :; done) &\nn=0\nwhile read -r line; do n=$((n+1)); printf '{\"sandbox\":\"%s\",\"n\":%d}\\n' \"$SPROUT_SANDBOX\" $n >&3; done\n",
    );
    let d = env.daemon_with(&["--stem-cells", "0", "--pause-grace", "300"]);
    d.register("spinner", &dir, native());
    let r = d.invoke("spinner", "{}");
    assert_eq!(r.status, 200, "{}", text(&r));
    let sandbox = body_json(&r)["sandbox"].as_str().unwrap().to_owned();
    let frozen = || sandbox_frozen(d.pid(), &sandbox);
    wait_for(Duration::from_secs(10), || frozen().then_some(()).ok_or(()))
        .unwrap_or_else(|()| panic!("{sandbox} was not frozen; log:\n{}", d.log()));
    let r = d.invoke("spinner", "{}");
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(
        body_json(&r),
        json!({"sandbox": sandbox, "n": 2}),
        "thawed warm"
    );
    assert_eq!(r.header("X-Sprout-Start"), Some("thawed"));
}

#[test]
fn nothing_is_left_behind_by_a_daemon_serving_native_functions() {
    let env = require_root!();
    let dir = script_function(
        &env,
        "lingerer",
        "#!/bin/sh\nsleep 1000 &\nwhile read -r line; do echo '\"ok\"' >&3; done\n",
    );
    let mut d = env.daemon();
    d.register("lingerer", &dir, native());
    let r = d.invoke("lingerer", "{}");
    assert_eq!(r.status, 200, "{}", text(&r));
    let pid = d.pid();
    assert!(d.terminate().success(), "{}", d.log());
    // Give the reaping a moment on a loaded machine.
    thread::sleep(Duration::from_millis(50));
    env.assert_clean_within(pid, Duration::from_secs(10));
}
