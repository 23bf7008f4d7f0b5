//! Why the record store failed.

use std::path::PathBuf;

/// A failure of the activation record store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("activation records {path}: cannot open the database")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "activation records {path}: schema version {found}, this sprout reads version {expected} \
         (move the directory activations/ away to start without its records)"
    )]
    Version {
        path: PathBuf,
        found: i64,
        expected: i64,
    },
    #[error("activation records: {what}")]
    Sql {
        what: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("activation records: a stored row is damaged ({what})")]
    Damaged { what: String },
    #[error("activation records: the batch holding it was not written: {0}")]
    NotWritten(String),
    #[error("activation records: the writer thread has stopped")]
    WriterGone,
    #[error("activation records: cannot start the writer thread")]
    Thread(#[source] std::io::Error),
    #[error("activation id {id} is in use: an activation id names one activation")]
    IdInUse { id: ipc::api::ActivationId },
}

/// `map_err` helper: a SQL failure doing `what`.
pub(super) fn sql(what: &'static str) -> impl FnOnce(rusqlite::Error) -> Error {
    move |source| Error::Sql { what, source }
}
