//! Sandboxes: everything that makes, changes and destroys one, and the accounting of
//! them. Owns the spawner, the rootfs skeleton, the cgroups, the agent's state
//! directory, the sandbox users (one host uid each), the reader of their shims' and
//! zygotes' output, and the count of sandboxes and of the memory their limits
//! reserve.
//!
//! It makes a stem cell (a sandbox with its shim and a runtime's zygote up, bound to
//! nothing), starts an instance of a function in one, attaches code and workflow
//! scratch, and destroys a sandbox. It keeps no per-function state and takes no lock
//! of another component.
//!
//! A new sandbox is forked from the fork server's zygote when it can be ([`fork`]),
//! else created by libcontainer through the spawner. A sandbox of a function with
//! packages may instead be forked from a package fork server whose zygote imported
//! some of them ([`package_forks`]; which ones are kept is `crate::zygotes`' call).

mod fork;
mod install;
mod package_forks;

pub(crate) use install::SandboxInstaller;

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use ipc::proto::{EnterEvent, InstanceLink, SandboxSpec, ShimLink};
use ipc::Channel;
use parking_lot::Mutex;
use pool::{CgroupVersion, Cgroups, Sandbox, Spawner, StateDir};
use rootfs::{Limits, SandboxConfig, Skeleton};

use crate::config::Config;
use crate::error::Error;
use crate::instance::{Instance, Output, BOOT_TIMEOUT};
use crate::packages::Package;
use crate::registry::Function;
use crate::runtime::{Runtime, Seam};
use crate::sandbox_output::SandboxOutput;
use crate::scheduler::StemCell;
use crate::zygotes::{Live, ZygoteTag};
use std::sync::Arc;

#[derive(Debug)]
pub(crate) struct Sandboxes {
    /// Taken (and removed) by [`Sandboxes::remove_state`].
    state: Mutex<Option<StateDir>>,
    /// The removal of gone agents' firewall tables, running since the start: waited
    /// for before a sandbox gets a network and by [`Sandboxes::remove_state`].
    table_sweep: Mutex<pool::TableSweep>,
    agent_id: String,
    state_path: PathBuf,
    bundles: PathBuf,
    cgroup_parent: PathBuf,
    cgroups: Cgroups,
    spawner: Spawner,
    skeleton: Skeleton,
    runtime_dir: PathBuf,
    /// Host path of the shim binary.
    shim: PathBuf,
    /// The limits of a stem cell (until a function with its own is bound).
    defaults: crate::config::Defaults,
    /// Each live sandbox's own host uid and gid (`Config::sandbox_uids`).
    users: rootfs::SandboxUsers,
    /// Reads every sandbox's shim and zygote output (one thread).
    output: SandboxOutput,
    /// Sandbox and instance ids.
    next_id: AtomicU64,
    count: AtomicUsize,
    /// Memory (MiB) reserved by live sandboxes' limits.
    reserved_mb: AtomicU64,
    /// The fork server, when new sandboxes are forked (`None`: always created).
    forks: Option<fork::ForkServer>,
    /// The package fork servers (`None`: package zygotes are off).
    packages: Option<package_forks::PackageForks>,
    /// Sandboxes made so far each way.
    forked: AtomicU64,
    created: AtomicU64,
    /// Created sandboxes' zygotes import only what their instances use (an agent that
    /// keeps nothing warm: the one-shot CLI, whose sandbox's boot is on its path).
    lazy_zygotes: bool,
}

pub(crate) fn state_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::State {
        path: path.to_path_buf(),
        source,
    }
}

