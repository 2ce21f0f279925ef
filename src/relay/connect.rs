//! The connect stage of a CONNECT request: resolve the name (off the shard, or from the
//! cache), connect to each resolved address in turn until one answers, then send the success
//! reply (after any handshake output still owed) together with the client's early bytes to the
//! target. Every failure becomes one error reply through [`RelayError::rep`] and the
//! reject-then-linger close that follows an error reply.

use std::net::SocketAddr;
use std::time::Duration;

use tracing::info;

use super::conn::{Conn, Stage};
use super::forward::Tunnel;
use super::handshake::Requested;
use super::token::Op;
use super::Ctx;
use crate::config::Upstream;
use crate::dns::{Addrs, ResolveError};
use crate::metrics::Outcome;
use crate::proto::client::{ClientError, ClientHandshake, ClientStep};
use crate::proto::{self, Addr, RelayError, Rep};
use crate::rules::{Command, Request, Verdict};
use crate::uring::{Completion, Data, Engine, Sock, Source};

/// The error for an op toward a target or upstream that failed with `res`: a connect timeout
/// when the timer cut it short (it was cancelled), else `otherwise`.
pub(super) fn cut_short(timed_out: bool, res: i32, otherwise: RelayError) -> RelayError {
    if timed_out || res == -libc::ECANCELED {
        RelayError::ConnectTimeout
    } else {
        otherwise
    }
}

/// How long a rejected client gets to read its error reply.
pub(super) const REJECT_LINGER: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Resolving,
    Connecting,
    /// Connected to an upstream proxy: its SOCKS handshake is under way.
    Upstream,
    /// The success reply (and early data) are being sent; `pending` sends are left.
    Replying {
        pending: u8,
    },
}

/// A request going through an upstream proxy (a rule's `via`).
struct Via {
    upstream: Box<Upstream>,
    /// What to ask the upstream for: the client's target, or with `resolve = "local"` the
    /// address its name resolved to here.
    target: Option<Addr>,
    handshake: Option<ClientHandshake>,
}

pub(crate) struct Connect {
    dst: Addr,
    addrs: Vec<SocketAddr>,
    next: usize,
    last_err: Option<RelayError>,
    reply_prefix: Vec<u8>,
    early: Vec<u8>,
    /// The socket being connected, then the connected target.
    pub(super) target: Option<Sock>,
    step: Step,
    timed_out: bool,
    /// The authenticated user, for the rules' check of each resolved address.
    user: Option<Box<[u8]>>,
    /// When the current step (the lookup, or a connect) began: the metrics' histograms.
    since: std::time::Instant,
    via: Option<Via>,
}

