//! The agent's call socket: how a function calls a function it cannot run in its own
//! sandbox, and how it learns whether it can.
//!
//! This module is the socket's event loop (accept, read frames, admit or refuse,
//! write answers); [`book`] keeps each sandbox's session, calls and connections,
//! [`workers`] runs the calls, [`answer`] encodes answers, and [`peer`] tells who is
//! calling.
//!
//! The socket is `agent.sock` in the runtime directory, which every sandbox sees
//! read-only at `/.sprout`; an instance connects once, on its first call. The agent
//! tells which sandbox a connection comes from by its peer's cgroup, so a function
//! cannot speak for another sandbox.
//!
//! **Bounded.** One thread, an event loop (`mio`, as the HTTP API), accepts, reads
//! frames and writes answers for every connection; the calls themselves run on a
//! small pool of workers ([`workers::Workers`], at most [`MAX_WORKERS`] threads, started on
//! demand and ended when idle), so the agent's threads grow with neither frames nor
//! connections. Per sandbox: at most [`book::MAX_CONNECTIONS_PER_SANDBOX`] connections (a
//! further one is closed at once), and at most `max_calls_in_flight` calls and
//! resolves in flight (a further one is answered at once with `call_refused`, kind
//! `too_many_calls`). A frame left half-sent for [`FRAME_TIMEOUT`] closes its
//! connection (and every descriptor it carried).
//!
//! **Workers, not a thread per call, and why they cannot deadlock.** A call holds its
//! worker while it waits for an instance of its callee and for the callee's answer,
//! and the callee may itself call through the agent. A pool that every worker of
//! which waits on a call that needs a worker would stall; so a job of call depth `d`
//! starts only while fewer than `MAX_WORKERS - (MAX_CALL_DEPTH - d)` workers are busy,
//! and the deepest waiting job goes first. Workers held by calls of depth `d` or less
//! then never exceed `MAX_WORKERS - (MAX_CALL_DEPTH - d)`, so a call of depth `d + 1`
//! always finds a worker once deeper calls (which need none beyond the limit) finish.
//! The agent's request workers are not used: a client's request holding one while its
//! function's call waits for another would be exactly that stall.
//!
//! **Owned by the invocation.** The agent keeps, per sandbox, the invocation running
//! there (its *session*: begun by [`book::Book::begin`] when the agent sends an invoke,
//! ended by [`book::Book::end`] when it reads the answer). A call belongs to the session
//! running when the agent reads its frame and ends with it: queued calls are dropped
//! and running ones cancelled (their siblings destroyed) when the invocation ends,
//! whatever the runtime reports. Frames the invocation sent that the agent has not
//! read yet when it ends are read and dropped before the invocation's end completes.
//! Frames from a sandbox with no invocation running (a process left behind) belong to
//! its idle session, which ends when the next invocation begins or the sandbox goes.
//!
//! **Depth.** The agent counts call depth itself: a call's depth is its caller's
//! invocation's depth + 1 (at least; a claim in the frame can only raise it), refused
//! past [`ipc::proto::MAX_CALL_DEPTH`].
//!
//! **Answers.** An answer goes out on the loop, from a per-connection queue; the worker
//! keeps the callee's instance (and its place in the run) until its answer is written
//! (or the invocation that made the call ended), so a caller that does not read holds
//! a sibling, but for at most [`REPLY_TIMEOUT`]: an answer not written within that of
//! being ready closes the connection. The loop stops reading a connection with
//! [`OUTBOX_PAUSE`] answers queued. Closing a connection (the caller's end closed, a
//! bad frame) drops the calls not yet started and every answer still to come.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipc::frame::PREFIX_LEN;
use ipc::proto::{CallReply, CallRequest, RefusalKind};
use ipc::{Channel, Message, Payload};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use serde_json::value::RawValue;

use crate::error::Error;

mod answer;
pub(crate) mod book;
mod peer;
mod workers;

use answer::Outgoing;
use book::Refusal;
pub(crate) use workers::Parts;
use workers::{Job, Work, Workers, MAX_WORKERS};

