//! Socket addresses as the kernel lays them out (`sockaddr_in`, `sockaddr_in6`), read from
//! byte buffers: the source address a multishot recvmsg stores in a provided buffer (and, for
//! tests, written the same way). Plain byte shuffling, no `unsafe`.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

#[cfg(test)]
pub(crate) const SOCKADDR_IN_LEN: usize = 16;
#[cfg(test)]
pub(crate) const SOCKADDR_IN6_LEN: usize = 28;

/// Writes `addr` at the start of `out` and returns its length (16 or 28).
///
/// # Panics
/// If `out` is shorter than that.
#[cfg(test)]
pub(crate) fn write_sockaddr(addr: &SocketAddr, out: &mut [u8]) -> usize {
    match addr {
        SocketAddr::V4(a) => {
            let out = &mut out[..SOCKADDR_IN_LEN];
            out[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            out[2..4].copy_from_slice(&a.port().to_be_bytes());
            out[4..8].copy_from_slice(&a.ip().octets());
            out[8..16].fill(0);
            SOCKADDR_IN_LEN
        }
        SocketAddr::V6(a) => {
            let out = &mut out[..SOCKADDR_IN6_LEN];
            out[0..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
            out[2..4].copy_from_slice(&a.port().to_be_bytes());
            out[4..8].copy_from_slice(&a.flowinfo().to_be_bytes());
            out[8..24].copy_from_slice(&a.ip().octets());
            out[24..28].copy_from_slice(&a.scope_id().to_ne_bytes());
            SOCKADDR_IN6_LEN
        }
    }
}

/// Reads a socket address written by the kernel; `None` for other families or short input.
/// IPv4-mapped IPv6 addresses (from a dual-stack socket) come back as plain IPv4.
pub(crate) fn read_sockaddr(b: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes(b.get(0..2)?.try_into().ok()?);
    let port = u16::from_be_bytes(b.get(2..4)?.try_into().ok()?);
    if family == libc::AF_INET as u16 {
        let ip: [u8; 4] = b.get(4..8)?.try_into().ok()?;
        return Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)));
    }
    if family == libc::AF_INET6 as u16 {
        let ip: [u8; 16] = b.get(8..24)?.try_into().ok()?;
        let ip = Ipv6Addr::from(ip);
        if let Some(v4) = ip.to_ipv4_mapped() {
            return Some(SocketAddr::V4(SocketAddrV4::new(v4, port)));
        }
        let flow = u32::from_be_bytes(b.get(4..8)?.try_into().ok()?);
        let scope = u32::from_ne_bytes(b.get(24..28)?.try_into().ok()?);
        return Some(SocketAddr::V6(SocketAddrV6::new(ip, port, flow, scope)));
    }
    None
}

/// `addr` as a dual-stack IPv6 socket can send to it (IPv4 becomes IPv4-mapped).
pub(crate) fn to_dual_stack(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) => {
            SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
        }
        v6 => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_matches_socket2() {
        for s in ["192.0.2.1:53", "[2001:db8::1]:5353", "[fe80::1%2]:9"] {
            let a: SocketAddr = s.parse().unwrap();
            let mut buf = [0xAAu8; 64];
            let n = write_sockaddr(&a, &mut buf);
            let sa = socket2::SockAddr::from(a);
            assert_eq!(n, sa.len() as usize, "{s}");
            assert_eq!(read_sockaddr(&buf[..n]), Some(a), "{s}");
            // Same bytes as socket2's conversion (which goes through libc's structs).
            // SAFETY: `as_ptr` points at `len` initialised bytes of `sa`, alive for this scope.
            let theirs = unsafe { std::slice::from_raw_parts(sa.as_ptr() as *const u8, n) };
            assert_eq!(&buf[..n], theirs, "{s}");
        }
    }

    #[test]
    fn mapped_v4_reads_as_v4_and_dual_stack_maps_back() {
        let v4: SocketAddr = "127.0.0.1:7".parse().unwrap();
        let mapped = to_dual_stack(v4);
        assert!(mapped.is_ipv6());
        let mut buf = [0u8; 28];
        let n = write_sockaddr(&mapped, &mut buf);
        assert_eq!(read_sockaddr(&buf[..n]), Some(v4));
        assert_eq!(read_sockaddr(&[0, 0]), None);
        assert_eq!(read_sockaddr(&[]), None);
    }
}
