//! Helpers for sprout's end-to-end tests.
//!
//! The tests drive the real `sprout` binary (built by `cargo build --workspace`) on
//! the real host: sandboxes are created with libcontainer, cgroups under
//! `/sys/fs/cgroup/*/sprout/<agent pid>/`, state under a per-test directory in
//! `/run`. They need root and a cgroup file system; [`require_root!`] skips a test
//! loudly without them (and fails it when `CI=true`).
//!
//! Every test gets an [`Env`]: its own state directory, its own scratch directory,
//! and (see below) a turn. Each `sprout` process run through the `Env` is an agent
//! id to check: when the `Env` is dropped at the end of a passing test it asserts
//! that none of those agents left anything behind ([`Env::assert_clean`]).
//!
//! Tests run in parallel: each has its own state directory, and agents of different
//! state directories leave each other alone
//! (`cleanup::agents_with_different_state_dirs_leave_each_other_alone`).
//!
//! # Running
//!
//! ```text
//! cargo build --workspace && cargo test -p sprout-tests --no-fail-fast
//! ```
//!
//! Test files: `embedded` (`sprout invoke DIR`), `errors` (failures and exit codes),
//! `daemon` (`sprout serve`, the CLI and the HTTP API), `tcp` (the TCP listener:
//! keys, TLS, OpenLambda's client), `isolation` (what a
//! function sees inside its sandbox, and its cgroup seen from the host), `cleanup`
//! (crashed agents, agents side by side, and the leftover check itself), `pool` (the
//! warm pool's lifecycle), `workflows` (functions calling functions), `call_socket`
//! (who the call socket hears), `mounts` (the host's mount table never changes), and
//! the hostile suite: `hostile_frames` (what a function's frames can cost the agent),
//! `hostile_registration` (directories and limits), `hostile_uploads` (archives);
//! OpenWhisk's contracts: `openwhisk_core`, `openwhisk_api`, `openwhisk_invoker` and
//! `whisks` (with the controller's side in [`invoker`]), and `scale_out` (several
//! nodes under one balancer).

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

pub mod invoker;
pub mod netns;

pub use ipc::client::{Client, ClientResponse};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
pub use serde_json::{json, Value};
use tempfile::TempDir;

/// How long one `sprout` command may run before the test kills it and fails.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a daemon gets to open its socket, and to exit after SIGTERM.
pub const DAEMON_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Binaries and paths

/// `target/<profile>/`, found from the running test binary
/// (`target/<profile>/deps/<test>-<hash>`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("test binary has a parent directory");
    if dir.file_name() == Some(OsStr::new("deps")) {
        dir.parent().expect("deps has a parent").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// The `sprout` binary next to the tests; panics clearly when it was not built.
pub fn sprout_bin() -> PathBuf {
    let dir = target_dir();
    for name in ["sprout", "sprout-shim"] {
        let p = dir.join(name);
        assert!(
            p.is_file(),
            "{} is missing: run `cargo build --workspace` first (the tests drive the built binaries)",
            p.display()
        );
    }
    dir.join("sprout")
}

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// `examples/<name>` of the workspace.
pub fn example(name: &str) -> PathBuf {
    let p = workspace_root().join("examples").join(name);
    assert!(p.is_dir(), "example {} is missing", p.display());
    p
}

// ---------------------------------------------------------------------------
// Skipping

/// Why the end-to-end tests cannot run here, if they cannot.
pub fn skip_reason() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some(format!(
            "not running as root (euid {}): sandboxes need root",
            nix::unistd::Uid::effective()
        ));
    }
    if !Path::new("/sys/fs/cgroup").is_dir() {
        return Some("/sys/fs/cgroup is missing: sandboxes need a cgroup file system".into());
    }
    if !Path::new("/usr/bin/python3").is_file() {
        return Some("/usr/bin/python3 is missing: functions need the host's Python".into());
    }
    None
}

/// Sets up the test's [`Env`], or skips the test (returns from it) when it cannot
/// run here. Under `CI=true` a skip is a failure.
#[macro_export]
macro_rules! require_root {
    () => {
        match $crate::Env::setup() {
            Some(env) => env,
            None => return,
        }
    };
}

fn test_name() -> String {
    thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_owned()
}

// ---------------------------------------------------------------------------
// The per-test environment

/// One test's state directory, scratch directory and turn; checks on drop that
/// every agent it ran is gone without a trace.
pub struct Env {
    name: String,
    state: TempDir,
    work: TempDir,
    /// Pids of every `sprout` process run through this environment.
    agents: Mutex<Vec<u32>>,
}

impl Env {
    /// The environment, or `None` after printing why the test is skipped.
    pub fn setup() -> Option<Env> {
        let name = test_name();
        if let Some(reason) = skip_reason() {
            if under_ci() {
                panic!("{name}: cannot run: {reason} (CI is set: a skipped test is a failure)");
            }
            // Straight to fd 2: libtest captures `eprintln!` of passing tests.
            let _ = writeln!(
                std::io::stderr().lock(),
                "\n{bar}\n*** SKIPPED {name}: {reason}\n{bar}",
                bar = "*".repeat(72)
            );
            return None;
        }
        sprout_bin();
        let state = tempfile::Builder::new()
            .prefix("sprout-test-")
            .tempdir_in("/run")
            .expect("create a state directory under /run");
        let work = tempfile::Builder::new()
            .prefix("sprout-test-work-")
            .tempdir()
            .expect("create a scratch directory");
        Some(Env {
            name,
            state,
            work,
            agents: Mutex::new(Vec::new()),
        })
    }

    /// The `--state-dir` every agent of this test uses. sprout removes it when its
    /// last agent leaves it empty.
    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    /// A scratch directory for sockets, function code and logs.
    pub fn work_dir(&self) -> &Path {
        self.work.path()
    }

