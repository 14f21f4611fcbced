#!/usr/bin/env bash
# Benchmark a job's start on the aws provider: `cedana-driver run` to the task running, with a
# baked image (the user-data starts the agent) against the original's path (a stock image, then
# SSH: upload the agent and CRIU, run the setup, start the agent), both on moto's EC2 server and
# the instance simulator (tests/src/ec2sim.rs), in the same run, alternating. Prints medians and
# their ratio as a Markdown table (docs/benchmarks.md has the method and a run's figures).
#
# Usage: sudo tools/bench-boot.sh
# Env:   BENCH_RUNS       runs of each path; medians are reported (default 5)
#        BENCH_LINK_MBIT  rate of the link to each simulated instance, Mbit/s, both ways (tc
#                         token bucket; default unlimited): the network to a cloud, for uploads
#        BENCH_DIR        work folder (default /var/tmp/cedana-bench-boot); removed on exit
#        BENCH_NO_BUILD=1 use the binaries already built (static agent, release driver)
set -euo pipefail
. "$(dirname "$0")/lib.sh"

BENCH_RUNS=${BENCH_RUNS:-5}
BENCH_DIR=${BENCH_DIR:-/var/tmp/cedana-bench-boot}

die() { echo "bench-boot: $*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "must run as root (network namespaces, CRIU)"
[[ $BENCH_RUNS =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNS must be a positive integer"
for t in nats-server ssh-keygen tar ip tc unshare nsenter; do
    command -v "$t" >/dev/null || die "$t not found (run tools/deps.sh)"
done
[[ -x /usr/sbin/sshd ]] || die "/usr/sbin/sshd is missing (run tools/deps.sh: openssh-server)"

if [[ ${BENCH_NO_BUILD:-} != 1 ]]; then
    build_static_agent
    say "building cedana-driver and bench-boot (release)"
    (cd "$ROOT" && cargo build --release --locked --quiet -p cedana-driver &&
        cargo build --release --locked --quiet -p cedana-tests --bin bench-boot)
fi
AGENT_BIN=${AGENT_BIN:-$ROOT/target/$TARGET_TRIPLE/release/cedana-agent}

mkdir -p "$BENCH_DIR"
WORK=$(mktemp -d "$BENCH_DIR/work.XXXXXX")
PIDS=$WORK/pids          # "PID STARTTIME" of every process the benchmark started
# Ends what the benchmark left running (after a failure), but only processes whose start time
# is still the one noted: a PID handed to an unrelated process since is left alone.
cleanup() {
    local pid start now
    if [[ -s $PIDS ]]; then
        while read -r pid start; do
            now=$(awk '{ sub(/.*\) /, ""); print $20 }' "/proc/$pid/stat" 2>/dev/null) || continue
            [[ $now == "$start" ]] && kill -KILL "$pid" 2>/dev/null || true
        done <"$PIDS"
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# Private copies: target/ is shared, and a rebuild during the run must not swap a binary.
for b in "$AGENT_BIN" "$ROOT/target/release/cedana-driver" "$ROOT/target/release/bench-boot"; do
    [[ -x $b ]] || die "$b is missing (unset BENCH_NO_BUILD)"
    cp "$b" "$WORK/"
done
REV=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
echo "boot benchmark: ${BENCH_RUNS} run(s) per path, link ${BENCH_LINK_MBIT:-unlimited} Mbit/s, commit $REV, $(nats-server --version), load $(cut -d' ' -f1-3 /proc/loadavg)" >&2

# The run's limit (every wait inside is bounded too). The simulator's instances die with it.
BENCH_DIR=$WORK BENCH_PIDS=$PIDS BENCH_RUNS=$BENCH_RUNS BENCH_LINK_MBIT=${BENCH_LINK_MBIT:-} CEDANA_AGENT_BIN=$WORK/cedana-agent \
    CEDANA_DRIVER_BIN=$WORK/cedana-driver \
    timeout -k 30 $((600 + BENCH_RUNS * 240)) "$WORK/bench-boot"

echo "load at the end: $(cut -d' ' -f1-3 /proc/loadavg) (1, 5, 15 min; this machine has $(nproc) CPUs)" >&2
