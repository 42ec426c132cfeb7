//! The simulated hosts of the harness (issue 18): a partition really drops the traffic between
//! two hosts, both ways, established connections included, while other pairs still talk; heal
//! restores it; a paused host's processes stop answering.

use std::net::SocketAddr;
use std::time::Duration;

use mqlb_tests::{wait_until, Host, Hosts};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What a partition gets to show it drops packets: a healthy loopback connect takes
/// microseconds.
const CUT: Duration = Duration::from_millis(700);

/// Echoes one byte back on every connection accepted.
fn echo(l: TcpListener) -> anyhow::Result<SocketAddr> {
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut b = [0u8; 1];
                while let Ok(1) = s.read(&mut b).await {
                    if s.write_all(&b).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// Whether `from` can open a connection to `to` and get a byte echoed within [`CUT`].
async fn talks(from: &Host, to: SocketAddr) -> bool {
    let attempt = async {
        let mut s = from.connect(to).await?;
        s.write_all(b"x").await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        anyhow::Ok(())
    };
    matches!(tokio::time::timeout(CUT, attempt).await, Ok(Ok(())))
}

#[tokio::test]
async fn a_partition_drops_traffic_between_two_hosts_only_and_heal_restores_it(
) -> anyhow::Result<()> {
    let hosts = Hosts::new(3)?;
    let (a, b, c) = (hosts.host(0), hosts.host(1), hosts.host(2));
    let ea = echo(a.listen().await?)?;
    let eb = echo(b.listen().await?)?;
    let ec = echo(c.listen().await?)?;
    assert_ne!(ea.ip(), eb.ip(), "each host has its own address");
    assert!(talks(a, eb).await && talks(b, ea).await, "before");

    // A connection a -> b open before the partition.
    let mut open = a.connect(eb).await?;
    open.write_all(b"1").await?;
    let mut byte = [0u8; 1];
    open.read_exact(&mut byte).await?;

    hosts.partition(a, b)?;
    assert!(!talks(a, eb).await, "a -> b across the partition");
    assert!(!talks(b, ea).await, "b -> a across the partition");
    open.write_all(b"2").await?;
    assert!(
        tokio::time::timeout(CUT, open.read_exact(&mut byte))
            .await
            .is_err(),
        "an established connection is cut too"
    );
    for (from, to, what) in [(a, ec, "a -> c"), (c, eb, "c -> b"), (b, ec, "b -> c")] {
        assert!(talks(from, to).await, "{what} during the a|b partition");
    }

    hosts.heal(a, b)?;
    assert!(talks(a, eb).await && talks(b, ea).await, "healed");
    // The established connection resumes: TCP retransmits the byte that was dropped.
    tokio::time::timeout(Duration::from_secs(10), open.read_exact(&mut byte)).await??;
    assert_eq!(&byte, b"2");

    hosts.isolate(c)?;
    assert!(!talks(a, ec).await && !talks(c, eb).await, "c isolated");
    assert!(talks(a, eb).await, "a -> b while c is isolated");
    hosts.heal_all()?;
    assert!(talks(a, ec).await && talks(c, eb).await, "all healed");
    Ok(())
}

/// Dropping `Hosts` removes its nftables table: nothing is left dropping packets.
#[tokio::test]
async fn dropping_hosts_removes_its_rules() -> anyhow::Result<()> {
    let (eb, a_ip, b_ip) = {
        let hosts = Hosts::new(2)?;
        let (a, b) = (hosts.host(0), hosts.host(1));
        hosts.partition(a, b)?;
        (echo(b.listen().await?)?, a.ip, b.ip)
    };
    let ruleset = std::process::Command::new("nft")
        .args(["list", "ruleset"])
        .output()?;
    let ruleset = String::from_utf8_lossy(&ruleset.stdout);
    // Host addresses are unique machine-wide: no other table names this pair.
    assert!(
        !ruleset.contains(&format!("{a_ip} . {b_ip}")),
        "the pair is still dropped:\n{ruleset}"
    );
    // The addresses still work without a Hosts (a plain socket bound to a's address).
    let s = tokio::net::TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(a_ip.into(), 0))?;
    tokio::time::timeout(CUT, s.connect(eb)).await??;
    Ok(())
}

/// `pause` stops a host's processes (SIGSTOP): a listener of a paused process accepts (the
/// kernel does) but nothing answers; `resume` brings it back.
#[tokio::test]
async fn a_paused_host_stops_answering() -> anyhow::Result<()> {
    let hosts = Hosts::new(2)?;
    let (a, b) = (hosts.host(0), hosts.host(1));
    let addr = b.free_addr()?;
    let script = format!(
        "import socket\nl=socket.socket()\nl.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         l.bind(('{}',{}))\nl.listen()\nwhile True:\n  s,_=l.accept()\n  s.sendall(s.recv(1))\n  s.close()\n",
        addr.ip(),
        addr.port()
    );
    b.spawn(std::process::Command::new("python3").args(["-c", &script]))?;
    wait_until("the echo process listens", Duration::from_secs(10), || {
        talks(a, addr)
    })
    .await?;
    hosts.pause(b)?;
    assert!(!talks(a, addr).await, "answered while paused");
    hosts.resume(b)?;
    wait_until(
        "the echo process answers again",
        Duration::from_secs(10),
        || talks(a, addr),
    )
    .await?;
    Ok(())
}
