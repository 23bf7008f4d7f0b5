//! Replays the `frames` fuzz target's corpus (`ipc/fuzz/corpus/frames`, kept small
//! and minimised; every crash input found is kept there too) as an ordinary test:
//! each input through the same harness the fuzzer runs, which panics when a rule
//! breaks. The target itself runs under `cargo fuzz` (docs/security.md, "Fuzzing").

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The system allocator, noting the largest allocation each thread makes, so a test
/// can check that a peer's bytes cost memory in proportion to what it sent.
struct Peak;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: nothing to note while the thread's locals are being torn down.
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

// SAFETY: every call is passed to `System` unchanged; `note` does not allocate.
unsafe impl GlobalAlloc for Peak {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller upholds `alloc`'s contract, which `System` shares.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as for `dealloc`; `new_size` is the caller's, checked by `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Peak = Peak;

/// The largest single allocation a channel may make for an input of `len` bytes: its
/// buffer grows with what arrived (at most twice that, plus a read's room), never with
/// what a prefix announces. `cargo fuzz` runs check the same with `-malloc_limit_mb`.
fn allocation_bound(len: usize) -> usize {
    2 * len + 2 * ipc::frame::READ_CHUNK + (64 << 10)
}

#[path = "../fuzz/fuzz_targets/harness.rs"]
#[allow(dead_code)]
mod harness;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/frames")
}

fn inputs() -> Vec<(PathBuf, Vec<u8>)> {
    let dir = corpus();
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let bytes = fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
            (p, bytes)
        })
        .collect()
}

fn open_fds() -> usize {
    fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

#[test]
fn corpus_replays_cleanly() {
    let inputs = inputs();
    assert!(
        inputs.len() >= 10,
        "the corpus at {} has {} inputs: it was lost",
        corpus().display(),
        inputs.len()
    );
    let started = Instant::now();
    for (path, bytes) in &inputs {
        // A panic names the input: rerun it with `cargo fuzz run frames <file>`.
        LARGEST.with(|l| l.set(0));
        let outcome = std::panic::catch_unwind(|| harness::run(bytes))
            .unwrap_or_else(|_| panic!("input {} broke a rule", path.display()));
        assert!(!outcome.end.is_empty(), "{}: {outcome:?}", path.display());
        let largest = LARGEST.with(Cell::get);
        assert!(
            largest <= allocation_bound(bytes.len()),
            "{}: {} bytes in made the receiver allocate {largest} bytes at once",
            path.display(),
            bytes.len()
        );
    }
    eprintln!(
        "replayed {} inputs in {:?}",
        inputs.len(),
        started.elapsed()
    );
}

#[test]
fn replay_closes_every_descriptor() {
    // Other tests of this binary open descriptors concurrently: count around a
    // replay in this thread only when it runs alone, retrying to rule out noise.
    let inputs = inputs();
    for attempt in 0.. {
        let before = open_fds();
        for (_, bytes) in &inputs {
            harness::run(bytes);
        }
        let after = open_fds();
        if after <= before {
            return;
        }
        assert!(
            attempt < 5,
            "descriptors leaked: {before} before, {after} after"
        );
    }
}

/// Each seed's outcome: the frames decoded and how the channel ended.
#[test]
fn seeds_end_as_expected() {
    let expect = |name: &str| -> (usize, &'static str) {
        match name {
            "invoke" | "call" | "resolve" | "returned" | "raised" | "load" | "invoke_split" => {
                (1, "peer closed the channel")
            }
            "spawned_with_fds" | "shared_payload" => (1, "peer closed the channel"),
            "two_frames_one_send" => (2, "peer closed the channel"),
            "shared_unsealed" => (0, "seal"),
            "fds_without_frame" => (0, "peer closed the channel"),
            "too_many_fds" => (0, "descriptor"),
            "large_prefix" => (0, "in the middle of a frame"),
            "huge_prefix" => (0, "exceeds the limit"),
            "bad_json" => (0, "header"),
            other => panic!("no expectation for seed {other}"),
        }
    };
    for (name, script) in harness::seeds() {
        let outcome = harness::run(&script);
        let (frames, end) = expect(name);
        assert_eq!(outcome.frames, frames, "seed {name}: {outcome:?}");
        assert!(
            outcome.end.contains(end),
            "seed {name}: expected an end naming {end:?}: {outcome:?}"
        );
    }
}

#[test]
fn every_seed_is_in_the_corpus() {
    let dir = corpus();
    if std::env::var_os("SPROUT_WRITE_SEEDS").is_some() {
        for (name, script) in harness::seeds() {
            fs::write(dir.join(format!("seed-{name}")), script).expect("write a seed");
        }
    }
    for (name, script) in harness::seeds() {
        let path = dir.join(format!("seed-{name}"));
        let kept = fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (write the seeds with SPROUT_WRITE_SEEDS=1 cargo test -p ipc --test fuzz_corpus)",
                path.display()
            )
        });
        assert_eq!(kept, script, "{} is not the seed {name}", path.display());
    }
}
