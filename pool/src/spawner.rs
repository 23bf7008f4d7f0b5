//! The spawner: the one single-threaded process that calls libcontainer.
//!
//! The `sprout-spawner` executable ([`spawner_main`]), started by the agent
//! ([`Spawner`]) with nothing of the agent's but its control socket (descriptor 3)
//! and its stdout and stderr. It creates a sandbox by building and starting a
//! libcontainer container whose stdin is one end of a fresh socket pair (the shim's
//! channel) and hands the other end to the agent. A sandbox's init (the shim) is the
//! spawner's child, so the spawner reaps it when it destroys the sandbox. When the
//! agent's end of the control channel closes without a `shutdown`, the agent died:
//! the spawner destroys every sandbox and removes the agent's cgroups and state
//! directory itself.
//!
//! Every descriptor the spawner holds is inherited by the container processes
//! libcontainer clones from it until they exec the shim, so it holds as few as it
//! can: no state-directory lock, no descriptor into the state directory, its own
//! mount namespace only during a mount operation; its control socket is
//! close-on-exec. Any such process left half-built when the spawner dies is found by
//! its cgroup or by the control socket it still holds, and killed.
//!
//! On the agent's side every request has a deadline ([`CREATE_DEADLINE`],
//! [`REQUEST_DEADLINE`], [`SHUTDOWN_DEADLINE`]; a spawner that misses one is killed)
//! and the spawner's death is seen at once through a pidfd: requests in flight or
//! waiting fail with [`Error::SpawnerDied`], its sandboxes are killed and removed,
//! and a new spawner is started.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::{sys, Cgroups, Error, Freezer, Sandbox, Scratch, SpawnerFailure, StateDir};
use ipc::proto::ShimLink;
use ipc::Channel;

#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "op", rename_all = "snake_case")]
enum SpawnerRequest {
    /// Carries one descriptor: the write end of the agent's pipe for the sandbox's
    /// output, which becomes the container's stdout and stderr.
    Create {
        id: String,
        bundle: PathBuf,
    },
    Destroy {
        id: String,
    },
    /// Makes `dir` (a host directory) visible read-only at `target` inside the
    /// sandbox (`/code`, or a new directory under `/fns`).
    AttachCode {
        id: String,
        dir: PathBuf,
        target: PathBuf,
    },
    /// Carries a descriptor: a detached mount to clone onto the sandbox's `/workflow`.
    AttachScratch {
        id: String,
    },
    /// Removes what `AttachScratch` put on the sandbox's `/workflow`.
    DetachScratch {
        id: String,
    },
    /// Replaces the sandbox's own `/workflow` with a new, empty tmpfs.
    ResetScratch {
        id: String,
    },
    /// Puts a clone of sandbox `from`'s `/workflow` on sandbox `id`'s.
    AttachScratchFrom {
        id: String,
        from: String,
    },
    /// The agent is exiting cleanly and removes its state itself.
    Shutdown,
}

#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "op", rename_all = "snake_case")]
enum SpawnerReply {
    /// Carries one descriptor: the agent's end of the shim's channel.
    Created {
        pid: i32,
    },
    Destroyed,
    Done,
    Failed {
        message: String,
    },
}

/// What the spawner needs to clean up after an agent that died.
struct Orphaned {
    state_dir: PathBuf,
    cgroup_parent: PathBuf,
    cgroups: Cgroups,
}

/// The name of the spawner's executable.
pub const SPAWNER_EXE: &str = "sprout-spawner";
/// The descriptor on which the spawner finds its control channel.
const CONTROL_FD: RawFd = 3;
/// How long the agent waits for a sandbox to be created, counted from when the
/// request is sent (tens of ms idle, seconds on a machine busy building and testing),
/// before it takes the spawner for stuck and kills it.
pub const CREATE_DEADLINE: Duration = Duration::from_secs(30);
/// The same for every other request (destroy, mount operations).
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// How long a request may wait for its turn behind others. A stuck spawner is caught
/// by the deadline of the request it is stuck on (and then every waiter fails at
/// once), so this only bounds a queue that is long but moving: 64 parallel cold
/// starts queue behind each other here.
pub const TURN_DEADLINE: Duration = Duration::from_secs(120);
/// How long a clean shutdown (the spawner destroys the sandboxes left) may take.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);
/// How long a spawner that closed its channel, or was killed, has to be gone.
const EXIT_GRACE: Duration = Duration::from_secs(1);

