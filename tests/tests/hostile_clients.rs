//! Hostile or careless API clients cannot hold the daemon (issue 9, finding 11): a
//! client that goes away takes its queued requests with it (also one that sends its
//! whole request and hangs up at once), a half-sent request head times out, connections past the cap are refused at once, and SIGTERM drains:
//! requests being handled finish within the shutdown grace, the rest are answered
//! 503, and the daemon exits 0 leaving nothing behind.

use std::collections::HashSet;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use sprout_tests::{
    body_json, json, require_root, sandbox_cgroup_dir, text, wait_for, Daemon, Env, Value,
};

/// Records each invocation's `tag` in the sandbox's `/tmp` (kept across warm
/// invocations), marks that it started, sleeps `sleep` seconds and returns the tags
/// of every invocation that ran in this sandbox so far.
const CLIENTS_PY: &str = r#"import os, time

RAN = "/tmp/sprout-clients-ran"

def f(event):
    tag = event.get("tag", "")
    with open(RAN, "a") as out:
        out.write(tag + "\n")
    with open("/tmp/sprout-clients-started-" + tag, "w"):
        pass
    time.sleep(event.get("sleep", 0))
    with open(RAN) as ran:
        tags = ran.read().split()
    return {"sandbox": os.environ.get("SPROUT_SANDBOX"), "ran": tags}
"#;

/// Registers the function (one instance at most) and warms it; returns its sandbox.
fn warm(env: &Env, d: &Daemon) -> String {
    let dir = env.function("clients-slow", &[("f.py", CLIENTS_PY)]);
    d.register("clients-slow", &dir, json!({ "max_instances": 1 }));
    let r = d.invoke("clients-slow", r#"{"tag": "warm"}"#);
    assert_eq!(r.status, 200, "{}", text(&r));
    body_json(&r)["sandbox"]
        .as_str()
        .expect("the function reports its sandbox")
        .to_owned()
}

/// What a request got, and when.
type Answer = (Result<(u16, Value), String>, Instant);

/// Invokes `event` on a connection of its own, from another thread.
fn invoke_async(d: &Daemon, event: Value) -> mpsc::Receiver<Answer> {
    let (tx, rx) = mpsc::channel();
    let mut client = d.client();
    thread::spawn(move || {
        let r = client
            .request(
                "POST",
                "/functions/clients-slow/invoke",
                Some("application/json"),
                event.to_string().as_bytes(),
            )
            .map(|r| {
                let body =
                    serde_json::from_slice(&r.body).unwrap_or_else(|_| Value::String(text(&r)));
                (r.status, body)
            })
            .map_err(|e| ipc::chain(&e));
        let _ = tx.send((r, Instant::now()));
    });
    rx
}

/// Waits until the invocation tagged `tag` has started in `sandbox`.
fn started(d: &Daemon, sandbox: &str, tag: &str) {
    // The memory controller's directory on v1, the unified one on v2.
    let procs = sandbox_cgroup_dir(d.pid(), sandbox, "memory").join("cgroup.procs");
    let marker = format!("tmp/sprout-clients-started-{tag}");
    wait_for(Duration::from_secs(20), || {
        let pids = fs::read_to_string(&procs).map_err(|e| format!("{}: {e}", procs.display()))?;
        pids.lines()
            .any(|pid| {
                Path::new(&format!("/proc/{pid}/root"))
                    .join(&marker)
                    .exists()
            })
            .then_some(())
            .ok_or_else(|| format!("{tag} has not started (processes {pids:?})"))
    })
    .unwrap_or_else(|e| panic!("{e}; daemon log:\n{}", d.log()));
}

fn queued(d: &Daemon) -> u64 {
    d.status()["queued"].as_u64().expect("status has queued")
}

/// The daemon's descriptors of connections on its API socket: sockets whose inode
/// `/proc/net/unix` lists as connected (`St` 03) on the socket's path, which an
/// accepted connection shares with its listener.
fn api_connections(d: &Daemon) -> usize {
    let path = d.socket().display().to_string();
    let table = fs::read_to_string("/proc/net/unix").expect("read /proc/net/unix");
    let inodes: HashSet<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.len() >= 8 && f[5] == "03" && f[7] == path).then(|| f[6].to_owned())
        })
        .collect();
    fd_targets(d.pid())
        .iter()
        .filter_map(|t| t.strip_prefix("socket:[")?.strip_suffix(']'))
        .filter(|inode| inodes.contains(*inode))
        .count()
}

