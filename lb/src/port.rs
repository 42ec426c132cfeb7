//! Who holds a port: the process listening on a TCP address, found through `/proc` (Linux),
//! so that "address in use" can name the program in the way ("port 1883 is in use by pid 812
//! (mosquitto)"), and `mqlb up` can tell that a port answering is its own child's.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// A process that listens on a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// Its command name (`/proc/PID/comm`), empty when unreadable.
    pub name: String,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.name.is_empty() {
            write!(f, "pid {}", self.pid)
        } else {
            write!(f, "pid {} ({})", self.pid, self.name)
        }
    }
}

/// The process listening on `addr` (or on the wildcard address of its port), if it can be
/// found: `None` off Linux, when `/proc` is not readable, or for another user's process.
pub fn who_listens(addr: SocketAddr) -> Option<Holder> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        inodes.extend(
            listening_sockets(&text)
                .into_iter()
                .filter(|(a, _)| covers(*a, addr))
                .map(|(_, inode)| inode),
        );
    }
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if wanted.iter().any(|w| target.as_os_str() == w.as_str()) {
                let name = std::fs::read_to_string(entry.path().join("comm"))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default();
                return Some(Holder { pid, name });
            }
        }
    }
    None
}

/// True when a listener bound to `bound` takes connections for `addr`.
fn covers(bound: SocketAddr, addr: SocketAddr) -> bool {
    bound.port() == addr.port()
        && (bound.ip() == addr.ip() || bound.ip().is_unspecified() || addr.ip().is_unspecified())
}

/// The listening sockets (state `0A`) of a `/proc/net/tcp` or `/proc/net/tcp6` table, with
/// their inodes. Lines that do not parse are skipped.
fn listening_sockets(table: &str) -> Vec<(SocketAddr, u64)> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(3) != Some(&"0A") {
                return None;
            }
            let addr = parse_addr(f.get(1)?)?;
            let inode = f.get(9)?.parse().ok()?;
            Some((addr, inode))
        })
        .collect()
}

/// `0100007F:075B` → 127.0.0.1:1883. The kernel prints each 32-bit word of the address as a
/// number in host byte order.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<u32> {
        let hex = ip.get(i * 8..i * 8 + 8)?;
        Some(u32::from_be(u32::from_str_radix(hex, 16).ok()?))
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?.to_be_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_endian = "little")]
    fn parses_the_kernels_tables() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
                  \x20  0: 0100007F:075B 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000\n\
                  \x20  1: 0100007F:075B 0100007F:D2A4 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000\n\
                  garbage\n";
        assert_eq!(
            listening_sockets(v4),
            vec![("127.0.0.1:1883".parse().expect("addr"), 4242)]
        );
        assert_eq!(
            parse_addr("00000000000000000000000001000000:1F90"),
            Some("[::1]:8080".parse().expect("addr"))
        );
        assert_eq!(parse_addr("0100007F"), None);
        assert_eq!(parse_addr("01007F:0050"), None);
    }

    #[test]
    fn the_wildcard_covers_every_address_of_its_port() {
        let any: SocketAddr = "0.0.0.0:1883".parse().expect("addr");
        let lo: SocketAddr = "127.0.0.1:1883".parse().expect("addr");
        let other: SocketAddr = "127.0.0.1:1884".parse().expect("addr");
        assert!(covers(any, lo) && covers(lo, lo) && !covers(lo, other));
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn finds_this_process_listening() -> std::io::Result<()> {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let holder = who_listens(l.local_addr()?);
        assert_eq!(holder.map(|h| h.pid), Some(std::process::id()));
        Ok(())
    }
}
