//! The server side of the SOCKS5 handshake as a sans-IO state machine:
//! greeting -> (optional RFC 1929 auth) -> request.
//!
//! The shard owns the socket and the buffers; it hands this machine whatever
//! unconsumed bytes it has, in any chunking, and sends whatever the machine
//! appends to `out`. Keeping the machine free of IO lets the tests prove that
//! chunking never changes the outcome and lets pipelining clients (greeting,
//! auth and request in one segment) complete in a single call.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use super::addr::Addr;
use super::auth::Users;
use super::codec::{
    decode_greeting, decode_request, decode_userpass, encode_method_selection, encode_reply,
    encode_userpass_status, Decoded, Request,
};
use super::error::{ProtoError, RelayError};
use super::wire::{Command, Method};

/// What the caller should do after [`ServerHandshake::advance`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Wait for more input (bytes appended to `out` must still be sent).
    NeedMore,
    /// Handshake done: the caller executes the command. Input after the
    /// consumed bytes is early client data to forward to the target once
    /// the reply has been sent.
    Request(Request),
    /// `out` holds the final answer (method 0xFF, auth status 0x01 or an
    /// error reply); send it, then close. The error is for the log line.
    Reject(RelayError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Greeting,
    Auth,
    Request,
    Finished,
}

#[derive(Debug, Clone)]
pub struct ServerHandshake {
    phase: Phase,
    /// The RFC 1929 username, once it has authenticated.
    user: Option<Box<[u8]>>,
}

impl Default for ServerHandshake {
    fn default() -> Self {
        Self::new()
    }
}

/// Appends the reply for a failed request: `REP` from [`RelayError::rep`]
/// and BND = 0.0.0.0:0, since no address was bound.
pub fn error_reply(err: &RelayError, out: &mut Vec<u8>) {
    let unbound = Addr::Ip(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)));
    encode_reply(err.rep(), &unbound, out);
}

impl ServerHandshake {
    /// The username the client authenticated as (RFC 1929), if it did.
    pub fn user(&self) -> Option<&[u8]> {
        self.user.as_deref()
    }

    pub fn new() -> Self {
        ServerHandshake {
            phase: Phase::Greeting,
            user: None,
        }
    }

