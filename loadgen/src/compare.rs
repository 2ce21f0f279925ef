//! compare: the side-by-side suites. TCP (`full`, `ci`): ringsocks on its
//! forwarding paths, direct loopback, Dante and microsocks; UDP (`udp`):
//! ringsocks, direct loopback and Dante (the only peer with UDP
//! ASSOCIATE). Each system is measured on the same figures, repetitions
//! rotating the order of systems; medians and ratios to the references of
//! the same run go to a JSON file, to the suite's block of the generated
//! section of results/README.md and to an SVG chart.
//!
//! Every measurement is one run of this same binary in a client mode
//! (`tcp-throughput`, `tcp-latency`, `tcp-cps`, `udp`) with `--json -`,
//! pinned with `--cpu`, so each report is exactly what that mode writes
//! alone.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::common::Result;
use crate::relays::{Kind, Relay};
use crate::sys;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suite {
    /// All five systems, ~5 s per measurement after 1 s warmup
    Full,
    /// Short (for CI): ringsocks both paths, direct, microsocks; 2 s after 0.5 s warmup
    Ci,
    /// UDP ASSOCIATE: ringsocks, direct, Dante; 64 and 1400 B datagrams over 1, 8, 2000 associations
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

    fn kinds(self) -> Vec<Kind> {
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

    /// (duration, warmup) seconds.
    fn times(self) -> (f64, f64) {
        match self {
            Suite::Full => (5.0, 1.0),
            Suite::Ci | Suite::UdpCi => (2.0, 0.5),
            Suite::Udp => (UDP_DURATION, UDP_WARMUP),
        }
    }

    pub fn measurements(self) -> &'static [Measurement] {
        match self {
            Suite::Full | Suite::Ci => &Measurement::TCP,
            Suite::Udp => &Measurement::UDP,
            Suite::UdpCi => &[Measurement::Udp64x8, Measurement::Udp1400x8],
        }
    }

    pub fn figures(self) -> &'static [Figure] {
        match self {
            Suite::Full | Suite::Ci => &FIGURES,
            Suite::Udp | Suite::UdpCi => &UDP_FIGURES,
        }
    }

    pub fn from_name(s: &str) -> Option<Suite> {
        [Suite::Full, Suite::Ci, Suite::Udp, Suite::UdpCi]
            .into_iter()
            .find(|x| x.name() == s)
    }
}

/// The figures of the suite a document (or baseline) names.
pub fn figures_of(suite: &str) -> &'static [Figure] {
    Suite::from_name(suite).map_or(&FIGURES, |s| s.figures())
}

/// UDP suite: seconds measured and of warmup per run (short: 54 runs,
/// some with 2000 associations to set up first).
const UDP_DURATION: f64 = 3.0;
const UDP_WARMUP: f64 = 0.5;
/// Datagrams in flight per association, 8-association runs (closed loop).
pub const UDP_WINDOW_8: &str = "16";
/// Datagrams/s over all 2000 associations (open loop): 5 per association
/// per second. Dante on one core sustains it without loss at about half a
/// core; at 20000/s it is near its limit (~100% CPU, RTT p99 in the tens
/// of ms on the 2-core VM).
pub const UDP_RATE_2000: &str = "10000";

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[arg(long, value_enum, default_value_t = Suite::Full)]
    pub suite: Suite,
    /// Repetitions; the order of systems rotates on each
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Seconds measured per run (default: 5 for full, 2 for ci, 3 for udp)
    #[arg(long)]
    pub duration: Option<f64>,
    /// Seconds of warmup per run (default: 1 for full, 0.5 for ci and udp)
    #[arg(long)]
    pub warmup: Option<f64>,
    /// Only these systems (repeatable): ringsocks-auto, ringsocks-splice, ringsocks-copy, direct, dante, microsocks; udp: ringsocks, direct, dante
    #[arg(long = "system", value_name = "NAME")]
    pub systems: Vec<String>,
    /// ringsocks binary (default: next to this loadgen binary)
    #[arg(long, value_name = "PATH")]
    pub ringsocks: Option<PathBuf>,
    /// Write the suite JSON here (default: results/<date>-<suite>.json)
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Directory of results/README.md and the chart
    #[arg(long, default_value = "results", value_name = "DIR")]
    pub results_dir: PathBuf,
    /// Do not touch results/README.md nor the chart (CI)
    #[arg(long)]
    pub no_readme: bool,
    /// CPU for the relays
    #[arg(long, default_value_t = 0)]
    pub relay_cpu: usize,
    /// CPU for loadgen and its in-process target
    #[arg(long, default_value_t = 1)]
    pub load_cpu: usize,
    /// Stay in the current network namespace (default: a private one, see README)
    #[arg(long)]
    pub no_netns: bool,
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
}

