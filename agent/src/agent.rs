//! The agent: functions, sandboxes, warm instances and invocations.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipc::api::{FunctionConfig, FunctionInfo, Logs, Status};
use ipc::proto::{CallSpec, InstanceLink, LoadSpec, Runtime};
use ipc::Payload;
use pool::{CgroupVersion, Cgroups, Sandbox, SandboxState, Spawner, StateDir};
use rootfs::{Limits, SandboxConfig, Skeleton};

use crate::config::Config;
use crate::error::Error;
use crate::instance::{Answer, CallFailure, Instance, Output, BOOT_TIMEOUT};
use crate::registry::{Function, FunctionKey};
use crate::request::{FunctionSource, Invocation, Request, Response, Start};
use crate::run::Run;
use crate::scheduler::{Sched, Slot, SlotState, StemCell};
use crate::transport::{FastCall, FastPoll};
use crate::workflow::Workflow;

/// A running node agent. Create it with [`Agent::start`] (from any thread); share
/// it (`Arc<Agent>`) across threads; end it with [`Agent::shutdown`].
#[derive(Debug)]
pub struct Agent {
    inner: Arc<Inner>,
    manager: Mutex<Option<JoinHandle<()>>>,
    calls: Mutex<Option<JoinHandle<()>>>,
    /// Watches the spawner and cleans up after its death.
    spawner_watch: Mutex<Option<JoinHandle<()>>>,
}

/// A sandbox bound to a function, as the call server and workflows see it.
#[derive(Debug)]
pub(crate) struct BoundSandbox {
    pub function: Arc<Function>,
    /// Code attached under `/fns` (`name-version`).
    pub attached: std::collections::HashSet<String>,
}

/// How an invocation is made: by a client (depth 0) or by another function.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct CallOpts<'a> {
    pub depth: u32,
    /// The event is bytes (and a bytes result is accepted).
    pub raw: bool,
    /// The workflow run the callee joins (its scratch is attached).
    pub run: Option<&'a Arc<Run>>,
    /// Ends the call early when readable.
    pub cancel: Option<&'a crate::run::Cancel>,
    /// A deadline earlier than the function's own timeout.
    pub deadline: Option<Instant>,
    /// Where to leave the instance (and whether it is healthy) instead of leaving the
    /// run and releasing it: the caller does that after it has sent the answer on.
    pub hand_back: Option<&'a Mutex<Option<(Instance, bool)>>>,
}

/// What the agent's request threads and its pool manager share.
#[derive(Debug)]
pub(crate) struct Inner {
    pub config: Config,
    /// Taken (and removed) by [`Agent::shutdown`].
    state: Mutex<Option<StateDir>>,
    agent_id: String,
    state_path: PathBuf,
    bundles: PathBuf,
    pub cgroup_parent: PathBuf,
    pub cgroups: Cgroups,
    spawner: Spawner,
    skeleton: Skeleton,
    runtime_dir: PathBuf,
    /// By namespace and name (the tenant boundary: every lookup names both).
    functions: Mutex<HashMap<FunctionKey, Arc<Function>>>,
    pub workflows: Mutex<HashMap<FunctionKey, Arc<Workflow>>>,
    /// Bound sandboxes by id.
    pub bound: Mutex<HashMap<String, BoundSandbox>>,
    /// Held while the spawner attaches a callee's code somewhere.
    attaching: Mutex<()>,
    /// The workflow run each sandbox taking part in one belongs to, by sandbox id.
    pub runs: Mutex<HashMap<String, Arc<Run>>>,
    /// Each live sandbox's own host uid and gid (`Config::sandbox_uids`).
    pub sandbox_users: rootfs::SandboxUsers,
    /// Each sandbox's invocation, calls in flight and call connections.
    pub calls: crate::calls::Book,
    pub sched: Mutex<Sched>,
    /// Wakes the pool manager (paired with `sched`).
    pub wake: Condvar,
    next_id: AtomicU64,
    sandboxes: AtomicUsize,
    /// Memory (MiB) reserved by live sandboxes' limits.
    pub reserved_mb: AtomicU64,
    invocations: AtomicU64,
    pub shutting_down: AtomicBool,
    started: Instant,
    /// Reads every sandbox's shim and zygote output (one thread).
    output: crate::sandbox_output::SandboxOutput,
}

