//! One UDP association (RFC 1928 UDP ASSOCIATE): its two sockets, the datagram paths between
//! them, and its share of the control connection's lifetime.
//!
//! A [`tcp::Conn`](super::tcp::Conn) whose request is UDP ASSOCIATE creates an [`Assoc`] on
//! its own shard and owns it from then on; the association ends when the control connection
//! does (EOF, reset, idle timeout), and the control connection ends when the association fails.
//!
//! - The **client-facing** socket is bound to the control connection's local IP (so BND.ADDR
//!   is reachable by construction); the **target-facing** one is a dual-stack IPv6 socket on
//!   an ephemeral port (IPv4 only where the host has no IPv6), so one association can talk to
//!   any number of IPv4 and IPv6 targets.
//! - Both receive with a multishot recvmsg into the shard's UDP provided-buffer ring, the
//!   source address in front of the payload. Nothing is allocated and nothing is copied per
//!   datagram: client -> target sends the payload straight from the buffer, with the target's
//!   address written over the (already read) source address; target -> client writes the
//!   SOCKS header into the bytes just before the payload and sends header + payload in one
//!   piece. Sends are SQEs like any other, so every datagram of a turn goes to the kernel in
//!   the turn's one `io_uring_enter`; a buffer is recycled only when every send that reads it
//!   has completed (the buffer ring counts holders).
//! - Both sockets have UDP GRO on, so a peer's GSO burst (or a NIC's GRO train) arrives as one
//!   receive of equal-sized datagrams. The relay answers in kind: client -> target moves each
//!   payload down over its header and sends each run of equal datagrams to one target as one
//!   GSO send; target -> client moves the payloads up to open room for a header in front of
//!   each and sends the lot as GSO segments of header + payload. The copies are a few bytes to
//!   64 KiB of memmove per receive, against a kernel pass per datagram saved (the whole cost of
//!   a UDP relay on loopback). If a route refuses GSO segments that large (its MTU is
//!   smaller), those datagrams are re-sent one by one, and later runs that size go singly.
//! - The rules of who may send and of fragment reassembly are sans-IO
//!   ([`crate::proto::udp_assoc`]); this file only feeds them and acts on the answers.
//! - Every dropped datagram is counted by reason; the counts are logged when the association
//!   ends.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Instant;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tracing::debug;

use crate::config::Config;
use crate::dns::ResolveError;
use crate::proto::udp::decode_udp_header;
use crate::proto::udp_assoc::{ClientCheck, ClientFilter, FragStep, Reassembler};
use crate::proto::Addr;
use crate::shard::ring::{RECVMSG_CONTROL_OFF, RECVMSG_NAME_LEN, RECVMSG_PAYLOAD_OFF};
use crate::shard::sockaddr::{read_sockaddr, to_dual_stack, write_sockaddr};
use crate::shard::{kind, Completion, Io, OpId, OpMem, SockHandle, Target, Token};

/// Which socket of the association (the `aux` byte of receive and send tokens).
pub const CLIENT: u8 = 0;
pub const TARGET: u8 = 1;

/// Datagrams held while their domain destination resolves, per association.
const MAX_PENDING_DATAGRAMS: usize = 16;
/// Distinct names being resolved at once, per association.
const MAX_PENDING_NAMES: usize = 4;
/// Fragment reassembly may hold this much per shard, across associations.
pub const FRAG_BUDGET: usize = 32 << 20;
/// A receive that keeps failing (not for lack of buffers) ends the association.
const MAX_RECV_ERRORS: u32 = 8;
/// Socket buffer sizes asked for (the kernel caps them at net.core.[rw]mem_max).
const SOCK_BUF: usize = 4 << 20;
/// Most datagrams in one UDP GSO send (the kernel's UDP_MAX_SEGMENTS is 64 or more).
const GSO_MAX_SEGMENTS: u32 = 64;
/// Most bytes in one UDP GSO send (it must fit one IPv4 packet's length field).
const GSO_MAX_BYTES: u32 = 65_000;

/// Per-association counters, logged when it ends.
#[derive(Default, Debug)]
pub struct Stats {
    pub relayed_out: u64,
    pub relayed_in: u64,
    /// From a source that is not the client.
    pub dropped_foreign: u64,
    /// Bad header, truncated datagram, unusable destination.
    pub dropped_malformed: u64,
    /// Fragments discarded (or all fragments, with `--udp-frag drop`).
    pub dropped_frag: u64,
    /// Name did not resolve, too many datagrams waiting on names, client not known yet,
    /// buffers exhausted, or the send failed.
    pub dropped_other: u64,
}

/// A datagram waiting for its destination name to resolve.
enum Held {
    Pbuf { bid: u16, off: u32, end: u32 },
    Heap(Vec<u8>),
}

