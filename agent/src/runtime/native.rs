//! Native functions: an executable the function brings.
//!
//! The handler is the executable's file name in the function directory: `exec` by
//! default, or `bootstrap` when only that exists. How it is spoken to follows from
//! the name alone, and the shim's instance host reads it the same way
//! ([`LAMBDA_BOOTSTRAP`]): `bootstrap` is served AWS Lambda's runtime API (a custom
//! runtime); any other name speaks OpenWhisk's actionloop protocol.
//!
//! The executable must be a regular file inside the directory (symlinks followed,
//! staying inside), readable and executable by "other" (sandboxes run as users of
//! their own), and an ELF binary or a `#!` script.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use ipc::proto::Handler;

use crate::error::Error;

/// The executable OpenWhisk's actionloop runs.
pub const ACTIONLOOP_EXEC: &str = "exec";

/// The executable AWS Lambda's custom runtimes start; a handler with this module is
/// served the Lambda runtime API.
pub const LAMBDA_BOOTSTRAP: &str = "bootstrap";

pub fn parse_handler(text: Option<&str>, dir: &Path) -> Result<Handler, Error> {
    let name = match text {
        Some(name) => name,
        None if !super::files::present(dir, ACTIONLOOP_EXEC)
            && super::files::present(dir, LAMBDA_BOOTSTRAP) =>
        {
            LAMBDA_BOOTSTRAP
        }
        None => ACTIONLOOP_EXEC,
    };
    if name.is_empty()
        || name.len() > 255
        || name.contains(['/', '\0'])
        || name == "."
        || name == ".."
    {
        return Err(Error::InvalidConfig(format!(
            "handler {name:?}: a native handler is the executable's file name in the function directory (exec, bootstrap, ...)"
        )));
    }
    Ok(Handler {
        module: name.to_owned(),
        function: String::new(),
    })
}

pub fn check_handler(dir: &Path, handler: &Handler) -> Result<(), Error> {
    let Some(file) = super::files::file_inside(dir, &handler.module, handler)? else {
        return Err(Error::HandlerFileMissing {
            handler: handler.to_string(),
            file: handler.module.clone(),
            dir: dir.to_path_buf(),
        });
    };
    let refused =
        |why: String| Error::InvalidConfig(format!("handler {handler}: {}: {why}", file.display()));
    let mut head = [0u8; 4];
    let read = super::files::open_regular(&file)
        .and_then(|mut f| {
            let mut n = 0;
            while n < head.len() {
                match f.read(&mut head[n..])? {
                    0 => break,
                    k => n += k,
                }
            }
            Ok(n)
        })
        .map_err(|e| refused(format!("cannot be read: {e}")))?;
    if !(head[..read].starts_with(b"\x7fELF") || head[..read].starts_with(b"#!")) {
        return Err(refused(
            "is neither an ELF executable nor a script starting with #!".to_owned(),
        ));
    }
    Ok(())
}

/// Readable and executable by "other", as every directory on the way is usable.
pub fn check_readable(dir: &Path, handler: &Handler) -> Result<(), Error> {
    let Some(file) = super::files::file_inside(dir, &handler.module, handler)? else {
        return Ok(());
    };
    rootfs::check_readable(dir, &file)
        .map_err(|e| Error::InvalidConfig(format!("handler {handler}: {e}")))?;
    let mode = std::fs::metadata(&file).map_or(0, |m| m.permissions().mode());
    if mode & 0o005 != 0o005 {
        return Err(Error::InvalidConfig(format!(
            "handler {handler}: {} is not executable by sandboxes: it is mode {:04o}; every sandbox runs as its own unprivileged user, so it needs read and execute permission for others (for example `chmod o+rx`)",
            file.display(),
            mode & 0o7777
        )));
    }
    Ok(())
}
