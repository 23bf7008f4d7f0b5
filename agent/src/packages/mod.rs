//! Functions' packages: `requirements.txt` (Python) and `package.json` (Node.js),
//! installed once per node into a cache ([`cache`]) shared by every function that
//! needs the same package, and mounted read-only into its sandboxes under `/deps`.
//!
//! No package code runs on the host or as root: resolving (pip prepares an sdist's
//! metadata by running it) and installing (an sdist's build, npm's scripts) happen
//! in **install sandboxes** ([`Installer`], made by `Sandboxes`): a sandbox like a
//! function's, with outbound network, its own unprivileged user, installer limits
//! and one writable directory. Each package is installed in a sandbox of its own
//! with only its own output directory, so a package's build cannot change another
//! package's files; a sandbox that resolved never installs.
//!
//! Concurrent registrations that need the same package install it once: the first
//! claims it ([`Flights`]), the others wait for its result.

pub mod cache;
mod error;
pub mod npm;
pub mod requirements;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use serde::Serialize;
use serde_json::{json, Value};

pub use cache::{Cache, Entry, Kind};
pub use error::Error;

/// What a function's directory says it needs installed (the runtime seam reads it:
/// `Seam::dependencies`).
#[derive(Debug, Clone, PartialEq)]
pub enum Dependencies {
    /// The requirement lines of its `requirements.txt`.
    Python(Vec<String>),
    /// Its `package.json` (without the modules sprout provides) and
    /// `package-lock.json`.
    Npm {
        manifest: serde_json::Value,
        lock: Option<serde_json::Value>,
    },
}

/// Limits of one install sandbox (`--install-memory-mb`, `--install-timeout`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InstallLimits {
    pub memory_mb: u64,
    pub timeout: Duration,
}

impl Default for InstallLimits {
    /// OpenLambda's installer limits: 250 MiB and 300 s.
    fn default() -> InstallLimits {
        InstallLimits {
            memory_mb: 250,
            timeout: Duration::from_secs(300),
        }
    }
}

/// PyPI's simple index: the default `--package-index`.
pub const DEFAULT_INDEX: &str = "https://pypi.org/simple/";

/// Where packages come from (`sprout serve --package-index`, `--npm-registry`): the
/// operator's choice for the whole node, never a function's. Requirement lines that
/// name another index are refused ([`requirements`]), and so are npm lock entries
/// resolved anywhere but this registry ([`npm::lock`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sources {
    index: String,
    npm_registry: String,
}

impl Default for Sources {
    /// PyPI and the npm registry.
    fn default() -> Sources {
        Sources {
            index: DEFAULT_INDEX.to_owned(),
            npm_registry: npm::DEFAULT_REGISTRY.to_owned(),
        }
    }
}

impl Sources {
    /// A PEP 503 simple index for pip and a registry for npm, each checked with
    /// [`source_url`].
    pub fn new(index: &str, npm_registry: &str) -> Result<Sources, Error> {
        Ok(Sources {
            index: source_url("--package-index", index)?,
            npm_registry: source_url("--npm-registry", npm_registry)?,
        })
    }

    /// pip's `--index-url`, ending in `/`.
    pub fn index(&self) -> &str {
        &self.index
    }

    /// npm's `registry`, ending in `/`: every locked package must be resolved under it.
    pub fn npm_registry(&self) -> &str {
        &self.npm_registry
    }
}

/// `url` as a package source (`what` names the flag in the error): `http://` or
/// `https://` and a host, without credentials, query, fragment, backslash, space or
/// control character; returned ending in `/`, so that it is a prefix of its own
/// files only (`https://r.example/` is not a prefix of `https://r.example.evil/`).
pub fn source_url(what: &'static str, url: &str) -> Result<String, Error> {
    let bad = |problem: &str| Error::Source {
        what,
        url: url.chars().take(200).collect(),
        problem: problem.to_owned(),
    };
    if url.len() > 1024 {
        return Err(bad("longer than 1024 bytes"));
    }
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| bad("not an http:// or https:// URL"))?;
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) || url.contains(['\\', '?', '#']) {
        return Err(bad(
            "has a space, control character, backslash, query or fragment",
        ));
    }
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() {
        return Err(bad("names no host"));
    }
    if host.contains('@') {
        return Err(bad(
            "carries credentials (they would show in every error and log)",
        ));
    }
    let mut url = url.to_owned();
    if !url.ends_with('/') {
        url.push('/');
    }
    Ok(url)
}

