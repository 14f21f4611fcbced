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
//! Restore: the zip is read front to back into a private folder store: `manifest.json`, and
//! `chunks/<64 hex>` entries stored as they are (never a link, never twice, never anything
//! else: any other name, a compressed entry, a link or a folder refuses the archive); then the
//! store's restore checks the manifest whole and every chunk against its name.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cedana_store::StoreUrl;
use serde::Serialize;

use crate::archive::{ArchiveError, Manifest, MANIFEST};
use crate::chunked::{self, FORMAT_VERSION};
use crate::criu::Criu;
use crate::dump::{millis, DumpError, DumpOptions};
use crate::progress::Progress;
use crate::restore::{RestoreError, RestoreOptions, RestoreOutcome};
use crate::staging;
use crate::zipfmt::read::{LocalHeader, Place, ReadChunks};
use crate::zipfmt::write::{Output, ZipOut};
use crate::zipfmt::{ZipError, STORED};

/// The script in the zip that rebuilds CRIU's images without the agent.
pub const SCRIPT: &str = "restore.sh";
/// Where the chunks are in the zip (and in a folder store).
pub const CHUNKS: &str = "chunks/";
/// The name the checkpoint has in the private store of a restore when the archive's own
/// name cannot be one.
const NAME: &str = "archive";

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

