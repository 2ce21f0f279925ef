//! `--proxy-protocol`: a PROXY header (v1 text, v2 binary) from a `--trusted-proxy` peer
//! gives the client's real address to rules, limits and the access log; from anyone else,
//! or missing, the connection is closed without a reply.

use crate::common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

fn v1(src: &str, dst: &str) -> Vec<u8> {
    let (s, d): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
    format!(
        "PROXY TCP4 {} {} {} {}\r\n",
        s.ip(),
        d.ip(),
        s.port(),
        d.port()
    )
    .into_bytes()
}

fn v2(src: &str, dst: &str) -> Vec<u8> {
    let (s, d): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (s, d) else {
        panic!("IPv4 only here")
    };
    let mut h = b"\r\n\r\n\x00\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(0x11); // TCP over IPv4
    h.extend_from_slice(&(12u16 + 7).to_be_bytes()); // addresses + one TLV
    h.extend_from_slice(&s.ip().octets());
    h.extend_from_slice(&d.ip().octets());
    h.extend_from_slice(&s.port().to_be_bytes());
    h.extend_from_slice(&d.port().to_be_bytes());
    h.extend_from_slice(&[0x04, 0x00, 0x04, b'n', b'o', b'o', b'p']); // PP2_TYPE_NOOP
    h
}

/// Connects from `from`, sends `header`, then a CONNECT to `target`; the reply, or None
/// when the relay closed without one.
fn connect_with(
    relay: SocketAddr,
    from: &str,
    header: &[u8],
    target: SocketAddr,
) -> Option<(TcpStream, u8)> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&format!("{from}:0").parse::<SocketAddr>().unwrap().into())
        .unwrap();
    s.connect_timeout(&relay.into(), IO_TIMEOUT).unwrap();
    let mut s: TcpStream = s.into();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut msg = header.to_vec();
    msg.extend(greeting(&[0x00]));
    msg.extend(request(CMD_CONNECT, &Target::Addr(target)));
    // The relay may close before reading all of it: a failed write is an answer too.
    let _ = s.write_all(&msg);
    let mut m = [0u8; 2];
    if s.read_exact(&mut m).is_err() {
        return None;
    }
    let r = read_reply(&mut s).ok()?;
    Some((s, r.rep))
}

fn wait_lines(path: &std::path::Path, n: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().count() >= n {
            return text;
        }
        assert!(Instant::now() < deadline, "{n} lines wanted:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn headers_from_a_trusted_proxy_give_the_clients_address() {
    let _guard = shared();
    let log = tmp_path("proxy-access.log");
    let cfg = tmp_path("proxy.toml");
    // Rules see the address from the header: 192.0.2.66 is refused.
    std::fs::write(
        &cfg,
        "[[rule]]\naction = \"deny\"\nfrom = [\"192.0.2.66\"]\n\n[policy]\ndefault = \"allow\"\n",
    )
    .unwrap();
    let relay = Relay::start(&[
        "--shards",
        "1",
        "--config",
        cfg.to_str().unwrap(),
        "--proxy-protocol",
        "--trusted-proxy",
        "127.0.0.1/32",
        "--access-log",
        log.to_str().unwrap(),
    ]);
    let echo = echo_server("127.0.0.1:0");
    let dst = relay.addr.to_string();
    for (n, (header, client)) in [
        (v1("192.0.2.9:5555", &dst), "192.0.2.9:5555"),
        (v2("198.51.100.7:6666", &dst), "198.51.100.7:6666"),
    ]
    .into_iter()
    .enumerate()
    {
        let (s, rep) = connect_with(relay.addr, "127.0.0.1", &header, echo.addr).expect("a reply");
        assert_eq!(rep, 0x00);
        echo_roundtrip(&s, b"through the balancer");
        drop(s);
        let text = wait_lines(&log, n + 1);
        assert!(
            text.contains(&format!("client={client} ")),
            "{client} in:\n{text}"
        );
    }
    let (_, rep) = connect_with(
        relay.addr,
        "127.0.0.1",
        &v1("192.0.2.66:1", &dst),
        echo.addr,
    )
    .expect("a reply");
    assert_eq!(rep, 0x02, "the rule saw the header's address");
    // v1 UNKNOWN (a health check): the balancer's own address stands.
    let (_, rep) =
        connect_with(relay.addr, "127.0.0.1", b"PROXY UNKNOWN\r\n", echo.addr).expect("a reply");
    assert_eq!(rep, 0x00);
    // A trusted peer without a header, or with a broken one: closed without a reply.
    assert!(connect_with(relay.addr, "127.0.0.1", b"", echo.addr).is_none());
    assert!(connect_with(
        relay.addr,
        "127.0.0.1",
        b"PROXY TCP4 1.2.3.4\r\n",
        echo.addr
    )
    .is_none());
    let log_text = relay.stderr();
    assert!(
        log_text.contains("PROXY protocol:"),
        "the refusal is logged: {log_text}"
    );
}

#[test]
fn headers_from_anyone_else_are_refused() {
    let _guard = shared();
    let relay = Relay::start(&[
        "--shards",
        "1",
        "--proxy-protocol",
        "--trusted-proxy",
        "127.0.0.2",
    ]);
    let echo = echo_server("127.0.0.1:0");
    let dst = relay.addr.to_string();
    for header in [v1("192.0.2.9:5555", &dst), v2("192.0.2.9:5555", &dst)] {
        assert!(
            connect_with(relay.addr, "127.0.0.1", &header, echo.addr).is_none(),
            "127.0.0.1 is not a trusted proxy"
        );
    }
    assert!(relay.stderr().contains("not a --trusted-proxy address"));
    let (_, rep) = connect_with(
        relay.addr,
        "127.0.0.2",
        &v2("192.0.2.9:5555", &dst),
        echo.addr,
    )
    .expect("the trusted proxy gets a reply");
    assert_eq!(rep, 0x00);
}

#[test]
fn per_ip_limits_count_the_clients_behind_the_proxy() {
    let _guard = shared();
    let relay = Relay::start(&[
        "--shards",
        "1",
        "--proxy-protocol",
        "--trusted-proxy",
        "127.0.0.1",
        "--max-connections-per-ip",
        "1",
    ]);
    let echo = echo_server("127.0.0.1:0");
    let dst = relay.addr.to_string();
    let (a, rep) =
        connect_with(relay.addr, "127.0.0.1", &v1("192.0.2.1:1", &dst), echo.addr).unwrap();
    assert_eq!(rep, 0);
    // Another client through the same proxy is not limited by the first...
    let (b, rep) =
        connect_with(relay.addr, "127.0.0.1", &v1("192.0.2.2:1", &dst), echo.addr).unwrap();
    assert_eq!(rep, 0);
    // ...but the first one's second connection is.
    assert!(connect_with(relay.addr, "127.0.0.1", &v1("192.0.2.1:2", &dst), echo.addr).is_none());
    drop((a, b));
}
