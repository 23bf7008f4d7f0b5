//! One client connection: reads and parses requests, hands complete ones to the
//! workers, writes the responses. A connection carries one request at a time: a
//! pipelined request stays in the read buffer until the previous response is written.

use std::io::{self, Read, Write};

use mio::net::UnixStream;
use mio::Token;
use tracing::{debug, debug_span, Span};

use super::routes::{self, Persist, Reject, Reply, Route};
use super::{Job, Limits};

/// Most headers accepted in a request head.
pub(super) const MAX_HEADERS: usize = 64;
const READ_CHUNK: usize = 64 << 10;
/// Longest chunk-size line accepted (size, extensions and CRLF).
const MAX_CHUNK_LINE: usize = 4096;
/// Buffers larger than this are released once a request is done with them.
const KEEP_CAPACITY: usize = 1 << 20;

/// Whether the connection is still open after [`Conn::drive`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Life {
    Open,
    Closed,
}

pub(super) struct Conn {
    stream: UnixStream,
    token: Token,
    /// Bytes read and not yet consumed.
    rbuf: Vec<u8>,
    /// Bytes to write; `wbuf[..wpos]` is already written.
    wbuf: Vec<u8>,
    wpos: usize,
    state: State,
    /// Close once `wbuf` is written (set with the final response).
    close_after_write: bool,
}

enum State {
    /// Waiting for a request head.
    Head,
    /// Reading a request's body.
    Body(Box<Pending>),
    /// The request is with a worker.
    Waiting,
    /// The response is in `wbuf`; then back to `Head`, or closed.
    Writing,
}

/// A request whose head has been read.
struct Pending {
    persist: Persist,
    span: Span,
    /// The route, or the error to answer once the body has been read.
    route: Result<Route, Reject>,
    body: Body,
}

enum Body {
    Length(usize),
    Chunked(Chunked),
}

enum Step {
    /// The state changed: look again.
    Again,
    /// Nothing more can happen without more input.
    NeedInput,
}

impl Conn {
    pub fn new(stream: UnixStream, token: Token) -> Conn {
        Conn {
            stream,
            token,
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            wpos: 0,
            state: State::Head,
            close_after_write: false,
        }
    }

    pub fn stream(&mut self) -> &mut UnixStream {
        &mut self.stream
    }

    /// Makes all the progress possible without blocking: writes pending output,
    /// reads, parses, and hands complete requests to `submit` (which returns false
    /// when no worker can take them).
    pub fn drive(&mut self, limits: &Limits, submit: &mut dyn FnMut(Job) -> bool) -> Life {
        loop {
            if self.wpos < self.wbuf.len() {
                match self.flush() {
                    Ok(true) => {}
                    Ok(false) => return Life::Open,
                    Err(e) => {
                        debug!(error = %e, "write to client failed");
                        return Life::Closed;
                    }
                }
            }
            match self.state {
                State::Waiting => return Life::Open,
                State::Writing if self.close_after_write => return Life::Closed,
                State::Writing => {
                    self.state = State::Head;
                    if self.rbuf.is_empty() && self.rbuf.capacity() > KEEP_CAPACITY {
                        self.rbuf = Vec::new();
                    }
                    continue;
                }
                State::Head | State::Body(_) => {}
            }
            if let Step::Again = self.advance(limits, submit) {
                continue;
            }
            match self.read() {
                // The client went away; whatever it sent of a request is dropped.
                Ok(0) => return Life::Closed,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Life::Open,
                Err(e) => {
                    debug!(error = %e, "read from client failed");
                    return Life::Closed;
                }
            }
        }
    }

    /// Queues a worker's response and writes what it can.
    pub fn on_reply(
        &mut self,
        bytes: Vec<u8>,
        close: bool,
        limits: &Limits,
        submit: &mut dyn FnMut(Job) -> bool,
    ) -> Life {
        debug_assert!(matches!(self.state, State::Waiting));
        if self.wbuf.is_empty() {
            self.wbuf = bytes;
        } else {
            self.wbuf.extend_from_slice(&bytes);
        }
        self.close_after_write = close;
        self.state = State::Writing;
        self.drive(limits, submit)
    }