impl Measurement {
    pub const TCP: [Measurement; 5] = [
        Measurement::Tput1,
        Measurement::Tput16,
        Measurement::Bidir,
        Measurement::Latency,
        Measurement::Cps,
    ];

    pub const UDP: [Measurement; 6] = [
        Measurement::Udp64x1,
        Measurement::Udp64x8,
        Measurement::Udp64x2000,
        Measurement::Udp1400x1,
        Measurement::Udp1400x8,
        Measurement::Udp1400x2000,
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
        }
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
            other => return other.name().to_string(),
        };
        format!("{size} B, {load}")
    }

    fn args(self) -> Vec<&'static str> {
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

pub const FIGURES: [Figure; 9] = [
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
];

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

pub const UDP_FIGURES: [Figure; 30] = udp_figures!(
    Udp64x1 => "udp64x1",
    Udp64x8 => "udp64x8",
    Udp64x2000 => "udp64x2000",
    Udp1400x1 => "udp1400x1",
    Udp1400x8 => "udp1400x8",
    Udp1400x2000 => "udp1400x2000",
);

pub fn figure(key: &str) -> Option<&'static Figure> {
    FIGURES
        .iter()
        .chain(UDP_FIGURES.iter())
        .find(|f| f.key == key)
}

pub fn median(v: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// `base` rotated left by `r`: the order of systems in repetition `r`.
pub fn rotation<T: Clone>(base: &[T], r: usize) -> Vec<T> {
    let n = base.len();
    (0..n).map(|i| base[(i + r) % n].clone()).collect()
}

/// UTC date `YYYY-MM-DD` of a Unix time (days-from-civil inverse).
pub fn utc_date(secs: u64) -> String {
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Runs one loadgen client mode as a child process and returns its report.
fn run_loadgen(argv: &[String], limit: Duration) -> (Option<Value>, Option<String>) {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return (None, Some(format!("current_exe: {e}"))),
    };
    let child = Command::new(exe)
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return (None, Some(format!("spawn: {e}"))),
    };
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out_t = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    // Bounded by `limit`, then the child is killed (by its PID).
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    let report: Option<Value> = serde_json::from_str(&stdout).ok();
    let error = match status {
        None => Some(format!("timed out after {:.0} s", limit.as_secs_f64())),
        Some(st) if !st.success() => Some(
            stderr
                .lines()
                .rev()
                .find(|l| l.starts_with("loadgen:"))
                .unwrap_or("failed")
                .to_string(),
        ),
        Some(_) if report.is_none() => Some("no JSON report".into()),
        Some(_) => None,
    };
    (report, error)
}

pub fn value_at(report: &Value, f: &Figure) -> Option<f64> {
    report.pointer(f.pointer)?.as_f64().map(|v| v * f.scale)
}

/// Medians per system and figure, from the `runs` of a suite document.
pub fn medians(values: &BTreeMap<String, BTreeMap<String, Vec<f64>>>) -> Value {
    let mut m = serde_json::Map::new();
    for (sys, figs) in values {
        let mut o = serde_json::Map::new();
        for (k, v) in figs {
            o.insert(k.clone(), json!(median(v)));
        }
        m.insert(sys.clone(), Value::Object(o));
    }
    Value::Object(m)
}

/// `"A/B"` ratios (A's median over B's, for every figure) for every system
/// A but direct loopback and every reference B present (direct loopback and
/// the peers Dante and microsocks), so each reads "A is x times B".
pub fn ratios(medians: &Value, present: &[String], figures: &[Figure]) -> Value {
    let mut out = serde_json::Map::new();
    for a in present {
        for b in present {
            let (Some(ka), Some(kb)) = (Kind::from_name(a), Kind::from_name(b)) else {
                continue;
            };
            if a == b || !kb.is_reference() || ka == Kind::Direct {
                continue;
            }
            let mut o = serde_json::Map::new();
            for f in figures {
                let va = medians[a][f.key].as_f64();
                let vb = medians[b][f.key].as_f64();
                let r = match (va, vb) {
                    (Some(x), Some(y)) if y > 0.0 => json!(x / y),
                    _ => Value::Null,
                };
                o.insert(f.key.into(), r);
            }
            out.insert(format!("{a}/{b}"), Value::Object(o));
        }
    }
    Value::Object(out)
}

