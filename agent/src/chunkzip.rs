//! A chunked checkpoint in one zip (`dump --chunked`): the store's format, standalone. The zip
//! holds `manifest.json` (format 2: the archive's manifest with each entry's chunks),
//! `restore.sh`, and `chunks/<blake3>` (one zstd frame each, stored as they are). It is the
//! same checkpoint a store holds, so it restores alone (`cedana-agent restore ZIP`), with
//! `unzip` and a shell (`sh restore.sh` rebuilds CRIU's images with `zstd`), or goes into a
//! store as it is.
//!
//! Dump: into a private folder store next to the archive ([`chunked::dump_to_store_then`]),
//! then packed into the zip (written under a temporary name, synced, renamed without
//! replacing anything) before a tree that is to stop is killed; a failure thaws it.
//!
//! Restore ([`crate::lazy`], lazily or in full): the zip's central directory is read, every
//! entry must be `manifest.json`, `restore.sh` or a stored `chunks/<64 hex>` (anything else
//! refuses the archive); each chunk is then read where it lies, when it is needed, and
//! checked against its name before use.

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cedana_store::StoreUrl;
use serde::Serialize;

use crate::archive::{ArchiveError, Manifest, MANIFEST};
use crate::chunked::{self, FORMAT_VERSION};
use crate::criu::Criu;
use crate::dump::{millis, DumpError, DumpOptions};
use crate::progress::Progress;
use crate::restore::RestoreError;
use crate::staging;
use crate::zipfmt::write::{Output, ZipOut};
use crate::zipfmt::ZipError;

/// The script in the zip that rebuilds CRIU's images without the agent.
pub const SCRIPT: &str = "restore.sh";
/// Where the chunks are in the zip (and in a folder store).
pub const CHUNKS: &str = "chunks/";

/// The result of `dump --chunked`.
#[derive(Clone, Debug, Serialize)]
pub struct ChunkZipOutcome {
    pub archive: PathBuf,
    pub archive_bytes: u64,
    pub images_bytes: u64,
    /// Distinct chunks in the archive.
    pub chunks: usize,
    /// How long the tree was stopped (with `--leave-running`: CRIU's dump and the carried
    /// folder's copy; else until the archive was complete).
    #[serde(with = "millis")]
    pub frozen_time: Duration,
    #[serde(with = "millis")]
    pub criu_time: Duration,
    #[serde(with = "millis")]
    pub total_time: Duration,
}

/// Dumps `opts.pid` into `<opts.dir>/<name>_<datetime>.zip` as a chunked checkpoint, chunks at
/// zstd `level`.
pub fn dump_to_zip(
    criu: &Criu,
    opts: &DumpOptions,
    level: i32,
    rt: &tokio::runtime::Handle,
    progress: &dyn Progress,
) -> Result<ChunkZipOutcome, DumpError> {
    let t0 = Instant::now();
    if !opts.dir.is_dir() {
        return Err(DumpError::NoDir {
            path: opts.dir.clone(),
        });
    }
    let root = staging::root(opts.staging.as_deref(), &opts.dir);
    staging::sweep(&root);
    let held =
        staging::Held::create(&root, ".cedana-dump-").map_err(|source| DumpError::Staging {
            path: root.clone(),
            source,
        })?;
    let store_dir = held.path().join("store");
    std::fs::create_dir(&store_dir).map_err(|source| DumpError::Staging {
        path: store_dir.clone(),
        source,
    })?;
    let url = StoreUrl::parse(&store_dir.to_string_lossy())?;
    let inner = DumpOptions {
        staging: Some(held.path().to_path_buf()),
        ..opts.clone()
    };
    let mut packed = None;
    let out = chunked::dump_to_store_then(criu, &inner, &url, level, rt, progress, |name, m| {
        packed = Some(pack(&store_dir, name, m, &opts.dir)?);
        Ok(())
    })?;
    let (archive, archive_bytes, chunks) = packed.expect("packed before the dump returned");
    Ok(ChunkZipOutcome {
        archive,
        archive_bytes,
        images_bytes: out.images_bytes,
        chunks,
        frozen_time: out.frozen_time,
        criu_time: out.criu_time,
        total_time: t0.elapsed(),
    })
}

