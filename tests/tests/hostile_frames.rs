//! A hostile function cannot make the agent spend memory or descriptors with frames
//! (issue 9, finding 3): what a frame's prefix announces costs the agent nothing until
//! the bytes arrive (on the call socket and on the instance's own channel), and
//! descriptors a frame cannot carry drop the connection and are closed, none left
//! open. Frames over the caps (an inline payload over 64 KiB, a header over 128 KiB)
//! are refused at their prefix (finding 4 of `docs/security.md`), and a sparse memfd
//! returned as a result is refused before the agent touches a page of it (finding 2).
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
    # The go file is the host's (root's), which a function that is not root on the
    # host may not remove from the sticky /tmp: the test removes it.
    os.remove("/tmp/sprout-hostile-ready")
    return report

def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect("/.sprout/agent.sock")
    return s

# The largest frame the caps allow: a 128 KiB header and a 64 KiB inline payload.
LARGEST = struct.pack("<III", 128 << 10, 64 << 10, 0)

def announce(n):
    # Prefixes announcing the largest frame, then one byte of the header: the agent
    # reads that byte after it has made room for what it expects.
    socks = [connect() for _ in range(n)]
    for s in socks:
        s.sendall(LARGEST)
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
    s.sendall(LARGEST)
    until(lambda: unread(s) == 0, "the agent did not read the prefix")
    s.sendall(b"{")
    until(lambda: unread(s) == 0, "the agent did not read the first header byte")
    report = hold({"instance": True})
    # The frame can never be finished: end the channel (the agent takes the instance
    # for dead) rather than wait for the invocation's timeout.
    s.shutdown(socket.SHUT_WR)
    return report

def inline(n, size, send):
    # Finding 4: `n` connections each announcing a `size`-byte inline payload and
    # sending `send` bytes of it. Over the cap, the agent drops each at the prefix.
    socks = [connect() for _ in range(n)]
    chunk = b"\0" * (64 << 10)
    accepted = []
    for s in socks:
        s.sendall(struct.pack("<III", 2, size, 0) + b"{}")
        sent = 0
        try:
            while sent < send:
                sent += s.send(chunk[:send - sent])
        except OSError:
            pass
        accepted.append(sent)
    until(lambda: all(unread(s) == 0 or closed(s) for s in socks), "the agent neither read nor closed")
    report = {"closed": [closed(s) for s in socks], "accepted": accepted}
    for s in socks:
        s.close()
    return report

def header(size):
    # A `resolve` whose header is `size` bytes (a padded function name).
    s = connect()
    base = b'{"op":"resolve","id":1,"function":"'
    hdr = base + b"x" * (size - len(base) - 2) + b'"}'
    s.sendall(struct.pack("<III", len(hdr), 0, 0))
    try:
        s.sendall(hdr)
    except OSError:
        pass
    s.settimeout(20)
    try:
        answer = s.recv(12)
    except OSError as e:
        answer = e.__class__.__name__.encode()
    s.close()
    return {"answered": answer not in (b"", b"ConnectionResetError"), "answer": answer.hex()}

