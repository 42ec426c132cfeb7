//! The `mqlb` binary: parse the command line, set up tracing and signals, call the libraries.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// `println!` for what the commands print on stdout: a reader that left (`mqlb ... | head -1`)
/// ends nothing, where `println!` would panic on the broken pipe (Rust ignores SIGPIPE).
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::write_stdout(format_args!($($arg)*))
    };
}

mod dev_tls;
mod import_azure;
mod plan;
mod up;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use mqlb_config::{parse_duration, Config, ConfigError, ProbeProtocol};

#[derive(Parser)]
#[command(
    name = "mqlb",
    version,
    about = "MQTT-aware L4 load balancer and broker-cluster kit"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the whole topology of the config on this machine: HA servers, brokers and the
    /// load balancer, each its own process. Ctrl-C stops everything.
    Up {
        /// Config file; without it the built-in default (LB on 127.0.0.1:1883, three brokers,
        /// HA server on 127.0.0.1:8082).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Do not restart brokers and HA servers that die.
        #[arg(long)]
        no_restart: bool,
        /// Also serve MQTT over TLS here, with a certificate of the dev CA in --tls-dir
        /// (made at first start). With the built-in config: 127.0.0.1:8883 unless --no-tls.
        #[arg(long, value_name = "ADDR")]
        tls: Option<std::net::SocketAddr>,
        /// Where the dev CA and its certificate are kept.
        #[arg(long, value_name = "DIR", default_value = "mqlb-dev-tls")]
        tls_dir: PathBuf,
        /// No TLS frontend for the built-in config.
        #[arg(long, conflicts_with = "tls")]
        no_tls: bool,
    },
    /// Run the load balancer. SIGHUP (or a change of the file) reloads; SIGTERM/Ctrl-C stops
    /// gracefully.
    Lb {
        /// Config file; without it the built-in default (LB on 127.0.0.1:1883).
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Run one broker node of the cluster: the `[[broker]]` with this id in the config file.
    /// SIGTERM/Ctrl-C stops it.
    Broker {
        /// Config file with `[cluster]` and `[[broker]]` sections; without it the built-in
        /// default (three nodes b1-b3 on loopback).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Which `[[broker]]` to run.
        #[arg(long)]
        id: String,
    },
    /// Run an HA server: the `[[haserver]]` with this id. Several with the same database file
    /// are one primary and backups.
    Haserver {
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Which `[[haserver]]` to run.
        #[arg(long)]
        id: String,
    },
    /// Validate a config file: print OK (and warnings) or every problem; exit 1 on error.
    CheckConfig { file: PathBuf },
    /// Run one health probe and print the result; exit 0 if healthy, 1 if not.
    Probe(ProbeArgs),
    /// Convert another load balancer's configuration into an mqlb config (TOML on stdout,
    /// a warning on stderr for each setting that cannot be carried).
    Import {
        #[command(subcommand)]
        from: ImportFrom,
    },
    /// Show which clients a membership change would move, and where, before making it:
    /// against the running LB's admin API (its live connections), or with --clients against a
    /// config file and a list of client IDs. Uses the LB's own rendezvous selection.
    Plan {
        /// The running LB's admin address (default: lb.admin of --config, else 127.0.0.1:9883).
        #[arg(long)]
        admin: Option<String>,
        /// File holding the admin API's bearer token (lb.admin_token_file).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Config file: the admin address, or with --clients the pools themselves.
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Without a running LB: a file of client IDs, one a line, placed on --config's pools.
        #[arg(long, requires = "config")]
        clients: Option<PathBuf>,
        /// Take this backend out of every pool.
        #[arg(long, value_name = "ID")]
        remove: Vec<String>,
        /// Add a backend (to --pool, or to the only pool).
        #[arg(long, value_name = "ID=ADDR")]
        add: Vec<String>,
        /// Give a backend this weight.
        #[arg(long, value_name = "ID=WEIGHT")]
        weight: Vec<String>,
        /// The pool --add adds to, and --clients places the IDs in.
        #[arg(long)]
        pool: Option<String>,
    },
}

