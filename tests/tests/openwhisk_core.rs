//! OpenWhisk's action semantics in the core (issue 15, `Request::Activate`), in every
//! runtime, through the library [`Agent`] (the REST API and the invoker contract
//! hand it the same request): OpenWhisk's action-runtime behaviours (`compat.md`
//! A.8) that apply to a platform, the `__OW_*` environment, the result rules and
//! texts, non-blocking activations and the `wait_at_most` rule.
//!
//! The agent runs in this test process, whose pid is its agent id: one agent at a
//! time ([`ONE_AGENT`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use agent::openwhisk::Activate;
use agent::{ActivationPart, Agent, Config, FunctionSource, Request, Response};
use ipc::api::FunctionConfig;
use ipc::openwhisk::activation::WhiskActivation;
use serde_json::{json, Value};
use sprout_tests::*;

/// The agent's id is this process's pid: its cgroups and state are named by it.
static ONE_AGENT: Mutex<()> = Mutex::new(());

const NS: &str = "guest";

/// An agent of `env`, with records, `--api-host` and no stem cells.
fn start(env: &Env, api_host: Option<&str>) -> Agent {
    let target = target_dir();
    sprout_bin();
    let config = Config {
        state_root: env.state_dir().to_path_buf(),
        shim: target.join("sprout-shim"),
        spawner: Some(target.join("sprout-spawner")),
        data_dir: Some(env.work_dir().join("data")),
        package_cache: env.work_dir().join("package-cache"),
        api_host: api_host.map(str::to_owned),
        pool: agent::PoolConfig {
            stem_cells: agent::StemCells::python(0),
            ..agent::PoolConfig::default()
        },
        ..Config::new()
    };
    Agent::start(config).expect("start the agent")
}

/// Shuts `agent` down and checks it left nothing.
fn stop(env: &Env, agent: Agent) {
    agent.shutdown().expect("shut the agent down");
    env.assert_clean_within(std::process::id(), Duration::from_secs(10));
}

fn register(agent: &Agent, name: &str, dir: &Path, config: FunctionConfig) {
    let r = agent.handle(Request::RegisterFunction {
        namespace: NS.into(),
        name: name.into(),
        source: FunctionSource::Dir(dir.to_path_buf()),
        config,
    });
    assert!(r.is_ok(), "register {name}: {r:?}");
}

fn config(runtime: &str, handler: Option<&str>) -> FunctionConfig {
    FunctionConfig {
        runtime: Some(runtime.into()),
        handler: handler.map(str::to_owned),
        ..FunctionConfig::default()
    }
}

fn activation(name: &str, params: Value) -> Activate {
    Activate {
        namespace: NS.into(),
        name: name.into(),
        params,
        init_env: BTreeMap::new(),
        activation_id: None,
        transaction_id: None,
        api_key: None,
        subject: "alice".into(),
        cause: None,
        blocking: true,
        wait_at_most: None,
    }
}

/// Runs `a` (blocking) and returns its activation.
fn run(agent: &Agent, a: Activate) -> WhiskActivation {
    let name = a.name.clone();
    match agent.handle(Request::Activate(Box::new(a))) {
        Ok(Response::Activated(w)) => *w,
        other => panic!("activate {name}: {other:?}"),
    }
}

/// Runs `name` with `params` and returns its activation.
fn activate(agent: &Agent, name: &str, params: Value) -> WhiskActivation {
    run(agent, activation(name, params))
}

fn result(w: &WhiskActivation) -> Value {
    serde_json::from_str(w.response.result.as_ref().expect("a result").get()).unwrap()
}

fn annotation(w: &WhiskActivation, key: &str) -> Option<Value> {
    w.annotations
        .iter()
        .find(|a| a.key == key)
        .map(|a| a.value.clone())
}

#[track_caller]
fn assert_status(w: &WhiskActivation, status: &str, result_is: Value) {
    assert_eq!(
        (w.response.status.as_str(), result(w)),
        (status, result_is),
        "{}",
        serde_json::to_string_pretty(w).unwrap()
    );
}

#[track_caller]
fn assert_logged(w: &WhiskActivation, stream: &str, text: &str) {
    let line = format!("{stream}: {text}");
    assert!(
        w.logs.iter().any(|l| l.ends_with(&line)),
        "no {line:?} in {:?}",
        w.logs
    );
}

const PY_ECHO: &str = r#"import sys

def main(args):
    print("hello stdout")
    print("hello stderr", file=sys.stderr)
    return args

