//! Facts about this machine and other processes, read from /proc.
//!
//! Everything that parses text is a pure function so it can be unit-tested.

use std::fs;
use std::io;
use std::process::Command;

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
}
