//! A hashed timing wheel: every per-connection deadline of a shard, served by one ring timeout.
//!
//! Entries are never removed early. Each carries the owner token it was armed with, and the
//! owner checks on expiry whether the deadline is still current (lazy cancellation). That
//! keeps arming O(1) and keeps the hot path free of timer bookkeeping.

use std::time::{Duration, Instant};

use super::Owner;

/// The wheel's resolution.
pub(crate) const TICK: Duration = Duration::from_millis(10);
const SLOTS: usize = 1024;

pub(crate) struct Wheel {
    start: Instant,
    /// The next tick not yet processed.
    cursor: u64,
    slots: Vec<Vec<(u64, Owner)>>,
    len: usize,
    /// The earliest tick inserted since `take_new_earliest` was last called.
    new_earliest: Option<u64>,
}

impl Wheel {
    pub(crate) fn new(now: Instant) -> Wheel {
        Wheel {
            start: now,
            cursor: 0,
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
            len: 0,
            new_earliest: None,
        }
    }

    fn tick_of(&self, t: Instant) -> u64 {
        (t.saturating_duration_since(self.start).as_nanos() / TICK.as_nanos()) as u64
    }

    /// Arms `token` to fire at `deadline` (rounded up to the next tick).
    pub(crate) fn insert(&mut self, deadline: Instant, token: Owner) {
        let tick = (self.tick_of(deadline) + 1).max(self.cursor);
        self.slots[(tick % SLOTS as u64) as usize].push((tick, token));
        self.len += 1;
        self.new_earliest = Some(self.new_earliest.map_or(tick, |t| t.min(tick)));
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Moves every token due at `now` into `out`.
    pub(crate) fn expire(&mut self, now: Instant, out: &mut Vec<Owner>) {
        let now_tick = self.tick_of(now);
        // Catch up at most one revolution: later slots are visited on the next turns.
        let end = now_tick.min(self.cursor + SLOTS as u64);
        while self.cursor <= end {
            let slot = &mut self.slots[(self.cursor % SLOTS as u64) as usize];
            let cursor = self.cursor;
            let before = slot.len();
            slot.retain(|&(tick, token)| {
                if tick <= cursor {
                    out.push(token);
                    false
                } else {
                    true
                }
            });
            self.len -= before - slot.len();
            self.cursor += 1;
        }
    }

    /// When the earliest entry inserted since the last call is due (O(1); for deciding whether
    /// an already armed ring timeout is late for it).
    pub(crate) fn take_new_earliest(&mut self) -> Option<Instant> {
        self.new_earliest
            .take()
            .map(|t| self.start + Duration::from_nanos(t.saturating_mul(TICK.as_nanos() as u64)))
    }

    /// How long the ring may sleep before the wheel needs to turn again: until the earliest
    /// entry within the next revolution of slots, so a wheel holding only far deadlines does
    /// not wake the shard every tick.
    pub(crate) fn next_wait(&self, now: Instant) -> Option<Duration> {
        if self.len == 0 {
            return None;
        }
        let mut next = self.cursor + SLOTS as u64;
        for i in 0..SLOTS as u64 {
            let tick = self.cursor + i;
            let slot = &self.slots[(tick % SLOTS as u64) as usize];
            if let Some(t) = slot.iter().map(|&(t, _)| t).min() {
                // An entry for a later revolution still bounds the wait by this slot's turn.
                next = next.min(t.max(tick));
                if next == tick {
                    break;
                }
            }
        }
        let due = self.start + Duration::from_nanos(next.saturating_mul(TICK.as_nanos() as u64));
        Some(
            due.saturating_duration_since(now)
                .max(Duration::from_millis(1)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_after_deadline_not_before() {
        let t0 = Instant::now();
        let mut w = Wheel::new(t0);
        w.insert(t0 + Duration::from_millis(50), Owner(7));
        w.insert(t0 + Duration::from_secs(30), Owner(8));
        let mut out = Vec::new();
        w.expire(t0 + Duration::from_millis(40), &mut out);
        assert!(out.is_empty());
        w.expire(t0 + Duration::from_millis(70), &mut out);
        assert_eq!(out, vec![Owner(7)]);
        out.clear();
        // More than one revolution later: the far entry fires only when its tick arrives.
        w.expire(t0 + Duration::from_secs(29), &mut out);
        w.expire(t0 + Duration::from_secs(29), &mut out);
        w.expire(t0 + Duration::from_secs(29), &mut out);
        w.expire(t0 + Duration::from_secs(29), &mut out);
        assert!(out.is_empty());
        for _ in 0..4 {
            w.expire(t0 + Duration::from_secs(31), &mut out);
        }
        assert_eq!(out, vec![Owner(8)]);
        assert!(w.is_empty());
        assert_eq!(w.next_wait(t0), None);
    }

    #[test]
    fn sleeps_until_the_earliest_entry() {
        let t0 = Instant::now();
        let mut w = Wheel::new(t0);
        w.insert(t0 + Duration::from_secs(2), Owner(1));
        w.insert(t0 + Duration::from_millis(500), Owner(2));
        let wait = w.next_wait(t0).unwrap();
        assert!(
            wait >= Duration::from_millis(500) && wait <= Duration::from_millis(520),
            "{wait:?}"
        );
    }
}
