//! A small blocking HTTP/1.1 client for the agent's API: on its Unix socket, or on
//! its TCP listener (`http://HOST:PORT`, `https://HOST:PORT` with rustls) with a key
//! sent as HTTP basic auth.
//!
//! It keeps one keep-alive connection and reconnects once when the server closed it
//! between two requests. Bodies are sent with `Content-Length` and read by the
//! response's `Content-Length`; the agent always sends one.

use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use crate::is_peer_gone;

/// Most headers accepted in a response.
const MAX_HEADERS: usize = 64;
/// Largest response head accepted.
const MAX_HEAD: usize = 1 << 20;
const READ_CHUNK: usize = 64 << 10;
/// The CA bundle an `https://` client trusts unless given another (Debian's).
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect to {peer}")]
    Connect {
        peer: String,
        #[source]
        source: io::Error,
    },
    #[error("{url:?} is not an API address: {reason}")]
    Url { url: String, reason: String },
    #[error("the key is not UUID:KEY")]
    Key,
    #[error("the CA certificates {path}: {reason}")]
    Ca { path: PathBuf, reason: String },
    #[error("invalid request line {method:?} {target:?}")]
    InvalidRequest { method: String, target: String },
    #[error("send request to {peer}")]
    Send {
        peer: String,
        #[source]
        source: io::Error,
    },
    #[error("read response from {peer}")]
    Receive {
        peer: String,
        #[source]
        source: io::Error,
    },
    #[error("{peer} closed the connection before the response was complete")]
    Closed { peer: String },
    #[error("malformed response from {peer}")]
    Malformed {
        peer: String,
        #[source]
        source: httparse::Error,
    },
    #[error("response head from {peer} exceeds {max} bytes")]
    HeadTooLarge { peer: String, max: usize },
    #[error("response from {peer} has an invalid Content-Length {value:?}")]
    ContentLength { peer: String, value: String },
}

/// A response: status, headers in arrival order, and the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl ClientResponse {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Where the agent's API is.
#[derive(Clone)]
enum Endpoint {
    Unix(PathBuf),
    /// `host:port`, and TLS settings for `https`.
    Tcp {
        host: String,
        port: u16,
        tls: Option<Arc<ClientConfig>>,
    },
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "{}", path.display()),
            Endpoint::Tcp { host, port, tls } => {
                let scheme = if tls.is_some() { "https" } else { "http" };
                write!(f, "{scheme}://{host}:{port}")
            }
        }
    }
}

/// An open connection.
enum Transport {
    Unix(UnixStream),
    Tcp(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Unix(s) => s.read(buf),
            Transport::Tcp(s) => s.read(buf),
            // A server that closes without close_notify has ended the stream: every
            // response is framed by its Content-Length, which says if it was cut.
            Transport::Tls(s) => match s.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
                other => other,
            },
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Unix(s) => s.write(buf),
            Transport::Tcp(s) => s.write(buf),
            Transport::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Transport::Unix(s) => s.flush(),
            Transport::Tcp(s) => s.flush(),
            Transport::Tls(s) => s.flush(),
        }
    }
}

/// How to reach a TCP listener: the key and the CA certificates to trust.
#[derive(Debug, Clone, Default)]
pub struct TcpOptions {
    /// `UUID:KEY`, sent as HTTP basic auth; `None` for a listener without keys.
    pub key: Option<String>,
    /// PEM CA certificates an `https://` server's certificate must chain to
    /// (default: [`SYSTEM_CA_BUNDLE`]).
    pub ca_cert: Option<PathBuf>,
}

/// One keep-alive connection to the agent's API.
pub struct Client {
    endpoint: Endpoint,
    /// `Basic ...`, sent with every request.
    authorization: Option<String>,
    /// The endpoint as errors name it.
    peer: String,
    stream: Option<Transport>,
    /// Whether `stream` has carried a response: only such a connection can have been
    /// closed by the server between requests, so only then is a request sent again.
    carried_response: bool,
    /// Bytes read past the previous response (none, unless the server misbehaves).
    buf: Vec<u8>,
}

