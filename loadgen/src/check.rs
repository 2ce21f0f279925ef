//! check and baseline: the CI regression check on `loadgen compare` output.
//!
//! Only ratios are compared, never absolute numbers: each ringsocks figure
//! divided by the same figure of a reference measured in the same suite
//! run (direct loopback, and the peers where present). A figure regresses
//! when its ratio is worse than the baseline's by more than the figure's
//! tolerance, which the baseline file itself documents. "Worse" follows
//! the figure's direction: for throughput and conn/s a lower ratio is
//! worse; for latency and CPU cost a higher one is, so those ratios are
//! inverted before comparing (goodness = reference / ringsocks).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{json, Value};

use crate::common::Result;
use crate::compare::{figure, figures_of, median, Better};

#[derive(clap::Args, Debug, Clone)]
pub struct CheckArgs {
    /// Baseline (results/baseline.json)
    #[arg(long, value_name = "FILE")]
    pub baseline: PathBuf,
    /// Suite JSON of this run (`loadgen compare --json FILE`)
    #[arg(long, value_name = "FILE")]
    pub current: PathBuf,
}

#[derive(clap::Args, Debug, Clone)]
pub struct BaselineArgs {
    /// Write the baseline here; tolerances already in it are kept
    #[arg(long, value_name = "FILE", default_value = "results/baseline.json")]
    pub out: PathBuf,
    /// Override a tolerance, e.g. `--tolerance cps=0.4` (fraction)
    #[arg(long, value_name = "FIGURE=FRACTION")]
    pub tolerance: Vec<String>,
    /// Suite JSONs of 3 or more runs of the same suite
    #[arg(required = true, value_name = "SUITE_JSON")]
    pub runs: Vec<PathBuf>,
}

/// Default tolerance of a figure (a fraction of the baseline ratio).
pub fn default_tolerance(key: &str) -> f64 {
    if key.starts_with("tput") || key.starts_with("bidir") {
        0.25
    } else {
        0.40
    }
}

/// Higher is better for the returned value, whatever the figure.
pub fn goodness(better: Better, ratio: f64) -> f64 {
    match better {
        Better::Higher => ratio,
        Better::Lower => 1.0 / ratio,
    }
}

fn read_json(p: &PathBuf) -> Result<Value> {
    let t = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
    Ok(serde_json::from_str(&t).map_err(|e| format!("{}: {e}", p.display()))?)
}

/// The ratio keys the check uses: ringsocks over a reference
/// (`ringsocks-<path>/...` in the TCP suites, `ringsocks/...` in udp).
fn checked_key(k: &str) -> bool {
    k.starts_with("ringsocks-") || k.starts_with("ringsocks/")
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Ok,
    Regressed,
    /// The ringsocks figure is missing from the current run.
    Missing,
    /// The reference is not in the current run (e.g. microsocks not installed).
    Skipped,
}

#[derive(Debug, Clone)]
pub struct Row {
    pub key: String,
    pub figure: &'static str,
    pub base: f64,
    pub current: Option<f64>,
    /// goodness(current) / goodness(base) − 1; negative is worse.
    pub change: Option<f64>,
    pub tolerance: f64,
    pub verdict: Verdict,
}

/// Compares the ratios of `current` (a suite document) with the baseline.
pub fn compare_docs(base: &Value, current: &Value) -> Result<Vec<Row>> {
    if base["suite"] != current["suite"] {
        return Err(format!(
            "baseline is of suite {}, the current run of suite {}: ratios are not comparable",
            base["suite"], current["suite"]
        )
        .into());
    }
    let present: Vec<&str> = current["systems"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["name"].as_str()).collect())
        .unwrap_or_default();
    let mut rows = Vec::new();
    let ratios = base["ratios"].as_object().ok_or("baseline has no ratios")?;
    for (key, figs) in ratios {
        if !checked_key(key) {
            continue;
        }
        let (a, b) = key.split_once('/').ok_or("bad ratio key")?;
        for (fkey, bv) in figs.as_object().into_iter().flatten() {
            let (Some(f), Some(bv)) = (figure(fkey), bv.as_f64()) else {
                continue;
            };
            let Some(tol) = base["tolerances"][fkey]["tolerance"].as_f64() else {
                continue;
            };
            let cur = current["ratios"][key][fkey].as_f64();
            let (change, verdict) = if !present.contains(&b) {
                (None, Verdict::Skipped)
            } else if !present.contains(&a) {
                (None, Verdict::Missing)
            } else {
                match cur {
                    Some(c) if c > 0.0 && bv > 0.0 => {
                        let ch = goodness(f.better, c) / goodness(f.better, bv) - 1.0;
                        let v = if ch < -tol {
                            Verdict::Regressed
                        } else {
                            Verdict::Ok
                        };
                        (Some(ch), v)
                    }
                    _ => (None, Verdict::Missing),
                }
            };
            rows.push(Row {
                key: key.clone(),
                figure: f.key,
                base: bv,
                current: cur,
                change,
                tolerance: tol,
                verdict,
            });
        }
    }
    Ok(rows)
}

