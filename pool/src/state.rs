//! The agent's state directory and the cleanup of what crashed agents left behind.
//!
//! Each agent owns `<root>/<agent-id>/` (the agent id is its pid) and holds an
//! exclusive `flock` on `<root>/<agent-id>/lock` for its whole life. The directory's
//! `owners` file names the processes it belongs to, each by pid and start time (so a
//! reused pid is not taken for its owner): the agent, and its current spawner with
//! the inode of the spawner's end of its control socket. The spawner holds no
//! descriptor into the directory (whatever it holds, a half-built container init
//! holds too). Its sandboxes' cgroups live under `/sprout/<agent-id>/`.
//!
//! A directory belongs to a live agent while one of its recorded owners runs (or,
//! without an `owners` file, while its lock is held and a process `<agent-id>`
//! exists): an orphan that still holds the lock of a dead agent does not keep it.
//! [`cleanup_stale`] kills what is left of a dead one (processes in its cgroups,
//! processes holding a descriptor into its directory or its spawner's control
//! socket) and removes its cgroups and directory. Agents may use different state
//! roots (tests do), so a `/sprout/<id>` cgroup with no state directory under this
//! agent's root is only taken for a leftover when no process `<id>` exists.
//! [`sweep_stale_tables`], on a thread of its own while the agent goes on starting,
//! removes the firewall tables of agents with no process `<id>`, once no sandbox link
//! is left on the host ([`crate::network::remove_stale_tables`]).

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

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

/// Creates `dir` (`<root>/<pid>`) mode 0700 whatever the umask, and `root` mode
/// 0700 too if it does not exist yet (a root that exists keeps its mode). Only the
/// agent (root) may walk into it: the call socket, uploaded code, bundles and
/// container state in it are closed to every host account; sandboxes see the parts
/// they need through their bind mounts, whose resolution does not walk the host's
/// parents.
fn create_private_dir(root: &Path, dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let private = |p: &Path| {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(p)
            .and_then(|()| fs::set_permissions(p, fs::Permissions::from_mode(0o700)))
            .map_err(io_err("create", p))
    };
    if !root.exists() {
        private(root)?;
    }
    private(dir)
}

impl StateDir {
    /// Creates (mode 0700) and locks `<root>/<pid>`.
    pub fn acquire(root: &Path) -> Result<StateDir, Error> {
        let agent_id = std::process::id().to_string();
        let dir = root.join(&agent_id);
        let lock_path = dir.join("lock");
        let remove_root = root == Path::new(DEFAULT_ROOT) || !root.exists();
        // A cleaner may lock and remove a fresh directory between our mkdir and our
        // flock; the inode check notices and we try again.
        for _ in 0..3 {
            create_private_dir(root, &dir)?;
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
                write_owners(&dir, &[Owner::me("agent")])?;
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
        // A spawner that died with egress sandboxes left its firewall table (and
        // forwarding on); one that never gave a sandbox a network made neither, but
        // forwarding another agent's stale-table sweep left on (it was stopped half
        // way) goes off here too once no sprout table is left.
        let egress = self.dir.join(EGRESS_MARK).exists() || crate::network::forwarding_marked();
        if egress && crate::network::nft_installed() {
            crate::network::remove_table(&mut crate::network::HostTools, &self.agent_id);
        }
        cgroups.remove_if_unused(Path::new(CGROUP_PARENT));
        fs::remove_dir_all(&self.dir).map_err(io_err("remove", &self.dir))?;
        if self.remove_root {
            let _ = fs::remove_dir(&self.root); // fails while other agents use it
        }
        result
    }
}

/// The file in a state directory that names its owners.
const OWNERS: &str = "owners";

/// The file in a state directory that says its spawner began to give a sandbox a
/// network (a firewall table, forwarding): made before the first such step.
const EGRESS_MARK: &str = "egress";

/// Marks the state directory `dir` as one whose agent may have a firewall table (see
/// [`StateDir::remove`]).
pub(crate) fn mark_egress(dir: &Path) -> Result<(), String> {
    let mark = dir.join(EGRESS_MARK);
    if mark.exists() {
        return Ok(());
    }
    fs::write(&mark, "").map_err(|e| format!("write {}: {e}", mark.display()))
}

/// A process a state directory belongs to, as recorded in its `owners` file: one
/// line `<role> <pid> <start time> [<socket inode>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Owner {
    pub role: String,
    pub pid: i32,
    /// Clock ticks after boot (`/proc/<pid>/stat` field 22).
    pub start: u64,
    /// The spawner's end of its control socket (`socket:[inode]`).
    pub socket: Option<u64>,
}

