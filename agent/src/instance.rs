//! A warm function instance: one sandbox, its shim, and the instance forked from the
//! sandbox's zygote. The agent talks to the instance directly over the channel the
//! shim handed over, and reads the instance's stdout/stderr pipes itself.

use std::fs::File;
use std::io::ErrorKind as IoKind;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant, SystemTime};

use ipc::api::Logs;
use ipc::proto::{
    CallReply, CallSpec, FunctionError, HttpApp, HttpHead, HttpRequest, InstanceEvent,
    InstanceLink, ShimLink,
};
use ipc::Payload;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use pool::Sandbox;
use serde::de::DeserializeOwned;

use crate::activations::{Mark, StreamLog, TimedLogs};
use crate::sandbox_output::Got;

/// How long a new sandbox's shim may take to report ready.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug)]
pub struct Instance {
    pub sandbox: Sandbox,
    /// Kept open for the sandbox's life (closing it makes the shim exit); workflow
    /// steps that run in this sandbox go through it.
    pub shim: ShimLink,
    pub link: InstanceLink,
    pub pid: i32,
    /// The function it runs: its namespace and name.
    pub function: crate::names::FunctionKey,
    pub function_version: u64,
    /// Memory (MiB) counted against the agent's budget for this sandbox.
    pub reserved_mb: u64,
    /// When it last finished an invocation (or was started).
    pub last_used: Instant,
    pub stdout: Output,
    pub stderr: Output,
    /// Whether the handler called other functions during the last invocation.
    pub called: bool,
    /// The sandbox's OOM notification, set up once with the instance (none if the
    /// memory cgroup could not be watched): waits for an answer end as soon as the OOM
    /// killer kills a process in the sandbox, whoever holds the channel.
    pub oom: Option<pool::OomWatch>,
    /// What kind of HTTP app its handler module is, as it reported when it loaded
    /// (`None`: a plain function).
    pub http: Option<HttpApp>,
    /// Whether the request it is answering was sent with [`Instance::begin_http`]:
    /// only such a request may be answered `responded` (a status and headers of the
    /// instance's choice), never an invoke or a call.
    pub http_pending: bool,
}

/// What a call returned: JSON text, or bytes (`raw`) for a caller that is a function;
/// or an HTTP app's body, with its status and headers in `http` (unchecked).
#[derive(Debug)]
pub struct Answer {
    pub payload: Payload,
    pub raw: bool,
    pub http: Option<HttpHead>,
}

/// Why a call to an instance did not return a result.
#[derive(Debug)]
pub enum CallFailure {
    Raised(FunctionError),
    /// The deadline passed; the instance is still running.
    TimedOut,
    /// The instance's channel closed: it died (killed, crashed, out of memory).
    Died,
    /// The workflow it was part of ended (another step failed, or its caller left).
    Cancelled,
    /// The shim could not complete a call in the sandbox (its message says why).
    Failed(String),
    Protocol(ipc::Error),
}

/// One of an instance's output pipes and what it captured for the current invocation.
#[derive(Debug)]
pub struct Output {
    pipe: File,
    open: bool,
    captured: Vec<u8>,
    truncated: bool,
    /// Newlines in `captured`.
    lines: usize,
    /// When each chunk was read, and the newlines captured by its end (the record's
    /// line times).
    marks: Vec<Mark>,
}

impl Output {
    pub fn new(fd: OwnedFd) -> std::io::Result<Output> {
        crate::sandbox_output::set_nonblocking(&fd)?;
        Ok(Output {
            pipe: File::from(fd),
            open: true,
            captured: Vec::new(),
            truncated: false,
            lines: 0,
            marks: Vec::new(),
        })
    }

    /// Reads whatever is in the pipe now, keeping at most `limit` bytes.
    fn drain(&mut self, limit: usize) {
        let mut buf = [0u8; 16 << 10];
        while self.open {
            match crate::sandbox_output::read_pipe(&mut self.pipe, &mut buf) {
                Got::Bytes(n) => {
                    let room = limit.saturating_sub(self.captured.len());
                    let kept = &buf[..n.min(room)];
                    self.captured.extend_from_slice(kept);
                    self.truncated |= n > room;
                    if !kept.is_empty() {
                        self.lines += kept.iter().filter(|&&b| b == b'\n').count();
                        self.marks.push(Mark {
                            lines: self.lines,
                            at: SystemTime::now(),
                        });
                    }
                }
                Got::Empty => break,
                Got::Closed => self.open = false,
            }
        }
    }

