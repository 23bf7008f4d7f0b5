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

/// A detached read-only (and nosuid, nodev) copy of the directory at `path`, without
/// the mounts below it: `open_tree(OPEN_TREE_CLONE)` (not recursive) then
/// `mount_setattr`. It belongs to no mount namespace until attached with
/// [`move_mount`]. `path` must be canonical: it is opened with `openat2` refusing
/// every symbolic link (`RESOLVE_NO_SYMLINKS`, `RESOLVE_NO_MAGICLINKS`), so a
/// directory checked at registration cannot be swapped for a link before it is
/// attached.
pub fn detached_readonly_tree(path: &std::path::Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains a NUL byte")
    })?;
    /// The kernel's `struct open_how` (libc's is non-exhaustive).
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    let how = OpenHow {
        flags: (libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: c_path is a valid NUL-terminated string and `how` a valid open_how whose
    // exact size is passed; both live across the call.
    let dir = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            c_path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if dir < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    let dir = unsafe { std::os::fd::OwnedFd::from_raw_fd(dir as i32) };
    let flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_EMPTY_PATH as u32;
    // SAFETY: `dir` is a valid descriptor and the path is an empty NUL-terminated
    // string (AT_EMPTY_PATH: clone the tree at the descriptor itself).
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            std::os::fd::AsRawFd::as_raw_fd(&dir),
            c"".as_ptr(),
            flags,
        )
    };
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

/// Enters the mount namespace `ns`, runs `step` there and returns to the mount
/// namespace `home`, whatever `step` did. The calling process must be single-threaded
/// (a requirement of `setns(CLONE_NEWNS)`); entering a namespace also resets the root
/// and working directory, so `step` uses absolute paths.
pub fn in_mount_ns<T>(
    ns: std::os::fd::BorrowedFd<'_>,
    home: std::os::fd::BorrowedFd<'_>,
    step: impl FnOnce() -> std::io::Result<T>,
) -> std::io::Result<T> {
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNS)?;
    let done = step();
    if let Err(e) = nix::sched::setns(home, nix::sched::CloneFlags::CLONE_NEWNS) {
        // Every later operation would act inside that sandbox: stop instead (the
        // agent sees its spawner gone and fails its requests).
        eprintln!("sprout-spawner: cannot return to its own mount namespace: {e}");
        exit_now(70);
    }
    done
}

fn c_path(path: &std::path::Path) -> std::io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains a NUL byte")
    })
}

/// Attaches the detached mount `tree` at `target` in the current mount namespace.
pub fn move_mount(
    tree: std::os::fd::BorrowedFd<'_>,
    target: &std::path::Path,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let c_target = c_path(target)?;
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
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn open_tree(
    dirfd: i32,
    path: &std::ffi::CStr,
    extra: libc::c_uint,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let flags = libc::OPEN_TREE_CLONE
        | libc::OPEN_TREE_CLOEXEC
        | libc::AT_RECURSIVE as libc::c_uint
        | extra;
    // SAFETY: `path` is a valid NUL-terminated string for the duration of the call and
    // `dirfd` is AT_FDCWD or a descriptor the caller keeps open across it.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, dirfd, path.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: open_tree returned a new descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// A detached clone of the detached (or attached) mount `tree`.
pub fn clone_tree(tree: std::os::fd::BorrowedFd<'_>) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsRawFd;
    open_tree(tree.as_raw_fd(), c"", libc::AT_EMPTY_PATH as libc::c_uint)
}

/// A detached clone of the mount at `path` in the current mount namespace.
pub fn clone_path(path: &std::path::Path) -> std::io::Result<std::os::fd::OwnedFd> {
    open_tree(libc::AT_FDCWD, &c_path(path)?, 0)
}

/// Lazily unmounts the top mount at `path`.
pub fn unmount_detach(path: &std::path::Path) -> std::io::Result<()> {
    nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH)?;
    Ok(())
}

/// A new tmpfs of at most `size_mb` MiB as a detached mount (`fsopen`, `fsconfig`,
/// `fsmount`): it is in no mount namespace until attached, and it is freed when the
/// last descriptor and the last attached clone are gone.
pub fn new_tmpfs(size_mb: u64) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    fn check(rc: libc::c_long) -> std::io::Result<libc::c_long> {
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }
    const FSCONFIG_SET_STRING: libc::c_uint = 1;
    const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
    const FSOPEN_CLOEXEC: libc::c_uint = 1;
    const FSMOUNT_CLOEXEC: libc::c_uint = 1;
    // SAFETY: the name is a valid NUL-terminated string; fsopen takes no other pointers.
    let fs = check(unsafe { libc::syscall(libc::SYS_fsopen, c"tmpfs".as_ptr(), FSOPEN_CLOEXEC) })?;
    // SAFETY: fsopen returned a new descriptor that nothing else owns.
    let fs = unsafe { OwnedFd::from_raw_fd(fs as i32) };
    let size = std::ffi::CString::new(format!("{size_mb}m")).map_err(std::io::Error::other)?;
    for (key, value) in [(c"size", size.as_c_str()), (c"mode", c"1777")] {
        // SAFETY: `fs` is a valid fs-context descriptor; key and value are valid
        // NUL-terminated strings for the duration of the call.
        check(unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fs.as_raw_fd(),
                FSCONFIG_SET_STRING,
                key.as_ptr(),
                value.as_ptr(),
                0,
            )
        })?;
    }
    // SAFETY: as above; CMD_CREATE takes no key or value.
    check(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_char>(),
            0,
        )
    })?;
    let attrs = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
    // SAFETY: `fs` is a created fs context; fsmount takes no pointers.
    let mnt =
        check(unsafe { libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), FSMOUNT_CLOEXEC, attrs) })?;
    // SAFETY: fsmount returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(mnt as i32) })
}
