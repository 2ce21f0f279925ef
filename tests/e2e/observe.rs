//! What operators see: Prometheus metrics (`--metrics`: exact byte counters, outcomes,
//! `/healthz` during a drain, `promtool check metrics` when installed) and the access log
//! (`--access-log`, text and JSON, for a CONNECT, a refused CONNECT and a UDP association;
//! SIGUSR1 reopens it).

use crate::common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// GET `path` from the metrics server: (status code, body).
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect to --metrics");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// The value of the sample `name{labels}` (exactly as written) in a scrape; 0 when absent.
fn sample(scrape: &str, series: &str) -> u64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

fn bytes(scrape: &str, direction: &str) -> u64 {
    ["copy", "splice"]
        .iter()
        .map(|p| {
            sample(
                scrape,
                &format!("ringsocks_bytes_total{{direction=\"{direction}\",path=\"{p}\"}}"),
            )
        })
        .sum()
}

/// Scrapes until `f` holds (the counters of a connection move when it is released).
fn scrape_until(addr: SocketAddr, what: &str, f: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = http_get(addr, "/metrics");
        assert_eq!(status, 200);
        if f(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "{what}; last scrape:\n{body}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn metrics_move_by_exactly_the_bytes_relayed() {
    let _guard = shared();
    const LEN: usize = 10 << 20;
    for mode in FORWARD_MODES {
        let relay = Relay::start(&[
            "--forward",
            mode,
            "--shards",
            "2",
            "--metrics",
            "127.0.0.1:0",
        ]);
        let maddr = relay.metrics_addr();
        let echo = echo_server("127.0.0.1:0");
        let before = scrape_until(maddr, "first scrape", |_| true);
        let closed = |s: &str| sample(s, "ringsocks_connections_closed_total{outcome=\"relayed\"}");
        let base = closed(&before);

        let s = socks_connect(relay.addr, echo.addr);
        let data = prng_bytes(7, LEN);
        let reader = {
            let mut r = s.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut got = Vec::with_capacity(LEN);
                r.read_to_end(&mut got).unwrap();
                got
            })
        };
        (&s).write_all(&data).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let got = reader.join().unwrap();
        assert!(got == data, "{mode}: the echo came back intact");
        drop(s);

        let after = scrape_until(maddr, "the tunnel is counted as closed", |s| {
            closed(s) > base
        });
        assert_eq!(
            bytes(&after, "client_to_target") - bytes(&before, "client_to_target"),
            LEN as u64,
            "{mode}: client->target moved by exactly the bytes sent"
        );
        assert_eq!(
            bytes(&after, "target_to_client") - bytes(&before, "target_to_client"),
            LEN as u64,
            "{mode}: target->client too"
        );
        assert!(sample(&after, "ringsocks_connections_accepted_total") >= 1);
        assert!(sample(&after, "ringsocks_handshake_seconds_count") >= 1);
        assert!(sample(&after, "ringsocks_connect_seconds_count") >= 1);
        assert_eq!(sample(&after, "ringsocks_healthy"), 1);
        assert!(after.contains("ringsocks_build_info{version=\""), "{after}");
        promtool_check(&after);
    }
}

/// `promtool check metrics` reports nothing (when promtool is installed: CI installs it).
fn promtool_check(scrape: &str) {
    let ok = std::process::Command::new("promtool")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is required in CI (the prometheus package)"
        );
        eprintln!("promtool not installed: skipping the lint");
        return;
    }
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {}\n{said}",
        out.status
    );
}

#[test]
fn outcomes_and_refusals_are_counted() {
    let _guard = shared();
    let relay = Relay::start(&["--shards", "1", "--metrics", "127.0.0.1:0"]);
    let maddr = relay.metrics_addr();
    let (_, r) =
        socks_request(relay.addr, None, CMD_CONNECT, &Target::Addr(closed_port())).unwrap();
    assert_eq!(r.rep, 0x05);
    let mut s = connect(relay.addr);
    s.write_all(&[0x05, 0x01, 0x02]).unwrap(); // only user/password, which is not offered
    let mut b = [0u8; 2];
    s.read_exact(&mut b).unwrap();
    assert_eq!(b, [0x05, 0xff]);
    drop(s);
    let out = scrape_until(maddr, "both outcomes counted", |s| {
        sample(
            s,
            "ringsocks_connections_closed_total{outcome=\"rep_0x05_connection_refused\"}",
        ) == 1
            && sample(
                s,
                "ringsocks_connections_closed_total{outcome=\"handshake_error\"}",
            ) == 1
    });
    assert_eq!(sample(&out, "ringsocks_connections_active"), 0, "{out}");
}

