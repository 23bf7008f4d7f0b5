//! The data directory: what must outlive the agent's process.
//!
//! `sprout serve --data-dir PATH` (default [`DEFAULT_PATH`], `SPROUT_DATA_DIR`) keeps
//! here what a restarted agent needs again. What lives only as long as one process
//! (sockets, sandbox bundles, the spawner's state) stays under the state directory
//! (`/run/sprout/<pid>`), which crash clean-up removes; nothing here is removed by it.
//!
//! The layout, relative to the directory (each made 0700 by [`DataDir::open`]):
//!
//! | path             | holds                                                   |
//! |------------------|---------------------------------------------------------|
//! | `format`         | the layout's version, [`FORMAT_VERSION`], as text        |
//! | `lock`           | the `flock` of the agent using the directory; its pid    |
//! | `code/`          | uploaded function code ([`DataDir::code`])               |
//! | `registrations/` | registered functions and workflows ([`DataDir::registrations`], issue 14) |
//! | `packages/`      | the package cache ([`DataDir::packages`], issue 13)      |
//! | `activations/`   | activation records ([`DataDir::activations`], issue 14)  |
//!
//! One agent at a time: [`DataDir::open`] takes an exclusive `flock` on `lock`, held
//! until the [`DataDir`] is dropped (the descriptor is closed on exec, so no child
//! inherits it), and a second open is refused naming the holder's pid.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// Where the daemon keeps its data unless told otherwise.
pub const DEFAULT_PATH: &str = "/var/lib/sprout";
/// The version of the layout this build reads and writes; written to `format`.
pub const FORMAT_VERSION: u32 = 1;
/// The file holding the layout's version.
pub const FORMAT_FILE: &str = "format";
/// The file the using agent holds an exclusive `flock` on; it holds that agent's pid.
pub const LOCK_FILE: &str = "lock";
/// Uploaded function code, one directory per upload.
pub const CODE_DIR: &str = "code";
/// Registered functions and workflows (issue 14).
pub const REGISTRATIONS_DIR: &str = "registrations";
/// The package cache (issue 13).
pub const PACKAGES_DIR: &str = "packages";
/// Activation records (issue 14).
pub const ACTIVATIONS_DIR: &str = "activations";

/// The subdirectories [`DataDir::open`] makes.
const LAYOUT: [&str; 4] = [CODE_DIR, REGISTRATIONS_DIR, PACKAGES_DIR, ACTIVATIONS_DIR];

/// Why a data directory could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("data directory {path}: cannot create {what}")]
    Create {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("data directory {path} is in use by another agent{}", holder.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    InUse { path: PathBuf, holder: Option<u32> },
    #[error("data directory {path}: cannot lock {LOCK_FILE}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("data directory {path}: cannot read {FORMAT_FILE}")]
    ReadFormat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("data directory {path} has format version {found:?}, this sprout reads version {FORMAT_VERSION}")]
    Version { path: PathBuf, found: String },
}

/// An open data directory, locked for this agent until dropped.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    _lock: Flock<File>,
}

