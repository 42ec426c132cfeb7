//! A cluster of in-process broker nodes on loopback ports, meshed with each other; a node can
//! be stopped, dropped like a machine losing power, and restarted on the same addresses.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context;

use crate::{free_port, wait_until};

/// The secret every test topology shares: the cluster's mesh, and the HA server's request
/// signatures.
pub const TEST_SECRET: &str = "mqlb-test-secret-0123456789";

/// A cluster of in-process broker nodes on ephemeral loopback ports, meshed with each other.
pub struct Cluster {
    nodes: Vec<Option<mqlb_broker::Node>>,
    pub specs: Vec<mqlb_broker::NodeSpec>,
}

fn loopbacks(n: usize) -> Vec<IpAddr> {
    vec![IpAddr::V4(Ipv4Addr::LOCALHOST); n]
}

/// Specs of nodes `n1`, `n2`, … with every listener on `ips[i]` (`127.0.0.1` for each).
fn cluster_specs(ips: &[IpAddr], factor: usize) -> anyhow::Result<Vec<mqlb_broker::NodeSpec>> {
    let mut nodes = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let at = |port| SocketAddr::new(*ip, port);
        nodes.push(mqlb_config::BrokerNode {
            id: format!("n{}", i + 1),
            mqtt: at(free_port()?),
            mqtt_v5: Some(at(free_port()?)),
            mesh: Some(at(free_port()?)),
            http: Some(at(free_port()?)),
            http_token: None,
            max_connections: std::num::NonZeroU32::new(1000).context("non-zero")?,
            max_payload_size: std::num::NonZeroU32::new(1 << 20).context("non-zero")?,
            max_inflight: std::num::NonZeroU32::new(100).context("non-zero")?,
            max_queued_messages: std::num::NonZeroU32::new(1000).context("non-zero")?,
            backlog: std::num::NonZeroU32::new(1024).context("non-zero")?,
            mqtts: None,
            mqtts_v5: None,
            tls: None,
            accept_proxy: Vec::new(),
            handshake_timeout: Duration::from_secs(10),
        });
    }
    Ok(nodes
        .iter()
        .map(|node| mqlb_broker::NodeSpec {
            node: node.clone(),
            peers: nodes
                .iter()
                .filter(|o| o.id != node.id)
                .filter_map(|o| Some((o.id.clone(), o.mesh?)))
                .collect(),
            mesh: Some(mqlb_broker::MeshSettings {
                secret: mqlb_config::Secret::new(TEST_SECRET),
                peer_queue: 10_000,
                reconnect_min: Duration::from_millis(50),
                reconnect_max: Duration::from_millis(500),
                max_payload: 1 << 20,
                replicate_sessions: true,
                replica_max_messages: 100_000,
                replication_factor: factor,
                source: None,
                tls: None,
            }),
            ha: Vec::new(),
            heartbeat_interval: Duration::from_millis(200),
            auth: mqlb_config::AuthSettings::default(),
            durable_retained: false,
        })
        .collect())
}

impl Cluster {
    /// Starts `n` nodes and waits until every mesh link is up.
    pub async fn start(n: usize) -> anyhow::Result<Cluster> {
        Self::start_with_ha(n, &[]).await
    }

    /// Starts `n` nodes that register with the HA servers at `ha`.
    pub async fn start_with_ha(n: usize, ha: &[SocketAddr]) -> anyhow::Result<Cluster> {
        Self::start_with(&loopbacks(n), ha, &mqlb_config::AuthSettings::default()).await
    }

    /// Starts node `i` on `ips[i]`, one per simulated host ([`crate::Hosts`]): their links
    /// leave from those addresses, so a partition between two hosts cuts them.
    pub async fn start_on(ips: &[IpAddr]) -> anyhow::Result<Cluster> {
        Self::start_with(ips, &[], &mqlb_config::AuthSettings::default()).await
    }

    /// [`Cluster::start_on`] with nodes that register with the HA servers at `ha`.
    pub async fn start_on_with_ha(ips: &[IpAddr], ha: &[SocketAddr]) -> anyhow::Result<Cluster> {
        Self::start_with(ips, ha, &mqlb_config::AuthSettings::default()).await
    }