    /// `sprout --state-dir <state dir> ...`.
    pub fn sprout(&self) -> Sprout<'_> {
        self.sprout_in(self.state_dir())
    }

    /// `sprout --state-dir <state_dir> ...` with another state directory.
    pub fn sprout_in(&self, state_dir: &Path) -> Sprout<'_> {
        Sprout {
            env: self,
            args: vec!["--state-dir".into(), state_dir.into()],
            stdin: None,
            // The embedded CLI's package cache: the test's own, empty at first.
            envs: vec![(
                "SPROUT_PACKAGE_CACHE".into(),
                self.work_dir().join("package-cache").into(),
            )],
            timeout: COMMAND_TIMEOUT,
        }
    }

    /// Writes a function directory `<work>/fns/<name>/` holding `files`
    /// (relative path, content) and returns its path. An existing one is replaced.
    pub fn function(&self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = self.work_dir().join("fns").join(name);
        let _ = fs::remove_dir_all(&dir);
        write_files(&dir, files);
        dir
    }

    /// Starts `sprout serve` on a socket in the scratch directory, without stem
    /// cells, so that a function's sandboxes are all its instances.
    pub fn daemon(&self) -> Daemon {
        Daemon::start(self, &["--stem-cells", "0"])
    }

    /// Starts `sprout serve` with these pool flags (e.g. `--stem-cells 2`).
    pub fn daemon_with(&self, args: &[&str]) -> Daemon {
        Daemon::start(self, args)
    }

    fn record(&self, pid: u32) {
        self.agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(pid);
    }

    /// What agent `pid` left behind (empty when nothing).
    pub fn leftovers(&self, pid: u32) -> Vec<String> {
        leftovers(self.state_dir(), pid)
    }

    /// Asserts that agent `pid` left nothing: no cgroup `/sys/fs/cgroup/*/sprout/<pid>`,
    /// no state directory `<state dir>/<pid>`, no process in its cgroups, no
    /// sprout mount in the host's mount table.
    #[track_caller]
    pub fn assert_clean(&self, pid: u32) {
        let left = self.leftovers(pid);
        assert!(
            left.is_empty(),
            "agent {pid} left things behind:\n  {}",
            left.join("\n  ")
        );
    }

    /// Like [`Env::assert_clean`], allowing `within` for the cleanup to finish.
    #[track_caller]
    pub fn assert_clean_within(&self, pid: u32, within: Duration) {
        let left = wait_for(within, || {
            let left = self.leftovers(pid);
            left.is_empty().then_some(()).ok_or(left)
        });
        if let Err(left) = left {
            panic!(
                "agent {pid} still left things behind after {within:?}:\n  {}",
                left.join("\n  ")
            );
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if thread::panicking() {
            return;
        }
        let agents = std::mem::take(&mut *self.agents.lock().unwrap_or_else(|e| e.into_inner()));
        let mut left = Vec::new();
        for pid in agents {
            left.extend(self.leftovers(pid));
        }
        // Every agent is gone, so nothing of theirs may remain in the state root:
        // not only `<root>/<pid>`, but any file or directory they made there.
        if let Ok(entries) = fs::read_dir(self.state_dir()) {
            for e in entries.filter_map(Result::ok) {
                left.push(format!("state {}", e.path().display()));
            }
        }
        assert!(
            left.is_empty(),
            "{}: the test's agents left things behind:\n  {}",
            self.name,
            left.join("\n  ")
        );
    }
}

