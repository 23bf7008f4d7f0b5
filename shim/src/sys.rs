//! The shim's raw process calls; the only `unsafe` in the binary.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
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

/// Takes the instance host's channels: the instance channel on descriptor 3 and the
/// calls channel on 4, as the launcher ([`with_fds_and_clean_mask`]) passes them. For
/// the host's `main` only, once: a second call would own the descriptors twice.
pub fn take_host_channels() -> (OwnedFd, OwnedFd) {
    // SAFETY: the launcher started this process with its instance and calls channels
    // on descriptors 3 and 4 (close-on-exec cleared on them), and the host calls this
    // once, before anything else in the process opens, uses or owns them.
    unsafe { (OwnedFd::from_raw_fd(3), OwnedFd::from_raw_fd(4)) }
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

/// Makes `cmd` start with `fds` as its descriptors 3, 4, … (close-on-exec cleared)
/// and an empty signal mask.
pub fn with_fds_and_clean_mask(cmd: &mut Command, fds: &[BorrowedFd<'_>]) {
    assert!(fds.len() <= 8, "at most 8 descriptors");
    let raw: Vec<i32> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // async-signal-safe functions (fcntl, dup2, close, sigprocmask); it allocates
    // nothing (`raw` was built before the fork) and touches no locks.
    unsafe {
        cmd.pre_exec(move || {
            // First move every descriptor above the targets, so a source that is
            // already one of 3, 4, … is not overwritten before it is placed.
            let mut moved = [0i32; 8];
            for (i, &fd) in raw.iter().enumerate() {
                let high = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 64);
                if high < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                moved[i] = high;
            }
            for (i, &high) in moved[..raw.len()].iter().enumerate() {
                // dup2 clears close-on-exec on the new descriptor.
                if libc::dup2(high, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(high);
            }
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
            Ok(())
        });
    }
}

/// Sets close-on-exec on `fd`.
pub fn set_cloexec(fd: &impl AsFd) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(
        fd.as_fd().as_raw_fd(),
        FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC),
    )?;
    Ok(())
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

/// Makes `cmd`'s process get SIGKILL when the calling process dies
/// (`PR_SET_PDEATHSIG`: the runtime process of an instance host must not outlive the
/// host); if the caller is already gone by then, the exec fails.
pub fn die_with_parent_on_exec(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // async-signal-safe functions (prctl, getppid); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Whether the peer of the connected socket `fd` is gone: it closed (or shut down its
/// writing side), or the connection failed. A nonblocking `MSG_PEEK` of one byte: it
/// does not wait and consumes nothing.
pub fn peer_gone(fd: BorrowedFd<'_>) -> bool {
    use nix::errno::Errno;
    use nix::sys::socket::{recv, MsgFlags};
    let mut byte = [0u8; 1];
    match recv(
        fd.as_raw_fd(),
        &mut byte,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    ) {
        Ok(0) => true,
        Ok(_) => false, // a request already sent (pipelined): the client is there
        // Nothing to read (or a signal): the client is there, as far as one can tell;
        // a write to a client that is gone fails, and is handled.
        Err(Errno::EAGAIN | Errno::EINTR) => false,
        Err(_) => true,
    }
}

/// Whether `fd` has something to read right now (or its end: a read would not wait).
/// A `poll` with a zero timeout.
pub fn readable_now(fd: BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
        && fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN))
}

/// Takes descriptor `fd`, inherited at exec (a forked sandbox's zygote channel), as
/// an owned socket, close-on-exec from now on. Refuses a descriptor that is not open
/// or not a socket, and 0, 1 and 2 (the shim's own).
pub fn take_inherited_socket(fd: i32) -> std::io::Result<OwnedFd> {
    use nix::sys::stat::{fstat, SFlag};
    if fd <= 2 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is one of the shim's standard descriptors"),
        ));
    }
    let stat = fstat(fd)?;
    if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is not a socket"),
        ));
    }
    // SAFETY: `fd` is open (fstat succeeded), was inherited for the shim to take,
    // and nothing else in this process owns it: `take_adopted` reads its number
    // from the environment once and removes the variable.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    set_cloexec(&owned)?;
    Ok(owned)
}

/// A pidfd of process `pid` (of this pid namespace), close-on-exec.
pub fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1;
    // it touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor, open and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
