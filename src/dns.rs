//! Name resolution for the shards: a small pool of threads calling
//! `getaddrinfo`, with answers delivered back to the shard that asked.
//!
//! A shard is a single-threaded io_uring event loop and must never block, but
//! `getaddrinfo` is blocking (and may take seconds). So lookups that miss the
//! shard's cache are queued to a shared [`Resolver`] pool; the worker puts the
//! answer in the asking shard's mailbox and wakes the shard by writing one byte
//! to a pipe whose read end the shard keeps a `read` op on ([`ShardResolver::wake_fd`]).
//! When that read completes, the shard calls [`ShardResolver::drain`].
//!
//! The per-shard cache lives in the [`ShardResolver`], which only its shard
//! touches, so cache hits take no locks and cost no system call.
//!
//! Wake-ups are coalesced with an atomic "notified" flag: a worker only writes
//! to the pipe if it is the one that set the flag, and `drain` clears the flag
//! *before* emptying the mailbox. Whatever a worker pushes after the mailbox was
//! emptied therefore finds the flag clear and writes a byte, so no answer can be
//! stranded; the worst case is a spurious wake-up that finds an empty mailbox.
//! Because at most one byte per drain is outstanding, the worker's blocking write
//! cannot fill the 64 KiB pipe buffer.

use std::collections::HashMap;
use std::io::{PipeReader, PipeWriter, Write};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::thread;
use std::time::{Duration, Instant};

/// How long a successful answer is reused. `getaddrinfo` does not report the
/// DNS TTL, so this is a fixed, short value: long enough that a burst of
/// connections to one host costs one lookup, short enough that DNS-based
/// failover is followed within half a minute.
pub const POSITIVE_TTL: Duration = Duration::from_secs(30);

/// How long a failed answer (`NotFound` or `Failed`) is reused. Short, so a
/// transient resolver failure heals quickly, but non-zero so that a client
/// retrying a dead name in a loop does not turn into a lookup storm.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(5);

/// Upper bound on cached names per shard, so clients asking for endless
/// distinct names cannot grow a shard's memory without limit. Each entry is a
/// few hundred bytes at most, so the bound is ~1 MiB per shard.
pub const CACHE_CAPACITY: usize = 4096;

/// Longest name passed to `getaddrinfo`; a DNS name cannot be longer (RFC 1035),
/// and SOCKS5 cannot carry a longer one anyway.
const MAX_NAME_LEN: usize = 255;

/// Addresses of one answer, with the requested port applied.
///
/// `Rc` rather than `Arc`: answers are produced and consumed on the shard
/// thread (the workers send plain `Vec`s), and a cache hit only bumps a
/// non-atomic count when the port matches the cached one.
pub type Addrs = Rc<[SocketAddr]>;

/// Why a name did not resolve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolveError {
    /// The name does not exist or has no addresses (NXDOMAIN, NODATA).
    NotFound,
    /// Temporary or other failure, or a name that cannot be looked up at all
    /// (not UTF-8, contains NUL, empty or too long).
    Failed,
}

/// A queued lookup. The mailbox is weak so that work for a shard that has
/// gone away is skipped instead of resolved and thrown away.
struct Job {
    name: String,
    port: u16,
    token: u64,
    mailbox: Weak<Mailbox>,
}

/// A finished lookup, travelling from a worker to the shard.
struct Answer {
    key: Box<[u8]>,
    port: u16,
    token: u64,
    result: Result<Vec<SocketAddr>, ResolveError>,
}

/// Where workers leave answers for one shard.
///
/// The pipe's read end lives here too (not in the `ShardResolver`), so it is
/// closed only after the last worker holding the mailbox is done: a worker
/// can then never write into a pipe without a reader (EPIPE / SIGPIPE), and
/// the fd number handed out by `wake_fd` cannot be reused while a worker
/// might still write to it.
struct Mailbox {
    answers: Mutex<Vec<Answer>>,
    notified: AtomicBool,
    reader: PipeReader,
    writer: PipeWriter,
}

