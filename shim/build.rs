//! Compiles the Python runtime package (`runtime/python/sprout_runtime`) to bytecode
//! at build time, so a sandbox's zygote does not compile ~1,300 lines of Python on
//! every start (~10 ms on the development VM).
//!
//! Uses Debian's `/usr/bin/python3`, the interpreter sandboxes run, and writes, in
//! `OUT_DIR/python/`, one unchecked-hash `<module>.pyc` per module and `cache_tag`
//! (the interpreter's `__pycache__` tag). Without the interpreter (or if it fails)
//! every bytecode file and the tag are empty and the zygote compiles the source as
//! before; the import system also ignores bytecode made for another interpreter.

use std::path::{Path, PathBuf};
use std::process::Command;

const PYTHON: &str = "/usr/bin/python3";
const PACKAGE: &str = "runtime/python/sprout_runtime";
/// Where the package is inside a sandbox (the path the code objects name).
const INSIDE: &str = "/.sprout/python/sprout_runtime";

const COMPILE: &str = r#"
import os, py_compile, sys
package, out, inside = sys.argv[1:]
for name in sorted(os.listdir(package)):
    if name.endswith(".py"):
        py_compile.compile(os.path.join(package, name), cfile=os.path.join(out, name[:-3] + ".pyc"),
                           dfile=inside + "/" + name, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
with open(os.path.join(out, "cache_tag"), "w") as f:
    f.write(sys.implementation.cache_tag)
"#;

fn main() {
    println!("cargo:rerun-if-changed={PACKAGE}");
    println!("cargo:rerun-if-changed={PYTHON}");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("python");
    std::fs::create_dir_all(&out).expect("create OUT_DIR/python");
    let compiled = Command::new(PYTHON)
        .args(["-I", "-B", "-c", COMPILE, PACKAGE])
        .arg(&out)
        .arg(INSIDE)
        .status();
    match compiled {
        Ok(s) if s.success() => {}
        other => {
            println!("cargo:warning=could not compile the Python runtime to bytecode with {PYTHON} ({other:?}); sandboxes will compile it at start");
            write_empty(&out);
        }
    }
}

/// Empty bytecode for every module, and an empty tag: the runtime installs sources only.
fn write_empty(out: &Path) {
    for entry in std::fs::read_dir(PACKAGE).expect("read the runtime package") {
        let name = entry.expect("read the runtime package").file_name();
        if let Some(module) = name.to_str().and_then(|n| n.strip_suffix(".py")) {
            std::fs::write(out.join(format!("{module}.pyc")), b"").expect("write bytecode");
        }
    }
    std::fs::write(out.join("cache_tag"), b"").expect("write the cache tag");
}
