//! The command line: the clap definition of every flag (with its help text)
//! and its validation into a [`Config`].
//!
//! clap handles syntax (unknown flags, `--help`, `--version`, malformed
//! values) and keeps its usual output and exit codes; the checks clap cannot
//! express (bounds, cross-field rules) produce [`ConfigError::Invalid`]
//! naming the flag at fault.
//!
//! The flag help doubles as the README's flags table, so it is written for
//! operators coming from Dante or 3proxy.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use std::ffi::OsString;

use clap::error::{ContextKind, ContextValue};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};

use super::duration::{off_if_zero, parse_duration, parse_idle_timeout, parse_positive_duration};
use super::users::load_users;
use super::{
    invalid, Config, ConfigError, ForwardMode, Outbound, DEFAULT_FORWARD, DEFAULT_LISTEN,
    DEFAULT_RESOLVER_THREADS, MIN_FRAG_TIMEOUT,
};
use crate::proto::udp_assoc::ClientCheck;
use crate::rules::Rules;

/// Far above any core count we run on; catches typos that would otherwise
/// try to start a million rings.
const MAX_SHARDS: usize = 1024;

/// getaddrinfo threads are only blocked waiting on DNS; more than this is a
/// typo, not a tuning choice.
const MAX_RESOLVER_THREADS: usize = 256;

/// `--udp-client-check` values (mirrors [`ClientCheck`], whose docs give the rules).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum UdpClientCheck {
    /// The endpoint named in the request if plausible, else the first sender from the peer IP
    Strict,
    /// Any port on the control connection's peer IP
    PeerIp,
    /// The first sender from the peer IP, whatever the request said
    First,
    /// Any source (clients behind a NAT that changes their IP)
    Off,
}

impl From<UdpClientCheck> for ClientCheck {
    fn from(c: UdpClientCheck) -> ClientCheck {
        match c {
            UdpClientCheck::Strict => ClientCheck::Strict,
            UdpClientCheck::PeerIp => ClientCheck::PeerIp,
            UdpClientCheck::First => ClientCheck::First,
            UdpClientCheck::Off => ClientCheck::Off,
        }
    }
}

/// `--udp-frag` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum UdpFrag {
    /// Reassemble fragmented datagrams (RFC 1928 section 7)
    Reassemble,
    /// Drop every datagram with FRAG != 0, as the RFC allows
    Drop,
}

/// `--log-level` values; clap needs a `ValueEnum`, which `tracing::Level` is not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        })
    }
}

impl From<LogLevel> for tracing::Level {
    fn from(l: LogLevel) -> Self {
        match l {
            LogLevel::Error => tracing::Level::ERROR,
            LogLevel::Warn => tracing::Level::WARN,
            LogLevel::Info => tracing::Level::INFO,
            LogLevel::Debug => tracing::Level::DEBUG,
            LogLevel::Trace => tracing::Level::TRACE,
        }
    }
}

const ABOUT: &str = "High-performance SOCKS5 relay on thread-per-core io_uring shards";

const LONG_ABOUT: &str = "\
High-performance SOCKS5 relay (RFC 1928) on thread-per-core io_uring shards.

Each shard is one thread with its own io_uring; a connection is served
start to finish by the shard that accepted it.

Without --user or --users, clients are not authenticated: anyone who can
reach a --listen address can use the relay. With them, clients must log
in with RFC 1929 username/password.

Durations are written 500ms, 10s, 2m or 1h; a bare number means seconds
(3, 0.5).";

// Help paragraphs are wrapped by hand (`verbatim_doc_comment`): clap only
// wraps with its `wrap_help` feature, which we do not enable.
#[derive(Parser, Debug)]
#[command(name = "ringsocks", version, about = ABOUT, long_about = LONG_ABOUT)]
struct Args {
    /// Read settings and access rules from FILE (TOML)
    ///
    /// Every flag has a key of the same name with '_' for '-'
    /// (connect_timeout = "10s", listen = ["0.0.0.0:1080"]); flags on the
    /// command line override the file. [[rule]] and [policy] tables hold
    /// the access rules. SIGHUP re-reads the file (and the users file).
    #[arg(long, value_name = "FILE", verbatim_doc_comment)]
    config: Option<PathBuf>,

    /// Check FILE (and the rest of the command line) and exit: 0 when valid
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    check_config: Option<PathBuf>,

    /// Address to accept SOCKS5 clients on; repeat for several
    ///
    /// IPv4, or IPv6 in brackets, with a port: 0.0.0.0:1080, [::]:1080,
    /// [::1]:1080. Like Dante's "internal:" or 3proxy's "socks -i -p".
    /// Anything but loopback without --user/--users is an open proxy.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_LISTEN, verbatim_doc_comment)]
    listen: Vec<SocketAddr>,

    /// Number of shards (event-loop threads) [default: number of online CPUs]
    #[arg(long, value_name = "N")]
    shards: Option<usize>,

    /// How payload is moved between client and target
    #[arg(long, value_name = "MODE", default_value_t = DEFAULT_FORWARD)]
    forward: ForwardMode,