fn fd_targets(pid: u32) -> Vec<String> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| fs::read_link(e.ok()?.path()).ok())
                .map(|t| t.display().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Reads until the server closes the connection or `within` passes; returns what
/// arrived, and whether it closed.
fn read_to_close(s: &mut UnixStream, within: Duration) -> (String, bool) {
    s.set_read_timeout(Some(within)).unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let closed = loop {
        match s.read(&mut chunk) {
            Ok(0) => break true,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

fn connect(socket: &Path) -> UnixStream {
    UnixStream::connect(socket).expect("connect to the daemon")
}

const INVOKE_HEAD: &str = "POST /functions/clients-slow/invoke HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: ";

#[test]
fn clients_that_go_away_take_their_queued_requests_with_them() {
    let env = require_root!();
    let d = env.daemon();
    let sandbox = warm(&env, &d);
    const SLOW: f64 = 2.0;
    const ABANDONED: usize = 50;

    let running = invoke_async(&d, json!({ "tag": "running", "sleep": SLOW }));
    started(&d, &sandbox, "running");
    // 50 clients queue behind it (each would run 0.2 s), then reset their connections.
    let mut gone = Vec::new();
    for i in 0..ABANDONED {
        let mut s = connect(d.socket());
        let body = json!({ "tag": format!("abandoned-{i}"), "sleep": 0.2 }).to_string();
        s.write_all(format!("{INVOKE_HEAD}{}\r\n\r\n{body}", body.len()).as_bytes())
            .unwrap();
        gone.push(s);
    }
    wait_for(Duration::from_secs(20), || {
        let n = queued(&d);
        (n == ABANDONED as u64).then_some(()).ok_or(n)
    })
    .unwrap_or_else(|n| panic!("{n} requests queued, expected {ABANDONED}"));
    drop(gone);

    let sent = Instant::now();
    let later = invoke_async(&d, json!({ "tag": "later" }));
    let (answer, at) = later
        .recv_timeout(Duration::from_secs(60))
        .expect("the later request never answered");
    let (status, body) = answer.expect("the later request failed");
    let waited = at - sent;
    assert_eq!(status, 200, "{body}");
    let (status, first) = running
        .recv_timeout(Duration::from_secs(30))
        .expect("the running request never answered")
        .0
        .expect("the running request failed");
    assert_eq!(status, 200, "{first}");
    // It ran right after the running one, not behind the abandoned ones (which
    // would add 50 x 0.2 s).
    assert_eq!(
        body["ran"],
        json!(["warm", "running", "later"]),
        "abandoned requests ran"
    );
    assert!(
        waited < Duration::from_secs_f64(SLOW + 3.0),
        "the later request waited {waited:?} behind a {SLOW} s invocation"
    );
    assert_eq!(queued(&d), 0);
}

/// Waits until the daemon's API connections number `n`; the count at the end.
fn settle_connections(d: &Daemon, n: usize, within: Duration) -> usize {
    match wait_for(within, || {
        let got = api_connections(d);
        (got == n).then_some(got).ok_or(got)
    }) {
        Ok(got) | Err(got) => got,
    }
}

#[test]
fn clients_that_send_a_request_and_hang_up_at_once_take_it_with_them() {
    let env = require_root!();
    let d = env.daemon();
    let sandbox = warm(&env, &d);
    const CLOSED: usize = 20;
    const RESET: usize = 10;

    let running = invoke_async(&d, json!({ "tag": "running", "sleep": 2.0 }));
    started(&d, &sandbox, "running");
    // Whole request, then close at once: the hang-up arrives with the data.
    for i in 0..CLOSED {
        let mut s = connect(d.socket());
        let body = json!({ "tag": format!("closed-{i}"), "sleep": 0.2 }).to_string();
        s.write_all(format!("{INVOKE_HEAD}{}\r\n\r\n{body}", body.len()).as_bytes())
            .unwrap();
    }
    // A reset: on a Unix socket that is a close with unread data (SO_LINGER does not
    // apply), here the server's `100 Continue`, left unread while the body goes out
    // and the socket is closed right after it.
    for i in 0..RESET {
        let mut s = connect(d.socket());
        let body = json!({ "tag": format!("reset-{i}"), "sleep": 0.2 }).to_string();
        s.write_all(
            format!(
                "POST /functions/clients-slow/invoke HTTP/1.1\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
        let mut fds = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(&s),
            nix::poll::PollFlags::POLLIN,
        )];
        let ready = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(10_000u16)).unwrap();
        assert_eq!(ready, 1, "reset-{i}: no 100 Continue within 10 s");
        s.write_all(body.as_bytes()).unwrap();
    }
    // The daemon lets go of all of them: only the running request's connection is left.
    let held = settle_connections(&d, 1, Duration::from_secs(10));

    let later = invoke_async(&d, json!({ "tag": "later" }));
    let (answer, _) = later
        .recv_timeout(Duration::from_secs(60))
        .expect("the later request never answered");
    let (status, body) = answer.expect("the later request failed");
    assert_eq!(status, 200, "{body}");
    let (status, first) = running
        .recv_timeout(Duration::from_secs(30))
        .expect("the running request never answered")
        .0
        .expect("the running request failed");
    assert_eq!(status, 200, "{first}");
    let ran: Vec<&str> = body["ran"]
        .as_array()
        .expect("ran")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let closed = ran.iter().filter(|t| t.starts_with("closed-")).count();
    let reset = ran.iter().filter(|t| t.starts_with("reset-")).count();
    assert_eq!(
        (closed, reset),
        (0, 0),
        "requests of clients that hung up ran: {ran:?}"
    );
    assert_eq!(ran, ["warm", "running", "later"]);
    assert_eq!(
        held, 1,
        "the daemon held {held} API connections, expected 1"
    );
    assert_eq!(queued(&d), 0);
}

#[test]
fn a_half_sent_request_head_times_out_and_its_descriptor_is_closed() {
    let env = require_root!();
    let d = env.daemon();
    wait_for(Duration::from_secs(10), || {
        let n = api_connections(&d);
        (n == 0).then_some(()).ok_or(n)
    })
    .unwrap_or_else(|n| panic!("the daemon holds {n} API connections before the test"));

    let mut head = connect(d.socket());
    head.write_all(b"POST /functions/clients-slow/invoke HTTP/1.1\r\nContent-Le")
        .unwrap();
    let mut body = connect(d.socket());
    body.write_all(format!("{INVOKE_HEAD}100\r\n\r\n{{\"tag\":").as_bytes())
        .unwrap();
    wait_for(Duration::from_secs(10), || {
        let n = api_connections(&d);
        (n == 2).then_some(()).ok_or(n)
    })
    .unwrap_or_else(|n| panic!("the daemon holds {n} API connections, expected 2"));

    // The default read timeout is 10 s; allow the sweep and a loaded machine.
    let sent = Instant::now();
    for (name, s, what) in [
        ("head", &mut head, "request head"),
        ("body", &mut body, "request body"),
    ] {
        let (got, closed) = read_to_close(s, Duration::from_secs(20));
        assert!(
            closed,
            "{name}: the connection is still open {:?} after a half-sent request (got {got:?})",
            sent.elapsed()
        );
        assert!(got.starts_with("HTTP/1.1 408 "), "{name}: {got:?}");
        assert!(
            got.contains("\"kind\":\"request_timeout\""),
            "{name}: {got:?}"
        );
        assert!(got.contains(what), "{name}: {got:?}");
    }
    assert!(
        sent.elapsed() >= Duration::from_secs(9),
        "{:?}",
        sent.elapsed()
    );
    // The daemon closed its descriptors of both connections.
    wait_for(Duration::from_secs(10), || {
        let n = api_connections(&d);
        (n == 0).then_some(()).ok_or(n)
    })
    .unwrap_or_else(|n| {
        panic!(
            "the daemon still holds {n} API connections: {:?}",
            fd_targets(d.pid())
        )
    });
    drop((head, body));
    assert_eq!(d.status()["queued"], 0);
}

#[test]
fn connections_past_the_cap_are_closed_and_the_daemon_stays_responsive() {
    let env = require_root!();
    // Room for the test's own connections.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("getrlimit");
    nix::sys::resource::setrlimit(
        nix::sys::resource::Resource::RLIMIT_NOFILE,
        hard.min(8192),
        hard,
    )
    .expect("raise RLIMIT_NOFILE");
    let d = env.daemon();
    const CAP: usize = 1024; // the default
    let held: Vec<UnixStream> = (0..CAP).map(|_| connect(d.socket())).collect();
    let mut extra: Vec<UnixStream> = (0..8).map(|_| connect(d.socket())).collect();
    for (i, s) in extra.iter_mut().enumerate() {
        let (got, closed) = read_to_close(s, Duration::from_secs(10));
        assert!(closed, "extra connection {i} is still open (got {got:?})");
        assert!(got.starts_with("HTTP/1.1 503 "), "extra {i}: {got:?}");
        assert!(
            got.contains("\"kind\":\"too_many_connections\"") && got.contains("1024 connections"),
            "extra {i}: {got:?}"
        );
    }
    // The connections it holds are served.
    let mut first = &held[0];
    first.write_all(b"GET /status HTTP/1.1\r\n\r\n").unwrap();
    let mut buf = [0u8; 16];
    first.read_exact(&mut buf).unwrap();
    assert_eq!(&buf[..13], b"HTTP/1.1 200 ");
    // Once some go, new clients are served again.
    drop(held);
    let status = wait_for(Duration::from_secs(10), || {
        d.client()
            .request("GET", "/status", None, b"")
            .map_err(|e| ipc::chain(&e))
    })
    .expect("the daemon did not answer after the connections closed");
    assert_eq!(status.status, 200);
}

#[test]
fn sigterm_lets_the_running_request_finish_and_refuses_the_queued_one() {
    let env = require_root!();
    let mut d = env.daemon();
    let sandbox = warm(&env, &d);
    let running = invoke_async(&d, json!({ "tag": "running", "sleep": 1.0 }));
    started(&d, &sandbox, "running");
    let waiting = invoke_async(&d, json!({ "tag": "waiting" }));
    wait_for(Duration::from_secs(10), || {
        let n = queued(&d);
        (n == 1).then_some(()).ok_or(n)
    })
    .unwrap_or_else(|n| panic!("{n} requests queued, expected 1"));

    let status = d.terminate();
    let (code, body) = running
        .recv_timeout(Duration::from_secs(10))
        .expect("the running request never answered")
        .0
        .unwrap_or_else(|e| panic!("the running request got no answer: {e}\n{}", d.log()));
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["ran"], json!(["warm", "running"]));
    let (code, body) = waiting
        .recv_timeout(Duration::from_secs(10))
        .expect("the queued request never answered")
        .0
        .unwrap_or_else(|e| panic!("the queued request got no answer: {e}\n{}", d.log()));
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["error"]["kind"], "unavailable", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("shutting down")),
        "{body}"
    );
    assert!(status.success(), "the daemon exited {status}");
    assert!(!d.socket().exists());
    env.assert_clean_within(d.pid(), Duration::from_secs(5));
}

