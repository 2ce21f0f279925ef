//! HAProxy's PROXY protocol header (version 1 text and version 2 binary), sans-IO decoder.
//!
//! A load balancer in front of the relay (HAProxy, nginx, an NLB, ...) prepends one PROXY
//! header to each connection saying who the real client is. This file owns recognising and
//! decoding that header and nothing else: whether a listener expects one, which peers may send
//! one, and what to do with the addresses are the caller's business. [`decode`] is a pure
//! function over the unconsumed input, like the SOCKS decoders in `codec`: it says "need more
//! bytes", "here is the header and how many bytes it took", or "this cannot be a header". So it
//! is unit-, property- and fuzz-tested (`fuzz/fuzz_targets/proxy_header.rs`) without sockets,
//! and the verdict never depends on how reads split the stream: it re-reads from the start on
//! every call (a header is at most [`MAX_HEADER`] bytes, so that is cheap), a prefix of a valid
//! header is always [`Parsed::NeedMore`], and once a prefix is refused every longer input is
//! refused with the same error.
//!
//! It never consumes past the header: bytes pipelined after it (a SOCKS greeting sent in the
//! same segment) stay in the buffer for the next decoder.
//!
//! What is accepted (haproxy's `doc/proxy-protocol.txt`):
//! - v1: `PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\r\n` with exactly one space between
//!   fields; IPv4 as a dotted quad without leading zeros, IPv6 in any textual form the standard
//!   library parses (including IPv4-mapped and embedded-IPv4 forms, returned as they are: the
//!   caller canonicalises); ports decimal 0..=65535 with no sign and no leading zero; the
//!   address kind must match the family. `PROXY UNKNOWN` followed by a space or the CRLF
//!   gives [`ProxyAddrs::Local`], whatever comes between it and the CRLF.
//! - v2: the 12-byte signature, version 2, command LOCAL (0) or PROXY (1), and the length.
//!   LOCAL gives [`ProxyAddrs::Local`] and its block (family included) is skipped unread, as
//!   the spec says. PROXY with TCP over IPv4 (0x11) or IPv6 (0x21) gives the addresses; with
//!   UDP (0x12, 0x22), AF_UNIX (0x31, 0x32) or UNSPEC (0x00) it gives [`ProxyAddrs::Local`]
//!   (the spec's "fall back to UNSPEC" for protocols a receiver does not implement). The
//!   length must cover the family's address block; the TLVs after it are skipped, checked only
//!   for staying inside the header (each TLV's 3-byte head and value must fit). Their
//!   contents, CRC32c included, are not interpreted.
//!
//! What is refused:
//! - anything whose first bytes are neither `PROXY ` nor the v2 signature ([`ProxyError::NotProxy`],
//!   after the first differing byte: a SOCKS5 greeting or a TLS ClientHello fails at byte one,
//!   because the spec forbids guessing whether a header is present);
//! - v1: any other protocol word, a missing, empty or extra field, any byte outside printable
//!   ASCII before the CR (in the `UNKNOWN` tail too: the line is US-ASCII text), a CR not
//!   followed by LF, a bare LF, and no CRLF within 107 bytes ([`ProxyError::TooLong`]);
//! - v2: another version, a command other than LOCAL/PROXY, with PROXY an address family or
//!   transport other than the seven listed above, a length shorter than the address block, a
//!   TLV running past the header, and a length above 1024 ([`ProxyError::TooLong`]: the spec
//!   lets the header grow to 64 KiB, but nothing we relay needs TLVs that large and the cap
//!   bounds what an unauthenticated peer can make us buffer).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// What a PROXY header says about the connection it precedes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyAddrs {
    /// TCP over IPv4/IPv6: the original client (source) and the address it connected to (destination).
    Tcp { src: SocketAddr, dst: SocketAddr },
    /// v1 "UNKNOWN", v2 LOCAL command, or v2 with an address family we do not relay (AF_UNIX, UDP, unspec):
    /// the connection's own addresses stand.
    Local,
}

/// Why the bytes at the start of a connection are not an acceptable PROXY header.
/// "Not enough bytes yet" is not an error: see [`Parsed::NeedMore`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProxyError {
    /// The bytes cannot start a v1 or a v2 header.
    NotProxy,
    /// A v1 (text) header that breaks the format; says which part.
    BadV1(&'static str),
    /// A v2 (binary) header that breaks the format; says which part.
    BadV2(&'static str),
    /// A v1 line with no CRLF in its first 107 bytes, or a v2 header longer than [`MAX_HEADER`].
    TooLong,
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyError::NotProxy => f.write_str("not a PROXY protocol header"),
            ProxyError::BadV1(why) => write!(f, "v1: {why}"),
            ProxyError::BadV2(why) => write!(f, "v2: {why}"),
            ProxyError::TooLong => f.write_str("PROXY protocol header too long"),
        }
    }
}

