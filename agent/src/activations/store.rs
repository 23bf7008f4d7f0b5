//! The SQLite database of activation records, `activations/records.db` in the data
//! directory (WAL, `synchronous=FULL`).
//!
//! One writer thread (`sprout-records`) owns the write connection and commits what is
//! queued in one transaction (group commit): an acceptance's sender waits until the
//! transaction holding it is committed (durable: WAL with `synchronous=FULL` syncs
//! that commit), a finished record's does not, and a transaction of finished records
//! only is not synced (`synchronous=NORMAL`: lost only if the machine, not the
//! process, crashes before the next sync or checkpoint). Reads use a connection of their own
//! (WAL lets them run beside the writer). The writer also enforces retention.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender};
use ipc::api::{ActivationId, ActivationLimits, ActivationRecord, ActivationStatus};
use parking_lot::Mutex;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde_json::value::RawValue;

use super::error::{sql, Error};
use super::record::{epoch_ms, format_logs, Accepted, Finished};

/// The database file in `activations/`.
pub const DB_FILE: &str = "records.db";
/// The schema this build reads and writes (SQLite's `user_version`). Version 1
/// (sprout before records held their limits) is refused, not migrated: its records
/// cannot say what memory they were billed at. Version 2 (before OpenWhisk
/// activations' `kind` and `subject`) is migrated when opened ([`MIGRATE_2_TO_3`]).
pub const SCHEMA_VERSION: i64 = 3;
/// Version 2 to 3: two columns, empty for every record written before.
const MIGRATE_2_TO_3: &str = "BEGIN; ALTER TABLE activations ADD COLUMN kind TEXT; \
    ALTER TABLE activations ADD COLUMN subject TEXT; PRAGMA user_version = 3; COMMIT;";
/// Most writes committed in one transaction.
const MAX_BATCH: usize = 1024;
/// Retention runs at least this often while records are written, and when idle.
const PRUNE_EVERY: Duration = Duration::from_secs(1);
/// How long finished records wait to be committed together with later ones (what a
/// crash of the process can lose, at most).
const LINGER: Duration = Duration::from_millis(5);
/// ... or after this many records.
const PRUNE_AFTER: usize = 256;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS activations (
    id TEXT NOT NULL PRIMARY KEY,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    pending INTEGER NOT NULL,
    blocking INTEGER NOT NULL,
    start_ms INTEGER NOT NULL,
    end_ms INTEGER NOT NULL,
    wait_ms INTEGER NOT NULL,
    init_ms INTEGER NOT NULL,
    start_path TEXT,
    status INTEGER NOT NULL,
    result TEXT,
    logs TEXT,
    logs_truncated INTEGER NOT NULL DEFAULT 0,
    cause TEXT,
    called INTEGER NOT NULL DEFAULT 0,
    memory_mb INTEGER NOT NULL,
    timeout_ms INTEGER NOT NULL,
    kind TEXT,
    subject TEXT
);
CREATE INDEX IF NOT EXISTS activations_start ON activations (start_ms);
CREATE INDEX IF NOT EXISTS activations_name ON activations (namespace, name, start_ms);
CREATE INDEX IF NOT EXISTS activations_pending ON activations (pending) WHERE pending = 1;
";

const COLUMNS: &str = "id, namespace, name, version, start_ms, end_ms, wait_ms, init_ms, \
    start_path, status, logs_truncated, cause, called, blocking, memory_mb, timeout_ms, \
    kind, subject, result, logs";

/// How long records are kept: the newest `max_count` finished ones, none older than
/// `max_age` (by start). Pending (accepted, unfinished) rows are never removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub max_count: u64,
    pub max_age: Duration,
}

/// Where an acceptance hears that it is durable.
type Reply = Sender<Result<(), Error>>;

/// What the writer is asked to do.
enum Write {
    Accept(Accepted, Reply),
    Finish(Box<Finished>),
    /// Answered once everything sent before it is committed and retention has run.
    Flush(Sender<()>),
}

