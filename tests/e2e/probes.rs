//! Raw-socket SOCKS5 probes against the real relay: error replies, closing after errors,
//! fragmented and pipelined handshakes, garbage, handshake timeouts and BND.ADDR.

use crate::common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

const CLOSE_WITHIN: Duration = Duration::from_secs(2);

/// Send greeting (no auth) + `req` raw; return REP and check the relay then closes.
fn probe_rep(relay: SocketAddr, req: &[u8], what: &str) -> u8 {
    let mut s = connect(relay);
    let m = greet(&mut s, &[0x00]);
    assert_eq!(m, [0x05, 0x00], "{what}: method reply");
    s.write_all(req).unwrap();
    let r = read_reply(&mut s).unwrap_or_else(|e| panic!("{what}: reading reply: {e}"));
    if r.rep != 0x00 {
        assert_closed(&mut s, CLOSE_WITHIN, &format!("{what}: after error reply"));
    }
    r.rep
}

/// Sends a greeting offering `methods` and returns the server's two-byte method selection.
fn greet(s: &mut std::net::TcpStream, methods: &[u8]) -> [u8; 2] {
    s.write_all(&greeting(methods)).unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).unwrap();
    m
}

#[test]
fn rep_05_connection_refused_for_closed_port() {
    let _guard = shared();
    let relay = Relay::start(&[]);
    let dead = closed_port();
    let rep = probe_rep(
        relay.addr,
        &request(CMD_CONNECT, &Target::Addr(dead)),
        "closed port",
    );
    assert_eq!(rep, 0x05, "CONNECT to closed port {dead}");
}

