//! The per-shard pipe pool for the splice path.
//!
//! A pipe belongs to a connection direction only while it holds bytes: it is taken when data
//! is ready to move and given back once drained. Idle connections therefore hold no pipe, and
//! the per-user pipe budget (`pipe-user-pages-soft`) is spent only on connections that are
//! moving data at this instant.

use std::cell::Cell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;

/// A pipe lent by the pool. Its capacity is what the kernel granted, which is less than the
/// pool asked for once the user's pipe budget is spent.
#[derive(Debug)]
pub(crate) struct Pipe {
    pub(super) ends: PipeEnds,
    capacity: u32,
    /// The pool's count of open pipes, decremented when this one closes.
    open: Option<Rc<Cell<u32>>>,
}

impl Drop for Pipe {
    fn drop(&mut self) {
        if let Some(open) = &self.open {
            open.set(open.get().saturating_sub(1));
        }
    }
}

#[derive(Debug)]
pub(super) enum PipeEnds {
    Os {
        r: OwnedFd,
        w: OwnedFd,
    },
    /// A pipe of the recording fake engine.
    #[cfg(test)]
    Fake(u32),
}

impl Pipe {
    /// Bytes the pipe holds at most: what one splice into it may move.
    pub(crate) fn capacity(&self) -> u32 {
        self.capacity
    }

    pub(super) fn read_fd(&self) -> RawFd {
        match &self.ends {
            PipeEnds::Os { r, .. } => r.as_raw_fd(),
            #[cfg(test)]
            PipeEnds::Fake(_) => unreachable!("a fake pipe reached the kernel ring"),
        }
    }

    pub(super) fn write_fd(&self) -> RawFd {
        match &self.ends {
            PipeEnds::Os { w, .. } => w.as_raw_fd(),
            #[cfg(test)]
            PipeEnds::Fake(_) => unreachable!("a fake pipe reached the kernel ring"),
        }
    }

    #[cfg(test)]
    pub(super) fn fake(id: u32, capacity: u32) -> Pipe {
        Pipe {
            ends: PipeEnds::Fake(id),
            capacity,
            open: None,
        }
    }

    #[cfg(test)]
    pub(crate) fn fake_id(&self) -> u32 {
        match &self.ends {
            PipeEnds::Fake(i) => *i,
            PipeEnds::Os { .. } => unreachable!("a kernel pipe reached the fake engine"),
        }
    }
}

pub(super) struct PipePool {
    free: Vec<Pipe>,
    max_idle: usize,
    pipe_size: usize,
    /// Pipes open: idle here or lent (closing one, however it is dropped, counts down).
    open: Rc<Cell<u32>>,
}

impl PipePool {
    pub(super) fn new(max_idle: usize, pipe_size: usize) -> PipePool {
        PipePool {
            free: Vec::new(),
            max_idle,
            pipe_size,
            open: Rc::new(Cell::new(0)),
        }
    }

    pub(super) fn take(&mut self) -> io::Result<Pipe> {
        if let Some(p) = self.free.pop() {
            return Ok(p);
        }
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two fds into the array on success; no op is involved.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds were just created by pipe2 and are owned by nobody else.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A larger pipe moves more per splice. When the budget is spent the kernel refuses,
        // and the pipe keeps its default size: ask what it has.
        // SAFETY: fcntl on an fd we own; F_SETPIPE_SZ and F_GETPIPE_SZ take an int or nothing.
        let capacity = unsafe {
            libc::fcntl(
                w.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                self.pipe_size as libc::c_int,
            );
            libc::fcntl(w.as_raw_fd(), libc::F_GETPIPE_SZ)
        };
        self.open.set(self.open.get() + 1);
        Ok(Pipe {
            ends: PipeEnds::Os { r, w },
            capacity: u32::try_from(capacity).unwrap_or(4096).max(4096),
            open: Some(Rc::clone(&self.open)),
        })
    }

    /// (pipes open, of which idle in the pool).
    pub(super) fn counts(&self) -> (u32, u32) {
        (self.open.get(), self.free.len() as u32)
    }

    /// Takes back a pipe that holds no bytes (the caller's `in_pipe` count is zero).
    pub(super) fn give(&mut self, pipe: Pipe) {
        if self.free.len() < self.max_idle {
            self.free.push(pipe);
        }
    }
}
