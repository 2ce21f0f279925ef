//! A UDP association's sockets and datagram paths.
//!
//! - The **client-facing** socket is bound to the control connection's local IP (so BND.ADDR
//!   is reachable by construction); the **target-facing** one is a dual-stack IPv6 socket on
//!   an ephemeral port (IPv4 only where the host has no IPv6), so one association can talk to
//!   any number of IPv4 and IPv6 targets.
//! - Both receive with a multishot recvmsg into the shard's UDP buffer pool, the source
//!   address in front of the payload. Nothing is allocated and nothing is copied per datagram
//!   on the common paths: client -> target sends the payload straight from the buffer;
//!   target -> client writes the SOCKS header into the bytes just before the payload and
//!   sends header + payload in one piece. A buffer goes back to the kernel when the last send
//!   that reads it completes (its last handle drops).
//! - Both sockets have UDP GRO on, so a peer's GSO burst arrives as one receive of equal-sized
//!   datagrams; the relay answers in kind with GSO sends. The byte shuffling of bursts is the
//!   sans-IO [`crate::proto::udp_burst`]; this file feeds it and submits the runs it returns.
//!   If a route refuses GSO segments that large (its MTU is smaller), those datagrams are
//!   re-sent one by one, and later runs that size go singly.
//! - Who may send and fragment reassembly are sans-IO too ([`crate::proto::udp_assoc`]).
//! - Datagrams to a name wait, copied out of their buffer, for its lookup (a few per
//!   association); every dropped datagram is counted by reason.

use std::cell::Cell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Instant;

use tracing::debug;

use super::super::token::{ConnId, Op, Side, ARG_MAX};
use super::super::Ctx;
use crate::config::Outbound;
use crate::dns::{Addrs, ResolveError};
use crate::proto::udp_assoc::{ClientCheck, ClientFilter, FragStep, Reassembler};
use crate::proto::udp_burst::{
    insert_reply_headers, strip_client_burst, Aside, Run, GSO_MAX_BYTES, GSO_MAX_SEGMENTS,
};
use crate::proto::Addr;
use crate::rules::{Command, Request, Rules, Verdict};
use crate::uring::recvmsg::{RecvMsg, PAYLOAD_OFF};
use crate::uring::sockaddr::to_dual_stack;
use crate::uring::{Completion, Data, Engine, OpId, PBuf, Sock};

/// Datagrams held while their domain destination resolves, per association.
const MAX_PENDING_DATAGRAMS: usize = 16;
/// Distinct names being resolved at once, per association.
const MAX_PENDING_NAMES: usize = 4;
/// Fragment reassembly may hold this much per shard, across associations.
pub(crate) const FRAG_BUDGET: usize = 32 << 20;
/// A receive that keeps failing (not for lack of buffers) ends the association.
const MAX_RECV_ERRORS: u32 = 8;

/// Per-association counters, logged when it ends.
#[derive(Default, Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stats {
    pub relayed_out: u64,
    pub relayed_in: u64,
    /// From a source that is not the client.
    pub dropped_foreign: u64,
    /// Bad header, truncated datagram, unusable destination.
    pub dropped_malformed: u64,
    /// Fragments discarded (or all fragments, with `--udp-frag drop`).
    pub dropped_frag: u64,
    /// Name did not resolve, too many datagrams waiting on names, client not known yet,
    /// or the send failed.
    pub dropped_other: u64,
    /// Destination refused by an access rule or the policy.
    pub dropped_refused: u64,
    /// Bytes sent to targets and to the client (the latter with their SOCKS headers).
    pub bytes_out: u64,
    pub bytes_in: u64,
}

impl Stats {
    /// Adds what changed since `last` to the shard's metrics, and remembers it.
    pub(crate) fn publish(&self, last: &mut Stats, m: &crate::metrics::ShardMetrics) {
        use crate::metrics::Drop_;
        m.datagrams[0].add(self.relayed_out - last.relayed_out);
        m.datagrams[1].add(self.relayed_in - last.relayed_in);
        m.dropped(Drop_::Foreign, self.dropped_foreign - last.dropped_foreign);
        m.dropped(Drop_::Refused, self.dropped_refused - last.dropped_refused);
        m.dropped(
            Drop_::Malformed,
            self.dropped_malformed - last.dropped_malformed,
        );
        m.dropped(Drop_::Fragment, self.dropped_frag - last.dropped_frag);
        m.dropped(Drop_::Other, self.dropped_other - last.dropped_other);
        *last = self.clone();
    }
}

