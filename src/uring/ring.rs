//! The io_uring ring, its op table and everything registered with it: provided buffer pools,
//! the fixed-file table, the pipe pool and the timer wheel. The one place where SQEs are built
//! and pushed.
//!
//! Every submission moves the memory its SQE points at (a receive buffer, a send buffer, a
//! buffer handle, a sockaddr, a timespec) into an op slot. The slot keeps it until the op's
//! *final* completion (a CQE without `IORING_CQE_F_MORE`), then hands it back inside the
//! [`Completion`]. Callers therefore never hold raw pointers into in-flight memory, and the
//! submission methods are safe: cancelling an op or dropping a connection cannot free memory
//! the kernel still writes to. Dropping the ring cancels every op and waits for them; if they
//! do not finish, their memory (and the buffer pools) is leaked rather than freed.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use socket2::{Domain, SockAddr, Socket, Type};

use super::bufring::{BufPool, Group, PBuf};
use super::files::{FileTable, Sock, SockRepr, Target};
use super::pipes::{Pipe, PipePool};
use super::timer::Wheel;
use super::{Chunk, Completion, Data, Engine, OpId, Owner, Source, SpliceEnd};

/// Builds an SQE for either kind of [`Target`]: `$f` is bound to `types::Fd` or `types::Fixed`.
macro_rules! on_target {
    ($t:expr, $f:ident => $e:expr) => {
        match $t {
            Target::Fd(fd) => {
                let $f = types::Fd(fd);
                $e
            }
            Target::Fixed(i) => {
                let $f = types::Fixed(i);
                $e
            }
        }
    };
}

/// A `send` SQE (no SIGPIPE), to `dest` when given (a datagram to an unconnected socket). The
/// caller pushes it and keeps `buf` and `dest` alive until the op's final completion.
fn send_sqe(
    fd: Target,
    buf: *const u8,
    len: u32,
    dest: Option<(*const libc::sockaddr, libc::socklen_t)>,
) -> squeue::Entry {
    let (addr, addr_len) = dest.unwrap_or((std::ptr::null(), 0));
    on_target!(fd, f => opcode::Send::new(f, buf, len)
        .flags(libc::MSG_NOSIGNAL)
        .dest_addr(addr)
        .dest_addr_len(addr_len)
        .build())
}

