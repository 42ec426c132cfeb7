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

/// A CONNACK refusing the connection because no broker is available: return code 3
/// ("server unavailable") for 3.1/3.1.1, reason 0x88 for 5.0.
pub fn connack_refusal(level: ProtocolLevel) -> &'static [u8] {
    match level {
        ProtocolLevel::V5 => &[0x20, 0x03, 0x00, 0x88, 0x00],
        _ => &[0x20, 0x02, 0x00, 0x03],
    }
}

/// A CONNACK refusing an empty client ID (rule fallback `reject`): return code 2
/// ("identifier rejected") for 3.1/3.1.1, reason 0x85 for 5.0.
pub fn connack_identifier_rejected(level: ProtocolLevel) -> &'static [u8] {
    match level {
        ProtocolLevel::V5 => &[0x20, 0x03, 0x00, 0x85, 0x00],
        _ => &[0x20, 0x02, 0x00, 0x02],
    }
}
