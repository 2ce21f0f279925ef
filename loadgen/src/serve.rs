//! The target servers: TCP echo, discard, source and hold, UDP echo.
//!
//! Blocking I/O on a pool of threads that grows on demand: each worker
//! accepts a connection, serves it to the end and accepts again. One
//! thread per live connection is the cheapest way to serve ping-pong and
//! bulk streams (no readiness round trip), and keeping workers around
//! makes short connections (tcp-cps) cost no thread creation.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
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
                let s = UdpSocket::bind(addr)?;
                let local = s.local_addr()?;
                let c = counters.clone();
                thread::Builder::new()
                    .name("udp-echo".into())
                    .spawn(move || udp_echo_loop(s, c))?;
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

fn udp_echo_loop(s: UdpSocket, c: Arc<Counters>) {
    let mut buf = vec![0u8; 65536];
    loop {
        if let Ok((n, peer)) = s.recv_from(&mut buf) {
            c.udp_packets.fetch_add(1, Ordering::Relaxed);
            c.udp_bytes.fetch_add(n as u64, Ordering::Relaxed);
            let _ = s.send_to(&buf[..n], peer);
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
    };
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
