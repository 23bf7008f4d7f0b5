//! The agent's call socket knows its caller from the connection's peer (the peer's
//! cgroup), so a function cannot speak for another: a process that is not in a bound
//! sandbox of this agent (the host, a stem cell, a sandbox of another agent) is
//! refused, and nothing runs. A process placed in the agent's own bound sandbox is
//! heard (the control that tells a refusal from a broken helper).
//!
//! The impostors are host processes the test starts and moves into a sandbox's
//! cgroups before they connect: the agent sees them exactly as it sees a function's
//! process. On v1 they join every hierarchy but the freezer's (a stem cell is frozen:
//! its freezer cgroup would freeze them too); on v2 a frozen sandbox is thawed while
//! the helper is inside, and frozen again after.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ipc::proto::{CallReply, CallRequest};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sprout_tests::{
    agent_cgroup_dirs, body_json, cgroup_v2, json, require_root, text, wait_for, Daemon, Env,
    Value, SLEEPER_PY,
};

/// How long a helper may take from "go" to its report.
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);

/// What the impostors ask for: a sibling call of this function would run it.
const TARGET_PY: &str = "def f(event):\n    return {'ran': event}\n";

/// Connects to the call socket `argv[1]` once told to (a line on stdin), sends the
/// frames of `argv[2]` (a list of `[header, payload]`), reads one reply per frame or
/// until the agent closes, and prints what happened as JSON.
const HELPER_PY: &str = r#"import errno, json, os, socket, struct, sys
path, frames = sys.argv[1], json.loads(sys.argv[2])
# The socket is opened (O_PATH) as root, then the helper becomes the given user and
# connects through its descriptor: a forked sandbox's files, seen through
# /proc/<pid>/root, are reachable only from its own user namespace or by root.
if len(sys.argv) > 3:
    fd, uid = os.open(path, os.O_PATH), int(sys.argv[3])
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    path = f"/proc/self/fd/{fd}"
sys.stdin.readline()
out = {"pid": os.getpid(), "replies": [], "closed": None, "send_error": None}
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
s.connect(path)
try:
    for header, payload in frames:
        h, p = json.dumps(header).encode(), payload.encode()
        s.sendall(struct.pack("<III", len(h), len(p), 0) + h + p)
except OSError as e:
    out["send_error"] = errno.errorcode.get(e.errno, str(e.errno))
buf = b""
try:
    while len(out["replies"]) < len(frames):
        chunk = s.recv(65536)
        if not chunk:
            out["closed"] = "eof"
            break
        buf += chunk
        while len(buf) >= 12:
            hl, pl, fds = struct.unpack("<III", buf[:12])
            if len(buf) < 12 + hl + pl:
                break
            out["replies"].append({"header": json.loads(buf[12:12 + hl]), "payload": buf[12 + hl:12 + hl + pl].decode("utf-8", "replace")})
            buf = buf[12 + hl + pl:]
except socket.timeout:
    out["closed"] = "timeout"
except OSError as e:
    out["closed"] = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps(out), flush=True)
"#;

/// Every directory of `sandbox`'s cgroup a process can join without being frozen: on
/// v1 one per hierarchy but the freezer's, on v2 the one directory.
fn joinable_dirs(agent: u32, sandbox: &str) -> Vec<PathBuf> {
    let dirs: Vec<PathBuf> = agent_cgroup_dirs(agent)
        .into_iter()
        .filter(|d| cgroup_v2() || !d.starts_with("/sys/fs/cgroup/freezer"))
        .map(|d| d.join(sandbox))
        .filter(|d| d.is_dir())
        .collect();
    assert!(
        dirs.iter()
            .any(|d| cgroup_v2() || d.starts_with("/sys/fs/cgroup/memory")),
        "sandbox {sandbox} of agent {agent} has no memory cgroup: {dirs:?}"
    );
    dirs
}

/// `<state dir>/<agent>/runtime/agent.sock`, which sandboxes see as `/.sprout/agent.sock`.
fn call_socket(env: &Env, d: &Daemon) -> PathBuf {
    let p = env
        .state_dir()
        .join(d.pid().to_string())
        .join("runtime")
        .join("agent.sock");
    assert!(p.exists(), "no call socket at {}", p.display());
    p
}

