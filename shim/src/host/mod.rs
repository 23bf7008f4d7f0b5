//! The instance host: `sprout-shim host <runtime>`, one process per instance of a
//! runtime that is not forked from a zygote (Node.js, native executables).
//!
//! Such a runtime cannot speak sprout's instance protocol itself: Node.js cannot take
//! descriptors over a socket (shared payloads are sealed memfds), and a native
//! executable speaks OpenWhisk's actionloop or AWS Lambda's runtime API. The host
//! speaks the protocol for it, exactly as a forked Python instance does (`ready`,
//! `load`, `invoke`; `docs/protocol.md`), so neither the agent nor the shim's router
//! can tell the difference, and drives the runtime's process (a [`Backend`]) in the
//! runtime's own terms.
//!
//! The host starts with its instance channel on descriptor 3, its calls channel (to
//! the shim) on 4, and the instance's output pipes as stdout and stderr, which the
//! runtime's process inherits: what the function prints is its invocation's logs.
//! The runtime's process dies with the host (`PR_SET_PDEATHSIG`), and the host exits
//! when its runtime's process does, so the agent sees either death as the instance's
//! channel closing.

mod backend;
mod calls;
mod launcher;
mod native;
mod nodejs;

use std::io::{self, Write};
use std::time::{Duration, Instant};

use ipc::proto::{InstanceEvent, InstanceRequest, Runtime};
use ipc::{Channel, Payload};

pub use backend::Error;
use backend::{Backend, Invocation, Outcome};
pub use launcher::Launcher;

/// The host's `main`: serves one instance of `runtime` on descriptors 3 and 4.
pub fn run(runtime: Runtime) -> Result<(), Error> {
    let (instance, calls) = crate::sys::take_host_channels();
    for fd in [&instance, &calls] {
        crate::sys::set_cloexec(fd).map_err(|source| Error::Sys {
            what: "close-on-exec on the host's channels",
            source,
        })?;
    }
    let mut agent = Channel::from_fd(instance);
    let calls = Channel::from_fd(calls);
    let mut backend: Box<dyn Backend> = match runtime {
        Runtime::Python => return Err(Error::NotHosted(runtime.name())),
        Runtime::Nodejs => Box::new(nodejs::Node::boot(calls)?),
        Runtime::Native => Box::new(native::Native::new(calls)),
    };
    let send = |agent: &Channel, event: &InstanceEvent, payload: &Payload| {
        agent
            .send_payload(event, payload, &[])
            .map_err(Error::Agent)
    };
    send(&agent, &InstanceEvent::Ready, &Payload::default())?;

    let spec = match agent
        .recv::<InstanceRequest>()
        .map_err(Error::Agent)?
        .header
    {
        InstanceRequest::Load(spec) => spec,
        other => {
            return Err(Error::Unexpected {
                op: ipc::proto::op_of(&other),
                expected: "load",
            })
        }
    };
    if let Err(error) = backend.load(&spec) {
        // The instance is over after a failed load, as a Python instance's is.
        return send(
            &agent,
            &InstanceEvent::LoadFailed { error },
            &Payload::default(),
        );
    }
    send(
        &agent,
        &InstanceEvent::Loaded { http: None },
        &Payload::default(),
    )?;
    let timeout = Duration::from_millis(spec.about.timeout_ms.max(1));

    loop {
        let msg = match agent.recv::<InstanceRequest>() {
            Ok(msg) => msg,
            Err(ipc::Error::Closed) => return Ok(()), // the agent let go of the instance
            Err(e) => return Err(Error::Agent(e)),
        };
        match msg.header {
            InstanceRequest::Invoke {
                id,
                depth,
                raw,
                env,
            } => {
                let answer = invoke(&mut *backend, id, depth, raw, env, msg.payload, timeout);
                send_answer(&agent, id, answer).map_err(Error::Agent)?;
            }
            // The shim's direct channel to one caller in this sandbox
            // (`docs/protocol.md`, "Direct channels"): served alone until it closes.
            InstanceRequest::Bind { token } if msg.fds.len() == 1 => {
                let end = msg.fds.into_iter().next().expect("one descriptor");
                serve_direct(Channel::from_fd(end), &mut *backend, timeout);
                send(
                    &agent,
                    &InstanceEvent::Unbound { token },
                    &Payload::default(),
                )?;
            }
            other => {
                return Err(Error::Unexpected {
                    op: ipc::proto::op_of(&other),
                    expected: "invoke",
                })
            }
        }
    }
}

/// Runs one invocation. A backend that fails (its runtime's process is gone) ends
/// the host: the agent sees the instance's channel close.
fn invoke(
    backend: &mut dyn Backend,
    id: u64,
    depth: u32,
    raw: bool,
    env: Option<std::collections::BTreeMap<String, String>>,
    event: Payload,
    timeout: Duration,
) -> (Outcome, bool) {
    let invocation = Invocation {
        id,
        depth,
        raw,
        event,
        deadline: Instant::now() + timeout,
        env,
    };
    match backend.invoke(invocation) {
        Ok(answer) => answer,
        Err(e) => {
            // Said before the instance channel closes (it would close as `run`
            // returns, before `main` prints): the agent reads the instance's
            // output once it sees the channel close, and this is why.
            let _ = writeln!(io::stderr(), "sprout-shim host: {}", ipc::chain(&e));
            std::process::exit(1);
        }
    }
}

/// Sends an invocation's answer on `channel` (the instance channel or a direct one).
fn send_answer(channel: &Channel, id: u64, answer: (Outcome, bool)) -> Result<(), ipc::Error> {
    match answer {
        (Outcome::Returned { result, raw }, called) => {
            channel.send_payload(&InstanceEvent::Returned { id, raw, called }, &result, &[])
        }
        (Outcome::Raised(error), called) => channel.send_payload(
            &InstanceEvent::Raised { id, error, called },
            &Payload::default(),
            &[],
        ),
    }
}

/// Answers one caller's invokes on a direct channel until the caller closes it (or
/// breaks the framing). Only plain invokes belong there: one with an OpenWhisk
/// environment or past the depth limit is refused, anything else ignored, as the
/// Python runtime does.
fn serve_direct(mut direct: Channel, backend: &mut dyn Backend, timeout: Duration) {
    loop {
        let Ok(msg) = direct.recv::<InstanceRequest>() else {
            return;
        };
        let InstanceRequest::Invoke {
            id,
            depth,
            raw,
            env,
        } = msg.header
        else {
            continue;
        };
        let refused = if env.is_some() {
            Some("an invoke on a direct channel carries no env".to_owned())
        } else if depth > ipc::proto::MAX_CALL_DEPTH {
            let max = ipc::proto::MAX_CALL_DEPTH;
            Some(format!("call depth {depth} exceeds the limit of {max}"))
        } else {
            None
        };
        let answer = match refused {
            None => invoke(backend, id, depth, raw, None, msg.payload, timeout),
            Some(message) => (
                Outcome::Raised(backend::function_error("ProtocolError", message)),
                false,
            ),
        };
        if send_answer(&direct, id, answer).is_err() {
            return; // the caller is gone, or gave up on this call
        }
    }
}
