//! One client connection's state machine: reads requests (parsed by [`wire`]), asks
//! its listener's [`Gate`] who sent each head (a key on TCP: 401 without one), hands
//! the head to the router ([`routes::find`], the caller's [`Grant`](auth::Grant) or
//! a 403, [`routes::Found::into_route`]) and, once its body is read, the routed
//! request ([`Route::into_dispatch`]) to the server, and writes the responses. A
//! connection carries one request at a time: a pipelined request stays in the read
//! buffer until the previous response is written.
//!
//! Timeouts cost the request path nothing: a connection only counts its state
//! changes ([`Conn::stage`]) and its progress (bytes of a body read, bytes of a
//! response written); the event loop's periodic sweep ([`Conn::expired`]) notes
//! when it first saw each count and closes a connection that stayed in a timed
//! phase (idle, head, body, writing) without progress too long. A request head is
//! timed from its first byte whatever arrives after it.
//!
//! A response goes out as written: its head, then its body as the worker made it (an
//! invocation's shared result from its mapping), in one vectored write per wake-up.
//! While the server drains ([`Conn::drain`]), every response says
//! `Connection: close`, and a request read behind the last one is answered 503.
//!
//! A request whose route answers early (`POST /invoke`: [`Answer::early`]) gets a
//! two-phase response: as soon as it is handed to a worker, `200` and its headers
//! are written (and flushed) with `Transfer-Encoding: chunked`, and the body follows
//! as one chunk when the worker's answer comes; the connection stays open for the
//! next request. An HTTP/1.0 client gets the body delimited by the connection's
//! close instead. If the answer is not a `200` (the handler failed after the head
//! went out, or the server drains), the body is cut short: the connection closes
//! without the last chunk, which the client sees as a broken response, never as a
//! complete one.
//!
//! A response to `HEAD` is its head only, whatever made it (a function's or an HTTP
//! app's answer, an error): its `Content-Length` is the length of the body it would
//! have had (RFC 9110 §9.3.2, §8.6), and no body byte is written, so the next
//! response on the connection starts where the client expects it.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::Token;
use tracing::{debug, debug_span, Span};

use ipc::Payload;

use super::auth::{self, Caller, Gate, KeyScope};
use super::limits::Limits;
use super::listener::Stream;
use super::reply::{Output, Reject, Reply, CONTENT_TYPE};
use super::routes::{self, Dispatch, Route};
use super::wire::{self, Chunked, Framing, Persist};
use crate::transport::Abandon;

const READ_CHUNK: usize = 64 << 10;
/// Buffers larger than this are released once a request is done with them.
const KEEP_CAPACITY: usize = 1 << 20;
/// Output segments handed to one vectored write.
const MAX_IOVECS: usize = 8;

/// A request handed to a worker.
pub(super) struct Job {
    pub token: Token,
    pub dispatch: Dispatch,
    pub persist: Persist,
    pub span: Span,
    /// Its connection's: set when the client goes away or the server drains.
    pub abandon: Arc<Abandon>,
}

/// Whether the connection is still open after [`Conn::drive`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Life {
    Open,
    Closed,
}

/// Where a connection is, for its timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    /// Between requests (keep-alive), or before the first: [`Limits::idle_timeout`].
    Idle,
    /// Part of a request head has arrived: [`Limits::read_timeout`].
    Head,
    /// Reading a request's body: [`Limits::read_timeout`] again, from the head's end
    /// or the last bytes of the body read.
    Body,
    /// The request is being handled: no timeout (the function's own applies).
    Busy,
    /// A response the client is not reading: [`Limits::idle_timeout`], from the
    /// last bytes the client took.
    Writing,
}

