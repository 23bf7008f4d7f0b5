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
//! | `code/`          | uploaded function code ([`DataDir::code`]), one directory per registration that a row of `registrations/` names |
//! | `registrations/` | registered functions and workflows ([`DataDir::registrations`]: `registry.db`, see `crate::registrations`) |
//! | `packages/`      | the package cache ([`DataDir::packages`], issue 13)      |
//! | `activations/`   | activation records ([`DataDir::activations`], issue 14)  |
//!
//! One agent at a time: [`DataDir::open`] takes an exclusive `flock` on `lock`, held
//! until the [`DataDir`] is dropped (the descriptor is closed on exec, so no child
//! inherits it), and a second open is refused naming the holder's pid.

use std::fs::{self, DirBuilder, File};
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags};

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
/// Registered functions and workflows (`crate::registrations`).
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
    #[error("data directory {path} is not safe to use: {reason}")]
    Unsafe { path: PathBuf, reason: String },
    #[error(
        "data directory {path} has no {FORMAT_FILE} file and is not empty (it holds {entries}): \
         not a sprout data directory; name an empty or new directory"
    )]
    NotOurs { path: PathBuf, entries: String },
    #[error(
        "data directory {path} overlaps the state root {state_root}, which crash clean-up empties"
    )]
    InStateRoot { path: PathBuf, state_root: PathBuf },
}

/// An open data directory, locked for this agent until dropped.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    _lock: Flock<File>,
}

