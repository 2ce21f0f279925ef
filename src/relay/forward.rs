//! A tunnel: the two directions of a connected CONNECT, each forwarding on one of two paths.
//!
//! - **splice**: wait for readability with a poll (holding nothing), borrow a pipe from the
//!   shard's pool, splice socket -> pipe -> socket, and give the pipe back once it is empty.
//!   Every splice is non-blocking, so no io-wq worker parks on an idle socket.
//! - **copy**: a multishot receive into the shard's provided buffers; what a turn received is
//!   sent at the end of the turn with vectored sends (`MAX_SEND_CHUNKS` buffers each), so
//!   the destination gets large segments instead of one per 16 KiB buffer, and each buffer goes
//!   back to the kernel when the send that carried it completes (its handle drops). A
//!   direction whose queue grows past `HIGH_WATER` cancels its receive (back-pressure) and
//!   re-arms below `LOW_WATER`.
//!
//! On either copy mode, a direction whose receive finds the shard's buffers all held (say,
//! queued for targets that never read) continues on splice instead of waiting for one.
//!
//! With `--forward auto` a direction forwards on copy, and moves to splice when the shard's
//! buffers run short: its destination falls behind while fewer than a quarter of the buffers
//! are free, or none is left. Copy is the faster path on loopback and for ordinary clients
//! (fewer, warmer copies at the receiver: results/2026-12-02-hot-buffers.md); splice is the
//! path that holds no shared buffer while a destination is slow. The move happens only when
//! nothing the direction received is still queued, so bytes keep their order.
//!
//! Short splices and sends continue from where they stopped. EOF in one direction shuts down
//! writing toward the other side once its bytes are out, and the other direction flows on.

use std::collections::VecDeque;

use super::conn::{Conn, Stage};
use super::token::{ConnId, Dir, Op};
use super::Ctx;
use crate::config::ForwardMode;
use crate::proto::Addr;
use crate::uring::{Chunk, Completion, Data, Engine, OpId, Pipe, Sock, SpliceEnd};

/// Copy path: queued buffers per direction before its receive pauses, and where it resumes.
pub(super) const HIGH_WATER: usize = 16;
pub(super) const LOW_WATER: usize = 4;
/// Copy path: buffers carried by one vectored send at most. Two (32 KiB) measured best: one
/// stream's throughput halved at four and eight (results/2026-12-02-hot-buffers.md).
pub(super) const MAX_SEND_CHUNKS: usize = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CopyMode {
    /// The receive runs (or is re-armed as soon as it ends).
    Running,
    /// Back-pressure: the receive was cancelled until the queue drains below LOW_WATER.
    Paused,
    /// `--forward auto`: finishing what the copy path holds, then moving to splice.
    ToSplice,
}

struct CopyFlow {
    recv_op: Option<OpId>,
    /// Received bytes waiting to be sent, in order.
    queue: VecDeque<Chunk>,
    sending: bool,
    /// Listed in `ShardState::copy_flush`: a send starts at the end of this turn.
    flush_listed: bool,
    mode: CopyMode,
    /// The source sent EOF; it is passed on once the queue is empty.
    eof: bool,
}

struct SpliceFlow {
    pipe: Option<Pipe>,
    /// Bytes in the pipe (spliced in, not yet out).
    in_pipe: u32,
    /// The size of the last splice into the pipe.
    last_in: u32,
}

/// One direction of a tunnel.
enum Flow {
    Copy(CopyFlow),
    Splice(SpliceFlow),
    /// EOF was passed on: nothing more flows this way.
    Done,
}

impl Flow {
    fn copy() -> Flow {
        Flow::Copy(CopyFlow {
            recv_op: None,
            queue: VecDeque::new(),
            flush_listed: false,
            sending: false,
            mode: CopyMode::Running,
            eof: false,
        })
    }

    fn splice() -> Flow {
        Flow::Splice(SpliceFlow {
            pipe: None,
            in_pipe: 0,
            last_in: 0,
        })
    }
}

