//! The native backend: the function's own executable, `exec` speaking OpenWhisk's
//! actionloop protocol or `bootstrap` speaking AWS Lambda's runtime API.

use ipc::proto::{FunctionError, LoadSpec};
use ipc::Channel;

use super::{function_error, Backend, Error, Invocation, Outcome};

#[derive(Debug)]
pub struct Native {
    _calls: Channel,
}

impl Native {
    pub fn new(calls: Channel) -> Native {
        Native { _calls: calls }
    }
}

impl Backend for Native {
    fn load(&mut self, _spec: &LoadSpec) -> Result<(), FunctionError> {
        Err(function_error(
            "NotImplemented",
            "the native runtime is not built yet",
        ))
    }

    fn invoke(&mut self, _invocation: Invocation) -> Result<(Outcome, bool), Error> {
        Err(Error::Runtime("the native runtime is not built yet".into()))
    }
}
