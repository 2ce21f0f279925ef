//! udp: datagram load through SOCKS5 UDP ASSOCIATE (RFC 1928 §7).
//!
//! Each of N associations has a TCP control connection to the proxy (kept
//! open for the whole run) and its own UDP socket, bound to 127.0.0.1 and
//! announced as DST.ADDR:DST.PORT of the UDP ASSOCIATE request; the socket
//! is connected to the relay's BND.ADDR:BND.PORT and sends datagrams with
//! the RFC 1928 header naming the echo target. Replies come back with a
//! header naming the target, which is checked and stripped. With
//! `--direct` the same sockets talk to the echo target without a header.
//!
//! Every payload starts with a stamp (send time, sequence number,
//! association), so round-trip times and the association a reply belongs
//! to come from the reply itself. Closed loop (default): each association
//! keeps `--window` datagrams in flight, sending a new one per reply.
//! Open loop (`--rate R`): R datagrams/s over all associations in round
//! robin, whatever the replies do. Loss = datagrams sent in the measured
//! interval whose reply had not come back when the drain period after it
//! ended.
//!
//! Efficiency: each thread runs its associations *and* its own in-process
//! echo socket on one epoll loop, with batches of up to 64 datagrams per
//! `recvmmsg`/`sendmmsg` call; the generator never waits for a thread
//! switch.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use ringsocks::proto::udp::{decode_udp_header, encode_udp_header_addr};
use ringsocks::proto::Addr;
use serde_json::{json, Value};
use socket2::{Domain, Protocol, Socket, Type};

use crate::common::{
    latency_json, latency_line, new_histogram, sleep_until, via_line, ConnArgs, Dialer, Failures,
    Progress, Report, Result, TimeArgs,
};
use crate::epoll::{self, Epoll};
use crate::serve::{set_rcvbuf, udp_echo_sockets, Mmsg, UdpEcho, MMSG_BATCH};
use crate::sys::{self, CpuUsage};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub time: TimeArgs,
    /// Associations (each: a control connection and a UDP socket)
    #[arg(long, default_value_t = 1)]
    pub assocs: usize,
    /// Datagrams in flight per association (closed loop)
    #[arg(long, default_value_t = 1)]
    pub window: usize,
    /// Payload bytes per datagram, at least 24 (the stamp: send time, sequence, association)
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Threads; associations are split evenly, each thread runs its own echo socket
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Open loop: datagrams per second over all associations (round robin), no window
    #[arg(long, value_name = "R", conflicts_with = "window")]
    pub rate: Option<f64>,
    /// Seconds to wait for late replies after the interval before counting them lost
    #[arg(long, default_value_t = 0.5, value_name = "S")]
    pub drain: f64,
    /// Send datagram by datagram (sendmmsg without UDP GSO), like most UDP clients; the
    /// target's echo still batches
    #[arg(long)]
    pub no_gso: bool,
}

// ---- payload stamp -------------------------------------------------------

/// Bytes of the stamp at the start of every payload.
pub const STAMP_LEN: usize = 24;
const MAGIC: u32 = 0x5544_5031; // "UDP1"
const FILL: u8 = 0x5a;

/// What a datagram carries about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Send time, nanoseconds since the run's base instant.
    pub sent_ns: u64,
    /// Per association, from 0.
    pub seq: u64,
    /// Index of the association that sent it.
    pub assoc: u32,
}

/// Writes the stamp into the first `STAMP_LEN` bytes of `out`.
pub fn encode_stamp(s: &Stamp, out: &mut [u8]) {
    out[0..8].copy_from_slice(&s.sent_ns.to_le_bytes());
    out[8..16].copy_from_slice(&s.seq.to_le_bytes());
    out[16..20].copy_from_slice(&s.assoc.to_le_bytes());
    out[20..24].copy_from_slice(&MAGIC.to_le_bytes());
}

/// The stamp at the start of a payload, or None if it is too short or
/// does not carry our magic.
pub fn decode_stamp(b: &[u8]) -> Option<Stamp> {
    let b = b.get(..STAMP_LEN)?;
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    (u32_at(20) == MAGIC).then(|| Stamp {
        sent_ns: u64_at(0),
        seq: u64_at(8),
        assoc: u32_at(16),
    })
}

// ---- accounting ------------------------------------------------------------

/// The measured interval, in nanoseconds since the base instant.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    pub start_ns: u64,
    pub end_ns: u64,
}

impl Span {
    pub fn contains(&self, ns: u64) -> bool {
        ns >= self.start_ns && ns < self.end_ns
    }
}

/// Datagram counts. Only datagrams *sent* in the measured interval count
/// towards `sent`, and only their replies towards `received`, whenever
/// those arrive (up to the end of the drain period).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub sent: u64,
    pub received: u64,
    /// Everything, warmup and drain included (progress lines).
    pub sent_all: u64,
    pub received_all: u64,
    /// Replies that were cut off, not ours, for another association, or
    /// with a header that does not name the target.
    pub bad: u64,
}

impl Tally {
    pub fn on_sent(&mut self, n: u64, in_window: bool) {
        self.sent_all += n;
        if in_window {
            self.sent += n;
        }
    }

    pub fn on_reply(&mut self, in_window: bool) {
        self.received_all += 1;
        if in_window {
            self.received += 1;
        }
    }

    pub fn merge(&mut self, o: &Tally) {
        self.sent += o.sent;
        self.received += o.received;
        self.sent_all += o.sent_all;
        self.received_all += o.received_all;
        self.bad += o.bad;
    }

