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
//! touches, so cache hits take no locks and cost no system call. So does the
//! list of names in flight: connections asking for a name already being looked
//! up wait for the same answer (one job per name per shard).
//!
//! A client must not be able to starve the others by asking for names whose
//! servers never answer (each occupies a thread for the whole resolver
//! timeout). So the pool is fair by construction: a job runs only while its
//! parent domain (last two labels) is under a quarter of the threads and its
//! client under half; a job still queued when its connection's connect timeout
//! has passed, or once every connection waiting for it has gone
//! ([`ShardResolver::forget`]), is answered `Failed` without a lookup (and not
//! cached); and the
//! queue is bounded, overall and per domain, a full one failing new lookups at
//! once. Names that answer therefore always find a thread within the time it
//! takes to run one lookup (tests/e2e/dns.rs measures it with 1,000 lookups
//! that never answer in flight).
//!
//! Wake-ups are coalesced with an atomic "notified" flag: a worker only writes
//! to the pipe if it is the one that set the flag, and `drain` clears the flag
//! *before* emptying the mailbox. Whatever a worker pushes after the mailbox was
//! emptied therefore finds the flag clear and writes a byte, so no answer can be
//! stranded; the worst case is a spurious wake-up that finds an empty mailbox.
//! Because at most one byte per drain is outstanding, the worker's blocking write
//! cannot fill the 64 KiB pipe buffer.

use std::collections::{HashMap, VecDeque};
use std::io::{PipeReader, PipeWriter, Write};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
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

/// Lookups that may run at once for names under one parent domain (its last two labels), as a
/// share of the pool's threads: a domain whose servers never answer can hold at most this many
/// threads in `getaddrinfo`, and every other name still finds one free.
const DOMAIN_SHARE_DIVISOR: usize = 4;
/// Lookups that may run at once for one client address, as a share of the pool's threads.
const CLIENT_SHARE_DIVISOR: usize = 2;
/// Lookups waiting for a thread, in all, and under one parent domain. Past these a lookup
/// fails at once (`Failed`, not cached) instead of queueing behind work that may never end.
const MAX_QUEUED: usize = 4096;
const MAX_QUEUED_PER_DOMAIN: usize = 256;
/// How often idle workers look for queued lookups whose deadline has passed.
const SWEEP: Duration = Duration::from_millis(250);

/// A queued lookup. The mailbox is weak so that work for a shard that has
/// gone away is skipped instead of resolved and thrown away.
struct Job {
    name: String,
    port: u16,
    /// The parent domain (fair share) and the asking client, if known.
    domain: Box<str>,
    client: Option<IpAddr>,
    /// Past this the asking connection has given up: the job is answered `Failed` (uncached)
    /// without a lookup.
    deadline: Instant,
    /// Set by the shard when every connection waiting for the name has gone: the job is
    /// answered like an expired one, without a lookup.
    abandoned: Arc<AtomicBool>,
    /// Which lookup of the name this is, so that a late answer of an abandoned one is not
    /// taken for a newer lookup's.
    id: u64,
    mailbox: Weak<Mailbox>,
}

/// A finished lookup, travelling from a worker to the shard.
struct Answer {
    key: Box<[u8]>,
    id: u64,
    port: u16,
    result: Result<Vec<SocketAddr>, ResolveError>,
    /// False for a job that expired in the queue: no lookup ran, so nothing is cached.
    cacheable: bool,
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

/// The queue of the pool and what its workers are running, under one lock (taken once per
/// lookup queued, started and finished: never on a shard's cache hit).
#[derive(Default)]
struct Sched {
    queue: VecDeque<Job>,
    queued_per_domain: HashMap<Box<str>, usize>,
    running_per_domain: HashMap<Box<str>, usize>,
    running_per_client: HashMap<IpAddr, usize>,
    closed: bool,
}

fn bump<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: K) {
    *map.entry(key).or_insert(0) += 1;
}

