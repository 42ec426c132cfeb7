//! Where the MQTT packets of the server → client stream begin and end, so an evacuation can
//! end that stream *between* two packets and put a DISCONNECT there (`relay`, `copy`).
//!
//! Past the CONNECT the LB is L4: it copies bytes, and a DISCONNECT written into the middle of
//! a packet would be garbage to the client. The relay sees the server's stream from its first
//! byte (the CONNACK; nothing is read from the backend before the relay), so following the
//! packet lengths from there is enough to know the boundaries: a fixed header byte, the
//! Remaining Length (1 to 4 bytes), then that many bytes. Cheap: the framer looks at header
//! bytes only and skips bodies by length, so it never holds bytes and works with `splice(2)`
//! too (a splice is bounded by the body left of the packet under way).

/// The position in the server → client stream, in packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framer {
    /// Not MQTT (or the stream broke the framing): boundaries unknown.
    Off,
    /// Between two packets: the next byte is a fixed header's first.
    Boundary,
    /// Inside the Remaining Length: its value so far and the shift of its next byte.
    Length { value: u32, shift: u8 },
    /// Inside a packet's variable header and payload: bytes left.
    Body { left: u32 },
}

impl Framer {
    /// A framer for a stream whose packets are followed (`true`), or not.
    pub(crate) fn new(mqtt: bool) -> Framer {
        if mqtt {
            Framer::Boundary
        } else {
            Framer::Off
        }
    }

    pub(crate) fn is_off(&self) -> bool {
        *self == Framer::Off
    }

    pub(crate) fn at_boundary(&self) -> bool {
        *self == Framer::Boundary
    }

    /// Follows bytes that passed through the relay.
    pub(crate) fn feed(&mut self, mut bytes: &[u8]) {
        while let Some((&b, rest)) = bytes.split_first() {
            match *self {
                Framer::Off => return,
                Framer::Boundary => {
                    *self = Framer::Length { value: 0, shift: 0 };
                    bytes = rest;
                }
                Framer::Length { value, shift } => {
                    let value = value | (u32::from(b & 0x7f) << shift);
                    *self = if b & 0x80 == 0 {
                        if value == 0 {
                            Framer::Boundary
                        } else {
                            Framer::Body { left: value }
                        }
                    } else if shift >= 21 {
                        // A fifth length byte: not MQTT any more; stop guessing.
                        Framer::Off
                    } else {
                        Framer::Length {
                            value,
                            shift: shift + 7,
                        }
                    };
                    bytes = rest;
                }
                Framer::Body { left } => {
                    let n = bytes.len().min(left as usize);
                    // n <= left, a u32
                    let left = left - n as u32;
                    *self = if left == 0 {
                        Framer::Boundary
                    } else {
                        Framer::Body { left }
                    };
                    bytes = &bytes[n..];
                }
            }
        }
    }

    /// Follows `n` bytes that passed unseen (spliced); they must lie inside the body under way
    /// ([`splice_limit`](Self::splice_limit)), or the framing is lost.
    pub(crate) fn skip(&mut self, n: usize) {
        match *self {
            Framer::Off => {}
            Framer::Body { left } if n <= left as usize => {
                // n <= left, a u32
                let left = left - n as u32;
                *self = if left == 0 {
                    Framer::Boundary
                } else {
                    Framer::Body { left }
                };
            }
            _ if n == 0 => {}
            _ => *self = Framer::Off,
        }
    }

    /// How many bytes may pass unseen now: the body left of the packet under way, nothing
    /// while a header is read, anything without framing.
    pub(crate) fn splice_limit(&self) -> usize {
        match *self {
            Framer::Off => usize::MAX,
            Framer::Body { left } => left as usize,
            Framer::Boundary | Framer::Length { .. } => 0,
        }
    }

    /// How many bytes to read at most so that a read ends exactly at the next boundary, and
    /// never beyond it (an evacuation stops there): none at a boundary, one at a time inside a
    /// header, the rest of a body.
    pub(crate) fn read_limit(&self) -> usize {
        match *self {
            Framer::Off => usize::MAX,
            Framer::Boundary => 0,
            Framer::Length { .. } => 1,
            Framer::Body { left } => left as usize,
        }
    }
}

/// MQTT 5 DISCONNECT 0x9C (Use another server), with a Server Reference property when one is
/// configured (MQTT 5, 3.14.2.2.5): what an evacuated MQTT 5 client is told.
pub(crate) const USE_ANOTHER_SERVER: u8 = 0x9C;