#[test]
fn rep_07_for_unknown_command_0x09() {
    let _guard = shared();
    let relay = Relay::start(&[]);
    let echo = echo_server("127.0.0.1:0");
    let rep = probe_rep(relay.addr, &request(0x09, &echo.addr.into()), "cmd 0x09");
    assert_eq!(rep, 0x07);
    assert_eq!(echo.accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[test]
fn udp_associate_gets_rep_00_and_a_usable_bnd() {
    let _guard = shared();
    let relay = Relay::start(&["--shards", "1"]);
    let echo = UdpServer::echo("127.0.0.1:0");
    let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
    let mut s = connect(relay.addr);
    let m = greet(&mut s, &[0x00]);
    assert_eq!(m, [0x05, 0x00], "method reply");
    s.write_all(&request(CMD_UDP_ASSOCIATE, &any.into()))
        .unwrap();
    let r = read_reply(&mut s).expect("UDP ASSOCIATE reply");
    let bnd = usable_bnd(&r, "UDP ASSOCIATE");
    assert_eq!(
        bnd.ip(),
        relay.addr.ip(),
        "BND.ADDR is the control connection's local address"
    );
    // Usable: a datagram to BND reaches the target and the echo comes back wrapped.
    let a = UdpAssoc {
        control: s,
        sock: udp_bind("127.0.0.1:0"),
        relay_udp: bnd,
        reply: r,
    };
    a.expect_echo(echo.addr, b"UDP ASSOCIATE works");
}

#[test]
fn rep_08_for_atyp_0x02() {
    let _guard = shared();
    let relay = Relay::start(&[]);
    // 05 01 00 02 + four address-ish bytes + port: the relay must answer at ATYP.
    let req = [0x05, 0x01, 0x00, 0x02, 127, 0, 0, 1, 0x1f, 0x90];
    let rep = probe_rep(relay.addr, &req, "ATYP 0x02");
    assert_eq!(rep, 0x08);
}

#[test]
fn no_acceptable_method_for_gssapi_only() {
    let _guard = shared();
    let relay = Relay::start(&[]);
    let mut s = connect(relay.addr);
    let m = greet(&mut s, &[0x01]);
    assert_eq!(m, [0x05, 0xFF], "greeting offering only GSSAPI");
    assert_closed(&mut s, CLOSE_WITHIN, "after 05 FF");
}

#[test]
fn no_acceptable_method_for_no_auth_when_users_configured() {
    let _guard = shared();
    let relay = Relay::start(&["--user", "alice:secret"]);
    let mut s = connect(relay.addr);
    let m = greet(&mut s, &[0x00]);
    assert_eq!(m, [0x05, 0xFF]);
    assert_closed(&mut s, CLOSE_WITHIN, "after 05 FF");
}

#[test]
fn wrong_password_gets_01_01_and_close() {
    let _guard = shared();
    let relay = Relay::start(&["--user", "alice:secret"]);
    let mut s = connect(relay.addr);
    let m = greet(&mut s, &[0x02]);
    assert_eq!(m, [0x05, 0x02]);
    s.write_all(&auth_request("alice", "nope")).unwrap();
    let mut r = [0u8; 2];
    s.read_exact(&mut r).unwrap();
    assert_eq!(r, [0x01, 0x01]);
    assert_closed(&mut s, CLOSE_WITHIN, "after auth failure");
    // And the right password then works, with data flowing.
    let echo = echo_server("127.0.0.1:0");
    let (s, rep) = socks_request(
        relay.addr,
        Some(("alice", "secret")),
        CMD_CONNECT,
        &echo.addr.into(),
    )
    .unwrap();
    assert_eq!(rep.rep, 0x00);
    echo_roundtrip(&s, b"authenticated data");
}

#[test]
fn rep_04_for_unresolvable_domain() {
    let _guard = shared();
    let relay = Relay::start(&[]);
    let rep = probe_rep(
        relay.addr,
        &request(
            CMD_CONNECT,
            &Target::Domain("no-such-host.ringsocks-test.invalid".into(), 80),
        ),
        "domain under .invalid",
    );
    assert_eq!(rep, 0x04);
}

#[test]
fn connect_by_domain_localhost_and_ipv6() {
    let _guard = shared();
    let relay = Relay::start(&[]);
    let echo = echo_server("127.0.0.1:0");
    let s = socks_connect(relay.addr, Target::Domain("localhost".into(), echo.port()));
    // localhost may resolve to ::1 first where nothing listens: the relay must fall back.
    echo_roundtrip(&s, b"via domain");
    if has_ipv6_loopback() {
        let echo6 = echo_server("[::1]:0");
        let s = socks_connect(relay.addr, echo6.addr);
        echo_roundtrip(&s, b"via ipv6");
    }
}

#[test]
fn handshake_byte_by_byte_then_data_flows() {
    let _guard = shared();
    let echo = echo_server("127.0.0.1:0");
    for mode in FORWARD_MODES {
        let relay = Relay::start(&["--forward", mode]);
        let mut s = connect(relay.addr);
        let g = greeting(&[0x00]);
        let req = request(CMD_CONNECT, &echo.addr.into());
        for b in g.iter() {
            s.write_all(&[*b]).unwrap();
            s.flush().unwrap();
            thread::sleep(Duration::from_millis(5));
        }
        let mut m = [0u8; 2];
        s.read_exact(&mut m).unwrap();
        assert_eq!(m, [0x05, 0x00]);
        for b in req.iter() {
            s.write_all(&[*b]).unwrap();
            s.flush().unwrap();
            thread::sleep(Duration::from_millis(5));
        }
        let r = read_reply(&mut s).unwrap();
        assert_eq!(r.rep, 0x00, "[{mode}] byte-by-byte CONNECT");
        echo_roundtrip(&s, &prng_bytes(3, 100_000));
    }
}

#[test]
fn handshake_byte_by_byte_with_auth() {
    let _guard = shared();
    let relay = Relay::start(&["--user", "alice:secret"]);
    let echo = echo_server("127.0.0.1:0");
    let mut s = connect(relay.addr);
    let mut all = greeting(&[0x02]);
    all.extend(auth_request("alice", "secret"));
    all.extend(request(CMD_CONNECT, &echo.addr.into()));
    for b in all.iter() {
        s.write_all(&[*b]).unwrap();
        s.flush().unwrap();
        thread::sleep(Duration::from_millis(3));
    }
    let mut m = [0u8; 4];
    s.read_exact(&mut m).unwrap();
    assert_eq!(m, [0x05, 0x02, 0x01, 0x00]);
    let r = read_reply(&mut s).unwrap();
    assert_eq!(r.rep, 0x00);
    echo_roundtrip(&s, b"byte by byte with auth");
}

#[test]
fn pipelined_handshake_and_early_payload_in_one_write() {
    let _guard = shared();
    let echo = echo_server("127.0.0.1:0");
    for mode in FORWARD_MODES {
        let relay = Relay::start(&["--forward", mode]);
        let mut s = connect(relay.addr);
        let early = b"early payload sent before the CONNECT reply\n";
        let mut all = greeting(&[0x00]);
        all.extend(request(CMD_CONNECT, &echo.addr.into()));
        all.extend_from_slice(early);
        s.write_all(&all).unwrap();
        let mut m = [0u8; 2];
        s.read_exact(&mut m).unwrap();
        assert_eq!(m, [0x05, 0x00]);
        let r = read_reply(&mut s).unwrap();
        assert_eq!(r.rep, 0x00, "[{mode}] pipelined CONNECT");
        let mut got = vec![0u8; early.len()];
        s.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("[{mode}] early payload not echoed: {e}"));
        assert_eq!(&got[..], &early[..], "[{mode}] early payload");
        echo_roundtrip(&s, b"and more after");
    }
}

#[test]
fn pipelined_auth_handshake_in_one_write() {
    let _guard = shared();
    let relay = Relay::start(&["--user", "alice:secret"]);
    let echo = echo_server("127.0.0.1:0");
    let mut s = connect(relay.addr);
    let mut all = greeting(&[0x02]);
    all.extend(auth_request("alice", "secret"));
    all.extend(request(CMD_CONNECT, &echo.addr.into()));
    all.extend_from_slice(b"early");
    s.write_all(&all).unwrap();
    let mut m = [0u8; 4];
    s.read_exact(&mut m).unwrap();
    assert_eq!(m, [0x05, 0x02, 0x01, 0x00]);
    assert_eq!(read_reply(&mut s).unwrap().rep, 0x00);
    let mut got = [0u8; 5];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"early");
}

