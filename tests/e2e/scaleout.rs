//! Scale-out behind an ordinary L4 balancer (docs/DEPLOY.md): two ringsocks instances behind
//! HAProxy (`mode tcp`, `balance roundrobin`, `send-proxy-v2`, an HTTP health check on each
//! instance's `/healthz`).
//!
//! - Clients on 127.0.0.2 and 127.0.0.3 (curl `--interface`) are spread over both instances,
//!   and each instance's access log names the real client, never the balancer (which connects
//!   from its own address, 127.0.0.9, the only `--trusted-proxy`).
//! - UDP ASSOCIATE through the balancer (PySocks): the control connection goes through
//!   HAProxy, the datagrams straight to the instance's `--udp-advertise` address.
//! - A draining instance (SIGTERM) answers 503 on `/healthz`, HAProxy takes it out of the pool
//!   and new clients go to the other one, while its open tunnel finishes.
//!
//! Needs `haproxy` (Debian package `haproxy`), curl and PySocks. Without haproxy the tests are
//! skipped with a note, except in CI (`CI` set), where they fail.

use crate::common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The balancer's source address toward the instances (HAProxy `source`): distinct from
/// every client's, so that a log line naming it would be a line without the real client.
/// Where HAProxy accepts clients: 127.0.0.1 (PySocks sends datagrams to the proxy's own IP,
/// whatever BND says, so the front must share the instances' IP), on a free port below the
/// kernel's ephemeral range, so that no socket of a test running alongside (they all take
/// ephemeral ports) can take it between this probe and HAProxy's bind.
/// Each call starts from its own port (HAProxy binds with SO_REUSEPORT, so two tests that
/// probed the same free port would share it).
fn front_addr() -> SocketAddr {
    static CALLS: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let base = 20_000 + (std::process::id() % 1_000) as u16 * 8 + call * 1_000;
    (0..500u16)
        .map(|i| SocketAddr::from(([127, 0, 0, 1], base + i)))
        .find(|a| std::net::TcpListener::bind(a).is_ok())
        .expect("a free port below the ephemeral range")
}

const BALANCER_IP: &str = "127.0.0.9";
/// Client addresses for the TCP traffic.
const CLIENTS: [&str; 2] = ["127.0.0.2", "127.0.0.3"];
/// Requests per client address.
const PER_CLIENT: usize = 6;
/// How long any wait below may take.
const WAIT: Duration = Duration::from_secs(20);

/// True (with a note) when haproxy is missing outside CI; panics when it is missing in CI.
fn skip_without_haproxy(test: &str) -> bool {
    let ok = Command::new("haproxy")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return false;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "haproxy is required in CI (Debian package `haproxy`)"
    );
    println!("note: {test}: skipped: haproxy is not installed (apt-get install haproxy)");
    true
}

/// HAProxy in the foreground (`-db`), output to a file; killed (by its PID) on drop.
struct Haproxy {
    child: Child,
    front: SocketAddr,
    stats: PathBuf,
    output: PathBuf,
}

