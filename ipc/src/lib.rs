//! sprout's wire protocol.
//!
//! Every process boundary in sprout (agent ↔ spawner, agent ↔ shim, shim ↔ zygote,
//! agent ↔ function instance) speaks the same framing over a Unix stream socket:
//! a fixed prefix, a JSON header naming the operation, a raw payload (event or
//! result JSON, passed through untouched) and optional file descriptors sent with
//! `SCM_RIGHTS`.
//!
//! The crate has three parts:
//! - **process framing**: [`frame`] (the framing), [`payload`] (inline or sealed-memfd
//!   payloads), [`proto`] (the typed messages, their op names and the named
//!   handshakes built on them) and [`sandbox_paths`]; raw syscalls in `sys`. The
//!   shim links only this part (`default-features = false`).
//! - **the HTTP API's types**: [`api`], the JSON bodies of the agent's HTTP API, so
//!   that a thin client needs nothing but this crate.
//! - **an HTTP client** of that API over its Unix socket: `client`, behind the
//!   `client` feature (default on), with `httparse`.
//!
//! The byte layout is written down in `docs/protocol.md`; the Python runtime
//! (`shim/runtime/python/sprout_runtime/codec.py`) implements the same layout.

pub mod api;
#[cfg(feature = "client")]
pub mod client;
pub mod frame;
pub mod openwhisk;
pub mod payload;
pub mod proto;
pub mod sandbox_paths;
mod sys;

pub use frame::{is_peer_gone, Channel, Error, Message};
pub use payload::Payload;

/// Formats an error and its sources as `a: b: c`, skipping a source whose text the
/// previous message already ends with. The one place sprout prints a cause chain.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let next = e.to_string();
        if !s.ends_with(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        cur = e.source();
    }
    s
}
