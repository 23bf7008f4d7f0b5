//! Fuzzes the agent's HTTP/1.1 head and body parser and its router: a client's bytes
//! through a real connection with a fake handler (`agent::http::fuzz::exchange`,
//! which also says what the input's first byte means and what must hold).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(broken) = agent::http::fuzz::exchange(data) {
        panic!("{broken}");
    }
});
