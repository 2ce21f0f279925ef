//! Name resolution that a hostile client cannot starve. The relay runs in a private mount
//! namespace whose /etc/resolv.conf (and nsswitch.conf) point getaddrinfo at a DNS server of
//! the test's own on 127.53.0.1:53: it answers names under `fast.test` at once (A 127.0.0.1),
//! never answers names under `slow.test`, and says NXDOMAIN to the rest.

use crate::common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const DNS_ADDR: &str = "127.53.0.1:53";

/// The test's DNS server; stops when dropped.
struct Dns {
    stop: Arc<AtomicBool>,
    /// Queries seen for names under slow.test (never answered).
    slow_queries: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Dns {
    /// Waits (at most 10 s) until the flood's queries reach the server.
    fn wait_for_slow_queries(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.slow_queries.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            self.slow_queries.load(Ordering::Relaxed) > 0,
            "the flood reached DNS"
        );
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The question name of a query (lowercase, dotted) and where the question ends.
fn question(q: &[u8]) -> Option<(String, usize)> {
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let n = *q.get(i)? as usize;
        i += 1;
        if n == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + n)?).to_ascii_lowercase());
        i += n;
    }
    let end = i + 4; // QTYPE, QCLASS
    (end <= q.len()).then(|| (labels.join("."), end))
}

fn answer(q: &[u8]) -> Option<Vec<u8>> {
    let (name, end) = question(q)?;
    let qtype = u16::from_be_bytes([q[end - 4], q[end - 3]]);
    if name.ends_with("slow.test") {
        return None;
    }
    let mut r = q[..end].to_vec();
    r[2] = 0x81 | (q[2] & 0x01); // QR, opcode 0, RD copied
    r[3] = 0x80; // RA, NOERROR
    r[6..12].copy_from_slice(&[0, 0, 0, 0, 0, 0]); // ANCOUNT, NSCOUNT, ARCOUNT
    if !name.ends_with("fast.test") {
        r[3] = 0x83; // NXDOMAIN
    } else if qtype == 1 {
        r[7] = 1; // one answer
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 1]);
    }
    // AAAA (and anything else) under fast.test: NOERROR, no data.
    Some(r)
}

