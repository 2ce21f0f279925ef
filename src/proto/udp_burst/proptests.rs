//! Property tests for [`super`]: random GRO bursts (IPv4, IPv6 and domain destinations,
//! fragments, malformed headers, equal sizes with a shorter last datagram) and arbitrary
//! bytes and offsets, checked against a datagram-by-datagram model that decodes each
//! datagram of an untouched copy on its own. The model is what the relay did before bursts:
//! one datagram, one decision; the functions under test must give the same answers, with
//! the payloads where the runs say and every run a send the kernel's GSO can carry.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

use super::*;
use crate::proto::proptests::arb_ip;
use crate::proto::udp::encode_udp_header_addr;

/// What `aside` saw, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    Malformed,
    Unroutable,
    Fragment(u8, Addr, Vec<u8>),
    Domain(Addr, Vec<u8>),
}

/// The route the tests use: refuses ports that are 3 mod 7, sends IPv4 destinations to
/// their IPv4-mapped IPv6 form (as a dual-stack socket does) and IPv6 ones unchanged.
fn route(d: SocketAddr) -> Option<SocketAddr> {
    if d.port() % 7 == 3 {
        return None;
    }
    Some(match d {
        SocketAddr::V4(v) => SocketAddr::new(v.ip().to_ipv6_mapped().into(), v.port()),
        d => d,
    })
}

/// The datagram ranges of `start..end` with segment size `seg`, computed independently.
fn model_ranges(start: usize, end: usize, seg: usize) -> Vec<(usize, usize)> {
    let len = end - start;
    if seg == 0 || seg >= len {
        return vec![(start, end)];
    }
    let mut v = Vec::new();
    let mut s = start;
    while s < end {
        v.push((s, (s + seg).min(end)));
        s += seg;
    }
    v
}

#[derive(Default)]
struct Expect {
    routed: Vec<(SocketAddr, Vec<u8>)>,
    /// Where the first routed payload is in the original buffer.
    first_at: Option<usize>,
    seen: Vec<Seen>,
}

/// One datagram at a time, as if each had arrived alone.
fn model_strip(orig: &[u8], start: usize, end: usize, seg: usize) -> Expect {
    let mut x = Expect::default();
    if start > end || end > orig.len() {
        return x;
    }
    for (s, e) in model_ranges(start, end, seg) {
        let d = &orig[s..e];
        match decode_udp_header(d) {
            Err(_) => x.seen.push(Seen::Malformed),
            Ok((h, n)) if h.frag != 0 => x.seen.push(Seen::Fragment(h.frag, h.dst, d[n..].into())),
            Ok((h, n)) => match h.dst {
                Addr::Domain(..) => x.seen.push(Seen::Domain(h.dst, d[n..].into())),
                Addr::Ip(ip) => match route(ip) {
                    None => x.seen.push(Seen::Unroutable),
                    Some(to) => {
                        x.first_at.get_or_insert(s + n);
                        x.routed.push((to, d[n..].into()));
                    }
                },
            },
        }
    }
    x
}

/// The datagram ranges of a run from its fields alone (not [`Run::datagrams`]).
fn run_segments(r: &Run) -> Vec<(usize, usize)> {
    let (off, end, seg) = (r.off as usize, r.end as usize, r.seg as usize);
    let mut v: Vec<(usize, usize)> = (0..r.count as usize - 1)
        .map(|i| (off + i * seg, off + (i + 1) * seg))
        .collect();
    v.push((off + (r.count as usize - 1) * seg, end));
    v
}

