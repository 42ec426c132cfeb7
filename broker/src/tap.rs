//! Sees every PUBLISH that this node's own clients send, on its way into rumqttd.
//!
//! rumqttd's `Server` takes the MQTT codec as a type parameter; wrapping it is the one place
//! where a publish is known to come from a local client (a message injected from a peer never
//! passes through a codec), so origin needs no marker and a loop is impossible. The retain
//! flag is still set here; rumqttd clears it on live forwards.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::{Error, Packet, Protocol, Publish, PublishProperties};

use crate::mesh::frame::MeshPublish;
use crate::mesh::Mesh;

#[derive(Clone)]
pub(crate) struct Tap<P> {
    inner: P,
    mesh: Arc<Mesh>,
    /// MQTT 5 topic aliases of this connection (each connection gets its own clone).
    aliases: HashMap<u16, Bytes>,
}

impl<P> Tap<P> {
    pub(crate) fn new(inner: P, mesh: Arc<Mesh>) -> Self {
        Tap {
            inner,
            mesh,
            aliases: HashMap::new(),
        }
    }

    fn forward(&mut self, publish: &Publish, props: Option<&PublishProperties>) {
        let mut topic = publish.topic.clone();
        if let Some(alias) = props.and_then(|p| p.topic_alias) {
            if topic.is_empty() {
                match self.aliases.get(&alias) {
                    Some(t) => topic = t.clone(),
                    None => return, // rumqttd refuses it too
                }
            } else {
                self.aliases.insert(alias, topic.clone());
            }
        }
        if topic.is_empty() || topic.iter().any(|b| *b == b'+' || *b == b'#') {
            return; // invalid for a publish; rumqttd disconnects the client
        }
        let mut m = MeshPublish {
            topic,
            payload: publish.payload.clone(),
            retain: publish.retain,
            ..MeshPublish::default()
        };
        if let Some(p) = props {
            m.payload_format_indicator = p.payload_format_indicator;
            m.message_expiry_interval = p.message_expiry_interval;
            m.response_topic = p.response_topic.clone();
            m.correlation_data = p.correlation_data.clone();
            m.user_properties = p.user_properties.clone();
            m.content_type = p.content_type.clone();
        }
        self.mesh.forward_local(&m);
    }
}

impl<P: Protocol> Protocol for Tap<P> {
    fn read_mut(&mut self, stream: &mut BytesMut, max_size: usize) -> Result<Packet, Error> {
        // The fixed header of the packet about to be read: QoS and DUP are not public on
        // rumqttd's `Publish`.
        let header = stream.first().copied().unwrap_or(0);
        let packet = self.inner.read_mut(stream, max_size)?;
        if let Packet::Publish(publish, props) = &packet {
            let qos = (header >> 1) & 0b11;
            let dup = header & 0b1000 != 0;
            // A QoS 2 retransmission is delivered once by rumqttd; forward it once too.
            if !(qos == 2 && dup) {
                self.forward(publish, props.as_ref());
            }
        }
        Ok(packet)
    }

    fn write(&self, packet: Packet, write: &mut BytesMut) -> Result<usize, Error> {
        self.inner.write(packet, write)
    }
}
