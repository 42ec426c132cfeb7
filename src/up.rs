//! `mqlb up`: the whole topology of one config file on this machine — HA servers, broker nodes
//! and the load balancer — each as its own `mqlb` process, so any of them can be killed
//! (`kill -9 PID`) or hung (`kill -STOP PID`) like a failing machine.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mqlb_config::Config;

/// One child process and how to start it again.
struct Proc {
    name: String,
    args: Vec<String>,
    child: Option<Child>,
    /// Brokers and HA servers are restarted after a crash; the LB is the entry point, and
    /// its death ends `up`.
    restart: bool,
    died_at: Option<Instant>,
}

impl Proc {
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
        Ok(())
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
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

pub async fn run(config: Option<PathBuf>, restart: bool) -> anyhow::Result<ExitCode> {
    let (cfg, file_args) = match &config {
        Some(path) => {
            let abs = std::fs::canonicalize(path).with_context(|| format!("{}", path.display()))?;
            (
                Config::load(&abs)?,
                vec!["-c".to_string(), abs.display().to_string()],
            )
        }
        None => (Config::builtin()?, Vec::new()),
    };
    if cfg.brokers.is_empty() && cfg.rules.is_empty() {
        bail!("nothing to start: the configuration has no [[broker]] and no [[rule]]");
    }
    let exe = std::env::current_exe().context("locating the mqlb executable")?;
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
        procs.push(Proc {
            name: format!("haserver {}", h.id),
            args: with("haserver", Some(&h.id)),
            child: None,
            restart,
            died_at: None,
        });
    }
    for b in &cfg.brokers {
        procs.push(Proc {
            name: format!("broker {}", b.id),
            args: with("broker", Some(&b.id)),
            child: None,
            restart,
            died_at: None,
        });
    }
    if !cfg.rules.is_empty() {
        procs.push(Proc {
            name: "lb".into(),
            args: with("lb", None),
            child: None,
            restart: false,
            died_at: None,
        });
    }

    // Start in dependency order and wait for each group to be reachable.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut checks: Vec<(String, SocketAddr)> = Vec::new();
    checks.extend(
        cfg.ha
            .servers
            .iter()
            .map(|h| (format!("haserver {}", h.id), h.listen)),
    );
    checks.extend(
        cfg.brokers
            .iter()
            .map(|b| (format!("broker {}", b.id), b.mqtt)),
    );
    checks.extend(
        cfg.frontends
            .iter()
            .map(|f| (format!("lb frontend {}", f.name), f.bind)),
    );
    if !cfg.rules.is_empty() {
        checks.push(("lb admin".into(), cfg.lb.admin));
    }
    for p in &mut procs {
        p.spawn(&exe)?;
        let prefix = p.name.clone();
        for (what, addr) in checks.iter().filter(|(w, _)| w.starts_with(&prefix)) {
            while !accepts(*addr).await {
                if let Some(Ok(Some(status))) = p.child.as_mut().map(Child::try_wait) {
                    stop_all(&mut procs, cfg.lb.shutdown_grace).await;
                    bail!(
                        "{what} exited ({status}) before listening on {addr}; is the port taken?"
                    );
                }
                if Instant::now() > deadline {
                    stop_all(&mut procs, cfg.lb.shutdown_grace).await;
                    bail!("{what} not listening on {addr} after 30 s");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    println!(
        "mqlb is up{}",
        config
            .as_ref()
            .map_or(" (built-in configuration)".to_string(), |c| format!(
                " ({})",
                c.display()
            ))
    );
    for f in &cfg.frontends {
        println!("  MQTT (3.1.1 and 5.0)   mqtt://{}", f.bind);
    }
    if !cfg.rules.is_empty() {
        println!(
            "  LB admin / metrics     http://{}/api/backends  http://{}/metrics",
            cfg.lb.admin, cfg.lb.admin
        );
    }
    for h in &cfg.ha.servers {
        println!("  HA server {:<12} http://{}/api/cluster", h.id, h.listen);
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
        println!("  broker {:<15} MQTT {}{v5}  pid {}", b.id, b.mqtt, p.pid());
    }
    println!("Simulate a failure: kill -9 <broker pid> (crash) or kill -STOP <pid> (hang; -CONT resumes).");
    if restart {
        println!(
            "Crashed brokers and HA servers are restarted after 5 s. Ctrl-C stops everything."
        );
    } else {
        println!("Ctrl-C stops everything.");
    }

    // Supervise until Ctrl-C/SIGTERM or the LB's death.
    let stop = crate::wait_for_stop();
    tokio::pin!(stop);
    let mut code = ExitCode::SUCCESS;
    loop {
        tokio::select! {
            r = &mut stop => { r?; break; }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        let mut lb_died = false;
        for p in &mut procs {
            if let Some(Ok(Some(status))) = p.child.as_mut().map(Child::try_wait) {
                p.child = None;
                p.died_at = Some(Instant::now());
                println!("mqlb up: {} exited ({status})", p.name);
                lb_died |= !p.restart && p.name == "lb";
            }
            if p.child.is_none()
                && p.restart
                && p.died_at
                    .is_some_and(|t| t.elapsed() > Duration::from_secs(5))
            {
                p.spawn(&exe)?;
                p.died_at = None;
                println!("mqlb up: restarted {} (pid {})", p.name, p.pid());
            }
        }
        if lb_died {
            code = ExitCode::FAILURE;
            break;
        }
    }
    stop_all(&mut procs, cfg.lb.shutdown_grace).await;
    Ok(code)
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
