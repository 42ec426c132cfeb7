//! Authentication of HA server requests with the cluster secret (docs/design.md, "Security"). The
//! membership decides where the LB sends clients' CONNECTs (passwords included), so nobody
//! without the secret may change it, or read it (it is a map of the cluster).
//!
//! A request carries `X-Mqlb-Time` (Unix ms), `X-Mqlb-Nonce` (random, so that two identical
//! requests in one millisecond differ) and `X-Mqlb-Signature`: the hex
//! `HMAC-SHA256(secret, "mqlb-ha-v1\n" METHOD "\n" PATH?QUERY "\n" TIME "\n" NONCE "\n" BODY)`.
//! Only the body may hold a newline, and it comes last, so no two requests sign the same bytes.
//! The server accepts a time within `WINDOW_MS` of its own clock, and a signature only once: it
//! remembers the ones it accepted until their time leaves the window. The secret never crosses
//! the wire. Pure: the caller passes the time in.

use std::collections::{BTreeSet, HashSet};

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const TIME_HEADER: &str = "x-mqlb-time";
pub const NONCE_HEADER: &str = "x-mqlb-nonce";
pub const SIGNATURE_HEADER: &str = "x-mqlb-signature";
/// How far a request's time may be from the server's clock, either way (clock skew between
/// hosts plus the request's time in flight).
pub const WINDOW_MS: i64 = 30_000;
/// Signatures remembered at most: beyond, the oldest are forgotten and no request older than
/// them is accepted any more (see [`Replays`]).
pub const MAX_REMEMBERED: usize = 100_000;

const CONTEXT: &str = "mqlb-ha-v1";
const MAC_LEN: usize = 32;
const MAX_NONCE_LEN: usize = 64;

type Signature = [u8; MAC_LEN];

/// Why a request was refused; the label of `mqlb_ha_auth_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    #[error("missing X-Mqlb-Time, X-Mqlb-Nonce or X-Mqlb-Signature")]
    Missing,
    #[error("malformed X-Mqlb-Time, X-Mqlb-Nonce or X-Mqlb-Signature")]
    Malformed,
    #[error("request time outside the {WINDOW_MS} ms window (check the clocks)")]
    Expired,
    #[error("bad signature")]
    BadSignature,
    #[error("request already seen")]
    Replayed,
}

impl AuthFailure {
    pub fn label(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Malformed => "malformed",
            AuthFailure::Expired => "expired",
            AuthFailure::BadSignature => "bad_signature",
            AuthFailure::Replayed => "replayed",
        }
    }
}

/// What a request says about itself besides its body: its header values.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stamp<'a> {
    pub time: Option<&'a str>,
    pub nonce: Option<&'a str>,
    pub signature: Option<&'a str>,
}

fn mac(
    secret: &[u8],
    method: &str,
    path: &str,
    time_ms: i64,
    nonce: &str,
    body: &[u8],
) -> Hmac<Sha256> {
    // HMAC takes keys of any length: `new_from_slice` cannot fail for it.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    m.update(format!("{CONTEXT}\n{method}\n{path}\n{time_ms}\n{nonce}\n").as_bytes());
    m.update(body);
    m
}

/// The `X-Mqlb-Signature` of a request (`path` with its query, as sent on the request line).
pub fn sign(
    secret: &[u8],
    method: &str,
    path: &str,
    time_ms: i64,
    nonce: &str,
    body: &[u8],
) -> String {
    hex(&mac(secret, method, path, time_ms, nonce, body)
        .finalize()
        .into_bytes())
}

