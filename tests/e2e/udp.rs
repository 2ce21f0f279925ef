//! UDP ASSOCIATE end to end, on loopback: PySocks clients (echo, a DNS query to a local
//! stub, two targets, control-connection close), raw probes with hand-built RFC 1928 §7
//! headers (third parties, DST naming the target, IPv6, 65,000-byte datagrams, malformed
//! headers, domain targets, BND.ADDR), FRAG reassembly, the client-check modes and the
//! association's lifetime.
//!
//! The generic tests also run against another server through `RINGSOCKS_TEST_BIN`
//! (`tests/support/dante-shim.sh`); tests of ringsocks' own flags and log lines return
//! early there (`skip_unless_ringsocks`).

use crate::common::*;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

/// How long "nothing arrives" is watched for.
const NOTHING_WITHIN: Duration = Duration::from_secs(1);
/// How long a relay gets to log an association's end.
const LOG_WITHIN: Duration = Duration::from_secs(5);

fn relay1(extra: &[&str]) -> Relay {
    let mut args = vec!["--shards", "1"];
    args.extend_from_slice(extra);
    Relay::start(&args)
}

fn t(a: SocketAddr) -> Target {
    Target::Addr(a)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The relay logs `udp association closed ... key=N ...` once per association: wait for
/// the `n`th such line (after the control connections were closed) and return it.
fn closed_line(relay: &Relay, n: usize) -> String {
    let lines = wait_log_lines(relay, "udp association closed", n, LOG_WITHIN);
    assert!(
        lines.len() >= n,
        "expected {n} `udp association closed` log lines within {LOG_WITHIN:?}, got {}:\n{}",
        lines.len(),
        relay.stderr()
    );
    lines[n - 1].clone()
}

fn field(line: &str, key: &str) -> u64 {
    log_field(line, key).unwrap_or_else(|| panic!("no `{key}=N` in the log line: {line}"))
}

/// Nothing from the relay reaches `sock` within `within`.
fn assert_no_reply(sock: &UdpSocket, relay_udp: SocketAddr, within: Duration, what: &str) {
    if let Some(r) = recv_reply(sock, relay_udp, within) {
        panic!("{what}: expected no datagram from the relay, got {r:?}");
    }
}

/// The target saw exactly `want` (in order), also after `NOTHING_WITHIN` more.
fn assert_target_saw(target: &UdpServer, want: &[&[u8]], what: &str) {
    thread::sleep(NOTHING_WITHIN);
    let got = target.payloads();
    let show = |v: &[Vec<u8>]| -> Vec<String> {
        v.iter()
            .map(|d| String::from_utf8_lossy(&d[..d.len().min(60)]).into_owned())
            .collect()
    };
    let want: Vec<Vec<u8>> = want.iter().map(|d| d.to_vec()).collect();
    assert!(
        got == want,
        "{what}: target {} received {:?}, expected {:?}",
        target.addr,
        show(&got),
        show(&want)
    );
}

// ---------------------------------------------------------------------------
// PySocks
// ---------------------------------------------------------------------------

/// Runs `tests/support/SCRIPT MODE ARGS..` with the system Python and expects its "OK" line.
fn support_py(script: &str, mode: &str, args: &[String]) -> String {
    let py = python_with_socks();
    let mut argv = vec![
        support_script(script).display().to_string(),
        mode.to_string(),
    ];
    argv.extend_from_slice(args);
    let (st, out, err) = run_bounded(&py, &argv, Duration::from_secs(60));
    assert!(
        st.is_some_and(|s| s.success()) && out.contains("OK"),
        "{py:?} {script} {mode} {args:?} failed (status {st:?})\nstdout:\n{out}\nstderr:\n{err}"
    );
    println!("{script} {mode}: {}", out.trim());
    out
}

fn pysocks(mode: &str, args: &[(&str, String)]) -> String {
    let argv: Vec<String> = args
        .iter()
        .flat_map(|(k, v)| [k.to_string(), v.clone()])
        .collect();
    support_py("udp_pysocks.py", mode, &argv)
}

#[test]
fn pysocks_echo() {
    let _guard = shared();
    let relay = relay1(&[]);
    let echo = UdpServer::echo("127.0.0.1:0");
    pysocks(
        "echo",
        &[
            ("--proxy", relay.addr.to_string()),
            ("--target", echo.addr.to_string()),
        ],
    );
    assert_eq!(echo.received(), 6, "the target saw every datagram once");
}

#[test]
fn pysocks_dns_query_to_a_local_stub() {
    let _guard = shared();
    let relay = relay1(&[]);
    let stub = Helper::start(
        &python_with_socks(),
        &[
            support_script("dns_stub.py").display().to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--answer".into(),
            "127.3.2.1".into(),
            "--lifetime".into(),
            "120".into(),
        ],
    );
    let server = stub
        .ready_line
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("DNS stub said {:?}", stub.ready_line))
        .to_string();
    pysocks(
        "dns",
        &[
            ("--proxy", relay.addr.to_string()),
            ("--server", server),
            ("--name", "udp-assoc.ringsocks.test".into()),
            ("--expect", "127.3.2.1".into()),
        ],
    );
    let log = stub.output.lock().unwrap().clone();
    assert!(
        log.contains("query udp-assoc.ringsocks.test 1 from 127.0.0.1:"),
        "the stub saw the query from the relay's loopback address; its log:\n{log}"
    );
}

