//! Forked sandboxes (issue 12), end to end: a sandbox forked from the fork server's
//! zygote against one created by libcontainer, seen from the host.
//!
//! - `a_forked_sandbox_has_every_guarantee_of_a_created_one`: one daemon forks, one
//!   creates (`--new-sandboxes create`); the same function, with limits of its own,
//!   holds an instance in each. Namespaces, cgroup, limits, ids, capabilities,
//!   `no_new_privs`, the mount points and their flags, the seccomp verdicts (filters
//!   read from the kernel with `PTRACE_SECCOMP_GET_FILTER` and run for every
//!   syscall), rlimits and hostname of every process are compared, and every
//!   descriptor of every process of both sandboxes is checked to be sprout's.
//! - `the_fork_server_holds_no_host_privilege`: its shim and zygote are the range's
//!   first uid on the host; the shim has no capability, the zygote only its four, in a
//!   user namespace of its own that the fork server's uid owns, mapped as designed;
//!   its seccomp filter is a sandbox's but for `mount` and `unshare`; its descriptors
//!   are sprout's.
//! - `killing_the_fork_server_kills_its_sandboxes_and_a_new_one_serves`: and the
//!   memory reserve follows.
//! - `memory_a_forked_sandbox_touches_is_charged_to_it`: 48 MiB to the sandbox, not
//!   to the fork server; the fork server's limit is reserved once it runs.
//! - `forked_by_default_created_on_request_and_by_the_one_shot_cli`: status counters,
//!   `X-Sprout-Start`, no fork server where sandboxes are created, and an idle forked
//!   stem cell's cgroup charged less than a created one's.
//! - `calls_and_siblings_run_in_forked_sandboxes`: an in-sandbox call (`/fns`) and a
//!   `call_async` sibling.
//!
//! How each was seen to fail (a temporary change, reverted) is said next to its
//! assertions.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use sprout_tests::{
    agent_cgroup_dir, body_json, cgroup_v2, cmdline, example, fd_mount_id, fds, holders, json,
    mount_ids, require_root, sandbox_cgroup_dir, text, under_ci, unix_peers, wait_for, write_as,
    ClientResponse, Daemon, Env, Value,
};

/// The shim's command line in a function's sandbox (`rootfs::SHIM_PATH`).
const SHIM: &str = "/.sprout/shim";

/// Each daemon of this file gets a uid range of its own (agents on one host must not
/// overlap), above the default range so that no other test's agent shares it.
const UID_BASE: u32 = 0x7000_0000 + 0x10000;
const UID_COUNT: u32 = 1024;

/// The fork server's memory limit (`agent/src/sandboxes/fork.rs`).
/// The fork server's memory limit on daemon `d`: 64 MiB of its own and 1 MiB for each
/// sandbox of the default 128 MiB its memory budget holds (what each forked sandbox
/// leaves charged to it).
fn fork_server_mb(d: &Daemon) -> u64 {
    let budget = d.status()["memory_budget_mb"].as_u64().unwrap();
    64 + budget.div_ceil(128)
}

/// `--sandbox-uid-base` and `--sandbox-uids` for the `n`th range of this file.
fn range(n: u32) -> (u32, [String; 4]) {
    let base = UID_BASE + n * UID_COUNT;
    (
        base,
        [
            "--sandbox-uid-base".into(),
            base.to_string(),
            "--sandbox-uids".into(),
            UID_COUNT.to_string(),
        ],
    )
}

/// A daemon with `args` and the `n`th uid range.
fn daemon(env: &Env, n: u32, args: &[&str]) -> (Daemon, u32) {
    let (base, ids) = range(n);
    let mut all: Vec<&str> = args.to_vec();
    all.extend(ids.iter().map(String::as_str));
    (env.daemon_with(&all), base)
}

/// Touches `event["mb"]` MiB, then (with `event["hold"]`) says so in
/// `/tmp/sprout-ready` and waits until the host writes `/tmp/sprout-release` (30 s at
/// most); returns who it ran as.
const HOLD_PY: &str = r#"import os, socket, time

def f(event):
    held = bytearray(event.get("mb", 0) << 20)
    for i in range(0, len(held), 4096):
        held[i] = 1
    released = None
    if event.get("hold"):
        with open("/tmp/sprout-ready", "w") as fh:
            fh.write(os.environ["SPROUT_SANDBOX"])
        deadline = time.monotonic() + 30
        while not os.path.exists("/tmp/sprout-release") and time.monotonic() < deadline:
            time.sleep(0.01)
        released = os.path.exists("/tmp/sprout-release")
        for p in ("/tmp/sprout-ready", "/tmp/sprout-release"):
            try:
                os.unlink(p)
            except OSError:
                pass
    return {"sandbox": os.environ["SPROUT_SANDBOX"], "hostname": socket.gethostname(),
            "uid": os.getuid(), "held": len(held), "released": released}
"#;

// ---------------------------------------------------------------------------
// What the host sees of a process

/// The fork server's sandbox id.
fn fork_server_id(agent: u32) -> String {
    format!("sprout-{agent}.forks")
}

/// The processes in cgroup `sandbox` of `agent` (memory hierarchy on v1), live ones
/// only; none when the cgroup does not exist.
fn procs(agent: u32, sandbox: &str) -> Vec<u32> {
    let file = sandbox_cgroup_dir(agent, sandbox, "memory").join("cgroup.procs");
    fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(|&p| sprout_tests::alive(p))
        .collect()
}

/// `/proc/<pid>/status` as field → value.
fn status(pid: u32) -> BTreeMap<String, String> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"))
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((
                k.to_owned(),
                v.split_whitespace().collect::<Vec<_>>().join(" "),
            ))
        })
        .collect()
}

/// The namespace `/proc/<pid>/ns/<kind>` names (`net:[4026531840]`).
fn ns(pid: impl std::fmt::Display, kind: &str) -> String {
    let link = format!("/proc/{pid}/ns/{kind}");
    fs::read_link(&link)
        .unwrap_or_else(|e| panic!("readlink {link}: {e}"))
        .to_string_lossy()
        .into_owned()
}

/// The rlimits a sandbox sets, as `/proc/<pid>/limits` lists them.
fn rlimits(pid: u32) -> Vec<String> {
    fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/limits: {e}"))
        .lines()
        .filter(|l| {
            ["Max core file size", "Max file size", "Max open files"]
                .iter()
                .any(|n| l.starts_with(n))
        })
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

/// `pid`'s cgroup in the memory and pids hierarchies (v1), or its one v2 cgroup.
fn cgroups_of(pid: u32) -> Vec<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            let wanted = if cgroup_v2() {
                controllers.is_empty()
            } else {
                controllers.split(',').any(|c| c == "memory" || c == "pids")
            };
            wanted.then(|| format!("{controllers}:{path}"))
        })
        .collect()
}

/// A cgroup file of `sandbox`, trimmed.
fn cg(agent: u32, sandbox: &str, controller: &str, file: &str) -> String {
    let path = sandbox_cgroup_dir(agent, sandbox, controller).join(file);
    fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim()
        .to_owned()
}

/// The memory, memory+swap, pids and CPU limits of `sandbox` (v1 or v2 files).
fn limits(agent: u32, sandbox: &str) -> BTreeMap<&'static str, String> {
    let mut out = BTreeMap::new();
    let memory = sandbox_cgroup_dir(agent, sandbox, "memory");
    if cgroup_v2() {
        out.insert("memory", cg(agent, sandbox, "memory", "memory.max"));
        if memory.join("memory.swap.max").exists() {
            out.insert("swap", cg(agent, sandbox, "memory", "memory.swap.max"));
        }
        out.insert("pids", cg(agent, sandbox, "pids", "pids.max"));
        out.insert("cpu", cg(agent, sandbox, "cpu", "cpu.max"));
    } else {
        out.insert(
            "memory",
            cg(agent, sandbox, "memory", "memory.limit_in_bytes"),
        );
        if memory.join("memory.memsw.limit_in_bytes").exists() {
            out.insert(
                "memsw",
                cg(agent, sandbox, "memory", "memory.memsw.limit_in_bytes"),
            );
        }
        out.insert("pids", cg(agent, sandbox, "pids", "pids.max"));
        out.insert(
            "cpu",
            format!(
                "{} {}",
                cg(agent, sandbox, "cpu", "cpu.cfs_quota_us"),
                cg(agent, sandbox, "cpu", "cpu.cfs_period_us")
            ),
        );
    }
    out
}

