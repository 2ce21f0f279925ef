//! Unit tests of the relay with the recording fake engine.
//!
//! One connection at a time runs against [`Fake`] in virtual time: the harness [`H`] plays the
//! server's part (decoding owner words, firing due timers, answering lookups, re-arming
//! starved receives, releasing a finished connection) and the tests play the kernel's,
//! completing the ops the connection submitted and checking what it sent, to which socket.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::conn::{Conn, Stage};
use super::forward::{LOW_WATER, MAX_SEND_CHUNKS};
use super::token::{self, ConnId, Dir, Op, Side};
use super::udp::assoc::Stats;
use super::{Ctx, Resolve, ShardState};
use crate::config::{Config, ForwardMode};
use crate::dns::{Addrs, ResolveError};
use crate::limits::Limits;
use crate::proto::codec::{encode_reply, encode_request, encode_userpass};
use crate::proto::udp::{encode_udp_header, encode_udp_header_addr};
use crate::proto::{Addr, Command, Rep};
use crate::rules::{self, Action, Dest, Policy, RuleSpec, Rules};
use crate::uring::fake::{End, Fake, Kind};
use crate::uring::sockaddr::to_dual_stack;
use crate::uring::{Completion, Group, OpId, Owner};

const ID: ConnId = ConnId {
    slot: 3,
    generation: 7,
};
const PEER: &str = "10.0.0.2:40001";
const LOCAL: &str = "10.0.0.1:1080";
const TARGET: &str = "192.0.2.10:80";
/// Where the fake says an established target socket is bound.
const BND: &str = "127.0.0.1:40000";
/// The UDP client's endpoint, as its UDP ASSOCIATE request announces it.
const UCLIENT: &str = "10.0.0.2:6000";
const GREETING: [u8; 3] = [5, 1, 0];
const COPY_BUF: u32 = 1024;
const UDP_BUFS: u16 = 8;
const POLLIN: u32 = (libc::POLLIN | libc::POLLRDHUP) as u16 as u32;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn request(cmd: Command, dst: Addr) -> Vec<u8> {
    let mut out = Vec::new();
    encode_request(cmd, &dst, &mut out);
    out
}

fn connect_ip(dst: &str) -> Vec<u8> {
    request(Command::CONNECT, Addr::Ip(sa(dst)))
}

fn connect_name(name: &str, port: u16) -> Vec<u8> {
    request(Command::CONNECT, Addr::Domain(name.as_bytes().into(), port))
}

fn reply(rep: Rep, bnd: SocketAddr) -> Vec<u8> {
    let mut out = Vec::new();
    encode_reply(rep, &Addr::Ip(bnd), &mut out);
    out
}

/// An error reply: REP `rep`, BND 0.0.0.0:0.
fn error_reply(rep: u8) -> Vec<u8> {
    reply(Rep(rep), sa("0.0.0.0:0"))
}

fn userpass(user: &str, pass: &str) -> Vec<u8> {
    let mut out = Vec::new();
    encode_userpass(user.as_bytes(), pass.as_bytes(), &mut out).unwrap();
    out
}

/// A SOCKS UDP datagram (FRAG 0) for `dst`.
fn datagram(dst: Addr, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_udp_header_addr(0, &dst, &mut out);
    out.extend_from_slice(payload);
    out
}

/// A resolver that answers from `table` at once and leaves other names pending.
#[derive(Default)]
struct Dns {
    table: HashMap<Vec<u8>, Result<Vec<IpAddr>, ResolveError>>,
    lookups: Vec<(String, u16, Owner)>,
    /// Lookups the connection stopped waiting for.
    forgotten: Vec<Owner>,
}

fn addrs(ips: &[IpAddr], port: u16) -> Addrs {
    ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect()
}

impl Resolve for Dns {
    fn lookup(
        &mut self,
        name: &[u8],
        port: u16,
        owner: Owner,
        _client: Option<IpAddr>,
        _now: Instant,
    ) -> Option<Result<Addrs, ResolveError>> {
        let shown = String::from_utf8_lossy(name).into_owned();
        self.lookups.push((shown, port, owner));
        let res = self.table.get(name)?;
        Some(res.clone().map(|ips| addrs(&ips, port)))
    }

    fn forget(&mut self, owner: Owner) {
        self.forgotten.push(owner);
    }
}

/// The harness: one connection, the fake engine and virtual time.
struct H {
    fake: Fake,
    cfg: Config,
    shard: ShardState,
    dns: Dns,
    limits: Arc<Limits>,
    metrics: crate::metrics::ShardMetrics,
    now: Instant,
    /// None once released.
    conn: Option<Conn>,
    /// The client socket's fake id.
    client: u32,
    copy: Group,
    copy_bufs: u32,
    udp: Group,
}

impl H {
    fn new(flags: &[&str]) -> H {
        H::with_pool(flags, 8)
    }

    /// A connection accepted and started, with `copy_bufs` copy-path buffers of 1 KiB.
    fn with_pool(flags: &[&str], copy_bufs: u16) -> H {
        let args = std::iter::once("ringsocks").chain(flags.iter().copied());
        let cfg = Config::try_parse_from(args).expect("test flags");
        let mut fake = Fake::new();
        let copy = fake.add_buf_group(copy_bufs, COPY_BUF);
        let udp = fake.add_buf_group(UDP_BUFS, 70 * 1024);
        let shard = ShardState {
            copy_group: (cfg.forward != ForwardMode::Splice).then_some(copy),
            copy_scarce_below: u32::from(copy_bufs / 4),
            udp_group: Some(udp),
            ..ShardState::default()
        };
        let sock = fake.socket();
        let client = sock.fake_id();
        let now = Instant::now();
        let limits = Limits::new(
            usize::MAX,
            cfg.max_connections_per_ip,
            cfg.max_connections_per_user,
        );
        let lease = limits.admit(Some(sa(PEER).ip())).expect("under the limits");
        let conn = Conn::new(ID, sock, Some(sa(PEER)), Some(sa(LOCAL)), now, lease);
        let mut h = H {
            fake,
            cfg,
            shard,
            dns: Dns::default(),
            limits,
            metrics: Default::default(),
            now,
            conn: Some(conn),
            client,
            copy,
            copy_bufs: u32::from(copy_bufs),
            udp,
        };
        h.with(|c, cx| c.start(cx));
        h
    }

    /// Runs `f` on the connection like the server's slab does, and releases the connection
    /// once it has finished (checking that none of its ops is still in flight).
    fn with(&mut self, f: impl FnOnce(&mut Conn, &mut Ctx<'_, Fake>)) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let mut cx = Ctx {
            io: &mut self.fake,
            cfg: &self.cfg,
            now: self.now,
            dns: &mut self.dns,
            shard: &mut self.shard,
            limits: &self.limits,
            metrics: &self.metrics,
            access: None,
        };
        f(conn, &mut cx);
        if conn.is_finished() {
            let mine = |o: &crate::uring::fake::FakeOp| token::decode(o.owner).map(|d| d.0);
            assert!(
                cx.io.ops().all(|o| mine(o) != Some(ID)),
                "finished with ops in flight"
            );
            let conn = self.conn.take().expect("checked above");
            conn.release(&mut cx);
        }
    }

    fn dispatch(&mut self, c: Completion) {
        self.dispatch_in_turn(c);
        self.end_turn();
    }

    /// Dispatches a completion without ending the loop turn.
    fn dispatch_in_turn(&mut self, c: Completion) {
        let (id, op) = token::decode(c.owner).expect("a relay owner word");
        assert_eq!(id, ID);
        self.with(|conn, cx| conn.on_completion(cx, op, c));
    }

    /// What the server does at the end of a loop turn: send what copy-path directions received
    /// and the datagrams gathered in it.
    fn end_turn(&mut self) {
        for (id, d) in std::mem::take(&mut self.shard.copy_flush) {
            assert_eq!(id, ID);
            self.with(|c, cx| c.flush_copy(cx, d));
        }
        for id in std::mem::take(&mut self.shard.udp_flush) {
            assert_eq!(id, ID);
            self.with(|c, cx| c.flush_udp(cx));
        }
    }

    /// Completes op `id` with `res` (a send's byte count, a connect's 0 or -errno...).
    fn complete(&mut self, id: OpId, res: i32) {
        let c = self.fake.complete(id, res, &[]);
        self.dispatch(c);
    }

    /// A single-shot receive `id` gets `bytes` (EOF when empty).
    fn recv_into(&mut self, id: OpId, bytes: &[u8]) {
        let c = self.fake.complete(id, bytes.len() as i32, bytes);
        self.dispatch(c);
    }

    /// The client sends `bytes` to the relay's pending receive on it (EOF when empty).
    fn feed(&mut self, bytes: &[u8]) {
        let c = self.client;
        let id = self.op(|k| *k == Kind::Recv { sock: c });
        self.recv_into(id, bytes);
    }

    /// A multishot receive `id` gets `bytes` in a provided buffer.
    fn deliver(&mut self, id: OpId, bytes: &[u8]) {
        let c = self.fake.deliver(id, bytes);
        self.dispatch(c);
    }

