//! The per-thread event loop: one epoll set per thread with its
//! associations' sockets and control connections, its own echo socket and
//! (open loop) a timerfd. It sends (window refills or the schedule),
//! receives and checks replies in batches, writes off stalled datagrams,
//! and publishes its counts for the progress lines; [`Outcome`] is what a
//! thread hands back when the drain period ends.

use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::accounting::{due_count, schedule_len, InFlight, Span, Tally};
use super::datagram::{check_reply, encode_stamp, Stamp};
use crate::common::{sleep_until, Failures};
use crate::epoll::{self, Epoll};
use crate::serve::{Mmsg, UdpEcho};

/// Closed loop: a datagram whose reply is this overdue is written off
/// (counted in `stalled`) and its slot in the window refilled, so lost
/// datagrams cannot shrink a window for good. A late reply still counts
/// as received.
pub(super) const STALL_NS: u64 = 100_000_000;
const STALL_CHECK_NS: u64 = 20_000_000;
pub(super) const CTL: u64 = 1 << 62;
pub(super) const ECHO: u64 = 1 << 61;
const TIMER: u64 = 1 << 60;
/// Most datagrams an open loop sends per wake-up (it stays responsive to
/// replies even when far behind schedule).
const MAX_SEND_PER_WAKE: u64 = 4096;

pub(super) struct Assoc {
    pub(super) sock: UdpSocket,
    pub(super) ctl: Option<TcpStream>,
    pub(super) id: u32,
    pub(super) seq: u64,
    pub(super) inflight: InFlight,
    pub(super) dead: bool,
}

#[derive(Clone, Copy)]
pub(super) enum Pace {
    Closed {
        window: usize,
    },
    /// Datagrams/s of this thread, and the tick of its timer.
    Open {
        rate: f64,
        tick: Duration,
    },
}

#[derive(Clone, Copy)]
pub(super) struct Plan {
    pub(super) base: Instant,
    /// Traffic starts (ns since base).
    pub(super) t0_ns: u64,
    pub(super) span: Span,
    pub(super) drain_end_ns: u64,
    pub(super) size: usize,
    pub(super) pace: Pace,
}

#[derive(Default)]
pub(super) struct Shared {
    pub(super) sent: AtomicU64,
    pub(super) received: AtomicU64,
}

pub(super) struct Outcome {
    pub(super) tally: Tally,
    pub(super) rtt: Histogram<u64>,
    pub(super) lag: Histogram<u64>,
    pub(super) stalls: u64,
    pub(super) io_errors: Failures,
    pub(super) bad_first: Option<String>,
    pub(super) failures: Failures,
    pub(super) echoed: u64,
}

pub(super) struct Worker {
    pub(super) ep: Epoll,
    pub(super) assocs: Vec<Assoc>,
    pub(super) echo: Option<UdpEcho>,
    /// RFC 1928 header naming this thread's target (empty when direct).
    pub(super) hdr: Vec<u8>,
    pub(super) target: SocketAddr,
    pub(super) plan: Plan,
    pub(super) tx: Mmsg,
    pub(super) rx: Mmsg,
    pub(super) lens: Vec<usize>,
    pub(super) timer: Option<std::fs::File>,
    /// Open loop: datagrams of the schedule sent (or skipped) so far.
    pub(super) k_next: u64,
    pub(super) ended: bool,
    pub(super) shared: Arc<Shared>,
    pub(super) published: (u64, u64),
    pub(super) out: Outcome,
}

fn timerfd(tick: Duration) -> io::Result<OwnedFd> {
    // SAFETY: timerfd_create takes flags and returns a new fd or -1.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned to us and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let ts = libc::timespec {
        tv_sec: tick.as_secs() as libc::time_t,
        tv_nsec: tick.subsec_nanos() as libc::c_long,
    };
    let spec = libc::itimerspec {
        it_interval: ts,
        it_value: ts,
    };
    // SAFETY: `spec` is a valid itimerspec the kernel only reads; the old
    // value pointer may be null.
    if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

impl Worker {
    fn now_ns(&self) -> u64 {
        self.plan.base.elapsed().as_nanos() as u64
    }

