//! The agent's state directory and the cleanup of what crashed agents left behind.
//!
//! Each agent owns `<root>/<agent-id>/` (the agent id is its pid) and holds an
//! exclusive `flock` on `<root>/<agent-id>/lock` for its whole life; the spawner
//! inherits the lock, so a directory stays "live" while either process runs. Its
//! sandboxes' cgroups live under `/sprout/<agent-id>/`. A directory whose lock can
//! be taken belongs to a dead agent: [`cleanup_stale`] kills what is left in its
//! cgroups and removes both trees. Agents may use different state roots (tests do),
//! so a `/sprout/<id>` cgroup with no state directory under this agent's root is only
//! taken for a leftover when no process `<id>` exists.

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::{io_err, Cgroups, Error};

/// The cgroup under which every sprout agent puts its sandboxes.
pub const CGROUP_PARENT: &str = "/sprout";
/// sprout's own state root: removed when the last agent leaves it empty. A root the
/// user chose is only removed if the agent created it.
pub const DEFAULT_ROOT: &str = "/run/sprout";

/// An agent's locked state directory.
#[derive(Debug)]
pub struct StateDir {
    root: PathBuf,
    /// Whether the root may be removed once empty.
    remove_root: bool,
    dir: PathBuf,
    agent_id: String,
    _lock: Flock<File>,
}

