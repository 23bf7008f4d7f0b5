//! The agent's HTTP/1.1 API on a Unix socket (`docs/api.md`).
//!
//! One thread runs a mio event loop that accepts connections, parses requests with
//! `httparse` and writes responses; a fixed pool of worker threads turns each
//! complete request into a [`Request`], calls [`Handle::handle`] and encodes the
//! answer, which comes back to the loop through a channel and a [`mio::Waker`].
//!
//! Warm invokes skip the workers: [`Handle::start_fast`] sends the invocation to an
//! idle instance right away, the loop watches the instance's socket, and writes the
//! response when the answer is there ([`FastCall`]). A call that needs waiting — a
//! failure to clean up after, or one still running after [`FAST_BUDGET`] (its output
//! must keep being drained) — is finished on a thread of its own (not by a worker:
//! every worker may be waiting for the very instance that call holds).
//! Routes and the mapping of errors to status codes live in [`routes`], the
//! per-connection state machine (keep-alive, pipelining, chunked bodies,
//! `Expect: 100-continue`) in [`conn`].

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use mio::net::UnixListener;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use tracing::{debug, debug_span, error, info, warn, Span};

use crate::error::Error;
use crate::request::{Request, Response};

mod conn;
mod routes;

use conn::{Conn, Life};
pub use routes::{status_for, COLD_HEADER, DURATION_HEADER, START_HEADER};
use routes::{Dispatch, Persist};

/// An invocation in flight whose instance answers on a socket the event loop watches.
pub trait FastCall: Send {
    /// The socket to watch for the answer.
    fn fd(&self) -> RawFd;
    /// Reads what the socket holds, without blocking.
    fn poll(&mut self) -> FastPoll;
    /// Finishes the call the blocking way (on a thread of its own).
    #[allow(clippy::result_large_err)]
    fn finish(self: Box<Self>) -> Result<Response, Error>;
}

/// What a [`FastCall`] has after reading.
pub enum FastPoll {
    Pending,
    #[allow(clippy::large_enum_variant)]
    Done(Result<Response, Error>),
    /// The call needs waiting: finish it with [`FastCall::finish`].
    Handoff,
}

/// How long a fast call may take on the event loop before a thread of its own finishes it.
pub const FAST_BUDGET: Duration = Duration::from_millis(5);

/// After any activity (a request, an instance's answer) the loop polls without
/// sleeping for this long: an answer or a keep-alive client's next request that
/// arrives meanwhile then costs no wake-up of the loop's thread (on a VM, cross-CPU
/// wake-ups are most of a warm call's latency). An idle loop sleeps.
const SPIN: Duration = Duration::from_micros(100);

/// Instance sockets get tokens from here up; connections count up from [`FIRST_CONN`].
const FIRST_FAST: usize = 1 << 48;

/// What the server dispatches parsed requests to: the agent, or a fake in tests.
pub trait Handle: Send + Sync + 'static {
    // The agent's `Error` carries captured logs; it is returned once per request.
    #[allow(clippy::result_large_err)]
    fn handle(&self, req: Request) -> Result<Response, Error>;

    /// Starts `req` so that it completes on the event loop, when it can: the agent
    /// does so for warm invokes of an idle, running instance. `None` (the default)
    /// sends the request to a worker.
    fn start_fast(&self, _req: &Request) -> Option<Box<dyn FastCall>> {
        None
    }
}