impl Owner {
    /// This process.
    pub fn me(role: &str) -> Owner {
        let pid = std::process::id() as i32;
        Owner {
            role: role.to_owned(),
            pid,
            start: start_time(pid).unwrap_or(0),
            socket: None,
        }
    }

    /// Whether the recorded process still runs (same pid and start time, not a zombie).
    fn alive(&self) -> bool {
        matches!(proc_stat(self.pid), Some((state, start)) if start == self.start && state != 'Z' && state != 'X')
    }

    fn line(&self) -> String {
        match self.socket {
            Some(ino) => format!("{} {} {} {ino}\n", self.role, self.pid, self.start),
            None => format!("{} {} {}\n", self.role, self.pid, self.start),
        }
    }

    fn parse(line: &str) -> Option<Owner> {
        let mut it = line.split_whitespace();
        let role = it.next()?.to_owned();
        let pid = it.next()?.parse().ok()?;
        let start = it.next()?.parse().ok()?;
        let socket = match it.next() {
            Some(ino) => Some(ino.parse().ok()?),
            None => None,
        };
        Some(Owner {
            role,
            pid,
            start,
            socket,
        })
    }
}

/// Replaces `dir`'s `owners` file (written aside, then renamed: a reader sees the old
/// or the new list, never a part).
pub(crate) fn write_owners(dir: &Path, owners: &[Owner]) -> Result<(), Error> {
    let text: String = owners.iter().map(Owner::line).collect();
    let tmp = dir.join(".owners.tmp");
    fs::write(&tmp, text).map_err(io_err("write", &tmp))?;
    let path = dir.join(OWNERS);
    fs::rename(&tmp, &path).map_err(io_err("rename to", &path))
}

/// Records in the state directory `dir` that its agent (this process) now runs the
/// spawner `pid`, whose end of the control socket is `socket`.
pub(crate) fn record_spawner(dir: &Path, pid: i32, socket: u64) -> Result<(), Error> {
    let spawner = Owner {
        role: "spawner".to_owned(),
        pid,
        start: start_time(pid).unwrap_or(0),
        socket: Some(socket),
    };
    write_owners(dir, &[Owner::me("agent"), spawner])
}

/// The owners recorded in `dir`, or `None` without a readable `owners` file.
fn read_owners(dir: &Path) -> Option<Vec<Owner>> {
    let text = fs::read_to_string(dir.join(OWNERS)).ok()?;
    Some(text.lines().filter_map(Owner::parse).collect())
}

/// The state letter and start time of `pid` from `/proc/<pid>/stat`.
fn proc_stat(pid: i32) -> Option<(char, u64)> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The state letter and start time (field 22) of a `/proc/<pid>/stat` line. The
/// command name (field 2) is in parentheses and may hold spaces and parentheses.
/// (procfs's parser wants every field of a full line; only these two are needed.)
fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split(' ').collect();
    // `rest` starts at field 3 (the state).
    let state = fields.first()?.chars().next()?;
    let start = fields.get(22 - 3)?.parse().ok()?;
    Some((state, start))
}

/// When `pid` started, in clock ticks after boot.
pub(crate) fn start_time(pid: i32) -> Option<u64> {
    proc_stat(pid).map(|(_, start)| start)
}

/// SIGKILLs every process (but this one) that holds a descriptor, its working
/// directory or its root inside `dir`, or a descriptor on one of `sockets`
/// (`socket:[inode]`). Returns their pids. A whole `/proc` scan: only for cleanups.
/// (Read by hand: procfs opens and stats every descriptor it lists, which made this
/// scan 2.5 times as slow, 12 ms instead of 5 with 160 processes.)
pub(crate) fn kill_holders(dir: Option<&Path>, sockets: &[u64]) -> Vec<i32> {
    let me = std::process::id() as i32;
    let socket_links: Vec<String> = sockets.iter().map(|i| format!("socket:[{i}]")).collect();
    let holds = |target: &Path| {
        dir.is_some_and(|d| target.starts_with(d))
            || socket_links
                .iter()
                .any(|s| target.as_os_str() == std::ffi::OsStr::new(s))
    };
    let mut killed = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return killed;
    };
    for pid in procs
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| p != me)
    {
        let base = PathBuf::from(format!("/proc/{pid}"));
        let mut links: Vec<PathBuf> = vec![base.join("cwd"), base.join("root")];
        if let Ok(fds) = fs::read_dir(base.join("fd")) {
            links.extend(fds.filter_map(Result::ok).map(|e| e.path()));
        }
        // A process's root is `/` unless it moved it: only a root *inside* `dir` counts.
        if links
            .iter()
            .filter_map(|l| fs::read_link(l).ok())
            .any(|t| holds(&t))
        {
            tracing::info!(
                pid,
                "killing a leftover process that holds a dead agent's state"
            );
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            killed.push(pid);
        }
    }
    killed
}

