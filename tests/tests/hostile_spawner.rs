//! The spawner can die (issue 9, finding 5). `kill -9` of a daemon's `sprout-spawner`
//! while it is idle, and while cold starts are in flight or waiting for it: requests
//! in flight fail within a second or two with an error naming the spawner's pid and
//! how it ended, the sandboxes it owned are killed and dropped from the pool, a new
//! spawner takes over (the next cold and warm invokes work), `/status` answers
//! throughout, and SIGTERM still shuts the daemon down leaving nothing. And a daemon
//! restarted on the same state directory after `kill -9` of both the agent and its
//! spawner in the middle of a create removes everything they left, even while an
//! orphan still holds the dead agent's lock.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sprout_tests::{
    alive, body_json, children, require_root, text, wait_for, without_colours, Client,
    ClientResponse, Daemon, Env, KillOnDrop, Value, HELLO_PY,
};

/// Far longer than any answer should take here; a request still unanswered after it
/// is taken to hang.
const HANG: Duration = Duration::from_secs(30);

/// How soon a request in flight must fail after its spawner died. The product fails
/// it as soon as it sees the pidfd readable; the margin is for a loaded 2-core VM.
const FAILS_WITHIN: Duration = Duration::from_secs(3);

/// `POST /functions/{name}/invoke` on its own connection and thread, so that a
/// request that hangs cannot hang the test: the answer (or the client's error) comes
/// on the returned channel.
fn invoke_async(d: &Daemon, name: &str) -> mpsc::Receiver<Result<ClientResponse, String>> {
    let (tx, rx) = mpsc::channel();
    let socket = d.socket().to_path_buf();
    let path = format!("/functions/{name}/invoke");
    thread::spawn(move || {
        let answer = Client::connect(&socket)
            .and_then(|mut c| c.request("POST", &path, Some("application/json"), b"{}"))
            .map_err(|e| ipc::chain(&e));
        let _ = tx.send(answer);
    });
    rx
}

/// The answer on `rx`, or a test failure naming what hung.
#[track_caller]
fn answer(
    rx: &mpsc::Receiver<Result<ClientResponse, String>>,
    what: &str,
    d: &Daemon,
) -> ClientResponse {
    match rx.recv_timeout(HANG) {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => panic!("{what}: the client failed: {e}\nlog:\n{}", d.log()),
        Err(_) => panic!(
            "{what}: no answer within {HANG:?} (a request waits for a dead spawner)\nlog:\n{}",
            d.log()
        ),
    }
}

/// An invoke that must answer 200 with `Hello, world!`, within [`HANG`].
#[track_caller]
fn invoke_ok(d: &Daemon, name: &str) {
    let r = answer(&invoke_async(d, name), &format!("invoke {name}"), d);
    assert_eq!(
        r.status,
        200,
        "invoke {name}: {}\nlog:\n{}",
        text(&r),
        d.log()
    );
    assert_eq!(body_json(&r), Value::from("Hello, world!"), "{}", text(&r));
}

fn sigkill(pid: u32) {
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("SIGKILL");
}

/// `<state>/<agent>/bundles/*`: the agent writes a sandbox's bundle there right
/// before it asks the spawner to create it, and removes it once the spawner answered.
fn bundles(env: &Env, agent: u32) -> usize {
    fs::read_dir(env.state_dir().join(agent.to_string()).join("bundles"))
        .map(|it| it.count())
        .unwrap_or(0)
}

/// Registers `name` (HELLO_PY) with its own directory.
fn hello(env: &Env, d: &Daemon, name: &str) {
    let dir = env.function(name, &[("f.py", HELLO_PY)]);
    d.register(name, &dir, Value::Null);
}

