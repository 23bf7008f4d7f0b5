//! The shim's raw process calls; the only `unsafe` in the binary.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::sys::signal::{SigSet, SigmaskHow};

/// Takes the channel libcontainer gave the shim as descriptor 0, and puts
/// `/dev/null` on descriptor 0 so nothing the shim starts can read the channel.
pub fn take_stdin_channel() -> std::io::Result<OwnedFd> {
    // SAFETY: descriptor 0 was set up by libcontainer for this process and nothing in
    // it has taken ownership of it; `ManuallyDrop` keeps it open because dup2 below
    // reuses the number.
    let stdin = std::mem::ManuallyDrop::new(unsafe { OwnedFd::from_raw_fd(0) });
    let channel = stdin.try_clone()?;
    let devnull = std::fs::File::open("/dev/null")?;
    nix::unistd::dup2(devnull.as_raw_fd(), 0)?;
    Ok(channel)
}

/// Makes `cmd` start with `fd` as its descriptor 3 and an empty signal mask.
pub fn with_fd3_and_clean_mask(cmd: &mut Command, fd: &OwnedFd) {
    let raw = fd.as_raw_fd();
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // async-signal-safe functions (dup2, fcntl via dup2's semantics, sigprocmask);
    // it allocates nothing and touches no locks.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 clears close-on-exec on the new descriptor; if raw is already 3,
            // clear it by hand.
            if raw == 3 {
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
            Ok(())
        });
    }
}

/// SIGKILLs process `pid` of the sandbox (the shim is PID 1 of its pid namespace, so
/// the pids the zygote reports are ours to signal). A process already gone is not an
/// error; a pid ≤ 1 is refused, as `kill(0)` and `kill(-1)` would hit far more than one
/// instance and pid 1 is the shim itself.
pub fn kill(pid: i32) {
    if pid <= 1 {
        return;
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}
