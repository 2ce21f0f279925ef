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
        libc::sigaddset(&mut set, libc::SIGUSR1);
        set
    }
}

/// Blocks SIGINT, SIGTERM, SIGHUP and SIGUSR1 in the calling thread and every thread it starts
/// afterwards, so that [`wait_signal`] alone receives them.
pub fn block_control_signals() {
    let set = control_set();
    // SAFETY: pthread_sigmask reads the set we pass; the old mask is not wanted.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Waits for SIGINT, SIGTERM, SIGHUP or SIGUSR1 and returns its number.
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

/// The first descriptor a socket-activating service manager passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: libc::c_int = 3;

/// Takes the sockets a service manager passed to this process, with the semantics of
/// `sd_listen_fds(3)` (`unset_environment` true): when `LISTEN_PID` names this process and
/// `LISTEN_FDS=N` (N >= 1), descriptors 3 .. 3+N become this process's, close-on-exec. Not
/// socket-activated (no `LISTEN_PID`, another process's, or no `LISTEN_FDS`): an empty `Vec`.
///
/// `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` are removed from the environment in every
/// case, as `sd_listen_fds` with a non-zero `unset_environment` does, so a second call (or a
/// child) cannot take the same descriptors again.
///
/// Errors (`InvalidInput`, naming the variable): `LISTEN_PID` or `LISTEN_FDS` not a number,
/// `LISTEN_FDS` below 1 or too large; a descriptor in the range not open (`EBADF`, naming it).
///
/// The caller must call this before any thread is started: it changes the environment, which
/// is only sound while no other thread reads it (`std::env::remove_var` is `unsafe` from
/// edition 2024 on for that reason), and it must be the one owner of descriptors 3 .. 3+N.
pub fn take_listen_fds() -> io::Result<Vec<std::os::fd::OwnedFd>> {
    let taken = listen_fds_for(std::process::id());
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    taken
}

fn listen_fds_for(pid: u32) -> io::Result<Vec<std::os::fd::OwnedFd>> {
    use std::os::fd::FromRawFd;
    let n = listen_fd_count(
        std::env::var_os("LISTEN_PID").as_deref(),
        std::env::var_os("LISTEN_FDS").as_deref(),
        pid,
    )?;
    // Check every descriptor before owning any: an OwnedFd must be an open descriptor.
    for fd in LISTEN_FDS_START..LISTEN_FDS_START + n {
        // SAFETY: F_GETFD only reads the descriptor flags of `fd`; on a descriptor that is not
        // open it fails with EBADF and touches nothing.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("socket activation: LISTEN_FDS={n}, but descriptor {fd}: {e}"),
            ));
        }
        // SAFETY: F_SETFD only sets the descriptor flags of the open descriptor `fd`.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("socket activation: close-on-exec on descriptor {fd}: {e}"),
            ));
        }
    }
    Ok((LISTEN_FDS_START..LISTEN_FDS_START + n)
        // SAFETY: each fd is open (checked above) and, by the sd_listen_fds protocol
        // (LISTEN_PID is this process), passed to this process alone: nothing else in the
        // process owns it, and `take_listen_fds` removes the variables so no one takes it twice.
        .map(|fd| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
        .collect())
}

/// How many descriptors `LISTEN_PID` and `LISTEN_FDS` pass to process `pid` (0: none).
fn listen_fd_count(
    listen_pid: Option<&std::ffi::OsStr>,
    listen_fds: Option<&std::ffi::OsStr>,
    pid: u32,
) -> io::Result<libc::c_int> {
    let invalid = |var: &str, value: &str, why: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket activation: {var}={value:?}: {why}"),
        )
    };
    let Some(listen_pid) = listen_pid else {
        return Ok(0);
    };
    let listen_pid = listen_pid.to_string_lossy();
    let for_pid: u32 = listen_pid
        .parse()
        .map_err(|_| invalid("LISTEN_PID", &listen_pid, "not a process id"))?;
    if for_pid != pid {
        return Ok(0);
    }
    let Some(listen_fds) = listen_fds else {
        return Ok(0);
    };
    let listen_fds = listen_fds.to_string_lossy();
    let n: libc::c_int = listen_fds
        .parse()
        .map_err(|_| invalid("LISTEN_FDS", &listen_fds, "not a number"))?;
    if !(1..=libc::c_int::MAX - LISTEN_FDS_START).contains(&n) {
        return Err(invalid(
            "LISTEN_FDS",
            &listen_fds,
            "not a count of passed sockets (1 or more)",
        ));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::listen_fd_count;
    use std::ffi::OsStr;
    use std::io::ErrorKind;

    fn count(pid: Option<&str>, fds: Option<&str>) -> std::io::Result<i32> {
        listen_fd_count(pid.map(OsStr::new), fds.map(OsStr::new), 4242)
    }

    #[test]
    fn listen_fds_are_ours_only_when_listen_pid_is_this_process() {
        assert_eq!(count(None, None).unwrap(), 0);
        assert_eq!(count(None, Some("2")).unwrap(), 0);
        assert_eq!(count(Some("4243"), Some("2")).unwrap(), 0);
        assert_eq!(count(Some("4242"), None).unwrap(), 0);
        assert_eq!(count(Some("4242"), Some("1")).unwrap(), 1);
        assert_eq!(count(Some("4242"), Some("3")).unwrap(), 3);
    }

    #[test]
    fn malformed_listen_variables_are_errors_naming_the_variable() {
        for (pid, fds, var) in [
            ("x", "1", "LISTEN_PID"),
            ("", "1", "LISTEN_PID"),
            ("4242", "two", "LISTEN_FDS"),
            ("4242", "", "LISTEN_FDS"),
            ("4242", "0", "LISTEN_FDS"),
            ("4242", "-1", "LISTEN_FDS"),
            ("4242", "2147483647", "LISTEN_FDS"),
        ] {
            let e = count(Some(pid), Some(fds)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{pid} {fds}");
            assert!(e.to_string().contains(var), "{e}");
        }
    }
}
