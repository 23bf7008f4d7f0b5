//! The package cache on disk: one directory per installed package, its metadata
//! beside it, and a work area for installs in progress.
//!
//! ```text
//! <root>/python/<key>/        a package's files (pip --target), root's, read-only
//! <root>/python/<key>.json    its metadata (Entry), written before the directory appears
//! <root>/npm/<key>/           a node_modules tree (npm), likewise
//! <root>/work/<n>/            an install in progress (removed when it ends)
//! ```
//!
//! A key names exactly what was installed: for Python `<name>-<version>-<abi>-<hash>`
//! (the normalised name, the version, the interpreter's tag and the first 16 hex
//! digits of the SHA-256 of the archive the index served); for npm `npm-<hash>` of
//! the lock file (or the manifest). An entry appears by one `rename` of a complete
//! directory: a reader sees all of it or nothing, and a failed install leaves nothing.

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::Error;

/// Which installer made an entry (and where it lives).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Python,
    Npm,
}

impl Kind {
    pub fn dir(self) -> &'static str {
        match self {
            Kind::Python => "python",
            Kind::Npm => "npm",
        }
    }
}

/// What the cache records of one installed package.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    pub key: String,
    /// The distribution's name as the index spells it (npm: the manifest's name).
    pub name: String,
    pub version: String,
    /// SHA-256 of the archive installed (npm: of the lock or manifest).
    pub sha256: String,
    /// Its top-level importable modules (Python), as found in its files.
    #[serde(default)]
    pub modules: Vec<String>,
    /// Bytes of its files.
    pub bytes: u64,
}

impl Entry {
    /// As `GET /packages` shows it, with the functions (`namespace/name`) using it.
    pub fn info(self, users: Vec<String>) -> ipc::api::PackageInfo {
        ipc::api::PackageInfo {
            kind: self.kind.dir().to_owned(),
            key: self.key,
            name: self.name,
            version: self.version,
            sha256: self.sha256,
            modules: self.modules,
            bytes: self.bytes,
            users,
        }
    }
}

/// Most files one package may hold; more is refused as a failed install.
const MAX_ENTRIES: usize = 200_000;
/// Deepest directory nesting accepted in a package.
const MAX_DEPTH: usize = 64;

/// The cache's directories.
#[derive(Debug)]
pub struct Cache {
    root: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Cache {
        path: path.to_path_buf(),
        source,
    }
}

/// Makes `dir` (0700, root's) if missing; refuses a link or a directory others can
/// write.
fn private_dir(dir: &Path) -> Result<(), Error> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_dir() => {
            if m.mode() & 0o022 != 0 || m.uid() != nix::unistd::geteuid().as_raw() {
                return Err(Error::Cache {
                    path: dir.to_path_buf(),
                    source: std::io::Error::other(
                        "the package cache directory must be the agent user's and not writable by others",
                    ),
                });
            }
            Ok(())
        }
        Ok(_) => Err(Error::Cache {
            path: dir.to_path_buf(),
            source: std::io::Error::other("not a directory"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io(dir))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))
        }
        Err(e) => Err(io(dir)(e)),
    }
}

use std::os::unix::fs::DirBuilderExt;

impl Cache {
    /// The cache at `root`, made (with [`Cache::make`]) when first needed: an agent
    /// that installs nothing leaves nothing on disk.
    pub fn open(root: &Path) -> Cache {
        Cache {
            root: root.to_path_buf(),
        }
    }

    /// Makes the cache's directories (0700, the agent user's) where missing; refuses
    /// ones others could write.
    pub fn make(&self) -> Result<(), Error> {
        private_dir(&self.root)?;
        for kind in [Kind::Python, Kind::Npm] {
            private_dir(&self.kind_dir(kind))?;
        }
        private_dir(&self.work_root())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn kind_dir(&self, kind: Kind) -> PathBuf {
        self.root.join(kind.dir())
    }

    /// Where installs in progress write (one directory each, see [`Cache::work_dir`]).
    pub fn work_root(&self) -> PathBuf {
        self.root.join("work")
    }

    /// A new, empty work directory `work/<name>` (0700), removed by the caller.
    pub fn work_dir(&self, name: &str) -> Result<PathBuf, Error> {
        let dir = self.work_root().join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io(&dir))?;
        Ok(dir)
    }