    /// Datagrams sent in the interval without a reply by the end of the
    /// drain: (count, fraction of those sent).
    pub fn loss(&self) -> (u64, f64) {
        let lost = self.sent.saturating_sub(self.received);
        let frac = if self.sent == 0 {
            0.0
        } else {
            lost as f64 / self.sent as f64
        };
        (lost, frac)
    }

    /// Replies beyond the datagrams sent (duplicates): should be 0.
    pub fn excess(&self) -> u64 {
        self.received.saturating_sub(self.sent)
    }
}

/// Closed loop: the datagrams of one association awaiting their reply,
/// in send order (sequence number, send time, answered).
#[derive(Debug, Default)]
pub struct InFlight {
    q: VecDeque<(u64, u64, bool)>,
}

impl InFlight {
    /// Datagrams counted against the window: from the oldest unanswered on.
    pub fn len(&self) -> usize {
        self.q.len()
    }

    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    pub fn push(&mut self, seq: u64, sent_ns: u64) {
        self.q.push_back((seq, sent_ns, false));
    }

    /// The reply to `seq` came: true if it was in flight (not written off,
    /// not a duplicate).
    pub fn answer(&mut self, seq: u64) -> bool {
        let Some(&(front, _, _)) = self.q.front() else {
            return false;
        };
        if seq < front {
            return false;
        }
        // Sequence numbers are consecutive unless a send failed.
        let at = match self.q.get((seq - front).min(usize::MAX as u64) as usize) {
            Some(e) if e.0 == seq => Some((seq - front) as usize),
            _ => self.q.iter().position(|e| e.0 == seq),
        };
        match at.and_then(|i| self.q.get_mut(i)) {
            Some(e) if !e.2 => e.2 = true,
            _ => return false,
        }
        while matches!(self.q.front(), Some(e) if e.2) {
            self.q.pop_front();
        }
        true
    }

    /// Writes off the unanswered datagrams sent before `cutoff_ns` (at the
    /// front); returns how many.
    pub fn expire(&mut self, cutoff_ns: u64) -> usize {
        let mut n = 0;
        // Bounded by the queue's length.
        while let Some(&(_, t, answered)) = self.q.front() {
            if !answered && t >= cutoff_ns {
                break;
            }
            self.q.pop_front();
            n += usize::from(!answered);
        }
        n
    }
}

/// Open loop: how many datagrams (numbered from 0, datagram k due at
/// k / rate seconds) are due `elapsed_ns` after the schedule's start, at
/// most `limit`.
pub fn due_count(elapsed_ns: u64, rate: f64, limit: u64) -> u64 {
    let k = (elapsed_ns as f64 * rate / 1e9).floor() as u64 + 1;
    k.min(limit)
}

/// Open loop: datagrams whose due time falls before `end_ns` (schedule
/// starting at 0).
pub fn schedule_len(end_ns: u64, rate: f64) -> u64 {
    (end_ns as f64 * rate / 1e9).ceil() as u64
}

// ---- relay CPU, descendants included ---------------------------------------

/// utime + stime + cutime + cstime (clock ticks) from /proc/PID/stat: the
/// process's own CPU plus that of the children it has reaped.
pub fn parse_stat_ticks_with_children(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|x| x.parse().ok())
        .collect::<Option<Vec<u64>>>()?;
    (f.len() == 4).then(|| f.iter().sum())
}

/// CPU ticks of the process tree under each root (own + reaped children
/// of every live process in it) and how many processes that was; None if
/// a root is gone.
fn tree_ticks(roots: &[u32]) -> Option<(u64, usize)> {
    let mut ticks = 0;
    let mut procs = 0;
    for &r in roots {
        let mut all = vec![r];
        all.extend(crate::relays::descendants(r));
        for (i, p) in all.iter().enumerate() {
            match std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|t| parse_stat_ticks_with_children(&t))
            {
                Some(t) => {
                    ticks += t;
                    procs += 1;
                }
                None if i == 0 => return None,
                None => {} // exited meanwhile: its parent's cutime has it
            }
        }
    }
    Some((ticks, procs))
}

/// Relay CPU over the interval, counting the relay's descendants too, even
/// those that start or exit during it: a forking relay (Dante) creates and
/// reaps workers as associations come and go. Summing own + reaped-children
/// CPU over the live tree is conserved when a process exits and is reaped.
struct TreeMeter {
    roots: Vec<u32>,
    start: Option<(u64, usize)>,
    self_start: u64,
    t0: Instant,
}

impl TreeMeter {
    fn start(roots: &[u32]) -> TreeMeter {
        TreeMeter {
            roots: roots.to_vec(),
            start: tree_ticks(roots),
            self_start: sys::self_cpu_ticks(),
            t0: Instant::now(),
        }
    }

    /// The usage, and the number of processes counted at start and end.
    fn stop(&self) -> (CpuUsage, Option<(usize, usize)>) {
        let elapsed = self.t0.elapsed().as_secs_f64();
        let end = tree_ticks(&self.roots);
        let relay = match (self.roots.is_empty(), self.start, end) {
            (true, _, _) => None,
            (false, Some((a, pa)), Some((b, pb))) => Some((b.saturating_sub(a), (pa, pb))),
            _ => {
                eprintln!("loadgen: warning: a --pid vanished; no relay CPU figure");
                None
            }
        };
        (
            CpuUsage {
                pids: self.roots.clone(),
                relay_seconds: relay.map(|(t, _)| t as f64 / sys::CLK_TCK),
                self_seconds: sys::self_cpu_ticks().saturating_sub(self.self_start) as f64
                    / sys::CLK_TCK,
                elapsed,
            },
            relay.map(|(_, p)| p),
        )
    }
}