/// A spawner killed while idle: the warm instance it had built is dropped (its
/// sandbox is killed and its cgroup removed), a new spawner takes over at once, the
/// next invokes (warm and cold) get fresh sandboxes, `/status` answers throughout,
/// and SIGTERM completes with nothing left behind.
#[test]
fn a_killed_idle_spawner_is_replaced_and_its_sandboxes_are_dropped() {
    let env = require_root!();
    let d = env.daemon();
    hello(&env, &d, "warm");
    hello(&env, &d, "cold");
    invoke_ok(&d, "warm");
    let before = d.sandboxes();
    assert_eq!(before.len(), 1, "{before:?}");
    let spawner = d.spawner_pid();

    sigkill(spawner);
    // A new spawner is started as soon as the death is seen, and the dead one's
    // sandbox goes with it.
    let replaced = wait_for(Duration::from_secs(10), || {
        let now = children(d.pid());
        let fresh = now.iter().any(|&k| {
            k != spawner
                && fs::read_to_string(format!("/proc/{k}/comm"))
                    .is_ok_and(|c| c.trim() == "sprout-spawner")
        });
        (fresh && d.sandboxes().is_empty()).then_some(()).ok_or(now)
    });
    assert!(
        replaced.is_ok(),
        "no new spawner, or the dead one's sandbox {before:?} is still there ({:?}); children {replaced:?}\nlog:\n{}",
        d.sandboxes(),
        d.log()
    );
    let status = d.status();
    assert_eq!(status["sandboxes"], 0, "{status}");
    assert_ne!(d.spawner_pid(), spawner);
    let log = without_colours(&d.log());
    assert!(
        log.contains(&format!("spawner_pid={spawner}")) && log.contains("killed by SIGKILL"),
        "the log should say which spawner died and how:\n{log}"
    );

    invoke_ok(&d, "cold");
    invoke_ok(&d, "warm");
    let status = d.status();
    assert_eq!(status["sandboxes"], 2, "{status}");
    let after = d.sandboxes();
    assert!(!after.contains(&before[0]), "{after:?} reuses {before:?}");
    // SIGTERM: the daemon exits leaving nothing, its new spawner included.
    let last = d.spawner_pid();
    drop(d);
    assert!(!alive(last), "the new spawner {last} outlived the daemon");
}

/// Cold starts in flight when the spawner dies: one waiting for its answer, one
/// waiting for its turn. The spawner is stopped first so that both are surely
/// waiting on it, then killed: both fail within a second or two with an error that
/// names the spawner and how it ended, instead of hanging; then everything works.
#[test]
fn cold_starts_waiting_on_a_spawner_that_dies_fail_at_once() {
    let env = require_root!();
    // Sandboxes created by libcontainer, so that each cold start is a `create` on the
    // spawner (a forked one asks the spawner only to adopt it).
    let d = env.daemon_with(&["--stem-cells", "0", "--new-sandboxes", "create"]);
    hello(&env, &d, "one");
    hello(&env, &d, "two");
    let spawner = d.spawner_pid();
    kill(Pid::from_raw(spawner as i32), Signal::SIGSTOP).expect("SIGSTOP the spawner");
    let one = invoke_async(&d, "one");
    let two = invoke_async(&d, "two");
    // Both requests wrote their bundle: one waits for the spawner's answer, the other
    // for its turn.
    let waiting = wait_for(Duration::from_secs(10), || {
        let n = bundles(&env, d.pid());
        (n == 2).then_some(()).ok_or(n)
    });
    assert!(
        waiting.is_ok(),
        "requests waiting on the spawner: {waiting:?}\nlog:\n{}",
        d.log()
    );
    // `/status` does not wait for the spawner.
    let status = d.status();
    assert_eq!(status["sandboxes"], 0, "{status}");

    sigkill(spawner);
    let killed = Instant::now();
    let mut failed = 0;
    for (name, rx) in [("one", &one), ("two", &two)] {
        let r = answer(rx, &format!("invoke {name}"), &d);
        let took = killed.elapsed();
        eprintln!("invoke {name}: {} after {took:?}: {}", r.status, text(&r));
        if r.status == 200 {
            // It reached the spawner only after the death was seen, and went to the
            // new one.
            continue;
        }
        assert_eq!(r.status, 500, "invoke {name}: {}", text(&r));
        let message = body_json(&r)["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            message.contains(&format!("spawner (pid {spawner}) died"))
                && message.contains("killed by SIGKILL")
                && message.contains("create"),
            "invoke {name}: the error should name the spawner, how it ended and the request: {message}"
        );
        assert!(
            took < FAILS_WITHIN,
            "invoke {name} failed {took:?} after the spawner died"
        );
        failed += 1;
    }
    assert!(
        failed >= 1,
        "no request failed: none was waiting on the spawner"
    );
    assert_eq!(d.status()["sandboxes"], 0);
    invoke_ok(&d, "one");
    invoke_ok(&d, "two");
    let last = d.spawner_pid();
    assert_ne!(last, spawner);
    drop(d);
    assert!(!alive(last), "the new spawner {last} outlived the daemon");
}

