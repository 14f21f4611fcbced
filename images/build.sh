#!/usr/bin/env bash
# Builds the worker image without Nix: an OCI image layout and a docker-archive tar holding the
# static cedana-agent, CRIU >= 4.2 with exactly the libraries it loads (sid's glibc is the
# image's libc, so CRIU runs natively, without a wrapper), busybox as the shell and a minimal
# root filesystem. The same inputs give the same manifest digest. See docs/images.md.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../tools/lib.sh"

usage() {
  cat <<'EOF'
Usage: images/build.sh [--agent PATH] [--out DIR] [--criu-prefix DIR] [--busybox PATH | --no-shell] [--json]

  --agent PATH        the static cedana-agent (default: target/x86_64-unknown-linux-gnu/release/
                      cedana-agent, built with tools/lib.sh's build_static_agent when missing)
  --out DIR           where to write DIR/oci (OCI image layout) and DIR/cedana-worker.tar
                      (docker-archive); default target/image
  --criu-prefix DIR   CRIU unpacked from Debian sid by tools/deps.sh (default $CEDANA_CRIU_PREFIX,
                      else /opt/cedana/criu)
  --busybox PATH      static busybox for /bin/sh and the usual commands (default /bin/busybox,
                      from Debian's busybox-static)
  --no-shell          leave busybox out (the daemon's `sh` and `spawn` commands then cannot run)
  --json              print the summary as JSON

SOURCE_DATE_EPOCH sets every timestamp in the image (default 0); PYTHON the interpreter (default
Debian's /usr/bin/python3). Tags: cedana-worker:<agent version> and cedana-worker:latest.
EOF
}

AGENT=""
OUT="$ROOT/target/image"
CRIU_PREFIX=${CEDANA_CRIU_PREFIX:-/opt/cedana/criu}
BUSYBOX=/bin/busybox
JSON=()
while [ $# -gt 0 ]; do
  case $1 in
    --agent) AGENT=${2:?--agent needs a path}; shift 2 ;;
    --out) OUT=${2:?--out needs a directory}; shift 2 ;;
    --criu-prefix) CRIU_PREFIX=${2:?--criu-prefix needs a directory}; shift 2 ;;
    --busybox) BUSYBOX=${2:?--busybox needs a path}; shift 2 ;;
    --no-shell) BUSYBOX=""; shift ;;
    --json) JSON=(--json); shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done

die() { printf 'images/build.sh: %s\n' "$*" >&2; exit 1; }

STARTED=$(date +%s.%N)
EPOCH=${SOURCE_DATE_EPOCH:-0}
[[ $EPOCH =~ ^[0-9]+$ ]] || die "SOURCE_DATE_EPOCH must be whole seconds, not '$EPOCH'"
# Debian's python3 (what tools/deps.sh installs): the gzip bytes depend on its zlib.
PYTHON=${PYTHON:-$(command -v /usr/bin/python3 || command -v python3)} || die "python3 is missing: run tools/deps.sh"
OCI=("$PYTHON" "$ROOT/images/oci.py")

if [ -z "$AGENT" ]; then
  AGENT="$ROOT/target/$TARGET_TRIPLE/release/cedana-agent"
  if [ ! -x "$AGENT" ]; then
    build_static_agent
    AGENT=$AGENT_BIN
  fi
fi
[ -f "$AGENT" ] || die "no agent at $AGENT: build it (tools/lib.sh build_static_agent) or pass --agent"
"${OCI[@]}" static "$AGENT" || die "$AGENT is not a static executable: the image has no libc for it to share; build it with tools/lib.sh's build_static_agent"

L="$CRIU_PREFIX/usr/lib/x86_64-linux-gnu"
LOADER="$L/ld-linux-x86-64.so.2"
CRIU_BIN="$CRIU_PREFIX/usr/sbin/criu"
[ -x "$CRIU_BIN" ] && [ -x "$LOADER" ] || die "no CRIU under $CRIU_PREFIX (expected usr/sbin/criu and sid's loader): run tools/deps.sh"
# The library path tools/deps.sh's criu wrapper uses: sid's libc first, then Debian 12's.
LIBPATH="$L:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# A private copy: a teammate's rebuild of the agent mid-build cannot mix two binaries.
cp "$AGENT" "$WORK/cedana-agent"
AGENT_VERSION=$("$WORK/cedana-agent" --version | awk '{print $2}')
[ -n "$AGENT_VERSION" ] || die "$AGENT --version printed no version"
AGENT_SHA=$(sha256sum "$WORK/cedana-agent" | cut -d' ' -f1)

