//! Several machines simulated on one (issue 18): each [`Host`] is a loopback address of its own,
//! `127.0.N.1`, and a partition between two hosts is an nftables rule that drops every packet
//! between their two addresses, in both directions — new connections and established ones.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let hosts = mqlb_tests::Hosts::new(3)?; // 127.0.N.1, 127.0.M.1, ... free machine-wide
//! let (a, b) = (hosts.host(0), hosts.host(1));
//! let listener = b.listen().await?; // bound to b's address
//! let stream = a.connect(listener.local_addr()?).await?; // from a's address
//! hosts.partition(a, b)?; // a <-> b dropped; a <-> c and b <-> c still talk
//! hosts.heal(a, b)?;
//! # Ok(()) }
//! ```
//!
//! What a partition sees is the packets' addresses, so a host's components must use the host's
//! address at both ends: listen on it ([`Host::listen`], [`Host::addr`]) *and* connect from it
//! ([`Host::connect`], [`Host::socket`]). A connection made without binding its source leaves
//! from `127.0.0.1`, which is no host, and crosses every partition. (mqlb's broker and LB do
//! not bind their outgoing connections' source today: a partition cuts what other hosts'
//! bound clients send to them, not what they open themselves. An HA server on PostgreSQL
//! does, with `haserver.db_source`: [`Host::start_haserver_pg`].)
//!
//! Each [`Hosts`] owns an nftables table of its own (`inet mqlb_hosts_<pid>_<n>`) whose only
//! rule matches its own hosts' addresses, so parallel tests (and anything on `127.0.0.1`) are
//! untouched; the table is deleted on drop. Host numbers are unique across processes: each is
//! held by a lock file in the temporary directory for the life of its [`Hosts`]. Needs root and
//! `nft` (`.ci/run` installs nftables); without them [`Hosts::new`] fails, it does not skip.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::lock;
use crate::process::kill_and_reap;

/// One simulated host: its address, and the processes started on it (for [`Hosts::pause`]).
pub struct Host {
    /// `127.0.N.1`.
    pub ip: Ipv4Addr,
    procs: Mutex<Vec<Child>>,
    /// Holds the host number against other processes while it is in use.
    _claim: File,
}

impl Host {
    /// `ip:port` on this host.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip), port)
    }

    /// An address on this host whose port was free a moment ago, for a process that must be
    /// told where to listen.
    pub fn free_addr(&self) -> anyhow::Result<SocketAddr> {
        let l = std::net::TcpListener::bind(self.addr(0))
            .with_context(|| format!("binding {}:0", self.ip))?;
        Ok(l.local_addr()?)
    }

    /// A listener on an ephemeral port of this host.
    pub async fn listen(&self) -> anyhow::Result<TcpListener> {
        TcpListener::bind(self.addr(0))
            .await
            .with_context(|| format!("binding {}:0", self.ip))
    }

    /// A TCP socket bound to this host's address (any port): connect it anywhere and the
    /// packets carry this host's address, so partitions apply to it.
    pub fn socket(&self) -> anyhow::Result<TcpSocket> {
        let s = TcpSocket::new_v4()?;
        s.bind(self.addr(0))
            .with_context(|| format!("binding {}:0", self.ip))?;
        Ok(s)
    }

    /// Connects from this host's address to `to`.
    pub async fn connect(&self, to: SocketAddr) -> anyhow::Result<TcpStream> {
        let stream = self
            .socket()?
            .connect(to)
            .await
            .with_context(|| format!("connecting {} -> {to}", self.ip))?;
        Ok(stream)
    }

    /// Starts `cmd` as a process of this host: [`Hosts::pause`] stops it, dropping the
    /// [`Hosts`] kills it. Returns its pid. (It must itself bind to [`Host::addr`] addresses:
    /// a host is an address, not a namespace.)
    pub fn spawn(&self, cmd: &mut Command) -> anyhow::Result<u32> {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {cmd:?} on {}", self.ip))?;
        let pid = child.id();
        lock(&self.procs).push(child);
        Ok(pid)
    }

    /// Starts an HA server in this process, listening on an ephemeral port of this host, with
    /// the SQLite file `db` (see [`crate::start_haserver`]).
    pub async fn start_haserver(
        &self,
        id: &str,
        db: &std::path::Path,
        timing: mqlb_haserver::Timing,
    ) -> anyhow::Result<mqlb_haserver::HaServer> {
        crate::start_haserver_at(id, db, self.addr(0), timing).await
    }

    /// Starts an HA server in this process on the PostgreSQL database at `url`, listening on an
    /// ephemeral port of this host and connecting to the database *from* this host's address, so
    /// a partition between this host and the database's cuts it off.
    pub async fn start_haserver_pg(
        &self,
        id: &str,
        url: &str,
        timing: mqlb_haserver::Timing,
    ) -> anyhow::Result<mqlb_haserver::HaServer> {
        let mut options = mqlb_haserver::PostgresOptions::for_lease(timing.lease);
        options.source = Some(IpAddr::V4(self.ip));
        let store = mqlb_haserver::PostgresStore::open(url, options)
            .await
            .with_context(|| format!("{id} on {}: opening the PostgreSQL store", self.ip))?;
        let listener = self.listen().await?;
        let ha = mqlb_haserver::HaServer::start(
            id,
            listener,
            std::sync::Arc::new(store),
            crate::ha_options(timing),
        )
        .await?;
        Ok(ha)
    }

    fn signal(&self, sig: &str) -> anyhow::Result<()> {
        for child in lock(&self.procs).iter_mut() {
            if matches!(child.try_wait(), Ok(Some(_))) {
                continue; // exited: nothing to signal
            }
            let ok = Command::new("kill")
                .args([sig, &child.id().to_string()])
                .status()?
                .success();
            anyhow::ensure!(ok, "kill {sig} {} failed", child.id());
        }
        Ok(())
    }
}

