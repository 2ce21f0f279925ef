//! The command line, turned into a validated [`Config`], and logging setup.
//!
//! Everything an operator can get wrong is caught here, before any socket or
//! ring exists, with an error that names the flag (and file line) at fault:
//! the rest of the relay can then trust every field. clap handles syntax
//! (unknown flags, `--help`, `--version`, malformed values) and keeps its usual
//! output and exit codes; the checks clap cannot express (credentials, file
//! permissions, cross-field rules) produce [`ConfigError::Invalid`].
//!
//! This file owns the result ([`Config`], [`ForwardMode`] and the defaults)
//! and the error ([`ConfigError`]), and re-exports what the rest of the crate
//! uses, so callers only ever name `crate::config::…`. The work is split by
//! concern:
//! - `cli`: the clap flags and their help text, validated into a `Config`;
//! - `users`: `--user` entries and the `--users` file;
//! - `duration`: [`parse_duration`] and the duration flag parsers;
//! - `logging`: [`init_logging`].

mod cli;
mod duration;
mod file;
mod logging;
#[cfg(test)]
mod test_support;
mod users;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::proto::udp_assoc::ClientCheck;
use crate::proto::Users;
use crate::rules::Rules;

pub use duration::parse_duration;
pub use logging::init_logging;

/// How relayed bytes move between the client and target sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ForwardMode {
    /// splice(2) through a kernel pipe: payload never enters user space.
    Splice,
    /// recv/send through user-space buffers (a provided-buffer ring).
    Copy,
    /// Start each direction on copy (cheapest for small messages) and move it to splice once
    /// it carries bulk data.
    Auto,
}

impl fmt::Display for ForwardMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Must match the clap value names: clap shows this as the default.
        f.write_str(match self {
            ForwardMode::Splice => "splice",
            ForwardMode::Copy => "copy",
            ForwardMode::Auto => "auto",
        })
    }
}

/// The forwarding mode used unless `--forward` says otherwise. The one place
/// to change it if measurements favour the other mode.
/// Measured (docs/ARCHITECTURE.md): `auto` matches splice on bulk throughput and beats it on
/// connection rate and small-message latency.
pub const DEFAULT_FORWARD: ForwardMode = ForwardMode::Auto;

/// Loopback only: an unauthenticated relay reachable from the network would
/// be an open proxy, so exposing it must be a deliberate `--listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:1080";

/// getaddrinfo threads: a quarter of them may serve one parent domain and half one client at
/// once (src/dns.rs), so 16 leaves most of the pool free while one domain never answers.
pub const DEFAULT_RESOLVER_THREADS: usize = 16;

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Addresses to accept clients on; never empty, no duplicates.
    pub listen: Vec<SocketAddr>,
    /// Number of shards (event-loop threads); at least 1.
    pub shards: usize,
    pub forward: ForwardMode,
    /// `None`: no authentication. `Some` is never empty.
    pub users: Option<Arc<Users>>,
    /// Non-zero.
    pub connect_timeout: Duration,
    /// Non-zero.
    pub handshake_timeout: Duration,
    /// `None`: connections may idle forever.
    pub idle_timeout: Option<Duration>,
    /// `None`: what the shards' fixed-file tables hold (`server::default_max_connections`).
    pub max_connections: Option<usize>,
    pub max_connections_per_ip: Option<u32>,
    /// Only with users.
    pub max_connections_per_user: Option<u32>,
    /// TCP keepalive on client connections: idle time before the first probe. `None`: off.
    pub tcp_keepalive: Option<Duration>,
    /// Source addresses and device of sockets toward targets.
    pub outbound: Outbound,
    /// `[::]` listeners accept IPv6 clients only (else IPv4 too, IPv4-mapped).
    pub ipv6_only: bool,
    /// Each shard logs what it holds this often. `None`: off.
    pub stats_interval: Option<Duration>,
    /// May be zero: close everything at once on shutdown.
    pub drain_timeout: Duration,
    /// `None`: shards sleep as soon as no completion is ready (the default).
    pub busy_poll: Option<Duration>,
    pub log_level: tracing::Level,
    /// At least 1.
    pub resolver_threads: usize,
    /// UDP ASSOCIATE: the IP given to clients in BND.ADDR instead of the control connection's
    /// local address (NAT, cloud).
    pub udp_advertise: Option<IpAddr>,
    pub udp_client_check: ClientCheck,
    /// Reassemble RFC 1928 fragments (else drop them).
    pub udp_frag_reassemble: bool,
    /// At least 5 s (RFC 1928 §7).
    pub udp_frag_timeout: Duration,
    pub udp_idle_timeout: Option<Duration>,
    /// BIND: how long to wait for the peer. Non-zero.
    pub bind_timeout: Duration,
    /// BIND: the IP of the first reply instead of the control connection's local IP.
    pub bind_advertise: Option<IpAddr>,
    /// `--proxy-protocol`: a PROXY header precedes each client's greeting.
    pub proxy_protocol: bool,
    /// `--trusted-proxy`: who may send one (non-empty with `proxy_protocol`).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// `--metrics`: where to serve /metrics and /healthz.
    pub metrics: Option<SocketAddr>,
    /// `--access-log`: a path, or "-" for standard output.
    pub access_log: Option<String>,
    pub access_log_format: crate::access_log::Format,
    /// The access rules (`[[rule]]`, `[policy]` in the config file); allow-all without a file.
    pub rules: Arc<Rules>,
    /// `[[upstream]]` SOCKS5 servers that rules (`via`) send requests through.
    pub upstreams: Arc<[Upstream]>,
    /// `--config` (or `--check-config`): the file SIGHUP re-reads.
    pub config_file: Option<PathBuf>,
    /// `--check-config`: validate, report and exit.
    pub check_only: bool,
}

