//! Generic HTTP/1.1 wire code, apart from any route: request heads (`httparse`),
//! body framing (`Content-Length` or chunked), `Expect: 100-continue`, keep-alive,
//! percent-decoding, and response heads. It knows nothing of sprout's routes,
//! requests or responses, so a TCP listener reuses it as it is.
//!
//! Everything a request can do wrong here is an [`Error`]: its status, a short
//! machine name and a message; the connection is closed after answering it (the
//! request's framing can no longer be trusted, or its body was not read).

use std::borrow::Cow;
use std::fmt::Write as _;

/// Most headers accepted in a request head.
pub const MAX_HEADERS: usize = 64;
/// Longest chunk-size line accepted (size, extensions and CRLF).
const MAX_CHUNK_LINE: usize = 4096;

/// The interim response to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// A request the wire layer refuses; the connection is closed after the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub status: u16,
    /// A short machine name for what is wrong (`bad_request`, `headers_too_large`, ...).
    pub kind: &'static str,
    pub message: String,
}

impl Error {
    /// A request whose framing is broken.
    pub fn malformed(message: impl Into<String>) -> Error {
        Error {
            status: 400,
            kind: "bad_request",
            message: message.into(),
        }
    }

    pub fn head_too_large(max: usize) -> Error {
        Error {
            status: 431,
            kind: "headers_too_large",
            message: format!("request head exceeds {max} bytes or {MAX_HEADERS} headers"),
        }
    }

    pub fn body_too_large(len: Option<u64>, max: usize) -> Error {
        let message = match len {
            Some(len) => format!("request body of {len} bytes exceeds the limit of {max} bytes"),
            None => format!("request body exceeds the limit of {max} bytes"),
        };
        Error {
            status: 413,
            kind: "payload_too_large",
            message,
        }
    }

    fn not_implemented(message: impl Into<String>) -> Error {
        Error {
            status: 501,
            kind: "not_implemented",
            message: message.into(),
        }
    }
}

/// How a request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
}

/// What a server needs from a request head.
#[derive(Debug, PartialEq)]
pub struct Head {
    pub method: String,
    /// The request target as sent: path and query.
    pub target: String,
    pub http10: bool,
    pub content_type: Option<String>,
    pub framing: Framing,
    pub keep_alive: bool,
    pub expect_continue: bool,
    /// Every header as sent (at most [`MAX_HEADERS`], in a head of bounded size):
    /// what an HTTP app behind `/run` is given.
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The target's path, still percent-encoded.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }

    /// Whether the connection stays open after the response.
    pub fn persist(&self) -> Persist {
        if self.keep_alive {
            Persist::KeepAlive {
                http10: self.http10,
            }
        } else {
            Persist::Close
        }
    }
}

