//! CONNECT reader: MQTT 3.1 (`MQIsdp`, level 3), 3.1.1 (level 4) and 5.0 (level 5).
//!
//! Only the prefix up to the client ID is needed to route, so the parser stops there: a CONNECT
//! with a large will message or password is routed after its first few dozen bytes. Bytes
//! arrive in pieces, so "incomplete" is an answer (`Ok(None)`), not an error; the caller
//! bounds how long and how much it waits for.
//!
//! What it reads it checks the way a broker must, so that a CONNECT a broker would have to
//! refuse is refused at the LB with the reason code the client expects: the MQTT 5 CONNECT
//! properties (each identifier valid for CONNECT and of its data type, MQTT-2.2.2; no
//! duplicates; Receive Maximum and Maximum Packet Size not 0, MQTT-3.1.2; Request Response /
//! Problem Information 0 or 1; Authentication Data only with a Method) and UTF-8 strings
//! (MQTT-1.5.4-1, -2). The will properties, user name and password come after the client ID and
//! are the broker's to check.

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
    /// It claims to be a CONNECT but cannot be decoded (MQTT 5: reason code 0x81).
    #[error("malformed CONNECT: {0}")]
    Malformed(&'static str),
    /// A well-formed CONNECT that breaks a rule of the protocol (MQTT 5: reason code 0x82).
    #[error("CONNECT breaks the protocol: {0}")]
    Protocol(&'static str),
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
            ConnectError::Protocol(_) => "protocol_error",
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
        check_properties(c.take(props_len as usize, "properties")?)?;
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

/// The protocol level of a CONNECT whose beginning is in `buf`, once the bytes up to the level
/// have arrived and make sense: how to word a refusal for a CONNECT that failed later on.
pub fn level_of(buf: &[u8]) -> Option<ProtocolLevel> {
    if buf.first() != Some(&0x10) {
        return None;
    }
    let (remaining, n) = decode_varint(&buf[1..]).ok()??;
    let at = 1 + n;
    let mut c = Cursor {
        buf,
        pos: at,
        end: at + remaining as usize,
    };
    let name_len = c.u16("").ok()?;
    let name = c.take(name_len as usize, "").ok()?;
    match (name, c.u8("").ok()?) {
        (b"MQTT", 4) => Some(ProtocolLevel::V311),
        (b"MQTT", 5) => Some(ProtocolLevel::V5),
        (b"MQIsdp", 3) => Some(ProtocolLevel::V31),
        _ => None,
    }
}

/// Checks MQTT 5 CONNECT properties (all of them are in `props`).
fn check_properties(props: &[u8]) -> Result<(), ConnectError> {
    let malformed = ConnectError::Malformed;
    let mut seen = 0u64; // bit per identifier below 64: every CONNECT property is
    let mut auth_method = false;
    let mut auth_data = false;
    let mut rest = props;
    // Reads `n` bytes of the property value, or says the property runs past the list.
    fn take<'a>(
        rest: &mut &'a [u8],
        n: usize,
        what: &'static str,
    ) -> Result<&'a [u8], ConnectError> {
        if rest.len() < n {
            return Err(ConnectError::Malformed(what));
        }
        let (v, r) = rest.split_at(n);
        *rest = r;
        Ok(v)
    }
    fn utf8<'a>(rest: &mut &'a [u8], what: &'static str) -> Result<&'a str, ConnectError> {
        let len = take(rest, 2, what)?;
        let len = u16::from_be_bytes([len[0], len[1]]) as usize;
        let s = std::str::from_utf8(take(rest, len, what)?)
            .map_err(|_| ConnectError::Malformed(what))?;
        if s.contains('\0') {
            return Err(ConnectError::Malformed(what));
        }
        Ok(s)
    }
    while !rest.is_empty() {
        let (id, n) = decode_varint(rest)?.ok_or(malformed("property identifier cut short"))?;
        rest = &rest[n..];
        if id < 64 {
            if id != 0x26 && seen & (1 << id) != 0 {
                return Err(ConnectError::Protocol("a CONNECT property appears twice"));
            }
            seen |= 1 << id;
        }
        match id {
            0x11 => {
                take(&mut rest, 4, "session expiry interval")?;
            }
            0x21 => {
                let v = take(&mut rest, 2, "receive maximum")?;
                if v == [0, 0] {
                    return Err(ConnectError::Protocol("receive maximum 0"));
                }
            }
            0x27 => {
                let v = take(&mut rest, 4, "maximum packet size")?;
                if v == [0, 0, 0, 0] {
                    return Err(ConnectError::Protocol("maximum packet size 0"));
                }
            }
            0x22 => {
                take(&mut rest, 2, "topic alias maximum")?;
            }
            0x19 | 0x17 => {
                if take(&mut rest, 1, "request response/problem information")?[0] > 1 {
                    return Err(ConnectError::Protocol(
                        "request response/problem information other than 0 or 1",
                    ));
                }
            }
            0x26 => {
                utf8(&mut rest, "user property name")?;
                utf8(&mut rest, "user property value")?;
            }
            0x15 => {
                utf8(&mut rest, "authentication method")?;
                auth_method = true;
            }
            0x16 => {
                let len = take(&mut rest, 2, "authentication data")?;
                take(
                    &mut rest,
                    u16::from_be_bytes([len[0], len[1]]) as usize,
                    "authentication data",
                )?;
                auth_data = true;
            }
            _ => return Err(malformed("a property that CONNECT cannot carry")),
        }
    }
    if auth_data && !auth_method {
        return Err(ConnectError::Protocol(
            "authentication data without an authentication method",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{encode_connect, ConnectOptions};
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

    /// A v5 CONNECT with these raw property bytes.
    fn v5_with(props: &[u8]) -> Vec<u8> {
        let mut o = opts(ProtocolLevel::V5, "dev");
        o.properties = props.to_vec();
        encode_connect(&o)
    }

    #[test]
    fn checks_mqtt5_connect_properties() {
        let ok: &[&[u8]] = &[
            &[],
            &[0x11, 0, 0, 0, 10, 0x21, 0, 20, 0x27, 0, 0, 1, 0, 0x22, 0, 5],
            &[0x19, 1, 0x17, 0],
            &[0x26, 0, 1, b'a', 0, 1, b'b', 0x26, 0, 1, b'a', 0, 0], // user properties repeat
            &[0x15, 0, 4, b'S', b'C', b'R', b'M', 0x16, 0, 2, 1, 2],
        ];
        for props in ok {
            let c = parse_connect(&v5_with(props));
            assert!(matches!(c, Ok(Some(_))), "{props:?}: {c:?}");
        }
        let protocol: &[&[u8]] = &[
            &[0x21, 0, 0],                         // receive maximum 0
            &[0x27, 0, 0, 0, 0],                   // maximum packet size 0
            &[0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2], // twice
            &[0x19, 2],                            // request response information 2
            &[0x17, 7],                            // request problem information 7
            &[0x16, 0, 1, 9],                      // authentication data, no method
        ];
        for props in protocol {
            let c = parse_connect(&v5_with(props));
            assert!(
                matches!(c, Err(ConnectError::Protocol(_))),
                "{props:?}: {c:?}"
            );
        }
        let malformed: &[&[u8]] = &[
            &[0x01, 1],                      // payload format indicator: a PUBLISH/will property
            &[0x7f],                         // no such property
            &[0x21, 0],                      // value cut short
            &[0x26, 0, 2, 0xff, 0xfe, 0, 0], // user property name not UTF-8
            &[0x15, 0, 1, 0],                // U+0000 in a string
            &[0x80, 0x80, 0x80, 0x80, 0x01], // identifier longer than a varint
        ];
        for props in malformed {
            let c = parse_connect(&v5_with(props));
            assert!(
                matches!(c, Err(ConnectError::Malformed(_))),
                "{props:?}: {c:?}"
            );
        }
    }

    #[test]
    fn the_level_is_known_from_the_first_bytes() {
        for level in [ProtocolLevel::V31, ProtocolLevel::V311, ProtocolLevel::V5] {
            let bytes = encode_connect(&opts(level, "some-client"));
            let at = if level == ProtocolLevel::V31 { 11 } else { 9 };
            assert_eq!(level_of(&bytes[..at]), Some(level));
            assert_eq!(level_of(&bytes[..at - 1]), None);
        }
        assert_eq!(level_of(b"GET / HTTP/1.1"), None);
        assert_eq!(level_of(b"\x10\x0a\x00\x04MQTT\x06"), None);
    }

    /// Property lists made of valid CONNECT properties (user properties repeated at will).
    fn valid_properties() -> impl Strategy<Value = Vec<u8>> {
        (
            proptest::option::of(any::<u32>()),
            proptest::option::of(1u16..),
            proptest::collection::vec(("[a-z]{0,8}", "[a-z0-9]{0,8}"), 0..4),
        )
            .prop_map(|(expiry, recv_max, users)| {
                let mut p = Vec::new();
                if let Some(e) = expiry {
                    p.push(0x11);
                    p.extend_from_slice(&e.to_be_bytes());
                }
                if let Some(r) = recv_max {
                    p.push(0x21);
                    p.extend_from_slice(&r.to_be_bytes());
                }
                for (k, v) in users {
                    p.push(0x26);
                    for s in [k, v] {
                        p.extend_from_slice(&(s.len() as u16).to_be_bytes());
                        p.extend_from_slice(s.as_bytes());
                    }
                }
                p
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Arbitrary property bytes never panic: a CONNECT is parsed, or refused as malformed
        /// or as breaking the protocol.
        #[test]
        fn arbitrary_properties_never_panic(props in proptest::collection::vec(any::<u8>(), 0..300)) {
            match parse_connect(&v5_with(&props)) {
                Ok(Some(_)) | Err(ConnectError::Malformed(_) | ConnectError::Protocol(_)) => {}
                other => prop_assert!(false, "{:?}", other),
            }
        }

        /// Encode → parse gives back what was encoded, for every version and field mix.
        #[test]
        fn round_trip(
            level in prop_oneof![Just(ProtocolLevel::V31), Just(ProtocolLevel::V311), Just(ProtocolLevel::V5)],
            id in "[^\u{0}]{0,40}",
            keep_alive in any::<u16>(),
            clean in any::<bool>(),
            props in valid_properties(),
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
        /// of the client ID: the ID it returns is in the bytes.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(Some(c)) = parse_connect(&bytes) {
                let id = c.client_id.as_bytes();
                prop_assert!(
                    id.is_empty() || bytes.windows(id.len()).any(|w| w == id),
                    "client ID {:?} is not in the input",
                    c.client_id
                );
            }
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
