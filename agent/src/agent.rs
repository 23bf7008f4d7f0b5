//! The agent: the composition root. [`Agent`] builds the components, starts their
//! threads (the pool manager, the call socket, the spawner watch), routes each
//! [`Request`] to the component that serves it, reports status and shuts down.
//!
//! | component | owns |
//! |---|---|
//! | [`Registry`] | registered functions and workflows (kept in a [`Store`] with a data directory) |
//! | [`Scheduler`] | per-function idle instances, counts and queues; stem cells by runtime |
//! | [`Sandboxes`] | spawner, skeleton, cgroups, state dir, sandbox users, output reader, memory accounting |
//! | [`Runs`] | bound sandboxes, the callees attached in them, workflow runs |
//! | [`Book`] | each sandbox's invocation session, calls in flight, call connections |
//! | [`Invoker`] | nothing locked: invoke, complete, release, retire, destroy, the warm path |
//! | [`Policy`] | which package zygotes to keep: demand per package set, the budget |
//!
//! **Lock order.** A lock is only taken while holding locks above it in this list:
//!
//! 1. `Runs::attaching` (one callee attach at a time; held across the spawner's mount)
//! 2. `Scheduler::state` (the scheduler's lock, with its manager condvar)
//! 3. `Runs::bound` (taken under 2 by retire's "calls it" check)
//! 4. `Registry::functions` (taken under 3 by `Runs::callees_current`)
//!
//! `Registry::writes` (a registration's or removal's commit to the registrations
//! store until the maps agree with it) is taken above 4 and `Registry::workflows`,
//! and never while holding 1-4; the store's connection lock is a leaf taken under
//! it (no SQLite write happens under 1-4).
//!
//! Leaves, under which no other component's lock is taken: `Registry::workflows`,
//! the package zygote policy's lock, the package fork servers' own locks,
//! `Runs::runs`, the call book's lock, a queued request's `Slot` (given under 2), and
//! a `Cancel`'s (fired under `Runs::runs`, the book's lock, or asked from a `Slot`
//! wait). No component calls out to another while holding its own lock, except as
//! listed.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use ipc::api::{FunctionInfo, NamespaceStatus, Status};
use parking_lot::Mutex;
use pool::CgroupVersion;

use crate::calls::book::Book;
use crate::config::Config;
use crate::data_dir::DataDir;
use crate::error::Error;
use crate::invoke::Invoker;
use crate::names::{validate_namespace, FunctionKey};
use crate::registrations::Store;
use crate::registry::{remove_owned_dir, Registry};
use crate::request::{Request, Response};
use crate::runs::Runs;
use crate::runtime::Runtime;
use crate::sandboxes::{state_err, Sandboxes};
use crate::scheduler::{Abandon, Scheduler};
use crate::transport::FastCall;
use crate::zygotes::Policy;

/// A running node agent. Create it with [`Agent::start`] (from any thread); share
/// it (`Arc<Agent>`) across threads; end it with [`Agent::shutdown`].
#[derive(Debug)]
pub struct Agent {
    config: Config,
    registry: Arc<Registry>,
    scheduler: Arc<Scheduler>,
    sandboxes: Arc<Sandboxes>,
    runs: Arc<Runs>,
    book: Arc<Book>,
    invoker: Arc<Invoker>,
    started: Instant,
    /// What outlives the process; locked while the agent runs (taken by shutdown).
    data: Mutex<Option<DataDir>>,
    manager: Mutex<Option<JoinHandle<()>>>,
    calls: Mutex<Option<JoinHandle<()>>>,
    /// Watches the spawner and cleans up after its death.
    spawner_watch: Mutex<Option<JoinHandle<()>>>,
}

fn spawn_thread(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, Error> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|source| Error::State {
            path: PathBuf::from(format!("{name} thread")),
            source,
        })
}

