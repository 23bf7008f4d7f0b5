//! The embedded agent of `sprout invoke DIR` and `sprout workflow run FILE`: started
//! for one command, handed its requests through [`agent::Agent::handle`], shut down.
//! It keeps nothing warm and has no data directory.

use std::path::PathBuf;

use agent::{Agent, Config, FunctionSource, Request, Response};
use anyhow::Context as _;
use ipc::api::FunctionConfig;

use crate::Context;

/// A function directory the command registers.
pub struct FunctionDir {
    pub name: String,
    pub dir: PathBuf,
    pub config: FunctionConfig,
}

impl FunctionDir {
    /// `dir` under the name `sprout invoke` gives it, with default settings.
    pub fn named_by_dir(dir: PathBuf) -> FunctionDir {
        FunctionDir {
            name: agent::function_name_for_dir(&dir),
            dir,
            config: FunctionConfig::default(),
        }
    }
}

/// The embedded agent's settings.
pub fn config(cx: &Context) -> Config {
    Config {
        state_root: cx.state_dir.clone(),
        sandbox_uids: cx.sandbox_uids,
        keep_warm: false,
        data_dir: None,
        ..Config::new()
    }
}

/// Checks the functions as registering them would, in order, so that a typo is
/// refused before anything starts.
pub fn check<'a>(
    functions: impl IntoIterator<Item = &'a FunctionDir>,
    config: &Config,
) -> Result<(), agent::Error> {
    functions
        .into_iter()
        .try_for_each(|f| agent::check_function(&f.name, &f.dir, &f.config, config))
}

/// Starts an agent, registers `functions` and hands it `requests`, in order, then
/// shuts it down. The outer error is starting or stopping the agent; the inner one
/// the first request that failed, else the last response.
pub fn run(
    config: Config,
    namespace: &str,
    functions: &[FunctionDir],
    requests: Vec<Request>,
) -> anyhow::Result<Result<Response, agent::Error>> {
    let agent = Agent::start(config).context("start the embedded agent")?;
    let registrations = functions.iter().map(|f| Request::RegisterFunction {
        namespace: namespace.to_owned(),
        name: f.name.clone(),
        source: FunctionSource::Dir(f.dir.clone()),
        config: f.config.clone(),
    });
    let mut last = None;
    let result = registrations
        .chain(requests)
        .try_for_each(|request| agent.handle(request).map(|r| last = Some(r)))
        .map(|()| last.expect("an embedded run has a request"));
    agent.shutdown().context("shut the embedded agent down")?;
    Ok(result)
}
