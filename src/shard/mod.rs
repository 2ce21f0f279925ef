//! A shard: one pinned thread that owns one io_uring ring, one SO_REUSEPORT listener per
//! `--listen` address, and every connection it accepted. Nothing here is shared with other
//! shards, so nothing on the hot path takes a lock.
//!
//! This directory is the only place with `unsafe` (ring, buffer ring, pipe pool, system calls).
//! The loop below is completion driven: submit and wait once per turn, dispatch every CQE by
//! the owner token packed into its op slot, turn the timer wheel, publish recycled buffers.

pub mod bufring;
pub mod files;
pub mod pipes;
pub mod ring;
pub mod sockaddr;
pub mod sys;
pub mod timer;

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tracing::{debug, info, warn};

use crate::config::{Config, ForwardMode};
use crate::dns::{Resolver, ShardResolver};
use crate::relay::tcp::Conn;

pub use files::{FileTable, SockHandle};
pub use ring::{Completion, OpId, OpMem, Ring, Target};

/// Op kinds packed into owner tokens. Connection kinds go to `relay::tcp::Conn`.
pub mod kind {
    pub const HS_RECV: u8 = 1;
    pub const HS_SEND: u8 = 2;
    pub const CONNECT: u8 = 3;
    pub const REPLY_SEND: u8 = 4;
    pub const EARLY_SEND: u8 = 5;
    pub const REJECT_SEND: u8 = 6;
    pub const POLL_IN: u8 = 7;
    pub const POLL_OUT: u8 = 8;
    pub const SPLICE_IN: u8 = 9;
    pub const SPLICE_OUT: u8 = 10;
    pub const RECV: u8 = 11;
    pub const SEND: u8 = 12;
    pub const TIMER: u8 = 13;
    pub const DNS: u8 = 14;
    pub const SHUTDOWN: u8 = 15;
    pub const REJECT_DRAIN: u8 = 16;
    // UDP ASSOCIATE (aux: 0 = client-facing socket, 1 = target-facing).
    pub const UDP_CRECV: u8 = 17;
    pub const UDP_TRECV: u8 = 18;
    pub const UDP_CSEND: u8 = 19;
    pub const UDP_TSEND: u8 = 20;
    pub const CTRL_RECV: u8 = 21;
    // Shard-level kinds (slot == SHARD_SLOT).
    pub const ACCEPT: u8 = 32;
    pub const ACCEPT_RETRY: u8 = 33;
    pub const WHEEL: u8 = 34;
    pub const DNS_WAKE: u8 = 35;
    pub const CTL_WAKE: u8 = 36;
    pub const DRAIN: u8 = 37;
}

/// Slot numbers and generations are 24 bits each: 16M connections per shard, and a slot must
/// be reused 16M times before a stale token (a timer, a late DNS answer) could match again.
const FIELD_MASK: u32 = (1 << 24) - 1;
const SHARD_SLOT: u32 = FIELD_MASK;

/// An owner token: connection slot (24 bits), slot generation (24 bits), op kind, and one byte
/// of detail (direction, timer sequence or listener index).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token(pub u64);

impl Token {
    pub fn new(slot: u32, generation: u32, kind: u8, aux: u8) -> Token {
        Token(
            u64::from(slot & FIELD_MASK)
                | (u64::from(generation & FIELD_MASK) << 24)
                | (u64::from(kind) << 48)
                | (u64::from(aux) << 56),
        )
    }
    fn shard(kind: u8, aux: u8) -> Token {
        Token::new(SHARD_SLOT, 0, kind, aux)
    }
    pub fn slot(self) -> u32 {
        self.0 as u32 & FIELD_MASK
    }
    pub fn generation(self) -> u32 {
        (self.0 >> 24) as u32 & FIELD_MASK
    }
    pub fn kind(self) -> u8 {
        (self.0 >> 48) as u8
    }
    pub fn aux(self) -> u8 {
        (self.0 >> 56) as u8
    }
    /// The same connection, another op kind.
    pub fn with(self, kind: u8, aux: u8) -> Token {
        Token::new(self.slot(), self.generation(), kind, aux)
    }
}

