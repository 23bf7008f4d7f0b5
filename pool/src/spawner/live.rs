//! The spawner's live sandboxes: the libcontainer containers it built and the forked
//! sandboxes it adopted ([`Member`]) and has not destroyed, how they are built,
//! adopted and destroyed, and the mount operations it runs
//! inside them (code attached at `/code` or `/fns/<name>-<version>`, a workflow's
//! scratch on `/workflow`) and network operations (`lo` up at creation, an egress
//! sandbox's veth pair and `/etc/resolv.conf`; see [`crate::network`]). Only the
//! spawner process uses this: every call here may clone a container process or enter
//! a sandbox's mount or network namespace.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use rootfs::{DEPS_DIR, FUNCTIONS_DIR, WORKFLOW_DIR, WORKFLOW_DIR_MB};

use crate::network::{Egress, HostTools, RESOLV_CONF};
use crate::{sys, Cgroups};

/// One live sandbox: a container libcontainer built (its init is the spawner's
/// child), or a sandbox forked from a fork server and adopted: its first process
/// `pid` (PID 1 of its pid namespace, not the spawner's child) and its cgroup. No
/// descriptor is kept for either: every container built later would inherit it.
enum Member {
    Container(Container),
    Forked { pid: i32, cgroup: PathBuf },
}

/// The sandboxes one spawner created or adopted and has not destroyed. Errors are messages for
/// the agent (a [`super::protocol::SpawnerReply::Failed`]), with their whole cause.
pub(super) struct Live {
    /// libcontainer's state root.
    root: PathBuf,
    cgroups: Cgroups,
    /// The agent's cgroup: an adopted sandbox's cgroup is `<this>/<id>`.
    cgroup_parent: PathBuf,
    members: HashMap<String, Member>,
    /// Sandboxes with a workflow scratch attached over their own.
    scratch_attached: HashSet<String>,
    /// Sandboxes with outbound network, and the agent's firewall table.
    egress: Egress<HostTools>,
}

impl Live {
    /// No sandboxes yet; containers keep their state under `root`.
    pub(super) fn new(
        root: PathBuf,
        cgroups: Cgroups,
        cgroup_parent: PathBuf,
        agent_id: String,
    ) -> Live {
        Live {
            root,
            cgroups,
            cgroup_parent,
            members: HashMap::new(),
            scratch_attached: HashSet::new(),
            egress: Egress::new(agent_id, HostTools),
        }
    }

    /// Builds and starts container `id`. Its stdin is the shim's end of a new socket
    /// pair (the other end is returned, for the agent, with the sandbox's pid); its
    /// stdout and stderr are `output`, the agent's pipe, so that nothing in the sandbox
    /// holds a descriptor of the spawner's (its stderr is the daemon's log).
    pub(super) fn create(
        &mut self,
        id: String,
        bundle: &Path,
        output: Option<OwnedFd>,
    ) -> Result<(i32, OwnedFd), String> {
        let fail = |what: &str, e: &dyn std::error::Error| format!("{what}: {}", ipc::chain(e));
        let stderr = output.ok_or("create carries no output pipe descriptor")?;
        let stdout = stderr
            .try_clone()
            .map_err(|e| fail("dup the output pipe", &e))?;
        let (agent_end, shim_end) = UnixStream::pair().map_err(|e| fail("socket pair", &e))?;
        let built = ContainerBuilder::new(id.clone(), SyscallType::default())
            .with_root_path(&self.root)
            .map(|b| {
                b.with_stdin(OwnedFd::from(shim_end))
                    .with_stdout(stdout)
                    .with_stderr(stderr)
                    .as_init(bundle)
                    .with_systemd(false)
                    .with_detach(true)
                    .build()
            });
        let mut container = match built {
            Ok(Ok(c)) => c,
            Ok(Err(e)) | Err(e) => {
                self.remove_partial(&id);
                return Err(fail("build container", &e));
            }
        };
        if let Err(e) = container.start() {
            let message = fail("start container", &e);
            let _ = destroy(Member::Container(container), &self.cgroups);
            return Err(message);
        }
        let pid = container.pid().map(|p| p.as_raw()).unwrap_or(0);
        if let Err(e) = loopback_up(pid) {
            let message = format!("bring the sandbox's loopback up: {e}");
            let _ = destroy(Member::Container(container), &self.cgroups);
            return Err(message);
        }
        self.members.insert(id, Member::Container(container));
        Ok((pid, OwnedFd::from(agent_end)))
    }

