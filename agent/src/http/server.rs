//! The API server: one thread runs a mio event loop over the [`Listener`] and the
//! connections ([`Conn`]), a fixed pool of workers calls [`Handle::handle`] for each
//! complete request, fast calls are watched on the loop, and a drain ends it all.
//! It deals in the library's [`Request`](crate::request::Request) and
//! [`Response`](crate::request::Response), through [`routes`] and [`reply`]; the
//! bytes on the wire are [`conn`]'s and [`wire`](super::wire)'s. What it listens on
//! is a [`Listener`].

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use tracing::{debug, debug_span, error, info, warn};

use super::auth::{Gate, Keys};
use super::conn::{self, Conn, Job, Life};
use super::error::HttpError;
use super::limits::Limits;
use super::listener::{Listener, SocketFile};
use super::reply::{self, Output, Reject};
use super::wire::Persist;
use crate::error::Error;
use crate::transport::{Abandon, Abandoned, FastCall, FastPoll, Handle};

/// How long a fast call may take on the event loop before a thread of its own finishes it.
pub const FAST_BUDGET: Duration = Duration::from_millis(5);

/// After any activity (a request, an instance's answer) the loop polls without
/// sleeping for this long: an answer or a keep-alive client's next request that
/// arrives meanwhile then costs no wake-up of the loop's thread (on a VM, cross-CPU
/// wake-ups are most of a warm call's latency). An idle loop sleeps.
const SPIN: Duration = Duration::from_micros(100);

/// Instance sockets get tokens from here up; connections count up from [`FIRST_CONN`].
const FIRST_FAST: usize = 1 << 48;

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const TCP_LISTENER: Token = Token(2);
/// Connection tokens count up from here and are never reused, so a late response
/// cannot reach a newer connection.
pub(super) const FIRST_CONN: usize = 3;
/// How long to wait before accepting again after `accept` failed (e.g. `EMFILE`).
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// A bound, not yet running, API server.
#[derive(Debug)]
pub struct Server {
    listener: Listener,
    /// The TCP listener (`--listen`), and what it asks of requests.
    tcp: Option<(Listener, Gate)>,
    poll: Poll,
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    drain_ms: Arc<AtomicU64>,
    limits: Limits,
    socket: SocketFile,
}

/// Stops a running [`Server`]; cheap to clone and send to other threads.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    /// The grace of a drain asked for, in ms; [`NOT_DRAINING`] if none.
    drain_ms: Arc<AtomicU64>,
}

const NOT_DRAINING: u64 = u64::MAX;

impl ShutdownHandle {
    /// Makes [`Server::run`] return now: requests still being handled are answered
    /// 503 (as far as their clients can take it without waiting), connections are
    /// closed. Calling it before `run` makes `run` return at once.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake();
    }

    /// Makes [`Server::run`] stop accepting (the listener is closed), answer 503 to
    /// requests that have not started (still queued, or arriving on open
    /// connections), and return once the requests being handled are answered, or
    /// `grace` after this call, whichever is first; what is still running then is
    /// answered 503. [`ShutdownHandle::shutdown`] ends the grace early. Only the
    /// first call counts.
    pub fn drain(&self, grace: Duration) {
        let ms = u64::try_from(grace.as_millis())
            .unwrap_or(NOT_DRAINING - 1)
            .min(NOT_DRAINING - 1);
        let _ =
            self.drain_ms
                .compare_exchange(NOT_DRAINING, ms, Ordering::SeqCst, Ordering::SeqCst);
        self.wake();
    }

    fn wake(&self) {
        if let Err(e) = self.waker.wake() {
            warn!(error = %e, "could not wake the HTTP event loop");
        }
    }
}

/// A fast call the loop is waiting for.
struct InFlight {
    job: Job,
    call: Box<dyn FastCall>,
    fd: RawFd,
    handoff_at: Instant,
}

/// A worker's response, for the loop to send (its head is encoded there, so that
/// one sent while the server drains says `Connection: close`).
struct Done {
    token: Token,
    output: Output,
    persist: Persist,
}

