//! Whether sandboxes can read a function's code.
//!
//! Every sandbox runs as an unprivileged host user of its own ([`crate::SandboxUser`],
//! a different one per sandbox and never the owner or group of a host file), so a
//! registered directory is only usable if "other" can list and enter every
//! directory from the function's directory down to its handler file, and read that
//! file. Only the "other" permission bits are judged (access control lists are not
//! read): owner and group bits never apply to a sandbox.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A file or directory of a function that sandboxes cannot use.
#[derive(Debug, thiserror::Error)]
#[error(
    "{} is not readable by sandboxes: it is {} mode {:04o} owned by {}:{}; every sandbox runs as its own unprivileged user, so it needs {} permission for others (for example `chmod {}`)",
    .path.display(), self.kind(), .mode & 0o7777, .owner, .group, self.need(), self.chmod()
)]
pub struct Unreadable {
    /// The file or directory, on the host.
    pub path: PathBuf,
    pub owner: u32,
    pub group: u32,
    pub mode: u32,
    pub directory: bool,
}

impl Unreadable {
    fn kind(&self) -> &'static str {
        if self.directory {
            "a directory with"
        } else {
            "a file with"
        }
    }

    /// The permission "other" lacks.
    pub fn need(&self) -> &'static str {
        if self.directory {
            "read and execute"
        } else {
            "read"
        }
    }

    fn chmod(&self) -> &'static str {
        if self.directory {
            "o+rx"
        } else {
            "o+r"
        }
    }
}

/// Whether a file (or, with `directory`, a directory: list and enter) with this
/// mode is readable by any user that is neither its owner nor in its group.
pub fn readable_by_others(mode: u32, directory: bool) -> bool {
    let need = if directory { 0o5 } else { 0o4 };
    mode & need == need
}

/// Checks that "other" can list and enter `dir` and every directory below it on the
/// way to `file` (a path inside `dir`, as canonical as `dir`), and read `file`.
/// The first one it cannot is returned.
pub fn check_readable(dir: &Path, file: &Path) -> Result<(), Unreadable> {
    let mut path = dir.to_path_buf();
    check_one(&path, true)?;
    let Ok(rel) = file.strip_prefix(dir) else {
        return check_one(file, false);
    };
    let mut parts = rel.components().peekable();
    while let Some(part) = parts.next() {
        path.push(part);
        check_one(&path, parts.peek().is_some())?;
    }
    Ok(())
}

/// [`check_readable`] for the file of Python module `module` (dotted) in the
/// canonical directory `dir`: `a/b.py`, or the package's `a/b/__init__.py`,
/// whichever exists (the directory alone when neither does).
pub fn check_module_readable(dir: &Path, module: &str) -> Result<(), Unreadable> {
    let base = module.replace('.', "/");
    let file = [format!("{base}.py"), format!("{base}/__init__.py")]
        .iter()
        .find_map(|rel| {
            dir.join(rel)
                .canonicalize()
                .ok()
                .filter(|p| p.is_file() && p.starts_with(dir))
        })
        .unwrap_or_else(|| dir.to_path_buf());
    check_readable(dir, &file)
}

fn check_one(path: &Path, directory: bool) -> Result<(), Unreadable> {
    // A path that cannot be stat'ed is left to the caller's own checks (it reports a
    // missing file better); only permissions are judged here.
    let Ok(meta) = fs::metadata(path) else {
        return Ok(());
    };
    if readable_by_others(meta.mode(), directory) {
        return Ok(());
    }
    Err(Unreadable {
        path: path.to_path_buf(),
        owner: meta.uid(),
        group: meta.gid(),
        mode: meta.mode(),
        directory,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SandboxUser;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn only_the_other_bits_count() {
        assert!(readable_by_others(0o644, false));
        assert!(readable_by_others(0o004, false));
        assert!(!readable_by_others(0o640, false), "group bits never apply");
        assert!(!readable_by_others(0o600, false));
        assert!(!readable_by_others(0o440, false));
        // A directory needs read (list) and execute (enter).
        assert!(readable_by_others(0o755, true));
        assert!(readable_by_others(0o705, true));
        assert!(!readable_by_others(0o751, true));
        assert!(!readable_by_others(0o754, true));
        assert!(!readable_by_others(0o770, true));
    }

    #[test]
    fn sandbox_users_refuse_root_by_field() {
        assert_eq!(
            SandboxUser::new(1000, 1000).unwrap(),
            SandboxUser {
                uid: 1000,
                gid: 1000
            }
        );
        for (uid, gid, field, value) in [
            (0, 1, "sandbox_uid", 0u32),
            (1, 0, "sandbox_gid", 0),
            (u32::MAX, 1, "sandbox_uid", u32::MAX),
        ] {
            let e = SandboxUser::new(uid, gid).unwrap_err().to_string();
            assert!(
                e.contains(&format!("{field} {value} is not accepted")),
                "{e}"
            );
            assert!(e.contains("accepted: 1 to 4294967294"), "{e}");
        }
    }

    /// The files made here are root's (tests run as root) or the test user's: the
    /// owner bits must not matter either way.
    #[test]
    fn an_unreadable_file_or_directory_on_the_way_is_named() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("fn");
        fs::create_dir_all(dir.join("pkg")).unwrap();
        fs::write(dir.join("pkg/mod.py"), "x = 1\n").unwrap();
        let set =
            |p: &Path, mode: u32| fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
        set(&dir, 0o755);
        set(&dir.join("pkg"), 0o755);
        set(&dir.join("pkg/mod.py"), 0o644);
        let file = dir.join("pkg/mod.py");
        check_readable(&dir, &file).unwrap();

        for mode in [0o600, 0o640, 0o440] {
            set(&file, mode);
            let e = check_readable(&dir, &file).unwrap_err();
            assert_eq!(e.path, file);
            assert!(!e.directory);
            let text = e.to_string();
            assert!(
                text.contains("mod.py is not readable by sandboxes"),
                "{text}"
            );
            assert!(text.contains(&format!("mode {mode:04o}")), "{text}");
            assert!(
                text.contains("it needs read permission for others"),
                "{text}"
            );
            assert!(text.contains("chmod o+r`"), "{text}");
        }
        set(&file, 0o604);
        check_readable(&dir, &file).unwrap();
        set(&file, 0o644);

        set(&dir.join("pkg"), 0o771);
        let e = check_readable(&dir, &file).unwrap_err();
        assert_eq!(e.path, dir.join("pkg"));
        assert!(
            e.to_string()
                .contains("needs read and execute permission for others"),
            "{e}"
        );
        set(&dir.join("pkg"), 0o755);

        set(&dir, 0o750);
        let e = check_readable(&dir, &file).unwrap_err();
        assert_eq!(e.path, dir);
        assert!(e.to_string().contains("chmod o+rx"), "{e}");
        set(&dir, 0o755);

        // A missing file is for the caller to report.
        check_readable(&dir, &dir.join("nope.py")).unwrap();

        // By module: the file, or the package's `__init__.py`.
        check_module_readable(&dir, "pkg.mod").unwrap();
        fs::write(dir.join("pkg/__init__.py"), "").unwrap();
        set(&dir.join("pkg/__init__.py"), 0o600);
        let e = check_module_readable(&dir, "pkg").unwrap_err();
        assert_eq!(e.path, dir.join("pkg/__init__.py"));
        set(&file, 0o200);
        let e = check_module_readable(&dir, "pkg.mod").unwrap_err();
        assert_eq!(e.path, file);
        check_module_readable(&dir, "missing").unwrap();
    }
}
