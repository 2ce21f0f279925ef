//! The relay's CPU over the measured interval, its descendant processes
//! included: a forking relay (Dante) starts and reaps workers during the
//! run, so `udp` measures the whole process tree instead of a fixed list
//! of PIDs (as the other modes' `CpuMeter` does).

use std::time::Instant;

use crate::cpu::CpuUsage;
use crate::sys;

/// CPU ticks of the process tree under each root (own + reaped children
/// of every live process in it) and how many processes that was; None if
/// a root is gone.
fn tree_ticks(roots: &[u32]) -> Option<(u64, usize)> {
    let mut ticks = 0;
    let mut procs = 0;
    for &r in roots {
        let mut all = vec![r];
        all.extend(sys::descendants(r));
        for (i, &p) in all.iter().enumerate() {
            match sys::cpu_ticks_with_reaped_children(p) {
                Some(t) => {
                    ticks += t;
                    procs += 1;
                }
                None if i == 0 => return None,
                None => {} // exited meanwhile: its parent's cutime has it
            }
        }
    }
    Some((ticks, procs))
}

/// Relay CPU over the interval, counting the relay's descendants too, even
/// those that start or exit during it: a forking relay (Dante) creates and
/// reaps workers as associations come and go. Summing own + reaped-children
/// CPU over the live tree is conserved when a process exits and is reaped.
pub(super) struct TreeMeter {
    roots: Vec<u32>,
    start: Option<(u64, usize)>,
    self_start: u64,
    t0: Instant,
}

impl TreeMeter {
    pub(super) fn start(roots: &[u32]) -> TreeMeter {
        TreeMeter {
            roots: roots.to_vec(),
            start: tree_ticks(roots),
            self_start: sys::self_cpu_ticks(),
            t0: Instant::now(),
        }
    }

    /// The usage, and the number of processes counted at start and end.
    pub(super) fn stop(&self) -> (CpuUsage, Option<(usize, usize)>) {
        let elapsed = self.t0.elapsed().as_secs_f64();
        let end = tree_ticks(&self.roots);
        let relay = match (self.roots.is_empty(), self.start, end) {
            (true, _, _) => None,
            (false, Some((a, pa)), Some((b, pb))) => Some((b.saturating_sub(a), (pa, pb))),
            _ => {
                eprintln!("loadgen: warning: a --pid vanished; no relay CPU figure");
                None
            }
        };
        (
            CpuUsage {
                pids: self.roots.clone(),
                relay_seconds: relay.map(|(t, _)| t as f64 / sys::ticks_per_second()),
                self_seconds: sys::self_cpu_ticks().saturating_sub(self.self_start) as f64
                    / sys::ticks_per_second(),
                elapsed,
            },
            relay.map(|(_, p)| p),
        )
    }
}
