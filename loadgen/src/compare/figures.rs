//! The figures of the tables: which measurement each comes from, where in
//! that run's JSON report it is read (and scaled), its unit, and whether
//! higher or lower is better. `check` and the chart use them too.

use serde_json::Value;

use super::suite::{Measurement, Suite};

/// The figures of the suite a document (or baseline) names.
pub fn figures_of(suite: &str) -> &'static [Figure] {
    Suite::from_name(suite).map_or(&FIGURES, |s| s.figures())
}

/// Higher or lower is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

impl Better {
    pub fn name(self) -> &'static str {
        match self {
            Better::Higher => "higher",
            Better::Lower => "lower",
        }
    }
}

/// A figure of the tables: which run it comes from and where in its report.
pub struct Figure {
    pub key: &'static str,
    pub label: &'static str,
    pub unit: &'static str,
    pub better: Better,
    pub from: Measurement,
    /// JSON pointer into the report, and a scale.
    pub pointer: &'static str,
    pub scale: f64,
}

/// The figures of the TCP suites: loadgen's (both), then the iperf3
/// cross-check's (`full` only; `ci` has the first `CI_FIGURES`).
pub const FIGURES: [Figure; 11] = [
    Figure {
        key: "tput1_gbps",
        label: "1 stream",
        unit: "Gbit/s",
        better: Better::Higher,
        from: Measurement::Tput1,
        pointer: "/results/total_gbps",
        scale: 1.0,
    },
    Figure {
        key: "tput16_gbps",
        label: "16 streams",
        unit: "Gbit/s",
        better: Better::Higher,
        from: Measurement::Tput16,
        pointer: "/results/total_gbps",
        scale: 1.0,
    },
    Figure {
        key: "bidir_gbps",
        label: "bidir 1+1",
        unit: "Gbit/s",
        better: Better::Higher,
        from: Measurement::Bidir,
        pointer: "/results/total_gbps",
        scale: 1.0,
    },
    Figure {
        key: "rtt_p50_us",
        label: "RTT p50",
        unit: "µs",
        better: Better::Lower,
        from: Measurement::Latency,
        pointer: "/results/rtt/p50_us",
        scale: 1.0,
    },
    Figure {
        key: "rtt_p90_us",
        label: "RTT p90",
        unit: "µs",
        better: Better::Lower,
        from: Measurement::Latency,
        pointer: "/results/rtt/p90_us",
        scale: 1.0,
    },
    Figure {
        key: "rtt_p99_us",
        label: "RTT p99",
        unit: "µs",
        better: Better::Lower,
        from: Measurement::Latency,
        pointer: "/results/rtt/p99_us",
        scale: 1.0,
    },
    Figure {
        key: "cps",
        label: "conn/s",
        unit: "1/s",
        better: Better::Higher,
        from: Measurement::Cps,
        pointer: "/results/conns_per_sec",
        scale: 1.0,
    },
    Figure {
        key: "cpu_s_per_gb",
        label: "relay CPU/GB",
        unit: "CPU-s/GB",
        better: Better::Lower,
        from: Measurement::Tput1,
        pointer: "/relay_cpu/per_gb",
        scale: 1.0,
    },
    Figure {
        key: "cpu_us_per_conn",
        label: "relay CPU/conn",
        unit: "CPU-µs",
        better: Better::Lower,
        from: Measurement::Cps,
        pointer: "/relay_cpu/per_conn",
        scale: 1e6,
    },
    Figure {
        key: "iperf1_gbps",
        label: "iperf3 1 stream",
        unit: "Gbit/s",
        better: Better::Higher,
        from: Measurement::Iperf1,
        pointer: "/end/sum_received/bits_per_second",
        scale: 1e-9,
    },
    Figure {
        key: "iperf8_gbps",
        label: "iperf3 8 streams",
        unit: "Gbit/s",
        better: Better::Higher,
        from: Measurement::Iperf8,
        pointer: "/end/sum_received/bits_per_second",
        scale: 1e-9,
    },
];

/// How many of `FIGURES` the `ci` suite has: not the iperf3 cross-check's.
pub const CI_FIGURES: usize = 9;

