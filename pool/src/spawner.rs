//! The spawner: the one single-threaded process that calls libcontainer.
//!
//! Forked from the agent before the agent starts any thread. It creates a sandbox by
//! building and starting a libcontainer container whose stdin is one end of a fresh
//! socket pair (the shim's channel) and hands the other end to the agent. A sandbox's
//! init (the shim) is the spawner's child, so the spawner reaps it when it destroys
//! the sandbox. When the agent's end of the control channel closes without a
//! `shutdown`, the agent died: the spawner destroys every sandbox and removes the
//! agent's cgroups and state directory itself.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, Pid};
use serde::{Deserialize, Serialize};

use crate::{sys, Cgroups, Error, Freezer, Sandbox, Scratch, SpawnerFailure, StateDir};
use ipc::proto::ShimLink;
use ipc::Channel;

#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "op", rename_all = "snake_case")]
enum SpawnerRequest {
    Create {
        id: String,
        bundle: PathBuf,
    },
    Destroy {
        id: String,
    },
    /// Makes `dir` (a host directory) visible read-only at `target` inside the
    /// sandbox (`/code`, or a new directory under `/fns`).
    AttachCode {
        id: String,
        dir: PathBuf,
        target: PathBuf,
    },
    /// Carries a descriptor: a detached mount to clone onto the sandbox's `/workflow`.
    AttachScratch {
        id: String,
    },
    /// Removes what `AttachScratch` put on the sandbox's `/workflow`.
    DetachScratch {
        id: String,
    },
    /// Replaces the sandbox's own `/workflow` with a new, empty tmpfs.
    ResetScratch {
        id: String,
    },
    /// Puts a clone of sandbox `from`'s `/workflow` on sandbox `id`'s.
    AttachScratchFrom {
        id: String,
        from: String,
    },
    /// The agent is exiting cleanly and removes its state itself.
    Shutdown,
}

#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "op", rename_all = "snake_case")]
enum SpawnerReply {
    /// Carries one descriptor: the agent's end of the shim's channel.
    Created {
        pid: i32,
    },
    Destroyed,
    Done,
    Failed {
        message: String,
    },
}

/// The agent's handle on its spawner process.
#[derive(Debug)]
pub struct Spawner {
    /// `None` once [`Spawner::shutdown`] ran.
    channel: Mutex<Option<Channel>>,
    pid: Pid,
}

/// What the forked spawner needs to clean up after an agent that died.
struct Orphaned {
    state_dir: PathBuf,
    cgroup_parent: PathBuf,
    cgroups: Cgroups,
}

