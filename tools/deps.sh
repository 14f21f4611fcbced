#!/usr/bin/env bash
# Installs what building, running and testing Cedana needs on Debian 12, idempotently.
# CRIU: Debian 12's 3.17 cannot run on Linux 6.13+ and 4.1 cannot dump sockets on 6.16+, so
# CRIU >= 4.2 comes from Debian sid, unpacked into a private prefix with sid's own loader and libc
# (the system's libc is never touched). See README "Other distributions" for the alternatives.
set -euo pipefail

CRIU_PREFIX=${CEDANA_CRIU_PREFIX:-/opt/cedana/criu}
CRIU_WRAPPER=${CEDANA_CRIU_WRAPPER:-/usr/local/sbin/criu}
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

log() { printf '\033[1m[deps]\033[0m %s\n' "$*" >&2; }

have_pkgs() { dpkg-query -W -f='${Status}\n' "$@" 2>/dev/null | grep -vq 'install ok installed' && return 1; [ "$(dpkg-query -W -f='${Status}\n' "$@" 2>/dev/null | wc -l)" -eq "$#" ]; }

APT_UPDATED=""
apt_update() {
  if [ -z "$APT_UPDATED" ]; then
    log "apt-get update"
    $SUDO apt-get update -qq
    APT_UPDATED=1
  fi
}

# Packages from Debian 12 itself: tools the tests use, CRIU's libraries that bookworm's
# versions satisfy, what the worker image needs (images/build.sh: busybox-static is the image's
# shell; umoci and skopeo read OCI layouts and runc runs the image in the tests) and nix-bin
# (parses the flake; it cannot build here).
PKGS=(zip unzip iproute2 procps ca-certificates python3
      libprotobuf-c1 libnftables1 libgnutls30 libbsd0 libuuid1 libcap2 libnl-route-3-200
      umoci skopeo runc busybox-static nix-bin)
if ! have_pkgs "${PKGS[@]}"; then
  apt_update
  log "installing ${PKGS[*]}"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null
fi

