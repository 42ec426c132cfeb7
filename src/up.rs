//! `mqlb up`: the whole topology of one config file on this machine — HA servers, broker nodes
//! and the load balancer — each as its own `mqlb` process, so any of them can be killed
//! (`kill -9 PID`) or hung (`kill -STOP PID`) like a failing machine.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mqlb_config::Config;

use crate::dev_tls::DevTls;

/// One child process and how to start it again.
struct Proc {
    name: String,
    args: Vec<String>,
    /// What it listens on (a name for messages, the address): every one must be free before
    /// `up` starts anything, and held by this child before it counts as started.
    listens: Vec<(String, SocketAddr)>,
    child: Option<Child>,
    started_at: Instant,
    /// The last restart delay, for the back-off; `None` until it first crashed.
    delay: Option<Duration>,
    /// When a crashed child is due to start again.
    restart_at: Option<Instant>,
}

/// The delay before a crashed child starts again: 1 s, doubled each time it crashes again
/// within a minute of its start (a crash loop), at most 30 s; back to 1 s once it ran a minute.
fn restart_delay(last: Option<Duration>, lived: Duration) -> Duration {
    const FIRST: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(30);
    const STABLE: Duration = Duration::from_secs(60);
    match last {
        Some(d) if lived < STABLE => (d * 2).min(MAX),
        _ => FIRST,
    }
}

impl Proc {
    fn new(name: String, args: Vec<String>, listens: Vec<(String, SocketAddr)>) -> Proc {
        Proc {
            name,
            args,
            listens,
            child: None,
            started_at: Instant::now(),
            delay: None,
            restart_at: None,
        }
    }