    /// Removes work directories (`<tag>-<n>`) left by a previous process with tag
    /// `ours`, or by agents whose tag, a pid, runs no more: crashed installs. The
    /// work of live agents sharing the cache is theirs.
    pub fn clear_work_of_dead(&self, ours: &str) {
        let root = self.work_root();
        let Ok(entries) = std::fs::read_dir(&root) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let tag = name.split('-').next().unwrap_or_default();
            let alive =
                tag != ours && tag.parse::<u32>().is_ok() && Path::new("/proc").join(tag).exists();
            if !alive {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    /// Where entry `key` of `kind` lives.
    pub fn path(&self, kind: Kind, key: &str) -> PathBuf {
        self.kind_dir(kind).join(key)
    }

    fn meta_path(&self, kind: Kind, key: &str) -> PathBuf {
        self.kind_dir(kind).join(format!("{key}.json"))
    }

    /// Entry `key`, if it is installed.
    pub fn get(&self, kind: Kind, key: &str) -> Result<Option<Entry>, Error> {
        let dir = self.path(kind, key);
        if !dir.is_dir() {
            return Ok(None);
        }
        let meta = self.meta_path(kind, key);
        let text = match std::fs::read(&meta) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&meta)(e)),
        };
        let entry: Entry = serde_json::from_slice(&text).map_err(|e| Error::Cache {
            path: meta.clone(),
            source: std::io::Error::other(e),
        })?;
        Ok(Some(entry))
    }

    /// Makes the files an installer wrote in `staged` the cache's (root's, nobody
    /// else may write them, no special files) and moves them to entry `entry.key` by
    /// one rename; the entry exists once its metadata is written after it. `entry.bytes` and (Python) `entry.modules` are
    /// filled in from the files. Returns the entry; if another install put the same
    /// key in place first, that one is kept and `staged` removed.
    pub fn commit(&self, staged: &Path, mut entry: Entry) -> Result<Entry, Error> {
        entry.bytes = sanitise(staged)?;
        if entry.kind == Kind::Python {
            entry.modules = top_level_modules(staged);
        }
        let dest = self.path(entry.kind, &entry.key);
        if let Err(e) = std::fs::rename(staged, &dest) {
            // ENOTEMPTY / EEXIST: another install of the same key won; keep it.
            if !dest.is_dir() {
                return Err(io(&dest)(e));
            }
            tracing::debug!(key = %entry.key, error = %e, "package installed twice; keeping the first");
            let _ = std::fs::remove_dir_all(staged);
            if let Some(kept) = self.get(entry.kind, &entry.key)? {
                return Ok(kept);
            }
            // Its install crashed before its metadata: the same key, the same files.
        }
        // The directory is no entry until its metadata is there.
        let meta = self.meta_path(entry.kind, &entry.key);
        let meta_tmp = meta.with_extension(format!("json.{}", std::process::id()));
        let text = serde_json::to_vec_pretty(&entry).expect("entry serialises");
        std::fs::write(&meta_tmp, text).map_err(io(&meta_tmp))?;
        std::fs::rename(&meta_tmp, &meta).map_err(io(&meta))?;
        Ok(entry)
    }

    /// Every entry, sorted by kind and key.
    pub fn list(&self) -> Result<Vec<Entry>, Error> {
        let mut all = Vec::new();
        for kind in [Kind::Python, Kind::Npm] {
            let dir = self.kind_dir(kind);
            let mut keys = BTreeSet::new();
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(&dir)(e)),
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    keys.insert(name);
                }
            }
            for key in keys {
                if let Some(entry) = self.get(kind, &key)? {
                    all.push(entry);
                }
            }
        }
        Ok(all)
    }

    /// Removes entry `key` (its metadata first, so a half-removed entry is no entry).
    pub fn remove(&self, kind: Kind, key: &str) -> Result<(), Error> {
        let meta = self.meta_path(kind, key);
        match std::fs::remove_file(&meta) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&meta)(e)),
        }
        let dir = self.path(kind, key);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&dir)(e)),
        }
    }
}

/// Walks `dir` (which an installer in a sandbox wrote, as its own user): every
/// directory, file and link becomes root's, nothing stays writable by anyone but
/// root, set-id bits go; anything else (a FIFO, a socket), or a `dir` that is not a
/// directory itself (a link), is refused. Returns the bytes of its files. Links are
/// not followed.
fn sanitise(dir: &Path) -> Result<u64, Error> {
    let mut bytes = 0u64;
    let mut entries = 0usize;
    let mut stack = vec![(dir.to_path_buf(), 0usize)];
    while let Some((path, depth)) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).map_err(io(&path))?;
        entries += 1;
        if entries > MAX_ENTRIES || depth > MAX_DEPTH {
            return Err(Error::Installed {
                path: dir.to_path_buf(),
                problem: format!("more than {MAX_ENTRIES} files or nested deeper than {MAX_DEPTH}"),
            });
        }
        let kind = meta.file_type();
        // The output itself must be a directory: a link there would become the
        // entry, and the host would resolve it (to its own `/tmp`, say) where the
        // sandbox meant its own.
        if depth == 0 && !kind.is_dir() {
            return Err(Error::Installed {
                path: path.clone(),
                problem: "the installer's output is not a directory (a link?)".into(),
            });
        }
        std::os::unix::fs::lchown(&path, Some(0), Some(0)).map_err(io(&path))?;
        if kind.is_symlink() {
            continue;
        }
        let mode = if kind.is_dir() {
            0o755
        } else if kind.is_file() {
            bytes = bytes.saturating_add(meta.len());
            if meta.mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            }
        } else {
            return Err(Error::Installed {
                path: path.clone(),
                problem: "the installer left a special file (not a file, directory or link)".into(),
            });
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(io(&path))?;
        if kind.is_dir() {
            for e in std::fs::read_dir(&path).map_err(io(&path))? {
                let e = e.map_err(io(&path))?;
                stack.push((e.path(), depth + 1));
            }
        }
    }
    Ok(bytes)
}

