//! The Node.js runtime (issue 11): every handler shape (Zeep's, OpenWhisk's, AWS
//! Lambda's), errors with type, message and stack, per-invocation logs, calls from
//! Node.js (`sprout`, Zeep's `@m6s/box`) to Node.js and Python and back, large
//! payloads, and the guarantees every runtime has: limits, isolation, freezing and
//! clean-up. Functions name their runtime explicitly (`--runtime nodejs`).

use std::path::Path;
use std::time::{Duration, Instant};

use sprout_tests::{
    body_json, example, json, require_root, text, wait_for, Daemon, Env, Run, Value,
};

/// `sprout invoke DIR EVENT --runtime nodejs [extra...]` in an embedded agent.
fn invoke(env: &Env, dir: &Path, event: &str, extra: &[&str]) -> Run {
    let run = env
        .sprout()
        .arg("invoke")
        .arg(dir)
        .arg(event)
        .args(["--runtime", "nodejs"])
        .args(extra)
        .run();
    env.assert_clean(run.pid);
    run
}

/// Registers `dir` as Node.js function `name` on `d`, with `extra` fields.
fn register(d: &Daemon, name: &str, dir: &Path, mut extra: Value) {
    extra["runtime"] = json!("nodejs");
    d.register(name, dir, extra);
}

/// `POST /functions/<name>/invoke?logs=true`: (status, body).
fn invoke_with_logs(d: &Daemon, name: &str, event: &str) -> (u16, Value) {
    let r = d.request(
        "POST",
        &format!("/functions/{name}/invoke?logs=true"),
        Some("application/json"),
        event.as_bytes(),
    );
    (r.status, body_json(&r))
}

