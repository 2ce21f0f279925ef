#!/usr/bin/env bash
# CI performance regression check. Runs the short `ci` suite of `loadgen compare`
# (ringsocks splice and copy, direct loopback, microsocks if installed; ~3 min on 2 cores)
# and fails when a ratio of ringsocks to a reference measured in the same run (direct
# loopback, microsocks) is worse than in results/baseline.json by more than that figure's
# tolerance (documented in the baseline). Only ratios are compared, never absolute numbers.
#
#   scripts/perf-check.sh                    # check (exit 1 with a table of what regressed)
#   scripts/perf-check.sh --update-baseline  # 3 ci runs -> results/baseline.json (on purpose only)
#
# The machine is noisy: a failed check is re-run once (PERF_CHECK_ATTEMPTS, default 2) and
# fails only if every attempt fails; a real regression fails every time.
# Outputs go to $CARGO_TARGET_DIR/bench/ (default target/bench/), never into results/
# (except --update-baseline, which writes results/baseline.json).
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
out="$target/bench"
mkdir -p "$out"
cargo build --release -p ringsocks -p loadgen
loadgen="$target/release/loadgen"
suite() { "$loadgen" compare --suite ci --no-readme --ringsocks "$target/release/ringsocks" --json "$1"; }

if [ "${1:-}" = --update-baseline ]; then
  runs=()
  for i in 1 2 3; do
    suite "$out/ci-baseline-$i.json" >/dev/null
    runs+=("$out/ci-baseline-$i.json")
  done
  "$loadgen" baseline --out results/baseline.json "${runs[@]}"
  echo "review the tolerances against the observed variation, then commit results/baseline.json"
  exit 0
fi

attempts=${PERF_CHECK_ATTEMPTS:-2}
for i in $(seq "$attempts"); do
  start=$(date +%s)
  suite "$out/ci-latest.json" >/dev/null
  echo "ci suite took $(( $(date +%s) - start )) s"
  if "$loadgen" check --baseline results/baseline.json --current "$out/ci-latest.json"; then
    exit 0
  fi
  if [ "$i" -lt "$attempts" ]; then
    echo "perf check failed (attempt $i of $attempts); running the suite again"
  fi
done
echo "perf check FAILED on every attempt: see the tables above" >&2
exit 1