/// The five figures of each UDP workload, keyed `<measurement>_<metric>`.
macro_rules! udp_figures {
    ($($m:ident => $name:literal),* $(,)?) => {
        [$(
            Figure {
                key: concat!($name, "_dps"),
                label: "datagrams/s",
                unit: "1/s",
                better: Better::Higher,
                from: Measurement::$m,
                pointer: "/results/datagrams_per_sec",
                scale: 1.0,
            },
            Figure {
                key: concat!($name, "_loss"),
                label: "loss",
                unit: "fraction",
                better: Better::Lower,
                from: Measurement::$m,
                pointer: "/results/loss/fraction",
                scale: 1.0,
            },
            Figure {
                key: concat!($name, "_rtt_p50_us"),
                label: "RTT p50",
                unit: "µs",
                better: Better::Lower,
                from: Measurement::$m,
                pointer: "/results/rtt/p50_us",
                scale: 1.0,
            },
            Figure {
                key: concat!($name, "_rtt_p99_us"),
                label: "RTT p99",
                unit: "µs",
                better: Better::Lower,
                from: Measurement::$m,
                pointer: "/results/rtt/p99_us",
                scale: 1.0,
            },
            Figure {
                key: concat!($name, "_cpu_us"),
                label: "relay CPU/datagram",
                unit: "CPU-µs",
                better: Better::Lower,
                from: Measurement::$m,
                pointer: "/relay_cpu/per_datagram",
                scale: 1e6,
            },
        )*]
    };
}

/// Metrics of every UDP workload, in the order of `UDP_FIGURES`' groups:
/// (key suffix, table title).
pub const UDP_METRICS: [(&str, &str); 5] = [
    ("dps", "Datagrams/s (echoed)"),
    ("loss", "Loss (% of the datagrams sent in the interval)"),
    ("rtt_p50_us", "RTT p50 (µs)"),
    ("rtt_p99_us", "RTT p99 (µs)"),
    ("cpu_us", "Relay CPU per datagram (CPU-µs)"),
];

pub const UDP_FIGURES: [Figure; 40] = udp_figures!(
    Udp64x1 => "udp64x1",
    Udp64x8 => "udp64x8",
    Udp64x2000 => "udp64x2000",
    Udp1400x1 => "udp1400x1",
    Udp1400x8 => "udp1400x8",
    Udp1400x2000 => "udp1400x2000",
    UdpPlain512x1 => "udpplain512x1",
    UdpPlain512x8 => "udpplain512x8",
);

pub fn figure(key: &str) -> Option<&'static Figure> {
    FIGURES
        .iter()
        .chain(UDP_FIGURES.iter())
        .find(|f| f.key == key)
}

pub fn value_at(report: &Value, f: &Figure) -> Option<f64> {
    report.pointer(f.pointer)?.as_f64().map(|v| v * f.scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relays::Kind;

    #[test]
    fn udp_figures_cover_every_workload() {
        assert_eq!(
            UDP_FIGURES.len(),
            Measurement::UDP.len() * UDP_METRICS.len()
        );
        for m in Measurement::UDP {
            for (metric, _) in UDP_METRICS {
                let key = format!("{}_{metric}", m.name());
                let f = figure(&key).unwrap_or_else(|| panic!("{key}"));
                assert_eq!(f.from, m);
            }
            assert_eq!(m.args()[0], "udp");
        }
        let mut keys: Vec<&str> = FIGURES.iter().chain(&UDP_FIGURES).map(|f| f.key).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), FIGURES.len() + UDP_FIGURES.len());
        assert_eq!(
            Measurement::Udp1400x8.label(),
            "1400 B, 8 assocs × 16 in flight"
        );
        assert_eq!(Suite::Udp.kinds(), Kind::UDP.to_vec());
        assert!(!Suite::Full.kinds().contains(&Kind::Ringsocks));
        assert_eq!(Suite::from_name("udp"), Some(Suite::Udp));
        assert_eq!(Suite::from_name("udp-ci"), Some(Suite::UdpCi));
        assert!(Suite::UdpCi
            .measurements()
            .iter()
            .all(|m| Measurement::UDP.contains(m)));
        assert_eq!(figures_of("udp").len(), UDP_FIGURES.len());
        assert_eq!(
            Measurement::UdpPlain512x8.label(),
            "512 B plain, 8 assocs × 32 in flight"
        );
        assert!(Measurement::UdpPlain512x1.args().contains(&"--plain"));
        assert!(figure("udpplain512x8_cpu_us").is_some());
        assert_eq!(figures_of("full").len(), FIGURES.len());
        assert_eq!(figures_of("ci").len(), CI_FIGURES);
        assert!(figures_of("ci").iter().all(|f| !f.from.is_iperf()));
        for m in Measurement::FULL {
            assert!(FIGURES.iter().any(|f| f.from == m), "{}", m.name());
        }
        assert!(Suite::Full.kinds().contains(&Kind::ThreeProxy));
        assert!(Suite::Full.kinds().contains(&Kind::Hev));
        assert!(!Suite::Ci.kinds().contains(&Kind::Hev));
        assert_eq!(
            Suite::Udp.left_out(),
            vec![(Kind::Microsocks, "no UDP ASSOCIATE")]
        );
    }
}