/// Per-shard resources the relay uses to start ops.
pub struct Io {
    pub ring: Ring,
    pub bufs: Option<bufring::BufRing>,
    pub pipes: pipes::PipePool,
    pub files: FileTable,
    pub wheel: timer::Wheel,
    pub dns: ShardResolver,
    pub cfg: Arc<Config>,
    /// The time at the start of this loop turn (one clock read per turn).
    pub now: Instant,
    /// Copy-path directions whose multishot receive ended with -ENOBUFS.
    pub starved: Vec<Token>,
    /// UDP datagram buffers (one datagram per buffer).
    pub ubufs: Option<bufring::BufRing>,
    /// UDP receives that ended with -ENOBUFS (aux: which socket).
    pub udp_starved: Vec<Token>,
    /// Bytes held by fragment reassembly queues on this shard.
    pub frag_bytes: usize,
}

/// Provided-buffer group used by the copy path.
const BGID: u16 = 1;
/// Copy-path buffers: entries and size. 2048 x 16 KiB = 32 MiB of address space per shard,
/// resident only once used.
const PBUF_ENTRIES: u16 = 2048;
const PBUF_SIZE: u32 = 16 * 1024;
/// UDP buffers: the group, the count and the size: recvmsg header and name area, then room
/// for the largest datagram (65,535 bytes), rounded to pages. 512 x 68 KiB = 34 MiB of address
/// space per shard; a small datagram makes only its buffer's first page resident.
const UDP_BGID: u16 = 2;
const UDP_BUF_ENTRIES: u16 = 512;
const UDP_BUF_SIZE: u32 = 68 * 1024;
/// Splice-path pipe capacity and how many drained pipes a shard keeps for reuse.
const PIPE_SIZE: usize = 256 * 1024;
const PIPE_POOL_IDLE: usize = 64;
const RING_ENTRIES: u32 = 4096;
/// Fixed-file slots to ask for; the kernel caps a table at RLIMIT_NOFILE.
const FILE_TABLE_WANT: u32 = 1 << 16;

/// Everything a shard thread needs, built on the main thread.
pub struct ShardSpec {
    pub id: usize,
    pub core: Option<core_affinity::CoreId>,
    pub listeners: Vec<Socket>,
    pub cfg: Arc<Config>,
    pub resolver: Arc<Resolver>,
    pub ctl: std::io::PipeReader,
    pub stop: Arc<AtomicBool>,
}

struct Slot {
    generation: u32,
    conn: Option<Box<Conn>>,
}

struct Listener {
    sock: Option<Socket>,
    /// The address connections arrive at, unless the listener is on a wildcard IP (then each
    /// connection's own local address is looked up).
    local: Option<SocketAddr>,
    backoff: Duration,
    /// A multishot accept is in flight (false while backing off after an error).
    armed: bool,
}

pub struct Shard {
    io: Io,
    slots: Vec<Slot>,
    /// Free slots, reused oldest first so that one slot is not recycled at once.
    free: std::collections::VecDeque<u32>,
    live: usize,
    listeners: Vec<Listener>,
    ctl: std::io::PipeReader,
    stop: Arc<AtomicBool>,
    stopping: bool,
    /// When the earliest ring timeout in flight for the wheel fires (None: none in flight).
    wheel_armed_at: Option<Instant>,
    id: usize,
}

/// Creates the SO_REUSEPORT listeners for every shard. Port 0 is resolved once (by the first
/// shard's socket) so that every shard listens on the same port.
pub fn bind_listeners(addrs: &[SocketAddr], shards: usize) -> std::io::Result<Vec<Vec<Socket>>> {
    let mut per_shard: Vec<Vec<Socket>> = (0..shards).map(|_| Vec::new()).collect();
    for addr in addrs {
        let mut addr = *addr;
        for list in per_shard.iter_mut() {
            let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            sock.set_reuse_address(true)?;
            sock.set_reuse_port(true)?;
            // Accepted sockets inherit TCP_NODELAY from their listener, which saves a
            // setsockopt per connection.
            sock.set_tcp_nodelay(true)?;
            if addr.is_ipv6() {
                sock.set_only_v6(true)?;
            }
            sock.bind(&addr.into())
                .map_err(|e| std::io::Error::new(e.kind(), format!("bind {addr}: {e}")))?;
            sock.listen(4096)?;
            if addr.port() == 0 {
                addr = sock
                    .local_addr()?
                    .as_socket()
                    .ok_or_else(|| std::io::Error::other("listener has no IP address"))?;
            }
            list.push(sock);
        }
    }
    Ok(per_shard)
}

