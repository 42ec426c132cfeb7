//! How long the HA primary's failover takes against its lease (issue 18): three `mqlb haserver`
//! processes on three simulated hosts (127.0.N.1, `mqlb_tests::Hosts`) sharing one PostgreSQL
//! on a fourth. Each repetition, for each lease: the primary is killed (`kill -9`: it gives
//! nothing up) and the time until another server says `primary` in `/healthz` is taken; the
//! killed one is started again, then the primary's host is partitioned from the database's
//! (nftables) and the same is taken, with when the cut-off one stopped saying `primary` (it
//! must stop before a backup can take over). Medians, and their ratio to the lease. The
//! takeover waits for the lease to run out by the database's clock, so it cannot be shorter
//! than the lease less the time since the last renewal; the ratio says what the rest costs.
//! Needs root and `nft` (the partitions) and PostgreSQL, as the tests do.
//!
//! `cargo run --release -p mqlb-benches --bin ha-failover [-- --reps N]` (`MQLB_BIN` picks
//! the `mqlb` binary, as for every bench).

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use mqlb_benches::*;
use mqlb_tests::{get_json, Host, Hosts, Postgres, TempDir, TEST_SECRET};

const DEADLINE: Duration = Duration::from_secs(30);

async fn role(addr: SocketAddr) -> Option<String> {
    let h = get_json(addr, "/healthz").await.ok()?;
    h["role"].as_str().map(str::to_string)
}

/// The index of the server that says it is primary, once exactly one does (not `but`).
async fn one_primary(addrs: &[SocketAddr], but: Option<usize>) -> anyhow::Result<usize> {
    let start = Instant::now();
    loop {
        let mut primaries = Vec::new();
        for (i, a) in addrs.iter().enumerate() {
            if Some(i) != but && role(*a).await.as_deref() == Some("primary") {
                primaries.push(i);
            }
        }
        if let [p] = primaries[..] {
            return Ok(p);
        }
        anyhow::ensure!(
            start.elapsed() < DEADLINE,
            "no single primary: {primaries:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

struct Servers {
    file: std::path::PathBuf,
    addrs: Vec<SocketAddr>,
    pids: Vec<u32>,
}

impl Servers {
    fn start(&mut self, i: usize, host: &Host) -> anyhow::Result<()> {
        let mut cmd = Command::new(mqlb_release_bin()?);
        cmd.arg("haserver")
            .arg("-c")
            .arg(&self.file)
            .args(["--id", &format!("ha{i}")])
            .env("RUST_LOG", "error")
            .stdout(Stdio::null());
        self.pids[i] = host.spawn(&mut cmd)?;
        Ok(())
    }

    async fn answers(&self, i: usize) -> anyhow::Result<()> {
        let start = Instant::now();
        while role(self.addrs[i]).await.is_none() {
            anyhow::ensure!(start.elapsed() < DEADLINE, "ha{i} does not answer");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    fn kill(&self, i: usize) -> anyhow::Result<()> {
        let ok = Command::new("kill")
            .args(["-KILL", &self.pids[i].to_string()])
            .status()?
            .success();
        anyhow::ensure!(ok, "kill -KILL ha{i}");
        Ok(())
    }
}

/// One lease's repetitions: (kill -9 takeovers, partition takeovers, partition step-downs), s.
async fn run(lease: Duration, reps: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    let hosts = Hosts::new(4)?;
    let pg = Postgres::start_on(hosts.host(3).ip.into()).await?;
    let dir = TempDir::new("ha-failover")?;
    let addrs: Vec<SocketAddr> = (0..3)
        .map(|i| hosts.host(i).free_addr())
        .collect::<anyhow::Result<_>>()?;
    let mut toml = format!(
        "[cluster]\nsecret = \"{TEST_SECRET}\"\n[ha]\nlease = \"{}ms\"\n",
        lease.as_millis()
    );
    for (i, a) in addrs.iter().enumerate() {
        toml.push_str(&format!(
            "[[haserver]]\nid = \"ha{i}\"\nlisten = \"{a}\"\ndb = \"{}\"\ndb_source = \"{}\"\n",
            pg.url("postgres"),
            a.ip()
        ));
    }
    let file = dir.path().join("ha.toml");
    std::fs::write(&file, toml)?;
    let mut s = Servers {
        file,
        addrs: addrs.clone(),
        pids: vec![0; 3],
    };
    for i in 0..3 {
        s.start(i, hosts.host(i))?;
        s.answers(i).await?;
    }
    let (mut killed, mut cut, mut stepped) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        let p = one_primary(&addrs, None).await?;
        let at = Instant::now();
        s.kill(p)?;
        one_primary(&addrs, Some(p)).await?;
        killed.push(at.elapsed().as_secs_f64());
        s.start(p, hosts.host(p))?;
        s.answers(p).await?;

        let p = one_primary(&addrs, None).await?;
        let at = Instant::now();
        hosts.partition(hosts.host(p), hosts.host(3))?;
        let mut down = None;
        let start = Instant::now();
        let taken = loop {
            if down.is_none() && role(addrs[p]).await.as_deref() != Some("primary") {
                down = Some(at.elapsed());
            }
            let mut others = None;
            for (i, a) in addrs.iter().enumerate() {
                if i != p && role(*a).await.as_deref() == Some("primary") {
                    others = Some(at.elapsed());
                }
            }
            if let Some(t) = others {
                break t;
            }
            anyhow::ensure!(
                start.elapsed() < DEADLINE,
                "no takeover after the partition"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let down = down.context("the cut-off primary still said primary at the takeover")?;
        cut.push(taken.as_secs_f64());
        stepped.push(down.as_secs_f64());
        hosts.heal_all()?;
        one_primary(&addrs, None).await?;
    }
    for i in 0..3 {
        s.kill(i)?;
    }
    Ok((killed, cut, stepped))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let reps = reps_arg(5);
    println!("HA primary failover on PostgreSQL, 3 haserver processes, {reps} repetitions each");
    println!("| lease | kill -9: takeover (x lease) | partition: takeover (x lease) | partition: old primary stops (x lease) |");
    println!("|---|---|---|---|");
    for lease in [Duration::from_millis(1500), Duration::from_secs(3)] {
        let (killed, cut, stepped) = run(lease, reps).await?;
        let l = lease.as_secs_f64();
        let cell = |v: Vec<f64>| {
            let (lo, hi) = v
                .iter()
                .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
            let m = median(v);
            format!("{m:.2} s ({:.2}; {lo:.2}-{hi:.2} s)", m / l)
        };
        println!(
            "| {l} s | {} | {} | {} |",
            cell(killed),
            cell(cut),
            cell(stepped)
        );
    }
    Ok(())
}