struct PendingName {
    id: u8,
    name: Box<[u8]>,
    port: u16,
    held: Vec<Held>,
}

pub struct Assoc {
    token: Token,
    csock: SockHandle,
    tsock: SockHandle,
    /// The target-facing socket is a dual-stack IPv6 socket (else IPv4 only).
    tsock_v6: bool,
    filter: ClientFilter,
    reasm: Reassembler,
    recv_op: [Option<OpId>; 2],
    recv_errors: u32,
    pending: Vec<PendingName>,
    next_pending_id: u8,
    /// Per socket (CLIENT, TARGET): GSO sends of segments above this size failed once (a
    /// route MTU below the segment), so such runs now go one datagram per send.
    gso_limit: [u32; 2],
    /// Scratch for the runs of one coalesced receive (kept to avoid allocating per receive).
    runs: Vec<Run>,
    /// Ops in flight on the two UDP sockets (the control connection counts its own).
    pub inflight: u32,
    pub stats: Stats,
    pub last_active: Instant,
    /// The client endpoint, for the log line.
    pub bnd: SocketAddr,
}

/// Creates the two sockets of an association. `local` is the control connection's local
/// address; the client-facing socket binds to its IP.
pub fn open_sockets(local: SocketAddr) -> std::io::Result<(Socket, Socket, bool)> {
    let csock = Socket::new(Domain::for_address(local), Type::DGRAM, Some(Protocol::UDP))?;
    if local.is_ipv6() {
        csock.set_only_v6(true)?;
    }
    csock.bind(&SocketAddr::new(local.ip(), 0).into())?;
    let _ = csock.set_recv_buffer_size(SOCK_BUF);
    let _ = csock.set_send_buffer_size(SOCK_BUF);
    let (tsock, v6) =
        match Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).and_then(|s| {
            s.set_only_v6(false)?;
            s.bind(&SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0).into())?;
            Ok(s)
        }) {
            Ok(s) => (s, true),
            Err(_) => {
                let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
                s.bind(&SocketAddr::from(([0, 0, 0, 0], 0)).into())?;
                (s, false)
            }
        };
    let _ = tsock.set_recv_buffer_size(SOCK_BUF);
    let _ = tsock.set_send_buffer_size(SOCK_BUF);
    // Without GRO (an old kernel) every receive is one datagram, and nothing else changes.
    let _ = crate::shard::sys::set_udp_gro(&csock);
    let _ = crate::shard::sys::set_udp_gro(&tsock);
    Ok((csock, tsock, v6))
}

// The client's sockaddr (at most 28 bytes, at offset 0) sits below the longest SOCKS header (22
// bytes) placed right before the payload, and a destination written over the source name fits
// the name area.
const _: () = assert!(28 <= RECVMSG_PAYLOAD_OFF - 22 && 28 <= RECVMSG_NAME_LEN);

/// What the header of a receive into a provided buffer says.
struct RecvMsg {
    src: Option<SocketAddr>,
    /// Payload bytes `RECVMSG_PAYLOAD_OFF..end` of the buffer.
    end: u32,
    truncated: bool,
    /// With UDP GRO, the receive holds several datagrams of `gso` bytes each, back to back
    /// (the last may be shorter); 0 when it holds one.
    gso: u32,
}

impl RecvMsg {
    /// How many datagrams the receive holds.
    fn datagrams(&self) -> u64 {
        let len = self.end - RECVMSG_PAYLOAD_OFF;
        match self.gso {
            0 => 1,
            g => u64::from(len.div_ceil(g).max(1)),
        }
    }
}

fn parse_recvmsg(buf: &[u8], res: u32) -> RecvMsg {
    let word = |i: usize| u32::from_ne_bytes(buf[i..i + 4].try_into().expect("4 bytes"));
    let namelen = word(0).min(RECVMSG_NAME_LEN) as usize;
    let controllen = word(4) as usize;
    let flags = word(12) as i32;
    let name = &buf[16..16 + namelen];
    let end = res.max(RECVMSG_PAYLOAD_OFF);
    // One cmsghdr (len: usize, level: i32, type: i32) and its int, if the kernel wrote it.
    let c = RECVMSG_CONTROL_OFF as usize;
    let word_at = |i: usize| word(c + i) as i32;
    let gso = if controllen >= 20 && word_at(8) == libc::SOL_UDP && word_at(12) == libc::UDP_GRO {
        // A segment size covering the whole payload means one datagram.
        match word_at(16) {
            g if g > 0 && (g as u32) < end - RECVMSG_PAYLOAD_OFF => g as u32,
            _ => 0,
        }
    } else {
        0
    };
    RecvMsg {
        src: read_sockaddr(name),
        end,
        truncated: flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0,
        gso,
    }
}

