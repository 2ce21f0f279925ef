//! One proxied TCP connection, from accept to close, driven by its shard's completions.
//!
//! Phases: handshake (bytes fed to the sans-IO [`ServerHandshake`]) -> resolve (domain
//! targets, off-shard) -> connect (each resolved address in turn) -> reply (the success reply
//! and any pipelined early data) -> forwarding, on one of two paths:
//!
//! - **splice**: per direction, wait for readability with a poll (holding nothing), borrow a
//!   pipe from the shard's pool, splice socket -> pipe -> socket, and give the pipe back once
//!   it is empty. Every splice is non-blocking, so no io-wq worker parks on an idle socket.
//! - **copy**: per direction, a multishot receive into the shard's provided buffer ring; each
//!   buffer is sent on and recycled only after its send completed. A direction whose queue
//!   grows past `HIGH_WATER` cancels its receive (back-pressure) and re-arms below `LOW_WATER`.
//!
//! Short splices and sends continue from where they stopped. EOF in one direction shuts down
//! writing toward the other side once its bytes are out, and the other direction flows on.
//! Closing cancels every op on both sockets; the shard frees the connection (and its fds and
//! pipes) only when the last op has completed.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use socket2::{Domain, SockAddr, Socket, Type};
use tracing::{debug, info};

use crate::config::ForwardMode;
use crate::dns::ResolveError;
use crate::proto::{self, Addr, Command, RelayError, Rep, ServerHandshake, Step};
use crate::shard::pipes::Pipe;
use crate::shard::{kind, Completion, Io, OpId, OpMem, SockHandle, Target, Token};

use super::udp::Assoc;

const C2T: usize = 0;
const T2C: usize = 1;
/// Copy path: queued buffers per direction before its receive pauses, and where it resumes.
const HIGH_WATER: usize = 16;
const LOW_WATER: usize = 4;
/// A handshake never needs more than greeting (257) + auth (513) + request (262) bytes.
const MAX_HANDSHAKE: usize = 2048;
/// `--forward auto`: consecutive full receive buffers after which a direction moves to splice.
const BULK_STREAK: u32 = 4;
/// How long a rejected client gets to read its error reply.
const REJECT_LINGER: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Handshake,
    Resolving,
    Connecting,
    Replying,
    Forwarding,
    Rejecting,
    /// UDP ASSOCIATE: the connection is the association's control channel.
    Udp,
}

#[derive(Default)]
struct Dir {
    /// This direction forwards with splice (else with the buffer ring).
    splice: bool,
    /// `--forward auto`: moving to splice once the copy path is drained.
    switching: bool,
    full_streak: u32,
    // splice path
    pipe: Option<Pipe>,
    in_pipe: u32,
    last_in: u32,
    // copy path
    recv_op: Option<OpId>,
    queue: VecDeque<(u16, u32)>,
    sending: bool,
    paused: bool,
    // both
    eof: bool,
    done: bool,
}

pub struct Conn {
    token: Token,
    client: SockHandle,
    /// An ordinary socket while connecting; moved into the fixed-file table once connected.
    target: Option<SockHandle>,
    peer: Option<SocketAddr>,
    /// The client connection's local address (BND.ADDR of a UDP association).
    local: Option<SocketAddr>,
    phase: Phase,
    hs: Option<Box<ServerHandshake>>,
    hs_buf: Vec<u8>,
    dst: Option<Addr>,
    addrs: Vec<SocketAddr>,
    next_addr: usize,
    last_err: Option<RelayError>,
    /// Handshake output not yet sent when the request arrived pipelined (auth status).
    reply_prefix: Vec<u8>,
    /// Client bytes that arrived after the request, to be sent to the target first.
    early: Vec<u8>,
    pending_sends: u8,
    dirs: [Dir; 2],
    inflight: u32,
    /// Of `inflight`, shutdown ops: they finish on their own, so they need no cancel.
    shutdowns: u32,
    timer_seq: u8,
    timed_out: bool,
    last_active: std::time::Instant,
    closing: bool,
    udp: Option<Box<Assoc>>,
    /// When the association's timer is due (None: not armed).
    udp_timer_at: Option<std::time::Instant>,
    /// Why the association ended, for its log line.
    udp_end: &'static str,
}

impl Conn {
    pub fn new(
        client: SockHandle,
        peer: Option<SocketAddr>,
        local: Option<SocketAddr>,
        token: Token,
    ) -> Conn {
        Conn {
            token,
            client,
            target: None,
            peer,
            local,
            phase: Phase::Handshake,
            hs: Some(Box::new(ServerHandshake::new())),
            hs_buf: Vec::new(),
            dst: None,
            addrs: Vec::new(),
            next_addr: 0,
            last_err: None,
            reply_prefix: Vec::new(),
            early: Vec::new(),
            pending_sends: 0,
            dirs: [Dir::default(), Dir::default()],
            inflight: 0,
            shutdowns: 0,
            timer_seq: 0,
            timed_out: false,
            last_active: std::time::Instant::now(),
            closing: false,
            udp: None,
            udp_timer_at: None,
            udp_end: "relay shutting down",
        }
    }

