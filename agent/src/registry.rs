//! Registered functions and workflows ([`Registry`]), and the validation of a
//! function's name, code directory, handler and limits.
//!
//! A registration is checked against [`Rules`] (the agent's defaults and memory
//! budget, the machine's CPUs, sprout's own state root) before anything is attached
//! or started:
//!
//! - the directory is canonicalised (symlinks resolved) and must be a real directory
//!   that is not `/`, does not overlap a host system tree ([`SYSTEM_TREES`], or any
//!   top-level `/lib*`) or sprout's own (its state root and data directory, or any
//!   directory marked as an agent's state or data directory), and is not on a kernel
//!   file system such as `proc`,
//!   `sysfs` or `cgroup` ([`kernel_fs`]). The spawner attaches it without its
//!   submounts, so what is mounted below it stays on the host. A directory the agent
//!   unpacked itself (an upload, under its data directory) skips the location rules;
//! - the handler's module file must resolve (symlinks followed) to a file inside the
//!   directory;
//! - every limit must be within [`LIMITS`]' range, with `memory_mb` at most the memory
//!   budget and `cpus` at most the machine's CPUs.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ipc::api::{FunctionConfig, FunctionInfo, WorkflowInfo};
use ipc::proto::Handler;
use parking_lot::Mutex;

use crate::config::{Config, Defaults};
use crate::error::Error;
use crate::names::{validate_name, validate_namespace, FunctionKey};
use crate::packages::Packages;
use crate::registrations::{Code, FunctionRow, Store, Stored, WorkflowRow};
use crate::request::FunctionSource;
use crate::runtime::{Runtime, Seam};
use crate::workflow::spec::Workflow;

/// Host trees a function directory may be neither in, equal to nor above (besides
/// every top-level `/lib*`). `/run` holds sprout's default state root.
pub const SYSTEM_TREES: &[&str] = &[
    "/proc",
    "/sys",
    "/dev",
    "/etc",
    "/usr",
    "/boot",
    "/run",
    "/bin",
    "/sbin",
    "/var/lib/sprout",
];

/// The accepted range of each integer limit; `memory_mb` is also bounded by the
/// agent's memory budget and `cpus` has its own rule ([`MIN_CPUS`], the machine's
/// CPUs).
pub struct LimitRanges {
    /// The hello example uses 9 MiB after an invocation (zygote and instance).
    pub memory_mb: (u64, u64),
    pub timeout_ms: (u64, u64),
    /// A sandbox runs 3 tasks (shim, zygote, instance); room for in-sandbox callees.
    pub pids: (u64, u64),
    pub max_instances: (u64, u64),
}

pub const LIMITS: LimitRanges = LimitRanges {
    memory_mb: (16, 1 << 20),
    timeout_ms: (1, 3_600_000),
    pids: (8, 4096),
    max_instances: (1, 1024),
};

/// The smallest CPU limit: a CFS quota of 1 ms (the kernel's minimum) per 100 ms period.
pub const MIN_CPUS: f64 = 0.01;

/// What a registration is checked against.
#[derive(Debug, Clone)]
pub struct Rules {
    pub defaults: Defaults,
    /// `memory_mb` at most: the agent's memory budget.
    pub memory_budget_mb: u64,
    /// `cpus` at most: the machine's online CPUs.
    pub machine_cpus: u64,
    /// The agent's state root: no function directory may be in, at or above it.
    pub state_root: PathBuf,
    /// The agent's data directory: no function directory may be in, at or above it.
    pub data_dir: Option<PathBuf>,
}

impl Rules {
    pub fn of(config: &Config) -> Rules {
        Rules {
            defaults: config.defaults,
            memory_budget_mb: config.pool.memory_budget_mb,
            machine_cpus: crate::config::machine_cpus(),
            state_root: config.state_root.clone(),
            data_dir: config.data_dir.clone(),
        }
    }
}

/// A registered function.
#[derive(Debug, Clone)]
pub struct Function {
    /// The tenant it belongs to: it calls, and shares code and scratch with, only
    /// functions of the same namespace.
    pub namespace: String,
    pub name: String,
    /// What runs it: how its handler is found, and which stem cells it starts in.
    pub runtime: Runtime,
    /// Whether its sandboxes get outbound network.
    pub network: pool::network::Network,
    /// Host directory holding its code.
    pub dir: PathBuf,
    pub handler: Handler,
    pub memory_mb: u64,
    pub timeout_ms: u64,
    pub pids: u64,
    pub cpus: f64,
    pub max_instances: usize,
    /// Bumped on every registration; warm instances of an older version are retired.
    pub version: u64,
    /// Whether `dir` was unpacked by the agent (and is removed with the function).
    pub owns_dir: bool,
    /// Its packages, resolved and installed when it was registered.
    pub deps: crate::packages::Deps,
    /// Exported to its processes (its `ol.yaml`'s `environment`, checked).
    pub env: BTreeMap<String, String>,
    /// The methods `/run/{name}` accepts (its `ol.yaml`'s `triggers.http`); `None`:
    /// every method.
    pub http_methods: Option<Vec<String>>,
    /// What its OpenWhisk action keeps beside it (kind, parameters, annotations),
    /// when it was put as one ([`crate::openwhisk::action`]); read from its directory.
    pub openwhisk: Option<Arc<crate::openwhisk::action::ActionMeta>>,
}

impl Function {
    /// Validates everything about a function before it is registered, against the
    /// agent's `config` ([`Rules::of`]).
    pub fn new(
        key: &FunctionKey,
        dir: &Path,
        config: &FunctionConfig,
        agent: &Config,
        version: u64,
        owns_dir: bool,
    ) -> Result<Function, Error> {
        let function = Function::checked(key, dir, config, &Rules::of(agent), version, owns_dir)?;
        // Sandboxes run as an unprivileged user, who must be able to read the code.
        function
            .runtime
            .check_readable(&function.dir, &function.handler)?;
        Ok(function)
    }

