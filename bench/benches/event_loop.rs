//! Does io_uring cut the agent's event loop's system calls or latency on the warm
//! path? One warm hop as the loop does it: write a request frame to an instance's
//! socket, wait until the answer is readable, read it. The instance is a thread
//! echoing frames on the other end of a Unix socket pair. Measured side by side:
//!
//! - `mio`: today's loop: `write`, `epoll_wait` (through `mio::Poll`), `read`, and
//!   the `read` that finds the socket empty (the loop is edge-triggered: 4 calls);
//! - `io_uring`: the write and the read linked in one submission, and one
//!   `io_uring_enter` that waits for both (1 call);
//! - `blocking`: `write` and a blocking `read` (2 calls), the floor of any loop.
//!
//! The decision and its numbers: `docs/design.md`, "Decisions and what comes next"
//! ("io_uring: measured, not adopted").

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use io_uring::{opcode, squeue, types, IoUring};
use mio::net::UnixStream as MioStream;
use mio::{Events, Interest, Poll, Token};

/// A warm invoke's frame: a header and a small event, as on the agent → instance hop.
const FRAME: usize = 128;

/// The instance: reads a frame, answers it, until the socket closes.
fn echo(mut s: UnixStream) {
    let mut buf = [0u8; FRAME];
    while s.read_exact(&mut buf).is_ok() {
        if s.write_all(&buf).is_err() {
            return;
        }
    }
}

fn pair() -> (UnixStream, std::thread::JoinHandle<()>) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    (ours, std::thread::spawn(move || echo(theirs)))
}

fn warm_hop(c: &mut Criterion) {
    let mut group = c.benchmark_group("event_loop");
    group.measurement_time(Duration::from_secs(5));
    let request = [7u8; FRAME];

    {
        let (ours, echoer) = pair();
        ours.set_nonblocking(true).unwrap();
        let mut stream = MioStream::from_std(ours);
        let mut poll = Poll::new().unwrap();
        poll.registry()
            .register(&mut stream, Token(0), Interest::READABLE)
            .unwrap();
        let mut events = Events::with_capacity(16);
        let mut buf = [0u8; 4 * FRAME];
        group.bench_function("warm_hop_mio", |b| {
            b.iter(|| {
                stream.write_all(&request).unwrap();
                let mut got = 0;
                while got < FRAME {
                    poll.poll(&mut events, None).unwrap();
                    // Edge-triggered: read until the socket is empty.
                    loop {
                        match stream.read(&mut buf[got..]) {
                            Ok(0) => panic!("the echo closed"),
                            Ok(n) => got += n,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
                assert_eq!(got, FRAME);
            })
        });
        drop(stream);
        echoer.join().unwrap();
    }

    {
        let (ours, echoer) = pair();
        let mut ring = IoUring::new(8).unwrap();
        let fd = types::Fd(ours.as_raw_fd());
        let mut buf = [0u8; FRAME];
        group.bench_function("warm_hop_io_uring", |b| {
            b.iter(|| {
                let write = opcode::Write::new(fd, request.as_ptr(), FRAME as u32)
                    .build()
                    .flags(squeue::Flags::IO_LINK)
                    .user_data(1);
                let read = opcode::Recv::new(fd, buf.as_mut_ptr(), FRAME as u32)
                    .flags(libc::MSG_WAITALL)
                    .build()
                    .user_data(2);
                // SAFETY: `request` and `buf` outlive the submission: both entries
                // complete before `submit_and_wait` returns and the loop goes on.
                unsafe {
                    let mut sq = ring.submission();
                    sq.push(&write).unwrap();
                    sq.push(&read).unwrap();
                }
                ring.submit_and_wait(2).unwrap();
                for cqe in ring.completion() {
                    assert_eq!(cqe.result(), FRAME as i32, "entry {}", cqe.user_data());
                }
            })
        });
        drop(ours);
        echoer.join().unwrap();
    }

    {
        let (mut ours, echoer) = pair();
        let mut buf = [0u8; FRAME];
        group.bench_function("warm_hop_blocking", |b| {
            b.iter(|| {
                ours.write_all(&request).unwrap();
                ours.read_exact(&mut buf).unwrap();
            })
        });
        drop(ours);
        echoer.join().unwrap();
    }
    group.finish();
}

criterion_group!(benches, warm_hop);
criterion_main!(benches);
