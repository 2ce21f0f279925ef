//! Prometheus metrics: the per-shard counters the relay updates, and the small HTTP server
//! (`--metrics ADDR`, one thread, not a shard) that sums them at each scrape and serves
//! `/metrics` (Prometheus text format 0.0.4, encoded by the `prometheus-client` crate) and
//! `/healthz` (200 while every shard accepts, 503 once draining has begun).
//!
//! Why this shape: a shard must not take a lock or share a cache line on its hot path, so each
//! shard owns one [`ShardMetrics`] (aligned to its own cache lines) and is its only writer.
//! A counter is an `AtomicU64` updated with a relaxed load and store (no read-modify-write
//! instruction: there is one writer), which the scrape thread reads with relaxed loads; a
//! value may be a few increments old, never torn. Gauges that the shard's ring knows (pipes,
//! free buffers) are stored once per loop turn. The scrape adds the shards up, so the totals
//! cost nothing until somebody asks.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tracing::{info, warn};

use crate::dns::Resolver;
use crate::limits::{Limits, Over};

/// A counter with one writer (its shard).
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn add(&self, n: u64) {
        // One writer: a plain load and store, no locked instruction.
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    /// For gauges the shard sets.
    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// How a client connection ended, for `ringsocks_connections_closed_total{outcome}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The request succeeded and the tunnel or association ended normally.
    Relayed,
    /// An error reply with this REP code (1..=8) was sent.
    Rep(u8),
    /// The client went away (or sent nothing) before finishing the handshake.
    HandshakeClosed,
    HandshakeTimeout,
    /// RFC 1929 credentials refused.
    AuthFailed,
    /// No acceptable method, malformed greeting or request, handshake too long.
    HandshakeError,
    /// A PROXY protocol header missing, malformed or from an untrusted address.
    ProxyHeader,
    IdleTimeout,
    /// Closed at accept by `--max-connections` or `--max-connections-per-ip`.
    Limit,
    /// A socket error ended an established tunnel.
    IoError,
    /// Closed when the drain timeout ran out at shutdown.
    Shutdown,
}

const OUTCOMES: usize = 18;

impl Outcome {
    fn index(self) -> usize {
        match self {
            Outcome::Relayed => 0,
            Outcome::Rep(r) => usize::from(r.clamp(1, 8)),
            Outcome::HandshakeClosed => 9,
            Outcome::HandshakeTimeout => 10,
            Outcome::AuthFailed => 11,
            Outcome::HandshakeError => 12,
            Outcome::ProxyHeader => 13,
            Outcome::IdleTimeout => 14,
            Outcome::Limit => 15,
            Outcome::IoError => 16,
            Outcome::Shutdown => 17,
        }
    }

    fn label(i: usize) -> &'static str {
        [
            "relayed",
            "rep_0x01_general_failure",
            "rep_0x02_not_allowed",
            "rep_0x03_network_unreachable",
            "rep_0x04_host_unreachable",
            "rep_0x05_connection_refused",
            "rep_0x06_ttl_expired",
            "rep_0x07_command_not_supported",
            "rep_0x08_address_type_not_supported",
            "handshake_closed",
            "handshake_timeout",
            "auth_failed",
            "handshake_error",
            "proxy_header",
            "idle_timeout",
            "limit",
            "io_error",
            "shutdown",
        ][i]
    }
}

/// The forwarding path bytes took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    Copy = 0,
    Splice = 1,
}

/// Why a datagram was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drop_ {
    Foreign = 0,
    Refused = 1,
    Malformed = 2,
    Fragment = 3,
    Other = 4,
}

const DROP_LABELS: [&str; 5] = [
    "foreign_source",
    "refused_by_rule",
    "bad_header",
    "fragment",
    "other",
];

/// A histogram with fixed buckets (seconds), one writer.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [Counter; BOUNDS.len()],
    count: Counter,
    sum_ns: Counter,
}

/// Bucket upper bounds in seconds: 50 µs to 10 s.
const BOUNDS: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = BOUNDS.iter().position(|&b| s <= b) {
            self.buckets[i].inc();
        }
        self.count.inc();
        self.sum_ns.add(d.as_nanos() as u64);
    }
}

/// One shard's metrics. Only that shard writes them.
#[repr(align(128))]
#[derive(Default, Debug)]
pub struct ShardMetrics {
    /// The shard has armed its accepts and is not draining.
    pub accepting: AtomicBool,
    pub accepted: Counter,
    closed: [Counter; OUTCOMES],
    /// [direction: 0 client->target, 1 target->client][path]
    bytes: [[Counter; 2]; 2],
    pub assoc_opened: Counter,
    pub assoc_closed: Counter,
    /// [0 client->target, 1 target->client]
    pub datagrams: [Counter; 2],
    dropped: [Counter; 5],
    pub handshake: Histogram,
    pub dns: Histogram,
    pub connect: Histogram,
    pub pipes_open: Counter,
    pub pipes_idle: Counter,
    pub copy_buffers_free: Counter,
    /// Receives that found no buffer in the ring (copy path and UDP).
    pub buffer_exhausted: Counter,
    pub copy_to_splice: Counter,
    pub rules_refused: Counter,
    /// BIND peers closed because DST.ADDR named another host.
    pub bind_peers_refused: Counter,
}

