//! Criterion micro benchmarks of the pure hot-path pieces: CONNECT parsing and backend
//! selection. `cargo bench -p mqlb-benches --bench micro`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use mqlb_lb::select::{backend_hash, rendezvous_order, Candidate, Key};
use mqlb_mqtt::{encode_connect, parse_connect, ConnectOptions, ProtocolLevel};

fn connect(c: &mut Criterion) {
    for level in [ProtocolLevel::V31, ProtocolLevel::V311, ProtocolLevel::V5] {
        let bytes = encode_connect(&ConnectOptions {
            level,
            client_id: "sensor-000123-eu-west".into(),
            username: Some("device".into()),
            password: Some(b"secret".to_vec()),
            properties: if level == ProtocolLevel::V5 {
                vec![0x11, 0, 0, 0, 60, 0x21, 0, 10]
            } else {
                Vec::new()
            },
            ..ConnectOptions::default()
        });
        c.bench_function(&format!("parse_connect/{level:?}"), |b| {
            b.iter(|| black_box(parse_connect(black_box(&bytes)).ok()))
        });
    }
}

fn selection(c: &mut Criterion) {
    let ids: Vec<String> = (0..1024).map(|i| format!("device-{i}")).collect();
    for backends in [3usize, 16, 64] {
        let cands: Vec<Candidate> = (0..backends)
            .map(|i| Candidate {
                hash: backend_hash(&format!("b{i}")),
                weight: 1,
                active: 0,
                eligible: true,
            })
            .collect();
        let mut i = 0usize;
        c.bench_function(&format!("client_id_rendezvous/{backends}_backends"), |b| {
            b.iter(|| {
                i = (i + 1) & 1023;
                black_box(rendezvous_order(
                    Key::ClientId(&ids[i]).hash(),
                    black_box(&cands),
                ))
            })
        });
    }
}

criterion_group!(benches, connect, selection);
criterion_main!(benches);
