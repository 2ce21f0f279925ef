//! BIND (RFC 1928 §4): a real BIND client (Dante's `socksify` running curl's active-mode FTP
//! against a loopback pyftpdlib server), and raw probes for the two replies, the peer that
//! DST.ADDR does not name, and the bind timeout.

use crate::common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

fn bnd(r: &Reply) -> SocketAddr {
    match r.bnd {
        BndAddr::Addr(a) => a,
        BndAddr::Domain(ref d, p) => panic!("BND is a domain {d}:{p}"),
    }
}

/// Connects to `to` from address `from` (port chosen by the kernel).
fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&format!("{from}:0").parse::<SocketAddr>().unwrap().into())
        .unwrap();
    s.connect_timeout(&to.into(), IO_TIMEOUT).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

#[test]
fn raw_bind_two_replies_then_relay() {
    let _guard = shared();
    let relay = Relay::start(&["--shards", "2"]);
    let (mut ctl, first) = socks_request(
        relay.addr,
        None,
        CMD_BIND,
        &Target::Addr("127.0.0.1:0".parse().unwrap()),
    )
    .unwrap();
    assert_eq!(first.rep, 0x00, "first reply");
    let listen = bnd(&first);
    assert_eq!(
        listen.ip(),
        relay.addr.ip(),
        "the control connection's local IP"
    );
    assert_ne!(listen.port(), 0);
    let mut peer = connect_from("127.0.0.1", listen);
    let second = read_reply(&mut ctl).unwrap();
    assert_eq!(second.rep, 0x00, "second reply");
    assert_eq!(bnd(&second), peer.local_addr().unwrap(), "names the peer");
    // Both ways, then half-close as for CONNECT.
    peer.write_all(b"from the peer").unwrap();
    let mut buf = [0u8; 13];
    ctl.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"from the peer");
    ctl.write_all(b"from the client").unwrap();
    let mut buf = [0u8; 15];
    peer.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"from the client");
    // One peer per BIND: the listener is closed.
    assert!(TcpStream::connect_timeout(&listen, Duration::from_secs(1)).is_err());
}

#[test]
fn raw_bind_refuses_a_peer_dst_does_not_name() {
    let _guard = shared();
    let relay = Relay::start(&["--shards", "1", "--metrics", "127.0.0.1:0"]);
    let (mut ctl, first) = socks_request(
        relay.addr,
        None,
        CMD_BIND,
        &Target::Addr("127.0.0.5:0".parse().unwrap()),
    )
    .unwrap();
    assert_eq!(first.rep, 0x00);
    let listen = bnd(&first);
    // 127.0.0.1 is not the host the client named: closed without a word.
    let mut stranger = connect_from("127.0.0.1", listen);
    let (outcome, _) = wait_closed(&mut stranger, Duration::from_secs(5));
    assert!(
        matches!(outcome, CloseOutcome::Closed { .. }),
        "{outcome:?}"
    );
    // The named host gets through.
    let peer = connect_from("127.0.0.5", listen);
    let second = read_reply(&mut ctl).unwrap();
    assert_eq!(
        (second.rep, bnd(&second)),
        (0x00, peer.local_addr().unwrap())
    );
    let log = relay.stderr();
    assert!(
        log.contains("bind: refused a peer DST.ADDR does not name"),
        "{log}"
    );
    // And counted.
    let mut m = TcpStream::connect(relay.metrics_addr()).unwrap();
    m.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut scrape = String::new();
    m.read_to_string(&mut scrape).unwrap();
    assert!(
        scrape.contains("ringsocks_bind_peers_refused_total 1"),
        "{scrape}"
    );
}

#[test]
fn raw_bind_timeout_gets_rep_06() {
    let _guard = shared();
    let relay = Relay::start(&["--shards", "1", "--bind-timeout", "1s"]);
    let start = Instant::now();
    let (mut ctl, first) = socks_request(
        relay.addr,
        None,
        CMD_BIND,
        &Target::Addr("0.0.0.0:0".parse().unwrap()),
    )
    .unwrap();
    assert_eq!(first.rep, 0x00);
    let second = read_reply(&mut ctl).unwrap();
    assert_eq!(second.rep, 0x06, "TTL expired: nobody connected");
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "{:?}",
        start.elapsed()
    );
    let (outcome, _) = wait_closed(&mut ctl, Duration::from_secs(7));
    assert!(matches!(outcome, CloseOutcome::Closed { .. }));
}

#[test]
fn socksify_curl_active_ftp_uses_bind() {
    let _guard = shared();
    let have = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !have("sh", &["-c", "command -v socksify"])
        || !have("/usr/bin/python3", &["-c", "import pyftpdlib"])
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI needs socksify (dante-client) and pyftpdlib (python3-pyftpdlib)"
        );
        eprintln!("socksify or pyftpdlib missing: skipped");
        return;
    }
    require_tool("curl");
    let root = tmp_path("ftp-root");
    std::fs::create_dir_all(&root).unwrap();
    let data = prng_bytes(21, 3 << 20);
    std::fs::write(root.join("data.bin"), &data).unwrap();
    let ftpd = Helper::start(
        std::path::Path::new("/usr/bin/python3"),
        &[
            support_script("ftpd.py").display().to_string(),
            "--root".into(),
            root.display().to_string(),
            "--lifetime".into(),
            "120".into(),
        ],
    );
    let server = ftpd
        .ready_line
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("ftpd said {:?}", ftpd.ready_line))
        .to_string();
    let log = tmp_path("bind-access.log");
    let relay = Relay::start(&["--shards", "2", "--access-log", log.to_str().unwrap()]);
    let conf = tmp_path("socks.conf");
    std::fs::write(
        &conf,
        format!(
            "route {{\n  from: 0.0.0.0/0 to: 0.0.0.0/0 via: {} port = {}\n  \
             proxyprotocol: socks_v5\n  method: none\n  command: bind connect\n}}\n",
            relay.addr.ip(),
            relay.addr.port()
        ),
    )
    .unwrap();
    let out_file = tmp_path("ftp-got.bin");
    let (st, _out, err) = run_bounded(
        std::path::Path::new("env"),
        &[
            format!("SOCKS_CONF={}", conf.display()),
            "socksify".into(),
            "curl".into(),
            "-sS".into(),
            "--max-time".into(),
            "30".into(),
            "--ftp-port".into(),
            "-".into(),
            format!("ftp://{server}/data.bin"),
            "-o".into(),
            out_file.display().to_string(),
        ],
        Duration::from_secs(60),
    );
    assert!(
        st.is_some_and(|s| s.success()),
        "socksify curl active FTP failed: {st:?}\n{err}\nrelay:\n{}",
        relay.stderr()
    );
    assert!(
        std::fs::read(&out_file).unwrap() == data,
        "the file came through intact"
    );
    // The data connection went through BIND: its access-log line says so.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("command=bind")) {
            assert!(line.contains(&format!("down={}", data.len())), "{line}");
            assert!(line.contains("rep=0x00"), "{line}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no BIND in the access log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
