//! MQTT over TLS at the LB (issue 15): full and resumed TLS handshakes per second, TLS bulk
//! throughput and memory per idle TLS connection, through `mqlb lb` terminating TLS and through
//! HAProxy terminating TLS (Debian's, OpenSSL) in the same run, with the same certificate and
//! key (ECDSA P-256, made here with rcgen), both in front of the same plain discard server; and
//! "direct": a rustls server in this program terminating TLS itself, what TLS costs here with
//! no LB at all. Then the LB's other TLS leg: memory per idle connection to a `pool.tls` pool
//! (plaintext clients, the LB speaking TLS to the direct server), against a plain pool's in the
//! same run.
//!
//! `cargo run --release -p mqlb-benches --bin tls-bench [-- --reps N --handshakes N --idle N
//! --pools-only]` (`--pools-only`: the pool rows alone)

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use mqlb_benches::{
    arg, discard_server, haproxy_installed, median, mqlb_release_bin, reps_arg, rss_kib,
    run_haproxy, send_and_ack, wait_listening, Proc,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The PEM files of a CA and a leaf for 127.0.0.1 it signed.
struct Pki {
    ca: CertificateDer<'static>,
    /// The CA as a pool's `tls.ca` reads it.
    ca_pem: std::path::PathBuf,
    chain: std::path::PathBuf,
    key: std::path::PathBuf,
    /// Chain and key in one file, as HAProxy's `crt` takes them.
    combined: std::path::PathBuf,
}

fn pki(dir: &Path) -> anyhow::Result<Pki> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
    let key = KeyPair::generate()?;
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])?.signed_by(&key, &ca)?;
    let p = Pki {
        ca: ca.der().clone(),
        ca_pem: dir.join("ca.pem"),
        chain: dir.join("chain.pem"),
        key: dir.join("key.pem"),
        combined: dir.join("combined.pem"),
    };
    std::fs::write(&p.ca_pem, ca.pem())?;
    std::fs::write(&p.chain, leaf.pem())?;
    std::fs::write(&p.key, key.serialize_pem())?;
    std::fs::write(&p.combined, leaf.pem() + &key.serialize_pem())?;
    Ok(p)
}

fn client(pki: &Pki, resume: bool) -> anyhow::Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.clone())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    if !resume {
        cfg.resumption = rustls::client::Resumption::disabled();
    }
    Ok(TlsConnector::from(Arc::new(cfg)))
}

fn server_name() -> anyhow::Result<ServerName<'static>> {
    Ok(ServerName::try_from("127.0.0.1")?)
}

/// The direct case: this program's own rustls server, discarding what it reads until the
/// client's close_notify and answering one byte, on a runtime of its own (2 threads, as the
/// LBs have): what terminating TLS costs here with no LB, sharing the cores with the clients.
fn direct_server(pki: &Pki) -> anyhow::Result<SocketAddr> {
    let chain = CertificateDer::pem_file_iter(&pki.chain)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&pki.key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = std_listener.local_addr()?;
    std_listener.set_nonblocking(true)?;
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else {
                return;
            };
            while let Ok((s, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(s).await else {
                        return;
                    };
                    let mut buf = vec![0u8; 256 * 1024];
                    while matches!(tls.read(&mut buf).await, Ok(n) if n > 0) {}
                    let _ = tls.write_all(b"k").await;
                    let _ = tls.shutdown().await;
                });
            }
        });
    });
    Ok(addr)
}

/// `mqlb lb` terminating TLS on one frontend, five-tuple to `backend`.
async fn start_mqlb_tls(
    dir: &Path,
    pki: &Pki,
    backend: SocketAddr,
) -> anyhow::Result<(Proc, SocketAddr)> {
    let front: SocketAddr = format!("127.0.0.1:{}", mqlb_tests::free_port()?).parse()?;
    let admin = mqlb_tests::free_port()?;
    let file = dir.join("mqlb-tls.toml");
    std::fs::write(
        &file,
        format!(
            "[lb]\nadmin = \"127.0.0.1:{admin}\"\nwatch_config = false\n\
             [[frontend]]\nname = \"f\"\nbind = \"{front}\"\n\
             tls = {{ cert = \"{}\", key = \"{}\" }}\n\
             [[pool]]\nname = \"p\"\nprobe = \"t\"\n[[pool.backend]]\nid = \"b\"\naddr = \"{backend}\"\n\
             [[probe]]\nname = \"t\"\nport = \"traffic\"\n\
             [[rule]]\nname = \"r\"\nfrontend = \"f\"\npool = \"p\"\n",
            pki.chain.display(),
            pki.key.display()
        ),
    )?;
    Ok((spawn_lb(&file, front, "tls").await?, front))
}

