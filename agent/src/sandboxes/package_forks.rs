//! Package fork servers (package zygotes): fork servers of their own, one per
//! (namespace, package set), whose zygote has imported the set before it forks, and
//! the bookkeeping of which sandbox was forked from which (a package fork server may
//! go only when no live sandbox was forked from it).
//!
//! Each one is a sandbox made by libcontainer from `rootfs::zygote_spec` like the
//! plain fork server, with its own cgroup, its own user namespace mapping only its
//! own uid window ([`super::fork::Windows`]), the set's package directories attached
//! at `/deps/<key>` in its mount namespace, and a zygote that imported their modules
//! (`import_packages`). It is made once and never remade: when it dies it is gone,
//! and the policy may make another. `Sandboxes` makes, forks from and destroys them;
//! this module only keeps them.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ipc::proto::ShimLink;
use parking_lot::Mutex;
use pool::Sandbox;

use super::fork::ForkServer;
use crate::error::Error;
use crate::packages::Package;
use crate::registry::Function;
use crate::runtime::Runtime;
use crate::scheduler::StemCell;
use crate::zygotes::{Live, ZygoteTag};

/// One package fork server.
#[derive(Debug)]
pub(super) struct PackageServer {
    pub(super) tag: Arc<ZygoteTag>,
    /// Which of the package windows it has.
    window: usize,
    pub(super) fork: ForkServer,
    /// The packages it attaches and imports.
    pub(super) packages: Vec<Package>,
    /// Sandboxes forked from it that live (its stem cells included), and forks under way.
    live: AtomicUsize,
    last_used: Mutex<Instant>,
}

/// The live package fork servers, by id.
#[derive(Debug)]
pub(super) struct PackageForks {
    /// The uid windows (slots of the agent's range) package fork servers take.
    windows: Vec<std::ops::Range<u32>>,
    /// Each one's memory limit (MiB).
    memory_mb: u64,
    servers: Mutex<BTreeMap<u64, Arc<PackageServer>>>,
    /// Which package fork server each live sandbox forked from one came from.
    origins: Mutex<HashMap<String, u64>>,
    next: AtomicU64,
}

impl PackageForks {
    pub(super) fn new(windows: Vec<std::ops::Range<u32>>, memory_mb: u64) -> PackageForks {
        PackageForks {
            windows,
            memory_mb,
            servers: Mutex::new(BTreeMap::new()),
            origins: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        }
    }

    /// Package fork servers that could still be made (free windows).
    pub(super) fn free_windows(&self) -> usize {
        self.windows.len() - self.servers.lock().len()
    }

    /// A new package fork server (down) of `namespace` with `packages`, in a free
    /// window; `None` when every window is taken. It is kept until [`PackageForks::remove`].
    pub(super) fn add(
        &self,
        agent_id: &str,
        namespace: &str,
        packages: Vec<Package>,
    ) -> Option<Arc<PackageServer>> {
        let mut servers = self.servers.lock();
        let window = (0..self.windows.len()).find(|w| servers.values().all(|s| s.window != *w))?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let tag = Arc::new(ZygoteTag {
            id,
            namespace: namespace.to_owned(),
            keys: packages.iter().map(|p| p.entry.key.clone()).collect(),
        });
        let server = Arc::new(PackageServer {
            tag,
            window,
            fork: ForkServer::new(
                format!("sprout-{agent_id}.pz-{id}"),
                self.windows[window].clone(),
                self.memory_mb,
                0,
            ),
            packages,
            live: AtomicUsize::new(0),
            last_used: Mutex::new(Instant::now()),
        });
        servers.insert(id, server.clone());
        Some(server)
    }

    /// The live package fork server that serves `function` with the most packages.
    pub(super) fn best_for(&self, function: &Function) -> Option<Arc<ZygoteTag>> {
        let servers = self.servers.lock();
        let up: Vec<&Arc<ZygoteTag>> = servers
            .values()
            .filter(|s| s.fork.is_up())
            .map(|s| &s.tag)
            .collect();
        crate::zygotes::best(up, function).cloned()
    }

    /// Package fork server `id`, counting a fork from it as under way (undo with
    /// [`PackageForks::fork_failed`], or it is counted until the sandbox is gone).
    pub(super) fn begin_fork(&self, id: u64) -> Option<Arc<PackageServer>> {
        let servers = self.servers.lock();
        let server = servers.get(&id)?.clone();
        server.live.fetch_add(1, Ordering::Relaxed);
        *server.last_used.lock() = Instant::now();
        Some(server)
    }

    pub(super) fn fork_failed(&self, server: &PackageServer) {
        server.live.fetch_sub(1, Ordering::Relaxed);
    }

    /// Sandbox `sandbox` was forked from `server`.
    pub(super) fn forked(&self, server: &PackageServer, sandbox: &str) {
        self.origins
            .lock()
            .insert(sandbox.to_owned(), server.tag.id);
    }

