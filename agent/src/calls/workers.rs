//! The workers that run calls for the call socket's loop: a pool of at most
//! [`MAX_WORKERS`] threads, started on demand and ended when idle, that takes the
//! deepest waiting call first and keeps a reserve for deeper ones (see [`super`] for
//! why it cannot deadlock); and what one call or resolve does.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use ipc::proto::{check_depth, CallReply, MAX_CALL_DEPTH};
use ipc::Payload;
use mio::{Token, Waker};
use parking_lot::{Condvar, Mutex};

use crate::calls::answer::Outgoing;
use crate::calls::book::Book;
use crate::error::Error;
use crate::invoke::{CallOpts, Invoker};
use crate::registry::Registry;
use crate::run::{Cancel, Run};
use crate::runs::Runs;
use crate::sandboxes::Sandboxes;

/// Threads running calls, at most.
pub const MAX_WORKERS: usize = 256;
/// Workers kept when idle; the others end after [`WORKER_IDLE`].
const KEEP_WORKERS: usize = 4;
const WORKER_IDLE: Duration = Duration::from_secs(10);
/// How often a worker waiting for its answer to go out checks that its call is live.
const ANSWER_CHECK: Duration = Duration::from_millis(50);

/// What the call socket uses of the agent: it resolves callers and callees, runs
/// calls, and keeps its book (the server holds it too).
#[derive(Debug)]
pub(crate) struct Parts {
    pub invoker: Arc<Invoker>,
    pub registry: Arc<Registry>,
    pub runs: Arc<Runs>,
    pub sandboxes: Arc<Sandboxes>,
    pub book: Arc<Book>,
    /// Calls (and resolves) one sandbox may have in flight.
    pub max_calls_in_flight: usize,
}

/// A request the loop admitted, for a worker.
pub(super) struct Job {
    pub token: Token,
    pub alive: Arc<AtomicBool>,
    pub sandbox: String,
    pub id: u64,
    pub function: String,
    /// The agent's count (see the module's doc).
    pub depth: u32,
    /// The session's: fires when the invocation that made the call ends.
    pub cancel: Arc<Cancel>,
    /// The activation that made the call (its record's `cause`).
    pub cause: Option<ipc::api::ActivationId>,
    pub work: Work,
}

pub(super) enum Work {
    Resolve,
    Call {
        raw: bool,
        event: Payload,
        run: Arc<Run>,
    },
}

/// The pool that runs calls (see the module's doc for the depth rule).
pub(super) struct Workers {
    parts: Arc<Parts>,
    max: usize,
    state: Mutex<PoolState>,
    ready: Condvar,
    answers: Mutex<Answers>,
    waker: Arc<Waker>,
}

#[derive(Default)]
struct Answers {
    list: Vec<(Token, Outgoing)>,
    stopped: bool,
}

#[derive(Default)]
struct PoolState {
    /// Waiting jobs by depth.
    queues: Vec<VecDeque<Job>>,
    busy: usize,
    idle: usize,
    threads: usize,
    stopped: bool,
}

impl PoolState {
    fn new() -> PoolState {
        PoolState {
            queues: (0..=MAX_CALL_DEPTH).map(|_| VecDeque::new()).collect(),
            ..PoolState::default()
        }
    }

    fn queued(&self) -> usize {
        self.queues.iter().map(VecDeque::len).sum()
    }

    /// The next job a free worker may start: the deepest one whose depth leaves the
    /// reserve for deeper calls.
    fn take(&mut self, max: usize) -> Option<Job> {
        let deepest = self.queues.len() - 1;
        for depth in (0..=deepest).rev() {
            let reserve = deepest - depth;
            if !self.queues[depth].is_empty() && self.busy + reserve < max {
                return self.queues[depth].pop_front();
            }
        }
        None
    }
}

impl Workers {
    pub fn new(parts: Arc<Parts>, waker: Arc<Waker>, max: usize) -> Workers {
        Workers {
            parts,
            max,
            state: Mutex::new(PoolState::new()),
            ready: Condvar::new(),
            answers: Mutex::new(Answers::default()),
            waker,
        }
    }

