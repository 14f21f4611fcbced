#!/usr/bin/env bash
# What CI can prove about the Nix files without building anything (nixpkgs is out of reach on
# these machines, so the flake has never been built or even evaluated against nixpkgs here):
#
#   1. every *.nix file in the repository parses (`nix-instantiate --parse`, which also rejects
#      variables bound nowhere, outside `with` blocks);
#   2. flake.nix's `outputs` takes only declared inputs (and `self`);
#   3. the names of our crates and binaries that the Nix files use exist in the cargo workspace:
#      `-p`/`--package`/`--bin` in `cargo*Flags` lists and in `cargo …` command lines, and
#      `pname`, `mainProgram` and `bin/…` paths whose name starts with `cedana`;
#   4. `cargoLock.lockFile` is the workspace's Cargo.lock and lists every workspace crate, and
#      the source fileset (`lib.fileset.unions [...]`) holds every crate's folder;
#   5. local paths (./images/…, ./Cargo.lock, …) exist and stay inside the repository;
#   6. no placeholder hashes (lib.fakeHash and friends) are left.
#
# Needs nix-instantiate (Debian 12: `apt-get install nix-bin`), python3 and cargo. It uses Nix's
# dummy store, so no /nix, daemon or network is needed, and it works as any user.
# CHECK_NIX_ROOT=DIR checks another tree instead of this repository (the tests use a broken copy).
set -euo pipefail

ROOT=${CHECK_NIX_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
ROOT=$(cd "$ROOT" && pwd -P)

fail() { printf 'check-nix: %s\n' "$*" >&2; exit 1; }

command -v nix-instantiate >/dev/null 2>&1 \
  || fail "nix-instantiate not found: install it (Debian: apt-get install -y nix-bin; tools/deps.sh does) or run inside \`nix develop\`"
command -v python3 >/dev/null 2>&1 || fail "python3 not found (apt-get install -y python3)"
CARGO=${CARGO:-cargo}
command -v "$CARGO" >/dev/null 2>&1 || fail "cargo not found (set CARGO=/path/to/cargo)"
[ -f "$ROOT/Cargo.toml" ] || fail "$ROOT/Cargo.toml: no cargo workspace here (CHECK_NIX_ROOT=$ROOT)"

metadata=$(mktemp)
trap 'rm -f "$metadata"' EXIT
"$CARGO" metadata --no-deps --offline --format-version 1 --manifest-path "$ROOT/Cargo.toml" \
  >"$metadata" || fail "$ROOT/Cargo.toml: cargo metadata failed"

# The parsing and checking is in Python: nix-instantiate prints each file's syntax tree with
# comments gone, path literals made absolute and strings quoted, which is easy to read reliably.
exec python3 - "$ROOT" "$metadata" <<'PY'
import json
import os
import re
import subprocess
import sys

root, metadata_file = sys.argv[1], sys.argv[2]
problems = []


def problem(path, msg):
    line = f"{os.path.relpath(path, root)}: {msg}"
    if line not in problems:
        problems.append(line)


meta = json.load(open(metadata_file))
packages = {p["name"] for p in meta["packages"]}
bins = {t["name"] for p in meta["packages"] for t in p["targets"] if "bin" in t["kind"]}
workspace_root = os.path.realpath(meta["workspace_root"])

# Nix's dummy store: parsing and evaluating plain files needs no /nix, no daemon, no network.
NIX = ["nix-instantiate", "--store", "dummy://"]
env = dict(os.environ, NIX_PATH="")

SKIP_DIRS = {".git", "target", "node_modules", ".direnv", "bench-results"}
files = []
for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
    files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".nix")]
if not files:
    problem(root, "no *.nix files found")


def split(tree):
    """Splits a printed syntax tree into its code (each string literal replaced by "") and the
    contents of its string literals, in order."""
    code, strings, i = [], [], 0
    while i < len(tree):
        c = tree[i]
        if c != '"':
            code.append(c)
            i += 1
            continue
        j, s = i + 1, []
        while j < len(tree) and tree[j] != '"':
            if tree[j] == "\\" and j + 1 < len(tree):
                s.append({"n": "\n", "r": "\r", "t": "\t"}.get(tree[j + 1], tree[j + 1]))
                j += 2
            else:
                s.append(tree[j])
                j += 1
        strings.append("".join(s))
        code.append('""')
        i = j + 1
    return "".join(code), strings


STRING = r'"((?:[^"\\]|\\.)*)"'


def check_cargo_args(path, words, where):
    """`-p NAME`, `--package NAME`, `--package=NAME`, `--bin NAME` in a cargo argument list."""
    for k, w in enumerate(words):
        flag, _, value = w.partition("=")
        if flag not in ("-p", "--package", "--bin"):
            continue
        if not value:
            if k + 1 >= len(words):
                continue
            value = words[k + 1]
        if flag == "--bin":
            if value not in bins:
                problem(path, f"{where}: --bin {value}: no such binary in the workspace (binaries: {', '.join(sorted(bins))})")
        elif value not in packages:
            problem(path, f"{where}: {flag} {value}: no such package in the workspace (packages: {', '.join(sorted(packages))})")


