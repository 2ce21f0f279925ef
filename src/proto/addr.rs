//! The SOCKS address (`ATYP` + `DST.ADDR`/`BND.ADDR` + port) shared by
//! requests, replies and UDP headers.
//!
//! Domain names are kept as the raw bytes the client sent: RFC 1928 does not
//! promise UTF-8, and the resolver wants bytes anyway. Only `Display` (for
//! log lines) converts, lossily.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use super::codec::Decoded;
use super::error::ProtoError;
use super::wire::Atyp;

/// A destination or bound address as carried on the wire.
#[derive(Clone, PartialEq, Eq, Debug, Hash)]
pub enum Addr {
    Ip(SocketAddr),
    /// 1..=255 raw bytes as sent, plus port. Build it with [`Addr::domain`]
    /// to have the length checked.
    Domain(Box<[u8]>, u16),
}

impl Addr {
    /// Checked constructor for a domain address: the one-byte length prefix
    /// limits a name to 1..=255 bytes.
    pub fn domain(name: &[u8], port: u16) -> Result<Addr, ProtoError> {
        match name.len() {
            0 => Err(ProtoError::EmptyDomain),
            1..=255 => Ok(Addr::Domain(name.into(), port)),
            _ => Err(ProtoError::FieldTooLong),
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            Addr::Ip(sa) => sa.port(),
            Addr::Domain(_, port) => *port,
        }
    }

    pub fn atyp(&self) -> Atyp {
        match self {
            Addr::Ip(SocketAddr::V4(_)) => Atyp::IPV4,
            Addr::Ip(SocketAddr::V6(_)) => Atyp::IPV6,
            Addr::Domain(..) => Atyp::DOMAINNAME,
        }
    }

    /// Length of `ATYP` + address + port on the wire.
    pub fn encoded_len(&self) -> usize {
        match self {
            Addr::Ip(SocketAddr::V4(_)) => 1 + 4 + 2,
            Addr::Ip(SocketAddr::V6(_)) => 1 + 16 + 2,
            Addr::Domain(name, _) => 1 + 1 + name.len().min(255) + 2,
        }
    }

    /// Appends `ATYP` + address + port.
    ///
    /// A domain longer than 255 bytes cannot be represented; it is a bug in
    /// the caller (use [`Addr::domain`]), so it asserts in debug builds and is
    /// cut to 255 bytes in release rather than taking the shard down.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.atyp().0);
        match self {
            Addr::Ip(SocketAddr::V4(sa)) => out.extend_from_slice(&sa.ip().octets()),
            Addr::Ip(SocketAddr::V6(sa)) => out.extend_from_slice(&sa.ip().octets()),
            Addr::Domain(name, _) => {
                debug_assert!(name.len() <= 255, "domain longer than 255 bytes");
                let name = &name[..name.len().min(255)];
                out.push(name.len() as u8);
                out.extend_from_slice(name);
            }
        }
        out.extend_from_slice(&self.port().to_be_bytes());
    }

    /// Decodes `ATYP` + address + port from the start of `buf`.
    ///
    /// Fields are validated in wire order as soon as their bytes are present,
    /// so any prefix of a bad message fails with the same error as the whole
    /// message (or is `Incomplete`): the result never depends on chunking.
    pub fn decode(buf: &[u8]) -> Result<Decoded<Addr>, ProtoError> {
        let Some(&atyp) = buf.first() else {
            return Ok(Decoded::Incomplete);
        };
        match Atyp(atyp) {
            Atyp::IPV4 => {
                let Some(b) = buf.get(1..7) else {
                    return Ok(Decoded::Incomplete);
                };
                let ip = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
                let port = u16::from_be_bytes([b[4], b[5]]);
                Ok(Decoded::Done(
                    Addr::Ip(SocketAddr::V4(SocketAddrV4::new(ip, port))),
                    7,
                ))
            }
            Atyp::IPV6 => {
                let Some(b) = buf.get(1..19) else {
                    return Ok(Decoded::Incomplete);
                };
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&b[..16]);
                let port = u16::from_be_bytes([b[16], b[17]]);
                Ok(Decoded::Done(
                    Addr::Ip(SocketAddr::V6(SocketAddrV6::new(
                        Ipv6Addr::from(octets),
                        port,
                        0,
                        0,
                    ))),
                    19,
                ))
            }
            Atyp::DOMAINNAME => {
                let Some(&len) = buf.get(1) else {
                    return Ok(Decoded::Incomplete);
                };
                if len == 0 {
                    return Err(ProtoError::EmptyDomain);
                }
                let end = 2 + len as usize;
                let Some(b) = buf.get(2..end + 2) else {
                    return Ok(Decoded::Incomplete);
                };
                let (name, port) = b.split_at(len as usize);
                let port = u16::from_be_bytes([port[0], port[1]]);
                Ok(Decoded::Done(Addr::Domain(name.into(), port), end + 2))
            }
            Atyp(other) => Err(ProtoError::UnsupportedAtyp(other)),
        }
    }
}

