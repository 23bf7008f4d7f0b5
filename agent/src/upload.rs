//! Unpacking an uploaded function archive (`PUT /functions/{name}` with
//! `application/x-tar`) into a fresh directory, within limits.
//!
//! The archive comes from a tenant sprout does not trust, so [`unpack`] accepts only
//! regular files and directories under relative paths that stay inside the
//! destination, and bounds what an archive may cost: how deep a path goes, how long
//! it is, how many entries there are, how many bytes they unpack to and how long the
//! whole takes ([`Limits`]). Each refusal names the entry, the limit and its value,
//! and leaves nothing behind: the destination is removed.
//!
//! The cost of an entry is linear in its path: each directory is created once, with
//! one `mkdir`, and remembered; no path is canonicalised or walked again (the `tar`
//! crate's own `unpack` canonicalises every ancestor of every entry, which made one
//! path 2,000 directories deep cost about 70 s of CPU). Nothing the archive holds can
//! redirect a later write: no symbolic or hard link is ever created, files are opened
//! with `O_NOFOLLOW`, and the destination is new.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tar::EntryType;

/// How many levels deep an entry's path may go: `a/b/f.py` is 3 levels deep.
pub const MAX_DEPTH: usize = 32;
/// The longest path an entry may have, in bytes, as the archive spells it.
pub const MAX_PATH_BYTES: usize = 1024;
/// The longest name one path component may have, in bytes (Linux's `NAME_MAX`).
pub const MAX_NAME_BYTES: usize = 255;
/// How many entries (files, directories and global headers) an archive may hold.
pub const MAX_ENTRIES: usize = 10_000;
/// How many bytes the regular files of an archive may add up to. A tar is not
/// compressed, so an archive that fits the HTTP API's body limit (64 MiB) always
/// fits this one; it binds when a linking controller hands over the archive, and
/// refuses at once a header that declares more data than any upload could carry.
pub const MAX_TOTAL_BYTES: u64 = 64 << 20;
/// How long unpacking one archive may take, wall clock.
pub const MAX_DURATION: Duration = Duration::from_secs(10);

/// How much one archive may cost. [`Limits::default`] is the constants above.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub depth: usize,
    pub path_bytes: usize,
    pub entries: usize,
    pub total_bytes: u64,
    pub duration: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            depth: MAX_DEPTH,
            path_bytes: MAX_PATH_BYTES,
            entries: MAX_ENTRIES,
            total_bytes: MAX_TOTAL_BYTES,
            duration: MAX_DURATION,
        }
    }
}