/// Holds `lock` open in a process of the test's own, with an exclusive `flock` on it
/// unless a half-built container of the dead spawner still holds that (as it did
/// before the fix). Returns the process and whether it got the lock.
fn hold_lock(lock: &Path) -> (KillOnDrop, bool) {
    let script = "import fcntl, sys, time\n\
                  f = open(sys.argv[1])\n\
                  try:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n    print('locked', flush=True)\n\
                  except OSError:\n    print('busy', flush=True)\n\
                  time.sleep(120)\n";
    let mut p = KillOnDrop::spawn(
        Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(script)
            .arg(lock)
            .stdin(Stdio::null())
            .stdout(Stdio::piped()),
    );
    let mut line = String::new();
    BufReader::new(p.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let locked = match line.trim() {
        "locked" => true,
        "busy" => false,
        other => panic!("the lock holder said {other:?} about {}", lock.display()),
    };
    (p, locked)
}

/// `kill -9` of the agent and its spawner in the middle of a create: sandboxes, a
/// half-built container, cgroups and the state directory stay behind, and an orphan
/// holds the dead agent's lock. A daemon started on the same state directory
/// removes all of it (the orphan is killed) before it serves.
#[test]
fn a_restarted_daemon_removes_what_a_killed_agent_and_spawner_left() {
    let env = require_root!();
    let mut a = env.daemon();
    hello(&env, &a, "hello");
    invoke_ok(&a, "hello");
    hello(&env, &a, "other");
    let spawner = a.spawner_pid();
    let built: Vec<u32> = children(spawner);
    // A cold start, caught while the spawner builds its container: the first new
    // child of the spawner is the container's (not yet started) process.
    let cold = invoke_async(&a, "other");
    let caught = wait_for(Duration::from_secs(10), || {
        let now: Vec<u32> = children(spawner)
            .into_iter()
            .filter(|k| !built.contains(k))
            .collect();
        (!now.is_empty()).then_some(now).ok_or(())
    });
    kill(Pid::from_raw(a.pid() as i32), Signal::SIGSTOP).expect("SIGSTOP the agent");
    sigkill(spawner);
    a.kill();
    drop(cold);
    let agent = a.pid();
    let state = env.state_dir().join(agent.to_string());
    assert!(
        state.is_dir(),
        "the killed agent's state directory is gone already"
    );
    let left = env.leftovers(agent);
    assert!(
        left.iter().any(|l| l.starts_with("cgroup")),
        "the killed agent left no cgroup: {left:?}"
    );
    eprintln!(
        "caught the spawner building: {caught:?}; the dead agent left:\n  {}",
        left.join("\n  ")
    );
    let (orphan, locked) = hold_lock(&state.join("lock"));
    eprintln!(
        "the dead agent's lock is held by {}",
        if locked {
            "our stand-in orphan"
        } else {
            "a process it left"
        }
    );

    let b = env.daemon();
    // The cleanup happens before the new daemon serves.
    let still = env.leftovers(agent);
    assert!(
        still.is_empty(),
        "the restarted daemon left the dead agent's things:\n  {}\nlog:\n{}",
        still.join("\n  "),
        b.log()
    );
    assert!(
        !alive(orphan.pid()),
        "the orphan holding the old lock still runs"
    );
    assert!(!state.exists());
    hello(&env, &b, "hello");
    invoke_ok(&b, "hello");
    drop(b);
    drop(a);
    drop(orphan);
}

/// The descriptors of `pid`: number, target, and whether close-on-exec.
fn descriptors(pid: u32) -> Vec<(u32, String, bool)> {
    let mut fds: Vec<(u32, String, bool)> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let n: u32 = e.file_name().to_str()?.parse().ok()?;
            let target = fs::read_link(e.path()).ok()?.to_string_lossy().into_owned();
            let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{n}")).ok()?;
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())?;
            Some((n, target, flags & libc::O_CLOEXEC as u32 != 0))
        })
        .collect();
    fds.sort();
    fds
}

