//! The per-shard pipe pool for the splice path.
//!
//! A pipe belongs to a connection direction only while it holds bytes: it is taken when data
//! is ready to move and given back once drained. Idle connections therefore hold no pipe, and
//! the per-user pipe budget (`pipe-user-pages-soft`) is spent only on connections that are
//! moving data at this instant.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

impl Pipe {
    pub fn read_fd(&self) -> RawFd {
        self.r.as_raw_fd()
    }
    pub fn write_fd(&self) -> RawFd {
        self.w.as_raw_fd()
    }
}

pub struct PipePool {
    free: Vec<Pipe>,
    max_idle: usize,
    pipe_size: usize,
}

impl PipePool {
    pub fn new(max_idle: usize, pipe_size: usize) -> PipePool {
        PipePool {
            free: Vec::new(),
            max_idle,
            pipe_size,
        }
    }

    /// Bytes one pipe can hold (what a single splice into it may move).
    pub fn pipe_size(&self) -> usize {
        self.pipe_size
    }

    pub fn take(&mut self) -> io::Result<Pipe> {
        if let Some(p) = self.free.pop() {
            return Ok(p);
        }
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two fds into the array on success.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds were just created by pipe2 and are owned by nobody else.
        let pipe = unsafe {
            Pipe {
                r: OwnedFd::from_raw_fd(fds[0]),
                w: OwnedFd::from_raw_fd(fds[1]),
            }
        };
        // A larger pipe moves more per splice. Failure (budget exhausted) leaves the default
        // size, which still works.
        // SAFETY: fcntl on an fd we own.
        unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, self.pipe_size as libc::c_int) };
        Ok(pipe)
    }

    /// Returns a drained pipe. The caller must only give back pipes that hold no bytes; a pipe
    /// with bytes left in it (a connection died mid-transfer) is dropped instead.
    pub fn give(&mut self, pipe: Pipe) {
        if self.free.len() < self.max_idle {
            self.free.push(pipe);
        }
    }
}