    /// Sandbox `sandbox` is destroyed: if it was forked from a package fork server,
    /// that one has one live sandbox less.
    pub(super) fn gone(&self, sandbox: &str) {
        let Some(id) = self.origins.lock().remove(sandbox) else {
            return;
        };
        if let Some(server) = self.servers.lock().get(&id) {
            server.live.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Takes package fork server `id` out if no more than `idle_stems` live sandboxes
    /// were forked from it (its idle stem cells, which the caller destroys): nothing
    /// can fork from it after that. `None`: it has live sandboxes, or is gone.
    pub(super) fn remove_if_idle(&self, id: u64, idle_stems: usize) -> Option<Arc<PackageServer>> {
        let mut servers = self.servers.lock();
        let live = servers.get(&id)?.live.load(Ordering::Relaxed);
        if live > idle_stems {
            return None;
        }
        servers.remove(&id)
    }

    /// Takes package fork server `id` out whatever it has (it failed to start, or the
    /// agent stops).
    pub(super) fn remove(&self, id: u64) -> Option<Arc<PackageServer>> {
        self.servers.lock().remove(&id)
    }

    /// Every package fork server.
    pub(super) fn all(&self) -> Vec<Arc<PackageServer>> {
        self.servers.lock().values().cloned().collect()
    }

    /// Live (up) package fork servers.
    pub(super) fn count(&self) -> usize {
        self.servers
            .lock()
            .values()
            .filter(|s| s.fork.is_up())
            .count()
    }
}

impl PackageServer {
    /// What the policy knows of it; `usage_mb` is its measured memory, `idle_stems`
    /// its stem cells ready in the pool.
    pub(super) fn live(&self, usage_mb: u64, idle_stems: usize) -> Live {
        Live {
            tag: self.tag.clone(),
            usage_mb,
            busy: self.live.load(Ordering::Relaxed) > idle_stems,
            last_used: *self.last_used.lock(),
        }
    }
}

/// Most modules a package zygote imports (the zygote refuses more).
const MAX_MODULES: usize = 256;

impl super::Sandboxes {
    /// Whether package zygotes are made at all.
    pub fn package_zygotes_on(&self) -> bool {
        self.packages.is_some()
    }

    /// Live package zygotes.
    pub fn package_zygote_count(&self) -> usize {
        self.packages.as_ref().map_or(0, PackageForks::count)
    }

    /// The live package zygote that serves `function` with the most packages.
    pub fn package_zygote_for(&self, function: &Function) -> Option<Arc<ZygoteTag>> {
        self.packages.as_ref()?.best_for(function)
    }

    /// A new sandbox (a stem cell, not frozen) forked from package zygote `zygote`.
    pub fn fork_package_stem_cell(&self, zygote: &ZygoteTag) -> Result<StemCell, Error> {
        let id = || format!("sprout-{}.pz-{}", self.agent_id, zygote.id);
        let forks = self.packages.as_ref().ok_or_else(|| super::gone(&id()))?;
        let server = forks
            .begin_fork(zygote.id)
            .ok_or_else(|| super::gone(&id()))?;
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
    /// server, the packages attached in it, its zygote's imports. Returns it and its
    /// memory (MiB) as measured. On failure nothing of it is left.
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
            self.start_fork_server_of(&server.fork, |sandbox, shim| {
                self.import_packages(&server, sandbox, shim)
            })
        });
        if let Err(e) = up {
            forks.remove(server.tag.id);
            return Err(e);
        }
        let usage = self.package_zygote_usage_mb(&server);
        tracing::info!(
            packages = ?server.tag.keys,
            usage_mb = usage,
            took_ms = started.elapsed().as_millis() as u64,
            "package zygote up"
        );
        Ok((server.tag.clone(), usage))
    }

    /// Attaches `server`'s packages in its sandbox and has its zygote import them.
    fn import_packages(
        &self,
        server: &PackageServer,
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
            .filter(|m| is_module_name(m))
            .take(MAX_MODULES)
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

    fn package_zygote_usage_mb(&self, server: &PackageServer) -> u64 {
        server
            .fork
            .with_server(|s| self.cgroups.memory_usage(s.sandbox.cgroup()).unwrap_or(0) >> 20)
            .unwrap_or(0)
    }

    /// The live package zygotes as the policy sees them (`idle_stems`: how many of
    /// each one's stem cells are ready in the pool), and how many more could be made.
    /// Those found dead are forgotten.
    pub fn package_zygotes(&self, idle_stems: impl Fn(u64) -> usize) -> (Vec<Live>, usize) {
        let Some(forks) = &self.packages else {
            return (Vec::new(), 0);
        };
        let mut live = Vec::new();
        for server in forks.all() {
            if !server.fork.is_up() {
                // Its fork server died (a fork found it gone and destroyed it).
                forks.remove(server.tag.id);
                continue;
            }
            let usage = self.package_zygote_usage_mb(&server);
            live.push(server.live(usage, idle_stems(server.tag.id)));
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

/// A top-level module name a zygote may import: an ASCII identifier.
fn is_module_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 128
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_identifiers_are_imported() {
        for good in ["six", "_cffi_backend", "PIL", "yaml2"] {
            assert!(is_module_name(good), "{good}");
        }
        for bad in ["", "2to3", "a.b", "a-b", "os;x", "é", &"a".repeat(129)] {
            assert!(!is_module_name(bad), "{bad}");
        }
    }
}
