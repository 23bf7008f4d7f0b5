//! The agent's side of the spawner: [`Spawner`] starts one ([`Proc`]), restarts it
//! after it died, and turns the sandbox operations into requests. The spawner's death
//! is seen through its pidfd, by a request or by the watcher thread
//! ([`Spawner::watch`]), and its sandboxes are then killed and removed
//! ([`Spawner::recover`]).

use std::collections::HashSet;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::process::Proc;
use super::protocol::{SpawnerReply, SpawnerRequest};
use super::SHUTDOWN_DEADLINE;
use crate::{sys, Cgroups, Error, Freezer, Sandbox, Scratch, SpawnerFailure, StateDir};
use ipc::proto::ShimLink;
use ipc::Channel;

/// The agent's handle on its spawner: starts one, restarts it after it died, and
/// bounds every wait on it.
#[derive(Debug)]
pub struct Spawner {
    exe: PathBuf,
    state_dir: PathBuf,
    containers: PathBuf,
    cgroup_parent: PathBuf,
    cgroups: Cgroups,
    /// The running spawner; `None` once [`Spawner::shutdown`] ran.
    current: Mutex<Option<Arc<Proc>>>,
    /// Sandboxes of dead spawners, killed and removed, not yet destroyed by the agent.
    gone: Mutex<HashSet<String>>,
    /// Wakes [`Spawner::watch`] at shutdown (read end, write end).
    stop: (OwnedFd, OwnedFd),
    /// Spawners that died and were cleaned up after, and how many of those deaths
    /// [`Spawner::watch`] reported.
    deaths: AtomicU64,
    reported: AtomicU64,
}

