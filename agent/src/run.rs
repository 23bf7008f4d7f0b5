//! What the sandboxes taking part in one workflow run share: its scratch filesystem
//! and its cancellation.
//!
//! A run is either declarative (`Agent` runs a workflow file: a fresh tmpfs scratch is
//! attached to every sandbox it uses) or started by a function's own calls (an SDK
//! run: the calling sandbox's own `/workflow` is the scratch, attached to the siblings
//! that run its parallel calls, and wiped when the calling invocation ends).

use std::io::{PipeReader, PipeWriter};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex};

use pool::Scratch;

use crate::agent::lock;

/// Fired once; anything waiting on a call polls [`Cancel::fd`], which becomes readable.
#[derive(Debug)]
pub struct Cancel {
    read: PipeReader,
    write: Mutex<Option<PipeWriter>>,
}

impl Cancel {
    pub fn new() -> std::io::Result<Cancel> {
        let (read, write) = std::io::pipe()?;
        Ok(Cancel {
            read,
            write: Mutex::new(Some(write)),
        })
    }

    /// Closes the write end: every poller sees the read end readable (end of file).
    pub fn fire(&self) {
        lock(&self.write).take();
    }

    pub fn fired(&self) -> bool {
        lock(&self.write).is_none()
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }
}

#[derive(Debug)]
pub struct Run {
    pub id: u64,
    pub cancel: Cancel,
    /// The sandbox an SDK run is rooted in (its `/workflow` is the scratch).
    pub root: Option<String>,
    scratch: Mutex<Option<Arc<Scratch>>>,
}

impl Run {
    /// A declarative run with its own scratch.
    pub fn with_scratch(id: u64, scratch: Scratch) -> std::io::Result<Run> {
        Ok(Run {
            id,
            cancel: Cancel::new()?,
            root: None,
            scratch: Mutex::new(Some(Arc::new(scratch))),
        })
    }

    /// An SDK run rooted in `sandbox`; its scratch is cloned from it on first need.
    pub fn rooted_in(id: u64, sandbox: &str) -> std::io::Result<Run> {
        Ok(Run {
            id,
            cancel: Cancel::new()?,
            root: Some(sandbox.to_owned()),
            scratch: Mutex::new(None),
        })
    }

    /// The scratch to attach to a sibling, made with `make` the first time.
    pub fn scratch<E>(
        &self,
        make: impl FnOnce() -> Result<Scratch, E>,
    ) -> Result<Arc<Scratch>, E> {
        let mut slot = lock(&self.scratch);
        if let Some(s) = slot.as_ref() {
            return Ok(s.clone());
        }
        let s = Arc::new(make()?);
        *slot = Some(s.clone());
        Ok(s)
    }

    /// Whether `sandbox` is where this run's scratch lives (it is not attached there).
    pub fn is_root(&self, sandbox: &str) -> bool {
        self.root.as_deref() == Some(sandbox)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_makes_its_fd_readable_once_fired() {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let c = Cancel::new().unwrap();
        let mut fds = [PollFd::new(c.fd(), PollFlags::POLLIN)];
        assert_eq!(poll(&mut fds, PollTimeout::ZERO).unwrap(), 0);
        assert!(!c.fired());
        c.fire();
        c.fire();
        assert!(c.fired());
        let mut fds = [PollFd::new(c.fd(), PollFlags::POLLIN)];
        assert_eq!(poll(&mut fds, PollTimeout::ZERO).unwrap(), 1);
    }

    #[test]
    fn an_sdk_run_makes_its_scratch_once() {
        let run = Run::rooted_in(1, "sb").unwrap();
        assert!(run.is_root("sb") && !run.is_root("other"));
        let mut made = 0;
        for _ in 0..2 {
            let r: Result<_, ()> = run.scratch(|| {
                made += 1;
                Ok(Scratch::new_tmpfs(1).unwrap())
            });
            r.unwrap();
        }
        assert_eq!(made, 1);
    }
}
