//! Node.js's handlers.
//!
//! Written `file.export` or `file:export` (OpenWhisk's `--main other.niam`, AWS's
//! `index.handler`, `src/app.handler`): the module is the file up to the first `:`
//! (or, without one, the first `.` of the file's name), the function the rest, a dotted path into the module's exports
//! (`other.niam.xyz` → module `other`, function `niam.xyz`). The module is a file in
//! the function directory: `file`, `file.js`, `file.cjs`, `file.mjs` or
//! `file/index.js`. No handler, or an empty module, means the directory's module
//! itself: `package.json`'s `"main"`, else `index.js`, else `main.js`; an empty
//! function means the module's export is the handler (Zeep's
//! `module.exports = async (arg) => ...`; the shim also tries `main` and `handler`).

use std::path::{Component, Path, PathBuf};

use ipc::proto::Handler;

use crate::error::Error;

/// The longest handler accepted.
const MAX_HANDLER_LEN: usize = 256;

/// The largest `package.json` read.
const MAX_PACKAGE_JSON: u64 = 1 << 20;

/// The directory's own module, without `package.json`'s `main`: the first that exists.
pub const DIRECTORY_MODULES: [&str; 2] = ["index.js", "main.js"];

/// The suffixes tried after a module's name, in order.
const MODULE_SUFFIXES: [&str; 5] = ["", ".js", ".cjs", ".mjs", "/index.js"];

pub fn parse_handler(text: Option<&str>) -> Result<Handler, Error> {
    let text = text.unwrap_or("");
    if text.len() > MAX_HANDLER_LEN {
        return Err(Error::InvalidConfig(format!(
            "handler is {} bytes long, more than {MAX_HANDLER_LEN}",
            text.len()
        )));
    }
    // Without a `:`, the first `.` of the file name (not of a directory on the way).
    let (module, function) = match text.split_once(':') {
        Some(split) => split,
        None => {
            let name_at = text.rfind('/').map_or(0, |i| i + 1);
            match text[name_at..].find('.') {
                Some(dot) => (&text[..name_at + dot], &text[name_at + dot + 1..]),
                None => (text, ""),
            }
        }
    };
    let relative = !module.is_empty()
        && Path::new(module)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    if !module.is_empty() && (!relative || module.contains('\0') || module.ends_with('/')) {
        return Err(Error::InvalidConfig(format!(
            "handler {text:?}: module {module:?} is not a relative path in the function directory"
        )));
    }
    let ident = |p: &str| {
        !p.is_empty()
            && !p.starts_with(|c: char| c.is_ascii_digit())
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
    };
    if !function.is_empty() && !function.split('.').all(ident) {
        return Err(Error::InvalidConfig(format!(
            "handler {text:?}: {function:?} is not a JavaScript export name (names separated by dots)"
        )));
    }
    Ok(Handler {
        module: module.to_owned(),
        function: function.to_owned(),
    })
}

/// The module's file must exist and resolve (symlinks followed) to a file inside the
/// canonical directory `dir`.
pub fn check_handler(dir: &Path, handler: &Handler) -> Result<(), Error> {
    module_file(dir, handler).map(drop)
}

/// The module's file must be readable by "other", as every directory on the way.
pub fn check_readable(dir: &Path, handler: &Handler) -> Result<(), Error> {
    let file = module_file(dir, handler)?;
    rootfs::check_readable(dir, &file)
        .map_err(|e| Error::InvalidConfig(format!("handler {}: {e}", shown(handler))))
}

/// The handler as shown in errors: the directory's module has no name of its own.
fn shown(handler: &Handler) -> String {
    if handler.module.is_empty() {
        "(the directory's module)".to_owned()
    } else {
        handler.to_string()
    }
}

/// The canonical file of the handler's module in the canonical directory `dir`.
pub fn module_file(dir: &Path, handler: &Handler) -> Result<PathBuf, Error> {
    if handler.module.is_empty() {
        return directory_module(dir, handler);
    }
    for suffix in MODULE_SUFFIXES {
        let rel = format!("{}{suffix}", handler.module);
        if let Some(file) = super::files::file_inside(dir, &rel, handler)? {
            return Ok(file);
        }
    }
    Err(Error::HandlerFileMissing {
        handler: handler.to_string(),
        file: format!(
            "{} (or {0}.js, {0}.cjs, {0}.mjs, {0}/index.js)",
            handler.module
        ),
        dir: dir.to_path_buf(),
    })
}

