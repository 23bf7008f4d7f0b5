//! `sprout-shim`: PID 1 of a sprout sandbox.
//!
//! Started by libcontainer with its channel to the agent on descriptor 0 and, on 1
//! and 2, the write end of the sandbox's output pipe, which the agent reads (line by
//! line, capped and rate-limited, into its log): nothing in the sandbox holds a
//! descriptor of the host's, the agent's own stderr included. It starts
//! its runtime's zygote ([`shim::runtime`]), has it fork a spare instance (which makes its memory private
//! and waits), tells the agent it is ready, and for each `spawn_instance` hands the
//! agent the spare's (or a new fork's) own channel and output pipes: the agent tells
//! the instance what to load and invokes it directly. Every instance also gets a
//! calls channel to the shim, which runs the calls between functions of this sandbox
//! on instances of its own ([`router`]). As PID 1 it reaps every orphan. It exits
//! when the agent closes its channel, which ends the sandbox.

mod router;
mod sys;
mod zygote;

use std::io::Write;
use std::os::fd::AsFd;

use ipc::proto::{AgentLink, Runtime};
use ipc::Channel;
use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use router::{Router, Turn};
use zygote::Zygote;

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("take the agent channel from descriptor 0")]
    AgentChannel(#[source] std::io::Error),
    #[error("zygote")]
    Zygote(#[source] zygote::Error),
    #[error("zygote (pid {pid}) exited: {status}")]
    ZygoteExited { pid: i32, status: String },
    #[error("serving the sandbox")]
    Router(#[source] router::Error),
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
    let agent = AgentLink(Channel::from_fd(agent_fd));

    // Orphans are reparented to us: take SIGCHLD through a signalfd and reap them.
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    mask.thread_block().map_err(sys_err("block SIGCHLD"))?;
    let sigchld = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(sys_err("signalfd"))?;

    // Every sandbox runs Python for now; the agent will name the runtime.
    let zygote = Zygote::start(Runtime::Python).map_err(Error::Zygote)?;
    let zygote_pid = zygote.pid();
    let mut router = Router::new(agent, zygote).map_err(Error::Router)?;
    router.fork_spare().map_err(Error::Router)?;
    router.announce_ready(zygote_pid).map_err(Error::Router)?;

    loop {
        match router.turn(Some(sigchld.as_fd())).map_err(Error::Router)? {
            Turn::AgentGone => return Ok(()), // the agent let go of the sandbox
            Turn::Woken => {
                while sigchld.read_signal().ok().flatten().is_some() {}
                reap(zygote_pid)?;
            }
            Turn::Served => {}
        }
    }
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