    /// Allow user NAME with password PASS (RFC 1929); repeat for several
    ///
    /// Split at the first ':', so passwords may contain ':'. Names and
    /// passwords are 1 to 255 bytes. The command line is visible to other
    /// local users (ps, /proc), so prefer --users-file outside of testing.
    /// Combines with --users-file; a name may only be defined once.
    #[arg(long = "user", value_name = "NAME:PASS", verbatim_doc_comment)]
    user: Vec<String>,

    /// Read users from FILE: one NAME:PASS per line
    ///
    /// Blank lines and lines starting with '#' are skipped; other lines
    /// are taken verbatim (no trimming). The file must not be accessible
    /// by group or others (chmod 600), and a name may only be defined
    /// once. Plays the role of 3proxy's "users" list or Dante's
    /// "socksmethod: username", but with its own password file.
    #[arg(
        long,
        visible_alias = "users",
        value_name = "FILE",
        verbatim_doc_comment
    )]
    users_file: Option<PathBuf>,

    /// Give up connecting to a target after DURATION
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_positive_duration)]
    connect_timeout: Duration,

    /// Drop clients that have not finished the SOCKS5 handshake within DURATION
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_positive_duration)]
    handshake_timeout: Duration,

    /// Close relayed connections idle in both directions for DURATION
    ///
    /// "off" or 0 disables the timeout.
    #[arg(long, value_name = "DURATION", default_value = "off", value_parser = parse_idle_timeout, verbatim_doc_comment)]
    idle_timeout: Duration,

    /// Accept at most N client connections at once, over all shards
    ///
    /// Past it, new connections are closed at accept (logged at most once
    /// a second with a count). Default: what the shards' io_uring
    /// fixed-file tables hold at three sockets a connection (21,845 per
    /// shard); sockets there take no file descriptors, so the default
    /// holds on a host whose descriptor limit is far lower.
    #[arg(long, value_name = "N", verbatim_doc_comment)]
    max_connections: Option<usize>,

    /// Accept at most N connections at once from one client address
    ///
    /// Past it, the client's new connections are closed at accept. Off by
    /// default.
    #[arg(long, value_name = "N", verbatim_doc_comment)]
    max_connections_per_ip: Option<u32>,

    /// Serve at most N connections at once per user (with --user/--users)
    ///
    /// Past it, the user's request is answered REP 0x02 (not allowed by
    /// ruleset). Off by default.
    #[arg(long, value_name = "N", verbatim_doc_comment)]
    max_connections_per_user: Option<u32>,

    /// Send TCP keepalive probes on client connections idle for DURATION
    ///
    /// A client that vanished without a FIN or RST (power loss, a NAT that
    /// forgot the flow) is then found and closed after DURATION plus three
    /// unanswered probes DURATION/3 apart. "off" (the default) leaves the
    /// kernel's default (no probes); --idle-timeout closes idle tunnels
    /// whatever the network says.
    #[arg(long, value_name = "DURATION", default_value = "off", value_parser = parse_idle_timeout, verbatim_doc_comment)]
    tcp_keepalive: Duration,

    /// Source address of connections and UDP sockets toward targets
    ///
    /// Give one IPv4 and/or one IPv6 address; a TCP target uses the one of
    /// its family (none: the kernel picks). A UDP association's target
    /// socket uses the IPv4 one if given (then only IPv4 targets), else
    /// the IPv6 one.
    #[arg(long, value_name = "IP", verbatim_doc_comment)]
    outbound_bind: Vec<IpAddr>,

    /// Bind sockets toward targets to network device NAME (SO_BINDTODEVICE)
    #[arg(long, value_name = "NAME")]
    outbound_interface: Option<String>,

    /// Make a [::] listener accept IPv6 clients only
    ///
    /// By default `--listen [::]:PORT` accepts IPv4 clients too (as
    /// IPv4-mapped addresses, shown and matched as IPv4), unless an IPv4
    /// address with the same port is listed as well.
    #[arg(long, verbatim_doc_comment)]
    ipv6_only: bool,

    /// Log a line per shard every DURATION with what it holds
    ///
    /// Connections, ops in flight, fixed-file slots in use, pipes open
    /// and idle, copy and UDP buffers held, names being resolved: what
    /// scripts/soak.sh watches for leaks. "off" (the default) disables it.
    #[arg(long, value_name = "DURATION", default_value = "off", value_parser = parse_idle_timeout, verbatim_doc_comment)]
    stats_interval: Duration,

    /// On shutdown, let open connections finish for up to DURATION
    ///
    /// Connections still open after DURATION are closed; 0 closes them
    /// immediately.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration, verbatim_doc_comment)]
    drain_timeout: Duration,

    /// Keep polling the ring for DURATION after the last completion before sleeping
    ///
    /// Trades CPU for latency: a shard that never sleeps is never woken
    /// from idle, which removes most of a small message's round-trip time
    /// through the relay. Each shard burns up to a whole core while its
    /// connections are active within DURATION of each other. "off" or 0
    /// (the default) disables it.
    #[arg(long, value_name = "DURATION", default_value = "off", value_parser = parse_idle_timeout, verbatim_doc_comment)]
    busy_poll: Duration,

    /// Log verbosity (to stderr); RUST_LOG, when set, overrides it
    #[arg(long, value_name = "LEVEL", default_value_t = LogLevel::Info, ignore_case = true)]
    log_level: LogLevel,

    /// Threads running getaddrinfo for target names, shared by all shards
    ///
    /// A lookup occupies a thread for as long as DNS takes, so this bounds
    /// how many slow lookups can be in flight at once. Names under one
    /// parent domain get at most a quarter of the threads, one client at
    /// most half, so a domain that never answers cannot hold them all.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_RESOLVER_THREADS, verbatim_doc_comment)]
    resolver_threads: usize,

    /// Expect a PROXY protocol header (v1 or v2) before each client's greeting
    ///
    /// For instances behind an L4 load balancer (HAProxy send-proxy-v2,
    /// an NLB with proxy protocol): the header's source address becomes
    /// the client's for rules, limits, logs, metrics and the UDP client
    /// check. Accepted only from --trusted-proxy addresses; any other
    /// peer, and a missing or malformed header, is closed.
    #[arg(long, requires = "trusted_proxy", verbatim_doc_comment)]
    proxy_protocol: bool,

    /// With --proxy-protocol: a balancer's address or CIDR; repeat for several
    #[arg(long, value_name = "CIDR", requires = "proxy_protocol")]
    trusted_proxy: Vec<String>,

    /// Serve Prometheus metrics on ADDR (/metrics) and a health check (/healthz)
    ///
    /// /healthz answers 200 while every shard accepts and 503 once a
    /// drain (SIGTERM) has begun: a readiness probe for load balancers.
    /// Off by default; bind it to loopback or a management network.
    #[arg(long, value_name = "ADDR", verbatim_doc_comment)]
    metrics: Option<SocketAddr>,

    /// Write one line per finished tunnel, association or refused request
    ///
    /// To PATH (appended; SIGUSR1 reopens it, for logrotate), or "-" for
    /// standard output. A shard never waits for it: when the writer falls
    /// behind, lines are dropped and counted.
    #[arg(long, value_name = "PATH", verbatim_doc_comment)]
    access_log: Option<String>,

    /// Access-log line format
    #[arg(long, value_name = "FORMAT", default_value = "text")]
    access_log_format: crate::access_log::Format,

    /// BIND: give up when no peer has connected within DURATION (REP 0x06)
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = parse_positive_duration)]
    bind_timeout: Duration,

    /// BIND: give clients IP in the first reply instead of the control
    /// connection's local address (NAT, clouds)
    #[arg(long, value_name = "IP", verbatim_doc_comment)]
    bind_advertise: Option<IpAddr>,

    /// UDP ASSOCIATE: give clients IP in BND.ADDR
    ///
    /// By default the reply carries the local address of the client's
    /// control connection, which is reachable by construction. Set this
    /// behind NAT or in clouds where clients must use another address
    /// (Dante's "external" address for UDP).
    #[arg(long, value_name = "IP", verbatim_doc_comment)]
    udp_advertise: Option<IpAddr>,

    /// UDP ASSOCIATE: which sources count as the client
    ///
    /// strict: the DST.ADDR:DST.PORT of the request if it is plausible
    /// (the control connection's IP, or 0.0.0.0/::, with a port);
    /// otherwise the first datagram from the control connection's IP
    /// fixes the endpoint. peer-ip: any port on that IP. first: the first
    /// sender from that IP. off: anyone. Other datagrams are dropped and
    /// counted.
    #[arg(
        long,
        value_name = "MODE",
        default_value = "strict",
        verbatim_doc_comment
    )]
    udp_client_check: UdpClientCheck,

    /// UDP ASSOCIATE: reassemble fragmented datagrams, or drop them
    #[arg(long, value_name = "MODE", default_value = "reassemble")]
    udp_frag: UdpFrag,

    /// UDP ASSOCIATE: discard an incomplete fragment sequence after DURATION
    ///
    /// At least 5s (RFC 1928 section 7).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration, verbatim_doc_comment)]
    udp_frag_timeout: Duration,

    /// UDP ASSOCIATE: end an association with no datagram either way for DURATION
    ///
    /// Ending it closes the control connection. "off" or 0 disables it.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_idle_timeout, verbatim_doc_comment)]
    udp_idle_timeout: Duration,
}

