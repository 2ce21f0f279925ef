//! The third-party cross-check of the `full` suite: iperf3 through
//! proxychains4 to each relay (iperf3 alone for direct loopback), 1 and 8
//! streams, as in scripts/iperf-proxychains.sh. One iperf3 server on
//! 127.0.0.1 for the whole suite, it and every client pinned to the load
//! CPU (the relays stay on theirs); one proxychains4 configuration per
//! relay. Without iperf3 or proxychains4 the cross-check is skipped with a
//! note and the suite runs without it.

use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::measure::run_capture;
use super::suite::{Measurement, Suite};
use crate::common::Result;
use crate::relays::{pinned, Relay, TempDir};

/// Whether the suite has the cross-check, and its server if it runs.
pub(super) enum CrossCheck {
    /// The suite has no iperf3 measurements.
    NotInSuite,
    /// Not run, and why (a tool missing, or the server did not start).
    Skipped(String),
    Ready(Iperf),
}

/// The iperf3 server (stopped by its PID on drop) and what the clients need.
pub(super) struct Iperf {
    iperf3: PathBuf,
    proxychains: PathBuf,
    port: u16,
    load_cpu: usize,
    server: Child,
    server_argv: Vec<String>,
    tmp: TempDir,
}

/// The first `name` on $PATH.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// proxychains4's configuration for a relay on `addr`: that one SOCKS5
/// proxy, every connection through it (no `localnet` exemption, so the
/// loopback target is proxied too), quiet.
pub fn proxychains_config(addr: SocketAddr) -> String {
    proxychains_text(addr.ip(), addr.port())
}

fn proxychains_text(host: impl std::fmt::Display, port: impl std::fmt::Display) -> String {
    format!(
        "strict_chain\n\
         quiet_mode\n\
         tcp_read_time_out 15000\n\
         tcp_connect_time_out 8000\n\
         [ProxyList]\n\
         socks5 {host} {port}\n"
    )
}

/// iperf3's `-t` and `-O` (whole seconds) for the suite's duration and
/// warmup: at least 1 s measured.
fn iperf_times(duration: f64, warmup: f64) -> (u64, u64) {
    (duration.round().max(1.0) as u64, warmup.ceil() as u64)
}

impl CrossCheck {
    /// Starts the iperf3 server (pinned to `load_cpu`) if `suite` has the
    /// cross-check and both tools are installed.
    pub(super) fn start(suite: Suite, load_cpu: usize) -> CrossCheck {
        if !suite.measurements().iter().any(|m| m.is_iperf()) {
            return CrossCheck::NotInSuite;
        }
        let check = match (which("iperf3"), which("proxychains4")) {
            (None, _) => CrossCheck::Skipped("iperf3 not installed; apt-get install iperf3".into()),
            (_, None) => CrossCheck::Skipped(
                "proxychains4 not installed; apt-get install proxychains4".into(),
            ),
            (Some(iperf3), Some(proxychains)) => {
                match Iperf::start(iperf3, proxychains, load_cpu) {
                    Ok(ip) => CrossCheck::Ready(ip),
                    Err(e) => CrossCheck::Skipped(format!("iperf3 server did not start: {e}")),
                }
            }
        };
        match &check {
            CrossCheck::Ready(ip) => eprintln!(
                "compare: iperf3 cross-check: server on 127.0.0.1:{} (pid {})",
                ip.port,
                ip.server.id()
            ),
            CrossCheck::Skipped(why) => eprintln!("compare: iperf3 cross-check skipped: {why}"),
            CrossCheck::NotInSuite => {}
        }
        check
    }

    /// The `iperf` object of the suite document (null without the
    /// cross-check in the suite).
    pub(super) fn json(&self, duration: f64, warmup: f64) -> Value {
        let (t, omit) = iperf_times(duration, warmup);
        let how = json!({
            "client": format!(
                "taskset -c LOAD_CPU [proxychains4 -q -f CONF] iperf3 -c 127.0.0.1 -p PORT \
                 -t {t} -O {omit} -J -P 1|8"
            ),
            "proxychains_config": proxychains_text("127.0.0.1", "RELAY_PORT"),
            "figure": "/end/sum_received/bits_per_second of iperf3 -J, in Gbit/s",
        });
        match self {
            CrossCheck::NotInSuite => Value::Null,
            CrossCheck::Skipped(why) => json!({"skipped": why, "how": how}),
            CrossCheck::Ready(ip) => json!({
                "skipped": null,
                "how": how,
                "server": ip.server_argv,
                "iperf3_version": tool_version(&ip.iperf3, &["--version"]),
                "proxychains4": ip.proxychains.display().to_string(),
            }),
        }
    }
}

