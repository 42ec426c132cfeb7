//! A PostgreSQL server of a test's own (issue 18): `initdb` in a scratch directory, `pg_ctl`
//! on a free port of a given loopback address (a [`crate::Host`]'s, so it can be partitioned),
//! stopped and removed on drop. PostgreSQL refuses to run as root, so as root the server runs
//! as the `postgres` user (Debian's package creates it) and the directory is handed to it.
//! Tests that need PostgreSQL fail when it is missing (`.ci/run` installs Debian's
//! `postgresql`): they do not skip.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::{free_port, wait_until, TempDir};

/// Where Debian's `postgresql` package puts the server binaries; `$MQLB_PG_BIN` overrides it.
fn pg_bin(tool: &str) -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("MQLB_PG_BIN") {
        Some(d) => PathBuf::from(d),
        None => {
            let base = Path::new("/usr/lib/postgresql");
            // The newest installed major version.
            let mut versions: Vec<u32> = std::fs::read_dir(base)
                .with_context(|| {
                    format!(
                        "PostgreSQL is not installed ({} missing; .ci/run installs Debian's \
                         postgresql, or set MQLB_PG_BIN)",
                        base.display()
                    )
                })?
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect();
            versions.sort_unstable();
            let v = versions
                .last()
                .with_context(|| format!("no PostgreSQL version under {}", base.display()))?;
            base.join(v.to_string()).join("bin")
        }
    };
    let p = dir.join(tool);
    anyhow::ensure!(p.exists(), "{} missing", p.display());
    Ok(p)
}

fn is_root() -> bool {
    // The effective uid without libc: the owner of this process's /proc entry.
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// A running PostgreSQL server; dropping it stops the server and removes its directory.
pub struct Postgres {
    dir: TempDir,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The superuser every test connects as (trust authentication on loopback).
    pub user: String,
    running: bool,
    /// Its certificate and key, once it serves TLS ([`Postgres::restart_with_tls`]).
    tls: Option<(PathBuf, PathBuf)>,
}

impl Postgres {
    /// Initialises a cluster and starts it on a free port of `127.0.0.1`.
    pub async fn start() -> anyhow::Result<Postgres> {
        Self::start_on(IpAddr::from([127, 0, 0, 1])).await
    }

    /// Initialises a cluster and starts it on a free port of `ip` (a host's address).
    pub async fn start_on(ip: IpAddr) -> anyhow::Result<Postgres> {
        let dir = TempDir::new("postgres")?;
        let mut pg = Postgres {
            dir,
            addr: SocketAddr::new(ip, 0),
            user: "mqlb".into(),
            running: false,
            tls: None,
        };
        if is_root() {
            // PostgreSQL will not run as root: the postgres user owns the directory.
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(pg.dir.path()))?;
        }
        let data = pg.data();
        pg.run_pg(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                &pg.user,
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        )?;
        // initdb trusts 127.0.0.1 only; clients on simulated hosts connect from 127.0.N.1.
        let hba = pg.dir.path().join("data").join("pg_hba.conf");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&hba)
            .with_context(|| format!("opening {}", hba.display()))?;
        std::io::Write::write_all(&mut f, b"host all all 127.0.0.0/8 trust\n")
            .with_context(|| format!("writing {}", hba.display()))?;
        drop(f);
        let mut last = None;
        // The port picked free may be taken before the server binds it: try another.
        for _ in 0..3 {
            pg.addr = SocketAddr::new(ip, free_port()?);
            match pg.start_again().await {
                Ok(()) => return Ok(pg),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("PostgreSQL did not start")))
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// Runs a PostgreSQL tool, as the `postgres` user when this process is root.
    fn run_pg(&self, tool: &str, args: &[&str]) -> anyhow::Result<Output> {
        let bin = pg_bin(tool)?;
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        cmd.args(args).current_dir(self.dir.path());
        run(&mut cmd)
    }

    /// A connection URL for database `db` (`postgres` exists from the start).
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{}@{}:{}/{db}",
            self.user,
            self.addr.ip(),
            self.addr.port()
        )
    }

    /// Starts the server again after [`Postgres::stop`], on the same address, with its data.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        let data = self.data();
        let log = self.dir.path().join("postgres.log").display().to_string();
        // The socket directory is the scratch directory: no clash with a system server's.
        let mut opts = format!(
            "-c listen_addresses={} -p {} -k {} -c fsync=off -c max_connections=100",
            self.addr.ip(),
            self.addr.port(),
            self.dir.path().display()
        );
        if let Some((cert, key)) = &self.tls {
            opts.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                cert.display(),
                key.display()
            ));
        }
        let started = self.run_pg(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-o", &opts, "-w", "-t", "30", "start",
            ],
        );
        if let Err(e) = started {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("{e:#}\npostgres.log:\n{log}");
        }
        self.running = true;
        let addr = self.addr;
        wait_until(
            "PostgreSQL accepts connections",
            Duration::from_secs(20),
            || async move { tokio::net::TcpStream::connect(addr).await.is_ok() },
        )
        .await?;
        Ok(())
    }

    /// Stops the server and starts it again serving TLS with the certificate chain `cert` and
    /// key `key` (PEM), copied into its directory where its user may read them (the key mode
    /// 0600, as PostgreSQL requires). Clients may still connect without TLS.
    pub async fn restart_with_tls(
        &mut self,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        self.stop()?;
        let (c, k) = (
            self.dir.path().join("server.crt"),
            self.dir.path().join("server.key"),
        );
        std::fs::copy(cert, &c).with_context(|| format!("copying {}", cert.display()))?;
        std::fs::copy(key, &k).with_context(|| format!("copying {}", key.display()))?;
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600))?;
        if is_root() {
            run(Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&c)
                .arg(&k))?;
        }
        self.tls = Some((c, k));
        self.start_again().await
    }

    /// Stops the server at once (`immediate`: like a crash, no checkpoint); the data stays.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let data = self.data();
        self.run_pg("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"])?;
        self.running = false;
        Ok(())
    }

    /// Runs `sql` with `psql` on database `db`; returns its unaligned, tuples-only output.
    pub fn psql(&self, db: &str, sql: &str) -> anyhow::Result<String> {
        let out = run(Command::new("psql").args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            &self.url(db),
            "-c",
            sql,
        ]))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            if let Err(e) = self.stop() {
                eprintln!("stopping PostgreSQL at {}: {e:#}", self.addr);
            }
        }
    }
}
