#!/usr/bin/env bash
# Benchmark moving a task between two local agent daemons through the NATS object store,
# against raw CRIU (dump, cp -r, restore) in the same run; plus the time from
# `cedana-driver run` to the task running and a command's round trip through NATS.
#
# Variants per kind of memory and run: raw-criu; cedana-none and cedana-zstd (Prefetch to w2,
# Checkpoint {leave_running: false} to w1, Restore to w2, through the object store: w2 reads
# the checkpoint while it is stored, as the driver moves a task between machines);
# cedana-none-after and cedana-zstd-after (no Prefetch: w2 reads it once stored, as the driver
# moves a task between two local workers); shared-none and shared-zstd (the same between
# daemons started with --shared-storage: no object store); store-lazy and store-full (daemons
# started with --store, a folder: the checkpoint goes there as chunks, and the restoring
# worker restores it lazily, the task running before its memory is back, or with
# --full-restore); store-postcopy (the same daemons, as the driver moves a task between
# workers with a store: the checkpoint is answered once its manifest is published, and the
# restore starts while its chunks are still being stored).
# The `store` section times the object store alone (put and get of one file, as the daemon
# does and as async-nats's put and get do), with CPU time.
#
# Usage: sudo tools/bench-migrate.sh [SECTION...]   (ping migrate store driver; default all)
# Env:   BENCH_MB           memory the test process holds, MiB (default 1024)
#        BENCH_RUNS         migrations per variant and kind; medians are reported (default 1)
#        BENCH_KINDS        "random compressible" (default), or one of them
#        BENCH_VARIANTS     migration variants besides raw-criu (default "none zstd none-after
#                           zstd-after shared-none shared-zstd store-lazy store-full store-postcopy")
#        BENCH_PINGS        pings timed (default 200, after 20 untimed)
#        BENCH_DRIVER_RUNS  `cedana-driver run` repetitions (default 5)
#        BENCH_DIR          work folder on disk, not tmpfs (default /var/tmp/cedana-bench-migrate);
#                           results.json is left there, everything else is removed on exit
#        BENCH_NO_BUILD=1   use the release binaries already in target/release
#        BENCH_KEEP_LOGS=DIR  copy the daemons' logs there before the work folder goes
set -euo pipefail

