//! "The host's mount table never changes": every mount sprout makes (a function's
//! code at `/code` of a stem cell, a callee's code at `/fns/...`, a sibling's
//! `/workflow` attached, detached and replaced, a declarative run's own scratch) is
//! made inside a sandbox's mount namespace. The host's whole table, as this process
//! and other host processes see it, is compared line by line before, during and
//! after each of them — not only searched for the word "sprout", which a tmpfs on a
//! host `/workflow` or a function directory on a host `/code` would not contain.

use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use sprout_tests::{
    body_json, json, mountinfo, require_root, text, wait_for, Daemon, Env, KillOnDrop,
};

/// The host's mount tables to watch: this test process's, the daemon's (the agent
/// runs on the host), a separate host process's, and PID 1's when it may be read.
struct HostTables {
    pids: Vec<u32>,
    before: Vec<String>,
}

impl HostTables {
    fn snapshot(pids: Vec<u32>) -> HostTables {
        let before = pids.iter().map(|&p| read(p)).collect();
        HostTables { pids, before }
    }

    /// Panics, naming the process and the lines, if any table differs from the
    /// snapshot.
    #[track_caller]
    fn assert_unchanged(&self, when: &str) {
        for (pid, before) in self.pids.iter().zip(&self.before) {
            let now = read(*pid);
            if &now != before {
                let added: Vec<&str> = now.lines().filter(|l| !before.contains(l)).collect();
                let removed: Vec<&str> = before.lines().filter(|l| !now.contains(l)).collect();
                panic!(
                    "{when}: the mount table of host process {pid} changed\n  added: {added:#?}\n  removed: {removed:#?}"
                );
            }
        }
    }
}

fn read(pid: u32) -> String {
    mountinfo(pid).unwrap_or_else(|| panic!("read /proc/{pid}/mountinfo"))
}

/// Runs `f` on another thread while comparing the host's tables over and over; the
/// comparisons see the mounts sprout makes while they exist.
#[track_caller]
fn watching<T: Send + 'static>(
    tables: &HostTables,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let job = thread::spawn(f);
    let mut looks = 0;
    while !job.is_finished() {
        tables.assert_unchanged(&format!("during {what}"));
        looks += 1;
        thread::sleep(Duration::from_millis(2));
    }
    let out = job.join().expect("the watched job panicked");
    tables.assert_unchanged(&format!("after {what} ({looks} looks during it)"));
    out
}

fn register(d: &Daemon, env: &Env, name: &str, code: &str) {
    let dir = env.function(name, &[("f.py", code)]);
    d.register(name, &dir, json!({}));
}

/// Sleeps a little so the watcher sees its mounts in place; returns what it read.
const CALLEE_PY: &str = r#"import os, time
def f(event):
    time.sleep(0.3)
    return {"code": sorted(os.listdir("/code")), "event": event}
"#;

/// Reads the file its caller wrote into the shared scratch (so the caller's
/// `/workflow` was really attached here), after a pause for the watcher.
const SIBLING_PY: &str = r#"import os, time
def f(name):
    time.sleep(0.3)
    with open(os.path.join(os.environ["SPROUT_WORKFLOW_DIR"], name)) as src:
        return {"read": src.read(), "sandbox": os.environ["SPROUT_SANDBOX"]}
"#;

/// Calls `callee` in its own sandbox (`/fns` attach) and `sibling` in two siblings
/// (`/workflow` attached there, detached after; its own scratch replaced at the end).
const CALLER_PY: &str = r#"import os, sprout
def f(event):
    d = os.environ["SPROUT_WORKFLOW_DIR"]
    with open(os.path.join(d, "note"), "w") as out:
        out.write("from the caller")
    local = sprout.call("callee", {"n": 1})
    siblings = sprout.map("sibling", ["note", "note"])
    return {"local": local, "siblings": siblings, "mine": os.environ["SPROUT_SANDBOX"],
            "fns": sorted(os.listdir("/fns"))}
"#;

