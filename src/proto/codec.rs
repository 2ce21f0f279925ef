//! Encoders and decoders for every RFC 1928 / RFC 1929 stream message, for
//! both the server side (the relay) and the client side (loadgen, tests).
//!
//! Decoders take the unconsumed input and say either "not enough bytes yet"
//! (`Decoded::Incomplete`, the normal case on a stream) or how many bytes the
//! message took. Fields are checked in wire order as soon as they arrive, so
//! a malformed message is rejected as early as possible and the verdict does
//! not depend on how the stream was chunked.

use super::addr::Addr;
use super::error::ProtoError;
use super::wire::{Command, Method, Rep, USERPASS_VERSION, VERSION};

/// Result of a successful decode attempt.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Decoded<T> {
    /// The buffer is a valid prefix; wait for more bytes.
    Incomplete,
    /// A whole message and the number of bytes it took.
    Done(T, usize),
}

impl<T> Decoded<T> {
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Decoded<U> {
        match self {
            Decoded::Incomplete => Decoded::Incomplete,
            Decoded::Done(v, n) => Decoded::Done(f(v), n),
        }
    }
}

/// Method-selection greeting: `VER NMETHODS METHODS`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Greeting {
    pub methods: Vec<Method>,
}

/// RFC 1929 request: `VER(0x01) ULEN UNAME PLEN PASSWD`.
#[derive(Clone, PartialEq, Eq)]
pub struct UserPass {
    pub uname: Vec<u8>,
    pub passwd: Vec<u8>,
}

// Hand-written so a password never lands in a log line via `{:?}`.
impl std::fmt::Debug for UserPass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserPass")
            .field("uname", &String::from_utf8_lossy(&self.uname))
            .field("passwd", &"<redacted>")
            .finish()
    }
}

/// Request: `VER CMD RSV ATYP DST.ADDR DST.PORT`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Request {
    pub cmd: Command,
    pub dst: Addr,
}

/// Reply: `VER REP RSV ATYP BND.ADDR BND.PORT`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Reply {
    pub rep: Rep,
    pub bnd: Addr,
}

fn check_version(buf: &[u8]) -> Result<(), ProtoError> {
    match buf.first() {
        Some(&v) if v != VERSION => Err(ProtoError::BadVersion(v)),
        _ => Ok(()),
    }
}

fn check_reserved(buf: &[u8], at: usize) -> Result<(), ProtoError> {
    match buf.get(at) {
        Some(&r) if r != 0 => Err(ProtoError::BadReserved(r)),
        _ => Ok(()),
    }
}

/// Shared by request and reply, which differ only in the meaning of byte 1.
fn decode_ver_code_rsv_addr(buf: &[u8]) -> Result<Decoded<(u8, Addr)>, ProtoError> {
    check_version(buf)?;
    check_reserved(buf, 2)?;
    if buf.len() < 4 {
        return Ok(Decoded::Incomplete);
    }
    Ok(match Addr::decode(&buf[3..])? {
        Decoded::Incomplete => Decoded::Incomplete,
        Decoded::Done(addr, n) => Decoded::Done((buf[1], addr), 3 + n),
    })
}

// ---- server side -------------------------------------------------------

pub fn decode_greeting(buf: &[u8]) -> Result<Decoded<Greeting>, ProtoError> {
    check_version(buf)?;
    let Some(&n) = buf.get(1) else {
        return Ok(Decoded::Incomplete);
    };
    if n == 0 {
        return Err(ProtoError::NoMethods);
    }
    let end = 2 + n as usize;
    let Some(methods) = buf.get(2..end) else {
        return Ok(Decoded::Incomplete);
    };
    let methods = methods.iter().map(|&m| Method(m)).collect();
    Ok(Decoded::Done(Greeting { methods }, end))
}