    /// A multishot receive `id` gets each of `chunks` in one loop turn.
    fn deliver_in_one_turn(&mut self, id: OpId, chunks: &[&[u8]]) {
        for bytes in chunks {
            let c = self.fake.deliver(id, bytes);
            self.dispatch_in_turn(c);
        }
        self.end_turn();
    }

    /// A multishot recvmsg `id` gets a datagram (or a GRO burst) from `src`.
    fn datagram(&mut self, id: OpId, src: &str, payload: &[u8], gso: u32) {
        let c = self.fake.deliver_datagram(id, sa(src), payload, gso);
        self.dispatch(c);
    }

    /// Completes every cancelled op with -ECANCELED; returns how many there were.
    fn complete_cancelled(&mut self) -> usize {
        let cs = self.fake.complete_cancelled();
        let n = cs.len();
        for c in cs {
            self.dispatch(c);
        }
        n
    }

    /// Moves virtual time on by `d` and fires the timers that are due.
    fn advance(&mut self, d: Duration) {
        self.now += d;
        loop {
            let due = self.fake.due_timers(self.now);
            if due.is_empty() {
                break;
            }
            for owner in due {
                if let Some((ID, Op::Timer(seq))) = token::decode(owner) {
                    self.with(|c, cx| c.on_timer(cx, seq));
                }
            }
        }
    }

    /// Answers the `i`-th lookup the connection asked for.
    fn answer(&mut self, i: usize, res: Result<Vec<IpAddr>, ResolveError>) {
        let (_, port, owner) = self.dns.lookups[i].clone();
        let Some((ID, Op::Resolve(n))) = token::decode(owner) else {
            panic!("lookup {i} has no resolve owner");
        };
        let res = res.map(|ips| addrs(&ips, port));
        self.with(|c, cx| c.on_resolved(cx, n, res));
    }

    /// What the server does once buffers are back: re-arm starved receives.
    fn rearm_starved(&mut self) {
        let free = self.fake.available(self.copy) as usize;
        let n = free.min(self.shard.starved.len());
        for (id, d) in self.shard.starved.drain(..n).collect::<Vec<_>>() {
            assert_eq!(id, ID);
            self.with(|c, cx| c.rearm_recv(cx, d));
        }
        let free = self.fake.available(self.udp) as usize;
        let n = free.min(self.shard.udp_starved.len());
        for (id, side) in self.shard.udp_starved.drain(..n).collect::<Vec<_>>() {
            assert_eq!(id, ID);
            self.with(|c, cx| c.rearm_udp(cx, side));
        }
    }

    fn close(&mut self) {
        self.with(|c, cx| c.close(cx));
    }

    fn find(&self, f: impl Fn(&Kind) -> bool) -> Option<OpId> {
        self.fake.find(|o| f(&o.kind))
    }

    fn op(&self, f: impl Fn(&Kind) -> bool) -> OpId {
        self.find(f).expect("no such op in flight")
    }

    fn has(&self, f: impl Fn(&Kind) -> bool) -> bool {
        self.find(f).is_some()
    }

    fn cancelled(&self, id: OpId) -> bool {
        self.fake.op(id).cancelled
    }

    /// The oldest stream send (heap or provided buffer) on `sock`, and its bytes.
    fn sent(&self, sock: u32) -> Option<(OpId, Vec<u8>)> {
        self.fake.ops().find_map(|o| match &o.kind {
            Kind::Send { sock: s, bytes } | Kind::SendBuf { sock: s, bytes, .. } if *s == sock => {
                Some((o.id, bytes.clone()))
            }
            _ => None,
        })
    }

    /// Completes the oldest send on `sock` in full and returns what it sent.
    fn take_sent(&mut self, sock: u32) -> Vec<u8> {
        let (id, bytes) = self.sent(sock).expect("a send in flight");
        self.complete(id, bytes.len() as i32);
        bytes
    }

    /// Completes sends on `sock` until none is left; returns their bytes in order.
    fn drain_sent(&mut self, sock: u32) -> Vec<u8> {
        let mut all = Vec::new();
        while self.sent(sock).is_some() {
            all.extend(self.take_sent(sock));
        }
        all
    }

    fn recv_multi(&self, sock: u32) -> Option<OpId> {
        self.find(|k| *k == Kind::RecvMulti { sock })
    }

    fn shutdown_of(&self, sock: u32) -> Option<OpId> {
        self.find(|k| *k == Kind::Shutdown { sock })
    }

    /// The connect in flight: its op, socket and address.
    fn connecting(&self) -> (OpId, u32, SocketAddr) {
        self.fake
            .ops()
            .find_map(|o| match o.kind {
                Kind::Connect { sock, addr } => Some((o.id, sock, addr)),
                _ => None,
            })
            .expect("a connect in flight")
    }

    fn finished(&self) -> bool {
        self.conn.is_none()
    }

    fn assert_buffers_back(&self) {
        assert_eq!(
            self.fake.available(self.copy),
            self.copy_bufs,
            "copy buffers"
        );
        assert_eq!(
            self.fake.available(self.udp),
            u32::from(UDP_BUFS),
            "udp buffers"
        );
    }

    /// Greeting and CONNECT to TARGET pipelined, the connect succeeds and the reply is out:
    /// forwarding has started. Returns the target socket.
    fn open_tunnel(&mut self) -> u32 {
        self.feed(&[&GREETING[..], &connect_ip(TARGET)].concat());
        let (op, target, addr) = self.connecting();
        assert_eq!(addr, sa(TARGET));
        self.complete(op, 0);
        let expected = [vec![5, 0], reply(Rep::SUCCEEDED, sa(BND))].concat();
        assert_eq!(self.take_sent(self.client), expected);
        target
    }

    /// The connection closes and every cancelled op completes: it is released.
    fn close_and_finish(&mut self) {
        self.close();
        self.complete_cancelled();
        assert!(self.finished());
    }

    /// The client's error reply goes out, the relay sends FIN and drains; the client's EOF
    /// and the shutdown's completion end the connection.
    fn finish_reject(&mut self, expected: &[u8]) {
        let c = self.client;
        assert_eq!(self.take_sent(c), expected);
        let fin = self.shutdown_of(c).expect("FIN after the error reply");
        self.feed(&[]);
        assert!(!self.finished(), "the shutdown is still in flight");
        self.complete(fin, 0);
        assert!(self.finished());
        assert_eq!(self.fake.closed.last(), Some(&c));
    }

    fn stage_stats(&self) -> Stats {
        match &self.conn.as_ref().expect("live").stage {
            Stage::Association(a) => a.stats().clone(),
            _ => panic!("not an association"),
        }
    }

    /// UDP ASSOCIATE (announcing UCLIENT) pipelined with the greeting; the reply is out.
    /// Returns the client-facing and target-facing UDP sockets.
    fn associate(&mut self) -> (u32, u32) {
        let req = request(Command::UDP_ASSOCIATE, Addr::Ip(sa("0.0.0.0:6000")));
        self.feed(&[&GREETING[..], &req].concat());
        let (csock, caddr) = self.fake.udp_sockets[0];
        let (tsock, taddr) = self.fake.udp_sockets[1];
        assert_eq!(
            caddr.ip(),
            sa(LOCAL).ip(),
            "bound to the control connection's IP"
        );
        assert!(taddr.is_ipv6(), "dual-stack target socket");
        let expected = [vec![5, 0], reply(Rep::SUCCEEDED, caddr)].concat();
        assert_eq!(self.take_sent(self.client), expected);
        (csock, tsock)
    }

    fn udp_recv(&self, sock: u32) -> OpId {
        self.op(|k| *k == Kind::RecvMsgMulti { sock })
    }

    /// The oldest provided-buffer datagram send on `sock`: op, bytes, destination, GSO size.
    fn udp_sent(&self, sock: u32) -> Option<(OpId, Vec<u8>, SocketAddr, u16)> {
        self.fake.ops().find_map(|o| match &o.kind {
            Kind::SendBufTo {
                sock: s,
                bytes,
                dest,
                gso,
            } if *s == sock => Some((o.id, bytes.clone(), *dest, *gso)),
            _ => None,
        })
    }
}

// ---- handshake ---------------------------------------------------------------------------

#[test]
fn greeting_and_request_split_over_several_receives() {
    let mut h = H::new(&[]);
    let c = h.client;
    h.feed(&[5]);
    h.feed(&[1]);
    assert!(h.sent(c).is_none(), "nothing to answer yet");
    h.feed(&[0]);
    assert_eq!(h.take_sent(c), [5, 0]);
    let req = connect_ip(TARGET);
    h.feed(&req[..2]);
    h.feed(&req[2..7]);
    assert!(!h.has(|k| matches!(k, Kind::Connect { .. })));
    h.feed(&req[7..]);
    let (op, target, addr) = h.connecting();
    assert_eq!(addr, sa(TARGET));
    h.complete(op, 0);
    // The method selection went out earlier: the reply comes alone.
    assert_eq!(h.take_sent(c), reply(Rep::SUCCEEDED, sa(BND)));
    assert!(h.recv_multi(c).is_some() && h.recv_multi(target).is_some());
}

