//! CONNECT reader: MQTT 3.1 (`MQIsdp`, level 3), 3.1.1 (level 4) and 5.0 (level 5).
//!
//! Only the prefix up to the client ID is needed to route, so the parser stops there: a CONNECT
//! with a large will message or password is routed after its first few dozen bytes. Bytes
//! arrive in pieces, so "incomplete" is an answer (`Ok(None)`), not an error; the caller
//! bounds how long and how much it waits for.

use super::decode_varint;

/// MQTT protocol level as carried in CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolLevel {
    V31 = 3,
    V311 = 4,
    V5 = 5,
}

/// What the LB learned from a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub level: ProtocolLevel,
    pub client_id: String,
    pub keep_alive: u16,
    pub clean_start: bool,
    /// Length of the whole CONNECT packet (fixed header included), as announced.
    pub packet_len: usize,
}

/// Why the bytes are not a usable CONNECT. The `&'static str` names the defect for logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// The first packet is not an MQTT CONNECT at all (another protocol, or another packet).
    #[error("not MQTT: {0}")]
    NotMqtt(&'static str),
    /// It claims to be a CONNECT but breaks the specification.
    #[error("malformed CONNECT: {0}")]
    Malformed(&'static str),
    /// A protocol level this LB does not know (only 3, 4 and 5 exist).
    #[error("unsupported MQTT protocol level {0}")]
    UnsupportedLevel(u8),
}

impl ConnectError {
    /// Stable label for `mqlb_mqtt_connect_errors_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            ConnectError::NotMqtt(_) => "not_mqtt",
            ConnectError::Malformed(_) => "malformed",
            ConnectError::UnsupportedLevel(_) => "unsupported_level",
        }
    }
}

/// A cursor that distinguishes "needs more bytes" (within the announced packet) from
/// "reads past the announced packet" (malformed).
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
}

enum Need {
    More,
    Bad(ConnectError),
}

impl From<ConnectError> for Need {
    fn from(e: ConnectError) -> Self {
        Need::Bad(e)
    }
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Need> {
        let stop = self
            .pos
            .checked_add(n)
            .ok_or(Need::Bad(ConnectError::Malformed(what)))?;
        if stop > self.end {
            return Err(Need::Bad(ConnectError::Malformed(what)));
        }
        if stop > self.buf.len() {
            return Err(Need::More);
        }
        let s = &self.buf[self.pos..stop];
        self.pos = stop;
        Ok(s)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, Need> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, Need> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
}

/// Parses the CONNECT at the start of `buf`.
///
/// `Ok(None)`: the bytes so far are a valid beginning; read more. `Ok(Some(c))`: the client ID
/// and level are known (the rest of the packet need not have arrived). `Err`: not MQTT, or a
/// CONNECT that breaks the spec.
pub fn parse_connect(buf: &[u8]) -> Result<Option<Connect>, ConnectError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    // A CONNECT's first byte is exactly 0x10 (type 1, flags 0). Anything else is another
    // packet or another protocol: a TLS ClientHello (0x16) has type 1 but flags 6.
    if first != 0x10 {
        return Err(ConnectError::NotMqtt(
            "first byte is not an MQTT CONNECT header",
        ));
    }
    let Some((remaining, varint_len)) = decode_varint(&buf[1..])? else {
        return Ok(None);
    };
    let header_len = 1 + varint_len;
    let mut c = Cursor {
        buf,
        pos: header_len,
        end: header_len + remaining as usize,
    };
    match parse_body(&mut c) {
        Ok(mut connect) => {
            connect.packet_len = c.end;
            Ok(Some(connect))
        }
        Err(Need::More) => Ok(None),
        Err(Need::Bad(e)) => Err(e),
    }
}

