//! The io_uring engine: everything that talks to io_uring and the kernel, and all of the
//! crate's `unsafe`. It knows nothing of SOCKS: it submits ops on sockets and pipes, hands
//! completions back with the memory the ops owned, lends provided buffers as move-only
//! handles, and keeps timers.
//!
//! - [`ring`]: the ring, its op table, and what is registered with it (buffer pools, the
//!   fixed-file table, the pipe pool, the timer wheel); implements [`Engine`];
//! - [`bufring`]: provided buffer pools and their handles ([`PBuf`]);
//! - [`files`]: sockets as the ring sees them ([`Sock`]) and the fixed-file table;
//! - [`pipes`]: the pipe pool of the splice path;
//! - [`timer`]: the timing wheel behind every per-connection deadline;
//! - [`recvmsg`]: the layout of a multishot recvmsg buffer (source, control data, payload);
//! - [`sockaddr`]: socket addresses as the kernel lays them out;
//! - [`sys`]: system calls with no safe wrapper (signals, limits, socket options);
//! - `fake` (tests only): a recording [`Engine`] with no kernel behind it.
//!
//! The relay drives connections through the [`Engine`] trait, so its logic runs unchanged on
//! the ring and on the fake.

#![allow(unsafe_code)]

pub(crate) mod bufring;
#[cfg(test)]
pub(crate) mod fake;
pub(crate) mod files;
pub(crate) mod pipes;
pub(crate) mod recvmsg;
pub(crate) mod ring;
pub(crate) mod sockaddr;
pub(crate) mod sys;
pub(crate) mod timer;

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::time::Instant;

pub(crate) use bufring::{Group, PBuf};
pub(crate) use files::Sock;
pub(crate) use pipes::Pipe;
pub(crate) use ring::{Ring, RingSpec};

/// Who an op's completions (or a timer's firing) go to: an opaque word the caller packs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Owner(pub u64);

/// Identifies an in-flight op, for targeted cancellation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct OpId(pub(crate) u64);

/// What an op hands back with its completion.
#[derive(Debug, Default)]
pub(crate) enum Data {
    #[default]
    None,
    /// A `recv`'s or `send`'s heap buffer: bytes received are `buf[off..]` (the buffer is
    /// truncated to what arrived); a send sent `res` bytes from `buf[off..]`.
    Buf { buf: Vec<u8>, off: usize },
    /// A provided buffer that a multishot receive filled (`res` bytes; with recvmsg, laid out
    /// as [`recvmsg`] says).
    Picked(PBuf),
    /// A `send_bufs`' chunks, as given; the send sent `res` bytes from their start.
    Chunks(Vec<Chunk>),
    /// A `send_buf_to`'s buffer, range, segment size and destination.
    PbufMsg {
        buf: PBuf,
        off: u32,
        end: u32,
        gso: u16,
        dest: SocketAddr,
    },
    /// A `send_to`'s datagram.
    Datagram(#[allow(dead_code)] Vec<u8>),
    /// A new connection from a multishot accept.
    Accepted(OwnedFd),
}

/// Where a socket toward a target comes from: a source address to bind before connecting,
/// and a network device to bind to (SO_BINDTODEVICE).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Source<'a> {
    pub ip: Option<std::net::IpAddr>,
    pub device: Option<&'a str>,
}

/// Bytes `off..end` of a provided buffer, for a vectored send.
#[derive(Debug)]
pub(crate) struct Chunk {
    pub buf: PBuf,
    pub off: u32,
    pub end: u32,
}

impl Chunk {
    /// The whole of what a receive put in `buf`.
    pub(crate) fn new(buf: PBuf, len: u32) -> Chunk {
        Chunk {
            buf,
            off: 0,
            end: len,
        }
    }

    pub(crate) fn len(&self) -> u32 {
        self.end - self.off
    }

    /// Clamps the range into the buffer, so that no op can be handed a range outside it.
    pub(crate) fn clamp(&mut self) {
        self.end = self.end.min(self.buf.len());
        self.off = self.off.min(self.end);
    }
}

/// A finished (or, for multishot ops, a progressing) operation.
#[derive(Debug)]
pub(crate) struct Completion {
    pub owner: Owner,
    pub res: i32,
    /// The op stays in flight (multishot) and more completions follow.
    pub more: bool,
    pub data: Data,
}