#[test]
fn greeting_auth_and_request_pipelined_in_one_receive() {
    let mut h = H::new(&["--user", "alice:secret"]);
    let c = h.client;
    let all = [
        &[5, 1, 2][..],
        &userpass("alice", "secret"),
        &connect_ip(TARGET),
    ]
    .concat();
    h.feed(&all);
    assert!(h.sent(c).is_none(), "answers wait for the connect");
    let (op, _, _) = h.connecting();
    h.complete(op, 0);
    let expected = [vec![5, 2, 1, 0], reply(Rep::SUCCEEDED, sa(BND))].concat();
    assert_eq!(h.take_sent(c), expected);
}

#[test]
fn auth_success_step_by_step() {
    let mut h = H::new(&["--user", "alice:secret"]);
    let c = h.client;
    h.feed(&[5, 2, 0, 2]);
    assert_eq!(h.take_sent(c), [5, 2], "username/password selected");
    let up = userpass("alice", "secret");
    h.feed(&up[..4]);
    h.feed(&up[4..]);
    assert_eq!(h.take_sent(c), [1, 0], "auth status success");
    h.feed(&connect_ip(TARGET));
    assert_eq!(h.connecting().2, sa(TARGET));
}

#[test]
fn auth_failure_sends_status_1_then_fin() {
    let mut h = H::new(&["--user", "alice:secret"]);
    let c = h.client;
    h.feed(&[5, 1, 2]);
    assert_eq!(h.take_sent(c), [5, 2]);
    h.feed(&userpass("alice", "wrong"));
    assert!(!h.has(|k| matches!(k, Kind::Connect { .. })));
    h.finish_reject(&[1, 1]);
}

#[test]
fn greeting_without_an_acceptable_method_gets_ff() {
    let mut h = H::new(&["--user", "alice:secret"]);
    h.feed(&GREETING);
    h.finish_reject(&[5, 0xFF]);
}

#[test]
fn unsupported_command_gets_rep_07_then_fin_and_drain_until_eof() {
    let mut h = H::new(&[]);
    let c = h.client;
    let unknown = request(Command(0x04), Addr::Ip(sa(TARGET)));
    h.feed(&[&GREETING[..], &unknown].concat());
    let (send, bytes) = h.sent(c).expect("error reply");
    assert_eq!(bytes, [vec![5, 0], error_reply(0x07)].concat());
    assert!(h.shutdown_of(c).is_none(), "no FIN before the reply is out");
    // A short send continues with the rest.
    h.complete(send, 3);
    assert_eq!(h.take_sent(c), bytes[3..]);
    let fin = h.shutdown_of(c).expect("FIN after the reply");
    // What the client still sends is read and discarded.
    h.feed(b"more junk");
    h.feed(b"and more");
    assert!(h.sent(c).is_none());
    h.feed(&[]);
    assert!(!h.finished(), "waits for the shutdown");
    h.complete(fin, 0);
    assert!(h.finished());
    assert_eq!(h.fake.closed, [c]);
}

#[test]
fn rejected_client_that_keeps_sending_is_closed_after_the_linger() {
    let mut h = H::new(&[]);
    let c = h.client;
    h.feed(&[&GREETING[..], &request(Command(0x09), Addr::Ip(sa(TARGET)))].concat());
    assert_eq!(h.take_sent(c), [vec![5, 0], error_reply(0x07)].concat());
    h.feed(b"still talking");
    h.advance(Duration::from_millis(4900));
    let drain = h.op(|k| *k == Kind::Recv { sock: c });
    assert!(!h.cancelled(drain));
    h.advance(Duration::from_millis(100));
    assert!(h.cancelled(drain), "linger over: the drain is cancelled");
    assert_eq!(h.complete_cancelled(), 2, "the drain and the shutdown");
    assert!(h.finished());
    assert_eq!(h.fake.closed, [c]);
}

#[test]
fn handshake_timeout_closes() {
    let mut h = H::new(&["--handshake-timeout", "3s"]);
    h.feed(&[5, 1]);
    h.advance(Duration::from_millis(2999));
    let recv = h.op(|k| matches!(k, Kind::Recv { .. }));
    assert!(!h.cancelled(recv));
    h.advance(Duration::from_millis(1));
    assert!(h.cancelled(recv));
    assert!(!h.finished(), "the receive has not completed yet");
    h.complete_cancelled();
    assert!(h.finished());
    assert_eq!(h.fake.closed, [h.client]);
    assert!(h.sent(h.client).is_none(), "no reply on a timeout");
}

#[test]
fn client_eof_mid_handshake_closes_at_once() {
    let mut h = H::new(&[]);
    h.feed(&[5, 1]);
    h.feed(&[]);
    assert!(h.finished());
    assert_eq!(h.fake.closed, [h.client]);
}

// ---- connect -----------------------------------------------------------------------------

#[test]
fn connect_falls_back_to_the_next_address_when_refused() {
    let mut h = H::new(&[]);
    let c = h.client;
    h.feed(&[&GREETING[..], &connect_name("multi.example", 443)].concat());
    assert_eq!(h.dns.lookups.len(), 1);
    assert_eq!(
        (h.dns.lookups[0].0.as_str(), h.dns.lookups[0].1),
        ("multi.example", 443)
    );
    assert!(
        !h.has(|k| matches!(k, Kind::Connect { .. })),
        "waits for the lookup"
    );
    let ips = vec![sa("192.0.2.1:0").ip(), sa("192.0.2.2:0").ip()];
    h.answer(0, Ok(ips));
    let (op, first, addr) = h.connecting();
    assert_eq!(addr, sa("192.0.2.1:443"));
    h.complete(op, -libc::ECONNREFUSED);
    assert_eq!(h.fake.closed, [first], "the refused socket is closed");
    let (op, second, addr) = h.connecting();
    assert_eq!(addr, sa("192.0.2.2:443"));
    h.complete(op, 0);
    let expected = [vec![5, 0], reply(Rep::SUCCEEDED, sa(BND))].concat();
    assert_eq!(h.take_sent(c), expected);
    assert!(h.recv_multi(second).is_some());
}

#[test]
fn all_addresses_refused_gives_rep_05() {
    let mut h = H::new(&[]);
    let ips = vec![sa("192.0.2.1:0").ip(), sa("192.0.2.2:0").ip()];
    h.dns.table.insert(b"multi.example".to_vec(), Ok(ips));
    h.feed(&[&GREETING[..], &connect_name("multi.example", 443)].concat());
    let (op, a, _) = h.connecting();
    h.complete(op, -libc::ECONNREFUSED);
    let (op, b, addr) = h.connecting();
    assert_eq!(addr, sa("192.0.2.2:443"));
    h.complete(op, -libc::ECONNREFUSED);
    assert_eq!(h.fake.closed, [a, b]);
    let c = h.client;
    assert_eq!(h.take_sent(c), [vec![5, 0], error_reply(0x05)].concat());
}

#[test]
fn socket_creation_failure_is_skipped() {
    let mut h = H::new(&[]);
    let ips = vec![sa("[2001:db8::1]:0").ip(), sa("192.0.2.2:0").ip()];
    h.dns.table.insert(b"dual.example".to_vec(), Ok(ips));
    h.fake.refuse_socket.push(sa("[2001:db8::1]:80"));
    h.feed(&[&GREETING[..], &connect_name("dual.example", 80)].concat());
    let (op, _, addr) = h.connecting();
    assert_eq!(addr, sa("192.0.2.2:80"));
    h.complete(op, 0);
    let expected = [vec![5, 0], reply(Rep::SUCCEEDED, sa(BND))].concat();
    assert_eq!(h.take_sent(h.client), expected);
}

#[test]
fn connect_timeout_cancels_then_replies_rep_04() {
    let mut h = H::new(&["--connect-timeout", "2s"]);
    let c = h.client;
    h.feed(&[&GREETING[..], &connect_ip(TARGET)].concat());
    let (op, target, _) = h.connecting();
    h.advance(Duration::from_secs(2));
    assert!(h.cancelled(op), "the connect is cancelled");
    assert!(
        h.sent(c).is_none(),
        "the reply waits for the cancelled connect"
    );
    h.complete_cancelled();
    assert_eq!(h.fake.closed, [target]);
    h.finish_reject(&[vec![5, 0], error_reply(0x04)].concat());
    assert_eq!(h.fake.closed, [target, h.client]);
}

#[test]
fn a_target_without_a_local_address_fails_before_any_early_data_is_sent() {
    let mut h = H::new(&[]);
    h.fake.established_addr = None;
    h.feed(&[&GREETING[..], &connect_ip(TARGET), b"GET /"].concat());
    let (op, t, _) = h.connecting();
    h.complete(op, 0);
    assert!(h.sent(t).is_none(), "no send on a socket about to close");
    assert_eq!(h.fake.closed, [t]);
    h.finish_reject(&[vec![5, 0], error_reply(0x01)].concat());
}

