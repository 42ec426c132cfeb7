//! The HA server on PostgreSQL (issue 18): the store keeps the same contract as SQLite's, and
//! HA servers on simulated hosts share one PostgreSQL with one primary at a time, across
//! partitions and restarts of the database. Each test starts a PostgreSQL server of its own in
//! a scratch directory and removes it afterwards (they fail, not skip, when PostgreSQL is not
//! installed).

use std::time::Duration;

use mqlb_haserver::{contract, PostgresOptions, PostgresStore, Store};
use mqlb_tests::{Hosts, Postgres};

/// The test server starts on a host's address, keeps its data across a crash-like stop and a
/// start on the same address, and leaves nothing behind.
#[tokio::test]
async fn the_test_postgres_keeps_its_data_across_a_restart() -> anyhow::Result<()> {
    let hosts = Hosts::new(1)?;
    let mut pg = Postgres::start_on(hosts.host(0).ip.into()).await?;
    assert_eq!(pg.addr.ip(), std::net::IpAddr::from(hosts.host(0).ip));
    pg.psql(
        "postgres",
        "CREATE TABLE t (v int); INSERT INTO t VALUES (42)",
    )?;
    pg.stop()?;
    assert!(pg.psql("postgres", "SELECT 1").is_err(), "stopped");
    pg.start_again().await?;
    assert_eq!(pg.psql("postgres", "SELECT v FROM t")?, "42");
    Ok(())
}

/// The PostgreSQL store keeps the store contract (mqlb_haserver::contract): every check the
/// SQLite store's unit tests run, each on a fresh database of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_store_keeps_the_store_contract() -> anyhow::Result<()> {
    let pg = Postgres::start().await?;
    let mut ran = Vec::new();
    for (name, check) in contract::CHECKS {
        pg.psql("postgres", &format!("CREATE DATABASE {name}"))?;
        let url = pg.url(name);
        let rt = tokio::runtime::Handle::current();
        let check = *check;
        // The store's calls block: the check runs off the async threads, as in the server.
        tokio::task::spawn_blocking(move || {
            let open = || {
                let options = PostgresOptions::for_lease(Duration::from_secs(3));
                rt.block_on(PostgresStore::open(&url, options))
                    .map(|s| Box::new(s) as Box<dyn Store>)
            };
            check(&open)
        })
        .await?
        .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        ran.push(*name);
    }
    assert!(ran.len() >= 8, "checks run: {ran:?}");
    Ok(())
}
