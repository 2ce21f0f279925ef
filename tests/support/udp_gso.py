#!/usr/bin/env python3
"""UDP GSO bursts through a SOCKS5 relay's UDP ASSOCIATE, for tests/e2e/udp.rs.

A client that sends with UDP_SEGMENT hands the relay several datagrams in one receive (the relay
turns UDP GRO on), and so does a target. These modes check that every datagram of such a burst
is relayed on its own, intact, with the right header, whatever the burst mixes.

  udp_gso.py client-burst --proxy IP:PORT
  udp_gso.py target-burst --proxy IP:PORT [--v6]
  udp_gso.py fallback     --proxy IP:PORT --target-ip IP

Targets are run here, in threads: UDP echo servers, and a "burster" that answers any datagram
with a GSO burst of N datagrams of S bytes plus one of L bytes (asked for in the datagram as
"burst N S L"). fallback sends bursts of 1,400-byte payloads to an echo server on
--target-ip, whose route has a smaller MTU (set up by tests/support/gso_fallback.sh).

Every mode prints "OK ..." and exits 0 on success, or prints what went wrong and exits 1. Every
wait is bounded (socket timeouts of a few seconds).
"""
import argparse
import ipaddress
import socket
import struct
import sys
import threading

SOL_UDP = 17
UDP_SEGMENT = 103
TIMEOUT = 5.0
QUIET = 0.5


def fail(msg):
    print("FAIL " + msg, flush=True)
    sys.exit(1)


def hostport(s):
    host, _, port = s.rpartition(":")
    return host.strip("[]"), int(port)


def family(ip):
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def header(dst, frag=0, atyp=None):
    """RFC 1928 section 7 header to dst = (ip or name, port)."""
    host, port = dst
    if atyp == 3:
        name = host.encode()
        return bytes([0, 0, frag, 3, len(name)]) + name + struct.pack("!H", port)
    ip = ipaddress.ip_address(host)
    a = 1 if ip.version == 4 else 4
    return bytes([0, 0, frag, a]) + ip.packed + struct.pack("!H", port)


def parse_reply(d):
    if len(d) < 10 or d[0:3] != b"\0\0\0":
        fail(f"bad reply header {d[:24]!r}")
    if d[3] == 1:
        return (str(ipaddress.ip_address(d[4:8])), struct.unpack("!H", d[8:10])[0]), d[10:]
    if d[3] == 4:
        return (str(ipaddress.ip_address(d[4:20])), struct.unpack("!H", d[20:22])[0]), d[22:]
    fail(f"reply ATYP {d[3]}")


