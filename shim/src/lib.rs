//! sprout's in-sandbox side: the shim binary (`sprout-shim`, PID 1 of every sandbox)
//! and the language runtimes it starts.
//!
//! This library part is the [`runtime`] seam: the files the agent installs into a
//! sandbox's read-only `/.sprout` directory and the command that starts each
//! runtime's zygote. The shim's behaviour lives in the binary (`src/main.rs`), the
//! Python runtime's in the `sprout_runtime` package (`runtime/python`).

pub mod runtime;