def niam(args):
    return {"entry": "niam", "args": args}
"#;

const PY_UNICODE: &str = r#"def main(args):
    d = args["delimiter"]
    s = d + " ☃ " + d
    print(s)
    return {"winter": s}
"#;

const PY_OTHERS: &str = r#"import os, sys

def scalar(args):
    return "a string"

def lists(args):
    return list(reversed(args))

def divide(args):
    return {"n": 1 / 0}

def error(args):
    return {"error": "app said no", "code": 7}

def env(args):
    return {k: v for k, v in os.environ.items() if k.startswith("__OW_") or k == "SOME_VAR"}
"#;

const NODE_ECHO: &str = r#"function main(args) {
  console.log('hello stdout');
  console.error('hello stderr');
  return args;
}
function niam(args) { return { entry: 'niam', args }; }
function unicode(args) {
  const s = args.delimiter + ' ☃ ' + args.delimiter;
  console.log(s);
  return { winter: s };
}
function scalar() { return 'a string'; }
function lists(args) { return args.slice().reverse(); }
function env() {
  const out = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (k.startsWith('__OW_') || k === 'SOME_VAR') out[k] = v;
  }
  return out;
}
function rejects() { return Promise.reject(new Error('app error')); }
async function asyncThrows() { return a.b; }
function rejectsEmpty() { return Promise.reject(); }
function throws() { throw new Error('sync error'); }
function nothing() { return; }
module.exports = { main, niam, unicode, scalar, lists, env, rejects, asyncThrows, rejectsEmpty, throws, nothing };
"#;

/// The behaviours every runtime shares: echo with logs, unicode, a 1 MiB argument,
/// a non-dictionary result, lists, a non-default entry point.
fn common_behaviours(agent: &Agent, prefix: &str, not_a_dictionary: &str) {
    let echo = format!("{prefix}-echo");
    let w = activate(agent, &echo, json!({"string": "hello"}));
    assert_status(&w, "success", json!({"string": "hello"}));
    assert!(w.response.success);
    assert_logged(&w, "stdout", "hello stdout");
    assert_logged(&w, "stderr", "hello stderr");
    assert_eq!((w.namespace.as_str(), w.subject.as_str()), (NS, "alice"));
    assert!(w.version.starts_with("0.0."), "{}", w.version);
    for params in [
        json!({"string": "❄ ☃ ❄"}),
        json!({"numbers": [42, 1]}),
        json!({"object": {"a": "A"}}),
    ] {
        assert_status(&activate(agent, &echo, params.clone()), "success", params);
    }
    // About 1 MiB, as OpenWhisk's test sends: echoed exactly.
    let big = json!({"arg": "a".repeat(1_048_561)});
    let w = activate(agent, &echo, big.clone());
    assert_eq!(result(&w), big, "the 1 MiB argument came back changed");

    let w = activate(
        agent,
        &format!("{prefix}-unicode"),
        json!({"delimiter": "❄"}),
    );
    assert_status(&w, "success", json!({"winter": "❄ ☃ ❄"}));
    assert_logged(&w, "stdout", "❄ ☃ ❄");

    let w = activate(agent, &format!("{prefix}-scalar"), json!({}));
    assert_status(
        &w,
        "action developer error",
        json!({ "error": not_a_dictionary }),
    );
    assert_eq!(w.response.status_code, 2);

    let w = activate(agent, &format!("{prefix}-lists"), json!([1, 2, 3]));
    assert_status(&w, "success", json!([3, 2, 1]));

    let w = activate(agent, &format!("{prefix}-niam"), json!({"string": "hello"}));
    assert_status(
        &w,
        "success",
        json!({"entry": "niam", "args": {"string": "hello"}}),
    );

    // Not an object or an array: refused, naming what it is.
    let e = agent
        .handle(Request::Activate(Box::new(activation(
            &echo,
            json!("text"),
        ))))
        .unwrap_err();
    assert_eq!(e.kind(), agent::ErrorKind::BadRequest);
    assert!(
        ipc::chain(&e).contains("the parameters are a string"),
        "{}",
        ipc::chain(&e)
    );
}