/// Writes `files` (relative path, content) under `dir`, creating directories.
pub fn write_files(dir: &Path, files: &[(&str, &str)]) {
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    for (rel, content) in files {
        let p = dir.join(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(&p, content).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    }
}

/// Calls `f` until it returns `Ok` or `within` passes; the last `Err` otherwise.
pub fn wait_for<T, E>(within: Duration, mut f: impl FnMut() -> Result<T, E>) -> Result<T, E> {
    let deadline = Instant::now() + within;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

// ---------------------------------------------------------------------------
// Cleanliness

/// Whether the host runs cgroup v2 alone (one unified hierarchy at `/sys/fs/cgroup`).
/// On v1 and hybrid hosts (like the development VM) the controllers are separate
/// hierarchies under `/sys/fs/cgroup/<controller>`.
pub fn cgroup_v2() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").is_file()
}

/// The directory of sandbox `sandbox` of agent `agent` holding `v1_controller`'s
/// files: `/sys/fs/cgroup/<v1_controller>/sprout/<agent>/<sandbox>` on v1,
/// `/sys/fs/cgroup/sprout/<agent>/<sandbox>` on v2 (where every controller's files
/// are in the one directory).
pub fn sandbox_cgroup_dir(agent: u32, sandbox: &str, v1_controller: &str) -> PathBuf {
    agent_cgroup_dir(agent, v1_controller).join(sandbox)
}

/// Whether `sandbox`'s cgroup is frozen (v1 `freezer.state`, v2 `cgroup.events`);
/// false when it is gone.
pub fn sandbox_frozen(agent: u32, sandbox: &str) -> bool {
    if cgroup_v2() {
        fs::read_to_string(sandbox_cgroup_dir(agent, sandbox, "").join("cgroup.events"))
            .is_ok_and(|e| e.lines().any(|l| l.trim() == "frozen 1"))
    } else {
        fs::read_to_string(sandbox_cgroup_dir(agent, sandbox, "freezer").join("freezer.state"))
            .is_ok_and(|s| s.trim() == "FROZEN")
    }
}

/// Agent `agent`'s cgroup in `v1_controller`'s hierarchy (v1), or in the unified one.
pub fn agent_cgroup_dir(agent: u32, v1_controller: &str) -> PathBuf {
    let root = Path::new("/sys/fs/cgroup");
    let root = if cgroup_v2() {
        root.to_path_buf()
    } else {
        root.join(v1_controller)
    };
    root.join("sprout").join(agent.to_string())
}

/// Every directory where agent `agent` could have a cgroup: one per v1 hierarchy
/// (the hybrid layout's `unified` included), or the one v2 directory.
pub fn agent_cgroup_dirs(agent: u32) -> Vec<PathBuf> {
    let rel = Path::new("sprout").join(agent.to_string());
    if cgroup_v2() {
        return vec![Path::new("/sys/fs/cgroup").join(rel)];
    }
    let mut dirs: Vec<PathBuf> = fs::read_dir("/sys/fs/cgroup")
        .map(|it| {
            it.filter_map(Result::ok)
                // Real directories only: `cpu,cpuacct` may be linked as `cpu` too.
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path().join(&rel))
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs
}

/// The mount table as `pid` sees it (`/proc/<pid>/mountinfo`), or `None` when it
/// cannot be read (the process is gone, or hides it).
pub fn mountinfo(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok()
}

/// Whether `CI` says this is a CI run: any value but empty, `0` or `false`
/// (`true`, `1`, `yes`, `TRUE` ...). Under CI a test that cannot run fails.
pub fn under_ci() -> bool {
    means_ci(std::env::var("CI").ok().as_deref())
}

fn means_ci(value: Option<&str>) -> bool {
    value.is_some_and(|v| {
        let v = v.trim().to_ascii_lowercase();
        !matches!(v.as_str(), "" | "0" | "false" | "no")
    })
}

/// What agent `pid` (with state under `state_root`) left behind: its cgroups in any
/// hierarchy, its state directory, any process of its sandboxes (found by cgroup, and
/// by the sandbox id in its environment, so a zygote or instance that escaped its
/// cgroup or outlived it is found too), its spawner, the agent itself, and mounts of
/// its state seen in any mount namespace (the host's own table must show nothing of
/// sprout's at all).
pub fn leftovers(state_root: &Path, pid: u32) -> Vec<String> {
    let mut found = Vec::new();
    for dir in agent_cgroup_dirs(pid) {
        if dir.exists() {
            let children: Vec<String> = fs::read_dir(&dir)
                .map(|it| {
                    it.filter_map(Result::ok)
                        .filter(|c| c.path().is_dir())
                        .map(|c| c.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            found.push(format!("cgroup {} (sandboxes {children:?})", dir.display()));
        }
    }
    let state = state_root.join(pid.to_string());
    if state.exists() {
        found.push(format!("state directory {}", state.display()));
    }
    for p in agent_processes(state_root, pid) {
        found.push(format!(
            "process {p} ({}) of agent {pid}, cgroup {}",
            cmdline(p),
            fs::read_to_string(format!("/proc/{p}/cgroup"))
                .unwrap_or_default()
                .lines()
                .find(|l| l.contains("/sprout/"))
                .unwrap_or("<none of sprout's>")
        ));
    }
    found.extend(sprout_mounts(state_root, pid));
    if nft_tables().contains(&format!("sprout-{pid}")) {
        found.push(format!("nftables table inet sprout-{pid}"));
    }
    found
}

/// The host's `inet` nftables tables (none when `nft` is not installed).
pub fn nft_tables() -> Vec<String> {
    Command::new("nft")
        .args(["list", "tables", "inet"])
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.strip_prefix("table inet "))
                .map(|t| t.trim().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// `text` without its ANSI colour sequences (`ESC [ ... m`), as the daemon's log reads
/// on a terminal.
pub fn without_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Live processes that belong to agent `pid`: the agent itself, its spawners (named
/// by `--state-dir` on their command line), any process holding a descriptor into
/// its state directory, and every process of its sandboxes, by cgroup or by
/// `SPROUT_SANDBOX=sprout-<pid>-...` in its environment.
pub fn agent_processes(state_root: &Path, pid: u32) -> Vec<u32> {
    let in_cgroup = format!("/sprout/{pid}/");
    let sandbox_env = format!("SPROUT_SANDBOX=sprout-{pid}-");
    let state = state_root.join(pid.to_string());
    let me = std::process::id();
    all_pids()
        .into_iter()
        .filter(|&p| p != me && alive(p))
        .filter(|&p| {
            p == pid
                || fs::read_to_string(format!("/proc/{p}/cgroup"))
                    .is_ok_and(|c| c.contains(&in_cgroup))
                || fs::read(format!("/proc/{p}/environ")).is_ok_and(|env| {
                    env.split(|&b| b == 0)
                        .any(|var| var.starts_with(sandbox_env.as_bytes()))
                })
                || fs::read_dir(format!("/proc/{p}/fd")).is_ok_and(|fds| {
                    fds.filter_map(Result::ok)
                        .filter_map(|fd| fs::read_link(fd.path()).ok())
                        .any(|target| target.starts_with(&state))
                })
                || is_spawner_of(p, &state)
        })
        .collect()
}

/// Whether `p` is a spawner started for the agent whose state directory is `state`
/// (it holds no descriptor into it: it is named on its command line).
fn is_spawner_of(p: u32, state: &Path) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{p}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    args.windows(2)
        .any(|w| w[0] == b"--state-dir" && Path::new(OsStr::from_bytes(w[1])) == state)
}

/// Mounts that speak of agent `pid`'s state in any mount namespace, and any mount
/// naming sprout in this process's (the host's) own table.
fn sprout_mounts(state_root: &Path, pid: u32) -> Vec<String> {
    let mut found = Vec::new();
    for line in mountinfo(std::process::id())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("sprout"))
    {
        found.push(format!("host mount: {line}"));
    }
    // A bind mount's root is its path inside the source file system, so mounts out of
    // `<state_root>/<pid>` show `.../<root name>/<pid>/...`.
    let Some(root_name) = state_root.file_name() else {
        return found;
    };
    let dir = format!("{}/{pid}", root_name.to_string_lossy());
    let (inside, itself) = (format!("{dir}/"), format!("{dir} "));
    for (ns, member) in mount_namespaces() {
        for line in mountinfo(member).unwrap_or_default().lines() {
            if line.contains(&inside) || line.contains(&itself) {
                found.push(format!("mount in {ns} (process {member}): {line}"));
            }
        }
    }
    found
}

/// One process of every mount namespace on the host: (namespace, pid).
pub fn mount_namespaces() -> Vec<(String, u32)> {
    let mut seen = std::collections::BTreeMap::new();
    for p in all_pids() {
        if let Ok(ns) = fs::read_link(format!("/proc/{p}/ns/mnt")) {
            seen.entry(ns.to_string_lossy().into_owned()).or_insert(p);
        }
    }
    seen.into_iter().collect()
}

/// Numeric entries of /proc.
pub fn all_pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|it| {
            it.filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Live (not zombie) processes whose cgroup lies under `/sprout/<agent>/` in some
/// hierarchy. A zombie has released everything but its pid; reaping it is its
/// parent's job (here often PID 1, which may take its time).
pub fn processes_in_agent_cgroups(agent: u32) -> Vec<u32> {
    let needle = format!("/sprout/{agent}/");
    all_pids()
        .into_iter()
        .filter(|&p| {
            fs::read_to_string(format!("/proc/{p}/cgroup")).is_ok_and(|c| c.contains(&needle))
                && alive(p)
        })
        .collect()
}

/// The command line of `pid`, space-separated ("" when it is gone).
pub fn cmdline(pid: u32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// The state letter and parent pid of `pid` from /proc/<pid>/stat.
pub fn stat(pid: u32) -> Option<(char, u32)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces.
    let rest = &s[s.rfind(')')? + 2..];
    let mut it = rest.split(' ');
    let state = it.next()?.chars().next()?;
    let ppid = it.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Whether `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    matches!(stat(pid), Some((s, _)) if s != 'Z' && s != 'X')
}

/// The children of `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let mut kids: Vec<u32> = all_pids()
        .into_iter()
        .filter(|&p| matches!(stat(p), Some((_, ppid)) if ppid == pid))
        .collect();
    kids.sort();
    kids
}

/// The sandbox cgroups agent `pid` has (in the memory hierarchy on v1).
pub fn sandbox_cgroups(agent: u32) -> Vec<String> {
    let dir = agent_cgroup_dir(agent, "memory");
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|it| {
            it.filter_map(Result::ok)
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with(&format!("sprout-{agent}-")))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The host's hostname.
pub fn host_hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned()
}

// ---------------------------------------------------------------------------
// Running sprout

/// A `sprout` command line, run with [`Sprout::run`].
pub struct Sprout<'a> {
    env: &'a Env,
    args: Vec<OsString>,
    stdin: Option<Vec<u8>>,
    envs: Vec<(OsString, OsString)>,
    timeout: Duration,
}

impl Sprout<'_> {
    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.args.push(a.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Feeds `bytes` on stdin (otherwise stdin is /dev/null).
    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(bytes.into());
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Fails the test when the command runs longer (default [`COMMAND_TIMEOUT`]).
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Starts the command without waiting (stdio to /dev/null) and records its pid
    /// as an agent to check. The caller waits for the child.
    pub fn spawn(self) -> Child {
        let mut cmd = self.command();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().expect("spawn sprout");
        self.env.record(child.id());
        child
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(sprout_bin());
        cmd.args(&self.args)
            .env_remove("SPROUT_SOCKET")
            .env_remove("SPROUT_URL")
            .env_remove("SPROUT_KEY")
            .env_remove("SPROUT_CA_CERT")
            .env_remove("SPROUT_STATE_DIR")
            .env_remove("SPROUT_LOG")
            // A daemon started this way keeps its data in the test's directory.
            .env("SPROUT_DATA_DIR", self.env.work_dir().join("data"));
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs the command to completion and records its pid as an agent to check.
    #[track_caller]
    pub fn run(self) -> Run {
        let mut cmd = self.command();
        cmd.stdin(if self.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn().expect("spawn sprout");
        let pid = child.id();
        self.env.record(pid);
        let writer = self.stdin.map(|bytes| {
            let mut w = child.stdin.take().unwrap();
            thread::spawn(move || {
                let _ = w.write_all(&bytes);
            })
        });
        let out = reader(child.stdout.take().unwrap());
        let err = reader(child.stderr.take().unwrap());
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for sprout") {
                break status;
            }
            if started.elapsed() > self.timeout {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                let _ = child.wait();
                panic!(
                    "sprout {:?} (pid {pid}) ran longer than {:?}; killed it. stderr:\n{}",
                    self.args,
                    self.timeout,
                    String::from_utf8_lossy(&err.join().unwrap_or_default())
                );
            }
            thread::sleep(Duration::from_millis(5));
        };
        let elapsed = started.elapsed();
        if let Some(w) = writer {
            let _ = w.join();
        }
        Run {
            args: self.args,
            pid,
            status,
            stdout: String::from_utf8_lossy(&out.join().unwrap_or_default()).into_owned(),
            stderr: String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned(),
            elapsed,
        }
    }
}

fn reader(mut r: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// A finished `sprout` command.
#[derive(Debug)]
pub struct Run {
    pub args: Vec<OsString>,
    /// Its pid, which is also its agent id when it ran an agent.
    pub pid: u32,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    /// The exit code (`None` when killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Asserts the exit code, showing everything on failure.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Run {
        assert_eq!(
            self.code(),
            Some(code),
            "sprout {:?} exited with {} instead of {code}\n{self}",
            self.args,
            self.status
        );
        self
    }

    /// Asserts success.
    #[track_caller]
    pub fn success(&self) -> &Run {
        self.expect_code(0)
    }

    /// stdout parsed as JSON.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{self}"))
    }

    /// The `error` object of a failed invocation's stdout.
    #[track_caller]
    pub fn error(&self) -> Value {
        let v = self.json();
        match v.get("error") {
            Some(e) if e.is_object() => e.clone(),
            _ => panic!("stdout has no error object:\n{self}"),
        }
    }

    /// Asserts the error's `kind` and that its `field` contains `text`; returns the
    /// error for further checks.
    #[track_caller]
    pub fn assert_error(&self, kind: &str, field: &str, text: &str) -> Value {
        let err = self.error();
        assert_eq!(err["kind"], kind, "{self}");
        let value = err[field].as_str().unwrap_or_default();
        assert!(
            value.contains(text),
            "error {field} should contain {text:?}:\n{self}"
        );
        err
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "--- sprout {:?} (pid {}, {}, {:?})\n--- stdout:\n{}\n--- stderr:\n{}",
            self.args, self.pid, self.status, self.elapsed, self.stdout, self.stderr
        )
    }
}

// ---------------------------------------------------------------------------
// The daemon

static SOCKETS: AtomicUsize = AtomicUsize::new(0);

/// A `sprout serve` started by the test. Dropping it sends SIGTERM to its pid, waits
/// for it to exit (SIGKILL and fail after [`DAEMON_TIMEOUT`]) and asserts that it
/// left nothing behind.
pub struct Daemon {
    child: Option<Child>,
    pid: u32,
    socket: PathBuf,
    log: PathBuf,
    state: PathBuf,
    data: PathBuf,
    status: Option<ExitStatus>,
}

impl Daemon {
    /// Starts `sprout serve --socket <work>/api-N.sock --state-dir <state>
    /// --data-dir <work>/data-N` and waits until the socket accepts connections.
    pub fn start(env: &Env, args: &[&str]) -> Daemon {
        let n = SOCKETS.load(Ordering::Relaxed);
        Daemon::start_on(env, &env.work_dir().join(format!("data-{n}")), args)
    }

    /// [`Daemon::start`] with the data directory `data`.
    pub fn start_on(env: &Env, data: &Path, args: &[&str]) -> Daemon {
        Daemon::start_under(env, data, &[], args)
    }

    /// [`Daemon::start_on`] run through `wrapper` (a command that ends by executing
    /// its arguments in its own process, such as `nsenter --net=...`), so that the
    /// daemon's pid is still the child's.
    pub fn start_under(env: &Env, data: &Path, wrapper: &[&str], args: &[&str]) -> Daemon {
        let n = SOCKETS.fetch_add(1, Ordering::Relaxed);
        let socket = env.work_dir().join(format!("api-{n}.sock"));
        let log = env.work_dir().join(format!("daemon-{n}.log"));
        let log_file = File::create(&log).expect("create daemon log");
        let mut command = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut c = Command::new(program);
                c.args(wrapper_args).arg(sprout_bin());
                c
            }
            None => Command::new(sprout_bin()),
        };
        let child = command
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(env.state_dir())
            .arg("--data-dir")
            .arg(data)
            .args(args)
            .env_remove("SPROUT_SOCKET")
            .env_remove("SPROUT_URL")
            .env_remove("SPROUT_KEY")
            .env_remove("SPROUT_STATE_DIR")
            .env_remove("SPROUT_DATA_DIR")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("spawn sprout serve");
        let pid = child.id();
        env.record(pid);
        let mut d = Daemon {
            child: Some(child),
            pid,
            socket,
            log,
            state: env.state_dir().to_path_buf(),
            data: data.to_path_buf(),
            status: None,
        };
        let started = Instant::now();
        loop {
            if let Some(status) = d.child.as_mut().unwrap().try_wait().unwrap() {
                d.child = None;
                d.status = Some(status);
                panic!(
                    "sprout serve exited ({status}) before serving; log:\n{}",
                    d.log()
                );
            }
            if UnixStream::connect(&d.socket).is_ok() {
                break;
            }
            if started.elapsed() > DAEMON_TIMEOUT {
                panic!(
                    "sprout serve did not accept on {} within {DAEMON_TIMEOUT:?}; log:\n{}",
                    d.socket.display(),
                    d.log()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
        d
    }

    /// The daemon's pid, which is its agent id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The daemon's data directory (`--data-dir`).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// What the daemon logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The URL of the daemon's TCP listener (started with `--listen ADDR`, port 0
    /// included): `http://ADDR` or `https://ADDR`, read from the line the daemon logs
    /// once it is bound ("listening on http://127.0.0.1:PORT").
    #[track_caller]
    pub fn tcp_url(&self) -> String {
        let found = wait_for(DAEMON_TIMEOUT, || {
            let log = self.log();
            log.split("listening on ")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .map(str::to_owned)
                .ok_or(())
        });
        found.unwrap_or_else(|()| {
            panic!(
                "the daemon logged no \"listening on\" line; log:\n{}",
                self.log()
            )
        })
    }

    /// The daemon's TCP address (see [`Daemon::tcp_url`]).
    #[track_caller]
    pub fn tcp_addr(&self) -> std::net::SocketAddr {
        let url = self.tcp_url();
        let addr = url.split("://").nth(1).unwrap_or_default();
        addr.parse()
            .unwrap_or_else(|e| panic!("{url}: not an address: {e}"))
    }

    /// A connection to the daemon's TCP listener with `key` (`UUID:KEY`) and, for
    /// TLS, the CA file `ca`.
    #[track_caller]
    pub fn tcp_client(&self, key: Option<&str>, ca: Option<&Path>) -> Client {
        Client::connect_url(
            &self.tcp_url(),
            &ipc::client::TcpOptions {
                key: key.map(str::to_owned),
                ca_cert: ca.map(Path::to_path_buf),
            },
        )
        .unwrap_or_else(|e| panic!("connect to the daemon's TCP listener: {}", ipc::chain(&e)))
    }

    /// `PUT /namespaces/{ns}/functions/{name}` by path, on the Unix socket; panics
    /// unless it is registered.
    #[track_caller]
    pub fn register_in(&self, ns: &str, name: &str, dir: &Path) {
        let body = json!({ "path": dir.to_str().unwrap() }).to_string();
        let r = self.request(
            "PUT",
            &format!("/namespaces/{ns}/functions/{name}"),
            Some("application/json"),
            body.as_bytes(),
        );
        assert_eq!(r.status, 200, "register {ns}/{name}: {}", text(&r));
    }

    /// A new connection to the daemon.
    pub fn client(&self) -> Client {
        Client::connect(&self.socket)
            .unwrap_or_else(|e| panic!("connect to the daemon: {}", ipc::chain(&e)))
    }

    /// One request on a new connection.
    #[track_caller]
    pub fn request(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> ClientResponse {
        self.client()
            .request(method, path, content_type, body)
            .unwrap_or_else(|e| {
                panic!(
                    "{method} {path}: {}; daemon log:\n{}",
                    ipc::chain(&e),
                    self.log()
                )
            })
    }

    /// `GET /status` as JSON; asserts 200.
    #[track_caller]
    pub fn status(&self) -> Value {
        let r = self.request("GET", "/status", None, b"");
        assert_eq!(r.status, 200, "GET /status: {}", text(&r));
        body_json(&r)
    }

    /// `PUT /functions/{name}` with `{"path": dir, ...extra}`; asserts 200.
    #[track_caller]
    pub fn register(&self, name: &str, dir: &Path, extra: Value) -> Value {
        let mut body = json!({ "path": dir.to_str().unwrap() });
        if let Value::Object(m) = extra {
            body.as_object_mut().unwrap().extend(m);
        }
        let r = self.request(
            "PUT",
            &format!("/functions/{name}"),
            Some("application/json"),
            body.to_string().as_bytes(),
        );
        assert_eq!(r.status, 200, "register {name}: {}", text(&r));
        body_json(&r)
    }

    /// `PUT /functions/{name}` with `{"path": dir}`, whatever the answer: its status
    /// and body (JSON, or the text as a JSON string).
    #[track_caller]
    pub fn try_register(&self, name: &str, dir: &Path) -> (u16, Value) {
        let r = self.request(
            "PUT",
            &format!("/functions/{name}"),
            Some("application/json"),
            json!({ "path": dir.to_str().unwrap() })
                .to_string()
                .as_bytes(),
        );
        let body = serde_json::from_slice(&r.body).unwrap_or_else(|_| json!(text(&r)));
        (r.status, body)
    }

    /// `POST /functions/{name}/invoke` with `event`.
    #[track_caller]
    pub fn invoke(&self, name: &str, event: &str) -> ClientResponse {
        self.request(
            "POST",
            &format!("/functions/{name}/invoke"),
            Some("application/json"),
            event.as_bytes(),
        )
    }

    /// `sprout --socket <socket> ...` (with this test's state dir, which a client
    /// command does not use).
    pub fn cli<'e>(&self, env: &'e Env) -> Sprout<'e> {
        env.sprout().arg("--socket").arg(&self.socket)
    }

    /// The sandbox cgroups the daemon has right now.
    pub fn sandboxes(&self) -> Vec<String> {
        sandbox_cgroups(self.pid)
    }

    /// The daemon's `sprout-spawner` child.
    pub fn spawner_pid(&self) -> u32 {
        let kids: Vec<u32> = children(self.pid)
            .into_iter()
            .filter(|&k| {
                fs::read_to_string(format!("/proc/{k}/comm"))
                    .is_ok_and(|c| c.trim() == "sprout-spawner")
            })
            .collect();
        assert_eq!(
            kids.len(),
            1,
            "expected one sprout-spawner child of {}, found {kids:?} (children {:?})",
            self.pid,
            children(self.pid)
        );
        kids[0]
    }

    /// Sends SIGTERM and waits for the exit; SIGKILLs and fails the test if the
    /// daemon is still running after [`DAEMON_TIMEOUT`]. Returns the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.stop(Signal::SIGTERM)
    }

    /// Sends `signal` to the daemon's pid and waits for the exit like
    /// [`Daemon::terminate`]. Once it has exited, returns the status it exited with.
    pub fn stop(&mut self, signal: Signal) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        let _ = kill(Pid::from_raw(self.pid as i32), signal);
        let mut child = self.child.take().expect("daemon child");
        let deadline = Instant::now() + DAEMON_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("wait for the daemon") {
                self.status = Some(status);
                return status;
            }
            if Instant::now() > deadline {
                let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
                let status = child.wait().ok();
                self.status = status;
                let msg = format!(
                    "sprout serve (pid {}) did not exit within {DAEMON_TIMEOUT:?} of {signal}; killed it. log:\n{}",
                    self.pid,
                    self.log()
                );
                if thread::panicking() {
                    eprintln!("{msg}");
                    return status.unwrap_or_default();
                }
                panic!("{msg}");
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILLs the daemon (and only it) and reaps it.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("daemon child");
        let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        self.status = Some(child.wait().expect("reap the daemon"));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let status = self.terminate();
        if thread::panicking() {
            eprintln!("--- daemon {} ({status}) log:\n{}", self.pid, self.log());
            return;
        }
        // A clean shutdown removes everything before the process exits; allow the
        // spawner's fallback a moment so one shutdown bug does not fail every test
        // (`daemon::sigterm_shuts_down_cleanly` checks the strict version).
        let within = Duration::from_secs(5);
        let left = wait_for(within, || {
            let left = leftovers(&self.state, self.pid);
            left.is_empty().then_some(()).ok_or(left)
        });
        if let Err(left) = left {
            panic!(
                "daemon {} left things behind {within:?} after it exited ({status}):\n  {}\nlog:\n{}",
                self.pid,
                left.join("\n  "),
                self.log()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Processes of the test's own

/// A process the test started (a bystander, an impostor, a fake agent): killed by its
/// pid and reaped when dropped, so a failing test leaves it behind neither.
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    /// Spawns `cmd`; panics naming it when it cannot start.
    pub fn spawn(cmd: &mut Command) -> KillOnDrop {
        KillOnDrop(cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")))
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------
// HTTP helpers

/// A response body as text.
pub fn text(r: &ClientResponse) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

/// A response body as JSON.
#[track_caller]
pub fn body_json(r: &ClientResponse) -> Value {
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("response {} body is not JSON ({e}): {}", r.status, text(r)))
}

/// PEM files made in `dir` for TLS tests: a CA (`ca.pem`), and a certificate it
/// issued for `localhost` and 127.0.0.1 (`cert.pem`) with its key (`key.pem`).
pub fn tls_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "sprout test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("params")
        .signed_by(&key, &issuer)
        .expect("certificate");
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    fs::write(&paths.0, ca.pem()).unwrap();
    fs::write(&paths.1, cert.pem()).unwrap();
    fs::write(&paths.2, key.serialize_pem()).unwrap();
    std::fs::set_permissions(
        &paths.2,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    (paths.0, paths.1, paths.2)
}

/// A tar archive of `dir`'s contents (as `sprout fn add --upload` sends).
pub fn tar_dir(dir: &Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", dir).expect("archive");
    b.into_inner().expect("finish archive")
}

/// A tar archive holding `files` (relative path, content).
pub fn tar_files(files: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, content) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(content.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, content.as_bytes())
            .expect("append to archive");
    }
    b.into_inner().expect("finish archive")
}

// ---------------------------------------------------------------------------
// Functions used by several tests

/// Returns `"Hello, <name>!"`.
pub const HELLO_PY: &str =
    "def f(event):\n    return \"Hello, \" + event.get(\"name\", \"world\") + \"!\"\n";

/// Prints `event["out"]` to stdout and `event["err"]` to stderr, then returns
/// `event["ret"]` or raises when `event["raise"]`.
pub const ECHO_LOGS_PY: &str = r#"import sys

def f(event):
    if "out" in event:
        print(event["out"])
    if "err" in event:
        print(event["err"], file=sys.stderr)
    if event.get("raise"):
        raise RuntimeError(event["raise"])
    return event.get("ret")
"#;

/// Sleeps `event["sleep"]` seconds and returns the sandbox id and its pid.
pub const SLEEPER_PY: &str = r#"import os, time

def f(event):
    time.sleep(event.get("sleep", 0))
    return {"sandbox": os.environ.get("SPROUT_SANDBOX"), "pid": os.getpid()}
"#;

/// Writes `contents` to `path` as host user `uid`:`gid` (on a thread of its own, whose
/// file-system ids are set to them): a forked sandbox's tmpfs belongs to its user
/// namespace, where the host's root is not mapped, so root cannot create files there.
pub fn write_as(uid: u32, gid: u32, path: &str, contents: &str) -> std::io::Result<()> {
    let (path, contents) = (path.to_owned(), contents.to_owned());
    std::thread::spawn(move || {
        // SAFETY: setfsgid/setfsuid change only this (short-lived) thread's ids.
        unsafe {
            libc::setfsgid(gid);
            libc::setfsuid(uid);
        }
        fs::write(path, contents)
    })
    .join()
    .expect("the writing thread panicked")
}

/// Writes `contents` to `path`, a file in a sandbox's own file system as the host
/// sees it (`/proc/<pid>/root/...`), as the owner of the directory it goes in (see
/// [`write_as`]).
pub fn write_into(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dir = fs::metadata(path.parent().unwrap_or(Path::new("/")))?;
    // A sticky /tmp owned by root or the fork server's user: the writer must be an
    // id mapped there; the directory's owner always is.
    write_as(dir.uid(), dir.gid(), &path.to_string_lossy(), contents)
}

// ---------------------------------------------------------------------------
// Descriptors of sandbox processes, as the host sees them

/// `(fd, link target)` of every descriptor of `pid`.
pub fn fds(pid: u32) -> Vec<(u32, String)> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|it| {
            it.filter_map(Result::ok)
                .filter_map(|e| {
                    let n = e.file_name().to_str()?.parse().ok()?;
                    let t = fs::read_link(e.path()).ok()?;
                    Some((n, t.to_string_lossy().into_owned()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Every pipe and socket on the host (`pipe:[N]`, `socket:[N]`) and the processes
/// holding it.
pub fn holders() -> HashMap<String, HashSet<u32>> {
    let mut by_object: HashMap<String, HashSet<u32>> = HashMap::new();
    for p in all_pids() {
        for (_, target) in fds(p) {
            if target.starts_with("pipe:[") || target.starts_with("socket:[") {
                by_object.entry(target).or_default().insert(p);
            }
        }
    }
    by_object
}

/// Unix sockets' peers (`ss -xa`), by inode, in the network namespace of `pid` (the
/// host's with `None`).
pub fn unix_peers(pid: Option<u32>, into: &mut HashMap<u64, u64>) {
    let mut cmd = match pid {
        Some(p) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/proc/{p}/ns/net")).arg("ss");
            c
        }
        None => Command::new("ss"),
    };
    let out = cmd
        .args(["-xaH"])
        .output()
        .unwrap_or_else(|e| panic!("run {cmd:?} (ss is in iproute2, nsenter in util-linux): {e}"));
    assert!(out.status.success(), "ss: {out:?}");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 8 {
            if let (Ok(ino), Ok(peer)) = (f[5].parse(), f[7].parse()) {
                into.insert(ino, peer);
            }
        }
    }
}

/// The mount ids of `pid`'s mount namespace.
pub fn mount_ids(pid: u32) -> HashSet<u64> {
    fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

/// The mount id of `pid`'s descriptor `fd`.
pub fn fd_mount_id(pid: u32, fd: u32) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))?
        .trim()
        .parse()
        .ok()
}

/// What a function sees and may do inside its sandbox (a handler `f`), reported
/// as JSON; never raises: every observation is a value. The connection to an
/// outside address cannot leave a sandbox without `network: egress` (no route:
/// `routes` is empty), so no packet leaves the host.
pub const ISOLATION_PROBE_PY: &str = r#"import ctypes, errno, os, socket

def _errno(n):
    return errno.errorcode.get(n, str(n))

def _try_write(path):
    try:
        with open(path, "w") as fh:
            fh.write("sprout")
        with open(path) as fh:
            return "ok:" + fh.read()
    except OSError as e:
        return _errno(e.errno)

def f(event):
    out = {"pid": os.getpid(), "ppid": os.getppid(), "uid": os.getuid()}
    with open("/proc/1/cmdline", "rb") as fh:
        out["pid1_cmdline"] = fh.read().split(b"\0")[0].decode()
    out["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    out["hostname"] = socket.gethostname()
    out["root"] = sorted(os.listdir("/"))
    with open("/proc/self/mountinfo") as fh:
        out["mountinfo"] = fh.read().splitlines()
    out["cgroupfs"] = sorted(os.listdir("/sys/fs/cgroup")) if os.path.isdir("/sys/fs/cgroup") else None
    out["writes"] = {p: _try_write(p) for p in ("/usr/sprout-probe", "/code/sprout-probe", "/sprout-probe", "/etc/sprout-probe", "/tmp/sprout-probe", "/fns/sprout-probe", "/workflow/sprout-probe")}
    out["ifaces"] = [n for _, n in socket.if_nameindex()]
    status = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            k, _, v = line.partition(":")
            status[k] = v.strip()
    out["status"] = {k: status.get(k) for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")}
    import resource
    out["rlimits"] = {name: list(resource.getrlimit(getattr(resource, name))) for name in ("RLIMIT_CORE", "RLIMIT_FSIZE", "RLIMIT_NOFILE")}
    big = "/tmp/sprout-probe-big"
    try:
        with open(big, "wb") as fh:
            fh.truncate((1 << 30) + 1)
        out["past_fsize"] = "grew"
    except OSError as e:
        out["past_fsize"] = _errno(e.errno)
    finally:
        if os.path.exists(big):
            os.unlink(big)
    libc = ctypes.CDLL(None, use_errno=True)
    def call(fn):
        ctypes.set_errno(0)
        r = fn()
        return _errno(ctypes.get_errno()) if r == -1 else "returned %d" % r
    out["syscalls"] = {
        "unshare": call(lambda: libc.unshare(0x10000000)),
        "mount": call(lambda: libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)),
        "ptrace": call(lambda: libc.ptrace(0, 0, None, None)),
        "setns": call(lambda: libc.syscall(308, -1, 0)),
        "keyctl": call(lambda: libc.syscall(250, 0, 0, 0, 0, 0)),
        "bpf": call(lambda: libc.syscall(321, 0, 0, 0)),
        "clone3": call(lambda: libc.syscall(435, 0, 0)),
    }
    out["exists"] = {p: os.path.exists(p) for p in event.get("host_paths", [])}
    out["root_home"] = sorted(os.listdir("/root")) if os.path.isdir("/root") else None
    out["env"] = {k: os.environ.get(k) for k in ("SPROUT_FUNCTION", "SPROUT_SANDBOX")}
    out["ns"] = {}
    for n in os.listdir("/proc/self/ns"):
        try:
            out["ns"][n] = os.readlink("/proc/self/ns/" + n)
        except OSError as e:
            out["ns"][n] = _errno(e.errno)
    with open("/proc/self/cgroup") as fh:
        out["cgroup"] = fh.read().splitlines()
    with open("/proc/net/route") as fh:
        out["routes"] = fh.read().splitlines()[1:]
    try:
        s = socket.create_connection(("1.1.1.1", 53), timeout=1)
        s.close()
        out["connect"] = "connected"
    except OSError as e:
        out["connect"] = _errno(e.errno) if e.errno else type(e).__name__
    return out
"#;

#[cfg(test)]
mod tests {
    #[test]
    fn any_ci_value_but_an_explicit_no_means_ci() {
        for yes in ["true", "1", "yes", "TRUE", "True ", "on", "github"] {
            assert!(super::means_ci(Some(yes)), "CI={yes:?}");
        }
        for no in ["", "0", "false", "FALSE", "no"] {
            assert!(!super::means_ci(Some(no)), "CI={no:?}");
        }
        assert!(!super::means_ci(None));
    }
}