    /// [`Function::new`] with explicit rules.
    pub fn checked(
        key: &FunctionKey,
        dir: &Path,
        config: &FunctionConfig,
        rules: &Rules,
        version: u64,
        owns_dir: bool,
    ) -> Result<Function, Error> {
        validate_namespace(&key.namespace)?;
        validate_name(&key.name)?;
        let dir = check_dir(dir, rules, owns_dir)?;
        let ol = crate::runtime::ol_yaml::read(&dir)?;
        // Only an upload the agent unpacked can be an action (a host directory is
        // the host's, whatever files it holds).
        let openwhisk = match owns_dir {
            true => crate::openwhisk::action::read_meta(&dir)
                .map_err(|why| Error::InvalidConfig(format!("its OpenWhisk action: {why}")))?
                .map(Arc::new),
            false => None,
        };
        let mut env = ol.environment.clone();
        if let Some(meta) = &openwhisk {
            // `init: true` parameters are the function's environment, like `ol.yaml`'s.
            env.extend(meta.init_env());
        }
        // OL_ENTRY_FILE names a Python entry when the registration names no handler.
        let entry = crate::runtime::ol_yaml::entry_handler(&ol.environment).map_err(|why| {
            Error::InvalidConfig(format!(
                "{} in {}: {why}",
                crate::runtime::ol_yaml::OL_YAML,
                dir.display()
            ))
        })?;
        let entry_config;
        let config = match entry {
            Some(handler) if config.handler.is_none() => {
                entry_config = FunctionConfig {
                    handler: Some(handler),
                    ..config.clone()
                };
                &entry_config
            }
            _ => config,
        };
        let runtime = crate::runtime::of(config, &dir)?;
        let network = match config.network.as_deref() {
            None => pool::network::Network::None,
            Some(name) => pool::network::Network::parse(name).map_err(Error::InvalidConfig)?,
        };
        if network == pool::network::Network::Egress {
            pool::network::check_tools().map_err(Error::InvalidConfig)?;
        }
        let handler_text = config.handler.as_deref();
        let handler = runtime.parse_handler(handler_text, &dir)?;
        runtime.check_handler(&dir, &handler)?;
        let defaults = &rules.defaults;
        let memory_mb = config.memory_mb.unwrap_or(defaults.memory_mb);
        let (min, max) = LIMITS.memory_mb;
        let memory_mb = ranged(
            "memory_mb",
            memory_mb,
            min,
            max.min(rules.memory_budget_mb),
            Some("at most the agent's memory budget"),
        )?;
        let (min, max) = LIMITS.timeout_ms;
        let timeout_ms = ranged(
            "timeout_ms",
            config.timeout_ms.unwrap_or(defaults.timeout_ms),
            min,
            max,
            None,
        )?;
        let (min, max) = LIMITS.pids;
        let pids = ranged("pids", config.pids.unwrap_or(defaults.pids), min, max, None)?;
        let (min, max) = LIMITS.max_instances;
        let max_instances = config.max_instances.unwrap_or(defaults.max_instances);
        let max_instances = ranged(
            "max_instances",
            u64::try_from(max_instances).unwrap_or(u64::MAX),
            min,
            max,
            None,
        )? as usize;
        let cpus = config.cpus.unwrap_or(defaults.cpus);
        let max_cpus = rules.machine_cpus as f64;
        if !(MIN_CPUS..=max_cpus).contains(&cpus) {
            return Err(Error::LimitOutOfRange {
                field: "cpus",
                value: cpus.to_string(),
                min: MIN_CPUS.to_string(),
                max: max_cpus.to_string(),
                note: Some("a CPU quota of at least 1 ms per 100 ms, at most the machine's CPUs"),
            });
        }
        Ok(Function {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            runtime,
            network,
            dir,
            handler,
            memory_mb,
            timeout_ms,
            pids,
            cpus,
            max_instances,
            version,
            owns_dir,
            deps: crate::packages::Deps::default(),
            env,
            http_methods: ol.http_methods,
            openwhisk,
        })
    }

    /// Whether `/run/{name}` accepts `method` (its `ol.yaml`'s `triggers.http`).
    pub fn allows_method(&self, method: &str) -> bool {
        self.http_methods
            .as_ref()
            .is_none_or(|m| m.iter().any(|a| a == method))
    }

