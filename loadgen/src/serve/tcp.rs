//! The TCP servers: echo, discard, source and hold.
//!
//! Blocking I/O on a pool of threads per listener that grows on demand:
//! each worker accepts a connection, serves it to the end and accepts
//! again, so ping-pong and bulk streams need no readiness round trip and
//! short connections (tcp-cps) cost no thread creation. The hold listener
//! (for `idle`) only accepts and keeps its connections.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use super::target::Counters;

/// Worker threads per listener at most; beyond this, connections wait
/// in the accept queue.
const MAX_WORKERS: usize = 4096;
/// Stack of a worker: buffers are on the heap.
pub(super) const WORKER_STACK: usize = 128 * 1024;
/// Bytes per `read`/`write` of a bulk stream, on both ends: 128 KiB, iperf3's default, so that
/// loadgen's bulk rows see what an ordinary client's writes see (results/2026-12-02-iperf-write-size.md:
/// the write size changes which forwarding path is ahead).
pub const BULK_BUF: usize = 128 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Echo,
    Discard,
    Source,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Echo => "tcp-echo",
            Kind::Discard => "tcp-discard",
            Kind::Source => "tcp-source",
        }
    }
}

struct Pool {
    listener: TcpListener,
    kind: Kind,
    counters: Arc<Counters>,
    idle: AtomicUsize,
    /// Spawned but not yet waiting in accept: at most one at a time, so a
    /// busy CPU that delays new threads does not make the pool balloon.
    starting: AtomicUsize,
    workers: AtomicUsize,
}

pub(super) fn start_pool(
    listener: TcpListener,
    kind: Kind,
    counters: Arc<Counters>,
) -> std::io::Result<()> {
    let pool = Arc::new(Pool {
        listener,
        kind,
        counters,
        idle: AtomicUsize::new(0),
        starting: AtomicUsize::new(1),
        workers: AtomicUsize::new(1),
    });
    spawn_worker(pool)
}

fn spawn_worker(pool: Arc<Pool>) -> std::io::Result<()> {
    thread::Builder::new()
        .name(pool.kind.name().into())
        .stack_size(WORKER_STACK)
        .spawn(move || worker(pool))?;
    Ok(())
}

fn worker(pool: Arc<Pool>) {
    let mut buf = vec![
        0u8;
        if pool.kind == Kind::Echo {
            64 * 1024
        } else {
            BULK_BUF
        }
    ];
    if pool.kind == Kind::Source {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = i as u8;
        }
    }
    pool.idle.fetch_add(1, Ordering::AcqRel);
    pool.starting.fetch_sub(1, Ordering::AcqRel);
    loop {
        let accepted = pool.listener.accept();
        // Last idle worker taken: add one so the next connection is
        // accepted at once.
        if pool.idle.fetch_sub(1, Ordering::AcqRel) == 1
            && pool.starting.load(Ordering::Acquire) == 0
            && pool.workers.load(Ordering::Relaxed) < MAX_WORKERS
        {
            pool.starting.fetch_add(1, Ordering::AcqRel);
            pool.workers.fetch_add(1, Ordering::AcqRel);
            if spawn_worker(pool.clone()).is_err() {
                pool.starting.fetch_sub(1, Ordering::AcqRel);
                pool.workers.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(_) => {
                // EMFILE and the like: back off instead of spinning.
                pool.idle.fetch_add(1, Ordering::AcqRel);
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        pool.counters.accepted.fetch_add(1, Ordering::Relaxed);
        match pool.kind {
            Kind::Echo => echo(stream, &mut buf, &pool.counters),
            Kind::Discard => discard(stream, &mut buf, &pool.counters),
            Kind::Source => source(stream, &buf, &pool.counters),
        }
        pool.idle.fetch_add(1, Ordering::AcqRel);
    }
}

fn echo(mut s: TcpStream, buf: &mut [u8], c: &Counters) {
    let _ = s.set_nodelay(true);
    loop {
        let n = match s.read(buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        c.echo_bytes.fetch_add(n as u64, Ordering::Relaxed);
        if s.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

fn discard(mut s: TcpStream, buf: &mut [u8], c: &Counters) {
    let count = Arc::new(AtomicU64::new(0));
    c.discard.lock().unwrap().push(count.clone());
    loop {
        match s.read(buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => count.fetch_add(n as u64, Ordering::Relaxed),
        };
    }
}

fn source(mut s: TcpStream, buf: &[u8], c: &Counters) {
    loop {
        match s.write(buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => c.source_bytes.fetch_add(n as u64, Ordering::Relaxed),
        };
    }
}

pub(super) fn hold_loop(l: TcpListener, c: Arc<Counters>) {
    loop {
        match l.accept() {
            Ok((s, _)) => {
                c.accepted.fetch_add(1, Ordering::Relaxed);
                c.held.lock().unwrap().push(s);
            }
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}
