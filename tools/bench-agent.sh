#!/usr/bin/env bash
# Benchmark cedana-agent's dump/restore against raw CRIU and the original Cedana's
# "criu dump + zip -r" way, for incompressible (random) and compressible memory.
#
# agent-lazy restores lazily (`restore --lazy`): its restore is the time until the task runs
# (the agent prints its PID), and the table adds the time until all its memory is back.
# The other agent variants restore in full; their "restore s" is the command's time, which
# ends 0.2 s after the task runs again (the command checks that it keeps running), and
# "running again" is when CRIU returned with the task running (the command's JSON).
# agent-copy is agent-none restored the way before (CEDANA_RESTORE_STREAM=0): the page
# images copied out of the archive and checked before CRIU reads them.
#
# Usage: sudo tools/bench-agent.sh
# Env:   BENCH_MB    memory the test process allocates, MiB (default 1024)
#        BENCH_RUNS  runs per variant; the median is reported (default 1)
#        BENCH_DIR   work folder on disk (default /var/tmp/cedana-bench); results.json is
#                    left there, everything else is removed on exit
#        BENCH_TMPFS=1  allow BENCH_DIR on tmpfs (to measure there on purpose)
#        BENCH_STEP_TIMEOUT  limit for one dump or restore command, s (default 300 + BENCH_MB/2)
#        CEDANA_AGENT  use this agent binary instead of building one
#        BENCH_VARIANTS  the variants to run, space-separated (default: all; criu first)
#        BENCH_READ=1  the test process reads all its memory in a loop (a byte per page) instead
#                    of sleeping, and the table adds how long after the restore began it had read
#                    all of it once (the task's slowdown while its pages arrive, lazily or not)
set -euo pipefail

