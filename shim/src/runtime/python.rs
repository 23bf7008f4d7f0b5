//! The Python runtime: the `sprout_runtime` package (`shim/runtime/python`), its
//! bytecode, and the bootstrap that starts its zygote.
//!
//! Installed under `/.sprout/python`: `sprout_runtime/<module>.py` and, when `build.rs`
//! could compile them, `sprout_runtime/__pycache__/<module>.<tag>.pyc` (unchecked-hash
//! bytecode, so the interpreter never reads the sources to check it). The import
//! system uses the bytecode when it was made for the sandbox's interpreter (the tag
//! and magic number match) and compiles the source otherwise.

use std::io;
use std::path::Path;

use ipc::sandbox_paths::RUNTIME_DIR;

use super::files::{make_dir, write_file, ZygoteCommand};

/// The interpreter (Debian's, from the host's `/usr`).
pub const INTERPRETER: &str = "/usr/bin/python3";

/// What the shim runs with `python3 -I -B -c`, given the directory that holds the
/// package: imports it, then runs the zygote.
pub const BOOTSTRAP: &str = include_str!("../../runtime/python/bootstrap.py");

/// The package's directory under `/.sprout` (and under the host's runtime directory).
const DIR: &str = "python";
const PACKAGE: &str = "sprout_runtime";

/// The interpreter's `__pycache__` tag the bytecode was made for (`cpython-311`), or
/// empty when `build.rs` made none.
pub const CACHE_TAG: &str = include_str!(concat!(env!("OUT_DIR"), "/python/cache_tag"));

/// One module of the package: its source and its bytecode (empty when there is none).
#[derive(Debug)]
pub struct Module {
    pub name: &'static str,
    pub source: &'static str,
    pub bytecode: &'static [u8],
}

macro_rules! module {
    ($name:literal) => {
        Module {
            name: $name,
            source: include_str!(concat!(
                "../../runtime/python/sprout_runtime/",
                $name,
                ".py"
            )),
            bytecode: include_bytes!(concat!(env!("OUT_DIR"), "/python/", $name, ".pyc")),
        }
    };
}

/// Every module of the package (a test checks this is the whole directory).
pub const MODULES: &[Module] = &[
    module!("__init__"),
    module!("codec"),
    module!("errors"),
    module!("sdk"),
    module!("instance"),
    module!("http_app"),
    module!("zygote"),
    module!("enter"),
];

/// `python3 -I -B -c <bootstrap> /.sprout/python`: isolated from the environment's
/// Python settings, writing no bytecode.
pub fn zygote_command() -> ZygoteCommand {
    ZygoteCommand {
        program: INTERPRETER,
        args: vec![
            "-I".into(),
            "-B".into(),
            "-c".into(),
            BOOTSTRAP.into(),
            format!("{RUNTIME_DIR}/{DIR}"),
        ],
        env: Vec::new(),
    }
}

/// Writes the package (and its bytecode, if any) under `runtime_dir/python`.
pub fn install(runtime_dir: &Path) -> io::Result<()> {
    let dir = runtime_dir.join(DIR);
    let package = dir.join(PACKAGE);
    let cache = package.join("__pycache__");
    make_dir(&dir)?;
    make_dir(&package)?;
    let with_bytecode = !CACHE_TAG.is_empty() && MODULES.iter().all(|m| !m.bytecode.is_empty());
    if with_bytecode {
        make_dir(&cache)?;
    }
    for m in MODULES {
        write_file(&package.join(format!("{}.py", m.name)), m.source.as_bytes())?;
        if with_bytecode {
            let pyc = cache.join(format!("{}.{CACHE_TAG}.pyc", m.name));
            write_file(&pyc, m.bytecode)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::process::{Command, Stdio};

    fn interpreter_says(expr: &str) -> Vec<u8> {
        Command::new(INTERPRETER)
            .args([
                "-I",
                "-c",
                &format!("import importlib.util, sys; sys.stdout.buffer.write({expr})"),
            ])
            .output()
            .expect("run /usr/bin/python3")
            .stdout
    }

    #[test]
    fn the_runtime_bytecode_is_for_the_sandbox_interpreter() {
        let magic = interpreter_says("importlib.util.MAGIC_NUMBER");
        for m in MODULES {
            assert_eq!(m.bytecode.get(..4), Some(&magic[..]), "{}", m.name);
        }
        let tag = interpreter_says("sys.implementation.cache_tag.encode()");
        assert_eq!(CACHE_TAG.as_bytes(), &tag[..]);
    }

    #[test]
    fn every_module_of_the_package_is_installed() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("runtime/python/sprout_runtime");
        let mut on_disk: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().into_string().unwrap();
                name.strip_suffix(".py").map(str::to_owned)
            })
            .collect();
        on_disk.sort();
        let mut listed: Vec<String> = MODULES.iter().map(|m| m.name.to_owned()).collect();
        listed.sort();
        assert_eq!(listed, on_disk);
    }

    #[test]
    fn the_bootstrap_runs_the_runtime_from_bytecode_or_source() {
        // Where the zygote fails without its channel on fd 3, in the source as built.
        let zygote = MODULES.iter().find(|m| m.name == "zygote").unwrap().source;
        let line = 1 + zygote
            .lines()
            .position(|l| l.contains("os.fstat(fd)  # fail loudly"))
            .expect("the zygote checks its channel");
        for with_pyc in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            super::super::install(dir.path()).unwrap();
            let package = dir.path().join("python/sprout_runtime");
            if !with_pyc {
                fs::remove_dir_all(package.join("__pycache__")).unwrap();
            }
            // One line more at the top of the installed source: the bytecode (which
            // is never checked against it) still fails at `line`, the source one later.
            let source = package.join("zygote.py");
            let edited = format!("# edited\n{}", fs::read_to_string(&source).unwrap());
            fs::write(&source, edited).unwrap();
            let mut command = zygote_command();
            *command.args.last_mut().unwrap() = dir.path().join("python").display().to_string();
            let out = Command::new(command.program)
                .args(&command.args)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{err}");
            assert!(
                err.contains("in zygote_main") && err.contains("Bad file descriptor"),
                "{err}"
            );
            let ran_at = if with_pyc { line } else { line + 1 };
            assert!(
                err.contains(&format!("zygote.py\", line {ran_at}, in zygote_main")),
                "{err}"
            );
        }
    }
}
