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
//! | [`Admission`] | per-namespace limits: invocations in flight and per minute |
//! | [`Metrics`] | what the node counts: invocations, usage, latencies, refusals |
//! | [`Activations`] | activation records: the store's writer thread (`sprout-records`) and read connection |
//! | [`AsyncRunner`] | accepted asynchronous activations and the threads (`sprout-async-N`) that run them |
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
//! Leaves, under which no other component's lock is taken: the record store's locks
//! (its queue's sender, its read connection), the async runner's queue,
//! `Registry::workflows`,
//! the admission's locks (its namespace map, then one namespace's window), the
//! metrics' maps,
//! the package zygote policy's lock, the package fork servers' own locks,
//! `Runs::runs`, the call book's lock, a queued request's `Slot` (given under 2), and
//! a `Cancel`'s (fired under `Runs::runs`, the book's lock, or asked from a `Slot`
//! wait). No component calls out to another while holding its own lock, except as
//! listed.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use ipc::api::{ActivationId, FunctionInfo, NamespaceStatus, Status};
use parking_lot::Mutex;
use pool::CgroupVersion;

use crate::activations::{Accepted, Activations, Lookup};
use crate::admission::{Admission, Ticket};
use crate::async_invoke::AsyncRunner;
use crate::calls::book::Book;
use crate::config::Config;
use crate::data_dir::DataDir;
use crate::error::Error;
use crate::invoke::{CallOpts, Invoker};
use crate::metrics::{Gauges, Metrics, SandboxStates};
use crate::names::{validate_namespace, FunctionKey};
use crate::openwhisk::invoker::WhiskInvoker;
use crate::registrations::Store;
use crate::registry::{remove_owned_dir, Registry};
use crate::request::{ActivationPart, Request, Response};
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
    admission: Admission,
    metrics: Arc<Metrics>,
    activations: Arc<Activations>,
    asyncs: AsyncRunner,
    /// The OpenWhisk invoker contract (`Request::Invoker`).
    whisk_invoker: WhiskInvoker,
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
        // Before anything runs: rows an earlier agent accepted and did not finish are
        // recorded as lost now, never run again.
        let activations = Arc::new(match &data {
            Some(data) if !config.no_records => {
                Activations::open(&data.activations(), config.activations)?
            }
            _ => Activations::off(),
        });
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
        let whisk_invoker = WhiskInvoker::start(config.openwhisk_invoker.clone())
            .map_err(|e| Error::InvalidConfig(ipc::chain(&e)))?;
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
        let scheduler = Arc::new(Scheduler::new(config.max_queue));
        let metrics = Arc::new(Metrics::new());
        let admission = Admission::new(config.namespace_limits.clone(), metrics.clone());
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
            metrics.clone(),
            activations.clone(),
        ));
        let asyncs = AsyncRunner::start(config.async_workers, config.max_queue, invoker.clone())?;
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
            admission,
            metrics,
            activations,
            asyncs,
            whisk_invoker,
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
        // Accepted work not started is recorded as not run; then every record handed
        // over is committed before the data directory is let go.
        self.asyncs.stop();
        self.activations.close();
        self.whisk_invoker.stop();
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
                activation_id,
                blocking: false,
            } => {
                let key = FunctionKey::new(&namespace, &name)?;
                self.accept(&key, event, activation_id, None)
            }
            Request::Invoke {
                namespace,
                name,
                event,
                activation_id,
                blocking: true,
            } => {
                let key = FunctionKey::new(&namespace, &name)?;
                let _ticket = self.admit(&key)?;
                let opts = CallOpts {
                    activation: activation_id,
                    ..CallOpts::default()
                };
                self.invoker
                    .invoke(&key, event, &opts, abandon)
                    .map(Response::Invoked)
            }
            Request::Run {
                namespace,
                name,
                run,
                activation_id,
            } => {
                let key = FunctionKey::new(&namespace, &name)?;
                let _ticket = self.admit(&key)?;
                let opts = CallOpts {
                    activation: activation_id,
                    ..CallOpts::default()
                };
                self.invoker
                    .run(&key, &run, &opts, abandon)
                    .map(Response::Invoked)
            }
            Request::GetActivation {
                namespace,
                id,
                part,
            } => self.activation(namespace.as_deref(), id, part),
            Request::ListActivations { mut query } => {
                if let Some(ns) = &query.namespace {
                    validate_namespace(ns)?;
                }
                query.limit = query.limit.min(crate::activations::MAX_LIMIT);
                let list = self.activations.list(&query).ok_or(Error::RecordsOff)??;
                Ok(Response::Activations(list))
            }
            Request::PutAction {
                namespace,
                name,
                action,
                overwrite,
            } => self.put_action(&namespace, &name, &action, overwrite),
            Request::GetAction { namespace, name } => self.get_action(&namespace, &name),
            Request::ListActions {
                namespace,
                limit,
                skip,
            } => self.list_actions(&namespace, limit, skip),
            Request::DeleteAction { namespace, name } => self.delete_action(&namespace, &name),
            Request::InvokeAction {
                namespace,
                name,
                call,
            } => {
                let act = self.action_invocation(&namespace, &name, *call)?;
                self.handle_abandonable(Request::Activate(Box::new(act)), abandon)
            }
            Request::WhiskActivations { mut query, docs } => {
                if let Some(ns) = &query.namespace {
                    validate_namespace(ns)?;
                }
                query.limit = query.limit.min(crate::activations::MAX_LIMIT);
                let list = self.activations.list(&query).ok_or(Error::RecordsOff)??;
                Ok(Response::WhiskActivations(
                    list.iter().map(|r| self.whisk(r, docs)).collect(),
                ))
            }
            Request::GetWhiskActivation { namespace, id } => {
                match self.activation(namespace.as_deref(), id, ActivationPart::Record)? {
                    Response::Activation(record) => {
                        Ok(Response::Activated(Box::new(self.whisk(&record, true))))
                    }
                    _ => unreachable!("a record part answers a record"),
                }
            }
            Request::Activate(activate) => self.activate(*activate, abandon),
            Request::Invoker(msg) => {
                let run = |req| self.handle_abandonable(req, abandon);
                Ok(Response::Acknowledged(Box::new(
                    self.whisk_invoker.acknowledge(*msg, &run),
                )))
            }
            Request::Status => Ok(Response::Status(self.status())),
            Request::Usage { namespace } => {
                validate_namespace(&namespace)?;
                Ok(Response::Usage(self.metrics.usage(&namespace)))
            }
            Request::Metrics => {
                // Records held, read at scrape time (one indexed count).
                match self.activations.count() {
                    Some(Ok(n)) => self.metrics.set_activations_stored(n),
                    Some(Err(e)) => {
                        tracing::warn!(error = %ipc::chain(&e), "cannot count activation records")
                    }
                    None => {}
                }
                Ok(Response::Metrics(self.metrics.encode(self.gauges())))
            }
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
            } => {
                // One run is one admission: its steps are not admitted again.
                let key = FunctionKey::new(&namespace, &name)?;
                let _ticket = self.admit(&key)?;
                crate::workflow::run(&self.invoker, &self.registry, &self.config, &key, &input)
                    .map(Response::WorkflowRan)
            }
        }
    }

    /// Admits a client's invocation of `key` (or workflow run) past its namespace's
    /// limits ([`Admission`]): it is in flight until the ticket is dropped, on any
    /// thread. Asked once per client invocation, before it is queued; a refusal
    /// (`429`) leaves nothing behind.
    pub fn admit(&self, key: &FunctionKey) -> Result<Ticket, Error> {
        self.admission.admit(key)
    }

    /// The node's metrics (counters the record store may set, too).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// What the components know now, for `GET /status` and `GET /metrics`.
    fn gauges(&self) -> Gauges {
        let (per_function, held) = self.scheduler.gauges();
        let counts = self.scheduler.counts();
        let sandboxes = SandboxStates {
            stem_cells: held.stem_cells,
            idle: held.idle,
            frozen: held.frozen,
            busy: self
                .sandboxes
                .count()
                .saturating_sub(held.stem_cells + held.idle + held.frozen),
        };
        let (forked, created) = self.sandboxes.made();
        Gauges {
            functions: self.registry.len(),
            per_function,
            sandboxes,
            stem_cells_by_runtime: Runtime::ALL
                .into_iter()
                .zip(counts.stem_cells_by_runtime)
                .map(|(r, n)| (r.name(), n))
                .collect(),
            package_zygotes: self.sandboxes.package_zygote_count(),
            reserved_mb: self.sandboxes.reserved_mb(),
            memory_budget_mb: self.config.pool.memory_budget_mb,
            packages_installed: self.registry.packages().installed(),
            package_cache_hits: self.registry.packages().cache_hits(),
            sandboxes_forked: forked,
            sandboxes_created: created,
            uptime: self.started.elapsed(),
        }
    }

    /// An OpenWhisk activation ([`Request::Activate`]): checked, then accepted
    /// (`blocking: false`) or run; a blocking one is answered with the record its
    /// invocation wrote, in OpenWhisk's shape, or [`Response::Accepted`] if it is
    /// still running after `wait_at_most` (it finishes in the background).
    fn activate(
        &self,
        activate: crate::openwhisk::Activate,
        abandon: Option<&Abandon>,
    ) -> Result<Response, Error> {
        let key = FunctionKey::new(&activate.namespace, &activate.name)?;
        let function = self.registry.get(&key)?;
        let event = crate::openwhisk::event_of(&activate.params)?;
        let context = Arc::new(crate::openwhisk::context::Context::new(
            &activate,
            &function,
            self.config.api_host.as_deref(),
        )?);
        let span = tracing::debug_span!("activate", function = %key, blocking = activate.blocking);
        let _g = span.enter();
        if !activate.blocking {
            return self.accept(&key, event, activate.activation_id, Some(context));
        }
        let ticket = self.admit(&key)?;
        let id = activate.activation_id.unwrap_or_else(Activations::new_id);
        let Some(wait) = activate.wait_at_most else {
            let opts = CallOpts {
                activation: Some(id),
                cause: activate.cause,
                openwhisk: Some(&context),
                ..CallOpts::default()
            };
            let out = self.invoker.invoke(&key, event, &opts, abandon);
            drop(ticket);
            return crate::openwhisk::context::answer(&context, out.map(|_| ()));
        };
        // OpenWhisk's rule: a blocking activation still running after `wait` is
        // answered with its id and finishes in the background (its record written
        // as any other's). Its own thread runs it; this one waits at most `wait`.
        let (tx, rx) = crossbeam_channel::bounded(1);
        let (invoker, running) = (self.invoker.clone(), context.clone());
        let cause = activate.cause;
        spawn_thread("sprout-activation", move || {
            let opts = CallOpts {
                activation: Some(id),
                cause,
                openwhisk: Some(&running),
                ..CallOpts::default()
            };
            let out = invoker.invoke(&key, event, &opts, None);
            drop(ticket);
            let _ = tx.send(out.map(|_| ()));
        })?;
        match rx.recv_timeout(wait) {
            Ok(out) => crate::openwhisk::context::answer(&context, out),
            Err(_) => {
                tracing::debug!(activation = %id, wait_ms = wait.as_millis() as u64, "still running: answered accepted");
                Ok(Response::Accepted(id))
            }
        }
    }

    /// Accepts an asynchronous invocation of `key`: checks it (the function exists,
    /// the event is JSON), makes its acceptance durable, and queues it; an OpenWhisk
    /// activation's `openwhisk` context rides with it.
    fn accept(
        &self,
        key: &FunctionKey,
        event: Vec<u8>,
        id: Option<ActivationId>,
        openwhisk: Option<crate::openwhisk::context::SharedContext>,
    ) -> Result<Response, Error> {
        let function = self.registry.get(key)?;
        serde_json::from_slice::<serde::de::IgnoredAny>(&event).map_err(Error::InvalidEvent)?;
        if !self.activations.is_on() {
            return Err(Error::AsyncNeedsRecords);
        }
        // The function's backlog is bounded like its queue (`--max-queue`), and
        // admission control (namespace limits) decides here too, before anything is
        // accepted; the ticket lives until the activation ends.
        let place = self.asyncs.reserve(key).inspect_err(|_| {
            self.metrics
                .refused(&key.namespace, crate::metrics::Refusal::QueueFull)
        })?;
        let ticket = self.admit(key)?;
        let id = id.unwrap_or_else(Activations::new_id);
        let arrived = Instant::now();
        self.activations.accept(Accepted {
            id,
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            version: function.version,
            at_ms: crate::activations::record::epoch_ms(std::time::SystemTime::now()),
            limits: function.activation_limits(),
            openwhisk: openwhisk
                .as_ref()
                .map(|ow| crate::activations::OpenWhiskFields {
                    kind: ow.kind.clone(),
                    subject: ow.subject.clone(),
                }),
        })?;
        tracing::debug!(activation = %id, function = %key, "accepted");
        self.asyncs.submit(crate::async_invoke::Job {
            id,
            key: key.clone(),
            version: function.version,
            limits: function.activation_limits(),
            event,
            arrived,
            ticket,
            place: Some(place),
            openwhisk,
        });
        Ok(Response::Accepted(id))
    }

    /// An activation's record, result or logs, if it is in `namespace` (`None`: any).
    fn activation(
        &self,
        namespace: Option<&str>,
        id: ActivationId,
        part: ActivationPart,
    ) -> Result<Response, Error> {
        let record = match self
            .activations
            .get(id, namespace)
            .ok_or(Error::RecordsOff)??
        {
            Lookup::Found(record) => record,
            Lookup::Pending => return Err(Error::ActivationPending { id }),
            Lookup::Missing => return Err(Error::ActivationNotFound { id }),
        };
        Ok(match part {
            ActivationPart::Record => Response::Activation(record),
            ActivationPart::Result => Response::ActivationResult(ipc::api::ActivationResult {
                success: record.status == ipc::api::ActivationStatus::Success,
                status: record.status,
                result: record.result.unwrap_or_else(|| {
                    serde_json::value::RawValue::from_string("null".into()).expect("JSON")
                }),
            }),
            ActivationPart::Logs => Response::ActivationLogs(ipc::api::ActivationLogs {
                logs: record.logs.unwrap_or_default(),
            }),
        })
    }

    /// Returns once every record handed over so far is committed (tests, benchmarks).
    pub fn flush_records(&self) -> Result<(), Error> {
        self.activations.flush().map_err(Error::from)
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

    /// `GET /status`: the same gauges and counters as `GET /metrics`.
    fn status(&self) -> Status {
        let namespaces = self.namespaces();
        let counts = self.scheduler.counts();
        let g = self.gauges();
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            cgroup: match self.sandboxes.cgroup_version() {
                CgroupVersion::V1 => "v1".to_owned(),
                CgroupVersion::V2 => "v2".to_owned(),
            },
            functions: g.functions,
            sandboxes: self.sandboxes.count(),
            stem_cells: counts.stem_cells,
            stem_cells_by_runtime: g
                .stem_cells_by_runtime
                .iter()
                .map(|(r, n)| ((*r).to_owned(), *n))
                .collect(),
            sandboxes_forked: g.sandboxes_forked,
            sandboxes_created: g.sandboxes_created,
            frozen: counts.frozen,
            queued: counts.queued,
            reserved_mb: g.reserved_mb,
            memory_budget_mb: g.memory_budget_mb,
            invocations: self.metrics.invocations_started(),
            uptime_ms: g.uptime.as_millis() as u64,
            packages_installed: g.packages_installed,
            package_cache_hits: g.package_cache_hits,
            package_zygotes: g.package_zygotes,
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

mod actions;

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
                activation_id,
                blocking: true,
            } => self
                .invoker
                .start_fast(
                    namespace,
                    name,
                    event,
                    None,
                    &self.admission,
                    crate::invoke::FastOpts {
                        activation: *activation_id,
                        openwhisk: None,
                    },
                )
                .map(|c| Box::new(c) as Box<dyn FastCall>),
            // A blocking OpenWhisk activation with no wait limit (one with a limit
            // may have to be answered `Accepted` before it ends: a worker's job).
            Request::Activate(a) if a.blocking && a.wait_at_most.is_none() => {
                let key = FunctionKey {
                    namespace: a.namespace.clone(),
                    name: a.name.clone(),
                };
                // Anything wrong is the ordinary path's to say.
                let function = self.registry.lookup(&key)?;
                let event = crate::openwhisk::event_of(&a.params).ok()?;
                let context = Arc::new(
                    crate::openwhisk::context::Context::new(
                        a,
                        &function,
                        self.config.api_host.as_deref(),
                    )
                    .ok()?,
                );
                let id = a.activation_id.unwrap_or_else(Activations::new_id);
                let fast = crate::invoke::FastActivation {
                    context: &context,
                    cause: a.cause,
                };
                self.invoker
                    .start_fast(
                        &a.namespace,
                        &a.name,
                        &event,
                        None,
                        &self.admission,
                        crate::invoke::FastOpts {
                            activation: Some(id),
                            openwhisk: Some(fast),
                        },
                    )
                    .map(|c| Box::new(c) as Box<dyn FastCall>)
            }
            Request::Run {
                namespace,
                name,
                run,
                activation_id,
            } => self
                .invoker
                .start_fast(
                    namespace,
                    name,
                    &run.body,
                    Some(run),
                    &self.admission,
                    crate::invoke::FastOpts {
                        activation: *activation_id,
                        openwhisk: None,
                    },
                )
                .map(|c| Box::new(c) as Box<dyn FastCall>),
            _ => None,
        }
    }
}

fn packages_err(source: crate::packages::Error) -> Error {
    Error::PackageCache(Box::new(source))
}
