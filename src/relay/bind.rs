//! The BIND command (RFC 1928 §4), used by protocols whose server connects back to the client
//! (active-mode FTP): open a listening socket, tell the client its address (first reply),
//! accept one peer, tell the client the peer's address (second reply), then relay as for
//! CONNECT.
//!
//! The listener binds to the control connection's local IP on a fresh port; the first reply
//! advertises that address, or `--bind-advertise`. When DST.ADDR names a host (it is not all
//! zeros), only a peer from that IP is accepted: any other is closed at once, counted and
//! logged, and the listener waits on. With no acceptable peer within `--bind-timeout` the
//! client gets REP 0x06 (TTL expired) as its second reply. The client's control connection is
//! not read while waiting (a client sends nothing before the second reply); its end is noticed
//! at the timeout.

use std::net::{IpAddr, SocketAddr};

use tracing::info;

use super::conn::{Conn, Stage};
use super::forward::Tunnel;
use super::handshake::Requested;
use super::token::Op;
use super::Ctx;
use crate::proto::{self, Addr, RelayError, Rep};
use crate::rules::{Command, Verdict};
use crate::uring::{Completion, Data, Engine, Sock};

pub(crate) struct Bind {
    /// The listening socket, until a peer is in (or the request failed).
    pub(super) listener: Option<Sock>,
    /// The peer DST.ADDR names; None: any peer.
    expect: Option<IpAddr>,
    /// The accepted peer and its address.
    pub(super) peer: Option<(Sock, SocketAddr)>,
    /// The first reply is out.
    first_reply_out: bool,
    /// The bind timeout fired: the accept was cancelled.
    timed_out: bool,
    /// Peers refused because DST.ADDR named another host.
    refused: u32,
    /// The request's DST, for log lines.
    dst: Addr,
}

