//! The warm pool: freezing and thawing, stem cells, the idle TTL, eviction under a
//! memory budget, per-function instances and queues, and many concurrent invocations.
//!
//! Cgroups are read where the host keeps them: one hierarchy per controller on v1,
//! the unified one on v2. A helper that cannot find the file it reads panics instead
//! of answering "no", so a check cannot pass by looking in the wrong place.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use sprout_tests::{
    agent_cgroup_dirs, alive, all_pids, body_json, cgroup_v2, json, require_root,
    sandbox_cgroup_dir, sandbox_frozen, text, wait_for, ClientResponse, Daemon, Value, HELLO_PY,
};

fn header(r: &ClientResponse, name: &str) -> String {
    r.header(name)
        .unwrap_or_else(|| panic!("response has no {name} header: {:?}", r.headers))
        .to_owned()
}

fn functions(d: &Daemon) -> Value {
    body_json(&d.request("GET", "/functions", None, b""))
}

fn warm_instances(d: &Daemon, name: &str) -> u64 {
    functions(d)
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == name)
        .map_or(0, |f| f["warm_instances"].as_u64().unwrap())
}

// ---------------------------------------------------------------------------
// Cgroups, v1 and v2

/// A file of a sandbox's cgroup; panics when it is missing.
#[track_caller]
fn read_cgroup(agent: u32, sandbox: &str, v1_controller: &str, file: &str) -> String {
    let path = sandbox_cgroup_dir(agent, sandbox, v1_controller).join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Every directory of a sandbox's cgroup that exists now: one per v1 hierarchy, or
/// the unified one.
fn sandbox_cgroup_dirs(agent: u32, sandbox: &str) -> Vec<PathBuf> {
    agent_cgroup_dirs(agent)
        .into_iter()
        .map(|d| d.join(sandbox))
        .filter(|d| d.is_dir())
        .collect()
}

/// The agent's sandbox cgroups (memory hierarchy on v1, unified on v2), sorted.
fn sandboxes(d: &Daemon) -> Vec<String> {
    d.sandboxes()
}

/// CPU time the sandbox's processes have used, in nanoseconds.
fn cpu_used_ns(agent: u32, sandbox: &str) -> u64 {
    if cgroup_v2() {
        let stat = read_cgroup(agent, sandbox, "", "cpu.stat");
        let usec: u64 = stat
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .unwrap_or_else(|| panic!("no usage_usec in cpu.stat: {stat}"))
            .trim()
            .parse()
            .unwrap();
        usec * 1000
    } else {
        read_cgroup(agent, sandbox, "cpuacct", "cpuacct.usage")
            .trim()
            .parse()
            .unwrap()
    }
}

/// Waits until the sandbox is frozen.
#[track_caller]
fn wait_frozen(d: &Daemon, sandbox: &str) {
    wait_for(Duration::from_secs(10), || {
        sandbox_frozen(d.pid(), sandbox).then_some(()).ok_or(())
    })
    .unwrap_or_else(|()| panic!("{sandbox} was not frozen; log:\n{}", d.log()));
}

/// Live processes (host pids) in the sandbox's cgroup, found through /proc (so also
/// once the cgroup is gone, on v1 and v2 alike).
fn sandbox_processes(agent: u32, sandbox: &str) -> Vec<u32> {
    let cgroup = format!("/sprout/{agent}/{sandbox}");
    let inside = format!("{cgroup}/");
    all_pids()
        .into_iter()
        .filter(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/cgroup")).is_ok_and(|c| {
                c.lines()
                    .any(|l| l.ends_with(&cgroup) || l.contains(&inside))
            }) && alive(p)
        })
        .collect()
}

/// The host pid of the process that is `ns_pid` in its own pid namespace, among `pids`.
fn host_pid_of(pids: &[u32], ns_pid: u64) -> Option<u32> {
    pids.iter().copied().find(|p| {
        std::fs::read_to_string(format!("/proc/{p}/status")).is_ok_and(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .and_then(|l| l.split_whitespace().last())
                .is_some_and(|last| last == ns_pid.to_string())
        })
    })
}

/// Waits until the sandbox's cgroup is gone from every hierarchy and none of its
/// processes is alive.
#[track_caller]
fn wait_sandbox_gone(d: &Daemon, sandbox: &str, within: Duration) {
    let gone = wait_for(within, || {
        let dirs = sandbox_cgroup_dirs(d.pid(), sandbox);
        let procs = sandbox_processes(d.pid(), sandbox);
        if dirs.is_empty() && procs.is_empty() {
            Ok(())
        } else {
            Err((dirs, procs))
        }
    });
    if let Err((dirs, procs)) = gone {
        panic!(
            "sandbox {sandbox} still there after {within:?}: cgroups {dirs:?}, processes {procs:?}; log:\n{}",
            d.log()
        );
    }
}