/// `mqlb lb -c file` (release), once its frontend `front` listens.
async fn spawn_lb(file: &Path, front: SocketAddr, what: &str) -> anyhow::Result<Proc> {
    let child = Command::new(mqlb_release_bin()?)
        .args(["lb", "-c"])
        .arg(file)
        .env("RUST_LOG", "warn")
        .spawn()
        .with_context(|| format!("starting mqlb lb ({what})"))?;
    let mut p = Proc(child);
    wait_listening(front, &mut p).await?;
    Ok(p)
}

/// `mqlb lb` with a plaintext frontend, five-tuple to `backend`, a pool speaking TLS to it
/// (verified by `ca`, for its address) when `ca` is given: the process, its frontend and its
/// admin address.
async fn start_mqlb_pool(
    dir: &Path,
    backend: SocketAddr,
    ca: Option<&Path>,
) -> anyhow::Result<(Proc, SocketAddr, SocketAddr)> {
    let front: SocketAddr = format!("127.0.0.1:{}", mqlb_tests::free_port()?).parse()?;
    let admin: SocketAddr = format!("127.0.0.1:{}", mqlb_tests::free_port()?).parse()?;
    let tag = if ca.is_some() {
        "tls-pool"
    } else {
        "plain-pool"
    };
    let file = dir.join(format!("mqlb-{tag}.toml"));
    let tls = ca.map_or(String::new(), |ca| {
        format!("tls = {{ ca = \"{}\" }}\n", ca.display())
    });
    std::fs::write(
        &file,
        format!(
            "[lb]\nadmin = \"{admin}\"\nwatch_config = false\n\
             [[frontend]]\nname = \"f\"\nbind = \"{front}\"\n\
             [[pool]]\nname = \"p\"\nprobe = \"t\"\n{tls}\
             [[pool.backend]]\nid = \"b\"\naddr = \"{backend}\"\n\
             [[probe]]\nname = \"t\"\nport = \"traffic\"\n\
             [[rule]]\nname = \"r\"\nfrontend = \"f\"\npool = \"p\"\n"
        ),
    )?;
    Ok((spawn_lb(&file, front, tag).await?, front, admin))
}

/// HAProxy terminating TLS (tickets on, as its default), TCP mode to `backend`.
async fn start_haproxy_tls(
    dir: &Path,
    pki: &Pki,
    backend: SocketAddr,
) -> anyhow::Result<Option<(Proc, SocketAddr)>> {
    if !haproxy_installed() {
        return Ok(None);
    }
    let front: SocketAddr = format!("127.0.0.1:{}", mqlb_tests::free_port()?).parse()?;
    let file = dir.join("haproxy-tls.cfg");
    std::fs::write(
        &file,
        format!(
            "global\n  maxconn 8000\n  nbthread 2\ndefaults\n  mode tcp\n  timeout connect 3s\n  timeout client 4m\n  timeout server 4m\n\
             frontend f\n  bind {front} ssl crt {}\n  default_backend b\nbackend b\n  server s0 {backend}\n",
            pki.combined.display()
        ),
    )?;
    Ok(Some((run_haproxy(&file, front).await?, front)))
}

/// `total` TLS handshakes to `addr`, 16 at a time, each connection closed after it (and read
/// to its end); with
/// `resume`, each worker's connector keeps its tickets, so all but its first resume. Returns
/// handshakes per second and how many were resumed.
async fn handshakes(
    addr: SocketAddr,
    pki: &Pki,
    total: usize,
    resume: bool,
) -> anyhow::Result<(f64, usize)> {
    const WORKERS: usize = 16;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let connector = client(pki, resume)?;
        let n = total / WORKERS + usize::from(w < total % WORKERS);
        tasks.push(tokio::spawn(async move {
            let mut resumed = 0;
            for _ in 0..n {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let mut tls = connector.connect(server_name()?, tcp).await?;
                if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                    resumed += 1;
                }
                // Close, and read to the server's close: TLS 1.3 tickets come after the
                // handshake, and only a read takes them in (the same for every target).
                tls.shutdown().await?;
                let mut rest = Vec::new();
                let read = tls.read_to_end(&mut rest);
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), read).await;
            }
            anyhow::Ok(resumed)
        }));
    }
    let mut resumed = 0;
    for t in tasks {
        resumed += t.await??;
    }
    Ok((total as f64 / start.elapsed().as_secs_f64(), resumed))
}

