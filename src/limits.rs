//! Connection limits an operator sets: for the whole process (`--max-connections`), per client
//! address (`--max-connections-per-ip`) and per user (`--max-connections-per-user`).
//!
//! Shards share one [`Limits`] and count with atomics, never a lock: a connection is admitted
//! by incrementing its counters and refused (and the increments undone) when one is past its
//! limit. What a connection holds is a [`Lease`], which gives its counts back when dropped, so
//! a connection cannot forget to, nor give back twice.
//!
//! Per-address and per-user counts live in fixed tables of buckets chosen by a keyed hash of
//! the address or name (a per-process random key, so clients cannot aim at one another's
//! bucket): memory stays bounded whatever the number of addresses, users come and go with a
//! reload without a lock, at the price that two addresses (or users) sharing a bucket share a
//! limit (with 65,536 buckets, rare below many thousands of concurrent clients).
//!
//! Refusals are counted per reason ([`Limits::refused`]) and logged by the shards at most once
//! a second with the count since the last line ([`RefusalLog`]).

use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Buckets of the per-address and per-user tables (256 KiB of counters each).
const BUCKETS: usize = 1 << 16;

/// Which limit refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Over {
    /// `--max-connections`: the whole process.
    Total,
    /// `--max-connections-per-ip`.
    PerIp,
    /// `--max-connections-per-user`.
    PerUser,
}

impl Over {
    fn index(self) -> usize {
        self as usize
    }

    pub fn flag(self) -> &'static str {
        match self {
            Over::Total => "--max-connections",
            Over::PerIp => "--max-connections-per-ip",
            Over::PerUser => "--max-connections-per-user",
        }
    }
}

/// The limits and their counters, shared by every shard. The limits themselves are atomics
/// too, so a reload (SIGHUP) changes them for new connections without a lock.
pub struct Limits {
    max_total: AtomicUsize,
    total: AtomicUsize,
    /// 0: no per-address limit.
    per_ip: AtomicU32,
    /// 0: no per-user limit.
    per_user: AtomicU32,
    hasher: RandomState,
    ip_buckets: Box<[AtomicU32]>,
    user_buckets: Box<[AtomicU32]>,
    refused: [AtomicU64; 3],
}

/// Takes one from `counter` if it is below `max`.
fn take(counter: &AtomicU32, max: u32) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

fn buckets() -> Box<[AtomicU32]> {
    (0..BUCKETS).map(|_| AtomicU32::new(0)).collect()
}

impl Limits {
    /// `max_total` connections in all; `per_ip` and `per_user` when set.
    pub fn new(max_total: usize, per_ip: Option<u32>, per_user: Option<u32>) -> Arc<Limits> {
        let l = Limits {
            max_total: AtomicUsize::new(max_total),
            total: AtomicUsize::new(0),
            per_ip: AtomicU32::new(0),
            per_user: AtomicU32::new(0),
            hasher: RandomState::new(),
            ip_buckets: buckets(),
            user_buckets: buckets(),
            refused: Default::default(),
        };
        l.set(max_total, per_ip, per_user);
        Arc::new(l)
    }

    /// New limits for connections admitted from now on (a reload). Connections already
    /// admitted keep their counts; ones admitted while a limit was off were not counted by it.
    pub fn set(&self, max_total: usize, per_ip: Option<u32>, per_user: Option<u32>) {
        self.max_total.store(max_total, Ordering::Release);
        self.per_ip.store(per_ip.unwrap_or(0), Ordering::Release);
        self.per_user
            .store(per_user.unwrap_or(0), Ordering::Release);
    }

    /// No limits but the process-wide one at `usize::MAX` (tests).
    pub fn unlimited() -> Arc<Limits> {
        Limits::new(usize::MAX, None, None)
    }

