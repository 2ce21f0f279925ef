//! Hostile clients and targets: floods that must not hurt an innocent client, and tunnels
//! whose memory must stay bounded. Each test prints the figures the closing notes quote
//! (`cargo test --release --test e2e floods:: -- --nocapture`).

use crate::common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn established_on(port: u16) -> usize {
    ss_established(port, false).lines().count()
}

/// Median time of `n` CONNECT + echo round trips of an innocent client.
fn innocent_latency(relay: SocketAddr, echo: &Server, n: usize) -> (Duration, Vec<Duration>) {
    let dst = SocketAddr::from(([127, 0, 0, 1], echo.port()));
    let mut took: Vec<Duration> = (0..n)
        .map(|_| {
            let t0 = Instant::now();
            let s = socks_connect(relay, dst);
            echo_roundtrip(&s, b"innocent");
            t0.elapsed()
        })
        .collect();
    took.sort();
    (took[n / 2], took)
}

#[test]
fn ten_thousand_silent_connections_are_reclaimed_and_do_not_delay_a_real_client() {
    let _guard = exclusive();
    raise_nofile_limit();
    let echo = echo_server("127.0.0.1:0");
    // Default limits: one shard admits 21,845 connections whatever RLIMIT_NOFILE is.
    let relay = Relay::start(&["--shards", "1", "--handshake-timeout", "5s"]);
    let port = relay.addr.port();
    let (rss0, conns0) = (proc_rss_kib(relay.pid()), established_on(port));
    let (before, _) = innocent_latency(relay.addr, &echo, 5);

    let flood: Vec<TcpStream> = (0..10_000)
        .map(|i| TcpStream::connect(relay.addr).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    let t_flood = Instant::now();
    let deadline = t_flood + Duration::from_secs(10);
    while established_on(port) < conns0 + 10_000 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (rss1, conns1) = (proc_rss_kib(relay.pid()), established_on(port));
    let (during, all) = innocent_latency(relay.addr, &echo, 9);
    eprintln!(
        "10,000 silent connections: innocent CONNECT+echo median {during:?} (before {before:?}, all {all:?}); \
         relay RSS {rss0} -> {rss1} KiB, client connections {conns0} -> {conns1}"
    );
    assert!(
        conns1 >= conns0 + 10_000,
        "the flood is held: {conns0} -> {conns1}"
    );
    assert!(
        during < Duration::from_millis(10),
        "innocent client took {during:?} during the flood"
    );

    // The handshake timeout reclaims every one of them.
    let deadline = t_flood + Duration::from_secs(15);
    while established_on(port) > conns0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let conns2 = established_on(port);
    let rss2 = proc_rss_kib(relay.pid());
    eprintln!("after the handshake timeout: client connections {conns2}, relay RSS {rss2} KiB");
    assert!(
        conns2 <= conns0,
        "{conns0} -> {conns1} -> {conns2} after the timeout"
    );
    let mut sample = flood.into_iter().step_by(997).collect::<Vec<_>>();
    for s in &mut sample {
        assert_closed(
            s,
            Duration::from_secs(1),
            "silent connection after the timeout",
        );
    }
}

#[test]
fn a_client_trickling_its_handshake_is_closed_at_the_handshake_timeout() {
    let _guard = shared();
    let relay = Relay::start(&["--handshake-timeout", "2s"]);
    let mut s = connect(relay.addr);
    let t0 = Instant::now();
    // A greeting, then a request one byte a second: progress must not extend the timeout.
    let mut bytes = greeting(&[0x00]);
    bytes.extend(request(
        CMD_CONNECT,
        &Target::Domain("trickle.example".into(), 80),
    ));
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut closed_at = None;
    'outer: for b in bytes {
        if s.write_all(&[b]).is_err() {
            closed_at = Some(t0.elapsed());
            break;
        }
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until {
            let mut buf = [0u8; 16];
            match s.read(&mut buf) {
                Ok(0) => {
                    closed_at = Some(t0.elapsed());
                    break 'outer;
                }
                Ok(_) => {} // the method choice
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => {
                    closed_at = Some(t0.elapsed());
                    break 'outer;
                }
            }
        }
    }
    let at = closed_at.expect("the trickling client was never closed");
    eprintln!("trickling client closed after {at:?} (--handshake-timeout 2s)");
    assert!(
        at >= Duration::from_millis(1800) && at < Duration::from_secs(4),
        "closed after {at:?}"
    );
}

