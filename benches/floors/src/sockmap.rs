//! A relay that runs in the kernel (Linux, eBPF `SOCKHASH` + an `sk_skb` verdict program): the
//! kernel moves each segment that arrives on one socket straight to the other one's send path
//! (a kernel worker thread sends it), so no user-space code runs per message (what Cilium and
//! Envoy call socket acceleration; Cloudflare's "SOCKMAP – TCP splicing of the future").
//!
//! Not in mqlb's data path: measured there (perf, cpu-cost; README "Tried and dropped") it
//! lowered the added latency by about a third but cost QoS1 throughput (the kernel worker that
//! sends the redirected segments batches less than the LB thread) and moved bulk streams no
//! faster than `splice(2)`. `floors` keeps it as a floor: what a hop costs with no user-space
//! code in it.
//!
//! The program is 13 hand-assembled instructions, loaded with the raw `bpf(2)` syscall: no
//! clang, no libbpf, no object file. It looks up the socket's cookie in `peers` (cookie →
//! peer socket) and redirects the segment to the peer's egress; when the peer is gone from
//! the map (closed or reset) it passes the bytes up to the socket's own receive queue, where
//! the LB reads them like before and the connection ends in user space.
//!
//! Ordering is what makes the hand-over safe: a socket only gets the program (membership in
//! `members`, the map the program is attached to) after its peer entry exists and after the
//! LB has written everything it had read; bytes that were queued meanwhile are pushed through
//! the program in order by setting `SO_RCVLOWAT` (which calls the socket's `data_ready`).

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `bpf(2)` commands.
const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_MAP_DELETE_ELEM: libc::c_int = 3;
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_PROG_ATTACH: libc::c_int = 8;

const BPF_MAP_TYPE_SOCKHASH: u32 = 18;
const BPF_PROG_TYPE_SK_SKB: u32 = 14;
const BPF_SK_SKB_STREAM_VERDICT: u32 = 5;
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;

/// Helper ids (include/uapi/linux/bpf.h, `__BPF_FUNC_MAPPER`).
const FN_GET_SOCKET_COOKIE: i32 = 46;
const FN_SK_REDIRECT_HASH: i32 = 72;

/// `SK_PASS`: hand the bytes to the socket itself.
const SK_PASS: i32 = 1;

/// One eBPF instruction as the kernel reads it (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

/// The verdict program:
/// ```text
/// r6 = r1                              ; the skb
/// r0 = bpf_get_socket_cookie(r1)
/// *(u64 *)(r10 - 8) = r0               ; the key, on the stack
/// r0 = bpf_sk_redirect_hash(r6, peers, r10 - 8, 0)   ; egress of the peer
/// if r0 != SK_DROP: return r0          ; SK_PASS with the redirect set
/// return SK_PASS                       ; no peer: up to this socket's reader
/// ```
fn program(peers: RawFd) -> [Insn; 13] {
    const MOV64_X: u8 = 0xbf;
    const MOV64_K: u8 = 0xb7;
    const ADD64_K: u8 = 0x07;
    const STX_DW: u8 = 0x7b;
    const LD_IMM64: u8 = 0x18;
    const CALL: u8 = 0x85;
    const JNE_K: u8 = 0x55;
    const EXIT: u8 = 0x95;
    const PSEUDO_MAP_FD: u8 = 1;
    [
        insn(MOV64_X, 6, 1, 0, 0),
        insn(CALL, 0, 0, 0, FN_GET_SOCKET_COOKIE),
        insn(STX_DW, 10, 0, -8, 0),
        insn(MOV64_X, 1, 6, 0, 0),
        insn(LD_IMM64, 2, PSEUDO_MAP_FD, 0, peers),
        insn(0, 0, 0, 0, 0),
        insn(MOV64_X, 3, 10, 0, 0),
        insn(ADD64_K, 3, 0, 0, -8),
        insn(MOV64_K, 4, 0, 0, 0),
        insn(CALL, 0, 0, 0, FN_SK_REDIRECT_HASH),
        insn(JNE_K, 0, 0, 1, 0),
        insn(MOV64_K, 0, 0, 0, SK_PASS),
        insn(EXIT, 0, 0, 0, 0),
    ]
}

