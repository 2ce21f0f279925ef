//! The io_uring ring and its op table: the one place where SQEs are built and pushed.
//!
//! Every submission moves the memory its SQE points at (a receive buffer, a send buffer, a
//! sockaddr, a timespec, a provided-buffer id) into an op slot. The slot keeps it until the
//! op's *final* completion (a CQE without `IORING_CQE_F_MORE`), then hands it back inside the
//! [`Completion`]. Callers therefore never hold raw pointers into in-flight memory, and the
//! submission methods are safe: cancelling an op or dropping a connection cannot free memory
//! the kernel still writes to.

use std::io;
use std::os::fd::RawFd;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

/// A socket as the ring sees it: an ordinary fd, or an index into the ring's registered
/// (fixed) file table. Fixed files cost no process fd and skip fd refcounting per op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Fd(RawFd),
    Fixed(u32),
}

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

/// Memory an in-flight op owns until its final completion.
#[derive(Debug, Default)]
pub enum OpMem {
    #[default]
    None,
    /// A heap buffer: receives write into its spare capacity, sends read `buf[off..]`.
    Buf { buf: Vec<u8>, off: usize },
    /// A destination for `connect`.
    Addr(Box<socket2::SockAddr>),
    /// The expiry of a `Timeout` op.
    Time(Box<types::Timespec>),
    /// A provided buffer that a send reads from (`bid`, bytes `off..end`).
    Pbuf { bid: u16, off: u32, end: u32 },
    /// A provided buffer sent with `sendmsg` to `dest` (`send_pbuf_msg`): as UDP GSO segments
    /// of `gso` bytes when `gso` is non-zero. The op slot also owns the message header.
    PbufMsg {
        bid: u16,
        off: u32,
        end: u32,
        gso: u16,
        dest: std::net::SocketAddr,
    },
    /// A heap datagram and its destination (`send_to`).
    BufTo {
        buf: Vec<u8>,
        addr: Box<socket2::SockAddr>,
    },
}

/// The `msghdr` of a `sendmsg` from a provided buffer, with everything it points at except the
/// payload: one iovec, the destination and room for a `UDP_SEGMENT` control message. Boxed in
/// its op slot, so its address is stable while the kernel reads it; reused by later ops of the
/// same slot.
struct MsgBundle {
    hdr: libc::msghdr,
    iov: libc::iovec,
    name: socket2::SockAddr,
    cmsg: SegmentCmsg,
}

/// A `UDP_SEGMENT` control message: `CMSG_SPACE(sizeof(u16))` bytes.
#[repr(C)]
struct SegmentCmsg {
    hdr: libc::cmsghdr,
    size: u16,
    _pad: [u8; 6],
}

/// `msg_namelen` of the multishot recvmsg template: room for any socket address we receive
/// (a `sockaddr_in6` is 28 bytes) plus slack, so that a relay can build a reply header and a
/// destination address in front of the payload without moving it.
pub const RECVMSG_NAME_LEN: u32 = 64;
/// `msg_controllen` of the template: one `cmsghdr` with an int, `CMSG_SPACE(4)`. The only
/// control message a relay socket gets is `UDP_GRO` (the segment size of a coalesced receive).
pub const RECVMSG_CONTROL_LEN: u32 = 24;
/// Where the control data starts in a multishot recvmsg buffer.
pub const RECVMSG_CONTROL_OFF: u32 = 16 + RECVMSG_NAME_LEN;
/// Where the payload starts in a multishot recvmsg buffer: `io_uring_recvmsg_out` (16 bytes),
/// then the name area, then the control area, then the payload.
pub const RECVMSG_PAYLOAD_OFF: u32 = RECVMSG_CONTROL_OFF + RECVMSG_CONTROL_LEN;
const _: () = assert!(
    std::mem::size_of::<libc::cmsghdr>() + 4 <= RECVMSG_CONTROL_LEN as usize
        && std::mem::size_of::<SegmentCmsg>() == 24
);

/// A finished (or, for multishot ops, a progressing) operation.
#[derive(Debug)]
pub struct Completion {
    /// The owner token given at submission.
    pub owner: u64,
    pub res: i32,
    pub flags: u32,
    /// True when the op stays in flight (multishot) and more completions follow.
    pub more: bool,
    /// The op's memory, returned on the final completion only.
    pub mem: OpMem,
}