/// The GSO rules, spelled out: one datagram is a plain send; several are nonempty segments
/// of `seg` bytes but a shorter nonempty last, at most 64 and 65,000 bytes in all.
fn check_gso(r: &Run, lo: usize, hi: usize) -> Result<(), TestCaseError> {
    prop_assert!(r.count >= 1, "{:?}", r);
    prop_assert!(
        lo <= r.off as usize && r.off <= r.end && r.end as usize <= hi,
        "{:?}",
        r
    );
    prop_assert!(r.is_well_formed(), "{:?}", r);
    let segs = run_segments(r);
    prop_assert_eq!(
        r.datagrams()
            .map(|(a, b)| (a as usize, b as usize))
            .collect::<Vec<_>>(),
        segs.clone()
    );
    if r.count > 1 {
        prop_assert!(r.count <= GSO_MAX_SEGMENTS, "{:?}", r);
        prop_assert!(r.end - r.off <= GSO_MAX_BYTES, "{:?}", r);
        let (a, b) = *segs.last().unwrap();
        prop_assert!(a < b && b - a <= r.seg as usize, "{:?}", r);
    } else {
        prop_assert!(r.end - r.off <= r.seg, "{:?}", r);
    }
    Ok(())
}

fn sentinel() -> Run {
    Run::single(0, 0, SocketAddr::from(([0, 0, 0, 0], 9)))
}

/// Runs `strip_client_burst` on a copy of `orig` and checks it against the model.
fn check_strip(orig: &[u8], start: usize, end: usize, seg: usize) -> Result<(), TestCaseError> {
    let mut buf = orig.to_vec();
    let mut runs = vec![sentinel()];
    let mut seen = Vec::new();
    strip_client_burst(&mut buf, start, end, seg, route, &mut runs, |a| {
        seen.push(match a {
            Aside::Malformed => Seen::Malformed,
            Aside::Unroutable => Seen::Unroutable,
            Aside::Fragment { frag, dst, data } => Seen::Fragment(frag, dst, data.to_vec()),
            Aside::Domain { dst, data } => Seen::Domain(dst, data.to_vec()),
        })
    });
    prop_assert_eq!(&runs[0], &sentinel(), "earlier runs are left alone");
    let runs = &runs[1..];
    let x = model_strip(orig, start, end, seg);
    prop_assert_eq!(&seen, &x.seen);
    if start > end || end > orig.len() {
        prop_assert!(runs.is_empty());
        prop_assert_eq!(&buf, orig);
        return Ok(());
    }
    prop_assert_eq!(&buf[..start], &orig[..start]);
    prop_assert_eq!(&buf[end..], &orig[end..]);
    for r in runs {
        check_gso(r, start, end)?;
    }
    prop_assert_eq!(
        runs.first().map(|r| r.off as usize),
        x.first_at,
        "first payload moved"
    );
    for w in runs.windows(2) {
        prop_assert_eq!(w[0].end, w[1].off, "payloads are packed");
        let (a, b) = run_segments(&w[1])[0];
        let mut t = w[0].clone();
        prop_assert!(
            !t.extend(w[1].dst, (b - a) as u32),
            "{:?} could take {:?}",
            w[0],
            w[1]
        );
    }
    let got: Vec<(SocketAddr, Vec<u8>)> = runs
        .iter()
        .flat_map(|r| {
            run_segments(r)
                .into_iter()
                .map(|(a, b)| (r.dst, buf[a..b].to_vec()))
        })
        .collect();
    prop_assert_eq!(got, x.routed);
    Ok(())
}

