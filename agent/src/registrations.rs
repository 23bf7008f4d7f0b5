//! The registrations store: registered functions and workflows, kept in the data
//! directory so that a restarted agent serves them again without their being
//! registered again (`registrations/registry.db`).
//!
//! One SQLite database (through `rusqlite`, the library compiled in) in WAL mode
//! with `synchronous=FULL`: a write returns once it is on disk, and a crash at any
//! point leaves either the whole transaction or none of it. The store knows rows,
//! not functions: the registry checks what it loads exactly as it checks a new
//! registration ([`crate::registry`]). It holds:
//!
//! | table | holds |
//! |---|---|
//! | `schema_version` | one row: [`SCHEMA_VERSION`]; any other is refused |
//! | `meta` | `next_version`: the next registration version (versions never repeat) |
//! | `functions` | namespace, name, version, where its code is ([`Code`]), its `FunctionConfig` and its packages (the cache entries it was registered with), as JSON |
//! | `workflows` | namespace, name and the workflow's file, as it was registered |
//!
//! Uploaded code lives beside it in `code/<name>-<version>/`; [`sync_tree`] puts it on
//! disk before its row is committed, and [`remove_unreferenced`] removes what no row
//! names (an upload whose registration never committed, code a crash left after its
//! row was replaced or deleted).
//!
//! The connection has its own lock, a leaf: nothing else is locked under it.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use ipc::api::FunctionConfig;
use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension};

use crate::packages::Entry;

/// The database's file name in `registrations/`.
pub const DB_FILE: &str = "registry.db";
/// The schema this build reads and writes.
pub const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE functions (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    code_kind TEXT NOT NULL CHECK (code_kind IN ('path', 'upload')),
    code TEXT NOT NULL,
    config TEXT NOT NULL,
    packages TEXT NOT NULL,
    registered_at INTEGER NOT NULL,
    PRIMARY KEY (namespace, name)
) WITHOUT ROWID;
CREATE TABLE workflows (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    registered_at INTEGER NOT NULL,
    PRIMARY KEY (namespace, name)
) WITHOUT ROWID;
INSERT INTO meta (key, value) VALUES ('next_version', 1);
";

/// What went wrong with the registrations store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("registrations database {path}: cannot {what}")]
    Sql {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "registrations database {path} has schema version {found}, this sprout reads version \
         {SCHEMA_VERSION}; use the sprout that wrote it, or a new data directory"
    )]
    Schema { path: PathBuf, found: i64 },
    #[error(
        "registrations database {path} is not sprout's: it has tables ({tables}) but no \
         schema_version"
    )]
    NotOurs { path: PathBuf, tables: String },
    #[error("registrations database {path}: function {namespace}/{name}'s {field} cannot be read")]
    BadRow {
        path: PathBuf,
        namespace: String,
        name: String,
        field: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("uploaded code {path}")]
    Code {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where a registered function's code is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Code {
    /// A directory on the host, read in place (its canonical path).
    Path(PathBuf),
    /// An uploaded archive unpacked into `code/<this>/`.
    Upload(String),
}

/// One registered function as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionRow {
    pub namespace: String,
    pub name: String,
    pub version: u64,
    pub code: Code,
    /// As the registration gave it (the checks fill in the defaults again).
    pub config: FunctionConfig,
    /// The cache entries of the packages it was registered with, in import order.
    pub packages: Vec<Entry>,
}

/// One registered workflow as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkflowRow {
    pub namespace: String,
    pub name: String,
    /// Its workflow file, as registered.
    pub spec: String,
}

/// Everything registered, as loaded at start.
#[derive(Debug, Default)]
pub struct Stored {
    pub functions: Vec<FunctionRow>,
    pub workflows: Vec<WorkflowRow>,
    /// Rows whose JSON cannot be read (written by no sprout of this schema): kept,
    /// not served; their code is kept too.
    pub unreadable: Vec<(Code, Error)>,
}

impl Stored {
    /// The code of every function row, readable or not.
    pub fn code(&self) -> impl Iterator<Item = &Code> {
        self.functions
            .iter()
            .map(|f| &f.code)
            .chain(self.unreadable.iter().map(|(c, _)| c))
    }
}

