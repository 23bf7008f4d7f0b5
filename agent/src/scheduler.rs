//! The scheduler ([`Scheduler`]): per-function scheduling state — warm instances, the
//! count of live ones, and the queue of requests waiting for one (OpenWhisk's
//! per-action queue, on one node) — and the stem cells, kept per runtime, under one
//! lock. It only keeps state; its callers start and destroy instances outside it.
//!
//! A request takes the most recently used idle instance; if there is none and the
//! function is below its `max_instances`, it starts one (from a stem cell when one is
//! ready) — so instances are added as the backlog grows; otherwise it waits in the
//! function's FIFO queue. A finished instance goes straight to the head of the queue,
//! or back to the idle list. Waiters are woken to retry when an instance dies (so one
//! of them can start a replacement) and closed when the agent shuts down.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipc::proto::ShimLink;
use parking_lot::{Condvar, Mutex, MutexGuard};
use pool::{Sandbox, SandboxState};

use crate::config::PoolConfig;
use crate::error::Error;
use crate::instance::Instance;
use crate::names::FunctionKey;
use crate::registry::Function;
use crate::runtime::Runtime;
use crate::zygotes::ZygoteTag;

/// The scheduler: every function's idle instances, count and queue, and the stem
/// cells, under one lock; and the condition variable that wakes the pool manager.
/// It only keeps state: it starts and destroys nothing (its callers do, outside its
/// lock).
#[derive(Debug)]
pub(crate) struct Scheduler {
    state: Mutex<Sched>,
    /// Wakes the pool manager (paired with `state`).
    wake: Condvar,
    /// The agent is shutting down: no instance is handed out any more.
    closed: AtomicBool,
    /// Requests one function's queue may hold; one more is refused.
    max_queue: usize,
}

/// What the scheduler's lock guards (the pool manager works on it in passes).
#[derive(Debug, Default)]
pub(crate) struct Sched {
    /// By namespace and name: instances never serve another namespace's function.
    functions: HashMap<FunctionKey, FnPool>,
    /// Ready (frozen) stem cells by runtime, most recent last.
    stem_cells: BTreeMap<Runtime, Vec<StemCell>>,
    /// Stem cells being created by the manager, by runtime.
    stem_starting: BTreeMap<Runtime, usize>,
    /// Ready (frozen) stem cells forked from package zygotes, most recent last.
    package_stems: Vec<StemCell>,
    /// Package zygotes a stem cell is being forked from by the manager.
    package_starting: std::collections::BTreeSet<u64>,
    /// When the manager will next look by itself (None: it sleeps until woken).
    manager_deadline: Option<Instant>,
}

#[derive(Debug, Default)]
struct FnPool {
    /// Idle instances (thawed or frozen), least recently used first.
    idle: Vec<Instance>,
    /// Instances that exist: idle, running, or starting.
    live: usize,
    /// Requests waiting for an instance.
    queue: VecDeque<Arc<Slot>>,
    /// Instances that answered a call and are about to come back (they are leaving
    /// a workflow run), counted in `live`.
    returning: usize,
}

impl FnPool {
    /// Passes a retry on to the first waiter (the one it was for is not going to
    /// use it): it may start the replacement instance.
    fn retry_next(&mut self) {
        if let Some(slot) = self.queue.pop_front() {
            slot.retry();
        }
    }
}

/// A prewarmed sandbox: shim and zygote up, bound to no function.
#[derive(Debug)]
pub struct StemCell {
    pub sandbox: Sandbox,
    pub shim: ShimLink,
    /// Memory (MiB) counted against the budget for it.
    pub reserved_mb: u64,
    /// The package zygote it was forked from (its packages are imported and mounted).
    pub zygote: Option<Arc<ZygoteTag>>,
}

/// What [`Scheduler::grant`] gives a request.
// Moved once per acquire; boxing the instance would allocate on the warm path.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Grant {
    /// The most recently used idle instance.
    Idle(Instance),
    /// Start a new instance (counted already), in this stem cell if there is one.
    Start(Option<StemCell>),
    /// Wait in the function's queue.
    Wait(Arc<Slot>),
}

/// The sandboxes the scheduler holds, by state.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Held {
    /// Ready stem cells, plain and package ones.
    pub stem_cells: usize,
    /// Idle instances, thawed.
    pub idle: usize,
    /// Idle instances, frozen.
    pub frozen: usize,
}

/// What the status reports of the pool.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Counts {
    pub frozen: usize,
    pub stem_cells: usize,
    /// Ready stem cells by runtime, in [`Runtime::ALL`]'s order.
    pub stem_cells_by_runtime: [usize; Runtime::ALL.len()],
    pub queued: usize,
}

