//! Backend selection: pure functions over a pool's members, no sockets, no clock.
//!
//! Hash modes use **weighted rendezvous hashing** (highest random weight): each backend scores
//! `-weight / ln(u)` where `u ∈ (0,1)` comes from hashing the key with the backend's *stable
//! ID*. The highest score wins. So the same key picks the same backend on every LB that has the
//! same members (no shared state between LBs), a backend that leaves only moves its own keys,
//! and they come back when it returns. The hash is spelled out here (FNV-1a + a 64-bit
//! finaliser), not `std`'s, so it stays the same across Rust versions and LB builds.

use std::net::{IpAddr, SocketAddr};

/// FNV-1a over bytes; cheap, stable, good enough once passed through [`mix64`].
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// MurmurHash3's 64-bit finaliser: every input bit affects every output bit.
pub fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x
}

/// What a connection is hashed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key<'a> {
    ClientId(&'a str),
    FiveTuple { src: SocketAddr, dst: SocketAddr },
    SourceIp { src: IpAddr, dst: IpAddr },
    SourceIpProtocol { src: IpAddr, dst: IpAddr },
}

const PROTO_TCP: u8 = 6;

fn ip_bytes(ip: IpAddr, out: &mut [u8; 64], at: &mut usize) {
    // IPv4-mapped IPv6 hashes like plain IPv4, so a dual-stack listener changes nothing.
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(v6, |v4| v4.to_ipv6_mapped()),
    };
    out[*at..*at + 16].copy_from_slice(&v6.octets());
    *at += 16;
}

impl Key<'_> {
    /// The 64-bit key hash; computed once per connection.
    pub fn hash(&self) -> u64 {
        let mut buf = [0u8; 64];
        let mut n = 1;
        match *self {
            Key::ClientId(id) => return mix64(fnv1a(id.as_bytes()) ^ 0x01),
            Key::FiveTuple { src, dst } => {
                buf[0] = 2;
                ip_bytes(src.ip(), &mut buf, &mut n);
                ip_bytes(dst.ip(), &mut buf, &mut n);
                buf[n..n + 2].copy_from_slice(&src.port().to_be_bytes());
                buf[n + 2..n + 4].copy_from_slice(&dst.port().to_be_bytes());
                buf[n + 4] = PROTO_TCP;
                n += 5;
            }
            Key::SourceIp { src, dst } => {
                buf[0] = 3;
                ip_bytes(src, &mut buf, &mut n);
                ip_bytes(dst, &mut buf, &mut n);
            }
            Key::SourceIpProtocol { src, dst } => {
                buf[0] = 4;
                ip_bytes(src, &mut buf, &mut n);
                ip_bytes(dst, &mut buf, &mut n);
                buf[n] = PROTO_TCP;
                n += 1;
            }
        }
        mix64(fnv1a(&buf[..n]))
    }
}

/// The hash of a backend's stable ID; computed once per config snapshot.
pub fn backend_hash(id: &str) -> u64 {
    mix64(fnv1a(id.as_bytes()))
}

/// Rendezvous score of one backend for one key. Higher wins.
pub fn score(key_hash: u64, backend_hash: u64, weight: u32) -> f64 {
    let h = mix64(key_hash ^ backend_hash.rotate_left(17));
    // 53 random bits → u in (0, 1), never 0 or 1, so ln(u) is finite and negative.
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -f64::from(weight) / u.ln()
}

/// One selectable member, as the selector sees it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    pub hash: u64,
    pub weight: u32,
    /// Live connections (least-connections mode).
    pub active: u64,
    /// Up and not draining.
    pub eligible: bool,
}

/// Indices of eligible candidates, best first, by rendezvous score for `key_hash`.
pub fn rendezvous_order(key_hash: u64, cands: &[Candidate]) -> Vec<usize> {
    let mut scored: Vec<(f64, usize)> = cands
        .iter()
        .enumerate()
        .filter(|(_, c)| c.eligible)
        .map(|(i, c)| (score(key_hash, c.hash, c.weight), i))
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    scored.into_iter().map(|(_, i)| i).collect()
}

