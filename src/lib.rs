//! ringsocks: a SOCKS5 relay on thread-per-core io_uring shards.
//!
//! The crate is split so that the parts that can be tested without a kernel are:
//! - [`proto`]: sans-IO SOCKS5 / RFC 1929 codec and the server handshake machine;
//! - [`config`]: command line and validation;
//! - [`dns`]: the getaddrinfo pool whose answers are delivered back to a shard;
//! - [`shard`]: the only place with `unsafe`: the ring, op table, buffer ring, pipe pool, timers;
//! - [`relay`]: per-connection logic driven by the shard's completions.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod config;
pub mod dns;
pub mod proto;
pub mod relay;
pub mod shard;
