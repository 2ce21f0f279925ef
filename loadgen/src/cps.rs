//! tcp-cps: connection setup rate. Each of C slots loops: connect, SOCKS
//! handshake and CONNECT, send 1 byte, wait for its echo, close.
//!
//! One thread runs all C client connections *and* the in-process echo
//! target on a single epoll loop (non-blocking sockets, edge-triggered),
//! so the generator pays only syscalls, never thread switches: on one
//! core it outruns a relay on another.
//!
//! Closing is abortive (SO_LINGER 0, an RST): the client socket never
//! enters TIME_WAIT, so long runs do not run out of ephemeral ports on
//! the client side; the echo target then just sees the reset and closes.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use ringsocks::proto::client::{ClientHandshake, ClientStep};
use ringsocks::proto::{Addr, Command};
use serde_json::json;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::common::{
    latency_json, latency_line, new_histogram, record, via_line, ConnArgs, Dialer, Failures,
    Progress, Report, Result, TimeArgs,
};
use crate::cpu::CpuMeter;
use crate::epoll::{self, Epoll};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub time: TimeArgs,
    /// Connections in progress at once
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
}

/// A connection that takes longer than this counts as failed.
const CONN_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before a slot retries after a failure (no spinning on a refusing server).
const BACKOFF: Duration = Duration::from_millis(1);
const LISTENER: u64 = 1 << 62;
const SERVER: u64 = 1 << 61;

enum Phase {
    Idle { retry_at: Instant },
    Connecting,
    Handshake(Box<ClientHandshake>),
    Echo,
}

struct Slot {
    sock: Option<Socket>,
    phase: Phase,
    t0: Instant,
    setup: Duration,
}

struct Stats {
    ok: u64,
    setup: Histogram<u64>,
    total: Histogram<u64>,
    failures: Failures,
}

struct Loop<'a> {
    ep: Epoll,
    d: &'a Dialer,
    /// Where client sockets connect: the proxy, or the target when direct.
    connect_to: SockAddr,
    dst: SocketAddr,
    slots: Vec<Slot>,
    /// In-process echo target: accepted sockets by index.
    listener: Option<Socket>,
    served: Vec<Option<Socket>>,
    free: Vec<usize>,
    buf: Vec<u8>,
    out: Vec<u8>,
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// Writes all of a tiny message to a fresh socket (its send buffer is
/// empty, so anything short is an error).
fn send_all(s: &Socket, b: &[u8]) -> io::Result<()> {
    let n = (&*s).write(b)?;
    if n != b.len() {
        return Err(io::Error::other("short write"));
    }
    Ok(())
}