fn unbump<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl Sched {
    /// Takes the oldest queued job whose domain and client are under their shares; jobs past
    /// their deadline (or whose shard is gone) leave the queue on the way, into `expired`.
    fn next(
        &mut self,
        now: Instant,
        shares: (usize, usize),
        expired: &mut Vec<Job>,
    ) -> Option<Job> {
        let (domain_share, client_share) = shares;
        let mut i = 0;
        while i < self.queue.len() {
            let job = &self.queue[i];
            if job.deadline <= now
                || job.mailbox.strong_count() == 0
                || job.abandoned.load(Ordering::Relaxed)
            {
                let job = self.queue.remove(i).expect("index checked");
                unbump(&mut self.queued_per_domain, &job.domain);
                expired.push(job);
                continue;
            }
            let domain_ok = self
                .running_per_domain
                .get(&job.domain)
                .copied()
                .unwrap_or(0)
                < domain_share;
            let client_ok = job.client.is_none_or(|c| {
                self.running_per_client.get(&c).copied().unwrap_or(0) < client_share
            });
            if domain_ok && client_ok {
                let job = self.queue.remove(i).expect("index checked");
                unbump(&mut self.queued_per_domain, &job.domain);
                bump(&mut self.running_per_domain, job.domain.clone());
                if let Some(c) = job.client {
                    bump(&mut self.running_per_client, c);
                }
                return Some(job);
            }
            i += 1;
        }
        None
    }

    fn finished(&mut self, job: &Job) {
        unbump(&mut self.running_per_domain, &job.domain);
        if let Some(c) = job.client {
            unbump(&mut self.running_per_client, &c);
        }
    }
}

