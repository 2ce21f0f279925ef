//! The systems of a suite run: starting every relay once (pinned, each on
//! its own port; one that is not installed, whose binary is not given, or
//! that does not start is skipped with the reason, except ringsocks), the
//! iperf3 cross-check's server, and one untimed warm-up pass over each
//! relay before the first repetition.

use std::collections::BTreeMap;
use std::path::Path;
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};

use super::iperf::CrossCheck;
use super::measure::run_loadgen;
use super::suite::{Measurement, Suite};
use super::Args;
use crate::common::Result;
use crate::relays::{Kind, Relay};

/// The relays started (by name), the systems present (direct loopback
/// included, in suite order), those skipped, with the reason, and the
/// iperf3 cross-check (its server, or why it is not run).
pub(super) struct Peers {
    pub relays: BTreeMap<&'static str, Relay>,
    pub present: Vec<Kind>,
    pub skipped: Vec<Value>,
    pub iperf: CrossCheck,
}

/// Starts every relay of `kinds` once, pinned to `relay_cpu`; they idle
/// while the others are measured. A ringsocks that fails to start is an
/// error; any other system is skipped with a note, and so are the peers
/// `suite` leaves out (microsocks in the UDP suite: no UDP ASSOCIATE).
/// Then the iperf3 server if `suite` has the cross-check.
pub(super) fn start_peers(
    suite: Suite,
    kinds: &[Kind],
    ringsocks: &Path,
    relay_cpu: Option<usize>,
    load_cpu: usize,
) -> Result<Peers> {
    let mut relays: BTreeMap<&'static str, Relay> = BTreeMap::new();
    let mut skipped = Vec::new();
    let mut present: Vec<Kind> = Vec::new();
    for (k, why) in suite.left_out() {
        eprintln!(
            "compare: {}: {why}: not in the {} suite",
            k.name(),
            suite.name()
        );
        skipped.push(json!({"name": k.name(), "reason": why}));
    }
    for &k in kinds {
        if k == Kind::Direct {
            present.push(k);
            continue;
        }
        if !k.is_ringsocks() {
            if let Err(why) = k.peer_binary() {
                eprintln!("compare: {}: {why}: skipped", k.name());
                skipped.push(json!({"name": k.name(), "reason": why}));
                continue;
            }
        }
        match Relay::start(k, ringsocks, relay_cpu) {
            Ok(r) => {
                eprintln!(
                    "compare: {} on {} (pid {}, {})",
                    k.name(),
                    r.addr,
                    r.pid(),
                    r.version
                );
                relays.insert(k.name(), r);
                present.push(k);
            }
            Err(e) if k.is_ringsocks() => return Err(format!("{}: {e}", k.name()).into()),
            Err(e) => {
                eprintln!("compare: {} did not start ({e}): skipped", k.name());
                skipped.push(json!({"name": k.name(), "reason": e.to_string()}));
            }
        }
    }
    let iperf = CrossCheck::start(suite, load_cpu);
    Ok(Peers {
        relays,
        present,
        skipped,
        iperf,
    })
}

/// One untimed pass over every relay: Dante forks its worker processes
/// on demand, and the process set must be stable for its CPU figure to
/// cover every worker; the others get the same treatment for fairness.
pub(super) fn warm_up(a: &Args, peers: &Peers, load_cpu: usize) {
    let relays = &peers.relays;
    let warm_ups: &[Measurement] = match a.suite {
        // Dante forks a worker per few associations: let it fork for 2000 once.
        Suite::Udp => &[Measurement::Udp64x8, Measurement::Udp64x2000],
        Suite::UdpCi => &[Measurement::Udp64x8],
        _ => &[Measurement::Cps, Measurement::Tput16],
    };
    for r in relays.values() {
        for &m in warm_ups {
            let mut argv: Vec<String> = m.args().into_iter().map(String::from).collect();
            argv.extend(
                [
                    "--proxy",
                    &r.addr.to_string(),
                    "--duration",
                    "0.7",
                    "--warmup",
                    "0",
                    "--cpu",
                    &load_cpu.to_string(),
                    "--quiet",
                    "--json",
                    "-",
                ]
                .map(String::from),
            );
            if let (_, Some(e)) = run_loadgen(&argv, Duration::from_secs(30)) {
                eprintln!("compare: warm-up of {}: {e}", r.kind.name());
            }
        }
    }
    thread::sleep(Duration::from_millis(300));
}