    fn spawn(&mut self, exe: &PathBuf) -> anyhow::Result<()> {
        let mut cmd = Command::new(exe);
        // The summary `up` prints replaces each child's own banner.
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // Own process group: a Ctrl-C in the terminal reaches `up` alone, which then stops
        // the children in order (LB, brokers, HA servers last so brokers can deregister).
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        if std::env::var_os("RUST_LOG").is_none() {
            // Keep the terminal for the summary; warnings and errors still show.
            cmd.env("RUST_LOG", "warn,rumqttd=off");
        }
        self.child = Some(
            cmd.spawn()
                .with_context(|| format!("starting {}", self.name))?,
        );
        self.started_at = Instant::now();
        Ok(())
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Waits until this child listens on every address it should. On Linux the listener
    /// must be the child's own (`/proc`), so another program answering on the port does not
    /// count; elsewhere a connection that is accepted does.
    async fn wait_ready(&mut self, deadline: Instant) -> anyhow::Result<()> {
        for (what, addr) in self.listens.clone() {
            loop {
                let ours = if cfg!(target_os = "linux") {
                    mqlb_lb::port::who_listens(addr).is_some_and(|h| h.pid == self.pid())
                } else {
                    accepts(addr).await
                };
                if ours {
                    break;
                }
                if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                    bail!("{what} exited ({status}) before listening on {addr}");
                }
                if Instant::now() > deadline {
                    bail!("{what} not listening on {addr} after 30 s");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }
}

async fn accepts(addr: SocketAddr) -> bool {
    tokio::net::TcpStream::connect(addr).await.is_ok()
}

fn signal(pid: u32, sig: &str) {
    if let Err(e) = Command::new("kill").args([sig, &pid.to_string()]).status() {
        eprintln!("mqlb up: kill {sig} {pid}: {e}");
    }
}

/// Where `mqlb up` serves MQTT over TLS with the built-in config: MQTT over TLS's port.
pub const DEV_TLS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8883);

/// A TLS frontend `up` adds to the topology, with a certificate of the dev CA in `dir`.
pub struct DevTlsFrontend {
    pub addr: SocketAddr,
    pub dir: PathBuf,
}

/// The config text with the TLS frontend added: a frontend at `addr` terminating TLS with
/// `dev`'s certificate, and a rule sending it to `pool` by client ID as the built-in rule does.
fn with_tls_frontend(text: &str, addr: SocketAddr, dev: &DevTls, pool: &str) -> String {
    let quoted = |p: &Path| serde_json::Value::String(p.display().to_string()).to_string();
    format!(
        "{text}\n\n# Added by `mqlb up`: MQTT over TLS with a certificate of its dev CA.\n\
         [[frontend]]\nname = \"mqlb-up-tls\"\nbind = \"{addr}\"\n\
         tls = {{ cert = {}, key = {} }}\n\n\
         [[rule]]\nname = \"mqlb-up-tls\"\nfrontend = \"mqlb-up-tls\"\npool = {}\n\
         distribution = \"mqtt-client-id\"\nfallback = \"five-tuple\"\n\
         close_on_backend_down = true\n",
        quoted(&dev.cert),
        quoted(&dev.key),
        serde_json::Value::String(pool.to_string()),
    )
}

/// What `up` runs: the config, the arguments that give its file to the children, and the
/// TLS frontend it added, if it did.
struct Topology {
    cfg: Config,
    file_args: Vec<String>,
    dev_tls: Option<(SocketAddr, DevTls)>,
}

/// The topology of the file (or the built-in config) as it is, or with a TLS frontend, then
/// written to `DIR/mqlb-up.toml` for the children to read.
fn topology(config: Option<&Path>, tls: Option<&DevTlsFrontend>) -> anyhow::Result<Topology> {
    let of = |cfg, file_args, dev_tls| Topology {
        cfg,
        file_args,
        dev_tls,
    };
    let file_args = |p: &Path| vec!["-c".to_string(), p.display().to_string()];
    let Some(t) = tls else {
        return match config {
            Some(path) => {
                let abs =
                    std::fs::canonicalize(path).with_context(|| format!("{}", path.display()))?;
                Ok(of(Config::load(&abs)?, file_args(&abs), None))
            }
            None => Ok(of(Config::builtin()?, Vec::new(), None)),
        };
    };
    let (text, base) = match config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let base = Config::parse(&text, &path.display().to_string())?;
            (text, base)
        }
        None => (
            mqlb_config::DEFAULT_CONFIG_TOML.to_string(),
            Config::builtin()?,
        ),
    };
    let pool = base
        .rules
        .first()
        .map(|r| r.pool.clone())
        .context("--tls: the configuration has no [[rule]] whose pool to serve")?;
    std::fs::create_dir_all(&t.dir).with_context(|| format!("creating {}", t.dir.display()))?;
    let dir = std::fs::canonicalize(&t.dir).with_context(|| format!("{}", t.dir.display()))?;
    let dev = crate::dev_tls::ensure(&dir)?;
    let file = dir.join("mqlb-up.toml");
    std::fs::write(&file, with_tls_frontend(&text, t.addr, &dev, &pool))
        .with_context(|| format!("writing {}", file.display()))?;
    let abs = std::fs::canonicalize(&file).with_context(|| format!("{}", file.display()))?;
    Ok(of(
        Config::load(&abs)?,
        file_args(&abs),
        Some((t.addr, dev)),
    ))
}