impl Loop<'_> {
    fn start(&mut self, i: usize) -> io::Result<()> {
        let slot = &mut self.slots[i];
        slot.t0 = Instant::now();
        slot.sock = None;
        let s = Socket::new(
            Domain::for_address(self.dst),
            Type::STREAM.nonblocking(),
            Some(Protocol::TCP),
        )?;
        // No TCP_NODELAY: every message waits for the peer's answer, so
        // Nagle never holds one back, and the setsockopt would cost a syscall.
        match s.connect(&self.connect_to) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        self.ep
            .add(s.as_raw_fd(), epoll::IN | epoll::OUT | epoll::ET, i as u64)?;
        slot.sock = Some(s);
        slot.phase = Phase::Connecting;
        Ok(())
    }

    /// Advances slot `i` as far as it goes; Ok(true) when its echo came back.
    fn drive(&mut self, i: usize, events: u32) -> io::Result<bool> {
        let slot = &mut self.slots[i];
        let Some(s) = slot.sock.as_ref() else {
            return Ok(false);
        };
        // Bounded: each pass either moves to a later phase, or returns.
        for _ in 0..8 {
            match &mut slot.phase {
                Phase::Idle { .. } => return Ok(false),
                Phase::Connecting => {
                    if events & (epoll::ERR | epoll::HUP) != 0 {
                        return Err(s
                            .take_error()?
                            .unwrap_or_else(|| io::ErrorKind::ConnectionReset.into()));
                    }
                    if events & epoll::OUT == 0 {
                        return Ok(false); // not connected yet
                    }
                    match self.d.proxy {
                        None => {
                            slot.setup = slot.t0.elapsed();
                            send_all(s, b"x")?;
                            slot.phase = Phase::Echo;
                        }
                        Some(_) => {
                            let mut hs = ClientHandshake::new(
                                Addr::Ip(self.dst),
                                Command::CONNECT,
                                self.d.creds.clone(),
                            )
                            .pipelined(self.d.pipeline);
                            self.out.clear();
                            hs.start(&mut self.out);
                            send_all(s, &self.out)?;
                            slot.phase = Phase::Handshake(Box::new(hs));
                        }
                    }
                }
                Phase::Handshake(hs) => {
                    let n = match (&*s).read(&mut self.buf) {
                        Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                        Ok(n) => n,
                        Err(e) if would_block(&e) => return Ok(false),
                        Err(e) => return Err(e),
                    };
                    self.out.clear();
                    let step = hs
                        .advance(&self.buf[..n], &mut self.out)
                        .map_err(|e| io::Error::other(format!("socks: {e}")))?;
                    if !self.out.is_empty() {
                        send_all(s, &self.out)?;
                    }
                    if let ClientStep::Done { consumed, .. } = step {
                        if consumed != n {
                            return Err(io::Error::other("echo target sent data first"));
                        }
                        slot.setup = slot.t0.elapsed();
                        send_all(s, b"x")?;
                        slot.phase = Phase::Echo;
                    }
                }
                Phase::Echo => {
                    return match (&*s).read(&mut self.buf) {
                        Ok(0) => Err(io::ErrorKind::UnexpectedEof.into()),
                        Ok(_) => Ok(true),
                        Err(e) if would_block(&e) => Ok(false),
                        Err(e) => Err(e),
                    };
                }
            }
        }
        Ok(false)
    }

    /// Ends slot `i`'s connection (abortively) and records it.
    fn finish(&mut self, i: usize, r: io::Result<()>, st: &mut Stats, window: (Instant, Instant)) {
        let slot = &mut self.slots[i];
        if let Some(s) = slot.sock.take() {
            let _ = s.set_linger(Some(Duration::ZERO));
        }
        let now = Instant::now();
        let counted = slot.t0 >= window.0 && now < window.1;
        match r {
            Ok(()) => {
                if counted {
                    st.ok += 1;
                    record(&mut st.setup, slot.setup);
                    record(&mut st.total, now - slot.t0);
                }
                slot.phase = Phase::Idle { retry_at: now };
            }
            Err(e) => {
                if counted {
                    st.failures.add(e);
                }
                slot.phase = Phase::Idle {
                    retry_at: now + BACKOFF,
                };
            }
        }
    }

    fn accept_all(&mut self) {
        let Some(l) = self.listener.as_ref() else {
            return;
        };
        // Level-triggered listener: take a batch, the rest comes next round.
        for _ in 0..256 {
            let s = match l.accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) {
                Ok((s, _)) => s,
                Err(_) => return,
            };
            let idx = self.free.pop().unwrap_or_else(|| {
                self.served.push(None);
                self.served.len() - 1
            });
            if self
                .ep
                .add(s.as_raw_fd(), epoll::IN | epoll::ET, SERVER | idx as u64)
                .is_ok()
            {
                self.served[idx] = Some(s);
            } else {
                self.free.push(idx);
            }
        }
    }

    /// Echo side: read what is there, send it back; close on EOF or error.
    fn serve(&mut self, idx: usize) {
        let Some(s) = self.served.get(idx).and_then(|s| s.as_ref()) else {
            return;
        };
        // Bounded: small messages; at most a few reads before WouldBlock.
        let mut close = true;
        for _ in 0..64 {
            match (&*s).read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => {
                    if send_all(s, &self.buf[..n]).is_err() {
                        break;
                    }
                }
                Err(e) if would_block(&e) => {
                    close = false;
                    break;
                }
                Err(_) => break,
            }
        }
        if close {
            self.served[idx] = None;
            self.free.push(idx);
        }
    }
}