#[test]
fn pysocks_one_association_two_targets() {
    let _guard = shared();
    let relay = relay1(&[]);
    let a = UdpServer::echo("127.0.0.1:0");
    let b = UdpServer::echo("127.0.0.2:0");
    pysocks(
        "two-targets",
        &[
            ("--proxy", relay.addr.to_string()),
            ("--target", a.addr.to_string()),
            ("--target2", b.addr.to_string()),
        ],
    );
    assert_eq!((a.received(), b.received()), (4, 4));
}

#[test]
fn pysocks_nothing_relayed_after_control_close() {
    let _guard = shared();
    let relay = relay1(&[]);
    let echo = UdpServer::echo("127.0.0.1:0");
    pysocks(
        "control-close",
        &[
            ("--proxy", relay.addr.to_string()),
            ("--target", echo.addr.to_string()),
        ],
    );
    assert_target_saw(
        &echo,
        &[b"before the control connection closes"],
        "after the PySocks control connection closed",
    );
}

// ---------------------------------------------------------------------------
// Raw probes: sources, addresses, sizes
// ---------------------------------------------------------------------------

#[test]
fn associate_reply_bnd_is_usable() {
    let _guard = shared();
    let relay = relay1(&[]);
    let echo = UdpServer::echo("127.0.0.1:0");
    // DST all zeros: the client does not know its endpoint yet.
    let sock = udp_bind("127.0.0.1:0");
    let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
    let a = UdpAssoc::open_with(relay.addr, sock, &t(any));
    assert_eq!(
        a.relay_udp.ip(),
        relay.addr.ip(),
        "BND.ADDR is the control connection's local address"
    );
    a.expect_echo(echo.addr, b"zeros in DST");
    a.expect_echo(echo.addr, b"and again");
}

#[test]
fn third_party_source_is_not_relayed() {
    let _guard = shared();
    let relay = relay1(&[]);
    let echo = UdpServer::echo("127.0.0.1:0");
    let a = UdpAssoc::open(relay.addr, "127.0.0.1:0");
    let third = udp_bind("127.0.0.2:0");
    let from_third = |p: &[u8]| {
        third
            .send_to(&udp_datagram(0, &t(echo.addr), p), a.relay_udp)
            .unwrap();
    };
    // Before the client's first datagram and after it.
    from_third(b"third party, first");
    a.expect_echo(echo.addr, b"client, first");
    from_third(b"third party, second");
    a.expect_echo(echo.addr, b"client, second");
    assert_no_reply(&third, a.relay_udp, NOTHING_WITHIN, "third party");
    assert_target_saw(&echo, &[b"client, first", b"client, second"], "third party");
    if testing_ringsocks() {
        drop(a);
        let line = closed_line(&relay, 1);
        assert!(field(&line, "dropped_foreign") >= 2, "{line}");
        assert_eq!(field(&line, "relayed_out"), 2, "{line}");
        assert_eq!(field(&line, "relayed_in"), 2, "{line}");
    }
}

/// Some clients put the target's address in the request's DST. On loopback that is only
/// distinguishable from a client endpoint when the target's IP differs from the client's.
/// ringsocks-only: Dante takes DST as the client's address (RFC 1928: "the address and
/// port that the client expects to use to send UDP datagrams") and drops everything else.
#[test]
fn dst_naming_the_target_works() {
    let _guard = shared();
    if skip_unless_ringsocks("dst_naming_the_target_works") {
        return;
    }
    let relay = relay1(&[]);
    let echo = UdpServer::echo("127.0.0.2:0");
    let sock = udp_bind("127.0.0.1:0");
    let a = UdpAssoc::open_with(relay.addr, sock, &t(echo.addr));
    for i in 0..3 {
        a.expect_echo(echo.addr, format!("DST named the target, {i}").as_bytes());
    }
}

#[test]
fn ipv6_client_and_ipv6_target() {
    let _guard = shared();
    if !has_ipv6_loopback() {
        println!("note: no IPv6 loopback here; skipped");
        return;
    }
    let relay = relay1(&["--listen", "[::1]:0"]);
    let echo = UdpServer::echo("[::1]:0");
    let a = UdpAssoc::open(relay.addr, "[::1]:0");
    assert_eq!(a.relay_udp.ip(), ip("::1"), "BND.ADDR {:?}", a.reply);
    a.expect_echo(echo.addr, b"over IPv6");
    a.send(0, &t(echo.addr), b"ATYP");
    let r = a.recv(Duration::from_secs(5)).expect("echo");
    assert_eq!(r.atyp, 0x04, "an IPv6 replier is reported as ATYP 4");
}

#[test]
fn mixed_families_and_reply_atyp() {
    let _guard = shared();
    if !has_ipv6_loopback() {
        println!("note: no IPv6 loopback here; skipped");
        return;
    }
    let echo4 = UdpServer::echo("127.0.0.1:0");
    let echo6 = UdpServer::echo("[::1]:0");
    // IPv4 client, IPv6 target: ATYP 4 in the reply.
    let relay = relay1(&[]);
    let a = UdpAssoc::open(relay.addr, "127.0.0.1:0");
    a.expect_echo(echo6.addr, b"v4 client to a v6 target");
    a.expect_echo(echo4.addr, b"and to a v4 target");
    // IPv6 client, IPv4 target: ATYP 1 with the plain IPv4 address (never v4-mapped).
    let relay6 = relay1(&["--listen", "[::1]:0"]);
    let b = UdpAssoc::open(relay6.addr, "[::1]:0");
    b.send(0, &t(echo4.addr), b"v6 client to a v4 target");
    let r = b
        .recv(Duration::from_secs(5))
        .expect("echo from the IPv4 target");
    assert_eq!(
        (r.atyp, &r.src),
        (0x01, &BndAddr::Addr(echo4.addr)),
        "an IPv4 replier is reported as ATYP 1, not v4-mapped"
    );
    assert_eq!(r.data, b"v6 client to a v4 target");
}

