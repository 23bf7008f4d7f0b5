//! A hostile function cannot make the agent's call socket grow threads, keep calls
//! running after it returned, nest calls past the depth limit, hold connections or
//! half-sent frames (issue 9, finding 4): the call socket is bounded and owned by the
//! agent.
//!
//! The attacks run inside a sandbox, with raw frames on the agent's call socket
//! (`/.sprout/agent.sock`), bypassing the SDK: the frame format is the runtime's
//! (`u32 header_len | u32 payload_len | u32 fd_count | header JSON | payload`).

use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sprout_tests::{body_json, json, require_root, text, wait_for, Daemon, Env, Value};

/// The attacks, by `mode`.
const HOSTILE_PY: &str = r#"import array, json, os, select, socket, struct, threading, time

_kept = []

def frame(header, payload=b""):
    hdr = json.dumps(header).encode()
    return struct.pack("<III", len(hdr), len(payload), 0) + hdr + payload

def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect("/.sprout/agent.sock")
    return s

def closed(s):
    try:
        return s.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True

def frames(s):
    """Yields (header, payload) as the agent sends them, until the connection ends."""
    buf = b""
    while True:
        try:
            chunk = s.recv(1 << 16)
        except OSError:
            return
        if not chunk:
            return
        buf += chunk
        while len(buf) >= 12:
            hl, pl, fdw = struct.unpack("<III", buf[:12])
            inline = 0 if fdw & (1 << 31) else pl
            if len(buf) < 12 + hl + inline:
                break
            header = json.loads(buf[12:12 + hl])
            payload = buf[12 + hl:12 + hl + inline]
            buf = buf[12 + hl + inline:]
            yield header, payload

def count_replies(s, counts, lock):
    for header, _ in frames(s):
        key = header["op"] + (":" + header["kind"] if "kind" in header else "")
        with lock:
            counts[key] = counts.get(key, 0) + 1
            if "message" in header:
                counts["last_message"] = header["message"]

def flood(e):
    """`frames` calls of `target` on `connections` connections, kept open after the
    invocation; with `await_refused`, waits (reading the answers) until that many
    were refused."""
    socks = [connect() for _ in range(e["connections"])]
    _kept.extend(socks)
    counts, lock = {}, threading.Lock()
    if e.get("await_refused") is not None:
        for s in socks:
            threading.Thread(target=count_replies, args=(s, counts, lock), daemon=True).start()
    event = json.dumps(e.get("event", {})).encode()
    n = 0
    for _ in range(e["frames"] // len(socks)):
        for s in socks:
            n += 1
            s.sendall(frame({"op": "call", "id": n, "function": e["target"], "depth": 1}, event))
    if e.get("await_refused") is not None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with lock:
                if counts.get("call_refused:too_many_calls", 0) >= e["await_refused"]:
                    break
            time.sleep(0.01)
        time.sleep(0.2)  # anything beyond the count would show up now
    with lock:
        return {"sent": n, "replies": dict(counts)}

def deep(e):
    """Calls itself in a sibling, claiming depth 0 every time."""
    level = e.get("level", 0)
    s = connect()
    s.sendall(frame({"op": "call", "id": 1, "function": "hostile", "depth": 0},
                    json.dumps({"mode": "deep", "level": level + 1}).encode()))
    header, payload = next(frames(s))
    s.close()
    if header["op"] == "call_returned":
        inner = json.loads(payload)
    else:
        inner = {"op": header["op"], "message": header.get("message")}
    return {"level": level, "inner": inner}

def connections(e):
    socks = [connect() for _ in range(e["connections"])]
    deadline = time.monotonic() + e["within"]
    while time.monotonic() < deadline:
        shut = [closed(s) for s in socks]
        if sum(shut) >= e["connections"] - e["expect_open"]:
            break
        time.sleep(0.02)
    shut = [closed(s) for s in socks]
    open_ = [s for s, c in zip(socks, shut) if not c]
    answered = None
    if open_:
        # An accepted connection is served.
        open_[0].sendall(frame({"op": "resolve", "id": 7, "function": "hostile"}))
        open_[0].settimeout(20)
        answered = next(frames(open_[0]))[0]["op"]
    for s in socks:
        s.close()
    return {"open": len(open_), "closed": sum(shut), "answered": answered}

def half_sent(e):
    """A prefix announcing a 100-byte header and a descriptor, the descriptor (a
    pipe's write end) and one byte: then nothing."""
    r, w = os.pipe()
    s = connect()
    s.sendmsg([struct.pack("<III", 100, 0, 1) + b"{"],
              [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w]))])
    os.close(w)
    t0 = time.monotonic()
    closed_after = fds_closed_after = None
    while time.monotonic() - t0 < e["within"] and (closed_after is None or fds_closed_after is None):
        if closed_after is None and closed(s):
            closed_after = time.monotonic() - t0
        # The pipe ends once the agent closed the write end it was sent.
        if fds_closed_after is None and select.select([r], [], [], 0)[0] and os.read(r, 1) == b"":
            fds_closed_after = time.monotonic() - t0
        time.sleep(0.02)
    s.close()
    os.close(r)
    return {"closed_after": closed_after, "fds_closed_after": fds_closed_after}

