//! The one place the end-to-end tests read /proc, through the `procfs` crate: a process's
//! resident memory, open descriptors and CPU time, and the sockets of this network namespace.

use procfs::process::Process;
use std::net::SocketAddr;

fn process(pid: u32) -> Option<Process> {
    Process::new(i32::try_from(pid).ok()?).ok()
}

/// VmRSS of a process in KiB (0 if unreadable, e.g. the process is gone).
pub fn proc_rss_kib(pid: u32) -> u64 {
    process(pid)
        .and_then(|p| p.status().ok())
        .and_then(|s| s.vmrss)
        .unwrap_or(0)
}

/// Open file descriptors of a process (0 if unreadable).
pub fn proc_fd_count(pid: u32) -> usize {
    process(pid).and_then(|p| p.fd_count().ok()).unwrap_or(0)
}

/// utime + stime of a process, in clock ticks. Panics if /proc/PID/stat cannot be read.
pub fn proc_cpu_ticks(pid: u32) -> u64 {
    let stat = process(pid)
        .and_then(|p| p.stat().ok())
        .unwrap_or_else(|| panic!("cannot read /proc/{pid}/stat"));
    stat.utime + stat.stime
}

/// One socket from /proc/net/{tcp,tcp6,udp,udp6} (this network namespace, all processes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Kernel state number (TCP: 0x01 ESTABLISHED, 0x06 TIME_WAIT, 0x08 CLOSE_WAIT, 0x0A LISTEN).
    pub state: u8,
}

/// Sockets of `proto` ("tcp" or "udp"), IPv4 and IPv6: how to see sockets that a process
/// holds only in io_uring's fixed-file table (they are not in /proc/PID/fd). Panics if a
/// table cannot be read or parsed (an empty answer would pass for "no socket").
pub fn net_sockets(proto: &str) -> Vec<NetSocket> {
    let fail = |file: &str, e: procfs::ProcError| -> ! { panic!("/proc/net/{file}: {e}") };
    match proto {
        "tcp" => [("tcp", procfs::net::tcp()), ("tcp6", procfs::net::tcp6())]
            .into_iter()
            .flat_map(|(file, r)| r.unwrap_or_else(|e| fail(file, e)))
            .map(|e| NetSocket {
                local: e.local_address,
                remote: e.remote_address,
                state: e.state.to_u8(),
            })
            .collect(),
        "udp" => [("udp", procfs::net::udp()), ("udp6", procfs::net::udp6())]
            .into_iter()
            .flat_map(|(file, r)| r.unwrap_or_else(|e| fail(file, e)))
            .map(|e| NetSocket {
                local: e.local_address,
                remote: e.remote_address,
                state: e.state.to_u8(),
            })
            .collect(),
        other => panic!("net_sockets: unknown protocol {other:?}"),
    }
}
