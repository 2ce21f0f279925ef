//! The UDP echo: sockets with a receive buffer big enough for thousands of
//! datagrams in flight (`SO_RCVBUFFORCE` when allowed), optionally several
//! on one port (`SO_REUSEPORT`), and [`UdpEcho`], which sends back each
//! batch it receives. `serve` runs one blocking thread per socket; the
//! `udp` mode polls the same [`UdpEcho`] inside its own event loops.
//!
//! By default the echo sends each batch back with one `sendmmsg`, runs of
//! equal-sized datagrams to one peer as one UDP GSO message; a plain echo
//! ([`UdpEcho::new`] with `plain`) answers datagram by datagram, one
//! `sendmsg` each, like DNS, game or VoIP servers. No echo socket enables
//! UDP_GRO, so a burst that arrives is never coalesced.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use super::mmsg::{Mmsg, MMSG_BATCH};
use super::target::Counters;

/// Receive buffer of a UDP echo socket: room for tens of thousands of
/// small datagrams, or ~7000 of 1400 bytes, in flight.
pub const UDP_ECHO_RCVBUF: usize = 32 << 20;
/// Largest UDP payload (IPv4).
pub const MAX_DATAGRAM: usize = 65_507;

/// Sets SO_RCVBUF to `bytes`, past `net.core.rmem_max` with
/// SO_RCVBUFFORCE when we may (CAP_NET_ADMIN), else as far as rmem_max
/// allows. Returns the size in force (the kernel reports twice the request).
pub fn set_rcvbuf(s: &Socket, bytes: usize) -> std::io::Result<usize> {
    let v = bytes.min(i32::MAX as usize / 2) as libc::c_int;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `&v`, a valid
    // local; the fd is owned by `s` and open.
    let forced = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    } == 0;
    if !forced {
        s.set_recv_buffer_size(bytes)?;
    }
    s.recv_buffer_size()
}

/// `n` UDP sockets bound to `addr` (the first one picks the port if it is
/// 0), with SO_REUSEPORT when n > 1 so the kernel spreads peers over them,
/// and a big receive buffer each.
pub fn udp_echo_sockets(
    addr: SocketAddr,
    n: usize,
    nonblocking: bool,
) -> std::io::Result<Vec<UdpSocket>> {
    let mut out: Vec<UdpSocket> = Vec::with_capacity(n);
    let mut addr = addr;
    for _ in 0..n {
        let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        if n > 1 {
            s.set_reuse_port(true)?;
        }
        set_rcvbuf(&s, UDP_ECHO_RCVBUF)?;
        s.set_nonblocking(nonblocking)?;
        s.bind(&addr.into())?;
        let s: UdpSocket = s.into();
        addr = s.local_addr()?;
        out.push(s);
    }
    Ok(out)
}

/// A UDP echo socket with its batch buffers.
pub struct UdpEcho {
    pub sock: UdpSocket,
    mm: Mmsg,
}

impl UdpEcho {
    /// An echo on `sock`; `plain`: answer with one `sendmsg` per datagram
    /// and no GSO (receiving still batches).
    pub fn new(sock: UdpSocket, plain: bool) -> UdpEcho {
        let mut mm = Mmsg::new(MMSG_BATCH, MAX_DATAGRAM + 1);
        if plain {
            mm.set_plain();
        }
        UdpEcho { sock, mm }
    }

    /// Receives one batch and sends it back. `flags` is MSG_DONTWAIT to
    /// poll, or MSG_WAITFORONE to block for the first datagram only.
    /// Returns (datagrams, bytes) echoed; (0, 0) when nothing was queued.
    pub fn step(&mut self, flags: libc::c_int) -> std::io::Result<(usize, usize)> {
        let fd = self.sock.as_raw_fd();
        let n = self.mm.recv(fd, flags, true)?;
        if n == 0 {
            return Ok((0, 0));
        }
        let bytes = (0..n).map(|i| self.mm.datagram(i).len()).sum();
        // A peer that went away (ICMP unreachable) is no error of ours.
        let _ = self.mm.echo_back(fd, n);
        Ok((n, bytes))
    }

    /// Echoes everything queued now (non-blocking); bounded to 64 batches.
    pub fn drain(&mut self) -> (usize, usize) {
        let mut total = (0, 0);
        for _ in 0..64 {
            // An error (e.g. ECONNREFUSED from an earlier send) is skipped.
            if let Ok((n, b)) = self.step(libc::MSG_DONTWAIT) {
                total.0 += n;
                total.1 += b;
                if n < MMSG_BATCH {
                    break;
                }
            }
        }
        total
    }
}

pub(super) fn udp_echo_loop(e: &mut UdpEcho, c: &Counters) {
    loop {
        match e.step(libc::MSG_WAITFORONE) {
            Ok((n, b)) => {
                c.udp_packets.fetch_add(n as u64, Ordering::Relaxed);
                c.udp_bytes.fetch_add(b as u64, Ordering::Relaxed);
            }
            Err(_) => thread::sleep(Duration::from_millis(1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both echoes send every datagram of a burst back, separately.
    #[test]
    fn echo_answers_each_datagram() {
        for plain in [false, true] {
            let s = udp_echo_sockets(SocketAddr::from(([127, 0, 0, 1], 0)), 1, true)
                .unwrap()
                .pop()
                .unwrap();
            let at = s.local_addr().unwrap();
            let mut e = UdpEcho::new(s, plain);
            assert_eq!(e.mm.is_plain(), plain);
            let c = UdpSocket::bind("127.0.0.1:0").unwrap();
            c.connect(at).unwrap();
            for i in 0..10u8 {
                c.send(&[i; 100]).unwrap();
            }
            assert_eq!(e.drain(), (10, 1000));
            c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut buf = [0u8; 2048];
            for i in 0..10u8 {
                let n = c.recv(&mut buf).unwrap();
                assert_eq!(&buf[..n], &[i; 100][..], "plain: {plain}");
            }
        }
    }
}