impl Sandboxes {
    /// Cleans up after crashed agents, takes a state directory, makes the rootfs
    /// skeleton, installs the runtimes' files and starts the spawner (the
    /// `sprout-spawner` executable) and the output reader.
    pub fn start(config: &Config) -> Result<Sandboxes, Error> {
        let spawner_exe = pool::find_spawner(config.spawner.as_deref())?;
        let shim = config
            .shim
            .canonicalize()
            .map_err(state_err(&config.shim))?;
        // A machine without `node` still runs Python: only the runtimes that get
        // stem cells must be installed to start (registration checks each function's).
        for runtime in config.pool.stem_cells.runtimes() {
            runtime.check_installed()?;
        }
        let cgroups = Cgroups::detect()?;
        let cleaned = pool::cleanup_stale(&config.state_root, &cgroups);
        if !cleaned.is_empty() {
            tracing::info!(agents = ?cleaned, "removed leftovers of stopped agents");
        }
        let table_sweep = pool::sweep_stale_tables(!cleaned.is_empty());
        let state = StateDir::acquire(&config.state_root)?;
        // The agent's own cgroup, in every hierarchy, before any sandbox needs it: a
        // stopping agent's removal of the shared `/sprout` cannot then race a
        // sandbox's cgroup being made below it.
        cgroups.make(&state.cgroup_parent())?;
        if let Err(e) = cgroups.hold_freezer_anchor(&state.cgroup_parent().join("freezer-anchor")) {
            // Only slower freezes and thaws follow; say so and go on.
            tracing::warn!(error = %ipc::chain(&e), "could not hold the freezer anchor cgroup");
        }
        // The agent's cgroups are made: the wait of the first cgroup move (which
        // holds the kernel's cgroup lock) now overlaps the files and the spawner's
        // start, which touch no cgroup, and the first sandbox's move is free.
        cgroups.prepay_move();
        let rootfs_dir = state.path().join("rootfs");
        let skeleton = Skeleton::create(&rootfs_dir).map_err(|e| Error::State {
            path: rootfs_dir.clone(),
            source: std::io::Error::other(ipc::chain(&e)),
        })?;
        let runtime_dir = state.path().join("runtime");
        shim::runtime::install(&runtime_dir).map_err(state_err(&runtime_dir))?;
        let users = rootfs::SandboxUsers::new(config.sandbox_uids);
        let forking =
            config.keep_warm && config.pool.new_sandboxes == crate::config::NewSandboxes::Fork;
        let windows =
            fork::Windows::new(users.range(), forking && config.pool.package_zygotes_mb > 0);
        let forks = forking
            .then(|| {
                fork::ForkServer::install(
                    &runtime_dir,
                    skeleton.path(),
                    config,
                    &users,
                    state.agent_id(),
                    windows.plain.clone(),
                )
            })
            .transpose()?;
        let packages = (!windows.packages.is_empty()).then(|| {
            let memory_mb = fork::package_memory_mb(&windows.packages[0], config);
            let headroom_mb = fork::package_headroom_mb(&windows.packages[0], config);
            package_forks::PackageForks::new(windows.packages, memory_mb, headroom_mb)
        });
        let spawner = Spawner::start(&spawner_exe, &state, &cgroups)?;
        Ok(Sandboxes {
            agent_id: state.agent_id().to_owned(),
            state_path: state.path().to_path_buf(),
            bundles: state.bundles(),
            cgroup_parent: state.cgroup_parent(),
            state: Mutex::new(Some(state)),
            table_sweep: Mutex::new(table_sweep),
            cgroups,
            spawner,
            skeleton,
            runtime_dir,
            shim,
            defaults: config.defaults,
            users,
            output: SandboxOutput::start()
                .map_err(state_err(Path::new("sandbox output thread")))?,
            next_id: AtomicU64::new(1),
            count: AtomicUsize::new(0),
            reserved_mb: AtomicU64::new(0),
            forks,
            packages,
            forked: AtomicU64::new(0),
            created: AtomicU64::new(0),
            lazy_zygotes: !config.keep_warm,
        })
    }

    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    /// The agent's state directory (per process: removed at shutdown).
    pub fn state_path(&self) -> &Path {
        &self.state_path
    }

    /// What every sandbox sees at `/.sprout`: the runtimes' files and the call socket.
    pub fn runtime_dir(&self) -> &Path {
        &self.runtime_dir
    }

    /// The cgroup every sandbox's cgroup is made in.
    pub fn cgroup_parent(&self) -> &Path {
        &self.cgroup_parent
    }

    pub fn cgroup_version(&self) -> CgroupVersion {
        self.cgroups.version()
    }

    /// The host user sandbox `id` runs as, while it lives.
    pub fn user_of(&self, id: &str) -> Option<rootfs::SandboxUser> {
        self.users.user_of(id)
    }

    /// Live sandboxes.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Memory (MiB) reserved by live sandboxes' limits.
    pub fn reserved_mb(&self) -> u64 {
        self.reserved_mb.load(Ordering::Relaxed)
    }

    /// Whether the kernel killed a process of `sandbox` for memory.
    pub fn oom_killed(&self, sandbox: &Sandbox) -> bool {
        self.cgroups.oom_kills(sandbox.cgroup()).unwrap_or(0) > 0
    }

    /// Blocks until the spawner dies (`true`: the sandboxes it held died with it,
    /// see [`Sandboxes::is_gone`]) or stops (`false`).
    pub fn watch_spawner(&self) -> bool {
        self.spawner.watch()
    }

    /// Whether sandbox `id` died with a spawner.
    pub fn is_gone(&self, id: &str) -> bool {
        self.spawner.is_gone(id)
    }

    /// A new sandbox with its shim and `runtime`'s zygote up, bound to nothing, not
    /// frozen: forked from the fork server when it can be, else created.
    pub fn new_stem_cell(&self, runtime: Runtime) -> Result<StemCell, Error> {
        if let Some(forks) = &self.forks {
            if forks.serves(runtime) {
                match self.fork_stem_cell(forks, None, runtime) {
                    Ok(cell) => {
                        self.forked.fetch_add(1, Ordering::Relaxed);
                        return Ok(cell);
                    }
                    Err(e) => tracing::warn!(
                        runtime = runtime.name(),
                        error = %ipc::chain(&e),
                        "could not fork a sandbox; creating one"
                    ),
                }
            }
        }
        let cell = self.create_stem_cell(runtime)?;
        self.created.fetch_add(1, Ordering::Relaxed);
        Ok(cell)
    }

    /// Sandboxes made so far: (forked from the fork server, created by libcontainer).
    pub fn made(&self) -> (u64, u64) {
        (
            self.forked.load(Ordering::Relaxed),
            self.created.load(Ordering::Relaxed),
        )
    }

