//! The raw process calls the pool needs; the only `unsafe` in this crate. Calls
//! rustix wraps (the new mount API, `openat2`, pidfds, eventfds) go through it; what
//! it lacks (`mount_setattr`, `close_range`, descriptor passing at `exec`) is
//! written here.

use std::ffi::CStr;

/// Names the calling process (as shown by `ps -o comm`).
pub fn set_process_name(name: &CStr) {
    // Best effort: a failure only changes what `ps` shows.
    let _ = nix::sys::prctl::set_name(name);
}

/// Gives the spawner a clean signal state: nothing blocked (the agent may have blocked
/// its shutdown signals, and sandboxes inherit the spawner's mask), and SIGINT
/// ignored: terminal signals go to the agent, which shuts down cleanly, and the
/// spawner follows when the agent says so or closes its channel.
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

/// A detached read-only (and nosuid, nodev) copy of the directory at `path`, without
/// the mounts below it: `open_tree(OPEN_TREE_CLONE)` (not recursive) then
/// `mount_setattr`. It belongs to no mount namespace until attached with
/// [`move_mount`]. `path` must be canonical: it is opened with `openat2` refusing
/// every symbolic link (`RESOLVE_NO_SYMLINKS`, `RESOLVE_NO_MAGICLINKS`), so a
/// directory checked at registration cannot be swapped for a link before it is
/// attached.
pub fn detached_readonly_tree(path: &std::path::Path) -> std::io::Result<std::os::fd::OwnedFd> {
    detached_readonly(path, rustix::fs::OFlags::DIRECTORY)
}

/// [`detached_readonly_tree`] of a regular file (`/etc/resolv.conf`).
pub fn detached_readonly_file(path: &std::path::Path) -> std::io::Result<std::os::fd::OwnedFd> {
    detached_readonly(path, rustix::fs::OFlags::empty())
}

fn detached_readonly(
    path: &std::path::Path,
    kind: rustix::fs::OFlags,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use rustix::fs::{Mode, OFlags, ResolveFlags, CWD};
    use rustix::mount::OpenTreeFlags;
    let dir = rustix::fs::openat2(
        CWD,
        path,
        OFlags::PATH | kind | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )?;
    let tree = rustix::mount::open_tree(
        &dir,
        c"",
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_EMPTY_PATH,
    )?;
    // rustix has no mount_setattr.
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

/// Attaches the detached mount `tree` at `target` in the current mount namespace.
pub fn move_mount(
    tree: std::os::fd::BorrowedFd<'_>,
    target: &std::path::Path,
) -> std::io::Result<()> {
    use rustix::mount::MoveMountFlags;
    let flags = MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH;
    Ok(rustix::mount::move_mount(
        tree,
        c"",
        rustix::fs::CWD,
        target,
        flags,
    )?)
}

/// A detached recursive clone (`open_tree(OPEN_TREE_CLONE | AT_RECURSIVE)`) of the
/// mount at `path` relative to `dir`.
fn open_tree(
    dir: std::os::fd::BorrowedFd<'_>,
    path: impl rustix::path::Arg,
    extra: rustix::mount::OpenTreeFlags,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use rustix::mount::OpenTreeFlags;
    let flags = OpenTreeFlags::OPEN_TREE_CLONE
        | OpenTreeFlags::OPEN_TREE_CLOEXEC
        | OpenTreeFlags::AT_RECURSIVE
        | extra;
    Ok(rustix::mount::open_tree(dir, path, flags)?)
}

/// A detached clone of the detached (or attached) mount `tree`.
pub fn clone_tree(tree: std::os::fd::BorrowedFd<'_>) -> std::io::Result<std::os::fd::OwnedFd> {
    open_tree(tree, c"", rustix::mount::OpenTreeFlags::AT_EMPTY_PATH)
}

/// A detached clone of the mount at `path` in the current mount namespace.
pub fn clone_path(path: &std::path::Path) -> std::io::Result<std::os::fd::OwnedFd> {
    open_tree(rustix::fs::CWD, path, rustix::mount::OpenTreeFlags::empty())
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
    use rustix::mount::{fsconfig_set_string, FsMountFlags, FsOpenFlags, MountAttrFlags};
    let fs = rustix::mount::fsopen(c"tmpfs", FsOpenFlags::FSOPEN_CLOEXEC)?;
    fsconfig_set_string(&fs, c"size", format!("{size_mb}m").as_str())?;
    // Not sticky: the sandboxes of one run (one tenant, different users) rewrite each
    // other's files in it.
    fsconfig_set_string(&fs, c"mode", c"0777")?;
    rustix::mount::fsconfig_create(&fs)?;
    let attrs = MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV;
    Ok(rustix::mount::fsmount(
        &fs,
        FsMountFlags::FSMOUNT_CLOEXEC,
        attrs,
    )?)
}

/// A pidfd for `pid` (`pidfd_open`, close-on-exec): it becomes readable when the
/// process exits, and unlike the pid it can never name another process.
pub fn pidfd_open(pid: nix::unistd::Pid) -> std::io::Result<std::os::fd::OwnedFd> {
    let pid = rustix::process::Pid::from_raw(pid.as_raw())
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    Ok(rustix::process::pidfd_open(
        pid,
        rustix::process::PidfdFlags::empty(),
    )?)
}

/// The host pid of the process pidfd `fd` refers to, from the `Pid:` line of
/// `/proc/self/fdinfo/<fd>`. A process that has exited (`-1`), one outside this pid
/// namespace (`0`) and a descriptor that is no pidfd are errors naming it.
pub fn pidfd_pid(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<i32> {
    use std::os::fd::AsRawFd;
    let path = format!("/proc/self/fdinfo/{}", fd.as_raw_fd());
    let text = std::fs::read_to_string(&path)?;
    let pid = text
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse::<i32>().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "descriptor {} is not a pidfd ({path} has no Pid line)",
                    fd.as_raw_fd()
                ),
            )
        })?;
    match pid {
        -1 => Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("the process of pidfd {} has exited", fd.as_raw_fd()),
        )),
        0 => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "the process of pidfd {} is not in this pid namespace",
                fd.as_raw_fd()
            ),
        )),
        pid => Ok(pid),
    }
}