def f(e):
    mode = e["mode"]
    if mode == "warm":
        return {"pid": os.getpid()}
    return {"flood": flood, "deep": deep, "connections": connections, "half_sent": half_sent}[mode](e)
"#;

/// Sleeps `e` seconds (a call that stays in flight).
const NAP_PY: &str = "import time\ndef f(e):\n    time.sleep(e)\n    return e\n";

/// `sprout.map` of `n` naps; the error it raised, if any.
const MAPPER_PY: &str = r#"import sprout
def f(e):
    try:
        sprout.map("nap", [e["nap"]] * e["n"])
    except sprout.CallError as exc:
        return {"kind": exc.kind, "type": exc.type, "message": exc.message, "str": str(exc)}
    return {"kind": None}
"#;

fn register(d: &Daemon, env: &Env, name: &str, code: &str, extra: Value) {
    let dir = env.function(name, &[("f.py", code)]);
    d.register(name, &dir, extra);
}

/// `/proc/<pid>/status`'s `Threads`.
fn threads(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Invokes `name` from a thread of its own; the receiver gets (status, body).
fn invoke_in_background(socket: &Path, name: &str, event: Value) -> mpsc::Receiver<(u16, String)> {
    let (tx, rx) = mpsc::channel();
    let socket = socket.to_path_buf();
    let name = name.to_owned();
    std::thread::spawn(move || {
        let r = sprout_tests::Client::connect(&socket)
            .and_then(|mut c| {
                c.request(
                    "POST",
                    &format!("/functions/{name}/invoke"),
                    Some("application/json"),
                    event.to_string().as_bytes(),
                )
            })
            .map(|r| (r.status, String::from_utf8_lossy(&r.body).into_owned()))
            .unwrap_or_else(|e| (0, ipc::chain(&e)));
        let _ = tx.send(r);
    });
    rx
}

/// Waits until no call is queued or running: every sandbox left (at most `keep`) is
/// idle, and frozen.
#[track_caller]
fn assert_calls_gone(d: &Daemon, keep: usize, within: Duration) {
    let gone = wait_for(within, || {
        let s = d.status();
        let sandboxes = d.sandboxes();
        let idle = s["queued"] == 0 && s["frozen"] == s["sandboxes"];
        (idle && sandboxes.len() <= keep)
            .then_some(())
            .ok_or((s, sandboxes))
    });
    if let Err((s, sandboxes)) = gone {
        panic!(
            "the calls of an invocation that returned still hold the agent after {within:?}: \
             {s}\nsandboxes: {sandboxes:?}\nlog:\n{}",
            d.log()
        );
    }
}

#[test]
fn thousands_of_raw_call_frames_take_a_bounded_number_of_agent_threads() {
    let env = require_root!();
    let d = env.daemon();
    register(
        &d,
        &env,
        "nap",
        NAP_PY,
        json!({"max_instances": 2, "timeout_ms": 60000}),
    );
    register(
        &d,
        &env,
        "hostile",
        HOSTILE_PY,
        json!({"timeout_ms": 60000}),
    );
    assert_eq!(d.invoke("hostile", r#"{"mode": "warm"}"#).status, 200);
    let base = threads(d.pid());

    let frames = 2000;
    let cap = 64;
    let run = invoke_in_background(
        d.socket(),
        "hostile",
        json!({"mode": "flood", "target": "nap", "event": 30, "frames": frames,
               "connections": 2, "await_refused": frames - cap}),
    );
    let mut most = base;
    let (status, body) = loop {
        most = most.max(threads(d.pid()));
        match run.recv_timeout(Duration::from_millis(20)) {
            Ok(r) => break r,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    // The agent's threads: its own, plus a worker for each call in flight at most.
    assert!(
        most <= base + cap as u64 + 24,
        "{frames} call frames took the agent from {base} to {most} threads: {v}"
    );
    // Every frame past the cap was refused at once, by name, and nothing else
    // answered while the calls in flight slept.
    let replies = &v["replies"];
    assert_eq!(
        replies["call_refused:too_many_calls"],
        frames - cap,
        "{v}\nlog:\n{}",
        d.log()
    );
    let message = replies["last_message"].as_str().unwrap();
    assert!(
        message.contains("too_many_calls") && message.contains("64 calls in flight"),
        "{message}"
    );
    assert_eq!(
        replies.as_object().unwrap().len(),
        2,
        "other answers came: {v}"
    );
    // The calls in flight ended with the invocation: nothing runs (the siblings that
    // ran them are gone; one started too late to run one may be left, idle).
    assert_calls_gone(&d, 3, Duration::from_secs(15));
}

#[test]
fn calls_sent_by_hand_end_with_the_invocation_that_sent_them() {
    let env = require_root!();
    let d = env.daemon();
    register(&d, &env, "nap", NAP_PY, json!({"max_instances": 1}));
    register(&d, &env, "hostile", HOSTILE_PY, json!({}));
    assert_eq!(d.invoke("hostile", r#"{"mode": "warm"}"#).status, 200);
    // 1000 calls of a 50 ms nap, and return at once: the connections stay open (the
    // process keeps them), the runtime never reports that it called.
    let r = d.invoke(
        "hostile",
        &json!({"mode": "flood", "target": "nap", "event": 0.05, "frames": 1000,
                "connections": 2})
        .to_string(),
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(body_json(&r)["sent"], 1000);
    // Nothing of it is queued or running, and its naps' sandboxes are gone (had they
    // run, one after the other, they would take 50 s).
    assert_calls_gone(&d, 2, Duration::from_secs(10));
    // And none starts later.
    let before = d.status()["invocations"].as_u64().unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        let now = d.status()["invocations"].as_u64().unwrap();
        assert_eq!(
            now, before,
            "calls of an invocation that returned ran later"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The agent and the socket are fine: the same function calls again.
    let r = d.invoke(
        "hostile",
        r#"{"mode": "connections", "connections": 1, "expect_open": 1, "within": 1}"#,
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(body_json(&r)["answered"], "resolved", "{}", text(&r));
}

#[test]
fn an_instance_claiming_depth_0_on_every_call_still_stops_at_16() {
    let env = require_root!();
    let d = env.daemon_with(&["--stem-cells", "2"]);
    register(
        &d,
        &env,
        "hostile",
        HOSTILE_PY,
        json!({"max_instances": 20, "timeout_ms": 20000, "memory_mb": 64}),
    );
    let started = Instant::now();
    let r = d.invoke("hostile", r#"{"mode": "deep"}"#);
    assert_eq!(r.status, 200, "{}", text(&r));
    // Levels 0 (the client's invocation) to 16 ran; level 16's call was refused.
    let mut v = body_json(&r);
    let mut levels = Vec::new();
    while let Some(level) = v["level"].as_u64() {
        levels.push(level);
        v = v["inner"].clone();
    }
    assert_eq!(levels, (0..=16).collect::<Vec<u64>>(), "{}", text(&r));
    assert_eq!(v["op"], "call_failed", "{v}");
    let message = v["message"].as_str().unwrap();
    assert!(message.contains("call depth limit of 16"), "{message}");
    eprintln!("17 levels in {:?}", started.elapsed());
    assert_calls_gone(&d, 20, Duration::from_secs(10));
}

#[test]
fn a_sandbox_gets_32_call_connections_and_no_more() {
    let env = require_root!();
    let d = env.daemon();
    register(&d, &env, "hostile", HOSTILE_PY, json!({}));
    let r = d.invoke(
        "hostile",
        r#"{"mode": "connections", "connections": 100, "expect_open": 32, "within": 10}"#,
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    let v = body_json(&r);
    assert_eq!(v["open"], 32, "{v}");
    assert_eq!(v["closed"], 68, "{v}");
    assert_eq!(v["answered"], "resolved", "{v}");
    assert!(
        d.log().contains("the sandbox has 32 open already"),
        "{}",
        d.log()
    );
}

#[test]
fn a_frame_left_half_sent_drops_its_connection_and_descriptors_after_5_s() {
    let env = require_root!();
    let d = env.daemon();
    register(&d, &env, "hostile", HOSTILE_PY, json!({}));
    assert_eq!(d.invoke("hostile", r#"{"mode": "warm"}"#).status, 200);
    let before = open_fds(d.pid());
    let r = d.invoke("hostile", r#"{"mode": "half_sent", "within": 15}"#);
    assert_eq!(r.status, 200, "{}", text(&r));
    let v = body_json(&r);
    let closed = v["closed_after"]
        .as_f64()
        .unwrap_or_else(|| panic!("the agent kept a half-sent frame for 15 s: {v}"));
    // 5 s, with a margin each way for a loaded host.
    assert!((3.0..12.0).contains(&closed), "{v}");
    let fds = v["fds_closed_after"]
        .as_f64()
        .unwrap_or_else(|| panic!("the agent kept the frame's descriptor: {v}"));
    assert!(fds < 12.0, "{v}");
    assert!(
        d.log().contains("a frame was left half-sent"),
        "{}",
        d.log()
    );
    // The agent holds no more descriptors than before.
    let back = wait_for(Duration::from_secs(5), || {
        let now = open_fds(d.pid());
        (now <= before).then_some(()).ok_or(now)
    });
    if let Err(now) = back {
        panic!("the agent held {before} descriptors before and {now} after");
    }
}

#[test]
fn the_sdk_raises_too_many_calls_past_the_configured_cap() {
    let env = require_root!();
    let d = env.daemon_with(&["--stem-cells", "0", "--max-calls-per-sandbox", "4"]);
    register(&d, &env, "nap", NAP_PY, json!({"max_instances": 4}));
    register(&d, &env, "mapper", MAPPER_PY, json!({}));
    let r = d.invoke("mapper", r#"{"n": 6, "nap": 1}"#);
    assert_eq!(r.status, 200, "{}", text(&r));
    let v = body_json(&r);
    assert_eq!(v["kind"], "too_many_calls", "{v}");
    assert_eq!(v["type"], "CallFailed", "{v}");
    let message = v["message"].as_str().unwrap();
    assert!(
        message.contains("4 calls in flight") && message.contains("--max-calls-per-sandbox"),
        "{message}"
    );
    // Within the cap, the same works.
    let r = d.invoke("mapper", r#"{"n": 4, "nap": 0}"#);
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(body_json(&r)["kind"], Value::Null, "{}", text(&r));
}
