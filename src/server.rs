//! A shard: one pinned thread that owns one io_uring ring, one SO_REUSEPORT listener per
//! `--listen` address, and every connection it accepted. Nothing here is shared with other
//! shards, so nothing on the hot path takes a lock.
//!
//! The loop is completion driven: submit and wait once per turn, hand every completion to the
//! connection its owner token names (or to the shard's own ops: accepts, wake-ups, the timer
//! wheel), fire due timers, publish returned buffers, and re-arm receives that were starved of
//! them. The server owns the connection slab, accept back-off and stop/drain; the relay owns
//! what a connection does; the engine (`crate::uring`) owns the ring.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tracing::{debug, info, warn};

use crate::access_log::AccessLog;
use crate::config::{Config, ForwardMode};
use crate::dns::{Resolver, ShardResolver};
use crate::limits::Limits;
use crate::metrics::{Outcome, ShardMetrics};
use crate::relay::token::{self, ConnId, Op, MAX_SLOT};
use crate::relay::{Conn, Ctx, ShardState};
use crate::uring::{Completion, Data, Engine, Owner, Ring, RingSpec};

/// The shard's own ops, marked by the owner word's top bit (the relay keeps it clear).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ShardOp {
    Accept(u8),
    AcceptRetry(u8),
    Wheel,
    DnsWake,
    CtlWake,
    Drain,
    /// The `--stats-interval` timer.
    Stats,
}

const SHARD_BIT: u64 = 1 << 63;

impl ShardOp {
    fn owner(self) -> Owner {
        let (kind, arg): (u8, u8) = match self {
            ShardOp::Accept(i) => (0, i),
            ShardOp::AcceptRetry(i) => (1, i),
            ShardOp::Wheel => (2, 0),
            ShardOp::DnsWake => (3, 0),
            ShardOp::CtlWake => (4, 0),
            ShardOp::Drain => (5, 0),
            ShardOp::Stats => (6, 0),
        };
        Owner(SHARD_BIT | (u64::from(kind) << 8) | u64::from(arg))
    }

    fn decode(owner: Owner) -> Option<ShardOp> {
        if owner.0 & SHARD_BIT == 0 {
            return None;
        }
        let arg = owner.0 as u8;
        Some(match (owner.0 >> 8) as u8 {
            0 => ShardOp::Accept(arg),
            1 => ShardOp::AcceptRetry(arg),
            2 => ShardOp::Wheel,
            3 => ShardOp::DnsWake,
            4 => ShardOp::CtlWake,
            5 => ShardOp::Drain,
            6 => ShardOp::Stats,
            _ => return None,
        })
    }
}

/// Copy-path buffers: entries and size. 2048 x 16 KiB = 32 MiB of address space per shard,
/// resident only once used. The kernel is offered `COPY_BUF_EXPOSED` at a time, the most
/// recently used first, so receives land in cache-warm memory (see `uring::bufring`).
const COPY_BUF_ENTRIES: u16 = 2048;
const COPY_BUF_SIZE: u32 = 16 * 1024;
const COPY_BUF_EXPOSED: u16 = 256;
/// UDP buffers: the recvmsg header, name and control areas, then room for the largest
/// datagram (65,535 bytes), rounded to pages. 512 x 68 KiB = 34 MiB of address space per
/// shard; a small datagram makes only its buffer's first page resident.
const UDP_BUF_ENTRIES: u16 = 512;
const UDP_BUF_EXPOSED: u16 = 512;
const UDP_BUF_SIZE: u32 = 68 * 1024;
/// How often a shard copies its ring's gauges (pipes, buffers) into its metrics.
const GAUGES_EVERY: Duration = Duration::from_millis(500);

const RING: RingSpec = RingSpec {
    entries: 4096,
    fixed_files: 1 << 16,
    // Splice-path pipe capacity and how many drained pipes a shard keeps for reuse.
    pipe_size: 256 * 1024,
    pipes_idle: 64,
    // Splices run in io-wq workers; a small bound keeps them from crowding the cores.
    iowq_workers: [2, 4],
};

/// `--max-connections` by default: what the shards' fixed-file tables hold at three sockets a
/// connection (a client and a target, or a UDP association's two). Sockets in the table take
/// no file descriptors, so this holds whatever RLIMIT_NOFILE is.
pub fn default_max_connections(shards: usize) -> usize {
    shards * (RING.fixed_files as usize / 3)
}