impl Mailbox {
    fn deliver(&self, answer: Answer) {
        self.answers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(answer);
        // Only the worker that flips the flag writes, so at most one byte is
        // outstanding per drain. The push above is ordered before this swap,
        // which is what `drain` relies on.
        if !self.notified.swap(true, Ordering::AcqRel) {
            loop {
                match (&self.writer).write(&[1]) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    // Other errors cannot happen while we hold the read end
                    // open; if one did, the shard would still pick the answer
                    // up on its next wake-up, so there is nothing better to do.
                    _ => break,
                }
            }
        }
    }
}

/// The thread pool, shared by all shards.
pub struct Resolver {
    // Dropping the last sender (when the last `Arc<Resolver>` goes) makes the
    // workers' `recv` fail, which is how they learn to exit.
    jobs: Sender<Job>,
    // Keeps the queue open for pools without workers, and lets tests watch
    // the workers go away.
    #[cfg(test)]
    queue: Arc<Mutex<Receiver<Job>>>,
}

impl Resolver {
    /// Starts `threads` worker threads named "ringsocks-dns-N" (at least one).
    /// Shared by all shards (Arc).
    ///
    /// Workers are not joined on drop: one stuck in a slow `getaddrinfo` must
    /// not hold up shutdown; it exits as soon as its current lookup returns.
    ///
    /// # Panics
    /// If not a single worker thread can be spawned (the process is out of
    /// threads or memory at startup); with fewer threads than asked for it
    /// logs a warning and carries on.
    pub fn new(threads: usize) -> Arc<Resolver> {
        Self::spawn(threads.max(1))
    }

    /// `new` without the lower bound: tests use 0 workers to get a pool that
    /// accepts jobs but never answers.
    fn spawn(threads: usize) -> Arc<Resolver> {
        let (jobs, rx) = mpsc::channel::<Job>();
        // std's mpsc receiver is single-consumer; a mutex shares it. Only the
        // idle worker parked in `recv` holds it, the others wait for it, which
        // is exactly the queueing we want.
        let rx = Arc::new(Mutex::new(rx));
        let mut started = 0;
        for n in 0..threads {
            let rx = Arc::clone(&rx);
            let spawned = thread::Builder::new()
                .name(format!("ringsocks-dns-{n}"))
                .spawn(move || worker(&rx));
            match spawned {
                Ok(_) => started += 1,
                Err(e) => tracing::warn!("cannot start resolver thread {n}: {e}"),
            }
        }
        assert!(
            started > 0 || threads == 0,
            "cannot start any resolver thread"
        );
        if started < threads {
            tracing::warn!("running with {started} of {threads} resolver threads");
        }
        Arc::new(Resolver {
            jobs,
            #[cfg(test)]
            queue: rx,
        })
    }
}

fn worker(rx: &Mutex<Receiver<Job>>) {
    loop {
        // The guard is a temporary, dropped before the lookup runs.
        let job = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok(job) = job else { return };
        // The shard went away while the job waited: skip the lookup.
        if job.mailbox.strong_count() == 0 {
            continue;
        }
        let result = resolve(&job.name, job.port);
        if let Some(mailbox) = job.mailbox.upgrade() {
            mailbox.deliver(Answer {
                key: job.name.into_bytes().into_boxed_slice(),
                port: job.port,
                token: job.token,
                result,
            });
        }
    }
}

/// The blocking part: getaddrinfo, keeping its (RFC 6724) order, without
/// duplicates (e.g. /etc/hosts listing ::1 twice for localhost).
fn resolve(name: &str, port: u16) -> Result<Vec<SocketAddr>, ResolveError> {
    match (name, port).to_socket_addrs() {
        Ok(iter) => {
            let mut addrs: Vec<SocketAddr> = Vec::new();
            for a in iter {
                if !addrs.contains(&a) {
                    addrs.push(a);
                }
            }
            if addrs.is_empty() {
                Err(ResolveError::NotFound)
            } else {
                Ok(addrs)
            }
        }
        Err(e) => Err(classify(&e)),
    }
}