pub(super) struct Conn {
    stream: Stream,
    token: Token,
    /// What the listener asks of each request (a key, on TCP).
    gate: Gate,
    /// Shared with the requests handed to workers: set when the client goes away
    /// (this connection is dropped) or the server drains.
    abandon: Arc<Abandon>,
    /// Counts state changes and progress (body bytes read, response bytes written),
    /// so the sweep can tell a new phase, or one that moves, from a stalled one.
    changes: u64,
    /// The phase and change count the last sweep saw, and when it first saw them.
    watched: Option<(Stage, u64, Instant)>,
    /// Bytes read and not yet consumed.
    rbuf: Vec<u8>,
    /// Output to write, in order; `out[0][..opos]` is already written.
    out: VecDeque<Payload>,
    opos: usize,
    state: State,
    /// Close once `out` is written (set with the final response).
    close_after_write: bool,
    /// The server drains: responses say `Connection: close`.
    draining: bool,
    /// The request being answered is a `HEAD`: its response is written without its
    /// body. Set when a request head is read, cleared when its response is written.
    head_only: bool,
    /// The request being answered is OpenWhisk's (`/api/v1`): its refusals are
    /// written in OpenWhisk's error shape.
    openwhisk: bool,
    /// The request being read or answered is HTTP/1.0.
    http10: bool,
    /// The head of the response to the request being handled has gone out already
    /// (an early answer): how its body is framed.
    early: Option<Early>,
}

/// How the body of a response whose head went out early is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Early {
    /// Chunked: the connection may be kept.
    Chunked(Persist),
    /// Ends with the connection (HTTP/1.0).
    UntilClose,
}

enum State {
    /// Waiting for a request head.
    Head,
    /// Reading a request's body.
    Body(Box<Pending>),
    /// The request is with a worker.
    Waiting,
    /// The response is in `out`; then back to `Head`, or closed.
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
    pub fn new(stream: Stream, token: Token, gate: Gate) -> Conn {
        Conn {
            stream,
            token,
            gate,
            rbuf: Vec::new(),
            out: VecDeque::new(),
            opos: 0,
            state: State::Head,
            close_after_write: false,
            draining: false,
            head_only: false,
            openwhisk: false,
            http10: false,
            early: None,
            abandon: Arc::new(Abandon::default()),
            changes: 0,
            watched: None,
        }
    }

    /// Whether it came in on the Unix socket.
    pub fn is_local(&self) -> bool {
        matches!(self.gate, Gate::Local)
    }

    pub fn stream(&mut self) -> &mut Stream {
        &mut self.stream
    }

    /// Whether a request of this connection is with a worker or an instance.
    pub fn is_waiting(&self) -> bool {
        matches!(self.state, State::Waiting)
    }

    /// Whether the connection has a request in hand: being handled, or its response
    /// not yet all written.
    pub fn is_busy(&self) -> bool {
        self.is_waiting() || self.writing()
    }

    /// Whether output is waiting to be written (also TLS records the stream holds).
    fn writing(&self) -> bool {
        !self.out.is_empty() || self.stream.pending()
    }

    /// The server drains: takes back what this connection's request is waiting for,
    /// and makes its next response the last.
    pub fn drain(&mut self) {
        self.draining = true;
        self.abandon.drain();
    }

    pub fn stage(&self) -> Stage {
        match &self.state {
            State::Waiting => Stage::Busy,
            _ if self.writing() => Stage::Writing,
            State::Writing => Stage::Writing,
            State::Body(_) => Stage::Body,
            // A TLS handshake is timed like a request head.
            State::Head if self.rbuf.is_empty() && !self.stream.is_handshaking() => Stage::Idle,
            State::Head => Stage::Head,
        }
    }

    /// Called by the loop's sweep: the phase that has lasted longer than its limit
    /// (counted from the first sweep that saw it, so up to one sweep late), if any.
    pub fn expired(&mut self, now: Instant, limits: &Limits) -> Option<Stage> {
        let phase = self.stage();
        let limit = match phase {
            Stage::Busy => {
                self.watched = None;
                return None;
            }
            Stage::Head | Stage::Body => limits.read_timeout,
            Stage::Idle | Stage::Writing => limits.idle_timeout,
        };
        match self.watched {
            Some((p, changes, since)) if p == phase && changes == self.changes => {
                (now.saturating_duration_since(since) >= limit).then_some(phase)
            }
            _ => {
                self.watched = Some((phase, self.changes, now));
                None
            }
        }
    }