/// A record read back: found, accepted and not finished, or unknown.
#[derive(Debug)]
pub enum Lookup {
    Found(Box<ActivationRecord>),
    Pending,
    Missing,
}

/// A listing's filter (`GET /activations`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// `None`: every namespace.
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// Only records that started at or after this (ms since the epoch).
    pub since: Option<u64>,
    pub limit: u64,
    pub skip: u64,
}

/// The open store: the writer's queue and thread, and the read connection.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    /// The writer's two queues: finished records, and what a caller waits on
    /// (acceptances, flushes), which alone wakes a lingering writer.
    writer: Mutex<Option<(Sender<Write>, Sender<Write>)>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    reader: Mutex<Connection>,
}

impl std::fmt::Debug for Write {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Write::Accept(a, _) => write!(f, "Accept({})", a.id),
            Write::Finish(r) => write!(f, "Finish({})", r.id),
            Write::Flush(_) => write!(f, "Flush"),
        }
    }
}

impl Store {
    /// Opens (creating) `dir/records.db`, marks every row still pending as lost with
    /// `reason` (the agent that accepted it stopped before it finished: it is never
    /// run again), applies retention and starts the writer. Returns the store and how
    /// many pending rows it marked.
    pub fn open(dir: &Path, retention: Retention, reason: &str) -> Result<(Store, u64), Error> {
        let path = dir.join(DB_FILE);
        let open_err = |source| Error::Open {
            path: path.clone(),
            source,
        };
        let mut conn = Connection::open(&path).map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(open_err)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(open_err)?;
        // A new database has no tables and version 0; anything else must be this
        // build's schema (one with tables and no version is not sprout's). Checked
        // before anything is written: a refused file is left as it was.
        let tables: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
            .map_err(open_err)?;
        let migrate = version == 2;
        if version != SCHEMA_VERSION && !migrate && (version != 0 || tables != 0) {
            return Err(Error::Version {
                path,
                found: version,
                expected: SCHEMA_VERSION,
            });
        }
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(mode, "activation records: WAL mode refused");
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        if version == 0 {
            // The tables and the version in one transaction: a crash leaves a new
            // database empty or whole.
            conn.execute_batch(&format!(
                "BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            ))
            .map_err(open_err)?;
        }
        if migrate {
            // In one transaction: a crash leaves version 2 whole, migrated again next time.
            conn.execute_batch(MIGRATE_2_TO_3).map_err(open_err)?;
            tracing::info!(path = %path.display(), "activation records migrated to schema 3");
        }
        let lost = mark_pending_lost(&mut conn, reason, SystemTime::now())?;
        prune(&conn, retention, SystemTime::now())?;
        let reader = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(open_err)?;
        reader
            .busy_timeout(Duration::from_secs(5))
            .map_err(open_err)?;
        let (finished_tx, finished_rx) = crossbeam_channel::unbounded();
        let (urgent_tx, urgent_rx) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new()
            .name("sprout-records".into())
            .spawn(move || Writer::new(conn, retention).run(&finished_rx, &urgent_rx))
            .map_err(Error::Thread)?;
        Ok((
            Store {
                path,
                writer: Mutex::new(Some((finished_tx, urgent_tx))),
                thread: Mutex::new(Some(thread)),
                reader: Mutex::new(reader),
            },
            lost,
        ))
    }

    fn send(&self, write: Write) -> Result<(), Error> {
        match &*self.writer.lock() {
            Some((finished, _)) if matches!(write, Write::Finish(_)) => {
                finished.send(write).map_err(|_| Error::WriterGone)
            }
            Some((_, urgent)) => urgent.send(write).map_err(|_| Error::WriterGone),
            None => Err(Error::WriterGone),
        }
    }

    /// Writes `accepted` pending and returns once it is durable (committed with
    /// whatever else was queued).
    pub fn accept(&self, accepted: Accepted) -> Result<(), Error> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send(Write::Accept(accepted, tx))?;
        rx.recv().map_err(|_| Error::WriterGone)?
    }

    /// Queues a finished record; it is committed with the next batch.
    pub fn finish(&self, record: Box<Finished>) -> Result<(), Error> {
        self.send(Write::Finish(record))
    }

    /// Returns once everything queued before is committed and retention has run.
    pub fn flush(&self) -> Result<(), Error> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send(Write::Flush(tx))?;
        rx.recv().map_err(|_| Error::WriterGone)
    }