    fn advance(&mut self, limits: &Limits, submit: &mut dyn FnMut(Job) -> bool) -> Step {
        match std::mem::replace(&mut self.state, State::Head) {
            State::Head => self.advance_head(limits, submit),
            State::Body(pending) => self.advance_body(pending, limits, submit),
            other => {
                self.state = other;
                Step::NeedInput
            }
        }
    }

    fn advance_head(&mut self, limits: &Limits, submit: &mut dyn FnMut(Job) -> bool) -> Step {
        let (len, head) = match parse_head(&self.rbuf, limits) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => return Step::NeedInput,
            Err(reject) => {
                debug!(status = reject.status, message = %reject.message, "malformed request");
                self.respond(reject.reply(), Persist::Close);
                return Step::Again;
            }
        };
        self.rbuf.drain(..len);
        let path = head.target.split('?').next().unwrap_or_default();
        let span = debug_span!("http_request", method = %head.method, path = %path);
        let persist = if head.keep_alive {
            Persist::KeepAlive {
                http10: head.http10,
            }
        } else {
            Persist::Close
        };
        let route = routes::route(&head.method, &head.target, head.content_type.as_deref());
        debug!(parent: &span, http10 = head.http10, keep_alive = head.keep_alive, "request");

        let body = match head.framing {
            Framing::Length(n) if n > limits.max_body as u64 => {
                // Answered without reading the body, which cannot be skipped: close.
                return self.reject(&span, Reject::body_too_large(Some(n), limits.max_body));
            }
            Framing::Length(0) => {
                self.finish(persist, span, route, Vec::new(), submit);
                return Step::Again;
            }
            Framing::Length(n) => Body::Length(n as usize),
            Framing::Chunked => Body::Chunked(Chunked::default()),
        };
        if head.expect_continue {
            if let Err(reject) = route {
                // The client waits before sending the body: refuse without reading it.
                return self.reject(
                    &span,
                    Reject {
                        close: true,
                        ..reject
                    },
                );
            }
            let complete = matches!(body, Body::Length(n) if self.rbuf.len() >= n);
            if !complete {
                self.wbuf.extend_from_slice(routes::CONTINUE);
            }
        }
        if let Body::Length(n) = body {
            // Room for the body and one read past it, so the last read does not reallocate.
            self.rbuf
                .reserve((n + READ_CHUNK).saturating_sub(self.rbuf.len()));
        }
        self.state = State::Body(Box::new(Pending {
            persist,
            span,
            route,
            body,
        }));
        Step::Again
    }

    fn advance_body(
        &mut self,
        mut pending: Box<Pending>,
        limits: &Limits,
        submit: &mut dyn FnMut(Job) -> bool,
    ) -> Step {
        let body = match &mut pending.body {
            Body::Length(n) if self.rbuf.len() >= *n => {
                let rest = self.rbuf.split_off(*n);
                std::mem::replace(&mut self.rbuf, rest)
            }
            Body::Length(_) => {
                self.state = State::Body(pending);
                return Step::NeedInput;
            }
            Body::Chunked(chunked) => match chunked.feed(&mut self.rbuf, limits) {
                Ok(true) => std::mem::take(&mut chunked.body),
                Ok(false) => {
                    self.state = State::Body(pending);
                    return Step::NeedInput;
                }
                Err(reject) => return self.reject(&pending.span, reject),
            },
        };
        let Pending {
            persist,
            span,
            route,
            ..
        } = *pending;
        self.finish(persist, span, route, body, submit);
        Step::Again
    }

    /// The request is complete: hand it to a worker, or answer the error found for it.
    fn finish(
        &mut self,
        persist: Persist,
        span: Span,
        route: Result<Route, Reject>,
        body: Vec<u8>,
        submit: &mut dyn FnMut(Job) -> bool,
    ) {
        match route.and_then(|r| r.into_dispatch(body)) {
            Ok(dispatch) => {
                let job = Job {
                    token: self.token,
                    dispatch,
                    persist,
                    span: span.clone(),
                };
                self.state = State::Waiting;
                if !submit(job) {
                    let reject = Reject {
                        status: 503,
                        kind: "unavailable",
                        message: "the server is shutting down".to_owned(),
                        allow: None,
                        close: true,
                    };
                    self.reject(&span, reject);
                }
            }
            Err(reject) => {
                let persist = if reject.close {
                    Persist::Close
                } else {
                    persist
                };
                debug!(parent: &span, status = reject.status, kind = reject.kind, "refused");
                self.respond(reject.reply(), persist);
            }
        }
    }

    /// Answers `reject` and closes the connection after it.
    fn reject(&mut self, span: &Span, reject: Reject) -> Step {
        debug!(parent: span, status = reject.status, kind = reject.kind, "refused");
        self.respond(reject.reply(), Persist::Close);
        Step::Again
    }

    fn respond(&mut self, reply: Reply, persist: Persist) {
        self.wbuf.extend_from_slice(&reply.encode(persist));
        self.close_after_write = persist == Persist::Close;
        self.state = State::Writing;
    }

    /// Writes `wbuf`; true once all of it is written.
    fn flush(&mut self) -> io::Result<bool> {
        while self.wpos < self.wbuf.len() {
            match self.stream.write(&self.wbuf[self.wpos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.wpos = 0;
        if self.wbuf.capacity() > KEEP_CAPACITY {
            self.wbuf = Vec::new();
        } else {
            self.wbuf.clear();
        }
        Ok(true)
    }

    fn read(&mut self) -> io::Result<usize> {
        let start = self.rbuf.len();
        self.rbuf.resize(start + READ_CHUNK, 0);
        let result = loop {
            match self.stream.read(&mut self.rbuf[start..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => break other,
            }
        };
        self.rbuf.truncate(start + *result.as_ref().unwrap_or(&0));
        result
    }
}

/// How a request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
}

/// What the connection needs from a request head.
#[derive(Debug, PartialEq)]
struct Head {
    method: String,
    target: String,
    http10: bool,
    content_type: Option<String>,
    framing: Framing,
    keep_alive: bool,
    expect_continue: bool,
}

/// Parses a request head at the start of `buf`: `None` while it is incomplete,
/// otherwise its length and contents.
fn parse_head(buf: &[u8], limits: &Limits) -> Result<Option<(usize, Head)>, Reject> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > limits.max_head => {
            return Err(Reject::head_too_large(limits.max_head))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Reject::head_too_large(limits.max_head))
        }
        Err(e) => return Err(Reject::malformed(format!("malformed request: {e}"))),
    };
    if len > limits.max_head {
        return Err(Reject::head_too_large(limits.max_head));
    }
    let http10 = req.version == Some(0);
    let mut head = Head {
        method: req.method.unwrap_or_default().to_owned(),
        target: req.path.unwrap_or_default().to_owned(),
        http10,
        content_type: None,
        framing: Framing::Length(0),
        keep_alive: !http10,
        expect_continue: false,
    };
    let mut length: Option<u64> = None;
    let mut codings: Vec<String> = Vec::new();
    let (mut close, mut keep) = (false, false);
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value)
            .map_err(|_| Reject::malformed(format!("header {} is not UTF-8", h.name)))?
            .trim();
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse::<u64>()
                .ok()
                .filter(|_| value.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| Reject::malformed(format!("invalid Content-Length {value:?}")))?;
            if length.is_some_and(|l| l != n) {
                return Err(Reject::malformed("conflicting Content-Length headers"));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            codings.extend(
                value
                    .split(',')
                    .map(|c| c.trim().to_ascii_lowercase())
                    .filter(|c| !c.is_empty()),
            );
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                close |= token.eq_ignore_ascii_case("close");
                keep |= token.eq_ignore_ascii_case("keep-alive");
            }
        } else if name.eq_ignore_ascii_case("expect") {
            head.expect_continue = !http10 && value.eq_ignore_ascii_case("100-continue");
        } else if name.eq_ignore_ascii_case("content-type") && head.content_type.is_none() {
            head.content_type = Some(value.to_owned());
        }
    }
    head.keep_alive = !close && (keep || !http10);
    if !codings.is_empty() {
        if http10 {
            return Err(Reject::malformed(
                "Transfer-Encoding in an HTTP/1.0 request",
            ));
        }
        if length.is_some() {
            return Err(Reject::malformed(
                "both Content-Length and Transfer-Encoding",
            ));
        }
        if codings != ["chunked"] {
            return Err(Reject::not_implemented(format!(
                "unsupported Transfer-Encoding {:?}",
                codings.join(", ")
            )));
        }
        head.framing = Framing::Chunked;
    } else {
        head.framing = Framing::Length(length.unwrap_or(0));
    }
    Ok(Some((len, head)))
}