    /// Registers the forked sandbox `id`: its first process `pid` (PID 1 of its
    /// own namespaces), which must be in `cgroup`, `<agent's cgroup>/<id>`. Its `lo`
    /// is brought up as a created sandbox's is. From then on it is entered, given
    /// network and destroyed like a container.
    pub(super) fn adopt(&mut self, id: String, pid: i32, cgroup: &Path) -> Result<(), String> {
        if self.members.contains_key(&id) {
            return Err(format!("sandbox {id} is live already"));
        }
        let expected = self.cgroup_parent.join(&id);
        if cgroup != expected {
            return Err(format!(
                "cgroup {} is not the sandbox's ({})",
                cgroup.display(),
                expected.display()
            ));
        }
        let process = ForkedProcess::find(&self.cgroups, &id, pid, cgroup)?;
        loopback_up(pid).map_err(|e| format!("bring the sandbox's loopback up: {e}"))?;
        process.check_alive()?;
        self.members.insert(
            id,
            Member::Forked {
                pid,
                cgroup: cgroup.to_path_buf(),
            },
        );
        Ok(())
    }

    /// Kills sandbox `id`'s processes, reaps its init and deletes its container.
    pub(super) fn destroy(&mut self, id: &str) -> Result<(), String> {
        self.scratch_attached.remove(id);
        // The network first, while the sandbox's namespace holds the link's name.
        self.egress.detach(id);
        match self.members.remove(id) {
            Some(m) => destroy(m, &self.cgroups),
            None => Err(format!("no live sandbox {id}")),
        }
    }

    /// Destroys every sandbox left (the spawner is exiting): the forked ones before
    /// the containers. A forked sandbox lives in the fork server's pid namespace, and
    /// the fork server (a container) killed first would wait in its exit for every
    /// process of that namespace, which one in a frozen sandbox never is until
    /// thawed: reaping it would hang the spawner.
    pub(super) fn destroy_all(&mut self) {
        self.scratch_attached.clear();
        let mut members: Vec<(String, Member)> = self.members.drain().collect();
        members.sort_by_key(|(_, m)| matches!(m, Member::Container(_)));
        for (id, m) in members {
            self.egress.detach(&id);
            if let Err(message) = destroy(m, &self.cgroups) {
                tracing::error!(sandbox_id = %id, %message, "spawner: destroy at exit failed");
            }
        }
    }

    /// Makes the host directory `dir` visible read-only at `target` in sandbox `id`
    /// (making the directory first under [`FUNCTIONS_DIR`] or [`DEPS_DIR`]).
    pub(super) fn attach_code(&self, id: &str, dir: &Path, target: &Path) -> Result<(), String> {
        self.in_sandbox(id, || {
            let tree = sys::detached_readonly_tree(dir)
                .map_err(|e| format!("clone {} read-only: {e}", dir.display()))?;
            Ok(move || {
                if let Some(parent) = [FUNCTIONS_DIR, DEPS_DIR]
                    .into_iter()
                    .find(|d| target.starts_with(d))
                {
                    // As the owner of the directory (root's, or in a forked
                    // sandbox its user namespace's root: see sys::as_fs_owner).
                    use std::os::unix::fs::MetadataExt;
                    let owner = std::fs::metadata(parent)?;
                    sys::as_fs_owner(owner.uid(), owner.gid(), || std::fs::create_dir_all(target))?;
                }
                sys::move_mount(tree.as_fd(), target)
            })
        })
        .map_err(|e| format!("attach {} at {}: {e}", dir.display(), target.display()))
    }

    /// Gives sandbox `id` outbound network ([`crate::network`]) and the host's DNS
    /// configuration, read-only, on its `/etc/resolv.conf`.
    pub(super) fn attach_network(&mut self, id: &str) -> Result<(), String> {
        let (pid, process) = self.init_of(id)?;
        // `root` is the state directory's `containers`.
        if let Some(state_dir) = self.root.parent() {
            crate::state::mark_egress(state_dir)?;
        }
        let slot = self.egress.attach(id, pid)?;
        if let Some(Err(e)) = process.map(|p| p.check_alive()) {
            self.egress.detach(id);
            return Err(e);
        }
        let resolv = self.in_sandbox(id, || {
            let host = Path::new(RESOLV_CONF)
                .canonicalize()
                .map_err(|e| format!("resolve {RESOLV_CONF}: {e}"))?;
            let tree = sys::detached_readonly_file(&host)
                .map_err(|e| format!("clone {} read-only: {e}", host.display()))?;
            Ok(move || sys::move_mount(tree.as_fd(), Path::new(RESOLV_CONF)))
        });
        if let Err(e) = resolv {
            self.egress.detach(id);
            return Err(format!("attach the host's {RESOLV_CONF}: {e}"));
        }
        tracing::debug!(sandbox_id = %id, address = %slot.sandbox_address(), link = %slot.host_link(), "network attached");
        Ok(())
    }

