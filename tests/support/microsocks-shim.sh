#!/usr/bin/env bash
# Test-harness validation only: make microsocks look like ringsocks' CLI/readiness
# contract so the e2e harness can be exercised before the relay works:
#   RINGSOCKS_TEST_BIN=$PWD/tests/support/microsocks-shim.sh cargo test --test e2e curl::
# Supports --listen 127.0.0.1:PORT (PORT may be 0), --user N:P, --users FILE
# (refused if group/other readable); other ringsocks flags are accepted and ignored.
set -euo pipefail
host=127.0.0.1 port=0 user="" pass=""
while [ $# -gt 0 ]; do
  case "$1" in
    --listen) host="${2%:*}"; port="${2##*:}"; shift 2 ;;
    --user) user="${2%%:*}"; pass="${2#*:}"; shift 2 ;;
    --users)
      mode=$(stat -c %a "$2")
      if [ $(( 8#$mode & 8#077 )) -ne 0 ]; then
        echo "error: users file $2 is mode $mode; must not be group/other readable" >&2
        exit 2
      fi
      line=$(head -n1 "$2"); user="${line%%:*}"; pass="${line#*:}"; shift 2 ;;
    --*) shift 2 ;;
    *) shift ;;
  esac
done
if [ "$port" = 0 ]; then
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
fi
args=(-i "$host" -p "$port")
[ -n "$user" ] && args+=(-u "$user" -P "$pass")
microsocks "${args[@]}" >&2 &
ms=$!
shim=$$
# If this shim is killed, take our microsocks child with it (by its PID).
( while kill -0 "$shim" 2>/dev/null; do sleep 0.2; done; kill "$ms" 2>/dev/null ) &
trap 'kill -TERM "$ms" 2>/dev/null' TERM INT
for _ in $(seq 1 200); do
  if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then break; fi
  sleep 0.02
done
echo "listening $host:$port"
wait "$ms" || true
wait "$ms"