impl Server {
    /// Binds `path`. An existing socket there is refused if something accepts
    /// connections on it, and removed if not (left by an agent that died).
    pub fn bind(path: &Path, limits: Limits) -> Result<Server, HttpError> {
        // From here on the socket file is removed again on any failure.
        let (mut listener, socket) = Listener::bind_unix(path)?;
        let event_loop = |source| HttpError::EventLoop {
            path: path.to_owned(),
            source,
        };
        let poll = Poll::new().map_err(event_loop)?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(event_loop)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(event_loop)?);
        debug!(socket = %path.display(), "bound");
        Ok(Server {
            listener,
            tcp: None,
            poll,
            waker,
            stop: Arc::new(AtomicBool::new(false)),
            drain_ms: Arc::new(AtomicU64::new(NOT_DRAINING)),
            limits,
            socket,
        })
    }

    /// Serves the same API on a TCP address too (port 0: any free one), with TLS if
    /// `tls` is given. Requests must carry one of `keys` (HTTP basic auth); `None`
    /// serves without keys, and is refused unless `addr` is a loopback address.
    /// Returns the bound address.
    pub fn listen(
        &mut self,
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
        keys: Option<Keys>,
    ) -> Result<SocketAddr, HttpError> {
        let gate = match keys {
            Some(keys) => Gate::Keys(Arc::new(keys)),
            None if addr.ip().is_loopback() => Gate::Open,
            None => return Err(HttpError::OpenNotLoopback { addr }),
        };
        let mut listener = Listener::bind_tcp(addr, tls)?;
        let bound = listener.local_addr().unwrap_or(addr);
        self.poll
            .registry()
            .register(&mut listener, TCP_LISTENER, Interest::READABLE)
            .map_err(|source| HttpError::RegisterTcp { addr, source })?;
        debug!(address = %bound, "bound");
        self.tcp = Some((listener, gate));
        Ok(bound)
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.socket.path
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            waker: Arc::clone(&self.waker),
            stop: Arc::clone(&self.stop),
            drain_ms: Arc::clone(&self.drain_ms),
        }
    }

    /// Serves until [`ShutdownHandle::shutdown`], or the end of a
    /// [`ShutdownHandle::drain`], with `workers` threads calling `handler` (at least
    /// one). Removes the socket file before returning.
    ///
    /// Returning does not wait for requests the workers are still handling: their
    /// clients are answered 503, the threads finish them, drop the responses and exit.
    pub fn run(self, handler: Arc<dyn Handle>, workers: usize) -> Result<(), HttpError> {
        let Server {
            listener,
            tcp,
            mut poll,
            waker,
            stop,
            drain_ms,
            limits,
            socket,
        } = self;
        let _span = debug_span!("http_server", socket = %socket.path.display()).entered();
        // Taken (closed) when the server starts draining.
        let mut listener = Some((listener, Gate::Local));
        let mut tcp = tcp;

        let (job_tx, job_rx) = crossbeam_channel::unbounded::<Job>();
        let (done_tx, done_rx) = mpsc::channel::<Done>();
        for index in 0..workers.max(1) {
            let worker = Worker {
                jobs: job_rx.clone(),
                done: done_tx.clone(),
                handler: Arc::clone(&handler),
                waker: Arc::clone(&waker),
                stop: Arc::clone(&stop),
            };
            thread::Builder::new()
                .name(format!("sprout-http-{index}"))
                .spawn(move || worker.run())
                .map_err(|source| HttpError::Worker { index, source })?;
        }
        // Fast calls that need waiting are finished on threads of their own, never by
        // the workers: every worker may be blocked waiting for the very instance such
        // a call holds.
        let finish_tx = done_tx;

        let mut conns: HashMap<Token, Conn> = HashMap::new();
        let mut next_token = FIRST_CONN;
        let mut events = Events::with_capacity(256);
        let registry = poll
            .registry()
            .try_clone()
            .map_err(|source| HttpError::EventLoop {
                path: socket.path.clone(),
                source,
            })?;
        let fast: RefCell<HashMap<Token, InFlight>> = RefCell::new(HashMap::new());
        let next_fast = Cell::new(FIRST_FAST);
        // Once draining, requests that arrive are refused (503) instead of submitted.
        let draining = Cell::new(false);
        let mut submit = |job: Job| -> bool {
            if draining.get() {
                return false;
            }
            let Some(call) = handler.start_fast(&job.dispatch.request) else {
                return job_tx.send(job).is_ok();
            };
            let token = Token(next_fast.replace(next_fast.get() + 1));
            let fd = call.fd();
            if registry
                .register(&mut SourceFd(&fd), token, Interest::READABLE)
                .is_err()
            {
                finish_elsewhere(job, call, &finish_tx, &waker);
                return true;
            }
            let handoff_at = Instant::now() + FAST_BUDGET;
            fast.borrow_mut().insert(
                token,
                InFlight {
                    job,
                    call,
                    fd,
                    handoff_at,
                },
            );
            true
        };
        let mut retry_accept = false;
        let mut spin_until = Instant::now();
        let sweep_every = limits.sweep_every();
        let mut next_sweep = Instant::now() + sweep_every;
        // When the drain's grace ends, and the grace.
        let mut drain: Option<(Instant, Duration)> = None;
        // Set when the grace ran out with requests still being handled.
        let mut cut_after: Option<Duration> = None;
        info!(
            workers = workers.max(1),
            max_connections = limits.max_connections,
            "serving"
        );

        while !stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            if drain.is_none() {
                let ms = drain_ms.load(Ordering::SeqCst);
                if ms != NOT_DRAINING {
                    let grace = Duration::from_millis(ms);
                    drain = Some((now + grace, grace));
                    draining.set(true);
                    // Closing the listeners refuses new connections at once.
                    for (mut l, _) in listener.take().into_iter().chain(tcp.take()) {
                        let _ = poll.registry().deregister(&mut l);
                    }
                    retry_accept = false;
                    // Requests still queued give up and are answered 503.
                    for conn in conns.values_mut() {
                        conn.drain();
                    }
                    let busy = conns.values().filter(|c| c.is_busy()).count();
                    info!(grace_ms = ms, busy, "draining");
                }
            }
            if let Some((deadline, grace)) = drain {
                if conns.values().all(|c| !c.is_busy()) {
                    info!("drained");
                    break;
                }
                if now >= deadline {
                    cut_after = Some(grace);
                    let busy = conns.values().filter(|c| c.is_busy()).count();
                    warn!(
                        grace_ms = grace.as_millis() as u64,
                        busy, "shutdown grace over"
                    );
                    break;
                }
            }

            // Hand calls that outlast the budget to the workers.
            let expired: Vec<Token> = fast
                .borrow()
                .iter()
                .filter(|(_, f)| f.handoff_at <= now)
                .map(|(t, _)| *t)
                .collect();
            for token in expired {
                if let Some(f) = fast.borrow_mut().remove(&token) {
                    let _ = registry.deregister(&mut SourceFd(&f.fd));
                    finish_elsewhere(f.job, f.call, &finish_tx, &waker);
                }
            }

            // Timeouts: a sweep every so often, never a timer per request.
            if now >= next_sweep {
                next_sweep = now + sweep_every;
                let expired: Vec<(Token, conn::Stage)> = conns
                    .iter_mut()
                    .filter_map(|(t, c)| c.expired(now, &limits).map(|p| (*t, p)))
                    .collect();
                for (token, phase) in expired {
                    if let Some(conn) = conns.get_mut(&token) {
                        debug!(connection = token.0, ?phase, "timed out");
                        conn.time_out(phase, &limits);
                    }
                    close(poll.registry(), &mut conns, token);
                }
            }

            let mut wake_at = fast.borrow().values().map(|f| f.handoff_at).min();
            if !conns.is_empty() {
                wake_at = Some(wake_at.map_or(next_sweep, |at| at.min(next_sweep)));
            }
            if let Some((deadline, _)) = drain {
                wake_at = Some(wake_at.map_or(deadline, |at| at.min(deadline)));
            }
            let mut timeout = wake_at.map(|at| at.saturating_duration_since(now));
            if retry_accept {
                timeout = Some(timeout.map_or(ACCEPT_RETRY, |t| t.min(ACCEPT_RETRY)));
            }
            if now < spin_until {
                timeout = Some(Duration::ZERO);
            }
            match poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(HttpError::Poll {
                        path: socket.path.clone(),
                        source,
                    })
                }
            }
            if !events.is_empty() {
                spin_until = Instant::now() + SPIN;
            }
            if retry_accept {
                retry_accept = false;
                for l in listener.iter().chain(tcp.iter()) {
                    retry_accept |=
                        !accept(l, poll.registry(), &mut conns, &mut next_token, &limits);
                }
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER | TCP_LISTENER => {
                        let l = if event.token() == LISTENER {
                            &listener
                        } else {
                            &tcp
                        };
                        if let Some(l) = l {
                            retry_accept |=
                                !accept(l, poll.registry(), &mut conns, &mut next_token, &limits)
                        }
                    }
                    WAKER => {
                        while let Ok(done) = done_rx.try_recv() {
                            let Some(conn) = conns.get_mut(&done.token) else {
                                continue;
                            };
                            if conn.on_output(done.output, done.persist, &limits, &mut submit)
                                == Life::Closed
                            {
                                close(poll.registry(), &mut conns, done.token);
                            }
                        }
                    }
                    token if token.0 >= FIRST_FAST => {
                        let polled = match fast.borrow_mut().get_mut(&token) {
                            Some(f) => f.call.poll(),
                            None => continue,
                        };
                        if matches!(polled, FastPoll::Pending) {
                            continue;
                        }
                        let Some(f) = fast.borrow_mut().remove(&token) else {
                            continue;
                        };
                        let _ = registry.deregister(&mut SourceFd(&f.fd));
                        let FastPoll::Done(result) = polled else {
                            finish_elsewhere(f.job, f.call, &finish_tx, &waker);
                            continue;
                        };
                        let job = f.job;
                        // Only inline results get here (a shared one is handed off):
                        // nothing large is copied on the loop.
                        let output = reply::reply_for(result, &job.dispatch.answer);
                        if let Some(conn) = conns.get_mut(&job.token) {
                            if conn.on_output(output, job.persist, &limits, &mut submit)
                                == Life::Closed
                            {
                                close(poll.registry(), &mut conns, job.token);
                            }
                        }
                    }
                    token => {
                        let Some(conn) = conns.get_mut(&token) else {
                            continue;
                        };
                        // Closed or reset while its request is handled (a half-close
                        // only ends what the client sends, and it still gets its
                        // answer): the request is taken back as the connection is
                        // dropped. The event is edge-triggered: a hang-up that came
                        // with the request's last bytes is not reported again, so it
                        // is checked after they are read and the request submitted.
                        let gone = event.is_write_closed() || event.is_error();
                        if conn.is_waiting() && gone {
                            debug!(connection = token.0, "client went away");
                            close(poll.registry(), &mut conns, token);
                            continue;
                        }
                        if conn.drive(&limits, &mut submit) == Life::Closed {
                            close(poll.registry(), &mut conns, token);
                        } else if gone && conn.is_waiting() {
                            debug!(connection = token.0, "client went away with its request");
                            close(poll.registry(), &mut conns, token);
                        }
                    }
                }
            }
        }

        info!(connections = conns.len(), "shutting down");
        // Requests still being handled are answered 503 rather than dropped.
        for conn in conns.values_mut() {
            conn.cut_off(cut_after);
        }
        // Calls still in flight give their instances back as they are dropped.
        for (_, f) in fast.into_inner() {
            let _ = registry.deregister(&mut SourceFd(&f.fd));
        }
        // Workers skip queued jobs and exit once the queue is closed.
        drop(job_tx);
        drop(conns);
        drop(listener);
        drop(tcp);
        drop(socket);
        Ok(())
    }
}

