//! The one place loadgen reads /proc, through the procfs crate: the CPU
//! time, memory and fd count of a process, its descendants and its
//! executable, and the kernel and CPU named in every report. The client
//! modes, `compare` and the relay handling call these functions and parse
//! nothing themselves. It also holds the few settings loadgen changes
//! outside itself: RLIMIT_NOFILE, timer slack, and the TIME_WAIT limit of
//! `compare`'s private network namespace.
//!
//! What is computed from procfs' parsed records (tick sums, model and core
//! count) is in small pure functions, unit-tested on fixed text.

use std::fs;
use std::io;
use std::path::PathBuf;

use procfs::process::{Process, Stat};
use procfs::{CpuInfo, Current, ProcError};
use serde_json::{json, Value};

/// `USER_HZ`, the unit of utime/stime in /proc/PID/stat: 100 on every Linux
/// architecture (procfs asks sysconf(_SC_CLK_TCK)).
pub fn ticks_per_second() -> f64 {
    procfs::ticks_per_second() as f64
}

fn proc_error(e: ProcError) -> io::Error {
    io::Error::other(e)
}

fn process(pid: u32) -> io::Result<Process> {
    let id = i32::try_from(pid).map_err(|_| io::Error::other(format!("pid {pid} out of range")))?;
    Process::new(id).map_err(proc_error)
}

fn stat(pid: u32) -> io::Result<Stat> {
    process(pid)?.stat().map_err(proc_error)
}

/// utime + stime (clock ticks): the CPU of all the process's threads, also
/// those that already exited (and io_uring's `iou-wrk` workers).
pub fn own_ticks(s: &Stat) -> u64 {
    s.utime + s.stime
}

/// utime + stime + cutime + cstime (clock ticks): the process's own CPU
/// plus that of the children it has reaped.
pub fn ticks_with_reaped_children(s: &Stat) -> Option<u64> {
    let cutime = u64::try_from(s.cutime).ok()?;
    let cstime = u64::try_from(s.cstime).ok()?;
    Some(own_ticks(s) + cutime + cstime)
}

/// CPU ticks (user + system, all threads) used so far by `pid`.
pub fn cpu_ticks(pid: u32) -> io::Result<u64> {
    stat(pid).map(|s| own_ticks(&s))
}

/// CPU ticks used so far by this process (the load generator and its
/// in-process target).
pub fn self_cpu_ticks() -> u64 {
    Process::myself()
        .and_then(|p| p.stat())
        .map(|s| own_ticks(&s))
        .unwrap_or(0)
}

/// CPU ticks used so far by `pid` and the children it has reaped; None if
/// it is gone.
pub fn cpu_ticks_with_reaped_children(pid: u32) -> Option<u64> {
    stat(pid).ok().and_then(|s| ticks_with_reaped_children(&s))
}

/// Resident memory (`VmRSS`) of `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> io::Result<u64> {
    let status = process(pid)?.status().map_err(proc_error)?;
    status
        .vmrss
        .map(|kib| kib * 1024)
        .ok_or_else(|| io::Error::other(format!("/proc/{pid}/status: no VmRSS")))
}

/// Open file descriptors of `pid` (entries of /proc/PID/fd).
pub fn fd_count(pid: u32) -> io::Result<u64> {
    Ok(process(pid)?.fd_count().map_err(proc_error)? as u64)
}

/// The executable `pid` runs (/proc/PID/exe).
pub fn exe(pid: u32) -> io::Result<PathBuf> {
    process(pid)?.exe().map_err(proc_error)
}

/// Whether /proc still has `pid` (a zombie not yet reaped counts).
pub fn exists(pid: u32) -> bool {
    process(pid).is_ok()
}

