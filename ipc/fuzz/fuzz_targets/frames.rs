//! Fuzzes the ipc frame decoder: a hostile peer's bytes and descriptors into
//! [`ipc::Channel`]'s receive path, each frame decoded as every [`ipc::proto`]
//! message. The input format and the rules checked are in `harness.rs`.

#![no_main]

use libfuzzer_sys::fuzz_target;

// `seeds` and the encoders serve the corpus replay (`ipc/tests/fuzz_corpus.rs`).
#[allow(dead_code)]
mod harness;

fuzz_target!(|data: &[u8]| {
    harness::run(data);
});
