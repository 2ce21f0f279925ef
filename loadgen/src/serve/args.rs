//! The command line of `loadgen serve`: which listeners to open, for how
//! long, and where the report goes.

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// TCP echo listener (e.g. 127.0.0.1:7)
    #[arg(long, value_name = "ADDR")]
    pub tcp_echo: Option<String>,
    /// TCP discard listener
    #[arg(long, value_name = "ADDR")]
    pub tcp_discard: Option<String>,
    /// TCP source listener (sends a byte pattern until the peer goes)
    #[arg(long, value_name = "ADDR")]
    pub tcp_source: Option<String>,
    /// UDP echo socket
    #[arg(long, value_name = "ADDR")]
    pub udp_echo: Option<String>,
    /// UDP echo sockets on that port (SO_REUSEPORT), one thread each
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub udp_threads: usize,
    /// The UDP echo answers datagram by datagram: one sendmsg each, no GSO
    /// (default: one sendmmsg per batch, equal-sized runs as UDP GSO messages)
    #[arg(long)]
    pub udp_plain: bool,
    /// Exit after S seconds (default: run until killed)
    #[arg(long, value_name = "S")]
    pub duration: Option<f64>,
    /// Write the JSON report (at exit) to FILE, `-` for stdout
    #[arg(long, value_name = "FILE")]
    pub json: Option<String>,
    /// No per-second counter lines
    #[arg(long, short)]
    pub quiet: bool,
    /// Pin to this CPU
    #[arg(long, value_name = "CPU")]
    pub cpu: Option<usize>,
}
