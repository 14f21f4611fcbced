#!/usr/bin/env python3
"""Writes a reproducible OCI image (layout directory and docker-archive tar) from layer lists.

images/build.sh decides what goes into the image; this file only knows how to write it so that
the same inputs give the same bytes: entries sorted, every timestamp the given epoch, owner 0:0
without names, modes given explicitly, gzip headers without a name or time, JSON with sorted keys.

Layer list format, one entry per line, fields separated by tabs:

    dir      PATH  MODE           (MODE in octal, e.g. 0755 or 1777)
    file     PATH  MODE  SOURCE   (SOURCE is read from the build machine)
    symlink  PATH  TARGET

PATH is relative to the image's root. Missing parent directories are added with mode 0755.

Commands:
    oci.py build ...        write the image (see --help)
    oci.py static FILE      exit 0 if FILE is an ELF executable without a program interpreter
"""

import argparse
import datetime
import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import sys
import tarfile
import tempfile
import time

CHUNK = 1 << 20
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def fail(msg):
    print(f"oci.py: {msg}", file=sys.stderr)
    sys.exit(1)


def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class Entry:
    __slots__ = ("path", "kind", "mode", "source", "target")

    def __init__(self, path, kind, mode=0o755, source=None, target=None):
        self.path, self.kind, self.mode, self.source, self.target = path, kind, mode, source, target


