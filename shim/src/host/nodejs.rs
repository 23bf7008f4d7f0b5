//! The Node.js backend: a `node` process booted ahead of its `load` (the spare a
//! stem cell holds), driven over a socket pair without descriptors.

use ipc::proto::{FunctionError, LoadSpec};
use ipc::Channel;

use super::{function_error, Backend, Error, Invocation, Outcome};

/// A booted `node` running the runtime's instance script.
#[derive(Debug)]
pub struct Node {
    _calls: Channel,
}

impl Node {
    /// Starts `node` and waits until it is ready for its `load`.
    pub fn boot(calls: Channel) -> Result<Node, Error> {
        Ok(Node { _calls: calls })
    }
}

impl Backend for Node {
    fn load(&mut self, _spec: &LoadSpec) -> Result<(), FunctionError> {
        Err(function_error(
            "NotImplemented",
            "the Node.js runtime is not built yet",
        ))
    }

    fn invoke(&mut self, _invocation: Invocation) -> Result<(Outcome, bool), Error> {
        Err(Error::Runtime(
            "the Node.js runtime is not built yet".into(),
        ))
    }
}