impl Scheduler {
    /// A scheduler whose function queues hold at most `max_queue` requests each (at
    /// least 1).
    pub fn new(max_queue: usize) -> Scheduler {
        Scheduler {
            state: Mutex::default(),
            wake: Condvar::new(),
            closed: AtomicBool::new(false),
            max_queue: max_queue.max(1),
        }
    }

    /// Marks the agent as shutting down and wakes the manager; `false` if it was
    /// already.
    pub fn close(&self) -> bool {
        if self.closed.swap(true, Ordering::SeqCst) {
            return false;
        }
        // Under the lock, so the manager cannot miss it between its check and its wait.
        let _sched = self.state.lock();
        self.wake.notify_all();
        true
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// An idle instance of `function` (of its current version: older ones are
    /// returned, taken out, for the caller to destroy), leave to start a new one
    /// (while the function is below `max_instances`), or a place in its queue
    /// (`retried`: at the front, whatever its length, as it had one already). A full
    /// queue refuses the request ([`Error::QueueFull`]): it never enters it. A new one gets the stem cell of the package zygote
    /// that serves it with the most packages, else (unless `package_zygote`: one
    /// serves it, to fork from) a plain one of its runtime.
    pub fn grant(
        &self,
        key: &FunctionKey,
        function: &Function,
        retried: bool,
        package_zygote: bool,
    ) -> Result<(Grant, Vec<Instance>), Error> {
        let mut sched = self.state.lock();
        if self.is_closed() {
            return Err(Error::ShuttingDown);
        }
        let pool = sched.pool(key);
        let stale: Vec<Instance> = pool
            .idle
            .extract_if(.., |i| i.function_version != function.version)
            .collect();
        pool.live -= stale.len();
        if let Some(inst) = pool.idle.pop() {
            return Ok((Grant::Idle(inst), stale));
        }
        // Instances on their way back (answered, leaving a workflow run) will serve
        // as many waiters: only start one beyond those.
        let may_start = pool.live < function.max_instances && pool.returning <= pool.queue.len();
        if may_start {
            pool.live += 1;
            let stem = sched.take_package_stem(function).or_else(|| {
                if package_zygote {
                    return None;
                }
                sched
                    .stem_cells
                    .get_mut(&function.runtime)
                    .and_then(Vec::pop)
            });
            return Ok((Grant::Start(stem), stale));
        }
        if !retried && pool.queue.len() >= self.max_queue {
            return Err(Error::QueueFull {
                function: key.to_string(),
                max_queue: self.max_queue,
            });
        }
        let slot = Arc::new(Slot::default());
        // A request woken to retry keeps its place at the front.
        if retried {
            pool.queue.push_front(slot.clone());
        } else {
            pool.queue.push_back(slot.clone());
        }
        Ok((Grant::Wait(slot), stale))
    }

    /// Takes a waiter that gave up out of its queue: nobody can hand it an instance
    /// after that.
    pub fn leave_queue(&self, key: &FunctionKey, slot: &Arc<Slot>) {
        self.state
            .lock()
            .pool(key)
            .queue
            .retain(|s| !Arc::ptr_eq(s, slot));
    }

    /// Passes a retry a waiter will not use on to the next one.
    pub fn retry_next(&self, key: &FunctionKey) {
        self.state.lock().pool(key).retry_next();
    }

    /// Counts an instance of `key` as gone and lets a waiter start a replacement.
    pub fn forget_instance(&self, key: &FunctionKey) {
        let mut sched = self.state.lock();
        let pool = sched.pool(key);
        pool.live -= 1;
        pool.retry_next();
    }

    /// An instance of `key` answered a call and is about to come back.
    pub fn returning(&self, key: &FunctionKey) {
        self.state.lock().pool(key).returning += 1;
    }

    /// A returning instance of `key` is not coming back (it is destroyed).
    pub fn returned(&self, key: &FunctionKey) {
        let mut sched = self.state.lock();
        let pool = sched.pool(key);
        pool.returning = pool.returning.saturating_sub(1);
    }

    /// Keeps an instance after an invocation: to the head of its function's queue, or
    /// to the idle list (the manager is woken if it would otherwise look later than
    /// `pause_grace` from now).
    pub fn put_back(&self, mut inst: Instance, returning: bool, pause_grace: Duration) {
        let now = Instant::now();
        inst.last_used = now;
        let mut sched = self.state.lock();
        let pool = sched.pool(&inst.function);
        if returning {
            pool.returning = pool.returning.saturating_sub(1);
        }
        if let Some(slot) = pool.queue.pop_front() {
            return slot.give(inst);
        }
        pool.idle.push(inst);
        let freeze_at = now + pause_grace;
        if sched.manager_deadline.is_none_or(|d| d > freeze_at) {
            sched.manager_deadline = Some(freeze_at);
            self.wake.notify_all();
        }
    }

    /// The most recently used idle instance of `key` if it is of `version` (the warm
    /// fast path: anything else goes the ordinary way).
    pub fn take_idle_current(&self, key: &FunctionKey, version: u64) -> Option<Instance> {
        let mut sched = self.state.lock();
        let pool = sched.functions.get_mut(key)?;
        let usable = pool
            .idle
            .last()
            .is_some_and(|i| i.function_version == version);
        if !usable {
            return None;
        }
        pool.idle.pop()
    }

    /// Takes out the idle instances of `key`, and the idle instances of other
    /// functions for which `calls_it` holds, and wakes its waiters to look again.
    /// `calls_it` runs under the scheduler's lock.
    pub fn retire(&self, key: &FunctionKey, calls_it: impl Fn(&Instance) -> bool) -> Vec<Instance> {
        let mut sched = self.state.lock();
        let pool = sched.pool(key);
        pool.live -= pool.idle.len();
        for slot in pool.queue.drain(..) {
            slot.retry();
        }
        let mut old = std::mem::take(&mut pool.idle);
        for pool in sched.functions.values_mut() {
            let callers: Vec<Instance> = pool.idle.extract_if(.., |i| calls_it(i)).collect();
            pool.live -= callers.len();
            old.extend(callers);
        }
        old
    }

    /// A ready plain stem cell of `runtime` (a cold start that could not fork from
    /// its package zygote falls back to one).
    pub fn take_stem_cell(&self, runtime: Runtime) -> Option<StemCell> {
        self.state
            .lock()
            .stem_cells
            .get_mut(&runtime)
            .and_then(Vec::pop)
    }

    /// Takes out the idle instances and stem cells whose sandbox `gone` says is gone;
    /// a waiter is woken to start a replacement for each instance.
    pub fn take_gone(&self, gone: impl Fn(&str) -> bool) -> (Vec<Instance>, Vec<StemCell>) {
        let mut sched = self.state.lock();
        let mut idle = Vec::new();
        for pool in sched.functions.values_mut() {
            let dead: Vec<Instance> = pool.idle.extract_if(.., |i| gone(i.sandbox.id())).collect();
            pool.live -= dead.len();
            for _ in 0..dead.len() {
                pool.retry_next();
            }
            idle.extend(dead);
        }
        let mut stems = Vec::new();
        for cells in sched.stem_cells.values_mut() {
            stems.extend(cells.extract_if(.., |s| gone(s.sandbox.id())));
        }
        stems.extend(sched.package_stems.extract_if(.., |s| gone(s.sandbox.id())));
        (idle, stems)
    }

    /// Wakes every waiter with `Closed` and takes every idle instance and stem cell.
    pub fn drain(&self) -> (Vec<Instance>, Vec<StemCell>) {
        let mut sched = self.state.lock();
        let mut idle = Vec::new();
        for pool in sched.functions.values_mut() {
            for slot in pool.queue.drain(..) {
                slot.close();
            }
            pool.live -= pool.idle.len();
            idle.append(&mut pool.idle);
        }
        let mut stems: Vec<StemCell> = std::mem::take(&mut sched.stem_cells)
            .into_values()
            .flatten()
            .collect();
        stems.append(&mut sched.package_stems);
        (idle, stems)
    }

    /// Wakes the manager (to refill the stem cells).
    pub fn wake_manager(&self) {
        self.wake.notify_all();
    }

    /// Wakes the manager under the lock, so that it cannot miss it.
    pub fn wake_manager_now(&self) {
        let _sched = self.state.lock();
        self.wake.notify_all();
    }

    /// Idle instances of each of `functions`, for listings.
    pub fn idle_counts(&self, functions: &[Arc<Function>]) -> Vec<usize> {
        let sched = self.state.lock();
        functions
            .iter()
            .map(|f| sched.functions.get(&f.key()).map_or(0, |p| p.idle.len()))
            .collect()
    }

    pub fn counts(&self) -> Counts {
        let sched = self.state.lock();
        let stems = || {
            sched
                .stem_cells
                .values()
                .flatten()
                .chain(&sched.package_stems)
        };
        let frozen = sched
            .functions
            .values()
            .flat_map(|f| &f.idle)
            .filter(|i| i.sandbox.state() == SandboxState::Frozen)
            .count()
            + stems()
                .filter(|s| s.sandbox.state() == SandboxState::Frozen)
                .count();
        Counts {
            frozen,
            stem_cells: sched.stem_cells.values().flatten().count(),
            stem_cells_by_runtime: Runtime::ALL
                .map(|r| sched.stem_cells.get(&r).map_or(0, Vec::len)),
            queued: sched.functions.values().map(|f| f.queue.len()).sum(),
        }
    }

    /// Each function's queue depth and requests in flight (queued, or running in an
    /// instance: live and not idle), and the sandboxes the scheduler holds: ready
    /// stem cells and idle instances (thawed, frozen). For the metrics.
    pub fn gauges(&self) -> (Vec<crate::metrics::FunctionGauges>, Held) {
        let sched = self.state.lock();
        let mut functions: Vec<_> = sched
            .functions
            .iter()
            .map(|(key, pool)| crate::metrics::FunctionGauges {
                key: key.clone(),
                queued: pool.queue.len(),
                in_flight: pool.live.saturating_sub(pool.idle.len()) + pool.queue.len(),
            })
            .collect();
        functions.sort_by(|a, b| a.key.cmp(&b.key));
        let frozen = sched
            .functions
            .values()
            .flat_map(|f| &f.idle)
            .filter(|i| i.sandbox.state() == SandboxState::Frozen)
            .count();
        let idle: usize = sched.functions.values().map(|f| f.idle.len()).sum();
        let held = Held {
            stem_cells: sched.stem_cells.values().map(Vec::len).sum::<usize>()
                + sched.package_stems.len(),
            idle: idle - frozen,
            frozen,
        };
        (functions, held)
    }

    /// The scheduler's lock, for the pool manager's passes.
    pub fn lock(&self) -> MutexGuard<'_, Sched> {
        self.state.lock()
    }

