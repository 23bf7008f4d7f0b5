//! Compiles the Python runtime to bytecode at build time, so a sandbox's zygote does
//! not compile ~1,300 lines of Python on every start (~10 ms on the development VM).
//!
//! Uses Debian's `/usr/bin/python3`, the interpreter sandboxes run. Without it (or if
//! it fails) the bytecode is empty and the zygote compiles the source as before; the
//! zygote also falls back when the bytecode's magic number is not its interpreter's.

use std::path::PathBuf;
use std::process::Command;

const PYTHON: &str = "/usr/bin/python3";
const SOURCE: &str = "runtime/python/sprout_runtime.py";
/// The path the code object names (tracebacks, and the runtime's own `__file__`).
const INSIDE: &str = "/.sprout/python/sprout_runtime.py";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-changed={PYTHON}");
    let out =
        PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("sprout_runtime.pyc");
    let compiled = Command::new(PYTHON)
        .args([
            "-I",
            "-c",
            "import py_compile, sys; py_compile.compile(sys.argv[1], cfile=sys.argv[2], dfile=sys.argv[3], doraise=True, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)",
            SOURCE,
        ])
        .arg(&out)
        .arg(INSIDE)
        .status();
    match compiled {
        Ok(s) if s.success() => {}
        other => {
            println!("cargo:warning=could not compile the Python runtime to bytecode with {PYTHON} ({other:?}); sandboxes will compile it at start");
            std::fs::write(&out, b"").expect("write an empty bytecode file");
        }
    }
}