impl Shard {
    /// Runs a shard until it has stopped and drained. `ready` gets one message once the ring
    /// and the accept ops are set up (or the error that prevented it).
    pub fn run(
        spec: ShardSpec,
        ready: std::sync::mpsc::Sender<std::io::Result<()>>,
    ) -> std::io::Result<()> {
        match Self::setup(spec) {
            Ok(mut shard) => {
                shard.arm();
                let _ = ready.send(Ok(()));
                shard.event_loop()
            }
            Err(e) => {
                let _ = ready.send(Err(std::io::Error::new(e.kind(), e.to_string())));
                Err(e)
            }
        }
    }

    fn setup(spec: ShardSpec) -> std::io::Result<Shard> {
        if let Some(core) = spec.core {
            if !core_affinity::set_for_current(core) {
                warn!(
                    shard = spec.id,
                    core = core.id,
                    "could not pin shard to its core"
                );
            }
        }
        let ring = Ring::new(RING_ENTRIES)?;
        // Splices run in io-wq workers; a small bound keeps them from crowding the cores.
        let _ = ring.submitter().register_iowq_max_workers(&mut [2, 4]);
        let bufs = match spec.cfg.forward {
            ForwardMode::Copy | ForwardMode::Auto => {
                Some(bufring::BufRing::new(&ring, BGID, PBUF_ENTRIES, PBUF_SIZE)?)
            }
            ForwardMode::Splice => None,
        };
        let ubufs = bufring::BufRing::new(&ring, UDP_BGID, UDP_BUF_ENTRIES, UDP_BUF_SIZE)
            .map_err(
                |e| warn!(shard = spec.id, error = %e, "no UDP buffer ring; UDP ASSOCIATE off"),
            )
            .ok();
        let files = FileTable::new(&ring, FILE_TABLE_WANT);
        debug!(
            shard = spec.id,
            setup = ring.setup,
            fixed_files = files.size(),
            "ring ready"
        );
        let now = Instant::now();
        let shard = Shard {
            io: Io {
                ring,
                bufs,
                pipes: pipes::PipePool::new(PIPE_POOL_IDLE, PIPE_SIZE),
                files,
                wheel: timer::Wheel::new(now),
                dns: ShardResolver::new(spec.resolver)?,
                cfg: spec.cfg,
                now,
                starved: Vec::new(),
                ubufs,
                udp_starved: Vec::new(),
                frag_bytes: 0,
            },
            slots: Vec::new(),
            free: std::collections::VecDeque::new(),
            live: 0,
            listeners: spec
                .listeners
                .into_iter()
                .map(|s| Listener {
                    local: s
                        .local_addr()
                        .ok()
                        .and_then(|a| a.as_socket())
                        .filter(|a| !a.ip().is_unspecified()),
                    sock: Some(s),
                    backoff: Duration::ZERO,
                    armed: false,
                })
                .collect(),
            ctl: spec.ctl,
            stop: spec.stop,
            stopping: false,
            wheel_armed_at: None,
            id: spec.id,
        };
        Ok(shard)
    }

    /// Starts the shard-level ops: accepts and the two wake-up reads.
    fn arm(&mut self) {
        for i in 0..self.listeners.len() {
            self.arm_accept(i);
        }
        let dns_fd = self.io.dns.wake_fd();
        self.io.ring.read(
            dns_fd,
            Vec::with_capacity(64),
            Token::shard(kind::DNS_WAKE, 0).0,
        );
        self.io.ring.read(
            self.ctl.as_raw_fd(),
            Vec::with_capacity(8),
            Token::shard(kind::CTL_WAKE, 0).0,
        );
    }

