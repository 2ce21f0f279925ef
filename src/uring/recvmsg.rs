//! The layout of a buffer that a multishot recvmsg filled: `io_uring_recvmsg_out` (16 bytes),
//! the source address in a [`NAME_LEN`] area, the control data in a [`CONTROL_LEN`] area, then
//! the payload at [`PAYLOAD_OFF`]. The areas are fixed by the ring's recvmsg template, so the
//! payload always starts at the same offset and a relay can build a header and a destination
//! address in front of it without moving it.

use std::net::SocketAddr;

use super::sockaddr::read_sockaddr;

/// `msg_namelen` of the template: room for any socket address we receive (a `sockaddr_in6` is
/// 28 bytes) plus slack.
pub(crate) const NAME_LEN: u32 = 64;
/// `msg_controllen` of the template: one `cmsghdr` with an int, `CMSG_SPACE(4)`. The only
/// control message a relay socket gets is `UDP_GRO` (the segment size of a coalesced receive).
pub(crate) const CONTROL_LEN: u32 = 24;
/// Where the name area starts.
pub(crate) const NAME_OFF: u32 = 16;
/// Where the control data starts.
pub(crate) const CONTROL_OFF: u32 = NAME_OFF + NAME_LEN;
/// Where the payload starts.
pub(crate) const PAYLOAD_OFF: u32 = CONTROL_OFF + CONTROL_LEN;
const _: () = assert!(std::mem::size_of::<libc::cmsghdr>() + 4 <= CONTROL_LEN as usize);

/// What the header of a receive into a provided buffer says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct RecvMsg {
    pub src: Option<SocketAddr>,
    /// Payload bytes `PAYLOAD_OFF..end` of the buffer.
    pub end: u32,
    pub truncated: bool,
    /// With UDP GRO, the receive holds several datagrams of `gso` bytes each, back to back
    /// (the last may be shorter); 0 when it holds one.
    pub gso: u32,
}

impl RecvMsg {
    /// Reads the header of `buf`, which a recvmsg completion with result `res` filled.
    pub(crate) fn parse(buf: &[u8], res: u32) -> RecvMsg {
        let word = |i: usize| {
            buf.get(i..i + 4)
                .map_or(0, |b| u32::from_ne_bytes(b.try_into().expect("4 bytes")))
        };
        let namelen = word(0).min(NAME_LEN) as usize;
        let controllen = word(4) as usize;
        let flags = word(12) as i32;
        let name = buf
            .get(NAME_OFF as usize..NAME_OFF as usize + namelen)
            .unwrap_or(&[]);
        let end = res.clamp(PAYLOAD_OFF, buf.len().max(PAYLOAD_OFF as usize) as u32);
        // One cmsghdr (len: usize, level: i32, type: i32) and its int, if the kernel wrote it.
        let c = CONTROL_OFF as usize;
        let word_at = |i: usize| word(c + i) as i32;
        let gso = if controllen >= 20 && word_at(8) == libc::SOL_UDP && word_at(12) == libc::UDP_GRO
        {
            // A segment size covering the whole payload means one datagram.
            match word_at(16) {
                g if g > 0 && (g as u32) < end - PAYLOAD_OFF => g as u32,
                _ => 0,
            }
        } else {
            0
        };
        RecvMsg {
            src: read_sockaddr(name),
            end,
            truncated: flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0,
            gso,
        }
    }

    /// How many datagrams the receive holds.
    pub(crate) fn datagrams(&self) -> u64 {
        let len = self.end - PAYLOAD_OFF;
        match self.gso {
            0 => 1,
            g => u64::from(len.div_ceil(g).max(1)),
        }
    }
}

/// Writes what a recvmsg completion would leave in `buf` for a datagram (or GRO burst of
/// `gso`-byte segments) from `src`, and returns the completion's result. For tests and the
/// fake engine.
#[cfg(test)]
pub(crate) fn fill(buf: &mut [u8], src: SocketAddr, payload: &[u8], gso: u32) -> u32 {
    let n = super::sockaddr::write_sockaddr(&src, &mut buf[NAME_OFF as usize..]);
    buf[0..4].copy_from_slice(&(n as u32).to_ne_bytes());
    buf[12..16].copy_from_slice(&0u32.to_ne_bytes());
    let c = CONTROL_OFF as usize;
    if gso == 0 {
        buf[4..8].copy_from_slice(&0u32.to_ne_bytes());
    } else {
        buf[4..8].copy_from_slice(&20u32.to_ne_bytes());
        buf[c..c + 8].copy_from_slice(&20usize.to_ne_bytes());
        buf[c + 8..c + 12].copy_from_slice(&libc::SOL_UDP.to_ne_bytes());
        buf[c + 12..c + 16].copy_from_slice(&libc::UDP_GRO.to_ne_bytes());
        buf[c + 16..c + 20].copy_from_slice(&(gso as i32).to_ne_bytes());
    }
    let p = PAYLOAD_OFF as usize;
    buf[p..p + payload.len()].copy_from_slice(payload);
    (p + payload.len()) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_parsed() {
        let mut buf = vec![0u8; 256];
        let src: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        let res = fill(&mut buf, src, b"hello", 0);
        let m = RecvMsg::parse(&buf, res);
        assert_eq!(m.src, Some(src));
        assert_eq!(m.end, PAYLOAD_OFF + 5);
        assert!(!m.truncated);
        buf[12..16].copy_from_slice(&(libc::MSG_TRUNC as u32).to_ne_bytes());
        assert!(RecvMsg::parse(&buf, PAYLOAD_OFF).truncated);
        // A result beyond the buffer (a broken kernel) is clamped, not trusted.
        assert_eq!(RecvMsg::parse(&buf, 1 << 20).end, 256);
    }

    #[test]
    fn gro_segment_size_is_read_from_the_control_area() {
        let mut buf = vec![0u8; 4096];
        let src: SocketAddr = "[2001:db8::1]:53".parse().unwrap();
        let res = fill(&mut buf, src, &[7; 1050], 100);
        let m = RecvMsg::parse(&buf, res);
        assert_eq!((m.gso, m.datagrams(), m.src), (100, 11, Some(src)));
        // A segment size covering the payload: one datagram.
        let m = RecvMsg::parse(&buf, PAYLOAD_OFF + 100);
        assert_eq!((m.gso, m.datagrams()), (0, 1));
        // Another control message, or none: one datagram.
        let c = CONTROL_OFF as usize;
        buf[c + 12..c + 16].copy_from_slice(&libc::IP_TOS.to_ne_bytes());
        assert_eq!(RecvMsg::parse(&buf, res).gso, 0);
        fill(&mut buf, src, &[7; 1050], 0);
        assert_eq!(RecvMsg::parse(&buf, res).gso, 0);
    }
}