/// Memory an in-flight op owns until its final completion (handed back as [`Data`]).
#[derive(Debug, Default)]
enum OpMem {
    #[default]
    None,
    /// A heap buffer: receives write into `buf[off..]`, sends read `buf[off..]`.
    Buf { buf: Vec<u8>, off: usize },
    /// A destination for `connect` (held, not read: the kernel reads it).
    Addr(#[allow(dead_code)] Box<SockAddr>),
    /// The expiry of a `Timeout` op (held, not read).
    Time(#[allow(dead_code)] Box<types::Timespec>),
    /// Provided-buffer ranges that a vectored send reads; the slot's message bundle points
    /// at them.
    Chunks(Vec<Chunk>),
    /// A provided buffer sent with `sendmsg` to `dest` (GSO segments of `gso` bytes when
    /// non-zero). The op slot's message bundle points at it.
    PbufMsg {
        buf: PBuf,
        off: u32,
        end: u32,
        gso: u16,
        dest: SocketAddr,
    },
    /// A heap datagram and its destination.
    BufTo {
        buf: Vec<u8>,
        #[allow(dead_code)]
        addr: Box<SockAddr>,
    },
}

/// The `msghdr` of a `sendmsg` from a provided buffer, with everything it points at except the
/// payload: one iovec, the destination and room for a `UDP_SEGMENT` control message. Boxed in
/// its op slot, so its address is stable while the kernel reads it; reused by later ops of the
/// same slot.
struct MsgBundle {
    hdr: libc::msghdr,
    iov: libc::iovec,
    name: SockAddr,
    cmsg: SegmentCmsg,
    /// The iovecs of a vectored stream send (`send_bufs`), one per chunk.
    iovs: Vec<libc::iovec>,
}

impl MsgBundle {
    fn new() -> Box<MsgBundle> {
        Box::new(MsgBundle {
            // SAFETY: msghdr is plain old data; all-zero is a valid value.
            hdr: unsafe { std::mem::zeroed() },
            iov: libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
            name: SockAddr::from(SocketAddr::from(([0, 0, 0, 0], 0))),
            // SAFETY: as above, for cmsghdr.
            cmsg: unsafe { std::mem::zeroed() },
            iovs: Vec::new(),
        })
    }
}

/// A `UDP_SEGMENT` control message: `CMSG_SPACE(sizeof(u16))` bytes.
#[repr(C)]
struct SegmentCmsg {
    hdr: libc::cmsghdr,
    size: u16,
    _pad: [u8; 6],
}

const _: () = assert!(std::mem::size_of::<SegmentCmsg>() == 24);

/// An op slot's owner: someone who wants the completion, or nobody (cancellations).
#[derive(Clone, Copy)]
enum Waiter {
    Owner(Owner),
    Nobody,
}

struct OpSlot {
    generation: u32,
    waiter: Waiter,
    mem: OpMem,
    /// The buffer group a buffer-select receive picks from.
    group: Option<Group>,
    /// An accept: each successful completion carries a new fd.
    accepts: bool,
    /// The message header of this slot's `sendmsg` ops, allocated on the slot's first one.
    msg: Option<Box<MsgBundle>>,
}

/// The op table index in an op's `user_data` (the generation is in the high 32 bits).
fn slot_index(ud: u64) -> usize {
    (ud & 0xffff_ffff) as usize
}

/// Applies one set of ring setup flags to a builder.
type SetupFlags = fn(&mut io_uring::Builder);

/// A snapshot of what a ring holds.
#[derive(Debug)]
pub(crate) struct RingStats {
    pub ops_in_flight: usize,
    pub fixed_in_use: u32,
    pub pipes_open: u32,
    pub pipes_idle: u32,
    /// Per buffer group: buffers the application holds.
    pub buffers_held: Vec<u32>,
}

/// Sizes of what a ring registers.
pub(crate) struct RingSpec {
    pub entries: u32,
    /// Fixed-file slots to ask for; the kernel caps a table at RLIMIT_NOFILE.
    pub fixed_files: u32,
    pub pipe_size: usize,
    pub pipes_idle: usize,
    /// Most io-wq workers (bounded, unbounded) the ring may start.
    pub iowq_workers: [u32; 2],
}

pub(crate) struct Ring {
    ring: IoUring,
    /// The template every multishot recvmsg points at: only its name and control lengths are
    /// read. Boxed so its address is stable; it lives as long as the ring.
    recvmsg_hdr: Box<libc::msghdr>,
    slots: Vec<OpSlot>,
    free: Vec<u32>,
    in_flight: usize,
    /// Completions reaped early (to make room in a busy ring) or of ops the kernel refused,
    /// handed out by the next `reap`.
    aside: Vec<Completion>,
    pools: Vec<Rc<BufPool>>,
    files: FileTable,
    pipes: PipePool,
    wheel: Wheel,
    /// When the earliest ring timeout in flight for the wheel fires (None: none in flight).
    wheel_armed_at: Option<Instant>,
    /// Which setup flags the kernel took, for the start-up log line.
    pub setup: &'static str,
}

impl Ring {
    /// Builds the ring with the cheapest task-running mode the kernel accepts:
    /// SINGLE_ISSUER + DEFER_TASKRUN (completions run only when this thread waits), then
    /// COOP_TASKRUN, then the plain ring.
    pub(crate) fn new(spec: &RingSpec, now: Instant) -> io::Result<Ring> {
        let cq = spec.entries * 8;
        let attempts: [(&'static str, SetupFlags); 3] = [
            ("single_issuer+defer_taskrun", |b| {
                b.setup_single_issuer().setup_defer_taskrun();
            }),
            ("coop_taskrun", |b| {
                b.setup_coop_taskrun();
            }),
            ("plain", |_| {}),
        ];
        let mut last_err = None;
        for (name, apply) in attempts {
            let mut builder = IoUring::builder();
            builder.setup_cqsize(cq).setup_submit_all();
            apply(&mut builder);
            match builder.build(spec.entries) {
                Ok(ring) => {
                    // SAFETY: msghdr is plain old data; all-zero is a valid (empty) header.
                    let mut hdr: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
                    hdr.msg_namelen = super::recvmsg::NAME_LEN;
                    hdr.msg_controllen = super::recvmsg::CONTROL_LEN as usize;
                    let mut workers = spec.iowq_workers;
                    let _ = ring.submitter().register_iowq_max_workers(&mut workers);
                    let files = FileTable::new(&ring.submitter(), spec.fixed_files);
                    return Ok(Ring {
                        ring,
                        recvmsg_hdr: hdr,
                        slots: Vec::with_capacity(1024),
                        free: Vec::with_capacity(1024),
                        in_flight: 0,
                        aside: Vec::new(),
                        pools: Vec::new(),
                        files,
                        pipes: PipePool::new(spec.pipes_idle, spec.pipe_size),
                        wheel: Wheel::new(now),
                        wheel_armed_at: None,
                        setup: name,
                    });
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("io_uring setup failed")))
    }

    /// Registers a provided buffer pool of `entries` (a power of two) buffers of `buf_size`
    /// bytes, of which the kernel is offered `exposed` at a time (see [`BufPool`]). Pages are
    /// touched lazily, so unused buffers cost no resident memory.
    pub(crate) fn add_buf_group(
        &mut self,
        entries: u16,
        buf_size: u32,
        exposed: u16,
    ) -> io::Result<Group> {
        let group = Group(self.pools.len() as u16);
        let pool = Rc::new(BufPool::for_ring(group, entries, buf_size, exposed)?);
        let addr = pool.ring_addr().expect("a ring pool has an entry ring");
        // SAFETY: the entry ring is page aligned, sized for `entries`, and owned by `pool`,
        // which this ring keeps (an `Rc`) until it has unregistered the group (Drop), or leaks
        // when its ops cannot be drained.
        unsafe {
            self.ring
                .submitter()
                .register_buf_ring_with_flags(addr, entries, group.bgid(), 0)?
        };
        pool.publish();
        self.pools.push(pool);
        Ok(group)
    }

    /// Moves an accepted socket into the fixed-file table (if there is room).
    pub(crate) fn install(&mut self, fd: OwnedFd) -> Sock {
        self.files.install(&self.ring.submitter(), fd)
    }

    pub(crate) fn fixed_files(&self) -> u32 {
        self.files.size()
    }

    /// What the ring holds right now, for `--stats-interval` and the soak.
    pub(crate) fn stats(&self) -> RingStats {
        let (pipes_open, pipes_idle) = self.pipes.counts();
        RingStats {
            ops_in_flight: self.in_flight,
            fixed_in_use: self.files.in_use(),
            pipes_open,
            pipes_idle,
            buffers_held: self.pools.iter().map(|p| p.held()).collect(),
        }
    }

    fn alloc(&mut self, waiter: Waiter, mem: OpMem, group: Option<Group>) -> u64 {
        let idx = match self.free.pop() {
            Some(i) => {
                let s = &mut self.slots[i as usize];
                s.waiter = waiter;
                s.mem = mem;
                s.group = group;
                s.accepts = false;
                i
            }
            None => {
                self.slots.push(OpSlot {
                    generation: 0,
                    waiter,
                    mem,
                    group,
                    accepts: false,
                    msg: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let s = &self.slots[idx as usize];
        self.in_flight += 1;
        u64::from(idx) | (u64::from(s.generation) << 32)
    }

    /// Pushes one SQE, flushing the submission queue to the kernel when it is full.
    ///
    /// When the kernel is busy (`EBUSY`: its completion queue is backed up), completions are
    /// moved aside (handed out by the next [`Ring::reap`]) to make room, and the push retried.
    /// When the kernel refuses the submission for any other reason, the op fails instead of
    /// the shard: it completes at the next `reap` with that error and its memory, like an op
    /// the kernel failed.
    ///
    /// # Safety
    /// Every pointer in `sqe` must stay valid until the op's final completion. Callers in this
    /// file guarantee that by pointing only into memory moved into the op slot (heap memory,
    /// which does not move when the slot table grows) or into fds the caller keeps open.
    unsafe fn push(&mut self, sqe: squeue::Entry) {
        loop {
            // SAFETY: forwarded from this function's contract.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return;
            }
            // The SQ is full: hand what is queued to the kernel and try again.
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    let mut aside = std::mem::take(&mut self.aside);
                    let before = aside.len();
                    self.reap_cq(&mut aside);
                    let moved = aside.len() > before;
                    self.aside = aside;
                    if !moved {
                        // Nothing to reap yet: wait for one completion rather than spin.
                        let _ = self.ring.submit_and_wait(1);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "io_uring refused a submission; failing the op");
                    let errno = e.raw_os_error().unwrap_or(libc::EIO);
                    self.fail_unsubmitted(sqe.get_user_data(), errno);
                    return;
                }
            }
        }
    }

    /// An op that never reached the kernel: its slot completes now (at the next `reap`) with
    /// `-errno`, handing back its memory.
    fn fail_unsubmitted(&mut self, ud: u64, errno: i32) {
        let idx = slot_index(ud);
        let slot = &mut self.slots[idx];
        let mem = std::mem::take(&mut slot.mem);
        let waiter = slot.waiter;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(idx as u32);
        self.in_flight -= 1;
        if let Waiter::Owner(owner) = waiter {
            let data = Self::returned(mem, -errno, None, None);
            self.aside.push(Completion {
                owner,
                res: -errno,
                more: false,
                data,
            });
        }
    }

    fn push_plain(&mut self, sqe: squeue::Entry, waiter: Waiter) -> OpId {
        let ud = self.alloc(waiter, OpMem::None, None);
        // SAFETY: the SQE points at no memory. Its fd (or fixed slot) stays valid until the
        // op's final completion: connections release sockets only with no op in flight.
        // Cancel ops are not counted by connections, but SQEs are consumed in order and a
        // cancel completes inline at submission, so it runs before any later reuse of the fd.
        unsafe { self.push(sqe.user_data(ud)) };
        OpId(ud)
    }

    /// Multishot accept on a listening socket; accepted sockets come back non-blocking and
    /// close-on-exec, as [`Data::Accepted`].
    pub(crate) fn accept_multi(&mut self, listener: RawFd, owner: Owner) -> OpId {
        let sqe = opcode::AcceptMulti::new(types::Fd(listener))
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build();
        let op = self.push_plain(sqe, Waiter::Owner(owner));
        self.slots[slot_index(op.0)].accepts = true;
        op
    }

    /// Cancels every op on a plain fd (a listener).
    pub(crate) fn cancel_fd(&mut self, fd: RawFd) {
        self.cancel_target(Target::Fd(fd));
    }

    fn cancel_target(&mut self, fd: Target) {
        let sqe = on_target!(fd, f =>
            opcode::AsyncCancel2::new(types::CancelBuilder::fd(f).all()).build());
        self.push_plain(sqe, Waiter::Nobody);
    }

    /// Moves `buf` into a new op slot, ready for the kernel to fill `buf[buf.len()..capacity]`.
    /// The buffer is zero-filled to its capacity first so that it is always initialised; on
    /// completion it is truncated to `off + res`. Returns (user_data, ptr, len).
    fn alloc_fill_buf(&mut self, mut buf: Vec<u8>, owner: Owner) -> (u64, *mut u8, u32) {
        if buf.capacity() == buf.len() {
            buf.reserve(64);
        }
        let off = buf.len();
        buf.resize(buf.capacity(), 0);
        let ptr = buf[off..].as_mut_ptr();
        let len = (buf.len() - off) as u32;
        (
            self.alloc(Waiter::Owner(owner), OpMem::Buf { buf, off }, None),
            ptr,
            len,
        )
    }

    /// Reads from a pipe into the spare capacity of `buf` (see `alloc_fill_buf`): the
    /// wake-up pipes of the resolver and of the main thread.
    pub(crate) fn read(&mut self, fd: RawFd, buf: Vec<u8>, owner: Owner) -> OpId {
        let (ud, ptr, len) = self.alloc_fill_buf(buf, owner);
        let sqe = opcode::Read::new(types::Fd(fd), ptr, len)
            .offset(u64::MAX)
            .build();
        // SAFETY: the kernel writes into the Vec's heap block, which moved (without moving the
        // block) into this op's slot and stays there until the final completion returns it.
        unsafe { self.push(sqe.user_data(ud)) };
        OpId(ud)
    }

    /// A relative timeout that completes with `-ETIME` when it expires.
    fn timeout(&mut self, after: Duration, owner: Owner) -> OpId {
        let ts = Box::new(
            types::Timespec::new()
                .sec(after.as_secs())
                .nsec(after.subsec_nanos()),
        );
        let ptr: *const types::Timespec = &*ts;
        let ud = self.alloc(Waiter::Owner(owner), OpMem::Time(ts), None);
        let sqe = opcode::Timeout::new(ptr).build();
        // SAFETY: the timespec is a heap block owned by this op's slot until its completion.
        unsafe { self.push(sqe.user_data(ud)) };
        OpId(ud)
    }

    /// Moves every timer due at `now` into `out`.
    pub(crate) fn expire_timers(&mut self, now: Instant, out: &mut Vec<Owner>) {
        self.wheel.expire(now, out);
    }

    /// Keeps one ring timeout (completing to `owner`) in flight for the wheel's earliest entry.
    /// A full scan runs only when no timeout is armed; otherwise only entries inserted since
    /// the last turn are checked, and an extra timeout is armed if one of them is due before
    /// the armed one. Call [`Ring::wheel_fired`] when that owner's completion arrives.
    pub(crate) fn arm_wheel(&mut self, now: Instant, owner: Owner) {
        let new_earliest = self.wheel.take_new_earliest();
        let due = match self.wheel_armed_at {
            None => match self.wheel.next_wait(now) {
                Some(wait) => now + wait,
                None => return,
            },
            Some(armed) => match new_earliest {
                Some(t) if t + super::timer::TICK < armed => t,
                _ => return,
            },
        };
        let wait = due
            .saturating_duration_since(now)
            .max(Duration::from_millis(1));
        self.timeout(wait, owner);
        self.wheel_armed_at = Some(due);
    }

    /// The wheel's ring timeout fired: any firing may leave the rest of the wheel uncovered,
    /// so the next `arm_wheel` recomputes.
    pub(crate) fn wheel_fired(&mut self) {
        self.wheel_armed_at = None;
    }

    /// Publishes every pool's returned buffers to the kernel.
    pub(crate) fn publish_buffers(&mut self) {
        for p in &self.pools {
            p.publish();
        }
    }

    /// Submits everything queued and waits for at least `want` completions.
    pub(crate) fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        // Completions set aside are ready now: submit without sleeping.
        let want = if self.aside.is_empty() { want } else { 0 };
        match self.ring.submit_and_wait(want) {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::ETIME)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Submits what is queued and runs deferred completions, without sleeping.
    pub(crate) fn submit_nowait(&mut self) -> io::Result<()> {
        let queued = self.ring.submission().len() as u32;
        // SAFETY: no argument pointer is passed; GETEVENTS with min_complete 0 only runs the
        // ring's deferred task work and returns.
        let r = unsafe {
            self.ring.submitter().enter::<libc::sigset_t>(
                queued,
                0,
                io_uring::EnterFlags::GETEVENTS.bits(),
                None,
            )
        };
        match r {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// True if completions are waiting to be reaped.
    pub(crate) fn has_completions(&mut self) -> bool {
        if !self.aside.is_empty() {
            return true;
        }
        let mut cq = self.ring.completion();
        cq.sync();
        !cq.is_empty()
    }

    /// Moves every available completion into `out` (those set aside first), releasing
    /// finished op slots.
    pub(crate) fn reap(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.aside);
        self.reap_cq(out);
    }

    /// The memory an op hands back, as the owner sees it.
    fn returned(mem: OpMem, res: i32, picked: Option<PBuf>, accepted: Option<OwnedFd>) -> Data {
        match (picked, accepted, mem) {
            (Some(buf), _, _) => Data::Picked(buf),
            (None, Some(fd), _) => Data::Accepted(fd),
            (None, None, OpMem::Buf { mut buf, off }) => {
                buf.truncate(off + res.max(0) as usize);
                Data::Buf { buf, off }
            }
            (None, None, OpMem::Chunks(chunks)) => Data::Chunks(chunks),
            (
                None,
                None,
                OpMem::PbufMsg {
                    buf,
                    off,
                    end,
                    gso,
                    dest,
                },
            ) => Data::PbufMsg {
                buf,
                off,
                end,
                gso,
                dest,
            },
            (None, None, OpMem::BufTo { buf, .. }) => Data::Datagram(buf),
            _ => Data::None,
        }
    }

    /// Moves the kernel's completions into `out`.
    fn reap_cq(&mut self, out: &mut Vec<Completion>) {
        let mut cq = self.ring.completion();
        cq.sync();
        for cqe in &mut cq {
            let ud = cqe.user_data();
            let idx = slot_index(ud);
            let more = cqueue::more(cqe.flags());
            let slot = &mut self.slots[idx];
            debug_assert_eq!(slot.generation, (ud >> 32) as u32);
            let waiter = slot.waiter;
            let group = slot.group;
            let accepts = slot.accepts;
            let mem = if more {
                OpMem::None
            } else {
                let mem = std::mem::take(&mut slot.mem);
                slot.generation = slot.generation.wrapping_add(1);
                self.free.push(idx as u32);
                self.in_flight -= 1;
                mem
            };
            let res = cqe.result();
            // A buffer the kernel picked becomes the application's now, whoever waits.
            let picked = cqueue::buffer_select(cqe.flags())
                .zip(group)
                .and_then(|(bid, g)| self.pools.get(g.0 as usize)?.claim(bid));
            let accepted = (accepts && res >= 0).then(|| {
                // SAFETY: a successful accept completion carries a new fd that nothing else
                // owns; it is wrapped here, once, and handed to the owner.
                unsafe { OwnedFd::from_raw_fd(res) }
            });
            let Waiter::Owner(owner) = waiter else {
                continue;
            };
            out.push(Completion {
                owner,
                res,
                more,
                data: Self::returned(mem, res, picked, accepted),
            });
        }
    }
}

impl Engine for Ring {
    fn recv(&mut self, sock: &Sock, buf: Vec<u8>, owner: Owner) -> OpId {
        let (ud, ptr, len) = self.alloc_fill_buf(buf, owner);
        let sqe = on_target!(sock.target(), f => opcode::Recv::new(f, ptr, len).build());
        // SAFETY: the kernel writes into the Vec's heap block, which moved (without moving the
        // block) into this op's slot and stays there until the final completion returns it.
        unsafe { self.push(sqe.user_data(ud)) };
        OpId(ud)
    }

    fn send(&mut self, sock: &Sock, buf: Vec<u8>, off: usize, owner: Owner) -> OpId {
        let off = off.min(buf.len());
        let ptr = buf[off..].as_ptr();
        let len = (buf.len() - off) as u32;
        let ud = self.alloc(Waiter::Owner(owner), OpMem::Buf { buf, off }, None);
        let sqe = send_sqe(sock.target(), ptr, len, None);
        // SAFETY: the kernel reads the Vec's initialised bytes, a heap block owned by this op's
        // slot until the final completion.
        unsafe { self.push(sqe.user_data(ud)) };
        OpId(ud)
    }

    fn recv_multi(&mut self, sock: &Sock, group: Group, owner: Owner) -> OpId {
        let sqe = on_target!(sock.target(), f => opcode::RecvMulti::new(f, group.bgid()).build());
        let ud = self.alloc(Waiter::Owner(owner), OpMem::None, Some(group));
        // SAFETY: the SQE points at no memory of ours but the group's buffers, which stay
        // registered and allocated while any op runs (the ring drains its ops before it
        // unregisters a group).
        unsafe { self.push(sqe.user_data(ud)) };
        OpId(ud)
    }

    fn recvmsg_multi(&mut self, sock: &Sock, group: Group, owner: Owner) -> OpId {
        let hdr: *const libc::msghdr = &*self.recvmsg_hdr;
        let sqe = on_target!(sock.target(), f =>
            opcode::RecvMsgMulti::new(f, hdr, group.bgid()).build());
        let ud = self.alloc(Waiter::Owner(owner), OpMem::None, Some(group));
        // SAFETY: the msghdr template is a heap block owned by the ring, which outlives every
        // op (Drop drains them first); buffers come from the registered group, as in
        // `recv_multi`.
        unsafe { self.push(sqe.user_data(ud)) };
        OpId(ud)
    }

    fn send_bufs(&mut self, sock: &Sock, mut chunks: Vec<Chunk>, owner: Owner) -> OpId {
        chunks.iter_mut().for_each(Chunk::clamp);
        let ud = self.alloc(Waiter::Owner(owner), OpMem::Chunks(chunks), None);
        let OpSlot { mem, msg, .. } = &mut self.slots[slot_index(ud)];
        let OpMem::Chunks(chunks) = mem else {
            unreachable!("allocated with chunks just above")
        };
        let m = msg.get_or_insert_with(MsgBundle::new);
        m.iovs.clear();
        m.iovs.extend(chunks.iter().map(|c| libc::iovec {
            iov_base: c.buf.ptr(c.off) as *mut libc::c_void,
            iov_len: c.len() as usize,
        }));
        // SAFETY: msghdr is plain old data; all-zero is a valid value (no name, no control).
        m.hdr = unsafe { std::mem::zeroed() };
        m.hdr.msg_iov = m.iovs.as_mut_ptr();
        m.hdr.msg_iovlen = m.iovs.len();
        let hdr: *const libc::msghdr = &m.hdr;
        let sqe = on_target!(sock.target(), f => opcode::SendMsg::new(f, hdr)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build());
        // SAFETY: the msghdr and its iovec array live in the box owned by this op's slot,
        // which is neither reused nor freed (nor the array resized) before the op's final
        // completion. Each iovec points at `off..end` (clamped above) of a buffer whose handle
        // moved into the slot with its chunk, which keeps the buffer and its pool's memory
        // until that completion.
        unsafe { self.push(sqe.user_data(ud)) };
        OpId(ud)
    }

    fn send_buf_to(
        &mut self,
        sock: &Sock,
        buf: PBuf,
        off: u32,
        end: u32,
        dest: SocketAddr,
        gso: u16,
        owner: Owner,
    ) -> OpId {
        let end = end.min(buf.len());
        let off = off.min(end);
        let ptr = buf.ptr(off);
        let ud = self.alloc(
            Waiter::Owner(owner),
            OpMem::PbufMsg {
                buf,
                off,
                end,
                gso,
                dest,
            },
            None,
        );
        let slot = &mut self.slots[slot_index(ud)];
        let m = slot.msg.get_or_insert_with(MsgBundle::new);
        m.name = SockAddr::from(dest);
        m.iov = libc::iovec {
            iov_base: ptr as *mut libc::c_void,
            iov_len: (end - off) as usize,
        };
        m.hdr.msg_name = m.name.as_ptr() as *mut libc::c_void;
        m.hdr.msg_namelen = m.name.len();
        m.hdr.msg_iov = &mut m.iov;
        m.hdr.msg_iovlen = 1;
        if gso == 0 {
            m.hdr.msg_control = std::ptr::null_mut();
            m.hdr.msg_controllen = 0;
        } else {
            m.cmsg.hdr.cmsg_len = std::mem::size_of::<libc::cmsghdr>() + 2;
            m.cmsg.hdr.cmsg_level = libc::SOL_UDP;
            m.cmsg.hdr.cmsg_type = libc::UDP_SEGMENT;
            m.cmsg.size = gso;
            m.hdr.msg_control = &mut m.cmsg as *mut SegmentCmsg as *mut libc::c_void;
            m.hdr.msg_controllen = std::mem::size_of::<SegmentCmsg>();
        }
        let hdr: *const libc::msghdr = &m.hdr;
        let sqe = on_target!(sock.target(), f => opcode::SendMsg::new(f, hdr).build());
        // SAFETY: the msghdr, its iovec, name and control message live in the box owned by
        // this op's slot, which is neither reused nor freed before the op's final completion.
        // The iovec points at `off..end` of the buffer whose handle moved into the slot, which
        // keeps the buffer (and its pool's memory) until that completion.
        unsafe { self.push(sqe.user_data(ud)) };
        OpId(ud)
    }

    fn send_to(&mut self, sock: &Sock, buf: Vec<u8>, dest: SocketAddr, owner: Owner) -> OpId {
        let addr = Box::new(SockAddr::from(dest));
        let (ptr, len) = (buf.as_ptr(), buf.len() as u32);
        let (aptr, alen) = (addr.as_ptr() as *const libc::sockaddr, addr.len());
        let ud = self.alloc(Waiter::Owner(owner), OpMem::BufTo { buf, addr }, None);
        let sqe = send_sqe(sock.target(), ptr, len, Some((aptr, alen)));
        // SAFETY: the datagram and the sockaddr are heap blocks owned by this op's slot until
        // its final completion.
        unsafe { self.push(sqe.user_data(ud)) };
        OpId(ud)
    }

    fn poll(&mut self, sock: &Sock, events: u32, owner: Owner) -> OpId {
        let sqe = on_target!(sock.target(), f => opcode::PollAdd::new(f, events).build());
        self.push_plain(sqe, Waiter::Owner(owner))
    }

    fn splice(&mut self, from: SpliceEnd<'_>, to: SpliceEnd<'_>, len: u32, owner: Owner) -> OpId {
        let end = |e: SpliceEnd<'_>, reading: bool| match e {
            SpliceEnd::Sock(s) => s.target(),
            SpliceEnd::Pipe(p) if reading => Target::Fd(p.read_fd()),
            SpliceEnd::Pipe(p) => Target::Fd(p.write_fd()),
        };
        let flags = libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE;
        let sqe = on_target!(end(from, true), i => on_target!(end(to, false), o =>
            opcode::Splice::new(i, -1, o, -1, len).flags(flags).build()));
        self.push_plain(sqe, Waiter::Owner(owner))
    }

    fn shutdown_write(&mut self, sock: &Sock, owner: Owner) -> OpId {
        let sqe = on_target!(sock.target(), f => opcode::Shutdown::new(f, libc::SHUT_WR).build());
        self.push_plain(sqe, Waiter::Owner(owner))
    }

    fn cancel(&mut self, op: OpId) {
        self.push_plain(opcode::AsyncCancel::new(op.0).build(), Waiter::Nobody);
    }

    fn cancel_all(&mut self, sock: &Sock) {
        self.cancel_target(sock.target());
    }

    fn connect(
        &mut self,
        addr: SocketAddr,
        from: Source<'_>,
        owner: Owner,
    ) -> io::Result<(Sock, OpId)> {
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), None)?;
        let _ = sock.set_tcp_nodelay(true);
        if let Some(dev) = from.device {
            sock.bind_device(Some(dev.as_bytes()))?;
        }
        if let Some(ip) = from.ip {
            sock.bind(&SocketAddr::new(ip, 0).into())?;
        }
        let fd = OwnedFd::from(sock);
        let raw = fd.as_raw_fd();
        let addr = Box::new(SockAddr::from(addr));
        let (ptr, len) = (addr.as_ptr() as *const libc::sockaddr, addr.len());
        let ud = self.alloc(Waiter::Owner(owner), OpMem::Addr(addr), None);
        let sqe = opcode::Connect::new(types::Fd(raw), ptr, len).build();
        // SAFETY: the sockaddr is a heap block owned by this op's slot until its completion;
        // the fd is returned to the caller inside the `Sock`, which keeps it open.
        unsafe { self.push(sqe.user_data(ud)) };
        Ok((Sock(SockRepr::Fd(fd)), OpId(ud)))
    }

    fn establish(&mut self, sock: Sock) -> (Sock, Option<SocketAddr>) {
        let SockRepr::Fd(fd) = sock.0 else {
            return (sock, None);
        };
        let s = Socket::from(fd);
        let local = s.local_addr().ok().and_then(|a| a.as_socket());
        let sock = self.files.install(&self.ring.submitter(), OwnedFd::from(s));
        (sock, local)
    }

    fn tcp_listener(&mut self, bind: SocketAddr) -> io::Result<(Sock, SocketAddr)> {
        let s = Socket::new(Domain::for_address(bind), Type::STREAM.nonblocking(), None)?;
        let _ = s.set_tcp_nodelay(true);
        s.bind(&bind.into())?;
        s.listen(8)?;
        let local = s
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("listener has no IP address"))?;
        Ok((
            self.files.install(&self.ring.submitter(), OwnedFd::from(s)),
            local,
        ))
    }

    fn accept(&mut self, listener: &Sock, owner: Owner) -> OpId {
        let sqe = on_target!(listener.target(), f => opcode::Accept::new(f, std::ptr::null_mut(), std::ptr::null_mut())
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build());
        let op = self.push_plain(sqe, Waiter::Owner(owner));
        self.slots[slot_index(op.0)].accepts = true;
        op
    }

    fn adopt(&mut self, fd: OwnedFd) -> (Sock, Option<SocketAddr>) {
        let s = Socket::from(fd);
        let peer = s.peer_addr().ok().and_then(|a| a.as_socket());
        let _ = s.set_tcp_nodelay(true);
        (
            self.files.install(&self.ring.submitter(), OwnedFd::from(s)),
            peer,
        )
    }

    fn udp_socket(
        &mut self,
        bind: SocketAddr,
        device: Option<&str>,
    ) -> io::Result<(Sock, SocketAddr)> {
        let s = super::sys::udp_socket(bind, device)?;
        let local = s
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("UDP socket has no IP address"))?;
        Ok((
            self.files.install(&self.ring.submitter(), OwnedFd::from(s)),
            local,
        ))
    }

    fn close(&mut self, sock: Sock) {
        self.files.remove(&self.ring.submitter(), sock);
    }

    fn take_pipe(&mut self) -> io::Result<Pipe> {
        self.pipes.take()
    }

    fn give_pipe(&mut self, pipe: Pipe) {
        self.pipes.give(pipe);
    }

    fn buf_pool(&self, group: Group) -> Option<(u32, u32)> {
        let p = self.pools.get(group.0 as usize)?;
        Some((p.buf_size(), p.available()))
    }

    fn set_timer(&mut self, at: Instant, owner: Owner) {
        self.wheel.insert(at, owner);
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // No op may still use memory that is about to be freed: cancel them all and wait.
        let sqe = opcode::AsyncCancel2::new(types::CancelBuilder::any().all()).build();
        self.push_plain(sqe, Waiter::Nobody);
        let mut sink = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.in_flight > 0 && Instant::now() < deadline {
            let _ = self.ring.submit_and_wait(1);
            self.reap(&mut sink);
            sink.clear();
        }
        if self.in_flight == 0 {
            for p in &self.pools {
                let _ = self.ring.submitter().unregister_buf_ring(p.group().bgid());
            }
            return;
        }
        tracing::warn!(
            ops = self.in_flight,
            "io_uring ops still in flight at exit; leaking their memory"
        );
        // What the kernel may still touch must outlive it: the op slots' memory (buffers,
        // headers, handles), the recvmsg template and the buffer pools.
        std::mem::forget(std::mem::take(&mut self.slots));
        std::mem::forget(std::mem::take(&mut self.pools));
        let hdr = std::mem::replace(
            &mut self.recvmsg_hdr,
            // SAFETY: msghdr is plain old data; all-zero is valid.
            Box::new(unsafe { std::mem::zeroed() }),
        );
        std::mem::forget(hdr);
    }
}
