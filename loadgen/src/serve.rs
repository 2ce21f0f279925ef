//! The target servers: TCP echo, discard, source and hold, UDP echo.
//!
//! TCP: blocking I/O on a pool of threads that grows on demand: each worker
//! accepts a connection, serves it to the end and accepts again. One
//! thread per live connection is the cheapest way to serve ping-pong and
//! bulk streams (no readiness round trip), and keeping workers around
//! makes short connections (tcp-cps) cost no thread creation.
//!
//! UDP echo: batches of up to 64 datagrams per `recvmmsg` and `sendmmsg`
//! call, a receive buffer big enough for thousands of datagrams in flight
//! (`SO_RCVBUFFORCE` when allowed), and optionally several sockets on one
//! port (`SO_REUSEPORT`), one thread each. The `udp` mode runs the same
//! [`UdpEcho`] inside its own event loops.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;
use socket2::{Domain, Protocol, Socket, Type};

use crate::common::{loopback_addr, Progress, Report, Result};

/// Worker threads per listener at most; beyond this, connections wait
/// in the accept queue.
const MAX_WORKERS: usize = 4096;
/// Stack of a worker: buffers are on the heap.
const WORKER_STACK: usize = 128 * 1024;
pub const BULK_BUF: usize = 256 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Echo,
    Discard,
    Source,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Echo => "tcp-echo",
            Kind::Discard => "tcp-discard",
            Kind::Source => "tcp-source",
        }
    }
}

/// Counters of an in-process target, read by the measuring modes.
#[derive(Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    /// Bytes read by echo connections.
    pub echo_bytes: AtomicU64,
    /// Bytes written by source connections (parked in buffers included:
    /// only for information; throughput is counted at the receiver).
    pub source_bytes: AtomicU64,
    /// One counter per discard connection, in accept order: bytes read.
    pub discard: Mutex<Vec<Arc<AtomicU64>>>,
    pub udp_packets: AtomicU64,
    pub udp_bytes: AtomicU64,
    /// Connections accepted by the hold listener, kept open until `release_held`.
    pub held: Mutex<Vec<TcpStream>>,
}

impl Counters {
    pub fn discard_snapshot(&self) -> Vec<u64> {
        let list = self.discard.lock().unwrap();
        list.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }

    pub fn discard_total(&self) -> u64 {
        self.discard_snapshot().iter().sum()
    }

    pub fn held_count(&self) -> usize {
        self.held.lock().unwrap().len()
    }

    pub fn release_held(&self) {
        let taken = std::mem::take(&mut *self.held.lock().unwrap());
        drop(taken);
    }
}

/// What to listen on.
#[derive(Default, Debug, Clone)]
pub struct Spec {
    pub echo: Option<SocketAddr>,
    pub discard: Option<SocketAddr>,
    pub source: Option<SocketAddr>,
    pub hold: Option<SocketAddr>,
    pub udp_echo: Option<SocketAddr>,
    /// Sockets (and threads) of the UDP echo, on one port with SO_REUSEPORT; 0 = 1.
    pub udp_threads: usize,
}

/// A running target; its threads live until the process exits.
pub struct Target {
    pub echo: Option<SocketAddr>,
    pub discard: Option<SocketAddr>,
    pub source: Option<SocketAddr>,
    pub hold: Option<SocketAddr>,
    pub udp_echo: Option<SocketAddr>,
    pub counters: Arc<Counters>,
}

/// A listener with a deep accept queue (std's is 128), so bursts of
/// connects are never dropped and retried a second later.
pub fn listen_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

pub fn any_port() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 0)))
}