    /// True once closing has finished: no op is in flight, so the shard may free everything.
    pub fn is_finished(&self) -> bool {
        self.closing && self.inflight == 0 && self.udp.as_ref().is_none_or(|u| u.inflight == 0)
    }

    fn tok(&self, k: u8, aux: u8) -> u64 {
        self.token.with(k, aux).0
    }

    fn client_fd(&self) -> Target {
        self.client.target()
    }

    fn target_fd(&self) -> Target {
        self.target.as_ref().map_or(Target::Fd(-1), |t| t.target())
    }

    /// (source, destination) sockets of direction `d`.
    fn dir_fds(&self, d: usize) -> (Target, Target) {
        if d == C2T {
            (self.client_fd(), self.target_fd())
        } else {
            (self.target_fd(), self.client_fd())
        }
    }

    fn peer_str(&self) -> String {
        self.peer.map_or_else(|| "?".into(), |p| p.to_string())
    }

    fn dst_str(&self) -> String {
        self.dst
            .as_ref()
            .map_or_else(|| "?".into(), |d| d.to_string())
    }

    // ---- ops and timers -------------------------------------------------------------------

    fn recv(&mut self, io: &mut Io, fd: Target, buf: Vec<u8>, k: u8) {
        self.inflight += 1;
        io.ring.recv(fd, buf, self.tok(k, 0));
    }

    fn send(&mut self, io: &mut Io, fd: Target, buf: Vec<u8>, off: usize, k: u8) {
        self.inflight += 1;
        io.ring.send(fd, buf, off, self.tok(k, 0));
    }

    fn poll(&mut self, io: &mut Io, fd: Target, events: i16, k: u8, d: usize) {
        self.inflight += 1;
        io.ring.poll(fd, events as u16 as u32, self.tok(k, d as u8));
    }

    fn arm_timer(&mut self, io: &mut Io, after: Duration) {
        self.timer_seq = self.timer_seq.wrapping_add(1);
        let t = self.tok(kind::TIMER, self.timer_seq);
        io.wheel.insert(io.now + after, t);
    }

    fn disarm_timer(&mut self) {
        self.timer_seq = self.timer_seq.wrapping_add(1);
    }

    // ---- lifecycle ------------------------------------------------------------------------

    pub fn start(&mut self, io: &mut Io) {
        self.last_active = io.now;
        let to = io.cfg.handshake_timeout;
        self.arm_timer(io, to);
        let fd = self.client_fd();
        self.recv(io, fd, Vec::with_capacity(512), kind::HS_RECV);
    }

    /// Starts closing: cancels every op on both sockets. Nothing is freed here; the shard
    /// releases the connection once the cancelled ops have completed.
    pub fn close(&mut self, io: &mut Io) {
        if self.closing {
            return;
        }
        self.closing = true;
        self.disarm_timer();
        // A cancel by file scans the ring's pending ops (about 5% of the relay's CPU in a
        // connection-rate run), so skip it when nothing that could wait is in flight: the usual
        // case after both directions ended, with at most a shutdown op still completing.
        let recvs = [self.dirs[C2T].recv_op, self.dirs[T2C].recv_op];
        let n_recvs = recvs.iter().flatten().count() as u32;
        if n_recvs > 0 && self.inflight == self.shutdowns + n_recvs {
            // Only multishot receives can still wait (a client's reset while the other
            // direction listens): cancel them by id, a hash lookup instead of a scan.
            for op in recvs.into_iter().flatten() {
                io.ring.cancel_op(op);
            }
        } else if self.inflight > self.shutdowns {
            io.ring.cancel_fd(self.client_fd());
            if self.target.is_some() {
                io.ring.cancel_fd(self.target_fd());
            }
        }
        if let Some(bufs) = io.bufs.as_mut() {
            for d in &mut self.dirs {
                for (bid, _) in d.queue.drain(..) {
                    bufs.recycle(bid);
                }
            }
        }
        if self.udp.is_some() {
            self.log_udp_end();
        }
        if let Some(u) = self.udp.as_mut() {
            u.close(io);
        }
    }

