//! What every client mode shares: connection options, the SOCKS5 dialer,
//! latency summaries, progress lines and the JSON report.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use ringsocks::proto::client::{ClientHandshake, ClientStep};
use ringsocks::proto::{Addr, Command, Reply};
use serde_json::{json, Value};

use crate::sys;

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, Error>;

/// How to reach the target, and where results go.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnArgs {
    /// SOCKS5 server to measure (loopback only)
    #[arg(long, value_name = "HOST:PORT", required_unless_present = "direct")]
    pub proxy: Option<String>,
    /// No proxy: the same traffic straight to the target (the loopback limit)
    #[arg(long, conflicts_with = "proxy")]
    pub direct: bool,
    /// RFC 1929 username
    #[arg(long, requires = "pass")]
    pub user: Option<String>,
    /// RFC 1929 password
    #[arg(long, requires = "user")]
    pub pass: Option<String>,
    /// Send greeting, auth and CONNECT in one write (the server must support it)
    #[arg(long)]
    pub pipeline: bool,
    /// External target instead of the in-process one (loopback only)
    #[arg(long, value_name = "HOST:PORT")]
    pub target: Option<String>,
    /// Relay process whose CPU (and for `idle`, memory and fds) to report
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Write the JSON report to FILE (`-` for stdout; the summary then goes to stderr)
    #[arg(long, value_name = "FILE")]
    pub json: Option<String>,
    /// No progress lines
    #[arg(long, short)]
    pub quiet: bool,
    /// Pin loadgen (all its threads) to this CPU (same as `taskset -c CPU`)
    #[arg(long, value_name = "CPU")]
    pub cpu: Option<usize>,
}

/// Measured interval.
#[derive(clap::Args, Debug, Clone)]
pub struct TimeArgs {
    /// Seconds measured
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Seconds of traffic before measuring
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
}

impl TimeArgs {
    pub fn check(&self) -> Result<(Duration, Duration)> {
        if !(self.duration > 0.0 && self.duration <= 86_400.0) {
            return Err("--duration must be in (0, 86400]".into());
        }
        if !(0.0..=3_600.0).contains(&self.warmup) {
            return Err("--warmup must be in [0, 3600]".into());
        }
        Ok((
            Duration::from_secs_f64(self.warmup),
            Duration::from_secs_f64(self.duration),
        ))
    }
}

/// Resolves HOST:PORT and insists on a loopback address: loadgen is for
/// measuring on one machine, never for sending load elsewhere.
pub fn loopback_addr(s: &str) -> Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = s
        .to_socket_addrs()
        .map_err(|e| format!("{s}: {e}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.ip().is_loopback())
        .copied()
        .ok_or_else(|| format!("{s}: only loopback addresses are allowed").into())
}

impl ConnArgs {
    /// Validates the options, pins the process if asked, and builds the dialer.
    pub fn setup(&self) -> Result<Dialer> {
        if let Some(cpu) = self.cpu {
            if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
                return Err(format!("--cpu {cpu}: cannot pin").into());
            }
        }
        crate::cpu::CpuMeter::check(&self.pids)?;
        let proxy = match &self.proxy {
            Some(p) => Some(loopback_addr(p)?),
            None => None,
        };
        let creds = match (&self.user, &self.pass) {
            (Some(u), Some(p)) => {
                if u.is_empty() || u.len() > 255 || p.is_empty() || p.len() > 255 {
                    return Err("--user/--pass must be 1..=255 bytes".into());
                }
                Some((u.as_bytes().to_vec(), p.as_bytes().to_vec()))
            }
            _ => None,
        };
        Ok(Dialer {
            proxy,
            creds,
            pipeline: self.pipeline,
            timeout: Duration::from_secs(5),
        })
    }

    pub fn target_addr(&self) -> Result<Option<SocketAddr>> {
        self.target.as_deref().map(loopback_addr).transpose()
    }

    /// The `target` object of the report.
    pub fn target_json(&self, dialer: &Dialer) -> Value {
        json!({
            "proxy": dialer.proxy.map(|p| p.to_string()),
            "direct": dialer.proxy.is_none(),
            "auth": dialer.creds.is_some(),
            "pipeline": dialer.pipeline,
            "external_target": self.target,
        })
    }
}