fn dns_server() -> Dns {
    let sock = UdpSocket::bind(DNS_ADDR).expect("bind the test DNS server on 127.53.0.1:53");
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let slow_queries = Arc::new(AtomicUsize::new(0));
    let thread = {
        let (stop, slow) = (stop.clone(), slow_queries.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !stop.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                match answer(&buf[..n]) {
                    Some(r) => {
                        let _ = sock.send_to(&r, from);
                    }
                    None => {
                        slow.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    Dns {
        stop,
        slow_queries,
        thread: Some(thread),
    }
}

/// Starts the relay in a private mount namespace that resolves through the test's server.
fn relay_with_test_dns(args: &[&str]) -> Relay {
    let resolv = tmp_path("resolv.conf");
    std::fs::write(
        &resolv,
        "nameserver 127.53.0.1\noptions timeout:2 attempts:1\n",
    )
    .unwrap();
    let nsswitch = tmp_path("nsswitch.conf");
    std::fs::write(&nsswitch, "hosts: files dns\n").unwrap();
    relay_with_mounts(
        &[
            (&resolv, "/etc/resolv.conf"),
            (&nsswitch, "/etc/nsswitch.conf"),
        ],
        args,
    )
}

/// Greeting and CONNECT in one write; the replies are read later.
fn pipelined_connect(relay: SocketAddr, target: &Target) -> TcpStream {
    let mut s = TcpStream::connect(relay).expect("connect to relay");
    let mut msg = greeting(&[0x00]);
    msg.extend(request(CMD_CONNECT, target));
    s.write_all(&msg).unwrap();
    s
}

/// A CONNECT through the relay, timed from the TCP connect to the success reply.
fn timed_connect(relay: SocketAddr, target: Target) -> (TcpStream, Duration) {
    let t0 = Instant::now();
    let mut s = pipelined_connect(relay, &target);
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice).unwrap();
    assert_eq!(choice, [0x05, 0x00]);
    let reply = read_reply(&mut s).expect("a reply");
    let took = t0.elapsed();
    assert_eq!(reply.rep, 0, "CONNECT {target:?}: {reply:?}");
    (s, took)
}

#[test]
fn never_answered_names_do_not_delay_names_that_are_answered() {
    let _guard = exclusive();
    raise_nofile_limit();
    let dns = dns_server();
    let echo = echo_server("127.0.0.1:0");
    let relay = relay_with_test_dns(&["--shards", "1"]);

    // Warm-up: the namespace resolves through the test's server.
    let (s, _) = timed_connect(
        relay.addr,
        Target::Domain("warm.fast.test".into(), echo.port()),
    );
    echo_roundtrip(&s, b"warm");

    // 1,000 CONNECTs to distinct names whose server never answers.
    let flood: Vec<TcpStream> = (0..1000)
        .map(|i| {
            pipelined_connect(
                relay.addr,
                &Target::Domain(format!("n{i}.slow.test"), echo.port()),
            )
        })
        .collect();
    dns.wait_for_slow_queries();
    std::thread::sleep(Duration::from_millis(300));

    // A fresh name answered at once, and an IP literal, are relayed promptly meanwhile.
    let mut fresh = Vec::new();
    let mut literal = Vec::new();
    for i in 0..5 {
        let name = Target::Domain(format!("fresh{i}.fast.test"), echo.port());
        let (s, took) = timed_connect(relay.addr, name);
        echo_roundtrip(&s, b"fresh");
        fresh.push(took);
        let ip = SocketAddr::from(([127, 0, 0, 1], echo.port()));
        let (s, took) = timed_connect(relay.addr, Target::Addr(ip));
        echo_roundtrip(&s, b"literal");
        literal.push(took);
    }
    fresh.sort();
    literal.sort();
    let (fresh_med, literal_med) = (fresh[2], literal[2]);
    eprintln!(
        "with 1,000 unanswered lookups in flight: fresh name {fresh:?}, IP literal {literal:?}"
    );
    assert!(
        fresh_med < Duration::from_millis(50),
        "a name answered at once took {fresh_med:?} (median of {fresh:?})"
    );
    assert!(
        literal_med < Duration::from_millis(10),
        "an IP literal took {literal_med:?} (median of {literal:?})"
    );

    // The flood's own clients are answered, not left hanging: past the queue bound at once
    // (REP 0x04), the rest by their connect timeout.
    let mut first = flood.into_iter().next_back().unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut choice = [0u8; 2];
    first.read_exact(&mut choice).unwrap();
    let reply = read_reply(&mut first).expect("a reply for the last of the flood");
    assert_eq!(reply.rep, 0x04, "{reply:?}");
    assert!(relay.stderr().len() < 4 << 20, "log flooded");
}

#[test]
fn udp_datagrams_to_names_that_never_resolve_do_not_stop_other_associations() {
    let _guard = exclusive();
    raise_nofile_limit();
    let dns = dns_server();
    let echo = UdpServer::echo("127.0.0.1:0");
    let relay = relay_with_test_dns(&["--shards", "1"]);

    // 500 associations, each sending 4 datagrams to names whose server never answers.
    let flood: Vec<UdpAssoc> = (0..500)
        .map(|i| {
            let a = UdpAssoc::open(relay.addr, "127.0.0.1:0");
            for j in 0..4 {
                let dst = Target::Domain(format!("u{i}-{j}.slow.test"), 9);
                a.send(0, &dst, b"lost");
            }
            a
        })
        .collect();
    dns.wait_for_slow_queries();

    // Another association gets its echo, from an IP literal and from a name answered at once.
    let other = UdpAssoc::open(relay.addr, "127.0.0.1:0");
    let t0 = Instant::now();
    other.expect_echo(echo.addr, b"literal");
    let literal = t0.elapsed();
    other.send(
        0,
        &Target::Domain("echo.fast.test".into(), echo.addr.port()),
        b"named",
    );
    let r = other
        .recv(Duration::from_secs(5))
        .expect("an echo via a name answered at once");
    assert_eq!(r.data, b"named");
    let named = t0.elapsed() - literal;
    eprintln!("with 2,000 unanswered datagram lookups: echo via IP literal {literal:?}, via name {named:?}");
    assert!(literal < Duration::from_millis(100), "{literal:?}");
    assert!(named < Duration::from_millis(200), "{named:?}");
    // The flooding associations are still open (their control connections are served).
    drop(flood);
}
