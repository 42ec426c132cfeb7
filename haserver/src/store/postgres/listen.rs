//! Long-poll wake-ups across HA servers: one connection per HA server LISTENs on
//! [`CHANNEL`], every write that bumps the version NOTIFYs it (delivered at commit), and the
//! version it carries is published to the server's version watcher at once. A lost connection
//! is opened again with back-off; after each (re)connect the current version is read, so a
//! change made while it was away is not missed.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_postgres::AsyncMessage;

use super::super::StoreError;
use super::pool::{backoff, describe, Target};

/// The NOTIFY channel; the payload is the new version.
pub const CHANNEL: &str = "mqlb_ha_version";

/// Runs until aborted (the store is dropped).
pub async fn run(target: Arc<Target>, versions: watch::Sender<u64>) {
    let mut failures = 0u32;
    loop {
        let e = session(&target, &versions, &mut failures).await;
        failures = failures.saturating_add(1);
        if failures == 1 {
            tracing::warn!(at = target.at, error = %e, "PostgreSQL LISTEN connection lost; reconnecting");
        } else {
            tracing::debug!(at = target.at, error = %e, failures, "PostgreSQL LISTEN reconnect failed");
        }
        tokio::time::sleep(backoff(failures)).await;
    }
}

fn publish(versions: &watch::Sender<u64>, v: u64) {
    versions.send_if_modified(|cur| {
        let newer = v > *cur;
        if newer {
            *cur = v;
        }
        newer
    });
}

/// One connection's life: returns why it ended.
async fn session(target: &Target, versions: &watch::Sender<u64>, failures: &mut u32) -> StoreError {
    let (client, mut connection) = match target.connect().await {
        Ok(c) => c,
        Err(e) => return e,
    };
    let tx = versions.clone();
    // The connection must be polled for the client's queries to run, and its messages are
    // where the notifications arrive.
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if let Ok(v) = n.payload().parse() {
                        publish(&tx, v);
                    }
                }
                Some(Ok(_)) => {} // a notice
                Some(Err(e)) => return describe(&e),
                None => return "the server closed the connection".to_string(),
            }
        }
    });
    let setup = async {
        client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
        let v: i64 = client
            .query_one("SELECT value FROM meta WHERE key = 'version'", &[])
            .await?
            .try_get(0)?;
        Ok::<_, tokio_postgres::Error>(v)
    };
    match tokio::time::timeout(target.timeout, setup).await {
        Ok(Ok(v)) => {
            if *failures > 0 {
                tracing::info!(at = target.at, "PostgreSQL LISTEN connection back");
            }
            *failures = 0;
            publish(versions, v as u64);
        }
        Ok(Err(e)) => {
            driver.abort();
            return target.error(&e);
        }
        Err(_) => {
            driver.abort();
            return StoreError::Timeout {
                at: target.at.clone(),
                after: target.timeout,
            };
        }
    }
    let why = match driver.await {
        Ok(why) => why,
        Err(e) => e.to_string(),
    };
    drop(client);
    StoreError::Postgres {
        at: target.at.clone(),
        msg: why,
    }
}
