//! Mutual authentication of a mesh link with the cluster's shared secret.
//!
//! Both ends send HELLO with a fresh random nonce, then AUTH with
//! `HMAC-SHA256(secret, "mqlb-mesh-v1" | peer's nonce | own id)`. Each end checks the peer's MAC
//! over its *own* nonce, so a recorded handshake cannot be replayed, and the secret never
//! crosses the wire.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::frame::{MAC_LEN, NONCE_LEN};

const CONTEXT: &[u8] = b"mqlb-mesh-v1";

/// The MAC `sender` sends, proving the secret over the receiver's `nonce`.
pub fn mac(secret: &[u8], nonce: &[u8; NONCE_LEN], sender: &str) -> [u8; MAC_LEN] {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mut m = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return [0; MAC_LEN],
    };
    m.update(CONTEXT);
    m.update(nonce);
    m.update(sender.as_bytes());
    m.finalize().into_bytes().into()
}

/// Checks the peer's MAC in constant time.
pub fn verify(
    secret: &[u8],
    own_nonce: &[u8; NONCE_LEN],
    peer: &str,
    their_mac: &[u8; MAC_LEN],
) -> bool {
    let Ok(mut m) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    m.update(CONTEXT);
    m.update(own_nonce);
    m.update(peer.as_bytes());
    m.verify_slice(their_mac).is_ok()
}

pub fn nonce() -> [u8; NONCE_LEN] {
    rand::random()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn right_secret_verifies_wrong_secret_and_replays_do_not() {
        let n = nonce();
        let good = mac(b"0123456789abcdef", &n, "b1");
        assert!(verify(b"0123456789abcdef", &n, "b1", &good));
        assert!(
            !verify(b"0123456789abcdeX", &n, "b1", &good),
            "other secret"
        );
        assert!(
            !verify(b"0123456789abcdef", &nonce(), "b1", &good),
            "replayed for another nonce"
        );
        assert!(
            !verify(b"0123456789abcdef", &n, "b2", &good),
            "claimed by another node"
        );
        assert_ne!(nonce(), nonce());
    }
}