impl StateDir {
    /// Creates and locks `<root>/<pid>`.
    pub fn acquire(root: &Path) -> Result<StateDir, Error> {
        let agent_id = std::process::id().to_string();
        let dir = root.join(&agent_id);
        let lock_path = dir.join("lock");
        let remove_root = root == Path::new(DEFAULT_ROOT) || !root.exists();
        // A cleaner may lock and remove a fresh directory between our mkdir and our
        // flock; the inode check notices and we try again.
        for _ in 0..3 {
            fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(io_err("open", &lock_path))?;
            let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
                .map_err(|_| Error::Locked { path: dir.clone() })?;
            let same = match (fs::metadata(&lock_path), lock.metadata()) {
                (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                _ => false,
            };
            if same {
                return Ok(StateDir {
                    root: root.to_path_buf(),
                    remove_root,
                    dir,
                    agent_id,
                    _lock: lock,
                });
            }
        }
        Err(Error::Locked { path: dir })
    }

    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// libcontainer's state root for this agent's containers.
    pub fn containers(&self) -> PathBuf {
        self.dir.join("containers")
    }

    pub fn bundles(&self) -> PathBuf {
        self.dir.join("bundles")
    }

    /// This agent's parent cgroup (from the hierarchy root).
    pub fn cgroup_parent(&self) -> PathBuf {
        Path::new(CGROUP_PARENT).join(&self.agent_id)
    }

    /// Removes the directory, this agent's cgroups, and the shared parents if unused.
    pub fn remove(self, cgroups: &Cgroups) -> Result<(), Error> {
        let result = cgroups.remove_tree(&self.cgroup_parent());
        cgroups.remove_if_unused(Path::new(CGROUP_PARENT));
        fs::remove_dir_all(&self.dir).map_err(io_err("remove", &self.dir))?;
        if self.remove_root {
            let _ = fs::remove_dir(&self.root); // fails while other agents use it
        }
        result
    }
}

/// Whether a live agent holds `<root>/<id>/lock`.
fn is_locked(root: &Path, id: &str) -> bool {
    let Ok(file) = File::open(root.join(id).join("lock")) else {
        return false;
    };
    Flock::lock(file, FlockArg::LockExclusiveNonblock).is_err()
}

/// Whether a process `id` exists (an agent of another state root, maybe).
fn process_exists(id: &str) -> bool {
    id.parse::<i32>()
        .is_ok_and(|pid| Path::new("/proc").join(pid.to_string()).exists())
}

/// Removes the state directories and cgroups of agents that are gone, and returns
/// their ids. Live agents (including this one) are left alone: under `root`, a
/// directory is live while its lock is held; a cgroup `/sprout/<id>` with no
/// directory under `root` is live while a process `<id>` exists. What cannot be
/// removed (another cleaner racing this one) is logged and left for the next start.
pub fn cleanup_stale(root: &Path, cgroups: &Cgroups) -> Vec<String> {
    let mut dirs: Vec<String> = Vec::new();
    if let Ok(entries) = fs::read_dir(root) {
        dirs.extend(
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok()),
        );
    }
    let mut cgroup_ids: Vec<String> = Vec::new();
    for dir in cgroups.dirs(Path::new(CGROUP_PARENT)) {
        if let Ok(entries) = fs::read_dir(&dir) {
            cgroup_ids.extend(
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .filter_map(|e| e.file_name().into_string().ok()),
            );
        }
    }
    let mut stale: Vec<String> = dirs
        .iter()
        .filter(|id| !is_locked(root, id))
        .cloned()
        .collect();
    stale.extend(
        cgroup_ids
            .into_iter()
            .filter(|id| !dirs.contains(id) && !process_exists(id)),
    );
    stale.sort();
    stale.dedup();
    let mut cleaned = Vec::new();
    for id in stale {
        tracing::info!(agent_id = %id, "removing what a stopped agent left behind");
        let dir = root.join(&id);
        let removed = cgroups
            .remove_tree(&Path::new(CGROUP_PARENT).join(&id))
            .and_then(|()| match fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(io_err("remove", &dir)(e))
                }
                _ => Ok(()),
            });
        match removed {
            Ok(()) => cleaned.push(id),
            Err(e) => {
                tracing::warn!(agent_id = %id, error = %ipc::chain(&e), "could not remove a stopped agent's leftovers")
            }
        }
    }
    cleaned
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CgroupVersion;

    #[test]
    fn stale_directories_and_cgroups_go_live_ones_stay() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("run");
        let cg_root = t.path().join("cg");
        fs::create_dir_all(cg_root.join("memory")).unwrap();
        let cgroups = Cgroups::at(&cg_root, CgroupVersion::V1);

        // A dead agent: directory with an unlocked lock file, and a cgroup.
        fs::create_dir_all(root.join("999999")).unwrap();
        fs::write(root.join("999999/lock"), "").unwrap();
        fs::create_dir_all(cg_root.join("memory/sprout/999999/sprout-999999-1")).unwrap();
        // An orphan cgroup with no state directory and no such process.
        fs::create_dir_all(cg_root.join("memory/sprout/888888888")).unwrap();
        // A cgroup of a live agent of another state root (pid 1 exists).
        fs::create_dir_all(cg_root.join("memory/sprout/1")).unwrap();

        let me = StateDir::acquire(&root).unwrap();
        fs::create_dir_all(
            cg_root
                .join("memory")
                .join(me.cgroup_parent().strip_prefix("/").unwrap()),
        )
        .unwrap();

        let cleaned = cleanup_stale(&root, &cgroups);
        assert_eq!(cleaned, ["888888888", "999999"]);
        assert!(!root.join("999999").exists());
        assert!(!cg_root.join("memory/sprout/999999").exists());
        assert!(!cg_root.join("memory/sprout/888888888").exists());
        assert!(
            cg_root.join("memory/sprout/1").exists(),
            "another root's live agent is left alone"
        );
        fs::remove_dir(cg_root.join("memory/sprout/1")).unwrap();
        assert!(me.path().is_dir(), "a live agent's directory is kept");
        assert!(cg_root.join("memory/sprout").join(me.agent_id()).is_dir());

        me.remove(&cgroups).unwrap();
        assert!(root.is_dir(), "the root existed before the agent and stays");
        assert!(!cg_root.join("memory/sprout").exists());
    }

    /// The same on cgroup v2: one hierarchy, `/sprout/<id>` directly under its root,
    /// whose control files (plain files in a fake tree) are not taken for agents.
    #[test]
    fn v2_stale_cgroups_go_live_ones_stay() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("run");
        let cg_root = t.path().join("cg");
        fs::create_dir_all(cg_root.join("sprout")).unwrap();
        fs::write(cg_root.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        fs::write(cg_root.join("sprout/cgroup.procs"), "").unwrap();
        let cgroups = Cgroups::detect_at(&cg_root).unwrap();
        assert_eq!(cgroups.version(), CgroupVersion::V2);

        // A dead agent: directory with an unlocked lock file, and a nested cgroup.
        fs::create_dir_all(root.join("999999")).unwrap();
        fs::write(root.join("999999/lock"), "").unwrap();
        fs::create_dir_all(cg_root.join("sprout/999999/sprout-999999-1")).unwrap();
        // An orphan cgroup with no state directory and no such process.
        fs::create_dir_all(cg_root.join("sprout/888888888")).unwrap();
        // A cgroup of a live agent of another state root (pid 1 exists).
        fs::create_dir_all(cg_root.join("sprout/1/sprout-1-1")).unwrap();
        // What a v1 layout would hold: not looked at on v2.
        fs::create_dir_all(cg_root.join("memory/sprout/777777777")).unwrap();

        let me = StateDir::acquire(&root).unwrap();
        let mine = cg_root.join(me.cgroup_parent().strip_prefix("/").unwrap());
        fs::create_dir_all(mine.join("freezer-anchor")).unwrap();

        let cleaned = cleanup_stale(&root, &cgroups);
        assert_eq!(cleaned, ["888888888", "999999"]);
        assert!(!root.join("999999").exists());
        assert!(!cg_root.join("sprout/999999").exists());
        assert!(!cg_root.join("sprout/888888888").exists());
        assert!(
            cg_root.join("sprout/1/sprout-1-1").is_dir(),
            "another root's live agent is left alone"
        );
        assert!(me.path().is_dir(), "a live agent's directory is kept");
        assert!(mine.join("freezer-anchor").is_dir());
        assert!(cg_root.join("memory/sprout/777777777").is_dir());

        me.remove(&cgroups).unwrap();
        assert!(!mine.exists(), "the agent's own cgroup tree goes with it");
        assert!(cg_root.join("sprout/1").is_dir());
        assert!(root.is_dir(), "the root existed before the agent and stays");
    }

    #[test]
    fn a_root_is_removed_only_if_the_agent_created_it() {
        let t = tempfile::tempdir().unwrap();
        let cgroups = Cgroups::at(&t.path().join("cg"), CgroupVersion::V1);
        StateDir::acquire(t.path())
            .unwrap()
            .remove(&cgroups)
            .unwrap();
        assert!(t.path().is_dir());
        let created = t.path().join("new");
        StateDir::acquire(&created)
            .unwrap()
            .remove(&cgroups)
            .unwrap();
        assert!(!created.exists(), "an empty root the agent created goes");
    }

    #[test]
    fn a_second_acquire_of_a_live_directory_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let _me = StateDir::acquire(t.path()).unwrap();
        let err = StateDir::acquire(t.path()).unwrap_err().to_string();
        assert!(err.contains("locked by another agent"), "{err}");
    }
}