/// Why an archive was refused. `entry` is the entry's path as the archive spells it,
/// shortened for display.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("archive entry {entry:?} is {depth} levels deep (at most {max})")]
    TooDeep {
        entry: String,
        depth: usize,
        max: usize,
    },
    #[error("archive entry {entry:?} has a path of {len} bytes (at most {max})")]
    PathTooLong {
        entry: String,
        len: usize,
        max: usize,
    },
    #[error("archive entry {entry:?} has a name of {len} bytes in its path (at most {max})")]
    NameTooLong {
        entry: String,
        len: usize,
        max: usize,
    },
    #[error("archive has too many entries (at most {max}): entry {} is {entry:?}", .max + 1)]
    TooManyEntries { entry: String, max: usize },
    #[error("archive entry {entry:?} brings the unpacked size to {total} bytes (at most {max})")]
    TooLarge { entry: String, total: u64, max: u64 },
    #[error(
        "unpacking the archive took over {} ms (at most {} ms), {entries} entries in, at entry {entry:?}",
        .elapsed.as_millis(),
        .max.as_millis()
    )]
    TooSlow {
        entry: String,
        entries: usize,
        elapsed: Duration,
        max: Duration,
    },
    #[error("archive entry {entry:?} has an absolute path: paths must be relative to the function's directory")]
    Absolute { entry: String },
    #[error("archive entry {entry:?} leaves the function's directory (\"..\")")]
    ParentDir { entry: String },
    #[error("archive has an entry with an empty path")]
    EmptyPath,
    #[error("archive entry {entry:?} has a NUL byte in its path")]
    NulByte { entry: String },
    #[error(
        "archive entry {entry:?} is {kind}: an archive may hold only regular files and directories"
    )]
    Unsupported { entry: String, kind: String },
    #[error("archive entry {entry:?} is truncated: it declares {declared} bytes, the archive holds {found}")]
    Truncated {
        entry: String,
        declared: u64,
        found: u64,
    },
    #[error("archive entry {entry:?} needs {parent:?} to be a directory, and an earlier entry made it a file")]
    NotADirectory { entry: String, parent: String },
    #[error("archive is not a valid tar")]
    Malformed(#[source] io::Error),
    #[error("archive entry {entry:?}: cannot create it")]
    Create {
        entry: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the directory {path} to unpack into")]
    Destination {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What an archive unpacked to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unpacked {
    pub entries: usize,
    pub files: usize,
    pub bytes: u64,
}

/// Unpacks the tar `archive` into `dest`, which must not exist yet (its parent is
/// created if needed), within `limits`. On any error `dest` is removed again.
pub fn unpack(archive: &[u8], dest: &Path, limits: &Limits) -> Result<Unpacked, Error> {
    let destination = |source| Error::Destination {
        path: dest.to_path_buf(),
        source,
    };
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).map_err(destination)?;
    }
    // 0755 whatever the umask: sandboxes' unprivileged users read it at `/code`.
    // Host accounts cannot: the data (or state) directory above it is 0700.
    fs::DirBuilder::new()
        .mode(0o755)
        .create(dest)
        .and_then(|()| fs::set_permissions(dest, fs::Permissions::from_mode(0o755)))
        .map_err(destination)?;
    let unpacked = Unpacker::new(dest, limits).run(archive);
    if unpacked.is_err() {
        let _ = fs::remove_dir_all(dest);
    }
    unpacked
}

/// How long a path may get in an error message before it is cut with `…`.
const SHOWN_CHARS: usize = 64;

/// An entry's path for an error message: lossy UTF-8, cut after [`SHOWN_CHARS`].
fn shown(path: &[u8]) -> String {
    let s = String::from_utf8_lossy(path);
    match s.char_indices().nth(SHOWN_CHARS) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.into_owned(),
    }
}

/// What an entry becomes.
enum Kind {
    File {
        executable: bool,
    },
    Dir,
    /// A pax global header: counted, nothing to create.
    Skip,
}

struct Unpacker<'a> {
    dest: &'a Path,
    limits: &'a Limits,
    /// `None` when the budget is too large to be a time.
    deadline: Option<Instant>,
    started: Instant,
    /// Directories made so far, relative to `dest`.
    dirs: HashSet<PathBuf>,
    /// Files made so far, relative to `dest` (a later entry may not go under one).
    files: HashSet<PathBuf>,
    done: Unpacked,
}

impl<'a> Unpacker<'a> {
    fn new(dest: &'a Path, limits: &'a Limits) -> Self {
        let started = Instant::now();
        Unpacker {
            dest,
            limits,
            deadline: started.checked_add(limits.duration),
            started,
            dirs: HashSet::new(),
            files: HashSet::new(),
            done: Unpacked {
                entries: 0,
                files: 0,
                bytes: 0,
            },
        }
    }

    fn run(mut self, archive: &[u8]) -> Result<Unpacked, Error> {
        let mut archive = tar::Archive::new(archive);
        for entry in archive.entries().map_err(Error::Malformed)? {
            let mut entry = entry.map_err(Error::Malformed)?;
            let raw = entry.path_bytes().into_owned();
            if self.done.entries == self.limits.entries {
                return Err(Error::TooManyEntries {
                    entry: shown(&raw),
                    max: self.limits.entries,
                });
            }
            self.done.entries += 1;
            self.check_time(&raw)?;
            let rel = self.check_path(&raw)?;
            let kind = self.kind(&entry, &raw)?;
            match kind {
                Kind::Skip => {}
                Kind::Dir => {
                    if let Some(rel) = rel {
                        self.make_dirs(&rel, &raw, true)?;
                    }
                }
                Kind::File { executable } => {
                    let Some(rel) = rel else {
                        return Err(Error::Create {
                            entry: shown(&raw),
                            source: io::Error::from_raw_os_error(libc::EISDIR),
                        });
                    };
                    self.write_file(&mut entry, &rel, &raw, executable)?;
                }
            }
        }
        Ok(self.done)
    }