/// Accepts every pending connection; false if `accept` failed and should be retried.
/// Past `limits.max_connections` open from this listener, a connection is answered
/// 503 and closed at once. Each listener counts its own: clients on the network,
/// keys or not, cannot keep the Unix socket's out.
fn accept(
    (listener, gate): &(Listener, Gate),
    registry: &Registry,
    conns: &mut HashMap<Token, Conn>,
    next: &mut usize,
    limits: &Limits,
) -> bool {
    let local = matches!(gate, Gate::Local);
    // Counted only when all connections together reach the limit.
    let full = |conns: &HashMap<Token, Conn>| {
        conns.len() >= limits.max_connections
            && conns.values().filter(|c| c.is_local() == local).count() >= limits.max_connections
    };
    loop {
        match listener.accept() {
            Ok(mut stream) if full(conns) => {
                debug!(
                    max_connections = limits.max_connections,
                    "refused a connection"
                );
                // One write into the new socket's empty buffer; the client may read it.
                let _ = stream.write(&too_many_connections(limits.max_connections));
            }
            Ok(mut stream) => {
                let token = Token(*next);
                *next += 1;
                if let Err(e) =
                    registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                {
                    warn!(error = %e, "could not register a connection");
                    continue;
                }
                debug!(connection = token.0, "accepted");
                conns.insert(token, Conn::new(stream, token, gate.clone()));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                warn!(error = %e, "accept failed");
                return false;
            }
        }
    }
}

