//! serve: the target servers (TCP echo, discard, source and hold, UDP echo)
//! that every client mode starts in-process, and the `serve` command that
//! runs them on their own.
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
//! [`UdpEcho`] inside its own event loops. `--udp-plain` makes the echo
//! answer datagram by datagram (one `sendmsg` each, no GSO).
//!
//! Layout: [`target`] says what to listen on and starts it, with the
//! counters the measuring modes read; [`tcp`] is the thread pool and the
//! per-connection loops; [`udp_echo`] the UDP echo sockets and their loop;
//! [`mmsg`] the batched `recvmmsg`/`sendmmsg` buffers (with UDP GSO) that
//! the `udp` mode uses too; [`args`] the command line of `serve`.

mod args;
mod mmsg;
mod target;
mod tcp;
mod udp_echo;

pub use args::Args;
pub use mmsg::{Mmsg, MMSG_BATCH};
pub use target::{any_port, listen_tcp, Counters, Spec, Target};
pub use tcp::BULK_BUF;
pub use udp_echo::{set_rcvbuf, udp_echo_sockets, UdpEcho};

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{loopback_addr, Progress, Report, Result};

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
        udp_plain: args.udp_plain,
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
            "udp_plain": args.udp_plain,
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
