//! A recording [`Engine`] with no kernel behind it, for unit tests of the relay.
//!
//! Every submission is recorded as a [`FakeOp`] that keeps the memory it was given, exactly as
//! the ring's op slots do. A test looks at what was submitted, then completes ops the way the
//! kernel would ([`Fake::complete`], [`Fake::deliver`], [`Fake::deliver_datagram`]): the
//! returned [`Completion`] carries the op's memory back and goes to the connection under test.
//! Provided buffers come from real pools (detached from any ring), so the relay's buffer
//! handling follows the real handle rules, and a test can check that every buffer came back.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use super::bufring::{BufPool, Group, PBuf};
use super::files::{Sock, SockRepr};
use super::pipes::Pipe;
use super::{Chunk, Completion, Data, Engine, OpId, Owner, Source, SpliceEnd};

/// What an op was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Kind {
    Recv {
        sock: u32,
    },
    Send {
        sock: u32,
        bytes: Vec<u8>,
    },
    RecvMulti {
        sock: u32,
    },
    RecvMsgMulti {
        sock: u32,
    },
    /// A vectored send of provided-buffer chunks: their bytes, concatenated, and how many.
    SendBuf {
        sock: u32,
        bytes: Vec<u8>,
        chunks: usize,
    },
    SendBufTo {
        sock: u32,
        bytes: Vec<u8>,
        dest: SocketAddr,
        gso: u16,
    },
    SendTo {
        sock: u32,
        bytes: Vec<u8>,
        dest: SocketAddr,
    },
    Poll {
        sock: u32,
        events: u32,
    },
    /// A splice; `None` on a side means the pipe.
    Splice {
        from: End,
        to: End,
        len: u32,
    },
    Shutdown {
        sock: u32,
    },
    Connect {
        sock: u32,
        addr: SocketAddr,
    },
    Accept {
        sock: u32,
    },
}

/// One side of a recorded splice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    Sock(u32),
    Pipe(u32),
}

/// The memory an op keeps until its final completion.
enum Held {
    None,
    Buf {
        buf: Vec<u8>,
        off: usize,
    },
    Chunks(Vec<Chunk>),
    PbufMsg {
        buf: PBuf,
        off: u32,
        end: u32,
        gso: u16,
        dest: SocketAddr,
    },
    Datagram(Vec<u8>),
}

pub(crate) struct FakeOp {
    pub id: OpId,
    pub owner: Owner,
    pub kind: Kind,
    /// A cancellation reached it (it still has to complete).
    pub cancelled: bool,
    held: Held,
    group: Option<Group>,
}

pub(crate) struct Fake {
    /// Ops in flight, by id (submission order).
    ops: BTreeMap<u64, FakeOp>,
    next_op: u64,
    next_sock: u32,
    next_pipe: u32,
    pools: Vec<Rc<BufPool>>,
    /// Timers set and not yet fired.
    pub timers: Vec<(Instant, Owner)>,
    /// Sockets given back with `close`.
    pub closed: Vec<u32>,
    /// Pipes lent and not given back.
    pub pipes_out: u32,
    /// Pipes given back (empty ones only, by contract).
    pub pipes_returned: u32,
    pub pipe_capacity: u32,
    /// Addresses whose connect fails at once (socket creation error).
    pub refuse_socket: Vec<SocketAddr>,
    /// Where UDP sockets appear to be bound, by creation order.
    pub udp_sockets: Vec<(u32, SocketAddr)>,
    /// A UDP socket bind that fails (no IPv6, say).
    pub refuse_udp: Vec<SocketAddr>,
    /// The local address `establish` reports for a connected socket (None: getsockname
    /// failed).
    pub established_addr: Option<SocketAddr>,
    /// Listening sockets opened for BIND and their addresses, by creation order.
    pub listeners: Vec<(u32, SocketAddr)>,
    /// Peer addresses `adopt` reports for accepted sockets, in order (None once empty).
    pub accepted_peers: std::collections::VecDeque<SocketAddr>,
    /// Sockets `adopt` made, in order.
    pub adopted: Vec<u32>,
}

