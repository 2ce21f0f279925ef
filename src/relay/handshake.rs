//! The handshake stage: greeting, optional RFC 1929 authentication and the request, read from
//! the client and fed to the sans-IO [`ServerHandshake`]. Its replies (method selection, auth
//! status) are sent before reading on. The request moves the connection to
//! [`connect`](super::connect) or [`udp`](super::udp); a protocol error to an error reply.

use tracing::{info, warn};

use super::conn::{Conn, Record, Stage};
use super::token::Op;
use super::Ctx;
use crate::metrics::Outcome;
use std::net::SocketAddr;

use crate::proto::{self, proxy, Command, RelayError, ServerHandshake, Step};
use crate::uring::{Completion, Data, Engine};

/// A handshake never needs more than greeting (257) + auth (513) + request (262) bytes.
const MAX_HANDSHAKE: usize = 2048;

#[derive(Default)]
pub(crate) struct Handshake {
    /// `--proxy-protocol`: a PROXY header must come first.
    pub(super) proxy_header: bool,
    machine: ServerHandshake,
    /// Bytes already fed but not consumed, kept while a reply is being sent.
    unread: Vec<u8>,
}

/// What the handshake leaves for the next stage.
pub(super) struct Requested {
    pub req: proto::Request,
    /// Handshake output not yet sent (an auth status when the request came pipelined).
    pub reply_prefix: Vec<u8>,
    /// Client bytes that came after the request.
    pub early: Vec<u8>,
    /// The RFC 1929 user, when the client authenticated.
    pub user: Option<Box<[u8]>>,
}

