//! Pausing a sandbox by freezing its cgroup.
//!
//! cgroup v1: write `FROZEN`/`THAWED` to `freezer.state`; the kernel may report
//! `FREEZING` until every task has stopped, and v1 has no notification for the end of
//! it, so the state is re-read (yielding the CPU between reads; in practice one or two
//! reads). cgroup v2: write `1`/`0` to `cgroup.freeze` and wait for `frozen 1`/`frozen
//! 0` in `cgroup.events`, woken by the kernel's `POLLPRI` notification on that file.
//! Both files stay open for the sandbox's life, so a freeze or thaw is a `pwrite` and
//! one or two `pread`s.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::{io_err, CgroupVersion, Cgroups, Error};

/// How long a freeze may take before it is reported as failed.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(2);

/// A sandbox cgroup's freezer, with its control files kept open.
#[derive(Debug)]
pub struct Freezer {
    version: CgroupVersion,
    /// v1 `freezer.state` or v2 `cgroup.freeze`.
    control: File,
    control_path: PathBuf,
    /// v2 `cgroup.events`.
    events: Option<File>,
    timeout: Duration,
}

impl Freezer {
    pub fn open(cgroups: &Cgroups, rel: &Path) -> Result<Freezer, Error> {
        let dir = cgroups.controller_dir("freezer", rel);
        let (control_path, events) = match cgroups.version() {
            CgroupVersion::V1 => (dir.join("freezer.state"), None),
            CgroupVersion::V2 => {
                let events = dir.join("cgroup.events");
                (
                    dir.join("cgroup.freeze"),
                    Some(File::open(&events).map_err(io_err("open", &events))?),
                )
            }
        };
        let control = File::options()
            .read(true)
            .write(true)
            .open(&control_path)
            .map_err(io_err("open", &control_path))?;
        Ok(Freezer {
            version: cgroups.version(),
            control,
            control_path,
            events,
            timeout: FREEZE_TIMEOUT,
        })
    }

    /// Stops every process in the cgroup; returns once they are all stopped.
    pub fn freeze(&self) -> Result<(), Error> {
        self.set(true)
    }

    /// Lets the cgroup's processes run again.
    pub fn thaw(&self) -> Result<(), Error> {
        self.set(false)
    }

    /// Whether the cgroup is (completely) frozen now.
    pub fn is_frozen(&self) -> Result<bool, Error> {
        match self.version {
            CgroupVersion::V1 => Ok(self.read_control()?.trim() == "FROZEN"),
            CgroupVersion::V2 => self.events_frozen(),
        }
    }