#[test]
fn a_name_that_does_not_resolve_gets_rep_04() {
    let mut h = H::new(&[]);
    h.feed(&[&GREETING[..], &connect_name("nx.example", 80)].concat());
    h.answer(0, Err(ResolveError::NotFound));
    assert!(!h.has(|k| matches!(k, Kind::Connect { .. })));
    h.finish_reject(&[vec![5, 0], error_reply(0x04)].concat());
}

#[test]
fn a_late_dns_answer_after_the_timeout_is_ignored() {
    let mut h = H::new(&["--connect-timeout", "2s"]);
    let c = h.client;
    h.feed(&[&GREETING[..], &connect_name("slow.example", 80)].concat());
    h.advance(Duration::from_secs(2));
    assert_eq!(h.take_sent(c), [vec![5, 0], error_reply(0x04)].concat());
    assert_eq!(
        h.dns.forgotten,
        [h.dns.lookups[0].2],
        "the resolver is told"
    );
    h.answer(0, Ok(vec![sa("192.0.2.1:0").ip()]));
    assert!(
        !h.has(|k| matches!(k, Kind::Connect { .. })),
        "no connect after the reply"
    );
    let fin = h.shutdown_of(c).unwrap();
    h.feed(&[]);
    h.complete(fin, 0);
    assert!(h.finished());
    // And an answer after release goes nowhere.
    h.answer(0, Ok(vec![sa("192.0.2.1:0").ip()]));
    assert_eq!(h.fake.ops().count(), 0);
}

#[test]
fn early_data_goes_to_the_target_before_forwarding_starts() {
    let mut h = H::new(&[]);
    let c = h.client;
    h.feed(&[&GREETING[..], &connect_ip(TARGET), b"GET / HTTP/1.0\r\n"].concat());
    let (op, t, _) = h.connecting();
    h.complete(op, 0);
    let (early, bytes) = h.sent(t).expect("early data");
    assert_eq!(bytes, b"GET / HTTP/1.0\r\n");
    assert_eq!(
        h.take_sent(c),
        [vec![5, 0], reply(Rep::SUCCEEDED, sa(BND))].concat()
    );
    assert!(
        h.recv_multi(c).is_none(),
        "forwarding waits for the early data"
    );
    // A short send continues where it stopped.
    h.complete(early, 4);
    assert_eq!(h.take_sent(t), b"/ HTTP/1.0\r\n");
    assert!(h.recv_multi(c).is_some() && h.recv_multi(t).is_some());
}

// ---- copy path ---------------------------------------------------------------------------

#[test]
fn copy_path_relays_both_ways_and_gives_buffers_back() {
    let mut h = H::new(&[]);
    let t = h.open_tunnel();
    let c = h.client;
    let up = h.recv_multi(c).unwrap();
    let down = h.recv_multi(t).unwrap();
    h.deliver(up, b"hello");
    h.deliver(down, b"world");
    assert_eq!(h.fake.available(h.copy), 6, "held by the two sends");
    assert_eq!(h.take_sent(t), b"hello");
    assert_eq!(h.take_sent(c), b"world");
    h.assert_buffers_back();
    h.close();
    assert!(h.cancelled(up) && h.cancelled(down));
    h.complete_cancelled();
    assert!(h.finished());
    assert_eq!(h.fake.closed, [c, t]);
}

#[test]
fn client_eof_shuts_down_the_target_after_queued_bytes_are_sent() {
    let mut h = H::new(&["--forward", "copy"]);
    let t = h.open_tunnel();
    let c = h.client;
    let up = h.recv_multi(c).unwrap();
    h.deliver(up, b"one");
    h.deliver(up, b"two");
    h.complete(up, 0);
    assert!(h.shutdown_of(t).is_none(), "bytes still queued");
    assert_eq!(h.take_sent(t), b"one");
    assert!(h.shutdown_of(t).is_none());
    assert_eq!(h.take_sent(t), b"two");
    let fin = h.shutdown_of(t).expect("FIN to the target");
    assert!(h.shutdown_of(c).is_none(), "not toward the client");
    // The other direction keeps flowing.
    let down = h.recv_multi(t).unwrap();
    h.deliver(down, b"reply");
    assert_eq!(h.take_sent(c), b"reply");
    h.complete(down, 0);
    assert!(!h.finished(), "the shutdown is in flight");
    h.complete(fin, 0);
    assert!(h.finished());
    assert_eq!(h.fake.closed, [c, t]);
    h.assert_buffers_back();
}

#[test]
fn target_eof_shuts_down_the_client_while_the_upload_continues() {
    let mut h = H::new(&["--forward", "copy"]);
    let t = h.open_tunnel();
    let c = h.client;
    let down = h.recv_multi(t).unwrap();
    h.complete(down, 0);
    let fin = h.shutdown_of(c).expect("FIN to the client");
    assert!(h.shutdown_of(t).is_none());
    let up = h.recv_multi(c).unwrap();
    h.deliver(up, b"upload");
    assert_eq!(h.take_sent(t), b"upload");
    h.complete(fin, 0);
    assert!(!h.finished());
    h.deliver(up, b"more");
    h.complete(up, 0);
    assert!(!h.finished(), "the last bytes are not out yet");
    assert_eq!(h.take_sent(t), b"more");
    assert!(h.finished());
    h.assert_buffers_back();
}

#[test]
fn auto_mode_keeps_bulk_on_copy_while_buffers_are_plentiful() {
    let mut h = H::with_pool(&[], 64);
    let t = h.open_tunnel();
    let c = h.client;
    let up = h.recv_multi(c).unwrap();
    // Full buffers in a row, then a destination that falls behind (one send in flight,
    // HIGH_WATER queued): with 47 of 64 buffers free that is back-pressure, not splice.
    let chunks: Vec<Vec<u8>> = (0..17u8).map(|i| vec![i; COPY_BUF as usize]).collect();
    for chunk in &chunks[..16] {
        h.deliver(up, chunk);
    }
    assert!(!h.cancelled(up), "bulk alone does not stop the receive");
    h.deliver(up, &chunks[16]);
    assert!(h.cancelled(up), "HIGH_WATER queued: receive paused");
    h.complete(up, -libc::ECANCELED);
    assert_eq!(h.drain_sent(t), chunks.concat());
    assert!(!h.has(|k| matches!(k, Kind::Poll { .. })), "still on copy");
    let again = h.recv_multi(c).expect("resumed on copy");
    h.deliver(again, b"after");
    assert_eq!(h.take_sent(t), b"after");
    h.close_and_finish();
    h.assert_buffers_back();
}

#[test]
fn auto_mode_moves_a_stalled_direction_to_splice_when_buffers_run_short() {
    // 32 buffers, short below 16 free: once 17 are held (one sending, HIGH_WATER queued)
    // 15 are free.
    let mut h = H::with_pool(&[], 32);
    h.shard.copy_scarce_below = 16;
    let t = h.open_tunnel();
    let c = h.client;
    let up = h.recv_multi(c).unwrap();
    let chunks: Vec<Vec<u8>> = (0..17u8).map(|i| vec![i; 100]).collect();
    for chunk in &chunks[..16] {
        h.deliver(up, chunk);
    }
    assert!(!h.cancelled(up));
    h.deliver(up, &chunks[16]);
    assert!(
        h.cancelled(up),
        "stalled with buffers short: receive cancelled"
    );
    h.complete(up, -libc::ECANCELED);
    assert!(!h.has(|k| matches!(k, Kind::Poll { .. })), "queue first");
    assert_eq!(h.drain_sent(t), chunks.concat());
    h.assert_buffers_back();
    let poll = h.op(|k| {
        *k == Kind::Poll {
            sock: c,
            events: POLLIN,
        }
    });
    assert!(h.recv_multi(c).is_none());
    assert!(
        h.recv_multi(t).is_some(),
        "the other direction stays on copy"
    );
    h.complete(poll, libc::POLLIN as i32);
    let pipe = End::Pipe(1);
    let splice_in = h
        .op(|k| matches!(k, Kind::Splice { from, to, .. } if *from == End::Sock(c) && *to == pipe));
    h.complete(splice_in, 700);
    let out = Kind::Splice {
        from: pipe,
        to: End::Sock(t),
        len: 700,
    };
    assert!(h.has(|k| *k == out));
}

#[test]
fn copy_path_sends_what_a_turn_received_in_one_vectored_send() {
    assert_eq!(MAX_SEND_CHUNKS, 2, "the test's chunk counts");
    let mut h = H::new(&["--forward", "copy"]);
    let t = h.open_tunnel();
    let c = h.client;
    let up = h.recv_multi(c).unwrap();
    h.deliver_in_one_turn(up, &[b"one ", b"two "]);
    let send = h.op(|k| matches!(k, Kind::SendBuf { sock, chunks: 2, .. } if *sock == t));
    assert_eq!(h.sent(t).unwrap().1, b"one two ");
    // The next turn's bytes wait for that send...
    h.deliver(up, b"three");
    let sends = |h: &H| {
        h.fake
            .ops()
            .filter(|o| matches!(o.kind, Kind::SendBuf { .. }))
            .count()
    };
    assert_eq!(sends(&h), 1);
    // ...which goes out short: the rest of "two " and what followed go next, in order.
    h.complete(send, 6);
    assert_eq!(h.drain_sent(t), b"o three");
    h.close_and_finish();
    h.assert_buffers_back();
}