impl Spawner {
    /// Starts the spawner `exe` (see [`find_spawner`]) for the agent that holds
    /// `state`. May be called from any thread.
    pub fn start(exe: &Path, state: &StateDir, cgroups: &Cgroups) -> Result<Spawner, Error> {
        let stop =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::SpawnerStart {
                exe: exe.to_path_buf(),
                source: e.into(),
            })?;
        let spawner = Spawner {
            exe: exe.to_path_buf(),
            state_dir: state.path().to_path_buf(),
            containers: state.containers(),
            cgroup_parent: state.cgroup_parent(),
            cgroups: cgroups.clone(),
            current: Mutex::new(None),
            gone: Mutex::new(HashSet::new()),
            stop,
            deaths: AtomicU64::new(0),
            reported: AtomicU64::new(0),
        };
        let first = spawner.launch()?;
        *spawner.current.lock() = Some(first);
        Ok(spawner)
    }

    fn launch(&self) -> Result<Arc<Proc>, Error> {
        let p = Proc::launch(&self.exe, &self.state_dir, &self.cgroup_parent)?;
        // For a later agent's cleanup, should this one die with its spawner.
        if let Err(e) = crate::state::record_spawner(&self.state_dir, p.pid.as_raw(), p.socket) {
            tracing::warn!(error = %ipc::chain(&e), "could not record the spawner in the state directory");
        }
        Ok(Arc::new(p))
    }

    /// The pid of the current spawner (0 after shutdown).
    pub fn pid(&self) -> i32 {
        self.current.lock().as_ref().map_or(0, |p| p.pid.as_raw())
    }

    /// The running spawner: after a death, its sandboxes are killed and removed and a
    /// new spawner is started.
    fn proc(&self) -> Result<Arc<Proc>, Error> {
        let mut current = self.current.lock();
        let p = current.as_ref().ok_or(Error::Stopped)?;
        if !p.has_ended() {
            return Ok(p.clone());
        }
        let dead = p.clone();
        self.recover(&dead);
        let fresh = self.launch()?;
        *current = Some(fresh.clone());
        Ok(fresh)
    }

    /// Kills and removes what an ended spawner's sandboxes left (by cgroup, and any
    /// half-built container process outside one, found by the control socket it
    /// still holds), and remembers them as gone. Once per spawner.
    fn recover(&self, p: &Proc) {
        let mut recovered = p.recovered.lock();
        if *recovered {
            return;
        }
        *recovered = true;
        let ids: Vec<String> = p.owned.lock().drain().collect();
        // A scan of every process's descriptors (milliseconds, more on a busy host),
        // needless when nothing can hold the socket any more.
        let holders = if p.far_end_released() {
            Vec::new()
        } else {
            crate::state::kill_holders(None, &[p.socket])
        };
        for id in &ids {
            // The agent may freeze an idle sandbox again between the kill and the thaw
            // (a killed task in a frozen v1 cgroup does not die): try again.
            let cgroup = self.cgroup_parent.join(id);
            let mut removed = self.cgroups.remove_tree(&cgroup);
            for _ in 0..2 {
                if removed.is_ok() {
                    break;
                }
                removed = self.cgroups.remove_tree(&cgroup);
            }
            if let Err(e) = removed {
                tracing::warn!(sandbox_id = %id, error = %ipc::chain(&e), "remove a dead spawner's sandbox cgroup");
            }
            let _ = std::fs::remove_dir_all(self.containers.join(id));
        }
        if !ids.is_empty() || !holders.is_empty() {
            tracing::warn!(spawner_pid = p.pid.as_raw(), sandboxes = ?ids, orphans = ?holders, "killed and removed the sandboxes of a dead spawner");
        }
        self.gone.lock().extend(ids);
        self.deaths.fetch_add(1, Ordering::SeqCst);
    }

    /// Blocks until the current spawner dies (then cleans up after it, starts a new
    /// one and returns `true`) or [`Spawner::shutdown`] runs (`false`). For a watcher
    /// thread: the agent then forgets the sandboxes [`Spawner::is_gone`] names.
    pub fn watch(&self) -> bool {
        loop {
            let p = match self.proc() {
                Ok(p) => p,
                Err(Error::Stopped) => return false,
                Err(e) => {
                    tracing::error!(error = %ipc::chain(&e), "could not restart the spawner; trying again in a second");
                    if sys::readable(self.stop.0.as_fd(), Duration::from_secs(1)) {
                        return false;
                    }
                    continue;
                }
            };
            // A death a request saw first (and cleaned up after) counts too.
            let deaths = self.deaths.load(Ordering::SeqCst);
            if self.reported.swap(deaths, Ordering::SeqCst) != deaths {
                return true;
            }
            let (stopped, died) = sys::poll2(self.stop.0.as_fd(), p.pidfd.as_fd(), Duration::MAX);
            if stopped {
                return false;
            }
            if died {
                p.end(None);
                self.recover(&p);
                // The next one starts at the top of the loop, not in the next request.
            }
        }
    }

    /// Whether sandbox `id` belonged to a spawner that died: it was killed and
    /// removed, and [`Spawner::destroy`] only forgets it.
    pub fn is_gone(&self, id: &str) -> bool {
        self.gone.lock().contains(id)
    }

    fn call(&self, req: &SpawnerRequest) -> Result<ipc::Message<SpawnerReply>, Error> {
        self.call_with(req, &[])
    }

    fn call_with(
        &self,
        req: &SpawnerRequest,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<ipc::Message<SpawnerReply>, Error> {
        let p = self.proc()?;
        if let SpawnerRequest::Create { id, .. } | SpawnerRequest::Adopt { id, .. } = req {
            // Before it is sent: a half-built (or half-adopted) sandbox is the
            // spawner's too, and is killed by its cgroup if the spawner dies.
            p.owned.lock().insert(id.clone());
        }
        let answer = p.call(req, fds);
        match (&answer, req) {
            (Err(_), _) if p.has_ended() => self.recover(&p),
            (Ok(m), SpawnerRequest::Destroy { id })
                if matches!(m.header, SpawnerReply::Destroyed) =>
            {
                p.owned.lock().remove(id);
            }
            (Ok(m), SpawnerRequest::Create { id, .. } | SpawnerRequest::Adopt { id, .. })
                if matches!(m.header, SpawnerReply::Failed { .. }) =>
            {
                p.owned.lock().remove(id);
            }
            _ => {}
        }
        answer
    }

    /// Sends a request about `sandbox` that is answered with `done`.
    fn mount_op(
        &self,
        sandbox_id: &str,
        what: &'static str,
        req: &SpawnerRequest,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<(), Error> {
        match self.call_with(req, fds)?.header {
            SpawnerReply::Done => Ok(()),
            SpawnerReply::Failed { message } => Err(Error::Mount {
                id: sandbox_id.to_owned(),
                what,
                source: SpawnerFailure(message),
            }),
            other => Err(unexpected(other, "done")),
        }
    }

    /// Creates and starts the sandbox `id` from `bundle`; `cgroup` is the cgroup path
    /// its spec names. `output` (the write end of a pipe the caller reads) becomes the
    /// container's stdout and stderr: the shim's and the zygote's output go there,
    /// never to a descriptor of the host's. Returns the sandbox in state `Creating`
    /// with the shim's channel.
    pub fn create(
        &self,
        id: &str,
        bundle: &Path,
        cgroup: PathBuf,
        cgroups: &Cgroups,
        output: OwnedFd,
    ) -> Result<(Sandbox, ShimLink), Error> {
        let span = tracing::debug_span!("create_sandbox", sandbox_id = %id);
        let _g = span.enter();
        let req = SpawnerRequest::Create {
            id: id.to_owned(),
            bundle: bundle.to_path_buf(),
        };
        let reply = self.call_with(&req, &[output.as_fd()]);
        // The container has its copies (or none): ours must not keep the pipe open.
        drop(output);
        let reply = reply?;
        match reply.header {
            SpawnerReply::Created { pid } => {
                let fd =
                    reply
                        .fds
                        .into_iter()
                        .next()
                        .ok_or(Error::Spawner(ipc::Error::MissingFds {
                            expected: 1,
                            queued: 0,
                        }))?;
                tracing::debug!(pid, "sandbox started");
                let freezer = match Freezer::open(cgroups, &cgroup) {
                    Ok(f) => f,
                    Err(e) => {
                        let _ = self.call(&SpawnerRequest::Destroy { id: id.to_owned() });
                        return Err(e);
                    }
                };
                Ok((
                    Sandbox::new(id.to_owned(), pid, cgroup, freezer),
                    ShimLink(Channel::from_fd(fd)),
                ))
            }
            SpawnerReply::Failed { message } => Err(Error::Create {
                id: id.to_owned(),
                source: SpawnerFailure(message),
            }),
            other => Err(unexpected(other, "created")),
        }
    }

    /// Makes the sandbox `id` forked from a fork server one of the spawner's: `pid`
    /// (the host pid of its first process, PID 1 of its namespaces) must be in
    /// `cgroup`, which must be `<agent's cgroup>/<id>` (as a created sandbox's).
    /// Code, scratch, network and destroy then work as for a created sandbox; if the
    /// spawner dies, the sandbox is killed by its cgroup and [`Spawner::is_gone`]
    /// names it. Returns the sandbox in state `Creating`; the caller has the shim's
    /// channel already. On an error nothing is registered: the caller removes the
    /// cgroup (and so the process) itself.
    pub fn adopt(
        &self,
        id: &str,
        pid: i32,
        cgroup: PathBuf,
        cgroups: &Cgroups,
    ) -> Result<Sandbox, Error> {
        let span = tracing::debug_span!("adopt_sandbox", sandbox_id = %id, pid);
        let _g = span.enter();
        let req = SpawnerRequest::Adopt {
            id: id.to_owned(),
            pid,
            cgroup: cgroup.clone(),
        };
        match self.call(&req)?.header {
            SpawnerReply::Done => {
                tracing::debug!("sandbox adopted");
                let freezer = match Freezer::open(cgroups, &cgroup) {
                    Ok(f) => f,
                    Err(e) => {
                        let _ = self.call(&SpawnerRequest::Destroy { id: id.to_owned() });
                        return Err(e);
                    }
                };
                Ok(Sandbox::new(id.to_owned(), pid, cgroup, freezer))
            }
            SpawnerReply::Failed { message } => Err(Error::Adopt {
                id: id.to_owned(),
                source: SpawnerFailure(message),
            }),
            other => Err(unexpected(other, "done")),
        }
    }

    /// Kills every process of the sandbox, reaps its init and removes its container
    /// state and cgroup.
    pub fn destroy(&self, sandbox: &mut Sandbox) -> Result<(), Error> {
        let span = tracing::debug_span!("destroy_sandbox", sandbox_id = %sandbox.id());
        let _g = span.enter();
        sandbox.die();
        if self.gone.lock().remove(sandbox.id()) {
            return Ok(());
        }
        let answer = self.call(&SpawnerRequest::Destroy {
            id: sandbox.id().to_owned(),
        });
        // Its spawner died meanwhile (whatever the answer, maybe a new spawner's "no
        // live sandbox"): it was killed and removed with the others.
        if self.gone.lock().remove(sandbox.id()) {
            return Ok(());
        }
        match answer?.header {
            SpawnerReply::Destroyed => Ok(()),
            SpawnerReply::Failed { message } => Err(Error::Destroy {
                id: sandbox.id().to_owned(),
                source: SpawnerFailure(message),
            }),
            other => Err(unexpected(other, "destroyed")),
        }
    }

    /// Makes the host directory `dir` visible, read-only, at [`rootfs::CODE_DIR`] in the
    /// running sandbox.
    pub fn bind_code(&self, sandbox: &Sandbox, dir: &Path) -> Result<(), Error> {
        self.attach_code(sandbox.id(), dir, Path::new(rootfs::CODE_DIR))
    }

    /// Makes the host directory `dir` visible, read-only, at `target` in the running
    /// sandbox (a new directory is made for it under [`rootfs::FUNCTIONS_DIR`]): the
    /// spawner clones `dir` as a detached read-only mount and attaches it inside the
    /// sandbox's mount namespace. The host's mount table does not change.
    pub fn attach_code(&self, sandbox_id: &str, dir: &Path, target: &Path) -> Result<(), Error> {
        let span = tracing::debug_span!("attach_code", sandbox_id, dir = %dir.display(), target = %target.display());
        let _g = span.enter();
        let req = SpawnerRequest::AttachCode {
            id: sandbox_id.to_owned(),
            dir: dir.to_path_buf(),
            target: target.to_path_buf(),
        };
        self.mount_op(sandbox_id, "make the function's code visible", &req, &[])
    }

    /// Puts a clone of `scratch` on the sandbox's [`rootfs::WORKFLOW_DIR`], over its own.
    pub fn attach_scratch(&self, sandbox_id: &str, scratch: &Scratch) -> Result<(), Error> {
        let req = SpawnerRequest::AttachScratch {
            id: sandbox_id.to_owned(),
        };
        self.mount_op(
            sandbox_id,
            "attach the workflow scratch",
            &req,
            &[scratch.0.as_fd()],
        )
    }

    /// Removes an attached workflow scratch; the sandbox's own is visible again.
    pub fn detach_scratch(&self, sandbox_id: &str) -> Result<(), Error> {
        let req = SpawnerRequest::DetachScratch {
            id: sandbox_id.to_owned(),
        };
        self.mount_op(sandbox_id, "detach the workflow scratch", &req, &[])
    }

    /// Replaces the sandbox's own [`rootfs::WORKFLOW_DIR`] tmpfs with a new, empty one
    /// (the old one lives on only for whoever still holds a descriptor into it).
    pub fn reset_scratch(&self, sandbox_id: &str) -> Result<(), Error> {
        let req = SpawnerRequest::ResetScratch {
            id: sandbox_id.to_owned(),
        };
        self.mount_op(sandbox_id, "replace the workflow scratch", &req, &[])
    }

    /// Puts a clone of what sandbox `from` sees on its `/workflow` (its own scratch,
    /// or one attached there) on `sandbox_id`'s. A clone of a mount from another
    /// namespace can only be cloned again inside that namespace, so it is cloned
    /// there and attached at once.
    pub fn attach_scratch_from(&self, sandbox_id: &str, from: &str) -> Result<(), Error> {
        let req = SpawnerRequest::AttachScratchFrom {
            id: sandbox_id.to_owned(),
            from: from.to_owned(),
        };
        self.mount_op(
            sandbox_id,
            "attach the caller's workflow scratch",
            &req,
            &[],
        )
    }

    /// Gives the sandbox outbound network and the host's DNS configuration (see
    /// [`crate::network`]); it keeps them until it is destroyed.
    pub fn attach_network(&self, sandbox_id: &str) -> Result<(), Error> {
        let span = tracing::debug_span!("attach_network", sandbox_id);
        let _g = span.enter();
        let req = SpawnerRequest::AttachNetwork {
            id: sandbox_id.to_owned(),
        };
        self.mount_op(sandbox_id, "attach the network", &req, &[])
    }

    /// Tells the spawner the agent is leaving cleanly, and waits (at most
    /// [`SHUTDOWN_DEADLINE`]) for it to exit after it destroyed whatever sandboxes
    /// remain; a spawner that does not is killed, and its sandboxes with it. Later
    /// calls do nothing; later requests fail with [`Error::Stopped`].
    pub fn shutdown(&self) -> Result<(), Error> {
        let Some(p) = self.current.lock().take() else {
            return Ok(());
        };
        let _ = nix::unistd::write(&self.stop.1, b"x");
        let sent = if p.has_ended() {
            Ok(())
        } else {
            // Takes its turn like any request, so one in flight is not cut in half.
            match p.call(&SpawnerRequest::Shutdown, &[]) {
                // It exits without answering: the channel closes.
                Err(Error::SpawnerDied { .. }) => Ok(()),
                Err(e) => Err(e),
                Ok(m) => Err(unexpected(m.header, "no answer")),
            }
        };
        if !p.has_ended() {
            p.end(Some(format!(
                "killed by the agent: still running {SHUTDOWN_DEADLINE:?} after shutdown"
            )));
        }
        if sent.is_ok() {
            // It destroyed every sandbox it had on its way out.
            p.owned.lock().clear();
        }
        // Kills what it left: a half-built container still holding its control
        // socket, the sandboxes of a spawner that did not shut down cleanly.
        self.recover(&p);
        sent
    }
}

fn unexpected(reply: SpawnerReply, expected: &'static str) -> Error {
    Error::Spawner(ipc::Error::Unexpected {
        op: format!("{reply:?}"),
        expected,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CgroupVersion;
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    use std::time::Instant;

    /// A state directory, fake cgroups, and a fake spawner executable running `body`
    /// (a shell script; the control socket is its descriptor 3).
    fn setup(body: &str) -> (tempfile::TempDir, StateDir, Cgroups, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let state = StateDir::acquire(&t.path().join("run")).unwrap();
        let cgroups = Cgroups::at(&t.path().join("cg"), CgroupVersion::V1);
        let exe = t.path().join("fake-spawner");
        std::fs::write(&exe, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        (t, state, cgroups, exe)
    }

    fn destroy_req(id: &str) -> SpawnerRequest {
        SpawnerRequest::Destroy { id: id.to_owned() }
    }

    /// Waits until a request holds the spawner's turn.
    fn wait_busy(s: &Spawner) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !s.current.lock().clone().unwrap().is_busy() {
            assert!(Instant::now() < deadline, "no request in flight");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A request in flight and one waiting for its turn both fail at once, naming
    /// the spawner and how it ended, when it dies; the next request gets a new
    /// spawner.
    #[test]
    fn requests_fail_at_once_when_the_spawner_dies_and_a_new_one_starts() {
        let (_t, state, cgroups, exe) = setup("exec sleep 60");
        let s = Arc::new(Spawner::start(&exe, &state, &cgroups).unwrap());
        let first = s.pid();
        let calls: Vec<_> = ["sprout-x-1", "sprout-x-2"]
            .into_iter()
            .map(|id| {
                let s = s.clone();
                std::thread::spawn(move || {
                    let r = s.call(&destroy_req(id));
                    (r.map(|_| ()), Instant::now())
                })
            })
            .collect();
        wait_busy(&s);
        // Both hold the spawner (one has the turn, one waits for it): with the
        // agent's own handle and this one, four.
        let p = s.current.lock().clone().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&p) < 4 {
            assert!(
                Instant::now() < deadline,
                "the second request is not waiting"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(p);
        kill(Pid::from_raw(first), Signal::SIGKILL).unwrap();
        let killed = Instant::now();
        for c in calls {
            let (r, at) = c.join().unwrap();
            match r {
                Err(Error::SpawnerDied { pid, how, op }) => {
                    assert_eq!(
                        (pid, how.as_str(), op),
                        (first, "killed by SIGKILL", "destroy")
                    );
                }
                other => panic!("{other:?}"),
            }
            assert!(at.duration_since(killed) < Duration::from_secs(2));
        }
        // The next request starts another spawner (this one never answers: give up
        // on it by killing it too).
        let s2 = s.clone();
        let next = std::thread::spawn(move || s2.call(&destroy_req("sprout-x-3")).map(|_| ()));
        wait_busy(&s);
        let second = s.pid();
        assert_ne!(second, first);
        kill(Pid::from_raw(second), Signal::SIGKILL).unwrap();
        assert!(matches!(
            next.join().unwrap(),
            Err(Error::SpawnerDied { .. })
        ));
        s.shutdown().unwrap();
        assert!(matches!(s.call(&destroy_req("x")), Err(Error::Stopped)));
    }

    /// The watcher sees a death while no request is in flight, and a spawner that
    /// exits when asked to shut down is waited for.
    #[test]
    fn the_watcher_sees_an_idle_death_and_shutdown_ends_the_spawner() {
        // Exits after reading the first byte of any request.
        let (_t, state, cgroups, exe) = setup("exec head -c1 <&3 >/dev/null");
        let s = Arc::new(Spawner::start(&exe, &state, &cgroups).unwrap());
        let first = s.pid();
        let w = s.clone();
        let watcher = std::thread::spawn(move || {
            let mut deaths = 0;
            while w.watch() {
                deaths += 1;
            }
            deaths
        });
        kill(Pid::from_raw(first), Signal::SIGKILL).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.pid() == first {
            assert!(Instant::now() < deadline, "no new spawner after a death");
            std::thread::sleep(Duration::from_millis(5));
        }
        let second = s.pid();
        s.shutdown().unwrap();
        assert_eq!(watcher.join().unwrap(), 1);
        assert!(
            kill(Pid::from_raw(second), None).is_err(),
            "the spawner was not reaped"
        );
        let owners = std::fs::read_to_string(state.path().join("owners")).unwrap();
        assert!(owners.contains(&format!("spawner {second} ")), "{owners}");
    }
}
