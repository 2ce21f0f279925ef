//! Running out of file descriptors at accept: the relay logs, backs off without spinning, and
//! serves again once descriptors are free. The relay runs under `prlimit --nofile=64`.

use crate::common::*;
use std::net::TcpStream;
use std::time::{Duration, Instant};

#[test]
fn emfile_at_accept_backs_off_and_recovers() {
    let _guard = exclusive();
    require_tool("prlimit");
    let http = http_server("127.0.0.1:0").unwrap();
    let relay = Relay::start_wrapped(
        &["prlimit", "--nofile=64:64"],
        // A connection limit past what 64 descriptors hold, so that accept runs into EMFILE.
        &[
            "--shards",
            "1",
            "--handshake-timeout",
            "60s",
            "--max-connections",
            "100000",
        ],
    );
    // Far more connections than 64 fds plus a 64-slot fixed-file table can hold: the kernel
    // completes them into the listen backlog, and the relay's accept runs into EMFILE.
    let mut flood: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(relay.addr).expect("connect to relay"))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !relay.stderr().contains("accept failed") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        relay.stderr().contains("accept failed"),
        "no 'accept failed' log line; stderr:\n{}",
        relay.stderr()
    );
    // Backing off, not spinning: over 2 s the relay uses well under a core.
    let t0 = proc_cpu_ticks(relay.pid());
    std::thread::sleep(Duration::from_secs(2));
    let used = proc_cpu_ticks(relay.pid()) - t0;
    assert!(
        used < 50,
        "relay used {used} ticks of CPU in 2 s while out of fds"
    );
    let lines = relay.stderr().matches("accept failed").count();
    assert!(
        lines < 100,
        "{lines} 'accept failed' lines: the log is not rate limited"
    );

    // Free the descriptors: the relay accepts again and serves curl.
    flood.clear();
    let deadline = Instant::now() + Duration::from_secs(20);
    let url = format!("http://127.0.0.1:{}/", http.port());
    loop {
        let out = curl(&[
            "-s",
            "--max-time",
            "5",
            "--socks5",
            &relay.addr.to_string(),
            &url,
        ]);
        if out.status.success() {
            assert_eq!(out.stdout, b"hello\n");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "relay did not recover after fds were freed; stderr:\n{}",
            relay.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A connection the relay closed at accept: EOF or a reset, and no method reply.
fn assert_refused_at_accept(mut s: TcpStream, what: &str) {
    use std::io::{Read, Write};
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(&greeting(&[0x00]));
    let mut b = [0u8; 2];
    match s.read(&mut b) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!(
            "{what}: got {:02x?} instead of a closed connection",
            &b[..n]
        ),
    }
}

/// A connection that got through the greeting (the relay admitted it).
fn admitted(relay: std::net::SocketAddr) -> TcpStream {
    let mut s = connect(relay);
    assert_eq!(negotiate(&mut s, None).unwrap(), 0x00);
    s
}

/// Connects to `relay` from source address `from`.
fn connect_from(from: &str, relay: std::net::SocketAddr) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let src: std::net::SocketAddr = format!("{from}:0").parse().unwrap();
    sock.bind(&src.into()).unwrap();
    sock.connect(&relay.into()).unwrap();
    sock.into()
}

fn wait_for_log(relay: &Relay, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !relay.stderr().contains(needle) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        relay.stderr().contains(needle),
        "no {needle:?} in the log:\n{}",
        relay.stderr()
    );
}

