# Shared by tools/*.sh: builds the fully static agent and says where it is.
# shellcheck shell=bash

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_TRIPLE=${CEDANA_TARGET:-x86_64-unknown-linux-gnu}

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    say "CRIU needs root: re-running with sudo"
    exec sudo -E "$0" "$@"
  fi
}

# A fully static agent. On these machines musl cannot be targeted, so glibc with crt-static
# stands in (the Nix flake builds the musl one). --target keeps build scripts and proc macros
# dynamic, as they must be.
build_static_agent() {
  say "building the static cedana-agent ($TARGET_TRIPLE, crt-static)"
  (cd "$ROOT" && RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release --locked -p cedana-agent --target "$TARGET_TRIPLE" >&2)
  AGENT_BIN="$ROOT/target/$TARGET_TRIPLE/release/cedana-agent"
  export AGENT_BIN
}
