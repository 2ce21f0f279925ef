//! UDP ASSOCIATE at scale on one shard: 2,000 associations open at once exchanging
//! datagrams with zero loss, and 10,000 associations opened and closed in batches with the
//! relay's descriptors and memory back where they started.

use crate::common::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const CONCURRENT: usize = 2000;
const WORKERS: usize = 8;
const ROUNDS: usize = 5;
/// Each round waits this long, at most, for its echoes.
const ROUND_DEADLINE: Duration = Duration::from_secs(20);

fn payload(id: usize, round: usize) -> Vec<u8> {
    let mut p = format!("assoc {id} round {round} ").into_bytes();
    p.extend_from_slice(&prng_bytes((id * 131 + round) as u64, 64));
    p
}

#[test]
fn concurrent_2000_associations_zero_loss() {
    let _guard = exclusive();
    let nofile = raise_nofile_limit();
    assert!(
        nofile as usize > 2 * CONCURRENT + 200,
        "RLIMIT_NOFILE {nofile} is too small for {CONCURRENT} associations"
    );
    // A big receive buffer and several threads, so that the target never drops.
    let echo = UdpServer::start("127.0.0.1:0", true, 4, 64 << 20, false);
    let relay = Relay::start(&["--shards", "1"]);
    let per = CONCURRENT / WORKERS;
    let opened = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..WORKERS)
        .map(|w| {
            let opened = opened.clone();
            let (relay_addr, echo_addr) = (relay.addr, echo.addr);
            thread::spawn(move || -> Result<(usize, Vec<Duration>), String> {
                let mut assocs = Vec::with_capacity(per);
                let mut err = None;
                for i in 0..per {
                    let id = w * per + i;
                    let sock = udp_bind("127.0.0.1:0");
                    let me = sock.local_addr().unwrap();
                    match udp_associate_raw(relay_addr, &Target::Addr(me)) {
                        Ok((control, reply)) => match reply.bnd {
                            BndAddr::Addr(relay_udp) if reply.rep == 0 => assocs.push(UdpAssoc {
                                control,
                                sock,
                                relay_udp,
                                reply,
                            }),
                            _ => {
                                err = Some(format!("assoc {id}: reply {reply:?}"));
                                break;
                            }
                        },
                        Err(e) => {
                            err = Some(format!("assoc {id}: handshake: {e}"));
                            break;
                        }
                    }
                }
                // Everyone opens before anyone sends (bounded wait).
                opened.fetch_add(1, Ordering::SeqCst);
                if let Some(e) = err {
                    return Err(e);
                }
                let deadline = Instant::now() + Duration::from_secs(120);
                while opened.load(Ordering::SeqCst) < WORKERS && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(5));
                }
                let mut ok = 0;
                let mut times = Vec::new();
                for round in 0..ROUNDS {
                    let t0 = Instant::now();
                    for (i, a) in assocs.iter().enumerate() {
                        a.send(0, &Target::Addr(echo_addr), &payload(w * per + i, round));
                    }
                    let end = t0 + ROUND_DEADLINE;
                    let mut lost = Vec::new();
                    for (i, a) in assocs.iter().enumerate() {
                        let id = w * per + i;
                        let left = end.saturating_duration_since(Instant::now());
                        match recv_reply(&a.sock, a.relay_udp, left.max(Duration::from_millis(1))) {
                            Some(r) => {
                                if r.src != BndAddr::Addr(echo_addr) || r.data != payload(id, round)
                                {
                                    return Err(format!(
                                        "assoc {id} round {round}: wrong reply from {:?}: {:?}",
                                        r.src,
                                        String::from_utf8_lossy(&r.data[..r.data.len().min(40)])
                                    ));
                                }
                                ok += 1;
                            }
                            None => lost.push(id),
                        }
                    }
                    if !lost.is_empty() {
                        return Err(format!(
                            "round {round}: worker {w} lost {} of {per} echoes (first: assoc {})",
                            lost.len(),
                            lost[0]
                        ));
                    }
                    times.push(t0.elapsed());
                }
                Ok((ok, times))
            })
        })
        .collect();
    let mut ok = 0;
    let mut errors = Vec::new();
    let mut slowest = Duration::ZERO;
    for h in handles {
        match h.join() {
            Ok(Ok((n, times))) => {
                ok += n;
                slowest = slowest.max(times.into_iter().max().unwrap_or_default());
            }
            Ok(Err(e)) => errors.push(e),
            Err(_) => errors.push("a worker panicked".into()),
        }
    }
    println!(
        "{CONCURRENT} associations x {ROUNDS} rounds: {ok} echoes in {:?} (slowest worker round {slowest:?}); target got {}",
        start.elapsed(),
        echo.received()
    );
    assert!(
        errors.is_empty(),
        "{} workers failed: {errors:#?}",
        errors.len()
    );
    assert_eq!(ok, CONCURRENT * ROUNDS, "zero loss");
    assert_eq!(
        echo.received(),
        CONCURRENT * ROUNDS,
        "the target saw each once"
    );
    if testing_ringsocks() {
        // Workers dropped their associations on return: every one logs its end.
        let lines = wait_log_lines(
            &relay,
            "udp association closed",
            CONCURRENT,
            Duration::from_secs(30),
        );
        assert_eq!(lines.len(), CONCURRENT, "association end lines");
        let sum = |k: &str| -> u64 { lines.iter().filter_map(|l| log_field(l, k)).sum() };
        let (out, inn) = (sum("relayed_out"), sum("relayed_in"));
        let dropped: u64 = ["dropped_foreign", "dropped_malformed", "dropped_frag"]
            .iter()
            .map(|k| sum(k))
            .sum();
        println!("relay counted relayed_out={out} relayed_in={inn} dropped={dropped}");
        assert_eq!(
            (out, inn),
            ((CONCURRENT * ROUNDS) as u64, (CONCURRENT * ROUNDS) as u64)
        );
        assert_eq!(dropped, 0);
    }
}