class Assoc:
    """A UDP association: control connection, client socket, the relay's UDP endpoint."""

    def __init__(self, proxy):
        self.ctrl = socket.create_connection(proxy, timeout=TIMEOUT)
        self.ctrl.sendall(b"\x05\x01\x00")
        if self.ctrl.recv(2) != b"\x05\x00":
            fail("method negotiation")
        ip = proxy[0]
        self.sock = socket.socket(family(ip), socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((ip, 0))
        self.sock.settimeout(TIMEOUT)
        req = b"\x05\x03\x00" + header((ip, self.sock.getsockname()[1]))[3:]
        self.ctrl.sendall(req)
        rep = self.ctrl.recv(4)
        if len(rep) < 4 or rep[1] != 0:
            fail(f"UDP ASSOCIATE reply {rep!r}")
        n = 4 if rep[3] == 1 else 16
        rest = self.ctrl.recv(n + 2)
        self.relay = (str(ipaddress.ip_address(rest[:n])), struct.unpack("!H", rest[n:])[0])

    def burst(self, datagrams):
        """Sends datagrams (all of one size but the last, which may be shorter) as one GSO
        send."""
        seg = len(datagrams[0])
        self.sock.sendmsg(
            [b"".join(datagrams)], [(SOL_UDP, UDP_SEGMENT, struct.pack("H", seg))], 0, self.relay
        )

    def collect(self, n, what):
        """n replies (src, payload), and then nothing more for a moment."""
        got = []
        while len(got) < n:
            try:
                d, _ = self.sock.recvfrom(70000)
            except socket.timeout:
                fail(f"{what}: {len(got)} of {n} replies")
            got.append(parse_reply(d))
        self.sock.settimeout(QUIET)
        try:
            d, _ = self.sock.recvfrom(70000)
            fail(f"{what}: an extra reply {d[:40]!r}")
        except socket.timeout:
            pass
        finally:
            self.sock.settimeout(TIMEOUT)
        return got


def serve(sock, answer):
    sock.settimeout(0.2)
    while not STOP.is_set():
        try:
            d, src = sock.recvfrom(70000)
        except socket.timeout:
            continue
        answer(sock, d, src)


STOP = threading.Event()


def start_target(ip, answer):
    s = socket.socket(family(ip), socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.bind((ip, 0))
    threading.Thread(target=serve, args=(s, answer), daemon=True).start()
    return s.getsockname()[:2]


def echo(sock, d, src):
    sock.sendto(d, src)


def burster(sock, d, src):
    _, n, size, last = d.decode().split()
    n, size, last = int(n), int(size), int(last)
    dgrams = [bytes([i % 251]) * size for i in range(n)]
    if last:
        dgrams.append(b"L" * last)
    sock.sendmsg([b"".join(dgrams)], [(SOL_UDP, UDP_SEGMENT, struct.pack("H", size))], 0, src)


def payload(tag, i, size):
    p = f"{tag}{i:03d}".encode()
    return p + b"." * (size - len(p))


def expect(got, want, what):
    """got: [(src, payload)]; want: [(src, payload)], compared as multisets."""
    if sorted(got) != sorted(want):
        missing = [w for w in want if w not in got][:3]
        extra = [g for g in got if g not in want][:3]
        fail(f"{what}: missing {missing!r}, unexpected {extra!r}")


def client_burst(args):
    proxy = hostport(args.proxy)
    e1 = start_target("127.0.0.1", echo)
    e2 = start_target("127.0.0.2", echo)
    a = Assoc(proxy)

    # 16 datagrams to one target: one GSO run.
    d = [header(e1) + payload("A", i, 64) for i in range(16)]
    a.burst(d)
    expect(a.collect(16, "one target"), [(e1, payload("A", i, 64)) for i in range(16)], "one target")

    # Alternating targets: a run per datagram.
    d = [header((e1, e2)[i % 2]) + payload("B", i, 100) for i in range(12)]
    a.burst(d)
    want = [((e1, e2)[i % 2], payload("B", i, 100)) for i in range(12)]
    expect(a.collect(12, "two targets"), want, "two targets")

    # Garbage headers inside a burst are dropped; the others go through.
    d, want = [], []
    for i in range(10):
        if i in (3, 6):
            d.append(bytes([0, 0, 0, 9 if i == 3 else 0]) + b"\xee" * 76)
        else:
            d.append(header(e1) + payload("C", i, 70))
            want.append((e1, payload("C", i, 70)))
    a.burst(d)
    expect(a.collect(8, "garbage in a burst"), want, "garbage in a burst")

    # A shorter last datagram.
    d = [header(e1) + payload("D", i, 200) for i in range(5)] + [header(e1) + b"short"]
    a.burst(d)
    want = [(e1, payload("D", i, 200)) for i in range(5)] + [(e1, b"short")]
    expect(a.collect(6, "short last"), want, "short last")

    # Domain destinations (a numeric name, resolved by the relay) mixed with IPv4 ones: the
    # segments are one size, so the payloads differ by the header lengths.
    seg = 120
    d, want = [], []
    for i in range(8):
        h = header(e1, atyp=3 if i % 2 else None)
        p = payload("E", i, seg - len(h))
        d.append(h + p)
        want.append((e1, p))
    a.burst(d)
    expect(a.collect(8, "domain and IPv4 mixed"), want, "domain and IPv4 mixed")

    # Three fragments in one burst are reassembled into one datagram.
    parts = [payload("F", i, 50) for i in range(3)]
    d = [header(e1, frag=f) + p for f, p in zip((1, 2, 0x83), parts)]
    a.burst(d)
    expect(a.collect(1, "fragments in a burst"), [(e1, b"".join(parts))], "fragments in a burst")

    # 64 datagrams of 1,000 bytes: about 64 KiB in one receive.
    d = [header(e1) + payload("G", i, 1000) for i in range(64)]
    a.burst(d)
    expect(a.collect(64, "64 x 1000"), [(e1, payload("G", i, 1000)) for i in range(64)], "64 x 1000")
    print("OK client bursts relayed datagram by datagram", flush=True)


def target_burst(args):
    proxy = hostport(args.proxy)
    ip = "::1" if args.v6 else "127.0.0.1"
    b = start_target(ip, burster)
    a = Assoc(proxy)
    for n, size, last in ((20, 100, 37), (64, 1000, 0), (100, 600, 1), (2, 30000, 500)):
        a.sock.sendto(header(b) + f"burst {n} {size} {last}".encode(), a.relay)
        want = [(b, bytes([i % 251]) * size) for i in range(n)]
        if last:
            want.append((b, b"L" * last))
        what = f"target burst {n} x {size} + {last}"
        expect(a.collect(len(want), what), want, what)
    print(f"OK target bursts from {ip} arrive datagram by datagram", flush=True)


def fallback(args):
    proxy = hostport(args.proxy)
    e = start_target(args.target_ip, echo)
    a = Assoc(proxy)
    for round in range(2):
        d = [header(e) + payload(f"H{round}", i, 1400) for i in range(8)]
        a.burst(d)
        want = [(e, payload(f"H{round}", i, 1400)) for i in range(8)]
        expect(a.collect(8, f"round {round}"), want, f"round {round}")
    print("OK bursts above the route MTU arrive datagram by datagram", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["client-burst", "target-burst", "fallback"])
    ap.add_argument("--proxy", required=True)
    ap.add_argument("--v6", action="store_true")
    ap.add_argument("--target-ip")
    args = ap.parse_args()
    try:
        {"client-burst": client_burst, "target-burst": target_burst, "fallback": fallback}[
            args.mode
        ](args)
    finally:
        STOP.set()


if __name__ == "__main__":
    main()
