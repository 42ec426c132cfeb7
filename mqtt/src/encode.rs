//! The packets the LB writes itself: CONNECT (the `mqtt` probe, tests, benchmarks) and a
//! CONNACK that tells a client no broker is available, in its own protocol version.

use super::{encode_varint, ProtocolLevel};

/// Fields of a CONNECT to encode. `properties` is raw v5 property bytes (ignored below v5).
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub level: ProtocolLevel,
    pub client_id: String,
    pub keep_alive: u16,
    pub clean_start: bool,
    pub properties: Vec<u8>,
    pub will: Option<(String, Vec<u8>)>,
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            level: ProtocolLevel::V311,
            client_id: String::new(),
            keep_alive: 60,
            clean_start: true,
            properties: Vec::new(),
            will: None,
            username: None,
            password: None,
        }
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    // Callers keep strings under 64 KiB; longer ones are cut rather than mis-framed.
    let len = b.len().min(u16::MAX as usize);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&b[..len]);
}

/// Encodes a CONNECT packet.
pub fn encode_connect(o: &ConnectOptions) -> Vec<u8> {
    let v5 = o.level == ProtocolLevel::V5;
    let mut body = Vec::with_capacity(64);
    match o.level {
        ProtocolLevel::V31 => put_bytes(&mut body, b"MQIsdp"),
        _ => put_bytes(&mut body, b"MQTT"),
    }
    body.push(o.level as u8);
    let mut flags = 0u8;
    if o.clean_start {
        flags |= 0x02;
    }
    if o.will.is_some() {
        flags |= 0x04;
    }
    if o.username.is_some() {
        flags |= 0x80;
    }
    if o.password.is_some() {
        flags |= 0x40;
        if !v5 {
            flags |= 0x80; // 3.1.1 forbids a password without a user name
        }
    }
    body.push(flags);
    body.extend_from_slice(&o.keep_alive.to_be_bytes());
    if v5 {
        encode_varint(o.properties.len() as u32, &mut body);
        body.extend_from_slice(&o.properties);
    }
    put_bytes(&mut body, o.client_id.as_bytes());
    if let Some((topic, payload)) = &o.will {
        if v5 {
            body.push(0); // no will properties
        }
        put_bytes(&mut body, topic.as_bytes());
        put_bytes(&mut body, payload);
    }
    if flags & 0x80 != 0 {
        put_bytes(&mut body, o.username.as_deref().unwrap_or("").as_bytes());
    }
    if let Some(p) = &o.password {
        put_bytes(&mut body, p);
    }
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(0x10);
    encode_varint(body.len() as u32, &mut out);
    out.extend_from_slice(&body);
    out
}

/// Why the LB refuses a client before any broker saw it, worded per protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No broker is available: 3.1.1 return code 3, MQTT 5 reason 0x88.
    ServerUnavailable,
    /// Empty client ID under `fallback = "reject"`, or (3.x) a client ID longer than the LB
    /// reads: return code 2, reason 0x85.
    IdentifierRejected,
    /// A CONNECT that cannot be decoded: MQTT 5 reason 0x81; 3.x has no code (MQTT-4.8.0-1:
    /// close the connection).
    Malformed,
    /// A CONNECT that breaks a protocol rule: MQTT 5 reason 0x82; 3.x has no code.
    ProtocolError,
    /// The CONNECT is larger than the LB reads before the client ID ends: MQTT 5 reason 0x95.
    PacketTooLarge,
    /// A protocol level the LB does not know: return code 1 (unacceptable protocol version),
    /// in the 3.1.1 format every MQTT client reads (MQTT 5's 0x84 is only legible to a client
    /// that speaks 5, which would not be refused for its level).
    UnsupportedVersion,
}

/// The CONNACK that tells a client of `level` why it is refused, or `None` where the version
/// has no code for it and the connection is just closed.
pub fn connack(level: ProtocolLevel, why: Refusal) -> Option<&'static [u8]> {
    let v5 = level == ProtocolLevel::V5;
    Some(match (why, v5) {
        (Refusal::ServerUnavailable, true) => &[0x20, 0x03, 0x00, 0x88, 0x00],
        (Refusal::ServerUnavailable, false) => &[0x20, 0x02, 0x00, 0x03],
        (Refusal::IdentifierRejected, true) => &[0x20, 0x03, 0x00, 0x85, 0x00],
        (Refusal::IdentifierRejected, false) => &[0x20, 0x02, 0x00, 0x02],
        (Refusal::Malformed, true) => &[0x20, 0x03, 0x00, 0x81, 0x00],
        (Refusal::ProtocolError, true) => &[0x20, 0x03, 0x00, 0x82, 0x00],
        (Refusal::PacketTooLarge, true) => &[0x20, 0x03, 0x00, 0x95, 0x00],
        // 3.x: a client ID is all that precedes its own end.
        (Refusal::PacketTooLarge, false) => &[0x20, 0x02, 0x00, 0x02],
        (Refusal::UnsupportedVersion, _) => &[0x20, 0x02, 0x00, 0x01],
        (Refusal::Malformed | Refusal::ProtocolError, false) => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_in_each_version() {
        use ProtocolLevel::{V311, V5};
        let code = |level, why| connack(level, why).map(|b| b[3]);
        assert_eq!(code(V5, Refusal::Malformed), Some(0x81));
        assert_eq!(code(V5, Refusal::ProtocolError), Some(0x82));
        assert_eq!(code(V5, Refusal::PacketTooLarge), Some(0x95));
        assert_eq!(code(V5, Refusal::ServerUnavailable), Some(0x88));
        assert_eq!(code(V311, Refusal::ServerUnavailable), Some(0x03));
        assert_eq!(code(V311, Refusal::PacketTooLarge), Some(0x02));
        assert_eq!(code(V311, Refusal::Malformed), None);
        assert_eq!(
            connack(V5, Refusal::UnsupportedVersion),
            Some(&[0x20, 2, 0, 1][..])
        );
        for why in [
            Refusal::Malformed,
            Refusal::PacketTooLarge,
            Refusal::IdentifierRejected,
        ] {
            let b = connack(V5, why).expect("MQTT 5 has a code");
            assert_eq!(
                (b[0], b[1] as usize),
                (0x20, b.len() - 2),
                "{why:?}: a whole CONNACK"
            );
        }
    }
}
