//! The runtime seam: everything the agent knows that differs between language
//! runtimes, in one place.
//!
//! - which runtime runs a function ([`of`]): the one its registration names, else
//!   the one its directory's files say ([`detect`]);
//! - whether it is installed on the host, at the version asked ([`installed`]);
//! - how a handler is written and found in a function directory
//!   ([`Seam::parse_handler`], [`Seam::check_handler`], [`Seam::check_readable`]; one
//!   module per runtime: [`python`], [`nodejs`], [`native`]);
//! - what a stem cell is keyed by: a stem cell runs one runtime (a Python zygote, or
//!   a spare instance host), so the scheduler keeps its stem cells per [`Runtime`];
//! - what OpenLambda's `ol.yaml` says about a function ([`ol_yaml`]): its
//!   environment, the HTTP methods `/run` accepts, and `OL_ENTRY_FILE`;
//! - what a callee needs to run in its caller's sandbox: the same runtime
//!   ([`Seam::runs_callee`]); a callee of another runtime runs in a sandbox of its own
//!   through the agent.
//!
//! The runtimes themselves are the protocol's enum ([`Runtime`], re-exported), so the
//! agent and the shim name them the same way.

pub mod env_names;
mod files;
pub mod installed;
pub mod native;
pub mod nodejs;
pub mod ol_yaml;
pub mod python;

use std::path::Path;

use ipc::api::FunctionConfig;
use ipc::proto::Handler;

use crate::error::Error;

pub use ipc::proto::Runtime;

/// The files detection looks for when the handler's own file says nothing, in order
/// of precedence, with the runtime each means.
pub const MARKERS: [(&str, Runtime); 7] = [
    ("f.py", Runtime::Python),
    ("package.json", Runtime::Nodejs),
    ("index.js", Runtime::Nodejs),
    ("main.js", Runtime::Nodejs),
    ("activity.json", Runtime::Nodejs),
    (native::ACTIONLOOP_EXEC, Runtime::Native),
    (native::LAMBDA_BOOTSTRAP, Runtime::Native),
];

/// Zeep's description of a function, whose `runtime` field is checked like a
/// registration's.
const ACTIVITY_JSON: &str = "activity.json";

/// The largest `activity.json` read.
const MAX_ACTIVITY_JSON: u64 = 64 << 10;

/// The runtime that runs the function in the canonical directory `dir`: the one
/// `config` names (checked to be installed, at its version), else the one
/// [`detect`] finds. Either way it must be installed.
pub fn of(config: &FunctionConfig, dir: &Path) -> Result<Runtime, Error> {
    let runtime = match config.runtime.as_deref() {
        Some(text) => explicit(text)?,
        None => detect(dir, config.handler.as_deref())?,
    };
    runtime.check_installed()?;
    Ok(runtime)
}

/// A runtime as written (`nodejs:20`), if it is installed.
fn explicit(text: &str) -> Result<Runtime, Error> {
    let requested = installed::parse(text)?;
    installed::check(&requested, text)?;
    Ok(requested.runtime)
}

/// The runtime a function directory is written for, by precedence:
///
/// 1. an `activity.json` (Zeep's) with a `runtime` field: that runtime, checked as if
///    the registration named it;
/// 2. the handler's own file, when a handler is given: its Python module (`m.py`,
///    `m/__init__.py`) → Python; its Node.js module (`m.js`, `m.cjs`, `m.mjs`) →
///    Node.js; a file of exactly its name → native;
/// 3. the first of [`MARKERS`] present: `f.py` → Python; `package.json`, `index.js`,
///    `main.js`, `activity.json` → Node.js; `exec`, `bootstrap` → native.
///
/// Nothing found: an error naming every file looked for and `--runtime`.
pub fn detect(dir: &Path, handler: Option<&str>) -> Result<Runtime, Error> {
    if let Some(runtime) = activity_runtime(dir)? {
        return Ok(runtime);
    }
    let mut looked_for = Vec::new();
    if let Some(text) = handler {
        if let Ok(h) = python::parse_handler(Some(text)) {
            let module_files = python::module_files(&h);
            if module_files.iter().any(|f| files::present(dir, f)) {
                return Ok(Runtime::Python);
            }
            looked_for.extend(module_files);
        }
        if let Ok(h) = nodejs::parse_handler(Some(text)) {
            if nodejs::has_module(dir, &h.module) {
                return Ok(Runtime::Nodejs);
            }
            if !h.module.is_empty() {
                looked_for.push(format!("{}.js", h.module));
            }
        }
        if !text.is_empty() && !text.contains(['/', '\0', ':']) && text != "." && text != ".." {
            if files::present(dir, text) {
                return Ok(Runtime::Native);
            }
            looked_for.push(text.to_owned());
        }
    }
    if let Some((_, runtime)) = MARKERS.iter().find(|(file, _)| files::present(dir, file)) {
        return Ok(*runtime);
    }
    looked_for.extend(MARKERS.iter().map(|(file, _)| (*file).to_owned()));
    Err(Error::InvalidConfig(format!(
        "cannot tell which runtime runs {}: it has none of {}; name one with --runtime python|nodejs|native (\"runtime\" in a registration)",
        dir.display(),
        looked_for.join(", ")
    )))
}