#[test]
fn healthz_is_503_once_draining() {
    let _guard = shared();
    let mut relay = Relay::start(&[
        "--shards",
        "2",
        "--metrics",
        "127.0.0.1:0",
        "--drain-timeout",
        "5s",
    ]);
    let maddr = relay.metrics_addr();
    assert_eq!(http_get(maddr, "/healthz"), (200, "ok\n".to_string()));
    // An open tunnel keeps the relay draining after SIGTERM.
    let echo = echo_server("127.0.0.1:0");
    let s = socks_connect(relay.addr, echo.addr);
    echo_roundtrip(&s, b"before the drain");
    relay.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (status, body) = http_get(maddr, "/healthz");
        if status == 503 {
            assert_eq!(body, "draining\n");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/healthz still {status} after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(relay.is_running(), "still draining the open tunnel");
    echo_roundtrip(&s, b"the tunnel still works while draining");
    drop(s);
    assert!(relay
        .wait_exit(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
}

/// Waits (10 s at most) until `path` has at least `n` lines; returns them.
fn lines(path: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} has {} lines, want {n}:\n{text}",
            path.display(),
            lines.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One CONNECT (10 bytes up, echoed), one refused CONNECT, one UDP association; returns
/// the echo server's and the UDP echo's addresses.
fn three_requests(relay: &Relay) -> (SocketAddr, SocketAddr) {
    let echo = echo_server("127.0.0.1:0");
    let s = socks_connect(relay.addr, echo.addr);
    echo_roundtrip(&s, b"0123456789");
    drop(s);
    let (_, r) = socks_request(
        relay.addr,
        None,
        CMD_CONNECT,
        &Target::Addr("127.0.0.3:9".parse().unwrap()),
    )
    .unwrap();
    assert_eq!(r.rep, 0x02, "refused by the rule");
    let uecho = UdpServer::echo("127.0.0.1:0");
    let a = UdpAssoc::open(relay.addr, "127.0.0.1:0");
    a.expect_echo(uecho.addr, b"udp payload");
    drop(a);
    (echo.addr, uecho.addr)
}

const DENY_127_0_0_3: &str =
    "[[rule]]\naction = \"deny\"\nto = [\"127.0.0.3\"]\n\n[policy]\ndefault = \"allow\"\n";

#[test]
fn access_log_text_lines_and_sigusr1_reopen() {
    let _guard = shared();
    let log = tmp_path("access.log");
    let cfg = tmp_path("access.toml");
    std::fs::write(&cfg, DENY_127_0_0_3).unwrap();
    let (l, c) = (log.to_str().unwrap(), cfg.to_str().unwrap());
    let relay = Relay::start(&["--shards", "1", "--config", c, "--access-log", l]);
    let (echo, _) = three_requests(&relay);
    let got = lines(&log, 3);
    let find = |what: &str| {
        got.iter()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no line with {what:?} in:\n{}", got.join("\n")))
            .clone()
    };
    let ok = find(&format!("target=\"{echo}\""));
    for field in [
        "client=127.0.0.1:",
        "user=-",
        "command=connect",
        &format!("connected={echo}"),
        "rep=0x00",
        "up=10",
        "down=10",
        "duration=",
        "reason=",
    ] {
        assert!(ok.contains(field), "{field} in {ok}");
    }
    let refused = find("rep=0x02");
    assert!(
        refused.contains("target=\"127.0.0.3:9\"")
            && refused.contains("reason=\"refused by rule 1 (line 1)\""),
        "{refused}"
    );
    let udp = find("command=udp");
    assert!(
        udp.contains("rep=0x00") && udp.contains("reason=\"control connection closed\""),
        "{udp}"
    );
    assert!(
        !udp.contains("up=0 "),
        "the association's bytes are counted: {udp}"
    );

    // logrotate: move the file away, SIGUSR1, and new lines go to a new file.
    let rotated = tmp_path("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    relay.signal("USR1");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !relay.stderr().contains("reopening the access log") {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let e = echo_server("127.0.0.1:0");
    let s = socks_connect(relay.addr, e.addr);
    echo_roundtrip(&s, b"after the rotation");
    drop(s);
    let fresh = lines(&log, 1);
    assert!(
        fresh[0].contains(&format!("target=\"{}\"", e.addr)),
        "{fresh:?}"
    );
    assert_eq!(lines(&rotated, 3).len(), 3, "the old file kept its lines");
}

#[test]
fn access_log_json_lines() {
    let _guard = shared();
    let log = tmp_path("access.json");
    let cfg = tmp_path("access-json.toml");
    std::fs::write(&cfg, DENY_127_0_0_3).unwrap();
    let (l, c) = (log.to_str().unwrap(), cfg.to_str().unwrap());
    let relay = Relay::start(&[
        "--shards",
        "1",
        "--config",
        c,
        "--access-log",
        l,
        "--access-log-format",
        "json",
    ]);
    let (echo, uecho) = three_requests(&relay);
    let got = lines(&log, 3);
    let parsed: Vec<serde_json::Value> = got
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let by = |k: &str, v: &str| {
        parsed
            .iter()
            .find(|j| j[k] == v)
            .unwrap_or_else(|| panic!("no {k}={v} in {got:?}"))
    };
    let ok = by("target", &echo.to_string());
    assert_eq!(ok["command"], "connect");
    assert_eq!(ok["connected"], echo.to_string());
    assert_eq!(
        (
            ok["rep"].as_u64(),
            ok["bytes_up"].as_u64(),
            ok["bytes_down"].as_u64()
        ),
        (Some(0), Some(10), Some(10))
    );
    assert!(ok["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(ok["user"].is_null() && ok["duration_ms"].as_f64().is_some() && ok["time"].is_string());
    let refused = by("target", "127.0.0.3:9");
    assert_eq!(refused["rep"], 2);
    assert_eq!(refused["reason"], "refused by rule 1 (line 1)");
    let udp = by("command", "udp");
    assert_eq!(udp["rep"], 0);
    assert!(
        udp["bytes_up"].as_u64().unwrap() >= 11,
        "{udp} (echo {uecho})"
    );
}
