//! End-to-end: curl through the real relay over loopback.

use crate::common::*;
use std::os::unix::fs::PermissionsExt;

fn fetch_big_via(proxy_flag: &str, relay: std::net::SocketAddr, url: &str, extra: &[&str]) {
    let proxy = relay.to_string();
    let mut args = vec![proxy_flag, proxy.as_str()];
    args.extend_from_slice(extra);
    args.push(url);
    let out = curl(&args);
    assert!(
        out.status.success(),
        "curl {args:?} failed: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), BIG_LEN, "body length via {proxy_flag}");
    assert_eq!(
        sha256_hex(&out.stdout),
        sha256_hex(big_body()),
        "sha256 of the 10 MB body fetched via {proxy_flag} {url}"
    );
}

#[test]
fn curl_socks5_big_file_sha256_splice_and_copy() {
    let _guard = shared();
    let http = http_server("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}/big", http.port());
    for mode in FORWARD_MODES {
        let relay = Relay::start(&["--forward", mode]);
        fetch_big_via("--socks5", relay.addr, &url, &[]);
    }
}

#[test]
fn curl_socks5_big_file_with_busy_poll_splice_and_copy() {
    let _guard = shared();
    // --busy-poll changes how a shard waits for completions; bytes must flow exactly as before,
    // including after the window lapses and the shard sleeps again.
    let http = http_server("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}/big", http.port());
    for mode in FORWARD_MODES {
        let relay = Relay::start(&["--forward", mode, "--busy-poll", "2ms"]);
        fetch_big_via("--socks5", relay.addr, &url, &[]);
        std::thread::sleep(std::time::Duration::from_millis(20));
        fetch_big_via("--socks5", relay.addr, &url, &[]);
    }
}

#[test]
fn curl_socks5_hostname_localhost_splice_and_copy() {
    let _guard = shared();
    let (http, _v6) = http_server_localhost();
    let url = format!("http://localhost:{}/big", http.port());
    for mode in FORWARD_MODES {
        let relay = Relay::start(&["--forward", mode]);
        fetch_big_via("--socks5-hostname", relay.addr, &url, &[]);
    }
}

#[test]
fn curl_socks5_ipv6_target() {
    let _guard = shared();
    let http = match http_server("[::1]:0") {
        Ok(h) => h,
        Err(e) => {
            println!("NOTE: skipping IPv6 target test: this machine has no ::1 ({e})");
            return;
        }
    };
    let url = format!("http://[::1]:{}/big", http.port());
    for mode in FORWARD_MODES {
        let relay = Relay::start(&["--forward", mode]);
        fetch_big_via("--socks5", relay.addr, &url, &[]);
        fetch_big_via("--socks5-hostname", relay.addr, &url, &[]);
    }
}

#[test]
fn curl_proxy_user_good_wrong_and_missing() {
    let _guard = shared();
    let http = http_server("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}/", http.port());
    let relay = Relay::start(&["--user", "alice:secret"]);
    let proxy = relay.addr.to_string();

    let good = || {
        let out = curl(&["--socks5", &proxy, "--proxy-user", "alice:secret", &url]);
        assert!(
            out.status.success(),
            "curl with the right password failed: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, b"hello\n");
    };
    good();

    let wrong = curl(&["--socks5", &proxy, "--proxy-user", "alice:wrong", &url]);
    assert!(
        !wrong.status.success(),
        "curl with a wrong password must fail, got {} body {:?}",
        wrong.status,
        String::from_utf8_lossy(&wrong.stdout)
    );
    // The relay still serves the next good request.
    good();

    let unknown = curl(&["--socks5", &proxy, "--proxy-user", "mallory:secret", &url]);
    assert!(!unknown.status.success(), "unknown user must fail");

    let none = curl(&["--socks5", &proxy, &url]);
    assert!(
        !none.status.success(),
        "curl without --proxy-user must fail against a relay with users, got {}",
        none.status
    );
    good();
}

#[test]
fn users_file_mode_0600_works() {
    let _guard = shared();
    let http = http_server("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}/", http.port());
    let path = tmp_path("users-0600");
    std::fs::write(&path, "alice:secret\nbob:hunter2\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let relay = Relay::start(&["--users", path.to_str().unwrap()]);
    let proxy = relay.addr.to_string();
    for cred in ["alice:secret", "bob:hunter2"] {
        let out = curl(&["--socks5", &proxy, "--proxy-user", cred, &url]);
        assert!(
            out.status.success(),
            "curl as {cred} with --users file failed: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, b"hello\n");
    }
    let out = curl(&["--socks5", &proxy, "--proxy-user", "alice:hunter2", &url]);
    assert!(!out.status.success(), "crossed credentials must fail");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn users_file_mode_0644_is_refused() {
    let _guard = shared();
    for mode in [0o644, 0o640, 0o604] {
        let path = tmp_path(&format!("users-{mode:o}"));
        std::fs::write(&path, "alice:secret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let p = path.to_str().unwrap();
        match Relay::try_start(&["--users", p]) {
            Ok(r) => panic!(
                "relay started with a users file of mode {mode:o} (listening on {}); it must refuse",
                r.addr
            ),
            Err(f) => {
                let st = f
                    .status
                    .unwrap_or_else(|| panic!("relay neither ready nor exited: {f:?}"));
                assert!(
                    !st.success(),
                    "relay must exit non-zero for mode {mode:o}, got {st}"
                );
                assert!(
                    f.stderr.contains(p),
                    "stderr must name the users file {p}; got:\n{}",
                    f.stderr
                );
            }
        }
        let _ = std::fs::remove_file(&path);
    }
}

#[test]
fn a_dual_stack_listener_serves_curl_over_ipv4_and_ipv6() {
    let _guard = shared();
    if !has_ipv6_loopback() {
        eprintln!("skipped: no ::1");
        return;
    }
    let http = http_server("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}/", http.port());
    let relay = Relay::start(&["--listen", "[::]:0"]);
    let port = relay.addr.port();
    for proxy in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
        let proxy: std::net::SocketAddr = proxy.parse().unwrap();
        assert_eq!(curl_ok(proxy, &url), b"hello\n", "via {proxy}");
    }
    // An IPv4 client is shown (and limited, and matched) as IPv4, not ::ffff:127.0.0.1.
    let closed = closed_port();
    let out = curl(&[
        "-s",
        "--max-time",
        "5",
        "--socks5",
        &format!("127.0.0.1:{port}"),
        &format!("http://{closed}/"),
    ]);
    assert!(!out.status.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !relay.stderr().contains("client=127.0.0.1:") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let log = relay.stderr();
    assert!(
        log.contains("client=127.0.0.1:") && !log.contains("::ffff:"),
        "{log}"
    );

    // --ipv6-only: IPv4 clients are not accepted on [::].
    let v6only = Relay::start(&["--listen", "[::]:0", "--ipv6-only"]);
    let v4: std::net::SocketAddr = format!("127.0.0.1:{}", v6only.addr.port()).parse().unwrap();
    assert!(
        std::net::TcpStream::connect(v4).is_err(),
        "IPv4 refused with --ipv6-only"
    );
    let v6: std::net::SocketAddr = format!("[::1]:{}", v6only.addr.port()).parse().unwrap();
    assert_eq!(curl_ok(v6, &url), b"hello\n");
}

#[test]
fn outbound_bind_sets_the_source_of_tcp_and_udp_toward_targets() {
    use std::io::{BufRead, BufReader};
    let _guard = shared();
    let peer = peer_server("127.0.0.1:0");
    let udp_echo = UdpServer::echo("127.0.0.1:0");
    let relay = Relay::start(&["--outbound-bind", "127.0.0.2"]);
    let s = socks_connect(
        relay.addr,
        std::net::SocketAddr::from(([127, 0, 0, 1], peer.port())),
    );
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    assert!(line.starts_with("127.0.0.2:"), "the target saw {line:?}");
    let a = UdpAssoc::open(relay.addr, "127.0.0.1:0");
    a.expect_echo(udp_echo.addr, b"from 127.0.0.2");
    let seen = udp_echo.log.lock().unwrap().last().map(|(src, _)| *src);
    assert_eq!(seen.map(|s| s.ip().to_string()), Some("127.0.0.2".into()));
    // A device: lo carries loopback targets; a device that does not exist fails the request.
    let lo = Relay::start(&["--outbound-interface", "lo"]);
    let dst = Target::Addr(std::net::SocketAddr::from(([127, 0, 0, 1], peer.port())));
    let (_s, r) = socks_request(lo.addr, None, CMD_CONNECT, &dst).unwrap();
    assert_eq!(r.rep, 0, "via lo");
    let none = Relay::start(&["--outbound-interface", "nosuchdev0"]);
    let (_s, r) = socks_request(none.addr, None, CMD_CONNECT, &dst).unwrap();
    assert_ne!(r.rep, 0, "via a device that does not exist");
    for (args, needle) in [
        (
            &[
                "--outbound-bind",
                "127.0.0.2",
                "--outbound-bind",
                "127.0.0.3",
            ][..],
            "at most one address per family",
        ),
        (&["--outbound-bind", "0.0.0.0"][..], "not a source address"),
    ] {
        let f = Relay::try_start(args).err().expect("refused to start");
        assert!(format!("{f:?}").contains(needle), "{args:?}: {f:?}");
    }
}