    /// Its namespace and name.
    pub fn key(&self) -> FunctionKey {
        FunctionKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// Its memory limit and timeout, as an activation record keeps them.
    pub fn activation_limits(&self) -> ipc::api::ActivationLimits {
        ipc::api::ActivationLimits {
            memory: self.memory_mb,
            timeout: self.timeout_ms,
        }
    }

    /// Whether `key` names it (without building a key).
    pub fn is(&self, key: &FunctionKey) -> bool {
        self.name == key.name && self.namespace == key.namespace
    }

    /// Whether an instance of `other` may run in this function's sandbox (a workflow's
    /// sequential step, a call): the same namespace (the tenant boundary), the same
    /// runtime, the same network, the same packages (its sandbox has exactly its
    /// own mounted) and the same limits.
    pub fn same_limits(&self, other: &Function) -> bool {
        self.namespace == other.namespace
            && self.runtime.runs_callee(other.runtime)
            && self.network == other.network
            && self.deps == other.deps
            && (self.memory_mb, self.pids, self.cpus) == (other.memory_mb, other.pids, other.cpus)
    }

    /// Whether its limits differ from `defaults` (a stem cell bound to it needs new ones).
    pub fn has_own_limits(&self, defaults: &Defaults) -> bool {
        (self.memory_mb, self.pids, self.cpus) != (defaults.memory_mb, defaults.pids, defaults.cpus)
    }

    pub fn limits(&self) -> rootfs::Limits {
        rootfs::Limits {
            memory_bytes: self.memory_mb << 20,
            pids: self.pids,
            cpus: self.cpus,
        }
    }

    pub fn info(&self, warm_instances: usize) -> FunctionInfo {
        FunctionInfo {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            runtime: self.runtime.name().to_owned(),
            network: self.network.name().to_owned(),
            path: self.dir.display().to_string(),
            handler: self.handler.to_string(),
            memory_mb: self.memory_mb,
            timeout_ms: self.timeout_ms,
            pids: self.pids,
            cpus: self.cpus,
            max_instances: self.max_instances,
            warm_instances,
            packages: self.deps.pins(),
        }
    }
}

fn ranged(
    field: &'static str,
    v: u64,
    min: u64,
    max: u64,
    note: Option<&'static str>,
) -> Result<u64, Error> {
    if (min..=max).contains(&v) {
        Ok(v)
    } else {
        Err(Error::LimitOutOfRange {
            field,
            value: v.to_string(),
            min: min.to_string(),
            max: max.to_string(),
            note,
        })
    }
}

/// The canonical function directory, or why it may not be one.
fn check_dir(dir: &Path, rules: &Rules, owns_dir: bool) -> Result<PathBuf, Error> {
    let canonical = dir.canonicalize().map_err(|source| Error::FunctionDir {
        path: dir.to_path_buf(),
        source,
    })?;
    if !canonical.is_dir() {
        return Err(Error::FunctionDir {
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        });
    }
    if owns_dir {
        return Ok(canonical);
    }
    let refused = |reason: String| Error::ForbiddenDir {
        path: dir.to_path_buf(),
        resolved: canonical.clone(),
        reason,
    };
    if let Some(reason) = forbidden_location(&canonical, &rules.state_root) {
        return Err(refused(reason));
    }
    if let Some(state) = canonical.ancestors().find(|a| is_state_dir(a)) {
        return Err(refused(format!(
            "it is in an agent's state directory, {}",
            state.display()
        )));
    }
    if let Some(data) = &rules.data_dir {
        let data = data.canonicalize().unwrap_or_else(|_| data.clone());
        if canonical.starts_with(&data) || data.starts_with(&canonical) {
            return Err(refused(format!(
                "it overlaps sprout's data directory {}",
                data.display()
            )));
        }
    }
    if let Some(data) = canonical.ancestors().find(|a| is_data_dir(a)) {
        return Err(refused(format!(
            "it is in an agent's data directory, {}",
            data.display()
        )));
    }
    if let Some(fs) = kernel_fs(&canonical) {
        return Err(refused(format!("it is on a {fs} file system")));
    }
    Ok(canonical)
}

/// Why the canonical path `dir` may not be a function directory by where it is: the
/// host's root, in, at or above a system tree, or sprout's state root.
pub fn forbidden_location(dir: &Path, state_root: &Path) -> Option<String> {
    if dir.parent().is_none() {
        return Some("it is the host's root directory".to_owned());
    }
    let overlaps = |tree: &Path| dir.starts_with(tree) || tree.starts_with(dir);
    if let Some(tree) = SYSTEM_TREES.iter().map(Path::new).find(|t| overlaps(t)) {
        return Some(format!(
            "it overlaps {}, a host system directory",
            tree.display()
        ));
    }
    if let Some(Component::Normal(top)) = dir.components().nth(1) {
        if top.to_string_lossy().starts_with("lib") {
            return Some(format!(
                "it overlaps /{}, a host system directory",
                top.to_string_lossy()
            ));
        }
    }
    let state_root = state_root
        .canonicalize()
        .unwrap_or_else(|_| state_root.to_path_buf());
    if overlaps(&state_root) {
        return Some(format!(
            "it overlaps sprout's state root {}",
            state_root.display()
        ));
    }
    None
}

/// Whether `dir` is an agent's state directory (`<root>/<agent-id>`: its `lock`, its
/// runtime files and root skeleton).
fn is_state_dir(dir: &Path) -> bool {
    dir.join("lock").is_file() && dir.join("runtime").is_dir() && dir.join("rootfs").is_dir()
}

/// Whether `dir` is a data directory (`crate::data_dir`: its format version, its
/// lock and uploaded code), this agent's or another's.
fn is_data_dir(dir: &Path) -> bool {
    use crate::data_dir::{CODE_DIR, FORMAT_FILE, LOCK_FILE};
    dir.join(FORMAT_FILE).is_file() && dir.join(LOCK_FILE).is_file() && dir.join(CODE_DIR).is_dir()
}

/// The kernel file systems no function directory may be on (the file system's magic
/// number as `statfs` reports it, and its name).
const KERNEL_FS: &[(nix::sys::statfs::FsType, &str)] = {
    use nix::sys::statfs as s;
    &[
        (s::PROC_SUPER_MAGIC, "proc"),
        (s::SYSFS_MAGIC, "sysfs"),
        (s::CGROUP_SUPER_MAGIC, "cgroup"),
        (s::CGROUP2_SUPER_MAGIC, "cgroup2"),
        (s::DEVPTS_SUPER_MAGIC, "devpts"),
        (s::DEBUGFS_MAGIC, "debugfs"),
        (s::TRACEFS_MAGIC, "tracefs"),
        (s::SECURITYFS_MAGIC, "securityfs"),
        (s::SELINUX_MAGIC, "selinuxfs"),
        (s::SMACK_MAGIC, "smackfs"),
        (s::BPF_FS_MAGIC, "bpf"),
        (s::NSFS_MAGIC, "nsfs"),
        (s::RDTGROUP_SUPER_MAGIC, "resctrl"),
        (s::USBDEVICE_SUPER_MAGIC, "usbdevfs"),
    ]
};

/// The name of the kernel file system `dir` is on, if it is one of [`KERNEL_FS`]
/// (a `proc` mounted anywhere, say).
pub fn kernel_fs(dir: &Path) -> Option<&'static str> {
    let fs = nix::sys::statfs::statfs(dir).ok()?.filesystem_type();
    KERNEL_FS.iter().find(|(m, _)| *m == fs).map(|(_, n)| *n)
}

/// A function name derived from a directory (for `sprout invoke ./dir`).
pub fn name_from_dir(dir: &Path) -> String {
    let base = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let cleaned: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if validate_name(&cleaned).is_ok() {
        cleaned
    } else {
        "function".to_owned()
    }
}

/// The registered functions and workflows, by namespace and name (the tenant
/// boundary: every lookup names both). Each map has its own lock, taken last in the
/// agent's lock order and never held while calling out.
///
/// With a [`Store`] (an agent with a data directory) every registration and removal
/// is committed to it before it is acknowledged, and [`Registry::restore`] serves
/// again at start what it holds; without one (the embedded one-shot) the registry
/// lives as long as the process.
#[derive(Debug)]
pub(crate) struct Registry {
    /// What registrations are checked against.
    config: Config,
    /// Where uploaded archives are unpacked (one directory per registration).
    uploads: PathBuf,
    /// Installs the packages functions need (when they are registered).
    packages: Arc<Packages>,
    /// Where registrations are kept across restarts (`None`: in memory only).
    store: Option<Store>,
    /// Held from a registration's or removal's commit to the store until the maps
    /// agree with it, so that the store and the maps change in the same order. Taken
    /// above `functions` and `workflows`; never by an invocation.
    writes: Mutex<()>,
    functions: Mutex<HashMap<FunctionKey, Arc<Function>>>,
    workflows: Mutex<HashMap<FunctionKey, Arc<Workflow>>>,
    /// Versions without a store (a store keeps its own, durably).
    next_version: AtomicU64,
}

impl Registry {
    pub fn new(
        config: Config,
        uploads: PathBuf,
        packages: Arc<Packages>,
        store: Option<Store>,
    ) -> Registry {
        Registry {
            config,
            uploads,
            packages,
            store,
            writes: Mutex::new(()),
            functions: Mutex::default(),
            workflows: Mutex::default(),
            next_version: AtomicU64::new(1),
        }
    }

    /// A version no registration of this registry (or, with a store, of any agent
    /// before it on the data directory) had.
    fn take_version(&self) -> Result<u64, Error> {
        match &self.store {
            Some(store) => Ok(store.take_version()?),
            None => Ok(self.next_version.fetch_add(1, Ordering::Relaxed)),
        }
    }

