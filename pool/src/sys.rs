//! The raw process calls the pool needs; the only `unsafe` in this crate.

use std::ffi::CStr;

use nix::unistd::ForkResult;

/// Forks. The caller must have checked that the process is single-threaded.
pub fn fork_single_threaded() -> nix::Result<ForkResult> {
    // SAFETY: the only caller (`Spawner::start`) verified via /proc/self/status that
    // this process has exactly one thread, so the child gets a consistent copy of
    // every lock and allocator state and may run arbitrary code.
    unsafe { nix::unistd::fork() }
}

/// Names the calling process (as shown by `ps -o comm`).
pub fn set_process_name(name: &CStr) {
    // Best effort: a failure only changes what `ps` shows.
    let _ = nix::sys::prctl::set_name(name);
}

/// Gives the spawner a clean signal state: nothing blocked (the agent may have blocked
/// its shutdown signals before forking, and sandboxes inherit the spawner's mask), and
/// SIGINT ignored: terminal signals go to the agent, which shuts down cleanly, and the
/// spawner follows when the agent closes its channel.
pub fn reset_signals() {
    use nix::sys::signal::{signal, sigprocmask, SigHandler, SigSet, SigmaskHow, Signal};
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    // SAFETY: SIG_IGN installs no handler code, so no async-signal-safety rules apply.
    let _ = unsafe { signal(Signal::SIGINT, SigHandler::SigIgn) };
}

/// Leaves immediately without running the parent's atexit handlers or destructors.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit is async-signal-safe and takes no pointers; nothing after it runs.
    unsafe { libc::_exit(code) }
}

/// Threads in this process, from /proc/self/status.
pub fn thread_count() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:").map(|v| v.trim().parse().ok()))
        })
        .flatten()
        .unwrap_or(usize::MAX)
}

/// A detached, recursive, read-only (and nosuid, nodev) copy of the mount tree at
/// `path`: `open_tree(OPEN_TREE_CLONE)` then `mount_setattr`. It belongs to no mount
/// namespace until attached with [`attach_tree`].
pub fn detached_readonly_tree(path: &std::path::Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains a NUL byte")
    })?;
    let flags =
        libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_RECURSIVE as libc::c_uint;
    // SAFETY: c_path is a valid NUL-terminated string for the duration of the call;
    // open_tree takes no other pointers.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c_path.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: open_tree returned a new descriptor that nothing else owns.
    let tree = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: `tree` is a valid descriptor, the path is an empty NUL-terminated string
    // (AT_EMPTY_PATH: act on the descriptor itself), and `attr` lives across the call
    // with its exact size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            std::os::fd::AsRawFd::as_raw_fd(&tree),
            c"".as_ptr(),
            (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as libc::c_uint,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(tree)
}

/// Enters the mount namespace `ns`, attaches `tree` at `target` (a path inside that
/// namespace), and returns to the mount namespace `home`. The calling process must be
/// single-threaded (a requirement of `setns(CLONE_NEWNS)`); entering a namespace also
/// resets the root and working directory, so callers use absolute paths.
pub fn attach_tree(
    ns: std::os::fd::BorrowedFd<'_>,
    home: std::os::fd::BorrowedFd<'_>,
    tree: std::os::fd::BorrowedFd<'_>,
    target: &std::path::Path,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let c_target = std::ffi::CString::new(target.as_os_str().as_bytes()).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains a NUL byte")
    })?;
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNS)?;
    // SAFETY: both paths are valid NUL-terminated strings for the duration of the
    // call and `tree` is a valid descriptor.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            c_target.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    let moved = if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    };
    // Always go home, whatever the move did.
    nix::sched::setns(home, nix::sched::CloneFlags::CLONE_NEWNS)?;
    moved
}
