//! TLS on the TCP listener: a rustls [`ServerConnection`] over a non-blocking TCP
//! stream, read and written like the plain stream by the connection's state machine.
//!
//! Reading takes what plaintext rustls holds, else reads TLS records from the socket
//! (`read_tls`), processes them (`process_new_packets`) and writes what the
//! handshake answers; `WouldBlock` when the socket has nothing more. Writing hands
//! plaintext to rustls, which encrypts it into its own bounded buffer, and writes
//! that buffer to the socket; bytes rustls still holds are [`TlsStream::pending`]
//! and the connection keeps writing until they are out. Nothing blocks: a client
//! that is slow or sends garbage costs the event loop nothing more than a plain one
//! (a broken record ends its connection at once, with an alert).
//!
//! A client that speaks plain HTTP to the TLS port (its first byte is a letter, where
//! a TLS record starts with 22) is answered a plain `400` that says so, and closed.

use std::fs;
use std::io::{self, IoSlice, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use mio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection};

use super::error::HttpError;
use super::reply::Reject;
use super::wire::Persist;

/// The server's TLS settings from a PEM certificate chain and a PEM private key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, HttpError> {
    let tls = |path: &Path, reason: String| HttpError::Tls {
        path: path.to_owned(),
        reason,
    };
    let cert_pem = fs::read(cert).map_err(|e| tls(cert, e.to_string()))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls(cert, format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(tls(cert, "holds no PEM certificate".to_owned()));
    }
    // The private key, like the key file, must not be open to other users.
    let mode = fs::metadata(key)
        .map_err(|e| tls(key, e.to_string()))?
        .permissions()
        .mode();
    if mode & 0o007 != 0 {
        return Err(tls(
            key,
            format!(
                "is readable or writable by others (mode {:o}): chmod 600 it",
                mode & 0o7777
            ),
        ));
    }
    let key_pem = fs::read(key).map_err(|e| tls(key, e.to_string()))?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| tls(key, format!("not a PEM private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| tls(key, format!("does not go with the certificate: {e}")))?;
    Ok(Arc::new(config))
}

/// A TLS connection over an accepted TCP stream.
pub(super) struct TlsStream {
    tcp: TcpStream,
    tls: ServerConnection,
    /// The first byte the client sent, once it did: a letter means plain HTTP.
    first: Option<u8>,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("tcp", &self.tcp)
            .field("handshaking", &self.tls.is_handshaking())
            .finish()
    }
}

/// The socket, noting the first byte read from it.
struct Noting<'a> {
    tcp: &'a mut TcpStream,
    first: &'a mut Option<u8>,
}

impl Read for Noting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.tcp.read(buf)?;
        if n > 0 && self.first.is_none() {
            *self.first = Some(buf[0]);
        }
        Ok(n)
    }
}

impl TlsStream {
    pub fn new(tcp: TcpStream, config: Arc<ServerConfig>) -> Result<TlsStream, rustls::Error> {
        Ok(TlsStream {
            tcp,
            tls: ServerConnection::new(config)?,
            first: None,
        })
    }

    pub fn tcp(&mut self) -> &mut TcpStream {
        &mut self.tcp
    }

    /// Whether the handshake has not finished.
    pub fn is_handshaking(&self) -> bool {
        self.tls.is_handshaking()
    }

    /// Whether encrypted bytes wait to be written to the socket.
    pub fn pending(&self) -> bool {
        self.tls.wants_write()
    }

    /// Writes what rustls holds for the socket; `WouldBlock` if the socket takes
    /// no more before it is all out.
    fn write_out(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.tcp) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Says `close_notify` and writes what the socket takes now.
    pub fn close_notify(&mut self) {
        self.tls.send_close_notify();
        let _ = self.write_out();
    }

    /// A client that broke the protocol: a plain `400` if it spoke plain HTTP, else
    /// the alert rustls made.
    fn refuse(&mut self, error: rustls::Error) -> io::Error {
        if self.first.is_some_and(|b| b.is_ascii_alphabetic()) {
            let reply = Reject {
                close: true,
                ..Reject::bad_request(
                    "this port speaks TLS (HTTPS): send the request over TLS (https://)",
                )
            }
            .reply()
            .encode(Persist::Close);
            // One write into an empty socket buffer: the client may read it.
            let _ = self.tcp.write(&reply);
        } else {
            let _ = self.write_out();
        }
        io::Error::new(io::ErrorKind::InvalidData, error)
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.tls.reader().read(buf) {
                // Plaintext, or 0 after the client's close_notify.
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The socket ended without close_notify, among others.
                Err(e) => return Err(e),
            }
            let mut socket = Noting {
                tcp: &mut self.tcp,
                first: &mut self.first,
            };
            match self.tls.read_tls(&mut socket) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if let Err(e) = self.tls.process_new_packets() {
                return Err(self.refuse(e));
            }
            // The handshake's answers; the rest goes out when the socket takes it.
            match self.write_out() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if bufs.iter().all(|b| b.is_empty()) {
            return Ok(0);
        }
        // Room in rustls' buffer first: what it holds goes out before more is taken.
        self.write_out()?;
        let taken = self.tls.writer().write_vectored(bufs)?;
        match self.write_out() {
            Ok(()) => {}
            // Taken bytes are rustls' to write: `pending` keeps the connection writing.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && taken > 0 => {}
            Err(e) => return Err(e),
        }
        if taken == 0 {
            // Only before the handshake ends: the response waits for it.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.write_out()
    }
}
