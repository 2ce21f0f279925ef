//! The sans-IO rules of a UDP association: who may send to it ([`ClientFilter`]) and the
//! RFC 1928 §7 fragment reassembly queue ([`Reassembler`]).
//!
//! Both are pure state machines over addresses, bytes and instants, so the relay
//! (`relay::udp`) only feeds them what arrived and acts on the answer, and every rule here is
//! unit- and property-tested without sockets.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::addr::Addr;

/// Largest UDP payload a reassembled datagram may have (65,535 minus the 8-byte UDP header).
pub const MAX_REASSEMBLED: usize = 65_527;

/// End-of-sequence bit of the FRAG field.
pub const FRAG_END: u8 = 0x80;

/// Who may send datagrams to an association (`--udp-client-check`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClientCheck {
    /// The endpoint named in the request when it is plausible (the control connection's peer
    /// IP, or the unspecified IP, with a non-zero port); otherwise the first datagram from the
    /// peer IP fixes it. Only that one endpoint may send.
    #[default]
    Strict,
    /// Any port on the control connection's peer IP; replies go to the latest sender.
    PeerIp,
    /// Ignore the request; the first datagram from the peer IP fixes the endpoint.
    First,
    /// Any source; replies go to the latest sender (clients behind a NAT that changes the IP).
    Off,
}

/// Compares IPs with IPv4-mapped IPv6 addresses taken as the IPv4 they carry.
fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    a.to_canonical() == b.to_canonical()
}

/// Decides which datagrams arriving at the client-facing socket come from the client, and
/// where datagrams for the client go.
#[derive(Clone, Debug)]
pub struct ClientFilter {
    mode: ClientCheck,
    peer_ip: IpAddr,
    /// The one endpoint that may send (Strict, First), once known.
    fixed: Option<SocketAddr>,
    /// The latest accepted sender (PeerIp, Off).
    last: Option<SocketAddr>,
}

impl ClientFilter {
    /// `peer_ip` is the control connection's peer; `requested` is the request's DST.
    pub fn new(mode: ClientCheck, peer_ip: IpAddr, requested: &Addr) -> ClientFilter {
        let fixed = match (mode, requested) {
            (ClientCheck::Strict, Addr::Ip(a))
                if a.port() != 0 && (a.ip().is_unspecified() || same_ip(a.ip(), peer_ip)) =>
            {
                Some(SocketAddr::new(peer_ip, a.port()))
            }
            _ => None,
        };
        ClientFilter {
            mode,
            peer_ip,
            fixed,
            last: None,
        }
    }

    /// True if a datagram from `src` is the client's; may fix or update the client endpoint.
    pub fn admit(&mut self, src: SocketAddr) -> bool {
        match self.mode {
            ClientCheck::Strict | ClientCheck::First => match self.fixed {
                Some(f) => f.port() == src.port() && same_ip(f.ip(), src.ip()),
                None if same_ip(src.ip(), self.peer_ip) => {
                    self.fixed = Some(src);
                    true
                }
                None => false,
            },
            ClientCheck::PeerIp if !same_ip(src.ip(), self.peer_ip) => false,
            ClientCheck::PeerIp | ClientCheck::Off => {
                self.last = Some(src);
                true
            }
        }
    }

    /// Where datagrams for the client go; `None` until the client is known.
    pub fn reply_to(&self) -> Option<SocketAddr> {
        match self.mode {
            ClientCheck::Strict | ClientCheck::First => self.fixed,
            ClientCheck::PeerIp | ClientCheck::Off => self.last,
        }
    }
}

/// What one fragment did to the queue.
#[derive(Debug, PartialEq, Eq)]
pub enum FragStep {
    /// Queued; the sequence is not complete yet.
    Queued,
    /// The sequence is complete: send `payload` to `dst` (the first fragment's destination).
    Complete { dst: Addr, payload: Vec<u8> },
    /// This many fragments were discarded (queued ones included): out of order, too large,
    /// over the memory budget, or malformed.
    Dropped(u32),
}

/// One reassembly queue per association (RFC 1928 §7): fragments 1, 2, 3... in order, the
/// last with [`FRAG_END`] set. A FRAG not above the last one starts over; a gap, an expired
/// timer or a size past [`MAX_REASSEMBLED`] discards the queue.
#[derive(Debug, Default)]
pub struct Reassembler {
    /// Position of the last queued fragment (0: queue empty).
    last: u8,
    dst: Option<Addr>,
    payload: Vec<u8>,
    started: Option<Instant>,
}

impl Reassembler {
    /// Bytes held by the queue (for the shard-wide budget).
    pub fn held(&self) -> usize {
        self.payload.len()
    }

