//! Raw socket calls that hand back file descriptors; the only `unsafe` in this crate.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};

/// The most descriptors one frame may carry.
pub const MAX_FDS: usize = 8;

/// One `recvmsg` into `buf`; descriptors that arrive are appended to `fds`.
/// Returns the number of bytes read (0 at end of stream).
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    dont_wait: bool,
) -> io::Result<usize> {
    let flags = if dont_wait {
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT
    } else {
        MsgFlags::MSG_CMSG_CLOEXEC
    };
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match socket::recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg), flags) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other.map_err(io::Error::from)?,
        }
    };
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for fd in raw {
                // SAFETY: the kernel installed `fd` in our table for this message
                // (MSG_CMSG_CLOEXEC set close-on-exec); nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::other(
            "control message truncated: too many descriptors in one frame",
        ));
    }
    Ok(msg.bytes)
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
pub fn seal(fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg};
    fcntl(fd.as_raw_fd(), FcntlArg::F_ADD_SEALS(payload_seals()))?;
    Ok(())
}

/// Checks that `fd` is a memfd sealed against writing and shrinking that holds at
/// least `len` bytes.
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
    let size = nix::sys::stat::fstat(fd.as_raw_fd())?.st_size as u64;
    if size < len as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the payload memfd holds {size} bytes, the frame announced {len}"),
        ));
    }
    Ok(())
}

/// Maps the first `len` (> 0) bytes of a sealed memfd read-only.
pub fn map_sealed(fd: BorrowedFd<'_>, len: usize) -> io::Result<memmap2::Mmap> {
    // SAFETY: `check_sealed` verified F_SEAL_WRITE and F_SEAL_SHRINK, so no process can
    // change these bytes or truncate the file while the mapping lives: reads through
    // it see immutable data and cannot fault past the end.
    unsafe { memmap2::MmapOptions::new().len(len).map(fd.as_raw_fd()) }
}
