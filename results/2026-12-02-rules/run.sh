#!/bin/bash
# Connection rate with 0, 1 and 10,000 rules: relay on CPU 0 (one shard), loadgen on CPU 1.
set -u
BIN=/work/main/target/release
out=/tmp/rb/out.txt

for rep in 4 5 6 7 8; do
  for cfg in mixed10k cidr10k one none; do
    port=$((19500 + RANDOM % 400))
    taskset -c 0 $BIN/ringsocks --config /tmp/rb/$cfg.toml --shards 1 --listen 127.0.0.1:$port --log-level warn > /tmp/rb/relay.out 2>/tmp/rb/relay.err &
    pid=$!
    for i in $(seq 50); do grep -q listening /tmp/rb/relay.out && break; sleep 0.1; done
    r=$($BIN/loadgen tcp-cps --proxy 127.0.0.1:$port --pid $pid --cpu 1 --duration 5 --warmup 1 -q --json - 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin); r=d["results"]; print(r["conns_per_sec"], r["failures"]["count"], round(d["relay_cpu"]["per_conn"]*1e6,1))')
    echo "$rep $cfg $r" | tee -a $out
    kill $pid; wait $pid 2>/dev/null
  done
done
