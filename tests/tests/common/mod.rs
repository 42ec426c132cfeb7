//! What the LB tests share: an LB in front of mosquitto brokers (`topo`), an LB in front of
//! one plain TCP backend (`tcp_lb_toml`, `count_then_reply_server`), and raw MQTT over any
//! stream (`mqtt_connect`, `ping`).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use mqlb_config::Config;
use mqlb_lb::{Lb, Listeners};
use mqlb_mqtt::{encode_connect, ConnectOptions};
use mqlb_tests::{Mosquitto, TempDir};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

pub struct Topo {
    pub brokers: Vec<Mosquitto>,
    pub lb: Lb,
    pub front: SocketAddr,
    pub admin: SocketAddr,
    pub config_file: std::path::PathBuf,
    pub _dir: TempDir,
}

/// The TOML of an LB in front of `brokers`, with extra keys for the rule.
pub fn lb_toml(brokers: &[&Mosquitto], rule_extra: &str, v5_on_alt: bool) -> String {
    let mut t = String::from(
        "[lb]\nadmin = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\nwatch_config = false\n\
         [[frontend]]\nname = \"mqtt\"\nbind = \"127.0.0.1:0\"\n\
         [[pool]]\nname = \"brokers\"\nprobe = \"alive\"\n",
    );
    for (i, b) in brokers.iter().enumerate() {
        t += &format!(
            "[[pool.backend]]\nid = \"b{}\"\naddr = \"{}\"\n",
            i + 1,
            b.addr()
        );
        if v5_on_alt {
            t += &format!("mqtt_ports = {{ v5 = {} }}\n", b.alt_port);
        }
    }
    t += "[[probe]]\nname = \"alive\"\nprotocol = \"tcp\"\nport = \"traffic\"\n\
          interval = \"1s\"\ntimeout = \"500ms\"\nthreshold = 1\n\
          [[rule]]\nname = \"mqtt\"\nfrontend = \"mqtt\"\npool = \"brokers\"\n";
    t += rule_extra;
    t
}

pub async fn topo(n: usize, rule_extra: &str) -> anyhow::Result<Topo> {
    topo_with(n, rule_extra, false).await
}

pub async fn topo_with(n: usize, rule_extra: &str, v5_on_alt: bool) -> anyhow::Result<Topo> {
    let mut brokers = Vec::new();
    for _ in 0..n {
        brokers.push(Mosquitto::start().await?);
    }
    let dir = TempDir::new("lb")?;
    let file = dir.path().join("lb.toml");
    let refs: Vec<&Mosquitto> = brokers.iter().collect();
    std::fs::write(&file, lb_toml(&refs, rule_extra, v5_on_alt))?;
    let cfg = Config::load(&file)?;
    let lb = Lb::start(cfg, Listeners::default()).await?;
    let front = lb
        .frontend_addr("mqtt")
        .ok_or_else(|| anyhow::anyhow!("frontend not open"))?;
    let admin = lb.admin_addr();
    Ok(Topo {
        brokers,
        lb,
        front,
        admin,
        config_file: file,
        _dir: dir,
    })
}

pub const DEADLINE: Duration = Duration::from_secs(10);

/// A backend that reads until EOF, then answers with the byte count and closes: it only
/// answers if the client's FIN got through while the other direction stayed open.
pub async fn count_then_reply_server() -> anyhow::Result<std::net::SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut n = 0usize;
                let mut buf = [0u8; 8192];
                while let Ok(k) = s.read(&mut buf).await {
                    if k == 0 {
                        break;
                    }
                    n += k;
                }
                if let Err(e) = s.write_all(format!("got {n}").as_bytes()).await {
                    eprintln!("count server: {e}");
                }
            });
        }
    });
    Ok(addr)
}

/// The TOML of an LB with one frontend `f` in front of one TCP backend `only`, extra keys for
/// its rule `r`.
pub fn tcp_lb_toml(backend: std::net::SocketAddr, extra_rule: &str) -> String {
    format!(
        "[lb]\nadmin = \"127.0.0.1:0\"\nwatch_config = false\n\
         [[frontend]]\nname = \"f\"\nbind = \"127.0.0.1:0\"\n\
         [[pool]]\nname = \"p\"\nprobe = \"t\"\n[[pool.backend]]\nid = \"only\"\naddr = \"{backend}\"\n\
         [[probe]]\nname = \"t\"\nport = \"traffic\"\ninterval = \"1s\"\ntimeout = \"500ms\"\n\
         [[rule]]\nname = \"r\"\nfrontend = \"f\"\npool = \"p\"\n{extra_rule}"
    )
}

/// Reads until the LB closes the connection; fails if it stays open past [`DEADLINE`].
pub async fn read_until_closed(s: &mut tokio::net::TcpStream) -> anyhow::Result<Vec<u8>> {
    let mut all = Vec::new();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(DEADLINE, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("connection not closed within {DEADLINE:?}"))?;
    Ok(all)
}

/// The backend the LB's `/api/connections` lists `client_id` on, once it is listed (within
/// [`DEADLINE`]).
pub async fn backend_of(admin: SocketAddr, client_id: &str) -> anyhow::Result<String> {
    let start = std::time::Instant::now();
    loop {
        let listed = mqlb_tests::connections(admin).await?;
        if let Some((_, b, _)) = listed.into_iter().find(|(id, _, _)| id == client_id) {
            return Ok(b);
        }
        if start.elapsed() > DEADLINE {
            anyhow::bail!("{client_id} not in /api/connections within {DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Backends `ids`, all eligible and equally weighted, as the LB's rendezvous hashing sees
/// them: what a test predicts a key's backend with.
pub fn candidates(ids: &[&str]) -> Vec<mqlb_lb::select::Candidate> {
    ids.iter()
        .map(|id| mqlb_lb::select::Candidate {
            hash: mqlb_lb::select::backend_hash(id),
            weight: 1,
            active: 0,
            eligible: true,
        })
        .collect()
}

/// Sends an MQTT 3.1.1 CONNECT for `client_id` and reads the 4-byte CONNACK.
pub async fn mqtt_connect(
    s: &mut (impl AsyncRead + AsyncWrite + Unpin),
    client_id: &str,
) -> anyhow::Result<[u8; 4]> {
    s.write_all(&encode_connect(&ConnectOptions {
        client_id: client_id.into(),
        ..Default::default()
    }))
    .await?;
    s.flush().await?;
    let mut connack = [0u8; 4];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut connack)).await??;
    Ok(connack)
}

/// A PINGREQ answered by the broker: the connection still carries MQTT both ways.
pub async fn ping(s: &mut (impl AsyncRead + AsyncWrite + Unpin)) -> anyhow::Result<()> {
    s.write_all(&[0xc0, 0]).await?;
    s.flush().await?;
    let mut pong = [0u8; 2];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut pong)).await??;
    anyhow::ensure!(pong == [0xd0, 0], "not a PINGRESP: {pong:?}");
    Ok(())
}
