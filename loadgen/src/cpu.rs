//! CPU accounting over a measured interval: the relay's (the `--pid`
//! processes, read through [`crate::sys`]) and loadgen's own, and how each
//! client mode reports them (the `relay_cpu` JSON object, the summary
//! lines). `udp` measures the relay's whole process tree instead, with its
//! own meter, but reports through [`CpuUsage`] as well.

use std::io;
use std::time::Instant;

use serde_json::{json, Value};

use crate::sys::{cpu_ticks, self_cpu_ticks, ticks_per_second};

/// CPU used by the `--pid` processes (the relay) and by ourselves over the
/// measured interval.
pub struct CpuMeter {
    pids: Vec<u32>,
    start: Vec<u64>,
    self_start: u64,
    t0: Instant,
}

pub struct CpuUsage {
    pub pids: Vec<u32>,
    /// None when there were no `--pid`s or one vanished.
    pub relay_seconds: Option<f64>,
    pub self_seconds: f64,
    pub elapsed: f64,
}

impl CpuMeter {
    /// Checks that every pid is readable, so a typo fails before the run.
    pub fn check(pids: &[u32]) -> io::Result<()> {
        for &p in pids {
            cpu_ticks(p).map_err(|e| io::Error::other(format!("--pid {p}: {e}")))?;
        }
        Ok(())
    }

    pub fn start(pids: &[u32]) -> CpuMeter {
        CpuMeter {
            pids: pids.to_vec(),
            start: pids.iter().map(|&p| cpu_ticks(p).unwrap_or(0)).collect(),
            self_start: self_cpu_ticks(),
            t0: Instant::now(),
        }
    }

    pub fn stop(&self) -> CpuUsage {
        let elapsed = self.t0.elapsed().as_secs_f64();
        let mut relay = Some(0u64);
        for (&p, &s) in self.pids.iter().zip(&self.start) {
            relay = match (relay, cpu_ticks(p)) {
                (Some(acc), Ok(now)) => Some(acc + now.saturating_sub(s)),
                _ => {
                    eprintln!("loadgen: warning: pid {p} vanished; no relay CPU figure");
                    None
                }
            };
        }
        CpuUsage {
            pids: self.pids.clone(),
            relay_seconds: if self.pids.is_empty() {
                None
            } else {
                relay.map(|t| t as f64 / ticks_per_second())
            },
            self_seconds: (self_cpu_ticks().saturating_sub(self.self_start)) as f64
                / ticks_per_second(),
            elapsed,
        }
    }
}

impl CpuUsage {
    /// The `relay_cpu` JSON object (or null): CPU seconds, utilization (cores
    /// busy on average) and the cost per unit for each `(name, amount)`,
    /// e.g. `("per_gb", gigabytes)`; a cost is null when its amount is 0.
    pub fn relay_json(&self, per: &[(&str, f64)]) -> Value {
        let Some(cpu) = self.relay_seconds else {
            return Value::Null;
        };
        let mut obj = json!({
            "pid": self.pids[0],
            "pids": self.pids,
            "cpu_seconds": cpu,
            "interval_seconds": self.elapsed,
            "utilization": if self.elapsed > 0.0 { cpu / self.elapsed } else { 0.0 },
        });
        for &(name, amount) in per {
            obj[name] = if amount > 0.0 {
                json!(cpu / amount)
            } else {
                Value::Null
            };
        }
        obj
    }

    /// The CPU part of a summary: the relay line (when `--pid` was given) and loadgen's own.
    pub fn summary_lines(&self, per: &[(&str, f64, f64)]) -> String {
        let mut s = String::new();
        if let Some(l) = self.relay_line(per) {
            s += &l;
            s.push('\n');
        }
        s += &format!("loadgen CPU {:.2} s\n", self.self_seconds);
        s
    }

    /// One summary line, e.g. `relay CPU 1.23 s (24.6% of a core), 0.05 s/GB`.
    pub fn relay_line(&self, per: &[(&str, f64, f64)]) -> Option<String> {
        let cpu = self.relay_seconds?;
        let mut line = format!(
            "relay CPU {cpu:.2} s ({:.1}% of a core)",
            100.0 * cpu / self.elapsed.max(1e-9)
        );
        // (unit, amount, display scale)
        for &(unit, amount, scale) in per {
            if amount > 0.0 {
                line += &format!(", {:.3} {unit}", cpu / amount * scale);
            }
        }
        Some(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_json_costs() {
        let u = CpuUsage {
            pids: vec![7],
            relay_seconds: Some(2.0),
            self_seconds: 1.0,
            elapsed: 4.0,
        };
        let j = u.relay_json(&[("per_gb", 10.0), ("per_conn", 0.0)]);
        assert_eq!(j["pid"], 7);
        assert_eq!(j["cpu_seconds"], 2.0);
        assert_eq!(j["utilization"], 0.5);
        assert_eq!(j["per_gb"], 0.2);
        assert!(j["per_conn"].is_null());
        let none = CpuUsage {
            relay_seconds: None,
            ..u
        };
        assert!(none.relay_json(&[]).is_null());
    }
}
