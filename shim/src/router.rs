//! The in-sandbox call router: one single-threaded poll loop over every channel the
//! shim holds.
//!
//! Every instance the shim forks gets a *calls channel* back to the shim; the shim
//! keeps its end for the instance's life. A `call` with a `spec` (on a calls channel,
//! or [`ShimRequest::Call`] from the agent) runs in this sandbox on a *local
//! instance*: one the shim forked, loaded and drives itself. The answer goes back on
//! the channel the call came from (its *origin*). Payloads are passed on as they
//! arrived: a shared (memfd) payload is forwarded, never copied.
//!
//! Local instances write their stdout and stderr to the pipes of the instance last
//! handed to the agent (the shim keeps their write ends), so a workflow's output shows
//! in its caller's logs; one that would write to an older hand-over's pipes is not
//! reused. Before any hand-over they write to `/dev/null`, and a spare taken for a
//! call has its own pipes read and thrown away by the loop.
//!
//! ```text
//! agent ──call──▶ shim ──invoke──▶ local instance B ──call (calls channel)──▶ shim ──invoke──▶ C
//!   ▲              │ ▲                                                          │
//!   └─call_returned┘ └────────────────── call_returned ◀── returned ────────────┘
//! ```
//!
//! Layout: the state ([`Router`]'s maps, [`IdlePools`], [`Pending`]) and the handlers
//! that change it sit in the middle; the I/O is at the edges: [`Router::turn`] polls
//! and reads, `reply` writes, and forking goes through [`Spawn`]. Nothing here
//! blocks on a peer except starting a local instance (fork, `ready`, `load`,
//! `loaded`), which holds up the whole loop for as long as the import takes.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, ErrorKind, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use ipc::proto::{
    check_depth, op_of, AgentLink, CallReply, CallRequest, CallSpec, FunctionError, InstanceEvent,
    InstanceLink, LoadSpec, RefusalKind, ShimRequest,
};
use ipc::{Channel, Message, Payload};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::zygote::{self, Forked, Spawn};

/// Idle local instances kept per function version; one more is killed.
pub const IDLE_PER_VERSION: usize = 2;

/// Direct channels one caller may hold at once (one per function it calls); a `bind`
/// past it is refused and the caller's calls go through the shim.
pub const MAX_BOUND_PER_CALLER: usize = 8;

/// Instances bound in the whole sandbox at once (bound callees may bind in turn, and
/// are not idle, so the idle pools' bound does not hold them); past it as above.
pub const MAX_BOUND_PER_SANDBOX: usize = 16;

/// The answer to a `resolve`, or a `call` without a `spec`, on a calls channel.
pub const NOT_HERE: &str = "resolve and remote calls go to the agent's call socket, not the shim";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("talking to the agent")]
    Agent(#[source] ipc::Error),
    #[error("forking an instance")]
    Zygote(#[source] zygote::Error),
    #[error("{what}")]
    Sys {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// What one [`Router::turn`] saw besides the router's own work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Nothing for the caller.
    Served,
    /// The caller's extra descriptor is readable.
    Woken,
    /// The agent closed its channel: the sandbox is over.
    AgentGone,
}

/// An instance the shim forked; never reused, so a stale key finds nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(u64);

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Where a call came from, and so where its answer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The agent's channel ([`ShimRequest::Call`]).
    Agent,
    /// The calls channel of this instance.
    Instance(Key),
}

/// A call a local instance is running.
#[derive(Debug)]
pub struct Pending {
    pub origin: Origin,
    /// The origin's id for the call.
    pub id: u64,
    /// The shim's id of the `invoke` sent to the callee.
    pub invoke_id: u64,
    /// The name the caller used.
    pub function: String,
    pub timeout_ms: u64,
    pub deadline: Instant,
}

/// A local instance: loaded with one function version, idle or running one call.
#[derive(Debug)]
struct Local {
    pid: i32,
    link: InstanceLink,
    function: String,
    version: u64,
    /// The [`Output`] it writes to; an instance of an older one is not reused.
    generation: u64,
    busy: Option<Pending>,
    /// The caller it serves on a direct channel: neither idle nor watched for
    /// deadlines (its caller keeps the time) until it says `unbound`.
    bound_to: Option<Binding>,
}

/// A local instance's direct channel: to whom, and the bind's token (never reused),
/// which its `unbound` and its caller's `unbind` must name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Binding {
    caller: Key,
    token: u64,
}

/// Idle local instances per (function, version), least recently used first.
#[derive(Debug, Default)]
pub struct IdlePools {
    pools: BTreeMap<(String, u64), Vec<Key>>,
}

impl IdlePools {
    /// The most recently used idle instance of `function` `version`.
    pub fn take(&mut self, function: &str, version: u64) -> Option<Key> {
        let pool = self.pools.get_mut(&(function.to_owned(), version))?;
        let key = pool.pop();
        if pool.is_empty() {
            self.pools.remove(&(function.to_owned(), version));
        }
        key
    }