    /// Serves again what `stored` holds (loaded from the store at start), each
    /// function through the same checks as a registration, with the packages it was
    /// registered with (re-attached from the cache, a missing one installed from its
    /// pin; nothing is resolved again). One that no longer passes (its directory gone
    /// or changed, its packages not to be had) is not served: its row and code are
    /// kept, an error log names it and why, and registering it again or removing it
    /// clears it. Workflows are served as registered (their functions were checked
    /// when they were). Returns how many functions and workflows are served.
    pub fn restore(&self, stored: Stored) -> (usize, usize) {
        let _held = self.packages.hold();
        for (code, e) in &stored.unreadable {
            tracing::error!(code = ?code, error = %ipc::chain(e), "a stored registration cannot be read; it is not served (register the function again)");
        }
        let mut served = (0, 0);
        for row in stored.functions {
            let key = FunctionKey {
                namespace: row.namespace.clone(),
                name: row.name.clone(),
            };
            match self.remake(&key, &row) {
                Ok(f) => {
                    tracing::info!(function = %key, version = f.version, path = %f.dir.display(), "function restored");
                    self.functions.lock().insert(key, Arc::new(f));
                    served.0 += 1;
                }
                Err(e) => tracing::error!(
                    function = %key,
                    version = row.version,
                    error = %ipc::chain(&e),
                    "registered function not served after the restart: it no longer passes the registration's checks (register it again, or remove it)"
                ),
            }
        }
        for row in stored.workflows {
            let key = FunctionKey {
                namespace: row.namespace.clone(),
                name: row.name.clone(),
            };
            match Workflow::parse(row.spec.as_bytes()) {
                Ok(w) => {
                    self.workflows.lock().insert(key, Arc::new(w));
                    served.1 += 1;
                }
                Err(e) => tracing::error!(
                    workflow = %key,
                    error = %ipc::chain(&e),
                    "registered workflow not served after the restart"
                ),
            }
        }
        served
    }

    /// A stored function, checked again.
    fn remake(&self, key: &FunctionKey, row: &FunctionRow) -> Result<Function, Error> {
        let (dir, owns_dir) = match &row.code {
            Code::Path(p) => (p.clone(), false),
            Code::Upload(name) if crate::registrations::is_code_dir_name(name) => {
                (self.uploads.join(name), true)
            }
            Code::Upload(name) => {
                return Err(Error::InvalidConfig(format!(
                    "its stored code directory {name:?} is not a name in {}",
                    self.uploads.display()
                )))
            }
        };
        let mut f = Function::new(key, &dir, &row.config, &self.config, row.version, owns_dir)?;
        f.deps = self.reattach_deps(&f, &row.packages)?;
        Ok(f)
    }

    /// The packages `function` was registered with (`entries`), attached again.
    fn reattach_deps(
        &self,
        function: &Function,
        entries: &[crate::packages::Entry],
    ) -> Result<crate::packages::Deps, Error> {
        if entries.iter().any(|e| e.kind == crate::packages::Kind::Npm) {
            // An npm tree is keyed by the function's manifest and lock: the same key
            // or nothing, installed again from them if the cache lost it.
            let needs = function
                .runtime
                .dependencies(&function.dir, self.packages.sources())?;
            let changed = || {
                Error::InvalidConfig(format!(
                    "its package.json or package-lock.json in {} changed since it was registered",
                    function.dir.display()
                ))
            };
            let Some(crate::packages::Dependencies::Npm { manifest, lock }) = needs else {
                return Err(changed());
            };
            let (key, _) = crate::packages::npm_key(&manifest, lock.as_ref());
            if !matches!(entries, [e] if e.key == key) {
                return Err(changed());
            }
            return self
                .packages
                .npm(&function.key().to_string(), &manifest, lock.as_ref())
                .map_err(|source| Error::Packages {
                    function: function.key().to_string(),
                    source: Box::new(source),
                });
        }
        self.packages
            .reattach(&function.key().to_string(), entries)
            .map_err(|source| Error::Packages {
                function: function.key().to_string(),
                source: Box::new(source),
            })
    }

    /// Registers (or replaces) function `key`; returns it, and the function it
    /// replaced (whose warm instances the caller retires, and whose directory it
    /// removes with [`remove_owned_dir`]).
    pub fn register(
        &self,
        key: &FunctionKey,
        source: FunctionSource,
        config: &FunctionConfig,
    ) -> Result<(FunctionInfo, Option<Arc<Function>>), Error> {
        let name = key.name.as_str();
        let version = self.take_version()?;
        let (dir, owns_dir) = match source {
            FunctionSource::Dir(dir) => (dir, false),
            FunctionSource::Tar(bytes) => (self.unpack(name, version, &bytes)?, true),
        };
        // Until the function is in the registry, its packages are not collected.
        let _held = self.packages.hold();
        let function =
            Function::new(key, &dir, config, &self.config, version, owns_dir).and_then(|mut f| {
                f.deps = self.install_deps(&f)?;
                if owns_dir && self.store.is_some() {
                    // On disk before its row is: a restart trusts what a row names.
                    crate::registrations::sync_tree(&f.dir)?;
                }
                Ok(Arc::new(f))
            });
        // From the commit until the map agrees with the store.
        let _writes = self.writes.lock();
        let function = function.and_then(|f| self.commit(&f, config).map(|()| f));
        let function = match function {
            Ok(f) => f,
            Err(e) => {
                if owns_dir {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                return Err(e);
            }
        };
        let info = function.info(0);
        let old = self.functions.lock().insert(key.clone(), function);
        Ok((info, old))
    }

    /// Puts `function` (registered with `config`, its uploaded code already synced) in
    /// the store, if there is one: its row committed. The code of a row it
    /// replaces that was not being served (a function skipped at start) is removed
    /// here; a served one's is the caller's to remove.
    fn commit(&self, function: &Function, config: &FunctionConfig) -> Result<(), Error> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let code = if function.owns_dir {
            let name = function
                .dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            Code::Upload(name)
        } else {
            Code::Path(function.dir.clone())
        };
        let replaced = store.put_function(&FunctionRow {
            namespace: function.namespace.clone(),
            name: function.name.clone(),
            version: function.version,
            code,
            config: config.clone(),
            packages: function
                .deps
                .packages
                .iter()
                .map(|p| p.entry.clone())
                .collect(),
        })?;
        if let Some(Code::Upload(old)) = replaced {
            let served = self
                .functions
                .lock()
                .get(&function.key())
                .is_some_and(|f| f.owns_dir && f.dir.file_name() == Some(old.as_ref()));
            if !served && crate::registrations::is_code_dir_name(&old) {
                let _ = std::fs::remove_dir_all(self.uploads.join(&old));
            }
        }
        Ok(())
    }

    /// Resolves and installs what `function` declares it needs (through the runtime
    /// seam: `requirements.txt`, `package.json`); nothing is registered if it fails.
    fn install_deps(&self, function: &Function) -> Result<crate::packages::Deps, Error> {
        let wrap = |source| Error::Packages {
            function: function.key().to_string(),
            source: Box::new(source),
        };
        let needs = function
            .runtime
            .dependencies(&function.dir, self.packages.sources())
            .map_err(|e| match e {
                Error::Packages { source, .. } => wrap(*source),
                e => e,
            })?;
        let Some(needs) = needs else {
            return Ok(crate::packages::Deps::default());
        };
        let name = function.key().to_string();
        match needs {
            crate::packages::Dependencies::Python(lines) => {
                self.packages.python(&name, &lines).map_err(wrap)
            }
            crate::packages::Dependencies::Npm { manifest, lock } => self
                .packages
                .npm(&name, &manifest, lock.as_ref())
                .map_err(wrap),
        }
    }

