//! The ring's registered file table: where established sockets live.
//!
//! After accept (client) or connect (target), a socket is installed into a free slot of the
//! ring's fixed-file table and its ordinary fd is closed. An established connection then holds
//! no process fd at all, so the number of connections is bounded by memory rather than by
//! RLIMIT_NOFILE (which cannot always be raised: without CAP_SYS_RESOURCE the hard limit is
//! fixed), and ops on fixed files skip the per-op fd lookup and refcount. When the table is
//! full, sockets simply stay ordinary fds.

use std::os::fd::AsRawFd;

use socket2::Socket;

use super::ring::{Ring, Target};

/// A socket owned by a connection: an ordinary fd, or a slot in the fixed-file table.
pub enum SockHandle {
    Fd(Socket),
    Fixed(u32),
}

impl SockHandle {
    pub fn target(&self) -> Target {
        match self {
            SockHandle::Fd(s) => Target::Fd(s.as_raw_fd()),
            SockHandle::Fixed(i) => Target::Fixed(*i),
        }
    }
}

pub struct FileTable {
    free: Vec<u32>,
    size: u32,
}

impl FileTable {
    /// Registers the largest sparse table the kernel allows (it caps one table at
    /// RLIMIT_NOFILE), trying `want` first.
    pub fn new(ring: &Ring, want: u32) -> FileTable {
        let cap = u32::try_from(super::sys::nofile_soft()).unwrap_or(u32::MAX);
        let mut size = want.min(cap);
        while size >= 64 {
            if ring.submitter().register_files_sparse(size).is_ok() {
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

    pub fn size(&self) -> u32 {
        self.size
    }

    /// Moves `sock` into the table if there is room; its ordinary fd is closed then.
    pub fn install(&mut self, ring: &Ring, sock: Socket) -> SockHandle {
        let Some(idx) = self.free.pop() else {
            return SockHandle::Fd(sock);
        };
        match ring
            .submitter()
            .register_files_update(idx, &[sock.as_raw_fd()])
        {
            Ok(_) => SockHandle::Fixed(idx),
            Err(_) => {
                self.free.push(idx);
                SockHandle::Fd(sock)
            }
        }
    }

    /// Closes a socket. Call only when no op on it is in flight.
    pub fn remove(&mut self, ring: &Ring, h: SockHandle) {
        if let SockHandle::Fixed(idx) = h {
            // Clearing the slot drops the table's reference: the socket closes.
            if ring.submitter().register_files_update(idx, &[-1]).is_ok() {
                self.free.push(idx);
            }
        }
    }
}