    /// When the queue's timer expires, if a sequence is in progress.
    pub fn deadline(&self, timeout: Duration) -> Option<Instant> {
        self.started.map(|s| s + timeout)
    }

    /// Empties the queue; returns how many fragments it held.
    pub fn reset(&mut self) -> u32 {
        let n = u32::from(self.last);
        self.last = 0;
        self.dst = None;
        self.payload = Vec::new();
        self.started = None;
        n
    }

    /// Discards the queue if its timer expired at `now`; returns the fragments discarded.
    pub fn expire(&mut self, now: Instant, timeout: Duration) -> u32 {
        match self.started {
            Some(s) if now >= s + timeout => self.reset(),
            _ => 0,
        }
    }

    /// Feeds one fragment (`frag != 0`). `room` is how many more bytes the shard lets
    /// reassembly hold.
    pub fn push(
        &mut self,
        frag: u8,
        dst: &Addr,
        data: &[u8],
        now: Instant,
        timeout: Duration,
        room: usize,
    ) -> FragStep {
        let discarded = self.expire(now, timeout);
        let pos = frag & !FRAG_END;
        let end = frag & FRAG_END != 0;
        let mut dropped = discarded;
        if pos == 0 {
            // 0x80 alone: an end marker with no position is malformed.
            return FragStep::Dropped(dropped + 1);
        }
        if self.last != 0 && pos != self.last + 1 {
            // Lower or equal: a new sequence starts (RFC 1928 §7). Higher: a gap, the sequence
            // can never complete.
            dropped += self.reset();
        }
        if self.last == 0 && pos != 1 {
            return FragStep::Dropped(dropped + 1);
        }
        if self.payload.len() + data.len() > MAX_REASSEMBLED || data.len() > room {
            return FragStep::Dropped(dropped + self.reset() + 1);
        }
        if self.last == 0 {
            self.dst = Some(dst.clone());
            self.started = Some(now);
        }
        self.payload.extend_from_slice(data);
        self.last = pos;
        if !end {
            return if dropped > 0 {
                FragStep::Dropped(dropped)
            } else {
                FragStep::Queued
            };
        }
        let dst = self.dst.take().expect("set with the first fragment");
        let payload = std::mem::take(&mut self.payload);
        self.reset();
        FragStep::Complete { dst, payload }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Addr {
        Addr::Ip(sa(s))
    }

    const PEER: &str = "10.0.0.5";

    fn filter(mode: ClientCheck, req: &str) -> ClientFilter {
        ClientFilter::new(mode, PEER.parse().unwrap(), &ip(req))
    }

    #[test]
    fn strict_uses_a_plausible_requested_endpoint() {
        let mut f = filter(ClientCheck::Strict, "10.0.0.5:4000");
        assert_eq!(f.reply_to(), Some(sa("10.0.0.5:4000")));
        assert!(!f.admit(sa("10.0.0.5:4001")), "another port of the peer");
        assert!(!f.admit(sa("10.0.0.6:4000")), "another host");
        assert!(f.admit(sa("10.0.0.5:4000")));
        // The unspecified IP with a port means "the peer, this port" (PySocks sends this).
        let mut f = filter(ClientCheck::Strict, "0.0.0.0:4000");
        assert!(f.admit(sa("10.0.0.5:4000")));
        assert!(!f.admit(sa("10.0.0.5:4001")));
    }

    #[test]
    fn strict_falls_back_to_the_first_datagram_from_the_peer() {
        for req in ["0.0.0.0:0", "192.0.2.1:53", "10.0.0.5:0"] {
            let mut f = filter(ClientCheck::Strict, req);
            assert_eq!(f.reply_to(), None, "{req}");
            assert!(!f.admit(sa("10.0.0.9:4000")), "{req}: not the peer IP");
            assert!(f.admit(sa("10.0.0.5:4000")), "{req}");
            assert!(f.admit(sa("10.0.0.5:4000")), "{req}");
            assert!(!f.admit(sa("10.0.0.5:4001")), "{req}: fixed by the first");
            assert_eq!(f.reply_to(), Some(sa("10.0.0.5:4000")));
        }
    }

    #[test]
    fn first_ignores_the_request() {
        let mut f = filter(ClientCheck::First, "10.0.0.5:4000");
        assert_eq!(f.reply_to(), None);
        assert!(f.admit(sa("10.0.0.5:5000")));
        assert!(!f.admit(sa("10.0.0.5:4000")));
    }

    #[test]
    fn peer_ip_and_off_follow_the_latest_sender() {
        let mut f = filter(ClientCheck::PeerIp, "10.0.0.5:4000");
        assert!(f.admit(sa("10.0.0.5:4000")));
        assert!(f.admit(sa("10.0.0.5:4001")));
        assert_eq!(f.reply_to(), Some(sa("10.0.0.5:4001")));
        assert!(!f.admit(sa("10.0.0.6:4001")));
        let mut f = filter(ClientCheck::Off, "0.0.0.0:0");
        assert!(f.admit(sa("192.0.2.7:9")));
        assert_eq!(f.reply_to(), Some(sa("192.0.2.7:9")));
    }

    #[test]
    fn v4_mapped_sources_match_a_v4_peer() {
        let mut f = filter(ClientCheck::Strict, "0.0.0.0:0");
        assert!(f.admit(sa("[::ffff:10.0.0.5]:4000")));
        assert!(f.admit(sa("10.0.0.5:4000")));
    }

    const T: Duration = Duration::from_secs(5);
    const ROOM: usize = 1 << 20;

    #[test]
    fn three_fragments_reassemble_to_the_first_destination() {
        let now = Instant::now();
        let mut r = Reassembler::default();
        let d1 = ip("192.0.2.1:53");
        assert_eq!(r.push(1, &d1, b"ab", now, T, ROOM), FragStep::Queued);
        assert_eq!(r.held(), 2);
        let other = ip("192.0.2.2:53");
        assert_eq!(r.push(2, &other, b"cd", now, T, ROOM), FragStep::Queued);
        assert_eq!(
            r.push(3 | FRAG_END, &other, b"ef", now, T, ROOM),
            FragStep::Complete {
                dst: d1,
                payload: b"abcdef".to_vec()
            }
        );
        assert_eq!(r.held(), 0);
        assert_eq!(r.deadline(T), None);
    }

    #[test]
    fn expired_gapped_and_restarted_sequences_are_discarded() {
        let now = Instant::now();
        let d = ip("192.0.2.1:53");
        let mut r = Reassembler::default();
        // Timer: fragments 1 and 2, then the last one after the timeout.
        r.push(1, &d, b"a", now, T, ROOM);
        r.push(2, &d, b"b", now, T, ROOM);
        assert_eq!(r.deadline(T), Some(now + T));
        assert_eq!(
            r.push(3 | FRAG_END, &d, b"c", now + T, T, ROOM),
            FragStep::Dropped(3)
        );
        assert_eq!(r.held(), 0);
        // Gap: 1 then 3.
        r.push(1, &d, b"a", now, T, ROOM);
        assert_eq!(r.push(3, &d, b"c", now, T, ROOM), FragStep::Dropped(2));
        // A lower FRAG restarts: 1, 2, then 1 again starts a new sequence.
        r.push(1, &d, b"a", now, T, ROOM);
        r.push(2, &d, b"b", now, T, ROOM);
        assert_eq!(r.push(1, &d, b"x", now, T, ROOM), FragStep::Dropped(2));
        assert_eq!(
            r.push(2 | FRAG_END, &d, b"y", now, T, ROOM),
            FragStep::Complete {
                dst: d.clone(),
                payload: b"xy".to_vec()
            }
        );
        // 0x80 alone and a sequence not starting at 1.
        assert_eq!(
            r.push(FRAG_END, &d, b"z", now, T, ROOM),
            FragStep::Dropped(1)
        );
        assert_eq!(r.push(2, &d, b"z", now, T, ROOM), FragStep::Dropped(1));
    }

    #[test]
    fn memory_is_bounded() {
        let now = Instant::now();
        let d = ip("192.0.2.1:53");
        let mut r = Reassembler::default();
        let big = vec![0u8; 40_000];
        assert_eq!(r.push(1, &d, &big, now, T, ROOM), FragStep::Queued);
        assert_eq!(r.push(2, &d, &big, now, T, ROOM), FragStep::Dropped(2));
        assert_eq!(r.held(), 0);
        // The shard budget.
        assert_eq!(r.push(1, &d, b"abc", now, T, 2), FragStep::Dropped(1));
        assert_eq!(r.held(), 0);
    }

    proptest! {
        /// Whatever fragments arrive, the queue never holds more than the cap, never
        /// panics, and completes only a sequence that started at 1 and ended with the bit.
        #[test]
        fn any_fragment_stream_is_safe(
            frags in proptest::collection::vec((1u8..=255, 0usize..30_000, 0u64..8), 0..40)
        ) {
            let start = Instant::now();
            let d = ip("192.0.2.1:53");
            let mut r = Reassembler::default();
            for (frag, len, secs) in frags {
                let now = start + Duration::from_secs(secs);
                let data = vec![frag; len];
                let step = r.push(frag, &d, &data, now, T, ROOM);
                prop_assert!(r.held() <= MAX_REASSEMBLED);
                if let FragStep::Complete { payload, .. } = &step {
                    prop_assert!(frag & FRAG_END != 0);
                    prop_assert!(payload.len() <= MAX_REASSEMBLED);
                }
            }
        }
    }
}