impl Agent {
    /// Cleans up after crashed agents, takes a state directory, starts the spawner
    /// (the `sprout-spawner` executable: [`Config::spawner`]) and (with `keep_warm`)
    /// the pool manager thread. May be called from any thread.
    pub fn start(config: Config) -> Result<Agent, Error> {
        // First, so that a second agent on the same data directory changes nothing.
        let data = match &config.data_dir {
            Some(path) => {
                crate::data_dir::check_apart(path, &config.state_root)?;
                Some(DataDir::open(path)?)
            }
            None => None,
        };
        // The registrations it keeps, read (and uploaded code no row names removed)
        // before anything is started: a store this build cannot read stops it here.
        let (store, stored) = match &data {
            Some(data) => {
                let store = Store::open(&data.registrations())?;
                let stored = store.load()?;
                let removed =
                    crate::registrations::remove_unreferenced(&data.code(), stored.code())?;
                if !removed.is_empty() {
                    tracing::info!(removed = ?removed, "uploaded code no registration names removed");
                }
                (Some(store), Some(stored))
            }
            None => (None, None),
        };
        let uploads = data.as_ref().map(DataDir::code);
        let sandboxes = Arc::new(Sandboxes::start(&config)?);
        tracing::info!(agent_id = sandboxes.agent_id(), state_dir = %sandboxes.state_path().display(), "agent started");
        let runtime_dir = sandboxes.runtime_dir();
        let call_listener = crate::calls::bind(runtime_dir)?;
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
        // Without a data directory (the embedded CLI), uploads live as long as the
        // process, in its state directory.
        let uploads = uploads.unwrap_or_else(|| sandboxes.state_path().join("functions"));
        let package_cache = match &data {
            Some(data) => data.packages(),
            None => config.package_cache.clone(),
        };
        let packages = Arc::new(crate::packages::Packages::open(
            &package_cache,
            Box::new(crate::sandboxes::SandboxInstaller(sandboxes.clone())),
            config.install_limits,
            config.package_sources.clone(),
            sandboxes.agent_id(),
        ));
        let registry = Arc::new(Registry::new(
            config.clone(),
            uploads,
            packages.clone(),
            store,
        ));
        if let Some(stored) = stored {
            let (functions, workflows) = registry.restore(stored);
            tracing::info!(functions, workflows, "registrations restored");
        }
        let scheduler = Arc::new(Scheduler::default());
        let runs = Arc::new(Runs::default());
        let book = Arc::new(Book::default());
        let zygotes = Arc::new(Policy::new(
            match sandboxes.package_zygotes_on() {
                true => config.pool.package_zygotes_mb,
                false => 0,
            },
            sandboxes.package_headroom_mb(),
            config.pool.idle_ttl,
        ));
        let headroom_mb = sandboxes.package_headroom_mb();
        if sandboxes.package_zygotes_on() && headroom_mb >= config.pool.package_zygotes_mb {
            tracing::warn!(
                package_zygotes_mb = config.pool.package_zygotes_mb,
                headroom_mb,
                "--package-zygotes-mb holds no package zygote: each counts at its memory and this headroom"
            );
        }
        let invoker = Arc::new(Invoker::new(
            config.clone(),
            registry.clone(),
            scheduler.clone(),
            sandboxes.clone(),
            runs.clone(),
            book.clone(),
            zygotes.clone(),
        ));
        let manager = if config.keep_warm {
            let (scheduler, sandboxes, invoker) =
                (scheduler.clone(), sandboxes.clone(), invoker.clone());
            let (pool, stem_mb) = (config.pool, config.defaults.memory_mb);
            Some(spawn_thread("sprout-pool", move || {
                crate::manager::run(&scheduler, &sandboxes, &zygotes, &pool, stem_mb, |inst| {
                    invoker.destroy(inst)
                })
            })?)
        } else {
            None
        };
        let calls = {
            let parts = crate::calls::Parts {
                invoker: invoker.clone(),
                registry: registry.clone(),
                runs: runs.clone(),
                sandboxes: sandboxes.clone(),
                book: book.clone(),
                max_calls_in_flight: config.max_calls_in_flight.max(1),
            };
            spawn_thread("sprout-calls", move || {
                crate::calls::serve(&Arc::new(parts), call_listener)
            })?
        };
        let spawner_watch = {
            let (sandboxes, invoker) = (sandboxes.clone(), invoker.clone());
            spawn_thread("sprout-spawner-watch", move || {
                while sandboxes.watch_spawner() {
                    invoker.forget_gone_sandboxes();
                }
            })?
        };
        Ok(Agent {
            config,
            registry,
            scheduler,
            sandboxes,
            runs,
            book,
            invoker,
            started: Instant::now(),
            data: Mutex::new(data),
            manager: Mutex::new(manager),
            calls: Mutex::new(Some(calls)),
            spawner_watch: Mutex::new(Some(spawner_watch)),
        })
    }