    /// Puts `key` back; returns the instance that no longer fits (the least recently
    /// used), to be killed.
    pub fn put(&mut self, function: &str, version: u64, key: Key) -> Option<Key> {
        let pool = self
            .pools
            .entry((function.to_owned(), version))
            .or_default();
        pool.push(key);
        (pool.len() > IDLE_PER_VERSION).then(|| pool.remove(0))
    }

    /// Forgets `key` (its instance is gone); true if it was idle.
    pub fn remove(&mut self, key: Key) -> bool {
        let mut found = false;
        self.pools.retain(|_, pool| {
            if let Some(i) = pool.iter().position(|&k| k == key) {
                pool.remove(i);
                found = true;
            }
            !pool.is_empty()
        });
        found
    }

    /// Takes out every idle instance for which `retire(function, version, key)` holds.
    pub fn retire(&mut self, mut retire: impl FnMut(&str, u64, Key) -> bool) -> Vec<Key> {
        let mut out = Vec::new();
        self.pools.retain(|(function, version), pool| {
            pool.retain(|&k| {
                let r = retire(function, *version, k);
                if r {
                    out.push(k);
                }
                !r
            });
            !pool.is_empty()
        });
        out
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.pools.values().map(Vec::len).sum()
    }
}

/// The pipes local instances write their stdout and stderr to: those of the instance
/// last handed to the agent, so a workflow's output lands in its caller's logs.
/// Before any hand-over it is `/dev/null` (generation 0).
#[derive(Debug)]
struct Output {
    stdout: OwnedFd,
    stderr: OwnedFd,
    generation: u64,
}

/// An instance forked for the agent, with its pipes: the read ends go to the agent,
/// the shim keeps the write ends for the local instances that follow it.
#[derive(Debug)]
struct Handover {
    key: Key,
    pid: i32,
    channel: InstanceLink,
    stdout: OwnedFd,
    stderr: OwnedFd,
    stdout_w: OwnedFd,
    stderr_w: OwnedFd,
}

/// Why a local instance could not be had for a call.
#[derive(Debug)]
enum Refused {
    Failed(String),
    Raised(FunctionError),
}

/// How loading went.
#[derive(Debug)]
enum Loading {
    Loaded,
    Failed(FunctionError),
    TimedOut,
}

/// What one read of a busy callee's channel gave.
#[derive(Debug)]
enum Heard {
    Nothing,
    Answer(Message<InstanceEvent>),
    Died,
    Broke(String),
}

/// A descriptor the loop polls.
#[derive(Debug, Clone, Copy)]
enum Source {
    Extra,
    Discard(usize),
    Callee(Key),
    Calls(Key),
    Agent,
}

/// The shim's state: its agent, its zygote, and every instance it forked.
pub struct Router<Z> {
    agent: AgentLink,
    zygote: Z,
    /// Forked ahead for the agent's first `spawn_instance`.
    spare: Option<Handover>,
    /// Every live instance's calls channel: the agent's instances and local ones.
    calls: BTreeMap<Key, Channel>,
    locals: BTreeMap<Key, Local>,
    idle: IdlePools,
    output: Output,
    /// Output pipes nobody else reads (a spare that became a local instance before any
    /// hand-over): read and thrown away so the instance never blocks on a full pipe.
    discard: Vec<File>,
    next_key: u64,
    next_invoke: u64,
    next_bind: u64,
}

impl<Z: Spawn> Router<Z> {
    pub fn new(agent: AgentLink, zygote: Z) -> Result<Self, Error> {
        let null = |what| {
            File::options()
                .write(true)
                .open("/dev/null")
                .map(OwnedFd::from)
                .map_err(|source| Error::Sys { what, source })
        };
        Ok(Router {
            agent,
            zygote,
            spare: None,
            calls: BTreeMap::new(),
            locals: BTreeMap::new(),
            idle: IdlePools::default(),
            output: Output {
                stdout: null("open /dev/null")?,
                stderr: null("open /dev/null")?,
                generation: 0,
            },
            discard: Vec::new(),
            next_key: 1,
            next_invoke: 1,
            next_bind: 1,
        })
    }

    /// Forks the spare now, while nothing waits for it: it readies itself (and a stem
    /// cell is frozen with it in place). A refusal is only reported: `spawn_instance`
    /// forks again.
    pub fn fork_spare(&mut self) -> Result<(), Error> {
        match self.fork_for_agent(0)? {
            Ok(h) => self.spare = Some(h),
            Err(message) => warn(format_args!("could not fork a spare instance: {message}")),
        }
        Ok(())
    }

    pub fn announce_ready(&self, zygote_pid: i32) -> Result<(), Error> {
        self.agent.announce_ready(zygote_pid).map_err(Error::Agent)
    }

    // ------------------------------------------------------------------ the loop