/// The spawner executable to run: `explicit` when given (it must exist), else
/// [`SPAWNER_EXE`] next to the running executable or in its parent directory (test
/// and bench binaries run from `target/<profile>/deps`). The error names every path
/// tried.
pub fn find_spawner(explicit: Option<&Path>) -> Result<PathBuf, Error> {
    let candidates: Vec<PathBuf> = match explicit {
        Some(p) => vec![p.to_path_buf()],
        None => {
            let exe = std::env::current_exe().map_err(|source| Error::Io {
                op: "find the running executable",
                path: PathBuf::from("/proc/self/exe"),
                source,
            })?;
            exe.ancestors()
                .skip(1)
                .take(2)
                .map(|d| d.join(SPAWNER_EXE))
                .collect()
        }
    };
    match candidates.iter().find(|p| p.is_file()) {
        // Absolute, so that a restart later does not depend on the working directory.
        Some(p) => Ok(p.canonicalize().unwrap_or_else(|_| p.clone())),
        None => Err(Error::SpawnerMissing { tried: candidates }),
    }
}

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

/// One spawner process.
#[derive(Debug)]
struct Proc {
    pid: Pid,
    /// Readable once it exited.
    pidfd: OwnedFd,
    /// The inode of the spawner's end of the control socket (`socket:[ino]`).
    socket: u64,
    channel: Mutex<Channel>,
    turn: Mutex<Turn>,
    turn_free: Condvar,
    /// Sandboxes it created (or is creating) and has not destroyed.
    owned: Mutex<HashSet<String>>,
    /// Whether its sandboxes were killed and removed after it ended.
    /// Held while they are; whoever comes second waits until it is done.
    recovered: Mutex<bool>,
}

/// Who talks to the spawner now, and whether it ended.
#[derive(Debug, Default)]
struct Turn {
    busy: bool,
    /// How it ended, once seen (it is reaped then).
    ended: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SpawnerRequest {
    /// The request's name (in errors) and how long the spawner has to answer it.
    fn op(&self) -> (&'static str, Duration) {
        match self {
            SpawnerRequest::Create { .. } => ("create", CREATE_DEADLINE),
            SpawnerRequest::Destroy { .. } => ("destroy", REQUEST_DEADLINE),
            SpawnerRequest::AttachCode { .. } => ("attach_code", REQUEST_DEADLINE),
            SpawnerRequest::AttachScratch { .. } => ("attach_scratch", REQUEST_DEADLINE),
            SpawnerRequest::DetachScratch { .. } => ("detach_scratch", REQUEST_DEADLINE),
            SpawnerRequest::ResetScratch { .. } => ("reset_scratch", REQUEST_DEADLINE),
            SpawnerRequest::AttachScratchFrom { .. } => ("attach_scratch_from", REQUEST_DEADLINE),
            SpawnerRequest::Shutdown => ("shutdown", SHUTDOWN_DEADLINE),
        }
    }
}

impl Proc {
    /// Executes `exe` with the spawner's end of a new control channel on
    /// [`CONTROL_FD`]. Nothing else of this process goes with it: every other
    /// descriptor is close-on-exec.
    fn launch(exe: &Path, state_dir: &Path, cgroup_parent: &Path) -> Result<Proc, Error> {
        let start_err = |source: std::io::Error| Error::SpawnerStart {
            exe: exe.to_path_buf(),
            source,
        };
        let (ours, theirs) = Channel::pair().map_err(start_err)?;
        let socket = nix::sys::stat::fstat(theirs.as_raw_fd())
            .map_err(|e| start_err(e.into()))?
            .st_ino;
        let mut cmd = Command::new(exe);
        cmd.arg("--state-dir")
            .arg(state_dir)
            .arg("--cgroup-parent")
            .arg(cgroup_parent)
            .current_dir("/")
            .stdin(Stdio::null());
        sys::pass_fd(&mut cmd, theirs.as_raw_fd(), CONTROL_FD);
        let child = cmd.spawn().map_err(start_err)?;
        drop(theirs);
        let pid = Pid::from_raw(child.id() as i32);
        let pidfd = match sys::pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = kill(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
                return Err(start_err(e));
            }
        };
        // A send only blocks when the spawner stopped reading: bound it too.
        let _ = ours.stream().set_write_timeout(Some(REQUEST_DEADLINE));
        tracing::info!(spawner_pid = pid.as_raw(), exe = %exe.display(), "spawner started");
        Ok(Proc {
            pid,
            pidfd,
            socket,
            channel: Mutex::new(ours),
            turn: Mutex::new(Turn::default()),
            turn_free: Condvar::new(),
            owned: Mutex::new(HashSet::new()),
            recovered: Mutex::new(false),
        })
    }