/// Every `__OW_*` variable reads back with its exact value, and is gone for
/// sprout's own invoke of the same warm instance.
fn environment(agent: &Agent, name: &str) {
    let ow_name = agent::to_openwhisk(name);
    let mut a = activation(name, json!({}));
    a.api_key = Some("23bc46b1-71f6-4ed5-8c54-816aa4f8c502:123zO3xZCLrMN6v2".into());
    a.transaction_id = Some("tid-1".into());
    a.init_env = BTreeMap::from([("SOME_VAR".to_owned(), "xyz".to_owned())]);
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let w = run(agent, a);
    let env = result(&w);
    assert_eq!(env["__OW_API_HOST"], "https://ow.example:8443", "{env}");
    assert_eq!(
        env["__OW_API_KEY"],
        "23bc46b1-71f6-4ed5-8c54-816aa4f8c502:123zO3xZCLrMN6v2"
    );
    assert_eq!(env["__OW_NAMESPACE"], NS);
    assert_eq!(env["__OW_ACTION_NAME"], format!("/{NS}/{ow_name}"));
    // `0.0.N` for the function's registration N: the activation's version.
    assert_eq!(env["__OW_ACTION_VERSION"], w.version.as_str());
    assert!(w.version.starts_with("0.0."), "{}", w.version);
    assert_eq!(env["__OW_ACTIVATION_ID"], w.activation_id.to_string());
    assert_eq!(env["__OW_TRANSACTION_ID"], "tid-1");
    assert_eq!(env["SOME_VAR"], "xyz");
    let deadline: u64 = env["__OW_DEADLINE"].as_str().unwrap().parse().unwrap();
    // The function's default timeout from the moment it began.
    assert!(
        deadline > before && deadline <= before + 120_000,
        "deadline {deadline} vs {before}"
    );
    // Without a key the variable is not there; the transaction id is the activation's.
    let w = activate(agent, name, json!({}));
    let env = result(&w);
    assert!(env.get("__OW_API_KEY").is_none(), "{env}");
    assert!(env.get("SOME_VAR").is_none(), "{env}");
    assert_eq!(env["__OW_TRANSACTION_ID"], w.activation_id.to_string());
    // sprout's own invoke of the same (warm) instance sees none of it.
    let own = match agent.handle(Request::Invoke {
        namespace: NS.into(),
        name: name.into(),
        event: b"{}".to_vec(),
        activation_id: None,
        blocking: true,
    }) {
        Ok(Response::Invoked(inv)) => serde_json::from_slice::<Value>(&inv.result).unwrap(),
        other => panic!("invoke {name}: {other:?}"),
    };
    assert_eq!(
        own,
        json!({}),
        "sprout's own invoke saw OpenWhisk's variables"
    );
}

/// A blocking activation of a warm instance without a wait limit takes the event
/// loop's warm path (`Handle::start_fast`), with its environment and its record.
fn warm_fast_path(agent: &Agent, name: &str) {
    use agent::transport::{FastPoll, Handle};
    let mut a = activation(name, json!({}));
    a.api_key = Some("k:fast".into());
    let req = Request::Activate(Box::new(a));
    let mut call = Handle::start_fast(agent, &req).expect("a warm activation takes the warm path");
    let started = Instant::now();
    let answer = loop {
        match call.poll() {
            FastPoll::Pending => {
                assert!(started.elapsed() < Duration::from_secs(30), "no answer");
                std::thread::sleep(Duration::from_millis(1));
            }
            FastPoll::Done(answer) => break answer,
            FastPoll::Handoff => break call.finish(),
        }
    };
    let Ok(Response::Activated(w)) = answer else {
        panic!("fast activation: {answer:?}");
    };
    let env = result(&w);
    assert_eq!(env["__OW_API_KEY"], "k:fast", "{env}");
    assert_eq!(env["__OW_ACTIVATION_ID"], w.activation_id.to_string());
    assert_eq!(annotation(&w, "waitTime").map(|v| v.is_u64()), Some(true));
    // Its record is the one answered.
    let stored = record_of(agent, w.activation_id);
    assert_eq!(stored.subject.as_deref(), Some("alice"));
    assert_eq!(
        stored.result.as_ref().unwrap().get(),
        w.response.result.as_ref().unwrap().get()
    );
    // With a wait limit it does not (it may have to be answered before it ends).
    let mut a = activation(name, json!({}));
    a.wait_at_most = Some(Duration::from_secs(60));
    assert!(Handle::start_fast(agent, &Request::Activate(Box::new(a))).is_none());
}

