//! What the server accepts connections on: a Unix socket today, TCP next (issue 14).
//! The event loop and the connections see only [`Listener`] and [`Stream`]; a new
//! transport is a variant of each.
//!
//! Binding a Unix socket refuses one an agent still serves and removes one left by an
//! agent that died; the socket file is removed again when the server ends
//! ([`SocketFile`]).

use std::fs;
use std::io::{self, IoSlice, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use mio::event::Source;
use mio::net::{UnixListener, UnixStream};
use mio::{Interest, Registry, Token};
use tracing::{info, warn};

use super::error::HttpError;

/// A bound listening socket.
#[derive(Debug)]
pub(super) enum Listener {
    Unix(UnixListener),
}

/// An accepted connection.
#[derive(Debug)]
pub(super) enum Stream {
    Unix(UnixStream),
}

impl Listener {
    /// Binds a Unix socket at `path`. An existing socket there is refused if something
    /// accepts connections on it, and removed if not (left by an agent that died).
    pub fn bind_unix(path: &Path) -> Result<(Listener, SocketFile), HttpError> {
        remove_stale(path)?;
        let listener = UnixListener::bind(path).map_err(|source| HttpError::Bind {
            path: path.to_owned(),
            source,
        })?;
        Ok((Listener::Unix(listener), SocketFile::new(path)))
    }

    /// The next pending connection.
    pub fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
        }
    }
}

fn remove_stale(path: &Path) -> Result<(), HttpError> {
    let probe = |source| HttpError::Probe {
        path: path.to_owned(),
        source,
    };
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => Err(HttpError::InUse {
                    path: path.to_owned(),
                }),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    info!(socket = %path.display(), "removing stale socket");
                    match fs::remove_file(path) {
                        Ok(()) => Ok(()),
                        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                        Err(source) => Err(HttpError::RemoveStale {
                            path: path.to_owned(),
                            source,
                        }),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(probe(source)),
            }
        }
        Ok(_) => Err(HttpError::NotASocket {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(probe(source)),
    }
}

impl Source for Listener {
    fn register(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        match self {
            Listener::Unix(l) => l.register(registry, token, interests),
        }
    }

    fn reregister(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        match self {
            Listener::Unix(l) => l.reregister(registry, token, interests),
        }
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        match self {
            Listener::Unix(l) => l.deregister(registry),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
        }
    }
}

impl Source for Stream {
    fn register(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.register(registry, token, interests),
        }
    }

    fn reregister(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.reregister(registry, token, interests),
        }
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.deregister(registry),
        }
    }
}

/// The bound socket's file, removed on drop if it is still the one we bound.
#[derive(Debug)]
pub(super) struct SocketFile {
    pub path: PathBuf,
    /// Device and inode of the socket file.
    id: Option<(u64, u64)>,
}

impl SocketFile {
    fn new(path: &Path) -> SocketFile {
        let id = fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()));
        SocketFile {
            path: path.to_owned(),
            id,
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let current = fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if current.is_some() && current == self.id {
            if let Err(e) = fs::remove_file(&self.path) {
                warn!(socket = %self.path.display(), error = %e, "could not remove socket");
            }
        }
    }
}