    /// Gives back what the connection still holds, after its last op completed.
    pub fn release(mut self: Box<Self>, io: &mut Io) {
        io.files.remove(
            &io.ring,
            std::mem::replace(&mut self.client, SockHandle::Fixed(u32::MAX)),
        );
        if let Some(t) = self.target.take() {
            io.files.remove(&io.ring, t);
        }
        if let Some(u) = self.udp.take() {
            u.release(io);
        }
        for d in &mut self.dirs {
            if let Some(p) = d.pipe.take() {
                // A pipe with bytes left in it must not be lent again; dropping closes it.
                if d.in_pipe == 0 {
                    io.pipes.give(p);
                }
            }
        }
        // Ordinary sockets close when `self` drops.
    }

    pub fn on_timer(&mut self, io: &mut Io, t: Token) {
        if t.aux() != self.timer_seq || self.closing {
            return;
        }
        match self.phase {
            Phase::Handshake => {
                info!(client = %self.peer_str(), reason = "handshake timeout", "handshake failed");
                self.close(io);
            }
            Phase::Resolving => {
                self.timed_out = true;
                self.fail(io, RelayError::ConnectTimeout);
            }
            Phase::Connecting => {
                // The connect completes with -ECANCELED and is reported as a timeout there.
                self.timed_out = true;
                if self.target.is_some() {
                    io.ring.cancel_fd(self.target_fd());
                }
            }
            Phase::Forwarding => {
                let Some(idle) = io.cfg.idle_timeout else {
                    return;
                };
                let quiet = io.now.saturating_duration_since(self.last_active);
                if quiet >= idle {
                    debug!(client = %self.peer_str(), target = %self.dst_str(), "idle timeout");
                    self.close(io);
                } else {
                    self.arm_timer(io, idle - quiet);
                }
            }
            Phase::Replying | Phase::Rejecting => self.close(io),
            Phase::Udp => {
                self.udp_timer_at = None;
                let Some(u) = self.udp.as_mut() else {
                    return self.close(io);
                };
                if u.on_timer(io) {
                    return self.end_udp(io, "idle timeout");
                }
                self.arm_udp_timer(io);
            }
        }
    }

    pub fn on_completion(&mut self, io: &mut Io, t: Token, c: Completion) {
        if matches!(
            t.kind(),
            kind::UDP_CRECV | kind::UDP_TRECV | kind::UDP_CSEND | kind::UDP_TSEND
        ) {
            return self.on_udp_completion(io, t, c);
        }
        if !c.more {
            self.inflight -= 1;
        }
        if t.kind() == kind::SHUTDOWN {
            self.shutdowns -= 1;
        }
        let d = t.aux() as usize;
        if self.closing {
            self.settle_after_close(io, t.kind(), d, &c);
            return;
        }
        self.last_active = io.now;
        match t.kind() {
            kind::HS_RECV => self.on_hs_recv(io, c),
            kind::HS_SEND => self.on_hs_send(io, c),
            kind::CONNECT => self.on_connect(io, c),
            kind::REPLY_SEND | kind::EARLY_SEND => self.on_reply_send(io, t.kind(), c),
            kind::REJECT_SEND => self.on_reject_send(io, c),
            kind::REJECT_DRAIN => self.on_reject_drain(io, c),
            kind::POLL_IN => self.on_poll_in(io, d, c.res),
            kind::SPLICE_IN => self.on_splice_in(io, d, c.res),
            kind::SPLICE_OUT => self.on_splice_out(io, d, c.res),
            kind::POLL_OUT => self.on_poll_out(io, d, c.res),
            kind::RECV => self.on_recv(io, d, c),
            kind::SEND => self.on_send(io, d, c),
            kind::CTRL_RECV => self.on_ctrl_recv(io, c),
            _ => {}
        }
    }

    /// Completions that arrive after close: only account for what they hand back.
    fn settle_after_close(&mut self, io: &mut Io, k: u8, d: usize, c: &Completion) {
        match k {
            kind::SPLICE_IN if c.res > 0 => self.dirs[d].in_pipe += c.res as u32,
            kind::SPLICE_OUT if c.res > 0 => self.dirs[d].in_pipe -= c.res as u32,
            kind::RECV if c.res > 0 => {
                if let (Some(bid), Some(bufs)) =
                    (io_uring::cqueue::buffer_select(c.flags), io.bufs.as_mut())
                {
                    bufs.claim(bid);
                    bufs.recycle(bid);
                }
            }
            kind::SEND => {
                if let (OpMem::Pbuf { bid, .. }, Some(bufs)) = (&c.mem, io.bufs.as_mut()) {
                    bufs.recycle(*bid);
                }
            }
            _ => {}
        }
    }

    // ---- handshake ------------------------------------------------------------------------

