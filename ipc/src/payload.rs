//! Event and result bytes, inline or in shared memory.
//!
//! A payload over [`SHARED_THRESHOLD`] travels as a sealed memfd: the sender writes
//! it once, seals it against writing and resizing, and passes the descriptor; the
//! receiver checks the seals and maps it read-only. Sealing is what makes the mapping
//! safe to read: nobody can change the bytes under the reader or truncate the file
//! (which would turn reads into SIGBUS).

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

    #[test]
    fn a_short_memfd_is_refused() {
        let p = Payload::share(b"abc").unwrap();
        let fd = p.shared_fd().unwrap().try_clone_to_owned().unwrap();
        let err = Payload::map(fd, 4).unwrap_err();
        assert!(err.to_string().contains("holds 3 bytes"), "{err}");
    }
}