/// The op table index in an op's `user_data` (the generation is in the high 32 bits).
fn slot_index(ud: u64) -> usize {
    (ud & 0xffff_ffff) as usize
}

/// Identifies an in-flight op, for targeted cancellation (the op table index and generation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpId(u64);

struct OpSlot {
    generation: u32,
    owner: u64,
    mem: OpMem,
    /// The message header of this slot's `sendmsg` ops, allocated on the slot's first one.
    msg: Option<Box<MsgBundle>>,
}

/// Applies one set of ring setup flags to a builder.
type SetupFlags = fn(&mut io_uring::Builder);

/// Owner token for ops whose completion nobody needs (cancellations).
pub const OWNER_IGNORE: u64 = u64::MAX;

pub struct Ring {
    ring: IoUring,
    /// The template every multishot recvmsg points at: only its name and control lengths are
    /// read. Boxed so its address is stable; it lives as long as the ring.
    recvmsg_hdr: Box<libc::msghdr>,
    slots: Vec<OpSlot>,
    free: Vec<u32>,
    in_flight: usize,
    /// Which setup flags the kernel took, for the start-up log line.
    pub setup: &'static str,
}

impl Ring {
    /// Builds the ring with the cheapest task-running mode the kernel accepts:
    /// SINGLE_ISSUER + DEFER_TASKRUN (completions run only when this thread waits), then
    /// COOP_TASKRUN, then the plain ring.
    pub fn new(entries: u32) -> io::Result<Ring> {
        let cq = entries * 8;
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
            match builder.build(entries) {
                Ok(ring) => {
                    // SAFETY: msghdr is plain old data; all-zero is a valid (empty) header.
                    let mut hdr: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
                    hdr.msg_namelen = RECVMSG_NAME_LEN;
                    hdr.msg_controllen = RECVMSG_CONTROL_LEN as usize;
                    return Ok(Ring {
                        ring,
                        recvmsg_hdr: hdr,
                        slots: Vec::with_capacity(1024),
                        free: Vec::with_capacity(1024),
                        in_flight: 0,
                        setup: name,
                    });
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("io_uring setup failed")))
    }

