//! A controller that already runs threads embeds the agent (issue 9, finding 5): the
//! spawner is executed, not forked, so `Agent::start` works from any thread, and the
//! `sprout-spawner` executable is found from a test binary in `target/<profile>/deps`.
//! Needs root (sandboxes); skipped without it, a failure under `CI`.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use agent::{Agent, Config, FunctionSource, Request, Response};

/// `target/<profile>/`, from this test binary in `target/<profile>/deps/`.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .to_path_buf()
}

fn threads() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:").map(|v| v.trim().parse().ok()))
        })
        .flatten()
        .unwrap_or(0)
}

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false" | "no"))
}

#[test]
fn an_agent_starts_in_a_process_that_already_runs_threads() {
    let reason = if !nix::unistd::Uid::effective().is_root() {
        Some("not running as root: sandboxes need root")
    } else if !Path::new("/usr/bin/python3").is_file() {
        Some("/usr/bin/python3 is missing")
    } else if !target_dir().join("sprout-shim").is_file() {
        Some("sprout-shim is not built: run `cargo build --workspace` first")
    } else {
        None
    };
    if let Some(reason) = reason {
        assert!(!under_ci(), "cannot run: {reason} (CI is set)");
        eprintln!("*** SKIPPED: {reason}");
        return;
    }
    // The controller's own threads, running while the agent starts.
    let (stop, parked) = mpsc::channel::<()>();
    let parked = std::sync::Arc::new(std::sync::Mutex::new(parked));
    let busy: Vec<_> = (0..4)
        .map(|_| {
            let parked = parked.clone();
            std::thread::spawn(move || {
                let _ = parked.lock().unwrap().recv_timeout(Duration::from_secs(60));
            })
        })
        .collect();
    assert!(threads() >= 5, "threads: {}", threads());

    let state = tempfile::Builder::new()
        .prefix("sprout-test-embedded-")
        .tempdir_in("/run")
        .unwrap();
    let code = tempfile::Builder::new()
        .prefix("sprout-test-fn-")
        .tempdir()
        .unwrap();
    std::fs::write(
        code.path().join("f.py"),
        "def f(event):\n    return 'Hello, ' + event['name'] + '!'\n",
    )
    .unwrap();
    let agent = Agent::start(Config {
        state_root: state.path().to_path_buf(),
        shim: target_dir().join("sprout-shim"),
        // Found next to this binary's directory: target/<profile>/sprout-spawner.
        spawner: None,
        ..Config::new()
    })
    .unwrap_or_else(|e| panic!("start the agent: {e:?}"));
    let registered = agent.handle(Request::RegisterFunction {
        namespace: "default".into(),
        name: "hello".into(),
        source: FunctionSource::Dir(code.path().to_path_buf()),
        config: Default::default(),
    });
    assert!(
        matches!(registered, Ok(Response::Registered(_))),
        "{registered:?}"
    );
    let invoked = agent.handle(Request::Invoke {
        namespace: "default".into(),
        name: "hello".into(),
        event: br#"{"name":"threads"}"#.to_vec(),
        activation_id: None,
        blocking: true,
    });
    match invoked {
        Ok(Response::Invoked(inv)) => assert_eq!(&inv.result[..], br#""Hello, threads!""#),
        other => panic!("invoke: {other:?}"),
    }
    agent.shutdown().unwrap();
    let left: Vec<_> = std::fs::read_dir(state.path())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "the agent left {left:?}");
    drop(stop);
    for t in busy {
        t.join().unwrap();
    }
}