BENCH_MB=${BENCH_MB:-1024}
BENCH_RUNS=${BENCH_RUNS:-1}
BENCH_DIR=${BENCH_DIR:-/var/tmp/cedana-bench}
READY_TIMEOUT=120   # s for the test process to allocate its memory
GONE_TIMEOUT=20     # s for a killed process to disappear
STEP_TIMEOUT=${BENCH_STEP_TIMEOUT:-$((300 + BENCH_MB / 2))}   # ~15x this VM's slowest step
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() { echo "bench-agent: $*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "must run as root (CRIU needs it)"
[[ $BENCH_MB =~ ^[1-9][0-9]*$ && $BENCH_RUNS =~ ^[1-9][0-9]*$ ]] || die "BENCH_MB and BENCH_RUNS must be positive integers"
CRIU=$(command -v criu) || die "criu not found on PATH"
for t in zip unzip python3 awk timeout; do command -v "$t" >/dev/null || die "$t not found"; done
# The test process must be a real interpreter, not a wrapper script (e.g. a pyenv shim),
# so that what CRIU dumps is exactly the Python that holds the memory.
PY=$(python3 -c 'import os, sys; print(os.path.realpath(sys.executable))')

if [[ -n ${CEDANA_AGENT:-} ]]; then
    AGENT=$CEDANA_AGENT
else
    echo "building cedana-agent (release)..." >&2
    (cd "$REPO" && cargo build --release --quiet -p cedana-agent)
    AGENT=$REPO/target/release/cedana-agent
fi
export CEDANA_CRIU=$CRIU    # the agent uses the same CRIU as the raw variants

mkdir -p "$BENCH_DIR"
# On tmpfs the "disk" writes would be memory copies and every comparison would be off.
[[ $(stat -f -c %T "$BENCH_DIR") != tmpfs || ${BENCH_TMPFS:-} == 1 ]] ||
    die "BENCH_DIR=$BENCH_DIR is on tmpfs; use a folder on disk (or BENCH_TMPFS=1 to measure tmpfs on purpose)"
WORK=$(mktemp -d "$BENCH_DIR/work.XXXXXX")   # logs, dumps; removed on exit
DUMP=$WORK/dump                              # emptied before every variant
RAW=$WORK/raw.tsv                            # kind variant run dump_s restore_s bytes resident_s
PIDS=()                                      # processes of the current run (started/restored)

json_field() { python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

# Gone = no such PID or a zombie waiting for init to reap it.
alive() { local s; [[ $1 =~ ^[0-9]+$ ]] && s=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) && [[ $s != Z ]]; }

cleanup() {
    local p
    # A restore interrupted by a signal finishes first; its PID is then only in these files.
    [[ -s $DUMP/restored.pid ]] && PIDS+=("$(<"$DUMP/restored.pid")")
    [[ -s $DUMP/restore.json ]] && PIDS+=("$(json_field pid <"$DUMP/restore.json" 2>/dev/null)")
    for p in "${PIDS[@]}"; do alive "$p" && kill -KILL "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
# On Ctrl-C the current step (run under `timeout`, in its own process group) completes first.
trap 'exit 130' INT TERM

# Run a private copy: target/ is shared, and a rebuild during the benchmark must not swap
# the binary between variants.
[[ -x $AGENT ]] || die "agent binary $AGENT is not executable"
AGENT_INFO="$AGENT, built $(stat -c %y "$AGENT" | cut -d. -f1)"
cp "$AGENT" "$WORK/cedana-agent"
AGENT=$WORK/cedana-agent

# Runs a dump/restore step with a time limit, so that a hung agent or CRIU cannot hang us.
bounded() {
    local rc=0
    timeout -k 10 "$STEP_TIMEOUT" "$@" || rc=$?
    ((rc != 124 && rc != 137)) ||
        die "timed out after ${STEP_TIMEOUT}s: ${*:1:3}... (a killed agent can leave its staging folder in /dev/shm)"
    return "$rc"
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

# Waits (bounded) until a process has died.
wait_gone() {
    local pid=$1 i
    for ((i = 0; i < GONE_TIMEOUT * 10; i++)); do alive "$pid" || return 0; sleep 0.1; done
    die "PID $pid still alive after ${GONE_TIMEOUT}s"
}

# Kills a test process (pid-namespace init: SIGTERM is ignored) and waits until it is gone.
stop() { kill -KILL "$1" 2>/dev/null || true; wait_gone "$1"; }

# Python that fills BENCH_MB MiB, says "ready", then sleeps. "compressible" is a log-like
# counter text (compresses several times over, unlike zeros which compress ~1000x).
ALLOC='
import os, sys, time
kind, size = sys.argv[1], int(sys.argv[2]) << 20
buf, chunk, i, pos = bytearray(size), 1 << 20, 0, 0
while pos < size:
    if kind == "random":
        piece = os.urandom(chunk)
    else:
        lines, n = [], 0
        while n < chunk:
            lines.append(b"%012d INFO worker-%d processed request id=%x status=%d\n" % (i, i % 7, i * 2654435761 % 2**32, 200 + i % 3))
            n += len(lines[-1])
            i += 1
        piece = b"".join(lines)
    n = min(len(piece), size - pos)
    buf[pos:pos + n] = piece[:n]
    pos += n
print("ready", flush=True)
if sys.argv[3] == "read":
    # One pass reads a byte of every page; each pass logs its start and end (wall clock).
    while True:
        t, total = time.time(), 0
        for off in range(0, size, 4096):
            total += buf[off]
        print("pass %.6f %.6f" % (t, time.time()), flush=True)
while True:
    time.sleep(3600)
'

# Starts a fresh test process through the agent; sets PID once it has its memory.
# (Not run in $(...): PIDS must be updated in this shell for the cleanup trap.)
start() {
    local kind=$1 log i
    log=$(mktemp "$WORK/proc.XXXXXX.log")
    LOG=$log
    PID=$("$AGENT" exec --log "$log" -- "$PY" -c "$ALLOC" "$kind" "$BENCH_MB" "$MODE" 2>/dev/null)
    [[ $PID =~ ^[0-9]+$ ]] || die "agent exec printed no PID ($PID)"
    PIDS+=("$PID")
    local pid=$PID
    for ((i = 0; i < READY_TIMEOUT * 10; i++)); do
        grep -qx ready "$log" && return 0
        alive "$pid" || { cat "$log" >&2; die "test process $pid died while allocating"; }
        sleep 0.1
    done
    die "test process $pid not ready after ${READY_TIMEOUT}s"
}

# Checks a restored process: alive, and holding (nearly) all its memory again.
check_restored() {
    local pid=$1 rss
    [[ $pid =~ ^[0-9]+$ ]] || die "restore gave no PID ($pid)"
    PIDS+=("$pid")
    alive "$pid" || die "restored PID $pid is not alive"
    rss=$(awk '/^VmRSS:/ { print int($2 / 1024) }' "/proc/$pid/status")
    ((rss * 10 >= BENCH_MB * 9)) || die "restored PID $pid holds only ${rss} MiB of ${BENCH_MB} MiB"
}

# With BENCH_READ=1: waits (bounded) until the restored process, running again since $1, has
# read all its memory once (the pass it was in finished, then a whole pass that began after
# $1); prints that moment less $2 (the restore's start), and a pass's usual length before.
caught_up() {
    local ran=$1 began=$2 i got
    for ((i = 0; i < STEP_TIMEOUT * 10; i++)); do
        got=$(awk -v ran="$ran" -v began="$began" '
            $1 == "pass" && $2 + 0 >= ran + 0 { printf "%.3f", $3 - began; exit }' "$LOG")
        [[ -n $got ]] && { echo "$got"; return 0; }
        sleep 0.1
    done
    die "the restored process did not read all its memory within ${STEP_TIMEOUT}s"
}

# One run of one variant: fresh process, timed dump, timed restore, check, kill.
# Each timed step starts after a `sync`, so earlier dirty pages are not flushed on its clock.
run_variant() {
    local kind=$1 variant=$2 run=$3 pid t0 t1 t1b t2 out bytes rpid t_run= running=
    # Every process of the previous run is gone: forget them, so that the cleanup trap can
    # never kill an unrelated process that was handed one of their PIDs later.
    PIDS=()
    rm -rf "$DUMP" && mkdir -p "$DUMP"
    start "$kind"
    pid=$PID
    sync
    t0=$(now)
    case $variant in
    agent-chunked | agent-lazy)
        # The store's format in one zip: chunks cut, hashed and compressed after CRIU.
        out=$(bounded "$AGENT" dump -p "$pid" -d "$DUMP" --chunked --json)
        ;;
    agent-copy)
        # agent-none's archive; its restore copies the page images out first (the way before
        # restores streamed them to CRIU).
        out=$(bounded "$AGENT" dump -p "$pid" -d "$DUMP" --compress none --json)
        ;;
    agent-nosync)
        # The plain archive without its fsync: the same durability as raw `criu dump`.
        out=$(bounded "$AGENT" dump -p "$pid" -d "$DUMP" --compress none --no-sync --json)
        ;;
    agent-*)
        out=$(bounded "$AGENT" dump -p "$pid" -d "$DUMP" --compress "${variant#agent-}" --json)
        ;;
    criu | criu-sync | zip)
        mkdir "$DUMP/img"
        bounded "$CRIU" dump -t "$pid" -D "$DUMP/img" -o dump.log --file-locks 2>/dev/null ||
            die "criu dump failed: $(tail -5 "$DUMP/img/dump.log" 2>/dev/null)"
        # The agent's archive is on disk when it returns (fsync); criu-sync is raw CRIU held to
        # the same standard.
        [[ $variant != criu-sync ]] || sync -f "$DUMP/img"
        # The original Cedana zips CRIU's folder (zip's default: deflate level 6).
        [[ $variant != zip ]] || (cd "$DUMP/img" && bounded zip -qr "$DUMP/ckpt.zip" .)
        ;;
    esac
    t1=$(now)
    case $variant in
    agent-*) bytes=$(json_field archive_bytes <<<"$out") ;;
    criu | criu-sync) bytes=$(du -sb "$DUMP/img" | cut -f1) ;;
    zip) bytes=$(stat -c %s "$DUMP/ckpt.zip") ;;
    esac
    # Every variant kills the dumped process; the agent sends SIGKILL just before it exits,
    # so give the process a moment to die (untimed) before the restore needs its PIDs.
    wait_gone "$pid"
    # Read before the clock starts (python, tens of ms).
    local archive=
    [[ $variant != agent-* ]] || archive=$(json_field archive <<<"$out")
    sync
    t1b=$(now)
    case $variant in
    agent-lazy)
        # Restored is when the agent prints the PID (the task runs); resident is when it
        # returns (every page is back).
        mkfifo "$DUMP/lazy.fifo"
        bounded "$AGENT" restore --lazy "$archive" >"$DUMP/lazy.fifo" 2>"$DUMP/lazy.err" &
        local job=$!
        read -r rpid <"$DUMP/lazy.fifo" || true
        t_run=$(now)
        [[ $rpid =~ ^[0-9]+$ ]] && echo "$rpid" >"$DUMP/restored.pid"
        wait "$job" || die "restore --lazy failed: $(tail -3 "$DUMP/lazy.err")"
        ;;
    agent-*)
        local stream=1
        [[ $variant != agent-copy ]] || stream=0
        CEDANA_RESTORE_STREAM=$stream bounded "$AGENT" restore "$archive" --json >"$DUMP/restore.json"
        t2=$(now)
        rpid=$(json_field pid <"$DUMP/restore.json")
        # The command then watches the process for 0.2 s (it must keep running); the task
        # ran again when CRIU returned.
        # (`running_after` from a plain archive's restore, `running_after_ms` from a chunked one's)
        local ms
        ms=$(json_field running_after <"$DUMP/restore.json" 2>/dev/null || json_field running_after_ms <"$DUMP/restore.json")
        running=$(awk -v ms="$ms" 'BEGIN { printf "%.3f", ms / 1000 }')
        ;;
    criu | criu-sync | zip)
        local img=$DUMP/img
        if [[ $variant == zip ]]; then
            img=$DUMP/unzipped
            mkdir "$img" && (cd "$img" && bounded unzip -q "$DUMP/ckpt.zip")
        fi
        # -d: CRIU exits once the tree runs; the pid namespace and session were dumped
        # along with the task (it leads both), so no --shell-job is needed.
        bounded "$CRIU" restore -D "$img" -d -o restore.log --file-locks --pidfile "$DUMP/restored.pid" 2>/dev/null ||
            die "criu restore failed: $(tail -5 "$img/restore.log" 2>/dev/null)"
        rpid=$(<"$DUMP/restored.pid")
        ;;
    esac
    [[ -n ${t2:-} ]] || t2=$(now)
    check_restored "$rpid"
    local caught=-
    [[ $MODE != read ]] || caught=$(caught_up "${t_run:-$t2}" "$t1b")
    stop "$rpid"
    local restored=$(elapsed "$t1b" "$t2") resident=-
    if [[ -n $t_run ]]; then
        resident=$restored
        restored=$(elapsed "$t1b" "$t_run")
    fi
    [[ -n $running ]] || running=$restored
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$kind" "$variant" "$run" "$(elapsed "$t0" "$t1")" "$restored" "$bytes" "$resident" "$caught" "$running" >>"$RAW"
    echo "  $kind $variant run $run: dump $(elapsed "$t0" "$t1")s restore $restored s (resident $resident s; read all once $caught s) size $bytes B" >&2
}