/// A single datagram waiting for the end of the loop turn, when it leaves with the others to
/// the same destination (one GSO send for a run of equal sizes).
struct Single {
    buf: PBuf,
    off: u32,
    end: u32,
    dst: SocketAddr,
}

/// Datagrams waiting for one name to resolve.
struct PendingName {
    id: u16,
    name: Box<[u8]>,
    port: u16,
    held: Vec<Vec<u8>>,
}

pub(crate) struct Assoc {
    id: ConnId,
    csock: Sock,
    tsock: Sock,
    /// The target-facing socket is a dual-stack IPv6 socket (else IPv4 only).
    tsock_v6: bool,
    filter: ClientFilter,
    reasm: Reassembler,
    recv_op: [Option<OpId>; 2],
    recv_errors: u32,
    pending: Vec<PendingName>,
    next_pending_id: u16,
    /// Per socket: GSO sends of segments above this size failed once (a route MTU below the
    /// segment), so such runs now go one datagram per send.
    gso_limit: [u32; 2],
    /// Scratch for the runs of one receive (kept to avoid allocating per receive).
    runs: Vec<Run>,
    /// Per socket: single datagrams received this turn, sent at its end (`flush`).
    singles: [Vec<Single>; 2],
    pub stats: Stats,
    /// The last datagram from the client or to it (idle timeout).
    pub last_active: Instant,
    /// The address the client sends to.
    pub bnd: SocketAddr,
    /// The control connection's client (its share of the resolver, and the rules' client).
    peer_ip: IpAddr,
    /// The authenticated user, for the rules.
    user: Option<Box<[u8]>>,
    /// Through an upstream proxy: its UDP relay address. Datagrams then go to it as they came
    /// (the SOCKS header is the next hop's header too) and its datagrams come back as they
    /// are (their header names the original target).
    pub(crate) upstream_udp: Option<SocketAddr>,
}

/// Opens the two sockets of an association. `local` is the control connection's local
/// address; the client-facing socket binds to its IP. Returns them and the client-facing
/// socket's address.
/// The target-facing socket takes `outbound`'s source address and device: with an IPv4
/// source it is an IPv4 socket, else with an IPv6 source an IPv6-only one, else dual-stack.
pub(crate) fn open<E: Engine>(
    io: &mut E,
    local: SocketAddr,
    outbound: &Outbound,
) -> std::io::Result<(Sock, SocketAddr, Sock, bool)> {
    let (csock, caddr) = io.udp_socket(SocketAddr::new(local.ip(), 0), None)?;
    let dev = outbound.device.as_deref();
    let from = match (outbound.v4, outbound.v6) {
        (Some(v4), _) => Some(SocketAddr::new(IpAddr::V4(v4), 0)),
        (None, Some(v6)) => Some(SocketAddr::new(IpAddr::V6(v6), 0)),
        (None, None) => None,
    };
    if let Some(from) = from {
        return match io.udp_socket(from, dev) {
            Ok((tsock, _)) => Ok((csock, caddr, tsock, from.is_ipv6())),
            Err(e) => {
                io.close(csock);
                Err(e)
            }
        };
    }
    let any6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0);
    let (tsock, v6) = match io.udp_socket(any6, dev) {
        Ok((s, _)) => (s, true),
        Err(_) => match io.udp_socket(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0), dev) {
            Ok((s, _)) => (s, false),
            Err(e) => {
                io.close(csock);
                return Err(e);
            }
        },
    };
    Ok((csock, caddr, tsock, v6))
}