    /// Ends a connection whose request head or body did not arrive in time: answers
    /// 408 if the client can take it without waiting. The caller closes it.
    pub fn time_out(&mut self, phase: Stage, limits: &Limits) {
        if self.stream.is_handshaking() {
            // Nothing can be said before the handshake ends.
            debug!(connection = self.token.0, "TLS handshake timed out");
            return;
        }
        let what = match phase {
            Stage::Head => "request head",
            Stage::Body => "request body",
            _ => return,
        };
        let reject = Reject {
            status: 408,
            kind: "request_timeout",
            message: format!(
                "the {what} did not arrive within {} ms (read timeout)",
                limits.read_timeout.as_millis()
            ),
            allow: None,
            close: true,
        };
        debug!(connection = self.token.0, status = 408, "{what} timed out");
        self.say_last(&reject);
    }

    /// Ends a connection whose request is still being handled when the server stops:
    /// answers 503 if the client can take it without waiting. The caller closes it.
    /// A request begun and not complete (part of its head or body read) is answered
    /// 503 too.
    pub fn cut_off(&mut self, grace: Option<Duration>) {
        if self.early.is_some() {
            // Its head is out: nothing more can be said but a broken body.
            return;
        }
        let message = match (&self.state, grace) {
            (State::Waiting, Some(grace)) => format!(
                "the server is shutting down: the request did not finish within the shutdown grace of {} ms",
                grace.as_millis()
            ),
            (State::Waiting, None) => "the server is shutting down: the request was cut off".to_owned(),
            (State::Body(_), _) => {
                "the server is shutting down: the request's body had not arrived in full".to_owned()
            }
            (State::Head, _) if !self.rbuf.is_empty() => {
                "the server is shutting down: the request head had not arrived in full".to_owned()
            }
            _ => return,
        };
        self.say_last(&shutting_down(message));
    }

    /// Queues `reject` as the last response (behind output already begun: a
    /// `100 Continue`) and writes what the socket takes now.
    fn say_last(&mut self, reject: &Reject) {
        self.respond(reject.reply(), Persist::Close);
        self.state = State::Writing;
        self.close_after_write = true;
        let _ = self.flush();
    }