impl Fake {
    pub(crate) fn new() -> Fake {
        Fake {
            ops: BTreeMap::new(),
            next_op: 1,
            next_sock: 1,
            next_pipe: 1,
            pools: Vec::new(),
            timers: Vec::new(),
            closed: Vec::new(),
            pipes_out: 0,
            pipes_returned: 0,
            pipe_capacity: 64 * 1024,
            refuse_socket: Vec::new(),
            udp_sockets: Vec::new(),
            refuse_udp: Vec::new(),
            established_addr: Some(SocketAddr::from(([127, 0, 0, 1], 40000))),
            listeners: Vec::new(),
            accepted_peers: Default::default(),
            adopted: Vec::new(),
        }
    }

    /// Adds a buffer group like the ring's.
    pub(crate) fn add_buf_group(&mut self, entries: u16, buf_size: u32) -> Group {
        let g = Group(self.pools.len() as u16);
        self.pools.push(Rc::new(
            BufPool::detached(g, entries, buf_size).expect("pool"),
        ));
        g
    }

    /// A socket as the server would hand over (an accepted client).
    pub(crate) fn socket(&mut self) -> Sock {
        let id = self.next_sock;
        self.next_sock += 1;
        Sock(SockRepr::Fake(id))
    }

    fn record(&mut self, owner: Owner, kind: Kind, held: Held, group: Option<Group>) -> OpId {
        let id = OpId(self.next_op);
        self.next_op += 1;
        self.ops.insert(
            id.0,
            FakeOp {
                id,
                owner,
                kind,
                cancelled: false,
                held,
                group,
            },
        );
        id
    }

    /// The ops in flight, oldest first.
    pub(crate) fn ops(&self) -> impl Iterator<Item = &FakeOp> {
        self.ops.values()
    }

    /// The oldest op in flight that matches.
    pub(crate) fn find(&self, f: impl Fn(&FakeOp) -> bool) -> Option<OpId> {
        self.ops.values().find(|o| f(o)).map(|o| o.id)
    }

    pub(crate) fn op(&self, id: OpId) -> &FakeOp {
        &self.ops[&id.0]
    }

    /// Buffers of `group` that the kernel could still pick from.
    pub(crate) fn available(&self, group: Group) -> u32 {
        self.pools[group.0 as usize].available()
    }

    /// Completes op `id` finally with `res`, handing back its memory. A receive gets
    /// `received` written into its buffer (and `res` should be its length).
    pub(crate) fn complete(&mut self, id: OpId, res: i32, received: &[u8]) -> Completion {
        let op = self.ops.remove(&id.0).expect("op in flight");
        let data = match op.held {
            // An accept's result is a descriptor: hand over a real one (of /dev/null).
            Held::None if matches!(op.kind, Kind::Accept { .. }) && res >= 0 => Data::Accepted(
                std::fs::File::open("/dev/null")
                    .expect("open /dev/null")
                    .into(),
            ),
            Held::None => Data::None,
            Held::Buf { mut buf, off } => {
                if matches!(op.kind, Kind::Recv { .. }) {
                    buf.truncate(off);
                    buf.extend_from_slice(received);
                }
                Data::Buf { buf, off }
            }
            Held::Chunks(chunks) => Data::Chunks(chunks),
            Held::PbufMsg {
                buf,
                off,
                end,
                gso,
                dest,
            } => Data::PbufMsg {
                buf,
                off,
                end,
                gso,
                dest,
            },
            Held::Datagram(b) => Data::Datagram(b),
        };
        Completion {
            owner: op.owner,
            res,
            more: false,
            data,
        }
    }

    /// A multishot receive's next completion: `bytes` in a buffer of its group (or, when the
    /// group is empty, the final `-ENOBUFS`).
    pub(crate) fn deliver(&mut self, id: OpId, bytes: &[u8]) -> Completion {
        self.deliver_with(id, |buf| {
            buf[..bytes.len()].copy_from_slice(bytes);
            bytes.len() as u32
        })
    }

    /// A multishot recvmsg's next completion: a datagram (or GRO burst of `gso`-byte
    /// segments) from `src`.
    pub(crate) fn deliver_datagram(
        &mut self,
        id: OpId,
        src: SocketAddr,
        payload: &[u8],
        gso: u32,
    ) -> Completion {
        self.deliver_with(id, |buf| super::recvmsg::fill(buf, src, payload, gso))
    }