impl Config {
    /// Parses `std::env::args`.
    pub fn from_args() -> Result<Config, ConfigError> {
        Self::try_parse_from(std::env::args_os())
    }

    /// Parses `args` (the first item is the program name).
    pub fn try_parse_from<I, T>(args: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let argv: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let cmd = Args::command();
        let matches = cmd
            .clone()
            .try_get_matches_from(&argv)
            .map_err(ConfigError::Clap)?;
        let check_only = matches.contains_id("check_config");
        let path = matches
            .get_one::<PathBuf>("check_config")
            .or_else(|| matches.get_one::<PathBuf>("config"))
            .cloned();
        let Some(path) = path else {
            let args = Args::from_arg_matches(&matches).map_err(ConfigError::Clap)?;
            return Self::validate(args);
        };
        let file = super::file::read(&path, &cmd).map_err(ConfigError::Invalid)?;
        // The file's flags first, then the command line's; a flag the command line gives
        // replaces the file's (lists too), so it is left out of the file's words.
        let from_file: Vec<&super::file::Item> = file
            .items
            .iter()
            .filter(|i| matches.value_source(&i.id) != Some(ValueSource::CommandLine))
            .collect();
        let mut merged = vec![argv.first().cloned().unwrap_or_else(|| "ringsocks".into())];
        merged.extend(from_file.iter().flat_map(|i| i.words.iter().cloned()));
        merged.extend(argv.iter().skip(1).cloned());
        // An error about a flag the file set names the file, line and key instead.
        let blame = |flag: &str, msg: &str| -> ConfigError {
            match from_file.iter().find(|i| i.long == flag) {
                Some(i) => invalid(format!("{}:{}: {}: {msg}", path.display(), i.line, i.key)),
                None => invalid(msg.to_string()),
            }
        };
        let args = Args::try_parse_from(&merged).map_err(|e| {
            let flag = match e.get(ContextKind::InvalidArg) {
                Some(ContextValue::String(s)) => s.split(' ').next().unwrap_or("").to_string(),
                _ => String::new(),
            };
            if from_file.iter().any(|i| i.long == flag) {
                let text = e.to_string();
                let first = text
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim_start_matches("error: ");
                blame(&flag, first)
            } else {
                ConfigError::Clap(e)
            }
        })?;
        let mut cfg = Self::validate(args).map_err(|e| match e {
            ConfigError::Invalid(msg) => {
                let flag = msg.split([' ', ':']).next().unwrap_or("");
                blame(flag, &msg)
            }
            e => e,
        })?;
        cfg.rules = Arc::new(Rules::new(file.rules, file.policy));
        cfg.upstreams = file.upstreams.into();
        cfg.config_file = Some(path);
        cfg.check_only = check_only;
        Ok(cfg)
    }