/// An upstream SOCKS5 server (`[[upstream]]` in the config file).
#[derive(Clone, PartialEq, Eq)]
pub struct Upstream {
    pub name: String,
    /// Resolved when the file is read.
    pub addr: SocketAddr,
    /// RFC 1929 user and password for it.
    pub creds: Option<(Vec<u8>, Vec<u8>)>,
    /// `resolve = "local"`: names are resolved here and sent on as addresses (else the
    /// upstream resolves them: remote DNS).
    pub resolve_local: bool,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .field(
                "user",
                &self.creds.as_ref().map(|(u, _)| String::from_utf8_lossy(u)),
            )
            .field("resolve_local", &self.resolve_local)
            .finish()
    }
}

/// RFC 1928 §7: the reassembly timer "MUST be no less than 5 seconds".
pub const MIN_FRAG_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the command line was rejected.
/// `--outbound-bind` and `--outbound-interface`: where sockets toward targets come from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outbound {
    pub v4: Option<std::net::Ipv4Addr>,
    pub v6: Option<std::net::Ipv6Addr>,
    /// SO_BINDTODEVICE.
    pub device: Option<String>,
}

impl Outbound {
    /// The source address for a target of this family, if one is set.
    pub fn source_for(&self, v6: bool) -> Option<IpAddr> {
        if v6 {
            self.v6.map(IpAddr::V6)
        } else {
            self.v4.map(IpAddr::V4)
        }
    }
}

#[derive(Debug)]
pub enum ConfigError {
    /// A usage error, or `--help` / `--version`: print it the way clap does
    /// and exit with clap's code ([`clap::Error::exit`]).
    Clap(clap::Error),
    /// A value clap accepted but validation did not; the message starts with
    /// the flag it concerns. Print as "ringsocks: <message>" and exit 2.
    Invalid(String),
}

impl ConfigError {
    /// Reports the error the conventional way and exits: clap errors (and
    /// help/version output) via clap, with its exit code; the rest as
    /// "ringsocks: <error>" on stderr with exit code 2, like clap's usage errors.
    pub fn exit(self) -> ! {
        match self {
            ConfigError::Clap(e) => e.exit(),
            ConfigError::Invalid(msg) => {
                eprintln!("ringsocks: {msg}");
                std::process::exit(2)
            }
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Clap(e) => write!(f, "{}", e.to_string().trim_end()),
            ConfigError::Invalid(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigError::Clap(e) => Some(e),
            ConfigError::Invalid(_) => None,
        }
    }
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}