// ---- the event loop ----------------------------------------------------------

/// Closed loop: a datagram whose reply is this overdue is written off
/// (counted in `stalled`) and its slot in the window refilled, so lost
/// datagrams cannot shrink a window for good. A late reply still counts
/// as received.
const STALL_NS: u64 = 100_000_000;
const STALL_CHECK_NS: u64 = 20_000_000;
const CTL: u64 = 1 << 62;
const ECHO: u64 = 1 << 61;
const TIMER: u64 = 1 << 60;
/// Most datagrams an open loop sends per wake-up (it stays responsive to
/// replies even when far behind schedule).
const MAX_SEND_PER_WAKE: u64 = 4096;

struct Assoc {
    sock: UdpSocket,
    ctl: Option<TcpStream>,
    id: u32,
    seq: u64,
    inflight: InFlight,
    dead: bool,
}

#[derive(Clone, Copy)]
enum Pace {
    Closed {
        window: usize,
    },
    /// Datagrams/s of this thread, and the tick of its timer.
    Open {
        rate: f64,
        tick: Duration,
    },
}

#[derive(Clone, Copy)]
struct Plan {
    base: Instant,
    /// Traffic starts (ns since base).
    t0_ns: u64,
    span: Span,
    drain_end_ns: u64,
    size: usize,
    pace: Pace,
}

#[derive(Default)]
struct Shared {
    sent: AtomicU64,
    received: AtomicU64,
}

struct Outcome {
    tally: Tally,
    rtt: Histogram<u64>,
    lag: Histogram<u64>,
    stalls: u64,
    io_errors: Failures,
    bad_first: Option<String>,
    failures: Failures,
    echoed: u64,
}

struct Worker {
    ep: Epoll,
    assocs: Vec<Assoc>,
    echo: Option<UdpEcho>,
    /// RFC 1928 header naming this thread's target (empty when direct).
    hdr: Vec<u8>,
    target: SocketAddr,
    plan: Plan,
    tx: Mmsg,
    rx: Mmsg,
    lens: Vec<usize>,
    timer: Option<std::fs::File>,
    /// Open loop: datagrams of the schedule sent (or skipped) so far.
    k_next: u64,
    ended: bool,
    shared: Arc<Shared>,
    published: (u64, u64),
    out: Outcome,
}

fn timerfd(tick: Duration) -> io::Result<OwnedFd> {
    // SAFETY: timerfd_create takes flags and returns a new fd or -1.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned to us and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let ts = libc::timespec {
        tv_sec: tick.as_secs() as libc::time_t,
        tv_nsec: tick.subsec_nanos() as libc::c_long,
    };
    let spec = libc::itimerspec {
        it_interval: ts,
        it_value: ts,
    };
    // SAFETY: `spec` is a valid itimerspec the kernel only reads; the old
    // value pointer may be null.
    if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

impl Worker {
    fn now_ns(&self) -> u64 {
        self.plan.base.elapsed().as_nanos() as u64
    }

    fn run(mut self) -> Outcome {
        sleep_until(self.plan.base + Duration::from_nanos(self.plan.t0_ns));
        match self.plan.pace {
            Pace::Closed { .. } => {
                let now = self.now_ns();
                for i in 0..self.assocs.len() {
                    self.refill(i, now);
                }
            }
            Pace::Open { tick, .. } => match timerfd(tick) {
                Ok(fd) => {
                    if let Err(e) = self.ep.add(fd.as_raw_fd(), epoll::IN, TIMER) {
                        self.out.failures.add(format!("timer: {e}"));
                    }
                    self.timer = Some(fd.into());
                    self.send_due(self.now_ns());
                }
                Err(e) => self.out.failures.add(format!("timerfd: {e}")),
            },
        }
        let mut events = epoll::empty_events(256);
        let mut next_stall_check = self.now_ns() + STALL_CHECK_NS;
        let hard_end = self.plan.drain_end_ns + 1_000_000_000;
        // Bounded by the drain's end (and the hard end as a backstop).
        loop {
            let now = self.now_ns();
            if !self.ended && now >= self.plan.span.end_ns {
                self.ended = true;
                self.timer = None; // closing the fd removes it from the epoll set
            }
            if self.ended
                && (self.out.tally.received >= self.out.tally.sent || now >= self.plan.drain_end_ns)
            {
                break;
            }
            if now >= hard_end {
                break;
            }
            let until = match (self.ended, self.plan.pace) {
                (true, _) => self.plan.drain_end_ns,
                // The timer wakes the open loop for every send.
                (false, Pace::Open { .. }) => self.plan.span.end_ns,
                (false, Pace::Closed { .. }) => self.plan.span.end_ns.min(next_stall_check),
            };
            let timeout_ms = until.saturating_sub(now).div_ceil(1_000_000).min(100) as i32;
            let n = match self.ep.wait(&mut events, timeout_ms) {
                Ok(n) => n,
                Err(e) => {
                    self.out.failures.add(format!("epoll_wait: {e}"));
                    break;
                }
            };
            for ev in &events[..n] {
                let token = ev.u64;
                if token == ECHO {
                    if let Some(e) = self.echo.as_mut() {
                        self.out.echoed += e.drain().0 as u64;
                    }
                } else if token == TIMER {
                    self.on_tick();
                } else if token & CTL != 0 {
                    self.on_ctl((token & !CTL) as usize);
                } else {
                    self.on_readable(token as usize);
                }
            }
            if matches!(self.plan.pace, Pace::Closed { .. }) && !self.ended {
                let now = self.now_ns();
                if now >= next_stall_check {
                    next_stall_check = now + STALL_CHECK_NS;
                    self.unstall(now);
                }
            }
            self.publish();
        }
        self.publish();
        // The control connections close here, with the worker.
        self.out
    }