/// Starts install sandboxes: the seam between this module and `Sandboxes` (a fake in
/// unit tests).
pub trait Installer: Send + Sync + std::fmt::Debug {
    /// An install sandbox whose installer writes into `out` (an empty directory of
    /// the cache's work area; the sandbox's user is made its owner) under `limits`.
    fn start(&self, out: &Path, limits: &InstallLimits) -> Result<Box<dyn Session>, Error>;
}

/// One install sandbox: requests and answers, one JSON object each
/// (`docs/protocol.md`, "Install sandboxes"). Dropping it destroys the sandbox.
pub trait Session {
    fn exchange(&mut self, request: &Value) -> Result<Value, Error>;
}

/// One installed package a function uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Package {
    #[serde(flatten)]
    pub entry: Entry,
    /// Its host directory.
    #[serde(skip)]
    pub dir: PathBuf,
}

impl Package {
    /// Where it is attached in a sandbox (`/deps/<key>`).
    pub fn mount_point(&self) -> String {
        ipc::sandbox_paths::deps_dir(&self.entry.key)
    }

    /// What goes on the function's import path: the directory itself (Python), its
    /// `node_modules` (npm).
    pub fn import_path(&self) -> String {
        match self.entry.kind {
            Kind::Python => self.mount_point(),
            Kind::Npm => format!("{}/node_modules", self.mount_point()),
        }
    }

    /// `name==version` (Python), `name@version` (npm).
    pub fn pin(&self) -> String {
        match self.entry.kind {
            Kind::Python => format!("{}=={}", self.entry.name, self.entry.version),
            Kind::Npm => format!("{}@{}", self.entry.name, self.entry.version),
        }
    }
}

/// A function's packages, resolved when it was registered (and fixed until it is
/// registered again), in import order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deps {
    pub packages: Vec<Package>,
}

impl Deps {
    pub fn is_empty(&self) -> bool {
        self.packages.is_empty()
    }

    /// The import paths a `load` carries.
    pub fn import_paths(&self) -> Vec<String> {
        self.packages.iter().map(Package::import_path).collect()
    }

    /// The cache keys it uses.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.packages.iter().map(|p| p.entry.key.as_str())
    }

    /// `name==version` of each Python package (and `name@version` of npm's).
    pub fn pins(&self) -> Vec<String> {
        self.packages.iter().map(Package::pin).collect()
    }
}

/// Installs in progress, by cache key: the first registration that needs a key
/// claims it, the others wait for its outcome.
#[derive(Debug, Default)]
struct Flights {
    running: Mutex<HashMap<String, Arc<Flight>>>,
}

#[derive(Debug, Default)]
struct Flight {
    outcome: Mutex<Option<Result<(), String>>>,
    done: Condvar,
}

impl Flight {
    fn wait(&self) -> Result<(), String> {
        let mut outcome = self.outcome.lock();
        while outcome.is_none() {
            self.done.wait(&mut outcome);
        }
        outcome.clone().expect("set")
    }
}

impl Flights {
    /// `Ok(claim)`: ours to install (finish it with [`Claim::finish`]); `Err(flight)`:
    /// someone else's, to wait for.
    fn claim(&self, key: &str) -> Result<Claim<'_>, Arc<Flight>> {
        let mut running = self.running.lock();
        if let Some(f) = running.get(key) {
            return Err(f.clone());
        }
        let flight = Arc::new(Flight::default());
        running.insert(key.to_owned(), flight.clone());
        Ok(Claim {
            flights: self,
            key: key.to_owned(),
            flight,
            finished: false,
        })
    }
}

/// A claimed install; dropped unfinished, it fails its waiters.
struct Claim<'a> {
    flights: &'a Flights,
    key: String,
    flight: Arc<Flight>,
    finished: bool,
}

impl Claim<'_> {
    fn finish(mut self, outcome: Result<(), String>) {
        self.finished = true;
        self.flights.running.lock().remove(&self.key);
        *self.flight.outcome.lock() = Some(outcome);
        self.flight.done.notify_all();
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.flights.running.lock().remove(&self.key);
            *self.flight.outcome.lock() = Some(Err("the install was abandoned".into()));
            self.flight.done.notify_all();
        }
    }
}

