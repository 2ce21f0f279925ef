//! systemd socket activation: turning the listening sockets a service manager passed
//! (`LISTEN_FDS`, taken by [`crate::process::take_listen_fds`]) into each shard's listeners.
//!
//! Without activation every shard binds its own `SO_REUSEPORT` socket per `--listen` address
//! ([`crate::server::bind_listeners`]) and the kernel spreads connections across them by hash.
//! With activation the sockets already exist, bound and listening, and there is one of each:
//! every shard gets a duplicate (`dup`) of every passed socket, so all shards accept from the
//! same kernel queue, and the kernel hands each connection to whichever shard's multishot
//! accept takes it first. `--listen` and `--ipv6-only` do not apply then: the socket unit's
//! `ListenStream=`, `BindIPv6Only=` and `Backlog=` decide the address, the dual-stack mode and
//! the queue length.
//!
//! When the relay stops, each shard closes its duplicates, but the service manager still
//! holds the sockets: clients that connect meanwhile wait in the queue for the next start
//! instead of being refused.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use socket2::{Domain, Protocol, Socket, Type};

/// Checks that every passed descriptor is a listening TCP socket (IPv4 or IPv6), gives it the
/// options the relay's own listeners have where they can still be set (`TCP_NODELAY`, which
/// accepted sockets inherit: the accept path relies on it; non-blocking), and returns, for
/// each of `shards` shards, the list of its listeners: the passed sockets themselves for shard
/// 0, a duplicate of each for every other shard (see the module docs).
///
/// Errors: no descriptor or no shard (`InvalidInput`); a descriptor that is not a listening
/// TCP socket (`InvalidInput`, naming its number); a failed `getsockopt`, `setsockopt` or
/// `dup` (its error, naming the descriptor).
pub fn listeners_from_fds(fds: Vec<OwnedFd>, shards: usize) -> io::Result<Vec<Vec<Socket>>> {
    if fds.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket activation: no socket was passed",
        ));
    }
    if shards == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket activation: no shard to hand the passed sockets to",
        ));
    }
    let socks = fds
        .into_iter()
        .map(checked_listener)
        .collect::<io::Result<Vec<Socket>>>()?;
    let mut per_shard = Vec::with_capacity(shards);
    for _ in 1..shards {
        let dups = socks
            .iter()
            .map(|s| {
                s.try_clone()
                    .map_err(|e| context(e, s.as_raw_fd(), "duplicating it"))
            })
            .collect::<io::Result<Vec<Socket>>>()?;
        per_shard.push(dups);
    }
    per_shard.insert(0, socks);
    Ok(per_shard)
}

/// `fd` as a socket, once it is known to be a listening TCP socket and has the options of the
/// relay's own listeners.
fn checked_listener(fd: OwnedFd) -> io::Result<Socket> {
    let n = fd.as_raw_fd();
    let sock = Socket::from(fd);
    let not = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket activation: descriptor {n} is not a listening TCP socket ({what})"),
        )
    };
    // ENOTSOCK: a file or a pipe, not a socket at all.
    let ty = sock.r#type().map_err(|e| match e.raw_os_error() {
        Some(libc::ENOTSOCK) => not("not a socket"),
        _ => context(e, n, "reading its type"),
    })?;
    if ty != Type::STREAM {
        return Err(not("not a stream socket"));
    }
    let domain = sock
        .domain()
        .map_err(|e| context(e, n, "reading its domain"))?;
    if domain != Domain::IPV4 && domain != Domain::IPV6 {
        return Err(not("not an IPv4 or IPv6 socket"));
    }
    match sock.protocol() {
        Ok(Some(p)) if p == Protocol::TCP => {}
        // 0 means the default protocol, which for an IP stream socket is TCP.
        Ok(None) => {}
        Ok(Some(_)) => return Err(not("not TCP")),
        Err(e) => return Err(context(e, n, "reading its protocol")),
    }
    if !sock
        .is_listener()
        .map_err(|e| context(e, n, "reading SO_ACCEPTCONN"))?
    {
        return Err(not("not listening"));
    }
    // As in `server::bind_listeners`: accepted sockets inherit TCP_NODELAY from their
    // listener, which saves a setsockopt per connection (the accept path does not set it).
    // SO_REUSEADDR/SO_REUSEPORT and IPV6_V6ONLY matter only before bind, and the backlog is
    // the socket unit's `Backlog=`: those stay as the service manager made them.
    sock.set_tcp_nodelay(true)
        .map_err(|e| context(e, n, "setting TCP_NODELAY"))?;
    // The passed socket may be blocking (systemd-socket-activate makes it so); every shard's
    // multishot accept expects EAGAIN when the queue is empty, never a blocked accept. Accepted
    // sockets do not inherit O_NONBLOCK on Linux, so connections are unaffected.
    sock.set_nonblocking(true)
        .map_err(|e| context(e, n, "making it non-blocking"))?;
    Ok(sock)
}