/// Makes `fd` the child's descriptor `target` (without close-on-exec) when `cmd`
/// spawns; every other descriptor of this process is close-on-exec and stays out.
/// `fd` must stay open until the spawn.
pub fn pass_fd(
    cmd: &mut std::process::Command,
    fd: std::os::fd::RawFd,
    target: std::os::fd::RawFd,
) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and calls only dup2
    // and fcntl, which are async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            if fd == target {
                // dup2 onto itself keeps close-on-exec: clear it by hand.
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, target) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Waits up to `within` (`Duration::MAX`: for ever) until `a` or `b` is readable (or
/// hung up); returns which. A signal that interrupts the wait restarts it.
pub fn poll2(
    a: std::os::fd::BorrowedFd<'_>,
    b: std::os::fd::BorrowedFd<'_>,
    within: std::time::Duration,
) -> (bool, bool) {
    let ready = poll_fds(&[a, b], within);
    (ready[0], ready[1])
}

/// Whether socket `fd` is hung up now: for one end of a connected Unix socket pair,
/// whether the other end is released (no process holds a descriptor of it any more)
/// or was shut down both ways.
pub fn hung_up(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut pfd = [PollFd::new(fd, PollFlags::empty())];
    loop {
        match poll(&mut pfd, PollTimeout::ZERO) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return false,
            Ok(_) => {
                return pfd[0]
                    .revents()
                    .is_some_and(|r| r.contains(PollFlags::POLLHUP))
            }
        }
    }
}

/// Whether `fd` becomes readable (or hung up) within `within`.
pub fn readable(fd: std::os::fd::BorrowedFd<'_>, within: std::time::Duration) -> bool {
    poll_fds(&[fd], within)[0]
}

fn poll_fds(fds: &[std::os::fd::BorrowedFd<'_>], within: std::time::Duration) -> Vec<bool> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let deadline = std::time::Instant::now().checked_add(within);
    loop {
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(d) => {
                let left = d.saturating_duration_since(std::time::Instant::now());
                // Rounded up: a sub-millisecond rest must not spin with timeout 0.
                let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
            }
        };
        let mut pfds: Vec<PollFd<'_>> = fds
            .iter()
            .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
            .collect();
        match poll(&mut pfds, timeout) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return vec![true; fds.len()],
            Ok(_) => {
                return pfds
                    .iter()
                    .map(|p| p.revents().is_some_and(|r| !r.is_empty()))
                    .collect()
            }
        }
    }
}