impl fmt::Debug for Client {
    /// Never shows the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("peer", &self.peer)
            .field("key", &self.authorization.is_some())
            .finish()
    }
}

/// Why one attempt failed: `Retry` means the server closed a reused connection
/// before answering, so the request can be sent again on a fresh one.
enum Attempt {
    Retry,
    Fail(ClientError),
}

impl Client {
    /// Connects to the agent's Unix socket.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        Client::open(Endpoint::Unix(path.to_owned()), None)
    }

    /// `POST` an event to function `name` of `namespace` without waiting for it
    /// (`?blocking=false`): `202 {"activationId": ...}` once it is accepted.
    pub fn invoke_async(
        &mut self,
        namespace: &str,
        name: &str,
        event: &[u8],
    ) -> Result<ClientResponse, ClientError> {
        let path = crate::api::function_path(namespace, name, "/invoke?blocking=false");
        self.request("POST", &path, Some("application/json"), event)
    }

    /// `GET /activations/{id}{rest}`: `rest` is `""` (the record), `"/result"` or
    /// `"/logs"`. `id` is sent as given (the agent refuses one that is not an id).
    pub fn activation(&mut self, id: &str, rest: &str) -> Result<ClientResponse, ClientError> {
        let id = percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC);
        self.request("GET", &format!("/activations/{id}{rest}"), None, b"")
    }

    /// `GET /activations` with `query` (`name`, `namespace`, `since`, `limit`, `skip`
    /// pairs; values are encoded here).
    pub fn activations(&mut self, query: &[(&str, String)]) -> Result<ClientResponse, ClientError> {
        let mut path = "/activations".to_owned();
        for (i, (key, value)) in query.iter().enumerate() {
            let value =
                percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC);
            path.push(if i == 0 { '?' } else { '&' });
            path.push_str(&format!("{key}={value}"));
        }
        self.request("GET", &path, None, b"")
    }

    /// Connects to the agent's TCP listener at `url`: `http://HOST:PORT` or
    /// `https://HOST:PORT` (a path of `/` at most; HOST a name, an IPv4 address or
    /// `[IPv6]`).
    pub fn connect_url(url: &str, options: &TcpOptions) -> Result<Client, ClientError> {
        let bad = |reason: &str| ClientError::Url {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let (tls, rest) = if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else {
            return Err(bad("use http://HOST:PORT or https://HOST:PORT"));
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#', '@']) || authority.is_empty() {
            return Err(bad(
                "give only the scheme, host and port (no path, query or user)",
            ));
        }
        let (host, port) = authority
            .rsplit_once(':')
            .filter(|(h, _)| !h.is_empty() && (!h.contains(':') || h.starts_with('[')))
            .ok_or_else(|| bad("give the port: HOST:PORT"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| bad("the port is not a number from 1 to 65535"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let tls = if tls {
            let ca = options
                .ca_cert
                .clone()
                .unwrap_or_else(|| PathBuf::from(SYSTEM_CA_BUNDLE));
            Some(client_config(&ca)?)
        } else {
            None
        };
        let authorization = match &options.key {
            Some(key) => {
                let (uuid, secret) = key.split_once(':').ok_or(ClientError::Key)?;
                if uuid.is_empty() || secret.is_empty() || key.chars().any(|c| c.is_control()) {
                    return Err(ClientError::Key);
                }
                Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(key)
                ))
            }
            None => None,
        };
        Client::open(Endpoint::Tcp { host, port, tls }, authorization)
    }

    fn open(endpoint: Endpoint, authorization: Option<String>) -> Result<Client, ClientError> {
        let mut client = Client {
            peer: endpoint.to_string(),
            endpoint,
            authorization,
            stream: None,
            carried_response: false,
            buf: Vec::new(),
        };
        client.reconnect()?;
        Ok(client)
    }

    /// The API's address, as errors name it: the socket's path, or the URL.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Sends one request and reads its response.
    pub fn request(
        &mut self,
        method: &str,
        path_and_query: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<ClientResponse, ClientError> {
        let valid_method = !method.is_empty()
            && method
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.!#$%&'*+^`|~".contains(&b));
        let valid_target =
            path_and_query.starts_with('/') && path_and_query.bytes().all(|b| b.is_ascii_graphic());
        let valid_type = content_type.is_none_or(|t| {
            t.bytes()
                .all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic())
        });
        if !valid_method || !valid_target || !valid_type {
            return Err(ClientError::InvalidRequest {
                method: method.to_owned(),
                target: path_and_query.to_owned(),
            });
        }
        let host = match &self.endpoint {
            Endpoint::Unix(_) => "sprout".to_owned(),
            Endpoint::Tcp { host, port, .. } if host.contains(':') => format!("[{host}]:{port}"),
            Endpoint::Tcp { host, port, .. } => format!("{host}:{port}"),
        };
        let mut head = format!(
            "{method} {path_and_query} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(auth) = &self.authorization {
            head.push_str("Authorization: ");
            head.push_str(auth);
            head.push_str("\r\n");
        }
        if let Some(t) = content_type {
            head.push_str("Content-Type: ");
            head.push_str(t);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");

        // A connection that has carried a response may have been closed by the server
        // since; a fresh one has not, so only a reused connection is retried.
        let reused = self.stream.is_some() && self.carried_response;
        match self.attempt(head.as_bytes(), body) {
            Ok(resp) => Ok(resp),
            Err(Attempt::Fail(e)) => Err(e),
            Err(Attempt::Retry) if reused => {
                self.reconnect()?;
                match self.attempt(head.as_bytes(), body) {
                    Ok(resp) => Ok(resp),
                    Err(Attempt::Fail(e)) => Err(e),
                    Err(Attempt::Retry) => Err(ClientError::Closed {
                        peer: self.peer.clone(),
                    }),
                }
            }
            Err(Attempt::Retry) => Err(ClientError::Closed {
                peer: self.peer.clone(),
            }),
        }
    }

    fn reconnect(&mut self) -> Result<(), ClientError> {
        self.stream = None;
        self.carried_response = false;
        self.buf.clear();
        let connect = |source| ClientError::Connect {
            peer: self.peer.clone(),
            source,
        };
        let stream = match &self.endpoint {
            Endpoint::Unix(path) => Transport::Unix(UnixStream::connect(path).map_err(connect)?),
            Endpoint::Tcp { host, port, tls } => {
                let tcp = TcpStream::connect((host.as_str(), *port)).map_err(connect)?;
                // Requests go out in two writes (head, body): no waiting between them.
                tcp.set_nodelay(true).map_err(connect)?;
                match tls {
                    None => Transport::Tcp(tcp),
                    Some(config) => {
                        let name = ServerName::try_from(host.clone())
                            .map_err(|e| connect(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
                        let conn = ClientConnection::new(Arc::clone(config), name)
                            .map_err(|e| connect(io::Error::other(e)))?;
                        Transport::Tls(Box::new(StreamOwned::new(conn, tcp)))
                    }
                }
            }
        };
        self.stream = Some(stream);
        Ok(())
    }

    fn attempt(&mut self, head: &[u8], body: &[u8]) -> Result<ClientResponse, Attempt> {
        if self.stream.is_none() {
            self.reconnect().map_err(Attempt::Fail)?;
        }
        let result = self.exchange(head, body);
        self.carried_response = result.is_ok();
        if result.is_err() {
            // Whatever state the connection is in, it cannot carry another request.
            self.stream = None;
            self.buf.clear();
        }
        result
    }

    fn exchange(&mut self, head: &[u8], body: &[u8]) -> Result<ClientResponse, Attempt> {
        let peer = self.peer.clone();
        let Some(stream) = self.stream.as_mut() else {
            return Err(Attempt::Fail(ClientError::Closed { peer }));
        };
        if let Err(e) = stream.write_all(head).and_then(|()| stream.write_all(body)) {
            return Err(if is_peer_gone(&e) && self.buf.is_empty() {
                Attempt::Retry
            } else {
                Attempt::Fail(ClientError::Send { peer, source: e })
            });
        }

        let mut received_any = !self.buf.is_empty();
        loop {
            // Parse a head; skip interim (1xx) responses such as `100 Continue`.
            let parsed = {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut resp = httparse::Response::new(&mut headers);
                match resp.parse(&self.buf) {
                    Ok(httparse::Status::Complete(len)) => {
                        let status = resp.code.unwrap_or_default();
                        let headers: Vec<(String, String)> = resp
                            .headers
                            .iter()
                            .map(|h| {
                                (
                                    h.name.to_owned(),
                                    String::from_utf8_lossy(h.value).trim().to_owned(),
                                )
                            })
                            .collect();
                        Some((len, status, headers, resp.version == Some(0)))
                    }
                    Ok(httparse::Status::Partial) => None,
                    Err(source) => {
                        return Err(Attempt::Fail(ClientError::Malformed { peer, source }))
                    }
                }
            };
            let Some((head_len, status, headers, http10)) = parsed else {
                if self.buf.len() > MAX_HEAD {
                    return Err(Attempt::Fail(ClientError::HeadTooLarge {
                        peer,
                        max: MAX_HEAD,
                    }));
                }
                match read_more(stream, &mut self.buf) {
                    Ok(0) if !received_any => return Err(Attempt::Retry),
                    Ok(0) => return Err(Attempt::Fail(ClientError::Closed { peer })),
                    Ok(_) => received_any = true,
                    Err(e) if is_peer_gone(&e) && !received_any => return Err(Attempt::Retry),
                    Err(source) => {
                        return Err(Attempt::Fail(ClientError::Receive { peer, source }))
                    }
                }
                continue;
            };
            self.buf.drain(..head_len);
            if (100..200).contains(&status) && status != 101 {
                continue;
            }

            let mut response = ClientResponse {
                status,
                headers,
                body: Vec::new(),
            };
            let close = match response.header("connection") {
                Some(v) => {
                    v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close"))
                        || (http10
                            && !v
                                .split(',')
                                .any(|t| t.trim().eq_ignore_ascii_case("keep-alive")))
                }
                None => http10,
            };
            match response.header("content-length") {
                Some(value) => {
                    let len: usize = value.parse().map_err(|_| {
                        Attempt::Fail(ClientError::ContentLength {
                            peer: peer.clone(),
                            value: value.to_owned(),
                        })
                    })?;
                    while self.buf.len() < len {
                        match read_more(stream, &mut self.buf) {
                            Ok(0) => return Err(Attempt::Fail(ClientError::Closed { peer })),
                            Ok(_) => {}
                            Err(source) => {
                                return Err(Attempt::Fail(ClientError::Receive { peer, source }))
                            }
                        }
                    }
                    response.body = self.buf.drain(..len).collect();
                    if close {
                        self.stream = None;
                        self.buf.clear();
                    }
                }
                None => {
                    // No length: the body runs to the end of the connection.
                    loop {
                        match read_more(stream, &mut self.buf) {
                            Ok(0) => break,
                            Ok(_) => {}
                            Err(source) => {
                                return Err(Attempt::Fail(ClientError::Receive { peer, source }))
                            }
                        }
                    }
                    response.body = std::mem::take(&mut self.buf);
                    self.stream = None;
                }
            }
            return Ok(response);
        }
    }
}

/// The TLS settings of a client that trusts the PEM CA certificates in `ca`.
fn client_config(ca: &Path) -> Result<Arc<ClientConfig>, ClientError> {
    let bad = |reason: String| ClientError::Ca {
        path: ca.to_owned(),
        reason,
    };
    let pem = fs::read(ca).map_err(|e| bad(e.to_string()))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(format!("not PEM certificates: {e}")))?;
        // A bundle may hold certificates this library cannot use; the rest still count.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(bad("holds no usable CA certificate".to_owned()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Appends what one `read` returns to `buf`, retrying on `EINTR`.
fn read_more(stream: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<usize> {
    let start = buf.len();
    buf.resize(start + READ_CHUNK, 0);
    let result = loop {
        match stream.read(&mut buf[start..]) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => break other,
        }
    };
    buf.truncate(start + *result.as_ref().unwrap_or(&0));
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::thread;

    /// Reads one request (head + Content-Length body) from `s`, returning the head text and body.
    fn read_request(s: &mut UnixStream, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8(buf[..end + 4].to_vec()).unwrap();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .map(|v| v.trim().parse::<usize>().unwrap())
                    .unwrap_or(0);
                while buf.len() < end + 4 + len {
                    if read_more(s, buf).unwrap() == 0 {
                        return None;
                    }
                }
                let body = buf[end + 4..end + 4 + len].to_vec();
                buf.drain(..end + 4 + len);
                return Some((head, body));
            }
            if read_more(s, buf).unwrap() == 0 {
                return None;
            }
        }
    }

    #[test]
    fn sends_host_and_length_and_reads_by_length() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = Vec::new();
            let mut heads = Vec::new();
            while let Some((head, body)) = read_request(&mut s, &mut buf) {
                heads.push((head, body.clone()));
                s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").unwrap();
                let reply = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Echo: yes\r\nContent-Length: {}\r\n\r\n", body.len());
                s.write_all(reply.as_bytes()).unwrap();
                s.write_all(&body).unwrap();
            }
            heads
        });
        let mut c = Client::connect(&sock).unwrap();
        let r = c
            .request(
                "POST",
                "/run/f?logs=true",
                Some("application/json"),
                b"{\"a\":1}",
            )
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"{\"a\":1}");
        assert_eq!(r.header("x-echo"), Some("yes"));
        assert_eq!(r.header("Content-Type"), Some("application/json"));
        let r = c.request("GET", "/status", None, b"").unwrap();
        assert_eq!(r.status, 200);
        assert!(r.body.is_empty());
        drop(c);
        let heads = server.join().unwrap();
        assert_eq!(heads.len(), 2, "both requests on one connection");
        assert!(heads[0].0.starts_with("POST /run/f?logs=true HTTP/1.1\r\n"));
        assert!(heads[0].0.contains("Host: sprout\r\n"));
        assert!(heads[0].0.contains("Content-Length: 7\r\n"));
        assert!(heads[0].0.contains("Content-Type: application/json\r\n"));
        assert!(heads[1].0.contains("Content-Length: 0\r\n"));
        assert!(!heads[1].0.contains("Content-Type"));
    }

    #[test]
    fn reconnects_once_when_the_server_closed_an_idle_connection() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = thread::spawn(move || {
            // Each connection answers one request and closes without saying so.
            for i in 0..2 {
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = Vec::new();
                read_request(&mut s, &mut buf).unwrap();
                let body = format!("{i}");
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                s.write_all(reply.as_bytes()).unwrap();
            }
        });
        let mut c = Client::connect(&sock).unwrap();
        assert_eq!(c.request("GET", "/status", None, b"").unwrap().body, b"0");
        // Give the server time to close the first connection.
        thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(c.request("GET", "/status", None, b"").unwrap().body, b"1");
        server.join().unwrap();
    }

    #[test]
    fn a_request_on_a_fresh_connection_is_never_sent_twice() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        listener.set_nonblocking(true).unwrap();
        let mut c = Client::connect(&sock).unwrap();
        // The server reads the request (it may have run it) and closes without an
        // answer: the client must report that, not send the invoke again.
        let server = thread::spawn(move || {
            let (mut s, _) = loop {
                match listener.accept() {
                    Ok(conn) => break conn,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(std::time::Duration::from_millis(5))
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            };
            s.set_nonblocking(false).unwrap();
            let mut buf = Vec::new();
            read_request(&mut s, &mut buf).unwrap();
            drop(s);
            thread::sleep(std::time::Duration::from_millis(200));
            let mut again = 0;
            while listener.accept().is_ok() {
                again += 1;
            }
            again
        });
        let err = c.request("POST", "/invoke/f", None, b"{}").unwrap_err();
        assert!(matches!(err, ClientError::Closed { .. }), "{err}");
        assert_eq!(server.join().unwrap(), 0, "the request was sent again");
    }

    #[test]
    fn connection_close_is_honoured() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = thread::spawn(move || {
            for _ in 0..2 {
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = Vec::new();
                read_request(&mut s, &mut buf).unwrap();
                s.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}")
                    .unwrap();
                // Keep the connection open: the client must not wait for or reuse it.
                thread::sleep(std::time::Duration::from_millis(100));
            }
        });
        let mut c = Client::connect(&sock).unwrap();
        assert_eq!(c.request("GET", "/a", None, b"").unwrap().body, b"{}");
        assert_eq!(c.request("GET", "/b", None, b"").unwrap().body, b"{}");
        server.join().unwrap();
    }

    #[test]
    fn errors_name_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("missing.sock");
        let err = Client::connect(&sock).unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }));
        assert!(err.to_string().contains("missing.sock"), "{err}");

        let listener = UnixListener::bind(dir.path().join("bad.sock")).unwrap();
        let server = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = Vec::new();
            read_request(&mut s, &mut buf).unwrap();
            s.write_all(b"NOT HTTP\r\n\r\n").unwrap();
        });
        let mut c = Client::connect(&dir.path().join("bad.sock")).unwrap();
        let err = c.request("GET", "/", None, b"").unwrap_err();
        assert!(matches!(err, ClientError::Malformed { .. }), "{err:?}");
        assert!(err.to_string().contains("bad.sock"), "{err}");
        server.join().unwrap();

        let err = c.request("GET", "/a b", None, b"").unwrap_err();
        assert!(matches!(err, ClientError::InvalidRequest { .. }), "{err:?}");
    }

    #[test]
    fn truncated_body_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = Vec::new();
            read_request(&mut s, &mut buf).unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}")
                .unwrap();
        });
        let mut c = Client::connect(&sock).unwrap();
        let err = c.request("GET", "/", None, b"").unwrap_err();
        server.join().unwrap();
        assert!(matches!(err, ClientError::Closed { .. }), "{err:?}");
    }

    #[test]
    fn urls_are_checked_and_a_key_goes_as_basic_auth() {
        for (url, words) in [
            ("127.0.0.1:80", "http://HOST:PORT"),
            ("ftp://h:1", "http://HOST:PORT"),
            ("http://h", "give the port"),
            ("http://h:0", "1 to 65535"),
            ("http://h:99999", "1 to 65535"),
            ("http://h:80/api", "no path"),
            ("http://u@h:80", "no path"),
            ("http://::1:80", "give the port"),
            ("https://h:1", "CA certificates"),
        ] {
            let options = TcpOptions {
                key: None,
                ca_cert: Some(PathBuf::from("/nonexistent/ca.pem")),
            };
            let e = Client::connect_url(url, &options).unwrap_err();
            assert!(e.to_string().contains(words), "{url}: {e}");
        }
        let e = Client::connect_url(
            "http://127.0.0.1:9",
            &TcpOptions {
                key: Some("nocolon".into()),
                ca_cert: None,
            },
        )
        .unwrap_err();
        assert!(matches!(e, ClientError::Key), "{e:?}");

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = Vec::new();
            let mut head = String::new();
            while !head.contains("\r\n\r\n") {
                read_more(&mut s, &mut buf).unwrap();
                head = String::from_utf8_lossy(&buf).into_owned();
            }
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                .unwrap();
            head
        });
        let mut c = Client::connect_url(
            &format!("http://{addr}/"),
            &TcpOptions {
                key: Some("u-1:secret".into()),
                ca_cert: None,
            },
        )
        .unwrap();
        assert_eq!(c.peer(), format!("http://{addr}"));
        assert!(!format!("{c:?}").contains("secret"));
        assert_eq!(c.request("GET", "/stats", None, b"").unwrap().body, b"{}");
        let head = server.join().unwrap();
        // base64("u-1:secret")
        assert!(
            head.contains("\r\nAuthorization: Basic dS0xOnNlY3JldA==\r\n"),
            "{head}"
        );
        assert!(head.contains(&format!("\r\nHost: {addr}\r\n")), "{head}");
    }
}
