//! The workflow suite: a 100-step chain, data moved between two chained functions,
//! and fan-out to sibling sandboxes. Every function runs in real sandboxes behind a
//! `sprout serve`; times inside functions come from `time.perf_counter_ns`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::daemon::{ok, Daemon};
use crate::stats::Row;

/// Never freeze: the suite measures warm sandboxes (freezing is the latency suite's).
const WARM_POOL: &[&str] = &["--stem-cells", "0", "--pause-grace", "3600000"];

pub struct Settings {
    pub chain_runs: usize,
    pub transfer_runs: usize,
    pub fan_runs: usize,
    /// Calls per invocation of the in-sandbox call row (and as many raw echoes).
    pub call_runs: usize,
    /// Measure only this section (`chain`, `call`, `transfer`, `fan`).
    pub only: Option<String>,
}

/// Sends `size` bytes to `xfer_sink` in this sandbox: as `bytes` (copied into a memfd
/// on the way), or with `buffer` written into a `sprout.buffer` and handed off (its
/// memfd passed, no copy), timing the buffer's allocation, the fill (a copy of the
/// same bytes, as a producer writing its output in place would) and the call.
const XFER_SRC: &str = r#"import sprout, time
_blobs = {}
def f(e):
    size = e["size"]
    blob = _blobs.get(size)
    if blob is None:
        blob = _blobs[size] = (bytes(range(256)) * (size // 256 + 1))[:size]
    t0 = time.perf_counter_ns()
    if e.get("buffer"):
        buf = sprout.buffer(size)
        t1 = time.perf_counter_ns()
        buf[:] = blob
        blob = buf
    else:
        t1 = t0
    t2 = time.perf_counter_ns()
    seen = sprout.call("xfer_sink", blob)
    t3 = time.perf_counter_ns()
    if seen != size:
        raise ValueError(f"sink saw {seen} bytes, sent {size}")
    return {"ns": t3 - t2, "alloc": t1 - t0, "fill": t2 - t1}
"#;

/// Touches every page it was given (a read per 4 KiB), as a consumer would.
const XFER_SINK: &str = r#"def f(data):
    sum(data[::4096])
    return len(data)
"#;

/// Calls a Node.js function from Python (a sibling sandbox, through the agent).
const CALL_NODE: &str = r#"import sprout, time
def f(e):
    t0 = time.perf_counter_ns()
    out = sprout.call("inc_node", {"n": 0})
    ns = time.perf_counter_ns() - t0
    if out.get("n") != 1:
        raise ValueError(f"inc_node answered {out!r}")
    return {"ns": ns}
"#;

/// `sprout.call` to a warm callee in the caller's sandbox, as the function sees it,
/// in blocks of 25 in turn with its baselines: a raw round trip of a message of the
/// same size over a Unix socket to a process the function forked (which echoes it);
/// the least CPython can do for a call, the same frames and JSON made and read by
/// a few lines of Python on both sides, to a process the function forked (no sprout
/// code); and the same call relayed by the shim (as every in-sandbox call went
/// before direct channels; reached through the SDK's internals, which a function
/// does not use).
const CALL_LOCAL: &str = r#"import json, os, socket, sprout, struct, time
_sdk = sprout.call.__globals__
_prefix = struct.Struct("<III")
_dumps = json.JSONEncoder(separators=(",", ":")).encode
def _echo():
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        a.close()
        while True:
            m = b.recv(65536)
            if not m:
                os._exit(0)
            b.sendall(m)
    b.close()
    return a, pid
def _frame(header, body):
    header = _dumps(header).encode()
    return _prefix.pack(len(header), len(body), 0) + header + body
def _unframe(m):
    hlen, plen, _ = _prefix.unpack_from(m)
    if len(m) != 12 + hlen + plen:
        raise ValueError("a frame in more than one read")
    return json.loads(m[12:12 + hlen]), m[12 + hlen:]
def _least():
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        a.close()
        handler = lambda e: {"n": e["n"] + 1}
        while True:
            m = b.recv(65536)
            if not m:
                os._exit(0)
            header, body = _unframe(m)
            result = _dumps(handler(json.loads(body))).encode()
            b.sendall(_frame({"op": "returned", "id": header["id"]}, result))
    b.close()
    ids = iter(range(1 << 62))
    def call(event):
        i = next(ids)
        a.sendall(_frame({"op": "invoke", "id": i, "depth": 1}, _dumps(event).encode()))
        header, body = _unframe(a.recv(65536))
        if header != {"op": "returned", "id": i}:
            raise ValueError(f"unexpected {header!r}")
        return json.loads(body)
    return a, pid, call
def _relayed(state, event):
    req_id = next(state.ids)
    header = _sdk["_call_header"](req_id, "inc", state.depth + 1, False)
    header["spec"] = state.specs["inc"]
    payload = _sdk["_encode_event"](event)[1]
    return _sdk["_outcome"]("inc", *_sdk["_call_shim"](state, req_id, "inc", header, payload))
def f(e):
    n = e["n"]
    state = _sdk["_state"]()
    a, pid = _echo()
    least_sock, least_pid, least_call = _least()
    msg = b"x" * 96
    raw, calls, relayed, least = [], [], [], []
    def timed(out, call, check):
        for _ in range(25):
            t0 = time.perf_counter_ns()
            got = call()
            out.append(time.perf_counter_ns() - t0)
            if not check(got):
                raise ValueError(f"unexpected answer {got!r}")
    def echo():
        a.sendall(msg)
        return a.recv(65536)
    try:
        # Blocks of 25 in turn: the three paths see the same drift, and each runs
        # long enough for the scheduler to settle its processes.
        for _ in range(max(n // 25, 1)):
            timed(raw, echo, lambda got: got == msg)
            timed(calls, lambda: sprout.call("inc", {"n": 0}), lambda got: got.get("n") == 1)
            timed(least, lambda: least_call({"n": 0}), lambda got: got.get("n") == 1)
            timed(relayed, lambda: _relayed(state, {"n": 0}), lambda got: got.get("n") == 1)
    finally:
        a.close()
        least_sock.close()
        os.waitpid(pid, 0)
        os.waitpid(least_pid, 0)
    direct = "inc" in state.direct
    return {"raw": raw, "call": calls, "relayed": relayed, "least": least, "direct": direct}
"#;

/// `sprout.call` from Node.js to a warm Node.js callee in the same sandbox, as the
/// function sees it (on the direct channel its host binds).
const CALL_LOCAL_NODE: &str = r#"const sprout = require('sprout');
exports.main = async (e) => {
  const ns = [];
  for (let i = 0; i < e.n; i++) {
    const t0 = process.hrtime.bigint();
    const out = await sprout.call('inc_node', {n: 0});
    ns.push(Number(process.hrtime.bigint() - t0));
    if (out.n !== 1) throw new Error('inc_node answered ' + JSON.stringify(out));
  }
  return {ns};
};
"#;

const FAN: &str = r#"import sprout, time
def f(e):
    t0 = time.perf_counter_ns()
    took = sprout.map("work", [e["ms"]] * e["k"])
    return {"wall_ns": time.perf_counter_ns() - t0, "slowest_ns": max(took)}
"#;

const WORK: &str = r#"import time
def f(ms):
    t0 = time.perf_counter_ns()
    time.sleep(ms / 1000)
    return time.perf_counter_ns() - t0
"#;

fn write_fn(root: &Path, name: &str, code: &str) -> anyhow::Result<std::path::PathBuf> {
    write_file_fn(root, name, "f.py", code)
}

fn write_file_fn(
    root: &Path,
    name: &str,
    file: &str,
    code: &str,
) -> anyhow::Result<std::path::PathBuf> {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(file), code)?;
    Ok(dir)
}

fn post(c: &mut ipc::client::Client, path: &str, body: &Value) -> anyhow::Result<Value> {
    let r = c.request(
        "POST",
        path,
        Some("application/json"),
        body.to_string().as_bytes(),
    )?;
    ok(&r, path)?;
    Ok(serde_json::from_slice(&r.body)?)
}

pub fn run(bin: &Path, ws: &Path, s: &Settings) -> anyhow::Result<Vec<Row>> {
    let d = Daemon::start(bin, WARM_POOL)?;
    let mut c = d.client()?;
    let fns = tempfile::Builder::new()
        .prefix("sprout-bench-fns-")
        .tempdir()?;
    let big = json!({"memory_mb": 512});
    d.register(&mut c, "inc", &ws.join("examples/inc"), json!({}))?;
    d.register(
        &mut c,
        "inc_node",
        &ws.join("examples/inc-nodejs"),
        json!({"runtime": "nodejs"}),
    )?;
    d.register(
        &mut c,
        "call_node",
        &write_fn(fns.path(), "call_node", CALL_NODE)?,
        json!({}),
    )?;
    d.register(
        &mut c,
        "xfer_src",
        &write_fn(fns.path(), "xfer_src", XFER_SRC)?,
        big.clone(),
    )?;
    d.register(
        &mut c,
        "xfer_sink",
        &write_fn(fns.path(), "xfer_sink", XFER_SINK)?,
        big,
    )?;
    d.register(
        &mut c,
        "call_local_node",
        &write_file_fn(fns.path(), "call_local_node", "index.js", CALL_LOCAL_NODE)?,
        json!({"runtime": "nodejs"}),
    )?;
    d.register(
        &mut c,
        "call_local",
        &write_fn(fns.path(), "call_local", CALL_LOCAL)?,
        json!({}),
    )?;
    d.register(&mut c, "fan", &write_fn(fns.path(), "fan", FAN)?, json!({}))?;
    d.register(
        &mut c,
        "work",
        &write_fn(fns.path(), "work", WORK)?,
        json!({"max_instances": 32}),
    )?;
    // Each section starts on a quiet machine: large transfers leave their pages to
    // be freed after the answer, which would land in the next section's samples.
    let settle = || std::thread::sleep(Duration::from_secs(1));
    let wanted = |section: &str| s.only.as_deref().is_none_or(|o| o == section);
    let mut rows = Vec::new();
    if wanted("chain") {
        rows.extend(chain(&mut c, "chain", "inc", "", s.chain_runs)?);
        settle();
        rows.extend(chain(
            &mut c,
            "chain_node",
            "inc_node",
            "Node.js ",
            s.chain_runs,
        )?);
        settle();
    }
    if wanted("call") {
        rows.extend(call_local(&mut c, s.call_runs)?);
        settle();
        rows.push(call_local_node(&mut c, s.call_runs)?);
        settle();
        rows.push(call_node(&mut c, s.transfer_runs)?);
        settle();
    }
    if wanted("transfer") {
        rows.extend(transfer(&mut c, s.transfer_runs)?);
    }
    if wanted("fan") {
        for k in [8, 32] {
            settle();
            rows.push(fan_out(&mut c, k, s.fan_runs)?);
        }
    }
    Ok(rows)
}

/// A declarative sequence of 100 `function` tasks (an `inc`): one sandbox, the shim
/// running each step. `label` prefixes the rows (the runtime, for all but Python).
fn chain(
    c: &mut ipc::client::Client,
    workflow: &str,
    function: &str,
    label: &str,
    runs: usize,
) -> anyhow::Result<Vec<Row>> {
    const STEPS: usize = 100;
    let steps: Vec<Value> = (0..STEPS)
        .map(|_| json!({"type": "task", "function": function}))
        .collect();
    let r = c.request(
        "PUT",
        &format!("/workflows/{workflow}"),
        Some("application/json"),
        json!({ "steps": steps }).to_string().as_bytes(),
    )?;
    ok(&r, "register the chain")?;
    let mut whole = Vec::new();
    let mut hops = Vec::new();
    for i in 0..runs + 3 {
        let t = Instant::now();
        let out = post(
            c,
            &format!("/workflows/{workflow}/invoke"),
            &json!({"n": 0}),
        )?;
        let took = t.elapsed();
        if out["n"] != STEPS {
            bail!("the chain counted {} steps, not {STEPS}", out["n"]);
        }
        if i < 3 {
            continue; // warm-up: the first run forks the step's instance
        }
        whole.push(took);
        let t: Vec<u64> = out["t"]
            .as_array()
            .context("no timestamps")?
            .iter()
            .map(|v| v.as_u64().unwrap_or(0))
            .collect();
        hops.extend(
            t.windows(2)
                .map(|w| Duration::from_nanos(w[1].saturating_sub(w[0]))),
        );
    }
    Ok(vec![
        Row::new(
            &format!("{label}chain: 100-step sequence, end to end"),
            &whole,
        ),
        Row::new(
            &format!("{label}chain: one hop (step to step, in-sandbox)"),
            &hops,
        ),
    ])
}

/// `sprout.call` to a warm in-sandbox callee against a raw Unix-socket echo, both
/// timed inside the same function, in turn (the first invocation warms up: it
/// resolves the callee and forks its instance).
fn call_local(c: &mut ipc::client::Client, runs: usize) -> anyhow::Result<Vec<Row>> {
    post(c, "/functions/call_local/invoke", &json!({"n": 10}))?;
    let out = post(c, "/functions/call_local/invoke", &json!({"n": runs}))?;
    if out["direct"] != true {
        bail!(
            "the calls did not go on a direct channel: {}",
            out["direct"]
        );
    }
    Ok(vec![
        Row::new(
            "call Python → Python in the sandbox (sprout.call, warm callee)",
            &durations(&out, "call")?,
        ),
        Row::new(
            "  baseline: the same call relayed by the shim (before direct channels)",
            &durations(&out, "relayed")?,
        ),
        Row::new(
            "  baseline: raw Unix-socket echo, same function, same size",
            &durations(&out, "raw")?,
        ),
        Row::new(
            "  baseline: the least CPython does for it (the same frames and JSON, no sprout)",
            &durations(&out, "least")?,
        ),
    ])
}

/// `sprout.call` from Node.js to a warm Node.js callee in its sandbox, timed inside
/// the caller (the first invocation warms up).
fn call_local_node(c: &mut ipc::client::Client, runs: usize) -> anyhow::Result<Row> {
    post(c, "/functions/call_local_node/invoke", &json!({"n": 10}))?;
    let out = post(c, "/functions/call_local_node/invoke", &json!({"n": runs}))?;
    Ok(Row::new(
        "call Node.js → Node.js in the sandbox (sprout.call, warm callee)",
        &durations(&out, "ns")?,
    ))
}

/// The array of nanoseconds at `key` of a function's answer.
fn durations(v: &Value, key: &str) -> anyhow::Result<Vec<Duration>> {
    v[key]
        .as_array()
        .with_context(|| format!("no {key}"))?
        .iter()
        .map(|x| {
            x.as_u64()
                .map(Duration::from_nanos)
                .context("not a duration")
        })
        .collect()
}

/// `sprout.call` from a Python function to a warm Node.js function: another runtime,
/// so a sibling sandbox through the agent, timed inside the caller.
fn call_node(c: &mut ipc::client::Client, runs: usize) -> anyhow::Result<Row> {
    let mut samples = Vec::new();
    for i in 0..runs + 3 {
        let out = post(c, "/functions/call_node/invoke", &json!({}))?;
        if i >= 3 {
            samples.push(Duration::from_nanos(out["ns"].as_u64().context("no ns")?));
        }
    }
    Ok(Row::new(
        "call Python → Node.js (sibling sandbox, warm)",
        &samples,
    ))
}

/// Bytes moved from one function to the next (a call in the same sandbox).
fn transfer(c: &mut ipc::client::Client, runs: usize) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (label, size) in [
        ("0 B", 0usize),
        ("1 KiB", 1 << 10),
        ("64 KiB", 64 << 10),
        ("1 MiB", 1 << 20),
        ("16 MiB", 16 << 20),
        ("64 MiB", 64 << 20),
    ] {
        let mut samples = Vec::new();
        let mut handoffs = Vec::new();
        let mut filled = Vec::new();
        let buffered = size >= 16 << 20;
        for i in 0..runs + 2 {
            // The two ways in turn, so both see the same machine.
            let out = post(c, "/functions/xfer_src/invoke", &json!({ "size": size }))?;
            let buf = if buffered {
                let event = json!({ "size": size, "buffer": true });
                Some(post(c, "/functions/xfer_src/invoke", &event)?)
            } else {
                None
            };
            if i < 2 {
                continue;
            }
            samples.push(Duration::from_nanos(out["ns"].as_u64().context("no ns")?));
            if let Some(b) = buf {
                let ns = |k: &str| b[k].as_u64().with_context(|| format!("no {k}"));
                handoffs.push(Duration::from_nanos(ns("ns")?));
                filled.push(Duration::from_nanos(ns("alloc")? + ns("fill")? + ns("ns")?));
            }
        }
        let how = if size > ipc::payload::SHARED_THRESHOLD {
            "shared memfd"
        } else {
            "inline"
        };
        let rate = |mut row: Row| {
            if size > 0 {
                row.gb_per_s = Some(size as f64 / (row.p50_us * 1e-6) / 1e9);
            }
            row
        };
        rows.push(rate(Row::new(
            &format!("transfer {label} between two functions ({how})"),
            &samples,
        )));
        if buffered {
            rows.push(rate(Row::new(
                &format!("transfer {label}: a filled sprout.buffer handed off"),
                &handoffs,
            )));
            rows.push(rate(Row::new(
                &format!("transfer {label}: sprout.buffer allocated, filled, handed off"),
                &filled,
            )));
        }
    }
    Ok(rows)
}

/// `sprout.map` over `k` sibling sandboxes, each sleeping 20 ms: the wall time of the
/// map less its slowest branch's own time.
fn fan_out(c: &mut ipc::client::Client, k: usize, runs: usize) -> anyhow::Result<Row> {
    let mut samples = Vec::new();
    for i in 0..runs + 3 {
        let out = post(c, "/functions/fan/invoke", &json!({"k": k, "ms": 20}))?;
        if i < 3 {
            continue; // warm-up: starts the sibling sandboxes
        }
        let wall = out["wall_ns"].as_u64().context("no wall_ns")?;
        let slowest = out["slowest_ns"].as_u64().context("no slowest_ns")?;
        samples.push(Duration::from_nanos(wall.saturating_sub(slowest)));
    }
    Ok(Row::new(
        &format!("fan-out {k}: overhead over the slowest branch (warm siblings)"),
        &samples,
    ))
}