    fn take(&mut self) -> (String, bool) {
        let text = String::from_utf8_lossy(&self.captured).into_owned();
        self.captured.clear();
        self.lines = 0;
        self.marks.clear();
        (text, std::mem::take(&mut self.truncated))
    }

    /// [`Output::take`] with the read times of its chunks.
    fn take_timed(&mut self) -> (StreamLog, bool) {
        let marks = std::mem::take(&mut self.marks);
        let (text, truncated) = self.take();
        (StreamLog { text, marks }, truncated)
    }
}

impl Instance {
    /// The output captured since the last call.
    pub fn take_logs(&mut self) -> Logs {
        let (stdout, t1) = self.stdout.take();
        let (stderr, t2) = self.stderr.take();
        Logs {
            stdout,
            stderr,
            truncated: t1 || t2,
        }
    }

    /// [`Instance::take_logs`] with when each line was read (the activation record's).
    pub fn take_timed_logs(&mut self) -> TimedLogs {
        let (stdout, t1) = self.stdout.take_timed();
        let (stderr, t2) = self.stderr.take_timed();
        TimedLogs {
            stdout,
            stderr,
            truncated: t1 || t2,
        }
    }

    fn drain_outputs(&mut self, log_limit: usize) {
        self.stdout.drain(log_limit);
        self.stderr.drain(log_limit);
    }

    /// Sends invocation `id` at call depth `depth` (the sandbox is `Running` until its
    /// answer is read). `raw`: the event is bytes from a calling function.
    pub fn begin(
        &mut self,
        id: u64,
        event: &Payload,
        depth: u32,
        raw: bool,
    ) -> Result<(), CallFailure> {
        self.begin_activation(id, event, depth, raw, None)
    }

    /// [`Instance::begin`] with an OpenWhisk activation's environment (exported for
    /// this invocation only; `None`: a plain invoke).
    pub fn begin_activation(
        &mut self,
        id: u64,
        event: &Payload,
        depth: u32,
        raw: bool,
        env: Option<std::collections::BTreeMap<String, String>>,
    ) -> Result<(), CallFailure> {
        self.sandbox
            .start_invocation()
            .map_err(|_| CallFailure::Died)?;
        self.called = false;
        self.http_pending = false;
        self.link
            .send_activation(id, depth, raw, env, event)
            .map_err(|e| match e {
                e if e.is_peer_gone() => CallFailure::Died,
                other => CallFailure::Protocol(other),
            })
    }

    /// Sends HTTP request `id` to an instance that is an HTTP app; `body` is its body.
    pub fn begin_http(
        &mut self,
        id: u64,
        request: &HttpRequest,
        body: &Payload,
    ) -> Result<(), CallFailure> {
        self.sandbox
            .start_invocation()
            .map_err(|_| CallFailure::Died)?;
        self.called = false;
        self.http_pending = true;
        self.link.send_http(id, request, body).map_err(|e| match e {
            e if e.is_peer_gone() => CallFailure::Died,
            other => CallFailure::Protocol(other),
        })
    }

    /// Has the shim run `spec` in this sandbox (a workflow's sequential step, at depth
    /// 0) and waits for the answer until `deadline`, or until `cancel` is readable.
    pub fn shim_call(
        &mut self,
        id: u64,
        spec: &CallSpec,
        event: &Payload,
        deadline: Instant,
        log_limit: usize,
        cancel: Option<BorrowedFd<'_>>,
    ) -> Result<Answer, CallFailure> {
        self.sandbox
            .start_invocation()
            .map_err(|_| CallFailure::Died)?;
        self.shim
            .send_call(id, 0, false, spec, event)
            .map_err(|e| match e {
                e if e.is_peer_gone() => CallFailure::Died,
                other => CallFailure::Protocol(other),
            })?;
        let msg = self.wait_frame::<CallReply>(true, deadline, log_limit, cancel)?;
        self.drain_outputs(log_limit);
        let answer = match msg.header {
            CallReply::CallReturned { id: got, raw } if got == id => Ok(Answer {
                payload: msg.payload,
                raw,
                http: None,
            }),
            CallReply::CallRaised { id: got, error, .. } if got == id => {
                Err(CallFailure::Raised(error))
            }
            CallReply::CallFailed {
                id: got, message, ..
            } if got == id => Err(CallFailure::Failed(message)),
            other => {
                return Err(CallFailure::Protocol(ipc::Error::Unexpected {
                    op: format!("{other:?}"),
                    expected: "call_returned",
                }))
            }
        };
        let _ = self.sandbox.end_invocation();
        answer
    }

