//! Asynchronous invocations (`?blocking=false`): accepted work and the threads that
//! run it.
//!
//! The agent makes an acceptance durable ([`crate::activations::Activations::accept`])
//! before its client hears `202`, then hands the activation to this runner. A small,
//! fixed pool of threads (`sprout-async-N`, `--async-workers`) takes accepted
//! activations in order and invokes each like a client's request: it waits in its
//! function's queue, and its record (written by the invoker when it ends) finishes
//! the pending row. Work waits here until a thread is free, at most `--max-queue`
//! activations of each function ([`AsyncRunner::reserve`]: the agent asks before it
//! accepts, and one more is refused `429` like a full function queue); a namespace's
//! limits bound it too, where the agent accepts.
//!
//! A graceful shutdown runs nothing more: what is still waiting here is recorded as
//! not run ([`Error::NotStarted`], `whisk_internal_error`); what is running ends like
//! every invocation in flight. A crash leaves rows pending, which the next agent
//! records as lost; nothing is ever run twice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use ipc::api::ActivationId;
use parking_lot::Mutex;

use crate::error::Error;
use crate::invoke::{CallOpts, Invoker};
use crate::names::FunctionKey;

/// An accepted activation waiting for a thread.
#[derive(Debug)]
pub(crate) struct Job {
    pub id: ActivationId,
    pub key: FunctionKey,
    pub version: u64,
    /// The function's limits at acceptance.
    pub limits: ipc::api::ActivationLimits,
    pub event: Vec<u8>,
    /// When it was accepted: its wait starts there.
    pub arrived: Instant,
    /// Its place in its namespace's limits, from acceptance until it ends.
    pub ticket: crate::admission::Ticket,
    /// Its place in its function's backlog, until a thread takes it.
    pub place: Option<Place>,
    /// An OpenWhisk activation's context (its environment, result rules, record
    /// fields).
    pub openwhisk: Option<crate::openwhisk::context::SharedContext>,
}

/// Accepted activations no thread has taken yet, by function: at most `max` each.
#[derive(Debug)]
struct Backlog {
    max: usize,
    waiting: Mutex<HashMap<FunctionKey, usize>>,
}

/// A place in a function's backlog, given back when dropped.
#[derive(Debug)]
pub(crate) struct Place {
    backlog: Arc<Backlog>,
    key: FunctionKey,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut waiting = self.backlog.waiting.lock();
        if let Some(n) = waiting.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                waiting.remove(&self.key);
            }
        }
    }
}

impl Backlog {
    fn new(max: usize) -> Arc<Backlog> {
        Arc::new(Backlog {
            max: max.max(1),
            waiting: Mutex::new(HashMap::new()),
        })
    }

    fn reserve(self: &Arc<Self>, key: &FunctionKey) -> Result<Place, Error> {
        let mut waiting = self.waiting.lock();
        let n = waiting.entry(key.clone()).or_insert(0);
        if *n >= self.max {
            return Err(Error::QueueFull {
                function: key.to_string(),
                max_queue: self.max,
            });
        }
        *n += 1;
        Ok(Place {
            backlog: Arc::clone(self),
            key: key.clone(),
        })
    }
}

/// The accepted activations and the threads that run them.
#[derive(Debug)]
pub(crate) struct AsyncRunner {
    queue: Mutex<Option<Sender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    closing: Arc<AtomicBool>,
    invoker: Arc<Invoker>,
    backlog: Arc<Backlog>,
}