    fn check_time(&self, raw: &[u8]) -> Result<(), Error> {
        let now = Instant::now();
        if self.deadline.is_some_and(|d| now >= d) {
            return Err(Error::TooSlow {
                entry: shown(raw),
                entries: self.done.entries,
                elapsed: now - self.started,
                max: self.limits.duration,
            });
        }
        Ok(())
    }

    /// The entry's path relative to the destination (`None` for the destination
    /// itself: `.` or `./`), after checking it against the limits.
    fn check_path(&self, raw: &[u8]) -> Result<Option<PathBuf>, Error> {
        let entry = || shown(raw);
        if raw.is_empty() {
            return Err(Error::EmptyPath);
        }
        if raw.contains(&0) {
            return Err(Error::NulByte { entry: entry() });
        }
        if raw[0] == b'/' {
            return Err(Error::Absolute { entry: entry() });
        }
        // Counted, not collected, before the limits are checked: a GNU long name can be
        // as long as the whole body (a slice per component of a 64 MiB `a/a/a/…` took
        // ~512 MiB).
        let components = || {
            raw.split(|&b| b == b'/')
                .filter(|p| !p.is_empty() && *p != b".")
        };
        if components().any(|p| p == b"..") {
            return Err(Error::ParentDir { entry: entry() });
        }
        let depth = components().count();
        if depth > self.limits.depth {
            return Err(Error::TooDeep {
                entry: entry(),
                depth,
                max: self.limits.depth,
            });
        }
        let parts: Vec<&[u8]> = components().collect();
        if raw.len() > self.limits.path_bytes {
            return Err(Error::PathTooLong {
                entry: entry(),
                len: raw.len(),
                max: self.limits.path_bytes,
            });
        }
        if let Some(long) = parts.iter().find(|p| p.len() > MAX_NAME_BYTES) {
            return Err(Error::NameTooLong {
                entry: entry(),
                len: long.len(),
                max: MAX_NAME_BYTES,
            });
        }
        if parts.is_empty() {
            return Ok(None);
        }
        Ok(Some(parts.iter().map(|p| OsStr::from_bytes(p)).collect()))
    }

    fn kind<R: Read>(&self, entry: &tar::Entry<'_, R>, raw: &[u8]) -> Result<Kind, Error> {
        let header = entry.header();
        let executable = header.mode().is_ok_and(|m| m & 0o111 != 0);
        let unsupported = |kind: &str| {
            Err(Error::Unsupported {
                entry: shown(raw),
                kind: kind.to_owned(),
            })
        };
        match header.entry_type() {
            // Old (pre-POSIX) archives mark a directory by a trailing slash alone.
            EntryType::Regular
                if header.as_ustar().is_none()
                    && header.as_gnu().is_none()
                    && raw.ends_with(b"/") =>
            {
                Ok(Kind::Dir)
            }
            EntryType::Regular | EntryType::Continuous => Ok(Kind::File { executable }),
            EntryType::Directory => Ok(Kind::Dir),
            EntryType::XGlobalHeader => Ok(Kind::Skip),
            EntryType::Symlink => unsupported("a symbolic link"),
            EntryType::Link => unsupported("a hard link"),
            EntryType::Char => unsupported("a character device"),
            EntryType::Block => unsupported("a block device"),
            EntryType::Fifo => unsupported("a FIFO"),
            EntryType::GNUSparse => unsupported("a sparse file"),
            other => unsupported(&format!("of type {:?}", other.as_byte() as char)),
        }
    }