    fn set(&self, frozen: bool) -> Result<(), Error> {
        let value: &[u8] = match (self.version, frozen) {
            (CgroupVersion::V1, true) => b"FROZEN",
            (CgroupVersion::V1, false) => b"THAWED",
            (CgroupVersion::V2, true) => b"1",
            (CgroupVersion::V2, false) => b"0",
        };
        self.control
            .write_at(value, 0)
            .map_err(io_err("write", &self.control_path))?;
        let deadline = Instant::now() + self.timeout;
        loop {
            if self.is_frozen()? == frozen {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Freezer {
                    path: self.control_path.clone(),
                    frozen,
                    after: self.timeout,
                });
            }
            match &self.events {
                // v2: sleep until cgroup.events changes.
                Some(events) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let mut fds = [PollFd::new(events.as_fd(), PollFlags::POLLPRI)];
                    let _ = poll(
                        &mut fds,
                        PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX),
                    );
                }
                // v1: no notification; FREEZING ends within microseconds.
                None => {
                    if frozen {
                        // Tasks forked while freezing are caught by writing again.
                        self.control
                            .write_at(value, 0)
                            .map_err(io_err("write", &self.control_path))?;
                    }
                    std::thread::yield_now();
                }
            }
        }
    }

    fn read_control(&self) -> Result<String, Error> {
        let mut buf = [0u8; 32];
        let n = self
            .control
            .read_at(&mut buf, 0)
            .map_err(io_err("read", &self.control_path))?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    fn events_frozen(&self) -> Result<bool, Error> {
        let events = self.events.as_ref().expect("v2 freezer has cgroup.events");
        let mut buf = [0u8; 256];
        let n = events
            .read_at(&mut buf, 0)
            .map_err(io_err("read", &self.control_path))?;
        let text = String::from_utf8_lossy(&buf[..n]);
        Ok(text.lines().any(|l| l.trim() == "frozen 1"))
    }

    #[cfg(test)]
    fn with_timeout(mut self, timeout: Duration) -> Freezer {
        self.timeout = timeout;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn v1_writes_the_state_and_reads_it_back() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("freezer/sprout/1/s");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("freezer.state"), "THAWED\n").unwrap();
        let f = Freezer::open(
            &Cgroups::at(t.path(), CgroupVersion::V1),
            Path::new("/sprout/1/s"),
        )
        .unwrap();
        assert!(!f.is_frozen().unwrap());
        f.freeze().unwrap();
        assert_eq!(
            fs::read_to_string(dir.join("freezer.state"))
                .unwrap()
                .trim(),
            "FROZEN"
        );
        assert!(f.is_frozen().unwrap());
        f.thaw().unwrap();
        assert_eq!(
            fs::read_to_string(dir.join("freezer.state"))
                .unwrap()
                .trim(),
            "THAWED"
        );
    }

    #[test]
    fn v2_waits_for_cgroup_events_and_gives_up_naming_the_file() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("sprout/2/s");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("cgroup.freeze"), "0\n").unwrap();
        fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
        let f = Freezer::open(
            &Cgroups::at(t.path(), CgroupVersion::V2),
            Path::new("/sprout/2/s"),
        )
        .unwrap();
        f.freeze().unwrap();
        assert_eq!(
            fs::read_to_string(dir.join("cgroup.freeze")).unwrap(),
            "1\n"
        );

        // The kernel never reports frozen: the freeze fails after the timeout.
        fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        let f = f.with_timeout(Duration::from_millis(50));
        let err = f.freeze().unwrap_err().to_string();
        assert!(
            err.contains("cgroup.freeze") && err.contains("frozen"),
            "{err}"
        );
    }

    /// v2: the cgroup's own directory (no `freezer/` hierarchy), `0` to thaw, and the
    /// state is what the kernel reports in `cgroup.events`, not what was asked.
    #[test]
    fn v2_thaws_with_0_and_reads_the_state_from_cgroup_events() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("sprout/6/s");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("cgroup.freeze"), "1\n").unwrap();
        fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        let f = Freezer::open(
            &Cgroups::at(t.path(), CgroupVersion::V2),
            Path::new("/sprout/6/s"),
        )
        .unwrap();
        assert!(
            !f.is_frozen().unwrap(),
            "asked to freeze (cgroup.freeze 1) is not frozen until cgroup.events says so"
        );
        fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
        assert!(f.is_frozen().unwrap());

        fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        f.thaw().unwrap();
        assert_eq!(
            fs::read_to_string(dir.join("cgroup.freeze")).unwrap(),
            "0\n"
        );
        assert!(!t.path().join("freezer").exists(), "no v1 hierarchy on v2");

        // The kernel still reports frozen: the thaw fails after the timeout.
        fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
        let f = f.with_timeout(Duration::from_millis(50));
        let err = f.thaw().unwrap_err().to_string();
        assert!(
            err.contains("sprout/6/s/cgroup.freeze") && err.contains("not thawed"),
            "{err}"
        );
    }

    #[test]
    fn v2_open_needs_cgroup_freeze_and_cgroup_events() {
        let t = tempfile::tempdir().unwrap();
        let cg = Cgroups::at(t.path(), CgroupVersion::V2);
        let dir = t.path().join("sprout/7/s");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("cgroup.freeze"), "0\n").unwrap();
        let err = Freezer::open(&cg, Path::new("/sprout/7/s"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sprout/7/s/cgroup.events"), "{err}");
        fs::remove_file(dir.join("cgroup.freeze")).unwrap();
        fs::write(dir.join("cgroup.events"), "frozen 0\n").unwrap();
        let err = Freezer::open(&cg, Path::new("/sprout/7/s"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sprout/7/s/cgroup.freeze"), "{err}");
    }

    #[test]
    fn missing_freezer_is_an_error_naming_the_path() {
        let t = tempfile::tempdir().unwrap();
        let err = Freezer::open(
            &Cgroups::at(t.path(), CgroupVersion::V1),
            Path::new("/sprout/none"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("freezer/sprout/none/freezer.state"), "{err}");
    }
}
