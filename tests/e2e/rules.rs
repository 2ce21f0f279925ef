//! Access rules from a config file, with real clients: curl for CONNECT (every field kind,
//! allowed and refused, the log line naming the rule), `deny_private_targets` against a name
//! that resolves to loopback (a hosts file in a private mount namespace), PySocks for UDP,
//! and SIGHUP reloads under a running 100 MB transfer.

use crate::common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Writes `text` to a fresh file for `--config`.
fn config_file(name: &str, text: &str) -> PathBuf {
    let path = tmp_path(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn start_with(config: &Path, extra: &[&str]) -> Relay {
    let mut args = vec!["--config", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    Relay::start(&args)
}

/// Waits (at most 10 s) until the relay's log contains `what`.
fn wait_log(relay: &Relay, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = relay.stderr();
        if log.contains(what) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "the relay never logged {what:?}; its log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// curl through `relay`, as `user` when given, with `--socks5-hostname` (names go to the
/// relay) and extra curl arguments.
fn curl_via(relay: &Relay, user: Option<&str>, url: &str, extra: &[&str]) -> std::process::Output {
    let proxy = match user {
        Some(u) => format!("socks5h://{u}:pw@{}", relay.addr),
        None => format!("socks5h://{}", relay.addr),
    };
    let mut args = vec!["--proxy", proxy.as_str()];
    args.extend_from_slice(extra);
    args.push(url);
    curl(&args)
}

fn assert_allowed(relay: &Relay, user: Option<&str>, url: &str, extra: &[&str]) {
    let out = curl_via(relay, user, url, extra);
    assert!(
        out.status.success() && out.stdout == b"hello\n",
        "{user:?} {url} {extra:?} should be allowed: {}\nstderr: {}\nrelay log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        relay.stderr()
    );
}

/// curl must fail with the SOCKS5 reply 0x02 ("connection not allowed by ruleset"), and the
/// relay must log the refusal naming `by`.
fn assert_refused(relay: &Relay, user: Option<&str>, url: &str, extra: &[&str], by: &str) {
    let before = relay.stderr().matches(by).count();
    let out = curl_via(relay, user, url, extra);
    let err = String::from_utf8_lossy(&out.stderr);
    // curl: "(97) Can't complete SOCKS5 connection to ... (2)"; exit status 97 is
    // CURLE_PROXY, and the number in parentheses is the REP code.
    assert_eq!(
        out.status.code(),
        Some(97),
        "{user:?} {url} {extra:?} should be refused; curl said: {err}"
    );
    assert!(err.contains("(2)"), "curl reports REP 0x02: {err}");
    // The relay's log reaches us through a reader thread: wait for the new line.
    let deadline = Instant::now() + Duration::from_secs(10);
    while relay.stderr().matches(by).count() <= before {
        assert!(
            Instant::now() < deadline,
            "a new log line names {by:?}; log:\n{}",
            relay.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn curl_through_rules_of_every_field_kind() {
    let _guard = shared();
    let (http, _v6) = http_server_localhost();
    let other = http_server("127.0.0.1:0").unwrap();
    let port = http.port();
    let cfg = config_file(
        "rules-every-kind.toml",
        &format!(
            r#"# rules of every field kind; the first that matches decides
user = ["alice:pw", "bob:pw", "carol:pw"]
connect_timeout = "5s"

[[rule]]                       # rule 1 (line 5): a target CIDR
action = "deny"
to = ["127.0.0.3/32"]

[[rule]]                       # rule 2 (line 9): names, exact and by suffix
action = "deny"
to = ["exact.refused.test", "*.refused.test"]

[[rule]]                       # rule 3 (line 13): a port range
action = "deny"
ports = ["{other}-{other}"]

[[rule]]                       # rule 4 (line 17): a user
action = "deny"
users = ["bob"]

[[rule]]                       # rule 5 (line 21): a client CIDR
action = "deny"
from = ["127.0.0.5"]

[[rule]]                       # rule 6 (line 25): a command, for one client
action = "deny"
commands = ["connect"]
from = ["127.0.0.6/32"]

[[rule]]                       # rule 7 (line 30): what is allowed
action = "allow"
to = ["127.0.0.0/8", "localhost", "*.allowed.test"]
ports = [{port}, "1-1"]
users = ["alice", "carol"]
commands = ["connect", "udp"]

[policy]
default = "deny"
"#,
            other = other.port(),
        ),
    );
    let relay = start_with(&cfg, &["--shards", "2"]);
    let url = |host: &str, p: u16| format!("http://{host}:{p}/");

    // Allowed: rule 7, by address and by name (resolved by the relay).
    assert_allowed(&relay, Some("alice"), &url("127.0.0.1", port), &[]);
    assert_allowed(&relay, Some("carol"), &url("localhost", port), &[]);
    // Each field kind refuses.
    assert_refused(
        &relay,
        Some("alice"),
        &url("127.0.0.3", port),
        &[],
        "rule 1 (line 5)",
    );
    for host in [
        "exact.refused.test",
        "a.b.refused.test",
        "EXACT.Refused.Test",
    ] {
        assert_refused(
            &relay,
            Some("alice"),
            &url(host, port),
            &[],
            "rule 2 (line 9)",
        );
    }
    assert_refused(
        &relay,
        Some("alice"),
        &url("127.0.0.1", other.port()),
        &[],
        "rule 3 (line 13)",
    );
    assert_refused(
        &relay,
        Some("bob"),
        &url("127.0.0.1", port),
        &[],
        "rule 4 (line 17)",
    );
    let from5 = ["--interface", "127.0.0.5"];
    assert_refused(
        &relay,
        Some("alice"),
        &url("127.0.0.1", port),
        &from5,
        "rule 5 (line 21)",
    );
    let from6 = ["--interface", "127.0.0.6"];
    assert_refused(
        &relay,
        Some("alice"),
        &url("127.0.0.1", port),
        &from6,
        "rule 6 (line 25)",
    );
    // Rule 6 is for 127.0.0.6 only; 127.0.0.7 falls through to rule 7.
    assert_allowed(
        &relay,
        Some("alice"),
        &url("127.0.0.1", port),
        &["--interface", "127.0.0.7"],
    );
    // Nothing matches: a port rule 7 does not list, a name it does not list.
    let policy = "policy default = \"deny\"";
    assert_refused(
        &relay,
        Some("alice"),
        &url("127.0.0.1", closed_port().port()),
        &[],
        policy,
    );
    assert_refused(
        &relay,
        Some("alice"),
        &url("refused.test", port),
        &[],
        policy,
    );
    // A name allowed by suffix still has its addresses checked: it does not resolve here,
    // so the refusal is a resolution failure (REP 0x04), not the rules.
    let out = curl_via(
        &relay,
        Some("alice"),
        &url("nowhere.allowed.test", port),
        &[],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("(4)"),
        "{out:?}"
    );
}

/// Starts the relay in a private mount namespace whose /etc/hosts maps `rebind.test` (and
/// `also.rebind.test`) to 127.0.0.1: a public-looking name that resolves to loopback.
fn relay_with_hosts(config: &Path) -> Relay {
    let hosts = tmp_path("hosts");
    std::fs::write(
        &hosts,
        "127.0.0.1 localhost\n127.0.0.1 rebind.test\n127.0.0.1 also.rebind.test\n",
    )
    .unwrap();
    let nsswitch = tmp_path("nsswitch-files.conf");
    std::fs::write(&nsswitch, "hosts: files\n").unwrap();
    relay_with_mounts(
        &[(&hosts, "/etc/hosts"), (&nsswitch, "/etc/nsswitch.conf")],
        &["--config", config.to_str().unwrap(), "--shards", "1"],
    )
}

#[test]
fn deny_private_targets_refuses_names_that_resolve_to_loopback() {
    let _guard = shared();
    let (http, _v6) = http_server_localhost();
    let port = http.port();
    let cfg = config_file(
        "rules-private.toml",
        "[policy]\ndefault = \"allow\"\ndeny_private_targets = true\n",
    );
    let relay = relay_with_hosts(&cfg);
    let private = "policy deny_private_targets";
    // The name passes the name check; its address (127.0.0.1) is refused: DNS rebinding.
    assert_refused(
        &relay,
        None,
        &format!("http://rebind.test:{port}/"),
        &[],
        private,
    );
    assert_refused(
        &relay,
        None,
        &format!("http://127.0.0.1:{port}/"),
        &[],
        private,
    );
    assert_refused(
        &relay,
        None,
        &format!("http://[::ffff:127.0.0.1]:{port}/"),
        &[],
        private,
    );
    assert_refused(
        &relay,
        None,
        &format!("http://169.254.169.254:{port}/"),
        &[],
        private,
    );
    drop(relay);

    // An explicit allow rule for the name lets it (and only it) through.
    let cfg = config_file(
        "rules-private-allow.toml",
        "[[rule]]\naction = \"allow\"\nto = [\"rebind.test\"]\n\n\
         [policy]\ndefault = \"allow\"\ndeny_private_targets = true\n",
    );
    let relay = relay_with_hosts(&cfg);
    assert_allowed(&relay, None, &format!("http://rebind.test:{port}/"), &[]);
    assert_refused(
        &relay,
        None,
        &format!("http://also.rebind.test:{port}/"),
        &[],
        private,
    );
    assert_refused(
        &relay,
        None,
        &format!("http://127.0.0.1:{port}/"),
        &[],
        private,
    );
}

#[test]
fn udp_pysocks_to_an_allowed_and_a_refused_destination() {
    let _guard = shared();
    let allowed = UdpServer::echo("127.0.0.1:0");
    let refused = UdpServer::echo("127.0.0.2:0");
    let cfg = config_file(
        "rules-udp.toml",
        "[[rule]]\naction = \"deny\"\ncommands = [\"udp\"]\nto = [\"127.0.0.2\"]\n\n\
         [[rule]]\naction = \"deny\"\ncommands = [\"udp\"]\nfrom = [\"127.0.0.9\"]\n\n\
         [policy]\ndefault = \"allow\"\n",
    );
    let relay = start_with(&cfg, &["--shards", "1"]);
    let py = python_with_socks();
    let (st, out, err) = run_bounded(
        &py,
        &[
            support_script("udp_pysocks.py").display().to_string(),
            "allowed-refused".into(),
            "--proxy".into(),
            relay.addr.to_string(),
            "--target".into(),
            allowed.addr.to_string(),
            "--target2".into(),
            refused.addr.to_string(),
        ],
        Duration::from_secs(60),
    );
    assert!(
        st.is_some_and(|s| s.success()) && out.contains("OK"),
        "PySocks: {st:?}\n{out}\n{err}"
    );
    assert_eq!(
        refused.received(),
        0,
        "the refused target never saw a datagram"
    );
    assert_eq!(allowed.received(), 2);

    // An association itself is refused by `commands` (rule 2 for 127.0.0.9).
    let sock = std::net::TcpStream::connect_timeout(&relay.addr, IO_TIMEOUT);
    drop(sock);
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&"127.0.0.9:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    s.connect_timeout(&relay.addr.into(), IO_TIMEOUT).unwrap();
    let mut s: TcpStream = s.into();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    negotiate(&mut s, None).unwrap();
    s.write_all(&request(
        CMD_UDP_ASSOCIATE,
        &Target::Addr("0.0.0.0:0".parse().unwrap()),
    ))
    .unwrap();
    let r = read_reply(&mut s).unwrap();
    assert_eq!(r.rep, 0x02, "UDP ASSOCIATE from 127.0.0.9: {r:?}");
    wait_log(&relay, "refused by rule 2");
}

/// A server that sends `len` pseudo-random bytes (seed 13) to its first client, then closes.
fn source_server(len: usize) -> (SocketAddr, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let Ok((mut s, _)) = l.accept() else { return };
        let chunk = prng_bytes(13, 1 << 20);
        let mut left = len;
        while left > 0 {
            let n = left.min(chunk.len());
            if s.write_all(&chunk[..n]).is_err() {
                return;
            }
            left -= n;
        }
    });
    (addr, t)
}

#[test]
fn reload_changes_rules_for_new_connections_while_a_transfer_keeps_flowing() {
    let _guard = shared();
    const LEN: usize = 100 << 20;
    let (src, src_thread) = source_server(LEN);
    let (http, _v6) = http_server_localhost();
    let allow_all = "[[rule]]\naction = \"allow\"\nto = [\"127.0.0.1\"]\n";
    let cfg = config_file("rules-reload.toml", allow_all);
    let relay = start_with(&cfg, &["--shards", "2"]);
    let url = format!("http://127.0.0.1:{}/", http.port());

    let mut tunnel = socks_connect(relay.addr, src);
    tunnel.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let chunk = prng_bytes(13, 1 << 20);
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let mut read_some = |s: &mut TcpStream, upto: usize, got: &mut usize| {
        while *got < upto {
            let n = s.read(&mut buf).expect("the transfer keeps flowing");
            assert!(n > 0, "EOF after {got} of {LEN} bytes");
            for (i, b) in buf[..n].iter().enumerate() {
                let at = (*got + i) % chunk.len();
                assert_eq!(*b, chunk[at], "byte {} differs", *got + i);
            }
            *got += n;
        }
    };
    read_some(&mut tunnel, 10 << 20, &mut got);
    assert_allowed(&relay, None, &url, &[]);

    // New rules: 127.0.0.1 is now refused. The open tunnel keeps flowing.
    std::fs::write(&cfg, "[[rule]]\naction = \"deny\"\nto = [\"127.0.0.1\"]\n").unwrap();
    relay.signal("HUP");
    wait_log(&relay, "configuration reloaded");
    read_some(&mut tunnel, 20 << 20, &mut got);
    assert_refused(&relay, None, &url, &[], "refused by rule 1 (line 1)");

    // A file that does not parse leaves the rules in force.
    std::fs::write(
        &cfg,
        "[[rule]]\naction = \"allow\"\nto = [\"127.0.0.1/33\"]\n",
    )
    .unwrap();
    relay.signal("HUP");
    let log = wait_log(&relay, "reload failed");
    assert!(log.contains("127.0.0.1/33"), "the log says why: {log}");
    read_some(&mut tunnel, 30 << 20, &mut got);
    assert_refused(&relay, None, &url, &[], "refused by rule 1 (line 1)");

    // Back to allowing it.
    std::fs::write(&cfg, allow_all).unwrap();
    relay.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while relay.stderr().matches("configuration reloaded").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "second reload: {}",
            relay.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_allowed(&relay, None, &url, &[]);
    read_some(&mut tunnel, LEN, &mut got);
    let mut rest = [0u8; 1];
    assert_eq!(
        tunnel.read(&mut rest).unwrap(),
        0,
        "EOF after exactly {LEN} bytes"
    );
    src_thread.join().unwrap();
}

#[test]
fn a_restart_only_change_is_logged_and_kept() {
    let _guard = shared();
    let cfg = config_file("rules-restart.toml", "forward = \"copy\"\n");
    let relay = start_with(&cfg, &["--shards", "1"]);
    std::fs::write(&cfg, "forward = \"splice\"\nconnect_timeout = \"3s\"\n").unwrap();
    relay.signal("HUP");
    let log = wait_log(&relay, "configuration reloaded");
    assert!(
        log.contains("settings=forward") && log.contains("only take effect on a restart"),
        "{log}"
    );
    let echo = echo_server("127.0.0.1:0");
    let s = socks_connect(relay.addr, echo.addr);
    echo_roundtrip(&s, b"still relaying");
}

#[test]
fn check_config_validates_the_example_and_names_bad_keys() {
    let _guard = shared();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/ringsocks.toml");
    let users = tmp_path("example-users");
    std::fs::write(&users, "alice:correct horse\n").unwrap();
    std::fs::set_permissions(&users, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(relay_bin())
            .args(args)
            .output()
            .expect("run ringsocks --check-config");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, out, err) = run(&[
        "--check-config",
        example.to_str().unwrap(),
        "--users-file",
        users.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains(": OK ("), "{out}");

    let bad = config_file(
        "bad.toml",
        "connect_timeout = \"10s\"\n\n[[rule]]\naction = \"deny\"\nto = [\"10.0.0.0/33\"]\n",
    );
    let (code, _, err) = run(&["--check-config", bad.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("bad.toml:5: rule 1: to:") && err.contains("10.0.0.0/33"),
        "{err}"
    );
}