    /// A new sandbox id.
    fn next_sandbox_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("sprout-{}-{}", self.agent_id, n)
    }

    /// Its own host user, held until the sandbox is destroyed (a bitmap slot).
    /// In `slots` of the range: forked sandboxes and the fork server take the first
    /// half, created sandboxes the second while sandboxes are forked (see
    /// `fork::forked_slots`), the whole range otherwise.
    fn assign_user(
        &self,
        id: &str,
        slots: std::ops::Range<u32>,
    ) -> Result<rootfs::SandboxUser, Error> {
        self.users.assign_in(id, slots).map_err(|e| Error::State {
            path: PathBuf::from("sandbox uids"),
            source: std::io::Error::other(e.to_string()),
        })
    }

    /// The slots of the uid range created sandboxes take theirs from.
    fn created_slots(&self) -> std::ops::Range<u32> {
        let range = self.users.range();
        match &self.forks {
            Some(_) => fork::forked_slots(range).end..range.count,
            None => 0..range.count,
        }
    }

    /// The spec of a sandbox `id` with the default limits (a stem cell's).
    fn sandbox_config(&self, id: &str, cgroup: &Path, env: Vec<String>) -> SandboxConfig {
        let defaults = &self.defaults;
        SandboxConfig {
            id: id.to_owned(),
            root: self.skeleton.path().to_path_buf(),
            cgroups_path: cgroup.to_path_buf(),
            runtime_dir: self.runtime_dir.clone(),
            shim: self.shim.clone(),
            code: None,
            limits: Limits {
                memory_bytes: defaults.memory_mb << 20,
                pids: defaults.pids,
                cpus: defaults.cpus,
            },
            env,
        }
    }

    /// A stem cell created by libcontainer (through the spawner).
    fn create_stem_cell(&self, runtime: Runtime) -> Result<StemCell, Error> {
        let id = self.next_sandbox_id();
        let cgroup = self.cgroup_parent.join(&id);
        let user = self.assign_user(&id, self.created_slots())?;
        let mut env = vec![format!("{}={}", shim::runtime::RUNTIME_ENV, runtime.name())];
        if self.lazy_zygotes {
            env.push(format!("{}=1", shim::runtime::ZYGOTE_LAZY_ENV));
        }
        let spec = rootfs::bundle_spec_as(&self.sandbox_config(&id, &cgroup, env), user);
        let (mut sandbox, mut shim) = self.create(&id, &cgroup, spec, self.defaults.memory_mb)?;
        if let Err(e) = boot(&mut sandbox, &mut shim) {
            self.destroy(&mut sandbox, self.defaults.memory_mb);
            return Err(e);
        }
        tracing::debug!(sandbox_id = %id, runtime = runtime.name(), "stem cell booted");
        Ok(StemCell {
            sandbox,
            shim,
            reserved_mb: self.defaults.memory_mb,
            zygote: None,
        })
    }

    /// Creates sandbox `id` (its user assigned already) from `spec` through the
    /// spawner; counts it and its `reserved_mb`. On failure nothing is left and its
    /// user is released. The caller waits for its shim's `ready`.
    fn create(
        &self,
        id: &str,
        cgroup: &Path,
        spec: Result<oci_spec::runtime::Spec, rootfs::Error>,
        reserved_mb: u64,
    ) -> Result<(Sandbox, ipc::proto::ShimLink), Error> {
        let bundle = self.bundles.join(id);
        spec.and_then(|spec| rootfs::write_bundle(&bundle, &spec))
            .map_err(|e| {
                self.users.release(id);
                Error::State {
                    path: bundle.clone(),
                    source: std::io::Error::other(ipc::chain(&e)),
                }
            })?;
        // The shim's and zygote's output: the agent reads it, nothing of the host's.
        let (output, output_end) = crate::sandbox_output::pipe().map_err(|e| {
            self.users.release(id);
            state_err(Path::new("sandbox output pipe"))(e)
        })?;
        let created =
            self.spawner
                .create(id, &bundle, cgroup.to_path_buf(), &self.cgroups, output_end);
        // libcontainer keeps its own copy of the spec; the bundle is not needed any more.
        let _ = std::fs::remove_dir_all(&bundle);
        if created.is_err() {
            // The spawner destroys a sandbox it could not start.
            self.users.release(id);
        }
        let (sandbox, shim) = created?;
        self.output.add(id, output);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.reserved_mb.fetch_add(reserved_mb, Ordering::Relaxed);
        Ok((sandbox, shim))
    }

    /// An instance of `function` forked in `stem` (or in a new sandbox), bound to it
    /// and not loaded yet: thaw, set the function's limits, make its code visible
    /// (then `code_bound` is called), fork the instance from the zygote. On failure
    /// the sandbox is destroyed.
    pub fn start_instance(
        &self,
        function: &Function,
        stem: Option<StemCell>,
        code_bound: impl FnOnce(),
    ) -> Result<Instance, Error> {
        let StemCell {
            mut sandbox,
            mut shim,
            mut reserved_mb,
            zygote,
        } = match stem {
            Some(stem) => stem,
            None => self.new_stem_cell(function.runtime)?,
        };
        let span = tracing::debug_span!("start_instance", namespace = %function.namespace, function = %function.name, sandbox_id = %sandbox.id());
        let _g = span.enter();
        let id = sandbox.id().to_owned();
        let prepared = (|| -> Result<(), Error> {
            sandbox.thaw()?;
            if function.has_own_limits(&self.defaults) {
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
            // A package zygote's sandbox has its packages mounted already.
            let preloaded = |key: &str| zygote.as_ref().is_some_and(|z| z.keys.contains(key));
            for package in &function.deps.packages {
                if preloaded(&package.entry.key) {
                    continue;
                }
                self.spawner.attach_code(
                    sandbox.id(),
                    &package.dir,
                    Path::new(&package.mount_point()),
                )?;
            }
            tracing::debug!(packages = function.deps.packages.len(), "code bound");
            if function.network == pool::network::Network::Egress {
                self.attach_network(sandbox.id())?;
                tracing::debug!("network attached");
            }
            Ok(())
        })();
        code_bound();
        if let Err(e) = prepared {
            self.destroy(&mut sandbox, reserved_mb);
            return Err(e);
        }
        let instance = self.next_id.fetch_add(1, Ordering::Relaxed);
        let spawned = match shim.spawn_instance(instance, function.runtime) {
            Ok(Ok(s)) => {
                tracing::debug!(pid = s.pid, "instance handed over");
                s
            }
            Ok(Err(message)) => {
                self.destroy(&mut sandbox, reserved_mb);
                return Err(Error::Spawn {
                    sandbox: id,
                    function: function.name.clone(),
                    message,
                });
            }
            Err(source) => {
                self.destroy(&mut sandbox, reserved_mb);
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
                self.destroy(&mut sandbox, reserved_mb);
                return Err(Error::Protocol {
                    sandbox: id,
                    peer: "instance",
                    source: ipc::Error::Io(source),
                });
            }
        };
        if let Err(e) = sandbox.bind(&function.key().to_string()) {
            self.destroy(&mut sandbox, reserved_mb);
            return Err(e.into());
        }
        self.output.bind(sandbox.id(), &function.key().to_string());
        // Once per instance, so that no invoke pays for it.
        let oom = self
            .cgroups
            .watch_oom(sandbox.cgroup())
            .map_err(|e| {
                tracing::warn!(sandbox_id = sandbox.id(), error = %ipc::chain(&e), "no OOM notification; an OOM is seen when the channel closes")
            })
            .ok();
        Ok(Instance {
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
            http: None,
            http_pending: false,
        })
    }

    /// Creates fork server `forks`' sandbox (libcontainer) and maps its zygote's user
    /// namespace to its window; `then` finishes it (a package fork server's imports),
    /// given its zygote's pid.
    fn start_fork_server_of(
        &self,
        forks: &fork::ForkServer,
        then: impl FnOnce(&mut Sandbox, &mut ShimLink, i32) -> Result<(), Error>,
    ) -> Result<fork::Server, Error> {
        let id = forks.id().to_owned();
        let cgroup = self.cgroup_parent.join(&id);
        let slots = forks.slots();
        let user = self.assign_user(&id, slots.clone())?;
        let mut config = self.sandbox_config(
            &id,
            &cgroup,
            vec![format!("{}=python", shim::runtime::RUNTIME_ENV)],
        );
        config.limits.memory_bytes = forks.memory_mb() << 20;
        config.limits.pids = fork::FORK_SERVER_PIDS;
        let spec = rootfs::zygote_spec(&config, user, self.users.range());
        let (mut sandbox, mut shim) = self.create(&id, &cgroup, spec, forks.reserved_mb())?;
        // It is no stem cell: not counted among the sandboxes.
        self.uncount();
        let range = self.users.range();
        let made = fork::map_zygote(&mut sandbox, &mut shim, &self.cgroups, user, range, &slots)
            .and_then(|zygote| then(&mut sandbox, &mut shim, zygote));
        if let Err(e) = made {
            self.destroy_fork_server(forks, &mut sandbox);
            return Err(e);
        }
        tracing::info!(sandbox_id = %id, pid = sandbox.pid(), "fork server up");
        Ok(fork::Server {
            sandbox,
            shim,
            uid: user.uid,
            window_end: fork::window_end(range, &slots),
        })
    }

    /// Starts the plain fork server.
    fn start_fork_server(&self) -> Result<fork::Server, Error> {
        let forks = self.forks.as_ref().ok_or_else(|| Error::Spawn {
            sandbox: fork::id(&self.agent_id),
            function: String::new(),
            message: "sandboxes are not forked".into(),
        })?;
        self.start_fork_server_of(forks, |_, _, _| Ok(()))
    }

    /// A stem cell forked from `forks` (the plain fork server, or `package`'s): see
    /// the module's doc. On failure nothing of it is left.
    fn fork_stem_cell(
        &self,
        forks: &fork::ForkServer,
        package: Option<&package_forks::PackageServer>,
        runtime: Runtime,
    ) -> Result<StemCell, Error> {
        let id = self.next_sandbox_id();
        let span = tracing::debug_span!("fork_sandbox", sandbox_id = %id, zygote = package.map(|p| p.tag.id));
        let _g = span.enter();
        let cgroup = self.cgroup_parent.join(&id);
        // The fork server first, so that this sandbox's uid comes after its own. A
        // package fork server is never remade here.
        forks.ensure_up(&id, || match package {
            None => self.start_fork_server(),
            Some(_) => Err(gone(forks.id())),
        })?;
        let user = self.assign_user(&id, forks.slots())?;
        let made = self.fork_sandbox(forks, package.is_some(), &id, &cgroup, user, runtime);
        let (mut sandbox, mut shim) = match made {
            Ok(made) => made,
            Err(e) => {
                // Whatever was made is in the sandbox's cgroup (or died with its channel).
                if let Err(e) = self.cgroups.remove_tree(&cgroup) {
                    tracing::error!(error = %ipc::chain(&e), "remove a failed forked sandbox's cgroup");
                } else {
                    self.users.release(&id);
                }
                self.output.remove(&id);
                return Err(e);
            }
        };
        let reserved_mb = self.defaults.memory_mb;
        self.count.fetch_add(1, Ordering::Relaxed);
        self.reserved_mb.fetch_add(reserved_mb, Ordering::Relaxed);
        if let Err(e) = boot(&mut sandbox, &mut shim) {
            self.destroy(&mut sandbox, reserved_mb);
            return Err(e);
        }
        tracing::debug!(pid = sandbox.pid(), "forked sandbox booted");
        Ok(StemCell {
            sandbox,
            shim,
            reserved_mb,
            zygote: package.map(|p| p.tag.clone()),
        })
    }

    /// Has the fork server fork the child that makes sandbox `spec` (on the channel
    /// `ours`/`theirs`), waits for its `forked` and checks that it is the fork
    /// server's: its channel, pidfd, pid and place among the unmoved children.
    fn fork_child<'f>(
        &self,
        forks: &'f fork::ForkServer,
        package: bool,
        spec: &SandboxSpec,
        theirs: Channel,
        ours: Channel,
    ) -> Result<(ShimLink, std::os::fd::OwnedFd, i32, fork::Unmoved<'f>), Error> {
        let id = &spec.sandbox;
        let (protocol, refused) = (forked_protocol(id), forked_refused(id));
        let (output, output_end) =
            crate::sandbox_output::pipe().map_err(state_err(Path::new("sandbox output pipe")))?;
        // First, so that what the child says on its way is logged.
        self.output.add(id, output);
        let (server_cgroup, unmoved) = forks.fork(
            &self.cgroups,
            spec,
            theirs.into_fd(),
            output_end,
            || match package {
                false => self.start_fork_server(),
                true => Err(gone(forks.id())),
            },
            |mut dead| self.destroy_fork_server(forks, &mut dead.sandbox),
        )?;
        let mut shim = ShimLink(ours);
        shim.0
            .stream()
            .set_read_timeout(Some(BOOT_TIMEOUT))
            .map_err(|e| protocol(ipc::Error::Io(e)))?;
        // The child, still in the fork server's cgroup: it must be the fork server's
        // (a pidfd names one process for good; it is checked alive before `enter`).
        let child = shim
            .wait_enter_event(EnterEvent::Forked)
            .map_err(protocol)?
            .map_err(refused)?;
        let child_pid = pool::pidfd_pid(child.as_fd()).map_err(|e| protocol(ipc::Error::Io(e)))?;
        tracing::debug!(pid = child_pid, "child forked");
        let in_server = self
            .cgroups
            .contains_pid(&server_cgroup, child_pid)
            .unwrap_or(false);
        if !in_server {
            return Err(refused(format!(
                "the forked child (pid {child_pid}) is not in the fork server's cgroup {}",
                server_cgroup.display()
            )));
        }
        Ok((shim, child, child_pid, unmoved))
    }

    /// The exchange with the fork server and its child, up to the spawner's adopting
    /// the sandbox.
    fn fork_sandbox(
        &self,
        forks: &fork::ForkServer,
        package: bool,
        id: &str,
        cgroup: &Path,
        user: rootfs::SandboxUser,
        runtime: Runtime,
    ) -> Result<(Sandbox, ShimLink), Error> {
        let (protocol, refused) = (forked_protocol(id), forked_refused(id));
        let (ours, theirs) =
            Channel::pair().map_err(state_err(Path::new("forked sandbox channel")))?;
        let spec = SandboxSpec {
            sandbox: id.to_owned(),
            uid: user.uid,
            gid: user.gid,
            runtime,
        };
        let limits = rootfs::resources(&Limits {
            memory_bytes: self.defaults.memory_mb << 20,
            pids: self.defaults.pids,
            cpus: self.defaults.cpus,
        })
        .map_err(|e| fork::spec_err(cgroup, &e))?;
        // The sandbox's cgroup is made (limits set, join files opened: see
        // prepare_cgroup) on a thread of its own while the fork server forks the child.
        let (shim, child, child_pid, unmoved, join) = std::thread::scope(|scope| {
            let making = std::thread::Builder::new()
                .name("sprout-cgroup".into())
                .spawn_scoped(scope, || {
                    pool::prepare_cgroup(&self.cgroups, cgroup, &limits)
                });
            let forked = self.fork_child(forks, package, &spec, theirs, ours);
            let join = match making {
                Ok(thread) => thread.join().unwrap_or_else(|_| Err(pool::Error::Stopped)),
                Err(_) => pool::prepare_cgroup(&self.cgroups, cgroup, &limits),
            };
            let (shim, child, child_pid, unmoved) = forked?;
            Ok::<_, Error>((shim, child, child_pid, unmoved, join?))
        })?;
        let mut shim = shim;
        tracing::debug!("cgroup made");
        if fork::exited(&child) {
            return Err(refused(format!(
                "the forked child (pid {child_pid}) exited before it joined its cgroup"
            )));
        }
        shim.send_join_and_enter(&join).map_err(protocol)?;
        drop(join);

        // PID 1 of the new sandbox, made by the child in its cgroup.
        let pid1 = shim
            .wait_enter_event(EnterEvent::Entered)
            .map_err(protocol)?
            .map_err(refused)?;
        let pid1 = pool::pidfd_pid(pid1.as_fd()).map_err(|e| protocol(ipc::Error::Io(e)))?;
        tracing::debug!(pid = pid1, "sandbox entered");
        drop(unmoved);
        if !self.cgroups.contains_pid(cgroup, pid1).unwrap_or(false) {
            return Err(refused(format!(
                "the forked sandbox's first process (pid {pid1}) is not in {}",
                cgroup.display()
            )));
        }
        let sandbox = self
            .spawner
            .adopt(id, pid1, cgroup.to_path_buf(), &self.cgroups)?;
        Ok((sandbox, shim))
    }

    /// Destroys fork server `forks`' sandbox (it died, or the agent stops, or a
    /// package fork server is evicted). Sandboxes forked from it die with it.
    fn destroy_fork_server(&self, forks: &fork::ForkServer, sandbox: &mut Sandbox) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.destroy(sandbox, forks.reserved_mb());
    }

    /// Takes a sandbox out of the count (the fork server is none of the pool's).
    fn uncount(&self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }

    /// Makes `dir` visible at `target` in sandbox `id` (a callee's code).
    pub fn attach_code(&self, id: &str, dir: &Path, target: &Path) -> Result<(), Error> {
        Ok(self.spawner.attach_code(id, dir, target)?)
    }

    /// Puts a run's own scratch over sandbox `id`'s `/workflow`.
    pub fn attach_scratch(&self, id: &str, scratch: &pool::Scratch) -> Result<(), Error> {
        Ok(self.spawner.attach_scratch(id, scratch)?)
    }

    /// Puts sandbox `root`'s `/workflow` over sandbox `id`'s.
    pub fn attach_scratch_from(&self, id: &str, root: &str) -> Result<(), Error> {
        Ok(self.spawner.attach_scratch_from(id, root)?)
    }

    /// Gives sandbox `id` its own `/workflow` back.
    pub fn detach_scratch(&self, id: &str) -> Result<(), pool::Error> {
        self.spawner.detach_scratch(id)
    }

    /// Replaces sandbox `id`'s `/workflow` by a new tmpfs.
    pub fn reset_scratch(&self, id: &str) -> Result<(), pool::Error> {
        self.spawner.reset_scratch(id)
    }

    /// Destroys `sandbox` (its processes, cgroup and mounts) and gives back its user
    /// and its `reserved_mb`. What other components keep of it is theirs to forget.
    pub fn destroy(&self, sandbox: &mut Sandbox, reserved_mb: u64) {
        match self.spawner.destroy(sandbox) {
            // After shutdown the spawner destroyed every sandbox on its way out.
            Ok(()) | Err(pool::Error::Stopped) => {
                // Its processes are gone: its uid may go to another sandbox.
                self.users.release(sandbox.id());
            }
            Err(e) => {
                // Its processes may live on: its uid stays out of use.
                tracing::error!(sandbox_id = sandbox.id(), error = %ipc::chain(&e), "destroy sandbox")
            }
        }
        self.output.remove(sandbox.id());
        if let Some(packages) = &self.packages {
            packages.gone(sandbox.id());
        }
        self.count.fetch_sub(1, Ordering::Relaxed);
        self.reserved_mb.fetch_sub(reserved_mb, Ordering::Relaxed);
    }

    /// Stops the spawner, which destroys the sandboxes still in use.
    pub fn stop_spawner(&self) -> Result<(), Error> {
        Ok(self.spawner.shutdown()?)
    }

    /// Gives sandbox `id` outbound network, once the stale-table sweep has ended (it
    /// leaves every table alone while any sandbox link exists, this agent's too).
    fn attach_network(&self, id: &str) -> Result<(), pool::Error> {
        self.table_sweep.lock().wait();
        self.spawner.attach_network(id)
    }

    /// Removes the agent's state directory and cgroups (once).
    pub fn remove_state(&self) -> Result<(), Error> {
        self.table_sweep.lock().wait();
        if let Some(state) = self.state.lock().take() {
            state.remove(&self.cgroups)?;
        }
        Ok(())
    }
}

