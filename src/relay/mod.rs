//! Per-connection relay logic, driven by shard completions. It starts ops only through the
//! shard's safe submission API, so it contains no `unsafe`.
//!
//! - [`tcp`]: a proxied TCP connection: handshake, CONNECT, splice and copy forwarding.
#![forbid(unsafe_code)]

pub mod tcp;
