#!/usr/bin/env python3
"""Hold N idle SOCKS5 CONNECT tunnels through a relay, for tests/e2e/scale.rs.

Both ends of every tunnel (the client side and the target side) are spread over worker
processes, so no process needs more than about N/PROCS descriptors: the machine's hard
RLIMIT_NOFILE may be as low as the tunnel count and cannot always be raised.

Protocol on stdout/stdin (line based):
  prints  "held N"                  once every tunnel is established and accepted
  reads   "close"                   then closes every client side
  prints  "targets-closed N OPEN"   after each target side saw EOF (or 30 s passed)
"""
import argparse
import multiprocessing as mp
import os
import socket
import struct
import sys
import time


def target(ip, port_q, cmd_q, res_q, expect):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((ip, 0))
    srv.listen(65535)
    port_q.put(srv.getsockname()[1])
    srv.settimeout(120)
    held = []
    try:
        while len(held) < expect:
            c, _ = srv.accept()
            held.append(c)
    except OSError as e:
        res_q.put(("accept-error", str(e)))
        return
    res_q.put(("accepted", len(held)))
    cmd_q.get()  # wait until the clients closed
    deadline = time.time() + 30
    for c in held:
        c.settimeout(max(0.01, deadline - time.time()))
    open_ = 0
    for c in held:
        try:
            while True:
                d = c.recv(4096)
                if not d:
                    break
        except OSError:
            open_ += 1
        c.close()
    res_q.put(("target-closed", len(held) - open_, open_))


def client(relay, ip, tport, n, res_q, cmd_q):
    conns = []
    req = b"\x05\x01\x00" + b"\x05\x01\x00\x01" + socket.inet_aton(ip) + struct.pack(">H", tport)
    try:
        for i in range(n):
            s = socket.create_connection(relay, timeout=30)
            s.sendall(req)
            d = b""
            while len(d) < 12:
                x = s.recv(12 - len(d))
                if not x:
                    raise OSError(f"relay closed tunnel {i} during the handshake")
                d += x
            if d[1] != 0 or d[3] != 0:
                raise OSError(f"tunnel {i}: reply {d.hex()}")
            conns.append(s)
    except OSError as e:
        res_q.put(("client-error", str(e)))
        return
    res_q.put(("opened", len(conns)))
    cmd_q.get()
    for s in conns:
        s.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--relay", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--procs", type=int, default=4)
    a = ap.parse_args()
    host, port = a.relay.rsplit(":", 1)
    relay = (host, int(port))
    res_q = mp.Queue()
    procs, tcmds, ccmds = [], [], []
    shares = [a.count // a.procs + (1 if i < a.count % a.procs else 0) for i in range(a.procs)]
    for i, share in enumerate(shares):
        ip = f"127.0.0.{i + 2}"
        port_q, tq, cq = mp.Queue(), mp.Queue(), mp.Queue()
        t = mp.Process(target=target, args=(ip, port_q, tq, res_q, share), daemon=True)
        t.start()
        tport = port_q.get(timeout=10)
        c = mp.Process(target=client, args=(relay, ip, tport, share, res_q, cq), daemon=True)
        c.start()
        procs += [t, c]
        tcmds.append(tq)
        ccmds.append(cq)
    opened = accepted = 0
    for _ in range(2 * a.procs):
        kind, *rest = res_q.get(timeout=300)
        if kind.endswith("error"):
            print(f"error {kind}: {rest[0]}", flush=True)
            os._exit(1)
        if kind == "opened":
            opened += rest[0]
        else:
            accepted += rest[0]
    print(f"held {min(opened, accepted)}", flush=True)
    if sys.stdin.readline().strip() != "close":
        os._exit(1)
    for q in ccmds:
        q.put(1)
    time.sleep(0.2)
    for q in tcmds:
        q.put(1)
    closed = still_open = 0
    for _ in range(a.procs):
        kind, c, o = res_q.get(timeout=60)
        closed += c
        still_open += o
    print(f"targets-closed {closed} {still_open}", flush=True)
    for p in procs:
        p.join(timeout=10)


if __name__ == "__main__":
    main()