/// Opens tunnels to a destination, through the SOCKS5 proxy or directly.
#[derive(Clone, Debug)]
pub struct Dialer {
    pub proxy: Option<SocketAddr>,
    pub creds: Option<(Vec<u8>, Vec<u8>)>,
    pub pipeline: bool,
    /// For connect and each handshake read.
    pub timeout: Duration,
}

impl Dialer {
    /// Connects to `dst` (through the proxy if any) and returns the stream
    /// ready for tunnel data, plus any tunnel bytes that arrived together
    /// with the proxy's reply. The stream's read timeout is left at
    /// `self.timeout`.
    pub fn dial(&self, dst: SocketAddr, nodelay: bool) -> io::Result<(TcpStream, Vec<u8>)> {
        let Some(proxy) = self.proxy else {
            let s = TcpStream::connect_timeout(&dst, self.timeout)?;
            s.set_nodelay(nodelay)?;
            s.set_read_timeout(Some(self.timeout))?;
            return Ok((s, Vec::new()));
        };
        let (s, _, leftover) = self.socks(proxy, Command::CONNECT, Addr::Ip(dst))?;
        s.set_nodelay(nodelay)?;
        Ok((s, leftover))
    }

    /// UDP ASSOCIATE for a client UDP socket bound at `client` (sent as
    /// DST.ADDR:DST.PORT). Returns the control connection, which must stay
    /// open as long as the association is used, and the relay's UDP
    /// address (BND.ADDR:BND.PORT; an unspecified BND.ADDR means the
    /// proxy's own address). The relay must be on loopback too.
    pub fn associate(&self, client: SocketAddr) -> io::Result<(TcpStream, SocketAddr)> {
        let proxy = self
            .proxy
            .ok_or_else(|| io::Error::other("UDP ASSOCIATE needs a proxy"))?;
        let (s, reply, leftover) = self.socks(proxy, Command::UDP_ASSOCIATE, Addr::Ip(client))?;
        if !leftover.is_empty() {
            return Err(io::Error::other(
                "proxy sent data after the UDP ASSOCIATE reply",
            ));
        }
        let bnd = relay_udp_addr(proxy, &reply.bnd).map_err(io::Error::other)?;
        Ok((s, bnd))
    }

    /// Greeting, auth and request `cmd dst` on a new connection to `proxy`;
    /// returns the stream, the success reply and any bytes that came after it.
    fn socks(
        &self,
        proxy: SocketAddr,
        cmd: Command,
        dst: Addr,
    ) -> io::Result<(TcpStream, Reply, Vec<u8>)> {
        let mut s = TcpStream::connect_timeout(&proxy, self.timeout)?;
        // The handshake is small writes that must not wait for Nagle.
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(self.timeout))?;
        let mut hs = ClientHandshake::new(dst, cmd, self.creds.clone()).pipelined(self.pipeline);
        let mut out = Vec::with_capacity(128);
        hs.start(&mut out);
        s.write_all(&out)?;
        let mut buf = [0u8; 1024];
        // Every handshake message is < 300 bytes and each read brings at
        // least one: a handful of rounds at most.
        for _ in 0..64 {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "proxy closed the connection during the handshake",
                ));
            }
            out.clear();
            let step = hs
                .advance(&buf[..n], &mut out)
                .map_err(|e| io::Error::other(format!("socks: {e}")))?;
            if !out.is_empty() {
                s.write_all(&out)?;
            }
            if let ClientStep::Done { reply, consumed } = step {
                return Ok((s, reply, buf[consumed..n].to_vec()));
            }
        }
        Err(io::Error::other("socks: handshake did not finish"))
    }
}

