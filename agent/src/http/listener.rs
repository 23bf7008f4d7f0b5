//! What the server accepts connections on: its Unix socket, and a TCP address
//! (`--listen`), plain or with TLS. The event loop and the connections see only
//! [`Listener`] and [`Stream`]; a transport is a variant of each.
//!
//! Binding a Unix socket refuses one an agent still serves and removes one left by an
//! agent that died; the socket file is removed again when the server ends
//! ([`SocketFile`]). Accepted TCP connections have `TCP_NODELAY` (a response goes out
//! in one vectored write, and waiting for an ACK would add to every warm call).

use std::fs;
use std::io::{self, IoSlice, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use mio::event::Source;
use std::net::SocketAddr;
use std::sync::Arc;

use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Interest, Registry, Token};
use rustls::ServerConfig;
use tracing::{info, warn};

use super::error::HttpError;
use super::tls::TlsStream;

/// A bound listening socket.
#[derive(Debug)]
pub(super) enum Listener {
    Unix(UnixListener),
    /// With the TLS settings of its connections, if it has TLS.
    Tcp(TcpListener, Option<Arc<ServerConfig>>),
}

/// An accepted connection.
#[derive(Debug)]
pub(super) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
    Tls(Box<TlsStream>),
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

    /// Binds a TCP address (port 0: any free port; [`Listener::local_addr`] tells).
    pub fn bind_tcp(
        addr: SocketAddr,
        tls: Option<Arc<ServerConfig>>,
    ) -> Result<Listener, HttpError> {
        let listener =
            TcpListener::bind(addr).map_err(|source| HttpError::BindTcp { addr, source })?;
        Ok(Listener::Tcp(listener, tls))
    }

    /// The bound address of a TCP listener.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Unix(_) => None,
            Listener::Tcp(l, _) => l.local_addr().ok(),
        }
    }

    /// The next pending connection. A TCP connection whose TLS state cannot be made
    /// is closed and the next one taken.
    pub fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l, tls) => loop {
                let (s, peer) = l.accept()?;
                if let Err(e) = s.set_nodelay(true) {
                    warn!(%peer, error = %e, "could not set TCP_NODELAY");
                }
                let Some(config) = tls else {
                    return Ok(Stream::Tcp(s));
                };
                match TlsStream::new(s, Arc::clone(config)) {
                    Ok(t) => return Ok(Stream::Tls(Box::new(t))),
                    Err(e) => warn!(%peer, error = %e, "could not start TLS on a connection"),
                }
            },
        }
    }
}

impl Stream {
    /// Whether the stream holds output of its own still to write (TLS records).
    pub fn pending(&self) -> bool {
        match self {
            Stream::Tls(t) => t.pending(),
            Stream::Unix(_) | Stream::Tcp(_) => false,
        }
    }

    /// Whether a TLS handshake is still under way: nothing can be answered yet.
    pub fn is_handshaking(&self) -> bool {
        match self {
            Stream::Tls(t) => t.is_handshaking(),
            Stream::Unix(_) | Stream::Tcp(_) => false,
        }
    }

    /// Ends what the server sends, as its protocol does (TLS: `close_notify`).
    pub fn close_notify(&mut self) {
        if let Stream::Tls(t) = self {
            t.close_notify();
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
            Listener::Tcp(l, _) => l.register(registry, token, interests),
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
            Listener::Tcp(l, _) => l.reregister(registry, token, interests),
        }
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        match self {
            Listener::Unix(l) => l.deregister(registry),
            Listener::Tcp(l, _) => l.deregister(registry),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Tls(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
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
            Stream::Tcp(s) => s.register(registry, token, interests),
            Stream::Tls(s) => s.tcp().register(registry, token, interests),
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
            Stream::Tcp(s) => s.reregister(registry, token, interests),
            Stream::Tls(s) => s.tcp().reregister(registry, token, interests),
        }
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.deregister(registry),
            Stream::Tcp(s) => s.deregister(registry),
            Stream::Tls(s) => s.tcp().deregister(registry),
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
