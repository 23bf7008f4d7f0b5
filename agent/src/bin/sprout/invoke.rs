//! `sprout invoke`: a function directory on an embedded agent, or with `--socket` or `--url` a
//! registered function on the daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use agent::{Request, Response};
use anyhow::{bail, Context as _};
use clap::Args;
use ipc::api::{FunctionConfig, InvocationRecord};
use ipc::client::Client;

use crate::embedded::{self, FunctionDir};
use crate::{print, Context, LimitArgs};

#[derive(Args, Debug)]
pub struct InvokeArgs {
    /// Function directory, or its name on the daemon.
    function: String,
    /// Event JSON; `-` reads it from stdin.
    #[arg(default_value = "{}")]
    event: String,
    #[command(flatten)]
    limits: LimitArgs,
    /// Also print what the function wrote to stdout/stderr (on stderr).
    #[arg(long)]
    logs: bool,
    /// Also register this function directory (embedded agent), for the function to
    /// call by its directory's name; repeatable.
    #[arg(long = "with", value_name = "DIR")]
    with: Vec<PathBuf>,
    /// Do not wait (daemon only): print the activation's id once it is accepted;
    /// read its outcome with `sprout activation get|result|logs ID`.
    #[arg(long = "async", conflicts_with = "logs")]
    asynchronous: bool,
}

pub fn run(cx: &Context, args: InvokeArgs) -> anyhow::Result<ExitCode> {
    let event = crate::read_event(&args.event)?;
    match cx.remote() {
        true => {
            if args.limits.config() != FunctionConfig::default() || !args.with.is_empty() {
                bail!("--handler/--memory/--timeout/--pids/--cpus/--with belong to `sprout fn add` when using a daemon");
            }
            let mut client = cx.client()?;
            if args.asynchronous {
                let resp = client.invoke_async(&cx.namespace, &args.function, &event)?;
                if resp.status != 202 {
                    return print::remote(resp.status, &resp.body, false);
                }
                let accepted: ipc::api::ActivationAccepted =
                    serde_json::from_slice(&resp.body).context("decode the acceptance")?;
                println!("{}", accepted.activation_id);
                return Ok(ExitCode::SUCCESS);
            }
            remote(client, &cx.namespace, &args.function, &event, args.logs)
        }
        false if args.asynchronous => {
            bail!("--async needs a daemon (--socket or --url): the embedded agent keeps no records")
        }
        false => embedded(cx, args, event),
    }
}

fn embedded(cx: &Context, args: InvokeArgs, event: Vec<u8>) -> anyhow::Result<ExitCode> {
    let dir = PathBuf::from(&args.function);
    // Check the function before starting anything, so a typo leaves nothing behind.
    if !dir.is_dir() {
        bail!(
            "function directory {} does not exist or is not a directory",
            dir.display()
        );
    }
    let config = embedded::config(cx);
    let function = FunctionDir {
        config: args.limits.config(),
        ..FunctionDir::named_by_dir(dir)
    };
    let others: Vec<FunctionDir> = args
        .with
        .into_iter()
        .map(FunctionDir::named_by_dir)
        .collect();
    if let Err(e) = embedded::check(std::iter::once(&function).chain(&others), &config) {
        return Ok(print::agent_error(&e, false));
    }
    let invoke = Request::Invoke {
        namespace: cx.namespace.clone(),
        name: function.name.clone(),
        event,
        activation_id: None,
        blocking: true,
    };
    // The function itself last: it replaces a `--with` of the same name.
    let mut functions = others;
    functions.push(function);
    match embedded::run(config, &cx.namespace, &functions, vec![invoke])? {
        Ok(Response::Invoked(inv)) => {
            if args.logs {
                print::logs(&inv.logs);
            }
            Ok(print::result(&inv.result))
        }
        Ok(other) => bail!("unexpected response {other:?}"),
        Err(e) => Ok(print::agent_error(&e, args.logs)),
    }
}

fn remote(
    mut client: Client,
    namespace: &str,
    name: &str,
    event: &[u8],
    logs: bool,
) -> anyhow::Result<ExitCode> {
    let rest = if logs { "/invoke?logs=true" } else { "/invoke" };
    let path = ipc::api::function_path(namespace, name, rest);
    let resp = client.request("POST", &path, Some("application/json"), event)?;
    if resp.status == 200 && logs {
        let record: InvocationRecord =
            serde_json::from_slice(&resp.body).context("decode invocation record")?;
        print::logs(&record.logs);
        println!("{}", record.result.get());
        return Ok(ExitCode::SUCCESS);
    }
    print::remote(resp.status, &resp.body, logs)
}