#[test]
fn the_host_mount_table_never_changes() {
    let env = require_root!();
    // A host process of the test's own that only sleeps.
    let bystander = KillOnDrop::spawn(
        Command::new("sleep")
            .arg("600")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let mut pids = vec![std::process::id(), bystander.pid()];
    if mountinfo(1).is_some() {
        pids.push(1);
    }
    let host = HostTables::snapshot(pids.clone());

    // One stem cell: the first invoke attaches the caller's code into it at /code.
    let d = env.daemon_with(&["--stem-cells", "1", "--pause-grace", "20"]);
    host.assert_unchanged("after the daemon started with a stem cell");
    assert_eq!(
        read(d.pid()),
        host.before[0],
        "the agent sees the host's table"
    );
    let tables = HostTables::snapshot(pids.into_iter().chain([d.pid()]).collect());
    wait_for(Duration::from_secs(15), || {
        let s = d.status();
        (s["stem_cells"] == 1 && s["frozen"] == 1)
            .then_some(())
            .ok_or(s)
    })
    .unwrap_or_else(|s| panic!("the stem cell is not ready: {s}; log:\n{}", d.log()));
    register(&d, &env, "callee", CALLEE_PY);
    register(&d, &env, "sibling", SIBLING_PY);
    register(&d, &env, "caller", CALLER_PY);

    let socket = d.socket().to_path_buf();
    let invoke = move || {
        sprout_tests::Client::connect(&socket)
            .and_then(|mut c| {
                c.request(
                    "POST",
                    "/functions/caller/invoke",
                    Some("application/json"),
                    b"{}",
                )
            })
            .map_err(|e| ipc::chain(&e))
    };
    for round in 0..2 {
        let r = watching(
            &tables,
            &format!("a call-making invoke (round {round})"),
            invoke.clone(),
        )
        .unwrap_or_else(|e| panic!("invoke caller: {e}; log:\n{}", d.log()));
        assert_eq!(r.status, 200, "{}", text(&r));
        if round == 0 {
            assert_eq!(r.header("X-Sprout-Start"), Some("stem_cell"), "{r:?}");
        }
        let v = body_json(&r);
        // The attaches really happened, where the host does not see them.
        assert_eq!(v["local"]["code"], json!(["f.py"]), "{v}");
        assert!(
            v["fns"].as_array().is_some_and(|f| f
                .iter()
                .any(|e| e.as_str().is_some_and(|e| e.starts_with("callee-")))),
            "the callee's code is attached under /fns: {v}"
        );
        for s in v["siblings"].as_array().unwrap() {
            assert_eq!(s["read"], "from the caller", "{v}");
            assert_ne!(s["sandbox"], v["mine"], "{v}");
        }
    }

    // A declarative run: a scratch of its own, attached to a sequence's sandbox and
    // to each parallel branch's, detached after.
    let doc = json!({"steps": [
        {"type": "task", "function": "callee"},
        {"type": "parallel", "branches": [
            {"type": "task", "function": "callee"},
            {"type": "task", "function": "callee"}
        ]}
    ]});
    let r = d.request(
        "PUT",
        "/workflows/wf",
        Some("application/json"),
        doc.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    let socket = d.socket().to_path_buf();
    let r = watching(&tables, "a declarative workflow run", move || {
        sprout_tests::Client::connect(&socket)
            .and_then(|mut c| {
                c.request(
                    "POST",
                    "/workflows/wf/invoke",
                    Some("application/json"),
                    b"{}",
                )
            })
            .map_err(|e| ipc::chain(&e))
    })
    .unwrap_or_else(|e| panic!("run the workflow: {e}"));
    assert_eq!(r.status, 200, "{}", text(&r));

    // Idle instances freeze, then everything is torn down.
    wait_for(Duration::from_secs(10), || {
        let s = d.status();
        (s["frozen"].as_u64() >= Some(2) && s["frozen"] == s["sandboxes"])
            .then_some(())
            .ok_or(s)
    })
    .unwrap_or_else(|s| panic!("the idle sandboxes did not freeze: {s}"));
    tables.assert_unchanged("with frozen idle instances");
    drop(d);
    host.assert_unchanged("after the daemon shut down");
}
