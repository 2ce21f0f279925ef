#!/bin/sh
# Runs inside a fresh network namespace (`unshare -n`), for tests/e2e/udp.rs: gives 127.0.0.77 a
# route MTU of 1,300 bytes, starts the relay, and has udp_gso.py send GSO bursts of 1,400-byte
# datagrams to a target there. The kernel refuses GSO segments above the route MTU, so the
# relay must fall back to one send per datagram (and say so in its debug log).
#
#   unshare -n sh gso_fallback.sh RELAY_BIN PYTHON UDP_GSO_PY LOGFILE
set -eu
relay=$1 py=$2 script=$3 log=$4
ip link set lo up
ip route add local 127.0.0.77/32 dev lo table local mtu lock 1300
out=$(mktemp)
"$relay" --listen 127.0.0.1:0 --shards 1 --log-level debug >"$out" 2>"$log" &
pid=$!
i=0
until grep -q '^listening ' "$out"; do
    i=$((i + 1))
    if [ $i -gt 100 ]; then
        echo "FAIL relay did not start"; kill $pid; exit 1
    fi
    sleep 0.05
done
addr=$(awk '/^listening /{print $2; exit}' "$out")
rc=0
timeout 60 "$py" "$script" fallback --proxy "$addr" --target-ip 127.0.0.77 || rc=$?
kill $pid
wait $pid || true
rm -f "$out"
exit $rc