    fn deliver_with(&mut self, id: OpId, fill: impl FnOnce(&mut [u8]) -> u32) -> Completion {
        let op = &self.ops[&id.0];
        let (owner, group) = (op.owner, op.group.expect("a buffer-select receive"));
        let Some(mut buf) = self.pools[group.0 as usize].take_free() else {
            self.ops.remove(&id.0);
            return Completion {
                owner,
                res: -libc::ENOBUFS,
                more: false,
                data: Data::None,
            };
        };
        let n = fill(buf.bytes_mut().expect("a fresh buffer has one handle"));
        Completion {
            owner,
            res: n as i32,
            more: true,
            data: Data::Picked(buf),
        }
    }

    /// Completes every cancelled op with `-ECANCELED`.
    pub(crate) fn complete_cancelled(&mut self) -> Vec<Completion> {
        let ids: Vec<OpId> = self
            .ops
            .values()
            .filter(|o| o.cancelled)
            .map(|o| o.id)
            .collect();
        ids.into_iter()
            .map(|id| self.complete(id, -libc::ECANCELED, &[]))
            .collect()
    }

    /// Removes and returns the timers due at `now`, earliest first.
    pub(crate) fn due_timers(&mut self, now: Instant) -> Vec<Owner> {
        self.timers.sort_by_key(|(at, _)| *at);
        let n = self.timers.iter().take_while(|(at, _)| *at <= now).count();
        self.timers.drain(..n).map(|(_, o)| o).collect()
    }
}

fn sock_id(s: &Sock) -> u32 {
    s.fake_id()
}

fn end(e: SpliceEnd<'_>) -> End {
    match e {
        SpliceEnd::Sock(s) => End::Sock(sock_id(s)),
        SpliceEnd::Pipe(p) => End::Pipe(p.fake_id()),
    }
}

fn range_of(buf: &PBuf, off: u32, end: u32) -> Vec<u8> {
    buf.bytes()[off as usize..end as usize].to_vec()
}

impl Engine for Fake {
    fn recv(&mut self, sock: &Sock, buf: Vec<u8>, owner: Owner) -> OpId {
        let off = buf.len();
        self.record(
            owner,
            Kind::Recv {
                sock: sock_id(sock),
            },
            Held::Buf { buf, off },
            None,
        )
    }

    fn send(&mut self, sock: &Sock, buf: Vec<u8>, off: usize, owner: Owner) -> OpId {
        let kind = Kind::Send {
            sock: sock_id(sock),
            bytes: buf[off..].to_vec(),
        };
        self.record(owner, kind, Held::Buf { buf, off }, None)
    }

    fn recv_multi(&mut self, sock: &Sock, group: Group, owner: Owner) -> OpId {
        self.record(
            owner,
            Kind::RecvMulti {
                sock: sock_id(sock),
            },
            Held::None,
            Some(group),
        )
    }

    fn recvmsg_multi(&mut self, sock: &Sock, group: Group, owner: Owner) -> OpId {
        let kind = Kind::RecvMsgMulti {
            sock: sock_id(sock),
        };
        self.record(owner, kind, Held::None, Some(group))
    }

    fn send_bufs(&mut self, sock: &Sock, mut chunks: Vec<Chunk>, owner: Owner) -> OpId {
        chunks.iter_mut().for_each(Chunk::clamp);
        let kind = Kind::SendBuf {
            sock: sock_id(sock),
            bytes: chunks
                .iter()
                .flat_map(|c| range_of(&c.buf, c.off, c.end))
                .collect(),
            chunks: chunks.len(),
        };
        self.record(owner, kind, Held::Chunks(chunks), None)
    }

    fn send_buf_to(
        &mut self,
        sock: &Sock,
        buf: PBuf,
        off: u32,
        end: u32,
        dest: SocketAddr,
        gso: u16,
        owner: Owner,
    ) -> OpId {
        let kind = Kind::SendBufTo {
            sock: sock_id(sock),
            bytes: range_of(&buf, off, end),
            dest,
            gso,
        };
        let held = Held::PbufMsg {
            buf,
            off,
            end,
            gso,
            dest,
        };
        self.record(owner, kind, held, None)
    }

    fn send_to(&mut self, sock: &Sock, buf: Vec<u8>, dest: SocketAddr, owner: Owner) -> OpId {
        let kind = Kind::SendTo {
            sock: sock_id(sock),
            bytes: buf.clone(),
            dest,
        };
        self.record(owner, kind, Held::Datagram(buf), None)
    }

    fn poll(&mut self, sock: &Sock, events: u32, owner: Owner) -> OpId {
        let kind = Kind::Poll {
            sock: sock_id(sock),
            events,
        };
        self.record(owner, kind, Held::None, None)
    }