/// A shell word for `s`.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `restore.sh`: rebuilds every entry of `manifest` from its chunks (checking each against its
/// name when `b3sum` is installed), then says how to restore with CRIU.
pub fn script(manifest: &Manifest) -> String {
    let c = &manifest.criu;
    let mut flags = vec!["--restore-detached"];
    if c.shell_job {
        flags.push("--shell-job");
    }
    if c.tcp_established {
        flags.push("--tcp-established");
    }
    if c.tcp_close {
        flags.push("--tcp-close");
    }
    if c.ext_unix_sk {
        flags.push("--ext-unix-sk");
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

/// Restores the chunked archive `opts.archive` (see the module's documentation).
pub fn restore_from_zip(
    criu: &Criu,
    opts: &RestoreOptions,
    rt: &tokio::runtime::Handle,
    progress: &dyn Progress,
) -> Result<RestoreOutcome, RestoreError> {
    let path = &opts.archive;
    let root = crate::restore::staging_root_for(opts)?;
    staging::sweep(&root);
    let held = staging::Held::create(&root, ".cedana-restore-").map_err(|source| {
        RestoreError::Staging {
            path: root.clone(),
            source,
        }
    })?;
    let store_dir = held.path().join("store");
    for d in ["chunks", "checkpoints"] {
        std::fs::create_dir_all(store_dir.join(d)).map_err(|source| RestoreError::Staging {
            path: store_dir.clone(),
            source,
        })?;
    }
    // The checkpoint is named as the archive is (CRIU's log of a failed restore is kept next
    // to it under that name).
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| cedana_store::valid_name(s))
        .unwrap_or_else(|| NAME.to_string());
    unpack(path, &store_dir, &name, progress)?;
    let url = StoreUrl::parse(&store_dir.to_string_lossy())
        .map_err(|e| RestoreError::Store(Box::new(e)))?;
    let inner = RestoreOptions {
        staging: Some(root.clone()),
        ..opts.clone()
    };
    chunked::restore_from_store(criu, &url, &name, &inner, rt, progress).map_err(|e| {
        // The private store is this archive: errors name the archive, not the folder.
        use cedana_store::StoreError as S;
        let corrupt = |reason: String| {
            RestoreError::Archive(ArchiveError::Corrupt {
                path: path.clone(),
                reason,
            })
        };
        match e {
            RestoreError::Store(s) => match *s {
                S::MissingChunk { chunk, .. } => corrupt(format!("chunk {chunk} is missing")),
                S::BadChunk { chunk, reason, .. } => {
                    corrupt(format!("chunk {chunk} is damaged: {reason}"))
                }
                S::BadManifest { reason, .. } => RestoreError::Archive(ArchiveError::BadManifest {
                    path: path.clone(),
                    reason,
                }),
                S::NoCheckpoint { .. } => {
                    RestoreError::Archive(ArchiveError::NoManifest { path: path.clone() })
                }
                other => RestoreError::Store(Box::new(other)),
            },
            RestoreError::Archive(a) => RestoreError::Archive(relabel(a, &url, &name, path)),
            RestoreError::Criu { source, kept, .. } => RestoreError::Criu {
                path: path.clone(),
                source,
                kept,
            },
            other => other,
        }
    })
}

/// An archive error of the private store's checkpoint, said of the archive `path`.
fn relabel(e: ArchiveError, store: &StoreUrl, name: &str, path: &Path) -> ArchiveError {
    let label = PathBuf::from(format!("{store}/{name}"));
    match e {
        ArchiveError::NoRoom {
            path: p,
            need,
            free,
            staging,
        } if p == label => ArchiveError::NoRoom {
            path: path.to_path_buf(),
            need,
            free,
            staging,
        },
        other => other,
    }
}

/// The most entries a chunked archive may hold.
const MAX_ENTRIES: usize = 4_000_000;

/// Reads the zip at `path` into the folder store `store_dir`.
fn unpack(
    path: &Path,
    store_dir: &Path,
    name: &str,
    progress: &dyn Progress,
) -> Result<(), RestoreError> {
    let file = File::open(path).map_err(|source| ArchiveError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let corrupt = |reason: String| ArchiveError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let mut src = ReadChunks::new(file);
    let mut count = 0usize;
    let mut seen = std::collections::BTreeSet::new();
    let chunks = store_dir.join("chunks");
    let mut place = |h: &LocalHeader| -> Result<Place, ArchiveError> {
        count += 1;
        if count > MAX_ENTRIES {
            return Err(corrupt(format!("more than {MAX_ENTRIES} entries")));
        }
        if h.method != STORED {
            return Err(corrupt(format!(
                "entry {:?} is compressed; a chunked archive's entries are stored",
                h.name
            )));
        }
        if !seen.insert(h.name.clone()) {
            return Err(corrupt(format!("entry {:?} is there twice", h.name)));
        }
        match h.name.as_str() {
            MANIFEST => Ok(Place::Memory(16 << 20)),
            SCRIPT => Ok(Place::Memory(64 << 20)),
            name => {
                let id = name
                    .strip_prefix(CHUNKS)
                    .filter(|id| {
                        id.len() == 64
                            && id
                                .bytes()
                                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                    })
                    .ok_or_else(|| ArchiveError::UnlistedEntry {
                        path: path.to_path_buf(),
                        name: name.to_string(),
                    })?;
                let dest = chunks.join(id);
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&dest)
                    .map_err(|source| ArchiveError::Write {
                        path: dest.clone(),
                        source,
                    })?;
                Ok(Place::File(f, dest))
            }
        }
    };
    let listing =
        crate::zipfmt::read::read_with(&mut src, path, &BTreeMap::new(), &mut place, progress)
            .map_err(|e: ArchiveError| e)?;
    if let Some(n) = listing.not_files.first() {
        return Err(corrupt(format!("entry {n:?} is a link or a folder")).into());
    }
    let manifest = listing
        .entries
        .iter()
        .find(|e| e.name == MANIFEST)
        .and_then(|e| e.data.clone())
        .ok_or(ArchiveError::NoManifest {
            path: path.to_path_buf(),
        })?;
    let dest = store_dir.join("checkpoints").join(format!("{name}.json"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&dest)
        .and_then(|mut f| f.write_all(&manifest).map(|()| f))
        .map_err(|source| ArchiveError::Write {
            path: dest.clone(),
            source,
        })?;
    let _ = f.flush();
    Ok(())
}

impl From<ZipError> for RestoreError {
    fn from(e: ZipError) -> Self {
        RestoreError::Archive(e.into())
    }
}