#[test]
fn the_shutdown_grace_ends_with_503_and_a_clean_exit() {
    let env = require_root!();
    let mut d = env.daemon_with(&["--stem-cells", "0", "--shutdown-grace", "500"]);
    let sandbox = warm(&env, &d);
    let stuck = invoke_async(&d, json!({ "tag": "stuck", "sleep": 5.0 }));
    started(&d, &sandbox, "stuck");

    let sent = Instant::now();
    let status = d.terminate();
    let (answer, at) = stuck
        .recv_timeout(Duration::from_secs(10))
        .expect("the request never answered");
    let (code, body) =
        answer.unwrap_or_else(|e| panic!("the request got no answer: {e}\n{}", d.log()));
    let waited = at - sent;
    assert_eq!(code, 503, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("grace of 500 ms")),
        "{body}"
    );
    assert!(
        waited < Duration::from_secs(4),
        "answered {waited:?} after SIGTERM with a 500 ms grace"
    );
    assert!(status.success(), "the daemon exited {status}");
    env.assert_clean_within(d.pid(), Duration::from_secs(5));
}

/// Returns a JSON string of `mib` MiB (and two quotes).
const HUGE_PY: &str = r#"def f(event):
    return "x" * (event["mib"] << 20)
"#;

/// The start of a body, for messages.
fn short(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned()
}

