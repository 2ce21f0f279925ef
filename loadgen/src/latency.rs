//! tcp-latency: B-byte ping-pong over N connections to an echo target.
//!
//! Closed loop (default): each connection sends a message, waits for the
//! echo, and sends the next. Open loop (`--rate R`): each connection sends
//! at R/N msgs/s on a fixed schedule whatever the replies do, and latency
//! is measured from the *intended* send time, so a stall shows up as the
//! latency every scheduled message suffered (no coordinated omission).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::json;

use crate::common::{
    latency_json, latency_line, new_histogram, record, sleep_until, via_line, ConnArgs, Failures,
    Progress, Report, Result, TimeArgs,
};
use crate::cpu::CpuMeter;
use crate::serve::{any_port, Spec, Target};
use crate::sys;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub time: TimeArgs,
    /// Message size in bytes
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Connections, each with one message in flight (closed loop)
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Open loop: total messages per second over all connections
    #[arg(long, value_name = "R")]
    pub rate: Option<f64>,
}

/// Longest wait for an echo before the connection counts as failed.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

struct Window {
    start: Instant,
    end: Instant,
}

impl Window {
    fn contains(&self, t: Instant) -> bool {
        t >= self.start && t < self.end
    }
}

#[derive(Default)]
struct Outcome {
    rtt: Option<Histogram<u64>>,
    send_lag: Option<Histogram<u64>>,
    msgs: u64,
    failures: Failures,
}

