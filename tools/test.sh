#!/usr/bin/env bash
# Runs every test: installs what is missing (tools/deps.sh), checks format and lints, builds the
# static agent (musl; CEDANA_AGENT_LIBC=glibc for the glibc one) and runs the workspace's tests
# against it with real CRIU.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need_root "$@"
"$ROOT/tools/deps.sh"
cd "$ROOT"
say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy --all-targets -- -D warnings"
cargo clippy --locked --all-targets -q -- -D warnings
build_static_agent
say "building the workspace's binaries (driver under test)"
cargo build --locked --bins
# Static: no program interpreter (ldd exits 1 for a non-PIE static binary, 0 for a static PIE).
linked=$(ldd "$AGENT_BIN" 2>&1 || true)
echo "$linked" | grep -Eq 'not a dynamic executable|statically linked' \
  || { say "cedana-agent is not static: $linked"; exit 1; }
say "cargo test --workspace (agent under test: $AGENT_BIN)"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
status=0
CEDANA_AGENT_BIN="$AGENT_BIN" CEDANA_REQUIRE_STATIC=1 cargo test --locked --no-fail-fast --workspace -- "$@" 2>&1 | tee "$out" || status=$?
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$out"
exit "$status"
