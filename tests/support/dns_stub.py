#!/usr/bin/env python3
"""A tiny authoritative-looking DNS server over UDP, for tests/e2e/udp.rs.

Answers every A/IN query with one fixed address (TTL 60); any other query type gets an
empty NOERROR answer. Prints "listening IP:PORT" once bound, then one line per query
("query NAME TYPE from IP:PORT"). Exits after --lifetime seconds whatever happens, so a
forgotten stub cannot linger.

  dns_stub.py --bind 127.0.0.1 --answer 127.3.2.1 [--lifetime 120]
"""
import argparse
import socket
import struct
import sys
import time


def parse_qname(msg, off):
    labels = []
    for _ in range(128):
        n = msg[off]
        off += 1
        if n == 0:
            return ".".join(labels), off
        if n & 0xC0:
            raise ValueError("compressed name in a question")
        labels.append(msg[off:off + n].decode("ascii", "replace"))
        off += n
    raise ValueError("name too long")


def answer(query, addr):
    if len(query) < 12:
        return None
    qid, flags, qd, _an, _ns, _ar = struct.unpack("!6H", query[:12])
    if flags & 0x8000 or qd != 1:
        return None
    name, off = parse_qname(query, 12)
    if off + 4 > len(query):
        return None
    qtype, qclass = struct.unpack("!HH", query[off:off + 4])
    question = query[12:off + 4]
    rd = flags & 0x0100
    # QR, AA, RD copied, RA; RCODE 0.
    rflags = 0x8000 | 0x0400 | rd | 0x0080
    answers = b""
    ancount = 0
    if qtype == 1 and qclass == 1:
        # Name as a pointer to the question (offset 12), A, IN, TTL 60, 4 bytes.
        answers = struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton(addr)
        ancount = 1
    head = struct.pack("!6H", qid, rflags, 1, ancount, 0, 0)
    return name, qtype, head + question + answers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bind", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--answer", required=True)
    ap.add_argument("--lifetime", type=float, default=120.0)
    a = ap.parse_args()
    fam = socket.AF_INET6 if ":" in a.bind else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.bind((a.bind, a.port))
    host, port = s.getsockname()[:2]
    shown = "[%s]:%d" % (host, port) if fam == socket.AF_INET6 else "%s:%d" % (host, port)
    print("listening " + shown, flush=True)
    end = time.monotonic() + a.lifetime
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return 0
        s.settimeout(min(left, 1.0))
        try:
            q, peer = s.recvfrom(4096)
        except socket.timeout:
            continue
        try:
            r = answer(q, a.answer)
        except (ValueError, IndexError, struct.error) as e:
            print("bad query from %s:%d: %s" % (peer[0], peer[1], e), flush=True)
            continue
        if r is None:
            continue
        name, qtype, resp = r
        print("query %s %d from %s:%d" % (name, qtype, peer[0], peer[1]), flush=True)
        s.sendto(resp, peer)


if __name__ == "__main__":
    sys.exit(main())