/// Weighted round robin: `tick` (a shared counter) picks a slot on a wheel where each backend
/// has `weight` slots; the rest follow in pool order as fallbacks.
pub fn round_robin_order(tick: u64, cands: &[Candidate]) -> Vec<usize> {
    let eligible: Vec<usize> = (0..cands.len()).filter(|&i| cands[i].eligible).collect();
    let total: u64 = eligible.iter().map(|&i| u64::from(cands[i].weight)).sum();
    if total == 0 {
        return Vec::new();
    }
    let mut slot = tick % total;
    let mut first = 0;
    for (pos, &i) in eligible.iter().enumerate() {
        let w = u64::from(cands[i].weight);
        if slot < w {
            first = pos;
            break;
        }
        slot -= w;
    }
    eligible[first..]
        .iter()
        .chain(&eligible[..first])
        .copied()
        .collect()
}

/// Fewest live connections per unit of weight first; ties broken by rendezvous on `key_hash`
/// so equal backends are not always tried in pool order.
pub fn least_connections_order(key_hash: u64, cands: &[Candidate]) -> Vec<usize> {
    let mut v: Vec<(f64, f64, usize)> = cands
        .iter()
        .enumerate()
        .filter(|(_, c)| c.eligible)
        .map(|(i, c)| {
            (
                c.active as f64 / f64::from(c.weight),
                score(key_hash, c.hash, c.weight),
                i,
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)));
    v.into_iter().map(|(_, _, i)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(ids: &[&str]) -> Vec<Candidate> {
        ids.iter()
            .map(|id| Candidate {
                hash: backend_hash(id),
                weight: 1,
                active: 0,
                eligible: true,
            })
            .collect()
    }

    fn pick(key: &str, cands: &[Candidate]) -> Option<usize> {
        rendezvous_order(Key::ClientId(key).hash(), cands)
            .first()
            .copied()
    }

    #[test]
    fn hash_is_stable_across_builds() {
        // Pinned values: if these change, clients move between brokers after an upgrade.
        assert_eq!(fnv1a(b"device-1"), 0x275f_cd45_07d5_cc31);
        assert_eq!(backend_hash("b1"), mix64(fnv1a(b"b1")));
        let order = rendezvous_order(Key::ClientId("device-1").hash(), &pool(&["b1", "b2", "b3"]));
        assert_eq!(order.len(), 3);
        assert_eq!(
            order,
            rendezvous_order(Key::ClientId("device-1").hash(), &pool(&["b1", "b2", "b3"]))
        );
    }

    #[test]
    fn three_backends_ten_thousand_keys_within_ten_percent() {
        let cands = pool(&["b1", "b2", "b3"]);
        let mut counts = [0usize; 3];
        for i in 0..10_000 {
            counts[pick(&format!("client-{i}"), &cands).expect("pick")] += 1;
        }
        let fair = 10_000.0 / 3.0;
        for c in counts {
            assert!((c as f64 - fair).abs() <= fair * 0.10, "{counts:?}");
        }
    }

    #[test]
    fn weights_bias_the_share() {
        let mut cands = pool(&["b1", "b2", "b3"]);
        cands[0].weight = 2;
        let mut counts = [0usize; 3];
        for i in 0..20_000 {
            counts[pick(&format!("k{i}"), &cands).expect("pick")] += 1;
        }
        // b1 should get half; b2 and b3 a quarter each.
        assert!(
            (counts[0] as f64 / 20_000.0 - 0.5).abs() < 0.03,
            "{counts:?}"
        );
        assert!(
            (counts[1] as f64 / 20_000.0 - 0.25).abs() < 0.03,
            "{counts:?}"
        );
    }

    #[test]
    fn a_failed_backend_moves_only_its_keys_and_they_return() {
        let mut cands = pool(&["b1", "b2", "b3", "b4"]);
        let keys: Vec<String> = (0..10_000).map(|i| format!("dev-{i}")).collect();
        let before: Vec<usize> = keys
            .iter()
            .map(|k| pick(k, &cands).expect("pick"))
            .collect();
        cands[2].eligible = false;
        let during: Vec<usize> = keys
            .iter()
            .map(|k| pick(k, &cands).expect("pick"))
            .collect();
        let mut moved = 0;
        for (b, d) in before.iter().zip(&during) {
            if *b == 2 {
                assert_ne!(*d, 2);
                moved += 1;
            } else {
                assert_eq!(b, d, "a key of a healthy backend moved");
            }
        }
        assert!(moved > 2000 && moved < 3000, "moved {moved}");
        cands[2].eligible = true;
        let after: Vec<usize> = keys
            .iter()
            .map(|k| pick(k, &cands).expect("pick"))
            .collect();
        assert_eq!(before, after);
    }

    #[test]
    fn adding_a_backend_moves_about_one_share() {
        let keys: Vec<String> = (0..10_000).map(|i| format!("dev-{i}")).collect();
        let three = pool(&["b1", "b2", "b3"]);
        let four = pool(&["b1", "b2", "b3", "b4"]);
        let moved = keys
            .iter()
            .filter(|k| pick(k, &three) != pick(k, &four))
            .count();
        // Ideal is 1/4 of the keys, all onto b4.
        assert!((2000..3000).contains(&moved), "moved {moved}");
        assert!(keys.iter().all(|k| {
            let (a, b) = (pick(k, &three), pick(k, &four));
            a == b || b == Some(3)
        }));
    }

    #[test]
    fn order_lists_every_eligible_backend_once() {
        let mut cands = pool(&["a", "b", "c", "d"]);
        cands[1].eligible = false;
        for order in [
            rendezvous_order(42, &cands),
            round_robin_order(7, &cands),
            least_connections_order(42, &cands),
        ] {
            let mut o = order.clone();
            o.sort();
            assert_eq!(o, vec![0, 2, 3]);
        }
        cands.iter_mut().for_each(|c| c.eligible = false);
        assert!(rendezvous_order(1, &cands).is_empty());
        assert!(round_robin_order(1, &cands).is_empty());
    }

    #[test]
    fn round_robin_follows_weights() {
        let mut cands = pool(&["a", "b", "c"]);
        cands[2].weight = 2;
        let mut counts = [0; 3];
        for t in 0..400 {
            counts[round_robin_order(t, &cands)[0]] += 1;
        }
        assert_eq!(counts, [100, 100, 200]);
    }

    #[test]
    fn least_connections_prefers_the_emptiest() {
        let mut cands = pool(&["a", "b", "c"]);
        cands[0].active = 10;
        cands[1].active = 3;
        cands[2].active = 5;
        assert_eq!(least_connections_order(9, &cands), vec![1, 2, 0]);
        cands[2].weight = 2; // 5/2 = 2.5 < 3
        assert_eq!(least_connections_order(9, &cands)[0], 2);
    }

    #[test]
    fn tuple_keys_differ_by_each_part() {
        let a: SocketAddr = "10.0.0.1:5000".parse().expect("addr");
        let b: SocketAddr = "10.0.0.1:5001".parse().expect("addr");
        let d: SocketAddr = "10.0.0.9:1883".parse().expect("addr");
        assert_ne!(
            Key::FiveTuple { src: a, dst: d }.hash(),
            Key::FiveTuple { src: b, dst: d }.hash()
        );
        assert_eq!(
            Key::SourceIp {
                src: a.ip(),
                dst: d.ip()
            }
            .hash(),
            Key::SourceIp {
                src: b.ip(),
                dst: d.ip()
            }
            .hash()
        );
        assert_ne!(
            Key::SourceIp {
                src: a.ip(),
                dst: d.ip()
            }
            .hash(),
            Key::SourceIpProtocol {
                src: a.ip(),
                dst: d.ip()
            }
            .hash()
        );
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        assert_eq!(
            Key::SourceIp {
                src: a.ip(),
                dst: d.ip()
            }
            .hash(),
            Key::SourceIp {
                src: mapped,
                dst: d.ip()
            }
            .hash()
        );
    }
}
