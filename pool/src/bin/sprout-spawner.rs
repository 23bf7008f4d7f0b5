//! `sprout-spawner`: the process that builds and destroys sandboxes for a sprout
//! agent. The agent starts it (with its control socket on descriptor 3); it is not
//! meant to be run by hand. See [`pool::spawner_main`]. This executable only installs
//! the log subscriber (stderr, filtered by `SPROUT_LOG`; colours only on a terminal
//! and without `NO_COLOR`), so the library never pulls one in.

use std::io::IsTerminal;

fn main() -> std::process::ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SPROUT_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,libcgroups=error,libcontainer=warn")
    });
    let colours = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colours)
        .init();
    pool::spawner_main()
}
