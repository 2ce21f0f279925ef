//! Protocol and relay errors, and the single mapping from an error to the
//! `REP` code the client sees.
//!
//! Keeping the errno/ProtoError -> `REP` table in exactly one function
//! (`RelayError::rep`) means the handshake machine, the relay's connect
//! path and the tests can never disagree about what a client is told.

use std::fmt;

use super::wire::Rep;

/// A message from the peer that does not follow RFC 1928 / RFC 1929, or a
/// failed negotiation. "Not enough bytes yet" is *not* an error: see
/// [`super::Decoded::Incomplete`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtoError {
    /// `VER` is not 0x05.
    BadVersion(u8),
    /// Greeting with `NMETHODS` = 0.
    NoMethods,
    /// RFC 1929 `VER` is not 0x01.
    BadAuthVersion(u8),
    /// A reserved byte (`RSV`) is not zero; carries the offending byte.
    BadReserved(u8),
    /// `ATYP` is not IPv4, domain name or IPv6.
    UnsupportedAtyp(u8),
    /// Domain-name address with a length byte of 0.
    EmptyDomain,
    /// A field to be encoded is longer than its one-byte length prefix allows.
    FieldTooLong,
    /// A UDP datagram ends inside its header. Datagrams are whole, so unlike
    /// a stream this can never be completed by more input.
    Truncated,
    /// None of the client's offered methods is acceptable to the server.
    NoAcceptableMethod,
    /// RFC 1929 credentials did not verify.
    AuthFailed,
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::BadVersion(v) => write!(f, "bad socks version 0x{v:02x}"),
            ProtoError::NoMethods => f.write_str("greeting offers no methods"),
            ProtoError::BadAuthVersion(v) => {
                write!(f, "bad username/password version 0x{v:02x}")
            }
            ProtoError::BadReserved(v) => write!(f, "reserved byte is 0x{v:02x}, not zero"),
            ProtoError::UnsupportedAtyp(a) => write!(f, "address type 0x{a:02x} not supported"),
            ProtoError::EmptyDomain => f.write_str("empty domain name"),
            ProtoError::FieldTooLong => f.write_str("field longer than 255 bytes"),
            ProtoError::Truncated => f.write_str("truncated datagram header"),
            ProtoError::NoAcceptableMethod => f.write_str("no acceptable authentication method"),
            ProtoError::AuthFailed => f.write_str("authentication failed"),
        }
    }
}

impl std::error::Error for ProtoError {}

/// Why a SOCKS request failed, as seen by the relay. Each variant maps to
/// exactly one `REP` code via [`RelayError::rep`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayError {
    /// Malformed request or failed negotiation.
    Protocol(ProtoError),
    /// `CMD` not in CONNECT/BIND/UDP ASSOCIATE, or not supported by the relay.
    CommandNotSupported(u8),
    /// Refused by a connection limit (per user).
    NotAllowed,
    /// Refused by an access rule or the policy (`crate::rules`).
    Denied(crate::rules::DeniedBy),
    /// Raw errno from `connect(2)`.
    Connect(i32),
    ConnectTimeout,
    /// Name does not resolve, or resolves to no usable address.
    ResolveFailed,
    TtlExpired,
    /// BIND: no acceptable peer connected within `--bind-timeout`.
    BindTimeout,
    /// An upstream proxy answered the request with this REP: passed back as is.
    UpstreamRep(u8),
    /// An upstream proxy's handshake failed (closed, garbage, credentials refused).
    UpstreamFailed,
    General(&'static str),
}

impl RelayError {
    /// The `REP` code to send for this error. This is the only place that
    /// decides it.
    pub fn rep(&self) -> Rep {
        match self {
            RelayError::Protocol(ProtoError::UnsupportedAtyp(_)) => Rep::ADDRESS_TYPE_NOT_SUPPORTED,
            RelayError::Protocol(_) => Rep::GENERAL_FAILURE,
            RelayError::CommandNotSupported(_) => Rep::COMMAND_NOT_SUPPORTED,
            RelayError::NotAllowed | RelayError::Denied(_) => Rep::NOT_ALLOWED,
            RelayError::Connect(errno) => match *errno {
                libc::ECONNREFUSED => Rep::CONNECTION_REFUSED,
                libc::ENETUNREACH | libc::ENETDOWN => Rep::NETWORK_UNREACHABLE,
                libc::EHOSTUNREACH | libc::EHOSTDOWN | libc::ETIMEDOUT => Rep::HOST_UNREACHABLE,
                libc::EACCES | libc::EPERM => Rep::NOT_ALLOWED,
                _ => Rep::GENERAL_FAILURE,
            },
            RelayError::ConnectTimeout => Rep::HOST_UNREACHABLE,
            RelayError::ResolveFailed => Rep::HOST_UNREACHABLE,
            RelayError::TtlExpired | RelayError::BindTimeout => Rep::TTL_EXPIRED,
            RelayError::UpstreamRep(r @ 1..=8) => Rep(*r),
            RelayError::UpstreamRep(_) | RelayError::UpstreamFailed => Rep::GENERAL_FAILURE,
            RelayError::General(_) => Rep::GENERAL_FAILURE,
        }
    }
}

impl From<ProtoError> for RelayError {
    fn from(e: ProtoError) -> Self {
        RelayError::Protocol(e)
    }
}

