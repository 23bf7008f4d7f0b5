//! The agent: functions, sandboxes, warm instances and invocations.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipc::api::{FunctionConfig, Status};
use ipc::proto::{InstanceLink, InstanceSpec, Runtime};
use pool::{CgroupVersion, Cgroups, SandboxState, Spawner, StateDir};
use rootfs::{Limits, SandboxConfig, Skeleton};

use crate::config::Config;
use crate::error::Error;
use crate::instance::{CallFailure, Instance, Output, BOOT_TIMEOUT};
use crate::registry::Function;
use crate::request::{FunctionSource, Invocation, Request, Response};

/// A running node agent. Create it with [`Agent::start`] before starting threads;
/// share it (`Arc<Agent>`) across threads; end it with [`Agent::shutdown`].
#[derive(Debug)]
pub struct Agent {
    config: Config,
    /// Taken (and removed) by [`Agent::shutdown`].
    state: Mutex<Option<StateDir>>,
    agent_id: String,
    state_path: PathBuf,
    bundles: PathBuf,
    cgroup_parent: PathBuf,
    cgroups: Cgroups,
    spawner: Spawner,
    skeleton: Skeleton,
    runtime_dir: PathBuf,
    functions: Mutex<HashMap<String, Arc<Function>>>,
    /// Warm instances by function name, most recently used last.
    idle: Mutex<HashMap<String, Vec<Instance>>>,
    next_id: AtomicU64,
    sandboxes: AtomicUsize,
    invocations: AtomicU64,
    shutting_down: AtomicBool,
    started: Instant,
}

fn state_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::State {
        path: path.to_path_buf(),
        source,
    }
}

impl Agent {
    /// Cleans up after crashed agents, takes a state directory, and forks the spawner.
    /// Must be called while the process is single-threaded.
    pub fn start(config: Config) -> Result<Agent, Error> {
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
        let skeleton =
            Skeleton::create(&state.path().join("rootfs")).map_err(|e| Error::State {
                path: state.path().join("rootfs"),
                source: std::io::Error::other(ipc::chain(&e)),
            })?;
        let runtime_dir = state.path().join("runtime");
        shim::install_runtime(&runtime_dir).map_err(state_err(&runtime_dir))?;
        let spawner = Spawner::start(&state, &cgroups)?;
        tracing::info!(agent_id = state.agent_id(), state_dir = %state.path().display(), "agent started");
        Ok(Agent {
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
            idle: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            sandboxes: AtomicUsize::new(0),
            invocations: AtomicU64::new(0),
            shutting_down: AtomicBool::new(false),
            started: Instant::now(),
        })
    }

    /// Destroys every sandbox, stops the spawner and removes the agent's state.
    /// Requests still in flight fail; new ones get [`Error::ShuttingDown`]. Only the
    /// first call does anything.
    pub fn shutdown(&self) -> Result<(), Error> {
        if self.shutting_down.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let idle: Vec<Instance> = lock(&self.idle).drain().flat_map(|(_, v)| v).collect();
        for inst in idle {
            self.destroy(inst);
        }
        for f in lock(&self.functions).values() {
            remove_owned_dir(f);
        }
        // The spawner destroys sandboxes still in use by in-flight requests.
        self.spawner.shutdown()?;
        if let Some(state) = lock(&self.state).take() {
            state.remove(&self.cgroups)?;
        }
        tracing::info!(agent_id = %self.agent_id, "agent stopped");
        Ok(())
    }

