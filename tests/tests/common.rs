//! A three-broker topology behind one LB, shared by the LB tests.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use mqlb_config::Config;
use mqlb_lb::{Lb, Listeners};
use mqlb_tests::{Mosquitto, TempDir};

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
