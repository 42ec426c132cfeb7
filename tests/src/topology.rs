//! The whole HA topology as real processes — an HA server, broker nodes and the load balancer,
//! each a `mqlb` process on ephemeral loopback ports — so a test can kill (SIGKILL), hang
//! (SIGSTOP) and restart any of them, like failing machines. The same shape as `mqlb up`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::process::kill_and_reap;
use crate::{
    backend_states, free_port, loopback, mqlb_bin, wait_listening, wait_until, TempDir, TEST_SECRET,
};

/// One broker's addresses.
#[derive(Debug, Clone)]
pub struct BrokerAddrs {
    pub id: String,
    pub mqtt: SocketAddr,
    pub mqtt_v5: SocketAddr,
    pub http: SocketAddr,
    /// MQTT 3.1.1 over TLS, with [`Shape::broker_tls`].
    pub mqtts: Option<SocketAddr>,
}

/// What a topology has beyond the plain one (issue 15): TOML lines added to `[cluster]`, to the
/// LB's pool (`send_proxy = "v2"`) and to each `[[broker]]` (`accept_proxy = [...]`), and a
/// broker `tls = {...}` table, which gives each broker an `mqtts` listener too.
#[derive(Debug, Clone, Copy, Default)]
pub struct Shape<'a> {
    pub cluster: &'a str,
    pub pool: &'a str,
    pub broker: &'a str,
    pub broker_tls: Option<&'a str>,
}

/// The configuration file of a topology: an HA server, `n` brokers (b1..bn) and an LB with
/// an MQTT client-ID rule, on free loopback ports, written to a scratch directory. What
/// [`Topology`] starts process by process, and what `mqlb up -c` starts in one command.
pub struct TopologyFile {
    pub dir: TempDir,
    pub path: PathBuf,
    /// The LB's MQTT frontend: where clients connect.
    pub front: SocketAddr,
    /// The LB's admin server.
    pub admin: SocketAddr,
    /// The HA server.
    pub ha: SocketAddr,
    pub brokers: Vec<BrokerAddrs>,
}

impl TopologyFile {
    pub fn write(n: usize) -> anyhow::Result<TopologyFile> {
        Self::write_with(n, "")
    }

    /// [`TopologyFile::write`] with more `[cluster]` settings (TOML lines), such as
    /// `replicate_sessions = false` for a run without replication.
    pub fn write_with(n: usize, cluster: &str) -> anyhow::Result<TopologyFile> {
        Self::write_shaped(
            n,
            &Shape {
                cluster,
                ..Shape::default()
            },
        )
    }