    fn event_loop(&mut self) -> std::io::Result<()> {
        let result = self.turn_until_stopped();
        // On every exit, error or not: no op may still use memory that is about to be freed.
        if self.io.ring.cancel_all_and_wait() {
            if self.io.bufs.is_some() {
                let _ = self.io.ring.submitter().unregister_buf_ring(BGID);
            }
            if self.io.ubufs.is_some() {
                let _ = self.io.ring.submitter().unregister_buf_ring(UDP_BGID);
            }
        } else {
            warn!(
                shard = self.id,
                "ops still in flight at exit; leaking their memory"
            );
            self.io.ring.leak_in_flight();
            std::mem::forget(self.io.bufs.take());
            std::mem::forget(self.io.ubufs.take());
        }
        result
    }

    fn turn_until_stopped(&mut self) -> std::io::Result<()> {
        let mut completions = Vec::with_capacity(1024);
        let mut expired = Vec::new();
        let busy_poll = self.io.cfg.busy_poll;
        let mut last_event = Instant::now();
        loop {
            match busy_poll {
                None => self.io.ring.submit_and_wait(1)?,
                Some(window) => self.busy_wait(window, &mut last_event)?,
            }
            self.io.now = Instant::now();
            self.io.ring.reap(&mut completions);
            for c in completions.drain(..) {
                self.dispatch(c);
            }
            self.io.wheel.expire(self.io.now, &mut expired);
            for t in expired.drain(..) {
                self.on_timer(Token(t));
            }
            if let Some(bufs) = self.io.bufs.as_mut() {
                bufs.publish();
                // Re-arm receives that found the pool empty, as many as there are free buffers
                // (each needs at least one); the rest wait for the next recycled buffers.
                let free = bufs.available() as usize;
                if free > 0 && !self.io.starved.is_empty() {
                    let n = free.min(self.io.starved.len());
                    let ready: Vec<Token> = self.io.starved.drain(..n).collect();
                    for t in ready {
                        self.with_conn(t, |c, io| c.rearm_recv(io, t.aux() as usize));
                    }
                }
            }
            if let Some(ubufs) = self.io.ubufs.as_mut() {
                ubufs.publish();
                let free = ubufs.available() as usize;
                if free > 0 && !self.io.udp_starved.is_empty() {
                    let n = free.min(self.io.udp_starved.len());
                    let ready: Vec<Token> = self.io.udp_starved.drain(..n).collect();
                    for t in ready {
                        self.with_conn(t, |c, io| c.rearm_udp(io, t.aux()));
                    }
                }
            }
            self.arm_wheel();
            if self.stopping && self.live == 0 && self.listeners.iter().all(|l| l.sock.is_none()) {
                break;
            }
        }
        info!(shard = self.id, "shard stopped");
        Ok(())
    }

    /// Keeps one ring timeout in flight for the wheel's earliest entry. A full scan runs only
    /// when no timeout is armed; otherwise only entries inserted since the last turn are
    /// checked, and an extra timeout is armed if one of them is due before the armed one.
    fn arm_wheel(&mut self) {
        let now = self.io.now;
        let new_earliest = self.io.wheel.take_new_earliest();
        let due = match self.wheel_armed_at {
            None => match self.io.wheel.next_wait(now) {
                Some(wait) => now + wait,
                None => return,
            },
            Some(armed) => match new_earliest {
                Some(t) if t + timer::TICK < armed => t,
                _ => return,
            },
        };
        let wait = due
            .saturating_duration_since(now)
            .max(Duration::from_millis(1));
        self.io.ring.timeout(wait, Token::shard(kind::WHEEL, 0).0);
        self.wheel_armed_at = Some(due);
    }