    /// Waits for the next events (or the nearest call deadline) and handles them: the
    /// agent's requests, calls on calls channels, callees' answers, expired calls.
    /// `extra` is polled along (the shim's SIGCHLD signalfd) and reported as
    /// [`Turn::Woken`].
    pub fn turn(&mut self, extra: Option<BorrowedFd<'_>>) -> Result<Turn, Error> {
        let timeout = match self.next_deadline() {
            Some(d) => poll_timeout(d.saturating_duration_since(Instant::now())),
            None => PollTimeout::NONE,
        };
        let ready = self.wait(extra, timeout)?;
        let mut turn = Turn::Served;
        // Discarded pipes first, from the back: draining one may remove it.
        for s in ready.iter().rev() {
            if let Source::Discard(i) = *s {
                self.drain_discarded(i);
            }
        }
        for s in ready {
            match s {
                Source::Extra => turn = Turn::Woken,
                Source::Discard(_) => {}
                Source::Callee(key) => self.serve_callee(key)?,
                Source::Calls(key) => self.serve_calls(key)?,
                Source::Agent => {
                    if !self.serve_agent()? {
                        return Ok(Turn::AgentGone);
                    }
                }
            }
        }
        self.expire(Instant::now())?;
        Ok(turn)
    }

    /// Polls every descriptor of interest; returns the readable ones (closed and
    /// failed ones count: reading them tells what happened).
    fn wait<'a>(
        &'a self,
        extra: Option<BorrowedFd<'a>>,
        timeout: PollTimeout,
    ) -> Result<Vec<Source>, Error> {
        let mut sources = Vec::new();
        let mut fds = Vec::new();
        let mut watch = |s: Source, fd: BorrowedFd<'a>| {
            sources.push(s);
            fds.push(PollFd::new(fd, PollFlags::POLLIN));
        };
        if let Some(fd) = extra {
            watch(Source::Extra, fd);
        }
        for (i, f) in self.discard.iter().enumerate() {
            watch(Source::Discard(i), f.as_fd());
        }
        // Answers before new calls: a callee that answered is idle for them.
        for (&key, local) in &self.locals {
            if local.busy.is_some() || local.bound_to.is_some() {
                watch(Source::Callee(key), local.link.0.as_fd());
            }
        }
        for (&key, calls) in &self.calls {
            watch(Source::Calls(key), calls.as_fd());
        }
        watch(Source::Agent, self.agent.0.as_fd());
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(Errno::EINTR) => return Ok(Vec::new()),
            Err(e) => {
                return Err(Error::Sys {
                    what: "poll",
                    source: e.into(),
                })
            }
        }
        Ok(sources
            .into_iter()
            .zip(&fds)
            .filter(|(_, f)| f.any().unwrap_or(true))
            .map(|(s, _)| s)
            .collect())
    }

    /// The nearest deadline of a running call.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.locals
            .values()
            .filter_map(|l| l.busy.as_ref().map(|p| p.deadline))
            .min()
    }

    /// Reads the agent's requests; false when the agent let go of the sandbox.
    fn serve_agent(&mut self) -> Result<bool, Error> {
        match self.agent.0.fill() {
            Ok(0) => return Ok(false),
            Ok(_) => {}
            Err(e) if e.is_peer_gone() => return Ok(false),
            Err(e) => return Err(Error::Agent(e)),
        }
        while let Some(msg) = self.agent.0.try_recv().map_err(Error::Agent)? {
            match msg.header {
                ShimRequest::SpawnInstance { instance, runtime } => {
                    if runtime == self.zygote.runtime() {
                        self.spawn_instance(instance)?;
                    } else {
                        let message = format!(
                            "this sandbox runs {} instances, not {}",
                            self.zygote.runtime().name(),
                            runtime.name()
                        );
                        self.agent
                            .report_spawn_failed(instance, message)
                            .map_err(Error::Agent)?;
                    }
                }
                ShimRequest::Call {
                    id,
                    depth,
                    raw,
                    spec,
                } => {
                    let function = spec.function.clone();
                    self.call(Origin::Agent, id, function, depth, raw, &spec, &msg.payload)?;
                }
                // Only the fork server makes sandboxes; its descriptors close here.
                ShimRequest::ForkSandbox(spec) => {
                    let event = ipc::proto::ShimEvent::SandboxForkFailed {
                        sandbox: spec.sandbox,
                        message: "this sandbox is not the fork server".into(),
                    };
                    self.agent.0.send(&event, b"", &[]).map_err(Error::Agent)?;
                }
                ShimRequest::ImportPackages(_) => {
                    let event = ipc::proto::ShimEvent::ImportRefused {
                        message: "this sandbox is not a package fork server".into(),
                    };
                    self.agent.0.send(&event, b"", &[]).map_err(Error::Agent)?;
                }
            }
        }
        Ok(true)
    }

    /// Reads the calls an instance makes on its calls channel.
    fn serve_calls(&mut self, key: Key) -> Result<(), Error> {
        let Some(end) = self.calls.get_mut(&key) else {
            return Ok(());
        };
        let mut requests = Vec::new();
        let mut closed = match end.fill() {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => {
                if !e.is_peer_gone() {
                    warn(format_args!(
                        "calls channel of instance {key}: {}",
                        ipc::chain(&e)
                    ));
                }
                true
            }
        };
        while !closed {
            match end.try_recv::<CallRequest>() {
                Ok(Some(m)) => requests.push(m),
                Ok(None) => break,
                Err(e) => {
                    // A broken frame: the channel is not used any further.
                    warn(format_args!(
                        "calls channel of instance {key}: {}",
                        ipc::chain(&e)
                    ));
                    closed = true;
                }
            }
        }
        if closed {
            // The instance is gone (or broke the framing): nobody is left to answer.
            self.forget_calls(key);
            return Ok(());
        }
        for m in requests {
            let origin = Origin::Instance(key);
            match m.header {
                // A spec from an instance runs only code the agent attached for it.
                CallRequest::Call {
                    id,
                    function,
                    spec: Some(spec),
                    ..
                }
                | CallRequest::Bind { id, function, spec }
                    if !spec_is_attached(&function, &spec) =>
                {
                    self.reply(
                        origin,
                        &CallReply::CallFailed {
                            id,
                            function: function.clone(),
                            message: format!(
                                "spec for {function:?} names {:?}, not the code the agent attached ({})",
                                spec.code_dir,
                                attached_dir(&spec.function, spec.version)
                            ),
                        },
                        None,
                    )?
                }
                CallRequest::Bind { id, function, spec } => self.bind(key, id, function, &spec)?,
                CallRequest::Unbind { callee } => self.unbind(key, callee),
                CallRequest::Call {
                    id,
                    function,
                    depth,
                    raw,
                    spec: Some(spec),
                } => self.call(origin, id, function, depth, raw, &spec, &m.payload)?,
                CallRequest::Call {
                    id,
                    function,
                    spec: None,
                    ..
                }
                | CallRequest::Resolve { id, function } => {
                    let message = NOT_HERE.to_owned();
                    let failed = CallReply::CallFailed {
                        id,
                        function,
                        message,
                    };
                    self.reply(origin, &failed, None)?;
                }
            }
        }
        Ok(())
    }

    /// Reads a busy callee's answer (or its death).
    fn serve_callee(&mut self, key: Key) -> Result<(), Error> {
        let Some(local) = self.locals.get_mut(&key) else {
            return Ok(());
        };
        if local.bound_to.is_some() {
            self.serve_bound(key);
            return Ok(());
        }
        if local.busy.is_none() {
            return Ok(());
        }
        match hear(&mut local.link) {
            Heard::Nothing => Ok(()),
            Heard::Answer(m) => self.answered(key, m),
            Heard::Died => self.fail_callee(key, false, |f, pid| {
                format!("{f}'s instance (pid {pid}) died while running (out of memory or killed?)")
            }),
            Heard::Broke(why) => self.fail_callee(key, true, |f, pid| {
                format!("{f}'s instance (pid {pid}) broke the protocol: {why}")
            }),
        }
    }

    /// Reads a bound callee's instance channel: `unbound` (its caller closed the direct
    /// channel) makes it idle again; anything else, or its death, ends it.
    fn serve_bound(&mut self, key: Key) {
        let Some(local) = self.locals.get_mut(&key) else {
            return;
        };
        let token = local.bound_to.map(|b| b.token);
        match hear(&mut local.link) {
            Heard::Nothing => {}
            Heard::Answer(Message {
                header: InstanceEvent::Unbound { token: t },
                ..
            }) if Some(t) == token => {
                local.bound_to = None;
                // What it bound itself stays bound to it (its own direct channels).
                self.release(key);
            }
            Heard::Answer(m) => {
                warn(format_args!(
                    "bound instance {key} sent {} on its instance channel",
                    op_of(&m.header)
                ));
                self.forget_instance(key, true);
            }
            Heard::Died => self.forget_instance(key, false),
            Heard::Broke(why) => {
                warn(format_args!("bound instance {key}: {why}"));
                self.forget_instance(key, true);
            }
        }
    }

    fn drain_discarded(&mut self, i: usize) {
        let mut buf = [0u8; 64 << 10];
        match self.discard[i].read(&mut buf) {
            Ok(0) => {
                self.discard.remove(i);
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock) => {}
            Err(_) => {
                self.discard.remove(i);
            }
        }
    }

    // ------------------------------------------------------------------ calls

    /// Runs a call with a spec on a local instance, or answers why it cannot run.
    #[allow(clippy::too_many_arguments)]
    fn call(
        &mut self,
        origin: Origin,
        id: u64,
        function: String,
        depth: u32,
        raw: bool,
        spec: &CallSpec,
        event: &Payload,
    ) -> Result<(), Error> {
        if let Err(message) = check_depth(&function, depth) {
            return self.refuse(origin, id, function, Refused::Failed(message));
        }
        self.retire_older_versions(&spec.function, spec.version);
        let invoke_id = self.next_invoke;
        self.next_invoke += 1;
        loop {
            let (key, fresh) = match self.take_local(spec, &function)? {
                Ok(taken) => taken,
                Err(refused) => return self.refuse(origin, id, function, refused),
            };
            let local = self
                .locals
                .get_mut(&key)
                .expect("idle keys are local instances");
            match local.link.send_call(invoke_id, depth, raw, event) {
                Ok(()) => {
                    local.busy = Some(Pending {
                        origin,
                        id,
                        invoke_id,
                        function,
                        timeout_ms: spec.timeout_ms,
                        deadline: deadline_after(spec.timeout_ms),
                    });
                    return Ok(());
                }
                Err(e) => {
                    if let Some(message) = self.drop_taken(key, fresh, &e, "the call", &function) {
                        return self.refuse(origin, id, function, Refused::Failed(message));
                    }
                }
            }
        }
    }

    /// Drops a taken instance that could not be sent `what`: it died while idle (its
    /// calls channel has not told us yet), or what it was sent cannot be sent. For an
    /// idle one, `None`: the next is tried; for a fresh one, why the request fails.
    fn drop_taken(
        &mut self,
        key: Key,
        fresh: bool,
        e: &ipc::Error,
        what: &str,
        function: &str,
    ) -> Option<String> {
        let pid = self.locals.get(&key).map_or(0, |l| l.pid);
        self.forget_instance(key, !e.is_peer_gone());
        fresh.then(|| {
            format!(
                "{function}'s instance (pid {pid}) could not take {what}: {}",
                ipc::chain(e)
            )
        })
    }

    /// An idle instance of `spec` (`false`), or a new one started for it (`true`).
    fn take_local(
        &mut self,
        spec: &CallSpec,
        function: &str,
    ) -> Result<Result<(Key, bool), Refused>, Error> {
        if let Some(key) = self.idle.take(&spec.function, spec.version) {
            return Ok(Ok((key, false)));
        }
        Ok(self.start_local(spec, function)?.map(|key| (key, true)))
    }

    /// Answers a call or bind that could not have an instance.
    fn refuse(
        &mut self,
        origin: Origin,
        id: u64,
        function: String,
        refused: Refused,
    ) -> Result<(), Error> {
        let reply = match refused {
            Refused::Failed(message) => CallReply::CallFailed {
                id,
                function,
                message,
            },
            Refused::Raised(error) => CallReply::CallRaised {
                id,
                function,
                error,
            },
        };
        self.reply(origin, &reply, None)
    }

    /// Gives `caller` a direct channel to an instance of `spec` of its own: a socket
    /// pair, one end to an idle (or new) instance with `bind`, the other to the caller
    /// with `bound`. From then on the two talk without the shim; the caller keeps the
    /// callee's time and asks for it to be killed (`unbind`) when it is past it.
    fn bind(
        &mut self,
        caller: Key,
        id: u64,
        function: String,
        spec: &CallSpec,
    ) -> Result<(), Error> {
        let origin = Origin::Instance(caller);
        let bound = self.locals.values().filter_map(|l| l.bound_to);
        let (mine, all) = bound.fold((0, 0), |(m, a), b| {
            (m + usize::from(b.caller == caller), a + 1)
        });
        if mine >= MAX_BOUND_PER_CALLER || all >= MAX_BOUND_PER_SANDBOX {
            let message = format!(
                "{mine} direct channels are bound to this instance and {all} in the sandbox, \
                 the most there may be ({MAX_BOUND_PER_CALLER} and {MAX_BOUND_PER_SANDBOX}); \
                 call {function:?} through the shim"
            );
            let refused = CallReply::CallRefused {
                id,
                function,
                kind: RefusalKind::TooManyChannels,
                message,
            };
            return self.reply(origin, &refused, None);
        }
        let (callee_end, caller_end) = match std::os::unix::net::UnixStream::pair() {
            Ok(pair) => pair,
            Err(e) => {
                let message = format!("no socket pair for a direct channel to {function}: {e}");
                return self.refuse(origin, id, function, Refused::Failed(message));
            }
        };
        self.retire_older_versions(&spec.function, spec.version);
        loop {
            let (key, fresh) = match self.take_local(spec, &function)? {
                Ok(taken) => taken,
                Err(refused) => return self.refuse(origin, id, function, refused),
            };
            let token = self.next_bind;
            let local = self
                .locals
                .get_mut(&key)
                .expect("taken keys are local instances");
            match local.link.send_bind(token, callee_end.as_fd()) {
                Ok(()) => {
                    self.next_bind += 1;
                    local.bound_to = Some(Binding { caller, token });
                    drop(callee_end);
                    let bound = CallReply::Bound { id, callee: token };
                    return self.reply_with(origin, &bound, None, &[caller_end.as_fd()]);
                }
                Err(e) => {
                    let what = "a direct channel";
                    if let Some(message) = self.drop_taken(key, fresh, &e, what, &function) {
                        return self.refuse(origin, id, function, Refused::Failed(message));
                    }
                }
            }
        }
    }

    /// Kills the callee of bind `token` for `caller`, which timed out waiting for it
    /// on their direct channel; a token of another caller's (or a stale one) is
    /// ignored.
    fn unbind(&mut self, caller: Key, token: u64) {
        let binding = Some(Binding { caller, token });
        let callee = self
            .locals
            .iter()
            .find(|(_, l)| l.bound_to == binding)
            .map(|(&k, _)| k);
        if let Some(callee) = callee {
            self.forget_instance(callee, true);
        }
    }

    /// Starts a local instance of `spec` and loads it: the spare if there is one,
    /// else a fork. This blocks the loop (fork, `ready`, the handler's import, up to
    /// `spec.timeout_ms`): the only place the router waits for a peer.
    fn start_local(
        &mut self,
        spec: &CallSpec,
        function: &str,
    ) -> Result<Result<Key, Refused>, Error> {
        let (key, pid, mut link) = if let Some(spare) = self.spare.take() {
            // Its pipes were made for the agent and nobody reads them now.
            self.discard.push(File::from(spare.stdout));
            self.discard.push(File::from(spare.stderr));
            (spare.key, spare.pid, spare.channel)
        } else {
            let key = self.new_key();
            let forked = self
                .zygote
                .fork(
                    key.0,
                    self.output.stdout.as_fd(),
                    self.output.stderr.as_fd(),
                )
                .map_err(Error::Zygote)?;
            match forked {
                Ok(Forked {
                    pid,
                    channel,
                    calls,
                }) => {
                    self.calls.insert(key, calls);
                    (key, pid, channel)
                }
                Err(message) => {
                    return Ok(Err(Refused::Failed(format!(
                        "could not start an instance of {function}: {message}"
                    ))))
                }
            }
        };
        let load = LoadSpec {
            function: spec.function.clone(),
            code_dir: spec.code_dir.clone(),
            handler: spec.handler.clone(),
            deps: spec.deps.clone(),
            about: spec.about(),
            env: spec.env.clone(),
        };
        let loading = link
            .send_load(&load)
            .and_then(|()| wait_loaded(&mut link, Duration::from_millis(spec.timeout_ms)));
        let refused = match loading {
            Ok(Loading::Loaded) => {
                let local = Local {
                    pid,
                    link,
                    function: spec.function.clone(),
                    version: spec.version,
                    generation: self.output.generation,
                    busy: None,
                    bound_to: None,
                };
                self.locals.insert(key, local);
                return Ok(Ok(key));
            }
            // The runtime exits after `load_failed`.
            Ok(Loading::Failed(error)) => (Refused::Raised(error), false),
            Ok(Loading::TimedOut) => {
                let ms = spec.timeout_ms;
                let message = format!("{function} timed out after {ms} ms while loading");
                (Refused::Failed(message), true)
            }
            Err(e) if e.is_peer_gone() => {
                let message = format!(
                    "{function}'s instance (pid {pid}) died while loading (out of memory or killed?)"
                );
                (Refused::Failed(message), false)
            }
            Err(e) => {
                let message = format!(
                    "{function}'s instance (pid {pid}) broke the protocol while loading: {}",
                    ipc::chain(&e)
                );
                (Refused::Failed(message), true)
            }
        };
        let (refused, kill) = refused;
        if kill {
            self.zygote.kill(pid);
        }
        self.forget_calls(key);
        Ok(Err(refused))
    }

    /// A busy callee answered.
    fn answered(&mut self, key: Key, m: Message<InstanceEvent>) -> Result<(), Error> {
        let local = self.locals.get_mut(&key).expect("a busy callee");
        let pending = local.busy.take().expect("a busy callee");
        let (reply, payload) = match m.header {
            InstanceEvent::Returned { id, raw, .. } if id == pending.invoke_id => {
                let returned = CallReply::CallReturned {
                    id: pending.id,
                    raw,
                };
                (returned, Some(m.payload))
            }
            InstanceEvent::Raised { id, error, .. } if id == pending.invoke_id => {
                let raised = CallReply::CallRaised {
                    id: pending.id,
                    function: pending.function.clone(),
                    error,
                };
                (raised, None)
            }
            other => {
                let why = format!(
                    "unexpected {} while running call {}",
                    variant_name(op_of(&other)),
                    pending.invoke_id
                );
                local.busy = Some(pending);
                return self.fail_callee(key, true, |f, pid| {
                    format!("{f}'s instance (pid {pid}) broke the protocol: {why}")
                });
            }
        };
        self.release(key);
        self.reply(pending.origin, &reply, payload.as_ref())
    }

    /// Ends a busy callee's call with `call_failed` (`message(function, pid)`) and
    /// forgets the instance, killing it first if `kill`.
    fn fail_callee(
        &mut self,
        key: Key,
        kill: bool,
        message: impl FnOnce(&str, i32) -> String,
    ) -> Result<(), Error> {
        let Some(local) = self.locals.get_mut(&key) else {
            return Ok(());
        };
        let pid = local.pid;
        let pending = local.busy.take();
        self.forget_instance(key, kill);
        let Some(p) = pending else {
            return Ok(());
        };
        let failed = CallReply::CallFailed {
            id: p.id,
            message: message(&p.function, pid),
            function: p.function,
        };
        self.reply(p.origin, &failed, None)
    }

    /// Kills the callees whose deadline passed and fails their calls.
    pub fn expire(&mut self, now: Instant) -> Result<(), Error> {
        let expired: Vec<(Key, u64)> = self
            .locals
            .iter()
            .filter_map(|(&k, l)| {
                let p = l.busy.as_ref()?;
                (p.deadline <= now).then_some((k, p.timeout_ms))
            })
            .collect();
        for (key, ms) in expired {
            self.fail_callee(key, true, |f, _| format!("{f} timed out after {ms} ms"))?;
        }
        Ok(())
    }

    /// Sends an answer to its origin; an origin that is gone drops it.
    fn reply(
        &mut self,
        origin: Origin,
        reply: &CallReply,
        payload: Option<&Payload>,
    ) -> Result<(), Error> {
        self.reply_with(origin, reply, payload, &[])
    }

    /// [`Self::reply`] with descriptors in the frame.
    fn reply_with(
        &mut self,
        origin: Origin,
        reply: &CallReply,
        payload: Option<&Payload>,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), Error> {
        let empty = Payload::default();
        let payload = payload.unwrap_or(&empty);
        match origin {
            Origin::Agent => self
                .agent
                .0
                .send_payload(reply, payload, fds)
                .map_err(Error::Agent),
            Origin::Instance(key) => {
                let Some(end) = self.calls.get(&key) else {
                    return Ok(());
                };
                if let Err(e) = end.send_payload(reply, payload, fds) {
                    if !e.is_peer_gone() {
                        warn(format_args!(
                            "calls channel of instance {key}: {}",
                            ipc::chain(&e)
                        ));
                    }
                    self.forget_calls(key);
                }
                Ok(())
            }
        }
    }

    // ------------------------------------------------------------------ instances

    /// Hands the spare (or a new fork) to the agent; its pipes become the local
    /// instances' output.
    fn spawn_instance(&mut self, instance: u64) -> Result<(), Error> {
        let handover = match self.spare.take() {
            Some(spare) => Ok(spare),
            None => self.fork_for_agent(instance)?,
        };
        let h = match handover {
            Ok(h) => h,
            Err(message) => {
                return self
                    .agent
                    .report_spawn_failed(instance, message)
                    .map_err(Error::Agent)
            }
        };
        self.agent
            .report_spawned(instance, h.pid, &h.channel.0, h.stdout, h.stderr)
            .map_err(Error::Agent)?;
        self.output = Output {
            stdout: h.stdout_w,
            stderr: h.stderr_w,
            generation: self.output.generation + 1,
        };
        // Idle instances writing to older pipes are not reused.
        let generation = self.output.generation;
        let locals = &self.locals;
        // Bound ones are left to finish with their callers: one is killed when it says
        // `unbound` (`release`), or with its caller.
        let stale = self
            .idle
            .retire(|_, _, k| locals.get(&k).is_some_and(|l| l.generation != generation));
        for key in stale {
            self.forget_instance(key, true);
        }
        Ok(())
    }

    /// Forks an instance for the agent, with pipes of its own.
    fn fork_for_agent(&mut self, instance: u64) -> Result<Result<Handover, String>, Error> {
        let sys = |what| move |source| Error::Sys { what, source };
        let (stdout, stdout_w) = io::pipe().map_err(sys("pipe"))?;
        let (stderr, stderr_w) = io::pipe().map_err(sys("pipe"))?;
        let key = self.new_key();
        let forked = self
            .zygote
            .fork(instance, stdout_w.as_fd(), stderr_w.as_fd())
            .map_err(Error::Zygote)?;
        Ok(forked.map(|f| {
            self.calls.insert(key, f.calls);
            Handover {
                key,
                pid: f.pid,
                channel: f.channel,
                stdout: stdout.into(),
                stderr: stderr.into(),
                stdout_w: stdout_w.into(),
                stderr_w: stderr_w.into(),
            }
        }))
    }

    /// A callee answered: back to the idle list, unless that is full or it writes to
    /// pipes no longer the sandbox's output.
    fn release(&mut self, key: Key) {
        let Some(local) = self.locals.get(&key) else {
            return;
        };
        if local.generation != self.output.generation {
            return self.forget_instance(key, true);
        }
        if let Some(extra) = self.idle.put(&local.function, local.version, key) {
            self.forget_instance(extra, true);
        }
    }

    /// Kills idle instances of `function` older than `version` (a newer registration
    /// is a different function).
    fn retire_older_versions(&mut self, function: &str, version: u64) {
        let old = self.idle.retire(|f, v, _| f == function && v < version);
        for key in old {
            self.forget_instance(key, true);
        }
    }

    /// An instance's calls channel closed: it is gone. A busy one's death is told by
    /// its own channel closing.
    fn forget_calls(&mut self, key: Key) {
        self.calls.remove(&key);
        self.forget_bound_to(key);
        if self.spare.as_ref().is_some_and(|s| s.key == key) {
            self.spare = None;
        }
        if self.locals.get(&key).is_some_and(|l| l.busy.is_none()) {
            self.forget_instance(key, false);
        }
    }

    /// Drops everything of a local instance (killing it first if `kill`; dropping its
    /// channel alone ends an instance that still lives).
    fn forget_instance(&mut self, key: Key, kill: bool) {
        if let Some(local) = self.locals.remove(&key) {
            if kill {
                self.zygote.kill(local.pid);
            }
        }
        self.idle.remove(key);
        self.calls.remove(&key);
        self.forget_bound_to(key);
    }

    /// Kills the callees bound to `caller`, which is gone: a callee never outlives
    /// its caller, since the shim does not keep a bound callee's time. (Their own
    /// bound callees follow, through `forget_instance`; each is removed before its
    /// own are looked for, so a ring of bindings ends.)
    fn forget_bound_to(&mut self, caller: Key) {
        let bound: Vec<Key> = self
            .locals
            .iter()
            .filter(|(_, l)| l.bound_to.is_some_and(|b| b.caller == caller))
            .map(|(&k, _)| k)
            .collect();
        for callee in bound {
            self.forget_instance(callee, true);
        }
    }

    fn new_key(&mut self) -> Key {
        let key = Key(self.next_key);
        self.next_key += 1;
        key
    }
}