/// Memory charged to `sandbox`'s cgroup, in bytes.
fn memory_usage(agent: u32, sandbox: &str) -> u64 {
    let file = if cgroup_v2() {
        "memory.current"
    } else {
        "memory.usage_in_bytes"
    };
    cg(agent, sandbox, "memory", file)
        .parse()
        .expect("memory usage is a number")
}

/// The fork server's shim and zygote (host pids), once it runs.
fn fork_server(agent: u32) -> (u32, u32) {
    let id = fork_server_id(agent);
    wait_for(Duration::from_secs(10), || {
        let pids = procs(agent, &id);
        let shim = pids
            .iter()
            .copied()
            .find(|&p| cmdline(p).starts_with(SHIM) && cmdline(p).contains("fork-server"));
        let zygote = shim.and_then(|s| {
            pids.iter()
                .copied()
                .find(|&p| sprout_tests::stat(p).is_some_and(|(_, ppid)| ppid == s))
        });
        match (shim, zygote) {
            (Some(s), Some(z)) => Ok((s, z)),
            _ => Err(format!(
                "fork server {id}: processes {:?}",
                pids.iter()
                    .map(|&p| format!("{p} {}", cmdline(p)))
                    .collect::<Vec<_>>()
            )),
        }
    })
    .unwrap_or_else(|e| panic!("no fork server shim and zygote: {e}"))
}

/// The sandbox whose instance is holding (its `/tmp/sprout-ready` exists), with its
/// processes.
fn held(d: &Daemon) -> (String, Vec<u32>) {
    wait_for(Duration::from_secs(30), || {
        for sandbox in d.sandboxes() {
            let pids = procs(d.pid(), &sandbox);
            if pids
                .iter()
                .any(|p| Path::new(&format!("/proc/{p}/root/tmp/sprout-ready")).exists())
            {
                return Ok((sandbox, pids));
            }
        }
        Err(())
    })
    .unwrap_or_else(|()| panic!("no instance is holding; log:\n{}", d.log()))
}

/// Lets the instance holding in `sandbox` of `agent` return: writes its
/// `/tmp/sprout-release` as the sandbox's user (a forked sandbox's `/tmp` belongs to
/// its user namespace, where the host's root is not mapped).
fn try_release(agent: u32, sandbox: &str) -> Result<(), String> {
    for p in procs(agent, sandbox) {
        if Path::new(&format!("/proc/{p}/root/tmp/sprout-ready")).exists() {
            let s = status(p);
            let id = |k: &str| -> u32 { s[k].split(' ').next().unwrap().parse().unwrap() };
            return write_as(
                id("Uid"),
                id("Gid"),
                &format!("/proc/{p}/root/tmp/sprout-release"),
                "go",
            )
            .map_err(|e| format!("release {sandbox}: {e}"));
        }
    }
    Err(format!("{sandbox}: no process sees /tmp/sprout-ready"))
}

/// Releases the instances held in these (agent, sandbox) when dropped, also when a
/// check failed, so that a failing test does not wait out the function's 30 s.
struct Release(Vec<(u32, String)>);

impl Release {
    /// Releases them now; panics if one cannot be.
    fn now(mut self) {
        for (agent, sandbox) in std::mem::take(&mut self.0) {
            try_release(agent, &sandbox).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        for (agent, sandbox) in &self.0 {
            let _ = try_release(*agent, sandbox);
        }
    }
}

/// What the cgroup of the daemon's one stem cell is charged (bytes), once it is
/// frozen (idle).
fn idle_stem_cell_memory(d: &Daemon) -> u64 {
    let cells = d.sandboxes();
    assert_eq!(cells.len(), 1, "one stem cell: {cells:?}");
    let frozen = wait_for(Duration::from_secs(10), || {
        let state = if cgroup_v2() {
            cg(d.pid(), &cells[0], "", "cgroup.events")
        } else {
            cg(d.pid(), &cells[0], "freezer", "freezer.state")
        };
        (state == "FROZEN" || state.lines().any(|l| l == "frozen 1"))
            .then_some(())
            .ok_or(state)
    });
    if let Err(state) = frozen {
        panic!("the stem cell {} is not frozen: {state}", cells[0]);
    }
    memory_usage(d.pid(), &cells[0])
}

/// Waits until the daemon has `n` stem cells ready.
fn wait_stem_cells(d: &Daemon, n: u64) {
    let ready = wait_for(Duration::from_secs(20), || {
        let s = d.status();
        (s["stem_cells"] == n).then_some(()).ok_or(s)
    });
    if let Err(s) = ready {
        panic!("not {n} stem cells: {s}; log:\n{}", d.log());
    }
}

#[track_caller]
fn ok_json(r: &ClientResponse) -> Value {
    assert_eq!(r.status, 200, "{}", text(r));
    body_json(r)
}

fn header<'r>(r: &'r ClientResponse, name: &str) -> &'r str {
    r.header(name).unwrap_or("")
}

/// `sandboxes_forked` and `sandboxes_created` of `GET /status`.
fn made(d: &Daemon) -> (u64, u64) {
    let s = d.status();
    (
        s["sandboxes_forked"].as_u64().expect("sandboxes_forked"),
        s["sandboxes_created"].as_u64().expect("sandboxes_created"),
    )
}

// ---------------------------------------------------------------------------
// Descriptors (the judge of `hostile_descriptors.rs`)

/// The start of `pid`'s command line, on one line.
fn short_cmdline(pid: u32) -> String {
    cmdline(pid).replace('\n', " ").chars().take(40).collect()
}

/// What the descriptors of a sandbox may lead to.
struct Judge {
    agent: u32,
    holders: HashMap<String, HashSet<u32>>,
    peers: HashMap<u64, u64>,
    /// Host objects no descriptor may be: (dev, ino) → what.
    forbidden: HashMap<(u64, u64), String>,
}

impl Judge {
    /// What is wrong with descriptor `fd` (`target`) of `pid`, one of `inside` (the
    /// sandbox's processes), or `None` when it is sprout's own.
    fn judge(&self, pid: u32, fd: u32, target: &str, inside: &HashSet<u32>) -> Option<String> {
        let ours = |object: &str| -> Result<(), String> {
            let outside: Vec<String> = self
                .holders
                .get(object)
                .into_iter()
                .flatten()
                .filter(|&&p| p != self.agent && !inside.contains(&p))
                .map(|&p| format!("{p} ({})", short_cmdline(p)))
                .collect();
            if outside.is_empty() {
                Ok(())
            } else {
                Err(format!("{object} is also held outside by {outside:?}"))
            }
        };
        if target.starts_with("pipe:[") {
            return ours(target).err();
        }
        if let Some(ino) = target
            .strip_prefix("socket:[")
            .and_then(|s| s.strip_suffix(']'))
        {
            if let Err(e) = ours(target) {
                return Some(e);
            }
            let ino: u64 = ino.parse().ok()?;
            return match self.peers.get(&ino) {
                None => Some(format!("{target} is no Unix socket of the host or sandbox")),
                Some(0) => Some(format!("{target} has no peer")),
                Some(&peer) => {
                    let peer_object = format!("socket:[{peer}]");
                    if !self.holders.contains_key(&peer_object) {
                        Some(format!("{target}'s peer {peer_object} is held by nobody"))
                    } else {
                        ours(&peer_object)
                            .err()
                            .map(|e| format!("{target}'s peer: {e}"))
                    }
                }
            };
        }
        let anon = [
            "anon_inode:[eventfd]",
            "anon_inode:[signalfd]",
            "anon_inode:[eventpoll]",
            "anon_inode:[timerfd]",
            "anon_inode:inotify",
        ];
        if anon.contains(&target) || target.starts_with("/memfd:") {
            return None;
        }
        if !target.starts_with('/') {
            return Some(format!(
                "{target} is not sprout's (a namespace or other kernel object)"
            ));
        }
        let meta = match fs::metadata(format!("/proc/{pid}/fd/{fd}")) {
            Ok(m) => m,
            Err(e) => return Some(format!("{target}: stat: {e}")),
        };
        if let Some(what) = self.forbidden.get(&(meta.dev(), meta.ino())) {
            return Some(format!("{target} is {what}"));
        }
        match fd_mount_id(pid, fd) {
            Some(id) if mount_ids(pid).contains(&id) => None,
            Some(id) => Some(format!(
                "{target} is on mount {id}, not in the sandbox's mount namespace"
            )),
            None => Some(format!("{target}: no mnt_id in fdinfo")),
        }
    }

