//! The Node.js runtime: the scripts an instance host's `node` runs
//! (`shim/runtime/nodejs`), installed under `/.sprout/nodejs`.
//!
//! `instance.js` is the entry: it loads one function and runs its invocations on the
//! link to its host (`link.js`); `sprout.js` is the `sprout` module functions call
//! others with and `box.js` Zeep's `@m6s/box`, both resolved to these files whatever
//! a function bundles.

use std::io;
use std::path::Path;

use ipc::sandbox_paths::RUNTIME_DIR;

use super::files::{make_dir, write_file};

/// The interpreter (the host's, from its `/usr`).
pub const INTERPRETER: &str = "/usr/bin/node";

/// The scripts' directory under `/.sprout` (and under the host's runtime directory).
const DIR: &str = "nodejs";

/// The script `node` runs: `/.sprout/nodejs/instance.js`.
pub const ENTRY: &str = "instance.js";

/// Every script of the runtime: its name and source (a test checks this is the
/// whole directory).
pub const SCRIPTS: &[(&str, &str)] = &[
    (
        "instance.js",
        include_str!("../../runtime/nodejs/instance.js"),
    ),
    ("link.js", include_str!("../../runtime/nodejs/link.js")),
    ("sprout.js", include_str!("../../runtime/nodejs/sprout.js")),
    ("box.js", include_str!("../../runtime/nodejs/box.js")),
];

/// The entry script's path in a sandbox.
pub fn entry_path() -> String {
    format!("{RUNTIME_DIR}/{DIR}/{ENTRY}")
}

/// Writes the scripts under `runtime_dir/nodejs`, readable by everyone.
pub fn install(runtime_dir: &Path) -> io::Result<()> {
    let dir = runtime_dir.join(DIR);
    make_dir(&dir)?;
    for (name, source) in SCRIPTS {
        write_file(&dir.join(name), source.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_script_of_the_runtime_is_installed() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("runtime/nodejs");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        on_disk.sort();
        let mut listed: Vec<String> = SCRIPTS.iter().map(|(n, _)| n.to_string()).collect();
        listed.sort();
        assert_eq!(listed, on_disk);
        let installed = tempfile::tempdir().unwrap();
        install(installed.path()).unwrap();
        for (name, source) in SCRIPTS {
            let got = std::fs::read_to_string(installed.path().join(DIR).join(name)).unwrap();
            assert_eq!(&got, source);
        }
    }
}