/// One read of a busy callee's channel.
fn hear(link: &mut InstanceLink) -> Heard {
    // A frame may already be buffered from an earlier read; while one is, the
    // channel reads no further (`Channel::fill` says `WouldBlock`).
    match link.0.try_recv() {
        Ok(Some(m)) => return Heard::Answer(m),
        Ok(None) => {}
        Err(e) => return Heard::Broke(ipc::chain(&e)),
    }
    match link.0.fill() {
        Ok(0) => return Heard::Died,
        Ok(_) => {}
        Err(e) if e.is_peer_gone() => return Heard::Died,
        Err(e) => return Heard::Broke(ipc::chain(&e)),
    }
    match link.0.try_recv() {
        Ok(Some(m)) => Heard::Answer(m),
        Ok(None) => Heard::Nothing,
        Err(e) => Heard::Broke(ipc::chain(&e)),
    }
}

/// Waits for `loaded` at most `timeout`.
fn wait_loaded(link: &mut InstanceLink, timeout: Duration) -> Result<Loading, ipc::Error> {
    let deadline = Instant::now().checked_add(timeout);
    let loading = loop {
        match link.0.try_recv::<InstanceEvent>() {
            Ok(Some(m)) => {
                break match m.header {
                    InstanceEvent::Loaded { .. } => Ok(Loading::Loaded),
                    InstanceEvent::LoadFailed { error } => Ok(Loading::Failed(error)),
                    other => Err(ipc::Error::Unexpected {
                        op: op_of(&other).to_owned(),
                        expected: "loaded",
                    }),
                }
            }
            Ok(None) => {}
            Err(e) => break Err(e),
        }
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if left.is_some_and(|l| l.is_zero()) {
            break Ok(Loading::TimedOut);
        }
        if let Err(e) = link.0.stream().set_read_timeout(left) {
            break Err(ipc::Error::Io(e));
        }
        match link.0.fill() {
            Ok(0) => break Err(ipc::Error::Closed),
            Ok(_) => {}
            Err(ipc::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                break Ok(Loading::TimedOut)
            }
            Err(e) => break Err(e),
        }
    };
    let _ = link.0.stream().set_read_timeout(None);
    loading
}