impl Target {
    pub fn start(spec: &Spec) -> std::io::Result<Target> {
        let counters = Arc::new(Counters::default());
        let tcp = |addr: Option<SocketAddr>, kind: Kind| -> std::io::Result<_> {
            let Some(addr) = addr else { return Ok(None) };
            let l = listen_tcp(addr)?;
            let local = l.local_addr()?;
            start_pool(l, kind, counters.clone())?;
            Ok(Some(local))
        };
        let echo = tcp(spec.echo, Kind::Echo)?;
        let discard = tcp(spec.discard, Kind::Discard)?;
        let source = tcp(spec.source, Kind::Source)?;
        let hold = match spec.hold {
            Some(addr) => {
                let l = listen_tcp(addr)?;
                let local = l.local_addr()?;
                let c = counters.clone();
                thread::Builder::new()
                    .name("hold".into())
                    .stack_size(WORKER_STACK)
                    .spawn(move || hold_loop(l, c))?;
                Some(local)
            }
            None => None,
        };
        let udp_echo = match spec.udp_echo {
            Some(addr) => {
                let socks = udp_echo_sockets(addr, spec.udp_threads.max(1), false)?;
                let local = socks[0].local_addr()?;
                for s in socks {
                    let c = counters.clone();
                    let mut echo = UdpEcho::new(s);
                    thread::Builder::new()
                        .name("udp-echo".into())
                        .spawn(move || udp_echo_loop(&mut echo, &c))?;
                }
                Some(local)
            }
            None => None,
        };
        Ok(Target {
            echo,
            discard,
            source,
            hold,
            udp_echo,
            counters,
        })
    }
}

struct Pool {
    listener: TcpListener,
    kind: Kind,
    counters: Arc<Counters>,
    idle: AtomicUsize,
    /// Spawned but not yet waiting in accept: at most one at a time, so a
    /// busy CPU that delays new threads does not make the pool balloon.
    starting: AtomicUsize,
    workers: AtomicUsize,
}

fn start_pool(listener: TcpListener, kind: Kind, counters: Arc<Counters>) -> std::io::Result<()> {
    let pool = Arc::new(Pool {
        listener,
        kind,
        counters,
        idle: AtomicUsize::new(0),
        starting: AtomicUsize::new(1),
        workers: AtomicUsize::new(1),
    });
    spawn_worker(pool)
}

fn spawn_worker(pool: Arc<Pool>) -> std::io::Result<()> {
    thread::Builder::new()
        .name(pool.kind.name().into())
        .stack_size(WORKER_STACK)
        .spawn(move || worker(pool))?;
    Ok(())
}

