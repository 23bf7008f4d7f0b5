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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use super::fork::ForkServer;
use crate::packages::Package;
use crate::registry::Function;
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
    /// Made (up, imported, its limit lowered): until then it is starting, and neither
    /// forked from nor shown to the policy (its fork server's lock is held meanwhile).
    ready: AtomicBool,
    last_used: Mutex<Instant>,
}

/// The live package fork servers, by id.
#[derive(Debug)]
pub(super) struct PackageForks {
    /// The uid windows (slots of the agent's range) package fork servers take.
    windows: Vec<std::ops::Range<u32>>,
    /// Each one's memory limit (MiB) while it imports.
    memory_mb: u64,
    /// What each one may take above its measured memory once imported (MiB).
    headroom_mb: u64,
    servers: Mutex<BTreeMap<u64, Arc<PackageServer>>>,
    /// Which package fork server each live sandbox forked from one came from.
    origins: Mutex<HashMap<String, u64>>,
    next: AtomicU64,
}

impl PackageForks {
    pub(super) fn new(
        windows: Vec<std::ops::Range<u32>>,
        memory_mb: u64,
        headroom_mb: u64,
    ) -> PackageForks {
        PackageForks {
            windows,
            memory_mb,
            headroom_mb,
            servers: Mutex::new(BTreeMap::new()),
            origins: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        }
    }

    /// What a package fork server may take above its measured memory (MiB).
    pub(super) fn headroom_mb(&self) -> u64 {
        self.headroom_mb
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
            ready: AtomicBool::new(false),
            last_used: Mutex::new(Instant::now()),
        });
        servers.insert(id, server.clone());
        Some(server)
    }

    /// The live package fork server that serves `function` with the most packages.
    pub(super) fn best_for(&self, function: &Function) -> Option<Arc<ZygoteTag>> {
        // Not under the servers' lock: `is_up` waits for a fork in progress (and
        // one starting is not asked: its start holds that lock).
        // Only the zygotes that could serve it are asked whether they are up.
        let servers = self.ready();
        let up: Vec<&Arc<ZygoteTag>> = servers
            .iter()
            .filter(|s| s.tag.serves(function) && s.fork.is_up())
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

    /// The cache keys every package fork server (starting ones too) has mounted.
    pub(super) fn keys(&self) -> Vec<String> {
        self.servers
            .lock()
            .values()
            .flat_map(|s| s.tag.keys.iter().cloned())
            .collect()
    }

    /// Every package fork server made (not starting).
    pub(super) fn ready(&self) -> Vec<Arc<PackageServer>> {
        self.servers
            .lock()
            .values()
            .filter(|s| s.ready.load(Ordering::Acquire))
            .cloned()
            .collect()
    }

    /// Live (up) package fork servers.
    pub(super) fn count(&self) -> usize {
        self.ready().iter().filter(|s| s.fork.is_up()).count()
    }
}

impl PackageServer {
    /// It is made: forks from it may begin, and the policy sees it.
    pub(super) fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// What the policy knows of it; `idle_stems`: its stem cells ready in the pool.
    pub(super) fn live(&self, idle_stems: usize) -> Live {
        Live {
            tag: self.tag.clone(),
            limit_mb: self.fork.memory_mb(),
            busy: self.live.load(Ordering::Relaxed) > idle_stems,
            last_used: *self.last_used.lock(),
        }
    }
}

/// A top-level module name a zygote may import: an ASCII identifier.
pub(super) fn is_module_name(name: &str) -> bool {
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