impl std::error::Error for ProxyError {}

/// Outcome of [`decode`] on a buffer that can still be, or is, a PROXY header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The buffer is a valid prefix of a header; wait for more bytes.
    NeedMore,
    /// A whole header: what it says, and its length (the bytes after it are not part of it).
    Done { addrs: ProxyAddrs, consumed: usize },
}

/// Longest v1 line, CRLF included (the spec's "worst case" `UNKNOWN` line).
const V1_MAX: usize = 107;
/// Longest v2 address block + TLVs we accept.
const V2_MAX_BODY: usize = 1024;
/// Longest header we accept: v1 is at most 107 bytes; v2 is 16 + length, capped at 16 + 1024
/// (a longer v2 header is [`ProxyError::TooLong`]).
pub const MAX_HEADER: usize = 16 + V2_MAX_BODY;

const V1_PREFIX: &[u8] = b"PROXY ";
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Decodes a PROXY header at the start of `buf` (v1 or v2, told apart by the first bytes).
///
/// `NeedMore` while `buf` is a valid prefix of a header (the empty buffer included); `Err` as
/// soon as it cannot be one (including after the first byte for a non-PROXY client, so a SOCKS
/// greeting 0x05... fails at once). `Done` never counts bytes past the header, and once `buf`
/// holds [`MAX_HEADER`] bytes the answer is never `NeedMore`, so a caller can bound what it
/// buffers by that.
pub fn decode(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let (magic, v1): (&[u8], bool) = match buf.first() {
        None => return Ok(Parsed::NeedMore),
        Some(b'P') => (V1_PREFIX, true),
        Some(b'\r') => (V2_SIGNATURE, false),
        Some(_) => return Err(ProxyError::NotProxy),
    };
    let seen = buf.len().min(magic.len());
    if buf[..seen] != magic[..seen] {
        return Err(ProxyError::NotProxy);
    }
    match (seen < magic.len(), v1) {
        (true, _) => Ok(Parsed::NeedMore),
        (false, true) => decode_v1(buf),
        (false, false) => decode_v2(buf),
    }
}

/// How the printable part of a v1 line ends within the bytes we have.
enum LineEnd {
    /// Input ran out before 107 bytes: more may come.
    Open,
    /// 107 bytes and no room left for the CRLF.
    Full,
    /// A CR, the LF not here yet.
    Cr,
    /// The CRLF; the header is this many bytes.
    CrLf(usize),
    /// A byte that cannot be in the line.
    Bad(&'static str),
}

/// `buf` starts with `PROXY `.
fn decode_v1(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let stop = window
        .iter()
        .position(|b| !(b' '..=b'~').contains(b))
        .unwrap_or(window.len());
    let end = match window.get(stop) {
        None if window.len() == V1_MAX => LineEnd::Full,
        None => LineEnd::Open,
        Some(b'\r') => match window.get(stop + 1) {
            Some(b'\n') => LineEnd::CrLf(stop + 2),
            Some(_) => LineEnd::Bad("CR not followed by LF"),
            None if stop + 1 == V1_MAX => LineEnd::Full,
            None => LineEnd::Cr,
        },
        Some(b'\n') => LineEnd::Bad("LF without CR"),
        Some(_) => LineEnd::Bad("byte outside printable ASCII"),
    };
    // A CR ends the line whatever follows it, so its last field is whole; without one, the
    // last field may still grow.
    let ended = window.get(stop) == Some(&b'\r');
    // Field errors are checked first, so a prefix refused for a field is refused the same way
    // whatever follows it.
    match (parse_v1_line(&window[V1_PREFIX.len()..stop], ended)?, end) {
        (Some(addrs), LineEnd::CrLf(consumed)) => Ok(Parsed::Done { addrs, consumed }),
        (None, LineEnd::CrLf(_)) => Err(ProxyError::BadV1("line ends early")),
        (None, _) if ended => Err(ProxyError::BadV1("line ends early")),
        (_, LineEnd::Open | LineEnd::Cr) => Ok(Parsed::NeedMore),
        (_, LineEnd::Full) => Err(ProxyError::TooLong),
        (_, LineEnd::Bad(why)) => Err(ProxyError::BadV1(why)),
    }
}

/// Parses what follows `PROXY ` up to (not including) the CR or the end of the input.
/// `ended`: the line is terminated, so its last field is whole. `Ok(None)`: a valid prefix
/// of a line, not all of one.
fn parse_v1_line(line: &[u8], ended: bool) -> Result<Option<ProxyAddrs>, ProxyError> {
    let mut rest = Some(line);
    let Some((proto, whole)) = next_field(&mut rest, ended) else {
        return Ok(None);
    };
    let v6 = match proto {
        b"TCP4" => false,
        b"TCP6" => true,
        // Everything after UNKNOWN up to the CRLF is ignored.
        b"UNKNOWN" => return Ok(whole.then_some(ProxyAddrs::Local)),
        p if !whole
            && [&b"TCP4"[..], b"TCP6", b"UNKNOWN"]
                .iter()
                .any(|t| t.starts_with(p)) =>
        {
            return Ok(None)
        }
        _ => return Err(ProxyError::BadV1("bad protocol")),
    };
    let src = ip_field(next_field(&mut rest, ended), v6, "bad source address")?;
    let dst = ip_field(next_field(&mut rest, ended), v6, "bad destination address")?;
    let sport = port_field(next_field(&mut rest, ended), "bad source port")?;
    let dport = port_field(next_field(&mut rest, ended), "bad destination port")?;
    if rest.is_some() {
        return Err(ProxyError::BadV1("field after destination port"));
    }
    Ok(match (src, dst, sport, dport) {
        (Some(src), Some(dst), Some(sport), Some(dport)) => Some(ProxyAddrs::Tcp {
            src: SocketAddr::new(src, sport),
            dst: SocketAddr::new(dst, dport),
        }),
        _ => None,
    })
}

/// The next space-separated field and whether it is whole (a space follows it, or the line
/// ended); `None` once the input is used up.
fn next_field<'a>(rest: &mut Option<&'a [u8]>, ended: bool) -> Option<(&'a [u8], bool)> {
    let s = rest.take()?;
    match s.iter().position(|&b| b == b' ') {
        Some(i) => {
            *rest = Some(&s[i + 1..]);
            Some((&s[..i], true))
        }
        None => Some((s, ended)),
    }
}

