//! Wire-level constants of RFC 1928 / RFC 1929.
//!
//! The one-byte code points are newtypes with named constants rather than
//! enums so that a value we do not know (a future METHOD, an unknown CMD)
//! still decodes and can be reported or answered precisely, instead of
//! being lost in a lossy conversion.

/// Protocol version byte of every SOCKS5 message (`VER`).
pub const VERSION: u8 = 0x05;
/// Version byte of the RFC 1929 username/password sub-negotiation.
pub const USERPASS_VERSION: u8 = 0x01;

/// `REP` field of a reply (RFC 1928 §6).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Rep(pub u8);

impl Rep {
    pub const SUCCEEDED: Rep = Rep(0x00);
    pub const GENERAL_FAILURE: Rep = Rep(0x01);
    pub const NOT_ALLOWED: Rep = Rep(0x02);
    pub const NETWORK_UNREACHABLE: Rep = Rep(0x03);
    pub const HOST_UNREACHABLE: Rep = Rep(0x04);
    pub const CONNECTION_REFUSED: Rep = Rep(0x05);
    pub const TTL_EXPIRED: Rep = Rep(0x06);
    pub const COMMAND_NOT_SUPPORTED: Rep = Rep(0x07);
    pub const ADDRESS_TYPE_NOT_SUPPORTED: Rep = Rep(0x08);
}

/// Authentication `METHOD` (RFC 1928 §3).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Method(pub u8);

impl Method {
    pub const NO_AUTH: Method = Method(0x00);
    pub const GSSAPI: Method = Method(0x01);
    pub const USERNAME_PASSWORD: Method = Method(0x02);
    pub const NO_ACCEPTABLE: Method = Method(0xFF);
}

/// `CMD` field of a request (RFC 1928 §4).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Command(pub u8);

impl Command {
    pub const CONNECT: Command = Command(0x01);
    pub const BIND: Command = Command(0x02);
    pub const UDP_ASSOCIATE: Command = Command(0x03);
}

/// `ATYP` address type (RFC 1928 §5).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Atyp(pub u8);

impl Atyp {
    pub const IPV4: Atyp = Atyp(0x01);
    pub const DOMAINNAME: Atyp = Atyp(0x03);
    pub const IPV6: Atyp = Atyp(0x04);
}