    /// Releases the lock until woken or until `until`, as the pool manager sleeps.
    pub fn wait(&self, sched: &mut MutexGuard<'_, Sched>, until: Option<Instant>) {
        match until {
            Some(t) => {
                self.wake.wait_until(sched, t);
            }
            None => self.wake.wait(sched),
        }
    }
}

/// An idle sandbox whose shim [`Sched::hung_shims`] found alive but frozen (on cgroup
/// v1 a frozen task dies only once thawed, so its pending signals tell).
#[derive(Debug)]
pub(crate) struct FrozenShim {
    pub sandbox_id: String,
    pub pid: i32,
}

impl Sched {
    fn pool(&mut self, function: &FunctionKey) -> &mut FnPool {
        // Looked up first: the common case clones no key.
        if !self.functions.contains_key(function) {
            self.functions.insert(function.clone(), FnPool::default());
        }
        self.functions.get_mut(function).expect("inserted")
    }

    /// Takes out the idle instances past `cfg.idle_ttl`, and freezes those past
    /// `cfg.pause_grace` (taking out those that fail to); `soonest` is told when the
    /// next of either is due.
    pub fn sweep_idle(
        &mut self,
        now: Instant,
        cfg: &PoolConfig,
        mut soonest: impl FnMut(Instant),
    ) -> Vec<Instance> {
        let mut doomed = Vec::new();
        for pool in self.functions.values_mut() {
            let expired: Vec<Instance> = pool
                .idle
                .extract_if(.., |i| i.last_used + cfg.idle_ttl <= now)
                .collect();
            pool.live -= expired.len();
            doomed.extend(expired);
            let mut failed = Vec::new();
            for (i, inst) in pool.idle.iter_mut().enumerate() {
                soonest(inst.last_used + cfg.idle_ttl);
                if inst.sandbox.state() != SandboxState::Bound {
                    continue;
                }
                let freeze_at = inst.last_used + cfg.pause_grace;
                if freeze_at > now {
                    soonest(freeze_at);
                } else if let Err(e) = inst.sandbox.freeze() {
                    tracing::warn!(sandbox_id = inst.sandbox.id(), error = %ipc::chain(&e), "freeze failed; destroying");
                    failed.push(i);
                }
            }
            for i in failed.into_iter().rev() {
                pool.live -= 1;
                doomed.push(pool.idle.remove(i));
            }
        }
        doomed
    }