CRIU_VERSION=$("$LOADER" --library-path "$LIBPATH" "$CRIU_BIN" --version | sed -n 's/^Version: *//p')
[ -n "$CRIU_VERSION" ] || die "$CRIU_BIN --version printed no version"
case $CRIU_VERSION in
  [0-3].*|4.[01]|4.[01].*) die "CRIU $CRIU_VERSION is older than 4.2 (see README \"Install\")" ;;
esac
CRIU_PACKAGE=""
if [ -f "$CRIU_PREFIX/usr/share/doc/criu/changelog.Debian.gz" ]; then
  CRIU_PACKAGE=$(zcat "$CRIU_PREFIX/usr/share/doc/criu/changelog.Debian.gz" | sed -n '1s/^criu (\([^)]*\)).*/criu \1 (Debian)/p')
fi
GLIBC=$("$LOADER" --version | sed -n '1s/^ld.so (\(.*\)) stable release version \(.*\)\.$/\2 (\1)/p')

say "cedana-worker:$AGENT_VERSION: agent $AGENT_SHA, CRIU $CRIU_VERSION, glibc ${GLIBC:-?}, epoch $EPOCH"

# Base layer: the root filesystem, CRIU, its loader and libraries, busybox.
BASE="$WORK/base.list"
{
  for d in dev etc lib64 run usr usr/bin usr/lib usr/lib/x86_64-linux-gnu usr/local usr/local/bin \
           usr/sbin var var/lib var/lib/cedana work; do
    printf 'dir\t%s\t0755\n' "$d"
  done
  printf 'dir\tproc\t0555\ndir\tsys\t0555\ndir\troot\t0700\ndir\ttmp\t1777\ndir\tvar/tmp\t1777\n'
  printf 'symlink\tbin\tusr/bin\nsymlink\tsbin\tusr/sbin\nsymlink\tlib\tusr/lib\n'
  printf 'file\tetc/%s\t0644\t%s/%s\n' passwd "$WORK" passwd group "$WORK" group hosts "$WORK" hosts \
    nsswitch.conf "$WORK" nsswitch.conf
  printf 'file\tusr/sbin/criu\t0755\t%s\n' "$(readlink -f "$CRIU_BIN")"
  printf 'file\tusr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2\t0755\t%s\n' "$(readlink -f "$LOADER")"
  printf 'symlink\tlib64/ld-linux-x86-64.so.2\t../usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2\n'
} >"$BASE"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$WORK/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$WORK/group"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$WORK/hosts"
printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$WORK/nsswitch.conf"
# CA certificates for TLS to NATS (the agent's TLS reads the system store or SSL_CERT_FILE).
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
[ -f "$CA_BUNDLE" ] || die "no $CA_BUNDLE: run tools/deps.sh (ca-certificates)"
cp "$CA_BUNDLE" "$WORK/ca-certificates.crt"
printf 'file\tetc/ssl/certs/ca-certificates.crt\t0644\t%s\n' "$WORK/ca-certificates.crt" >>"$BASE"