    pub(super) fn run(mut self) -> Outcome {
        sleep_until(self.plan.base + Duration::from_nanos(self.plan.t0_ns));
        match self.plan.pace {
            Pace::Closed { .. } => {
                let now = self.now_ns();
                for i in 0..self.assocs.len() {
                    self.refill(i, now);
                }
            }
            Pace::Open { tick, .. } => match timerfd(tick) {
                Ok(fd) => {
                    if let Err(e) = self.ep.add(fd.as_raw_fd(), epoll::IN, TIMER) {
                        self.out.failures.add(format!("timer: {e}"));
                    }
                    self.timer = Some(fd.into());
                    self.send_due(self.now_ns());
                }
                Err(e) => self.out.failures.add(format!("timerfd: {e}")),
            },
        }
        let mut events = epoll::empty_events(256);
        let mut next_stall_check = self.now_ns() + STALL_CHECK_NS;
        let hard_end = self.plan.drain_end_ns + 1_000_000_000;
        // Bounded by the drain's end (and the hard end as a backstop).
        loop {
            let now = self.now_ns();
            if !self.ended && now >= self.plan.span.end_ns {
                self.ended = true;
                self.timer = None; // closing the fd removes it from the epoll set
            }
            if self.ended
                && (self.out.tally.received >= self.out.tally.sent || now >= self.plan.drain_end_ns)
            {
                break;
            }
            if now >= hard_end {
                break;
            }
            let until = match (self.ended, self.plan.pace) {
                (true, _) => self.plan.drain_end_ns,
                // The timer wakes the open loop for every send.
                (false, Pace::Open { .. }) => self.plan.span.end_ns,
                (false, Pace::Closed { .. }) => self.plan.span.end_ns.min(next_stall_check),
            };
            let timeout_ms = until.saturating_sub(now).div_ceil(1_000_000).min(100) as i32;
            let n = match self.ep.wait(&mut events, timeout_ms) {
                Ok(n) => n,
                Err(e) => {
                    self.out.failures.add(format!("epoll_wait: {e}"));
                    break;
                }
            };
            for ev in &events[..n] {
                let token = ev.u64;
                if token == ECHO {
                    if let Some(e) = self.echo.as_mut() {
                        self.out.echoed += e.drain().0 as u64;
                    }
                } else if token == TIMER {
                    self.on_tick();
                } else if token & CTL != 0 {
                    self.on_ctl((token & !CTL) as usize);
                } else {
                    self.on_readable(token as usize);
                }
            }
            if matches!(self.plan.pace, Pace::Closed { .. }) && !self.ended {
                let now = self.now_ns();
                if now >= next_stall_check {
                    next_stall_check = now + STALL_CHECK_NS;
                    self.unstall(now);
                }
            }
            self.publish();
        }
        self.publish();
        // The control connections close here, with the worker.
        self.out
    }

    fn publish(&mut self) {
        let t = &self.out.tally;
        let (s, r) = (t.sent_all, t.received_all);
        self.shared
            .sent
            .fetch_add(s - self.published.0, Ordering::Relaxed);
        self.shared
            .received
            .fetch_add(r - self.published.1, Ordering::Relaxed);
        self.published = (s, r);
    }

    /// Fills slot `j` of the send batch with a datagram of association `i`.
    fn stamp_slot(&mut self, j: usize, i: usize, now: u64) {
        let a = &mut self.assocs[i];
        let stamp = Stamp {
            sent_ns: now,
            seq: a.seq,
            assoc: a.id,
        };
        a.seq += 1;
        let h = self.hdr.len();
        let slot = self.tx.slot_mut(j);
        slot[..h].copy_from_slice(&self.hdr);
        encode_stamp(&stamp, &mut slot[h..]);
        self.lens[j] = h + self.plan.size;
    }

    /// Sends slots `0..n` on association `i`, counting what went out.
    fn send_slots(&mut self, i: usize, n: usize, now: u64) -> usize {
        let fd = self.assocs[i].sock.as_raw_fd();
        let first_seq = self.assocs[i].seq - n as u64;
        let r = self.tx.send(fd, &self.lens[..n], false);
        if let Some(e) = r.error {
            self.out.io_errors.add(format!("send: {e}"));
        }
        if let Pace::Closed { .. } = self.plan.pace {
            // Sequence numbers of datagrams that did not go out are skipped
            // (after an error in the middle of a batch these may be off by
            // one; the wrong entry is written off as stalled).
            let a = &mut self.assocs[i];
            for j in 0..r.sent as u64 {
                a.inflight.push(first_seq + j, now);
            }
        }
        self.out
            .tally
            .on_sent(r.sent as u64, self.plan.span.contains(now));
        r.sent
    }