    /// Makes all the progress possible without blocking: writes pending output,
    /// reads, parses, and hands complete requests to `submit` (which returns false
    /// when no worker can take them).
    pub fn drive(&mut self, limits: &Limits, submit: &mut dyn FnMut(Job) -> bool) -> Life {
        loop {
            if self.writing() {
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
                State::Writing if self.close_after_write => {
                    self.stream.close_notify();
                    return Life::Closed;
                }
                State::Writing => {
                    self.state = State::Head;
                    self.head_only = false;
                    self.changes += 1;
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
                // Body bytes are progress: its read timeout starts again.
                Ok(_) if matches!(self.state, State::Body(_)) => self.changes += 1,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Life::Open,
                Err(e) => {
                    debug!(error = %e, "read from client failed");
                    return Life::Closed;
                }
            }
        }
    }

    /// Queues the response to the request being handled (its body is not copied) and
    /// writes what it can. While the server drains it is the last: it says
    /// `Connection: close`, and a request read behind it is answered 503.
    pub fn on_output(
        &mut self,
        output: Output,
        persist: Persist,
        limits: &Limits,
        submit: &mut dyn FnMut(Job) -> bool,
    ) -> Life {
        debug_assert!(matches!(self.state, State::Waiting));
        if let Some(early) = self.early.take() {
            return self.finish_early(early, output, limits, submit);
        }
        let cut_short = self.draining && persist != Persist::Close;
        let persist = if self.draining {
            Persist::Close
        } else {
            persist
        };
        self.queue(output.head(persist));
        if !self.head_only {
            self.queue(output.body);
        }
        self.close_after_write = persist == Persist::Close;
        self.state = State::Writing;
        if cut_short && !self.rbuf.is_empty() {
            // A pipelined request the client expected to be served on this connection.
            self.rbuf.clear();
            // Its head was not read (nor its method): it gets the body too, and the
            // connection is closed after it.
            let reject = shutting_down("the server is shutting down".to_owned());
            self.queue(reject.reply().encode(Persist::Close));
        }
        self.drive(limits, submit)
    }

    /// Writes the body of a response whose head went out early.
    fn finish_early(
        &mut self,
        early: Early,
        output: Output,
        limits: &Limits,
        submit: &mut dyn FnMut(Job) -> bool,
    ) -> Life {
        self.state = State::Writing;
        self.close_after_write = true;
        if output.status != 200 {
            debug!(
                connection = self.token.0,
                status = output.status,
                "early answer failed: its body is cut short"
            );
        } else {
            match early {
                Early::Chunked(persist) => {
                    let (size, end) = wire::last_chunk(&output.body);
                    self.queue(size);
                    self.queue(output.body);
                    self.queue(end.to_vec());
                    self.close_after_write = self.draining || persist == Persist::Close;
                }
                Early::UntilClose => self.queue(output.body),
            }
        }
        if self.close_after_write {
            // A request pipelined behind it is not served.
            self.rbuf.clear();
        }
        self.drive(limits, submit)
    }

    /// Writes the head of the response to the request just handed over: `200`,
    /// before its body is known.
    fn answer_early(&mut self, persist: Persist) {
        let early = if self.http10 {
            Early::UntilClose
        } else {
            Early::Chunked(persist)
        };
        let persist = match early {
            Early::UntilClose => Persist::Close,
            Early::Chunked(persist) => persist,
        };
        self.queue(wire::encode_streamed_head(
            200,
            CONTENT_TYPE,
            early != Early::UntilClose,
            persist,
        ));
        self.early = Some(early);
    }

    fn queue(&mut self, bytes: impl Into<Payload>) {
        let bytes = bytes.into();
        if !bytes.is_empty() {
            self.out.push_back(bytes);
        }
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
        self.openwhisk = false;
        let (len, mut head) = match wire::parse_head(&self.rbuf, limits.max_head) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => return Step::NeedInput,
            Err(e) => {
                debug!(status = e.status, message = %e.message, "malformed request");
                self.respond(Reject::from(e).reply(), Persist::Close);
                return Step::Again;
            }
        };
        self.rbuf.drain(..len);
        self.head_only = head.method == "HEAD";
        self.openwhisk = head.path() == "/api/v1" || head.path().starts_with("/api/v1/");
        let api_key = auth::credentials(&head.headers);
        self.http10 = head.http10;
        let span = debug_span!("http_request", method = %head.method, path = %head.path());
        let persist = head.persist();
        // The key is checked on the head alone: a request without a valid one is
        // refused before anything else is looked at, its body never read.
        let gate = self.gate.clone();
        let Some(caller) = gate.caller(&head.headers) else {
            return self.refuse_at_head(&span, auth::unauthorized(), head.framing, persist);
        };
        if let Caller::Key(_) = caller {
            // The key is sprout's, not the function's: an app behind `/run` never sees it.
            head.headers
                .retain(|(n, _)| !n.eq_ignore_ascii_case("authorization"));
        }
        // The router judges the head before its body is read: a request it refuses
        // is refused without waiting for (or, with `100-continue`, asking for) the body.
        let route = routes::find(&head.method, &head.target)
            .and_then(|found| {
                let mut grant = caller.authorize(found.rule(), || found.namespace())?;
                // OpenWhisk hands an action its caller's key (`__OW_API_KEY`): only a
                // namespace's own key, which can do no more than the action's owner.
                // A `*` key (an operator's, a controller's) never reaches a function.
                if let Caller::Key(KeyScope::Namespace(_)) = caller {
                    grant.api_key = api_key;
                }
                found.into_route(head.content_type.as_deref(), &grant)
            })
            .map(|r| {
                r.with_headers(std::mem::take(&mut head.headers))
                    .with_openwhisk_wait(limits.openwhisk_wait)
            });
        if let Err(reject) = &route {
            if reject.status == 403 {
                let reject = reject.clone();
                return self.refuse_at_head(&span, reject, head.framing, persist);
            }
        }
        debug!(parent: &span, http10 = head.http10, keep_alive = head.keep_alive, "request");

        let body = match head.framing {
            Framing::Length(n) if n > limits.max_body as u64 => {
                // Answered without reading the body, which cannot be skipped: close.
                return self.reject(
                    &span,
                    wire::Error::body_too_large(Some(n), limits.max_body).into(),
                );
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
                self.queue(wire::CONTINUE.to_vec());
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
            Body::Chunked(chunked) => {
                match chunked.feed(&mut self.rbuf, limits.max_head, limits.max_body) {
                    Ok(true) => std::mem::take(&mut chunked.body),
                    Ok(false) => {
                        self.state = State::Body(pending);
                        return Step::NeedInput;
                    }
                    Err(e) => return self.reject(&pending.span, e.into()),
                }
            }
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
        self.changes += 1;
        match route.and_then(|r| r.into_dispatch(body)) {
            Ok(dispatch) => {
                let early = dispatch.answer.early;
                let job = Job {
                    token: self.token,
                    dispatch,
                    persist,
                    span: span.clone(),
                    abandon: Arc::clone(&self.abandon),
                };
                self.state = State::Waiting;
                if !submit(job) {
                    self.reject(
                        &span,
                        shutting_down("the server is shutting down".to_owned()),
                    );
                } else if early {
                    self.answer_early(persist);
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

    /// Answers `reject` to a request whose head was read, without reading its body:
    /// the connection stays open only if the request has no body.
    fn refuse_at_head(
        &mut self,
        span: &Span,
        reject: Reject,
        framing: Framing,
        persist: Persist,
    ) -> Step {
        let persist = match framing {
            Framing::Length(0) if !reject.close => persist,
            _ => Persist::Close,
        };
        debug!(parent: span, status = reject.status, kind = reject.kind, "refused");
        self.respond(reject.reply(), persist);
        Step::Again
    }

    /// Answers `reject` and closes the connection after it.
    fn reject(&mut self, span: &Span, reject: Reject) -> Step {
        debug!(parent: span, status = reject.status, kind = reject.kind, "refused");
        self.respond(reject.reply(), Persist::Close);
        Step::Again
    }

    fn respond(&mut self, reply: Reply, persist: Persist) {
        let reply = match self.openwhisk {
            true => super::reply::openwhisk_error(reply),
            false => reply,
        };
        self.queue(if self.head_only {
            reply.head(persist)
        } else {
            reply.encode(persist)
        });
        self.close_after_write = persist == Persist::Close;
        self.state = State::Writing;
    }

    /// Writes the queued output; true once all of it is written. Bytes the client
    /// takes are progress: the writing timeout starts again.
    fn flush(&mut self) -> io::Result<bool> {
        while !self.out.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut count = 0;
            for (i, segment) in self.out.iter().take(MAX_IOVECS).enumerate() {
                let skip = if i == 0 { self.opos } else { 0 };
                slices[i] = IoSlice::new(&segment[skip..]);
                count += 1;
            }
            match self.stream.write_vectored(&slices[..count]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.changes += 1;
                    self.advance_output(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.stream.pending() {
            match self.stream.flush() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Drops the first `n` bytes of the queued output.
    fn advance_output(&mut self, mut n: usize) {
        while let Some(front) = self.out.front() {
            let left = front.len() - self.opos;
            if n < left {
                self.opos += n;
                return;
            }
            n -= left;
            self.out.pop_front();
            self.opos = 0;
        }
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

impl Drop for Conn {
    /// A request of a connection that is gone is not wanted any more: one still
    /// waiting for an instance leaves its queue and never runs.
    fn drop(&mut self) {
        self.abandon.client_gone();
    }
}

/// The 503 for a request the server will not handle because it is shutting down.
fn shutting_down(message: String) -> Reject {
    Reject {
        status: 503,
        kind: "unavailable",
        message,
        allow: None,
        close: true,
    }
}

#[cfg(test)]
mod tests {
    use mio::net::UnixStream;

    use super::*;

    const LIMITS: Limits = Limits {
        max_body: 100,
        max_head: 256,
        read_timeout: Duration::from_millis(100),
        idle_timeout: Duration::from_millis(200),
        max_connections: 8,
        openwhisk_wait: Duration::from_secs(60),
    };

    #[test]
    fn timeouts_follow_the_stage_and_restart_with_each_change() {
        let (stream, _peer) = UnixStream::pair().unwrap();
        let mut c = Conn::new(Stream::Unix(stream), Token(7), Gate::Local);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Idle: the first sweep only notes it; the idle timeout counts from there.
        assert_eq!(c.expired(at(0), &LIMITS), None);
        assert_eq!(c.expired(at(199), &LIMITS), None);
        assert_eq!(c.expired(at(200), &LIMITS), Some(Stage::Idle));
        // Part of a head: a new stage, with the read timeout.
        c.rbuf.extend_from_slice(b"GET / HT");
        assert_eq!(c.stage(), Stage::Head);
        assert_eq!(c.expired(at(300), &LIMITS), None);
        assert_eq!(c.expired(at(399), &LIMITS), None);
        assert_eq!(c.expired(at(400), &LIMITS), Some(Stage::Head));
        // Handled: never times out, and the next idle stage starts afresh.
        c.state = State::Waiting;
        assert_eq!(c.expired(at(10_000), &LIMITS), None);
        c.state = State::Head;
        c.rbuf.clear();
        c.changes += 1;
        assert_eq!(c.expired(at(10_001), &LIMITS), None);
        assert_eq!(c.expired(at(10_150), &LIMITS), None);
        // The same stage again after a state change (the next keep-alive request)
        // restarts the count.
        c.changes += 1;
        assert_eq!(c.expired(at(10_250), &LIMITS), None);
        assert_eq!(c.expired(at(10_449), &LIMITS), None);
        assert_eq!(c.expired(at(10_450), &LIMITS), Some(Stage::Idle));
        // Output the client does not read counts as writing.
        c.queue(b"HTTP/1.1 200 OK\r\n".to_vec());
        assert_eq!(c.stage(), Stage::Writing);
        assert!(c.is_busy() && !c.is_waiting());
    }

    #[test]
    fn a_timed_out_head_is_answered_408_and_a_cut_off_request_503() {
        let (stream, peer) = UnixStream::pair().unwrap();
        let mut c = Conn::new(Stream::Unix(stream), Token(7), Gate::Local);
        c.rbuf.extend_from_slice(b"GET / HT");
        c.time_out(Stage::Head, &LIMITS);
        c.state = State::Waiting;
        c.cut_off(Some(Duration::from_millis(500)));
        drop(c);
        let mut peer = std::os::unix::net::UnixStream::from(std::os::fd::OwnedFd::from(peer));
        let mut got = String::new();
        peer.read_to_string(&mut got).unwrap();
        assert!(got.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{got}");
        assert!(got.contains("\"kind\":\"request_timeout\""), "{got}");
        assert!(
            got.contains("request head did not arrive within 100 ms"),
            "{got}"
        );
        let second = &got[got.find("HTTP/1.1 503").expect("a 503 follows")..];
        assert!(second.contains("shutdown grace of 500 ms"), "{second}");
    }

    /// The server's end of a connection and the client's.
    fn pair() -> (Conn, std::os::unix::net::UnixStream) {
        let (stream, peer) = UnixStream::pair().unwrap();
        let peer = std::os::unix::net::UnixStream::from(std::os::fd::OwnedFd::from(peer));
        peer.set_nonblocking(false).unwrap();
        (Conn::new(Stream::Unix(stream), Token(7), Gate::Local), peer)
    }

    fn drive(c: &mut Conn) -> (Life, Vec<Job>) {
        let mut jobs = Vec::new();
        let life = c.drive(&LIMITS, &mut |job| {
            jobs.push(job);
            true
        });
        (life, jobs)
    }

    fn ok(body: Vec<u8>) -> Output {
        Output {
            status: 200,
            headers: Vec::new(),
            body: body.into(),
            app: None,
        }
    }

    const KEEP: Persist = Persist::KeepAlive { http10: false };

    #[test]
    fn body_and_writing_timeouts_count_from_the_last_progress() {
        let (mut c, mut peer) = pair();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // A body that keeps arriving: each read restarts its read timeout (100 ms).
        peer.write_all(b"POST /run/f HTTP/1.1\r\nContent-Length: 10\r\n\r\n{\"a")
            .unwrap();
        assert_eq!(drive(&mut c).0, Life::Open);
        assert_eq!(c.stage(), Stage::Body);
        assert_eq!(c.expired(at(0), &LIMITS), None);
        assert_eq!(c.expired(at(99), &LIMITS), None);
        peer.write_all(b"\":").unwrap();
        assert_eq!(drive(&mut c).0, Life::Open);
        assert_eq!(c.expired(at(99), &LIMITS), None, "progress seen");
        assert_eq!(c.expired(at(198), &LIMITS), None, "timed from the progress");
        assert_eq!(c.expired(at(199), &LIMITS), Some(Stage::Body));
        peer.write_all(b"12345}").unwrap();
        let (_, jobs) = drive(&mut c);
        assert_eq!(jobs.len(), 1);

        // A large response the client reads slowly: each write restarts the writing
        // (idle) timeout, 200 ms.
        c.on_output(ok(vec![b'x'; 4 << 20]), KEEP, &LIMITS, &mut |_| true);
        assert_eq!(c.stage(), Stage::Writing);
        assert_eq!(c.expired(at(1000), &LIMITS), None);
        assert_eq!(c.expired(at(1199), &LIMITS), None);
        let mut chunk = vec![0u8; 64 << 10];
        peer.read_exact(&mut chunk).unwrap();
        assert_eq!(drive(&mut c).0, Life::Open);
        assert_eq!(c.stage(), Stage::Writing);
        assert_eq!(c.expired(at(1199), &LIMITS), None, "progress seen");
        assert_eq!(
            c.expired(at(1398), &LIMITS),
            None,
            "timed from the progress"
        );
        assert_eq!(c.expired(at(1399), &LIMITS), Some(Stage::Writing));
    }

    #[test]
    fn while_draining_the_response_is_the_last_and_a_pipelined_request_gets_503() {
        let (mut c, mut peer) = pair();
        peer.write_all(b"GET /status HTTP/1.1\r\n\r\nGET /status HTTP/1.1\r\n\r\n")
            .unwrap();
        let (_, jobs) = drive(&mut c);
        assert_eq!(jobs.len(), 1, "one request at a time");
        c.drain();
        // Asked for with keep-alive (a worker that finished before the drain).
        let life = c.on_output(ok(b"{}".to_vec()), KEEP, &LIMITS, &mut |_| true);
        assert_eq!(life, Life::Closed);
        drop(c);
        let mut got = String::new();
        peer.read_to_string(&mut got).unwrap();
        let (first, second) = got.split_at(got.find("HTTP/1.1 503").expect("a 503 follows"));
        assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
        assert!(first.contains("\r\nConnection: close\r\n"), "{got}");
        assert!(first.ends_with("\r\n\r\n{}"), "{got}");
        assert!(second.contains("\"kind\":\"unavailable\""), "{got}");
        assert!(second.contains("shutting down"), "{got}");
        assert_eq!(second.matches("HTTP/1.1").count(), 1, "{got}");

        // Not draining, a response keeps the connection and the next request is read.
        let (mut c, mut peer) = pair();
        peer.write_all(b"GET /status HTTP/1.1\r\n\r\nGET /status HTTP/1.1\r\n\r\n")
            .unwrap();
        drive(&mut c);
        let mut jobs = 0;
        let life = c.on_output(ok(b"{}".to_vec()), KEEP, &LIMITS, &mut |_| {
            jobs += 1;
            true
        });
        assert_eq!((life, jobs), (Life::Open, 1));
    }

    #[test]
    fn requests_begun_and_not_complete_are_answered_503_at_the_end() {
        for (sent, what) in [
            (
                &b"POST /run/f HTTP/1.1\r\nContent-Length: 10\r\n\r\n{\"a"[..],
                "body",
            ),
            (&b"GET /status HTTP/1.1\r\nHo"[..], "request head"),
        ] {
            let (mut c, mut peer) = pair();
            peer.write_all(sent).unwrap();
            drive(&mut c);
            c.cut_off(None);
            drop(c);
            let mut got = String::new();
            peer.read_to_string(&mut got).unwrap();
            assert!(got.starts_with("HTTP/1.1 503 "), "{got}");
            assert!(got.contains("\r\nConnection: close\r\n"), "{got}");
            assert!(
                got.contains(&format!("{what} had not arrived in full")),
                "{got}"
            );
        }
        // Nothing begun: nothing to say.
        let (mut c, mut peer) = pair();
        c.cut_off(None);
        drop(c);
        let mut got = String::new();
        peer.read_to_string(&mut got).unwrap();
        assert_eq!(got, "");
    }
}
