//! Invocation: finding an instance for a request (the scheduler's idle one, a new one
//! in a stem cell, or one handed over in the function's queue), running the request
//! in it, and giving it back, retiring or destroying it. The warm fast path
//! ([`WarmCall`]) lets the HTTP event loop finish a warm invoke without a worker.
//!
//! [`Invoker`] holds no lock of its own: it composes the registry, the scheduler, the
//! sandboxes, the runs and the call book, and takes their locks one at a time (in the
//! order written in `agent.rs`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ipc::api::{ActivationId, ActivationLimits, ActivationStatus, Logs};
use ipc::proto::{CallSpec, LoadSpec};
use ipc::Payload;
use parking_lot::Mutex;
use pool::{Sandbox, SandboxState};

use crate::activations::{record, Activations, Finished, OpenWhiskFields, TimedLogs};
use crate::admission::{Admission, Ticket};
use crate::calls::book::Book;
use crate::config::Config;
use crate::error::Error;
use crate::instance::{Answer, CallFailure, Instance};
use crate::metrics::{Metrics, Refusal};
use crate::names::FunctionKey;
use crate::registry::{Function, Registry};
use crate::request::{Invocation, Response, RunRequest, Start};
use crate::run::{Cancel, Run};
use crate::runs::Runs;
use crate::sandboxes::Sandboxes;
use crate::scheduler::{Abandon, Grant, Scheduler, SlotState, StemCell};
use crate::transport::{FastCall, FastPoll};
use crate::zygotes::{Policy, SetKey, ZygoteTag};

/// How an invocation is made: by a client (depth 0) or by another function.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct CallOpts<'a> {
    pub depth: u32,
    /// The event is bytes (and a bytes result is accepted).
    pub raw: bool,
    /// The workflow run the callee joins (its scratch is attached).
    pub run: Option<&'a Arc<Run>>,
    /// Ends the call early when readable.
    pub cancel: Option<&'a Cancel>,
    /// A deadline earlier than the function's own timeout.
    pub deadline: Option<Instant>,
    /// Where to leave the instance (and whether it is healthy) instead of leaving the
    /// run and releasing it: the caller does that after it has sent the answer on.
    pub hand_back: Option<&'a Mutex<Option<(Instance, bool)>>>,
    /// Its activation's id, if the caller chose it (else one is made).
    pub activation: Option<ActivationId>,
    /// The activation of the function that made this call through the agent.
    pub cause: Option<ActivationId>,
    /// When it arrived, if before this call: an asynchronous one's acceptance.
    pub arrived: Option<Instant>,
    /// An asynchronous activation: its client did not wait for it.
    pub background: bool,
    /// An OpenWhisk activation: its environment, result rules and record fields.
    pub openwhisk: Option<&'a crate::openwhisk::context::SharedContext>,
}

/// What an invocation's activation record needs besides its outcome.
#[derive(Debug, Clone)]
pub(crate) struct Meta {
    pub id: ActivationId,
    cause: Option<ActivationId>,
    /// When it arrived (its wait starts).
    arrived: Instant,
    /// When this process began serving it (its client's duration starts).
    started: Instant,
    /// When its instance began working on it: loading it on a cold start, else
    /// running it (its wait ends).
    began: Instant,
    /// Making and loading a new instance.
    init: Duration,
    background: bool,
    /// An OpenWhisk activation's context (`None`, no allocation, for sprout's own).
    openwhisk: Option<crate::openwhisk::context::SharedContext>,
}

impl Meta {
    fn new(opts: &CallOpts<'_>, now: Instant) -> Meta {
        Meta {
            id: opts.activation.unwrap_or_else(Activations::new_id),
            cause: opts.cause,
            arrived: opts.arrived.unwrap_or(now),
            started: now,
            began: now,
            init: Duration::ZERO,
            background: opts.background,
            openwhisk: opts.openwhisk.cloned(),
        }
    }
}

/// Runs invocations over the agent's components.
#[derive(Debug)]
pub(crate) struct Invoker {
    config: Config,
    registry: Arc<Registry>,
    scheduler: Arc<Scheduler>,
    sandboxes: Arc<Sandboxes>,
    runs: Arc<Runs>,
    book: Arc<Book>,
    /// Told of every cold start (what package zygotes to keep).
    zygotes: Arc<Policy>,
    /// Where every invocation's record goes.
    activations: Arc<Activations>,
    /// Invocation ids.
    next_id: AtomicU64,
    /// Counts invocations as they start and end.
    metrics: Arc<Metrics>,
}

/// How far an invocation got before it failed.
#[derive(Debug, Clone, Copy)]
enum Reached {
    /// It had an instance of this version of the function, with these limits.
    Before(u64, ActivationLimits),
    /// It reached [`Invoker::complete`], which records it.
    Complete,
}

