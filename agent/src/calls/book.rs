//! The call book: what the agent knows of each sandbox's calls — the invocation
//! running there (its *session*), its calls in flight and its connections on the call
//! socket. Shared by the invocation paths (begin, end), the call socket's loop and
//! its workers; see [`super`] for the rules it keeps.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ipc::api::ActivationId;
use ipc::proto::check_depth;
use mio::Waker;
use parking_lot::{Condvar, Mutex};

use crate::run::Cancel;

/// Connections one sandbox may have open on the call socket. Each process that calls
/// has one: calls nested in one sandbox (through its shim) are a process each, up to
/// the depth limit of 16, and a handler may fork.
pub const MAX_CONNECTIONS_PER_SANDBOX: usize = 32;
/// How long the end of an invocation waits for the loop to read what it sent.
const DRAIN_WAIT: Duration = Duration::from_secs(2);

/// What the agent knows of each sandbox's calls: its session, its calls in flight
/// and its connections. Shared by the invocation paths, the loop and the workers.
#[derive(Debug, Default)]
pub(crate) struct Book {
    /// The agent is shutting down: the loop stops.
    stopping: AtomicBool,
    sandboxes: Mutex<Sandboxes>,
    drained: Condvar,
    /// Wakes the loop (set once it runs).
    waker: OnceLock<Arc<Waker>>,
    /// The loop has stopped (the agent shuts down): nothing waits for it any more.
    stopped: AtomicBool,
}

#[derive(Debug, Default)]
struct Sandboxes {
    by_id: HashMap<String, Entry>,
    /// Sandboxes whose connections the loop must read out (an invocation ended).
    drains: Vec<String>,
}

#[derive(Debug, Default)]
struct Entry {
    /// Depth of the invocation running (or of the last one, for the idle session).
    depth: u32,
    /// The activation running (its calls' `cause`); none for the idle session.
    activation: Option<ActivationId>,
    running: bool,
    /// Fired when the session ends; made on the session's first call.
    cancel: Option<Arc<Cancel>>,
    in_flight: usize,
    connections: usize,
    drains_asked: u64,
    drains_done: u64,
}

impl Entry {
    fn unused(&self) -> bool {
        !self.running && self.in_flight == 0 && self.connections == 0
    }

    /// Ends the current session: its calls are cancelled.
    fn end_session(&mut self) {
        if let Some(cancel) = self.cancel.take() {
            cancel.fire();
        }
    }
}

/// Why the loop does not run a request.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The invocation that sent it has ended; it is dropped unanswered.
    Drained,
    TooDeep(String),
    TooMany(usize),
    Gone,
    Failed(String),
}

/// A request the loop admitted: its depth and the cancel of its session.
#[derive(Debug)]
pub(super) struct Admitted {
    pub depth: u32,
    pub cancel: Arc<Cancel>,
    /// The activation that made the call.
    pub cause: Option<ActivationId>,
}

impl Book {
    /// An invocation at `depth` begins in `sandbox`: its calls belong to it (and the
    /// calls of the idle session before it end).
    pub fn begin(&self, sandbox: &str, depth: u32) {
        self.begin_activation(sandbox, depth, None)
    }

    /// [`Book::begin`] for activation `activation`: the calls it makes name it as
    /// their cause.
    pub fn begin_activation(&self, sandbox: &str, depth: u32, activation: Option<ActivationId>) {
        let mut s = self.sandboxes.lock();
        if !s.by_id.contains_key(sandbox) {
            s.by_id.insert(sandbox.to_owned(), Entry::default());
        }
        let entry = s.by_id.get_mut(sandbox).expect("inserted");
        entry.end_session();
        entry.depth = depth;
        entry.activation = activation;
        entry.running = true;
    }

    /// The invocation running in `sandbox` has ended: its calls end, and what it sent
    /// that the loop has not read yet is read and dropped before this returns (within
    /// [`DRAIN_WAIT`]). Costs a lock, and a loop round trip only for a sandbox with
    /// a connection to the call socket.
    pub fn end(&self, sandbox: &str) {
        let mut s = self.sandboxes.lock();
        let Some(entry) = s.by_id.get_mut(sandbox) else {
            return;
        };
        entry.end_session();
        entry.running = false;
        entry.activation = None;
        let Some(waker) = self.waker.get().filter(|_| entry.connections > 0) else {
            return;
        };
        entry.drains_asked += 1;
        let want = entry.drains_asked;
        s.drains.push(sandbox.to_owned());
        if let Err(e) = waker.wake() {
            tracing::warn!(error = %e, "call socket: wake the loop");
            return;
        }
        let deadline = Instant::now() + DRAIN_WAIT;
        loop {
            let done = self.stopped.load(Ordering::SeqCst)
                || s.by_id.get(sandbox).is_none_or(|e| e.drains_done >= want);
            let now = Instant::now();
            if done || now >= deadline {
                if !done {
                    tracing::warn!(
                        sandbox_id = sandbox,
                        "call socket: the loop did not read the ended invocation's frames in time"
                    );
                }
                return;
            }
            self.drained.wait_for(&mut s, deadline - now);
        }
    }

