#!/usr/bin/env bash
# Single-stream TCP throughput through SOCKS5 relays, measured with iperf3 through proxychains4.
# Relay pinned to CPU 0 (one shard / one worker), iperf3 client and server pinned to CPU 1.
# Order of systems rotates each repetition; the median of REPS runs is reported.
#
#   scripts/iperf-proxychains.sh [REPS] [SECONDS]      (needs: iperf3 proxychains4 microsocks)
#
# Prints a markdown table and writes the raw runs to results/<date>-iperf-single-stream.json.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${1:-5}
SECS=${2:-5}
BIN=target/release/ringsocks
IPERF_PORT=15201
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT

for t in iperf3 proxychains4 microsocks; do
  command -v "$t" >/dev/null || { echo "missing $t (apt-get install iperf3 proxychains4 microsocks)" >&2; exit 1; }
done
cargo build --release --bin ringsocks >/dev/null

taskset -c 1 iperf3 -s -p $IPERF_PORT >/dev/null 2>&1 & pids+=($!)
taskset -c 0 microsocks -i 127.0.0.1 -p 11081 >/dev/null 2>&1 & pids+=($!)
declare -A port=([microsocks]=11081)
for mode in splice copy auto; do
  # Started here, not in a $(...) subshell, so that the cleanup trap knows the PID.
  taskset -c 0 "$BIN" --listen 127.0.0.1:0 --shards 1 --forward "$mode" --log-level warn >"$tmp/$mode.out" 2>"$tmp/$mode.err" &
  pids+=($!)
  for _ in $(seq 50); do grep -q '^listening' "$tmp/$mode.out" 2>/dev/null && break; sleep 0.1; done
  port[ringsocks-$mode]=$(sed -n 's/^listening .*:\([0-9]*\)$/\1/p' "$tmp/$mode.out")
done
sleep 0.5

gbps() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(round(d["end"]["sum_received"]["bits_per_second"]/1e9,3))'; }
run() { # system -> Gbit/s
  if [ "$1" = direct ]; then
    taskset -c 1 iperf3 -c 127.0.0.1 -p $IPERF_PORT -t "$SECS" -J | gbps
  else
    printf 'strict_chain\nquiet_mode\ntcp_read_time_out 15000\ntcp_connect_time_out 8000\n[ProxyList]\nsocks5 127.0.0.1 %s\n' "${port[$1]}" >"$tmp/pc.conf"
    taskset -c 1 proxychains4 -q -f "$tmp/pc.conf" iperf3 -c 127.0.0.1 -p $IPERF_PORT -t "$SECS" -J | gbps
  fi
}
systems=(direct microsocks ringsocks-splice ringsocks-copy ringsocks-auto)
declare -A runs
for r in $(seq "$REPS"); do
  n=${#systems[@]}
  for i in $(seq 0 $((n - 1))); do
    s=${systems[$(((i + r) % n))]}
    v=$(run "$s")
    runs[$s]="${runs[$s]:-} $v"
    echo "rep $r $s $v Gbit/s" >&2
  done
done
out="results/$(date +%Y-%m-%d-%H%M)-iperf-single-stream.json"
python3 - "$out" "$REPS" "$SECS" "$(uname -r)" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  "direct=${runs[direct]}" "microsocks=${runs[microsocks]}" \
  "ringsocks-splice=${runs[ringsocks-splice]}" "ringsocks-copy=${runs[ringsocks-copy]}" "ringsocks-auto=${runs[ringsocks-auto]}" <<'PY'
import json, statistics, sys
out, reps, secs, kernel, rev = sys.argv[1:6]
runs = {k: [float(x) for x in v.split()] for k, v in (a.split("=", 1) for a in sys.argv[6:])}
med = {k: statistics.median(v) for k, v in runs.items()}
doc = {"suite": "iperf-single-stream", "command": f"scripts/iperf-proxychains.sh {reps} {secs}",
       "kernel": kernel, "git": rev, "pinning": "relay CPU 0 (1 shard/worker), iperf3 CPU 1",
       "unit": "Gbit/s", "runs": runs, "median": med}
json.dump(doc, open(out, "w"), indent=2)
print("| system | median Gbit/s | x direct | x microsocks | runs |")
print("|---|---|---|---|---|")
for k in ["direct", "ringsocks-splice", "ringsocks-copy", "ringsocks-auto", "microsocks"]:
    print(f"| {k} | {med[k]:.2f} | {med[k]/med['direct']:.2f} | {med[k]/med['microsocks']:.2f} | {' '.join(f'{x:.2f}' for x in runs[k])} |")
print(f"\nwritten {out}", file=sys.stderr)
PY