    /// Destroys every sandbox, stops the spawner and removes the agent's state.
    /// Requests in flight fail, waiting ones and new ones get
    /// [`Error::ShuttingDown`]. Only the first call does anything.
    pub fn shutdown(&self) -> Result<(), Error> {
        if !self.scheduler.close() {
            return Ok(());
        }
        self.book.stop();
        if let Some(manager) = self.manager.lock().take() {
            let _ = manager.join();
        }
        self.book.wake_for_shutdown();
        if let Some(calls) = self.calls.lock().take() {
            let _ = calls.join();
        }
        let (idle, stems) = self.scheduler.drain();
        for inst in idle {
            self.invoker.destroy(inst);
        }
        for stem in stems {
            self.invoker.destroy_stem_cell(stem);
        }
        self.registry.remove_owned_dirs();
        // The spawner destroys sandboxes still in use by in-flight requests.
        let stopped = self.sandboxes.stop_spawner();
        if let Some(watch) = self.spawner_watch.lock().take() {
            let _ = watch.join();
        }
        stopped?;
        self.sandboxes.remove_state()?;
        // Unlocks the data directory for the next agent.
        drop(self.data.lock().take());
        tracing::info!(agent_id = %self.sandboxes.agent_id(), "agent stopped");
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
        abandon: Option<&Abandon>,
    ) -> Result<Response, Error> {
        if self.scheduler.is_closed() {
            return Err(Error::ShuttingDown);
        }
        match req {
            Request::RegisterFunction {
                namespace,
                name,
                source,
                config,
            } => {
                let key = FunctionKey::new(&namespace, &name)?;
                let (info, old) = self.registry.register(&key, source, &config)?;
                if let Some(old) = old {
                    self.invoker.retire(&key);
                    remove_owned_dir(&old);
                }
                tracing::info!(function = %key, handler = %info.handler, path = %info.path, "function registered");
                Ok(Response::Registered(info))
            }
            Request::ListFunctions { namespace } => {
                validate_namespace(&namespace)?;
                Ok(Response::Functions(self.list(&namespace)))
            }
            Request::RemoveFunction { namespace, name } => {
                let key = FunctionKey::new(&namespace, &name)?;
                // Its row is gone first: a crash now leaves only code no row names.
                if let Some(f) = self.registry.remove(&key)? {
                    self.invoker.retire(&key);
                    remove_owned_dir(&f);
                }
                tracing::info!(function = %key, "function removed");
                Ok(Response::Removed { namespace, name })
            }
            Request::Invoke {
                namespace,
                name,
                event,
            } => self
                .invoker
                .invoke(&FunctionKey::new(&namespace, &name)?, event, abandon)
                .map(Response::Invoked),
            Request::Run {
                namespace,
                name,
                run,
            } => self
                .invoker
                .run(&FunctionKey::new(&namespace, &name)?, &run, abandon)
                .map(Response::Invoked),
            Request::Status => Ok(Response::Status(self.status())),
            Request::ListPackages => {
                let users = self.package_users();
                let listed = self
                    .registry
                    .packages()
                    .list(&users)
                    .map_err(packages_err)?;
                Ok(Response::Packages(listed))
            }
            Request::CollectPackages => {
                // In use: what registered functions, live sandboxes (a retired
                // version's included) and live package zygotes have mounted, asked
                // once no registration is under way.
                let in_use = || {
                    let mut keys: std::collections::HashSet<String> = self
                        .package_users()
                        .into_iter()
                        .flat_map(|(_, keys)| keys)
                        .collect();
                    for f in self.runs.bound_functions() {
                        keys.extend(f.deps.keys().map(str::to_owned));
                    }
                    keys.extend(self.sandboxes.package_zygote_keys());
                    keys
                };
                let removed = self
                    .registry
                    .packages()
                    .remove_unused(in_use)
                    .map_err(packages_err)?;
                tracing::info!(removed = removed.len(), "unused packages removed");
                Ok(Response::Packages(removed))
            }
            Request::RegisterWorkflow {
                namespace,
                name,
                workflow,
            } => self
                .registry
                .register_workflow(&FunctionKey::new(&namespace, &name)?, workflow)
                .map(Response::WorkflowRegistered),
            Request::ListWorkflows { namespace } => {
                validate_namespace(&namespace)?;
                Ok(Response::Workflows(
                    self.registry.list_workflows(&namespace),
                ))
            }
            Request::RemoveWorkflow { namespace, name } => self
                .registry
                .remove_workflow(&FunctionKey::new(&namespace, &name)?)
                .map(|()| Response::Removed { namespace, name }),
            Request::RunWorkflow {
                namespace,
                name,
                input,
            } => crate::workflow::run(
                &self.invoker,
                &self.registry,
                &self.config,
                &FunctionKey::new(&namespace, &name)?,
                &input,
            )
            .map(Response::WorkflowRan),
        }
    }

