#!/usr/bin/env bash
# Soak: mixed load through ringsocks for DURATION, failing on leaks or corruption.
#
#   scripts/soak.sh 120                         # 2 minutes (CI), output in a temp dir
#   scripts/soak.sh 1800 results/2026-12-02-soak-30m
#
# Starts the relay (release build, --stats-interval 2s, 2 shards) on 127.0.0.1 and runs
# scripts/soak.py against it: bulk TCP both ways with checksums, connection churn, UDP
# ASSOCIATE with checked echoes, 200 idle tunnels, and clients and targets that reset
# mid-stream. Samples the relay's RSS, fd count, fixed-file slots, pipes, ops in flight and
# buffers held every 5 s; fails if any grows after the warm-up or a transfer was corrupted.
# Writes samples.csv, chart.svg, summary.json and relay.log to the output directory.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:?usage: scripts/soak.sh DURATION_SECONDS [OUT_DIR]}
out=${2:-$(mktemp -d /tmp/ringsocks-soak.XXXXXX)}
mkdir -p "$out"
target=${CARGO_TARGET_DIR:-target}
bin=${RINGSOCKS_BIN:-$target/release/ringsocks}
[ -n "${RINGSOCKS_BIN:-}" ] || cargo build --release -p ringsocks >&2
log="$out/relay.log"
"$bin" --listen 127.0.0.1:0 --shards 2 --stats-interval 2s \
  --log-level info >"$log" 2>&1 &
relay=$!
trap 'kill "$relay" 2>/dev/null || true; wait "$relay" 2>/dev/null || true' EXIT
addr=
for _ in $(seq 100); do
  addr=$(sed -n 's/^listening \(.*\)$/\1/p' "$log" | head -n1)
  [ -n "$addr" ] && break
  sleep 0.1
done
[ -n "$addr" ] || { echo "relay did not start:" >&2; cat "$log" >&2; exit 1; }
echo "soak: ringsocks pid $relay on $addr for ${secs}s; output in $out"
python3 scripts/soak.py --relay "$addr" --pid "$relay" --log "$log" --duration "$secs" \
  --interval 5 --out "$out"