/// An address field: a partial one is checked for its characters and length only, a whole one
/// must parse as an address of the line's family.
fn ip_field(
    field: Option<(&[u8], bool)>,
    v6: bool,
    why: &'static str,
) -> Result<Option<IpAddr>, ProxyError> {
    let Some((s, whole)) = field else {
        return Ok(None);
    };
    let bad = ProxyError::BadV1(why);
    // Longest forms: "255.255.255.255" and "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255".
    let (max, charset_ok) = if v6 {
        (
            45,
            s.iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.'),
        )
    } else {
        (15, s.iter().all(|&b| b.is_ascii_digit() || b == b'.'))
    };
    if s.len() > max || !charset_ok {
        return Err(bad);
    }
    if !whole {
        return Ok(None);
    }
    // The charset check above leaves only ASCII.
    let text = std::str::from_utf8(s).map_err(|_| bad.clone())?;
    let ip = if v6 {
        text.parse::<Ipv6Addr>().map(IpAddr::V6)
    } else {
        // std's parser refuses leading zeros in octets, as the spec asks.
        text.parse::<Ipv4Addr>().map(IpAddr::V4)
    };
    ip.map(Some).map_err(|_| bad)
}

/// A port field: decimal digits, no leading zero, at most 65535. Checked as the digits arrive.
fn port_field(field: Option<(&[u8], bool)>, why: &'static str) -> Result<Option<u16>, ProxyError> {
    let Some((s, whole)) = field else {
        return Ok(None);
    };
    let bad = ProxyError::BadV1(why);
    if s.len() > 5 || !s.iter().all(u8::is_ascii_digit) || (s.len() > 1 && s[0] == b'0') {
        return Err(bad);
    }
    let value = s.iter().fold(0u32, |v, &d| v * 10 + u32::from(d - b'0'));
    let port = u16::try_from(value).map_err(|_| bad.clone())?;
    match (whole, s.is_empty()) {
        (false, _) => Ok(None),
        (true, true) => Err(bad),
        (true, false) => Ok(Some(port)),
    }
}

