//! Fuzzes the in-place rewriting of UDP GRO bursts in `ringsocks::proto::udp_burst`.
//!
//! The first 7 input bytes choose `start`, the burst length, the segment size, the
//! source's address family, the route and spare room after the data; the rest is the
//! buffer. Besides "never panics", every run must be a send GSO can carry, inside the
//! burst, and carry exactly what handling each datagram alone would have produced.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use ringsocks::proto::udp::{decode_udp_header, encode_udp_header};
use ringsocks::proto::udp_burst::{
    burst_datagrams, insert_reply_headers, reply_header_len, strip_client_burst, Aside, Run,
    GSO_MAX_BYTES, GSO_MAX_SEGMENTS,
};
use ringsocks::proto::Addr;

/// The datagram ranges of `start..end`, computed independently of the crate.
fn ranges(start: usize, end: usize, seg: usize) -> Vec<(usize, usize)> {
    if seg == 0 || seg >= end - start {
        return vec![(start, end)];
    }
    (start..end)
        .step_by(seg)
        .map(|s| (s, (s + seg).min(end)))
        .collect()
}

/// A run is one GSO send inside `lo..hi`; returns its datagram ranges.
fn check_run(r: &Run, lo: usize, hi: usize) -> Vec<(usize, usize)> {
    assert!(r.is_well_formed(), "{r:?}");
    assert!(
        lo <= r.off as usize && r.off <= r.end && r.end as usize <= hi,
        "{r:?}"
    );
    assert!(r.count >= 1);
    if r.count > 1 {
        assert!(
            r.count <= GSO_MAX_SEGMENTS && r.end - r.off <= GSO_MAX_BYTES,
            "{r:?}"
        );
    }
    let d: Vec<(usize, usize)> = r
        .datagrams()
        .map(|(a, b)| (a as usize, b as usize))
        .collect();
    assert_eq!(d.len(), r.count as usize);
    for (i, &(a, b)) in d.iter().enumerate() {
        assert_eq!(a, r.off as usize + i * r.seg as usize);
        if i + 1 < d.len() {
            assert_eq!(b - a, r.seg as usize);
        } else {
            assert!(b - a <= r.seg as usize && (r.count == 1 || b > a), "{r:?}");
        }
    }
    d
}

fuzz_target!(|data: &[u8]| {
    let Some((head, body)) = data.split_first_chunk::<7>() else {
        return;
    };
    let start = usize::from(u16::from_le_bytes([head[0], head[1]]) % 512);
    let end = start + usize::from(u16::from_le_bytes([head[2], head[3]]));
    let seg = usize::from(u16::from_le_bytes([head[4], head[5]]));
    let flags = head[6];
    let mut orig = body.to_vec();
    orig.resize(orig.len() + usize::from(flags >> 3) * 64, 0);
    let refuse = u16::from(flags & 6);
    let route = |d: SocketAddr| (d.port() & 6 != refuse).then_some(d);

    // Client -> target, against one datagram at a time.
    let mut buf = orig.clone();
    let mut runs = Vec::new();
    let mut asides = 0usize;
    strip_client_burst(&mut buf, start, end, seg, route, &mut runs, |a| {
        if let Aside::Fragment { data, .. } | Aside::Domain { data, .. } = a {
            assert!(data.len() <= end - start);
        }
        asides += 1;
    });
    if start <= end && end <= orig.len() {
        let mut want: Vec<(SocketAddr, &[u8])> = Vec::new();
        let mut first = None;
        for (s, e) in ranges(start, end, seg) {
            if let Ok((h, n)) = decode_udp_header(&orig[s..e]) {
                if let (0, Addr::Ip(ip)) = (h.frag, h.dst) {
                    if let Some(to) = route(ip) {
                        first.get_or_insert(s + n);
                        want.push((to, &orig[s + n..e]));
                    }
                }
            }
        }
        assert_eq!(want.len() + asides, burst_datagrams(end - start, seg));
        assert_eq!(runs.first().map(|r| r.off as usize), first);
        let mut got = Vec::new();
        for (i, r) in runs.iter().enumerate() {
            if let Some(next) = runs.get(i + 1) {
                assert_eq!(r.end, next.off);
            }
            for (a, b) in check_run(r, start, end) {
                got.push((r.dst, &buf[a..b]));
            }
        }
        assert_eq!(got, want);
        assert_eq!(&buf[..start], &orig[..start]);
        assert_eq!(&buf[end..], &orig[end..]);
    } else {
        assert!(runs.is_empty() && asides == 0 && buf == orig);
    }

    // Target -> client.
    let src: SocketAddr = if flags & 1 == 0 {
        "198.51.100.7:5353".parse().unwrap()
    } else {
        "[2001:db8::53]:53".parse().unwrap()
    };
    let client: SocketAddr = "10.0.0.2:40000".parse().unwrap();
    let mut buf = orig.clone();
    let mut runs = Vec::new();
    if !insert_reply_headers(&mut buf, start, end, seg, src, client, &mut runs) {
        assert!(runs.is_empty() && buf == orig);
        return;
    }
    let h = reply_header_len(src);
    let mut hdr = [0u8; 22];
    encode_udp_header(0, &src, &mut hdr);
    let payloads = ranges(start, end, seg);
    let mut segs = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        assert_eq!(r.dst, client);
        if let Some(next) = runs.get(i + 1) {
            assert_eq!(r.end, next.off);
        }
        segs.extend(check_run(r, start - h, buf.len()));
    }
    assert_eq!(runs[0].off as usize, start - h);
    assert_eq!(segs.len(), payloads.len());
    for ((a, b), (pa, pb)) in segs.into_iter().zip(payloads) {
        assert_eq!(&buf[a..a + h], &hdr[..h]);
        assert_eq!(&buf[a + h..b], &orig[pa..pb]);
    }
});