/// Where the agent attaches a called function's code in a sandbox.
pub fn attached_dir(function: &str, version: u64) -> String {
    ipc::sandbox_paths::callee_dir(function, version)
}

/// Whether a spec sent by an instance is one the agent resolved: the function it
/// calls, its code where the agent attaches it.
fn spec_is_attached(function: &str, spec: &CallSpec) -> bool {
    spec.function == function && spec.code_dir == attached_dir(&spec.function, spec.version)
}

/// `timeout_ms` from now (far in the future for an absurd timeout).
fn deadline_after(timeout_ms: u64) -> Instant {
    let now = Instant::now();
    now.checked_add(Duration::from_millis(timeout_ms))
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

/// A poll timeout that does not wake before `left` is over.
fn poll_timeout(left: Duration) -> PollTimeout {
    PollTimeout::try_from(left.as_micros().div_ceil(1000)).unwrap_or(PollTimeout::MAX)
}

/// The message variant an op stands for (`returned` → `Returned`), as a callee that
/// broke the protocol has always been reported to its caller.
fn variant_name(op: &str) -> String {
    let mut name = String::with_capacity(op.len());
    for word in op.split('_') {
        let mut chars = word.chars();
        name.extend(chars.next().map(|c| c.to_ascii_uppercase()));
        name.push_str(chars.as_str());
    }
    name
}

/// Problems that are not any caller's answer go to the shim's stderr.
fn warn(message: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(io::stderr(), "sprout-shim: {message}");
}

#[cfg(test)]
mod tests;
