//! Raw socket calls that hand back file descriptors; the only `unsafe` in this crate.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{self, ControlMessage, MsgFlags};

/// The most descriptors one frame may carry.
pub const MAX_FDS: usize = 8;

/// What one [`recv_with_fds`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Bytes read (0 at end of stream).
    pub bytes: usize,
    /// The kernel set `MSG_CTRUNC`: the message carried more descriptors than fit in
    /// [`MAX_FDS`] (or this process is out of descriptors) and it closed the rest, so
    /// the frame they belong to cannot be right.
    pub truncated: bool,
}

/// One `recvmsg` into `buf`; descriptors that arrive are appended to `fds`, also
/// when the kernel truncated the set (so the caller closes them).
///
/// Not nix's `recvmsg`: its `cmsgs()` refuses to look at a truncated control buffer,
/// which would leave the descriptors the kernel did install open and owned by nobody.
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    dont_wait: bool,
) -> io::Result<Received> {
    let mut flags = libc::MSG_CMSG_CLOEXEC;
    if dont_wait {
        flags |= libc::MSG_DONTWAIT;
    }
    // Room for MAX_FDS descriptors and no more: the kernel closes the rest of a larger
    // set and says so with MSG_CTRUNC. `u64`s for the alignment of `cmsghdr`.
    let mut control = [0u64; 16];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) };
    let space = space as usize;
    assert!(space <= std::mem::size_of_val(&control));
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let bytes = loop {
        // SAFETY: `msg` points at `iov` (which covers `buf`, writable for its length)
        // and at `control` (writable for `space` bytes); all outlive the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, flags) };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    let control_end = control.as_ptr() as usize + (msg.msg_controllen as usize).min(space);
    // SAFETY: `msg` is the header recvmsg filled: its control pointer and length (the
    // bytes the kernel wrote) bound the walk, and CMSG_FIRSTHDR/CMSG_NXTHDR return null
    // past them.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: `c` is a header within `control` (see above); read unaligned-safe
        // because `control` is aligned for `cmsghdr`.
        let hdr = unsafe { std::ptr::read(c) };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_DATA of a header within `control` points inside it.
            let data = unsafe { libc::CMSG_DATA(c) };
            let end = (c as usize + hdr.cmsg_len as usize).min(control_end);
            let count = end.saturating_sub(data as usize) / std::mem::size_of::<RawFd>();
            for i in 0..count {
                // SAFETY: `i` < `count` keeps the read inside the data the kernel wrote.
                let fd = unsafe { std::ptr::read_unaligned(data.cast::<RawFd>().add(i)) };
                // SAFETY: the kernel installed `fd` in our table for this message
                // (MSG_CMSG_CLOEXEC set close-on-exec); nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
    }
    Ok(Received {
        bytes,
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// One `sendmsg` of `iov` with `fds` attached to its first byte. Returns bytes written.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    iov: &[IoSlice<'_>],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsgs };
    loop {
        match socket::sendmsg::<()>(sock.as_raw_fd(), iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => return other.map_err(io::Error::from),
        }
    }
}

/// A new memfd that can be sealed.
pub fn memfd(name: &str) -> io::Result<OwnedFd> {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    let name = std::ffi::CString::new(name).map_err(io::Error::other)?;
    memfd_create(
        &name,
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )
    .map_err(io::Error::from)
}

/// The seals a shared payload must carry before a receiver maps it.
fn payload_seals() -> nix::fcntl::SealFlag {
    use nix::fcntl::SealFlag;
    SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SEAL
}

/// Seals a memfd against writing, resizing and further sealing.
///
/// `F_SEAL_WRITE` fails with `EBUSY` while the kernel still holds an extra reference
/// on one of the file's pages (after it waited some 75 ms itself); the pages were
/// just written, so that is transient (page migration, per-CPU batches). Retries a
/// few times, 1 to 32 ms apart; nothing but that case waits.
pub fn seal(fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::errno::Errno;
    use nix::fcntl::{fcntl, FcntlArg};
    let mut pause = std::time::Duration::from_millis(1);
    loop {
        match fcntl(fd.as_raw_fd(), FcntlArg::F_ADD_SEALS(payload_seals())) {
            Err(Errno::EBUSY) if pause <= std::time::Duration::from_millis(32) => {
                std::thread::sleep(pause);
                pause *= 2;
            }
            done => return done.map(drop).map_err(io::Error::from),
        }
    }
}

/// Checks that `fd` is a memfd sealed against writing and shrinking that holds at
/// least `len` bytes, all of them allocated ([`check_allocated`]).
pub fn check_sealed(fd: BorrowedFd<'_>, len: usize) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    let seals = fcntl(fd.as_raw_fd(), FcntlArg::F_GET_SEALS).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the payload descriptor is not a sealed memfd: {e}"),
        )
    })?;
    let seals = SealFlag::from_bits_truncate(seals);
    let needed = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_WRITE;
    if !seals.contains(needed) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the payload memfd is not sealed against writing and shrinking",
        ));
    }
    let st = nix::sys::stat::fstat(fd.as_raw_fd())?;
    let size = st.st_size as u64;
    if size < len as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the payload memfd holds {size} bytes, the frame announced {len}"),
        ));
    }
    check_allocated(fd, len as u64, st.st_blocks as u64)
}