/// One TLS stream of `bytes` to `addr` (written, closed with close_notify, the server's one
/// byte read back): MiB/s.
async fn bulk(addr: SocketAddr, pki: &Pki, bytes: usize) -> anyhow::Result<f64> {
    let connector = client(pki, false)?;
    let start = Instant::now();
    let mut tls = connector
        .connect(server_name()?, TcpStream::connect(addr).await?)
        .await?;
    send_and_ack(&mut tls, bytes).await?;
    Ok(bytes as f64 / (1024.0 * 1024.0) / start.elapsed().as_secs_f64())
}

/// RSS growth of process `pid` per connection while `n` connections that `open` made (and
/// sent a byte on, so the LB opens its backend leg) are held idle.
async fn idle_kib<T, F>(pid: u32, n: usize, open: impl FnMut() -> F) -> anyhow::Result<f64>
where
    F: std::future::Future<Output = anyhow::Result<T>>,
{
    let before = rss_kib(pid)?;
    let held = hold(n, open).await?;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await; // the last legs settle
    let after = rss_kib(pid)?;
    drop(held);
    Ok(after.saturating_sub(before) as f64 / n as f64)
}

/// `n` connections `open` made.
async fn hold<T, F>(n: usize, mut open: impl FnMut() -> F) -> anyhow::Result<Vec<T>>
where
    F: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        held.push(open().await?);
    }
    Ok(held)
}

/// Waits until the LB whose admin is `admin` relays `n` connections
/// (`mqlb_connections_active`: the backend leg open, its TLS handshake done), then a little
/// more for the legs to settle (TLS 1.3 session tickets read).
async fn relaying(admin: SocketAddr, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (_, text) = mqlb_tests::http(admin, "GET", "/metrics").await?;
        let active = mqlb_tests::metric(&text, "mqlb_connections_active", &[]);
        if active >= n as f64 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {active} of {n} connections relayed after 60 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    Ok(())
}

/// [`idle_kib`] of TLS connections through `addr`, handshaken and then silent.
async fn idle_tls_kib(addr: SocketAddr, pki: &Pki, pid: u32, n: usize) -> anyhow::Result<f64> {
    let connector = client(pki, false)?;
    idle_kib(pid, n, || async {
        let mut tls = connector
            .connect(server_name()?, TcpStream::connect(addr).await?)
            .await?;
        tls.write_all(b"x").await?;
        tls.flush().await?;
        anyhow::Ok(tls)
    })
    .await
}

/// RSS growth per plaintext connection held idle through `addr`, an LB whose admin is
/// `admin`, counted once it relays them all: the growth from `n / 4` connections held to
/// `n / 4 + n`, what one more connection costs past what the first ones settle in the
/// process (the runtime's and the allocator's first growth, the copy's buffer pool).
async fn idle_plain_kib(
    addr: SocketAddr,
    admin: SocketAddr,
    pid: u32,
    n: usize,
) -> anyhow::Result<f64> {
    let open = || async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"x").await?;
        anyhow::Ok(s)
    };
    let warm = hold(n / 4, open).await?;
    relaying(admin, warm.len()).await?;
    let before = rss_kib(pid)?;
    let held = hold(n, open).await?;
    relaying(admin, warm.len() + n).await?;
    let after = rss_kib(pid)?;
    drop((warm, held));
    Ok(after.saturating_sub(before) as f64 / n as f64)
}