fn garbage_is_rejected(relay: SocketAddr, garbage: &[u8], what: &str) {
    let mut s = connect(relay);
    // The relay may close before reading all of it; a failed write is acceptable.
    let _ = s.write_all(garbage);
    let (o, el) = wait_closed(&mut s, Duration::from_secs(4));
    match o {
        CloseOutcome::Closed { extra } => assert!(
            extra.is_empty() || extra == [0x05, 0xFF],
            "{what}: unexpected answer {extra:02x?}"
        ),
        CloseOutcome::StillOpen { extra } => {
            panic!("{what}: still open after {el:?} (got {extra:02x?})")
        }
    }
}

#[test]
fn garbage_is_answered_and_closed_then_relay_still_works() {
    let _guard = shared();
    let http = http_server("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}/", http.port());
    let relay = Relay::start(&["--handshake-timeout", "2s"]);
    garbage_is_rejected(
        relay.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        "HTTP request",
    );
    let mut rnd = prng_bytes(0xBAD, 64);
    if rnd[0] == 0x05 {
        rnd[0] = 0x47;
    }
    garbage_is_rejected(relay.addr, &rnd, "64 random bytes");
    // Version 4 (SOCKS4) greeting.
    garbage_is_rejected(
        relay.addr,
        &[0x04, 0x01, 0x00, 0x50, 127, 0, 0, 1, 0],
        "SOCKS4",
    );
    // Zero methods.
    garbage_is_rejected(relay.addr, &[0x05, 0x00], "zero methods");
    // Request with a bad version after a good greeting.
    {
        let mut s = connect(relay.addr);
        let m = greet(&mut s, &[0x00]);
        assert_eq!(m, [0x05, 0x00]);
        let _ = s.write_all(&[0x04, 0x01, 0x00, 0x01, 127, 0, 0, 1, 0, 80]);
        let (o, _) = wait_closed(&mut s, Duration::from_secs(4));
        assert!(
            matches!(o, CloseOutcome::Closed { .. }),
            "bad request version must be closed, got {o:?}"
        );
    }
    assert_eq!(curl_ok(relay.addr, &url), b"hello\n");
}