/// std reports getaddrinfo failures only as text ("failed to lookup address
/// information: " + gai_strerror), without the EAI_* code, and calling
/// getaddrinfo ourselves would need raw FFI. So the definite "no such name"
/// answers are recognised by their glibc and musl messages; everything else
/// (EAI_AGAIN, EAI_FAIL, EAI_SYSTEM, ...) counts as `Failed`, which only makes
/// the SOCKS reply code less specific if a libc words things differently.
fn classify(e: &std::io::Error) -> ResolveError {
    const NOT_FOUND: [&str; 4] = [
        "Name or service not known",                 // glibc EAI_NONAME
        "No address associated with hostname",       // glibc EAI_NODATA
        "Name does not resolve",                     // musl EAI_NONAME
        "Address family for hostname not supported", // EAI_ADDRFAMILY: no usable address
    ];
    let msg = e.to_string();
    if NOT_FOUND.iter().any(|m| msg.contains(m)) {
        ResolveError::NotFound
    } else {
        ResolveError::Failed
    }
}

/// Cache keys are case-folded: DNS names are case-insensitive, and a client
/// varying case must not defeat the cache.
fn cache_key(name: &[u8]) -> Box<[u8]> {
    name.to_ascii_lowercase().into_boxed_slice()
}

fn with_port(addrs: &Addrs, cached_port: u16, port: u16) -> Addrs {
    if cached_port == port {
        Rc::clone(addrs)
    } else {
        addrs
            .iter()
            .map(|a| SocketAddr::new(a.ip(), port))
            .collect()
    }
}

struct Entry {
    /// Addresses carry the port of the lookup that filled the entry.
    result: Result<Addrs, ResolveError>,
    port: u16,
    expires: Instant,
}

/// One per shard, owned by the shard thread. Holds the per-shard cache (no
/// locks on lookup) and the shard's end of the wake-up pipe.
pub struct ShardResolver {
    resolver: Arc<Resolver>,
    mailbox: Arc<Mailbox>,
    // SipHash (the default) on purpose: names come from clients, and a
    // predictable hash would let them force collisions.
    cache: HashMap<Box<[u8]>, Entry>,
}

impl ShardResolver {
    /// Creates the shard's mailbox and wake-up pipe. The pipe is blocking,
    /// which suits io_uring (it polls pipes internally); the shard never reads
    /// it with a plain `read(2)`.
    pub fn new(resolver: Arc<Resolver>) -> std::io::Result<ShardResolver> {
        let (reader, writer) = std::io::pipe()?;
        Ok(ShardResolver {
            resolver,
            mailbox: Arc::new(Mailbox {
                answers: Mutex::new(Vec::new()),
                notified: AtomicBool::new(false),
                reader,
                writer,
            }),
            cache: HashMap::new(),
        })
    }

    /// The fd the shard keeps a read op on; it becomes readable when answers
    /// are ready. It stays open as long as this `ShardResolver` (and possibly a
    /// little longer, until a worker finishes a lookup for it).
    pub fn wake_fd(&self) -> RawFd {
        self.mailbox.reader.as_raw_fd()
    }

    /// Cache hit (positive or negative, not expired) -> `Some(result)`
    /// immediately, with `port` applied to every address. So are names that
    /// need no lookup: IP literals (`Ok`) and names getaddrinfo cannot take
    /// (`Err(Failed)`: not UTF-8, NUL, empty, longer than 255 bytes).
    ///
    /// Miss -> the job is queued to the pool, tagged with `token`, and `None`
    /// is returned; the answer comes back via [`drain`](Self::drain).
    /// Concurrent misses for the same name are each queued (no coalescing:
    /// they are rare, and the cache absorbs everything after the first answer).
    pub fn lookup(
        &mut self,
        name: &[u8],
        port: u16,
        token: u64,
        now: Instant,
    ) -> Option<Result<Addrs, ResolveError>> {
        if name.is_empty() || name.len() > MAX_NAME_LEN || name.contains(&0) {
            return Some(Err(ResolveError::Failed));
        }
        let Ok(text) = std::str::from_utf8(name) else {
            return Some(Err(ResolveError::Failed));
        };
        // Clients sometimes send an address as a "domain name"; answering it
        // here saves a trip through the pool.
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Some(Ok(Rc::from([SocketAddr::new(ip, port)])));
        }

