//! The Node.js runtime: the scripts an instance host's `node` runs, installed under
//! `/.sprout/nodejs`.

use std::io;
use std::path::Path;

/// The interpreter (the host's, from its `/usr`).
pub const INTERPRETER: &str = "/usr/bin/node";

/// Writes the runtime's scripts under `runtime_dir/nodejs`.
pub fn install(_runtime_dir: &Path) -> io::Result<()> {
    Ok(())
}