fn state_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::State {
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Agent {
    /// Cleans up after crashed agents, takes a state directory, starts the spawner
    /// (the `sprout-spawner` executable: [`Config::spawner`]) and (with `keep_warm`)
    /// the pool manager thread. May be called from any thread.
    pub fn start(config: Config) -> Result<Agent, Error> {
        let spawner_exe = pool::find_spawner(config.spawner.as_deref())?;
        let shim = config
            .shim
            .canonicalize()
            .map_err(state_err(&config.shim))?;
        let python = Path::new(shim::PYTHON);
        if !python.is_file() {
            return Err(Error::State {
                path: python.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "Python runtime not installed (apt-get install python3)",
                ),
            });
        }
        let cgroups = Cgroups::detect()?;
        let cleaned = pool::cleanup_stale(&config.state_root, &cgroups);
        if !cleaned.is_empty() {
            tracing::info!(agents = ?cleaned, "removed leftovers of stopped agents");
        }
        let state = StateDir::acquire(&config.state_root)?;
        let rootfs_dir = state.path().join("rootfs");
        let skeleton = Skeleton::create(&rootfs_dir).map_err(|e| Error::State {
            path: rootfs_dir.clone(),
            source: std::io::Error::other(ipc::chain(&e)),
        })?;
        let runtime_dir = state.path().join("runtime");
        shim::install_runtime(&runtime_dir).map_err(state_err(&runtime_dir))?;
        let spawner = Spawner::start(&spawner_exe, &state, &cgroups)?;
        if let Err(e) = cgroups.hold_freezer_anchor(&state.cgroup_parent().join("freezer-anchor")) {
            // Only slower freezes and thaws follow; say so and go on.
            tracing::warn!(error = %ipc::chain(&e), "could not hold the freezer anchor cgroup");
        }
        tracing::info!(agent_id = state.agent_id(), state_dir = %state.path().display(), "agent started");
        let keep_warm = config.keep_warm;
        let call_listener = crate::calls::bind(&runtime_dir)?;
        let call_socket_path = runtime_dir.join(crate::calls::SOCKET_NAME);
        // Sandboxes run as unprivileged users, who need write permission to
        // connect; host accounts cannot reach it (the state directory is 0700 root;
        // sandboxes see it through their bind mount). The peer's cgroup and uid
        // decide who is heard (`calls`).
        std::fs::set_permissions(
            &call_socket_path,
            std::os::unix::fs::PermissionsExt::from_mode(0o666),
        )
        .map_err(state_err(&call_socket_path))?;
        let sandbox_users = rootfs::SandboxUsers::new(config.sandbox_uids);
        let inner = Arc::new(Inner {
            config: Config { shim, ..config },
            agent_id: state.agent_id().to_owned(),
            state_path: state.path().to_path_buf(),
            bundles: state.bundles(),
            cgroup_parent: state.cgroup_parent(),
            state: Mutex::new(Some(state)),
            cgroups,
            spawner,
            skeleton,
            runtime_dir,
            functions: Mutex::new(HashMap::new()),
            workflows: Mutex::new(HashMap::new()),
            bound: Mutex::new(HashMap::new()),
            attaching: Mutex::new(()),
            runs: Mutex::new(HashMap::new()),
            sandbox_users,
            calls: crate::calls::Book::default(),
            sched: Mutex::new(Sched::default()),
            wake: Condvar::new(),
            next_id: AtomicU64::new(1),
            sandboxes: AtomicUsize::new(0),
            reserved_mb: AtomicU64::new(0),
            invocations: AtomicU64::new(0),
            shutting_down: AtomicBool::new(false),
            started: Instant::now(),
            output: crate::sandbox_output::SandboxOutput::start()
                .map_err(state_err(Path::new("sandbox output thread")))?,
        });
        let manager = if keep_warm {
            let inner = inner.clone();
            let handle = std::thread::Builder::new()
                .name("sprout-pool".into())
                .spawn(move || crate::manager::run(&inner))
                .map_err(|source| Error::State {
                    path: PathBuf::from("pool manager thread"),
                    source,
                })?;
            Some(handle)
        } else {
            None
        };
        let calls = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("sprout-calls".into())
                .spawn(move || crate::calls::serve(&inner, call_listener))
                .map_err(|source| Error::State {
                    path: PathBuf::from("call server thread"),
                    source,
                })?
        };
        let spawner_watch = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("sprout-spawner-watch".into())
                .spawn(move || {
                    while inner.spawner.watch() {
                        inner.forget_gone_sandboxes();
                    }
                })
                .map_err(|source| Error::State {
                    path: PathBuf::from("spawner watch thread"),
                    source,
                })?
        };
        Ok(Agent {
            inner,
            manager: Mutex::new(manager),
            calls: Mutex::new(Some(calls)),
            spawner_watch: Mutex::new(Some(spawner_watch)),
        })
    }

    /// Destroys every sandbox, stops the spawner and removes the agent's state.
    /// Requests in flight fail, waiting ones and new ones get
    /// [`Error::ShuttingDown`]. Only the first call does anything.
    pub fn shutdown(&self) -> Result<(), Error> {
        let inner = &self.inner;
        if inner.shutting_down.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        {
            // Under the lock, so the manager cannot miss it between its check and its wait.
            let _sched = lock(&inner.sched);
            inner.wake.notify_all();
        }
        if let Some(manager) = lock(&self.manager).take() {
            let _ = manager.join();
        }
        inner.calls.wake_for_shutdown();
        if let Some(calls) = lock(&self.calls).take() {
            let _ = calls.join();
        }
        let (idle, stems) = lock(&inner.sched).drain();
        for inst in idle {
            inner.destroy(inst);
        }
        for mut stem in stems {
            inner.destroy_sandbox(&mut stem.sandbox, stem.reserved_mb);
        }
        for f in lock(&inner.functions).values() {
            remove_owned_dir(f);
        }
        // The spawner destroys sandboxes still in use by in-flight requests.
        let stopped = inner.spawner.shutdown();
        if let Some(watch) = lock(&self.spawner_watch).take() {
            let _ = watch.join();
        }
        stopped?;
        if let Some(state) = lock(&inner.state).take() {
            state.remove(&inner.cgroups)?;
        }
        tracing::info!(agent_id = %inner.agent_id, "agent stopped");
        Ok(())
    }

    /// The one entry point of every transport.
    pub fn handle(&self, req: Request) -> Result<Response, Error> {
        self.handle_abandonable(req, None)
    }

    /// [`Agent::handle`] for a transport that can take a request back while it
    /// waits in a function's queue (its client went away, or the server drains).
    pub fn handle_abandonable(
        &self,
        req: Request,
        abandon: Option<&crate::scheduler::Abandon>,
    ) -> Result<Response, Error> {
        let inner = &self.inner;
        if inner.shutting_down.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown);
        }
        match req {
            Request::RegisterFunction {
                namespace,
                name,
                source,
                config,
            } => inner
                .register(&FunctionKey::new(&namespace, &name)?, source, &config)
                .map(Response::Registered),
            Request::ListFunctions { namespace } => {
                crate::registry::validate_namespace(&namespace)?;
                Ok(Response::Functions(inner.list(&namespace)))
            }
            Request::RemoveFunction { namespace, name } => inner
                .remove(&FunctionKey::new(&namespace, &name)?)
                .map(|()| Response::Removed { namespace, name }),
            Request::Invoke {
                namespace,
                name,
                event,
            } => inner
                .invoke(&FunctionKey::new(&namespace, &name)?, event, abandon)
                .map(Response::Invoked),
            Request::Status => Ok(Response::Status(inner.status())),
            Request::RegisterWorkflow {
                namespace,
                name,
                workflow,
            } => inner
                .register_workflow(&FunctionKey::new(&namespace, &name)?, workflow)
                .map(Response::WorkflowRegistered),
            Request::ListWorkflows { namespace } => {
                crate::registry::validate_namespace(&namespace)?;
                Ok(Response::Workflows(inner.list_workflows(&namespace)))
            }
            Request::RemoveWorkflow { namespace, name } => inner
                .remove_workflow(&FunctionKey::new(&namespace, &name)?)
                .map(|()| Response::Removed { namespace, name }),
            Request::RunWorkflow {
                namespace,
                name,
                input,
            } => crate::workflow::run(inner, &FunctionKey::new(&namespace, &name)?, &input)
                .map(Response::WorkflowRan),
        }
    }
}

impl crate::transport::Handle for Agent {
    fn handle(&self, req: Request) -> Result<Response, Error> {
        Agent::handle(self, req)
    }

    fn handle_abandonable(
        &self,
        req: Request,
        abandon: &crate::scheduler::Abandon,
    ) -> Result<Response, Error> {
        Agent::handle_abandonable(self, req, Some(abandon))
    }

    fn start_fast(&self, req: &Request) -> Option<Box<dyn FastCall>> {
        match req {
            Request::Invoke {
                namespace,
                name,
                event,
            } => self
                .inner
                .start_fast(namespace, name, event)
                .map(|c| Box::new(c) as Box<dyn FastCall>),
            _ => None,
        }
    }
}

/// Events up to this size may take the event loop's warm path.
const FAST_EVENT_MAX: usize = 64 << 10;

/// A warm invoke in flight whose answer the HTTP event loop reads without blocking.
/// Anything that needs waiting (a failure to clean up after, output to keep
/// draining) is finished by a worker with [`FastCall::finish`].
struct WarmCall {
    inner: Arc<Inner>,
    /// Taken when the call is completed; a call dropped unfinished gives it back as
    /// unhealthy (its sandbox is destroyed).
    inst: Option<Instance>,
    function: Arc<Function>,
    id: u64,
    started: Instant,
    start: Start,
    deadline: Instant,
    /// A failure seen already (sending the invoke, or reading the answer).
    failed: Option<CallFailure>,
    /// An answer read on the loop but left for [`FastCall::finish`] to complete.
    answered: Option<Result<Answer, CallFailure>>,
}