/// Where to send datagrams of a UDP association: BND.ADDR:BND.PORT of the
/// reply, with an unspecified address (0.0.0.0, ::) standing for the
/// proxy's. Only loopback relays are accepted, like everything else.
pub fn relay_udp_addr(proxy: SocketAddr, bnd: &Addr) -> std::result::Result<SocketAddr, String> {
    let Addr::Ip(mut a) = bnd.clone() else {
        return Err(format!(
            "UDP ASSOCIATE reply names a domain ({bnd}), not an address"
        ));
    };
    if a.ip().is_unspecified() {
        a.set_ip(proxy.ip());
    }
    if a.port() == 0 {
        return Err("UDP ASSOCIATE reply has BND.PORT 0".into());
    }
    if !a.ip().is_loopback() {
        return Err(format!("UDP relay {a} is not on loopback"));
    }
    Ok(a)
}

/// Latency histogram in nanoseconds (1 ns .. 100 s, 3 significant digits).
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid histogram bounds")
}

pub fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record(d.as_nanos().min(u64::MAX as u128) as u64);
}

/// Percentiles of a nanosecond histogram, in microseconds.
pub fn latency_json(h: &Histogram<u64>) -> Value {
    let us = |ns: u64| ns as f64 / 1000.0;
    if h.is_empty() {
        return json!({"count": 0});
    }
    json!({
        "count": h.len(),
        "min_us": us(h.min()),
        "mean_us": h.mean() / 1000.0,
        "p50_us": us(h.value_at_quantile(0.50)),
        "p90_us": us(h.value_at_quantile(0.90)),
        "p99_us": us(h.value_at_quantile(0.99)),
        "p999_us": us(h.value_at_quantile(0.999)),
        "max_us": us(h.max()),
    })
}

/// One summary line of latency percentiles.
pub fn latency_line(name: &str, h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return format!("{name}: no samples");
    }
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    format!(
        "{name} (µs): p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  (n={})",
        us(0.5),
        us(0.9),
        us(0.99),
        us(0.999),
        h.max() as f64 / 1000.0,
        h.len()
    )
}

/// Prints a line on stderr once a second while a run longer than ~3 s goes on.
pub struct Progress {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Progress {
    /// `line(elapsed_s)` makes the text; it is called once a second.
    pub fn start<F>(enabled: bool, total: Duration, mut line: F) -> Progress
    where
        F: FnMut(f64) -> String + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let handle = (enabled && total > Duration::from_secs(3)).then(|| {
            let stop = stop.clone();
            thread::spawn(move || {
                let t0 = Instant::now();
                let mut next = 1u64;
                // Bounded by `stop`, and by the run's length as a backstop.
                while !stop.load(Ordering::Relaxed)
                    && t0.elapsed() < total.saturating_mul(2).saturating_add(LONGEST_WAIT)
                {
                    thread::sleep(Duration::from_millis(50));
                    let el = t0.elapsed().as_secs_f64();
                    if el >= next as f64 {
                        next += 1;
                        eprintln!("[{el:5.1}s] {}", line(el));
                    }
                }
            })
        });
        Progress { stop, handle }
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

const LONGEST_WAIT: Duration = Duration::from_secs(60);

/// Sleeps until `t` (no-op if it passed).
pub fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        thread::sleep(t - now);
    }
}

/// A finished run: written as JSON and as a readable summary.
pub struct Report {
    pub mode: &'static str,
    pub target: Value,
    pub params: Value,
    pub results: Value,
    pub relay_cpu: Value,
    pub summary: String,
}

impl Report {
    pub fn to_json(&self) -> Value {
        json!({
            "mode": self.mode,
            "system": sys::system_json(),
            "command": std::env::args().collect::<Vec<_>>(),
            "target": self.target,
            "params": self.params,
            "results": self.results,
            "relay_cpu": self.relay_cpu,
        })
    }

    /// Prints the summary (stdout, or stderr when the JSON goes to stdout)
    /// and writes the JSON if asked.
    pub fn emit(&self, json_dest: Option<&str>) -> Result<()> {
        let mut text = format!("== loadgen {} ==\n", self.mode);
        text += &self.summary;
        if !text.ends_with('\n') {
            text.push('\n');
        }
        let doc = serde_json::to_string_pretty(&self.to_json())? + "\n";
        match json_dest {
            Some("-") => {
                eprint!("{text}");
                io::stdout().write_all(doc.as_bytes())?;
            }
            Some(path) => {
                print!("{text}");
                std::fs::write(path, doc).map_err(|e| format!("--json {path}: {e}"))?;
            }
            None => print!("{text}"),
        }
        Ok(())
    }
}