/// All descendants of `pid` (children, their children, ...), from the
/// parent PID of every process in /proc.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut parent_of: Vec<(u32, u32)> = Vec::new();
    if let Ok(all) = procfs::process::all_processes() {
        for p in all.flatten() {
            let Ok(s) = p.stat() else { continue };
            if let (Ok(child), Ok(parent)) = (u32::try_from(s.pid), u32::try_from(s.ppid)) {
                parent_of.push((child, parent));
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    // Bounded: each process is added at most once (the PID tree is a tree).
    while let Some(p) = frontier.pop() {
        for &(c, pp) in &parent_of {
            if pp == p && c != pid && !out.contains(&c) {
                out.push(c);
                frontier.push(c);
            }
        }
    }
    out.sort_unstable();
    out
}

/// Sets `net.ipv4.tcp_max_tw_buckets` of the network namespace of the
/// calling thread (/proc/sys/net is the namespace of the thread that opens
/// it).
pub fn set_tcp_max_tw_buckets(n: u32) -> io::Result<()> {
    fs::write("/proc/sys/net/ipv4/tcp_max_tw_buckets", n.to_string())
}

/// The kernel release exactly as /proc/sys/kernel/osrelease has it, suffix
/// included (procfs' `KernelVersion` keeps only the numbers).
fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The CPU model (`model name` on x86, else `Model`) of the first CPU in
/// /proc/cpuinfo, and the number of `processor` entries.
pub fn cpu_model_and_count(info: &CpuInfo) -> (String, usize) {
    let model = info
        .model_name(0)
        .or_else(|| info.get_field(0, "Model"))
        .unwrap_or("unknown")
        .to_string();
    let cores = (0..info.num_cores())
        .filter(|&i| info.get_field(i, "processor").is_some())
        .count();
    (model, cores)
}

/// The `system` object of every JSON report.
pub fn system_json() -> Value {
    let kernel = kernel_release();
    let (cpu, mut cores) = CpuInfo::current()
        .map(|info| cpu_model_and_count(&info))
        .unwrap_or_else(|_| ("unknown".into(), 0));
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

/// The git revision (short hash) loadgen was built from, stamped by
/// build.rs; "unknown" if git or the repository was missing at build time.
pub fn git_revision() -> &'static str {
    match option_env!("VERGEN_GIT_SHA") {
        // vergen's placeholder when git failed.
        Some(rev) if !rev.is_empty() && rev != "VERGEN_IDEMPOTENT_OUTPUT" => rev,
        _ => "unknown",
    }
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
    use procfs::FromRead;

    use super::*;

    /// A real /proc/PID/stat line whose comm has a space and a `)`;
    /// utime 1234, stime 567, cutime 7, cstime 3, ppid 1.
    const STAT: &str = "4242 (ring socks) x) S 1 4242 4242 0 -1 4194560 2755 0 0 0 \
        1234 567 7 3 20 0 3 0 12345 123456789 2048 18446744073709551615 94176009940992 \
        94176009960873 140724830150768 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 94176009976880 \
        94176009978496 94176723472384 140724830157538 140724830157558 140724830157558 \
        140724830158827 0";

    #[test]
    fn stat_ticks_with_tricky_comm() {
        let s = Stat::from_read(STAT.as_bytes()).unwrap();
        assert_eq!(s.comm, "ring socks) x");
        assert_eq!(s.ppid, 1);
        assert_eq!(own_ticks(&s), 1234 + 567);
        assert_eq!(ticks_with_reaped_children(&s), Some(1234 + 567 + 7 + 3));
        assert!(Stat::from_read("1 (x) S 1 2".as_bytes()).is_err());
        assert!(Stat::from_read("garbage".as_bytes()).is_err());
    }

    #[test]
    fn this_process_is_readable() {
        let me = std::process::id();
        assert!(cpu_ticks(me).is_ok());
        assert!(cpu_ticks_with_reaped_children(me).is_some());
        assert!(rss_bytes(me).unwrap() > 0);
        assert!(fd_count(me).unwrap() >= 3);
        assert_eq!(exe(me).unwrap(), std::env::current_exe().unwrap());
        assert!(exists(me));
    }

    #[test]
    fn descendants_include_a_child() {
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let kids = descendants(std::process::id());
        // Ends the child we started, by its handle.
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(kids.contains(&child.id()), "{kids:?}");
    }

    #[test]
    fn git_revision_is_a_short_hash_or_unknown() {
        let rev = git_revision();
        assert!(
            rev == "unknown" || (rev.len() >= 7 && rev.chars().all(|c| c.is_ascii_hexdigit())),
            "{rev}"
        );
    }

    #[test]
    fn cpuinfo() {
        let two = "processor\t: 0\nmodel name\t: Fancy CPU @ 3GHz\n\nprocessor\t: 1\nmodel name\t: Fancy CPU @ 3GHz\n";
        let info = CpuInfo::from_read(two.as_bytes()).unwrap();
        assert_eq!(cpu_model_and_count(&info), ("Fancy CPU @ 3GHz".into(), 2));
        let one = "processor\t: 0\nModel\t: Board\n\n";
        let info = CpuInfo::from_read(one.as_bytes()).unwrap();
        assert_eq!(cpu_model_and_count(&info), ("Board".into(), 1));
        let none = CpuInfo::from_read("".as_bytes()).unwrap();
        assert_eq!(cpu_model_and_count(&none), ("unknown".into(), 0));
    }
}