/// What an invocation sends its instance.
#[derive(Debug, Clone, Copy)]
enum Input<'a> {
    /// An event (JSON, or bytes from a calling function).
    Event(&'a Payload),
    /// A `/run` request: the whole request for an HTTP app, its body as the event
    /// for a plain function.
    Run(&'a RunRequest),
}

/// A successful invocation's result as its record keeps it: the JSON (capped); for an
/// HTTP app its status and body size, for bytes their size.
fn result_of(inv: &Invocation) -> Vec<u8> {
    match &inv.http {
        Some(head) => format!(
            "{{\"status\":{},\"body_size\":{}}}",
            head.status,
            inv.result.len()
        )
        .into_bytes(),
        None if inv.raw => format!("{{\"bytes\":{}}}", inv.result.len()).into_bytes(),
        None => record::cap_result(&inv.result),
    }
}

/// A failure as its record keeps it: `{"error": {...}}`, the API's error body without
/// the logs (the record has them).
fn error_result(e: &Error) -> Vec<u8> {
    let mut detail = e.detail();
    detail.logs = None;
    let body = serde_json::to_vec(&ipc::api::ErrorBody { error: detail })
        .unwrap_or_else(|_| b"null".to_vec());
    record::cap_result(&body)
}

/// `logs` with `line` (what OpenWhisk's runtime would have written) at the end of
/// stderr.
fn with_stderr(mut logs: TimedLogs, line: Option<String>) -> TimedLogs {
    if let Some(line) = line {
        let stderr = &mut logs.stderr.text;
        if !stderr.is_empty() && !stderr.ends_with('\n') {
            stderr.push('\n');
        }
        stderr.push_str(&line);
        stderr.push('\n');
    }
    logs
}

/// How long an accepted activation that met a full function queue waits before it
/// asks again.
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(5);

/// Events up to this size may take the event loop's warm path.
const FAST_EVENT_MAX: usize = 64 << 10;

/// A warm call's ids ([`Invoker::start_fast`]).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct FastOpts<'a> {
    /// Its activation's id, if the caller chose it.
    pub activation: Option<ActivationId>,
    /// An OpenWhisk activation's.
    pub openwhisk: Option<FastActivation<'a>>,
}

/// What makes a warm call an OpenWhisk activation ([`Invoker::start_fast`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct FastActivation<'a> {
    pub context: &'a crate::openwhisk::context::SharedContext,
    pub cause: Option<ActivationId>,
}

/// The answer to a warm call: sprout's invocation, or an OpenWhisk activation's
/// record in OpenWhisk's shape.
fn fast_answer(meta: &Meta, result: Result<Invocation, Error>) -> Result<Response, Error> {
    match &meta.openwhisk {
        Some(ow) => crate::openwhisk::context::answer(ow, result.map(|_| ())),
        None => result.map(Response::Invoked),
    }
}

/// A warm invoke in flight whose answer the HTTP event loop reads without blocking.
/// Anything that needs waiting (a failure to clean up after, output to keep
/// draining) is finished by a worker with [`FastCall::finish`].
pub(crate) struct WarmCall {
    invoker: Arc<Invoker>,
    /// Taken when the call is completed; a call dropped unfinished gives it back as
    /// unhealthy (its sandbox is destroyed).
    inst: Option<Instance>,
    function: Arc<Function>,
    id: u64,
    meta: Meta,
    start: Start,
    deadline: Instant,
    /// A failure seen already (sending the invoke, or reading the answer).
    failed: Option<CallFailure>,
    /// An answer read on the loop but left for [`FastCall::finish`] to complete.
    answered: Option<Result<Answer, CallFailure>>,
    /// Admitted past its namespace's limits: in flight until the call is dropped.
    _ticket: Ticket,
}

impl FastCall for WarmCall {
    fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.inst.as_ref().map_or(-1, |i| i.link.0.as_raw_fd())
    }

    fn poll(&mut self) -> FastPoll {
        if self.failed.is_some() {
            return FastPoll::Handoff;
        }
        let Some(inst) = self.inst.as_mut() else {
            return FastPoll::Handoff;
        };
        let invoker = &self.invoker;
        match inst.try_finish(self.id, invoker.config.log_limit) {
            None => FastPoll::Pending,
            Some(Err(failure)) if !matches!(failure, CallFailure::Raised(_)) => {
                self.failed = Some(failure);
                FastPoll::Handoff
            }
            // Ending the run it started takes a spawner round trip, and ending the calls
            // of a sandbox with a call connection a call-loop round trip: not on the loop.
            // A shared (memfd) result is checked (parsed in full) by `complete`: not
            // on the loop either.
            Some(outcome)
                if inst.called
                    || matches!(&outcome, Ok(answer) if answer.payload.is_shared())
                    || invoker.runs.has_root_run(inst.sandbox.id())
                    || invoker.book.connected(inst.sandbox.id()) =>
            {
                self.answered = Some(outcome);
                FastPoll::Handoff
            }
            Some(outcome) => {
                let inst = self.inst.take().expect("instance");
                let result = self.invoker.complete(
                    inst,
                    &self.function,
                    self.start,
                    &self.meta,
                    outcome,
                    &CallOpts::default(),
                );
                FastPoll::Done(fast_answer(&self.meta, result))
            }
        }
    }

    fn finish(mut self: Box<Self>) -> Result<Response, Error> {
        let mut inst = self.inst.take().ok_or(Error::ShuttingDown)?;
        let log_limit = self.invoker.config.log_limit;
        let outcome = match (self.answered.take(), self.failed.take()) {
            (Some(outcome), _) => outcome,
            (None, Some(failure)) => Err(failure),
            (None, None) => inst.finish(self.id, self.deadline, log_limit, None),
        };
        let result = self.invoker.complete(
            inst,
            &self.function,
            self.start,
            &self.meta,
            outcome,
            &CallOpts::default(),
        );
        fast_answer(&self.meta, result)
    }
}

impl Drop for WarmCall {
    fn drop(&mut self) {
        if let Some(inst) = self.inst.take() {
            self.invoker.release(inst, false);
            // Dropped unfinished (the server stopped): its record says so.
            let key = self.function.key();
            self.invoker.record_failure(
                &key,
                self.function.version,
                self.function.activation_limits(),
                &self.meta,
                &Error::ShuttingDown,
            );
        }
    }
}