    /// Puts a clone of the detached mount `scratch` on sandbox `id`'s `/workflow`.
    pub(super) fn attach_scratch(
        &mut self,
        id: String,
        scratch: Option<OwnedFd>,
    ) -> Result<(), String> {
        let scratch = scratch.ok_or("attach_scratch carries no mount descriptor")?;
        self.in_sandbox(&id, || {
            let tree = sys::clone_tree(scratch.as_fd())
                .map_err(|e| format!("clone the scratch mount: {e}"))?;
            Ok(move || sys::move_mount(tree.as_fd(), Path::new(WORKFLOW_DIR)))
        })?;
        self.scratch_attached.insert(id);
        Ok(())
    }

    /// Removes the scratch attached on sandbox `id`'s `/workflow`.
    pub(super) fn detach_scratch(&mut self, id: &str) -> Result<(), String> {
        if !self.scratch_attached.contains(id) {
            return Err(format!("sandbox {id} has no workflow scratch attached"));
        }
        self.in_sandbox(id, || Ok(|| sys::unmount_detach(Path::new(WORKFLOW_DIR))))?;
        self.scratch_attached.remove(id);
        Ok(())
    }

    /// Replaces sandbox `id`'s own `/workflow` with a new, empty tmpfs.
    pub(super) fn reset_scratch(&self, id: &str) -> Result<(), String> {
        if self.scratch_attached.contains(id) {
            return Err(format!(
                "sandbox {id} has a workflow scratch attached over its own"
            ));
        }
        self.in_sandbox(id, || {
            let fresh = sys::new_tmpfs(WORKFLOW_DIR_MB).map_err(|e| format!("new tmpfs: {e}"))?;
            Ok(move || {
                let dir = Path::new(WORKFLOW_DIR);
                sys::unmount_detach(dir)?;
                sys::move_mount(fresh.as_fd(), dir)
            })
        })
    }

    /// Puts a clone of what sandbox `from` sees on its `/workflow` on sandbox `id`'s.
    pub(super) fn attach_scratch_from(&mut self, id: String, from: &str) -> Result<(), String> {
        let tree = self.in_sandbox(from, || Ok(|| sys::clone_path(Path::new(WORKFLOW_DIR))))?;
        self.in_sandbox(&id, || {
            Ok(move || sys::move_mount(tree.as_fd(), Path::new(WORKFLOW_DIR)))
        })?;
        self.scratch_attached.insert(id);
        Ok(())
    }

    /// Runs a mount operation inside sandbox `id`'s mount namespace: `prepare` runs
    /// here (in the spawner's namespace) and returns the step to run in the sandbox's;
    /// the spawner always comes back to its own.
    fn in_sandbox<T, F>(
        &self,
        id: &str,
        prepare: impl FnOnce() -> Result<F, String>,
    ) -> Result<T, String>
    where
        F: FnOnce() -> std::io::Result<T>,
    {
        let (pid, process) = self.init_of(id)?;
        let ns_path = format!("/proc/{pid}/ns/mnt");
        let ns = File::open(&ns_path).map_err(|e| format!("open {ns_path}: {e}"))?;
        // The namespace opened is the sandbox's only if its process was still the
        // one adopted when it was opened.
        if let Some(p) = process {
            p.check_alive()?;
        }
        // Our own mount namespace, to come back to. Opened for this operation only: a
        // descriptor the spawner keeps is inherited by every container it builds.
        let home =
            File::open("/proc/self/ns/mnt").map_err(|e| format!("open /proc/self/ns/mnt: {e}"))?;
        let step = prepare()?;
        sys::in_mount_ns(ns.as_fd(), home.as_fd(), step)
            .map_err(|e| format!("in sandbox {id}: {e}"))
    }