    /// The one entry point of every transport.
    pub fn handle(&self, req: Request) -> Result<Response, Error> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown);
        }
        match req {
            Request::RegisterFunction {
                name,
                source,
                config,
            } => self
                .register(&name, source, &config)
                .map(Response::Registered),
            Request::ListFunctions => Ok(Response::Functions(self.list())),
            Request::RemoveFunction { name } => {
                self.remove(&name).map(|()| Response::Removed { name })
            }
            Request::Invoke { name, event } => self.invoke(&name, &event).map(Response::Invoked),
            Request::Status => Ok(Response::Status(self.status())),
        }
    }

    fn register(
        &self,
        name: &str,
        source: FunctionSource,
        config: &FunctionConfig,
    ) -> Result<ipc::api::FunctionInfo, Error> {
        crate::registry::validate_name(name)?;
        let version = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (dir, owns_dir) = match source {
            FunctionSource::Dir(dir) => (dir, false),
            FunctionSource::Tar(bytes) => (self.unpack(name, version, &bytes)?, true),
        };
        let function =
            match Function::new(name, &dir, config, &self.config.defaults, version, owns_dir) {
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
                function = name,
                "requirements.txt is not installed yet: the function gets the standard library of the host's Python only"
            );
        }
        let info = function.info(0);
        let old = lock(&self.functions).insert(name.to_owned(), function);
        if let Some(old) = old {
            self.retire(name);
            remove_owned_dir(&old);
        }
        tracing::info!(function = name, handler = %info.handler, path = %info.path, "function registered");
        Ok(info)
    }

    fn unpack(&self, name: &str, version: u64, tar_bytes: &[u8]) -> Result<PathBuf, Error> {
        let dir = self
            .state_path
            .join("functions")
            .join(format!("{name}-{version}"));
        let unpacked =
            std::fs::create_dir_all(&dir).and_then(|()| tar::Archive::new(tar_bytes).unpack(&dir));
        if let Err(source) = unpacked {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(Error::Unpack { path: dir, source });
        }
        Ok(dir)
    }

    fn list(&self) -> Vec<ipc::api::FunctionInfo> {
        let idle = lock(&self.idle);
        let mut list: Vec<_> = lock(&self.functions)
            .values()
            .map(|f| f.info(idle.get(&f.name).map_or(0, Vec::len)))
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    fn remove(&self, name: &str) -> Result<(), Error> {
        let f = lock(&self.functions)
            .remove(name)
            .ok_or_else(|| Error::NotFound {
                name: name.to_owned(),
            })?;
        self.retire(name);
        remove_owned_dir(&f);
        tracing::info!(function = name, "function removed");
        Ok(())
    }

    /// Destroys the warm instances of `name`.
    fn retire(&self, name: &str) {
        let old = lock(&self.idle).remove(name).unwrap_or_default();
        for inst in old {
            self.destroy(inst);
        }
    }

    fn status(&self) -> Status {
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            cgroup: match self.cgroups.version() {
                CgroupVersion::V1 => "v1".to_owned(),
                CgroupVersion::V2 => "v2".to_owned(),
            },
            functions: lock(&self.functions).len(),
            sandboxes: self.sandboxes.load(Ordering::Relaxed),
            invocations: self.invocations.load(Ordering::Relaxed),
            uptime_ms: self.started.elapsed().as_millis() as u64,
        }
    }

    fn invoke(&self, name: &str, event: &[u8]) -> Result<Invocation, Error> {
        serde_json::from_slice::<serde::de::IgnoredAny>(event).map_err(Error::InvalidEvent)?;
        let function = lock(&self.functions)
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                name: name.to_owned(),
            })?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.invocations.fetch_add(1, Ordering::Relaxed);
        let span = tracing::debug_span!(
            "invoke",
            function = name,
            invocation = id,
            sandbox_id = tracing::field::Empty
        );
        let _g = span.enter();
        let started = Instant::now();
        let timeout = Duration::from_millis(function.timeout_ms);

        let warm = self.take_idle(&function);
        let cold = warm.is_none();
        let mut inst = match warm {
            Some(i) => i,
            None => self.cold_start(&function)?,
        };
        span.record("sandbox_id", inst.sandbox.id());
        // The timeout bounds the handler's run; loading it had its own (as in OpenWhisk).
        let outcome = inst.call(id, event, Instant::now() + timeout, self.config.log_limit);
        let logs = inst.take_logs();
        let duration = started.elapsed();
        match outcome {
            Ok(result) => {
                if let Err(source) = serde_json::from_slice::<serde::de::IgnoredAny>(&result) {
                    self.destroy(inst);
                    return Err(Error::BadResult {
                        function: name.to_owned(),
                        source,
                    });
                }
                self.put_idle(inst);
                tracing::debug!(
                    duration_us = duration.as_micros() as u64,
                    cold,
                    "invocation returned"
                );
                Ok(Invocation {
                    result,
                    logs,
                    duration,
                    cold,
                })
            }
            Err(CallFailure::Raised(error)) => {
                self.put_idle(inst);
                Err(Error::Handler {
                    function: name.to_owned(),
                    error,
                    logs,
                })
            }
            Err(failure) => Err(self.fail(inst, &function, failure, logs)),
        }
    }

    /// Turns a failed call into its error and destroys the instance's sandbox.
    fn fail(
        &self,
        inst: Instance,
        function: &Function,
        failure: CallFailure,
        logs: ipc::api::Logs,
    ) -> Error {
        let name = function.name.clone();
        let err = match failure {
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
        };
        tracing::debug!(sandbox_id = inst.sandbox.id(), error = %ipc::chain(&err), "destroying sandbox after failure");
        self.destroy(inst);
        err
    }

    /// A warm instance of the function's current version; instances of older
    /// versions found on the way are destroyed.
    fn take_idle(&self, function: &Function) -> Option<Instance> {
        let (fresh, stale): (Vec<Instance>, Vec<Instance>) = {
            let mut idle = lock(&self.idle);
            let list = idle.get_mut(&function.name)?;
            std::mem::take(list)
                .into_iter()
                .partition(|i| i.function_version == function.version)
        };
        let mut fresh = fresh;
        let taken = fresh.pop();
        if !fresh.is_empty() {
            lock(&self.idle)
                .entry(function.name.clone())
                .or_default()
                .extend(fresh);
        }
        for inst in stale {
            self.destroy(inst);
        }
        taken
    }

    fn put_idle(&self, inst: Instance) {
        if !self.config.keep_warm || self.shutting_down.load(Ordering::SeqCst) {
            return self.destroy(inst);
        }
        let current = lock(&self.functions).get(&inst.function).map(|f| f.version);
        if current != Some(inst.function_version) {
            return self.destroy(inst);
        }
        lock(&self.idle)
            .entry(inst.function.clone())
            .or_default()
            .push(inst);
    }

    /// A new sandbox with a loaded instance of `function`. Importing the handler may
    /// take up to the function's timeout.
    fn cold_start(&self, function: &Function) -> Result<Instance, Error> {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let id = format!("sprout-{}-{}", self.agent_id, n);
        let cgroup = self.cgroup_parent.join(&id);
        let bundle = self.bundles.join(&id);
        rootfs::bundle_spec(&SandboxConfig {
            id: id.clone(),
            root: self.skeleton.path().to_path_buf(),
            cgroups_path: cgroup.clone(),
            runtime_dir: self.runtime_dir.clone(),
            shim: self.config.shim.clone(),
            code: Some(function.dir.clone()),
            limits: Limits {
                memory_bytes: function.memory_mb << 20,
                pids: function.pids,
                cpus: function.cpus,
            },
            env: vec![format!("SPROUT_FUNCTION={}", function.name)],
        })
        .and_then(|spec| rootfs::write_bundle(&bundle, &spec))
        .map_err(|e| Error::State {
            path: bundle.clone(),
            source: std::io::Error::other(ipc::chain(&e)),
        })?;
        let created = self.spawner.create(&id, &bundle, cgroup);
        // libcontainer keeps its own copy of the spec; the bundle is not needed any more.
        let _ = std::fs::remove_dir_all(&bundle);
        let (mut sandbox, mut shim) = created?;
        self.sandboxes.fetch_add(1, Ordering::Relaxed);

        let booted = (|| {
            shim.0
                .stream()
                .set_read_timeout(Some(BOOT_TIMEOUT))
                .map_err(ipc::Error::Io)?;
            shim.wait_ready()?;
            shim.spawn_instance(InstanceSpec {
                instance: n,
                function: function.name.clone(),
                runtime: Runtime::Python,
                code_dir: rootfs::CODE_DIR.to_owned(),
                handler: function.handler.clone(),
            })
        })();
        let spawned = match booted {
            Ok(Ok(s)) => s,
            Ok(Err(message)) => {
                self.destroy_sandbox(&mut sandbox);
                return Err(Error::Spawn {
                    sandbox: id,
                    function: function.name.clone(),
                    message,
                });
            }
            Err(source) => {
                self.destroy_sandbox(&mut sandbox);
                return Err(Error::Protocol {
                    sandbox: id,
                    peer: "shim",
                    source,
                });
            }
        };
        let _ = shim.0.stream().set_read_timeout(None);
        let outputs =
            Output::new(spawned.stdout).and_then(|o| Ok((o, Output::new(spawned.stderr)?)));
        let (stdout, stderr) = match outputs {
            Ok(o) => o,
            Err(source) => {
                self.destroy_sandbox(&mut sandbox);
                return Err(Error::Protocol {
                    sandbox: id,
                    peer: "instance",
                    source: ipc::Error::Io(source),
                });
            }
        };
        sandbox.transition(SandboxState::Idle)?;
        let mut inst = Instance {
            sandbox,
            _shim: shim,
            link: InstanceLink(spawned.channel),
            pid: spawned.pid,
            function: function.name.clone(),
            function_version: function.version,
            stdout,
            stderr,
        };
        match inst.wait_loaded(Instant::now() + Duration::from_millis(function.timeout_ms)) {
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
                Err(self.fail(inst, function, failure, logs))
            }
        }
    }

    fn destroy(&self, mut inst: Instance) {
        self.destroy_sandbox(&mut inst.sandbox);
    }

    fn destroy_sandbox(&self, sandbox: &mut pool::Sandbox) {
        match self.spawner.destroy(sandbox) {
            // After shutdown the spawner destroyed every sandbox on its way out.
            Ok(()) | Err(pool::Error::Stopped) => {}
            Err(e) => {
                tracing::error!(sandbox_id = sandbox.id(), error = %ipc::chain(&e), "destroy sandbox")
            }
        }
        self.sandboxes.fetch_sub(1, Ordering::Relaxed);
    }
}

fn remove_owned_dir(f: &Function) {
    if f.owns_dir {
        let _ = std::fs::remove_dir_all(&f.dir);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl crate::http::Handle for Agent {
    fn handle(&self, req: Request) -> Result<Response, Error> {
        Agent::handle(self, req)
    }
}