const CHURN: usize = 10_000;
const BATCH: usize = 100;
/// The relay's first ~1,000 associations grow RSS by ~6 MiB that it keeps and reuses
/// (allocator and UDP buffer-ring pages touched for the first time; measured flat from
/// 7,000 to 30,000 associations): the baseline is taken after them.
const WARMUP_BATCHES: usize = 10;
/// RSS growth allowed over 10,000 associations: 4 MiB is ~420 bytes per association, so
/// a per-association leak of any real state (a buffer, a socket) shows.
const RSS_GROWTH_KIB: u64 = 4 * 1024;

/// Open `BATCH` associations, one echo each, close them all; returns the relay's UDP ports.
fn churn_batch(relay: &Relay, echo: &UdpServer, b: usize) -> Vec<u16> {
    let assocs: Vec<UdpAssoc> = (0..BATCH)
        .map(|_| UdpAssoc::open(relay.addr, "127.0.0.1:0"))
        .collect();
    for (i, a) in assocs.iter().enumerate() {
        a.send(0, &Target::Addr(echo.addr), &payload(b * BATCH + i, 0));
    }
    for (i, a) in assocs.iter().enumerate() {
        let r = a
            .recv(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("batch {b}: no echo for association {i}"));
        assert_eq!(
            r.data,
            payload(b * BATCH + i, 0),
            "batch {b} association {i}"
        );
    }
    assocs.iter().map(|a| a.relay_udp.port()).collect()
}

/// The relay's leftover sockets: TCP on its listening port other than the listener (and
/// TIME_WAIT, which no process holds), UDP on a port it handed out in BND.
fn leftover_sockets(relay_port: u16, udp_ports: &std::collections::HashSet<u16>) -> (usize, usize) {
    let tcp = net_sockets("tcp")
        .into_iter()
        .filter(|s| s.local.port() == relay_port && s.state != 0x0A && s.state != 0x06)
        .count();
    let udp = net_sockets("udp")
        .into_iter()
        .filter(|s| udp_ports.contains(&s.local.port()))
        .count();
    (tcp, udp)
}