/// Everything a shard thread needs, built on the main thread.
pub struct ShardSpec {
    pub id: usize,
    pub core: Option<core_affinity::CoreId>,
    pub listeners: Vec<Socket>,
    pub cfg: Arc<Config>,
    pub resolver: Arc<Resolver>,
    pub limits: Arc<Limits>,
    pub ctl: std::io::PipeReader,
    /// New configurations (SIGHUP), each announced by a byte on `ctl`.
    pub reload: std::sync::mpsc::Receiver<Arc<Config>>,
    pub stop: Arc<AtomicBool>,
    pub metrics: Arc<ShardMetrics>,
    pub access: Option<AccessLog>,
}

struct Slot {
    generation: u32,
    conn: Option<Box<Conn>>,
}

/// The shard's connections, by slot.
#[derive(Default)]
struct Slab {
    slots: Vec<Slot>,
    /// Free slots, reused oldest first so that one slot is not recycled at once.
    free: std::collections::VecDeque<u32>,
    live: usize,
}

/// What the connections' handlers use, apart from the connections themselves.
struct Env {
    ring: Ring,
    dns: ShardResolver,
    cfg: Arc<Config>,
    limits: Arc<Limits>,
    metrics: Arc<ShardMetrics>,
    access: Option<AccessLog>,
    state: ShardState,
    /// The time at the start of this loop turn (one clock read per turn).
    now: Instant,
}

impl Env {
    fn ctx(&mut self) -> Ctx<'_, Ring> {
        Ctx {
            io: &mut self.ring,
            cfg: &self.cfg,
            now: self.now,
            dns: &mut self.dns,
            shard: &mut self.state,
            limits: &self.limits,
            metrics: &self.metrics,
            access: self.access.as_ref(),
        }
    }
}

impl Slab {
    /// Runs `f` on connection `id` (if it still exists), then releases it if it has finished
    /// closing: no op in flight, so no memory or socket is still in the kernel's hands.
    fn with(&mut self, env: &mut Env, id: ConnId, f: impl FnOnce(&mut Conn, &mut Ctx<'_, Ring>)) {
        let Some(slot) = self.slots.get_mut(id.slot as usize) else {
            return;
        };
        if slot.generation != id.generation {
            return;
        }
        let Some(conn) = slot.conn.as_mut() else {
            return;
        };
        let mut cx = env.ctx();
        f(conn, &mut cx);
        if conn.is_finished() {
            let conn = slot.conn.take().expect("checked above");
            conn.release(&mut cx);
            slot.generation = ConnId::next_generation(slot.generation);
            self.free.push_back(id.slot);
            self.live -= 1;
        }
    }

    /// A free slot for a new connection, or None when the table is full.
    fn vacant(&mut self) -> Option<ConnId> {
        let slot = match self.free.pop_front() {
            Some(i) => i,
            None if self.slots.len() > MAX_SLOT as usize => return None,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    conn: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        Some(ConnId {
            slot,
            generation: self.slots[slot as usize].generation,
        })
    }

    fn ids(&self) -> Vec<ConnId> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.conn.is_some())
            .map(|(i, s)| ConnId {
                slot: i as u32,
                generation: s.generation,
            })
            .collect()
    }
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
    env: Env,
    conns: Slab,
    listeners: Vec<Listener>,
    ctl: std::io::PipeReader,
    reload: std::sync::mpsc::Receiver<Arc<Config>>,
    stop: Arc<AtomicBool>,
    stopping: bool,
    id: usize,
}