pub fn run(a: &Args) -> Result<()> {
    let wall = Instant::now();
    if !(1..=50).contains(&a.reps) {
        return Err("--reps must be 1..=50".into());
    }
    if a.reps < 3 {
        eprintln!("compare: warning: fewer than 3 repetitions; medians are weak");
    }
    let (mut duration, mut warmup) = a.suite.times();
    duration = a.duration.unwrap_or(duration);
    warmup = a.warmup.unwrap_or(warmup);
    if !(duration > 0.0 && duration <= 600.0 && (0.0..=60.0).contains(&warmup)) {
        return Err("--duration must be in (0, 600], --warmup in [0, 60]".into());
    }
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    let (relay_cpu, load_cpu) = if cores >= 2 {
        (Some(a.relay_cpu), a.load_cpu)
    } else {
        eprintln!("compare: warning: one CPU; relay and load share it");
        (Some(0), 0)
    };
    let netns = if a.no_netns {
        false
    } else {
        match crate::relays::enter_private_netns() {
            Ok(()) => true,
            Err(e) => {
                eprintln!(
                    "compare: warning: no private network namespace ({e}); \
                     runs after relayed tcp-cps may fail to bind for lack of ephemeral ports"
                );
                false
            }
        }
    };
    // Pin ourselves too: all we do between runs is wait.
    core_affinity::set_for_current(core_affinity::CoreId { id: load_cpu });

    let mut kinds = a.suite.kinds();
    if !a.systems.is_empty() {
        let mut want = Vec::new();
        for s in &a.systems {
            want.push(Kind::from_name(s).ok_or_else(|| format!("--system {s}: unknown"))?);
        }
        kinds.retain(|k| want.contains(k));
    }
    let ringsocks = match &a.ringsocks {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("ringsocks"),
    };

    // Start every relay once; they idle while the others are measured.
    let mut relays: BTreeMap<&'static str, Relay> = BTreeMap::new();
    let mut skipped = Vec::new();
    let mut present: Vec<Kind> = Vec::new();
    for &k in &kinds {
        if k == Kind::Direct {
            present.push(k);
            continue;
        }
        match Relay::start(k, &ringsocks, relay_cpu) {
            Ok(Some(r)) => {
                eprintln!(
                    "compare: {} on {} (pid {}, {})",
                    k.name(),
                    r.addr,
                    r.pid(),
                    r.version
                );
                relays.insert(k.name(), r);
                present.push(k);
            }
            Ok(None) => {
                eprintln!("compare: {} is not installed: skipped", k.name());
                skipped.push(json!({"name": k.name(), "reason": "not installed"}));
            }
            Err(e) if k.is_ringsocks() => return Err(format!("{}: {e}", k.name()).into()),
            Err(e) => {
                eprintln!("compare: {} did not start ({e}): skipped", k.name());
                skipped.push(json!({"name": k.name(), "reason": e.to_string()}));
            }
        }
    }
    if present.is_empty() {
        return Err("no system to measure".into());
    }
    let names: Vec<String> = present.iter().map(|k| k.name().to_string()).collect();
    // One untimed pass over every relay: Dante forks its worker processes
    // on demand, and the process set must be stable for its CPU figure to
    // cover every worker; the others get the same treatment for fairness.
    let warm_ups: &[Measurement] = match a.suite {
        // Dante forks a worker per few associations: let it fork for 2000 once.
        Suite::Udp => &[Measurement::Udp64x8, Measurement::Udp64x2000],
        Suite::UdpCi => &[Measurement::Udp64x8],
        _ => &[Measurement::Cps, Measurement::Tput16],
    };
    for r in relays.values() {
        for &m in warm_ups {
            let mut argv: Vec<String> = m.args().into_iter().map(String::from).collect();
            argv.extend(
                [
                    "--proxy",
                    &r.addr.to_string(),
                    "--duration",
                    "0.7",
                    "--warmup",
                    "0",
                    "--cpu",
                    &load_cpu.to_string(),
                    "--quiet",
                    "--json",
                    "-",
                ]
                .map(String::from),
            );
            if let (_, Some(e)) = run_loadgen(&argv, Duration::from_secs(30)) {
                eprintln!("compare: warm-up of {}: {e}", r.kind.name());
            }
        }
    }
    thread::sleep(Duration::from_millis(300));

    let limit = Duration::from_secs_f64(duration + warmup + 30.0);
    let mut runs = Vec::new();
    let mut orders = Vec::new();
    let mut values: BTreeMap<String, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    let udp = matches!(a.suite, Suite::Udp | Suite::UdpCi);
    let figures = a.suite.figures();
    let total = a.reps * a.suite.measurements().len() * present.len();
    let mut done = 0;
    for rep in 0..a.reps {
        let order = rotation(&present, rep);
        orders.push(order.iter().map(|k| k.name()).collect::<Vec<_>>());
        for &m in a.suite.measurements() {
            for &k in &order {
                let mut argv: Vec<String> = m.args().into_iter().map(String::from).collect();
                let mut pids_before = Vec::new();
                match relays.get(k.name()) {
                    None => argv.push("--direct".into()),
                    // `udp` counts the relay's descendants itself, exited
                    // ones included: only the relay's own PID is passed.
                    Some(r) if udp => {
                        argv.extend(["--proxy".into(), r.addr.to_string()]);
                        argv.extend(["--pid".into(), r.pid().to_string()]);
                    }
                    Some(r) => {
                        argv.extend(["--proxy".into(), r.addr.to_string()]);
                        pids_before = r.pids();
                        for p in &pids_before {
                            argv.extend(["--pid".into(), p.to_string()]);
                        }
                    }
                }
                argv.extend([
                    "--duration".into(),
                    duration.to_string(),
                    "--warmup".into(),
                    warmup.to_string(),
                    "--cpu".into(),
                    load_cpu.to_string(),
                    "--quiet".into(),
                    "--json".into(),
                    "-".into(),
                ]);
                let (mut report, error) = run_loadgen(&argv, limit);
                done += 1;
                // Dante forks and reaps workers: if its process set changed
                // during the run, the CPU figure missed some of it.
                let mut cpu_note = Value::Null;
                if let Some(r) = relays.get(k.name()).filter(|_| !udp) {
                    if r.pids() != pids_before {
                        cpu_note = json!("relay process set changed during the run: CPU dropped");
                        if let Some(rep) = report.as_mut() {
                            rep["relay_cpu"] = Value::Null;
                        }
                    }
                }
                let mut line = format!(
                    "[{done}/{total}] rep {} {:<12} {:<17}",
                    rep + 1,
                    m.name(),
                    k.name()
                );
                if let Some(rep_json) = &report {
                    for f in figures.iter().filter(|f| f.from == m) {
                        if let Some(v) = value_at(rep_json, f) {
                            values
                                .entry(k.name().to_string())
                                .or_default()
                                .entry(f.key.to_string())
                                .or_default()
                                .push(v);
                            line += &format!(" {} {}", f.key, fmt_num(v));
                        }
                    }
                }
                if let Some(e) = &error {
                    line += &format!("  ERROR {e}");
                }
                eprintln!("{line}");
                runs.push(json!({
                    "rep": rep + 1,
                    "system": k.name(),
                    "measurement": m.name(),
                    "argv": argv,
                    "error": error,
                    "cpu_note": cpu_note,
                    "report": report,
                }));
            }
        }
    }
    let meds = medians(&values);
    let rats = ratios(&meds, &names, figures);
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let date = utc_date(now);
    let doc = json!({
        "suite": a.suite.name(),
        "date": date,
        "unix_time": now,
        "command": std::env::args().collect::<Vec<_>>(),
        "system": sys::system_json(),
        "params": {
            "reps": a.reps,
            "duration": duration,
            "warmup": warmup,
            "relay_cpu": relay_cpu,
            "load_cpu": load_cpu,
            "private_netns": netns,
            "netns_tcp_max_tw_buckets": if netns { json!(crate::relays::NETNS_MAX_TW) } else { Value::Null },
            "orders": orders,
        },
        "systems": present.iter().map(|k| match relays.get(k.name()) {
            Some(r) => r.json(),
            None => json!({"name": k.name(), "label": k.label(), "command": null, "version": null}),
        }).collect::<Vec<_>>(),
        "skipped": skipped,
        "figures": figures.iter().map(|f| json!({
            "key": f.key, "label": f.label, "unit": f.unit, "better": f.better.name(),
            "measurement": f.from.name(),
        })).collect::<Vec<_>>(),
        "workloads": if udp {
            json!(a.suite.measurements().iter().map(|m| json!({
                "measurement": m.name(), "label": m.label(), "args": m.args(),
            })).collect::<Vec<_>>())
        } else {
            Value::Null
        },
        "values": values,
        "medians": meds,
        "ratios": rats,
        "wall_seconds": wall.elapsed().as_secs_f64(),
        "runs": runs,
    });
    drop(relays);

    let json_path = a.json.clone().unwrap_or_else(|| {
        a.results_dir
            .join(format!("{date}-{}.json", a.suite.name()))
    });
    if let Some(dir) = json_path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)?;
        }
    }
    std::fs::write(&json_path, serde_json::to_string_pretty(&doc)? + "\n")
        .map_err(|e| format!("{}: {e}", json_path.display()))?;
    let section = markdown(&doc, &json_path, &a.results_dir);
    println!("{section}");
    eprintln!(
        "compare: {} suite in {:.0} s; wrote {}",
        a.suite.name(),
        wall.elapsed().as_secs_f64(),
        json_path.display()
    );
    if !a.no_readme {
        let svg = a.results_dir.join(format!("{}.svg", a.suite.name()));
        crate::chart::draw(&doc, &svg)?;
        update_readme(&a.results_dir.join("README.md"), a.suite.name(), &section)?;
        eprintln!(
            "compare: wrote {} and the generated section of {}",
            svg.display(),
            a.results_dir.join("README.md").display()
        );
    }
    let failed = doc["runs"]
        .as_array()
        .map_or(0, |r| r.iter().filter(|x| !x["error"].is_null()).count());
    if failed > 0 {
        eprintln!("compare: {failed} run(s) failed (see `error` in the JSON)");
    }
    Ok(())
}