    /// Every descriptor of every process of `pids` (one sandbox): all of them listed,
    /// and what is wrong with any.
    fn sandbox(&mut self, name: &str, pids: &[u32]) -> (Vec<String>, Vec<String>) {
        unix_peers(Some(pids[0]), &mut self.peers);
        let inside: HashSet<u32> = pids.iter().copied().collect();
        let (mut all, mut bad) = (Vec::new(), Vec::new());
        for &pid in pids {
            for (fd, target) in fds(pid) {
                let line = format!("{name} {pid} ({}) fd {fd} → {target}", short_cmdline(pid));
                if let Some(why) = self.judge(pid, fd, &target, &inside) {
                    bad.push(format!("{line}: {why}"));
                }
                all.push(line);
            }
        }
        (all, bad)
    }
}

fn judge(env: &Env, agent: u32) -> Judge {
    let state = env.state_dir().join(agent.to_string());
    let mut forbidden = HashMap::new();
    for (path, what) in [
        (PathBuf::from("/"), "the host's root"),
        (env.state_dir().to_path_buf(), "the state root"),
        (state.clone(), "the agent's state directory"),
        (state.join("lock"), "the state directory's lock"),
        (env.work_dir().to_path_buf(), "the test's scratch directory"),
    ] {
        if let Ok(m) = fs::metadata(&path) {
            forbidden.insert((m.dev(), m.ino()), format!("{what} ({})", path.display()));
        }
    }
    // The daemons' logs.
    for e in fs::read_dir(env.work_dir()).unwrap().filter_map(Result::ok) {
        if e.file_name().to_string_lossy().ends_with(".log") {
            let m = e.metadata().unwrap();
            forbidden.insert(
                (m.dev(), m.ino()),
                format!("a daemon's log ({})", e.path().display()),
            );
        }
    }
    let mut peers = HashMap::new();
    unix_peers(None, &mut peers);
    Judge {
        agent,
        holders: holders(),
        peers,
        forbidden,
    }
}

// ---------------------------------------------------------------------------
// 1. The same guarantees

/// What one held sandbox looks like from the host.
struct Seen {
    agent: u32,
    sandbox: String,
    pids: Vec<u32>,
}

impl Seen {
    /// The namespaces of kind `kind` its processes are in.
    fn namespaces(&self, kind: &str) -> BTreeSet<String> {
        self.pids.iter().map(|&p| ns(p, kind)).collect()
    }

    /// One value of `f` for all its processes (asserted), with the process it came from.
    fn one<T: Ord + std::fmt::Debug + Clone>(&self, what: &str, f: impl Fn(u32) -> T) -> T {
        let all: BTreeMap<u32, T> = self.pids.iter().map(|&p| (p, f(p))).collect();
        let values: BTreeSet<T> = all.values().cloned().collect();
        assert_eq!(
            values.len(),
            1,
            "{}: its processes differ in {what}: {all:?}",
            self.sandbox
        );
        values.into_iter().next().unwrap()
    }
}

/// The mounts `pid` sees: mount point → (file system type, mount flags), the last
/// mount at each point (the one on top) in mount order.
fn mounts(pid: u32) -> Vec<(String, (String, BTreeSet<String>))> {
    fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/mountinfo: {e}"))
        .lines()
        .map(|l| {
            let (head, tail) = l.split_once(" - ").expect("mountinfo line has ' - '");
            let h: Vec<&str> = head.split(' ').collect();
            let fstype = tail.split(' ').next().unwrap_or("").to_owned();
            let flags = h[5].split(',').map(str::to_owned).collect();
            (h[4].to_owned(), (fstype, flags))
        })
        .collect()
}

/// The privilege of a process as `/proc/<pid>/status` says.
fn privilege(pid: u32) -> Vec<String> {
    let s = status(pid);
    [
        "CapEff",
        "CapPrm",
        "CapBnd",
        "CapAmb",
        "CapInh",
        "NoNewPrivs",
        "Seccomp",
    ]
    .iter()
    .map(|k| format!("{k} {}", s.get(*k).map_or("?", String::as_str)))
    .collect()
}

/// All four uids, all four gids and the groups of a process, as the host sees them.
fn ids(pid: u32) -> (String, String, String) {
    let s = status(pid);
    (s["Uid"].clone(), s["Gid"].clone(), s["Groups"].clone())
}

