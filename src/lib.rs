//! ringsocks: a SOCKS5 relay on thread-per-core io_uring shards.
//!
//! Layers, top to bottom (each uses only the ones below it):
//! - [`server`]: one shard per core: the event loop, the connection slab, accept back-off,
//!   stop and drain;
//! - `relay`: what a connection does (handshake, connect, forwarding, UDP ASSOCIATE), driven
//!   through the engine trait, so it is unit-tested with a fake engine and virtual time;
//! - [`proto`]: sans-IO SOCKS5 / RFC 1929 codec, handshake machine, UDP rules and burst
//!   rewriting; no sockets, no ring;
//! - [`rules`]: sans-IO access rules (which client and user may reach which target), compiled
//!   into indexes once, asked by the relay before connecting and after resolving;
//! - [`dns`]: the getaddrinfo pool whose answers come back to a shard;
//! - [`config`]: command line, config file and validation;
//! - [`metrics`] and [`access_log`]: what operators see: per-shard counters summed by a
//!   scrape thread, and one access-log line per finished request through a writer thread;
//! - [`activation`]: systemd socket activation: the listening sockets a service manager
//!   passed (`process::take_listen_fds`), checked and shared by every shard;
//! - `uring`: the io_uring engine, the only place allowed raw memory and system calls (the
//!   lints in Cargo.toml deny raw-memory code everywhere else); knows nothing of SOCKS.

pub mod access_log;
pub mod activation;
pub mod config;
pub mod dns;
pub mod limits;
pub mod metrics;
pub mod proto;
pub(crate) mod relay;
pub mod rules;
pub mod server;
pub(crate) mod uring;

/// Process set-up the binary needs before it starts shards.
pub mod process {
    pub use crate::uring::sys::{
        block_control_signals, ignore_sigpipe, nofile_soft, raise_nofile, take_listen_fds,
        wait_signal,
    };
}
