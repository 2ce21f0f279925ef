//! What a datagram carries and what a reply must be: the 24-byte stamp at
//! the start of every payload (send time, sequence number, association),
//! and [`check_reply`], which strips the RFC 1928 header of a proxied
//! reply and accepts it only if it is whole, names the target and comes
//! back to the association that sent it.

use std::net::SocketAddr;

use ringsocks::proto::udp::decode_udp_header;
use ringsocks::proto::Addr;

/// Bytes of the stamp at the start of every payload.
pub const STAMP_LEN: usize = 24;
const MAGIC: u32 = 0x5544_5031; // "UDP1"
pub(super) const FILL: u8 = 0x5a;

/// What a datagram carries about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Send time, nanoseconds since the run's base instant.
    pub sent_ns: u64,
    /// Per association, from 0.
    pub seq: u64,
    /// Index of the association that sent it.
    pub assoc: u32,
}

/// Writes the stamp into the first `STAMP_LEN` bytes of `out`.
pub fn encode_stamp(s: &Stamp, out: &mut [u8]) {
    out[0..8].copy_from_slice(&s.sent_ns.to_le_bytes());
    out[8..16].copy_from_slice(&s.seq.to_le_bytes());
    out[16..20].copy_from_slice(&s.assoc.to_le_bytes());
    out[20..24].copy_from_slice(&MAGIC.to_le_bytes());
}

/// The stamp at the start of a payload, or None if it is too short or
/// does not carry our magic.
pub fn decode_stamp(b: &[u8]) -> Option<Stamp> {
    let b = b.get(..STAMP_LEN)?;
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    (u32_at(20) == MAGIC).then(|| Stamp {
        sent_ns: u64_at(0),
        seq: u64_at(8),
        assoc: u32_at(16),
    })
}

/// Checks a reply received by association `assoc`: not cut off, with an
/// RFC 1928 header naming `target` when proxied (stripped), and a payload
/// of `size` bytes stamped by this association.
pub fn check_reply(
    dg: &[u8],
    truncated: bool,
    target: Option<&SocketAddr>,
    assoc: u32,
    size: usize,
) -> std::result::Result<Stamp, String> {
    if truncated {
        return Err("reply longer than expected (truncated)".into());
    }
    let payload = match target {
        None => dg,
        Some(t) => {
            let (h, off) = decode_udp_header(dg).map_err(|e| format!("reply header: {e}"))?;
            if h.frag != 0 {
                return Err(format!("reply with FRAG {}", h.frag));
            }
            if h.dst != Addr::Ip(*t) {
                return Err(format!("reply header names {}, not the target {t}", h.dst));
            }
            &dg[off..]
        }
    };
    if payload.len() != size {
        return Err(format!(
            "reply payload {} bytes, sent {size}",
            payload.len()
        ));
    }
    let st = decode_stamp(payload).ok_or("reply without our stamp")?;
    if st.assoc != assoc {
        return Err(format!(
            "reply of association {} came to association {assoc}",
            st.assoc
        ));
    }
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringsocks::proto::udp::encode_udp_header_addr;

    #[test]
    fn stamp_round_trip() {
        let s = Stamp {
            sent_ns: 0x0102_0304_0506_0708,
            seq: u64::MAX - 3,
            assoc: 1999,
        };
        let mut b = vec![FILL; 64];
        encode_stamp(&s, &mut b);
        assert_eq!(decode_stamp(&b), Some(s));
        assert_eq!(decode_stamp(&b[..STAMP_LEN]), Some(s));
        assert_eq!(decode_stamp(&b[..STAMP_LEN - 1]), None);
        b[21] ^= 1; // magic
        assert_eq!(decode_stamp(&b), None);
        assert_eq!(decode_stamp(&[FILL; 64]), None);
    }

    #[test]
    fn replies_are_checked_and_stripped() {
        let target: SocketAddr = "127.0.0.1:7007".parse().unwrap();
        let st = Stamp {
            sent_ns: 5,
            seq: 1,
            assoc: 3,
        };
        let mut payload = vec![FILL; 64];
        encode_stamp(&st, &mut payload);
        assert_eq!(check_reply(&payload, false, None, 3, 64), Ok(st));
        assert!(check_reply(&payload, true, None, 3, 64).is_err());
        assert!(check_reply(&payload, false, None, 4, 64)
            .unwrap_err()
            .contains("association 3"));
        assert!(check_reply(&payload[..40], false, None, 3, 64).is_err());
        let mut dg = Vec::new();
        encode_udp_header_addr(0, &Addr::Ip(target), &mut dg);
        assert_eq!(dg.len(), 10);
        dg.extend_from_slice(&payload);
        assert_eq!(check_reply(&dg, false, Some(&target), 3, 64), Ok(st));
        let other: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert!(check_reply(&dg, false, Some(&other), 3, 64)
            .unwrap_err()
            .contains("not the target"));
        // Without the header the payload is not a valid header.
        assert!(check_reply(&payload, false, Some(&target), 3, 64).is_err());
        dg[2] = 1; // FRAG
        assert!(check_reply(&dg, false, Some(&target), 3, 64).is_err());
    }
}
