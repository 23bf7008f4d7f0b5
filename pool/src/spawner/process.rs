//! One spawner process as the agent sees it ([`Proc`]): started with the spawner's
//! end of a new control channel, its pidfd, and the requests that take turns on the
//! channel, each within its deadline. A spawner that misses a deadline or answers out
//! of step is killed; one that ended is reaped, and how it ended is what every
//! request in flight or waiting then fails with.

use std::collections::HashSet;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use parking_lot::{Condvar, Mutex};

use super::protocol::{SpawnerReply, SpawnerRequest};
use super::{CONTROL_FD, REQUEST_DEADLINE, TURN_DEADLINE};
use crate::{sys, Error};
use ipc::Channel;

/// How long a spawner that closed its channel, or was killed, has to be gone.
const EXIT_GRACE: Duration = Duration::from_secs(1);

/// One spawner process.
#[derive(Debug)]
pub(super) struct Proc {
    pub(super) pid: Pid,
    /// Readable once it exited.
    pub(super) pidfd: OwnedFd,
    /// The inode of the spawner's end of the control socket (`socket:[ino]`).
    pub(super) socket: u64,
    channel: Mutex<Channel>,
    /// The agent's end of the control socket again (a duplicate), polled for a
    /// hang-up without waiting for the channel's lock.
    hang_up_watch: std::os::unix::net::UnixStream,
    turn: Mutex<Turn>,
    turn_free: Condvar,
    /// Sandboxes it created (or is creating) and has not destroyed.
    pub(super) owned: Mutex<HashSet<String>>,
    /// Whether its sandboxes were killed and removed after it ended.
    /// Held while they are; whoever comes second waits until it is done.
    pub(super) recovered: Mutex<bool>,
}

/// Who talks to the spawner now, and whether it ended.
#[derive(Debug, Default)]
struct Turn {
    busy: bool,
    /// How it ended, once seen (it is reaped then).
    ended: Option<String>,
}

impl Proc {
    /// Executes `exe` with the spawner's end of a new control channel on
    /// [`CONTROL_FD`]. Nothing else of this process goes with it: every other
    /// descriptor is close-on-exec.
    pub(super) fn launch(
        exe: &Path,
        state_dir: &Path,
        cgroup_parent: &Path,
    ) -> Result<Proc, Error> {
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
        let hang_up_watch = match ours.stream().try_clone() {
            Ok(watch) => watch,
            Err(e) => {
                let _ = kill(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
                return Err(start_err(e));
            }
        };
        tracing::info!(spawner_pid = pid.as_raw(), exe = %exe.display(), "spawner started");
        Ok(Proc {
            pid,
            pidfd,
            socket,
            channel: Mutex::new(ours),
            hang_up_watch,
            turn: Mutex::new(Turn::default()),
            turn_free: Condvar::new(),
            owned: Mutex::new(HashSet::new()),
            recovered: Mutex::new(false),
        })
    }

    /// Whether no process holds the spawner's end of the control socket any more (its
    /// end is released: the channel hangs up). The spawner never shuts the socket
    /// down, so once it has ended this says that no half-built container kept a copy.
    pub(super) fn far_end_released(&self) -> bool {
        sys::hung_up(self.hang_up_watch.as_fd())
    }

    /// Whether it exited (or was seen to end); does not block.
    pub(super) fn has_ended(&self) -> bool {
        if self.turn.lock().ended.is_some() {
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
    pub(super) fn end(&self, kill_why: Option<String>) -> String {
        let mut turn = self.turn.lock();
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
        if e.is_peer_gone() || sys::readable(self.pidfd.as_fd(), EXIT_GRACE) {
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
    pub(super) fn call(
        &self,
        req: &SpawnerRequest,
        fds: &[BorrowedFd<'_>],
    ) -> Result<ipc::Message<SpawnerReply>, Error> {
        let (op, within) = req.op();
        let turn_deadline = Instant::now() + TURN_DEADLINE;
        {
            let mut turn = self.turn.lock();
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
                self.turn_free.wait_for(&mut turn, left);
            }
        }
        let answer = self.exchange(req, fds, op, within, Instant::now() + within);
        self.turn.lock().busy = false;
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
        let mut ch = self.channel.lock();
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

    /// Whether a request holds the turn now.
    #[cfg(test)]
    pub(super) fn is_busy(&self) -> bool {
        self.turn.lock().busy
    }
}
