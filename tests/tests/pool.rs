//! The warm pool: freezing and thawing, stem cells, eviction under a memory budget,
//! per-function queues, and many concurrent invocations.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use sprout_tests::{body_json, json, require_root, text, wait_for, Daemon, Value, HELLO_PY};

fn header(r: &sprout_tests::ClientResponse, name: &str) -> String {
    r.header(name)
        .unwrap_or_else(|| panic!("response has no {name} header: {:?}", r.headers))
        .to_owned()
}

fn status(d: &Daemon) -> Value {
    let r = d.request("GET", "/status", None, b"");
    assert_eq!(r.status, 200, "{}", text(&r));
    body_json(&r)
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

/// The file of a sandbox's cgroup in one v1 controller (or the unified hierarchy).
fn cgroup_file(daemon: u32, sandbox: &str, v1_controller: &str, file: &str) -> PathBuf {
    let v1 = PathBuf::from("/sys/fs/cgroup").join(v1_controller);
    let base = if v1.is_dir() {
        v1
    } else {
        PathBuf::from("/sys/fs/cgroup")
    };
    base.join("sprout")
        .join(daemon.to_string())
        .join(sandbox)
        .join(file)
}

/// CPU time the sandbox's processes have used, in nanoseconds.
fn cpu_used_ns(daemon: u32, sandbox: &str) -> u64 {
    let v1 = cgroup_file(daemon, sandbox, "cpuacct", "cpuacct.usage");
    if let Ok(t) = std::fs::read_to_string(&v1) {
        return t.trim().parse().unwrap();
    }
    let v2 = cgroup_file(daemon, sandbox, "", "cpu.stat");
    let text = std::fs::read_to_string(&v2).unwrap_or_else(|e| panic!("{}: {e}", v2.display()));
    let usec: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    usec * 1000
}

fn is_frozen(daemon: u32, sandbox: &str) -> bool {
    let v1 = cgroup_file(daemon, sandbox, "freezer", "freezer.state");
    match std::fs::read_to_string(&v1) {
        Ok(t) => t.trim() == "FROZEN",
        Err(_) => std::fs::read_to_string(cgroup_file(daemon, sandbox, "", "cgroup.events"))
            .is_ok_and(|t| t.lines().any(|l| l == "frozen 1")),
    }
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
    wait_for(Duration::from_secs(5), || {
        if is_frozen(d.pid(), &sandbox) {
            Ok(())
        } else {
            Err(())
        }
    })
    .unwrap_or_else(|()| panic!("{sandbox} was not frozen; log:\n{}", d.log()));
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
            let s = status(&d);
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
    let limit = std::fs::read_to_string(cgroup_file(
        d.pid(),
        &sandbox,
        "memory",
        "memory.limit_in_bytes",
    ))
    .or_else(|_| std::fs::read_to_string(cgroup_file(d.pid(), &sandbox, "", "memory.max")))
    .unwrap();
    assert_eq!(limit.trim(), (64u64 << 20).to_string());
    let pids = std::fs::read_to_string(cgroup_file(d.pid(), &sandbox, "pids", "pids.max")).unwrap();
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
    assert_eq!(status(&d)["stem_cells"], 0);
}

#[test]
fn least_recently_used_instances_are_evicted_over_the_memory_budget() {
    let env = require_root!();
    // Each function reserves 128 MiB: two fit in 300, a third does not.
    let d = env.daemon_with(&["--stem-cells", "0", "--memory-budget", "300"]);
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
        let s = status(&d);
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

#[test]
fn requests_beyond_max_instances_wait_their_turn() {
    let env = require_root!();
    let d = env.daemon_with(&["--stem-cells", "0"]);
    let slow = env.function(
        "slow",
        &[(
            "f.py",
            "import time\ndef f(event):\n    time.sleep(0.3)\n    return event['n']\n",
        )],
    );
    d.register("slow", &slow, json!({ "max_instances": 1 }));
    let started = Instant::now();
    let clients = invoke_concurrently(&d, "slow", 0..4);
    // While they run, requests queue and no second sandbox appears.
    let mut saw_queue = false;
    while clients.iter().any(|c| !c.is_finished()) {
        saw_queue |= status(&d)["queued"].as_u64().unwrap() > 0;
        assert!(
            d.sandboxes().len() <= 1,
            "max_instances 1 but {:?}",
            d.sandboxes()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let mut results: Vec<u64> = clients
        .into_iter()
        .map(|c| {
            let r = c.join().unwrap();
            assert_eq!(r.status, 200, "{}", text(&r));
            serde_json::from_slice(&r.body).unwrap()
        })
        .collect();
    results.sort();
    assert_eq!(results, [0, 1, 2, 3]);
    assert!(saw_queue, "no request was ever queued");
    assert!(
        started.elapsed() >= Duration::from_millis(1200),
        "4 × 0.3 s ran in {:?}: not one at a time",
        started.elapsed()
    );
}

/// Invokes `function` once per number in `ns`, each from its own thread and
/// connection, with the event `{"n": N}`.
fn invoke_concurrently(
    d: &Daemon,
    function: &str,
    ns: std::ops::Range<u64>,
) -> Vec<thread::JoinHandle<sprout_tests::ClientResponse>> {
    ns.map(|n| {
        let socket = d.socket().to_path_buf();
        let path = format!("/functions/{function}/invoke");
        thread::spawn(move || {
            let mut c = sprout_tests::Client::connect(&socket).unwrap();
            c.request("POST", &path, None, format!(r#"{{"n":{n}}}"#).as_bytes())
                .unwrap()
        })
    })
    .collect()
}

/// Raises this process's descriptor limit to its hard limit.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}

#[test]
fn a_thousand_concurrent_invokes_are_each_answered_once() {
    let env = require_root!();
    raise_fd_limit();
    let d = env.daemon_with(&["--stem-cells", "2"]);
    let echo = env.function(
        "echo",
        &[("f.py", "def f(event):\n    return event['id']\n")],
    );
    d.register("echo", &echo, json!({ "max_instances": 4 }));
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
    let mut answered = BTreeSet::new();
    for (id, s) in conns.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response)
            .unwrap_or_else(|e| panic!("read #{id}: {e}"));
        assert!(response.starts_with("HTTP/1.1 200"), "#{id}: {response}");
        let body = response.split("\r\n\r\n").nth(1).unwrap();
        let got: usize = body
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("#{id}: {response}"));
        assert_eq!(got, id, "request {id} got another request's answer");
        assert!(answered.insert(got), "answer {got} came twice");
    }
    assert_eq!(answered.len(), N);
    let s = status(&d);
    assert_eq!(s["queued"], 0, "{s}");
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
    let sandboxes = d.sandboxes();
    let r = invoke("die", false);
    assert_eq!(r.status, 502, "{}", text(&r));
    assert_eq!(body_json(&r)["error"]["kind"], "instance_died");
    wait_for(Duration::from_secs(5), || {
        if d.sandboxes().is_empty() {
            Ok(())
        } else {
            Err(())
        }
    })
    .unwrap_or_else(|()| panic!("the dead instance's sandbox {sandboxes:?} was not destroyed"));
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
    let clients = invoke_concurrently(&d, "slow", 1..5);
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
