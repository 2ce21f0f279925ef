#!/usr/bin/env bash
# CI performance regression check. Runs two short suites of `loadgen compare`:
# - `ci` (ringsocks splice and copy, direct loopback, microsocks if installed; ~3 min on 2
#   cores), checked against results/baseline.json;
# - `udp-ci` (ringsocks and direct loopback, UDP ASSOCIATE 64 and 1400 B over 8 associations
#   x 16 in flight; ~1 min), checked against results/baseline-udp.json;
# and fails when a ratio of ringsocks to a reference measured in the same run (direct
# loopback, microsocks) is worse than in the baseline by more than that figure's tolerance
# (documented in the baseline). Only ratios are compared, never absolute numbers. The checked
# runs have `--metrics` and `--access-log` on (RINGSOCKS_EXTRA_ARGS); the baselines were
# taken without them, so the check also says what they cost.
#
#   scripts/perf-check.sh                    # check (exit 1 with a table of what regressed)
#   scripts/perf-check.sh --update-baseline  # 3 runs of each suite -> both baselines (on purpose only)
#
# The machine is noisy: a failed check is re-run once (PERF_CHECK_ATTEMPTS, default 2) and
# fails only if every attempt fails; a real regression fails every time.
# Outputs go to $CARGO_TARGET_DIR/bench/ (default target/bench/), never into results/
# (except --update-baseline, which writes the baselines).
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
out="$target/bench"
mkdir -p "$out"
cargo build --release -p ringsocks -p loadgen
loadgen="$target/release/loadgen"
suite() { "$loadgen" compare --suite "$1" --no-readme --ringsocks "$target/release/ringsocks" --json "$2"; }
baseline_of() { if [ "$1" = ci ]; then echo results/baseline.json; else echo results/baseline-udp.json; fi; }
if [ "${1:-}" = --update-baseline ]; then
  for s in ci udp-ci; do
    runs=()
    for i in 1 2 3; do
      suite "$s" "$out/$s-baseline-$i.json" >/dev/null
      runs+=("$out/$s-baseline-$i.json")
    done
    "$loadgen" baseline --out "$(baseline_of "$s")" "${runs[@]}"
  done
  echo "review the tolerances against the observed variation, then commit the baselines"
  exit 0
fi
attempts=${PERF_CHECK_ATTEMPTS:-2}
# The check runs ringsocks as operators do: metrics served and every request in the access log.
export RINGSOCKS_EXTRA_ARGS="--metrics 127.0.0.1:0 --access-log $out/access.log"
check() {
  local s=$1 i start
  for i in $(seq "$attempts"); do
    start=$(date +%s)
    suite "$s" "$out/$s-latest.json" >/dev/null
    echo "$s suite took $(( $(date +%s) - start )) s"
    if "$loadgen" check --baseline "$(baseline_of "$s")" --current "$out/$s-latest.json"; then
      return 0
    fi
    if [ "$i" -lt "$attempts" ]; then
      echo "perf check of $s failed (attempt $i of $attempts); running the suite again"
    fi
  done
  echo "perf check of $s FAILED on every attempt: see the tables above" >&2
  return 1
}
check ci
check udp-ci
