//! The command line of `loadgen compare`: the suite, repetitions and
//! durations, which systems, where the results go, and the CPUs.

use std::path::PathBuf;

use super::suite::Suite;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[arg(long, value_enum, default_value_t = Suite::Full)]
    pub suite: Suite,
    /// Repetitions; the order of systems rotates on each
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Seconds measured per run (default: 5 for full, 2 for ci, 3 for udp)
    #[arg(long)]
    pub duration: Option<f64>,
    /// Seconds of warmup per run (default: 1 for full, 0.5 for ci and udp)
    #[arg(long)]
    pub warmup: Option<f64>,
    /// Only these systems (repeatable): ringsocks-auto, ringsocks-splice, ringsocks-copy, direct, dante, microsocks, 3proxy, hev; udp: ringsocks, direct, dante, 3proxy, hev
    #[arg(long = "system", value_name = "NAME")]
    pub systems: Vec<String>,
    /// ringsocks binary (default: next to this loadgen binary)
    #[arg(long, value_name = "PATH")]
    pub ringsocks: Option<PathBuf>,
    /// Write the suite JSON here (default: results/<date>-<suite>.json)
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Directory of results/README.md and the chart
    #[arg(long, default_value = "results", value_name = "DIR")]
    pub results_dir: PathBuf,
    /// Do not touch results/README.md nor the chart (CI)
    #[arg(long)]
    pub no_readme: bool,
    /// CPU for the relays
    #[arg(long, default_value_t = 0)]
    pub relay_cpu: usize,
    /// CPU for loadgen and its in-process target
    #[arg(long, default_value_t = 1)]
    pub load_cpu: usize,
    /// Stay in the current network namespace (default: a private one, see README)
    #[arg(long)]
    pub no_netns: bool,
}
