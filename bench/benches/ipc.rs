//! Micro-benchmarks of sprout's framing: one request/response round trip between two
//! threads over a socket pair, as on the agent → instance hop.

use criterion::{criterion_group, criterion_main, Criterion};
use ipc::proto::{InstanceEvent, InstanceRequest};
use ipc::Channel;
use std::hint::black_box;
use std::os::fd::AsFd;

fn echo_server(mut ch: Channel) {
    while let Ok(m) = ch.recv::<InstanceRequest>() {
        let InstanceRequest::Invoke { id } = m.header else {
            break;
        };
        if ch
            .send(&InstanceEvent::Returned { id }, &m.payload, &[])
            .is_err()
        {
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
                client
                    .send(&InstanceRequest::Invoke { id }, black_box(&payload), &[])
                    .unwrap();
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
            a.send(&InstanceRequest::Invoke { id: 1 }, b"", &[file.as_fd()])
                .unwrap();
            black_box(b.recv::<InstanceRequest>().unwrap());
        })
    });
    let _ = &mut a;
    group.finish();
}

criterion_group!(benches, round_trip);
criterion_main!(benches);
