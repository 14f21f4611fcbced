#!/usr/bin/env bash
# The main job on the embedded default: `cedana-driver run scripts/examples/counter.rhai` with
# no config: the driver starts its own nats-server (loopback, generated token) and two local
# workers, moves the counting task from the first to the second halfway, and prints the
# counter's file: 1..40 with no gap and no repeat.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need_root "$@"
"$ROOT/tools/deps.sh"
build_static_agent
say "building cedana-driver"
(cd "$ROOT" && cargo build --release --locked -p cedana-driver >&2)
export CEDANA_AGENT_BIN="$AGENT_BIN"
state=$(mktemp -d /var/tmp/cedana-demo.XXXXXX)
trap 'rm -rf "$state"' EXIT
out="$state/out.txt"
say "cedana-driver run scripts/examples/counter.rhai"
CEDANA_STATE_DIR="$state" "$ROOT/target/release/cedana-driver" run "$ROOT/scripts/examples/counter.rhai" | tee "$out"
if awk 'NF { n++; if ($1 != n) bad = 1 } END { exit (bad || n == 0) }' "$out"; then
  say "OK: $(grep -c . "$out") numbers, unbroken across the migration"
else
  say "FAILED: the sequence has a gap or a repeat"; exit 1
fi
