//! A starting node's retained messages from the HA servers' database, into its router through
//! a local link of their own, before the node serves (see the module above for why then).
//! Each keeps the QoS it was published with: QoS 1 and 2 ones are acknowledged by the router
//! (a QoS 2 one is stored only once the PUBREL this link sends for its PUBREC arrives), and the
//! load waits for every acknowledgement, so the messages are in the router when it ends.

use std::collections::HashSet;
use std::time::Duration;

use mqlb_ha_api::retained::RetainedEntry;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{
    Disconnect, DisconnectReasonCode, Packet, PubRel, PubRelReason, Publish, QoS,
};

use super::publish_of;

/// Messages given to the router before waiting for their acknowledgements (packet ids 1..=).
const CHUNK: usize = 100;

#[derive(Debug, thiserror::Error)]
pub(crate) enum LoadError {
    #[error("the router refused a retained message: {0}")]
    Router(String),
    #[error("the router did not acknowledge the retained messages within {0:?}")]
    Timeout(Duration),
}

/// Gives `entries` to the router on `link`; returns how many it took (expired ones are not
/// given). `now_ms`: the wall clock, for their expiry left. Ends the link afterwards.
pub(crate) async fn into_router(
    entries: Vec<RetainedEntry>,
    link_tx: &mut LinkTx,
    link_rx: &mut LinkRx,
    now_ms: i64,
    within: Duration,
) -> Result<usize, LoadError> {
    let deadline = tokio::time::Instant::now() + within;
    let router = |e: rumqttd::local::LinkError| LoadError::Router(e.to_string());
    let mut loaded = 0;
    let mut entries = entries.into_iter().peekable();
    while entries.peek().is_some() {
        let mut waiting = HashSet::new();
        for (i, e) in entries.by_ref().take(CHUNK).enumerate() {
            let Some(mut m) = publish_of(e, now_ms) else {
                continue;
            };
            let props = crate::tap::take_properties(&mut m);
            let (qos, pkid) = match m.qos {
                0 => (QoS::AtMostOnce, 0),
                1 => (QoS::AtLeastOnce, i as u16 + 1),
                _ => (QoS::ExactlyOnce, i as u16 + 1),
            };
            let publish = Publish::new(m.topic, m.payload, true).with_qos(qos, pkid);
            link_tx
                .send(Packet::Publish(publish, props))
                .await
                .map_err(router)?;
            if pkid != 0 {
                waiting.insert(pkid);
            }
            loaded += 1;
        }
        while !waiting.is_empty() {
            let next = tokio::time::timeout_at(deadline, link_rx.next())
                .await
                .map_err(|_| LoadError::Timeout(within))?
                .map_err(router)?;
            match next.and_then(Option::<Packet>::from) {
                Some(Packet::PubAck(ack, _)) => {
                    waiting.remove(&ack.pkid);
                }
                Some(Packet::PubRec(rec, _)) => {
                    let rel = PubRel {
                        pkid: rec.pkid,
                        reason: PubRelReason::Success,
                    };
                    link_tx
                        .send(Packet::PubRel(rel, None))
                        .await
                        .map_err(router)?;
                }
                Some(Packet::PubComp(comp, _)) => {
                    waiting.remove(&comp.pkid);
                }
                _ => {}
            }
        }
    }
    let bye = Disconnect {
        reason_code: DisconnectReasonCode::NormalDisconnection,
    };
    link_tx
        .send(Packet::Disconnect(bye, None))
        .await
        .map_err(router)?;
    Ok(loaded)
}