fn event_loop(
    d: &Dialer,
    dst_external: Option<SocketAddr>,
    concurrency: usize,
    start: Instant,
    end: Instant,
    done: &AtomicU64,
) -> Result<Stats> {
    let listener = match dst_external {
        Some(_) => None,
        None => {
            let l = Socket::from(crate::serve::listen_tcp(SocketAddr::from((
                [127, 0, 0, 1],
                0,
            )))?);
            l.set_nonblocking(true)?;
            Some(l)
        }
    };
    let dst = match (&listener, dst_external) {
        (_, Some(t)) => t,
        (Some(l), None) => l
            .local_addr()?
            .as_socket()
            .ok_or("listener has no address")?,
        (None, None) => unreachable!(),
    };
    let mut lp = Loop {
        ep: Epoll::new()?,
        d,
        connect_to: d.proxy.unwrap_or(dst).into(),
        dst,
        slots: (0..concurrency)
            .map(|_| Slot {
                sock: None,
                phase: Phase::Idle {
                    retry_at: Instant::now(),
                },
                t0: Instant::now(),
                setup: Duration::ZERO,
            })
            .collect(),
        listener,
        served: Vec::new(),
        free: Vec::new(),
        buf: vec![0u8; 4096],
        out: Vec::with_capacity(600),
    };
    if let Some(l) = &lp.listener {
        lp.ep.add(l.as_raw_fd(), epoll::IN, LISTENER)?;
    }
    let mut st = Stats {
        ok: 0,
        setup: new_histogram(),
        total: new_histogram(),
        failures: Failures::default(),
    };
    let window = (start, end);
    let mut events = epoll::empty_events(1024);
    let mut next_scan = Instant::now();
    // Bounded by `end`.
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if now >= next_scan {
            next_scan = now + Duration::from_millis(1);
            for i in 0..lp.slots.len() {
                match lp.slots[i].phase {
                    Phase::Idle { retry_at } if retry_at <= now => {
                        if let Err(e) = lp.start(i) {
                            lp.finish(i, Err(e), &mut st, window);
                        }
                    }
                    Phase::Idle { .. } => {}
                    _ if now - lp.slots[i].t0 > CONN_TIMEOUT => {
                        let e = io::Error::new(io::ErrorKind::TimedOut, "connection timed out");
                        lp.finish(i, Err(e), &mut st, window);
                    }
                    _ => {}
                }
            }
        }
        let n = lp.ep.wait(&mut events, 1)?;
        for ev in &events[..n] {
            let token = ev.u64;
            if token == LISTENER {
                lp.accept_all();
            } else if token & SERVER != 0 {
                lp.serve((token & !SERVER) as usize);
            } else {
                let i = token as usize;
                match lp.drive(i, ev.events) {
                    Ok(false) => {}
                    Ok(true) => {
                        lp.finish(i, Ok(()), &mut st, window);
                        if lp.slots[i].t0 >= start {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        // Restart at once instead of waiting for the scan.
                        if let Err(e) = lp.start(i) {
                            lp.finish(i, Err(e), &mut st, window);
                        }
                    }
                    Err(e) => lp.finish(i, Err(e), &mut st, window),
                }
            }
        }
    }
    Ok(st)
}

pub fn run(a: &Args) -> Result<()> {
    let mut dialer = a.conn.setup()?;
    dialer.timeout = Duration::from_secs(2);
    let (warmup, duration) = a.time.check()?;
    if !(1..=4096).contains(&a.concurrency) {
        return Err("--concurrency must be 1..=4096".into());
    }
    let external = a.conn.target_addr()?;
    let t_start = Instant::now() + Duration::from_millis(10);
    let start = t_start + warmup;
    let end = start + duration;
    let done = Arc::new(AtomicU64::new(0));
    let progress = {
        let done = done.clone();
        let mut last = 0;
        Progress::start(!a.conn.quiet, warmup + duration, move |t| {
            let now = done.load(Ordering::Relaxed);
            let line = if t < warmup.as_secs_f64() + 0.01 {
                "warming up".to_string()
            } else {
                format!("{} conn/s", now - last)
            };
            last = now;
            line
        })
    };
    // The CPU meter runs on its own thread so it brackets exactly the window.
    let pids = a.conn.pids.clone();
    let meter = std::thread::spawn(move || {
        crate::common::sleep_until(start);
        let cpu = CpuMeter::start(&pids);
        crate::common::sleep_until(end);
        cpu.stop()
    });
    crate::common::sleep_until(t_start);
    let st = event_loop(&dialer, external, a.concurrency, start, end, &done);
    let usage = meter.join().map_err(|_| "cpu meter panicked")?;
    progress.stop();
    let st = st?;
    let (ok, setup, total, failures) = (st.ok, st.setup, st.total, st.failures);
    let secs = duration.as_secs_f64();
    let cps = ok as f64 / secs;

    let mut summary = format!(
        "concurrency {}, {}, {secs:.1} s after {:.1} s warmup\n",
        a.concurrency,
        via_line(&dialer),
        warmup.as_secs_f64()
    );
    summary += &format!("{cps:.0} connections/s ({ok} completed)\n");
    summary += &format!(
        "failures: {}{}\n",
        failures.count,
        failures
            .first
            .as_deref()
            .map_or(String::new(), |e| format!(" (first: {e})"))
    );
    summary += &latency_line("setup (connect+handshake)", &setup);
    summary.push('\n');
    summary += &latency_line("setup + 1-byte echo", &total);
    summary.push('\n');
    summary += &usage.summary_lines(&[("µs/conn", ok as f64, 1e6)]);

    let report = Report {
        mode: "tcp-cps",
        target: a.conn.target_json(&dialer),
        params: json!({
            "concurrency": a.concurrency,
            "duration": a.time.duration,
            "warmup": a.time.warmup,
            "close": "rst",
        }),
        results: json!({
            "elapsed_seconds": secs,
            "completed": ok,
            "conns_per_sec": cps,
            "failures": failures.json(),
            "setup": latency_json(&setup),
            "total": latency_json(&total),
            "loadgen_cpu_seconds": usage.self_seconds,
        }),
        relay_cpu: usage.relay_json(&[("per_conn", ok as f64)]),
        summary,
    };
    report.emit(a.conn.json.as_deref())
}
