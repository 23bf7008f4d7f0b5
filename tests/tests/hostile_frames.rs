//! A hostile function cannot make the agent spend memory or descriptors with frames
//! (issue 9, finding 3): what a frame's prefix announces costs the agent nothing until
//! the bytes arrive (on the call socket and on the instance's own channel), and
//! descriptors a frame cannot carry drop the connection and are closed, none left
//! open.
//!
//! The attacks run inside a sandbox, with raw sockets on the agent's call socket
//! (`/.sprout/agent.sock`, which the agent reads for any function that calls another)
//! or on the instance channel the runtime answers on. An attack that holds makes sure
//! the agent has read what it sent (its socket's unread bytes, `SIOCOUTQ`, drop to
//! zero), writes `/tmp/sprout-hostile-ready` in its sandbox and keeps everything open
//! until the test, having measured the agent from the host, writes
//! `/tmp/sprout-hostile-go` there (through `/proc/<pid>/root` of a process in the
//! sandbox's cgroup).

use std::fs;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use sprout_tests::{
    body_json, json, require_root, sandbox_cgroup_dir, text, wait_for, Client, Daemon, Value,
};

/// The attacks; `{"mode": "warm"}` only starts the instance.
const HOSTILE_PY: &str = r#"import fcntl, json, os, socket, struct, sys, termios, time

def unread(s):
    """Bytes sent on `s` that the agent has not read yet."""
    return struct.unpack("i", fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]

def closed(s):
    try:
        return s.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True

def until(cond, what, within=20):
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.005)

def hold(report):
    with open("/tmp/sprout-hostile-ready.tmp", "w") as out:
        json.dump(report, out)
    os.rename("/tmp/sprout-hostile-ready.tmp", "/tmp/sprout-hostile-ready")
    until(lambda: os.path.exists("/tmp/sprout-hostile-go"), "the test never said go", 60)
    os.remove("/tmp/sprout-hostile-go")
    os.remove("/tmp/sprout-hostile-ready")
    return report

def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect("/.sprout/agent.sock")
    return s

def announce(n):
    # Prefixes announcing a 1 MiB header and a 64 MiB payload, then one byte of the
    # header: the agent reads that byte after it has made room for what it expects.
    socks = [connect() for _ in range(n)]
    for s in socks:
        s.sendall(struct.pack("<III", 1 << 20, 64 << 20, 0))
    until(lambda: not any(unread(s) for s in socks), "the agent did not read the prefixes")
    for s in socks:
        s.sendall(b"{")
    until(lambda: not any(unread(s) for s in socks), "the agent did not read the first header byte")
    report = hold({"connections": n})
    for s in socks:
        s.close()
    return report

def fds(messages):
    # A prefix announcing a 1 MiB header and 8 descriptors, then one byte of the
    # header at a time, each with 8 descriptors (dups of one pipe's write end).
    r, w = os.pipe()
    s = connect()
    s.sendall(struct.pack("<III", 1 << 20, 0, 8))
    sent, send_error = 0, None
    for _ in range(messages):
        try:
            socket.send_fds(s, [b" "], [w] * 8)
        except OSError as e:
            send_error = e.__class__.__name__
            break
        sent += 1
    until(lambda: unread(s) == 0 or closed(s), "the agent neither read nor closed")
    report = hold({"sent": sent, "send_error": send_error, "closed": closed(s)})
    s.close()
    os.close(r)
    os.close(w)
    return report

def truncated(connections):
    # One message of a frame's first byte with 9 descriptors, one more than a frame may
    # carry, on each of `connections` connections in turn: the kernel installs 8 in the
    # agent and closes the ninth. Each connection is dropped; nothing may stay open.
    r, w = os.pipe()
    dropped = 0
    for _ in range(connections):
        s = connect()
        socket.send_fds(s, [struct.pack("<III", 2, 0, 9)[:1]], [w] * 9)
        until(lambda: closed(s), "the agent kept a connection that sent 9 descriptors")
        dropped += 1
        s.close()
    os.close(r)
    os.close(w)
    return {"dropped": dropped}

def instance():
    # The same on the instance's own channel to the agent, found on the runtime's stack
    # (`serve(channel, handler)`), while the agent waits for this invocation's answer.
    frame = sys._getframe()
    while frame is not None and not hasattr(frame.f_locals.get("channel"), "sock"):
        frame = frame.f_back
    s = frame.f_locals["channel"].sock
    s.sendall(struct.pack("<III", 1 << 20, 64 << 20, 0))
    until(lambda: unread(s) == 0, "the agent did not read the prefix")
    s.sendall(b"{")
    until(lambda: unread(s) == 0, "the agent did not read the first header byte")
    report = hold({"instance": True})
    # The frame can never be finished: end the channel (the agent takes the instance
    # for dead) rather than wait for the invocation's timeout.
    s.shutdown(socket.SHUT_WR)
    return report