/// `buf` starts with the 12-byte v2 signature.
fn decode_v2(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let Some(&ver_cmd) = buf.get(12) else {
        return Ok(Parsed::NeedMore);
    };
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::BadV2("version is not 2"));
    }
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        _ => return Err(ProxyError::BadV2("command is neither LOCAL nor PROXY")),
    };
    let Some(&fam) = buf.get(13) else {
        return Ok(Parsed::NeedMore);
    };
    // Size of the address block, for PROXY only: LOCAL ignores the family and its block.
    let addr_len = if local {
        None
    } else {
        Some(match fam {
            0x00 => 0,
            0x11 | 0x12 => 12,
            0x21 | 0x22 => 36,
            0x31 | 0x32 => 216,
            _ => return Err(ProxyError::BadV2("unknown address family or transport")),
        })
    };
    let Some(&[hi, lo]) = buf.get(14..16) else {
        return Ok(Parsed::NeedMore);
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if len > V2_MAX_BODY {
        return Err(ProxyError::TooLong);
    }
    let total = 16 + len;
    if let Some(addr_len) = addr_len {
        if len < addr_len {
            return Err(ProxyError::BadV2("length shorter than the addresses"));
        }
        // TLVs follow a known address block (not UNSPEC's, whose contents are unspecified).
        // Walk the heads we have, so an overrun fails as soon as it is visible.
        if fam != 0x00 {
            let mut at = 16 + addr_len;
            while at < total {
                if at + 3 > total {
                    return Err(ProxyError::BadV2("TLV runs past the header"));
                }
                let Some(&[_, hi, lo]) = buf.get(at..at + 3) else {
                    break;
                };
                at += 3 + usize::from(u16::from_be_bytes([hi, lo]));
                if at > total {
                    return Err(ProxyError::BadV2("TLV runs past the header"));
                }
            }
        }
    }
    if buf.len() < total {
        return Ok(Parsed::NeedMore);
    }
    let a = &buf[16..total];
    let port = |i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
    let addrs = match (local, fam) {
        (false, 0x11) => {
            let ip = |i: usize| IpAddr::from([a[i], a[i + 1], a[i + 2], a[i + 3]]);
            ProxyAddrs::Tcp {
                src: SocketAddr::new(ip(0), port(8)),
                dst: SocketAddr::new(ip(4), port(10)),
            }
        }
        (false, 0x21) => {
            let ip = |i: usize| {
                let mut o = [0u8; 16];
                o.copy_from_slice(&a[i..i + 16]);
                IpAddr::from(o)
            };
            ProxyAddrs::Tcp {
                src: SocketAddr::new(ip(0), port(32)),
                dst: SocketAddr::new(ip(16), port(34)),
            }
        }
        _ => ProxyAddrs::Local,
    };
    Ok(Parsed::Done {
        addrs,
        consumed: total,
    })
}

#[cfg(test)]
mod tests {
    use std::net::{SocketAddrV4, SocketAddrV6};

    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;

    const GREETING: [u8; 3] = [5, 1, 0];

    fn tcp(src: &str, dst: &str) -> ProxyAddrs {
        ProxyAddrs::Tcp {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
        }
    }

    fn done(addrs: ProxyAddrs, consumed: usize) -> Result<Parsed, ProxyError> {
        Ok(Parsed::Done { addrs, consumed })
    }

    /// A v2 header: `ver_cmd`, `fam`, then `body` (addresses and TLVs), length from `body`.
    fn v2(ver_cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut v = V2_SIGNATURE.to_vec();
        v.push(ver_cmd);
        v.push(fam);
        v.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
        let mut v = vec![kind];
        v.extend_from_slice(&u16::try_from(value.len()).unwrap().to_be_bytes());
        v.extend_from_slice(value);
        v
    }

    /// The v2 address block for a TCP/UDP pair (both of one family).
    fn v2_addrs(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
        let mut v = Vec::new();
        for a in [src, dst] {
            match a.ip() {
                IpAddr::V4(ip) => v.extend_from_slice(&ip.octets()),
                IpAddr::V6(ip) => v.extend_from_slice(&ip.octets()),
            }
        }
        v.extend_from_slice(&src.port().to_be_bytes());
        v.extend_from_slice(&dst.port().to_be_bytes());
        v
    }

    fn v1_tcp(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
        let fam = if src.is_ipv4() { "TCP4" } else { "TCP6" };
        format!(
            "PROXY {fam} {} {} {} {}\r\n",
            src.ip(),
            dst.ip(),
            src.port(),
            dst.port()
        )
        .into_bytes()
    }

    /// Asserts that `header` decodes to `want` and that every shorter prefix is `NeedMore`,
    /// whether or not a SOCKS greeting follows it.
    fn check_valid(header: &[u8], want: ProxyAddrs) {
        for n in 0..header.len() {
            assert_eq!(
                decode(&header[..n]),
                Ok(Parsed::NeedMore),
                "prefix of {n} bytes of {:?}",
                header.escape_ascii().to_string()
            );
        }
        assert_eq!(decode(header), done(want, header.len()));
        let mut piped = header.to_vec();
        piped.extend_from_slice(&GREETING);
        assert_eq!(decode(&piped), done(want, header.len()));
        assert_eq!(&piped[header.len()..], &GREETING);
    }

    fn v1_err(line: &str) -> ProxyError {
        decode(line.as_bytes()).unwrap_err()
    }

    #[test]
    fn v1_tcp4() {
        check_valid(
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
            tcp("192.168.0.1:56324", "192.168.0.11:443"),
        );
        check_valid(
            b"PROXY TCP4 255.255.255.255 0.0.0.0 65535 0\r\n",
            tcp("255.255.255.255:65535", "0.0.0.0:0"),
        );
    }