/// The answer to a connection past the limit.
fn too_many_connections(max: usize) -> Vec<u8> {
    let reject = Reject {
        status: 503,
        kind: "too_many_connections",
        message: format!(
            "the server already has {max} connections open on this socket, the most it accepts (max_connections)"
        ),
        allow: None,
        close: true,
    };
    reject.reply().encode(Persist::Close)
}

fn close(registry: &Registry, conns: &mut HashMap<Token, Conn>, token: Token) {
    if let Some(mut conn) = conns.remove(&token) {
        let _ = registry.deregister(conn.stream());
        debug!(connection = token.0, "closed");
    }
}

/// Finishes a fast call the blocking way on a thread of its own, and hands the reply
/// to the loop like a worker does.
fn finish_elsewhere(job: Job, call: Box<dyn FastCall>, done: &Sender<Done>, waker: &Arc<Waker>) {
    let (done, waker) = (done.clone(), Arc::clone(waker));
    let spawned = thread::Builder::new()
        .name("sprout-finish".into())
        .spawn(move || {
            let _entered = job.span.enter();
            let reply = match panic::catch_unwind(AssertUnwindSafe(|| call.finish())) {
                Ok(result) => reply::reply_for(result, &job.dispatch.answer),
                Err(_) => {
                    error!("finishing a call panicked");
                    reply::panicked()
                }
            };
            let _ = done.send(Done {
                token: job.token,
                output: reply,
                persist: job.persist,
            });
            let _ = waker.wake();
        });
    if let Err(e) = spawned {
        // The call (and its instance) is dropped: the instance is destroyed and the
        // client's connection gets no answer until it gives up.
        error!(error = %e, "could not start a thread to finish a call");
    }
}