    /// Removes and returns the least recently used idle instance of any function.
    pub fn take_lru_idle(&mut self) -> Option<Instance> {
        let (name, _) = self
            .functions
            .iter()
            .filter_map(|(name, f)| f.idle.first().map(|i| (name.clone(), i.last_used)))
            .min_by_key(|(_, used)| *used)?;
        let pool = self.functions.get_mut(&name)?;
        pool.live -= 1;
        Some(pool.idle.remove(0))
    }

    /// Removes and returns the oldest stem cell (of the first runtime that has one),
    /// then the oldest of a package zygote's.
    pub fn take_oldest_stem(&mut self) -> Option<StemCell> {
        match self.stem_cells.values_mut().find(|c| !c.is_empty()) {
            Some(cells) => Some(cells.remove(0)),
            None => (!self.package_stems.is_empty()).then(|| self.package_stems.remove(0)),
        }
    }

    /// The ready stem cell of the package zygote that serves `function` with the most
    /// packages.
    fn take_package_stem(&mut self, function: &Function) -> Option<StemCell> {
        let best = crate::zygotes::best(
            self.package_stems.iter().filter_map(|s| s.zygote.as_ref()),
            function,
        )?
        .id;
        let i = self
            .package_stems
            .iter()
            .rposition(|s| s.zygote.as_ref().is_some_and(|z| z.id == best))?;
        Some(self.package_stems.remove(i))
    }