    /// The node's package cache.
    pub fn packages(&self) -> &Packages {
        &self.packages
    }

    fn unpack(&self, name: &str, version: u64, tar_bytes: &[u8]) -> Result<PathBuf, Error> {
        let dir = self.uploads.join(format!("{name}-{version}"));
        let limits = crate::upload::Limits::default();
        match crate::upload::unpack(tar_bytes, &dir, &limits) {
            Ok(unpacked) => {
                tracing::debug!(
                    function = name,
                    entries = unpacked.entries,
                    bytes = unpacked.bytes,
                    "archive unpacked"
                );
                Ok(dir)
            }
            // Not the archive's fault: the agent could not make its own directory.
            Err(crate::upload::Error::Destination { path, source }) => {
                Err(Error::State { path, source })
            }
            Err(source) => Err(Error::Unpack { path: dir, source }),
        }
    }

    /// Unregisters function `key` (its row first, when there is a store) and returns
    /// it if it was served; the caller removes its code. One registered but not
    /// served (skipped at start) has its row and code removed here, and gives `None`.
    pub fn remove(&self, key: &FunctionKey) -> Result<Option<Arc<Function>>, Error> {
        let _writes = self.writes.lock();
        let row = match &self.store {
            Some(store) => store.remove_function(&key.namespace, &key.name)?,
            None => None,
        };
        match (self.functions.lock().remove(key), row) {
            (Some(f), _) => Ok(Some(f)),
            (None, Some(code)) => {
                if let Code::Upload(name) = code {
                    if crate::registrations::is_code_dir_name(&name) {
                        let _ = std::fs::remove_dir_all(self.uploads.join(name));
                    }
                }
                Ok(None)
            }
            (None, None) => Err(not_found(key)),
        }
    }

    /// The functions of `namespace`, in no order.
    pub fn in_namespace(&self, namespace: &str) -> Vec<Arc<Function>> {
        self.functions
            .lock()
            .values()
            .filter(|f| f.namespace == namespace)
            .cloned()
            .collect()
    }

    /// Every registered function, of every namespace.
    pub fn all_functions(&self) -> Vec<Arc<Function>> {
        self.functions.lock().values().cloned().collect()
    }

    pub fn get(&self, key: &FunctionKey) -> Result<Arc<Function>, Error> {
        self.lookup(key).ok_or_else(|| not_found(key))
    }

    pub fn lookup(&self, key: &FunctionKey) -> Option<Arc<Function>> {
        self.functions.lock().get(key).cloned()
    }

    /// The registered version of function `key`.
    pub fn version_of(&self, key: &FunctionKey) -> Option<u64> {
        self.functions.lock().get(key).map(|f| f.version)
    }

    /// Whether every `(name, version)` of `namespace` is the registered version
    /// (`None`: not a callee's directory, so not current).
    pub fn all_current<'a>(
        &self,
        namespace: &str,
        mut callees: impl Iterator<Item = Option<(&'a str, u64)>>,
    ) -> bool {
        let functions = self.functions.lock();
        callees.all(|callee| {
            let Some((name, version)) = callee else {
                return false;
            };
            functions
                .get(&FunctionKey {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                })
                .is_some_and(|f| version == f.version)
        })
    }

    /// Registered functions.
    pub fn len(&self) -> usize {
        self.functions.lock().len()
    }

    /// The namespace of each function, and of each workflow.
    pub fn namespaces(&self) -> (Vec<String>, Vec<String>) {
        let functions = self
            .functions
            .lock()
            .keys()
            .map(|k| k.namespace.clone())
            .collect();
        let workflows = self
            .workflows
            .lock()
            .keys()
            .map(|k| k.namespace.clone())
            .collect();
        (functions, workflows)
    }

    /// Removes the directories the registry unpacked (at shutdown), unless they are
    /// kept in a store for the next agent.
    pub fn remove_owned_dirs(&self) {
        if self.store.is_some() {
            return;
        }
        for f in self.functions.lock().values() {
            remove_owned_dir(f);
        }
    }

    /// Registers workflow `key`; its tasks' functions must exist in its namespace.
    pub fn register_workflow(
        &self,
        key: &FunctionKey,
        workflow: Workflow,
    ) -> Result<WorkflowInfo, Error> {
        workflow.check_functions(|f| {
            self.functions.lock().contains_key(&FunctionKey {
                namespace: key.namespace.clone(),
                name: f.to_owned(),
            })
        })?;
        let info = workflow.info(key);
        let _writes = self.writes.lock();
        if let Some(store) = &self.store {
            store.put_workflow(&WorkflowRow {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                spec: workflow.text.clone(),
            })?;
        }
        self.workflows
            .lock()
            .insert(key.clone(), Arc::new(workflow));
        tracing::info!(workflow = %key, tasks = info.tasks, "workflow registered");
        Ok(info)
    }