/// `target` line of a summary.
pub fn via_line(d: &Dialer) -> String {
    let mut s = String::new();
    match d.proxy {
        Some(p) => {
            let _ = write!(s, "via SOCKS5 {p}");
            if d.creds.is_some() {
                s += " (user/pass)";
            }
            if d.pipeline {
                s += " (pipelined)";
            }
        }
        None => s += "direct (no proxy)",
    }
    s
}

/// Keeps the first error seen (with how many there were).
#[derive(Default, Debug, Clone)]
pub struct Failures {
    pub count: u64,
    pub first: Option<String>,
}

impl Failures {
    pub fn add(&mut self, e: impl std::fmt::Display) {
        self.count += 1;
        if self.first.is_none() {
            self.first = Some(e.to_string());
        }
    }

    pub fn merge(&mut self, o: Failures) {
        self.count += o.count;
        if self.first.is_none() {
            self.first = o.first;
        }
    }

    pub fn json(&self) -> Value {
        json!({"count": self.count, "first_error": self.first})
    }

    /// The summary line for failures, or nothing when there were none.
    pub fn summary_line(&self) -> String {
        if self.count == 0 {
            return String::new();
        }
        format!(
            "FAILURES: {} ({})\n",
            self.count,
            self.first.as_deref().unwrap_or("")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_in_microseconds() {
        let mut h = new_histogram();
        for us in 1..=1000u64 {
            record(&mut h, Duration::from_micros(us));
        }
        let j = latency_json(&h);
        assert_eq!(j["count"], 1000);
        let p50 = j["p50_us"].as_f64().unwrap();
        let p99 = j["p99_us"].as_f64().unwrap();
        let p999 = j["p999_us"].as_f64().unwrap();
        assert!((p50 - 500.0).abs() < 1.0, "{p50}");
        assert!((p99 - 990.0).abs() < 1.5, "{p99}");
        assert!((p999 - 999.0).abs() < 1.5, "{p999}");
        assert!((j["max_us"].as_f64().unwrap() - 1000.0).abs() < 1.0);
        assert_eq!(latency_json(&new_histogram())["count"], 0);
        assert!(latency_line("rtt", &h).contains("p50 500"));
    }

    #[test]
    fn report_shape() {
        let r = Report {
            mode: "tcp-latency",
            target: json!({"proxy": null, "direct": true}),
            params: json!({"size": 64}),
            results: json!({"msgs_per_sec": 1.0}),
            relay_cpu: Value::Null,
            summary: String::new(),
        };
        let j = r.to_json();
        for key in [
            "mode",
            "system",
            "command",
            "target",
            "params",
            "results",
            "relay_cpu",
        ] {
            assert!(j.get(key).is_some(), "{key}");
        }
        for key in ["kernel", "cpu", "cores", "profile", "git"] {
            assert!(j["system"].get(key).is_some(), "{key}");
        }
        assert!(j["command"].is_array());
    }

    #[test]
    fn relay_udp_address_from_the_reply() {
        let proxy: SocketAddr = "127.0.0.1:1080".parse().unwrap();
        let bnd = |s: &str| Addr::Ip(s.parse().unwrap());
        assert_eq!(
            relay_udp_addr(proxy, &bnd("127.0.0.2:5000")),
            Ok("127.0.0.2:5000".parse().unwrap())
        );
        assert_eq!(
            relay_udp_addr(proxy, &bnd("0.0.0.0:5000")),
            Ok("127.0.0.1:5000".parse().unwrap())
        );
        assert!(relay_udp_addr(proxy, &bnd("127.0.0.1:0")).is_err());
        assert!(relay_udp_addr(proxy, &bnd("10.0.0.1:5000")).is_err());
        assert!(relay_udp_addr(proxy, &Addr::domain(b"relay", 5000).unwrap()).is_err());
    }

    #[test]
    fn only_loopback() {
        assert!(loopback_addr("127.0.0.1:1080").is_ok());
        assert!(loopback_addr("[::1]:1080").is_ok());
        assert!(loopback_addr("10.1.2.3:1080").is_err());
    }
}