    fn publish(&mut self) {
        let t = &self.out.tally;
        let (s, r) = (t.sent_all, t.received_all);
        self.shared
            .sent
            .fetch_add(s - self.published.0, Ordering::Relaxed);
        self.shared
            .received
            .fetch_add(r - self.published.1, Ordering::Relaxed);
        self.published = (s, r);
    }

    /// Fills slot `j` of the send batch with a datagram of association `i`.
    fn stamp_slot(&mut self, j: usize, i: usize, now: u64) {
        let a = &mut self.assocs[i];
        let stamp = Stamp {
            sent_ns: now,
            seq: a.seq,
            assoc: a.id,
        };
        a.seq += 1;
        let h = self.hdr.len();
        let slot = self.tx.slot_mut(j);
        slot[..h].copy_from_slice(&self.hdr);
        encode_stamp(&stamp, &mut slot[h..]);
        self.lens[j] = h + self.plan.size;
    }

    /// Sends slots `0..n` on association `i`, counting what went out.
    fn send_slots(&mut self, i: usize, n: usize, now: u64) -> usize {
        let fd = self.assocs[i].sock.as_raw_fd();
        let first_seq = self.assocs[i].seq - n as u64;
        let r = self.tx.send(fd, &self.lens[..n], false);
        if let Some(e) = r.error {
            self.out.io_errors.add(format!("send: {e}"));
        }
        if let Pace::Closed { .. } = self.plan.pace {
            // Sequence numbers of datagrams that did not go out are skipped
            // (after an error in the middle of a batch these may be off by
            // one; the wrong entry is written off as stalled).
            let a = &mut self.assocs[i];
            for j in 0..r.sent as u64 {
                a.inflight.push(first_seq + j, now);
            }
        }
        self.out
            .tally
            .on_sent(r.sent as u64, self.plan.span.contains(now));
        r.sent
    }

    /// Closed loop: tops association `i` up to its window.
    fn refill(&mut self, i: usize, now: u64) {
        let Pace::Closed { window } = self.plan.pace else {
            return;
        };
        if self.assocs[i].dead || self.ended {
            return;
        }
        let mut want = window.saturating_sub(self.assocs[i].inflight.len());
        // Bounded: `want` shrinks by a batch each pass, or we stop.
        while want > 0 {
            let n = want.min(self.tx.capacity());
            for j in 0..n {
                self.stamp_slot(j, i, now);
            }
            let sent = self.send_slots(i, n, now);
            if sent < n {
                break;
            }
            want -= n;
        }
    }

    /// Closed loop: writes off windows whose replies are overdue.
    fn unstall(&mut self, now: u64) {
        for i in 0..self.assocs.len() {
            let a = &mut self.assocs[i];
            if a.dead {
                continue;
            }
            let n = a.inflight.expire(now.saturating_sub(STALL_NS));
            // Also tops up a window a failed send left short.
            if n > 0 || a.inflight.is_empty() {
                self.out.stalls += n as u64;
                self.refill(i, now);
            }
        }
    }

    fn on_tick(&mut self) {
        if let Some(fd) = &self.timer {
            let mut b = [0u8; 8];
            // The expiration count is not needed: the schedule is computed
            // from the clock. A failed read (EAGAIN) is harmless.
            let _ = (&*fd).read(&mut b);
        }
        let now = self.now_ns();
        self.send_due(now);
    }

    /// Open loop: sends every datagram of the schedule due by `now`.
    fn send_due(&mut self, now: u64) {
        let Pace::Open { rate, .. } = self.plan.pace else {
            return;
        };
        if self.ended {
            return;
        }
        let since = now.saturating_sub(self.plan.t0_ns);
        let limit = schedule_len(self.plan.span.end_ns - self.plan.t0_ns, rate);
        let due = due_count(since, rate, limit).min(self.k_next + MAX_SEND_PER_WAKE);
        let n = self.assocs.len() as u64;
        let in_window = self.plan.span.contains(now);
        // Bounded by MAX_SEND_PER_WAKE.
        while self.k_next < due {
            let k = self.k_next;
            self.k_next += 1;
            let i = (k % n) as usize;
            if self.assocs[i].dead {
                continue;
            }
            if in_window {
                let intended = (k as f64 * 1e9 / rate) as u64;
                self.out
                    .lag
                    .saturating_record(since.saturating_sub(intended).max(1));
            }
            self.stamp_slot(0, i, now);
            self.send_slots(i, 1, now);
        }
    }

    fn on_ctl(&mut self, i: usize) {
        let a = &mut self.assocs[i];
        let Some(ctl) = a.ctl.as_mut() else { return };
        let mut buf = [0u8; 256];
        let why = match ctl.read(&mut buf) {
            Ok(0) => "relay closed the control connection".to_string(),
            Ok(_) => return, // nothing is expected; ignore it
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => format!("control connection: {e}"),
        };
        self.out
            .failures
            .add(format!("association {}: {why}", a.id));
        a.ctl = None;
        a.dead = true;
    }