impl Conn {
    pub(super) fn on_handshake_recv<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, c: Completion) {
        let Data::Buf { mut buf, off } = c.data else {
            return self.close(cx);
        };
        if c.res <= 0 {
            if off > 0 || c.res < 0 {
                let reason = if c.res == 0 {
                    "client closed mid-handshake".to_string()
                } else {
                    std::io::Error::from_raw_os_error(-c.res).to_string()
                };
                info!(client = %self.peer_str(), reason = %reason, "handshake failed");
            }
            return self.close(cx);
        }
        if matches!(&self.stage, Stage::Handshake(hs) if hs.proxy_header) {
            match self.on_proxy_header(cx, &mut buf) {
                Some(()) if !buf.is_empty() => {}
                Some(()) => return self.recv_client(cx, buf, Op::HandshakeRecv),
                None => return,
            }
        }
        let Stage::Handshake(hs) = &mut self.stage else {
            return self.close(cx);
        };
        let users = cx.cfg.users.as_deref();
        let mut out = Vec::new();
        let (step, consumed) = hs.machine.advance(&buf, users, &mut out);
        match step {
            Step::NeedMore => {
                buf.drain(..consumed);
                if buf.len() >= MAX_HANDSHAKE {
                    info!(client = %self.peer_str(), reason = "handshake too long", "handshake failed");
                    self.outcome = Outcome::HandshakeError;
                    return self.close(cx);
                }
                if out.is_empty() {
                    self.recv_client(cx, buf, Op::HandshakeRecv);
                } else {
                    hs.unread = buf;
                    self.send_client(cx, out, 0, Op::HandshakeSend);
                }
            }
            Step::Request(req) => {
                let user = hs.machine.user().map(Box::<[u8]>::from);
                cx.metrics
                    .handshake
                    .observe(cx.now.saturating_duration_since(self.accepted));
                // Only an access log reads the record: without one, no per-request strings.
                self.record = cx.access.is_some().then(|| {
                    Box::new(Record {
                        command: match req.cmd {
                            Command::CONNECT => "connect",
                            Command::UDP_ASSOCIATE => "udp",
                            Command::BIND => "bind",
                            _ => "other",
                        },
                        user: user.clone(),
                        target: req.dst.to_string(),
                        connected: None,
                        rep: 0,
                        up: 0,
                        down: 0,
                        reason: "".into(),
                    })
                });
                let next = Requested {
                    req,
                    reply_prefix: out,
                    early: buf[consumed..].to_vec(),
                    user,
                };
                if let Some(user) = &next.user {
                    if let Err(over) = cx.limits.admit_user(&mut self.lease, user) {
                        if let Some(n) = cx.shard.refusals.note(over, cx.now) {
                            warn!(
                                client = %self.peer_str(),
                                user = %String::from_utf8_lossy(user),
                                limit = over.flag(),
                                refused = n,
                                total = cx.limits.refused(over),
                                "requests refused (count since the last line)"
                            );
                        }
                        return self.fail(
                            cx,
                            next.reply_prefix,
                            &next.req.dst,
                            RelayError::NotAllowed,
                        );
                    }
                }
                if next.req.cmd == Command::UDP_ASSOCIATE {
                    self.associate(cx, next);
                } else if next.req.cmd == Command::CONNECT {
                    self.connect(cx, next);
                } else if next.req.cmd == Command::BIND {
                    self.bind(cx, next);
                } else {
                    let cmd = next.req.cmd.0;
                    self.fail(
                        cx,
                        next.reply_prefix,
                        &next.req.dst,
                        RelayError::CommandNotSupported(cmd),
                    );
                }
            }
            Step::Reject(err) => {
                info!(client = %self.peer_str(), reason = %err, "handshake failed");
                self.outcome = match err {
                    RelayError::Protocol(proto::ProtoError::AuthFailed) => Outcome::AuthFailed,
                    _ => Outcome::HandshakeError,
                };
                self.reject(cx, out);
            }
        }
    }

    /// The PROXY protocol header in front of the greeting (`--proxy-protocol`): its source
    /// becomes the client's address. Some(()) once it is consumed from `buf` (the greeting may
    /// follow in the same bytes); None when the connection is done with (reading more, or
    /// closed for a bad header or a limit).
    fn on_proxy_header<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, buf: &mut Vec<u8>) -> Option<()> {
        let fail = |conn: &mut Conn, cx: &mut Ctx<'_, E>, reason: String| {
            info!(client = %conn.peer_str(), reason = %reason, "handshake failed");
            conn.outcome = Outcome::ProxyHeader;
            conn.close(cx);
            None
        };
        let (addrs, consumed) = match proxy::decode(buf) {
            Ok(proxy::Parsed::Done { addrs, consumed }) => (addrs, consumed),
            Ok(proxy::Parsed::NeedMore) if buf.len() < proxy::MAX_HEADER => {
                let rest = std::mem::take(buf);
                self.recv_client(cx, rest, Op::HandshakeRecv);
                return None;
            }
            Ok(proxy::Parsed::NeedMore) => return fail(self, cx, "PROXY header too long".into()),
            Err(e) => return fail(self, cx, format!("PROXY protocol: {e}")),
        };
        buf.drain(..consumed);
        if let Stage::Handshake(hs) = &mut self.stage {
            hs.proxy_header = false;
        }
        if let proxy::ProxyAddrs::Tcp { src, .. } = addrs {
            let proxy = self.peer_str();
            self.peer = Some(SocketAddr::new(src.ip().to_canonical(), src.port()));
            tracing::debug!(client = %self.peer_str(), proxy = %proxy, "PROXY header");
            if let Err(over) = cx.limits.admit_ip(&mut self.lease, src.ip().to_canonical()) {
                info!(client = %self.peer_str(), limit = over.flag(), "connection refused");
                self.outcome = Outcome::Limit;
                self.close(cx);
                return None;
            }
        }
        Some(())
    }

    pub(super) fn on_handshake_send<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, c: Completion) {
        if self.client_sent(cx, c, Op::HandshakeSend).is_none() {
            return;
        }
        let Stage::Handshake(hs) = &mut self.stage else {
            return self.close(cx);
        };
        // Bytes left over from the last segment were already fed and are incomplete: keep
        // them and read more after them.
        let unread = std::mem::take(&mut hs.unread);
        self.recv_client(cx, unread, Op::HandshakeRecv);
    }
}