/// The top-level modules a `pip --target` directory provides: packages (directories
/// with `__init__.py`), namespace packages (other directories holding Python files
/// are left out: importing them pre-loads nothing), modules (`x.py`) and extension
/// modules (`x.<tag>.so`).
fn top_level_modules(dir: &Path) -> Vec<String> {
    let mut modules = BTreeSet::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(kind) = e.file_type() else { continue };
        let module = if kind.is_dir() {
            if name.ends_with(".dist-info") || name.ends_with(".data") || name == "bin" {
                continue;
            }
            if !e.path().join("__init__.py").is_file() {
                continue;
            }
            name
        } else if kind.is_file() {
            match name.strip_suffix(".py") {
                Some(m) => m.to_owned(),
                None if name.ends_with(".so") => name.split('.').next().unwrap_or("").to_owned(),
                None => continue,
            }
        } else {
            continue;
        };
        let ok = !module.is_empty()
            && module.len() <= 100
            && !module.starts_with(|c: char| c.is_ascii_digit())
            && module
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !module.starts_with('_');
        if ok {
            modules.insert(module);
        }
    }
    modules.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str) -> Entry {
        Entry {
            kind: Kind::Python,
            key: key.into(),
            name: "demo".into(),
            version: "1.0".into(),
            sha256: "ab".repeat(32),
            modules: Vec::new(),
            bytes: 0,
        }
    }

    #[test]
    fn commit_sanitises_finds_modules_and_keeps_the_first_of_two() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(&tmp.path().join("packages"));
        cache.make().unwrap();
        let staged = cache.work_dir("t-1").unwrap();
        std::fs::create_dir_all(staged.join("demo")).unwrap();
        std::fs::write(staged.join("demo/__init__.py"), "x = 1\n").unwrap();
        std::fs::write(staged.join("single.py"), "").unwrap();
        std::fs::write(staged.join("_private.py"), "").unwrap();
        std::fs::write(staged.join("fast.cpython-311-x86_64-linux-gnu.so"), "").unwrap();
        std::fs::create_dir_all(staged.join("demo-1.0.dist-info")).unwrap();
        std::fs::create_dir_all(staged.join("nsonly")).unwrap();
        std::fs::set_permissions(
            staged.join("single.py"),
            std::fs::Permissions::from_mode(0o4777),
        )
        .unwrap();
        let got = cache.commit(&staged, entry("demo-1.0-k")).unwrap();
        assert_eq!(got.modules, ["demo", "fast", "single"]);
        assert_eq!(got.bytes, 6);
        let dir = cache.path(Kind::Python, "demo-1.0-k");
        let mode = std::fs::metadata(dir.join("single.py")).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o755, "set-id and write bits go");
        assert_eq!(cache.get(Kind::Python, "demo-1.0-k").unwrap().unwrap(), got);
        // A second install of the same key: the first stays.
        let again = cache.work_dir("t-2").unwrap();
        std::fs::write(again.join("other.py"), "").unwrap();
        let kept = cache.commit(&again, entry("demo-1.0-k")).unwrap();
        assert_eq!(kept.modules, got.modules);
        assert!(!again.exists());
        assert_eq!(cache.list().unwrap().len(), 1);
        cache.remove(Kind::Python, "demo-1.0-k").unwrap();
        assert!(cache.list().unwrap().is_empty());
    }

    #[test]
    fn special_files_are_refused_and_nothing_is_committed() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(&tmp.path().join("packages"));
        cache.make().unwrap();
        let staged = cache.work_dir("t-1").unwrap();
        nix::unistd::mkfifo(&staged.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = cache.commit(&staged, entry("k")).unwrap_err().to_string();
        assert!(e.contains("special file"), "{e}");
        assert!(cache.get(Kind::Python, "k").unwrap().is_none());
    }

    #[test]
    fn an_output_that_is_a_link_is_refused_and_nothing_is_committed() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(&tmp.path().join("packages"));
        cache.make().unwrap();
        let work = cache.work_dir("t-1").unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o777)).unwrap();
        let staged = work.join("files");
        std::os::unix::fs::symlink(&outside, &staged).unwrap();
        let e = cache.commit(&staged, entry("k")).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
        assert!(cache.get(Kind::Python, "k").unwrap().is_none());
        assert!(std::fs::symlink_metadata(cache.path(Kind::Python, "k")).is_err());
        // What the link pointed at is untouched (not made 0755).
        let meta = std::fs::metadata(&outside).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o777);
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("packages");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(Cache::open(&root).make().is_err());
    }
}
