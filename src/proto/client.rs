//! A small sans-IO SOCKS5 client handshake, for the load generator and the
//! integration tests.
//!
//! It lives next to the server machine so both ends are built from the same
//! codec, and it can pipeline greeting, auth and request into one write to
//! exercise the server's pipelining path.

use std::fmt;

use super::addr::Addr;
use super::codec::{
    decode_method_selection, decode_reply, decode_userpass_status, encode_greeting, encode_request,
    encode_userpass, Decoded, Reply,
};
use super::error::ProtoError;
use super::wire::{Command, Method, Rep};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientStep {
    /// Wait for more bytes from the server (send `out` first, if non-empty).
    NeedMore,
    /// `reply` is a success reply. `consumed` counts bytes of the *last*
    /// `input` that belonged to the handshake; the rest is tunnel data.
    Done { reply: Reply, consumed: usize },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// The server sent something that is not SOCKS5 / RFC 1929.
    Protocol(ProtoError),
    /// The server answered method 0xFF.
    NoAcceptableMethod,
    /// The server chose a method we did not offer.
    UnexpectedMethod(Method),
    /// RFC 1929 status was not 0x00; carries the status byte.
    AuthRejected(u8),
    /// The reply's `REP` was not SUCCEEDED.
    Rep(Rep),
    /// `advance` called after the handshake finished or failed.
    Finished,
}

impl From<ProtoError> for ClientError {
    fn from(e: ProtoError) -> Self {
        ClientError::Protocol(e)
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Protocol(e) => write!(f, "protocol error: {e}"),
            ClientError::NoAcceptableMethod => f.write_str("server accepted none of our methods"),
            ClientError::UnexpectedMethod(m) => {
                write!(f, "server chose method 0x{:02x} we did not offer", m.0)
            }
            ClientError::AuthRejected(s) => {
                write!(f, "server rejected credentials (status 0x{s:02x})")
            }
            ClientError::Rep(rep) => write!(f, "server replied REP 0x{:02x}", rep.0),
            ClientError::Finished => f.write_str("handshake already finished"),
        }
    }
}

impl std::error::Error for ClientError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Start,
    MethodSelection,
    AuthStatus,
    Reply,
    Finished,
}

#[derive(Debug, Clone)]
pub struct ClientHandshake {
    dst: Addr,
    cmd: Command,
    creds: Option<(Vec<u8>, Vec<u8>)>,
    pipeline: bool,
    phase: Phase,
    /// Bytes from previous `advance` calls not yet forming a whole message;
    /// handshake messages are tiny, so this stays small.
    pending: Vec<u8>,
    /// Credentials too long to encode: reported by the first `advance`, so
    /// `new`/`start` stay infallible.
    deferred: Option<ProtoError>,
}

impl ClientHandshake {
    pub fn new(dst: Addr, cmd: Command, creds: Option<(Vec<u8>, Vec<u8>)>) -> Self {
        let deferred = match &creds {
            Some((u, p)) if u.len() > 255 || p.len() > 255 => Some(ProtoError::FieldTooLong),
            _ => None,
        };
        ClientHandshake {
            dst,
            cmd,
            creds,
            pipeline: false,
            phase: Phase::Start,
            pending: Vec::new(),
            deferred,
        }
    }

    /// Send auth and request together with the greeting, without waiting
    /// for each answer (saves round trips; the server must support it).
    pub fn pipelined(mut self, pipeline: bool) -> Self {
        self.pipeline = pipeline;
        self
    }

    fn method(&self) -> Method {
        if self.creds.is_some() {
            Method::USERNAME_PASSWORD
        } else {
            Method::NO_AUTH
        }
    }

    fn write_auth(&self, out: &mut Vec<u8>) {
        if let Some((u, p)) = &self.creds {
            // Lengths were checked in `new`; an error here only means the
            // deferred error will be reported by `advance`.
            let _ = encode_userpass(u, p, out);
        }
    }

    /// Writes the greeting (offering exactly one method: user/password if
    /// credentials were given, else no-auth), plus auth and request when
    /// pipelining. Writes nothing if the credentials cannot be encoded.
    pub fn start(&mut self, out: &mut Vec<u8>) {
        if self.phase != Phase::Start {
            return;
        }
        self.phase = Phase::MethodSelection;
        if self.deferred.is_some() {
            return;
        }
        encode_greeting(&[self.method()], out);
        if self.pipeline {
            self.write_auth(out);
            encode_request(self.cmd, &self.dst, out);
        }
    }