# Exactly what CRIU loads, as sid's loader resolves it with the wrapper's library path; each
# goes in under the name CRIU asks for (its soname), as a plain file.
LIST=$("$LOADER" --library-path "$LIBPATH" --list "$CRIU_BIN") || die "sid's loader cannot list CRIU's libraries: $LIST"
if grep -q 'not found' <<<"$LIST"; then die "CRIU needs libraries that are missing (run tools/deps.sh): $(grep 'not found' <<<"$LIST")"; fi
NLIBS=0
while read -r name arrow path _; do
  [ "$arrow" = "=>" ] || continue
  case $name in /*) continue ;; esac   # the loader itself, added above
  printf 'file\tusr/lib/x86_64-linux-gnu/%s\t0644\t%s\n' "$name" "$(readlink -f "$path")" >>"$BASE"
  NLIBS=$((NLIBS + 1))
done <<<"$LIST"

LABELS=(
  "org.opencontainers.image.title=cedana-worker"
  "org.opencontainers.image.description=Cedana worker: cedana-agent with CRIU $CRIU_VERSION"
  "org.opencontainers.image.version=$AGENT_VERSION"
  "dev.cedana.agent.version=$AGENT_VERSION"
  "dev.cedana.agent.sha256=$AGENT_SHA"
  "dev.cedana.criu.version=$CRIU_VERSION"
  "org.opencontainers.image.licenses=Apache-2.0"
  "dev.cedana.requires=root; CAP_SYS_ADMIN CAP_CHECKPOINT_RESTORE CAP_SYS_PTRACE CAP_NET_ADMIN; writable /proc/sys; /dev/net/tun; unconfined seccomp and AppArmor"
)
[ -n "$CRIU_PACKAGE" ] && LABELS+=("dev.cedana.criu.package=$CRIU_PACKAGE")
[ -n "$GLIBC" ] && LABELS+=("dev.cedana.glibc.version=$GLIBC")
BASE_WHAT="root filesystem; CRIU $CRIU_VERSION with glibc ${GLIBC%% *} and $NLIBS libraries"

if [ -n "$BUSYBOX" ]; then
  [ -f "$BUSYBOX" ] || die "no busybox at $BUSYBOX: run tools/deps.sh (busybox-static), or pass --no-shell"
  "${OCI[@]}" static "$BUSYBOX" || die "$BUSYBOX is not static (Debian's busybox-static is)"
  cp "$BUSYBOX" "$WORK/busybox"
  BB_VERSION=$("$WORK/busybox" 2>/dev/null | sed -n '1s/^BusyBox v\([^ ]*\).*/\1/p')
  printf 'file\tusr/bin/busybox\t0755\t%s\n' "$WORK/busybox" >>"$BASE"
  # Every applet as a link in usr/bin or usr/sbin (bin and sbin point there).
  "$WORK/busybox" --list-full | sed -e 's#^bin/#usr/bin/#' -e 's#^sbin/#usr/sbin/#' | sort -u |
    while read -r applet; do
      case $applet in
        usr/bin/busybox|usr/sbin/criu|linuxrc) continue ;;   # linuxrc: an init for initrds
        usr/bin/*) printf 'symlink\t%s\tbusybox\n' "$applet" ;;
        usr/sbin/*) printf 'symlink\t%s\t../bin/busybox\n' "$applet" ;;
        *) die "unexpected busybox applet path $applet" ;;
      esac
    done >>"$BASE"
  LABELS+=("dev.cedana.busybox.version=${BB_VERSION:-unknown}")
  BASE_WHAT="$BASE_WHAT; busybox ${BB_VERSION:-}"
fi

AGENT_LIST="$WORK/agent.list"
printf 'file\tusr/local/bin/cedana-agent\t0755\t%s\n' "$WORK/cedana-agent" >"$AGENT_LIST"

say "writing $OUT/oci and $OUT/cedana-worker.tar"
mkdir -p "$OUT"
"${OCI[@]}" build \
  --layout "$OUT/oci" --archive "$OUT/cedana-worker.tar" \
  --name cedana-worker --tag "$AGENT_VERSION" --tag latest \
  --layer "$BASE" --created-by "images/build.sh: $BASE_WHAT" \
  --layer "$AGENT_LIST" --created-by "images/build.sh: cedana-agent $AGENT_VERSION" \
  --epoch "$EPOCH" \
  --entrypoint '["/usr/local/bin/cedana-agent","daemon"]' \
  --env "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
  --env "HOME=/root" \
  --env "CEDANA_CRIU=/usr/sbin/criu" \
  --env "CEDANA_WORK_DIR=/work" \
  --env "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" \
  --workdir /work \
  "${LABELS[@]/#/--label=}" \
  --started "$STARTED" "${JSON[@]}"