/// Parses a request head at the start of `buf`: `None` while it is incomplete,
/// otherwise its length and contents. A head longer than `max_head` is refused.
pub fn parse_head(buf: &[u8], max_head: usize) -> Result<Option<(usize, Head)>, Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > max_head => {
            return Err(Error::head_too_large(max_head))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Error::head_too_large(max_head)),
        Err(e) => return Err(Error::malformed(format!("malformed request: {e}"))),
    };
    if len > max_head {
        return Err(Error::head_too_large(max_head));
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
        headers: Vec::with_capacity(req.headers.len()),
    };
    let mut length: Option<u64> = None;
    let mut codings: Vec<String> = Vec::new();
    let (mut close, mut keep) = (false, false);
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value)
            .map_err(|_| Error::malformed(format!("header {} is not UTF-8", h.name)))?
            .trim();
        let name = h.name;
        head.headers.push((name.to_owned(), value.to_owned()));
        if name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse::<u64>()
                .ok()
                .filter(|_| value.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| Error::malformed(format!("invalid Content-Length {value:?}")))?;
            if length.is_some_and(|l| l != n) {
                return Err(Error::malformed("conflicting Content-Length headers"));
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
            return Err(Error::malformed("Transfer-Encoding in an HTTP/1.0 request"));
        }
        if length.is_some() {
            return Err(Error::malformed(
                "both Content-Length and Transfer-Encoding",
            ));
        }
        if codings != ["chunked"] {
            return Err(Error::not_implemented(format!(
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
pub struct Chunked {
    pub body: Vec<u8>,
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
    /// Consumes what it can of `buf`; true once the body is complete. A body over
    /// `max_body` bytes, or trailers over `max_head`, are refused.
    pub fn feed(
        &mut self,
        buf: &mut Vec<u8>,
        max_head: usize,
        max_body: usize,
    ) -> Result<bool, Error> {
        let mut pos = 0;
        let result = self.decode(buf, &mut pos, max_head, max_body);
        buf.drain(..pos);
        result
    }

    fn decode(
        &mut self,
        buf: &[u8],
        pos: &mut usize,
        max_head: usize,
        max_body: usize,
    ) -> Result<bool, Error> {
        loop {
            let rest = &buf[*pos..];
            match self.phase {
                Phase::Size => match httparse::parse_chunk_size(rest) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        *pos += used;
                        if size == 0 {
                            self.phase = Phase::Trailers;
                        } else if size > (max_body - self.body.len()) as u64 {
                            return Err(Error::body_too_large(None, max_body));
                        } else {
                            self.body.reserve(size as usize);
                            self.phase = Phase::Data(size);
                        }
                    }
                    Ok(httparse::Status::Partial) if rest.len() > MAX_CHUNK_LINE => {
                        return Err(Error::malformed("chunk-size line too long"))
                    }
                    Ok(httparse::Status::Partial) => return Ok(false),
                    Err(httparse::InvalidChunkSize) => {
                        return Err(Error::malformed("invalid chunk size"))
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
                        return Err(Error::malformed("chunk data not followed by CRLF"));
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
                        Ok(httparse::Status::Partial) if rest.len() > max_head => {
                            Err(Error::head_too_large(max_head))
                        }
                        Ok(httparse::Status::Partial) => Ok(false),
                        Err(httparse::Error::TooManyHeaders) => {
                            Err(Error::head_too_large(max_head))
                        }
                        Err(e) => Err(Error::malformed(format!("malformed chunked trailer: {e}"))),
                    };
                }
            }
        }
    }
}

/// Decodes `%XX` escapes; `None` if one is broken or the result is not UTF-8.
/// Borrows when there is nothing to decode.
pub fn percent_decode(s: &str) -> Option<Cow<'_, str>> {
    if !s.contains('%') {
        return Some(Cow::Borrowed(s));
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

/// Whether the connection stays open after a response, and how to say so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persist {
    Close,
    /// Keep the connection; HTTP/1.0 clients need to be told.
    KeepAlive {
        http10: bool,
    },
}

/// The status line and headers of a response with a body of `len` bytes of
/// `content_type`; `headers` follow the framing ones.
pub fn encode_head(
    status: u16,
    content_type: &str,
    len: usize,
    persist: Persist,
    headers: &[(&'static str, String)],
) -> Vec<u8> {
    encode_head_with(status, Some(content_type), len, persist, headers, &[])
}

/// The status line and headers of a response whose body is not known yet (an
/// early acknowledgement): `Transfer-Encoding: chunked` when `chunked`, else the body
/// ends when the connection closes (an HTTP/1.0 client), which `persist` must say.
pub fn encode_streamed_head(
    status: u16,
    content_type: &str,
    chunked: bool,
    persist: Persist,
) -> Vec<u8> {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown");
    let mut head = String::with_capacity(128);
    let _ = write!(
        head,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
    );
    if chunked {
        head.push_str("Transfer-Encoding: chunked\r\n");
    }
    match persist {
        Persist::Close => head.push_str("Connection: close\r\n"),
        Persist::KeepAlive { http10: true } => head.push_str("Connection: keep-alive\r\n"),
        Persist::KeepAlive { http10: false } => {}
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// `body` as the last chunk of a chunked body, and the end of it.
pub fn last_chunk(body: &[u8]) -> (Vec<u8>, &'static [u8]) {
    if body.is_empty() {
        return (Vec::new(), b"0\r\n\r\n");
    }
    (
        format!("{:x}\r\n", body.len()).into_bytes(),
        b"\r\n0\r\n\r\n",
    )
}

/// [`encode_head`] for a response whose headers are someone else's too (an HTTP
/// app's, checked to be tokens and values without CR or LF): no `Content-Type`
/// unless given, then `headers`, then `extra`.
pub fn encode_head_with(
    status: u16,
    content_type: Option<&str>,
    len: usize,
    persist: Persist,
    headers: &[(&'static str, String)],
    extra: &[(String, String)],
) -> Vec<u8> {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown");
    let mut head = String::with_capacity(160);
    let _ = write!(head, "HTTP/1.1 {status} {reason}\r\n");
    if let Some(content_type) = content_type {
        let _ = write!(head, "Content-Type: {content_type}\r\n");
    }
    let _ = write!(head, "Content-Length: {len}\r\n");
    match persist {
        Persist::Close => head.push_str("Connection: close\r\n"),
        Persist::KeepAlive { http10: true } => head.push_str("Connection: keep-alive\r\n"),
        Persist::KeepAlive { http10: false } => {}
    }
    for (name, value) in headers {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    for (name, value) in extra {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    head.push_str("\r\n");
    head.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX_BODY: usize = 100;
    const MAX_HEAD: usize = 256;

    fn head(text: &str) -> Result<Option<(usize, Head)>, Error> {
        parse_head(text.as_bytes(), MAX_HEAD)
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
                headers: vec![
                    ("Host".into(), "x".into()),
                    ("Content-Length".into(), "5".into()),
                    ("Content-Type".into(), "text/x".into()),
                    ("Expect".into(), "100-Continue".into()),
                ],
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

    fn feed_all(parts: &[&[u8]]) -> Result<(Vec<u8>, Vec<u8>), Error> {
        let mut c = Chunked::default();
        let mut buf = Vec::new();
        for part in parts {
            buf.extend_from_slice(part);
            if c.feed(&mut buf, MAX_HEAD, MAX_BODY)? {
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

    #[test]
    fn percent_decodes() {
        assert!(matches!(
            percent_decode("a@b.c"),
            Some(Cow::Borrowed("a@b.c"))
        ));
        assert_eq!(percent_decode("a%40b%2Fc").as_deref(), Some("a@b/c"));
        for broken in ["%", "%4", "%zz", "%ff"] {
            assert_eq!(percent_decode(broken), None, "{broken}");
        }
    }

    #[test]
    fn encodes_heads_with_the_canonical_reason() {
        let head = encode_head(413, "application/json", 0, Persist::Close, &[]);
        assert_eq!(
            head,
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let head = encode_head(
            299,
            "text/plain",
            1,
            Persist::KeepAlive { http10: false },
            &[],
        );
        assert!(head.starts_with(b"HTTP/1.1 299 Unknown\r\n"));
    }
}
