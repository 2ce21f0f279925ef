#!/usr/bin/env python3
"""Soak: mixed load through a running ringsocks for a while, watching for leaks and corruption.

Started by scripts/soak.sh, which starts the relay (with --stats-interval) and passes its PID,
address and log file. Load, all on loopback, each kind in its own threads until the deadline:

  bulk      CONNECT, stream 1-8 MiB of seeded random bytes to an echo target while reading
            the echo back; the echo must hash the same (upload and download at once)
  churn     connect, handshake, 1 KiB echo, close, over and over
  udp       UDP ASSOCIATE, 100 datagrams of 1-1400 B to a UDP echo; every reply must match
  idle      200 tunnels opened at the start and held silent; each must still echo at the end
  resets    clients that abort with RST mid-stream, and a target that resets mid-stream

Every INTERVAL seconds it samples the relay's RSS and fd count (/proc) and the fixed-file
slots, pipes, ops and buffers the shards report ("shard stats" log lines, summed over shards).
It fails (exit 1) if any transfer was corrupted, more than 0.1% failed, or, after the warm-up
(the first quarter), a
quantity trends upward: the mean of the last third of the samples above the first third's by
more than the quantity's slack. Writes samples.csv, chart.svg and summary.json to --out.
"""

import argparse
import hashlib
import json
import os
import random
import re
import socket
import struct
import sys
import threading
import time

STOP = threading.Event()
LOCK = threading.Lock()
COUNTS = {}
ERRORS = []


def count(key, n=1):
    with LOCK:
        COUNTS[key] = COUNTS.get(key, 0) + n


def error(msg):
    with LOCK:
        if len(ERRORS) < 50:
            ERRORS.append(msg)
    count("errors")


# ---- SOCKS5 client ---------------------------------------------------------------------------


def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("EOF after %d of %d bytes" % (len(buf), n))
        buf += chunk
    return bytes(buf)


def socks(relay, cmd, host, port, timeout=10):
    s = socket.create_connection(relay, timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    addr = socket.inet_aton(host)
    s.sendall(b"\x05\x01\x00" + b"\x05" + bytes([cmd]) + b"\x00\x01" + addr + struct.pack(">H", port))
    if recv_exact(s, 2) != b"\x05\x00":
        raise ConnectionError("method refused")
    head = recv_exact(s, 4)
    if head[1] != 0:
        raise ConnectionError("REP %d" % head[1])
    alen = {1: 4, 4: 16}.get(head[3])
    if alen is None:
        alen = recv_exact(s, 1)[0]
    bnd = recv_exact(s, alen + 2)
    return s, bnd


# ---- targets ---------------------------------------------------------------------------------


def serve_tcp(handler):
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen(1024)
    ls.settimeout(0.5)

    def loop():
        while not STOP.is_set():
            try:
                c, _ = ls.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=handler, args=(c,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return ls.getsockname()[1]


def echo_handler(c):
    try:
        while True:
            d = c.recv(262144)
            if not d:
                break
            c.sendall(d)
        c.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        c.close()


def reset_handler(c):
    """Reads about 64 KiB, then resets the connection."""
    try:
        got = 0
        while got < 65536:
            d = c.recv(65536)
            if not d:
                break
            got += len(d)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    finally:
        c.close()


def serve_udp_echo():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 0))
    u.settimeout(0.5)

    def loop():
        while not STOP.is_set():
            try:
                d, a = u.recvfrom(65535)
                u.sendto(d, a)
            except socket.timeout:
                continue
            except OSError:
                return

    threading.Thread(target=loop, daemon=True).start()
    return u.getsockname()[1]


# ---- load ------------------------------------------------------------------------------------


def bulk(relay, echo_port, seed):
    rng = random.Random(seed)
    while not STOP.is_set():
        size = rng.randint(1 << 20, 8 << 20)
        data = rng.randbytes(size)
        try:
            s, _ = socks(relay, 1, "127.0.0.1", echo_port)
            s.settimeout(30)
            got = hashlib.sha256()
            n = [0]

            def reader():
                try:
                    while n[0] < size:
                        d = s.recv(262144)
                        if not d:
                            break
                        got.update(d)
                        n[0] += len(d)
                except OSError as e:
                    error("bulk read: %s" % e)

            t = threading.Thread(target=reader)
            t.start()
            view = memoryview(data)
            for off in range(0, size, 131072):
                s.sendall(view[off:off + 131072])
            s.shutdown(socket.SHUT_WR)
            t.join(60)
            s.close()
            if n[0] != size or got.digest() != hashlib.sha256(data).digest():
                error("bulk: CORRUPT or short echo (%d of %d bytes)" % (n[0], size))
                count("corrupt")
            else:
                count("bulk_bytes", 2 * size)
                count("bulk_ok")
        except OSError as e:
            error("bulk: %s" % e)


