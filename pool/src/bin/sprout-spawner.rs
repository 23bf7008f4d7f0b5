//! `sprout-spawner`: the process that builds and destroys sandboxes for a sprout
//! agent. The agent starts it (with its control socket on descriptor 3); it is not
//! meant to be run by hand. See [`pool::spawner_main`].

fn main() -> std::process::ExitCode {
    pool::spawner_main()
}