/// A sibling call of `target` with `event`, as a function's `call_async` sends it.
fn call_frame(event: &Value) -> (Value, String) {
    let header = CallRequest::Call {
        id: 1,
        function: "target".into(),
        depth: 1,
        raw: false,
        spec: None,
    };
    (serde_json::to_value(header).unwrap(), event.to_string())
}

/// A helper process on the host, waiting to be told to connect; killed (by pid) and
/// reaped if the test ends before it reported.
struct Helper {
    child: Option<Child>,
    pid: u32,
}

impl Helper {
    fn spawn(socket: &Path, frames: &[(Value, String)]) -> Helper {
        Helper::spawn_as(None, socket, frames)
    }

    /// [`Helper::spawn`] as host uid and gid `id` (no groups), or root.
    fn spawn_as(id: Option<u32>, socket: &Path, frames: &[(Value, String)]) -> Helper {
        let frames = Value::Array(frames.iter().map(|(h, p)| json!([h, p])).collect());
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.args(["-I", "-c", HELPER_PY])
            .arg(socket)
            .arg(frames.to_string());
        if let Some(id) = id {
            cmd.arg(id.to_string()); // it becomes this user itself (see HELPER_PY)
        }
        let child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the helper");
        let pid = child.id();
        Helper {
            child: Some(child),
            pid,
        }
    }

    /// Moves the helper into the cgroup directories `dirs`, and checks it is there.
    fn place(&self, agent: u32, sandbox: &str, dirs: &[PathBuf]) {
        for dir in dirs {
            let procs = dir.join("cgroup.procs");
            fs::write(&procs, self.pid.to_string())
                .unwrap_or_else(|e| panic!("move the helper into {}: {e}", procs.display()));
        }
        let cgroup = fs::read_to_string(format!("/proc/{}/cgroup", self.pid)).unwrap();
        let path = format!("/sprout/{agent}/{sandbox}");
        assert!(
            cgroup.lines().any(|l| l.ends_with(&format!(":{path}"))),
            "the helper is not in {path}:\n{cgroup}"
        );
    }

    /// Tells the helper to connect and returns its report.
    fn go(mut self) -> Value {
        let mut child = self.child.take().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"go\n")
            .expect("tell the helper to go");
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for the helper") {
                break status;
            }
            if started.elapsed() > HELPER_TIMEOUT {
                let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
                let _ = child.wait();
                panic!("the helper ran longer than {HELPER_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let (mut out, mut err) = (String::new(), String::new());
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(status.success(), "the helper failed ({status}):\n{err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("helper output ({e}): {out}\n{err}"))
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}

/// On v2, a frozen sandbox's cgroup thawed for as long as this lives (a process moved
/// into a frozen v2 cgroup freezes); nothing on v1, where the helper does not join
/// the freezer hierarchy.
struct Thawed(Option<PathBuf>);

impl Thawed {
    fn new(agent: u32, sandbox: &str) -> Thawed {
        if !cgroup_v2() {
            return Thawed(None);
        }
        let dir = Path::new("/sys/fs/cgroup/sprout")
            .join(agent.to_string())
            .join(sandbox);
        fs::write(dir.join("cgroup.freeze"), "0").expect("thaw the sandbox");
        let thawed = wait_for(Duration::from_secs(10), || {
            let events = fs::read_to_string(dir.join("cgroup.events")).unwrap_or_default();
            events
                .lines()
                .any(|l| l == "frozen 0")
                .then_some(())
                .ok_or(events)
        });
        if let Err(events) = thawed {
            panic!("{} did not thaw: {events}", dir.display());
        }
        Thawed(Some(dir))
    }
}

impl Drop for Thawed {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            let _ = fs::write(dir.join("cgroup.freeze"), "1");
        }
    }
}