impl Spawner {
    /// Forks the spawner. Must be called while this process has a single thread.
    pub fn start(state: &StateDir, cgroups: &Cgroups) -> Result<Spawner, Error> {
        let threads = sys::thread_count();
        if threads != 1 {
            return Err(Error::Threaded { threads });
        }
        let (ours, theirs) = Channel::pair().map_err(|e| Error::Spawner(ipc::Error::Io(e)))?;
        let containers = state.containers();
        let orphaned = Orphaned {
            state_dir: state.path().to_path_buf(),
            cgroup_parent: state.cgroup_parent(),
            cgroups: cgroups.clone(),
        };
        match sys::fork_single_threaded().map_err(Error::Fork)? {
            ForkResult::Child => {
                drop(ours);
                sys::set_process_name(c"sprout-spawner");
                sys::reset_signals();
                let code = serve(theirs, &containers, orphaned);
                sys::exit_now(code)
            }
            ForkResult::Parent { child } => {
                drop(theirs);
                tracing::debug!(spawner_pid = child.as_raw(), "spawner started");
                Ok(Spawner {
                    channel: Mutex::new(Some(ours)),
                    pid: child,
                })
            }
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    fn call(&self, req: &SpawnerRequest) -> Result<ipc::Message<SpawnerReply>, Error> {
        self.call_with(req, &[])
    }

    fn call_with(
        &self,
        req: &SpawnerRequest,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<ipc::Message<SpawnerReply>, Error> {
        let mut guard = self.channel.lock().unwrap_or_else(|p| p.into_inner());
        let ch = guard.as_mut().ok_or(Error::Stopped)?;
        ch.send(req, b"", fds).map_err(Error::Spawner)?;
        ch.recv().map_err(Error::Spawner)
    }

    /// Sends a request about `sandbox` that is answered with `done`.
    fn mount_op(
        &self,
        sandbox_id: &str,
        what: &'static str,
        req: &SpawnerRequest,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<(), Error> {
        match self.call_with(req, fds)?.header {
            SpawnerReply::Done => Ok(()),
            SpawnerReply::Failed { message } => Err(Error::Mount {
                id: sandbox_id.to_owned(),
                what,
                source: SpawnerFailure(message),
            }),
            other => Err(unexpected(other, "done")),
        }
    }

    /// Creates and starts the sandbox `id` from `bundle`; `cgroup` is the cgroup path
    /// its spec names. Returns it in state `Creating` with the shim's channel.
    pub fn create(
        &self,
        id: &str,
        bundle: &Path,
        cgroup: PathBuf,
        cgroups: &Cgroups,
    ) -> Result<(Sandbox, ShimLink), Error> {
        let span = tracing::debug_span!("create_sandbox", sandbox_id = %id);
        let _g = span.enter();
        let reply = self.call(&SpawnerRequest::Create {
            id: id.to_owned(),
            bundle: bundle.to_path_buf(),
        })?;
        match reply.header {
            SpawnerReply::Created { pid } => {
                let fd =
                    reply
                        .fds
                        .into_iter()
                        .next()
                        .ok_or(Error::Spawner(ipc::Error::MissingFds {
                            expected: 1,
                            queued: 0,
                        }))?;
                tracing::debug!(pid, "sandbox started");
                let freezer = match Freezer::open(cgroups, &cgroup) {
                    Ok(f) => f,
                    Err(e) => {
                        let _ = self.call(&SpawnerRequest::Destroy { id: id.to_owned() });
                        return Err(e);
                    }
                };
                Ok((
                    Sandbox::new(id.to_owned(), pid, cgroup, freezer),
                    ShimLink(Channel::from_fd(fd)),
                ))
            }
            SpawnerReply::Failed { message } => Err(Error::Create {
                id: id.to_owned(),
                source: SpawnerFailure(message),
            }),
            other => Err(unexpected(other, "created")),
        }
    }

    /// Kills every process of the sandbox, reaps its init and removes its container
    /// state and cgroup.
    pub fn destroy(&self, sandbox: &mut Sandbox) -> Result<(), Error> {
        let span = tracing::debug_span!("destroy_sandbox", sandbox_id = %sandbox.id());
        let _g = span.enter();
        sandbox.die();
        match self
            .call(&SpawnerRequest::Destroy {
                id: sandbox.id().to_owned(),
            })?
            .header
        {
            SpawnerReply::Destroyed => Ok(()),
            SpawnerReply::Failed { message } => Err(Error::Destroy {
                id: sandbox.id().to_owned(),
                source: SpawnerFailure(message),
            }),
            other => Err(unexpected(other, "destroyed")),
        }
    }

    /// Makes the host directory `dir` visible, read-only, at [`rootfs::CODE_DIR`] in the
    /// running sandbox.
    pub fn bind_code(&self, sandbox: &Sandbox, dir: &Path) -> Result<(), Error> {
        self.attach_code(sandbox.id(), dir, Path::new(rootfs::CODE_DIR))
    }

    /// Makes the host directory `dir` visible, read-only, at `target` in the running
    /// sandbox (a new directory is made for it under [`rootfs::FUNCTIONS_DIR`]): the
    /// spawner clones `dir` as a detached read-only mount and attaches it inside the
    /// sandbox's mount namespace. The host's mount table does not change.
    pub fn attach_code(&self, sandbox_id: &str, dir: &Path, target: &Path) -> Result<(), Error> {
        let span = tracing::debug_span!("attach_code", sandbox_id, dir = %dir.display(), target = %target.display());
        let _g = span.enter();
        let req = SpawnerRequest::AttachCode {
            id: sandbox_id.to_owned(),
            dir: dir.to_path_buf(),
            target: target.to_path_buf(),
        };
        self.mount_op(sandbox_id, "make the function's code visible", &req, &[])
    }

    /// Puts a clone of `scratch` on the sandbox's [`rootfs::WORKFLOW_DIR`], over its own.
    pub fn attach_scratch(&self, sandbox_id: &str, scratch: &Scratch) -> Result<(), Error> {
        let req = SpawnerRequest::AttachScratch {
            id: sandbox_id.to_owned(),
        };
        self.mount_op(
            sandbox_id,
            "attach the workflow scratch",
            &req,
            &[scratch.0.as_fd()],
        )
    }

    /// Removes an attached workflow scratch; the sandbox's own is visible again.
    pub fn detach_scratch(&self, sandbox_id: &str) -> Result<(), Error> {
        let req = SpawnerRequest::DetachScratch {
            id: sandbox_id.to_owned(),
        };
        self.mount_op(sandbox_id, "detach the workflow scratch", &req, &[])
    }

    /// Replaces the sandbox's own [`rootfs::WORKFLOW_DIR`] tmpfs with a new, empty one
    /// (the old one lives on only for whoever still holds a descriptor into it).
    pub fn reset_scratch(&self, sandbox_id: &str) -> Result<(), Error> {
        let req = SpawnerRequest::ResetScratch {
            id: sandbox_id.to_owned(),
        };
        self.mount_op(sandbox_id, "replace the workflow scratch", &req, &[])
    }

    /// Puts a clone of what sandbox `from` sees on its `/workflow` (its own scratch,
    /// or one attached there) on `sandbox_id`'s. A clone of a mount from another
    /// namespace can only be cloned again inside that namespace, so it is cloned
    /// there and attached at once.
    pub fn attach_scratch_from(&self, sandbox_id: &str, from: &str) -> Result<(), Error> {
        let req = SpawnerRequest::AttachScratchFrom {
            id: sandbox_id.to_owned(),
            from: from.to_owned(),
        };
        self.mount_op(
            sandbox_id,
            "attach the caller's workflow scratch",
            &req,
            &[],
        )
    }

    /// Tells the spawner the agent is leaving cleanly, and waits for it to exit after
    /// it destroyed whatever sandboxes remain. Later calls do nothing; later requests
    /// fail with [`Error::Stopped`].
    pub fn shutdown(&self) -> Result<(), Error> {
        let Some(ch) = self
            .channel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return Ok(());
        };
        let sent = ch
            .send(&SpawnerRequest::Shutdown, b"", &[])
            .map_err(Error::Spawner);
        drop(ch);
        let _ = waitpid(self.pid, None);
        sent
    }
}

fn unexpected(reply: SpawnerReply, expected: &'static str) -> Error {
    Error::Spawner(ipc::Error::Unexpected {
        op: format!("{reply:?}"),
        expected,
    })
}

/// The spawner's loop. Returns its exit code.
fn serve(mut channel: Channel, containers: &Path, orphaned: Orphaned) -> i32 {
    let mut live: HashMap<String, Container> = HashMap::new();
    // Sandboxes with a workflow scratch attached over their own.
    let mut scratch_attached: std::collections::HashSet<String> = Default::default();
    // Our own mount namespace, to come back to after attaching code in a sandbox's.
    let home = match File::open("/proc/self/ns/mnt") {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(error = %e, "spawner: open /proc/self/ns/mnt");
            return 1;
        }
    };
    let clean_exit = loop {
        let (req, mut msg_fds) = match channel.recv::<SpawnerRequest>() {
            Ok(m) => (m.header, m.fds),
            Err(ipc::Error::Closed) => break false,
            Err(e) => {
                tracing::error!(error = %ipc::chain(&e), "spawner: bad request; exiting");
                break false;
            }
        };
        let sent = match req {
            SpawnerRequest::Create { id, bundle } => {
                match create(&id, &bundle, containers, &orphaned.cgroups) {
                    Ok((container, agent_end)) => {
                        let pid = container.pid().map(|p| p.as_raw()).unwrap_or(0);
                        live.insert(id, container);
                        channel.send(&SpawnerReply::Created { pid }, b"", &[agent_end.as_fd()])
                    }
                    Err(message) => channel.send(&SpawnerReply::Failed { message }, b"", &[]),
                }
            }
            SpawnerRequest::Destroy { id } => {
                scratch_attached.remove(&id);
                let reply = match live.remove(&id) {
                    Some(c) => match destroy(c, &orphaned.cgroups) {
                        Ok(()) => SpawnerReply::Destroyed,
                        Err(message) => SpawnerReply::Failed { message },
                    },
                    None => SpawnerReply::Failed {
                        message: format!("no live sandbox {id}"),
                    },
                };
                channel.send(&reply, b"", &[])
            }
            SpawnerRequest::AttachCode { id, dir, target } => {
                let inside = target.clone();
                let done = in_sandbox(&live, &id, &home, || {
                    let target = inside;
                    let tree = sys::detached_readonly_tree(&dir)
                        .map_err(|e| format!("clone {} read-only: {e}", dir.display()))?;
                    Ok(move || {
                        if target.starts_with(rootfs::FUNCTIONS_DIR) {
                            std::fs::create_dir_all(&target)?;
                        }
                        sys::move_mount(tree.as_fd(), &target)
                    })
                });
                reply_done(
                    &channel,
                    done.map_err(|e| {
                        format!("attach {} at {}: {e}", dir.display(), target.display())
                    }),
                )
            }
            SpawnerRequest::AttachScratch { id } => {
                let done = match msg_fds.pop() {
                    None => Err("attach_scratch carries no mount descriptor".to_owned()),
                    Some(scratch) => in_sandbox(&live, &id, &home, || {
                        let tree = sys::clone_tree(scratch.as_fd())
                            .map_err(|e| format!("clone the scratch mount: {e}"))?;
                        Ok(move || sys::move_mount(tree.as_fd(), Path::new(rootfs::WORKFLOW_DIR)))
                    }),
                };
                if done.is_ok() {
                    scratch_attached.insert(id);
                }
                reply_done(&channel, done)
            }
            SpawnerRequest::DetachScratch { id } => {
                let done = if scratch_attached.contains(&id) {
                    in_sandbox(&live, &id, &home, || {
                        Ok(|| sys::unmount_detach(Path::new(rootfs::WORKFLOW_DIR)))
                    })
                } else {
                    Err(format!("sandbox {id} has no workflow scratch attached"))
                };
                if done.is_ok() {
                    scratch_attached.remove(&id);
                }
                reply_done(&channel, done)
            }
            SpawnerRequest::ResetScratch { id } => {
                let done = if scratch_attached.contains(&id) {
                    Err(format!(
                        "sandbox {id} has a workflow scratch attached over its own"
                    ))
                } else {
                    in_sandbox(&live, &id, &home, || {
                        let fresh = sys::new_tmpfs(rootfs::WORKFLOW_DIR_MB)
                            .map_err(|e| format!("new tmpfs: {e}"))?;
                        Ok(move || {
                            let dir = Path::new(rootfs::WORKFLOW_DIR);
                            sys::unmount_detach(dir)?;
                            sys::move_mount(fresh.as_fd(), dir)
                        })
                    })
                };
                reply_done(&channel, done)
            }
            SpawnerRequest::AttachScratchFrom { id, from } => {
                let done = in_sandbox(&live, &from, &home, || {
                    Ok(|| sys::clone_path(Path::new(rootfs::WORKFLOW_DIR)))
                })
                .and_then(|tree| {
                    in_sandbox(&live, &id, &home, || {
                        Ok(move || sys::move_mount(tree.as_fd(), Path::new(rootfs::WORKFLOW_DIR)))
                    })
                });
                if done.is_ok() {
                    scratch_attached.insert(id);
                }
                reply_done(&channel, done)
            }
            SpawnerRequest::Shutdown => break true,
        };
        if let Err(e) = sent {
            tracing::error!(error = %ipc::chain(&e), "spawner: reply failed; exiting");
            break false;
        }
    };
    for (id, c) in live.drain() {
        if let Err(message) = destroy(c, &orphaned.cgroups) {
            tracing::error!(sandbox_id = %id, %message, "spawner: destroy at exit failed");
        }
    }
    if !clean_exit {
        tracing::warn!(state_dir = %orphaned.state_dir.display(), "agent went away; spawner removed its sandboxes and state");
        if let Err(e) = orphaned.cgroups.remove_tree(&orphaned.cgroup_parent) {
            tracing::error!(error = %ipc::chain(&e), "spawner: remove cgroups");
        }
        orphaned
            .cgroups
            .remove_if_unused(Path::new(crate::state::CGROUP_PARENT));
        let _ = std::fs::remove_dir_all(&orphaned.state_dir);
        if let Some(root) = orphaned.state_dir.parent() {
            let _ = std::fs::remove_dir(root);
        }
    }
    0
}

fn create(
    id: &str,
    bundle: &Path,
    containers: &Path,
    cgroups: &Cgroups,
) -> Result<(Container, OwnedFd), String> {
    let fail = |what: &str, e: &dyn std::error::Error| format!("{what}: {}", ipc::chain(e));
    let (agent_end, shim_end) = UnixStream::pair().map_err(|e| fail("socket pair", &e))?;
    let devnull = File::open("/dev/null").map_err(|e| fail("open /dev/null", &e))?;
    let stderr = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| fail("dup stderr", &e))?;
    let built = ContainerBuilder::new(id.to_owned(), SyscallType::default())
        .with_root_path(containers)
        .map(|b| {
            b.with_stdin(OwnedFd::from(shim_end))
                .with_stdout(devnull)
                .with_stderr(stderr)
                .as_init(bundle)
                .with_systemd(false)
                .with_detach(true)
                .build()
        });
    let mut container = match built {
        Ok(Ok(c)) => c,
        Ok(Err(e)) | Err(e) => {
            remove_partial(id, containers, cgroups);
            return Err(fail("build container", &e));
        }
    };
    if let Err(e) = container.start() {
        let message = fail("start container", &e);
        let _ = destroy(container, cgroups);
        return Err(message);
    }
    Ok((container, OwnedFd::from(agent_end)))
}

fn reply_done(channel: &Channel, done: Result<(), String>) -> Result<(), ipc::Error> {
    match done {
        Ok(()) => channel.send(&SpawnerReply::Done, b"", &[]),
        Err(message) => channel.send(&SpawnerReply::Failed { message }, b"", &[]),
    }
}

/// Runs a mount operation inside sandbox `id`'s mount namespace: `prepare` runs here
/// (in the spawner's namespace) and returns the step to run in the sandbox's; the
/// spawner always comes back home.
fn in_sandbox<T, F>(
    live: &HashMap<String, Container>,
    id: &str,
    home: &File,
    prepare: impl FnOnce() -> Result<F, String>,
) -> Result<T, String>
where
    F: FnOnce() -> std::io::Result<T>,
{
    let container = live
        .get(id)
        .ok_or_else(|| format!("no live sandbox {id}"))?;
    let pid = container
        .pid()
        .ok_or_else(|| format!("sandbox {id} has no init process"))?;
    let ns_path = format!("/proc/{pid}/ns/mnt");
    let ns = File::open(&ns_path).map_err(|e| format!("open {ns_path}: {e}"))?;
    let step = prepare()?;
    sys::in_mount_ns(ns.as_fd(), home.as_fd(), step).map_err(|e| format!("in sandbox {id}: {e}"))
}

/// Deletes what a failed build left in the state root.
fn remove_partial(id: &str, containers: &Path, cgroups: &Cgroups) {
    let dir = containers.join(id);
    if let Ok(c) = Container::load(dir.clone()) {
        let _ = destroy(c, cgroups);
    }
    let _ = std::fs::remove_dir_all(dir);
}

fn destroy(mut container: Container, cgroups: &Cgroups) -> Result<(), String> {
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