    /// Closed loop: tops association `i` up to its window.
    fn refill(&mut self, i: usize, now: u64) {
        let Pace::Closed { window } = self.plan.pace else {
            return;
        };
        if self.assocs[i].dead || self.ended {
            return;
        }
        let mut want = window.saturating_sub(self.assocs[i].inflight.len());
        // Bounded: `want` shrinks by a batch each pass, or we stop.
        while want > 0 {
            let n = want.min(self.tx.capacity());
            for j in 0..n {
                self.stamp_slot(j, i, now);
            }
            let sent = self.send_slots(i, n, now);
            if sent < n {
                break;
            }
            want -= n;
        }
    }

    /// Closed loop: writes off windows whose replies are overdue.
    fn unstall(&mut self, now: u64) {
        for i in 0..self.assocs.len() {
            let a = &mut self.assocs[i];
            if a.dead {
                continue;
            }
            let n = a.inflight.expire(now.saturating_sub(STALL_NS));
            // Also tops up a window a failed send left short.
            if n > 0 || a.inflight.is_empty() {
                self.out.stalls += n as u64;
                self.refill(i, now);
            }
        }
    }

    fn on_tick(&mut self) {
        if let Some(fd) = &self.timer {
            let mut b = [0u8; 8];
            // The expiration count is not needed: the schedule is computed
            // from the clock. A failed read (EAGAIN) is harmless.
            let _ = (&*fd).read(&mut b);
        }
        let now = self.now_ns();
        self.send_due(now);
    }

    /// Open loop: sends every datagram of the schedule due by `now`.
    fn send_due(&mut self, now: u64) {
        let Pace::Open { rate, .. } = self.plan.pace else {
            return;
        };
        if self.ended {
            return;
        }
        let since = now.saturating_sub(self.plan.t0_ns);
        let limit = schedule_len(self.plan.span.end_ns - self.plan.t0_ns, rate);
        let due = due_count(since, rate, limit).min(self.k_next + MAX_SEND_PER_WAKE);
        let n = self.assocs.len() as u64;
        let in_window = self.plan.span.contains(now);
        // Bounded by MAX_SEND_PER_WAKE.
        while self.k_next < due {
            let k = self.k_next;
            self.k_next += 1;
            let i = (k % n) as usize;
            if self.assocs[i].dead {
                continue;
            }
            if in_window {
                let intended = (k as f64 * 1e9 / rate) as u64;
                self.out
                    .lag
                    .saturating_record(since.saturating_sub(intended).max(1));
            }
            self.stamp_slot(0, i, now);
            self.send_slots(i, 1, now);
        }
    }

    fn on_ctl(&mut self, i: usize) {
        let a = &mut self.assocs[i];
        let Some(ctl) = a.ctl.as_mut() else { return };
        let mut buf = [0u8; 256];
        let why = match ctl.read(&mut buf) {
            Ok(0) => "relay closed the control connection".to_string(),
            Ok(_) => return, // nothing is expected; ignore it
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => format!("control connection: {e}"),
        };
        self.out
            .failures
            .add(format!("association {}: {why}", a.id));
        a.ctl = None;
        a.dead = true;
    }

    fn on_readable(&mut self, i: usize) {
        let Some(fd) = self.assocs.get(i).map(|a| a.sock.as_raw_fd()) else {
            return;
        };
        let id = self.assocs[i].id;
        let proxied = !self.hdr.is_empty();
        let mut got = 0usize;
        let mut now = self.now_ns();
        // Bounded: at most 64 batches per readiness event.
        for _ in 0..64 {
            let n = match self.rx.recv(fd, 0, false) {
                Ok(n) => n,
                Err(e) => {
                    let refused = e.raw_os_error() == Some(libc::ECONNREFUSED);
                    self.out.io_errors.add(format!("recv: {e}"));
                    if refused {
                        // An earlier datagram met no socket; the error is consumed.
                        continue;
                    }
                    break;
                }
            };
            if n == 0 {
                break;
            }
            now = self.now_ns();
            for j in 0..n {
                match check_reply(
                    self.rx.datagram(j),
                    self.rx.truncated(j),
                    proxied.then_some(&self.target),
                    id,
                    self.plan.size,
                ) {
                    Ok(st) => {
                        got += 1;
                        self.assocs[i].inflight.answer(st.seq);
                        let in_window = self.plan.span.contains(st.sent_ns);
                        self.out.tally.on_reply(in_window);
                        if in_window {
                            self.out
                                .rtt
                                .saturating_record(now.saturating_sub(st.sent_ns).max(1));
                        }
                    }
                    Err(why) => {
                        self.out.tally.bad += 1;
                        if self.out.bad_first.is_none() {
                            self.out.bad_first = Some(why);
                        }
                    }
                }
            }
            if n < self.rx.capacity() {
                break;
            }
        }
        if got > 0 {
            self.refill(i, now);
        }
    }
}
