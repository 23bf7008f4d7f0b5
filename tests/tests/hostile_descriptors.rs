//! No process in a sandbox holds a descriptor of the host's (issue 9, finding 1).
//!
//! The shim's and the zygote's stdout and stderr were the daemon's own stderr, so a
//! handler opening `/proc/1/fd/2` or `/proc/2/fd/{1,2}` read, forged and truncated
//! the daemon's log and could fill the host's disk. Now they are a pipe the agent
//! reads, one per sandbox, forwarded to the log line by line, escaped, with a line
//! cap and a rate limit.
//!
//! - `a_function_cannot_reach_the_daemon_log_through_proc`: the hostile function
//!   (`tests/functions/hostile-descriptors`) appends, reads, truncates and `statvfs`es
//!   every `/proc/<pid>/fd/<n>` it can see, then floods the shim's stderr with 50 MiB:
//!   the log gets no line of the function's own making, loses nothing, none of it
//!   reaches the function, and it grows by the rate limit, not by the flood.
//! - `every_descriptor_in_a_sandbox_is_sprouts_own`: from the host, every descriptor
//!   of every process of a stem cell and of a bound sandbox (shim, zygote, instance, a
//!   local callee, after a freeze and a thaw) is checked: a pipe or socket held only
//!   inside the sandbox or by the agent (a socket's peer too), an anonymous inode, a
//!   memfd, or a file on one of the sandbox's own mounts that is none of the host's
//!   objects of interest (`/`, the daemon's log, the state directory and its lock).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use sprout_tests::{
    body_json, cmdline, fd_mount_id, fds, holders, json, mount_ids, require_root,
    sandbox_cgroup_dir, sandbox_frozen, text, unix_peers, wait_for, without_colours, Daemon, Env,
};

const HOSTILE_PY: &str = include_str!("../functions/hostile-descriptors/f.py");

/// The shim's command line (`rootfs::SHIM_PATH`).
const SHIM: &str = "/.sprout/shim";

/// The agent forwards at most this many bytes a second of one sandbox's output, after
/// a burst of [`BURST`] (`agent/src/sandbox_output.rs`).
const RATE: u64 = 64 << 10;
const BURST: u64 = 256 << 10;

fn hostile(env: &Env, d: &Daemon, name: &str) -> PathBuf {
    let dir = env.function("hostile-descriptors", &[("f.py", HOSTILE_PY)]);
    d.register(name, &dir, json!({"timeout_ms": 60000, "max_instances": 1}));
    dir
}

/// `VmRSS` and `VmHWM` of process `pid`, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status:\n{status}"))
            << 10
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The daemon's log file (the only `daemon-*.log` in the test's scratch directory).
fn daemon_log_path(env: &Env) -> PathBuf {
    let logs: Vec<PathBuf> = fs::read_dir(env.work_dir())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("daemon-") && n.ends_with(".log"))
        })
        .collect();
    assert_eq!(logs.len(), 1, "one daemon log: {logs:?}");
    logs.into_iter().next().unwrap()
}

