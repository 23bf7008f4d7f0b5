//! The runtime's zygote: starting it (with the command [`shim::runtime`] gives), and
//! forking function instances from it.
//!
//! [`Spawn`] is the seam between the call router and the zygote: the router asks for
//! an instance that writes to given pipes and gets back its pid, its channel (ready
//! for `load`) and its calls channel. Tests put a fake behind it.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::process::{Command, Stdio};

use ipc::proto::{InstanceLink, Runtime, ZygoteLink};
use ipc::Channel;

use crate::sys;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("start the {runtime:?} zygote ({program})")]
    Start {
        runtime: Runtime,
        program: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the {} runtime has no zygote", .0.name())]
    NoZygote(Runtime),
    #[error("talking to the zygote")]
    Protocol(#[source] ipc::Error),
    #[error("{what}")]
    Sys {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

fn sys_err(what: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Sys { what, source }
}

/// A new instance, set up (it said `ready`) and waiting for its `load`.
#[derive(Debug)]
pub struct Forked {
    /// In the sandbox's pid namespace.
    pub pid: i32,
    /// The instance's own channel (`load`, `invoke`).
    pub channel: InstanceLink,
    /// The shim's end of the instance's calls channel.
    pub calls: Channel,
}

/// Where instances come from: a zygote's forks, or a launcher's hosts.
pub trait Spawn {
    /// The runtime of the instances it makes.
    fn runtime(&self) -> Runtime;

    /// Forks an instance (named `instance` to the runtime) whose stdout and stderr are
    /// `stdout` and `stderr`, and waits for its `ready`. `Ok(Err(message))` is a fork
    /// the zygote refused or an instance that did not get ready; `Err` is a zygote
    /// that cannot be talked to any more.
    fn fork(
        &mut self,
        instance: u64,
        stdout: BorrowedFd<'_>,
        stderr: BorrowedFd<'_>,
    ) -> Result<Result<Forked, String>, Error>;

    /// Kills an instance it forked (SIGKILL).
    fn kill(&mut self, pid: i32);
}

/// A running zygote.
#[derive(Debug)]
pub struct Zygote {
    link: ZygoteLink,
    pid: i32,
    runtime: Runtime,
}

/// The environment variables that hand a forked sandbox's shim its zygote: the
/// descriptor of its channel, and its pid.
pub const ZYGOTE_FD_ENV: &str = "SPROUT_ZYGOTE_FD";
pub const ZYGOTE_PID_ENV: &str = "SPROUT_ZYGOTE_PID";

/// The zygote a forked sandbox's shim was started with ([`ZYGOTE_FD_ENV`],
/// [`ZYGOTE_PID_ENV`]), taken out of the environment; `None` when there is none.
/// Call it once, before any thread starts.
pub fn take_adopted() -> Result<Option<(std::os::fd::OwnedFd, i32)>, Error> {
    let (Some(fd), Some(pid)) = (
        std::env::var_os(ZYGOTE_FD_ENV),
        std::env::var_os(ZYGOTE_PID_ENV),
    ) else {
        return Ok(None);
    };
    std::env::remove_var(ZYGOTE_FD_ENV);
    std::env::remove_var(ZYGOTE_PID_ENV);
    let bad = |what: &'static str| {
        move |_| Error::Sys {
            what,
            source: io::Error::from(io::ErrorKind::InvalidInput),
        }
    };
    let fd: i32 = fd
        .to_str()
        .ok_or(())
        .and_then(|s| s.parse().map_err(|_| ()))
        .map_err(bad("SPROUT_ZYGOTE_FD is not a descriptor number"))?;
    let pid: i32 = pid
        .to_str()
        .ok_or(())
        .and_then(|s| s.parse().map_err(|_| ()))
        .map_err(bad("SPROUT_ZYGOTE_PID is not a pid"))?;
    let fd =
        sys::take_inherited_socket(fd).map_err(sys_err("take the adopted zygote's channel"))?;
    Ok(Some((fd, pid)))
}

impl Zygote {
    /// Adopts a zygote that is already running (a forked sandbox's, forked from the
    /// fork server's zygote) on channel `fd`, and waits for its `ready`.
    pub fn adopt(runtime: Runtime, fd: std::os::fd::OwnedFd, pid: i32) -> Result<Zygote, Error> {
        let mut link = ZygoteLink(Channel::from_fd(fd));
        link.wait_ready().map_err(Error::Protocol)?;
        Ok(Zygote { link, pid, runtime })
    }

    /// Starts the fork server's zygote: one that also forks new sandboxes.
    pub fn start_fork_server(runtime: Runtime) -> Result<Zygote, Error> {
        Self::start_with(runtime, &[("SPROUT_FORK_SERVER", "1")])
    }

    /// The channel to the zygote.
    pub fn link(&mut self) -> &mut ZygoteLink {
        &mut self.link
    }

    /// Starts the zygote with its channel on descriptor 3 and waits for its `ready`.
    /// Its stdout and stderr are the shim's stderr: the sandbox's output pipe, which
    /// the agent reads (never a descriptor of the host's); its stdin is `/dev/null`.
    pub fn start(runtime: Runtime) -> Result<Zygote, Error> {
        Self::start_with(runtime, &[])
    }

    fn start_with(runtime: Runtime, extra_env: &[(&str, &str)]) -> Result<Zygote, Error> {
        let (ours, theirs) = Channel::pair().map_err(sys_err("socket pair"))?;
        let theirs = theirs.into_fd();
        let stderr = io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map_err(sys_err("dup stderr"))?;
        let launch = shim::runtime::zygote_command(runtime).ok_or(Error::NoZygote(runtime))?;
        let mut cmd = Command::new(launch.program);
        cmd.args(&launch.args)
            .envs(launch.env)
            .envs(extra_env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::from(stderr))
            .stderr(Stdio::inherit());
        sys::with_fd3_and_clean_mask(&mut cmd, &theirs);
        let child = cmd.spawn().map_err(|source| Error::Start {
            runtime,
            program: launch.program,
            source,
        })?;
        drop(theirs);
        let mut link = ZygoteLink(ours);
        link.wait_ready().map_err(Error::Protocol)?;
        Ok(Zygote {
            link,
            pid: child.id() as i32,
            runtime,
        })
    }

    /// The zygote's pid (its exit ends the sandbox).
    pub fn pid(&self) -> i32 {
        self.pid
    }
}

impl Spawn for Zygote {
    fn runtime(&self) -> Runtime {
        self.runtime
    }

    fn fork(
        &mut self,
        instance: u64,
        stdout: BorrowedFd<'_>,
        stderr: BorrowedFd<'_>,
    ) -> Result<Result<Forked, String>, Error> {
        fork_ready(&mut self.link, self.runtime, instance, stdout, stderr)
    }

    fn kill(&mut self, pid: i32) {
        sys::kill(pid);
    }
}

/// The shim's side of the fork handshake: the zygote forks an instance with its
/// channel, output pipes and calls channel, and the instance says `ready`.
pub fn fork_ready(
    zygote: &mut ZygoteLink,
    runtime: Runtime,
    instance: u64,
    stdout: BorrowedFd<'_>,
    stderr: BorrowedFd<'_>,
) -> Result<Result<Forked, String>, Error> {
    let (ours, theirs) = Channel::pair().map_err(sys_err("socket pair"))?;
    let (calls, calls_theirs) = Channel::pair().map_err(sys_err("socket pair"))?;
    let forked = zygote
        .fork(instance, runtime, &theirs, stdout, stderr, &calls_theirs)
        .map_err(Error::Protocol)?;
    // The instance has its copies now; ours go so its death shows as these closing.
    drop((theirs, calls_theirs));
    let pid = match forked {
        Ok(pid) => pid,
        Err(message) => return Ok(Err(message)),
    };
    Ok(wait_ready(InstanceLink(ours), calls, pid, instance))
}

/// Waits for a new instance's `ready` on `channel`: the instance, or why it did not
/// get ready (an instance still alive but confused is killed: it must not linger).
pub fn wait_ready(
    mut channel: InstanceLink,
    calls: Channel,
    pid: i32,
    instance: u64,
) -> Result<Forked, String> {
    match channel.wait_ready() {
        Ok(()) => Ok(Forked {
            pid,
            channel,
            calls,
        }),
        Err(e) => {
            if !matches!(e, ipc::Error::Closed | ipc::Error::Truncated) {
                sys::kill(pid);
            }
            Err(format!(
                "instance {instance} (pid {pid}) did not get ready: {}",
                ipc::chain(&e)
            ))
        }
    }
}