/// Runs `insert_reply_headers` on a copy of `orig` and checks the outcome.
fn check_insert(
    orig: &[u8],
    start: usize,
    end: usize,
    seg: usize,
    src: SocketAddr,
    client: SocketAddr,
) -> Result<bool, TestCaseError> {
    let mut buf = orig.to_vec();
    let mut runs = vec![sentinel()];
    let ok = insert_reply_headers(&mut buf, start, end, seg, src, client, &mut runs);
    let h = reply_header_len(src);
    // Independent room computation.
    let fits = start <= end && end <= orig.len() && start >= h && {
        // Payload i moves up by i headers; the last one ends n - 1 headers later.
        let ranges = model_ranges(start, end, seg);
        ranges.last().unwrap().1 + (ranges.len() - 1) * h <= orig.len()
    };
    prop_assert_eq!(ok, fits);
    if !ok {
        prop_assert_eq!(&buf, orig);
        prop_assert_eq!(runs, vec![sentinel()]);
        return Ok(false);
    }
    prop_assert_eq!(&runs[0], &sentinel());
    let runs = &runs[1..];
    let mut hdr = [0u8; 22];
    encode_udp_header(0, &src, &mut hdr);
    let hdr = &hdr[..h];
    let payloads: Vec<&[u8]> = model_ranges(start, end, seg)
        .into_iter()
        .map(|(a, b)| &orig[a..b])
        .collect();
    prop_assert_eq!(runs[0].off as usize, start - h);
    let new_end = runs.last().unwrap().end as usize;
    prop_assert_eq!(&buf[..start - h], &orig[..start - h]);
    prop_assert_eq!(&buf[new_end..], &orig[new_end..]);
    for (i, r) in runs.iter().enumerate() {
        check_gso(r, start - h, buf.len())?;
        prop_assert_eq!(r.dst, client);
        if let Some(next) = runs.get(i + 1) {
            prop_assert_eq!(r.end, next.off);
            prop_assert_eq!(r.seg, next.seg);
            prop_assert!(
                r.count == GSO_MAX_SEGMENTS || r.end - r.off + r.seg > GSO_MAX_BYTES,
                "run {:?} could be longer",
                r
            );
        }
    }
    let segs: Vec<&[u8]> = runs
        .iter()
        .flat_map(run_segments)
        .map(|(a, b)| &buf[a..b])
        .collect();
    prop_assert_eq!(segs.len(), payloads.len());
    for (s, p) in segs.iter().zip(&payloads) {
        prop_assert_eq!(&s[..h], hdr);
        prop_assert_eq!(&s[h..], *p);
    }
    Ok(true)
}

/// A destination from a small pool (so runs form), one of them unroutable, or any.
fn arb_dst() -> impl Strategy<Value = Addr> {
    let pool = [
        SocketAddr::from((Ipv4Addr::new(192, 0, 2, 1), 53)),
        SocketAddr::from((Ipv4Addr::new(192, 0, 2, 2), 443)),
        SocketAddr::from((Ipv4Addr::new(192, 0, 2, 3), 10)), // 10 % 7 == 3: unroutable
        SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1), 53)),
        SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2), 80)),
    ];
    prop_oneof![
        6 => prop::sample::select(pool.to_vec()).prop_map(Addr::Ip),
        1 => arb_ip().prop_map(Addr::Ip),
        1 => (vec(any::<u8>(), 1..=40), any::<u16>())
            .prop_map(|(n, p)| Addr::Domain(n.into(), p)),
    ]
}

/// One datagram of a burst: repeat the previous one's header, or a new one; FRAG; an
/// optional corrupted byte; the payload's fill.
#[derive(Clone, Debug)]
struct Spec {
    repeat: bool,
    dst: Addr,
    frag: u8,
    corrupt: Option<(Index, u8)>,
    fill: u8,
}

fn arb_spec() -> impl Strategy<Value = Spec> {
    (
        prop::bool::weighted(0.6),
        arb_dst(),
        prop_oneof![8 => Just(0u8), 1 => any::<u8>()],
        prop::option::weighted(0.08, (any::<Index>(), any::<u8>())),
        any::<u8>(),
    )
        .prop_map(|(repeat, dst, frag, corrupt, fill)| Spec {
            repeat,
            dst,
            frag,
            corrupt,
            fill,
        })
}

/// A segment size: small (headers may not fit), typical, or large enough that 64 of them
/// pass 65,000 bytes.
fn arb_seg() -> impl Strategy<Value = usize> {
    prop_oneof![1usize..40, 40usize..300, 1000usize..1400]
}

/// A buffer holding a GRO burst at `start..end` with segment size `seg`.
#[derive(Debug)]
struct Burst {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    seg: usize,
}