    /// The workflows of `namespace`, by name.
    pub fn list_workflows(&self, namespace: &str) -> Vec<WorkflowInfo> {
        let mut list: Vec<_> = self
            .workflows
            .lock()
            .iter()
            .filter(|(key, _)| key.namespace == namespace)
            .map(|(key, w)| w.info(key))
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    pub fn remove_workflow(&self, key: &FunctionKey) -> Result<(), Error> {
        let _writes = self.writes.lock();
        let stored = match &self.store {
            Some(store) => store.remove_workflow(&key.namespace, &key.name)?,
            None => false,
        };
        match self.workflows.lock().remove(key) {
            Some(_) => Ok(()),
            None if stored => Ok(()),
            None => Err(workflow_not_found(key)),
        }
    }

    pub fn workflow(&self, key: &FunctionKey) -> Result<Arc<Workflow>, Error> {
        self.workflows
            .lock()
            .get(key)
            .cloned()
            .ok_or_else(|| workflow_not_found(key))
    }
}

/// The one "no such function" error ([`Error::not_found_in`]).
pub fn not_found(key: &FunctionKey) -> Error {
    Error::not_found_in(&key.namespace, &key.name)
}

fn workflow_not_found(key: &FunctionKey) -> Error {
    Error::WorkflowNotFound {
        namespace: key.namespace.clone(),
        name: key.name.clone(),
    }
}

/// Removes a function's directory if the agent unpacked it.
pub fn remove_owned_dir(f: &Function) {
    if f.owns_dir {
        let _ = std::fs::remove_dir_all(&f.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::{DEFAULT_NAMESPACE, MAX_NAMESPACE_LEN, NAMESPACE_RULE};
    use std::fs;
    use std::os::unix::fs::symlink;

    fn dir_with(files: &[&str]) -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        for f in files {
            let p = t.path().join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, "def f(e): return e\n").unwrap();
        }
        t
    }

    /// Rules with a 1024 MiB budget, 2 CPUs and a state root that does not exist.
    fn rules() -> Rules {
        Rules {
            defaults: Defaults::default(),
            memory_budget_mb: 1024,
            machine_cpus: 2,
            state_root: PathBuf::from("/nonexistent/sprout-state"),
            data_dir: None,
        }
    }

    /// A key as given, unchecked (registration checks it).
    fn key(namespace: &str, name: &str) -> FunctionKey {
        FunctionKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    fn check(dir: &Path, cfg: &FunctionConfig, rules: &Rules) -> Result<Function, Error> {
        Function::checked(&key("default", "fn"), dir, cfg, rules, 1, false)
    }

    fn err(dir: &Path, cfg: &FunctionConfig) -> String {
        ipc::chain(&check(dir, cfg, &rules()).unwrap_err())
    }

    #[test]
    fn network_is_none_by_default_egress_on_request_and_nothing_else() {
        use pool::network::Network;
        let t = dir_with(&["f.py"]);
        let none = check(t.path(), &FunctionConfig::default(), &rules()).unwrap();
        assert_eq!(none.network, Network::None);
        assert_eq!(none.info(0).network, "none");
        let net = |name: &str| FunctionConfig {
            network: Some(name.into()),
            ..Default::default()
        };
        let e = err(t.path(), &net("host"));
        assert!(
            e.contains("unknown network \"host\" (none or egress)"),
            "{e}"
        );
        // Without `ip` and `nft` egress is refused (checked below); under CI they
        // are installed, and their absence fails rather than skips.
        let tools = pool::network::check_tools();
        if std::env::var("CI").as_deref() == Ok("true") {
            tools
                .as_ref()
                .expect("ip and nft, which .ci/setup installs");
        }
        if tools.is_ok() {
            let egress = check(t.path(), &net("egress"), &rules()).unwrap();
            assert_eq!(egress.network, Network::Egress);
            assert_eq!(egress.info(0).network, "egress", "listed as registered");
            // Never one sandbox for both: a callee would get (or lose) the network.
            assert!(!none.same_limits(&egress) && !egress.same_limits(&none));
        } else {
            let e = err(t.path(), &net("egress"));
            assert!(e.contains("nft") || e.contains("ip"), "{e}");
        }
    }

    #[test]
    fn defaults_fill_in_and_handler_file_is_checked() {
        let t = dir_with(&["f.py"]);
        let f = check(t.path(), &FunctionConfig::default(), &rules()).unwrap();
        assert_eq!(
            (f.memory_mb, f.timeout_ms, f.pids, f.cpus, f.max_instances),
            (128, 60_000, 64, 1.0, 4)
        );
        assert_eq!(f.handler.to_string(), "f:f");
        assert_eq!(f.dir, t.path().canonicalize().unwrap());

        let cfg = FunctionConfig {
            handler: Some("__main__:main".into()),
            ..Default::default()
        };
        let e = err(t.path(), &cfg);
        assert!(
            e.contains("__main__.py") && e.contains("does not exist"),
            "{e}"
        );

        let t = dir_with(&["pkg/__init__.py", "a/b/c.py"]);
        for handler in ["pkg:run", "a.b.c:f"] {
            let cfg = FunctionConfig {
                handler: Some(handler.into()),
                ..Default::default()
            };
            check(t.path(), &cfg, &rules()).unwrap();
        }
    }

    #[test]
    fn bad_input_is_named() {
        let t = dir_with(&["f.py"]);
        let e = ipc::chain(
            &Function::checked(
                &key("default", "../x"),
                t.path(),
                &Default::default(),
                &rules(),
                1,
                false,
            )
            .unwrap_err(),
        );
        assert!(e.contains("invalid function name"), "{e}");
        let e = err(Path::new("/nonexistent/sprout"), &FunctionConfig::default());
        assert!(e.contains("/nonexistent/sprout"), "{e}");
        let file = t.path().join("f.py");
        let e = err(&file, &FunctionConfig::default());
        assert!(e.contains("not a directory") && e.contains("f.py"), "{e}");
        let cfg = FunctionConfig {
            handler: Some("nocolon".into()),
            ..Default::default()
        };
        assert!(err(t.path(), &cfg).contains("module:function"));
    }

    #[test]
    fn the_root_and_system_trees_are_refused() {
        let cases = [
            ("/", "the host's root directory"),
            ("/etc", "overlaps /etc"),
            ("/proc", "overlaps /proc"),
            ("/proc/self", "overlaps /proc"),
            ("/sys/fs", "overlaps /sys"),
            ("/dev", "overlaps /dev"),
            ("/usr/lib", "overlaps /usr"),
            ("/run", "overlaps /run"),
            // An ancestor of a protected tree shows it too.
            ("/var", "overlaps /var/lib/sprout"),
        ];
        for (path, reason) in cases {
            let r = forbidden_location(&Path::new(path).canonicalize().unwrap(), Path::new("/x"));
            let r = r.unwrap_or_else(|| panic!("{path} is allowed"));
            assert!(r.contains(reason), "{path}: {r}");
            // And through registration, whatever the handler.
            let cfg = FunctionConfig {
                handler: Some("tmp.x.f:f".into()),
                ..Default::default()
            };
            let e = err(Path::new(path), &cfg);
            assert!(
                e.starts_with(&format!("function directory {path}")) && e.contains("not allowed"),
                "{path}: {e}"
            );
        }
        for lib in ["/lib", "/lib64", "/libx32/a", "/lib32"] {
            let r = forbidden_location(Path::new(lib), Path::new("/x")).unwrap();
            assert!(r.contains("overlaps /lib"), "{lib}: {r}");
        }
        for ok in [
            "/tmp/sprout-fn",
            "/srv/fns/a",
            "/var/www",
            "/opt/library",
            "/home/u/fn",
        ] {
            assert_eq!(
                forbidden_location(Path::new(ok), Path::new("/x")),
                None,
                "{ok}"
            );
        }
    }

    #[test]
    fn a_symlink_is_judged_by_what_it_resolves_to() {
        let t = tempfile::tempdir().unwrap();
        let link = t.path().join("root");
        symlink("/", &link).unwrap();
        fs::create_dir_all(t.path().join("tmp/x")).unwrap();
        let cfg = FunctionConfig {
            handler: Some("tmp.x.f:f".into()),
            ..Default::default()
        };
        let e = err(&link, &cfg);
        assert!(
            e.contains(&format!(
                "function directory {} (resolves to /)",
                link.display()
            )) && e.contains("the host's root directory"),
            "{e}"
        );
        let etc = t.path().join("etc");
        symlink("/etc", &etc).unwrap();
        let e = err(&etc, &FunctionConfig::default());
        assert!(
            e.contains("resolves to /etc") && e.contains("overlaps /etc"),
            "{e}"
        );
        // A link to a plain directory is fine, and registered as its target.
        let real = dir_with(&["f.py"]);
        let ok = t.path().join("ok");
        symlink(real.path(), &ok).unwrap();
        let f = check(&ok, &FunctionConfig::default(), &rules()).unwrap();
        assert_eq!(f.dir, real.path().canonicalize().unwrap());
    }

    /// Why registering `dir` (with default settings) is refused.
    fn refused(dir: &Path, rules: &Rules) -> String {
        ipc::chain(&check(dir, &FunctionConfig::default(), rules).unwrap_err())
    }

    #[test]
    fn sprouts_own_state_is_refused_but_its_uploads_are_not() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("state");
        let agent = root.join("4242");
        let unpacked = agent.join("functions/up-7");
        for d in ["runtime", "rootfs", "functions/up-7"] {
            fs::create_dir_all(agent.join(d)).unwrap();
        }
        fs::write(agent.join("lock"), "").unwrap();
        fs::write(unpacked.join("f.py"), "def f(e): return e\n").unwrap();
        let mut rules = rules();
        rules.state_root = root.clone();
        // The state root, what is in it, and what holds it.
        for (dir, reason) in [
            (&root, "overlaps sprout's state root"),
            (&unpacked, "overlaps sprout's state root"),
            (&agent.join("runtime"), "overlaps sprout's state root"),
            (&t.path().to_path_buf(), "overlaps sprout's state root"),
        ] {
            let e = refused(dir, &rules);
            assert!(
                e.contains("not allowed") && e.contains(reason),
                "{}: {e}",
                dir.display()
            );
        }
        // Another agent's state directory, under a state root this agent does not use.
        rules.state_root = PathBuf::from("/nonexistent/sprout-state");
        let e = refused(&unpacked, &rules);
        assert!(
            e.contains(&format!("an agent's state directory, {}", agent.display())),
            "{e}"
        );
        // The agent's own unpacked upload.
        let f = Function::checked(
            &key("t", "up"),
            &unpacked,
            &Default::default(),
            &rules,
            7,
            true,
        )
        .unwrap();
        assert!(f.owns_dir);
    }

    #[test]
    fn a_data_directory_is_refused_but_its_uploads_are_not() {
        let t = tempfile::tempdir().unwrap();
        let data_path = t.path().join("data");
        let data = crate::data_dir::DataDir::open(&data_path).unwrap();
        let unpacked = data.code().join("up-7");
        fs::create_dir_all(&unpacked).unwrap();
        fs::write(unpacked.join("f.py"), "def f(e): return e\n").unwrap();
        // This agent's data directory: in it, at it, above it.
        let mut rules = rules();
        rules.data_dir = Some(data_path.clone());
        for dir in [&unpacked, &data.code(), &data_path, &t.path().to_path_buf()] {
            let e = refused(dir, &rules);
            assert!(
                e.contains("not allowed") && e.contains("overlaps sprout's data directory"),
                "{}: {e}",
                dir.display()
            );
        }
        // Another agent's.
        rules.data_dir = None;
        let e = refused(&unpacked, &rules);
        assert!(
            e.contains(&format!(
                "an agent's data directory, {}",
                data_path.display()
            )),
            "{e}"
        );
        // The agent's own unpacked upload.
        rules.data_dir = Some(data_path.clone());
        let f = Function::checked(
            &key("t", "up"),
            &unpacked,
            &Default::default(),
            &rules,
            7,
            true,
        )
        .unwrap();
        assert!(f.owns_dir);
    }

    #[test]
    fn kernel_file_systems_are_recognised() {
        assert_eq!(kernel_fs(Path::new("/proc")), Some("proc"));
        assert_eq!(kernel_fs(Path::new("/proc/self/fd")), Some("proc"));
        assert_eq!(kernel_fs(Path::new("/sys")), Some("sysfs"));
        let t = tempfile::tempdir().unwrap();
        assert_eq!(kernel_fs(t.path()), None);
        // Every cgroup hierarchy mounted here (v1 controllers or the v2 one).
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
        let mut cgroups = 0;
        for line in mounts.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if let [_, dir, fstype @ ("cgroup" | "cgroup2"), ..] = f[..] {
                assert_eq!(kernel_fs(Path::new(dir)), Some(fstype), "{line}");
                cgroups += 1;
            }
        }
        assert!(cgroups > 0, "no cgroup file system is mounted:\n{mounts}");
    }