fn parse_body(c: &mut Cursor<'_>) -> Result<Connect, Need> {
    let name_len = c.u16("protocol name length")?;
    if name_len != 4 && name_len != 6 {
        return Err(ConnectError::NotMqtt("protocol name is not MQTT or MQIsdp").into());
    }
    let name = c.take(name_len as usize, "protocol name")?;
    let level_byte = c.u8("protocol level")?;
    let level = match (name, level_byte) {
        (b"MQTT", 4) => ProtocolLevel::V311,
        (b"MQTT", 5) => ProtocolLevel::V5,
        (b"MQIsdp", 3) => ProtocolLevel::V31,
        (b"MQTT", l) | (b"MQIsdp", l) => return Err(ConnectError::UnsupportedLevel(l).into()),
        _ => return Err(ConnectError::NotMqtt("protocol name is not MQTT or MQIsdp").into()),
    };
    let flags = c.u8("connect flags")?;
    if flags & 0x01 != 0 {
        return Err(ConnectError::Malformed("reserved connect flag is set").into());
    }
    let will = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    if will_qos == 3 {
        return Err(ConnectError::Malformed("will QoS 3").into());
    }
    if !will && (will_qos != 0 || will_retain) {
        return Err(ConnectError::Malformed("will QoS/retain set without will flag").into());
    }
    let username = flags & 0x80 != 0;
    let password = flags & 0x40 != 0;
    if password && !username && level != ProtocolLevel::V5 {
        return Err(ConnectError::Malformed("password flag without username flag").into());
    }
    let keep_alive = c.u16("keep alive")?;
    if level == ProtocolLevel::V5 {
        // Properties: a variable byte integer length, then that many bytes we do not need.
        let rest = &c.buf[c.pos..c.buf.len().min(c.end)];
        let (props_len, n) = match decode_varint(rest)? {
            Some(v) => v,
            None if c.buf.len() >= c.end => {
                return Err(ConnectError::Malformed("properties length beyond packet").into())
            }
            None => return Err(Need::More),
        };
        c.take(n, "properties length")?;
        c.take(props_len as usize, "properties")?;
    }
    let id_len = c.u16("client id length")?;
    let id = c.take(id_len as usize, "client id")?;
    let client_id =
        std::str::from_utf8(id).map_err(|_| ConnectError::Malformed("client id is not UTF-8"))?;
    if client_id.contains('\0') {
        return Err(ConnectError::Malformed("client id contains U+0000").into());
    }
    Ok(Connect {
        level,
        client_id: client_id.to_string(),
        keep_alive,
        clean_start: flags & 0x02 != 0,
        packet_len: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::{encode_connect, ConnectOptions};
    use proptest::prelude::*;

    fn opts(level: ProtocolLevel, id: &str) -> ConnectOptions {
        ConnectOptions {
            level,
            client_id: id.to_string(),
            keep_alive: 30,
            clean_start: true,
            ..ConnectOptions::default()
        }
    }

    #[test]
    fn parses_all_three_versions() {
        for level in [ProtocolLevel::V31, ProtocolLevel::V311, ProtocolLevel::V5] {
            let bytes = encode_connect(&opts(level, "device-42"));
            let c = parse_connect(&bytes).expect("valid").expect("complete");
            assert_eq!(c.level, level);
            assert_eq!(c.client_id, "device-42");
            assert_eq!(c.keep_alive, 30);
            assert!(c.clean_start);
            assert_eq!(c.packet_len, bytes.len());
        }
    }

    #[test]
    fn every_prefix_is_incomplete_not_an_error() {
        let mut o = opts(ProtocolLevel::V5, "sensor/1");
        o.properties = vec![0x11, 0, 0, 0, 10, 0x21, 0, 20]; // session expiry, receive max
        o.will = Some(("will/topic".into(), vec![1, 2, 3]));
        o.username = Some("user".into());
        o.password = Some(b"secret".to_vec());
        let bytes = encode_connect(&o);
        let id_end = bytes.windows(8).position(|w| w == b"sensor/1").expect("id") + 8;
        for cut in 0..id_end {
            assert_eq!(parse_connect(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
        for cut in id_end..=bytes.len() {
            let c = parse_connect(&bytes[..cut]).expect("ok").expect("complete");
            assert_eq!(c.client_id, "sensor/1");
        }
    }

    #[test]
    fn long_remaining_length_and_empty_id() {
        let mut o = opts(ProtocolLevel::V311, "");
        o.password = Some(vec![7; 300_000]);
        o.username = Some("u".into());
        let bytes = encode_connect(&o);
        assert!(
            bytes[1] & 0x80 != 0 && bytes[3] & 0x80 == 0,
            "3-byte remaining length"
        );
        let c = parse_connect(&bytes[..40]).expect("ok").expect("complete");
        assert_eq!(c.client_id, "");
        assert_eq!(c.packet_len, bytes.len());
    }

    #[test]
    fn rejects_other_protocols() {
        for bytes in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"\x16\x03\x01\x02\x00",
            b"\x30\x05\x00\x01a",
        ] {
            assert!(
                matches!(parse_connect(bytes), Err(ConnectError::NotMqtt(_))),
                "{bytes:?}"
            );
        }
        // Right packet type but a different protocol name.
        assert!(matches!(
            parse_connect(b"\x10\x0a\x00\x04ABCD\x04\x02\x00\x3c"),
            Err(ConnectError::NotMqtt(_))
        ));
    }

    #[test]
    fn rejects_malformed_connects() {
        let good = encode_connect(&opts(ProtocolLevel::V311, "abc"));
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                {
                    let mut b = good.clone();
                    b[9] |= 0x01;
                    b
                },
                "reserved flag",
            ),
            (
                {
                    let mut b = good.clone();
                    b[9] |= 0x18;
                    b
                },
                "will qos 3",
            ),
            (
                {
                    let mut b = good.clone();
                    b[9] |= 0x08;
                    b
                },
                "will qos without will",
            ),
            (
                {
                    let mut b = good.clone();
                    b[9] |= 0x40;
                    b
                },
                "password without user",
            ),
            (
                {
                    let mut b = good.clone();
                    b[1] = 5;
                    b
                },
                "remaining length too short for fields",
            ),
            (
                {
                    let mut b = good.clone();
                    b[14] = 0xff;
                    b
                },
                "client id not utf8",
            ),
            (vec![0x10, 0xff, 0xff, 0xff, 0xff, 0x01], "5-byte length"),
        ];
        for (bytes, what) in cases {
            assert!(
                matches!(parse_connect(&bytes), Err(ConnectError::Malformed(_))),
                "{what}: {:?}",
                parse_connect(&bytes)
            );
        }
        let mut b = good.clone();
        b[0] = 0x11; // CONNECT with flags set: indistinguishable from another protocol
        assert!(matches!(parse_connect(&b), Err(ConnectError::NotMqtt(_))));
        let mut b = good.clone();
        b[8] = 6;
        assert_eq!(parse_connect(&b), Err(ConnectError::UnsupportedLevel(6)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Encode → parse gives back what was encoded, for every version and field mix.
        #[test]
        fn round_trip(
            level in prop_oneof![Just(ProtocolLevel::V31), Just(ProtocolLevel::V311), Just(ProtocolLevel::V5)],
            id in "[^\u{0}]{0,40}",
            keep_alive in any::<u16>(),
            clean in any::<bool>(),
            props in proptest::collection::vec(any::<u8>(), 0..300),
            will in proptest::option::of(("[a-z/]{1,20}", proptest::collection::vec(any::<u8>(), 0..200))),
            user in proptest::option::of("[a-z]{0,20}"),
        ) {
            let o = ConnectOptions {
                level,
                client_id: id.clone(),
                keep_alive,
                clean_start: clean,
                properties: if level == ProtocolLevel::V5 { props } else { Vec::new() },
                will,
                password: user.as_ref().map(|u| u.as_bytes().to_vec()),
                username: user,
            };
            let bytes = encode_connect(&o);
            let c = parse_connect(&bytes).unwrap().unwrap();
            prop_assert_eq!(c.client_id, id);
            prop_assert_eq!(c.level, level);
            prop_assert_eq!(c.keep_alive, keep_alive);
            prop_assert_eq!(c.clean_start, clean);
            prop_assert_eq!(c.packet_len, bytes.len());
        }

        /// Arbitrary bytes never panic, and a complete answer never claims more than was read
        /// of the client ID.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_connect(&bytes);
        }

        /// Arbitrary bytes after a plausible CONNECT prefix exercise the deeper branches.
        #[test]
        fn arbitrary_tails_never_panic(
            prefix in prop_oneof![Just(&b"\x10"[..]), Just(&b"\x10\x20\x00\x04MQTT\x05"[..]), Just(&b"\x10\x20\x00\x06MQIsdp\x03"[..])],
            tail in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let mut bytes = prefix.to_vec();
            bytes.extend_from_slice(&tail);
            let whole = parse_connect(&bytes);
            // Bytes arrive in pieces: a prefix is either "need more" or already the final answer.
            for cut in 0..bytes.len() {
                match parse_connect(&bytes[..cut]) {
                    Ok(None) => {}
                    decided => prop_assert_eq!(decided, whole.clone()),
                }
            }
        }
    }
}