    /// True once `advance` has returned `Request` or `Reject`.
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Finished
    }

    /// Feeds the whole unconsumed input; returns the step and how many bytes
    /// of `input` were consumed. Appends any bytes to send to `out`.
    ///
    /// Runs through as many phases as `input` allows. On `Reject` the count
    /// covers the messages accepted before the bad one. Once finished, every
    /// further call returns `Reject` without consuming or writing anything.
    pub fn advance(
        &mut self,
        input: &[u8],
        users: Option<&Users>,
        out: &mut Vec<u8>,
    ) -> (Step, usize) {
        let mut pos = 0;
        loop {
            let buf = &input[pos..];
            match self.phase {
                Phase::Greeting => match decode_greeting(buf) {
                    Ok(Decoded::Incomplete) => return (Step::NeedMore, pos),
                    Err(e) => {
                        encode_method_selection(Method::NO_ACCEPTABLE, out);
                        return self.reject(e.into(), pos);
                    }
                    Ok(Decoded::Done(greeting, n)) => {
                        pos += n;
                        let wanted = match users {
                            None => Method::NO_AUTH,
                            Some(_) => Method::USERNAME_PASSWORD,
                        };
                        if !greeting.methods.contains(&wanted) {
                            encode_method_selection(Method::NO_ACCEPTABLE, out);
                            return self.reject(ProtoError::NoAcceptableMethod.into(), pos);
                        }
                        encode_method_selection(wanted, out);
                        self.phase = match users {
                            None => Phase::Request,
                            Some(_) => Phase::Auth,
                        };
                    }
                },
                Phase::Auth => match decode_userpass(buf) {
                    Ok(Decoded::Incomplete) => return (Step::NeedMore, pos),
                    Err(e) => {
                        encode_userpass_status(false, out);
                        return self.reject(e.into(), pos);
                    }
                    Ok(Decoded::Done(up, n)) => {
                        pos += n;
                        // `users` can only be None here if the caller changed
                        // its mind between calls; fail closed.
                        let ok = users.is_some_and(|u| u.verify(&up.uname, &up.passwd));
                        encode_userpass_status(ok, out);
                        if !ok {
                            return self.reject(ProtoError::AuthFailed.into(), pos);
                        }
                        self.user = Some(Box::from(&up.uname[..]));
                        self.phase = Phase::Request;
                    }
                },
                Phase::Request => match decode_request(buf) {
                    Ok(Decoded::Incomplete) => return (Step::NeedMore, pos),
                    Err(e) => {
                        let err = RelayError::from(e);
                        error_reply(&err, out);
                        return self.reject(err, pos);
                    }
                    Ok(Decoded::Done(req, n)) => match req.cmd {
                        Command::CONNECT | Command::BIND | Command::UDP_ASSOCIATE => {
                            self.phase = Phase::Finished;
                            return (Step::Request(req), pos + n);
                        }
                        Command(other) => {
                            let err = RelayError::CommandNotSupported(other);
                            error_reply(&err, out);
                            return self.reject(err, pos);
                        }
                    },
                },
                Phase::Finished => {
                    return (
                        Step::Reject(RelayError::General("handshake already finished")),
                        0,
                    )
                }
            }
        }
    }

    fn reject(&mut self, err: RelayError, pos: usize) -> (Step, usize) {
        self.phase = Phase::Finished;
        (Step::Reject(err), pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::wire::Rep;

    fn users() -> Users {
        let mut u = Users::new();
        u.insert(b"user", b"pass");
        u
    }

    const CONNECT_V4: [u8; 10] = [0x05, 0x01, 0x00, 0x01, 93, 184, 216, 34, 0x00, 0x50];

    fn connect_v4() -> Request {
        Request {
            cmd: Command::CONNECT,
            dst: Addr::Ip("93.184.216.34:80".parse().unwrap()),
        }
    }

    #[test]
    fn no_auth_step_by_step() {
        let mut hs = ServerHandshake::new();
        let mut out = Vec::new();
        assert_eq!(hs.advance(&[0x05], None, &mut out), (Step::NeedMore, 0));
        assert!(out.is_empty());
        assert_eq!(
            hs.advance(&[0x05, 0x01, 0x00], None, &mut out),
            (Step::NeedMore, 3)
        );
        assert_eq!(out, [0x05, 0x00]);
        out.clear();
        assert_eq!(
            hs.advance(&CONNECT_V4, None, &mut out),
            (Step::Request(connect_v4()), 10)
        );
        assert!(out.is_empty());
        assert!(hs.is_finished());
    }

    #[test]
    fn pipelined_with_auth_and_early_data() {
        let mut input = vec![0x05, 0x02, 0x00, 0x02];
        input.extend_from_slice(&[0x01, 4, b'u', b's', b'e', b'r', 4, b'p', b'a', b's', b's']);
        input.extend_from_slice(&CONNECT_V4);
        let handshake_len = input.len();
        input.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let mut hs = ServerHandshake::new();
        let mut out = Vec::new();
        let (step, consumed) = hs.advance(&input, Some(&users()), &mut out);
        assert_eq!(step, Step::Request(connect_v4()));
        assert_eq!(consumed, handshake_len);
        assert_eq!(&input[consumed..], b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(out, [0x05, 0x02, 0x01, 0x00]);
    }

    #[test]
    fn pipelined_no_auth_with_early_data() {
        let mut input = vec![0x05, 0x01, 0x00];
        input.extend_from_slice(&CONNECT_V4);
        input.extend_from_slice(b"early");
        let mut out = Vec::new();
        let (step, consumed) = ServerHandshake::new().advance(&input, None, &mut out);
        assert_eq!(step, Step::Request(connect_v4()));
        assert_eq!(&input[consumed..], b"early");
        assert_eq!(out, [0x05, 0x00]);
    }

    fn run(input: &[u8], users: Option<&Users>) -> (Step, usize, Vec<u8>) {
        let mut out = Vec::new();
        let (step, n) = ServerHandshake::new().advance(input, users, &mut out);
        (step, n, out)
    }

    #[test]
    fn garbage_greeting() {
        let (step, _, out) = run(b"GET / HTTP/1.1\r\n", None);
        assert_eq!(
            step,
            Step::Reject(RelayError::Protocol(ProtoError::BadVersion(b'G')))
        );
        assert_eq!(out, [0x05, 0xFF]);
        let (step, _, out) = run(&[0x05, 0x00], None);
        assert_eq!(
            step,
            Step::Reject(RelayError::Protocol(ProtoError::NoMethods))
        );
        assert_eq!(out, [0x05, 0xFF]);
    }

    #[test]
    fn method_choice() {
        let u = users();
        // No users configured: NO_AUTH required.
        let (step, n, out) = run(&[0x05, 0x01, 0x02], None);
        assert_eq!(
            (step, n, out),
            (
                Step::Reject(ProtoError::NoAcceptableMethod.into()),
                3,
                vec![0x05, 0xFF]
            )
        );
        // Users configured: USERNAME_PASSWORD required even if NO_AUTH offered.
        let (step, _, out) = run(&[0x05, 0x01, 0x00], Some(&u));
        assert_eq!(step, Step::Reject(ProtoError::NoAcceptableMethod.into()));
        assert_eq!(out, [0x05, 0xFF]);
        let (step, _, out) = run(&[0x05, 0x03, 0x00, 0x01, 0x02], Some(&u));
        assert_eq!(step, Step::NeedMore);
        assert_eq!(out, [0x05, 0x02]);
        let (step, _, out) = run(&[0x05, 0x02, 0x01, 0x00], None);
        assert_eq!(step, Step::NeedMore);
        assert_eq!(out, [0x05, 0x00]);
    }

    #[test]
    fn wrong_password_and_unknown_user() {
        let u = users();
        for creds in [
            &[0x01, 4, b'u', b's', b'e', b'r', 4, b'p', b'a', b's', b'x'][..],
            &[0x01, 4, b'n', b'o', b'p', b'e', 4, b'p', b'a', b's', b's'][..],
            &[0x01, 0, 0][..],
        ] {
            let mut input = vec![0x05, 0x01, 0x02];
            input.extend_from_slice(creds);
            input.extend_from_slice(&CONNECT_V4);
            let (step, n, out) = run(&input, Some(&u));
            assert_eq!(step, Step::Reject(ProtoError::AuthFailed.into()));
            assert_eq!(n, 3 + creds.len());
            assert_eq!(out, [0x05, 0x02, 0x01, 0x01]);
        }
        let (step, _, out) = run(&[0x05, 0x01, 0x02, 0x05, 0x00], Some(&u));
        assert_eq!(step, Step::Reject(ProtoError::BadAuthVersion(5).into()));
        assert_eq!(out, [0x05, 0x02, 0x01, 0x01]);
    }

    fn request_reject(req: &[u8]) -> (Step, Vec<u8>) {
        let mut input = vec![0x05, 0x01, 0x00];
        input.extend_from_slice(req);
        let (step, n, out) = run(&input, None);
        assert_eq!(n, 3);
        assert_eq!(&out[..2], [0x05, 0x00]);
        (step, out[2..].to_vec())
    }

    fn err_reply(rep: u8) -> Vec<u8> {
        vec![0x05, rep, 0x00, 0x01, 0, 0, 0, 0, 0, 0]
    }

    #[test]
    fn request_errors() {
        assert_eq!(
            request_reject(&[0x04, 0x01, 0x00, 0x01, 1, 1, 1, 1, 0, 80]),
            (
                Step::Reject(ProtoError::BadVersion(4).into()),
                err_reply(0x01)
            )
        );
        assert_eq!(
            request_reject(&[0x05, 0x01, 0x01, 0x01, 1, 1, 1, 1, 0, 80]),
            (
                Step::Reject(ProtoError::BadReserved(1).into()),
                err_reply(0x01)
            )
        );
        assert_eq!(
            request_reject(&[0x05, 0x01, 0x00, 0x03, 0x00, 0, 80]),
            (
                Step::Reject(ProtoError::EmptyDomain.into()),
                err_reply(0x01)
            )
        );
        assert_eq!(
            request_reject(&[0x05, 0x01, 0x00, 0x05, 1, 1, 1, 1, 0, 80]),
            (
                Step::Reject(ProtoError::UnsupportedAtyp(5).into()),
                err_reply(0x08)
            )
        );
        assert_eq!(
            request_reject(&[0x05, 0x09, 0x00, 0x01, 1, 1, 1, 1, 0, 80]),
            (
                Step::Reject(RelayError::CommandNotSupported(9)),
                err_reply(0x07)
            )
        );
    }

    #[test]
    fn every_supported_command_is_a_request() {
        for cmd in [Command::CONNECT, Command::BIND, Command::UDP_ASSOCIATE] {
            let mut input = vec![0x05, 0x01, 0x00, 0x05, cmd.0, 0x00, 0x03, 1, b'h', 0, 1];
            input.push(0xAB);
            let (step, n, _) = run(&input, None);
            assert_eq!(
                step,
                Step::Request(Request {
                    cmd,
                    dst: Addr::domain(b"h", 1).unwrap()
                })
            );
            assert_eq!(n, input.len() - 1);
        }
    }

    #[test]
    fn finished_machine_does_not_panic() {
        let mut hs = ServerHandshake::new();
        let mut out = Vec::new();
        let _ = hs.advance(&[0x04], None, &mut out);
        out.clear();
        let (step, n) = hs.advance(&[0x05, 0x01, 0x00], None, &mut out);
        assert!(matches!(step, Step::Reject(_)));
        assert_eq!(n, 0);
        assert!(out.is_empty());
    }

    #[test]
    fn error_reply_helper() {
        let mut out = Vec::new();
        error_reply(&RelayError::Connect(libc::ECONNREFUSED), &mut out);
        assert_eq!(out, err_reply(Rep::CONNECTION_REFUSED.0));
    }
}