/// The sum of `dropped_bytes=N` over the log's lines about `sandbox`.
fn dropped_bytes(log: &str, sandbox: &str) -> u64 {
    without_colours(log)
        .lines()
        .filter(|l| l.contains(sandbox))
        .filter_map(|l| l.split("dropped_bytes=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn a_function_cannot_reach_the_daemon_log_through_proc() {
    let env = require_root!();
    let d = env.daemon();
    let log_path = daemon_log_path(&env);
    hostile(&env, &d, "hostile");
    let r = d.invoke("hostile", r#"{"mode": "ping"}"#);
    assert_eq!(body_json(&r), json!("pong"), "{}", text(&r));
    let sandboxes = d.sandboxes();
    assert_eq!(sandboxes.len(), 1, "the function's sandbox: {sandboxes:?}");
    let sandbox = &sandboxes[0];

    let before = fs::read(&log_path).unwrap();
    assert!(
        String::from_utf8_lossy(&before).contains("agent started"),
        "the log says the agent started"
    );
    let (_, hwm_before) = memory(d.pid());
    let forged = format!("sprout-forged-{}-line", std::process::id());
    let flood_mb = 50u64;
    let r = d.invoke(
        "hostile",
        &json!({"mode": "probe", "forged": forged, "flood_mb": flood_mb}).to_string(),
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    let report = body_json(&r);
    let seen = report["seen"].as_array().expect("what the probe saw");
    eprintln!(
        "the probe saw {} descriptors; flood: {}",
        seen.len(),
        report["flood"]
    );

    // The log as it was is still there, from its first byte, and no line of it is
    // the function's: what the function wrote is quoted inside the agent's own lines
    // about the sandbox's output.
    let after = fs::read(&log_path).unwrap();
    let log = without_colours(&String::from_utf8_lossy(&after));
    assert!(
        after.starts_with(&before),
        "the daemon log lost what it had: {} bytes before the probe, now {} starting with {:?}",
        before.len(),
        after.len(),
        String::from_utf8_lossy(&after[..after.len().min(200)])
    );
    for line in log.lines().filter(|l| l.contains(&forged)) {
        assert!(
            !line.starts_with(&forged) && line.contains("sandbox output") && line.contains(sandbox),
            "a line of the function's own making in the daemon log: {line:?}"
        );
    }
    assert!(
        !log.lines().any(|l| l.trim_start().starts_with(&forged)),
        "a forged line in the daemon log"
    );

    // Nothing the function read is the log's.
    let state = env.state_dir().to_string_lossy().into_owned();
    for s in seen {
        let read = s["read"]["ok"].as_str().unwrap_or("");
        assert!(
            !read.contains("agent started") && !read.contains(&state) && !read.contains(sandbox),
            "the function read the daemon's log through /proc/{}/fd/{} ({}): {read:?}",
            s["pid"],
            s["fd"],
            s["target"]
        );
    }

    // No descriptor leads to the host's file system.
    let host = nix::sys::statvfs::statvfs(&log_path).unwrap();
    let host_fsid = host.filesystem_id() as u64;
    for s in seen {
        let st = &s["statvfs"];
        assert!(
            !(st["fsid"].as_u64() == Some(host_fsid)
                && st["blocks"].as_u64() == Some(host.blocks() as u64)),
            "statvfs of /proc/{}/fd/{} ({}) is the host file system of the daemon log: {st}",
            s["pid"],
            s["fd"],
            s["target"]
        );
    }

    // The shim's and zygote's output descriptors are one pipe (stdin: /dev/null).
    let target = |pid: u64, fd: u64| -> String {
        seen.iter()
            .find(|s| s["pid"] == pid && s["fd"] == fd)
            .and_then(|s| s["target"].as_str())
            .unwrap_or_else(|| panic!("the probe did not see /proc/{pid}/fd/{fd}: {report}"))
            .to_owned()
    };
    let output = target(1, 2);
    assert!(
        output.starts_with("pipe:["),
        "the shim's stderr is {output}, not a pipe"
    );
    for (pid, fd) in [(1, 1), (2, 1), (2, 2)] {
        assert_eq!(
            target(pid, fd),
            output,
            "/proc/{pid}/fd/{fd} is not the sandbox's output pipe"
        );
    }

    // A flood of the shim's stderr is read and dropped, not logged. The function's own
    // try may be refused (the pipe is the host root's, the sandbox's users are not);
    // then it is all the host's, written as a runaway shim would.
    let function_wrote = match report["flood"]["written"].as_u64() {
        Some(n) => {
            assert_eq!(n, flood_mb << 20, "the function's flood stopped: {report}");
            n
        }
        None => 0,
    };
    let shim = shim_pid(d.pid(), sandbox);
    let host_wrote = flood(shim, flood_mb << 20);
    let wanted = function_wrote + host_wrote;
    let settled = wait_for(Duration::from_secs(20), || {
        let log = fs::read(&log_path).unwrap();
        let dropped = dropped_bytes(&String::from_utf8_lossy(&log), sandbox);
        if dropped + BURST + 8 * RATE >= wanted {
            Ok(log)
        } else {
            Err(format!(
                "{dropped} of the {wanted} bytes of the flood reported dropped; log {} bytes",
                log.len()
            ))
        }
    });
    let log = fs::read_to_string(&log_path).unwrap();
    let settled = settled.unwrap_or_else(|e| panic!("{e}; log tail:\n{}", tail(&log)));
    let grown = settled.len().saturating_sub(before.len()) as u64;
    eprintln!(
        "the daemon log grew by {grown} bytes for a flood of {wanted} bytes (the function \
         wrote {function_wrote}); {} bytes reported dropped",
        dropped_bytes(&log, sandbox)
    );
    assert!(
        grown < 2 << 20,
        "a flood of {wanted} bytes on the shim's stderr grew the daemon log by {grown} bytes"
    );
    let (rss, hwm) = memory(d.pid());
    eprintln!(
        "agent VmHWM {} KiB before, {} KiB after; VmRSS {} KiB",
        hwm_before >> 10,
        hwm >> 10,
        rss >> 10
    );
    assert!(
        hwm.saturating_sub(hwm_before) < 32 << 20,
        "the flood took the agent's peak RSS from {} MiB to {} MiB",
        hwm_before >> 20,
        hwm >> 20
    );

    // The agent still serves.
    let r = d.invoke("hostile", r#"{"mode": "ping"}"#);
    assert_eq!(body_json(&r), json!("pong"), "{}", text(&r));
}

/// The host pid of `sandbox`'s shim.
fn shim_pid(agent: u32, sandbox: &str) -> u32 {
    let pids = sandbox_pids(agent, sandbox);
    pids.iter()
        .copied()
        .find(|&p| cmdline(p) == SHIM)
        .unwrap_or_else(|| panic!("{sandbox}: no shim among {pids:?}"))
}

/// Writes `bytes` bytes (1 KiB lines) into the shim's stderr, from the host; returns
/// how many were written.
fn flood(shim: u32, bytes: u64) -> u64 {
    use std::io::Write;
    let path = format!("/proc/{shim}/fd/2");
    let mut out = fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("open {path}: {e}"));
    let mut line = vec![b'h'; 1023];
    line.push(b'\n');
    let chunk = line.repeat(64);
    let mut written = 0;
    while written < bytes {
        out.write_all(&chunk).expect("write the flood");
        written += chunk.len() as u64;
    }
    written
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// The start of `pid`'s command line, on one line.
fn short_cmdline(pid: u32) -> String {
    cmdline(pid).replace('\n', " ").chars().take(40).collect()
}

/// The processes of `sandbox` (its cgroup's `cgroup.procs`, v1 or v2).
fn sandbox_pids(agent: u32, sandbox: &str) -> Vec<u32> {
    let procs = sandbox_cgroup_dir(agent, sandbox, "memory").join("cgroup.procs");
    fs::read_to_string(&procs)
        .unwrap_or_else(|e| panic!("{}: {e}", procs.display()))
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// What is wrong with descriptor `fd` (`target`) of `pid`, a process of a sandbox
/// whose processes are `inside`, or `None` when it is sprout's own.
#[allow(clippy::too_many_arguments)]
fn judge(
    pid: u32,
    fd: u32,
    target: &str,
    inside: &HashSet<u32>,
    agent: u32,
    holders: &HashMap<String, HashSet<u32>>,
    peers: &HashMap<u64, u64>,
    forbidden: &HashMap<(u64, u64), String>,
) -> Option<String> {
    let ours = |object: &str| -> Result<(), String> {
        let held = holders.get(object).cloned().unwrap_or_default();
        let outside: Vec<String> = held
            .iter()
            .filter(|&&p| p != agent && !inside.contains(&p))
            .map(|&p| format!("{p} ({})", short_cmdline(p)))
            .collect();
        if outside.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{object} is also held outside the sandbox by {outside:?}"
            ))
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
        return match peers.get(&ino) {
            None => Some(format!(
                "{target} is no Unix socket of the host's or the sandbox's network namespace"
            )),
            Some(0) => Some(format!("{target} has no peer")),
            Some(&peer) => {
                let peer_object = format!("socket:[{peer}]");
                if !holders.contains_key(&peer_object) {
                    Some(format!("{target}'s peer {peer_object} is held by nobody"))
                } else {
                    ours(&peer_object)
                        .err()
                        .map(|e| format!("{target}'s peer: {e}"))
                }
            }
        };
    }
    for anon in [
        "anon_inode:[eventfd]",
        "anon_inode:[signalfd]",
        "anon_inode:[eventpoll]",
        "anon_inode:[timerfd]",
        "anon_inode:inotify",
    ] {
        if target == anon {
            return None;
        }
    }
    if target.starts_with("/memfd:") {
        return None;
    }
    if !target.starts_with('/') {
        return Some(format!(
            "{target} is not sprout's (a namespace or other kernel object)"
        ));
    }
    let link = format!("/proc/{pid}/fd/{fd}");
    let meta = match fs::metadata(&link) {
        Ok(m) => m,
        Err(e) => return Some(format!("{target}: stat: {e}")),
    };
    if let Some(what) = forbidden.get(&(meta.dev(), meta.ino())) {
        return Some(format!("{target} is {what}"));
    }
    let mounts = mount_ids(pid);
    match fd_mount_id(pid, fd) {
        Some(id) if mounts.contains(&id) => None,
        Some(id) => Some(format!(
            "{target} is on mount {id}, which is not in the sandbox's mount namespace"
        )),
        None => Some(format!("{target}: no mnt_id in fdinfo")),
    }
}

#[test]
fn every_descriptor_in_a_sandbox_is_sprouts_own() {
    let env = require_root!();
    let d = env.daemon_with(&["--stem-cells", "1", "--pause-grace", "50"]);
    let agent = d.pid();
    let log_path = daemon_log_path(&env);
    hostile(&env, &d, "hostile");
    hostile(&env, &d, "hostile-callee");
    let call = json!({"mode": "call", "callee": "hostile-callee"}).to_string();
    let r = d.invoke("hostile", &call);
    assert_eq!(body_json(&r), json!("pong"), "{}", text(&r));

    // The function's sandbox: shim, zygote, instance and the local callee.
    let bound = wait_for(Duration::from_secs(20), || {
        let all = d.sandboxes();
        let bound: Vec<&String> = all
            .iter()
            .filter(|s| sandbox_pids(agent, s).len() >= 4)
            .collect();
        match bound[..] {
            [one] if all.len() == 2 => Ok(one.clone()),
            _ => Err(format!("sandboxes {all:?}, bound {bound:?}")),
        }
    })
    .unwrap_or_else(|e| panic!("no bound sandbox and stem cell: {e}"));
    // Frozen once idle, then thawed by the next call.
    let froze = wait_for(Duration::from_secs(10), || {
        sandbox_frozen(agent, &bound).then_some(()).ok_or(())
    });
    assert!(froze.is_ok(), "sandbox {bound} never froze");
    let r = d.invoke("hostile", &call);
    assert_eq!(body_json(&r), json!("pong"), "{}", text(&r));

    let sandboxes = d.sandboxes();
    assert_eq!(sandboxes.len(), 2, "the bound sandbox and a stem cell");
    let mut forbidden: HashMap<(u64, u64), String> = HashMap::new();
    let state = env.state_dir().join(agent.to_string());
    for (path, what) in [
        (PathBuf::from("/"), "the host's root"),
        (log_path.clone(), "the daemon's log"),
        (env.state_dir().to_path_buf(), "the state root"),
        (state.clone(), "the agent's state directory"),
        (state.join("lock"), "the state directory's lock"),
        (env.work_dir().to_path_buf(), "the test's scratch directory"),
    ] {
        let m = fs::metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        forbidden.insert((m.dev(), m.ino()), format!("{what} ({})", path.display()));
    }
    let holders = holders();
    let mut peers = HashMap::new();
    unix_peers(None, &mut peers);
    let mut bad = Vec::new();
    let mut checked = 0;
    let mut agent_pipes = 0;
    for sandbox in &sandboxes {
        let pids = sandbox_pids(agent, sandbox);
        assert!(pids.len() >= 3, "{sandbox}: processes {pids:?}");
        assert!(
            pids.iter().any(|&p| cmdline(p) == SHIM),
            "{sandbox}: no shim among {pids:?}"
        );
        unix_peers(Some(pids[0]), &mut peers);
        let inside: HashSet<u32> = pids.iter().copied().collect();
        for &pid in &pids {
            let all = fds(pid);
            eprintln!("{sandbox} process {pid} ({}): {all:?}", short_cmdline(pid));
            for (fd, target) in all {
                checked += 1;
                if target.starts_with("pipe:[")
                    && holders.get(&target).is_some_and(|h| h.contains(&agent))
                {
                    agent_pipes += 1;
                }
                if let Some(why) = judge(
                    pid, fd, &target, &inside, agent, &holders, &peers, &forbidden,
                ) {
                    bad.push(format!(
                        "{sandbox}: process {pid} ({}) fd {fd}: {why}",
                        short_cmdline(pid)
                    ));
                }
            }
        }
    }
    eprintln!(
        "checked {checked} descriptors in {} sandboxes; {agent_pipes} on pipes the agent reads",
        sandboxes.len()
    );
    assert!(
        bad.is_empty(),
        "descriptors in sandboxes that are not sprout's own:\n  {}",
        bad.join("\n  ")
    );
    // The shims' and zygotes' output, the instances' stdout and stderr.
    assert!(
        agent_pipes >= 6,
        "{agent_pipes} descriptors on the agent's pipes"
    );
}