#[test]
fn datagram_of_65000_bytes_both_ways() {
    let _guard = shared();
    let relay = relay1(&[]);
    let echo = UdpServer::echo("127.0.0.1:0");
    let a = UdpAssoc::open(relay.addr, "127.0.0.1:0");
    let payload = prng_bytes(65_000, 65_000);
    a.expect_echo(echo.addr, &payload);
    let log = echo.log.lock().unwrap().clone();
    assert_eq!(log.len(), 1);
    assert!(
        log[0].1 == payload,
        "the target got the 65,000 bytes intact"
    );
    // And the largest payload that fits an IPv4 datagram with a 10-byte header.
    let max = prng_bytes(65_497, 65_507 - 10);
    a.expect_echo(echo.addr, &max);
}

#[test]
fn malformed_headers_are_dropped_and_the_association_survives() {
    let _guard = shared();
    let relay = relay1(&[]);
    let echo = UdpServer::echo("127.0.0.1:0");
    let a = UdpAssoc::open(relay.addr, "127.0.0.1:0");
    let [o1, o2, o3, o4] = match echo.addr.ip() {
        IpAddr::V4(v) => v.octets(),
        IpAddr::V6(_) => unreachable!(),
    };
    let [p1, p2] = echo.port().to_be_bytes();
    let garbage_payload = b"GARBAGE must not be relayed";
    let with = |head: &[u8]| {
        let mut v = head.to_vec();
        v.extend_from_slice(garbage_payload);
        v
    };
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty datagram", vec![]),
        ("2 bytes", vec![0, 0]),
        ("3 bytes", vec![0, 0, 0]),
        ("ATYP 2", with(&[0, 0, 0, 2, o1, o2, o3, o4, p1, p2])),
        ("ATYP 0", with(&[0, 0, 0, 0, o1, o2, o3, o4, p1, p2])),
        ("ATYP 5", with(&[0, 0, 0, 5, o1, o2, o3, o4, p1, p2])),
        ("truncated IPv4 address", vec![0, 0, 0, 1, o1, o2]),
        ("truncated port", vec![0, 0, 0, 1, o1, o2, o3, o4, p1]),
        (
            "truncated IPv6 address",
            vec![0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0],
        ),
        (
            "domain longer than the datagram",
            vec![0, 0, 0, 3, 60, b'l', b'o', b'c'],
        ),
    ];
    // RFC 1928 only calls RSV reserved: Dante ignores it; ringsocks drops a non-zero RSV.
    if testing_ringsocks() {
        cases.push(("RSV 01 00", with(&[1, 0, 0, 1, o1, o2, o3, o4, p1, p2])));
        cases.push(("RSV 00 ff", with(&[0, 0xff, 0, 1, o1, o2, o3, o4, p1, p2])));
    }
    for (what, d) in &cases {
        println!("malformed: {what}");
        a.send_raw(d);
        // A valid datagram right behind each bad one: the association keeps working.
        a.expect_echo(echo.addr, format!("valid after {what}").as_bytes());
    }
    let want: Vec<Vec<u8>> = cases
        .iter()
        .map(|(w, _)| format!("valid after {w}").into_bytes())
        .collect();
    let want: Vec<&[u8]> = want.iter().map(|v| v.as_slice()).collect();
    assert_target_saw(&echo, &want, "malformed headers");
    if testing_ringsocks() {
        drop(a);
        let line = closed_line(&relay, 1);
        assert_eq!(
            field(&line, "dropped_malformed"),
            cases.len() as u64,
            "{line}"
        );
        assert_eq!(field(&line, "relayed_out"), cases.len() as u64, "{line}");
    }
}

/// Echo servers on 127.0.0.1:P and [::1]:P, so `localhost:P` reaches one of them whatever
/// the resolver returns first.
fn udp_echo_localhost() -> (UdpServer, Option<UdpServer>) {
    for _ in 0..20 {
        let v4 = UdpServer::echo("127.0.0.1:0");
        if !has_ipv6_loopback() {
            return (v4, None);
        }
        if let Ok(v6) =
            UdpServer::try_start(&format!("[::1]:{}", v4.port()), true, 1, 4 << 20, true)
        {
            return (v4, Some(v6));
        }
    }
    panic!("could not bind UDP echo servers on the same port on 127.0.0.1 and [::1]");
}