    pub fn submitter(&self) -> io_uring::Submitter<'_> {
        self.ring.submitter()
    }

    fn alloc(&mut self, owner: u64, mem: OpMem) -> u64 {
        let idx = match self.free.pop() {
            Some(i) => {
                let s = &mut self.slots[i as usize];
                s.owner = owner;
                s.mem = mem;
                i
            }
            None => {
                self.slots.push(OpSlot {
                    generation: 0,
                    owner,
                    mem,
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
            if let Err(e) = self.ring.submit() {
                if e.raw_os_error() != Some(libc::EBUSY) && e.raw_os_error() != Some(libc::EINTR) {
                    panic!("io_uring submit failed: {e}");
                }
            }
        }
    }

    fn push_plain(&mut self, sqe: squeue::Entry, owner: u64) -> OpId {
        let ud = self.alloc(owner, OpMem::None);
        // SAFETY: the SQE points at no memory. Its fd (or fixed slot) stays valid until the
        // op's final completion: connections release fds only with no counted op in flight.
        // Cancel ops are not counted, but SQEs are consumed in order and a cancel completes
        // inline at submission, so it runs before any later reuse of the fd number.
        unsafe { self.push(sqe.user_data(ud)) };
        OpId(ud)
    }

    /// One-shot readiness poll (`POLLIN`/`POLLOUT`/...).
    pub fn poll(&mut self, fd: Target, events: u32, owner: u64) -> OpId {
        let sqe = on_target!(fd, f => opcode::PollAdd::new(f, events).build());
        self.push_plain(sqe, owner)
    }

    /// `splice(fd_in -> fd_out)` of up to `len` bytes, never blocking an io-wq worker.
    pub fn splice(&mut self, fd_in: Target, fd_out: Target, len: u32, owner: u64) -> OpId {
        let flags = libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE;
        let sqe = on_target!(fd_in, i => on_target!(fd_out, o =>
            opcode::Splice::new(i, -1, o, -1, len).flags(flags).build()));
        self.push_plain(sqe, owner)
    }

    /// `shutdown(2)` of a socket (fixed files have no fd to call it on directly).
    pub fn shutdown(&mut self, fd: Target, how: i32, owner: u64) -> OpId {
        let sqe = on_target!(fd, f => opcode::Shutdown::new(f, how).build());
        self.push_plain(sqe, owner)
    }

    /// Multishot accept; accepted sockets come back non-blocking and close-on-exec.
    pub fn accept_multi(&mut self, fd: RawFd, owner: u64) -> OpId {
        let sqe = opcode::AcceptMulti::new(types::Fd(fd))
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build();
        self.push_plain(sqe, owner)
    }

    /// Multishot receive into the provided buffer ring `bgid`.
    pub fn recv_multi(&mut self, fd: Target, bgid: u16, owner: u64) -> OpId {
        let sqe = on_target!(fd, f => opcode::RecvMulti::new(f, bgid).build());
        self.push_plain(sqe, owner)
    }

    /// Multishot recvmsg into the provided buffer ring `bgid`: one datagram per buffer, laid out
    /// as `io_uring_recvmsg_out`, the source address (in a [`RECVMSG_NAME_LEN`] area), then the
    /// payload at [`RECVMSG_PAYLOAD_OFF`].
    pub fn recvmsg_multi(&mut self, fd: Target, bgid: u16, owner: u64) -> OpId {
        let hdr: *const libc::msghdr = &*self.recvmsg_hdr;
        let sqe = on_target!(fd, f => opcode::RecvMsgMulti::new(f, hdr, bgid).build());
        let ud = self.alloc(owner, OpMem::None);
        // SAFETY: the msghdr template is a heap block owned by the ring, which outlives every
        // op (the shard cancels and waits for all ops before dropping it); buffers come from
        // the registered group, which stays registered while ops run.
        unsafe { self.push(sqe.user_data(ud)) };
        OpId(ud)
    }

    /// Cancels every op on `fd` (the connection is closing). The cancelled ops still complete,
    /// with `-ECANCELED`, and only then give their memory back.
    pub fn cancel_fd(&mut self, fd: Target) {
        let sqe = on_target!(fd, f =>
            opcode::AsyncCancel2::new(types::CancelBuilder::fd(f).all()).build());
        self.push_plain(sqe, OWNER_IGNORE);
    }

    /// Cancels one op (a multishot receive that must pause for back-pressure).
    pub fn cancel_op(&mut self, op: OpId) {
        self.push_plain(opcode::AsyncCancel::new(op.0).build(), OWNER_IGNORE);
    }

    /// Moves `buf` into a new op slot, ready for the kernel to fill `buf[buf.len()..capacity]`.
    /// The buffer is zero-filled to its capacity first so that it is always initialised; on
    /// completion the caller truncates it to `off + res`. Returns (user_data, ptr, len).
    fn alloc_fill_buf(&mut self, mut buf: Vec<u8>, owner: u64) -> (u64, *mut u8, u32) {
        if buf.capacity() == buf.len() {
            buf.reserve(64);
        }
        let off = buf.len();
        buf.resize(buf.capacity(), 0);
        let ptr = buf[off..].as_mut_ptr();
        let len = (buf.len() - off) as u32;
        (self.alloc(owner, OpMem::Buf { buf, off }), ptr, len)
    }

    /// Receives from a socket into the spare capacity of `buf` (see `alloc_fill_buf`).
    pub fn recv(&mut self, fd: Target, buf: Vec<u8>, owner: u64) -> OpId {
        let (ud, ptr, len) = self.alloc_fill_buf(buf, owner);
        let sqe = on_target!(fd, f => opcode::Recv::new(f, ptr, len).build());
        // SAFETY: the kernel writes into the Vec's heap block, which moved (without moving the
        // block) into this op's slot and stays there until the final completion returns it.
        unsafe { self.push(sqe.user_data(ud)) };
        OpId(ud)
    }

    /// Reads from a pipe into the spare capacity of `buf` (see `alloc_fill_buf`).
    pub fn read(&mut self, fd: RawFd, buf: Vec<u8>, owner: u64) -> OpId {
        let (ud, ptr, len) = self.alloc_fill_buf(buf, owner);
        let sqe = opcode::Read::new(types::Fd(fd), ptr, len)
            .offset(u64::MAX)
            .build();
        // SAFETY: as in `recv`: the heap block belongs to this op's slot until its completion.
        unsafe { self.push(sqe.user_data(ud)) };
        OpId(ud)
    }

    /// Cancels every op in flight and waits (bounded) until the kernel has completed them all,
    /// so that no op memory is freed while the kernel may still use it.
    /// Returns false if ops were still in flight after 5 s; the caller must then leak, not
    /// free, the memory they use (`leak_in_flight`).
    pub fn cancel_all_and_wait(&mut self) -> bool {
        let sqe = opcode::AsyncCancel2::new(types::CancelBuilder::any().all()).build();
        self.push_plain(sqe, OWNER_IGNORE);
        let mut sink = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while self.in_flight > 0 && std::time::Instant::now() < deadline {
            let _ = self.ring.submit_and_wait(1);
            self.reap(&mut sink);
            sink.clear();
        }
        self.in_flight == 0
    }

    /// Forgets the memory of every op slot, so that nothing the kernel may still touch is
    /// freed when the ring is dropped.
    pub fn leak_in_flight(&mut self) {
        std::mem::forget(std::mem::take(&mut self.slots));
    }

    /// Sends `buf[off..]`. A short send returns the buffer with the count in `res`; the caller
    /// resubmits the rest.
    pub fn send(&mut self, fd: Target, buf: Vec<u8>, off: usize, owner: u64) -> OpId {
        debug_assert!(off < buf.len());
        let ptr = buf[off..].as_ptr();
        let len = (buf.len() - off) as u32;
        let ud = self.alloc(owner, OpMem::Buf { buf, off });
        let sqe = send_sqe(fd, ptr, len, None);
        // SAFETY: the kernel reads the Vec's initialised bytes, a heap block owned by this op's
        // slot until the final completion.
        unsafe { self.push(sqe.user_data(ud)) };
        OpId(ud)
    }

    /// Sends bytes `off..end` of provided buffer `bid` of `bufs`. The op owns the buffer id
    /// until its final completion, so the buffer cannot be recycled while the kernel reads it.
    pub fn send_pbuf(
        &mut self,
        fd: Target,
        bufs: &super::bufring::BufRing,
        bid: u16,
        off: u32,
        end: u32,
        owner: u64,
    ) -> OpId {
        let ptr = bufs.ptr(bid, off);
        let ud = self.alloc(owner, OpMem::Pbuf { bid, off, end });
        let sqe = send_sqe(fd, ptr, end - off, None);
        // SAFETY: `ptr` points into the buffer ring's data area, which lives as long as the
        // shard; buffer `bid` is owned by this op (recorded in its slot) and only returned to
        // the kernel's ring after this op's final completion.
        unsafe { self.push(sqe.user_data(ud)) };
        OpId(ud)
    }

    /// Sends bytes `off..end` of provided buffer `bid` as one datagram to the socket address
    /// stored in the same buffer at `addr_off..addr_off + addr_len` (written there by the
    /// caller with `bufring::write_sockaddr`). The op owns the buffer until its completion.
    #[allow(clippy::too_many_arguments)]
    pub fn send_pbuf_to(
        &mut self,
        fd: Target,
        bufs: &super::bufring::BufRing,
        bid: u16,
        off: u32,
        end: u32,
        addr_off: u32,
        addr_len: u32,
        owner: u64,
    ) -> OpId {
        assert!(addr_off + addr_len <= bufs.buf_size() && end <= bufs.buf_size());
        let ptr = bufs.ptr(bid, off);
        let addr = bufs.ptr(bid, addr_off) as *const libc::sockaddr;
        let ud = self.alloc(owner, OpMem::Pbuf { bid, off, end });
        let sqe = send_sqe(fd, ptr, end - off, Some((addr, addr_len)));
        // SAFETY: payload and destination address both lie in buffer `bid` of the buffer
        // ring's data area (bounds asserted above and in `ptr`), which lives as long as the
        // shard; the buffer id is owned by this op's slot and recycled only after its final
        // completion.
        unsafe { self.push(sqe.user_data(ud)) };
        OpId(ud)
    }

    /// Sends bytes `off..end` of provided buffer `bid` to `dest` with `sendmsg`: as one
    /// datagram when `gso` is 0, else as UDP GSO segments of `gso` bytes (the last may be
    /// shorter), which the kernel splits after a single pass through the stack. The op owns
    /// one hold on the buffer until its final completion.
    #[allow(clippy::too_many_arguments)]
    pub fn send_pbuf_msg(
        &mut self,
        fd: Target,
        bufs: &super::bufring::BufRing,
        bid: u16,
        off: u32,
        end: u32,
        dest: std::net::SocketAddr,
        gso: u16,
        owner: u64,
    ) -> OpId {
        assert!(off <= end && end <= bufs.buf_size());
        let ptr = bufs.ptr(bid, off);
        let ud = self.alloc(
            owner,
            OpMem::PbufMsg {
                bid,
                off,
                end,
                gso,
                dest,
            },
        );
        let slot = &mut self.slots[slot_index(ud)];
        let m = slot.msg.get_or_insert_with(|| {
            Box::new(MsgBundle {
                // SAFETY: msghdr and cmsghdr are plain old data; all-zero is a valid value.
                hdr: unsafe { std::mem::zeroed() },
                iov: libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                },
                name: socket2::SockAddr::from(dest),
                // SAFETY: as above.
                cmsg: unsafe { std::mem::zeroed() },
            })
        });
        m.name = socket2::SockAddr::from(dest);
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
        let sqe = on_target!(fd, f => opcode::SendMsg::new(f, hdr).build());
        // SAFETY: the msghdr, its iovec, name and control message live in the box owned by
        // this op's slot, which is neither reused nor freed before the op's final completion
        // (the box stays with the slot). The iovec points into buffer `bid` of the buffer
        // ring's data area (bounds asserted above and in `ptr`), which lives as long as the
        // shard; this op holds the buffer until its final completion.
        unsafe { self.push(sqe.user_data(ud)) };
        OpId(ud)
    }

    /// Sends `buf` as one datagram to `addr` (rare paths: reassembled fragments).
    pub fn send_to(
        &mut self,
        fd: Target,
        buf: Vec<u8>,
        addr: Box<socket2::SockAddr>,
        owner: u64,
    ) -> OpId {
        let (ptr, len) = (buf.as_ptr(), buf.len() as u32);
        let (aptr, alen) = (addr.as_ptr() as *const libc::sockaddr, addr.len());
        let ud = self.alloc(owner, OpMem::BufTo { buf, addr });
        let sqe = send_sqe(fd, ptr, len, Some((aptr, alen)));
        // SAFETY: the datagram and the sockaddr are heap blocks owned by this op's slot until
        // its final completion.
        unsafe { self.push(sqe.user_data(ud)) };
        OpId(ud)
    }

    pub fn connect(&mut self, fd: RawFd, addr: Box<socket2::SockAddr>, owner: u64) -> OpId {
        let (ptr, len) = (addr.as_ptr() as *const libc::sockaddr, addr.len());
        let ud = self.alloc(owner, OpMem::Addr(addr));
        let sqe = opcode::Connect::new(types::Fd(fd), ptr, len).build();
        // SAFETY: the sockaddr is a heap block owned by this op's slot until its completion.
        unsafe { self.push(sqe.user_data(ud)) };
        OpId(ud)
    }

    /// A relative timeout that completes with `-ETIME` when it expires.
    pub fn timeout(&mut self, after: std::time::Duration, owner: u64) -> OpId {
        let ts = Box::new(
            types::Timespec::new()
                .sec(after.as_secs())
                .nsec(after.subsec_nanos()),
        );
        let ptr: *const types::Timespec = &*ts;
        let ud = self.alloc(owner, OpMem::Time(ts));
        let sqe = opcode::Timeout::new(ptr).build();
        // SAFETY: the timespec is a heap block owned by this op's slot until its completion.
        unsafe { self.push(sqe.user_data(ud)) };
        OpId(ud)
    }

    /// Submits everything queued and waits for at least `want` completions.
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
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
    pub fn submit_nowait(&mut self) -> io::Result<()> {
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
    pub fn has_completions(&mut self) -> bool {
        let mut cq = self.ring.completion();
        cq.sync();
        !cq.is_empty()
    }

    /// Moves every available completion into `out`, releasing finished op slots.
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        let mut cq = self.ring.completion();
        cq.sync();
        for cqe in &mut cq {
            let ud = cqe.user_data();
            let idx = slot_index(ud);
            let more = cqueue::more(cqe.flags());
            let slot = &mut self.slots[idx];
            debug_assert_eq!(slot.generation, (ud >> 32) as u32);
            let owner = slot.owner;
            let mem = if more {
                OpMem::None
            } else {
                let mem = std::mem::take(&mut slot.mem);
                slot.generation = slot.generation.wrapping_add(1);
                self.free.push(idx as u32);
                self.in_flight -= 1;
                mem
            };
            if owner != OWNER_IGNORE {
                out.push(Completion {
                    owner,
                    res: cqe.result(),
                    flags: cqe.flags(),
                    more,
                    mem,
                });
            }
        }
    }
}