    #[test]
    fn v1_tcp6() {
        check_valid(
            b"PROXY TCP6 2001:db8::1 ::1 1111 2222\r\n",
            tcp("[2001:db8::1]:1111", "[::1]:2222"),
        );
        let full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let line = format!("PROXY TCP6 {full} {full} 65535 65535\r\n");
        assert_eq!(line.len(), 104);
        let a = format!("[{full}]:65535");
        check_valid(line.as_bytes(), tcp(&a, &a));
        // IPv4-mapped comes back as it was sent; upper-case hex is fine.
        check_valid(
            b"PROXY TCP6 ::FFFF:10.0.0.1 2001:DB8::2 1 2\r\n",
            tcp("[::ffff:10.0.0.1]:1", "[2001:db8::2]:2"),
        );
    }

    #[test]
    fn v1_unknown() {
        check_valid(b"PROXY UNKNOWN\r\n", ProxyAddrs::Local);
        check_valid(
            b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1111 2222\r\n",
            ProxyAddrs::Local,
        );
        check_valid(b"PROXY UNKNOWN whatever  at all!\r\n", ProxyAddrs::Local);
        // The spec's worst case is exactly the limit.
        let f = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let line = format!("PROXY UNKNOWN {f} {f} 65535 65535\r\n");
        assert_eq!(line.len(), V1_MAX);
        check_valid(line.as_bytes(), ProxyAddrs::Local);
    }

    #[test]
    fn v1_too_long() {
        let f = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        // One byte over: the CR is the 107th byte, no room for the LF.
        let line = format!("PROXY UNKNOWN {f} {f} 65535 655350\r\n");
        assert_eq!(line.len(), V1_MAX + 1);
        assert_eq!(decode(&line.as_bytes()[..V1_MAX - 1]), Ok(Parsed::NeedMore));
        assert_eq!(decode(&line.as_bytes()[..V1_MAX]), Err(ProxyError::TooLong));
        assert_eq!(decode(line.as_bytes()), Err(ProxyError::TooLong));
        // No CRLF at all.
        let long = format!("PROXY UNKNOWN {}", "x".repeat(200));
        assert_eq!(decode(&long.as_bytes()[..106]), Ok(Parsed::NeedMore));
        assert_eq!(decode(&long.as_bytes()[..107]), Err(ProxyError::TooLong));
        assert_eq!(decode(long.as_bytes()), Err(ProxyError::TooLong));
        // An IPv4-mapped TCP6 line in its longest spelling does not fit.
        let m = "0000:0000:0000:0000:0000:ffff:255.255.255.255";
        let line = format!("PROXY TCP6 {m} {m} 65535 65535\r\n");
        assert_eq!(decode(line.as_bytes()), Err(ProxyError::TooLong));
    }

    #[test]
    fn v1_errors() {
        use ProxyError::BadV1;
        let cases: &[(&str, ProxyError)] = &[
            ("PROXY X", BadV1("bad protocol")),
            ("PROXY TCP5", BadV1("bad protocol")),
            ("PROXY TCP ", BadV1("bad protocol")),
            ("PROXY tcp4 ", BadV1("bad protocol")),
            ("PROXY UNKNOWNX", BadV1("bad protocol")),
            // A CR ends the line: the word before it is whole, whatever follows the CR.
            ("PROXY UNK\r", BadV1("bad protocol")),
            ("PROXY UNK\rOWN\r\n", BadV1("bad protocol")),
            ("PROXY TCP4 1.2.3.4\rX", BadV1("line ends early")),
            ("PROXY  TCP4", BadV1("bad protocol")),
            ("PROXY TCP4\r\n", BadV1("line ends early")),
            ("PROXY \r\n", BadV1("bad protocol")),
            ("PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", BadV1("line ends early")),
            ("PROXY TCP4  1.2.3.4", BadV1("bad source address")),
            ("PROXY TCP4 1.2.3.4  5", BadV1("bad destination address")),
            (
                "PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
                BadV1("bad source address"),
            ),
            (
                "PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
                BadV1("bad source address"),
            ),
            (
                "PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
                BadV1("bad source address"),
            ),
            ("PROXY TCP4 ::1", BadV1("bad source address")),
            (
                "PROXY TCP4 1.2.3.4 ::1 1 2\r\n",
                BadV1("bad destination address"),
            ),
            (
                "PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
                BadV1("bad source address"),
            ),
            ("PROXY TCP6 ::1 ::g", BadV1("bad destination address")),
            ("PROXY TCP6 fe80::1%eth0", BadV1("bad source address")),
            ("PROXY TCP4 1.2.3.4 5.6.7.8 01", BadV1("bad source port")),
            ("PROXY TCP4 1.2.3.4 5.6.7.8 +1", BadV1("bad source port")),
            ("PROXY TCP4 1.2.3.4 5.6.7.8 65536", BadV1("bad source port")),
            (
                "PROXY TCP4 1.2.3.4 5.6.7.8 100000",
                BadV1("bad source port"),
            ),
            (
                "PROXY TCP4 1.2.3.4 5.6.7.8 1  2",
                BadV1("bad destination port"),
            ),
            (
                "PROXY TCP4 1.2.3.4 5.6.7.8 1 00",
                BadV1("bad destination port"),
            ),
            (
                "PROXY TCP4 1.2.3.4 5.6.7.8 1 -2",
                BadV1("bad destination port"),
            ),
            (
                "PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ",
                BadV1("field after destination port"),
            ),
            (
                "PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
                BadV1("field after destination port"),
            ),
            ("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", BadV1("LF without CR")),
            (
                "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",
                BadV1("CR not followed by LF"),
            ),
            (
                "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\t",
                BadV1("byte outside printable ASCII"),
            ),
            ("PROXY UNKNOWN \0", BadV1("byte outside printable ASCII")),
            (
                "PROXY UNKNOWN caf\u{e9}\r\n",
                BadV1("byte outside printable ASCII"),
            ),
        ];
        for (line, want) in cases {
            assert_eq!(&v1_err(line), want, "{line:?}");
        }
    }