/// The node's packages: the cache, the installer, and counters.
#[derive(Debug)]
pub struct Packages {
    cache: Cache,
    installer: Box<dyn Installer>,
    limits: InstallLimits,
    sources: Sources,
    flights: Flights,
    turns: Turns,
    /// Held shared by each registration from its first look at the cache until the
    /// function is registered, and exclusively by [`Packages::remove_unused`]: a
    /// package a registration found cached is not removed before the function
    /// that uses it is registered.
    collecting: parking_lot::RwLock<()>,
    /// Whether the cache's directories were made and checked (on first use; a
    /// refusal is given again to every later use, never skipped).
    made: Mutex<bool>,
    /// Prefix of this agent's work directories.
    tag: String,
    next_work: AtomicU64,
    installed: AtomicU64,
    hits: AtomicU64,
}

/// At most this many install sandboxes run at once on a node: each holds up to
/// `--install-memory-mb` and a created sandbox's uid, and many registrations at once
/// must not take the node's memory or uids.
pub const MAX_INSTALL_SANDBOXES: usize = 2;

/// A registration's resolving and installing together may take at most this many
/// install timeouts (no new install starts after that).
const REGISTRATION_TIMEOUTS: u32 = 4;

/// The node's install-sandbox turns.
#[derive(Debug, Default)]
struct Turns {
    taken: Mutex<usize>,
    freed: Condvar,
}

/// One turn, given back when dropped.
struct Turn<'a>(&'a Turns);

impl Turns {
    fn take(&self, within: Duration) -> Result<Turn<'_>, Error> {
        let deadline = std::time::Instant::now() + within;
        let mut taken = self.taken.lock();
        while *taken >= MAX_INSTALL_SANDBOXES {
            if self.freed.wait_until(&mut taken, deadline).timed_out() {
                return Err(Error::Busy(within));
            }
        }
        *taken += 1;
        Ok(Turn(self))
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        *self.0.taken.lock() -= 1;
        self.0.freed.notify_one();
    }
}