/// Takes the descriptor `fd` this process was started with (the spawner's control
/// socket): checks that it is a socket and makes it close-on-exec, so that nothing
/// the spawner executes inherits it.
pub fn take_inherited_socket(fd: std::os::fd::RawFd) -> std::io::Result<std::os::fd::OwnedFd> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    use nix::sys::stat::{fstat, SFlag};
    let st = fstat(fd)?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is not a socket"),
        ));
    }
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` is open (fstat succeeded) and nothing else in this process owns
    // it: it was inherited and is taken once, at start.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// A new eventfd with a count of 0, non-blocking and close-on-exec (for a memory
/// cgroup's v1 OOM notification).
pub fn eventfd() -> std::io::Result<std::os::fd::OwnedFd> {
    use rustix::event::EventfdFlags;
    Ok(rustix::event::eventfd(
        0,
        EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK,
    )?)
}

/// Closes every descriptor from `first` up: whatever the agent's own parent let it
/// inherit without close-on-exec, which would otherwise reach every container process
/// the spawner clones.
pub fn close_from(first: std::os::fd::RawFd) -> std::io::Result<()> {
    // SAFETY: close_range takes no pointers; it is called first thing in the
    // spawner's main, before anything in this process owns a descriptor above
    // `first`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            0,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Enters the network namespace `ns`, runs `step` there and returns to the network
/// namespace `home`, whatever `step` did. A socket made in `step` stays in the
/// sandbox's namespace (a socket belongs to the namespace it was made in).
pub fn in_net_ns<T>(
    ns: std::os::fd::BorrowedFd<'_>,
    home: std::os::fd::BorrowedFd<'_>,
    step: impl FnOnce() -> std::io::Result<T>,
) -> std::io::Result<T> {
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
    let done = step();
    if let Err(e) = nix::sched::setns(home, nix::sched::CloneFlags::CLONE_NEWNET) {
        // Every later link would be made inside that sandbox: stop instead.
        eprintln!("sprout-spawner: cannot return to its own network namespace: {e}");
        exit_now(70);
    }
    done
}

/// Brings the interface `name` of the current network namespace up
/// (`SIOCGIFFLAGS`, then `SIOCSIFFLAGS` with `IFF_UP` added): two ioctls on a
/// datagram socket made for the purpose.
pub fn link_up(name: &CStr) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let bytes = name.to_bytes_with_nul();
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if bytes.len() > req.ifr_name.len() {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    for (slot, b) in req.ifr_name.iter_mut().zip(bytes) {
        *slot = *b as libc::c_char;
    }
    // SAFETY: socket takes no pointers; the descriptor it returns is owned here.
    let sock = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
    };
    // SAFETY: `sock` is an open socket; `req` is a valid ifreq with a NUL-terminated
    // name that lives across both calls, which read and write only within it.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Runs `f` with this thread's file-system uid and gid set to `uid` and `gid`, then
/// back to root's. New files then belong to them: a tmpfs made in a forked sandbox's
/// user namespace takes only owners mapped there (root on the host is not: an inode
/// root would own fails with EOVERFLOW). For the spawner, which is root and
/// single-threaded; its capabilities are back once its ids are root's again.
pub fn as_fs_owner<T>(
    uid: u32,
    gid: u32,
    f: impl FnOnce() -> std::io::Result<T>,
) -> std::io::Result<T> {
    // SAFETY: setfsgid and setfsuid change only this thread's credentials and take
    // plain integers; they cannot fail in a way that leaves memory unsafe (a refused
    // change leaves the old id, which the check below catches).
    unsafe {
        libc::setfsgid(gid);
        libc::setfsuid(uid);
        // Called with an invalid id, both return the current one without changing it.
        let (now_uid, now_gid) = (libc::setfsuid(u32::MAX), libc::setfsgid(u32::MAX));
        if now_uid as u32 != uid || now_gid as u32 != gid {
            libc::setfsuid(0);
            libc::setfsgid(0);
            return Err(std::io::Error::other(format!(
                "could not take file-system ids {uid}:{gid}"
            )));
        }
    }
    let result = f();
    // SAFETY: as above; root's ids are always allowed for root.
    unsafe {
        libc::setfsuid(0);
        libc::setfsgid(0);
    }
    result
}

#[cfg(test)]
mod tests {
    /// A socket pair's end hangs up once every descriptor of the other end is closed,
    /// and not before.
    #[test]
    fn an_end_hangs_up_when_the_other_is_released() {
        use std::os::fd::AsFd;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(!super::hung_up(ours.as_fd()));
        let copy = theirs.as_fd().try_clone_to_owned().unwrap();
        drop(theirs);
        assert!(
            !super::hung_up(ours.as_fd()),
            "a copy of the far end is held"
        );
        drop(copy);
        assert!(super::hung_up(ours.as_fd()));
    }

    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_pidfd_names_its_process_until_it_exits() {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let fd = pidfd_open(nix::unistd::Pid::from_raw(pid)).unwrap();
        assert_eq!(pidfd_pid(fd.as_fd()).unwrap(), pid);
        child.kill().unwrap();
        child.wait().unwrap();
        let e = pidfd_pid(fd.as_fd()).unwrap_err();
        assert!(e.to_string().contains("has exited"), "{e}");
        let file = std::fs::File::open("/proc/self/cgroup").unwrap();
        let e = pidfd_pid(file.as_fd()).unwrap_err();
        assert!(e.to_string().contains("is not a pidfd"), "{e}");
    }
}
