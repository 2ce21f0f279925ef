//! Property tests over the whole codec: encode/decode round trips, "never
//! panics on arbitrary bytes", and chunking invariance of the server
//! handshake, which is what lets the shard feed it whatever a read returned.

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use proptest::collection::vec;
use proptest::prelude::*;

use super::client::ClientHandshake;
use super::codec::*;
use super::server::{ServerHandshake, Step};
use super::udp::{decode_udp_header, encode_udp_header, encode_udp_header_addr, UdpHeader};
use super::{Addr, Command, Method, Rep, Users};

/// Any IPv4 or IPv6 socket address (also used by `udp_burst`'s property tests).
pub(super) fn arb_ip() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::V4(SocketAddrV4::new(ip.into(), port))),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(ip),
            port,
            0,
            0
        ))),
    ]
}

fn arb_addr() -> impl Strategy<Value = Addr> {
    prop_oneof![
        arb_ip().prop_map(Addr::Ip),
        (vec(any::<u8>(), 1..=255), any::<u16>())
            .prop_map(|(name, port)| Addr::Domain(name.into(), port)),
    ]
}

fn done<T>(r: Result<Decoded<T>, super::ProtoError>) -> (T, usize) {
    match r {
        Ok(Decoded::Done(v, n)) => (v, n),
        Ok(Decoded::Incomplete) => panic!("incomplete"),
        Err(e) => panic!("error: {e}"),
    }
}

fn test_users() -> Users {
    let mut u = Users::new();
    u.insert(b"user", b"pass");
    u
}

/// A client stream that is mostly valid (so the machine gets deep into the
/// handshake) with an optional single-byte corruption.
fn arb_valid_stream() -> impl Strategy<Value = Vec<u8>> {
    (
        vec(any::<u8>(), 1..4),
        any::<bool>(),
        any::<bool>(),
        any::<u8>(),
        arb_addr(),
        vec(any::<u8>(), 0..16),
    )
        .prop_map(|(extra_methods, auth, good_pw, cmd, dst, early)| {
            let mut methods: Vec<Method> = extra_methods.into_iter().map(Method).collect();
            methods.push(if auth {
                Method::USERNAME_PASSWORD
            } else {
                Method::NO_AUTH
            });
            let mut s = Vec::new();
            encode_greeting(&methods, &mut s);
            if auth {
                let pw: &[u8] = if good_pw { b"pass" } else { b"nope" };
                encode_userpass(b"user", pw, &mut s).unwrap();
            }
            // Bias towards supported commands but keep unknown ones.
            let cmd = Command(if cmd < 200 { cmd % 3 + 1 } else { cmd });
            encode_request(cmd, &dst, &mut s);
            s.extend_from_slice(&early);
            s
        })
}

fn arb_stream() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => arb_valid_stream(),
        2 => (arb_valid_stream(), any::<prop::sample::Index>(), any::<u8>()).prop_map(|(mut s, i, b)| {
            let i = i.index(s.len());
            s[i] = b;
            s
        }),
        1 => vec(any::<u8>(), 0..64),
    ]
}

fn one_shot(stream: &[u8], users: Option<&Users>) -> (Step, usize, Vec<u8>) {
    let mut out = Vec::new();
    let (step, n) = ServerHandshake::new().advance(stream, users, &mut out);
    (step, n, out)
}

/// Feeds `stream` as the shard would: chunks arrive, and each call gets all
/// bytes not consumed so far.
fn chunked(stream: &[u8], cuts: &[usize], users: Option<&Users>) -> (Step, usize, Vec<u8>) {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    cuts.push(stream.len());
    cuts.sort_unstable();
    cuts.dedup();
    let mut hs = ServerHandshake::new();
    let mut out = Vec::new();
    let mut consumed = 0;
    let mut step = Step::NeedMore;
    for end in cuts {
        let (s, n) = hs.advance(&stream[consumed..end], users, &mut out);
        consumed += n;
        step = s;
        if step != Step::NeedMore {
            break;
        }
    }
    (step, consumed, out)
}

fn byte_at_a_time(stream: &[u8], users: Option<&Users>) -> (Step, usize, Vec<u8>) {
    let cuts: Vec<usize> = (0..=stream.len()).collect();
    chunked(stream, &cuts, users)
}