impl Conn {
    /// A BIND request: listen, send the first reply, and wait for the peer.
    pub(super) fn bind<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, r: Requested) {
        let dst = r.req.dst;
        let expect = match &dst {
            Addr::Ip(a) if !a.ip().is_unspecified() => Some(a.ip().to_canonical()),
            _ => None,
        };
        // The rules see the command "bind" and, when DST.ADDR names one, the peer as target.
        let verdict = match expect {
            Some(_) => self.access(cx, Command::Bind, &dst, r.user.as_deref()),
            None => cx.cfg.rules.check_open(
                super::client_ip(self.peer),
                r.user.as_deref(),
                Command::Bind,
            ),
        };
        if let Verdict::Deny(by) = verdict {
            return self.fail(cx, r.reply_prefix, &dst, RelayError::Denied(by));
        }
        let Some(local) = self.local else {
            let err = RelayError::General("control connection has no address");
            return self.fail(cx, r.reply_prefix, &dst, err);
        };
        let (listener, laddr) = match cx.io.tcp_listener(SocketAddr::new(local.ip(), 0)) {
            Ok(l) => l,
            Err(e) => {
                info!(client = %self.peer_str(), error = %e, "bind failed");
                let err = RelayError::General("cannot open a BIND listener");
                return self.fail(cx, r.reply_prefix, &dst, err);
            }
        };
        let advertised = SocketAddr::new(cx.cfg.bind_advertise.unwrap_or(laddr.ip()), laddr.port());
        self.arm_timer(cx, cx.cfg.bind_timeout);
        self.inflight += 1;
        cx.io.accept(&listener, self.owner(Op::BindAccept));
        self.stage = Stage::Bind(Box::new(Bind {
            listener: Some(listener),
            expect,
            peer: None,
            first_reply_out: false,
            timed_out: false,
            refused: 0,
            dst: dst.clone(),
        }));
        let mut first = r.reply_prefix;
        proto::codec::encode_reply(Rep::SUCCEEDED, &Addr::Ip(advertised), &mut first);
        self.send_client(cx, first, 0, Op::BindReply);
    }

    pub(super) fn on_bind_reply<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, c: Completion) {
        if self.client_sent(cx, c, Op::BindReply).is_none() {
            return;
        }
        let Stage::Bind(b) = &mut self.stage else {
            return self.close(cx);
        };
        b.first_reply_out = true;
        if b.peer.is_some() {
            self.second_reply(cx);
        }
    }

    pub(super) fn on_bind_accept<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, c: Completion) {
        let client = self.peer_str();
        let owner = self.owner(Op::BindAccept);
        let Stage::Bind(b) = &mut self.stage else {
            return self.close(cx);
        };
        let fd = match c.data {
            Data::Accepted(fd) if c.res >= 0 => fd,
            _ => {
                let timed_out = b.timed_out;
                if let Some(l) = b.listener.take() {
                    cx.io.close(l);
                }
                let err = if timed_out || c.res == -libc::ECANCELED {
                    RelayError::BindTimeout
                } else {
                    RelayError::General("accept failed")
                };
                let dst = b.dst.clone();
                return self.fail(cx, Vec::new(), &dst, err);
            }
        };
        let (sock, peer) = cx.io.adopt(fd);
        let peer_ip = peer.map(|p| p.ip().to_canonical());
        if b.expect.is_some() && peer_ip != b.expect {
            // Not the host the client named: close it and keep listening.
            b.refused += 1;
            cx.metrics.bind_peers_refused.inc();
            cx.io.close(sock);
            info!(
                client = %client,
                peer = %peer.map_or_else(|| "?".to_string(), |p| p.to_string()),
                expected = %b.expect.map_or_else(String::new, |ip| ip.to_string()),
                refused = b.refused,
                "bind: refused a peer DST.ADDR does not name"
            );
            if let Some(l) = &b.listener {
                cx.io.accept(l, owner);
                self.inflight += 1;
            }
            return;
        }
        let Some(peer) = peer else {
            cx.io.close(sock);
            let err = RelayError::General("accepted peer has no address");
            let dst = b.dst.clone();
            return self.fail(cx, Vec::new(), &dst, err);
        };
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        // One peer per BIND: the listener is done with (no op is in flight on it).
        if let Some(l) = b.listener.take() {
            cx.io.close(l);
        }
        b.peer = Some((sock, peer));
        if let Some(r) = &mut self.record {
            r.connected = Some(peer);
        }
        if b.first_reply_out {
            self.second_reply(cx);
        }
    }

    /// The peer is in and the first reply is out: the second reply names the peer.
    fn second_reply<E: Engine>(&mut self, cx: &mut Ctx<'_, E>) {
        let Stage::Bind(b) = &self.stage else {
            return;
        };
        let Some((_, peer)) = &b.peer else {
            return;
        };
        let peer = *peer;
        self.disarm_timer();
        let mut out = Vec::new();
        proto::codec::encode_reply(Rep::SUCCEEDED, &Addr::Ip(peer), &mut out);
        self.send_client(cx, out, 0, Op::ReplySend);
    }

    /// The second reply is out: relay between the client and the peer.
    pub(super) fn start_bound_tunnel<E: Engine>(&mut self, cx: &mut Ctx<'_, E>) {
        let Stage::Bind(b) = &mut self.stage else {
            return self.close(cx);
        };
        let Some((sock, peer)) = b.peer.take() else {
            return self.close(cx);
        };
        self.stage = Stage::Tunnel(Box::new(Tunnel::new(sock, Addr::Ip(peer))));
        self.start_forwarding(cx);
    }

    /// `--bind-timeout`: no acceptable peer came. The accept is cancelled; its completion
    /// sends the error reply.
    pub(super) fn on_bind_timeout<E: Engine>(&mut self, cx: &mut Ctx<'_, E>) {
        let Stage::Bind(b) = &mut self.stage else {
            return;
        };
        if b.peer.is_some() {
            // The second reply is on its way; the client will read it.
            return;
        }
        b.timed_out = true;
        if let Some(l) = &b.listener {
            cx.io.cancel_all(l);
        }
    }

    /// Closing a BIND that waits: cancel what waits on its sockets.
    pub(super) fn cancel_bind<E: Engine>(&mut self, cx: &mut Ctx<'_, E>) {
        if let Stage::Bind(b) = &self.stage {
            if let Some(l) = &b.listener {
                cx.io.cancel_all(l);
            }
        }
    }
}