    /// Starts `n` nodes with the same `[auth]` settings (password and ACL files).
    pub async fn start_with_auth(
        n: usize,
        auth: &mqlb_config::AuthSettings,
    ) -> anyhow::Result<Cluster> {
        Self::start_with(&loopbacks(n), &[], auth).await
    }

    /// Starts `n` nodes whose sessions' messages are queued on `factor` nodes (the session's
    /// own included; [`Cluster::start`] uses 2).
    pub async fn start_replicated(n: usize, factor: usize) -> anyhow::Result<Cluster> {
        Self::start_factor(
            &loopbacks(n),
            &[],
            &mqlb_config::AuthSettings::default(),
            factor,
            &|_, _| Ok(()),
            true,
        )
        .await
    }

    /// Starts `n` nodes, each `[[broker]]` changed by `shape` first (issue 15: TLS listeners on
    /// free ports, `tls`, `accept_proxy`); called again on each retry with fresh ports.
    pub async fn start_shaped(
        n: usize,
        shape: impl Fn(&mut mqlb_config::BrokerNode) -> anyhow::Result<()>,
    ) -> anyhow::Result<Cluster> {
        let auth = mqlb_config::AuthSettings::default();
        Self::start_factor(
            &loopbacks(n),
            &[],
            &auth,
            2,
            &|_, s| shape(&mut s.node),
            true,
        )
        .await
    }

