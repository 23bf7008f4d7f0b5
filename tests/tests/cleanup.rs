//! What happens to sandboxes, cgroups and state when agents crash, and that agents
//! leave each other alone.

use std::fs;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sprout_tests::{
    alive, body_json, example, json, leftovers, processes_in_agent_cgroups, require_root,
    sandbox_cgroup_dir, sandbox_cgroups, sandbox_frozen, text, wait_for, KillOnDrop, SLEEPER_PY,
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

/// Idle sandboxes are frozen, and forked ones live in the fork server's pid
/// namespace: a spawner that killed the fork server first would wait forever for
/// them in its reap (a frozen process dies only once thawed). With four frozen it
/// did so four times in five.
#[test]
fn spawner_cleans_up_frozen_forked_sandboxes_after_the_daemon_is_killed() {
    let env = require_root!();
    let mut d = env.daemon();
    for n in 0..4 {
        let name = format!("hello{n}");
        d.register(&name, &example("hello"), json!({}));
        let r = d.invoke(&name, "{}");
        assert_eq!(r.status, 200, "{}", text(&r));
    }
    let pid = d.pid();
    let sandboxes = d.sandboxes();
    assert_eq!(sandboxes.len(), 4, "{sandboxes:?}");
    let frozen = wait_for(Duration::from_secs(10), || {
        let thawed: Vec<&String> = sandboxes
            .iter()
            .filter(|s| !sandbox_frozen(pid, s))
            .collect();
        thawed.is_empty().then_some(()).ok_or(format!("{thawed:?}"))
    });
    frozen.unwrap_or_else(|thawed| panic!("never frozen: {thawed}"));
    let sandbox_procs = processes_in_agent_cgroups(pid);
    let spawner = d.spawner_pid();

    d.kill();
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
        sandbox_cgroup_dir(pid, &sandbox, "memory").is_dir(),
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

/// The leftover check itself can fail: it finds each kind of thing an agent could
/// leave behind, even where no cgroup or the word "sprout" points at it — the agent
/// still running, a sandbox cgroup and a process in it, a process holding its state
/// directory, a spawner naming it, a
/// process of one of its sandboxes whose cgroup is gone (found by the sandbox id in
/// its environment), its state directory, and a mount of its state in a mount
/// namespace other than the host's.
#[test]
fn the_leftover_check_finds_each_kind_of_leftover() {
    use std::process::{Command, Stdio};
    let env = require_root!();
    let root = env.state_dir();
    let sleep = || {
        let mut c = Command::new("sleep");
        c.arg("60").stdout(Stdio::null()).stderr(Stdio::null());
        c
    };
    let count = |agent: u32, what: &str| {
        leftovers(root, agent)
            .iter()
            .filter(|l| l.contains(what))
            .count()
    };

    // "The agent": a process of ours, alive.
    let agent = KillOnDrop::spawn(&mut sleep());
    let id = agent.pid();
    assert_eq!(
        count(id, &format!("process {id} ")),
        1,
        "{:?}",
        leftovers(root, id)
    );

    // A sandbox cgroup of its (while it lives, so no other agent takes it for a
    // crashed one's), and a process found only by being in it.
    let cgroup = sandbox_cgroup_dir(id, &format!("sprout-{id}-1"), "pids");
    fs::create_dir_all(&cgroup).unwrap_or_else(|e| panic!("create {cgroup:?}: {e}"));
    let member = KillOnDrop::spawn(&mut sleep());
    fs::write(cgroup.join("cgroup.procs"), member.pid().to_string()).unwrap();
    let left = leftovers(root, id);
    assert_eq!(count(id, "cgroup /sys/fs/cgroup/"), 1, "{left:?}");
    assert_eq!(
        count(id, &format!("process {} ", member.pid())),
        1,
        "{left:?}"
    );
    drop(member);
    wait_for(Duration::from_secs(5), || fs::remove_dir(&cgroup))
        .unwrap_or_else(|e| panic!("remove {cgroup:?}: {e}"));
    fs::remove_dir(cgroup.parent().unwrap()).unwrap();
    // `/sprout` itself goes if no agent uses it now.
    let _ = fs::remove_dir(cgroup.parent().unwrap().parent().unwrap());
    drop(agent);
    assert!(leftovers(root, id).is_empty(), "{:?}", leftovers(root, id));

    // Its state directory, and a process holding a descriptor into it.
    let state = root.join(id.to_string());
    fs::create_dir_all(&state).unwrap();
    let lock = fs::File::create(state.join("lock")).unwrap();
    let holder = KillOnDrop::spawn(sleep().stdin(lock));
    let left = leftovers(root, id);
    assert_eq!(count(id, "state directory"), 1, "{left:?}");
    assert_eq!(
        count(id, &format!("process {} ", holder.pid())),
        1,
        "{left:?}"
    );
    drop(holder);

    // A spawner: it holds no descriptor into the state directory, but names it.
    let spawner = KillOnDrop::spawn(
        Command::new("sh")
            .args(["-c", "sleep 60; :", "sprout-spawner", "--state-dir"])
            .arg(&state)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let left = leftovers(root, id);
    assert_eq!(
        count(id, &format!("process {} ", spawner.pid())),
        1,
        "{left:?}"
    );
    drop(spawner);

    // A sandbox's process outside any cgroup of sprout's.
    let escaped = KillOnDrop::spawn(sleep().env("SPROUT_SANDBOX", format!("sprout-{id}-7")));
    let left = leftovers(root, id);
    assert_eq!(
        count(id, &format!("process {} ", escaped.pid())),
        1,
        "{left:?}"
    );
    drop(escaped);
    // Another agent's sandbox is not ours.
    let other = KillOnDrop::spawn(sleep().env("SPROUT_SANDBOX", format!("sprout-{id}7-1")));
    assert_eq!(count(id, &format!("process {} ", other.pid())), 0);
    drop(other);

    // A mount of the state directory in a private mount namespace of its own.
    let mut ns = KillOnDrop::spawn(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!(
                "mount --bind {} /mnt && echo ready && exec sleep 60",
                state.display()
            ))
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let mut ready = String::new();
    let mut out = std::io::BufReader::new(ns.0.stdout.take().unwrap());
    std::io::BufRead::read_line(&mut out, &mut ready).unwrap();
    assert_eq!(ready.trim(), "ready", "the bind mount was not made");
    let left = leftovers(root, id);
    assert!(
        left.iter()
            .any(|l| l.starts_with("mount in mnt:") && l.contains(" /mnt ")),
        "{left:?}"
    );
    drop(ns);

    fs::remove_dir_all(&state).unwrap();
    assert!(leftovers(root, id).is_empty(), "{:?}", leftovers(root, id));
}