/// An MQTT 5 DISCONNECT with `reason` and, if given, a Server Reference (at most 1024 bytes,
/// checked at config load).
pub(crate) fn disconnect_v5(reason: u8, server_reference: Option<&str>) -> Vec<u8> {
    let mut props = Vec::new();
    if let Some(r) = server_reference {
        let r = &r.as_bytes()[..r.len().min(usize::from(u16::MAX))];
        props.push(0x1C);
        // at most u16::MAX, cut above
        props.extend_from_slice(&(r.len() as u16).to_be_bytes());
        props.extend_from_slice(r);
    }
    let mut body = vec![reason];
    put_varint(&mut body, props.len());
    body.extend_from_slice(&props);
    let mut packet = vec![0xE0];
    put_varint(&mut packet, body.len());
    packet.extend_from_slice(&body);
    packet
}

/// MQTT's Variable Byte Integer.
fn put_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PUBLISH of `payload` bytes on topic "t" (QoS 0).
    fn publish(payload: usize) -> Vec<u8> {
        let mut body = vec![0, 1, b't'];
        body.extend(std::iter::repeat_n(b'x', payload));
        let mut p = vec![0x30];
        put_varint(&mut p, body.len());
        p.extend(body);
        p
    }

    #[test]
    fn boundaries_are_found_whatever_the_reads_cut() {
        let mut stream = vec![0x20, 2, 0, 0]; // CONNACK
        stream.extend(publish(5));
        stream.extend(publish(300)); // two length bytes
        stream.extend([0xD0, 0]); // PINGRESP, empty body
        stream.extend(publish(20_000)); // three length bytes
        let ends = {
            let mut f = Framer::new(true);
            let mut ends = Vec::new();
            for (i, b) in stream.iter().enumerate() {
                f.feed(std::slice::from_ref(b));
                if f.at_boundary() {
                    ends.push(i + 1);
                }
            }
            ends
        };
        assert_eq!(ends.len(), 5, "{ends:?}");
        assert_eq!(*ends.last().expect("end"), stream.len());
        // Any cut of the stream into reads ends at the same boundaries.
        for chunk in [1, 2, 3, 7, 64, 4096, stream.len()] {
            let mut f = Framer::new(true);
            let mut at = 0;
            for c in stream.chunks(chunk) {
                f.feed(c);
                at += c.len();
                assert_eq!(f.at_boundary(), ends.contains(&at), "chunk {chunk} at {at}");
            }
        }
    }

    #[test]
    fn reads_bounded_by_the_limits_stop_exactly_at_a_boundary() {
        let mut stream = publish(100);
        stream.extend(publish(70_000));
        let mut f = Framer::new(true);
        let mut at = 0;
        // Header bytes one at a time, bodies in one read (or spliced): never past the end.
        while at < stream.len() {
            // At a boundary an evacuation stops; to walk on, read the next header byte.
            let lim = if f.at_boundary() { 1 } else { f.read_limit() };
            let lim = lim.min(stream.len() - at);
            assert!(lim > 0, "stuck at {at}");
            if f.splice_limit() > 0 {
                f.skip(lim);
            } else {
                f.feed(&stream[at..at + lim]);
            }
            at += lim;
        }
        assert!(f.at_boundary());
        assert_eq!(f.read_limit(), 0, "at a boundary nothing more is read");
    }

    #[test]
    fn a_splice_past_the_body_or_a_fifth_length_byte_turns_framing_off() {
        let mut f = Framer::new(true);
        f.feed(&[0x30, 10]);
        f.skip(11);
        assert!(f.is_off());
        let mut f = Framer::new(true);
        f.feed(&[0x30, 0xff, 0xff, 0xff, 0xff]);
        assert!(f.is_off());
        assert_eq!(f.read_limit(), usize::MAX);
        assert!(Framer::new(false).is_off());
    }

    #[test]
    fn the_disconnect_carries_the_reason_and_the_reference() {
        assert_eq!(disconnect_v5(USE_ANOTHER_SERVER, None), [0xE0, 2, 0x9C, 0]);
        let d = disconnect_v5(USE_ANOTHER_SERVER, Some("mqtt2.example:1883"));
        assert_eq!(&d[..6], &[0xE0, 23, 0x9C, 21, 0x1C, 0]);
        assert_eq!(d[6] as usize, "mqtt2.example:1883".len());
        assert_eq!(&d[7..], b"mqtt2.example:1883");
        // The framer reads it as one packet.
        let mut f = Framer::new(true);
        f.feed(&d);
        assert!(f.at_boundary());
    }
}