    /// Makes the directories on `rel`'s way (and `rel` itself when `last`), each
    /// once.
    fn make_dirs(&mut self, rel: &Path, raw: &[u8], last: bool) -> Result<(), Error> {
        let mut prefix = PathBuf::new();
        let mut parts = rel.components().peekable();
        while let Some(part) = parts.next() {
            if parts.peek().is_none() && !last {
                break;
            }
            prefix.push(part);
            if self.dirs.contains(&prefix) {
                continue;
            }
            if self.files.contains(&prefix) {
                return Err(Error::NotADirectory {
                    entry: shown(raw),
                    parent: shown(prefix.as_os_str().as_bytes()),
                });
            }
            let path = self.dest.join(&prefix);
            fs::DirBuilder::new()
                .mode(0o755)
                .create(&path)
                .and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(0o755)))
                .map_err(|source| Error::Create {
                    entry: shown(raw),
                    source,
                })?;
            self.dirs.insert(prefix.clone());
        }
        Ok(())
    }

    fn write_file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        rel: &Path,
        raw: &[u8],
        executable: bool,
    ) -> Result<(), Error> {
        let declared = entry.size();
        let total = self.done.bytes.saturating_add(declared);
        if total > self.limits.total_bytes {
            return Err(Error::TooLarge {
                entry: shown(raw),
                total,
                max: self.limits.total_bytes,
            });
        }
        self.make_dirs(rel, raw, false)?;
        let create = |source| Error::Create {
            entry: shown(raw),
            source,
        };
        let mode = if executable { 0o755 } else { 0o644 };
        // A later entry with the same path replaces the earlier file, as tar does.
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(self.dest.join(rel))
            .map_err(create)?;
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(create)?;
        let found = self.copy(entry, &mut file, raw).map_err(|e| match e {
            CopyError::Time(e) => e,
            CopyError::Read(e) => Error::Malformed(e),
            CopyError::Write(e) => create(e),
        })?;
        if found != declared {
            return Err(Error::Truncated {
                entry: shown(raw),
                declared,
                found,
            });
        }
        self.files.insert(rel.to_path_buf());
        self.done.files += 1;
        self.done.bytes = total;
        Ok(())
    }

    /// Copies an entry's data in chunks, watching the clock between them.
    fn copy(&self, from: &mut impl Read, to: &mut File, raw: &[u8]) -> Result<u64, CopyError> {
        let mut buf = vec![0u8; 64 << 10];
        let mut copied = 0u64;
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => return Ok(copied),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(CopyError::Read(e)),
            };
            to.write_all(&buf[..n]).map_err(CopyError::Write)?;
            copied += n as u64;
            self.check_time(raw).map_err(CopyError::Time)?;
        }
    }
}

