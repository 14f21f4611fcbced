#!/usr/bin/env bash
# What `exec --userns` costs: dump and restore of the same process started with plain `exec`
# (the baseline, in the same run) and with `exec --userns`, on the folder given (ext4 by
# default; BENCH_DIR=/dev/shm/... for tmpfs). Median of BENCH_RUNS runs; the ratios are
# userns over plain.
#
#   sudo BENCH_MB=256 BENCH_RUNS=3 tools/bench-userns.sh
set -euo pipefail

AGENT=${CEDANA_AGENT:-target/release/cedana-agent}
MB=${BENCH_MB:-256}
RUNS=${BENCH_RUNS:-3}
DIR=${BENCH_DIR:-/var/tmp/cedana-bench-userns}
[ -x "$AGENT" ] || { echo "no agent at $AGENT: cargo build --release -p cedana-agent" >&2; exit 1; }
AGENT=$(realpath "$AGENT")
mkdir -p "$DIR"
cat > "$DIR/mem.py" <<EOF
import os, time
b = bytearray(os.urandom($MB << 20))
print("ready", flush=True)
i = 0
while True:
    i += 1
    b[i % len(b)] = i & 255
    time.sleep(0.01)
EOF

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

declare -A DUMP RESTORE
for mode in plain userns; do
  dumps=(); restores=()
  for _ in $(seq "$RUNS"); do
    rm -f "$DIR"/*.zip "$DIR/mem.log"
    flag=(); [ "$mode" = userns ] && flag=(--userns)
    pid=$("$AGENT" exec "${flag[@]}" --log "$DIR/mem.log" --cwd "$DIR" -- python3 "$DIR/mem.py" 2>/dev/null)
    for _ in $(seq 300); do grep -q ready "$DIR/mem.log" 2>/dev/null && break; sleep 0.1; done
    t0=$(now); zip=$("$AGENT" dump -p "$pid" -d "$DIR" 2>/dev/null); t1=$(now)
    sleep 0.5
    t2=$(now); rpid=$("$AGENT" restore "$zip" 2>/dev/null); t3=$(now)
    kill -9 "$rpid" 2>/dev/null || true
    sleep 0.3
    dumps+=("$(echo "$t1 - $t0" | bc)"); restores+=("$(echo "$t3 - $t2" | bc)")
  done
  DUMP[$mode]=$(printf '%s\n' "${dumps[@]}" | median)
  RESTORE[$mode]=$(printf '%s\n' "${restores[@]}" | median)
  echo "$mode: dump ${dumps[*]} restore ${restores[*]}" >&2
done
rm -rf "$DIR"
printf '%-8s %10s %10s\n' "" "dump s" "restore s"
for mode in plain userns; do
  printf '%-8s %10.3f %10.3f\n' "$mode" "${DUMP[$mode]}" "${RESTORE[$mode]}"
done
printf '%-8s %9.2fx %9.2fx\n' "ratio" "$(echo "${DUMP[userns]} / ${DUMP[plain]}" | bc -l)" \
  "$(echo "${RESTORE[userns]} / ${RESTORE[plain]}" | bc -l)"
