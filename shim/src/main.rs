//! `sprout-shim`: PID 1 of a sprout sandbox.
//!
//! Started by libcontainer with its channel to the agent on descriptor 0. It starts
//! the Python zygote, has it fork a spare instance (which makes its memory private
//! and waits), tells the agent it is ready, and for each `spawn_instance` hands the
//! agent the spare's (or a new fork's) own channel and output pipes: the agent tells
//! the instance what to load and invokes it directly. As PID 1 it reaps every orphan. It exits when the agent closes its
//! channel, which ends the sandbox.

mod sys;

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Command, Stdio};

use ipc::proto::{AgentLink, InstanceLink, Runtime, ShimRequest, ZygoteLink};
use ipc::Channel;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("take the agent channel from descriptor 0")]
    AgentChannel(#[source] std::io::Error),
    #[error("start the Python zygote ({python})")]
    StartZygote {
        python: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("zygote (pid {pid}) exited: {status}")]
    ZygoteExited { pid: i32, status: String },
    #[error("talking to the {peer}")]
    Protocol {
        peer: &'static str,
        #[source]
        source: ipc::Error,
    },
    #[error("{what}")]
    Sys {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn sys_err<E: Into<std::io::Error>>(what: &'static str) -> impl FnOnce(E) -> Error {
    move |e| Error::Sys {
        what,
        source: e.into(),
    }
}

fn main() {
    if let Err(e) = run() {
        let _ = writeln!(std::io::stderr(), "sprout-shim: {}", ipc::chain(&e));
        std::process::exit(1);
    }
}

fn run() -> Result<(), Error> {
    let agent_fd = sys::take_stdin_channel().map_err(Error::AgentChannel)?;
    let mut agent = AgentLink(Channel::from_fd(agent_fd));

    // Orphans are reparented to us: take SIGCHLD through a signalfd and reap them.
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    mask.thread_block().map_err(sys_err("block SIGCHLD"))?;
    let sigchld = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(sys_err("signalfd"))?;

    let (mut zygote, zygote_pid) = start_zygote()?;
    // Fork the first instance now, while nothing waits for it: it readies itself as a
    // spare (and a stem cell is frozen with it in place).
    let mut spare = Some(fork_instance(&mut zygote, 0)?);
    agent
        .announce_ready(zygote_pid)
        .map_err(|source| Error::Protocol {
            peer: "agent",
            source,
        })?;

    loop {
        let mut fds = [
            PollFd::new(agent.0.as_fd(), PollFlags::POLLIN),
            PollFd::new(sigchld.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(sys_err("poll")(e)),
            Ok(_) => {}
        }
        let agent_ready = fds[0].any().unwrap_or(false);
        let child_exited = fds[1].any().unwrap_or(false);
        if child_exited {
            while sigchld.read_signal().ok().flatten().is_some() {}
            reap(zygote_pid)?;
        }
        if agent_ready {
            match agent.0.fill() {
                Ok(0) => return Ok(()), // the agent let go of the sandbox
                Ok(_) => {}
                Err(source) => {
                    return Err(Error::Protocol {
                        peer: "agent",
                        source,
                    })
                }
            }
            while let Some(msg) =
                agent
                    .0
                    .try_recv::<ShimRequest>()
                    .map_err(|source| Error::Protocol {
                        peer: "agent",
                        source,
                    })?
            {
                match msg.header {
                    ShimRequest::SpawnInstance {
                        instance,
                        runtime: Runtime::Python,
                    } => {
                        let forked = match spare.take() {
                            Some(spare) => spare,
                            None => fork_instance(&mut zygote, instance)?,
                        };
                        hand_over(&agent, instance, forked)?;
                    }
                }
            }
        }
    }
}

/// Starts the zygote with its channel on descriptor 3 and waits for its `ready`.
fn start_zygote() -> Result<(ZygoteLink, i32), Error> {
    let (ours, theirs) = Channel::pair().map_err(sys_err("socket pair"))?;
    let theirs = theirs.into_fd();
    let stderr = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map_err(sys_err("dup stderr"))?;
    let mut cmd = Command::new(shim::PYTHON);
    cmd.args(["-I", "-B", shim::PYTHON_RUNTIME_PATH])
        .stdin(Stdio::null())
        .stdout(Stdio::from(stderr));
    sys::with_fd3_and_clean_mask(&mut cmd, &theirs);
    let child = cmd.spawn().map_err(|source| Error::StartZygote {
        python: shim::PYTHON,
        source,
    })?;
    drop(theirs);
    let mut link = ZygoteLink(ours);
    link.wait_ready().map_err(|source| Error::Protocol {
        peer: "zygote",
        source,
    })?;
    Ok((link, child.id() as i32))
}

/// Forks an instance from the zygote and hands its channel and pipes to the agent.
/// A forked instance and the agent's ends of its channel and output pipes.
type Forked = Result<(i32, Channel, OwnedFd, OwnedFd), String>;

/// Asks the zygote for a new instance; `Ok(Err(_))` is a fork the zygote refused.
fn fork_instance(zygote: &mut ZygoteLink, instance: u64) -> Result<Forked, Error> {
    let (agent_end, instance_end) = Channel::pair().map_err(sys_err("socket pair"))?;
    let (out_r, out_w) = std::io::pipe().map_err(sys_err("pipe"))?;
    let (err_r, err_w) = std::io::pipe().map_err(sys_err("pipe"))?;
    let forked = zygote
        .fork(instance, Runtime::Python, &instance_end, &out_w, &err_w)
        .map_err(|source| Error::Protocol {
            peer: "zygote",
            source,
        })?;
    // The instance has its copies now; ours must go so the agent sees EOF when it dies.
    drop((instance_end, out_w, err_w));
    let pid = match forked {
        Ok(pid) => pid,
        Err(message) => return Ok(Err(message)),
    };
    // Hand it over only once it is set up (so a stem cell is frozen with a ready spare).
    let mut link = InstanceLink(agent_end);
    match link.wait_ready() {
        Ok(()) => Ok(Ok((
            pid,
            link.0,
            OwnedFd::from(out_r),
            OwnedFd::from(err_r),
        ))),
        Err(e) => Ok(Err(format!(
            "instance {instance} (pid {pid}) did not get ready: {}",
            ipc::chain(&e)
        ))),
    }
}

/// Gives the agent an instance's channel and pipes (or the reason there is none).
fn hand_over(agent: &AgentLink, instance: u64, forked: Forked) -> Result<(), Error> {
    let reported = match forked {
        Ok((pid, channel, stdout, stderr)) => {
            agent.report_spawned(instance, pid, &channel, stdout, stderr)
        }
        Err(message) => agent.report_spawn_failed(instance, message),
    };
    reported.map_err(|source| Error::Protocol {
        peer: "agent",
        source,
    })
}

/// Reaps every exited child; the zygote's exit ends the sandbox.
fn reap(zygote_pid: i32) -> Result<(), Error> {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(sys_err("waitpid")(e)),
            Ok(status) => {
                if status.pid().map(|p| p.as_raw()) == Some(zygote_pid) {
                    return Err(Error::ZygoteExited {
                        pid: zygote_pid,
                        status: format!("{status:?}"),
                    });
                }
            }
        }
    }
}