/// Waits until `/status` counts `n` sandboxes (the count drops just after the
/// spawner has destroyed one).
#[track_caller]
fn wait_sandbox_count(d: &Daemon, n: u64) {
    wait_for(Duration::from_secs(5), || {
        let s = d.status();
        if s["sandboxes"] == n {
            Ok(())
        } else {
            Err(s)
        }
    })
    .unwrap_or_else(|s| panic!("expected {n} sandboxes: {s}"));
}

/// The file a held invocation writes into its sandbox's `/tmp` once it is waiting,
/// and the one it waits for (see [`HOLD_PY`]).
const HELD_FILE: &str = "sprout-held";
const RELEASE_FILE: &str = "sprout-release";

/// Lets every held invocation in `sandbox` return, once one is waiting: writes
/// [`RELEASE_FILE`] into the sandbox's own `/tmp` (a tmpfs in its mount namespace),
/// reached from the host through a process of the sandbox that sees [`HELD_FILE`]
/// there (so not one still being set up, whose root is the host's).
#[track_caller]
fn release(d: &Daemon, sandbox: &str) {
    let tmp = wait_for(Duration::from_secs(20), || {
        let procs = sandbox_processes(d.pid(), sandbox);
        procs
            .iter()
            // Only processes already inside the sandbox's own root (not one whose root
            // is still the host's, on its way in), so nothing is written on the host.
            .filter(|p| !same_file(&format!("/proc/{p}/root"), "/"))
            .map(|p| PathBuf::from(format!("/proc/{p}/root/tmp")))
            .find(|tmp| tmp.join(HELD_FILE).is_file())
            .ok_or(procs)
    })
    .unwrap_or_else(|procs| {
        panic!(
            "no invocation held in {sandbox} (processes {procs:?}); log:\n{}",
            d.log()
        )
    });
    let file = tmp.join(RELEASE_FILE);
    sprout_tests::write_into(&file, "go")
        .unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
}