    fn on_hs_recv(&mut self, io: &mut Io, c: Completion) {
        let OpMem::Buf { mut buf, off } = c.mem else {
            return self.close(io);
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
            return self.close(io);
        }
        buf.truncate(off + c.res as usize);
        let users = io.cfg.users.as_deref();
        let mut out = Vec::new();
        let hs = self
            .hs
            .as_mut()
            .expect("handshake state lives until the request");
        let (step, consumed) = hs.advance(&buf, users, &mut out);
        match step {
            Step::NeedMore => {
                buf.drain(..consumed);
                if buf.len() >= MAX_HANDSHAKE {
                    info!(client = %self.peer_str(), reason = "handshake too long", "handshake failed");
                    return self.close(io);
                }
                let fd = self.client_fd();
                if out.is_empty() {
                    self.recv(io, fd, buf, kind::HS_RECV);
                } else {
                    self.hs_buf = buf;
                    self.send(io, fd, out, 0, kind::HS_SEND);
                }
            }
            Step::Request(req) => {
                self.hs = None;
                self.early = buf[consumed..].to_vec();
                self.reply_prefix = out;
                self.on_request(io, req);
            }
            Step::Reject(err) => {
                self.hs = None;
                info!(client = %self.peer_str(), reason = %err, "handshake failed");
                self.reject(io, out);
            }
        }
    }

    fn on_hs_send(&mut self, io: &mut Io, c: Completion) {
        let OpMem::Buf { buf, off } = c.mem else {
            return self.close(io);
        };
        if c.res <= 0 {
            return self.close(io);
        }
        let fd = self.client_fd();
        let off = off + c.res as usize;
        if off < buf.len() {
            return self.send(io, fd, buf, off, kind::HS_SEND);
        }
        // Bytes left over from the last segment were already fed and are incomplete: keep
        // them and read more after them.
        let hs_buf = std::mem::take(&mut self.hs_buf);
        self.recv(io, fd, hs_buf, kind::HS_RECV);
    }

    fn on_request(&mut self, io: &mut Io, req: proto::Request) {
        self.dst = Some(req.dst.clone());
        if req.cmd == Command::UDP_ASSOCIATE {
            return self.associate(io, &req.dst);
        }
        if req.cmd != Command::CONNECT {
            return self.fail(io, RelayError::CommandNotSupported(req.cmd.0));
        }
        let to = io.cfg.connect_timeout;
        self.arm_timer(io, to);
        match req.dst {
            Addr::Ip(a) => {
                self.addrs = vec![a];
                self.connect_next(io);
            }
            Addr::Domain(name, port) => {
                self.phase = Phase::Resolving;
                let t = self.tok(kind::DNS, 0);
                if let Some(res) = io.dns.lookup(&name, port, t, io.now) {
                    self.on_resolved(io, Token(t), res);
                }
            }
        }
    }

    pub fn on_resolved(
        &mut self,
        io: &mut Io,
        t: Token,
        res: Result<crate::dns::Addrs, ResolveError>,
    ) {
        if self.phase == Phase::Udp && !self.closing {
            if let Some(u) = self.udp.as_mut() {
                u.on_resolved(io, t.aux(), res);
            }
            return;
        }
        if self.closing || self.phase != Phase::Resolving {
            return;
        }
        match res {
            Ok(addrs) if !addrs.is_empty() => {
                self.addrs = addrs.to_vec();
                self.connect_next(io);
            }
            _ => self.fail(io, RelayError::ResolveFailed),
        }
    }

