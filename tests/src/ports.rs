//! Loopback ports: a free one to tell a process to bind, the address of one, and small
//! thread-served backends on ports of their own.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::{Arc, Mutex};

use anyhow::Context;

use crate::lock;

/// `127.0.0.1:port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A loopback port that was free a moment ago (for processes that must be told a port).
///
/// Picked below the kernel's ephemeral range: a port from `bind(0)` comes from the range that
/// outgoing connections take their source ports from, so under parallel tests another test's
/// client could take it before the child process binds it (seen as a rare `EADDRINUSE`). A
/// port is never handed out twice by one process. Falls back to `bind(0)` when the range
/// leaves no room below it.
pub fn free_port() -> anyhow::Result<u16> {
    use std::collections::HashSet;
    use std::hash::{BuildHasher, Hasher};
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const LOW: u16 = 10_000;
    if ephemeral_low > LOW + 1_000 {
        let span = u64::from(ephemeral_low - LOW);
        // RandomState is seeded per instance: a cheap random source without a dependency.
        let random = std::collections::hash_map::RandomState::new();
        for attempt in 0u64..500 {
            let mut h = random.build_hasher();
            h.write_u64(attempt);
            let port = LOW + (h.finish() % span) as u16;
            let mut given = lock(&GIVEN);
            let given = given.get_or_insert_with(HashSet::new);
            if given.contains(&port) {
                continue;
            }
            if StdListener::bind(("127.0.0.1", port)).is_ok() {
                given.insert(port);
                return Ok(port);
            }
        }
    }
    let l = StdListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Serves each connection accepted on a new 127.0.0.1 port with `serve`, on a thread of its
/// own (blocking I/O): a backend woken by the kernel like another process would be, not a task
/// on the caller's runtime. `serve`'s errors are printed with `name`.
pub fn serve_threads(
    name: &str,
    serve: impl Fn(std::net::TcpStream) -> anyhow::Result<()> + Send + Sync + 'static,
) -> anyhow::Result<SocketAddr> {
    let l = StdListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let serve = Arc::new(serve);
    let name = name.to_string();
    std::thread::Builder::new()
        .name(format!("{name}-accept"))
        .spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                let (serve, name2) = (serve.clone(), name.clone());
                let spawned = std::thread::Builder::new()
                    .name(name.clone())
                    .spawn(move || {
                        if let Err(e) = serve(s) {
                            eprintln!("{name2}: {e:#}");
                        }
                    });
                if let Err(e) = spawned {
                    eprintln!("{name}: no thread for a connection: {e}");
                }
            }
        })?;
    Ok(addr)
}

/// A backend that reads and discards everything, then answers one byte when the client
/// half-closes: the client knows every byte was received. A client that resets is not an
/// error.
pub fn discard_server() -> anyhow::Result<SocketAddr> {
    use std::io::{Read, Write};
    serve_threads("discard", |mut s| {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(_) => return Ok(()),
            }
        }
        s.write_all(b"k").context("client left before the ack")
    })
}
