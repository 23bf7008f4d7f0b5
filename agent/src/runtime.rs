//! The runtime seam: everything the agent knows that differs between language
//! runtimes, in one place.
//!
//! - how a handler is written and found in a function directory
//!   ([`Runtime::parse_handler`], [`Runtime::check_handler`],
//!   [`Runtime::check_readable`]);
//! - what must be installed on the host for its zygote to start
//!   ([`Runtime::check_installed`]);
//! - what a stem cell is keyed by: a stem cell runs one runtime's zygote, so the
//!   scheduler keeps its stem cells per [`Runtime`];
//! - what a callee needs to run in its caller's sandbox: the same runtime
//!   ([`Runtime::runs_callee`]), since it is forked from that sandbox's zygote;
//! - its name on the wire ([`Runtime::wire`]), which the shim uses to pick the zygote.
//!
//! Python is the only member. Adding a runtime is adding a variant and its arms here
//! (and its zygote in the shim).

use std::path::Path;

use ipc::api::FunctionConfig;
use ipc::proto::Handler;

use crate::error::Error;

/// The handler OpenLambda uses: `f.py` with `def f(event)`.
pub const PYTHON_DEFAULT_HANDLER: &str = "f:f";

/// A language runtime functions are written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum Runtime {
    Python,
}

impl Runtime {
    /// Every runtime, in the order stem cells are made for them.
    pub const ALL: [Runtime; 1] = [Runtime::Python];

    /// The runtime a registration asks for (every function is Python's for now).
    pub fn of(_config: &FunctionConfig) -> Runtime {
        Runtime::Python
    }

    /// Its name in the agent ↔ shim protocol.
    pub fn wire(self) -> ipc::proto::Runtime {
        match self {
            Runtime::Python => ipc::proto::Runtime::Python,
        }
    }

    pub fn name(self) -> &'static str {
        self.into()
    }

    /// Checks that what starts its zygote is installed on the host.
    pub fn check_installed(self) -> Result<(), Error> {
        match self {
            Runtime::Python => {
                let python = Path::new(shim::PYTHON);
                if python.is_file() {
                    return Ok(());
                }
                Err(Error::State {
                    path: python.to_path_buf(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "Python runtime not installed (apt-get install python3)",
                    ),
                })
            }
        }
    }

    /// Parses a handler as written in a registration (`None`: the runtime's default).
    pub fn parse_handler(self, text: Option<&str>) -> Result<Handler, Error> {
        match self {
            Runtime::Python => {
                Handler::parse(text.unwrap_or(PYTHON_DEFAULT_HANDLER)).map_err(Error::InvalidConfig)
            }
        }
    }

    /// The handler's file must exist in the canonical directory `dir` and resolve
    /// (symlinks followed) to a file inside it. Python: the module file, or the
    /// package's `__init__.py`.
    pub fn check_handler(self, dir: &Path, handler: &Handler) -> Result<(), Error> {
        match self {
            Runtime::Python => check_python_module(dir, handler),
        }
    }

    /// The handler's file must be readable by "other": sandboxes run as an
    /// unprivileged user of their own.
    pub fn check_readable(self, dir: &Path, handler: &Handler) -> Result<(), Error> {
        match self {
            Runtime::Python => rootfs::check_module_readable(dir, &handler.module)
                .map_err(|e| Error::InvalidConfig(format!("handler {handler}: {e}"))),
        }
    }

    /// Whether a function of runtime `callee` can run in a sandbox of this one (forked
    /// from its zygote): only the same runtime.
    pub fn runs_callee(self, callee: Runtime) -> bool {
        self == callee
    }
}

/// The Python module file (or package `__init__.py`) of `handler` must exist and
/// resolve to a file inside the canonical directory `dir`.
fn check_python_module(dir: &Path, handler: &Handler) -> Result<(), Error> {
    let file = handler.module_file();
    let package_init = format!("{}/__init__.py", handler.module.replace('.', "/"));
    for rel in [&file, &package_init] {
        let Ok(resolved) = dir.join(rel).canonicalize() else {
            continue;
        };
        if !resolved.starts_with(dir) {
            return Err(Error::HandlerOutsideDir {
                handler: handler.to_string(),
                file: rel.clone(),
                resolved,
                dir: dir.to_path_buf(),
            });
        }
        if resolved.is_file() {
            return Ok(());
        }
    }
    Err(Error::HandlerFileMissing {
        handler: handler.to_string(),
        file,
        dir: dir.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_is_named_as_on_the_wire() {
        assert_eq!(Runtime::Python.name(), "python");
        assert_eq!(Runtime::Python.wire(), ipc::proto::Runtime::Python);
        let h = Runtime::Python.parse_handler(None).unwrap();
        assert_eq!(h.to_string(), PYTHON_DEFAULT_HANDLER);
        assert!(Runtime::Python.runs_callee(Runtime::Python));
    }
}
