//! Sockets as the ring sees them, and the ring's registered file table.
//!
//! After accept (client) or connect (target), a socket is installed into a free slot of the
//! ring's fixed-file table and its ordinary fd is closed. An established connection then holds
//! no process fd at all, so the number of connections is bounded by memory rather than by
//! RLIMIT_NOFILE (which cannot always be raised: without CAP_SYS_RESOURCE the hard limit is
//! fixed), and ops on fixed files skip the per-op fd lookup and refcount. When the table is
//! full, sockets simply stay ordinary fds.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use io_uring::Submitter;

/// A socket owned by a connection: an ordinary fd, or a slot in the ring's fixed-file table.
/// Give it back with `Engine::close`; a fixed slot is only released that way.
#[derive(Debug)]
pub(crate) struct Sock(pub(super) SockRepr);

#[derive(Debug)]
pub(super) enum SockRepr {
    Fd(OwnedFd),
    Fixed(u32),
    /// A socket of the recording fake engine (no kernel object behind it).
    #[cfg(test)]
    Fake(u32),
}

/// What an SQE names: an fd or a fixed-file index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Target {
    Fd(RawFd),
    Fixed(u32),
}

impl Sock {
    pub(super) fn target(&self) -> Target {
        match &self.0 {
            SockRepr::Fd(s) => Target::Fd(s.as_raw_fd()),
            SockRepr::Fixed(i) => Target::Fixed(*i),
            #[cfg(test)]
            SockRepr::Fake(_) => unreachable!("a fake socket reached the kernel ring"),
        }
    }

    /// The fake engine's id of this socket.
    #[cfg(test)]
    pub(crate) fn fake_id(&self) -> u32 {
        match &self.0 {
            SockRepr::Fake(i) => *i,
            _ => unreachable!("a kernel socket reached the fake engine"),
        }
    }
}

pub(super) struct FileTable {
    free: Vec<u32>,
    size: u32,
}

impl FileTable {
    /// Registers the largest sparse table the kernel allows (it caps one table at
    /// RLIMIT_NOFILE), trying `want` first.
    pub(super) fn new(submitter: &Submitter<'_>, want: u32) -> FileTable {
        let cap = u32::try_from(super::sys::nofile_soft()).unwrap_or(u32::MAX);
        let mut size = want.min(cap);
        while size >= 64 {
            if submitter.register_files_sparse(size).is_ok() {
                return FileTable {
                    // Pop from the end: low slots first.
                    free: (0..size).rev().collect(),
                    size,
                };
            }
            size /= 2;
        }
        FileTable {
            free: Vec::new(),
            size: 0,
        }
    }

    pub(super) fn in_use(&self) -> u32 {
        self.size - self.free.len() as u32
    }

    pub(super) fn size(&self) -> u32 {
        self.size
    }

    /// Moves `fd` into the table if there is room; its ordinary fd is closed then.
    pub(super) fn install(&mut self, submitter: &Submitter<'_>, fd: OwnedFd) -> Sock {
        let Some(idx) = self.free.pop() else {
            return Sock(SockRepr::Fd(fd));
        };
        match submitter.register_files_update(idx, &[fd.as_raw_fd()]) {
            Ok(_) => Sock(SockRepr::Fixed(idx)),
            Err(_) => {
                self.free.push(idx);
                Sock(SockRepr::Fd(fd))
            }
        }
    }

    /// Closes a socket. Call only when no op on it is in flight.
    pub(super) fn remove(&mut self, submitter: &Submitter<'_>, sock: Sock) {
        if let SockRepr::Fixed(idx) = sock.0 {
            // Clearing the slot drops the table's reference: the socket closes.
            match submitter.register_files_update(idx, &[-1]) {
                Ok(_) => self.free.push(idx),
                Err(e) => tracing::warn!(slot = idx, error = %e,
                    "could not clear a fixed-file slot; it stays in use"),
            }
        }
        // An ordinary fd closes as `sock` drops.
    }
}