/// Most modules a package zygote imports (the zygote refuses more).
const MAX_IMPORTED_MODULES: usize = 256;

/// Package zygotes: see [`package_forks`] and `crate::zygotes`.
impl Sandboxes {
    /// Whether package zygotes are made at all.
    pub fn package_zygotes_on(&self) -> bool {
        self.packages.is_some()
    }

    /// What a package zygote's limit adds to its measured memory (MiB; 0 when off).
    pub fn package_headroom_mb(&self) -> u64 {
        self.packages
            .as_ref()
            .map_or(0, package_forks::PackageForks::headroom_mb)
    }

    /// Live package zygotes.
    pub fn package_zygote_count(&self) -> usize {
        self.packages
            .as_ref()
            .map_or(0, package_forks::PackageForks::count)
    }

    /// The live package zygote that serves `function` with the most packages.
    pub fn package_zygote_for(&self, function: &Function) -> Option<Arc<ZygoteTag>> {
        // Asked at every acquire, warm ones too: a function without Python packages
        // (most) costs one test.
        if function.runtime != Runtime::Python || function.deps.is_empty() {
            return None;
        }
        self.packages.as_ref()?.best_for(function)
    }

    /// A new sandbox (a stem cell, not frozen) forked from package zygote `zygote`.
    pub fn fork_package_stem_cell(&self, zygote: &ZygoteTag) -> Result<StemCell, Error> {
        let id = || format!("sprout-{}.pz-{}", self.agent_id, zygote.id);
        let forks = self.packages.as_ref().ok_or_else(|| gone(&id()))?;
        let server = forks.begin_fork(zygote.id).ok_or_else(|| gone(&id()))?;
        match self.fork_stem_cell(&server.fork, Some(&server), Runtime::Python) {
            Ok(cell) => {
                forks.forked(&server, cell.sandbox.id());
                self.forked.fetch_add(1, Ordering::Relaxed);
                Ok(cell)
            }
            Err(e) => {
                forks.fork_failed(&server);
                Err(e)
            }
        }
    }