def sparse(size):
    # Finding 2: the instance's own `returned` frame, raw, carrying a sealed memfd only
    # ftruncate'd to `size` (no page allocated), for the invocation being served.
    frame = sys._getframe()
    while frame is not None and not hasattr(frame.f_locals.get("channel"), "sock"):
        frame = frame.f_back
    channel, request_id = frame.f_locals["channel"], frame.f_locals["request_id"]
    fd = os.memfd_create("sprout-sparse", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    hdr = json.dumps({"op": "returned", "id": request_id, "raw": True}).encode()
    socket.send_fds(channel.sock, [struct.pack("<III", len(hdr), size, 0x80000001) + hdr], [fd])
    # Whatever the agent makes of it, this instance has answered: wait to be ended.
    time.sleep(60)
    return "late"

def f(e):
    if not isinstance(e, dict):
        return sparse(int(bytes(e)))
    if e["mode"] == "inline":
        return inline(e["connections"], e["size"], e["send"])
    if e["mode"] == "header":
        return header(e["size"])
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
    sprout_tests::write_into(&tmp.join("sprout-hostile-go"), "go").expect("write the go file");
    let (status, body) = answer
        .recv_timeout(Duration::from_secs(60))
        .expect("the hostile invocation never answered");
    let _ = fs::remove_file(tmp.join("sprout-hostile-go"));
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[test]
fn frames_announced_and_not_sent_cost_the_agent_no_memory() {
    let env = require_root!();
    let d = env.daemon();
    let sandbox = hostile(&env, &d);
    let before = rss(d.pid());
    // Under the agent's cap on call-socket connections per sandbox (8).
    let connections = 6;
    let answer = invoke_in_background(&d, json!({"mode": "announce", "connections": connections}));
    let (tmp, report) = attack_holds(&d, &sandbox);
    assert_eq!(report["connections"], connections, "{report}");
    // Every connection's agent thread has read its 13 bytes and waits for more.
    let during = rss(d.pid());
    let v = release(&tmp, answer);
    assert_eq!(v["connections"], connections, "{v}");
    let grown = during.saturating_sub(before);
    eprintln!(
        "agent RSS {} KiB before, {} KiB with {connections} connections announcing 192 KiB",
        before >> 10,
        during >> 10
    );
    // Without a bound: each connection's buffer grown to the frame announced
    // (zero-filled). With one, a chunk per connection.
    assert!(
        grown < 32 << 20,
        "{connections} connections announcing the largest frames (13 bytes sent on each) \
         took the agent's RSS from {} MiB to {} MiB",
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
    sprout_tests::write_into(&tmp.join("sprout-hostile-go"), "go").expect("write the go file");
    let (status, body) = answer
        .recv_timeout(Duration::from_secs(60))
        .expect("the hostile invocation never answered");
    // The instance ended its channel mid-frame: the invocation fails, the agent lives.
    assert_ne!(status, 200, "{body}");
    eprintln!(
        "agent RSS {} KiB before, {} KiB with a 192 KiB frame announced on the instance \
         channel ({status} {body})",
        before >> 10,
        during >> 10
    );
    assert!(
        during.saturating_sub(before) < 32 << 20,
        "a 192 KiB frame announced (13 bytes sent) on an instance channel took the agent's \
         RSS from {} MiB to {} MiB",
        before >> 20,
        during >> 20
    );
    let r = d.invoke("hostile", r#"{"mode": "warm"}"#);
    assert_eq!(body_json(&r), json!("warm"), "{}", text(&r));
}

/// `VmHWM` (peak RSS) of process `pid`, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in /proc/{pid}/status:\n{status}"));
    kb << 10
}

/// A function that calls `hostile` with raw bytes, in a sibling sandbox (so that the
/// answer goes through the agent), and reports what came back.
const CALLER_PY: &str = r#"import sprout
def f(e):
    try:
        r = sprout.call_async("hostile", str(e["size"]).encode()).result()
        return {"ok": True, "len": len(r)}
    except sprout.CallError as err:
        return {"ok": False, "type": err.type, "message": err.message}
"#;

#[test]
fn a_sparse_memfd_returned_by_a_callee_is_refused_before_the_agent_touches_it() {
    let env = require_root!();
    let d = env.daemon();
    let dir = env.function("hostile", &[("f.py", HOSTILE_PY)]);
    d.register("hostile", &dir, json!({"timeout_ms": 20000}));
    let dir = env.function("caller", &[("f.py", CALLER_PY)]);
    d.register("caller", &dir, json!({"timeout_ms": 20000}));
    // Both sandboxes up once, so the agent's peak below is the attack's alone.
    let r = d.invoke("hostile", r#"{"mode": "warm"}"#);
    assert_eq!(r.status, 200, "warm up: {}", text(&r));
    // The agent's peak RSS starts again from what it holds now.
    fs::write(format!("/proc/{}/clear_refs", d.pid()), "5").expect("reset the agent's VmHWM");
    let before = rss(d.pid());
    let size: u64 = 1 << 30;
    let r = d.invoke("caller", &json!({ "size": size }).to_string());
    let peak = peak_rss(d.pid());
    eprintln!(
        "agent RSS {} KiB before, peak {} KiB while a callee returned a sparse {} MiB memfd: {}",
        before >> 10,
        peak >> 10,
        size >> 20,
        text(&r)
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    let v = body_json(&r);
    // Without the check: the agent faults every page (charged to its own cgroup), copies
    // them and shares the copy again, and the caller gets 1 GiB.
    assert_eq!(
        v["ok"], false,
        "the agent took a sparse memfd as a result: {v}"
    );
    let message = v["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("sparse memfd is refused") && message.contains("1073741824"),
        "the caller is not told why: {v}"
    );
    assert!(
        peak.saturating_sub(before) < 16 << 20,
        "a sparse {} MiB memfd took the agent's RSS from {} MiB to a peak of {} MiB",
        size >> 20,
        before >> 20,
        peak >> 20
    );
    // The agent still serves, the hostile function too (in a fresh sandbox).
    let r = d.invoke("hostile", r#"{"mode": "warm"}"#);
    assert_eq!(body_json(&r), json!("warm"), "{}", text(&r));
}

#[test]
fn inline_frames_over_the_cap_are_refused_at_the_prefix() {
    let env = require_root!();
    let d = env.daemon();
    hostile(&env, &d);
    // Two connections each announcing a 64 MiB inline payload and sending 4 MiB of
    // it: before the cap, the agent read on and grew a buffer for each (and two such
    // frames held its shared receive budget); now it drops them at the prefix.
    let r = d.invoke(
        "hostile",
        &json!({"mode": "inline", "connections": 2, "size": 64 << 20, "send": 4 << 20}).to_string(),
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    let v = body_json(&r);
    eprintln!("64 MiB inline frames: {v}");
    assert_eq!(v["closed"], json!([true, true]), "kept: {v}");
    for n in v["accepted"].as_array().expect("accepted") {
        // What the socket buffers took before the agent closed it, not 4 MiB.
        assert!(n.as_u64().unwrap() < 4 << 20, "{v}");
    }
    // The largest inline payload allowed is read as ever (the frame is a bad call
    // request, so the agent answers or drops it, but reads it all first).
    let r = d.invoke(
        "hostile",
        &json!({"mode": "inline", "connections": 1, "size": 64 << 10, "send": 64 << 10})
            .to_string(),
    );
    let v = body_json(&r);
    assert_eq!(v["accepted"], json!([64 << 10]), "{v}");
    // Another tenant's large payloads (shared, 4 MiB) go through.
    let dir = env.function("echo", &[("f.py", "def f(e):\n    return len(e)\n")]);
    d.register("echo", &dir, json!({}));
    let big = format!("\"{}\"", "e".repeat(4 << 20));
    let r = d.invoke("echo", &big);
    assert_eq!(body_json(&r), json!(4 << 20), "{}", text(&r));
    assert!(
        d.log()
            .contains("inline frame payload of 67108864 bytes exceeds the limit of 65536"),
        "the agent does not say why it dropped the connections:\n{}",
        d.log()
    );
}

#[test]
fn headers_over_the_cap_are_refused() {
    let env = require_root!();
    let d = env.daemon();
    hostile(&env, &d);
    // 200 KiB: under the old 1 MiB cap, over the new 128 KiB one.
    let r = d.invoke(
        "hostile",
        &json!({"mode": "header", "size": 200 << 10}).to_string(),
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    let v = body_json(&r);
    assert_eq!(
        v["answered"], false,
        "the agent answered a 200 KiB header: {v}"
    );
    assert!(
        d.log()
            .contains("frame header of 204800 bytes exceeds the limit of 131072"),
        "the agent does not say why it dropped the connection:\n{}",
        d.log()
    );
    // At the cap, the request is read and answered.
    let r = d.invoke(
        "hostile",
        &json!({"mode": "header", "size": 128 << 10}).to_string(),
    );
    let v = body_json(&r);
    assert_eq!(v["answered"], true, "{v}");
}
