//! UDP ASSOCIATE (RFC 1928 §7): the association stage of a connection.
//!
//! The TCP connection that asked becomes the association's control channel: the association
//! lives as long as it does (EOF, reset or the idle timeout end both), and the connection ends
//! when the association fails. This file owns that coupling: creating the sockets, the reply,
//! watching the control connection, the association's timer and its one log line.
//! [`assoc`] owns the datagram paths.

pub(crate) mod assoc;

use std::net::SocketAddr;
use std::time::Instant;

use tracing::{debug, info};

use super::conn::{Conn, Stage};
use super::connect::cut_short;
use super::handshake::Requested;
use super::token::Op;
use super::Ctx;
use crate::config::Upstream;
use crate::dns::{Addrs, ResolveError};
use crate::proto::client::{ClientError, ClientHandshake, ClientStep};
use crate::proto::{self, Addr, RelayError};
use crate::rules::{Command, Verdict};
use crate::uring::{Completion, Data, Engine, Sock, Source};
use assoc::Assoc;

pub(crate) struct Association {
    assoc: Assoc,
    /// The counters as last added to the shard's metrics.
    published: assoc::Stats,
    /// When the connection's timer is due for the association (None: not armed).
    timer_at: Option<Instant>,
    /// Why the association ended, for its log line.
    end_reason: &'static str,
    /// Through an upstream proxy: our own association with it.
    upstream: Option<Box<UpstreamAssoc>>,
}

/// The association the relay opens with an upstream proxy for a client's association: a TCP
/// control connection (its end ends ours, and ours closes it) and the upstream's UDP relay
/// address, to which the client's datagrams go as they are.
pub(super) struct UpstreamAssoc {
    upstream: Upstream,
    /// The control connection: connecting, then the handshake, then watched for its end.
    ctl: Option<Sock>,
    handshake: Option<ClientHandshake>,
    /// The upstream's reply arrived: the association is running.
    ready: bool,
    timed_out: bool,
    /// Our reply, sent once the upstream's came.
    reply_prefix: Vec<u8>,
    bnd: SocketAddr,
    dst: Addr,
}

impl Association {
    pub(super) fn close<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, waiting: bool) {
        self.assoc.close(cx, waiting);
        if let Some(ctl) = self.upstream.as_ref().and_then(|u| u.ctl.as_ref()) {
            cx.io.cancel_all(ctl);
        }
    }

    pub(super) fn release<E: Engine>(self, cx: &mut Ctx<'_, E>) {
        self.assoc.release(cx);
        if let Some(ctl) = self.upstream.and_then(|u| u.ctl) {
            cx.io.close(ctl);
        }
    }

    #[cfg(test)]
    pub(crate) fn stats(&self) -> &assoc::Stats {
        &self.assoc.stats
    }
}