#[test]
fn a_result_over_64_mib_is_refused_with_502_cold_and_warm() {
    let env = require_root!();
    let d = env.daemon();
    let dir = env.function("clients-huge", &[("f.py", HUGE_PY)]);
    d.register(
        "clients-huge",
        &dir,
        json!({ "memory_mb": 768, "max_instances": 1 }),
    );
    // The first call starts the instance; the second is a warm call the event loop
    // starts, whose shared result is checked off the loop.
    for start in ["cold", "warm"] {
        let r = d.invoke("clients-huge", r#"{"mib": 65}"#);
        assert_eq!(r.status, 502, "{start}: {}", short(&r.body));
        let e = &body_json(&r)["error"];
        assert_eq!(e["kind"], "bad_result", "{start}: {e}");
        assert_eq!(
            e["message"],
            "function clients-huge returned a result of 68157442 bytes, over the limit of 67108864 bytes for a result",
            "{start}"
        );
    }
    // A large result within the limit is answered whole, by the same instance.
    let r = d.invoke("clients-huge", r#"{"mib": 63}"#);
    assert_eq!(r.status, 200, "{}", short(&r.body));
    assert_eq!(r.body.len(), (63 << 20) + 2);
    assert!(r.body[1..r.body.len() - 1].iter().all(|&b| b == b'x'));
    assert_eq!(r.header("x-sprout-start"), Some("warm"));
}