def f(e):
    if e["mode"] == "instance":
        return instance()
    if e["mode"] == "truncated":
        return truncated(e["connections"])
    if e["mode"] == "announce":
        return announce(e["connections"])
    if e["mode"] == "fds":
        return fds(e["messages"])
    return "warm"
"#;

/// `VmRSS` of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status:\n{status}"));
    kb << 10
}

/// Open descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read the agent's fd directory")
        .count()
}

/// Registers the hostile function and starts its instance; returns its sandbox.
fn hostile(env: &sprout_tests::Env, d: &Daemon) -> String {
    let dir = env.function("hostile", &[("f.py", HOSTILE_PY)]);
    d.register(
        "hostile",
        &dir,
        json!({"timeout_ms": 60000, "max_instances": 1}),
    );
    let r = d.invoke("hostile", r#"{"mode": "warm"}"#);
    assert_eq!(r.status, 200, "warm up: {}", text(&r));
    let sandboxes = d.sandboxes();
    assert_eq!(
        sandboxes.len(),
        1,
        "one sandbox, the function's: {sandboxes:?}"
    );
    sandboxes.into_iter().next().unwrap()
}

/// Invokes `hostile` with `event` on a thread of its own.
fn invoke_in_background(d: &Daemon, event: Value) -> mpsc::Receiver<(u16, String)> {
    let (tx, rx) = mpsc::channel();
    let socket = d.socket().to_path_buf();
    std::thread::spawn(move || {
        let r = Client::connect(&socket).and_then(|mut c| {
            c.request(
                "POST",
                "/functions/hostile/invoke",
                Some("application/json"),
                event.to_string().as_bytes(),
            )
        });
        let r = match r {
            Ok(r) => (r.status, String::from_utf8_lossy(&r.body).into_owned()),
            Err(e) => (0, ipc::chain(&e)),
        };
        let _ = tx.send(r);
    });
    rx
}

/// Waits until the attack in `sandbox` holds (its ready file exists); returns its
/// `/tmp` as the host sees it, and what it reported.
fn attack_holds(d: &Daemon, sandbox: &str) -> (PathBuf, Value) {
    // The memory controller's directory on v1, the unified one on v2.
    let procs = sandbox_cgroup_dir(d.pid(), sandbox, "memory").join("cgroup.procs");
    let found = wait_for(Duration::from_secs(30), || {
        let pids = fs::read_to_string(&procs).map_err(|e| format!("{}: {e}", procs.display()))?;
        pids.lines()
            .map(|pid| PathBuf::from(format!("/proc/{pid}/root/tmp")))
            .find_map(|tmp| {
                let report = fs::read_to_string(tmp.join("sprout-hostile-ready")).ok()?;
                Some((tmp, serde_json::from_str(&report).ok()?))
            })
            .ok_or_else(|| format!("no ready file in the sandbox (processes {pids:?})"))
    });
    found.unwrap_or_else(|e| panic!("the attack never held: {e}; daemon log:\n{}", d.log()))
}

/// Lets the attack end and returns the invocation's answer.
fn release(tmp: &std::path::Path, answer: mpsc::Receiver<(u16, String)>) -> Value {
    fs::write(tmp.join("sprout-hostile-go"), "go").expect("write the go file");
    let (status, body) = answer
        .recv_timeout(Duration::from_secs(60))
        .expect("the hostile invocation never answered");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[test]
fn frames_announced_and_not_sent_cost_the_agent_no_memory() {
    let env = require_root!();
    let d = env.daemon();
    let sandbox = hostile(&env, &d);
    let before = rss(d.pid());
    let connections = 16;
    let answer = invoke_in_background(&d, json!({"mode": "announce", "connections": connections}));
    let (tmp, report) = attack_holds(&d, &sandbox);
    assert_eq!(report["connections"], connections, "{report}");
    // Every connection's agent thread has read its 13 bytes and waits for more.
    let during = rss(d.pid());
    let v = release(&tmp, answer);
    assert_eq!(v["connections"], connections, "{v}");
    let grown = during.saturating_sub(before);
    eprintln!(
        "agent RSS {} KiB before, {} KiB with {connections} connections announcing 65 MiB",
        before >> 10,
        during >> 10
    );
    // Without a bound: 16 x (1 MiB + 64 MiB) zero-filled, about 1 GiB. With one, a
    // chunk and a thread per connection.
    assert!(
        grown < 32 << 20,
        "{connections} connections announcing 65 MiB frames (13 bytes sent on each) took \
         the agent's RSS from {} MiB to {} MiB",
        before >> 20,
        during >> 20
    );
    // The agent still serves.
    let r = d.invoke("hostile", r#"{"mode": "warm"}"#);
    assert_eq!(body_json(&r), json!("warm"), "{}", text(&r));
}

#[test]
fn descriptors_behind_an_unfinished_header_drop_the_connection() {
    let env = require_root!();
    let d = env.daemon();
    let sandbox = hostile(&env, &d);
    let before = open_fds(d.pid());
    let messages = 64;
    let answer = invoke_in_background(&d, json!({"mode": "fds", "messages": messages}));
    let (tmp, report) = attack_holds(&d, &sandbox);
    let during = open_fds(d.pid());
    let v = release(&tmp, answer);
    eprintln!("agent descriptors {before} before, {during} during the attack: {report}");
    // Without a bound: 8 per one-byte message, 512 descriptors held while the
    // connection stays open. With one: at most the 8 the frame announced, closed
    // with the connection when the second message brings 8 more.
    assert!(
        during < before + 32,
        "{messages} one-byte messages with 8 descriptors each took the agent from {before} \
         to {during} open descriptors ({report})"
    );
    assert_eq!(v["closed"], true, "the agent kept the connection: {v}");
    // The agent still serves, and holds no more descriptors than before.
    let r = d.invoke("hostile", r#"{"mode": "warm"}"#);
    assert_eq!(body_json(&r), json!("warm"), "{}", text(&r));
    let after = fds_back_to(&d, before);
    assert!(
        after.is_ok(),
        "the agent holds {after:?} descriptors, {before} before"
    );
}

/// Waits (10 s at most) until the agent holds no more than two descriptors over
/// `before`; the count it holds then, or the last one seen.
fn fds_back_to(d: &Daemon, before: usize) -> Result<usize, usize> {
    wait_for(Duration::from_secs(10), || {
        let n = open_fds(d.pid());
        if n <= before + 2 {
            Ok(n)
        } else {
            Err(n)
        }
    })
}

#[test]
fn descriptors_over_the_cap_drop_the_connection_and_none_stays_open() {
    let env = require_root!();
    let d = env.daemon();
    hostile(&env, &d);
    let before = open_fds(d.pid());
    let connections = 32;
    let r = d.invoke(
        "hostile",
        &json!({"mode": "truncated", "connections": connections}).to_string(),
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(body_json(&r)["dropped"], connections, "{}", text(&r));
    // Each connection's 8 installed descriptors are closed with it (had they been left
    // to nobody, 8 per connection would stay open for the agent's life).
    let after = fds_back_to(&d, before);
    assert!(
        after.is_ok(),
        "{connections} connections sending 9 descriptors each left the agent with {after:?} \
         open descriptors, {before} before"
    );
}

#[test]
fn a_frame_announced_on_the_instance_channel_costs_the_agent_no_memory() {
    let env = require_root!();
    let d = env.daemon();
    let sandbox = hostile(&env, &d);
    let before = rss(d.pid());
    let answer = invoke_in_background(&d, json!({"mode": "instance"}));
    let (tmp, report) = attack_holds(&d, &sandbox);
    assert_eq!(report["instance"], true, "{report}");
    let during = rss(d.pid());
    fs::write(tmp.join("sprout-hostile-go"), "go").expect("write the go file");
    let (status, body) = answer
        .recv_timeout(Duration::from_secs(60))
        .expect("the hostile invocation never answered");
    // The instance ended its channel mid-frame: the invocation fails, the agent lives.
    assert_ne!(status, 200, "{body}");
    eprintln!(
        "agent RSS {} KiB before, {} KiB with a 65 MiB frame announced on the instance channel \
         ({status} {body})",
        before >> 10,
        during >> 10
    );
    assert!(
        during.saturating_sub(before) < 32 << 20,
        "a 65 MiB frame announced (13 bytes sent) on an instance channel took the agent's \
         RSS from {} MiB to {} MiB",
        before >> 20,
        during >> 20
    );
    let r = d.invoke("hostile", r#"{"mode": "warm"}"#);
    assert_eq!(body_json(&r), json!("warm"), "{}", text(&r));
}
