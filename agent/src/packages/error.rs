//! The package module's one error.

use std::path::PathBuf;
use std::time::Duration;

/// What went wrong with a function's packages.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("requirements.txt line {line} ({text:?}): {problem}")]
    Requirements {
        line: usize,
        text: String,
        problem: String,
    },
    #[error("package.json: {0}")]
    Manifest(String),
    #[error("package-lock.json: {entry}: {problem}")]
    Lock { entry: String, problem: String },
    #[error("could not resolve the requirements: {message}")]
    Resolve { message: String },
    #[error("could not install {package}: {message}")]
    Install { package: String, message: String },
    #[error("the installer answered {what}: {problem}")]
    Installer { what: &'static str, problem: String },
    #[error("installed files in {path}: {problem}")]
    Installed { path: PathBuf, problem: String },
    #[error("the installer {0}")]
    Died(String),
    #[error("the install sandbox: {0}")]
    Sandbox(String),
    #[error("no install sandbox was free within {0:?}: the node runs at most 2 at once (other registrations are installing)")]
    Busy(Duration),
    #[error("installing took longer than its limit of {limit:?} (from --install-timeout){}", if output.is_empty() { String::new() } else { format!("; the installer's last output: {output}") })]
    Timeout { limit: Duration, output: String },
    #[error("{what} {url:?}: {problem}")]
    Source {
        what: &'static str,
        url: String,
        problem: String,
    },
    #[error("package cache {path}")]
    Cache {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Whether the registration was at fault (400), not the node (500, or 503 when
    /// it was only busy: [`Error::Busy`]).
    pub fn is_bad_request(&self) -> bool {
        !matches!(
            self,
            Error::Cache { .. } | Error::Sandbox(_) | Error::Busy(_)
        )
    }
}
