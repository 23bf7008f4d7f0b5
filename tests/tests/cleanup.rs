//! What happens to sandboxes, cgroups and state when agents crash, and that agents
//! leave each other alone.

use std::fs;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sprout_tests::{
    alive, body_json, example, json, leftovers, processes_in_agent_cgroups, require_root,
    sandbox_cgroups, text, wait_for, SLEEPER_PY,
};

fn sigkill(pid: u32) {
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL)
        .unwrap_or_else(|e| panic!("kill -9 {pid}: {e}"));
}

#[track_caller]
fn assert_dead_within(pids: &[u32], within: Duration) {
    let r = wait_for(within, || {
        let living: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
        living.is_empty().then_some(()).ok_or(living)
    });
    if let Err(living) = r {
        panic!("still running after {within:?}: {living:?}");
    }
}

#[test]
fn spawner_cleans_up_after_the_daemon_is_killed() {
    let env = require_root!();
    let mut d = env.daemon();
    d.register("hello", &example("hello"), json!({}));
    let r = d.invoke("hello", "{}");
    assert_eq!(r.status, 200, "{}", text(&r));
    let pid = d.pid();
    assert_eq!(d.sandboxes().len(), 1, "a warm sandbox exists");
    let sandbox_procs = processes_in_agent_cgroups(pid);
    assert!(!sandbox_procs.is_empty(), "the sandbox has processes");
    let spawner = d.spawner_pid();

    d.kill();
    // The spawner notices that its agent is gone and removes everything.
    env.assert_clean_within(pid, Duration::from_secs(10));
    assert_dead_within(&sandbox_procs, Duration::from_secs(1));
    assert_dead_within(&[spawner], Duration::from_secs(5));
}

#[test]
fn spawner_cleans_up_after_an_embedded_invoke_is_killed() {
    let env = require_root!();
    let dir = env.function("sleeper", &[("f.py", SLEEPER_PY)]);
    let mut child = env
        .sprout()
        .arg("invoke")
        .arg(&dir)
        .arg(r#"{"sleep": 30}"#)
        .spawn();
    let pid = child.id();
    // Wait until the function runs in its sandbox.
    let running = wait_for(Duration::from_secs(10), || {
        let procs = processes_in_agent_cgroups(pid);
        (procs.len() >= 3).then_some(procs).ok_or(())
    });
    let procs = running.unwrap_or_else(|()| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the sandbox of sprout invoke (pid {pid}) never ran the function")
    });
    assert_eq!(sandbox_cgroups(pid).len(), 1);

    sigkill(pid);
    child.wait().unwrap();
    env.assert_clean_within(pid, Duration::from_secs(10));
    assert_dead_within(&procs, Duration::from_secs(1));
}

#[test]
fn next_agent_removes_what_a_crashed_daemon_and_spawner_left() {
    let env = require_root!();
    let mut d = env.daemon();
    let dir = env.function("sleeper", &[("f.py", SLEEPER_PY)]);
    d.register("sleeper", &dir, json!({}));
    let r = d.invoke("sleeper", "{}");
    assert_eq!(r.status, 200, "{}", text(&r));
    let sandbox = body_json(&r)["sandbox"].as_str().unwrap().to_owned();
    let pid = d.pid();
    let sandbox_procs = processes_in_agent_cgroups(pid);
    assert!(sandbox_procs.len() >= 2, "{sandbox_procs:?}");
    let spawner = d.spawner_pid();

    // Both die at once: nobody is left to clean up.
    sigkill(spawner);
    d.kill();
    assert_dead_within(&[spawner], Duration::from_secs(2));
    let state = env.state_dir().join(pid.to_string());
    assert!(state.is_dir(), "the crashed agent's state is left behind");
    assert!(
        Path::new("/sys/fs/cgroup/memory/sprout")
            .join(pid.to_string())
            .join(&sandbox)
            .is_dir(),
        "the crashed agent's sandbox cgroup is left behind: {:?}",
        leftovers(env.state_dir(), pid)
    );

    // The next agent on the same state directory removes it all.
    let run = env
        .sprout()
        .arg("invoke")
        .arg(example("hello"))
        .arg(r#"{"name":"Next"}"#)
        .run();
    run.success();
    assert_eq!(run.json(), json!("Hello, Next!"), "{run}");
    env.assert_clean(pid);
    env.assert_clean(run.pid);
    assert_dead_within(&sandbox_procs, Duration::from_secs(1));
}

#[test]
fn stale_state_directory_is_removed_by_the_next_agent() {
    let env = require_root!();
    // An unlocked state directory of an agent that is long gone.
    let stale = env.state_dir().join("4194000");
    fs::create_dir_all(stale.join("containers")).unwrap();
    fs::write(stale.join("lock"), "").unwrap();
    let run = env.sprout().arg("invoke").arg(example("hello")).run();
    run.success();
    assert!(
        !stale.exists(),
        "stale state directory {} was kept",
        stale.display()
    );
    env.assert_clean(run.pid);
}

#[test]
fn agents_with_the_same_state_dir_leave_each_other_alone() {
    let env = require_root!();
    let d = env.daemon();
    d.register("hello", &example("hello"), json!({}));
    assert_eq!(d.invoke("hello", "{}").status, 200);
    let before = d.sandboxes();
    assert_eq!(before.len(), 1);

    let run = env.sprout().arg("invoke").arg(example("hello")).run();
    run.success();
    env.assert_clean(run.pid);

    assert_eq!(d.sandboxes(), before, "the daemon's warm sandbox survives");
    let r = d.invoke("hello", r#"{"name":"again"}"#);
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(body_json(&r), json!("Hello, again!"));
    assert_eq!(r.header("X-Sprout-Cold"), Some("false"));
}

/// Agents with different `--state-dir`s (two users, two test runs) must not take
/// each other for crashed agents.
#[test]
fn agents_with_different_state_dirs_leave_each_other_alone() {
    let env = require_root!();
    let d = env.daemon();
    d.register("hello", &example("hello"), json!({}));
    assert_eq!(d.invoke("hello", "{}").status, 200);
    let before = d.sandboxes();
    assert_eq!(before.len(), 1);

    let other = tempfile::Builder::new()
        .prefix("sprout-test-other-")
        .tempdir_in("/run")
        .unwrap();
    let run = env
        .sprout_in(other.path())
        .arg("invoke")
        .arg(example("hello"))
        .run();
    run.success();
    let left = leftovers(other.path(), run.pid);
    assert!(left.is_empty(), "{left:?}");

    assert_eq!(
        d.sandboxes(),
        before,
        "an agent with another state directory removed the live daemon's sandbox"
    );
    let r = d.invoke("hello", r#"{"name":"again"}"#);
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(body_json(&r), json!("Hello, again!"));
    assert_eq!(r.header("X-Sprout-Cold"), Some("false"));
}