    fn validate(args: Args) -> Result<Config, ConfigError> {
        let mut listen: Vec<SocketAddr> = Vec::with_capacity(args.listen.len());
        for addr in args.listen {
            // A duplicate either fails to bind much later, far from the
            // flag that caused it, or (with SO_REUSEPORT) silently doubles
            // the listeners.
            if listen.contains(&addr) {
                return Err(invalid(format!("--listen {addr}: given more than once")));
            }
            listen.push(addr);
        }

        let shards = match args.shards {
            Some(n) => count("--shards", n, MAX_SHARDS)?,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let resolver_threads = count(
            "--resolver-threads",
            args.resolver_threads,
            MAX_RESOLVER_THREADS,
        )?;

        let users = load_users(&args.user, args.users_file.as_deref())?.map(Arc::new);

        for (flag, n) in [
            ("--max-connections", args.max_connections.map(|n| n as u64)),
            (
                "--max-connections-per-ip",
                args.max_connections_per_ip.map(u64::from),
            ),
            (
                "--max-connections-per-user",
                args.max_connections_per_user.map(u64::from),
            ),
        ] {
            if n == Some(0) {
                return Err(invalid(format!("{flag}: must be at least 1")));
            }
        }
        let mut outbound = Outbound {
            device: args.outbound_interface.clone(),
            ..Outbound::default()
        };
        for ip in &args.outbound_bind {
            let taken = match ip {
                IpAddr::V4(v4) => outbound.v4.replace(*v4).is_some(),
                IpAddr::V6(v6) => outbound.v6.replace(*v6).is_some(),
            };
            if taken {
                return Err(invalid(format!(
                    "--outbound-bind {ip}: at most one address per family"
                )));
            }
            if ip.is_unspecified() || ip.is_multicast() {
                return Err(invalid(format!(
                    "--outbound-bind {ip}: not a source address"
                )));
            }
        }
        if outbound
            .device
            .as_deref()
            .is_some_and(|d| d.is_empty() || d.len() >= 16 || d.contains('/'))
        {
            return Err(invalid(format!(
                "--outbound-interface {:?}: not an interface name",
                outbound.device.as_deref().unwrap_or("")
            )));
        }
        let trusted_proxies = args
            .trusted_proxy
            .iter()
            .map(|s| {
                crate::rules::parse_net(s).map_err(|e| invalid(format!("--trusted-proxy: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if args.max_connections_per_user.is_some() && users.is_none() {
            return Err(invalid(
                "--max-connections-per-user: needs users (--user or --users)".to_string(),
            ));
        }

        if args.udp_frag_timeout < MIN_FRAG_TIMEOUT {
            return Err(invalid(format!(
                "--udp-frag-timeout: at least 5s (RFC 1928 section 7), got {:?}",
                args.udp_frag_timeout
            )));
        }
        if args
            .udp_advertise
            .is_some_and(|ip| ip.is_unspecified() || ip.is_multicast())
        {
            return Err(invalid(format!(
                "--udp-advertise {}: must be an address clients can send to",
                args.udp_advertise.expect("checked")
            )));
        }

        Ok(Config {
            listen,
            shards,
            forward: args.forward,
            users,
            connect_timeout: args.connect_timeout,
            handshake_timeout: args.handshake_timeout,
            idle_timeout: off_if_zero(args.idle_timeout),
            max_connections: args.max_connections,
            max_connections_per_ip: args.max_connections_per_ip,
            max_connections_per_user: args.max_connections_per_user,
            tcp_keepalive: off_if_zero(args.tcp_keepalive),
            stats_interval: off_if_zero(args.stats_interval),
            ipv6_only: args.ipv6_only,
            outbound,
            drain_timeout: args.drain_timeout,
            busy_poll: off_if_zero(args.busy_poll),
            log_level: args.log_level.into(),
            resolver_threads,
            udp_advertise: args.udp_advertise,
            udp_client_check: args.udp_client_check.into(),
            udp_frag_reassemble: args.udp_frag == UdpFrag::Reassemble,
            udp_frag_timeout: args.udp_frag_timeout,
            udp_idle_timeout: off_if_zero(args.udp_idle_timeout),
            bind_timeout: args.bind_timeout,
            bind_advertise: args.bind_advertise,
            proxy_protocol: args.proxy_protocol,
            trusted_proxies,
            metrics: args.metrics,
            access_log: args.access_log,
            access_log_format: args.access_log_format,
            rules: Arc::new(Rules::allow_all()),
            upstreams: Arc::from(Vec::new()),
            config_file: None,
            check_only: false,
        })
    }
}

/// A thread-count flag's value: at least 1 and at most `max`.
fn count(flag: &str, n: usize, max: usize) -> Result<usize, ConfigError> {
    if n == 0 {
        return Err(invalid(format!("{flag}: must be at least 1")));
    }
    if n > max {
        return Err(invalid(format!("{flag}: at most {max}, got {n}")));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{parse, parse_err, TempFile};

    #[test]
    fn clap_definition_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen, vec!["127.0.0.1:1080".parse().unwrap()]);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(c.shards, cpus);
        assert_eq!(c.forward, DEFAULT_FORWARD);
        assert!(c.users.is_none());
        assert_eq!(c.connect_timeout, Duration::from_secs(10));
        assert_eq!(c.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.idle_timeout, None);
        assert_eq!(c.drain_timeout, Duration::from_secs(10));
        assert_eq!(c.busy_poll, None);
        assert_eq!(c.log_level, tracing::Level::INFO);
        assert_eq!(c.resolver_threads, 16);
        assert_eq!(c.udp_advertise, None);
        assert_eq!(c.udp_client_check, ClientCheck::Strict);
        assert!(c.udp_frag_reassemble);
        assert_eq!(c.udp_frag_timeout, Duration::from_secs(5));
        assert_eq!(c.udp_idle_timeout, Some(Duration::from_secs(300)));
    }

    #[test]
    fn udp_flags() {
        let c = parse(&[
            "--udp-advertise",
            "203.0.113.7",
            "--udp-client-check",
            "peer-ip",
            "--udp-frag",
            "drop",
            "--udp-frag-timeout",
            "7s",
            "--udp-idle-timeout",
            "off",
        ])
        .unwrap();
        assert_eq!(c.udp_advertise, Some("203.0.113.7".parse().unwrap()));
        assert_eq!(c.udp_client_check, ClientCheck::PeerIp);
        assert!(!c.udp_frag_reassemble);
        assert_eq!(c.udp_frag_timeout, Duration::from_secs(7));
        assert_eq!(c.udp_idle_timeout, None);
        for (mode, want) in [
            ("strict", ClientCheck::Strict),
            ("first", ClientCheck::First),
            ("off", ClientCheck::Off),
        ] {
            let c = parse(&["--udp-client-check", mode]).unwrap();
            assert_eq!(c.udp_client_check, want);
        }
        assert!(parse_err(&["--udp-frag-timeout", "4s"]).contains("--udp-frag-timeout"));
        assert!(parse_err(&["--udp-advertise", "0.0.0.0"]).contains("--udp-advertise"));
        assert!(matches!(
            parse(&["--udp-client-check", "loose"]),
            Err(ConfigError::Clap(_))
        ));
    }

    #[test]
    fn limit_flags_and_the_default_connection_limit() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.max_connections, None);
        assert_eq!(c.tcp_keepalive, None);
        let c = parse(&[
            "--max-connections",
            "100",
            "--max-connections-per-ip",
            "10",
            "--user",
            "a:b",
            "--max-connections-per-user",
            "2",
            "--tcp-keepalive",
            "1m",
        ])
        .unwrap();
        assert_eq!(c.max_connections, Some(100));
        assert_eq!(c.max_connections_per_ip, Some(10));
        assert_eq!(c.max_connections_per_user, Some(2));
        assert_eq!(c.tcp_keepalive, Some(Duration::from_secs(60)));
        assert!(parse_err(&["--max-connections-per-ip", "0"]).contains("--max-connections-per-ip"));
        assert!(parse_err(&["--max-connections-per-user", "1"]).contains("needs users"));
    }

    #[test]
    fn every_flag() {
        let file = TempFile::new("carol:c4rol\n", 0o600);
        let c = parse(&[
            "--listen",
            "0.0.0.0:1081",
            "--listen",
            "[::1]:1082",
            "--shards",
            "3",
            "--forward",
            "copy",
            "--user",
            "alice:secret:with:colons",
            "--user=bob:pw",
            "--users",
            file.path(),
            "--connect-timeout",
            "500ms",
            "--handshake-timeout",
            "2m",
            "--idle-timeout",
            "0.5",
            "--drain-timeout",
            "0",
            "--log-level",
            "DEBUG",
            "--resolver-threads",
            "8",
        ])
        .unwrap();
        assert_eq!(
            c.listen,
            vec![
                "0.0.0.0:1081".parse::<SocketAddr>().unwrap(),
                "[::1]:1082".parse().unwrap()
            ]
        );
        assert_eq!(c.shards, 3);
        assert_eq!(c.forward, ForwardMode::Copy);
        let users = c.users.unwrap();
        assert_eq!(users.len(), 3);
        assert!(users.verify(b"alice", b"secret:with:colons"));
        assert!(users.verify(b"bob", b"pw"));
        assert!(users.verify(b"carol", b"c4rol"));
        assert_eq!(c.connect_timeout, Duration::from_millis(500));
        assert_eq!(c.handshake_timeout, Duration::from_secs(120));
        assert_eq!(c.idle_timeout, Some(Duration::from_millis(500)));
        assert_eq!(c.drain_timeout, Duration::ZERO);
        assert_eq!(c.log_level, tracing::Level::DEBUG);
        assert_eq!(c.resolver_threads, 8);
    }

    #[test]
    fn forward_and_log_level_values() {
        assert_eq!(
            parse(&["--forward", "splice"]).unwrap().forward,
            ForwardMode::Splice
        );
        assert!(matches!(
            parse(&["--forward", "sendfile"]),
            Err(ConfigError::Clap(_))
        ));
        for (s, l) in [
            ("error", tracing::Level::ERROR),
            ("warn", tracing::Level::WARN),
            ("info", tracing::Level::INFO),
            ("debug", tracing::Level::DEBUG),
            ("trace", tracing::Level::TRACE),
        ] {
            assert_eq!(parse(&["--log-level", s]).unwrap().log_level, l);
        }
        assert!(parse_err(&["--log-level", "verbose"]).contains("--log-level"));
    }

    #[test]
    fn listen_errors() {
        assert!(parse_err(&["--listen", "localhost:1080"]).contains("--listen"));
        assert!(parse_err(&["--listen", "::1:1080"]).contains("--listen"));
        assert_eq!(
            parse_err(&["--listen", "[::1]:1080", "--listen", "[::1]:1080"]),
            "--listen [::1]:1080: given more than once"
        );
    }

    #[test]
    fn shards_and_resolver_threads_bounds() {
        assert_eq!(
            parse_err(&["--shards", "0"]),
            "--shards: must be at least 1"
        );
        assert!(parse_err(&["--shards", "100000"]).starts_with("--shards: at most"));
        assert!(parse_err(&["--shards=-1"]).contains("--shards"));
        assert_eq!(
            parse_err(&["--resolver-threads", "0"]),
            "--resolver-threads: must be at least 1"
        );
        assert!(parse_err(&["--resolver-threads", "5000"]).starts_with("--resolver-threads"));
    }

    #[test]
    fn bad_durations_on_the_command_line() {
        for flag in [
            "--connect-timeout",
            "--handshake-timeout",
            "--idle-timeout",
            "--drain-timeout",
        ] {
            let e = parse(&[flag, "10x"]).unwrap_err();
            assert!(matches!(e, ConfigError::Clap(_)));
            let msg = e.to_string();
            assert!(msg.contains(flag) && msg.contains("unknown unit"), "{msg}");
        }
        assert!(parse_err(&["--connect-timeout", "0"]).contains("must be greater than 0"));
        assert!(parse_err(&["--handshake-timeout", "0ms"]).contains("must be greater than 0"));
    }

    #[test]
    fn idle_timeout_off() {
        for off in ["off", "OFF", "0", "0s"] {
            assert_eq!(parse(&["--idle-timeout", off]).unwrap().idle_timeout, None);
        }
        assert_eq!(
            parse(&["--idle-timeout", "5m"]).unwrap().idle_timeout,
            Some(Duration::from_secs(300))
        );
    }

    #[test]
    fn clap_errors_pass_through() {
        for (args, kind) in [
            (&["--help"][..], clap::error::ErrorKind::DisplayHelp),
            (&["--version"][..], clap::error::ErrorKind::DisplayVersion),
            (&["--bogus"][..], clap::error::ErrorKind::UnknownArgument),
        ] {
            match parse(args) {
                Err(ConfigError::Clap(e)) => assert_eq!(e.kind(), kind, "{args:?}"),
                other => panic!("{args:?}: {other:?}"),
            }
        }
    }

    /// Parses `--config FILE` with `text` in the file, plus `args`.
    fn with_file(text: &str, args: &[&str]) -> (Result<Config, ConfigError>, TempFile) {
        let file = TempFile::new(text, 0o600);
        let mut argv = vec!["--config", file.path()];
        argv.extend_from_slice(args);
        (parse(&argv), file)
    }

    #[test]
    fn config_file_keys_are_the_flags_and_the_command_line_wins() {
        let users = TempFile::new("carol:c4rol\n", 0o600);
        let text = format!(
            "listen = [\"127.0.0.1:1081\", \"[::1]:1082\"]\nshards = 3\nforward = \"copy\"\n\
             connect_timeout = \"500ms\"\nidle_timeout = 2\nipv6_only = true\n\
             users_file = \"{}\"\nuser = [\"alice:pw\"]\nmax_connections_per_user = 4\n\
             outbound_bind = [\"127.0.0.1\"]\nudp_frag = \"drop\"\n",
            users.path()
        );
        let (c, _f) = with_file(&text, &[]);
        let c = c.unwrap();
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.shards, 3);
        assert_eq!(c.forward, ForwardMode::Copy);
        assert_eq!(c.connect_timeout, Duration::from_millis(500));
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(2)));
        assert!(c.ipv6_only);
        assert_eq!(c.users.as_ref().unwrap().len(), 2);
        assert_eq!(c.max_connections_per_user, Some(4));
        assert_eq!(c.outbound.v4, Some("127.0.0.1".parse().unwrap()));
        assert!(!c.udp_frag_reassemble);
        assert!(c.config_file.is_some() && c.rules.is_empty());