/// Size limits on requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request body (after chunked decoding); larger ones get 413.
    pub max_body: usize,
    /// Largest request head (request line and headers); larger ones get 431.
    pub max_head: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_body: 64 << 20,
            max_head: 64 << 10,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("another agent serves on {path}")]
    InUse { path: PathBuf },
    #[error("{path} exists and is not a socket")]
    NotASocket { path: PathBuf },
    #[error("check for a server on {path}")]
    Probe {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("remove stale socket {path}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("bind {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("set up the event loop for {path}")]
    EventLoop {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("wait for events on {path}")]
    Poll {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("start HTTP worker thread {index}")]
    Worker {
        index: usize,
        #[source]
        source: io::Error,
    },
}

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
/// Connection tokens count up from here and are never reused, so a late response
/// cannot reach a newer connection.
const FIRST_CONN: usize = 2;
/// How long to wait before accepting again after `accept` failed (e.g. `EMFILE`).
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// A bound, not yet running, API server.
#[derive(Debug)]
pub struct Server {
    listener: UnixListener,
    poll: Poll,
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    limits: Limits,
    socket: SocketFile,
}

/// Stops a running [`Server`]; cheap to clone and send to other threads.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
}

impl ShutdownHandle {
    /// Makes [`Server::run`] return; connections are closed and responses still
    /// being computed are dropped. Calling it before `run` makes `run` return at once.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            warn!(error = %e, "could not wake the HTTP event loop");
        }
    }
}

/// A request handed to a worker.
struct Job {
    token: Token,
    dispatch: Dispatch,
    persist: Persist,
    span: Span,
}

/// A fast call the loop is waiting for.
struct InFlight {
    job: Job,
    call: Box<dyn FastCall>,
    fd: RawFd,
    handoff_at: Instant,
}

/// A worker's encoded response.
struct Done {
    token: Token,
    bytes: Vec<u8>,
    close: bool,
}

impl Server {
    /// Binds `path`. An existing socket there is refused if something accepts
    /// connections on it, and removed if not (left by an agent that died).
    pub fn bind(path: &Path, limits: Limits) -> Result<Server, HttpError> {
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                match std::os::unix::net::UnixStream::connect(path) {
                    Ok(_) => {
                        return Err(HttpError::InUse {
                            path: path.to_owned(),
                        })
                    }
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        info!(socket = %path.display(), "removing stale socket");
                        match fs::remove_file(path) {
                            Ok(()) => {}
                            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                            Err(source) => {
                                return Err(HttpError::RemoveStale {
                                    path: path.to_owned(),
                                    source,
                                })
                            }
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(HttpError::Probe {
                            path: path.to_owned(),
                            source,
                        })
                    }
                }
            }
            Ok(_) => {
                return Err(HttpError::NotASocket {
                    path: path.to_owned(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(HttpError::Probe {
                    path: path.to_owned(),
                    source,
                })
            }
        }

        let mut listener = UnixListener::bind(path).map_err(|source| HttpError::Bind {
            path: path.to_owned(),
            source,
        })?;
        // From here on the socket file is removed again on any failure.
        let socket = SocketFile::new(path);
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
            poll,
            waker,
            stop: Arc::new(AtomicBool::new(false)),
            limits,
            socket,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.socket.path
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            waker: Arc::clone(&self.waker),
            stop: Arc::clone(&self.stop),
        }
    }

