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

mod fork_server;
mod host;
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

use host::Launcher;
use router::{Router, Turn};
use zygote::{Spawn, Zygote};

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("take the agent channel from descriptor 0")]
    AgentChannel(#[source] std::io::Error),
    #[error("zygote")]
    Zygote(#[source] zygote::Error),
    #[error("instance host")]
    Host(#[source] host::Error),
    #[error("{0}")]
    Usage(String),
    #[error("talking to the agent")]
    Agent(#[source] ipc::Error),
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

pub(crate) fn sys_err<E: Into<std::io::Error>>(what: &'static str) -> impl FnOnce(E) -> Error {
    move |e| Error::Sys {
        what,
        source: e.into(),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [] => run(),
        // PID 1 of the agent's fork server.
        [mode] if mode == "fork-server" => run_fork_server(),
        // An instance host, started by a sandbox's shim for one instance.
        [mode, runtime] if mode == "host" => {
            runtime_named(runtime).and_then(|r| host::run(r).map_err(Error::Host))
        }
        _ => Err(Error::Usage(format!(
            "usage: sprout-shim [host RUNTIME] (got {args:?})"
        ))),
    };
    if let Err(e) = result {
        let _ = writeln!(std::io::stderr(), "sprout-shim: {}", ipc::chain(&e));
        std::process::exit(1);
    }
}

/// A runtime by its wire name.
fn runtime_named(name: &str) -> Result<Runtime, Error> {
    Runtime::ALL
        .into_iter()
        .find(|r| r.name() == name)
        .ok_or_else(|| Error::Usage(format!("unknown runtime {name:?}")))
}

/// The agent's channel (descriptor 0) and SIGCHLD as a signalfd (orphans are
/// reparented to PID 1, which reaps them).
fn take_agent_and_sigchld() -> Result<(AgentLink, SignalFd), Error> {
    let agent_fd = sys::take_stdin_channel().map_err(Error::AgentChannel)?;
    let agent = AgentLink(Channel::from_fd(agent_fd));
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    mask.thread_block().map_err(sys_err("block SIGCHLD"))?;
    let sigchld = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(sys_err("signalfd"))?;
    Ok((agent, sigchld))
}

fn run_fork_server() -> Result<(), Error> {
    let (agent, sigchld) = take_agent_and_sigchld()?;
    fork_server::serve(agent, &sigchld)
}

fn run() -> Result<(), Error> {
    let runtime = match std::env::var(shim::runtime::RUNTIME_ENV) {
        Ok(name) => runtime_named(&name)?,
        Err(_) => Runtime::Python,
    };
    // A forked sandbox's shim: its zygote was forked from the fork server's, not
    // started here.
    let adopted = zygote::take_adopted().map_err(Error::Zygote)?;
    let (agent, sigchld) = take_agent_and_sigchld()?;

    match shim::runtime::zygote_command(runtime) {
        Some(_) => {
            let zygote = match adopted {
                Some((fd, pid)) => Zygote::adopt(runtime, fd, pid),
                None => Zygote::start(runtime),
            }
            .map_err(Error::Zygote)?;
            let zygote_pid = zygote.pid();
            serve(agent, zygote, zygote_pid, &sigchld)
        }
        // No zygote: each instance is a host of its own. Nothing but the shim
        // itself must outlive an instance (pid 1 as the "zygote").
        None => serve(agent, Launcher::new(runtime), 1, &sigchld),
    }
}

/// Makes the spare, says ready, and serves the agent until it lets go.
fn serve<Z: Spawn>(
    agent: AgentLink,
    spawn: Z,
    zygote_pid: i32,
    sigchld: &SignalFd,
) -> Result<(), Error> {
    let mut router = Router::new(agent, spawn).map_err(Error::Router)?;
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
pub(crate) fn reap(zygote_pid: i32) -> Result<(), Error> {
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
