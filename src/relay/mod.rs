//! Per-connection relay logic, driven by shard completions. It starts ops only through the
//! shard's safe submission API, so it contains no `unsafe`.
//!
//! - [`tcp`]: a proxied TCP connection: handshake, CONNECT, splice and copy forwarding; also
//!   the control connection of a UDP association.
//! - [`udp`]: a UDP association's sockets and datagram paths.
#![forbid(unsafe_code)]

pub mod tcp;
pub mod udp;
