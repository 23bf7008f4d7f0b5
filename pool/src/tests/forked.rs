//! Root tests of forked sandboxes with a real spawner: a fork server's container made
//! from `rootfs::zygote_spec`, probed from inside; adopting a process started outside
//! libcontainer as a sandbox. They need root and a cgroup file system; without root
//! they say so and pass, except under `CI`, where that is a failure.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use pool::{Cgroups, Spawner, StateDir};
use rootfs::{Limits, SandboxConfig, SandboxUids, SandboxUser, Skeleton};

fn root_or_skip(test: &str) -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| {
        !matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "" | "0" | "false" | "no"
        )
    });
    assert!(
        !ci,
        "{test}: needs root (CI is set: a skipped test is a failure)"
    );
    eprintln!("*** SKIPPED {test}: not running as root");
    false
}

/// One agent at a time: an agent's cgroup is named after the process (this test
/// binary), so two at once would share it, and one's end would kill the other's.
static ONE_AGENT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A state directory under `/run`, its cgroups, a spawner, a skeleton and a runtime
/// directory; everything goes at drop.
struct Agent {
    _turn: std::sync::MutexGuard<'static, ()>,
    _root: tempfile::TempDir,
    state: Option<StateDir>,
    cgroups: Cgroups,
    spawner: Spawner,
    skeleton: Skeleton,
    runtime_dir: PathBuf,
    work: tempfile::TempDir,
}

impl Agent {
    fn start() -> Agent {
        use std::os::unix::fs::PermissionsExt;
        let turn = ONE_AGENT.lock().unwrap_or_else(|e| e.into_inner());
        let root = tempfile::Builder::new()
            .prefix("sprout-test-")
            .tempdir_in("/run")
            .unwrap();
        let state = StateDir::acquire(root.path()).unwrap();
        let cgroups = Cgroups::detect().unwrap();
        cgroups.make(&state.cgroup_parent()).unwrap();
        let skeleton = Skeleton::create(&state.path().join("rootfs")).unwrap();
        let runtime_dir = state.path().join("runtime");
        std::fs::create_dir_all(&runtime_dir).unwrap();
        std::fs::write(runtime_dir.join("shim"), "").unwrap();
        std::fs::set_permissions(&runtime_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let exe = PathBuf::from(env!("CARGO_BIN_EXE_sprout-spawner"));
        let spawner = Spawner::start(&exe, &state, &cgroups).unwrap();
        let work = tempfile::Builder::new()
            .prefix("sprout-test-work-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Agent {
            _turn: turn,
            _root: root,
            state: Some(state),
            cgroups,
            spawner,
            skeleton,
            runtime_dir,
            work,
        }
    }

    fn state(&self) -> &StateDir {
        self.state.as_ref().unwrap()
    }

    fn config(&self, id: &str, code: &Path) -> SandboxConfig {
        SandboxConfig {
            id: id.to_owned(),
            root: self.skeleton.path().to_path_buf(),
            cgroups_path: self.state().cgroup_parent().join(id),
            runtime_dir: self.runtime_dir.clone(),
            shim: PathBuf::from("/usr/bin/true"),
            code: Some(code.to_path_buf()),
            limits: Limits {
                memory_bytes: 256 << 20,
                pids: 64,
                cpus: 1.0,
            },
            env: vec![],
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.spawner.shutdown();
        if let Some(state) = self.state.take() {
            state.remove(&self.cgroups).unwrap();
        }
    }
}

/// A pipe for a sandbox's output: (read end, write end).
fn output_pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap()
}

/// Everything written to `read` until every write end is closed, within `within`.
fn read_all(read: OwnedFd, within: Duration) -> String {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::fs::File::from(read).read_to_string(&mut text);
        let _ = tx.send(text);
    });
    rx.recv_timeout(within)
        .expect("the sandbox's output did not end in time")
}

fn pool_error(e: &pool::Error) -> String {
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s += &format!(": {c}");
        cause = c.source();
    }
    s
}

fn cap_bits(names: &[&str]) -> u64 {
    names
        .iter()
        .map(|n| match *n {
            "CAP_SETGID" => 1 << 6,
            "CAP_SETUID" => 1 << 7,
            "CAP_SETPCAP" => 1 << 8,
            "CAP_SYS_ADMIN" => 1 << 21,
            other => panic!("{other}"),
        })
        .sum()
}