#[test]
fn a_forked_sandbox_has_every_guarantee_of_a_created_one() {
    let env = require_root!();
    let (forking, fork_base) = daemon(&env, 0, &["--stem-cells", "0"]);
    let (creating, create_base) =
        daemon(&env, 1, &["--stem-cells", "0", "--new-sandboxes", "create"]);
    let dir = env.function("hold", &[("f.py", HOLD_PY)]);
    let limits_json = json!({"memory_mb": 96, "cpus": 0.5, "pids": 32, "timeout_ms": 60000});
    for d in [&forking, &creating] {
        d.register("hold", &dir, limits_json.clone());
    }

    thread::scope(|s| {
        let calls: Vec<_> = [&forking, &creating]
            .map(|d| s.spawn(move || d.invoke("hold", r#"{"hold": true}"#)))
            .into();
        let (fsb, fpids) = held(&forking);
        let (csb, cpids) = held(&creating);
        let f = Seen {
            agent: forking.pid(),
            sandbox: fsb.clone(),
            pids: fpids,
        };
        let c = Seen {
            agent: creating.pid(),
            sandbox: csb.clone(),
            pids: cpids,
        };
        let release = Release(vec![
            (forking.pid(), fsb.clone()),
            (creating.pid(), csb.clone()),
        ]);
        let (fs_shim, fs_zygote) = fork_server(forking.pid());
        let server: Vec<u32> = procs(forking.pid(), &fork_server_id(forking.pid()));
        eprintln!(
            "forked {fsb}: {:?}; created {csb}: {:?}; fork server: {server:?}",
            f.pids, c.pids
        );
        for seen in [&f, &c] {
            // Shim, zygote, the instance, and the spare the shim forked.
            assert!(
                seen.pids.len() >= 3,
                "{}: processes {:?}",
                seen.sandbox,
                seen.pids
            );
            assert!(
                seen.pids.iter().any(|&p| cmdline(p) == SHIM),
                "{}: no shim among {:?}",
                seen.sandbox,
                seen.pids
            );
        }
        // No process of the creating daemon's is a fork server's.
        assert!(
            !agent_cgroup_dir(creating.pid(), "memory")
                .join(fork_server_id(creating.pid()))
                .exists(),
            "--new-sandboxes create made a fork server"
        );

        // Namespaces: each sandbox's own, one per kind for all its processes, none the
        // host's, the fork server's or the other sandbox's. (Seen failing with the
        // fork server's processes counted as the forked sandbox's.)
        for kind in ["pid", "mnt", "net", "ipc", "uts", "cgroup"] {
            let host = ns("self", kind);
            let server_ns: BTreeSet<String> = server.iter().map(|&p| ns(p, kind)).collect();
            let (fns, cns) = (f.namespaces(kind), c.namespaces(kind));
            for (seen, mine, other) in [(&f, &fns, &cns), (&c, &cns, &fns)] {
                assert_eq!(
                    mine.len(),
                    1,
                    "{}: its processes are in several {kind} namespaces: {mine:?}",
                    seen.sandbox
                );
                let one = mine.first().unwrap();
                assert_ne!(one, &host, "{}: the host's {kind} namespace", seen.sandbox);
                assert!(
                    !server_ns.contains(one),
                    "{}: the fork server's {kind} namespace {one}",
                    seen.sandbox
                );
                assert!(
                    !other.contains(one),
                    "{}: the other sandbox's {kind} namespace {one}",
                    seen.sandbox
                );
            }
        }
        // The user namespace: the forked one's is the fork server zygote's (not the
        // host's, nor the fork server shim's), the created one's the host's.
        let host_user = ns("self", "user");
        let zygote_user = ns(fs_zygote, "user");
        assert_ne!(
            zygote_user, host_user,
            "the fork server's zygote is in the host's user namespace"
        );
        assert_eq!(ns(fs_shim, "user"), host_user, "the fork server's shim");
        assert_eq!(
            f.namespaces("user"),
            BTreeSet::from([zygote_user.clone()]),
            "{fsb}: its user namespace is the fork server zygote's"
        );
        assert_eq!(
            c.namespaces("user"),
            BTreeSet::from([host_user]),
            "{csb}: a created sandbox is in the host's user namespace"
        );

        // Cgroups: every process in its sandbox's (memory and pids), and the limits
        // the function asked for, the same for both. (Seen failing with the forking
        // daemon's function registered again with 128 MiB.)
        for seen in [&f, &c] {
            let want = format!("/sprout/{}/{}", seen.agent, seen.sandbox);
            for &p in &seen.pids {
                let lines = cgroups_of(p);
                assert!(
                    !lines.is_empty(),
                    "{}: process {p} has no cgroup",
                    seen.sandbox
                );
                for line in &lines {
                    assert!(
                        line.ends_with(&format!(":{want}")),
                        "{}: process {p} ({}) is in {line}, not {want}",
                        seen.sandbox,
                        cmdline(p)
                    );
                }
            }
        }
        let (fl, cl) = (limits(f.agent, &fsb), limits(c.agent, &csb));
        eprintln!("limits: forked {fl:?}, created {cl:?}");
        assert_eq!(fl, cl, "the limits of {fsb} (forked) and {csb} (created)");
        if cgroup_v2() {
            assert_eq!(fl["memory"], (96u64 << 20).to_string());
            assert_eq!(fl["cpu"], "50000 100000");
        } else {
            assert_eq!(fl["memory"], (96u64 << 20).to_string());
            match fl.get("memsw") {
                Some(m) => assert_eq!(m, &(96u64 << 20).to_string(), "memory+swap"),
                None if under_ci() => {
                    panic!("no memory.memsw.limit_in_bytes: swap accounting is off")
                }
                None => eprintln!("*** NOT CHECKED: swap accounting is off"),
            }
            let (quota, period) = fl["cpu"].split_once(' ').unwrap();
            let ratio = quota.parse::<f64>().unwrap() / period.parse::<f64>().unwrap();
            assert!((ratio - 0.5).abs() < 0.01, "cpu {}", fl["cpu"]);
        }
        assert_eq!(fl["pids"], "32");

        // Users: each sandbox one user of its daemon's range in every slot, gid =
        // uid, no groups. (Seen failing with the forked sandbox expected to be its
        // range's first uid, which is the fork server's.)
        // The forked daemon's first uid is its fork server's; the creating daemon has
        // none, so its first sandbox takes the first.
        for (seen, first) in [(&f, fork_base + 1), (&c, create_base)] {
            let (uid, gid, groups) = seen.one("uids, gids and groups", ids);
            let uids: Vec<u32> = uid.split(' ').map(|v| v.parse().unwrap()).collect();
            assert_eq!(uids.len(), 4, "{}: Uid {uid}", seen.sandbox);
            assert!(
                uids.iter().all(|&u| u == uids[0]),
                "{}: Uid {uid}",
                seen.sandbox
            );
            assert_eq!(
                uids[0], first,
                "{}: uid {} is not the first sandbox uid of its daemon's range",
                seen.sandbox, uids[0]
            );
            assert_eq!(gid, uid, "{}: gid", seen.sandbox);
            assert_eq!(groups, "", "{}: supplementary groups", seen.sandbox);
        }

        // Privilege: the same for every process of both, and none. (Seen failing with
        // enter.py's bounding-set drop removed: CapBnd of the forked sandbox was
        // 00000000002001c0.)
        let fp = f.one("privilege", privilege);
        let cp = c.one("privilege", privilege);
        assert_eq!(fp, cp, "privilege of {fsb} (forked) and {csb} (created)");
        let none: Vec<String> = [
            "CapEff 0000000000000000",
            "CapPrm 0000000000000000",
            "CapBnd 0000000000000000",
            "CapAmb 0000000000000000",
            "CapInh 0000000000000000",
            "NoNewPrivs 1",
            "Seccomp 2",
        ]
        .map(String::from)
        .into();
        assert_eq!(fp, none, "{fsb}: privilege");

        // The root view: the same mount points, each the same kind of file system
        // with at least the created sandbox's flags (`ro`, `nosuid`, `nodev`,
        // `noexec`). Beneath a forked sandbox's own mounts lie the fork server's,
        // covered. (Seen failing with `/tmp` of the forked sandbox expected `ro`.)
        let view = |seen: &Seen| -> BTreeMap<String, (String, BTreeSet<String>)> {
            let shim = seen
                .pids
                .iter()
                .copied()
                .find(|&p| cmdline(p) == SHIM)
                .unwrap();
            mounts(shim).into_iter().collect()
        };
        let (fv, cv) = (view(&f), view(&c));
        let points = |v: &BTreeMap<String, (String, BTreeSet<String>)>| -> Vec<String> {
            v.keys().cloned().collect()
        };
        assert_eq!(
            points(&fv),
            points(&cv),
            "mount points of {fsb} (forked) and {csb} (created)"
        );
        for (point, (fstype, flags)) in &cv {
            let (ftype, fflags) = &fv[point];
            assert_eq!(ftype, fstype, "{fsb}: {point}'s file system");
            let missing: Vec<&String> = flags
                .iter()
                .filter(|o| ["ro", "nosuid", "nodev", "noexec"].contains(&o.as_str()))
                .filter(|o| !fflags.contains(*o))
                .collect();
            assert!(
                missing.is_empty(),
                "{fsb}: {point} lacks {missing:?} ({fflags:?}; created: {flags:?})"
            );
        }

        // Seccomp: what the kernel decides for every syscall (with a few first
        // arguments) is the same for every process of both. A forked sandbox has its
        // own filter (the agent's BPF) stacked on the fork server's; its own alone
        // decides as libcontainer's does. (Seen failing with enter.py's
        // `_load_seccomp()` left out; and the first filter taken for a forked
        // sandbox's own, as the kernel's index 0 is the oldest.)
        let created_verdicts = seccomp_verdicts(&seccomp_filters(c.pids[0]));
        for seen in [&f, &c] {
            for &p in &seen.pids {
                let filters = seccomp_filters(p);
                let want = if seen.sandbox == fsb { 2 } else { 1 };
                assert_eq!(
                    filters.len(),
                    want,
                    "{}: process {p}'s seccomp filters",
                    seen.sandbox
                );
                let diff = verdict_diff(&seccomp_verdicts(&filters), &created_verdicts);
                assert!(
                    diff.is_empty(),
                    "{}: process {p} ({}) gets other seccomp answers than {csb} (syscall, arg0) → (its, created's): {diff:x?}",
                    seen.sandbox,
                    short_cmdline(p)
                );
                let own = verdict_diff(&seccomp_verdicts(&filters[want - 1..]), &created_verdicts);
                assert!(
                    own.is_empty(),
                    "{}: process {p}'s own filter answers otherwise than {csb}'s: {own:x?}",
                    seen.sandbox
                );
            }
        }

        // rlimits: core, fsize, nofile the same.
        let fr = f.one("rlimits", rlimits);
        let cr = c.one("rlimits", rlimits);
        assert_eq!(fr.len(), 3, "{fr:?}");
        assert_eq!(fr, cr, "rlimits of {fsb} (forked) and {csb} (created)");

        // Descriptors: every one of every process is sprout's own. (Seen failing with
        // enter.py's `make_sandbox` neither closing the zygote's channel nor calling
        // `closerange`: the sandbox's zygote held fd 3, a socket the fork server's
        // zygote holds too.)
        let mut all = Vec::new();
        let mut bad = Vec::new();
        for (seen, d) in [(&f, &forking), (&c, &creating)] {
            let mut j = judge(&env, d.pid());
            let (a, b) = j.sandbox(&seen.sandbox, &seen.pids);
            all.extend(a);
            bad.extend(b);
        }
        eprintln!("{} descriptors:\n  {}", all.len(), all.join("\n  "));
        assert!(
            bad.is_empty(),
            "descriptors that are not sprout's own:\n  {}\nall of them:\n  {}",
            bad.join("\n  "),
            all.join("\n  ")
        );

        release.now();
        for (call, (seen, first)) in calls
            .into_iter()
            .zip([(&f, fork_base + 1), (&c, create_base)])
        {
            let r = ok_json(&call.join().unwrap());
            assert_eq!(r["released"], true, "{r}");
            assert_eq!(r["sandbox"], seen.sandbox.as_str(), "{r}");
            // The hostname inside is the sandbox id.
            assert_eq!(r["hostname"], seen.sandbox.as_str(), "{r}");
            // Inside, the function sees its host uid (the forked sandbox's user
            // namespace maps the range to itself).
            assert_eq!(r["uid"], first, "{r}");
        }
    });
    assert_eq!(
        made(&forking),
        (1, 0),
        "the forking daemon forked its sandbox"
    );
    assert_eq!(
        made(&creating),
        (0, 1),
        "the creating daemon created its sandbox"
    );
}

// ---------------------------------------------------------------------------
// 2. The fork server's privilege

/// The owner uid and the parent of user namespace `/proc/<pid>/ns/user`
/// (`NS_GET_OWNER_UID`, `NS_GET_PARENT`: ioctl_ns(2)).
fn user_ns_owner_and_parent(pid: u32) -> (u32, String) {
    const NS_GET_PARENT: libc::c_ulong = 0xb702;
    const NS_GET_OWNER_UID: libc::c_ulong = 0xb704;
    let file = fs::File::open(format!("/proc/{pid}/ns/user")).expect("open ns/user");
    let mut owner: libc::uid_t = 0;
    // SAFETY: NS_GET_OWNER_UID writes one uid_t through the pointer, which is valid.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_OWNER_UID, &mut owner) };
    assert_eq!(
        r,
        0,
        "NS_GET_OWNER_UID: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: NS_GET_PARENT takes no argument and returns a new descriptor or -1.
    let parent = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_PARENT) };
    assert!(
        parent >= 0,
        "NS_GET_PARENT: {}",
        std::io::Error::last_os_error()
    );
    let link = fs::read_link(format!("/proc/self/fd/{parent}")).unwrap();
    // SAFETY: `parent` is a descriptor this function owns.
    unsafe { libc::close(parent) };
    (owner, link.to_string_lossy().into_owned())
}

/// One classic BPF instruction: `(code, jt, jf, k)`.
type Insn = (u16, u8, u8, u32);

/// Every seccomp filter of `pid`, in the order they were installed (the kernel's
/// index 0 is the oldest), read from the host
/// with `PTRACE_SECCOMP_GET_FILTER` while the process is stopped for a moment
/// (`PTRACE_SEIZE`, `PTRACE_INTERRUPT`, then detached). The process must not be in a
/// frozen cgroup.
fn seccomp_filters(pid: u32) -> Vec<Vec<Insn>> {
    const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
    let count: usize = status(pid)
        .get("Seccomp_filters")
        .map_or(1, |n| n.parse().expect("Seccomp_filters is a number"));
    let pid = pid as libc::pid_t;
    let err = |what: &str| format!("{what} {pid}: {}", std::io::Error::last_os_error());
    // SAFETY: ptrace and waitpid on a process this thread seizes and detaches; the
    // buffer handed to the kernel is as long as the count it reported.
    unsafe {
        assert_eq!(
            libc::ptrace(libc::PTRACE_SEIZE, pid, 0, 0),
            0,
            "{}",
            err("PTRACE_SEIZE")
        );
        let read = || -> Result<Vec<Vec<Insn>>, String> {
            if libc::ptrace(libc::PTRACE_INTERRUPT, pid, 0, 0) != 0 {
                return Err(err("PTRACE_INTERRUPT"));
            }
            let mut wstatus = 0;
            if libc::waitpid(pid, &mut wstatus, libc::__WALL) != pid {
                return Err(err("waitpid"));
            }
            let mut filters = Vec::new();
            for index in 0..count {
                let none = std::ptr::null_mut::<libc::c_void>();
                let n = libc::ptrace(PTRACE_SECCOMP_GET_FILTER as _, pid, index, none);
                if n <= 0 {
                    return Err(err("PTRACE_SECCOMP_GET_FILTER"));
                }
                let empty = libc::sock_filter {
                    code: 0,
                    jt: 0,
                    jf: 0,
                    k: 0,
                };
                let mut prog = vec![empty; n as usize];
                if libc::ptrace(
                    PTRACE_SECCOMP_GET_FILTER as _,
                    pid,
                    index,
                    prog.as_mut_ptr(),
                ) != n
                {
                    return Err(err("PTRACE_SECCOMP_GET_FILTER (again)"));
                }
                filters.push(prog.iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect());
            }
            Ok(filters)
        };
        let result = read();
        assert_eq!(
            libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0),
            0,
            "{}",
            err("PTRACE_DETACH")
        );
        result.unwrap_or_else(|e| panic!("{e}"))
    }
}

/// A BPF program as the agent exports it (`/.sprout/seccomp.bpf`: `struct
/// sock_filter`s, native byte order).
fn bpf_file(path: &Path) -> Vec<Insn> {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert_eq!(
        bytes.len() % 8,
        0,
        "{}: {} bytes",
        path.display(),
        bytes.len()
    );
    bytes
        .chunks(8)
        .map(|c| {
            (
                u16::from_ne_bytes([c[0], c[1]]),
                c[2],
                c[3],
                u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
            )
        })
        .collect()
}

/// The first arguments each syscall is tried with: none, and namespace flags
/// (`CLONE_NEWUSER`; the six a forked sandbox's child unshares; all seven).
const ARG0S: [u64; 4] = [0, 0x1000_0000, 0x6e02_0000, 0x7e02_0000];

/// What the kernel decides, with `filters` stacked, for every x86-64 syscall number
/// below 460 with each of [`ARG0S`]: the most restrictive answer of all the filters
/// (the lowest action as a signed number, as the kernel orders them).
fn seccomp_verdicts(filters: &[Vec<Insn>]) -> BTreeMap<(u32, u64), u32> {
    let mut out = BTreeMap::new();
    for nr in 0..460 {
        for arg0 in ARG0S {
            let verdict = filters
                .iter()
                .map(|f| seccomp_action(f, nr, [arg0, 0, 0, 0, 0, 0]))
                .min_by_key(|&r| (r & 0xffff_0000) as i32)
                .expect("at least one filter");
            out.insert((nr, arg0), verdict);
        }
    }
    out
}

/// Where two verdict maps differ: `(nr, arg0) → (left, right)`.
fn verdict_diff(
    left: &BTreeMap<(u32, u64), u32>,
    right: &BTreeMap<(u32, u64), u32>,
) -> BTreeMap<(u32, u64), (u32, u32)> {
    left.iter()
        .filter(|(k, v)| right.get(k) != Some(v))
        .map(|(k, &v)| (*k, (v, right[k])))
        .collect()
}

/// What classic BPF seccomp program `prog` returns for syscall `nr` with `args` on
/// x86-64 (a small interpreter of the instructions libseccomp emits).
fn seccomp_action(prog: &[(u16, u8, u8, u32)], nr: u32, args: [u64; 6]) -> u32 {
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    let mut data = [0u8; 64];
    data[0..4].copy_from_slice(&nr.to_le_bytes());
    data[4..8].copy_from_slice(&AUDIT_ARCH_X86_64.to_le_bytes());
    for (i, a) in args.iter().enumerate() {
        data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
    }
    let word = |k: u32| u32::from_le_bytes(data[k as usize..k as usize + 4].try_into().unwrap());
    let (mut a, mut x, mut mem, mut pc) = (0u32, 0u32, [0u32; 16], 0usize);
    loop {
        let (code, jt, jf, k) = prog[pc];
        pc += 1;
        let src = if code & 0x08 != 0 { x } else { k };
        match code {
            0x20 => a = word(k),
            0x00 => a = k,
            0x01 => x = k,
            0x60 => a = mem[k as usize],
            0x61 => x = mem[k as usize],
            0x02 => mem[k as usize] = a,
            0x03 => mem[k as usize] = x,
            0x07 => x = a,
            0x87 => a = x,
            0x06 => return k,
            0x16 => return a,
            0x05 => pc += k as usize,
            c if c & 0x07 == 0x04 => {
                a = match c & 0xf0 {
                    0x00 => a.wrapping_add(src),
                    0x10 => a.wrapping_sub(src),
                    0x20 => a.wrapping_mul(src),
                    0x40 => a | src,
                    0x50 => a & src,
                    0x60 => a.wrapping_shl(src),
                    0x70 => a.wrapping_shr(src),
                    0x80 => a.wrapping_neg(),
                    0xa0 => a ^ src,
                    _ => panic!("seccomp program: ALU op {c:#x} at {}", pc - 1),
                }
            }
            c if c & 0x07 == 0x05 => {
                let taken = match c & 0xf0 {
                    0x10 => a == src,
                    0x20 => a > src,
                    0x30 => a >= src,
                    0x40 => a & src != 0,
                    _ => panic!("seccomp program: jump {c:#x} at {}", pc - 1),
                };
                pc += usize::from(if taken { jt } else { jf });
            }
            c => panic!("seccomp program: instruction {c:#x} at {}", pc - 1),
        }
    }
}

/// `SECCOMP_RET_ALLOW`'s action bits.
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;

#[test]
fn the_fork_server_holds_no_host_privilege() {
    let env = require_root!();
    let (d, base) = daemon(&env, 2, &["--stem-cells", "1"]);
    // Once a stem cell was forked, the zygote is mapped and has dropped what it does
    // not keep.
    wait_stem_cells(&d, 1);
    let (shim, zygote) = fork_server(d.pid());
    let host_user = ns("self", "user");

    // Both are the range's first uid in every slot, without groups. (Seen failing
    // with the expected uid made base + 1.)
    let want = format!("{base} {base} {base} {base}");
    for (what, p) in [("shim", shim), ("zygote", zygote)] {
        let (uid, gid, groups) = ids(p);
        assert_eq!(uid, want, "the fork server's {what} (pid {p}): Uid");
        assert_eq!(gid, want, "the fork server's {what} (pid {p}): Gid");
        assert_eq!(groups, "", "the fork server's {what} (pid {p}): Groups");
    }
    // The shim: nothing, in the host's user namespace.
    let s = status(shim);
    for k in ["CapEff", "CapPrm", "CapBnd", "CapAmb"] {
        assert_eq!(s[k], "0000000000000000", "the fork server's shim: {k}");
    }
    assert_eq!(s["NoNewPrivs"], "1", "the fork server's shim");
    assert_eq!(s["Seccomp"], "2", "the fork server's shim");
    assert_eq!(
        ns(shim, "user"),
        host_user,
        "the fork server's shim's user namespace"
    );

    // The zygote: SYS_ADMIN, SETUID, SETGID, SETPCAP, in a user namespace of its own,
    // made by (owned by) the fork server's uid, a child of the host's. (Seen failing
    // with KEEP_CAPS in enter.py given CAP_DAC_OVERRIDE too.)
    let z = status(zygote);
    for k in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(z[k], "00000000002001c0", "the fork server's zygote: {k}");
    }
    for k in ["CapAmb", "CapInh"] {
        assert_eq!(z[k], "0000000000000000", "the fork server's zygote: {k}");
    }
    assert_eq!(z["NoNewPrivs"], "1", "the fork server's zygote");
    assert_eq!(z["Seccomp"], "2", "the fork server's zygote");
    assert_ne!(
        ns(zygote, "user"),
        host_user,
        "the zygote is in the host's user namespace"
    );
    let (owner, parent) = user_ns_owner_and_parent(zygote);
    assert_eq!(owner, base, "the owner of the zygote's user namespace");
    assert_eq!(
        parent, host_user,
        "the parent of the zygote's user namespace"
    );
    // Its maps: inside 0 is the fork server's uid, the rest of its window of the
    // range's first half (forked sandboxes' uids) itself; the package zygotes'
    // windows (the last quarter of the first half: 16 of 8 uids with this range) and
    // the second half (created sandboxes') unmapped.
    for file in ["uid_map", "gid_map"] {
        let map: Vec<Vec<u32>> = fs::read_to_string(format!("/proc/{zygote}/{file}"))
            .unwrap()
            .lines()
            .map(|l| l.split_whitespace().map(|v| v.parse().unwrap()).collect())
            .collect();
        assert_eq!(
            map,
            vec![
                vec![0, base, 1],
                vec![base + 1, base + 1, UID_COUNT.div_ceil(2) * 3 / 4 - 1]
            ],
            "the zygote's {file}"
        );
    }
    // Its namespaces other than the user one are the fork server's sandbox's (the
    // shim's), none the host's.
    for kind in ["pid", "mnt", "net", "ipc", "uts", "cgroup"] {
        assert_eq!(
            ns(zygote, kind),
            ns(shim, kind),
            "{kind} of the zygote and its shim"
        );
        assert_ne!(
            ns(shim, kind),
            ns("self", kind),
            "the fork server's {kind} namespace"
        );
    }
    // Its seccomp filter (read from the kernel, run here): `unshare` (of any
    // namespace, a user namespace too: the zygote makes its own) and `mount` are
    // allowed, administration syscalls are not: `setns`, `ptrace`, `keyctl`...
    // (Seen failing with `setns` expected allowed.) The filter of a sandbox forked
    // from it, stacked on it, is probed from inside by
    // `the_isolation_probe_sees_the_same_inside_a_forked_sandbox` (the isolation
    // tests' own probes run the one-shot CLI, which creates).
    let filters = seccomp_filters(zygote);
    assert_eq!(
        filters.len(),
        1,
        "the fork server's zygote has one filter (libcontainer's)"
    );
    let filter = &filters[0];
    const CLONE_CHILD_NAMESPACES: u64 =
        0x0002_0000 | 0x0200_0000 | 0x0400_0000 | 0x0800_0000 | 0x2000_0000 | 0x4000_0000;
    let action =
        |nr: u32, arg0: u64| seccomp_action(filter, nr, [arg0, 0, 0, 0, 0, 0]) & 0xffff_0000;
    for (name, nr, arg0) in [
        ("getpid", 39, 0),
        (
            "unshare (a child's namespaces)",
            272,
            CLONE_CHILD_NAMESPACES,
        ),
        ("mount", 165, 0),
    ] {
        assert_eq!(
            action(nr, arg0),
            SECCOMP_RET_ALLOW,
            "the fork server's filter denies {name}"
        );
    }
    for (name, nr) in [
        ("setns", 308),
        ("ptrace", 101),
        ("keyctl", 250),
        ("bpf", 321),
        ("kexec_load", 246),
        ("init_module", 175),
        ("open_by_handle_at", 304),
    ] {
        assert_ne!(
            action(nr, 0),
            SECCOMP_RET_ALLOW,
            "the fork server's filter allows {name}"
        );
    }
    eprintln!(
        "the fork server's filter: {} instructions; unshare(CLONE_NEWUSER) → {:#x}",
        filter.len(),
        seccomp_action(filter, 272, [0x1000_0000, 0, 0, 0, 0, 0])
    );

    // Against the sandbox's filter (the BPF the agent exports for forked sandboxes,
    // from the spec libcontainer's sandboxes get), it differs in `unshare` and
    // `mount` alone, which it allows. (Seen failing with `setns` added to the
    // expected differences.)
    let sandbox_filter = bpf_file(
        &env.state_dir()
            .join(d.pid().to_string())
            .join("runtime/seccomp.bpf"),
    );
    let diff = verdict_diff(
        &seccomp_verdicts(std::slice::from_ref(filter)),
        &seccomp_verdicts(&[sandbox_filter]),
    );
    eprintln!("the fork server's filter against a sandbox's: {diff:x?}");
    let syscalls: BTreeSet<u32> = diff.keys().map(|&(nr, _)| nr).collect();
    assert_eq!(
        syscalls,
        BTreeSet::from([165, 272]),
        "the fork server's filter differs from a sandbox's in other syscalls than mount and unshare: {diff:x?}"
    );
    for ((nr, arg0), (server, sandbox)) in &diff {
        assert_eq!(
            server & 0xffff_0000,
            SECCOMP_RET_ALLOW,
            "syscall {nr} ({arg0:#x})"
        );
        assert_ne!(
            sandbox & 0xffff_0000,
            SECCOMP_RET_ALLOW,
            "syscall {nr} ({arg0:#x})"
        );
    }

    // Its descriptors, too, are sprout's own (nothing of the host's reaches the
    // sandboxes it forks). (Seen failing with the fork server's zygote left out of
    // its own processes: its channel to the shim is then held outside.)
    let server = procs(d.pid(), &fork_server_id(d.pid()));
    let (all, bad) = judge(&env, d.pid()).sandbox(&fork_server_id(d.pid()), &server);
    eprintln!("the fork server's descriptors:\n  {}", all.join("\n  "));
    assert!(
        bad.is_empty(),
        "descriptors of the fork server that are not sprout's own:\n  {}\nall of them:\n  {}",
        bad.join("\n  "),
        all.join("\n  ")
    );

    // Its cgroup: the fork server's, with its limit.
    assert_eq!(
        cg(
            d.pid(),
            &fork_server_id(d.pid()),
            "memory",
            if cgroup_v2() {
                "memory.max"
            } else {
                "memory.limit_in_bytes"
            }
        ),
        (fork_server_mb(&d) << 20).to_string()
    );
    // Nothing of the fork server is among the pool's sandboxes.
    let st = d.status();
    assert_eq!(st["sandboxes"], 1, "the stem cell only: {st}");
}