    pub fn submit(self: &Arc<Self>, job: Job) {
        let mut s = self.state.lock();
        let depth = (job.depth as usize).min(s.queues.len() - 1);
        s.queues[depth].push_back(job);
        if s.queued() > s.idle && s.threads < self.max {
            s.threads += 1;
            let workers = self.clone();
            let spawned = std::thread::Builder::new()
                .name("sprout-call".into())
                .spawn(move || workers.work());
            if let Err(e) = spawned {
                s.threads -= 1;
                tracing::error!(error = %e, threads = s.threads, "call socket: no thread for a worker");
            }
        }
        self.ready.notify_one();
    }

    fn work(self: Arc<Self>) {
        let mut s = self.state.lock();
        loop {
            if s.stopped {
                s.threads -= 1;
                return;
            }
            if let Some(job) = s.take(self.max) {
                s.busy += 1;
                drop(s);
                self.run(job);
                s = self.state.lock();
                s.busy -= 1;
                // A job kept back by the reserve may start now.
                self.ready.notify_all();
                continue;
            }
            s.idle += 1;
            let waited = self.ready.wait_for(&mut s, WORKER_IDLE);
            s.idle -= 1;
            if waited.timed_out() && s.threads > KEEP_WORKERS && s.queued() == 0 {
                s.threads -= 1;
                return;
            }
        }
    }

    pub fn stop(&self) {
        let mut s = self.state.lock();
        s.stopped = true;
        s.queues.iter_mut().for_each(VecDeque::clear);
        self.ready.notify_all();
        drop(s);
        let mut a = self.answers.lock();
        a.stopped = true;
        a.list.clear();
    }

    /// The answers ready for the loop to write, with their connections' tokens.
    pub fn take_answers(&self) -> Vec<(Token, Outgoing)> {
        std::mem::take(&mut self.answers.lock().list)
    }

    fn run(&self, job: Job) {
        let parts = &self.parts;
        let span = tracing::debug_span!("call", sandbox_id = %job.sandbox, call = job.id, function = %job.function, depth = job.depth);
        let _g = span.enter();
        // The request's place in its sandbox's cap goes back before its answer is
        // written: a caller holding every answer may call again at once.
        let released = std::cell::Cell::new(false);
        let release = || {
            if !released.replace(true) {
                parts.book.done(&job.sandbox);
            }
        };
        if !job.alive.load(Ordering::SeqCst) {
            // Its connection closed: nobody waits for it.
        } else if job.cancel.fired() {
            let reply = CallReply::CallFailed {
                id: job.id,
                function: job.function.clone(),
                message: "cancelled: the invocation that made the call ended before it started"
                    .into(),
            };
            release();
            self.answer(job.token, &reply, Payload::default(), None);
        } else {
            match &job.work {
                Work::Resolve => {
                    let reply = resolve(parts, &job.sandbox, job.id, &job.function);
                    release();
                    self.answer(job.token, &reply, Payload::default(), None);
                }
                Work::Call { raw, event, run } => {
                    let call = Call {
                        sandbox: &job.sandbox,
                        id: job.id,
                        function: &job.function,
                        depth: job.depth,
                        raw: *raw,
                        cause: job.cause,
                    };
                    call.run(parts, event, run, &job.cancel, |reply, result| {
                        release();
                        self.answer(job.token, reply, result, Some(&job.cancel))
                    });
                }
            }
        }
        release();
    }

    /// Queues an answer for the loop to write; with `wait` (the cancel of the call),
    /// returns once it is written, its connection closed, or the invocation that made
    /// the call ended.
    fn answer(&self, token: Token, reply: &CallReply, payload: Payload, wait: Option<&Cancel>) {
        let mut out = Outgoing::answer(reply, payload);
        let (tx, rx) = mpsc::channel();
        if wait.is_some() {
            out.written = Some(tx);
        } else {
            drop(tx);
        }
        {
            let mut a = self.answers.lock();
            if a.stopped {
                return;
            }
            a.list.push((token, out));
        }
        if let Err(e) = self.waker.wake() {
            tracing::warn!(error = %e, "call socket: wake the loop");
        }
        if let Some(cancel) = wait {
            while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(ANSWER_CHECK) {
                if cancel.fired() {
                    return;
                }
            }
        }
    }
}