    /// Ready stem cells of each package zygote that has any.
    pub fn package_stem_counts(&self) -> HashMap<u64, usize> {
        let mut counts = HashMap::new();
        for z in self.package_stems.iter().filter_map(|s| s.zygote.as_ref()) {
            *counts.entry(z.id).or_default() += 1;
        }
        counts
    }

    /// Ready stem cells of package zygote `id`.
    pub fn package_stems_of(&self, id: u64) -> usize {
        self.package_stems
            .iter()
            .filter(|s| s.zygote.as_ref().is_some_and(|z| z.id == id))
            .count()
    }

    /// Takes out the ready stem cells of package zygote `id`.
    pub fn take_package_stems(&mut self, id: u64) -> Vec<StemCell> {
        self.package_stems
            .extract_if(.., |s| s.zygote.as_ref().is_some_and(|z| z.id == id))
            .collect()
    }

    /// Gives back stem cells taken out with [`Sched::take_package_stems`].
    pub fn put_package_stems(&mut self, stems: Vec<StemCell>) {
        self.package_stems.extend(stems);
    }

    /// Of package zygotes `ids`, the first with fewer than `want` stem cells ready or
    /// being made.
    pub fn package_stem_missing(
        &self,
        ids: &[std::sync::Arc<ZygoteTag>],
        want: usize,
    ) -> Option<std::sync::Arc<ZygoteTag>> {
        ids.iter()
            .find(|z| !self.package_starting.contains(&z.id) && self.package_stems_of(z.id) < want)
            .cloned()
    }

    /// The manager starts forking a stem cell from package zygote `id`.
    pub fn package_stem_starting(&mut self, id: u64) {
        self.package_starting.insert(id);
    }

    /// The manager is done forking a stem cell from package zygote `id`.
    pub fn package_stem_made(&mut self, id: u64, stem: Option<StemCell>) {
        self.package_starting.remove(&id);
        self.package_stems.extend(stem);
    }

    /// Stem cells of `runtime` missing to make `want`, counting those being made.
    pub fn stem_cells_missing(&self, runtime: Runtime, want: usize) -> usize {
        let ready = self.stem_cells.get(&runtime).map_or(0, Vec::len);
        let starting = self.stem_starting.get(&runtime).copied().unwrap_or(0);
        want.saturating_sub(ready + starting)
    }

    /// The manager starts making a stem cell of `runtime`.
    pub fn stem_starting(&mut self, runtime: Runtime) {
        *self.stem_starting.entry(runtime).or_default() += 1;
    }

    /// The manager is done making a stem cell of `runtime`: here it is, or it failed.
    pub fn stem_made(&mut self, runtime: Runtime, stem: Option<StemCell>) {
        if let Some(n) = self.stem_starting.get_mut(&runtime) {
            *n -= 1;
        }
        if let Some(stem) = stem {
            self.stem_cells.entry(runtime).or_default().push(stem);
        }
    }

    pub fn set_manager_deadline(&mut self, next: Option<Instant>) {
        self.manager_deadline = next;
    }