/// The call socket's file name in the runtime directory.
pub const SOCKET_NAME: &str = "agent.sock";
/// How long an answer may wait for its caller to read it.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a frame may stay half-sent.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(5);
/// Answers queued on a connection before the loop stops reading it.
const OUTBOX_PAUSE: usize = 64;

const LISTENER: Token = Token(0);
const WAKE: Token = Token(1);

/// Binds the call socket in `runtime_dir`.
pub fn bind(runtime_dir: &Path) -> Result<UnixListener, Error> {
    let path = runtime_dir.join(SOCKET_NAME);
    let _ = std::fs::remove_file(&path);
    UnixListener::bind(&path).map_err(|source| Error::State { path, source })
}

// ------------------------------------------------------------------ the loop

/// Serves the call socket until the agent shuts down ([`book::Book::stop`]).
pub fn serve(parts: &Arc<Parts>, listener: UnixListener) {
    let mut server = match Server::new(parts, listener) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "call socket: cannot start its event loop");
            return;
        }
    };
    server.run();
    parts.book.loop_stopped();
    server.workers.stop();
}

struct Server {
    parts: Arc<Parts>,
    poll: Poll,
    listener: UnixListener,
    conns: HashMap<Token, Conn>,
    next_token: usize,
    workers: Arc<Workers>,
}

/// One connection on the call socket.
struct Conn {
    sandbox: String,
    channel: Channel,
    /// Cleared when it closes: its queued calls are dropped.
    alive: Arc<AtomicBool>,
    /// Bytes read, and bytes of the frames taken (at most the frames' real size:
    /// more than that is left only by a header padded with blanks), so a frame is
    /// half-sent when `received > consumed`.
    received: u64,
    consumed: u64,
    partial_since: Option<Instant>,
    outbox: VecDeque<Outgoing>,
    /// Not read while its answers pile up (it reads none).
    paused: bool,
}

