//! The installer of install sandboxes (`shim/runtime/install/installer.py`): PID 1
//! of a sandbox that resolves or installs a function's packages with pip or npm
//! (the agent's `packages` module; `docs/protocol.md`, "Install sandboxes").
//! Installed as `/.sprout/install/installer.py`.

use std::io;
use std::path::Path;

use ipc::sandbox_paths::RUNTIME_DIR;

use super::files::{make_dir, write_file};

const DIR: &str = "install";
const FILE: &str = "installer.py";
const SOURCE: &str = include_str!("../../runtime/install/installer.py");

/// The install sandbox's process: Debian's interpreter, isolated (`-I`), writing no
/// bytecode (`-B`), running the installer.
pub fn command() -> Vec<String> {
    vec![
        super::python::INTERPRETER.to_owned(),
        "-I".to_owned(),
        "-B".to_owned(),
        format!("{RUNTIME_DIR}/{DIR}/{FILE}"),
    ]
}

pub(super) fn install(dir: &Path) -> io::Result<()> {
    let dir = dir.join(DIR);
    make_dir(&dir)?;
    write_file(&dir.join(FILE), SOURCE.as_bytes())
}