    /// The functions of `namespace`, by name.
    fn list(&self, namespace: &str) -> Vec<FunctionInfo> {
        let functions = self.registry.in_namespace(namespace);
        let idle = self.scheduler.idle_counts(&functions);
        let mut list: Vec<_> = functions
            .iter()
            .zip(idle)
            .map(|(f, idle)| f.info(idle))
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    fn status(&self) -> Status {
        let namespaces = self.namespaces();
        let counts = self.scheduler.counts();
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            cgroup: match self.sandboxes.cgroup_version() {
                CgroupVersion::V1 => "v1".to_owned(),
                CgroupVersion::V2 => "v2".to_owned(),
            },
            functions: self.registry.len(),
            sandboxes: self.sandboxes.count(),
            stem_cells: counts.stem_cells,
            stem_cells_by_runtime: Runtime::ALL
                .into_iter()
                .zip(counts.stem_cells_by_runtime)
                .map(|(r, n)| (r.name().to_owned(), n))
                .collect(),
            sandboxes_forked: self.sandboxes.made().0,
            sandboxes_created: self.sandboxes.made().1,
            frozen: counts.frozen,
            queued: counts.queued,
            reserved_mb: self.sandboxes.reserved_mb(),
            memory_budget_mb: self.config.pool.memory_budget_mb,
            invocations: self.invoker.invocations(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            packages_installed: self.registry.packages().installed(),
            package_cache_hits: self.registry.packages().cache_hits(),
            package_zygotes: self.sandboxes.package_zygote_count(),
            namespaces,
        }
    }

    /// Every registered function (`namespace/name`) with the cache keys of its
    /// packages.
    fn package_users(&self) -> Vec<(String, Vec<String>)> {
        self.registry
            .all_functions()
            .into_iter()
            .map(|f| {
                (
                    f.key().to_string(),
                    f.deps.keys().map(str::to_owned).collect(),
                )
            })
            .collect()
    }

    /// Each namespace with a function or a workflow: what it has registered, and
    /// its sandboxes.
    fn namespaces(&self) -> Vec<NamespaceStatus> {
        let mut by_ns: std::collections::BTreeMap<String, NamespaceStatus> = Default::default();
        let (functions, workflows) = self.registry.namespaces();
        let sandboxes = self.runs.namespaces();
        let mut add = |ns: String, which: fn(&mut NamespaceStatus)| {
            let e = by_ns.entry(ns.clone()).or_insert_with(|| NamespaceStatus {
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
}

impl crate::transport::Handle for Agent {
    fn handle(&self, req: Request) -> Result<Response, Error> {
        Agent::handle(self, req)
    }

    fn handle_abandonable(&self, req: Request, abandon: &Abandon) -> Result<Response, Error> {
        Agent::handle_abandonable(self, req, Some(abandon))
    }

    fn start_fast(&self, req: &Request) -> Option<Box<dyn FastCall>> {
        match req {
            Request::Invoke {
                namespace,
                name,
                event,
            } => self
                .invoker
                .start_fast(namespace, name, event, None)
                .map(|c| Box::new(c) as Box<dyn FastCall>),
            Request::Run {
                namespace,
                name,
                run,
            } => self
                .invoker
                .start_fast(namespace, name, &run.body, Some(run))
                .map(|c| Box::new(c) as Box<dyn FastCall>),
            _ => None,
        }
    }
}

fn packages_err(source: crate::packages::Error) -> Error {
    Error::PackageCache(Box::new(source))
}