#[test]
fn copy_path_send_eagain_waits_for_pollout_and_sends_the_same_bytes_first() {
    let mut h = H::new(&["--forward", "copy"]);
    let t = h.open_tunnel();
    let c = h.client;
    let up = h.recv_multi(c).unwrap();
    h.deliver(up, b"abc");
    let (send, bytes) = h.sent(t).unwrap();
    assert_eq!(bytes, b"abc");
    h.complete(send, -libc::EAGAIN);
    let poll = h.op(|k| {
        *k == Kind::Poll {
            sock: t,
            events: libc::POLLOUT as u32,
        }
    });
    assert!(
        h.sent(t).is_none(),
        "nothing is sent while waiting for room"
    );
    h.deliver(up, b"def");
    assert!(h.sent(t).is_none(), "later bytes wait behind the first");
    h.complete(poll, libc::POLLOUT as i32);
    assert_eq!(h.drain_sent(t), b"abcdef");
    assert!(!h.finished());
    h.close_and_finish();
    h.assert_buffers_back();
}

#[test]
fn copy_mode_back_pressure_pauses_and_resumes_the_receive() {
    let mut h = H::with_pool(&["--forward", "copy"], 32);
    let t = h.open_tunnel();
    let c = h.client;
    let up = h.recv_multi(c).unwrap();
    // One buffer is being sent; HIGH_WATER (16) more queued stop the receive.
    for i in 0..16u8 {
        h.deliver(up, &[i; 100]);
    }
    assert!(!h.cancelled(up));
    h.deliver(up, &[16; 100]);
    assert!(h.cancelled(up), "HIGH_WATER queued: receive cancelled");
    h.complete(up, -libc::ECANCELED);
    assert!(h.recv_multi(c).is_none());
    // The queue drains MAX_SEND_CHUNKS buffers per send; the receive resumes once at most
    // LOW_WATER are left.
    let mut got = Vec::new();
    let mut queued = 16;
    while queued > LOW_WATER {
        assert!(
            h.recv_multi(c).is_none(),
            "{queued} queued: above LOW_WATER"
        );
        got.extend(h.take_sent(t));
        queued -= MAX_SEND_CHUNKS;
    }
    let again = h.recv_multi(c).expect("resumed at LOW_WATER");
    got.extend(h.drain_sent(t));
    let expected: Vec<u8> = (0..17u8).flat_map(|i| [i; 100]).collect();
    assert_eq!(got, expected);
    h.deliver(again, b"after");
    assert_eq!(h.take_sent(t), b"after");
    h.close_and_finish();
    h.assert_buffers_back();
}

#[test]
fn enobufs_while_buffers_are_spare_waits_for_the_end_of_turn_refill() {
    // The kernel's ring ran dry in a turn although the pool has spare buffers (it offers
    // only some at a time): the receive is re-armed once the ring is topped up.
    let mut h = H::new(&["--forward", "copy"]);
    let t = h.open_tunnel();
    let c = h.client;
    let up = h.recv_multi(c).unwrap();
    h.complete(up, -libc::ENOBUFS);
    assert_eq!(h.shard.starved, [(ID, Dir::Up)]);
    assert!(h.recv_multi(c).is_none());
    h.rearm_starved();
    let again = h.recv_multi(c).expect("re-armed on copy");
    h.deliver(again, b"x");
    assert_eq!(h.take_sent(t), b"x");
    h.close_and_finish();
    h.assert_buffers_back();
}

#[test]
fn copy_mode_enobufs_with_every_buffer_held_moves_to_splice() {
    copy_path_enobufs_moves_to_splice(&["--forward", "copy"]);
}

#[test]
fn auto_mode_enobufs_moves_to_splice() {
    copy_path_enobufs_moves_to_splice(&[]);
}

fn copy_path_enobufs_moves_to_splice(flags: &[&str]) {
    let mut h = H::new(flags);
    let t = h.open_tunnel();
    let c = h.client;
    let up = h.recv_multi(c).unwrap();
    for i in 0..8u8 {
        h.deliver(up, &[i; 10]);
    }
    h.deliver(up, b"no room");
    assert!(
        h.shard.starved.is_empty(),
        "no waiting for buffers that may never come back"
    );
    assert_eq!(h.drain_sent(t).len(), 80);
    assert!(h.has(|k| *k
        == Kind::Poll {
            sock: c,
            events: POLLIN
        }));
    h.assert_buffers_back();
}

#[test]
fn idle_timeout_closes_an_idle_tunnel() {
    let mut h = H::new(&["--idle-timeout", "30s"]);
    let t = h.open_tunnel();
    h.advance(Duration::from_secs(29));
    assert!(h.fake.ops().all(|o| !o.cancelled));
    h.advance(Duration::from_secs(1));
    let up = h.recv_multi(h.client).unwrap();
    assert!(h.cancelled(up));
    h.complete_cancelled();
    assert!(h.finished());
    assert_eq!(h.fake.closed, [h.client, t]);
}

#[test]
fn idle_timeout_rearms_for_a_busy_tunnel() {
    let mut h = H::new(&["--idle-timeout", "30s"]);
    let t = h.open_tunnel();
    h.advance(Duration::from_secs(20));
    let up = h.recv_multi(h.client).unwrap();
    h.deliver(up, b"ping");
    assert_eq!(h.take_sent(t), b"ping");
    h.advance(Duration::from_secs(10));
    assert!(h.fake.ops().all(|o| !o.cancelled), "active 10 s ago");
    h.advance(Duration::from_secs(19));
    assert!(h.fake.ops().all(|o| !o.cancelled));
    h.advance(Duration::from_secs(1));
    assert!(h.cancelled(up), "30 s quiet");
    h.complete_cancelled();
    assert!(h.finished());
}

// ---- splice path -------------------------------------------------------------------------

/// A splice-mode tunnel whose upload poll reported data: the pipe is taken and the splice
/// into it submitted. Returns the harness, the target socket and the splice-in op.
fn splice_tunnel() -> (H, u32, OpId) {
    let mut h = H::new(&["--forward", "splice"]);
    let t = h.open_tunnel();
    let c = h.client;
    assert!(h.recv_multi(c).is_none(), "no copy path");
    let poll = h.op(|k| {
        *k == Kind::Poll {
            sock: c,
            events: POLLIN,
        }
    });
    assert!(h.has(|k| *k
        == Kind::Poll {
            sock: t,
            events: POLLIN
        }));
    assert_eq!(h.fake.pipes_out, 0, "no pipe while waiting");
    h.complete(poll, libc::POLLIN as i32);
    assert_eq!(h.fake.pipes_out, 1);
    let want = Kind::Splice {
        from: End::Sock(c),
        to: End::Pipe(1),
        len: h.fake.pipe_capacity,
    };
    let splice_in = h.op(|k| *k == want);
    (h, t, splice_in)
}

fn splice_out(h: &H, t: u32, len: u32) -> OpId {
    let want = Kind::Splice {
        from: End::Pipe(1),
        to: End::Sock(t),
        len,
    };
    h.op(|k| *k == want)
}

#[test]
fn splice_path_moves_bytes_and_a_short_splice_out_continues() {
    let (mut h, t, splice_in) = splice_tunnel();
    h.complete(splice_in, 1000);
    let out = splice_out(&h, t, 1000);
    h.complete(out, 600);
    let out = splice_out(&h, t, 400);
    h.complete(out, 400);
    assert_eq!(
        (h.fake.pipes_out, h.fake.pipes_returned),
        (0, 1),
        "pipe back"
    );
    assert!(h.has(|k| *k
        == Kind::Poll {
            sock: h.client,
            events: POLLIN
        }));
}

#[test]
fn splice_in_eagain_returns_the_pipe_and_polls_again() {
    let (mut h, _, splice_in) = splice_tunnel();
    h.complete(splice_in, -libc::EAGAIN);
    assert_eq!((h.fake.pipes_out, h.fake.pipes_returned), (0, 1));
    assert!(h.has(|k| *k
        == Kind::Poll {
            sock: h.client,
            events: POLLIN
        }));
}

#[test]
fn splice_out_eagain_polls_for_pollout() {
    let (mut h, t, splice_in) = splice_tunnel();
    h.complete(splice_in, 1000);
    let out = splice_out(&h, t, 1000);
    h.complete(out, -libc::EAGAIN);
    let events = libc::POLLOUT as u32;
    let poll = h.op(|k| *k == Kind::Poll { sock: t, events });
    assert_eq!(h.fake.pipes_out, 1, "the pipe keeps its bytes");
    h.complete(poll, libc::POLLOUT as i32);
    let out = splice_out(&h, t, 1000);
    h.complete(out, 1000);
    assert_eq!(h.fake.pipes_out, 0);
}