/// The spawner holds nothing a container process it clones could misuse: stdin,
/// its stdout and stderr, and its control socket (close-on-exec) — no state-directory
/// lock, no descriptor into the state directory, no mount namespace, no directory of
/// the host's, and nothing the agent inherited from its own parent.
#[test]
fn the_spawner_holds_only_its_stdio_and_its_control_socket() {
    use std::os::fd::AsRawFd;
    let env = require_root!();
    // A descriptor the test leaks into the daemon (not close-on-exec).
    let stray_path = env.work_dir().join("stray");
    fs::write(&stray_path, "").unwrap();
    let stray = fs::File::open(&stray_path).unwrap();
    nix::fcntl::fcntl(
        stray.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    let d = env.daemon_with(&["--stem-cells", "1"]);
    drop(stray);
    let agent_has_it = descriptors(d.pid())
        .iter()
        .any(|(_, t, _)| Path::new(t) == stray_path);
    assert!(
        agent_has_it,
        "the agent did not inherit the stray descriptor"
    );
    // Once the stem cell is built (its cgroup exists and the agent removed its
    // bundle after the spawner answered), the spawner is idle again.
    let built = wait_for(Duration::from_secs(20), || {
        (d.sandboxes().len() == 1 && bundles(&env, d.pid()) == 0)
            .then_some(())
            .ok_or(())
    });
    assert!(built.is_ok(), "no stem cell\nlog:\n{}", d.log());
    let spawner = d.spawner_pid();
    // The daemon's stdout and stderr (its log file), which the spawner shares.
    let log = fs::read_link(format!("/proc/{}/fd/2", d.pid()))
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let expected = |n: u32, t: &str, cloexec: bool| match n {
        0 => t == "/dev/null",
        1 | 2 => t == log,
        3 => t.starts_with("socket:[") && cloexec,
        _ => false,
    };
    // Between requests. A request may still be running (the pool settles the stem
    // cell after it is listed): while it runs, the spawner may hold a close-on-exec
    // pidfd of a forked sandbox's process, for that request only. Anything else,
    // or a pidfd still held when the spawner is idle, fails.
    let transient = |t: &str, cloexec: bool| t == "anon_inode:[pidfd]" && cloexec;
    let mut last = Vec::new();
    let idle = wait_for(Duration::from_secs(5), || {
        let fds = descriptors(spawner);
        let bad: Vec<_> = fds
            .iter()
            .filter(|(n, t, c)| !expected(*n, t, *c))
            .cloned()
            .collect();
        assert!(
            bad.iter().all(|(_, t, c)| transient(t, *c)),
            "the spawner holds {bad:?} (all: {fds:?})"
        );
        last = fds;
        if bad.is_empty() {
            Ok(())
        } else {
            Err(bad)
        }
    });
    if let Err(bad) = idle {
        panic!("the spawner still holds {bad:?} after 5 s (all: {last:?})");
    }
}

/// `sprout serve --spawner PATH` names the executable; a missing one is refused at
/// start with an error naming the path tried, and nothing is left behind.
#[test]
fn a_missing_spawner_executable_is_named() {
    let env = require_root!();
    let missing = env.work_dir().join("no-such-sprout-spawner");
    let run = env
        .sprout()
        .arg("--socket")
        .arg(env.work_dir().join("api.sock"))
        .arg("serve")
        .arg("--spawner")
        .arg(&missing)
        .run();
    assert_ne!(run.code(), Some(0));
    assert!(
        run.stderr.contains(&format!(
            "no sprout-spawner executable: tried {}",
            missing.display()
        )),
        "{}",
        run.stderr
    );
}