impl DataDir {
    /// Opens (creating it and its layout when new) the data directory at `path`, and
    /// locks it. Refuses a directory another agent holds, one of another version, one
    /// that is not sprout's (no `format`, not empty), and one others could change: it
    /// and every directory above it must be root's or this user's, and not writable by
    /// others (unless sticky, as `/tmp`); it is made 0700. Everything inside is opened
    /// relative to the directory without following symbolic links, and must be a
    /// regular file or directory of this user's.
    pub fn open(path: &Path) -> Result<DataDir, Error> {
        let path = path.to_path_buf();
        let create = |what, source| Error::Create {
            path: path.clone(),
            what,
            source,
        };
        let unsafe_because = |reason: String| Error::Unsafe {
            path: path.clone(),
            reason,
        };
        mkdir(&path).map_err(|e| create("the directory", e))?;
        check_parents(&path).map_err(unsafe_because)?;
        let dir = rfs::open(
            &path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => {
                unsafe_because("it is a symbolic link".to_owned())
            }
            e => create("the directory", e.into()),
        })?;
        check_own_dir(dir.as_fd(), "it").map_err(unsafe_because)?;
        let lock = lock(&path, dir.as_fd())?;
        check_format(&path, dir.as_fd())?;
        for sub in LAYOUT {
            make_layout_dir(&path, dir.as_fd(), sub)?;
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

    /// Registered functions and workflows: `registrations/` (the registrations store).
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

/// Refuses a data directory that overlaps the agent's state root (`--state-dir`):
/// crash clean-up removes whatever it finds there.
pub fn check_apart(path: &Path, state_root: &Path) -> Result<(), Error> {
    let (data, root) = (resolved(path), resolved(state_root));
    if data.starts_with(&root) || root.starts_with(&data) {
        return Err(Error::InStateRoot {
            path: path.to_path_buf(),
            state_root: state_root.to_path_buf(),
        });
    }
    Ok(())
}

/// `path` with its longest existing prefix resolved (links, `..`).
fn resolved(path: &Path) -> PathBuf {
    let mut rest = Vec::new();
    let mut existing = path;
    loop {
        if let Ok(canonical) = existing.canonicalize() {
            return rest.iter().rev().fold(canonical, |p, c| p.join(c));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                existing = parent;
            }
            _ => return path.to_path_buf(),
        }
    }
}

/// Makes `dir` (and missing parents) 0700; an existing one is checked by the caller.
fn mkdir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Every directory above `path` must be root's or this user's, and not writable by
/// group or others unless sticky: otherwise someone else could move the data
/// directory away and put another in its place.
fn check_parents(path: &Path) -> Result<(), String> {
    let me = rustix::process::geteuid().as_raw();
    let parent = resolved(path.parent().unwrap_or(Path::new("/")));
    for dir in parent.ancestors() {
        let meta = fs::metadata(dir).map_err(|e| format!("cannot check {}: {e}", dir.display()))?;
        if meta.uid() != 0 && meta.uid() != me {
            return Err(format!("{} belongs to uid {}", dir.display(), meta.uid()));
        }
        let sticky = meta.mode() & 0o1000 != 0;
        if meta.mode() & 0o022 != 0 && !sticky {
            return Err(format!(
                "{} is writable by group or others ({:o})",
                dir.display(),
                meta.mode() & 0o7777
            ));
        }
    }
    Ok(())
}

/// `dir` (described as `what`) must be a directory of this user's, not writable by
/// group or others; it is made 0700.
fn check_own_dir(dir: BorrowedFd<'_>, what: &str) -> Result<(), String> {
    let stat = rfs::fstat(dir).map_err(|e| format!("cannot check {what}: {e}"))?;
    let me = rustix::process::geteuid().as_raw();
    if FileType::from_raw_mode(stat.st_mode) != FileType::Directory {
        return Err(format!("{what} is not a directory"));
    }
    if stat.st_uid != me {
        return Err(format!("{what} belongs to uid {}, not {me}", stat.st_uid));
    }
    if stat.st_mode & 0o022 != 0 {
        return Err(format!(
            "{what} is writable by group or others ({:o}); chmod go-w it",
            stat.st_mode & 0o7777
        ));
    }
    rfs::fchmod(dir, Mode::from_raw_mode(0o700)).map_err(|e| format!("chmod {what}: {e}"))
}

/// Opens `name` in `dir` without following a link, and checks it is a regular file.
fn open_file(dir: BorrowedFd<'_>, name: &str, flags: OFlags, mode: u32) -> io::Result<OwnedFd> {
    let fd = rfs::openat(
        dir,
        name,
        flags | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::from_raw_mode(mode),
    )
    .map_err(|e| match e {
        rustix::io::Errno::LOOP => io::Error::other(format!("{name} is a symbolic link")),
        e => e.into(),
    })?;
    if FileType::from_raw_mode(rfs::fstat(&fd)?.st_mode) != FileType::RegularFile {
        return Err(io::Error::other(format!("{name} is not a regular file")));
    }
    Ok(fd)
}

/// Takes the exclusive lock on `<path>/lock` and writes this process's pid into it.
fn lock(path: &Path, dir: BorrowedFd<'_>) -> Result<Flock<File>, Error> {
    let lock_err = |source| Error::Lock {
        path: path.to_path_buf(),
        source,
    };
    // Close-on-exec: no child inherits the lock.
    let file = File::from(
        open_file(dir, LOCK_FILE, OFlags::RDWR | OFlags::CREATE, 0o600).map_err(lock_err)?,
    );
    let mut held = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(held) => held,
        Err((file, Errno::EWOULDBLOCK)) => {
            let mut pid = String::new();
            let holder = file
                .take(32)
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

/// Checks `<path>/format`; writes it when the directory is new (holds nothing but
/// the lock, and a `format.tmp` of an earlier try). Refuses a directory with other
/// things in it and no `format`: it is not sprout's.
fn check_format(path: &Path, dir: BorrowedFd<'_>) -> Result<(), Error> {
    let read_err = |source| Error::ReadFormat {
        path: path.to_path_buf(),
        source,
    };
    match open_file(dir, FORMAT_FILE, OFlags::RDONLY, 0) {
        Ok(fd) => {
            let mut text = String::new();
            File::from(fd)
                .take(64)
                .read_to_string(&mut text)
                .map_err(read_err)?;
            if text.trim() == FORMAT_VERSION.to_string() {
                Ok(())
            } else {
                Err(Error::Version {
                    path: path.to_path_buf(),
                    found: text.trim().to_owned(),
                })
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let tmp = format!("{FORMAT_FILE}.tmp");
            let others: Vec<String> = fs::read_dir(path)
                .map_err(read_err)?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != LOCK_FILE && *n != tmp)
                .collect();
            if !others.is_empty() {
                let mut shown: Vec<&str> = others.iter().map(String::as_str).take(3).collect();
                shown.sort_unstable();
                let more = others.len().saturating_sub(shown.len());
                return Err(Error::NotOurs {
                    path: path.to_path_buf(),
                    entries: if more > 0 {
                        format!("{} and {more} more", shown.join(", "))
                    } else {
                        shown.join(", ")
                    },
                });
            }
            write_format(dir, &tmp).map_err(|source| Error::Create {
                path: path.to_path_buf(),
                what: FORMAT_FILE,
                source,
            })
        }
        Err(source) => Err(read_err(source)),
    }
}

/// Writes `format` whole or not at all: a temporary file, synced, renamed over it,
/// and the directory synced.
fn write_format(dir: BorrowedFd<'_>, tmp: &str) -> io::Result<()> {
    match rfs::unlinkat(dir, tmp, AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => {}
        Err(e) => return Err(e.into()),
    }
    let mut file = File::from(open_file(
        dir,
        tmp,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
        0o600,
    )?);
    writeln!(file, "{FORMAT_VERSION}")?;
    file.sync_all()?;
    rfs::renameat(dir, tmp, dir, FORMAT_FILE)?;
    rfs::fsync(dir)?;
    Ok(())
}

/// Makes (or checks) the layout directory `name`: a directory of this user's, 0700.
fn make_layout_dir(path: &Path, dir: BorrowedFd<'_>, name: &'static str) -> Result<(), Error> {
    match rfs::mkdirat(dir, name, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => {
            return Err(Error::Create {
                path: path.to_path_buf(),
                what: name,
                source: e.into(),
            })
        }
    }
    let sub = rfs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::Unsafe {
        path: path.to_path_buf(),
        reason: match e {
            rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => {
                format!("{name} is not a directory (or is a symbolic link)")
            }
            e => format!("cannot open {name}: {e}"),
        },
    })?;
    check_own_dir(sub.as_fd(), name).map_err(|reason| Error::Unsafe {
        path: path.to_path_buf(),
        reason,
    })
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

    /// A directory to plant things in, and a victim file outside it.
    fn planted() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        fs::create_dir(&data).unwrap();
        let victim = tmp.path().join("victim");
        fs::write(&victim, "keep").unwrap();
        (tmp, data, victim)
    }

    #[test]
    fn links_planted_in_a_new_directory_are_not_followed() {
        use std::os::unix::fs::symlink;
        for planted_name in [LOCK_FILE, FORMAT_FILE, "format.tmp"] {
            let (_tmp, data, victim) = planted();
            symlink(&victim, data.join(planted_name)).unwrap();
            match DataDir::open(&data) {
                Err(err) => assert!(
                    ipc::chain(&err).contains(&format!("{planted_name} is a symbolic link")),
                    "{planted_name}: {err}"
                ),
                // A stale temporary file is replaced, not written through.
                Ok(_) => assert_eq!(planted_name, "format.tmp"),
            }
            assert_eq!(
                fs::read_to_string(&victim).unwrap(),
                "keep",
                "{planted_name}"
            );
        }
    }

    #[test]
    fn a_layout_directory_that_is_a_link_is_refused_and_not_emptied() {
        use std::os::unix::fs::symlink;
        let (tmp, data, _) = planted();
        drop(DataDir::open(&data).unwrap());
        let elsewhere = tmp.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        fs::write(elsewhere.join("keep.txt"), "keep").unwrap();
        fs::remove_dir(data.join(CODE_DIR)).unwrap();
        symlink(&elsewhere, data.join(CODE_DIR)).unwrap();
        let err = DataDir::open(&data).unwrap_err();
        assert!(
            ipc::chain(&err).contains("code is not a directory"),
            "{err}"
        );
        assert!(elsewhere.join("keep.txt").is_file());
    }

    #[test]
    fn a_directory_others_can_write_is_refused_and_an_open_one_made_private() {
        let (tmp, data, _) = planted();
        fs::set_permissions(&data, fs::Permissions::from_mode(0o777)).unwrap();
        let err = DataDir::open(&data).unwrap_err();
        assert!(
            ipc::chain(&err).contains("writable by group or others (777)"),
            "{err}"
        );
        // Above it, too, unless sticky.
        fs::set_permissions(&data, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let err = DataDir::open(&data).unwrap_err();
        assert!(
            ipc::chain(&err).contains("writable by group or others"),
            "{err}"
        );
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o1777)).unwrap();
        drop(DataDir::open(&data).unwrap());
        assert_eq!(
            fs::metadata(&data).unwrap().permissions().mode() & 0o7777,
            0o700
        );
    }