def parse_list(list_path):
    """Reads a layer list into {path: Entry}, adding missing parent directories."""
    entries = {}
    with open(list_path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line or line.startswith("#"):
                continue
            fields = line.split("\t")
            where = f"{list_path}:{n}"
            kind = fields[0]
            if len(fields) < 3:
                fail(f"{where}: too few fields in {line!r}")
            path = fields[1].strip("/")
            if not path or ".." in path.split("/"):
                fail(f"{where}: bad path {fields[1]!r}")
            if kind == "dir" and len(fields) == 3:
                e = Entry(path, "dir", int(fields[2], 8))
            elif kind == "file" and len(fields) == 4:
                if not os.path.isfile(fields[3]):
                    fail(f"{where}: source {fields[3]} is not a file")
                e = Entry(path, "file", int(fields[2], 8), source=fields[3])
            elif kind == "symlink" and len(fields) == 3:
                e = Entry(path, "symlink", 0o777, target=fields[2])
            else:
                fail(f"{where}: cannot read {line!r}")
            if path in entries:
                fail(f"{where}: {path} listed twice")
            entries[path] = e
    for path in list(entries):
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in entries:
                entries[parent] = Entry(parent, "dir", 0o755)
            elif entries[parent].kind != "dir":
                fail(f"{list_path}: {parent} is a parent of {path} but not a directory")
    return entries


class HashingWriter(io.RawIOBase):
    """Forwards writes to a file while hashing and counting them."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def writable(self):
        return True

    def tell(self):
        return self.size

    def write(self, b):
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)


def write_layer(entries, epoch, tar_path, gz_path):
    """Writes the layer as a tar and its gzip; returns (diff_id, tar size, digest, gz size)."""
    with open(tar_path, "wb") as raw:
        hw = HashingWriter(raw)
        # PAX only adds extended headers when a field needs one (long names); none carry times.
        with tarfile.open(fileobj=hw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(entries, key=lambda p: p.split("/")):
                e = entries[path]
                ti = tarfile.TarInfo(path)
                ti.mtime = epoch
                ti.uid = ti.gid = 0
                ti.uname = ti.gname = ""
                ti.mode = e.mode
                if e.kind == "dir":
                    ti.type = tarfile.DIRTYPE
                    tar.addfile(ti)
                elif e.kind == "symlink":
                    ti.type = tarfile.SYMTYPE
                    ti.linkname = e.target
                    tar.addfile(ti)
                else:
                    ti.type = tarfile.REGTYPE
                    ti.size = os.path.getsize(e.source)
                    with open(e.source, "rb") as src:
                        tar.addfile(ti, src)
        diff_id, tar_size = "sha256:" + hw.sha.hexdigest(), hw.size
    with open(tar_path, "rb") as src, open(gz_path, "wb") as raw:
        hw = HashingWriter(raw)
        # No file name and mtime 0 in the gzip header; level 9 is what zlib gives for it.
        with gzip.GzipFile(filename="", mode="wb", fileobj=hw, compresslevel=9, mtime=0) as gz:
            shutil.copyfileobj(src, gz, CHUNK)
        digest, gz_size = "sha256:" + hw.sha.hexdigest(), hw.size
    return diff_id, tar_size, digest, gz_size


def put_blob(blobs, data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, digest[7:]), "wb") as f:
        f.write(data)
    return digest, len(data)


def add_bytes(tar, name, data, epoch):
    ti = tarfile.TarInfo(name)
    ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname, ti.mode = epoch, 0, 0, "", "", 0o644
    ti.size = len(data)
    tar.addfile(ti, io.BytesIO(data))


def add_file(tar, name, path, epoch):
    ti = tarfile.TarInfo(name)
    ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname, ti.mode = epoch, 0, 0, "", "", 0o644
    ti.size = os.path.getsize(path)
    with open(path, "rb") as f:
        tar.addfile(ti, f)


def replace_dir(tmp, final):
    old = None
    if os.path.lexists(final):
        old = final + ".old"
        if os.path.lexists(old):
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    if old:
        shutil.rmtree(old)


def human(n):
    return f"{n / (1 << 20):.1f} MiB"


def build(a):
    started = a.started if a.started is not None else time.time()
    if len(a.layer) != len(a.created_by):
        fail("give one --created-by per --layer")
    created = datetime.datetime.fromtimestamp(a.epoch, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    layout = os.path.abspath(a.layout)
    archive = os.path.abspath(a.archive)
    parent = os.path.dirname(layout)
    os.makedirs(parent, exist_ok=True)
    os.makedirs(os.path.dirname(archive), exist_ok=True)
    tmp_layout = tempfile.mkdtemp(prefix=".oci-", dir=parent)
    scratch = tempfile.mkdtemp(prefix=".layers-", dir=parent)
    try:
        blobs = os.path.join(tmp_layout, "blobs", "sha256")
        os.makedirs(blobs)
        layers = []
        for i, (lst, comment) in enumerate(zip(a.layer, a.created_by)):
            entries = parse_list(lst)
            tar_path = os.path.join(scratch, f"{i}.tar")
            gz_path = os.path.join(scratch, f"{i}.tar.gz")
            diff_id, tar_size, digest, gz_size = write_layer(entries, a.epoch, tar_path, gz_path)
            os.rename(gz_path, os.path.join(blobs, digest[7:]))
            layers.append(
                {
                    "diff_id": diff_id,
                    "digest": digest,
                    "size": gz_size,
                    "uncompressed_size": tar_size,
                    "tar": tar_path,
                    "created_by": comment,
                    "entries": len(entries),
                }
            )
        labels = dict(kv.split("=", 1) for kv in a.label)
        config = {
            "architecture": "amd64",
            "os": "linux",
            "created": created,
            "config": {
                "Entrypoint": json.loads(a.entrypoint),
                "Env": a.env,
                "WorkingDir": a.workdir,
                "Labels": labels,
            },
            "rootfs": {"type": "layers", "diff_ids": [l["diff_id"] for l in layers]},
            "history": [{"created": created, "created_by": l["created_by"]} for l in layers],
        }
        config_bytes = canonical_json(config)
        config_digest, config_size = put_blob(blobs, config_bytes)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
            "layers": [
                {"mediaType": OCI_LAYER_GZIP, "digest": l["digest"], "size": l["size"]}
                for l in layers
            ],
            "annotations": {"org.opencontainers.image.created": created},
        }
        manifest_digest, manifest_size = put_blob(blobs, canonical_json(manifest))
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": manifest_digest,
                    "size": manifest_size,
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {
                        "org.opencontainers.image.ref.name": tag,
                        "io.containerd.image.name": f"{a.name}:{tag}",
                    },
                }
                for tag in a.tag
            ],
        }
        with open(os.path.join(tmp_layout, "index.json"), "wb") as f:
            f.write(canonical_json(index))
        with open(os.path.join(tmp_layout, "oci-layout"), "wb") as f:
            f.write(canonical_json({"imageLayoutVersion": "1.0.0"}))
        for d, _, files in os.walk(tmp_layout):
            os.chmod(d, 0o755)
            for name in files:
                os.chmod(os.path.join(d, name), 0o644)

        # docker-archive (what `docker save` writes and `docker load` reads): the same config,
        # so the image ID is the config digest, and the layers uncompressed.
        tmp_archive = archive + ".tmp"
        with open(tmp_archive, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
                add_bytes(tar, config_digest[7:] + ".json", config_bytes, a.epoch)
                for l in layers:
                    add_file(tar, l["diff_id"][7:] + "/layer.tar", l["tar"], a.epoch)
                docker_manifest = [
                    {
                        "Config": config_digest[7:] + ".json",
                        "RepoTags": [f"{a.name}:{tag}" for tag in a.tag],
                        "Layers": [l["diff_id"][7:] + "/layer.tar" for l in layers],
                    }
                ]
                add_bytes(tar, "manifest.json", canonical_json(docker_manifest), a.epoch)
        os.chmod(tmp_archive, 0o644)
        os.replace(tmp_archive, archive)
        replace_dir(tmp_layout, layout)
        tmp_layout = None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if tmp_layout:
            shutil.rmtree(tmp_layout, ignore_errors=True)

    for l in layers:
        del l["tar"]
    compressed = manifest_size + config_size + sum(l["size"] for l in layers)
    summary = {
        "name": a.name,
        "tags": a.tag,
        "manifest_digest": manifest_digest,
        "config_digest": config_digest,
        "layers": layers,
        "compressed_size": compressed,
        "uncompressed_size": sum(l["uncompressed_size"] for l in layers),
        "labels": labels,
        "created": created,
        "oci_layout": layout,
        "docker_archive": archive,
        "docker_archive_size": os.path.getsize(archive),
        "build_seconds": round(time.time() - started, 2),
    }
    if a.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return
    print(f"{a.name}: tags {', '.join(a.tag)}")
    print(f"  manifest        {manifest_digest}")
    print(f"  config          {config_digest} (the image ID)")
    for i, l in enumerate(layers, 1):
        print(
            f"  layer {i}         {l['digest']}  {human(l['size'])} gzip, "
            f"{human(l['uncompressed_size'])} tar, {l['entries']} entries: {l['created_by']}"
        )
    print(
        f"  image size      {human(summary['compressed_size'])} compressed, "
        f"{human(summary['uncompressed_size'])} uncompressed"
    )
    print(f"  OCI layout      {layout}  (skopeo inspect oci:{layout}:{a.tag[0]})")
    print(f"  docker archive  {archive}  {human(summary['docker_archive_size'])}  (docker load -i)")
    print(f"  built in        {summary['build_seconds']} s")


def is_static(path):
    """True if `path` is an ELF executable without PT_INTERP (no dynamic loader needed)."""
    with open(path, "rb") as f:
        ident = f.read(64)
        if len(ident) < 64 or ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
            fail(f"{path} is not a 64-bit little-endian ELF file")
        phoff, = struct.unpack_from("<Q", ident, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", ident, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        p_type, = struct.unpack_from("<I", table, i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write the OCI layout and the docker-archive")
    b.add_argument("--layout", required=True, help="OCI image layout directory to (re)create")
    b.add_argument("--archive", required=True, help="docker-archive tar to (re)create")
    b.add_argument("--name", required=True, help="repository name, e.g. cedana-worker")
    b.add_argument("--tag", action="append", required=True, help="tag (repeat)")
    b.add_argument("--layer", action="append", required=True, help="layer list file (repeat)")
    b.add_argument("--created-by", action="append", required=True, help="history per layer")
    b.add_argument("--epoch", type=int, required=True, help="every timestamp (seconds)")
    b.add_argument("--entrypoint", required=True, help="JSON array")
    b.add_argument("--env", action="append", default=[], help="K=V (repeat)")
    b.add_argument("--label", action="append", default=[], help="K=V (repeat)")
    b.add_argument("--workdir", default="/")
    b.add_argument("--started", type=float, help="when the build began (for the time figure)")
    b.add_argument("--json", action="store_true", help="print the summary as JSON")
    s = sub.add_parser("static", help="is FILE a static ELF executable")
    s.add_argument("file")
    a = p.parse_args()
    if a.cmd == "build":
        build(a)
    else:
        sys.exit(0 if is_static(a.file) else 1)


if __name__ == "__main__":
    main()
