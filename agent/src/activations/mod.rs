//! Activation records: every invocation's id, timings, status, result and logs, kept
//! in the data directory's `activations/records.db` ([`store`]), and the acceptance
//! of asynchronous invocations.
//!
//! [`Activations`] is the component the agent holds. With no data directory (the
//! embedded CLI) or with `--no-records` it keeps nothing, but ids are still made.
//! Writes go to one writer thread: [`Activations::accept`] waits until an
//! asynchronous activation's pending row is durable; [`Activations::finish`] hands a
//! finished record over without waiting (a channel send: the warm path's cost). See
//! `docs/design.md`, "Activation records".

mod error;
pub mod record;
pub mod store;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::time::Duration;

use ipc::api::{ActivationId, ActivationRecord};

pub use error::Error;
pub use record::{Accepted, Finished, Mark, OpenWhiskFields, StreamLog, TimedLogs};
pub use store::{Lookup, Query, Retention};

use store::Store;

/// The default of `--activations-max`: finished records kept.
pub const DEFAULT_MAX_COUNT: u64 = 10_000;
/// The default of `--activations-max-age`: a week.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// A listing's default and largest `limit` (OpenWhisk's: 30 and 200).
pub const DEFAULT_LIMIT: u64 = 30;
pub const MAX_LIMIT: u64 = 200;

/// The reason a pending activation found at start is recorded with.
pub const LOST_AT_START: &str =
    "the agent stopped before this activation finished (it crashed or was killed); it was not run again";
/// The reason an accepted activation not yet started at a graceful shutdown is
/// recorded with.
pub const LOST_AT_SHUTDOWN: &str =
    "the agent shut down before this activation started; it was not run";

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_count: DEFAULT_MAX_COUNT,
            max_age: DEFAULT_MAX_AGE,
        }
    }
}

/// The record store, or none.
#[derive(Debug)]
pub struct Activations {
    store: Option<Store>,
}

impl Activations {
    /// No store: records are dropped, ids still made.
    pub fn off() -> Activations {
        Activations { store: None }
    }

    /// Opens the store in `dir` (the data directory's `activations/`); pending rows
    /// left by an agent that stopped are recorded as lost ([`LOST_AT_START`]).
    pub fn open(dir: &Path, retention: Retention) -> Result<Activations, Error> {
        let (store, lost) = Store::open(dir, retention, LOST_AT_START)?;
        tracing::info!(path = %store.path().display(), lost, "activation records opened");
        Ok(Activations { store: Some(store) })
    }

    /// A new random id (UUID v4's 128 bits).
    pub fn new_id() -> ActivationId {
        ActivationId::from_u128(uuid::Uuid::new_v4().as_u128())
    }

    /// Whether records are kept.
    pub fn is_on(&self) -> bool {
        self.store.is_some()
    }

    /// Makes an asynchronous activation's acceptance durable; returns once it is.
    pub fn accept(&self, accepted: Accepted) -> Result<(), Error> {
        match &self.store {
            Some(store) => store.accept(accepted),
            None => Err(Error::WriterGone),
        }
    }

    /// Hands a finished record to the writer without waiting (dropped without a store).
    pub fn finish(&self, record: Finished) {
        if let Some(store) = &self.store {
            if let Err(e) = store.finish(Box::new(record)) {
                tracing::debug!(error = %e, "activation record dropped");
            }
        }
    }

    /// Returns once every record handed over so far is committed.
    pub fn flush(&self) -> Result<(), Error> {
        match &self.store {
            Some(store) => store.flush(),
            None => Ok(()),
        }
    }

    /// Commits what is queued and stops the writer.
    pub fn close(&self) {
        if let Some(store) = &self.store {
            store.close();
        }
    }

    /// `None` without a store.
    pub fn get(&self, id: ActivationId, namespace: Option<&str>) -> Option<Result<Lookup, Error>> {
        self.store.as_ref().map(|s| s.get(id, namespace))
    }

    /// `None` without a store.
    pub fn list(&self, query: &Query) -> Option<Result<Vec<ActivationRecord>, Error>> {
        self.store.as_ref().map(|s| s.list(query))
    }

    /// Records held (finished and pending); `None` without a store.
    pub fn count(&self) -> Option<Result<u64, Error>> {
        self.store.as_ref().map(|s| s.count())
    }
}