/// 3 significant digits, no exponent.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn label_of(doc: &Value, name: &str) -> String {
    let sys = doc["systems"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name));
    let label = Kind::from_name(name).map_or(name, |k| k.label());
    match sys.and_then(|s| s["version"].as_str()) {
        Some(v) if !v.starts_with("git") && v != "unknown" => format!("{label} {v}"),
        _ => label.to_string(),
    }
}

/// The names of the systems a suite document measured, in its order.
pub fn system_names(doc: &Value) -> Vec<String> {
    doc["systems"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The generated markdown for one suite document.
pub fn markdown(doc: &Value, json_path: &Path, results_dir: &Path) -> String {
    let suite = doc["suite"].as_str().unwrap_or("?");
    let names = system_names(doc);
    let p = &doc["params"];
    let json_rel = json_path
        .strip_prefix(results_dir)
        .unwrap_or(json_path)
        .display()
        .to_string();
    let mut s = format!(
        "### Suite `{suite}` ({})\n\n",
        doc["date"].as_str().unwrap_or("")
    );
    s += &format!(
        "`scripts/bench.sh --suite {suite}`: {} repetitions (order of systems rotated each time), \
         {} s measured after {} s warmup per run, relays pinned to CPU {} (one shard / worker), \
         loadgen and its in-process target on CPU {}. Revision {}, kernel {}. Medians; raw runs in \
         [{json_rel}]({json_rel}). Suite wall time {:.0} s.\n\n",
        p["reps"],
        p["duration"],
        p["warmup"],
        p["relay_cpu"],
        p["load_cpu"],
        doc["system"]["git"].as_str().unwrap_or("?"),
        doc["system"]["kernel"].as_str().unwrap_or("?"),
        doc["wall_seconds"].as_f64().unwrap_or(0.0),
    );
    if let Some(sk) = doc["skipped"].as_array().filter(|a| !a.is_empty()) {
        for x in sk {
            s += &format!(
                "Skipped: {} ({}).\n",
                x["name"].as_str().unwrap_or("?"),
                x["reason"].as_str().unwrap_or("?")
            );
        }
        s.push('\n');
    }
    s += &format!("![{suite} suite]({suite}.svg)\n\n");
    if suite.starts_with("udp") {
        s += &udp_tables(doc, &names);
        return s;
    }
    // Medians.
    s += "| system |";
    for f in &FIGURES {
        s += &format!(" {} ({}) |", f.label, f.unit);
    }
    s += "\n|---|";
    for _ in &FIGURES {
        s += "---|";
    }
    s.push('\n');
    for n in &names {
        s += &format!("| {} |", label_of(doc, n));
        for f in &FIGURES {
            match doc["medians"][n][f.key].as_f64() {
                Some(v) => s += &format!(" {} |", fmt_num(v)),
                None => s += " – |",
            }
        }
        s.push('\n');
    }
    // Ratios.
    s += "\nRatios of medians, `A / B` = A's figure divided by B's (for RTT and CPU, above 1 \
          means A is slower or costlier):\n\n| A / B |";
    for f in &FIGURES {
        s += &format!(" {} |", f.label);
    }
    s += "\n|---|";
    for _ in &FIGURES {
        s += "---|";
    }
    s.push('\n');
    if let Some(r) = doc["ratios"].as_object() {
        // ringsocks rows first.
        let mut keys: Vec<&String> = r.keys().collect();
        keys.sort_by_key(|k| (!k.starts_with("ringsocks"), (*k).clone()));
        for k in keys {
            s += &format!("| {k} |");
            for f in &FIGURES {
                match r[k][f.key].as_f64() {
                    Some(v) => s += &format!(" {v:.2} |"),
                    None => s += " – |",
                }
            }
            s.push('\n');
        }
    }
    s
}

/// A ratio with 2 decimals, or 2 significant digits when it is below 0.1.
fn fmt_ratio(v: f64) -> String {
    // 0.0995 and up print as 0.10 with 2 decimals.
    if v == 0.0 || v.abs() >= 0.0995 {
        format!("{v:.2}")
    } else {
        let digits = (1.0 - v.abs().log10().floor()).clamp(2.0, 12.0) as usize;
        format!("{v:.digits$}")
    }
}

/// A loss fraction as a percentage (0 stays "0").
fn fmt_loss(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else {
        format!("{:.3}%", 100.0 * v)
    }
}

/// The UDP suite's tables: per metric, systems × workloads; then the
/// ratios of medians.
fn udp_tables(doc: &Value, names: &[String]) -> String {
    let works = Measurement::UDP;
    let drain = doc["runs"]
        .as_array()
        .and_then(|r| {
            r.iter()
                .find_map(|x| x["report"]["params"]["drain"].as_f64())
        })
        .unwrap_or(0.5);
    let mut s = format!(
        "One `loadgen udp` run per workload, system and repetition: \"1 assoc, ping-pong\" = \
         `--assocs 1 --window 1`; \"8 assocs × {UDP_WINDOW_8} in flight\" = `--assocs 8 --window \
         {UDP_WINDOW_8}` (closed loop); \"2000 assocs at {UDP_RATE_2000}/s\" = `--assocs 2000 --rate \
         {UDP_RATE_2000}` (open loop, round robin over the associations). A datagram is one echoed \
         round trip (request and reply both through the relay); loss counts the datagrams sent in \
         the interval without a reply {drain} s after it; relay CPU per datagram = relay CPU-s \
         (its descendant processes included) / echoed datagrams.\n\n"
    );
    let header = |first: &str| {
        let mut h = format!("| {first} |");
        for m in works {
            h += &format!(" {} |", m.label());
        }
        h += "\n|---|";
        for _ in works {
            h += "---|";
        }
        h + "\n"
    };
    for (metric, title) in UDP_METRICS {
        s += &format!("#### {title}\n\n");
        s += &header("system");
        for n in names {
            s += &format!("| {} |", label_of(doc, n));
            for m in works {
                let key = format!("{}_{metric}", m.name());
                match doc["medians"][n][&key].as_f64() {
                    Some(v) if metric == "loss" => s += &format!(" {} |", fmt_loss(v)),
                    Some(v) => s += &format!(" {} |", fmt_num(v)),
                    None => s += " – |",
                }
            }
            s.push('\n');
        }
        s.push('\n');
    }
    s += "#### Ratios of medians\n\n`A / B` = A's figure divided by B's (for RTT and CPU, above 1 \
          means A is slower or costlier):\n\n";
    s += &header("A / B, figure");
    if let Some(r) = doc["ratios"].as_object() {
        let mut keys: Vec<&String> = r.keys().collect();
        keys.sort_by_key(|k| (!k.starts_with("ringsocks"), (*k).clone()));
        for k in keys {
            for (metric, _) in UDP_METRICS.iter().filter(|(m, _)| *m != "loss") {
                let vals: Vec<Option<f64>> = works
                    .iter()
                    .map(|m| r[k][&format!("{}_{metric}", m.name())].as_f64())
                    .collect();
                // No row for a figure one side lacks (relay CPU of direct loopback).
                if vals.iter().all(Option::is_none) {
                    continue;
                }
                let label = figure(&format!("udp64x1_{metric}")).map_or("?", |f| f.label);
                s += &format!("| {k}, {label} |");
                for v in vals {
                    match v {
                        Some(v) => s += &format!(" {} |", fmt_ratio(v)),
                        None => s += " – |",
                    }
                }
                s.push('\n');
            }
        }
    }
    s
}

pub const BEGIN: &str = "<!-- bench:begin -->";
pub const END: &str = "<!-- bench:end -->";

/// Replaces this suite's block in the generated section of README.md
/// (between BEGIN and END, appended if absent), keeping other suites'
/// blocks and every hand-written line outside the markers.
pub fn splice_readme(text: &str, suite: &str, section: &str) -> String {
    let (head, generated, tail) = match (text.find(BEGIN), text.find(END)) {
        (Some(b), Some(e)) if b < e => (
            &text[..b],
            &text[b + BEGIN.len()..e],
            &text[e + END.len()..],
        ),
        _ => (text, "", "\n"),
    };
    // Blocks are delimited by `<!-- suite:NAME -->` lines.
    let mut blocks: Vec<(String, String)> = Vec::new();
    for part in generated.split("<!-- suite:").skip(1) {
        if let Some((name, body)) = part.split_once(" -->") {
            blocks.push((name.trim().to_string(), body.trim().to_string()));
        }
    }
    match blocks.iter_mut().find(|(n, _)| n == suite) {
        Some(b) => b.1 = section.trim().to_string(),
        None => blocks.push((suite.to_string(), section.trim().to_string())),
    }
    blocks.sort_by_key(|(n, _)| if n == "full" { 0 } else { 1 });
    let mut out = head.to_string();
    if !out.is_empty() && !out.ends_with("\n\n") {
        out += if out.ends_with('\n') { "\n" } else { "\n\n" };
    }
    out += BEGIN;
    out += "\n## Side-by-side suite (generated by `scripts/bench.sh`; do not edit by hand)\n\n";
    for (n, body) in &blocks {
        out += &format!("<!-- suite:{n} -->\n{body}\n\n");
    }
    out += END;
    out += if tail.is_empty() { "\n" } else { tail };
    out
}

fn update_readme(path: &Path, suite: &str, section: &str) -> Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    std::fs::write(path, splice_readme(&text, suite, section))
        .map_err(|e| format!("{}: {e}", path.display()).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_rotation() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(rotation(&[1, 2, 3], 1), vec![2, 3, 1]);
        assert_eq!(rotation(&[1, 2, 3], 3), vec![1, 2, 3]);
    }

    #[test]
    fn dates() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(951_782_400), "2000-02-29");
        assert_eq!(utc_date(1_795_531_872), "2026-11-24");
    }

    #[test]
    fn readme_keeps_hand_written_parts() {
        let hand = "# Measured runs\n\nhand text\n";
        let one = splice_readme(hand, "full", "FULL TABLE\n");
        assert!(one.starts_with(hand));
        assert!(one.contains(BEGIN) && one.contains(END) && one.contains("FULL TABLE"));
        let two = splice_readme(
            &(one.clone() + "\n## after\nmore hand text\n"),
            "ci",
            "CI 1",
        );
        assert!(two.contains("FULL TABLE") && two.contains("CI 1"));
        assert!(two.contains("more hand text") && two.starts_with(hand));
        let three = splice_readme(&two, "ci", "CI 2");
        assert!(!three.contains("CI 1") && three.contains("CI 2"));
        assert!(three.find("FULL TABLE") < three.find("CI 2"));
        assert_eq!(three.matches(BEGIN).count(), 1);
        assert_eq!(splice_readme(&three, "ci", "CI 2"), three);
    }

    #[test]
    fn ratio_formats() {
        assert_eq!(fmt_ratio(2.0), "2.00");
        assert_eq!(fmt_ratio(0.25), "0.25");
        assert_eq!(fmt_ratio(0.0017), "0.0017");
        assert_eq!(fmt_ratio(0.034), "0.034");
        assert_eq!(fmt_ratio(0.0996), "0.10");
        assert_eq!(fmt_ratio(0.0), "0.00");
        assert_eq!(fmt_loss(0.0), "0");
        assert_eq!(fmt_loss(0.0025), "0.250%");
    }

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
        assert_eq!(figures_of("udp").len(), 30);
        assert_eq!(figures_of("ci").len(), FIGURES.len());
    }

    #[test]
    fn udp_section_has_its_own_tables() {
        let report = json!({"results": {"datagrams_per_sec": 5000.0, "loss": {"fraction": 0.0},
            "rtt": {"p50_us": 90.0, "p99_us": 3000.0}}, "relay_cpu": {"per_datagram": 7.4e-5},
            "params": {"drain": 0.5}});
        let f = figure("udp64x1_cpu_us").unwrap();
        assert!((value_at(&report, f).unwrap() - 74.0).abs() < 1e-9);
        let meds = json!({
            "ringsocks": {"udp64x1_dps": 20000.0, "udp64x1_loss": 0.0, "udp64x1_cpu_us": 10.0},
            "direct": {"udp64x1_dps": 80000.0, "udp64x1_loss": 0.0},
            "dante": {"udp64x1_dps": 5000.0, "udp64x1_loss": 0.0025, "udp64x1_cpu_us": 74.0},
        });
        let names: Vec<String> = ["ringsocks", "direct", "dante"].map(String::from).to_vec();
        let rats = ratios(&meds, &names, &UDP_FIGURES);
        assert_eq!(rats["ringsocks/dante"]["udp64x1_dps"], 4.0);
        assert_eq!(rats["ringsocks/dante"]["udp64x1_loss"], 0.0);
        assert!(rats["ringsocks/direct"]["udp64x1_loss"].is_null(), "0 / 0");
        let doc = json!({
            "suite": "udp", "date": "2026-11-24", "system": {"git": "abc", "kernel": "6.18"},
            "params": {"reps": 3, "duration": 3.0, "warmup": 0.5, "relay_cpu": 0, "load_cpu": 1},
            "systems": [{"name": "ringsocks"}, {"name": "direct"}, {"name": "dante", "version": "1.4.2"}],
            "skipped": [], "medians": meds, "ratios": rats, "wall_seconds": 300.0,
            "runs": [{"report": report}],
        });
        let md = markdown(&doc, Path::new("results/x-udp.json"), Path::new("results"));
        assert!(md.starts_with("### Suite `udp`"));
        assert!(md.contains("#### Datagrams/s (echoed)") && md.contains("#### Ratios of medians"));
        assert!(md.contains("| Dante (danted -N 1) 1.4.2 | 5000 |"), "{md}");
        assert!(md.contains("| 0.250% |") && md.contains("| direct loopback | 80000 |"));
        assert!(md.contains("| ringsocks/dante, datagrams/s | 4.00 |"));
        assert!(md.contains("| ringsocks/dante, relay CPU/datagram |"));
        assert!(!md.contains("ringsocks/direct, relay CPU"), "{md}");
        assert!(!md.contains("conn/s"));
        // Its block sits next to the TCP suites' without touching them.
        let tcp = splice_readme("# hand\n", "full", "FULL TABLE\n");
        let both = splice_readme(&tcp, "udp", &md);
        assert!(both.contains("FULL TABLE") && both.contains("<!-- suite:udp -->"));
        assert_eq!(splice_readme(&both, "full", "FULL TABLE\n"), both);
    }

    #[test]
    fn ratios_to_references_only() {
        let meds = json!({
            "direct": {"tput1_gbps": 20.0},
            "ringsocks-splice": {"tput1_gbps": 10.0},
            "microsocks": {"tput1_gbps": 2.0},
        });
        let names: Vec<String> = ["direct", "ringsocks-splice", "microsocks"]
            .map(String::from)
            .to_vec();
        let r = ratios(&meds, &names, &FIGURES);
        assert_eq!(r["ringsocks-splice/direct"]["tput1_gbps"], 0.5);
        assert_eq!(r["ringsocks-splice/microsocks"]["tput1_gbps"], 5.0);
        assert_eq!(r["microsocks/direct"]["tput1_gbps"], 0.1);
        assert!(r.get("direct/microsocks").is_none());
        assert!(r.get("microsocks/ringsocks-splice").is_none());
        assert!(r["ringsocks-splice/direct"]["cps"].is_null());
    }
}