for path in files:
    out = subprocess.run(NIX + ["--parse", path], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        problem(path, "does not parse:\n    " + out.stderr.strip().replace("\n", "\n    "))
        continue
    tree = out.stdout
    code, strings = split(tree)

    # cargo flags given as lists: cargoBuildFlags = [ "-p" "cedana-agent" ];
    for m in re.finditer(r"\b(cargo\w*Flags) = \[([^\]]*)\]", tree):
        words = [re.sub(r"\\(.)", r"\1", s) for s in re.findall(STRING, m.group(2))]
        check_cargo_args(path, words, m.group(1))
    # cargo command lines inside strings (build phases, scripts)
    for s in strings:
        for line in s.splitlines():
            cmd = re.search(r"\bcargo\s+(.*)", line)
            if cmd:
                check_cargo_args(path, cmd.group(1).split(), "cargo command line")

    for attr, names, kind in (("pname", packages, "package"), ("mainProgram", bins, "binary")):
        for m in re.finditer(rf"\b{attr} = {STRING};", tree):
            name = m.group(1)
            if name.startswith("cedana") and name not in names:
                problem(path, f"{attr} = \"{name}\": no such {kind} in the workspace")
    for s in strings:
        for m in re.finditer(r"(?:^|[/\s])bin/(cedana[\w.+-]*)", s):
            if m.group(1) not in bins:
                problem(path, f"bin/{m.group(1)}: no such binary in the workspace (binaries: {', '.join(sorted(bins))})")

    for m in re.finditer(r"\blockFile = ([^;\s]+);", code):
        lock = m.group(1)
        if not lock.startswith("/"):
            continue  # not a literal path; nothing to check without evaluating
        if not os.path.isfile(lock):
            problem(path, f"cargoLock.lockFile {os.path.relpath(lock, root)} does not exist")
        elif os.path.basename(lock) != "Cargo.lock" or os.path.realpath(os.path.dirname(lock)) != workspace_root:
            problem(path, f"cargoLock.lockFile {os.path.relpath(lock, root)} is not the workspace's Cargo.lock")
        else:
            locked = set(re.findall(r'^name = "([^"]+)"$', open(lock).read(), re.M))
            for p in sorted(packages - locked):
                problem(path, f"cargoLock.lockFile {os.path.relpath(lock, root)} does not list the workspace crate {p}: run cargo to update it")

    # The flake's source fileset must hold every crate of the workspace, or cargo cannot
    # build in the Nix sandbox.
    for m in re.finditer(r"fileset\.unions \[([^\]]*)\]", code):
        listed = {os.path.realpath(p) for p in re.findall(r"(?<![\w/])/[\w.+\-/]*", m.group(1))}
        for pkg in meta["packages"]:
            d = os.path.realpath(os.path.dirname(pkg["manifest_path"]))
            if d != workspace_root and d not in listed:
                problem(path, f"the source fileset leaves out the workspace crate {pkg['name']} ({os.path.relpath(d, workspace_root)}/): add it")

    # Path literals are absolute in the printed tree; `//` is the update operator.
    for m in re.finditer(r"(?<![\w/])/[\w.+\-/]*", code):
        p = m.group(0)
        if p == "//":
            continue
        if not (p == root or p.startswith(root + "/")):
            problem(path, f"path {p} is outside the repository")
        elif p.endswith("/") and p != "/":
            if not os.path.isdir(p):
                problem(path, f"path {os.path.relpath(p, root)}/ (start of an interpolated path) is not a folder")
        elif not os.path.exists(p):
            problem(path, f"path {os.path.relpath(p, root)} does not exist")

    for m in re.finditer(r"\b(fakeHash|fakeSha256|fakeSha512)\b", code):
        problem(path, f"placeholder hash lib.{m.group(1)}: put the real hash")
    for s in strings:
        if re.search(r"sha256-A{43}=|^0{52}$", s):
            problem(path, f"placeholder hash {s!r}: put the real hash")

flake = os.path.join(root, "flake.nix")
if os.path.isfile(flake) and not any(p.startswith("flake.nix: does not parse") for p in problems):
    expr = ("let f = import " + json.dumps(flake)[1:-1] + "; in "
            "{ inputs = builtins.attrNames (f.inputs or { }); "
            "args = builtins.attrNames (builtins.functionArgs f.outputs); }")
    out = subprocess.run(NIX + ["--eval", "--strict", "--json", "-E", expr],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        problem(flake, "cannot read inputs and outputs:\n    " + out.stderr.strip().replace("\n", "\n    "))
    else:
        v = json.loads(out.stdout)
        for a in sorted(set(v["args"]) - set(v["inputs"]) - {"self"}):
            problem(flake, f"outputs takes '{a}', which is not among the inputs ({', '.join(v['inputs'])})")

if problems:
    for p in problems:
        print(f"check-nix: {p}", file=sys.stderr)
    print(f"check-nix: FAILED: {len(problems)} problem(s) in the Nix files under {root}", file=sys.stderr)
    sys.exit(1)
print(f"check-nix: OK: {len(files)} Nix files parse; crate and binary names, Cargo.lock and local paths check out")
PY