#[test]
fn python_actions_follow_openwhisks_semantics() {
    let env = require_root!();
    let _one = ONE_AGENT.lock().unwrap_or_else(|e| e.into_inner());
    let agent = start(&env, Some("https://ow.example:8443"));
    let echo = env.function("py-echo", &[("main.py", PY_ECHO)]);
    let unicode = env.function("py-unicode", &[("main.py", PY_UNICODE)]);
    let others = env.function("py-others", &[("main.py", PY_OTHERS)]);
    register(
        &agent,
        "py-echo",
        &echo,
        config("python", Some("main:main")),
    );
    register(
        &agent,
        "py-niam",
        &echo,
        config("python", Some("main:niam")),
    );
    register(
        &agent,
        "py-unicode",
        &unicode,
        config("python", Some("main:main")),
    );
    for f in ["scalar", "lists", "divide", "error"] {
        register(
            &agent,
            &format!("py-{f}"),
            &others,
            config("python", Some(&format!("main:{f}"))),
        );
    }
    register(
        &agent,
        "pkg~2fpy-env",
        &others,
        config("python", Some("main:env")),
    );

    common_behaviours(
        &agent,
        "py",
        "The action did not return a dictionary or array.",
    );
    environment(&agent, "pkg~2fpy-env");
    warm_fast_path(&agent, "pkg~2fpy-env");

    // An exception: an application error `{"error": str(ex)}`, its traceback in stderr.
    let w = activate(&agent, "py-divide", json!({}));
    assert_status(
        &w,
        "application error",
        json!({"error": "division by zero"}),
    );
    assert!(
        w.logs.iter().any(|l| l.contains("stderr: Traceback")),
        "{:?}",
        w.logs
    );
    assert!(
        w.logs.iter().any(|l| l.contains("ZeroDivisionError")),
        "{:?}",
        w.logs
    );
    // A result with an `error` key: an application error, the whole object kept.
    let w = activate(&agent, "py-error", json!({}));
    assert_status(
        &w,
        "application error",
        json!({"error": "app said no", "code": 7}),
    );
    assert_eq!(w.response.status_code, 1);
    assert_eq!(annotation(&w, "kind"), Some(json!("python:3")));
    assert_eq!(
        annotation(&w, "path"),
        Some(json!(format!("{NS}/py-error")))
    );
    stop(&env, agent);
}

#[test]
fn nodejs_actions_follow_openwhisks_semantics() {
    let env = require_root!();
    let _one = ONE_AGENT.lock().unwrap_or_else(|e| e.into_inner());
    let agent = start(&env, Some("https://ow.example:8443"));
    let dir = env.function("node", &[("index.js", NODE_ECHO)]);
    for (name, f) in [
        ("node-echo", "main"),
        ("node-niam", "niam"),
        ("node-unicode", "unicode"),
        ("node-scalar", "scalar"),
        ("node-lists", "lists"),
        ("pkg~2fnode-env", "env"),
        ("node-rejects", "rejects"),
        ("node-async-throws", "asyncThrows"),
        ("node-rejects-empty", "rejectsEmpty"),
        ("node-throws", "throws"),
        ("node-nothing", "nothing"),
    ] {
        register(
            &agent,
            name,
            &dir,
            config("nodejs", Some(&format!("index.{f}"))),
        );
    }
    common_behaviours(&agent, "node", "The action did not return a dictionary.");
    environment(&agent, "pkg~2fnode-env");
    warm_fast_path(&agent, "pkg~2fnode-env");

    // A rejected promise: an application error, the reason serialised.
    let w = activate(&agent, "node-rejects", json!({}));
    assert_eq!(w.response.status, "application error");
    let error = &result(&w)["error"];
    assert_eq!(
        (&error["name"], &error["message"]),
        (&json!("Error"), &json!("app error"))
    );
    assert!(
        error["stack"]
            .as_str()
            .unwrap()
            .contains("Error: app error"),
        "{error}"
    );
    let w = activate(&agent, "node-async-throws", json!({}));
    assert_eq!(w.response.status, "application error");
    assert!(
        result(&w)["error"]["stack"]
            .as_str()
            .unwrap()
            .contains("ReferenceError: a is not defined"),
        "{}",
        result(&w)
    );
    assert_status(
        &activate(&agent, "node-rejects-empty", json!({})),
        "application error",
        json!({"error": {}}),
    );
    // A synchronous throw: a developer error in OpenWhisk's words.
    assert_status(
        &activate(&agent, "node-throws", json!({})),
        "action developer error",
        json!({"error": "An error has occurred: Error: sync error"}),
    );
    // `return;` is `{}`.
    assert_status(
        &activate(&agent, "node-nothing", json!({})),
        "success",
        json!({}),
    );
    assert_eq!(
        annotation(&activate(&agent, "node-nothing", json!({})), "kind"),
        Some(json!("nodejs:20"))
    );
    stop(&env, agent);
}