struct Pool {
    sched: Mutex<Sched>,
    /// Signalled when a job is queued or one finishes (which may make others eligible).
    work: Condvar,
    /// (per parent domain, per client) lookups running at once at most.
    shares: (usize, usize),
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Sched> {
        self.sched.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The thread pool, shared by all shards.
///
/// Fair by construction rather than fast by luck: a lookup runs only while its parent
/// domain and its client are under their shares of the threads, waits at most until its
/// connection's deadline, and the queue is bounded overall and per domain. So names whose
/// servers never answer can hold only their domain's share of the threads, and a name that
/// is answered at once still finds a free one.
pub struct Resolver {
    pool: Arc<Pool>,
}

impl Drop for Resolver {
    fn drop(&mut self) {
        // Workers exit once they see the pool closed (those inside getaddrinfo, after it).
        self.pool.lock().closed = true;
        self.pool.work.notify_all();
    }
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

    /// Lookups waiting for a thread, over all shards (for the metrics; takes the lock).
    pub fn queue_depth(&self) -> usize {
        self.pool.sched.lock().map_or(0, |s| s.queue.len())
    }

    /// `new` without the lower bound: tests use 0 workers to get a pool that
    /// accepts jobs but never answers.
    fn spawn(threads: usize) -> Arc<Resolver> {
        let pool = Arc::new(Pool {
            sched: Mutex::new(Sched::default()),
            work: Condvar::new(),
            shares: (
                (threads / DOMAIN_SHARE_DIVISOR).max(1),
                (threads / CLIENT_SHARE_DIVISOR).max(1),
            ),
        });
        let mut started = 0;
        for n in 0..threads {
            let pool = Arc::clone(&pool);
            let spawned = thread::Builder::new()
                .name(format!("ringsocks-dns-{n}"))
                .spawn(move || worker(&pool));
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
        Arc::new(Resolver { pool })
    }

    /// Queues a job; false when the queue (overall or for the job's domain) is full or the
    /// pool is closed.
    fn submit(&self, job: Job) -> bool {
        let mut sched = self.pool.lock();
        if sched.closed
            || sched.queue.len() >= MAX_QUEUED
            || sched
                .queued_per_domain
                .get(&job.domain)
                .copied()
                .unwrap_or(0)
                >= MAX_QUEUED_PER_DOMAIN
        {
            return false;
        }
        bump(&mut sched.queued_per_domain, job.domain.clone());
        sched.queue.push_back(job);
        drop(sched);
        self.pool.work.notify_one();
        true
    }
}

fn worker(pool: &Pool) {
    let mut expired = Vec::new();
    loop {
        let job = {
            let mut sched = pool.lock();
            loop {
                if sched.closed {
                    return;
                }
                let job = sched.next(Instant::now(), pool.shares, &mut expired);
                if job.is_some() || !expired.is_empty() {
                    break job;
                }
                sched = pool
                    .work
                    .wait_timeout(sched, SWEEP)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        };
        // Their connections have given up: answer without a lookup, and cache nothing.
        for job in expired.drain(..) {
            answer(job, Err(ResolveError::Failed), false);
        }
        let Some(job) = job else { continue };
        let result = resolve(&job.name, job.port);
        pool.lock().finished(&job);
        // Others may be eligible now that this domain and client run one fewer.
        pool.work.notify_all();
        answer(job, result, true);
    }
}

/// Hands a job's outcome to its shard (if it is still there).
fn answer(job: Job, result: Result<Vec<SocketAddr>, ResolveError>, cacheable: bool) {
    if let Some(mailbox) = job.mailbox.upgrade() {
        mailbox.deliver(Answer {
            key: job.name.into_bytes().into_boxed_slice(),
            id: job.id,
            port: job.port,
            result,
            cacheable,
        });
    }
}

/// The parent domain of a name for the fair share: its last two labels ("a.b.example.com" ->
/// "example.com"), case-folded; a name of one or two labels is its own.
fn parent_domain(name: &str) -> Box<str> {
    let name = name.trim_end_matches('.');
    let cut = name.rmatch_indices('.').nth(1).map_or(0, |(i, _)| i + 1);
    name[cut..].to_ascii_lowercase().into_boxed_str()
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

/// A name being looked up for this shard.
struct Pending {
    waiters: Vec<(u64, u16)>,
    abandoned: Arc<AtomicBool>,
    id: u64,
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
    /// How long a queued lookup may wait for a thread (the connect timeout: after it, the
    /// connection that asked has given up).
    patience: Duration,
    /// Names being looked up, with the connections waiting for each: a second connection
    /// asking for a name in flight waits for the same answer.
    pending: HashMap<Box<[u8]>, Pending>,
    /// Numbers lookups, so that an answer is matched to the lookup that asked for it.
    next_id: u64,
    // SipHash (the default) on purpose: names come from clients, and a
    // predictable hash would let them force collisions.
    cache: HashMap<Box<[u8]>, Entry>,
}

impl ShardResolver {
    /// A new connect timeout (a reload), for lookups queued from now on.
    pub fn set_patience(&mut self, patience: Duration) {
        self.patience = patience;
    }

    /// Creates the shard's mailbox and wake-up pipe. The pipe is blocking,
    /// which suits io_uring (it polls pipes internally); the shard never reads
    /// it with a plain `read(2)`.
    pub fn new(resolver: Arc<Resolver>, patience: Duration) -> std::io::Result<ShardResolver> {
        let (reader, writer) = std::io::pipe()?;
        Ok(ShardResolver {
            resolver,
            patience,
            pending: HashMap::new(),
            next_id: 0,
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
    /// Miss -> the job is queued to the pool for `client` (its fair share), tagged with
    /// `token`, and `None` is returned; the answer comes back via [`drain`](Self::drain).
    /// A miss for a name already in flight waits for that lookup's answer. A full queue
    /// fails at once (`Err(Failed)`, not cached).
    pub fn lookup(
        &mut self,
        name: &[u8],
        port: u16,
        token: u64,
        client: Option<IpAddr>,
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

        if let Some(p) = self.pending.get_mut(&key) {
            p.waiters.push((token, port));
            return None;
        }
        self.next_id += 1;
        let abandoned = Arc::new(AtomicBool::new(false));
        let job = Job {
            name: text.to_owned(),
            port,
            domain: parent_domain(text),
            client,
            deadline: now + self.patience,
            abandoned: Arc::clone(&abandoned),
            id: self.next_id,
            mailbox: Arc::downgrade(&self.mailbox),
        };
        if !self.resolver.submit(job) {
            return Some(Err(ResolveError::Failed));
        }
        let waiters = vec![(token, port)];
        let id = self.next_id;
        self.pending.insert(
            key,
            Pending {
                waiters,
                abandoned,
                id,
            },
        );
        None
    }

    /// The connection behind `token` no longer waits for its lookup (it closed). A name
    /// nobody waits for any more is abandoned: still queued, it is dropped without a lookup.
    pub fn forget(&mut self, token: u64) {
        let mut emptied = None;
        for (key, p) in self.pending.iter_mut() {
            if let Some(i) = p.waiters.iter().position(|w| w.0 == token) {
                p.waiters.swap_remove(i);
                if p.waiters.is_empty() {
                    p.abandoned.store(true, Ordering::Relaxed);
                    emptied = Some(key.clone());
                }
                break;
            }
        }
        if let Some(key) = emptied {
            self.pending.remove(&key);
        }
    }

    /// Names being looked up for this shard (each once, however many connections wait).
    pub fn in_flight(&self) -> usize {
        self.pending.len()
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
            let key = cache_key(&answer.key);
            let result: Result<Addrs, ResolveError> = answer.result.map(Rc::from);
            if answer.cacheable {
                self.insert(key.clone(), answer.port, result.clone(), now);
            }
            // The waiters of this very lookup (not of a newer one of the same name, after
            // this one was abandoned).
            let waiters = match self.pending.get(&key) {
                Some(p) if p.id == answer.id => self.pending.remove(&key).map(|p| p.waiters),
                _ => None,
            };
            for (token, port) in waiters.unwrap_or_default() {
                let result = match &result {
                    Ok(addrs) => Ok(with_port(addrs, answer.port, port)),
                    Err(e) => Err(*e),
                };
                f(token, result);
            }
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
    use std::sync::mpsc;

    const WAIT: Duration = Duration::from_secs(5);
    const PATIENCE: Duration = Duration::from_secs(10);

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
        let mut sr = ShardResolver::new(Resolver::new(2), PATIENCE).unwrap();
        let now = Instant::now();
        assert!(sr.lookup(b"localhost", 4242, 7, None, now).is_none());
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
            .lookup(b"LocalHost", 80, 8, None, Instant::now())
            .expect("cache hit")
            .unwrap();
        assert_eq!(hit.len(), addrs.len());
        assert!(hit.iter().all(|a| a.port() == 80));
    }

    #[test]
    fn invalid_tld_fails() {
        let mut sr = ShardResolver::new(Resolver::new(1), PATIENCE).unwrap();
        assert!(sr
            .lookup(b"nonexistent.invalid", 80, 1, None, Instant::now())
            .is_none());
        let r = wait_for(&mut sr, 1);
        assert!(
            matches!(r, Err(ResolveError::NotFound | ResolveError::Failed)),
            "{r:?}"
        );
        // ...and the failure is cached.
        assert_eq!(
            sr.lookup(b"nonexistent.invalid", 80, 2, None, Instant::now()),
            Some(r)
        );
    }

    #[test]
    fn cache_hit_does_not_touch_pool() {
        // No workers: a lookup that reached the pool would never be answered.
        let mut sr = ShardResolver::new(Resolver::spawn(0), PATIENCE).unwrap();
        let t0 = Instant::now();
        let cached = addrs(&["192.0.2.1:443", "[2001:db8::1]:443"]);
        sr.insert(cache_key(b"example.test"), 443, Ok(cached.clone()), t0);

        let same_port = sr
            .lookup(b"example.test", 443, 1, None, t0)
            .unwrap()
            .unwrap();
        assert!(Rc::ptr_eq(&same_port, &cached), "same port reuses the Rc");
        let other = sr
            .lookup(b"example.test", 8080, 2, None, t0 + Duration::from_secs(29))
            .unwrap()
            .unwrap();
        assert_eq!(other, addrs(&["192.0.2.1:8080", "[2001:db8::1]:8080"]));
        assert!(sr.mailbox.answers.lock().unwrap().is_empty());
    }

    #[test]
    fn negative_cache_hit_and_expiry() {
        let mut sr = ShardResolver::new(Resolver::spawn(0), PATIENCE).unwrap();
        let t0 = Instant::now();
        sr.insert(cache_key(b"gone.test"), 1, Err(ResolveError::NotFound), t0);
        assert_eq!(
            sr.lookup(
                b"gone.test",
                80,
                1,
                None,
                t0 + NEGATIVE_TTL - Duration::from_millis(1)
            ),
            Some(Err(ResolveError::NotFound))
        );
        // Expired: a miss, queued (and the stale entry is gone).
        assert_eq!(
            sr.lookup(b"gone.test", 80, 2, None, t0 + NEGATIVE_TTL),
            None
        );
        assert!(sr.cache.is_empty());
    }

    #[test]
    fn positive_expiry() {
        let mut sr = ShardResolver::new(Resolver::spawn(0), PATIENCE).unwrap();
        let t0 = Instant::now();
        sr.insert(cache_key(b"a.test"), 1, Ok(addrs(&["192.0.2.7:1"])), t0);
        let before = t0 + POSITIVE_TTL - Duration::from_millis(1);
        assert!(sr.lookup(b"a.test", 1, 1, None, before).is_some());
        assert!(sr
            .lookup(b"a.test", 1, 2, None, t0 + POSITIVE_TTL)
            .is_none());
    }

    #[test]
    fn drain_fills_cache() {
        let mut sr = ShardResolver::new(Resolver::spawn(0), PATIENCE).unwrap();
        let t0 = Instant::now();
        assert!(sr.lookup(b"x.test", 9, 5, None, t0).is_none());
        // Play the worker.
        answer_as_worker(
            &sr,
            b"x.test",
            1,
            9,
            Ok(vec!["192.0.2.9:9".parse().unwrap()]),
            true,
        );
        assert!(sr.mailbox.notified.load(Ordering::Acquire));
        let mut seen = Vec::new();
        sr.drain(t0, |t, r| seen.push((t, r)));
        assert_eq!(seen, vec![(5, Ok(addrs(&["192.0.2.9:9"])))]);
        assert!(!sr.mailbox.notified.load(Ordering::Acquire));
        assert_eq!(
            sr.lookup(b"x.test", 10, 6, None, t0),
            Some(Ok(addrs(&["192.0.2.9:10"])))
        );
    }

    #[test]
    fn one_wake_byte_per_drain() {
        let mut sr = ShardResolver::new(Resolver::spawn(0), PATIENCE).unwrap();
        for token in 0..3 {
            let name = format!("y{token}.test");
            assert!(sr
                .lookup(name.as_bytes(), 1, token, None, Instant::now())
                .is_none());
            sr.mailbox.deliver(Answer {
                key: name.into_bytes().into_boxed_slice(),
                id: token + 1,
                port: 1,
                result: Err(ResolveError::Failed),
                cacheable: true,
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
        let mut sr = ShardResolver::new(Resolver::spawn(0), PATIENCE).unwrap();
        let now = Instant::now();
        let long = vec![b'a'; 256];
        for name in [&b"\xff\xfe.test"[..], b"a\0b", b"", &long] {
            assert_eq!(
                sr.lookup(name, 80, 1, None, now),
                Some(Err(ResolveError::Failed)),
                "{name:?}"
            );
        }
    }

    #[test]
    fn ip_literals_need_no_lookup() {
        let mut sr = ShardResolver::new(Resolver::spawn(0), PATIENCE).unwrap();
        let now = Instant::now();
        assert_eq!(
            sr.lookup(b"192.0.2.3", 80, 1, None, now),
            Some(Ok(addrs(&["192.0.2.3:80"])))
        );
        assert_eq!(
            sr.lookup(b"2001:db8::3", 81, 2, None, now),
            Some(Ok(addrs(&["[2001:db8::3]:81"])))
        );
    }

    #[test]
    fn cache_is_bounded() {
        let mut sr = ShardResolver::new(Resolver::spawn(0), PATIENCE).unwrap();
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
        let mut sr = ShardResolver::new(Arc::clone(&resolver), PATIENCE).unwrap();
        assert!(sr
            .lookup(b"localhost", 1, 1, None, Instant::now())
            .is_none());
        drop(sr);
        // The pool still works for another shard.
        let mut sr = ShardResolver::new(resolver, PATIENCE).unwrap();
        assert!(sr
            .lookup(b"localhost", 2, 2, None, Instant::now())
            .is_none());
        assert!(wait_for(&mut sr, 2).is_ok());
    }

    #[test]
    fn workers_exit_when_resolver_dropped() {
        let resolver = Resolver::new(3);
        let alive = Arc::downgrade(&resolver.pool);
        assert!(alive.strong_count() > 0);
        drop(resolver);
        let deadline = Instant::now() + WAIT;
        while alive.strong_count() > 0 {
            assert!(Instant::now() < deadline, "workers still running");
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// What a worker delivers for lookup `id` of `key`.
    fn answer_as_worker(
        sr: &ShardResolver,
        key: &[u8],
        id: u64,
        port: u16,
        result: Result<Vec<SocketAddr>, ResolveError>,
        cacheable: bool,
    ) {
        sr.mailbox.deliver(Answer {
            key: key.into(),
            id,
            port,
            result,
            cacheable,
        });
    }

    /// Jobs waiting in a pool without workers.
    fn queued(sr: &ShardResolver) -> usize {
        sr.resolver.pool.lock().queue.len()
    }

    #[test]
    fn a_name_in_flight_is_looked_up_once_for_every_waiter() {
        let mut sr = ShardResolver::new(Resolver::spawn(0), PATIENCE).unwrap();
        let t0 = Instant::now();
        assert!(sr.lookup(b"Same.test", 80, 1, None, t0).is_none());
        assert!(sr.lookup(b"same.TEST", 443, 2, None, t0).is_none());
        assert_eq!(queued(&sr), 1);
        assert_eq!(sr.in_flight(), 1);
        answer_as_worker(
            &sr,
            b"Same.test",
            1,
            80,
            Ok(vec!["192.0.2.5:80".parse().unwrap()]),
            true,
        );
        let mut seen = Vec::new();
        sr.drain(t0, |t, r| seen.push((t, r)));
        assert_eq!(
            seen,
            vec![
                (1, Ok(addrs(&["192.0.2.5:80"]))),
                (2, Ok(addrs(&["192.0.2.5:443"])))
            ]
        );
        assert_eq!(sr.in_flight(), 0);
    }

    #[test]
    fn the_queue_is_bounded_per_domain_and_a_full_domain_fails_at_once() {
        let mut sr = ShardResolver::new(Resolver::spawn(0), PATIENCE).unwrap();
        let t0 = Instant::now();
        for i in 0..MAX_QUEUED_PER_DOMAIN {
            let name = format!("n{i}.slow.test");
            assert!(sr.lookup(name.as_bytes(), 80, i as u64, None, t0).is_none());
        }
        assert_eq!(
            sr.lookup(b"one-more.slow.test", 80, 9999, None, t0),
            Some(Err(ResolveError::Failed))
        );
        assert!(sr
            .lookup(b"fresh.fast.test", 80, 10_000, None, t0)
            .is_none());
        assert_eq!(queued(&sr), MAX_QUEUED_PER_DOMAIN + 1);
        // A refusal is not cached: the name is tried again later.
        assert!(sr.cache.is_empty());
    }

    fn job(name: &str, client: Option<IpAddr>, deadline: Instant, mailbox: &Arc<Mailbox>) -> Job {
        Job {
            name: name.to_string(),
            port: 80,
            domain: parent_domain(name),
            client,
            deadline,
            abandoned: Arc::new(AtomicBool::new(false)),
            id: 0,
            mailbox: Arc::downgrade(mailbox),
        }
    }

    #[test]
    fn jobs_run_within_their_domain_and_client_shares_and_expire_in_the_queue() {
        let sr = ShardResolver::new(Resolver::spawn(0), PATIENCE).unwrap();
        let mb = &sr.mailbox;
        let now = Instant::now();
        let later = now + PATIENCE;
        let a: Option<IpAddr> = Some("192.0.2.1".parse().unwrap());
        let b: Option<IpAddr> = Some("192.0.2.2".parse().unwrap());
        let mut sched = Sched::default();
        for name in ["1.slow.test", "2.slow.test", "3.slow.test"] {
            sched.queue.push_back(job(name, a, later, mb));
        }
        sched.queue.push_back(job("gone.other.test", a, now, mb));
        sched.queue.push_back(job("x.fast.test", a, later, mb));
        sched.queue.push_back(job("y.fast.test", b, later, mb));
        let shares = (2, 3);
        let mut expired = Vec::new();
        let mut next = |sched: &mut Sched| {
            sched
                .next(now, shares, &mut expired)
                .map(|j| j.name.clone())
        };
        assert_eq!(next(&mut sched).as_deref(), Some("1.slow.test"));
        assert_eq!(next(&mut sched).as_deref(), Some("2.slow.test"));
        // slow.test has its two; the expired job leaves the queue on the way; client a has
        // its third with x.fast.test, so y (client b) is next.
        assert_eq!(next(&mut sched).as_deref(), Some("x.fast.test"));
        assert_eq!(next(&mut sched).as_deref(), Some("y.fast.test"));
        assert_eq!(next(&mut sched), None);
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].name, "gone.other.test");
        // One slow.test lookup finishes: the third may run.
        let done = job("1.slow.test", a, later, mb);
        sched.finished(&done);
        sched.finished(&job("x.fast.test", a, later, mb));
        assert_eq!(
            sched.next(now, shares, &mut expired).map(|j| j.name),
            Some("3.slow.test".to_string())
        );
    }

    #[test]
    fn an_expired_answer_reaches_its_waiters_but_not_the_cache() {
        let mut sr = ShardResolver::new(Resolver::spawn(0), PATIENCE).unwrap();
        let t0 = Instant::now();
        assert!(sr.lookup(b"late.test", 80, 1, None, t0).is_none());
        answer_as_worker(&sr, b"late.test", 1, 80, Err(ResolveError::Failed), false);
        let mut seen = Vec::new();
        sr.drain(t0, |t, r| seen.push((t, r)));
        assert_eq!(seen, vec![(1, Err(ResolveError::Failed))]);
        assert!(sr.cache.is_empty());
        assert!(
            sr.lookup(b"late.test", 80, 2, None, t0).is_none(),
            "asked again"
        );
    }

    #[test]
    fn a_lookup_nobody_waits_for_is_abandoned_and_its_late_answer_ignored() {
        let mut sr = ShardResolver::new(Resolver::spawn(0), PATIENCE).unwrap();
        let t0 = Instant::now();
        assert!(sr.lookup(b"gone.test", 80, 1, None, t0).is_none());
        assert!(sr.lookup(b"gone.test", 80, 2, None, t0).is_none());
        sr.forget(1);
        assert_eq!(sr.in_flight(), 1, "token 2 still waits");
        sr.forget(2);
        assert_eq!(sr.in_flight(), 0);
        // Still queued: abandoned, so a worker drops it without a lookup.
        let mut expired = Vec::new();
        let next = sr.resolver.pool.lock().next(t0, (4, 4), &mut expired);
        assert!(next.is_none());
        assert_eq!(expired.len(), 1);
        // A new lookup of the name is a new job; the old one's late answer is not its answer.
        assert!(sr.lookup(b"gone.test", 80, 3, None, t0).is_none());
        answer_as_worker(&sr, b"gone.test", 1, 80, Err(ResolveError::Failed), false);
        let mut seen = Vec::new();
        sr.drain(t0, |t, r| seen.push((t, r)));
        assert!(seen.is_empty(), "{seen:?}");
        assert_eq!(sr.in_flight(), 1);
    }

    #[test]
    fn parent_domains() {
        assert_eq!(&*parent_domain("a.b.Example.COM."), "example.com");
        assert_eq!(&*parent_domain("example.com"), "example.com");
        assert_eq!(&*parent_domain("localhost"), "localhost");
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
