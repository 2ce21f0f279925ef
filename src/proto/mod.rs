//! SOCKS5 (RFC 1928) and username/password sub-negotiation (RFC 1929), sans-IO.
//!
//! Everything here is a pure function over byte slices, so the whole protocol
//! surface can be unit-, property- and fuzz-tested without a kernel, and the
//! server and relay only ever move bytes in and out of these functions.
//! This is the code that parses attacker-controlled input: no raw memory here (the crate's
//! lints deny it outside the engine).
//!
//! - [`proxy`]: HAProxy's PROXY protocol header (v1 text, v2 binary) that a load balancer
//!   may prepend to a connection, decoded the same sans-IO way.

pub mod addr;
pub mod auth;
pub mod client;
pub mod codec;
pub mod error;
pub mod proxy;
pub mod server;
pub mod udp;
pub mod udp_assoc;
pub mod udp_burst;
pub mod wire;

pub use addr::Addr;
pub use auth::Users;
pub use codec::{Decoded, Greeting, Reply, Request, UserPass};
pub use error::{ProtoError, RelayError};
pub use server::{ServerHandshake, Step};
pub use wire::{Atyp, Command, Method, Rep};

#[cfg(test)]
mod proptests;