    #[test]
    fn a_fifo_for_a_format_file_is_refused_at_once() {
        let (_tmp, data, _) = planted();
        nix::unistd::mkfifo(&data.join(FORMAT_FILE), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let started = std::time::Instant::now();
        let err = DataDir::open(&data).unwrap_err();
        assert!(
            ipc::chain(&err).contains("format is not a regular file"),
            "{err}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn a_directory_that_is_not_sprouts_is_refused_untouched() {
        let (_tmp, data, _) = planted();
        fs::create_dir_all(data.join("code/src")).unwrap();
        fs::write(data.join("code/src/main.rs"), "fn main() {}").unwrap();
        let err = DataDir::open(&data).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("no format file and is not empty (it holds code)"),
            "{message}"
        );
        assert!(data.join("code/src/main.rs").is_file());
        assert!(!data.join(FORMAT_FILE).exists());
    }

    #[test]
    fn a_data_directory_in_or_around_the_state_root_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("run/sprout");
        for (data, refused) in [
            (root.join("data"), true),
            (tmp.path().join("run"), true),
            (root.clone(), true),
            (tmp.path().join("data"), false),
            (tmp.path().join("run/sprout-data"), false),
        ] {
            let r = check_apart(&data, &root);
            assert_eq!(r.is_err(), refused, "{}: {r:?}", data.display());
        }
        fs::create_dir_all(&root).unwrap();
        std::os::unix::fs::symlink(&root, tmp.path().join("link")).unwrap();
        let err = check_apart(&tmp.path().join("link/data"), &root).unwrap_err();
        assert!(err.to_string().contains("overlaps the state root"), "{err}");
    }
}