/// `union bpf_attr`, as the words each command reads; the rest stays zero.
#[repr(C, align(8))]
struct Attr([u32; 32]);

impl Attr {
    fn new() -> Self {
        Attr([0; 32])
    }
    fn set_u64(&mut self, word: usize, v: u64) {
        self.0[word] = v as u32;
        self.0[word + 1] = (v >> 32) as u32;
    }
}

fn bpf(cmd: libc::c_int, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a live, zero-padded `union bpf_attr` of 128 bytes whose pointers (set by
    // the callers) point at memory that outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr,
            size_of::<Attr>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn fd_from(r: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel just returned this descriptor to us; nobody else owns it.
    unsafe { OwnedFd::from_raw_fd(r as RawFd) }
}

fn sockhash(capacity: u32) -> io::Result<OwnedFd> {
    let mut a = Attr::new();
    a.0[0] = BPF_MAP_TYPE_SOCKHASH;
    a.0[1] = size_of::<u64>() as u32; // key: socket cookie
    a.0[2] = size_of::<u64>() as u32; // value: a socket fd on update, its cookie on lookup
    a.0[3] = capacity;
    bpf(BPF_MAP_CREATE, &mut a).map(fd_from)
}

/// The socket's cookie: the kernel's 64-bit id for it, what the program sees as its key.
fn cookie(fd: RawFd) -> io::Result<u64> {
    let mut v: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: v and len are valid for writes of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut v as *mut u64).cast(),
            &mut len,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(v)
    }
}

/// The two maps and the program attached to one of them; dropping it detaches the program
/// (sockets still in the maps keep relaying until they close).
pub struct SockMap {
    peers: OwnedFd,
    members: OwnedFd,
    _prog: OwnedFd,
}

/// Cookies of a handed-over pair, to take it back out of the maps.
#[derive(Debug, Clone, Copy)]
pub struct Pair {
    a: u64,
    b: u64,
}

impl SockMap {
    /// Creates the maps and loads and attaches the program. Fails without `CAP_BPF` (or
    /// `CAP_SYS_ADMIN`), or on a kernel without sockhash/`sk_skb` (before 4.18).
    pub fn new(capacity: u32) -> io::Result<SockMap> {
        let peers = sockhash(capacity)?;
        let members = sockhash(capacity)?;
        let insns = program(peers.as_raw_fd());
        let license = c"Dual MIT/GPL";
        let mut log = vec![0u8; 4096];
        let mut a = Attr::new();
        a.0[0] = BPF_PROG_TYPE_SK_SKB;
        a.0[1] = insns.len() as u32;
        a.set_u64(2, insns.as_ptr() as u64);
        a.set_u64(4, license.as_ptr() as u64);
        a.0[6] = 1; // log_level
        a.0[7] = log.len() as u32;
        a.set_u64(8, log.as_mut_ptr() as u64);
        let prog = match bpf(BPF_PROG_LOAD, &mut a) {
            Ok(fd) => fd_from(fd),
            Err(e) => {
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                let msg = String::from_utf8_lossy(&log[..end]);
                return Err(io::Error::new(
                    e.kind(),
                    format!("loading the verdict program: {e}: {msg}"),
                ));
            }
        };
        let mut a = Attr::new();
        a.0[0] = members.as_raw_fd() as u32;
        a.0[1] = prog.as_raw_fd() as u32;
        a.0[2] = BPF_SK_SKB_STREAM_VERDICT;
        bpf(BPF_PROG_ATTACH, &mut a)?;
        Ok(SockMap {
            peers,
            members,
            _prog: prog,
        })
    }