        let key = cache_key(name);
        if let Some(entry) = self.cache.get(&key) {
            if now < entry.expires {
                return Some(match &entry.result {
                    Ok(addrs) => Ok(with_port(addrs, entry.port, port)),
                    Err(e) => Err(*e),
                });
            }
            self.cache.remove(&key);
        }

        let job = Job {
            name: text.to_owned(),
            port,
            token,
            mailbox: Arc::downgrade(&self.mailbox),
        };
        if self.resolver.jobs.send(job).is_err() {
            // Unreachable while we hold the Arc<Resolver> (it owns the
            // sender and the workers only stop when it is dropped), but a
            // lookup that can never be answered must not be left pending.
            return Some(Err(ResolveError::Failed));
        }
        None
    }

    /// Call after the read on `wake_fd` completed (the shard reads the wake-up
    /// bytes itself; this never touches the fd). Hands every finished answer
    /// to `f` and fills the cache. Safe to call spuriously.
    pub fn drain(&mut self, now: Instant, mut f: impl FnMut(u64, Result<Addrs, ResolveError>)) {
        // Clear first, then empty: see the module docs for why this order
        // cannot lose a wake-up.
        self.mailbox.notified.swap(false, Ordering::AcqRel);
        let answers = std::mem::take(
            &mut *self
                .mailbox
                .answers
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for answer in answers {
            let result: Result<Addrs, ResolveError> = answer.result.map(Rc::from);
            self.insert(answer.key, answer.port, result.clone(), now);
            f(answer.token, result);
        }
    }

    fn insert(
        &mut self,
        key: Box<[u8]>,
        port: u16,
        result: Result<Addrs, ResolveError>,
        now: Instant,
    ) {
        let key = cache_key(&key);
        let ttl = if result.is_ok() {
            POSITIVE_TTL
        } else {
            NEGATIVE_TTL
        };
        if self.cache.len() >= CACHE_CAPACITY && !self.cache.contains_key(&key) {
            self.evict(now);
        }
        self.cache.insert(
            key,
            Entry {
                result,
                port,
                expires: now + ttl,
            },
        );
    }

    /// Makes room for one entry: drops everything expired, or failing that the
    /// entry closest to expiry. O(capacity), but it only runs when an answer
    /// arrives at a full cache, never on a hit.
    fn evict(&mut self, now: Instant) {
        self.cache.retain(|_, e| now < e.expires);
        if self.cache.len() < CACHE_CAPACITY {
            return;
        }
        let oldest = self
            .cache
            .iter()
            .min_by_key(|(_, e)| e.expires)
            .map(|(k, _)| k.clone());
        if let Some(k) = oldest {
            self.cache.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    const WAIT: Duration = Duration::from_secs(5);

    /// Waits (at most `WAIT`) for the answer to `token`, the way a shard
    /// would: a read on the wake fd, then `drain`. The read is blocking, so it
    /// runs on a helper thread and the bound comes from `recv_timeout`.
    fn wait_for(sr: &mut ShardResolver, token: u64) -> Result<Addrs, ResolveError> {
        let mut reader = sr.mailbox.reader.try_clone().expect("clone wake fd");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 || tx.send(n).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            rx.recv_timeout(left)
                .expect("no wake-up from the resolver within 5 s");
            let mut got = None;
            sr.drain(Instant::now(), |t, r| {
                if t == token {
                    got = Some(r);
                }
            });
            if let Some(r) = got {
                return r;
            }
        }
    }

    fn addrs(list: &[&str]) -> Addrs {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn localhost_resolves_with_port() {
        let mut sr = ShardResolver::new(Resolver::new(2)).unwrap();
        let now = Instant::now();
        assert!(sr.lookup(b"localhost", 4242, 7, now).is_none());
        let addrs = wait_for(&mut sr, 7).expect("localhost resolves");
        assert!(!addrs.is_empty());
        for a in addrs.iter() {
            assert!(a.ip().is_loopback(), "{a} is not loopback");
            assert_eq!(a.port(), 4242);
        }
        let mut dedup = addrs.to_vec();
        dedup.dedup();
        assert_eq!(dedup.len(), addrs.len(), "duplicates in {addrs:?}");

        // Now cached, under any case and any port.
        let hit = sr
            .lookup(b"LocalHost", 80, 8, Instant::now())
            .expect("cache hit")
            .unwrap();
        assert_eq!(hit.len(), addrs.len());
        assert!(hit.iter().all(|a| a.port() == 80));
    }

    #[test]
    fn invalid_tld_fails() {
        let mut sr = ShardResolver::new(Resolver::new(1)).unwrap();
        assert!(sr
            .lookup(b"nonexistent.invalid", 80, 1, Instant::now())
            .is_none());
        let r = wait_for(&mut sr, 1);
        assert!(
            matches!(r, Err(ResolveError::NotFound | ResolveError::Failed)),
            "{r:?}"
        );
        // ...and the failure is cached.
        assert_eq!(
            sr.lookup(b"nonexistent.invalid", 80, 2, Instant::now()),
            Some(r)
        );
    }

    #[test]
    fn cache_hit_does_not_touch_pool() {
        // No workers: a lookup that reached the pool would never be answered.
        let mut sr = ShardResolver::new(Resolver::spawn(0)).unwrap();
        let t0 = Instant::now();
        let cached = addrs(&["192.0.2.1:443", "[2001:db8::1]:443"]);
        sr.insert(cache_key(b"example.test"), 443, Ok(cached.clone()), t0);

        let same_port = sr.lookup(b"example.test", 443, 1, t0).unwrap().unwrap();
        assert!(Rc::ptr_eq(&same_port, &cached), "same port reuses the Rc");
        let other = sr
            .lookup(b"example.test", 8080, 2, t0 + Duration::from_secs(29))
            .unwrap()
            .unwrap();
        assert_eq!(other, addrs(&["192.0.2.1:8080", "[2001:db8::1]:8080"]));
        assert!(sr.mailbox.answers.lock().unwrap().is_empty());
    }

    #[test]
    fn negative_cache_hit_and_expiry() {
        let mut sr = ShardResolver::new(Resolver::spawn(0)).unwrap();
        let t0 = Instant::now();
        sr.insert(cache_key(b"gone.test"), 1, Err(ResolveError::NotFound), t0);
        assert_eq!(
            sr.lookup(
                b"gone.test",
                80,
                1,
                t0 + NEGATIVE_TTL - Duration::from_millis(1)
            ),
            Some(Err(ResolveError::NotFound))
        );
        // Expired: a miss, queued (and the stale entry is gone).
        assert_eq!(sr.lookup(b"gone.test", 80, 2, t0 + NEGATIVE_TTL), None);
        assert!(sr.cache.is_empty());
    }

    #[test]
    fn positive_expiry() {
        let mut sr = ShardResolver::new(Resolver::spawn(0)).unwrap();
        let t0 = Instant::now();
        sr.insert(cache_key(b"a.test"), 1, Ok(addrs(&["192.0.2.7:1"])), t0);
        let before = t0 + POSITIVE_TTL - Duration::from_millis(1);
        assert!(sr.lookup(b"a.test", 1, 1, before).is_some());
        assert!(sr.lookup(b"a.test", 1, 2, t0 + POSITIVE_TTL).is_none());
    }

    #[test]
    fn drain_fills_cache() {
        let mut sr = ShardResolver::new(Resolver::spawn(0)).unwrap();
        let t0 = Instant::now();
        assert!(sr.lookup(b"x.test", 9, 5, t0).is_none());
        // Play the worker.
        sr.mailbox.deliver(Answer {
            key: b"x.test".to_vec().into_boxed_slice(),
            port: 9,
            token: 5,
            result: Ok(vec!["192.0.2.9:9".parse().unwrap()]),
        });
        assert!(sr.mailbox.notified.load(Ordering::Acquire));
        let mut seen = Vec::new();
        sr.drain(t0, |t, r| seen.push((t, r)));
        assert_eq!(seen, vec![(5, Ok(addrs(&["192.0.2.9:9"])))]);
        assert!(!sr.mailbox.notified.load(Ordering::Acquire));
        assert_eq!(
            sr.lookup(b"x.test", 10, 6, t0),
            Some(Ok(addrs(&["192.0.2.9:10"])))
        );
    }

    #[test]
    fn one_wake_byte_per_drain() {
        let mut sr = ShardResolver::new(Resolver::spawn(0)).unwrap();
        for token in 0..3 {
            sr.mailbox.deliver(Answer {
                key: b"y.test".to_vec().into_boxed_slice(),
                port: 1,
                token,
                result: Err(ResolveError::Failed),
            });
        }
        let mut buf = [0u8; 64];
        let n = (&sr.mailbox.reader).read(&mut buf).unwrap();
        assert_eq!(n, 1);
        let mut tokens = Vec::new();
        sr.drain(Instant::now(), |t, _| tokens.push(t));
        assert_eq!(tokens, vec![0, 1, 2]);
    }

    #[test]
    fn unusable_names_fail_at_once() {
        let mut sr = ShardResolver::new(Resolver::spawn(0)).unwrap();
        let now = Instant::now();
        let long = vec![b'a'; 256];
        for name in [&b"\xff\xfe.test"[..], b"a\0b", b"", &long] {
            assert_eq!(
                sr.lookup(name, 80, 1, now),
                Some(Err(ResolveError::Failed)),
                "{name:?}"
            );
        }
    }

    #[test]
    fn ip_literals_need_no_lookup() {
        let mut sr = ShardResolver::new(Resolver::spawn(0)).unwrap();
        let now = Instant::now();
        assert_eq!(
            sr.lookup(b"192.0.2.3", 80, 1, now),
            Some(Ok(addrs(&["192.0.2.3:80"])))
        );
        assert_eq!(
            sr.lookup(b"2001:db8::3", 81, 2, now),
            Some(Ok(addrs(&["[2001:db8::3]:81"])))
        );
    }

    #[test]
    fn cache_is_bounded() {
        let mut sr = ShardResolver::new(Resolver::spawn(0)).unwrap();
        let t0 = Instant::now();
        let a = addrs(&["192.0.2.1:1"]);
        for i in 0..CACHE_CAPACITY {
            let t = t0 + Duration::from_millis(i as u64);
            sr.insert(
                format!("n{i}.test").into_bytes().into(),
                1,
                Ok(a.clone()),
                t,
            );
        }
        assert_eq!(sr.cache.len(), CACHE_CAPACITY);
        // Full, nothing expired: the entry closest to expiry goes.
        sr.insert(b"new.test".to_vec().into(), 1, Ok(a.clone()), t0);
        assert_eq!(sr.cache.len(), CACHE_CAPACITY);
        assert!(!sr.cache.contains_key(&b"n0.test"[..]));
        assert!(sr.cache.contains_key(&b"new.test"[..]));
        // Everything expired: all of it goes at once.
        let later = t0 + POSITIVE_TTL + Duration::from_secs(10);
        sr.insert(b"last.test".to_vec().into(), 1, Ok(a), later);
        assert_eq!(sr.cache.len(), 1);
    }

    #[test]
    fn gone_shard_does_not_hurt_workers() {
        let resolver = Resolver::new(1);
        let mut sr = ShardResolver::new(Arc::clone(&resolver)).unwrap();
        assert!(sr.lookup(b"localhost", 1, 1, Instant::now()).is_none());
        drop(sr);
        // The pool still works for another shard.
        let mut sr = ShardResolver::new(resolver).unwrap();
        assert!(sr.lookup(b"localhost", 2, 2, Instant::now()).is_none());
        assert!(wait_for(&mut sr, 2).is_ok());
    }

    #[test]
    fn workers_exit_when_resolver_dropped() {
        let resolver = Resolver::new(3);
        let alive = Arc::downgrade(&resolver.queue);
        assert!(alive.strong_count() > 0);
        drop(resolver);
        let deadline = Instant::now() + WAIT;
        while alive.strong_count() > 0 {
            assert!(Instant::now() < deadline, "workers still running");
            thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn classify_messages() {
        let e =
            |m: &str| std::io::Error::other(format!("failed to lookup address information: {m}"));
        assert_eq!(
            classify(&e("Name or service not known")),
            ResolveError::NotFound
        );
        assert_eq!(
            classify(&e("Temporary failure in name resolution")),
            ResolveError::Failed
        );
    }
}
