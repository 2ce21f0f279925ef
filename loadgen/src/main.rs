//! loadgen: the load generator bundled with ringsocks.
//!
//! Measures a SOCKS5 relay (`--proxy`) or the loopback limit without one
//! (`--direct`) against an in-process target: bulk throughput, ping-pong
//! latency, connection rate, the memory cost of idle connections and UDP
//! ASSOCIATE datagram rate, loss and latency. See
//! README.md for the modes and the JSON fields.
//!
//! `unsafe` is confined to thin wrappers of the libc calls that std,
//! socket2 and procfs do not cover: epoll (`epoll`), `recvmmsg`/`sendmmsg`
//! with UDP GSO (`serve::mmsg`), `SO_RCVBUFFORCE` (`serve::udp_echo`), the
//! open loop's timerfd (`udp::worker`), RLIMIT_NOFILE and timer slack
//! (`sys`), and `PR_SET_PDEATHSIG`, `kill` and `unshare` for the relays of
//! `compare` (`relays`). Every block carries a `SAFETY` comment; the lint
//! below keeps it that way.

#![deny(clippy::undocumented_unsafe_blocks)]

use clap::{Parser, Subcommand};
use mimalloc::MiMalloc;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

mod chart;
mod check;
mod common;
mod compare;
mod cps;
mod cpu;
mod epoll;
mod idle;
mod latency;
mod relays;
mod serve;
mod sys;
mod throughput;
mod udp;

#[derive(Parser, Debug)]
#[command(name = "loadgen", version, about = "Load generator for SOCKS5 relays")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Run the target servers (TCP echo/discard/source, UDP echo)
    Serve(serve::Args),
    /// Bulk transfer over N parallel CONNECT streams
    TcpThroughput(throughput::Args),
    /// Ping-pong round-trip latency (closed loop, or open loop with --rate)
    TcpLatency(latency::Args),
    /// Connections per second: connect, handshake, 1-byte echo, close
    TcpCps(cps::Args),
    /// Memory and fds the relay spends on idle connections
    Idle(idle::Args),
    /// Datagrams through UDP ASSOCIATE: rate, loss, RTT over N associations
    Udp(udp::Args),
    /// Side-by-side suite: ringsocks (splice, copy), direct, Dante, microsocks
    Compare(compare::Args),
    /// Fail when ringsocks' ratios of a compare run fell below the baseline's
    Check(check::CheckArgs),
    /// Write results/baseline.json from several compare runs
    Baseline(check::BaselineArgs),
}

fn main() {
    let cli = Cli::parse();
    let r = match &cli.mode {
        Mode::Serve(a) => serve::run(a),
        Mode::TcpThroughput(a) => throughput::run(a),
        Mode::TcpLatency(a) => latency::run(a),
        Mode::TcpCps(a) => cps::run(a),
        Mode::Idle(a) => idle::run(a),
        Mode::Udp(a) => udp::run(a),
        Mode::Compare(a) => compare::run(a),
        Mode::Check(a) => check::run_check(a),
        Mode::Baseline(a) => check::run_baseline(a),
    };
    if let Err(e) = r {
        eprintln!("loadgen: {e}");
        std::process::exit(1);
    }
}
