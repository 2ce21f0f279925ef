#!/usr/bin/env bash
# Coverage-guided fuzzing on the stable toolchain (libFuzzer through libfuzzer-sys, built with
# the instrumentation flags `cargo fuzz build -s none` would pass; no nightly, no cargo-fuzz).
#
#   scripts/fuzz.sh [SECONDS]          # every target for SECONDS each (default 60)
#   scripts/fuzz.sh 600 handshake      # one target
#
# Targets (fuzz/fuzz_targets): decoders, handshake, udp_burst, proxy_header. Each run starts
# from the committed seed corpus fuzz/corpus/<target> (read-only here: new inputs go to a temp
# dir, so a CI clone stays clean) and fails on the first crash, leaving the input in that temp
# dir and printing how to reproduce it. Refresh the committed seeds with scripts/fuzz.sh --merge.
set -euo pipefail
cd "$(dirname "$0")/.."
merge=0
if [ "${1:-}" = "--merge" ]; then merge=1; shift; fi
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(decoders handshake udp_burst proxy_header)
triple=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-fuzz/target}
cargo build --release --manifest-path fuzz/Cargo.toml --target "$triple" \
  $(printf -- '--bin %s ' "${targets[@]}")
work=$(mktemp -d /tmp/ringsocks-fuzz.XXXXXX)
for t in "${targets[@]}"; do
  bin="$CARGO_TARGET_DIR/$triple/release/$t"
  seeds="fuzz/corpus/$t"
  mkdir -p "$seeds" "$work/$t/new" "$work/$t/crash"
  echo "== $t: ${secs}s from $(ls "$seeds" | wc -l) seeds"
  if ! "$bin" -max_total_time="$secs" -print_final_stats=1 -artifact_prefix="$work/$t/crash/" \
      "$work/$t/new" "$seeds" 2>"$work/$t/log"; then
    tail -n 40 "$work/$t/log"
    echo "FUZZ FAILURE in $t: input(s) in $work/$t/crash/; reproduce with $bin <input>" >&2
    exit 1
  fi
  grep -E "^stat::number_of_executed_units|^stat::new_units_added" "$work/$t/log" | tr '\n' ' '
  echo
  if [ "$merge" = 1 ]; then
    mkdir -p "$work/$t/merged"
    "$bin" -merge=1 "$work/$t/merged" "$seeds" "$work/$t/new" 2>/dev/null
    rm -rf "$seeds" && mv "$work/$t/merged" "$seeds"
    echo "   merged corpus: $(ls "$seeds" | wc -l) inputs in $seeds"
  fi
done
rm -rf "$work"
