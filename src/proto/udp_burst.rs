//! The byte shuffling of UDP GRO bursts in a UDP ASSOCIATE relay, sans-IO.
//!
//! With UDP GRO one receive holds several datagrams of `seg` bytes back to
//! back (the last may be shorter), and with UDP GSO one send carries several
//! datagrams of `seg` bytes. The relay rewrites a burst in place inside its
//! receive buffer so it can leave in as few GSO sends ([`Run`]s) as possible:
//!
//! - client -> target ([`strip_client_burst`]): every datagram carries its
//!   own SOCKS UDP request header; the payloads are moved down over the
//!   headers so that consecutive equal-size payloads to one destination lie
//!   back to back and form one run;
//! - target -> client ([`insert_reply_headers`]): every payload needs a SOCKS
//!   header naming the target in front; the payloads are moved up to open
//!   that room and header + payload segments go out as runs.
//!
//! This is offset arithmetic over attacker-controlled bytes and lengths, so it
//! lives here as pure functions (no sockets, no raw memory) that the relay calls
//! and that unit, property and fuzz tests drive directly. Every input is
//! accepted without panicking: impossible offsets are refused, not trusted.

use std::net::SocketAddr;

use super::addr::Addr;
use super::udp::{decode_udp_header, encode_udp_header, MAX_UDP_IP_HEADER_LEN};

/// Most datagrams in one UDP GSO send (the kernel's UDP_MAX_SEGMENTS is 64 or more).
pub const GSO_MAX_SEGMENTS: u32 = 64;
/// Most bytes in one UDP GSO send (it must fit one IPv4 packet's length field).
pub const GSO_MAX_BYTES: u32 = 65_000;

/// How many datagrams `len` bytes of a receive with GRO segment size `seg` hold: one when
/// `seg` is 0 or covers the whole receive (an empty receive is one empty datagram).
pub fn burst_datagrams(len: usize, seg: usize) -> usize {
    if seg == 0 || seg >= len {
        1
    } else {
        len.div_ceil(seg)
    }
}

/// Length of the SOCKS UDP header in front of a datagram from `src` going back to the
/// client: 10 for an IPv4 source, 22 for IPv6.
pub fn reply_header_len(src: SocketAddr) -> usize {
    if src.is_ipv4() {
        10
    } else {
        MAX_UDP_IP_HEADER_LEN
    }
}

/// The datagrams of `buf[start..end]` with GRO segment size `seg`, as `(from, to)` ranges in
/// order (see [`burst_datagrams`]). The caller ensures `start <= end`.
fn burst_ranges(start: usize, end: usize, seg: usize) -> impl Iterator<Item = (usize, usize)> {
    let len = end - start;
    let g = if burst_datagrams(len, seg) == 1 {
        len
    } else {
        seg
    };
    (0..burst_datagrams(len, seg)).map(move |i| {
        let from = start + i * g;
        (from, (from + g).min(end))
    })
}

/// One send: bytes `off..end` of the buffer, `count` datagrams of `seg` bytes (the last may
/// be shorter), to `dst`. With `count == 1` it is a plain send; otherwise a GSO send with
/// segment size `seg`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    pub off: u32,
    pub end: u32,
    pub seg: u32,
    pub count: u32,
    pub dst: SocketAddr,
    /// A shorter datagram ended the run (GSO allows only the last to be short).
    closed: bool,
}

impl Run {
    /// A run of the one datagram `off..end` (`seg` is its length).
    pub fn single(off: u32, end: u32, dst: SocketAddr) -> Run {
        Run {
            off,
            end,
            seg: end.saturating_sub(off),
            count: 1,
            dst,
            closed: false,
        }
    }

    /// The run the kernel sees in a GSO send of `off..end` with segment size `seg`: for
    /// taking apart a send the route refused, to send its datagrams one by one. It cannot
    /// be extended.
    pub fn segmented(off: u32, end: u32, seg: u32, dst: SocketAddr) -> Run {
        let bytes = end.saturating_sub(off);
        let count = if seg == 0 {
            1
        } else {
            bytes.div_ceil(seg).max(1)
        };
        Run {
            off,
            end,
            seg: if seg == 0 { bytes } else { seg },
            count,
            dst,
            closed: true,
        }
    }