// ---------------------------------------------------------------------------
// 3. Killing the fork server

#[test]
fn killing_the_fork_server_kills_its_sandboxes_and_a_new_one_serves() {
    let env = require_root!();
    let (d, _) = daemon(&env, 3, &["--stem-cells", "0"]);
    let dir = env.function("hold", &[("f.py", HOLD_PY)]);
    d.register("hold", &dir, json!({}));
    d.register("other", &dir, json!({}));
    d.register("third", &dir, json!({}));
    let first = ok_json(&d.invoke("hold", "{}"));
    let sandbox = first["sandbox"].as_str().unwrap().to_owned();
    let victims = procs(d.pid(), &sandbox);
    assert!(victims.len() >= 3, "{sandbox}: {victims:?}");
    let (shim, zygote) = fork_server(d.pid());
    let (forked, created) = made(&d);
    assert_eq!((forked, created), (1, 0));

    // SIGKILL to the fork server's shim alone (a pid this test found in its cgroup).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the fork server's shim");
    // Its pid namespace ends, and with it the nested ones of the sandboxes forked
    // from it. (Seen failing with the agent's own pid, which lives on, added to the
    // processes that must die.)
    let gone = wait_for(Duration::from_secs(10), || {
        let left: Vec<u32> = victims
            .iter()
            .chain([&zygote])
            .copied()
            .filter(|&p| sprout_tests::alive(p))
            .collect();
        left.is_empty().then_some(()).ok_or(left)
    });
    if let Err(left) = gone {
        panic!("still alive after the fork server's death: {left:?}");
    }

    // The agent sees its instance dead (its pool manager looks every 250 ms) and
    // destroys its sandbox; the next call is served from a new one.
    let noticed = wait_for(Duration::from_secs(5), || {
        let s = d.status();
        (s["sandboxes"] == 0 && d.sandboxes().is_empty())
            .then_some(())
            .ok_or(s)
    });
    if let Err(s) = noticed {
        panic!(
            "the dead sandbox {sandbox} is still the daemon's: {s}; log:\n{}",
            d.log()
        );
    }
    let again = ok_json(&d.invoke("hold", "{}"));
    assert_ne!(again["sandbox"], sandbox.as_str(), "{again}");
    // The first new sandbox after the death is created (its fork finds the fork
    // server gone); the next makes a new fork server, but its own uid was taken
    // before the fork server's, so it is below the new one's map and created too
    // (reported: the agent could tell before forking). The one after is forked.
    let next = ok_json(&d.invoke("other", "{}"));
    let third = ok_json(&d.invoke("third", "{}"));
    let (forked_after, created_after) = made(&d);
    eprintln!(
        "after the kill: {} then {} then {}; forked {forked_after}, created {created_after}",
        again["sandbox"], next["sandbox"], third["sandbox"]
    );
    assert!(
        forked_after > forked,
        "no sandbox was forked after the fork server died: forked {forked_after}, created \
         {created_after}; log:\n{}",
        d.log()
    );
    let (new_shim, _) = fork_server(d.pid());
    assert_ne!(new_shim, shim, "the fork server was made again");
    for name in ["hold", "other", "third"] {
        ok_json(&d.invoke(name, "{}"));
    }
    // The dead fork server's reserve was given back, the new one's taken: three
    // sandboxes of the default 128 MiB and one fork server. (Seen failing with the
    // fork server's reserve counted twice in the expectation.)
    let st = d.status();
    assert_eq!(st["sandboxes"], 3, "{st}");
    assert_eq!(st["reserved_mb"], fork_server_mb(&d) + 3 * 128, "{st}");
}

