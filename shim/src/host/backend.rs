//! What the instance host and its backends share: the [`Backend`] seam a runtime's
//! process is driven through, one [`Invocation`] and its [`Outcome`], and the host's
//! [`Error`].

use std::collections::BTreeMap;
use std::io;
use std::time::Instant;

use ipc::proto::{FunctionError, LoadSpec};
use ipc::Payload;

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
    /// An OpenWhisk activation's variables (`__OW_*` and its init parameters), for
    /// this invocation only; `None` for sprout's own.
    pub env: Option<BTreeMap<String, String>>,
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

/// A function's own failure, as the host reports it when the runtime has none to
/// give (a missing file, a process that exited during its load).
pub fn function_error(kind: &str, message: impl Into<String>) -> FunctionError {
    FunctionError {
        kind: kind.to_owned(),
        message: message.into(),
        traceback: String::new(),
    }
}
