#!/usr/bin/env bash
# Side-by-side suite: ringsocks (--forward auto, splice and copy), direct loopback, Dante and
# microsocks, measured with `loadgen compare` (relays on CPU 0, load on CPU 1, order of
# systems rotated every repetition, medians). Peers that are not installed are skipped.
#
#   scripts/bench.sh                       # full suite: ~5 s per measurement, 3 reps (~10 min)
#   scripts/bench.sh --suite ci            # short suite (CI): 2 s per measurement (~3 min)
#   scripts/bench.sh --suite udp           # UDP ASSOCIATE: ringsocks, direct, Dante; 64/1400 B
#                                          # over 1, 8, 2000 associations, 3 s each (~3.5 min)
#   scripts/bench.sh --reps 5 --system ringsocks-splice --system direct
#
# Writes results/<date>-<suite>.json, results/<suite>.svg and the suite's block of the generated
# section of results/README.md (pass --no-readme to leave those alone; other suites' blocks are
# kept). Options: `loadgen compare --help`.
# Peers: apt-get install dante-server microsocks
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
cargo build --release -p ringsocks -p loadgen >&2
exec "$target/release/loadgen" compare --ringsocks "$target/release/ringsocks" "$@"