    /// Whether it exited (or was seen to end); does not block.
    fn has_ended(&self) -> bool {
        if lock(&self.turn).ended.is_some() {
            return true;
        }
        if sys::readable(self.pidfd.as_fd(), Duration::ZERO) {
            self.end(None);
            return true;
        }
        false
    }

    /// Records how it ended, reaping it, and wakes whoever waits for a turn. With
    /// `kill_why` it is killed first (stuck, or out of step), and that is how it
    /// ended. Returns how it ended.
    fn end(&self, kill_why: Option<String>) -> String {
        let mut turn = lock(&self.turn);
        if let Some(how) = &turn.ended {
            return how.clone();
        }
        if kill_why.is_some() {
            let _ = kill(self.pid, Signal::SIGKILL);
        }
        sys::readable(self.pidfd.as_fd(), EXIT_GRACE);
        let how = match (kill_why, waitpid(self.pid, Some(WaitPidFlag::WNOHANG))) {
            (Some(why), _) => why,
            (None, Ok(WaitStatus::Exited(_, code))) => format!("exited with status {code}"),
            (None, Ok(WaitStatus::Signaled(_, sig, _))) => format!("killed by {}", sig.as_str()),
            (None, Ok(WaitStatus::StillAlive)) => {
                // It closed its channel but does not exit.
                let _ = kill(self.pid, Signal::SIGKILL);
                "closed its channel and was killed".to_owned()
            }
            (None, _) => "exited".to_owned(),
        };
        // A killed spawner is reaped now (it has had EXIT_GRACE to die).
        let _ = waitpid(self.pid, Some(WaitPidFlag::WNOHANG));
        if how == "exited with status 0" {
            tracing::info!(spawner_pid = self.pid.as_raw(), how = %how, "the spawner ended");
        } else {
            tracing::error!(spawner_pid = self.pid.as_raw(), how = %how, "the spawner ended");
        }
        turn.ended = Some(how.clone());
        drop(turn);
        self.turn_free.notify_all();
        how
    }

    /// The error for a failed send or read on the channel: the spawner's death when
    /// it closed its end or exits within [`EXIT_GRACE`]; else it is out of step and
    /// killed.
    fn failed(&self, op: &'static str, doing: &str, e: ipc::Error) -> Error {
        let closed = matches!(&e, ipc::Error::Io(io) if matches!(io.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe))
            || matches!(e, ipc::Error::Closed);
        if closed || sys::readable(self.pidfd.as_fd(), EXIT_GRACE) {
            return self.died(op, self.end(None));
        }
        self.end(Some(format!(
            "killed by the agent: {doing} {op} failed: {}",
            ipc::chain(&e)
        )));
        Error::Spawner(e)
    }

    fn died(&self, op: &'static str, how: String) -> Error {
        Error::SpawnerDied {
            pid: self.pid.as_raw(),
            how,
            op,
        }
    }