#[derive(Subcommand)]
enum ImportFrom {
    /// An Azure Load Balancer: `az network lb show` output, or an ARM template with a
    /// `Microsoft.Network/loadBalancers` resource.
    Azure { file: PathBuf },
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // rumqttd's routine events (each connection, disconnect, self-check) are patched
                // to debug (vendor/rumqttd/PATCHED.md), so info is quiet on an idle node.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::CheckConfig { file } => return check_config(&file),
        Command::Probe(args) => runtime().and_then(|rt| rt.block_on(probe(args))),
        Command::Import {
            from: ImportFrom::Azure { file },
        } => import_azure(&file),
        Command::Plan {
            admin,
            token_file,
            config,
            clients,
            remove,
            add,
            weight,
            pool,
        } => plan::parse_change(remove, &add, &weight, pool).and_then(|change| {
            let args = plan::Args {
                admin,
                token_file,
                config,
                clients,
                change,
            };
            let text = runtime()?.block_on(plan::run(args))?;
            print_report(&text)
        }),
        Command::Lb { config } => runtime().and_then(|rt| rt.block_on(run_lb(config))),
        Command::Up {
            config,
            no_restart,
            tls,
            tls_dir,
            no_tls,
        } => {
            let tls = match (tls, no_tls, &config) {
                (Some(addr), _, _) => Some(addr),
                (None, false, None) => Some(up::DEV_TLS_ADDR),
                _ => None,
            };
            let tls = tls.map(|addr| up::DevTlsFrontend { addr, dir: tls_dir });
            runtime().and_then(|rt| rt.block_on(up::run(config, !no_restart, tls)))
        }
        Command::Haserver { config, id } => {
            runtime().and_then(|rt| rt.block_on(run_haserver(config, &id)))
        }
        Command::Broker { config, id } => {
            runtime().and_then(|rt| rt.block_on(run_broker(config, &id)))
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mqlb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The process's runtime: one worker per core, or `MQLB_WORKER_THREADS` (like HAProxy's
/// `nbthread`).
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Ok(v) = std::env::var("MQLB_WORKER_THREADS") {
        let n: usize =
            v.parse().ok().filter(|n| *n > 0).with_context(|| {
                format!("MQLB_WORKER_THREADS={v:?}: expected a positive number")
            })?;
        b.worker_threads(n);
    }
    b.enable_all().build().context("starting the tokio runtime")
}

fn check_config(file: &PathBuf) -> ExitCode {
    use std::fmt::Write as _;
    let mut out = String::new();
    // Writing to a String cannot fail.
    let code = match Config::load(file) {
        Ok(cfg) => {
            for w in &cfg.warnings {
                writeln!(out, "warning: {}", w.located(&file.display().to_string())).ok();
            }
            writeln!(
                out,
                "{}: OK ({} frontend(s), {} pool(s), {} rule(s))",
                file.display(),
                cfg.frontends.len(),
                cfg.pools.len(),
                cfg.rules.len()
            )
            .ok();
            ExitCode::SUCCESS
        }
        Err(e) => {
            writeln!(out, "{e}").ok();
            if let ConfigError::Invalid { file, warnings, .. } = &e {
                for w in warnings {
                    writeln!(out, "  warning: {}", w.located(file)).ok();
                }
            }
            ExitCode::FAILURE
        }
    };
    // `mqlb check-config f | head -1`: a reader that left is no error of the check's
    // (println! would panic on the broken pipe).
    match std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            eprintln!("mqlb check-config: writing the report: {e}");
            ExitCode::FAILURE
        }
        _ => code,
    }
}

/// One line on stdout (see [`outln!`]); any other write error is said on stderr.
fn write_stdout(args: std::fmt::Arguments) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("mqlb: writing to stdout: {e}");
        }
    }
}