impl Conn {
    /// A CONNECT request: resolve its target and connect, within the connect timeout.
    pub(super) fn connect<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, r: Requested) {
        let dst = r.req.dst;
        // The request as written: an address, or a name before it is resolved.
        let via = match self.access(cx, Command::Connect, &dst, r.user.as_deref()) {
            Verdict::Deny(by) => {
                return self.fail(cx, r.reply_prefix, &dst, RelayError::Denied(by))
            }
            Verdict::Via(i) => cx.cfg.upstreams.get(usize::from(i)).map(|u| Via {
                upstream: Box::new(u.clone()),
                target: None,
                handshake: None,
            }),
            Verdict::Allow => None,
        };
        self.arm_timer(cx, cx.cfg.connect_timeout);
        self.stage = Stage::Connect(Box::new(Connect {
            dst: dst.clone(),
            addrs: Vec::new(),
            next: 0,
            last_err: None,
            reply_prefix: r.reply_prefix,
            early: r.early,
            target: None,
            step: Step::Resolving,
            timed_out: false,
            user: r.user,
            since: cx.now,
            via,
        }));
        let resolve_here = match &self.stage {
            Stage::Connect(c) => c.via.as_ref().is_none_or(|v| v.upstream.resolve_local),
            _ => true,
        };
        match dst {
            Addr::Ip(a) => self.connect_to(cx, vec![a]),
            // Remote DNS: the name goes to the upstream unresolved.
            Addr::Domain(..) if !resolve_here => self.connect_to(cx, Vec::new()),
            Addr::Domain(name, port) => {
                let owner = self.owner(Op::Resolve(0));
                if let Some(res) =
                    cx.dns
                        .lookup(&name, port, owner, self.peer.map(|p| p.ip()), cx.now)
                {
                    self.on_resolved(cx, 0, res);
                }
            }
        }
    }

    /// A name lookup this connection asked for has finished.
    pub(crate) fn on_resolved<E: Engine>(
        &mut self,
        cx: &mut Ctx<'_, E>,
        id: u16,
        res: Result<Addrs, ResolveError>,
    ) {
        if self.is_closing() {
            return;
        }
        match &mut self.stage {
            Stage::Association(_) => self.on_udp_resolved(cx, id, res),
            Stage::Connect(c) if c.step == Step::Resolving => {
                // An answer in a later turn was a real lookup (a cache hit answers at once).
                if cx.now > c.since {
                    cx.metrics.dns.observe(cx.now - c.since);
                }
                match res {
                    Ok(addrs) if !addrs.is_empty() => self.connect_to(cx, addrs.to_vec()),
                    _ => self.fail_connect(cx, RelayError::ResolveFailed),
                }
            }
            _ => {}
        }
    }

    fn connect_to<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, mut addrs: Vec<SocketAddr>) {
        let Stage::Connect(c) = &mut self.stage else {
            return;
        };
        // Every address a name resolved to is checked too: a rule (or deny_private_targets)
        // that refuses an address means it is never connected to, whatever the name said.
        let remote_dns = c.via.as_ref().is_some_and(|v| !v.upstream.resolve_local);
        if let (Addr::Domain(name, _), false, false) = (&c.dst, cx.cfg.rules.is_open(), remote_dns)
        {
            let client = super::client_ip(self.peer);
            let mut refused = None;
            addrs.retain(|a| {
                let req = Request {
                    client,
                    user: c.user.as_deref(),
                    command: Command::Connect,
                    name: Some(name),
                    ip: Some(a.ip()),
                    port: a.port(),
                };
                match cx.cfg.rules.check(&req) {
                    Verdict::Allow | Verdict::Via(_) => true,
                    Verdict::Deny(by) => {
                        refused.get_or_insert(by);
                        false
                    }
                }
            });
            if let (true, Some(by)) = (addrs.is_empty(), refused) {
                return self.fail_connect(cx, RelayError::Denied(by));
            }
        }
        // Through an upstream: connect to it, and ask it for the target (the name as the
        // client wrote it, or the first allowed address it resolved to here).
        if let Some(v) = &mut c.via {
            v.target = Some(match (&c.dst, addrs.first()) {
                (Addr::Domain(..), Some(a)) if v.upstream.resolve_local => Addr::Ip(*a),
                _ => c.dst.clone(),
            });
            addrs = vec![v.upstream.addr];
        }
        c.addrs = addrs;
        self.connect_next(cx);
    }

    /// Connects to the next resolved address, or fails with the last error.
    fn connect_next<E: Engine>(&mut self, cx: &mut Ctx<'_, E>) {
        let owner = self.owner(Op::Connect);
        let Stage::Connect(c) = &mut self.stage else {
            return;
        };
        c.step = Step::Connecting;
        while let Some(&addr) = c.addrs.get(c.next) {
            c.next += 1;
            let from = Source {
                ip: cx.cfg.outbound.source_for(addr.is_ipv6()),
                device: cx.cfg.outbound.device.as_deref(),
            };
            match cx.io.connect(addr, from, owner) {
                Ok((sock, _)) => {
                    c.target = Some(sock);
                    c.since = cx.now;
                    self.submitted();
                    return;
                }
                Err(e) => c.last_err = Some(RelayError::Connect(e.raw_os_error().unwrap_or(0))),
            }
        }
        let err = c.last_err.take().unwrap_or(RelayError::ResolveFailed);
        self.fail_connect(cx, err);
    }

    pub(super) fn on_connect<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, c: Completion) {
        let client = self.peer_str();
        let Stage::Connect(st) = &mut self.stage else {
            return self.close(cx);
        };
        let Some(sock) = st.target.take() else {
            return self.close(cx);
        };
        cx.metrics
            .connect
            .observe(cx.now.saturating_duration_since(st.since));
        if c.res < 0 {
            if let Some(v) = &st.via {
                info!(
                    client = %client,
                    upstream = %v.upstream.name,
                    address = %v.upstream.addr,
                    error = %std::io::Error::from_raw_os_error(-c.res),
                    "upstream unreachable"
                );
            }
            cx.io.close(sock);
            if st.timed_out || c.res == -libc::ECANCELED {
                return self.fail_connect(cx, RelayError::ConnectTimeout);
            }
            st.last_err = Some(RelayError::Connect(-c.res));
            return self.connect_next(cx);
        }
        let connected = st.addrs.get(st.next.wrapping_sub(1)).copied();
        if let Some(r) = &mut self.record {
            r.connected = connected;
        }
        let Stage::Connect(st) = &mut self.stage else {
            return self.close(cx);
        };
        let (sock, bnd) = cx.io.establish(sock);
        if st.via.is_some() {
            st.target = Some(sock);
            return self.start_upstream(cx);
        }
        let Some(bnd) = bnd else {
            // Fail before the early data goes out: `reject` closes the target, and no op may
            // be in flight on it then.
            st.target = Some(sock);
            return self.fail_connect(cx, RelayError::General("outbound socket has no address"));
        };
        let prefix = std::mem::take(&mut st.reply_prefix);
        let early = std::mem::take(&mut st.early);
        st.step = Step::Replying {
            pending: 1 + u8::from(!early.is_empty()),
        };
        if !early.is_empty() {
            cx.io.send(&sock, early, 0, self.id.owner(Op::EarlySend));
            self.inflight += 1;
        }
        st.target = Some(sock);
        self.disarm_timer();
        self.send_success_reply(cx, prefix, bnd);
    }

    pub(super) fn on_connect_timeout<E: Engine>(&mut self, cx: &mut Ctx<'_, E>) {
        let Stage::Connect(c) = &mut self.stage else {
            return;
        };
        match c.step {
            Step::Resolving => self.fail_connect(cx, RelayError::ConnectTimeout),
            Step::Connecting => {
                // The connect completes with -ECANCELED and is reported as a timeout there.
                c.timed_out = true;
                if let Some(t) = &c.target {
                    cx.io.cancel_all(t);
                }
            }
            Step::Upstream => {
                // The op on the upstream completes with -ECANCELED and fails there.
                c.timed_out = true;
                if let Some(t) = &c.target {
                    cx.io.cancel_all(t);
                }
            }
            Step::Replying { .. } => self.close(cx),
        }
    }

    /// Connected to the upstream: send our side of its handshake.
    fn start_upstream<E: Engine>(&mut self, cx: &mut Ctx<'_, E>) {
        let owner = self.owner(Op::UpstreamSend);
        let Stage::Connect(c) = &mut self.stage else {
            return;
        };
        let (Some(v), Some(t)) = (&mut c.via, &c.target) else {
            return;
        };
        let target = v.target.clone().unwrap_or_else(|| c.dst.clone());
        let mut hs =
            ClientHandshake::new(target, proto::Command::CONNECT, v.upstream.creds.clone());
        let mut out = Vec::new();
        hs.start(&mut out);
        v.handshake = Some(hs);
        c.step = Step::Upstream;
        cx.io.send(t, out, 0, owner);
        self.inflight += 1;
    }

    pub(super) fn on_upstream_send<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, c: Completion) {
        let (send, recv) = (self.owner(Op::UpstreamSend), self.owner(Op::UpstreamRecv));
        let Stage::Connect(st) = &mut self.stage else {
            return self.close(cx);
        };
        let (Data::Buf { buf, off }, Some(t)) = (c.data, &st.target) else {
            return self.close(cx);
        };
        if c.res <= 0 {
            return self.upstream_failed(cx, c.res, "send failed".into());
        }
        let off = off + c.res as usize;
        if off < buf.len() {
            cx.io.send(t, buf, off, send);
        } else {
            cx.io.recv(t, Vec::with_capacity(512), recv);
        }
        self.inflight += 1;
    }

    pub(super) fn on_upstream_recv<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, c: Completion) {
        let (send, recv) = (self.owner(Op::UpstreamSend), self.owner(Op::UpstreamRecv));
        let client = self.peer_str();
        let Stage::Connect(st) = &mut self.stage else {
            return self.close(cx);
        };
        let Data::Buf { buf, off } = c.data else {
            return self.close(cx);
        };
        if c.res <= 0 {
            let why = if c.res == 0 {
                "closed the connection".to_string()
            } else {
                String::new()
            };
            return self.upstream_failed(cx, c.res, why);
        }
        let (Some(v), Some(t)) = (&mut st.via, &st.target) else {
            return self.close(cx);
        };
        let Some(hs) = &mut v.handshake else {
            return self.close(cx);
        };
        let mut out = Vec::new();
        match hs.advance(&buf[off..], &mut out) {
            Ok(ClientStep::NeedMore) if out.is_empty() => {
                cx.io.recv(t, Vec::with_capacity(512), recv);
                self.inflight += 1;
            }
            Ok(ClientStep::NeedMore) => {
                cx.io.send(t, out, 0, send);
                self.inflight += 1;
            }
            Ok(ClientStep::Done { reply, consumed }) => {
                // The upstream's BND goes to the client as is, then whatever the target sent
                // after it; from here on it is a tunnel like any other.
                let extra = buf[off + consumed..].to_vec();
                let prefix = std::mem::take(&mut st.reply_prefix);
                let early = std::mem::take(&mut st.early);
                st.step = Step::Replying {
                    pending: 1 + u8::from(!early.is_empty()),
                };
                if !early.is_empty() {
                    cx.io.send(t, early, 0, self.id.owner(Op::EarlySend));
                    self.inflight += 1;
                }
                self.disarm_timer();
                let mut out = prefix;
                proto::codec::encode_reply(Rep::SUCCEEDED, &reply.bnd, &mut out);
                out.extend_from_slice(&extra);
                self.send_client(cx, out, 0, Op::ReplySend);
            }
            Err(ClientError::Rep(rep)) => {
                info!(
                    client = %client,
                    upstream = %v.upstream.name,
                    rep = rep.0,
                    "the upstream refused the request"
                );
                self.fail_connect(cx, RelayError::UpstreamRep(rep.0));
            }
            Err(e) => self.upstream_failed(cx, 1, e.to_string()),
        }
    }

    /// The upstream's handshake failed: log it, naming the upstream, and answer the client.
    fn upstream_failed<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, res: i32, why: String) {
        let Stage::Connect(st) = &self.stage else {
            return self.close(cx);
        };
        if st.timed_out || res == -libc::ECANCELED {
            return self.fail_connect(cx, RelayError::ConnectTimeout);
        }
        let why = if res < 0 {
            std::io::Error::from_raw_os_error(-res).to_string()
        } else {
            why
        };
        if let Some(v) = &st.via {
            info!(
                client = %self.peer_str(),
                upstream = %v.upstream.name,
                reason = %why,
                "upstream handshake failed"
            );
        }
        self.fail_connect(cx, RelayError::UpstreamFailed);
    }

    /// Sends the success reply with `bnd`, after `prefix` (handshake output still owed).
    pub(super) fn send_success_reply<E: Engine>(
        &mut self,
        cx: &mut Ctx<'_, E>,
        mut prefix: Vec<u8>,
        bnd: SocketAddr,
    ) {
        proto::codec::encode_reply(Rep::SUCCEEDED, &Addr::Ip(bnd), &mut prefix);
        self.send_client(cx, prefix, 0, Op::ReplySend);
    }

    pub(super) fn on_reply_send<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, op: Op, c: Completion) {
        let Data::Buf { buf, off } = c.data else {
            return self.close(cx);
        };
        if c.res <= 0 {
            return self.close(cx);
        }
        let off = off + c.res as usize;
        if off < buf.len() {
            if op == Op::ReplySend {
                return self.send_client(cx, buf, off, op);
            }
            let owner = self.owner(op);
            if let Stage::Connect(st) = &self.stage {
                if let Some(t) = &st.target {
                    cx.io.send(t, buf, off, owner);
                    return self.submitted();
                }
            }
            return self.close(cx);
        }
        self.outcome = Outcome::Relayed;
        match &mut self.stage {
            Stage::Association(_) => self.start_udp(cx),
            Stage::Bind(_) => self.start_bound_tunnel(cx),
            Stage::Connect(st) => {
                let Step::Replying { pending } = &mut st.step else {
                    return self.close(cx);
                };
                *pending -= 1;
                if *pending > 0 {
                    return;
                }
                let (Some(target), dst) = (st.target.take(), st.dst.clone()) else {
                    return self.close(cx);
                };
                self.stage = Stage::Tunnel(Box::new(Tunnel::new(target, dst)));
                self.start_forwarding(cx);
            }
            _ => self.close(cx),
        }
    }

    /// A connection leaving the resolving step without its answer (timeout, close) tells the
    /// resolver, which drops a lookup nobody waits for any more.
    pub(super) fn forget_lookup<E: Engine>(&mut self, cx: &mut Ctx<'_, E>) {
        if let Stage::Connect(c) = &mut self.stage {
            if c.step == Step::Resolving {
                c.step = Step::Connecting;
                cx.dns.forget(self.owner(Op::Resolve(0)));
            }
        }
    }

    fn fail_connect<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, err: RelayError) {
        self.forget_lookup(cx);
        let (prefix, dst) = match &mut self.stage {
            Stage::Connect(c) => (std::mem::take(&mut c.reply_prefix), c.dst.clone()),
            _ => (Vec::new(), Addr::Ip(SocketAddr::from(([0, 0, 0, 0], 0)))),
        };
        self.fail(cx, prefix, &dst, err);
    }

    /// Logs why the request failed and sends its error reply (after `prefix`), then closes.
    pub(super) fn fail<E: Engine>(
        &mut self,
        cx: &mut Ctx<'_, E>,
        mut prefix: Vec<u8>,
        dst: &Addr,
        err: RelayError,
    ) {
        let rep = err.rep().0;
        self.outcome = Outcome::Rep(rep);
        if let RelayError::Denied(_) = err {
            cx.metrics.rules_refused.inc();
        }
        if let Some(r) = &mut self.record {
            r.rep = rep;
        }
        if self.record.is_some() {
            self.end_reason(err.to_string());
        }
        info!(
            client = %self.peer_str(),
            target = %dst,
            reason = %err,
            rep = err.rep().0,
            "connect failed"
        );
        proto::server::error_reply(&err, &mut prefix);
        self.reject(cx, prefix);
    }

    /// Sends `out` (an error reply, possibly empty) and closes after it.
    pub(super) fn reject<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, out: Vec<u8>) {
        // No op is in flight on a target here (its connect has completed, or none started).
        let before = std::mem::replace(&mut self.stage, Stage::Rejecting);
        match before {
            Stage::Connect(c) => {
                if let Some(t) = c.target {
                    cx.io.close(t);
                }
            }
            // An association being set up with its upstream: no op in flight on its sockets.
            Stage::Association(a) => a.release(cx),
            // No op is in flight on a BIND's sockets here either (its accept completed).
            Stage::Bind(b) => {
                if let Some(l) = b.listener {
                    cx.io.close(l);
                }
                if let Some((p, _)) = b.peer {
                    cx.io.close(p);
                }
            }
            _ => {}
        }
        if out.is_empty() {
            return self.close(cx);
        }
        self.arm_timer(cx, REJECT_LINGER);
        self.send_client(cx, out, 0, Op::RejectSend);
    }

    pub(super) fn on_reject_send<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, c: Completion) {
        let Some(mut buf) = self.client_sent(cx, c, Op::RejectSend) else {
            return;
        };
        // The answer is out. Closing now with unread client bytes would send a reset that can
        // destroy the answer before the client reads it: send our FIN, then discard what the
        // client still sends until its EOF (or REJECT_LINGER, armed in `reject`).
        self.inflight += 1;
        self.shutdowns += 1;
        cx.io
            .shutdown_write(&self.client, self.owner(Op::Shutdown(super::Dir::Up)));
        buf.clear();
        buf.reserve(512);
        self.recv_client(cx, buf, Op::RejectDrain);
    }

    pub(super) fn on_reject_drain<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, c: Completion) {
        match c.data {
            Data::Buf { mut buf, .. } if c.res > 0 => {
                buf.clear();
                self.recv_client(cx, buf, Op::RejectDrain);
            }
            _ => self.close(cx),
        }
    }
}
