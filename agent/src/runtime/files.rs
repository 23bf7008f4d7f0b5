//! Files of a function directory, as the runtimes' checks read them: nothing is
//! followed out of the directory, and nothing large is read.

use std::io::Read;
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
    if !resolved.is_file() {
        return Err(bad("not a regular file".to_owned()));
    }
    let mut text = String::new();
    std::fs::File::open(&resolved)
        .and_then(|f| f.take(max + 1).read_to_string(&mut text))
        .map_err(|e| bad(format!("cannot be read: {e}")))?;
    if text.len() as u64 > max {
        return Err(bad(format!("larger than {max} bytes")));
    }
    Ok(Some(text))
}