/// A zero `ULEN`/`PLEN` is accepted here (RFC 1929 says 1..=255): such
/// credentials simply never verify, which gives the client the ordinary
/// "auth failed" answer rather than a protocol error.
pub fn decode_userpass(buf: &[u8]) -> Result<Decoded<UserPass>, ProtoError> {
    match buf.first() {
        None => return Ok(Decoded::Incomplete),
        Some(&v) if v != USERPASS_VERSION => return Err(ProtoError::BadAuthVersion(v)),
        Some(_) => {}
    }
    let Some(&ulen) = buf.get(1) else {
        return Ok(Decoded::Incomplete);
    };
    let uend = 2 + ulen as usize;
    let Some(&plen) = buf.get(uend) else {
        return Ok(Decoded::Incomplete);
    };
    let pend = uend + 1 + plen as usize;
    if buf.len() < pend {
        return Ok(Decoded::Incomplete);
    }
    Ok(Decoded::Done(
        UserPass {
            uname: buf[2..uend].to_vec(),
            passwd: buf[uend + 1..pend].to_vec(),
        },
        pend,
    ))
}

/// Any `CMD` byte decodes: whether it is supported is the caller's call.
pub fn decode_request(buf: &[u8]) -> Result<Decoded<Request>, ProtoError> {
    Ok(decode_ver_code_rsv_addr(buf)?.map(|(cmd, dst)| Request {
        cmd: Command(cmd),
        dst,
    }))
}

pub fn encode_method_selection(m: Method, out: &mut Vec<u8>) {
    out.extend_from_slice(&[VERSION, m.0]);
}

/// RFC 1929 status: 0x00 success, anything else failure (we send 0x01).
pub fn encode_userpass_status(ok: bool, out: &mut Vec<u8>) {
    out.extend_from_slice(&[USERPASS_VERSION, if ok { 0x00 } else { 0x01 }]);
}

pub fn encode_reply(rep: Rep, bnd: &Addr, out: &mut Vec<u8>) {
    out.reserve(3 + bnd.encoded_len());
    out.extend_from_slice(&[VERSION, rep.0, 0x00]);
    bnd.encode(out);
}

// ---- client side -------------------------------------------------------

/// Methods beyond 255 are dropped: `NMETHODS` is one byte.
pub fn encode_greeting(methods: &[Method], out: &mut Vec<u8>) {
    let methods = &methods[..methods.len().min(255)];
    out.reserve(2 + methods.len());
    out.push(VERSION);
    out.push(methods.len() as u8);
    out.extend(methods.iter().map(|m| m.0));
}

/// Fails with `FieldTooLong` (writing nothing) if either field exceeds 255
/// bytes.
pub fn encode_userpass(uname: &[u8], passwd: &[u8], out: &mut Vec<u8>) -> Result<(), ProtoError> {
    if uname.len() > 255 || passwd.len() > 255 {
        return Err(ProtoError::FieldTooLong);
    }
    out.reserve(3 + uname.len() + passwd.len());
    out.push(USERPASS_VERSION);
    out.push(uname.len() as u8);
    out.extend_from_slice(uname);
    out.push(passwd.len() as u8);
    out.extend_from_slice(passwd);
    Ok(())
}

pub fn encode_request(cmd: Command, dst: &Addr, out: &mut Vec<u8>) {
    out.reserve(3 + dst.encoded_len());
    out.extend_from_slice(&[VERSION, cmd.0, 0x00]);
    dst.encode(out);
}

pub fn decode_method_selection(buf: &[u8]) -> Result<Decoded<Method>, ProtoError> {
    check_version(buf)?;
    match buf.get(1) {
        None => Ok(Decoded::Incomplete),
        Some(&m) => Ok(Decoded::Done(Method(m), 2)),
    }
}

/// Returns the raw `STATUS` byte (0x00 = success).
pub fn decode_userpass_status(buf: &[u8]) -> Result<Decoded<u8>, ProtoError> {
    match buf.first() {
        None => Ok(Decoded::Incomplete),
        Some(&v) if v != USERPASS_VERSION => Err(ProtoError::BadAuthVersion(v)),
        Some(_) => match buf.get(1) {
            None => Ok(Decoded::Incomplete),
            Some(&s) => Ok(Decoded::Done(s, 2)),
        },
    }
}