/// A target that accepts and never reads; holds its connections until dropped.
struct Deaf {
    addr: SocketAddr,
    held: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

fn deaf_target() -> Deaf {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let h = held.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            h.lock().unwrap().push(s);
        }
    });
    Deaf { addr, held }
}

#[test]
fn tunnels_to_a_target_that_never_reads_hold_bounded_memory() {
    let _guard = exclusive();
    let deaf = deaf_target();
    let echo = echo_server("127.0.0.1:0");
    for mode in ["auto", "copy", "splice"] {
        let relay = Relay::start(&["--shards", "1", "--forward", mode]);
        let rss0 = proc_rss_kib(relay.pid());
        let mut tunnels: Vec<TcpStream> = (0..50)
            .map(|_| socks_connect(relay.addr, deaf.addr))
            .collect();
        // The clients write until their writes block for good (the relay stops reading).
        let chunk = vec![0x5a_u8; 64 * 1024];
        let mut pushed = 0usize;
        for s in &tunnels {
            s.set_nonblocking(true).unwrap();
        }
        let (mut idle_rounds, until) = (0, Instant::now() + Duration::from_secs(20));
        while idle_rounds < 5 && Instant::now() < until {
            let before = pushed;
            for s in &mut tunnels {
                while let Ok(n) = s.write(&chunk) {
                    pushed += n;
                }
            }
            idle_rounds = if pushed == before { idle_rounds + 1 } else { 0 };
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(idle_rounds, 5, "--forward {mode}: the writes never blocked");
        let rss1 = proc_rss_kib(relay.pid());
        let (latency, _) = innocent_latency(relay.addr, &echo, 5);
        eprintln!(
            "--forward {mode}: 50 tunnels to a deaf target took {} MiB from their clients; \
             relay RSS {rss0} -> {rss1} KiB; innocent CONNECT+echo {latency:?}",
            pushed >> 20
        );
        // Bytes stop in socket buffers and pipes (kernel memory, bounded by the TCP sysctls),
        // not in the relay: its own memory grows by at most its copy buffer pool (32 MiB per
        // shard, touched as used), whatever the number of tunnels.
        assert!(
            rss1.saturating_sub(rss0) < 40 * 1024,
            "--forward {mode}: relay RSS {rss0} -> {rss1} KiB"
        );
        assert!(
            latency < Duration::from_millis(50),
            "{mode}: innocent client {latency:?}"
        );
    }
    drop(deaf.held);
}

#[test]
fn a_silent_tunnel_is_closed_at_the_idle_timeout() {
    let _guard = shared();
    let echo = echo_server("127.0.0.1:0");
    let relay = Relay::start(&["--idle-timeout", "2s"]);
    let mut s = socks_connect(relay.addr, SocketAddr::from(([127, 0, 0, 1], echo.port())));
    echo_roundtrip(&s, b"then silence");
    let t0 = Instant::now();
    // A client that vanished sends nothing more, not even a FIN.
    let (outcome, _) = wait_closed(&mut s, Duration::from_secs(6));
    let at = t0.elapsed();
    eprintln!("silent tunnel closed after {at:?} ({outcome:?}, --idle-timeout 2s)");
    assert!(
        at >= Duration::from_millis(1800) && at < Duration::from_secs(5),
        "closed after {at:?}: {outcome:?}"
    );
}