struct Worker {
    jobs: Receiver<Job>,
    done: Sender<Done>,
    handler: Arc<dyn Handle>,
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
}

impl Worker {
    #[allow(clippy::result_large_err)]
    fn run(self) {
        loop {
            let job = self.jobs.recv();
            let Ok(Job {
                token,
                dispatch,
                persist,
                span,
                abandon,
            }) = job
            else {
                return;
            };
            if self.stop.load(Ordering::SeqCst) {
                continue;
            }
            let _entered = span.enter();
            // An acknowledged request (the invoker's early `200`) was promised to run:
            // its client going away takes back its answer, not the work, whose record
            // is still written.
            let acknowledged = dispatch.answer.early;
            let draining = match abandon.get() {
                // Nobody to answer, and nothing to do.
                Some(Abandoned::ClientGone) if !acknowledged => {
                    debug!("client gone before its request started");
                    continue;
                }
                Some(Abandoned::Draining) => true,
                Some(Abandoned::ClientGone) | None => false,
            };
            let started = Instant::now();
            let handler = &self.handler;
            let kept = Abandon::default();
            let abandon_run = if acknowledged { &kept } else { &*abandon };
            let reply = if draining {
                // Not started when the drain began: refused like a new request.
                reply::reply_for(Err(Error::ShuttingDown), &dispatch.answer)
            } else {
                let run = || handler.handle_abandonable(dispatch.request, abandon_run);
                match panic::catch_unwind(AssertUnwindSafe(run)) {
                    Ok(result) => reply::reply_for(result, &dispatch.answer),
                    Err(_) => {
                        error!("request handler panicked");
                        reply::panicked()
                    }
                }
            };
            if let Some(Abandoned::ClientGone) = abandon.get() {
                debug!("client gone: response dropped");
                continue;
            }
            // While the server drains, the connection makes it the last response
            // (`Conn::on_output`), and answers a request pipelined behind it 503.
            debug!(
                status = reply.status,
                elapsed_us = started.elapsed().as_micros() as u64,
                "response"
            );
            let done = Done {
                token,
                output: reply,
                persist,
            };
            if self.done.send(done).is_err() {
                return;
            }
            if let Err(e) = self.waker.wake() {
                warn!(error = %e, "could not wake the HTTP event loop");
            }
        }
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