/// A work directory, removed when dropped.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Packages {
    /// The cache at `root`, installing through `installer` from `sources`. Nothing is
    /// touched on disk until the first install (the cache is made then, and what a
    /// crashed install left removed).
    pub fn open(
        root: &Path,
        installer: Box<dyn Installer>,
        limits: InstallLimits,
        sources: Sources,
        tag: &str,
    ) -> Packages {
        Packages {
            cache: Cache::open(root),
            made: Mutex::new(false),
            installer,
            limits,
            sources,
            flights: Flights::default(),
            turns: Turns::default(),
            collecting: parking_lot::RwLock::new(()),
            tag: tag.to_owned(),
            next_work: AtomicU64::new(1),
            installed: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        }
    }

    pub fn root(&self) -> &Path {
        self.cache.root()
    }

    /// Where its packages come from.
    pub fn sources(&self) -> &Sources {
        &self.sources
    }

    /// Packages installed by this agent so far.
    pub fn installed(&self) -> u64 {
        self.installed.load(Ordering::Relaxed)
    }

    /// Packages a registration needed and found in the cache.
    pub fn cache_hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// An install sandbox writing into `out`, once one of the node's
    /// [`MAX_INSTALL_SANDBOXES`] turns is free (waiting at most the install timeout):
    /// the turn is held as long as the session.
    fn start(&self, out: &Path) -> Result<(Turn<'_>, Box<dyn Session>), Error> {
        let turn = self.turns.take(self.limits.timeout)?;
        let session = self.installer.start(out, &self.limits)?;
        Ok((turn, session))
    }

    fn work_dir(&self) -> Result<WorkDir, Error> {
        {
            let mut made = self.made.lock();
            if !*made {
                self.cache.make()?;
                // Work directories of live agents sharing the cache are theirs: only
                // those of agents whose tag (pid) is gone are removed.
                self.cache.clear_work_of_dead(&self.tag);
                *made = true;
            }
        }
        let n = self.next_work.fetch_add(1, Ordering::Relaxed);
        Ok(WorkDir(self.cache.work_dir(&format!("{}-{n}", self.tag))?))
    }

    /// A function's Python packages: `requirements` (the lines of its
    /// `requirements.txt`, see [`requirements::parse`]) resolved to exact versions
    /// and archives, each installed if the cache lacks it.
    pub fn python(&self, function: &str, requirements: &[String]) -> Result<Deps, Error> {
        if requirements.is_empty() {
            return Ok(Deps::default());
        }
        let span = tracing::info_span!("packages", function, kind = "python");
        let _g = span.enter();
        let deadline = std::time::Instant::now() + self.limits.timeout * REGISTRATION_TIMEOUTS;
        let resolved = {
            let work = self.work_dir()?;
            let (_turn, mut session) = self.start(&work.0)?;
            let answer = session
                .exchange(&json!({
                    "op": "resolve",
                    "requirements": requirements,
                    "index": self.sources.index(),
                }))
                .map_err(|e| match e {
                    Error::Died(message) => Error::Resolve {
                        message: format!("the installer {message}"),
                    },
                    e => e,
                })?;
            parse_resolved(&answer)?
        };
        tracing::debug!(packages = resolved.pins.len(), abi = %resolved.abi, "resolved");
        let keyed: Vec<(Pin, String)> = resolved
            .pins
            .into_iter()
            .map(|pin| {
                let key = pin.key(&resolved.abi);
                (pin, key)
            })
            .collect();
        self.ensure_python(&keyed, deadline)?;
        self.attach(Kind::Python, keyed.iter().map(|(_, key)| key.as_str()))
    }

    /// A function's packages as it was registered with them (`entries`, in import
    /// order: what [`Deps`] held), at a restart: not resolved again; each is attached
    /// from the cache, and a Python package missing from it is installed again from
    /// its pin (name, version, archive hash). A missing npm tree is an error: its
    /// manifest is the function's, for the caller to install again.
    pub fn reattach(&self, function: &str, entries: &[Entry]) -> Result<Deps, Error> {
        if entries.is_empty() {
            return Ok(Deps::default());
        }
        let span = tracing::info_span!("packages", function, kind = "reattach");
        let _g = span.enter();
        let deadline = std::time::Instant::now() + self.limits.timeout * REGISTRATION_TIMEOUTS;
        let mut python = Vec::new();
        for e in entries {
            if !is_key(&e.key) {
                return Err(Error::Cache {
                    path: self.cache.path(e.kind, "?"),
                    source: std::io::Error::other(format!("{:?} is not a cache key", e.key)),
                });
            }
            match e.kind {
                Kind::Python => python.push((
                    Pin {
                        name: e.name.clone(),
                        version: e.version.clone(),
                        sha256: e.sha256.clone(),
                    },
                    e.key.clone(),
                )),
                Kind::Npm if self.cache.get(Kind::Npm, &e.key)?.is_none() => {
                    return Err(Error::Cache {
                        path: self.cache.path(Kind::Npm, &e.key),
                        source: std::io::Error::other("not in the cache"),
                    })
                }
                Kind::Npm => {}
            }
        }
        self.ensure_python(&python, deadline)?;
        let mut deps = Deps::default();
        for e in entries {
            deps.packages.extend(
                self.attach(e.kind, std::iter::once(e.key.as_str()))?
                    .packages,
            );
        }
        Ok(deps)
    }

    /// Installs each `(pin, key)` the cache lacks (one install per key on the node at
    /// a time: a key another registration is installing is waited for).
    fn ensure_python(
        &self,
        keyed: &[(Pin, String)],
        deadline: std::time::Instant,
    ) -> Result<(), Error> {
        let mut waits = Vec::new();
        for (pin, key) in keyed {
            if self.cache.get(Kind::Python, key)?.is_some() {
                self.hits.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            match self.flights.claim(key) {
                Ok(claim) => {
                    if std::time::Instant::now() > deadline {
                        return Err(Error::Timeout {
                            limit: self.limits.timeout * REGISTRATION_TIMEOUTS,
                            output: String::new(),
                        });
                    }
                    // It may have landed between the look and the claim.
                    if self.cache.get(Kind::Python, key)?.is_some() {
                        self.hits.fetch_add(1, Ordering::Relaxed);
                        claim.finish(Ok(()));
                        continue;
                    }
                    let outcome = self.install_python(pin, key);
                    claim.finish(outcome.as_ref().map(|_| ()).map_err(|e| e.to_string()));
                    outcome?;
                }
                Err(flight) => waits.push((pin, flight)),
            }
        }
        for (pin, flight) in waits {
            flight.wait().map_err(|message| Error::Install {
                package: pin.to_string(),
                message,
            })?;
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The cached packages `keys` of `kind`, in order.
    fn attach<'k>(&self, kind: Kind, keys: impl Iterator<Item = &'k str>) -> Result<Deps, Error> {
        let mut packages = Vec::new();
        for key in keys {
            let entry = self.cache.get(kind, key)?.ok_or_else(|| Error::Cache {
                path: self.cache.path(kind, key),
                source: std::io::Error::other("installed, then gone (removed by `pkg gc`?)"),
            })?;
            packages.push(Package {
                dir: self.cache.path(kind, key),
                entry,
            });
        }
        Ok(Deps { packages })
    }

    /// Installs `pin` as cache entry `key`, in a sandbox of its own.
    fn install_python(&self, pin: &Pin, key: &str) -> Result<(), Error> {
        let work = self.work_dir()?;
        let started = std::time::Instant::now();
        {
            let (_turn, mut session) = self.start(&work.0)?;
            let answer = session
                .exchange(&json!({
                    "op": "install",
                    "name": pin.name,
                    "version": pin.version,
                    "sha256": pin.sha256,
                    "index": self.sources.index(),
                    "dir": "files",
                }))
                .map_err(|e| match e {
                    Error::Died(message) => Error::Install {
                        package: pin.to_string(),
                        message: format!("the installer {message}"),
                    },
                    e => e,
                })?;
            expect_op(&answer, "installed", || pin.to_string())?;
        }
        // The sandbox is gone: nothing can change the files any more.
        let entry = Entry {
            kind: Kind::Python,
            key: key.to_owned(),
            name: pin.name.clone(),
            version: pin.version.clone(),
            sha256: pin.sha256.clone(),
            modules: Vec::new(),
            bytes: 0,
        };
        let files = work.0.join("files");
        // A link there is the cache's to refuse (`Cache::commit`).
        if std::fs::symlink_metadata(&files).is_err() {
            return Err(Error::Install {
                package: pin.to_string(),
                message: "the installer made no directory".into(),
            });
        }
        let entry = self
            .cache
            .commit(&files, entry)
            .map_err(|e| named(e, &pin.to_string(), &files))?;
        self.installed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(package = %pin, key, bytes = entry.bytes, modules = ?entry.modules, ms = started.elapsed().as_millis() as u64, "package installed");
        Ok(())
    }

    /// A function's npm packages: `manifest` (its `package.json`, without the modules
    /// sprout provides) and `lock` (its `package-lock.json`), installed as one tree
    /// keyed by the lock (or the manifest) if the cache lacks it.
    pub fn npm(
        &self,
        function: &str,
        manifest: &Value,
        lock: Option<&Value>,
    ) -> Result<Deps, Error> {
        let span = tracing::info_span!("packages", function, kind = "npm");
        let _g = span.enter();
        let (key, hash) = npm_key(manifest, lock);
        let name = manifest["name"].as_str().unwrap_or("package").to_owned();
        let version = manifest["version"].as_str().unwrap_or("0.0.0").to_owned();
        let found = self.cache.get(Kind::Npm, &key)?;
        if found.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        } else {
            match self.flights.claim(&key) {
                Ok(claim) => {
                    let outcome = if self.cache.get(Kind::Npm, &key)?.is_some() {
                        Ok(())
                    } else {
                        self.install_npm(manifest, lock, &key, &name, &version, &hash)
                    };
                    claim.finish(outcome.as_ref().map(|_| ()).map_err(|e| e.to_string()));
                    outcome?;
                }
                Err(flight) => {
                    flight.wait().map_err(|message| Error::Install {
                        package: npm_named(manifest),
                        message,
                    })?;
                    self.hits.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let entry = self
            .cache
            .get(Kind::Npm, &key)?
            .ok_or_else(|| Error::Cache {
                path: self.cache.path(Kind::Npm, &key),
                source: std::io::Error::other("installed, then gone (removed by `pkg gc`?)"),
            })?;
        Ok(Deps {
            packages: vec![Package {
                dir: self.cache.path(Kind::Npm, &key),
                entry,
            }],
        })
    }

    fn install_npm(
        &self,
        manifest: &Value,
        lock: Option<&Value>,
        key: &str,
        name: &str,
        version: &str,
        hash: &str,
    ) -> Result<(), Error> {
        let work = self.work_dir()?;
        let started = std::time::Instant::now();
        {
            let (_turn, mut session) = self.start(&work.0)?;
            let answer = session
                .exchange(&json!({
                    "op": "npm",
                    "manifest": manifest,
                    "lock": lock,
                    "registry": self.sources.npm_registry(),
                    "dir": "files",
                }))
                .map_err(|e| match e {
                    Error::Died(message) => Error::Install {
                        package: npm_named(manifest),
                        message: format!("the installer {message}"),
                    },
                    e => e,
                })?;
            expect_op(&answer, "installed", || npm_named(manifest))?;
        }
        let files = work.0.join("files");
        if !std::fs::symlink_metadata(files.join("node_modules")).is_ok_and(|m| m.is_dir()) {
            return Err(Error::Install {
                package: npm_named(manifest),
                message: "the installer made no node_modules directory".into(),
            });
        }
        let entry = Entry {
            kind: Kind::Npm,
            key: key.to_owned(),
            name: name.to_owned(),
            version: version.to_owned(),
            sha256: hash.to_owned(),
            modules: Vec::new(),
            bytes: 0,
        };
        let entry = self
            .cache
            .commit(&files, entry)
            .map_err(|e| named(e, &npm_named(manifest), &files))?;
        self.installed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            key,
            bytes = entry.bytes,
            ms = started.elapsed().as_millis() as u64,
            "npm packages installed"
        );
        Ok(())
    }

    /// Every cached package, with the functions (of `users`: each function's
    /// `namespace/name` and its keys) that use it.
    pub fn list(
        &self,
        users: &[(String, Vec<String>)],
    ) -> Result<Vec<ipc::api::PackageInfo>, Error> {
        Ok(self
            .cache
            .list()?
            .into_iter()
            .map(|entry| {
                let of = users
                    .iter()
                    .filter(|(_, keys)| keys.contains(&entry.key))
                    .map(|(f, _)| f.clone())
                    .collect();
                entry.info(of)
            })
            .collect())
    }

    /// Held by a registration until its function is registered (see `collecting`).
    pub fn hold(&self) -> parking_lot::RwLockReadGuard<'_, ()> {
        self.collecting.read()
    }

    /// Removes every cached package no key `in_use` gives names (and no install in
    /// progress holds), once no registration is under way (`in_use` is asked then);
    /// returns what it removed.
    pub fn remove_unused(
        &self,
        in_use: impl FnOnce() -> std::collections::HashSet<String>,
    ) -> Result<Vec<ipc::api::PackageInfo>, Error> {
        let _alone = self.collecting.write();
        let in_use = in_use();
        let mut removed = Vec::new();
        for entry in self.cache.list()? {
            if in_use.contains(&entry.key) {
                continue;
            }
            // Held while removing: a registration installing it meanwhile waits.
            let Ok(claim) = self.flights.claim(&entry.key) else {
                continue;
            };
            let outcome = self.cache.remove(entry.kind, &entry.key);
            claim.finish(Ok(()));
            outcome?;
            removed.push(entry.info(Vec::new()));
        }
        Ok(removed)
    }
}

/// A resolved requirement: exactly one archive of the index.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pin {
    name: String,
    version: String,
    sha256: String,
}