#[test]
fn max_connections_refuses_at_accept_and_admits_again_once_one_closes() {
    let _guard = shared();
    let echo = echo_server("127.0.0.1:0");
    let relay = Relay::start(&["--shards", "2", "--max-connections", "3"]);
    let held: Vec<TcpStream> = (0..3).map(|_| admitted(relay.addr)).collect();
    for i in 0..5 {
        assert_refused_at_accept(connect(relay.addr), &format!("connection {} of 3", 4 + i));
    }
    wait_for_log(&relay, "connections refused at accept");
    let log = relay.stderr();
    assert!(log.contains("limit=\"--max-connections\""), "{log}");
    // At most one line a second per shard, each with its count.
    let lines = log.matches("connections refused at accept").count();
    assert!((1..=2).contains(&lines), "{lines} lines:\n{log}");
    // One closes: a new client is served, end to end.
    drop(held.into_iter().next());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match socks_request(
            relay.addr,
            None,
            CMD_CONNECT,
            &Target::Addr(std::net::SocketAddr::from(([127, 0, 0, 1], echo.port()))),
        ) {
            Ok((s, r)) if r.rep == 0 => {
                echo_roundtrip(&s, b"admitted again");
                break;
            }
            other => {
                assert!(Instant::now() < deadline, "not admitted again: {other:?}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

#[test]
fn max_connections_per_ip_refuses_one_address_and_serves_another() {
    let _guard = shared();
    let relay = Relay::start(&["--max-connections-per-ip", "2"]);
    let _a: Vec<TcpStream> = (0..2).map(|_| admitted(relay.addr)).collect();
    assert_refused_at_accept(connect(relay.addr), "third from 127.0.0.1");
    let mut other = connect_from("127.0.0.2", relay.addr);
    other
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(
        negotiate(&mut other, None).unwrap(),
        0x00,
        "127.0.0.2 is served"
    );
    wait_for_log(&relay, "limit=\"--max-connections-per-ip\"");
}

#[test]
fn max_connections_per_user_answers_rep_02_past_the_cap() {
    let _guard = shared();
    let echo = echo_server("127.0.0.1:0");
    let relay = Relay::start(&[
        "--user",
        "alice:secret",
        "--user",
        "bob:secret",
        "--max-connections-per-user",
        "1",
    ]);
    let dst = Target::Addr(std::net::SocketAddr::from(([127, 0, 0, 1], echo.port())));
    let (first, r) =
        socks_request(relay.addr, Some(("alice", "secret")), CMD_CONNECT, &dst).unwrap();
    assert_eq!(r.rep, 0);
    let (mut second, r) =
        socks_request(relay.addr, Some(("alice", "secret")), CMD_CONNECT, &dst).unwrap();
    assert_eq!(
        r.rep, 0x02,
        "alice's second connection: not allowed by ruleset"
    );
    assert_closed(&mut second, Duration::from_secs(5), "refused request");
    let (bob, r) = socks_request(relay.addr, Some(("bob", "secret")), CMD_CONNECT, &dst).unwrap();
    assert_eq!(r.rep, 0, "bob has his own cap");
    echo_roundtrip(&bob, b"bob");
    echo_roundtrip(&first, b"alice");
    wait_for_log(&relay, "limit=\"--max-connections-per-user\"");
    // Alice's first tunnel closes: she may connect again.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (s, r) =
            socks_request(relay.addr, Some(("alice", "secret")), CMD_CONNECT, &dst).unwrap();
        if r.rep == 0 {
            echo_roundtrip(&s, b"alice again");
            break;
        }
        assert!(Instant::now() < deadline, "alice not admitted again");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn limit_flags_are_checked() {
    let _guard = shared();
    for (args, needle) in [
        (
            &["--max-connections", "0"][..],
            "--max-connections: must be at least 1",
        ),
        (
            &["--max-connections-per-user", "2"][..],
            "--max-connections-per-user: needs users",
        ),
    ] {
        let f = Relay::try_start(args).err().expect("refused to start");
        assert!(format!("{f:?}").contains(needle), "{args:?}: {f:?}");
    }
}

#[test]
fn tcp_keepalive_probes_client_connections() {
    let _guard = shared();
    let relay = Relay::start(&["--tcp-keepalive", "45s"]);
    let _c = admitted(relay.addr);
    // The relay's end of the client connection runs a keepalive timer.
    let text = ss_established(relay.addr.port(), true);
    assert!(text.contains("timer:(keepalive"), "ss says:\n{text}");
    let without = Relay::start(&[]);
    let _d = admitted(without.addr);
    assert!(!ss_established(without.addr.port(), true).contains("keepalive"));
}
