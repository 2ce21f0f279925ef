//! [`Mmsg`]: the buffers and kernel structures for batched UDP I/O, one
//! `recvmmsg` or `sendmmsg` call per batch of datagrams, with equal-sized
//! runs to one peer sent as a single UDP GSO message (or, plain, one
//! `sendmsg` per datagram). Used by the UDP echo
//! and by the `udp` mode's associations; the raw pointers and the `unsafe`
//! they need stay inside this file.

use std::os::fd::RawFd;

/// Datagrams per recvmmsg/sendmmsg call.
pub const MMSG_BATCH: usize = 64;

/// Most datagrams in one UDP GSO send, and most bytes (an IP packet).
const GSO_MAX_SEGMENTS: usize = 64;
const GSO_MAX_BYTES: usize = 65_000;

/// Buffers for `recvmmsg`/`sendmmsg` of up to `n` datagrams of at most
/// `slot` bytes each, with a peer address per datagram. The pointers in
/// the kernel structures are rebuilt on every call, so the struct may move.
///
/// Sends coalesce runs of equal-sized datagrams to the same peer into one
/// UDP GSO message (`UDP_SEGMENT`): the stack is traversed once per run
/// instead of once per datagram, and the receiving socket (which has no
/// UDP_GRO) still gets them one by one, exactly as if sent separately.
/// If the kernel refuses GSO, it is turned off and datagrams go singly.
///
/// [`Mmsg::set_plain`] sends like most UDP programs instead: no GSO and
/// one `sendmsg` call per datagram (receiving still batches).
pub struct Mmsg {
    slot: usize,
    bufs: Vec<u8>,
    /// Per datagram.
    iov: Vec<libc::iovec>,
    names: Vec<libc::sockaddr_storage>,
    namelens: Vec<libc::socklen_t>,
    lens: Vec<usize>,
    flags: Vec<libc::c_int>,
    /// Per message: a datagram (recv) or a run of datagrams (send).
    hdrs: Vec<libc::mmsghdr>,
    /// Per message: its first datagram and how many.
    runs: Vec<(usize, usize)>,
    /// Per message: room for one `UDP_SEGMENT` cmsg (aligned).
    ctrl: Vec<[u64; 4]>,
    pub gso: bool,
    /// One `sendmsg` per datagram instead of one `sendmmsg` per batch.
    single: bool,
}

// SAFETY: the raw pointers inside `iov` and `hdrs` only ever point into
// this struct's own heap buffers (rebuilt before each use); nothing is shared.
unsafe impl Send for Mmsg {}

/// What a `sendmmsg` batch did.
#[derive(Debug, Default)]
pub struct Sent {
    /// Datagrams sent.
    pub sent: usize,
    pub error: Option<std::io::Error>,
}

/// Errors by which the kernel says it will not do UDP GSO here.
fn gso_refused(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EIO | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
    )
}