/// Whether a live agent holds `<root>/<id>/lock`.
fn is_locked(root: &Path, id: &str) -> bool {
    let Ok(file) = File::open(root.join(id).join("lock")) else {
        return false;
    };
    Flock::lock(file, FlockArg::LockExclusiveNonblock).is_err()
}

/// Whether the state directory `<root>/<id>` belongs to a live agent: one of its
/// recorded owners runs; without an `owners` file (an agent between its lock and
/// its first write), its lock is held and a process `<id>` exists.
fn dir_is_live(root: &Path, id: &str) -> bool {
    match read_owners(&root.join(id)) {
        Some(owners) => owners.iter().any(Owner::alive),
        None => is_locked(root, id) && process_exists(id),
    }
}

/// Whether `name` can be an agent's id: a pid, in decimal.
fn is_agent_id(name: &str) -> bool {
    !name.is_empty() && name.len() <= 10 && name.bytes().all(|b| b.is_ascii_digit())
}

/// Whether a process `id` exists (an agent of another state root, maybe).
fn process_exists(id: &str) -> bool {
    id.parse::<i32>()
        .is_ok_and(|pid| Path::new("/proc").join(pid.to_string()).exists())
}

/// Removes the state directories and cgroups of agents that are gone, and returns
/// their ids. Live agents (including this one) are left alone: under `root`, a
/// directory is live while one of its recorded owners runs (see the module docs);
/// a cgroup `/sprout/<id>` with no
/// directory under `root` is live while a process `<id>` exists. What cannot be
/// removed (another cleaner racing this one) is logged and left for the next start.
pub fn cleanup_stale(root: &Path, cgroups: &Cgroups) -> Vec<String> {
    // Only agents' directories (named by the agent's id, its pid) are looked at:
    // anything else in a shared root is not sprout's to remove.
    let mut dirs: Vec<String> = Vec::new();
    if let Ok(entries) = fs::read_dir(root) {
        dirs.extend(
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|name| is_agent_id(name)),
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
        .filter(|id| !dir_is_live(root, id))
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
        if dir.is_dir() {
            // Orphans (a half-built container init) may hold the old lock, the old
            // spawner's control socket, or a directory inside; they go first.
            let sockets: Vec<u64> = read_owners(&dir)
                .unwrap_or_default()
                .iter()
                .filter_map(|o| o.socket)
                .collect();
            kill_holders(Some(&dir), &sockets);
        }
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

/// Removes the firewall tables of agents gone, whatever their state root, once no
/// sandbox link is left (see [`crate::network::remove_stale_tables`]), on a thread of
/// its own: listing the tables runs `nft` (3 ms here), which an agent's start need
/// not wait for (its own table has a name of its own). When [`cleanup_stale`] has
/// just killed a dead agent's sandboxes (`killed`), their links go with their
/// namespaces a moment later: it waits for that, a bounded while. Without `nft`, or
/// when no thread can be started, it runs on the caller's thread.
pub fn sweep_stale_tables(killed: bool) -> TableSweep {
    if !crate::network::nft_installed() {
        return TableSweep(None);
    }
    let spawned = std::thread::Builder::new()
        .name("sprout-table-sweep".into())
        .spawn(move || remove_stale_tables(killed));
    match spawned {
        Ok(thread) => TableSweep(Some(thread)),
        Err(e) => {
            tracing::warn!(error = %e, "could not start a thread for the stale table sweep");
            remove_stale_tables(killed);
            TableSweep(None)
        }
    }
}

/// A running [`sweep_stale_tables`]: waited for by [`TableSweep::wait`], or when
/// dropped. An agent waits before its first sandbox gets a network (the sweep leaves
/// the tables alone while any sandbox link exists, its own agent's too) and before it
/// removes its state.
#[derive(Debug)]
pub struct TableSweep(Option<std::thread::JoinHandle<()>>);

impl TableSweep {
    /// Returns once the sweep has ended (at once after the first time).
    pub fn wait(&mut self) {
        if let Some(thread) = self.0.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for TableSweep {
    fn drop(&mut self) {
        self.wait();
    }
}

fn remove_stale_tables(killed: bool) {
    let deadline = Instant::now() + STALE_LINKS_WAIT;
    loop {
        match crate::network::remove_stale_tables(&mut crate::network::HostTools, process_exists) {
            Ok(ids) => {
                for id in ids {
                    tracing::info!(agent_id = %id, "removed a stopped agent's firewall table");
                }
                return;
            }
            Err(e) if !killed || Instant::now() >= deadline => {
                tracing::info!(reason = %e, "left stale firewall tables for a later clean-up");
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// How long a clean-up waits for a dead agent's sandbox links to go.
const STALE_LINKS_WAIT: Duration = Duration::from_secs(2);

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
        // What is not an agent's, in a root shared with other things.
        fs::create_dir_all(root.join("data/code")).unwrap();
        fs::write(root.join("notes"), "x").unwrap();

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
        assert!(
            root.join("data/code").is_dir(),
            "what is not an agent's stays"
        );
        assert!(root.join("notes").is_file(), "what is not an agent's stays");
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

    /// The agent's directory, and a root it creates, are closed to other accounts
    /// whatever the umask; a root that exists keeps its mode.
    #[test]
    fn the_state_directory_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("new-root");
        let me = StateDir::acquire(&root).unwrap();
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(me.path()), 0o700);
        drop(me);
        let existing = t.path().join("existing");
        fs::create_dir(&existing).unwrap();
        fs::set_permissions(&existing, fs::Permissions::from_mode(0o755)).unwrap();
        let me = StateDir::acquire(&existing).unwrap();
        assert_eq!(mode(&existing), 0o755);
        assert_eq!(mode(me.path()), 0o700);
    }

    #[test]
    fn stat_lines_give_state_and_start_time() {
        let line = "42 (a) b) (c) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 987654 1 2 3";
        assert_eq!(parse_stat(line), Some(('S', 987654)));
        assert_eq!(parse_stat("42 (x) S 1"), None);
        let me = std::process::id() as i32;
        assert!(start_time(me).is_some_and(|t| t > 0));
    }

    #[test]
    fn owners_are_recorded_and_a_reused_pid_is_not_an_owner() {
        let t = tempfile::tempdir().unwrap();
        let me = Owner::me("agent");
        assert!(me.alive());
        record_spawner(t.path(), me.pid, 1234).unwrap();
        let owners = read_owners(t.path()).unwrap();
        assert_eq!(owners.len(), 2);
        assert_eq!(owners[0], me);
        assert_eq!(owners[1].role, "spawner");
        assert_eq!(owners[1].socket, Some(1234));
        let reused = Owner {
            start: me.start + 1,
            ..me.clone()
        };
        assert!(!reused.alive(), "same pid, other start time: not the owner");
        assert_eq!(Owner::parse("spawner 12 34 x"), None);
    }

    /// An orphan of a dead agent holds its lock and a directory inside its state: the
    /// directory is still taken for stale, the orphan is killed and all is removed.
    #[test]
    fn an_orphan_holding_the_lock_does_not_keep_a_dead_agents_state() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("run");
        let cgroups = Cgroups::at(&t.path().join("cg"), CgroupVersion::V1);
        let dead = root.join("999999999");
        fs::create_dir_all(dead.join("containers/sprout-999999999-1")).unwrap();
        let lock = Flock::lock(
            File::create(dead.join("lock")).unwrap(),
            FlockArg::LockExclusiveNonblock,
        )
        .unwrap();
        write_owners(
            &dead,
            &[Owner {
                role: "agent".into(),
                pid: 999_999_999,
                start: 1,
                socket: None,
            }],
        )
        .unwrap();
        let mut orphan = std::process::Command::new("sleep")
            .arg("60")
            .current_dir(dead.join("containers/sprout-999999999-1"))
            .spawn()
            .unwrap();
        assert!(!dir_is_live(&root, "999999999"));
        let cleaned = cleanup_stale(&root, &cgroups);
        let status = orphan.wait().unwrap();
        assert_eq!(cleaned, ["999999999"]);
        assert!(!dead.exists());
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "the orphan was killed"
        );
        drop(lock);
    }
}
