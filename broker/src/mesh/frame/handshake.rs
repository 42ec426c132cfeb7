//! The frames that start a link: HELLO both ways (who and which mesh version), then AUTH both
//! ways (proof of the cluster secret, see `mesh::auth`).
//!
//! ```text
//! HELLO   := "MQLB" version:u8 id_len:u16 id nonce:[u8; 16]
//! AUTH    := mac:[u8; 32]                      HMAC-SHA256, see `auth`
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{get_string16, need, put_str16, Frame, FrameError};

pub const MAGIC: &[u8; 4] = b"MQLB";
pub const NONCE_LEN: usize = 16;
pub const MAC_LEN: usize = 32;

pub(super) fn put_hello(
    o: &mut BytesMut,
    version: u8,
    node_id: &str,
    nonce: &[u8; NONCE_LEN],
) -> Result<(), FrameError> {
    o.put_slice(MAGIC);
    o.put_u8(version);
    put_str16(o, node_id.as_bytes())?;
    o.put_slice(nonce);
    Ok(())
}

pub(super) fn get_hello(b: &mut Bytes) -> Result<Frame, FrameError> {
    need(b, 5, "hello header")?;
    if &b[..4] != MAGIC {
        return Err(FrameError::BadMagic);
    }
    b.advance(4);
    let version = b.get_u8();
    let node_id = get_string16(b, "hello node id")?;
    need(b, NONCE_LEN, "hello nonce")?;
    let mut nonce = [0u8; NONCE_LEN];
    b.copy_to_slice(&mut nonce);
    Ok(Frame::Hello {
        version,
        node_id,
        nonce,
    })
}

pub(super) fn put_auth(o: &mut BytesMut, mac: &[u8; MAC_LEN]) -> Result<(), FrameError> {
    o.put_slice(mac);
    Ok(())
}

pub(super) fn get_auth(b: &mut Bytes) -> Result<Frame, FrameError> {
    need(b, MAC_LEN, "auth mac")?;
    let mut mac = [0u8; MAC_LEN];
    b.copy_to_slice(&mut mac);
    Ok(Frame::Auth { mac })
}

#[cfg(test)]
mod tests {
    use super::super::check::assert_refused;
    use super::*;

    /// Whoever reaches the mesh port and does not start with an mqlb HELLO is refused at its
    /// first frame.
    #[test]
    fn a_stranger_is_refused_at_hello() {
        assert_refused(&[
            (
                b"\x00\x00\x00\x05\x01HTTP",
                FrameError::Malformed("hello header"),
            ),
            (b"\x00\x00\x00\x06\x01HTTP/", FrameError::BadMagic),
        ]);
    }
}
