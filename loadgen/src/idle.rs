//! idle: open N proxied connections, hold them without traffic, and report
//! what they cost the relay in memory (VmRSS) and file descriptors.

use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{sleep_until, via_line, ConnArgs, Failures, Progress, Report, Result};
use crate::cpu::CpuMeter;
use crate::serve::{any_port, Spec, Target};
use crate::sys;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Idle connections to open
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Seconds to hold them open before closing
    #[arg(long, default_value_t = 5.0)]
    pub hold: f64,
}

/// Pause before sampling, for the relay to finish its side.
const SETTLE: Duration = Duration::from_millis(500);

#[derive(Clone, Copy)]
struct Mem {
    rss: u64,
    fds: u64,
}

fn sample(pids: &[u32]) -> Option<Mem> {
    let mut m = Mem { rss: 0, fds: 0 };
    for &p in pids {
        m.rss += sys::rss_bytes(p).ok()?;
        m.fds += sys::fd_count(p).ok()?;
    }
    (!pids.is_empty()).then_some(m)
}

fn mem_json(m: Option<Mem>) -> Value {
    m.map_or(Value::Null, |m| json!({"rss_bytes": m.rss, "fds": m.fds}))
}

pub fn run(a: &Args) -> Result<()> {
    let dialer = a.conn.setup()?;
    if !(1..=500_000).contains(&a.connections) {
        return Err("--connections must be 1..=500000".into());
    }
    if !(0.0..=86_400.0).contains(&a.hold) {
        return Err("--hold must be in [0, 86400]".into());
    }
    // Our client sockets, the in-process target's accepted ones, slack.
    let want = 2 * a.connections as u64 + 256;
    let nofile = sys::raise_nofile(want)?;
    let external = a.conn.target_addr()?;
    // Keep fds for /proc reads and the like; the in-process target needs
    // one fd per connection too.
    let per_conn = if external.is_some() { 1 } else { 2 };
    let fit = (nofile.saturating_sub(128) / per_conn) as usize;
    let want_conns = a.connections.min(fit);
    if want_conns < a.connections {
        eprintln!(
            "loadgen: warning: RLIMIT_NOFILE {nofile} fits only {want_conns} connections; opening that many"
        );
    }
    let target = match external {
        Some(_) => None,
        None => Some(Target::start(&Spec {
            hold: any_port(),
            ..Spec::default()
        })?),
    };
    let dst = external.unwrap_or_else(|| target.as_ref().and_then(|t| t.hold).expect("hold"));

    let before = sample(&a.conn.pids);
    let cpu = CpuMeter::start(&a.conn.pids);
    let t0 = Instant::now();
    let mut conns: Vec<TcpStream> = Vec::with_capacity(want_conns);
    let mut failures = Failures::default();
    let mut consecutive = 0;
    let progress_total = Duration::from_secs_f64(a.hold) + Duration::from_secs(4);
    let progress = Progress::start(!a.conn.quiet, progress_total, |t| format!("{t:.0} s"));
    for _ in 0..want_conns {
        match dialer.dial(dst, false) {
            Ok((s, _)) => {
                consecutive = 0;
                conns.push(s);
            }
            Err(e) => {
                failures.add(e);
                consecutive += 1;
                if consecutive >= 100 {
                    eprintln!("loadgen: 100 failures in a row, giving up opening");
                    break;
                }
            }
        }
    }
    let open_secs = t0.elapsed().as_secs_f64();
    let usage = cpu.stop();
    let opened = conns.len();
    // Wait (bounded) until the in-process target has accepted them all.
    if let Some(t) = &target {
        let deadline = Instant::now() + Duration::from_secs(5);
        while t.counters.held_count() < opened && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
    }
    thread::sleep(SETTLE);
    let open = sample(&a.conn.pids);
    let hold_end = Instant::now() + Duration::from_secs_f64(a.hold);
    sleep_until(hold_end);
    let held = sample(&a.conn.pids);
    drop(conns);
    if let Some(t) = &target {
        t.counters.release_held();
    }
    thread::sleep(SETTLE * 2);
    let closed = sample(&a.conn.pids);
    progress.stop();

    let per = |f: fn(&Mem) -> u64| -> Value {
        match (before, open) {
            (Some(b), Some(o)) if opened > 0 => {
                json!((f(&o) as f64 - f(&b) as f64) / opened as f64)
            }
            _ => Value::Null,
        }
    };
    let rss_per = per(|m| m.rss);
    let fds_per = per(|m| m.fds);

    let mut summary = format!(
        "{opened} of {} connections opened in {open_secs:.2} s ({:.0}/s), {}, held {:.1} s\n",
        a.connections,
        opened as f64 / open_secs.max(1e-9),
        via_line(&dialer),
        a.hold
    );
    if failures.count > 0 {
        summary += &format!(
            "failures: {} (first: {})\n",
            failures.count,
            failures.first.as_deref().unwrap_or("")
        );
    }
    if let (Some(b), Some(o), Some(h), Some(c)) = (before, open, held, closed) {
        let mib = |x: u64| x as f64 / (1 << 20) as f64;
        summary += &format!(
            "relay RSS: before {:.1} MiB, open {:.1} MiB, after hold {:.1} MiB, after close {:.1} MiB\n",
            mib(b.rss), mib(o.rss), mib(h.rss), mib(c.rss)
        );
        summary += &format!(
            "relay fds: before {}, open {}, after hold {}, after close {}\n",
            b.fds, o.fds, h.fds, c.fds
        );
        summary += &format!(
            "per connection: {:.0} bytes RSS, {:.2} fds\n",
            rss_per.as_f64().unwrap_or(0.0),
            fds_per.as_f64().unwrap_or(0.0)
        );
    } else if a.conn.pids.is_empty() {
        summary += "no --pid: relay memory not measured\n";
    } else {
        summary += "relay memory: could not read /proc (process gone?)\n";
    }
    if let Some(l) = usage.relay_line(&[("µs/conn to open", opened as f64, 1e6)]) {
        summary += &l;
        summary.push('\n');
    }

    let report = Report {
        mode: "idle",
        target: a.conn.target_json(&dialer),
        params: json!({
            "connections": a.connections,
            "hold": a.hold,
            "rlimit_nofile": nofile,
            "connections_attempted": want_conns,
        }),
        results: json!({
            "opened": opened,
            "open_seconds": open_secs,
            "opens_per_sec": opened as f64 / open_secs.max(1e-9),
            "failures": failures.json(),
            "relay_before": mem_json(before),
            "relay_open": mem_json(open),
            "relay_after_hold": mem_json(held),
            "relay_after_close": mem_json(closed),
            "rss_bytes_per_conn": rss_per,
            "fds_per_conn": fds_per,
            "loadgen_cpu_seconds": usage.self_seconds,
        }),
        relay_cpu: usage.relay_json(&[("per_conn", opened as f64)]),
        summary,
    };
    report.emit(a.conn.json.as_deref())
}
