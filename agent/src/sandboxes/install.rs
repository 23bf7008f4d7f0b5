//! Install sandboxes: the [`packages::Installer`] of a running agent. Each is a
//! sandbox created by libcontainer from `rootfs::install_spec` (a function sandbox's
//! namespaces, seccomp filter and lack of privileges, its own host user, the
//! installer limits, outbound network as `network: egress` gives a function, its
//! output directory read-write at `/deps`), running the shim's installer
//! (`shim::runtime::installer`) as PID 1. One request, one answer, then it is
//! destroyed (`docs/protocol.md`, "Install sandboxes").

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;

use super::Sandboxes;
use crate::packages::{self, InstallLimits};

/// The largest answer an installer may send.
const MAX_ANSWER: usize = 1 << 20;
/// Processes an installer may run at once (pip, its build backends, npm's scripts).
const INSTALL_PIDS: u64 = 256;
/// The largest file an installer may write (a wheel, a shared library).
const MAX_FILE_BYTES: u64 = 2 << 30;

/// Makes install sandboxes through the agent's [`Sandboxes`].
#[derive(Debug)]
pub(crate) struct SandboxInstaller(pub Arc<Sandboxes>);

impl packages::Installer for SandboxInstaller {
    fn start(
        &self,
        out: &Path,
        limits: &InstallLimits,
    ) -> Result<Box<dyn packages::Session>, packages::Error> {
        let session = self
            .0
            .install_sandbox(out, limits)
            .map_err(|e| packages::Error::Sandbox(ipc::chain(&e)))?;
        Ok(Box::new(session))
    }
}

/// One live install sandbox; destroyed when dropped.
pub(crate) struct InstallSandbox {
    sandboxes: Arc<Sandboxes>,
    sandbox: pool::Sandbox,
    reserved_mb: u64,
    channel: UnixStream,
    deadline: Instant,
    limits: InstallLimits,
    /// Its output directory (on the host).
    out: std::path::PathBuf,
}

impl Sandboxes {
    /// A new install sandbox writing into `out` (made its user's), with its network
    /// up, its installer waiting for a request.
    pub(crate) fn install_sandbox(
        self: &Arc<Self>,
        out: &Path,
        limits: &InstallLimits,
    ) -> Result<InstallSandbox, crate::error::Error> {
        pool::network::check_tools().map_err(crate::error::Error::InvalidConfig)?;
        let id = format!("{}-install", self.next_sandbox_id());
        let span = tracing::debug_span!("install_sandbox", sandbox_id = %id);
        let _g = span.enter();
        let cgroup = self.cgroup_parent.join(&id);
        let user = self.assign_user(&id, self.created_slots())?;
        if let Err(e) = std::os::unix::fs::chown(out, Some(user.uid), Some(user.gid)) {
            self.users.release(&id);
            return Err(super::state_err(out)(e));
        }
        let mut config = self.sandbox_config(&id, &cgroup, Vec::new());
        config.limits.memory_bytes = limits.memory_mb << 20;
        config.limits.pids = INSTALL_PIDS;
        let spec = rootfs::install_spec(
            &config,
            user,
            &rootfs::InstallSpec {
                out: out.to_path_buf(),
                args: shim::runtime::installer::command(),
                max_file_bytes: MAX_FILE_BYTES,
            },
        );
        let (mut sandbox, shim) = self.create(&id, &cgroup, spec, limits.memory_mb)?;
        if let Err(e) = self.attach_network(&id) {
            self.destroy(&mut sandbox, limits.memory_mb);
            return Err(e.into());
        }
        tracing::debug!(pid = sandbox.pid(), "install sandbox up");
        Ok(InstallSandbox {
            sandboxes: self.clone(),
            sandbox,
            reserved_mb: limits.memory_mb,
            channel: UnixStream::from(shim.0.into_fd()),
            deadline: Instant::now() + limits.timeout,
            limits: *limits,
            out: out.to_path_buf(),
        })
    }
}

impl packages::Session for InstallSandbox {
    fn exchange(&mut self, request: &Value) -> Result<Value, packages::Error> {
        let gone = |e: std::io::Error| {
            packages::Error::Sandbox(format!(
                "sandbox {}: the installer's channel: {e}",
                self.sandbox.id()
            ))
        };
        let mut line = serde_json::to_vec(request).expect("JSON serialises");
        line.push(b'\n');
        self.channel.write_all(&line).map_err(gone)?;
        let mut answer = Vec::new();
        let mut chunk = [0u8; 16 << 10];
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.timed_out());
            }
            self.channel.set_read_timeout(Some(left)).map_err(gone)?;
            let n = match self.channel.read(&mut chunk) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(self.timed_out())
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(gone(e)),
            };
            if n == 0 {
                let oom = self.sandboxes.oom_killed(&self.sandbox);
                return Err(packages::Error::Died(if oom {
                    format!(
                        "ran out of memory (limit {} MiB, --install-memory-mb)",
                        self.limits.memory_mb
                    )
                } else {
                    "exited without an answer".into()
                }));
            }
            answer.extend_from_slice(&chunk[..n]);
            if let Some(end) = answer.iter().position(|&b| b == b'\n') {
                return serde_json::from_slice(&answer[..end]).map_err(|e| {
                    packages::Error::Installer {
                        what: "no JSON",
                        problem: e.to_string(),
                    }
                });
            }
            if answer.len() > MAX_ANSWER {
                return Err(packages::Error::Installer {
                    what: "too much",
                    problem: format!("more than {MAX_ANSWER} bytes without a line end"),
                });
            }
        }
    }
}

impl InstallSandbox {
    /// The timeout, with the end of what the installer printed so far (its log in
    /// its output directory: opened without following a link or waiting on a FIFO,
    /// checked to be a file, at most its last 2000 bytes read).
    fn timed_out(&self) -> packages::Error {
        use std::io::{Seek, SeekFrom};
        use std::os::unix::fs::OpenOptionsExt;
        let tail = (|| -> std::io::Result<String> {
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(self.out.join("installer.log"))?;
            let len = f.metadata()?.len();
            if !f.metadata()?.is_file() {
                return Ok(String::new());
            }
            f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL)))?;
            let mut bytes = Vec::new();
            f.take(LOG_TAIL).read_to_end(&mut bytes)?;
            Ok(String::from_utf8_lossy(&bytes).trim().to_owned())
        })()
        .unwrap_or_default();
        packages::Error::Timeout {
            limit: self.limits.timeout,
            output: tail,
        }
    }
}

/// How much of the installer's log a timeout quotes.
const LOG_TAIL: u64 = 2000;

impl Drop for InstallSandbox {
    fn drop(&mut self) {
        self.sandboxes.destroy(&mut self.sandbox, self.reserved_mb);
    }
}
