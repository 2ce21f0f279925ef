//! What counts: the measured interval ([`Span`]), the datagram counts and
//! loss ([`Tally`]), the closed loop's datagrams in flight per association
//! ([`InFlight`]) and the open loop's send schedule. Pure bookkeeping, no
//! I/O, so every rule is unit-tested here.

use std::collections::VecDeque;

/// The measured interval, in nanoseconds since the base instant.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    pub start_ns: u64,
    pub end_ns: u64,
}

impl Span {
    pub fn contains(&self, ns: u64) -> bool {
        ns >= self.start_ns && ns < self.end_ns
    }
}

/// Datagram counts. Only datagrams *sent* in the measured interval count
/// towards `sent`, and only their replies towards `received`, whenever
/// those arrive (up to the end of the drain period).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub sent: u64,
    pub received: u64,
    /// Everything, warmup and drain included (progress lines).
    pub sent_all: u64,
    pub received_all: u64,
    /// Replies that were cut off, not ours, for another association, or
    /// with a header that does not name the target.
    pub bad: u64,
}

impl Tally {
    pub fn on_sent(&mut self, n: u64, in_window: bool) {
        self.sent_all += n;
        if in_window {
            self.sent += n;
        }
    }

    pub fn on_reply(&mut self, in_window: bool) {
        self.received_all += 1;
        if in_window {
            self.received += 1;
        }
    }

    pub fn merge(&mut self, o: &Tally) {
        self.sent += o.sent;
        self.received += o.received;
        self.sent_all += o.sent_all;
        self.received_all += o.received_all;
        self.bad += o.bad;
    }

    /// Datagrams sent in the interval without a reply by the end of the
    /// drain: (count, fraction of those sent).
    pub fn loss(&self) -> (u64, f64) {
        let lost = self.sent.saturating_sub(self.received);
        let frac = if self.sent == 0 {
            0.0
        } else {
            lost as f64 / self.sent as f64
        };
        (lost, frac)
    }

    /// Replies beyond the datagrams sent (duplicates): should be 0.
    pub fn excess(&self) -> u64 {
        self.received.saturating_sub(self.sent)
    }
}

/// Closed loop: the datagrams of one association awaiting their reply,
/// in send order (sequence number, send time, answered).
#[derive(Debug, Default)]
pub struct InFlight {
    q: VecDeque<(u64, u64, bool)>,
}

impl InFlight {
    /// Datagrams counted against the window: from the oldest unanswered on.
    pub fn len(&self) -> usize {
        self.q.len()
    }

    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    pub fn push(&mut self, seq: u64, sent_ns: u64) {
        self.q.push_back((seq, sent_ns, false));
    }

    /// The reply to `seq` came: true if it was in flight (not written off,
    /// not a duplicate).
    pub fn answer(&mut self, seq: u64) -> bool {
        let Some(&(front, _, _)) = self.q.front() else {
            return false;
        };
        if seq < front {
            return false;
        }
        // Sequence numbers are consecutive unless a send failed.
        let at = match self.q.get((seq - front).min(usize::MAX as u64) as usize) {
            Some(e) if e.0 == seq => Some((seq - front) as usize),
            _ => self.q.iter().position(|e| e.0 == seq),
        };
        match at.and_then(|i| self.q.get_mut(i)) {
            Some(e) if !e.2 => e.2 = true,
            _ => return false,
        }
        while matches!(self.q.front(), Some(e) if e.2) {
            self.q.pop_front();
        }
        true
    }

    /// Writes off the unanswered datagrams sent before `cutoff_ns` (at the
    /// front); returns how many.
    pub fn expire(&mut self, cutoff_ns: u64) -> usize {
        let mut n = 0;
        // Bounded by the queue's length.
        while let Some(&(_, t, answered)) = self.q.front() {
            if !answered && t >= cutoff_ns {
                break;
            }
            self.q.pop_front();
            n += usize::from(!answered);
        }
        n
    }
}

/// Open loop: how many datagrams (numbered from 0, datagram k due at
/// k / rate seconds) are due `elapsed_ns` after the schedule's start, at
/// most `limit`.
pub fn due_count(elapsed_ns: u64, rate: f64, limit: u64) -> u64 {
    let k = (elapsed_ns as f64 * rate / 1e9).floor() as u64 + 1;
    k.min(limit)
}

/// Open loop: datagrams whose due time falls before `end_ns` (schedule
/// starting at 0).
pub fn schedule_len(end_ns: u64, rate: f64) -> u64 {
    (end_ns as f64 * rate / 1e9).ceil() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_accounting() {
        let span = Span {
            start_ns: 100,
            end_ns: 200,
        };
        let mut t = Tally::default();
        t.on_sent(10, span.contains(50)); // warmup
        t.on_sent(8, span.contains(100));
        t.on_sent(2, span.contains(199));
        t.on_sent(5, span.contains(200)); // after the interval
        for sent_at in [50, 100, 100, 150, 150, 150, 150, 150, 199, 250] {
            t.on_reply(span.contains(sent_at));
        }
        assert_eq!((t.sent, t.received), (10, 8));
        assert_eq!((t.sent_all, t.received_all), (25, 10));
        assert_eq!(t.loss(), (2, 0.2));
        assert_eq!(t.excess(), 0);
        let mut u = Tally::default();
        u.on_sent(1, true);
        u.on_reply(true);
        u.on_reply(true); // a duplicate
        assert_eq!(u.loss(), (0, 0.0));
        assert_eq!(u.excess(), 1);
        t.merge(&u);
        assert_eq!((t.sent, t.received, t.received_all), (11, 10, 12));
        assert_eq!(Tally::default().loss(), (0, 0.0));
    }

    #[test]
    fn window_bookkeeping() {
        let mut w = InFlight::default();
        assert!(!w.answer(0));
        for seq in 0..4 {
            w.push(seq, 100 + seq);
        }
        assert_eq!(w.len(), 4);
        assert!(w.answer(0));
        assert_eq!(w.len(), 3);
        // Out of order: 2 is answered but 1 still holds the front.
        assert!(w.answer(2));
        assert_eq!(w.len(), 3);
        assert!(!w.answer(2), "duplicate");
        assert!(w.answer(1));
        assert_eq!(w.len(), 1);
        // A gap in the sequence (a send failed).
        w.push(9, 200);
        assert!(w.answer(9));
        assert_eq!(w.len(), 2);
        // 3 (sent at 103) is overdue at cutoff 150; 9 was answered.
        assert_eq!(w.expire(150), 1);
        assert_eq!(w.len(), 0);
        assert!(!w.answer(3), "written off: a late reply frees no slot");
        w.push(10, 300);
        assert_eq!(w.expire(300), 0);
        assert_eq!(w.expire(301), 1);
    }

    #[test]
    fn open_loop_schedule() {
        // 1000/s: datagram k is due at k ms.
        assert_eq!(due_count(0, 1000.0, 100), 1);
        assert_eq!(due_count(999_999, 1000.0, 100), 1);
        assert_eq!(due_count(1_000_000, 1000.0, 100), 2);
        assert_eq!(due_count(10_000_000_000, 1000.0, 100), 100);
        // Due times 0, 1, ... 9 ms fall before 10 ms; 10 datagrams.
        assert_eq!(schedule_len(10_000_000, 1000.0), 10);
        assert_eq!(schedule_len(10_000_001, 1000.0), 11);
    }
}