    /// Appends a datagram of `len` bytes at the run's end if GSO can carry it with the rest:
    /// same destination, not longer than the run's segments (a shorter one ends the run), at
    /// most [`GSO_MAX_SEGMENTS`] datagrams and [`GSO_MAX_BYTES`] bytes. Empty datagrams are
    /// never appended (a GSO send cannot carry one), nor is anything after them.
    pub fn extend(&mut self, dst: SocketAddr, len: u32) -> bool {
        let bytes = u64::from(self.bytes()) + u64::from(len);
        let fits = !self.closed
            && self.dst == dst
            && len > 0
            && len <= self.seg
            && self.count < GSO_MAX_SEGMENTS
            && bytes <= u64::from(GSO_MAX_BYTES);
        if fits {
            self.end += len;
            self.count += 1;
            self.closed = len < self.seg;
        }
        fits
    }

    /// Bytes in the run (`end - off`).
    pub fn bytes(&self) -> u32 {
        self.end.saturating_sub(self.off)
    }

    /// The `(from, to)` buffer range of each datagram of the run, in order.
    pub fn datagrams(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        (0..self.count).map(move |i| {
            let from = i
                .checked_mul(self.seg)
                .and_then(|d| self.off.checked_add(d))
                .map_or(self.end, |f| f.min(self.end));
            let to = if i + 1 == self.count {
                self.end
            } else {
                from.saturating_add(self.seg).min(self.end)
            };
            (from, to)
        })
    }

    /// Whether the fields describe a send the kernel carries as `count` datagrams: at least
    /// one; for several, nonempty segments of `seg` bytes except a last one of 1..=`seg`, at
    /// most [`GSO_MAX_SEGMENTS`] of them and [`GSO_MAX_BYTES`] in all; for one, at most `seg`
    /// bytes. For checks and debug assertions.
    pub fn is_well_formed(&self) -> bool {
        if self.count == 0 || self.off > self.end {
            return false;
        }
        let bytes = u64::from(self.bytes());
        let seg = u64::from(self.seg);
        if self.count == 1 {
            return bytes <= seg;
        }
        let full = u64::from(self.count - 1) * seg;
        seg > 0
            && self.count <= GSO_MAX_SEGMENTS
            && bytes <= u64::from(GSO_MAX_BYTES)
            && full < bytes
            && bytes <= full + seg
    }
}

