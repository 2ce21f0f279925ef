//! One client connection, from accept to release: which stage it is in, how many of its ops
//! are in flight, its timer, and how it closes.
//!
//! A connection moves through stages, each holding only what it needs:
//! [`Stage::Handshake`] (bytes fed to the sans-IO handshake) -> [`Stage::Connect`] (resolve,
//! connect, reply) or [`Stage::Bind`] (listen, two replies) -> [`Stage::Tunnel`] (two
//! forwarding directions), or [`Stage::Association`] (a UDP association and its control
//! connection); any of them may end in [`Stage::Rejecting`] (an error reply, then a short
//! linger).
//!
//! Closing cancels what is still waiting; nothing is freed then. The server frees the
//! connection with [`Conn::release`] once [`Conn::is_finished`] says no op is in flight, so
//! no socket, pipe or buffer is given back while the kernel may still use it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tracing::{debug, info};

use super::bind::Bind;
use super::connect::Connect;
use super::forward::Tunnel;
use super::handshake::Handshake;
use super::token::Dir;
use super::token::{ConnId, Op, ARG_MAX};
use super::udp::Association;
use super::Ctx;
use crate::access_log::Entry;
use crate::limits::Lease;
use crate::metrics::{Outcome, Path};
use crate::uring::{Completion, Data, Engine, Sock};

pub(super) enum Stage {
    Handshake(Box<Handshake>),
    Connect(Box<Connect>),
    Tunnel(Box<Tunnel>),
    Association(Box<Association>),
    /// BIND: listening for the peer, then the second reply.
    Bind(Box<Bind>),
    /// An error reply is on its way or out; the client gets a moment to read it.
    Rejecting,
}

pub(crate) struct Conn {
    pub(super) id: ConnId,
    pub(super) client: Sock,
    pub(super) peer: Option<SocketAddr>,
    /// The client connection's local address (BND.ADDR of a UDP association).
    pub(super) local: Option<SocketAddr>,
    pub(super) stage: Stage,
    /// Ops in flight on any of the connection's sockets.
    pub(super) inflight: u32,
    /// Of `inflight`, shutdown ops: they finish on their own, so closing need not cancel them.
    pub(super) shutdowns: u32,
    timer_seq: u16,
    pub(super) last_active: Instant,
    closing: bool,
    /// The connection's place under the limits, given back when the connection is dropped.
    pub(super) lease: Lease,
    /// When it was accepted.
    pub(super) accepted: Instant,
    /// How it ended, as far as known (the metrics' `outcome`).
    pub(super) outcome: Outcome,
    /// What the access log says about its request; None until a request was read.
    pub(super) record: Option<Box<Record>>,
}

/// A request's access-log line in the making.
pub(crate) struct Record {
    pub command: &'static str,
    pub user: Option<Box<[u8]>>,
    /// The target as the client wrote it.
    pub target: String,
    pub connected: Option<SocketAddr>,
    pub rep: u8,
    /// Bytes delivered client -> target, and back.
    pub up: u64,
    pub down: u64,
    pub reason: std::borrow::Cow<'static, str>,
}

impl Conn {
    pub(crate) fn new(
        id: ConnId,
        client: Sock,
        peer: Option<SocketAddr>,
        local: Option<SocketAddr>,
        now: Instant,
        lease: Lease,
    ) -> Conn {
        Conn {
            id,
            client,
            peer,
            local,
            stage: Stage::Handshake(Box::default()),
            inflight: 0,
            shutdowns: 0,
            timer_seq: 0,
            last_active: now,
            closing: false,
            lease,
            accepted: now,
            outcome: Outcome::HandshakeClosed,
            record: None,
        }
    }

    /// The reason the access log gives for the end, unless one is set already.
    pub(super) fn end_reason(&mut self, reason: impl Into<std::borrow::Cow<'static, str>>) {
        if let Some(r) = &mut self.record {
            if r.reason.is_empty() {
                r.reason = reason.into();
            }
        }
    }

    /// Counts bytes a send delivered, for the metrics and the access log.
    fn delivered<E: Engine>(&mut self, cx: &Ctx<'_, E>, d: Dir, path: Path, n: i32) {
        let n = n as u64;
        cx.metrics.bytes(d == Dir::Up, path, n);
        if let Some(r) = &mut self.record {
            match d {
                Dir::Up => r.up += n,
                Dir::Down => r.down += n,
            }
        }
    }

    /// True once closing has finished: no op is in flight, so the server may release it.
    pub(crate) fn is_finished(&self) -> bool {
        self.closing && self.inflight == 0
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.closing
    }

    pub(super) fn peer_str(&self) -> String {
        self.peer.map_or_else(|| "?".into(), |p| p.to_string())
    }

    pub(super) fn owner(&self, op: Op) -> crate::uring::Owner {
        self.id.owner(op)
    }

