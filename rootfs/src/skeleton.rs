//! The shared, read-only root directory every sandbox starts from.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::Error;

/// Mount points that must exist in the skeleton.
const DIRS: &[&str] = &[
    "proc",
    "dev",
    "sys",
    "tmp",
    "usr",
    "etc",
    "root",
    "code",
    ".sprout",
    "workflow",
    "fns",
    "deps",
    "etc/ssl/certs",
];
/// Merged-/usr links, as on Debian.
const LINKS: &[(&str, &str)] = &[
    ("bin", "usr/bin"),
    ("sbin", "usr/sbin"),
    ("lib", "usr/lib"),
    ("lib64", "usr/lib64"),
];
const FILES: &[(&str, &str)] = &[
    ("etc/passwd", "root:x:0:0:root:/root:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"),
    ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
    ("etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost\n"),
    ("etc/nsswitch.conf", "passwd: files\ngroup: files\nhosts: files dns\n"),
    // Empty: no name server. The mount point for the host's, in a sandbox with
    // outbound network.
    ("etc/resolv.conf", ""),
];

/// A sandbox root skeleton on the host.
#[derive(Debug, Clone)]
pub struct Skeleton {
    path: PathBuf,
}

impl Skeleton {
    /// Creates the skeleton under `path` (idempotent). Costs well under a millisecond.
    pub fn create(path: &Path) -> Result<Skeleton, Error> {
        let err = |p: &Path| {
            let path = p.to_path_buf();
            move |source| Error::Create { path, source }
        };
        // Explicit modes, whatever the umask: the sandbox's processes are not root
        // and must be able to walk the root and read `/etc`.
        let mode = |p: &Path, mode: u32| fs::set_permissions(p, fs::Permissions::from_mode(mode));
        fs::create_dir_all(path).map_err(err(path))?;
        mode(path, 0o755).map_err(err(path))?;
        for d in DIRS {
            let p = path.join(d);
            fs::create_dir_all(&p)
                .and_then(|()| mode(&p, 0o755))
                .map_err(err(&p))?;
        }
        for (link, target) in LINKS {
            let p = path.join(link);
            match symlink(target, &p) {
                Err(e) if e.kind() != ErrorKind::AlreadyExists => return Err(err(&p)(e)),
                _ => {}
            }
        }
        for (file, content) in FILES {
            let p = path.join(file);
            fs::write(&p, content)
                .and_then(|()| mode(&p, 0o644))
                .map_err(err(&p))?;
        }
        Ok(Skeleton {
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skeleton_has_mount_points_links_and_etc() {
        let t = tempfile::tempdir().unwrap();
        let s = Skeleton::create(&t.path().join("root")).unwrap();
        Skeleton::create(s.path()).unwrap(); // idempotent
        for d in DIRS {
            assert!(s.path().join(d).is_dir(), "{d}");
        }
        assert_eq!(
            fs::read_link(s.path().join("lib")).unwrap(),
            Path::new("usr/lib")
        );
        // Readable by the sandbox's unprivileged user, whatever the umask was.
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(s.path()), 0o755);
        assert_eq!(mode(&s.path().join("etc")), 0o755);
        assert_eq!(mode(&s.path().join("etc/passwd")), 0o644);
        assert!(fs::read_to_string(s.path().join("etc/passwd"))
            .unwrap()
            .starts_with("root:"));
    }
}