impl std::fmt::Display for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}=={}", self.name, self.version)
    }
}

impl Pin {
    /// Its cache key: normalised name, version, interpreter tag, archive hash.
    fn key(&self, abi: &str) -> String {
        let name: String = self
            .name
            .chars()
            .map(|c| match c {
                '-' | '.' => '_',
                c => c.to_ascii_lowercase(),
            })
            .collect();
        let version = self.version.replace(['+', '!'], "_");
        format!("{name}-{version}-{abi}-{}", &self.sha256[..32])
    }
}

#[derive(Debug)]
struct Resolved {
    abi: String,
    pins: Vec<Pin>,
}

/// Most packages one function's requirements may resolve to.
const MAX_PINS: usize = 256;

fn expect_op(answer: &Value, op: &str, package: impl FnOnce() -> String) -> Result<(), Error> {
    match answer["op"].as_str() {
        Some(o) if o == op => Ok(()),
        Some("failed") => Err(Error::Install {
            package: package(),
            message: failure_message(answer),
        }),
        other => Err(Error::Installer {
            what: "an unknown op",
            problem: format!("{other:?}, expected {op:?}"),
        }),
    }
}

/// A refusal of what an installer wrote, as an install failure of `package` naming
/// the file by its path in the package (the work directory says nothing).
fn named(e: Error, package: &str, files: &Path) -> Error {
    match e {
        Error::Installed { path, problem } => {
            let within = path
                .strip_prefix(files)
                .unwrap_or(&path)
                .display()
                .to_string();
            let place = if within.is_empty() {
                "its output".to_owned()
            } else {
                format!("{within:?}")
            };
            Error::Install {
                package: package.to_owned(),
                message: format!("{place}: {problem}"),
            }
        }
        e => e,
    }
}