const ACTIONLOOP: &str = r#"#!/bin/sh
while read -r line; do
  printf '{"line":%s,"name":"%s"}\n' "$line" "$__OW_ACTION_NAME" >&3
done
"#;

#[test]
fn native_actionloop_gets_openwhisks_run_fields() {
    let env = require_root!();
    let _one = ONE_AGENT.lock().unwrap_or_else(|e| e.into_inner());
    let agent = start(&env, Some("https://ow.example:8443"));
    let dir = env.function("native", &[]);
    let script = dir.join("exec.source");
    std::fs::write(&script, ACTIONLOOP).unwrap();
    let installed = std::process::Command::new("install")
        .args(["-m", "0755"])
        .arg(&script)
        .arg(dir.join("exec"))
        .status()
        .unwrap();
    assert!(installed.success());
    register(&agent, "native", &dir, config("native", Some("exec")));
    let mut a = activation("native", json!({"a": 1}));
    a.api_key = Some("k:s".into());
    a.transaction_id = Some("tid-9".into());
    let w = run(&agent, a);
    assert_eq!(w.response.status, "success");
    let line = &result(&w)["line"];
    assert_eq!(line["value"], json!({"a": 1}));
    assert_eq!(line["api_key"], "k:s");
    assert_eq!(line["api_host"], "https://ow.example:8443");
    assert_eq!(line["namespace"], NS);
    assert_eq!(line["action_name"], format!("/{NS}/native"));
    assert_eq!(line["action_version"], w.version.as_str());
    assert_eq!(line["activation_id"], w.activation_id.to_string());
    assert_eq!(line["transaction_id"], "tid-9");
    assert!(
        line["deadline"].as_str().unwrap().parse::<u64>().is_ok(),
        "{line}"
    );
    assert_eq!(annotation(&w, "kind"), Some(json!("blackbox")));
    stop(&env, agent);
}

const PY_FAILS: &str = r#"import os, time

def sleep(args):
    time.sleep(30)
    return {}

def hog(args):
    chunks = []
    while True:
        chunks.append(bytearray(16 << 20))

def crash(args):
    os._exit(3)
"#;

const NODE_FAILS: &str = r#"exports.sleep = () => new Promise((r) => setTimeout(() => r({}), 30000));
exports.hog = () => { const a = []; for (;;) a.push(Buffer.alloc(16 << 20, 1)); };
exports.crash = () => { process.exit(3); };
"#;

#[test]
fn timeouts_memory_and_crashes_read_with_openwhisks_texts() {
    let env = require_root!();
    let _one = ONE_AGENT.lock().unwrap_or_else(|e| e.into_inner());
    let agent = start(&env, None);
    let py = env.function("py-fails", &[("main.py", PY_FAILS)]);
    let node = env.function("node-fails", &[("index.js", NODE_FAILS)]);
    let broken = env.function(
        "py-broken",
        &[(
            "main.py",
            "import iamnotsupported\n\ndef main(a):\n    return a\n",
        )],
    );
    for (runtime, dir, handler) in [("python", &py, "main:"), ("nodejs", &node, "index.")] {
        for f in ["sleep", "hog", "crash"] {
            let mut c = config(runtime, Some(&format!("{handler}{f}")));
            c.timeout_ms = Some(1000);
            c.memory_mb = Some(128);
            register(&agent, &format!("{runtime}-{f}"), dir, c);
        }
    }
    register(
        &agent,
        "py-broken",
        &broken,
        config("python", Some("main:main")),
    );
    for runtime in ["python", "nodejs"] {
        let w = activate(&agent, &format!("{runtime}-sleep"), json!({}));
        assert_status(
            &w,
            "action developer error",
            json!({"error": "The action exceeded its time limits of 1000 milliseconds."}),
        );
        assert_eq!(annotation(&w, "timeout"), Some(json!(true)));
        let w = activate(&agent, &format!("{runtime}-hog"), json!({}));
        assert_status(
            &w,
            "action developer error",
            json!({"error": "The action exhausted its memory and was aborted."}),
        );
        assert_eq!(annotation(&w, "timeout"), Some(json!(false)));
        let w = activate(&agent, &format!("{runtime}-crash"), json!({}));
        assert_status(
            &w,
            "action developer error",
            json!({"error": "The action did not produce a valid response and exited unexpectedly."}),
        );
    }
    // A failed load: OpenWhisk's failed init, the detail in the logs.
    let w = activate(&agent, "py-broken", json!({}));
    assert_status(
        &w,
        "action developer error",
        json!({"error": "Cannot start action. Check logs for details."}),
    );
    assert!(
        w.logs
            .iter()
            .any(|l| l.contains("stderr: ModuleNotFoundError")),
        "{:?}",
        w.logs
    );
    stop(&env, agent);
}

