//! The shim's side of hosted instances: [`Launcher`] starts one instance host
//! (`sprout-shim host <runtime>`, this same executable) per instance, where the
//! Python runtime forks one from its zygote.

use std::os::fd::{AsFd, BorrowedFd};
use std::process::{Command, Stdio};

use ipc::proto::{InstanceLink, Runtime};
use ipc::sandbox_paths::SHIM_PATH;
use ipc::Channel;

use crate::sys;
use crate::zygote::{Error, Forked, Spawn};

/// Starts instance hosts of one runtime.
#[derive(Debug)]
pub struct Launcher {
    runtime: Runtime,
}

impl Launcher {
    pub fn new(runtime: Runtime) -> Launcher {
        Launcher { runtime }
    }
}

impl Spawn for Launcher {
    fn runtime(&self) -> Runtime {
        self.runtime
    }

    fn fork(
        &mut self,
        instance: u64,
        stdout: BorrowedFd<'_>,
        stderr: BorrowedFd<'_>,
    ) -> Result<Result<Forked, String>, Error> {
        let sys_err = |what| move |source| Error::Sys { what, source };
        let (ours, theirs) = Channel::pair().map_err(sys_err("socket pair"))?;
        let (calls, calls_theirs) = Channel::pair().map_err(sys_err("socket pair"))?;
        let (theirs, calls_theirs) = (theirs.into_fd(), calls_theirs.into_fd());
        let out = stdout.try_clone_to_owned().map_err(sys_err("dup stdout"))?;
        let err = stderr.try_clone_to_owned().map_err(sys_err("dup stderr"))?;
        let mut cmd = Command::new(SHIM_PATH);
        cmd.args(["host", self.runtime.name()])
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        sys::with_fds_and_clean_mask(&mut cmd, &[theirs.as_fd(), calls_theirs.as_fd()]);
        let child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                return Ok(Err(format!(
                    "instance {instance}: start the {} instance host ({}): {e}",
                    self.runtime.name(),
                    SHIM_PATH
                )))
            }
        };
        // The host has its copies now; ours go so its death shows as these closing.
        drop((theirs, calls_theirs));
        let pid = child.id() as i32; // reaped by the shim's SIGCHLD loop
        Ok(crate::zygote::wait_ready(
            InstanceLink(ours),
            calls,
            pid,
            instance,
        ))
    }

    fn kill(&mut self, pid: i32) {
        // The runtime's process dies with its host (PR_SET_PDEATHSIG).
        sys::kill(pid);
    }
}
