//! Workflows: functions calling functions in their sandbox and in siblings, the
//! shared workflow scratch, payloads through shared memory, declarative workflow
//! files, and how failures, timeouts and runaway recursion end them.

use std::time::{Duration, Instant};

use sprout_tests::{
    agent_cgroup_dirs, body_json, example, json, processes_in_agent_cgroups, require_root,
    sandbox_cgroup_dir, text, wait_for, Daemon, Env, Value,
};

/// Returns the sandbox it runs in and the nesting it was called at.
const WHOAMI_PY: &str = "import os\ndef f(event):\n    return {'sandbox': os.environ['SPROUT_SANDBOX'], 'event': event}\n";

/// Calls `whoami` and returns both sandboxes.
const CALLER_PY: &str = r#"import os, sprout
def f(event):
    callee = sprout.call("whoami", {"n": 1})
    return {"mine": os.environ["SPROUT_SANDBOX"], "callee": callee}
"#;

/// How long [`SCRATCH_SLEEPER_PY`] sleeps: far longer than any bound a test puts on a
/// run that must not wait for it, so a loaded host cannot make a slow run look
/// cancelled (it is killed, so the length costs nothing).
const SLEEPER_SECS: u64 = 50;

/// Within how long a run that must not wait for the sleeper answers.
const NOT_WAITING: Duration = Duration::from_secs(25);

/// Says in the run's scratch that it is running (`sleeping` holds its sandbox id),
/// then sleeps 50 s ([`SLEEPER_SECS`]).
const SCRATCH_SLEEPER_PY: &str = r#"import os, time
def f(e):
    d = os.environ["SPROUT_WORKFLOW_DIR"]
    with open(os.path.join(d, "sleeping.tmp"), "w") as out:
        out.write(os.environ["SPROUT_SANDBOX"])
    os.rename(os.path.join(d, "sleeping.tmp"), os.path.join(d, "sleeping"))
    time.sleep(50)
    return "slept"
"#;

/// Live processes of the daemon's sandbox `sandbox`.
fn processes_in_sandbox(d: &Daemon, sandbox: &str) -> Vec<u32> {
    let needle = format!("/sprout/{}/{sandbox}", d.pid());
    processes_in_agent_cgroups(d.pid())
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cgroup")).is_ok_and(|c| {
                c.lines()
                    .any(|l| l.ends_with(&needle) || l.contains(&format!("{needle}/")))
            })
        })
        .collect()
}

/// Asserts that sandbox `sandbox` is destroyed within `within`: no cgroup left in any
/// hierarchy, no process.
#[track_caller]
fn assert_sandbox_gone(d: &Daemon, sandbox: &str, within: Duration) {
    let left = wait_for(within, || {
        let mut left: Vec<String> = agent_cgroup_dirs(d.pid())
            .into_iter()
            .map(|dir| dir.join(sandbox))
            .filter(|p| p.exists())
            .map(|p| p.display().to_string())
            .collect();
        left.extend(
            processes_in_sandbox(d, sandbox)
                .iter()
                .map(|p| format!("process {p}")),
        );
        left.is_empty().then_some(()).ok_or(left)
    });
    if let Err(left) = left {
        panic!("sandbox {sandbox} is still there {within:?} later: {left:?}");
    }
}

fn register(d: &Daemon, env: &Env, name: &str, code: &str, extra: Value) {
    let dir = env.function(name, &[("f.py", code)]);
    d.register(name, &dir, extra);
}

fn put_workflow(d: &Daemon, name: &str, doc: &Value) -> sprout_tests::ClientResponse {
    d.request(
        "PUT",
        &format!("/workflows/{name}"),
        Some("application/json"),
        doc.to_string().as_bytes(),
    )
}

fn run_workflow(d: &Daemon, name: &str, input: &str) -> sprout_tests::ClientResponse {
    d.request(
        "POST",
        &format!("/workflows/{name}/invoke"),
        Some("application/json"),
        input.as_bytes(),
    )
}