#[test]
fn every_handler_shape_runs() {
    let env = require_root!();
    let event = r#"{"name":"n"}"#;
    // (name, files, --handler, expected result)
    type Shape<'a> = (&'a str, &'a [(&'a str, &'a str)], Option<&'a str>, Value);
    let shapes: &[Shape] = &[
        (
            "exports-main",
            &[("index.js", "exports.main = (p) => ({shape: 'exports.main', p});\n")],
            None,
            json!({"shape": "exports.main", "p": {"name": "n"}}),
        ),
        (
            "module-exports-main",
            &[(
                "index.js",
                "module.exports.main = function (p) { return 'module.exports.main ' + p.name; };\n",
            )],
            None,
            json!("module.exports.main n"),
        ),
        (
            "global-main",
            &[(
                "index.js",
                "// OpenWhisk plain code\nfunction main(params) {\n  return {global: true, name: params.name};\n}\n",
            )],
            None,
            json!({"global": true, "name": "n"}),
        ),
        (
            "package-main",
            &[
                ("package.json", r#"{"name": "pm", "main": "lib/entry.js"}"#),
                ("lib/entry.js", "exports.main = () => 'package.json main';\n"),
                ("index.js", "exports.main = () => 'not me';\n"),
            ],
            None,
            json!("package.json main"),
        ),
        (
            "index-function",
            &[("index.js", "module.exports = (e) => ['index.js itself', e.name];\n")],
            None,
            json!(["index.js itself", "n"]),
        ),
        (
            "main-js",
            &[
                ("activity.json", r#"{"name": "mj", "runtime": "nodejs:latest"}"#),
                ("main.js", "module.exports = async (arg) => ({zeep: arg});\n"),
            ],
            None,
            json!({"zeep": {"name": "n"}}),
        ),
        (
            "dotted",
            &[(
                "other.js",
                "exports.niam = { xyz(p) { return 'other.niam.xyz ' + p.name; } };\n",
            )],
            Some("other.niam.xyz"),
            json!("other.niam.xyz n"),
        ),
        (
            "dotted-plain",
            &[("other.js", "exports.niam = (p) => 'other.niam ' + p.name;\n")],
            Some("other.niam"),
            json!("other.niam n"),
        ),
        (
            "promise",
            &[(
                "index.js",
                "exports.main = (p) => new Promise((ok) => setTimeout(() => ok({late: p.name}), 20));\n",
            )],
            None,
            json!({"late": "n"}),
        ),
        (
            "callback",
            &[(
                "index.js",
                "exports.handler = (e, context, callback) => { setTimeout(() => callback(null, {cb: e.name}), 5); };\n",
            )],
            Some("index.handler"),
            json!({"cb": "n"}),
        ),
        (
            "undefined",
            &[("index.js", "exports.main = async () => {};\n")],
            None,
            Value::Null,
        ),
    ];
    for (name, files, handler, expected) in shapes {
        let dir = env.function(name, files);
        let mut extra = vec![];
        if let Some(h) = handler {
            extra.extend(["--handler", h]);
        }
        let run = invoke(&env, &dir, event, &extra);
        run.success();
        assert_eq!(run.json(), *expected, "{name}: {run}");
    }
}

#[test]
fn an_aws_handler_gets_its_context() {
    let env = require_root!();
    let dir = env.function(
        "lambda",
        &[(
            "index.js",
            r#"exports.handler = async (event, context) => ({
  event,
  functionName: context.functionName,
  functionVersion: context.functionVersion,
  awsRequestId: context.awsRequestId,
  memoryLimitInMB: context.memoryLimitInMB,
  remaining: context.getRemainingTimeInMillis(),
});
"#,
        )],
    );
    let run = invoke(
        &env,
        &dir,
        r#"{"k": 1}"#,
        &[
            "--handler",
            "index.handler",
            "--memory",
            "96",
            "--timeout",
            "5000",
        ],
    );
    run.success();
    let v = run.json();
    assert_eq!(v["event"], json!({"k": 1}), "{run}");
    assert_eq!(v["functionName"], "lambda", "{run}");
    assert_eq!(v["memoryLimitInMB"], "96", "{run}");
    assert!(v["functionVersion"].is_string(), "{run}");
    let id = v["awsRequestId"].as_str().unwrap();
    assert!(
        id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()),
        "{run}"
    );
    let remaining = v["remaining"].as_u64().unwrap();
    assert!(remaining > 3000 && remaining <= 5000, "{run}");

    // The examples run as the README shows them.
    let run = invoke(
        &env,
        &example("node-lambda"),
        r#"{"name": "x"}"#,
        &["--handler", "index.handler"],
    );
    run.success();
    assert_eq!(run.json()["body"], "hello x from node-lambda", "{run}");
    let run = invoke(&env, &example("node-hello"), r#"{"name": "node"}"#, &[]);
    run.success();
    assert_eq!(run.json(), json!({"greeting": "Hello, node!"}), "{run}");
}

#[test]
fn errors_carry_type_message_and_stack() {
    let env = require_root!();
    // (name, index.js, kind, type, message part, traceback part)
    let cases: &[(&str, &str, &str, &str, &str, &str)] = &[
        (
            "throws",
            "exports.main = () => {\n  throw new RangeError('too far');\n};\n",
            "handler_error",
            "RangeError",
            "too far",
            "/code/index.js:2",
        ),
        (
            "rejects",
            "exports.main = async () => { await null; throw new TypeError('async no'); };\n",
            "handler_error",
            "TypeError",
            "async no",
            "/code/index.js:1",
        ),
        (
            "throws-string",
            "exports.main = () => { throw 'a bare string'; };\n",
            "handler_error",
            "Error",
            "a bare string",
            "",
        ),
        (
            "unserialisable",
            "exports.main = () => ({big: 1n});\n",
            "handler_error",
            "TypeError",
            "handler result is not JSON-serialisable",
            "",
        ),
        (
            "syntax",
            "exports.main = () => {\n",
            "load_error",
            "SyntaxError",
            "Unexpected end of input",
            "/code/index.js",
        ),
        (
            "no-export",
            "exports.other = 1;\n",
            "load_error",
            "HandlerNotFound",
            "exports no function main or handler",
            "",
        ),
        (
            "throws-at-load",
            "throw new Error('broken at load');\n",
            "load_error",
            "Error",
            "broken at load",
            "/code/index.js:1",
        ),
    ];
    for (name, code, kind, typ, message, traceback) in cases {
        let dir = env.function(name, &[("index.js", code)]);
        let run = invoke(&env, &dir, "{}", &[]);
        run.expect_code(1);
        let e = run.assert_error(kind, "message", message);
        assert_eq!(e["type"], *typ, "{name}: {run}");
        let tb = e["traceback"].as_str().unwrap_or_default();
        assert!(tb.contains(traceback), "{name}: {run}");
        assert!(
            !tb.contains("/.sprout/nodejs"),
            "{name}: the runtime's own frames are not the function's: {run}"
        );
    }
    // A module that is not there is refused at registration, naming what was
    // looked for (the agent checks the files before any sandbox is made).
    let dir = env.function("empty", &[("README", "nothing here")]);
    let run = invoke(&env, &dir, "{}", &[]);
    run.expect_code(2);
    assert!(run.stderr.contains("index.js and main.js"), "{run}");
    let run = invoke(&env, &dir, "{}", &["--handler", "nope.main"]);
    run.expect_code(2);
    assert!(run.stderr.contains("nope.js"), "{run}");
}

