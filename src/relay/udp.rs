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
//! - Both receive with a multishot recvmsg into the shard's UDP provided-buffer ring: one
//!   datagram per buffer, its source address in front of the payload. Nothing is allocated and
//!   nothing is copied per datagram: client -> target sends the payload straight from the
//!   buffer, with the target's address written over the (already read) source address;
//!   target -> client writes the SOCKS header into the bytes just before the payload and sends
//!   header + payload in one piece. Sends are SQEs like any other, so every datagram of a turn
//!   goes to the kernel in the turn's one `io_uring_enter`; a buffer is recycled only when the
//!   send that reads it has completed.
//! - The rules of who may send and of fragment reassembly are sans-IO
//!   ([`crate::proto::udp_assoc`]); this file only feeds them and acts on the answers.
//! - Every dropped datagram is counted by reason; the counts are logged when the association
//!   ends.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Instant;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tracing::debug;

use crate::dns::ResolveError;
use crate::proto::udp::decode_udp_header;
use crate::proto::udp_assoc::{ClientCheck, ClientFilter, FragStep, Reassembler};
use crate::proto::Addr;
use crate::shard::ring::{RECVMSG_NAME_LEN, RECVMSG_PAYLOAD_OFF};
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
    Ok((csock, tsock, v6))
}

// The client's sockaddr (at most 28 bytes, at offset 0) sits below the longest SOCKS header (22
// bytes) placed right before the payload, and a destination written over the source name fits
// the name area.
const _: () = assert!(28 <= RECVMSG_PAYLOAD_OFF - 22 && 28 <= RECVMSG_NAME_LEN);

/// What the header of a datagram received into a provided buffer says.
struct RecvMsg {
    src: Option<SocketAddr>,
    /// Payload bytes `RECVMSG_PAYLOAD_OFF..end` of the buffer.
    end: u32,
    truncated: bool,
}

fn parse_recvmsg(buf: &[u8], res: u32) -> RecvMsg {
    let word = |i: usize| u32::from_ne_bytes(buf[i..i + 4].try_into().expect("4 bytes"));
    let namelen = word(0).min(RECVMSG_NAME_LEN) as usize;
    let flags = word(12) as i32;
    let name = &buf[16..16 + namelen];
    RecvMsg {
        src: read_sockaddr(name),
        end: res.max(RECVMSG_PAYLOAD_OFF),
        truncated: flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0,
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
        if let OpMem::Pbuf { bid, .. } = c.mem {
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

    /// A datagram from the client-facing socket: check the source, parse the header, send the
    /// payload on (or reassemble, or wait for the name).
    fn on_client_datagram(&mut self, io: &mut Io, bid: u16, res: u32) {
        let bufs = io.ubufs.as_mut().expect("checked by the caller");
        let buf = bufs.buf_mut(bid);
        let m = parse_recvmsg(buf, res);
        let Some(src) = m.src else {
            self.stats.dropped_malformed += 1;
            return Self::recycle(io, bid);
        };
        if !self.filter.admit(src) {
            self.stats.dropped_foreign += 1;
            return Self::recycle(io, bid);
        }
        if m.truncated {
            self.stats.dropped_malformed += 1;
            return Self::recycle(io, bid);
        }
        let payload = &buf[RECVMSG_PAYLOAD_OFF as usize..m.end as usize];
        let (hdr, data_off) = match decode_udp_header(payload) {
            Ok(h) => h,
            Err(_) => {
                self.stats.dropped_malformed += 1;
                return Self::recycle(io, bid);
            }
        };
        if hdr.frag != 0 {
            if io.cfg.udp_frag_reassemble {
                let before = self.reasm.held();
                let room = FRAG_BUDGET.saturating_sub(io.frag_bytes);
                let step = self.reasm.push(
                    hdr.frag,
                    &hdr.dst,
                    &payload[data_off..],
                    io.now,
                    io.cfg.udp_frag_timeout,
                    room,
                );
                io.frag_bytes = io.frag_bytes + self.reasm.held() - before;
                Self::recycle(io, bid);
                match step {
                    FragStep::Queued => {}
                    FragStep::Dropped(n) => self.stats.dropped_frag += u64::from(n),
                    FragStep::Complete { dst, payload } => {
                        self.send_heap(io, dst, payload);
                    }
                }
            } else {
                self.stats.dropped_frag += 1;
                Self::recycle(io, bid);
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

    /// Sends a reassembled datagram (a heap buffer).
    fn send_heap(&mut self, io: &mut Io, dst: Addr, payload: Vec<u8>) {
        match dst {
            Addr::Ip(a) => self.send_held(io, Held::Heap(payload), a),
            Addr::Domain(name, port) => self.resolve_then_send(io, name, port, Held::Heap(payload)),
        }
    }

    /// Sends a datagram whose destination is known to the target.
    fn send_held(&mut self, io: &mut Io, held: Held, dst: SocketAddr) {
        let dst = if self.tsock_v6 {
            to_dual_stack(dst)
        } else if dst.is_ipv4() {
            dst
        } else {
            // No IPv6 on this host: the target cannot be reached.
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
            self.stats.dropped_other += 1;
            return Self::recycle(io, bid);
        };
        if m.truncated {
            self.stats.dropped_malformed += 1;
            return Self::recycle(io, bid);
        }
        let hlen: u32 = if src.is_ipv4() { 10 } else { 22 };
        let start = RECVMSG_PAYLOAD_OFF - hlen;
        crate::proto::udp::encode_udp_header(
            0,
            &src,
            &mut buf[start as usize..RECVMSG_PAYLOAD_OFF as usize],
        );
        // Bytes 0..28 (the recvmsg header and the start of the name area, both read) carry
        // the client's address; the SOCKS header starts at 58 at the earliest.
        let alen = write_sockaddr(&client, &mut buf[..]) as u32;
        let owner = self.token.with(kind::UDP_CSEND, CLIENT).0;
        let fd = self.csock.target();
        self.inflight += 1;
        io.ring
            .send_pbuf_to(fd, bufs, bid, start, m.end, 0, alen, owner);
    }

    fn on_send(&mut self, io: &mut Io, k: u8, c: Completion) {
        if let OpMem::Pbuf { bid, .. } = c.mem {
            Self::recycle(io, bid);
        }
        if c.res < 0 {
            debug!(
                error = %std::io::Error::from_raw_os_error(-c.res),
                to = if k == kind::UDP_CSEND { "client" } else { "target" },
                "udp send failed"
            );
            self.stats.dropped_other += 1;
        } else if k == kind::UDP_CSEND {
            self.stats.relayed_in += 1;
        } else {
            self.stats.relayed_out += 1;
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
}