impl Conn {
    /// A UDP ASSOCIATE request: open the association's sockets on this shard and reply with
    /// the client-facing socket's address (or `--udp-advertise`).
    pub(super) fn associate<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, r: Requested) {
        let (Some(local), Some(peer)) = (self.local, self.peer) else {
            let err = RelayError::General("control connection has no address");
            return self.fail(cx, r.reply_prefix, &r.req.dst, err);
        };
        if cx.shard.udp_group.is_none() {
            let err = RelayError::General("UDP ASSOCIATE is unavailable");
            return self.fail(cx, r.reply_prefix, &r.req.dst, err);
        }
        // Whether any datagram could be allowed; each one is checked again on its way.
        let verdict = cx
            .cfg
            .rules
            .check_open(peer.ip(), r.user.as_deref(), Command::Udp);
        let upstream = match verdict {
            Verdict::Deny(by) => {
                return self.fail(cx, r.reply_prefix, &r.req.dst, RelayError::Denied(by))
            }
            Verdict::Via(i) => cx.cfg.upstreams.get(usize::from(i)).cloned(),
            Verdict::Allow => None,
        };
        let (csock, caddr, tsock, v6) = match assoc::open(cx.io, local, &cx.cfg.outbound) {
            Ok(s) => s,
            Err(e) => {
                info!(client = %self.peer_str(), error = %e, "udp association failed");
                let err = RelayError::General("cannot open UDP sockets");
                return self.fail(cx, r.reply_prefix, &r.req.dst, err);
            }
        };
        let bnd = SocketAddr::new(cx.cfg.udp_advertise.unwrap_or(local.ip()), caddr.port());
        let assoc = Assoc::new(
            self.id,
            csock,
            tsock,
            v6,
            cx.cfg.udp_client_check,
            peer.ip(),
            &r.req.dst,
            bnd,
            cx.now,
            r.user,
        );
        // Control-channel bytes after the request mean nothing: they are dropped.
        if let Some(rec) = &mut self.record {
            rec.connected = Some(bnd);
        }
        cx.metrics.assoc_opened.inc();
        self.stage = Stage::Association(Box::new(Association {
            assoc,
            published: assoc::Stats::default(),
            timer_at: None,
            end_reason: "relay shutting down",
            upstream: None,
        }));
        let Some(upstream) = upstream else {
            return self.send_success_reply(cx, r.reply_prefix, bnd);
        };
        // Through an upstream: its association first, within the connect timeout; our reply
        // follows its reply.
        self.arm_timer(cx, cx.cfg.connect_timeout);
        let from = Source {
            ip: cx.cfg.outbound.source_for(upstream.addr.is_ipv6()),
            device: cx.cfg.outbound.device.as_deref(),
        };
        let connected = cx.io.connect(upstream.addr, from, self.owner(Op::Connect));
        let Stage::Association(a) = &mut self.stage else {
            return;
        };
        let mut up = Box::new(UpstreamAssoc {
            upstream,
            ctl: None,
            handshake: None,
            ready: false,
            timed_out: false,
            reply_prefix: r.reply_prefix,
            bnd,
            dst: r.req.dst,
        });
        match connected {
            Ok((sock, _)) => {
                up.ctl = Some(sock);
                a.upstream = Some(up);
                self.inflight += 1;
            }
            Err(e) => {
                let (prefix, dst) = (std::mem::take(&mut up.reply_prefix), up.dst.clone());
                info!(client = %self.peer_str(), upstream = %up.upstream.name, error = %e, "upstream unreachable");
                cx.metrics.assoc_closed.inc();
                self.fail(
                    cx,
                    prefix,
                    &dst,
                    RelayError::Connect(e.raw_os_error().unwrap_or(0)),
                );
            }
        }
    }

    /// The upstream of an association: connected (or not).
    pub(super) fn on_udp_upstream_connect<E: Engine>(
        &mut self,
        cx: &mut Ctx<'_, E>,
        c: Completion,
    ) {
        let (client, send) = (self.peer_str(), self.owner(Op::UpstreamSend));
        let Stage::Association(a) = &mut self.stage else {
            return self.close(cx);
        };
        let Some(up) = a.upstream.as_mut() else {
            return self.close(cx);
        };
        let Some(sock) = up.ctl.take() else {
            return self.close(cx);
        };
        if c.res < 0 {
            info!(
                client = %client,
                upstream = %up.upstream.name,
                address = %up.upstream.addr,
                error = %std::io::Error::from_raw_os_error(-c.res),
                "upstream unreachable"
            );
            cx.io.close(sock);
            let err = cut_short(up.timed_out, c.res, RelayError::Connect(-c.res));
            return self.fail_upstream_assoc(cx, err);
        }
        let (sock, _) = cx.io.establish(sock);
        // The relay's own association: it names no client endpoint (0.0.0.0:0), so the
        // upstream takes the first datagram from this host as ours.
        let mut hs = ClientHandshake::new(
            Addr::Ip(SocketAddr::from(([0, 0, 0, 0], 0))),
            proto::Command::UDP_ASSOCIATE,
            up.upstream.creds.clone(),
        );
        let mut out = Vec::new();
        hs.start(&mut out);
        up.handshake = Some(hs);
        cx.io.send(&sock, out, 0, send);
        up.ctl = Some(sock);
        self.inflight += 1;
    }

    pub(super) fn on_udp_upstream_send<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, c: Completion) {
        let (send, recv) = (self.owner(Op::UpstreamSend), self.owner(Op::UpstreamRecv));
        let Stage::Association(a) = &mut self.stage else {
            return self.close(cx);
        };
        let (Some(up), Data::Buf { buf, off }) = (a.upstream.as_mut(), c.data) else {
            return self.close(cx);
        };
        let Some(ctl) = &up.ctl else {
            return self.close(cx);
        };
        if c.res <= 0 {
            let err = cut_short(up.timed_out, c.res, RelayError::UpstreamFailed);
            return self.fail_upstream_assoc(cx, err);
        }
        let off = off + c.res as usize;
        if off < buf.len() {
            cx.io.send(ctl, buf, off, send);
        } else {
            cx.io.recv(ctl, Vec::with_capacity(512), recv);
        }
        self.inflight += 1;
    }

    pub(super) fn on_udp_upstream_recv<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, c: Completion) {
        let (send, recv) = (self.owner(Op::UpstreamSend), self.owner(Op::UpstreamRecv));
        let client = self.peer_str();
        let Stage::Association(a) = &mut self.stage else {
            return self.close(cx);
        };
        let (Some(up), Data::Buf { buf, off }) = (a.upstream.as_mut(), c.data) else {
            return self.close(cx);
        };
        let Some(ctl) = &up.ctl else {
            return self.close(cx);
        };
        if up.ready {
            // The running association's control connection: bytes mean nothing, its end
            // ends the client's association.
            if c.res > 0 {
                cx.io.recv(ctl, Vec::with_capacity(64), recv);
                self.inflight += 1;
                return;
            }
            return self.end_udp(cx, "upstream control connection closed");
        }
        if c.res <= 0 {
            let err = cut_short(up.timed_out, c.res, RelayError::UpstreamFailed);
            return self.fail_upstream_assoc(cx, err);
        }
        let Some(hs) = up.handshake.as_mut() else {
            return self.close(cx);
        };
        let mut out = Vec::new();
        match hs.advance(&buf[off..], &mut out) {
            Ok(ClientStep::NeedMore) => {
                if out.is_empty() {
                    cx.io.recv(ctl, Vec::with_capacity(512), recv);
                } else {
                    cx.io.send(ctl, out, 0, send);
                }
                self.inflight += 1;
            }
            Ok(ClientStep::Done { reply, .. }) => {
                let Addr::Ip(relay) = reply.bnd else {
                    return self.fail_upstream_assoc(cx, RelayError::UpstreamFailed);
                };
                // An unspecified BND means "the address you reached me on".
                let relay = if relay.ip().is_unspecified() {
                    SocketAddr::new(up.upstream.addr.ip(), relay.port())
                } else {
                    relay
                };
                up.ready = true;
                a.assoc.upstream_udp = Some(relay);
                cx.io.recv(ctl, Vec::with_capacity(64), recv);
                self.inflight += 1;
                debug!(client = %client, upstream = %up.upstream.name, relay = %relay, "upstream association");
                let (prefix, bnd) = (std::mem::take(&mut up.reply_prefix), up.bnd);
                self.disarm_timer();
                self.send_success_reply(cx, prefix, bnd);
            }
            Err(e) => {
                info!(client = %client, upstream = %up.upstream.name, reason = %e, "upstream handshake failed");
                let err = match e {
                    ClientError::Rep(rep) => RelayError::UpstreamRep(rep.0),
                    _ => RelayError::UpstreamFailed,
                };
                self.fail_upstream_assoc(cx, err);
            }
        }
    }

    /// The upstream's association could not be set up: the client gets `err`'s reply.
    fn fail_upstream_assoc<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, err: RelayError) {
        let Stage::Association(a) = &mut self.stage else {
            return self.close(cx);
        };
        let (prefix, dst) = match a.upstream.as_mut() {
            Some(up) => (std::mem::take(&mut up.reply_prefix), up.dst.clone()),
            None => (Vec::new(), Addr::Ip(SocketAddr::from(([0, 0, 0, 0], 0)))),
        };
        cx.metrics.assoc_closed.inc();
        self.fail(cx, prefix, &dst, err);
    }

    /// The connect timeout while the upstream's association is being set up: cancel what
    /// waits on its control connection; the completion answers the client.
    pub(super) fn on_udp_upstream_timeout<E: Engine>(&mut self, cx: &mut Ctx<'_, E>) -> bool {
        let Stage::Association(a) = &mut self.stage else {
            return false;
        };
        match a.upstream.as_mut() {
            Some(up) if !up.ready => {
                up.timed_out = true;
                if let Some(ctl) = &up.ctl {
                    cx.io.cancel_all(ctl);
                }
                true
            }
            _ => false,
        }
    }

    /// The reply is out: start relaying datagrams and watch the control connection.
    pub(super) fn start_udp<E: Engine>(&mut self, cx: &mut Ctx<'_, E>) {
        self.disarm_timer();
        let client = self.peer_str();
        let Conn {
            stage, inflight, ..
        } = self;
        let Stage::Association(a) = stage else {
            return self.close(cx);
        };
        a.assoc.last_active = cx.now;
        a.assoc.rearm_recv(cx, inflight, crate::relay::Side::Client);
        a.assoc.rearm_recv(cx, inflight, crate::relay::Side::Target);
        debug!(client = %client, bnd = %a.assoc.bnd, "udp association");
        self.recv_client(cx, Vec::with_capacity(256), Op::ControlRecv);
        self.arm_udp_timer(cx);
    }

    /// Keeps the connection timer at the association's earliest deadline.
    fn arm_udp_timer<E: Engine>(&mut self, cx: &mut Ctx<'_, E>) {
        let Stage::Association(a) = &mut self.stage else {
            return;
        };
        let Some(due) = a.assoc.next_deadline(cx) else {
            return;
        };
        if a.timer_at.is_some_and(|at| at <= due) {
            return;
        }
        a.timer_at = Some(due);
        let after = due.saturating_duration_since(cx.now);
        self.arm_timer(cx, after);
    }

    pub(super) fn on_udp_timer<E: Engine>(&mut self, cx: &mut Ctx<'_, E>) {
        if self.on_udp_upstream_timeout(cx) {
            return;
        }
        let Stage::Association(a) = &mut self.stage else {
            return;
        };
        a.timer_at = None;
        if a.assoc.on_timer(cx) {
            return self.end_udp(cx, "idle timeout");
        }
        self.arm_udp_timer(cx);
    }

    pub(super) fn on_udp<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, op: Op, c: Completion) {
        if op == Op::ControlRecv {
            return self.on_control_recv(cx, c);
        }
        let Conn {
            stage, inflight, ..
        } = self;
        let Stage::Association(a) = stage else {
            return;
        };
        let r = a.assoc.on_completion(cx, inflight, op, c);
        a.assoc.stats.publish(&mut a.published, cx.metrics);
        match r {
            Ok(()) => self.arm_udp_timer(cx),
            Err(reason) => self.end_udp(cx, reason),
        }
    }

    /// A lookup for datagrams of the association finished.
    pub(super) fn on_udp_resolved<E: Engine>(
        &mut self,
        cx: &mut Ctx<'_, E>,
        id: u16,
        res: Result<Addrs, ResolveError>,
    ) {
        let Conn {
            stage, inflight, ..
        } = self;
        if let Stage::Association(a) = stage {
            a.assoc.on_resolved(cx, inflight, id, res);
        }
    }

    /// Anything the client sends on the control connection is ignored; its end (EOF, reset)
    /// ends the association.
    fn on_control_recv<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, c: Completion) {
        match c.data {
            Data::Buf { mut buf, .. } if c.res > 0 => {
                buf.clear();
                self.recv_client(cx, buf, Op::ControlRecv);
            }
            _ if c.res == 0 => self.end_udp(cx, "control connection closed"),
            _ => self.end_udp(cx, "control connection failed"),
        }
    }

    /// The end of a loop turn: send the single datagrams the association gathered.
    pub(crate) fn flush_udp<E: Engine>(&mut self, cx: &mut Ctx<'_, E>) {
        if self.is_closing() {
            return;
        }
        let Conn {
            stage, inflight, ..
        } = self;
        if let Stage::Association(a) = stage {
            a.assoc.flush(cx, inflight);
        }
    }

    /// Re-arms a receive of the association that ran out of buffers.
    pub(crate) fn rearm_udp<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, side: crate::relay::Side) {
        if self.is_closing() {
            return;
        }
        let Conn {
            stage, inflight, ..
        } = self;
        if let Stage::Association(a) = stage {
            a.assoc.rearm_recv(cx, inflight, side);
        }
    }

    fn end_udp<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, reason: &'static str) {
        if let Stage::Association(a) = &mut self.stage {
            a.end_reason = reason;
        }
        self.close(cx);
    }

    /// The association ended: its last counters to the metrics, its totals to the access log.
    pub(super) fn end_udp_accounting<E: Engine>(&mut self, cx: &mut Ctx<'_, E>) {
        let Stage::Association(a) = &mut self.stage else {
            return;
        };
        a.assoc.stats.publish(&mut a.published, cx.metrics);
        cx.metrics.assoc_closed.inc();
        let (up, down, reason) = (
            a.assoc.stats.bytes_out,
            a.assoc.stats.bytes_in,
            a.end_reason,
        );
        if let Some(r) = &mut self.record {
            r.up = up;
            r.down = down;
        }
        self.end_reason(reason);
    }

    /// The association's one log line, with its counters.
    pub(super) fn log_udp_end(&self) {
        let Stage::Association(a) = &self.stage else {
            return;
        };
        let s = &a.assoc.stats;
        info!(
            client = %self.peer_str(),
            udp_client = %a.assoc.client().map_or_else(|| "-".to_string(), |a| a.to_string()),
            bnd = %a.assoc.bnd,
            reason = a.end_reason,
            relayed_out = s.relayed_out,
            relayed_in = s.relayed_in,
            dropped_foreign = s.dropped_foreign,
            dropped_malformed = s.dropped_malformed,
            dropped_frag = s.dropped_frag,
            dropped_other = s.dropped_other,
            dropped_refused = s.dropped_refused,
            "udp association closed"
        );
    }
}
