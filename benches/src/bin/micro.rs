//! Micro benchmarks of the pure hot-path pieces: CONNECT parsing and backend selection.
//!
//! `cargo run --release -p mqlb-benches --bin micro`

use std::hint::black_box;
use std::time::Instant;

use mqlb_lb::mqtt::{encode_connect, parse_connect, ConnectOptions, ProtocolLevel};
use mqlb_lb::select::{backend_hash, rendezvous_order, Candidate, Key};

fn time<F: FnMut(usize)>(name: &str, n: usize, mut f: F) {
    let start = Instant::now();
    for i in 0..n {
        f(i);
    }
    let ns = start.elapsed().as_nanos() as f64 / n as f64;
    println!("{name:<44} {ns:>8.1} ns/op  ({:.1} M/s)", 1e3 / ns);
}

fn main() {
    let n = 2_000_000;
    for level in [ProtocolLevel::V311, ProtocolLevel::V5] {
        let bytes = encode_connect(&ConnectOptions {
            level,
            client_id: "sensor-000123-eu-west".into(),
            username: Some("device".into()),
            password: Some(b"secret".to_vec()),
            ..ConnectOptions::default()
        });
        time(
            &format!("parse_connect {level:?} ({} bytes)", bytes.len()),
            n,
            |_| {
                black_box(parse_connect(black_box(&bytes)).ok());
            },
        );
    }
    for backends in [3usize, 16] {
        let cands: Vec<Candidate> = (0..backends)
            .map(|i| Candidate {
                hash: backend_hash(&format!("b{i}")),
                weight: 1,
                active: 0,
                eligible: true,
            })
            .collect();
        let ids: Vec<String> = (0..1024).map(|i| format!("device-{i}")).collect();
        time(
            &format!("client-id hash + rendezvous, {backends} backends"),
            n,
            |i| {
                let k = Key::ClientId(&ids[i & 1023]).hash();
                black_box(rendezvous_order(k, &cands));
            },
        );
    }
}