impl FastCall for WarmCall {
    fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.inst.as_ref().map_or(-1, |i| i.link.0.as_raw_fd())
    }

    fn poll(&mut self) -> FastPoll {
        if self.failed.is_some() {
            return FastPoll::Handoff;
        }
        let Some(inst) = self.inst.as_mut() else {
            return FastPoll::Handoff;
        };
        match inst.try_finish(self.id, self.inner.config.log_limit) {
            None => FastPoll::Pending,
            Some(Err(failure)) if !matches!(failure, CallFailure::Raised(_)) => {
                self.failed = Some(failure);
                FastPoll::Handoff
            }
            // Ending the run it started takes a spawner round trip, and ending the calls
            // of a sandbox with a call connection a call-loop round trip: not on the loop.
            // A shared (memfd) result is checked (parsed in full) by `complete`: not
            // on the loop either.
            Some(outcome)
                if inst.called
                    || matches!(&outcome, Ok(answer) if answer.payload.is_shared())
                    || self.inner.has_root_run(inst.sandbox.id())
                    || self.inner.calls.connected(inst.sandbox.id()) =>
            {
                self.answered = Some(outcome);
                FastPoll::Handoff
            }
            Some(outcome) => {
                let inst = self.inst.take().expect("instance");
                let result = self.inner.complete(
                    inst,
                    &self.function,
                    self.start,
                    self.started,
                    outcome,
                    &CallOpts::default(),
                );
                FastPoll::Done(result.map(Response::Invoked))
            }
        }
    }

    fn finish(mut self: Box<Self>) -> Result<Response, Error> {
        let mut inst = self.inst.take().ok_or(Error::ShuttingDown)?;
        let outcome = match (self.answered.take(), self.failed.take()) {
            (Some(outcome), _) => outcome,
            (None, Some(failure)) => Err(failure),
            (None, None) => inst.finish(self.id, self.deadline, self.inner.config.log_limit, None),
        };
        self.inner
            .complete(
                inst,
                &self.function,
                self.start,
                self.started,
                outcome,
                &CallOpts::default(),
            )
            .map(Response::Invoked)
    }
}

impl Drop for WarmCall {
    fn drop(&mut self) {
        if let Some(inst) = self.inst.take() {
            self.inner.release(inst, false);
        }
    }
}

