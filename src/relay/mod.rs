//! Per-connection relay logic: everything between an accepted client socket and its end,
//! driven by the completions the server hands it. It talks to the kernel only through the
//! [`Engine`] trait, so the same code runs on the io_uring ring and, in unit tests, on a
//! recording fake with virtual time. No sockets are opened here.
//!
//! - [`conn`]: a connection's lifecycle: its stages, op accounting, timers, close and release;
//! - [`handshake`]: greeting, authentication and request, fed to the sans-IO
//!   [`crate::proto::ServerHandshake`];
//! - [`connect`]: resolving, connecting to each address in turn, the reply, error replies;
//! - [`bind`]: BIND: a listener, the first reply, one accepted peer, the second reply;
//! - [`forward`]: a tunnel's two directions, on the splice path or the copy path;
//! - [`udp`]: UDP ASSOCIATE: the control connection and the association's datagram paths;
//! - [`token`]: owner tokens (connection id + op) packed into the engine's words.

mod bind;
pub(crate) mod conn;
mod connect;
mod forward;
mod handshake;
pub(crate) mod token;
pub(crate) mod udp;

#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::time::Instant;

use crate::config::Config;
use crate::dns::{Addrs, ResolveError};
use crate::limits::{Limits, RefusalLog};
use crate::proto::Addr;
use crate::rules::{Command, Request, Verdict};
use crate::uring::{Engine, Group, Owner};

pub(crate) use conn::Conn;

/// The client address the rules see: unspecified when the socket had none (never in
/// practice; no `from` rule matches it).
pub(crate) fn client_ip(peer: Option<std::net::SocketAddr>) -> IpAddr {
    peer.map_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |p| p.ip())
}

impl Conn {
    /// The rules' verdict on a request of `command` for `dst` as the client wrote it: an
    /// address, or a name before it is resolved.
    pub(crate) fn access<E: Engine>(
        &self,
        cx: &Ctx<'_, E>,
        command: Command,
        dst: &Addr,
        user: Option<&[u8]>,
    ) -> Verdict {
        if cx.cfg.rules.is_open() {
            return Verdict::Allow;
        }
        let (name, ip) = match dst {
            Addr::Ip(a) => (None, Some(a.ip())),
            Addr::Domain(n, _) => (Some(&n[..]), None),
        };
        cx.cfg.rules.check(&Request {
            client: client_ip(self.peer),
            user,
            command,
            name,
            ip,
            port: dst.port(),
        })
    }
}
pub(crate) use token::{ConnId, Dir, Side};

/// Name resolution as the relay sees it: an answer now (cache hit, IP literal, unusable
/// name), or None and the answer later, delivered to `owner` through `Conn::on_resolved`.
pub(crate) trait Resolve {
    fn lookup(
        &mut self,
        name: &[u8],
        port: u16,
        owner: Owner,
        client: Option<IpAddr>,
        now: Instant,
    ) -> Option<Result<Addrs, ResolveError>>;

    /// The connection behind `owner` no longer waits for the lookup it asked for.
    fn forget(&mut self, owner: Owner);
}

impl Resolve for crate::dns::ShardResolver {
    fn lookup(
        &mut self,
        name: &[u8],
        port: u16,
        owner: Owner,
        client: Option<IpAddr>,
        now: Instant,
    ) -> Option<Result<Addrs, ResolveError>> {
        crate::dns::ShardResolver::lookup(self, name, port, owner.0, client, now)
    }

    fn forget(&mut self, owner: Owner) {
        crate::dns::ShardResolver::forget(self, owner.0);
    }
}

/// What the connections of one shard share: the buffer groups, the receives waiting for
/// buffers, and the fragment-reassembly budget.
#[derive(Default)]
pub(crate) struct ShardState {
    /// The copy path's buffers (None with `--forward splice`).
    pub copy_group: Option<Group>,
    /// `--forward auto`: with fewer free copy buffers than this, a direction whose
    /// destination falls behind moves to splice instead of holding buffers.
    pub copy_scarce_below: u32,
    /// UDP datagram buffers (None: UDP ASSOCIATE is off).
    pub udp_group: Option<Group>,
    /// Copy-path receives that ended for lack of buffers, to re-arm once some are back.
    pub starved: Vec<(ConnId, Dir)>,
    /// UDP receives that ended for lack of buffers.
    pub udp_starved: Vec<(ConnId, Side)>,
    /// Refusals by the connection limits, for rate-limited log lines.
    pub refusals: RefusalLog,
    /// Bytes held by fragment reassembly queues on this shard.
    pub frag_bytes: usize,
    /// Copy-path directions that received this turn and send at its end (`Conn::flush_copy`).
    pub copy_flush: Vec<(ConnId, Dir)>,
    /// Associations holding single datagrams to send as batches at the end of the turn
    /// (`Conn::flush_udp`).
    pub udp_flush: Vec<ConnId>,
}

/// Everything a connection's handlers may use: the engine, the configuration, the time of
/// this loop turn, the resolver and the shard's shared state.
pub(crate) struct Ctx<'a, E: Engine> {
    pub io: &'a mut E,
    pub cfg: &'a Config,
    pub now: Instant,
    pub dns: &'a mut dyn Resolve,
    pub shard: &'a mut ShardState,
    pub limits: &'a Limits,
    /// The shard's metrics (it is their only writer).
    pub metrics: &'a crate::metrics::ShardMetrics,
    /// `--access-log`, when on.
    pub access: Option<&'a crate::access_log::AccessLog>,
}