/// One end of a splice.
#[derive(Clone, Copy)]
pub(crate) enum SpliceEnd<'a> {
    Sock(&'a Sock),
    /// The pipe's read end as a source, its write end as a destination.
    Pipe(&'a Pipe),
}

/// What the relay may ask of the engine. Ops complete later with the given owner; every op
/// keeps the memory it was given until its final completion hands it back.
pub(crate) trait Engine {
    /// Receives into the spare capacity of `buf` (reserved if there is none).
    fn recv(&mut self, sock: &Sock, buf: Vec<u8>, owner: Owner) -> OpId;
    /// Sends `buf[off..]`; a short send returns the buffer with the count in `res`.
    fn send(&mut self, sock: &Sock, buf: Vec<u8>, off: usize, owner: Owner) -> OpId;
    /// Multishot receive into buffers of `group` ([`Data::Picked`]); ends with `-ENOBUFS` when
    /// the group has none left.
    fn recv_multi(&mut self, sock: &Sock, group: Group, owner: Owner) -> OpId;
    /// Multishot recvmsg into buffers of `group`, laid out as [`recvmsg`] says.
    fn recvmsg_multi(&mut self, sock: &Sock, group: Group, owner: Owner) -> OpId;
    /// Sends the chunks, in order, with one `sendmsg` (one iovec per chunk) on a connected
    /// socket. The chunks come back with the completion ([`Data::Chunks`]).
    fn send_bufs(&mut self, sock: &Sock, chunks: Vec<Chunk>, owner: Owner) -> OpId;
    /// Sends bytes `off..end` of a provided buffer to `dest` with `sendmsg`: one datagram when
    /// `gso` is 0, else UDP GSO segments of `gso` bytes (the last may be shorter).
    #[allow(clippy::too_many_arguments)]
    fn send_buf_to(
        &mut self,
        sock: &Sock,
        buf: PBuf,
        off: u32,
        end: u32,
        dest: SocketAddr,
        gso: u16,
        owner: Owner,
    ) -> OpId;
    /// Sends a heap datagram to `dest`.
    fn send_to(&mut self, sock: &Sock, buf: Vec<u8>, dest: SocketAddr, owner: Owner) -> OpId;
    /// One-shot readiness poll (`POLLIN`, `POLLOUT`, ...).
    fn poll(&mut self, sock: &Sock, events: u32, owner: Owner) -> OpId;
    /// Non-blocking splice of up to `len` bytes.
    fn splice(&mut self, from: SpliceEnd<'_>, to: SpliceEnd<'_>, len: u32, owner: Owner) -> OpId;
    /// `shutdown(SHUT_WR)`: sends FIN once the queued bytes are out.
    fn shutdown_write(&mut self, sock: &Sock, owner: Owner) -> OpId;
    /// Cancels one op; it still completes (with `-ECANCELED` if it was waiting).
    fn cancel(&mut self, op: OpId);
    /// Cancels every op on `sock`; they still complete.
    fn cancel_all(&mut self, sock: &Sock);
    /// Opens a non-blocking TCP socket (TCP_NODELAY) and connects it to `addr`.
    fn connect(
        &mut self,
        addr: SocketAddr,
        from: Source<'_>,
        owner: Owner,
    ) -> io::Result<(Sock, OpId)>;
    /// A connected socket moves to its long-lived form (the fixed-file table); returns it and
    /// its local address.
    fn establish(&mut self, sock: Sock) -> (Sock, Option<SocketAddr>);
    /// A UDP socket bound to `bind` (an unspecified IPv6 address binds dual-stack), with GRO
    /// on and large buffers; returns it and its local address.
    fn udp_socket(
        &mut self,
        bind: SocketAddr,
        device: Option<&str>,
    ) -> io::Result<(Sock, SocketAddr)>;
    /// A TCP socket listening on `bind` for one BIND request (a small backlog); returns it and
    /// its address.
    fn tcp_listener(&mut self, bind: SocketAddr) -> io::Result<(Sock, SocketAddr)>;
    /// One-shot accept on a listening socket: the completion's `res` is the new descriptor,
    /// handed over as [`Data::Accepted`] (non-blocking, close-on-exec).
    fn accept(&mut self, listener: &Sock, owner: Owner) -> OpId;
    /// An accepted socket moves to its long-lived form (the fixed-file table); returns it and
    /// its peer's address.
    fn adopt(&mut self, fd: std::os::fd::OwnedFd) -> (Sock, Option<SocketAddr>);
    /// Closes a socket. Only when no op on it is in flight.
    fn close(&mut self, sock: Sock);
    /// Lends a pipe for splicing.
    fn take_pipe(&mut self) -> io::Result<Pipe>;
    /// Takes back a pipe that holds no bytes. (A pipe with bytes left is dropped instead.)
    fn give_pipe(&mut self, pipe: Pipe);
    /// A buffer group's buffer size and how many buffers the kernel can still pick from.
    fn buf_pool(&self, group: Group) -> Option<(u32, u32)>;
    /// Fires `owner`'s timer at `at` (never cancelled: owners ignore stale firings).
    fn set_timer(&mut self, at: Instant, owner: Owner);
}