    /// Admits a new connection from `ip`, or says which limit it is over (and counts it).
    pub fn admit(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<Lease, Over> {
        let max_total = self.max_total.load(Ordering::Acquire);
        let taken = self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max_total).then_some(n + 1)
            })
            .is_ok();
        if !taken {
            return Err(self.refuse(Over::Total));
        }
        // From here the lease gives back what it took, including on the refusal below.
        let mut lease = Lease {
            limits: Arc::clone(self),
            ip_bucket: None,
            user_bucket: None,
        };
        if let Some(ip) = ip {
            if let Err(over) = self.admit_ip(&mut lease, ip) {
                drop(lease);
                return Err(over);
            }
        }
        Ok(lease)
    }

    /// Counts a connection against the per-address limit of `ip` (at accept, or once a PROXY
    /// protocol header has told the client's real address), or says it is over it.
    pub fn admit_ip(&self, lease: &mut Lease, ip: IpAddr) -> Result<(), Over> {
        let per_ip = self.per_ip.load(Ordering::Acquire);
        if per_ip == 0 || lease.ip_bucket.is_some() {
            return Ok(());
        }
        let bucket = self.hasher.hash_one(ip) as usize % BUCKETS;
        if !take(&self.ip_buckets[bucket], per_ip) {
            return Err(self.refuse(Over::PerIp));
        }
        lease.ip_bucket = Some(bucket);
        Ok(())
    }

    /// Adds user `name` to a connection's lease once it has authenticated, or says it is over
    /// its limit (and counts it). Without a per-user limit every user passes.
    pub fn admit_user(&self, lease: &mut Lease, name: &[u8]) -> Result<(), Over> {
        let max = self.per_user.load(Ordering::Acquire);
        if max == 0 || lease.user_bucket.is_some() {
            return Ok(());
        }
        let bucket = self.hasher.hash_one(name) as usize % BUCKETS;
        if !take(&self.user_buckets[bucket], max) {
            return Err(self.refuse(Over::PerUser));
        }
        lease.user_bucket = Some(bucket);
        Ok(())
    }

    fn refuse(&self, over: Over) -> Over {
        self.refused[over.index()].fetch_add(1, Ordering::Relaxed);
        over
    }

    /// Connections refused by `over` since start.
    pub fn refused(&self, over: Over) -> u64 {
        self.refused[over.index()].load(Ordering::Relaxed)
    }

    /// Connections admitted and not yet gone.
    pub fn connections(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

/// What an admitted connection holds; dropping it gives its counts back.
pub struct Lease {
    limits: Arc<Limits>,
    ip_bucket: Option<usize>,
    user_bucket: Option<usize>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let l = &self.limits;
        l.total.fetch_sub(1, Ordering::AcqRel);
        if let Some(b) = self.ip_bucket {
            l.ip_buckets[b].fetch_sub(1, Ordering::AcqRel);
        }
        if let Some(b) = self.user_bucket {
            l.user_buckets[b].fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("ip_bucket", &self.ip_bucket)
            .field("user_bucket", &self.user_bucket)
            .finish()
    }
}

/// A shard's log of refusals: one line per reason at most once a second, with how many
/// connections that reason refused since the previous line.
#[derive(Default)]
pub struct RefusalLog {
    last: [Option<Instant>; 3],
    since: [u64; 3],
}

impl RefusalLog {
    /// Notes a refusal at `now`; returns the count to log when a line is due.
    pub fn note(&mut self, over: Over, now: Instant) -> Option<u64> {
        let i = over.index();
        self.since[i] += 1;
        let due = self.last[i].is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
        if !due {
            return None;
        }
        self.last[i] = Some(now);
        Some(std::mem::take(&mut self.since[i]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn total_limit_admits_up_to_max_and_leases_give_back() {
        let l = Limits::new(2, None, None);
        let a = l.admit(ip("192.0.2.1")).unwrap();
        let _b = l.admit(None).unwrap();
        assert_eq!(l.admit(ip("192.0.2.2")).unwrap_err(), Over::Total);
        assert_eq!(l.refused(Over::Total), 1);
        drop(a);
        assert_eq!(l.connections(), 1);
        assert!(l.admit(ip("192.0.2.2")).is_ok());
    }

    #[test]
    fn per_ip_limit_counts_each_address() {
        let l = Limits::new(100, Some(2), None);
        let a1 = l.admit(ip("192.0.2.1")).unwrap();
        let _a2 = l.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(l.admit(ip("192.0.2.1")).unwrap_err(), Over::PerIp);
        // The refusal gave back its share of the total.
        assert_eq!(l.connections(), 2);
        assert!(l.admit(ip("2001:db8::1")).is_ok());
        drop(a1);
        assert!(l.admit(ip("192.0.2.1")).is_ok());
        assert_eq!(l.refused(Over::PerIp), 1);
    }

    #[test]
    fn per_user_limit_counts_users_once_per_connection() {
        let l = Limits::new(100, None, Some(1));
        let mut c1 = l.admit(None).unwrap();
        l.admit_user(&mut c1, b"alice").unwrap();
        l.admit_user(&mut c1, b"alice").unwrap();
        let mut c2 = l.admit(None).unwrap();
        assert_eq!(l.admit_user(&mut c2, b"alice").unwrap_err(), Over::PerUser);
        l.admit_user(&mut c2, b"bob").unwrap();
        drop(c1);
        let mut c3 = l.admit(None).unwrap();
        l.admit_user(&mut c3, b"alice").unwrap();
        assert_eq!(l.refused(Over::PerUser), 1);
    }

    #[test]
    fn set_changes_limits_for_new_connections() {
        let l = Limits::new(1, None, None);
        let a = l.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(l.admit(ip("192.0.2.1")).unwrap_err(), Over::Total);
        l.set(10, Some(1), Some(1));
        // `a` was admitted while per-ip was off, so it is not counted against 192.0.2.1.
        let mut b = l.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(l.admit(ip("192.0.2.1")).unwrap_err(), Over::PerIp);
        l.admit_user(&mut b, b"carol").unwrap();
        let mut c = l.admit(ip("192.0.2.2")).unwrap();
        assert_eq!(l.admit_user(&mut c, b"carol").unwrap_err(), Over::PerUser);
        l.set(10, None, None);
        assert!(l.admit(ip("192.0.2.1")).is_ok());
        drop((a, b));
        assert_eq!(l.connections(), 1);
    }

    #[test]
    fn refusal_log_is_at_most_once_a_second_with_a_count() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        assert_eq!(log.note(Over::Total, t0), Some(1));
        for i in 1..=5 {
            assert_eq!(
                log.note(Over::Total, t0 + Duration::from_millis(i * 100)),
                None
            );
        }
        assert_eq!(log.note(Over::PerIp, t0), Some(1), "per reason");
        assert_eq!(log.note(Over::Total, t0 + Duration::from_secs(1)), Some(6));
    }
}