pub fn table(rows: &[Row]) -> String {
    let mut s = format!(
        "{:<30} {:<16} {:>9} {:>9} {:>8} {:>6}  {}\n",
        "ratio", "figure", "baseline", "current", "change", "tol", "verdict"
    );
    for r in rows {
        let better = figure(r.figure).map_or("", |f| match f.better {
            Better::Higher => "↑",
            Better::Lower => "↓",
        });
        s += &format!(
            "{:<30} {:<16} {:>9.3} {:>9} {:>8} {:>5.0}%  {}\n",
            r.key,
            format!("{} {better}", r.figure),
            r.base,
            r.current.map_or("–".into(), |c| format!("{c:.3}")),
            r.change
                .map_or("–".into(), |c| format!("{:+.1}%", c * 100.0)),
            r.tolerance * 100.0,
            match r.verdict {
                Verdict::Ok => "ok",
                Verdict::Regressed => "REGRESSED",
                Verdict::Missing => "MISSING",
                Verdict::Skipped => "skipped (reference not in this run)",
            }
        );
    }
    s
}

pub fn run_check(a: &CheckArgs) -> Result<()> {
    let base = read_json(&a.baseline)?;
    let cur = read_json(&a.current)?;
    let rows = compare_docs(&base, &cur)?;
    println!(
        "perf check: {} (git {}) against baseline {} (git {})",
        a.current.display(),
        cur["system"]["git"].as_str().unwrap_or("?"),
        a.baseline.display(),
        base["git"].as_str().unwrap_or("?"),
    );
    println!(
        "change = how much better (+) or worse (-) the ratio is than the baseline's, \
         in the figure's direction (↑ higher is better, ↓ lower is better)\n"
    );
    print!("{}", table(&rows));
    let bad: Vec<&Row> = rows
        .iter()
        .filter(|r| matches!(r.verdict, Verdict::Regressed | Verdict::Missing))
        .collect();
    if rows.iter().all(|r| r.verdict == Verdict::Skipped) {
        return Err("nothing was compared".into());
    }
    if !bad.is_empty() {
        println!("\nREGRESSIONS ({}):", bad.len());
        for r in &bad {
            println!(
                "  {} {}: {} (baseline {:.3}, tolerance {:.0}%)",
                r.key,
                r.figure,
                r.change.map_or("missing in this run".into(), |c| format!(
                    "{:+.1}%",
                    c * 100.0
                )),
                r.base,
                r.tolerance * 100.0
            );
        }
        return Err(format!("{} ratio(s) regressed beyond tolerance", bad.len()).into());
    }
    println!(
        "\nperf check passed: {} ratios within tolerance",
        rows.iter().filter(|r| r.verdict == Verdict::Ok).count()
    );
    Ok(())
}

/// Variation of one figure's ratios over several suite runs: the largest
/// drop of one run below the median of the runs (in goodness terms) and
/// the largest (max − min) / median, over all checked ratio keys.
pub fn variation(better: Better, runs: &[f64]) -> (f64, f64) {
    let g: Vec<f64> = runs
        .iter()
        .filter(|r| **r > 0.0)
        .map(|&r| goodness(better, r))
        .collect();
    let Some(m) = median(&g) else {
        return (0.0, 0.0);
    };
    let min = g.iter().copied().fold(f64::INFINITY, f64::min);
    let max = g.iter().copied().fold(0.0, f64::max);
    ((1.0 - min / m).max(0.0), (max - min) / m)
}