/// The first line `bin ARGS` prints, e.g. `iperf 3.12 (cJSON 1.7.15)`.
fn tool_version(bin: &Path, args: &[&str]) -> String {
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

impl Iperf {
    fn start(iperf3: PathBuf, proxychains: PathBuf, load_cpu: usize) -> Result<Iperf> {
        let tmp = TempDir::new("iperf")?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let args: Vec<String> = ["-s", "-B", "127.0.0.1", "-p", &port.to_string()]
            .map(String::from)
            .to_vec();
        let (mut cmd, server_argv) = pinned(Some(load_cpu), &iperf3, &args);
        let log = fs::File::create(tmp.0.join("server.log"))?;
        let server = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let ip = Iperf {
            iperf3,
            proxychains,
            port,
            load_cpu,
            server,
            server_argv,
            tmp,
        };
        // A connection that sends nothing costs the server one line in
        // its log ("unable to receive cookie"); it keeps serving.
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(10);
        // Bounded: 10 s.
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                // Lets the server take the probe off before the first test.
                thread::sleep(Duration::from_millis(200));
                return Ok(ip);
            }
            thread::sleep(Duration::from_millis(50));
        }
        Err(format!("not accepting on {addr}").into())
    }

    /// One iperf3 run of `m` (1 or 8 streams) through `relay` (direct
    /// loopback if none): its argv, its report (iperf3's JSON without the
    /// per-second intervals) and any error.
    pub(super) fn run(
        &self,
        m: Measurement,
        relay: Option<&Relay>,
        duration: f64,
        warmup: f64,
        limit: Duration,
    ) -> (Vec<String>, Option<Value>, Option<String>) {
        let (t, omit) = iperf_times(duration, warmup);
        let mut argv: Vec<String> = Vec::new();
        if let Some(r) = relay {
            let conf = self
                .tmp
                .0
                .join(format!("proxychains-{}.conf", r.kind.name()));
            if let Err(e) = fs::write(&conf, proxychains_config(r.addr)) {
                return (argv, None, Some(format!("{}: {e}", conf.display())));
            }
            argv.extend([
                self.proxychains.display().to_string(),
                "-q".into(),
                "-f".into(),
                conf.display().to_string(),
            ]);
        }
        argv.push(self.iperf3.display().to_string());
        argv.extend(
            [
                "-c",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-t",
                &t.to_string(),
                "-O",
                &omit.to_string(),
                "-J",
            ]
            .map(String::from),
        );
        argv.extend(m.args().into_iter().map(String::from));
        let (cmd, argv) = pinned(Some(self.load_cpu), Path::new(&argv[0]), &argv[1..]);
        let (stdout, stderr, status) = match run_capture(cmd, limit) {
            Ok(x) => x,
            Err(e) => return (argv, None, Some(e)),
        };
        let mut report: Option<Value> = serde_json::from_str(&stdout).ok();
        let error = match (&status, &report) {
            (None, _) => Some(format!("timed out after {:.0} s", limit.as_secs_f64())),
            (_, Some(r)) if r["error"].is_string() => r["error"].as_str().map(String::from),
            (Some(st), _) if !st.success() => Some(
                stderr
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("iperf3 failed")
                    .to_string(),
            ),
            (_, None) => Some("no JSON report from iperf3".into()),
            _ => None,
        };
        if let Some(Value::Object(o)) = report.as_mut() {
            o.remove("intervals");
        }
        (argv, report, error)
    }
}

impl Drop for Iperf {
    fn drop(&mut self) {
        // SAFETY: kill(2) with a PID we spawned; no memory is touched.
        unsafe {
            libc::kill(self.server.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        // Bounded: 5 s, then SIGKILL.
        loop {
            match self.server.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Ok(None) => {
                    let _ = self.server.kill();
                    let _ = self.server.wait();
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxychains_config_proxies_everything_through_the_relay() {
        let c = proxychains_config("127.0.0.1:4321".parse().unwrap());
        assert!(c.ends_with("[ProxyList]\nsocks5 127.0.0.1 4321\n"), "{c}");
        assert!(c.starts_with("strict_chain\n"));
        assert!(!c.contains("localnet"));
    }

    #[test]
    fn whole_seconds_for_iperf3() {
        assert_eq!(iperf_times(5.0, 1.0), (5, 1));
        assert_eq!(iperf_times(2.0, 0.5), (2, 1));
        assert_eq!(iperf_times(0.3, 0.0), (1, 0));
    }

    #[test]
    fn gbps_from_an_iperf3_report() {
        let f = super::super::figures::figure("iperf8_gbps").unwrap();
        let r = json!({"end": {"sum_received": {"bits_per_second": 2.5e10}}});
        let v = super::super::figures::value_at(&r, f).unwrap();
        assert!((v - 25.0).abs() < 1e-9);
        assert_eq!(f.from, Measurement::Iperf8);
        assert_eq!(Measurement::Iperf8.args(), vec!["-P", "8"]);
    }
}
