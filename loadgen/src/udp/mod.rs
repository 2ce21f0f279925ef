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
//! switch. `--no-gso` turns GSO off on the client only; `--plain` makes
//! both sides send one datagram per `sendmsg` call (see [`Args`]).
//!
//! Layout: [`args`] is the command line; [`datagram`] the stamp every
//! payload carries and the checks a reply must pass; [`accounting`] what
//! counts as sent, received, lost and in flight, and the open-loop
//! schedule; [`setup`] opens the associations; [`worker`] is the per-thread
//! event loop; [`relay_cpu`] measures the relay's CPU with its descendant
//! processes; [`report`] writes the summary and the JSON report. [`run`]
//! wires them together.

mod accounting;
mod args;
mod datagram;
mod relay_cpu;
mod report;
mod setup;
mod worker;

pub use args::Args;

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ringsocks::proto::udp::encode_udp_header_addr;
use ringsocks::proto::Addr;

use crate::common::{new_histogram, sleep_until, Failures, Progress, Result};
use crate::epoll::{self, Epoll};
use crate::serve::{udp_echo_sockets, Mmsg, UdpEcho, MMSG_BATCH};
use crate::sys;

use accounting::{Span, Tally};
use datagram::{FILL, STAMP_LEN};
use relay_cpu::TreeMeter;
use report::RunResults;
use setup::{client_rcvbuf, open_all};
use worker::{Assoc, Outcome, Pace, Plan, Shared, Worker, CTL, ECHO};

/// Runs `loadgen udp`: checks the options, opens the associations, runs one
/// worker per thread through warmup, interval and drain, and reports.
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
                echoes.push(Some(UdpEcho::new(s, a.plain)));
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
        if a.plain {
            tx.set_plain();
        }
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

    let report = RunResults {
        args: a,
        dialer: &dialer,
        warmup,
        duration,
        targets: &targets,
        nofile,
        opened,
        setup_secs,
        tally,
        rtt,
        lag,
        stalls,
        io_errors,
        bad_first,
        echoed,
        failures: &failures,
        usage,
        procs,
    }
    .into_report();
    report.emit(a.conn.json.as_deref())?;
    if failures.count > 0 {
        return Err(format!("{} association failure(s)", failures.count).into());
    }
    Ok(())
}
