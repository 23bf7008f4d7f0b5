//! Per-function scheduling state: warm instances, the count of live ones, and the
//! queue of requests waiting for one (OpenWhisk's per-action queue, on one node).
//!
//! A request takes the most recently used idle instance; if there is none and the
//! function is below its `max_instances`, it starts one (from a stem cell when one is
//! ready) — so instances are added as the backlog grows; otherwise it waits in the
//! function's FIFO queue. A finished instance goes straight to the head of the queue,
//! or back to the idle list. Waiters are woken to retry when an instance dies (so one
//! of them can start a replacement) and closed when the agent shuts down.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use ipc::proto::ShimLink;
use pool::Sandbox;

use crate::error::Error;
use crate::instance::Instance;
use crate::registry::FunctionKey;

/// Everything the scheduler and the pool manager share, under one lock.
#[derive(Debug, Default)]
pub struct Sched {
    /// By namespace and name: instances never serve another namespace's function.
    pub functions: HashMap<FunctionKey, FnPool>,
    /// Ready (frozen) stem cells, most recent last.
    pub stem_cells: Vec<StemCell>,
    /// Stem cells being created by the manager.
    pub stem_starting: usize,
    /// When the manager will next look by itself (None: it sleeps until woken).
    pub manager_deadline: Option<Instant>,
}

#[derive(Debug, Default)]
pub struct FnPool {
    /// Idle instances (thawed or frozen), least recently used first.
    pub idle: Vec<Instance>,
    /// Instances that exist: idle, running, or starting.
    pub live: usize,
    /// Requests waiting for an instance.
    pub queue: VecDeque<Arc<Slot>>,
    /// Instances that answered a call and are about to come back (they are leaving
    /// a workflow run), counted in `live`.
    pub returning: usize,
}

impl FnPool {
    /// Passes a retry on to the first waiter (the one it was for is not going to
    /// use it): it may start the replacement instance.
    pub fn retry_next(&mut self) {
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
}

/// How often a queued request checks whether its caller still wants it.
pub const GIVE_UP_CHECK: std::time::Duration = std::time::Duration::from_millis(20);

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
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = state;
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
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while matches!(*state, SlotState::Waiting) {
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) || give_up() {
                return SlotState::Waiting;
            }
            let wait = deadline.map_or(GIVE_UP_CHECK, |d| (d - now).min(GIVE_UP_CHECK));
            state = self
                .ready
                .wait_timeout(state, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        std::mem::take(&mut *state)
    }

    /// The slot's state once it is out of every queue: `GaveUp` unless an instance or
    /// a retry arrived meanwhile.
    pub fn take(&self) -> SlotState {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
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

impl Sched {
    pub fn pool(&mut self, function: &FunctionKey) -> &mut FnPool {
        // Looked up first: the common case clones no key.
        if !self.functions.contains_key(function) {
            self.functions.insert(function.clone(), FnPool::default());
        }
        self.functions.get_mut(function).expect("inserted")
    }

    /// Idle instances counted per function, for listings.
    pub fn idle_count(&self, function: &FunctionKey) -> usize {
        self.functions.get(function).map_or(0, |f| f.idle.len())
    }

    pub fn queued(&self) -> usize {
        self.functions.values().map(|f| f.queue.len()).sum()
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

    /// Wakes every waiter with `Closed` and takes every idle instance and stem cell.
    pub fn drain(&mut self) -> (Vec<Instance>, Vec<StemCell>) {
        let mut idle = Vec::new();
        for pool in self.functions.values_mut() {
            for slot in pool.queue.drain(..) {
                slot.close();
            }
            pool.live -= pool.idle.len();
            idle.append(&mut pool.idle);
        }
        (idle, std::mem::take(&mut self.stem_cells))
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
            let asked_tx = Mutex::new(Some(asked_tx));
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
}
