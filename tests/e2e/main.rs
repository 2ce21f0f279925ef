//! End-to-end tests: the real `ringsocks` binary over loopback, driven by curl, ncat,
//! PySocks and raw sockets. One test binary, one module per area; `common` holds the shared
//! harness (the relay process, servers, a raw SOCKS5 client).
//!
//! `cargo test --release --test e2e MODULE::` runs one area, e.g. `udp::` or `scale::`.

mod common;

mod curl;
mod dns;
mod floods;
mod limits;
mod ncat;
mod probes;
mod rules;
mod scale;
mod shutdown;
mod udp;
mod udp_scale;
