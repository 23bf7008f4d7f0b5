//! Replays the `http` fuzz target's corpus (`agent/fuzz/corpus/http`, kept small and
//! minimised; every crash input found is kept there too) as an ordinary test: each
//! input through [`agent::http::fuzz::exchange`], the function the fuzzer runs, which
//! returns `Err` naming the rule a response broke. The target itself runs under
//! `cargo fuzz` (docs/security.md, "Fuzzing").

// The HTTP server is the `http` feature's; the library alone has nothing to replay.
#![cfg(feature = "http")]

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use agent::http::fuzz::exchange;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/http")
}

fn input(name: &str) -> Vec<u8> {
    let path = corpus().join(name);
    fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

#[test]
fn corpus_replays_cleanly() {
    let dir = corpus();
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    files.sort();
    assert!(
        files.len() >= 10,
        "the corpus at {} has {} inputs: it was lost",
        dir.display(),
        files.len()
    );
    let started = Instant::now();
    for path in &files {
        let bytes = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        // A failure names the input: rerun it with `cargo fuzz run http <file>`.
        if let Err(broken) = exchange(&bytes) {
            panic!("{}: {broken}", path.display());
        }
    }
    eprintln!("replayed {} inputs in {:?}", files.len(), started.elapsed());
}

/// The seeds do what they were written for, so the corpus starts from every route.
#[test]
fn seeds_reach_their_routes() {
    let handled = |name: &str| exchange(&input(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let ex = handled("seed-list");
    assert_eq!((ex.handled, ex.responses.len()), (1, 1));
    assert_eq!(ex.responses[0].0, 200);
    let ex = handled("seed-run_chunked");
    assert_eq!(ex.handled, 1, "{ex:?}");
    // Written a byte at a time; the third has a query parameter the route refuses.
    let ex = handled("seed-pipelined_bytewise");
    assert_eq!(ex.handled, 2, "{ex:?}");
    let statuses: Vec<u16> = ex.responses.iter().map(|r| r.0).collect();
    assert_eq!(statuses, [200, 200, 400]);
    let ex = handled("seed-expect_continue_404");
    assert_eq!(ex.handled, 0, "{ex:?}");
    assert_eq!(ex.responses[0].0, 404);
    let ex = handled("seed-big_body_small_limits");
    assert_eq!(ex.responses[0].0, 413);
    for refused in ["seed-conflicting_length", "seed-te_and_length"] {
        let ex = handled(refused);
        assert_eq!(ex.handled, 0, "{refused}: {ex:?}");
        assert_eq!(ex.responses[0].0, 400, "{refused}: {ex:?}");
    }
    assert_eq!(handled("seed-gzip").responses[0].0, 501);
}