impl Invoker {
    // One handle per component it composes (agent.rs builds them all).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Config,
        registry: Arc<Registry>,
        scheduler: Arc<Scheduler>,
        sandboxes: Arc<Sandboxes>,
        runs: Arc<Runs>,
        book: Arc<Book>,
        zygotes: Arc<Policy>,
        metrics: Arc<Metrics>,
        activations: Arc<Activations>,
    ) -> Invoker {
        Invoker {
            config,
            registry,
            scheduler,
            sandboxes,
            runs,
            book,
            zygotes,
            activations,
            next_id: AtomicU64::new(1),
            metrics,
        }
    }

    /// A workflow run's id.
    pub fn new_run_id(&self) -> u64 {
        self.runs.next_run_id()
    }

    /// An invocation id (also for a workflow's in-sandbox steps).
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A client's invoke of `key` with the JSON `event`; `abandon` takes it back
    /// while it waits for an instance.
    pub fn invoke(
        &self,
        key: &FunctionKey,
        event: Vec<u8>,
        opts: &CallOpts<'_>,
        abandon: Option<&Abandon>,
    ) -> Result<Invocation, Error> {
        serde_json::from_slice::<serde::de::IgnoredAny>(&event).map_err(Error::InvalidEvent)?;
        let event = Payload::Inline(event);
        self.invoke_abandonable(key, Input::Event(&event), opts, abandon)
    }

    /// A client's `/run` request for `key` (OpenLambda's): refused with 405 if the
    /// function's `triggers.http` does not allow its method; an HTTP app's instance
    /// gets the whole request, a plain function's the body as its event.
    pub fn run(
        &self,
        key: &FunctionKey,
        run: &RunRequest,
        opts: &CallOpts<'_>,
        abandon: Option<&Abandon>,
    ) -> Result<Invocation, Error> {
        let function = self.registry.get(key)?;
        let method = &run.request.method;
        if !function.allows_method(method) {
            return Err(Error::MethodNotAllowed {
                function: function.name.clone(),
                method: method.clone(),
                allowed: function.http_methods.clone().unwrap_or_default(),
            });
        }
        self.invoke_abandonable(key, Input::Run(run), opts, abandon)
    }

    /// Runs one invocation of `key`: a client's (`opts` default) or a function's call
    /// (resolved in the caller's namespace).
    pub fn invoke_with(
        &self,
        key: &FunctionKey,
        event: &Payload,
        opts: &CallOpts<'_>,
    ) -> Result<Invocation, Error> {
        self.invoke_abandonable(key, Input::Event(event), opts, None)
    }

    /// [`Invoker::invoke_with`] for a client's request that the HTTP loop takes back
    /// (`abandon`) while it waits for an instance: its client went away, or the
    /// server drains.
    fn invoke_abandonable(
        &self,
        key: &FunctionKey,
        input: Input<'_>,
        opts: &CallOpts<'_>,
        abandon: Option<&Abandon>,
    ) -> Result<Invocation, Error> {
        let mut meta = Meta::new(opts, Instant::now());
        let mut version = None;
        let out = self.invoke_recorded(key, input, opts, abandon, &mut meta, &mut version);
        match (&out, version) {
            // Ended before `complete` (which records): recorded here, unless it was
            // refused (bad input, no such function: nothing was activated).
            (Err(e), Some(Reached::Before(version, limits))) => {
                self.record_failure(key, version, limits, &meta, e)
            }
            (Err(e), None) => {
                let (version, limits) = self
                    .registry
                    .lookup(key)
                    .map_or((0, ActivationLimits::default()), |f| {
                        (f.version, f.activation_limits())
                    });
                self.record_failure(key, version, limits, &meta, e)
            }
            _ => {}
        }
        out
    }

    /// [`Invoker::invoke_abandonable`]'s body: sets `reached` to how far it got.
    fn invoke_recorded(
        &self,
        key: &FunctionKey,
        input: Input<'_>,
        opts: &CallOpts<'_>,
        abandon: Option<&Abandon>,
        meta: &mut Meta,
        reached: &mut Option<Reached>,
    ) -> Result<Invocation, Error> {
        let name = key.name.as_str();
        let id = self.next_id();
        self.metrics.invocation_started();
        let span = tracing::debug_span!(
            "invoke",
            namespace = %key.namespace,
            function = key.name.as_str(),
            invocation = id,
            activation = %meta.id,
            depth = opts.depth,
            sandbox_id = tracing::field::Empty
        );
        let _g = span.enter();

        // A client's request waits in the queue as long as it takes; a function's call
        // no longer than its deadline, and not once its caller has given up.
        let queue_deadline = opts.deadline.or_else(|| {
            opts.run.and_then(|_| {
                let f = self.registry.lookup(key).map(|f| f.timeout_ms)?;
                Some(Instant::now() + Duration::from_millis(f))
            })
        });
        let (mut inst, mut start, function, init) =
            self.acquire_until(key, queue_deadline, opts.cancel, abandon, opts.background)?;
        meta.init = init;
        meta.began = Instant::now() - init;
        *reached = Some(Reached::Before(
            function.version,
            function.activation_limits(),
        ));
        span.record("sandbox_id", inst.sandbox.id());
        // A client gone while its instance was handed over: it never runs.
        if opts.cancel.is_some_and(|c| c.fired()) || abandon.is_some_and(|a| a.is_gone()) {
            self.release(inst, true);
            return Err(Error::Cancelled {
                function: name.to_owned(),
            });
        }
        if inst.sandbox.state() == SandboxState::Frozen {
            start = Start::Thawed;
            if let Err(e) = inst.sandbox.thaw() {
                self.release(inst, false);
                return Err(e.into());
            }
        }
        if let Some(run) = opts.run {
            if let Err(e) = self.join_run(&inst, run) {
                self.release(inst, true);
                return Err(e);
            }
        }
        // A plain function's `/run` body is its event: checked now that the instance
        // says what it is (an HTTP app takes any body).
        let run_event = match input {
            Input::Run(run) if inst.http.is_none() => match crate::http_app::event_of(&run.body) {
                Ok(event) => Some(Payload::Inline(event)),
                Err(e) => {
                    self.release(inst, true);
                    return Err(e);
                }
            },
            _ => None,
        };
        // The timeout bounds the handler's run; loading it had its own (as in OpenWhisk).
        let own = Instant::now() + Duration::from_millis(function.timeout_ms);
        let deadline = opts.deadline.map_or(own, |d| d.min(own));
        // Calls the sandbox makes from now on are this invocation's (`complete` ends them).
        self.book
            .begin_activation(inst.sandbox.id(), opts.depth, Some(meta.id));
        // An OpenWhisk activation's variables, its deadline the one set just now.
        let env = opts.openwhisk.map(|ow| {
            let left = deadline.saturating_duration_since(Instant::now());
            ow.env(&function, meta.id, SystemTime::now() + left)
        });
        let begun = match (input, &run_event) {
            (Input::Event(event), _) => inst.begin_activation(id, event, opts.depth, opts.raw, env),
            (Input::Run(_), Some(event)) => inst.begin(id, event, 0, false),
            (Input::Run(run), None) => {
                let body = Payload::Inline(run.body.clone());
                inst.begin_http(id, &run.request, &body)
            }
        };
        let outcome = begun.and_then(|()| {
            inst.finish(
                id,
                deadline,
                self.config.log_limit,
                opts.cancel.map(|c| c.fd()),
            )
        });
        *reached = Some(Reached::Complete);
        self.complete(inst, &function, start, meta, outcome, opts)
    }

    /// Ends an invocation: leaves its workflow run, gives the instance back (or
    /// destroys it) and turns the outcome into the invocation or its error.
    fn complete(
        &self,
        mut inst: Instance,
        function: &Function,
        start: Start,
        meta: &Meta,
        outcome: Result<Answer, CallFailure>,
        opts: &CallOpts<'_>,
    ) -> Result<Invocation, Error> {
        // Every call the invocation made ends with it, whatever the runtime reports.
        self.book.end(inst.sandbox.id());
        let timed = inst.take_timed_logs();
        let logs = Logs {
            stdout: timed.stdout.text.clone(),
            stderr: timed.stderr.text.clone(),
            truncated: timed.truncated,
        };
        let called = inst.called;
        let duration = meta.started.elapsed();
        let name = &function.name;
        let mut healthy = matches!(outcome, Ok(_) | Err(CallFailure::Raised(_)));
        // The runtime's word that it called (`called`) is not needed: calls made on the
        // call socket by hand started a run all the same, and it ends here too.
        if healthy && (inst.called || self.runs.has_root_run(inst.sandbox.id())) {
            healthy = self
                .runs
                .end_sdk_run(&inst, self.config.keep_warm, &self.sandboxes);
        }
        let (result, keep) = match outcome {
            // An HTTP app's response: its head checked, its body bounded, neither parsed.
            Ok(Answer {
                payload,
                http: Some(head),
                ..
            }) => {
                let checked = crate::http_app::check_head(name, head).and_then(|head| {
                    if payload.len() > crate::request::MAX_RESULT {
                        return Err(Error::ResultTooLarge {
                            function: name.clone(),
                            len: payload.len(),
                            max: crate::request::MAX_RESULT,
                        });
                    }
                    Ok(head)
                });
                match checked {
                    Ok(head) => {
                        tracing::debug!(
                            duration_us = duration.as_micros() as u64,
                            start = start.as_str(),
                            status = head.status,
                            "http app responded"
                        );
                        let inv = Invocation {
                            activation_id: meta.id,
                            result: payload,
                            raw: false,
                            logs,
                            duration,
                            start,
                            http: Some(head),
                        };
                        (Ok(inv), healthy)
                    }
                    Err(e) => (Err(e), healthy),
                }
            }
            Ok(Answer { raw: true, .. }) if !opts.raw => (
                Err(Error::BytesResult {
                    function: name.clone(),
                }),
                healthy,
            ),
            // A top-level result is answered over HTTP: bounded like a request body
            // (checked before it is parsed).
            Ok(Answer { payload, .. })
                if opts.run.is_none() && payload.len() > crate::request::MAX_RESULT =>
            {
                (
                    Err(Error::ResultTooLarge {
                        function: name.clone(),
                        len: payload.len(),
                        max: crate::request::MAX_RESULT,
                    }),
                    healthy,
                )
            }
            Ok(Answer { payload, raw, .. }) => {
                match serde_json::from_slice::<serde::de::IgnoredAny>(&payload) {
                    Err(source) if !raw => (
                        Err(Error::BadResult {
                            function: name.clone(),
                            source,
                        }),
                        false,
                    ),
                    _ => {
                        tracing::debug!(
                            duration_us = duration.as_micros() as u64,
                            start = start.as_str(),
                            "invocation returned"
                        );
                        let inv = Invocation {
                            activation_id: meta.id,
                            result: payload,
                            raw,
                            logs,
                            duration,
                            start,
                            http: None,
                        };
                        (Ok(inv), healthy)
                    }
                }
            }
            Err(CallFailure::Raised(error)) => (
                Err(Error::Handler {
                    function: name.clone(),
                    error,
                    logs,
                }),
                healthy,
            ),
            Err(failure) => (Err(self.failure(&inst, function, failure, logs)), false),
        };
        self.record(meta, function, Some(start), &result, timed, called);
        match opts.hand_back {
            Some(slot) => {
                // Counted before its answer goes out, so a burst of calls right after
                // waits for it instead of starting new instances.
                self.scheduler.returning(&inst.function);
                *slot.lock() = Some((inst, keep));
            }
            None => self.leave_and_release(inst, opts.run, keep),
        }
        result
    }

    /// Hands an invocation's record to the store (a channel send; the lines are
    /// formatted by its writer).
    // What `complete` has in hand, moved, not gathered into a struct on the warm path.
    fn record(
        &self,
        meta: &Meta,
        function: &Function,
        start: Option<Start>,
        result: &Result<Invocation, Error>,
        logs: TimedLogs,
        called: bool,
    ) {
        // An OpenWhisk activation reads by OpenWhisk's rules.
        let verdict = meta.openwhisk.as_ref().map(|ow| match result {
            Ok(inv) => crate::openwhisk::result::of_success(ow.runtime, &inv.result, inv.raw),
            Err(e) => crate::openwhisk::result::of_error(ow.runtime, e),
        });
        let status = match result {
            // Killed by the agent's shutdown, not by its own doing.
            Err(Error::InstanceDied { .. } | Error::Protocol { .. })
                if self.scheduler.is_closed() =>
            {
                ActivationStatus::WhiskInternalError
            }
            _ if verdict.is_some() => verdict.as_ref().map(|v| v.status).expect("a verdict"),
            Ok(_) => ActivationStatus::Success,
            Err(e) => e.activation_status(),
        };
        // The namespace's usage adds up whole milliseconds of `ran`, the record's
        // duration (from when its instance took it, so without its wait): the two
        // agree by construction, records on or off. The histograms see it whole.
        let ran = meta.began.elapsed();
        self.metrics
            .invocation_finished(&function.key(), start, status, ran, function.memory_mb);
        // An OpenWhisk activation's record is made records off too: it is the answer.
        if !self.activations.is_on() && meta.openwhisk.is_none() {
            return;
        }
        let (result, logs) = match (verdict, result) {
            (Some(v), _) => (v.result, with_stderr(logs, v.stderr)),
            (None, Ok(inv)) => (result_of(inv), logs),
            (None, Err(e)) => (error_result(e), logs),
        };
        let end = SystemTime::now();
        let end_ms = record::epoch_ms(end);
        let start_ms = end_ms.saturating_sub(ran.as_millis() as u64);
        self.write_record(
            meta,
            Finished {
                id: meta.id,
                namespace: function.namespace.clone(),
                name: function.name.clone(),
                version: function.version,
                start_ms,
                end_ms,
                wait_ms: meta
                    .began
                    .saturating_duration_since(meta.arrived)
                    .as_millis() as u64,
                init_ms: meta.init.as_millis() as u64,
                start_path: start.map(Start::as_str),
                status,
                result,
                logs,
                cause: meta.cause,
                called,
                blocking: !meta.background,
                limits: function.activation_limits(),
                openwhisk: meta.openwhisk.as_ref().map(|ow| OpenWhiskFields {
                    kind: ow.kind.clone(),
                    subject: ow.subject.clone(),
                }),
            },
        );
    }

    /// Hands `finished` to the store; an OpenWhisk activation keeps it as its record
    /// too (its blocking answer is made from it).
    fn write_record(&self, meta: &Meta, finished: Finished) {
        if let Some(ow) = &meta.openwhisk {
            ow.keep(finished.to_record());
        }
        self.activations.finish(finished);
    }

    /// Records an invocation that failed before [`Invoker::complete`] (no instance, a
    /// failed load, a queue timeout, a shutdown), unless it was refused: bad input or
    /// no such function activates nothing.
    pub(crate) fn record_failure(
        &self,
        key: &FunctionKey,
        version: u64,
        limits: ActivationLimits,
        meta: &Meta,
        e: &Error,
    ) {
        use crate::error::ErrorKind;
        // A client's request refused (bad input, no such function, no room) was never
        // an activation; an accepted one always gets its record (a full queue is
        // retried by the async runner, not recorded).
        let refused = match e.kind() {
            ErrorKind::TooManyRequests => true,
            ErrorKind::BadRequest | ErrorKind::NotFound | ErrorKind::MethodNotAllowed => {
                !meta.background
            }
            _ => false,
        };
        if refused {
            return;
        }
        let verdict = meta
            .openwhisk
            .as_ref()
            .map(|ow| crate::openwhisk::result::of_error(ow.runtime, e));
        let status = verdict
            .as_ref()
            .map_or_else(|| e.activation_status(), |v| v.status);
        // It never ran: no duration, so no memory time (as its record says).
        self.metrics
            .invocation_finished(key, None, status, Duration::ZERO, 0);
        if !self.activations.is_on() && meta.openwhisk.is_none() {
            return;
        }
        let end = SystemTime::now();
        let end_ms = record::epoch_ms(end);
        let logs = e
            .detail()
            .logs
            .map(|l| TimedLogs::untimed(&l, end))
            .unwrap_or_default();
        let (result, logs) = match verdict {
            Some(v) => (v.result, with_stderr(logs, v.stderr)),
            None => (error_result(e), logs),
        };
        let waited = meta.arrived.elapsed();
        self.write_record(
            meta,
            Finished {
                id: meta.id,
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                version,
                start_ms: end_ms,
                end_ms,
                wait_ms: waited.as_millis() as u64,
                init_ms: 0,
                start_path: None,
                status,
                result,
                logs,
                cause: meta.cause,
                called: false,
                blocking: !meta.background,
                limits,
                openwhisk: meta.openwhisk.as_ref().map(|ow| OpenWhiskFields {
                    kind: ow.kind.clone(),
                    subject: ow.subject.clone(),
                }),
            },
        );
    }

    /// Records an accepted activation that never ran, with `e`.
    pub(crate) fn record_not_run(
        &self,
        key: &FunctionKey,
        version: u64,
        limits: ActivationLimits,
        opts: &CallOpts<'_>,
        e: &Error,
    ) {
        let meta = Meta::new(opts, Instant::now());
        self.record_failure(key, version, limits, &meta, e);
    }

    /// Runs `f` (an invocation of `inst`, or a call its shim runs in its sandbox) as
    /// the sandbox's invocation at depth 0: the calls it makes end with it.
    pub fn as_invocation<T>(&self, inst: &mut Instance, f: impl FnOnce(&mut Instance) -> T) -> T {
        self.book.begin(inst.sandbox.id(), 0);
        let out = f(inst);
        self.book.end(inst.sandbox.id());
        out
    }

    /// Takes an instance out of its run (if any) and gives it back to the pool.
    pub fn leave_and_release(&self, inst: Instance, run: Option<&Arc<Run>>, healthy: bool) {
        let healthy = match run {
            Some(run) => self.runs.leave(&inst, run, healthy, &self.sandboxes),
            None => healthy,
        };
        self.release(inst, healthy);
    }

    /// Makes `inst`'s sandbox part of `run` ([`Runs::join`]).
    pub fn join_run(&self, inst: &Instance, run: &Arc<Run>) -> Result<(), Error> {
        self.runs.join(inst, run, &self.sandboxes)
    }

    /// Makes `callee`'s code visible in sandbox `sandbox_id` if it can run there
    /// ([`Runs::attach_callee`]).
    pub fn attach_callee(
        &self,
        sandbox_id: &str,
        callee: &Function,
    ) -> Result<Option<CallSpec>, Error> {
        self.runs.attach_callee(sandbox_id, callee, &self.sandboxes)
    }

    /// Starts a warm invoke that the HTTP event loop can finish without blocking:
    /// only when the function has an idle instance and the event is small. A frozen
    /// instance is thawed here (a write and a read of its freezer file, ~0.1 ms).
    /// `None` sends the request down the ordinary path.
    ///
    /// With `run` (a `/run` request; `event` is then its body) only when the body is
    /// empty or JSON and the function allows the method: an HTTP app's instance gets
    /// the whole request, a plain function's the event.
    ///
    /// The request is admitted (`admission`) once an idle instance is in hand; a
    /// refusal puts the instance back and goes the ordinary way, which refuses it
    /// again and counts it.
    pub fn start_fast(
        self: &Arc<Self>,
        namespace: &str,
        name: &str,
        event: &[u8],
        run: Option<&RunRequest>,
        admission: &Admission,
        opts: FastOpts<'_>,
    ) -> Option<WarmCall> {
        let FastOpts {
            activation,
            openwhisk,
        } = opts;
        let empty_run = run.is_some() && event.is_empty();
        if event.len() > FAST_EVENT_MAX
            || self.scheduler.is_closed()
            || (!empty_run && serde_json::from_slice::<serde::de::IgnoredAny>(event).is_err())
        {
            return None;
        }
        // An invalid namespace or name is never registered: the ordinary path says why.
        let key = FunctionKey {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        let function = self.registry.lookup(&key)?;
        if run.is_some_and(|r| !function.allows_method(&r.request.method)) {
            return None;
        }
        let mut inst = self.scheduler.take_idle_current(&key, function.version)?;
        let Ok(ticket) = admission.try_admit(&key) else {
            self.scheduler
                .put_back(inst, false, self.config.pool.pause_grace);
            return None;
        };
        let id = self.next_id();
        self.metrics.invocation_started();
        let started = Instant::now();
        let meta = Meta::new(
            &CallOpts {
                activation,
                cause: openwhisk.and_then(|ow| ow.cause),
                openwhisk: openwhisk.map(|ow| ow.context),
                ..CallOpts::default()
            },
            started,
        );
        let start = if inst.sandbox.state() == SandboxState::Frozen {
            Start::Thawed
        } else {
            Start::Warm
        };
        if start == Start::Thawed {
            if let Err(e) = inst.sandbox.thaw() {
                tracing::warn!(sandbox_id = inst.sandbox.id(), error = %ipc::chain(&e), "thaw failed");
                self.release(inst, false);
                return None;
            }
            tracing::debug!(
                sandbox_id = inst.sandbox.id(),
                thaw_us = started.elapsed().as_micros() as u64,
                "thawed"
            );
        }
        self.book
            .begin_activation(inst.sandbox.id(), 0, Some(meta.id));
        let failed = match run {
            Some(run) if inst.http.is_some() => {
                inst.begin_http(id, &run.request, &Payload::Inline(event.to_vec()))
            }
            _ if empty_run => inst.begin(id, &Payload::Inline(b"{}".to_vec()), 0, false),
            // An OpenWhisk activation: its environment, its deadline this call's.
            _ if meta.openwhisk.is_some() => {
                let ow = meta.openwhisk.as_ref().expect("an activation");
                let left = Duration::from_millis(function.timeout_ms);
                let env = ow.env(&function, meta.id, SystemTime::now() + left);
                inst.begin_activation(id, &Payload::Inline(event.to_vec()), 0, false, Some(env))
            }
            _ => inst.begin(id, &Payload::Inline(event.to_vec()), 0, false),
        }
        .err();
        Some(WarmCall {
            invoker: self.clone(),
            deadline: started + Duration::from_millis(function.timeout_ms),
            inst: Some(inst),
            function,
            id,
            meta,
            start,
            failed,
            answered: None,
            _ticket: ticket,
        })
    }

    /// An instance of `key` for one invocation: an idle one, a new one (while the
    /// function is below `max_instances`), or one handed over after waiting in the
    /// function's queue.
    pub fn acquire(
        &self,
        key: &FunctionKey,
        deadline: Option<Instant>,
        cancel: Option<&Cancel>,
    ) -> Result<(Instance, Start, Arc<Function>), Error> {
        self.acquire_until(key, deadline, cancel, None, false)
            .map(|(inst, start, function, _)| (inst, start, function))
    }

    /// [`Invoker::acquire`] for a request its transport may abandon while it waits;
    /// also returns how long a cold start took (making and loading the instance).
    fn acquire_until(
        &self,
        key: &FunctionKey,
        deadline: Option<Instant>,
        cancel: Option<&Cancel>,
        abandon: Option<&Abandon>,
        accepted: bool,
    ) -> Result<(Instance, Start, Arc<Function>, Duration), Error> {
        let name = key.name.as_str();
        let mut retried = false;
        loop {
            // Taken back before it started (and before it starts an instance). A
            // retry it was woken with goes to the next waiter, or nobody starts the
            // replacement.
            if let Some(e) = abandon.and_then(|a| a.error(name)) {
                if retried {
                    self.scheduler.retry_next(key);
                }
                return Err(e);
            }
            let function = self.registry.get(key)?;
            // A live package zygote that serves it: a new instance is forked from it
            // (or from its stem cell) rather than started in a plain stem cell.
            let zygote = self.sandboxes.package_zygote_for(&function);
            let (grant, stale) =
                match self
                    .scheduler
                    .grant(key, &function, retried, zygote.is_some())
                {
                    // An accepted (asynchronous) activation was promised a run: it waits
                    // for room in a full queue instead of being refused (and is neither
                    // counted again nor as a refusal), until the agent shuts down.
                    Err(Error::QueueFull { .. }) if accepted => {
                        if self.scheduler.is_closed() {
                            return Err(Error::ShuttingDown);
                        }
                        std::thread::sleep(QUEUE_FULL_BACKOFF);
                        continue;
                    }
                    Err(e) => {
                        if matches!(e, Error::QueueFull { .. }) {
                            self.metrics.refused(&key.namespace, Refusal::QueueFull);
                        }
                        return Err(e);
                    }
                    Ok(granted) => granted,
                };
            for inst in stale {
                self.destroy(inst);
            }
            let slot = match grant {
                Grant::Idle(inst) => return Ok((inst, Start::Warm, function, Duration::ZERO)),
                Grant::Start(stem) => {
                    let cold = Instant::now();
                    return match self.start_cold(&function, stem, zygote) {
                        Ok((inst, start)) => Ok((inst, start, function, cold.elapsed())),
                        Err(e) => {
                            self.scheduler.forget_instance(key);
                            Err(e)
                        }
                    };
                }
                Grant::Wait(slot) => slot,
            };
            let waited = Instant::now();
            let mut state = slot.wait(deadline, || {
                cancel.is_some_and(|c| c.fired()) || abandon.is_some_and(|a| a.get().is_some())
            });
            if matches!(state, SlotState::Waiting) {
                // Out of the queue first: nobody can hand it an instance after that.
                self.scheduler.leave_queue(key, &slot);
                state = slot.take();
            }
            match state {
                SlotState::Ready(inst) => {
                    return Ok((*inst, Start::Warm, function, Duration::ZERO))
                }
                SlotState::Retry => retried = true,
                // Taken back: the check at the top of the loop says why.
                SlotState::GaveUp if abandon.is_some_and(|a| a.get().is_some()) => {}
                SlotState::GaveUp if cancel.is_some_and(|c| c.fired()) => {
                    return Err(Error::Cancelled {
                        function: name.to_owned(),
                    })
                }
                SlotState::GaveUp => {
                    return Err(Error::QueueTimeout {
                        function: name.to_owned(),
                        waited_ms: waited.elapsed().as_millis() as u64,
                        max_instances: function.max_instances,
                    })
                }
                SlotState::Closed | SlotState::Waiting => return Err(Error::ShuttingDown),
            }
        }
    }

    /// A cold start of `function` in `stem` (a package zygote's or a plain one), else
    /// in a new sandbox forked from package zygote `zygote`, else (or when that
    /// fork fails) in a plain stem cell or a new sandbox. The policy hears of it.
    fn start_cold(
        &self,
        function: &Function,
        stem: Option<StemCell>,
        zygote: Option<Arc<ZygoteTag>>,
    ) -> Result<(Instance, Start), Error> {
        let exact = |z: &ZygoteTag| SetKey::of(function).is_some_and(|k| z.is(&k));
        let (stem, start, served_by) = match (stem, zygote) {
            (Some(stem), _) => match stem.zygote.clone() {
                Some(z) => (Some(stem), Start::PackageZygote, Some(z)),
                None => (Some(stem), Start::StemCell, None),
            },
            (None, Some(z)) => match self.sandboxes.fork_package_stem_cell(&z) {
                Ok(cell) => (Some(cell), Start::PackageZygote, Some(z)),
                Err(e) => {
                    tracing::warn!(zygote = z.id, error = %ipc::chain(&e), "could not fork from the package zygote; starting plain");
                    match self.scheduler.take_stem_cell(function.runtime) {
                        Some(stem) => (Some(stem), Start::StemCell, None),
                        None => (None, Start::NewSandbox, None),
                    }
                }
            },
            (None, None) => (None, Start::NewSandbox, None),
        };
        let exact = served_by.as_deref().is_some_and(exact);
        self.zygotes.cold_start(function, exact, Instant::now());
        if !exact && self.zygotes.enabled() && SetKey::of(function).is_some() {
            // Its set is wanted: the manager may make its package zygote.
            self.scheduler.wake_manager();
        }
        if let Some(z) = &served_by {
            tracing::debug!(zygote = z.id, "from a package zygote");
        }
        self.start_instance(function, stem)
            .map(|inst| (inst, start))
    }

    /// A loaded instance of `function` in `stem` (or in a new sandbox): started by
    /// the sandboxes, bound, and its handler imported (within the function's timeout).
    fn start_instance(
        &self,
        function: &Function,
        stem: Option<StemCell>,
    ) -> Result<Instance, Error> {
        let from_stem_cell = stem.is_some();
        let mut inst = self.sandboxes.start_instance(function, stem, || {
            if from_stem_cell {
                // Only now wake the manager to refill: the spawner serves one request at
                // a time, and a new sandbox built ahead of this cold start's code attach
                // made the attach wait for it (a 4 ms start took ~25 ms).
                self.scheduler.wake_manager();
            }
        })?;
        self.runs.bind(inst.sandbox.id(), function);
        let load = LoadSpec {
            function: function.name.clone(),
            code_dir: rootfs::CODE_DIR.to_owned(),
            handler: function.handler.clone(),
            deps: function.deps.import_paths(),
            env: function.env.clone(),
            about: ipc::proto::About {
                namespace: function.namespace.clone(),
                version: function.version,
                memory_mb: function.memory_mb,
                timeout_ms: function.timeout_ms,
            },
        };
        let loaded = inst
            .link
            .send_load(&load)
            .map_err(CallFailure::Protocol)
            .and_then(|()| {
                inst.wait_loaded(Instant::now() + Duration::from_millis(function.timeout_ms))
            });
        match loaded {
            Ok(()) => Ok(inst),
            Err(CallFailure::Raised(error)) => {
                self.destroy(inst);
                Err(Error::LoadFailed {
                    function: function.name.clone(),
                    handler: match function.handler.to_string() {
                        h if h.is_empty() => "(the directory's module)".to_owned(),
                        h => h,
                    },
                    error,
                })
            }
            Err(failure) => {
                let logs = inst.take_logs();
                let err = self.failure(&inst, function, failure, logs);
                self.destroy(inst);
                Err(err)
            }
        }
    }

    /// Gives an instance back after an invocation: to the head of its function's
    /// queue, to the idle list, or (unhealthy, outdated, not kept warm) to the spawner.
    pub fn release(&self, inst: Instance, healthy: bool) {
        self.give_back(inst, healthy, false)
    }

    /// [`Invoker::release`] for an instance handed back by [`CallOpts::hand_back`]:
    /// it leaves its run first, and stops counting as returning.
    pub fn release_returning(&self, inst: Instance, run: &Arc<Run>, healthy: bool) {
        let healthy = self.runs.leave(&inst, run, healthy, &self.sandboxes);
        self.give_back(inst, healthy, true)
    }

    fn give_back(&self, inst: Instance, healthy: bool, returning: bool) {
        let current = self.registry.version_of(&inst.function);
        let keep = healthy
            && self.config.keep_warm
            && !self.scheduler.is_closed()
            && current == Some(inst.function_version)
            && self.runs.callees_current(inst.sandbox.id(), &self.registry);
        if !keep {
            let name = inst.function.clone();
            self.destroy(inst);
            if returning {
                self.scheduler.returned(&name);
            }
            self.scheduler.forget_instance(&name);
            return;
        }
        self.scheduler
            .put_back(inst, returning, self.config.pool.pause_grace);
    }

    /// Turns a failed call into its error.
    pub fn failure(
        &self,
        inst: &Instance,
        function: &Function,
        failure: CallFailure,
        logs: Logs,
    ) -> Error {
        let name = function.name.clone();
        match failure {
            CallFailure::TimedOut => Error::Timeout {
                function: name,
                timeout_ms: function.timeout_ms,
                logs,
            },
            CallFailure::Died if self.sandboxes.oom_killed(&inst.sandbox) => Error::OutOfMemory {
                function: name,
                limit_mb: function.memory_mb,
                logs,
            },
            CallFailure::Died => Error::InstanceDied {
                function: name,
                sandbox: inst.sandbox.id().to_owned(),
                pid: inst.pid,
                logs,
            },
            CallFailure::Cancelled => Error::Cancelled { function: name },
            CallFailure::Failed(message) => Error::CallFailed {
                function: name,
                message,
            },
            CallFailure::Protocol(source) => Error::Protocol {
                sandbox: inst.sandbox.id().to_owned(),
                peer: "instance",
                source,
            },
            CallFailure::Raised(error) => Error::Handler {
                function: name,
                error,
                logs,
            },
        }
    }

    /// Destroys the idle instances of `key`, and the idle instances of other functions
    /// that call `key` in their sandbox (they would keep running its old code), and
    /// wakes its waiters to look again (they find the new version, or that the
    /// function is gone). Demand for package sets no registered function has any
    /// more is forgotten.
    pub fn retire(&self, key: &FunctionKey) {
        let old = self
            .scheduler
            .retire(key, |inst| self.runs.calls_function(inst, key));
        for inst in old {
            self.destroy(inst);
        }
        // Its package set may be no registered function's any more.
        let sets = self
            .registry
            .all_functions()
            .iter()
            .filter_map(|f| SetKey::of(f))
            .collect();
        self.zygotes.retain(&sets);
    }

    /// Takes the idle instances and stem cells whose sandboxes died with a spawner
    /// out of the pool (so the next request gets a fresh sandbox), lets a waiter
    /// start a replacement for each, and wakes the manager to refill.
    pub fn forget_gone_sandboxes(&self) {
        let (idle, stems) = self.scheduler.take_gone(|id| self.sandboxes.is_gone(id));
        tracing::warn!(
            instances = idle.len(),
            stem_cells = stems.len(),
            "dropped the sandboxes of a dead spawner from the pool"
        );
        for inst in idle {
            self.destroy(inst);
        }
        for stem in stems {
            self.destroy_stem_cell(stem);
        }
        self.scheduler.wake_manager_now();
    }

    /// Destroys an instance's sandbox.
    pub fn destroy(&self, mut inst: Instance) {
        self.destroy_sandbox(&mut inst.sandbox, inst.reserved_mb);
    }

    pub fn destroy_stem_cell(&self, mut stem: StemCell) {
        self.destroy_sandbox(&mut stem.sandbox, stem.reserved_mb);
    }

    /// Destroys a sandbox, and everything the agent keeps of it: its binding, its
    /// run, its calls.
    fn destroy_sandbox(&self, sandbox: &mut Sandbox, reserved_mb: u64) {
        self.runs.forget(sandbox.id());
        self.book.forget(sandbox.id());
        self.sandboxes.destroy(sandbox, reserved_mb);
    }
}