    /// `--busy-poll`: keep running the ring's completions without sleeping until one is ready,
    /// for up to `window` after the last one; then sleep as usual.
    fn busy_wait(&mut self, window: Duration, last_event: &mut Instant) -> std::io::Result<()> {
        // Check the clock only every so many spins: it is the costliest part of a spin.
        let mut spins = 0u32;
        loop {
            self.io.ring.submit_nowait()?;
            if self.io.ring.has_completions() {
                *last_event = Instant::now();
                return Ok(());
            }
            spins += 1;
            if spins.is_multiple_of(64) && last_event.elapsed() >= window {
                self.io.ring.submit_and_wait(1)?;
                *last_event = Instant::now();
                return Ok(());
            }
            std::hint::spin_loop();
        }
    }

    /// Runs `f` on the connection `t` names (if it still exists), then frees it if it has
    /// finished closing: no op in flight, so no memory or fd is still in the kernel's hands.
    fn with_conn(&mut self, t: Token, f: impl FnOnce(&mut Conn, &mut Io)) {
        let Some(slot) = self.slots.get_mut(t.slot() as usize) else {
            return;
        };
        if slot.generation != t.generation() {
            return;
        }
        let Some(conn) = slot.conn.as_mut() else {
            return;
        };
        f(conn, &mut self.io);
        if conn.is_finished() {
            let conn = slot.conn.take().expect("checked above");
            conn.release(&mut self.io);
            slot.generation = (slot.generation + 1) & FIELD_MASK;
            self.free.push_back(t.slot());
            self.live -= 1;
        }
    }

    fn dispatch(&mut self, c: Completion) {
        let t = Token(c.owner);
        if t.slot() != SHARD_SLOT {
            self.with_conn(t, |conn, io| conn.on_completion(io, t, c));
            return;
        }
        match t.kind() {
            kind::ACCEPT => self.on_accept(t.aux() as usize, c),
            // Any firing may leave the rest of the wheel uncovered: recompute next turn.
            kind::WHEEL => self.wheel_armed_at = None,
            kind::DNS_WAKE => {
                let mut answers = Vec::new();
                self.io
                    .dns
                    .drain(self.io.now, |tok, res| answers.push((tok, res)));
                for (tok, res) in answers {
                    let tok = Token(tok);
                    self.with_conn(tok, |conn, io| conn.on_resolved(io, tok, res));
                }
                let buf = match c.mem {
                    OpMem::Buf { mut buf, .. } => {
                        buf.clear();
                        buf
                    }
                    _ => Vec::with_capacity(64),
                };
                let fd = self.io.dns.wake_fd();
                self.io.ring.read(fd, buf, c.owner);
            }
            kind::CTL_WAKE => {
                if self.stop.load(Ordering::Acquire) {
                    self.begin_stop();
                } else {
                    let fd = self.ctl.as_raw_fd();
                    self.io.ring.read(fd, Vec::with_capacity(8), c.owner);
                }
            }
            _ => {}
        }
    }

    fn on_timer(&mut self, t: Token) {
        if t.slot() != SHARD_SLOT {
            self.with_conn(t, |conn, io| conn.on_timer(io, t));
            return;
        }
        match t.kind() {
            kind::ACCEPT_RETRY if !self.stopping => self.arm_accept(t.aux() as usize),
            kind::DRAIN => {
                let n = self.live;
                if n > 0 {
                    info!(
                        shard = self.id,
                        connections = n,
                        "drain timeout: closing the rest"
                    );
                }
                for i in 0..self.slots.len() {
                    let g = self.slots[i].generation;
                    self.with_conn(Token::new(i as u32, g, 0, 0), |conn, io| conn.close(io));
                }
            }
            _ => {}
        }
    }

    fn arm_accept(&mut self, i: usize) {
        if let Some(sock) = &self.listeners[i].sock {
            let fd = sock.as_raw_fd();
            self.listeners[i].armed = true;
            self.io
                .ring
                .accept_multi(fd, Token::shard(kind::ACCEPT, i as u8).0);
        }
    }