/// A fork server made by libcontainer from `zygote_spec` is root in its own user
/// namespace (root is its host user, the range is itself), with exactly four
/// capabilities, and may make a new sandbox's namespaces and mounts (a `proc` as
/// PID 1 of its pid namespace, a `tmpfs`) and switch to another uid of the range;
/// `setns` stays denied.
#[test]
fn a_fork_server_may_make_namespaces_and_mounts_in_its_user_namespace() {
    if !root_or_skip("a_fork_server_may_make_namespaces_and_mounts_in_its_user_namespace") {
        return;
    }
    assert!(
        Path::new("/usr/bin/python3").is_file(),
        "the probe needs /usr/bin/python3"
    );
    let agent = Agent::start();
    let code = agent.work.path().join("code");
    std::fs::create_dir_all(&code).unwrap();
    std::fs::write(code.join("probe.py"), include_str!("probe_fork_server.py")).unwrap();
    let base = 0x7300_0000 + (std::process::id() % 4096) * 16;
    let uids = SandboxUids::new(base, 16).unwrap();
    let zygote = uids.user(5);
    let target: SandboxUser = uids.user(9);
    // What libcontainer needs: it sets the container up from inside the user
    // namespace, as the fork server's host user.
    agent.state().open_to_group(zygote.gid).unwrap();
    let id = format!("sprout-{}-fork-server", agent.state().agent_id());
    let mut spec = rootfs::zygote_spec(&agent.config(&id, &code), zygote, uids).unwrap();
    let mut process = spec.process().clone().unwrap();
    process.set_args(Some(vec![
        "/usr/bin/python3".into(),
        "/code/probe.py".into(),
        target.uid.to_string(),
    ]));
    spec.set_process(Some(process));
    let bundle = agent.state().bundles().join(&id);
    rootfs::write_bundle(&bundle, &spec).unwrap();
    let (read, write) = output_pipe();
    let started = std::time::Instant::now();
    let created = agent.spawner.create(
        &id,
        &bundle,
        agent.state().cgroup_parent().join(&id),
        &agent.cgroups,
        write,
    );
    let (mut sandbox, _shim) = match created {
        Ok(c) => c,
        Err(e) => panic!(
            "{}\ncontainer output:\n{}",
            pool_error(&e),
            read_all(read, Duration::from_secs(5))
        ),
    };
    eprintln!("fork server container created in {:?}", started.elapsed());
    let text = read_all(read, Duration::from_secs(30));
    agent.spawner.destroy(&mut sandbox).unwrap();
    eprintln!("fork server probe: {text}");
    let out: serde_json::Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("probe output is not JSON ({e}): {text}"));

    let want_map = format!(
        "0 {} 1\n{} {} {}\n{} {} {}\n",
        zygote.uid,
        base,
        base,
        zygote.uid - base,
        zygote.uid + 1,
        zygote.uid + 1,
        base + 15 - zygote.uid
    );
    let squeeze = |s: &str| {
        s.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ") + "\n")
            .collect::<String>()
    };
    assert_eq!(squeeze(out["uid_map"].as_str().unwrap()), want_map);
    assert_eq!(squeeze(out["gid_map"].as_str().unwrap()), want_map);
    assert!(
        out["Uid"].as_str().unwrap().starts_with("0\t0\t0\t0"),
        "{out}"
    );
    let caps = cap_bits(&["CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP"]);
    let hex = |k: &str| u64::from_str_radix(out[k].as_str().unwrap(), 16).unwrap();
    assert_eq!(hex("CapEff"), caps, "{out}");
    assert_eq!(hex("CapPrm"), caps, "{out}");
    assert_eq!(hex("CapBnd"), caps, "{out}");
    assert_eq!(hex("CapInh"), 0, "{out}");
    assert_eq!(hex("CapAmb"), 0, "{out}");
    assert_eq!(out["NoNewPrivs"], "1");
    assert_eq!(out["Seccomp"], "2");
    assert_eq!(out["setns"], libc::EPERM, "setns is denied: {out}");
    for step in [
        "unshare",
        "private",
        "tmpfs",
        "sethostname",
        "sysfs",
        "mqueue",
    ] {
        assert_eq!(out[step], 0, "{step}: {out}");
    }
    let child = &out["child"];
    assert_eq!(child["pid"], 1, "{out}");
    assert_eq!(child["proc"], 0, "mount proc: {out}");
    assert_eq!(child["proc_self"], "1", "{out}");
    for step in ["setgroups", "setresgid", "setresuid"] {
        assert_eq!(child[step], 0, "{step}: {out}");
    }
    let t = target.uid;
    assert_eq!(child["Uid"], format!("{t}\t{t}\t{t}\t{t}"), "{out}");
    assert_eq!(child["Gid"], format!("{t}\t{t}\t{t}\t{t}"), "{out}");
    assert_eq!(child["Groups"], "", "{out}");
    assert_eq!(child["CapEff"], "0000000000000000", "{out}");
}

