//! tcp-throughput: N parallel bulk streams through the proxy.
//!
//! Bytes are counted where they are read: upload at the in-process discard
//! server, download by the client's reader threads. Bytes still parked in
//! socket buffers when the interval ends are never counted.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{
    sleep_until, via_line, ConnArgs, Failures, Progress, Report, Result, TimeArgs,
};
use crate::cpu::CpuMeter;
use crate::serve::{any_port, Counters, Spec, Target, BULK_BUF};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// client → target
    Upload,
    /// target → client
    Download,
    /// N upload and N download streams at once
    Both,
}

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub time: TimeArgs,
    /// Parallel streams (per direction)
    #[arg(long, default_value_t = 1)]
    pub streams: usize,
    #[arg(long, value_enum, default_value_t = Direction::Upload)]
    pub direction: Direction,
}

struct Stream {
    sock: TcpStream,
    handle: JoinHandle<std::io::Result<()>>,
}

fn spawn_stream(
    sock: TcpStream,
    upload: bool,
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Result<Stream> {
    let mut s = sock.try_clone()?;
    let handle = thread::Builder::new()
        .name(if upload { "upload" } else { "download" }.into())
        .spawn(move || {
            let mut buf = vec![0u8; BULK_BUF];
            // Ends when `stop` is set: the main thread then shuts the socket
            // down, which unblocks the read or write.
            while !stop.load(Ordering::Relaxed) {
                let r = if upload {
                    s.write(&buf)
                } else {
                    s.read(&mut buf)
                };
                match r {
                    Ok(0) if !stop.load(Ordering::Relaxed) => {
                        return Err(std::io::Error::other("connection closed by peer"))
                    }
                    Ok(n) => {
                        if !upload {
                            count.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                    Err(e) if !stop.load(Ordering::Relaxed) => return Err(e),
                    Err(_) => break,
                }
            }
            Ok(())
        })?;
    Ok(Stream { sock, handle })
}

fn rates(deltas: &[u64], secs: f64) -> Value {
    let gbps: Vec<f64> = deltas
        .iter()
        .map(|&b| b as f64 * 8.0 / secs / 1e9)
        .collect();
    let total: u64 = deltas.iter().sum();
    let min = gbps.iter().copied().fold(f64::INFINITY, f64::min);
    let max = gbps.iter().copied().fold(0.0, f64::max);
    json!({
        "bytes": total,
        "gbps": total as f64 * 8.0 / secs / 1e9,
        "per_stream_gbps": gbps,
        "per_stream": {
            "mean": if gbps.is_empty() { 0.0 } else { gbps.iter().sum::<f64>() / gbps.len() as f64 },
            "min": if gbps.is_empty() { 0.0 } else { min },
            "max": max,
        },
    })
}

fn sum(v: &[Arc<AtomicU64>]) -> u64 {
    v.iter().map(|c| c.load(Ordering::Relaxed)).sum()
}

pub fn run(a: &Args) -> Result<()> {
    let dialer = a.conn.setup()?;
    let (warmup, duration) = a.time.check()?;
    if !(1..=1024).contains(&a.streams) {
        return Err("--streams must be 1..=1024".into());
    }
    let up = matches!(a.direction, Direction::Upload | Direction::Both);
    let down = matches!(a.direction, Direction::Download | Direction::Both);
    let external = a.conn.target_addr()?;
    if up && external.is_some() {
        return Err(
            "upload is counted at the receiver, so it needs the in-process target: drop --target"
                .into(),
        );
    }
    let target = match external {
        Some(_) => None,
        None => Some(Target::start(&Spec {
            discard: if up { any_port() } else { None },
            source: if down { any_port() } else { None },
            ..Spec::default()
        })?),
    };
    let counters: Arc<Counters> = target
        .as_ref()
        .map(|t| t.counters.clone())
        .unwrap_or_default();
    let discard_addr: Option<SocketAddr> = target.as_ref().and_then(|t| t.discard);
    let source_addr: Option<SocketAddr> = external.or(target.as_ref().and_then(|t| t.source));

    let stop = Arc::new(AtomicBool::new(false));
    let mut streams = Vec::new();
    let mut down_counts: Vec<Arc<AtomicU64>> = Vec::new();
    for _ in 0..a.streams {
        if let Some(addr) = discard_addr {
            let (s, _) = dialer.dial(addr, false)?;
            s.set_read_timeout(None)?;
            s.set_write_timeout(Some(Duration::from_secs(10)))?;
            streams.push(spawn_stream(s, true, Arc::default(), stop.clone())?);
        }
        if let Some(addr) = source_addr {
            let (s, leftover) = dialer.dial(addr, false)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let c = Arc::new(AtomicU64::new(leftover.len() as u64));
            down_counts.push(c.clone());
            streams.push(spawn_stream(s, false, c, stop.clone())?);
        }
    }

    let t_start = Instant::now();
    let progress = {
        let counters = counters.clone();
        let down_counts = down_counts.clone();
        let mut last = 0u64;
        let mut last_t = 0.0;
        Progress::start(!a.conn.quiet, warmup + duration, move |t| {
            let now = counters.discard_total() + sum(&down_counts);
            let rate = (now - last) as f64 * 8.0 / (t - last_t) / 1e9;
            last = now;
            last_t = t;
            format!("{rate:.2} Gbit/s")
        })
    };
    sleep_until(t_start + warmup);
    let up0 = counters.discard_snapshot();
    let down0: Vec<u64> = down_counts
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .collect();
    let t0 = Instant::now();
    let cpu = CpuMeter::start(&a.conn.pids);
    sleep_until(t0 + duration);
    let up1 = counters.discard_snapshot();
    let down1: Vec<u64> = down_counts
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .collect();
    let secs = t0.elapsed().as_secs_f64();
    let usage = cpu.stop();
    progress.stop();

    stop.store(true, Ordering::Relaxed);
    for s in &streams {
        let _ = s.sock.shutdown(Shutdown::Both);
    }
    let mut failures = Failures::default();
    for s in streams {
        match s.handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.add(e),
            Err(_) => failures.add("stream thread panicked"),
        }
    }

    let delta = |a: &[u64], b: &[u64]| -> Vec<u64> {
        let mut d: Vec<u64> = b
            .iter()
            .enumerate()
            .map(|(i, &x)| x - a.get(i).copied().unwrap_or(0))
            .collect();
        // A stream that never reached the target counts as 0.
        d.resize(d.len().max(a.len()), 0);
        d
    };
    let mut up_d = delta(&up0, &up1);
    if up {
        up_d.resize(up_d.len().max(a.streams), 0);
    }
    let down_d = delta(&down0, &down1);
    let up_bytes: u64 = up_d.iter().sum();
    let down_bytes: u64 = down_d.iter().sum();
    let total = up_bytes + down_bytes;
    let gbps = |b: u64| b as f64 * 8.0 / secs / 1e9;
    let gb = total as f64 / 1e9;

    let mut summary = format!(
        "{} stream(s) {:?}, {}, {secs:.2} s measured after {:.1} s warmup\n",
        a.streams,
        a.direction,
        via_line(&dialer),
        warmup.as_secs_f64()
    );
    let per_line = |name: &str, d: &[u64]| {
        let g: Vec<f64> = d.iter().map(|&b| gbps(b)).collect();
        let min = g.iter().copied().fold(f64::INFINITY, f64::min);
        let max = g.iter().copied().fold(0.0, f64::max);
        format!(
            "{name}: {:.2} Gbit/s total, per stream {:.2} mean / {:.2} min / {:.2} max\n",
            gbps(d.iter().sum()),
            gbps(d.iter().sum()) / g.len().max(1) as f64,
            if g.is_empty() { 0.0 } else { min },
            max
        )
    };
    if up {
        summary += &per_line("upload", &up_d);
    }
    if down {
        summary += &per_line("download", &down_d);
    }
    if up && down {
        summary += &format!("total: {:.2} Gbit/s\n", gbps(total));
    }
    summary += &failures.summary_line();
    summary += &usage.summary_lines(&[("CPU-s/GB", gb, 1.0)]);

    let report = Report {
        mode: "tcp-throughput",
        target: a.conn.target_json(&dialer),
        params: json!({
            "streams": a.streams,
            "direction": format!("{:?}", a.direction).to_lowercase(),
            "duration": a.time.duration,
            "warmup": a.time.warmup,
            "buffer_bytes": BULK_BUF,
        }),
        results: json!({
            "elapsed_seconds": secs,
            "upload": if up { rates(&up_d, secs) } else { Value::Null },
            "download": if down { rates(&down_d, secs) } else { Value::Null },
            "total_bytes": total,
            "total_gbps": gbps(total),
            "failures": failures.json(),
            "loadgen_cpu_seconds": usage.self_seconds,
        }),
        relay_cpu: usage.relay_json(&[("per_gb", gb)]),
        summary,
    };
    report.emit(a.conn.json.as_deref())?;
    if failures.count > 0 {
        return Err(format!("{} stream(s) failed", failures.count).into());
    }
    Ok(())
}
