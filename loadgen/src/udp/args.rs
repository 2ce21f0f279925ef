//! The command line of `loadgen udp`: the associations, the load (window
//! or rate), the datagram size, threads and drain, and how each side
//! sends (GSO, batched, or plain).

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
    /// Client without UDP GSO: a window's datagrams still leave in one sendmmsg call, but
    /// as separate messages; the in-process echo target still answers in GSO runs
    #[arg(long)]
    pub no_gso: bool,
    /// Neither side batches sends, like most UDP clients and the servers they talk to:
    /// the client and the in-process echo target each send one datagram per sendmsg call,
    /// no GSO (both still receive with recvmmsg; no GRO on either side)
    #[arg(long)]
    pub plain: bool,
}

impl Args {
    /// How the client sends: `gso` (sendmmsg, equal-sized runs as UDP GSO
    /// messages), `mmsg` (sendmmsg, one message per datagram) or `single`
    /// (one sendmsg per datagram).
    pub fn client_send(&self) -> &'static str {
        if self.plain {
            "single"
        } else if self.no_gso {
            "mmsg"
        } else {
            "gso"
        }
    }

    /// How the in-process echo target sends: `gso` or `single`.
    pub fn target_send(&self) -> &'static str {
        if self.plain {
            "single"
        } else {
            "gso"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        udp: Args,
    }

    fn sends(argv: &[&str]) -> (&'static str, &'static str) {
        let a = Cli::try_parse_from([&["udp", "--direct"], argv].concat())
            .unwrap()
            .udp;
        (a.client_send(), a.target_send())
    }

    #[test]
    fn send_modes() {
        assert_eq!(sends(&[]), ("gso", "gso"));
        assert_eq!(sends(&["--no-gso"]), ("mmsg", "gso"));
        assert_eq!(sends(&["--plain"]), ("single", "single"));
        assert_eq!(sends(&["--plain", "--no-gso"]), ("single", "single"));
    }
}