pub async fn run(
    config: Option<PathBuf>,
    restart: bool,
    tls: Option<DevTlsFrontend>,
) -> anyhow::Result<ExitCode> {
    let Topology {
        cfg,
        file_args,
        dev_tls,
    } = topology(config.as_deref(), tls.as_ref())?;
    if cfg.brokers.is_empty() && cfg.rules.is_empty() {
        bail!("nothing to start: the configuration has no [[broker]] and no [[rule]]");
    }
    let exe = std::env::current_exe().context("locating the mqlb executable")?;
    let mut procs = plan(&cfg, &file_args);
    // Every port must be free before anything starts: a second `up` (or another program on a
    // port) is refused here, naming the port and its holder, instead of half-starting.
    for p in &procs {
        for (what, addr) in &p.listens {
            mqlb_lb::listener::ensure_free(*addr)
                .with_context(|| format!("cannot start {what} on {addr}"))?;
        }
    }

    // Start in dependency order (HA servers, brokers, LB) and wait for each to listen.
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0..procs.len() {
        let started = match procs[i].spawn(&exe) {
            Ok(()) => procs[i].wait_ready(deadline).await,
            Err(e) => Err(e),
        };
        if let Err(e) = started {
            stop_all(&mut procs, cfg.lb.shutdown_grace).await;
            return Err(e);
        }
    }

    outln!(
        "mqlb is up{}",
        config
            .as_ref()
            .map_or(" (built-in configuration)".to_string(), |c| format!(
                " ({})",
                c.display()
            ))
    );
    for f in &cfg.frontends {
        let scheme = if f.tls.is_some() { "mqtts" } else { "mqtt" };
        outln!("  MQTT (3.1.1 and 5.0)   {scheme}://{}", f.bind);
    }
    if let Some((addr, dev)) = &dev_tls {
        let host = if addr.ip().is_unspecified() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            addr.ip()
        };
        let ca = dev.ca.display();
        outln!("  MQTT over TLS, dev CA  {ca}: try");
        outln!(
            "    mosquitto_sub -h {host} -p {} --cafile {ca} -t 'hello/#' -v",
            addr.port()
        );
        outln!(
            "    mosquitto_pub -h {host} -p {} --cafile {ca} -t hello/mqlb -m hi",
            addr.port()
        );
    }
    if let Some(lb) = procs.iter().find(|p| p.name == "lb") {
        outln!(
            "  LB admin / metrics     http://{}/api/backends  http://{}/metrics  pid {}",
            cfg.lb.admin,
            cfg.lb.admin,
            lb.pid()
        );
    }
    for h in &cfg.ha.servers {
        outln!("  HA server {:<12} http://{}/api/cluster", h.id, h.listen);
    }
    for (b, p) in cfg
        .brokers
        .iter()
        .zip(procs.iter().skip(cfg.ha.servers.len()))
    {
        let v5 = b
            .mqtt_v5
            .map(|a| format!(", MQTT 5 {a}"))
            .unwrap_or_default();
        let tls: String = [("mqtts", b.mqtts), ("mqtts_v5", b.mqtts_v5)]
            .iter()
            .filter_map(|(k, a)| a.map(|a| format!(", {k} {a}")))
            .collect();
        outln!(
            "  broker {:<15} MQTT {}{v5}{tls}  pid {}",
            b.id,
            b.mqtt,
            p.pid()
        );
    }
    outln!("Simulate a failure: kill -9 <pid> (crash) or kill -STOP <pid> (hang; -CONT resumes).");
    if restart {
        outln!("A process that crashes is started again after 1 s. Ctrl-C stops everything.");
    } else {
        outln!("Ctrl-C stops everything.");
    }

    // Supervise until Ctrl-C/SIGTERM: only that stops the topology, never a child's death.
    let stop = crate::wait_for_stop();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            r = &mut stop => { r?; break; }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        for p in &mut procs {
            supervise(p, &exe, restart);
        }
    }
    stop_all(&mut procs, cfg.lb.shutdown_grace).await;
    Ok(ExitCode::SUCCESS)
}

/// The processes of a config, in start order, with what each listens on.
fn plan(cfg: &Config, file_args: &[String]) -> Vec<Proc> {
    let with = |sub: &str, id: Option<&str>| {
        let mut a = vec![sub.to_string()];
        a.extend(file_args.iter().cloned());
        if let Some(id) = id {
            a.extend(["--id".to_string(), id.to_string()]);
        }
        a
    };
    let mut procs = Vec::new();
    for h in &cfg.ha.servers {
        let name = format!("haserver {}", h.id);
        let listens = vec![(name.clone(), h.listen)];
        procs.push(Proc::new(name, with("haserver", Some(&h.id)), listens));
    }
    for b in &cfg.brokers {
        let name = format!("broker {}", b.id);
        let mut listens = vec![(format!("{name} MQTT"), b.mqtt)];
        listens.extend(b.mqtt_v5.map(|a| (format!("{name} MQTT 5"), a)));
        listens.extend(b.mqtts.map(|a| (format!("{name} MQTT over TLS"), a)));
        listens.extend(b.mqtts_v5.map(|a| (format!("{name} MQTT 5 over TLS"), a)));
        listens.extend(b.mesh.map(|a| (format!("{name} mesh"), a)));
        listens.extend(b.http.map(|a| (format!("{name} http"), a)));
        procs.push(Proc::new(name, with("broker", Some(&b.id)), listens));
    }
    if !cfg.rules.is_empty() {
        let mut listens: Vec<(String, SocketAddr)> = mqlb_lb::reload::served_frontends(cfg)
            .into_iter()
            .map(|f| (format!("lb frontend {}", f.name), f.bind))
            .collect();
        listens.push(("lb admin".into(), cfg.lb.admin));
        procs.push(Proc::new("lb".into(), with("lb", None), listens));
    }
    procs
}