    fn on_readable(&mut self, i: usize) {
        let Some(fd) = self.assocs.get(i).map(|a| a.sock.as_raw_fd()) else {
            return;
        };
        let id = self.assocs[i].id;
        let proxied = !self.hdr.is_empty();
        let mut got = 0usize;
        let mut now = self.now_ns();
        // Bounded: at most 64 batches per readiness event.
        for _ in 0..64 {
            let n = match self.rx.recv(fd, 0, false) {
                Ok(n) => n,
                Err(e) => {
                    let refused = e.raw_os_error() == Some(libc::ECONNREFUSED);
                    self.out.io_errors.add(format!("recv: {e}"));
                    if refused {
                        // An earlier datagram met no socket; the error is consumed.
                        continue;
                    }
                    break;
                }
            };
            if n == 0 {
                break;
            }
            now = self.now_ns();
            for j in 0..n {
                match check_reply(
                    self.rx.datagram(j),
                    self.rx.truncated(j),
                    proxied.then_some(&self.target),
                    id,
                    self.plan.size,
                ) {
                    Ok(st) => {
                        got += 1;
                        self.assocs[i].inflight.answer(st.seq);
                        let in_window = self.plan.span.contains(st.sent_ns);
                        self.out.tally.on_reply(in_window);
                        if in_window {
                            self.out
                                .rtt
                                .saturating_record(now.saturating_sub(st.sent_ns).max(1));
                        }
                    }
                    Err(why) => {
                        self.out.tally.bad += 1;
                        if self.out.bad_first.is_none() {
                            self.out.bad_first = Some(why);
                        }
                    }
                }
            }
            if n < self.rx.capacity() {
                break;
            }
        }
        if got > 0 {
            self.refill(i, now);
        }
    }
}

/// Checks a reply received by association `assoc`: not cut off, with an
/// RFC 1928 header naming `target` when proxied (stripped), and a payload
/// of `size` bytes stamped by this association.
pub fn check_reply(
    dg: &[u8],
    truncated: bool,
    target: Option<&SocketAddr>,
    assoc: u32,
    size: usize,
) -> std::result::Result<Stamp, String> {
    if truncated {
        return Err("reply longer than expected (truncated)".into());
    }
    let payload = match target {
        None => dg,
        Some(t) => {
            let (h, off) = decode_udp_header(dg).map_err(|e| format!("reply header: {e}"))?;
            if h.frag != 0 {
                return Err(format!("reply with FRAG {}", h.frag));
            }
            if h.dst != Addr::Ip(*t) {
                return Err(format!("reply header names {}, not the target {t}", h.dst));
            }
            &dg[off..]
        }
    };
    if payload.len() != size {
        return Err(format!(
            "reply payload {} bytes, sent {size}",
            payload.len()
        ));
    }
    let st = decode_stamp(payload).ok_or("reply without our stamp")?;
    if st.assoc != assoc {
        return Err(format!(
            "reply of association {} came to association {assoc}",
            st.assoc
        ));
    }
    Ok(st)
}

// ---- setup ---------------------------------------------------------------------

/// Receive buffer of an association's socket: room for its window.
fn client_rcvbuf(window: usize, size: usize) -> usize {
    (window * (size + 1024) * 2).clamp(256 << 10, 64 << 20)
}

/// Opens association `id`: a UDP socket on 127.0.0.1, and (proxied) its
/// control connection; the socket is connected to the relay's UDP address,
/// or to `target` when direct.
fn open_assoc(
    d: &Dialer,
    id: u32,
    target: SocketAddr,
    rcvbuf: usize,
) -> std::result::Result<Assoc, String> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
        .map_err(|e| format!("socket: {e}"))?;
    set_rcvbuf(&s, rcvbuf).map_err(|e| format!("SO_RCVBUF: {e}"))?;
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .map_err(|e| format!("bind: {e}"))?;
    let sock: UdpSocket = s.into();
    let local = sock.local_addr().map_err(|e| e.to_string())?;
    let (ctl, peer) = match d.proxy {
        None => (None, target),
        Some(_) => {
            let (ctl, relay) = d
                .associate(local)
                .map_err(|e| format!("UDP ASSOCIATE: {e}"))?;
            ctl.set_nonblocking(true).map_err(|e| e.to_string())?;
            (Some(ctl), relay)
        }
    };
    sock.connect(peer)
        .map_err(|e| format!("connect {peer}: {e}"))?;
    sock.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok(Assoc {
        sock,
        ctl,
        id,
        seq: 0,
        inflight: InFlight::default(),
        dead: false,
    })
}