    /// Serves until [`ShutdownHandle::shutdown`], with `workers` threads calling
    /// `handler` (at least one). Removes the socket file before returning.
    ///
    /// Returning does not wait for requests the workers are still handling: their
    /// threads finish them, drop the responses and exit.
    pub fn run(self, handler: Arc<dyn Handle>, workers: usize) -> Result<(), HttpError> {
        let Server {
            listener,
            mut poll,
            waker,
            stop,
            limits,
            socket,
        } = self;
        let _span = debug_span!("http_server", socket = %socket.path.display()).entered();

        let (job_tx, job_rx) = mpsc::channel::<Job>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (done_tx, done_rx) = mpsc::channel::<Done>();
        for index in 0..workers.max(1) {
            let worker = Worker {
                jobs: Arc::clone(&job_rx),
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
        let mut submit = |job: Job| -> bool {
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
        info!(workers = workers.max(1), "serving");

        while !stop.load(Ordering::SeqCst) {
            // Hand calls that outlast the budget to the workers.
            let now = Instant::now();
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
            let next_handoff = fast.borrow().values().map(|f| f.handoff_at).min();

            let timeout = match (retry_accept.then_some(ACCEPT_RETRY), next_handoff) {
                (retry, Some(at)) => {
                    let until = at.saturating_duration_since(now);
                    Some(retry.map_or(until, |r| r.min(until)))
                }
                (retry, None) => retry,
            };
            let timeout = if now < spin_until {
                Some(Duration::ZERO)
            } else {
                timeout
            };
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
                retry_accept = !accept(&listener, poll.registry(), &mut conns, &mut next_token);
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => {
                        retry_accept =
                            !accept(&listener, poll.registry(), &mut conns, &mut next_token)
                    }
                    WAKER => {
                        while let Ok(done) = done_rx.try_recv() {
                            let Some(conn) = conns.get_mut(&done.token) else {
                                continue;
                            };
                            if conn.on_reply(done.bytes, done.close, &limits, &mut submit)
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
                        let bytes =
                            routes::reply_for(result, job.dispatch.logs).encode(job.persist);
                        let close_after = job.persist == Persist::Close;
                        if let Some(conn) = conns.get_mut(&job.token) {
                            if conn.on_reply(bytes, close_after, &limits, &mut submit)
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
                        if conn.drive(&limits, &mut submit) == Life::Closed {
                            close(poll.registry(), &mut conns, token);
                        }
                    }
                }
            }
        }

        info!(connections = conns.len(), "shutting down");
        // Calls still in flight give their instances back as they are dropped.
        for (_, f) in fast.into_inner() {
            let _ = registry.deregister(&mut SourceFd(&f.fd));
        }
        // Workers skip queued jobs and exit once the queue is closed.
        drop(job_tx);
        drop(conns);
        drop(listener);
        drop(socket);
        Ok(())
    }
}

/// Accepts every pending connection; false if `accept` failed and should be retried.
fn accept(
    listener: &UnixListener,
    registry: &Registry,
    conns: &mut HashMap<Token, Conn>,
    next: &mut usize,
) -> bool {
    loop {
        match listener.accept() {
            Ok((mut stream, _)) => {
                let token = Token(*next);
                *next += 1;
                if let Err(e) =
                    registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                {
                    warn!(error = %e, "could not register a connection");
                    continue;
                }
                debug!(connection = token.0, "accepted");
                conns.insert(token, Conn::new(stream, token));
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
                Ok(result) => routes::reply_for(result, job.dispatch.logs),
                Err(_) => {
                    error!("finishing a call panicked");
                    routes::panicked()
                }
            };
            let close = job.persist == Persist::Close;
            let _ = done.send(Done {
                token: job.token,
                bytes: reply.encode(job.persist),
                close,
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
    jobs: Arc<Mutex<Receiver<Job>>>,
    done: Sender<Done>,
    handler: Arc<dyn Handle>,
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
}

impl Worker {
    #[allow(clippy::result_large_err)]
    fn run(self) {
        loop {
            let job = match self.jobs.lock() {
                Ok(jobs) => jobs.recv(),
                Err(poisoned) => poisoned.into_inner().recv(),
            };
            let Ok(Job {
                token,
                dispatch,
                persist,
                span,
            }) = job
            else {
                return;
            };
            if self.stop.load(Ordering::SeqCst) {
                continue;
            }
            let _entered = span.enter();
            let started = Instant::now();
            let handler = &self.handler;
            let run = || handler.handle(dispatch.request);
            let reply = match panic::catch_unwind(AssertUnwindSafe(run)) {
                Ok(result) => routes::reply_for(result, dispatch.logs),
                Err(_) => {
                    error!("request handler panicked");
                    routes::panicked()
                }
            };
            debug!(
                status = reply.status,
                elapsed_us = started.elapsed().as_micros() as u64,
                "response"
            );
            let done = Done {
                token,
                bytes: reply.encode(persist),
                close: persist == Persist::Close,
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

/// The bound socket's file, removed on drop if it is still the one we bound.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
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

#[cfg(test)]
mod tests;