/// Asserts the helper's connection was closed without an answer to anything.
#[track_caller]
fn assert_refused(report: &Value) {
    assert_eq!(
        report["replies"],
        json!([]),
        "the call socket answered an impostor: {report}"
    );
    let closed = report["closed"].as_str().unwrap_or_default();
    assert!(
        closed == "eof" || closed == "ECONNRESET",
        "the call socket should close the impostor's connection: {report}"
    );
}

/// Waits for the daemon to log that it refused process `pid` because `why`.
#[track_caller]
fn assert_logged_refusal(d: &Daemon, pid: u32, why: &str) {
    let logged = wait_for(Duration::from_secs(10), || {
        let log = d.log();
        log.lines()
            .any(|l| {
                l.contains("refused a connection")
                    && l.contains(&format!("process {pid}"))
                    && l.contains(why)
            })
            .then_some(())
            .ok_or(log)
    });
    if let Err(log) = logged {
        panic!("no refusal of process {pid} ({why:?}) in the daemon's log:\n{log}");
    }
}

/// Registers `target` (and `caller`, whose warm instance is a bound sandbox) and
/// returns the sandbox of `caller`'s instance.
fn bound_sandbox(env: &Env, d: &Daemon) -> String {
    let target = env.function("target", &[("f.py", TARGET_PY)]);
    d.register("target", &target, json!({}));
    let caller = env.function("caller", &[("f.py", SLEEPER_PY)]);
    d.register("caller", &caller, json!({}));
    let r = d.invoke("caller", "{}");
    assert_eq!(r.status, 200, "{}", text(&r));
    let sandbox = body_json(&r)["sandbox"].as_str().unwrap().to_owned();
    assert!(d.sandboxes().contains(&sandbox), "{sandbox}");
    sandbox
}

/// Bound sandboxes stay thawed for the whole test (v2: a helper in one is not frozen).
const NO_PAUSE: [&str; 4] = ["--stem-cells", "0", "--pause-grace", "600000"];