impl AsyncRunner {
    /// Starts `workers` threads (at least 1); at most `max_waiting` activations of a
    /// function wait for them.
    pub fn start(
        workers: usize,
        max_waiting: usize,
        invoker: Arc<Invoker>,
    ) -> Result<AsyncRunner, Error> {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let closing = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for index in 0..workers.max(1) {
            let (rx, closing, invoker) = (rx.clone(), closing.clone(), invoker.clone());
            let name = format!("sprout-async-{index}");
            let thread = std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || run(&rx, &closing, &invoker))
                .map_err(|source| Error::State {
                    path: name.into(),
                    source,
                })?;
            threads.push(thread);
        }
        Ok(AsyncRunner {
            queue: Mutex::new(Some(tx)),
            threads: Mutex::new(threads),
            closing,
            invoker,
            backlog: Backlog::new(max_waiting),
        })
    }

    /// A place for one more accepted activation of `key`, or [`Error::QueueFull`]
    /// when `max_waiting` of them wait for a thread already. Asked before the
    /// acceptance is made: a refusal accepts nothing.
    pub fn reserve(&self, key: &FunctionKey) -> Result<Place, Error> {
        self.backlog.reserve(key)
    }

    /// Queues an accepted activation. Once the runner is stopping it is recorded as
    /// not run instead.
    pub fn submit(&self, job: Job) {
        let refused = match &*self.queue.lock() {
            Some(tx) if !self.closing.load(Ordering::SeqCst) => tx.send(job).err().map(|e| e.0),
            _ => Some(job),
        };
        if let Some(job) = refused {
            not_run(&self.invoker, &job);
        }
    }

    /// Stops taking work: what waits is recorded as not run; returns once every
    /// thread has ended (after the invocations they run end).
    pub fn stop(&self) {
        self.closing.store(true, Ordering::SeqCst);
        drop(self.queue.lock().take());
        for thread in self.threads.lock().drain(..) {
            let _ = thread.join();
        }
    }
}

fn run(rx: &Receiver<Job>, closing: &AtomicBool, invoker: &Invoker) {
    for mut job in rx.iter() {
        // Taken: it leaves the backlog (and waits, if it must, in its function's queue).
        drop(job.place.take());
        if closing.load(Ordering::SeqCst) {
            not_run(invoker, &job);
            continue;
        }
        let span = tracing::debug_span!("async", activation = %job.id, function = %job.key);
        let _g = span.enter();
        let opts = CallOpts {
            activation: Some(job.id),
            arrived: Some(job.arrived),
            background: true,
            openwhisk: job.openwhisk.as_ref(),
            ..CallOpts::default()
        };
        // Its record, success or failure, is the invoker's to write; a full function
        // queue is waited out inside the invoke (`CallOpts::background`). A panic
        // is caught so the record is written and the thread lives on.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            invoker.invoke(&job.key, job.event.clone(), &opts, None)
        }));
        match outcome {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %ipc::chain(&e), "asynchronous activation failed")
            }
            Err(_) => {
                tracing::error!("asynchronous activation panicked");
                let panicked = Error::State {
                    path: "asynchronous activation".into(),
                    source: std::io::Error::other("its invocation panicked in the agent"),
                };
                invoker.record_not_run(&job.key, job.version, job.limits, &opts, &panicked);
            }
        }
        drop(job.ticket);
    }
}

/// Records `job` as accepted and never run (the agent is shutting down).
fn not_run(invoker: &Invoker, job: &Job) {
    let opts = CallOpts {
        activation: Some(job.id),
        arrived: Some(job.arrived),
        background: true,
        openwhisk: job.openwhisk.as_ref(),
        ..CallOpts::default()
    };
    invoker.record_not_run(&job.key, job.version, job.limits, &opts, &Error::NotStarted);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_function_backlog_holds_at_most_its_bound_and_frees_places_as_they_go() {
        let backlog = Backlog::new(2);
        let f = FunctionKey::new("alpha", "f").unwrap();
        let g = FunctionKey::new("beta", "f").unwrap();
        let a = backlog.reserve(&f).unwrap();
        let b = backlog.reserve(&f).unwrap();
        let refused = backlog.reserve(&f).unwrap_err();
        assert!(matches!(refused, Error::QueueFull { max_queue: 2, .. }));
        assert_eq!(
            refused.to_string(),
            "function alpha/f: queue is full (2 requests waiting, the most max_queue allows)"
        );
        // Another function (here: of another namespace) has its own.
        let c = backlog.reserve(&g).unwrap();
        drop(a);
        let a = backlog.reserve(&f).unwrap();
        drop((a, b, c));
        // Nothing is kept for functions with nothing waiting.
        assert!(backlog.waiting.lock().is_empty());
    }
}