const PY_SLOW: &str = r#"import time

def main(args):
    time.sleep(args.get("sleep", 0))
    return {"slept": args.get("sleep", 0)}
"#;

/// The finished record of `id`, once there.
fn record_of(agent: &Agent, id: ipc::api::ActivationId) -> ipc::api::ActivationRecord {
    let found = wait_for(Duration::from_secs(30), || {
        agent.flush_records().unwrap();
        match agent.handle(Request::GetActivation {
            namespace: Some(NS.into()),
            id,
            part: ActivationPart::Record,
        }) {
            Ok(Response::Activation(r)) => Ok(*r),
            other => Err(format!("{other:?}")),
        }
    });
    found.unwrap_or_else(|e| panic!("no record of {id}: {e}"))
}

#[test]
fn non_blocking_and_long_activations_are_accepted_and_recorded() {
    let env = require_root!();
    let _one = ONE_AGENT.lock().unwrap_or_else(|e| e.into_inner());
    let agent = start(&env, None);
    let dir = env.function("py-slow", &[("main.py", PY_SLOW)]);
    register(&agent, "slow", &dir, config("python", Some("main:main")));

    // Non-blocking: accepted, then its record, OpenWhisk's kind and subject kept.
    let mut a = activation("slow", json!({"sleep": 0}));
    a.blocking = false;
    a.subject = "bob".into();
    let id = match agent.handle(Request::Activate(Box::new(a))) {
        Ok(Response::Accepted(id)) => id,
        other => panic!("non-blocking: {other:?}"),
    };
    let record = record_of(&agent, id);
    assert_eq!(record.result.as_ref().unwrap().get(), r#"{"slept":0}"#);
    assert!(!record.blocking);
    assert_eq!(
        (record.kind.as_deref(), record.subject.as_deref()),
        (Some("python:3"), Some("bob"))
    );
    let w = agent::openwhisk::activation::whisk_activation(&record, "python:3", "bob");
    assert_eq!(
        (w.response.status.as_str(), w.subject.as_str()),
        ("success", "bob")
    );

    // A non-blocking activation's failure has OpenWhisk's text too.
    let mut a = activation("slow", json!({"sleep": "not a number"}));
    a.blocking = false;
    let Ok(Response::Accepted(failed)) = agent.handle(Request::Activate(Box::new(a))) else {
        panic!("not accepted");
    };
    let record = record_of(&agent, failed);
    assert_eq!(record.status, ipc::api::ActivationStatus::ApplicationError);
    assert!(
        record
            .result
            .as_ref()
            .unwrap()
            .get()
            .starts_with("{\"error\":\""),
        "{:?}",
        record.result
    );

    // Still running after `wait_at_most`: accepted, and it finishes with its record.
    let mut a = activation("slow", json!({"sleep": 2}));
    a.wait_at_most = Some(Duration::from_millis(300));
    let asked = Instant::now();
    let id = match agent.handle(Request::Activate(Box::new(a))) {
        Ok(Response::Accepted(id)) => id,
        other => panic!("wait_at_most: {other:?}"),
    };
    assert!(
        asked.elapsed() < Duration::from_millis(1500),
        "{:?}",
        asked.elapsed()
    );
    let record = record_of(&agent, id);
    assert_eq!(record.result.as_ref().unwrap().get(), r#"{"slept":2}"#);
    assert!(record.duration >= 2000, "{}", record.duration);
    // One that ends in time is answered whole.
    let mut a = activation("slow", json!({"sleep": 0}));
    a.wait_at_most = Some(Duration::from_secs(30));
    let w = run(&agent, a);
    assert_status(&w, "success", json!({"slept": 0}));
    // The record read later is the one answered.
    let stored = record_of(&agent, w.activation_id);
    let again = agent::openwhisk::activation::whisk_activation(&stored, "python:3", "alice");
    assert_eq!(
        serde_json::to_value(&again).unwrap(),
        serde_json::to_value(&w).unwrap()
    );
    stop(&env, agent);
}
