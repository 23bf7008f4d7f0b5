//! Event and result bytes, inline or in shared memory.
//!
//! A payload over [`SHARED_THRESHOLD`] travels as a sealed memfd: the sender writes
//! it once, seals it against writing and resizing, and passes the descriptor; the
//! receiver checks the seals and maps it read-only. Sealing is what makes the mapping
//! safe to read: nobody can change the bytes under the reader or truncate the file
//! (which would turn reads into SIGBUS).
//!
//! **Who pays.** The pages of a memfd are charged to the memory cgroup of the process
//! that first touches them: its writer. A receiver maps it only when every page of the
//! announced length is already allocated ([`sys::check_allocated`]), so reading it
//! allocates nothing; a sparse memfd (`ftruncate`d, not written) would make the reader
//! allocate (and pay for) every page it reads, and is refused. A process that passes a
//! payload on ([`crate::Channel::send_payload`]) forwards the descriptor and touches
//! no page.

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::ops::Deref;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::sys;

/// Payloads larger than this are sent through a sealed memfd instead of the socket.
pub const SHARED_THRESHOLD: usize = 64 << 10;
/// Largest shared payload accepted (each sandbox's memory limit bounds it further).
pub const MAX_SHARED_PAYLOAD: usize = 1 << 30;

/// The bytes of an event or a result.
pub enum Payload {
    Inline(Vec<u8>),
    Shared(Shared),
}

/// A sealed memfd and a read-only mapping of its first `len` bytes.
pub struct Shared {
    memfd: OwnedFd,
    map: Option<memmap2::Mmap>,
}

impl Payload {
    /// Copies `bytes` into a new sealed memfd (the one copy a shared payload costs).
    pub fn share(bytes: &[u8]) -> io::Result<Payload> {
        let memfd = sys::memfd("sprout-payload")?;
        let mut file = File::from(memfd);
        file.write_all(bytes)?;
        let memfd = OwnedFd::from(file);
        sys::seal(memfd.as_fd())?;
        Payload::map(memfd, bytes.len())
    }

    /// Maps a received memfd after checking that it is sealed and holds `len` bytes.
    pub fn map(memfd: OwnedFd, len: usize) -> io::Result<Payload> {
        sys::check_sealed(memfd.as_fd(), len)?;
        let map = if len == 0 {
            None
        } else {
            Some(sys::map_sealed(memfd.as_fd(), len)?)
        };
        Ok(Payload::Shared(Shared { memfd, map }))
    }

    pub fn is_shared(&self) -> bool {
        matches!(self, Payload::Shared(_))
    }

    /// The memfd of a shared payload.
    pub fn shared_fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Payload::Shared(s) => Some(s.memfd.as_fd()),
            Payload::Inline(_) => None,
        }
    }

    /// The bytes as a vector (a copy for a shared payload).
    pub fn into_vec(self) -> Vec<u8> {
        match self {
            Payload::Inline(v) => v,
            Payload::Shared(s) => s.map.as_deref().unwrap_or_default().to_vec(),
        }
    }
}

impl Deref for Payload {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Payload::Inline(v) => v,
            Payload::Shared(s) => s.map.as_deref().unwrap_or_default(),
        }
    }
}

impl Default for Payload {
    fn default() -> Self {
        Payload::Inline(Vec::new())
    }
}

