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
use super::handshake::Requested;
use super::token::Op;
use super::Ctx;
use crate::dns::{Addrs, ResolveError};
use crate::proto::RelayError;
use crate::rules::{Command, Verdict};
use crate::uring::{Completion, Data, Engine};
use assoc::Assoc;

pub(crate) struct Association {
    assoc: Assoc,
    /// The counters as last added to the shard's metrics.
    published: assoc::Stats,
    /// When the connection's timer is due for the association (None: not armed).
    timer_at: Option<Instant>,
    /// Why the association ended, for its log line.
    end_reason: &'static str,
}

impl Association {
    pub(super) fn close<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, waiting: bool) {
        self.assoc.close(cx, waiting);
    }

    pub(super) fn release<E: Engine>(self, cx: &mut Ctx<'_, E>) {
        self.assoc.release(cx);
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
        if let Verdict::Deny(by) = verdict {
            return self.fail(cx, r.reply_prefix, &r.req.dst, RelayError::Denied(by));
        }
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
        }));
        self.send_success_reply(cx, r.reply_prefix, bnd);
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