    fn splice(&mut self, from: SpliceEnd<'_>, to: SpliceEnd<'_>, len: u32, owner: Owner) -> OpId {
        let kind = Kind::Splice {
            from: end(from),
            to: end(to),
            len,
        };
        self.record(owner, kind, Held::None, None)
    }

    fn shutdown_write(&mut self, sock: &Sock, owner: Owner) -> OpId {
        self.record(
            owner,
            Kind::Shutdown {
                sock: sock_id(sock),
            },
            Held::None,
            None,
        )
    }

    fn cancel(&mut self, op: OpId) {
        if let Some(o) = self.ops.get_mut(&op.0) {
            o.cancelled = true;
        }
    }

    fn cancel_all(&mut self, sock: &Sock) {
        let id = sock_id(sock);
        for o in self.ops.values_mut() {
            let on = match &o.kind {
                Kind::Recv { sock }
                | Kind::Send { sock, .. }
                | Kind::RecvMulti { sock }
                | Kind::RecvMsgMulti { sock }
                | Kind::SendBuf { sock, .. }
                | Kind::SendBufTo { sock, .. }
                | Kind::SendTo { sock, .. }
                | Kind::Poll { sock, .. }
                | Kind::Shutdown { sock }
                | Kind::Connect { sock, .. }
                | Kind::Accept { sock } => *sock == id,
                Kind::Splice { from, to, .. } => *from == End::Sock(id) || *to == End::Sock(id),
            };
            o.cancelled |= on;
        }
    }

    fn connect(
        &mut self,
        addr: SocketAddr,
        _from: Source<'_>,
        owner: Owner,
    ) -> io::Result<(Sock, OpId)> {
        if self.refuse_socket.contains(&addr) {
            return Err(io::Error::from_raw_os_error(libc::EAFNOSUPPORT));
        }
        let sock = self.socket();
        let kind = Kind::Connect {
            sock: sock_id(&sock),
            addr,
        };
        let op = self.record(owner, kind, Held::None, None);
        Ok((sock, op))
    }

    fn establish(&mut self, sock: Sock) -> (Sock, Option<SocketAddr>) {
        (sock, self.established_addr)
    }

    fn udp_socket(
        &mut self,
        bind: SocketAddr,
        _device: Option<&str>,
    ) -> io::Result<(Sock, SocketAddr)> {
        if self.refuse_udp.contains(&bind) {
            return Err(io::Error::from_raw_os_error(libc::EAFNOSUPPORT));
        }
        let sock = self.socket();
        let local = SocketAddr::new(bind.ip(), 50000 + sock_id(&sock) as u16);
        self.udp_sockets.push((sock_id(&sock), local));
        Ok((sock, local))
    }

    fn tcp_listener(&mut self, bind: SocketAddr) -> io::Result<(Sock, SocketAddr)> {
        let sock = self.socket();
        let local = SocketAddr::new(bind.ip(), 30000 + sock_id(&sock) as u16);
        self.listeners.push((sock_id(&sock), local));
        Ok((sock, local))
    }

    fn accept(&mut self, listener: &Sock, owner: Owner) -> OpId {
        let kind = Kind::Accept {
            sock: sock_id(listener),
        };
        self.record(owner, kind, Held::None, None)
    }

    fn adopt(&mut self, fd: std::os::fd::OwnedFd) -> (Sock, Option<SocketAddr>) {
        drop(fd);
        let sock = self.socket();
        self.adopted.push(sock_id(&sock));
        (sock, self.accepted_peers.pop_front())
    }

    fn close(&mut self, sock: Sock) {
        self.closed.push(sock_id(&sock));
    }

    fn take_pipe(&mut self) -> io::Result<Pipe> {
        let id = self.next_pipe;
        self.next_pipe += 1;
        self.pipes_out += 1;
        Ok(Pipe::fake(id, self.pipe_capacity))
    }

    fn give_pipe(&mut self, _pipe: Pipe) {
        self.pipes_out -= 1;
        self.pipes_returned += 1;
    }

    fn buf_pool(&self, group: Group) -> Option<(u32, u32)> {
        let p = self.pools.get(group.0 as usize)?;
        Some((p.buf_size(), p.available()))
    }

    fn set_timer(&mut self, at: Instant, owner: Owner) {
        self.timers.push((at, owner));
    }
}
