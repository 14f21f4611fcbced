#!/usr/bin/env bash
# The agent demo: start a counter, checkpoint it (which stops it), restore it from the archive
# and show it counting on from where it was, with no number lost or repeated.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need_root "$@"
"$ROOT/tools/deps.sh"
build_static_agent
agent() { "$AGENT_BIN" "$@"; }

work=$(mktemp -d /var/tmp/cedana-demo.XXXXXX)
restored=""
cleanup() { [ -n "$restored" ] && kill -KILL "$restored" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
log="$work/counter.log"

say "cedana-agent check"
agent check

say "starting a counter: cedana-agent exec --log $log -- sh -c '<count every 0.3 s>'"
pid=$(agent exec --log "$log" -- sh -c 'i=0; while :; do i=$((i+1)); echo $i; sleep 0.3; done' 2>/dev/null)
echo "counter runs as PID $pid"
sleep 3
echo "it has counted to $(tail -n 1 "$log")"

say "cedana-agent dump -p $pid -d $work"
archive=$(agent dump -p "$pid" -d "$work")
echo "checkpoint: $archive ($(du -h "$archive" | cut -f1))"
sleep 1
if kill -0 "$pid" 2>/dev/null && ! grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null; then
  echo "unexpected: PID $pid still runs"; exit 1
fi
last=$(tail -n 1 "$log")
echo "the counter is stopped at $last; one second later the log still ends at $(tail -n 1 "$log")"

say "cedana-agent restore $archive"
restored=$(agent restore "$archive")
echo "restored as PID $restored"
sleep 3
echo "it counts on: $(tail -n 5 "$log" | tr '\n' ' ')"

# The whole log must read 1, 2, 3, ... with nothing lost or repeated.
if awk '$1 != NR { bad = 1 } END { exit bad }' "$log"; then
  say "OK: $(wc -l < "$log") numbers, unbroken across the checkpoint at $last"
else
  say "FAILED: the sequence has a gap or a repeat"; cat "$log"; exit 1
fi