#[test]
fn pinger_calls_ponger_in_its_own_sandbox_embedded_and_on_the_daemon() {
    let env = require_root!();
    let run = env
        .sprout()
        .args(["invoke"])
        .arg(example("pinger"))
        .arg(r#""ponger""#)
        .arg("--with")
        .arg(example("ponger"))
        .run();
    run.success();
    assert_eq!(
        run.json(),
        json!("ping to ponger...pong from ponger: ponged"),
        "{run}"
    );

    let d = env.daemon();
    d.register("pinger", &example("pinger"), json!({}));
    d.register("ponger", &example("ponger"), json!({}));
    let r = d.invoke("pinger", r#""ponger""#);
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(
        body_json(&r),
        json!("ping to ponger...pong from ponger: ponged")
    );
    // Sequential: the callee ran in the caller's sandbox, no second sandbox.
    assert_eq!(d.sandboxes().len(), 1, "{:?}", d.sandboxes());
}

#[test]
fn sequential_and_nested_calls_run_in_the_callers_sandbox() {
    let env = require_root!();
    let d = env.daemon();
    register(&d, &env, "whoami", WHOAMI_PY, json!({}));
    register(&d, &env, "caller", CALLER_PY, json!({}));
    // a -> b -> c, each adding its name: nested calls through the same shim.
    for (name, next) in [("a", Some("b")), ("b", Some("c")), ("c", None)] {
        let code = match next {
            Some(n) => {
                format!("import sprout\ndef f(e):\n    return ['{name}'] + sprout.call('{n}', e)\n")
            }
            None => format!(
                "import os\ndef f(e):\n    return ['{name}', e, os.environ['SPROUT_SANDBOX']]\n"
            ),
        };
        register(&d, &env, name, &code, json!({}));
    }
    for _ in 0..3 {
        let r = d.invoke("caller", "{}");
        assert_eq!(r.status, 200, "{}", text(&r));
        let v = body_json(&r);
        assert_eq!(v["mine"], v["callee"]["sandbox"], "{v}");
        assert_eq!(v["callee"]["event"], json!({"n": 1}));
    }
    let r = d.invoke("a", r#"{"x": 1}"#);
    assert_eq!(r.status, 200, "{}", text(&r));
    let v = body_json(&r);
    assert_eq!(
        v.as_array().unwrap()[0..4],
        [json!("a"), json!("b"), json!("c"), json!({"x": 1})],
        "{v}"
    );
    // caller and a each have one sandbox; whoami, b and c ran inside them.
    assert_eq!(d.sandboxes().len(), 2, "{:?}", d.sandboxes());
}

#[test]
fn a_callee_with_other_limits_runs_in_a_sandbox_of_its_own() {
    let env = require_root!();
    let d = env.daemon();
    register(&d, &env, "whoami", WHOAMI_PY, json!({"memory_mb": 256}));
    register(&d, &env, "caller", CALLER_PY, json!({}));
    let r = d.invoke("caller", "{}");
    assert_eq!(r.status, 200, "{}", text(&r));
    let v = body_json(&r);
    assert_ne!(v["mine"], v["callee"]["sandbox"], "{v}");
}

#[test]
fn map_fans_out_to_sibling_sandboxes_sharing_the_workflow_scratch() {
    let env = require_root!();
    let d = env.daemon();
    let worker = r#"import os
def f(i):
    d = os.environ["SPROUT_WORKFLOW_DIR"]
    with open(os.path.join(d, f"in-{i}")) as src:
        text = src.read()
    with open(os.path.join(d, f"out-{i}"), "w") as dst:
        dst.write(text.upper())
    return os.environ["SPROUT_SANDBOX"]
"#;
    let root = r#"import os, sprout
def f(event):
    d = os.environ["SPROUT_WORKFLOW_DIR"]
    before = sorted(os.listdir(d))
    for i in range(4):
        with open(os.path.join(d, f"in-{i}"), "w") as out:
            out.write(f"item {i}")
    sandboxes = sprout.map("worker", list(range(4)))
    outs = [open(os.path.join(d, f"out-{i}")).read() for i in range(4)]
    fut = sprout.call_async("worker", 0)
    return {"before": before, "outs": outs, "mine": os.environ["SPROUT_SANDBOX"],
            "workers": sandboxes, "again": fut.result()}
"#;
    register(&d, &env, "worker", worker, json!({"max_instances": 4}));
    register(&d, &env, "root", root, json!({}));
    for round in 0..2 {
        let r = d.invoke("root", "{}");
        assert_eq!(r.status, 200, "{}", text(&r));
        let v = body_json(&r);
        // The scratch of the previous run was removed when it ended.
        assert_eq!(v["before"], json!([]), "round {round}: {v}");
        assert_eq!(
            v["outs"],
            json!(["ITEM 0", "ITEM 1", "ITEM 2", "ITEM 3"]),
            "{v}"
        );
        let workers = v["workers"].as_array().unwrap();
        assert!(
            workers.iter().all(|w| *w != v["mine"]),
            "siblings, not the caller: {v}"
        );
        assert_ne!(v["again"], v["mine"]);
    }
}

#[test]
fn large_payloads_go_through_shared_memory_byte_for_byte() {
    let env = require_root!();
    let d = env.daemon();
    let echo = r#"import hashlib
def f(data):
    if isinstance(data, memoryview):
        return bytes(data)                      # raw bytes back
    return {"len": len(data), "sha": hashlib.sha256(data.encode()).hexdigest(), "data": data}
"#;
    let sender = r#"import hashlib, os, sprout
def f(event):
    size = event["size"]
    blob = os.urandom(size)
    back = sprout.call("echo", blob)              # in this sandbox, through the shim
    text = blob.hex()[: size]
    j = sprout.call("echo", text)
    far = sprout.map("echo", [blob])[0]           # through the agent, to a sibling
    buf = sprout.buffer(size)                     # filled in place, handed off uncopied
    buf[:] = blob
    near_buf = sprout.call("echo", buf)
    far_buf = sprout.map("echo", [buf])[0]        # the same sealed memfd again
    refused = None
    if size > 64 << 10:                           # never written: holes, refused
        try:
            sprout.map("echo", [sprout.buffer(size)])
        except sprout.CallError as exc:
            refused = exc.message
    return {"raw_same": bytes(back) == blob, "raw_len": len(back), "refused": refused,
            "json_same": j["data"] == text and j["sha"] == hashlib.sha256(text.encode()).hexdigest(),
            "far_same": bytes(far) == blob,
            "buffer_same": bytes(near_buf) == blob and bytes(far_buf) == blob}
"#;
    register(&d, &env, "echo", echo, json!({"memory_mb": 512}));
    register(&d, &env, "sender", sender, json!({"memory_mb": 512}));
    for size in [10, 70 << 10, 8 << 20] {
        let r = d.invoke("sender", &format!(r#"{{"size": {size}}}"#));
        assert_eq!(r.status, 200, "size {size}: {}", text(&r));
        let mut v = body_json(&r);
        let refused = v.as_object_mut().unwrap().remove("refused").unwrap();
        if size > 64 << 10 {
            assert!(
                refused
                    .as_str()
                    .unwrap_or_default()
                    .contains("were never written"),
                "a buffer never written reached a sibling: {refused}"
            );
        }
        assert_eq!(
            v,
            json!({"raw_same": true, "raw_len": size, "json_same": true, "far_same": true,
                   "buffer_same": true}),
            "size {size}"
        );
    }
    // A big event from a client and a big result back (memfd both ways).
    let big = "x".repeat(3 << 20);
    let r = d.invoke("echo", &serde_json_string(&big));
    assert_eq!(r.status, 200, "{}", text(&r));
    let v = body_json(&r);
    assert_eq!(v["len"], big.len());
    assert_eq!(v["data"].as_str().unwrap(), big);
}

fn serde_json_string(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

#[test]
fn runaway_recursion_stops_at_the_depth_limit() {
    let env = require_root!();
    let d = env.daemon();
    let code = "import sprout\ndef f(n):\n    return sprout.call('loop', n + 1)\n";
    register(
        &d,
        &env,
        "loop",
        code,
        json!({"memory_mb": 512, "pids": 128}),
    );
    let r = d.invoke("loop", "0");
    assert_eq!(r.status, 502, "{}", text(&r));
    let t = text(&r);
    assert!(t.contains("call depth limit of 16"), "{t}");
    assert!(t.contains("CallError"), "{t}");
    // The traceback shows the function's code, not the SDK's.
    assert!(
        t.contains("/code/f.py") && !t.contains("sprout_runtime"),
        "{t}"
    );
    // Still usable afterwards.
    register(&d, &env, "whoami", WHOAMI_PY, json!({}));
    assert_eq!(d.invoke("whoami", "1").status, 200);
}

#[test]
fn a_failing_or_timed_out_callee_surfaces_in_the_caller() {
    let env = require_root!();
    let d = env.daemon();
    register(
        &d,
        &env,
        "boom",
        "def f(e):\n    raise ValueError('bad input ' + str(e))\n",
        json!({}),
    );
    register(
        &d,
        &env,
        "slow",
        "import time\ndef f(e):\n    time.sleep(30)\n",
        json!({"timeout_ms": 300}),
    );
    let caller = r#"import sprout
def f(target):
    try:
        sprout.call(target, 7)
    except sprout.CallError as e:
        return {"function": e.function, "type": e.type, "message": e.message, "str": str(e)}
"#;
    register(&d, &env, "caller", caller, json!({}));
    let v = body_json(&d.invoke("caller", r#""boom""#));
    assert_eq!(v["type"], "ValueError", "{v}");
    assert_eq!(v["message"], "bad input 7");
    assert_eq!(v["str"], "boom raised ValueError: bad input 7");
    let started = Instant::now();
    let v = body_json(&d.invoke("caller", r#""slow""#));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(v["type"], "CallFailed", "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("timed out after 300 ms"),
        "{v}"
    );
    let v = body_json(&d.invoke("caller", r#""nobody""#));
    assert!(
        v["message"].as_str().unwrap().contains("not registered"),
        "{v}"
    );
}

/// After its first call, a caller talks to its in-sandbox callee on a direct channel
/// the shim made, and keeps the callee's time itself: a callee past its timeout is
/// killed, one that dies fails the call, and the next call gets a new callee.
#[test]
fn in_sandbox_calls_go_direct_and_a_stuck_or_dead_callee_is_replaced() {
    let env = require_root!();
    let d = env.daemon();
    let tick = r#"import os, time
def f(e):
    if e == "hang":
        with open(os.path.join(os.environ["SPROUT_WORKFLOW_DIR"], "hung"), "w") as out:
            out.write(str(os.getpid()))
        time.sleep(60)
    if e == "die":
        os._exit(3)
    return os.getpid()
"#;
    register(&d, &env, "tick", tick, json!({"timeout_ms": 500}));
    let caller = r#"import os, sprout, time
def f(e):
    state = sprout.call.__globals__["_state"]()
    out = {"pids": [sprout.call("tick", "ok") for _ in range(3)]}
    out["direct"] = "tick" in state.direct
    for what in ("hang", "die"):
        try:
            sprout.call("tick", what)
        except sprout.CallError as exc:
            out[what] = exc.message
        out[what + "_then"] = sprout.call("tick", "ok")
    with open(os.path.join(os.environ["SPROUT_WORKFLOW_DIR"], "hung")) as hung:
        pid = int(hung.read())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            out["hung_killed"] = True
            break
        time.sleep(0.01)
    return out
"#;
    register(&d, &env, "caller", caller, json!({}));
    let r = d.invoke("caller", "{}");
    assert_eq!(r.status, 200, "{}", text(&r));
    let v = body_json(&r);
    let pids = v["pids"].as_array().unwrap();
    assert!(
        pids.iter().all(|p| p == &pids[0]),
        "one callee serves them all: {v}"
    );
    assert_eq!(v["direct"], true, "{v}");
    assert!(
        v["hang"]
            .as_str()
            .unwrap()
            .contains("tick timed out after 500 ms"),
        "{v}"
    );
    assert_eq!(v["hung_killed"], true, "the stuck callee was killed: {v}");
    assert_ne!(v["hang_then"], pids[0], "{v}");
    assert!(
        v["die"].as_str().unwrap().contains("died while running"),
        "{v}"
    );
    assert!(v["die_then"].is_u64(), "{v}");
    // Everything ran in the caller's one sandbox.
    assert_eq!(d.sandboxes().len(), 1, "{:?}", d.sandboxes());
}

#[test]
fn a_declarative_sequence_runs_in_one_sandbox_and_parallel_in_siblings() {
    let env = require_root!();
    let d = env.daemon();
    let step = r#"import os
def f(e):
    e = e if isinstance(e, list) else []
    return e + [os.environ["SPROUT_SANDBOX"]]
"#;
    register(&d, &env, "s1", step, json!({}));
    register(&d, &env, "s2", step, json!({}));
    let doc = json!({"steps": [
        {"type": "task", "function": "s1"},
        {"type": "task", "function": "s2"},
        {"type": "task", "function": "s1"},
        {"type": "parallel", "branches": [
            {"type": "task", "function": "s2"},
            {"type": "sequence", "steps": [{"type": "task", "function": "s1"}, {"type": "task", "function": "s2"}]}
        ]},
        {"type": "map", "items": "", "step": {"type": "task", "function": "s1"}}
    ]});
    let r = put_workflow(&d, "mix", &doc);
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(body_json(&r)["tasks"], 7);
    let r = run_workflow(&d, "mix", "null");
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.header("X-Sprout-Tasks"), Some("8"));
    let v = body_json(&r);
    // map over the two branch outputs: [[seq..., branch0], [seq..., b1s1, b1s2]] + own.
    let out = v.as_array().unwrap();
    assert_eq!(out.len(), 2, "{v}");
    let seq = &out[0].as_array().unwrap()[..3];
    assert!(
        seq.iter().all(|s| *s == seq[0]),
        "one sandbox for the sequence: {v}"
    );
    let b0 = out[0].as_array().unwrap();
    let b1 = out[1].as_array().unwrap();
    assert_ne!(b0[3], seq[0], "a parallel branch runs in a sibling: {v}");
    assert_eq!(
        b1[3], b1[4],
        "a branch's sequence stays in its sandbox: {v}"
    );

    let r = d.request("GET", "/workflows", None, b"");
    assert_eq!(body_json(&r)[0]["name"], "mix");
    assert_eq!(d.request("DELETE", "/workflows/mix", None, b"").status, 200);
    assert_eq!(run_workflow(&d, "mix", "{}").status, 404);
}

#[test]
fn a_failing_step_fails_the_workflow_by_name_and_stops_the_rest() {
    let env = require_root!();
    let d = env.daemon();
    register(&d, &env, "ok", "def f(e):\n    return e\n", json!({}));
    // Fails only once the sleeper is running, naming its sandbox.
    let boom = r#"import json, os, time
def f(e):
    d = os.environ["SPROUT_WORKFLOW_DIR"]
    deadline = time.monotonic() + 20
    while not os.path.exists(os.path.join(d, "sleeping")):
        if time.monotonic() > deadline:
            raise TimeoutError("the sleeper never started")
        time.sleep(0.01)
    sleeper = open(os.path.join(d, "sleeping")).read()
    raise RuntimeError("disk on fire " + json.dumps({"sleeper": sleeper}))
"#;
    register(&d, &env, "boom", boom, json!({}));
    register(&d, &env, "sleeper", SCRATCH_SLEEPER_PY, json!({}));
    let doc = json!({"steps": [
        {"type": "task", "function": "ok"},
        {"type": "parallel", "branches": [
            {"type": "task", "function": "sleeper"},
            {"type": "task", "function": "boom", "name": "burn"}
        ]},
        {"type": "task", "function": "ok"}
    ]});
    assert_eq!(put_workflow(&d, "fails", &doc).status, 200);
    let started = Instant::now();
    let r = run_workflow(&d, "fails", "{}");
    let elapsed = started.elapsed();
    assert_eq!(r.status, 502, "{}", text(&r));
    let e = &body_json(&r)["error"];
    assert_eq!(e["kind"], "handler_error", "{e}");
    assert_eq!(e["type"], "RuntimeError", "{e}");
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains(r#"workflow "fails" failed at step steps[1].branches[1] (task "burn")"#),
        "{msg}"
    );
    assert!(msg.contains("disk on fire"), "{msg}");
    // The run did not wait for the sleeper (it sleeps 50 s once started)...
    assert!(
        elapsed < NOT_WAITING,
        "the failed run answered after {elapsed:?}: it waited for the sleeper"
    );
    // ... whose sandbox was destroyed, not left to finish.
    let ids: Value = serde_json::from_str(&msg[msg.find('{').expect("sandbox ids")..])
        .unwrap_or_else(|e| panic!("{e}: {msg}"));
    let sleeper = ids["sleeper"].as_str().unwrap();
    assert_sandbox_gone(&d, sleeper, Duration::from_secs(2));
    // (Where a live sandbox's cgroup is, to be sure the check above looked there.)
    register(&d, &env, "whoami", WHOAMI_PY, json!({}));
    let r = d.invoke("whoami", "1");
    assert_eq!(r.status, 200, "{}", text(&r));
    let live = sandbox_cgroup_dir(
        d.pid(),
        body_json(&r)["sandbox"].as_str().unwrap(),
        "memory",
    );
    assert!(live.is_dir(), "{live:?} is missing");

    // Timeout: the run's own limit, naming the step that was running.
    let doc = json!({"timeout_ms": 400, "steps": [
        {"type": "task", "function": "ok"}, {"type": "task", "function": "sleeper"}]});
    assert_eq!(put_workflow(&d, "slow", &doc).status, 200);
    let started = Instant::now();
    let r = run_workflow(&d, "slow", "{}");
    assert!(started.elapsed() < NOT_WAITING);
    assert_eq!(r.status, 504, "{}", text(&r));
    let msg = body_json(&r)["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        msg.contains(r#"workflow "slow" timed out after 400 ms at step steps[1] (task "sleeper")"#),
        "{msg}"
    );
}

#[test]
fn bad_workflow_files_are_refused_with_the_reason() {
    let env = require_root!();
    let d = env.daemon();
    register(&d, &env, "ok", "def f(e):\n    return e\n", json!({}));
    for (doc, want) in [
        (
            json!({"steps": [{"type": "task", "function": "missing"}]}),
            r#"steps[0] needs function \"missing\""#,
        ),
        (json!({"steps": []}), "steps is empty"),
        (json!({"steps": [{"type": "fork"}]}), "unknown variant"),
        (
            json!({"functions": {"ok": "."}, "steps": [{"type": "task", "function": "ok"}]}),
            "register functions with PUT",
        ),
    ] {
        let r = put_workflow(&d, "bad", &doc);
        assert_eq!(r.status, 400, "{doc}: {}", text(&r));
        assert!(text(&r).contains(want), "{doc}: {}", text(&r));
    }
    // Map over something that is not an array.
    let doc = json!({"steps": [{"type": "map", "items": "/xs", "step": {"type": "task", "function": "ok"}}]});
    assert_eq!(put_workflow(&d, "m", &doc).status, 200);
    let r = run_workflow(&d, "m", r#"{"xs": 3}"#);
    assert_eq!(r.status, 400, "{}", text(&r));
    assert!(text(&r).contains("no array at \\\"/xs\\\""), "{}", text(&r));
    assert_eq!(run_workflow(&d, "m", "not json").status, 400);
}

#[test]
fn the_wordcount_example_runs_from_the_cli_embedded_and_on_the_daemon() {
    let env = require_root!();
    let file = example("wordcount").join("wordcount.json");
    let input = r#"{"text": "a b c\nd e\nf\ng h i j", "chunks": 2}"#;
    let run = env
        .sprout()
        .args(["workflow", "run"])
        .arg(&file)
        .arg(input)
        .run();
    run.success();
    assert_eq!(run.json(), json!({"words": 10, "chunks": 2}), "{run}");

    let d = env.daemon();
    let run = d
        .cli(&env)
        .args(["workflow", "run"])
        .arg(&file)
        .arg(input)
        .run();
    run.success();
    assert_eq!(run.json(), json!({"words": 10, "chunks": 2}), "{run}");
}

#[test]
fn a_caller_sees_a_callee_registered_again() {
    let env = require_root!();
    let d = env.daemon();
    register(
        &d,
        &env,
        "callee",
        "def f(e):\n    return 'v1'\n",
        json!({}),
    );
    register(
        &d,
        &env,
        "caller",
        "import sprout\ndef f(e):\n    return sprout.call('callee', e)\n",
        json!({}),
    );
    assert_eq!(body_json(&d.invoke("caller", "{}")), json!("v1"));
    register(
        &d,
        &env,
        "callee",
        "def f(e):\n    return 'v2'\n",
        json!({}),
    );
    assert_eq!(body_json(&d.invoke("caller", "{}")), json!("v2"));
}

#[test]
fn a_sibling_that_kept_a_descriptor_into_the_scratch_sees_no_later_run() {
    let env = require_root!();
    let d = env.daemon();
    // Keeps a descriptor of the scratch it first saw, across invocations.
    let worker = r#"import os
_kept = None
def f(_):
    global _kept
    if _kept is None:
        _kept = os.open(os.environ["SPROUT_WORKFLOW_DIR"], os.O_RDONLY | os.O_DIRECTORY)
    return {"kept": sorted(os.listdir(_kept)), "now": sorted(os.listdir(os.environ["SPROUT_WORKFLOW_DIR"]))}
"#;
    let root = r#"import os, sprout
def f(n):
    open(os.path.join(os.environ["SPROUT_WORKFLOW_DIR"], f"run-{n}"), "w").write("x")
    return sprout.map("keeper", [0])[0]
"#;
    register(&d, &env, "keeper", worker, json!({"max_instances": 1}));
    register(&d, &env, "root", root, json!({"max_instances": 1}));
    let first = body_json(&d.invoke("root", "1"));
    assert_eq!(first, json!({"kept": ["run-1"], "now": ["run-1"]}));
    let second = body_json(&d.invoke("root", "2"));
    // The same sibling sees the new run's scratch, but its old descriptor reaches only
    // the finished run's files.
    assert_eq!(second, json!({"kept": ["run-1"], "now": ["run-2"]}));
}

#[test]
fn a_step_waiting_for_an_instance_its_own_workflow_holds_times_out() {
    let env = require_root!();
    let d = env.daemon();
    register(
        &d,
        &env,
        "only",
        "def f(e):\n    return e\n",
        json!({"max_instances": 1}),
    );
    // The sequence holds the one instance of `only` while its parallel branch waits
    // for it: the run's timeout ends the wait.
    let doc = json!({"timeout_ms": 500, "steps": [
        {"type": "task", "function": "only"},
        {"type": "parallel", "branches": [{"type": "task", "function": "only"}]}]});
    assert_eq!(put_workflow(&d, "stuck", &doc).status, 200);
    let started = Instant::now();
    let r = run_workflow(&d, "stuck", "{}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(r.status, 504, "{}", text(&r));
    let msg = body_json(&r)["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        msg.contains(r#"timed out after 500 ms at step steps[1].branches[0] (task "only")"#),
        "{msg}"
    );
    // Nothing is stuck: the function still answers.
    assert_eq!(d.invoke("only", "7").status, 200);
}

#[test]
fn an_unawaited_call_async_ends_with_the_invocation_that_made_it() {
    let env = require_root!();
    let d = env.daemon();
    // Counts the calls it finished; once running, says so in the shared scratch.
    let slow = r#"import os, time
done = 0
def f(e):
    global done
    if e.get("report"):
        return {"done": done, "sandbox": os.environ["SPROUT_SANDBOX"]}
    d = os.environ["SPROUT_WORKFLOW_DIR"]
    with open(os.path.join(d, "started.tmp"), "w") as out:
        out.write(os.environ["SPROUT_SANDBOX"])
    os.rename(os.path.join(d, "started.tmp"), os.path.join(d, "started"))
    time.sleep(e["sleep"])
    done += 1
    return "slept"
"#;
    // Starts `slow` without ever awaiting it and returns as soon as it runs.
    let caller = r#"import os, time, sprout
def f(e):
    d = os.environ["SPROUT_WORKFLOW_DIR"]
    sprout.call_async("slow", {"sleep": e["sleep"]})
    deadline = time.monotonic() + 20
    while not os.path.exists(os.path.join(d, "started")):
        if time.monotonic() > deadline:
            raise TimeoutError("slow never started")
        time.sleep(0.01)
    return {"mine": os.environ["SPROUT_SANDBOX"], "sibling": open(os.path.join(d, "started")).read()}
"#;
    // The same by hand on the call socket, without the SDK (so the runtime never
    // reports that the handler called): the agent ends the run all the same.
    let raw_caller = r#"import json, os, socket, struct, time
_kept = []
def f(e):
    d = os.environ["SPROUT_WORKFLOW_DIR"]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect("/.sprout/agent.sock")
    hdr = json.dumps({"op": "call", "id": 1, "function": "slow", "depth": 1}).encode()
    event = json.dumps({"sleep": e["sleep"]}).encode()
    s.sendall(struct.pack("<III", len(hdr), len(event), 0) + hdr + event)
    _kept.append(s)
    deadline = time.monotonic() + 20
    while not os.path.exists(os.path.join(d, "started")):
        if time.monotonic() > deadline:
            raise TimeoutError("slow never started")
        time.sleep(0.01)
    return {"mine": os.environ["SPROUT_SANDBOX"], "sibling": open(os.path.join(d, "started")).read()}
"#;
    register(&d, &env, "slow", slow, json!({"max_instances": 1}));
    register(&d, &env, "caller", caller, json!({}));
    register(&d, &env, "raw_caller", raw_caller, json!({}));
    for caller in ["caller", "raw_caller"] {
        let sleep = SLEEPER_SECS;
        let started = Instant::now();
        let r = d.invoke(caller, &json!({ "sleep": sleep }).to_string());
        assert_eq!(r.status, 200, "{caller}: {}", text(&r));
        let v = body_json(&r);
        let (mine, sibling) = (v["mine"].as_str().unwrap(), v["sibling"].as_str().unwrap());
        assert_ne!(mine, sibling, "{caller}: {v}");
        // The path is right: the caller's own sandbox is there, kept warm.
        let own = sandbox_cgroup_dir(d.pid(), mine, "memory");
        assert!(own.is_dir(), "{caller}: {own:?} is missing");
        // The sibling still running `slow` went with the invocation, long before its
        // sleep would have ended.
        assert_sandbox_gone(&d, sibling, Duration::from_secs(10));
        // `slow` has one instance at most: had the sibling kept running, this would
        // wait for it and see its call finished.
        let r = d.invoke("slow", r#"{"report": true}"#);
        assert_eq!(r.status, 200, "{caller}: {}", text(&r));
        let v = body_json(&r);
        assert_eq!(
            v["done"], 0,
            "{caller}: the un-awaited call ran to its end: {v}"
        );
        assert_ne!(v["sandbox"], sibling, "{caller}: {v}");
        assert!(
            started.elapsed() < NOT_WAITING,
            "{caller}: {:?}: something waited for the un-awaited call",
            started.elapsed()
        );
    }
}

#[test]
fn a_caller_that_does_not_read_its_answers_holds_a_sibling_at_most_5_s() {
    let env = require_root!();
    let d = env.daemon();
    // Answers ~60 KiB (inline in the frame: shared memory starts above 64 KiB), or
    // how many calls it served.
    let big = r#"calls = 0
def f(e):
    global calls
    calls += 1
    return calls if e == "count" else "x" * 60000
"#;
    // Sends calls on the call socket by hand, reads the first answer and no other: they
    // fill the socket, and the agent's write of the next one blocks. Its invocation
    // goes on (so its run, and the calls, are live) until the agent closes the
    // connection, which it notices by a one-byte send failing (11 bytes at most: a
    // frame's prefix is 12, so they never make a request); it returns after how long.
    let hostile = r#"import json, socket, struct, time
def f(e):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect("/.sprout/agent.sock")
    for i in range(e["calls"]):
        hdr = json.dumps({"op": "call", "id": i + 1, "function": "big", "depth": 1}).encode()
        s.sendall(struct.pack("<III", len(hdr), 4, 0) + hdr + b"null")
    s.settimeout(30)
    def read(n):
        buf = b""
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            if not chunk:
                raise EOFError("the agent closed the call socket")
            buf += chunk
        return buf
    if e.get("garbage"):
        # A frame whose header is not JSON: the agent stops reading.
        s.sendall(struct.pack("<III", 2, 0, 0) + b"{{")
        header = {"op": "garbage sent"}
    else:
        hlen, plen, _ = struct.unpack("<III", read(12))
        header = json.loads(read(hlen))
        read(plen)
    read_at = time.monotonic()
    for _ in range(11):
        time.sleep(1)
        try:
            s.send(b"\0")
        except OSError:
            return {"first": header["op"], "closed_after": time.monotonic() - read_at}
    return {"first": header["op"], "closed_after": None}
"#;
    register(
        &d,
        &env,
        "big",
        big,
        json!({"max_instances": 1, "timeout_ms": 120000}),
    );
    register(&d, &env, "hostile", hostile, json!({"timeout_ms": 60000}));
    // Enough answers to fill the agent's send buffer with room to spare.
    let sndbuf: usize = std::fs::read_to_string("/proc/sys/net/core/wmem_default")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(212_992);
    let calls = sndbuf / 60_000 + 6;
    let in_background = |name: &'static str, event: String| {
        let (tx, rx) = std::sync::mpsc::channel();
        let socket = d.socket().to_path_buf();
        std::thread::spawn(move || {
            let r = sprout_tests::Client::connect(&socket).and_then(|mut c| {
                c.request(
                    "POST",
                    &format!("/functions/{name}/invoke"),
                    Some("application/json"),
                    event.as_bytes(),
                )
            });
            let _ = tx.send(r.map(|r| (r.status, String::from_utf8_lossy(&r.body).into_owned())));
        });
        rx
    };
    let hostile_run = in_background("hostile", json!({ "calls": calls }).to_string());
    // The hostile calls are in the agent's hands once they queue for `big`'s one
    // instance; a client's call queues behind them (the queue is FIFO).
    wait_for(Duration::from_secs(20), || {
        let s = d.status();
        (s["queued"].as_u64() >= Some(1)).then_some(()).ok_or(s)
    })
    .unwrap_or_else(|s| panic!("the hostile calls never queued: {s}; log:\n{}", d.log()));
    let sent = Instant::now();
    let client = in_background("big", "\"count\"".into());
    // The agent's limit, 5 s from when an answer is ready, plus a margin for a loaded
    // host (an answer that blocks twice, or answers that wait in turn, take 10 s or
    // more).
    let within = Duration::from_secs(5 + 4);
    let served = client
        .recv_timeout(within)
        .unwrap_or_else(|_| {
            panic!("the sibling was still held {within:?} after {calls} unread answers")
        })
        .unwrap_or_else(|e| panic!("invoke big: {}", ipc::chain(&e)));
    let held = sent.elapsed();
    assert_eq!(served.0, 200, "{served:?}");
    // It ran no later than after all of them: the closed connection's queued calls
    // gave up their places. (It may run in a new instance, counting from 1: the call
    // in flight when the connection closed is cancelled and its sibling destroyed.)
    let count: usize = served.1.parse().unwrap();
    assert!((1..=calls + 1).contains(&count), "{served:?}");
    // It was held (the answers did block), then let go once the connection closed.
    assert!(
        held >= Duration::from_secs(2),
        "served after {held:?}: the answers never filled the socket, so nothing was tested"
    );
    let (status, body) = hostile_run
        .recv_timeout(Duration::from_secs(30))
        .expect("the hostile invocation ended")
        .unwrap_or_else(|e| panic!("invoke hostile: {}", ipc::chain(&e)));
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["first"], "call_returned", "{v}");
    let closed = v["closed_after"].as_f64().unwrap_or_else(|| {
        panic!("the agent never closed the connection of a caller that did not read: {v}")
    });
    assert!(closed < 10.0, "{v}");

    // A caller that sends a bad frame after its calls is heard no more, and gets no
    // answers either (else, with no requests left to watch for, it could read them
    // slowly enough to hold siblings with no bound): its connection closes at once.
    let r = d.invoke(
        "hostile",
        &json!({ "calls": calls, "garbage": true }).to_string(),
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    let v = body_json(&r);
    let closed = v["closed_after"].as_f64().unwrap_or_else(|| {
        panic!("the agent kept the connection of a caller that sent a bad frame: {v}")
    });
    assert!(closed < 3.0, "{v}");
    // The agent is fine: the call socket serves a caller that reads.
    let reader =
        "import sprout\ndef f(e):\n    return len(sprout.call_async('big', None).result())\n";
    register(&d, &env, "reader", reader, json!({}));
    let r = d.invoke("reader", "{}");
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(body_json(&r), json!(60000));
}

/// Waits in the run's scratch until `total` calls have started (each makes a
/// `started-*` file and keeps a `live-*` file while it runs) or, once `want` were
/// running at the same time, for 2 s more; gives up after `wait` seconds. Returns the
/// most it saw running at once and whether all `total` started while it ran.
const MEET_PY: &str = r#"import os, time
def f(e):
    want, total, wait = e["want"], e["total"], e["wait"]
    d = os.environ["SPROUT_WORKFLOW_DIR"]
    me = os.urandom(8).hex()
    live = os.path.join(d, "live-" + me)
    open(live, "w").close()
    open(os.path.join(d, "started-" + me), "w").close()
    best, full_at, met = 0, None, False
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        names = os.listdir(d)
        running = sum(n.startswith("live-") for n in names)
        best = max(best, running)
        if running >= want and full_at is None:
            full_at = time.monotonic()
        if sum(n.startswith("started-") for n in names) >= total:
            met = True
            break
        if full_at is not None and time.monotonic() - full_at > 2:
            break
        time.sleep(0.005)
    os.remove(live)
    return {"best": best, "met": met}
"#;

#[test]
fn parallel_branches_run_at_the_same_time() {
    let env = require_root!();
    let d = env.daemon();
    register(&d, &env, "meet", MEET_PY, json!({}));
    let branch = json!({"type": "task", "function": "meet"});
    let doc = json!({"timeout_ms": 30000, "steps": [
        {"type": "parallel", "branches": [branch, branch, branch]}]});
    assert_eq!(put_workflow(&d, "together", &doc).status, 200);
    // Each branch waits until all three have started: only if they run at once.
    let r = run_workflow(&d, "together", r#"{"want": 3, "total": 3, "wait": 5}"#);
    assert_eq!(r.status, 200, "{}", text(&r));
    let v = body_json(&r);
    let out = v.as_array().expect("an array");
    assert_eq!(out.len(), 3, "{v}");
    assert!(
        out.iter().all(|b| b["met"] == true),
        "a branch ran while the others had not started: {v}"
    );
}

#[test]
fn map_runs_64_items_at_a_time_and_no_more() {
    let env = require_root!();
    // 66 small sandboxes: an explicit budget so that a small CI machine holds them.
    let d = env.daemon_with(&["--stem-cells", "0", "--memory-budget", "8192"]);
    register(
        &d,
        &env,
        "meet",
        MEET_PY,
        json!({"max_instances": 80, "memory_mb": 64}),
    );
    let doc = json!({"timeout_ms": 60000, "steps": [
        {"type": "map", "items": "/items", "step": {"type": "task", "function": "meet"}}]});
    assert_eq!(put_workflow(&d, "fan", &doc).status, 200);
    // Two more items than the limit: each waits until 64 run at once (then 2 s more,
    // to see a 65th if one came) or until all 66 have started.
    let total = 66;
    let items: Vec<Value> = (0..total)
        .map(|_| json!({"want": 64, "total": total, "wait": 20}))
        .collect();
    let r = run_workflow(&d, "fan", &json!({ "items": items }).to_string());
    assert_eq!(r.status, 200, "{}", text(&r));
    let v = body_json(&r);
    let out = v.as_array().expect("an array");
    assert_eq!(out.len(), total, "{v}");
    let seen: Vec<u64> = out.iter().filter_map(|o| o["best"].as_u64()).collect();
    assert_eq!(
        seen.iter().max(),
        Some(&64),
        "the most items each saw running at once: {seen:?}"
    );
}
