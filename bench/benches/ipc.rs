//! Micro-benchmarks of sprout's framing: one request/response round trip between two
//! threads over a socket pair, as on the agent → instance hop; and moving a large
//! payload inline through the socket against through a sealed memfd.

use criterion::{criterion_group, criterion_main, Criterion};
use ipc::proto::{InstanceEvent, InstanceRequest};
use ipc::Channel;
use std::hint::black_box;
use std::os::fd::AsFd;

fn echo_server(mut ch: Channel) {
    while let Ok(m) = ch.recv::<InstanceRequest>() {
        let InstanceRequest::Invoke { id, .. } = m.header else {
            break;
        };
        let answer = InstanceEvent::Returned {
            id,
            raw: false,
            called: false,
        };
        if ch.send(&answer, &m.payload, &[]).is_err() {
            break;
        }
    }
}

fn round_trip(c: &mut Criterion) {
    let mut group = c.benchmark_group("ipc");
    for size in [16usize, 4096, 65536] {
        let (mut client, server) = Channel::pair().unwrap();
        let t = std::thread::spawn(move || echo_server(server));
        let payload = vec![b'x'; size];
        let mut id = 0;
        group.bench_function(format!("round_trip_{size}B"), |b| {
            b.iter(|| {
                id += 1;
                client.link_send(id, black_box(&payload));
                black_box(client.recv::<InstanceEvent>().unwrap());
            })
        });
        drop(client);
        t.join().unwrap();
    }
    // One descriptor per frame, as when the shim hands the agent an instance.
    let (mut a, mut b) = Channel::pair().unwrap();
    let file = tempfile::tempfile().unwrap();
    group.bench_function("send_recv_with_fd", |bn| {
        bn.iter(|| {
            a.send(&invoke(1), b"", &[file.as_fd()]).unwrap();
            black_box(b.recv::<InstanceRequest>().unwrap());
        })
    });
    let _ = &mut a;
    group.finish();
}

fn invoke(id: u64) -> InstanceRequest {
    InstanceRequest::Invoke {
        id,
        depth: 0,
        raw: false,
        env: None,
    }
}

trait SendInvoke {
    fn link_send(&self, id: u64, payload: &[u8]);
}

impl SendInvoke for Channel {
    fn link_send(&self, id: u64, payload: &[u8]) {
        self.send(&invoke(id), payload, &[]).unwrap();
    }
}

/// One payload from a sender thread to a receiver that reads every page: inline
/// (socket copies) against shared (written once to a memfd, mapped). Inline goes up to
/// its cap, `ipc::frame::MAX_PAYLOAD` (64 KiB); larger payloads are shared only.
fn payload_transfer(c: &mut Criterion) {
    let mut group = c.benchmark_group("payload");
    group.sample_size(20);
    for kib in [64usize, 1 << 10, 16 << 10, 64 << 10] {
        let data = vec![7u8; kib << 10];
        group.throughput(criterion::Throughput::Bytes(data.len() as u64));
        let modes: &[bool] = if data.len() <= ipc::frame::MAX_PAYLOAD {
            &[false, true]
        } else {
            &[true]
        };
        for &shared in modes {
            let (a, mut b) = Channel::pair().unwrap();
            let size = if kib < 1024 {
                format!("{kib}KiB")
            } else {
                format!("{}MiB", kib >> 10)
            };
            let name = format!("{}_{size}", if shared { "shared" } else { "inline" });
            group.bench_function(name, |bn| {
                bn.iter(|| {
                    std::thread::scope(|s| {
                        s.spawn(|| {
                            if shared {
                                let p = ipc::Payload::share(&data).unwrap();
                                a.send_payload(&invoke(1), &p, &[]).unwrap();
                            } else {
                                a.send_raw(br#"{"op":"invoke","id":1}"#, &data, &[])
                                    .unwrap();
                            }
                        });
                        let m = b.recv::<InstanceRequest>().unwrap();
                        let touched: u64 = m.payload.iter().step_by(4096).map(|&x| x as u64).sum();
                        black_box(touched);
                    })
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, round_trip, payload_transfer);
criterion_main!(benches);