    /// Waits for its turn (at most [`TURN_DEADLINE`]), then sends `req` and waits for
    /// the answer within the request's own deadline, counted from the send: time
    /// spent queued behind other requests is never held against the spawner. Fails at
    /// once when the spawner dies.
    fn call(
        &self,
        req: &SpawnerRequest,
        fds: &[BorrowedFd<'_>],
    ) -> Result<ipc::Message<SpawnerReply>, Error> {
        let (op, within) = req.op();
        let turn_deadline = Instant::now() + TURN_DEADLINE;
        {
            let mut turn = lock(&self.turn);
            loop {
                if let Some(how) = &turn.ended {
                    return Err(self.died(op, how.clone()));
                }
                if !turn.busy {
                    turn.busy = true;
                    break;
                }
                let left = turn_deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Error::SpawnerBusy {
                        pid: self.pid.as_raw(),
                        op,
                        after: TURN_DEADLINE,
                    });
                }
                turn = self
                    .turn_free
                    .wait_timeout(turn, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        let answer = self.exchange(req, fds, op, within, Instant::now() + within);
        lock(&self.turn).busy = false;
        self.turn_free.notify_all();
        answer
    }

    fn exchange(
        &self,
        req: &SpawnerRequest,
        fds: &[BorrowedFd<'_>],
        op: &'static str,
        within: Duration,
        deadline: Instant,
    ) -> Result<ipc::Message<SpawnerReply>, Error> {
        let mut ch = lock(&self.channel);
        if let Err(e) = ch.send(req, b"", fds) {
            return Err(self.failed(op, "sending", e));
        }
        loop {
            match ch.try_recv() {
                Ok(Some(m)) => return Ok(m),
                Ok(None) => {}
                Err(e) => {
                    self.end(Some(format!(
                        "killed by the agent: bad answer to {op}: {}",
                        ipc::chain(&e)
                    )));
                    return Err(Error::Spawner(e));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.end(Some(format!(
                    "killed by the agent: no answer to {op} within {within:?}"
                )));
                return Err(Error::SpawnerTimeout {
                    pid: self.pid.as_raw(),
                    op,
                    after: within,
                });
            }
            let (answered, died) = sys::poll2(ch.as_fd(), self.pidfd.as_fd(), left);
            if died {
                return Err(self.died(op, self.end(None)));
            }
            if !answered {
                continue;
            }
            match ch.fill_nonblocking() {
                Ok(0) => return Err(self.died(op, self.end(None))),
                Ok(_) => {}
                Err(ipc::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(self.failed(op, "reading the answer to", e)),
            }
        }
    }
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
        *lock(&spawner.current) = Some(first);
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
        lock(&self.current).as_ref().map_or(0, |p| p.pid.as_raw())
    }

    /// The running spawner: after a death, its sandboxes are killed and removed and a
    /// new spawner is started.
    fn proc(&self) -> Result<Arc<Proc>, Error> {
        let mut current = lock(&self.current);
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
        let mut recovered = lock(&p.recovered);
        if *recovered {
            return;
        }
        *recovered = true;
        let ids: Vec<String> = lock(&p.owned).drain().collect();
        let holders = crate::state::kill_holders(None, &[p.socket]);
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
        lock(&self.gone).extend(ids);
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
        lock(&self.gone).contains(id)
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
        if let SpawnerRequest::Create { id, .. } = req {
            // Before it is sent: a half-built sandbox is the spawner's too.
            lock(&p.owned).insert(id.clone());
        }
        let answer = p.call(req, fds);
        match (&answer, req) {
            (Err(_), _) if p.has_ended() => self.recover(&p),
            (Ok(m), SpawnerRequest::Destroy { id })
                if matches!(m.header, SpawnerReply::Destroyed) =>
            {
                lock(&p.owned).remove(id);
            }
            (Ok(m), SpawnerRequest::Create { id, .. })
                if matches!(m.header, SpawnerReply::Failed { .. }) =>
            {
                lock(&p.owned).remove(id);
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

    /// Kills every process of the sandbox, reaps its init and removes its container
    /// state and cgroup.
    pub fn destroy(&self, sandbox: &mut Sandbox) -> Result<(), Error> {
        let span = tracing::debug_span!("destroy_sandbox", sandbox_id = %sandbox.id());
        let _g = span.enter();
        sandbox.die();
        if lock(&self.gone).remove(sandbox.id()) {
            return Ok(());
        }
        let answer = self.call(&SpawnerRequest::Destroy {
            id: sandbox.id().to_owned(),
        });
        // Its spawner died meanwhile (whatever the answer, maybe a new spawner's "no
        // live sandbox"): it was killed and removed with the others.
        if lock(&self.gone).remove(sandbox.id()) {
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

    /// Tells the spawner the agent is leaving cleanly, and waits (at most
    /// [`SHUTDOWN_DEADLINE`]) for it to exit after it destroyed whatever sandboxes
    /// remain; a spawner that does not is killed, and its sandboxes with it. Later
    /// calls do nothing; later requests fail with [`Error::Stopped`].
    pub fn shutdown(&self) -> Result<(), Error> {
        let Some(p) = lock(&self.current).take() else {
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
            lock(&p.owned).clear();
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

/// The `sprout-spawner` executable's `main`: started by the agent with its control
/// channel on descriptor 3 and `--state-dir DIR --cgroup-parent CGROUP`; serves
/// requests until the agent says `shutdown` or goes away (then it destroys every
/// sandbox and removes the agent's cgroups and state directory itself).
pub fn spawner_main() -> std::process::ExitCode {
    use std::process::ExitCode;
    let usage = "usage: sprout-spawner --state-dir DIR --cgroup-parent CGROUP (started by the sprout agent, with its control socket on descriptor 3)";
    let mut state_dir = None;
    let mut cgroup_parent = None;
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        let slot = match arg.to_str() {
            Some("--state-dir") => &mut state_dir,
            Some("--cgroup-parent") => &mut cgroup_parent,
            _ => {
                eprintln!("sprout-spawner: unknown argument {arg:?}\n{usage}");
                return ExitCode::from(2);
            }
        };
        *slot = args.next().map(PathBuf::from);
    }
    let (Some(state_dir), Some(cgroup_parent)) = (state_dir, cgroup_parent) else {
        eprintln!("sprout-spawner: missing arguments\n{usage}");
        return ExitCode::from(2);
    };
    // Nothing but stdin, stdout, stderr and the control socket may reach a container.
    if let Err(e) = sys::close_from(CONTROL_FD + 1) {
        eprintln!("sprout-spawner: close inherited descriptors: {e}");
        return ExitCode::from(1);
    }
    let channel = match sys::take_inherited_socket(CONTROL_FD) {
        Ok(fd) => Channel::from_fd(fd),
        Err(e) => {
            eprintln!("sprout-spawner: control socket on descriptor {CONTROL_FD}: {e}\n{usage}");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("SPROUT_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,libcgroups=error,libcontainer=warn")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    sys::set_process_name(c"sprout-spawner");
    sys::reset_signals();
    let cgroups = match Cgroups::detect() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %ipc::chain(&e), "sprout-spawner: cgroups");
            return ExitCode::from(1);
        }
    };
    let containers = state_dir.join("containers");
    let orphaned = Orphaned {
        state_dir,
        cgroup_parent,
        cgroups,
    };
    ExitCode::from(serve(channel, &containers, orphaned) as u8)
}

/// The spawner's loop. Returns its exit code.
fn serve(mut channel: Channel, containers: &Path, orphaned: Orphaned) -> i32 {
    let mut live: HashMap<String, Container> = HashMap::new();
    // Sandboxes with a workflow scratch attached over their own.
    let mut scratch_attached: std::collections::HashSet<String> = Default::default();
    let clean_exit = loop {
        let (req, mut msg_fds) = match channel.recv::<SpawnerRequest>() {
            Ok(m) => (m.header, m.fds),
            Err(ipc::Error::Closed) => break false,
            Err(e) => {
                tracing::error!(error = %ipc::chain(&e), "spawner: bad request; exiting");
                break false;
            }
        };
        let sent = match req {
            SpawnerRequest::Create { id, bundle } => {
                match create(&id, &bundle, msg_fds.pop(), containers, &orphaned.cgroups) {
                    Ok((container, agent_end)) => {
                        let pid = container.pid().map(|p| p.as_raw()).unwrap_or(0);
                        live.insert(id, container);
                        channel.send(&SpawnerReply::Created { pid }, b"", &[agent_end.as_fd()])
                    }
                    Err(message) => channel.send(&SpawnerReply::Failed { message }, b"", &[]),
                }
            }
            SpawnerRequest::Destroy { id } => {
                scratch_attached.remove(&id);
                let reply = match live.remove(&id) {
                    Some(c) => match destroy(c, &orphaned.cgroups) {
                        Ok(()) => SpawnerReply::Destroyed,
                        Err(message) => SpawnerReply::Failed { message },
                    },
                    None => SpawnerReply::Failed {
                        message: format!("no live sandbox {id}"),
                    },
                };
                channel.send(&reply, b"", &[])
            }
            SpawnerRequest::AttachCode { id, dir, target } => {
                let inside = target.clone();
                let done = in_sandbox(&live, &id, || {
                    let target = inside;
                    let tree = sys::detached_readonly_tree(&dir)
                        .map_err(|e| format!("clone {} read-only: {e}", dir.display()))?;
                    Ok(move || {
                        if target.starts_with(rootfs::FUNCTIONS_DIR) {
                            std::fs::create_dir_all(&target)?;
                        }
                        sys::move_mount(tree.as_fd(), &target)
                    })
                });
                reply_done(
                    &channel,
                    done.map_err(|e| {
                        format!("attach {} at {}: {e}", dir.display(), target.display())
                    }),
                )
            }
            SpawnerRequest::AttachScratch { id } => {
                let done = match msg_fds.pop() {
                    None => Err("attach_scratch carries no mount descriptor".to_owned()),
                    Some(scratch) => in_sandbox(&live, &id, || {
                        let tree = sys::clone_tree(scratch.as_fd())
                            .map_err(|e| format!("clone the scratch mount: {e}"))?;
                        Ok(move || sys::move_mount(tree.as_fd(), Path::new(rootfs::WORKFLOW_DIR)))
                    }),
                };
                if done.is_ok() {
                    scratch_attached.insert(id);
                }
                reply_done(&channel, done)
            }
            SpawnerRequest::DetachScratch { id } => {
                let done = if scratch_attached.contains(&id) {
                    in_sandbox(&live, &id, || {
                        Ok(|| sys::unmount_detach(Path::new(rootfs::WORKFLOW_DIR)))
                    })
                } else {
                    Err(format!("sandbox {id} has no workflow scratch attached"))
                };
                if done.is_ok() {
                    scratch_attached.remove(&id);
                }
                reply_done(&channel, done)
            }
            SpawnerRequest::ResetScratch { id } => {
                let done = if scratch_attached.contains(&id) {
                    Err(format!(
                        "sandbox {id} has a workflow scratch attached over its own"
                    ))
                } else {
                    in_sandbox(&live, &id, || {
                        let fresh = sys::new_tmpfs(rootfs::WORKFLOW_DIR_MB)
                            .map_err(|e| format!("new tmpfs: {e}"))?;
                        Ok(move || {
                            let dir = Path::new(rootfs::WORKFLOW_DIR);
                            sys::unmount_detach(dir)?;
                            sys::move_mount(fresh.as_fd(), dir)
                        })
                    })
                };
                reply_done(&channel, done)
            }
            SpawnerRequest::AttachScratchFrom { id, from } => {
                let done = in_sandbox(&live, &from, || {
                    Ok(|| sys::clone_path(Path::new(rootfs::WORKFLOW_DIR)))
                })
                .and_then(|tree| {
                    in_sandbox(&live, &id, || {
                        Ok(move || sys::move_mount(tree.as_fd(), Path::new(rootfs::WORKFLOW_DIR)))
                    })
                });
                if done.is_ok() {
                    scratch_attached.insert(id);
                }
                reply_done(&channel, done)
            }
            SpawnerRequest::Shutdown => break true,
        };
        if let Err(e) = sent {
            tracing::error!(error = %ipc::chain(&e), "spawner: reply failed; exiting");
            break false;
        }
    };
    for (id, c) in live.drain() {
        if let Err(message) = destroy(c, &orphaned.cgroups) {
            tracing::error!(sandbox_id = %id, %message, "spawner: destroy at exit failed");
        }
    }
    if !clean_exit {
        tracing::warn!(state_dir = %orphaned.state_dir.display(), "agent went away; spawner removed its sandboxes and state");
        if let Err(e) = orphaned.cgroups.remove_tree(&orphaned.cgroup_parent) {
            tracing::error!(error = %ipc::chain(&e), "spawner: remove cgroups");
        }
        orphaned
            .cgroups
            .remove_if_unused(Path::new(crate::state::CGROUP_PARENT));
        let _ = std::fs::remove_dir_all(&orphaned.state_dir);
        if let Some(root) = orphaned.state_dir.parent() {
            let _ = std::fs::remove_dir(root);
        }
    }
    0
}

/// Builds and starts container `id`. Its stdin is the shim's end of a new socket pair
/// (the other end is returned, for the agent); its stdout and stderr are `output`, the
/// agent's pipe, so that nothing in the sandbox holds a descriptor of the spawner's
/// (its stderr is the daemon's log).
fn create(
    id: &str,
    bundle: &Path,
    output: Option<OwnedFd>,
    containers: &Path,
    cgroups: &Cgroups,
) -> Result<(Container, OwnedFd), String> {
    let fail = |what: &str, e: &dyn std::error::Error| format!("{what}: {}", ipc::chain(e));
    let stderr = output.ok_or("create carries no output pipe descriptor")?;
    let stdout = stderr
        .try_clone()
        .map_err(|e| fail("dup the output pipe", &e))?;
    let (agent_end, shim_end) = UnixStream::pair().map_err(|e| fail("socket pair", &e))?;
    let built = ContainerBuilder::new(id.to_owned(), SyscallType::default())
        .with_root_path(containers)
        .map(|b| {
            b.with_stdin(OwnedFd::from(shim_end))
                .with_stdout(stdout)
                .with_stderr(stderr)
                .as_init(bundle)
                .with_systemd(false)
                .with_detach(true)
                .build()
        });
    let mut container = match built {
        Ok(Ok(c)) => c,
        Ok(Err(e)) | Err(e) => {
            remove_partial(id, containers, cgroups);
            return Err(fail("build container", &e));
        }
    };
    if let Err(e) = container.start() {
        let message = fail("start container", &e);
        let _ = destroy(container, cgroups);
        return Err(message);
    }
    Ok((container, OwnedFd::from(agent_end)))
}

fn reply_done(channel: &Channel, done: Result<(), String>) -> Result<(), ipc::Error> {
    match done {
        Ok(()) => channel.send(&SpawnerReply::Done, b"", &[]),
        Err(message) => channel.send(&SpawnerReply::Failed { message }, b"", &[]),
    }
}

/// Runs a mount operation inside sandbox `id`'s mount namespace: `prepare` runs here
/// (in the spawner's namespace) and returns the step to run in the sandbox's; the
/// spawner always comes back to its own.
fn in_sandbox<T, F>(
    live: &HashMap<String, Container>,
    id: &str,
    prepare: impl FnOnce() -> Result<F, String>,
) -> Result<T, String>
where
    F: FnOnce() -> std::io::Result<T>,
{
    let container = live
        .get(id)
        .ok_or_else(|| format!("no live sandbox {id}"))?;
    let pid = container
        .pid()
        .ok_or_else(|| format!("sandbox {id} has no init process"))?;
    let ns_path = format!("/proc/{pid}/ns/mnt");
    let ns = File::open(&ns_path).map_err(|e| format!("open {ns_path}: {e}"))?;
    // Our own mount namespace, to come back to. Opened for this operation only: a
    // descriptor the spawner keeps is inherited by every container it builds.
    let home =
        File::open("/proc/self/ns/mnt").map_err(|e| format!("open /proc/self/ns/mnt: {e}"))?;
    let step = prepare()?;
    sys::in_mount_ns(ns.as_fd(), home.as_fd(), step).map_err(|e| format!("in sandbox {id}: {e}"))
}

/// Deletes what a failed build left in the state root.
fn remove_partial(id: &str, containers: &Path, cgroups: &Cgroups) {
    let dir = containers.join(id);
    if let Ok(c) = Container::load(dir.clone()) {
        let _ = destroy(c, cgroups);
    }
    let _ = std::fs::remove_dir_all(dir);
}

fn destroy(mut container: Container, cgroups: &Cgroups) -> Result<(), String> {
    if let Some(pid) = container.pid() {
        // Killing the PID namespace's init kills every process in it; reaping it
        // returns once they are all gone. A frozen sandbox (cgroup v1) only dies once
        // thawed, so thaw after the kill.
        let _ = kill(pid, Signal::SIGKILL);
        if let Ok(config) = container.spec() {
            cgroups.thaw_tree(&config.cgroup_path);
        }
        let _ = waitpid(pid, None);
    }
    container
        .delete(true)
        .map_err(|e| format!("delete container {}: {}", container.id(), ipc::chain(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CgroupVersion;

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
        while !lock(&lock(&s.current).clone().unwrap().turn).busy {
            assert!(Instant::now() < deadline, "no request in flight");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_missing_spawner_is_named_with_every_path_tried() {
        let err = find_spawner(Some(Path::new("/nonexistent/sprout-spawner"))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no sprout-spawner executable: tried /nonexistent/sprout-spawner"
        );
        if let Err(Error::SpawnerMissing { tried }) = find_spawner(None) {
            // From target/<profile>/deps: both it and target/<profile> were tried.
            assert_eq!(tried.len(), 2, "{tried:?}");
            assert!(tried.iter().all(|p| p.ends_with(SPAWNER_EXE)), "{tried:?}");
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
        let p = lock(&s.current).clone().unwrap();
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
