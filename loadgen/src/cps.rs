//! tcp-cps: connection setup rate. Each of C workers loops: connect, SOCKS
//! handshake and CONNECT, send 1 byte, wait for its echo, close.
//!
//! Closing is abortive (SO_LINGER 0, an RST): the client socket never
//! enters TIME_WAIT, so long runs do not run out of ephemeral ports on
//! the client side; the echo target then just sees the reset.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::json;
use socket2::SockRef;

use crate::common::{
    latency_json, latency_line, new_histogram, record, sleep_until, via_line, ConnArgs, Dialer,
    Failures, Progress, Report, Result, TimeArgs,
};
use crate::serve::{any_port, Spec, Target};
use crate::sys::CpuMeter;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub time: TimeArgs,
    /// Connections in progress at once (one blocking worker thread each)
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
}

struct WorkerResult {
    ok: u64,
    setup: Histogram<u64>,
    total: Histogram<u64>,
    failures: Failures,
}

/// One connection; returns (setup time, time until the echo came back).
fn one(d: &Dialer, dst: SocketAddr) -> std::io::Result<(Duration, Duration)> {
    let t0 = Instant::now();
    let (mut s, leftover) = d.dial(dst, true)?;
    let setup = t0.elapsed();
    s.write_all(b"x")?;
    if leftover.is_empty() {
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
    }
    let total = t0.elapsed();
    // Abortive close: no TIME_WAIT on our side.
    SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
    Ok((setup, total))
}

fn worker(
    d: &Dialer,
    dst: SocketAddr,
    start: Instant,
    end: Instant,
    done: &AtomicU64,
) -> WorkerResult {
    let mut r = WorkerResult {
        ok: 0,
        setup: new_histogram(),
        total: new_histogram(),
        failures: Failures::default(),
    };
    // Bounded by `end`; every blocking step by the dialer's timeout.
    loop {
        let t = Instant::now();
        if t >= end {
            break;
        }
        let res = one(d, dst);
        let counted = t >= start;
        match res {
            Ok((setup, total)) => {
                if counted {
                    r.ok += 1;
                    record(&mut r.setup, setup);
                    record(&mut r.total, total);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                if counted {
                    r.failures.add(e);
                }
                // Do not spin on a refusing server.
                thread::sleep(Duration::from_millis(1));
            }
        }
    }
    r
}

pub fn run(a: &Args) -> Result<()> {
    let mut dialer = a.conn.setup()?;
    dialer.timeout = Duration::from_secs(2);
    let (warmup, duration) = a.time.check()?;
    if !(1..=4096).contains(&a.concurrency) {
        return Err("--concurrency must be 1..=4096".into());
    }
    let (dst, _target) = match a.conn.target_addr()? {
        Some(t) => (t, None),
        None => {
            let t = Target::start(&Spec {
                echo: any_port(),
                ..Spec::default()
            })?;
            (t.echo.expect("echo listener"), Some(t))
        }
    };
    let t_start = Instant::now() + Duration::from_millis(10);
    let start = t_start + warmup;
    let end = start + duration;
    let done = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for _ in 0..a.concurrency {
        let (d, done) = (dialer.clone(), done.clone());
        handles.push(
            thread::Builder::new()
                .name("cps".into())
                .stack_size(256 * 1024)
                .spawn(move || {
                    sleep_until(t_start);
                    worker(&d, dst, start, end, &done)
                })?,
        );
    }
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
    sleep_until(start);
    let cpu = CpuMeter::start(&a.conn.pids);
    sleep_until(end);
    let usage = cpu.stop();
    let mut ok = 0;
    let mut setup = new_histogram();
    let mut total = new_histogram();
    let mut failures = Failures::default();
    for h in handles {
        match h.join() {
            Ok(r) => {
                ok += r.ok;
                setup.add(r.setup).expect("same bounds");
                total.add(r.total).expect("same bounds");
                failures.merge(r.failures);
            }
            Err(_) => failures.add("worker panicked"),
        }
    }
    progress.stop();
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
    if let Some(l) = usage.relay_line(&[("µs/conn", ok as f64, 1e6)]) {
        summary += &l;
        summary.push('\n');
    }
    summary += &format!("loadgen CPU {:.2} s\n", usage.self_seconds);

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
