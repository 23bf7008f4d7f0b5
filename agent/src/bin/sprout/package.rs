//! `sprout pkg ls|gc`: the daemon's package cache (`GET /packages`,
//! `POST /packages/gc`).

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use ipc::api::PackageInfo;

use crate::{print, Context};

#[derive(Subcommand, Debug)]
pub enum PkgCommand {
    /// List cached packages with their size and the functions using them.
    Ls,
    /// Remove every cached package no registered function uses.
    Gc,
}

pub fn run(cx: &Context, cmd: PkgCommand) -> anyhow::Result<ExitCode> {
    let mut client = cx.client()?;
    let (method, path) = match cmd {
        PkgCommand::Ls => ("GET", "/packages"),
        PkgCommand::Gc => ("POST", "/packages/gc"),
    };
    let resp = client.request(method, path, None, b"")?;
    if resp.status != 200 {
        return print::remote(resp.status, &resp.body, false);
    }
    let list: Vec<PackageInfo> =
        serde_json::from_slice(&resp.body).context("decode the package list")?;
    if matches!(cmd, PkgCommand::Gc) {
        let bytes: u64 = list.iter().map(|p| p.bytes).sum();
        println!("removed {} packages ({})", list.len(), size(bytes));
    }
    print_list(&list, matches!(cmd, PkgCommand::Ls));
    Ok(ExitCode::SUCCESS)
}

fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / f64::from(1 << 20)),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / f64::from(1 << 10)),
        b => format!("{b} B"),
    }
}

fn print_list(list: &[PackageInfo], with_users: bool) {
    if list.is_empty() {
        return;
    }
    println!(
        "{:<6} {:<24} {:<12} {:>10}  {}",
        "KIND",
        "NAME",
        "VERSION",
        "SIZE",
        if with_users { "USERS" } else { "KEY" }
    );
    for p in list {
        let last = if with_users {
            if p.users.is_empty() {
                "-".to_owned()
            } else {
                p.users.join(",")
            }
        } else {
            p.key.clone()
        };
        println!(
            "{:<6} {:<24} {:<12} {:>10}  {}",
            p.kind,
            p.name,
            p.version,
            size(p.bytes),
            last
        );
    }
}