#[test]
fn the_host_is_refused() {
    let env = require_root!();
    let d = env.daemon_with(&NO_PAUSE);
    let target = env.function("target", &[("f.py", TARGET_PY)]);
    d.register("target", &target, json!({}));
    let before = d.status();

    // This very process, which is in no sandbox, asks for a resolve and a call.
    let stream = UnixStream::connect(call_socket(&env, &d)).expect("connect to the call socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut ch = ipc::Channel::new(stream);
    let resolve = CallRequest::Resolve {
        id: 1,
        function: "target".into(),
    };
    let (call, event) = call_frame(&json!("from the host"));
    // The agent may close before the second frame is written: then sending fails.
    let sent = ch
        .send(&resolve, b"", &[])
        .and_then(|()| ch.send(&call, event.as_bytes(), &[]));
    match ch.recv::<CallReply>() {
        Err(ipc::Error::Closed) => {}
        Err(ipc::Error::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the call socket answered the host ({sent:?}): {other:?}"),
    }
    assert_logged_refusal(&d, std::process::id(), "not in a sandbox of this agent");

    let after = d.status();
    assert_eq!(after["invocations"], before["invocations"], "{after}");
    assert_eq!(after["sandboxes"], 0, "nothing started: {after}");
}

#[test]
fn an_unbound_stem_cell_is_refused() {
    let env = require_root!();
    let d = env.daemon_with(&["--stem-cells", "1", "--pause-grace", "600000"]);
    let target = env.function("target", &[("f.py", TARGET_PY)]);
    d.register("target", &target, json!({}));
    let ready = wait_for(Duration::from_secs(20), || {
        let s = d.status();
        (s["stem_cells"] == 1).then_some(s.clone()).ok_or(s)
    });
    let before = ready.unwrap_or_else(|s| panic!("no stem cell ready: {s}"));
    let stem = d.sandboxes();
    assert_eq!(stem.len(), 1, "one sandbox, the stem cell: {stem:?}");
    let stem = &stem[0];

    let (call, event) = call_frame(&json!("from a stem cell"));
    let helper = Helper::spawn(&call_socket(&env, &d), &[(call, event)]);
    let thawed = Thawed::new(d.pid(), stem);
    helper.place(d.pid(), stem, &joinable_dirs(d.pid(), stem));
    let pid = helper.pid;
    let report = helper.go();
    drop(thawed);
    assert_refused(&report);
    assert_logged_refusal(
        &d,
        pid,
        &format!("sandbox {stem} (process {pid}) is not bound"),
    );

    let after = d.status();
    assert_eq!(after["invocations"], before["invocations"], "{after}");
    assert_eq!(
        after["stem_cells"], 1,
        "the stem cell was not taken: {after}"
    );
    assert_eq!(
        d.sandboxes(),
        std::slice::from_ref(stem),
        "nothing else started"
    );
}

#[test]
fn a_sandbox_of_another_agent_is_refused() {
    let env = require_root!();
    let a = env.daemon_with(&NO_PAUSE);
    let b = env.daemon_with(&NO_PAUSE);
    let target = env.function("target", &[("f.py", TARGET_PY)]);
    a.register("target", &target, json!({}));
    let theirs = bound_sandbox(&env, &b);
    let (before_a, before_b) = (a.status(), b.status());

    // From B's bound sandbox, to A's call socket.
    let (call, event) = call_frame(&json!("from another agent"));
    let helper = Helper::spawn(&call_socket(&env, &a), &[(call, event)]);
    helper.place(b.pid(), &theirs, &joinable_dirs(b.pid(), &theirs));
    let pid = helper.pid;
    let report = helper.go();
    assert_refused(&report);
    assert_logged_refusal(&a, pid, "not in a sandbox of this agent");

    let (after_a, after_b) = (a.status(), b.status());
    assert_eq!(after_a["invocations"], before_a["invocations"], "{after_a}");
    assert_eq!(after_a["sandboxes"], 0, "nothing started in A: {after_a}");
    assert_eq!(after_b["invocations"], before_b["invocations"], "{after_b}");
}

/// The sandbox's shim (its PID 1) and the host uid the sandbox runs as.
fn shim_and_uid(agent: u32, sandbox: &str) -> (u32, u32) {
    let procs = sprout_tests::sandbox_cgroup_dir(agent, sandbox, "memory").join("cgroup.procs");
    let shim = fs::read_to_string(&procs)
        .unwrap()
        .lines()
        .map(|l| l.parse::<u32>().unwrap())
        .find(|&p| sprout_tests::cmdline(p) == "/.sprout/shim")
        .unwrap_or_else(|| panic!("no shim in {}", procs.display()));
    let status = fs::read_to_string(format!("/proc/{shim}/status")).unwrap();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    (shim, uid)
}

/// The control: the same helper, placed in the agent's own bound sandbox as the
/// sandbox's own uid (the agent hears a sandbox only as its uid; that uid cannot walk
/// the host's state directory, so it connects through the sandbox's `/.sprout`), is
/// heard and its call runs.
#[test]
fn a_bound_sandbox_of_the_agent_is_heard() {
    let env = require_root!();
    let d = env.daemon_with(&NO_PAUSE);
    let mine = bound_sandbox(&env, &d);
    let before = d.status();

    let (call, event) = call_frame(&json!("from a bound sandbox"));
    let (shim, uid) = shim_and_uid(d.pid(), &mine);
    let inside = PathBuf::from(format!("/proc/{shim}/root/.sprout/agent.sock"));
    let helper = Helper::spawn_as(Some(uid), &inside, &[(call, event)]);
    helper.place(d.pid(), &mine, &joinable_dirs(d.pid(), &mine));
    let report = helper.go();
    let replies = report["replies"].as_array().unwrap();
    assert_eq!(replies.len(), 1, "{report}\nlog:\n{}", d.log());
    assert_eq!(
        replies[0]["header"],
        serde_json::to_value(CallReply::CallReturned { id: 1, raw: false }).unwrap(),
        "{report}"
    );
    assert_eq!(
        serde_json::from_str::<Value>(replies[0]["payload"].as_str().unwrap()).unwrap(),
        json!({"ran": "from a bound sandbox"}),
        "{report}"
    );
    let after = d.status();
    assert_eq!(
        after["invocations"].as_u64().unwrap(),
        before["invocations"].as_u64().unwrap() + 1,
        "{after}"
    );
}
