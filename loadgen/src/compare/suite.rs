//! What each suite runs: its systems (and the peers it leaves out, with
//! why), its measurements (one loadgen client run each, with the options
//! below, or one iperf3 run for the `full` suite's cross-check) and its
//! durations. The UDP workloads' parameters are here too, since the tables'
//! headings quote them.

use super::figures::{Figure, CI_FIGURES, FIGURES, UDP_FIGURES};
use crate::relays::Kind;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suite {
    /// Every system (peers 3proxy and hev from RINGSOCKS_PEER_3PROXY and RINGSOCKS_PEER_HEV), ~5 s
    /// per measurement after 1 s warmup, plus iperf3 through proxychains4 (1 and 8 streams)
    Full,
    /// Short (for CI): ringsocks both paths, direct, microsocks; 2 s after 0.5 s warmup
    Ci,
    /// UDP ASSOCIATE: ringsocks, direct, Dante, 3proxy, hev; 64 and 1400 B datagrams over 1, 8, 2000
    /// associations; 512 B plain (no GSO on either side) over 1 and 8 associations x 32
    Udp,
    /// Short UDP suite (for CI): ringsocks and direct; 64 and 1400 B over 8 associations x 16,
    /// 2 s after 0.5 s warmup
    UdpCi,
}

impl Suite {
    pub fn name(self) -> &'static str {
        match self {
            Suite::Full => "full",
            Suite::Ci => "ci",
            Suite::Udp => "udp",
            Suite::UdpCi => "udp-ci",
        }
    }

    pub(super) fn kinds(self) -> Vec<Kind> {
        match self {
            Suite::Full => Kind::TCP.to_vec(),
            Suite::Udp => Kind::UDP.to_vec(),
            Suite::UdpCi => vec![Kind::Ringsocks, Kind::Direct],
            Suite::Ci => vec![
                Kind::RingsocksAuto,
                Kind::RingsocksSplice,
                Kind::RingsocksCopy,
                Kind::Direct,
                Kind::Microsocks,
            ],
        }
    }

    /// Peers of the other suites this one leaves out, and why (said in its
    /// output and its `skipped` list).
    pub(super) fn left_out(self) -> Vec<(Kind, &'static str)> {
        match self {
            Suite::Udp => Kind::NO_UDP.to_vec(),
            _ => Vec::new(),
        }
    }

    /// (duration, warmup) seconds.
    pub(super) fn times(self) -> (f64, f64) {
        match self {
            Suite::Full => (5.0, 1.0),
            Suite::Ci | Suite::UdpCi => (2.0, 0.5),
            Suite::Udp => (UDP_DURATION, UDP_WARMUP),
        }
    }

    pub fn measurements(self) -> &'static [Measurement] {
        match self {
            Suite::Full => &Measurement::FULL,
            Suite::Ci => &Measurement::TCP,
            Suite::Udp => &Measurement::UDP,
            Suite::UdpCi => &[Measurement::Udp64x8, Measurement::Udp1400x8],
        }
    }

    pub fn figures(self) -> &'static [Figure] {
        match self {
            Suite::Full => &FIGURES,
            Suite::Ci => &FIGURES[..CI_FIGURES],
            Suite::Udp | Suite::UdpCi => &UDP_FIGURES,
        }
    }

    pub fn from_name(s: &str) -> Option<Suite> {
        [Suite::Full, Suite::Ci, Suite::Udp, Suite::UdpCi]
            .into_iter()
            .find(|x| x.name() == s)
    }
}

/// UDP suite: seconds measured and of warmup per run (short: 8 workloads
/// per system and repetition, some with 2000 associations to set up first).
const UDP_DURATION: f64 = 3.0;
const UDP_WARMUP: f64 = 0.5;
/// Datagrams in flight per association, 8-association runs (closed loop).
pub const UDP_WINDOW_8: &str = "16";
/// Datagrams/s over all 2000 associations (open loop): 5 per association
/// per second. Dante on one core sustains it without loss at about half a
/// core; at 20000/s it is near its limit (~100% CPU, RTT p99 in the tens
/// of ms on the 2-core VM).
pub const UDP_RATE_2000: &str = "10000";
/// Plain workloads (`--plain`: client and echo target each send one
/// datagram per sendmsg, no GSO), like DNS, game or VoIP traffic: payload
/// bytes, and datagrams in flight per association.
pub const UDP_PLAIN_SIZE: &str = "512";
pub const UDP_PLAIN_WINDOW: &str = "32";

/// One loadgen run per system and repetition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Measurement {
    Tput1,
    Tput16,
    Bidir,
    Latency,
    Cps,
    Udp64x1,
    Udp64x8,
    Udp64x2000,
    Udp1400x1,
    Udp1400x8,
    Udp1400x2000,
    UdpPlain512x1,
    UdpPlain512x8,
    /// The cross-check: iperf3 (through proxychains4 for a relay), 1 stream.
    Iperf1,
    /// The same with 8 parallel streams (`-P 8`).
    Iperf8,
}

