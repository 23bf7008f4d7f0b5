//! A function that runs out of memory, or whose shim dies, is seen for what it is at
//! once (issue 9, finding 11): an OOM kill ends the invocation as `out_of_memory` even
//! when a child process still holds the instance's channel open (the agent watches the
//! sandbox's memory cgroup: v1 `memory.oom_control` through `cgroup.event_control`, v2
//! `memory.events`), and an idle sandbox whose shim is killed is removed from the pool
//! without a request, so the next request gets a fresh sandbox.

use std::fs;
use std::time::{Duration, Instant};

use sprout_tests::{body_json, json, require_root, sandbox_cgroup_dir, text, wait_for, Daemon};

/// `oom`: forks a child that keeps the instance's channel (inherited) open, then
/// allocates past the sandbox's memory limit. Anything else: answers "ok".
const HOG_PY: &str = r#"import os, time
def f(e):
    if e.get("mode") != "oom":
        return "ok"
    if os.fork() == 0:
        # The child holds every descriptor the instance has, its channel too.
        time.sleep(120)
        os._exit(0)
    hog = []
    while True:
        hog.append(b"\1" * (8 << 20))
"#;

#[test]
fn an_oom_kill_is_reported_at_once_when_a_child_holds_the_channel() {
    let env = require_root!();
    let d = env.daemon();
    let dir = env.function("hog", &[("f.py", HOG_PY)]);
    d.register("hog", &dir, json!({"timeout_ms": 20000, "memory_mb": 64}));
    let r = d.invoke("hog", "{}");
    assert_eq!(body_json(&r), json!("ok"), "{}", text(&r));
    let started = Instant::now();
    let r = d.invoke("hog", r#"{"mode": "oom"}"#);
    let took = started.elapsed();
    eprintln!("OOM answered in {took:?}: {} {}", r.status, text(&r));
    // Before: the child kept the channel open and the invocation ran into its 20 s
    // timeout (504 `timeout`).
    let v = body_json(&r);
    assert_eq!(
        v["error"]["kind"],
        "out_of_memory",
        "{} {}",
        r.status,
        text(&r)
    );
    assert!(
        took < Duration::from_secs(5),
        "the OOM was reported after {took:?} (timeout 20 s)"
    );
    // The sandbox (and the child in it) is gone; the function runs again.
    let r = d.invoke("hog", "{}");
    assert_eq!(body_json(&r), json!("ok"), "{}", text(&r));
}

/// Host pid of the sandbox's shim: the process of its cgroup that is PID 1 in the
/// sandbox's pid namespace (`NSpid: <host> 1`).
fn shim_pid(d: &Daemon, sandbox: &str) -> u32 {
    let procs = sandbox_cgroup_dir(d.pid(), sandbox, "memory").join("cgroup.procs");
    let pids = fs::read_to_string(&procs).unwrap_or_else(|e| panic!("{}: {e}", procs.display()));
    pids.lines()
        .filter_map(|p| p.trim().parse::<u32>().ok())
        .find(|pid| {
            fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("NSpid:"))
                    .is_some_and(|ns| ns.split_whitespace().last() == Some("1"))
            })
        })
        .unwrap_or_else(|| panic!("no PID 1 among the processes of {sandbox}: {pids:?}"))
}

#[test]
fn a_killed_idle_shim_is_removed_and_the_next_request_gets_a_fresh_sandbox() {
    let env = require_root!();
    // No stem cells: the function's sandbox is the only one.
    let d = env.daemon_with(&["--stem-cells", "0"]);
    let dir = env.function("hog", &[("f.py", HOG_PY)]);
    d.register("hog", &dir, json!({"max_instances": 1}));
    let r = d.invoke("hog", "{}");
    assert_eq!(body_json(&r), json!("ok"), "{}", text(&r));
    let before = d.sandboxes();
    assert_eq!(before.len(), 1, "one sandbox, hog's: {before:?}");
    assert_eq!(d.status()["sandboxes"], 1, "{}", d.status());
    let victim = before[0].clone();
    // Idle, and frozen after the pause grace (on cgroup v1 a frozen process killed
    // does not die until thawed: the agent must see the kill pending).
    let pid = shim_pid(&d, &victim);
    // The test started the daemon that started this process.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the shim");
    eprintln!("killed shim {pid} of {victim}");
    // Without any request, the sandbox leaves the pool and is destroyed.
    let gone = wait_for(Duration::from_secs(5), || {
        let (status, cgroups) = (d.status(), d.sandboxes());
        if status["sandboxes"] == 0 && cgroups.is_empty() {
            Ok(())
        } else {
            Err(format!("status {status}, cgroups {cgroups:?}"))
        }
    });
    assert!(
        gone.is_ok(),
        "the sandbox of a killed shim is still there: {gone:?}\n{}",
        d.log()
    );
    // The next request runs in a fresh sandbox.
    let r = d.invoke("hog", "{}");
    assert_eq!(body_json(&r), json!("ok"), "{}", text(&r));
    let after = d.sandboxes();
    assert!(
        after.len() == 1 && !after.contains(&victim),
        "{after:?} (killed {victim})"
    );
}

#[test]
fn a_killed_stem_cell_shim_is_replaced_without_a_request() {
    let env = require_root!();
    let d = env.daemon_with(&["--stem-cells", "2"]);
    let ready = |d: &Daemon| {
        let (status, cgroups) = (d.status(), d.sandboxes());
        if status["stem_cells"] == 2 && cgroups.len() == 2 {
            Ok(cgroups)
        } else {
            Err(format!("status {status}, cgroups {cgroups:?}"))
        }
    };
    let before = wait_for(Duration::from_secs(30), || ready(&d))
        .unwrap_or_else(|e| panic!("no two stem cells: {e}"));
    let victim = before[0].clone();
    let pid = shim_pid(&d, &victim);
    // A stem cell is frozen: on cgroup v1 its shim dies only once thawed.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the shim");
    let after = wait_for(Duration::from_secs(30), || {
        ready(&d).and_then(|c| {
            if c.contains(&victim) {
                Err(format!("{victim} is still there: {c:?}"))
            } else {
                Ok(c)
            }
        })
    });
    assert!(after.is_ok(), "{after:?}\n{}", d.log());
    // And a function starts from one.
    let dir = env.function("hog", &[("f.py", HOG_PY)]);
    d.register("hog", &dir, json!({}));
    let r = d.invoke("hog", "{}");
    assert_eq!(body_json(&r), json!("ok"), "{}", text(&r));
}