/// The runtime an `activity.json` in `dir` names, checked like an explicit one.
fn activity_runtime(dir: &Path) -> Result<Option<Runtime>, Error> {
    let Some(text) = files::read_small(dir, ACTIVITY_JSON, MAX_ACTIVITY_JSON)? else {
        return Ok(None);
    };
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        Error::InvalidConfig(format!(
            "{ACTIVITY_JSON} in {} is not valid JSON: {e}",
            dir.display()
        ))
    })?;
    match json.get("runtime") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(name)) => explicit(name)
            .map(Some)
            .map_err(|e| Error::InvalidConfig(format!("{ACTIVITY_JSON}: {e}"))),
        Some(other) => Err(Error::InvalidConfig(format!(
            "{ACTIVITY_JSON}'s runtime is {other}, not a runtime name"
        ))),
    }
}

/// The agent's side of the runtime seam, over the protocol's [`Runtime`].
pub trait Seam: Copy {
    fn check_installed(self) -> Result<(), Error>;
    fn parse_handler(self, text: Option<&str>, dir: &Path) -> Result<Handler, Error>;
    fn check_handler(self, dir: &Path, handler: &Handler) -> Result<(), Error>;
    fn check_readable(self, dir: &Path, handler: &Handler) -> Result<(), Error>;
    fn runs_callee(self, callee: Runtime) -> bool;
    fn dependencies(
        self,
        dir: &Path,
        sources: &crate::packages::Sources,
    ) -> Result<Option<crate::packages::Dependencies>, Error>;
}

impl Seam for Runtime {
    /// Checks that the interpreter the shim's seam starts the runtime with is
    /// installed on the host (native: nothing to check).
    fn check_installed(self) -> Result<(), Error> {
        let requested = installed::Requested {
            runtime: self,
            version: None,
        };
        installed::check(&requested, self.name())
    }

    /// Parses a handler as written in a registration (`None`: the runtime's
    /// default) for the function in the canonical directory `dir`.
    fn parse_handler(self, text: Option<&str>, dir: &Path) -> Result<Handler, Error> {
        match self {
            Runtime::Python => python::parse_handler(text),
            Runtime::Nodejs => nodejs::parse_handler(text),
            Runtime::Native => native::parse_handler(text, dir),
        }
    }

    /// The handler's file must exist in the canonical directory `dir` and resolve
    /// (symlinks followed) to a file inside it, in the form the runtime needs.
    fn check_handler(self, dir: &Path, handler: &Handler) -> Result<(), Error> {
        match self {
            Runtime::Python => python::check_handler(dir, handler),
            Runtime::Nodejs => nodejs::check_handler(dir, handler),
            Runtime::Native => native::check_handler(dir, handler),
        }
    }

    /// The handler's file must be readable (native: and executable) by "other":
    /// sandboxes run as an unprivileged user of their own.
    fn check_readable(self, dir: &Path, handler: &Handler) -> Result<(), Error> {
        match self {
            Runtime::Python => python::check_readable(dir, handler),
            Runtime::Nodejs => nodejs::check_readable(dir, handler),
            Runtime::Native => native::check_readable(dir, handler),
        }
    }

    /// Whether a function of runtime `callee` can run in a sandbox of this one: only
    /// the same runtime (a Python callee is forked from the sandbox's zygote; a
    /// Node.js or native one is started by the sandbox's launcher, which starts hosts
    /// of its own runtime only). Any other callee runs in a sandbox of its own runtime,
    /// through the agent.
    fn runs_callee(self, callee: Runtime) -> bool {
        self == callee
    }

    /// What the function needs installed, read from its directory (`None`: nothing):
    /// Python's `requirements.txt`, Node.js's `package.json` dependencies (checked
    /// against the node's `sources`). Native functions bring everything.
    fn dependencies(
        self,
        dir: &Path,
        sources: &crate::packages::Sources,
    ) -> Result<Option<crate::packages::Dependencies>, Error> {
        match self {
            Runtime::Python => python::dependencies(dir),
            Runtime::Nodejs => nodejs::dependencies(dir, sources),
            Runtime::Native => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests;