impl Assoc {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: ConnId,
        csock: Sock,
        tsock: Sock,
        tsock_v6: bool,
        check: ClientCheck,
        peer_ip: IpAddr,
        requested: &Addr,
        bnd: SocketAddr,
        now: Instant,
        user: Option<Box<[u8]>>,
    ) -> Assoc {
        Assoc {
            id,
            csock,
            tsock,
            tsock_v6,
            filter: ClientFilter::new(check, peer_ip, requested),
            peer_ip,
            user,
            upstream_udp: None,
            reasm: Reassembler::default(),
            recv_op: [None, None],
            recv_errors: 0,
            pending: Vec::new(),
            next_pending_id: 0,
            gso_limit: [u32::MAX; 2],
            runs: Vec::new(),
            singles: [Vec::new(), Vec::new()],
            stats: Stats::default(),
            last_active: now,
            bnd,
        }
    }

    fn sock(&self, side: Side) -> &Sock {
        match side {
            Side::Client => &self.csock,
            Side::Target => &self.tsock,
        }
    }

    pub(crate) fn client(&self) -> Option<SocketAddr> {
        self.filter.reply_to()
    }

    /// (Re-)arms the multishot receive of socket `side` if it is not running.
    pub(crate) fn rearm_recv<E: Engine>(
        &mut self,
        cx: &mut Ctx<'_, E>,
        inflight: &mut u32,
        side: Side,
    ) {
        let Some(group) = cx.shard.udp_group else {
            return;
        };
        if self.recv_op[side.index()].is_some() {
            return;
        }
        *inflight += 1;
        let owner = self.id.owner(Op::UdpRecv(side));
        self.recv_op[side.index()] = Some(cx.io.recvmsg_multi(self.sock(side), group, owner));
    }

    /// The earliest time the association's timer must fire (fragment queue or idle).
    pub(crate) fn next_deadline<E: Engine>(&self, cx: &Ctx<'_, E>) -> Option<Instant> {
        let frag = self.reasm.deadline(cx.cfg.udp_frag_timeout);
        let idle = cx.cfg.udp_idle_timeout.map(|d| self.last_active + d);
        match (frag, idle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The timer fired: expire the fragment queue. Returns true if the association has been
    /// idle for `--udp-idle-timeout` and must end.
    pub(crate) fn on_timer<E: Engine>(&mut self, cx: &mut Ctx<'_, E>) -> bool {
        let before = self.reasm.held();
        let n = self.reasm.expire(cx.now, cx.cfg.udp_frag_timeout);
        cx.shard.frag_bytes -= before - self.reasm.held();
        self.stats.dropped_frag += u64::from(n);
        cx.cfg
            .udp_idle_timeout
            .is_some_and(|d| cx.now.saturating_duration_since(self.last_active) >= d)
    }

    /// Ends the association: cancels its ops (when `waiting`) and gives back fragment memory
    /// and held datagrams.
    pub(crate) fn close<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, waiting: bool) {
        if waiting {
            cx.io.cancel_all(&self.csock);
            cx.io.cancel_all(&self.tsock);
        }
        cx.shard.frag_bytes -= self.reasm.held();
        self.stats.dropped_frag += u64::from(self.reasm.reset());
        for s in &mut self.singles {
            self.stats.dropped_other += s.len() as u64;
            s.clear();
        }
        for p in self.pending.drain(..) {
            self.stats.dropped_other += p.held.len() as u64;
            cx.dns.forget(self.id.owner(Op::Resolve(p.id)));
        }
    }

    /// Closes the sockets, after the last op completed.
    pub(crate) fn release<E: Engine>(self, cx: &mut Ctx<'_, E>) {
        cx.io.close(self.csock);
        cx.io.close(self.tsock);
    }

    /// A receive or send of the association completed. Returns `Err(reason)` when the
    /// association must end.
    pub(crate) fn on_completion<E: Engine>(
        &mut self,
        cx: &mut Ctx<'_, E>,
        inflight: &mut u32,
        op: Op,
        c: Completion,
    ) -> Result<(), &'static str> {
        match op {
            Op::UdpRecv(side) => self.on_recv(cx, inflight, side, c),
            Op::UdpSend(side) => {
                self.on_send(cx, inflight, side, c);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn on_recv<E: Engine>(
        &mut self,
        cx: &mut Ctx<'_, E>,
        inflight: &mut u32,
        side: Side,
        c: Completion,
    ) -> Result<(), &'static str> {
        if !c.more {
            self.recv_op[side.index()] = None;
        }
        match c.data {
            Data::Picked(buf) => {
                self.recv_errors = 0;
                if c.res >= 0 {
                    match side {
                        Side::Client => self.on_client_datagrams(cx, inflight, buf, c.res as u32),
                        Side::Target => self.on_target_datagrams(cx, inflight, buf, c.res as u32),
                    }
                }
            }
            _ if c.res == -libc::ENOBUFS => {
                cx.metrics.buffer_exhausted.inc();
                // Every buffer is out: the server re-arms this receive once some are back;
                // datagrams wait in the socket buffer meanwhile.
                cx.shard.udp_starved.push((self.id, side));
                return Ok(());
            }
            _ if c.res < 0 && c.res != -libc::ECANCELED => {
                self.recv_errors += 1;
                debug!(
                    error = %std::io::Error::from_raw_os_error(-c.res),
                    socket = ?side,
                    "udp receive failed"
                );
                if self.recv_errors >= MAX_RECV_ERRORS {
                    return Err("receive keeps failing");
                }
            }
            _ => {}
        }
        if !c.more {
            self.rearm_recv(cx, inflight, side);
        }
        Ok(())
    }

    /// `dst` as the target-facing socket addresses it, or None if that socket cannot reach it
    /// (an IPv6 target on a host without IPv6).
    fn target_addr(tsock_v6: bool, dst: SocketAddr) -> Option<SocketAddr> {
        if tsock_v6 {
            Some(to_dual_stack(dst))
        } else {
            Some(dst).filter(SocketAddr::is_ipv4)
        }
    }

    /// A receive on the client-facing socket: check the source, then relay its datagrams.
    fn on_client_datagrams<E: Engine>(
        &mut self,
        cx: &mut Ctx<'_, E>,
        inflight: &mut u32,
        mut buf: PBuf,
        res: u32,
    ) {
        let m = RecvMsg::parse(buf.bytes(), res);
        let Some(src) = m.src else {
            self.stats.dropped_malformed += m.datagrams();
            return;
        };
        if !self.filter.admit(src) {
            // Not from the client: it neither counts nor keeps the association alive.
            self.stats.dropped_foreign += m.datagrams();
            return;
        }
        self.last_active = cx.now;
        if m.truncated {
            self.stats.dropped_malformed += m.datagrams();
            return;
        }
        if let Some(up) = self
            .upstream_udp
            .and_then(|u| Self::target_addr(self.tsock_v6, u))
        {
            // Header and all, to the next hop (its rules decide; ours did at association time).
            let run = Run::segmented(PAYLOAD_OFF, m.end, m.gso, up);
            return self.send_runs(cx, inflight, Side::Target, buf, &[run]);
        }
        let Some(bytes) = buf.bytes_mut() else {
            return;
        };
        let mut runs = std::mem::take(&mut self.runs);
        runs.clear();
        let mut later: Vec<(Addr, Vec<u8>)> = Vec::new();
        let v6 = self.tsock_v6;
        let reassemble = cx.cfg.udp_frag_reassemble;
        let stats = &mut self.stats;
        let reasm = &mut self.reasm;
        let frag_bytes = &mut cx.shard.frag_bytes;
        let (now, frag_timeout) = (cx.now, cx.cfg.udp_frag_timeout);
        let rules = &cx.cfg.rules;
        let (client, user) = (self.peer_ip, self.user.as_deref());
        // Set by `route` when the rules refused the datagram it returned None for.
        let refused = Cell::new(false);
        strip_client_burst(
            bytes,
            PAYLOAD_OFF as usize,
            m.end as usize,
            m.gso as usize,
            |dst| {
                if !udp_allowed(rules, client, user, None, dst) {
                    refused.set(true);
                    return None;
                }
                Self::target_addr(v6, dst)
            },
            &mut runs,
            |aside| match aside {
                Aside::Malformed => stats.dropped_malformed += 1,
                Aside::Unroutable if refused.replace(false) => stats.dropped_refused += 1,
                Aside::Unroutable => stats.dropped_other += 1,
                Aside::Domain { dst, data } => later.push((dst, data.to_vec())),
                Aside::Fragment { frag, dst, data } => {
                    if !reassemble {
                        stats.dropped_frag += 1;
                        return;
                    }
                    let before = reasm.held();
                    let room = FRAG_BUDGET.saturating_sub(*frag_bytes);
                    let step = reasm.push(frag, &dst, data, now, frag_timeout, room);
                    *frag_bytes = *frag_bytes + reasm.held() - before;
                    match step {
                        FragStep::Queued => {}
                        FragStep::Dropped(n) => stats.dropped_frag += u64::from(n),
                        FragStep::Complete { dst, payload } => later.push((dst, payload)),
                    }
                }
            },
        );
        self.send_runs(cx, inflight, Side::Target, buf, &runs);
        self.runs = runs;
        for (dst, payload) in later {
            self.send_datagram(cx, inflight, dst, payload);
        }
    }

    /// A receive from a target: wrap each datagram in a header naming the sender and send
    /// them to the client, from the same buffer.
    fn on_target_datagrams<E: Engine>(
        &mut self,
        cx: &mut Ctx<'_, E>,
        inflight: &mut u32,
        mut buf: PBuf,
        res: u32,
    ) {
        let m = RecvMsg::parse(buf.bytes(), res);
        let (Some(src), Some(client)) = (m.src, self.filter.reply_to()) else {
            // No client endpoint yet (nobody may have sent) or an unreadable source.
            self.stats.dropped_other += m.datagrams();
            return;
        };
        if m.truncated {
            self.stats.dropped_malformed += m.datagrams();
            return;
        }
        if let Some(up) = self.upstream_udp {
            // Only the upstream answers here, with the original target already in the header.
            let from = SocketAddr::new(src.ip().to_canonical(), src.port());
            if from != SocketAddr::new(up.ip().to_canonical(), up.port()) {
                self.stats.dropped_foreign += m.datagrams();
                return;
            }
            self.last_active = cx.now;
            let run = Run::segmented(PAYLOAD_OFF, m.end, m.gso, client);
            return self.send_runs(cx, inflight, Side::Client, buf, &[run]);
        }
        let Some(bytes) = buf.bytes_mut() else {
            return;
        };
        let mut runs = std::mem::take(&mut self.runs);
        runs.clear();
        let fits = insert_reply_headers(
            bytes,
            PAYLOAD_OFF as usize,
            m.end as usize,
            m.gso as usize,
            src,
            client,
            &mut runs,
        );
        if fits {
            self.last_active = cx.now;
            self.send_runs(cx, inflight, Side::Client, buf, &runs);
        } else {
            // The buffer's slack holds more headers than the kernel's segment limit allows;
            // this guards against a kernel that coalesces more.
            self.stats.dropped_other += m.datagrams();
        }
        self.runs = runs;
    }

    /// Sends `runs` (ranges of `buf`) from socket `side`, each as one GSO send, or one send
    /// per datagram where GSO failed before for that size. Each send holds its own handle to
    /// the buffer; with nothing to send the buffer goes back at once.
    fn send_runs<E: Engine>(
        &mut self,
        cx: &mut Ctx<'_, E>,
        inflight: &mut u32,
        side: Side,
        buf: PBuf,
        runs: &[Run],
    ) {
        if let [r] = runs {
            if r.count == 1 {
                // A datagram that came alone: it waits for the end of the turn, when the
                // others that came alone to the same destination leave with it.
                if self.singles.iter().all(Vec::is_empty) {
                    cx.shard.udp_flush.push(self.id);
                }
                self.singles[side.index()].push(Single {
                    buf,
                    off: r.off,
                    end: r.end,
                    dst: r.dst,
                });
                return;
            }
        }
        // Datagrams keep their order: what waits goes first.
        self.flush_side(cx, inflight, side);
        let limit = self.gso_limit[side.index()];
        let owner = self.id.owner(Op::UdpSend(side));
        let sock = match side {
            Side::Client => &self.csock,
            Side::Target => &self.tsock,
        };
        let mut send = |off: u32, end: u32, dst: SocketAddr, gso: u32| {
            *inflight += 1;
            cx.io
                .send_buf_to(sock, buf.share(), off, end, dst, gso as u16, owner);
        };
        for r in runs {
            if r.count == 1 {
                send(r.off, r.end, r.dst, 0);
            } else if r.seg <= limit {
                send(r.off, r.end, r.dst, r.seg);
            } else {
                for (off, end) in r.datagrams() {
                    send(off, end, r.dst, 0);
                }
            }
        }
        // `buf` drops here; the sends hold the buffer until they complete.
    }

    /// Sends the single datagrams of this turn: each run of equal sizes (the last may be
    /// shorter) to one destination is copied behind the first datagram of the run, in its
    /// buffer, and leaves as one GSO send; the kernel splits it again after one pass through
    /// the stack. The receiver sees the same datagrams in the same order.
    pub(crate) fn flush<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, inflight: &mut u32) {
        self.flush_side(cx, inflight, Side::Client);
        self.flush_side(cx, inflight, Side::Target);
    }

    fn flush_side<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, inflight: &mut u32, side: Side) {
        let singles = std::mem::take(&mut self.singles[side.index()]);
        if singles.is_empty() {
            return;
        }
        let limit = self.gso_limit[side.index()];
        let owner = self.id.owner(Op::UdpSend(side));
        let sock = match side {
            Side::Client => &self.csock,
            Side::Target => &self.tsock,
        };
        let mut rest = singles.into_iter().peekable();
        while let Some(mut first) = rest.next() {
            let seg = first.end - first.off;
            let mut end = first.end;
            let mut count = 1u32;
            if seg > 0 && seg <= limit {
                if let Some(room) = first.buf.bytes_mut() {
                    while let Some(next) = rest.peek() {
                        let len = next.end - next.off;
                        let fits = next.dst == first.dst
                            && len > 0
                            && len <= seg
                            && count < GSO_MAX_SEGMENTS
                            && end - first.off + len <= GSO_MAX_BYTES
                            && (end + len) as usize <= room.len();
                        if !fits {
                            break;
                        }
                        let next = rest.next().expect("peeked");
                        room[end as usize..(end + len) as usize].copy_from_slice(
                            &next.buf.bytes()[next.off as usize..next.end as usize],
                        );
                        end += len;
                        count += 1;
                        if len < seg {
                            // Only the last segment of a GSO send may be shorter.
                            break;
                        }
                    }
                }
            }
            let gso = if count > 1 { seg as u16 } else { 0 };
            *inflight += 1;
            cx.io
                .send_buf_to(sock, first.buf, first.off, end, first.dst, gso, owner);
        }
    }

    fn on_send<E: Engine>(
        &mut self,
        cx: &mut Ctx<'_, E>,
        inflight: &mut u32,
        side: Side,
        c: Completion,
    ) {
        let datagrams = match c.data {
            Data::PbufMsg {
                buf,
                off,
                end,
                gso,
                dest,
            } if gso != 0 => {
                let gso = u32::from(gso);
                if matches!(-c.res, libc::EINVAL | libc::EMSGSIZE | libc::EIO) {
                    // The route cannot take GSO segments this large (its MTU is smaller) or
                    // cannot do GSO at all: send these one by one, and from now on send runs
                    // like them that way.
                    debug!(
                        error = %std::io::Error::from_raw_os_error(-c.res),
                        segment = gso,
                        "udp GSO send refused; sending datagrams singly"
                    );
                    self.gso_limit[side.index()] = gso - 1;
                    let run = Run::segmented(off, end, gso, dest);
                    return self.send_runs(cx, inflight, side, buf, &[run]);
                }
                u64::from((end - off).div_ceil(gso))
            }
            _ => 1,
        };
        if c.res < 0 {
            debug!(
                error = %std::io::Error::from_raw_os_error(-c.res),
                to = ?side,
                "udp send failed"
            );
            self.stats.dropped_other += datagrams;
        } else if side == Side::Client {
            self.stats.relayed_in += datagrams;
            self.stats.bytes_in += c.res as u64;
        } else {
            self.stats.relayed_out += datagrams;
            self.stats.bytes_out += c.res as u64;
        }
    }

    /// Sends a datagram that left its buffer (to a name, or reassembled) to `dst`.
    fn send_datagram<E: Engine>(
        &mut self,
        cx: &mut Ctx<'_, E>,
        inflight: &mut u32,
        dst: Addr,
        payload: Vec<u8>,
    ) {
        match dst {
            Addr::Ip(a) => {
                if udp_allowed(&cx.cfg.rules, self.peer_ip, self.user.as_deref(), None, a) {
                    self.send_heap(cx, inflight, a, payload);
                } else {
                    self.stats.dropped_refused += 1;
                }
            }
            Addr::Domain(name, port) => {
                let dst = Addr::Domain(name, port);
                if self.access(cx, &dst) {
                    let Addr::Domain(name, port) = dst else {
                        unreachable!("built above")
                    };
                    self.resolve_then_send(cx, inflight, name, port, payload);
                } else {
                    self.stats.dropped_refused += 1;
                }
            }
        }
    }

    /// Whether the rules let a datagram go to `dst` as the client wrote it (a name before it
    /// is resolved).
    fn access<E: Engine>(&self, cx: &Ctx<'_, E>, dst: &Addr) -> bool {
        let rules = &cx.cfg.rules;
        if rules.is_open() {
            return true;
        }
        let (name, ip) = match dst {
            Addr::Ip(a) => (None, Some(a.ip())),
            Addr::Domain(n, _) => (Some(&n[..]), None),
        };
        rules.check(&Request {
            client: self.peer_ip,
            user: self.user.as_deref(),
            command: Command::Udp,
            name,
            ip,
            port: dst.port(),
        }) == Verdict::Allow
    }

    /// The first address `name` resolved to that the rules allow, counting a refusal when
    /// there is none (or a failure when there were no addresses).
    fn pick<E: Engine>(
        &mut self,
        cx: &Ctx<'_, E>,
        name: &[u8],
        addrs: &[SocketAddr],
    ) -> Option<SocketAddr> {
        let user = self.user.as_deref();
        let found = addrs
            .iter()
            .copied()
            .find(|&a| udp_allowed(&cx.cfg.rules, self.peer_ip, user, Some(name), a));
        if found.is_none() {
            if addrs.is_empty() {
                self.stats.dropped_other += 1;
            } else {
                self.stats.dropped_refused += 1;
            }
        }
        found
    }

    fn send_heap<E: Engine>(
        &mut self,
        cx: &mut Ctx<'_, E>,
        inflight: &mut u32,
        dst: SocketAddr,
        payload: Vec<u8>,
    ) {
        let Some(dst) = Self::target_addr(self.tsock_v6, dst) else {
            self.stats.dropped_other += 1;
            return;
        };
        self.flush_side(cx, inflight, Side::Target);
        *inflight += 1;
        let owner = self.id.owner(Op::UdpSend(Side::Target));
        cx.io.send_to(&self.tsock, payload, dst, owner);
    }

    fn resolve_then_send<E: Engine>(
        &mut self,
        cx: &mut Ctx<'_, E>,
        inflight: &mut u32,
        name: Box<[u8]>,
        port: u16,
        payload: Vec<u8>,
    ) {
        let waiting: usize = self.pending.iter().map(|p| p.held.len()).sum();
        if let Some(p) = self
            .pending
            .iter_mut()
            .find(|p| p.port == port && p.name == name)
        {
            // Already being resolved: queue behind it.
            if waiting < MAX_PENDING_DATAGRAMS {
                p.held.push(payload);
            } else {
                self.stats.dropped_other += 1;
            }
            return;
        }
        // An id no pending lookup uses (ids wrap; a stalled lookup keeps its own).
        let mut id = self.next_pending_id;
        while self.pending.iter().any(|p| p.id == id) {
            id = (id + 1) & ARG_MAX;
        }
        let owner = self.id.owner(Op::Resolve(id));
        match cx
            .dns
            .lookup(&name, port, owner, Some(self.peer_ip), cx.now)
        {
            Some(Ok(addrs)) => {
                if let Some(a) = self.pick(cx, &name, &addrs) {
                    self.send_heap(cx, inflight, a, payload);
                }
            }
            Some(Err(_)) => self.stats.dropped_other += 1,
            None => {
                if self.pending.len() >= MAX_PENDING_NAMES || waiting >= MAX_PENDING_DATAGRAMS {
                    // The lookup still fills the cache for the next datagram.
                    self.stats.dropped_other += 1;
                    return;
                }
                self.next_pending_id = (id + 1) & ARG_MAX;
                self.pending.push(PendingName {
                    id,
                    name,
                    port,
                    held: vec![payload],
                });
            }
        }
    }

    /// A name lookup for datagrams waiting in `pending` finished.
    pub(crate) fn on_resolved<E: Engine>(
        &mut self,
        cx: &mut Ctx<'_, E>,
        inflight: &mut u32,
        id: u16,
        res: Result<Addrs, ResolveError>,
    ) {
        let Some(i) = self.pending.iter().position(|p| p.id == id) else {
            return;
        };
        let p = self.pending.swap_remove(i);
        for payload in p.held {
            match &res {
                Ok(addrs) => {
                    if let Some(a) = self.pick(cx, &p.name, addrs) {
                        self.send_heap(cx, inflight, a, payload);
                    }
                }
                Err(_) => self.stats.dropped_other += 1,
            }
        }
    }
}

/// Whether the rules let a datagram of `client` go to `dst` (an address the client wrote, or
/// one `name` resolved to).
fn udp_allowed(
    rules: &Rules,
    client: IpAddr,
    user: Option<&[u8]>,
    name: Option<&[u8]>,
    dst: SocketAddr,
) -> bool {
    rules.is_open()
        || rules
            .check(&Request {
                client,
                user,
                command: Command::Udp,
                name,
                ip: Some(dst.ip()),
                port: dst.port(),
            })
            // A datagram a `via` rule allows is not sent directly: such a rule must open the
            // association (no `to`, no `ports`) to route it through its upstream.
            == Verdict::Allow
}
