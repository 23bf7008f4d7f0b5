//! The HTTP fuzz target's entry point (`agent/fuzz`, and its corpus replay in
//! `agent/tests/fuzz_corpus.rs`): a client's bytes through a real connection — the
//! head and body parser, chunked decoding, `Expect`, pipelining and the router —
//! over a socket pair, with a fake handler in place of the agent. No sandbox, no root.
//!
//! Not part of the API: hidden from the docs, and costs the server nothing.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use mio::Token;

use super::auth::Gate;
use super::conn::{Conn, Job, Life};
use super::limits::Limits;
use super::listener::Stream;
use super::reply::Reply;
use super::server::FIRST_CONN;
use super::wire::{self, Chunked, Framing};

/// Limits small enough that a fuzzer's inputs reach the 413 and 431 paths.
pub const SMALL_LIMITS: (usize, usize) = (1024, 512);

/// What a client got for its bytes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Exchange {
    /// Requests handed to the (fake) handler.
    pub handled: usize,
    /// Responses the client read, in order: status and body.
    pub responses: Vec<(u16, Vec<u8>)>,
}

/// Sends `input` on a fresh connection and checks every response the client gets.
///
/// The first byte says how: bit 7 picks [`SMALL_LIMITS`] (body, head) instead of the
/// defaults, bits 0–6 the size of each write (0: all at once); the rest is what the
/// client sends, after which it shuts down its side. `Err` names the broken rule: a
/// response that is not well-formed HTTP/1.1 with an exact `Content-Length`, an
/// error (4xx/5xx) without a JSON `{"error": {"kind", "message"}}` body, a response
/// to `HEAD` with body bytes, bytes after a `Connection: close` response, or a
/// connection that never ends.
#[doc(hidden)]
pub fn exchange(input: &[u8]) -> Result<Exchange, String> {
    let (control, data) = input.split_first().unwrap_or((&0, &[]));
    let limits = if control & 0x80 != 0 {
        Limits {
            max_body: SMALL_LIMITS.0,
            max_head: SMALL_LIMITS.1,
            ..Limits::default()
        }
    } else {
        Limits::default()
    };
    let piece = match (control & 0x7f) as usize {
        0 => data.len().max(1),
        n => n,
    };
    let (mut client, server) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    client.set_nonblocking(true).map_err(|e| e.to_string())?;
    server.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut conn = Some(Conn::new(
        Stream::Unix(mio::net::UnixStream::from_std(server)),
        Token(FIRST_CONN),
        Gate::Local,
    ));
    let mut got = Vec::new();
    let mut handled = 0;
    for part in data.chunks(piece) {
        let mut sent = 0;
        // Bounded: each round either writes or lets the connection read.
        for _ in 0..=part.len() {
            if sent == part.len() {
                break;
            }
            match client.write(&part[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => break,
            }
            pump(&mut conn, &limits, &mut handled);
            read_all(&mut client, &mut got);
        }
        pump(&mut conn, &limits, &mut handled);
        read_all(&mut client, &mut got);
    }
    let _ = client.shutdown(Shutdown::Write);
    // The connection must see the end and close; a few rounds are plenty.
    for _ in 0..16 {
        if conn.is_none() {
            break;
        }
        pump(&mut conn, &limits, &mut handled);
        read_all(&mut client, &mut got);
    }
    if conn.is_some() {
        return Err("the connection did not close after the client shut down".to_owned());
    }
    read_all(&mut client, &mut got);
    let responses = check_responses(&got, &head_requests(data, &limits))?;
    if responses.len() < handled {
        return Err(format!(
            "{handled} requests were handled but {} responses came back",
            responses.len()
        ));
    }
    Ok(Exchange { handled, responses })
}

/// Lets the connection make all the progress it can, answering each request it hands
/// over at once (as a worker would).
fn pump(conn: &mut Option<Conn>, limits: &Limits, handled: &mut usize) {
    let Some(c) = conn.as_mut() else { return };
    let mut jobs = Vec::new();
    let mut life = c.drive(limits, &mut |job| {
        jobs.push(job);
        true
    });
    while let Some(job) = jobs.pop() {
        *handled += 1;
        let persist = job.persist;
        life = c.on_output(answer(job).into(), persist, limits, &mut |job| {
            jobs.push(job);
            true
        });
    }
    if life == Life::Closed {
        *conn = None;
    }
}

/// The fake handler: names the request it got.
fn answer(job: Job) -> Reply {
    let request = format!("{:?}", job.dispatch.request);
    let kind = request
        .split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or_default();
    Reply {
        status: 200,
        headers: Vec::new(),
        body: serde_json::to_vec(&serde_json::json!({ "request": kind })).unwrap_or_default(),
    }
}

/// Which of the requests in `data` are `HEAD`s, in order (one response each, after
/// any `100 Continue`), as far as the requests can be told apart: up to the first
/// that is malformed, refused with its connection, or not complete.
fn head_requests(data: &[u8], limits: &Limits) -> Vec<bool> {
    let mut heads = Vec::new();
    let mut rest = data.to_vec();
    while let Ok(Some((len, head))) = wire::parse_head(&rest, limits.max_head) {
        heads.push(head.method == "HEAD");
        rest.drain(..len);
        match head.framing {
            Framing::Length(n) if n <= rest.len() as u64 && n <= limits.max_body as u64 => {
                rest.drain(..n as usize);
            }
            Framing::Length(_) => break,
            Framing::Chunked => {
                let mut body = Chunked::default();
                if !matches!(
                    body.feed(&mut rest, limits.max_head, limits.max_body),
                    Ok(true)
                ) {
                    break;
                }
            }
        }
    }
    heads
}

fn read_all(client: &mut UnixStream, got: &mut Vec<u8>) {
    let mut buf = [0u8; 64 << 10];
    loop {
        match client.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Splits what the client read into responses and checks each; `heads` says which
/// requests were `HEAD`s, whose responses have no body.
fn check_responses(mut got: &[u8], heads: &[bool]) -> Result<Vec<(u16, Vec<u8>)>, String> {
    let mut responses = Vec::new();
    while !got.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let head = match resp.parse(got) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                return Err(format!("a response head is cut short: {:?}", lossy(got)))
            }
            Err(e) => return Err(format!("a response is not HTTP ({e}): {:?}", lossy(got))),
        };
        if resp.version != Some(1) {
            return Err(format!("a response is not HTTP/1.1: {:?}", lossy(got)));
        }
        let status = resp.code.unwrap_or_default();
        let header = |name: &str| {
            resp.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
        };
        if status == 100 {
            got = &got[head..];
            continue;
        }
        let announced: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("a {status} response has no Content-Length"))?;
        // A HEAD's response is its head: what follows is the next response.
        let head_only = heads.get(responses.len()).copied().unwrap_or(false);
        let len = if head_only { 0 } else { announced };
        let body = got
            .get(head..head + len)
            .ok_or_else(|| format!("a {status} response's body is cut short"))?;
        if status >= 400 && !head_only {
            check_error_body(status, body)?;
        }
        let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        responses.push((status, body.to_vec()));
        got = &got[head + len..];
        if close && !got.is_empty() {
            return Err(format!(
                "bytes after a Connection: close response: {:?}",
                lossy(got)
            ));
        }
    }
    Ok(responses)
}