    /// `sandbox` is gone: every call it made ends.
    pub fn forget(&self, sandbox: &str) {
        let mut s = self.sandboxes.lock();
        if let Some(mut entry) = s.by_id.remove(sandbox) {
            entry.end_session();
        }
        self.drained.notify_all();
    }

    /// Whether `sandbox` has a connection on the call socket.
    pub fn connected(&self, sandbox: &str) -> bool {
        self.sandboxes
            .lock()
            .by_id
            .get(sandbox)
            .is_some_and(|e| e.connections > 0)
    }

    pub(super) fn connect(&self, sandbox: &str) -> Result<(), usize> {
        let mut s = self.sandboxes.lock();
        let entry = s.by_id.entry(sandbox.to_owned()).or_default();
        if entry.connections >= MAX_CONNECTIONS_PER_SANDBOX {
            return Err(MAX_CONNECTIONS_PER_SANDBOX);
        }
        entry.connections += 1;
        Ok(())
    }

    pub(super) fn disconnect(&self, sandbox: &str) {
        self.update(sandbox, |e| e.connections = e.connections.saturating_sub(1));
    }

    /// A request admitted by [`Book::admit`] is over.
    pub(super) fn done(&self, sandbox: &str) {
        self.update(sandbox, |e| e.in_flight = e.in_flight.saturating_sub(1));
    }

    fn update(&self, sandbox: &str, f: impl FnOnce(&mut Entry)) {
        let mut s = self.sandboxes.lock();
        if let Some(entry) = s.by_id.get_mut(sandbox) {
            f(entry);
            if entry.unused() {
                s.by_id.remove(sandbox);
            }
        }
    }

    /// Admits a request of `sandbox` for `function` (`claimed`: the depth a call says
    /// it has) if its session may make one more.
    pub(super) fn admit(
        &self,
        sandbox: &str,
        function: &str,
        claimed: Option<u32>,
        cap: usize,
    ) -> Result<Admitted, Refusal> {
        let mut s = self.sandboxes.lock();
        let entry = s.by_id.get_mut(sandbox).ok_or(Refusal::Gone)?;
        if entry.drains_done < entry.drains_asked {
            return Err(Refusal::Drained);
        }
        let depth = (entry.depth.saturating_add(1)).max(claimed.unwrap_or(0));
        check_depth(function, depth).map_err(Refusal::TooDeep)?;
        if entry.in_flight >= cap {
            return Err(Refusal::TooMany(cap));
        }
        let cancel = match &entry.cancel {
            Some(c) => c.clone(),
            None => {
                let c = Arc::new(
                    Cancel::new().map_err(|e| Refusal::Failed(format!("cancel pipe: {e}")))?,
                );
                entry.cancel = Some(c.clone());
                c
            }
        };
        entry.in_flight += 1;
        Ok(Admitted {
            depth,
            cancel,
            cause: entry.activation,
        })
    }

    /// The agent is shutting down: the loop stops at its next look (see
    /// [`Book::wake_for_shutdown`]).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// The loop's waker, set once it runs.
    pub(super) fn set_waker(&self, waker: Arc<Waker>) {
        let _ = self.waker.set(waker);
    }

    /// Wakes the loop so that it sees the agent is shutting down ([`Book::stop`],
    /// called before). A loop not running yet sees it before its first wait.
    pub fn wake_for_shutdown(&self) {
        if let Some(waker) = self.waker.get() {
            if let Err(e) = waker.wake() {
                tracing::warn!(error = %e, "call socket: wake the loop to stop");
            }
        }
    }

    /// The loop has stopped: nobody waits for it.
    pub(super) fn loop_stopped(&self) {
        let _s = self.sandboxes.lock();
        self.stopped.store(true, Ordering::SeqCst);
        self.drained.notify_all();
    }

    pub(super) fn take_drains(&self) -> Vec<String> {
        std::mem::take(&mut self.sandboxes.lock().drains)
    }