    /// Makes a package zygote of `namespace` that imports `packages`: its fork
    /// server, the packages attached in it, its zygote's imports, then its memory
    /// limit lowered ([`Sandboxes::seal_package_server`]). Returns it and that limit
    /// (MiB), what it counts at against `--package-zygotes-mb`. On failure nothing of
    /// it is left.
    pub fn start_package_zygote(
        &self,
        namespace: &str,
        packages: Vec<Package>,
    ) -> Result<(Arc<ZygoteTag>, u64), Error> {
        let forks = self.packages.as_ref().ok_or_else(|| Error::Spawn {
            sandbox: String::new(),
            function: String::new(),
            message: "package zygotes are off".into(),
        })?;
        let server = forks
            .add(&self.agent_id, namespace, packages)
            .ok_or_else(|| Error::Spawn {
                sandbox: String::new(),
                function: String::new(),
                message: "every package zygote uid window is taken".into(),
            })?;
        let span = tracing::info_span!(
            "package_zygote",
            sandbox_id = server.fork.id(),
            namespace,
            zygote = server.tag.id
        );
        let _g = span.enter();
        let started = Instant::now();
        let up = server.fork.ensure_up(server.fork.id(), || {
            self.start_fork_server_of(&server.fork, |sandbox, shim, zygote| {
                self.import_packages(&server, sandbox, shim)?;
                self.seal_package_server(forks, &server, sandbox, zygote)
            })
        });
        if let Err(e) = up {
            forks.remove(server.tag.id);
            return Err(e);
        }
        server.set_ready();
        let limit_mb = server.fork.memory_mb();
        tracing::info!(
            packages = ?server.tag.keys,
            limit_mb,
            took_ms = started.elapsed().as_millis() as u64,
            "package zygote up"
        );
        Ok((server.tag.clone(), limit_mb))
    }