impl Measurement {
    pub const TCP: [Measurement; 5] = [
        Measurement::Tput1,
        Measurement::Tput16,
        Measurement::Bidir,
        Measurement::Latency,
        Measurement::Cps,
    ];

    /// The `full` suite: the TCP measurements, then the iperf3 cross-check.
    pub const FULL: [Measurement; 7] = [
        Measurement::Tput1,
        Measurement::Tput16,
        Measurement::Bidir,
        Measurement::Latency,
        Measurement::Cps,
        Measurement::Iperf1,
        Measurement::Iperf8,
    ];

    pub const UDP: [Measurement; 8] = [
        Measurement::Udp64x1,
        Measurement::Udp64x8,
        Measurement::Udp64x2000,
        Measurement::Udp1400x1,
        Measurement::Udp1400x8,
        Measurement::Udp1400x2000,
        Measurement::UdpPlain512x1,
        Measurement::UdpPlain512x8,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Measurement::Tput1 => "tput1",
            Measurement::Tput16 => "tput16",
            Measurement::Bidir => "bidir",
            Measurement::Latency => "latency",
            Measurement::Cps => "cps",
            Measurement::Udp64x1 => "udp64x1",
            Measurement::Udp64x8 => "udp64x8",
            Measurement::Udp64x2000 => "udp64x2000",
            Measurement::Udp1400x1 => "udp1400x1",
            Measurement::Udp1400x8 => "udp1400x8",
            Measurement::Udp1400x2000 => "udp1400x2000",
            Measurement::UdpPlain512x1 => "udpplain512x1",
            Measurement::UdpPlain512x8 => "udpplain512x8",
            Measurement::Iperf1 => "iperf1",
            Measurement::Iperf8 => "iperf8",
        }
    }

    /// An iperf3 run (`args` are iperf3's options then), not a loadgen one.
    pub fn is_iperf(self) -> bool {
        matches!(self, Measurement::Iperf1 | Measurement::Iperf8)
    }

    /// Column heading of a UDP workload (the name for the others).
    pub fn label(self) -> String {
        let (size, load) = match self {
            Measurement::Udp64x1 => (64, "1 assoc, ping-pong".to_string()),
            Measurement::Udp1400x1 => (1400, "1 assoc, ping-pong".to_string()),
            Measurement::Udp64x8 => (64, format!("8 assocs × {UDP_WINDOW_8} in flight")),
            Measurement::Udp1400x8 => (1400, format!("8 assocs × {UDP_WINDOW_8} in flight")),
            Measurement::Udp64x2000 => (64, format!("2000 assocs at {UDP_RATE_2000}/s")),
            Measurement::Udp1400x2000 => (1400, format!("2000 assocs at {UDP_RATE_2000}/s")),
            Measurement::UdpPlain512x1 => {
                return format!("{UDP_PLAIN_SIZE} B plain, 1 assoc × {UDP_PLAIN_WINDOW} in flight")
            }
            Measurement::UdpPlain512x8 => {
                return format!("{UDP_PLAIN_SIZE} B plain, 8 assocs × {UDP_PLAIN_WINDOW} in flight")
            }
            other => return other.name().to_string(),
        };
        format!("{size} B, {load}")
    }

    pub(super) fn args(self) -> Vec<&'static str> {
        match self {
            Measurement::Tput1 => vec!["tcp-throughput", "--streams", "1"],
            Measurement::Tput16 => vec!["tcp-throughput", "--streams", "16"],
            Measurement::Bidir => vec!["tcp-throughput", "--streams", "1", "--direction", "both"],
            Measurement::Latency => vec!["tcp-latency", "--size", "64", "--connections", "1"],
            Measurement::Cps => vec!["tcp-cps", "--concurrency", "64"],
            Measurement::Udp64x1 => udp_args("64", "1", []),
            Measurement::Udp1400x1 => udp_args("1400", "1", []),
            Measurement::Udp64x8 => udp_args("64", "8", ["--window", UDP_WINDOW_8]),
            Measurement::Udp1400x8 => udp_args("1400", "8", ["--window", UDP_WINDOW_8]),
            Measurement::Udp64x2000 => udp_args("64", "2000", ["--rate", UDP_RATE_2000]),
            Measurement::Udp1400x2000 => udp_args("1400", "2000", ["--rate", UDP_RATE_2000]),
            Measurement::UdpPlain512x1 => udp_args(
                UDP_PLAIN_SIZE,
                "1",
                ["--window", UDP_PLAIN_WINDOW, "--plain"],
            ),
            Measurement::UdpPlain512x8 => udp_args(
                UDP_PLAIN_SIZE,
                "8",
                ["--window", UDP_PLAIN_WINDOW, "--plain"],
            ),
            Measurement::Iperf1 => vec!["-P", "1"],
            Measurement::Iperf8 => vec!["-P", "8"],
        }
    }
}

fn udp_args<const N: usize>(
    size: &'static str,
    assocs: &'static str,
    load: [&'static str; N],
) -> Vec<&'static str> {
    let mut v = vec!["udp", "--size", size, "--assocs", assocs];
    v.extend(load);
    v
}