    /// Commits what is queued and stops the writer. Later writes fail.
    pub fn close(&self) {
        drop(self.writer.lock().take());
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
    }

    /// The record of `id`, if it is in `namespace` (`None`: any).
    pub fn get(&self, id: ActivationId, namespace: Option<&str>) -> Result<Lookup, Error> {
        let conn = self.reader.lock();
        let row = conn
            .query_row(
                &format!("SELECT pending, {COLUMNS} FROM activations WHERE id = ?1"),
                params![id.to_string()],
                |r| Ok((r.get::<_, bool>(0)?, Row::read(r, 1, true)?)),
            )
            .optional()
            .map_err(sql("read a record"))?;
        Ok(match row {
            Some((_, row)) if namespace.is_some_and(|ns| ns != row.namespace) => Lookup::Missing,
            Some((true, _)) => Lookup::Pending,
            Some((false, row)) => Lookup::Found(Box::new(row.into_record()?)),
            None => Lookup::Missing,
        })
    }

    /// Finished records, newest first, without their results and logs.
    pub fn list(&self, q: &Query) -> Result<Vec<ActivationRecord>, Error> {
        let conn = self.reader.lock();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM activations WHERE pending = 0 \
                 AND (?1 IS NULL OR namespace = ?1) AND (?2 IS NULL OR name = ?2) \
                 AND (?3 IS NULL OR start_ms >= ?3) \
                 ORDER BY start_ms DESC, rowid DESC LIMIT ?4 OFFSET ?5"
            ))
            .map_err(sql("list records"))?;
        let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
        let skip = i64::try_from(q.skip).unwrap_or(i64::MAX);
        let since = q.since.map(|s| i64::try_from(s).unwrap_or(i64::MAX));
        let rows = stmt
            .query_map(params![q.namespace, q.name, since, limit, skip], |r| {
                Row::read(r, 0, false)
            })
            .map_err(sql("list records"))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row.map_err(sql("list records"))?.into_record()?);
        }
        Ok(out)
    }

    /// Finished and pending rows (`sprout_activations_stored`, read at scrape time).
    pub fn count(&self) -> Result<u64, Error> {
        let conn = self.reader.lock();
        conn.query_row("SELECT count(*) FROM activations", [], |r| r.get(0))
            .map_err(sql("count records"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

/// Marks every pending row as lost (`whisk_internal_error`, with `reason` as its
/// error) at `now`.
fn mark_pending_lost(conn: &mut Connection, reason: &str, now: SystemTime) -> Result<u64, Error> {
    let result = serde_json::to_string(&ipc::api::ErrorBody {
        error: ipc::api::ErrorDetail {
            kind: "lost".to_owned(),
            message: reason.to_owned(),
            exception: None,
            traceback: None,
            logs: None,
        },
    })
    .expect("an error body serializes");
    let now = epoch_ms(now) as i64;
    let n = conn
        .execute(
            "UPDATE activations SET pending = 0, status = ?1, result = ?2, logs = '[]', \
             start_ms = ?3, end_ms = ?3, wait_ms = max(0, ?3 - start_ms) WHERE pending = 1",
            params![ActivationStatus::WhiskInternalError.code(), result, now],
        )
        .map_err(sql("mark lost activations"))?;
    if n > 0 {
        tracing::warn!(
            activations = n,
            "activations accepted by an agent that stopped before they finished are recorded as lost (not run again)"
        );
    }
    Ok(n as u64)
}

/// Applies retention: the newest `max_count` finished records, none older than
/// `max_age`.
fn prune(conn: &Connection, retention: Retention, now: SystemTime) -> Result<u64, Error> {
    let cutoff = epoch_ms(now)
        .saturating_sub(u64::try_from(retention.max_age.as_millis()).unwrap_or(u64::MAX))
        as i64;
    let aged = conn
        .execute(
            "DELETE FROM activations WHERE pending = 0 AND start_ms < ?1",
            params![cutoff],
        )
        .map_err(sql("remove old records"))?;
    let max = i64::try_from(retention.max_count).unwrap_or(i64::MAX);
    let over = conn
        .execute(
            "DELETE FROM activations WHERE rowid IN (SELECT rowid FROM activations \
             WHERE pending = 0 ORDER BY start_ms DESC, rowid DESC LIMIT -1 OFFSET ?1)",
            params![max],
        )
        .map_err(sql("remove records over the count"))?;
    Ok((aged + over) as u64)
}

/// The writer thread's state.
struct Writer {
    conn: Connection,
    retention: Retention,
    written_since_prune: usize,
    last_prune: Instant,
    /// Failures are logged at most this often.
    last_warned: Option<Instant>,
    /// Whether the connection syncs each commit now (`synchronous=FULL`).
    syncing: bool,
}

impl Writer {
    fn new(conn: Connection, retention: Retention) -> Writer {
        Writer {
            conn,
            retention,
            written_since_prune: 0,
            last_prune: Instant::now(),
            last_warned: None,
            syncing: true,
        }
    }

    fn run(mut self, finished: &Receiver<Write>, urgent: &Receiver<Write>) {
        loop {
            let first = crossbeam_channel::select! {
                recv(urgent) -> w => w,
                recv(finished) -> w => w,
                default(PRUNE_EVERY) => {
                    self.prune_now();
                    continue;
                }
            };
            let mut batch = Vec::new();
            let closing = match first {
                Ok(w) => {
                    // Finished records wait up to LINGER for company (one commit for
                    // many: most of a record's cost is its transaction). Only an
                    // acceptance or a flush, whose sender waits, ends the wait early:
                    // a finished record sent meanwhile wakes nobody.
                    if matches!(w, Write::Finish(_)) {
                        if let Ok(u) = urgent.recv_deadline(Instant::now() + LINGER) {
                            batch.push(u);
                        }
                    }
                    batch.push(w);
                    false
                }
                // Both queues are dropped together (`close`): commit what is left.
                Err(_) => true,
            };
            while batch.len() < MAX_BATCH {
                match urgent.try_recv().or_else(|_| finished.try_recv()) {
                    Ok(w) => batch.push(w),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                self.commit(batch);
            }
            if closing && urgent.is_empty() && finished.is_empty() {
                break;
            }
        }
        self.prune_now();
        tracing::debug!("activation record writer stopped");
    }

    /// Writes `batch` in one transaction, then answers its acceptances and flushes.
    fn commit(&mut self, batch: Vec<Write>) {
        let mut answers: Vec<(Reply, Result<(), Error>)> = Vec::new();
        let mut flushes = Vec::new();
        let mut failed = Vec::new();
        let mut finished = 0;
        // A batch holding an acceptance (or a flush) is synced (`synchronous=FULL`):
        // its 202 waits for that. A batch of finished records only is committed
        // without a sync (`NORMAL`; WAL): a crash of the process loses none of it
        // (the kernel has it), a crash of the machine may lose what was committed
        // since the last synced commit or checkpoint. That fsync per record was most
        // of what records cost the warm path on a busy machine.
        let sync = batch
            .iter()
            .any(|w| matches!(w, Write::Accept(..) | Write::Flush(_)));
        if sync != self.syncing {
            let mode = if sync { "FULL" } else { "NORMAL" };
            match self.conn.pragma_update(None, "synchronous", mode) {
                Ok(()) => self.syncing = sync,
                Err(e) => self.warn(&sql("set synchronous")(e)),
            }
        }
        let written = (|| -> Result<(), Error> {
            let tx = self.conn.transaction().map_err(sql("begin a batch"))?;
            for write in batch {
                match write {
                    Write::Accept(a, reply) => {
                        let outcome = insert_pending(&tx, &a);
                        answers.push((reply, outcome));
                    }
                    Write::Finish(f) => {
                        finished += 1;
                        if let Err(e) = upsert_finished(&tx, &f) {
                            failed.push(e);
                        }
                    }
                    Write::Flush(reply) => flushes.push(reply),
                }
            }
            tx.commit().map_err(sql("commit a batch"))
        })();
        self.written_since_prune += finished;
        for e in &failed {
            self.warn(e);
        }
        match written {
            Ok(()) => {
                for (reply, outcome) in answers {
                    let _ = reply.send(outcome);
                }
            }
            Err(e) => {
                self.warn(&e);
                for (reply, _) in answers {
                    let _ = reply.send(Err(Error::NotWritten(ipc::chain(&e))));
                }
            }
        }
        if !flushes.is_empty()
            || self.written_since_prune >= PRUNE_AFTER
            || (self.written_since_prune > 0 && self.last_prune.elapsed() >= PRUNE_EVERY)
        {
            self.prune_now();
        }
        for reply in flushes {
            let _ = reply.send(());
        }
    }

    fn prune_now(&mut self) {
        self.written_since_prune = 0;
        self.last_prune = Instant::now();
        if let Err(e) = prune(&self.conn, self.retention, SystemTime::now()) {
            self.warn(&e);
        }
    }

    fn warn(&mut self, e: &Error) {
        if self
            .last_warned
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(10))
        {
            self.last_warned = Some(Instant::now());
            tracing::warn!(error = %ipc::chain(e), "activation records: a write failed");
        }
    }
}

/// Inserts an accepted activation's pending row; an id in use is refused.
fn insert_pending(conn: &Connection, a: &Accepted) -> Result<(), Error> {
    let n = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO activations (id, namespace, name, version, pending, \
             blocking, start_ms, end_ms, wait_ms, init_ms, status, memory_mb, timeout_ms, \
             kind, subject) \
             VALUES (?1, ?2, ?3, ?4, 1, 0, ?5, ?5, 0, 0, ?6, ?7, ?8, ?9, ?10)",
        )
        .and_then(|mut s| {
            s.execute(params![
                a.id.to_string(),
                a.namespace,
                a.name,
                a.version as i64,
                a.at_ms as i64,
                ActivationStatus::WhiskInternalError.code(),
                a.limits.memory as i64,
                a.limits.timeout as i64,
                a.openwhisk.as_ref().map(|o| &o.kind),
                a.openwhisk.as_ref().map(|o| &o.subject),
            ])
        })
        .map_err(sql("write an acceptance"))?;
    if n == 0 {
        return Err(Error::IdInUse { id: a.id });
    }
    Ok(())
}

/// Writes a finished record: a new row, or the end of its pending one. A finished
/// row is never written over (an id names one activation).
fn upsert_finished(conn: &Connection, f: &Finished) -> Result<(), Error> {
    let (lines, cut) = format_logs(&f.logs, super::record::from_epoch_ms(f.end_ms));
    let logs = serde_json::to_string(&lines).expect("strings serialize");
    let result = String::from_utf8_lossy(&f.result);
    conn.prepare_cached(
        "INSERT INTO activations (id, namespace, name, version, pending, blocking, start_ms, \
         end_ms, wait_ms, init_ms, start_path, status, result, logs, logs_truncated, cause, called, \
         memory_mb, timeout_ms, kind, subject) \
         VALUES (?1, ?2, ?3, ?4, 0, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, \
         ?19, ?20) \
         ON CONFLICT (id) DO UPDATE SET pending = 0, version = excluded.version, \
         start_ms = excluded.start_ms, end_ms = excluded.end_ms, wait_ms = excluded.wait_ms, \
         init_ms = excluded.init_ms, start_path = excluded.start_path, status = excluded.status, \
         result = excluded.result, logs = excluded.logs, logs_truncated = excluded.logs_truncated, \
         cause = excluded.cause, called = excluded.called, memory_mb = excluded.memory_mb, \
         timeout_ms = excluded.timeout_ms, kind = excluded.kind, subject = excluded.subject \
         WHERE pending = 1 \
         AND namespace = excluded.namespace AND name = excluded.name",
    )
    .and_then(|mut s| {
        s.execute(params![
            f.id.to_string(),
            f.namespace,
            f.name,
            f.version as i64,
            f.blocking,
            f.start_ms as i64,
            f.end_ms as i64,
            f.wait_ms as i64,
            f.init_ms as i64,
            f.start_path,
            f.status.code(),
            result,
            logs,
            cut,
            f.cause.map(|c| c.to_string()),
            f.called,
            f.limits.memory as i64,
            f.limits.timeout as i64,
            f.openwhisk.as_ref().map(|o| &o.kind),
            f.openwhisk.as_ref().map(|o| &o.subject),
        ])
    })
    .map_err(sql("write a record"))?;
    Ok(())
}

/// A row as read, before it is checked.
struct Row {
    id: String,
    namespace: String,
    name: String,
    version: i64,
    start: i64,
    end: i64,
    wait: i64,
    init: i64,
    start_path: Option<String>,
    status: u8,
    logs_truncated: bool,
    cause: Option<String>,
    called: bool,
    blocking: bool,
    memory_mb: i64,
    timeout_ms: i64,
    kind: Option<String>,
    subject: Option<String>,
    result: Option<String>,
    logs: Option<String>,
}

impl Row {
    /// Reads [`COLUMNS`] from column `at` on; `full` reads the result and logs too.
    fn read(r: &rusqlite::Row<'_>, at: usize, full: bool) -> rusqlite::Result<Row> {
        Ok(Row {
            id: r.get(at)?,
            namespace: r.get(at + 1)?,
            name: r.get(at + 2)?,
            version: r.get(at + 3)?,
            start: r.get(at + 4)?,
            end: r.get(at + 5)?,
            wait: r.get(at + 6)?,
            init: r.get(at + 7)?,
            start_path: r.get(at + 8)?,
            status: r.get(at + 9)?,
            logs_truncated: r.get(at + 10)?,
            cause: r.get(at + 11)?,
            called: r.get(at + 12)?,
            blocking: r.get(at + 13)?,
            memory_mb: r.get(at + 14)?,
            timeout_ms: r.get(at + 15)?,
            kind: r.get(at + 16)?,
            subject: r.get(at + 17)?,
            result: if full { r.get(at + 18)? } else { None },
            logs: if full { r.get(at + 19)? } else { None },
        })
    }

    fn into_record(self) -> Result<ActivationRecord, Error> {
        let damaged = |what: &str| Error::Damaged {
            what: format!("{what} of activation {:?}", self.id),
        };
        let id = ActivationId::parse(&self.id).map_err(|_| damaged("the id"))?;
        let status =
            ActivationStatus::from_code(self.status).ok_or_else(|| damaged("the status"))?;
        let cause = match &self.cause {
            Some(c) => Some(ActivationId::parse(c).map_err(|_| damaged("the cause"))?),
            None => None,
        };
        let result = match self.result {
            Some(text) => Some(RawValue::from_string(text).map_err(|_| damaged("the result"))?),
            None => None,
        };
        let logs = match &self.logs {
            Some(text) => Some(serde_json::from_str(text).map_err(|_| damaged("the logs"))?),
            None => None,
        };
        let ms = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(ActivationRecord {
            activation_id: id,
            namespace: self.namespace,
            name: self.name,
            version: ms(self.version),
            start: ms(self.start),
            end: ms(self.end),
            duration: ms(self.end).saturating_sub(ms(self.start)),
            wait_time: ms(self.wait),
            init_time: ms(self.init),
            start_path: self.start_path,
            status,
            status_code: status.code(),
            result,
            logs,
            logs_truncated: self.logs_truncated,
            cause,
            called: self.called,
            blocking: self.blocking,
            limits: ActivationLimits {
                memory: ms(self.memory_mb),
                timeout: ms(self.timeout_ms),
            },
            kind: self.kind,
            subject: self.subject,
        })
    }
}
