//! Root tests of forked sandboxes with a real spawner: adopting a process started
//! outside libcontainer as a sandbox (the fork server itself is tested end to end in
//! `tests/tests/forked.rs`). They need root and a cgroup file system; without root
//! they say so and pass, except under `CI`, where that is a failure.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pool::{Cgroups, Spawner, StateDir};
use rootfs::{Limits, Skeleton};

#[path = "../test_support.rs"]
mod test_support;
use test_support::root_or_skip;

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
    _skeleton: Skeleton,
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
            _skeleton: skeleton,
            work,
        }
    }

    fn state(&self) -> &StateDir {
        self.state.as_ref().unwrap()
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

/// Makes `cgroup` with `limits` and moves process `pid` into it through the files
/// `prepare_cgroup` opened (as a forked sandbox's first process does for itself).
fn join(cgroups: &Cgroups, cgroup: &Path, pid: i32, limits: &Limits) {
    let files = pool::prepare_cgroup(cgroups, cgroup, &rootfs::resources(limits).unwrap()).unwrap();
    for file in files {
        use std::io::Write;
        std::fs::File::from(file)
            .write_all(pid.to_string().as_bytes())
            .unwrap();
    }
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
    join(&agent.cgroups, &cgroup, pid, &limits);
    eprintln!("prepare_cgroup and the join took {:?}", started.elapsed());

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
    join(&agent.cgroups, &cgroup, pid, &limits);
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
