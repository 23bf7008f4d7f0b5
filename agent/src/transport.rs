//! What the agent's transports (the HTTP server, the CLI, a linking controller) call,
//! defined by the core so that no transport is imported by it: [`Handle`] takes a
//! parsed [`Request`] to its [`Response`], and [`FastCall`] lets an event loop finish
//! a warm invoke without a worker thread.

use std::os::fd::RawFd;

use crate::error::Error;
use crate::request::{Request, Response};

pub use crate::scheduler::{Abandon, Abandoned};

/// What a transport dispatches parsed requests to: the agent, or a fake in tests.
pub trait Handle: Send + Sync + 'static {
    // The agent's `Error` carries captured logs; it is returned once per request.
    #[allow(clippy::result_large_err)]
    fn handle(&self, req: Request) -> Result<Response, Error>;

    /// [`Handle::handle`] for a request the server may take back while it waits:
    /// `abandon` is set when its client goes away or the server drains. The default
    /// ignores it.
    #[allow(clippy::result_large_err)]
    fn handle_abandonable(&self, req: Request, _abandon: &Abandon) -> Result<Response, Error> {
        self.handle(req)
    }

    /// Starts `req` so that it completes on the event loop, when it can: the agent
    /// does so for warm invokes of an idle, running instance. `None` (the default)
    /// sends the request to a worker.
    fn start_fast(&self, _req: &Request) -> Option<Box<dyn FastCall>> {
        None
    }
}

/// An invocation in flight whose instance answers on a socket the event loop watches.
pub trait FastCall: Send {
    /// The socket to watch for the answer.
    fn fd(&self) -> RawFd;
    /// Reads what the socket holds, without blocking.
    fn poll(&mut self) -> FastPoll;
    /// Finishes the call the blocking way (on a thread of its own).
    #[allow(clippy::result_large_err)]
    fn finish(self: Box<Self>) -> Result<Response, Error>;
}

/// What a [`FastCall`] has after reading.
// Moved once per call; boxing `Done` would allocate on the warm path instead.
#[allow(clippy::large_enum_variant)]
pub enum FastPoll {
    Pending,
    Done(Result<Response, Error>),
    /// The call needs waiting: finish it with [`FastCall::finish`].
    Handoff,
}