def churn(relay, echo_port):
    payload = os.urandom(1024)
    while not STOP.is_set():
        try:
            s, _ = socks(relay, 1, "127.0.0.1", echo_port)
            s.sendall(payload)
            if recv_exact(s, len(payload)) != payload:
                error("churn: CORRUPT echo")
                count("corrupt")
            s.close()
            count("churn_ok")
        except OSError as e:
            error("churn: %s" % e)


def udp(relay, udp_port, seed):
    rng = random.Random(seed)
    while not STOP.is_set():
        try:
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.bind(("127.0.0.1", 0))
            u.settimeout(1)
            me = u.getsockname()
            ctl, bnd = socks(relay, 3, me[0], me[1])
            relay_udp = (socket.inet_ntoa(bnd[:4]), struct.unpack(">H", bnd[4:6])[0])
            header = b"\x00\x00\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack(">H", udp_port)
            sent = {}
            for i in range(100):
                body = struct.pack(">I", i) + rng.randbytes(rng.randint(0, 1396))
                sent[i] = body
                u.sendto(header + body, relay_udp)
                if i % 10 == 9:
                    time.sleep(0.001)
            got = 0
            while got < 100:
                try:
                    d, _ = u.recvfrom(65535)
                except socket.timeout:
                    break
                body = d[10:]
                if d[:10] != header or len(body) < 4 or sent.get(struct.unpack(">I", body[:4])[0]) != body:
                    error("udp: CORRUPT datagram")
                    count("corrupt")
                got += 1
            count("udp_sent", 100)
            count("udp_echoed", got)
            ctl.close()
            u.close()
        except OSError as e:
            error("udp: %s" % e)


def resets(relay, echo_port, reset_port):
    junk = os.urandom(32768)
    while not STOP.is_set():
        try:
            # A client that aborts mid-stream.
            s, _ = socks(relay, 1, "127.0.0.1", echo_port)
            for _ in range(4):
                s.sendall(junk)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
            # A target that resets mid-stream: the relay must pass on the end.
            s, _ = socks(relay, 1, "127.0.0.1", reset_port)
            s.settimeout(10)
            try:
                for _ in range(64):
                    s.sendall(junk)
                while s.recv(65536):
                    pass
            except OSError:
                pass
            s.close()
            count("resets_ok")
        except OSError as e:
            error("resets: %s" % e)
        time.sleep(0.01)


# ---- sampling --------------------------------------------------------------------------------

STATS_RE = re.compile(r"shard stats shard=(\d+) (.*)$")
FIELDS = ["connections", "ops_in_flight", "fixed_files", "pipes_open", "copy_buffers_held",
          "udp_buffers_held", "names_resolving"]


def shard_stats(log_path):
    """The latest 'shard stats' line of each shard, summed."""
    latest = {}
    try:
        with open(log_path, errors="replace") as f:
            f.seek(max(0, os.path.getsize(log_path) - (1 << 20)))
            for line in f:
                m = STATS_RE.search(line)
                if m:
                    kv = dict(p.split("=", 1) for p in m.group(2).split() if "=" in p)
                    latest[m.group(1)] = kv
    except OSError:
        pass
    return {k: sum(int(v.get(k, 0)) for v in latest.values()) for k in FIELDS}


def proc_sample(pid):
    with open("/proc/%d/status" % pid) as f:
        rss = int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))
    fds = len(os.listdir("/proc/%d/fd" % pid))
    return rss, fds