/// Checks that the first `len` bytes of a memfd are backed by pages its writer
/// already allocated, so that reading them through a mapping allocates nothing: a
/// read fault on a hole of a shmem file allocates a zeroed page, charged to the
/// reader's memory cgroup. `blocks` is its `st_blocks` (512-byte units).
///
/// Two checks. `st_blocks` counts every page the file holds, swapped-out ones too
/// (shmem keeps them in `i_blocks` until they are freed), so `blocks × 512` under the
/// `len` rounded up to pages is a sparse file, refused at no cost. It can also count
/// pages past the end (`fallocate` with `FALLOC_FL_KEEP_SIZE` before sealing), so the
/// exact check is `lseek(SEEK_HOLE)` from 0, which must find no hole before `len`
/// (swapped pages count as data; pages `fallocate`d and never written count as holes
/// and are refused too: sprout's senders write what they share). `F_SEAL_WRITE`
/// forbids punching holes afterwards and `F_SEAL_SHRINK` truncating, so what is
/// checked here stays true while the receiver holds the descriptor. (The `lseek`
/// moves the file offset the sender shares; nothing in sprout reads a payload memfd
/// by offset.) Only a memfd on shmem is accepted (`fstatfs`): hugetlbfs answers
/// neither question truthfully. Costs one `fstatfs`, one `fstat` and one `lseek`,
/// whose walk of the page cache takes about 10 µs per MiB.
pub fn check_allocated(fd: BorrowedFd<'_>, len: u64, blocks: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // Only shmem answers both questions below truthfully: on hugetlbfs (a
    // `MFD_HUGETLB` memfd) `SEEK_HOLE` reports no hole and `st_blocks` counts pages
    // allocated past the end.
    let fs = fs_type(fd)?;
    if fs != libc::TMPFS_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the payload memfd is on a file system of type {fs:#x}, not shmem \
                 ({:#x}): only a plain memfd (no MFD_HUGETLB) is accepted",
                libc::TMPFS_MAGIC
            ),
        ));
    }
    let page = page_size();
    let needed = len.div_ceil(page) * page;
    let allocated = blocks.saturating_mul(512);
    if allocated < needed {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the payload memfd has {allocated} bytes allocated for the {len} announced \
                 ({needed} in pages): a sparse memfd is refused (write a shared payload in \
                 full before sending it)"
            ),
        ));
    }
    let hole = nix::unistd::lseek(fd.as_raw_fd(), 0, nix::unistd::Whence::SeekHole)
        .map_err(io::Error::from)? as u64;
    if hole < len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the payload memfd has a hole at byte {hole} of the {len} announced: a \
                 sparse memfd is refused (write a shared payload in full before sending it)"
            ),
        ));
    }
    Ok(())
}

/// The `f_type` of the file system `fd` is on.
fn fs_type(fd: BorrowedFd<'_>) -> io::Result<libc::__fsword_t> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `fd` is a valid descriptor for the call and `st` is a writable statfs
    // the kernel fills in full on success.
    let rc = unsafe { libc::fstatfs(fd.as_raw_fd(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatfs succeeded, so `st` is initialised.
    Ok(unsafe { st.assume_init() }.f_type)
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as u64
    } else {
        4096
    }
}

/// Maps the first `len` (> 0) bytes of a sealed memfd read-only.
pub fn map_sealed(fd: BorrowedFd<'_>, len: usize) -> io::Result<memmap2::Mmap> {
    // SAFETY: `check_sealed` verified F_SEAL_WRITE and F_SEAL_SHRINK, so no process can
    // change these bytes or truncate the file while the mapping lives: reads through
    // it see immutable data and cannot fault past the end.
    unsafe { memmap2::MmapOptions::new().len(len).map(fd.as_raw_fd()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::time::{Duration, Instant};

    /// A written memfd and a writable shared mapping of it, which makes
    /// `F_SEAL_WRITE` fail with `EBUSY` while it lives.
    fn mapped_memfd() -> (std::fs::File, memmap2::MmapMut) {
        let file = std::fs::File::from(memfd("sprout-seal-test").unwrap());
        file.set_len(4096).unwrap();
        // SAFETY: the file is this test's own memfd; nothing else maps or resizes it.
        let map = unsafe { memmap2::MmapMut::map_mut(&file).unwrap() };
        (file, map)
    }

    #[test]
    fn sealing_waits_out_a_reference_that_goes_away() {
        let (file, mut map) = mapped_memfd();
        map[0] = 1;
        let unmapper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            drop(map);
        });
        seal(file.as_fd()).expect("sealed once the mapping is gone");
        unmapper.join().unwrap();
    }

    #[test]
    fn sealing_gives_up_on_a_reference_that_stays() {
        let (file, _map) = mapped_memfd();
        let started = Instant::now();
        let e = seal(file.as_fd()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBUSY), "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
}
