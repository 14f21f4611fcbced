#!/usr/bin/env bash
# Throughput into and out of checkpoint stores against plain copies of the same bytes (same
# run): a folder store on ext4 and on tmpfs against `cp -r` of CRIU's images, and moto's S3
# server on loopback against one boto3 upload/download of the same images.
# Usage: sudo tools/bench-store-io.sh [MIB]     (root; CRIU; moto from tools/deps.sh)
set -euo pipefail
MIB=${1:-1024}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
AGENT=${CEDANA_AGENT_BIN:-$ROOT/target/release/cedana-agent}
MOTO=${CEDANA_MOTO_PREFIX:-/opt/cedana/moto}
W=$(mktemp -d /var/tmp/cedana-bench-io-XXXXXX)
T=$(mktemp -d /dev/shm/cedana-bench-io-XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$MOTO/bin/moto_server" -H 127.0.0.1 -p "$PORT" >"$W/moto.log" 2>&1 &
MOTO_PID=$!
PID=""
trap 'kill -9 $MOTO_PID ${PID:-} 2>/dev/null || true; rm -rf "$W" "$T"' EXIT
export AWS_ENDPOINT_URL=http://127.0.0.1:$PORT AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$PORT" && break; sleep 0.1; done
curl -s -X PUT "http://127.0.0.1:$PORT/bench" >/dev/null
cat > "$W/mem.py" <<PY
import os, time
buf = bytearray(os.urandom($MIB << 20))
open("$W/ready", "w").write("1")
while True:
    time.sleep(1)
PY
PID=$("$AGENT" exec --log "$W/mem.log" -- python3 "$W/mem.py" 2>/dev/null)
for _ in $(seq 600); do [ -f "$W/ready" ] && break; sleep 0.1; done
ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
mkdir -p "$T/raw"
criu dump -t "$PID" -D "$T/raw" --leave-running --shell-job -o /dev/null 2>/dev/null
BYTES=$(du -sb "$T/raw" | cut -f1)
printf 'images: %d MiB\n' $((BYTES >> 20))
printf '%-12s %-9s %10s %10s %8s\n' store direction agent_ms copy_ms ratio
row() { printf '%-12s %-9s %10d %10d %8.2f\n' "$1" "$2" "$3" "$4" "$(echo "$3 / $4" | bc -l)"; }
for where in ext4 tmpfs s3; do
  case $where in
    ext4) URL=$W/store; DEST=$W/copy ;;
    tmpfs) URL=$T/store; DEST=$T/copy ;;
    s3) URL=s3://bench/io ;;
  esac
  out=$("$AGENT" dump -p "$PID" --store "$URL" --leave-running --json -d "$W")
  up=$(printf '%s' "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["upload_time"])')
  name=$(printf '%s' "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["name"])')
  if [ "$where" = s3 ]; then
    t=$(date +%s%N); (cd "$T/raw" && tar cf - .) | "$MOTO/bin/python" -c 'import boto3,sys; boto3.client("s3").upload_fileobj(sys.stdin.buffer, "bench", "plain/images.tar")'; cp_up=$(ms "$t")
    t=$(date +%s%N); "$MOTO/bin/python" -c 'import boto3,sys; boto3.client("s3").download_fileobj("bench", "plain/images.tar", open("/dev/null","wb"))'; cp_down=$(ms "$t")
  else
    t=$(date +%s%N); cp -r "$T/raw" "$DEST"; sync -f "$DEST"; cp_up=$(ms "$t")
    t=$(date +%s%N); cp -r "$DEST" "$DEST.back"; cp_down=$(ms "$t"); rm -rf "$DEST" "$DEST.back"
  fi
  row "$where" upload "$up" "$cp_up"
  # Download: the restore's fetch and checks (its verify time), CRIU's part left out.
  kill -STOP "$PID"
  rout=$("$AGENT" restore --store "$URL" "$name" --json --staging-dir "$W") || true
  kill -CONT "$PID"
  rpid=$(printf '%s' "$rout" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("pid",0))')
  down=$(printf '%s' "$rout" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("verify_time",0))')
  [ "$rpid" -gt 0 ] && kill -9 "$rpid" 2>/dev/null || true
  row "$where" download "$down" "$cp_down"
done