    fn update(map: &OwnedFd, key: u64, fd: RawFd, flags: u64) -> io::Result<()> {
        let value = fd as u64;
        let mut a = Attr::new();
        a.0[0] = map.as_raw_fd() as u32;
        a.set_u64(2, &key as *const u64 as u64);
        a.set_u64(4, &value as *const u64 as u64);
        a.set_u64(6, flags);
        bpf(BPF_MAP_UPDATE_ELEM, &mut a).map(drop)
    }

    fn delete(map: &OwnedFd, key: u64) {
        let mut a = Attr::new();
        a.0[0] = map.as_raw_fd() as u32;
        a.set_u64(2, &key as *const u64 as u64);
        // ENOENT: the kernel took it out already (the socket closed).
        let _ = bpf(BPF_MAP_DELETE_ELEM, &mut a);
    }

    /// Hands the relay of `a` ⇄ `b` to the kernel.
    ///
    /// The caller must hold no bytes read from either socket that it has not yet written to the
    /// other, and must not read either socket afterwards except to learn of EOF (or to take
    /// the bytes the program passes up when the peer is gone). Bytes already queued on either
    /// socket are relayed first, in order.
    ///
    /// On an error the pair is taken out of the maps again; if the program was already
    /// attached, segments it had queued for the kernel's worker may be lost with it, so the
    /// caller should close both sockets rather than fall back to relaying them itself.
    pub fn hand_over(&self, a: RawFd, b: RawFd) -> io::Result<Pair> {
        let pair = Pair {
            a: cookie(a)?,
            b: cookie(b)?,
        };
        let undo = |e| {
            self.remove(pair);
            Err(e)
        };
        // 1. Peer entries: each socket now has a psock but no program; nothing changes yet.
        if let Err(e) = Self::update(&self.peers, pair.a, b, BPF_NOEXIST) {
            return undo(e);
        }
        if let Err(e) = Self::update(&self.peers, pair.b, a, BPF_NOEXIST) {
            return undo(e);
        }
        // 2. The program, one socket at a time, each flushed through it.
        for (key, fd) in [(pair.b, b), (pair.a, a)] {
            if let Err(e) = Self::update(&self.members, key, fd, BPF_ANY) {
                return undo(e);
            }
            if let Err(e) = kick(fd) {
                return undo(e);
            }
        }
        Ok(pair)
    }

    /// Takes a pair out of both maps (closing the sockets does it too).
    pub fn remove(&self, pair: Pair) {
        for key in [pair.a, pair.b] {
            Self::delete(&self.members, key);
            Self::delete(&self.peers, key);
        }
    }
}

/// Runs the socket's `data_ready` (what `SO_RCVLOWAT` does when set), so bytes that were
/// queued before the program was attached go through it now instead of waiting for the next
/// segment.
fn kick(fd: RawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: one is a valid c_int for the length given.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether every byte `from` has received is in `to`'s send queue or acknowledged: the
/// kernel has finished relaying `from` → `to` (nothing else writes to `to`), so a FIN passed
/// on now cannot overtake data still queued for the kernel's worker.
///
/// Call it after `from`'s FIN arrived: the counters are sequence-number based, so
/// `tcpi_bytes_received` then includes the FIN and, on a socket that opened actively
/// (`connect`), `tcpi_bytes_acked` includes the SYN; both are taken off (seen on Linux 6.18).
pub fn relayed(from: RawFd, to: RawFd, to_connected: bool) -> io::Result<bool> {
    let data_in = tcp_info(from)?.tcpi_bytes_received.saturating_sub(1);
    let acked = tcp_info(to)?
        .tcpi_bytes_acked
        .saturating_sub(u64::from(to_connected));
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one c_int.
    if unsafe { libc::ioctl(to, libc::TIOCOUTQ, &mut queued) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(acked + queued.max(0) as u64 >= data_in)
}

fn tcp_info(fd: RawFd) -> io::Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain old data; zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: info and len are valid for writes of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(info)
    }
}