    /// After its imports: lowers package fork server `server`'s memory limit to its
    /// usage as measured and its headroom (`fork::package_headroom_mb`), then
    /// requires its cgroup to hold its shim and zygote and nothing else (package code
    /// that left a process behind, which the zygote's thread count does not see, is
    /// refused: it would grow outside what was measured).
    fn seal_package_server(
        &self,
        forks: &package_forks::PackageForks,
        server: &package_forks::PackageServer,
        sandbox: &Sandbox,
        zygote: i32,
    ) -> Result<(), Error> {
        let cgroup = sandbox.cgroup();
        let refused = |message: String| Error::Spawn {
            sandbox: sandbox.id().to_owned(),
            function: String::new(),
            message,
        };
        let usage_mb = self.cgroups.memory_usage(cgroup)?.div_ceil(1 << 20);
        let limit_mb = usage_mb + forks.headroom_mb();
        self.cgroups.set_memory_limit(cgroup, limit_mb << 20)?;
        server.fork.set_memory_mb(limit_mb);
        let procs = self.cgroups.procs(cgroup)?;
        let mut own = vec![sandbox.pid(), zygote];
        own.sort_unstable();
        if procs != own {
            return Err(refused(format!(
                "after its imports its cgroup holds processes {procs:?}, not just its shim ({}) and zygote ({zygote}): package code left a process running",
                sandbox.pid()
            )));
        }
        tracing::debug!(
            usage_mb,
            limit_mb,
            "package fork server's memory limit lowered"
        );
        Ok(())
    }