proptest! {
    #[test]
    fn addr_round_trip(a in arb_addr(), tail in vec(any::<u8>(), 0..8)) {
        let mut buf = Vec::new();
        a.encode(&mut buf);
        prop_assert_eq!(buf.len(), a.encoded_len());
        buf.extend_from_slice(&tail);
        let (b, n) = done(Addr::decode(&buf));
        prop_assert_eq!(n, a.encoded_len());
        prop_assert_eq!(b, a);
    }

    #[test]
    fn greeting_round_trip(m in vec(any::<u8>(), 1..=255)) {
        let methods: Vec<Method> = m.into_iter().map(Method).collect();
        let mut buf = Vec::new();
        encode_greeting(&methods, &mut buf);
        let (g, n) = done(decode_greeting(&buf));
        prop_assert_eq!(n, buf.len());
        prop_assert_eq!(g.methods, methods);
    }

    #[test]
    fn userpass_round_trip(u in vec(any::<u8>(), 0..=255), p in vec(any::<u8>(), 0..=255)) {
        let mut buf = Vec::new();
        encode_userpass(&u, &p, &mut buf).unwrap();
        let (up, n) = done(decode_userpass(&buf));
        prop_assert_eq!(n, buf.len());
        prop_assert_eq!(up, UserPass { uname: u, passwd: p });
    }

    #[test]
    fn method_and_status_round_trip(m in any::<u8>(), ok in any::<bool>()) {
        let mut buf = Vec::new();
        encode_method_selection(Method(m), &mut buf);
        prop_assert_eq!(done(decode_method_selection(&buf)), (Method(m), 2));
        buf.clear();
        encode_userpass_status(ok, &mut buf);
        prop_assert_eq!(done(decode_userpass_status(&buf)).0 == 0, ok);
    }

    #[test]
    fn request_round_trip(cmd in any::<u8>(), dst in arb_addr()) {
        let mut buf = Vec::new();
        encode_request(Command(cmd), &dst, &mut buf);
        let (r, n) = done(decode_request(&buf));
        prop_assert_eq!(n, buf.len());
        prop_assert_eq!(r, Request { cmd: Command(cmd), dst });
    }

    #[test]
    fn reply_round_trip(rep in any::<u8>(), bnd in arb_addr()) {
        let mut buf = Vec::new();
        encode_reply(Rep(rep), &bnd, &mut buf);
        let (r, n) = done(decode_reply(&buf));
        prop_assert_eq!(n, buf.len());
        prop_assert_eq!(r, Reply { rep: Rep(rep), bnd });
    }

    #[test]
    fn udp_round_trip(frag in any::<u8>(), dst in arb_addr(), src in arb_ip(),
                      data in vec(any::<u8>(), 0..32)) {
        let mut buf = Vec::new();
        encode_udp_header_addr(frag, &dst, &mut buf);
        let hlen = buf.len();
        buf.extend_from_slice(&data);
        let (h, off) = decode_udp_header(&buf).unwrap();
        prop_assert_eq!(off, hlen);
        prop_assert_eq!(&buf[off..], &data[..]);
        prop_assert_eq!(h, UdpHeader { frag, dst });

        let mut slice = [0u8; 22];
        let n = encode_udp_header(frag, &src, &mut slice);
        let (h, off) = decode_udp_header(&slice[..n]).unwrap();
        prop_assert_eq!(off, n);
        prop_assert_eq!(h, UdpHeader { frag, dst: Addr::Ip(src) });
    }

    #[test]
    fn decoders_never_panic(buf in vec(any::<u8>(), 0..300)) {
        let _ = Addr::decode(&buf);
        let _ = decode_greeting(&buf);
        let _ = decode_userpass(&buf);
        let _ = decode_request(&buf);
        let _ = decode_method_selection(&buf);
        let _ = decode_userpass_status(&buf);
        let _ = decode_reply(&buf);
        let _ = decode_udp_header(&buf);
        let users = test_users();
        for u in [None, Some(&users)] {
            let mut hs = ServerHandshake::new();
            let mut out = Vec::new();
            let (_, n) = hs.advance(&buf, u, &mut out);
            prop_assert!(n <= buf.len());
            // Further calls after any outcome must not panic either.
            let _ = hs.advance(&buf[n..], u, &mut out);
            let _ = hs.advance(&buf, u, &mut out);
        }
        let mut c = ClientHandshake::new(Addr::Ip("1.2.3.4:5".parse().unwrap()), Command::CONNECT, None);
        let mut out = Vec::new();
        c.start(&mut out);
        let _ = c.advance(&buf, &mut out);
        let _ = c.advance(&buf, &mut out);
    }

    #[test]
    fn decoder_prefixes_are_incomplete_or_same_error(stream in arb_stream()) {
        // For every decoder, a prefix of the input either is Incomplete or
        // yields exactly the verdict of the whole input.
        fn check<T: PartialEq + std::fmt::Debug>(
            buf: &[u8],
            dec: fn(&[u8]) -> Result<Decoded<T>, super::ProtoError>,
        ) -> Result<(), TestCaseError> {
            let whole = dec(buf);
            for i in 0..buf.len() {
                let part = dec(&buf[..i]);
                if part != Ok(Decoded::Incomplete) {
                    prop_assert_eq!(&part, &whole, "prefix {}", i);
                }
            }
            Ok(())
        }
        check(&stream, decode_greeting)?;
        check(&stream, decode_userpass)?;
        check(&stream, decode_request)?;
        check(&stream, decode_reply)?;
    }

    #[test]
    fn server_chunking_invariant(stream in arb_stream(), cuts in vec(any::<usize>(), 0..8)) {
        let users = test_users();
        for u in [None, Some(&users)] {
            let whole = one_shot(&stream, u);
            prop_assert_eq!(&chunked(&stream, &cuts, u), &whole);
            prop_assert_eq!(&byte_at_a_time(&stream, u), &whole);
        }
    }

    #[test]
    fn pipelined_consumed_points_at_early_data(dst in arb_addr(), early in vec(any::<u8>(), 0..64),
                                              auth in any::<bool>()) {
        let users = test_users();
        let mut s = Vec::new();
        encode_greeting(&[if auth { Method::USERNAME_PASSWORD } else { Method::NO_AUTH }], &mut s);
        if auth {
            encode_userpass(b"user", b"pass", &mut s).unwrap();
        }
        encode_request(Command::CONNECT, &dst, &mut s);
        let hlen = s.len();
        s.extend_from_slice(&early);
        let (step, n, _) = one_shot(&s, auth.then_some(&users));
        prop_assert_eq!(step, Step::Request(Request { cmd: Command::CONNECT, dst }));
        prop_assert_eq!(n, hlen);
        prop_assert_eq!(&s[n..], &early[..]);
    }
}
