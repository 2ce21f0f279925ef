#!/usr/bin/env bash
# Test-harness validation only: make Dante's danted look like ringsocks' CLI/readiness
# contract, so that the UDP ASSOCIATE tests can be checked against a reference server:
#   RINGSOCKS_TEST_BIN=$PWD/tests/support/dante-shim.sh cargo test --release --test e2e udp::
# Supports --listen ADDR:PORT (127.0.0.1:0, 0.0.0.0:0, [::1]:0, [::]:0; PORT may be 0);
# every other ringsocks flag is accepted and ignored. Dante gets a temporary danted.conf
# with the internal side on the listen address, external sides on 127.0.0.1 and ::1, no
# authentication and pass rules for connect, bind and UDP (udpassociate, udpreply).
# The shim execs danted, so the PID the harness kills is danted's own (its helper
# processes exit when their mother does).
set -euo pipefail
listen=127.0.0.1:0
while [ $# -gt 0 ]; do
  case "$1" in
    --listen) listen="$2"; shift 2 ;;
    --*) shift 2 ;;
    *) shift ;;
  esac
done
port="${listen##*:}"
host="${listen%:*}"
host="${host#[}"
host="${host%]}"
case "$host" in
  *:*) fam=6 ;;
  *) fam=4 ;;
esac
if [ "$port" = 0 ]; then
  port=$(python3 -c '
import socket, sys
fam = socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET
s = socket.socket(fam)
s.bind((sys.argv[2], 0))
print(s.getsockname()[1])' "$fam" "$host")
fi
if [ "$fam" = 6 ]; then
  shown="[$host]:$port"
  probe="::1"
  [ "$host" != "::" ] && probe="$host"
else
  shown="$host:$port"
  probe="127.0.0.1"
  [ "$host" != "0.0.0.0" ] && probe="$host"
fi
dir=$(mktemp -d "${TMPDIR:-/tmp}/dante-shim.XXXXXX")
conf="$dir/danted.conf"
cat >"$conf" <<EOF
logoutput: stderr
internal: $host port = $port
external: 127.0.0.1
external: ::1
socksmethod: none
clientmethod: none
user.privileged: root
user.unprivileged: nobody
client pass { from: 0/0 to: 0/0 }
socks pass { from: 0/0 to: 0/0 command: bind connect udpassociate bindreply udpreply }
EOF
# Readiness: print the contract line once the TCP port accepts connections.
(
  for _ in $(seq 1 500); do
    if (exec 3<>"/dev/tcp/$probe/$port") 2>/dev/null; then
      echo "listening $shown"
      exit 0
    fi
    sleep 0.02
  done
  echo "dante-shim: danted did not open $shown" >&2
) &
exec danted -N 1 -f "$conf"
