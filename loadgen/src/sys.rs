//! Facts about this machine and other processes, read from /proc.
//!
//! Everything that parses text is a pure function so it can be unit-tested.

use std::fs;
use std::io;
use std::process::Command;
use std::time::Instant;

use serde_json::{json, Value};

/// `USER_HZ`, the unit of utime/stime in /proc/PID/stat. It is 100 on every
/// Linux architecture we run on (checked with `getconf CLK_TCK` on the
/// benchmark machine); reading it via sysconf would need an `unsafe` call.
pub const CLK_TCK: f64 = 100.0;

/// utime + stime (clock ticks) from the text of /proc/PID/stat.
///
/// The command name (field 2) is in parentheses and may itself contain
/// spaces and parentheses, so fields are counted from the *last* `)`.
/// After it come field 3 (state) onwards; utime and stime are fields 14, 15.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// CPU ticks (user + system, all threads) used so far by `pid`.
pub fn cpu_ticks(pid: u32) -> io::Result<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat_ticks(&text)
        .ok_or_else(|| io::Error::other(format!("/proc/{pid}/stat: cannot parse")))
}

/// CPU ticks used so far by this process (the load generator and its
/// in-process target).
pub fn self_cpu_ticks() -> u64 {
    fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|t| parse_stat_ticks(&t))
        .unwrap_or(0)
}

/// `VmRSS` in KiB from the text of /proc/PID/status.
pub fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line["VmRSS:".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub fn rss_bytes(pid: u32) -> io::Result<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_vm_rss_kib(&text)
        .map(|k| k * 1024)
        .ok_or_else(|| io::Error::other(format!("/proc/{pid}/status: no VmRSS")))
}

pub fn fd_count(pid: u32) -> io::Result<u64> {
    Ok(fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64)
}

/// First `model name` (x86) or `Model`/`CPU part` line of /proc/cpuinfo,
/// and the number of `processor` entries.
pub fn parse_cpuinfo(text: &str) -> (String, usize) {
    let mut model = None;
    let mut cores = 0;
    for line in text.lines() {
        let Some((key, val)) = line.split_once(':') else {
            continue;
        };
        let key = key.trim();
        if key == "processor" {
            cores += 1;
        } else if model.is_none() && (key == "model name" || key == "Model") {
            model = Some(val.trim().to_string());
        }
    }
    (model.unwrap_or_else(|| "unknown".into()), cores)
}

/// The `system` object of every JSON report.
pub fn system_json() -> Value {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let (cpu, mut cores) = parse_cpuinfo(&fs::read_to_string("/proc/cpuinfo").unwrap_or_default());
    if cores == 0 {
        cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    }
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    json!({
        "kernel": kernel,
        "cpu": cpu,
        "cores": cores,
        "profile": profile,
        "git": git_revision(),
    })
}

fn git_revision() -> String {
    // The source checkout this binary was built from first, then the
    // current directory.
    for dir in [env!("CARGO_MANIFEST_DIR"), "."] {
        let out = Command::new("git")
            .args(["-C", dir, "rev-parse", "--short", "HEAD"])
            .output();
        if let Ok(out) = out {
            if out.status.success() {
                let rev = String::from_utf8_lossy(&out.stdout).trim().to_string();
                if !rev.is_empty() {
                    return rev;
                }
            }
        }
    }
    "unknown".into()
}

/// Raises RLIMIT_NOFILE (soft, and hard if needed and allowed) to at least
/// `want`. Returns the soft limit in force afterwards.
pub fn raise_nofile(want: u64) -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the rlimit struct we pass, which is
    // a valid, properly aligned local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur >= want {
        return Ok(lim.rlim_cur);
    }
    let mut new = libc::rlimit {
        rlim_cur: want,
        rlim_max: lim.rlim_max.max(want),
    };
    // SAFETY: setrlimit only reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
        // Not allowed to raise the hard limit: go as far as it permits.
        new.rlim_cur = lim.rlim_max;
        new.rlim_max = lim.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(new.rlim_cur)
}

/// Makes timed sleeps of this thread (and threads it spawns afterwards)
/// wake up on time instead of up to 50 µs late, for open-loop pacing.
pub fn tight_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes plain integers and touches no memory.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

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
                relay.map(|t| t as f64 / CLK_TCK)
            },
            self_seconds: (self_cpu_ticks().saturating_sub(self.self_start)) as f64 / CLK_TCK,
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
    fn stat_ticks_with_tricky_comm() {
        // Real layout; comm contains a space and a ')'.
        let stat = "4242 (ring socks) x) S 1 4242 4242 0 -1 4194560 2755 0 0 0 \
                    1234 567 0 0 20 0 3 0 12345 123456789 2048 18446744073709551615";
        assert_eq!(parse_stat_ticks(stat), Some(1234 + 567));
        assert_eq!(parse_stat_ticks("1 (x) S 1 2"), None);
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn stat_ticks_of_self() {
        assert!(cpu_ticks(std::process::id()).is_ok());
    }

    #[test]
    fn status_and_cpuinfo() {
        let status = "Name:\tringsocks\nVmPeak:\t  9999 kB\nVmRSS:\t    5120 kB\nThreads: 3\n";
        assert_eq!(parse_vm_rss_kib(status), Some(5120));
        assert_eq!(parse_vm_rss_kib("Name: x\n"), None);
        let cpuinfo = "processor\t: 0\nmodel name\t: Fancy CPU @ 3GHz\n\nprocessor\t: 1\nmodel name\t: Fancy CPU @ 3GHz\n";
        assert_eq!(parse_cpuinfo(cpuinfo), ("Fancy CPU @ 3GHz".into(), 2));
    }

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