fn context(e: io::Error, fd: i32, doing: &str) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("socket activation: descriptor {fd}: {doing}: {e}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::time::{Duration, Instant};

    fn tcp_listener(addr: &str) -> Socket {
        let addr: SocketAddr = addr.parse().unwrap();
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).unwrap();
        s.bind(&addr.into()).unwrap();
        s.listen(16).unwrap();
        s
    }

    fn local(s: &Socket) -> SocketAddr {
        s.local_addr().unwrap().as_socket().unwrap()
    }

    /// Accepts on a non-blocking listener, retrying for up to 5 s.
    fn accept_within(l: &Socket) -> Socket {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match l.accept() {
                Ok((s, _)) => return s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    }

    fn refused(fd: OwnedFd) -> String {
        let n = fd.as_raw_fd();
        let e = listeners_from_fds(vec![fd], 2).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        let msg = e.to_string();
        assert!(msg.contains(&format!("descriptor {n} ")), "{msg}");
        msg
    }

    #[test]
    fn every_shard_accepts_from_the_passed_sockets() {
        let v4 = tcp_listener("127.0.0.1:0");
        let addr = local(&v4);
        let shards = listeners_from_fds(vec![OwnedFd::from(v4)], 3).unwrap();
        assert_eq!(shards.len(), 3);
        let mut fds = std::collections::HashSet::new();
        for (i, list) in shards.iter().enumerate() {
            assert_eq!(list.len(), 1, "shard {i}");
            let l = &list[0];
            assert!(
                fds.insert(l.as_raw_fd()),
                "shard {i} has its own descriptor"
            );
            assert_eq!(local(l), addr, "shard {i} listens on the passed address");
            assert!(l.nonblocking().unwrap());
            assert!(l.tcp_nodelay().unwrap());
            // A connection made now is accepted by this shard's duplicate: one shared queue.
            let mut c = TcpStream::connect(addr).unwrap();
            let a = accept_within(l);
            assert!(
                a.tcp_nodelay().unwrap(),
                "accepted sockets inherit TCP_NODELAY"
            );
            assert!(
                !a.nonblocking().unwrap(),
                "accepted sockets are not non-blocking"
            );
            c.write_all(&[i as u8]).unwrap();
            let mut b = [0u8; 1];
            let mut a = TcpStream::from(a);
            a.read_exact(&mut b).unwrap();
            assert_eq!(b[0], i as u8);
        }
        // One shard closing its listeners (as it does when it stops) leaves the others'.
        let mut shards = shards;
        let last = shards.pop().unwrap();
        drop(shards);
        let _c = TcpStream::connect(addr).unwrap();
        accept_within(&last[0]);
    }

    #[test]
    fn several_sockets_keep_their_order_in_every_shard() {
        let a = tcp_listener("127.0.0.1:0");
        let b = tcp_listener("127.0.0.1:0");
        let want = [local(&a), local(&b)];
        let shards = listeners_from_fds(vec![a.into(), b.into()], 2).unwrap();
        for list in &shards {
            let got: Vec<SocketAddr> = list.iter().map(local).collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn an_ipv6_listener_is_accepted() {
        let addr: SocketAddr = "[::1]:0".parse().unwrap();
        let s = Socket::new(Domain::IPV6, Type::STREAM, None).unwrap();
        if s.bind(&addr.into()).is_err() {
            eprintln!("note: no ::1 on this machine; skipped");
            return;
        }
        s.listen(16).unwrap();
        let shards = listeners_from_fds(vec![s.into()], 2).unwrap();
        assert_eq!(shards.len(), 2);
    }

    #[test]
    fn a_udp_socket_is_refused() {
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let msg = refused(s.into());
        assert!(msg.contains("not a stream socket"), "{msg}");
    }

    #[test]
    fn a_tcp_socket_that_does_not_listen_is_refused() {
        let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let msg = refused(s.into());
        assert!(msg.contains("not listening"), "{msg}");
    }

    #[test]
    fn a_listening_unix_socket_is_refused() {
        let dir = std::env::temp_dir().join(format!("ringsocks-activation-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let l = std::os::unix::net::UnixListener::bind(dir.join("sock")).unwrap();
        let msg = refused(OwnedFd::from(l));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(msg.contains("not an IPv4 or IPv6 socket"), "{msg}");
    }

    #[test]
    fn a_descriptor_that_is_not_a_socket_is_refused() {
        let (r, _w) = std::io::pipe().unwrap();
        let msg = refused(OwnedFd::from(r));
        assert!(msg.contains("not a socket"), "{msg}");
    }

    #[test]
    fn one_bad_descriptor_among_good_ones_fails_the_whole_set() {
        let good = tcp_listener("127.0.0.1:0");
        let bad = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
        let n = bad.as_raw_fd();
        let e = listeners_from_fds(vec![good.into(), bad.into()], 1).unwrap_err();
        assert!(e.to_string().contains(&format!("descriptor {n} ")), "{e}");
    }

    #[test]
    fn no_socket_or_no_shard_is_an_error() {
        let e = listeners_from_fds(Vec::new(), 2).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let l = tcp_listener("127.0.0.1:0");
        let e = listeners_from_fds(vec![l.into()], 0).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