#[test]
fn a_full_pipe_is_refilled_without_polling() {
    let (mut h, t, splice_in) = splice_tunnel();
    let cap = h.fake.pipe_capacity;
    h.complete(splice_in, cap as i32);
    let out = splice_out(&h, t, cap);
    h.complete(out, cap as i32);
    let c = h.client;
    assert!(!h.has(|k| *k
        == Kind::Poll {
            sock: c,
            events: POLLIN
        }));
    let want = Kind::Splice {
        from: End::Sock(c),
        to: End::Pipe(1),
        len: cap,
    };
    assert!(h.has(|k| *k == want), "reads again at once");
    assert_eq!(h.fake.pipes_out, 1);
}

#[test]
fn splice_eof_returns_the_pipe_and_shuts_down_the_other_side() {
    let (mut h, t, splice_in) = splice_tunnel();
    h.complete(splice_in, 0);
    assert_eq!((h.fake.pipes_out, h.fake.pipes_returned), (0, 1));
    let fin = h.shutdown_of(t).expect("FIN to the target");
    h.complete(fin, 0);
    let down = h.op(|k| {
        *k == Kind::Poll {
            sock: t,
            events: POLLIN,
        }
    });
    h.complete(down, libc::POLLIN as i32);
    let want = Kind::Splice {
        from: End::Sock(t),
        to: End::Pipe(2),
        len: h.fake.pipe_capacity,
    };
    let splice_in = h.op(|k| *k == want);
    h.complete(splice_in, 0);
    assert!(h.finished(), "both directions done");
    assert_eq!(h.fake.closed, [h.client, t]);
    assert_eq!((h.fake.pipes_out, h.fake.pipes_returned), (0, 2));
}

#[test]
fn close_with_ops_in_flight_finishes_after_the_cancelled_completions() {
    let (mut h, t, splice_in) = splice_tunnel();
    let down = h.op(|k| {
        *k == Kind::Poll {
            sock: t,
            events: POLLIN,
        }
    });
    h.close();
    assert!(h.cancelled(splice_in) && h.cancelled(down));
    assert!(
        h.fake.closed.is_empty(),
        "nothing freed while ops are in flight"
    );
    h.complete(down, -libc::ECANCELED);
    assert!(!h.finished());
    h.complete(splice_in, -libc::ECANCELED);
    assert!(h.finished());
    assert_eq!(h.fake.closed, [h.client, t]);
    assert_eq!(
        (h.fake.pipes_out, h.fake.pipes_returned),
        (0, 1),
        "empty pipe back"
    );
}

#[test]
fn a_pipe_emptied_after_close_is_returned_and_one_with_bytes_is_not() {
    for (moved, returned) in [(1000, 1), (400, 0)] {
        let (mut h, t, splice_in) = splice_tunnel();
        h.complete(splice_in, 1000);
        let out = splice_out(&h, t, 1000);
        h.close();
        // The splice out had moved bytes before the cancellation reached it.
        h.complete(out, moved);
        h.complete_cancelled();
        assert!(h.finished());
        assert_eq!(h.fake.pipes_returned, returned, "moved {moved} of 1000");
    }
}

// ---- UDP ASSOCIATE -----------------------------------------------------------------------

#[test]
fn udp_associate_replies_with_the_client_socket_address() {
    let mut h = H::new(&[]);
    let (csock, tsock) = h.associate();
    assert_eq!(
        h.fake.udp_sockets[0].1,
        SocketAddr::new(sa(LOCAL).ip(), 50000 + csock as u16)
    );
    h.udp_recv(csock);
    h.udp_recv(tsock);
    let c = h.client;
    assert!(
        h.has(|k| *k == Kind::Recv { sock: c }),
        "watching the control connection"
    );
}

#[test]
fn udp_datagram_to_an_ip_leaves_the_target_socket_without_its_header() {
    let mut h = H::new(&[]);
    let (csock, tsock) = h.associate();
    let recv = h.udp_recv(csock);
    let dst = sa("192.0.2.7:53");
    h.datagram(recv, UCLIENT, &datagram(Addr::Ip(dst), b"query"), 0);
    let (send, bytes, dest, gso) = h.udp_sent(tsock).expect("sent on");
    assert_eq!(
        (bytes.as_slice(), dest, gso),
        (&b"query"[..], to_dual_stack(dst), 0)
    );
    assert_eq!(
        h.fake.available(h.udp),
        u32::from(UDP_BUFS) - 1,
        "held by the send"
    );
    h.complete(send, 5);
    assert_eq!(h.stage_stats().relayed_out, 1);
    h.assert_buffers_back();
}

#[test]
fn udp_reply_from_a_target_gets_a_header_naming_the_target() {
    let mut h = H::new(&[]);
    let (csock, tsock) = h.associate();
    let recv = h.udp_recv(tsock);
    let from = sa("192.0.2.7:53");
    h.datagram(recv, &to_dual_stack(from).to_string(), b"answer", 0);
    let (send, bytes, dest, _) = h.udp_sent(csock).expect("sent to the client");
    let mut hdr = [0u8; 22];
    let n = encode_udp_header(0, &from, &mut hdr);
    assert_eq!(bytes, [&hdr[..n], b"answer"].concat());
    assert_eq!(dest, sa(UCLIENT));
    h.complete(send, bytes.len() as i32);
    assert_eq!(h.stage_stats().relayed_in, 1);
    h.assert_buffers_back();
}

#[test]
fn udp_foreign_datagram_is_dropped_and_does_not_keep_the_association_alive() {
    let mut h = H::new(&["--udp-idle-timeout", "60s"]);
    let (csock, tsock) = h.associate();
    h.advance(Duration::from_secs(50));
    let recv = h.udp_recv(csock);
    let dg = datagram(Addr::Ip(sa("192.0.2.7:53")), b"spoof");
    h.datagram(recv, "10.0.0.99:6000", &dg, 0);
    h.datagram(recv, "10.0.0.2:6001", &dg, 0);
    assert!(h.udp_sent(tsock).is_none());
    assert_eq!(h.stage_stats().dropped_foreign, 2);
    h.assert_buffers_back();
    h.advance(Duration::from_secs(10));
    assert!(h.cancelled(recv), "idle since the reply: ended");
    h.complete_cancelled();
    assert!(h.finished());
    assert_eq!(h.fake.closed, [h.client, csock, tsock]);
}

#[test]
fn udp_gro_burst_from_the_client_leaves_as_one_gso_send() {
    let mut h = H::new(&[]);
    let (csock, tsock) = h.associate();
    let dst = sa("192.0.2.7:9000");
    let payloads: Vec<Vec<u8>> = (1..=3u8).map(|i| vec![i; 100]).collect();
    let burst: Vec<u8> = payloads
        .iter()
        .flat_map(|p| datagram(Addr::Ip(dst), p))
        .collect();
    let recv = h.udp_recv(csock);
    h.datagram(recv, UCLIENT, &burst, 110);
    let (send, bytes, dest, gso) = h.udp_sent(tsock).expect("one send");
    assert_eq!(
        (bytes, dest, gso),
        (payloads.concat(), to_dual_stack(dst), 100)
    );
    h.complete(send, 300);
    assert!(h.udp_sent(tsock).is_none(), "exactly one send");
    assert_eq!(h.stage_stats().relayed_out, 3);
    h.assert_buffers_back();
}

#[test]
fn udp_datagrams_to_names_wait_for_their_own_lookups() {
    let mut h = H::new(&[]);
    let (csock, tsock) = h.associate();
    let recv = h.udp_recv(csock);
    let name = |n: &str| Addr::Domain(n.as_bytes().into(), 53);
    h.datagram(recv, UCLIENT, &datagram(name("a.example"), b"qa"), 0);
    h.datagram(recv, UCLIENT, &datagram(name("b.example"), b"qb"), 0);
    h.datagram(recv, UCLIENT, &datagram(name("a.example"), b"qa2"), 0);
    assert_eq!(h.dns.lookups.len(), 2, "one lookup per name");
    let ids: Vec<_> = h
        .dns
        .lookups
        .iter()
        .map(|l| token::decode(l.2).unwrap().1)
        .collect();
    assert_ne!(ids[0], ids[1]);
    assert!(h.fake.ops().all(|o| !matches!(o.kind, Kind::SendTo { .. })));
    h.assert_buffers_back();
    let (a, b) = (sa("198.51.100.1:0").ip(), sa("198.51.100.2:0").ip());
    h.answer(1, Ok(vec![b]));
    h.answer(0, Ok(vec![a]));
    let sent: Vec<(Vec<u8>, SocketAddr)> = h
        .fake
        .ops()
        .filter_map(|o| match &o.kind {
            Kind::SendTo { sock, bytes, dest } if *sock == tsock => Some((bytes.clone(), *dest)),
            _ => None,
        })
        .collect();
    let to = |ip: IpAddr| to_dual_stack(SocketAddr::new(ip, 53));
    let expected = vec![
        (b"qb".to_vec(), to(b)),
        (b"qa".to_vec(), to(a)),
        (b"qa2".to_vec(), to(a)),
    ];
    assert_eq!(sent, expected);
}

