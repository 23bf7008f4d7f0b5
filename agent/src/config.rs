//! Agent settings.

use std::path::PathBuf;

/// Limits a function gets when it does not set its own (OpenWhisk-style names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Defaults {
    pub memory_mb: u64,
    pub timeout_ms: u64,
    pub pids: u64,
    pub cpus: f64,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            memory_mb: 128,
            timeout_ms: 60_000,
            pids: 64,
            cpus: 1.0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Parent of every agent's state directory.
    pub state_root: PathBuf,
    /// Host path of the `sprout-shim` binary.
    pub shim: PathBuf,
    pub defaults: Defaults,
    /// Keep instances warm between invocations (the daemon); the embedded CLI does not.
    pub keep_warm: bool,
    /// Captured output kept per stream per invocation; the rest is dropped and flagged.
    pub log_limit: usize,
}

impl Config {
    /// Defaults: state under `/run/sprout`, the shim next to the running binary
    /// (or `$SPROUT_SHIM`).
    pub fn new() -> Config {
        let shim = std::env::var_os("SPROUT_SHIM")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                std::env::current_exe()
                    .ok()
                    .and_then(|p| p.parent().map(|d| d.join("sprout-shim")))
                    .unwrap_or_else(|| PathBuf::from("sprout-shim"))
            });
        Config {
            state_root: PathBuf::from("/run/sprout"),
            shim,
            defaults: Defaults::default(),
            keep_warm: true,
            log_limit: 1 << 20,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config::new()
    }
}