    /// [`TopologyFile::write`] with the additions of `shape`.
    pub fn write_shaped(n: usize, shape: &Shape<'_>) -> anyhow::Result<TopologyFile> {
        let cluster = shape.cluster;
        let dir = TempDir::new("topology")?;
        let (front, admin, ha) = (
            loopback(free_port()?),
            loopback(free_port()?),
            loopback(free_port()?),
        );
        let mut brokers = Vec::new();
        let mut toml = format!(
            "[lb]\nadmin = \"{admin}\"\nshutdown_grace = \"2s\"\nwatch_config = false\n\
             [[frontend]]\nname = \"mqtt\"\nbind = \"{front}\"\n\
             [[pool]]\nname = \"brokers\"\nprobe = \"mqtt\"\ndiscovery = \"haserver\"\n{}\n",
            shape.pool
        );
        let mut broker_toml = format!("[cluster]\nsecret = \"{TEST_SECRET}\"\n{cluster}\n");
        for i in 1..=n {
            let b = BrokerAddrs {
                id: format!("b{i}"),
                mqtt: loopback(free_port()?),
                mqtt_v5: loopback(free_port()?),
                http: loopback(free_port()?),
                mqtts: match shape.broker_tls {
                    Some(_) => Some(loopback(free_port()?)),
                    None => None,
                },
            };
            let mesh = loopback(free_port()?);
            toml += &format!(
                "[[pool.backend]]\nid = \"{}\"\naddr = \"{}\"\nmqtt_ports = {{ v5 = {} }}\n",
                b.id,
                b.mqtt,
                b.mqtt_v5.port()
            );
            broker_toml += &format!(
                "[[broker]]\nid = \"{}\"\nmqtt = \"{}\"\nmqtt_v5 = \"{}\"\nmesh = \"{mesh}\"\nhttp = \"{}\"\n",
                b.id, b.mqtt, b.mqtt_v5, b.http
            );
            broker_toml += shape.broker;
            broker_toml += "\n";
            if let (Some(tls), Some(a)) = (shape.broker_tls, b.mqtts) {
                broker_toml += &format!("mqtts = \"{a}\"\ntls = {tls}\n");
            }
            brokers.push(b);
        }
        toml += &format!(
            "[[probe]]\nname = \"mqtt\"\nprotocol = \"mqtt\"\nport = \"traffic\"\ninterval = \"1s\"\ntimeout = \"500ms\"\nthreshold = 1\n\
             [[rule]]\nname = \"mqtt\"\nfrontend = \"mqtt\"\npool = \"brokers\"\ndistribution = \"mqtt-client-id\"\n\
             idle_timeout = \"2m\"\nmqtt_keep_alive = \"30s\"\nclose_on_backend_down = true\n\
             {broker_toml}\
             [ha]\nheartbeat_interval = \"250ms\"\nmember_timeout = \"1s\"\nremove_after = \"60s\"\nlease = \"1s\"\n\
             [[haserver]]\nid = \"ha1\"\nlisten = \"{ha}\"\ndb = \"{}\"\n",
            dir.path().join("ha.sqlite").display()
        );
        let path = dir.path().join("mqlb.toml");
        std::fs::write(&path, toml)?;
        Ok(TopologyFile {
            dir,
            path,
            front,
            admin,
            ha,
            brokers,
        })
    }
}

/// A running topology. Dropping it kills every process.
pub struct Topology {
    _dir: TempDir,
    pub config_file: PathBuf,
    /// The LB's MQTT frontend: where clients connect.
    pub front: SocketAddr,
    /// The LB's admin server.
    pub admin: SocketAddr,
    /// The HA server.
    pub ha: SocketAddr,
    pub brokers: Vec<BrokerAddrs>,
    procs: HashMap<String, Child>,
}

impl Topology {
    /// Starts an HA server, `n` brokers (b1..bn) and the LB, and waits until the LB sees every
    /// broker up.
    pub async fn start(n: usize) -> anyhow::Result<Topology> {
        Self::start_with(n, "").await
    }

    /// [`Topology::start`] with more `[cluster]` settings (see [`TopologyFile::write_with`]).
    pub async fn start_with(n: usize, cluster: &str) -> anyhow::Result<Topology> {
        Self::start_shaped(
            n,
            &Shape {
                cluster,
                ..Shape::default()
            },
        )
        .await
    }

    /// [`Topology::start`] with the additions of `shape` (see [`Shape`]).
    pub async fn start_shaped(n: usize, shape: &Shape<'_>) -> anyhow::Result<Topology> {
        let mut last = None;
        // Ports picked free may be taken before a process binds them: try again.
        for _ in 0..3 {
            match Self::try_start(n, shape).await {
                Ok(t) => return Ok(t),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("topology did not start")))
    }

    async fn try_start(n: usize, shape: &Shape<'_>) -> anyhow::Result<Topology> {
        let f = TopologyFile::write_shaped(n, shape)?;
        let mut t = Topology {
            _dir: f.dir,
            config_file: f.path,
            front: f.front,
            admin: f.admin,
            ha: f.ha,
            brokers: f.brokers,
            procs: HashMap::new(),
        };
        t.spawn("ha1").await?;
        for i in 1..=n {
            t.spawn(&format!("b{i}")).await?;
        }
        t.spawn("lb").await?;
        let want: Vec<String> = t.brokers.iter().map(|b| b.id.clone()).collect();
        let admin = t.admin;
        wait_until(
            "the LB sees every broker up",
            Duration::from_secs(20),
            || {
                let want = want.clone();
                async move {
                    let Ok(states) = backend_states(admin).await else {
                        return false;
                    };
                    want.iter()
                        .all(|w| states.iter().any(|(id, state)| id == w && state == "up"))
                }
            },
        )
        .await?;
        Ok(t)
    }

