//! Python's handlers: `module:function` (default `f:f`, OpenLambda's `f.py` with
//! `def f(event)`), the module a file `module.py` or a package's `__init__.py` in the
//! function directory.

use std::path::Path;

use ipc::proto::Handler;

use crate::error::Error;

/// The handler OpenLambda uses: `f.py` with `def f(event)`.
pub const DEFAULT_HANDLER: &str = "f:f";

/// The files that hold `handler`'s module, relative to the function directory: the
/// module file, then the package's `__init__.py`.
pub fn module_files(handler: &Handler) -> [String; 2] {
    [
        handler.module_file(),
        format!("{}/__init__.py", handler.module.replace('.', "/")),
    ]
}

pub fn parse_handler(text: Option<&str>) -> Result<Handler, Error> {
    Handler::parse(text.unwrap_or(DEFAULT_HANDLER)).map_err(Error::InvalidConfig)
}

/// The module file (or package `__init__.py`) of `handler` must exist and resolve to
/// a file inside the canonical directory `dir`.
pub fn check_handler(dir: &Path, handler: &Handler) -> Result<(), Error> {
    let [file, package_init] = module_files(handler);
    for rel in [&file, &package_init] {
        if super::files::file_inside(dir, rel, handler)?.is_some() {
            return Ok(());
        }
    }
    Err(Error::HandlerFileMissing {
        handler: handler.to_string(),
        file,
        dir: dir.to_path_buf(),
    })
}

pub fn check_readable(dir: &Path, handler: &Handler) -> Result<(), Error> {
    rootfs::check_module_readable(dir, &handler.module)
        .map_err(|e| Error::InvalidConfig(format!("handler {handler}: {e}")))
}

/// The lines of the function's `requirements.txt` (checked: see
/// `packages::requirements`), `None` when it has none or they are all comments.
pub fn dependencies(dir: &Path) -> Result<Option<crate::packages::Dependencies>, Error> {
    let max = crate::packages::requirements::MAX_BYTES as u64;
    let Some(text) = super::files::read_small(dir, "requirements.txt", max)? else {
        return Ok(None);
    };
    let lines = crate::packages::requirements::parse(&text).map_err(|source| Error::Packages {
        function: dir.display().to_string(),
        source: Box::new(source),
    })?;
    Ok((!lines.is_empty()).then_some(crate::packages::Dependencies::Python(lines)))
}