#[test]
fn udp_control_eof_ends_the_association() {
    let mut h = H::new(&[]);
    let (csock, tsock) = h.associate();
    h.feed(b"ignored");
    let (crecv, trecv) = (h.udp_recv(csock), h.udp_recv(tsock));
    h.feed(&[]);
    assert!(h.cancelled(crecv) && h.cancelled(trecv));
    assert!(h.fake.closed.is_empty());
    h.complete_cancelled();
    assert!(h.finished());
    assert_eq!(h.fake.closed, [h.client, csock, tsock]);
    h.assert_buffers_back();
}

#[test]
fn udp_idle_timeout_ends_the_association_unless_the_client_is_active() {
    let mut h = H::new(&["--udp-idle-timeout", "60s"]);
    let (csock, tsock) = h.associate();
    h.advance(Duration::from_secs(50));
    let recv = h.udp_recv(csock);
    h.datagram(
        recv,
        UCLIENT,
        &datagram(Addr::Ip(sa("192.0.2.7:53")), b"q"),
        0,
    );
    let (send, ..) = h.udp_sent(tsock).unwrap();
    h.complete(send, 1);
    h.advance(Duration::from_secs(59));
    assert!(!h.cancelled(recv), "active 59 s ago");
    h.advance(Duration::from_secs(1));
    assert!(h.cancelled(recv), "60 s idle");
    h.complete_cancelled();
    assert!(h.finished());
    assert_eq!(h.fake.closed, [h.client, csock, tsock]);
}

#[test]
fn udp_enobufs_goes_to_udp_starved_and_rearm_restarts_it() {
    let mut h = H::new(&[]);
    let (csock, tsock) = h.associate();
    let recv = h.udp_recv(csock);
    let dg = datagram(Addr::Ip(sa("192.0.2.7:53")), b"q");
    for _ in 0..UDP_BUFS {
        h.datagram(recv, UCLIENT, &dg, 0);
    }
    h.datagram(recv, UCLIENT, &dg, 0);
    assert_eq!(h.shard.udp_starved, [(ID, Side::Client)]);
    assert!(h
        .find(|k| *k == Kind::RecvMsgMulti { sock: csock })
        .is_none());
    let (send, ..) = h.udp_sent(tsock).unwrap();
    h.complete(send, 1);
    h.rearm_starved();
    assert!(h.shard.udp_starved.is_empty());
    h.udp_recv(csock);
    h.close_and_finish();
    h.assert_buffers_back();
}

#[test]
fn udp_single_datagrams_of_one_turn_leave_as_one_gso_send_per_destination() {
    let mut h = H::new(&[]);
    let (csock, tsock) = h.associate();
    let recv = h.udp_recv(csock);
    let (a, b) = (sa("192.0.2.7:53"), sa("192.0.2.8:53"));
    // Four datagrams arrive in one loop turn, each in its own receive (a client that sends
    // datagram by datagram): three to `a` (the last shorter), then one to `b`.
    for (dst, payload) in [(a, &b"one."[..]), (a, b"two."), (a, b"3"), (b, b"four")] {
        let c = h
            .fake
            .deliver_datagram(recv, sa(UCLIENT), &datagram(Addr::Ip(dst), payload), 0);
        let (_, op) = token::decode(c.owner).unwrap();
        h.with(|conn, cx| conn.on_completion(cx, op, c));
    }
    assert!(
        h.udp_sent(tsock).is_none(),
        "nothing leaves before the turn ends"
    );
    h.end_turn();
    let (send_a, bytes, dest, gso) = h.udp_sent(tsock).expect("the run to a");
    assert_eq!(
        (bytes.as_slice(), dest, gso),
        (&b"one.two.3"[..], to_dual_stack(a), 4),
        "one GSO send of 4-byte segments, the last shorter"
    );
    h.complete(send_a, 9);
    let (send_b, bytes, dest, gso) = h.udp_sent(tsock).expect("the one to b");
    assert_eq!(
        (bytes.as_slice(), dest, gso),
        (&b"four"[..], to_dual_stack(b), 0)
    );
    h.complete(send_b, 4);
    assert_eq!(h.stage_stats().relayed_out, 4, "counted per datagram");
    h.assert_buffers_back();
}

// ---- access rules ------------------------------------------------------------------------

/// `H` with these rules and policy in force.
fn with_rules(rules: &[RuleSpec], policy: Policy) -> H {
    let mut h = H::new(&[]);
    h.cfg.rules = Arc::new(Rules::new(rules.to_vec(), policy));
    h
}

fn rule(action: Action, to: &[&str]) -> RuleSpec {
    RuleSpec {
        to: to.iter().map(|d| Dest::parse(d).unwrap()).collect(),
        line: 7,
        ..RuleSpec::new(action)
    }
}

#[test]
fn a_refused_name_gets_rep_02_before_any_lookup() {
    let mut h = with_rules(
        &[rule(Action::Deny, &["*.blocked.example"])],
        Policy::default(),
    );
    h.feed(&[&GREETING[..], &connect_name("www.blocked.example", 443)].concat());
    assert!(h.dns.lookups.is_empty(), "never resolved");
    assert!(!h.has(|k| matches!(k, Kind::Connect { .. })));
    h.finish_reject(&[vec![5, 0], error_reply(0x02)].concat());
}

#[test]
fn a_refused_ip_literal_gets_rep_02_without_a_connect() {
    let mut h = with_rules(&[rule(Action::Deny, &["192.0.2.0/24"])], Policy::default());
    h.feed(&[&GREETING[..], &connect_ip(TARGET)].concat());
    assert!(!h.has(|k| matches!(k, Kind::Connect { .. })));
    h.finish_reject(&[vec![5, 0], error_reply(0x02)].concat());
}

#[test]
fn resolved_addresses_the_rules_refuse_are_never_connected_to() {
    let private = Policy {
        default: Some(Action::Allow),
        deny_private_targets: true,
    };
    // One private and one public address: only the public one is tried.
    let mut h = with_rules(&[], private.clone());
    h.feed(&[&GREETING[..], &connect_name("mixed.example", 80)].concat());
    h.answer(0, Ok(vec![sa("127.0.0.1:0").ip(), sa("192.0.2.1:0").ip()]));
    let (_, _, addr) = h.connecting();
    assert_eq!(addr, sa("192.0.2.1:80"));

    // Only private addresses (a rebinding name): REP 0x02, no connect.
    let mut h = with_rules(&[], private.clone());
    h.feed(&[&GREETING[..], &connect_name("rebind.example", 80)].concat());
    h.answer(
        0,
        Ok(vec![sa("10.0.0.1:0").ip(), sa("169.254.169.254:0").ip()]),
    );
    assert!(!h.has(|k| matches!(k, Kind::Connect { .. })));
    h.finish_reject(&[vec![5, 0], error_reply(0x02)].concat());

    // An allow rule naming the target lifts deny_private_targets for it.
    let mut h = with_rules(&[rule(Action::Allow, &["rebind.example"])], private);
    h.feed(&[&GREETING[..], &connect_name("rebind.example", 80)].concat());
    h.answer(0, Ok(vec![sa("10.0.0.1:0").ip()]));
    let (_, _, addr) = h.connecting();
    assert_eq!(addr, sa("10.0.0.1:80"));
}

#[test]
fn udp_datagrams_to_refused_destinations_are_dropped_and_counted() {
    let deny = RuleSpec {
        commands: vec![rules::Command::Udp],
        ..rule(Action::Deny, &["192.0.2.9", "*.blocked.example"])
    };
    let mut h = with_rules(
        &[deny],
        Policy {
            default: Some(Action::Allow),
            deny_private_targets: true,
        },
    );
    let (csock, tsock) = h.associate();
    let recv = h.udp_recv(csock);
    h.datagram(
        recv,
        UCLIENT,
        &datagram(Addr::Ip(sa("192.0.2.9:53")), b"no"),
        0,
    );
    h.datagram(
        recv,
        UCLIENT,
        &datagram(Addr::Ip(sa("127.0.0.1:53")), b"no"),
        0,
    );
    h.datagram(
        recv,
        UCLIENT,
        &datagram(Addr::Domain(b"x.blocked.example"[..].into(), 53), b"no"),
        0,
    );
    assert!(h.udp_sent(tsock).is_none(), "nothing sent");
    assert!(h.dns.lookups.is_empty(), "a refused name is not resolved");
    assert_eq!(h.stage_stats().dropped_refused, 3);
    // A name that resolves to a private address is refused after the lookup.
    h.datagram(
        recv,
        UCLIENT,
        &datagram(Addr::Domain(b"rebind.example"[..].into(), 53), b"no"),
        0,
    );
    h.answer(0, Ok(vec![sa("127.0.0.1:0").ip()]));
    assert_eq!(h.stage_stats().dropped_refused, 4);
    // Allowed ones still go.
    h.datagram(
        recv,
        UCLIENT,
        &datagram(Addr::Ip(sa("192.0.2.7:53")), b"yes"),
        0,
    );
    let (send, bytes, dest, _) = h.udp_sent(tsock).expect("sent");
    assert_eq!(
        (bytes.as_slice(), dest),
        (&b"yes"[..], to_dual_stack(sa("192.0.2.7:53")))
    );
    h.complete(send, 3);
    h.assert_buffers_back();
}