    #[test]
    fn the_handler_must_resolve_inside_the_directory() {
        let t = dir_with(&["inside.py", "real/mod.py"]);
        let outside = dir_with(&["mod.py", "f.py"]);
        symlink(outside.path().join("f.py"), t.path().join("f.py")).unwrap();
        symlink(outside.path(), t.path().join("pkg")).unwrap();
        symlink("/etc/hostname", t.path().join("host.py")).unwrap();
        symlink(t.path().join("inside.py"), t.path().join("alias.py")).unwrap();
        symlink(t.path().join("real"), t.path().join("also")).unwrap();
        for (handler, file) in [
            ("f:f", "f.py"),
            ("pkg.mod:f", "pkg/mod.py"),
            ("host:f", "host.py"),
        ] {
            let cfg = FunctionConfig {
                handler: Some(handler.into()),
                ..Default::default()
            };
            let e = err(t.path(), &cfg);
            assert!(
                e.contains(&format!("handler {handler}: {file} resolves to"))
                    && e.contains("outside the function directory"),
                "{handler}: {e}"
            );
        }
        for handler in ["alias:f", "also.mod:f"] {
            let cfg = FunctionConfig {
                handler: Some(handler.into()),
                ..Default::default()
            };
            check(t.path(), &cfg, &rules()).unwrap();
        }
        // Module paths are dotted identifiers: no `..`, no `/`.
        for handler in ["..f:f", "../f:f", "/etc/passwd:f", "a..b:f", "a/b:f"] {
            let cfg = FunctionConfig {
                handler: Some(handler.into()),
                ..Default::default()
            };
            let e = err(t.path(), &cfg);
            assert!(e.contains("is not a Python module name"), "{handler}: {e}");
        }
    }