pub(crate) struct Tunnel {
    target: Sock,
    /// The target as the client asked for it (for logs).
    dst: Addr,
    flows: [Flow; 2],
}

/// (source, destination) sockets of direction `d`.
fn ends<'s>(target: &'s Sock, client: &'s Sock, d: Dir) -> (&'s Sock, &'s Sock) {
    match d {
        Dir::Up => (client, target),
        Dir::Down => (target, client),
    }
}

/// What a direction's handler asks of the connection.
enum Next {
    Go,
    Close,
    Fail(i32),
}

/// The parts of a connection a direction's handlers use.
struct Link<'a, 'c, E: Engine> {
    cx: &'a mut Ctx<'c, E>,
    id: ConnId,
    client: &'a Sock,
    inflight: &'a mut u32,
    shutdowns: &'a mut u32,
}

impl<E: Engine> Link<'_, '_, E> {
    fn owner(&self, op: Op) -> crate::uring::Owner {
        self.id.owner(op)
    }
}

impl Tunnel {
    pub(super) fn new(target: Sock, dst: Addr) -> Tunnel {
        Tunnel {
            target,
            dst,
            flows: [Flow::Done, Flow::Done],
        }
    }

    /// (source, destination) sockets of direction `d`.
    fn socks<'s>(&'s self, client: &'s Sock, d: Dir) -> (&'s Sock, &'s Sock) {
        ends(&self.target, client, d)
    }

    fn start<E: Engine>(&mut self, l: &mut Link<'_, '_, E>) {
        for d in Dir::BOTH {
            if l.cx.cfg.forward == ForwardMode::Splice || l.cx.shard.copy_group.is_none() {
                self.flows[d.index()] = Flow::splice();
                self.wait_readable(l, d);
            } else {
                self.flows[d.index()] = Flow::copy();
                self.rearm_recv(l, d);
            }
        }
    }

    /// Direction `d` saw EOF and everything before it was delivered: pass the EOF on.
    fn finish<E: Engine>(&mut self, l: &mut Link<'_, '_, E>, d: Dir) -> Next {
        if let Flow::Splice(s) = std::mem::replace(&mut self.flows[d.index()], Flow::Done) {
            if let Some(p) = s.pipe {
                l.cx.io.give_pipe(p);
            }
        }
        if self.flows.iter().all(|f| matches!(f, Flow::Done)) {
            // Both directions ended: closing sends the last FIN, no shutdown op needed.
            return Next::Close;
        }
        let (_, dst) = self.socks(l.client, d);
        *l.inflight += 1;
        *l.shutdowns += 1;
        l.cx.io.shutdown_write(dst, l.owner(Op::Shutdown(d)));
        Next::Go
    }

    // ---- splice path ----------------------------------------------------------------------

    fn wait_readable<E: Engine>(&mut self, l: &mut Link<'_, '_, E>, d: Dir) {
        let (src, _) = self.socks(l.client, d);
        let events = (libc::POLLIN | libc::POLLRDHUP) as u16 as u32;
        *l.inflight += 1;
        l.cx.io.poll(src, events, l.owner(Op::PollIn(d)));
    }

    fn splice_in<E: Engine>(&mut self, l: &mut Link<'_, '_, E>, d: Dir) {
        let (src, _) = self.socks(l.client, d);
        let Flow::Splice(s) = &self.flows[d.index()] else {
            return;
        };
        let Some(pipe) = &s.pipe else { return };
        *l.inflight += 1;
        l.cx.io.splice(
            SpliceEnd::Sock(src),
            SpliceEnd::Pipe(pipe),
            pipe.capacity(),
            l.owner(Op::SpliceIn(d)),
        );
    }

    fn splice_out<E: Engine>(&mut self, l: &mut Link<'_, '_, E>, d: Dir) {
        let (_, dst) = self.socks(l.client, d);
        let Flow::Splice(s) = &self.flows[d.index()] else {
            return;
        };
        let Some(pipe) = &s.pipe else { return };
        *l.inflight += 1;
        l.cx.io.splice(
            SpliceEnd::Pipe(pipe),
            SpliceEnd::Sock(dst),
            s.in_pipe,
            l.owner(Op::SpliceOut(d)),
        );
    }

    fn on_poll_in<E: Engine>(&mut self, l: &mut Link<'_, '_, E>, d: Dir, res: i32) -> Next {
        if res < 0 {
            return Next::Fail(res);
        }
        let Flow::Splice(s) = &mut self.flows[d.index()] else {
            return Next::Go;
        };
        if s.pipe.is_none() {
            match l.cx.io.take_pipe() {
                Ok(p) => s.pipe = Some(p),
                Err(e) => {
                    tracing::info!(error = %e, "no pipe for splice");
                    return Next::Close;
                }
            }
        }
        self.splice_in(l, d);
        Next::Go
    }

    fn on_splice_in<E: Engine>(&mut self, l: &mut Link<'_, '_, E>, d: Dir, res: i32) -> Next {
        let Flow::Splice(s) = &mut self.flows[d.index()] else {
            return Next::Go;
        };
        if res > 0 {
            s.in_pipe += res as u32;
            s.last_in = res as u32;
            self.splice_out(l, d);
            return Next::Go;
        }
        if res == 0 {
            return self.finish(l, d);
        }
        if res == -libc::EAGAIN {
            // Nothing to read after all: hold no pipe while waiting.
            if let Some(p) = s.pipe.take() {
                l.cx.io.give_pipe(p);
            }
            self.wait_readable(l, d);
            return Next::Go;
        }
        Next::Fail(res)
    }

    fn on_splice_out<E: Engine>(&mut self, l: &mut Link<'_, '_, E>, d: Dir, res: i32) -> Next {
        if res == -libc::EAGAIN {
            let (_, dst) = self.socks(l.client, d);
            *l.inflight += 1;
            l.cx.io
                .poll(dst, libc::POLLOUT as u32, l.owner(Op::PollOut(d)));
            return Next::Go;
        }
        if res <= 0 {
            return Next::Fail(if res == 0 { -libc::EPIPE } else { res });
        }
        let Flow::Splice(s) = &mut self.flows[d.index()] else {
            return Next::Go;
        };
        s.in_pipe = s.in_pipe.saturating_sub(res as u32);
        if s.in_pipe > 0 {
            self.splice_out(l, d);
            return Next::Go;
        }
        let full = s.pipe.as_ref().is_some_and(|p| s.last_in >= p.capacity());
        if full {
            // The last read filled the pipe: more is probably waiting, read again at once.
            self.splice_in(l, d);
            return Next::Go;
        }
        if let Some(p) = s.pipe.take() {
            l.cx.io.give_pipe(p);
        }
        self.wait_readable(l, d);
        Next::Go
    }

    fn on_poll_out<E: Engine>(&mut self, l: &mut Link<'_, '_, E>, d: Dir, res: i32) -> Next {
        if res < 0 {
            return Next::Fail(res);
        }
        match &mut self.flows[d.index()] {
            Flow::Copy(f) => {
                // A send that found no room (EAGAIN) waited for this: send again.
                f.sending = false;
                self.send_next(l, d);
            }
            _ => self.splice_out(l, d),
        }
        Next::Go
    }

    // ---- copy path ------------------------------------------------------------------------

    /// (Re-)arms the multishot receive of direction `d` if it should be running.
    fn rearm_recv<E: Engine>(&mut self, l: &mut Link<'_, '_, E>, d: Dir) {
        let Some(group) = l.cx.shard.copy_group else {
            return;
        };
        let (src, _) = ends(&self.target, l.client, d);
        let Flow::Copy(f) = &mut self.flows[d.index()] else {
            return;
        };
        if f.eof || f.recv_op.is_some() || f.mode == CopyMode::ToSplice {
            return;
        }
        f.mode = CopyMode::Running;
        *l.inflight += 1;
        f.recv_op = Some(l.cx.io.recv_multi(src, group, l.id.owner(Op::Recv(d))));
    }

    fn send_next<E: Engine>(&mut self, l: &mut Link<'_, '_, E>, d: Dir) {
        let (_, dst) = ends(&self.target, l.client, d);
        let Flow::Copy(f) = &mut self.flows[d.index()] else {
            return;
        };
        let n = f.queue.len().min(MAX_SEND_CHUNKS);
        if n == 0 {
            f.sending = false;
            return;
        }
        let chunks: Vec<Chunk> = f.queue.drain(..n).collect();
        f.sending = true;
        *l.inflight += 1;
        l.cx.io.send_bufs(dst, chunks, l.id.owner(Op::Send(d)));
    }

    /// The end of the turn for a direction listed in `ShardState::copy_flush`: send what the
    /// turn received, unless a send is still out (its completion sends the rest).
    fn flush_turn<E: Engine>(&mut self, l: &mut Link<'_, '_, E>, d: Dir) {
        let Flow::Copy(f) = &mut self.flows[d.index()] else {
            return;
        };
        f.flush_listed = false;
        if !f.sending {
            self.send_next(l, d);
        }
    }

    fn on_recv<E: Engine>(&mut self, l: &mut Link<'_, '_, E>, d: Dir, c: Completion) -> Next {
        let auto = l.cx.cfg.forward == ForwardMode::Auto;
        let Flow::Copy(f) = &mut self.flows[d.index()] else {
            return Next::Go;
        };
        if !c.more {
            f.recv_op = None;
        }
        if c.res > 0 {
            let Data::Picked(buf) = c.data else {
                return Next::Close;
            };
            f.queue.push_back(Chunk::new(buf, c.res as u32));
            if !f.sending && !f.flush_listed {
                // Sent at the end of the turn, with whatever else this turn receives.
                f.flush_listed = true;
                l.cx.shard.copy_flush.push((l.id, d));
            }
            let stalled = f.queue.len() >= HIGH_WATER;
            // The pool is looked at only for a stalled direction, never per receive.
            let scarce = stalled && auto && f.mode != CopyMode::ToSplice && {
                let free = l.cx.shard.copy_group.and_then(|g| l.cx.io.buf_pool(g));
                free.is_none_or(|(_, available)| available < l.cx.shard.copy_scarce_below)
            };
            let stop = if scarce {
                // A destination that does not keep up while buffers run short: finish what
                // the copy path holds, then continue with splice, which holds no shared
                // buffers while the destination is slow.
                f.mode = CopyMode::ToSplice;
                l.cx.metrics.copy_to_splice.inc();
                true
            } else if stalled && f.mode == CopyMode::Running {
                f.mode = CopyMode::Paused;
                true
            } else {
                false
            };
            if stop {
                if let Some(op) = f.recv_op {
                    l.cx.io.cancel(op);
                }
            }
            if !c.more {
                match f.mode {
                    CopyMode::ToSplice => self.maybe_switch_to_splice(l, d),
                    CopyMode::Running => self.rearm_recv(l, d),
                    CopyMode::Paused => {}
                }
            }
            return Next::Go;
        }
        match c.res {
            0 => {
                f.eof = true;
                if !f.sending && f.queue.is_empty() {
                    return self.finish(l, d);
                }
                Next::Go
            }
            r if r == -libc::ENOBUFS => {
                l.cx.metrics.buffer_exhausted.inc();
                // The ring ran dry in this turn; spare buffers refill it at the end of the turn.
                let spares = l.cx.shard.copy_group.and_then(|g| l.cx.io.buf_pool(g));
                let pool_empty = spares.is_none_or(|(_, available)| available == 0);
                if pool_empty {
                    // Every buffer is held, e.g. queued for destinations that never read:
                    // waiting could be forever, so this direction (in copy mode too) continues
                    // on splice, which needs no pool buffer.
                    f.mode = CopyMode::ToSplice;
                    l.cx.metrics.copy_to_splice.inc();
                    self.maybe_switch_to_splice(l, d);
                } else {
                    l.cx.shard.starved.push((l.id, d));
                }
                Next::Go
            }
            r if r == -libc::ECANCELED => {
                if f.mode == CopyMode::ToSplice {
                    self.maybe_switch_to_splice(l, d);
                } else if f.queue.len() <= LOW_WATER {
                    self.rearm_recv(l, d);
                }
                Next::Go
            }
            r => Next::Fail(r),
        }
    }

    fn on_send<E: Engine>(&mut self, l: &mut Link<'_, '_, E>, d: Dir, c: Completion) -> Next {
        let Data::Chunks(chunks) = c.data else {
            return Next::Close;
        };
        // -EAGAIN: no room in the socket buffer, reported rather than waited for (the kernel can
        // run a send in a worker, where a non-blocking socket does not wait). Nothing was sent.
        let again = c.res == -libc::EAGAIN;
        if c.res <= 0 && !again {
            return Next::Fail(if c.res == 0 { -libc::EPIPE } else { c.res });
        }
        let Flow::Copy(f) = &mut self.flows[d.index()] else {
            return Next::Go;
        };
        // Buffers that are out drop here, which gives them back to the kernel; what was not
        // sent goes back to the front of the queue, in order.
        let mut sent = if again { 0 } else { c.res as u32 };
        let mut rest = Vec::new();
        for mut chunk in chunks {
            if sent >= chunk.len() {
                sent -= chunk.len();
            } else {
                chunk.off += sent;
                sent = 0;
                rest.push(chunk);
            }
        }
        for chunk in rest.into_iter().rev() {
            f.queue.push_front(chunk);
        }
        if again {
            // Send again once the socket is writable; `sending` stays set meanwhile, so
            // nothing overtakes the requeued bytes.
            let (_, dst) = self.socks(l.client, d);
            *l.inflight += 1;
            l.cx.io
                .poll(dst, libc::POLLOUT as u32, l.id.owner(Op::PollOut(d)));
            return Next::Go;
        }
        self.send_next(l, d);
        let Flow::Copy(f) = &self.flows[d.index()] else {
            return Next::Go;
        };
        if f.mode == CopyMode::Paused && f.recv_op.is_none() && f.queue.len() <= LOW_WATER {
            // Resume below the low-water mark, while the queue still feeds the sends.
            self.rearm_recv(l, d);
        }
        let Flow::Copy(f) = &self.flows[d.index()] else {
            return Next::Go;
        };
        if f.sending {
            return Next::Go;
        }
        if f.eof {
            return self.finish(l, d);
        }
        if f.mode == CopyMode::ToSplice {
            self.maybe_switch_to_splice(l, d);
        }
        Next::Go
    }

    /// `--forward auto`: once the receive has ended and every queued buffer is sent, direction
    /// `d` continues on the splice path. Nothing received is still in user space by then, so
    /// no byte can overtake another.
    fn maybe_switch_to_splice<E: Engine>(&mut self, l: &mut Link<'_, '_, E>, d: Dir) {
        let Flow::Copy(f) = &self.flows[d.index()] else {
            return;
        };
        if f.recv_op.is_some() || f.sending || !f.queue.is_empty() || f.eof {
            return;
        }
        self.flows[d.index()] = Flow::splice();
        self.wait_readable(l, d);
    }

    // ---- closing --------------------------------------------------------------------------

    /// Cancels what can still wait; `waiting` is the number of ops in flight other than
    /// shutdowns. Queued buffers go back to the kernel now.
    pub(super) fn close<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, client: &Sock, waiting: u32) {
        let recvs: Vec<OpId> = self
            .flows
            .iter()
            .filter_map(|f| match f {
                Flow::Copy(c) => c.recv_op,
                _ => None,
            })
            .collect();
        if !recvs.is_empty() && waiting == recvs.len() as u32 {
            // Only multishot receives can still wait (a client's reset while the other
            // direction listens): cancel them by id, a hash lookup instead of a scan of every
            // pending op (which costs about 5% of the relay's CPU at high connection rates).
            for op in recvs {
                cx.io.cancel(op);
            }
        } else if waiting > 0 {
            cx.io.cancel_all(client);
            cx.io.cancel_all(&self.target);
        }
        for f in &mut self.flows {
            if let Flow::Copy(c) = f {
                c.queue.clear();
            }
        }
    }

    /// A completion after close: keep the pipe's byte count right.
    pub(super) fn settle(&mut self, op: Op, c: &Completion) {
        match op {
            Op::SpliceIn(d) if c.res > 0 => {
                if let Flow::Splice(s) = &mut self.flows[d.index()] {
                    s.in_pipe += c.res as u32;
                }
            }
            Op::SpliceOut(d) if c.res > 0 => {
                if let Flow::Splice(s) = &mut self.flows[d.index()] {
                    s.in_pipe = s.in_pipe.saturating_sub(c.res as u32);
                }
            }
            _ => {}
        }
    }

    pub(super) fn release<E: Engine>(self, cx: &mut Ctx<'_, E>) {
        cx.io.close(self.target);
        for f in self.flows {
            if let Flow::Splice(SpliceFlow {
                pipe: Some(p),
                in_pipe: 0,
                ..
            }) = f
            {
                cx.io.give_pipe(p);
            }
            // A pipe with bytes left in it must not be lent again: dropping it closes it.
        }
    }

    pub(super) fn dst(&self) -> &Addr {
        &self.dst
    }
}

