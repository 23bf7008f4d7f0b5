//! The runtime seam: everything the agent knows that differs between language
//! runtimes, in one place.
//!
//! - how a handler is written and found in a function directory
//!   ([`Seam::parse_handler`], [`Seam::check_handler`], [`Seam::check_readable`]);
//! - what must be installed on the host for its zygote to start
//!   ([`Seam::check_installed`]: the interpreter the shim's seam names);
//! - what a stem cell is keyed by: a stem cell runs one runtime's zygote, so the
//!   scheduler keeps its stem cells per [`Runtime`];
//! - what a callee needs to run in its caller's sandbox: the same runtime
//!   ([`Seam::runs_callee`]), since it is forked from that sandbox's zygote.
//!
//! The runtimes themselves are the protocol's enum ([`Runtime`], re-exported), so the
//! agent and the shim name them the same way.
//!
//! Python is the only member. Adding a runtime is adding a variant and its arms here
//! (and its zygote in the shim).

use std::path::Path;

use ipc::api::FunctionConfig;
use ipc::proto::Handler;

use crate::error::Error;

/// The handler OpenLambda uses: `f.py` with `def f(event)`.
pub const PYTHON_DEFAULT_HANDLER: &str = "f:f";

pub use ipc::proto::Runtime;

/// The runtime a registration asks for (Python when it names none).
pub fn of(config: &FunctionConfig) -> Result<Runtime, Error> {
    let Some(name) = config.runtime.as_deref() else {
        return Ok(Runtime::Python);
    };
    Runtime::ALL
        .into_iter()
        .find(|r| r.name() == name)
        .ok_or_else(|| {
            Error::InvalidConfig(format!(
                "unknown runtime {name:?} (python, nodejs or native)"
            ))
        })
}

/// The agent's side of the runtime seam, over the protocol's [`Runtime`].
pub trait Seam: Copy {
    fn check_installed(self) -> Result<(), Error>;
    fn parse_handler(self, text: Option<&str>) -> Result<Handler, Error>;
    fn check_handler(self, dir: &Path, handler: &Handler) -> Result<(), Error>;
    fn check_readable(self, dir: &Path, handler: &Handler) -> Result<(), Error>;
    fn runs_callee(self, callee: Runtime) -> bool;
}

impl Seam for Runtime {
    /// Checks that what starts its zygote is installed on the host.
    fn check_installed(self) -> Result<(), Error> {
        match self {
            Runtime::Python | Runtime::Nodejs => {
                // The interpreter the shim's seam starts the runtime with.
                let Some(interpreter) = shim::runtime::interpreter(self) else {
                    return Ok(());
                };
                let interpreter = Path::new(interpreter);
                if interpreter.is_file() {
                    return Ok(());
                }
                Err(Error::State {
                    path: interpreter.to_path_buf(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("{} runtime not installed", self.name()),
                    ),
                })
            }
            Runtime::Native => Ok(()),
        }
    }

    /// Parses a handler as written in a registration (`None`: the runtime's default).
    fn parse_handler(self, text: Option<&str>) -> Result<Handler, Error> {
        match self {
            Runtime::Python => {
                Handler::parse(text.unwrap_or(PYTHON_DEFAULT_HANDLER)).map_err(Error::InvalidConfig)
            }
            // `file.export` or `file:export`; none: the directory's module itself.
            Runtime::Nodejs => {
                let text = text.unwrap_or("");
                let (module, function) = text.split_once([':', '.']).unwrap_or((text, ""));
                Ok(Handler {
                    module: module.to_owned(),
                    function: function.to_owned(),
                })
            }
            // The executable's file name.
            Runtime::Native => Ok(Handler {
                module: text.unwrap_or("exec").to_owned(),
                function: String::new(),
            }),
        }
    }

    /// The handler's file must exist in the canonical directory `dir` and resolve
    /// (symlinks followed) to a file inside it. Python: the module file, or the
    /// package's `__init__.py`.
    fn check_handler(self, dir: &Path, handler: &Handler) -> Result<(), Error> {
        match self {
            Runtime::Python => check_python_module(dir, handler),
            Runtime::Nodejs | Runtime::Native => Ok(()),
        }
    }

    /// The handler's file must be readable by "other": sandboxes run as an
    /// unprivileged user of their own.
    fn check_readable(self, dir: &Path, handler: &Handler) -> Result<(), Error> {
        match self {
            Runtime::Python => rootfs::check_module_readable(dir, &handler.module)
                .map_err(|e| Error::InvalidConfig(format!("handler {handler}: {e}"))),
            Runtime::Nodejs | Runtime::Native => Ok(()),
        }
    }

    /// Whether a function of runtime `callee` can run in a sandbox of this one (forked
    /// from its zygote): only the same runtime.
    fn runs_callee(self, callee: Runtime) -> bool {
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
        let h = Runtime::Python.parse_handler(None).unwrap();
        assert_eq!(h.to_string(), PYTHON_DEFAULT_HANDLER);
        assert!(Runtime::Python.runs_callee(Runtime::Python));
    }
}
