//! The agent's HTTP/1.1 API on a Unix socket, and on a TCP address with keys and
//! TLS (`docs/api.md`).
//!
//! One thread runs a mio event loop that accepts connections, parses requests with
//! `httparse` and writes responses; a fixed pool of worker threads turns each
//! complete request into a [`Request`](crate::request::Request), calls
//! [`Handle::handle`] and encodes the answer, which comes back to the loop through a
//! channel and a [`mio::Waker`].
//!
//! Warm invokes skip the workers: [`Handle::start_fast`] sends the invocation to an
//! idle instance right away, the loop watches the instance's socket, and writes the
//! response when the answer is there ([`FastCall`]). A call that needs waiting — a
//! failure to clean up after, or one still running after [`FAST_BUDGET`] (its output
//! must keep being drained) — is finished on a thread of its own (not by a worker:
//! every worker may be waiting for the very instance that call holds).
//!
//! The parts, each knowing only what it needs:
//! - `wire`: generic HTTP/1.1 — request heads, chunked bodies, `100-continue`,
//!   percent-decoding, response heads. No route, no sprout type.
//! - `conn`: one connection's state machine (keep-alive, pipelining, timeouts,
//!   drain): it yields each parsed request head to the router and, with its body,
//!   hands the routed request to the server.
//! - `routes`: the one route table (`docs/openapi.yaml` describes it, a test holds
//!   the two together): HTTP requests to [`Request`](crate::request::Request)s.
//! - `reply`: [`Response`](crate::request::Response)s and
//!   [`Error`](crate::error::Error)s back to HTTP responses, and the HTTP layer's
//!   own refusals in the same JSON shape.
//! - `server`: the event loop, workers, fast calls and drain, over the library's
//!   requests and responses.
//! - `listener`: what the loop accepts connections on (the Unix socket; a TCP
//!   address, plain or TLS).
//! - `tls`: rustls over a non-blocking TCP stream, read and written like a plain one.
//! - `auth`: the TCP listener's keys (basic auth, compared in constant time) and
//!   each route's access rule. The Unix socket is trusted as before.
//!
//! Hostile or careless clients are bounded ([`Limits`]): at most
//! `max_connections` are open on each listener (more are answered 503 and closed at
//! once, so the listener's backlog does not hold them; the network's cannot crowd
//! out the Unix socket's); a request head, then its body, must
//! arrive within `read_timeout` (408), an idle connection is closed after
//! `idle_timeout`; a body or a response that keeps moving is not cut off. A client
//! that closes or resets its connection while its request waits for an instance
//! takes the request with it ([`Abandon`]), also when the hang-up comes with the
//! request's last bytes: it leaves the function's queue and never runs; one already
//! running finishes and its answer is dropped. [`ShutdownHandle::drain`] stops
//! accepting, lets requests being handled finish within a grace, answers the rest
//! 503 (also a request pipelined behind the last response, or only partly read when
//! the server stops) and returns; every response sent while it drains says
//! `Connection: close`.
//!
//! Responses are not copied on their way out: a worker's `reply::Output` keeps its
//! body (for an invoke, the result as the instance returned it, a shared one in its
//! mapping) and the loop writes head and body with one vectored write.
//!
//! On TCP a request's key is checked on its head, before anything else: a missing
//! or wrong key is a 401, a key acting outside its namespace a 403, and neither
//! request's body is read nor anything of the agent touched.

mod auth;
mod conn;
mod error;
/// The HTTP fuzz target's entry point (`agent/fuzz`); not part of the API.
#[doc(hidden)]
pub mod fuzz;
mod limits;
mod listener;
#[cfg(test)]
mod openapi;
mod openwhisk;
mod reply;
mod routes;
mod server;
mod tls;
mod wire;

pub use crate::transport::{Abandon, Abandoned, FastCall, FastPoll, Handle};
pub use auth::{KeyError, KeyScope, Keys, ANY_NAMESPACE, MIN_SECRET};
pub use error::HttpError;
pub use limits::Limits;
pub use reply::{COLD_HEADER, DURATION_HEADER, START_HEADER};
pub use server::{Server, ShutdownHandle, FAST_BUDGET};
pub use tls::server_config as tls_config;