/// Memory per idle connection through `mqlb lb` to a plain pool and to a TLS pool (the
/// direct server, verified by the bench's CA), each LB a process of its own: KiB, plain then
/// TLS.
async fn pool_idle(
    dir: &Path,
    pki: &Pki,
    sink: SocketAddr,
    direct: SocketAddr,
    n: usize,
) -> anyhow::Result<(f64, f64)> {
    let (plain, addr, admin) = start_mqlb_pool(dir, sink, None).await?;
    let plain_kib = idle_plain_kib(addr, admin, plain.0.id(), n).await?;
    drop(plain);
    let (tls, addr, admin) = start_mqlb_pool(dir, direct, Some(&pki.ca_pem)).await?;
    let tls_kib = idle_plain_kib(addr, admin, tls.0.id(), n).await?;
    Ok((plain_kib, tls_kib))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let sizes = Sizes {
        reps: reps_arg(3),
        handshakes: arg("--handshakes", 2000usize),
        idle: arg("--idle", 2000usize),
        bytes: arg("--mib", 256usize) << 20,
    };
    let idle = sizes.idle;
    let dir = mqlb_tests::TempDir::new("tls-bench")?;
    let pki = pki(dir.path())?;
    let sink = discard_server()?;
    let direct = direct_server(&pki)?;
    let pools_only = std::env::args().any(|a| a == "--pools-only");
    if !pools_only {
        terminating(dir.path(), &pki, sink, direct, &sizes).await?;
    }
    // Each LB a fresh process, plain and TLS alternated: the plain figure moves between
    // runs of one binary (1.8 to 4.4 KiB seen, the allocator's growth), the median steadies it.
    let (mut plain, mut tls) = (Vec::new(), Vec::new());
    for _ in 0..sizes.reps {
        let (p, t) = pool_idle(dir.path(), &pki, sink, direct, idle).await?;
        plain.push(p);
        tls.push(t);
    }
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let (plain_kib, tls_kib) = (median(plain.clone()), median(tls.clone()));
    println!(
        "memory per idle connection to a TLS pool ({idle} held, median of {}): mqlb {tls_kib:.1} KiB, \
         to a plain pool {plain_kib:.1} KiB (tls/plain {:.2}, +{:.1} KiB; runs: tls {}, plain {})",
        sizes.reps,
        tls_kib / plain_kib,
        tls_kib - plain_kib,
        list(&tls),
        list(&plain),
    );
    Ok(())
}

/// How much each workload does.
struct Sizes {
    reps: usize,
    handshakes: usize,
    /// Connections held for the memory rows.
    idle: usize,
    /// Of the bulk stream.
    bytes: usize,
}

/// The rows of TLS terminated at the LB: handshakes, bulk, memory per idle TLS connection.
async fn terminating(
    dir: &Path,
    pki: &Pki,
    sink: SocketAddr,
    direct: SocketAddr,
    sizes: &Sizes,
) -> anyhow::Result<()> {
    let &Sizes {
        reps,
        handshakes: total,
        idle,
        bytes,
    } = sizes;
    let (mqlb, mqlb_addr) = start_mqlb_tls(dir, pki, sink).await?;
    let hap = start_haproxy_tls(dir, pki, sink).await?;
    let targets: Vec<(&str, SocketAddr)> = [("direct", direct), ("mqlb", mqlb_addr)]
        .into_iter()
        .chain(hap.as_ref().map(|(_, a)| ("haproxy", *a)))
        .collect();
    let names = [
        "full handshakes/s",
        "resumed handshakes/s",
        "TLS bulk MiB/s (1 stream)",
    ];
    let mut rows: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); targets.len()]; names.len()];
    for r in 0..reps {
        for (t, (name, addr)) in targets.iter().enumerate() {
            rows[0][t].push(handshakes(*addr, pki, total, false).await?.0);
            let (rate, resumed) = handshakes(*addr, pki, total, true).await?;
            anyhow::ensure!(
                resumed * 2 > total,
                "{name}: only {resumed} of {total} resumed"
            );
            rows[1][t].push(rate);
            rows[2][t].push(bulk(*addr, pki, bytes).await?);
        }
        eprintln!("repetition {} of {reps} done", r + 1);
    }
    let mqlb_idle = idle_tls_kib(mqlb_addr, pki, mqlb.0.id(), idle).await?;
    let hap_idle = match &hap {
        Some((p, a)) => Some(idle_tls_kib(*a, pki, p.0.id(), idle).await?),
        None => None,
    };
    println!("mqlb tls-bench: medians of {reps} interleaved repetitions, loopback, 2 cores");
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9}",
        "workload", "direct", "mqlb", "haproxy", "mqlb/dir", "hap/dir", "mqlb/hap"
    );
    for (i, name) in names.iter().enumerate() {
        let m: Vec<f64> = rows[i].iter().map(|v| median(v.clone())).collect();
        let hap = m.get(2).copied();
        let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        println!(
            "{:<28} {:>10.0} {:>10.0} {:>10} {:>9.2} {:>9} {:>9}",
            name,
            m[0],
            m[1],
            or_dash(hap.map(|h| format!("{h:.0}"))),
            m[1] / m[0],
            or_dash(hap.map(|h| format!("{:.2}", h / m[0]))),
            or_dash(hap.map(|h| format!("{:.2}", m[1] / h))),
        );
    }
    println!(
        "memory per idle TLS connection ({idle} held): mqlb {mqlb_idle:.1} KiB, haproxy {} (mqlb/haproxy {})",
        hap_idle.map_or("-".into(), |h| format!("{h:.1} KiB")),
        hap_idle.map_or("-".into(), |h| format!("{:.2}", mqlb_idle / h)),
    );
    Ok(())
}
