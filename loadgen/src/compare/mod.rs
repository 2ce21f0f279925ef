//! compare: the side-by-side suites. TCP (`full`, `ci`): ringsocks on its
//! forwarding paths, direct loopback, Dante, microsocks, and (`full`)
//! 3proxy and hev-socks5-server, built from source and named by
//! `RINGSOCKS_PEER_3PROXY` and `RINGSOCKS_PEER_HEV`; UDP (`udp`):
//! ringsocks, direct loopback, Dante, 3proxy and hev (microsocks has no
//! UDP ASSOCIATE). Each system is measured on the same figures,
//! repetitions rotating the order of systems; medians and ratios to the
//! references of the same run go to a JSON file, to the suite's block of
//! the generated section of results/README.md and to an SVG chart.
//!
//! Every measurement is one run of this same binary in a client mode
//! (`tcp-throughput`, `tcp-latency`, `tcp-cps`, `udp`) with `--json -`,
//! pinned with `--cpu`, so each report is exactly what that mode writes
//! alone; the `full` suite adds a third-party cross-check, iperf3 through
//! proxychains4 at 1 and 8 streams.
//!
//! Layout: [`args`] is the command line; [`suite`] says what each suite
//! runs (systems, measurements with their loadgen options, durations);
//! [`figures`] what is read out of each run's report and which way is
//! better; [`peers`] starts the relays and warms them up; [`iperf`] runs
//! the iperf3 cross-check; [`measure`] runs
//! every measurement as a child process, repetition by repetition;
//! [`stats`] takes medians and ratios; [`document`] assembles and writes
//! the suite's JSON; [`markdown`] renders its tables and [`readme`] splices
//! them into results/README.md. [`run`] does them in that order.

mod args;
mod document;
mod figures;
mod iperf;
mod markdown;
mod measure;
mod peers;
mod readme;
mod stats;
mod suite;

pub use args::Args;
pub use figures::{figure, figures_of, Better};
pub use markdown::{fmt_num, system_names};
pub use stats::median;

use std::thread;
use std::time::Instant;

use crate::common::Result;
use crate::relays::Kind;

use markdown::markdown;
use readme::update_readme;

/// The settings of a suite run after defaults and checks, which every
/// measurement and the document use.
struct Settings {
    duration: f64,
    warmup: f64,
    relay_cpu: Option<usize>,
    load_cpu: usize,
    private_netns: bool,
}

/// Runs `loadgen compare`: starts the systems, warms them up, measures,
/// and writes the JSON, the chart and the README section.
pub fn run(a: &Args) -> Result<()> {
    let wall = Instant::now();
    if !(1..=50).contains(&a.reps) {
        return Err("--reps must be 1..=50".into());
    }
    if a.reps < 3 {
        eprintln!("compare: warning: fewer than 3 repetitions; medians are weak");
    }
    let (mut duration, mut warmup) = a.suite.times();
    duration = a.duration.unwrap_or(duration);
    warmup = a.warmup.unwrap_or(warmup);
    if !(duration > 0.0 && duration <= 600.0 && (0.0..=60.0).contains(&warmup)) {
        return Err("--duration must be in (0, 600], --warmup in [0, 60]".into());
    }
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    let (relay_cpu, load_cpu) = if cores >= 2 {
        (Some(a.relay_cpu), a.load_cpu)
    } else {
        eprintln!("compare: warning: one CPU; relay and load share it");
        (Some(0), 0)
    };
    let private_netns = if a.no_netns {
        false
    } else {
        match crate::relays::enter_private_netns() {
            Ok(()) => true,
            Err(e) => {
                eprintln!(
                    "compare: warning: no private network namespace ({e}); \
                     runs after relayed tcp-cps may fail to bind for lack of ephemeral ports"
                );
                false
            }
        }
    };
    // Pin ourselves too: all we do between runs is wait.
    core_affinity::set_for_current(core_affinity::CoreId { id: load_cpu });

    let mut kinds = a.suite.kinds();
    if !a.systems.is_empty() {
        let mut want = Vec::new();
        for s in &a.systems {
            want.push(Kind::from_name(s).ok_or_else(|| format!("--system {s}: unknown"))?);
        }
        kinds.retain(|k| want.contains(k));
    }
    let ringsocks = match &a.ringsocks {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("ringsocks"),
    };
    let settings = Settings {
        duration,
        warmup,
        relay_cpu,
        load_cpu,
        private_netns,
    };

    let peers = peers::start_peers(a.suite, &kinds, &ringsocks, relay_cpu, load_cpu)?;
    if peers.present.is_empty() {
        return Err("no system to measure".into());
    }
    peers::warm_up(a, &peers, load_cpu);
    let measured = measure::measure_all(a, &settings, &peers);
    let doc = document::suite_document(a, &settings, &peers, measured, wall)?;
    // Stops the relays.
    drop(peers);

    let json_path = document::write_document(a, &doc)?;
    let section = markdown(&doc, &json_path, &a.results_dir);
    println!("{section}");
    eprintln!(
        "compare: {} suite in {:.0} s; wrote {}",
        a.suite.name(),
        wall.elapsed().as_secs_f64(),
        json_path.display()
    );
    if !a.no_readme {
        let svg = a.results_dir.join(format!("{}.svg", a.suite.name()));
        crate::chart::draw(&doc, &svg)?;
        update_readme(&a.results_dir.join("README.md"), a.suite.name(), &section)?;
        eprintln!(
            "compare: wrote {} and the generated section of {}",
            svg.display(),
            a.results_dir.join("README.md").display()
        );
    }
    // Said again at the end, where it is not scrolled away.
    for x in doc["skipped"].as_array().into_iter().flatten() {
        eprintln!(
            "compare: skipped {}: {}",
            x["name"].as_str().unwrap_or("?"),
            x["reason"].as_str().unwrap_or("?")
        );
    }
    if let Some(why) = doc["iperf"]["skipped"].as_str() {
        eprintln!("compare: skipped the iperf3 cross-check: {why}");
    }
    let failed = doc["runs"]
        .as_array()
        .map_or(0, |r| r.iter().filter(|x| !x["error"].is_null()).count());
    if failed > 0 {
        eprintln!("compare: {failed} run(s) failed (see `error` in the JSON)");
    }
    Ok(())
}