    /// The idle sandboxes (instances and stem cells) whose shim or instance channel
    /// hung up, by id, and the frozen ones that did not (`v1`: whose pending signals
    /// are worth a look). One `poll` over their channels, without waiting.
    pub fn hung_shims(&self, v1: bool) -> (Vec<String>, Vec<FrozenShim>) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        // Each sandbox with the descriptors that tell: its shim's channel, and its
        // instance's.
        let mut fds = Vec::new();
        let mut sandboxes: Vec<(&Sandbox, usize)> = Vec::new();
        for pool in self.functions.values() {
            for inst in &pool.idle {
                fds.push(PollFd::new(inst.shim.0.as_fd(), PollFlags::empty()));
                fds.push(PollFd::new(inst.link.0.as_fd(), PollFlags::empty()));
                sandboxes.push((&inst.sandbox, 2));
            }
        }
        for stem in self
            .stem_cells
            .values()
            .flatten()
            .chain(&self.package_stems)
        {
            fds.push(PollFd::new(stem.shim.0.as_fd(), PollFlags::empty()));
            sandboxes.push((&stem.sandbox, 1));
        }
        if fds.is_empty() {
            return (Vec::new(), Vec::new());
        }
        // POLLHUP and POLLERR are reported whatever is asked for.
        let hung: Vec<bool> = match poll(&mut fds, PollTimeout::ZERO) {
            Ok(_) => fds.iter().map(|f| f.any().unwrap_or(false)).collect(),
            Err(_) => return (Vec::new(), Vec::new()),
        };
        drop(fds);
        let (mut dead, mut frozen) = (Vec::new(), Vec::new());
        let mut at = 0;
        for (sandbox, n) in sandboxes {
            let hung = hung[at..at + n].iter().any(|h| *h);
            at += n;
            if hung {
                tracing::debug!(
                    sandbox_id = sandbox.id(),
                    shim_pid = sandbox.pid(),
                    hung,
                    killed = false,
                    "dead shim"
                );
                dead.push(sandbox.id().to_owned());
            } else if v1 && sandbox.state() == SandboxState::Frozen {
                frozen.push(FrozenShim {
                    sandbox_id: sandbox.id().to_owned(),
                    pid: sandbox.pid(),
                });
            }
        }
        (dead, frozen)
    }

    /// Takes out the idle instances and stem cells of sandboxes `ids` whose shim died.
    pub fn take_dead(&mut self, ids: &[String]) -> (Vec<Instance>, Vec<StemCell>) {
        let dead = |id: &str| ids.iter().any(|d| d == id);
        let mut doomed = Vec::new();
        for pool in self.functions.values_mut() {
            let gone: Vec<Instance> = pool.idle.extract_if(.., |i| dead(i.sandbox.id())).collect();
            for inst in &gone {
                tracing::warn!(sandbox_id = inst.sandbox.id(), function = %inst.function, "the shim of an idle sandbox died; removing it");
            }
            pool.live -= gone.len();
            doomed.extend(gone);
        }
        let mut doomed_stems = Vec::new();
        for cells in self
            .stem_cells
            .values_mut()
            .chain(std::iter::once(&mut self.package_stems))
        {
            for stem in cells.extract_if(.., |s| dead(s.sandbox.id())) {
                tracing::warn!(
                    sandbox_id = stem.sandbox.id(),
                    "the shim of a stem cell died; removing it"
                );
                doomed_stems.push(stem);
            }
        }
        (doomed, doomed_stems)
    }
}

/// How often a queued request checks whether its caller still wants it.
pub const GIVE_UP_CHECK: Duration = Duration::from_millis(20);

/// Where a queued request waits for its instance.
#[derive(Debug, Default)]
pub struct Slot {
    state: Mutex<SlotState>,
    ready: Condvar,
}

#[derive(Debug, Default)]
pub enum SlotState {
    #[default]
    Waiting,
    /// An instance handed over by a finishing request.
    Ready(Box<Instance>),
    /// Look again: an instance went away and this request may start one.
    Retry,
    /// The agent is shutting down.
    Closed,
    /// The waiter's deadline passed, or its caller cancelled it (set by the waiter).
    GaveUp,
}

impl Slot {
    fn set(&self, state: SlotState) {
        *self.state.lock() = state;
        self.ready.notify_one();
    }

    pub fn give(&self, inst: Instance) {
        self.set(SlotState::Ready(Box::new(inst)));
    }

    pub fn retry(&self) {
        self.set(SlotState::Retry);
    }

    pub fn close(&self) {
        self.set(SlotState::Closed);
    }

    /// Blocks until the slot is given, retried or closed, or until `give_up` says
    /// so (asked at `deadline`, and at least every [`GIVE_UP_CHECK`]); then
    /// [`SlotState::Waiting`] is returned and the caller must take the slot out of
    /// its queue (under the scheduler's lock) and look at it once more with
    /// [`Slot::take`].
    pub fn wait(&self, deadline: Option<Instant>, give_up: impl Fn() -> bool) -> SlotState {
        let mut state = self.state.lock();
        while matches!(*state, SlotState::Waiting) {
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) || give_up() {
                return SlotState::Waiting;
            }
            let wait = deadline.map_or(GIVE_UP_CHECK, |d| (d - now).min(GIVE_UP_CHECK));
            self.ready.wait_for(&mut state, wait);
        }
        std::mem::take(&mut *state)
    }

    /// The slot's state once it is out of every queue: `GaveUp` unless an instance or
    /// a retry arrived meanwhile.
    pub fn take(&self) -> SlotState {
        let mut state = self.state.lock();
        match std::mem::take(&mut *state) {
            SlotState::Waiting => SlotState::GaveUp,
            other => other,
        }
    }
}

/// Why a client's request that has not started yet leaves its function's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abandoned {
    /// The client closed or reset its connection: the request is dropped unanswered.
    ClientGone,
    /// The server is draining before it shuts down: the request is answered 503.
    Draining,
}

/// Set by a transport (the HTTP event loop) to take back a request it handed over:
/// a request still waiting for an instance gives up at its next look (at most
/// [`GIVE_UP_CHECK`] later) and never runs; one already running is not affected.
/// One per connection, shared by its requests; a plain atomic, so handing it
/// along costs no system call.
#[derive(Debug, Default)]
pub struct Abandon(AtomicU8);

