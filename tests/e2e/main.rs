//! End-to-end tests: the real `ringsocks` binary over loopback, driven by curl, ncat,
//! PySocks and raw sockets. One test binary, one module per area; `common` holds the shared
//! harness (the relay process, servers, a raw SOCKS5 client).
//!
//! `cargo test --release --test e2e MODULE::` runs one area, e.g. `udp::` or `scale::`.

mod common;

mod bind;
mod chain;
mod curl;
mod dns;
mod floods;
mod limits;
mod ncat;
mod observe;
mod probes;
mod proxy_protocol;
mod rules;
mod scale;
mod scaleout;
mod service;
mod shutdown;
mod udp;
mod udp_scale;
