//! Criterion benchmarks of sandbox mechanics (root only): create + delete through the
//! spawner, create + the shim and Python zygote's boot + delete (the zygote importing
//! the runtime's lazy modules ahead, as a daemon's does, and not, as the one-shot
//! CLI's does: `SPROUT_ZYGOTE_LAZY`), freeze + thaw through the cgroup freezer, and
//! forking a function instance from a sandbox's zygote until it has imported its
//! handler.
//!
//! Needs `cargo build --release --workspace --bins` first (for `sprout-shim`). The
//! spawner is forked in `main` before criterion starts any thread.

use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::Criterion;
use ipc::proto::{InstanceLink, LoadSpec, Runtime, ShimLink};
use pool::{Cgroups, Sandbox, Spawner, StateDir};
use rootfs::{Limits, SandboxConfig, Skeleton};

struct Bench {
    state: StateDir,
    cgroups: Cgroups,
    spawner: Spawner,
    skeleton: Skeleton,
    runtime: PathBuf,
    shim: PathBuf,
}

impl Bench {
    fn start() -> Bench {
        let exe = std::env::current_exe().unwrap();
        let shim = exe
            .parent()
            .and_then(Path::parent)
            .unwrap()
            .join("sprout-shim");
        assert!(
            shim.is_file(),
            "{} missing: run `cargo build --release --workspace --bins` first",
            shim.display()
        );
        let cgroups = Cgroups::detect().unwrap();
        let state = StateDir::acquire(Path::new("/run/sprout")).unwrap();
        let skeleton = Skeleton::create(&state.path().join("rootfs")).unwrap();
        let runtime = state.path().join("runtime");
        shim::runtime::install(&runtime).unwrap();
        // target/<profile>/sprout-spawner, found from this binary in deps/.
        let spawner_exe = pool::find_spawner(None).unwrap();
        let spawner = Spawner::start(&spawner_exe, &state, &cgroups).unwrap();
        // As the agent does (see Cgroups::hold_freezer_anchor).
        cgroups
            .hold_freezer_anchor(&state.cgroup_parent().join("freezer-anchor"))
            .unwrap();
        Bench {
            state,
            cgroups,
            spawner,
            skeleton,
            runtime,
            shim,
        }
    }

    /// Writes the bundle of sandbox `name` and returns (id, bundle dir, cgroup).
    fn bundle(&self, name: &str) -> (String, PathBuf, PathBuf) {
        self.bundle_with(name, Vec::new())
    }

    /// [`Bench::bundle`] with `env` (`NAME=value`) in the shim's environment.
    fn bundle_with(&self, name: &str, env: Vec<String>) -> (String, PathBuf, PathBuf) {
        let id = format!("sprout-{}-{name}", self.state.agent_id());
        let cgroup = self.state.cgroup_parent().join(&id);
        let bundle = self.state.bundles().join(&id);
        let spec = rootfs::bundle_spec(&SandboxConfig {
            id: id.clone(),
            root: self.skeleton.path().to_path_buf(),
            cgroups_path: cgroup.clone(),
            runtime_dir: self.runtime.clone(),
            shim: self.shim.clone(),
            code: None,
            limits: Limits {
                memory_bytes: 128 << 20,
                pids: 64,
                cpus: 1.0,
            },
            env,
        })
        .unwrap();
        rootfs::write_bundle(&bundle, &spec).unwrap();
        (id, bundle, cgroup)
    }

    /// A stem cell: created, shim and zygote up.
    fn stem_cell(&self, name: &str) -> (Sandbox, ShimLink) {
        let (id, bundle, cgroup) = self.bundle(name);
        let (mut sandbox, mut shim) = self
            .spawner
            .create(&id, &bundle, cgroup, &self.cgroups, bench_stderr())
            .unwrap();
        shim.wait_ready().unwrap();
        sandbox.ready().unwrap();
        (sandbox, shim)
    }

    fn finish(self) {
        self.spawner.shutdown().unwrap();
        self.state.remove(&self.cgroups).unwrap();
    }
}

/// The sandbox's output pipe end: here the bench's own stderr (the agent makes a
/// pipe it reads instead).
fn bench_stderr() -> std::os::fd::OwnedFd {
    use std::os::fd::AsFd;
    std::io::stderr().as_fd().try_clone_to_owned().unwrap()
}

fn main() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("sandbox benchmarks need root; skipped");
        return;
    }
    let bench = Bench::start();
    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    let mut group = c.benchmark_group("sandbox");

    let (id, bundle, cgroup) = bench.bundle("create");
    group.bench_function("create_start_delete", |b| {
        b.iter(|| {
            let (mut sandbox, _shim) = bench
                .spawner
                .create(&id, &bundle, cgroup.clone(), &bench.cgroups, bench_stderr())
                .unwrap();
            bench.spawner.destroy(&mut sandbox).unwrap();
        })
    });

    for (name, env) in [
        ("create_boot_delete_zygote_preloads", Vec::new()),
        (
            "create_boot_delete_zygote_lazy",
            vec![format!("{}=1", shim::runtime::ZYGOTE_LAZY_ENV)],
        ),
    ] {
        let (id, bundle, cgroup) = bench.bundle_with(name, env);
        group.bench_function(name, |b| {
            b.iter(|| {
                let (mut sandbox, mut shim) = bench
                    .spawner
                    .create(&id, &bundle, cgroup.clone(), &bench.cgroups, bench_stderr())
                    .unwrap();
                shim.wait_ready().unwrap();
                bench.spawner.destroy(&mut sandbox).unwrap();
            })
        });
    }

    let (mut sandbox, _shim) = bench.stem_cell("freezer");
    group.bench_function("freeze_thaw", |b| {
        b.iter(|| {
            sandbox.freeze().unwrap();
            sandbox.thaw().unwrap();
        })
    });
    bench.spawner.destroy(&mut sandbox).unwrap();

    let noop = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("examples/noop");
    let (mut sandbox, mut shim) = bench.stem_cell("zygote");
    bench.spawner.bind_code(&sandbox, &noop).unwrap();
    let mut n = 0;
    let load = LoadSpec {
        env: Default::default(),
        function: "noop".into(),
        code_dir: rootfs::CODE_DIR.into(),
        handler: ipc::proto::Handler::parse("f:f").unwrap(),
        deps: Vec::new(),
        about: Default::default(),
    };
    // The shim's spare serves the first iteration; later ones fork on demand, so this
    // measures the zygote's fork and the instance's load.
    group.bench_function("zygote_fork_to_loaded", |b| {
        b.iter(|| {
            n += 1;
            let spawned = shim.spawn_instance(n, Runtime::Python).unwrap().unwrap();
            let mut link = InstanceLink(spawned.channel);
            link.send_load(&load).unwrap();
            link.wait_loaded().unwrap().unwrap();
            // Dropping the channel ends the instance.
        })
    });
    bench.spawner.destroy(&mut sandbox).unwrap();
    group.finish();
    c.final_summary();
    bench.finish();
}
