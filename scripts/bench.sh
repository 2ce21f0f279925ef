#!/usr/bin/env bash
# Side-by-side suite: ringsocks (--forward auto, splice and copy), direct loopback, Dante,
# microsocks, 3proxy and hev-socks5-server, measured with `loadgen compare` (relays on CPU 0, load
# on CPU 1, order of systems rotated every repetition, medians), plus a third-party cross-check in
# the full suite: iperf3 through proxychains4, 1 and 8 streams, on every system. Peers that are not
# installed or not given are skipped with a note, and so is the cross-check without iperf3 or
# proxychains4.
#
#   scripts/bench.sh                       # full suite: ~5 s per measurement, 3 reps (~20 min)
#   scripts/bench.sh --suite ci            # short suite (CI): 2 s per measurement (~3 min); no 3proxy,
#                                          # hev nor iperf3
#   scripts/bench.sh --suite udp           # UDP ASSOCIATE: ringsocks, direct, Dante, 3proxy, hev;
#                                          # 64/1400 B over 1, 8, 2000 associations, 512 B plain over
#                                          # 1 and 8, 3 s each (~7.5 min)
#   scripts/bench.sh --reps 5 --system ringsocks-splice --system direct
#
# Writes results/<date>-<suite>.json, results/<suite>.svg and the suite's block of the generated
# section of results/README.md (pass --no-readme to leave those alone; other suites' blocks are
# kept). Options: `loadgen compare --help`.
# Peers: apt-get install dante-server microsocks iperf3 proxychains4
# 3proxy and hev-socks5-server are built from source outside the repository (loadgen/README.md,
# "compare") and found through these variables (unset: skipped, said in the output and the JSON):
#   export RINGSOCKS_PEER_3PROXY=/work/peers/3proxy-src/bin/3proxy          # make -f Makefile.Linux
#   export RINGSOCKS_PEER_HEV=/work/peers/hev-src/bin/hev-socks5-server      # make
# Their configs are generated into a temp dir: 3proxy `maxconn 4096`, `auth none`,
# `socks -pPORT -i127.0.0.1 -e127.0.0.1` (foreground, no log); hev `workers: 1`, listen and UDP on
# 127.0.0.1, no auth. Both listen on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
cargo build --release -p ringsocks -p loadgen >&2
exec "$target/release/loadgen" compare --ringsocks "$target/release/ringsocks" "$@"