#[test]
fn an_association_no_datagram_could_use_is_refused() {
    let deny = RuleSpec {
        commands: vec![rules::Command::Udp],
        ..RuleSpec::new(Action::Deny)
    };
    let mut h = with_rules(&[deny], Policy::default());
    let req = request(Command::UDP_ASSOCIATE, Addr::Ip(sa("0.0.0.0:6000")));
    h.feed(&[&GREETING[..], &req].concat());
    assert!(h.fake.udp_sockets.is_empty(), "no sockets opened");
    h.finish_reject(&[vec![5, 0], error_reply(0x02)].concat());
}

// ---- BIND --------------------------------------------------------------------------------

/// A BIND for `dst`: returns the listener's fake id and the first reply's bytes.
fn bind_request(h: &mut H, dst: &str) -> (u32, Vec<u8>) {
    let c = h.client;
    h.feed(&[&GREETING[..], &request(Command::BIND, Addr::Ip(sa(dst)))].concat());
    let (listener, laddr) = h.fake.listeners[0];
    assert_eq!(
        laddr.ip(),
        sa(LOCAL).ip(),
        "listens on the control connection's IP"
    );
    let first = h.take_sent(c);
    assert_eq!(first, [vec![5, 0], reply(Rep::SUCCEEDED, laddr)].concat());
    (listener, first)
}

fn accept_op(h: &H, listener: u32) -> OpId {
    h.op(|k| *k == Kind::Accept { sock: listener })
}

#[test]
fn bind_replies_twice_then_relays_with_the_peer() {
    let mut h = H::new(&[]);
    let c = h.client;
    let (listener, _) = bind_request(&mut h, "192.0.2.20:0");
    h.fake.accepted_peers.push_back(sa("192.0.2.20:20"));
    let accept = accept_op(&h, listener);
    h.complete(accept, 7);
    assert_eq!(
        h.take_sent(c),
        reply(Rep::SUCCEEDED, sa("192.0.2.20:20")),
        "the second reply names the peer"
    );
    assert!(h.fake.closed.contains(&listener), "one peer per BIND");
    let peer = h.fake.adopted[0];
    assert!(
        h.recv_multi(c).is_some() && h.recv_multi(peer).is_some(),
        "relaying"
    );
}

#[test]
fn bind_refuses_a_peer_dst_does_not_name_and_keeps_listening() {
    let mut h = H::new(&[]);
    let c = h.client;
    let (listener, _) = bind_request(&mut h, "192.0.2.20:0");
    h.fake.accepted_peers.push_back(sa("198.51.100.9:20"));
    let accept = accept_op(&h, listener);
    h.complete(accept, 7);
    let stranger = h.fake.adopted[0];
    assert!(h.fake.closed.contains(&stranger), "the stranger is closed");
    assert!(h.sent(c).is_none(), "no second reply for it");
    // The right peer comes next.
    h.fake.accepted_peers.push_back(sa("192.0.2.20:21"));
    let accept = accept_op(&h, listener);
    h.complete(accept, 8);
    assert_eq!(h.take_sent(c), reply(Rep::SUCCEEDED, sa("192.0.2.20:21")));
}

#[test]
fn bind_timeout_answers_rep_06() {
    let mut h = H::new(&["--bind-timeout", "3s"]);
    let (listener, _) = bind_request(&mut h, "0.0.0.0:0");
    let accept = accept_op(&h, listener);
    h.advance(Duration::from_secs(3));
    assert!(h.cancelled(accept), "the accept is cancelled");
    h.complete_cancelled();
    assert!(h.fake.closed.contains(&listener));
    h.finish_reject(&error_reply(0x06));
}

#[test]
fn bind_is_refused_by_a_rule_for_the_bind_command() {
    let deny = RuleSpec {
        commands: vec![rules::Command::Bind],
        ..RuleSpec::new(Action::Deny)
    };
    let mut h = with_rules(&[deny], Policy::default());
    h.feed(
        &[
            &GREETING[..],
            &request(Command::BIND, Addr::Ip(sa("0.0.0.0:0"))),
        ]
        .concat(),
    );
    assert!(h.fake.listeners.is_empty(), "nothing opened");
    h.finish_reject(&[vec![5, 0], error_reply(0x02)].concat());
}

// ---- upstream proxies --------------------------------------------------------------------

const UPSTREAM: &str = "198.51.100.50:1080";

/// `H` whose every request goes through one upstream (`via`), with `creds` for it.
fn via_upstream(creds: Option<(&[u8], &[u8])>) -> H {
    let mut h = with_rules(
        &[RuleSpec {
            via: Some(0),
            ..RuleSpec::new(Action::Allow)
        }],
        Policy::default(),
    );
    h.cfg.upstreams = Arc::from(vec![crate::config::Upstream {
        name: "up".into(),
        addr: sa(UPSTREAM),
        creds: creds.map(|(u, p)| (u.to_vec(), p.to_vec())),
        resolve_local: false,
    }]);
    h
}

/// The upstream's side: completes the pending send on `t` and answers `answer` to the
/// receive that follows; returns what the relay had sent.
fn upstream_says(h: &mut H, t: u32, answer: &[u8]) -> Vec<u8> {
    let (send, sent) = h.sent(t).expect("a send to the upstream");
    h.complete(send, sent.len() as i32);
    let recv = h.op(|k| *k == Kind::Recv { sock: t });
    h.recv_into(recv, answer);
    sent
}

#[test]
fn connect_through_an_upstream_passes_the_name_and_its_reply() {
    let mut h = via_upstream(Some((b"hop", b"pw")));
    let c = h.client;
    h.feed(&[&GREETING[..], &connect_name("far.example", 443)].concat());
    assert!(
        h.dns.lookups.is_empty(),
        "remote DNS: the name is not resolved here"
    );
    let (op, t, addr) = h.connecting();
    assert_eq!(addr, sa(UPSTREAM));
    h.complete(op, 0);
    // Greeting offering user/password, then the credentials, then the request with the name.
    assert_eq!(upstream_says(&mut h, t, &[5, 2]), [5, 1, 2]);
    assert_eq!(upstream_says(&mut h, t, &[1, 0]), userpass("hop", "pw"));
    let upstream_bnd = sa("203.0.113.9:4444");
    let mut answer = reply(Rep::SUCCEEDED, upstream_bnd);
    answer.extend_from_slice(b"banner");
    let req = upstream_says(&mut h, t, &answer);
    assert_eq!(req, connect_name("far.example", 443));
    // The upstream's BND goes to the client, then what came after its reply.
    assert_eq!(
        h.take_sent(c),
        [
            vec![5, 0],
            reply(Rep::SUCCEEDED, upstream_bnd),
            b"banner".to_vec()
        ]
        .concat()
    );
    assert!(
        h.recv_multi(c).is_some() && h.recv_multi(t).is_some(),
        "a tunnel"
    );
}

#[test]
fn an_upstreams_rep_goes_back_as_is_and_a_closed_upstream_is_rep_01() {
    let mut h = via_upstream(None);
    h.feed(&[&GREETING[..], &connect_ip(TARGET)].concat());
    let (op, t, _) = h.connecting();
    h.complete(op, 0);
    upstream_says(&mut h, t, &[5, 0]);
    upstream_says(&mut h, t, &error_reply(0x05));
    h.finish_reject(&[vec![5, 0], error_reply(0x05)].concat());

    let mut h = via_upstream(None);
    h.feed(&[&GREETING[..], &connect_ip(TARGET)].concat());
    let (op, t, _) = h.connecting();
    h.complete(op, 0);
    upstream_says(&mut h, t, &[]);
    h.finish_reject(&[vec![5, 0], error_reply(0x01)].concat());
}

#[test]
fn an_upstream_that_does_not_answer_is_rep_04_at_the_connect_timeout() {
    let mut h = via_upstream(None);
    h.feed(&[&GREETING[..], &connect_ip(TARGET)].concat());
    let (op, t, _) = h.connecting();
    h.complete(op, 0);
    let (send, sent) = h.sent(t).unwrap();
    h.complete(send, sent.len() as i32);
    let recv = h.op(|k| *k == Kind::Recv { sock: t });
    h.advance(Duration::from_secs(10));
    assert!(h.cancelled(recv));
    h.complete_cancelled();
    h.finish_reject(&[vec![5, 0], error_reply(0x04)].concat());
}
