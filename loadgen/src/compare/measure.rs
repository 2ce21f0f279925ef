//! The measurement loop: every measurement of the suite on every system,
//! repetition by repetition with the order of systems rotated, each as
//! one run of this binary in a client mode (a child process pinned to the
//! load CPU, `--json -`) or, for the iperf3 cross-check, one iperf3 run
//! (`iperf`), collecting the figures of each report.

use std::collections::BTreeMap;
use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::figures::{value_at, Figure};
use super::iperf::CrossCheck;
use super::markdown::fmt_num;
use super::peers::Peers;
use super::suite::{Measurement, Suite};
use super::{Args, Settings};
use crate::relays::{Kind, Relay};

/// What the loop collected: every run (argv, error, report), the order of
/// systems in each repetition, and the values per system and figure.
pub(super) struct Measured {
    pub runs: Vec<Value>,
    pub orders: Vec<Vec<&'static str>>,
    pub values: BTreeMap<String, BTreeMap<String, Vec<f64>>>,
}

/// Runs every measurement of `a.suite` on every system present,
/// `a.reps` times.
pub(super) fn measure_all(a: &Args, settings: &Settings, peers: &Peers) -> Measured {
    let Settings {
        duration,
        warmup,
        load_cpu,
        ..
    } = *settings;
    let Peers {
        relays,
        present,
        iperf,
        ..
    } = peers;
    let limit = Duration::from_secs_f64(duration + warmup + 30.0);
    let mut runs = Vec::new();
    let mut orders = Vec::new();
    let mut values: BTreeMap<String, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    let udp = matches!(a.suite, Suite::Udp | Suite::UdpCi);
    let figures = a.suite.figures();
    // The cross-check's runs only when iperf3 and proxychains4 are there.
    let measurements: Vec<Measurement> = a
        .suite
        .measurements()
        .iter()
        .copied()
        .filter(|m| !m.is_iperf() || matches!(iperf, CrossCheck::Ready(_)))
        .collect();
    let total = a.reps * measurements.len() * present.len();
    let mut done = 0;
    for rep in 0..a.reps {
        let order = rotation(present, rep);
        orders.push(order.iter().map(|k| k.name()).collect::<Vec<_>>());
        for &m in &measurements {
            for &k in &order {
                let (argv, report, error, cpu_note) = match (m.is_iperf(), iperf) {
                    (true, CrossCheck::Ready(ip)) => {
                        let (argv, report, error) =
                            ip.run(m, relays.get(k.name()), duration, warmup, limit);
                        (argv, report, error, Value::Null)
                    }
                    _ => measure_loadgen(m, k, relays, udp, duration, warmup, load_cpu, limit),
                };
                done += 1;
                let line = format!(
                    "[{done}/{total}] rep {} {:<12} {:<17}",
                    rep + 1,
                    m.name(),
                    k.name()
                );
                let line = collect(line, k.name(), m, &report, &error, &mut values, figures);
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
    Measured {
        runs,
        orders,
        values,
    }
}

/// One loadgen run of measurement `m` on system `k` (through its relay, or direct): the
/// command, its report or error, and a note when the relay's CPU figure had to be dropped.
#[allow(clippy::too_many_arguments)]
fn measure_loadgen(
    m: Measurement,
    k: Kind,
    relays: &BTreeMap<&'static str, Relay>,
    udp: bool,
    duration: f64,
    warmup: f64,
    load_cpu: usize,
    limit: Duration,
) -> (Vec<String>, Option<Value>, Option<String>, Value) {
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
    (argv, report, error, cpu_note)
}

/// Adds the figures of `m` in `report` to `values` of `system`, and them
/// (or the error) to the progress `line`.
fn collect(
    mut line: String,
    system: &str,
    m: Measurement,
    report: &Option<Value>,
    error: &Option<String>,
    values: &mut BTreeMap<String, BTreeMap<String, Vec<f64>>>,
    figures: &[Figure],
) -> String {
    if let Some(rep_json) = report {
        for f in figures.iter().filter(|f| f.from == m) {
            if let Some(v) = value_at(rep_json, f) {
                values
                    .entry(system.to_string())
                    .or_default()
                    .entry(f.key.to_string())
                    .or_default()
                    .push(v);
                line += &format!(" {} {}", f.key, fmt_num(v));
            }
        }
    }
    if let Some(e) = error {
        line += &format!("  ERROR {e}");
    }
    line
}

/// `base` rotated left by `r`: the order of systems in repetition `r`.
pub fn rotation<T: Clone>(base: &[T], r: usize) -> Vec<T> {
    let n = base.len();
    (0..n).map(|i| base[(i + r) % n].clone()).collect()
}

/// Runs one loadgen client mode as a child process and returns its report.
pub(super) fn run_loadgen(argv: &[String], limit: Duration) -> (Option<Value>, Option<String>) {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return (None, Some(format!("current_exe: {e}"))),
    };
    let mut cmd = Command::new(exe);
    cmd.args(argv);
    let (stdout, stderr, status) = match run_capture(cmd, limit) {
        Ok(x) => x,
        Err(e) => return (None, Some(e)),
    };
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

/// Runs `cmd` (stdin closed) and returns its stdout, its stderr and its
/// exit status: `None` if it ran past `limit` and was killed (by its PID).
pub(super) fn run_capture(
    mut cmd: Command,
    limit: Duration,
) -> std::result::Result<(String, String, Option<ExitStatus>), String> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = child.map_err(|e| format!("spawn: {e}"))?;
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
    Ok((stdout, stderr, status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_by_repetition() {
        assert_eq!(rotation(&[1, 2, 3], 1), vec![2, 3, 1]);
        assert_eq!(rotation(&[1, 2, 3], 3), vec![1, 2, 3]);
    }
}