    /// Takes the answer to `id` from a received frame; the sandbox is `Bound` again.
    fn answer(
        &mut self,
        msg: ipc::Message<InstanceEvent>,
        id: u64,
        log_limit: usize,
    ) -> Result<Answer, CallFailure> {
        // Everything the handler printed was flushed before its answer.
        self.drain_outputs(log_limit);
        let answer = match msg.header {
            InstanceEvent::Returned {
                id: got,
                raw,
                called,
            } if got == id => {
                self.called = called;
                Ok(Answer {
                    payload: msg.payload,
                    raw,
                    http: None,
                })
            }
            InstanceEvent::Responded {
                id: got,
                head,
                called,
            } if got == id && self.http_pending => {
                self.called = called;
                Ok(Answer {
                    payload: msg.payload,
                    raw: false,
                    http: Some(head),
                })
            }
            InstanceEvent::Raised {
                id: got,
                error,
                called,
            } if got == id => {
                self.called = called;
                Err(CallFailure::Raised(error))
            }
            other => {
                return Err(CallFailure::Protocol(ipc::Error::Unexpected {
                    op: format!("{other:?}"),
                    expected: if self.http_pending {
                        "responded"
                    } else {
                        "returned (responded answers only an http request)"
                    },
                }))
            }
        };
        let _ = self.sandbox.end_invocation();
        answer
    }

    /// The answer to `id` if it has arrived; reads what the socket holds and never
    /// blocks (for the HTTP event loop).
    pub fn try_finish(&mut self, id: u64, log_limit: usize) -> Option<Result<Answer, CallFailure>> {
        loop {
            match self.link.0.fill_nonblocking() {
                Ok(0) => {
                    self.drain_outputs(log_limit);
                    return Some(Err(CallFailure::Died));
                }
                Ok(_) => {}
                Err(ipc::Error::Io(e)) if e.kind() == IoKind::WouldBlock => break,
                Err(e) if e.is_peer_gone() => return Some(Err(CallFailure::Died)),
                Err(e) => return Some(Err(CallFailure::Protocol(e))),
            }
        }
        match self.link.0.try_recv::<InstanceEvent>() {
            Ok(Some(msg)) => Some(self.answer(msg, id, log_limit)),
            Ok(None) => None,
            Err(e) => Some(Err(CallFailure::Protocol(e))),
        }
    }

    /// Waits for the answer to `id` until `deadline` (or until `cancel` is readable),
    /// capturing output meanwhile.
    pub fn finish(
        &mut self,
        id: u64,
        deadline: Instant,
        log_limit: usize,
        cancel: Option<BorrowedFd<'_>>,
    ) -> Result<Answer, CallFailure> {
        let msg = self.wait_frame::<InstanceEvent>(false, deadline, log_limit, cancel)?;
        self.answer(msg, id, log_limit)
    }

