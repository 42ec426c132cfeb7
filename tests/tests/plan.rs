//! `mqlb plan` predicts exactly what a membership change moves: 60 clients through an LB with
//! three brokers; the plan of `--remove b2 --add b4=ADDR --weight b1=2`, asked of the running
//! LB and of its config file with the client IDs, equals what happens when the change is
//! applied and every client connects again.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;

use common::{topo, DEADLINE};
use mqlb_mqtt::{encode_connect, ConnectOptions, ProtocolLevel};
use mqlb_tests::{connections, mqlb_bin, wait_until, Mosquitto};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CLIENTS: usize = 60;

/// An MQTT 3.1.1 client through the LB, connected (CONNACK read); dropping it hangs up.
async fn connect(front: SocketAddr, id: &str) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(front).await?;
    let connect = encode_connect(&ConnectOptions {
        level: ProtocolLevel::V311,
        client_id: id.to_string(),
        ..ConnectOptions::default()
    });
    s.write_all(&connect).await?;
    let mut connack = [0u8; 4];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut connack)).await??;
    anyhow::ensure!(connack == [0x20, 2, 0, 0], "{id}: CONNACK {connack:?}");
    Ok(s)
}

/// Client ID → backend, for the clients of this test, once all `n` are listed.
async fn placement(admin: SocketAddr, n: usize) -> anyhow::Result<BTreeMap<String, String>> {
    let start = std::time::Instant::now();
    loop {
        let listed: BTreeMap<String, String> = connections(admin)
            .await?
            .into_iter()
            .filter(|(id, _, _)| id.starts_with("plan-"))
            .map(|(id, b, _)| (id, b))
            .collect();
        if listed.len() == n {
            return Ok(listed);
        }
        anyhow::ensure!(
            start.elapsed() < DEADLINE,
            "{} of {n} clients listed after {DEADLINE:?}",
            listed.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// `move ID POOL FROM -> TO` lines of a plan: ID → (FROM, TO).
fn moves(report: &str) -> BTreeMap<String, (String, String)> {
    report
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w.as_slice() {
                ["move", id, _pool, from, "->", to] => {
                    Some((id.to_string(), (from.to_string(), to.to_string())))
                }
                _ => None,
            }
        })
        .collect()
}

fn plan(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(mqlb_bin()?).arg("plan").args(args).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(
        out.status.success(),
        "mqlb plan {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plan_is_what_the_change_moves() -> anyhow::Result<()> {
    let t = topo(3, "distribution = \"mqtt-client-id\"\n").await?;
    let b4 = Mosquitto::start().await?;
    let ids: Vec<String> = (0..CLIENTS).map(|i| format!("plan-{i}")).collect();
    let mut conns = Vec::new();
    for id in &ids {
        conns.push(connect(t.front, id).await?);
    }
    let before = placement(t.admin, CLIENTS).await?;

    let change = ["--remove", "b2", "--add", &format!("b4={}", b4.addr())];
    let change: Vec<&str> = change.iter().copied().chain(["--weight", "b1=2"]).collect();
    let admin = t.admin.to_string();
    let live_args: Vec<&str> = ["--admin", admin.as_str()]
        .into_iter()
        .chain(change.iter().copied())
        .collect();
    let live = plan(&live_args)?;
    assert!(
        live.contains(&format!("{CLIENTS} client(s) placed by client ID")),
        "{live}"
    );
    let predicted = moves(&live);

    // The same plan without the LB: the config file and the client IDs.
    let list = t._dir.path().join("clients.txt");
    std::fs::write(&list, ids.join("\n") + "\n")?;
    let (cfg, list) = (
        t.config_file.to_str().unwrap_or_default(),
        list.to_str().unwrap_or_default(),
    );
    let file_args: Vec<&str> = ["-c", cfg, "--clients", list]
        .into_iter()
        .chain(change.iter().copied())
        .collect();
    assert_eq!(
        moves(&plan(&file_args)?),
        predicted,
        "file plan != live plan"
    );

    // Apply the change, then every client connects again.
    let text = std::fs::read_to_string(&t.config_file)?;
    let b2 = format!(
        "[[pool.backend]]\nid = \"b2\"\naddr = \"{}\"\n",
        t.brokers[1].addr()
    );
    let b1 = format!(
        "[[pool.backend]]\nid = \"b1\"\naddr = \"{}\"\n",
        t.brokers[0].addr()
    );
    anyhow::ensure!(text.contains(&b2) && text.contains(&b1), "{text}");
    let changed = text.replace(&b2, "").replace(
        &b1,
        &format!(
            "{b1}weight = 2\n[[pool.backend]]\nid = \"b4\"\naddr = \"{}\"\n",
            b4.addr()
        ),
    );
    t.lb.apply(mqlb_config::Config::parse(&changed, "changed")?)
        .await?;
    drop(conns);
    wait_until("the old connections gone", DEADLINE, || async {
        connections(t.admin).await.is_ok_and(|c| c.is_empty())
    })
    .await?;
    let mut again = Vec::new();
    for id in &ids {
        again.push(connect(t.front, id).await?);
    }
    let after = placement(t.admin, CLIENTS).await?;
    let actual: BTreeMap<String, (String, String)> = before
        .iter()
        .filter(|(id, b)| after.get(*id) != Some(b))
        .map(|(id, b)| (id.clone(), (b.clone(), after[id].clone())))
        .collect();
    assert!(!actual.is_empty(), "the change moved nobody: not a test");
    assert_eq!(predicted, actual, "plan:\n{live}");
    eprintln!(
        "plan predicted {} of {CLIENTS} moves, all of them right",
        predicted.len()
    );
    Ok(())
}