// ---------------------------------------------------------------------------
// 4. Memory

#[test]
fn memory_a_forked_sandbox_touches_is_charged_to_it() {
    let env = require_root!();
    let (d, _) = daemon(&env, 4, &["--stem-cells", "0"]);
    let dir = env.function("hold", &[("f.py", HOLD_PY)]);
    // The default memory limit, which a stem cell reserves as it is made.
    const SANDBOX_MB: u64 = 128;
    d.register(
        "hold",
        &dir,
        json!({"memory_mb": SANDBOX_MB, "timeout_ms": 60000}),
    );
    // No fork server before the first sandbox is needed, and nothing reserved.
    assert_eq!(d.status()["reserved_mb"], 0);
    assert!(!agent_cgroup_dir(d.pid(), "memory")
        .join(fork_server_id(d.pid()))
        .exists());
    let r = ok_json(&d.invoke("hold", "{}"));
    let sandbox = r["sandbox"].as_str().unwrap().to_owned();
    let server = fork_server_id(d.pid());
    let st = d.status();
    let (reserved, sandboxes) = (
        st["reserved_mb"].as_u64().unwrap(),
        st["sandboxes"].as_u64().unwrap(),
    );
    // One sandbox of the default memory (reserved as it was made) and the fork server.
    // (Seen failing with the fork server's 64 MiB left out of the sum.)
    eprintln!("status with one sandbox and the fork server: {st}");
    assert_eq!(sandboxes, 1, "{st}");
    assert_eq!(
        reserved,
        fork_server_mb(&d) + SANDBOX_MB,
        "reserved_mb: the fork server's {} MiB and the sandbox's {SANDBOX_MB}: {st}",
        fork_server_mb(&d)
    );

    let (sandbox_before, server_before) = (
        memory_usage(d.pid(), &sandbox),
        memory_usage(d.pid(), &server),
    );
    thread::scope(|s| {
        // 49 MiB touched: the 48 the check wants and a margin for what the sandbox
        // frees meanwhile (one run saw 4 KiB less than 48 MiB with 48 touched).
        let call = s.spawn(|| d.invoke("hold", r#"{"hold": true, "mb": 49}"#));
        let (held_in, _) = held(&d);
        let release = Release(vec![(d.pid(), held_in.clone())]);
        assert_eq!(held_in, sandbox);
        let (sandbox_after, server_after) = (
            memory_usage(d.pid(), &sandbox),
            memory_usage(d.pid(), &server),
        );
        release.now();
        let r = ok_json(&call.join().unwrap());
        assert_eq!(r["held"], 49 << 20, "{r}");
        let grew = sandbox_after as i64 - sandbox_before as i64;
        let server_grew = server_after as i64 - server_before as i64;
        eprintln!(
            "49 MiB touched: the sandbox's charge grew by {:.1} MiB ({sandbox_before} → {sandbox_after}), \
             the fork server's by {:.2} MiB ({server_before} → {server_after})",
            grew as f64 / 1048576.0,
            server_grew as f64 / 1048576.0
        );
        // (Seen failing with the two cgroups swapped.)
        assert!(
            grew >= 48 << 20,
            "the sandbox's charge grew by {grew} bytes only"
        );
        assert!(
            server_grew < 4 << 20,
            "the fork server's charge grew by {server_grew} bytes"
        );
    });
}

// ---------------------------------------------------------------------------
// 5. Status and modes

#[test]
fn forked_by_default_created_on_request_and_by_the_one_shot_cli() {
    let env = require_root!();
    let dir = env.function("hold", &[("f.py", HOLD_PY)]);

    // The default: stem cells are forked, and so is a cold start with none ready.
    let forked_idle = {
        let (d, _) = daemon(&env, 5, &["--stem-cells", "1"]);
        wait_stem_cells(&d, 1);
        assert_eq!(made(&d), (1, 0), "the stem cell was forked");
        let idle = idle_stem_cell_memory(&d);
        d.register("a", &dir, json!({}));
        let r = d.invoke("a", "{}");
        ok_json(&r);
        assert_eq!(header(&r, "X-Sprout-Start"), "stem_cell");
        idle
    };
    {
        let (d, _) = daemon(&env, 6, &["--stem-cells", "0"]);
        d.register("a", &dir, json!({}));
        d.register("b", &dir, json!({}));
        for (name, n) in [("a", 1), ("b", 2)] {
            let r = d.invoke(name, "{}");
            ok_json(&r);
            assert_eq!(header(&r, "X-Sprout-Start"), "new_sandbox");
            // (Seen failing under --new-sandboxes create.)
            assert_eq!(made(&d), (n, 0), "a cold start with no stem cell forks");
        }
    }

    // --new-sandboxes create: no fork server, ever.
    {
        let (d, _) = daemon(&env, 7, &["--stem-cells", "1", "--new-sandboxes", "create"]);
        let forks = agent_cgroup_dir(d.pid(), "memory").join(fork_server_id(d.pid()));
        wait_stem_cells(&d, 1);
        let created_idle = idle_stem_cell_memory(&d);
        eprintln!(
            "an idle stem cell's cgroup is charged {:.2} MiB forked, {:.2} MiB created",
            forked_idle as f64 / 1048576.0,
            created_idle as f64 / 1048576.0
        );
        // The forked one shares the zygote's pages, charged to the fork server.
        // (Seen failing with the comparison reversed.)
        assert!(
            forked_idle < created_idle,
            "an idle forked stem cell is charged {forked_idle} bytes, a created one {created_idle}"
        );
        d.register("a", &dir, json!({}));
        d.register("b", &dir, json!({}));
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut n = 0;
        while Instant::now() < deadline || n < 3 {
            assert!(
                !forks.exists(),
                "{} exists under --new-sandboxes create",
                forks.display()
            );
            if n < 3 {
                ok_json(&d.invoke(["a", "b", "a"][n], "{}"));
                n += 1;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let (forked, created) = made(&d);
        assert_eq!(forked, 0, "--new-sandboxes create forked");
        assert!(created >= 2, "created {created}");
    }

    // The one-shot CLI creates: while it runs, its agent has a sandbox and no fork
    // server. (Seen failing with the check looking for the sandbox's own cgroup.)
    let mut child = env
        .sprout()
        .arg("invoke")
        .arg(&dir)
        .arg(r#"{"hold": true}"#)
        .spawn();
    let agent = child.id();
    let root = agent_cgroup_dir(agent, "memory");
    let sandbox = wait_for(Duration::from_secs(20), || {
        let names = sprout_tests::sandbox_cgroups(agent);
        match names.first() {
            Some(s) if !procs(agent, s).is_empty() => Ok(s.clone()),
            _ => Err(names),
        }
    });
    let sandbox = match sandbox {
        Ok(s) => s,
        Err(names) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the one-shot agent {agent} made no sandbox: {names:?}");
        }
    };
    let forks = root.join(fork_server_id(agent));
    let had_forks = forks.exists();
    let ready = wait_for(Duration::from_secs(20), || {
        let p = procs(agent, &sandbox);
        p.iter()
            .any(|p| Path::new(&format!("/proc/{p}/root/tmp/sprout-ready")).exists())
            .then_some(())
            .ok_or(())
    });
    let had_forks = had_forks || forks.exists();
    let user = procs(agent, &sandbox).first().map(|&p| ns(p, "user"));
    if ready.is_ok() {
        let _ = try_release(agent, &sandbox);
    }
    let exit = wait_for(Duration::from_secs(30), || {
        child.try_wait().unwrap().ok_or(())
    });
    if exit.is_err() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("sprout invoke did not finish");
    }
    assert!(ready.is_ok(), "the one-shot's instance never held");
    assert!(exit.unwrap().success(), "sprout invoke failed");
    assert!(
        !had_forks,
        "the one-shot CLI made a fork server ({})",
        forks.display()
    );
    assert_eq!(
        user,
        Some(ns("self", "user")),
        "the one-shot's sandbox is a created one (host user namespace)"
    );
    env.assert_clean_within(agent, Duration::from_secs(5));
}

// ---------------------------------------------------------------------------
// 6. Calls

const ASYNC_PY: &str = r#"import sprout, os

def f(event):
    future = sprout.call_async("ponger", {"from": "async"})
    return {"sibling": future.result(timeout=30), "me": os.environ["SPROUT_SANDBOX"]}
"#;

#[test]
fn calls_and_siblings_run_in_forked_sandboxes() {
    let env = require_root!();
    let (d, _) = daemon(&env, 8, &["--stem-cells", "0"]);
    d.register("pinger", &example("pinger"), json!({}));
    d.register("ponger", &example("ponger"), json!({}));
    let asyncer = env.function("asyncer", &[("f.py", ASYNC_PY)]);
    d.register("asyncer", &asyncer, json!({}));

    // In the caller's sandbox: the callee attached under /fns, forked from its zygote.
    let r = ok_json(&d.invoke("pinger", r#""ponger""#));
    assert_eq!(r, json!("ping to ponger...pong from ponger: ponged"));
    assert_eq!(
        made(&d),
        (1, 0),
        "the pinger's sandbox is forked; its call stays in it"
    );

    // A sibling: another forked sandbox. (Both checks seen failing under
    // `--new-sandboxes create`.)
    let r = ok_json(&d.invoke("asyncer", "{}"));
    assert_eq!(r["sibling"], "ponged", "{r}");
    let (forked, created) = made(&d);
    assert_eq!(created, 0, "nothing was created");
    assert!(
        forked >= 3,
        "the caller's and its sibling's sandboxes were forked: {forked}"
    );
    // Every sandbox is in the fork server zygote's user namespace.
    let (_, zygote) = fork_server(d.pid());
    let zygote_user = ns(zygote, "user");
    for sandbox in d.sandboxes() {
        for p in procs(d.pid(), &sandbox) {
            assert_eq!(
                ns(p, "user"),
                zygote_user,
                "{sandbox}: process {p} ({})",
                cmdline(p)
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 7. The isolation probe, from inside

/// What legitimately differs between two sandboxes' probe reports: ids, pids,
/// namespace inodes, the sandbox's name, and the mount table (compared from the host
/// by `a_forked_sandbox_has_every_guarantee_of_a_created_one`).
const PER_SANDBOX: [&str; 8] = [
    "pid",
    "ppid",
    "uid",
    "pids",
    "hostname",
    "env",
    "ns",
    "mountinfo",
];

#[test]
fn the_isolation_probe_sees_the_same_inside_a_forked_sandbox() {
    let env = require_root!();
    let (forking, _) = daemon(&env, 9, &["--stem-cells", "0"]);
    let (creating, _) = daemon(
        &env,
        10,
        &["--stem-cells", "0", "--new-sandboxes", "create"],
    );
    let dir = env.function("probe", &[("f.py", sprout_tests::ISOLATION_PROBE_PY)]);
    let event = json!({
        "host_paths": [
            "/work", "/home", "/root/.cargo", "/etc/hostname", "/etc/shadow",
            "/run/sprout", env.state_dir(), env.work_dir(), &dir,
            "/sys/fs/cgroup/memory", "/sys/fs/cgroup/cgroup.procs",
        ]
    })
    .to_string();
    let mut reports = Vec::new();
    for d in [&forking, &creating] {
        d.register("probe", &dir, json!({}));
        reports.push(ok_json(&d.invoke("probe", &event)));
    }
    assert_eq!(made(&forking), (1, 0), "the probe ran in a forked sandbox");
    assert_eq!(made(&creating), (0, 1), "and in a created one");
    let (forked, created) = (&reports[0], &reports[1]);
    // What the isolation tests require, in the forked sandbox. (Seen failing with
    // enter.py's `_load_seccomp()` left out: `unshare(CLONE_NEWUSER)` "returned 0".)
    assert_eq!(forked["pid1_cmdline"], SHIM, "{forked}");
    assert_eq!(
        forked["hostname"], forked["env"]["SPROUT_SANDBOX"],
        "{forked}"
    );
    let cgroupfs = &forked["cgroupfs"];
    assert!(
        cgroupfs.is_null() || cgroupfs == &json!([]),
        "/sys/fs/cgroup should be absent or empty: {forked}"
    );
    assert_eq!(forked["ifaces"], json!(["lo"]), "{forked}");
    assert_eq!(forked["routes"], json!([]), "{forked}");
    for (name, got) in forked["syscalls"].as_object().unwrap() {
        assert!(
            got.as_str().is_some_and(|r| !r.starts_with("returned")),
            "{name} succeeded in a forked sandbox: {got}"
        );
    }
    for (path, seen) in forked["exists"].as_object().unwrap() {
        assert_eq!(seen, false, "{path} is visible in a forked sandbox");
    }
    // And everything it saw is what a created sandbox's function sees.
    let mut differ = Vec::new();
    for (key, value) in created.as_object().unwrap() {
        if !PER_SANDBOX.contains(&key.as_str()) && forked.get(key) != Some(value) {
            differ.push(format!("{key}: forked {}, created {value}", forked[key]));
        }
    }
    assert!(
        differ.is_empty(),
        "the probe saw otherwise in a forked sandbox:\n  {}",
        differ.join("\n  ")
    );
    // The ids differ only by sandbox (each its own uid, both unprivileged).
    assert_ne!(forked["uid"], created["uid"]);
    assert!(forked["pids"].as_array().unwrap().len() <= 5, "{forked}");
}