BENCH_MB=${BENCH_MB:-1024}
BENCH_RUNS=${BENCH_RUNS:-1}
BENCH_DIR=${BENCH_DIR:-/var/tmp/cedana-bench-migrate}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() { echo "bench-migrate: $*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "must run as root (CRIU needs it)"
[[ $BENCH_MB =~ ^[1-9][0-9]*$ && $BENCH_RUNS =~ ^[1-9][0-9]*$ ]] || die "BENCH_MB and BENCH_RUNS must be positive integers"
CRIU=$(command -v criu) || die "criu not found on PATH"
for t in nats-server python3 cp timeout; do command -v "$t" >/dev/null || die "$t not found"; done
[[ -x /usr/bin/python3 ]] || die "the test process runs /usr/bin/python3, which is missing"

if [[ ${BENCH_NO_BUILD:-} != 1 ]]; then
    echo "building cedana-agent, cedana-driver and bench-migrate (release)..." >&2
    (cd "$REPO" && cargo build --release --quiet -p cedana-agent -p cedana-driver &&
        cargo build --release --quiet -p cedana-tests --bin bench-migrate)
fi

mkdir -p "$BENCH_DIR"
[[ $(stat -f -c %T "$BENCH_DIR") != tmpfs ]] || die "BENCH_DIR=$BENCH_DIR is on tmpfs; use a folder on disk"
WORK=$(mktemp -d "$BENCH_DIR/work.XXXXXX")
PIDS=$WORK/pids          # "PID STARTTIME" of every process the benchmark started
OUT=$WORK/results.jsonl

# Kills what the benchmark left running (after a failure), but only processes whose start time
# is still the one noted: a PID handed to an unrelated process since is left alone.
cleanup() {
    local pid start now
    if [[ -s $PIDS ]]; then
        while read -r pid start; do
            now=$(awk '{ sub(/.*\) /, ""); print $20 }' "/proc/$pid/stat" 2>/dev/null) || continue
            [[ $now == "$start" ]] && kill -KILL "$pid" 2>/dev/null || true
        done <"$PIDS"
    fi
    [[ -n ${BENCH_KEEP_LOGS:-} ]] && cp "$WORK"/*.log "$BENCH_KEEP_LOGS"/ 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Private copies: target/ is shared, and a rebuild during the run must not swap a binary.
for b in cedana-agent cedana-driver bench-migrate; do
    [[ -x $REPO/target/release/$b ]] || die "$REPO/target/release/$b is missing (unset BENCH_NO_BUILD)"
    cp "$REPO/target/release/$b" "$WORK/$b"
done
REV=$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=$(cd "$REPO" && git status --porcelain --untracked-files=no 2>/dev/null | awk '{print $2}' | tr '\n' ' ')
echo "migration benchmark: ${BENCH_MB} MiB, ${BENCH_RUNS} run(s), commit $REV${DIRTY:+ (modified: $DIRTY)}, criu $CRIU ($("$CRIU" --version | awk 'NR==1 {print $2}')), $(nats-server --version), load $(cut -d' ' -f1-3 /proc/loadavg)" >&2

# The run's limit: every step inside is bounded too; this catches anything else.
BENCH_DIR=$WORK BENCH_PIDS=$PIDS BENCH_MB=$BENCH_MB BENCH_RUNS=$BENCH_RUNS \
    CEDANA_AGENT_BIN=$WORK/cedana-agent CEDANA_DRIVER_BIN=$WORK/cedana-driver CEDANA_CRIU=$CRIU \
    timeout -k 30 $((3600 + BENCH_RUNS * BENCH_MB * 4)) "$WORK/bench-migrate" "$@" >"$OUT" || {
    for f in "$WORK"/w1.log "$WORK"/w2.log "$WORK"/driver/driver*.log; do
        [[ -f $f ]] && cp "$f" "$BENCH_DIR/failed-$(basename "$f")"
    done
    die "the benchmark failed; the daemons' and drivers' logs are in $BENCH_DIR/failed-*.log"
}

echo "load at the end: $(cut -d' ' -f1-3 /proc/loadavg) (1, 5, 15 min; this machine has $(nproc) CPUs)" >&2

python3 - "$OUT" "$BENCH_DIR/results.json" "$BENCH_MB" "$BENCH_RUNS" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
out, mb, runs = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
med = statistics.median
res = {"bench_mb": mb, "runs": runs, "rows": rows}

def p(q, xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]

mig = [r for r in rows if r["section"] == "migrate"]
for kind in dict.fromkeys(r["kind"] for r in mig):
    by = {}
    for r in mig:
        if r["kind"] == kind:
            by.setdefault(r["variant"], []).append(r)
    m = {v: {k: med(r.get(k, 0.0) for r in rs) for k in ("downtime", "checkpoint", "restore", "total", "gap", "bytes", "cpu", "cpu_nats")}
         for v, rs in by.items()}
    parts = {}
    for v, rs in by.items():
        have = [r["parts"] for r in rs if r.get("parts")]
        parts[v] = {k: med(p_[k] for p_ in have) for k in (have[0] if have else {})}
        # What the parts do not cover (messages, waits), run by run.
        if have:
            parts[v]["rest"] = med(r["downtime"] - sum(r["parts"].values()) for r in rs if r.get("parts"))
    base = m["raw-criu"]
    print(f"\n### {kind} memory, {mb} MiB (median of {runs})\n")
    print("| variant | downtime s | vs raw | task's own gap s | checkpoint s | restore s | first output s | size MiB | CPU s | of which nats-server |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for v, x in m.items():
        x["vs_raw"] = x["downtime"] / base["downtime"]
        print(f"| {v} | {x['downtime']:.2f} | {x['vs_raw']:.2f}x | {x['gap']:.2f} | {x['checkpoint']:.2f} "
              f"| {x['restore']:.2f} | {x['total']:.2f} | {x['bytes'] / 2**20:.1f} | {x['cpu']:.2f} | {x['cpu_nats']:.2f} |")
    names = ["to_w1", "criu_dump", "archive", "upload", "copy", "download", "verify", "put_back", "criu_restore"]
    print("\nParts of the downtime, s (from the daemons' log timestamps; raw: each command):\n")
    print("| variant | " + " | ".join(names) + " | rest |")
    print("|---|" + "---:|" * (len(names) + 1))
    for v, ps in parts.items():
        print(f"| {v} | " + " | ".join(f"{abs(ps[n]) if abs(ps[n]) < 0.005 else ps[n]:.2f}" if n in ps else "" for n in names + ["rest"]) + " |")
    for v in m:
        if v != "raw-criu":
            ok = "met" if m[v]["vs_raw"] <= 1.5 else "NOT met"
            print(f"\n{v} downtime vs raw CRIU: {m[v]['vs_raw']:.2f}x (target <= 1.5x: {ok})", end="")
    print()
    res.setdefault("migrate", {})[kind] = {"medians": m, "parts": parts}

store = {}
for r in rows:
    if r["section"] == "store":
        store.setdefault(r["step"], []).append(r)
if store:
    n = max(len(v) for v in store.values())
    print(f"\n### object store alone, {mb} MiB of random bytes (median of {n})\n")
    print("| step | s | MiB/s | min s | max s | CPU s (client) | CPU s (nats-server) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    res["store"] = {}
    for step, rs in store.items():
        xs = [r["s"] for r in rs]
        c = med(r.get("cpu", 0.0) for r in rs)
        cn = med(r.get("cpu_nats", 0.0) for r in rs)
        res["store"][step] = {"s": med(xs), "cpu": c, "cpu_nats": cn}
        print(f"| {step} | {med(xs):.2f} | {mb / med(xs):.0f} | {min(xs):.2f} | {max(xs):.2f} | {c:.2f} | {cn:.2f} |")

ping = [x for r in rows if r["section"] == "ping" for x in r["ms"]]
if ping:
    res["ping_ms"] = {"median": med(ping), "p99": p(0.99, ping), "min": min(ping), "max": max(ping), "n": len(ping)}
    q = res["ping_ms"]
    print(f"\n### command round trip (Ping through JetStream, reply event back), {q['n']} pings\n")
    print(f"median {q['median']:.2f} ms, p99 {q['p99']:.2f} ms, min {q['min']:.2f} ms, max {q['max']:.2f} ms")

drv = [r for r in rows if r["section"] == "driver"]
if drv:
    t = [r["to_running"] for r in drv]
    res["driver"] = {"to_running_median": med(t), "min": min(t), "max": max(t), "total_median": med(r["total"] for r in drv), "n": len(t)}
    d = res["driver"]
    print(f"\n### `cedana-driver run` to the task's first output line, {d['n']} runs\n")
    print(f"median {d['to_running_median']:.2f} s (min {d['min']:.2f}, max {d['max']:.2f}); "
          f"whole run (task sleeps 1 s) median {d['total_median']:.2f} s")
json.dump(res, open(out, "w"), indent=2)
print(f"\nresults: {out}")
EOF