/// Decodes a chunked body as it arrives.
#[derive(Debug, Default)]
struct Chunked {
    body: Vec<u8>,
    phase: Phase,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Expecting a chunk-size line.
    #[default]
    Size,
    /// Inside a chunk's data, this many bytes to go.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields up to an empty line.
    Trailers,
}

impl Chunked {
    /// Consumes what it can of `buf`; true once the body is complete.
    fn feed(&mut self, buf: &mut Vec<u8>, limits: &Limits) -> Result<bool, Reject> {
        let mut pos = 0;
        let result = self.decode(buf, &mut pos, limits);
        buf.drain(..pos);
        result
    }

    fn decode(&mut self, buf: &[u8], pos: &mut usize, limits: &Limits) -> Result<bool, Reject> {
        loop {
            let rest = &buf[*pos..];
            match self.phase {
                Phase::Size => match httparse::parse_chunk_size(rest) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        *pos += used;
                        if size == 0 {
                            self.phase = Phase::Trailers;
                        } else if size > (limits.max_body - self.body.len()) as u64 {
                            return Err(Reject::body_too_large(None, limits.max_body));
                        } else {
                            self.body.reserve(size as usize);
                            self.phase = Phase::Data(size);
                        }
                    }
                    Ok(httparse::Status::Partial) if rest.len() > MAX_CHUNK_LINE => {
                        return Err(Reject::malformed("chunk-size line too long"))
                    }
                    Ok(httparse::Status::Partial) => return Ok(false),
                    Err(httparse::InvalidChunkSize) => {
                        return Err(Reject::malformed("invalid chunk size"))
                    }
                },
                Phase::Data(left) => {
                    if rest.is_empty() {
                        return Ok(false);
                    }
                    let take = rest.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    self.body.extend_from_slice(&rest[..take]);
                    *pos += take;
                    let left = left - take as u64;
                    self.phase = if left == 0 {
                        Phase::DataEnd
                    } else {
                        Phase::Data(left)
                    };
                }
                Phase::DataEnd => {
                    if rest.len() < 2 {
                        return Ok(false);
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err(Reject::malformed("chunk data not followed by CRLF"));
                    }
                    *pos += 2;
                    self.phase = Phase::Size;
                }
                Phase::Trailers => {
                    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    return match httparse::parse_headers(rest, &mut headers) {
                        Ok(httparse::Status::Complete((used, _))) => {
                            *pos += used;
                            Ok(true)
                        }
                        Ok(httparse::Status::Partial) if rest.len() > limits.max_head => {
                            Err(Reject::head_too_large(limits.max_head))
                        }
                        Ok(httparse::Status::Partial) => Ok(false),
                        Err(httparse::Error::TooManyHeaders) => {
                            Err(Reject::head_too_large(limits.max_head))
                        }
                        Err(e) => Err(Reject::malformed(format!("malformed chunked trailer: {e}"))),
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_body: 100,
        max_head: 256,
    };

    fn head(text: &str) -> Result<Option<(usize, Head)>, Reject> {
        parse_head(text.as_bytes(), &LIMITS)
    }

    #[test]
    fn parses_heads() {
        let text = "POST /run/f?logs=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Type: text/x\r\nExpect: 100-Continue\r\n\r\nhello";
        let (len, h) = head(text).unwrap().unwrap();
        assert_eq!(len, text.len() - 5);
        assert_eq!(
            h,
            Head {
                method: "POST".into(),
                target: "/run/f?logs=1".into(),
                http10: false,
                content_type: Some("text/x".into()),
                framing: Framing::Length(5),
                keep_alive: true,
                expect_continue: true,
            }
        );
        assert_eq!(head("GET / HTTP/1.1\r\nHost: x\r\n").unwrap(), None);

        let (_, h) = head("GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        let (_, h) = head("GET / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive && h.http10 && !h.expect_continue);
        let (_, h) = head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.keep_alive);
        let (_, h) = head("PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Chunked);
    }

    #[test]
    fn refuses_bad_heads() {
        let status = |text: &str| head(text).unwrap_err().status;
        assert_eq!(status("GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nContent-Length: +5\r\n\r\n"), 400);
        assert_eq!(
            status("GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            400
        );
        assert_eq!(
            status("GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400
        );
        assert_eq!(
            status("GET / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            501
        );
        assert_eq!(
            status("GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400
        );
        assert_eq!(status("GET / HTTP/2.0\r\n\r\n"), 400);
        assert_eq!(status("GARBAGE\r\n\r\n"), 400);
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(300));
        assert_eq!(status(&long), 431);
        let many: String = (0..70).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(status(&format!("GET / HTTP/1.1\r\n{many}\r\n")), 431);
    }

    fn feed_all(parts: &[&[u8]]) -> Result<(Vec<u8>, Vec<u8>), Reject> {
        let mut c = Chunked::default();
        let mut buf = Vec::new();
        for part in parts {
            buf.extend_from_slice(part);
            if c.feed(&mut buf, &LIMITS)? {
                return Ok((c.body, buf));
            }
        }
        panic!("incomplete: {:?}", c.phase);
    }

    #[test]
    fn decodes_chunked_bodies() {
        let whole = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        let (body, rest) = feed_all(&[whole]).unwrap();
        assert_eq!(body, b"Wikipedia in\r\n\r\nchunks.");
        assert_eq!(rest, b"NEXT");
        // The same, one byte at a time.
        let parts: Vec<&[u8]> = whole.chunks(1).collect();
        let (body, _) = feed_all(&parts).unwrap();
        assert_eq!(body, b"Wikipedia in\r\n\r\nchunks.");
        let (body, rest) = feed_all(&[b"0\r\n\r\n"]).unwrap();
        assert!(body.is_empty() && rest.is_empty());
    }

    #[test]
    fn refuses_bad_chunks() {
        assert_eq!(feed_all(&[b"zz\r\n"]).unwrap_err().status, 400);
        assert_eq!(feed_all(&[b"2\r\nabX\r\n"]).unwrap_err().status, 400);
        assert_eq!(feed_all(&[b"65\r\n"]).unwrap_err().status, 413);
        assert_eq!(
            feed_all(&[b"32\r\n", &[b'a'; 50], b"\r\n33\r\n"])
                .unwrap_err()
                .status,
            413
        );
        assert_eq!(
            feed_all(&[b"ffffffffffffffffff\r\n"]).unwrap_err().status,
            400
        );
    }
}