impl Server {
    fn new(parts: &Arc<Parts>, listener: UnixListener) -> io::Result<Server> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        listener.set_nonblocking(true)?;
        poll.registry().register(
            &mut SourceFd(&listener.as_raw_fd()),
            LISTENER,
            Interest::READABLE,
        )?;
        parts.book.set_waker(waker.clone());
        Ok(Server {
            parts: parts.clone(),
            poll,
            listener,
            conns: HashMap::new(),
            next_token: 2,
            workers: Arc::new(Workers::new(parts.clone(), waker, MAX_WORKERS)),
        })
    }

    fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            // Checked before each wait: a shutdown that came before the waker was set
            // (the loop not started yet) is seen here.
            if self.parts.book.is_stopping() {
                return;
            }
            let timeout = self
                .next_deadline()
                .map(|d| d.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "call socket: poll");
                return;
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => {
                        if !self.accept() {
                            return;
                        }
                    }
                    WAKE => {}
                    token => {
                        if event.is_readable() || event.is_read_closed() {
                            self.pump(token, false);
                        }
                        if event.is_writable() {
                            self.flush(token);
                        }
                    }
                }
            }
            // Cheap when there is nothing: two locks.
            self.deliver_answers();
            self.drain_ended();
            self.expire();
            if self.parts.book.is_stopping() {
                return;
            }
        }
    }

    /// Accepts what is waiting; `false` once the agent is shutting down.
    fn accept(&mut self) -> bool {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "call socket: accept");
                    return true;
                }
            };
            if self.parts.book.is_stopping() {
                return false;
            }
            let sandbox =
                match peer::caller_sandbox(&self.parts.runs, &self.parts.sandboxes, &stream) {
                    Ok(id) => id,
                    Err(e) => {
                        tracing::warn!(error = %e, "call socket: refused a connection");
                        continue;
                    }
                };
            if let Err(max) = self.parts.book.connect(&sandbox) {
                tracing::warn!(
                    sandbox_id = %sandbox,
                    max_connections = max,
                    "call socket: refused a connection: the sandbox has {max} open already"
                );
                continue;
            }
            let token = Token(self.next_token);
            self.next_token += 1;
            let registered = stream.set_nonblocking(true).and_then(|()| {
                self.poll.registry().register(
                    &mut SourceFd(&stream.as_raw_fd()),
                    token,
                    Interest::READABLE | Interest::WRITABLE,
                )
            });
            if let Err(e) = registered {
                tracing::warn!(error = %e, "call socket: register a connection");
                self.parts.book.disconnect(&sandbox);
                continue;
            }
            tracing::debug!(sandbox_id = %sandbox, "call socket: connected");
            self.conns.insert(token, Conn::new(sandbox, stream));
            self.pump(token, false);
        }
    }

    fn close(&mut self, token: Token, why: Option<&str>) {
        let Some(conn) = self.conns.remove(&token) else {
            return;
        };
        if let Some(why) = why {
            tracing::warn!(sandbox_id = %conn.sandbox, "call socket: {why}; closing the connection");
        } else {
            tracing::debug!(sandbox_id = %conn.sandbox, "call socket: the caller closed its connection");
        }
        conn.alive.store(false, Ordering::SeqCst);
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&conn.channel.stream().as_raw_fd()));
        let _ = conn.channel.stream().shutdown(std::net::Shutdown::Both);
        self.parts.book.disconnect(&conn.sandbox);
        // Dropping it closes the socket, the descriptors it carried, and releases
        // the workers waiting for their answers to go out.
    }

    /// Reads and handles what `token` sent (`drain`: drops it instead), and writes
    /// the answers that gives.
    fn pump(&mut self, token: Token, drain: bool) {
        loop {
            let Some(conn) = self.conns.get_mut(&token) else {
                return;
            };
            if let Err(why) = pump(&self.parts, &self.workers, token, conn, drain) {
                return self.close(token, why.as_deref());
            }
            if let Err(e) = flush(conn) {
                tracing::debug!(error = %e, "call socket: caller went away before its answer");
                return self.close(token, None);
            }
            if !(conn.paused && conn.outbox.len() < OUTBOX_PAUSE / 2) {
                return;
            }
            conn.paused = false;
        }
    }

    fn flush(&mut self, token: Token) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        if let Err(e) = flush(conn) {
            tracing::debug!(error = %e, "call socket: caller went away before its answer");
            return self.close(token, None);
        }
        if conn.paused && conn.outbox.len() < OUTBOX_PAUSE / 2 {
            conn.paused = false;
            self.pump(token, false);
        }
    }

    fn deliver_answers(&mut self) {
        let answers = self.workers.take_answers();
        let mut touched = Vec::new();
        for (token, out) in answers {
            if let Some(conn) = self.conns.get_mut(&token) {
                conn.outbox.push_back(out);
                touched.push(token);
            }
        }
        touched.dedup();
        for token in touched {
            self.flush(token);
        }
    }

    /// Reads out the connections of sandboxes whose invocation ended, dropping what
    /// it sent, before the end of the invocation completes.
    fn drain_ended(&mut self) {
        let sandboxes = self.parts.book.take_drains();
        for sandbox in sandboxes {
            let tokens: Vec<Token> = self
                .conns
                .iter()
                .filter(|(_, c)| c.sandbox == sandbox)
                .map(|(t, _)| *t)
                .collect();
            for token in tokens {
                self.pump(token, true);
            }
            self.parts.book.drained(&sandbox);
        }
    }

    /// Closes the connections past a deadline.
    fn expire(&mut self) {
        let now = Instant::now();
        let expired: Vec<(Token, &'static str)> = self
            .conns
            .iter()
            .filter_map(|(t, c)| match c.deadline() {
                Some((at, why)) if at <= now => Some((*t, why)),
                _ => None,
            })
            .collect();
        for (token, why) in expired {
            self.close(token, Some(why));
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.conns
            .values()
            .filter_map(|c| c.deadline().map(|(at, _)| at))
            .min()
    }
}

impl Conn {
    /// Queues an answer that refuses a request at once (no payload).
    fn refuse(&mut self, reply: &CallReply) {
        self.outbox
            .push_back(Outgoing::answer(reply, Payload::default()));
    }

    /// A new connection heard as `sandbox`'s, nothing read or queued yet.
    fn new(sandbox: String, stream: UnixStream) -> Conn {
        Conn {
            sandbox,
            channel: Channel::new(stream),
            alive: Arc::new(AtomicBool::new(true)),
            received: 0,
            consumed: 0,
            partial_since: None,
            outbox: VecDeque::new(),
            paused: false,
        }
    }

    /// When this connection must be closed if nothing changes, and why.
    fn deadline(&self) -> Option<(Instant, &'static str)> {
        let answer = self.outbox.front().map(|o| {
            (
                o.ready_at + REPLY_TIMEOUT,
                "the caller does not read its answers (5 s)",
            )
        });
        let frame = self
            .partial_since
            .map(|at| (at + FRAME_TIMEOUT, "a frame was left half-sent (5 s)"));
        match (answer, frame) {
            (Some(a), Some(f)) => Some(if a.0 <= f.0 { a } else { f }),
            (a, f) => a.or(f),
        }
    }
}

/// Reads what `conn` sent and handles each frame (or, with `drain`, drops it).
/// `Err(why)` closes the connection (`None`: the caller closed it).
fn pump(
    parts: &Arc<Parts>,
    workers: &Arc<Workers>,
    token: Token,
    conn: &mut Conn,
    drain: bool,
) -> Result<(), Option<String>> {
    let mut dropped = 0usize;
    let outcome = loop {
        if !drain && conn.outbox.len() >= OUTBOX_PAUSE {
            conn.paused = true;
            break Ok(());
        }
        match conn.channel.try_recv::<Box<RawValue>>() {
            Ok(Some(msg)) => {
                conn.consumed += frame_len(&msg);
                if drain {
                    dropped += 1;
                } else if let Err(e) = handle(parts, workers, token, conn, msg) {
                    break Err(Some(e));
                }
                continue;
            }
            Ok(None) => {}
            Err(e) => break Err(Some(format!("bad request: {}", ipc::chain(&e)))),
        }
        if conn.paused && !drain {
            break Ok(());
        }
        match conn.channel.fill_nonblocking() {
            Ok(0) => break Err(None),
            Ok(n) => conn.received += n as u64,
            Err(ipc::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
            Err(ipc::Error::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.is_peer_gone() => break Err(None),
            Err(e) => break Err(Some(format!("bad request: {}", ipc::chain(&e)))),
        }
    };
    if dropped > 0 {
        tracing::debug!(sandbox_id = %conn.sandbox, dropped, "call socket: dropped the requests of an invocation that ended");
    }
    if conn.received > conn.consumed {
        conn.partial_since.get_or_insert_with(Instant::now);
    } else {
        conn.partial_since = None;
    }
    outcome
}

/// Bytes a frame took on the stream, at most: its header as the JSON value (a header
/// padded with blanks counts short, which only makes its sender look half-sent).
fn frame_len(msg: &Message<Box<RawValue>>) -> u64 {
    let inline = if msg.payload.is_shared() {
        0
    } else {
        msg.payload.len()
    };
    (PREFIX_LEN + msg.header.get().len() + inline) as u64
}

/// Handles one request on the loop: refuses it at once, or hands it to a worker.
fn handle(
    parts: &Arc<Parts>,
    workers: &Arc<Workers>,
    token: Token,
    conn: &mut Conn,
    msg: Message<Box<RawValue>>,
) -> Result<(), String> {
    let request: CallRequest =
        serde_json::from_str(msg.header.get()).map_err(|e| format!("bad request: {e}"))?;
    let (id, function, claimed) = match &request {
        CallRequest::Resolve { id, function } => (*id, function.clone(), None),
        CallRequest::Call {
            id,
            function,
            spec: Some(_),
            ..
        } => {
            let reply = CallReply::CallFailed {
                id: *id,
                function: function.clone(),
                message: "a call with a spec runs in the sandbox: send it to the shim".into(),
            };
            conn.refuse(&reply);
            return Ok(());
        }
        CallRequest::Bind { id, function, .. } => {
            let reply = CallReply::CallFailed {
                id: *id,
                function: function.clone(),
                message: "direct channels are made by the sandbox's shim: send bind to it".into(),
            };
            conn.refuse(&reply);
            return Ok(());
        }
        // Unanswered by design, and meaningless here: nothing is bound through the agent.
        CallRequest::Unbind { .. } => return Ok(()),
        CallRequest::Call {
            id,
            function,
            depth,
            ..
        } => (*id, function.clone(), Some(*depth)),
    };
    let cap = parts.max_calls_in_flight.max(1);
    let admitted = match parts.book.admit(&conn.sandbox, &function, claimed, cap) {
        Ok(a) => a,
        Err(Refusal::Drained) => return Ok(()),
        Err(refusal) => {
            let reply = match refusal {
                Refusal::TooMany(cap) => {
                    tracing::debug!(sandbox_id = %conn.sandbox, cap, "call socket: too many calls in flight");
                    let message = format!(
                        "too_many_calls: the sandbox has {cap} calls in flight, the most it may \
                         (max_calls_in_flight, sprout serve --max-calls-per-sandbox); the call \
                         to {function:?} did not run"
                    );
                    CallReply::CallRefused {
                        id,
                        function,
                        kind: RefusalKind::TooManyCalls,
                        message,
                    }
                }
                Refusal::TooDeep(message) | Refusal::Failed(message) => CallReply::CallFailed {
                    id,
                    function,
                    message,
                },
                Refusal::Gone | Refusal::Drained => CallReply::CallFailed {
                    id,
                    function,
                    message: "the calling sandbox is gone".to_owned(),
                },
            };
            conn.refuse(&reply);
            return Ok(());
        }
    };
    let work = match request {
        CallRequest::Resolve { .. } => Work::Resolve,
        CallRequest::Bind { .. } | CallRequest::Unbind { .. } => {
            unreachable!("answered above")
        }
        CallRequest::Call { raw, .. } => match parts.runs.run_of(&conn.sandbox) {
            Ok(run) => Work::Call {
                raw,
                event: msg.payload,
                run,
            },
            Err(e) => {
                parts.book.done(&conn.sandbox);
                let message = format!("start a workflow run: {e}");
                conn.refuse(&CallReply::CallFailed {
                    id,
                    function,
                    message,
                });
                return Ok(());
            }
        },
    };
    workers.submit(Job {
        token,
        alive: conn.alive.clone(),
        sandbox: conn.sandbox.clone(),
        id,
        function,
        depth: admitted.depth,
        cancel: admitted.cancel,
        cause: admitted.cause,
        work,
    });
    Ok(())
}

/// Writes what `conn` has queued, as far as the socket takes it.
fn flush(conn: &mut Conn) -> nix::Result<()> {
    use nix::sys::socket::{send, sendmsg, ControlMessage, MsgFlags};
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    let fd = conn.channel.stream().as_fd().as_raw_fd();
    while let Some(out) = conn.outbox.front_mut() {
        let shared_fd = out
            .shared
            .as_ref()
            .and_then(|p| p.shared_fd())
            .map(|fd| fd.as_raw_fd());
        let sent = match shared_fd {
            // The descriptor goes with the frame's first byte.
            Some(memfd) if out.sent == 0 => {
                let fds = [memfd];
                sendmsg::<()>(
                    fd,
                    &[IoSlice::new(&out.bytes)],
                    &[ControlMessage::ScmRights(&fds)],
                    flags,
                    None,
                )
            }
            _ => send(fd, &out.bytes[out.sent..], flags),
        };
        match sent {
            Ok(n) => {
                out.sent += n;
                if out.sent >= out.bytes.len() {
                    conn.outbox.pop_front();
                }
            }
            Err(nix::errno::Errno::EAGAIN) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc::payload::SHARED_THRESHOLD;

    #[test]
    fn a_sandbox_may_write_the_largest_shared_payload() {
        // A shared payload is a memfd the sender writes: its size is bound by the
        // sandbox's RLIMIT_FSIZE.
        assert!(ipc::payload::MAX_SHARED_PAYLOAD as u64 <= rootfs::MAX_FILE_SIZE);
    }

    const SB: &str = "sprout-1-1";

    fn conn(stream: UnixStream) -> Conn {
        stream.set_nonblocking(true).unwrap();
        Conn::new(SB.into(), stream)
    }

    #[test]
    fn answers_written_on_the_loop_are_frames_the_caller_reads() {
        let (agent_end, caller_end) = UnixStream::pair().unwrap();
        let mut c = conn(agent_end);
        let small = Payload::Inline(b"[1,2]".to_vec());
        let big = Payload::Inline(vec![b'7'; SHARED_THRESHOLD + 1]);
        c.outbox.push_back(Outgoing::answer(
            &CallReply::CallReturned { id: 1, raw: false },
            small,
        ));
        c.outbox.push_back(Outgoing::answer(
            &CallReply::CallReturned { id: 2, raw: false },
            big,
        ));
        flush(&mut c).unwrap();
        assert!(c.outbox.is_empty());
        let mut caller = Channel::new(caller_end);
        let one = caller.recv::<CallReply>().unwrap();
        assert_eq!(one.header, CallReply::CallReturned { id: 1, raw: false });
        assert_eq!(&*one.payload, b"[1,2]");
        let two = caller.recv::<CallReply>().unwrap();
        assert_eq!(two.header, CallReply::CallReturned { id: 2, raw: false });
        assert!(two.payload.is_shared(), "a large answer goes in a memfd");
        assert_eq!(two.payload.len(), SHARED_THRESHOLD + 1);
    }

    #[test]
    fn an_answer_the_socket_cannot_take_waits_in_the_queue() {
        let (agent_end, caller_end) = UnixStream::pair().unwrap();
        let mut c = conn(agent_end);
        for id in 0..64 {
            let payload = Payload::Inline(vec![b'1'; 60_000]);
            c.outbox.push_back(Outgoing::answer(
                &CallReply::CallReturned { id, raw: false },
                payload,
            ));
        }
        flush(&mut c).unwrap();
        let left = c.outbox.len();
        assert!(left > 0 && left < 64, "{left} answers left");
        let (due, why) = c.deadline().unwrap();
        assert!(due <= Instant::now() + REPLY_TIMEOUT, "{why}");
        assert!(why.contains("does not read"), "{why}");
        drop(caller_end);
        // The caller is gone: the next write fails (and the loop closes the connection).
        assert!(flush(&mut c).is_err());
    }

    #[test]
    fn a_frame_is_half_sent_until_its_last_byte() {
        let (agent_end, caller_end) = UnixStream::pair().unwrap();
        let inner_less = |c: &mut Conn| -> Vec<Message<Box<RawValue>>> {
            let mut got = Vec::new();
            loop {
                if let Some(m) = c.channel.try_recv::<Box<RawValue>>().unwrap() {
                    c.consumed += frame_len(&m);
                    got.push(m);
                    continue;
                }
                match c.channel.fill_nonblocking() {
                    Ok(n) => c.received += n as u64,
                    Err(ipc::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{}", ipc::chain(&e)),
                }
            }
            got
        };
        let mut c = conn(agent_end);
        let sender = Channel::new(caller_end);
        let call = CallRequest::Call {
            id: 1,
            function: "g".into(),
            depth: 1,
            raw: false,
            spec: None,
        };
        sender.send(&call, b"{\"a\": 1}", &[]).unwrap();
        assert_eq!(inner_less(&mut c).len(), 1);
        assert_eq!(c.received, c.consumed, "a whole frame is not half-sent");
        // Half a frame.
        use std::io::Write;
        let mut raw = sender.stream();
        raw.write_all(&[6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, b'{'])
            .unwrap();
        assert!(inner_less(&mut c).is_empty());
        assert!(c.received > c.consumed);
        raw.write_all(b"\"\":1}").unwrap();
        assert_eq!(inner_less(&mut c).len(), 1);
        assert_eq!(c.received, c.consumed);
    }
}
