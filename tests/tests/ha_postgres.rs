//! The HA server on PostgreSQL (issue 18). So far: the harness's own PostgreSQL server, which
//! these tests start in a scratch directory and remove afterwards (they fail, not skip, when
//! PostgreSQL is not installed).

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