impl Inner {
    fn register(
        &self,
        key: &FunctionKey,
        source: FunctionSource,
        config: &FunctionConfig,
    ) -> Result<FunctionInfo, Error> {
        let name = key.name.as_str();
        let version = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (dir, owns_dir) = match source {
            FunctionSource::Dir(dir) => (dir, false),
            FunctionSource::Tar(bytes) => (self.unpack(name, version, &bytes)?, true),
        };
        let function = match Function::new(key, &dir, config, &self.config, version, owns_dir) {
            Ok(f) => Arc::new(f),
            Err(e) => {
                if owns_dir {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                return Err(e);
            }
        };
        if function.dir.join("requirements.txt").is_file() {
            tracing::warn!(
                function = %key,
                "requirements.txt is not installed yet: the function gets the standard library of the host's Python only"
            );
        }
        let info = function.info(0);
        let old = lock(&self.functions).insert(key.clone(), function);
        if let Some(old) = old {
            self.retire(key);
            remove_owned_dir(&old);
        }
        tracing::info!(function = %key, handler = %info.handler, path = %info.path, "function registered");
        Ok(info)
    }

    fn unpack(&self, name: &str, version: u64, tar_bytes: &[u8]) -> Result<PathBuf, Error> {
        let dir = self
            .state_path
            .join("functions")
            .join(format!("{name}-{version}"));
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

    /// The functions of `namespace`, by name.
    fn list(&self, namespace: &str) -> Vec<FunctionInfo> {
        let functions: Vec<Arc<Function>> = lock(&self.functions)
            .values()
            .filter(|f| f.namespace == namespace)
            .cloned()
            .collect();
        let sched = lock(&self.sched);
        let mut list: Vec<_> = functions
            .iter()
            .map(|f| f.info(sched.idle_count(&f.key())))
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    fn remove(&self, key: &FunctionKey) -> Result<(), Error> {
        let f = lock(&self.functions)
            .remove(key)
            .ok_or_else(|| not_found(key))?;
        self.retire(key);
        remove_owned_dir(&f);
        tracing::info!(function = %key, "function removed");
        Ok(())
    }

    /// Destroys the idle instances of `name`, and the idle instances of other functions
    /// that call `name` in their sandbox (they would keep running its old code), and
    /// wakes its waiters to look again (they find the new version, or that the
    /// function is gone).
    fn retire(&self, key: &FunctionKey) {
        let name = &key.name;
        let old = {
            let mut sched = lock(&self.sched);
            let pool = sched.pool(key);
            pool.live -= pool.idle.len();
            for slot in pool.queue.drain(..) {
                slot.retry();
            }
            let mut old = std::mem::take(&mut pool.idle);
            let bound = lock(&self.bound);
            // Only its namespace's sandboxes can have attached it.
            let calls_it = |i: &Instance| {
                i.function.namespace == key.namespace
                    && bound.get(i.sandbox.id()).is_some_and(|b| {
                        b.attached.iter().any(|a| {
                            ipc::sandbox_paths::parse_callee_dir(a).is_some_and(|(n, _)| n == name)
                        })
                    })
            };
            for pool in sched.functions.values_mut() {
                let callers: Vec<Instance> = pool.idle.extract_if(.., |i| calls_it(i)).collect();
                pool.live -= callers.len();
                old.extend(callers);
            }
            old
        };
        for inst in old {
            self.destroy(inst);
        }
    }

    fn status(&self) -> Status {
        // Before any lock is held: it takes the registry's and the bound sandboxes'.
        let namespaces = self.namespaces();
        let sched = lock(&self.sched);
        let frozen = sched
            .functions
            .values()
            .flat_map(|f| &f.idle)
            .filter(|i| i.sandbox.state() == SandboxState::Frozen)
            .count()
            + sched
                .stem_cells
                .iter()
                .filter(|s| s.sandbox.state() == SandboxState::Frozen)
                .count();
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            cgroup: match self.cgroups.version() {
                CgroupVersion::V1 => "v1".to_owned(),
                CgroupVersion::V2 => "v2".to_owned(),
            },
            functions: lock(&self.functions).len(),
            sandboxes: self.sandboxes.load(Ordering::Relaxed),
            stem_cells: sched.stem_cells.len(),
            frozen,
            queued: sched.queued(),
            reserved_mb: self.reserved_mb.load(Ordering::Relaxed),
            memory_budget_mb: self.config.pool.memory_budget_mb,
            invocations: self.invocations.load(Ordering::Relaxed),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            namespaces,
        }
    }

    /// Each namespace with a function or a workflow: what it has registered, and
    /// its sandboxes.
    fn namespaces(&self) -> Vec<ipc::api::NamespaceStatus> {
        let mut by_ns: std::collections::BTreeMap<String, ipc::api::NamespaceStatus> =
            Default::default();
        let functions: Vec<String> = lock(&self.functions)
            .keys()
            .map(|k| k.namespace.clone())
            .collect();
        let workflows: Vec<String> = lock(&self.workflows)
            .keys()
            .map(|k| k.namespace.clone())
            .collect();
        let sandboxes: Vec<String> = lock(&self.bound)
            .values()
            .map(|b| b.function.namespace.clone())
            .collect();
        let mut add = |ns: String, which: fn(&mut ipc::api::NamespaceStatus)| {
            let e = by_ns
                .entry(ns.clone())
                .or_insert_with(|| ipc::api::NamespaceStatus {
                    namespace: ns,
                    functions: 0,
                    workflows: 0,
                    sandboxes: 0,
                });
            which(e);
        };
        for ns in functions {
            add(ns, |e| e.functions += 1);
        }
        for ns in workflows {
            add(ns, |e| e.workflows += 1);
        }
        for ns in sandboxes {
            add(ns, |e| e.sandboxes += 1);
        }
        by_ns.into_values().collect()
    }

    fn invoke(
        &self,
        key: &FunctionKey,
        event: Vec<u8>,
        abandon: Option<&crate::scheduler::Abandon>,
    ) -> Result<Invocation, Error> {
        serde_json::from_slice::<serde::de::IgnoredAny>(&event).map_err(Error::InvalidEvent)?;
        let event = Payload::Inline(event);
        self.invoke_abandonable(key, &event, &CallOpts::default(), abandon)
    }

    /// Runs one invocation of `key`: a client's (`opts` default) or a function's call
    /// (resolved in the caller's namespace).
    pub(crate) fn invoke_with(
        &self,
        key: &FunctionKey,
        event: &Payload,
        opts: &CallOpts<'_>,
    ) -> Result<Invocation, Error> {
        self.invoke_abandonable(key, event, opts, None)
    }

    /// [`Inner::invoke_with`] for a client's request that the HTTP loop takes back
    /// (`abandon`) while it waits for an instance: its client went away, or the
    /// server drains.
    fn invoke_abandonable(
        &self,
        key: &FunctionKey,
        event: &Payload,
        opts: &CallOpts<'_>,
        abandon: Option<&crate::scheduler::Abandon>,
    ) -> Result<Invocation, Error> {
        let name = key.name.as_str();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.invocations.fetch_add(1, Ordering::Relaxed);
        let span = tracing::debug_span!(
            "invoke",
            namespace = %key.namespace,
            function = name,
            invocation = id,
            depth = opts.depth,
            sandbox_id = tracing::field::Empty
        );
        let _g = span.enter();
        let started = Instant::now();

        // A client's request waits in the queue as long as it takes; a function's call
        // no longer than its deadline, and not once its caller has given up.
        let queue_deadline = opts.deadline.or_else(|| {
            opts.run.and_then(|_| {
                let f = lock(&self.functions).get(key).map(|f| f.timeout_ms)?;
                Some(Instant::now() + Duration::from_millis(f))
            })
        });
        let (mut inst, mut start, function) =
            self.acquire_until(key, queue_deadline, opts.cancel, abandon)?;
        span.record("sandbox_id", inst.sandbox.id());
        // A client gone while its instance was handed over: it never runs.
        if opts.cancel.is_some_and(|c| c.fired()) || abandon.is_some_and(|a| a.is_gone()) {
            self.release(inst, true);
            return Err(Error::Cancelled {
                function: name.to_owned(),
            });
        }
        if inst.sandbox.state() == SandboxState::Frozen {
            if let Err(e) = inst.sandbox.thaw() {
                self.release(inst, false);
                return Err(e.into());
            }
            start = Start::Thawed;
        }
        if let Some(run) = opts.run {
            if let Err(e) = self.join_run(&inst, run) {
                self.release(inst, true);
                return Err(e);
            }
        }
        // The timeout bounds the handler's run; loading it had its own (as in OpenWhisk).
        let own = Instant::now() + Duration::from_millis(function.timeout_ms);
        let deadline = opts.deadline.map_or(own, |d| d.min(own));
        // Calls the sandbox makes from now on are this invocation's (`complete` ends them).
        self.calls.begin(inst.sandbox.id(), opts.depth);
        let outcome = inst.begin(id, event, opts.depth, opts.raw).and_then(|()| {
            inst.finish(
                id,
                deadline,
                self.config.log_limit,
                opts.cancel.map(|c| c.fd()),
            )
        });
        self.complete(inst, &function, start, started, outcome, opts)
    }

    /// Ends an invocation: leaves its workflow run, gives the instance back (or
    /// destroys it) and turns the outcome into the invocation or its error.
    fn complete(
        &self,
        mut inst: Instance,
        function: &Function,
        start: Start,
        started: Instant,
        outcome: Result<Answer, CallFailure>,
        opts: &CallOpts<'_>,
    ) -> Result<Invocation, Error> {
        // Every call the invocation made ends with it, whatever the runtime reports.
        self.calls.end(inst.sandbox.id());
        let logs = inst.take_logs();
        let duration = started.elapsed();
        let name = &function.name;
        let mut healthy = matches!(outcome, Ok(_) | Err(CallFailure::Raised(_)));
        // The runtime's word that it called (`called`) is not needed: calls made on the
        // call socket by hand started a run all the same, and it ends here too.
        if healthy && (inst.called || self.has_root_run(inst.sandbox.id())) {
            healthy = self.end_sdk_run(&inst);
        }
        let (result, keep) = match outcome {
            Ok(Answer { raw: true, .. }) if !opts.raw => (
                Err(Error::BytesResult {
                    function: name.clone(),
                }),
                healthy,
            ),
            // A top-level result is answered over HTTP: bounded like a request body
            // (checked before it is parsed).
            Ok(Answer { payload, .. })
                if opts.run.is_none() && payload.len() > crate::request::MAX_RESULT =>
            {
                (
                    Err(Error::ResultTooLarge {
                        function: name.clone(),
                        len: payload.len(),
                        max: crate::request::MAX_RESULT,
                    }),
                    healthy,
                )
            }
            Ok(Answer { payload, raw }) => {
                match serde_json::from_slice::<serde::de::IgnoredAny>(&payload) {
                    Err(source) if !raw => (
                        Err(Error::BadResult {
                            function: name.clone(),
                            source,
                        }),
                        false,
                    ),
                    _ => {
                        tracing::debug!(
                            duration_us = duration.as_micros() as u64,
                            start = start.as_str(),
                            "invocation returned"
                        );
                        let inv = Invocation {
                            result: payload,
                            raw,
                            logs,
                            duration,
                            start,
                        };
                        (Ok(inv), healthy)
                    }
                }
            }
            Err(CallFailure::Raised(error)) => (
                Err(Error::Handler {
                    function: name.clone(),
                    error,
                    logs,
                }),
                healthy,
            ),
            Err(failure) => (Err(self.failure(&inst, function, failure, logs)), false),
        };
        match opts.hand_back {
            Some(slot) => {
                // Counted before its answer goes out, so a burst of calls right after
                // waits for it instead of starting new instances.
                lock(&self.sched).pool(&inst.function).returning += 1;
                *lock(slot) = Some((inst, keep));
            }
            None => self.leave_and_release(inst, opts.run, keep),
        }
        result
    }

    /// Whether every function attached in the sandbox (for calls) is still the
    /// registered version: its processes cache what they resolved, so a sandbox with
    /// an outdated callee must not be used again.
    fn callees_current(&self, sandbox_id: &str) -> bool {
        let bound = lock(&self.bound);
        let Some(b) = bound.get(sandbox_id) else {
            return true;
        };
        if b.attached.is_empty() {
            return true;
        }
        let functions = lock(&self.functions);
        let namespace = &b.function.namespace;
        b.attached.iter().all(|target| {
            let Some((name, version)) = ipc::sandbox_paths::parse_callee_dir(target) else {
                return false;
            };
            // Callees are of the sandbox's own namespace.
            functions
                .get(&FunctionKey {
                    namespace: namespace.clone(),
                    name: name.to_owned(),
                })
                .is_some_and(|f| version == f.version)
        })
    }

    /// Takes an instance out of its run (if any) and gives it back to the pool.
    pub(crate) fn leave_and_release(&self, inst: Instance, run: Option<&Arc<Run>>, healthy: bool) {
        let healthy = match run {
            Some(run) => self.leave_run(&inst, run, healthy),
            None => healthy,
        };
        self.release(inst, healthy);
    }

    /// Makes `inst`'s sandbox part of `run`: the run's scratch goes over its own
    /// `/workflow` (unless the run is rooted there) and calls made from it join the run.
    pub(crate) fn join_run(&self, inst: &Instance, run: &Arc<Run>) -> Result<(), Error> {
        let id = inst.sandbox.id();
        match &run.scratch {
            crate::run::Scratch::Own(scratch) => self.spawner.attach_scratch(id, scratch)?,
            crate::run::Scratch::RootedIn(root) if root != id => {
                self.spawner.attach_scratch_from(id, root)?
            }
            crate::run::Scratch::RootedIn(_) => {}
        }
        lock(&self.runs).insert(id.to_owned(), run.clone());
        Ok(())
    }

    /// Undoes [`Inner::join_run`]; the sandbox sees its own `/workflow` again.
    /// `false`: the run's scratch may still be attached, so the sandbox must go.
    pub(crate) fn leave_run(&self, inst: &Instance, run: &Arc<Run>, healthy: bool) -> bool {
        let id = inst.sandbox.id();
        lock(&self.runs).remove(id);
        if run.is_root(id) || !healthy || inst.sandbox.state() == SandboxState::Dead {
            return healthy; // an unhealthy sandbox is destroyed, mounts and all
        }
        fit_for_pool(
            id,
            "detach the workflow scratch",
            self.spawner.detach_scratch(id),
        )
    }

    /// Whether sandbox `id` started a run of its own (its function made sibling calls).
    fn has_root_run(&self, id: &str) -> bool {
        matches!(lock(&self.runs).get(id), Some(run) if run.is_root(id))
    }

    /// After an invocation that called other functions: unless the sandbox takes part in
    /// someone else's run, its run ends. Calls still in flight are cancelled, and the
    /// scratch is replaced by a new tmpfs (not emptied: a sibling that kept a
    /// descriptor into it reaches only the finished run's files). Returns `false` if
    /// that failed (the sandbox must go).
    fn end_sdk_run(&self, inst: &Instance) -> bool {
        let id = inst.sandbox.id();
        {
            let mut runs = lock(&self.runs);
            match runs.get(id) {
                Some(run) if run.is_root(id) => {
                    run.cancel.fire();
                    runs.remove(id);
                }
                Some(_) => return true, // a member of another run: its scratch is not ours
                None => {}
            }
        }
        if !self.config.keep_warm {
            return true; // the sandbox is destroyed next, scratch and all
        }
        fit_for_pool(
            id,
            "replace the workflow scratch",
            self.spawner.reset_scratch(id),
        )
    }

    /// Makes `callee`'s code visible in sandbox `sandbox_id` if the callee can run there
    /// (same runtime and limits) and returns how the shim runs it; `None` if it cannot.
    pub(crate) fn attach_callee(
        &self,
        sandbox_id: &str,
        callee: &Function,
    ) -> Result<Option<CallSpec>, Error> {
        // The tenant boundary: never another namespace's code in this sandbox. The
        // lookups that lead here already resolve in the caller's namespace; this holds
        // whatever a future caller does.
        let caller_namespace = lock(&self.bound)
            .get(sandbox_id)
            .map(|b| b.function.namespace.clone());
        if let Some(ns) = caller_namespace.filter(|ns| *ns != callee.namespace) {
            return Err(not_found_in(&ns, &callee.name));
        }
        let target = ipc::sandbox_paths::callee_dir(&callee.name, callee.version);
        // `None`: it cannot run there; `Some(attached)`: it can.
        let state = |bound: &HashMap<String, BoundSandbox>| {
            bound
                .get(sandbox_id)
                .filter(|b| b.function.same_limits(callee))
                .map(|b| b.attached.contains(&target))
        };
        if state(&lock(&self.bound)) == Some(false) {
            // One attach at a time (the spawner does them in turn anyway), so a second
            // resolve of the same callee waits for the first instead of getting a spec
            // for a directory that is not there yet.
            let _one_at_a_time = lock(&self.attaching);
            if state(&lock(&self.bound)) == Some(false) {
                self.spawner
                    .attach_code(sandbox_id, &callee.dir, Path::new(&target))?;
                if let Some(b) = lock(&self.bound).get_mut(sandbox_id) {
                    b.attached.insert(target.clone());
                }
            }
        }
        if state(&lock(&self.bound)).is_none() {
            return Ok(None);
        }
        Ok(Some(CallSpec {
            function: callee.name.clone(),
            version: callee.version,
            code_dir: target,
            handler: callee.handler.clone(),
            timeout_ms: callee.timeout_ms,
        }))
    }

    pub(crate) fn function(&self, key: &FunctionKey) -> Result<Arc<Function>, Error> {
        lock(&self.functions)
            .get(key)
            .cloned()
            .ok_or_else(|| not_found(key))
    }

    /// `name` in the namespace of the function sandbox `sandbox_id` is bound to: what a
    /// call from that sandbox means. A function calls only its own namespace's
    /// functions; a name that exists only elsewhere is as unknown as one that exists
    /// nowhere.
    pub(crate) fn callee_key(&self, sandbox_id: &str, name: &str) -> Result<FunctionKey, Error> {
        let namespace = lock(&self.bound)
            .get(sandbox_id)
            .map(|b| b.function.namespace.clone())
            .ok_or_else(|| Error::State {
                path: PathBuf::from(sandbox_id),
                source: std::io::Error::other("the calling sandbox is not bound to a function"),
            })?;
        FunctionKey::new(&namespace, name).map_err(|_| not_found_in(&namespace, name))
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers workflow `key`; its tasks' functions must exist in its namespace.
    fn register_workflow(
        &self,
        key: &FunctionKey,
        workflow: Workflow,
    ) -> Result<ipc::api::WorkflowInfo, Error> {
        workflow.check_functions(|f| {
            lock(&self.functions).contains_key(&FunctionKey {
                namespace: key.namespace.clone(),
                name: f.to_owned(),
            })
        })?;
        let info = workflow.info(key);
        lock(&self.workflows).insert(key.clone(), Arc::new(workflow));
        tracing::info!(workflow = %key, tasks = info.tasks, "workflow registered");
        Ok(info)
    }

    fn list_workflows(&self, namespace: &str) -> Vec<ipc::api::WorkflowInfo> {
        let mut list: Vec<_> = lock(&self.workflows)
            .iter()
            .filter(|(key, _)| key.namespace == namespace)
            .map(|(key, w)| w.info(key))
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    fn remove_workflow(&self, key: &FunctionKey) -> Result<(), Error> {
        lock(&self.workflows)
            .remove(key)
            .map(drop)
            .ok_or_else(|| Error::WorkflowNotFound {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
            })
    }

    /// Starts a warm invoke that the HTTP event loop can finish without blocking:
    /// only when the function has an idle instance and the event is small. A frozen
    /// instance is thawed here (a write and a read of its freezer file, ~0.1 ms).
    /// `None` sends the request down the ordinary path.
    fn start_fast(self: &Arc<Self>, namespace: &str, name: &str, event: &[u8]) -> Option<WarmCall> {
        if event.len() > FAST_EVENT_MAX
            || self.shutting_down.load(Ordering::SeqCst)
            || serde_json::from_slice::<serde::de::IgnoredAny>(event).is_err()
        {
            return None;
        }
        // An invalid namespace or name is never registered: the ordinary path says why.
        let key = FunctionKey {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        let function = lock(&self.functions).get(&key).cloned()?;
        let mut inst = {
            let mut sched = lock(&self.sched);
            let pool = sched.functions.get_mut(&key)?;
            let usable = pool
                .idle
                .last()
                .is_some_and(|i| i.function_version == function.version);
            if !usable {
                return None;
            }
            pool.idle.pop()?
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.invocations.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let start = if inst.sandbox.state() == SandboxState::Frozen {
            Start::Thawed
        } else {
            Start::Warm
        };
        if start == Start::Thawed {
            if let Err(e) = inst.sandbox.thaw() {
                tracing::warn!(sandbox_id = inst.sandbox.id(), error = %ipc::chain(&e), "thaw failed");
                self.release(inst, false);
                return None;
            }
            tracing::debug!(
                sandbox_id = inst.sandbox.id(),
                thaw_us = started.elapsed().as_micros() as u64,
                "thawed"
            );
        }
        self.calls.begin(inst.sandbox.id(), 0);
        let failed = inst
            .begin(id, &Payload::Inline(event.to_vec()), 0, false)
            .err();
        Some(WarmCall {
            inner: self.clone(),
            deadline: started + Duration::from_millis(function.timeout_ms),
            inst: Some(inst),
            function,
            id,
            started,
            start,
            failed,
            answered: None,
        })
    }

    /// An instance of `name` for one invocation: an idle one, a new one (while the
    /// function is below `max_instances`), or one handed over after waiting in the
    /// function's queue.
    pub(crate) fn acquire(
        &self,
        key: &FunctionKey,
        deadline: Option<Instant>,
        cancel: Option<&crate::run::Cancel>,
    ) -> Result<(Instance, Start, Arc<Function>), Error> {
        self.acquire_until(key, deadline, cancel, None)
    }

    /// [`Inner::acquire`] for a request its transport may abandon while it waits.
    pub(crate) fn acquire_until(
        &self,
        key: &FunctionKey,
        deadline: Option<Instant>,
        cancel: Option<&crate::run::Cancel>,
        abandon: Option<&crate::scheduler::Abandon>,
    ) -> Result<(Instance, Start, Arc<Function>), Error> {
        let name = key.name.as_str();
        let mut retried = false;
        loop {
            // Taken back before it started (and before it starts an instance). A
            // retry it was woken with goes to the next waiter, or nobody starts the
            // replacement.
            if let Some(e) = abandon.and_then(|a| a.error(name)) {
                if retried {
                    lock(&self.sched).pool(key).retry_next();
                }
                return Err(e);
            }
            let function = lock(&self.functions)
                .get(key)
                .cloned()
                .ok_or_else(|| not_found(key))?;
            let mut sched = lock(&self.sched);
            if self.shutting_down.load(Ordering::SeqCst) {
                return Err(Error::ShuttingDown);
            }
            let pool = sched.pool(key);
            let stale: Vec<Instance> = pool
                .idle
                .extract_if(.., |i| i.function_version != function.version)
                .collect();
            pool.live -= stale.len();
            let idle = pool.idle.pop();
            // Instances on their way back (answered, leaving a workflow run) will serve
            // as many waiters: only start one beyond those.
            let may_start = idle.is_none()
                && pool.live < function.max_instances
                && pool.returning <= pool.queue.len();
            if may_start {
                pool.live += 1;
            }
            let slot = if idle.is_none() && !may_start {
                let slot = Arc::new(Slot::default());
                // A request woken to retry keeps its place at the front.
                if retried {
                    pool.queue.push_front(slot.clone());
                } else {
                    pool.queue.push_back(slot.clone());
                }
                Some(slot)
            } else {
                None
            };
            let stem = if may_start {
                sched.stem_cells.pop()
            } else {
                None
            };
            drop(sched);
            for inst in stale {
                self.destroy(inst);
            }
            if let Some(inst) = idle {
                return Ok((inst, Start::Warm, function));
            }
            if may_start {
                let start = if stem.is_some() {
                    Start::StemCell
                } else {
                    Start::NewSandbox
                };
                return match self.start_instance(&function, stem) {
                    Ok(inst) => Ok((inst, start, function)),
                    Err(e) => {
                        self.forget_instance(key);
                        Err(e)
                    }
                };
            }
            let slot = slot.expect("queued");
            let waited = Instant::now();
            let mut state = slot.wait(deadline, || {
                cancel.is_some_and(|c| c.fired()) || abandon.is_some_and(|a| a.get().is_some())
            });
            if matches!(state, SlotState::Waiting) {
                // Out of the queue first: nobody can hand it an instance after that.
                let mut sched = lock(&self.sched);
                sched.pool(key).queue.retain(|s| !Arc::ptr_eq(s, &slot));
                drop(sched);
                state = slot.take();
            }
            match state {
                SlotState::Ready(inst) => return Ok((*inst, Start::Warm, function)),
                SlotState::Retry => retried = true,
                // Taken back: the check at the top of the loop says why.
                SlotState::GaveUp if abandon.is_some_and(|a| a.get().is_some()) => {}
                SlotState::GaveUp if cancel.is_some_and(|c| c.fired()) => {
                    return Err(Error::Cancelled {
                        function: name.to_owned(),
                    })
                }
                SlotState::GaveUp => {
                    return Err(Error::QueueTimeout {
                        function: name.to_owned(),
                        waited_ms: waited.elapsed().as_millis() as u64,
                        max_instances: function.max_instances,
                    })
                }
                SlotState::Closed | SlotState::Waiting => return Err(Error::ShuttingDown),
            }
        }
    }

    /// Counts an instance of `key` as gone and lets a waiter start a replacement.
    fn forget_instance(&self, key: &FunctionKey) {
        let mut sched = lock(&self.sched);
        let pool = sched.pool(key);
        pool.live -= 1;
        if let Some(slot) = pool.queue.pop_front() {
            slot.retry();
        }
    }

    /// Gives an instance back after an invocation: to the head of its function's
    /// queue, to the idle list, or (unhealthy, outdated, not kept warm) to the spawner.
    pub(crate) fn release(&self, inst: Instance, healthy: bool) {
        self.give_back(inst, healthy, false)
    }

    /// [`Inner::release`] for an instance handed back by [`CallOpts::hand_back`]:
    /// it leaves its run first, and stops counting as returning.
    pub(crate) fn release_returning(&self, inst: Instance, run: &Arc<Run>, healthy: bool) {
        let healthy = self.leave_run(&inst, run, healthy);
        self.give_back(inst, healthy, true)
    }

    fn give_back(&self, mut inst: Instance, healthy: bool, returning: bool) {
        let current = lock(&self.functions).get(&inst.function).map(|f| f.version);
        let keep = healthy
            && self.config.keep_warm
            && !self.shutting_down.load(Ordering::SeqCst)
            && current == Some(inst.function_version)
            && self.callees_current(inst.sandbox.id());
        if !keep {
            let name = inst.function.clone();
            self.destroy(inst);
            if returning {
                let mut sched = lock(&self.sched);
                let pool = sched.pool(&name);
                pool.returning = pool.returning.saturating_sub(1);
            }
            self.forget_instance(&name);
            return;
        }
        let now = Instant::now();
        inst.last_used = now;
        let mut sched = lock(&self.sched);
        let pool = sched.pool(&inst.function);
        if returning {
            pool.returning = pool.returning.saturating_sub(1);
        }
        if let Some(slot) = pool.queue.pop_front() {
            return slot.give(inst);
        }
        pool.idle.push(inst);
        // Wake the manager only if it would otherwise look later than this
        // instance's pause grace.
        let freeze_at = now + self.config.pool.pause_grace;
        if sched.manager_deadline.is_none_or(|d| d > freeze_at) {
            sched.manager_deadline = Some(freeze_at);
            self.wake.notify_all();
        }
    }

    /// Turns a failed call into its error.
    pub(crate) fn failure(
        &self,
        inst: &Instance,
        function: &Function,
        failure: CallFailure,
        logs: Logs,
    ) -> Error {
        let name = function.name.clone();
        match failure {
            CallFailure::TimedOut => Error::Timeout {
                function: name,
                timeout_ms: function.timeout_ms,
                logs,
            },
            CallFailure::Died if self.cgroups.oom_kills(inst.sandbox.cgroup()).unwrap_or(0) > 0 => {
                Error::OutOfMemory {
                    function: name,
                    limit_mb: function.memory_mb,
                    logs,
                }
            }
            CallFailure::Died => Error::InstanceDied {
                function: name,
                sandbox: inst.sandbox.id().to_owned(),
                pid: inst.pid,
                logs,
            },
            CallFailure::Cancelled => Error::Cancelled { function: name },
            CallFailure::Failed(message) => Error::CallFailed {
                function: name,
                message,
            },
            CallFailure::Protocol(source) => Error::Protocol {
                sandbox: inst.sandbox.id().to_owned(),
                peer: "instance",
                source,
            },
            CallFailure::Raised(error) => Error::Handler {
                function: name,
                error,
                logs,
            },
        }
    }

    /// A new sandbox with its shim and zygote up, bound to nothing, not frozen.
    pub fn new_stem_cell(&self) -> Result<StemCell, Error> {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let id = format!("sprout-{}-{}", self.agent_id, n);
        let cgroup = self.cgroup_parent.join(&id);
        let bundle = self.bundles.join(&id);
        let defaults = &self.config.defaults;
        // Its own host user, held until the sandbox is destroyed (a bitmap slot).
        let user = self.sandbox_users.assign(&id).map_err(|e| Error::State {
            path: PathBuf::from("sandbox uids"),
            source: std::io::Error::other(e.to_string()),
        })?;
        rootfs::bundle_spec_as(
            &SandboxConfig {
                id: id.clone(),
                root: self.skeleton.path().to_path_buf(),
                cgroups_path: cgroup.clone(),
                runtime_dir: self.runtime_dir.clone(),
                shim: self.config.shim.clone(),
                code: None,
                limits: Limits {
                    memory_bytes: defaults.memory_mb << 20,
                    pids: defaults.pids,
                    cpus: defaults.cpus,
                },
                env: Vec::new(),
            },
            user,
        )
        .and_then(|spec| rootfs::write_bundle(&bundle, &spec))
        .map_err(|e| {
            self.sandbox_users.release(&id);
            Error::State {
                path: bundle.clone(),
                source: std::io::Error::other(ipc::chain(&e)),
            }
        })?;
        // The shim's and zygote's output: the agent reads it, nothing of the host's.
        let (output, output_end) = crate::sandbox_output::pipe().map_err(|e| {
            self.sandbox_users.release(&id);
            state_err(Path::new("sandbox output pipe"))(e)
        })?;
        let created = self
            .spawner
            .create(&id, &bundle, cgroup, &self.cgroups, output_end);
        // libcontainer keeps its own copy of the spec; the bundle is not needed any more.
        let _ = std::fs::remove_dir_all(&bundle);
        if created.is_err() {
            // The spawner destroys a sandbox it could not start.
            self.sandbox_users.release(&id);
        }
        let (mut sandbox, mut shim) = created?;
        self.output.add(&id, output);
        self.sandboxes.fetch_add(1, Ordering::Relaxed);
        self.reserved_mb
            .fetch_add(defaults.memory_mb, Ordering::Relaxed);
        let booted = shim
            .0
            .stream()
            .set_read_timeout(Some(BOOT_TIMEOUT))
            .map_err(ipc::Error::Io)
            .and_then(|()| shim.wait_ready())
            .and_then(|_| {
                shim.0
                    .stream()
                    .set_read_timeout(None)
                    .map_err(ipc::Error::Io)
            });
        if let Err(source) = booted {
            self.destroy_sandbox(&mut sandbox, defaults.memory_mb);
            return Err(Error::Protocol {
                sandbox: id,
                peer: "shim",
                source,
            });
        }
        sandbox.ready()?;
        Ok(StemCell {
            sandbox,
            shim,
            reserved_mb: defaults.memory_mb,
        })
    }

    /// A loaded instance of `function` in `stem` (or in a new sandbox): thaw, set the
    /// function's limits, make its code visible, fork the instance from the zygote,
    /// wait until it imported the handler (within the function's timeout).
    fn start_instance(
        &self,
        function: &Function,
        stem: Option<StemCell>,
    ) -> Result<Instance, Error> {
        let from_stem_cell = stem.is_some();
        let StemCell {
            mut sandbox,
            mut shim,
            mut reserved_mb,
        } = match stem {
            Some(stem) => stem,
            None => self.new_stem_cell()?,
        };
        let span = tracing::debug_span!("start_instance", namespace = %function.namespace, function = %function.name, sandbox_id = %sandbox.id());
        let _g = span.enter();
        let id = sandbox.id().to_owned();
        let prepared = (|| -> Result<(), Error> {
            sandbox.thaw()?;
            if function.has_own_limits(&self.config.defaults) {
                let resources =
                    rootfs::resources(&function.limits()).map_err(|e| Error::State {
                        path: PathBuf::from(sandbox.cgroup()),
                        source: std::io::Error::other(ipc::chain(&e)),
                    })?;
                sandbox.set_limits(&resources)?;
                self.reserved_mb
                    .fetch_add(function.memory_mb, Ordering::Relaxed);
                self.reserved_mb.fetch_sub(reserved_mb, Ordering::Relaxed);
                reserved_mb = function.memory_mb;
            }
            self.spawner.bind_code(&sandbox, &function.dir)?;
            tracing::debug!("code bound");
            Ok(())
        })();
        if from_stem_cell {
            // Only now wake the manager to refill: the spawner serves one request at
            // a time, and a new sandbox built ahead of this cold start's code attach
            // made the attach wait for it (a 4 ms start took ~25 ms).
            self.wake.notify_all();
        }
        if let Err(e) = prepared {
            self.destroy_sandbox(&mut sandbox, reserved_mb);
            return Err(e);
        }
        let instance = self.next_id.fetch_add(1, Ordering::Relaxed);
        let spawned = match shim.spawn_instance(instance, Runtime::Python) {
            Ok(Ok(s)) => {
                tracing::debug!(pid = s.pid, "instance handed over");
                s
            }
            Ok(Err(message)) => {
                self.destroy_sandbox(&mut sandbox, reserved_mb);
                return Err(Error::Spawn {
                    sandbox: id,
                    function: function.name.clone(),
                    message,
                });
            }
            Err(source) => {
                self.destroy_sandbox(&mut sandbox, reserved_mb);
                return Err(Error::Protocol {
                    sandbox: id,
                    peer: "shim",
                    source,
                });
            }
        };
        let outputs =
            Output::new(spawned.stdout).and_then(|o| Ok((o, Output::new(spawned.stderr)?)));
        let (stdout, stderr) = match outputs {
            Ok(o) => o,
            Err(source) => {
                self.destroy_sandbox(&mut sandbox, reserved_mb);
                return Err(Error::Protocol {
                    sandbox: id,
                    peer: "instance",
                    source: ipc::Error::Io(source),
                });
            }
        };
        if let Err(e) = sandbox.bind(&function.key().to_string()) {
            self.destroy_sandbox(&mut sandbox, reserved_mb);
            return Err(e.into());
        }
        self.output.bind(sandbox.id(), &function.key().to_string());
        lock(&self.bound).insert(
            sandbox.id().to_owned(),
            BoundSandbox {
                function: Arc::new(function.clone()),
                attached: Default::default(),
            },
        );
        // Once per instance, so that no invoke pays for it.
        let oom = self
            .cgroups
            .watch_oom(sandbox.cgroup())
            .map_err(|e| {
                tracing::warn!(sandbox_id = sandbox.id(), error = %ipc::chain(&e), "no OOM notification; an OOM is seen when the channel closes")
            })
            .ok();
        let mut inst = Instance {
            sandbox,
            shim,
            link: InstanceLink(spawned.channel),
            pid: spawned.pid,
            function: function.key(),
            function_version: function.version,
            reserved_mb,
            last_used: Instant::now(),
            stdout,
            stderr,
            called: false,
            oom,
        };
        let load = LoadSpec {
            function: function.name.clone(),
            code_dir: rootfs::CODE_DIR.to_owned(),
            handler: function.handler.clone(),
        };
        let loaded = inst
            .link
            .send_load(&load)
            .map_err(CallFailure::Protocol)
            .and_then(|()| {
                inst.wait_loaded(Instant::now() + Duration::from_millis(function.timeout_ms))
            });
        match loaded {
            Ok(()) => Ok(inst),
            Err(CallFailure::Raised(error)) => {
                self.destroy(inst);
                Err(Error::LoadFailed {
                    function: function.name.clone(),
                    handler: function.handler.to_string(),
                    error,
                })
            }
            Err(failure) => {
                let logs = inst.take_logs();
                let err = self.failure(&inst, function, failure, logs);
                self.destroy(inst);
                Err(err)
            }
        }
    }

    /// Takes the idle instances and stem cells whose sandboxes died with a spawner
    /// out of the pool (so the next request gets a fresh sandbox), lets a waiter
    /// start a replacement for each, and wakes the manager to refill.
    fn forget_gone_sandboxes(&self) {
        let (idle, stems) = {
            let mut sched = lock(&self.sched);
            let mut idle = Vec::new();
            for pool in sched.functions.values_mut() {
                let gone: Vec<Instance> = pool
                    .idle
                    .extract_if(.., |i| self.spawner.is_gone(i.sandbox.id()))
                    .collect();
                pool.live -= gone.len();
                for _ in 0..gone.len() {
                    if let Some(slot) = pool.queue.pop_front() {
                        slot.retry();
                    }
                }
                idle.extend(gone);
            }
            let stems: Vec<StemCell> = sched
                .stem_cells
                .extract_if(.., |s| self.spawner.is_gone(s.sandbox.id()))
                .collect();
            (idle, stems)
        };
        tracing::warn!(
            instances = idle.len(),
            stem_cells = stems.len(),
            "dropped the sandboxes of a dead spawner from the pool"
        );
        for inst in idle {
            self.destroy(inst);
        }
        for mut stem in stems {
            self.destroy_sandbox(&mut stem.sandbox, stem.reserved_mb);
        }
        let _sched = lock(&self.sched);
        self.wake.notify_all();
    }

    pub fn destroy(&self, mut inst: Instance) {
        self.destroy_sandbox(&mut inst.sandbox, inst.reserved_mb);
    }

    pub fn destroy_sandbox(&self, sandbox: &mut Sandbox, reserved_mb: u64) {
        lock(&self.bound).remove(sandbox.id());
        self.calls.forget(sandbox.id());
        if let Some(run) = lock(&self.runs).remove(sandbox.id()) {
            if run.is_root(sandbox.id()) {
                run.cancel.fire(); // its calls in flight are of no use any more
            }
        }
        match self.spawner.destroy(sandbox) {
            // After shutdown the spawner destroyed every sandbox on its way out.
            Ok(()) | Err(pool::Error::Stopped) => {
                // Its processes are gone: its uid may go to another sandbox.
                self.sandbox_users.release(sandbox.id());
            }
            Err(e) => {
                // Its processes may live on: its uid stays out of use.
                tracing::error!(sandbox_id = sandbox.id(), error = %ipc::chain(&e), "destroy sandbox")
            }
        }
        self.output.remove(sandbox.id());
        self.sandboxes.fetch_sub(1, Ordering::Relaxed);
        self.reserved_mb.fetch_sub(reserved_mb, Ordering::Relaxed);
    }
}

/// Whether a mount operation that keeps a sandbox fit for the pool worked; a failure
/// is logged (and the caller destroys the sandbox).
fn fit_for_pool(sandbox_id: &str, what: &str, done: Result<(), pool::Error>) -> bool {
    if let Err(e) = &done {
        tracing::warn!(sandbox_id, error = %ipc::chain(e), "{what}; destroying the sandbox");
    }
    done.is_ok()
}

/// The one "no such function" error, for a client and a calling function alike: it
/// names the name and the namespace asked in, and says nothing about others.
fn not_found(key: &FunctionKey) -> Error {
    not_found_in(&key.namespace, &key.name)
}

fn not_found_in(namespace: &str, name: &str) -> Error {
    Error::NotFound {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    }
}

fn remove_owned_dir(f: &Function) {
    if f.owns_dir {
        let _ = std::fs::remove_dir_all(&f.dir);
    }
}