fn worker(pool: Arc<Pool>) {
    let mut buf = vec![
        0u8;
        if pool.kind == Kind::Echo {
            64 * 1024
        } else {
            BULK_BUF
        }
    ];
    if pool.kind == Kind::Source {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = i as u8;
        }
    }
    pool.idle.fetch_add(1, Ordering::AcqRel);
    pool.starting.fetch_sub(1, Ordering::AcqRel);
    loop {
        let accepted = pool.listener.accept();
        // Last idle worker taken: add one so the next connection is
        // accepted at once.
        if pool.idle.fetch_sub(1, Ordering::AcqRel) == 1
            && pool.starting.load(Ordering::Acquire) == 0
            && pool.workers.load(Ordering::Relaxed) < MAX_WORKERS
        {
            pool.starting.fetch_add(1, Ordering::AcqRel);
            pool.workers.fetch_add(1, Ordering::AcqRel);
            if spawn_worker(pool.clone()).is_err() {
                pool.starting.fetch_sub(1, Ordering::AcqRel);
                pool.workers.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(_) => {
                // EMFILE and the like: back off instead of spinning.
                pool.idle.fetch_add(1, Ordering::AcqRel);
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        pool.counters.accepted.fetch_add(1, Ordering::Relaxed);
        match pool.kind {
            Kind::Echo => echo(stream, &mut buf, &pool.counters),
            Kind::Discard => discard(stream, &mut buf, &pool.counters),
            Kind::Source => source(stream, &buf, &pool.counters),
        }
        pool.idle.fetch_add(1, Ordering::AcqRel);
    }
}

fn echo(mut s: TcpStream, buf: &mut [u8], c: &Counters) {
    let _ = s.set_nodelay(true);
    loop {
        let n = match s.read(buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        c.echo_bytes.fetch_add(n as u64, Ordering::Relaxed);
        if s.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

fn discard(mut s: TcpStream, buf: &mut [u8], c: &Counters) {
    let count = Arc::new(AtomicU64::new(0));
    c.discard.lock().unwrap().push(count.clone());
    loop {
        match s.read(buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => count.fetch_add(n as u64, Ordering::Relaxed),
        };
    }
}

fn source(mut s: TcpStream, buf: &[u8], c: &Counters) {
    loop {
        match s.write(buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => c.source_bytes.fetch_add(n as u64, Ordering::Relaxed),
        };
    }
}

fn hold_loop(l: TcpListener, c: Arc<Counters>) {
    loop {
        match l.accept() {
            Ok((s, _)) => {
                c.accepted.fetch_add(1, Ordering::Relaxed);
                c.held.lock().unwrap().push(s);
            }
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Receive buffer of a UDP echo socket: room for tens of thousands of
/// small datagrams, or ~7000 of 1400 bytes, in flight.
pub const UDP_ECHO_RCVBUF: usize = 32 << 20;
/// Datagrams per recvmmsg/sendmmsg call.
pub const MMSG_BATCH: usize = 64;
/// Largest UDP payload (IPv4).
pub const MAX_DATAGRAM: usize = 65_507;

/// Sets SO_RCVBUF to `bytes`, past `net.core.rmem_max` with
/// SO_RCVBUFFORCE when we may (CAP_NET_ADMIN), else as far as rmem_max
/// allows. Returns the size in force (the kernel reports twice the request).
pub fn set_rcvbuf(s: &Socket, bytes: usize) -> std::io::Result<usize> {
    let v = bytes.min(i32::MAX as usize / 2) as libc::c_int;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `&v`, a valid
    // local; the fd is owned by `s` and open.
    let forced = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    } == 0;
    if !forced {
        s.set_recv_buffer_size(bytes)?;
    }
    s.recv_buffer_size()
}

/// `n` UDP sockets bound to `addr` (the first one picks the port if it is
/// 0), with SO_REUSEPORT when n > 1 so the kernel spreads peers over them,
/// and a big receive buffer each.
pub fn udp_echo_sockets(
    addr: SocketAddr,
    n: usize,
    nonblocking: bool,
) -> std::io::Result<Vec<UdpSocket>> {
    let mut out: Vec<UdpSocket> = Vec::with_capacity(n);
    let mut addr = addr;
    for _ in 0..n {
        let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        if n > 1 {
            s.set_reuse_port(true)?;
        }
        set_rcvbuf(&s, UDP_ECHO_RCVBUF)?;
        s.set_nonblocking(nonblocking)?;
        s.bind(&addr.into())?;
        let s: UdpSocket = s.into();
        addr = s.local_addr()?;
        out.push(s);
    }
    Ok(out)
}

/// Most datagrams in one UDP GSO send, and most bytes (an IP packet).
const GSO_MAX_SEGMENTS: usize = 64;
const GSO_MAX_BYTES: usize = 65_000;

/// Buffers for `recvmmsg`/`sendmmsg` of up to `n` datagrams of at most
/// `slot` bytes each, with a peer address per datagram. The pointers in
/// the kernel structures are rebuilt on every call, so the struct may move.
///
/// Sends coalesce runs of equal-sized datagrams to the same peer into one
/// UDP GSO message (`UDP_SEGMENT`): the stack is traversed once per run
/// instead of once per datagram, and the receiving socket (which has no
/// UDP_GRO) still gets them one by one, exactly as if sent separately.
/// If the kernel refuses GSO, it is turned off and datagrams go singly.
pub struct Mmsg {
    slot: usize,
    bufs: Vec<u8>,
    /// Per datagram.
    iov: Vec<libc::iovec>,
    names: Vec<libc::sockaddr_storage>,
    namelens: Vec<libc::socklen_t>,
    lens: Vec<usize>,
    flags: Vec<libc::c_int>,
    /// Per message: a datagram (recv) or a run of datagrams (send).
    hdrs: Vec<libc::mmsghdr>,
    /// Per message: its first datagram and how many.
    runs: Vec<(usize, usize)>,
    /// Per message: room for one `UDP_SEGMENT` cmsg (aligned).
    ctrl: Vec<[u64; 4]>,
    pub gso: bool,
}

// SAFETY: the raw pointers inside `iov` and `hdrs` only ever point into
// this struct's own heap buffers (rebuilt before each use); nothing is shared.
unsafe impl Send for Mmsg {}

/// What a `sendmmsg` batch did.
#[derive(Debug, Default)]
pub struct Sent {
    /// Datagrams sent.
    pub sent: usize,
    pub error: Option<std::io::Error>,
}

/// Errors by which the kernel says it will not do UDP GSO here.
fn gso_refused(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EIO | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
    )
}

impl Mmsg {
    pub fn new(n: usize, slot: usize) -> Mmsg {
        // SAFETY: all-zero is a valid value of these plain C structs.
        let zero_name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let zero_hdr: libc::mmsghdr = unsafe { std::mem::zeroed() };
        Mmsg {
            slot,
            bufs: vec![0u8; n * slot],
            iov: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                };
                n
            ],
            names: vec![zero_name; n],
            namelens: vec![0; n],
            lens: vec![0; n],
            flags: vec![0; n],
            hdrs: vec![zero_hdr; n],
            runs: vec![(0, 0); n],
            ctrl: vec![[0u64; 4]; n],
            gso: true,
        }
    }

    pub fn capacity(&self) -> usize {
        self.hdrs.len()
    }

    /// All of slot `i`, to fill before `send`.
    pub fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.bufs[i * self.slot..(i + 1) * self.slot]
    }

    /// The datagram `recv` put in slot `i`.
    pub fn datagram(&self, i: usize) -> &[u8] {
        let len = self.lens[i].min(self.slot);
        &self.bufs[i * self.slot..i * self.slot + len]
    }

    /// The datagram in slot `i` was longer than the slot (cut off).
    pub fn truncated(&self, i: usize) -> bool {
        self.flags[i] & libc::MSG_TRUNC != 0
    }

    /// Points iovec `i` at slot `i`, `len` bytes of it.
    fn point(&mut self, i: usize, len: usize) {
        let base = self.bufs.as_mut_ptr();
        self.iov[i] = libc::iovec {
            // SAFETY: i < capacity, so the offset is inside `bufs`.
            iov_base: unsafe { base.add(i * self.slot) }.cast(),
            iov_len: len.min(self.slot),
        };
    }

    /// One `recvmmsg` of up to `capacity` datagrams (with their senders'
    /// addresses if `names`). Returns how many; 0 when nothing was queued
    /// on a non-blocking socket (or with MSG_DONTWAIT).
    pub fn recv(&mut self, fd: RawFd, flags: libc::c_int, names: bool) -> std::io::Result<usize> {
        let n = self.capacity();
        for i in 0..n {
            self.point(i, self.slot);
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_iov = &mut self.iov[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
            if names {
                h.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
                h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            } else {
                h.msg_name = std::ptr::null_mut();
                h.msg_namelen = 0;
            }
        }
        // Bounded: retried only when interrupted by a signal.
        for _ in 0..100 {
            // SAFETY: `hdrs[..n]` are valid mmsghdrs whose iovecs and names
            // point into buffers we own, of the lengths given; the kernel
            // writes at most that much. A null timeout means none.
            let r = unsafe {
                libc::recvmmsg(
                    fd,
                    self.hdrs.as_mut_ptr(),
                    n as libc::c_uint,
                    flags,
                    std::ptr::null_mut(),
                )
            };
            if r >= 0 {
                let r = r as usize;
                for i in 0..r {
                    let h = &self.hdrs[i];
                    self.lens[i] = h.msg_len as usize;
                    self.flags[i] = h.msg_hdr.msg_flags;
                    self.namelens[i] = h.msg_hdr.msg_namelen;
                }
                return Ok(r);
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock => return Ok(0),
                std::io::ErrorKind::Interrupted => continue,
                _ => return Err(e),
            }
        }
        Ok(0)
    }

    fn same_peer(&self, i: usize, j: usize) -> bool {
        let len = self.namelens[i];
        if len != self.namelens[j] {
            return false;
        }
        let len = (len as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
        // SAFETY: both are sockaddr_storage values we own; we read `len`
        // bytes of each, within their size.
        let (a, b) = unsafe {
            (
                std::slice::from_raw_parts(
                    (&self.names[i] as *const libc::sockaddr_storage).cast::<u8>(),
                    len,
                ),
                std::slice::from_raw_parts(
                    (&self.names[j] as *const libc::sockaddr_storage).cast::<u8>(),
                    len,
                ),
            )
        };
        a == b
    }

    /// Groups datagrams `from..n` into messages (GSO runs when enabled)
    /// and points the headers at them; returns how many messages.
    fn build_runs(&mut self, from: usize, n: usize, names: bool) -> usize {
        let mut m = 0;
        let mut i = from;
        // Bounded: each pass takes at least one datagram.
        while i < n {
            let seg = self.iov[i].iov_len;
            let mut j = i + 1;
            if self.gso {
                while j < n
                    && j - i < GSO_MAX_SEGMENTS
                    && (j - i + 1) * seg <= GSO_MAX_BYTES
                    && self.iov[j].iov_len <= seg
                    && (!names || self.same_peer(i, j))
                {
                    j += 1;
                    // A shorter datagram can only end a run.
                    if self.iov[j - 1].iov_len < seg {
                        break;
                    }
                }
            }
            self.runs[m] = (i, j - i);
            let h = &mut self.hdrs[m].msg_hdr;
            h.msg_iov = &mut self.iov[i];
            h.msg_iovlen = j - i;
            h.msg_flags = 0;
            if names {
                h.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
                h.msg_namelen = self.namelens[i];
            } else {
                h.msg_name = std::ptr::null_mut();
                h.msg_namelen = 0;
            }
            if j - i > 1 {
                let c = &mut self.ctrl[m];
                *c = [0; 4];
                let cm = c.as_mut_ptr().cast::<libc::cmsghdr>();
                // SAFETY: `c` is 32 bytes, 8-aligned: room for a cmsghdr
                // and a u16 (CMSG_SPACE(2) = 24 on 64-bit Linux).
                unsafe {
                    (*cm).cmsg_level = libc::SOL_UDP;
                    (*cm).cmsg_type = libc::UDP_SEGMENT;
                    (*cm).cmsg_len = libc::CMSG_LEN(2) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(cm).cast::<u16>(), seg as u16);
                }
                h.msg_control = c.as_mut_ptr().cast();
                // SAFETY: CMSG_SPACE is a pure size computation.
                h.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as _;
            } else {
                h.msg_control = std::ptr::null_mut();
                h.msg_controllen = 0;
            }
            m += 1;
            i = j;
        }
        m
    }

    /// Sends entries `0..lens.len()` (`lens[i]` bytes of slot `i`) with one
    /// `sendmmsg` call or a few: to the addresses `recv` stored if `names`,
    /// else on a connected socket. A message the kernel refuses is skipped
    /// (the first error is kept); a full socket buffer drops the rest.
    pub fn send(&mut self, fd: RawFd, lens: &[usize], names: bool) -> Sent {
        let n = lens.len().min(self.capacity());
        for (i, &len) in lens.iter().enumerate().take(n) {
            self.point(i, len);
        }
        let mut out = Sent::default();
        let mut from = 0;
        // Bounded: at most one restart, when GSO is refused and turned off.
        for _ in 0..2 {
            let msgs = self.build_runs(from, n, names);
            match self.send_msgs(fd, msgs, &mut out) {
                Some(restart) => {
                    self.gso = false;
                    from = restart;
                }
                None => break,
            }
        }
        out
    }

    /// sendmmsg of messages `0..msgs`; Some(first datagram of the message)
    /// if GSO was refused there (nothing from it on was sent).
    fn send_msgs(&mut self, fd: RawFd, msgs: usize, out: &mut Sent) -> Option<usize> {
        let mut off = 0;
        // Bounded: each pass sends or skips at least one message, or stops.
        for _ in 0..2 * msgs + 100 {
            if off >= msgs {
                break;
            }
            // SAFETY: `hdrs[off..msgs]` are valid mmsghdrs pointing into our
            // buffers, which the kernel only reads (it writes `msg_len`).
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    self.hdrs.as_mut_ptr().add(off),
                    (msgs - off) as libc::c_uint,
                    0,
                )
            };
            if r > 0 {
                let r = r as usize;
                out.sent += self.runs[off..off + r].iter().map(|x| x.1).sum::<usize>();
                off += r;
                continue;
            }
            let e = std::io::Error::last_os_error();
            let (first, count) = self.runs[off];
            match e.kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => {
                    out.error.get_or_insert(e);
                    break;
                }
                _ if count > 1 && gso_refused(&e) => return Some(first),
                _ => {
                    out.error.get_or_insert(e);
                    off += 1;
                }
            }
        }
        None
    }

    /// Sends back what the last `recv(.., names = true)` got, `n` datagrams.
    pub fn echo_back(&mut self, fd: RawFd, n: usize) -> Sent {
        let lens = std::mem::take(&mut self.lens);
        let r = self.send(fd, &lens[..n.min(lens.len())], true);
        self.lens = lens;
        r
    }
}

/// A UDP echo socket with its batch buffers.
pub struct UdpEcho {
    pub sock: UdpSocket,
    mm: Mmsg,
}

impl UdpEcho {
    pub fn new(sock: UdpSocket) -> UdpEcho {
        UdpEcho {
            sock,
            mm: Mmsg::new(MMSG_BATCH, MAX_DATAGRAM + 1),
        }
    }

    /// Receives one batch and sends it back. `flags` is MSG_DONTWAIT to
    /// poll, or MSG_WAITFORONE to block for the first datagram only.
    /// Returns (datagrams, bytes) echoed; (0, 0) when nothing was queued.
    pub fn step(&mut self, flags: libc::c_int) -> std::io::Result<(usize, usize)> {
        let fd = self.sock.as_raw_fd();
        let n = self.mm.recv(fd, flags, true)?;
        if n == 0 {
            return Ok((0, 0));
        }
        let bytes = (0..n).map(|i| self.mm.datagram(i).len()).sum();
        // A peer that went away (ICMP unreachable) is no error of ours.
        let _ = self.mm.echo_back(fd, n);
        Ok((n, bytes))
    }

    /// Echoes everything queued now (non-blocking); bounded to 64 batches.
    pub fn drain(&mut self) -> (usize, usize) {
        let mut total = (0, 0);
        for _ in 0..64 {
            // An error (e.g. ECONNREFUSED from an earlier send) is skipped.
            if let Ok((n, b)) = self.step(libc::MSG_DONTWAIT) {
                total.0 += n;
                total.1 += b;
                if n < MMSG_BATCH {
                    break;
                }
            }
        }
        total
    }
}

fn udp_echo_loop(e: &mut UdpEcho, c: &Counters) {
    loop {
        match e.step(libc::MSG_WAITFORONE) {
            Ok((n, b)) => {
                c.udp_packets.fetch_add(n as u64, Ordering::Relaxed);
                c.udp_bytes.fetch_add(b as u64, Ordering::Relaxed);
            }
            Err(_) => thread::sleep(Duration::from_millis(1)),
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// TCP echo listener (e.g. 127.0.0.1:7)
    #[arg(long, value_name = "ADDR")]
    pub tcp_echo: Option<String>,
    /// TCP discard listener
    #[arg(long, value_name = "ADDR")]
    pub tcp_discard: Option<String>,
    /// TCP source listener (sends a byte pattern until the peer goes)
    #[arg(long, value_name = "ADDR")]
    pub tcp_source: Option<String>,
    /// UDP echo socket
    #[arg(long, value_name = "ADDR")]
    pub udp_echo: Option<String>,
    /// UDP echo sockets on that port (SO_REUSEPORT), one thread each
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub udp_threads: usize,
    /// Exit after S seconds (default: run until killed)
    #[arg(long, value_name = "S")]
    pub duration: Option<f64>,
    /// Write the JSON report (at exit) to FILE, `-` for stdout
    #[arg(long, value_name = "FILE")]
    pub json: Option<String>,
    /// No per-second counter lines
    #[arg(long, short)]
    pub quiet: bool,
    /// Pin to this CPU
    #[arg(long, value_name = "CPU")]
    pub cpu: Option<usize>,
}

pub fn run(args: &Args) -> Result<()> {
    if let Some(cpu) = args.cpu {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
            return Err(format!("--cpu {cpu}: cannot pin").into());
        }
    }
    let addr = |s: &Option<String>| s.as_deref().map(loopback_addr).transpose();
    let mut spec = Spec {
        echo: addr(&args.tcp_echo)?,
        discard: addr(&args.tcp_discard)?,
        source: addr(&args.tcp_source)?,
        hold: None,
        udp_echo: addr(&args.udp_echo)?,
        udp_threads: args.udp_threads,
    };
    if !(1..=64).contains(&args.udp_threads) {
        return Err("--udp-threads must be 1..=64".into());
    }
    if spec.echo.is_none()
        && spec.discard.is_none()
        && spec.source.is_none()
        && spec.udp_echo.is_none()
    {
        // Nothing asked: everything, on ephemeral ports.
        spec.echo = any_port();
        spec.discard = any_port();
        spec.source = any_port();
        spec.udp_echo = any_port();
    }
    let t = Target::start(&spec)?;
    let mut out = std::io::stdout().lock();
    for (kind, a) in [
        ("tcp-echo", t.echo),
        ("tcp-discard", t.discard),
        ("tcp-source", t.source),
        ("udp-echo", t.udp_echo),
    ] {
        if let Some(a) = a {
            writeln!(out, "listening {kind} {a}")?;
        }
    }
    out.flush()?;
    drop(out);

    let t0 = Instant::now();
    let limit = args
        .duration
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::MAX);
    let c = t.counters.clone();
    let mut last = (0u64, 0u64, 0u64);
    let progress = Progress::start(!args.quiet, limit, move |_| {
        let now = (
            c.echo_bytes.load(Ordering::Relaxed),
            c.discard_total(),
            c.udp_packets.load(Ordering::Relaxed),
        );
        let line = format!(
            "conns {}  echo {:.2} Gbit/s  discard {:.2} Gbit/s  udp {} pkt/s",
            c.accepted.load(Ordering::Relaxed),
            (now.0 - last.0) as f64 * 8e-9,
            (now.1 - last.1) as f64 * 8e-9,
            now.2 - last.2
        );
        last = now;
        line
    });
    while t0.elapsed() < limit {
        thread::sleep(Duration::from_millis(100).min(limit.saturating_sub(t0.elapsed())));
    }
    progress.stop();
    let c = &t.counters;
    let elapsed = t0.elapsed().as_secs_f64();
    let results = json!({
        "elapsed_seconds": elapsed,
        "accepted": c.accepted.load(Ordering::Relaxed),
        "echo_bytes": c.echo_bytes.load(Ordering::Relaxed),
        "discard_bytes": c.discard_total(),
        "source_bytes_written": c.source_bytes.load(Ordering::Relaxed),
        "udp_packets": c.udp_packets.load(Ordering::Relaxed),
        "udp_bytes": c.udp_bytes.load(Ordering::Relaxed),
    });
    let s = |a: Option<SocketAddr>| a.map(|a| a.to_string());
    let report = Report {
        mode: "serve",
        target: json!({"proxy": null, "direct": true}),
        params: json!({
            "tcp_echo": s(t.echo), "tcp_discard": s(t.discard),
            "tcp_source": s(t.source), "udp_echo": s(t.udp_echo),
            "udp_threads": args.udp_threads,
        }),
        summary: format!(
            "served {elapsed:.1} s: {} connections, echo {} B, discard {} B, udp {} packets\n",
            c.accepted.load(Ordering::Relaxed),
            c.echo_bytes.load(Ordering::Relaxed),
            c.discard_total(),
            c.udp_packets.load(Ordering::Relaxed)
        ),
        results,
        relay_cpu: serde_json::Value::Null,
    };
    report.emit(args.json.as_deref())
}
