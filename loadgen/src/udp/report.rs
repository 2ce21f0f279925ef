//! The end of a run: the human summary and the JSON report (`results`,
//! `params`, and `relay_cpu` with the process counts of the relay's tree),
//! made from the totals over all threads.

use std::net::SocketAddr;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use super::accounting::Tally;
use super::worker::STALL_NS;
use super::Args;
use crate::common::{latency_json, latency_line, via_line, Dialer, Failures, Report};
use crate::cpu::CpuUsage;

/// Everything the summary and the report of a run are made of: the
/// options, the setup, and the totals merged over all threads.
pub(super) struct RunResults<'a> {
    pub args: &'a Args,
    pub dialer: &'a Dialer,
    pub warmup: Duration,
    pub duration: Duration,
    pub targets: &'a [SocketAddr],
    pub nofile: u64,
    pub opened: usize,
    pub setup_secs: f64,
    pub tally: Tally,
    pub rtt: Histogram<u64>,
    pub lag: Histogram<u64>,
    pub stalls: u64,
    pub io_errors: Failures,
    pub bad_first: Option<String>,
    pub echoed: u64,
    pub failures: &'a Failures,
    pub usage: CpuUsage,
    /// Processes of the relay's tree counted at the start and at the end.
    pub procs: Option<(usize, usize)>,
}

impl RunResults<'_> {
    /// The summary lines and the JSON report of the run.
    pub(super) fn into_report(self) -> Report {
        let RunResults {
            args: a,
            dialer,
            warmup,
            duration,
            targets,
            nofile,
            opened,
            setup_secs,
            tally,
            rtt,
            lag,
            stalls,
            io_errors,
            bad_first,
            echoed,
            failures,
            usage,
            procs,
        } = self;
        let secs = duration.as_secs_f64();
        let dps = tally.received as f64 / secs;
        let (lost, loss_frac) = tally.loss();
        let open = a.rate.is_some();
        let mut summary = format!(
            "{opened} association(s) on {} thread(s), {} B payload, {}, {}, {secs:.1} s after {:.1} s warmup (setup {setup_secs:.2} s)\n",
            a.threads,
            a.size,
            match a.rate {
                Some(r) => format!("open loop at {r} dgram/s"),
                None => format!("closed loop, window {}", a.window),
            },
            via_line(dialer),
            warmup.as_secs_f64()
        );
        summary += &format!(
            "sends: client {}, target {}\n",
            a.client_send(),
            if a.conn.target.is_some() {
                "external"
            } else {
                a.target_send()
            }
        );
        summary += &format!(
            "{dps:.0} datagrams/s echoed ({:.3} Gbit/s of payload each way), {:.0} sent/s\n",
            dps * a.size as f64 * 8e-9,
            tally.sent as f64 / secs
        );
        summary += &format!(
            "loss: {lost} of {} ({:.4}%) after a {:.1} s drain\n",
            tally.sent,
            100.0 * loss_frac,
            a.drain
        );
        summary += &latency_line("rtt", &rtt);
        summary.push('\n');
        if open {
            summary += &latency_line("send lag", &lag);
            summary.push('\n');
        }
        if tally.bad > 0 {
            summary += &format!(
                "BAD REPLIES: {} ({})\n",
                tally.bad,
                bad_first.as_deref().unwrap_or("")
            );
        }
        if stalls > 0 {
            summary += &format!(
                "written off after {} ms without a reply (window refilled): {stalls} datagrams\n",
                STALL_NS / 1_000_000
            );
        }
        if io_errors.count > 0 {
            summary += &format!(
                "I/O errors: {} ({})\n",
                io_errors.count,
                io_errors.first.as_deref().unwrap_or("")
            );
        }
        summary += &failures.summary_line();
        summary += &usage.summary_lines(&[("µs/datagram", tally.received as f64, 1e6)]);

        let mut relay_cpu = usage.relay_json(&[("per_datagram", tally.received as f64)]);
        if let (Some(o), Some((p0, p1))) = (relay_cpu.as_object_mut(), procs) {
            o.insert("descendants".into(), json!(true));
            o.insert("processes".into(), json!({"start": p0, "end": p1}));
        }
        Report {
            mode: "udp",
            target: a.conn.target_json(dialer),
            params: json!({
                "assocs": a.assocs,
                "threads": a.threads,
                "size": a.size,
                "loop": if open { "open" } else { "closed" },
                "window": if open { Value::Null } else { json!(a.window) },
                "rate": a.rate,
                "duration": a.time.duration,
                "warmup": a.time.warmup,
                "drain": a.drain,
                "gso": a.client_send() == "gso",
                "plain": a.plain,
                "client_send": a.client_send(),
                "target_send": if a.conn.target.is_some() { Value::Null } else { json!(a.target_send()) },
                "udp_targets": targets.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
                "rlimit_nofile": nofile,
            }),
            results: json!({
                "elapsed_seconds": secs,
                "associations": opened,
                "setup_seconds": setup_secs,
                "sent": tally.sent,
                "received": tally.received,
                "datagrams_per_sec": dps,
                "sent_per_sec": tally.sent as f64 / secs,
                "gbps": dps * a.size as f64 * 8e-9,
                "loss": {"count": lost, "fraction": loss_frac},
                "excess": tally.excess(),
                "rtt": latency_json(&rtt),
                "send_lag": if open { latency_json(&lag) } else { Value::Null },
                "bad_replies": {"count": tally.bad, "first": bad_first},
                "stalled": stalls,
                "io_errors": io_errors.json(),
                "sent_total": tally.sent_all,
                "received_total": tally.received_all,
                "target_echoed": if echoed > 0 { json!(echoed) } else { Value::Null },
                "failures": failures.json(),
                "loadgen_cpu_seconds": usage.self_seconds,
            }),
            relay_cpu,
            summary,
        }
    }
}