/// The installer's message (pip's or npm's own text), bounded.
fn failure_message(answer: &Value) -> String {
    let text = answer["message"].as_str().unwrap_or("(no message)");
    let mut end = text.len().min(4096);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].trim().to_owned()
}

/// A manifest's dependencies as install errors name them: `name@spec, ...`, bounded.
fn npm_named(manifest: &Value) -> String {
    let Some(deps) = manifest["dependencies"].as_object() else {
        return "the npm dependencies".into();
    };
    let mut named: Vec<String> = deps
        .iter()
        .take(8)
        .map(|(name, spec)| format!("{name}@{}", spec.as_str().unwrap_or("?")))
        .collect();
    if deps.len() > named.len() {
        named.push(format!("and {} more", deps.len() - named.len()));
    }
    format!("npm dependencies {}", named.join(", "))
}

/// Checks what the resolving sandbox said (it ran package code: nothing in it is
/// trusted beyond its shape).
fn parse_resolved(answer: &Value) -> Result<Resolved, Error> {
    match answer["op"].as_str() {
        Some("resolved") => {}
        Some("failed") => {
            return Err(Error::Resolve {
                message: failure_message(answer),
            })
        }
        other => {
            return Err(Error::Installer {
                what: "an unknown op",
                problem: format!("{other:?}, expected \"resolved\""),
            })
        }
    }
    let bad = |problem: String| Error::Installer {
        what: "a resolution",
        problem,
    };
    let abi = answer["abi"].as_str().unwrap_or_default();
    if abi.is_empty()
        || abi.len() > 48
        || !abi
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
    {
        return Err(bad(format!("abi {abi:?} is not an interpreter tag")));
    }
    let list = answer["packages"]
        .as_array()
        .ok_or_else(|| bad("no package list".into()))?;
    if list.len() > MAX_PINS {
        return Err(bad(format!("more than {MAX_PINS} packages")));
    }
    let mut pins = Vec::with_capacity(list.len());
    for p in list {
        let field = |f: &str| p[f].as_str().unwrap_or_default().to_owned();
        let (name, version, sha256) = (field("name"), field("version"), field("sha256"));
        let name_ok = !name.is_empty()
            && name.len() <= 100
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        let version_ok = !version.is_empty()
            && version.len() <= 64
            && version.starts_with(|c: char| c.is_ascii_alphanumeric())
            && version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '!' | '-' | '_'));
        let hash_ok = sha256.len() == 64 && sha256.chars().all(|c| c.is_ascii_hexdigit());
        if !(name_ok && version_ok && hash_ok) {
            return Err(bad(format!(
                "{name:?} {version:?} {sha256:?} is not a package name, version and SHA-256"
            )));
        }
        pins.push(Pin {
            name,
            version,
            sha256: sha256.to_ascii_lowercase(),
        });
    }
    Ok(Resolved {
        abi: abi.to_owned(),
        pins,
    })
}

/// The cache key of the npm tree of `manifest` and `lock`, and the hash it is made
/// of.
pub fn npm_key(manifest: &Value, lock: Option<&Value>) -> (String, String) {
    let keyed =
        serde_json::to_vec(&json!({"manifest": manifest, "lock": lock})).expect("JSON serialises");
    let hash = sha256_hex(&keyed);
    (format!("npm-{}", &hash[..32]), hash)
}

/// Whether `key` may name a cache entry: one plain file name.
fn is_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 255
        && !key.starts_with('.')
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests;