impl Mmsg {
    pub fn new(n: usize, slot: usize) -> Mmsg {
        // SAFETY: all-zero is a valid value of these plain C structs.
        let zero_name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let zero_hdr: libc::mmsghdr = unsafe { std::mem::zeroed() };
        Mmsg {
            slot,
            bufs: vec![0u8; n * slot],
            iov: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                };
                n
            ],
            names: vec![zero_name; n],
            namelens: vec![0; n],
            lens: vec![0; n],
            flags: vec![0; n],
            hdrs: vec![zero_hdr; n],
            runs: vec![(0, 0); n],
            ctrl: vec![[0u64; 4]; n],
            gso: true,
            single: false,
        }
    }

    /// Sends datagram by datagram from now on: no UDP GSO, and one
    /// `sendmsg` system call per datagram.
    pub fn set_plain(&mut self) {
        self.gso = false;
        self.single = true;
    }

    /// Whether sends go datagram by datagram ([`Mmsg::set_plain`]).
    #[cfg(test)]
    pub fn is_plain(&self) -> bool {
        self.single
    }

    pub fn capacity(&self) -> usize {
        self.hdrs.len()
    }

    /// All of slot `i`, to fill before `send`.
    pub fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.bufs[i * self.slot..(i + 1) * self.slot]
    }

    /// The datagram `recv` put in slot `i`.
    pub fn datagram(&self, i: usize) -> &[u8] {
        let len = self.lens[i].min(self.slot);
        &self.bufs[i * self.slot..i * self.slot + len]
    }

    /// The datagram in slot `i` was longer than the slot (cut off).
    pub fn truncated(&self, i: usize) -> bool {
        self.flags[i] & libc::MSG_TRUNC != 0
    }

    /// Points iovec `i` at slot `i`, `len` bytes of it.
    fn point(&mut self, i: usize, len: usize) {
        let base = self.bufs.as_mut_ptr();
        self.iov[i] = libc::iovec {
            // SAFETY: i < capacity, so the offset is inside `bufs`.
            iov_base: unsafe { base.add(i * self.slot) }.cast(),
            iov_len: len.min(self.slot),
        };
    }

    /// One `recvmmsg` of up to `capacity` datagrams (with their senders'
    /// addresses if `names`). Returns how many; 0 when nothing was queued
    /// on a non-blocking socket (or with MSG_DONTWAIT).
    pub fn recv(&mut self, fd: RawFd, flags: libc::c_int, names: bool) -> std::io::Result<usize> {
        let n = self.capacity();
        for i in 0..n {
            self.point(i, self.slot);
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_iov = &mut self.iov[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
            if names {
                h.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
                h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            } else {
                h.msg_name = std::ptr::null_mut();
                h.msg_namelen = 0;
            }
        }
        // Bounded: retried only when interrupted by a signal.
        for _ in 0..100 {
            // SAFETY: `hdrs[..n]` are valid mmsghdrs whose iovecs and names
            // point into buffers we own, of the lengths given; the kernel
            // writes at most that much. A null timeout means none.
            let r = unsafe {
                libc::recvmmsg(
                    fd,
                    self.hdrs.as_mut_ptr(),
                    n as libc::c_uint,
                    flags,
                    std::ptr::null_mut(),
                )
            };
            if r >= 0 {
                let r = r as usize;
                for i in 0..r {
                    let h = &self.hdrs[i];
                    self.lens[i] = h.msg_len as usize;
                    self.flags[i] = h.msg_hdr.msg_flags;
                    self.namelens[i] = h.msg_hdr.msg_namelen;
                }
                return Ok(r);
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock => return Ok(0),
                std::io::ErrorKind::Interrupted => continue,
                _ => return Err(e),
            }
        }
        Ok(0)
    }

    fn same_peer(&self, i: usize, j: usize) -> bool {
        let len = self.namelens[i];
        if len != self.namelens[j] {
            return false;
        }
        let len = (len as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
        // SAFETY: both are sockaddr_storage values we own; we read `len`
        // bytes of each, within their size.
        let (a, b) = unsafe {
            (
                std::slice::from_raw_parts(
                    (&self.names[i] as *const libc::sockaddr_storage).cast::<u8>(),
                    len,
                ),
                std::slice::from_raw_parts(
                    (&self.names[j] as *const libc::sockaddr_storage).cast::<u8>(),
                    len,
                ),
            )
        };
        a == b
    }

    /// Groups datagrams `from..n` into messages (GSO runs when enabled)
    /// and points the headers at them; returns how many messages.
    fn build_runs(&mut self, from: usize, n: usize, names: bool) -> usize {
        let mut m = 0;
        let mut i = from;
        // Bounded: each pass takes at least one datagram.
        while i < n {
            let seg = self.iov[i].iov_len;
            let mut j = i + 1;
            if self.gso {
                while j < n
                    && j - i < GSO_MAX_SEGMENTS
                    && (j - i + 1) * seg <= GSO_MAX_BYTES
                    && self.iov[j].iov_len <= seg
                    && (!names || self.same_peer(i, j))
                {
                    j += 1;
                    // A shorter datagram can only end a run.
                    if self.iov[j - 1].iov_len < seg {
                        break;
                    }
                }
            }
            self.runs[m] = (i, j - i);
            let h = &mut self.hdrs[m].msg_hdr;
            h.msg_iov = &mut self.iov[i];
            h.msg_iovlen = j - i;
            h.msg_flags = 0;
            if names {
                h.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
                h.msg_namelen = self.namelens[i];
            } else {
                h.msg_name = std::ptr::null_mut();
                h.msg_namelen = 0;
            }
            if j - i > 1 {
                let c = &mut self.ctrl[m];
                *c = [0; 4];
                let cm = c.as_mut_ptr().cast::<libc::cmsghdr>();
                // SAFETY: `c` is 32 bytes, 8-aligned: room for a cmsghdr
                // and a u16 (CMSG_SPACE(2) = 24 on 64-bit Linux).
                unsafe {
                    (*cm).cmsg_level = libc::SOL_UDP;
                    (*cm).cmsg_type = libc::UDP_SEGMENT;
                    (*cm).cmsg_len = libc::CMSG_LEN(2) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(cm).cast::<u16>(), seg as u16);
                }
                h.msg_control = c.as_mut_ptr().cast();
                // SAFETY: CMSG_SPACE is a pure size computation.
                h.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as _;
            } else {
                h.msg_control = std::ptr::null_mut();
                h.msg_controllen = 0;
            }
            m += 1;
            i = j;
        }
        m
    }

    /// Sends entries `0..lens.len()` (`lens[i]` bytes of slot `i`) with one
    /// `sendmmsg` call or a few: to the addresses `recv` stored if `names`,
    /// else on a connected socket. A message the kernel refuses is skipped
    /// (the first error is kept); a full socket buffer drops the rest.
    pub fn send(&mut self, fd: RawFd, lens: &[usize], names: bool) -> Sent {
        let n = lens.len().min(self.capacity());
        for (i, &len) in lens.iter().enumerate().take(n) {
            self.point(i, len);
        }
        let mut out = Sent::default();
        let mut from = 0;
        // Bounded: at most one restart, when GSO is refused and turned off.
        for _ in 0..2 {
            let msgs = self.build_runs(from, n, names);
            match self.send_msgs(fd, msgs, &mut out) {
                Some(restart) => {
                    self.gso = false;
                    from = restart;
                }
                None => break,
            }
        }
        out
    }

    /// sendmmsg of messages `0..msgs` (sendmsg one by one when plain); Some(first datagram of the message)
    /// if GSO was refused there (nothing from it on was sent).
    fn send_msgs(&mut self, fd: RawFd, msgs: usize, out: &mut Sent) -> Option<usize> {
        let mut off = 0;
        // Bounded: each pass sends or skips at least one message, or stops.
        for _ in 0..2 * msgs + 100 {
            if off >= msgs {
                break;
            }
            let r = if self.single {
                // SAFETY: `hdrs[off]` is a valid msghdr pointing into our
                // buffers, which the kernel only reads.
                match unsafe { libc::sendmsg(fd, &self.hdrs[off].msg_hdr, 0) } {
                    r if r >= 0 => 1,
                    _ => -1,
                }
            } else {
                // SAFETY: `hdrs[off..msgs]` are valid mmsghdrs pointing into our
                // buffers, which the kernel only reads (it writes `msg_len`).
                unsafe {
                    libc::sendmmsg(
                        fd,
                        self.hdrs.as_mut_ptr().add(off),
                        (msgs - off) as libc::c_uint,
                        0,
                    )
                }
            };
            if r > 0 {
                let r = r as usize;
                out.sent += self.runs[off..off + r].iter().map(|x| x.1).sum::<usize>();
                off += r;
                continue;
            }
            let e = std::io::Error::last_os_error();
            let (first, count) = self.runs[off];
            match e.kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => {
                    out.error.get_or_insert(e);
                    break;
                }
                _ if count > 1 && gso_refused(&e) => return Some(first),
                _ => {
                    out.error.get_or_insert(e);
                    off += 1;
                }
            }
        }
        None
    }

    /// Sends back what the last `recv(.., names = true)` got, `n` datagrams.
    pub fn echo_back(&mut self, fd: RawFd, n: usize) -> Sent {
        let lens = std::mem::take(&mut self.lens);
        let r = self.send(fd, &lens[..n.min(lens.len())], true);
        self.lens = lens;
        r
    }
}