    /// The pid of sandbox `id`'s first process, to enter its namespaces by; for a
    /// forked sandbox also the pidfd that proves the pid still names that process
    /// ([`ForkedProcess::check_alive`] after the namespace is opened).
    fn init_of(&self, id: &str) -> Result<(i32, Option<ForkedProcess>), String> {
        match self.members.get(id) {
            None => Err(format!("no live sandbox {id}")),
            Some(Member::Container(c)) => c
                .pid()
                .map(|p| (p.as_raw(), None))
                .ok_or_else(|| format!("sandbox {id} has no init process")),
            Some(Member::Forked { pid, cgroup }) => {
                ForkedProcess::find(&self.cgroups, id, *pid, cgroup).map(|p| (*pid, Some(p)))
            }
        }
    }

    /// Deletes what a failed build of `id` left in the state root.
    fn remove_partial(&self, id: &str) {
        let dir = self.root.join(id);
        if let Ok(c) = Container::load(dir.clone()) {
            let _ = destroy(Member::Container(c), &self.cgroups);
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Brings `lo` up in the network namespace of process `pid` (a new namespace's
/// loopback is down): enter it, two ioctls, come back. Descriptors are opened for
/// this call only, so no container inherits them.
fn loopback_up(pid: i32) -> std::io::Result<()> {
    let ns = match File::open(format!("/proc/{pid}/ns/net")) {
        // Its init exited already (a shim that fails at once): the namespace is gone
        // with it, and the agent hears of the death on the shim's channel.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        opened => opened?,
    };
    let home = File::open("/proc/self/ns/net")?;
    sys::in_net_ns(ns.as_fd(), home.as_fd(), || sys::link_up(c"lo"))
}

/// A forked sandbox's first process, held by a pidfd for one operation: a pid is
/// not the spawner's child, so once its process is gone the pid may name another.
struct ForkedProcess {
    id: String,
    pid: i32,
    pidfd: OwnedFd,
}

impl ForkedProcess {
    /// Process `pid`, checked to be in `cgroup` after its pidfd was opened (so the
    /// pidfd is of the process that was in the cgroup).
    fn find(cgroups: &Cgroups, id: &str, pid: i32, cgroup: &Path) -> Result<ForkedProcess, String> {
        let gone = || format!("sandbox {id}: its process {pid} is gone");
        if pid <= 0 {
            return Err(format!("sandbox {id}: pid {pid} is not a process id"));
        }
        let pidfd = sys::pidfd_open(nix::unistd::Pid::from_raw(pid)).map_err(|_| gone())?;
        match cgroups.contains_pid(cgroup, pid) {
            Ok(true) => Ok(ForkedProcess {
                id: id.to_owned(),
                pid,
                pidfd,
            }),
            Ok(false) => Err(format!(
                "sandbox {id}: process {pid} is not in cgroup {}",
                cgroup.display()
            )),
            Err(_) => Err(gone()),
        }
    }

    /// Whether the process is still alive (so what was opened by its pid is its).
    fn check_alive(&self) -> Result<(), String> {
        if sys::readable(self.pidfd.as_fd(), std::time::Duration::ZERO) {
            return Err(format!(
                "sandbox {}: its process {} exited",
                self.id, self.pid
            ));
        }
        Ok(())
    }
}

fn destroy(member: Member, cgroups: &Cgroups) -> Result<(), String> {
    match member {
        Member::Container(c) => destroy_container(c, cgroups),
        Member::Forked { pid, cgroup } => {
            // PID 1 of the sandbox's pid namespace: killing it kills the namespace.
            // Only while it is still the sandbox's (in its cgroup).
            if let Ok(p) = ForkedProcess::find(cgroups, "", pid, &cgroup) {
                let _ = rustix::process::pidfd_send_signal(&p.pidfd, rustix::process::Signal::KILL);
            }
            // Whatever is left (and a frozen sandbox) goes with its cgroup.
            cgroups.thaw_tree(&cgroup);
            cgroups
                .remove_tree(&cgroup)
                .map_err(|e| format!("remove cgroup {}: {}", cgroup.display(), ipc::chain(&e)))
        }
    }
}

fn destroy_container(mut container: Container, cgroups: &Cgroups) -> Result<(), String> {
    if let Some(pid) = container.pid() {
        // Killing the PID namespace's init kills every process in it; reaping it
        // returns once they are all gone. A frozen sandbox (cgroup v1) only dies once
        // thawed, so thaw after the kill.
        let _ = kill(pid, Signal::SIGKILL);
        if let Ok(config) = container.spec() {
            cgroups.thaw_tree(&config.cgroup_path);
        }
        let _ = waitpid(pid, None);
    }
    container
        .delete(true)
        .map_err(|e| format!("delete container {}: {}", container.id(), ipc::chain(&e)))
}