        // The command line replaces a key, lists included.
        let (c, _f) = with_file(&text, &["--shards", "1", "--listen", "127.0.0.1:9"]);
        let c = c.unwrap();
        assert_eq!(c.shards, 1);
        assert_eq!(c.listen, vec!["127.0.0.1:9".parse::<SocketAddr>().unwrap()]);
        assert_eq!(
            c.forward,
            ForwardMode::Copy,
            "the rest still comes from the file"
        );
        let (c, _f) = with_file("ipv6_only = false\n", &[]);
        assert!(!c.unwrap().ipv6_only);
    }

    #[test]
    fn config_file_rules_and_policy() {
        let text = "[[rule]]\naction = \"deny\"\nto = [\"10.0.0.0/8\", \"*.example.com\"]\n\
                    ports = [22, \"8000-8999\"]\n\n[[rule]]\naction = \"allow\"\n\
                    from = \"192.0.2.0/24\"\nusers = [\"alice\"]\ncommands = [\"connect\", \"udp\"]\n\n\
                    [policy]\ndefault = \"allow\"\ndeny_private_targets = true\n";
        let (c, _f) = with_file(text, &[]);
        let c = c.unwrap();
        assert_eq!(c.rules.len(), 2);
        assert!(!c.rules.is_open());
    }

    /// Every error names the file, the line and the key.
    #[test]
    fn config_file_errors_name_the_key_and_the_line() {
        let cases: &[(&str, &str)] = &[
            ("shards = 2\nbogus = 1\n", ":2: bogus: unknown key"),
            (
                "\n\nconnect_timeout = \"10x\"\n",
                ":3: connect_timeout: invalid value '10x'",
            ),
            ("idle_timeout = \"forever\"\n", ":1: idle_timeout:"),
            ("shards = \"four\"\n", ":1: shards: invalid value 'four'"),
            ("shards = 0\n", ":1: shards: --shards: must be at least 1"),
            (
                "shards = [1, 2]\n",
                ":1: shards: takes one value, not a list",
            ),
            (
                "ipv6_only = \"yes\"\n",
                ":1: ipv6_only: expected true or false",
            ),
            (
                "forward = true\n",
                ":1: forward: expected a string or a number",
            ),
            (
                "listen = [\"1.2.3.4:1\", \"nowhere\"]\n",
                ":1: listen: invalid value 'nowhere'",
            ),
            (
                "udp_frag_timeout = \"1s\"\n",
                ":1: udp_frag_timeout: --udp-frag-timeout: at least 5s",
            ),
            (
                "config = \"x.toml\"\n",
                ":1: config: not allowed in a config file",
            ),
            ("shards = 1\nshards = 2\n", ":2: duplicate key"),
            ("listen = [\n", ":1: unclosed array"),
            (
                "[[rule]]\naction = \"deny\"\nto = [\"10.0.0.0/33\"]\n",
                ":3: rule 1: to:",
            ),
            (
                "[[rule]]\naction = \"deny\"\nfrom = [\"10.1.2.3/8\"]\n",
                ":3: rule 1: from:",
            ),
            (
                "[[rule]]\naction = \"deny\"\n\n[[rule]]\naction = \"deny\"\nports = [\"9-2\"]\n",
                ":6: rule 2: ports:",
            ),
            (
                "[[rule]]\naction = \"deny\"\nports = [70000]\n",
                ":3: rule 1: ports: port 70000",
            ),
            (
                "[[rule]]\naction = \"deny\"\nports = [\"1-x\"]\n",
                ":3: rule 1: ports:",
            ),
            (
                "[[rule]]\naction = \"deny\"\ncommands = [\"ping\"]\n",
                ":3: rule 1: commands: \"ping\"",
            ),
            (
                "[[rule]]\naction = \"maybe\"\n",
                ":2: rule 1: action: expected \"allow\" or \"deny\"",
            ),
            (
                "[[rule]]\nto = [\"a.example\"]\n",
                ":1: rule 1: needs action",
            ),
            (
                "[[rule]]\naction = \"deny\"\nto = []\n",
                ":3: rule 1: to: empty list",
            ),
            (
                "[[rule]]\naction = \"deny\"\nvia = \"up\"\n",
                ":3: rule 1: via: \"up\": no [[upstream]]",
            ),
            (
                "[policy]\ndefault = \"block\"\n",
                ":2: policy.default: expected",
            ),
            (
                "[policy]\nstrict = true\n",
                ":2: policy.strict: unknown key",
            ),
        ];
        for (text, want) in cases {
            let (r, f) = with_file(text, &[]);
            let err = match r {
                Ok(c) => panic!("{text:?} accepted: {c:?}"),
                Err(e) => e.to_string(),
            };
            assert!(
                err.starts_with(f.path()) && err.contains(want),
                "{text:?}: got {err:?}, want {want:?}"
            );
        }
        // A command-line error stays a command-line error.
        let (r, _f) = with_file("shards = 2\n", &["--shards", "x"]);
        assert!(matches!(r, Err(ConfigError::Clap(_))));
        let e = parse_err(&["--config", "/nonexistent/ringsocks.toml"]);
        assert!(e.contains("/nonexistent/ringsocks.toml"), "{e}");
    }

    #[test]
    fn upstreams_and_via() {
        let text = "[[rule]]\naction = \"allow\"\nto = [\"*.far.example\"]\nvia = \"hop2\"\n\n\
                    [[upstream]]\nname = \"hop1\"\naddress = \"127.0.0.1:1081\"\n\n\
                    [[upstream]]\nname = \"hop2\"\naddress = \"127.0.0.2:1082\"\n\
                    user = \"u\"\npassword = \"p\"\nresolve = \"local\"\n";
        let (c, _f) = with_file(text, &[]);
        let c = c.unwrap();
        assert_eq!(c.upstreams.len(), 2);
        let u = &c.upstreams[1];
        assert_eq!(
            (u.name.as_str(), u.addr),
            ("hop2", "127.0.0.2:1082".parse().unwrap())
        );
        assert_eq!(u.creds, Some((b"u".to_vec(), b"p".to_vec())));
        assert!(u.resolve_local);
        assert!(
            !format!("{u:?}").contains("\"p\""),
            "Debug hides the password"
        );
        let cases: &[(&str, &str)] = &[
            ("[[rule]]\naction = \"allow\"\nvia = \"nowhere\"\n", ":3: rule 1: via: \"nowhere\": no [[upstream]]"),
            ("[[upstream]]\nname = \"a\"\naddress = \"127.0.0.1\"\n", ":3: upstream 1: address:"),
            ("[[upstream]]\naddress = \"127.0.0.1:1\"\n", ":1: upstream 1: needs a name"),
            ("[[upstream]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\nuser = \"u\"\n", "user and password go together"),
            ("[[upstream]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\nresolve = \"dns\"\n", ":4: upstream 1: resolve:"),
            ("[[upstream]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\nport = 3\n", ":4: upstream 1: port: unknown key"),
            ("[[upstream]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n[[upstream]]\nname = \"a\"\naddress = \"127.0.0.1:2\"\n", "defined more than once"),
            ("[[upstream]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n[[rule]]\naction = \"deny\"\nvia = \"a\"\n", "via is for allow rules"),
        ];
        for (text, want) in cases {
            let (r, _f) = with_file(text, &[]);
            let err = r.map(|_| ()).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: got {err:?}, want {want:?}");
        }
    }

    #[test]
    fn check_config_sets_check_only() {
        let f = TempFile::new("shards = 1\n", 0o600);
        let c = parse(&["--check-config", f.path()]).unwrap();
        assert!(c.check_only);
        assert_eq!(c.shards, 1);
        assert!(matches!(
            parse(&["--check-config", f.path(), "--config", f.path()]),
            Err(ConfigError::Clap(_))
        ));
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../../examples/ringsocks.toml");
        let users = TempFile::new("alice:pw\n", 0o600);
        let (c, _f) = with_file(text, &["--users-file", users.path()]);
        let c = c.unwrap_or_else(|e| panic!("examples/ringsocks.toml: {e}"));
        assert_eq!(c.rules.len(), 4);
        assert_eq!(c.listen, vec!["[::]:1080".parse::<SocketAddr>().unwrap()]);
        let readme = include_str!("../../README.md");
        assert!(
            readme.contains(&format!("```toml\n{text}```")),
            "README.md shows examples/ringsocks.toml as it is"
        );
    }

    #[test]
    fn debug_does_not_leak_passwords() {
        let c = parse(&["--user", "alice:hunter2"]).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