# Packages whose install would start a system service: installed with a policy-rc.d that
# keeps every service from starting (unless the machine already has one), their services
# disabled again afterwards.
install_without_services() {
  local services=$1; shift
  apt_update
  log "installing $* (no service is started)"
  local guard=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# Temporary, from Cedana tools/deps.sh: no service starts during this install.\nexit 101\n' |
      $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod 0755 /usr/sbin/policy-rc.d
    guard=1
  fi
  if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null; then
    if [ -n "$guard" ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi
    log "$* did not install"; exit 1
  fi
  if [ -n "$guard" ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi
  if command -v systemctl >/dev/null 2>&1 && [ -n "$services" ]; then
    # shellcheck disable=SC2086
    $SUDO systemctl disable --quiet $services >/dev/null 2>&1 || true
  fi
}

# OpenSSH for the SSH and `bake` tests: they run sshd from a private config on loopback (or in
# a network namespace), never the system's.
if ! have_pkgs openssh-server; then
  install_without_services "ssh.service ssh.socket" openssh-server openssh-client
fi

# PostgreSQL for the database round trip (tests/roundtrip.rs): the test makes its own cluster
# in a temporary folder and runs it as the task; the package's own cluster is not made.
if ! have_pkgs postgresql-15; then
  $SUDO mkdir -p /etc/postgresql-common/createcluster.d
  printf 'create_main_cluster = false\n' | $SUDO tee /etc/postgresql-common/createcluster.d/cedana.conf >/dev/null
  install_without_services "postgresql.service" postgresql-15
fi

# nats-server with JetStream: Debian 12 has 2.9; the pinned sid source has a current one (a Go
# binary that needs only libc6 >= 2.34).
nats_ok() { command -v nats-server >/dev/null && nats-server --version 2>/dev/null | grep -Eq 'v2\.(1[0-9]|[2-9][0-9])\.'; }

criu_ok() {
  local v
  v=$("$CRIU_WRAPPER" --version 2>/dev/null | sed -n 's/^Version: *//p') || return 1
  [ -n "$v" ] || return 1
  local major minor
  major=${v%%.*}; minor=${v#*.}; minor=${minor%%.*}
  [ "$major" -gt 4 ] || { [ "$major" -eq 4 ] && [ "$minor" -ge 2 ]; }
}

if criu_ok; then
  log "CRIU $("$CRIU_WRAPPER" --version | sed -n 's/^Version: *//p') already at $CRIU_WRAPPER"
else
  log "installing CRIU >= 4.2 from Debian sid into $CRIU_PREFIX"
  if [ ! -f /etc/apt/sources.list.d/cedana-sid.sources ]; then
    $SUDO tee /etc/apt/sources.list.d/cedana-sid.sources >/dev/null <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    # Pinned low: nothing on the system is upgraded from sid; only the packages below are
    # downloaded from it explicitly.
    $SUDO tee /etc/apt/preferences.d/cedana-sid >/dev/null <<'PIN'
Package: *
Pin: release n=sid
Pin-Priority: 50
PIN
    APT_UPDATED=""
  fi
  apt_update
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && apt-get download -qq criu/sid libcompel1/sid libc6/sid libnet9/sid libnl-3-200/sid >/dev/null)
  $SUDO rm -rf "$CRIU_PREFIX.new"
  $SUDO mkdir -p "$CRIU_PREFIX.new"
  for deb in "$work"/*.deb; do $SUDO dpkg -x "$deb" "$CRIU_PREFIX.new"; done
  $SUDO rm -rf "$CRIU_PREFIX"
  $SUDO mv "$CRIU_PREFIX.new" "$CRIU_PREFIX"
  $SUDO mkdir -p "$(dirname "$CRIU_WRAPPER")"
  $SUDO tee "$CRIU_WRAPPER" >/dev/null <<WRAP
#!/bin/sh
# CRIU from Debian sid, run with sid's loader and libc (installed by Cedana's tools/deps.sh).
L=$CRIU_PREFIX/usr/lib/x86_64-linux-gnu
exec "\$L/ld-linux-x86-64.so.2" --library-path "\$L:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu" $CRIU_PREFIX/usr/sbin/criu "\$@"
WRAP
  $SUDO chmod 0755 "$CRIU_WRAPPER"
  criu_ok || { log "CRIU at $CRIU_WRAPPER does not report version >= 4.2"; "$CRIU_WRAPPER" --version || true; exit 1; }
  log "CRIU $("$CRIU_WRAPPER" --version | sed -n 's/^Version: *//p') installed at $CRIU_WRAPPER"
fi

NATS_PREFIX=${CEDANA_NATS_PREFIX:-/opt/cedana/nats}
if nats_ok; then
  log "$(nats-server --version) already installed"
else
  # Unpacked, not installed: sid's maintainer scripts need a newer systemd than Debian 12's.
  apt_update
  log "installing nats-server from Debian sid into $NATS_PREFIX"
  work=$(mktemp -d)
  (cd "$work" && apt-get download -qq nats-server/sid >/dev/null)
  $SUDO rm -rf "$NATS_PREFIX"
  $SUDO mkdir -p "$NATS_PREFIX"
  $SUDO dpkg -x "$work"/nats-server_*.deb "$NATS_PREFIX"
  rm -rf "$work"
  $SUDO ln -sf "$NATS_PREFIX/usr/sbin/nats-server" /usr/local/bin/nats-server
  hash -r
  nats_ok || { log "nats-server >= 2.10 did not install"; exit 1; }
  log "$(nats-server --version) installed"
fi

# The musl-static agent. rustup cannot fetch the musl target here, so std is built for musl
# from source (-Zbuild-std) by Rust from Debian sid (rustc, its std and LLVM, rust-src), unpacked
# into a private prefix and run with sid's own loader and libc, as CRIU is; musl-gcc (Debian 12's
# musl-tools) links. The packages are rustc's and rust-src's dependencies in sid, found with
# apt-cache (their names change as sid moves on), less the C toolchain (the system's).
RUST_SID_PREFIX=${CEDANA_RUST_SID_PREFIX:-/opt/cedana/rust-sid}
rust_sid_ok() {
  [ -x "$RUST_SID_PREFIX/rustc" ] && "$RUST_SID_PREFIX/rustc" --version >/dev/null 2>&1 \
    && [ -d "$RUST_SID_PREFIX/usr/lib/rustlib/src/rust/library" ]
}
sid_closure() {
  local skip=" gcc libc-dev binutils cpp gcc-16-base libc-gconv-modules-extra debconf tzdata "
  local -A seen=()
  local queue=("$@") p d deps
  while [ ${#queue[@]} -gt 0 ]; do
    p=${queue[0]}; queue=("${queue[@]:1}")
    [ -n "${seen[$p]:-}" ] && continue
    seen[$p]=1
    echo "$p"
    deps=$(apt-cache show "$p/sid" 2>/dev/null | sed -n 's/^\(Pre-\)\?Depends: //p' | head -2 \
      | tr ',' '\n' | sed 's/|.*//; s/(.*)//; s/:any//; s/ //g' | sort -u)
    for d in $deps; do
      case "$skip" in *" $d "*) continue ;; esac
      [ -z "${seen[$d]:-}" ] && queue+=("$d")
    done
  done
}
if ! have_pkgs musl-tools; then
  apt_update
  log "installing musl-tools"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends musl-tools >/dev/null
fi
if rust_sid_ok; then
  log "$("$RUST_SID_PREFIX/rustc" --version) already in $RUST_SID_PREFIX"
else
  [ -f /etc/apt/sources.list.d/cedana-sid.sources ] || { log "the sid source is missing (see the CRIU step)"; exit 1; }
  apt_update
  mapfile -t rust_pkgs < <(sid_closure rustc rust-src)
  log "installing Rust from Debian sid into $RUST_SID_PREFIX (${rust_pkgs[*]})"
  work=$(mktemp -d)
  (cd "$work" && apt-get download -qq "${rust_pkgs[@]/%//sid}" >/dev/null 2>&1) \
    || { log "cannot download ${rust_pkgs[*]} from sid"; exit 1; }
  $SUDO rm -rf "$RUST_SID_PREFIX.new"
  $SUDO mkdir -p "$RUST_SID_PREFIX.new"
  for deb in "$work"/*.deb; do $SUDO dpkg -x "$deb" "$RUST_SID_PREFIX.new"; done
  rm -rf "$work"
  $SUDO tee "$RUST_SID_PREFIX.new/rustc" >/dev/null <<WRAP
#!/bin/sh
# rustc from Debian sid, run with sid's loader and libc (installed by Cedana's tools/deps.sh).
L=$RUST_SID_PREFIX/usr/lib/x86_64-linux-gnu
exec "\$L/ld-linux-x86-64.so.2" --library-path "\$L:$RUST_SID_PREFIX/usr/lib:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu" $RUST_SID_PREFIX/usr/bin/rustc "\$@"
WRAP
  $SUDO chmod 0755 "$RUST_SID_PREFIX.new/rustc"
  $SUDO rm -rf "$RUST_SID_PREFIX"
  $SUDO mv "$RUST_SID_PREFIX.new" "$RUST_SID_PREFIX"
  rust_sid_ok || { log "rustc at $RUST_SID_PREFIX/rustc does not run"; "$RUST_SID_PREFIX/rustc" --version || true; exit 1; }
  log "$("$RUST_SID_PREFIX/rustc" --version) installed in $RUST_SID_PREFIX"
fi

# moto's EC2 server (the AWS API the AWS provider's tests run against), pinned, in a venv of its
# own made with Debian's python3 (tests/src/moto.rs finds it at $CEDANA_MOTO_PREFIX/bin).
MOTO_PREFIX=${CEDANA_MOTO_PREFIX:-/opt/cedana/moto}
MOTO_VERSION=5.2.5
moto_ok() { [ -x "$MOTO_PREFIX/bin/moto_server" ] && [ "$("$MOTO_PREFIX/bin/python" -c 'import importlib.metadata as m; print(m.version("moto"))' 2>/dev/null)" = "$MOTO_VERSION" ]; }
if moto_ok; then
  log "moto $MOTO_VERSION already in $MOTO_PREFIX"
else
  if ! have_pkgs python3-venv; then
    apt_update
    log "installing python3-venv"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
  fi
  log "installing moto[server,ec2]==$MOTO_VERSION from PyPI into $MOTO_PREFIX"
  # Made in place (a venv's scripts name their interpreter by path); a half-made one fails
  # moto_ok next time and is made again.
  $SUDO rm -rf "$MOTO_PREFIX"
  $SUDO /usr/bin/python3 -m venv "$MOTO_PREFIX"
  $SUDO "$MOTO_PREFIX/bin/pip" install -q --disable-pip-version-check "moto[server,ec2]==$MOTO_VERSION"
  moto_ok || { log "moto $MOTO_VERSION did not install in $MOTO_PREFIX"; exit 1; }
  log "moto $MOTO_VERSION installed in $MOTO_PREFIX"
fi
