//! Upstream proxies (`[[upstream]]` and a rule's `via`): curl through a 3-hop ringsocks
//! chain (remote DNS: the last hop resolves), an upstream that needs a password, one that is
//! down, and rules that send one destination direct and another through an upstream.

use crate::common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn file(name: &str, text: &str) -> PathBuf {
    let p = tmp_path(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A relay with a config file and its own access log.
fn relay_with(name: &str, config: &str, extra: &[&str]) -> (Relay, PathBuf) {
    let cfg = file(&format!("{name}.toml"), config);
    let log = tmp_path(&format!("{name}-access.log"));
    let mut args = vec![
        "--shards",
        "1",
        "--config",
        cfg.to_str().unwrap(),
        "--access-log",
        log.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    (Relay::start(&args), log)
}

/// Waits until `log` has a line containing every one of `want`; returns it.
fn logged(log: &Path, want: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| want.iter().all(|w| l.contains(w))) {
            return l.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "{}: no line with {want:?}:\n{text}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn upstream(name: &str, addr: std::net::SocketAddr, extra: &str) -> String {
    format!("[[upstream]]\nname = \"{name}\"\naddress = \"{addr}\"\n{extra}\n")
}

const VIA_ALL: &str = "[[rule]]\naction = \"allow\"\nvia = \"next\"\n";

#[test]
fn curl_through_a_three_hop_chain_with_remote_dns() {
    let _guard = shared();
    let (http, _v6) = http_server_localhost();
    let (c, c_log) = relay_with("chain-c", "", &[]);
    let (b, b_log) = relay_with(
        "chain-b",
        &format!("{}{VIA_ALL}", upstream("next", c.addr, "")),
        &[],
    );
    let (a, a_log) = relay_with(
        "chain-a",
        &format!("{}{VIA_ALL}", upstream("next", b.addr, "")),
        &[],
    );
    for url in [
        format!("http://127.0.0.1:{}/", http.port()),
        format!("http://localhost:{}/", http.port()),
    ] {
        let out = curl(&["--socks5-hostname", &a.addr.to_string(), &url]);
        assert!(
            out.status.success() && out.stdout == b"hello\n",
            "{url} through a -> b -> c: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The name went down the chain unresolved: a and b connected to their upstream, c to the
    // target.
    let target = format!("target=\"localhost:{}\"", http.port());
    assert!(logged(&a_log, &[&target]).contains(&format!("connected={}", b.addr)));
    assert!(logged(&b_log, &[&target]).contains(&format!("connected={}", c.addr)));
    let last = logged(&c_log, &[&target]);
    assert!(
        last.contains(&format!(":{} rep=0x00", http.port())),
        "the last hop resolved and connected: {last}"
    );
    // Bytes come back through every hop (the tunnel is an ordinary one after the handshake).
    let big = curl(&[
        "--socks5-hostname",
        &a.addr.to_string(),
        &format!("http://127.0.0.1:{}/big", http.port()),
    ]);
    assert!(big.status.success());
    assert_eq!(sha256_hex(&big.stdout), sha256_hex(big_body()));
}

#[test]
fn an_upstream_that_needs_a_password() {
    let _guard = shared();
    let http = http_server("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}/", http.port());
    let (c, _) = relay_with("auth-c", "user = [\"hop:s3cret\"]\n", &[]);
    let good = upstream("next", c.addr, "user = \"hop\"\npassword = \"s3cret\"");
    let (a, _) = relay_with("auth-a", &format!("{good}{VIA_ALL}"), &[]);
    assert_eq!(curl_ok(a.addr, &url), b"hello\n");
    let bad = upstream("next", c.addr, "user = \"hop\"\npassword = \"wrong\"");
    let (a2, _) = relay_with("auth-a2", &format!("{bad}{VIA_ALL}"), &[]);
    let out = curl(&["--socks5", &a2.addr.to_string(), &url]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("(1)"),
        "REP 0x01: {out:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !a2.stderr().contains("upstream handshake failed") {
        assert!(Instant::now() < deadline, "{}", a2.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(a2.stderr().contains("upstream=next"));
}

#[test]
fn an_upstream_that_is_down_gets_rep_05_and_a_log_line() {
    let _guard = shared();
    let http = http_server("127.0.0.1:0").unwrap();
    let down = closed_port();
    let (a, _) = relay_with(
        "down-a",
        &format!("{}{VIA_ALL}", upstream("next", down, "")),
        &[],
    );
    let start = Instant::now();
    let out = curl(&[
        "--socks5",
        &a.addr.to_string(),
        &format!("http://127.0.0.1:{}/", http.port()),
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("(5)"),
        "REP 0x05: {out:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !a.stderr().contains("upstream unreachable") {
        assert!(Instant::now() < deadline, "{}", a.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(a.stderr().contains("upstream=next"));
}

#[test]
fn an_upstreams_refusal_is_passed_back_as_is() {
    let _guard = shared();
    let http = http_server("127.0.0.1:0").unwrap();
    // c refuses everything by rule: REP 0x02 must reach the client through a.
    let (c, _) = relay_with("refuse-c", "[[rule]]\naction = \"deny\"\n", &[]);
    let (a, _) = relay_with(
        "refuse-a",
        &format!("{}{VIA_ALL}", upstream("next", c.addr, "")),
        &[],
    );
    let out = curl(&[
        "--socks5",
        &a.addr.to_string(),
        &format!("http://127.0.0.1:{}/", http.port()),
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("(2)"),
        "REP 0x02: {out:?}"
    );
}

#[test]
fn rules_send_one_destination_direct_and_another_through_an_upstream() {
    let _guard = shared();
    let direct = http_server("127.0.0.1:0").unwrap();
    let far = http_server("127.0.0.2:0").unwrap();
    let (c, c_log) = relay_with("route-c", "", &[]);
    let cfg = format!(
        "{}[[rule]]\naction = \"allow\"\nto = [\"127.0.0.2\"]\nvia = \"next\"\n\n\
         [[rule]]\naction = \"allow\"\n",
        upstream("next", c.addr, "")
    );
    let (a, a_log) = relay_with("route-a", &cfg, &[]);
    assert_eq!(
        curl_ok(a.addr, &format!("http://{}/", far.addr)),
        b"hello\n"
    );
    assert_eq!(
        curl_ok(a.addr, &format!("http://{}/", direct.addr)),
        b"hello\n"
    );
    assert!(logged(&a_log, &[&format!("target=\"{}\"", far.addr)])
        .contains(&format!("connected={}", c.addr)));
    assert!(logged(&a_log, &[&format!("target=\"{}\"", direct.addr)])
        .contains(&format!("connected={}", direct.addr)));
    logged(&c_log, &[&format!("target=\"{}\"", far.addr)]);
    let c_text = std::fs::read_to_string(&c_log).unwrap();
    assert!(
        !c_text.contains(&direct.addr.to_string()),
        "the direct one skipped c: {c_text}"
    );
}

#[test]
fn curl_through_ringsocks_then_dante() {
    let _guard = shared();
    let have_danted = std::process::Command::new("sh")
        .args(["-c", "command -v danted"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_danted {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI needs danted (the dante-server package)"
        );
        eprintln!("danted missing: skipped");
        return;
    }
    let (http, _v6) = http_server_localhost();
    // Dante on loopback, through the shim that gives it ringsocks' start-up contract.
    let shim = support_script("dante-shim.sh");
    let dante = Relay::start_wrapped(&[shim.to_str().unwrap()], &["--listen", "127.0.0.1:0"]);
    let (a, a_log) = relay_with(
        "dante-a",
        &format!("{}{VIA_ALL}", upstream("next", dante.addr, "")),
        &[],
    );
    for url in [
        format!("http://127.0.0.1:{}/", http.port()),
        format!("http://localhost:{}/", http.port()),
    ] {
        let out = curl(&["--socks5-hostname", &a.addr.to_string(), &url]);
        assert!(
            out.status.success() && out.stdout == b"hello\n",
            "{url} through ringsocks -> danted: {}\n{}\ndanted:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            dante.stderr()
        );
    }
    assert!(
        logged(&a_log, &[&format!("target=\"localhost:{}\"", http.port())])
            .contains(&format!("connected={}", dante.addr))
    );
}

#[test]
fn pysocks_udp_through_a_three_hop_chain() {
    let _guard = shared();
    let echo = UdpServer::echo("127.0.0.1:0");
    let (c, c_log) = relay_with("udp-c", "", &[]);
    let (b, b_log) = relay_with(
        "udp-b",
        &format!("{}{VIA_ALL}", upstream("next", c.addr, "")),
        &[],
    );
    let (a, a_log) = relay_with(
        "udp-a",
        &format!("{}{VIA_ALL}", upstream("next", b.addr, "")),
        &[],
    );
    let py = python_with_socks();
    let (st, out, err) = run_bounded(
        &py,
        &[
            support_script("udp_pysocks.py").display().to_string(),
            "echo".into(),
            "--proxy".into(),
            a.addr.to_string(),
            "--target".into(),
            echo.addr.to_string(),
        ],
        Duration::from_secs(60),
    );
    assert!(
        st.is_some_and(|s| s.success()) && out.contains("OK"),
        "PySocks UDP through a -> b -> c: {st:?}\n{out}\n{err}\na:\n{}\nb:\n{}",
        a.stderr(),
        b.stderr()
    );
    assert_eq!(echo.received(), 6, "the target saw every datagram once");
    // Each hop had its own association, and each ended with the client's.
    for log in [&a_log, &b_log, &c_log] {
        let line = logged(log, &["command=udp", "rep=0x00"]);
        assert!(!line.contains(" up=0 "), "{line}");
    }
    // The UDP client check at c saw b's socket, at b saw a's: every hop accepted the one
    // before it, and c relayed to the target itself.
    assert!(logged(&c_log, &["command=udp"]).contains("client=127.0.0.1:"));
}

#[test]
fn an_association_through_an_upstream_that_is_down_gets_rep_05() {
    let _guard = shared();
    let down = closed_port();
    let (a, _) = relay_with(
        "udp-down-a",
        &format!("{}{VIA_ALL}", upstream("next", down, "")),
        &[],
    );
    let (_ctl, r) = udp_associate_raw(a.addr, &Target::Addr("0.0.0.0:0".parse().unwrap())).unwrap();
    assert_eq!(r.rep, 0x05);
    assert!(
        a.stderr().contains("upstream unreachable") || {
            std::thread::sleep(Duration::from_millis(200));
            a.stderr().contains("upstream unreachable")
        }
    );
}
