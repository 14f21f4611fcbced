#!/usr/bin/env bash
# Benchmark worker start-up: a container worker booted from the worker image against a worker
# that must install CRIU at launch (the original's way: a stock machine, then setup commands),
# plus a process worker for reference; and the image's size, the agent's size and its idle
# memory.
#
# Usage: sudo tools/bench-workers.sh
# Env:   BENCH_RUNS  runs per variant; the median is reported (default 5)
#        BENCH_DIR   work folder (default /var/tmp/cedana-bench-workers), results.json left there
#
# Each run is `cedana-driver run` of a tiny job that launches one worker and starts a task; the
# job measures, from inside, how long `launch()` took (worker registered) and how long until the
# task ran. The install-at-launch baseline is the image's container worker plus what installing
# CRIU costs on a fresh machine, measured in the same run: downloading CRIU >= 4.2 and the
# libraries it needs from Debian (`apt-get download`, the packages tools/deps.sh installs) and
# unpacking them (`dpkg -x`). That leaves out apt's dependency resolution and any package
# index update, so it understates the original's path.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need_root "$@"
BENCH_RUNS=${BENCH_RUNS:-5}
BENCH_DIR=${BENCH_DIR:-/var/tmp/cedana-bench-workers}
[[ $BENCH_RUNS =~ ^[1-9][0-9]*$ ]] || { echo "BENCH_RUNS must be a positive integer" >&2; exit 2; }

build_static_agent
say "building cedana-driver (release)"
(cd "$ROOT" && cargo build --release --locked -p cedana-driver >&2)
DRIVER="$ROOT/target/release/cedana-driver"
rm -rf "$BENCH_DIR"
mkdir -p "$BENCH_DIR"
say "building the worker image"
"$ROOT/images/build.sh" --agent "$AGENT_BIN" --out "$BENCH_DIR/image" --json >"$BENCH_DIR/image.json"

cat >"$BENCH_DIR/job.rhai" <<'EOF'
let t0 = timestamp();
let w = launch();
let registered = t0.elapsed;
let t = w.spawn("echo started");
let running = t0.elapsed;
let rss = w.sh("grep VmRSS /proc/$PPID/status | tr -s ' ' | cut -d' ' -f2").stdout;
rss.trim();
t.wait();
print(`RESULT ${registered} ${running} ${rss}`);
0
EOF

# one VARIANT [driver args...]: prints "registered_s running_s rss_kib"
one() {
  local state="$BENCH_DIR/state"
  rm -rf "$state"; mkdir -p "$state"
  CEDANA_STATE_DIR="$state" CEDANA_AGENT_BIN="$AGENT_BIN" CEDANA_CONFIG=/nonexistent/cedana_config.json \
    timeout 120 "$DRIVER" run --checkpoint-every 0 "$@" "$BENCH_DIR/job.rhai" 2>"$BENCH_DIR/last.err" \
    | awk '/^RESULT/ { print $2, $3, $4 }'
}

median() { sort -g | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

declare -A REG RUN RSS
for variant in process container; do
  args=()
  [ "$variant" = container ] && args=(--image "$BENCH_DIR/image/oci")
  : >"$BENCH_DIR/$variant.txt"
  for i in $(seq "$BENCH_RUNS"); do
    r=$(one "${args[@]}" || true)
    [ -n "$r" ] || { cat "$BENCH_DIR/last.err" >&2; echo "bench-workers: $variant run $i failed" >&2; exit 1; }
    echo "$r" >>"$BENCH_DIR/$variant.txt"
  done
  REG[$variant]=$(awk '{ print $1 }' "$BENCH_DIR/$variant.txt" | median)
  RUN[$variant]=$(awk '{ print $2 }' "$BENCH_DIR/$variant.txt" | median)
  RSS[$variant]=$(awk '{ print $3 }' "$BENCH_DIR/$variant.txt" | median)
done

say "installing CRIU the way a stock machine would (download + unpack), $BENCH_RUNS times"
: >"$BENCH_DIR/install.txt"
for i in $(seq "$BENCH_RUNS"); do
  w=$(mktemp -d "$BENCH_DIR/install.XXXXXX")
  s=$(date +%s.%N)
  (cd "$w" && apt-get download -qq -o Dir::Cache::archives="$w" criu/sid libcompel1/sid libc6/sid libnet9/sid libnl-3-200/sid >/dev/null 2>&1 \
     && for d in ./*.deb; do dpkg -x "$d" "$w/root"; done \
     && cp "$AGENT_BIN" "$w/root/cedana-agent")
  e=$(date +%s.%N)
  awk -v s="$s" -v e="$e" 'BEGIN { printf "%.3f\n", e - s }' >>"$BENCH_DIR/install.txt"
  rm -rf "$w"
done
INSTALL=$(median <"$BENCH_DIR/install.txt")

IMG_C=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["compressed_size"])' "$BENCH_DIR/image.json" 2>/dev/null || echo 0)
IMG_U=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["uncompressed_size"])' "$BENCH_DIR/image.json" 2>/dev/null || echo 0)
AGENT_SIZE=$(stat -c %s "$AGENT_BIN")

awk -v pr="${REG[process]}" -v pu="${RUN[process]}" -v cr="${REG[container]}" -v cu="${RUN[container]}" \
    -v inst="$INSTALL" -v prss="${RSS[process]}" -v crss="${RSS[container]}" \
    -v ic="$IMG_C" -v iu="$IMG_U" -v as="$AGENT_SIZE" -v n="$BENCH_RUNS" 'BEGIN {
  printf "\nWorker start-up, medians of %d runs (seconds from launch())\n", n
  printf "%-44s %12s %12s\n", "", "registered", "task running"
  printf "%-44s %12.3f %12.3f\n", "process worker (agent on this machine)", pr, pu
  printf "%-44s %12.3f %12.3f\n", "container worker from the image", cr, cu
  printf "%-44s %12.3f %12.3f\n", "container + installing CRIU at launch", cr + inst, cu + inst
  printf "installing CRIU (download + unpack): %.3f s; image worker is %.1fx faster to a running task\n", inst, (cu + inst) / cu
  printf "image: %.1f MiB compressed, %.1f MiB uncompressed; agent binary %.1f MiB\n", ic / 1048576, iu / 1048576, as / 1048576
  printf "agent daemon idle RSS: %.1f MiB (process worker), %.1f MiB (container worker)\n", prss / 1024, crss / 1024
}' | tee "$BENCH_DIR/summary.txt"
python3 - "$BENCH_DIR" <<EOF
import json, sys
d = sys.argv[1]
json.dump({"runs": $BENCH_RUNS,
           "process": {"registered_s": ${REG[process]}, "running_s": ${RUN[process]}, "rss_kib": ${RSS[process]}},
           "container": {"registered_s": ${REG[container]}, "running_s": ${RUN[container]}, "rss_kib": ${RSS[container]}},
           "install_criu_s": $INSTALL, "image_compressed_bytes": $IMG_C, "image_uncompressed_bytes": $IMG_U,
           "agent_bytes": $AGENT_SIZE}, open(d + "/results.json", "w"), indent=2)
EOF