/// Creates the SO_REUSEPORT listeners for every shard. Port 0 is resolved once (by the first
/// shard's socket) so that every shard listens on the same port.
/// Binds each address once per shard (SO_REUSEPORT). An IPv6 wildcard (`[::]:PORT`) also
/// accepts IPv4 clients (as IPv4-mapped addresses) unless `ipv6_only`, or unless an IPv4
/// address with the same port is listed too, which then keeps its own listener.
pub fn bind_listeners(
    addrs: &[SocketAddr],
    shards: usize,
    ipv6_only: bool,
) -> std::io::Result<Vec<Vec<Socket>>> {
    let mut per_shard: Vec<Vec<Socket>> = (0..shards).map(|_| Vec::new()).collect();
    for addr in addrs {
        let dual = addr.is_ipv6()
            && addr.ip().is_unspecified()
            && !ipv6_only
            && !addrs
                .iter()
                .any(|a| a.is_ipv4() && a.port() == addr.port() && addr.port() != 0);
        let mut addr = *addr;
        for list in per_shard.iter_mut() {
            let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            sock.set_reuse_address(true)?;
            sock.set_reuse_port(true)?;
            // Accepted sockets inherit TCP_NODELAY from their listener, which saves a
            // setsockopt per connection.
            sock.set_tcp_nodelay(true)?;
            if addr.is_ipv6() {
                sock.set_only_v6(!dual)?;
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
                shard.env.metrics.accepting.store(true, Ordering::Release);
                let _ = ready.send(Ok(()));
                // Dropping the shard drops its ring, which cancels and drains every op.
                shard.turn_until_stopped()
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
        let now = Instant::now();
        let mut ring = Ring::new(&RING, now)?;
        let copy_group = match spec.cfg.forward {
            ForwardMode::Copy | ForwardMode::Auto => {
                Some(ring.add_buf_group(COPY_BUF_ENTRIES, COPY_BUF_SIZE, COPY_BUF_EXPOSED)?)
            }
            ForwardMode::Splice => None,
        };
        let udp_group = ring
            .add_buf_group(UDP_BUF_ENTRIES, UDP_BUF_SIZE, UDP_BUF_EXPOSED)
            .map_err(
                |e| warn!(shard = spec.id, error = %e, "no UDP buffer pool; UDP ASSOCIATE off"),
            )
            .ok();
        debug!(
            shard = spec.id,
            setup = ring.setup,
            fixed_files = ring.fixed_files(),
            "ring ready"
        );
        Ok(Shard {
            env: Env {
                ring,
                dns: ShardResolver::new(spec.resolver, spec.cfg.connect_timeout)?,
                cfg: spec.cfg,
                limits: spec.limits,
                metrics: spec.metrics,
                access: spec.access,
                state: ShardState {
                    copy_group,
                    copy_scarce_below: u32::from(COPY_BUF_ENTRIES / 4),
                    udp_group,
                    ..ShardState::default()
                },
                now,
            },
            conns: Slab::default(),
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
            reload: spec.reload,
            stop: spec.stop,
            stopping: false,
            id: spec.id,
        })
    }

    /// Starts the shard-level ops: accepts and the two wake-up reads.
    fn arm(&mut self) {
        for i in 0..self.listeners.len() {
            self.arm_accept(i);
        }
        let dns_fd = self.env.dns.wake_fd();
        self.env
            .ring
            .read(dns_fd, Vec::with_capacity(64), ShardOp::DnsWake.owner());
        self.env.ring.read(
            self.ctl.as_raw_fd(),
            Vec::with_capacity(8),
            ShardOp::CtlWake.owner(),
        );
    }

    /// `--stats-interval`: one line with what the shard holds, then the next timer.
    fn log_stats(&mut self) {
        let Some(every) = self.env.cfg.stats_interval else {
            return;
        };
        let r = self.env.ring.stats();
        let held = |g: Option<crate::uring::Group>| {
            g.and_then(|g| r.buffers_held.get(g.index()).copied())
                .unwrap_or(0)
        };
        info!(
            shard = self.id,
            connections = self.conns.live,
            ops_in_flight = r.ops_in_flight,
            fixed_files = r.fixed_in_use,
            pipes_open = r.pipes_open,
            pipes_idle = r.pipes_idle,
            copy_buffers_held = held(self.env.state.copy_group),
            udp_buffers_held = held(self.env.state.udp_group),
            names_resolving = self.env.dns.in_flight(),
            limited_connections = self.env.limits.connections(),
            "shard stats"
        );
        let at = self.env.now + every;
        self.env.ring.set_timer(at, ShardOp::Stats.owner());
    }

    fn turn_until_stopped(&mut self) -> std::io::Result<()> {
        if let Some(every) = self.env.cfg.stats_interval {
            let now = Instant::now();
            self.env.ring.set_timer(now + every, ShardOp::Stats.owner());
            self.env.ring.arm_wheel(now, ShardOp::Wheel.owner());
        }
        let mut completions = Vec::with_capacity(1024);
        let mut expired = Vec::new();
        let busy_poll = self.env.cfg.busy_poll;
        let mut last_event = Instant::now();
        let mut gauges_at = Instant::now();
        loop {
            match busy_poll {
                None => self.env.ring.submit_and_wait(1)?,
                Some(window) => self.busy_wait(window, &mut last_event)?,
            }
            self.env.now = Instant::now();
            self.env.ring.reap(&mut completions);
            for c in completions.drain(..) {
                self.dispatch(c);
            }
            self.env.ring.expire_timers(self.env.now, &mut expired);
            for owner in expired.drain(..) {
                self.on_timer(owner);
            }
            self.flush_copies();
            self.flush_datagrams();
            self.env.ring.publish_buffers();
            self.rearm_starved();
            self.env
                .ring
                .arm_wheel(self.env.now, ShardOp::Wheel.owner());
            if self.env.now >= gauges_at {
                gauges_at = self.env.now + GAUGES_EVERY;
                self.publish_gauges();
            }
            if self.stopping
                && self.conns.live == 0
                && self.listeners.iter().all(|l| l.sock.is_none())
            {
                break;
            }
        }
        info!(shard = self.id, "shard stopped");
        Ok(())
    }

    /// The ring's gauges for the metrics (the scrape thread cannot read the ring).
    fn publish_gauges(&mut self) {
        let r = self.env.ring.stats();
        let m = &self.env.metrics;
        m.pipes_open.set(r.pipes_open as u64);
        m.pipes_idle.set(r.pipes_idle as u64);
        let held = self
            .env
            .state
            .copy_group
            .and_then(|g| r.buffers_held.get(g.index()).copied())
            .unwrap_or(0);
        let total = if self.env.state.copy_group.is_some() {
            u64::from(COPY_BUF_ENTRIES)
        } else {
            0
        };
        m.copy_buffers_free.set(total.saturating_sub(held as u64));
    }

    /// Sends what copy-path tunnels received during this turn, one vectored send each.
    fn flush_copies(&mut self) {
        let env = &mut self.env;
        let mut listed = std::mem::take(&mut env.state.copy_flush);
        for (id, d) in listed.drain(..) {
            self.conns.with(env, id, |c, cx| c.flush_copy(cx, d));
        }
        // A flush sends; it never lists a direction again, so nothing is dropped here. The
        // list's memory serves the next turn.
        debug_assert!(env.state.copy_flush.is_empty());
        env.state.copy_flush = listed;
    }

    /// Sends the single datagrams that associations gathered during this turn, in batches.
    fn flush_datagrams(&mut self) {
        while !self.env.state.udp_flush.is_empty() {
            for id in std::mem::take(&mut self.env.state.udp_flush) {
                self.conns.with(&mut self.env, id, |c, cx| c.flush_udp(cx));
            }
        }
    }

    /// Re-arms receives that found their buffer pool empty, as many as there are free
    /// buffers (each needs at least one); the rest wait for the next returned buffers.
    fn rearm_starved(&mut self) {
        let env = &mut self.env;
        let free = |env: &Env, g: Option<crate::uring::Group>| {
            g.and_then(|g| env.ring.buf_pool(g))
                .map_or(0, |(_, available)| available as usize)
        };
        let n = free(env, env.state.copy_group).min(env.state.starved.len());
        if n > 0 {
            let ready: Vec<_> = env.state.starved.drain(..n).collect();
            for (id, d) in ready {
                self.conns.with(env, id, |c, cx| c.rearm_recv(cx, d));
            }
        }
        let n = free(env, env.state.udp_group).min(env.state.udp_starved.len());
        if n > 0 {
            let ready: Vec<_> = env.state.udp_starved.drain(..n).collect();
            for (id, side) in ready {
                self.conns.with(env, id, |c, cx| c.rearm_udp(cx, side));
            }
        }
    }

    /// `--busy-poll`: keep running the ring's completions without sleeping until one is ready,
    /// for up to `window` after the last one; then sleep as usual.
    fn busy_wait(&mut self, window: Duration, last_event: &mut Instant) -> std::io::Result<()> {
        // Check the clock only every so many spins: it is the costliest part of a spin.
        let mut spins = 0u32;
        loop {
            self.env.ring.submit_nowait()?;
            if self.env.ring.has_completions() {
                *last_event = Instant::now();
                return Ok(());
            }
            spins += 1;
            if spins.is_multiple_of(64) && last_event.elapsed() >= window {
                self.env.ring.submit_and_wait(1)?;
                *last_event = Instant::now();
                return Ok(());
            }
            std::hint::spin_loop();
        }
    }

    fn dispatch(&mut self, c: Completion) {
        if let Some((id, op)) = token::decode(c.owner) {
            self.conns
                .with(&mut self.env, id, |conn, cx| conn.on_completion(cx, op, c));
            return;
        }
        match ShardOp::decode(c.owner) {
            Some(ShardOp::Accept(i)) => self.on_accept(i as usize, c),
            Some(ShardOp::Wheel) => self.env.ring.wheel_fired(),
            Some(ShardOp::DnsWake) => {
                let mut answers = Vec::new();
                self.env
                    .dns
                    .drain(self.env.now, |owner, res| answers.push((Owner(owner), res)));
                for (owner, res) in answers {
                    if let Some((id, Op::Resolve(n))) = token::decode(owner) {
                        self.conns
                            .with(&mut self.env, id, |conn, cx| conn.on_resolved(cx, n, res));
                    }
                }
                let buf = match c.data {
                    Data::Buf { mut buf, .. } => {
                        buf.clear();
                        buf
                    }
                    _ => Vec::with_capacity(64),
                };
                let fd = self.env.dns.wake_fd();
                self.env.ring.read(fd, buf, c.owner);
            }
            Some(ShardOp::CtlWake) => {
                if self.stop.load(Ordering::Acquire) {
                    self.begin_stop();
                } else {
                    // Only the newest configuration matters; connections read it from `Env`
                    // when they next need a setting, so it applies to new ones at once.
                    if let Some(cfg) = self.reload.try_iter().last() {
                        self.env.dns.set_patience(cfg.connect_timeout);
                        self.env.cfg = cfg;
                    }
                    let fd = self.ctl.as_raw_fd();
                    self.env.ring.read(fd, Vec::with_capacity(8), c.owner);
                }
            }
            Some(ShardOp::AcceptRetry(_) | ShardOp::Drain | ShardOp::Stats) | None => {}
        }
    }

    fn on_timer(&mut self, owner: Owner) {
        if let Some((id, op)) = token::decode(owner) {
            if let Op::Timer(seq) = op {
                self.conns
                    .with(&mut self.env, id, |conn, cx| conn.on_timer(cx, seq));
            }
            return;
        }
        match ShardOp::decode(owner) {
            Some(ShardOp::AcceptRetry(i)) if !self.stopping => self.arm_accept(i as usize),
            Some(ShardOp::Stats) => self.log_stats(),
            Some(ShardOp::Drain) => {
                if self.conns.live > 0 {
                    info!(
                        shard = self.id,
                        connections = self.conns.live,
                        "drain timeout: closing the rest"
                    );
                }
                for id in self.conns.ids() {
                    self.conns
                        .with(&mut self.env, id, |conn, cx| conn.shut_down(cx));
                }
            }
            _ => {}
        }
    }

    fn arm_accept(&mut self, i: usize) {
        if let Some(sock) = &self.listeners[i].sock {
            let fd = sock.as_raw_fd();
            self.listeners[i].armed = true;
            self.env
                .ring
                .accept_multi(fd, ShardOp::Accept(i as u8).owner());
        }
    }

    fn on_accept(&mut self, i: usize, c: Completion) {
        if let Data::Accepted(fd) = c.data {
            self.listeners[i].backoff = Duration::ZERO;
            if !self.stopping {
                self.add_conn(fd, i);
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
            let at = self.env.now + l.backoff;
            self.env
                .ring
                .set_timer(at, ShardOp::AcceptRetry(i as u8).owner());
        } else {
            self.arm_accept(i);
        }
    }

    fn add_conn(&mut self, fd: OwnedFd, listener: usize) {
        let sock = Socket::from(fd);
        // The peer address needs an ordinary fd: take it before the socket moves into the
        // fixed-file table. (TCP_NODELAY came with the socket, from the listener.)
        // IPv4 clients of a dual-stack listener arrive IPv4-mapped: logs, limits and rules see
        // them as the IPv4 addresses they are.
        let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        let peer = sock
            .peer_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .map(canonical);
        self.env.metrics.accepted.inc();
        // Behind a balancer the TCP peer is the balancer: only a trusted one may connect, and
        // the per-address limit waits for the client's address in its PROXY header.
        let proxied = self.env.cfg.proxy_protocol;
        if proxied {
            let trusted = peer.is_some_and(|p| {
                self.env
                    .cfg
                    .trusted_proxies
                    .iter()
                    .any(|n| n.contains(&p.ip()))
            });
            if !trusted {
                self.env.metrics.closed(Outcome::ProxyHeader);
                info!(
                    shard = self.id,
                    peer = %peer.map_or_else(|| "?".to_string(), |p| p.to_string()),
                    "connection refused: not a --trusted-proxy address"
                );
                return;
            }
        }
        let ip = if proxied { None } else { peer.map(|p| p.ip()) };
        let lease = match self.env.limits.admit(ip) {
            Ok(lease) => lease,
            Err(over) => {
                self.env.metrics.closed(Outcome::Limit);
                // Closed at accept: dropping the socket closes it.
                if let Some(n) = self.env.state.refusals.note(over, self.env.now) {
                    warn!(
                        shard = self.id,
                        limit = over.flag(),
                        refused = n,
                        total = self.env.limits.refused(over),
                        "connections refused at accept (count since the last line)"
                    );
                }
                return;
            }
        };
        let Some(id) = self.conns.vacant() else {
            self.env.metrics.closed(Outcome::Limit);
            warn!(
                shard = self.id,
                "connection table full; dropping a new connection"
            );
            return;
        };
        if let Some(idle) = self.env.cfg.tcp_keepalive {
            let probes = socket2::TcpKeepalive::new()
                .with_time(idle)
                .with_interval((idle / 3).max(Duration::from_secs(1)))
                .with_retries(3);
            if let Err(e) = sock.set_tcp_keepalive(&probes) {
                debug!(shard = self.id, error = %e, "TCP keepalive not set");
            }
        }
        let local = self.listeners[listener]
            .local
            .filter(|l| !l.ip().is_unspecified())
            .or_else(|| sock.local_addr().ok().and_then(|a| a.as_socket()))
            .map(canonical);
        let client = self.env.ring.install(OwnedFd::from(sock));
        let mut conn = Conn::new(id, client, peer, local, self.env.now, lease);
        if proxied {
            conn.expect_proxy_header();
        }
        self.conns.slots[id.slot as usize].conn = Some(Box::new(conn));
        self.conns.live += 1;
        self.conns
            .with(&mut self.env, id, |conn, cx| conn.start(cx));
    }

    fn begin_stop(&mut self) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        self.env.metrics.accepting.store(false, Ordering::Release);
        info!(
            shard = self.id,
            connections = self.conns.live,
            "stopping: no new connections, draining"
        );
        for l in &mut self.listeners {
            match (&l.sock, l.armed) {
                (Some(s), true) => self.env.ring.cancel_fd(s.as_raw_fd()),
                _ => l.sock = None,
            }
        }
        let at = self.env.now + self.env.cfg.drain_timeout;
        self.env.ring.set_timer(at, ShardOp::Drain.owner());
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
        for list in bind_listeners(&addrs, 1, false).unwrap() {
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
    fn shard_ops_round_trip_and_never_look_like_connection_ops() {
        let ops = [
            ShardOp::Accept(3),
            ShardOp::AcceptRetry(255),
            ShardOp::Wheel,
            ShardOp::DnsWake,
            ShardOp::CtlWake,
            ShardOp::Drain,
            ShardOp::Stats,
        ];
        for op in ops {
            assert_eq!(ShardOp::decode(op.owner()), Some(op));
            assert_eq!(token::decode(op.owner()), None, "{op:?}");
        }
        let conn = ConnId {
            slot: 1,
            generation: 2,
        }
        .owner(Op::Connect);
        assert_eq!(ShardOp::decode(conn), None);
    }
}