    /// Starts `n` nodes whose mesh links run over mutual TLS (issue 15), each with its own
    /// certificate of `pki` for 127.0.0.1, the address its peers dial, and waits until every
    /// link is up.
    pub async fn start_tls(n: usize, pki: &crate::Pki) -> anyhow::Result<Cluster> {
        let tls = (1..=n)
            .map(|i| pki.mesh_tls(&format!("n{i}"), &["127.0.0.1"], &pki.path("ca.pem")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let c = Self::start_edited(n, |i, s| {
            if let Some(m) = &mut s.mesh {
                m.tls = Some(tls[i].clone());
            }
        })
        .await?;
        c.wait_meshed().await?;
        Ok(c)
    }

    /// Starts `n` nodes, each spec changed by `edit(i, spec)` first (its mesh TLS, its peers'
    /// addresses...), and does not wait for their links: a test of nodes that must not link
    /// waits for what it expects.
    pub async fn start_edited(
        n: usize,
        edit: impl Fn(usize, &mut mqlb_broker::NodeSpec),
    ) -> anyhow::Result<Cluster> {
        let auth = mqlb_config::AuthSettings::default();
        let edit = |i, s: &mut mqlb_broker::NodeSpec| {
            edit(i, s);
            Ok(())
        };
        Self::start_factor(&loopbacks(n), &[], &auth, 2, &edit, false).await
    }

    /// Node `i`'s MQTT 3.1.1 and 5.0 over TLS listeners (`mqtts`, `mqtts_v5`).
    pub fn mqtts(&self, i: usize) -> (Option<SocketAddr>, Option<SocketAddr>) {
        (self.specs[i].node.mqtts, self.specs[i].node.mqtts_v5)
    }

    async fn start_with(
        ips: &[IpAddr],
        ha: &[SocketAddr],
        auth: &mqlb_config::AuthSettings,
    ) -> anyhow::Result<Cluster> {
        Self::start_factor(ips, ha, auth, 2, &|_, _| Ok(()), true).await
    }

    async fn start_factor(
        ips: &[IpAddr],
        ha: &[SocketAddr],
        auth: &mqlb_config::AuthSettings,
        factor: usize,
        shape: &dyn Fn(usize, &mut mqlb_broker::NodeSpec) -> anyhow::Result<()>,
        wait: bool,
    ) -> anyhow::Result<Cluster> {
        let mut last = None;
        // A port picked free may be taken before a node binds it: try again with new ports.
        for _ in 0..3 {
            let mut specs = cluster_specs(ips, factor)?;
            for (i, s) in specs.iter_mut().enumerate() {
                s.ha = ha.to_vec();
                s.auth = auth.clone();
                shape(i, s)?;
            }
            let mut nodes = Vec::new();
            for s in &specs {
                match mqlb_broker::Node::start(s.clone()).await {
                    Ok(node) => nodes.push(Some(node)),
                    Err(e) => {
                        last = Some(e);
                        break;
                    }
                }
            }
            if nodes.len() == ips.len() {
                let c = Cluster { nodes, specs };
                if wait {
                    c.wait_meshed().await?;
                }
                return Ok(c);
            }
        }
        Err(anyhow::anyhow!("cluster did not start: {last:?}"))
    }

    pub fn len(&self) -> usize {
        self.specs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// The MQTT 3.1.1 address of node `i`.
    pub fn mqtt(&self, i: usize) -> SocketAddr {
        self.specs[i].node.mqtt
    }

    /// The MQTT 5 address of node `i`.
    pub fn mqtt_v5(&self, i: usize) -> Option<SocketAddr> {
        self.specs[i].node.mqtt_v5
    }

    /// The http endpoint (`/metrics`, `/healthz`, the status page) of node `i`.
    pub fn http(&self, i: usize) -> Option<SocketAddr> {
        self.specs[i].node.http
    }

    pub fn node(&self, i: usize) -> Option<&mqlb_broker::Node> {
        self.nodes[i].as_ref()
    }

    /// A mesh link to node `at` that has passed the handshake as node `id` (with
    /// [`TEST_SECRET`]): a test peer that sends frames of its own, well formed or not.
    pub async fn raw_peer(&self, at: usize, id: &str) -> anyhow::Result<tokio::net::TcpStream> {
        use mqlb_broker::mesh::{auth, frame};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self
            .node(at)
            .and_then(|n| n.mesh_addr)
            .with_context(|| format!("node {at} has no mesh address"))?;
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let mut buf = bytes::BytesMut::new();
        let hello = frame::Frame::Hello {
            version: frame::VERSION,
            node_id: id.into(),
            nonce: auth::nonce(),
        };
        s.write_all(&frame::encode(&hello)?).await?;
        let mut frames = Vec::new();
        // HELLO then AUTH from the node (bounded: each read adds bytes or ends).
        for _ in 0..100 {
            while let Some(f) = frame::decode(&mut buf, 1024)? {
                frames.push(f);
            }
            if frames.len() >= 2 {
                break;
            }
            anyhow::ensure!(s.read_buf(&mut buf).await? > 0, "closed in the handshake");
        }
        let Some(frame::Frame::Hello { nonce, .. }) = frames.first() else {
            anyhow::bail!("expected HELLO, got {frames:?}");
        };
        let mac = auth::mac(TEST_SECRET.as_bytes(), nonce, id);
        s.write_all(&frame::encode(&frame::Frame::Auth { mac })?)
            .await?;
        Ok(s)
    }

    /// Waits until every running node's links to every other running node are up.
    pub async fn wait_meshed(&self) -> anyhow::Result<()> {
        let running: Vec<String> = self
            .nodes
            .iter()
            .flatten()
            .map(|n| n.id().to_string())
            .collect();
        wait_until("mesh links up", Duration::from_secs(10), || async {
            self.nodes.iter().flatten().all(|n| {
                n.links()
                    .iter()
                    .all(|(peer, up)| *up || !running.contains(peer))
            })
        })
        .await
        .map(|_| ())
    }

    /// Stops node `i` like a crashed machine: every connection to it closes.
    pub async fn kill(&mut self, i: usize) {
        if let Some(n) = self.nodes[i].take() {
            n.stop().await;
        }
    }

    /// Drops node `i` without leaving the HA membership, like a machine that lost power.
    pub fn crash(&mut self, i: usize) {
        drop(self.nodes[i].take());
    }

    /// Starts node `i` again with the same addresses.
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill(i).await;
        let spec = self.specs[i].clone();
        let mut last = None;
        for _ in 0..50 {
            match mqlb_broker::Node::start(spec.clone()).await {
                Ok(n) => {
                    self.nodes[i] = Some(n);
                    return Ok(());
                }
                // The old listener may linger for a moment after the stop.
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(anyhow::anyhow!("node {i} did not restart: {last:?}"))
    }
}