/// Writes a command's report to stdout; a reader that left (`| head`) is not an error.
fn print_report(text: &str) -> anyhow::Result<ExitCode> {
    match std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// `mqlb import azure FILE`: the config on stdout, what was not carried on stderr.
fn import_azure(file: &std::path::Path) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("{}: cannot read", file.display()))?;
    let out = import_azure::convert_text(&text, &file.display().to_string())?;
    for w in &out.warnings {
        eprintln!("mqlb import azure: warning: {w}");
    }
    print_report(&out.toml)
}

/// `mqlb probe`'s options: the protocols of `[[probe]]`, and for `--tls`/`--mqtts` what a
/// pool's `tls` says (the CA, the name, the client certificate, ALPN).
#[derive(clap::Args)]
struct ProbeArgs {
    /// HOST:PORT to probe.
    target: String,
    /// MQTT probe: CONNECT must be answered by an accepting CONNACK.
    #[arg(long, conflicts_with_all = ["http", "tls", "mqtts"])]
    mqtt: bool,
    /// HTTP probe: GET this path must answer 200.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["tls", "mqtts"])]
    http: Option<String>,
    /// TLS probe: a handshake whose certificate verifies against --cafile, ended without an
    /// alert (the target took the client certificate, if it asked for one).
    #[arg(long, requires = "cafile", conflicts_with = "mqtts")]
    tls: bool,
    /// MQTT over TLS: the TLS probe, then CONNECT answered by an accepting CONNACK.
    #[arg(long, requires = "cafile")]
    mqtts: bool,
    /// The CA certificates (PEM) the target's certificate must chain to: the only ones trusted.
    #[arg(long, value_name = "PEM")]
    cafile: Option<PathBuf>,
    /// The name the certificate is verified against and sent as SNI [default: HOST when it is
    /// a name, else the address, verified as an IP address SAN].
    #[arg(long, value_name = "NAME", requires = "cafile")]
    server_name: Option<String>,
    /// A client certificate chain (PEM), shown when the target asks for one (mTLS).
    #[arg(long, value_name = "PEM", requires_all = ["key", "cafile"])]
    cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "PEM", requires = "cert")]
    key: Option<PathBuf>,
    /// An ALPN protocol to offer (repeat for several; none by default).
    #[arg(long, value_name = "PROTOCOL", requires = "cafile")]
    alpn: Vec<String>,
    /// The address to connect from (a host with several: the LB's `source`).
    #[arg(long, value_name = "IP")]
    source: Option<std::net::IpAddr>,
    /// Give up after this long (e.g. 2s, 500ms).
    #[arg(long, default_value = "2s", value_parser = parse_duration_arg)]
    timeout: Duration,
}

async fn probe(args: ProbeArgs) -> anyhow::Result<ExitCode> {
    let target = args.target.as_str();
    let addr: SocketAddr = target
        .to_socket_addrs()
        .with_context(|| format!("{target}: not a HOST:PORT"))?
        .next()
        .with_context(|| format!("{target}: resolves to no address"))?;
    let protocol = if args.mqtt {
        ProbeProtocol::Mqtt
    } else if let Some(path) = args.http.clone() {
        ProbeProtocol::Http { path }
    } else if args.tls {
        ProbeProtocol::Tls
    } else if args.mqtts {
        ProbeProtocol::Mqtts
    } else {
        ProbeProtocol::Tcp
    };
    let tls = match &args.cafile {
        Some(ca) => Some(probe_tls(&args, ca)?),
        None => None,
    };
    let started = std::time::Instant::now();
    let via = mqlb_lb::Via {
        tls: tls.as_ref(),
        source: args.source,
        send_proxy: None,
    };
    let result = mqlb_lb::probe_once_via(&protocol, addr, args.timeout, via).await;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    Ok(match result {
        Ok(()) => {
            outln!("{addr}: healthy ({ms:.1} ms)");
            ExitCode::SUCCESS
        }
        Err(e) => {
            outln!("{addr}: unhealthy: {e} ({ms:.1} ms)");
            ExitCode::FAILURE
        }
    })
}

