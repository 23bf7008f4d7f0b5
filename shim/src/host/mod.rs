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

mod calls;
mod launcher;
mod native;
mod nodejs;

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use ipc::proto::{FunctionError, InstanceEvent, InstanceRequest, LoadSpec, Runtime};
use ipc::{Channel, Payload};

pub use launcher::Launcher;

/// The host's instance channel and calls channel, as the launcher passes them.
const INSTANCE_FD: i32 = 3;
const CALLS_FD: i32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the {0} runtime is forked from a zygote, not hosted")]
    NotHosted(&'static str),
    #[error("talking to the agent")]
    Agent(#[source] ipc::Error),
    #[error("the agent sent {op} where {expected} was expected")]
    Unexpected {
        op: &'static str,
        expected: &'static str,
    },
    /// The runtime's process is gone or broke its protocol: the instance ends.
    #[error("{0}")]
    Runtime(String),
    #[error("{what}")]
    Sys {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// One invocation, as the host hands it to its backend.
#[derive(Debug)]
pub struct Invocation {
    pub id: u64,
    /// 0 for a top-level invocation; a callee's is its caller's + 1.
    pub depth: u32,
    /// The event is bytes from a calling function, not JSON.
    pub raw: bool,
    pub event: Payload,
    /// When the invocation's time limit (the function's `timeout_ms`) runs out.
    pub deadline: Instant,
}

impl Invocation {
    /// The invocation's id as a function sees it (an AWS `aws_request_id`, an
    /// OpenWhisk `activation_id`): 32 hex digits.
    pub fn activation_id(&self) -> String {
        activation_id(self.id)
    }
}

/// The id of invocation `id` as a function sees it: 32 lowercase hex digits.
pub fn activation_id(id: u64) -> String {
    format!("{id:032x}")
}

/// How one invocation ended.
#[derive(Debug)]
pub enum Outcome {
    /// The result: JSON text, or bytes with `raw` (for a calling function).
    Returned { result: Payload, raw: bool },
    /// The function failed; the error is its own (a thrown error, an error answer).
    Raised(FunctionError),
}

/// A runtime's process as the host drives it.
pub trait Backend {
    /// Loads the handler `spec` names (once). `Err` is the function's own failure
    /// (a missing file, an exception at load), reported as `load_failed`.
    fn load(&mut self, spec: &LoadSpec) -> Result<(), FunctionError>;

    /// Runs one invocation. `Ok((outcome, called))`: `called` says the function
    /// called other functions. `Err`: the runtime's process is gone or broke its
    /// protocol; the host exits and the instance is over.
    fn invoke(&mut self, invocation: Invocation) -> Result<(Outcome, bool), Error>;
}

/// The host's `main`: serves one instance of `runtime` on descriptors 3 and 4.
pub fn run(runtime: Runtime) -> Result<(), Error> {
    // SAFETY: the launcher started this process with its instance and calls channels
    // on descriptors 3 and 4 (and close-on-exec cleared on them); nothing else in
    // this process owns them.
    let (instance, calls) = unsafe {
        (
            OwnedFd::from_raw_fd(INSTANCE_FD),
            OwnedFd::from_raw_fd(CALLS_FD),
        )
    };
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
    send(&agent, &InstanceEvent::Loaded, &Payload::default())?;
    let timeout = Duration::from_millis(spec.about.timeout_ms.max(1));

    loop {
        let msg = match agent.recv::<InstanceRequest>() {
            Ok(msg) => msg,
            Err(ipc::Error::Closed) => return Ok(()), // the agent let go of the instance
            Err(e) => return Err(Error::Agent(e)),
        };
        let (id, depth, raw) = match msg.header {
            InstanceRequest::Invoke { id, depth, raw } => (id, depth, raw),
            other => {
                return Err(Error::Unexpected {
                    op: ipc::proto::op_of(&other),
                    expected: "invoke",
                })
            }
        };
        let invocation = Invocation {
            id,
            depth,
            raw,
            event: msg.payload,
            deadline: Instant::now() + timeout,
        };
        match backend.invoke(invocation)? {
            (Outcome::Returned { result, raw }, called) => send(
                &agent,
                &InstanceEvent::Returned { id, raw, called },
                &result,
            )?,
            (Outcome::Raised(error), called) => send(
                &agent,
                &InstanceEvent::Raised { id, error, called },
                &Payload::default(),
            )?,
        }
    }
}

/// A function's own failure, as the host reports it when the runtime has none to
/// give (a missing file, a process that exited during its load).
pub fn function_error(kind: &str, message: impl Into<String>) -> FunctionError {
    FunctionError {
        kind: kind.to_owned(),
        message: message.into(),
        traceback: String::new(),
    }
}