impl Conn {
    fn with_tunnel<E: Engine>(
        &mut self,
        cx: &mut Ctx<'_, E>,
        f: impl FnOnce(&mut Tunnel, &mut Link<'_, '_, E>) -> Next,
    ) {
        let next = {
            let Conn {
                id,
                client,
                stage,
                inflight,
                shutdowns,
                ..
            } = self;
            let Stage::Tunnel(t) = stage else {
                return;
            };
            let mut l = Link {
                cx,
                id: *id,
                client,
                inflight,
                shutdowns,
            };
            f(t, &mut l)
        };
        match next {
            Next::Go => {}
            Next::Close => self.close(cx),
            Next::Fail(res) => self.io_error(cx, res),
        }
    }

    /// The success reply is out: start both directions (and the idle timer).
    pub(super) fn start_forwarding<E: Engine>(&mut self, cx: &mut Ctx<'_, E>) {
        if let Some(idle) = cx.cfg.idle_timeout {
            self.arm_timer(cx, idle);
        }
        self.with_tunnel(cx, |t, l| {
            t.start(l);
            Next::Go
        });
    }

    pub(super) fn on_forward<E: Engine>(
        &mut self,
        cx: &mut Ctx<'_, E>,
        op: Op,
        d: Dir,
        c: Completion,
    ) {
        self.with_tunnel(cx, |t, l| match op {
            Op::PollIn(_) => t.on_poll_in(l, d, c.res),
            Op::SpliceIn(_) => t.on_splice_in(l, d, c.res),
            Op::SpliceOut(_) => t.on_splice_out(l, d, c.res),
            Op::PollOut(_) => t.on_poll_out(l, d, c.res),
            Op::Recv(_) => t.on_recv(l, d, c),
            Op::Send(_) => t.on_send(l, d, c),
            _ => Next::Go,
        });
    }

    /// The end of a loop turn: send what copy-path direction `d` received in it.
    pub(crate) fn flush_copy<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, d: Dir) {
        if self.is_closing() {
            return;
        }
        self.with_tunnel(cx, |t, l| {
            t.flush_turn(l, d);
            Next::Go
        });
    }

    /// Re-arms a copy-path receive that ran out of buffers (the server calls this once some
    /// are back).
    pub(crate) fn rearm_recv<E: Engine>(&mut self, cx: &mut Ctx<'_, E>, d: Dir) {
        if self.is_closing() {
            return;
        }
        self.with_tunnel(cx, |t, l| {
            t.rearm_recv(l, d);
            Next::Go
        });
    }
}