/// Consecutive datagrams of one coalesced receive that go to one destination in one send:
/// bytes `off..end` of the buffer, `count` datagrams of `seg` bytes (the last may be shorter).
struct Run {
    off: u32,
    end: u32,
    seg: u32,
    count: u32,
    dst: SocketAddr,
    /// A shorter datagram ended the run (GSO allows only the last to be short).
    closed: bool,
}

impl Run {
    /// Appends a datagram of `len` bytes at the run's end if GSO can carry it with the rest.
    fn extend(&mut self, dst: SocketAddr, len: u32) -> bool {
        let fits = !self.closed
            && self.dst == dst
            && self.seg > 0
            && len <= self.seg
            && self.count < GSO_MAX_SEGMENTS
            && self.end - self.off + len <= GSO_MAX_BYTES;
        if fits {
            self.end += len;
            self.count += 1;
            self.closed = len < self.seg;
        }
        fits
    }
}

impl Assoc {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        token: Token,
        csock: SockHandle,
        tsock: SockHandle,
        tsock_v6: bool,
        check: ClientCheck,
        peer_ip: IpAddr,
        requested: &Addr,
        bnd: SocketAddr,
        now: Instant,
    ) -> Assoc {
        Assoc {
            token,
            csock,
            tsock,
            tsock_v6,
            filter: ClientFilter::new(check, peer_ip, requested),
            reasm: Reassembler::default(),
            recv_op: [None, None],
            recv_errors: 0,
            pending: Vec::new(),
            next_pending_id: 0,
            gso_limit: [u32::MAX; 2],
            runs: Vec::new(),
            inflight: 0,
            stats: Stats::default(),
            last_active: now,
            bnd,
        }
    }

    fn sock(&self, which: u8) -> Target {
        if which == CLIENT {
            self.csock.target()
        } else {
            self.tsock.target()
        }
    }

    pub fn client(&self) -> Option<SocketAddr> {
        self.filter.reply_to()
    }

    /// Starts both receives.
    pub fn start(&mut self, io: &mut Io) {
        self.rearm_recv(io, CLIENT);
        self.rearm_recv(io, TARGET);
    }

    /// (Re-)arms the multishot receive of socket `which` if it is not running.
    pub fn rearm_recv(&mut self, io: &mut Io, which: u8) {
        let Some(bgid) = io.ubufs.as_ref().map(|b| b.bgid()) else {
            return;
        };
        if self.recv_op[which as usize].is_some() {
            return;
        }
        let k = if which == CLIENT {
            kind::UDP_CRECV
        } else {
            kind::UDP_TRECV
        };
        self.inflight += 1;
        let fd = self.sock(which);
        let op = io.ring.recvmsg_multi(fd, bgid, self.token.with(k, which).0);
        self.recv_op[which as usize] = Some(op);
    }

    /// The earliest time the association's timer must fire (fragment queue or idle).
    pub fn next_deadline(&self, io: &Io) -> Option<Instant> {
        let frag = self.reasm.deadline(io.cfg.udp_frag_timeout);
        let idle = io.cfg.udp_idle_timeout.map(|d| self.last_active + d);
        match (frag, idle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The timer fired: expire the fragment queue. Returns true if the association has been
    /// idle for `--udp-idle-timeout` and must end.
    pub fn on_timer(&mut self, io: &mut Io) -> bool {
        let before = self.reasm.held();
        let n = self.reasm.expire(io.now, io.cfg.udp_frag_timeout);
        io.frag_bytes -= before - self.reasm.held();
        self.stats.dropped_frag += u64::from(n);
        io.cfg
            .udp_idle_timeout
            .is_some_and(|d| io.now.saturating_duration_since(self.last_active) >= d)
    }

    /// Handles a completion of one of the association's ops. Returns `Err(reason)` when the
    /// association must end.
    pub fn on_completion(
        &mut self,
        io: &mut Io,
        t: Token,
        c: Completion,
    ) -> Result<(), &'static str> {
        if !c.more {
            self.inflight -= 1;
        }
        match t.kind() {
            kind::UDP_CRECV | kind::UDP_TRECV => self.on_recv(io, t.aux(), c),
            kind::UDP_CSEND | kind::UDP_TSEND => {
                self.on_send(io, t.kind(), c);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// After the association ended: only give back what completions hand over.
    pub fn settle(&mut self, io: &mut Io, c: &Completion) {
        if !c.more {
            self.inflight -= 1;
        }
        let Some(bufs) = io.ubufs.as_mut() else {
            return;
        };
        if let Some(bid) = io_uring::cqueue::buffer_select(c.flags) {
            bufs.claim(bid);
            bufs.recycle(bid);
        }
        if let OpMem::Pbuf { bid, .. } | OpMem::PbufMsg { bid, .. } = c.mem {
            bufs.recycle(bid);
        }
    }

    /// Ends the association: cancels its ops (they complete later through `settle`) and
    /// gives back held buffers and fragment memory.
    pub fn close(&mut self, io: &mut Io) {
        if self.inflight > 0 {
            io.ring.cancel_fd(self.csock.target());
            io.ring.cancel_fd(self.tsock.target());
        }
        io.frag_bytes -= self.reasm.held();
        self.stats.dropped_frag += u64::from(self.reasm.reset());
        for p in self.pending.drain(..) {
            for h in p.held {
                self.stats.dropped_other += 1;
                if let (Held::Pbuf { bid, .. }, Some(bufs)) = (h, io.ubufs.as_mut()) {
                    bufs.recycle(bid);
                }
            }
        }
    }

    /// Closes the sockets, after the last op completed.
    pub fn release(self, io: &mut Io) {
        io.files.remove(&io.ring, self.csock);
        io.files.remove(&io.ring, self.tsock);
    }

    fn recycle(io: &mut Io, bid: u16) {
        if let Some(bufs) = io.ubufs.as_mut() {
            bufs.recycle(bid);
        }
    }

    fn on_recv(&mut self, io: &mut Io, which: u8, c: Completion) -> Result<(), &'static str> {
        if !c.more {
            self.recv_op[which as usize] = None;
        }
        if let Some(bid) = io_uring::cqueue::buffer_select(c.flags) {
            let Some(bufs) = io.ubufs.as_mut() else {
                return Err("no UDP buffer ring");
            };
            bufs.claim(bid);
            self.recv_errors = 0;
            self.last_active = io.now;
            if c.res < 0 {
                Self::recycle(io, bid);
            } else if which == CLIENT {
                self.on_client_datagram(io, bid, c.res as u32);
            } else {
                self.on_target_datagram(io, bid, c.res as u32);
            }
        } else if c.res == -libc::ENOBUFS {
            // Every buffer is out: the shard re-arms this receive once some are recycled;
            // datagrams wait in the socket buffer meanwhile.
            io.udp_starved.push(self.token.with(kind::UDP_CRECV, which));
            return Ok(());
        } else if c.res < 0 && c.res != -libc::ECANCELED {
            self.recv_errors += 1;
            debug!(
                error = %std::io::Error::from_raw_os_error(-c.res),
                socket = if which == CLIENT { "client" } else { "target" },
                "udp receive failed"
            );
            if self.recv_errors >= MAX_RECV_ERRORS {
                return Err("receive keeps failing");
            }
        }
        if !c.more {
            self.rearm_recv(io, which);
        }
        Ok(())
    }

    /// A receive on the client-facing socket: check the source, then relay its datagram (or,
    /// after a coalesced receive, each of its datagrams).
    fn on_client_datagram(&mut self, io: &mut Io, bid: u16, res: u32) {
        let bufs = io.ubufs.as_mut().expect("checked by the caller");
        let m = parse_recvmsg(bufs.buf_mut(bid), res);
        let Some(src) = m.src else {
            self.stats.dropped_malformed += m.datagrams();
            return Self::recycle(io, bid);
        };
        if !self.filter.admit(src) {
            self.stats.dropped_foreign += m.datagrams();
            return Self::recycle(io, bid);
        }
        if m.truncated {
            self.stats.dropped_malformed += m.datagrams();
            return Self::recycle(io, bid);
        }
        if m.gso != 0 {
            return self.on_client_burst(io, bid, &m);
        }
        let buf = bufs.buf_mut(bid);
        let payload = &buf[RECVMSG_PAYLOAD_OFF as usize..m.end as usize];
        let (hdr, data_off) = match decode_udp_header(payload) {
            Ok(h) => h,
            Err(_) => {
                self.stats.dropped_malformed += 1;
                return Self::recycle(io, bid);
            }
        };
        if hdr.frag != 0 {
            let complete = self.on_fragment(
                &io.cfg,
                io.now,
                &mut io.frag_bytes,
                hdr.frag,
                &hdr.dst,
                &payload[data_off..],
            );
            Self::recycle(io, bid);
            if let Some((dst, payload)) = complete {
                self.send_heap(io, dst, payload);
            }
            return;
        }
        let held = Held::Pbuf {
            bid,
            off: RECVMSG_PAYLOAD_OFF + data_off as u32,
            end: m.end,
        };
        match hdr.dst {
            Addr::Ip(dst) => self.send_held(io, held, dst),
            Addr::Domain(name, port) => self.resolve_then_send(io, name, port, held),
        }
    }

    /// Feeds one fragment to the reassembly queue (or drops it, with `--udp-frag drop`).
    /// Returns the datagram it completed, if any.
    /// (`frag_bytes` is the shard's reassembly total, `Io::frag_bytes`.)
    #[allow(clippy::too_many_arguments)]
    fn on_fragment(
        &mut self,
        cfg: &Config,
        now: Instant,
        frag_bytes: &mut usize,
        frag: u8,
        dst: &Addr,
        data: &[u8],
    ) -> Option<(Addr, Vec<u8>)> {
        if !cfg.udp_frag_reassemble {
            self.stats.dropped_frag += 1;
            return None;
        }
        let before = self.reasm.held();
        let room = FRAG_BUDGET.saturating_sub(*frag_bytes);
        let step = self
            .reasm
            .push(frag, dst, data, now, cfg.udp_frag_timeout, room);
        *frag_bytes = *frag_bytes + self.reasm.held() - before;
        match step {
            FragStep::Queued => None,
            FragStep::Dropped(n) => {
                self.stats.dropped_frag += u64::from(n);
                None
            }
            FragStep::Complete { dst, payload } => Some((dst, payload)),
        }
    }

    /// A coalesced receive from the client (UDP GRO: the client sent a GSO burst). Each
    /// datagram has its own SOCKS header. Payloads are moved down over the headers, so that
    /// consecutive datagrams to one target with equal sizes lie back to back and leave in one
    /// GSO send, still from the same buffer. Fragments and domain destinations, rare in a
    /// burst, take the paths of single datagrams (with a copy).
    fn on_client_burst(&mut self, io: &mut Io, bid: u16, m: &RecvMsg) {
        let mut runs = std::mem::take(&mut self.runs);
        runs.clear();
        let mut later: Vec<(Addr, Vec<u8>)> = Vec::new();
        let bufs = io.ubufs.as_mut().expect("checked by the caller");
        let buf = bufs.buf_mut(bid);
        let (end, g) = (m.end as usize, m.gso as usize);
        let mut w = RECVMSG_PAYLOAD_OFF as usize;
        let mut s = w;
        while s < end {
            let e = (s + g).min(end);
            s = match decode_udp_header(&buf[s..e]) {
                Err(_) => {
                    self.stats.dropped_malformed += 1;
                    e
                }
                Ok((hdr, h)) if hdr.frag != 0 => {
                    let done = self.on_fragment(
                        &io.cfg,
                        io.now,
                        &mut io.frag_bytes,
                        hdr.frag,
                        &hdr.dst,
                        &buf[s + h..e],
                    );
                    later.extend(done);
                    e
                }
                Ok((hdr, h)) if matches!(hdr.dst, Addr::Domain(..)) => {
                    // The name may have to wait for the resolver: the datagram leaves the
                    // buffer (a copy on this rare path).
                    later.push((hdr.dst, buf[s + h..e].to_vec()));
                    e
                }
                Ok((hdr, h)) => {
                    let Addr::Ip(dst) = hdr.dst else {
                        unreachable!("domains are handled above")
                    };
                    let Some(dst) = self.target_addr(dst) else {
                        self.stats.dropped_other += 1;
                        s = e;
                        continue;
                    };
                    let len = (e - s - h) as u32;
                    buf.copy_within(s + h..e, w);
                    let extended = runs
                        .last_mut()
                        .is_some_and(|r: &mut Run| r.extend(dst, len));
                    if !extended {
                        runs.push(Run {
                            off: w as u32,
                            end: w as u32 + len,
                            seg: len,
                            count: 1,
                            dst,
                            closed: false,
                        });
                    }
                    w += len as usize;
                    e
                }
            };
        }
        self.send_runs(io, TARGET, bid, &runs, false);
        self.runs = runs;
        for (dst, payload) in later {
            self.send_heap(io, dst, payload);
        }
    }
    /// Sends a reassembled datagram (a heap buffer).
    fn send_heap(&mut self, io: &mut Io, dst: Addr, payload: Vec<u8>) {
        match dst {
            Addr::Ip(a) => self.send_held(io, Held::Heap(payload), a),
            Addr::Domain(name, port) => self.resolve_then_send(io, name, port, Held::Heap(payload)),
        }
    }

    /// `dst` as the target-facing socket addresses it, or None if that socket cannot reach it
    /// (an IPv6 target on a host without IPv6).
    fn target_addr(&self, dst: SocketAddr) -> Option<SocketAddr> {
        if self.tsock_v6 {
            Some(to_dual_stack(dst))
        } else {
            Some(dst).filter(SocketAddr::is_ipv4)
        }
    }

    /// Sends a datagram whose destination is known to the target.
    fn send_held(&mut self, io: &mut Io, held: Held, dst: SocketAddr) {
        let Some(dst) = self.target_addr(dst) else {
            self.stats.dropped_other += 1;
            if let Held::Pbuf { bid, .. } = held {
                Self::recycle(io, bid);
            }
            return;
        };
        let owner = self.token.with(kind::UDP_TSEND, TARGET).0;
        let fd = self.tsock.target();
        self.inflight += 1;
        match held {
            Held::Pbuf { bid, off, end } => {
                let bufs = io.ubufs.as_mut().expect("a pbuf came from the ring");
                // The source address is read: its area (bytes 16..16+RECVMSG_NAME_LEN) now
                // carries the destination instead.
                let alen = write_sockaddr(&dst, &mut bufs.buf_mut(bid)[16..]) as u32;
                io.ring
                    .send_pbuf_to(fd, bufs, bid, off, end, 16, alen, owner);
            }
            Held::Heap(buf) => {
                io.ring
                    .send_to(fd, buf, Box::new(SockAddr::from(dst)), owner);
            }
        }
    }

    fn resolve_then_send(&mut self, io: &mut Io, name: Box<[u8]>, port: u16, held: Held) {
        if let Some(i) = self
            .pending
            .iter()
            .position(|p| p.port == port && p.name == name)
        {
            // Already being resolved: queue behind it.
            if self.pending_datagrams() < MAX_PENDING_DATAGRAMS {
                self.pending[i].held.push(held);
                return;
            }
            return self.drop_held(io, held);
        }
        let id = self.next_pending_id;
        let t = self.token.with(kind::DNS, id).0;
        match io.dns.lookup(&name, port, t, io.now) {
            Some(Ok(addrs)) if !addrs.is_empty() => self.send_held(io, held, addrs[0]),
            Some(_) => self.drop_held(io, held),
            None => {
                if self.pending.len() >= MAX_PENDING_NAMES
                    || self.pending_datagrams() >= MAX_PENDING_DATAGRAMS
                {
                    // The lookup still fills the cache for the next datagram.
                    return self.drop_held(io, held);
                }
                self.next_pending_id = id.wrapping_add(1);
                self.pending.push(PendingName {
                    id,
                    name,
                    port,
                    held: vec![held],
                });
            }
        }
    }

    fn pending_datagrams(&self) -> usize {
        self.pending.iter().map(|p| p.held.len()).sum()
    }

    fn drop_held(&mut self, io: &mut Io, held: Held) {
        self.stats.dropped_other += 1;
        if let Held::Pbuf { bid, .. } = held {
            Self::recycle(io, bid);
        }
    }

    /// A name lookup for datagrams waiting in `pending` finished.
    pub fn on_resolved(
        &mut self,
        io: &mut Io,
        id: u8,
        res: Result<crate::dns::Addrs, ResolveError>,
    ) {
        let Some(i) = self.pending.iter().position(|p| p.id == id) else {
            return;
        };
        let p = self.pending.swap_remove(i);
        for h in p.held {
            match &res {
                Ok(addrs) if !addrs.is_empty() => self.send_held(io, h, addrs[0]),
                _ => self.drop_held(io, h),
            }
        }
    }

    /// A datagram from a target: wrap it in a header naming the sender and send it to the
    /// client, from the same buffer.
    fn on_target_datagram(&mut self, io: &mut Io, bid: u16, res: u32) {
        let bufs = io.ubufs.as_mut().expect("checked by the caller");
        let buf = bufs.buf_mut(bid);
        let m = parse_recvmsg(buf, res);
        let (Some(src), Some(client)) = (m.src, self.filter.reply_to()) else {
            // No client endpoint yet (nobody may have sent) or an unreadable source.
            self.stats.dropped_other += m.datagrams();
            return Self::recycle(io, bid);
        };
        if m.truncated {
            self.stats.dropped_malformed += m.datagrams();
            return Self::recycle(io, bid);
        }
        if m.gso != 0 {
            return self.on_target_burst(io, bid, &m, src, client);
        }
        let hlen: u32 = if src.is_ipv4() { 10 } else { 22 };
        let start = RECVMSG_PAYLOAD_OFF - hlen;
        crate::proto::udp::encode_udp_header(
            0,
            &src,
            &mut buf[start as usize..RECVMSG_PAYLOAD_OFF as usize],
        );
        // Bytes 0..28 (the recvmsg header and the start of the name area, both read) carry
        // the client's address; the SOCKS header starts at 82 at the earliest.
        let alen = write_sockaddr(&client, &mut buf[..]) as u32;
        let owner = self.token.with(kind::UDP_CSEND, CLIENT).0;
        let fd = self.csock.target();
        self.inflight += 1;
        io.ring
            .send_pbuf_to(fd, bufs, bid, start, m.end, 0, alen, owner);
    }

    /// A coalesced receive from one target (UDP GRO): `n` datagrams of `gso` bytes. Each gets
    /// the same SOCKS header: the payloads move up, last first, to open a header's room in
    /// front of each, and the lot goes to the client as GSO sends of header + payload.
    fn on_target_burst(
        &mut self,
        io: &mut Io,
        bid: u16,
        m: &RecvMsg,
        src: SocketAddr,
        client: SocketAddr,
    ) {
        let bufs = io.ubufs.as_mut().expect("checked by the caller");
        let buf = bufs.buf_mut(bid);
        let p = RECVMSG_PAYLOAD_OFF as usize;
        let (g, len) = (m.gso as usize, (m.end - RECVMSG_PAYLOAD_OFF) as usize);
        let n = len.div_ceil(g);
        let h = if src.is_ipv4() { 10 } else { 22 };
        let last = len - (n - 1) * g;
        let new_end = p + (n - 1) * (h + g) + last;
        if new_end > buf.len() {
            // The buffer's slack past 64 KiB holds more headers than the kernel's segment
            // limit allows; this guards against a kernel that coalesces more.
            self.stats.dropped_other += n as u64;
            return Self::recycle(io, bid);
        }
        for i in (1..n).rev() {
            let from = p + i * g;
            let seg = if i == n - 1 { last } else { g };
            buf.copy_within(from..from + seg, p + i * (h + g));
        }
        let mut hdr = [0u8; 22];
        crate::proto::udp::encode_udp_header(0, &src, &mut hdr[..h]);
        for i in 0..n {
            let at = p - h + i * (h + g);
            buf[at..at + h].copy_from_slice(&hdr[..h]);
        }
        let seg = (h + g) as u32;
        let per_run = (GSO_MAX_BYTES / seg).clamp(1, GSO_MAX_SEGMENTS) as usize;
        let mut runs = std::mem::take(&mut self.runs);
        runs.clear();
        let mut i = 0;
        while i < n {
            let count = per_run.min(n - i);
            let off = (p - h + i * (h + g)) as u32;
            let end = if i + count == n {
                new_end as u32
            } else {
                off + count as u32 * seg
            };
            runs.push(Run {
                off,
                end,
                seg,
                count: count as u32,
                dst: client,
                closed: false,
            });
            i += count;
        }
        self.send_runs(io, CLIENT, bid, &runs, false);
        self.runs = runs;
    }

    /// Sends `runs` (ranges of buffer `bid`) from socket `which`, each as one GSO send, or one
    /// send per datagram where GSO failed before for that size. The buffer's one hold goes to
    /// the first send (unless `held` says the caller keeps it) and each further send adds one;
    /// with nothing to send it is recycled.
    fn send_runs(&mut self, io: &mut Io, which: u8, bid: u16, runs: &[Run], mut held: bool) {
        let bufs = io.ubufs.as_mut().expect("the runs lie in a pbuf");
        let (fd, owner) = if which == CLIENT {
            (
                self.csock.target(),
                self.token.with(kind::UDP_CSEND, CLIENT).0,
            )
        } else {
            (
                self.tsock.target(),
                self.token.with(kind::UDP_TSEND, TARGET).0,
            )
        };
        let limit = self.gso_limit[which as usize];
        let mut send = |off: u32, end: u32, dst: SocketAddr, gso: u32| {
            if held {
                bufs.retain(bid);
            }
            held = true;
            self.inflight += 1;
            io.ring
                .send_pbuf_msg(fd, bufs, bid, off, end, dst, gso as u16, owner);
        };
        for r in runs {
            if r.count == 1 {
                send(r.off, r.end, r.dst, 0);
            } else if r.seg <= limit {
                send(r.off, r.end, r.dst, r.seg);
            } else {
                let mut off = r.off;
                while off < r.end {
                    let end = (off + r.seg).min(r.end);
                    send(off, end, r.dst, 0);
                    off = end;
                }
            }
        }
        if !held {
            Self::recycle(io, bid);
        }
    }

    fn on_send(&mut self, io: &mut Io, k: u8, c: Completion) {
        let which = if k == kind::UDP_CSEND { CLIENT } else { TARGET };
        let datagrams = match c.mem {
            OpMem::PbufMsg {
                bid,
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
                    self.gso_limit[which as usize] = gso - 1;
                    let run = Run {
                        off,
                        end,
                        seg: gso,
                        count: (end - off).div_ceil(gso),
                        dst: dest,
                        closed: true,
                    };
                    return self.send_runs(io, which, bid, &[run], false);
                }
                Self::recycle(io, bid);
                u64::from((end - off).div_ceil(gso))
            }
            OpMem::Pbuf { bid, .. } | OpMem::PbufMsg { bid, .. } => {
                Self::recycle(io, bid);
                1
            }
            _ => 1,
        };
        if c.res < 0 {
            debug!(
                error = %std::io::Error::from_raw_os_error(-c.res),
                to = if which == CLIENT { "client" } else { "target" },
                "udp send failed"
            );
            self.stats.dropped_other += datagrams;
        } else if which == CLIENT {
            self.stats.relayed_in += datagrams;
        } else {
            self.stats.relayed_out += datagrams;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recvmsg_layout_is_parsed() {
        let mut buf = vec![0u8; 256];
        buf[0..4].copy_from_slice(&16u32.to_ne_bytes());
        buf[8..12].copy_from_slice(&5u32.to_ne_bytes());
        let src: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        write_sockaddr(&src, &mut buf[16..]);
        let m = parse_recvmsg(&buf, RECVMSG_PAYLOAD_OFF + 5);
        assert_eq!(m.src, Some(src));
        assert_eq!(m.end, RECVMSG_PAYLOAD_OFF + 5);
        assert!(!m.truncated);
        buf[12..16].copy_from_slice(&(libc::MSG_TRUNC as u32).to_ne_bytes());
        assert!(parse_recvmsg(&buf, RECVMSG_PAYLOAD_OFF).truncated);
    }

    /// Writes a `UDP_GRO` control message with segment size `seg` into a recvmsg buffer.
    fn gro_cmsg(buf: &mut [u8], seg: i32) {
        let c = RECVMSG_CONTROL_OFF as usize;
        buf[4..8].copy_from_slice(&20u32.to_ne_bytes());
        buf[c..c + 8].copy_from_slice(&20usize.to_ne_bytes());
        buf[c + 8..c + 12].copy_from_slice(&libc::SOL_UDP.to_ne_bytes());
        buf[c + 12..c + 16].copy_from_slice(&libc::UDP_GRO.to_ne_bytes());
        buf[c + 16..c + 20].copy_from_slice(&seg.to_ne_bytes());
    }

    #[test]
    fn gro_segment_size_is_read_from_the_control_area() {
        let mut buf = vec![0u8; 4096];
        gro_cmsg(&mut buf, 100);
        let m = parse_recvmsg(&buf, RECVMSG_PAYLOAD_OFF + 1050);
        assert_eq!((m.gso, m.datagrams()), (100, 11));
        // A segment size covering the payload: one datagram.
        let m = parse_recvmsg(&buf, RECVMSG_PAYLOAD_OFF + 100);
        assert_eq!((m.gso, m.datagrams()), (0, 1));
        // Another control message, or none: one datagram.
        gro_cmsg(&mut buf, 100);
        let c = RECVMSG_CONTROL_OFF as usize;
        buf[c + 12..c + 16].copy_from_slice(&libc::IP_TOS.to_ne_bytes());
        assert_eq!(parse_recvmsg(&buf, RECVMSG_PAYLOAD_OFF + 1050).gso, 0);
        buf[4..8].copy_from_slice(&0u32.to_ne_bytes());
        gro_cmsg(&mut buf, -1);
        assert_eq!(parse_recvmsg(&buf, RECVMSG_PAYLOAD_OFF + 1050).gso, 0);
    }

    #[test]
    fn runs_take_equal_datagrams_to_one_destination_and_a_short_last_one() {
        let a: SocketAddr = "192.0.2.1:53".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:53".parse().unwrap();
        let mut r = Run {
            off: 0,
            end: 100,
            seg: 100,
            count: 1,
            dst: a,
            closed: false,
        };
        assert!(r.extend(a, 100));
        assert!(!r.extend(b, 100), "another destination");
        assert!(!r.extend(a, 101), "a larger datagram");
        assert!(r.extend(a, 40), "a shorter one ends the run");
        assert!(!r.extend(a, 40), "nothing after the short one");
        assert_eq!((r.count, r.end), (3, 240));
        let mut r = Run {
            off: 0,
            end: 1000,
            seg: 1000,
            count: 1,
            dst: a,
            closed: false,
        };
        for _ in 1..GSO_MAX_SEGMENTS {
            assert!(r.extend(a, 1000) || r.end - r.off + 1000 > GSO_MAX_BYTES);
        }
        assert!(r.count <= GSO_MAX_SEGMENTS && r.end - r.off <= GSO_MAX_BYTES);
        assert!(!r.extend(a, 1000), "full");
        let mut z = Run {
            off: 0,
            end: 0,
            seg: 0,
            count: 1,
            dst: a,
            closed: false,
        };
        assert!(!z.extend(a, 0), "empty datagrams are sent one by one");
    }
}