def chart(path, samples, keys):
    w, h, pad = 900, 120, 40
    parts = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">'
             % (w, (h + pad) * len(keys) + pad)]
    t_end = max(s["t"] for s in samples) or 1
    for i, k in enumerate(keys):
        y0 = pad + i * (h + pad)
        vals = [s[k] for s in samples]
        lo, hi = min(vals), max(vals)
        span = (hi - lo) or 1
        pts = " ".join("%.1f,%.1f" % (60 + (w - 80) * s["t"] / t_end, y0 + h - h * (s[k] - lo) / span)
                       for s in samples)
        parts.append('<text x="5" y="%d">%s</text>' % (y0 - 6, "%s (min %d, max %d)" % (k, lo, hi)))
        parts.append('<rect x="60" y="%d" width="%d" height="%d" fill="none" stroke="#ccc"/>' % (y0, w - 80, h))
        parts.append('<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="%s"/>' % pts)
    parts.append('<text x="60" y="%d">time: 0 .. %d s</text>' % ((h + pad) * len(keys) + pad - 8, t_end))
    parts.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(parts))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--relay", required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--duration", type=float, required=True)
    ap.add_argument("--interval", type=float, default=5)
    ap.add_argument("--out", required=True)
    ap.add_argument("--kinds", default="bulk,churn,udp,resets", help="load kinds to run (debugging)")
    a = ap.parse_args()
    host, port = a.relay.rsplit(":", 1)
    relay = (host, int(port))
    os.makedirs(a.out, exist_ok=True)

    echo_port = serve_tcp(echo_handler)
    reset_port = serve_tcp(reset_handler)
    udp_port = serve_udp_echo()

    idle = []
    for _ in range(200):
        s, _ = socks(relay, 1, "127.0.0.1", echo_port)
        idle.append(s)

    kinds = set(a.kinds.split(","))
    threads = []
    if "bulk" in kinds:
        threads += [threading.Thread(target=bulk, args=(relay, echo_port, seed), daemon=True) for seed in (1, 2)]
    if "churn" in kinds:
        threads += [threading.Thread(target=churn, args=(relay, echo_port), daemon=True) for _ in range(2)]
    if "udp" in kinds:
        threads += [threading.Thread(target=udp, args=(relay, udp_port, 7), daemon=True)]
    if "resets" in kinds:
        threads += [threading.Thread(target=resets, args=(relay, echo_port, reset_port), daemon=True)]
    for t in threads:
        t.start()

    samples = []
    t0 = time.time()
    deadline = t0 + a.duration
    while time.time() < deadline:
        time.sleep(min(a.interval, max(0.0, deadline - time.time())))
        rss, fds = proc_sample(a.pid)
        s = {"t": round(time.time() - t0, 1), "rss_kib": rss, "fds": fds}
        s.update(shard_stats(a.log))
        with LOCK:
            s.update({k: COUNTS.get(k, 0) for k in ("bulk_ok", "churn_ok", "udp_echoed", "resets_ok", "errors")})
        samples.append(s)
        print("soak t=%5.0fs rss=%d KiB fds=%d fixed=%d pipes=%d ops=%d conns=%d bulk=%d churn=%d errors=%d"
              % (s["t"], rss, fds, s["fixed_files"], s["pipes_open"], s["ops_in_flight"], s["connections"],
                 s["bulk_ok"], s["churn_ok"], s["errors"]), flush=True)
    STOP.set()
    for t in threads:
        t.join(90)

    # The idle tunnels survived the whole run.
    dead_idle = 0
    for s in idle:
        try:
            s.settimeout(5)
            s.sendall(b"still here")
            if recv_exact(s, 10) != b"still here":
                dead_idle += 1
        except OSError:
            dead_idle += 1
        s.close()

    keys = ["rss_kib", "fds", "fixed_files", "pipes_open", "ops_in_flight", "copy_buffers_held"]
    with open(os.path.join(a.out, "samples.csv"), "w") as f:
        cols = list(samples[0].keys())
        f.write(",".join(cols) + "\n")
        for s in samples:
            f.write(",".join(str(s[c]) for c in cols) + "\n")
    chart(os.path.join(a.out, "chart.svg"), samples, keys)

    # Trend check after the warm-up.
    slack = {"rss_kib": 8192, "fds": 16, "fixed_files": 64, "pipes_open": 16, "ops_in_flight": 128,
             "copy_buffers_held": 256}
    after = samples[len(samples) // 4:]
    trends = {}
    failures = []
    if len(after) >= 3:
        third = max(1, len(after) // 3)
        for k in keys:
            first = sum(s[k] for s in after[:third]) / third
            last = sum(s[k] for s in after[-third:]) / third
            trends[k] = {"first_third": round(first, 1), "last_third": round(last, 1)}
            if last > first * 1.10 + slack[k]:
                failures.append("%s grows: %.0f -> %.0f" % (k, first, last))
    else:
        failures.append("too few samples for a trend (%d)" % len(samples))
    with LOCK:
        counts = dict(COUNTS)
    if counts.get("corrupt", 0):
        failures.append("%d corrupted transfers" % counts["corrupt"])
    ops = sum(counts.get(k, 0) for k in ("bulk_ok", "churn_ok", "resets_ok")) + counts.get("udp_sent", 0) // 100
    if counts.get("errors", 0) > max(2, ops // 1000):
        failures.append("%d failed transfers of %d (see errors in summary.json)" % (counts["errors"], ops))
    if dead_idle:
        failures.append("%d of 200 idle tunnels died" % dead_idle)
    for k in ("bulk_ok", "churn_ok", "udp_echoed", "resets_ok"):
        if k.split("_")[0] in kinds and not counts.get(k):
            failures.append("no %s at all" % k)
    summary = {"duration_s": a.duration, "samples": len(samples), "counts": counts, "trends": trends,
               "idle_tunnels_dead": dead_idle, "errors": ERRORS[:20], "failures": failures}
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps({"counts": counts, "trends": trends, "failures": failures}, indent=1))
    if failures:
        print("SOAK FAILED: " + "; ".join(failures), file=sys.stderr)
        sys.exit(1)
    print("soak passed")


if __name__ == "__main__":
    main()