impl Haproxy {
    fn start(cfg: &Path, front: SocketAddr, stats: PathBuf) -> Haproxy {
        let output = tmp_path("haproxy.out");
        let out = std::fs::File::create(&output).unwrap();
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(cfg)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn haproxy");
        let mut h = Haproxy {
            child,
            front,
            stats,
            output,
        };
        // Up once the frontend accepts and the stats socket answers.
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(Some(st)) = h.child.try_wait() {
                panic!("haproxy exited ({st}):\n{}", h.output());
            }
            let accepts = TcpStream::connect_timeout(&h.front, Duration::from_millis(200)).is_ok();
            if accepts && h.try_show_stat().is_some() {
                return h;
            }
            assert!(
                Instant::now() < deadline,
                "haproxy did not accept on {} within {WAIT:?}:\n{}",
                h.front,
                h.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }

    /// `show stat` on the stats socket: the CSV, or None if it did not answer.
    fn try_show_stat(&self) -> Option<String> {
        let mut s = UnixStream::connect(&self.stats).ok()?;
        s.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
        s.set_write_timeout(Some(IO_TIMEOUT)).ok()?;
        s.write_all(b"show stat\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        out.starts_with("# pxname").then_some(out)
    }

    /// (status, check_status) of server `name` in backend `ringsocks`.
    fn server_state(&self, name: &str) -> (String, String) {
        let csv = self
            .try_show_stat()
            .unwrap_or_else(|| panic!("haproxy stats socket: no answer\n{}", self.output()));
        let mut lines = csv.lines();
        let header: Vec<&str> = lines
            .next()
            .unwrap()
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let col = |n: &str| header.iter().position(|h| *h == n).unwrap();
        let (px, sv, st, ck) = (
            col("pxname"),
            col("svname"),
            col("status"),
            col("check_status"),
        );
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .find(|f| f.len() > ck && f[px] == "ringsocks" && f[sv] == name)
            .map(|f| (f[st].to_string(), f[ck].to_string()))
            .unwrap_or_else(|| panic!("no server {name} in:\n{csv}"))
    }

    /// Waits until `want(status, check_status)` holds for server `name`.
    fn wait_server(&self, name: &str, what: &str, want: impl Fn(&str, &str) -> bool) {
        let deadline = Instant::now() + WAIT;
        loop {
            let (st, ck) = self.server_state(name);
            if want(&st, &ck) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: {what} within {WAIT:?} (status {st:?}, check {ck:?})\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- haproxy (pid {}) output ----\n{}\n---- end haproxy output ----",
                self.child.id(),
                self.output()
            );
        }
    }
}

/// One ringsocks instance of the pool.
struct Instance {
    relay: Relay,
    metrics: SocketAddr,
    log: PathBuf,
}

/// Two instances behind HAProxy.
struct Pool {
    instances: Vec<Instance>,
    haproxy: Haproxy,
}

/// The HAProxy configuration of docs/DEPLOY.md, on loopback, plus `source` (the balancer's
/// address toward the instances) and the stats socket the test reads server states from.
fn haproxy_config(front: SocketAddr, stats: &Path, instances: &[Instance]) -> String {
    let mut cfg = format!(
        "global
    log stderr format raw local0 info
    stats socket {stats} mode 600 level admin

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    timeout client 10m
    timeout server 10m
    timeout check 2s

frontend socks
    bind {front}
    default_backend ringsocks

backend ringsocks
    balance roundrobin
    source {BALANCER_IP}
    option httpchk GET /healthz
    http-check expect status 200
    default-server inter 300ms fall 2 rise 1
",
        stats = stats.display()
    );
    for (i, inst) in instances.iter().enumerate() {
        cfg.push_str(&format!(
            "    server rs{} {} send-proxy-v2 check port {}\n",
            i + 1,
            inst.relay.addr,
            inst.metrics.port()
        ));
    }
    cfg
}

impl Pool {
    fn start() -> Pool {
        let instances: Vec<Instance> = (0..2)
            .map(|i| {
                let log = tmp_path(&format!("scaleout-rs{}.log", i + 1));
                let l = log.to_str().unwrap().to_string();
                let relay = Relay::start(&[
                    "--shards",
                    "2",
                    "--proxy-protocol",
                    "--trusted-proxy",
                    BALANCER_IP,
                    "--access-log",
                    &l,
                    "--udp-advertise",
                    "127.0.0.1",
                    "--metrics",
                    "127.0.0.1:0",
                    "--drain-timeout",
                    "30s",
                ]);
                let metrics = relay.metrics_addr();
                Instance {
                    relay,
                    metrics,
                    log,
                }
            })
            .collect();
        let front = front_addr();
        let stats = tmp_path("haproxy.sock");
        let cfg = tmp_path("haproxy.cfg");
        std::fs::write(&cfg, haproxy_config(front, &stats, &instances)).unwrap();
        let haproxy = Haproxy::start(&cfg, front, stats);
        // Both health checks passed: /healthz answered 200 on each metrics port.
        for name in ["rs1", "rs2"] {
            haproxy.wait_server(name, "UP with a passing /healthz check", |st, ck| {
                st == "UP" && ck == "L7OK"
            });
        }
        Pool { instances, haproxy }
    }

