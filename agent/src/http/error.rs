//! The API server's errors: binding its socket and running its loop.

use std::io;
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
