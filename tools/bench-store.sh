#!/usr/bin/env bash
# Periodic checkpoints into a store: bytes sent per checkpoint over bytes changed, and the
# time the task is stopped against raw `criu dump --leave-running` of the same process to tmpfs
# (same run). A Python process holds MIB of random memory and rewrites 10% of it (one
# contiguous tenth, a different one each round) between checkpoints.
# Usage: sudo tools/bench-store.sh [MIB] [ROUNDS] [STORE_URL]   (root; CRIU; the agent built)
set -euo pipefail
MIB=${1:-1024}; ROUNDS=${2:-3}
AGENT=${CEDANA_AGENT_BIN:-$(dirname "$0")/../target/release/cedana-agent}
[ -x "$AGENT" ] || AGENT=$(dirname "$0")/../target/debug/cedana-agent
W=$(mktemp -d /var/tmp/cedana-bench-store-XXXXXX)
TMPFS=$(mktemp -d /dev/shm/cedana-bench-raw-XXXXXX)
STORE=${3:-file://$W/store}
trap 'kill -9 $PID 2>/dev/null || true; rm -rf "$W" "$TMPFS"' EXIT
cat > "$W/mem.py" <<PY
import os, signal, time
n = $MIB << 20
buf = bytearray(os.urandom(n))
r = [0]
def rewrite(*_):
    tenth = n // 10
    at = (r[0] % 10) * tenth
    buf[at:at + tenth] = os.urandom(tenth)
    r[0] += 1
    open("$W/rewritten", "w").write(str(r[0]))
signal.signal(signal.SIGUSR1, rewrite)
open("$W/ready", "w").write("1")
while True:
    time.sleep(0.05)
PY
PID=$("$AGENT" exec --log "$W/mem.log" -- python3 "$W/mem.py" 2>/dev/null)
for _ in $(seq 600); do [ -f "$W/ready" ] && break; sleep 0.1; done
printf 'round  sent_MiB  changed_MiB  sent/changed  frozen_ms  raw_criu_ms  frozen/raw\n'
for round in $(seq 0 "$ROUNDS"); do
  if [ "$round" -gt 0 ]; then
    kill -USR1 "$PID"
    for _ in $(seq 600); do [ "$(cat "$W/rewritten" 2>/dev/null)" = "$round" ] && break; sleep 0.05; done
  fi
  out=$("$AGENT" dump -p "$PID" --store "$STORE" --leave-running --json -d "$W")
  rm -rf "$TMPFS"/*
  t0=$(date +%s%N); criu dump -t "$PID" -D "$TMPFS" --leave-running --shell-job -o /dev/null 2>/dev/null || true; t1=$(date +%s%N)
  python3 - "$out" "$round" "$MIB" $(( (t1 - t0) / 1000000 )) <<'PY'
import json, sys
o = json.loads(sys.argv[1]); rnd = int(sys.argv[2]); mib = int(sys.argv[3]); raw = int(sys.argv[4])
changed = mib / 10 if rnd else mib
sent = o["raw_sent"] / 2**20
print(f"{rnd:5d}  {sent:8.1f}  {changed:11.1f}  {sent / changed:12.2f}  {o['frozen_time']:9d}  {raw:11d}  {o['frozen_time'] / max(raw, 1):10.2f}")
PY
done