impl ShardMetrics {
    #[inline]
    pub fn closed(&self, o: Outcome) {
        self.closed[o.index()].inc();
    }

    /// `up`: client -> target.
    #[inline]
    pub fn bytes(&self, up: bool, path: Path, n: u64) {
        self.bytes[usize::from(!up)][path as usize].add(n);
    }

    #[inline]
    pub fn dropped(&self, why: Drop_, n: u64) {
        if n > 0 {
            self.dropped[why as usize].add(n);
        }
    }
}

/// Everything a scrape reads.
pub struct Metrics {
    pub shards: Vec<Arc<ShardMetrics>>,
    pub resolver: Arc<Resolver>,
    pub limits: Arc<Limits>,
    /// Set when shutdown (drain) begins.
    pub stop: Arc<AtomicBool>,
    /// Access-log lines dropped because the writer fell behind.
    pub access_dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("shards", &self.shards.len())
            .finish()
    }
}

impl Metrics {
    fn sum(&self, f: impl Fn(&ShardMetrics) -> u64) -> u64 {
        self.shards.iter().map(|s| f(s)).sum()
    }

    /// 200 while every shard accepts and no drain has begun.
    pub fn healthy(&self) -> bool {
        !self.stop.load(Ordering::Acquire)
            && self
                .shards
                .iter()
                .all(|s| s.accepting.load(Ordering::Acquire))
    }
}

