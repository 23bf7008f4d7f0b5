//! Files of a function directory, as the runtimes' checks read them: nothing is
//! followed out of the directory, and nothing large is read.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ipc::proto::Handler;

use crate::error::Error;

/// Whether `rel` names something in `dir` (a link counts, whatever it points to).
pub fn present(dir: &Path, rel: &str) -> bool {
    dir.join(rel).symlink_metadata().is_ok()
}

/// The canonical path of `rel` in the canonical directory `dir` if it is a file
/// there (symlinks followed); an error if it resolves outside `dir`.
pub fn file_inside(dir: &Path, rel: &str, handler: &Handler) -> Result<Option<PathBuf>, Error> {
    let Ok(resolved) = dir.join(rel).canonicalize() else {
        return Ok(None);
    };
    if !resolved.starts_with(dir) {
        return Err(Error::HandlerOutsideDir {
            handler: handler.to_string(),
            file: rel.to_owned(),
            resolved,
            dir: dir.to_path_buf(),
        });
    }
    Ok(resolved.is_file().then_some(resolved))
}

/// The text of the small file `name` in the canonical directory `dir`, `None` if there
/// is none. It must resolve to a regular file inside `dir` of at most `max` bytes.
pub fn read_small(dir: &Path, name: &str, max: u64) -> Result<Option<String>, Error> {
    let bad = |why: String| Error::InvalidConfig(format!("{name} in {}: {why}", dir.display()));
    let Ok(resolved) = dir.join(name).canonicalize() else {
        return Ok(None);
    };
    if !resolved.starts_with(dir) {
        return Err(bad(format!(
            "resolves to {}, outside the function directory",
            resolved.display()
        )));
    }
    let mut text = String::new();
    open_regular(&resolved)
        .and_then(|f| f.take(max + 1).read_to_string(&mut text))
        .map_err(|e| bad(format!("cannot be read: {e}")))?;
    if text.len() as u64 > max {
        return Err(bad(format!("larger than {max} bytes")));
    }
    Ok(Some(text))
}

/// Opens `path` (canonical: no symlink on the way) for reading if it is a regular file.
/// What a check before the open saw may have been swapped since: the open neither
/// follows a symlink nor waits (a FIFO would block an open for reading until a writer
/// came), and the type is checked on the open descriptor.
pub fn open_regular(path: &Path) -> io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    if !file.metadata()?.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Opens `path` on a thread: an open that would block fails the test, not hangs it.
    fn open_in_time(path: PathBuf) -> io::Result<File> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(open_regular(&path));
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the open blocked")
    }

    #[test]
    fn only_regular_files_open_and_a_fifo_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("activity.json");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = open_in_time(fifo.clone()).unwrap_err();
        assert!(e.to_string().contains("is not a regular file"), "{e}");
        assert!(e.to_string().contains(&*fifo.to_string_lossy()), "{e}");
        let e = read_small(dir.path(), "activity.json", 100).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");

        let file = dir.path().join("file");
        std::fs::write(&file, "text").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(open_in_time(file).is_ok());
        assert!(open_in_time(link).is_err(), "a symlink is not followed");
        assert!(open_in_time(dir.path().to_path_buf()).is_err());
    }
}