    fn connect_next(&mut self, io: &mut Io) {
        self.phase = Phase::Connecting;
        while self.next_addr < self.addrs.len() {
            let addr = self.addrs[self.next_addr];
            self.next_addr += 1;
            let sock =
                match Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), None) {
                    Ok(s) => s,
                    Err(e) => {
                        self.last_err = Some(RelayError::Connect(e.raw_os_error().unwrap_or(0)));
                        continue;
                    }
                };
            let _ = sock.set_tcp_nodelay(true);
            let fd = sock.as_raw_fd();
            self.target = Some(SockHandle::Fd(sock));
            self.inflight += 1;
            io.ring.connect(
                fd,
                Box::new(SockAddr::from(addr)),
                self.tok(kind::CONNECT, 0),
            );
            return;
        }
        let err = self.last_err.take().unwrap_or(RelayError::ResolveFailed);
        self.fail(io, err);
    }

    fn on_connect(&mut self, io: &mut Io, c: Completion) {
        if c.res < 0 {
            self.target = None;
            if self.timed_out || c.res == -libc::ECANCELED {
                return self.fail(io, RelayError::ConnectTimeout);
            }
            self.last_err = Some(RelayError::Connect(-c.res));
            return self.connect_next(io);
        }
        self.disarm_timer();
        let Some(SockHandle::Fd(sock)) = self.target.take() else {
            return self.fail(io, RelayError::General("outbound socket missing"));
        };
        let Some(bnd) = sock.local_addr().ok().and_then(|a| a.as_socket()) else {
            return self.fail(io, RelayError::General("outbound socket has no address"));
        };
        self.target = Some(io.files.install(&io.ring, sock));
        self.send_success_reply(io, bnd);
        if !self.early.is_empty() {
            self.pending_sends += 1;
            let early = std::mem::take(&mut self.early);
            let tfd = self.target_fd();
            self.send(io, tfd, early, 0, kind::EARLY_SEND);
        }
    }

    /// Sends the success reply with `bnd` (after any pending handshake output); the next phase
    /// starts once every pending send is out.
    fn send_success_reply(&mut self, io: &mut Io, bnd: SocketAddr) {
        let mut out = std::mem::take(&mut self.reply_prefix);
        proto::codec::encode_reply(Rep::SUCCEEDED, &Addr::Ip(bnd), &mut out);
        self.phase = Phase::Replying;
        self.pending_sends = 1;
        let cfd = self.client_fd();
        self.send(io, cfd, out, 0, kind::REPLY_SEND);
    }

    fn on_reply_send(&mut self, io: &mut Io, k: u8, c: Completion) {
        let OpMem::Buf { buf, off } = c.mem else {
            return self.close(io);
        };
        if c.res <= 0 {
            return self.close(io);
        }
        let off = off + c.res as usize;
        if off < buf.len() {
            let fd = if k == kind::REPLY_SEND {
                self.client_fd()
            } else {
                self.target_fd()
            };
            return self.send(io, fd, buf, off, k);
        }
        self.pending_sends -= 1;
        if self.pending_sends == 0 {
            if self.udp.is_some() {
                self.start_udp(io);
            } else {
                self.start_forwarding(io);
            }
        }
    }

    /// Sends an error reply for `err` (after any pending handshake output), then closes.
    fn fail(&mut self, io: &mut Io, err: RelayError) {
        info!(
            client = %self.peer_str(),
            target = %self.dst_str(),
            reason = %err,
            rep = err.rep().0,
            "connect failed"
        );
        let mut out = std::mem::take(&mut self.reply_prefix);
        proto::server::error_reply(&err, &mut out);
        self.reject(io, out);
    }

    fn reject(&mut self, io: &mut Io, out: Vec<u8>) {
        self.phase = Phase::Rejecting;
        // No op is in flight on the target here (its connect has completed, or none started).
        if let Some(t) = self.target.take() {
            io.files.remove(&io.ring, t);
        }
        if out.is_empty() {
            return self.close(io);
        }
        self.arm_timer(io, REJECT_LINGER);
        let fd = self.client_fd();
        self.send(io, fd, out, 0, kind::REJECT_SEND);
    }

    fn on_reject_send(&mut self, io: &mut Io, c: Completion) {
        let OpMem::Buf { mut buf, off } = c.mem else {
            return self.close(io);
        };
        let off = off + c.res.max(0) as usize;
        let fd = self.client_fd();
        if c.res > 0 && off < buf.len() {
            return self.send(io, fd, buf, off, kind::REJECT_SEND);
        }
        if c.res <= 0 {
            return self.close(io);
        }
        // The answer is out. Closing now with unread client bytes would send a reset that can
        // destroy the answer before the client reads it: send our FIN, then discard what the
        // client still sends until its EOF (or REJECT_LINGER, armed in `reject`).
        self.inflight += 1;
        self.shutdowns += 1;
        io.ring
            .shutdown(fd, libc::SHUT_WR, self.tok(kind::SHUTDOWN, 0));
        buf.clear();
        buf.reserve(512);
        self.recv(io, fd, buf, kind::REJECT_DRAIN);
    }

    fn on_reject_drain(&mut self, io: &mut Io, c: Completion) {
        match c.mem {
            OpMem::Buf { mut buf, .. } if c.res > 0 => {
                buf.clear();
                let fd = self.client_fd();
                self.recv(io, fd, buf, kind::REJECT_DRAIN);
            }
            _ => self.close(io),
        }
    }

    // ---- UDP ASSOCIATE ---------------------------------------------------------------------

    /// Creates the association's sockets on this shard and replies with the client-facing
    /// socket's address (or `--udp-advertise`).
    fn associate(&mut self, io: &mut Io, requested: &Addr) {
        let (Some(local), Some(peer)) = (self.local, self.peer) else {
            return self.fail(io, RelayError::General("control connection has no address"));
        };
        let (csock, tsock, v6) = match super::udp::open_sockets(local) {
            Ok(s) => s,
            Err(e) => {
                info!(client = %self.peer_str(), error = %e, "udp association failed");
                return self.fail(io, RelayError::General("cannot open UDP sockets"));
            }
        };
        let Some(port) = csock
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .map(|a| a.port())
        else {
            return self.fail(io, RelayError::General("UDP socket has no address"));
        };
        let bnd = SocketAddr::new(io.cfg.udp_advertise.unwrap_or(local.ip()), port);
        let csock = io.files.install(&io.ring, csock);
        let tsock = io.files.install(&io.ring, tsock);
        self.udp = Some(Box::new(Assoc::new(
            self.token,
            csock,
            tsock,
            v6,
            io.cfg.udp_client_check,
            peer.ip(),
            requested,
            bnd,
            io.now,
        )));
        // Control-channel bytes after the request mean nothing: drop them.
        self.early.clear();
        self.send_success_reply(io, bnd);
    }

    /// The reply is out: start relaying datagrams and watch the control connection.
    fn start_udp(&mut self, io: &mut Io) {
        self.phase = Phase::Udp;
        self.disarm_timer();
        let Some(u) = self.udp.as_mut() else {
            return self.close(io);
        };
        u.last_active = io.now;
        u.start(io);
        let bnd = u.bnd;
        debug!(client = %self.peer_str(), bnd = %bnd, "udp association");
        let fd = self.client_fd();
        self.recv(io, fd, Vec::with_capacity(256), kind::CTRL_RECV);
        self.arm_udp_timer(io);
    }

    /// Keeps the connection timer at the association's earliest deadline.
    fn arm_udp_timer(&mut self, io: &mut Io) {
        let Some(due) = self.udp.as_ref().and_then(|u| u.next_deadline(io)) else {
            return;
        };
        if self.udp_timer_at.is_some_and(|at| at <= due) {
            return;
        }
        self.udp_timer_at = Some(due);
        let after = due.saturating_duration_since(io.now);
        self.arm_timer(io, after);
    }

    fn on_udp_completion(&mut self, io: &mut Io, t: Token, c: Completion) {
        let Some(u) = self.udp.as_mut() else {
            return;
        };
        if self.closing {
            return u.settle(io, &c);
        }
        match u.on_completion(io, t, c) {
            Ok(()) => self.arm_udp_timer(io),
            Err(reason) => self.end_udp(io, reason),
        }
    }

    /// Anything the client sends on the control connection is ignored; its end (EOF, reset)
    /// ends the association.
    fn on_ctrl_recv(&mut self, io: &mut Io, c: Completion) {
        match c.mem {
            OpMem::Buf { mut buf, .. } if c.res > 0 => {
                buf.clear();
                let fd = self.client_fd();
                self.recv(io, fd, buf, kind::CTRL_RECV);
            }
            _ if c.res == 0 => self.end_udp(io, "control connection closed"),
            _ => self.end_udp(io, "control connection failed"),
        }
    }

    /// Re-arms a receive of the association that ran out of buffers.
    pub fn rearm_udp(&mut self, io: &mut Io, which: u8) {
        if self.closing {
            return;
        }
        if let Some(u) = self.udp.as_mut() {
            u.rearm_recv(io, which);
        }
    }

    fn end_udp(&mut self, io: &mut Io, reason: &'static str) {
        self.udp_end = reason;
        self.close(io);
    }

    /// The association's one log line, with its counters.
    fn log_udp_end(&self) {
        if let Some(u) = self.udp.as_ref() {
            let reason = self.udp_end;
            let s = &u.stats;
            info!(
                client = %self.peer_str(),
                udp_client = %u.client().map_or_else(|| "-".to_string(), |a| a.to_string()),
                bnd = %u.bnd,
                reason,
                relayed_out = s.relayed_out,
                relayed_in = s.relayed_in,
                dropped_foreign = s.dropped_foreign,
                dropped_malformed = s.dropped_malformed,
                dropped_frag = s.dropped_frag,
                dropped_other = s.dropped_other,
                "udp association closed"
            );
        }
    }

    // ---- forwarding -----------------------------------------------------------------------

    fn start_forwarding(&mut self, io: &mut Io) {
        self.phase = Phase::Forwarding;
        if let Some(idle) = io.cfg.idle_timeout {
            self.arm_timer(io, idle);
        }
        for d in [C2T, T2C] {
            if io.cfg.forward == ForwardMode::Splice {
                self.dirs[d].splice = true;
                self.wait_readable(io, d);
            } else {
                self.rearm_recv(io, d);
            }
        }
    }

    /// Direction `d` saw EOF and everything before it was delivered: pass the EOF on.
    fn finish_dir(&mut self, io: &mut Io, d: usize) {
        let dir = &mut self.dirs[d];
        dir.done = true;
        if let Some(p) = dir.pipe.take() {
            io.pipes.give(p);
        }
        if self.dirs[C2T].done && self.dirs[T2C].done {
            // Both directions ended: closing sends the last FIN, no shutdown op needed.
            return self.close(io);
        }
        let (_, dst) = self.dir_fds(d);
        self.inflight += 1;
        self.shutdowns += 1;
        io.ring
            .shutdown(dst, libc::SHUT_WR, self.tok(kind::SHUTDOWN, d as u8));
    }

    fn io_error(&mut self, io: &mut Io, res: i32) {
        debug!(
            client = %self.peer_str(),
            target = %self.dst_str(),
            error = %std::io::Error::from_raw_os_error(-res),
            "connection ended"
        );
        self.close(io);
    }

    // splice path

    fn wait_readable(&mut self, io: &mut Io, d: usize) {
        let (src, _) = self.dir_fds(d);
        self.poll(io, src, libc::POLLIN | libc::POLLRDHUP, kind::POLL_IN, d);
    }

    fn splice_in(&mut self, io: &mut Io, d: usize) {
        let (src, _) = self.dir_fds(d);
        let w = self.dirs[d].pipe.as_ref().expect("pipe lent").write_fd();
        let len = io.pipes.pipe_size() as u32;
        self.inflight += 1;
        io.ring
            .splice(src, Target::Fd(w), len, self.tok(kind::SPLICE_IN, d as u8));
    }

    fn splice_out(&mut self, io: &mut Io, d: usize) {
        let (_, dst) = self.dir_fds(d);
        let dir = &self.dirs[d];
        let r = dir.pipe.as_ref().expect("pipe lent").read_fd();
        let len = dir.in_pipe;
        self.inflight += 1;
        io.ring
            .splice(Target::Fd(r), dst, len, self.tok(kind::SPLICE_OUT, d as u8));
    }

    fn on_poll_in(&mut self, io: &mut Io, d: usize, res: i32) {
        if res < 0 {
            return self.io_error(io, res);
        }
        if self.dirs[d].pipe.is_none() {
            match io.pipes.take() {
                Ok(p) => self.dirs[d].pipe = Some(p),
                Err(e) => {
                    info!(client = %self.peer_str(), error = %e, "no pipe for splice");
                    return self.close(io);
                }
            }
        }
        self.splice_in(io, d);
    }

    fn on_splice_in(&mut self, io: &mut Io, d: usize, res: i32) {
        let dir = &mut self.dirs[d];
        if res > 0 {
            dir.in_pipe += res as u32;
            dir.last_in = res as u32;
            return self.splice_out(io, d);
        }
        if res == 0 {
            dir.eof = true;
            return self.finish_dir(io, d);
        }
        if res == -libc::EAGAIN {
            // Nothing to read after all: hold no pipe while waiting.
            if let Some(p) = dir.pipe.take() {
                io.pipes.give(p);
            }
            return self.wait_readable(io, d);
        }
        self.io_error(io, res)
    }

    fn on_splice_out(&mut self, io: &mut Io, d: usize, res: i32) {
        if res == -libc::EAGAIN {
            let (_, dst) = self.dir_fds(d);
            return self.poll(io, dst, libc::POLLOUT, kind::POLL_OUT, d);
        }
        if res <= 0 {
            return self.io_error(io, if res == 0 { -libc::EPIPE } else { res });
        }
        let pipe_size = io.pipes.pipe_size() as u32;
        let dir = &mut self.dirs[d];
        dir.in_pipe -= res as u32;
        if dir.in_pipe > 0 {
            return self.splice_out(io, d);
        }
        if dir.last_in >= pipe_size {
            // The last read filled the pipe: more is probably waiting, read again at once.
            return self.splice_in(io, d);
        }
        if let Some(p) = dir.pipe.take() {
            io.pipes.give(p);
        }
        self.wait_readable(io, d)
    }

    fn on_poll_out(&mut self, io: &mut Io, d: usize, res: i32) {
        if res < 0 {
            return self.io_error(io, res);
        }
        self.splice_out(io, d)
    }

    // copy path

    /// (Re-)arms the multishot receive of direction `d` if it should be running.
    pub fn rearm_recv(&mut self, io: &mut Io, d: usize) {
        if self.closing || self.phase != Phase::Forwarding {
            return;
        }
        let Some(bgid) = io.bufs.as_ref().map(|b| b.bgid()) else {
            return;
        };
        let (src, _) = self.dir_fds(d);
        let dir = &mut self.dirs[d];
        if dir.eof || dir.recv_op.is_some() || dir.switching || dir.splice {
            return;
        }
        dir.paused = false;
        self.inflight += 1;
        let op = io.ring.recv_multi(src, bgid, self.tok(kind::RECV, d as u8));
        self.dirs[d].recv_op = Some(op);
    }

    fn send_next(&mut self, io: &mut Io, d: usize) {
        let (_, dst) = self.dir_fds(d);
        let Some((bid, len)) = self.dirs[d].queue.pop_front() else {
            self.dirs[d].sending = false;
            return;
        };
        self.dirs[d].sending = true;
        self.inflight += 1;
        let bufs = io.bufs.as_ref().expect("copy path has a buffer ring");
        io.ring
            .send_pbuf(dst, bufs, bid, 0, len, self.tok(kind::SEND, d as u8));
    }

    fn on_recv(&mut self, io: &mut Io, d: usize, c: Completion) {
        if !c.more {
            self.dirs[d].recv_op = None;
        }
        if c.res > 0 {
            let (Some(bid), Some(bufs)) =
                (io_uring::cqueue::buffer_select(c.flags), io.bufs.as_mut())
            else {
                return self.close(io);
            };
            bufs.claim(bid);
            let full = c.res as u32 == io.bufs.as_ref().map_or(0, |b| b.buf_size());
            let auto = io.cfg.forward == ForwardMode::Auto;
            let dir = &mut self.dirs[d];
            dir.queue.push_back((bid, c.res as u32));
            dir.full_streak = if full { dir.full_streak + 1 } else { 0 };
            if !dir.sending {
                self.send_next(io, d);
            }
            let dir = &mut self.dirs[d];
            let bulk = dir.full_streak >= BULK_STREAK;
            let stalled = dir.queue.len() >= HIGH_WATER;
            let stop_recv = if auto && (bulk || stalled) && !dir.switching {
                // Bulk data, or a destination that does not keep up: finish what the copy path
                // holds, then continue with splice, which holds no shared buffers while the
                // destination is slow.
                dir.switching = true;
                true
            } else if dir.queue.len() >= HIGH_WATER && !dir.paused && !dir.switching {
                dir.paused = true;
                true
            } else {
                false
            };
            if stop_recv {
                if let Some(op) = dir.recv_op {
                    io.ring.cancel_op(op);
                }
            }
            if !c.more {
                if self.dirs[d].switching {
                    self.maybe_switch_to_splice(io, d);
                } else if !self.dirs[d].paused {
                    self.rearm_recv(io, d);
                }
            }
            return;
        }
        match c.res {
            0 => {
                let dir = &mut self.dirs[d];
                dir.eof = true;
                if !dir.sending && dir.queue.is_empty() {
                    self.finish_dir(io, d);
                }
            }
            r if r == -libc::ENOBUFS => {
                if io.cfg.forward == ForwardMode::Auto {
                    // The shared pool is empty: this direction needs no pool buffer on splice.
                    self.dirs[d].switching = true;
                    self.maybe_switch_to_splice(io, d);
                } else {
                    io.starved.push(self.token.with(kind::RECV, d as u8));
                }
            }
            r if r == -libc::ECANCELED => {
                let dir = &self.dirs[d];
                if dir.switching {
                    self.maybe_switch_to_splice(io, d);
                } else if dir.queue.len() <= LOW_WATER {
                    self.rearm_recv(io, d);
                }
            }
            r => self.io_error(io, r),
        }
    }

    fn on_send(&mut self, io: &mut Io, d: usize, c: Completion) {
        let OpMem::Pbuf { bid, off, end } = c.mem else {
            return self.close(io);
        };
        if c.res <= 0 {
            if let Some(bufs) = io.bufs.as_mut() {
                bufs.recycle(bid);
            }
            return self.io_error(io, if c.res == 0 { -libc::EPIPE } else { c.res });
        }
        let off = off + c.res as u32;
        let (_, dst) = self.dir_fds(d);
        let bufs = io.bufs.as_mut().expect("copy path has a buffer ring");
        if off < end {
            self.inflight += 1;
            io.ring
                .send_pbuf(dst, bufs, bid, off, end, self.tok(kind::SEND, d as u8));
            return;
        }
        bufs.recycle(bid);
        self.send_next(io, d);
        let dir = &self.dirs[d];
        if dir.paused && dir.recv_op.is_none() && dir.queue.len() <= LOW_WATER {
            // Resume below the low-water mark, while the queue still feeds the sends.
            self.rearm_recv(io, d);
        }
        let dir = &self.dirs[d];
        if dir.sending {
            return;
        }
        if dir.eof {
            return self.finish_dir(io, d);
        }
        if dir.switching {
            self.maybe_switch_to_splice(io, d);
        }
    }

    /// `--forward auto`: once the receive has ended and every queued buffer is sent, direction
    /// `d` continues on the splice path. Nothing received is still in user space by then, so
    /// no byte can overtake another.
    fn maybe_switch_to_splice(&mut self, io: &mut Io, d: usize) {
        let dir = &mut self.dirs[d];
        if dir.recv_op.is_some() || dir.sending || !dir.queue.is_empty() || dir.eof {
            return;
        }
        dir.switching = false;
        dir.splice = true;
        self.wait_readable(io, d);
    }
}