fn closed_loop(
    mut s: TcpStream,
    size: usize,
    w: &Window,
    done: &AtomicU64,
) -> std::io::Result<Outcome> {
    let msg = vec![0x5au8; size];
    let mut reply = vec![0u8; size];
    let mut h = new_histogram();
    let mut n = 0;
    // Bounded by the window's end; each read by REPLY_TIMEOUT.
    loop {
        let t = Instant::now();
        if t >= w.end {
            break;
        }
        s.write_all(&msg)?;
        s.read_exact(&mut reply)?;
        let rtt = t.elapsed();
        if t >= w.start {
            record(&mut h, rtt);
            n += 1;
            done.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(Outcome {
        rtt: Some(h),
        msgs: n,
        ..Outcome::default()
    })
}

fn open_loop(
    mut s: TcpStream,
    size: usize,
    interval: Duration,
    schedule_start: Instant,
    w: &Window,
    done: &AtomicU64,
) -> std::io::Result<Outcome> {
    let (tx, rx) = mpsc::channel::<Instant>();
    let mut ws = s.try_clone()?;
    let (w_start, end) = (w.start, w.end);
    let sender = thread::Builder::new().name("sender".into()).spawn(
        move || -> std::io::Result<Histogram<u64>> {
            let msg = vec![0x5au8; size];
            let mut lag = new_histogram();
            // Bounded: k grows until the schedule passes the window's end.
            for k in 0u64.. {
                let intended = schedule_start + interval.mul_f64(k as f64);
                if intended >= end {
                    break;
                }
                sleep_until(intended);
                if intended >= w_start {
                    record(&mut lag, intended.elapsed());
                }
                // Queue first so the reader always finds the send time.
                if tx.send(intended).is_err() {
                    break;
                }
                ws.write_all(&msg)?;
            }
            Ok(lag)
        },
    )?;
    let mut reply = vec![0u8; size];
    let mut h = new_histogram();
    let mut n = 0;
    let mut err = None;
    // Ends when the sender is done and every reply is in (or a read fails).
    while let Ok(intended) = rx.recv() {
        if let Err(e) = s.read_exact(&mut reply) {
            err = Some(e);
            break;
        }
        if w.contains(intended) {
            record(&mut h, intended.elapsed());
            n += 1;
            done.fetch_add(1, Ordering::Relaxed);
        }
    }
    drop(rx);
    let lag = sender
        .join()
        .map_err(|_| std::io::Error::other("sender panicked"))?;
    if let Some(e) = err {
        return Err(e);
    }
    Ok(Outcome {
        rtt: Some(h),
        send_lag: Some(lag?),
        msgs: n,
        failures: Failures::default(),
    })
}

pub fn run(a: &Args) -> Result<()> {
    let dialer = a.conn.setup()?;
    let (warmup, duration) = a.time.check()?;
    if !(1..=1 << 20).contains(&a.size) {
        return Err("--size must be 1..=1048576".into());
    }
    if !(1..=4096).contains(&a.connections) {
        return Err("--connections must be 1..=4096".into());
    }
    if let Some(r) = a.rate {
        if !(r > 0.0 && r <= 10_000_000.0) {
            return Err("--rate must be in (0, 1e7]".into());
        }
        sys::tight_timer_slack();
    }
    let target = match a.conn.target_addr()? {
        Some(t) => (t, None),
        None => {
            let t = Target::start(&Spec {
                echo: any_port(),
                ..Spec::default()
            })?;
            (t.echo.expect("echo listener"), Some(t))
        }
    };
    let echo_addr: SocketAddr = target.0;

    let mut socks = Vec::with_capacity(a.connections);
    for _ in 0..a.connections {
        let (s, leftover) = dialer.dial(echo_addr, true)?;
        if !leftover.is_empty() {
            return Err("echo target sent data before we did".into());
        }
        s.set_read_timeout(Some(REPLY_TIMEOUT))?;
        s.set_write_timeout(Some(REPLY_TIMEOUT))?;
        socks.push(s);
    }

    let t_start = Instant::now() + Duration::from_millis(10);
    let w = Arc::new(Window {
        start: t_start + warmup,
        end: t_start + warmup + duration,
    });
    let done = Arc::new(AtomicU64::new(0));
    let interval = a
        .rate
        .map(|r| Duration::from_secs_f64(a.connections as f64 / r));
    let mut handles = Vec::new();
    for (i, s) in socks.into_iter().enumerate() {
        let (w, done, size) = (w.clone(), done.clone(), a.size);
        // Stagger the open-loop schedules so connections don't send in bursts.
        let offset = interval.map_or(Duration::ZERO, |iv| {
            iv.mul_f64(i as f64 / a.connections as f64)
        });
        handles.push(thread::Builder::new().name("conn".into()).spawn(move || {
            sleep_until(t_start);
            match interval {
                None => closed_loop(s, size, &w, &done),
                Some(iv) => open_loop(s, size, iv, t_start + offset, &w, &done),
            }
        })?);
    }
    let progress = {
        let done = done.clone();
        let mut last = 0;
        Progress::start(!a.conn.quiet, warmup + duration, move |t| {
            let now = done.load(Ordering::Relaxed);
            let line = if t < warmup.as_secs_f64() + 0.01 {
                "warming up".to_string()
            } else {
                format!("{} msgs/s", now - last)
            };
            last = now;
            line
        })
    };
    sleep_until(w.start);
    let cpu = CpuMeter::start(&a.conn.pids);
    sleep_until(w.end);
    let usage = cpu.stop();

    let mut rtt = new_histogram();
    let mut lag = new_histogram();
    let mut msgs = 0;
    let mut failures = Failures::default();
    for h in handles {
        match h.join() {
            Ok(Ok(o)) => {
                if let Some(h) = o.rtt {
                    rtt.add(h).expect("same bounds");
                }
                if let Some(h) = o.send_lag {
                    lag.add(h).expect("same bounds");
                }
                msgs += o.msgs;
                failures.merge(o.failures);
            }
            Ok(Err(e)) => failures.add(e),
            Err(_) => failures.add("connection thread panicked"),
        }
    }
    progress.stop();
    let secs = duration.as_secs_f64();
    let mps = msgs as f64 / secs;

    let mode = if a.rate.is_some() { "open" } else { "closed" };
    let mut summary = format!(
        "{} connection(s), {} B messages, {mode} loop{}, {}, {secs:.1} s after {:.1} s warmup\n",
        a.connections,
        a.size,
        a.rate.map_or(String::new(), |r| format!(" at {r} msgs/s")),
        via_line(&dialer),
        warmup.as_secs_f64()
    );
    summary += &format!("{mps:.0} msgs/s (round trips)\n");
    summary += &latency_line("rtt", &rtt);
    summary.push('\n');
    if a.rate.is_some() {
        summary += &latency_line("send lag", &lag);
        summary.push('\n');
    }
    summary += &failures.summary_line();
    summary += &usage.summary_lines(&[("µs/msg", msgs as f64, 1e6)]);

    let report = Report {
        mode: "tcp-latency",
        target: a.conn.target_json(&dialer),
        params: json!({
            "size": a.size,
            "connections": a.connections,
            "loop": mode,
            "rate": a.rate,
            "duration": a.time.duration,
            "warmup": a.time.warmup,
        }),
        results: json!({
            "elapsed_seconds": secs,
            "messages": msgs,
            "msgs_per_sec": mps,
            "rtt": latency_json(&rtt),
            "send_lag": if a.rate.is_some() { latency_json(&lag) } else { serde_json::Value::Null },
            "failures": failures.json(),
            "loadgen_cpu_seconds": usage.self_seconds,
        }),
        relay_cpu: usage.relay_json(&[("per_msg", msgs as f64)]),
        summary,
    };
    report.emit(a.conn.json.as_deref())?;
    drop(target);
    if failures.count > 0 {
        return Err(format!("{} connection(s) failed", failures.count).into());
    }
    Ok(())
}