    #[test]
    fn limits_out_of_range_are_refused_naming_field_value_and_range() {
        let t = dir_with(&["f.py"]);
        let refused = [
            (
                FunctionConfig {
                    cpus: Some(0.0001),
                    ..Default::default()
                },
                "cpus 0.0001 is out of range: 0.01 to 2 (",
            ),
            (
                FunctionConfig {
                    cpus: Some(2.5),
                    ..Default::default()
                },
                "cpus 2.5 is out of range: 0.01 to 2",
            ),
            (
                FunctionConfig {
                    cpus: Some(f64::NAN),
                    ..Default::default()
                },
                "cpus NaN is out of range",
            ),
            (
                FunctionConfig {
                    memory_mb: Some(1 << 20),
                    ..Default::default()
                },
                "memory_mb 1048576 is out of range: 16 to 1024 (at most the agent's memory budget)",
            ),
            (
                FunctionConfig {
                    memory_mb: Some(15),
                    ..Default::default()
                },
                "memory_mb 15 is out of range: 16 to 1024",
            ),
            (
                FunctionConfig {
                    pids: Some(7),
                    ..Default::default()
                },
                "pids 7 is out of range: 8 to 4096",
            ),
            (
                FunctionConfig {
                    pids: Some(4097),
                    ..Default::default()
                },
                "pids 4097 is out of range: 8 to 4096",
            ),
            (
                FunctionConfig {
                    timeout_ms: Some(0),
                    ..Default::default()
                },
                "timeout_ms 0 is out of range: 1 to 3600000",
            ),
            (
                FunctionConfig {
                    max_instances: Some(0),
                    ..Default::default()
                },
                "max_instances 0 is out of range: 1 to 1024",
            ),
            (
                FunctionConfig {
                    max_instances: Some(usize::MAX),
                    ..Default::default()
                },
                "is out of range: 1 to 1024",
            ),
        ];
        for (cfg, text) in refused {
            let e = check(t.path(), &cfg, &rules()).unwrap_err();
            assert_eq!(e.kind(), crate::error::ErrorKind::BadRequest);
            let e = ipc::chain(&e);
            assert!(e.contains(text), "{cfg:?}: {e}");
        }
        // The bounds themselves are accepted.
        let edges = FunctionConfig {
            cpus: Some(0.01),
            memory_mb: Some(16),
            pids: Some(8),
            timeout_ms: Some(1),
            max_instances: Some(1),
            ..Default::default()
        };
        let f = check(t.path(), &edges, &rules()).unwrap();
        assert_eq!((f.cpus, f.memory_mb, f.pids), (0.01, 16, 8));
        let edges = FunctionConfig {
            cpus: Some(2.0),
            memory_mb: Some(1024),
            pids: Some(4096),
            timeout_ms: Some(3_600_000),
            max_instances: Some(1024),
            ..Default::default()
        };
        let f = check(t.path(), &edges, &rules()).unwrap();
        assert_eq!((f.cpus, f.memory_mb, f.pids), (2.0, 1024, 4096));
    }

    #[test]
    fn the_rules_come_from_the_agents_config() {
        let config = Config {
            state_root: PathBuf::from("/run/sprout-elsewhere"),
            pool: crate::config::PoolConfig {
                memory_budget_mb: 300,
                ..Default::default()
            },
            ..Config::new()
        };
        let r = Rules::of(&config);
        assert_eq!(r.memory_budget_mb, 300);
        assert_eq!(r.state_root, config.state_root);
        assert_eq!(r.machine_cpus, crate::config::machine_cpus());
        let t = dir_with(&["f.py"]);
        let cfg = FunctionConfig {
            memory_mb: Some(301),
            ..Default::default()
        };
        let e = Function::new(&key("default", "f"), t.path(), &cfg, &config, 1, false).unwrap_err();
        assert!(e.to_string().contains("16 to 300"), "{e}");
    }

    #[test]
    fn names_from_directories_are_valid() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("my fn!");
        fs::create_dir(&d).unwrap();
        assert_eq!(name_from_dir(&d), "my_fn_");
        assert!(validate_name(&name_from_dir(Path::new("/"))).is_ok());
    }

    #[test]
    fn namespaces_follow_openwhisks_entity_names() {
        for ok in [
            "default",
            "a",
            "_x",
            "9",
            "whisk.system",
            "user@example.com_dev",
            "guest-1",
            &"n".repeat(MAX_NAMESPACE_LEN),
        ] {
            validate_namespace(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            "_",
            "-a",
            ".a",
            "@a",
            "a b",
            "a/b",
            "..",
            "a\0",
            "ns\u{e9}",
            &"n".repeat(MAX_NAMESPACE_LEN + 1),
        ] {
            let e = validate_namespace(bad).unwrap_err();
            assert_eq!(e.kind(), crate::error::ErrorKind::BadRequest, "{bad:?}");
            let text = e.to_string();
            assert!(
                text.contains("invalid namespace") && text.contains(NAMESPACE_RULE),
                "{bad:?}: {text}"
            );
        }
    }

    #[test]
    fn a_function_is_its_namespace_and_name() {
        let t = dir_with(&["f.py"]);
        let f = Function::checked(
            &key("a", "f"),
            t.path(),
            &Default::default(),
            &rules(),
            1,
            false,
        )
        .unwrap();
        assert_eq!(f.key(), FunctionKey::new("a", "f").unwrap());
        assert!(f.is(&key("a", "f")) && !f.is(&key("b", "f")));
        assert_eq!(f.key().to_string(), "a/f");
        assert_eq!(f.info(0).namespace, "a");
        let g = Function::checked(
            &key("b", "f"),
            t.path(),
            &Default::default(),
            &rules(),
            2,
            false,
        )
        .unwrap();
        // Same limits, other tenant: never in one sandbox.
        assert!(!f.same_limits(&g) && f.same_limits(&f.clone()));
        let e = Function::checked(
            &key("a b", "f"),
            t.path(),
            &Default::default(),
            &rules(),
            1,
            false,
        )
        .unwrap_err();
        assert!(e.to_string().contains("invalid namespace \"a b\""), "{e}");
        assert_eq!(
            FunctionKey::in_default("f").unwrap(),
            key(DEFAULT_NAMESPACE, "f")
        );
        assert!(FunctionKey::new("a", "../f").is_err());
    }

    /// A callee of another runtime never runs in its caller's sandbox (a call, a
    /// workflow's sequential step): it gets a sandbox of its own runtime.
    #[test]
    fn only_a_callee_of_the_same_runtime_shares_its_callers_sandbox() {
        let t = dir_with(&["f.py"]);
        fs::write(t.path().join("index.js"), "module.exports = (a) => a;\n").unwrap();
        fs::write(t.path().join("exec"), "#!/bin/sh\n").unwrap();
        let of = |runtime: &str| {
            let cfg = FunctionConfig {
                runtime: Some(runtime.into()),
                ..Default::default()
            };
            check(t.path(), &cfg, &rules()).unwrap()
        };
        let (py, node, native) = (of("python"), of("nodejs:default"), of("native"));
        assert_eq!(
            (py.runtime, node.runtime, native.runtime),
            (Runtime::Python, Runtime::Nodejs, Runtime::Native)
        );
        assert_eq!(node.info(0).runtime, "nodejs");
        for a in [&py, &node, &native] {
            for b in [&py, &node, &native] {
                assert_eq!(
                    a.same_limits(b),
                    a.runtime == b.runtime,
                    "{:?} {:?}",
                    a.runtime,
                    b.runtime
                );
            }
        }
        // Detected without a runtime: f.py comes first.
        let detected = check(t.path(), &FunctionConfig::default(), &rules()).unwrap();
        assert_eq!(detected.info(0).runtime, "python");
    }
}