/// Whether `function` can run in `sandbox` (its code is attached there if so).
fn resolve(parts: &Parts, sandbox: &str, id: u64, function: &str) -> CallReply {
    let outcome = parts
        .runs
        .callee_key(sandbox, function)
        .and_then(|key| parts.registry.get(&key))
        .and_then(|callee| parts.runs.attach_callee(sandbox, &callee, &parts.sandboxes));
    match outcome {
        Ok(spec) => CallReply::Resolved { id, spec },
        Err(e) => CallReply::CallFailed {
            id,
            function: function.to_owned(),
            message: ipc::chain(&e),
        },
    }
}

/// A call from a function in `sandbox` to run in a sibling sandbox.
struct Call<'a> {
    sandbox: &'a str,
    id: u64,
    function: &'a str,
    depth: u32,
    raw: bool,
    cause: Option<ipc::api::ActivationId>,
}

impl Call<'_> {
    /// Runs it in a sibling that joins the caller's workflow run, and gives the answer
    /// to `answer` before the sibling leaves the run (its scratch is detached: a
    /// spawner round trip the caller need not wait for) and goes back to the pool.
    /// `cancel` fires when the invocation that made the call ends.
    fn run(
        &self,
        parts: &Parts,
        event: &Payload,
        run: &Arc<Run>,
        cancel: &Cancel,
        answer: impl FnOnce(&CallReply, Payload),
    ) {
        if let Err(message) = check_depth(self.function, self.depth) {
            return answer(&self.failed(message), Payload::default());
        }
        let key = match parts.runs.callee_key(self.sandbox, self.function) {
            Ok(key) => key,
            Err(e) => return answer(&self.failed(ipc::chain(&e)), Payload::default()),
        };
        let held = Mutex::new(None);
        let opts = CallOpts {
            depth: self.depth,
            raw: self.raw,
            run: Some(run),
            cancel: Some(cancel),
            deadline: None,
            hand_back: Some(&held),
            cause: self.cause,
            ..CallOpts::default()
        };
        match parts.invoker.invoke_with(&key, event, &opts) {
            Ok(inv) => answer(
                &CallReply::CallReturned {
                    id: self.id,
                    raw: inv.raw,
                },
                inv.result,
            ),
            Err(Error::Handler {
                function, error, ..
            }) => answer(
                &CallReply::CallRaised {
                    id: self.id,
                    function,
                    error,
                },
                Payload::default(),
            ),
            Err(e) => answer(&self.failed(ipc::chain(&e)), Payload::default()),
        }
        let done_with = held.lock().take();
        if let Some((inst, healthy)) = done_with {
            parts.invoker.release_returning(inst, run, healthy);
        }
    }

    fn failed(&self, message: String) -> CallReply {
        CallReply::CallFailed {
            id: self.id,
            function: self.function.to_owned(),
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SB: &str = "sprout-1-1";

    fn job(depth: u32) -> Job {
        Job {
            token: Token(9),
            alive: Arc::new(AtomicBool::new(true)),
            sandbox: SB.into(),
            id: depth as u64,
            function: "g".into(),
            depth,
            cancel: Arc::new(Cancel::new().unwrap()),
            cause: None,
            work: Work::Resolve,
        }
    }

    #[test]
    fn workers_keep_a_reserve_for_deeper_calls() {
        let max = 20;
        let mut s = PoolState::new();
        s.queues[1].push_back(job(1));
        s.queues[16].push_back(job(16));
        s.queues[10].push_back(job(10));
        // The deepest first.
        s.busy = 0;
        assert_eq!(s.take(max).unwrap().depth, 16);
        // With 13 busy, depth 10 may start (it leaves 6 of the 20 for depths 11..=16);
        // with 14 it may not.
        s.busy = 14;
        assert_eq!(s.take(max).map(|j| j.depth), None);
        s.busy = 13;
        assert_eq!(s.take(max).unwrap().depth, 10);
        s.busy = 5;
        assert!(s.take(max).is_none(), "depth 1 started into the reserve");
        s.busy = 4;
        assert_eq!(s.take(max).unwrap().depth, 1);
        // Depth 16 needs no reserve: it may take the last worker.
        s.queues[16].push_back(job(16));
        s.busy = max - 1;
        assert_eq!(s.take(max).unwrap().depth, 16);
        s.queues[16].push_back(job(16));
        s.busy = max;
        assert!(s.take(max).is_none());
    }
}