    /// Attaches `server`'s packages in its sandbox and has its zygote import them.
    fn import_packages(
        &self,
        server: &package_forks::PackageServer,
        sandbox: &mut Sandbox,
        shim: &mut ShimLink,
    ) -> Result<(), Error> {
        for package in &server.packages {
            self.spawner.attach_code(
                sandbox.id(),
                &package.dir,
                std::path::Path::new(&package.mount_point()),
            )?;
        }
        // Module names come from the installed files: only plain identifiers go.
        let modules: Vec<String> = server
            .packages
            .iter()
            .flat_map(|p| &p.entry.modules)
            .filter(|m| package_forks::is_module_name(m))
            .take(MAX_IMPORTED_MODULES)
            .cloned()
            .collect();
        let spec = ipc::proto::ImportSpec {
            paths: server.packages.iter().map(Package::mount_point).collect(),
            modules,
        };
        match shim.import_packages(&spec) {
            Ok(Ok(imported)) => {
                for failed in &imported.failed {
                    tracing::warn!(module = %failed.module, error = %failed.error, "a package zygote could not import a module; it goes without");
                }
                tracing::debug!(modules = ?imported.imported, "packages imported");
                Ok(())
            }
            Ok(Err(message)) => Err(Error::Spawn {
                sandbox: sandbox.id().to_owned(),
                function: String::new(),
                message,
            }),
            Err(source) => Err(Error::Protocol {
                sandbox: sandbox.id().to_owned(),
                peer: "package fork server",
                source,
            }),
        }
    }

