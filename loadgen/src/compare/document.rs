//! The suite's JSON document: parameters, systems (and those skipped),
//! the iperf3 cross-check's set-up, figures, every run, the values,
//! medians and ratios, and where it is written
//! (`results/<date>-<suite>.json` unless `--json`).

use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::measure::Measured;
use super::peers::Peers;
use super::stats::{medians, ratios};
use super::suite::Suite;
use super::{Args, Settings};
use crate::common::Result;
use crate::sys;

/// The document of a finished suite run; `wall` is when the run started.
pub(super) fn suite_document(
    a: &Args,
    settings: &Settings,
    peers: &Peers,
    measured: Measured,
    wall: Instant,
) -> Result<Value> {
    let Settings {
        duration,
        warmup,
        relay_cpu,
        load_cpu,
        private_netns: netns,
    } = *settings;
    let Peers {
        relays,
        present,
        skipped,
        iperf,
    } = peers;
    let Measured {
        runs,
        orders,
        values,
    } = measured;
    let names: Vec<String> = present.iter().map(|k| k.name().to_string()).collect();
    let udp = matches!(a.suite, Suite::Udp | Suite::UdpCi);
    let figures = a.suite.figures();
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
        "iperf": iperf.json(duration, warmup),
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
    Ok(doc)
}

/// Writes `doc` to `--json`, or to `results/<date>-<suite>.json`; returns
/// the path.
pub(super) fn write_document(a: &Args, doc: &Value) -> Result<PathBuf> {
    let date = doc["date"].as_str().unwrap_or_default();
    let json_path = a.json.clone().unwrap_or_else(|| {
        a.results_dir
            .join(format!("{date}-{}.json", a.suite.name()))
    });
    if let Some(dir) = json_path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)?;
        }
    }
    std::fs::write(&json_path, serde_json::to_string_pretty(doc)? + "\n")
        .map_err(|e| format!("{}: {e}", json_path.display()))?;
    Ok(json_path)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(951_782_400), "2000-02-29");
        assert_eq!(utc_date(1_795_531_872), "2026-11-24");
    }
}