/// A datagram of a client burst that [`strip_client_burst`] did not put in a run. `data`
/// is its payload, valid during the callback only.
#[derive(Debug, PartialEq, Eq)]
pub enum Aside<'a> {
    /// The SOCKS UDP request header does not decode (bad RSV, bad ATYP, truncated...).
    Malformed,
    /// FRAG 0 and an IP destination that `route` refused.
    Unroutable,
    /// FRAG is not 0 (whatever the destination): for the reassembly queue.
    Fragment { frag: u8, dst: Addr, data: &'a [u8] },
    /// FRAG 0 and a domain destination: for the resolver.
    Domain { dst: Addr, data: &'a [u8] },
}

/// Client -> target. `buf[start..end]` holds the datagrams of one receive, `seg` bytes each
/// (the last may be shorter; `seg == 0` or `seg >= end - start` means one datagram), each a
/// SOCKS UDP request header + payload.
///
/// For each datagram with FRAG 0 and an IP destination, `route(dst)` gives the address to
/// send to (`None`: [`Aside::Unroutable`]). Routed payloads are packed back to back: the
/// first routed payload does not move (so a single datagram costs no copy), each later one
/// is moved down to follow the previous one. Consecutive routed payloads are grouped into
/// [`Run`]s by [`Run::extend`]'s rules and appended to `runs` (runs already in `runs` are
/// never extended). Every other datagram is reported to `aside`, in order.
///
/// Only the bytes of `buf[start..end]` are written. If `start..end` is not a range inside
/// `buf` (or `end` does not fit a `u32`), nothing is done.
pub fn strip_client_burst(
    buf: &mut [u8],
    start: usize,
    end: usize,
    seg: usize,
    mut route: impl FnMut(SocketAddr) -> Option<SocketAddr>,
    runs: &mut Vec<Run>,
    mut aside: impl FnMut(Aside<'_>),
) {
    if start > end || end > buf.len() || u32::try_from(end).is_err() {
        return;
    }
    let ours = runs.len();
    // End of the last routed payload, where the next one goes.
    let mut w: Option<usize> = None;
    for (s, e) in burst_ranges(start, end, seg) {
        let (hdr, h) = match decode_udp_header(&buf[s..e]) {
            Ok(v) => v,
            Err(_) => {
                aside(Aside::Malformed);
                continue;
            }
        };
        let p = s + h;
        let dst = match hdr.dst {
            dst if hdr.frag != 0 => {
                aside(Aside::Fragment {
                    frag: hdr.frag,
                    dst,
                    data: &buf[p..e],
                });
                continue;
            }
            dst @ Addr::Domain(..) => {
                aside(Aside::Domain {
                    dst,
                    data: &buf[p..e],
                });
                continue;
            }
            Addr::Ip(ip) => match route(ip) {
                Some(dst) => dst,
                None => {
                    aside(Aside::Unroutable);
                    continue;
                }
            },
        };
        let at = match w {
            None => p,
            Some(w) => {
                // w <= s < p: the payload moves down, over headers already read.
                buf.copy_within(p..e, w);
                w
            }
        };
        let len = e - p;
        w = Some(at + len);
        // Both fit: at + len <= end, which fits a u32.
        let (at, len) = (at as u32, len as u32);
        let extended = runs.len() > ours
            && runs
                .last_mut()
                .is_some_and(|r| r.end == at && r.extend(dst, len));
        if !extended {
            runs.push(Run::single(at, at + len, dst));
        }
    }
}

/// Target -> client. `buf[start..end]` holds the datagrams of one receive from `src`, `seg`
/// bytes each (the last may be shorter; `seg == 0` or `seg >= end - start` means one
/// datagram).
///
/// Writes a SOCKS UDP header naming `src` (FRAG 0; [`reply_header_len`] bytes) in front of
/// each payload: the first into `buf[start - hlen..start]`, and later payloads are moved up
/// (last first) to make room for theirs, so the result spans `buf[start - hlen..]` up to
/// `start + (n - 1) * (hlen + seg) + last`. The segments of header + payload are appended
/// to `runs` as GSO runs to `client` (at most [`GSO_MAX_SEGMENTS`] segments and
/// [`GSO_MAX_BYTES`] bytes each; a segment larger than that goes alone).
///
/// Returns false, touching nothing, when `start..end` is not a range inside `buf`, when
/// there is no room for the first header before `start` or for the others after `end`,
/// or when the result would end beyond `u32::MAX`.
pub fn insert_reply_headers(
    buf: &mut [u8],
    start: usize,
    end: usize,
    seg: usize,
    src: SocketAddr,
    client: SocketAddr,
    runs: &mut Vec<Run>,
) -> bool {
    let h = reply_header_len(src);
    let (Some(len), Some(first)) = (end.checked_sub(start), start.checked_sub(h)) else {
        return false;
    };
    if end > buf.len() {
        return false;
    }
    let n = burst_datagrams(len, seg);
    let g = if n == 1 { len } else { seg };
    // (n - 1) * g < len, as n = ceil(len / g).
    let last = len - (n - 1) * g;
    let Some(stride) = g.checked_add(h) else {
        return false;
    };
    let Some(new_end) = (n - 1)
        .checked_mul(stride)
        .and_then(|b| b.checked_add(start))
        .and_then(|b| b.checked_add(last))
    else {
        return false;
    };
    if new_end > buf.len() || u32::try_from(new_end).is_err() {
        return false;
    }
    // Every offset below is at most new_end, so neither overflows nor leaves buf or u32.
    for i in (1..n).rev() {
        let from = start + i * g;
        let l = if i == n - 1 { last } else { g };
        buf.copy_within(from..from + l, start + i * stride);
    }
    let mut hdr = [0u8; MAX_UDP_IP_HEADER_LEN];
    encode_udp_header(0, &src, &mut hdr);
    for i in 0..n {
        let at = first + i * stride;
        buf[at..at + h].copy_from_slice(&hdr[..h]);
    }
    let per_run = (GSO_MAX_BYTES as usize / stride).clamp(1, GSO_MAX_SEGMENTS as usize);
    let mut i = 0;
    while i < n {
        let count = per_run.min(n - i);
        let off = first + i * stride;
        let (end, closed) = if i + count == n {
            (new_end, h + last < stride)
        } else {
            (off + count * stride, false)
        };
        runs.push(Run {
            off: off as u32,
            end: end as u32,
            seg: stride as u32,
            count: count as u32,
            dst: client,
            closed,
        });
        i += count;
    }
    true
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::udp::encode_udp_header_addr;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A datagram: the header for `dst` with `frag`, then `payload`.
    fn dgram(frag: u8, dst: &Addr, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_udp_header_addr(frag, dst, &mut v);
        v.extend_from_slice(payload);
        v
    }

    /// What `aside` saw, owned.
    #[derive(Debug, PartialEq, Eq)]
    enum Seen {
        Malformed,
        Unroutable,
        Fragment(u8, Addr, Vec<u8>),
        Domain(Addr, Vec<u8>),
    }

    fn strip(
        buf: &mut [u8],
        start: usize,
        end: usize,
        seg: usize,
        route: impl FnMut(SocketAddr) -> Option<SocketAddr>,
    ) -> (Vec<Run>, Vec<Seen>) {
        let mut runs = Vec::new();
        let mut seen = Vec::new();
        strip_client_burst(buf, start, end, seg, route, &mut runs, |a| {
            seen.push(match a {
                Aside::Malformed => Seen::Malformed,
                Aside::Unroutable => Seen::Unroutable,
                Aside::Fragment { frag, dst, data } => Seen::Fragment(frag, dst, data.to_vec()),
                Aside::Domain { dst, data } => Seen::Domain(dst, data.to_vec()),
            })
        });
        (runs, seen)
    }

    fn run_bytes<'b>(buf: &'b [u8], r: &Run) -> Vec<&'b [u8]> {
        r.datagrams()
            .map(|(a, b)| &buf[a as usize..b as usize])
            .collect()
    }

    #[test]
    fn runs_take_equal_datagrams_to_one_destination_and_a_short_last_one() {
        let a = sa("192.0.2.1:53");
        let b = sa("192.0.2.2:53");
        let mut r = Run::single(0, 100, a);
        assert!(r.extend(a, 100));
        assert!(!r.extend(b, 100), "another destination");
        assert!(!r.extend(a, 101), "a larger datagram");
        assert!(r.extend(a, 40), "a shorter one ends the run");
        assert!(!r.extend(a, 40), "nothing after the short one");
        assert_eq!((r.count, r.end), (3, 240));
        assert!(r.is_well_formed());
        let mut r = Run::single(0, 1000, a);
        for _ in 1..GSO_MAX_SEGMENTS {
            assert!(r.extend(a, 1000) || r.end - r.off + 1000 > GSO_MAX_BYTES);
        }
        assert!(r.count <= GSO_MAX_SEGMENTS && r.end - r.off <= GSO_MAX_BYTES);
        assert!(!r.extend(a, 1000), "full");
        assert!(r.is_well_formed());
        let mut z = Run::single(0, 0, a);
        assert!(!z.extend(a, 0), "empty datagrams are sent one by one");
        assert!(!z.extend(a, 1), "nothing follows an empty one");
    }

    #[test]
    fn an_empty_datagram_does_not_join_a_run() {
        // GSO cannot carry an empty segment: the kernel would send one datagram fewer.
        let a = sa("192.0.2.1:53");
        let mut r = Run::single(0, 100, a);
        assert!(!r.extend(a, 0));
        assert!(r.extend(a, 100));
        assert_eq!(r.count, 2);
    }

    #[test]
    fn run_count_limit_and_overflowing_lengths() {
        let a = sa("192.0.2.1:53");
        let mut r = Run::single(0, 10, a);
        for _ in 1..GSO_MAX_SEGMENTS {
            assert!(r.extend(a, 10));
        }
        assert!(!r.extend(a, 10), "64 segments");
        let mut r = Run::single(0, u32::MAX, a);
        assert!(!r.extend(a, u32::MAX), "no overflow, too many bytes");
        let mut r = Run::single(10, 5, a);
        assert_eq!((r.seg, r.bytes()), (0, 0));
        assert!(!r.extend(a, 1));
    }

    #[test]
    fn run_datagrams_and_segmented() {
        let a = sa("192.0.2.1:53");
        let r = Run::segmented(100, 350, 100, a);
        assert_eq!(r.count, 3);
        assert!(r.is_well_formed());
        let d: Vec<_> = r.datagrams().collect();
        assert_eq!(d, [(100, 200), (200, 300), (300, 350)]);
        let mut r2 = r.clone();
        assert!(!r2.extend(a, 100), "segmented runs are closed");
        let r = Run::segmented(100, 300, 0, a);
        assert_eq!(r.datagrams().collect::<Vec<_>>(), [(100, 300)]);
        let r = Run::segmented(0, 0, 7, a);
        assert_eq!((r.count, r.datagrams().count()), (1, 1));
        // Hand-built nonsense: no panic, ranges stay inside off..end.
        let r = Run {
            off: 5,
            end: 9,
            seg: u32::MAX,
            count: 4,
            dst: a,
            closed: false,
        };
        assert!(!r.is_well_formed());
        for (x, y) in r.datagrams() {
            assert!(x <= y && y <= 9);
        }
    }

    #[test]
    fn burst_datagram_counts() {
        assert_eq!(burst_datagrams(0, 0), 1);
        assert_eq!(burst_datagrams(0, 5), 1);
        assert_eq!(burst_datagrams(100, 0), 1);
        assert_eq!(burst_datagrams(100, 100), 1);
        assert_eq!(burst_datagrams(100, 500), 1);
        assert_eq!(burst_datagrams(100, 50), 2);
        assert_eq!(burst_datagrams(101, 50), 3);
        assert_eq!(burst_datagrams(1050, 100), 11);
    }

    #[test]
    fn client_burst_ipv4_packs_payloads_into_one_run() {
        let a = sa("192.0.2.1:53");
        let mut buf = vec![0xAA; 8];
        for i in 0..3u8 {
            buf.extend(dgram(0, &Addr::Ip(a), &[i; 6]));
        }
        buf.extend(dgram(0, &Addr::Ip(a), &[9; 2]));
        let end = buf.len();
        let (runs, seen) = strip(&mut buf, 8, end, 16, Some);
        assert!(seen.is_empty());
        // The first payload stays where it was (8 + 10), the rest follow it.
        assert_eq!(
            runs,
            [Run {
                off: 18,
                end: 18 + 20,
                seg: 6,
                count: 4,
                dst: a,
                closed: true,
            }]
        );
        assert_eq!(
            run_bytes(&buf, &runs[0]),
            [&[0u8; 6][..], &[1; 6], &[2; 6], &[9; 2]]
        );
        assert_eq!(&buf[..8], &[0xAA; 8], "nothing before start is written");
    }

    #[test]
    fn client_single_datagram_is_not_moved() {
        let a = sa("[2001:db8::1]:443");
        let mut buf = dgram(0, &Addr::Ip(a), b"hello");
        let orig = buf.clone();
        let end = buf.len();
        for seg in [0, end, end + 100] {
            let (runs, seen) = strip(&mut buf, 0, end, seg, Some);
            assert!(seen.is_empty());
            assert_eq!(runs, [Run::single(22, 27, a)]);
            assert_eq!(buf, orig);
        }
    }

    #[test]
    fn client_burst_ipv6_and_route_rewrites_destination() {
        let v6 = sa("[2001:db8::1]:443");
        let mapped = sa("[::ffff:192.0.2.1]:53");
        let v4 = sa("192.0.2.1:53");
        // 30-byte datagrams: IPv6 header (22) + 8, IPv4 (10) + 20.
        let mut buf = dgram(0, &Addr::Ip(v6), &[1; 8]);
        buf.extend(dgram(0, &Addr::Ip(v6), &[2; 8]));
        buf.extend(dgram(0, &Addr::Ip(v4), &[3; 20]));
        buf.extend(dgram(0, &Addr::Ip(v4), &[4; 20]));
        let end = buf.len();
        let route = |d: SocketAddr| {
            Some(match d {
                SocketAddr::V4(v) => SocketAddr::new(v.ip().to_ipv6_mapped().into(), v.port()),
                d => d,
            })
        };
        let (runs, seen) = strip(&mut buf, 0, end, 30, route);
        assert!(seen.is_empty());
        assert_eq!(runs.len(), 2);
        assert_eq!((runs[0].off, runs[0].count, runs[0].dst), (22, 2, v6));
        assert_eq!((runs[1].off, runs[1].count, runs[1].dst), (38, 2, mapped));
        assert_eq!(runs[1].end, 78);
        assert_eq!(run_bytes(&buf, &runs[0]), [&[1u8; 8][..], &[2; 8]]);
        assert_eq!(run_bytes(&buf, &runs[1]), [&[3u8; 20][..], &[4; 20]]);
    }

    #[test]
    fn client_burst_sets_aside_domain_fragment_malformed_unroutable() {
        let a = sa("192.0.2.1:53");
        let bad = sa("192.0.2.99:53");
        let dom = Addr::domain(b"ex.org", 53).unwrap();
        // 24-byte datagrams.
        let mut buf = dgram(0, &Addr::Ip(a), &[1; 14]);
        buf.extend(dgram(0, &dom, &[2; 11]));
        buf.extend(dgram(5, &Addr::Ip(a), &[3; 14]));
        let mut m = dgram(0, &Addr::Ip(a), &[4; 14]);
        m[0] = 1; // RSV
        buf.extend(m);
        buf.extend(dgram(0, &Addr::Ip(bad), &[5; 14]));
        buf.extend(dgram(0, &Addr::Ip(a), &[6; 14]));
        buf.extend([0, 0, 0, 2, 0, 0]); // ATYP 2, short last datagram
        buf.extend(dgram(0, &Addr::Ip(a), &[7; 4])); // would be a run's short last
        let end = buf.len() - 14;
        let (runs, seen) = strip(&mut buf, 0, end, 24, |d| (d != bad).then_some(d));
        assert_eq!(
            seen,
            [
                Seen::Domain(dom, vec![2; 11]),
                Seen::Fragment(5, Addr::Ip(a), vec![3; 14]),
                Seen::Malformed,
                Seen::Unroutable,
                Seen::Malformed,
            ]
        );
        // The datagrams around the unroutable one still form one run.
        assert_eq!(runs.len(), 1);
        assert_eq!((runs[0].off, runs[0].end, runs[0].count), (10, 38, 2));
        assert_eq!(run_bytes(&buf, &runs[0]), [&[1u8; 14][..], &[6; 14]]);
    }

    #[test]
    fn client_burst_first_routed_payload_is_not_the_first_datagram() {
        let a = sa("192.0.2.1:53");
        let mut buf = vec![0xFF; 16]; // malformed
        buf.extend(dgram(0, &Addr::Ip(a), &[1; 6]));
        buf.extend(dgram(0, &Addr::Ip(a), &[2; 6]));
        let end = buf.len();
        let (runs, seen) = strip(&mut buf, 0, end, 16, Some);
        assert_eq!(seen, [Seen::Malformed]);
        assert_eq!(runs.len(), 1);
        assert_eq!((runs[0].off, runs[0].end, runs[0].count), (26, 38, 2));
    }

    #[test]
    fn client_burst_empty_payloads_go_alone() {
        let a = sa("192.0.2.1:53");
        let mut buf = dgram(0, &Addr::Ip(a), &[1; 4]);
        buf.extend(dgram(0, &Addr::Ip(a), &[2; 4]));
        buf.extend(dgram(0, &Addr::Ip(a), &[])); // header only: short last
        let end = buf.len();
        let (runs, _) = strip(&mut buf, 0, end, 14, Some);
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].count, 2);
        assert_eq!((runs[1].off, runs[1].end, runs[1].count), (18, 18, 1));
        assert!(runs.iter().all(Run::is_well_formed));
    }

    #[test]
    fn client_burst_does_not_extend_earlier_runs() {
        let a = sa("192.0.2.1:53");
        let mut buf = dgram(0, &Addr::Ip(a), &[1; 4]);
        let end = buf.len();
        let mut runs = vec![Run::single(0, 10, a)];
        strip_client_burst(&mut buf, 0, end, 0, Some, &mut runs, |_| {});
        assert_eq!(runs, [Run::single(0, 10, a), Run::single(10, 14, a)]);
    }

    #[test]
    fn client_burst_refuses_bad_ranges() {
        let mut buf = vec![0u8; 20];
        for (s, e) in [(5, 4), (0, 21), (usize::MAX, 3), (0, usize::MAX)] {
            let (runs, seen) = strip(&mut buf, s, e, 7, Some);
            assert!(runs.is_empty() && seen.is_empty(), "{s}..{e}");
        }
        // An empty receive is one (malformed) datagram.
        let (runs, seen) = strip(&mut buf, 3, 3, 7, Some);
        assert!(runs.is_empty());
        assert_eq!(seen, [Seen::Malformed]);
    }

    #[test]
    fn reply_headers_ipv4_burst() {
        let src = sa("198.51.100.7:5353");
        let client = sa("10.0.0.2:40000");
        let mut buf = vec![0xEE; 16];
        buf.extend([1u8; 5]);
        buf.extend([2u8; 5]);
        buf.extend([3u8; 2]);
        buf.resize(16 + 12 + 20, 0xEE);
        let mut runs = Vec::new();
        assert!(insert_reply_headers(
            &mut buf, 16, 28, 5, src, client, &mut runs
        ));
        let mut hdr = [0u8; 22];
        assert_eq!(encode_udp_header(0, &src, &mut hdr), 10);
        assert_eq!(
            runs,
            [Run {
                off: 6,
                end: 6 + 15 + 15 + 12,
                seg: 15,
                count: 3,
                dst: client,
                closed: true,
            }]
        );
        let segs = run_bytes(&buf, &runs[0]);
        for (s, p) in segs.iter().zip([&[1u8; 5][..], &[2; 5], &[3; 2]]) {
            assert_eq!(&s[..10], &hdr[..10]);
            assert_eq!(&s[10..], p);
        }
        assert_eq!(&buf[..6], &[0xEE; 6]);
    }

    #[test]
    fn reply_headers_ipv6_single_and_empty() {
        let src = sa("[2001:db8::53]:53");
        let client = sa("[2001:db8::2]:40000");
        let mut buf = vec![0u8; 22];
        buf.extend(b"answer");
        let mut runs = Vec::new();
        assert!(insert_reply_headers(
            &mut buf, 22, 28, 0, src, client, &mut runs
        ));
        assert_eq!(runs, [Run::single(0, 28, client)]);
        let (h, off) = decode_udp_header(&buf).unwrap();
        assert_eq!((h.frag, h.dst, off), (0, Addr::Ip(src), 22));
        assert_eq!(&buf[22..], b"answer");
        // An empty datagram: a header alone.
        runs.clear();
        assert!(insert_reply_headers(
            &mut buf, 22, 22, 9, src, client, &mut runs
        ));
        assert_eq!(runs, [Run::single(0, 22, client)]);
    }

    #[test]
    fn reply_headers_split_into_gso_sized_runs() {
        let src = sa("198.51.100.7:5353");
        let client = sa("10.0.0.2:40000");
        // 100 datagrams of 1000 bytes: segments of 1010, 64 per run at most by bytes.
        let (n, g) = (100usize, 1000usize);
        let mut buf = vec![0u8; 10 + n * (g + 10)];
        for i in 0..n {
            buf[10 + i * g..10 + (i + 1) * g].fill(i as u8);
        }
        let mut runs = Vec::new();
        assert!(insert_reply_headers(
            &mut buf,
            10,
            10 + n * g,
            g,
            src,
            client,
            &mut runs
        ));
        let per = (GSO_MAX_BYTES / 1010) as usize;
        assert_eq!(runs.len(), n.div_ceil(per));
        assert!(runs.iter().all(|r| r.is_well_formed() && r.seg == 1010));
        let segs: Vec<_> = runs.iter().flat_map(|r| run_bytes(&buf, r)).collect();
        assert_eq!(segs.len(), n);
        for (i, s) in segs.iter().enumerate() {
            assert!(s[10..].iter().all(|&b| b == i as u8));
        }
    }

    #[test]
    fn reply_headers_refuse_without_room() {
        let src4 = sa("198.51.100.7:5353");
        let src6 = sa("[2001:db8::53]:53");
        let client = sa("10.0.0.2:40000");
        let mut buf = vec![7u8; 40];
        let mut runs = vec![Run::single(1, 2, client)];
        let before = (buf.clone(), runs.clone());
        // No room in front, start > end, end beyond buf, no room for later headers.
        for (s, e, g, src) in [
            (9, 20, 0, src4),
            (21, 30, 0, src6),
            (12, 11, 0, src4),
            (10, 41, 0, src4),
            (10, 31, 10, src4),
            (usize::MAX, usize::MAX, usize::MAX, src6),
        ] {
            assert!(!insert_reply_headers(
                &mut buf, s, e, g, src, client, &mut runs
            ));
            assert_eq!((&buf, &runs), (&before.0, &before.1));
        }
        // Exactly enough room.
        assert!(insert_reply_headers(
            &mut buf, 10, 30, 10, src4, client, &mut runs
        ));
        assert_eq!(runs.len(), 2);
        assert_eq!((runs[1].off, runs[1].end), (0, 40));
    }
}
