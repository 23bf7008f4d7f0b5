//! The fork server's shim (`sprout-shim fork-server`): PID 1 of the agent's fork
//! server, a sandbox whose zygote forks children that make new sandboxes.
//!
//! It starts the Python zygote as a fork server (`SPROUT_FORK_SERVER=1`: it loads
//! what making a sandbox needs and moves into a user namespace of its own), says
//! `ready` with a pidfd of the zygote (the agent writes that namespace's id maps),
//! and then passes each of the agent's
//! `fork_sandbox` requests, with its two descriptors, to the zygote and the answer
//! back (and, in a package fork server, the one `import_packages` before them). It has no instances. As PID 1 it reaps the new sandboxes' first processes
//! once their parents (the zygote's children) have exited, and it exits when the
//! agent closes its channel or the zygote exits; its pid namespace, with every
//! sandbox forked from it, ends with it.

use std::os::fd::{AsFd, OwnedFd};

use ipc::proto::{AgentLink, Runtime, ShimEvent, ShimRequest};
use ipc::Message;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signalfd::SignalFd;

use crate::zygote::Zygote;
use crate::{reap, sys_err, Error};

/// How long the zygote may take to answer a `fork_sandbox` (a fork and a reply).
const ZYGOTE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves the agent until it lets go; the zygote's exit is an error.
pub fn serve(mut agent: AgentLink, sigchld: &SignalFd) -> Result<(), Error> {
    let mut zygote = Zygote::start_fork_server(Runtime::Python).map_err(Error::Zygote)?;
    let zygote_pid = zygote.pid();
    // A zygote that stops answering ends the fork server (the agent then makes a new
    // one) instead of holding up every new sandbox.
    zygote
        .link()
        .0
        .stream()
        .set_read_timeout(Some(ZYGOTE_TIMEOUT))
        .map_err(sys_err("set the zygote's read timeout"))?;
    // The zygote waits in a user namespace of its own for the agent to map it: the
    // agent finds it by this pidfd.
    let pidfd = crate::sys::pidfd_open(zygote_pid).map_err(sys_err("pidfd of the zygote"))?;
    agent
        .0
        .send(&ShimEvent::Ready { zygote_pid }, b"", &[pidfd.as_fd()])
        .map_err(Error::Agent)?;
    drop(pidfd);
    loop {
        let (agent_ready, child_exited) = {
            let mut fds = [
                PollFd::new(agent.0.as_fd(), PollFlags::POLLIN),
                PollFd::new(sigchld.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Err(nix::errno::Errno::EINTR) => continue,
                done => done.map_err(sys_err("poll"))?,
            };
            let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), ready(&fds[1]))
        };
        if child_exited {
            while sigchld.read_signal().ok().flatten().is_some() {}
            reap(zygote_pid)?;
        }
        if !agent_ready {
            continue;
        }
        let Message { header, fds, .. } = match agent.0.recv::<ShimRequest>() {
            Ok(m) => m,
            Err(e) if e.is_peer_gone() => return Ok(()),
            Err(e) => return Err(Error::Agent(e)),
        };
        let answer = match header {
            ShimRequest::ForkSandbox(spec) => {
                let sandbox = spec.sandbox.clone();
                match <[OwnedFd; 2]>::try_from(fds) {
                    Ok([channel, output]) => {
                        match zygote.link().fork_sandbox(&spec, &channel, &output) {
                            Ok(Ok(pid)) => ShimEvent::SandboxForked { sandbox, pid },
                            Ok(Err(message)) => ShimEvent::SandboxForkFailed { sandbox, message },
                            Err(e) => return Err(Error::Zygote(crate::zygote::Error::Protocol(e))),
                        }
                    }
                    Err(fds) => ShimEvent::SandboxForkFailed {
                        sandbox,
                        message: format!(
                            "fork_sandbox carries {} descriptors, expected 2 (channel, output)",
                            fds.len()
                        ),
                    },
                }
            }
            ShimRequest::ImportPackages(spec) => {
                drop(fds); // it carries none; any closes here
                match zygote.link().import_packages(&spec) {
                    Ok(Ok(imported)) => ShimEvent::PackagesImported(imported),
                    Ok(Err(message)) => ShimEvent::ImportRefused { message },
                    Err(e) => return Err(Error::Zygote(crate::zygote::Error::Protocol(e))),
                }
            }
            ShimRequest::SpawnInstance { instance, .. } => ShimEvent::SpawnFailed {
                instance,
                message: "the fork server has no instances".into(),
            },
            ShimRequest::Call { .. } => {
                return Err(Error::Usage("the fork server runs no calls".into()))
            }
        };
        agent.0.send(&answer, b"", &[]).map_err(Error::Agent)?;
    }
}
