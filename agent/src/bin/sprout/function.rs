//! `sprout fn add|ls|rm`: functions registered on the daemon. `fn add --upload` sends
//! the directory as a tar archive (the daemon unpacks it with `agent::upload`) and
//! its settings in the query string.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use ipc::api::{FunctionConfig, FunctionInfo, RegisterFunction};
use ipc::client::{Client, ClientResponse};

use crate::{print, Context, LimitArgs};

#[derive(Subcommand, Debug)]
pub enum FnCommand {
    /// Register (or replace) a function from a directory.
    Add {
        name: String,
        dir: PathBuf,
        #[command(flatten)]
        limits: LimitArgs,
        /// Upload the directory as a tar archive instead of passing its path.
        #[arg(long)]
        upload: bool,
    },
    /// List registered functions.
    Ls,
    /// Remove a function and its warm instances.
    Rm { name: String },
}

pub fn run(cx: &Context, cmd: FnCommand) -> anyhow::Result<ExitCode> {
    let mut client = cx.client()?;
    let ns = cx.namespace.as_str();
    let resp = match cmd {
        FnCommand::Add {
            name,
            dir,
            limits,
            upload,
        } => add(
            &mut client,
            ns,
            &name,
            &dir,
            limits.config(),
            upload || cx.over_tcp(),
        )?,
        FnCommand::Ls => {
            let resp = client.request("GET", &ipc::api::function_path(ns, "", ""), None, b"")?;
            if resp.status == 200 {
                let list: Vec<FunctionInfo> =
                    serde_json::from_slice(&resp.body).context("decode function list")?;
                print_list(&list);
                return Ok(ExitCode::SUCCESS);
            }
            resp
        }
        FnCommand::Rm { name } => {
            client.request("DELETE", &ipc::api::function_path(ns, &name, ""), None, b"")?
        }
    };
    print::remote(resp.status, &resp.body, false)
}

/// `PUT /functions/{name}`: the directory's path as JSON, or with `upload` the
/// directory itself as a tar archive (over TCP, always: a path means nothing there).
pub fn add(
    client: &mut Client,
    namespace: &str,
    name: &str,
    dir: &Path,
    config: FunctionConfig,
    upload: bool,
) -> anyhow::Result<ClientResponse> {
    let abs = dir
        .canonicalize()
        .with_context(|| format!("function directory {}", dir.display()))?;
    let resp = if upload {
        let body = archive(&abs)?;
        let path = ipc::api::function_path(namespace, name, &upload_query(&config)?);
        client.request("PUT", &path, Some("application/x-tar"), &body)?
    } else {
        let body = serde_json::to_vec(&RegisterFunction {
            path: abs.display().to_string(),
            config,
            ..Default::default()
        })?;
        let path = ipc::api::function_path(namespace, name, "");
        client.request("PUT", &path, Some("application/json"), &body)?
    };
    Ok(resp)
}

/// The tar archive of `dir`'s contents, paths relative to it; a symbolic link is
/// archived as a link (the daemon refuses it), never followed.
fn archive(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    tar.follow_symlinks(false);
    tar.append_dir_all(".", dir)
        .with_context(|| format!("archive {}", dir.display()))?;
    tar.into_inner().context("finish archive")
}

/// `?key=value&...` for the settings that are set (empty when none), encoded so that
/// any value round-trips: a space is `%20`, which both a form decoder and a plain
/// percent-decoder read back as a space (a `+` in a value is `%2B`).
fn upload_query(config: &FunctionConfig) -> anyhow::Result<String> {
    let query = serde_urlencoded::to_string(config).context("encode the function's settings")?;
    Ok(if query.is_empty() {
        query
    } else {
        format!("?{}", query.replace('+', "%20"))
    })
}

fn print_list(list: &[FunctionInfo]) {
    println!(
        "{:<24} {:<16} {:<8} {:<8} {:<16} {:>7} {:>9} {:>5}  PATH",
        "NAME", "NAMESPACE", "RUNTIME", "NETWORK", "HANDLER", "MEM_MB", "TIMEOUT", "WARM"
    );
    for f in list {
        println!(
            "{:<24} {:<16} {:<8} {:<8} {:<16} {:>7} {:>9} {:>5}  {}",
            f.name,
            f.namespace,
            f.runtime,
            f.network,
            f.handler,
            f.memory_mb,
            f.timeout_ms,
            f.warm_instances,
            f.path
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_settings_round_trip_through_the_query() {
        assert_eq!(upload_query(&FunctionConfig::default()).unwrap(), "");
        for handler in ["m:f", "a&b=c", "with space", "100%", "x+y", "%20&=+ é"] {
            let config = FunctionConfig {
                runtime: Some("nodejs".to_owned()),
                network: None,
                handler: Some(handler.to_owned()),
                memory_mb: Some(256),
                timeout_ms: Some(1500),
                pids: Some(8),
                cpus: Some(0.5),
                max_instances: Some(3),
            };
            let query = upload_query(&config).unwrap();
            let encoded = query.strip_prefix('?').unwrap();
            assert!(
                !encoded.contains(' ') && !encoded.contains('+'),
                "{handler:?}: {query}"
            );
            assert_eq!(
                encoded.split('&').count(),
                7,
                "{handler:?}: one pair per setting: {query}"
            );
            let back: FunctionConfig = serde_urlencoded::from_str(encoded).unwrap();
            assert_eq!(back, config, "{handler:?}: {query}");
        }
        let only = FunctionConfig {
            memory_mb: Some(64),
            ..FunctionConfig::default()
        };
        assert_eq!(upload_query(&only).unwrap(), "?memory_mb=64");
    }

    #[test]
    fn an_archive_unpacks_to_the_directory() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir(src.path().join("pkg")).unwrap();
        std::fs::write(src.path().join("f.py"), "def f(event):\n    return 1\n").unwrap();
        std::fs::write(src.path().join("pkg/m.py"), "x = 1\n").unwrap();
        let body = archive(src.path()).unwrap();
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("code");
        agent::upload::unpack(&body, &dest, &agent::upload::Limits::default()).unwrap();
        assert_eq!(
            std::fs::read_to_string(dest.join("pkg/m.py")).unwrap(),
            "x = 1\n"
        );
        assert!(dest.join("f.py").is_file());
    }
}