#[test]
fn logs_belong_to_their_invocation() {
    let env = require_root!();
    let d = env.daemon();
    let dir = env.function(
        "logger",
        &[(
            "index.js",
            "exports.main = async (e) => { console.log('out ' + e.n); console.error('err ' + e.n); return e.n; };\n",
        )],
    );
    register(&d, "logger", &dir, json!({}));
    for n in 1..=3 {
        let (status, v) = invoke_with_logs(&d, "logger", &format!(r#"{{"n": {n}}}"#));
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["result"], n, "{v}");
        assert_eq!(v["logs"]["stdout"], format!("out {n}\n"), "{v}");
        assert_eq!(v["logs"]["stderr"], format!("err {n}\n"), "{v}");
    }
    let run = d
        .cli(&env)
        .args(["invoke", "logger", r#"{"n": 7}"#, "--logs"])
        .run();
    run.success();
    assert!(
        run.stderr.contains("out 7") && run.stderr.contains("err 7"),
        "{run}"
    );
}

#[test]
fn zeeps_samples_run_unchanged() {
    let env = require_root!();
    let zeep = example("zeep");
    let run = invoke(&env, &zeep.join("echo"), r#"{"any": ["json", 1]}"#, &[]);
    run.success();
    assert_eq!(run.json(), json!({"any": ["json", 1]}), "{run}");

    let d = env.daemon();
    register(&d, "echo", &zeep.join("echo"), json!({}));
    register(&d, "ponger", &zeep.join("pingpong/ponger"), json!({}));
    register(&d, "pinger", &zeep.join("pingpong/pinger"), json!({}));
    let (status, v) = invoke_with_logs(&d, "pinger", r#""ponger""#);
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["result"],
        json!("ping to ponger...pong from ponger: ponged"),
        "{v}"
    );
    assert!(
        v["logs"]["stdout"]
            .as_str()
            .unwrap()
            .contains("ping to ponger..."),
        "{v}"
    );
    // The callee (Node.js, like its caller) ran in the caller's sandbox.
    assert_eq!(d.sandboxes().len(), 1, "{:?}", d.sandboxes());
    let r = d.invoke("echo", r#""hi""#);
    assert_eq!(body_json(&r), json!("hi"), "{}", text(&r));
}

/// Calls `event.callee` with `event.arg` in every way the SDK has and reports.
const CALLER_JS: &str = r#"const sprout = require('sprout');
exports.main = async (e) => {
  const out = {sandbox: process.env.SPROUT_SANDBOX};
  out.call = await sprout.call(e.callee, e.arg);
  out.async = await sprout.callAsync(e.callee, e.arg);
  out.map = await sprout.map(e.callee, [1, 2, 3]);
  out.parallel = await Promise.all([sprout.call(e.callee, 'a'), sprout.call(e.callee, 'b')]);
  try {
    await sprout.call('nobody-here', 1);
  } catch (err) {
    out.missing = {name: err.name, function: err.function, type: err.type, failed: err.failed, isCallError: err instanceof sprout.CallError};
  }
  try {
    await sprout.call(e.callee, 'raise');
  } catch (err) {
    out.raised = {type: err.type, message: err.message, failed: err.failed, remote: err.remoteTraceback.length > 0};
  }
  out.maxDepth = sprout.MAX_DEPTH;
  return out;
};
"#;

const CALLEE_JS: &str = r#"exports.main = (x) => {
  if (x === 'raise') throw new RangeError('callee says no');
  return {js: x, sandbox: process.env.SPROUT_SANDBOX};
};
"#;

const CALLEE_PY: &str = r#"import os
def f(x):
    if x == "raise":
        raise ValueError("callee says no")
    return {"py": x, "sandbox": os.environ["SPROUT_SANDBOX"]}
"#;

const CALLER_PY: &str = r#"import os, sprout
def f(e):
    return {"sandbox": os.environ["SPROUT_SANDBOX"], "call": sprout.call(e["callee"], e["arg"]), "map": sprout.map(e["callee"], [1, 2])}
"#;

#[test]
fn node_calls_node_in_its_sandbox_and_python_through_the_agent() {
    let env = require_root!();
    let d = env.daemon();
    register(
        &d,
        "caller",
        &env.function("caller", &[("index.js", CALLER_JS)]),
        json!({}),
    );
    register(
        &d,
        "jscallee",
        &env.function("jscallee", &[("index.js", CALLEE_JS)]),
        json!({}),
    );
    d.register(
        "pycallee",
        &env.function("pycallee", &[("f.py", CALLEE_PY)]),
        json!({}),
    );

    let r = d.invoke("caller", r#"{"callee": "jscallee", "arg": {"x": 1}}"#);
    assert_eq!(r.status, 200, "{}", text(&r));
    let v = body_json(&r);
    let mine = v["sandbox"].as_str().unwrap();
    assert_eq!(v["call"]["js"], json!({"x": 1}), "{v}");
    assert_eq!(
        v["call"]["sandbox"], mine,
        "a Node.js callee runs in its Node.js caller's sandbox: {v}"
    );
    assert_eq!(v["async"]["js"], json!({"x": 1}), "{v}");
    assert_ne!(
        v["async"]["sandbox"], mine,
        "callAsync runs in a sibling: {v}"
    );
    let mapped: Vec<&Value> = v["map"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["js"])
        .collect();
    assert_eq!(mapped, [&json!(1), &json!(2), &json!(3)], "{v}");
    assert_eq!(v["parallel"][0]["js"], "a", "{v}");
    assert_eq!(v["parallel"][1]["js"], "b", "{v}");
    assert_eq!(
        v["missing"],
        json!({"name": "CallError", "function": "nobody-here", "type": "CallFailed", "failed": true, "isCallError": true}),
        "{v}"
    );
    assert_eq!(
        v["raised"],
        json!({"type": "RangeError", "message": "callee says no", "failed": false, "remote": true}),
        "{v}"
    );
    assert_eq!(v["maxDepth"], 16, "{v}");

    // Node.js -> Python: in a Python sandbox, through the agent.
    let r = d.invoke("caller", r#"{"callee": "pycallee", "arg": [1, "two"]}"#);
    assert_eq!(r.status, 200, "{}", text(&r));
    let v = body_json(&r);
    assert_eq!(v["call"]["py"], json!([1, "two"]), "{v}");
    assert_ne!(v["call"]["sandbox"], v["sandbox"], "{v}");
    assert_eq!(v["raised"]["type"], "ValueError", "{v}");

    // Python -> Node.js.
    d.register(
        "pycaller",
        &env.function("pycaller", &[("f.py", CALLER_PY)]),
        json!({}),
    );
    let r = d.invoke(
        "pycaller",
        r#"{"callee": "jscallee", "arg": "from python"}"#,
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    let v = body_json(&r);
    assert_eq!(v["call"]["js"], "from python", "{v}");
    assert_ne!(v["call"]["sandbox"], v["sandbox"], "{v}");
    assert_eq!(v["map"][1]["js"], 2, "{v}");
}

#[test]
fn a_workflow_mixes_runtimes() {
    let env = require_root!();
    let d = env.daemon();
    let js = "exports.main = (e) => (Array.isArray(e) ? e : []).concat(['js']);\n";
    let py = "def f(e):\n    return (e if isinstance(e, list) else []) + ['py']\n";
    register(
        &d,
        "js",
        &env.function("js", &[("index.js", js)]),
        json!({}),
    );
    d.register("py", &env.function("py", &[("f.py", py)]), json!({}));
    let doc = json!({"steps": [
        {"type": "task", "function": "js"},
        {"type": "task", "function": "py"},
        {"type": "task", "function": "js"},
    ]});
    let r = d.request(
        "PUT",
        "/workflows/mixed",
        Some("application/json"),
        doc.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    let r = d.request(
        "POST",
        "/workflows/mixed/invoke",
        Some("application/json"),
        b"null",
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(body_json(&r), json!(["js", "py", "js"]));
}

#[test]
fn large_events_and_results_travel_both_ways() {
    let env = require_root!();
    let d = env.daemon();
    // Returns a string of e.n 'x's and the length of what it got; with e.via, makes
    // the same request of function e.via (in its sandbox) and returns its answer.
    let code = r#"const sprout = require('sprout');
exports.main = async (e) => {
  if (e.via) {
    const got = await sprout.call(e.via, {n: e.n, pad: e.pad});
    const raw = await sprout.call(e.via, Buffer.alloc(e.n, 7));
    return {got: got.got, len: got.out.length, raw: raw};
  }
  if (Buffer.isBuffer(e)) return {rawLen: e.length};
  return {got: (e.pad || '').length, out: 'x'.repeat(e.n)};
};
"#;
    let dir = env.function("big", &[("index.js", code)]);
    register(&d, "big", &dir, json!({"memory_mb": 256}));
    register(&d, "big2", &dir, json!({"memory_mb": 256}));
    let pad = "p".repeat(200 << 10);
    let event = json!({"n": 300 << 10, "pad": pad}).to_string();
    let r = d.invoke("big", &event);
    assert_eq!(r.status, 200, "{}", &text(&r)[..200.min(text(&r).len())]);
    let v = body_json(&r);
    assert_eq!(v["got"], 200 << 10);
    assert_eq!(v["out"].as_str().unwrap().len(), 300 << 10);
    // Node.js -> Node.js in the sandbox, JSON and raw, both ways large.
    let event = json!({"n": 300 << 10, "pad": pad, "via": "big2"}).to_string();
    let r = d.invoke("big", &event);
    assert_eq!(r.status, 200, "{}", &text(&r)[..300.min(text(&r).len())]);
    let v = body_json(&r);
    assert_eq!(v["got"], 200 << 10, "{}", &v.to_string()[..300]);
    assert_eq!(v["len"], 300 << 10);
    assert_eq!(v["raw"], json!({"rawLen": 300 << 10}));
}

#[test]
fn limits_hold_for_node() {
    let env = require_root!();
    // Time: a busy loop is stopped at its limit, with the timeout message.
    let dir = env.function(
        "spin",
        &[("index.js", "exports.main = () => { for (;;) {} };\n")],
    );
    let run = invoke(&env, &dir, "{}", &["--timeout", "1500"]);
    run.expect_code(1);
    run.assert_error(
        "timeout",
        "message",
        "function spin timed out after 1500 ms",
    );
    assert!(run.elapsed < Duration::from_secs(10), "{:?}", run.elapsed);

    // Memory: an allocation past the limit is an out-of-memory kill.
    let hog = "exports.main = () => { const keep = []; for (;;) keep.push(Buffer.alloc(8 << 20, 1)); };\n";
    let dir = env.function("hog", &[("index.js", hog)]);
    let run = invoke(&env, &dir, "{}", &["--memory", "96", "--timeout", "20000"]);
    run.expect_code(1);
    assert_eq!(run.error()["kind"], "out_of_memory", "{run}");

    // Processes: forking past the pids limit fails inside the function.
    let forker = r#"const { spawn } = require('child_process');
exports.main = async () => {
  const kids = [];
  let error = null;
  for (let i = 0; i < 40 && error === null; i++) {
    try {
      const kid = spawn('/bin/sleep', ['30'], { stdio: 'ignore' });
      await new Promise((ok, no) => { kid.once('spawn', ok); kid.once('error', no); });
      kids.push(kid);
    } catch (e) {
      error = e.code || e.message;
    }
  }
  for (const kid of kids) kid.kill('SIGKILL');
  return { started: kids.length, error };
};
"#;
    let dir = env.function("forker", &[("index.js", forker)]);
    let run = invoke(&env, &dir, "{}", &["--pids", "16", "--timeout", "20000"]);
    run.success();
    let v = run.json();
    assert!(v["started"].as_u64().unwrap() < 16, "{run}");
    assert_eq!(v["error"], "EAGAIN", "{run}");
}

/// What a Node.js function sees of its sandbox.
const PROBE_JS: &str = r#"const fs = require('fs');
function tryWrite(p) {
  try { fs.writeFileSync(p, 'sprout'); return 'ok'; } catch (e) { return e.code; }
}
exports.main = () => {
  const status = {};
  for (const line of fs.readFileSync('/proc/self/status', 'utf8').split('\n')) {
    const [k, v] = line.split(':');
    if (['CapEff', 'NoNewPrivs', 'Seccomp'].includes(k)) status[k] = v.trim();
  }
  return {
    uid: process.getuid(),
    pid: process.pid,
    pid1: fs.readFileSync('/proc/1/cmdline', 'utf8').split('\0')[0],
    status,
    ifaces: fs.readFileSync('/proc/net/dev', 'utf8').split('\n').slice(2).filter((l) => l.includes(':')).map((l) => l.split(':')[0].trim()),
    writes: { root: tryWrite('/sprout-probe'), usr: tryWrite('/usr/sprout-probe'), tmp: tryWrite('/tmp/sprout-probe'), runtime: tryWrite('/.sprout/nodejs/sprout.js') },
    cwd: process.cwd(),
    env: Object.keys(process.env).sort(),
  };
};
"#;

#[test]
fn a_node_function_is_isolated() {
    let env = require_root!();
    let dir = env.function("probe", &[("index.js", PROBE_JS)]);
    let run = invoke(&env, &dir, "{}", &[]);
    run.success();
    let p = run.json();
    assert_ne!(p["uid"], 0, "{p}");
    assert!(p["pid"].as_u64().unwrap() < 10, "{p}");
    assert_eq!(p["pid1"], "/.sprout/shim", "{p}");
    assert_eq!(
        p["status"],
        json!({"CapEff": "0000000000000000", "NoNewPrivs": "1", "Seccomp": "2"}),
        "{p}"
    );
    assert_eq!(p["ifaces"], json!(["lo"]), "{p}");
    assert_eq!(p["writes"]["root"], "EROFS", "{p}");
    assert_eq!(p["writes"]["usr"], "EROFS", "{p}");
    assert_eq!(p["writes"]["runtime"], "EROFS", "{p}");
    assert_eq!(p["writes"]["tmp"], "ok", "{p}");
    assert_eq!(p["cwd"], "/code", "{p}");
    for name in p["env"].as_array().unwrap() {
        let name = name.as_str().unwrap();
        assert!(
            ["PATH", "HOME", "LANG"].contains(&name) || name.starts_with("SPROUT_"),
            "node's environment is clean, has {name}: {p}"
        );
    }
}

#[test]
fn a_node_sandbox_is_frozen_when_idle_and_thawed_by_an_invoke() {
    let env = require_root!();
    let d = env.daemon_with(&["--stem-cells", "0", "--pause-grace", "500"]);
    let code =
        "let n = 0;\nexports.main = () => ({n: ++n, sandbox: process.env.SPROUT_SANDBOX});\n";
    register(
        &d,
        "counter",
        &env.function("counter", &[("index.js", code)]),
        json!({}),
    );
    let r = d.invoke("counter", "{}");
    assert_eq!(r.status, 200, "{}", text(&r));
    let v = body_json(&r);
    assert_eq!(v["n"], 1, "{v}");
    let sandbox = v["sandbox"].as_str().unwrap().to_owned();
    let frozen = wait_for(Duration::from_secs(10), || {
        let s = d.status();
        if s["frozen"].as_u64() >= Some(1) {
            Ok(())
        } else {
            Err(s)
        }
    });
    frozen.unwrap_or_else(|s| panic!("the idle Node.js sandbox was not frozen: {s}"));
    let started = Instant::now();
    let r = d.invoke("counter", "{}");
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.header("X-Sprout-Start"), Some("thawed"), "{}", text(&r));
    let v = body_json(&r);
    assert_eq!(v["n"], 2, "the same (warm) instance answers: {v}");
    assert_eq!(v["sandbox"], sandbox.as_str(), "{v}");
    eprintln!("thawed invoke took {:?}", started.elapsed());
}

/// Errors a Node.js function can make that the runtime must bound or survive.
const BOUNDED_JS: &str = r#"const sprout = require('sprout');
let n = 0;
exports.main = async (p) => {
  n += 1;
  switch (p.what) {
    case 'long': throw new Error('x'.repeat(200000));
    case 'surrogate': throw new Error('\ud800');
    case 'huge-object': throw { big: 'y'.repeat(1 << 20), n };
    case 'huge-error': throw { name: 'N'.repeat(100000), message: 'm'.repeat(100000), stack: 'at line\n'.repeat(p.lines) };
    case 'names': {
      const out = {};
      for (const [key, name] of [['lone', 'fn\ud800'], ['long', 'f'.repeat(1025)]]) {
        try {
          await sprout.call(name, 1);
          out[key] = 'called';
        } catch (e) {
          out[key] = { name: e.name, message: e.message };
        }
      }
      return out;
    }
    default: return { n };
  }
};
"#;

#[test]
fn huge_and_malformed_errors_are_bounded_and_the_instance_stays_warm() {
    let env = require_root!();
    let d = env.daemon();
    register(
        &d,
        "bounded",
        &env.function("bounded", &[("index.js", BOUNDED_JS)]),
        json!({}),
    );
    let ok = |n: u64| {
        let r = d.invoke("bounded", "{}");
        assert_eq!(r.status, 200, "{}", text(&r));
        assert_eq!(
            body_json(&r),
            json!({ "n": n }),
            "the same warm instance answers"
        );
    };
    let failed = |what: &str| -> Value {
        let started = Instant::now();
        let r = d.invoke("bounded", &format!(r#"{{"what":"{what}","lines":9000}}"#));
        assert!(started.elapsed() < Duration::from_secs(20), "{what}");
        let body = body_json(&r);
        assert_eq!(body["error"]["kind"], "handler_error", "{what}: {body}");
        body["error"].clone()
    };
    ok(1);

    // A 200 000-character message is cut, and the instance goes on.
    let e = failed("long");
    assert_eq!(e["type"], "Error", "{e}");
    let message = e["message"].as_str().unwrap();
    assert!(message.ends_with("... (truncated)"), "{message:.80}");
    assert!(message.len() < 64 << 10, "{}", message.len());
    ok(3);

    // A lone surrogate is not text the host can read: made well-formed, not a death.
    let e = failed("surrogate");
    assert_eq!(e["type"], "Error", "{e}");
    assert!(
        e["message"].as_str().unwrap().ends_with("Error: \u{fffd}"),
        "{e}"
    );
    ok(5);

    // A thrown object whose JSON is huge, and an error-like object huge in every
    // part: reported within the bounds, not hung.
    let e = failed("huge-object");
    let message = e["message"].as_str().unwrap();
    assert!(message.contains("{\"big\":\"yyy"), "{message:.80}");
    assert!(message.ends_with("... (truncated)"), "{message:.80}");
    let e = failed("huge-error");
    let all = e.to_string();
    let size: usize = ["type", "message", "traceback"]
        .iter()
        .map(|k| e[*k].as_str().unwrap().len())
        .sum();
    // 64 KiB as the runtime's JSON; the agent's message names the function too.
    assert!(size <= 64 << 10, "{size}");
    assert!(
        e["traceback"].as_str().unwrap().contains("... (truncated)"),
        "{all:.80}"
    );
    assert!(e["type"].as_str().unwrap().starts_with("NNN"), "{all:.80}");
    assert!(e["type"].as_str().unwrap().len() < 300, "{all:.80}");
    ok(8);

    // A call's function name must be well-formed text of at most 1024 characters.
    let r = d.invoke("bounded", r#"{"what":"names"}"#);
    assert_eq!(r.status, 200, "{}", text(&r));
    let v = body_json(&r);
    for key in ["lone", "long"] {
        assert_eq!(v[key]["name"], "TypeError", "{key}: {v}");
        assert!(
            v[key]["message"]
                .as_str()
                .unwrap()
                .contains("well-formed text of at most 1024 characters"),
            "{key}: {v}"
        );
    }
    ok(10);
}

/// A stack of 100 000 lines is cut to what fits in one pass: a loop that dropped two
/// lines per `JSON.stringify` of the whole error took 15 s for 20 000 lines and far
/// past the invocation's timeout for 100 000.
#[test]
fn an_error_with_a_huge_stack_is_bounded_in_time() {
    let env = require_root!();
    let d = env.daemon();
    register(
        &d,
        "bounded",
        &env.function("bounded", &[("index.js", BOUNDED_JS)]),
        json!({}),
    );
    let started = Instant::now();
    let r = d.invoke("bounded", r#"{"what":"huge-error","lines":100000}"#);
    let body = body_json(&r);
    assert_eq!(body["error"]["kind"], "handler_error", "{body:.300}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// A Node.js caller's calls in its sandbox go on a direct channel to their callee, as
/// a Python caller's do: two calls at once run in two instances (one on the channel,
/// one through the shim; a shim-only caller sends one at a time and reuses one), and
/// a callee past its time is killed and replaced.
#[test]
fn node_calls_in_its_sandbox_go_direct_and_a_stuck_callee_is_replaced() {
    let env = require_root!();
    let d = env.daemon();
    let callee = r#"exports.main = async (x) => {
  if (x === 'slow') await new Promise((r) => setTimeout(r, 300));
  if (x === 'hang') { const t = Date.now(); while (Date.now() - t < 60000) {} }
  if (x === 'die') process.exit(3);
  return process.pid;
};
"#;
    let caller = r#"const sprout = require('sprout');
exports.main = async () => {
  const out = {pids: []};
  for (let i = 0; i < 3; i++) out.pids.push(await sprout.call('tick', 'ok'));
  out.both = await Promise.all([sprout.call('tick', 'slow'), sprout.call('tick', 'slow')]);
  for (const what of ['hang', 'die']) {
    try {
      await sprout.call('tick', what);
    } catch (err) {
      out[what] = err.message;
    }
    out[what + '_then'] = await sprout.call('tick', 'ok');
  }
  return out;
};
"#;
    register(
        &d,
        "tick",
        &env.function("tick", &[("index.js", callee)]),
        json!({"timeout_ms": 1000}),
    );
    register(
        &d,
        "caller",
        &env.function("caller", &[("index.js", caller)]),
        json!({"timeout_ms": 20000}),
    );
    let r = d.invoke("caller", "{}");
    assert_eq!(r.status, 200, "{}", text(&r));
    let v = body_json(&r);
    let pids = v["pids"].as_array().unwrap();
    assert!(pids.iter().all(|p| p == &pids[0]), "{v}");
    assert_ne!(
        v["both"][0], v["both"][1],
        "two calls at once, two instances: {v}"
    );
    assert!(
        v["hang"]
            .as_str()
            .unwrap()
            .contains("tick timed out after 1000 ms"),
        "{v}"
    );
    assert!(v["hang_then"].is_u64(), "{v}");
    assert!(
        v["die"].as_str().unwrap().contains("died while running"),
        "{v}"
    );
    assert!(v["die_then"].is_u64(), "{v}");
    assert_eq!(d.sandboxes().len(), 1, "{:?}", d.sandboxes());
}
