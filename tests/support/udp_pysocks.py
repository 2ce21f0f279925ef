#!/usr/bin/env python3
"""UDP ASSOCIATE through a SOCKS5 relay with PySocks, for tests/e2e/udp.rs.

Every mode prints "OK ..." and exits 0 on success, or prints what went wrong and exits 1.
Every wait is bounded (socket timeouts of a few seconds).

  udp_pysocks.py echo          --proxy IP:PORT --target IP:PORT
  udp_pysocks.py dns           --proxy IP:PORT --server IP:PORT --name NAME --expect IPV4
  udp_pysocks.py two-targets   --proxy IP:PORT --target IP:PORT --target2 IP:PORT
  udp_pysocks.py control-close --proxy IP:PORT --target IP:PORT

The targets are UDP echo servers run by the test (dns: the DNS stub). control-close echoes
once, closes the association's control connection (PySocks keeps it in s._proxyconn),
then sends again and expects no reply within 1 s.
"""
import argparse
import random
import socket
import struct
import sys
import time

import socks

TIMEOUT = 5.0


def hostport(s):
    host, _, port = s.rpartition(":")
    return host.strip("[]"), int(port)


def fail(msg):
    print("FAIL " + msg, flush=True)
    sys.exit(1)


def udp_client(proxy):
    host, port = proxy
    s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
    s.set_proxy(socks.SOCKS5, host, port)
    s.settimeout(TIMEOUT)
    return s


def expect_echo(s, target, payload, what):
    s.sendto(payload, target)
    try:
        data, src = s.recvfrom(65535)
    except socket.timeout:
        fail("%s: no echo of %d bytes from %s:%d within %.0f s"
             % (what, len(payload), target[0], target[1], TIMEOUT))
    if tuple(src) != tuple(target):
        fail("%s: reply claims to come from %r, expected %r" % (what, src, target))
    if data != payload:
        fail("%s: echo differs: sent %d bytes %r..., got %d bytes %r..."
             % (what, len(payload), payload[:16], len(data), data[:16]))


def mode_echo(a):
    target = hostport(a.target)
    s = udp_client(hostport(a.proxy))
    rng = random.Random(1928)
    sizes = [1, 5, 100, 512, 1400, 8000]
    for i, n in enumerate(sizes):
        payload = bytes(rng.getrandbits(8) for _ in range(n))
        expect_echo(s, target, payload, "datagram %d" % i)
    s.close()
    print("OK echoed %d datagrams" % len(sizes), flush=True)


def dns_query(qid, name):
    head = struct.pack("!6H", qid, 0x0100, 1, 0, 0, 0)  # RD, one question
    qname = b"".join(bytes([len(p)]) + p.encode("ascii") for p in name.split(".")) + b"\0"
    return head + qname + struct.pack("!HH", 1, 1)  # A, IN


def skip_name(msg, off):
    for _ in range(128):
        n = msg[off]
        if n == 0:
            return off + 1
        if n & 0xC0 == 0xC0:
            return off + 2
        off += 1 + n
    raise ValueError("name too long")


def mode_dns(a):
    server = hostport(a.server)
    s = udp_client(hostport(a.proxy))
    qid = 0x5EC5
    s.sendto(dns_query(qid, a.name), server)
    try:
        resp, src = s.recvfrom(4096)
    except socket.timeout:
        fail("no DNS answer within %.0f s" % TIMEOUT)
    if tuple(src) != tuple(server):
        fail("DNS answer claims to come from %r, expected %r" % (src, server))
    rid, flags, qd, an, _ns, _ar = struct.unpack("!6H", resp[:12])
    if rid != qid or not flags & 0x8000 or flags & 0x000F:
        fail("bad DNS header id=%#x flags=%#x" % (rid, flags))
    if an < 1:
        fail("no answer records (qd=%d an=%d)" % (qd, an))
    off = 12
    for _ in range(qd):
        off = skip_name(resp, off) + 4
    off = skip_name(resp, off)
    rtype, rclass, _ttl, rdlen = struct.unpack("!HHIH", resp[off:off + 10])
    off += 10
    if rtype != 1 or rclass != 1 or rdlen != 4:
        fail("first answer is type %d class %d len %d, not A/IN" % (rtype, rclass, rdlen))
    got = socket.inet_ntoa(resp[off:off + 4])
    if got != a.expect:
        fail("%s resolved to %s, expected %s" % (a.name, got, a.expect))
    s.close()
    print("OK %s A %s" % (a.name, got), flush=True)


def mode_two_targets(a):
    t1, t2 = hostport(a.target), hostport(a.target2)
    s = udp_client(hostport(a.proxy))
    for i in range(4):
        expect_echo(s, t1, b"to the first target, round %d" % i, "target 1 round %d" % i)
        expect_echo(s, t2, b"to the second target, round %d" % i, "target 2 round %d" % i)
    s.close()
    print("OK one association, two targets, 4 rounds", flush=True)


def mode_control_close(a):
    target = hostport(a.target)
    s = udp_client(hostport(a.proxy))
    expect_echo(s, target, b"before the control connection closes", "before close")
    ctl = s._proxyconn
    if ctl is None:
        fail("PySocks did not keep the control connection in _proxyconn")
    ctl.close()
    # Let the relay see the EOF.
    time.sleep(0.5)
    s.sendto(b"after the control connection closed", target)
    s.settimeout(1.0)
    try:
        data, src = s.recvfrom(65535)
        fail("a reply still came back after the control connection closed: %r from %r"
             % (data[:40], src))
    except socket.timeout:
        pass
    except ConnectionRefusedError:
        pass  # ICMP port unreachable: the relay's UDP port is closed
    print("OK nothing relayed after the control connection closed", flush=True)


def mode_allowed_refused(a):
    """--target is allowed by the relay's rules, --target2 refused: echoes from the first,
    silence from the second, and the association keeps working after the refusal."""
    ok, refused = hostport(a.target), hostport(a.target2)
    s = udp_client(hostport(a.proxy))
    expect_echo(s, ok, b"to the allowed target", "allowed, before")
    s.sendto(b"to the refused target", refused)
    s.settimeout(1.0)
    try:
        data, src = s.recvfrom(65535)
        fail("a reply came back from %r for a refused destination: %r" % (src, data[:40]))
    except socket.timeout:
        pass
    s.settimeout(TIMEOUT)
    expect_echo(s, ok, b"to the allowed target again", "allowed, after")
    s.close()
    print("OK allowed echoed, refused dropped", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["echo", "dns", "two-targets", "control-close",
                                       "allowed-refused"])
    ap.add_argument("--proxy", required=True)
    ap.add_argument("--target")
    ap.add_argument("--target2")
    ap.add_argument("--server")
    ap.add_argument("--name")
    ap.add_argument("--expect")
    a = ap.parse_args()
    {
        "echo": mode_echo,
        "dns": mode_dns,
        "two-targets": mode_two_targets,
        "control-close": mode_control_close,
        "allowed-refused": mode_allowed_refused,
    }[a.mode](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