MODE=idle
[[ ${BENCH_READ:-} != 1 ]] || MODE=read
read -r -a VARIANTS <<<"${BENCH_VARIANTS:-criu criu-sync agent-none agent-nosync agent-zstd agent-chunked agent-lazy agent-deflate zip}"
[[ ${VARIANTS[0]} == criu ]] || die "BENCH_VARIANTS must start with criu (the baseline)"
echo "cedana-agent benchmark: ${BENCH_MB} MiB, ${BENCH_RUNS} run(s), agent $AGENT_INFO, criu $CRIU ($("$CRIU" --version | awk 'NR==1 {print $2}'))" >&2
for kind in random compressible; do
    for variant in "${VARIANTS[@]}"; do
        for ((run = 1; run <= BENCH_RUNS; run++)); do run_variant "$kind" "$variant" "$run"; done
    done
done
rm -rf "$DUMP"

# Medians, tables, summary and results.json.
python3 - "$RAW" "$BENCH_DIR/results.json" "$BENCH_MB" "$BENCH_RUNS" <<'EOF'
import json, statistics, sys
raw, out, mb, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rows = {}
for line in open(raw):
    kind, variant, _, d, r, b, res, caught, running = line.rstrip("\n").split("\t")
    rows.setdefault(kind, {}).setdefault(variant, []).append(
        (float(d), float(r), int(b), None if res == "-" else float(res),
         None if caught == "-" else float(caught), float(running)))