#[test]
fn domain_target_localhost() {
    let _guard = shared();
    let relay = relay1(&[]);
    let (v4, v6) = udp_echo_localhost();
    let port = v4.port();
    let a = UdpAssoc::open(relay.addr, "127.0.0.1:0");
    for i in 0..3 {
        let payload = format!("to localhost, {i}");
        a.send(
            0,
            &Target::Domain("localhost".into(), port),
            payload.as_bytes(),
        );
        let r = a
            .recv(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no echo via localhost:{port} (round {i})"));
        let ok = [Some(v4.addr), v6.as_ref().map(|s| s.addr)]
            .into_iter()
            .flatten()
            .any(|x| r.src == BndAddr::Addr(x));
        assert!(
            ok,
            "reply header {:?} must name the resolved replier",
            r.src
        );
        assert!(matches!(r.atyp, 0x01 | 0x04), "reply ATYP {}", r.atyp);
        assert_eq!(r.data, payload.as_bytes());
    }
}

#[test]
fn one_association_many_targets() {
    let _guard = shared();
    let relay = relay1(&[]);
    let targets: Vec<UdpServer> = (1..=5)
        .map(|i| UdpServer::echo(&format!("127.0.0.{i}:0")))
        .collect();
    let a = UdpAssoc::open(relay.addr, "127.0.0.1:0");
    for round in 0..3 {
        // All five in flight at once; match replies to targets by payload.
        for (i, s) in targets.iter().enumerate() {
            a.send(
                0,
                &t(s.addr),
                format!("round {round} target {i}").as_bytes(),
            );
        }
        let mut seen = vec![false; targets.len()];
        for _ in 0..targets.len() {
            let r = a
                .recv(Duration::from_secs(5))
                .unwrap_or_else(|| panic!("round {round}: replies missing, seen {seen:?}"));
            let text = String::from_utf8_lossy(&r.data).into_owned();
            let i: usize = text
                .rsplit(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("unexpected reply {text:?}"));
            assert_eq!(text, format!("round {round} target {i}"));
            assert_eq!(r.src, BndAddr::Addr(targets[i].addr), "{text}");
            assert!(!seen[i], "duplicate reply {text}");
            seen[i] = true;
        }
    }
}

#[test]
fn control_bytes_are_ignored() {
    let _guard = shared();
    let relay = relay1(&[]);
    let echo = UdpServer::echo("127.0.0.1:0");
    let mut a = UdpAssoc::open(relay.addr, "127.0.0.1:0");
    a.expect_echo(echo.addr, b"before");
    a.control
        .write_all(b"bytes on the control connection\r\n\x05\x01\x00")
        .unwrap();
    thread::sleep(Duration::from_millis(200));
    a.expect_echo(echo.addr, b"after control bytes");
    let (o, _) = wait_closed(&mut a.control, Duration::from_millis(500));
    assert_eq!(
        o,
        CloseOutcome::StillOpen { extra: vec![] },
        "the control connection stays open and silent"
    );
}

// ---------------------------------------------------------------------------
// BND.ADDR
// ---------------------------------------------------------------------------

/// UDP ASSOCIATE on an already connected control connection, DST the unspecified address
/// of the connection's family.
fn associate_via(control: std::net::TcpStream, sock: UdpSocket) -> UdpAssoc {
    let mut control = control;
    let any: SocketAddr = if control.local_addr().unwrap().is_ipv6() {
        "[::]:0".parse().unwrap()
    } else {
        "0.0.0.0:0".parse().unwrap()
    };
    negotiate(&mut control, None).expect("method negotiation");
    control
        .write_all(&request(CMD_UDP_ASSOCIATE, &t(any)))
        .unwrap();
    let reply = read_reply(&mut control).expect("UDP ASSOCIATE reply");
    let relay_udp = usable_bnd(&reply, "UDP ASSOCIATE");
    UdpAssoc {
        control,
        sock,
        relay_udp,
        reply,
    }
}

#[test]
fn bnd_addr_is_the_control_connections_local_address_when_listening_on_any() {
    let _guard = shared();
    let echo = UdpServer::echo("127.0.0.1:0");
    let relay = relay1(&["--listen", "0.0.0.0:0"]);
    let port = relay.addr.port();
    for via in ["127.0.0.1", "127.0.0.5"] {
        let to = SocketAddr::new(ip(via), port);
        let a = associate_via(connect_from(ip("127.0.0.1"), to), udp_bind("127.0.0.1:0"));
        assert_eq!(
            a.relay_udp.ip(),
            ip(via),
            "control connection to {to}: BND {:?}",
            a.reply
        );
        a.expect_echo(echo.addr, format!("via {via}").as_bytes());
    }
    if has_ipv6_loopback() {
        let echo6 = UdpServer::echo("[::1]:0");
        let relay6 = relay1(&["--listen", "[::]:0"]);
        let to = SocketAddr::new(ip("::1"), relay6.addr.port());
        let a = associate_via(connect(to), udp_bind("[::1]:0"));
        assert_eq!(a.relay_udp.ip(), ip("::1"), "BND {:?}", a.reply);
        a.expect_echo(echo6.addr, b"via [::1] to a [::] listener");
    }
}

#[test]
fn udp_advertise_replaces_bnd_ip() {
    let _guard = shared();
    if skip_unless_ringsocks("udp_advertise_replaces_bnd_ip") {
        return;
    }
    let relay = relay1(&["--udp-advertise", "127.0.0.9"]);
    let (_c, r) = udp_associate_raw(relay.addr, &t("0.0.0.0:0".parse().unwrap())).unwrap();
    assert_eq!(r.rep, 0x00, "{r:?}");
    match r.bnd {
        BndAddr::Addr(a) => {
            assert_eq!(a.ip(), ip("127.0.0.9"), "{r:?}");
            assert_ne!(a.port(), 0, "{r:?}");
        }
        other => panic!("BND {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// FRAG (ringsocks: --udp-frag reassemble|drop, --udp-frag-timeout)
// ---------------------------------------------------------------------------

#[test]
fn frag_three_fragments_are_reassembled() {
    let _guard = shared();
    if skip_unless_ringsocks("frag_three_fragments_are_reassembled") {
        return;
    }
    let relay = relay1(&[]);
    let echo = UdpServer::echo("127.0.0.1:0");
    let a = UdpAssoc::open(relay.addr, "127.0.0.1:0");
    a.send(1, &t(echo.addr), b"alpha-");
    a.send(2, &t(echo.addr), b"beta-");
    a.send(0x83, &t(echo.addr), b"gamma");
    let r = a.recv(Duration::from_secs(5)).expect("reassembled echo");
    assert_eq!(r.data, b"alpha-beta-gamma");
    assert_eq!(r.frag, 0);
    assert_target_saw(&echo, &[b"alpha-beta-gamma"], "three fragments");

    // Large fragments: 3 x 20,000 bytes arrive as one 60,000-byte datagram.
    let parts: Vec<Vec<u8>> = (0..3).map(|i| prng_bytes(0xF4A6 + i, 20_000)).collect();
    for (i, p) in parts.iter().enumerate() {
        let frag = if i == 2 { 0x83 } else { i as u8 + 1 };
        a.send(frag, &t(echo.addr), p);
    }
    let r = a
        .recv(Duration::from_secs(5))
        .expect("reassembled 60,000 bytes");
    assert!(r.data == parts.concat(), "60,000 reassembled bytes intact");
}

#[test]
fn frag_destination_is_the_first_fragments() {
    let _guard = shared();
    if skip_unless_ringsocks("frag_destination_is_the_first_fragments") {
        return;
    }
    let relay = relay1(&[]);
    let first = UdpServer::echo("127.0.0.1:0");
    let other = UdpServer::sink("127.0.0.2:0");
    let a = UdpAssoc::open(relay.addr, "127.0.0.1:0");
    a.send(1, &t(first.addr), b"one+");
    a.send(2, &t(other.addr), b"two+");
    a.send(0x83, &t(other.addr), b"three");
    let r = a.recv(Duration::from_secs(5)).expect("reassembled echo");
    assert_eq!(r.src, BndAddr::Addr(first.addr));
    assert_eq!(r.data, b"one+two+three");
    assert_target_saw(&other, &[], "later fragments' DST");
}

#[test]
fn frag_missing_fragment_is_discarded_after_the_timer() {
    let _guard = shared();
    if skip_unless_ringsocks("frag_missing_fragment_is_discarded_after_the_timer") {
        return;
    }
    let relay = relay1(&[]);
    let echo = UdpServer::echo("127.0.0.1:0");
    let a = UdpAssoc::open(relay.addr, "127.0.0.1:0");
    a.send(1, &t(echo.addr), b"stale-1 ");
    a.send(2, &t(echo.addr), b"stale-2 ");
    // The default --udp-frag-timeout is 5 s, measured from the first fragment.
    thread::sleep(Duration::from_millis(5_800));
    a.send(0x83, &t(echo.addr), b"stale-3");
    assert_no_reply(&a.sock, a.relay_udp, NOTHING_WITHIN, "after the timer");
    assert_target_saw(&echo, &[], "an expired queue");
    // A whole new sequence still works.
    a.send(1, &t(echo.addr), b"new-1 ");
    a.send(2, &t(echo.addr), b"new-2 ");
    a.send(0x83, &t(echo.addr), b"new-3");
    let r = a.recv(Duration::from_secs(5)).expect("new sequence");
    assert_eq!(r.data, b"new-1 new-2 new-3");
}

#[test]
fn frag_gap_drops_and_lower_frag_restarts() {
    let _guard = shared();
    if skip_unless_ringsocks("frag_gap_drops_and_lower_frag_restarts") {
        return;
    }
    let relay = relay1(&[]);
    let echo = UdpServer::echo("127.0.0.1:0");
    let a = UdpAssoc::open(relay.addr, "127.0.0.1:0");
    let to = t(echo.addr);
    // A gap (1, 3) drops the sequence; its last fragment then finds nothing to complete.
    a.send(1, &to, b"gap-1 ");
    a.send(3, &to, b"gap-3 ");
    a.send(0x84, &to, b"gap-4");
    assert_no_reply(
        &a.sock,
        a.relay_udp,
        NOTHING_WITHIN,
        "a sequence with a gap",
    );
    // A lower FRAG than the last one (1 after 2) starts the queue again.
    a.send(1, &to, b"old-1 ");
    a.send(2, &to, b"old-2 ");
    a.send(1, &to, b"new-1 ");
    a.send(0x82, &to, b"new-2");
    let r = a.recv(Duration::from_secs(5)).expect("restarted sequence");
    assert_eq!(r.data, b"new-1 new-2");
    // A standalone datagram works as ever.
    a.expect_echo(echo.addr, b"standalone");
    assert_target_saw(&echo, &[b"new-1 new-2", b"standalone"], "gap and restart");
}

#[test]
fn frag_drop_mode_drops_every_fragment() {
    let _guard = shared();
    if skip_unless_ringsocks("frag_drop_mode_drops_every_fragment") {
        return;
    }
    let relay = relay1(&["--udp-frag", "drop"]);
    let echo = UdpServer::echo("127.0.0.1:0");
    let a = UdpAssoc::open(relay.addr, "127.0.0.1:0");
    a.send(1, &t(echo.addr), b"frag-1 ");
    a.send(2, &t(echo.addr), b"frag-2 ");
    a.send(0x83, &t(echo.addr), b"frag-3");
    a.send(0x81, &t(echo.addr), b"lone last fragment");
    assert_no_reply(&a.sock, a.relay_udp, NOTHING_WITHIN, "--udp-frag drop");
    a.expect_echo(echo.addr, b"FRAG 0 still relayed");
    assert_target_saw(&echo, &[b"FRAG 0 still relayed"], "--udp-frag drop");
    drop(a);
    let line = closed_line(&relay, 1);
    assert_eq!(field(&line, "dropped_frag"), 4, "{line}");
    assert_eq!(field(&line, "relayed_out"), 1, "{line}");
}

#[test]
fn udp_flags_are_validated() {
    let _guard = shared();
    if skip_unless_ringsocks("udp_flags_are_validated") {
        return;
    }
    for bad in [
        &["--udp-frag-timeout", "4s"][..],
        &["--udp-frag-timeout", "0s"],
        &["--udp-frag", "bogus"],
        &["--udp-client-check", "bogus"],
        &["--udp-advertise", "not-an-ip"],
        &["--udp-idle-timeout", "soon"],
    ] {
        let mut args = vec!["--shards", "1"];
        args.extend_from_slice(bad);
        match Relay::try_start(&args) {
            Ok(_) => panic!("{bad:?} must be a configuration error"),
            Err(f) => assert!(
                f.status.is_some_and(|s| !s.success()),
                "{bad:?}: expected a prompt non-zero exit, got {f:?}"
            ),
        }
    }
    for good in [
        &["--udp-frag-timeout", "5s"][..],
        &["--udp-frag-timeout", "30s"],
        &["--udp-frag", "drop"],
        &["--udp-frag", "reassemble"],
        &["--udp-client-check", "strict"],
        &["--udp-client-check", "peer-ip"],
        &["--udp-client-check", "first"],
        &["--udp-client-check", "off"],
        &["--udp-idle-timeout", "off"],
        &["--udp-idle-timeout", "90s"],
        &["--udp-advertise", "::1"],
    ] {
        let mut args = vec!["--shards", "1"];
        args.extend_from_slice(good);
        drop(Relay::start(&args));
    }
}

// ---------------------------------------------------------------------------
// Client check (ringsocks: --udp-client-check strict|peer-ip|first|off)
// ---------------------------------------------------------------------------

/// Client A (the association's endpoint) and B (another port on the same IP).
fn two_clients() -> (UdpSocket, UdpSocket) {
    (udp_bind("127.0.0.1:0"), udp_bind("127.0.0.1:0"))
}

fn send_from(s: &UdpSocket, relay_udp: SocketAddr, to: SocketAddr, p: &[u8]) {
    s.send_to(&udp_datagram(0, &t(to), p), relay_udp).unwrap();
}

fn expect_reply_on(s: &UdpSocket, relay_udp: SocketAddr, from: SocketAddr, p: &[u8], what: &str) {
    let r = recv_reply(s, relay_udp, Duration::from_secs(5))
        .unwrap_or_else(|| panic!("{what}: no reply on {:?}", s.local_addr()));
    assert_eq!(r.src, BndAddr::Addr(from), "{what}");
    assert_eq!(r.data, p, "{what}");
}

/// strict, with DST naming the client's endpoint (`dst_ip` is 127.0.0.1 or 0.0.0.0, with
/// A's port): B, another port on the same IP, is dropped, before and after A's traffic.
fn strict_named(dst_ip: &str) {
    let relay = relay1(&[]);
    let echo = UdpServer::echo("127.0.0.1:0");
    let (a_sock, b) = two_clients();
    let dst = SocketAddr::new(ip(dst_ip), a_sock.local_addr().unwrap().port());
    let a = UdpAssoc::open_with(relay.addr, a_sock, &t(dst));
    send_from(&b, a.relay_udp, echo.addr, b"B before A");
    a.expect_echo(echo.addr, b"A");
    send_from(&b, a.relay_udp, echo.addr, b"B after A");
    a.expect_echo(echo.addr, b"A again");
    assert_no_reply(&b, a.relay_udp, NOTHING_WITHIN, "B");
    assert_target_saw(&echo, &[b"A", b"A again"], &format!("strict, DST {dst}"));
    drop(a);
    let line = closed_line(&relay, 1);
    assert_eq!(field(&line, "dropped_foreign"), 2, "{line}");
}

#[test]
fn client_check_strict_dst_names_the_endpoint() {
    let _guard = shared();
    if skip_unless_ringsocks("client_check_strict_dst_names_the_endpoint") {
        return;
    }
    strict_named("127.0.0.1");
}

#[test]
fn client_check_strict_unspecified_ip_with_port() {
    let _guard = shared();
    if skip_unless_ringsocks("client_check_strict_unspecified_ip_with_port") {
        return;
    }
    strict_named("0.0.0.0");
}

#[test]
fn client_check_strict_zeros_first_datagram_fixes_the_endpoint() {
    let _guard = shared();
    if skip_unless_ringsocks("client_check_strict_zeros_first_datagram_fixes_the_endpoint") {
        return;
    }
    let relay = relay1(&["--udp-client-check", "strict"]);
    let echo = UdpServer::echo("127.0.0.1:0");
    let (a_sock, b) = two_clients();
    let a = UdpAssoc::open_with(relay.addr, a_sock, &t("0.0.0.0:0".parse().unwrap()));
    // A third party (another IP) first does not fix the endpoint.
    let third = udp_bind("127.0.0.2:0");
    send_from(&third, a.relay_udp, echo.addr, b"third party");
    a.expect_echo(echo.addr, b"A first");
    send_from(&b, a.relay_udp, echo.addr, b"B after A");
    a.expect_echo(echo.addr, b"A again");
    assert_no_reply(&b, a.relay_udp, NOTHING_WITHIN, "B");
    assert_target_saw(&echo, &[b"A first", b"A again"], "strict, DST zeros");
}

#[test]
fn client_check_first_ignores_dst() {
    let _guard = shared();
    if skip_unless_ringsocks("client_check_first_ignores_dst") {
        return;
    }
    let relay = relay1(&["--udp-client-check", "first"]);
    let echo = UdpServer::echo("127.0.0.1:0");
    let (a_sock, b) = two_clients();
    // DST names A, but B sends first: B is the endpoint.
    let me = a_sock.local_addr().unwrap();
    let a = UdpAssoc::open_with(relay.addr, a_sock, &t(me));
    send_from(&b, a.relay_udp, echo.addr, b"B first");
    expect_reply_on(&b, a.relay_udp, echo.addr, b"B first", "first: B");
    a.send(0, &t(echo.addr), b"A, named in DST");
    assert_no_reply(&a.sock, a.relay_udp, NOTHING_WITHIN, "first: A");
    assert_target_saw(&echo, &[b"B first"], "first");
}

#[test]
fn client_check_peer_ip_accepts_any_port_and_replies_to_the_latest() {
    let _guard = shared();
    if skip_unless_ringsocks("client_check_peer_ip_accepts_any_port_and_replies_to_the_latest") {
        return;
    }
    let relay = relay1(&["--udp-client-check", "peer-ip"]);
    let echo = UdpServer::echo("127.0.0.1:0");
    let (a_sock, b) = two_clients();
    let me = a_sock.local_addr().unwrap();
    let a = UdpAssoc::open_with(relay.addr, a_sock, &t(me));
    a.expect_echo(echo.addr, b"A");
    send_from(&b, a.relay_udp, echo.addr, b"B, same IP");
    expect_reply_on(&b, a.relay_udp, echo.addr, b"B, same IP", "peer-ip: B");
    a.expect_echo(echo.addr, b"A again");
    // Another IP is still foreign.
    let third = udp_bind("127.0.0.2:0");
    send_from(&third, a.relay_udp, echo.addr, b"third party");
    assert_no_reply(&third, a.relay_udp, NOTHING_WITHIN, "peer-ip: third party");
    assert_target_saw(&echo, &[b"A", b"B, same IP", b"A again"], "peer-ip");
}

#[test]
fn client_check_off_accepts_a_third_party() {
    let _guard = shared();
    if skip_unless_ringsocks("client_check_off_accepts_a_third_party") {
        return;
    }
    let relay = relay1(&["--udp-client-check", "off"]);
    let echo = UdpServer::echo("127.0.0.1:0");
    let a = UdpAssoc::open(relay.addr, "127.0.0.1:0");
    a.expect_echo(echo.addr, b"A");
    let third = udp_bind("127.0.0.2:0");
    send_from(&third, a.relay_udp, echo.addr, b"third party");
    expect_reply_on(&third, a.relay_udp, echo.addr, b"third party", "off");
    a.expect_echo(echo.addr, b"A again");
    assert_target_saw(&echo, &[b"A", b"third party", b"A again"], "off");
}

// ---------------------------------------------------------------------------
// Lifetime
// ---------------------------------------------------------------------------

/// No socket is bound on the association's UDP port any more (bounded wait: the relay
/// may log the end just before its close completes).
fn assert_udp_port_closed(relay_udp: SocketAddr, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let bound: Vec<NetSocket> = net_sockets("udp")
            .into_iter()
            .filter(|s| s.local.port() == relay_udp.port())
            .collect();
        if bound.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: UDP port {relay_udp} still bound 1 s after the association ended: {bound:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

fn control_end_stops_relaying(rst: bool) {
    let relay = relay1(&[]);
    let echo = UdpServer::echo("127.0.0.1:0");
    let a = UdpAssoc::open(relay.addr, "127.0.0.1:0");
    a.expect_echo(echo.addr, b"before");
    let UdpAssoc {
        control,
        sock,
        relay_udp,
        ..
    } = a;
    if rst {
        close_with_rst(control);
    } else {
        drop(control);
    }
    let how = if rst { "RST" } else { "EOF" };
    if testing_ringsocks() {
        // The association's end is logged once the relay handled the close.
        let line = closed_line(&relay, 1);
        println!("{how}: {line}");
        assert_eq!(field(&line, "relayed_out"), 1, "{line}");
        assert_udp_port_closed(relay_udp, how);
    } else {
        thread::sleep(Duration::from_millis(500));
    }
    sock.send_to(&udp_datagram(0, &t(echo.addr), b"after"), relay_udp)
        .unwrap();
    assert_no_reply(&sock, relay_udp, NOTHING_WITHIN, how);
    assert_target_saw(&echo, &[b"before"], &format!("after the control {how}"));
}

#[test]
fn control_eof_ends_the_association() {
    let _guard = shared();
    control_end_stops_relaying(false);
}

#[test]
fn control_rst_ends_the_association() {
    let _guard = shared();
    control_end_stops_relaying(true);
}

#[test]
fn idle_timeout_closes_the_control_connection() {
    let _guard = shared();
    if skip_unless_ringsocks("idle_timeout_closes_the_control_connection") {
        return;
    }
    let relay = relay1(&["--udp-idle-timeout", "1s"]);
    let echo = UdpServer::echo("127.0.0.1:0");
    let mut a = UdpAssoc::open(relay.addr, "127.0.0.1:0");
    // Traffic keeps it alive: 2.4 s of datagrams every 300 ms.
    let start = Instant::now();
    for i in 0..8 {
        a.expect_echo(echo.addr, format!("keepalive {i}").as_bytes());
        thread::sleep(Duration::from_millis(300));
    }
    println!("alive after {:?} of traffic", start.elapsed());
    // Then silence: the relay closes the control connection.
    let (o, el) = wait_closed(&mut a.control, Duration::from_secs(6));
    assert_eq!(
        o,
        CloseOutcome::Closed { extra: vec![] },
        "--udp-idle-timeout 1s: control connection still open after {el:?} of silence"
    );
    assert!(
        el >= Duration::from_millis(400),
        "closed after only {el:?} of silence (the last datagram came 300 ms before)"
    );
    println!("control connection closed after {el:?} of silence");
    let line = closed_line(&relay, 1);
    assert_eq!(field(&line, "relayed_out"), 8, "{line}");
    assert_udp_port_closed(a.relay_udp, "idle timeout");
    a.send(0, &t(echo.addr), b"after the idle timeout");
    assert_no_reply(
        &a.sock,
        a.relay_udp,
        NOTHING_WITHIN,
        "after the idle timeout",
    );
    assert_eq!(echo.received(), 8);
}

#[test]
fn association_without_traffic_ends_on_idle_timeout() {
    let _guard = shared();
    if skip_unless_ringsocks("association_without_traffic_ends_on_idle_timeout") {
        return;
    }
    let relay = relay1(&["--udp-idle-timeout", "1s"]);
    let mut a = UdpAssoc::open(relay.addr, "127.0.0.1:0");
    let (o, el) = wait_closed(&mut a.control, Duration::from_secs(6));
    assert_eq!(
        o,
        CloseOutcome::Closed { extra: vec![] },
        "no datagram at all: still open after {el:?}"
    );
    // A relay with the default (5 min) keeps a silent association.
    let relay = relay1(&[]);
    let mut a = UdpAssoc::open(relay.addr, "127.0.0.1:0");
    let (o, _) = wait_closed(&mut a.control, Duration::from_secs(2));
    assert_eq!(o, CloseOutcome::StillOpen { extra: vec![] });
}

/// Runs `tests/support/udp_gso.py MODE --proxy RELAY ARGS..` and expects its "OK" line.
fn udp_gso(mode: &str, relay: SocketAddr, args: &[&str]) {
    let mut argv = vec!["--proxy".to_string(), relay.to_string()];
    argv.extend(args.iter().map(|a| a.to_string()));
    support_py("udp_gso.py", mode, &argv);
}

/// A client that sends with UDP GSO hands the relay many datagrams in one receive: each is
/// relayed on its own (one target, two targets, garbage among them, a short last one, domain
/// and IPv4 headers mixed, fragments, 64 x 1,000 bytes).
#[test]
fn gso_bursts_from_the_client_are_relayed_datagram_by_datagram() {
    let _guard = shared();
    let relay = relay1(&[]);
    udp_gso("client-burst", relay.addr, &[]);
}

/// A target that answers with a GSO burst: every datagram reaches the client with its own
/// header, including bursts the relay must split (over 64 datagrams, or over 64 KiB once the
/// headers are added).
#[test]
fn gso_bursts_from_a_target_reach_the_client_datagram_by_datagram() {
    let _guard = shared();
    let relay = relay1(&[]);
    udp_gso("target-burst", relay.addr, &[]);
    if has_ipv6_loopback() {
        udp_gso("target-burst", relay.addr, &["--v6"]);
    }
}

/// When the route to a target cannot take GSO segments that large (its MTU is smaller), the
/// relay sends those datagrams one by one instead of losing them. Needs a network namespace of
/// its own (root).
#[test]
fn gso_refused_by_the_route_falls_back_to_single_sends() {
    let _guard = shared();
    if skip_unless_ringsocks("gso_refused_by_the_route_falls_back_to_single_sends") {
        return;
    }
    let log = tmp_path("gso-fallback.log");
    let argv: Vec<String> = [
        "-n".to_string(),
        "sh".to_string(),
        support_script("gso_fallback.sh").display().to_string(),
        relay_bin().display().to_string(),
        python_with_socks().display().to_string(),
        support_script("udp_gso.py").display().to_string(),
        log.display().to_string(),
    ]
    .into();
    let (st, out, err) = run_bounded(Path::new("unshare"), &argv, Duration::from_secs(90));
    let relay_log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        st.is_some_and(|s| s.success()) && out.contains("OK"),
        "gso_fallback.sh failed (status {st:?}; needs root for unshare -n)\nstdout:\n{out}\n\
         stderr:\n{err}\nrelay log:\n{relay_log}"
    );
    assert!(
        relay_log.contains("udp GSO send refused"),
        "the route's MTU should have refused GSO (so the fallback ran):\n{relay_log}"
    );
    let closed = relay_log
        .lines()
        .find(|l| l.contains("udp association closed"))
        .unwrap_or_else(|| panic!("no association line:\n{relay_log}"));
    assert_eq!(field(closed, "relayed_out"), 16, "{closed}");
    assert_eq!(field(closed, "dropped_other"), 0, "{closed}");
}