impl From<Vec<u8>> for Payload {
    fn from(v: Vec<u8>) -> Self {
        Payload::Inline(v)
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Payload::Inline(v) => write!(f, "Inline({} bytes)", v.len()),
            Payload::Shared(_) => write!(f, "Shared({} bytes)", self.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn shared_payloads_are_sealed_read_only_copies() {
        let p = Payload::share(b"hello").unwrap();
        assert!(p.is_shared());
        assert_eq!(&*p, b"hello");
        // The memfd can be neither written nor resized any more.
        let mut f = File::from(p.shared_fd().unwrap().try_clone_to_owned().unwrap());
        assert!(f.write_all(b"x").is_err());
        assert!(f.set_len(1).is_err());
        assert_eq!(&*Payload::share(b"").unwrap(), b"");
    }

    /// A memfd with `len` bytes, written in full or only `ftruncate`d; sealed.
    fn sealed_memfd(len: usize, written: bool) -> OwnedFd {
        let mut file = File::from(sys::memfd("sprout-test").unwrap());
        if written {
            file.write_all(&vec![7u8; len]).unwrap();
        } else {
            file.set_len(len as u64).unwrap();
        }
        let fd = OwnedFd::from(file);
        sys::seal(fd.as_fd()).unwrap();
        fd
    }

    #[test]
    fn a_sparse_memfd_is_refused_and_a_written_one_is_mapped() {
        // The attack of issue 9: sealed, 64 MiB long, not one page allocated.
        let err = Payload::map(sealed_memfd(64 << 20, false), 64 << 20).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let text = err.to_string();
        assert!(
            text.contains("0 bytes allocated for the 67108864 announced"),
            "{text}"
        );
        assert!(text.contains("sparse"), "{text}");
        // Written in full (not a whole number of pages): mapped.
        let p = Payload::map(sealed_memfd((1 << 20) + 5, true), (1 << 20) + 5).unwrap();
        assert_eq!(p.len(), (1 << 20) + 5);
        assert!(p.iter().all(|&b| b == 7));
        // Only what is announced must be allocated: a longer, written memfd's prefix.
        assert_eq!(Payload::map(sealed_memfd(100, true), 10).unwrap().len(), 10);
        // Nothing announced: nothing to check.
        assert!(Payload::map(sealed_memfd(1 << 20, false), 0)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_hole_hidden_by_pages_past_the_end_is_refused() {
        // Pages allocated past the end (fallocate KEEP_SIZE) make `st_blocks` cover
        // the length while the file has a hole: the exact check finds it.
        let len = 1usize << 20;
        let mut file = File::from(sys::memfd("sprout-test").unwrap());
        file.write_all(&vec![1u8; len / 2]).unwrap();
        file.set_len(len as u64).unwrap();
        nix::fcntl::fallocate(
            file.as_raw_fd(),
            nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            len as i64,
            (len / 2) as i64,
        )
        .unwrap();
        let fd = OwnedFd::from(file);
        sys::seal(fd.as_fd()).unwrap();
        let blocks = nix::sys::stat::fstat(fd.as_raw_fd()).unwrap().st_blocks as usize;
        assert!(blocks * 512 >= len, "{blocks} blocks");
        let err = Payload::map(fd, len).unwrap_err();
        assert!(
            err.to_string()
                .contains("a hole at byte 524288 of the 1048576"),
            "{err}"
        );
    }

    #[test]
    fn only_a_shmem_memfd_is_accepted() {
        // A hugetlbfs memfd answers `SEEK_HOLE` and `st_blocks` wrongly: refused by its
        // file system before either is asked.
        let raw = nix::sys::memfd::memfd_create(
            c"sprout-test",
            nix::sys::memfd::MemFdCreateFlag::MFD_HUGETLB
                | nix::sys::memfd::MemFdCreateFlag::MFD_ALLOW_SEALING,
        )
        .expect("memfd_create(MFD_HUGETLB): this kernel has hugetlbfs");
        let file = File::from(raw);
        file.set_len(2 << 20).unwrap();
        let fd = OwnedFd::from(file);
        sys::seal(fd.as_fd()).unwrap();
        let err = Payload::map(fd, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("not shmem"), "{err}");
    }

    #[test]
    fn a_short_memfd_is_refused() {
        let p = Payload::share(b"abc").unwrap();
        let fd = p.shared_fd().unwrap().try_clone_to_owned().unwrap();
        let err = Payload::map(fd, 4).unwrap_err();
        assert!(err.to_string().contains("holds 3 bytes"), "{err}");
    }
}