/// Simulated hosts with partitions between them. Dropping it heals everything (its nftables
/// table is deleted) and kills the processes started on its hosts.
pub struct Hosts {
    hosts: Vec<Host>,
    /// The nftables table, `mqlb_hosts_<pid>_<n>`.
    table: String,
}

/// The set of (source, destination) address pairs whose packets are dropped.
const SET: &str = "cut";
/// The set of (source, destination, destination port) whose packets are dropped, and their
/// answers ([`Hosts::cut_port`]).
const PORT_SET: &str = "cut_port";

fn nft(script: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (nftables, installed by .ci/run; needs root)")?;
    child
        .stdin
        .take()
        .context("nft's stdin")?
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft failed ({}): {}\nscript:\n{script}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Claims a host number no other process (nor this one) holds: 127.0.N.1 for N in 1..=254,
/// held by an exclusive lock on a file, released when the file closes (also if the process
/// dies).
fn claim_host() -> anyhow::Result<(Ipv4Addr, File)> {
    let dir = std::env::temp_dir().join("mqlb-hosts");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for n in 1..=254u8 {
        let path = dir.join(format!("127.0.{n}.1.lock"));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // Locks are per open file, so this process's own claims conflict with each other too.
        if file.try_lock().is_ok() {
            return Ok((Ipv4Addr::new(127, 0, n, 1), file));
        }
    }
    bail!("every simulated host address 127.0.1.1..127.0.254.1 is in use")
}

impl Hosts {
    /// `n` hosts on free addresses, no partition yet.
    pub fn new(n: usize) -> anyhow::Result<Hosts> {
        static TABLES: AtomicUsize = AtomicUsize::new(0);
        let table = format!(
            "mqlb_hosts_{}_{}",
            std::process::id(),
            TABLES.fetch_add(1, Ordering::Relaxed)
        );
        let mut hosts = Vec::new();
        for _ in 0..n {
            let (ip, claim) = claim_host()?;
            hosts.push(Host {
                ip,
                procs: Mutex::new(Vec::new()),
                _claim: claim,
            });
        }
        // Loopback packets all pass the output hook: one lookup there drops both directions,
        // of new and established connections alike (no conntrack accept before it).
        nft(&format!(
            "table inet {table} {{\n\
               set {SET} {{ type ipv4_addr . ipv4_addr; }}\n\
               set {PORT_SET} {{ type ipv4_addr . ipv4_addr . inet_service; }}\n\
               chain out {{ type filter hook output priority 0; policy accept;\n\
                 ip saddr . ip daddr @{SET} drop\n\
                 ip saddr . ip daddr . tcp dport @{PORT_SET} drop\n\
                 ip daddr . ip saddr . tcp sport @{PORT_SET} drop\n\
               }}\n\
             }}\n"
        ))?;
        Ok(Hosts { hosts, table })
    }

    /// Host `i` (0-based).
    ///
    /// # Panics
    /// If `i` is not below the number of hosts: a mistake in the test.
    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Host> {
        self.hosts.iter()
    }

    fn pair(a: &Host, b: &Host) -> String {
        format!("{} . {}, {} . {}", a.ip, b.ip, b.ip, a.ip)
    }

    /// Drops every packet between `a` and `b`, both ways, until [`Hosts::heal`]. Idempotent.
    pub fn partition(&self, a: &Host, b: &Host) -> anyhow::Result<()> {
        nft(&format!(
            "add element inet {} {SET} {{ {} }}\n",
            self.table,
            Self::pair(a, b)
        ))
    }

    /// Cuts `a` off from every other host of this set.
    pub fn isolate(&self, a: &Host) -> anyhow::Result<()> {
        for b in self.hosts.iter().filter(|b| b.ip != a.ip) {
            self.partition(a, b)?;
        }
        Ok(())
    }

    /// Undoes [`Hosts::partition`] of `a` and `b` (nothing if they were not partitioned).
    pub fn heal(&self, a: &Host, b: &Host) -> anyhow::Result<()> {
        // Add first so the delete never fails on a pair that was not there: one script, atomic.
        let pair = Self::pair(a, b);
        nft(&format!(
            "add element inet {t} {SET} {{ {pair} }}\ndelete element inet {t} {SET} {{ {pair} }}\n",
            t = self.table
        ))
    }

    /// Heals every partition.
    pub fn heal_all(&self) -> anyhow::Result<()> {
        nft(&format!(
            "flush set inet {t} {SET}\nflush set inet {t} {PORT_SET}\n",
            t = self.table
        ))
    }

    /// Drops what `from` sends to the TCP port `to` and what comes back, until
    /// [`Hosts::heal_port`]: one service partitioned from one address. `from` may be an
    /// address that is no host: `127.0.0.1`, where the connections of a process that binds no
    /// source leave from (mqlb's LB, see the module): cutting it from a broker's MQTT port is
    /// the LB's side of a partition between the LB's host and the broker's (the LB reaches a
    /// broker there and nothing else).
    pub fn cut_port(&self, from: Ipv4Addr, to: SocketAddr) -> anyhow::Result<()> {
        nft(&format!(
            "add element inet {} {PORT_SET} {{ {from} . {} . {} }}\n",
            self.table,
            to.ip(),
            to.port()
        ))
    }

    /// Undoes [`Hosts::cut_port`].
    pub fn heal_port(&self, from: Ipv4Addr, to: SocketAddr) -> anyhow::Result<()> {
        let e = format!("{from} . {} . {}", to.ip(), to.port());
        nft(&format!(
            "add element inet {t} {PORT_SET} {{ {e} }}\ndelete element inet {t} {PORT_SET} {{ {e} }}\n",
            t = self.table
        ))
    }

    /// SIGSTOP every process started on `host` ([`Host::spawn`]): the machine hangs, its
    /// sockets stay open.
    pub fn pause(&self, host: &Host) -> anyhow::Result<()> {
        host.signal("-STOP")
    }

    /// SIGCONT after [`Hosts::pause`].
    pub fn resume(&self, host: &Host) -> anyhow::Result<()> {
        host.signal("-CONT")
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        if let Err(e) = nft(&format!("delete table inet {}\n", self.table)) {
            eprintln!("removing the nftables table {}: {e:#}", self.table);
        }
        for host in &self.hosts {
            for child in lock(&host.procs).iter_mut() {
                // A paused process must be resumed to die promptly.
                let _ = Command::new("kill")
                    .args(["-CONT", &child.id().to_string()])
                    .status();
                kill_and_reap(child, &format!("process {} on {}", child.id(), host.ip));
            }
        }
    }
}
