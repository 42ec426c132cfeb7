//! The MQTT packets mqlb reads and writes itself, pure functions with no I/O: the LB reads a
//! CONNECT (to route by client ID and pick the backend port of the client's protocol level)
//! and writes a refusing CONNACK; the LB's `mqtt` probe, a broker node's self-check
//! (`broker/src/watchdog.rs`), the tests, the benches and the fuzz target (`fuzz/`) write
//! CONNECTs with [`encode_connect`]. Its own crate, below the LB and the broker, so that each
//! packet is written in one place (the watchdog once had a CONNECT encoder of its own).

mod connect;
mod encode;

pub use connect::{level_of, parse_connect, Connect, ConnectError, ProtocolLevel};
pub use encode::{connack, encode_connect, ConnectOptions, Refusal};

/// Decodes MQTT's variable-length "remaining length" (1 to 4 bytes, 7 bits each).
/// `Ok(None)` means more bytes are needed.
pub(crate) fn decode_varint(buf: &[u8]) -> Result<Option<(u32, usize)>, ConnectError> {
    let mut value: u32 = 0;
    for i in 0..4 {
        let Some(&byte) = buf.get(i) else {
            return Ok(None);
        };
        value |= u32::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    Err(ConnectError::Malformed(
        "variable byte integer longer than 4 bytes",
    ))
}

/// Encodes MQTT's variable byte integer; `value` must be below 2^28.
pub(crate) fn encode_varint(mut value: u32, out: &mut Vec<u8>) {
    loop {
        let mut byte = (value & 0x7f) as u8;
        value >>= 7;
        if value > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if value == 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_boundaries() {
        for (value, len) in [
            (0u32, 1),
            (127, 1),
            (128, 2),
            (16_383, 2),
            (16_384, 3),
            (2_097_151, 3),
            (2_097_152, 4),
            (268_435_455, 4),
        ] {
            let mut out = Vec::new();
            encode_varint(value, &mut out);
            assert_eq!(out.len(), len, "{value}");
            assert_eq!(decode_varint(&out), Ok(Some((value, len))));
            assert_eq!(decode_varint(&out[..len - 1]), Ok(None));
        }
        assert!(decode_varint(&[0xff, 0xff, 0xff, 0xff, 0x01]).is_err());
    }
}