/// Whether two paths name the same file (device and inode); `false` if either is gone.
fn same_file(a: &str, b: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// Counts its invocations per instance. With `"hold": true` it writes [`HELD_FILE`]
/// and waits (up to 30 s) until the test writes [`RELEASE_FILE`] into its sandbox's
/// `/tmp`.
const HOLD_PY: &str = r#"import os, time
served = 0
def f(event):
    global served
    served += 1
    seq = served
    if event.get("hold"):
        open("/tmp/sprout-held", "w").close()
        deadline = time.monotonic() + 30
        while not os.path.exists("/tmp/sprout-release"):
            if time.monotonic() > deadline:
                raise RuntimeError("never released")
            time.sleep(0.005)
    return {"n": event.get("n"), "seq": seq, "sandbox": os.environ["SPROUT_SANDBOX"], "pid": os.getpid()}
"#;

/// Sends `event` to `function` from a thread of its own, on its own connection.
fn invoke_in_background(
    d: &Daemon,
    function: &str,
    event: Value,
) -> thread::JoinHandle<ClientResponse> {
    let socket = d.socket().to_path_buf();
    let path = format!("/functions/{function}/invoke");
    thread::spawn(move || {
        let mut c = sprout_tests::Client::connect(&socket).unwrap();
        c.request("POST", &path, None, event.to_string().as_bytes())
            .unwrap()
    })
}

const SPINNER_PY: &str = r#"import os, threading
count = 0
def spin():
    global count
    while True:
        count += 1
started = False
def f(event):
    global started
    if not started:
        started = True
        threading.Thread(target=spin, daemon=True).start()
    return {"sandbox": os.environ["SPROUT_SANDBOX"], "count": count}
"#;

#[test]
fn freeze_stops_a_busy_function_and_thaw_resumes_it() {
    let env = require_root!();
    let d = env.daemon_with(&["--stem-cells", "0", "--pause-grace", "1000"]);
    d.register(
        "spinner",
        &env.function("spinner", &[("f.py", SPINNER_PY)]),
        json!({}),
    );
    let r = d.invoke("spinner", "{}");
    assert_eq!(r.status, 200, "{}", text(&r));
    let sandbox = body_json(&r)["sandbox"].as_str().unwrap().to_owned();

    // Idle past the grace, the sandbox is frozen even though a thread of it spins.
    wait_frozen(&d, &sandbox);
    let a = cpu_used_ns(d.pid(), &sandbox);
    thread::sleep(Duration::from_millis(300));
    let b = cpu_used_ns(d.pid(), &sandbox);
    assert_eq!(a, b, "a frozen sandbox used CPU time");

    // An invoke thaws it, and the spinning thread runs again.
    let r = d.invoke("spinner", "{}");
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(header(&r, "X-Sprout-Start"), "thawed");
    // Within the 1 s grace (before it is frozen again) it uses CPU again; polled, as
    // other tests may be keeping the two cores busy.
    let c = cpu_used_ns(d.pid(), &sandbox);
    let grew = wait_for(Duration::from_millis(800), || {
        let e = cpu_used_ns(d.pid(), &sandbox);
        if e > c + 10_000_000 {
            Ok(e)
        } else {
            Err(e)
        }
    });
    grew.unwrap_or_else(|e| panic!("a thawed sandbox should spin again: {c} -> {e} ns"));
}

#[test]
fn stem_cells_serve_cold_starts_and_are_refilled() {
    let env = require_root!();
    let d = env.daemon_with(&["--stem-cells", "2"]);
    let ready = |n: u64| {
        wait_for(Duration::from_secs(15), || {
            let s = d.status();
            if s["stem_cells"] == n && s["frozen"].as_u64() >= Some(n) {
                Ok(s)
            } else {
                Err(s)
            }
        })
    };
    ready(2).unwrap_or_else(|s| panic!("stem cells not ready: {s}; log:\n{}", d.log()));

    let probe = env.function(
        "limits",
        &[(
            "f.py",
            "import os\ndef f(event):\n    return os.environ['SPROUT_SANDBOX']\n",
        )],
    );
    d.register("limits", &probe, json!({ "memory_mb": 64, "pids": 32 }));
    let r = d.invoke("limits", "{}");
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(header(&r, "X-Sprout-Start"), "stem_cell", "{}", d.log());
    assert_eq!(header(&r, "X-Sprout-Cold"), "true");
    let sandbox: String = serde_json::from_slice(&r.body).unwrap();
    // The stem cell was made with the defaults and got the function's own limits.
    let limit = if cgroup_v2() {
        read_cgroup(d.pid(), &sandbox, "", "memory.max")
    } else {
        read_cgroup(d.pid(), &sandbox, "memory", "memory.limit_in_bytes")
    };
    assert_eq!(limit.trim(), (64u64 << 20).to_string());
    let pids = read_cgroup(d.pid(), &sandbox, "pids", "pids.max");
    assert_eq!(pids.trim(), "32");

    // The pool refills off the request path.
    let s = ready(2).unwrap_or_else(|s| panic!("stem cells not refilled: {s}; log:\n{}", d.log()));
    assert_eq!(s["sandboxes"], 3, "{s}");

    d.register(
        "hello",
        &env.function("hello", &[("f.py", HELLO_PY)]),
        json!({}),
    );
    let r = d.invoke("hello", r#"{"name":"stem"}"#);
    assert_eq!(header(&r, "X-Sprout-Start"), "stem_cell");
    assert_eq!(r.body, br#""Hello, stem!""#);
}

#[test]
fn without_stem_cells_a_cold_start_makes_a_sandbox() {
    let env = require_root!();
    let d = env.daemon_with(&["--stem-cells", "0"]);
    d.register(
        "hello",
        &env.function("hello", &[("f.py", HELLO_PY)]),
        json!({}),
    );
    let r = d.invoke("hello", r#"{"name":"x"}"#);
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(header(&r, "X-Sprout-Start"), "new_sandbox");
    assert_eq!(d.status()["stem_cells"], 0);
}

/// `--idle-ttl`: an instance idle past the TTL is destroyed (frozen as it is by
/// then: its processes and cgroup go), while one used within the TTL is kept.
#[test]
fn idle_instances_are_destroyed_after_the_idle_ttl_and_used_ones_kept() {
    const TTL: Duration = Duration::from_secs(2);
    let env = require_root!();
    let d = env.daemon_with(&["--stem-cells", "0", "--idle-ttl", "2"]);
    let dir = env.function("sleeper", &[("f.py", sprout_tests::SLEEPER_PY)]);
    d.register("idle", &dir, json!({}));
    d.register("busy", &dir, json!({}));
    let sandbox_of = |name: &str| {
        let r = d.invoke(name, "{}");
        assert_eq!(r.status, 200, "{}", text(&r));
        body_json(&r)["sandbox"].as_str().unwrap().to_owned()
    };
    let idle = sandbox_of("idle");
    let idle_used = Instant::now();
    let busy = sandbox_of("busy");
    assert_eq!(sandboxes(&d), {
        let mut both = vec![idle.clone(), busy.clone()];
        both.sort();
        both
    });
    // Idle past the pause grace first: the TTL destroys a frozen sandbox.
    wait_frozen(&d, &idle);
    let idle_procs = sandbox_processes(d.pid(), &idle);
    assert!(!idle_procs.is_empty(), "no process found in {idle}");

    // "busy" is used every 200 ms (well within the TTL) until "idle" is gone.
    let gone = wait_for(Duration::from_secs(15), || {
        assert_eq!(sandbox_of("busy"), busy, "a used instance was replaced");
        thread::sleep(Duration::from_millis(200));
        let left = sandbox_cgroup_dirs(d.pid(), &idle);
        let alive: Vec<u32> = idle_procs.iter().copied().filter(|&p| alive(p)).collect();
        if left.is_empty() && alive.is_empty() {
            Ok(idle_used.elapsed())
        } else {
            Err((left, alive))
        }
    });
    let after = gone.unwrap_or_else(|(left, alive)| {
        panic!(
            "idle instance {idle} not destroyed past the {TTL:?} TTL: cgroups {left:?}, processes {alive:?}; log:\n{}",
            d.log()
        )
    });
    assert!(
        after >= TTL - Duration::from_millis(500),
        "{idle} was destroyed {after:?} after its last use, before the {TTL:?} TTL"
    );
    assert_eq!(
        sandboxes(&d),
        std::slice::from_ref(&busy),
        "only the used instance is kept"
    );
    wait_sandbox_count(&d, 1);
    assert_eq!(
        (warm_instances(&d, "idle"), warm_instances(&d, "busy")),
        (0, 1)
    );
    // Left alone, "busy" goes the same way; "idle" comes back cold.
    wait_sandbox_gone(&d, &busy, Duration::from_secs(15));
    wait_sandbox_count(&d, 0);
    assert_eq!(warm_instances(&d, "busy"), 0);
    let r = d.invoke("idle", "{}");
    assert_eq!(header(&r, "X-Sprout-Start"), "new_sandbox");
}

#[test]
fn least_recently_used_instances_are_evicted_over_the_memory_budget() {
    let env = require_root!();
    // Each function reserves 128 MiB: two fit in 300, a third does not. (Sandboxes
    // made by libcontainer: a fork server would reserve its own 64 MiB, counted in
    // `forked::the_fork_server_counts_against_the_memory_budget`.)
    let d = env.daemon_with(&[
        "--stem-cells",
        "0",
        "--memory-budget",
        "300",
        "--new-sandboxes",
        "create",
    ]);
    let dir = env.function("hello", &[("f.py", HELLO_PY)]);
    for name in ["a", "b", "c"] {
        d.register(name, &dir, json!({}));
    }
    for name in ["a", "b", "c"] {
        let r = d.invoke(name, "{}");
        assert_eq!(r.status, 200, "{}", text(&r));
    }
    let evicted = wait_for(Duration::from_secs(5), || {
        let warm: Vec<u64> = ["a", "b", "c"]
            .iter()
            .map(|n| warm_instances(&d, n))
            .collect();
        if warm == [0, 1, 1] {
            Ok(warm)
        } else {
            Err(warm)
        }
    });
    evicted
        .unwrap_or_else(|w| panic!("expected only a (least recently used) evicted, warm = {w:?}"));
    // The evicted sandbox's memory is given back once it is destroyed, just after.
    wait_for(Duration::from_secs(5), || {
        let s = d.status();
        if s["reserved_mb"].as_u64().unwrap() <= 300 {
            Ok(())
        } else {
            Err(s)
        }
    })
    .unwrap_or_else(|s| panic!("still over the budget: {s}"));

    // a comes back cold; now b is the least recently used and goes.
    let r = d.invoke("a", "{}");
    assert_eq!(header(&r, "X-Sprout-Start"), "new_sandbox");
    wait_for(Duration::from_secs(5), || {
        let warm: Vec<u64> = ["a", "b", "c"]
            .iter()
            .map(|n| warm_instances(&d, n))
            .collect();
        if warm == [1, 0, 1] {
            Ok(())
        } else {
            Err(warm)
        }
    })
    .unwrap_or_else(|w| panic!("expected b evicted next, warm = {w:?}"));
}

/// Over the memory budget, idle instances are destroyed before stem cells.
#[test]
fn idle_instances_are_evicted_before_stem_cells() {
    let env = require_root!();
    // Stem cells and "small" reserve 128 MiB each, "big" 256. Two stem cells and
    // "small" fit in 400 (384); once "big" takes a stem cell (512) one of "small" or
    // the other stem cell must go, and either is enough.
    // (Sandboxes made by libcontainer: a fork server reserves 64 MiB of its own.)
    let d = env.daemon_with(&[
        "--stem-cells",
        "2",
        "--memory-budget",
        "400",
        "--new-sandboxes",
        "create",
    ]);
    let dir = env.function("sleeper", &[("f.py", sprout_tests::SLEEPER_PY)]);
    d.register("small", &dir, json!({}));
    d.register("big", &dir, json!({ "memory_mb": 256 }));
    let settled = |stems: u64, reserved: u64| {
        wait_for(Duration::from_secs(15), || {
            let s = d.status();
            if s["stem_cells"] == stems && s["reserved_mb"] == reserved {
                Ok(s)
            } else {
                Err(s)
            }
        })
        .unwrap_or_else(|s| {
            panic!(
                "expected {stems} stem cells, {reserved} MiB: {s}; log:\n{}",
                d.log()
            )
        })
    };
    settled(2, 256);
    let r = d.invoke("small", "{}");
    assert_eq!(header(&r, "X-Sprout-Start"), "stem_cell");
    let small = body_json(&r)["sandbox"].as_str().unwrap().to_owned();
    settled(2, 384);
    let before = sandboxes(&d);
    assert_eq!(before.len(), 3, "{before:?}");

    let r = d.invoke("big", "{}");
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(header(&r, "X-Sprout-Start"), "stem_cell");
    let big = body_json(&r)["sandbox"].as_str().unwrap().to_owned();
    let stem: Vec<String> = before
        .iter()
        .filter(|s| **s != small && **s != big)
        .cloned()
        .collect();
    assert_eq!(stem.len(), 1, "{before:?}, small {small}, big {big}");

    // Back under the budget: "small" went, the stem cell stayed (and was not
    // destroyed and made again: the same sandbox is there).
    let s = wait_for(Duration::from_secs(15), || {
        let s = d.status();
        if s["reserved_mb"].as_u64().unwrap() <= 400 {
            Ok(s)
        } else {
            Err(s)
        }
    })
    .unwrap_or_else(|s| panic!("still over the budget: {s}; log:\n{}", d.log()));
    assert_eq!(
        (
            warm_instances(&d, "small"),
            warm_instances(&d, "big"),
            s["stem_cells"].as_u64().unwrap()
        ),
        (0, 1, 1),
        "(small, big, stem cells): the idle instance should go before the stem cell; {s}"
    );
    wait_sandbox_gone(&d, &small, Duration::from_secs(10));
    let mut expected = vec![big, stem[0].clone()];
    expected.sort();
    assert_eq!(sandboxes(&d), expected);
    assert_eq!(d.status()["reserved_mb"], 384);
}

/// Instances are added one per request while every instance is busy, up to the
/// function's `max_instances`; beyond it requests queue, and all are answered.
#[test]
fn instances_grow_with_the_backlog_up_to_max_instances() {
    const MAX: usize = 3;
    const REQUESTS: usize = 6;
    let env = require_root!();
    let d = env.daemon_with(&["--stem-cells", "0", "--pause-grace", "600000"]);
    d.register(
        "hold",
        &env.function("hold", &[("f.py", HOLD_PY)]),
        json!({ "max_instances": MAX }),
    );
    let mut peak = 0;
    let mut clients = Vec::new();
    for k in 1..=REQUESTS {
        clients.push(invoke_in_background(
            &d,
            "hold",
            json!({ "n": k, "hold": true }),
        ));
        // Every request so far is held: the k-th gets a new instance while there are
        // fewer than MAX, and waits in the queue after that.
        let want = (k.min(MAX), k.saturating_sub(MAX));
        let reached = wait_for(Duration::from_secs(20), || {
            let s = d.status();
            let cgroups = sandboxes(&d);
            peak = peak.max(cgroups.len());
            let got = (cgroups.len(), s["queued"].as_u64().unwrap() as usize);
            if got == want && s["sandboxes"] == want.0 {
                Ok(())
            } else {
                Err((got, s))
            }
        });
        reached.unwrap_or_else(|(got, s)| {
            panic!(
                "after {k} held requests: (sandboxes, queued) = {got:?}, expected {want:?}; status {s}; log:\n{}",
                d.log()
            )
        });
    }
    let held = sandboxes(&d);
    for sandbox in &held {
        release(&d, sandbox);
    }
    let mut served_by = BTreeSet::new();
    for c in clients {
        let r = c.join().unwrap();
        assert_eq!(r.status, 200, "{}", text(&r));
        served_by.insert(body_json(&r)["sandbox"].as_str().unwrap().to_owned());
        peak = peak.max(sandboxes(&d).len());
    }
    assert_eq!(peak, MAX, "at most {MAX} sandboxes at once");
    assert_eq!(
        served_by.into_iter().collect::<Vec<_>>(),
        held,
        "the {REQUESTS} requests were served by exactly the {MAX} instances"
    );
    assert_eq!(d.status()["queued"], 0);
}

/// With `max_instances` 1, requests that wait are served in the order they arrived,
/// each handed the instance the previous one finished with: one sandbox, one
/// process, no new instance.
#[test]
fn queued_requests_are_served_in_arrival_order_by_the_same_instance() {
    const QUEUED: u64 = 5;
    let env = require_root!();
    let d = env.daemon_with(&["--stem-cells", "0", "--pause-grace", "600000"]);
    d.register(
        "fifo",
        &env.function("fifo", &[("f.py", HOLD_PY)]),
        json!({ "max_instances": 1 }),
    );
    // The first request holds the only instance.
    let holder = invoke_in_background(&d, "fifo", json!({ "n": "holder", "hold": true }));
    let sandbox = wait_for(Duration::from_secs(20), || match sandboxes(&d).as_slice() {
        [one] => Ok(one.clone()),
        other => Err(other.to_vec()),
    })
    .unwrap_or_else(|s| {
        panic!(
            "the holder's sandbox did not appear: {s:?}; log:\n{}",
            d.log()
        )
    });
    // The others queue one after the other: each is in the queue before the next is sent.
    let mut waiting = Vec::new();
    for n in 0..QUEUED {
        waiting.push(invoke_in_background(&d, "fifo", json!({ "n": n })));
        wait_for(Duration::from_secs(10), || {
            let s = d.status();
            if s["queued"] == n + 1 {
                Ok(())
            } else {
                Err(s)
            }
        })
        .unwrap_or_else(|s| panic!("request {n} was not queued: {s}; log:\n{}", d.log()));
    }
    assert!(
        !holder.is_finished(),
        "the holder returned before it was released"
    );
    release(&d, &sandbox);

    let r = holder.join().unwrap();
    assert_eq!(r.status, 200, "{}", text(&r));
    let first = body_json(&r);
    assert_eq!(first["seq"], 1, "{first}");
    for (n, c) in waiting.into_iter().enumerate() {
        let r = c.join().unwrap();
        assert_eq!(r.status, 200, "{}", text(&r));
        let got = body_json(&r);
        assert_eq!(
            (&got["sandbox"], &got["pid"]),
            (&first["sandbox"], &first["pid"]),
            "request {n} was not served by the instance it waited for: {got}"
        );
        assert_eq!(
            got["seq"],
            n as u64 + 2,
            "request {n} (queued {n}th) ran out of order: {got}"
        );
        assert_eq!(header(&r, "X-Sprout-Start"), "warm", "request {n}");
        assert_eq!(header(&r, "X-Sprout-Cold"), "false", "request {n}");
    }
    assert_eq!(sandboxes(&d), [sandbox]);
    let s = d.status();
    assert_eq!(
        (&s["sandboxes"], &s["queued"]),
        (&json!(1), &json!(0)),
        "{s}"
    );
}

/// A frozen sandbox that is destroyed (here: its function is removed) loses every
/// process and its cgroups: on v1 a frozen task dies only once thawed.
#[test]
fn a_frozen_sandbox_is_destroyed_with_all_its_processes() {
    let env = require_root!();
    let d = env.daemon_with(&["--stem-cells", "0", "--pause-grace", "50"]);
    d.register(
        "sleeper",
        &env.function("sleeper", &[("f.py", sprout_tests::SLEEPER_PY)]),
        json!({}),
    );
    let r = d.invoke("sleeper", "{}");
    assert_eq!(r.status, 200, "{}", text(&r));
    let sandbox = body_json(&r)["sandbox"].as_str().unwrap().to_owned();
    wait_frozen(&d, &sandbox);
    let procs = sandbox_processes(d.pid(), &sandbox);
    // The shim, the zygote and the instance at least.
    assert!(procs.len() >= 3, "processes of {sandbox}: {procs:?}");
    assert!(!sandbox_cgroup_dirs(d.pid(), &sandbox).is_empty());

    // Removed on a thread of its own: a destroy stuck on a frozen task must fail
    // the test, not hang it.
    let socket = d.socket().to_path_buf();
    let remove = thread::spawn(move || {
        sprout_tests::Client::connect(&socket)
            .unwrap()
            .request("DELETE", "/functions/sleeper", None, b"")
            .unwrap()
            .status
    });
    wait_sandbox_gone(&d, &sandbox, Duration::from_secs(10));
    for p in &procs {
        assert!(!alive(*p), "process {p} of {sandbox} survived");
    }
    assert_eq!(remove.join().unwrap(), 200);
    let s = d.status();
    assert_eq!(
        (&s["sandboxes"], &s["frozen"]),
        (&json!(0), &json!(0)),
        "{s}"
    );
}

/// An instance killed from outside while its sandbox is frozen is found out on the
/// next invoke (which fails as `instance_died`, not a timeout); its sandbox is
/// destroyed and the invoke after that gets a new one.
#[test]
fn an_instance_killed_while_frozen_is_found_out_on_the_next_invoke() {
    let env = require_root!();
    let d = env.daemon_with(&["--stem-cells", "0", "--pause-grace", "50"]);
    d.register(
        "sleeper",
        &env.function("sleeper", &[("f.py", sprout_tests::SLEEPER_PY)]),
        json!({ "timeout_ms": 30000 }),
    );
    let r = d.invoke("sleeper", "{}");
    assert_eq!(r.status, 200, "{}", text(&r));
    let first = body_json(&r);
    let sandbox = first["sandbox"].as_str().unwrap().to_owned();
    wait_frozen(&d, &sandbox);
    // The instance is a process this test's daemon started; found by its pid in the
    // sandbox's pid namespace, and killed by its host pid.
    let procs = sandbox_processes(d.pid(), &sandbox);
    let instance = host_pid_of(&procs, first["pid"].as_u64().unwrap())
        .unwrap_or_else(|| panic!("instance pid {} not among {procs:?}", first["pid"]));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(instance as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();

    let started = Instant::now();
    let r = d.invoke("sleeper", "{}");
    assert_eq!(r.status, 502, "{}", text(&r));
    assert_eq!(
        body_json(&r)["error"]["kind"],
        "instance_died",
        "{}",
        text(&r)
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "noticed only after {:?}",
        started.elapsed()
    );
    wait_sandbox_gone(&d, &sandbox, Duration::from_secs(10));

    let r = d.invoke("sleeper", "{}");
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(header(&r, "X-Sprout-Start"), "new_sandbox");
    assert_ne!(body_json(&r)["sandbox"], first["sandbox"]);
}

/// Raises this process's descriptor limit to its hard limit.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}

/// Returns its request's id, and which instance ran it and how many invocations
/// that instance had run by then.
const COUNTING_ECHO_PY: &str = r#"import os
count = 0
def f(event):
    global count
    count += 1
    return {"id": event["id"], "sandbox": os.environ["SPROUT_SANDBOX"], "pid": os.getpid(), "count": count}
"#;

/// 1,000 requests in flight at once: each gets its own answer, and the instances'
/// own counts show that exactly 1,000 invocations ran (none twice, none lost).
#[test]
fn a_thousand_concurrent_invokes_are_each_run_and_answered_once() {
    let env = require_root!();
    raise_fd_limit();
    let d = env.daemon_with(&["--stem-cells", "2"]);
    d.register(
        "echo",
        &env.function("echo", &[("f.py", COUNTING_ECHO_PY)]),
        json!({ "max_instances": 4 }),
    );
    const N: usize = 1000;
    // All 1,000 requests are in flight before any answer is read.
    let mut conns: Vec<UnixStream> = (0..N)
        .map(|id| {
            let mut s = UnixStream::connect(d.socket()).unwrap_or_else(|e| panic!("connect #{id}: {e}"));
            let body = format!(r#"{{"id":{id}}}"#);
            write!(
                s,
                "POST /functions/echo/invoke HTTP/1.1\r\nHost: sprout\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            s
        })
        .collect();
    // Per instance (sandbox, pid): the counts it answered with.
    let mut runs: BTreeMap<(String, u64), Vec<u64>> = BTreeMap::new();
    for (id, s) in conns.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response)
            .unwrap_or_else(|e| panic!("read #{id}: {e}"));
        assert!(response.starts_with("HTTP/1.1 200"), "#{id}: {response}");
        let body = response.split("\r\n\r\n").nth(1).unwrap();
        let got: Value =
            serde_json::from_str(body.trim()).unwrap_or_else(|_| panic!("#{id}: {response}"));
        assert_eq!(got["id"], id, "request {id} got another request's answer");
        runs.entry((
            got["sandbox"].as_str().unwrap().to_owned(),
            got["pid"].as_u64().unwrap(),
        ))
        .or_default()
        .push(got["count"].as_u64().unwrap());
    }
    // Each instance ran invocations 1, 2, ..., k, each answered once: a request run
    // twice leaves a gap (or a count twice), whoever got the answer.
    let mut total = 0;
    for (instance, counts) in &mut runs {
        counts.sort();
        let last = counts.last().copied().unwrap_or(0);
        let missing: Vec<u64> = (1..=last)
            .filter(|c| counts.binary_search(c).is_err())
            .collect();
        let repeated: Vec<u64> = counts
            .windows(2)
            .filter(|w| w[0] == w[1])
            .map(|w| w[0])
            .collect();
        assert!(
            missing.is_empty() && repeated.is_empty(),
            "instance {instance:?} ran {last} invocations but answered {} requests: counts {missing:?} \
             answered nobody (a request ran twice?), counts {repeated:?} answered two",
            counts.len()
        );
        total += counts.len();
    }
    assert_eq!(total, N);
    assert!(
        runs.len() <= 4,
        "more instances than max_instances: {:?}",
        runs.keys()
    );
    let s = d.status();
    assert_eq!(s["queued"], 0, "{s}");
    assert_eq!(s["invocations"], N, "{s}");
    assert!(warm_instances(&d, "echo") <= 4, "{}", functions(&d));
}

const WARM_PATHS_PY: &str = r#"import os, sys, time
def f(event):
    mode = event.get("mode")
    if mode == "slow":
        time.sleep(0.05)
    elif mode == "loud":
        sys.stdout.write("x" * 300000)
    elif mode == "die":
        os._exit(3)
    return mode
"#;

/// Warm invokes complete on the HTTP event loop unless they need waiting: one that
/// outlasts the loop's budget, one that fills its output pipe, and one whose instance
/// dies are finished by a worker, correctly.
#[test]
fn warm_invokes_that_need_waiting_are_finished_correctly() {
    let env = require_root!();
    let d = env.daemon_with(&["--stem-cells", "0", "--pause-grace", "600000"]);
    d.register(
        "paths",
        &env.function("paths", &[("f.py", WARM_PATHS_PY)]),
        json!({}),
    );
    let invoke = |mode: &str, logs: bool| {
        let path = if logs {
            "/functions/paths/invoke?logs=true"
        } else {
            "/functions/paths/invoke"
        };
        d.request(
            "POST",
            path,
            None,
            format!(r#"{{"mode":"{mode}"}}"#).as_bytes(),
        )
    };
    assert_eq!(invoke("quick", false).status, 200); // now warm
    for _ in 0..3 {
        let r = invoke("quick", false);
        assert_eq!(
            (r.status, r.body.as_slice()),
            (200, &br#""quick""#[..]),
            "{}",
            text(&r)
        );
        assert_eq!(header(&r, "X-Sprout-Start"), "warm");
    }
    let r = invoke("slow", false);
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &br#""slow""#[..]),
        "{}",
        text(&r)
    );
    let r = invoke("loud", true);
    assert_eq!(r.status, 200, "{}", text(&r));
    let record = body_json(&r);
    assert_eq!(record["result"], "loud");
    assert_eq!(
        record["logs"]["stdout"].as_str().unwrap().len(),
        300000,
        "all output captured"
    );
    let before = sandboxes(&d);
    assert_eq!(before.len(), 1, "{before:?}");
    let r = invoke("die", false);
    assert_eq!(r.status, 502, "{}", text(&r));
    assert_eq!(body_json(&r)["error"]["kind"], "instance_died");
    wait_sandbox_gone(&d, &before[0], Duration::from_secs(5));
    let r = invoke("quick", false);
    assert_eq!(
        (r.status, header(&r, "X-Sprout-Start")),
        (200, "new_sandbox".to_owned()),
        "{}",
        text(&r)
    );
}

/// A warm call that outlasts the event loop's budget is finished even when every
/// worker is waiting for the instance it holds (a deadlock when such calls were
/// given to the workers).
#[test]
fn a_long_warm_call_finishes_while_all_workers_wait_for_its_instance() {
    let env = require_root!();
    let d = env.daemon_with(&["--stem-cells", "0", "--workers", "2"]);
    let slow = env.function(
        "slow",
        &[(
            "f.py",
            "import time\ndef f(event):\n    time.sleep(0.1)\n    return event['n']\n",
        )],
    );
    d.register("slow", &slow, json!({ "max_instances": 1 }));
    assert_eq!(d.invoke("slow", r#"{"n":0}"#).status, 200); // warm
    let clients = (1..5)
        .map(|n| invoke_in_background(&d, "slow", json!({ "n": n })))
        .collect::<Vec<_>>();
    let started = Instant::now();
    while clients.iter().any(|c| !c.is_finished()) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "deadlocked; log:\n{}",
            d.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
    for c in clients {
        let r = c.join().unwrap();
        assert_eq!(r.status, 200, "{}", text(&r));
    }
}
