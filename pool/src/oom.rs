//! A memory cgroup's out-of-memory notification ([`OomWatch`]), on cgroup v1 (an
//! eventfd registered through `cgroup.event_control`) and v2 (`memory.events` polled
//! for `POLLPRI`). [`crate::Cgroups::watch_oom`] picks the one the host has.

use std::fs::{self, File};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::poll::PollFlags;

use crate::{io_err, sys, Error};

/// A memory cgroup's out-of-memory notification: a descriptor that `poll` reports
/// ready ([`OomWatch::poll_flags`]) when the cgroup may have run out of memory, and the
/// cgroup's `oom_kill` counter as it was when the watch was set.
///
/// On v1 the descriptor is an eventfd registered for `memory.oom_control` through
/// `cgroup.event_control`: readable after each OOM. On v2 it is `memory.events` itself,
/// which the kernel flags (`POLLPRI`) whenever one of its counters changes (`max` and
/// `high` too, so a wake-up is only a hint). Either way [`OomWatch::killed`] clears
/// the notification and says whether `oom_kill` went up.
///
/// The kernel notifies when the cgroup runs out of memory, *before* its OOM killer
/// picks and kills a process (and counts it in `oom_kill`): a notification not yet
/// followed by a kill leaves the watch unsettled for up to [`OOM_SETTLE`], during
/// which [`OomWatch::recheck_in`] asks to look again soon.
#[derive(Debug)]
pub struct OomWatch {
    fd: OwnedFd,
    notifier: Notifier,
    /// `memory.oom_control` (v1) or `memory.events` (v2).
    counter: PathBuf,
    baseline: u64,
    /// v2: the `oom` count last seen (an OOM, killed or not yet).
    ooms: u64,
    /// Until when an OOM notification not followed by a kill yet is looked at again.
    unsettled: Option<std::time::Instant>,
}

/// How long after an OOM notification the watch waits for the kill to be counted.
pub const OOM_SETTLE: Duration = Duration::from_millis(500);
/// How often an unsettled watch is looked at.
pub(crate) const OOM_RECHECK: Duration = Duration::from_millis(5);

/// What wakes a watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Notifier {
    /// cgroup v1: an eventfd, readable after each OOM.
    EventFd,
    /// cgroup v2: `memory.events`, flagged when a counter changes.
    MemoryEvents,
}

impl OomWatch {
    /// The watch of the v1 memory cgroup at `dir`.
    pub(crate) fn v1(dir: &Path) -> Result<OomWatch, Error> {
        let control = dir.join("memory.oom_control");
        let cfile = File::open(&control).map_err(io_err("open", &control))?;
        let efd = sys::eventfd().map_err(io_err("eventfd for", &control))?;
        // The kernel keeps the registration until the eventfd is closed or the
        // cgroup removed; `cfile` is needed only for the write.
        let register = dir.join("cgroup.event_control");
        fs::write(
            &register,
            format!("{} {}", efd.as_raw_fd(), cfile.as_raw_fd()),
        )
        .map_err(io_err("register an OOM eventfd in", &register))?;
        let text = fs::read_to_string(&control).map_err(io_err("read", &control))?;
        Ok(OomWatch {
            fd: efd,
            notifier: Notifier::EventFd,
            counter: control,
            baseline: keyed_value(&text, "oom_kill").unwrap_or(0),
            ooms: 0,
            unsettled: None,
        })
    }

    /// The watch of the v2 cgroup at `dir`.
    pub(crate) fn v2(dir: &Path) -> Result<OomWatch, Error> {
        let events = dir.join("memory.events");
        let file = File::open(&events).map_err(io_err("open", &events))?;
        let mut watch = OomWatch {
            fd: file.into(),
            notifier: Notifier::MemoryEvents,
            counter: events,
            baseline: 0,
            ooms: 0,
            unsettled: None,
        };
        // Reading it also arms the notification.
        (watch.baseline, watch.ooms) = watch.read_counts()?;
        Ok(watch)
    }

    /// The descriptor to poll.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The `poll` events that mean "look": `POLLIN` (v1 eventfd), `POLLPRI` (v2).
    pub fn poll_flags(&self) -> PollFlags {
        match self.notifier {
            Notifier::EventFd => PollFlags::POLLIN,
            Notifier::MemoryEvents => PollFlags::POLLPRI,
        }
    }

    /// After `poll` reported the descriptor (`notified`), or when
    /// [`OomWatch::recheck_in`] asked: clears the notification (so the next poll waits
    /// for a new one) and returns whether the OOM killer killed a process in the
    /// cgroup since the watch was set. An unreadable counter counts as a kill (the
    /// cgroup is gone or broken: the instance is not to be trusted).
    pub fn killed(&mut self, notified: bool) -> bool {
        let mut oom = false;
        if notified && self.notifier == Notifier::EventFd {
            let mut count = [0u8; 8];
            // The eventfd signals nothing but OOMs.
            oom = nix::unistd::read(self.fd.as_raw_fd(), &mut count).is_ok();
        }
        let (kills, ooms) = match self.read_counts() {
            Ok(counts) => counts,
            Err(e) => {
                tracing::warn!(error = %e, "the OOM counter is unreadable");
                return true;
            }
        };
        if kills > self.baseline {
            return true;
        }
        if ooms > self.ooms {
            self.ooms = ooms;
            oom = true;
        }
        let now = std::time::Instant::now();
        if oom {
            self.unsettled = Some(now + OOM_SETTLE);
        } else if self.unsettled.is_some_and(|until| until <= now) {
            self.unsettled = None;
        }
        false
    }

    /// While an OOM notification has not been followed by a kill (for at most
    /// [`OOM_SETTLE`]): how soon to call [`OomWatch::killed`] again.
    pub fn recheck_in(&self) -> Option<Duration> {
        self.unsettled.map(|_| OOM_RECHECK)
    }

    /// `oom_kill` and (v2) `oom` now. On v2 reads the watched descriptor from its
    /// start, which is what re-arms its notification.
    fn read_counts(&mut self) -> Result<(u64, u64), Error> {
        let text = match self.notifier {
            Notifier::EventFd => fs::read_to_string(&self.counter),
            Notifier::MemoryEvents => {
                let mut buf = [0u8; 1024];
                nix::sys::uio::pread(&self.fd, &mut buf, 0)
                    .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
                    .map_err(std::io::Error::from)
            }
        }
        .map_err(io_err("read", &self.counter))?;
        Ok((
            keyed_value(&text, "oom_kill").unwrap_or(0),
            keyed_value(&text, "oom").unwrap_or(0),
        ))
    }
}

/// The value of `key` in a `key value` per line file (memory.events, memory.oom_control).
pub(crate) fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}