/// A process started outside libcontainer, in mount and network namespaces of its
/// own and moved into a sandbox cgroup, is adopted as a sandbox: code is attached in
/// its mount namespace (the host's mount table does not change), and destroying it
/// kills it and removes its cgroup. A pid outside the named cgroup is refused, naming
/// both, as is a cgroup that is not the sandbox's.
#[test]
fn an_adopted_process_is_a_sandbox_until_destroyed() {
    if !root_or_skip("an_adopted_process_is_a_sandbox_until_destroyed") {
        return;
    }
    let agent = Agent::start();
    let id = format!("sprout-{}-forked-1", agent.state().agent_id());
    let cgroup = agent.state().cgroup_parent().join(&id);
    let target = agent.work.path().join("target");
    let code = agent.work.path().join("code");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::create_dir_all(&code).unwrap();
    std::fs::write(code.join("main.py"), "print('hi')\n").unwrap();
    let mut child = std::process::Command::new("unshare")
        .args([
            "--mount",
            "--net",
            "--propagation",
            "private",
            "sleep",
            "100",
        ])
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    // Until unshare has exec'd sleep, it is not yet in its namespaces.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::read_link(format!("/proc/{pid}/exe"))
        .map_or(true, |e| !e.to_string_lossy().ends_with("/sleep"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "unshare did not exec sleep"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let limits = Limits {
        memory_bytes: 64 << 20,
        pids: 16,
        cpus: 0.5,
    };
    let started = std::time::Instant::now();
    pool::enter_cgroup(&cgroup, pid, &rootfs::resources(&limits).unwrap()).unwrap();
    eprintln!("enter_cgroup took {:?}", started.elapsed());

    // Refused: another process not in the cgroup; a cgroup not the sandbox's.
    let mut outsider = std::process::Command::new("sleep")
        .arg("100")
        .spawn()
        .unwrap();
    let other = format!("sprout-{}-forked-2", agent.state().agent_id());
    let other_cgroup = agent.state().cgroup_parent().join(&other);
    let refused = agent
        .spawner
        .adopt(
            &other,
            outsider.id() as i32,
            other_cgroup.clone(),
            &agent.cgroups,
        )
        .map(|_| ());
    let misnamed = agent
        .spawner
        .adopt(&other, pid, cgroup.clone(), &agent.cgroups)
        .map(|_| ());
    outsider.kill().unwrap();
    outsider.wait().unwrap();
    let e = pool_error(&refused.unwrap_err());
    assert!(
        e.contains(&format!(
            "process {} is not in cgroup {}",
            outsider.id(),
            other_cgroup.display()
        )),
        "{e}"
    );
    let e = pool_error(&misnamed.unwrap_err());
    assert!(
        e.contains(&format!("cgroup {} is not the sandbox's", cgroup.display())),
        "{e}"
    );

    let started = std::time::Instant::now();
    let mut sandbox = agent
        .spawner
        .adopt(&id, pid, cgroup.clone(), &agent.cgroups)
        .unwrap();
    eprintln!("adopt took {:?}", started.elapsed());
    assert_eq!(sandbox.pid(), pid);
    agent.spawner.attach_code(&id, &code, &target).unwrap();
    let inside = std::fs::read_to_string(format!("/proc/{pid}/root{}/main.py", target.display()));
    let on_host = target.join("main.py").exists();
    let lo = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).unwrap_or_default();
    agent.spawner.destroy(&mut sandbox).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        inside.unwrap(),
        "print('hi')\n",
        "the code is attached inside"
    );
    assert!(!on_host, "the host's mount table did not change");
    assert!(lo.contains("lo:"), "{lo}");
    assert!(!status.success(), "the process was killed: {status:?}");
    for dir in agent.cgroups.dirs(&cgroup) {
        assert!(!dir.exists(), "{} is left", dir.display());
    }
    // Gone from the spawner: a second destroy names it as unknown.
    let e = pool_error(&agent.spawner.destroy(&mut sandbox).unwrap_err());
    assert!(e.contains(&format!("no live sandbox {id}")), "{e}");
}

/// When the spawner dies, an adopted sandbox is killed and removed by its cgroup as
/// a created one is, and the agent is told it is gone.
#[test]
fn an_adopted_sandbox_dies_with_its_spawner() {
    if !root_or_skip("an_adopted_sandbox_dies_with_its_spawner") {
        return;
    }
    let agent = Agent::start();
    let id = format!("sprout-{}-forked-3", agent.state().agent_id());
    let cgroup = agent.state().cgroup_parent().join(&id);
    let mut child = std::process::Command::new("sleep")
        .arg("100")
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let limits = Limits {
        memory_bytes: 64 << 20,
        pids: 16,
        cpus: 0.5,
    };
    pool::enter_cgroup(&cgroup, pid, &rootfs::resources(&limits).unwrap()).unwrap();
    let mut sandbox = agent
        .spawner
        .adopt(&id, pid, cgroup.clone(), &agent.cgroups)
        .unwrap();
    let spawner = agent.spawner.pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(spawner),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // The next request sees the death (or a new spawner): either way it cleans up.
    let _ = agent
        .spawner
        .attach_code(&id, Path::new("/usr"), Path::new("/code"));
    assert!(agent.spawner.is_gone(&id), "the sandbox is reported gone");
    let status = child.wait().unwrap();
    assert!(!status.success(), "the process was killed: {status:?}");
    for dir in agent.cgroups.dirs(&cgroup) {
        assert!(!dir.exists(), "{} is left", dir.display());
    }
    agent.spawner.destroy(&mut sandbox).unwrap();
}
