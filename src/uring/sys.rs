//! System calls and socket set-up with no safe std or socket2 equivalent: file limits (through
//! the `rlimit` crate), SIGPIPE, waiting for SIGINT/SIGTERM, UDP GRO, and the UDP sockets of
//! an association.

use std::io;

/// Raises RLIMIT_NOFILE's soft limit as far as allowed: to `fs.nr_open` when the process may
/// raise the hard limit (CAP_SYS_RESOURCE), else to the hard limit. Returns the new soft limit.
pub fn raise_nofile() -> io::Result<u64> {
    let (_, hard) = rlimit::Resource::NOFILE.get()?;
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(hard);
    if nr_open > hard && rlimit::Resource::NOFILE.set(nr_open, nr_open).is_ok() {
        return Ok(nr_open);
    }
    rlimit::increase_nofile_limit(hard)
}

/// The current soft RLIMIT_NOFILE.
pub fn nofile_soft() -> u64 {
    rlimit::Resource::NOFILE
        .get()
        .map_or(1024, |(soft, _)| soft)
}

/// Socket buffer sizes asked for UDP sockets (the kernel caps them at net.core.[rw]mem_max).
const UDP_SOCK_BUF: usize = 4 << 20;

/// A UDP socket bound to `bind`: an unspecified IPv6 address binds dual-stack (IPv4 peers as
/// IPv4-mapped), any other IPv6 address IPv6-only. UDP GRO is on (where the kernel has it),
/// and the socket buffers are large, for bursts.
pub(crate) fn udp_socket(
    bind: std::net::SocketAddr,
    device: Option<&str>,
) -> io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))?;
    if bind.is_ipv6() {
        s.set_only_v6(!bind.ip().is_unspecified())?;
    }
    if let Some(dev) = device {
        s.bind_device(Some(dev.as_bytes()))?;
    }
    s.bind(&bind.into())?;
    let _ = s.set_recv_buffer_size(UDP_SOCK_BUF);
    let _ = s.set_send_buffer_size(UDP_SOCK_BUF);
    // Without GRO (an old kernel) every receive is one datagram, and nothing else changes.
    let _ = set_udp_gro(&s);
    Ok(s)
}

/// Turns on UDP GRO for `sock`: the kernel may then hand one receive several datagrams of one
/// flow, back to back, with their segment size in a `UDP_GRO` control message (a sender's GSO
/// burst arrives as it was sent). socket2 has no setter for it.
pub(crate) fn set_udp_gro(sock: &impl std::os::fd::AsRawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from the int we pass; the fd is
    // borrowed from a live socket.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_GRO,
            &on as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A peer that resets while we splice into it must give EPIPE, not kill the process.
pub fn ignore_sigpipe() {
    // SAFETY: setting a signal's disposition to SIG_IGN has no memory effects.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

fn control_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread and every thread it starts
/// afterwards, so that [`wait_signal`] alone receives them.
pub fn block_control_signals() {
    let set = control_set();
    // SAFETY: pthread_sigmask reads the set we pass; the old mask is not wanted.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Waits for SIGINT, SIGTERM or SIGHUP and returns its number.
pub fn wait_signal() -> i32 {
    let set = control_set();
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: sigwait reads the set and writes the signal number into `sig`.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            return sig;
        }
    }
}