    pub(super) fn drained(&self, sandbox: &str) {
        let mut s = self.sandboxes.lock();
        if let Some(e) = s.by_id.get_mut(sandbox) {
            e.drains_done = e.drains_asked;
        }
        self.drained.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc::proto::MAX_CALL_DEPTH;
    use mio::{Poll, Token};

    const SB: &str = "sprout-1-1";
    const WAKE: Token = Token(1);

    #[test]
    fn a_sandbox_gets_its_cap_of_calls_in_flight_and_no_more() {
        let book = Book::default();
        book.connect(SB).unwrap();
        book.begin(SB, 0);
        let admitted: Vec<_> = (0..3)
            .map(|_| book.admit(SB, "g", Some(1), 3).unwrap())
            .collect();
        assert_eq!(
            book.admit(SB, "g", Some(1), 3).unwrap_err(),
            Refusal::TooMany(3)
        );
        // Resolves count too.
        assert_eq!(
            book.admit(SB, "g", None, 3).unwrap_err(),
            Refusal::TooMany(3)
        );
        book.done(SB);
        assert!(book.admit(SB, "g", Some(1), 3).is_ok());
        // One session, one cancel.
        assert!(admitted
            .windows(2)
            .all(|w| Arc::ptr_eq(&w[0].cancel, &w[1].cancel)));
    }

    #[test]
    fn depth_is_the_agents_count_and_a_claim_cannot_lower_it() {
        let book = Book::default();
        book.connect(SB).unwrap();
        book.begin(SB, 5);
        assert_eq!(book.admit(SB, "g", Some(0), 64).unwrap().depth, 6);
        assert_eq!(book.admit(SB, "g", None, 64).unwrap().depth, 6);
        // A higher claim only stops the claimant earlier.
        assert_eq!(book.admit(SB, "g", Some(9), 64).unwrap().depth, 9);
        book.begin(SB, MAX_CALL_DEPTH - 1);
        assert_eq!(
            book.admit(SB, "g", Some(0), 64).unwrap().depth,
            MAX_CALL_DEPTH
        );
        book.begin(SB, MAX_CALL_DEPTH);
        let Err(Refusal::TooDeep(message)) = book.admit(SB, "g", Some(0), 64) else {
            panic!("a call past the limit was admitted");
        };
        assert!(message.contains("call depth limit of 16"), "{message}");
    }

    #[test]
    fn the_calls_of_an_invocation_end_with_it() {
        let book = Book::default();
        book.connect(SB).unwrap();
        // Calls from an idle sandbox belong to its idle session: the next invocation
        // ends them.
        let idle = book.admit(SB, "g", Some(1), 64).unwrap();
        book.begin(SB, 0);
        assert!(idle.cancel.fired());
        let mine = book.admit(SB, "g", Some(1), 64).unwrap();
        assert!(!mine.cancel.fired());
        book.end(SB);
        assert!(mine.cancel.fired());
        // A sandbox that goes ends its calls too.
        book.begin(SB, 0);
        let last = book.admit(SB, "g", Some(1), 64).unwrap();
        book.forget(SB);
        assert!(last.cancel.fired());
        assert_eq!(book.admit(SB, "g", Some(1), 64).unwrap_err(), Refusal::Gone);
    }

    #[test]
    fn frames_read_while_an_ended_invocation_is_drained_are_dropped() {
        let book = Book::default();
        book.connect(SB).unwrap();
        book.begin(SB, 0);
        // As `end` leaves it for the loop (without waiting: no loop here).
        book.sandboxes
            .lock()
            .by_id
            .get_mut(SB)
            .unwrap()
            .drains_asked += 1;
        assert_eq!(
            book.admit(SB, "g", Some(1), 64).unwrap_err(),
            Refusal::Drained
        );
        book.drained(SB);
        assert!(book.admit(SB, "g", Some(1), 64).is_ok());
    }

    #[test]
    fn the_end_of_an_invocation_waits_for_the_loop_to_read_what_it_sent() {
        let poll = Poll::new().unwrap();
        let book = Book::default();
        book.waker
            .set(Arc::new(Waker::new(poll.registry(), WAKE).unwrap()))
            .unwrap();
        book.connect(SB).unwrap();
        book.begin(SB, 0);
        let started = Instant::now();
        std::thread::scope(|s| {
            // The loop's part: it drains what it is asked to, then says so.
            s.spawn(|| loop {
                let drains = book.take_drains();
                if drains.is_empty() {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                assert_eq!(drains, [SB]);
                book.drained(SB);
                return;
            });
            book.end(SB);
        });
        assert!(started.elapsed() < DRAIN_WAIT, "{:?}", started.elapsed());
        // Once the loop is gone, nothing waits for it.
        book.begin(SB, 0);
        book.loop_stopped();
        let started = Instant::now();
        book.end(SB);
        assert!(started.elapsed() < DRAIN_WAIT, "{:?}", started.elapsed());
    }

    #[test]
    fn a_sandbox_gets_its_cap_of_connections() {
        let book = Book::default();
        for _ in 0..MAX_CONNECTIONS_PER_SANDBOX {
            book.connect(SB).unwrap();
        }
        assert_eq!(book.connect(SB), Err(MAX_CONNECTIONS_PER_SANDBOX));
        assert!(book.connected(SB));
        book.disconnect(SB);
        book.connect(SB).unwrap();
        for _ in 0..MAX_CONNECTIONS_PER_SANDBOX {
            book.disconnect(SB);
        }
        // Nothing is kept for a sandbox with nothing going on.
        assert!(book.sandboxes.lock().by_id.is_empty());
    }
}
