//! The API server's errors: binding its socket and running its loop.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("another agent serves on {path}")]
    InUse { path: PathBuf },
    #[error("{path} exists and is not a socket")]
    NotASocket { path: PathBuf },
    #[error("check for a server on {path}")]
    Probe {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("remove stale socket {path}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("bind {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("listen on {addr}")]
    BindTcp {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("serving {addr} without keys is allowed only on a loopback address (127.0.0.0/8, ::1): give keys (--auth FILE)")]
    OpenNotLoopback { addr: SocketAddr },
    #[error("TLS: {path}: {reason}")]
    Tls { path: PathBuf, reason: String },
    #[error("listen on {addr}: set up the event loop")]
    RegisterTcp {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("set up the event loop for {path}")]
    EventLoop {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("wait for events on {path}")]
    Poll {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("start HTTP worker thread {index}")]
    Worker {
        index: usize,
        #[source]
        source: io::Error,
    },
}