fn counter(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    v: i64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

/// A counter family with one label.
fn labelled(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    label: &'static str,
    values: impl Iterator<Item = (&'static str, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, n) in values {
        let labels = [(label, value)];
        ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn histogram(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    shards: &[Arc<ShardMetrics>],
    h: impl Fn(&ShardMetrics) -> &Histogram,
) -> Result<(), std::fmt::Error> {
    // Per-bucket counts: the encoder makes them cumulative.
    let mut buckets = Vec::with_capacity(BOUNDS.len() + 1);
    let mut bounded = 0;
    for (i, &b) in BOUNDS.iter().enumerate() {
        let n = shards.iter().map(|s| h(s).buckets[i].get()).sum::<u64>();
        bounded += n;
        buckets.push((b, n));
    }
    let count: u64 = shards.iter().map(|s| h(s).count.get()).sum();
    buckets.push((f64::INFINITY, count.saturating_sub(bounded)));
    let sum = shards.iter().map(|s| h(s).sum_ns.get()).sum::<u64>() as f64 / 1e9;
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)
}

impl Collector for Metrics {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let e = &mut enc;
        let accepted = self.sum(|s| s.accepted.get());
        let closed: Vec<u64> = (0..OUTCOMES)
            .map(|i| self.sum(|s| s.closed[i].get()))
            .collect();
        let closed_total: u64 = closed.iter().sum();
        counter(
            e,
            "ringsocks_connections_accepted",
            "Client connections accepted.",
            accepted,
        )?;
        gauge(
            e,
            "ringsocks_connections_active",
            "Client connections open now (accepted and not yet closed).",
            accepted.saturating_sub(closed_total) as i64,
        )?;
        labelled(
            e,
            "ringsocks_connections_closed",
            "Client connections closed, by how they ended (REP code sent, handshake failure, timeout, limit).",
            "outcome",
            closed
                .iter()
                .enumerate()
                .map(|(i, &n)| (Outcome::label(i), n)),
        )?;
        {
            let mut m = e.encode_descriptor(
                "ringsocks_bytes",
                "Payload bytes relayed, by direction and forwarding path (counted when sent).",
                None,
                MetricType::Counter,
            )?;
            for (d, dir) in ["client_to_target", "target_to_client"].iter().enumerate() {
                for (p, path) in ["copy", "splice"].iter().enumerate() {
                    let n = self.sum(|s| s.bytes[d][p].get());
                    let labels = [("direction", *dir), ("path", *path)];
                    ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        let opened = self.sum(|s| s.assoc_opened.get());
        let ended = self.sum(|s| s.assoc_closed.get());
        gauge(
            e,
            "ringsocks_udp_associations_active",
            "UDP associations open now.",
            opened.saturating_sub(ended) as i64,
        )?;
        counter(
            e,
            "ringsocks_udp_associations",
            "UDP associations opened.",
            opened,
        )?;
        labelled(
            e,
            "ringsocks_udp_datagrams",
            "Datagrams relayed, by direction.",
            "direction",
            [("client_to_target", 0usize), ("target_to_client", 1)]
                .into_iter()
                .map(|(l, i)| (l, self.sum(|s| s.datagrams[i].get()))),
        )?;
        labelled(
            e,
            "ringsocks_udp_datagrams_dropped",
            "Datagrams dropped, by reason.",
            "reason",
            DROP_LABELS
                .iter()
                .enumerate()
                .map(|(i, l)| (*l, self.sum(|s| s.dropped[i].get()))),
        )?;
        histogram(
            e,
            "ringsocks_handshake_seconds",
            "Accept to a complete SOCKS request.",
            &self.shards,
            |s| &s.handshake,
        )?;
        histogram(
            e,
            "ringsocks_dns_seconds",
            "Name resolution time of lookups not answered from the cache.",
            &self.shards,
            |s| &s.dns,
        )?;
        histogram(
            e,
            "ringsocks_connect_seconds",
            "Time to connect to a target (per address tried).",
            &self.shards,
            |s| &s.connect,
        )?;
        gauge(
            e,
            "ringsocks_pipes_open",
            "Splice-path pipes open (lent and idle).",
            self.sum(|s| s.pipes_open.get()) as i64,
        )?;
        gauge(
            e,
            "ringsocks_pipes_idle",
            "Splice-path pipes idle in the pools.",
            self.sum(|s| s.pipes_idle.get()) as i64,
        )?;
        gauge(
            e,
            "ringsocks_copy_buffers_free",
            "Copy-path buffers not held by a connection.",
            self.sum(|s| s.copy_buffers_free.get()) as i64,
        )?;
        counter(
            e,
            "ringsocks_buffer_ring_exhausted",
            "Receives that found no free buffer in a provided buffer ring.",
            self.sum(|s| s.buffer_exhausted.get()),
        )?;
        counter(
            e,
            "ringsocks_copy_to_splice_switches",
            "Directions moved from the copy path to splice.",
            self.sum(|s| s.copy_to_splice.get()),
        )?;
        counter(
            e,
            "ringsocks_requests_refused_by_rules",
            "Requests (CONNECT, UDP ASSOCIATE) refused by an access rule or the policy.",
            self.sum(|s| s.rules_refused.get()),
        )?;
        counter(
            e,
            "ringsocks_bind_peers_refused",
            "BIND peers closed because the request's DST.ADDR named another host.",
            self.sum(|s| s.bind_peers_refused.get()),
        )?;
        gauge(
            e,
            "ringsocks_resolver_queue_depth",
            "Name lookups waiting for a resolver thread.",
            self.resolver.queue_depth() as i64,
        )?;
        labelled(
            e,
            "ringsocks_connections_refused_by_limit",
            "Connections refused by a connection limit.",
            "limit",
            [Over::Total, Over::PerIp, Over::PerUser]
                .into_iter()
                .map(|o| (o.flag().trim_start_matches("--"), self.limits.refused(o))),
        )?;
        counter(
            e,
            "ringsocks_access_log_dropped",
            "Access-log lines dropped because the writer fell behind.",
            self.access_dropped.load(Ordering::Relaxed),
        )?;
        gauge(
            e,
            "ringsocks_healthy",
            "1 while every shard accepts and no drain has begun (what /healthz answers).",
            i64::from(self.healthy()),
        )?;
        let info = prometheus_client::metrics::info::Info::new([
            ("version", env!("CARGO_PKG_VERSION")),
            ("revision", env!("RINGSOCKS_REVISION")),
        ]);
        info.encode(e.encode_descriptor(
            "ringsocks_build",
            "Version and source revision of this binary.",
            None,
            info.metric_type(),
        )?)?;
        Ok(())
    }
}

/// Binds `addr` and serves `/metrics` and `/healthz` from one thread until the process exits.
pub fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    let mut registry = Registry::default();
    registry.register_collector(Box::new(metrics.clone()));
    std::thread::Builder::new()
        .name("ringsocks-metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(s) = conn else { continue };
                if let Err(e) = answer(s, &registry, &metrics) {
                    warn!(error = %e, "metrics request failed");
                }
            }
        })?;
    info!(addr = %bound, "metrics on /metrics, health on /healthz");
    Ok(bound)
}

/// One HTTP/1.x request: read its request line and headers, answer, close.
fn answer(s: TcpStream, registry: &Registry, metrics: &Metrics) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut header = String::new();
    for _ in 0..100 {
        header.clear();
        if r.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let mut body = String::new();
            prometheus_client::encoding::prometheus_text::encode(&mut body, registry)
                .map_err(|_| std::io::Error::other("encoding metrics"))?;
            ("200 OK", "text/plain; version=0.0.4; charset=utf-8", body)
        }
        ("GET" | "HEAD", "/healthz") if metrics.healthy() => {
            ("200 OK", "text/plain", "ok\n".into())
        }
        ("GET" | "HEAD", "/healthz") => {
            ("503 Service Unavailable", "text/plain", "draining\n".into())
        }
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain", "not found\n".into()),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
    };
    let mut s = r.into_inner();
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    if method != "HEAD" {
        s.write_all(body.as_bytes())?;
    }
    s.flush()
}
