//! `sprout activation get|result|logs|ls`: activation records on the daemon
//! (`GET /activations/{id}[/result|/logs]`, `GET /activations`).

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use ipc::api::{ActivationLogs, ActivationRecord, ActivationResult};

use crate::{print, Context};

#[derive(Subcommand, Debug)]
pub enum ActivationCommand {
    /// The whole record, as JSON.
    Get { id: String },
    /// Its result (the function's, or its error) as JSON; exits 1 unless it succeeded.
    Result { id: String },
    /// Its log lines, `TIME STREAM: text`.
    Logs { id: String },
    /// Records, newest first: one line each.
    Ls {
        /// Only this function's.
        #[arg(long)]
        name: Option<String>,
        /// At most this many (default 30, at most 200).
        #[arg(long)]
        limit: Option<u64>,
        /// Skip this many of the newest first.
        #[arg(long)]
        skip: Option<u64>,
        /// Only those that started at or after this (ms since the epoch).
        #[arg(long, value_name = "MS")]
        since: Option<u64>,
        /// Of every namespace, not only --namespace's.
        #[arg(long)]
        all_namespaces: bool,
    },
}

pub fn run(cx: &Context, cmd: ActivationCommand) -> anyhow::Result<ExitCode> {
    let mut client = cx.client()?;
    let resp = match &cmd {
        ActivationCommand::Get { id } => client.activation(id, "")?,
        ActivationCommand::Result { id } => client.activation(id, "/result")?,
        ActivationCommand::Logs { id } => client.activation(id, "/logs")?,
        ActivationCommand::Ls {
            name,
            limit,
            skip,
            since,
            all_namespaces,
        } => {
            let mut query = Vec::new();
            if !all_namespaces {
                query.push(("namespace", cx.namespace.clone()));
            }
            if let Some(name) = name {
                query.push(("name", name.clone()));
            }
            for (key, value) in [("limit", limit), ("skip", skip), ("since", since)] {
                if let Some(v) = value {
                    query.push((key, v.to_string()));
                }
            }
            client.activations(&query)?
        }
    };
    if resp.status != 200 {
        return print::remote(resp.status, &resp.body, false);
    }
    match cmd {
        ActivationCommand::Get { .. } => {
            let record: ActivationRecord =
                serde_json::from_slice(&resp.body).context("decode the record")?;
            println!("{}", serde_json::to_string_pretty(&record)?);
            Ok(ExitCode::SUCCESS)
        }
        ActivationCommand::Result { .. } => {
            let result: ActivationResult =
                serde_json::from_slice(&resp.body).context("decode the result")?;
            println!("{}", result.result.get());
            Ok(if result.success {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(agent::ErrorKind::Function.exit_code())
            })
        }
        ActivationCommand::Logs { .. } => {
            let logs: ActivationLogs =
                serde_json::from_slice(&resp.body).context("decode the logs")?;
            for line in logs.logs {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        ActivationCommand::Ls { .. } => {
            let list: Vec<ActivationRecord> =
                serde_json::from_slice(&resp.body).context("decode the listing")?;
            print_list(&list);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_list(list: &[ActivationRecord]) {
    if list.is_empty() {
        return;
    }
    println!(
        "{:<32}  {:<24} {:<22} {:>8} {:>8}  START",
        "ID", "FUNCTION", "STATUS", "DURATION", "WAIT"
    );
    for r in list {
        let function = if r.namespace == ipc::api::DEFAULT_NAMESPACE {
            r.name.clone()
        } else {
            format!("{}/{}", r.namespace, r.name)
        };
        let start = humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(r.start),
        );
        println!(
            "{:<32}  {:<24} {:<22} {:>6}ms {:>6}ms  {start}",
            r.activation_id,
            function,
            r.status.as_str(),
            r.duration,
            r.wait_time
        );
    }
}
