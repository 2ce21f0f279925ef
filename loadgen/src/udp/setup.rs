//! Opening the associations before traffic starts: a UDP socket on
//! 127.0.0.1 each, sized for its window, and (proxied) a UDP ASSOCIATE
//! over its own control connection, 16 handshakes at a time.

use std::net::{SocketAddr, UdpSocket};
use std::thread;

use socket2::{Domain, Protocol, Socket, Type};

use super::accounting::InFlight;
use super::worker::Assoc;
use crate::common::{Dialer, Failures};
use crate::serve::set_rcvbuf;

/// Receive buffer of an association's socket: room for its window.
pub(super) fn client_rcvbuf(window: usize, size: usize) -> usize {
    (window * (size + 1024) * 2).clamp(256 << 10, 64 << 20)
}

/// Opens association `id`: a UDP socket on 127.0.0.1, and (proxied) its
/// control connection; the socket is connected to the relay's UDP address,
/// or to `target` when direct.
fn open_assoc(
    d: &Dialer,
    id: u32,
    target: SocketAddr,
    rcvbuf: usize,
) -> std::result::Result<Assoc, String> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
        .map_err(|e| format!("socket: {e}"))?;
    set_rcvbuf(&s, rcvbuf).map_err(|e| format!("SO_RCVBUF: {e}"))?;
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .map_err(|e| format!("bind: {e}"))?;
    let sock: UdpSocket = s.into();
    let local = sock.local_addr().map_err(|e| e.to_string())?;
    let (ctl, peer) = match d.proxy {
        None => (None, target),
        Some(_) => {
            let (ctl, relay) = d
                .associate(local)
                .map_err(|e| format!("UDP ASSOCIATE: {e}"))?;
            ctl.set_nonblocking(true).map_err(|e| e.to_string())?;
            (Some(ctl), relay)
        }
    };
    sock.connect(peer)
        .map_err(|e| format!("connect {peer}: {e}"))?;
    sock.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok(Assoc {
        sock,
        ctl,
        id,
        seq: 0,
        inflight: InFlight::default(),
        dead: false,
    })
}

/// Opens associations `0..n` (association i targets `targets[i % len]`),
/// on up to 16 threads at once since each handshake is a round trip
/// through the relay. Failed ones are left out (with their error).
pub(super) fn open_all(
    d: &Dialer,
    n: usize,
    targets: &[SocketAddr],
    rcvbuf: usize,
) -> (Vec<Assoc>, Failures) {
    let helpers = n.clamp(1, 16);
    let mut results: Vec<(usize, std::result::Result<Assoc, String>)> = thread::scope(|sc| {
        let handles: Vec<_> = (0..helpers)
            .map(|h| {
                sc.spawn(move || {
                    (h..n)
                        .step_by(helpers)
                        .map(|i| {
                            let t = targets[i % targets.len()];
                            (i, open_assoc(d, i as u32, t, rcvbuf))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    results.sort_by_key(|(i, _)| *i);
    let mut ok = Vec::with_capacity(n);
    let mut failures = Failures::default();
    for (i, r) in results {
        match r {
            Ok(a) => ok.push(a),
            Err(e) => failures.add(format!("association {i}: {e}")),
        }
    }
    (ok, failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receive_buffer_fits_the_window() {
        assert_eq!(client_rcvbuf(1, 64), 256 << 10);
        assert!(client_rcvbuf(256, 1400) >= 256 * 1400);
        assert_eq!(client_rcvbuf(65_536, 65_000), 64 << 20);
    }
}