    /// The cache keys of the packages every live package zygote keeps mounted.
    pub fn package_zygote_keys(&self) -> Vec<String> {
        let Some(forks) = &self.packages else {
            return Vec::new();
        };
        forks.keys()
    }

    /// The live package zygotes as the policy sees them (`idle_stems`: how many of
    /// each one's stem cells are ready in the pool), and how many more could be made.
    /// Those found dead are forgotten.
    pub fn package_zygotes(&self, idle_stems: impl Fn(u64) -> usize) -> (Vec<Live>, usize) {
        let Some(forks) = &self.packages else {
            return (Vec::new(), 0);
        };
        let mut live = Vec::new();
        // One starting is not seen (its window is taken).
        for server in forks.ready() {
            if !server.fork.is_up() {
                // Its fork server died (a fork found it gone and destroyed it).
                forks.remove(server.tag.id);
                continue;
            }
            live.push(server.live(idle_stems(server.tag.id)));
        }
        (live, forks.free_windows())
    }

    /// Destroys package zygote `id` if no live sandbox but its `stems` (its idle stem
    /// cells, destroyed with it) was forked from it; else gives `stems` back.
    pub fn evict_package_zygote(&self, id: u64, stems: Vec<StemCell>) -> Result<(), Vec<StemCell>> {
        let Some(forks) = &self.packages else {
            return Err(stems);
        };
        let Some(server) = forks.remove_if_idle(id, stems.len()) else {
            return Err(stems);
        };
        for mut stem in stems {
            self.destroy(&mut stem.sandbox, stem.reserved_mb);
        }
        if let Some(mut dead) = server.fork.take() {
            tracing::info!(
                sandbox_id = dead.sandbox.id(),
                zygote = id,
                "package zygote evicted"
            );
            self.destroy_fork_server(&server.fork, &mut dead.sandbox);
        }
        Ok(())
    }
}

/// A package fork server `id` that is down is gone for good.
fn gone(id: &str) -> Error {
    Error::Spawn {
        sandbox: id.to_owned(),
        function: String::new(),
        message: "the package fork server is gone".into(),
    }
}

/// Waits (at most [`BOOT_TIMEOUT`]) for a new sandbox's shim to say `ready`, then
/// moves the sandbox to `StemCell`. A forked sandbox's PID 1 may instead report
/// `enter_failed` before it becomes the shim (a created sandbox never does).
fn boot(sandbox: &mut Sandbox, shim: &mut ipc::proto::ShimLink) -> Result<(), Error> {
    let protocol = |source| Error::Protocol {
        sandbox: sandbox.id().to_owned(),
        peer: "shim",
        source,
    };
    shim.0
        .stream()
        .set_read_timeout(Some(BOOT_TIMEOUT))
        .map_err(|e| protocol(ipc::Error::Io(e)))?;
    match shim.wait_forked_ready().map_err(protocol)? {
        Ok(_zygote) => {}
        Err(message) => {
            return Err(Error::Spawn {
                sandbox: sandbox.id().to_owned(),
                function: String::new(),
                message,
            })
        }
    }
    shim.0
        .stream()
        .set_read_timeout(None)
        .map_err(|e| protocol(ipc::Error::Io(e)))?;
    sandbox.ready()?;
    Ok(())
}

/// A forked sandbox `id`'s channel failed (or said something out of turn).
fn forked_protocol(id: &str) -> impl Fn(ipc::Error) -> Error + Copy + '_ {
    move |source| Error::Protocol {
        sandbox: id.to_owned(),
        peer: "forked sandbox",
        source,
    }
}

/// A forked sandbox `id` could not be made, and why.
fn forked_refused(id: &str) -> impl Fn(String) -> Error + Copy + '_ {
    move |message| Error::Spawn {
        sandbox: id.to_owned(),
        function: String::new(),
        message,
    }
}
