//! The generated markdown of a suite document: the medians table and the
//! ratios table (TCP suites, the iperf3 cross-check's columns included), or
//! one table per metric plus the ratios (UDP suites), with the numbers
//! formatted for reading, and which systems or checks were skipped.

use std::path::Path;

use serde_json::Value;

use super::figures::{figure, figures_of, UDP_METRICS};
use super::suite::{Measurement, UDP_PLAIN_SIZE, UDP_PLAIN_WINDOW, UDP_RATE_2000, UDP_WINDOW_8};
use crate::relays::Kind;

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
    s += &iperf_note(doc);
    s += &format!("![{suite} suite]({suite}.svg)\n\n");
    if suite.starts_with("udp") {
        s += &udp_tables(doc, &names);
        return s;
    }
    let figures = figures_of(suite);
    // Medians.
    s += "| system |";
    for f in figures {
        s += &format!(" {} ({}) |", f.label, f.unit);
    }
    s += "\n|---|";
    for _ in figures {
        s += "---|";
    }
    s.push('\n');
    for n in &names {
        s += &format!("| {} |", label_of(doc, n));
        for f in figures {
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
    for f in figures {
        s += &format!(" {} |", f.label);
    }
    s += "\n|---|";
    for _ in figures {
        s += "---|";
    }
    s.push('\n');
    if let Some(r) = doc["ratios"].as_object() {
        // ringsocks rows first.
        let mut keys: Vec<&String> = r.keys().collect();
        keys.sort_by_key(|k| (!k.starts_with("ringsocks"), (*k).clone()));
        for k in keys {
            s += &format!("| {k} |");
            for f in figures {
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

/// What the iperf3 columns are, or why they are missing (nothing for a
/// suite without the cross-check).
fn iperf_note(doc: &Value) -> String {
    let ip = &doc["iperf"];
    if let Some(why) = ip["skipped"].as_str() {
        return format!("Skipped: the iperf3 cross-check ({why}).\n\n");
    }
    if ip.is_null() {
        return String::new();
    }
    format!(
        "Cross-check with third-party tools: \"iperf3\" columns = `{}` (1 or 8 streams; \
         iperf3 alone for direct loopback), client and server (`{}`) pinned to the load CPU; \
         Gbit/s received by the server.\n\n",
        ip["how"]["client"].as_str().unwrap_or("?"),
        ip["server"]
            .as_array()
            .map(|a| a
                .iter()
                .filter_map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join(" "))
            .unwrap_or_default(),
    )
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
         {UDP_RATE_2000}` (open loop, round robin over the associations); \"{UDP_PLAIN_SIZE} B \
         plain\" = `--plain --window {UDP_PLAIN_WINDOW}`: client and echo target each send one \
         datagram per sendmsg call, no GSO (in the others both send what is due with one \
         sendmmsg, equal-sized runs as UDP GSO messages). A datagram is one echoed \
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use super::super::figures::{value_at, UDP_FIGURES};
    use super::super::readme::splice_readme;
    use super::super::stats::ratios;

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
    fn full_section_has_the_peers_and_the_iperf_columns() {
        let meds = json!({
            "ringsocks-auto": {"tput1_gbps": 10.0, "iperf1_gbps": 9.0, "iperf8_gbps": 12.0},
            "3proxy": {"tput1_gbps": 4.0, "iperf1_gbps": 3.0, "iperf8_gbps": 6.0},
            "hev": {"tput1_gbps": 5.0, "iperf1_gbps": 4.5, "iperf8_gbps": 4.0},
        });
        let names: Vec<String> = ["ringsocks-auto", "3proxy", "hev"]
            .map(String::from)
            .to_vec();
        let rats = ratios(&meds, &names, figures_of("full"));
        assert_eq!(rats["ringsocks-auto/3proxy"]["iperf8_gbps"], 2.0);
        assert_eq!(rats["ringsocks-auto/hev"]["iperf8_gbps"], 3.0);
        let mut doc = json!({
            "suite": "full", "date": "2026-12-02", "system": {"git": "abc", "kernel": "6.18"},
            "params": {"reps": 1, "duration": 1.0, "warmup": 1.0, "relay_cpu": 0, "load_cpu": 1},
            "systems": [{"name": "ringsocks-auto", "version": "git abc"},
                {"name": "3proxy", "version": "1.0.0"}, {"name": "hev", "version": "2.13.1"}],
            "skipped": [{"name": "dante", "reason": "not installed"}],
            "iperf": {"skipped": null, "how": {"client": "iperf3 -c"}, "server": ["iperf3", "-s"]},
            "medians": meds, "ratios": rats, "wall_seconds": 10.0, "runs": [],
        });
        let md = markdown(&doc, Path::new("/tmp/x.json"), Path::new("results"));
        assert!(
            md.contains(" iperf3 1 stream (Gbit/s) | iperf3 8 streams (Gbit/s) |"),
            "{md}"
        );
        assert!(
            md.contains("| 3proxy (socks, auth none) 1.0.0 | 4.00 |"),
            "{md}"
        );
        assert!(
            md.contains("| hev-socks5-server (workers: 1) 2.13.1 | 5.00 |"),
            "{md}"
        );
        assert!(md.contains("Skipped: dante (not installed)."));
        assert!(md.contains("`iperf3 -c` (1 or 8 streams;") && md.contains("(`iperf3 -s`)"));
        doc["iperf"] = json!({"skipped": "proxychains4 not installed"});
        let md = markdown(&doc, Path::new("/tmp/x.json"), Path::new("results"));
        assert!(md.contains("Skipped: the iperf3 cross-check (proxychains4 not installed)."));
        doc["suite"] = json!("ci");
        doc["iperf"] = Value::Null;
        let md = markdown(&doc, Path::new("/tmp/x.json"), Path::new("results"));
        assert!(!md.contains("iperf3"), "{md}");
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
}