///
/// A third of the bursts are uniform, one header throughout and nothing corrupted (what a
/// client's GSO send looks like), so runs reach the segment and byte limits.
fn arb_burst() -> impl Strategy<Value = Burst> {
    (
        arb_seg(),
        vec(arb_spec(), 1..=150),
        prop::bool::weighted(0.35),
        any::<Index>(),
        vec(any::<u8>(), 0..24),
        vec(any::<u8>(), 0..24),
    )
        .prop_map(|(seg, mut specs, uniform, last, pre, post)| {
            if uniform {
                for s in &mut specs {
                    (s.repeat, s.corrupt) = (true, None);
                }
            }
            let mut buf = pre;
            let start = buf.len();
            let (mut dst, mut frag) = (specs[0].dst.clone(), specs[0].frag);
            for (i, s) in specs.iter().enumerate() {
                if !s.repeat || i == 0 {
                    (dst, frag) = (s.dst.clone(), s.frag);
                }
                let mut d = Vec::with_capacity(seg + 262);
                encode_udp_header_addr(frag, &dst, &mut d);
                let p = d.len();
                d.resize(seg.max(p), 0);
                for (j, b) in d[p..].iter_mut().enumerate() {
                    *b = s.fill.wrapping_add(j as u8);
                }
                d.truncate(seg);
                if let Some((at, byte)) = s.corrupt {
                    let at = at.index(d.len());
                    d[at] = byte;
                }
                if i + 1 == specs.len() {
                    d.truncate(1 + last.index(seg));
                }
                buf.extend_from_slice(&d);
            }
            let end = buf.len();
            buf.extend_from_slice(&post);
            Burst {
                buf,
                start,
                end,
                seg,
            }
        })
}

/// An offset or length: mostly near a small buffer, sometimes anything.
fn arb_offset() -> impl Strategy<Value = usize> {
    prop_oneof![8 => 0usize..700, 1 => any::<usize>()]
}

proptest! {
    #[test]
    fn strip_matches_the_per_datagram_model(b in arb_burst()) {
        check_strip(&b.buf, b.start, b.end, b.seg)?;
    }

    #[test]
    fn strip_arbitrary_bytes_and_offsets(buf in vec(any::<u8>(), 0..600), start in arb_offset(),
                                         end in arb_offset(), seg in arb_offset()) {
        check_strip(&buf, start, end, seg)?;
        // And the same bytes as a whole burst.
        check_strip(&buf, 0, buf.len(), seg)?;
    }

    #[test]
    fn insert_headers_in_front_of_every_payload(
        src in arb_ip(), client in arb_ip(), seg in prop_oneof![Just(0usize), arb_seg()],
        n in 1usize..=90, last in any::<Index>(), fill in any::<u8>(),
        extra in 0usize..8, slack in 0usize..8,
    ) {
        let h = reply_header_len(src);
        let len = if seg == 0 { last.index(3000) } else { (n - 1) * seg + 1 + last.index(seg) };
        let start = h + extra;
        let mut buf = vec![0xEE; start + len + (n - 1) * h + slack];
        for (i, b) in buf[start..start + len].iter_mut().enumerate() {
            *b = fill.wrapping_add((i / 7) as u8);
        }
        prop_assert!(check_insert(&buf, start, start + len, seg, src, client)?);
    }

    #[test]
    fn insert_arbitrary_bytes_and_offsets(buf in vec(any::<u8>(), 0..600), start in arb_offset(),
                                          end in arb_offset(), seg in arb_offset(),
                                          src in arb_ip(), client in arb_ip()) {
        check_insert(&buf, start, end, seg, src, client)?;
    }

    #[test]
    fn insert_short_of_room_touches_nothing(
        src in arb_ip(), seg in 1usize..300, n in 2usize..=70, short in 1usize..=22,
    ) {
        let h = reply_header_len(src);
        let len = n * seg;
        let room = (n - 1) * h;
        let buf = vec![0x55; h + len + room.saturating_sub(short)];
        prop_assert!(!check_insert(&buf, h, h + len, seg, src, src)?);
    }
}
