//! The sprout node agent.
//!
//! [`Agent`] is what a controller links: it registers functions, creates sandboxes
//! through the [`pool`] spawner, keeps warm function instances, and runs invocations.
//! Every transport turns its input into one [`Request`] and gets one [`Response`]
//! back from [`Agent::handle`]: the `sprout` CLI (embedded, no daemon), the
//! Unix-socket HTTP API ([`http`]) and a linking controller alike.
//!
//! [`Agent::start`] starts the spawner by executing `sprout-spawner` (see
//! [`Config::spawner`]), so it may run in a process that already runs threads.

// Errors carry the captured output of a failed invocation; they are built once per
// failure, so their size does not matter.
#![allow(clippy::result_large_err)]

pub mod activations;
pub mod admission;
mod agent;
mod async_invoke;
mod calls;
mod config;
pub mod data_dir;
mod error;
#[cfg(feature = "http")]
pub mod http;
mod http_app;
mod instance;
mod invoke;
mod manager;
pub mod metrics;
mod names;
pub mod openwhisk;
pub mod packages;
mod registrations;
mod registry;
mod request;
mod run;
mod runs;
mod runtime;
mod sandbox_output;
mod sandboxes;
mod scheduler;
pub mod transport;
pub mod upload;
mod workflow;
mod zygotes;

pub use admission::{Limits as NamespaceLimit, NamespaceLimits};
pub use agent::Agent;
pub use config::{
    default_memory_budget_mb, Config, Defaults, NewSandboxes, PoolConfig, StemCells,
    DEFAULT_ASYNC_WORKERS, DEFAULT_MAX_QUEUE, DEFAULT_PACKAGE_ZYGOTES_MB,
};
pub use data_dir::DataDir;
pub use error::{Error, ErrorKind, EXIT_BAD_REQUEST, EXIT_FUNCTION, EXIT_INTERNAL, EXIT_LIMITED};
pub use names::{
    from_openwhisk, to_openwhisk, validate_namespace, FunctionKey, DEFAULT_NAMESPACE,
    NAMESPACE_RULE,
};
pub use packages::{InstallLimits, Sources as PackageSources};
pub use request::{
    ActivationPart, FunctionSource, Invocation, Request, Response, RunRequest, Start,
    WorkflowOutput,
};
pub use workflow::Workflow;

/// The name `sprout invoke DIR` registers a function directory under.
pub fn function_name_for_dir(dir: &std::path::Path) -> String {
    registry::name_from_dir(dir)
}

/// Checks a function as registering it would (name, directory, handler file and its
/// readability by "other", which is how sandboxes read it, limits) without an agent,
/// so a CLI can refuse bad input before starting anything. `agent` is the configuration the agent will start
/// with; registering checks again with the agent's own.
pub fn check_function(
    name: &str,
    dir: &std::path::Path,
    config: &ipc::api::FunctionConfig,
    agent: &Config,
) -> Result<(), Error> {
    let key = names::FunctionKey::in_default(name)?;
    registry::Function::new(&key, dir, config, agent, 0, false).map(drop)
}