/// Notices a child's exit and starts it again when its back-off delay has passed.
fn supervise(p: &mut Proc, exe: &PathBuf, restart: bool) {
    if let Some(Ok(Some(status))) = p.child.as_mut().map(Child::try_wait) {
        p.child = None;
        if restart {
            let delay = restart_delay(p.delay, p.started_at.elapsed());
            p.delay = Some(delay);
            p.restart_at = Some(Instant::now() + delay);
            outln!(
                "mqlb up: {} exited ({status}); starting it again in {delay:?}",
                p.name
            );
        } else {
            outln!("mqlb up: {} exited ({status})", p.name);
        }
    }
    if p.restart_at.is_some_and(|t| Instant::now() >= t) {
        p.restart_at = None;
        match p.spawn(exe) {
            Ok(()) => outln!("mqlb up: restarted {} (pid {})", p.name, p.pid()),
            Err(e) => {
                let delay = restart_delay(p.delay, Duration::ZERO);
                p.delay = Some(delay);
                p.restart_at = Some(Instant::now() + delay);
                eprintln!("mqlb up: {e:#}; trying again in {delay:?}");
            }
        }
    }
}

/// Stops the children in three stages — the LB (it drains its connections for up to its
/// `shutdown_grace`), then every broker at once (they leave the HA membership), then the HA
/// servers — each stage SIGTERM, a wait, and SIGKILL for what is still there.
async fn stop_all(procs: &mut [Proc], lb_grace: Duration) {
    let stages: [(&str, Duration); 3] = [
        ("lb", lb_grace + Duration::from_secs(5)),
        ("broker ", Duration::from_secs(10)),
        ("haserver ", Duration::from_secs(10)),
    ];
    for (prefix, wait) in stages {
        let stage: Vec<&mut Proc> = procs
            .iter_mut()
            .filter(|p| p.name.starts_with(prefix))
            .collect();
        for p in &stage {
            if let Some(c) = &p.child {
                signal(c.id(), "-TERM");
            }
        }
        let deadline = Instant::now() + wait;
        for p in stage {
            let Some(child) = p.child.as_mut() else {
                continue;
            };
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        eprintln!("mqlb up: {} did not stop; killing it", p.name);
                        signal(child.id(), "-KILL");
                        if let Err(e) = child.wait() {
                            eprintln!("mqlb up: reaping {}: {e}", p.name);
                        }
                        break;
                    }
                    Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
            p.child = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_in_a_crash_loop_and_recover_after_a_good_run() {
        let s = Duration::from_secs;
        assert_eq!(restart_delay(None, s(0)), s(1));
        assert_eq!(restart_delay(Some(s(1)), s(2)), s(2));
        assert_eq!(restart_delay(Some(s(16)), s(2)), s(30));
        assert_eq!(restart_delay(Some(s(30)), s(2)), s(30));
        assert_eq!(restart_delay(Some(s(30)), s(61)), s(1));
    }

    /// The built-in topology with the TLS frontend is a valid config: the frontend terminates
    /// TLS with the dev certificate on 8883 and its rule routes to the built-in pool by client
    /// ID; the built-in frontend is still there.
    #[test]
    fn the_built_in_topology_takes_the_tls_frontend() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let t = DevTlsFrontend {
            addr: DEV_TLS_ADDR,
            dir: dir.path().join("tls"),
        };
        let Topology {
            cfg,
            file_args: args,
            dev_tls: dev,
        } = topology(None, Some(&t))?;
        let f = cfg.frontend("mqlb-up-tls").context("the TLS frontend")?;
        assert_eq!((f.bind, f.tls.is_some()), (DEV_TLS_ADDR, true));
        assert!(cfg.frontend("mqtt").is_some_and(|f| f.tls.is_none()));
        let rule = cfg.rules.iter().find(|r| r.frontend == "mqlb-up-tls");
        assert_eq!(rule.map(|r| r.pool.as_str()), Some("brokers"));
        assert_eq!(args.first().map(String::as_str), Some("-c"));
        assert!(dev.is_some_and(|(_, d)| d.ca.is_file()));
        Ok(())
    }
}
