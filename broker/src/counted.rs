//! Counts the PUBLISH packets that cross a client's connection, by QoS, in the codec under
//! the [`crate::tap`]: every packet to and from a local client passes here, and only theirs (a
//! peer's message enters the router through a local link, never a codec), so the counts are
//! the node's client traffic (`mqlb_broker_messages_received_total`, `..._sent_total`, and
//! of those sent, `mqlb_broker_messages_redelivered_total`).

use std::sync::Arc;

use bytes::BytesMut;
use rumqttd::protocol::{Error, Packet, Protocol};

use crate::metrics::Metrics;

/// rumqttd's codec `P`, counting.
#[derive(Clone)]
pub(crate) struct Counted<P> {
    inner: P,
    metrics: Arc<Metrics>,
}

impl<P> Counted<P> {
    pub(crate) fn new(inner: P, metrics: Arc<Metrics>) -> Counted<P> {
        Counted { inner, metrics }
    }
}

/// The DUP flag of a PUBLISH's fixed header.
const DUP: u8 = 0b1000;

/// The QoS in a PUBLISH's fixed header (rumqttd keeps `Publish::qos` private); 3, invalid,
/// is refused by the codec before it gets here.
fn qos(header: u8) -> usize {
    usize::from((header >> 1) & 0b11).min(2)
}

impl<P: Protocol> Protocol for Counted<P> {
    fn read_mut(&mut self, stream: &mut BytesMut, max_size: usize) -> Result<Packet, Error> {
        let header = stream.first().copied().unwrap_or(0);
        let packet = self.inner.read_mut(stream, max_size)?;
        if matches!(packet, Packet::Publish(..)) {
            self.metrics.messages_received[qos(header)].inc();
        }
        Ok(packet)
    }

    fn write(&self, packet: Packet, write: &mut BytesMut) -> Result<usize, Error> {
        let start = write.len();
        let publish = matches!(packet, Packet::Publish(..));
        let n = self.inner.write(packet, write)?;
        if publish {
            if let Some(header) = write.get(start) {
                self.metrics.messages_sent[qos(*header)].inc();
                if header & DUP != 0 {
                    self.metrics.messages_redelivered.inc();
                }
            }
        }
        Ok(n)
    }

    fn empty_client_id_needs_clean_session(&self) -> bool {
        self.inner.empty_client_id_needs_clean_session()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::{v4::V4, Publish, QoS};

    /// Each PUBLISH written and read is counted once under its QoS, a re-sent one (DUP 1) also
    /// as redelivered; other packets are not.
    #[test]
    fn publishes_are_counted_by_qos() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let mut codec = Counted::new(V4, metrics.clone());
        let mut buf = BytesMut::new();
        for qos in [
            QoS::AtMostOnce,
            QoS::AtLeastOnce,
            QoS::ExactlyOnce,
            QoS::AtLeastOnce,
        ] {
            let p = Publish::new("t", "x", false).with_qos(qos, 7);
            codec.write(Packet::Publish(p, None), &mut buf).unwrap();
        }
        // A QoS 1 PUBLISH with DUP 1 (rumqttd's `Publish` keeps the flag private): "t", id 7.
        let mut dup = BytesMut::from(&[0x3a, 6, 0, 1, b't', 0, 7, b'x'][..]);
        let again = V4.read_mut(&mut dup, 1024).unwrap();
        codec.write(again, &mut buf).unwrap();
        codec
            .write(Packet::PingResp(rumqttd::protocol::PingResp), &mut buf)
            .unwrap();
        let sent: Vec<u64> = metrics.messages_sent.iter().map(|c| c.get()).collect();
        assert_eq!(sent, [1, 3, 1]);
        assert_eq!(metrics.messages_redelivered.get(), 1, "only the DUP 1 one");
        let mut packets = 0;
        while !buf.is_empty() && packets < 10 {
            codec.read_mut(&mut buf, 1024).unwrap();
            packets += 1;
        }
        assert_eq!(packets, 6);
        let received: Vec<u64> = metrics.messages_received.iter().map(|c| c.get()).collect();
        assert_eq!(received, [1, 3, 1]);
    }
}
