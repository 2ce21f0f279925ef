//! The command line of `loadgen udp`: the associations, the load (window
//! or rate), the datagram size, threads and drain.

use crate::common::{ConnArgs, TimeArgs};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub time: TimeArgs,
    /// Associations (each: a control connection and a UDP socket)
    #[arg(long, default_value_t = 1)]
    pub assocs: usize,
    /// Datagrams in flight per association (closed loop)
    #[arg(long, default_value_t = 1)]
    pub window: usize,
    /// Payload bytes per datagram, at least 24 (the stamp: send time, sequence, association)
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Threads; associations are split evenly, each thread runs its own echo socket
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Open loop: datagrams per second over all associations (round robin), no window
    #[arg(long, value_name = "R", conflicts_with = "window")]
    pub rate: Option<f64>,
    /// Seconds to wait for late replies after the interval before counting them lost
    #[arg(long, default_value_t = 0.5, value_name = "S")]
    pub drain: f64,
    /// Send datagram by datagram (sendmmsg without UDP GSO), like most UDP clients; the
    /// target's echo still batches
    #[arg(long)]
    pub no_gso: bool,
}
