//! The RFC 1928 §7 UDP request header: `RSV(2) FRAG ATYP DST.ADDR DST.PORT DATA`.
//!
//! Unlike the TCP messages a datagram arrives whole, so running out of bytes
//! is an error (`Truncated`), never "incomplete". The encoder writes into a
//! caller-provided slice because the relay builds the header in place in
//! front of the payload inside a ring buffer, with no allocation.

use std::net::SocketAddr;

use super::addr::Addr;
use super::codec::Decoded;
use super::error::ProtoError;

/// Largest possible header: RSV(2) FRAG ATYP LEN + 255-byte domain + PORT.
pub const MAX_UDP_HEADER_LEN: usize = 262;

/// Header length for an IPv4 (10) or IPv6 (22) source address.
pub const MAX_UDP_IP_HEADER_LEN: usize = 22;

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct UdpHeader {
    pub frag: u8,
    pub dst: Addr,
}

/// Decodes the header of a whole datagram; returns it and the offset of
/// `DATA`. Fragment reassembly is not done here: the caller decides what to
/// do with `frag != 0` (RFC 1928 allows dropping such datagrams).
pub fn decode_udp_header(datagram: &[u8]) -> Result<(UdpHeader, usize), ProtoError> {
    let Some(head) = datagram.get(..3) else {
        return Err(ProtoError::Truncated);
    };
    if let Some(&r) = head[..2].iter().find(|&&r| r != 0) {
        return Err(ProtoError::BadReserved(r));
    }
    match Addr::decode(&datagram[3..])? {
        Decoded::Incomplete => Err(ProtoError::Truncated),
        Decoded::Done(dst, n) => Ok((UdpHeader { frag: head[2], dst }, 3 + n)),
    }
}

/// Writes the header for a datagram coming back from `src` into the start
/// of `out` and returns its length (10 for IPv4, 22 for IPv6).
///
/// # Panics
/// If `out` is shorter than the header; [`MAX_UDP_IP_HEADER_LEN`] always
/// suffices.
pub fn encode_udp_header(frag: u8, src: &SocketAddr, out: &mut [u8]) -> usize {
    out[0] = 0;
    out[1] = 0;
    out[2] = frag;
    let n = match src {
        SocketAddr::V4(sa) => {
            out[3] = 0x01;
            out[4..8].copy_from_slice(&sa.ip().octets());
            8
        }
        SocketAddr::V6(sa) => {
            out[3] = 0x04;
            out[4..20].copy_from_slice(&sa.ip().octets());
            20
        }
    };
    out[n..n + 2].copy_from_slice(&src.port().to_be_bytes());
    n + 2
}

/// Appends a header with any address type, domain names included: what a
/// client (loadgen, tests) sends to the relay.
pub fn encode_udp_header_addr(frag: u8, dst: &Addr, out: &mut Vec<u8>) {
    out.reserve(3 + dst.encoded_len());
    out.extend_from_slice(&[0, 0, frag]);
    dst.encode(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_layout() {
        let dg = [0, 0, 0, 0x01, 8, 8, 8, 8, 0x00, 0x35, b'h', b'i'];
        let (h, off) = decode_udp_header(&dg).unwrap();
        assert_eq!(off, 10);
        assert_eq!(&dg[off..], b"hi");
        assert_eq!(h.frag, 0);
        assert_eq!(h.dst, Addr::Ip("8.8.8.8:53".parse().unwrap()));
        let mut out = [0xEE; 22];
        let n = encode_udp_header(0, &"8.8.8.8:53".parse().unwrap(), &mut out);
        assert_eq!(&out[..n], &dg[..10]);
    }

    #[test]
    fn ipv6_layout() {
        let mut dg = vec![0, 0, 0, 0x04];
        dg.extend_from_slice(&[
            0x20, 0x01, 0x48, 0x60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x88, 0x88,
        ]);
        dg.extend_from_slice(&[0x00, 0x35]);
        let src: SocketAddr = "[2001:4860::8888]:53".parse().unwrap();
        let (h, off) = decode_udp_header(&dg).unwrap();
        assert_eq!((h.dst, off), (Addr::Ip(src), 22));
        let mut out = [0u8; 22];
        assert_eq!(encode_udp_header(0, &src, &mut out), 22);
        assert_eq!(&out[..], &dg[..]);
    }

    #[test]
    fn domain_and_frag() {
        let mut dg = vec![0, 0, 3, 0x03, 1, b'a', 0, 7];
        let (h, off) = decode_udp_header(&dg).unwrap();
        assert_eq!(h.frag, 3);
        assert_eq!(h.dst, Addr::domain(b"a", 7).unwrap());
        assert_eq!(off, 8);
        let mut out = Vec::new();
        encode_udp_header_addr(3, &h.dst, &mut out);
        assert_eq!(out, dg);
        // Worst case length.
        dg = vec![0, 0, 0, 0x03, 255];
        dg.extend_from_slice(&[b'd'; 255]);
        dg.extend_from_slice(&[0, 1]);
        assert_eq!(dg.len(), MAX_UDP_HEADER_LEN);
        assert_eq!(decode_udp_header(&dg).unwrap().1, MAX_UDP_HEADER_LEN);
    }

    #[test]
    fn errors() {
        assert_eq!(decode_udp_header(&[]), Err(ProtoError::Truncated));
        assert_eq!(decode_udp_header(&[0, 0]), Err(ProtoError::Truncated));
        assert_eq!(decode_udp_header(&[0, 0, 0]), Err(ProtoError::Truncated));
        assert_eq!(
            decode_udp_header(&[0, 0, 0, 1, 1, 2, 3, 4, 0]),
            Err(ProtoError::Truncated)
        );
        assert_eq!(
            decode_udp_header(&[0, 0, 0, 3, 5, b'a']),
            Err(ProtoError::Truncated)
        );
        assert_eq!(
            decode_udp_header(&[1, 0, 0, 1]),
            Err(ProtoError::BadReserved(1))
        );
        assert_eq!(
            decode_udp_header(&[0, 9, 0, 1]),
            Err(ProtoError::BadReserved(9))
        );
        assert_eq!(
            decode_udp_header(&[0, 0, 0, 2]),
            Err(ProtoError::UnsupportedAtyp(2))
        );
        assert_eq!(
            decode_udp_header(&[0, 0, 0, 3, 0, 0, 0]),
            Err(ProtoError::EmptyDomain)
        );
    }
}