/// An error's body names its kind and says what is wrong.
fn check_error_body(status: u16, body: &[u8]) -> Result<(), String> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        format!(
            "the {status} response's body is not JSON ({e}): {:?}",
            lossy(body)
        )
    })?;
    let error = &value["error"];
    for field in ["kind", "message"] {
        if error[field].as_str().is_none_or(str::is_empty) {
            return Err(format!(
                "the {status} response's body has no error.{field}: {}",
                lossy(body)
            ));
        }
    }
    Ok(())
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(300)]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(control: u8, text: &str) -> Exchange {
        let mut input = vec![control];
        input.extend_from_slice(text.as_bytes());
        exchange(&input).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    #[test]
    fn routes_a_request_to_the_handler() {
        let ex = run(0, "GET /functions HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(ex.handled, 1);
        assert_eq!(ex.responses.len(), 1);
        assert_eq!(ex.responses[0].0, 200);
        assert!(String::from_utf8_lossy(&ex.responses[0].1).contains("ListFunctions"));
    }

    #[test]
    fn pipelined_requests_byte_by_byte_get_answers_in_order() {
        let two = "GET /status HTTP/1.1\r\n\r\nPOST /functions/f/invoke HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
        for control in [0, 1, 7] {
            let ex = run(control, two);
            assert_eq!(ex.handled, 2, "writes of {control}");
            let statuses: Vec<u16> = ex.responses.iter().map(|r| r.0).collect();
            assert_eq!(statuses, [200, 200]);
            assert!(String::from_utf8_lossy(&ex.responses[1].1).contains("Invoke"));
        }
    }

    #[test]
    fn errors_are_json_and_close_the_connection() {
        let ex = run(0, "NOT HTTP\r\n\r\nGET /status HTTP/1.1\r\n\r\n");
        assert_eq!(ex.handled, 0);
        assert_eq!(ex.responses.len(), 1);
        assert_eq!(ex.responses[0].0, 400);
    }

    #[test]
    fn small_limits_reach_the_size_errors() {
        let big_head = format!("GET /status HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(600));
        assert_eq!(run(0x80, &big_head).responses[0].0, 431);
        let big_body = "POST /run/f HTTP/1.1\r\nContent-Length: 2000\r\n\r\n";
        assert_eq!(run(0x80, big_body).responses[0].0, 413);
    }

    #[test]
    fn a_checker_catches_a_broken_response() {
        assert!(check_responses(b"HTTP/1.1 200 OK\r\n\r\n", &[]).is_err());
        assert!(check_responses(b"HTTP/1.1 400 Bad\r\nContent-Length: 2\r\n\r\n{}", &[]).is_err());
        assert!(check_responses(
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\nHTTP/1.1",
            &[]
        )
        .is_err());
        assert!(check_responses(b"", &[]).unwrap().is_empty());
        // A HEAD's response with a body: the body is read as the next response.
        let with_body = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        assert!(check_responses(with_body, &[false]).is_ok());
        assert!(check_responses(with_body, &[true]).is_err());
    }

    #[test]
    fn a_head_is_answered_without_a_body_and_the_next_request_after_it() {
        // Handled (HEAD /run), refused by the router (HEAD /status is GET only) and
        // refused for its path: each answered with its head alone, on one connection.
        let three = "HEAD /run/f HTTP/1.1\r\n\r\nHEAD /status HTTP/1.1\r\n\r\nHEAD /run/%zz HTTP/1.1\r\n\r\nGET /status HTTP/1.1\r\n\r\n";
        for control in [0, 1, 5] {
            let ex = run(control, three);
            assert_eq!(ex.handled, 2, "writes of {control}: {ex:?}");
            let statuses: Vec<u16> = ex.responses.iter().map(|r| r.0).collect();
            assert_eq!(statuses, [200, 405, 400, 200], "writes of {control}");
            assert!(ex.responses[..3].iter().all(|r| r.1.is_empty()), "{ex:?}");
            assert!(String::from_utf8_lossy(&ex.responses[3].1).contains("Status"));
        }
        assert_eq!(
            head_requests(three.as_bytes(), &Limits::default()),
            [true, true, true, false]
        );
    }
}