/// The TLS side of a `--tls`/`--mqtts` probe, built as a pool's `tls` is (the files read now,
/// an unreadable or mismatched one refused naming it).
fn probe_tls(args: &ProbeArgs, ca: &std::path::Path) -> anyhow::Result<mqlb_config::PoolTls> {
    // HOST of HOST:PORT when it is a name, not an address: what curl and openssl s_client
    // verify by default.
    let host = args
        .target
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .filter(|h| h.parse::<std::net::IpAddr>().is_err());
    let server_name = match args.server_name.as_deref().or(host) {
        None => None,
        Some(n) => Some(
            rustls::pki_types::ServerName::try_from(n.to_string()).map_err(|_| {
                anyhow::anyhow!("--server-name {n:?}: not a DNS name or an IP address")
            })?,
        ),
    };
    let identity = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => Some(mqlb_config::tls::identity(cert, key)?),
        _ => None,
    };
    let client = mqlb_config::tls::client(ca, identity, &args.alpn)?;
    Ok(mqlb_config::PoolTls {
        ca: ca.to_path_buf(),
        server_name,
        cert: args.cert.clone(),
        key: args.key.clone(),
        alpn: args.alpn.clone(),
        client,
    })
}

async fn run_lb(config: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let cfg = match &config {
        Some(path) => Config::load(path)?,
        None => Config::builtin()?,
    };
    if cfg.rules.is_empty() {
        bail!("the configuration has no [[rule]]: nothing to balance");
    }
    let lb = mqlb_lb::Lb::start(cfg, mqlb_lb::Listeners::default()).await?;
    for (name, addr) in lb.frontend_addrs() {
        tracing::info!("frontend {name} on {addr}");
    }
    tracing::info!("admin on http://{}/ (metrics at /metrics)", lb.admin_addr());
    wait_for_signals(&lb).await?;
    let cut = lb.shutdown().await;
    tracing::info!(cut, "stopped");
    Ok(ExitCode::SUCCESS)
}

async fn run_broker(config: Option<PathBuf>, id: &str) -> anyhow::Result<ExitCode> {
    let cfg = match &config {
        Some(path) => Config::load(path)?,
        None => Config::builtin()?,
    };
    let spec = mqlb_broker::NodeSpec::from_config(&cfg, id)?;
    let node = mqlb_broker::Node::start(spec).await?;
    outln!("broker {id}: MQTT 3.1.1 on {}", node.mqtt);
    if let Some(a) = node.mqtt_v5 {
        outln!("broker {id}: MQTT 5 on {a}");
    }
    if let Some(a) = node.mqtts {
        outln!("broker {id}: MQTT 3.1.1 over TLS on {a}");
    }
    if let Some(a) = node.mqtts_v5 {
        outln!("broker {id}: MQTT 5 over TLS on {a}");
    }
    if let Some(a) = node.http {
        outln!("broker {id}: metrics on http://{a}/metrics");
    }
    wait_for_broker_signals(&node, config.as_deref()).await?;
    node.stop().await;
    Ok(ExitCode::SUCCESS)
}

/// SIGHUP reloads `[auth]`'s password and ACL files and, from the configuration file, the
/// node's TLS certificate and its mesh certificate (clients and links stay connected; a bad file
/// keeps the old ones, and the node logs why); returns on SIGTERM or Ctrl-C.
#[cfg(unix)]
async fn wait_for_broker_signals(
    node: &mqlb_broker::Node,
    config: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                tracing::info!(node = node.id(), "SIGHUP: reloading the auth files and the TLS certificates");
                // `reload_auth` logged the error; the previous files stay in force.
                let _ = node.reload_auth();
                if let Some(path) = config {
                    reload_broker_tls(node, path);
                }
            }
            _ = term.recv() => return Ok(()),
            r = tokio::signal::ctrl_c() => return r.context("waiting for Ctrl-C"),
        }
    }
}