fn assert_closed_by_handshake_timeout(mut s: TcpStream, start: Instant, what: &str) {
    let (o, _) = wait_closed(&mut s, Duration::from_secs(5));
    let el = start.elapsed();
    assert!(
        matches!(o, CloseOutcome::Closed { ref extra } if extra.is_empty()),
        "{what}: expected close by --handshake-timeout 1s, got {o:?} after {el:?}"
    );
    assert!(
        el >= Duration::from_millis(500),
        "{what}: closed too early ({el:?}) for a 1 s handshake timeout"
    );
    assert!(
        el <= Duration::from_millis(3500),
        "{what}: closed too late ({el:?}) for a 1 s handshake timeout"
    );
}

#[test]
fn silent_client_closed_by_handshake_timeout() {
    let _guard = shared();
    let relay = Relay::start(&["--handshake-timeout", "1s"]);
    let start = Instant::now();
    let s = connect(relay.addr);
    assert_closed_by_handshake_timeout(s, start, "silent client");
}

#[test]
fn half_handshake_closed_by_handshake_timeout() {
    let _guard = shared();
    let relay = Relay::start(&["--handshake-timeout", "1s"]);
    // Greeting only.
    let start = Instant::now();
    let mut s = connect(relay.addr);
    let m = greet(&mut s, &[0x00]);
    assert_eq!(m, [0x05, 0x00]);
    assert_closed_by_handshake_timeout(s, start, "greeting only");
    // Partial greeting (1 byte of 3).
    let start = Instant::now();
    let mut s = connect(relay.addr);
    s.write_all(&[0x05]).unwrap();
    assert_closed_by_handshake_timeout(s, start, "partial greeting");
    // Partial request.
    let start = Instant::now();
    let mut s = connect(relay.addr);
    greet(&mut s, &[0x00]);
    s.write_all(&[0x05, 0x01, 0x00, 0x01, 127]).unwrap();
    assert_closed_by_handshake_timeout(s, start, "partial request");
}

#[test]
fn handshake_timeout_does_not_cut_established_tunnels() {
    let _guard = shared();
    let echo = echo_server("127.0.0.1:0");
    let relay = Relay::start(&["--handshake-timeout", "1s"]);
    let s = socks_connect(relay.addr, echo.addr);
    thread::sleep(Duration::from_millis(1800));
    echo_roundtrip(&s, b"still alive after the handshake timeout");
}

#[test]
fn bnd_addr_is_the_relays_outbound_local_address() {
    let _guard = shared();
    let srv = peer_server("127.0.0.1:0");
    for mode in FORWARD_MODES {
        let relay = Relay::start(&["--forward", mode]);
        let (mut s, r) = socks_request(relay.addr, None, CMD_CONNECT, &srv.addr.into()).unwrap();
        assert_eq!(r.rep, 0x00);
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while line.len() < 100 {
            s.read_exact(&mut b).unwrap();
            if b[0] == b'\n' {
                break;
            }
            line.push(b[0]);
        }
        let seen: SocketAddr = String::from_utf8_lossy(&line).parse().unwrap();
        assert_eq!(
            r.bnd,
            BndAddr::Addr(seen),
            "[{mode}] BND.ADDR/BND.PORT must equal the outbound connection's local address \
             (what the target sees as its peer)"
        );
    }
}
