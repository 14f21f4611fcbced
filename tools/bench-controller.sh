#!/usr/bin/env bash
# Benchmark a job outliving its controller (issue 12), with local workers in their own network
# namespaces, real CRIU and the embedded nats-server:
#   resume    time from `cedana-driver resume -d` to the job tracked again (the new controller
#             saved the record: NATS up, workers adopted, the task found), with the job's
#             nats-server left running and killed too; baseline in the same run: `run -d` of
#             the same job to its task running
#   takeover  time from `kill -9` of the active controller to a `resume --standby` in charge
#   freeze    a worker's link to NATS cut for a few seconds: how long its task stays frozen
#             (the longest pause of a counter writing every 0.1 s) for each outage
#
# Usage: sudo tools/bench-controller.sh [SECTION...]   (default: resume takeover freeze)
# Env:   BENCH_RUNS      repetitions per figure; medians are reported (default 3)
#        BENCH_OUTAGES   link outages in seconds (default "5 12 15"; past 20 s the driver takes the worker for lost)
#        BENCH_DIR       work folder (default /var/tmp/cedana-bench-controller); results.json
#                        is left there
#        BENCH_NO_BUILD=1  use the release binaries already in target/release
set -euo pipefail

BENCH_RUNS=${BENCH_RUNS:-3}
BENCH_OUTAGES=${BENCH_OUTAGES:-"5 12 15"}
BENCH_DIR=${BENCH_DIR:-/var/tmp/cedana-bench-controller}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SECTIONS=("$@")
[[ ${#SECTIONS[@]} -gt 0 ]] || SECTIONS=(resume takeover freeze)

die() { echo "bench-controller: $*" >&2; exit 1; }
[[ $(id -u) == 0 ]] || die "must run as root (CRIU and network namespaces need it)"
[[ $BENCH_RUNS =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNS must be a positive integer"
for t in nats-server python3 ip; do command -v "$t" >/dev/null || die "$t not found"; done

if [[ ${BENCH_NO_BUILD:-} != 1 ]]; then
    (cd "$REPO" && cargo build -q --release -p cedana-agent -p cedana-driver)
fi
DRIVER=$REPO/target/release/cedana-driver
export CEDANA_AGENT_BIN=$REPO/target/release/cedana-agent
export CEDANA_CONFIG=/nonexistent/cedana_config.json
rm -rf "$BENCH_DIR"
mkdir -p "$BENCH_DIR"

BENCH_DIR=$BENCH_DIR DRIVER=$DRIVER RUNS=$BENCH_RUNS OUTAGES=$BENCH_OUTAGES \
    exec python3 - "${SECTIONS[@]}" <<'EOF'
import json, os, signal, statistics, subprocess, sys, time

DIR, DRIVER = os.environ["BENCH_DIR"], os.environ["DRIVER"]
RUNS = int(os.environ["RUNS"])
OUTAGES = [float(x) for x in os.environ["OUTAGES"].split()]
results = {}

JOB = """
fn instance_specs() { #{ cpu_cores: 1, memory_gb: 1 } }
fn setup(w) { }
fn work(w) {
    w.spawn("i=0; while [ $i -lt 100000 ]; do i=$((i+1)); echo $i >> counter.txt; sleep 0.1; done")
}
fn restored_task(w, task) { }
"""

def state_dir(name):
    d = os.path.join(DIR, name)
    os.makedirs(d, exist_ok=True)
    return d

def env(state):
    e = dict(os.environ)
    e["CEDANA_STATE_DIR"] = state
    return e

def driver(state, *args, **kw):
    return subprocess.run([DRIVER, *args], env=env(state), capture_output=True, text=True, **kw)

def record(state, job):
    with open(os.path.join(state, job, "job.json")) as f:
        return json.load(f)

def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False

def wait(what, cond, timeout=120, step=0.005):
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(step)
    return time.monotonic() - start

def start_job(state, every="2"):
    script = os.path.join(state, "count.rhai")
    with open(script, "w") as f:
        f.write(JOB)
    t0 = time.monotonic()
    out = driver(state, "run", "-d", "--checkpoint-every", every, script)
    took = time.monotonic() - t0
    if out.returncode != 0:
        raise SystemExit(f"run -d failed: {out.stderr}")
    return out.stdout.strip(), took

def down(state, job):
    driver(state, "down", job, timeout=120)

def kill9(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass

def median_ms(xs):
    return round(statistics.median(xs) * 1000)

def bench_resume():
    base, alive_nats, dead_nats = [], [], []
    for i in range(RUNS):
        for kill_nats, into in ((False, alive_nats), (True, dead_nats)):
            st = state_dir(f"resume-{i}-{int(kill_nats)}")
            job, took = start_job(st)
            base.append(took)
            wait("a checkpoint", lambda: len(record(st, job)["checkpoints"]) >= 1)
            r = record(st, job)
            kill9(r["driver_pid"])
            if kill_nats:
                kill9(r["nats_pid"])
            wait("the controller to die", lambda: not alive(r["driver_pid"]))
            t0 = time.monotonic()
            p = subprocess.Popen([DRIVER, "resume", "-d", job], env=env(st),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            def tracked():
                try:
                    n = record(st, job)
                except (OSError, ValueError):
                    return False
                return n["driver_pid"] != r["driver_pid"] and alive(n["driver_pid"])
            wait("the job to be tracked again", tracked)
            into.append(time.monotonic() - t0)
            p.wait()
            down(st, job)
    results["resume"] = {
        "run_to_task_running_ms": median_ms(base),
        "resume_to_tracked_ms_nats_alive": median_ms(alive_nats),
        "resume_to_tracked_ms_nats_killed": median_ms(dead_nats),
        "runs": RUNS,
    }
    print(f"resume: run -d to the task running {median_ms(base)} ms (baseline); "
          f"resume to tracked {median_ms(alive_nats)} ms with nats-server alive, "
          f"{median_ms(dead_nats)} ms with it killed too (medians of {RUNS})")

def bench_takeover():
    took = []
    for i in range(RUNS):
        st = state_dir(f"takeover-{i}")
        job, _ = start_job(st)
        sb = subprocess.Popen([DRIVER, "resume", "--standby", job], env=env(st),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait("a checkpoint", lambda: len(record(st, job)["checkpoints"]) >= 1)
        time.sleep(2)
        active = record(st, job)["driver_pid"]
        t0 = time.monotonic()
        kill9(active)
        wait("the standby to take over",
             lambda: record(st, job)["driver_pid"] != active, step=0.01)
        took.append(time.monotonic() - t0)
        down(st, job)
        sb.wait(timeout=120)
    results["takeover"] = {"kill_to_standby_in_charge_ms": median_ms(took),
                           "all_ms": [round(x * 1000) for x in took]}
    print(f"takeover: kill -9 of the active controller to the standby in charge "
          f"{median_ms(took)} ms (median of {RUNS}; all: {[round(x * 1000) for x in took]})")

def bench_freeze():
    rows = []
    for outage in OUTAGES:
        gaps = []
        for i in range(RUNS):
            st = state_dir(f"freeze-{outage}-{i}")
            job, _ = start_job(st, every="0")
            wait("the task", lambda: record(st, job)["task"] is not None)
            r = record(st, job)
            ns = r["workers"][0]["netns"]
            counter = os.path.join(r["workers"][0]["dir"], "counter.txt")
            wait("the count", lambda: os.path.exists(counter))
            time.sleep(2)
            subprocess.run(["ip", "-n", ns, "link", "set", "eth0", "down"], check=True)
            cut = time.monotonic()
            last_size, last_growth, longest = os.path.getsize(counter), time.monotonic(), 0.0
            restored = None
            while True:
                now = time.monotonic()
                if restored is None and now - cut >= outage:
                    subprocess.run(["ip", "-n", ns, "link", "set", "eth0", "up"], check=True)
                    restored = now
                size = os.path.getsize(counter)
                if size != last_size:
                    longest = max(longest, now - last_growth)
                    last_size, last_growth = size, now
                if restored is not None and now - restored > 15:
                    break
                time.sleep(0.01)
            # The counter writes every 0.1 s: a pause longer than that is time frozen.
            gaps.append(max(0.0, longest - 0.1))
            down(st, job)
        rows.append({"outage_s": outage, "frozen_ms": median_ms(gaps)})
        print(f"freeze: NATS cut for {outage:g} s: task frozen {median_ms(gaps)} ms "
              f"(median of {RUNS}; the lease is 10 s)")
    results["freeze"] = rows

for section in sys.argv[1:]:
    {"resume": bench_resume, "takeover": bench_takeover, "freeze": bench_freeze}[section]()
with open(os.path.join(DIR, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
EOF
