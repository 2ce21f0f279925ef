//! Owner tokens of a connection's ops and timers: which connection (slot and generation) and
//! which op, packed into the engine's opaque [`Owner`] word.
//!
//! Layout: slot (24 bits) | generation (24) | op kind (5) | op argument (10) | 0. The top bit
//! stays clear: the server marks its own ops with it.

use crate::uring::Owner;

const FIELD: u64 = (1 << 24) - 1;
const ARG_BITS: u32 = 10;
/// Largest op argument (a timer sequence or a lookup id wraps at this).
pub(crate) const ARG_MAX: u16 = (1 << ARG_BITS) - 1;

/// A connection: its slot in the shard's slab and that slot's generation, so that a late
/// completion or timer for a connection that is gone cannot reach its successor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConnId {
    pub slot: u32,
    pub generation: u32,
}

/// Largest slot number a token can carry.
pub(crate) const MAX_SLOT: u32 = FIELD as u32;

impl ConnId {
    pub(crate) fn owner(self, op: Op) -> Owner {
        let (kind, arg) = op.encode();
        Owner(
            (u64::from(self.slot) & FIELD)
                | ((u64::from(self.generation) & FIELD) << 24)
                | (u64::from(kind) << 48)
                | (u64::from(arg & ARG_MAX) << 53),
        )
    }

    /// The generation that follows this one in the same slot.
    pub(crate) fn next_generation(generation: u32) -> u32 {
        (generation + 1) & FIELD as u32
    }
}

/// A direction of a tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dir {
    /// Client to target.
    Up,
    /// Target to client.
    Down,
}

impl Dir {
    pub(crate) const BOTH: [Dir; 2] = [Dir::Up, Dir::Down];
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// A socket of a UDP association.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    /// The socket the client sends to (BND.ADDR).
    Client,
    /// The socket that talks to targets.
    Target,
}

impl Side {
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// What a completion or timer of a connection is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    HandshakeRecv,
    HandshakeSend,
    Connect,
    /// The success reply to the client.
    ReplySend,
    /// Client bytes that came with the request, sent to the target.
    EarlySend,
    RejectSend,
    /// Reading (and discarding) what a rejected client still sends.
    RejectDrain,
    Shutdown(Dir),
    PollIn(Dir),
    PollOut(Dir),
    SpliceIn(Dir),
    SpliceOut(Dir),
    Recv(Dir),
    Send(Dir),
    /// A UDP association's control connection.
    ControlRecv,
    UdpRecv(Side),
    UdpSend(Side),
    /// The connection's timer, armed with this sequence number.
    Timer(u16),
    /// A name lookup, with its id.
    Resolve(u16),
    /// BIND: the accept on its listener.
    BindAccept,
    /// BIND: the first reply (the listener's address).
    BindReply,
    /// The client handshake with an upstream proxy, sent and received on the target socket.
    UpstreamSend,
    UpstreamRecv,
}

impl Op {
    fn encode(self) -> (u8, u16) {
        let d = |d: Dir| d as u16;
        let s = |s: Side| s as u16;
        match self {
            Op::HandshakeRecv => (0, 0),
            Op::HandshakeSend => (1, 0),
            Op::Connect => (2, 0),
            Op::ReplySend => (3, 0),
            Op::EarlySend => (4, 0),
            Op::RejectSend => (5, 0),
            Op::RejectDrain => (6, 0),
            Op::Shutdown(x) => (7, d(x)),
            Op::PollIn(x) => (8, d(x)),
            Op::PollOut(x) => (9, d(x)),
            Op::SpliceIn(x) => (10, d(x)),
            Op::SpliceOut(x) => (11, d(x)),
            Op::Recv(x) => (12, d(x)),
            Op::Send(x) => (13, d(x)),
            Op::ControlRecv => (14, 0),
            Op::UdpRecv(x) => (15, s(x)),
            Op::UdpSend(x) => (16, s(x)),
            Op::Timer(n) => (17, n),
            Op::Resolve(n) => (18, n),
            Op::BindAccept => (19, 0),
            Op::BindReply => (20, 0),
            Op::UpstreamSend => (21, 0),
            Op::UpstreamRecv => (22, 0),
        }
    }

    fn decode(kind: u8, arg: u16) -> Option<Op> {
        let d = if arg == 0 { Dir::Up } else { Dir::Down };
        let s = if arg == 0 { Side::Client } else { Side::Target };
        Some(match kind {
            0 => Op::HandshakeRecv,
            1 => Op::HandshakeSend,
            2 => Op::Connect,
            3 => Op::ReplySend,
            4 => Op::EarlySend,
            5 => Op::RejectSend,
            6 => Op::RejectDrain,
            7 => Op::Shutdown(d),
            8 => Op::PollIn(d),
            9 => Op::PollOut(d),
            10 => Op::SpliceIn(d),
            11 => Op::SpliceOut(d),
            12 => Op::Recv(d),
            13 => Op::Send(d),
            14 => Op::ControlRecv,
            15 => Op::UdpRecv(s),
            16 => Op::UdpSend(s),
            17 => Op::Timer(arg),
            18 => Op::Resolve(arg),
            19 => Op::BindAccept,
            20 => Op::BindReply,
            21 => Op::UpstreamSend,
            22 => Op::UpstreamRecv,
            _ => return None,
        })
    }
}

/// The connection and op an owner word names; None for words the relay did not make.
pub(crate) fn decode(owner: Owner) -> Option<(ConnId, Op)> {
    let w = owner.0;
    if w >> 63 != 0 {
        return None;
    }
    let id = ConnId {
        slot: (w & FIELD) as u32,
        generation: ((w >> 24) & FIELD) as u32,
    };
    let op = Op::decode(((w >> 48) & 0x1f) as u8, ((w >> 53) as u16) & ARG_MAX)?;
    Some((id, op))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_round_trips_and_fields_stay_apart() {
        let id = ConnId {
            slot: MAX_SLOT - 1,
            generation: MAX_SLOT,
        };
        let ops = [
            Op::HandshakeRecv,
            Op::HandshakeSend,
            Op::Connect,
            Op::ReplySend,
            Op::EarlySend,
            Op::RejectSend,
            Op::RejectDrain,
            Op::Shutdown(Dir::Down),
            Op::PollIn(Dir::Up),
            Op::PollOut(Dir::Down),
            Op::SpliceIn(Dir::Down),
            Op::SpliceOut(Dir::Up),
            Op::Recv(Dir::Down),
            Op::Send(Dir::Up),
            Op::ControlRecv,
            Op::UdpRecv(Side::Target),
            Op::UdpSend(Side::Client),
            Op::Timer(ARG_MAX),
            Op::Resolve(7),
        ];
        for op in ops {
            let w = id.owner(op);
            assert_eq!(w.0 >> 63, 0, "{op:?} keeps the server's bit clear");
            assert_eq!(decode(w), Some((id, op)));
        }
        // Generations wrap within their bits without touching the slot.
        assert_eq!(ConnId::next_generation(MAX_SLOT), 0);
        assert_eq!(decode(Owner(1 << 63)), None);
    }
}