impl fmt::Display for RelayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RelayError::Protocol(e) => e.fmt(f),
            RelayError::CommandNotSupported(c) => write!(f, "command 0x{c:02x} not supported"),
            RelayError::NotAllowed => f.write_str("not allowed by ruleset"),
            RelayError::Denied(by) => write!(f, "refused by {by}"),
            RelayError::Connect(errno) => {
                // std renders strerror capitalised ("Connection refused (os
                // error 111)"); log lines are lowercase throughout.
                let msg = std::io::Error::from_raw_os_error(*errno).to_string();
                let mut chars = msg.chars();
                if let Some(first) = chars.next() {
                    write!(f, "{}{}", first.to_lowercase(), chars.as_str())?;
                }
                Ok(())
            }
            RelayError::ConnectTimeout => f.write_str("connect timed out"),
            RelayError::ResolveFailed => f.write_str("name did not resolve"),
            RelayError::TtlExpired => f.write_str("ttl expired"),
            RelayError::BindTimeout => f.write_str("no peer connected within --bind-timeout"),
            RelayError::UpstreamRep(r) => write!(f, "the upstream replied REP 0x{r:02x}"),
            RelayError::UpstreamFailed => f.write_str("the upstream's handshake failed"),
            RelayError::General(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for RelayError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rep_table_covers_every_arm() {
        let table: &[(RelayError, u8)] = &[
            (RelayError::Protocol(ProtoError::BadVersion(4)), 0x01),
            (RelayError::Protocol(ProtoError::NoMethods), 0x01),
            (RelayError::Protocol(ProtoError::BadAuthVersion(2)), 0x01),
            (RelayError::Protocol(ProtoError::BadReserved(1)), 0x01),
            (
                RelayError::Protocol(ProtoError::UnsupportedAtyp(0x02)),
                0x08,
            ),
            (RelayError::Protocol(ProtoError::EmptyDomain), 0x01),
            (RelayError::Protocol(ProtoError::FieldTooLong), 0x01),
            (RelayError::Protocol(ProtoError::Truncated), 0x01),
            (RelayError::Protocol(ProtoError::NoAcceptableMethod), 0x01),
            (RelayError::Protocol(ProtoError::AuthFailed), 0x01),
            (RelayError::CommandNotSupported(0x09), 0x07),
            (RelayError::NotAllowed, 0x02),
            (
                RelayError::Denied(crate::rules::DeniedBy::Rule { index: 3, line: 17 }),
                0x02,
            ),
            (
                RelayError::Denied(crate::rules::DeniedBy::PrivateTarget),
                0x02,
            ),
            (RelayError::Connect(libc::ECONNREFUSED), 0x05),
            (RelayError::Connect(libc::ENETUNREACH), 0x03),
            (RelayError::Connect(libc::ENETDOWN), 0x03),
            (RelayError::Connect(libc::EHOSTUNREACH), 0x04),
            (RelayError::Connect(libc::EHOSTDOWN), 0x04),
            (RelayError::Connect(libc::ETIMEDOUT), 0x04),
            (RelayError::Connect(libc::EACCES), 0x02),
            (RelayError::Connect(libc::EPERM), 0x02),
            (RelayError::Connect(libc::EADDRNOTAVAIL), 0x01),
            (RelayError::Connect(libc::ECONNRESET), 0x01),
            (RelayError::Connect(0), 0x01),
            (RelayError::Connect(-1), 0x01),
            (RelayError::ConnectTimeout, 0x04),
            (RelayError::ResolveFailed, 0x04),
            (RelayError::TtlExpired, 0x06),
            (RelayError::BindTimeout, 0x06),
            (RelayError::UpstreamRep(0x05), 0x05),
            (RelayError::UpstreamRep(0x02), 0x02),
            (RelayError::UpstreamRep(0x42), 0x01),
            (RelayError::UpstreamFailed, 0x01),
            (RelayError::General("boom"), 0x01),
        ];
        for (err, rep) in table {
            assert_eq!(err.rep(), Rep(*rep), "{err:?}");
        }
    }

    #[test]
    fn from_proto_error_wraps() {
        let e: RelayError = ProtoError::EmptyDomain.into();
        assert_eq!(e, RelayError::Protocol(ProtoError::EmptyDomain));
    }

    #[test]
    fn display_is_lowercase_and_readable() {
        assert_eq!(
            RelayError::Connect(libc::ECONNREFUSED).to_string(),
            format!("connection refused (os error {})", libc::ECONNREFUSED)
        );
        assert!(RelayError::Connect(libc::EHOSTUNREACH)
            .to_string()
            .starts_with("no route to host"));
        assert_eq!(
            RelayError::ResolveFailed.to_string(),
            "name did not resolve"
        );
        assert_eq!(
            RelayError::CommandNotSupported(9).to_string(),
            "command 0x09 not supported"
        );
        assert_eq!(
            RelayError::Protocol(ProtoError::UnsupportedAtyp(2)).to_string(),
            "address type 0x02 not supported"
        );
        assert_eq!(RelayError::General("shard full").to_string(), "shard full");
        for e in [
            ProtoError::BadVersion(4),
            ProtoError::NoMethods,
            ProtoError::BadAuthVersion(2),
            ProtoError::BadReserved(1),
            ProtoError::UnsupportedAtyp(7),
            ProtoError::EmptyDomain,
            ProtoError::FieldTooLong,
            ProtoError::Truncated,
            ProtoError::NoAcceptableMethod,
            ProtoError::AuthFailed,
        ] {
            let s = e.to_string();
            assert!(!s.is_empty() && s == s.to_lowercase(), "{s}");
        }
    }
}
