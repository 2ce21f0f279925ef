//! The in-process target as the client modes see it: what to listen on
//! ([`Spec`]), the running servers' addresses ([`Target`]) and the
//! [`Counters`] the measuring modes read (bytes echoed, discarded, held
//! connections). Starting it hands each listener to [`super::tcp`] or
//! [`super::udp_echo`].

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use socket2::{Domain, Protocol, Socket, Type};

use super::tcp::{hold_loop, start_pool, Kind, WORKER_STACK};
use super::udp_echo::{udp_echo_loop, udp_echo_sockets, UdpEcho};

/// Counters of an in-process target, read by the measuring modes.
#[derive(Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    /// Bytes read by echo connections.
    pub echo_bytes: AtomicU64,
    /// Bytes written by source connections (parked in buffers included:
    /// only for information; throughput is counted at the receiver).
    pub source_bytes: AtomicU64,
    /// One counter per discard connection, in accept order: bytes read.
    pub discard: Mutex<Vec<Arc<AtomicU64>>>,
    pub udp_packets: AtomicU64,
    pub udp_bytes: AtomicU64,
    /// Connections accepted by the hold listener, kept open until `release_held`.
    pub held: Mutex<Vec<TcpStream>>,
}

impl Counters {
    pub fn discard_snapshot(&self) -> Vec<u64> {
        let list = self.discard.lock().unwrap();
        list.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }

    pub fn discard_total(&self) -> u64 {
        self.discard_snapshot().iter().sum()
    }

    pub fn held_count(&self) -> usize {
        self.held.lock().unwrap().len()
    }

    pub fn release_held(&self) {
        let taken = std::mem::take(&mut *self.held.lock().unwrap());
        drop(taken);
    }
}

/// What to listen on.
#[derive(Default, Debug, Clone)]
pub struct Spec {
    pub echo: Option<SocketAddr>,
    pub discard: Option<SocketAddr>,
    pub source: Option<SocketAddr>,
    pub hold: Option<SocketAddr>,
    pub udp_echo: Option<SocketAddr>,
    /// Sockets (and threads) of the UDP echo, on one port with SO_REUSEPORT; 0 = 1.
    pub udp_threads: usize,
    /// The UDP echo answers datagram by datagram (one sendmsg each, no GSO).
    pub udp_plain: bool,
}

/// A running target; its threads live until the process exits.
pub struct Target {
    pub echo: Option<SocketAddr>,
    pub discard: Option<SocketAddr>,
    pub source: Option<SocketAddr>,
    pub hold: Option<SocketAddr>,
    pub udp_echo: Option<SocketAddr>,
    pub counters: Arc<Counters>,
}

/// A listener with a deep accept queue (std's is 128), so bursts of
/// connects are never dropped and retried a second later.
pub fn listen_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

pub fn any_port() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 0)))
}

impl Target {
    pub fn start(spec: &Spec) -> std::io::Result<Target> {
        let counters = Arc::new(Counters::default());
        let tcp = |addr: Option<SocketAddr>, kind: Kind| -> std::io::Result<_> {
            let Some(addr) = addr else { return Ok(None) };
            let l = listen_tcp(addr)?;
            let local = l.local_addr()?;
            start_pool(l, kind, counters.clone())?;
            Ok(Some(local))
        };
        let echo = tcp(spec.echo, Kind::Echo)?;
        let discard = tcp(spec.discard, Kind::Discard)?;
        let source = tcp(spec.source, Kind::Source)?;
        let hold = match spec.hold {
            Some(addr) => {
                let l = listen_tcp(addr)?;
                let local = l.local_addr()?;
                let c = counters.clone();
                thread::Builder::new()
                    .name("hold".into())
                    .stack_size(WORKER_STACK)
                    .spawn(move || hold_loop(l, c))?;
                Some(local)
            }
            None => None,
        };
        let udp_echo = match spec.udp_echo {
            Some(addr) => {
                let socks = udp_echo_sockets(addr, spec.udp_threads.max(1), false)?;
                let local = socks[0].local_addr()?;
                for s in socks {
                    let c = counters.clone();
                    let mut echo = UdpEcho::new(s, spec.udp_plain);
                    thread::Builder::new()
                        .name("udp-echo".into())
                        .spawn(move || udp_echo_loop(&mut echo, &c))?;
                }
                Some(local)
            }
            None => None,
        };
        Ok(Target {
            echo,
            discard,
            source,
            hold,
            udp_echo,
            counters,
        })
    }
}
