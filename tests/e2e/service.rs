//! End-to-end: running under systemd. Socket activation through `systemd-socket-activate`
//! (the LISTEN_FDS protocol of a socket unit, without a service manager), and the unit files
//! in deploy/ checked by `systemd-analyze verify`.

use crate::common::*;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `systemd-socket-activate -l A -l B ...`: the wrapper binds and listens on each address,
/// then execs the relay (same PID) with LISTEN_FDS set.
fn activate_args(addrs: &[SocketAddr]) -> Vec<String> {
    let mut w = vec!["systemd-socket-activate".to_string()];
    for a in addrs {
        w.push("-l".into());
        w.push(a.to_string());
    }
    w
}

/// Starts the relay socket-activated on `addrs` with `args`. Like a socket unit,
/// `systemd-socket-activate` starts the relay only when the first client connects: a curl for
/// `url` through `addrs[0]` is that client, and must be served once the relay is up. The
/// relay is also given one `--listen 127.0.0.N:0` per address, which it must ignore: the
/// helper then waits for one `listening` line per passed socket.
fn start_activated(addrs: &[SocketAddr], args: &[&str], url: &str) -> Relay {
    require_tool("systemd-socket-activate");
    let wrapper = activate_args(addrs);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    // Distinct, as repeating a --listen address is an error.
    let ignored: Vec<String> = (1..=addrs.len())
        .map(|i| format!("127.0.0.{i}:0"))
        .collect();
    let mut full: Vec<&str> = args.to_vec();
    for a in &ignored {
        full.extend(["--listen", a]);
    }
    let first = {
        let (relay, url) = (addrs[0], url.to_string());
        std::thread::spawn(move || {
            // systemd-socket-activate may not have bound yet: wait until the address takes
            // a connection (that probe activates the relay too, and closes without a word).
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect_timeout(&relay, Duration::from_secs(1)).is_err() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{relay} never took a connection"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            curl_ok(relay, &url)
        })
    };
    let relay = Relay::start_wrapped(&wrapper, &full);
    assert_eq!(
        relay.addr, addrs[0],
        "the first `listening` line must show the first passed socket, not an ignored --listen"
    );
    let body = first
        .join()
        .expect("the curl that activated the relay failed");
    assert_eq!(body, b"hello\n", "the connection that activated the relay");
    relay
}

#[test]
fn socket_activated_relay_serves_many_connections_on_the_passed_socket() {
    let _guard = shared();
    if skip_unless_ringsocks("socket activation") {
        return;
    }
    let http = http_server("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}/", http.port());
    // A free port: bound, then released for systemd-socket-activate to bind.
    let addr = closed_port();
    let mut relay = start_activated(&[addr], &["--shards", "2"], &url);
    for i in 0..20 {
        let body = curl_ok(relay.addr, &url);
        assert_eq!(body, b"hello\n", "curl #{i} through the activated relay");
    }
    // Two shards accept from one shared queue: the one that loses a race must not see it as
    // an accept error.
    let log = relay.stderr();
    assert!(
        !log.contains("accept failed"),
        "a shard's accept failed on the shared socket:\n{log}"
    );
    // SIGTERM still stops it cleanly (every shard closes its copy of the socket).
    relay.signal("TERM");
    let st = relay
        .wait_exit(Duration::from_secs(5))
        .expect("activated relay did not exit within 5 s of SIGTERM");
    assert!(st.success(), "exit status after SIGTERM: {st}");
}

#[test]
fn socket_activated_relay_uses_every_passed_socket() {
    let _guard = shared();
    if skip_unless_ringsocks("socket activation") {
        return;
    }
    let http = http_server("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}/", http.port());
    let mut addrs = vec![closed_port()];
    if has_ipv6_loopback() {
        let l = std::net::TcpListener::bind("[::1]:0").unwrap();
        addrs.push(l.local_addr().unwrap());
    } else {
        let second = (0..10)
            .map(|_| closed_port())
            .find(|a| *a != addrs[0])
            .unwrap();
        addrs.push(second);
    }
    let _relay = start_activated(&addrs, &["--shards", "3"], &url);
    for a in &addrs {
        for _ in 0..5 {
            assert_eq!(curl_ok(*a, &url), b"hello\n", "curl through {a}");
        }
    }
}

/// The committed units with ExecStart pointing at the binary under test (verify wants an
/// executable there), written to a fresh directory.
fn units_for_verify() -> (PathBuf, String) {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let service = std::fs::read_to_string(deploy.join("ringsocks.service")).unwrap();
    let socket = std::fs::read_to_string(deploy.join("ringsocks.socket")).unwrap();
    let exec = "ExecStart=/usr/local/bin/ringsocks ";
    assert!(
        service.lines().any(|l| l.starts_with(exec)),
        "deploy/ringsocks.service must run /usr/local/bin/ringsocks"
    );
    let service = service.replace(exec, &format!("ExecStart={} ", relay_bin().display()));
    let dir = tmp_path("units");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ringsocks.service"), &service).unwrap();
    std::fs::write(dir.join("ringsocks.socket"), socket).unwrap();
    (dir, service)
}

#[test]
fn systemd_analyze_verifies_the_units() {
    let _guard = shared();
    require_tool("systemd-analyze");
    let (dir, _) = units_for_verify();
    let mut args = vec!["verify".to_string()];
    for unit in ["ringsocks.service", "ringsocks.socket"] {
        args.push(dir.join(unit).display().to_string());
    }
    let (st, out, err) = run_bounded(Path::new("systemd-analyze"), &args, Duration::from_secs(60));
    let st = st.expect("systemd-analyze verify did not finish within 60 s");
    assert!(
        st.success(),
        "systemd-analyze verify: {st}\nstdout:\n{out}\nstderr:\n{err}"
    );
    // An unknown key or a bad value is only a warning (exit 0): none may name our units.
    let ours: Vec<&str> = err
        .lines()
        .chain(out.lines())
        .filter(|l| l.contains("ringsocks.service") || l.contains("ringsocks.socket"))
        .collect();
    assert!(
        ours.is_empty(),
        "systemd-analyze verify warns:\n{}",
        ours.join("\n")
    );
}

#[test]
fn the_service_never_filters_io_uring() {
    let _guard = shared();
    let (_, service) = units_for_verify();
    let io_uring = ["io_uring_setup", "io_uring_enter", "io_uring_register"];
    for line in service.lines().map(str::trim) {
        let Some(v) = line.strip_prefix("SystemCallFilter=") else {
            continue;
        };
        if let Some(deny) = v.strip_prefix('~') {
            // A deny list must name neither io_uring nor a group holding it.
            for w in deny.split_whitespace() {
                assert!(
                    !w.starts_with("io_uring") && w != "@aio" && w != "@system-service",
                    "`{line}` would block io_uring"
                );
            }
        } else {
            // An allow list must name the io_uring calls (group contents vary by version).
            let words: Vec<&str> = v.split_whitespace().collect();
            for call in io_uring {
                assert!(words.contains(&call), "`{line}` does not allow {call}");
            }
        }
    }
}