impl DataDir {
    /// Opens (creating it and its layout when new) the data directory at `path`, and
    /// locks it. Refuses a directory another agent holds and one of another version.
    pub fn open(path: &Path) -> Result<DataDir, Error> {
        let path = path.to_path_buf();
        let create = |what, source| Error::Create {
            path: path.clone(),
            what,
            source,
        };
        mkdir(&path).map_err(|e| create("the directory", e))?;
        let lock = lock(&path)?;
        check_format(&path)?;
        for sub in LAYOUT {
            mkdir(&path.join(sub)).map_err(|e| create(sub, e))?;
        }
        tracing::debug!(data_dir = %path.display(), "data directory opened");
        Ok(DataDir { path, _lock: lock })
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Uploaded function code: `code/`.
    pub fn code(&self) -> PathBuf {
        self.path.join(CODE_DIR)
    }

    /// Removes every entry of `code/`: until registrations are durable (issue 14), no
    /// code of an earlier agent's is registered, so none is kept.
    pub fn empty_code(&self) -> io::Result<()> {
        for entry in std::fs::read_dir(self.code())? {
            let path = entry?.path();
            if path.is_dir() && !path.is_symlink() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
    }

    /// Registered functions and workflows: `registrations/` (issue 14).
    pub fn registrations(&self) -> PathBuf {
        self.path.join(REGISTRATIONS_DIR)
    }

    /// The package cache: `packages/` (issue 13).
    pub fn packages(&self) -> PathBuf {
        self.path.join(PACKAGES_DIR)
    }

    /// Activation records: `activations/` (issue 14).
    pub fn activations(&self) -> PathBuf {
        self.path.join(ACTIVATIONS_DIR)
    }
}

/// Makes `dir` (and missing parents) 0700; an existing one is left as it is.
fn mkdir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Takes the exclusive lock on `<path>/lock` and writes this process's pid into it.
fn lock(path: &Path) -> Result<Flock<File>, Error> {
    let lock_err = |source| Error::Lock {
        path: path.to_path_buf(),
        source,
    };
    // std opens with O_CLOEXEC: no child inherits the lock.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path.join(LOCK_FILE))
        .map_err(lock_err)?;
    let mut held = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(held) => held,
        Err((mut file, Errno::EWOULDBLOCK)) => {
            let mut pid = String::new();
            let holder = file
                .read_to_string(&mut pid)
                .ok()
                .and_then(|_| pid.trim().parse().ok());
            return Err(Error::InUse {
                path: path.to_path_buf(),
                holder,
            });
        }
        Err((_, errno)) => return Err(lock_err(errno.into())),
    };
    let pid = std::process::id();
    held.set_len(0)
        .and_then(|()| held.rewind())
        .and_then(|()| writeln!(*held, "{pid}"))
        .map_err(lock_err)?;
    Ok(held)
}

/// Checks `<path>/format`, writing it when the directory is new.
fn check_format(path: &Path) -> Result<(), Error> {
    let file = path.join(FORMAT_FILE);
    match fs::read_to_string(&file) {
        Ok(text) if text.trim() == FORMAT_VERSION.to_string() => Ok(()),
        Ok(text) => Err(Error::Version {
            path: path.to_path_buf(),
            found: text.trim().to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Written whole or not at all: a crash leaves no empty `format` behind.
            let tmp = path.join(format!("{FORMAT_FILE}.tmp"));
            fs::write(&tmp, format!("{FORMAT_VERSION}\n"))
                .and_then(|()| fs::rename(&tmp, &file))
                .map_err(|source| Error::Create {
                    path: path.to_path_buf(),
                    what: FORMAT_FILE,
                    source,
                })
        }
        Err(source) => Err(Error::ReadFormat {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn open_makes_the_layout_and_writes_the_version() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a/data");
        let dir = DataDir::open(&path).unwrap();
        assert_eq!(dir.path(), path);
        for sub in [
            dir.code(),
            dir.registrations(),
            dir.packages(),
            dir.activations(),
        ] {
            assert!(sub.is_dir(), "{}", sub.display());
            assert_eq!(
                fs::metadata(&sub).unwrap().permissions().mode() & 0o777,
                0o700
            );
        }
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(fs::read_to_string(path.join("format")).unwrap(), "1\n");
        let pid = fs::read_to_string(path.join("lock")).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());
        drop(dir);
        // Reopened: the version is read back, what is there is kept.
        fs::write(path.join("code/kept"), "x").unwrap();
        let dir = DataDir::open(&path).unwrap();
        assert!(dir.code().join("kept").is_file());
    }

    #[test]
    fn a_second_open_is_refused_while_the_first_lives() {
        let tmp = tempfile::tempdir().unwrap();
        let first = DataDir::open(tmp.path()).unwrap();
        let err = DataDir::open(tmp.path()).unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(err, Error::InUse { holder: Some(pid), .. } if pid == std::process::id()),
            "{err:?}"
        );
        assert!(
            message.contains(&tmp.path().display().to_string())
                && message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
        drop(first);
        DataDir::open(tmp.path()).unwrap();
    }

    #[test]
    fn another_version_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("format"), "2\n").unwrap();
        let err = DataDir::open(tmp.path()).unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(&err, Error::Version { found, .. } if found == "2"),
            "{err:?}"
        );
        assert!(
            message.contains(&tmp.path().display().to_string())
                && message.contains("\"2\"")
                && message.contains("version 1"),
            "{message}"
        );
        // Nothing was made in a directory it refused.
        assert!(!tmp.path().join(CODE_DIR).exists());
        // The lock was let go.
        fs::write(tmp.path().join("format"), "1").unwrap();
        DataDir::open(tmp.path()).unwrap();
    }
}