enum CopyError {
    Time(Error),
    Read(io::Error),
    Write(io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One entry of a test archive.
    enum E<'a> {
        File(&'a str, &'a [u8]),
        Dir(&'a str),
        Other(&'a str, EntryType),
    }

    /// Builds an archive with GNU headers (long names as GNU long-name entries).
    fn archive(entries: &[E]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let (path, kind, data): (&str, EntryType, &[u8]) = match e {
                E::File(p, d) => (p, EntryType::Regular, d),
                E::Dir(p) => (p, EntryType::Directory, b""),
                E::Other(p, k) => (p, *k, b""),
            };
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(data.len() as u64);
            h.set_mode(if kind == EntryType::Directory {
                0o755
            } else {
                0o644
            });
            if matches!(kind, EntryType::Symlink | EntryType::Link) {
                h.set_link_name("/etc/passwd").unwrap();
            }
            b.append_data(&mut h, path, data).expect("append");
        }
        b.into_inner().unwrap()
    }

    /// Puts `path` into the raw header name (for paths the builder refuses).
    fn raw_archive(path: &str, data: &[u8]) -> Vec<u8> {
        let mut h = tar::Header::new_ustar();
        h.as_mut_bytes()[..path.len()].copy_from_slice(path.as_bytes());
        h.set_entry_type(EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512 + 1024, 0);
        out
    }

    struct Dest {
        _tmp: tempfile::TempDir,
        dir: PathBuf,
    }

    fn dest() -> Dest {
        let tmp = tempfile::Builder::new()
            .prefix("sprout-upload-")
            .tempdir()
            .unwrap();
        let dir = tmp.path().join("functions").join("f-1");
        Dest { _tmp: tmp, dir }
    }

    fn unpack_with(entries: &[E], limits: &Limits) -> (Dest, Result<Unpacked, Error>) {
        let d = dest();
        let r = unpack(&archive(entries), &d.dir, limits);
        (d, r)
    }

    /// Unpacks with the default limits and expects a refusal: returns its message
    /// and checks that nothing is left.
    #[track_caller]
    fn refused(bytes: &[u8], limits: &Limits) -> String {
        let d = dest();
        let e = unpack(bytes, &d.dir, limits).expect_err("the archive must be refused");
        assert!(
            !d.dir.exists(),
            "{} is left after a refusal ({e})",
            d.dir.display()
        );
        ipc::chain(&e)
    }

    fn deep(depth: usize) -> String {
        vec!["a"; depth].join("/")
    }

    #[test]
    fn a_normal_archive_unpacks_with_modes_normalised() {
        let (d, r) = unpack_with(
            &[
                E::Dir("./"),
                E::File("./f.py", b"def f(e):\n    return 1\n"),
                E::Dir("lib"),
                E::File("lib/helper.py", b"x = 1\n"),
                E::File("deep/er/still.txt", b"made on the way"),
            ],
            &Limits::default(),
        );
        let r = r.unwrap();
        assert_eq!(
            r,
            Unpacked {
                entries: 5,
                files: 3,
                bytes: 23 + 6 + 15
            }
        );
        assert_eq!(
            fs::read_to_string(d.dir.join("f.py")).unwrap(),
            "def f(e):\n    return 1\n"
        );
        assert_eq!(
            fs::read_to_string(d.dir.join("deep/er/still.txt")).unwrap(),
            "made on the way"
        );
        let mode = |p: &str| fs::metadata(d.dir.join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("f.py"), 0o644);
        assert_eq!(mode("deep/er"), 0o755);
        // Readable by the sandbox's unprivileged user, the directory itself too.
        assert_eq!(mode(""), 0o755);
    }

    #[test]
    fn an_executable_stays_executable_and_no_special_bit_survives() {
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o6777);
        let mut b = tar::Builder::new(Vec::new());
        b.append_data(&mut h, "run.sh", &b"hi\n"[..]).unwrap();
        let d = dest();
        unpack(&b.into_inner().unwrap(), &d.dir, &Limits::default()).unwrap();
        let mode = fs::metadata(d.dir.join("run.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755);
    }

    #[test]
    fn depth_at_the_limit_is_accepted_one_more_is_refused() {
        let at = deep(MAX_DEPTH);
        let (d, r) = unpack_with(&[E::File(&at, b"x")], &Limits::default());
        r.unwrap();
        assert!(d.dir.join(&at).is_file());

        let over = deep(MAX_DEPTH + 1);
        let msg = refused(&archive(&[E::File(&over, b"x")]), &Limits::default());
        assert!(
            msg.contains(&format!(
                "is {} levels deep (at most {MAX_DEPTH})",
                MAX_DEPTH + 1
            )),
            "{msg}"
        );
        assert!(msg.contains("archive entry \"a/a/a/"), "{msg}");
        // A directory entry is held to the same limit.
        let msg = refused(&archive(&[E::Dir(&over)]), &Limits::default());
        assert!(msg.contains("levels deep (at most 32)"), "{msg}");
    }

    #[test]
    fn a_path_two_thousand_deep_is_refused_at_once_and_shown_shortened() {
        let path = deep(2000);
        let bytes = archive(&[E::File(&path, b"x")]);
        assert!(
            bytes.len() < 16 << 10,
            "a small archive: {} bytes",
            bytes.len()
        );
        let started = Instant::now();
        let msg = refused(&bytes, &Limits::default());
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(
            msg.contains(&format!(
                "archive entry \"{}…\" is 2000 levels deep (at most 32)",
                &path[..SHOWN_CHARS]
            )),
            "{msg}"
        );
    }

    #[test]
    fn path_length_at_the_limit_is_accepted_one_more_is_refused() {
        // Four directories of 200 bytes and a file name: 4 * 201 + 220 = 1024.
        let dirs = vec!["d".repeat(200); 4].join("/");
        let at = format!("{dirs}/{}", "f".repeat(220));
        assert_eq!(at.len(), MAX_PATH_BYTES);
        let (d, r) = unpack_with(&[E::File(&at, b"x")], &Limits::default());
        r.unwrap();
        assert!(d.dir.join(&at).is_file());

        let over = format!("{dirs}/{}", "f".repeat(221));
        let msg = refused(&archive(&[E::File(&over, b"x")]), &Limits::default());
        assert!(
            msg.contains(&format!(
                "has a path of {} bytes (at most {MAX_PATH_BYTES})",
                MAX_PATH_BYTES + 1
            )),
            "{msg}"
        );
    }

    #[test]
    fn a_name_over_255_bytes_is_refused() {
        let (_d, r) = unpack_with(&[E::File(&"n".repeat(255), b"x")], &Limits::default());
        r.unwrap();
        let msg = refused(
            &archive(&[E::File(&"n".repeat(256), b"x")]),
            &Limits::default(),
        );
        assert!(
            msg.contains("has a name of 256 bytes in its path (at most 255)"),
            "{msg}"
        );
    }

    #[test]
    fn entry_count_at_the_limit_is_accepted_one_more_is_refused() {
        let names: Vec<String> = (0..=MAX_ENTRIES).map(|i| format!("d/{i}")).collect();
        let mut entries: Vec<E> = vec![E::Dir("d")];
        entries.extend(names[..MAX_ENTRIES - 1].iter().map(|n| E::File(n, b"")));
        let (d, r) = unpack_with(&entries, &Limits::default());
        assert_eq!(r.unwrap().entries, MAX_ENTRIES);
        assert_eq!(
            fs::read_dir(d.dir.join("d")).unwrap().count(),
            MAX_ENTRIES - 1
        );
        drop(d);

        entries.push(E::File(&names[MAX_ENTRIES], b""));
        let msg = refused(&archive(&entries), &Limits::default());
        assert!(
            msg.contains(&format!(
                "archive has too many entries (at most {MAX_ENTRIES}): entry {} is \"d/{MAX_ENTRIES}\"",
                MAX_ENTRIES + 1
            )),
            "{msg}"
        );
    }

    #[test]
    fn total_size_at_the_limit_is_accepted_one_more_byte_is_refused() {
        let limits = Limits {
            total_bytes: 1000,
            ..Limits::default()
        };
        let (_d, r) = unpack_with(
            &[E::File("a", &[b'a'; 600]), E::File("b", &[b'b'; 400])],
            &limits,
        );
        assert_eq!(r.unwrap().bytes, 1000);
        let msg = refused(
            &archive(&[E::File("a", &[b'a'; 600]), E::File("b", &[b'b'; 401])]),
            &limits,
        );
        assert!(
            msg.contains(
                "archive entry \"b\" brings the unpacked size to 1001 bytes (at most 1000)"
            ),
            "{msg}"
        );
        assert_eq!(MAX_TOTAL_BYTES, 64 << 20);
    }

    #[test]
    fn a_header_declaring_more_than_the_limit_is_refused_before_reading() {
        // 1 TiB declared, three bytes present.
        let mut bytes = archive(&[E::File("huge", b"abc")]);
        let mut h = tar::Header::new_gnu();
        h.as_mut_bytes().copy_from_slice(&bytes[..512]);
        h.set_size(1 << 40);
        h.set_cksum();
        bytes[..512].copy_from_slice(h.as_bytes());
        let msg = refused(&bytes, &Limits::default());
        assert!(
            msg.contains(&format!(
                "archive entry \"huge\" brings the unpacked size to {} bytes (at most {MAX_TOTAL_BYTES})",
                1u64 << 40
            )),
            "{msg}"
        );
    }

    #[test]
    fn a_truncated_entry_is_refused() {
        let mut bytes = archive(&[E::File("f.py", &[b'x'; 1000])]);
        bytes.truncate(512 + 100);
        let msg = refused(&bytes, &Limits::default());
        assert!(
            msg.contains("archive entry \"f.py\" is truncated: it declares 1000 bytes, the archive holds 100"),
            "{msg}"
        );
    }

    #[test]
    fn the_time_budget_is_enforced() {
        let entries = [E::File("f.py", b"x")];
        let msg = refused(
            &archive(&entries),
            &Limits {
                duration: Duration::ZERO,
                ..Limits::default()
            },
        );
        assert!(
            msg.contains("took over 0 ms (at most 0 ms), 1 entries in, at entry \"f.py\""),
            "{msg}"
        );
        let (_d, r) = unpack_with(&entries, &Limits::default());
        r.unwrap();
        assert_eq!(MAX_DURATION, Duration::from_secs(10));
    }

    #[test]
    fn escapes_are_refused() {
        for (path, text) in [
            ("../evil.py", "leaves the function's directory"),
            ("a/../../evil.py", "leaves the function's directory"),
            ("/etc/evil.py", "has an absolute path"),
            ("//etc/evil.py", "has an absolute path"),
        ] {
            let msg = refused(&raw_archive(path, b"x"), &Limits::default());
            assert!(
                msg.contains(&format!("archive entry {path:?} {text}")),
                "{path}: {msg}"
            );
        }
    }

    #[test]
    fn links_devices_and_other_kinds_are_refused() {
        for (kind, name) in [
            (EntryType::Symlink, "a symbolic link"),
            (EntryType::Link, "a hard link"),
            (EntryType::Char, "a character device"),
            (EntryType::Block, "a block device"),
            (EntryType::Fifo, "a FIFO"),
            (EntryType::new(b'X'), "of type 'X'"),
        ] {
            let msg = refused(
                &archive(&[E::File("f.py", b"x"), E::Other("evil", kind)]),
                &Limits::default(),
            );
            assert!(
                msg.contains(&format!(
                    "archive entry \"evil\" is {name}: an archive may hold only regular files and directories"
                )),
                "{name}: {msg}"
            );
        }
    }

    #[test]
    fn a_file_then_a_path_under_it_is_refused() {
        let msg = refused(
            &archive(&[E::File("lib", b"x"), E::File("lib/f.py", b"y")]),
            &Limits::default(),
        );
        assert!(
            msg.contains("archive entry \"lib/f.py\" needs \"lib\" to be a directory, and an earlier entry made it a file"),
            "{msg}"
        );
        let msg = refused(
            &archive(&[E::Dir("lib"), E::File("lib", b"y")]),
            &Limits::default(),
        );
        assert!(
            msg.contains("archive entry \"lib\": cannot create it: Is a directory"),
            "{msg}"
        );
    }

    #[test]
    fn a_repeated_file_replaces_the_earlier_one() {
        let (d, r) = unpack_with(
            &[E::File("f.py", b"old, longer"), E::File("f.py", b"new")],
            &Limits::default(),
        );
        r.unwrap();
        assert_eq!(fs::read(d.dir.join("f.py")).unwrap(), b"new");
    }

    #[test]
    fn not_a_tar_and_an_existing_destination_are_refused() {
        let bytes = vec![b'z'; 1024];
        let msg = refused(&bytes, &Limits::default());
        assert!(msg.starts_with("archive is not a valid tar"), "{msg}");

        let d = dest();
        fs::create_dir_all(&d.dir).unwrap();
        let e = unpack(
            &archive(&[E::File("f.py", b"x")]),
            &d.dir,
            &Limits::default(),
        )
        .expect_err("an existing destination");
        assert!(
            ipc::chain(&e).contains("cannot create the directory"),
            "{}",
            ipc::chain(&e)
        );
    }

    #[test]
    fn shown_cuts_long_paths_on_a_char_boundary() {
        assert_eq!(shown(b"short"), "short");
        let long = "é".repeat(SHOWN_CHARS + 1);
        assert_eq!(
            shown(long.as_bytes()),
            format!("{}…", "é".repeat(SHOWN_CHARS))
        );
        assert_eq!(shown(b"bad\xff"), "bad\u{fffd}");
    }
}