/// A fresh `X-Mqlb-Nonce`.
pub fn nonce() -> String {
    hex(&rand::random::<[u8; 16]>())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Signature> {
    let text = text.as_bytes();
    if text.len() != 2 * MAC_LEN {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; MAC_LEN];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// The signatures accepted and still inside the window. Bounded: when full, the oldest entry
/// is dropped and `floor` rises to its time, and requests not newer than `floor` are refused
/// as replays — so forgetting never lets a replay in. Only correctly signed requests get here,
/// so only a holder of the secret can fill it.
#[derive(Debug, Default)]
pub struct Replays {
    by_time: BTreeSet<(i64, Signature)>,
    seen: HashSet<Signature>,
    floor: Option<i64>,
}

impl Replays {
    /// Records `sig` (of a request timed `time_ms`) unless it was seen; `false` if it was (or
    /// is too old to tell).
    fn admit(&mut self, sig: Signature, time_ms: i64, now_ms: i64, max: usize) -> bool {
        // Entries whose time left the window can no longer be replayed: the window refuses them.
        while let Some(&(t, s)) = self.by_time.first() {
            if t >= now_ms - WINDOW_MS {
                break;
            }
            self.by_time.pop_first();
            self.seen.remove(&s);
        }
        if self.floor.is_some_and(|f| time_ms <= f) || !self.seen.insert(sig) {
            return false;
        }
        self.by_time.insert((time_ms, sig));
        while self.by_time.len() > max.max(1) {
            if let Some((t, s)) = self.by_time.pop_first() {
                self.seen.remove(&s);
                self.floor = Some(self.floor.map_or(t, |f| f.max(t)));
            }
        }
        true
    }

    pub fn len(&self) -> usize {
        self.by_time.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_time.is_empty()
    }
}

/// Checks one request's headers against the secret, the window and the replays seen so far.
pub struct Verifier {
    secret: Vec<u8>,
    max_remembered: usize,
    replays: Replays,
}

impl Verifier {
    pub fn new(secret: &[u8]) -> Verifier {
        Verifier::with_capacity(secret, MAX_REMEMBERED)
    }

    pub fn with_capacity(secret: &[u8], max_remembered: usize) -> Verifier {
        Verifier {
            secret: secret.to_vec(),
            max_remembered,
            replays: Replays::default(),
        }
    }

    /// `Ok` if `stamp` authenticates this request at `now_ms`. The MAC is compared in constant
    /// time, and checked before the replay memory is touched.
    pub fn verify(
        &mut self,
        method: &str,
        path: &str,
        stamp: Stamp<'_>,
        body: &[u8],
        now_ms: i64,
    ) -> Result<(), AuthFailure> {
        let (Some(time), Some(nonce), Some(signature)) = (stamp.time, stamp.nonce, stamp.signature)
        else {
            return Err(AuthFailure::Missing);
        };
        let time_ms: i64 = time.trim().parse().map_err(|_| AuthFailure::Malformed)?;
        let sig = unhex(signature.trim()).ok_or(AuthFailure::Malformed)?;
        if nonce.is_empty() || nonce.len() > MAX_NONCE_LEN {
            return Err(AuthFailure::Malformed);
        }
        if now_ms.abs_diff(time_ms) > WINDOW_MS as u64 {
            return Err(AuthFailure::Expired);
        }
        mac(&self.secret, method, path, time_ms, nonce, body)
            .verify_slice(&sig)
            .map_err(|_| AuthFailure::BadSignature)?;
        if !self
            .replays
            .admit(sig, time_ms, now_ms, self.max_remembered)
        {
            return Err(AuthFailure::Replayed);
        }
        Ok(())
    }

    /// Signatures remembered now (a gauge).
    pub fn remembered(&self) -> usize {
        self.replays.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef-secret";
    const NOW: i64 = 1_700_000_000_000;

    /// A request `(method, path, body)` stamped at `t` with nonce `n` and signed with `secret`.
    fn stamp(
        secret: &[u8],
        method: &str,
        path: &str,
        t: i64,
        n: &str,
        body: &[u8],
    ) -> (String, String, String) {
        (
            t.to_string(),
            n.to_string(),
            sign(secret, method, path, t, n, body),
        )
    }

    fn check(
        v: &mut Verifier,
        method: &str,
        path: &str,
        s: &(String, String, String),
        body: &[u8],
        now: i64,
    ) -> Result<(), AuthFailure> {
        let st = Stamp {
            time: Some(&s.0),
            nonce: Some(&s.1),
            signature: Some(&s.2),
        };
        v.verify(method, path, st, body, now)
    }

    #[test]
    fn a_signed_request_verifies_once_and_nothing_else_does() {
        let mut v = Verifier::new(SECRET);
        let body = br#"{"id":"b1","mqtt":"127.0.0.1:1883"}"#;
        let good = stamp(SECRET, "POST", "/api/members", NOW, "n1", body);
        assert_eq!(good.2.len(), 64);
        assert_eq!(
            check(&mut v, "POST", "/api/members", &good, body, NOW + 5),
            Ok(())
        );
        assert_eq!(
            check(&mut v, "POST", "/api/members", &good, body, NOW + 6),
            Err(AuthFailure::Replayed)
        );
        // The same request with another nonce, in the same millisecond: a new request.
        let again = stamp(SECRET, "POST", "/api/members", NOW, "n2", body);
        assert_eq!(
            check(&mut v, "POST", "/api/members", &again, body, NOW + 6),
            Ok(())
        );
        for (what, (m, p, t, n, b)) in [
            (
                "another method",
                ("DELETE", "/api/members", NOW, "n1", &body[..]),
            ),
            ("another path", ("POST", "/api/members/b1", NOW, "n1", body)),
            (
                "another time",
                ("POST", "/api/members", NOW + 1, "n1", body),
            ),
            ("another nonce", ("POST", "/api/members", NOW, "n9", body)),
            ("another body", ("POST", "/api/members", NOW, "n1", b"{}")),
        ] {
            // Signed for something else, presented as the original.
            let signed = stamp(SECRET, m, p, t, n, b);
            let forged = (good.0.clone(), good.1.clone(), signed.2);
            let mut fresh = Verifier::new(SECRET);
            assert_eq!(
                check(&mut fresh, "POST", "/api/members", &forged, body, NOW),
                Err(AuthFailure::BadSignature),
                "{what}"
            );
        }
        let other_secret = stamp(
            b"another-secret-0123",
            "POST",
            "/api/members",
            NOW,
            "n1",
            body,
        );
        assert_eq!(
            check(
                &mut Verifier::new(SECRET),
                "POST",
                "/api/members",
                &other_secret,
                body,
                NOW
            ),
            Err(AuthFailure::BadSignature)
        );
        let t = NOW.to_string();
        let sig = good.2.as_str();
        let long = "x".repeat(65);
        let bad_hex = "zz".repeat(32);
        for (want, st) in [
            (
                AuthFailure::Missing,
                Stamp {
                    time: None,
                    nonce: Some("n"),
                    signature: Some(sig),
                },
            ),
            (
                AuthFailure::Missing,
                Stamp {
                    time: Some(&t),
                    nonce: None,
                    signature: Some(sig),
                },
            ),
            (
                AuthFailure::Missing,
                Stamp {
                    time: Some(&t),
                    nonce: Some("n"),
                    signature: None,
                },
            ),
            (
                AuthFailure::Malformed,
                Stamp {
                    time: Some("soon"),
                    nonce: Some("n"),
                    signature: Some(sig),
                },
            ),
            (
                AuthFailure::Malformed,
                Stamp {
                    time: Some(&t),
                    nonce: Some("n"),
                    signature: Some("abc"),
                },
            ),
            (
                AuthFailure::Malformed,
                Stamp {
                    time: Some(&t),
                    nonce: Some("n"),
                    signature: Some(&bad_hex),
                },
            ),
            (
                AuthFailure::Malformed,
                Stamp {
                    time: Some(&t),
                    nonce: Some(&long),
                    signature: Some(sig),
                },
            ),
            (
                AuthFailure::Malformed,
                Stamp {
                    time: Some(&t),
                    nonce: Some(""),
                    signature: Some(sig),
                },
            ),
        ] {
            assert_eq!(
                v.verify("GET", "/api/cluster", st, b"", NOW),
                Err(want),
                "{st:?}"
            );
        }
        assert_ne!(nonce(), nonce());
    }

    #[test]
    fn the_window_is_thirty_seconds_either_way() {
        let mut v = Verifier::new(SECRET);
        for (t, ok) in [
            (NOW - WINDOW_MS, true),
            (NOW + WINDOW_MS, true),
            (NOW - WINDOW_MS - 1, false),
            (NOW + WINDOW_MS + 1, false),
        ] {
            let s = stamp(SECRET, "GET", "/api/cluster", t, "n", b"");
            let r = check(&mut v, "GET", "/api/cluster", &s, b"", NOW);
            assert_eq!(r.is_ok(), ok, "{t}: {r:?}");
            if !ok {
                assert_eq!(r, Err(AuthFailure::Expired));
            }
        }
    }

    #[test]
    fn replay_memory_is_bounded_and_forgetting_never_admits_a_replay() {
        let mut v = Verifier::with_capacity(SECRET, 100);
        let sent: Vec<_> = (0..300)
            .map(|i| stamp(SECRET, "GET", "/api/cluster", NOW + i, "n", b""))
            .collect();
        for s in &sent {
            assert_eq!(
                check(&mut v, "GET", "/api/cluster", s, b"", NOW + 300),
                Ok(())
            );
        }
        assert_eq!(v.remembered(), 100, "bounded");
        // Every one of them, replayed, is refused: the recent ones are remembered, the older
        // ones are below the floor.
        for s in &sent {
            let r = check(&mut v, "GET", "/api/cluster", s, b"", NOW + 301);
            assert_eq!(r, Err(AuthFailure::Replayed), "{}", s.0);
        }
        // Once the window has passed, the memory empties on the next request.
        let later = NOW + 300 + WINDOW_MS + 1;
        let s = stamp(SECRET, "GET", "/api/cluster", later, "n", b"");
        assert_eq!(check(&mut v, "GET", "/api/cluster", &s, b"", later), Ok(()));
        assert_eq!(v.remembered(), 1);
    }
}
