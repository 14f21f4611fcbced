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

# The fully static agent: musl by default (CEDANA_AGENT_LIBC=musl), as the Nix flake builds
# it; CEDANA_AGENT_LIBC=glibc builds the glibc crt-static stand-in instead (no NSS lookups).
# rustup cannot fetch the musl target here, so std is built for it from source
# (-Zbuild-std, RUSTC_BOOTSTRAP) by Debian sid's rustc and rust-src (tools/deps.sh), linked by
# musl-gcc with gcc's unwinder standing in for the musl target's libunwind
# (tools/musl/unwind-shim.c supplies the glibc pieces it calls). Non-PIE: Debian's musl-gcc
# cannot link a static PIE. --target keeps build scripts and proc macros dynamic, as they must
# be.
AGENT_LIBC=${CEDANA_AGENT_LIBC:-musl}
RUST_SID_PREFIX=${CEDANA_RUST_SID_PREFIX:-/opt/cedana/rust-sid}
build_static_agent() {
  if [ "$AGENT_LIBC" = glibc ]; then
    say "building the static cedana-agent ($TARGET_TRIPLE, crt-static)"
    (cd "$ROOT" && RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
      cargo build --release --locked -p cedana-agent --target "$TARGET_TRIPLE" >&2)
    AGENT_BIN="$ROOT/target/$TARGET_TRIPLE/release/cedana-agent"
  else
    local musl=x86_64-unknown-linux-musl unwind="$ROOT/target-musl/unwind"
    say "building the static cedana-agent ($musl, std built from source by $("$RUST_SID_PREFIX/rustc" --version))"
    mkdir -p "$unwind"
    musl-gcc -O2 -c "$ROOT/tools/musl/unwind-shim.c" -o "$unwind/unwind-shim.o"
    rm -f "$unwind/libunwind.a"
    cp "$(gcc -print-file-name=libgcc_eh.a)" "$unwind/libunwind.a"
    chmod u+w "$unwind/libunwind.a"
    ar rcs "$unwind/libunwind.a" "$unwind/unwind-shim.o"
    (cd "$ROOT" && RUSTC="$RUST_SID_PREFIX/rustc" RUSTC_BOOTSTRAP=1 \
      CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_LINKER=musl-gcc \
      RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static -C link-self-contained=no -C relocation-model=static -L native=$unwind" \
      cargo build --release --locked -p cedana-agent --target "$musl" \
        -Zbuild-std=std,panic_abort --target-dir "$ROOT/target-musl" >&2)
    AGENT_BIN="$ROOT/target-musl/$musl/release/cedana-agent"
  fi
  export AGENT_BIN
}