pub fn decode_reply(buf: &[u8]) -> Result<Decoded<Reply>, ProtoError> {
    Ok(decode_ver_code_rsv_addr(buf)?.map(|(rep, bnd)| Reply { rep: Rep(rep), bnd }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::wire::Atyp;

    fn v4(s: &str) -> Addr {
        Addr::Ip(s.parse().unwrap())
    }

    /// Every strict prefix of a valid message must be Incomplete.
    fn assert_prefixes_incomplete<T: std::fmt::Debug>(
        bytes: &[u8],
        dec: fn(&[u8]) -> Result<Decoded<T>, ProtoError>,
    ) {
        for i in 0..bytes.len() {
            assert!(
                matches!(dec(&bytes[..i]), Ok(Decoded::Incomplete)),
                "prefix {i} of {bytes:02x?}: {:?}",
                dec(&bytes[..i])
            );
        }
    }

    #[test]
    fn greeting_layout() {
        // VER NMETHODS METHODS
        let bytes = [0x05, 0x02, 0x00, 0x02];
        let g = Greeting {
            methods: vec![Method::NO_AUTH, Method::USERNAME_PASSWORD],
        };
        assert_eq!(decode_greeting(&bytes), Ok(Decoded::Done(g.clone(), 4)));
        let mut out = Vec::new();
        encode_greeting(&g.methods, &mut out);
        assert_eq!(out, bytes);
        assert_prefixes_incomplete(&bytes, decode_greeting);
        // Unknown and GSSAPI methods survive decoding.
        assert_eq!(
            decode_greeting(&[0x05, 0x02, 0x01, 0x80, 0xAA]),
            Ok(Decoded::Done(
                Greeting {
                    methods: vec![Method::GSSAPI, Method(0x80)]
                },
                4
            ))
        );
    }

    #[test]
    fn greeting_errors() {
        assert_eq!(decode_greeting(&[0x04]), Err(ProtoError::BadVersion(4)));
        assert_eq!(
            decode_greeting(b"GET / HTTP/1.1"),
            Err(ProtoError::BadVersion(b'G'))
        );
        assert_eq!(decode_greeting(&[0x05, 0x00]), Err(ProtoError::NoMethods));
    }

    #[test]
    fn method_selection_layout() {
        for m in [
            Method::NO_AUTH,
            Method::GSSAPI,
            Method::USERNAME_PASSWORD,
            Method::NO_ACCEPTABLE,
        ] {
            let mut out = Vec::new();
            encode_method_selection(m, &mut out);
            assert_eq!(out, [0x05, m.0]);
            assert_eq!(decode_method_selection(&out), Ok(Decoded::Done(m, 2)));
        }
        assert_eq!(decode_method_selection(&[0x05]), Ok(Decoded::Incomplete));
        assert_eq!(decode_method_selection(&[]), Ok(Decoded::Incomplete));
        assert_eq!(
            decode_method_selection(&[0x04, 0]),
            Err(ProtoError::BadVersion(4))
        );
    }

    #[test]
    fn userpass_layout() {
        // VER ULEN UNAME PLEN PASSWD
        let bytes = [0x01, 0x03, b'b', b'o', b'b', 0x02, b'p', b'w'];
        let up = UserPass {
            uname: b"bob".to_vec(),
            passwd: b"pw".to_vec(),
        };
        assert_eq!(decode_userpass(&bytes), Ok(Decoded::Done(up, 8)));
        let mut out = Vec::new();
        encode_userpass(b"bob", b"pw", &mut out).unwrap();
        assert_eq!(out, bytes);
        assert_prefixes_incomplete(&bytes, decode_userpass);
        assert_eq!(
            decode_userpass(&[0x05, 1]),
            Err(ProtoError::BadAuthVersion(5))
        );
        // Maximal lengths.
        let mut out = Vec::new();
        encode_userpass(&[b'u'; 255], &[b'p'; 255], &mut out).unwrap();
        assert_eq!(out.len(), 3 + 255 + 255);
        assert_eq!(out[1], 0xFF);
        assert_eq!(out[2 + 255], 0xFF);
        assert!(matches!(decode_userpass(&out), Ok(Decoded::Done(_, 513))));
    }

    #[test]
    fn userpass_too_long_writes_nothing() {
        let mut out = vec![0xAA];
        assert_eq!(
            encode_userpass(&[0; 256], b"p", &mut out),
            Err(ProtoError::FieldTooLong)
        );
        assert_eq!(
            encode_userpass(b"u", &[0; 256], &mut out),
            Err(ProtoError::FieldTooLong)
        );
        assert_eq!(out, [0xAA]);
    }

    #[test]
    fn userpass_status_layout() {
        let mut out = Vec::new();
        encode_userpass_status(true, &mut out);
        encode_userpass_status(false, &mut out);
        assert_eq!(out, [0x01, 0x00, 0x01, 0x01]);
        assert_eq!(decode_userpass_status(&out), Ok(Decoded::Done(0, 2)));
        assert_eq!(decode_userpass_status(&out[2..]), Ok(Decoded::Done(1, 2)));
        assert_eq!(decode_userpass_status(&out[..1]), Ok(Decoded::Incomplete));
        assert_eq!(
            decode_userpass_status(&[0x05, 0]),
            Err(ProtoError::BadAuthVersion(5))
        );
    }

    #[test]
    fn request_every_atyp() {
        // CONNECT 10.0.0.1:443
        let bytes = [0x05, 0x01, 0x00, 0x01, 10, 0, 0, 1, 0x01, 0xBB];
        let req = Request {
            cmd: Command::CONNECT,
            dst: v4("10.0.0.1:443"),
        };
        assert_eq!(decode_request(&bytes), Ok(Decoded::Done(req.clone(), 10)));
        let mut out = Vec::new();
        encode_request(req.cmd, &req.dst, &mut out);
        assert_eq!(out, bytes);
        assert_prefixes_incomplete(&bytes, decode_request);

        // BIND [::1]:22
        let mut bytes = vec![0x05, 0x02, 0x00, 0x04];
        bytes.extend_from_slice(&[0; 15]);
        bytes.extend_from_slice(&[1, 0x00, 0x16]);
        let req = Request {
            cmd: Command::BIND,
            dst: Addr::Ip("[::1]:22".parse().unwrap()),
        };
        assert_eq!(decode_request(&bytes), Ok(Decoded::Done(req.clone(), 22)));
        let mut out = Vec::new();
        encode_request(req.cmd, &req.dst, &mut out);
        assert_eq!(out, bytes);
        assert_prefixes_incomplete(&bytes, decode_request);

        // UDP ASSOCIATE example.com:53
        let mut bytes = vec![0x05, 0x03, 0x00, 0x03, 11];
        bytes.extend_from_slice(b"example.com");
        bytes.extend_from_slice(&[0x00, 0x35]);
        let req = Request {
            cmd: Command::UDP_ASSOCIATE,
            dst: Addr::domain(b"example.com", 53).unwrap(),
        };
        assert_eq!(decode_request(&bytes), Ok(Decoded::Done(req.clone(), 18)));
        let mut out = Vec::new();
        encode_request(req.cmd, &req.dst, &mut out);
        assert_eq!(out, bytes);
        assert_prefixes_incomplete(&bytes, decode_request);
    }

    #[test]
    fn request_domain_len_1_and_255() {
        for len in [1usize, 255] {
            let mut bytes = vec![0x05, 0x01, 0x00, 0x03, len as u8];
            bytes.extend_from_slice(&vec![b'z'; len]);
            bytes.extend_from_slice(&[0x00, 0x50]);
            let d = decode_request(&bytes).unwrap();
            let Decoded::Done(req, n) = d else { panic!() };
            assert_eq!(n, bytes.len());
            assert_eq!(req.dst, Addr::domain(&vec![b'z'; len], 80).unwrap());
        }
    }

    #[test]
    fn request_unknown_cmd_decodes_and_errors_in_order() {
        let bytes = [0x05, 0x09, 0x00, 0x01, 1, 2, 3, 4, 0, 80];
        assert_eq!(
            decode_request(&bytes),
            Ok(Decoded::Done(
                Request {
                    cmd: Command(9),
                    dst: v4("1.2.3.4:80")
                },
                10
            ))
        );
        assert_eq!(
            decode_request(&[0x04, 0x01]),
            Err(ProtoError::BadVersion(4))
        );
        assert_eq!(
            decode_request(&[0x05, 0x01, 0x07]),
            Err(ProtoError::BadReserved(7))
        );
        assert_eq!(
            decode_request(&[0x05, 0x01, 0x00, 0x02, 0, 0]),
            Err(ProtoError::UnsupportedAtyp(2))
        );
        assert_eq!(
            decode_request(&[0x05, 0x01, 0x00, 0x03, 0x00, 0, 80]),
            Err(ProtoError::EmptyDomain)
        );
    }

    #[test]
    fn reply_every_rep() {
        for rep in 0x00..=0x08u8 {
            let bytes = [0x05, rep, 0x00, 0x01, 127, 0, 0, 1, 0x04, 0x38];
            let reply = Reply {
                rep: Rep(rep),
                bnd: v4("127.0.0.1:1080"),
            };
            let mut out = Vec::new();
            encode_reply(reply.rep, &reply.bnd, &mut out);
            assert_eq!(out, bytes);
            assert_eq!(decode_reply(&bytes), Ok(Decoded::Done(reply, 10)));
            assert_prefixes_incomplete(&bytes, decode_reply);
        }
        assert_eq!(Rep::SUCCEEDED, Rep(0));
        assert_eq!(Rep::ADDRESS_TYPE_NOT_SUPPORTED, Rep(8));
    }

    #[test]
    fn reply_ipv6_and_domain() {
        let mut bytes = vec![0x05, 0x00, 0x00, 0x04];
        bytes.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x2a]);
        bytes.extend_from_slice(&[0xC3, 0x50]);
        let bnd = Addr::Ip("[fe80::2a]:50000".parse().unwrap());
        let mut out = Vec::new();
        encode_reply(Rep::SUCCEEDED, &bnd, &mut out);
        assert_eq!(out, bytes);
        assert_eq!(
            decode_reply(&bytes),
            Ok(Decoded::Done(
                Reply {
                    rep: Rep::SUCCEEDED,
                    bnd
                },
                22
            ))
        );
        let bytes = [0x05, 0x00, 0x00, 0x03, 1, b'h', 0, 1];
        assert!(matches!(decode_reply(&bytes), Ok(Decoded::Done(_, 8))));
        assert_eq!(
            decode_reply(&[0x05, 0x00, 0x01]),
            Err(ProtoError::BadReserved(1))
        );
    }

    #[test]
    fn wire_consts_match_rfc() {
        assert_eq!(
            [
                Command::CONNECT.0,
                Command::BIND.0,
                Command::UDP_ASSOCIATE.0
            ],
            [1, 2, 3]
        );
        assert_eq!([Atyp::IPV4.0, Atyp::DOMAINNAME.0, Atyp::IPV6.0], [1, 3, 4]);
        assert_eq!(
            [
                Method::NO_AUTH.0,
                Method::GSSAPI.0,
                Method::USERNAME_PASSWORD.0,
                Method::NO_ACCEPTABLE.0
            ],
            [0, 1, 2, 0xFF]
        );
    }

    #[test]
    fn userpass_debug_redacts_password() {
        let up = UserPass {
            uname: b"bob".to_vec(),
            passwd: b"hunter2".to_vec(),
        };
        let s = format!("{up:?}");
        assert!(s.contains("bob") && !s.contains("hunter2"), "{s}");
    }
}