/// Reads the configuration file again for the node's `[[broker]] tls` and `[cluster] tls`
/// (their files re-read and checked as at start); a file that does not load keeps the
/// certificates in force.
#[cfg(unix)]
fn reload_broker_tls(node: &mqlb_broker::Node, path: &std::path::Path) {
    let cfg = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(node = node.id(), error = %e, "TLS not reloaded; the certificates in force stay");
            return;
        }
    };
    let own = cfg
        .brokers
        .iter()
        .find(|b| b.id == node.id())
        .and_then(|b| b.tls.as_ref());
    for (what, result) in [
        ("TLS certificate", node.reload_tls(own)),
        (
            "mesh TLS certificate",
            node.reload_mesh_tls(cfg.cluster.tls.as_ref()),
        ),
    ] {
        match result {
            Ok(true) => tracing::info!(node = node.id(), "{what} reloaded"),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(node = node.id(), error = %e, "{what} not reloaded; the one in force stays")
            }
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_broker_signals(
    _node: &mqlb_broker::Node,
    _config: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    wait_for_stop().await
}

async fn run_haserver(config: Option<PathBuf>, id: &str) -> anyhow::Result<ExitCode> {
    let cfg = match &config {
        Some(path) => Config::load(path)?,
        None => Config::builtin()?,
    };
    let me = cfg
        .ha
        .servers
        .iter()
        .find(|h| h.id == id)
        .with_context(|| format!("no [[haserver]] with id {id:?} in the configuration"))?;
    let store: std::sync::Arc<dyn mqlb_haserver::Store> = match &me.db {
        mqlb_config::HaDb::Sqlite(path) => std::sync::Arc::new(
            mqlb_haserver::SqliteStore::open(path)
                .with_context(|| format!("opening the database {}", path.display()))?,
        ),
        mqlb_config::HaDb::Postgres(url) => std::sync::Arc::new(
            mqlb_haserver::PostgresStore::open(
                url.expose(),
                mqlb_haserver::PostgresOptions {
                    source: me.db_source,
                    tls: match &me.db_ca {
                        Some(ca) => Some(
                            mqlb_config::tls::client(ca, None, &[])
                                .with_context(|| format!("haserver {id}: db_ca"))?
                                .config()
                                .clone(),
                        ),
                        None => None,
                    },
                    ..mqlb_haserver::PostgresOptions::for_lease(cfg.ha.lease)
                },
            )
            .await
            .with_context(|| format!("opening the database {url}"))?,
        ),
    };
    let listener = tokio::net::TcpListener::bind(me.listen)
        .await
        .with_context(|| format!("listening on {}", me.listen))?;
    let server = mqlb_haserver::HaServer::start(
        id,
        listener,
        store,
        mqlb_haserver::Options::from_config(&cfg)?,
    )
    .await?;
    outln!(
        "haserver {id}: http://{}/api/cluster (database {})",
        server.addr(),
        me.db
    );
    wait_for_stop().await?;
    server.stop().await;
    Ok(ExitCode::SUCCESS)
}

/// Returns on SIGTERM or Ctrl-C.
async fn wait_for_stop() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        tokio::select! {
            _ = term.recv() => Ok(()),
            r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C"),
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")
}

/// Reloads on SIGHUP; returns on SIGTERM or Ctrl-C. A second Ctrl-C exits at once.
#[cfg(unix)]
async fn wait_for_signals(lb: &mqlb_lb::Lb) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading");
                // `reload` logs why it refused; the running config stays.
                if lb.reload().await.is_err() {
                    continue;
                }
            }
            _ = term.recv() => break,
            r = tokio::signal::ctrl_c() => { r.context("waiting for Ctrl-C")?; break; }
        }
    }
    tokio::spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("mqlb: second interrupt, exiting now");
            std::process::exit(130);
        }
    });
    Ok(())
}

#[cfg(not(unix))]
async fn wait_for_signals(_lb: &mqlb_lb::Lb) -> anyhow::Result<()> {
    tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")
}