    /// Feeds bytes newly received from the server (not previously passed).
    /// Appends anything to send to `out`.
    pub fn advance(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<ClientStep, ClientError> {
        if let Some(e) = self.deferred.take() {
            self.phase = Phase::Finished;
            return Err(e.into());
        }
        if self.phase == Phase::Start {
            self.start(out);
        }
        let carried = self.pending.len();
        self.pending.extend_from_slice(input);
        let result = self.run(out);
        match &result {
            Ok(ClientStep::NeedMore) => {}
            Ok(ClientStep::Done { .. }) | Err(_) => self.phase = Phase::Finished,
        }
        result.map(|step| match step {
            ClientStep::Done { reply, consumed } => ClientStep::Done {
                reply,
                // `run` counts from the start of `pending`, which began with
                // `carried` bytes from earlier calls.
                consumed: consumed - carried,
            },
            other => other,
        })
    }

    fn run(&mut self, out: &mut Vec<u8>) -> Result<ClientStep, ClientError> {
        let mut pos = 0;
        loop {
            let buf = &self.pending[pos..];
            match self.phase {
                Phase::Start | Phase::Finished => return Err(ClientError::Finished),
                Phase::MethodSelection => match decode_method_selection(buf)? {
                    Decoded::Incomplete => break,
                    Decoded::Done(m, n) => {
                        pos += n;
                        if m == Method::NO_ACCEPTABLE {
                            return Err(ClientError::NoAcceptableMethod);
                        }
                        if m != self.method() {
                            return Err(ClientError::UnexpectedMethod(m));
                        }
                        if m == Method::USERNAME_PASSWORD {
                            if !self.pipeline {
                                self.write_auth(out);
                            }
                            self.phase = Phase::AuthStatus;
                        } else {
                            if !self.pipeline {
                                encode_request(self.cmd, &self.dst, out);
                            }
                            self.phase = Phase::Reply;
                        }
                    }
                },
                Phase::AuthStatus => match decode_userpass_status(buf)? {
                    Decoded::Incomplete => break,
                    Decoded::Done(status, n) => {
                        pos += n;
                        if status != 0 {
                            return Err(ClientError::AuthRejected(status));
                        }
                        if !self.pipeline {
                            encode_request(self.cmd, &self.dst, out);
                        }
                        self.phase = Phase::Reply;
                    }
                },
                Phase::Reply => match decode_reply(buf)? {
                    Decoded::Incomplete => break,
                    Decoded::Done(reply, n) => {
                        pos += n;
                        if reply.rep != Rep::SUCCEEDED {
                            return Err(ClientError::Rep(reply.rep));
                        }
                        self.pending.clear();
                        return Ok(ClientStep::Done {
                            reply,
                            consumed: pos,
                        });
                    }
                },
            }
        }
        self.pending.drain(..pos);
        Ok(ClientStep::NeedMore)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::auth::Users;
    use crate::proto::codec::{encode_reply, Request};
    use crate::proto::server::{ServerHandshake, Step};

    fn dst() -> Addr {
        Addr::domain(b"example.com", 443).unwrap()
    }

    const OK_REPLY: [u8; 10] = [0x05, 0x00, 0x00, 0x01, 10, 0, 0, 1, 0x30, 0x39];

    /// Drives a client against the real server machine; returns the request
    /// the server saw and the client's result.
    fn against_server(
        mut client: ClientHandshake,
        users: Option<&Users>,
    ) -> (Option<Request>, Result<ClientStep, ClientError>) {
        let mut server = ServerHandshake::new();
        let mut c2s = Vec::new();
        client.start(&mut c2s);
        let mut seen = None;
        let mut s2c = Vec::new();
        for _ in 0..10 {
            let (step, n) = server.advance(&c2s, users, &mut s2c);
            c2s.drain(..n);
            match step {
                Step::NeedMore => {}
                Step::Request(req) => {
                    encode_reply(
                        Rep::SUCCEEDED,
                        &Addr::Ip("10.0.0.1:12345".parse().unwrap()),
                        &mut s2c,
                    );
                    s2c.extend_from_slice(b"tunnel");
                    seen = Some(req);
                }
                Step::Reject(_) => {}
            }
            let input = std::mem::take(&mut s2c);
            let mut out = Vec::new();
            let r = client.advance(&input, &mut out);
            c2s.extend_from_slice(&out);
            match r {
                Ok(ClientStep::NeedMore) => continue,
                Ok(ClientStep::Done { reply, consumed }) => {
                    assert_eq!(&input[consumed..], b"tunnel");
                    return (seen, Ok(ClientStep::Done { reply, consumed }));
                }
                Err(e) => return (seen, Err(e)),
            }
        }
        panic!("handshake did not finish");
    }
    #[test]
    fn round_trips_against_server() {
        let mut users = Users::new();
        users.insert(b"u", b"p");
        for pipeline in [false, true] {
            let c = ClientHandshake::new(dst(), Command::CONNECT, None).pipelined(pipeline);
            let (seen, r) = against_server(c, None);
            assert_eq!(seen.unwrap().dst, dst());
            assert!(matches!(r, Ok(ClientStep::Done { .. })), "{r:?}");

            let creds = Some((b"u".to_vec(), b"p".to_vec()));
            let c = ClientHandshake::new(dst(), Command::BIND, creds).pipelined(pipeline);
            let (seen, r) = against_server(c, Some(&users));
            assert_eq!(seen.unwrap().cmd, Command::BIND);
            assert!(matches!(r, Ok(ClientStep::Done { .. })), "{r:?}");

            let creds = Some((b"u".to_vec(), b"wrong".to_vec()));
            let c = ClientHandshake::new(dst(), Command::CONNECT, creds).pipelined(pipeline);
            let (seen, r) = against_server(c, Some(&users));
            assert!(seen.is_none());
            assert_eq!(r, Err(ClientError::AuthRejected(1)));

            let c = ClientHandshake::new(dst(), Command::CONNECT, None).pipelined(pipeline);
            let (_, r) = against_server(c, Some(&users));
            assert_eq!(r, Err(ClientError::NoAcceptableMethod));
        }
    }

    #[test]
    fn pipelined_start_writes_everything() {
        let mut c = ClientHandshake::new(
            Addr::Ip("1.2.3.4:80".parse().unwrap()),
            Command::CONNECT,
            Some((b"a".to_vec(), b"b".to_vec())),
        )
        .pipelined(true);
        let mut out = Vec::new();
        c.start(&mut out);
        assert_eq!(
            out,
            [5, 1, 2, 1, 1, b'a', 1, b'b', 5, 1, 0, 1, 1, 2, 3, 4, 0, 80]
        );
    }

    #[test]
    fn byte_at_a_time_and_rep_error() {
        let mut c = ClientHandshake::new(dst(), Command::CONNECT, None);
        let mut out = Vec::new();
        c.start(&mut out);
        assert_eq!(out, [5, 1, 0]);
        out.clear();
        assert_eq!(c.advance(&[5], &mut out), Ok(ClientStep::NeedMore));
        assert!(out.is_empty());
        assert_eq!(c.advance(&[0], &mut out), Ok(ClientStep::NeedMore));
        assert_eq!(out[..3], [5, 1, 0]);
        for &b in &OK_REPLY[..9] {
            assert_eq!(c.advance(&[b], &mut out), Ok(ClientStep::NeedMore));
        }
        let r = c.advance(&[OK_REPLY[9], b'x'], &mut out).unwrap();
        assert!(matches!(r, ClientStep::Done { consumed: 1, .. }), "{r:?}");
        assert_eq!(c.advance(&[], &mut out), Err(ClientError::Finished));

        let mut c = ClientHandshake::new(dst(), Command::CONNECT, None).pipelined(true);
        c.start(&mut out);
        let mut input = vec![5, 0];
        input.extend_from_slice(&OK_REPLY);
        input[3] = 0x05;
        assert_eq!(
            c.advance(&input, &mut out),
            Err(ClientError::Rep(Rep::CONNECTION_REFUSED))
        );
    }

    #[test]
    fn errors() {
        let mut out = Vec::new();
        let mut c = ClientHandshake::new(dst(), Command::CONNECT, None);
        c.start(&mut out);
        assert_eq!(
            c.advance(&[5, 2], &mut out),
            Err(ClientError::UnexpectedMethod(Method::USERNAME_PASSWORD))
        );
        let mut c = ClientHandshake::new(dst(), Command::CONNECT, None);
        assert_eq!(
            c.advance(&[4, 0], &mut out),
            Err(ClientError::Protocol(ProtoError::BadVersion(4)))
        );
        let mut c = ClientHandshake::new(dst(), Command::CONNECT, Some((vec![0; 256], vec![1])));
        out.clear();
        c.start(&mut out);
        assert!(out.is_empty());
        assert_eq!(
            c.advance(&[], &mut out),
            Err(ClientError::Protocol(ProtoError::FieldTooLong))
        );
        assert!(!ClientError::Rep(Rep(5)).to_string().is_empty());
    }
}