/// Writes checkpoint `name` of the folder store `store_dir` into `dir/<name>.zip`:
/// (path, bytes, distinct chunks).
fn pack(
    store_dir: &Path,
    name: &str,
    manifest: &Manifest,
    dir: &Path,
) -> Result<(PathBuf, u64, usize), DumpError> {
    let werr = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DumpError::Archive(ArchiveError::Write { path, source })
    };
    let json = std::fs::read(store_dir.join("checkpoints").join(format!("{name}.json")))
        .map_err(werr(store_dir))?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".partial")
        .tempfile_in(dir)
        .map_err(werr(dir))?;
    let (file, tmp) = tmp.into_parts();
    file.try_lock()
        .map_err(|e| werr(dir)(std::io::Error::other(e)))?;
    let mut zip = ZipOut::new(file);
    zip.add_bytes(MANIFEST, &json).map_err(werr(&tmp))?;
    zip.add_bytes(SCRIPT, script(manifest).as_bytes())
        .map_err(werr(&tmp))?;
    let mut seen = std::collections::BTreeSet::new();
    for e in &manifest.entries {
        for c in e.chunks.iter().flatten() {
            if !seen.insert(c.id.to_string()) {
                continue;
            }
            let path = store_dir.join("chunks").join(c.id.to_string());
            let data = std::fs::read(&path).map_err(werr(&path))?;
            zip.add_bytes(&format!("{CHUNKS}{}", c.id), &data)
                .map_err(werr(&tmp))?;
        }
    }
    let (out, bytes) = zip.finish().map_err(werr(&tmp))?;
    let Output::File(file) = out else {
        unreachable!("a zip written to a file")
    };
    let file = file.into_inner().map_err(|e| werr(&tmp)(e.into_error()))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(werr(&tmp))?;
    file.sync_all().map_err(werr(&tmp))?;
    drop(file);
    let mut tmp = tmp;
    for n in 0..1000 {
        let dest = dir.join(if n == 0 {
            format!("{name}.zip")
        } else {
            format!("{name}_{n}.zip")
        });
        match tmp.persist_noclobber(&dest) {
            Ok(()) => {
                if let Ok(d) = File::open(dir) {
                    let _ = d.sync_all();
                }
                return Ok((dest, bytes, seen.len()));
            }
            Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => tmp = e.path,
            Err(e) => return Err(werr(&dest)(e.error)),
        }
    }
    Err(werr(&dir.join(format!("{name}.zip")))(std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        "1000 archives with this name exist",
    )))
}

/// How CRIU's command line spells an option's value (its serde name).
fn cli_word<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// A shell word for `s`.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `restore.sh`: rebuilds every entry of `manifest` from its chunks (checking each against its
/// name when `b3sum` is installed), then says how to restore with CRIU.
pub fn script(manifest: &Manifest) -> String {
    let c = &manifest.criu;
    let mut flags = vec!["--restore-detached".to_string()];
    if c.shell_job {
        flags.push("--shell-job".into());
    }
    if c.tcp_established {
        flags.push("--tcp-established".into());
    }
    if c.tcp_close {
        flags.push("--tcp-close".into());
    }
    if c.ext_unix_sk {
        flags.push("--ext-unix-sk".into());
    }
    if let Some(m) = c.manage_cgroups {
        flags.push(format!("--manage-cgroups={}", cli_word(&m)));
    }
    if let Some(m) = c.network_lock {
        flags.push(format!("--network-lock={}", cli_word(&m)));
    }
    if !c.external.is_empty() {
        // Declared at the dump; the restore names them its own way (mnt[KEY]:PATH, …).
        flags.push("--external RESOURCE (one per resource the dump declared external)".into());
    }
    let mut s = format!(
        "#!/bin/sh\n\
         # Rebuilds this checkpoint's files from its chunks, for a restore without cedana-agent:\n\
         #   unzip -d ckpt CHECKPOINT.zip && cd ckpt && sh {SCRIPT}\n\
         # then, as root: criu restore -D images {flags}\n\
         # Needs zstd; each chunk is checked against its name (its BLAKE3) when b3sum is\n\
         # installed. `cedana-agent restore CHECKPOINT.zip` does all of it, and more checks.\n\
         set -eu\n\
         cd \"$(dirname \"$0\")\"\n\
         command -v zstd >/dev/null || {{ echo 'restore.sh: zstd is needed' >&2; exit 1; }}\n\
         chunk() {{\n\
         \x20 if command -v b3sum >/dev/null; then\n\
         \x20   sum=$(zstd -dcq \"chunks/$1\" | b3sum --no-names)\n\
         \x20   [ \"$sum\" = \"$1\" ] || {{ echo \"restore.sh: chunk $1 is damaged\" >&2; exit 1; }}\n\
         \x20 fi\n\
         \x20 zstd -dcq \"chunks/$1\"\n\
         }}\n",
        flags = flags.join(" ")
    );
    for e in &manifest.entries {
        let name = quote(&e.name);
        s.push_str(&format!("mkdir -p \"$(dirname {name})\"\n: > {name}\n"));
        for ch in e.chunks.iter().flatten() {
            s.push_str(&format!("chunk {} >> {name}\n", ch.id));
        }
    }
    s.push_str(&format!(
        "echo 'images rebuilt; restore with: criu restore -D images {}'\n",
        flags.join(" ")
    ));
    s
}

/// Whether `path` is a chunked archive: a zip whose `manifest.json` says format 2. Anything
/// unreadable is not (the archive reader then says why).
pub fn is_chunked(path: &Path) -> bool {
    let Ok(f) = File::open(path) else {
        return false;
    };
    let Ok(mut z) = zip::ZipArchive::new(f) else {
        return false;
    };
    let Ok(m) = z.by_name(MANIFEST) else {
        return false;
    };
    let mut text = Vec::new();
    use std::io::Read;
    if m.take(16 << 20).read_to_end(&mut text).is_err() {
        return false;
    }
    serde_json::from_slice::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("format_version").and_then(|v| v.as_u64()))
        == Some(u64::from(FORMAT_VERSION))
}

impl From<ZipError> for RestoreError {
    fn from(e: ZipError) -> Self {
        RestoreError::Archive(e.into())
    }
}