impl From<SocketAddr> for Addr {
    fn from(sa: SocketAddr) -> Self {
        Addr::Ip(sa)
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Ip(sa) => sa.fmt(f),
            Addr::Domain(name, port) => {
                // The name is attacker-chosen and ends up in log lines:
                // escape control characters so it cannot forge lines.
                for ch in String::from_utf8_lossy(name).chars() {
                    if ch.is_control() {
                        write!(f, "{}", ch.escape_default())?;
                    } else {
                        write!(f, "{ch}")?;
                    }
                }
                write!(f, ":{port}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(a: &Addr) -> Vec<u8> {
        let mut v = Vec::new();
        a.encode(&mut v);
        assert_eq!(v.len(), a.encoded_len());
        v
    }

    #[test]
    fn ipv4_layout() {
        let bytes = [0x01, 192, 168, 1, 2, 0x1F, 0x90];
        let a = Addr::Ip("192.168.1.2:8080".parse().unwrap());
        assert_eq!(Addr::decode(&bytes), Ok(Decoded::Done(a.clone(), 7)));
        assert_eq!(enc(&a), bytes);
        assert_eq!(a.to_string(), "192.168.1.2:8080");
        assert_eq!(a.port(), 8080);
    }

    #[test]
    fn ipv6_layout() {
        let mut bytes = vec![0x04];
        bytes.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        bytes.extend_from_slice(&[0x00, 0x50]);
        let a = Addr::Ip("[2001:db8::1]:80".parse().unwrap());
        assert_eq!(Addr::decode(&bytes), Ok(Decoded::Done(a.clone(), 19)));
        assert_eq!(enc(&a), bytes);
        assert_eq!(a.to_string(), "[2001:db8::1]:80");
    }

    #[test]
    fn domain_len_1_and_255() {
        let bytes = [0x03, 0x01, b'a', 0x00, 0x35];
        let a = Addr::domain(b"a", 53).unwrap();
        assert_eq!(Addr::decode(&bytes), Ok(Decoded::Done(a.clone(), 5)));
        assert_eq!(enc(&a), bytes);
        assert_eq!(a.to_string(), "a:53");

        let name = [b'x'; 255];
        let mut bytes = vec![0x03, 0xFF];
        bytes.extend_from_slice(&name);
        bytes.extend_from_slice(&[0x01, 0xBB]);
        let a = Addr::domain(&name, 443).unwrap();
        assert_eq!(Addr::decode(&bytes), Ok(Decoded::Done(a.clone(), 259)));
        assert_eq!(enc(&a), bytes);
    }

    #[test]
    fn domain_constructor_checks_length() {
        assert_eq!(Addr::domain(b"", 1), Err(ProtoError::EmptyDomain));
        assert_eq!(Addr::domain(&[b'a'; 256], 1), Err(ProtoError::FieldTooLong));
    }

    #[test]
    fn errors_and_incomplete() {
        assert_eq!(Addr::decode(&[]), Ok(Decoded::Incomplete));
        assert_eq!(
            Addr::decode(&[0x01, 1, 2, 3, 4, 0]),
            Ok(Decoded::Incomplete)
        );
        assert_eq!(Addr::decode(&[0x03]), Ok(Decoded::Incomplete));
        assert_eq!(
            Addr::decode(&[0x03, 2, b'a', b'b', 0]),
            Ok(Decoded::Incomplete)
        );
        assert_eq!(
            Addr::decode(&[0x03, 0, 0, 80]),
            Err(ProtoError::EmptyDomain)
        );
        assert_eq!(Addr::decode(&[0x02]), Err(ProtoError::UnsupportedAtyp(2)));
        assert_eq!(
            Addr::decode(&[0x00, 1, 2]),
            Err(ProtoError::UnsupportedAtyp(0))
        );
    }

    #[test]
    fn display_escapes_and_is_lossy() {
        let a = Addr::domain(b"ex\nample.com", 80).unwrap();
        assert_eq!(a.to_string(), "ex\\nample.com:80");
        let a = Addr::domain(&[0xFF, b'a'], 1).unwrap();
        assert_eq!(a.to_string(), "\u{FFFD}a:1");
        let a = Addr::from("[::1]:80".parse::<SocketAddr>().unwrap());
        assert_eq!(a.to_string(), "[::1]:80");
    }
}
