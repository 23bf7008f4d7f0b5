//! Logs written to something other than a terminal (a pipe, a file) carry no ANSI
//! colour codes: not the `sprout` command's, not the daemon's, not its spawner's
//! (whose stderr is the daemon's).

use std::fs::{self, File};
use std::io::Read;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use sprout_tests::{children, example, require_root, sprout_bin, Env};

/// The start of every ANSI escape sequence the log formatter writes.
const ESC: &str = "\x1b[";

/// With `SPROUT_LOG=debug` both the agent and its spawner log (the spawner when it
/// starts a sandbox); into a pipe, none of it is coloured.
#[test]
fn an_embedded_run_logs_into_a_pipe_without_colour() {
    let env = require_root!();
    let run = env
        .sprout()
        .env("SPROUT_LOG", "debug")
        .arg("invoke")
        .arg(example("hello"))
        .run();
    run.success();
    assert!(
        run.stderr.contains("spawner started") && run.stderr.contains("sandbox started"),
        "the agent and its spawner log at debug:\n{run}"
    );
    assert!(!run.stderr.contains(ESC), "colour codes in a pipe:\n{run}");
    env.assert_clean(run.pid);
}

/// `sprout serve` with stderr to a pipe: its log (and its spawner's) through start,
/// an invocation and shutdown has no colour codes.
#[test]
fn a_daemon_logs_into_a_pipe_without_colour() {
    let env = require_root!();
    let socket = env.work_dir().join("logs.sock");
    let data = env.work_dir().join("data");
    // Stops the daemon (by pid: the test's child serving on this socket) once an
    // invocation went through it.
    let stopper = {
        let socket = socket.clone();
        thread::spawn(move || {
            let started = Instant::now();
            let mut client = loop {
                if let Ok(c) = ipc::client::Client::connect(&socket) {
                    break c;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "the daemon did not serve"
                );
                thread::sleep(Duration::from_millis(10));
            };
            let body = serde_json::json!({ "path": example("hello") }).to_string();
            let r = client
                .request(
                    "PUT",
                    "/functions/hello",
                    Some("application/json"),
                    body.as_bytes(),
                )
                .unwrap();
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            let r = client
                .request("POST", "/functions/hello/invoke", None, b"{}")
                .unwrap();
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            let daemon = children(std::process::id())
                .into_iter()
                .find(|&pid| {
                    fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                        c.split(|&b| b == 0)
                            .any(|arg| arg == socket.as_os_str().as_encoded_bytes())
                    })
                })
                .expect("the daemon is a child of the test");
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(daemon as i32),
                nix::sys::signal::Signal::SIGTERM,
            )
            .unwrap();
        })
    };
    let run = env
        .sprout()
        .env("SPROUT_LOG", "debug")
        .arg("--socket")
        .arg(&socket)
        .args(["serve", "--stem-cells", "1", "--data-dir"])
        .arg(&data)
        .run();
    stopper.join().expect("the daemon served an invocation");
    run.success();
    assert!(
        run.stderr.contains("serving")
            && run.stderr.contains("sandbox started")
            && run.stderr.contains("shutting down"),
        "the daemon and its spawner log at debug:\n{run}"
    );
    assert!(!run.stderr.contains(ESC), "colour codes in a pipe:\n{run}");
    env.assert_clean(run.pid);
}

/// `sprout invoke` (at `SPROUT_LOG=info`) with stderr on a terminal (a pty); returns
/// what it wrote there.
fn invoke_on_a_terminal(env: &Env, no_color: bool) -> String {
    let pty = nix::pty::openpty(None, None).expect("open a pty");
    let mut cmd = Command::new(sprout_bin());
    cmd.arg("--state-dir")
        .arg(env.state_dir())
        .arg("invoke")
        .arg(example("hello"))
        .env("SPROUT_LOG", "info")
        .env_remove("SPROUT_SOCKET")
        .env_remove("SPROUT_STATE_DIR")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::from(pty.slave));
    if no_color {
        cmd.env("NO_COLOR", "1");
    }
    let mut child = cmd.spawn().expect("spawn sprout");
    // The pty's last writer is the child's: reading ends (EIO) once it and its
    // spawner are gone.
    drop(cmd);
    let mut master = File::from(pty.master);
    let reader = thread::spawn(move || {
        let mut out = Vec::new();
        let _ = master.read_to_end(&mut out);
        out
    });
    let status = child.wait().expect("wait for sprout");
    let out = String::from_utf8_lossy(&reader.join().unwrap()).into_owned();
    assert!(status.success(), "sprout invoke: {status}\n{out}");
    assert!(out.contains("spawner started"), "it logged at info:\n{out}");
    env.assert_clean(child.id());
    out
}

/// On a terminal the log is coloured, unless `NO_COLOR` is set.
#[test]
fn a_terminal_gets_colour_unless_no_color_is_set() {
    let env = require_root!();
    let out = invoke_on_a_terminal(&env, false);
    assert!(out.contains(ESC), "no colour on a terminal:\n{out}");
    let out = invoke_on_a_terminal(&env, true);
    assert!(!out.contains(ESC), "colour despite NO_COLOR:\n{out}");
}
