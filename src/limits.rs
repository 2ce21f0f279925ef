//! Connection limits an operator sets: for the whole process (`--max-connections`), per client
//! address (`--max-connections-per-ip`) and per user (`--max-connections-per-user`).
//!
//! Shards share one [`Limits`] and count with atomics, never a lock: a connection is admitted
//! by incrementing its counters and refused (and the increments undone) when one is past its
//! limit. What a connection holds is a [`Lease`], which gives its counts back when dropped, so
//! a connection cannot forget to, nor give back twice.
//!
//! Per-address counts live in a fixed table of buckets chosen by a keyed hash of the address
//! (a per-process random key, so clients cannot aim at one another's bucket): memory stays
//! bounded whatever the number of addresses, at the price that two addresses sharing a bucket
//! share a limit (with 65,536 buckets, rare below many thousands of concurrent clients).
//! Per-user counts are a map built from the users file, so lookups need no lock either.
//!
//! Refusals are counted per reason ([`Limits::refused`]) and logged by the shards at most once
//! a second with the count since the last line ([`RefusalLog`]).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Buckets of the per-address table (256 KiB of counters).
const IP_BUCKETS: usize = 1 << 16;

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

/// The limits and their counters, shared by every shard.
pub struct Limits {
    max_total: usize,
    total: AtomicUsize,
    per_ip: Option<PerIp>,
    per_user: Option<PerUser>,
    refused: [AtomicU64; 3],
}

struct PerIp {
    max: u32,
    hasher: RandomState,
    buckets: Box<[AtomicU32]>,
}

struct PerUser {
    max: u32,
    counts: HashMap<Box<[u8]>, AtomicU32>,
}

/// Takes one from `counter` if it is below `max`.
fn take(counter: &AtomicU32, max: u32) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

impl Limits {
    /// `max_total` connections in all; `per_ip` and `per_user` when set. `users` are the
    /// names per-user counts are kept for (connections of other names are not counted).
    pub fn new<'a>(
        max_total: usize,
        per_ip: Option<u32>,
        per_user: Option<u32>,
        users: impl IntoIterator<Item = &'a [u8]>,
    ) -> Arc<Limits> {
        Arc::new(Limits {
            max_total,
            total: AtomicUsize::new(0),
            per_ip: per_ip.map(|max| PerIp {
                max,
                hasher: RandomState::new(),
                buckets: (0..IP_BUCKETS).map(|_| AtomicU32::new(0)).collect(),
            }),
            per_user: per_user.map(|max| PerUser {
                max,
                counts: users
                    .into_iter()
                    .map(|u| (Box::from(u), AtomicU32::new(0)))
                    .collect(),
            }),
            refused: Default::default(),
        })
    }

    /// No limits but the process-wide one at `usize::MAX` (tests).
    pub fn unlimited() -> Arc<Limits> {
        Limits::new(usize::MAX, None, None, [])
    }

    /// Admits a new connection from `ip`, or says which limit it is over (and counts it).
    pub fn admit(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<Lease, Over> {
        let taken = self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_total).then_some(n + 1)
            })
            .is_ok();
        if !taken {
            return Err(self.refuse(Over::Total));
        }
        // From here the lease gives back what it took, including on the refusal below.
        let mut lease = Lease {
            limits: Arc::clone(self),
            ip_bucket: None,
            user: None,
        };
        if let (Some(per_ip), Some(ip)) = (&self.per_ip, ip) {
            let bucket = per_ip.hasher.hash_one(ip) as usize % IP_BUCKETS;
            if !take(&per_ip.buckets[bucket], per_ip.max) {
                drop(lease);
                return Err(self.refuse(Over::PerIp));
            }
            lease.ip_bucket = Some(bucket);
        }
        Ok(lease)
    }

    /// Adds user `name` to a connection's lease once it has authenticated, or says it is over
    /// its limit (and counts it). Users without a count (no per-user limit) always pass.
    pub fn admit_user(&self, lease: &mut Lease, name: &[u8]) -> Result<(), Over> {
        let Some(per_user) = &self.per_user else {
            return Ok(());
        };
        let Some(count) = per_user.counts.get(name) else {
            return Ok(());
        };
        if lease.user.is_some() {
            return Ok(());
        }
        if !take(count, per_user.max) {
            return Err(self.refuse(Over::PerUser));
        }
        lease.user = Some(Box::from(name));
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
    user: Option<Box<[u8]>>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let l = &self.limits;
        l.total.fetch_sub(1, Ordering::AcqRel);
        if let (Some(per_ip), Some(b)) = (&l.per_ip, self.ip_bucket) {
            per_ip.buckets[b].fetch_sub(1, Ordering::AcqRel);
        }
        if let (Some(per_user), Some(u)) = (&l.per_user, &self.user) {
            if let Some(c) = per_user.counts.get(u) {
                c.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("ip_bucket", &self.ip_bucket)
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
        let l = Limits::new(2, None, None, []);
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
        let l = Limits::new(100, Some(2), None, []);
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
    fn per_user_limit_counts_known_users_once_per_connection() {
        let l = Limits::new(100, None, Some(1), [&b"alice"[..], b"bob"]);
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