    /// Waits for the next frame on the instance's channel (or the shim's, `from_shim`)
    /// until `deadline`, draining the output pipes meanwhile. A readable `cancel` ends
    /// the wait with [`CallFailure::Cancelled`]; an OOM kill in the sandbox with
    /// [`CallFailure::Died`] (reported as out of memory), even when a process the
    /// instance started still holds its channel open.
    fn wait_frame<H: DeserializeOwned>(
        &mut self,
        from_shim: bool,
        deadline: Instant,
        log_limit: usize,
        cancel: Option<BorrowedFd<'_>>,
    ) -> Result<ipc::Message<H>, CallFailure> {
        loop {
            let channel = if from_shim {
                &mut self.shim.0
            } else {
                &mut self.link.0
            };
            // A frame may already be buffered from an earlier read.
            if let Some(msg) = channel.try_recv::<H>().map_err(CallFailure::Protocol)? {
                return Ok(msg);
            }
            let now = Instant::now();
            if now >= deadline {
                self.drain_outputs(log_limit);
                return Err(CallFailure::TimedOut);
            }
            let mut wait_for = deadline - now;
            // An OOM notified and not yet followed by its kill: look again soon.
            if let Some(soon) = self.oom.as_ref().and_then(|w| w.recheck_in()) {
                wait_for = wait_for.min(soon);
            }
            let wait = PollTimeout::try_from(wait_for).unwrap_or(PollTimeout::MAX);
            let channel = if from_shim {
                &self.shim.0
            } else {
                &self.link.0
            };
            let mut fds = vec![PollFd::new(channel.as_fd(), PollFlags::POLLIN)];
            let mut which = Vec::with_capacity(2);
            for (i, out) in [&self.stdout, &self.stderr].into_iter().enumerate() {
                if out.open {
                    fds.push(PollFd::new(out.pipe.as_fd(), PollFlags::POLLIN));
                    which.push(i);
                }
            }
            let oom_slot = self.oom.as_ref().map(|w| {
                fds.push(PollFd::new(w.fd(), w.poll_flags()));
                fds.len() - 1
            });
            if let Some(c) = cancel {
                fds.push(PollFd::new(c, PollFlags::POLLIN));
            }
            let polled = poll(&mut fds, wait);
            let ready: Vec<bool> = fds.iter().map(|f| f.any().unwrap_or(true)).collect();
            drop(fds);
            if let Some(slot) = oom_slot {
                let w = self.oom.as_mut().expect("watched");
                let notified = matches!(polled, Ok(n) if n > 0) && ready[slot];
                if (notified || w.recheck_in().is_some()) && w.killed(notified) {
                    tracing::debug!(sandbox_id = self.sandbox.id(), "OOM kill in the sandbox");
                    self.drain_outputs(log_limit);
                    return Err(CallFailure::Died);
                }
            }
            match polled {
                Err(nix::errno::Errno::EINTR) | Ok(0) => continue,
                Err(e) => return Err(CallFailure::Protocol(ipc::Error::Io(e.into()))),
                Ok(_) => {}
            }
            for (slot, &i) in which.iter().enumerate() {
                if ready[slot + 1] {
                    if i == 0 {
                        self.stdout.drain(log_limit)
                    } else {
                        self.stderr.drain(log_limit)
                    }
                }
            }
            if cancel.is_some() && ready[ready.len() - 1] {
                self.drain_outputs(log_limit);
                return Err(CallFailure::Cancelled);
            }
            if ready[0] {
                let channel = if from_shim {
                    &mut self.shim.0
                } else {
                    &mut self.link.0
                };
                match channel.fill() {
                    Ok(0) => {
                        self.drain_outputs(log_limit);
                        return Err(CallFailure::Died);
                    }
                    Ok(_) => {}
                    Err(e) if e.is_peer_gone() => return Err(CallFailure::Died),
                    Err(e) => return Err(CallFailure::Protocol(e)),
                }
            }
        }
    }

    /// Waits until the instance imported its handler, or `deadline`; records whether
    /// it is an HTTP app.
    pub fn wait_loaded(&mut self, deadline: Instant) -> Result<(), CallFailure> {
        let now = Instant::now();
        let stream = self.link.0.stream();
        let _ = stream.set_read_timeout(Some(
            deadline
                .saturating_duration_since(now)
                .max(Duration::from_millis(1)),
        ));
        let loaded = self.link.wait_loaded();
        let _ = self.link.0.stream().set_read_timeout(None);
        match loaded {
            Ok(Ok(http)) => {
                self.http = http;
                Ok(())
            }
            Ok(Err(error)) => Err(CallFailure::Raised(error)),
            Err(ipc::Error::Closed) | Err(ipc::Error::Truncated) => Err(CallFailure::Died),
            Err(ipc::Error::Io(e)) if matches!(e.kind(), IoKind::WouldBlock | IoKind::TimedOut) => {
                Err(CallFailure::TimedOut)
            }
            Err(e) => Err(CallFailure::Protocol(e)),
        }
    }
}