#[test]
fn churn_10000_associations_fds_and_rss_return() {
    let _guard = exclusive();
    if skip_unless_ringsocks("churn_10000_associations_fds_and_rss_return") {
        return;
    }
    raise_nofile_limit();
    let echo = UdpServer::start("127.0.0.1:0", true, 2, 16 << 20, false);
    let relay = Relay::start(&["--shards", "1"]);
    let pid = relay.pid();
    for b in 0..WARMUP_BATCHES {
        churn_batch(&relay, &echo, b);
    }
    let warm = WARMUP_BATCHES * BATCH;
    let lines = wait_log_lines(
        &relay,
        "udp association closed",
        warm,
        Duration::from_secs(10),
    );
    assert_eq!(lines.len(), warm, "warm-up associations ended");
    thread::sleep(Duration::from_millis(300));
    let (fds0, rss0) = (proc_fd_count(pid), proc_rss_kib(pid));
    {
        // The probe sees the relay's sockets while associations are open.
        let open: Vec<UdpAssoc> = (0..BATCH)
            .map(|_| UdpAssoc::open(relay.addr, "127.0.0.1:0"))
            .collect();
        let ports = open.iter().map(|a| a.relay_udp.port()).collect();
        let seen = leftover_sockets(relay.addr.port(), &ports);
        assert_eq!(
            seen,
            (BATCH, BATCH),
            "with {BATCH} associations open: (TCP, UDP) relay sockets seen in /proc/net"
        );
    }
    let start = Instant::now();
    let mut udp_ports = std::collections::HashSet::new();
    for b in 0..CHURN / BATCH {
        udp_ports.extend(churn_batch(&relay, &echo, WARMUP_BATCHES + b));
        if (b + 1) % 10 == 0 {
            println!(
                "after {:>6} associations: fds {} RSS {} KiB",
                (b + 1) * BATCH,
                proc_fd_count(pid),
                proc_rss_kib(pid)
            );
        }
    }
    let took = start.elapsed();
    let (fds_busy, rss_busy) = (proc_fd_count(pid), proc_rss_kib(pid));
    let lines = wait_log_lines(
        &relay,
        "udp association closed",
        warm + BATCH + CHURN,
        Duration::from_secs(30),
    );
    assert_eq!(
        lines.len(),
        warm + BATCH + CHURN,
        "every association logged its end"
    );
    // Settle: descriptors back to the starting count (bounded wait).
    // Sockets may live only in the ring's fixed-file table, so /proc/net shows the rest.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut fds1 = proc_fd_count(pid);
    let mut left = leftover_sockets(relay.addr.port(), &udp_ports);
    while (fds1 > fds0 || left.0 > 0 || left.1 > 0) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
        fds1 = proc_fd_count(pid);
        left = leftover_sockets(relay.addr.port(), &udp_ports);
    }
    let rss1 = proc_rss_kib(pid);
    println!(
        "{CHURN} associations in {took:?} ({:.0}/s): fds {fds0} -> {fds_busy} (right after) -> {fds1}; \
         RSS {rss0} -> {rss_busy} -> {rss1} KiB (growth {} KiB, bound {RSS_GROWTH_KIB})",
        CHURN as f64 / took.as_secs_f64(),
        rss1 as i64 - rss0 as i64
    );
    println!(
        "{} distinct relay UDP ports used; left open: {} TCP on the relay port, {} UDP on them",
        udp_ports.len(),
        left.0,
        left.1
    );
    assert_eq!(left.0, 0, "TCP sockets of closed control connections left");
    // Another process may bind a freed port by chance: a leak would leave thousands.
    assert!(
        left.1 <= 5,
        "{} UDP sockets of closed associations left",
        left.1
    );
    assert!(
        fds1 <= fds0,
        "relay fds {fds0} before, {fds1} after {CHURN} closed associations"
    );
    assert!(
        rss1 <= rss0 + RSS_GROWTH_KIB,
        "relay RSS grew {rss0} -> {rss1} KiB over {CHURN} closed associations"
    );
    assert!(relay_still_serves(&relay, &echo));
}

fn relay_still_serves(relay: &Relay, echo: &UdpServer) -> bool {
    let a = UdpAssoc::open(relay.addr, "127.0.0.1:0");
    a.expect_echo(echo.addr, b"after the churn");
    true
}