/// The open database.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens (creating it when new) `registry.db` in `dir`. Refuses a database of
    /// another schema version, and one with tables that are not sprout's.
    pub fn open(dir: &Path) -> Result<Store, Error> {
        let path = dir.join(DB_FILE);
        let sql = |what| {
            let path = path.clone();
            move |source| Error::Sql { path, what, source }
        };
        let mut conn = Connection::open(&path).map_err(sql("open it"))?;
        // WAL: a commit is one append to the log; FULL: the log is synced at every
        // commit, so a committed registration survives a power cut.
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))
            .map_err(sql("turn on its write-ahead log"))?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql("make its commits synchronous"))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql("set its busy timeout"))?;
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql("begin"))?;
        let tables: Vec<String> = {
            let mut stmt = tx
                .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
                .map_err(sql("list its tables"))?;
            let rows = stmt
                .query_map([], |r| r.get(0))
                .map_err(sql("list its tables"))?;
            rows.collect::<Result<_, _>>()
                .map_err(sql("list its tables"))?
        };
        if tables.is_empty() {
            tx.execute_batch(SCHEMA).map_err(sql("create its tables"))?;
            tx.execute(
                "INSERT INTO schema_version (version) VALUES (?1)",
                [SCHEMA_VERSION],
            )
            .map_err(sql("write its schema version"))?;
        } else if !tables.iter().any(|t| t == "schema_version") {
            return Err(Error::NotOurs {
                path,
                tables: tables.join(", "),
            });
        } else {
            let found: Option<i64> = tx
                .query_row("SELECT max(version) FROM schema_version", [], |r| r.get(0))
                .map_err(sql("read its schema version"))?;
            let found = found.unwrap_or(0);
            if found != SCHEMA_VERSION {
                return Err(Error::Schema { path, found });
            }
        }
        tx.commit().map_err(sql("commit its schema"))?;
        Ok(Store {
            path,
            conn: Mutex::new(conn),
        })
    }

    fn sql(&self, what: &'static str) -> impl FnOnce(rusqlite::Error) -> Error + '_ {
        move |source| Error::Sql {
            path: self.path.clone(),
            what,
            source,
        }
    }

    /// Takes the next registration version: it is durable before it is used, so no
    /// version is given twice, even across a crash.
    pub fn take_version(&self) -> Result<u64, Error> {
        let conn = self.conn.lock();
        let version: i64 = conn
            .query_row(
                "UPDATE meta SET value = value + 1 WHERE key = 'next_version' RETURNING value - 1",
                [],
                |r| r.get(0),
            )
            .map_err(self.sql("take a version"))?;
        Ok(version as u64)
    }

    /// Registers (or replaces) a function; returns the code of the row it replaced.
    /// Committed, and on disk, when it returns.
    pub fn put_function(&self, row: &FunctionRow) -> Result<Option<Code>, Error> {
        let (kind, code) = code_columns(&row.code);
        let config = serde_json::to_string(&row.config).expect("a FunctionConfig serialises");
        let packages = serde_json::to_string(&row.packages).expect("an Entry serialises");
        let mut conn = self.conn.lock();
        let tx = conn
            .transaction()
            .map_err(self.sql("begin a registration"))?;
        let old = tx
            .query_row(
                "SELECT code_kind, code FROM functions WHERE namespace = ?1 AND name = ?2",
                params![row.namespace, row.name],
                |r| Ok(code_of(&r.get::<_, String>(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(self.sql("read a registration"))?;
        tx.execute(
            "INSERT OR REPLACE INTO functions
             (namespace, name, version, code_kind, code, config, packages, registered_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                row.namespace,
                row.name,
                row.version as i64,
                kind,
                code,
                config,
                packages,
                now_ms()
            ],
        )
        .map_err(self.sql("write a registration"))?;
        // Versions never repeat, whatever the meta row says.
        tx.execute(
            "UPDATE meta SET value = max(value, ?1) WHERE key = 'next_version'",
            [row.version as i64 + 1],
        )
        .map_err(self.sql("write the next version"))?;
        tx.commit().map_err(self.sql("commit a registration"))?;
        Ok(old)
    }

    /// Unregisters a function; returns its code if it was registered. Committed when
    /// it returns.
    pub fn remove_function(&self, namespace: &str, name: &str) -> Result<Option<Code>, Error> {
        let conn = self.conn.lock();
        conn.query_row(
            "DELETE FROM functions WHERE namespace = ?1 AND name = ?2 RETURNING code_kind, code",
            params![namespace, name],
            |r| Ok(code_of(&r.get::<_, String>(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(self.sql("remove a registration"))
    }

    /// Registers (or replaces) a workflow.
    pub fn put_workflow(&self, row: &WorkflowRow) -> Result<(), Error> {
        let conn = self.conn.lock();
        conn.execute(
            "INSERT OR REPLACE INTO workflows (namespace, name, spec, registered_at)
             VALUES (?1, ?2, ?3, ?4)",
            params![row.namespace, row.name, row.spec, now_ms()],
        )
        .map_err(self.sql("write a workflow"))?;
        Ok(())
    }

    /// Unregisters a workflow; whether it was registered.
    pub fn remove_workflow(&self, namespace: &str, name: &str) -> Result<bool, Error> {
        let conn = self.conn.lock();
        let n = conn
            .execute(
                "DELETE FROM workflows WHERE namespace = ?1 AND name = ?2",
                params![namespace, name],
            )
            .map_err(self.sql("remove a workflow"))?;
        Ok(n > 0)
    }

    /// The next version [`Store::take_version`] would give.
    #[cfg(test)]
    pub fn next_version(&self) -> Result<u64, Error> {
        let conn = self.conn.lock();
        conn.query_row(
            "SELECT value FROM meta WHERE key = 'next_version'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map(|v| v as u64)
        .map_err(self.sql("read the next version"))
    }

    /// Everything registered, by namespace and name.
    pub fn load(&self) -> Result<Stored, Error> {
        let conn = self.conn.lock();
        let read = self.sql("read the registrations");
        let mut stmt = conn
            .prepare(
                "SELECT namespace, name, version, code_kind, code, config, packages
                 FROM functions ORDER BY namespace, name",
            )
            .map_err(self.sql("read the registrations"))?;
        type Raw = (String, String, i64, String, String, String, String);
        let raw: Vec<Raw> = stmt
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            })
            .and_then(|rows| rows.collect())
            .map_err(read)?;
        let mut functions = Vec::with_capacity(raw.len());
        let mut unreadable = Vec::new();
        for (namespace, name, version, kind, code, config, packages) in raw {
            let code = code_of(&kind, code);
            let bad = |field, source| Error::BadRow {
                path: self.path.clone(),
                namespace: namespace.clone(),
                name: name.clone(),
                field,
                source,
            };
            let parsed = serde_json::from_str(&config)
                .map_err(|e| bad("config", e))
                .and_then(|config| {
                    serde_json::from_str(&packages)
                        .map(|packages| (config, packages))
                        .map_err(|e| bad("packages", e))
                });
            let (config, packages) = match parsed {
                Ok(p) => p,
                Err(e) => {
                    unreadable.push((code, e));
                    continue;
                }
            };
            functions.push(FunctionRow {
                code,
                namespace,
                name,
                version: version as u64,
                config,
                packages,
            });
        }
        let mut stmt = conn
            .prepare("SELECT namespace, name, spec FROM workflows ORDER BY namespace, name")
            .map_err(self.sql("read the workflows"))?;
        let workflows = stmt
            .query_map([], |r| {
                Ok(WorkflowRow {
                    namespace: r.get(0)?,
                    name: r.get(1)?,
                    spec: r.get(2)?,
                })
            })
            .and_then(|rows| rows.collect())
            .map_err(self.sql("read the workflows"))?;
        Ok(Stored {
            functions,
            workflows,
            unreadable,
        })
    }
}

fn code_columns(code: &Code) -> (&'static str, String) {
    match code {
        Code::Path(p) => ("path", p.to_string_lossy().into_owned()),
        Code::Upload(dir) => ("upload", dir.clone()),
    }
}

/// The table's `CHECK` allows only these two kinds.
fn code_of(kind: &str, code: String) -> Code {
    match kind {
        "upload" => Code::Upload(code),
        _ => Code::Path(PathBuf::from(code)),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Whether `name` may be a directory of `code/`: one plain path component.
pub fn is_code_dir_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

/// Removes every entry of `code` (the data directory's `code/`) that no row names
/// (`rows`: each function row's code): an upload whose registration never committed,
/// or code whose row a crash replaced or deleted before the code was removed.
/// Returns the names removed.
pub fn remove_unreferenced<'a>(
    code: &Path,
    rows: impl Iterator<Item = &'a Code>,
) -> Result<Vec<String>, Error> {
    let named: HashSet<&str> = rows
        .filter_map(|c| match c {
            Code::Upload(dir) => Some(dir.as_str()),
            Code::Path(_) => None,
        })
        .collect();
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Code { path, source }
    };
    let mut removed = Vec::new();
    // `code/` was checked by `DataDir::open` (a directory of ours, in a directory only
    // we can change): its entries are what this user put there.
    for entry in fs::read_dir(code).map_err(err(code))? {
        let entry = entry.map_err(err(code))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if named.contains(name.as_str()) {
            continue;
        }
        let path = entry.path();
        if entry.file_type().map_err(err(&path))?.is_dir() {
            fs::remove_dir_all(&path).map_err(err(&path))?;
        } else {
            fs::remove_file(&path).map_err(err(&path))?;
        }
        removed.push(name);
    }
    removed.sort();
    Ok(removed)
}

/// Puts the tree at `dir` on disk: every file and directory in it synced (links are
/// not followed: a link lives in its directory), then `dir`'s parent, which holds
/// its name.
pub fn sync_tree(dir: &Path) -> Result<(), Error> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Code { path, source }
    };
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).map_err(err(&d))? {
            let entry = entry.map_err(err(&d))?;
            let path = entry.path();
            let kind = entry.file_type().map_err(err(&path))?;
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                fs::File::open(&path)
                    .and_then(|f| f.sync_all())
                    .map_err(err(&path))?;
            }
        }
        fs::File::open(&d)
            .and_then(|f| f.sync_all())
            .map_err(err(&d))?;
    }
    if let Some(parent) = dir.parent() {
        fs::File::open(parent)
            .and_then(|f| f.sync_all())
            .map_err(err(parent))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packages::Kind;

    fn row(name: &str, version: u64, code: Code) -> FunctionRow {
        FunctionRow {
            namespace: "ns".into(),
            name: name.into(),
            version,
            code,
            config: FunctionConfig {
                handler: Some("f:f".into()),
                memory_mb: Some(64),
                cpus: Some(0.5),
                network: Some("egress".into()),
                ..Default::default()
            },
            packages: vec![Entry {
                kind: Kind::Python,
                key: format!("six-1.16.0-cp311-{}", "a".repeat(32)),
                name: "six".into(),
                version: "1.16.0".into(),
                sha256: "a".repeat(64),
                modules: vec!["six".into()],
                bytes: 1234,
            }],
        }
    }

    #[test]
    fn what_is_put_is_loaded_after_reopening() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(t.path()).unwrap();
        assert_eq!(store.take_version().unwrap(), 1);
        assert_eq!(store.take_version().unwrap(), 2);
        let a = row("a", 1, Code::Path("/srv/fns/a".into()));
        let b = row("b", 2, Code::Upload("b-2".into()));
        assert_eq!(store.put_function(&a).unwrap(), None);
        assert_eq!(store.put_function(&b).unwrap(), None);
        let w = WorkflowRow {
            namespace: "ns".into(),
            name: "w".into(),
            spec: r#"{"steps":[{"type":"task","function":"a"}]}"#.into(),
        };
        store.put_workflow(&w).unwrap();
        drop(store);

        let store = Store::open(t.path()).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.functions, vec![a.clone(), b.clone()]);
        assert_eq!(loaded.workflows, vec![w]);
        // The next version survives, and only grows.
        assert_eq!(store.next_version().unwrap(), 3);
        assert_eq!(store.take_version().unwrap(), 3);

        // A replacement returns the code it replaced; a removal, the code removed.
        let b4 = row("b", 4, Code::Upload("b-4".into()));
        assert_eq!(
            store.put_function(&b4).unwrap(),
            Some(Code::Upload("b-2".into()))
        );
        assert_eq!(
            store.remove_function("ns", "a").unwrap(),
            Some(Code::Path("/srv/fns/a".into()))
        );
        assert_eq!(store.remove_function("ns", "a").unwrap(), None);
        assert!(store.remove_workflow("ns", "w").unwrap());
        assert!(!store.remove_workflow("ns", "w").unwrap());
        drop(store);
        let store = Store::open(t.path()).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.functions, vec![b4]);
        assert!(loaded.workflows.is_empty());
        assert_eq!(store.take_version().unwrap(), 5);
    }

    #[test]
    fn a_row_of_a_higher_version_moves_the_next_version_past_it() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(t.path()).unwrap();
        store
            .put_function(&row("a", 41, Code::Path("/srv/a".into())))
            .unwrap();
        assert_eq!(store.take_version().unwrap(), 42);
    }

    #[test]
    fn it_is_a_synchronous_write_ahead_log() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(t.path()).unwrap();
        let conn = store.conn.lock();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!((mode.as_str(), sync), ("wal", 2));
    }

    #[test]
    fn another_schema_version_is_refused_naming_both() {
        let t = tempfile::tempdir().unwrap();
        drop(Store::open(t.path()).unwrap());
        let conn = Connection::open(t.path().join(DB_FILE)).unwrap();
        conn.execute("UPDATE schema_version SET version = 7", [])
            .unwrap();
        drop(conn);
        let e = Store::open(t.path()).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("has schema version 7, this sprout reads version 1")
                && text.contains(DB_FILE),
            "{text}"
        );
        // Refused, not changed.
        let conn = Connection::open(t.path().join(DB_FILE)).unwrap();
        let v: i64 = conn
            .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, 7);
    }

    #[test]
    fn a_database_that_is_not_ours_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let conn = Connection::open(t.path().join(DB_FILE)).unwrap();
        conn.execute("CREATE TABLE photos (id INTEGER)", [])
            .unwrap();
        drop(conn);
        let e = Store::open(t.path()).unwrap_err().to_string();
        assert!(e.contains("is not sprout's") && e.contains("photos"), "{e}");
    }

    /// A crash between unpacking an upload and committing its row leaves a code
    /// directory no row names: start removes it and keeps every named one.
    #[test]
    fn code_no_row_names_is_removed_at_start() {
        let t = tempfile::tempdir().unwrap();
        let code = t.path().join("code");
        fs::create_dir_all(code.join("kept-3/sub")).unwrap();
        fs::write(code.join("kept-3/sub/f.py"), "x").unwrap();
        let store = Store::open(t.path()).unwrap();
        store
            .put_function(&row("kept", 3, Code::Upload("kept-3".into())))
            .unwrap();
        store
            .put_function(&row("host", 4, Code::Path(code.join("host-dir"))))
            .unwrap();
        // The crash: unpacked and synced, never committed; and a stray file.
        let v = store.take_version().unwrap();
        let orphan = code.join(format!("up-{v}"));
        fs::create_dir_all(orphan.join("deep")).unwrap();
        fs::write(orphan.join("deep/f.py"), "y").unwrap();
        sync_tree(&orphan).unwrap();
        fs::write(code.join("stray"), "z").unwrap();
        drop(store);

        let store = Store::open(t.path()).unwrap();
        let loaded = store.load().unwrap();
        let removed = remove_unreferenced(&code, loaded.code()).unwrap();
        assert_eq!(removed, vec!["stray".to_owned(), format!("up-{v}")]);
        let mut left: Vec<_> = fs::read_dir(&code)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["kept-3"]);
        assert!(code.join("kept-3/sub/f.py").is_file());
        // The version the crashed registration took is not given again.
        assert!(store.take_version().unwrap() > v);
    }

    #[test]
    fn a_row_that_cannot_be_read_is_kept_apart_naming_it_and_its_code_kept() {
        let t = tempfile::tempdir().unwrap();
        let code = t.path().join("code");
        fs::create_dir_all(code.join("a-1")).unwrap();
        let store = Store::open(t.path()).unwrap();
        store
            .put_function(&row("a", 1, Code::Upload("a-1".into())))
            .unwrap();
        store
            .put_function(&row("b", 2, Code::Path("/srv/b".into())))
            .unwrap();
        store
            .conn
            .lock()
            .execute(
                "UPDATE functions SET config = '{\"handler\": 5}' WHERE name = 'a'",
                [],
            )
            .unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.functions.len(), 1);
        assert_eq!(loaded.functions[0].name, "b");
        let [(c, e)] = &loaded.unreadable[..] else {
            panic!("{:?}", loaded.unreadable)
        };
        assert_eq!(c, &Code::Upload("a-1".into()));
        let e = ipc::chain(e);
        assert!(e.contains("function ns/a's config cannot be read"), "{e}");
        assert!(remove_unreferenced(&code, loaded.code())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn code_dir_names_are_one_component() {
        assert!(is_code_dir_name("hello-7"));
        for bad in ["", ".", "..", "a/b", "../x", "a\0"] {
            assert!(!is_code_dir_name(bad), "{bad:?}");
        }
    }
}