/// Whether `dir` holds a module file for `module` (how detection recognises a
/// handler written for Node.js). Nothing is followed out of `dir`.
pub fn has_module(dir: &Path, module: &str) -> bool {
    !module.is_empty()
        && [".js", ".cjs", ".mjs"]
            .iter()
            .any(|suffix| super::files::present(dir, &format!("{module}{suffix}")))
}

/// `package.json`'s `main`, else `index.js`, else `main.js`.
fn directory_module(dir: &Path, handler: &Handler) -> Result<PathBuf, Error> {
    if let Some(main) = package_main(dir)? {
        let escapes = |resolved: PathBuf| {
            Error::InvalidConfig(format!(
                "package.json's main {main:?} resolves to {}, outside the function directory {}",
                resolved.display(),
                dir.display()
            ))
        };
        if leaves(&main) {
            return Err(escapes(dir.join(&main)));
        }
        for suffix in MODULE_SUFFIXES {
            let Ok(resolved) = dir.join(format!("{main}{suffix}")).canonicalize() else {
                continue;
            };
            if !resolved.starts_with(dir) {
                return Err(escapes(resolved));
            }
            if resolved.is_file() {
                return Ok(resolved);
            }
        }
        return Err(Error::InvalidConfig(format!(
            "package.json's main {main:?} names no file in {}",
            dir.display()
        )));
    }
    for name in DIRECTORY_MODULES {
        if let Some(file) = super::files::file_inside(dir, name, handler)? {
            return Ok(file);
        }
    }
    Err(Error::InvalidConfig(format!(
        "no Node.js module in {}: looked for package.json's \"main\", index.js and main.js; name one with --handler file.export",
        dir.display()
    )))
}

/// Whether the relative path `rel` leaves the directory it is taken in, as written:
/// absolute, or more `..` than directories before them.
fn leaves(rel: &str) -> bool {
    let mut depth = 0usize;
    for part in Path::new(rel).components() {
        match part {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir if depth > 0 => depth -= 1,
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return true,
        }
    }
    false
}

/// `package.json`'s `main`, if it has a `package.json` with one.
fn package_main(dir: &Path) -> Result<Option<String>, Error> {
    let path = dir.join("package.json");
    let Some(text) = super::files::read_small(dir, "package.json", MAX_PACKAGE_JSON)? else {
        return Ok(None);
    };
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::InvalidConfig(format!("{} is not valid JSON: {e}", path.display())))?;
    match json.get("main") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(main)) if !main.is_empty() && !main.contains('\0') => {
            Ok(Some(main.trim_start_matches("./").to_owned()))
        }
        Some(other) => Err(Error::InvalidConfig(format!(
            "package.json's main is {other}, not a file name"
        ))),
    }
}

/// The function's `package.json` (only what installing reads, without the modules
/// sprout provides) and its `package-lock.json`, both checked (see
/// `packages::npm`: every package from the node's registry, `sources`), `None` when
/// it depends on nothing sprout does not provide.
pub fn dependencies(
    dir: &Path,
    sources: &crate::packages::Sources,
) -> Result<Option<crate::packages::Dependencies>, Error> {
    let registry = sources.npm_registry();
    let refused = |source| Error::Packages {
        function: dir.display().to_string(),
        source: Box::new(source),
    };
    let Some(text) = super::files::read_small(dir, "package.json", MAX_PACKAGE_JSON)? else {
        return Ok(None);
    };
    let package_json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| refused(crate::packages::Error::Manifest(format!("not JSON: {e}"))))?;
    let Some(manifest) =
        crate::packages::npm::manifest(&package_json, registry).map_err(refused)?
    else {
        return Ok(None);
    };
    let lock = match super::files::read_small(dir, "package-lock.json", 16 * MAX_PACKAGE_JSON)? {
        None => None,
        Some(text) => {
            let lock: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                refused(crate::packages::Error::Lock {
                    entry: "(the file)".into(),
                    problem: format!("not JSON: {e}"),
                })
            })?;
            Some(crate::packages::npm::lock(&lock, registry).map_err(refused)?)
        }
    };
    Ok(Some(crate::packages::Dependencies::Npm { manifest, lock }))
}
