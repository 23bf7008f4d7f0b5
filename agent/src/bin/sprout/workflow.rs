//! `sprout workflow run`: a workflow file on an embedded agent, or with `--socket` or
//! `--url` on the daemon.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use agent::{Request, Response, Workflow, EXIT_BAD_REQUEST};
use anyhow::{bail, Context as _};
use clap::Subcommand;
use ipc::api::FunctionConfig;

use crate::embedded::{self, FunctionDir};
use crate::{print, Context};

#[derive(Subcommand, Debug)]
pub enum WorkflowCommand {
    /// Run a workflow file on INPUT: embedded (its "functions" are registered from
    /// their directories first) or, with --socket or --url, on the daemon (which
    /// registers its "functions", by path on the socket or uploaded over TCP, and the
    /// workflow under the file's name).
    Run {
        file: PathBuf,
        /// Input JSON; `-` reads it from stdin.
        #[arg(default_value = "{}")]
        input: String,
    },
}

pub fn run(cx: &Context, cmd: WorkflowCommand) -> anyhow::Result<ExitCode> {
    let WorkflowCommand::Run { file, input } = cmd;
    let input = crate::read_event(&input)?;
    let text =
        std::fs::read(&file).with_context(|| format!("read workflow file {}", file.display()))?;
    let workflow = match Workflow::parse(&text) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("sprout: {}: {}", file.display(), ipc::chain(&e));
            return Ok(ExitCode::from(EXIT_BAD_REQUEST));
        }
    };
    // The file's "functions" are directories relative to the file.
    let base = file.parent().unwrap_or(Path::new("."));
    let functions: Vec<FunctionDir> = workflow
        .functions
        .iter()
        .map(|(name, dir)| FunctionDir {
            name: name.clone(),
            dir: base.join(dir),
            config: FunctionConfig::default(),
        })
        .collect();
    let name = agent::function_name_for_dir(&file.with_extension(""));
    if cx.remote() {
        remote(cx, &name, &text, &functions, &input)
    } else {
        embedded(cx, &name, workflow, &functions, input)
    }
}

fn embedded(
    cx: &Context,
    name: &str,
    workflow: Workflow,
    functions: &[FunctionDir],
    input: Vec<u8>,
) -> anyhow::Result<ExitCode> {
    let config = embedded::config(cx);
    if let Err(e) = embedded::check(functions, &config) {
        return Ok(print::agent_error(&e, false));
    }
    let requests = vec![
        Request::RegisterWorkflow {
            namespace: cx.namespace.clone(),
            name: name.to_owned(),
            workflow,
        },
        Request::RunWorkflow {
            namespace: cx.namespace.clone(),
            name: name.to_owned(),
            input,
        },
    ];
    match embedded::run(config, &cx.namespace, functions, requests)? {
        Ok(Response::WorkflowRan(out)) => Ok(print::result(&out.result)),
        Ok(other) => bail!("unexpected response {other:?}"),
        Err(e) => Ok(print::agent_error(&e, false)),
    }
}

/// Registers the file's functions (by path on the Unix socket, uploaded over TCP)
/// and the workflow on the daemon, and runs it.
fn remote(
    cx: &Context,
    name: &str,
    text: &[u8],
    functions: &[FunctionDir],
    input: &[u8],
) -> anyhow::Result<ExitCode> {
    let namespace = cx.namespace.as_str();
    let mut client = cx.client()?;
    for f in functions {
        let resp = crate::function::add(
            &mut client,
            namespace,
            &f.name,
            &f.dir,
            f.config.clone(),
            cx.over_tcp(),
        )?;
        if resp.status != 200 {
            return print::remote(resp.status, &resp.body, false);
        }
    }
    // The daemon resolves the functions by their registrations, not the file's paths.
    let mut doc: serde_json::Value = serde_json::from_slice(text)?;
    if let Some(obj) = doc.as_object_mut() {
        obj.remove("functions");
    }
    let resp = client.request(
        "PUT",
        &ipc::api::workflow_path(namespace, name, ""),
        Some("application/json"),
        &serde_json::to_vec(&doc)?,
    )?;
    if resp.status != 200 {
        return print::remote(resp.status, &resp.body, false);
    }
    let resp = client.request(
        "POST",
        &ipc::api::workflow_path(namespace, name, "/invoke"),
        Some("application/json"),
        input,
    )?;
    print::remote(resp.status, &resp.body, false)
}