    fn on_accept(&mut self, i: usize, c: Completion) {
        if c.res >= 0 {
            self.listeners[i].backoff = Duration::ZERO;
            // SAFETY: a successful accept CQE carries a new fd that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(c.res as RawFd) };
            if self.stopping {
                drop(fd);
            } else {
                self.add_conn(Socket::from(fd), i);
            }
        }
        if c.more {
            return;
        }
        self.listeners[i].armed = false;
        // The multishot accept ended: on stop, close the listener; on error, back off so an
        // fd shortage (EMFILE/ENFILE) is neither a crash nor a busy loop.
        if self.stopping {
            self.listeners[i].sock = None;
            return;
        }
        if c.res < 0 {
            let err = std::io::Error::from_raw_os_error(-c.res);
            let l = &mut self.listeners[i];
            l.backoff = (l.backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
            warn!(shard = self.id, error = %err, retry_in = ?l.backoff, "accept failed");
            let at = self.io.now + l.backoff;
            self.io
                .wheel
                .insert(at, Token::shard(kind::ACCEPT_RETRY, i as u8).0);
        } else {
            self.arm_accept(i);
        }
    }

    fn add_conn(&mut self, sock: Socket, listener: usize) {
        let idx = match self.free.pop_front() {
            Some(i) => i,
            None if self.slots.len() >= SHARD_SLOT as usize => {
                warn!(
                    shard = self.id,
                    "connection table full; dropping a new connection"
                );
                return;
            }
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    conn: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let generation = self.slots[idx as usize].generation;
        let token = Token::new(idx, generation, 0, 0);
        // The peer address needs an ordinary fd: take it before the socket moves into the
        // fixed-file table. (TCP_NODELAY came with the socket, from the listener.)
        let peer = sock.peer_addr().ok().and_then(|a| a.as_socket());
        let local = self.listeners[listener]
            .local
            .or_else(|| sock.local_addr().ok().and_then(|a| a.as_socket()));
        let client = self.io.files.install(&self.io.ring, sock);
        self.slots[idx as usize].conn = Some(Box::new(Conn::new(client, peer, local, token)));
        self.live += 1;
        self.with_conn(token, |conn, io| conn.start(io));
    }

    fn begin_stop(&mut self) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        info!(
            shard = self.id,
            connections = self.live,
            "stopping: no new connections, draining"
        );
        for l in &mut self.listeners {
            match (&l.sock, l.armed) {
                (Some(s), true) => self.io.ring.cancel_fd(Target::Fd(s.as_raw_fd())),
                _ => l.sock = None,
            }
        }
        let at = self.io.now + self.io.cfg.drain_timeout;
        self.io.wheel.insert(at, Token::shard(kind::DRAIN, 0).0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_sockets_inherit_tcp_nodelay_from_the_listeners() {
        // The accept path no longer sets TCP_NODELAY itself: it relies on this.
        let addrs: Vec<SocketAddr> =
            vec!["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()];
        for list in bind_listeners(&addrs, 1).unwrap() {
            for l in list {
                assert!(l.tcp_nodelay().unwrap());
                let to = l.local_addr().unwrap().as_socket().unwrap();
                let _client = std::net::TcpStream::connect(to).unwrap();
                let (accepted, _) = l.accept().unwrap();
                assert!(accepted.tcp_nodelay().unwrap(), "{to}");
            }
        }
    }

    #[test]
    fn token_fields_round_trip_and_stay_apart() {
        let t = Token::new(FIELD_MASK - 1, FIELD_MASK, kind::SPLICE_OUT, 1);
        assert_eq!(t.slot(), FIELD_MASK - 1);
        assert_eq!(t.generation(), FIELD_MASK);
        assert_eq!(t.kind(), kind::SPLICE_OUT);
        assert_eq!(t.aux(), 1);
        let u = t.with(kind::TIMER, 200);
        assert_eq!((u.slot(), u.generation()), (t.slot(), t.generation()));
        assert_eq!((u.kind(), u.aux()), (kind::TIMER, 200));
        assert_eq!(Token::shard(kind::ACCEPT, 3).slot(), SHARD_SLOT);
        // Generations wrap within their 24 bits without touching the slot.
        assert_eq!(Token::new(5, FIELD_MASK + 1, 0, 0).generation(), 0);
        assert_eq!(Token::new(5, FIELD_MASK + 1, 0, 0).slot(), 5);
    }
}