pub fn run_baseline(a: &BaselineArgs) -> Result<()> {
    if a.runs.len() < 3 {
        eprintln!("baseline: warning: fewer than 3 suite runs; the variation is a weak guide");
    }
    let docs: Vec<Value> = a.runs.iter().map(read_json).collect::<Result<_>>()?;
    let suite = docs[0]["suite"].clone();
    let figures = figures_of(suite.as_str().unwrap_or(""));
    if docs.iter().any(|d| d["suite"] != suite) {
        return Err("all runs must be of the same suite".into());
    }
    let old = read_json(&a.out).ok();
    let mut overrides: BTreeMap<String, f64> = BTreeMap::new();
    for t in &a.tolerance {
        let (k, v) = t
            .split_once('=')
            .ok_or_else(|| format!("--tolerance {t}: want FIGURE=FRACTION"))?;
        figure(k).ok_or_else(|| format!("--tolerance {t}: unknown figure"))?;
        overrides.insert(k.into(), v.parse().map_err(|_| format!("--tolerance {t}"))?);
    }
    // Per ratio key and figure: one value per run.
    let mut per: BTreeMap<String, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    for d in &docs {
        for (key, figs) in d["ratios"].as_object().into_iter().flatten() {
            if !checked_key(key) {
                continue;
            }
            for f in figures {
                if let Some(v) = figs[f.key].as_f64() {
                    per.entry(key.clone())
                        .or_default()
                        .entry(f.key.into())
                        .or_default()
                        .push(v);
                }
            }
        }
    }
    let mut ratios = serde_json::Map::new();
    for (key, figs) in &per {
        let mut o = serde_json::Map::new();
        for (k, v) in figs {
            o.insert(k.clone(), json!(median(v)));
        }
        ratios.insert(key.clone(), Value::Object(o));
    }
    let mut tolerances = serde_json::Map::new();
    for f in figures {
        let (mut drop, mut spread) = (0.0f64, 0.0f64);
        let mut worst = String::new();
        for (key, figs) in &per {
            if let Some(v) = figs.get(f.key) {
                let (d, s) = variation(f.better, v);
                if d > drop {
                    worst = key.clone();
                }
                drop = drop.max(d);
                spread = spread.max(s);
            }
        }
        let old_t = old
            .as_ref()
            .and_then(|o| o["tolerances"][f.key].clone().into());
        // A tolerance of null in the existing file means "not checked" (kept).
        let unchecked = !overrides.contains_key(f.key)
            && old_t
                .as_ref()
                .is_some_and(|t: &Value| t.get("tolerance").is_some_and(Value::is_null));
        let tol = overrides
            .get(f.key)
            .copied()
            .or_else(|| old_t.as_ref().and_then(|t: &Value| t["tolerance"].as_f64()))
            .unwrap_or_else(|| default_tolerance(f.key));
        let note = old_t
            .as_ref()
            .and_then(|t: &Value| t["note"].as_str().map(String::from))
            .unwrap_or_default();
        if !unchecked && drop > tol * 0.8 {
            eprintln!(
                "baseline: warning: {}: a run fell {:.0}% below the median ({worst}), \
                 close to or past the tolerance {:.0}%",
                f.key,
                drop * 100.0,
                tol * 100.0
            );
        }
        tolerances.insert(
            f.key.into(),
            json!({
                "tolerance": if unchecked { Value::Null } else { json!(tol) },
                "better": f.better.name(),
                "observed_max_drop_below_median": (drop * 1000.0).round() / 1000.0,
                "observed_max_spread": (spread * 1000.0).round() / 1000.0,
                "observed_over_runs": docs.len(),
                "note": note,
            }),
        );
    }
    let doc = json!({
        "about": "Ratios of ringsocks to references measured in the same `loadgen compare` run \
                  (medians over the runs listed in `sources`), and the tolerance per figure used \
                  by `loadgen check`: a ratio fails when it is worse than here by more than its \
                  tolerance (for figures where lower is better the ratio is inverted first). \
                  `observed_*` is the run-to-run variation of the ratios over those runs: \
                  max_drop_below_median = worst single run below the median, max_spread = \
                  (max - min) / median, over all ratios of the figure. Regenerate with \
                  `scripts/perf-check.sh --update-baseline` (see loadgen/README.md).",
        "suite": suite,
        "git": docs[0]["system"]["git"],
        "system": docs[0]["system"],
        "params": docs[0]["params"],
        "sources": docs.iter().zip(&a.runs).map(|(d, p)| json!({
            "file": p.display().to_string(), "date": d["date"], "git": d["system"]["git"],
            "wall_seconds": d["wall_seconds"],
        })).collect::<Vec<_>>(),
        "tolerances": tolerances,
        "ratios": ratios,
        "ratio_runs": per,
    });
    std::fs::write(&a.out, serde_json::to_string_pretty(&doc)? + "\n")
        .map_err(|e| format!("{}: {e}", a.out.display()))?;
    println!("wrote {} from {} runs", a.out.display(), docs.len());
    for f in figures {
        let t = &doc["tolerances"][f.key];
        println!(
            "  {:<16} tolerance {:>9}  observed: max drop below median {:>5.1}%, max spread {:>5.1}%",
            f.key,
            t["tolerance"]
                .as_f64()
                .map_or("unchecked".into(), |x| format!("{:.0}%", x * 100.0)),
            t["observed_max_drop_below_median"].as_f64().unwrap_or(0.0) * 100.0,
            t["observed_max_spread"].as_f64().unwrap_or(0.0) * 100.0
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(splice_tput: f64, splice_p50: f64) -> Value {
        json!({
            "suite": "ci",
            "systems": [{"name": "direct"}, {"name": "ringsocks-splice"}],
            "ratios": {"ringsocks-splice/direct": {
                "tput1_gbps": splice_tput, "rtt_p50_us": splice_p50}},
        })
    }

    fn base() -> Value {
        let mut b = doc(0.6, 10.0);
        b["tolerances"] = json!({
            "tput1_gbps": {"tolerance": 0.25},
            "rtt_p50_us": {"tolerance": 0.40},
        });
        b
    }

    fn verdicts(cur: &Value) -> Vec<(String, Verdict)> {
        compare_docs(&base(), cur)
            .unwrap()
            .into_iter()
            .map(|r| (r.figure.to_string(), r.verdict))
            .collect()
    }

    #[test]
    fn throughput_lower_ratio_regresses() {
        let v = verdicts(&doc(0.5, 10.0));
        assert!(v.contains(&("tput1_gbps".into(), Verdict::Ok)));
        let v = verdicts(&doc(0.4, 10.0));
        assert!(v.contains(&("tput1_gbps".into(), Verdict::Regressed)));
        // Better than the baseline is never a failure.
        let v = verdicts(&doc(5.0, 10.0));
        assert!(v.contains(&("tput1_gbps".into(), Verdict::Ok)));
    }

    #[test]
    fn latency_higher_ratio_regresses() {
        // 10x direct -> 14x: goodness 0.1 -> 0.0714, -28.6%: within 40%.
        let v = verdicts(&doc(0.6, 14.0));
        assert!(v.contains(&("rtt_p50_us".into(), Verdict::Ok)));
        // 10x -> 20x: -50%: regressed.
        let v = verdicts(&doc(0.6, 20.0));
        assert!(v.contains(&("rtt_p50_us".into(), Verdict::Regressed)));
        // Faster (lower ratio) passes.
        let v = verdicts(&doc(0.6, 2.0));
        assert!(v.contains(&("rtt_p50_us".into(), Verdict::Ok)));
    }

    #[test]
    fn missing_reference_is_skipped_missing_ringsocks_fails() {
        let mut cur = doc(0.6, 10.0);
        cur["systems"] = json!([{"name": "ringsocks-splice"}]);
        assert!(verdicts(&cur).iter().all(|(_, v)| *v == Verdict::Skipped));
        let mut cur = doc(0.6, 10.0);
        cur["ratios"]["ringsocks-splice/direct"]["tput1_gbps"] = Value::Null;
        assert!(verdicts(&cur).contains(&("tput1_gbps".into(), Verdict::Missing)));
        let mut other = doc(0.6, 10.0);
        other["suite"] = json!("full");
        assert!(compare_docs(&base(), &other).is_err());
    }

    #[test]
    fn variation_in_goodness_terms() {
        let (drop, spread) = variation(Better::Higher, &[1.0, 0.9, 1.1]);
        assert!((drop - 0.1).abs() < 1e-9 && (spread - 0.2).abs() < 1e-9);
        // Latency 10, 12.5, 8: goodness 0.1, 0.08, 0.125: drop 20%.
        let (drop, _) = variation(Better::Lower, &[10.0, 12.5, 8.0]);
        assert!((drop - 0.2).abs() < 1e-9);
    }
}