const LIVE: u8 = 0;
const GONE: u8 = 1;
const DRAINING: u8 = 2;

impl Abandon {
    /// The client went away. Wins over [`Abandon::drain`].
    pub fn client_gone(&self) {
        self.0.store(GONE, Ordering::SeqCst);
    }

    /// The server is draining; a client that already went away stays gone.
    pub fn drain(&self) {
        let _ = self
            .0
            .compare_exchange(LIVE, DRAINING, Ordering::SeqCst, Ordering::SeqCst);
    }

    pub fn get(&self) -> Option<Abandoned> {
        match self.0.load(Ordering::SeqCst) {
            LIVE => None,
            GONE => Some(Abandoned::ClientGone),
            _ => Some(Abandoned::Draining),
        }
    }

    pub fn is_gone(&self) -> bool {
        self.get() == Some(Abandoned::ClientGone)
    }

    /// The error a request of `function` abandoned this way ends with, if it was.
    pub fn error(&self, function: &str) -> Option<Error> {
        self.get().map(|why| match why {
            Abandoned::ClientGone => Error::Cancelled {
                function: function.to_owned(),
            },
            Abandoned::Draining => Error::ShuttingDown,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    /// Long enough to mean "never" on a loaded machine; only reached when a test fails.
    const HANG: Duration = Duration::from_secs(30);

    /// Runs `wait` on another thread; the sender tells when it first asks `give_up`
    /// (it holds the slot's lock then, so anything set afterwards reaches it
    /// while it waits), the receiver gets what it returned, then what a second wait
    /// on the same slot returned (giving up at once).
    fn waiter(slot: &Arc<Slot>) -> (mpsc::Receiver<()>, mpsc::Receiver<(SlotState, SlotState)>) {
        let (asked_tx, asked) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let slot = slot.clone();
        std::thread::spawn(move || {
            let asked_tx = std::sync::Mutex::new(Some(asked_tx));
            let first = slot.wait(None, || {
                if let Some(tx) = asked_tx.lock().unwrap().take() {
                    let _ = tx.send(());
                }
                false
            });
            let second = slot.wait(None, || true);
            let _ = done_tx.send((first, second));
        });
        (asked, done)
    }

    #[test]
    fn a_slot_hands_over_exactly_once_across_threads() {
        for (name, set) in [
            ("retry", Slot::retry as fn(&Slot)),
            ("close", Slot::close as fn(&Slot)),
        ] {
            let slot = Arc::new(Slot::default());
            let (asked, done) = waiter(&slot);
            asked
                .recv_timeout(HANG)
                .expect("the waiter never asked whether to give up");
            assert!(
                done.try_recv().is_err(),
                "{name}: the waiter returned before anything was handed over"
            );
            set(&slot);
            let (first, second) = done
                .recv_timeout(HANG)
                .unwrap_or_else(|_| panic!("{name}: the waiter was never woken"));
            match (name, &first) {
                ("retry", SlotState::Retry) | ("close", SlotState::Closed) => {}
                _ => panic!("{name}: the waiter got {first:?}"),
            }
            assert!(
                matches!(second, SlotState::Waiting),
                "{name}: handed over twice: the second wait got {second:?}"
            );
            assert!(
                matches!(slot.take(), SlotState::GaveUp),
                "{name}: still in the slot after it was handed over"
            );
        }
        // A slot set before anyone waits is not lost, and is handed over once.
        let slot = Slot::default();
        slot.close();
        assert!(matches!(slot.wait(None, || true), SlotState::Closed));
        assert!(matches!(slot.wait(None, || true), SlotState::Waiting));
    }

    #[test]
    fn an_abandoned_waiter_leaves_its_queue_with_the_reason() {
        let abandon = Abandon::default();
        assert_eq!(abandon.get(), None);
        assert!(abandon.error("f").is_none());
        abandon.drain();
        assert_eq!(abandon.get(), Some(Abandoned::Draining));
        assert!(matches!(abandon.error("f"), Some(Error::ShuttingDown)));
        // A client that goes away while the server drains is gone, and stays gone.
        abandon.client_gone();
        abandon.drain();
        assert!(abandon.is_gone());
        assert!(
            matches!(abandon.error("f"), Some(Error::Cancelled { function }) if function == "f")
        );

        // A waiter asked about the flag notices it within GIVE_UP_CHECK or so.
        let slot = Arc::new(Slot::default());
        let abandon = Arc::new(Abandon::default());
        let (done_tx, done) = mpsc::channel();
        {
            let (slot, abandon) = (slot.clone(), abandon.clone());
            std::thread::spawn(move || {
                let state = slot.wait(None, || abandon.get().is_some());
                let _ = done_tx.send(state);
            });
        }
        assert!(done.recv_timeout(Duration::from_millis(50)).is_err());
        abandon.client_gone();
        let state = done
            .recv_timeout(HANG)
            .expect("the waiter never noticed its client was gone");
        assert!(matches!(state, SlotState::Waiting), "{state:?}");
        assert!(matches!(slot.take(), SlotState::GaveUp));
    }

    #[test]
    fn a_retry_not_taken_goes_to_the_next_waiter() {
        let mut pool = FnPool::default();
        let (first, second) = (Arc::new(Slot::default()), Arc::new(Slot::default()));
        pool.queue.push_back(first.clone());
        pool.queue.push_back(second.clone());
        pool.retry_next();
        assert!(matches!(first.wait(None, || true), SlotState::Retry));
        assert!(matches!(second.wait(None, || true), SlotState::Waiting));
        assert_eq!(pool.queue.len(), 1);
        pool.retry_next();
        pool.retry_next(); // nobody left: nothing happens
        assert!(matches!(second.wait(None, || true), SlotState::Retry));
        assert!(pool.queue.is_empty());
    }

    #[test]
    fn a_waiter_gives_up_at_its_deadline_or_when_told() {
        let slot = Slot::default();
        let started = Instant::now();
        let deadline = started + Duration::from_millis(30);
        assert!(matches!(
            slot.wait(Some(deadline), || false),
            SlotState::Waiting
        ));
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert!(matches!(slot.take(), SlotState::GaveUp));
        // Without a deadline, give_up is asked again and again (at least every
        // GIVE_UP_CHECK) until it says so: the wait does not block for good.
        let (done_tx, done) = mpsc::channel();
        std::thread::spawn(move || {
            let asked = AtomicUsize::new(0);
            let state = Slot::default().wait(None, || asked.fetch_add(1, Ordering::SeqCst) >= 2);
            let _ = done_tx.send((state, asked.load(Ordering::SeqCst)));
        });
        let (state, asked) = done
            .recv_timeout(HANG)
            .expect("a waiter without a deadline never asked give_up again");
        assert!(matches!(state, SlotState::Waiting), "{state:?}");
        assert_eq!(asked, 3);
        // An instance handed over after the waiter gave up but before it left the
        // queue is not lost: take() returns it.
        let slot = Slot::default();
        slot.retry();
        assert!(matches!(slot.take(), SlotState::Retry));
    }

    /// A function of one instance at most, checked as a registration would be.
    fn one_instance(dir: &std::path::Path) -> Function {
        std::fs::write(dir.join("f.py"), "def f(e): return e\n").unwrap();
        let rules = crate::registry::Rules {
            defaults: crate::config::Defaults::default(),
            memory_budget_mb: 1024,
            machine_cpus: 2,
            state_root: "/nonexistent/sprout-state".into(),
            data_dir: None,
        };
        let config = ipc::api::FunctionConfig {
            handler: Some("f:f".into()),
            max_instances: Some(1),
            ..Default::default()
        };
        let key = FunctionKey::new("ns", "f").unwrap();
        Function::checked(&key, dir, &config, &rules, 1, false).unwrap()
    }

    #[test]
    fn a_full_queue_refuses_and_the_refused_request_never_enters_it() {
        let dir = tempfile::tempdir().unwrap();
        let function = one_instance(dir.path());
        let key = function.key();
        let sched = Scheduler::new(2);
        let grant = |retried| sched.grant(&key, &function, retried, false).map(|g| g.0);
        assert!(matches!(grant(false), Ok(Grant::Start(None))));
        let first = match grant(false) {
            Ok(Grant::Wait(slot)) => slot,
            other => panic!("{other:?}"),
        };
        let second = match grant(false) {
            Ok(Grant::Wait(slot)) => slot,
            other => panic!("{other:?}"),
        };
        for _ in 0..3 {
            match grant(false) {
                Err(Error::QueueFull {
                    function,
                    max_queue: 2,
                }) => assert_eq!(function, "ns/f"),
                other => panic!("a third waiter was not refused: {other:?}"),
            }
        }
        let (gauges, _) = sched.gauges();
        assert_eq!(
            (gauges[0].queued, gauges[0].in_flight),
            (2, 3),
            "refused requests were queued"
        );
        // A waiter woken to retry had a place already: it gets one back, at the
        // front, even though the queue is full.
        let retried = match grant(true) {
            Ok(Grant::Wait(slot)) => slot,
            other => panic!("a retried waiter was refused: {other:?}"),
        };
        sched.retry_next(&key);
        assert!(matches!(retried.wait(None, || true), SlotState::Retry));
        assert!(matches!(first.wait(None, || true), SlotState::Waiting));
        // Leaving the queue makes room for one more.
        sched.leave_queue(&key, &first);
        assert!(matches!(grant(false), Ok(Grant::Wait(_))));
        assert!(matches!(grant(false), Err(Error::QueueFull { .. })));
        drop(second);
    }
}