res = {"bench_mb": mb, "runs": runs, "kinds": {}}
for kind, variants in rows.items():
    med = {v: {"dump_s": statistics.median(x[0] for x in xs), "restore_s": statistics.median(x[1] for x in xs),
               "bytes": int(statistics.median(x[2] for x in xs)),
               "resident_s": statistics.median(x[3] for x in xs) if xs[0][3] is not None else None,
               "read_all_s": statistics.median(x[4] for x in xs) if xs[0][4] is not None else None,
               "running_s": statistics.median(x[5] for x in xs)}
           for v, xs in variants.items()}
    base = med["criu"]
    for m in med.values():
        m["dump_vs_criu"] = m["dump_s"] / base["dump_s"]
        m["restore_vs_criu"] = m["restore_s"] / base["restore_s"]
        m["running_vs_criu"] = m["running_s"] / base["restore_s"]
        m["resident_vs_criu"] = m["resident_s"] / base["restore_s"] if m["resident_s"] is not None else None
        m["read_all_vs_criu"] = (m["read_all_s"] / base["read_all_s"]
                                 if m["read_all_s"] is not None and base["read_all_s"] else None)
    def ratio(a, b, field="dump_s"):
        return med[a][field] / med[b][field] if a in med and b in med else None
    none_ratio = ratio("agent-none", "criu")
    none_sync_ratio = ratio("agent-none", "criu-sync")
    nosync_ratio = ratio("agent-nosync", "criu")
    speedup = ratio("zip", "agent-zstd")
    size_ratio = ratio("agent-zstd", "zip", "bytes")
    res["kinds"][kind] = {"variants": med, "none_vs_criu_dump": none_ratio, "none_vs_criu_sync_dump": none_sync_ratio,
                          "zstd_vs_zip_dump_speedup": speedup, "zstd_vs_zip_size": size_ratio}
    print(f"\n### {kind} memory, {mb} MiB (median of {runs})\n")
    print("| variant | dump s | restore s | size MiB | dump vs criu | restore vs criu | running again s (vs criu) | all memory back s (vs criu) | read all once s (vs criu) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for v, m in med.items():
        back = f"{m['resident_s']:.2f} ({m['resident_vs_criu']:.2f}x)" if m["resident_s"] is not None else ""
        read = f"{m['read_all_s']:.2f} ({m['read_all_vs_criu']:.2f}x)" if m["read_all_vs_criu"] is not None else ""
        print(f"| {v} | {m['dump_s']:.2f} | {m['restore_s']:.2f} | {m['bytes'] / 2**20:.1f} "
              f"| {m['dump_vs_criu']:.2f}x | {m['restore_vs_criu']:.2f}x "
              f"| {m['running_s']:.2f} ({m['running_vs_criu']:.2f}x) | {back} | {read} |")
    if none_ratio is not None and none_sync_ratio is not None:
        print(f"\nnone vs raw criu dump: {none_ratio:.2f}x (target <= 1.1x); vs criu + sync (both durable): {none_sync_ratio:.2f}x")
    if nosync_ratio is not None:
        print(f"none --no-sync vs raw criu dump (neither synced): {nosync_ratio:.2f}x (target <= 1.1x)")
    if speedup is not None:
        print(f"zstd vs original deflate zip dump: {speedup:.2f}x faster (target >= 3x), "
              f"size zstd/deflate = {size_ratio:.2f} (target <= 1.0)")
json.dump(res, open(out, "w"), indent=2)
print(f"\nresults: {out}")
EOF