    fn front(&self) -> String {
        self.haproxy.front.to_string()
    }
}

/// curl from `source` through the balancer; asserts success and the body.
fn curl_via(front: &str, source: &str, url: &str) {
    let out = curl(&["--interface", source, "--socks5", front, url]);
    assert!(
        out.status.success(),
        "curl --interface {source} --socks5 {front} {url}: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello\n",
        "body via {front} from {source}"
    );
}

/// The lines of an access log.
fn log_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Waits until the logs together hold `n` lines with `needle`; returns each log's lines.
fn wait_logs(logs: &[&Path], needle: &str, n: usize) -> Vec<Vec<String>> {
    let deadline = Instant::now() + WAIT;
    loop {
        let all: Vec<Vec<String>> = logs.iter().map(|p| log_lines(p)).collect();
        let count = all.iter().flatten().filter(|l| l.contains(needle)).count();
        if count >= n {
            return all;
        }
        assert!(
            Instant::now() < deadline,
            "{n} access-log lines with {needle:?} wanted within {WAIT:?}, got {count}:\n{all:#?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn count(lines: &[String], needle: &str) -> usize {
    lines.iter().filter(|l| l.contains(needle)).count()
}

#[test]
fn haproxy_spreads_clients_and_passes_their_addresses() {
    let _guard = shared();
    if skip_without_haproxy("scaleout::haproxy_spreads_clients_and_passes_their_addresses") {
        return;
    }
    let http = http_server("127.0.0.1:0").expect("bind http server");
    let url = format!("http://{}/", http.addr);
    let pool = Pool::start();
    let front = pool.front();

    for _ in 0..PER_CLIENT {
        for source in CLIENTS {
            curl_via(&front, source, &url);
        }
    }
    let logs: Vec<&Path> = pool.instances.iter().map(|i| i.log.as_path()).collect();
    let total = CLIENTS.len() * PER_CLIENT;
    let got = wait_logs(&logs, "command=connect", total);
    for (i, lines) in got.iter().enumerate() {
        println!(
            "rs{}: {} connect lines, from 127.0.0.2: {}, from 127.0.0.3: {}",
            i + 1,
            count(lines, "command=connect"),
            count(lines, "client=127.0.0.2:"),
            count(lines, "client=127.0.0.3:")
        );
        assert!(
            count(lines, "command=connect") >= 1,
            "rs{} served no request: roundrobin over both instances\n{got:#?}",
            i + 1
        );
    }
    let all: Vec<String> = got.into_iter().flatten().collect();
    assert_eq!(count(&all, "command=connect"), total, "{all:#?}");
    for source in CLIENTS {
        assert_eq!(
            count(&all, &format!("client={source}:")),
            PER_CLIENT,
            "each request from {source} is logged with its real address:\n{all:#?}"
        );
    }
    for line in &all {
        assert!(
            line.contains("rep=0x00") && line.contains(&format!("target=\"{}\"", http.addr)),
            "{line}"
        );
        assert!(
            !line.contains(&format!("client={BALANCER_IP}:"))
                && !line.contains("client=127.0.0.1:"),
            "a line names the balancer, not the client: {line}"
        );
    }

    // UDP ASSOCIATE through the balancer, twice (roundrobin: one association per instance).
    // PySocks connects to HAProxy from 127.0.0.1; the instance takes that address from the
    // PROXY header, advertises 127.0.0.1 in BND.ADDR and gets the datagrams directly.
    let echo = UdpServer::echo("127.0.0.1:0");
    let py = python_with_socks();
    for round in 0..2 {
        let argv: Vec<String> = vec![
            support_script("udp_pysocks.py").display().to_string(),
            "echo".into(),
            "--proxy".into(),
            front.clone(),
            "--target".into(),
            echo.addr.to_string(),
        ];
        let (st, out, err) = run_bounded(&py, &argv, Duration::from_secs(60));
        assert!(
            st.is_some_and(|s| s.success()) && out.contains("OK"),
            "PySocks UDP via HAProxy, round {round} (status {st:?})\nstdout:\n{out}\nstderr:\n{err}"
        );
        println!(
            "udp_pysocks echo via {front}, round {round}: {}",
            out.trim()
        );
    }
    // udp_pysocks.py echo sends six datagrams and waits for each echo.
    assert!(
        echo.received() >= 12,
        "the UDP target got {} datagrams",
        echo.received()
    );
    let got = wait_logs(&logs, "command=udp", 2);
    for (i, lines) in got.iter().enumerate() {
        println!("rs{}: {} udp lines", i + 1, count(lines, "command=udp"));
    }
    let udp: Vec<&String> = got
        .iter()
        .flatten()
        .filter(|l| l.contains("command=udp"))
        .collect();
    assert_eq!(udp.len(), 2, "{udp:#?}");
    for line in &udp {
        assert!(
            line.contains("client=127.0.0.1:") && line.contains("rep=0x00"),
            "the association is logged for the real client (127.0.0.1, from the PROXY \
             header): {line}"
        );
        assert!(
            !line.contains("up=0 "),
            "the datagrams reached the instance: {line}"
        );
    }
    for line in got.iter().flatten() {
        assert!(
            !line.contains(&format!("client={BALANCER_IP}:")),
            "a line names the balancer: {line}"
        );
    }
    drop(pool);
}

/// Connects to `inst` as the balancer would (from BALANCER_IP, PROXY v1 header for client
/// `client`) and opens a tunnel to `target`.
fn tunnel_as_balancer(inst: &Instance, client: &str, target: SocketAddr) -> TcpStream {
    let mut s = connect_from(BALANCER_IP.parse().unwrap(), inst.relay.addr);
    let c: SocketAddr = client.parse().unwrap();
    let mut msg = format!(
        "PROXY TCP4 {} {} {} {}\r\n",
        c.ip(),
        inst.relay.addr.ip(),
        c.port(),
        inst.relay.addr.port()
    )
    .into_bytes();
    msg.extend(greeting(&[0x00]));
    msg.extend(request(CMD_CONNECT, &Target::Addr(target)));
    s.write_all(&msg).unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).unwrap();
    assert_eq!(m, [0x05, 0x00], "method reply");
    let r = read_reply(&mut s).unwrap();
    assert_eq!(r.rep, 0x00, "CONNECT via {}: {r:?}", inst.relay.addr);
    s
}

#[test]
fn a_draining_instance_leaves_the_pool() {
    let _guard = shared();
    if skip_without_haproxy("scaleout::a_draining_instance_leaves_the_pool") {
        return;
    }
    let http = http_server("127.0.0.1:0").expect("bind http server");
    let url = format!("http://{}/", http.addr);
    let echo = echo_server("127.0.0.1:0");
    let mut pool = Pool::start();
    let front = pool.front();

    // A long tunnel on rs2, then SIGTERM: rs2 drains (it stays up for that tunnel), its
    // /healthz turns 503 and HAProxy marks it DOWN.
    let held = tunnel_as_balancer(&pool.instances[1], "192.0.2.44:4444", echo.addr);
    echo_roundtrip(&held, b"before the drain");
    pool.instances[1].relay.signal("TERM");
    pool.haproxy
        .wait_server("rs2", "DOWN once /healthz answers 503", |st, ck| {
            st == "DOWN" && ck == "L7STS"
        });
    pool.haproxy
        .wait_server("rs1", "still UP", |st, _| st == "UP");
    assert!(
        pool.instances[1].relay.is_running(),
        "rs2 keeps running while its tunnel is open"
    );

    // New clients all go to rs1.
    for _ in 0..3 {
        for source in CLIENTS {
            curl_via(&front, source, &url);
        }
    }
    let logs: Vec<&Path> = pool.instances.iter().map(|i| i.log.as_path()).collect();
    let got = wait_logs(&logs, "command=connect", 6);
    assert_eq!(
        count(&got[0], "command=connect"),
        6,
        "rs1 took every new client:\n{got:#?}"
    );
    assert_eq!(
        count(&got[1], "command=connect"),
        0,
        "the draining rs2 took none (its tunnel is still open):\n{got:#?}"
    );

    // The open tunnel still works, and once closed rs2 exits on its own and logs it.
    echo_roundtrip(&held, b"during the drain");
    drop(held);
    let st = pool.instances[1]
        .relay
        .wait_exit(WAIT)
        .expect("rs2 exits once its last tunnel closed");
    assert!(st.success(), "rs2 exit status {st}");
    let rs2 = log_lines(&pool.instances[1].log);
    assert!(
        rs2.len() == 1 && rs2[0].contains("client=192.0.2.44:4444 ") && rs2[0].contains("rep=0x00"),
        "{rs2:#?}"
    );
}