    #[test]
    fn not_proxy_at_the_first_differing_byte() {
        assert_eq!(decode(b""), Ok(Parsed::NeedMore));
        assert_eq!(decode(&[5]), Err(ProxyError::NotProxy));
        assert_eq!(decode(&GREETING), Err(ProxyError::NotProxy));
        assert_eq!(decode(&[5, 2, 0, 2]), Err(ProxyError::NotProxy));
        // A TLS ClientHello record: handshake(0x16), TLS 1.0 record version.
        assert_eq!(decode(&[0x16]), Err(ProxyError::NotProxy));
        assert_eq!(
            decode(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]),
            Err(ProxyError::NotProxy)
        );
        assert_eq!(decode(b"GET / HTTP/1.1\r\n"), Err(ProxyError::NotProxy));
        assert_eq!(decode(b"P"), Ok(Parsed::NeedMore));
        assert_eq!(decode(b"POST / HTTP/1.1\r\n"), Err(ProxyError::NotProxy));
        assert_eq!(decode(b"PROXY"), Ok(Parsed::NeedMore));
        assert_eq!(decode(b"PROXYTCP4"), Err(ProxyError::NotProxy));
        assert_eq!(decode(b"proxy TCP4"), Err(ProxyError::NotProxy));
        assert_eq!(decode(b"\r\n\r\n\0\r\nQUI"), Ok(Parsed::NeedMore));
        assert_eq!(decode(b"\r\n\r\n\x01"), Err(ProxyError::NotProxy));
        assert_eq!(decode(b"\r\n\r\n\0\r\nQUIT\r"), Err(ProxyError::NotProxy));
        assert_eq!(decode(b"\r\nGET"), Err(ProxyError::NotProxy));
    }

    #[test]
    fn v2_proxy_tcp4_with_tlvs() {
        let (src, dst) = (
            "10.1.2.3:40000".parse().unwrap(),
            "192.0.2.1:1080".parse().unwrap(),
        );
        let mut body = v2_addrs(src, dst);
        check_valid(&v2(0x21, 0x11, &body), ProxyAddrs::Tcp { src, dst });
        body.extend(tlv(0x01, b"h2")); // ALPN
        body.extend(tlv(0x02, b"proxy.example")); // authority
        body.extend(tlv(0x04, &[0; 5])); // NOOP padding
        body.extend(tlv(0x20, &[])); // empty value
        check_valid(&v2(0x21, 0x11, &body), ProxyAddrs::Tcp { src, dst });
    }

    #[test]
    fn v2_proxy_tcp6() {
        let src: SocketAddr = "[2001:db8::7]:5555".parse().unwrap();
        let dst: SocketAddr = "[::ffff:192.0.2.1]:443".parse().unwrap();
        let mut body = v2_addrs(src, dst);
        check_valid(&v2(0x21, 0x21, &body), ProxyAddrs::Tcp { src, dst });
        body.extend(tlv(0x03, &[1, 2, 3, 4])); // CRC32c, not checked
        check_valid(&v2(0x21, 0x21, &body), ProxyAddrs::Tcp { src, dst });
    }

    #[test]
    fn v2_local_and_unrelayed_families() {
        let (s4, d4): (SocketAddr, SocketAddr) =
            ("1.2.3.4:1".parse().unwrap(), "5.6.7.8:2".parse().unwrap());
        let (s6, d6): (SocketAddr, SocketAddr) =
            ("[::1]:1".parse().unwrap(), "[::2]:2".parse().unwrap());
        // LOCAL: no addresses, or some, or a family no one defined: all skipped.
        check_valid(&v2(0x20, 0x00, &[]), ProxyAddrs::Local);
        check_valid(&v2(0x20, 0x11, &v2_addrs(s4, d4)), ProxyAddrs::Local);
        check_valid(&v2(0x20, 0x11, &[]), ProxyAddrs::Local);
        check_valid(&v2(0x20, 0x77, &[9; 7]), ProxyAddrs::Local);
        // PROXY with a family we do not relay: the connection's own addresses.
        check_valid(&v2(0x21, 0x00, &[]), ProxyAddrs::Local);
        check_valid(&v2(0x21, 0x00, &[1, 2]), ProxyAddrs::Local);
        check_valid(&v2(0x21, 0x12, &v2_addrs(s4, d4)), ProxyAddrs::Local);
        check_valid(&v2(0x21, 0x22, &v2_addrs(s6, d6)), ProxyAddrs::Local);
        let mut unix = vec![0u8; 216];
        unix[..9].copy_from_slice(b"/run/sock");
        check_valid(&v2(0x21, 0x31, &unix), ProxyAddrs::Local);
        unix.extend(tlv(0x05, b"id"));
        check_valid(&v2(0x21, 0x32, &unix), ProxyAddrs::Local);
    }

    #[test]
    fn v2_largest_accepted() {
        let (src, dst) = ("1.2.3.4:1".parse().unwrap(), "5.6.7.8:2".parse().unwrap());
        let mut body = v2_addrs(src, dst);
        body.extend(tlv(0x04, &vec![0; V2_MAX_BODY - 12 - 3]));
        let h = v2(0x21, 0x11, &body);
        assert_eq!(h.len(), MAX_HEADER);
        check_valid(&h, ProxyAddrs::Tcp { src, dst });
    }

    #[test]
    fn v2_errors() {
        use ProxyError::{BadV2, TooLong};
        let a4 = v2_addrs("1.2.3.4:1".parse().unwrap(), "5.6.7.8:2".parse().unwrap());
        let cases: Vec<(Vec<u8>, ProxyError)> = vec![
            (v2(0x11, 0x11, &a4), BadV2("version is not 2")),
            (v2(0x31, 0x11, &a4), BadV2("version is not 2")),
            (
                v2(0x22, 0x11, &a4),
                BadV2("command is neither LOCAL nor PROXY"),
            ),
            (
                v2(0x2f, 0x00, &[]),
                BadV2("command is neither LOCAL nor PROXY"),
            ),
            (
                v2(0x21, 0x13, &a4),
                BadV2("unknown address family or transport"),
            ),
            (
                v2(0x21, 0x10, &a4),
                BadV2("unknown address family or transport"),
            ),
            (
                v2(0x21, 0x01, &[]),
                BadV2("unknown address family or transport"),
            ),
            (
                v2(0x21, 0x41, &a4),
                BadV2("unknown address family or transport"),
            ),
            (
                v2(0x21, 0x11, &a4[..11]),
                BadV2("length shorter than the addresses"),
            ),
            (
                v2(0x21, 0x21, &a4),
                BadV2("length shorter than the addresses"),
            ),
            (
                v2(0x21, 0x31, &[0; 215]),
                BadV2("length shorter than the addresses"),
            ),
            (
                v2(0x21, 0x11, &[&a4[..], &[1, 0]].concat()),
                BadV2("TLV runs past the header"),
            ),
            (
                v2(0x21, 0x11, &[&a4[..], &[1, 0, 2, b'h']].concat()),
                BadV2("TLV runs past the header"),
            ),
            (
                v2(
                    0x21,
                    0x11,
                    &[&a4[..], &tlv(1, b"h2"), &[4, 0, 0, 0]].concat(),
                ),
                BadV2("TLV runs past the header"),
            ),
            (v2(0x21, 0x11, &vec![0; V2_MAX_BODY + 1]), TooLong),
            (v2(0x20, 0x00, &vec![0; 0xffff]), TooLong),
        ];
        for (h, want) in cases {
            assert_eq!(
                decode(&h),
                Err(want.clone()),
                "{:?}",
                h.escape_ascii().to_string()
            );
        }
        // Each is refused as soon as the offending byte is in.
        assert_eq!(
            decode(&v2(0x11, 0x11, &a4)[..13]),
            Err(BadV2("version is not 2"))
        );
        assert_eq!(
            decode(&v2(0x21, 0x13, &a4)[..14]),
            Err(BadV2("unknown address family or transport"))
        );
        assert_eq!(decode(&v2(0x21, 0x11, &vec![0; 2000])[..16]), Err(TooLong));
        let overrun = v2(0x21, 0x11, &[&a4[..], &[1, 0, 9], &[0; 5]].concat());
        assert_eq!(decode(&overrun[..30]), Ok(Parsed::NeedMore));
        assert_eq!(
            decode(&overrun[..31]),
            Err(BadV2("TLV runs past the header"))
        );
    }

    #[test]
    fn display_is_short_and_lowercase() {
        assert_eq!(
            ProxyError::NotProxy.to_string(),
            "not a PROXY protocol header"
        );
        assert_eq!(
            ProxyError::BadV1("bad source address").to_string(),
            "v1: bad source address"
        );
        assert_eq!(
            ProxyError::BadV2("version is not 2").to_string(),
            "v2: version is not 2"
        );
        assert_eq!(
            ProxyError::TooLong.to_string(),
            "PROXY protocol header too long"
        );
    }

    fn arb_v4() -> impl Strategy<Value = SocketAddr> {
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::V4(SocketAddrV4::new(ip.into(), port)))
    }

    fn arb_v6() -> impl Strategy<Value = SocketAddr> {
        (any::<[u8; 16]>(), any::<u16>(), any::<bool>()).prop_map(|(mut ip, port, mapped)| {
            if mapped {
                ip[..12].copy_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
            }
            SocketAddr::V6(SocketAddrV6::new(ip.into(), port, 0, 0))
        })
    }

    fn arb_tlvs() -> impl Strategy<Value = Vec<u8>> {
        vec((any::<u8>(), vec(any::<u8>(), 0..40)), 0..6)
            .prop_map(|ts| ts.iter().flat_map(|(k, v)| tlv(*k, v)).collect())
    }

    /// Any header we accept, with what it must decode to.
    fn arb_header() -> impl Strategy<Value = (Vec<u8>, ProxyAddrs)> {
        let pair = prop_oneof![(arb_v4(), arb_v4()), (arb_v6(), arb_v6())];
        prop_oneof![
            pair.clone()
                .prop_map(|(src, dst)| (v1_tcp(src, dst), ProxyAddrs::Tcp { src, dst })),
            "[ -~]{0,91}".prop_map(|tail| {
                let sep = if tail.is_empty() { "" } else { " " };
                (
                    format!("PROXY UNKNOWN{sep}{tail}\r\n").into_bytes(),
                    ProxyAddrs::Local,
                )
            }),
            (pair, arb_tlvs()).prop_map(|((src, dst), tlvs)| {
                let fam = if src.is_ipv4() { 0x11 } else { 0x21 };
                let body = [v2_addrs(src, dst), tlvs].concat();
                (v2(0x21, fam, &body), ProxyAddrs::Tcp { src, dst })
            }),
            (any::<u8>(), vec(any::<u8>(), 0..300))
                .prop_map(|(fam, body)| (v2(0x20, fam, &body), ProxyAddrs::Local)),
            (
                prop::sample::select(vec![0x12u8, 0x22, 0x31, 0x32]),
                vec(any::<u8>(), 216),
                arb_tlvs()
            )
                .prop_map(|(fam, addrs, tlvs)| {
                    let n = match fam {
                        0x12 => 12,
                        0x22 => 36,
                        _ => 216,
                    };
                    let body = [&addrs[..n], &tlvs[..]].concat();
                    (v2(0x21, fam, &body), ProxyAddrs::Local)
                }),
            vec(any::<u8>(), 0..64).prop_map(|body| (v2(0x21, 0x00, &body), ProxyAddrs::Local)),
        ]
    }

    /// The verdict does not depend on where the input stops: each prefix is `NeedMore` or has
    /// the verdict of the whole.
    fn check_prefixes(data: &[u8]) {
        let whole = decode(data);
        for n in 0..data.len() {
            let part = decode(&data[..n]);
            assert!(
                part == Ok(Parsed::NeedMore) || part == whole,
                "{n} bytes of {:?}: {part:?}, whole: {whole:?}",
                data.escape_ascii().to_string()
            );
        }
    }

    proptest! {
        #[test]
        fn never_panics(data in vec(any::<u8>(), 0..1200)) {
            let _ = decode(&data);
        }

        #[test]
        fn never_needs_more_than_max_header(
            (header, _) in arb_header(),
            edits in vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
        ) {
            let mut data = header;
            data.resize(MAX_HEADER, b' ');
            for (at, b) in edits {
                let i = at.index(data.len());
                data[i] = b;
            }
            prop_assert_ne!(decode(&data), Ok(Parsed::NeedMore));
        }

        #[test]
        fn valid_headers_take_exactly_their_length(
            (header, want) in arb_header(),
            trailing in vec(any::<u8>(), 0..64),
        ) {
            let data = [&header[..], &trailing[..]].concat();
            prop_assert_eq!(decode(&data), done(want, header.len()));
            for n in 0..header.len() {
                prop_assert_eq!(decode(&data[..n]), Ok(Parsed::NeedMore));
            }
        }

        #[test]
        fn verdict_is_prefix_stable(
            (header, _) in arb_header(),
            edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            trailing in vec(any::<u8>(), 0..8),
        ) {
            let mut data = [&header[..], &trailing[..]].concat();
            for (at, b) in edits {
                let i = at.index(data.len());
                data[i] = b;
            }
            check_prefixes(&data);
        }

        #[test]
        fn v1_printable_mutations_are_prefix_stable(
            line in "PROXY (TCP4|TCP6|UNKNOWN)[ 0-9a-fA-F.:]{0,110}(\r\n)?",
        ) {
            check_prefixes(line.as_bytes());
        }
    }
}