/// Opens associations `0..n` (association i targets `targets[i % len]`),
/// on up to 16 threads at once since each handshake is a round trip
/// through the relay. Failed ones are left out (with their error).
fn open_all(d: &Dialer, n: usize, targets: &[SocketAddr], rcvbuf: usize) -> (Vec<Assoc>, Failures) {
    let helpers = n.clamp(1, 16);
    let mut results: Vec<(usize, std::result::Result<Assoc, String>)> = thread::scope(|sc| {
        let handles: Vec<_> = (0..helpers)
            .map(|h| {
                sc.spawn(move || {
                    (h..n)
                        .step_by(helpers)
                        .map(|i| {
                            let t = targets[i % targets.len()];
                            (i, open_assoc(d, i as u32, t, rcvbuf))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    results.sort_by_key(|(i, _)| *i);
    let mut ok = Vec::with_capacity(n);
    let mut failures = Failures::default();
    for (i, r) in results {
        match r {
            Ok(a) => ok.push(a),
            Err(e) => failures.add(format!("association {i}: {e}")),
        }
    }
    (ok, failures)
}

pub fn run(a: &Args) -> Result<()> {
    let dialer = a.conn.setup()?;
    let (warmup, duration) = a.time.check()?;
    if !(1..=100_000).contains(&a.assocs) {
        return Err("--assocs must be 1..=100000".into());
    }
    if !(1..=65_536).contains(&a.window) {
        return Err("--window must be 1..=65536".into());
    }
    if !(STAMP_LEN..=65_000).contains(&a.size) {
        return Err(format!("--size must be {STAMP_LEN}..=65000").into());
    }
    if !(1..=64).contains(&a.threads) || a.threads > a.assocs {
        return Err("--threads must be 1..=64 and at most --assocs".into());
    }
    if let Some(r) = a.rate {
        if !(r > 0.0 && r <= 100_000_000.0) {
            return Err("--rate must be in (0, 1e8]".into());
        }
        sys::tight_timer_slack();
    }
    if !(0.0..=60.0).contains(&a.drain) {
        return Err("--drain must be in [0, 60]".into());
    }
    let nofile = sys::raise_nofile((2 * a.assocs + 4 * a.threads + 256) as u64)?;
    if nofile < (2 * a.assocs + 64) as u64 {
        return Err(format!(
            "RLIMIT_NOFILE is {nofile}, {} associations need ~{} fds (raise ulimit -n)",
            a.assocs,
            2 * a.assocs + 64
        )
        .into());
    }

    // One echo socket per thread (in its loop), or the external target.
    let mut echoes: Vec<Option<UdpEcho>> = Vec::new();
    let targets: Vec<SocketAddr> = match a.conn.target_addr()? {
        Some(t) => {
            echoes.resize_with(a.threads, || None);
            vec![t; a.threads]
        }
        None => {
            let mut t = Vec::new();
            for _ in 0..a.threads {
                let s = udp_echo_sockets(SocketAddr::from(([127, 0, 0, 1], 0)), 1, true)?
                    .pop()
                    .expect("one socket");
                t.push(s.local_addr()?);
                echoes.push(Some(UdpEcho::new(s)));
            }
            t
        }
    };

    let t_setup = Instant::now();
    let rcvbuf = client_rcvbuf(a.rate.map_or(a.window, |_| 16), a.size);
    let (assocs, mut failures) = open_all(&dialer, a.assocs, &targets, rcvbuf);
    let setup_secs = t_setup.elapsed().as_secs_f64();
    if assocs.is_empty() {
        return Err(format!(
            "no association could be opened ({})",
            failures.first.as_deref().unwrap_or("?")
        )
        .into());
    }
    let opened = assocs.len();

    // Association i belongs to thread i % threads (whose target it uses).
    let mut per_thread: Vec<Vec<Assoc>> = (0..a.threads).map(|_| Vec::new()).collect();
    for x in assocs {
        per_thread[x.id as usize % a.threads].push(x);
    }
    let base = Instant::now();
    let t0_ns = 50_000_000u64;
    let start_ns = t0_ns + warmup.as_nanos() as u64;
    let span = Span {
        start_ns,
        end_ns: start_ns + duration.as_nanos() as u64,
    };
    let drain_end_ns = span.end_ns + (a.drain * 1e9) as u64;
    let shared = Arc::new(Shared::default());
    let mut handles = Vec::new();
    for (t, (mine, echo)) in per_thread.into_iter().zip(echoes).enumerate() {
        if mine.is_empty() {
            continue;
        }
        let pace = match a.rate {
            None => Pace::Closed { window: a.window },
            Some(r) => {
                let rate = r * mine.len() as f64 / opened as f64;
                // About 2 datagrams per tick: a wake-up costs more than a send,
                // and bigger bursts would add to the RTT of their last datagrams.
                let tick = Duration::from_secs_f64((2.0 / rate).clamp(100e-6, 1e-3));
                Pace::Open { rate, tick }
            }
        };
        let ep = Epoll::new()?;
        for (i, x) in mine.iter().enumerate() {
            ep.add(x.sock.as_raw_fd(), epoll::IN, i as u64)?;
            if let Some(c) = &x.ctl {
                ep.add(c.as_raw_fd(), epoll::IN, CTL | i as u64)?;
            }
        }
        if let Some(e) = &echo {
            ep.add(e.sock.as_raw_fd(), epoll::IN, ECHO)?;
        }
        let mut hdr = Vec::new();
        if dialer.proxy.is_some() {
            encode_udp_header_addr(0, &Addr::Ip(targets[t]), &mut hdr);
        }
        let slot = hdr.len() + a.size;
        let batch = match pace {
            Pace::Closed { window } => window.min(MMSG_BATCH),
            Pace::Open { .. } => 1,
        };
        let mut tx = Mmsg::new(batch, slot);
        tx.gso = !a.no_gso;
        for j in 0..batch {
            tx.slot_mut(j).fill(FILL);
        }
        let w = Worker {
            ep,
            assocs: mine,
            echo,
            hdr,
            target: targets[t],
            plan: Plan {
                base,
                t0_ns,
                span,
                drain_end_ns,
                size: a.size,
                pace,
            },
            tx,
            // One spare byte per slot shows an oversized reply as truncated.
            rx: Mmsg::new(MMSG_BATCH, slot + 1),
            lens: vec![0; batch],
            timer: None,
            k_next: 0,
            ended: false,
            shared: shared.clone(),
            published: (0, 0),
            out: Outcome {
                tally: Tally::default(),
                rtt: new_histogram(),
                lag: new_histogram(),
                stalls: 0,
                io_errors: Failures::default(),
                bad_first: None,
                failures: Failures::default(),
                echoed: 0,
            },
        };
        handles.push(
            thread::Builder::new()
                .name(format!("udp-{t}"))
                .spawn(move || w.run())?,
        );
    }

    let progress = {
        let shared = shared.clone();
        let mut last = (0, 0);
        let warm = (t0_ns as f64 / 1e9) + warmup.as_secs_f64();
        Progress::start(
            !a.conn.quiet,
            warmup + duration + Duration::from_secs_f64(a.drain),
            move |t| {
                let now = (
                    shared.sent.load(Ordering::Relaxed),
                    shared.received.load(Ordering::Relaxed),
                );
                let line = format!(
                    "{}{} dgram/s sent, {} dgram/s echoed",
                    if t < warm { "(warmup) " } else { "" },
                    now.0 - last.0,
                    now.1 - last.1
                );
                last = now;
                line
            },
        )
    };
    sleep_until(base + Duration::from_nanos(span.start_ns));
    let meter = TreeMeter::start(&a.conn.pids);
    sleep_until(base + Duration::from_nanos(span.end_ns));
    let (usage, procs) = meter.stop();

    let mut tally = Tally::default();
    let mut rtt = new_histogram();
    let mut lag = new_histogram();
    let mut stalls = 0;
    let mut io_errors = Failures::default();
    let mut bad_first = None;
    let mut echoed = 0;
    for h in handles {
        match h.join() {
            Ok(o) => {
                tally.merge(&o.tally);
                rtt.add(o.rtt).expect("same bounds");
                lag.add(o.lag).expect("same bounds");
                stalls += o.stalls;
                io_errors.merge(o.io_errors);
                bad_first = bad_first.or(o.bad_first);
                failures.merge(o.failures);
                echoed += o.echoed;
            }
            Err(_) => failures.add("worker thread panicked"),
        }
    }
    progress.stop();

    let secs = duration.as_secs_f64();
    let dps = tally.received as f64 / secs;
    let (lost, loss_frac) = tally.loss();
    let open = a.rate.is_some();
    let mut summary = format!(
        "{opened} association(s) on {} thread(s), {} B payload, {}, {}, {secs:.1} s after {:.1} s warmup (setup {setup_secs:.2} s)\n",
        a.threads,
        a.size,
        match a.rate {
            Some(r) => format!("open loop at {r} dgram/s"),
            None => format!("closed loop, window {}", a.window),
        },
        via_line(&dialer),
        warmup.as_secs_f64()
    );
    summary += &format!(
        "{dps:.0} datagrams/s echoed ({:.3} Gbit/s of payload each way), {:.0} sent/s\n",
        dps * a.size as f64 * 8e-9,
        tally.sent as f64 / secs
    );
    summary += &format!(
        "loss: {lost} of {} ({:.4}%) after a {:.1} s drain\n",
        tally.sent,
        100.0 * loss_frac,
        a.drain
    );
    summary += &latency_line("rtt", &rtt);
    summary.push('\n');
    if open {
        summary += &latency_line("send lag", &lag);
        summary.push('\n');
    }
    if tally.bad > 0 {
        summary += &format!(
            "BAD REPLIES: {} ({})\n",
            tally.bad,
            bad_first.as_deref().unwrap_or("")
        );
    }
    if stalls > 0 {
        summary += &format!(
            "written off after {} ms without a reply (window refilled): {stalls} datagrams\n",
            STALL_NS / 1_000_000
        );
    }
    if io_errors.count > 0 {
        summary += &format!(
            "I/O errors: {} ({})\n",
            io_errors.count,
            io_errors.first.as_deref().unwrap_or("")
        );
    }
    summary += &failures.summary_line();
    summary += &usage.summary_lines(&[("µs/datagram", tally.received as f64, 1e6)]);

    let mut relay_cpu = usage.relay_json(&[("per_datagram", tally.received as f64)]);
    if let (Some(o), Some((p0, p1))) = (relay_cpu.as_object_mut(), procs) {
        o.insert("descendants".into(), json!(true));
        o.insert("processes".into(), json!({"start": p0, "end": p1}));
    }
    let report = Report {
        mode: "udp",
        target: a.conn.target_json(&dialer),
        params: json!({
            "assocs": a.assocs,
            "threads": a.threads,
            "size": a.size,
            "loop": if open { "open" } else { "closed" },
            "window": if open { Value::Null } else { json!(a.window) },
            "rate": a.rate,
            "duration": a.time.duration,
            "warmup": a.time.warmup,
            "drain": a.drain,
            "gso": !a.no_gso,
            "udp_targets": targets.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
            "rlimit_nofile": nofile,
        }),
        results: json!({
            "elapsed_seconds": secs,
            "associations": opened,
            "setup_seconds": setup_secs,
            "sent": tally.sent,
            "received": tally.received,
            "datagrams_per_sec": dps,
            "sent_per_sec": tally.sent as f64 / secs,
            "gbps": dps * a.size as f64 * 8e-9,
            "loss": {"count": lost, "fraction": loss_frac},
            "excess": tally.excess(),
            "rtt": latency_json(&rtt),
            "send_lag": if open { latency_json(&lag) } else { Value::Null },
            "bad_replies": {"count": tally.bad, "first": bad_first},
            "stalled": stalls,
            "io_errors": io_errors.json(),
            "sent_total": tally.sent_all,
            "received_total": tally.received_all,
            "target_echoed": if echoed > 0 { json!(echoed) } else { Value::Null },
            "failures": failures.json(),
            "loadgen_cpu_seconds": usage.self_seconds,
        }),
        relay_cpu,
        summary,
    };
    report.emit(a.conn.json.as_deref())?;
    if failures.count > 0 {
        return Err(format!("{} association failure(s)", failures.count).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trip() {
        let s = Stamp {
            sent_ns: 0x0102_0304_0506_0708,
            seq: u64::MAX - 3,
            assoc: 1999,
        };
        let mut b = vec![FILL; 64];
        encode_stamp(&s, &mut b);
        assert_eq!(decode_stamp(&b), Some(s));
        assert_eq!(decode_stamp(&b[..STAMP_LEN]), Some(s));
        assert_eq!(decode_stamp(&b[..STAMP_LEN - 1]), None);
        b[21] ^= 1; // magic
        assert_eq!(decode_stamp(&b), None);
        assert_eq!(decode_stamp(&[FILL; 64]), None);
    }

    #[test]
    fn replies_are_checked_and_stripped() {
        let target: SocketAddr = "127.0.0.1:7007".parse().unwrap();
        let st = Stamp {
            sent_ns: 5,
            seq: 1,
            assoc: 3,
        };
        let mut payload = vec![FILL; 64];
        encode_stamp(&st, &mut payload);
        assert_eq!(check_reply(&payload, false, None, 3, 64), Ok(st));
        assert!(check_reply(&payload, true, None, 3, 64).is_err());
        assert!(check_reply(&payload, false, None, 4, 64)
            .unwrap_err()
            .contains("association 3"));
        assert!(check_reply(&payload[..40], false, None, 3, 64).is_err());
        let mut dg = Vec::new();
        encode_udp_header_addr(0, &Addr::Ip(target), &mut dg);
        assert_eq!(dg.len(), 10);
        dg.extend_from_slice(&payload);
        assert_eq!(check_reply(&dg, false, Some(&target), 3, 64), Ok(st));
        let other: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert!(check_reply(&dg, false, Some(&other), 3, 64)
            .unwrap_err()
            .contains("not the target"));
        // Without the header the payload is not a valid header.
        assert!(check_reply(&payload, false, Some(&target), 3, 64).is_err());
        dg[2] = 1; // FRAG
        assert!(check_reply(&dg, false, Some(&target), 3, 64).is_err());
    }

    #[test]
    fn loss_accounting() {
        let span = Span {
            start_ns: 100,
            end_ns: 200,
        };
        let mut t = Tally::default();
        t.on_sent(10, span.contains(50)); // warmup
        t.on_sent(8, span.contains(100));
        t.on_sent(2, span.contains(199));
        t.on_sent(5, span.contains(200)); // after the interval
        for sent_at in [50, 100, 100, 150, 150, 150, 150, 150, 199, 250] {
            t.on_reply(span.contains(sent_at));
        }
        assert_eq!((t.sent, t.received), (10, 8));
        assert_eq!((t.sent_all, t.received_all), (25, 10));
        assert_eq!(t.loss(), (2, 0.2));
        assert_eq!(t.excess(), 0);
        let mut u = Tally::default();
        u.on_sent(1, true);
        u.on_reply(true);
        u.on_reply(true); // a duplicate
        assert_eq!(u.loss(), (0, 0.0));
        assert_eq!(u.excess(), 1);
        t.merge(&u);
        assert_eq!((t.sent, t.received, t.received_all), (11, 10, 12));
        assert_eq!(Tally::default().loss(), (0, 0.0));
    }

    #[test]
    fn window_bookkeeping() {
        let mut w = InFlight::default();
        assert!(!w.answer(0));
        for seq in 0..4 {
            w.push(seq, 100 + seq);
        }
        assert_eq!(w.len(), 4);
        assert!(w.answer(0));
        assert_eq!(w.len(), 3);
        // Out of order: 2 is answered but 1 still holds the front.
        assert!(w.answer(2));
        assert_eq!(w.len(), 3);
        assert!(!w.answer(2), "duplicate");
        assert!(w.answer(1));
        assert_eq!(w.len(), 1);
        // A gap in the sequence (a send failed).
        w.push(9, 200);
        assert!(w.answer(9));
        assert_eq!(w.len(), 2);
        // 3 (sent at 103) is overdue at cutoff 150; 9 was answered.
        assert_eq!(w.expire(150), 1);
        assert_eq!(w.len(), 0);
        assert!(!w.answer(3), "written off: a late reply frees no slot");
        w.push(10, 300);
        assert_eq!(w.expire(300), 0);
        assert_eq!(w.expire(301), 1);
    }

    #[test]
    fn open_loop_schedule() {
        // 1000/s: datagram k is due at k ms.
        assert_eq!(due_count(0, 1000.0, 100), 1);
        assert_eq!(due_count(999_999, 1000.0, 100), 1);
        assert_eq!(due_count(1_000_000, 1000.0, 100), 2);
        assert_eq!(due_count(10_000_000_000, 1000.0, 100), 100);
        // Due times 0, 1, ... 9 ms fall before 10 ms; 10 datagrams.
        assert_eq!(schedule_len(10_000_000, 1000.0), 10);
        assert_eq!(schedule_len(10_000_001, 1000.0), 11);
    }

    #[test]
    fn stat_with_children() {
        let stat = "4242 (dan ted) S 1 4242 4242 0 -1 4194560 2755 0 0 0 \
                    100 20 7 3 20 0 3 0 12345 123456789 2048";
        assert_eq!(parse_stat_ticks_with_children(stat), Some(130));
        assert_eq!(parse_stat_ticks_with_children("1 (x) S 1 2 3"), None);
        let me = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(parse_stat_ticks_with_children(&me).is_some());
    }

    #[test]
    fn receive_buffer_fits_the_window() {
        assert_eq!(client_rcvbuf(1, 64), 256 << 10);
        assert!(client_rcvbuf(256, 1400) >= 256 * 1400);
        assert_eq!(client_rcvbuf(65_536, 65_000), 64 << 20);
    }
}