    /// Counts an op about to be submitted.
    pub(super) fn submitted(&mut self) {
        self.inflight += 1;
    }

    pub(super) fn recv_client<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, buf: Vec<u8>, op: Op) {
        self.inflight += 1;
        cx.io.recv(&self.client, buf, self.id.owner(op));
    }

    pub(super) fn send_client<E: Engine>(
        &mut self,
        cx: &mut Ctx<'_, E>,
        buf: Vec<u8>,
        off: usize,
        op: Op,
    ) {
        self.inflight += 1;
        cx.io.send(&self.client, buf, off, self.id.owner(op));
    }

    /// A send to the client (`op`) completed: sends what is left and answers None, or closes
    /// on an error and answers None, or answers the buffer once all of it is out.
    pub(super) fn client_sent<E: Engine>(
        &mut self,
        cx: &mut Ctx<'_, E>,
        c: Completion,
        op: Op,
    ) -> Option<Vec<u8>> {
        let Data::Buf { buf, off } = c.data else {
            self.close(cx);
            return None;
        };
        if c.res <= 0 {
            self.close(cx);
            return None;
        }
        let off = off + c.res as usize;
        if off < buf.len() {
            self.send_client(cx, buf, off, op);
            return None;
        }
        Some(buf)
    }

    /// Arms the connection's one timer (replacing any earlier deadline).
    pub(super) fn arm_timer<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, after: Duration) {
        self.timer_seq = (self.timer_seq + 1) & ARG_MAX;
        let owner = self.id.owner(Op::Timer(self.timer_seq));
        cx.io.set_timer(cx.now + after, owner);
    }

    pub(super) fn disarm_timer(&mut self) {
        self.timer_seq = (self.timer_seq + 1) & ARG_MAX;
    }

    // ---- entry points (the server and the tests call these) ------------------------------

    /// `--proxy-protocol`: a PROXY header comes before the greeting.
    pub(crate) fn expect_proxy_header(&mut self) {
        if let Stage::Handshake(hs) = &mut self.stage {
            hs.proxy_header = true;
        }
    }

    /// The connection was accepted: wait for the greeting, within the handshake timeout.
    pub(crate) fn start<E: Engine>(&mut self, cx: &mut Ctx<'_, E>) {
        self.last_active = cx.now;
        self.arm_timer(cx, cx.cfg.handshake_timeout);
        self.recv_client(cx, Vec::with_capacity(512), Op::HandshakeRecv);
    }

    pub(crate) fn on_completion<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, op: Op, c: Completion) {
        if !c.more {
            self.inflight -= 1;
        }
        if c.res > 0 {
            match op {
                Op::Send(d) => self.delivered(cx, d, Path::Copy, c.res),
                Op::SpliceOut(d) => self.delivered(cx, d, Path::Splice, c.res),
                Op::EarlySend => self.delivered(cx, Dir::Up, Path::Copy, c.res),
                _ => {}
            }
        }
        if let Op::Shutdown(_) = op {
            self.shutdowns -= 1;
            return;
        }
        if self.closing {
            // Only account for what the completion hands back.
            if let Stage::Tunnel(t) = &mut self.stage {
                t.settle(op, &c);
            }
            return;
        }
        if !matches!(op, Op::UdpRecv(_) | Op::UdpSend(_)) {
            self.last_active = cx.now;
        }
        match op {
            Op::HandshakeRecv => self.on_handshake_recv(cx, c),
            Op::HandshakeSend => self.on_handshake_send(cx, c),
            Op::Connect if matches!(self.stage, Stage::Association(_)) => {
                self.on_udp_upstream_connect(cx, c)
            }
            Op::Connect => self.on_connect(cx, c),
            Op::ReplySend | Op::EarlySend => self.on_reply_send(cx, op, c),
            Op::RejectSend => self.on_reject_send(cx, c),
            Op::RejectDrain => self.on_reject_drain(cx, c),
            Op::PollIn(d)
            | Op::PollOut(d)
            | Op::SpliceIn(d)
            | Op::SpliceOut(d)
            | Op::Recv(d)
            | Op::Send(d) => self.on_forward(cx, op, d, c),
            Op::ControlRecv | Op::UdpRecv(_) | Op::UdpSend(_) => self.on_udp(cx, op, c),
            Op::BindAccept => self.on_bind_accept(cx, c),
            Op::BindReply => self.on_bind_reply(cx, c),
            Op::UpstreamSend if matches!(self.stage, Stage::Association(_)) => {
                self.on_udp_upstream_send(cx, c)
            }
            Op::UpstreamRecv if matches!(self.stage, Stage::Association(_)) => {
                self.on_udp_upstream_recv(cx, c)
            }
            Op::UpstreamSend => self.on_upstream_send(cx, c),
            Op::UpstreamRecv => self.on_upstream_recv(cx, c),
            Op::Shutdown(_) | Op::Timer(_) | Op::Resolve(_) => {}
        }
    }

    pub(crate) fn on_timer<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, seq: u16) {
        if seq != self.timer_seq || self.closing {
            return;
        }
        match &mut self.stage {
            Stage::Handshake(_) => {
                info!(client = %self.peer_str(), reason = "handshake timeout", "handshake failed");
                self.outcome = Outcome::HandshakeTimeout;
                self.close(cx);
            }
            Stage::Connect(_) => self.on_connect_timeout(cx),
            Stage::Tunnel(_) => {
                let Some(idle) = cx.cfg.idle_timeout else {
                    return;
                };
                let quiet = cx.now.saturating_duration_since(self.last_active);
                if quiet >= idle {
                    debug!(client = %self.peer_str(), "idle timeout");
                    self.outcome = Outcome::IdleTimeout;
                    self.end_reason("idle timeout");
                    self.close(cx);
                } else {
                    self.arm_timer(cx, idle - quiet);
                }
            }
            Stage::Association(_) => self.on_udp_timer(cx),
            Stage::Bind(_) => self.on_bind_timeout(cx),
            Stage::Rejecting => self.close(cx),
        }
    }

    /// Starts closing: cancels every op that could still wait. Nothing is freed here.
    pub(crate) fn close<E: Engine>(&mut self, cx: &mut Ctx<'_, E>) {
        if self.closing {
            return;
        }
        self.closing = true;
        self.disarm_timer();
        self.forget_lookup(cx);
        let waiting = self.inflight > self.shutdowns;
        match &mut self.stage {
            Stage::Tunnel(t) => t.close(cx, &self.client, self.inflight - self.shutdowns),
            Stage::Association(a) => {
                if waiting {
                    cx.io.cancel_all(&self.client);
                }
                a.close(cx, waiting);
                self.end_udp_accounting(cx);
                self.log_udp_end();
            }
            Stage::Connect(c) => {
                if waiting {
                    cx.io.cancel_all(&self.client);
                    if let Some(t) = &c.target {
                        cx.io.cancel_all(t);
                    }
                }
            }
            Stage::Bind(_) => {
                if waiting {
                    cx.io.cancel_all(&self.client);
                    self.cancel_bind(cx);
                }
            }
            Stage::Handshake(_) | Stage::Rejecting => {
                if waiting {
                    cx.io.cancel_all(&self.client);
                }
            }
        }
    }

    /// Closing at the end of the drain timeout (shutdown).
    pub(crate) fn shut_down<E: Engine>(&mut self, cx: &mut Ctx<'_, E>) {
        if !self.closing {
            self.outcome = Outcome::Shutdown;
            self.end_reason("relay shutting down");
        }
        self.close(cx);
    }

    /// Gives back the sockets and pipes, after the last op completed; counts how the
    /// connection ended and writes its access-log line.
    pub(crate) fn release<E: Engine>(self, cx: &mut Ctx<'_, E>) {
        debug_assert!(self.is_finished());
        cx.metrics.closed(self.outcome);
        if let (Some(log), Some(r)) = (cx.access, &self.record) {
            log.log(&Entry {
                end: std::time::SystemTime::now(),
                client: self.peer,
                user: r.user.as_deref(),
                command: r.command,
                target: &r.target,
                connected: r.connected,
                rep: r.rep,
                up: r.up,
                down: r.down,
                duration: cx.now.saturating_duration_since(self.accepted),
                reason: if r.reason.is_empty() {
                    "closed"
                } else {
                    &r.reason
                },
            });
        }
        cx.io.close(self.client);
        match self.stage {
            Stage::Tunnel(t) => t.release(cx),
            Stage::Association(a) => a.release(cx),
            Stage::Connect(c) => {
                if let Some(t) = c.target {
                    cx.io.close(t);
                }
            }
            Stage::Bind(b) => {
                if let Some(l) = b.listener {
                    cx.io.close(l);
                }
                if let Some((p, _)) = b.peer {
                    cx.io.close(p);
                }
            }
            Stage::Handshake(_) | Stage::Rejecting => {}
        }
    }

    /// An I/O error ended the connection.
    pub(super) fn io_error<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, res: i32) {
        let target = match &self.stage {
            Stage::Tunnel(t) => t.dst().to_string(),
            _ => "?".to_string(),
        };
        if self.outcome == Outcome::Relayed {
            self.outcome = Outcome::IoError;
        }
        if self.record.is_some() {
            self.end_reason(std::io::Error::from_raw_os_error(-res).to_string());
        }
        debug!(
            client = %self.peer_str(),
            target = %target,
            error = %std::io::Error::from_raw_os_error(-res),
            "connection ended"
        );
        self.close(cx);
    }
}