    fn listen_addr(&self, name: &str) -> Option<SocketAddr> {
        match name {
            "lb" => Some(self.front),
            "ha1" => Some(self.ha),
            b => self.brokers.iter().find(|x| x.id == b).map(|x| x.mqtt),
        }
    }

    /// Starts process `name` (`lb`, `ha1`, `b1`...) and waits until it listens.
    async fn spawn(&mut self, name: &str) -> anyhow::Result<()> {
        let file = self.config_file.display().to_string();
        let args: Vec<String> = match name {
            "lb" => vec!["lb".into(), "-c".into(), file],
            "ha1" => vec![
                "haserver".into(),
                "-c".into(),
                file,
                "--id".into(),
                "ha1".into(),
            ],
            b => vec!["broker".into(), "-c".into(), file, "--id".into(), b.into()],
        };
        let addr = self
            .listen_addr(name)
            .with_context(|| format!("no process {name}"))?;
        let mut child = Command::new(mqlb_bin()?)
            .args(&args)
            .env(
                "RUST_LOG",
                std::env::var("MQLB_TEST_LOG").unwrap_or_else(|_| "error,rumqttd=off".into()),
            )
            // The processes log to stdout: shown when a test asks for logs, else dropped.
            .stdout(if std::env::var_os("MQLB_TEST_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        if let Err(e) = wait_listening(addr, &mut child, Duration::from_secs(20)).await {
            kill_and_reap(&mut child, name);
            bail!("{name}: {e}");
        }
        self.procs.insert(name.to_string(), child);
        Ok(())
    }

    pub fn pid(&self, name: &str) -> Option<u32> {
        self.procs.get(name).map(Child::id)
    }

    fn signal(&self, name: &str, sig: &str) -> anyhow::Result<()> {
        let pid = self
            .pid(name)
            .with_context(|| format!("{name} is not running"))?;
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()?
            .success();
        anyhow::ensure!(ok, "kill {sig} {name} failed");
        Ok(())
    }

    /// SIGKILL, like a machine losing power.
    pub fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let mut child = self
            .procs
            .remove(name)
            .with_context(|| format!("{name} is not running"))?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// SIGTERM to every one of `names` at once, as a whole cluster is stopped cleanly (a
    /// broker writes what it holds to the HA servers first), then waits for each to exit:
    /// within `within`, else it is killed and this fails.
    pub async fn terminate(&mut self, names: &[&str], within: Duration) -> anyhow::Result<()> {
        for name in names {
            self.signal(name, "-TERM")?;
        }
        let deadline = std::time::Instant::now() + within;
        for name in names {
            let mut child = self
                .procs
                .remove(*name)
                .with_context(|| format!("{name} is not running"))?;
            while child.try_wait()?.is_none() {
                if std::time::Instant::now() > deadline {
                    kill_and_reap(&mut child, name);
                    bail!("{name} did not exit within {within:?} of SIGTERM");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    /// SIGSTOP: the process hangs (its sockets stay open, nothing answers).
    pub fn pause(&self, name: &str) -> anyhow::Result<()> {
        self.signal(name, "-STOP")
    }

    /// SIGCONT after `pause`.
    pub fn resume(&self, name: &str) -> anyhow::Result<()> {
        self.signal(name, "-CONT")
    }

    /// Starts a killed process again with the same configuration.
    pub async fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        if self.procs.contains_key(name) {
            self.kill(name)?;
        }
        let mut last = None;
        // The old process's ports may linger for a moment.
        for _ in 0..20 {
            match self.spawn(name).await {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("{name} did not restart")))
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for (name, child) in self.procs.iter_mut() {
            // A paused process must be resumed to die promptly.
            if let Err(e) = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status()
            {
                eprintln!("resuming {name}: {e}");
            }
            kill_and_reap(child, name);
        }
    }
}
