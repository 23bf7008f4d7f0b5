//! `sprout status`: the daemon's `GET /status`, as it answers it.

use std::process::ExitCode;

use crate::{print, Context};

pub fn run(cx: &Context) -> anyhow::Result<ExitCode> {
    let resp = cx.client()?.request("GET", "/status", None, b"")?;
    print::remote(resp.status, &resp.body, false)
}
