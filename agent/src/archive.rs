//! The checkpoint archive: a zip holding CRIU's images under `images/` and `manifest.json`
//! (format version, process, host, CRIU, CPU, and the size and SHA-256 of every other entry).
//!
//! Invariants: an archive appears under its final name only when complete and synced (it is
//! written under a temporary name in the same directory, then renamed without replacing
//! anything); nothing from an archive reaches the system before every entry name, size and
//! checksum has been verified.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::criu::images::CpuInfo;
use crate::hashing::{self, HashPipe, CHUNK};
use crate::progress::{NoProgress, Progress};
use crate::zipin;
use crate::zipout::{self, ZipOut};
use std::os::fd::AsRawFd;

/// The manifest format this agent writes and the only one it restores.
pub const FORMAT_VERSION: u32 = 1;
/// Name of the manifest entry.
pub const MANIFEST: &str = "manifest.json";
/// Folder of CRIU's images inside the archive.
pub const IMAGES_DIR: &str = "images";

/// Errors writing or reading an archive. Each names the archive.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("cannot open archive {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("archive {path} is corrupt or truncated ({reason}); it cannot be restored, use an earlier checkpoint")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "archive {path} has no manifest.json; it was not written by cedana-agent or is damaged"
    )]
    NoManifest { path: PathBuf },
    #[error("archive {path} has an unreadable manifest.json: {reason}")]
    BadManifest { path: PathBuf, reason: String },
    #[error("archive {path} has manifest format version {found}, this agent reads version {FORMAT_VERSION}; restore it with a cedana-agent of the matching version")]
    UnsupportedVersion { path: PathBuf, found: u64 },
    #[error("archive {path} has an unsafe entry name {name:?} (absolute, `..`, or outside images/ and files/); refusing to restore it")]
    UnsafeEntry { path: PathBuf, name: String },
    #[error("archive {path} holds entry {name:?}, which its manifest does not list; refusing to restore it")]
    UnlistedEntry { path: PathBuf, name: String },
    #[error("archive {path} lacks entry {name:?} that its manifest lists; it is incomplete")]
    MissingEntry { path: PathBuf, name: String },
    #[error("archive {path}: entry {name:?} has {what} {actual}, the manifest says {expected}; the archive was altered or damaged")]
    Mismatch {
        path: PathBuf,
        name: String,
        what: &'static str,
        expected: String,
        actual: String,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("archive {path} cannot be read front to back: its stored entry {name:?} has no size in its header (written by an older agent); read it from a file")]
    Unstreamable { path: PathBuf, name: String },
    #[error("cannot read {path}: {source}")]
    ReadInput {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ArchiveError {
    /// The same error naming the archive `label` (say, the object a downloaded file came from).
    pub fn relabel(mut self, label: &Path) -> Self {
        use ArchiveError::*;
        match &mut self {
            Open { path, .. }
            | Corrupt { path, .. }
            | NoManifest { path }
            | BadManifest { path, .. }
            | UnsupportedVersion { path, .. }
            | UnsafeEntry { path, .. }
            | UnlistedEntry { path, .. }
            | MissingEntry { path, .. }
            | Mismatch { path, .. }
            | Unstreamable { path, .. } => *path = label.to_path_buf(),
            // The file written or read is what these are about.
            Write { .. } | ReadInput { .. } => {}
        }
        self
    }
}

pub use cedana_protocol::Compression;

/// Size and checksum of one archive entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// The process a checkpoint holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestProcess {
    pub name: String,
    pub pid: i32,
    pub cmdline: Vec<String>,
    pub cwd: PathBuf,
    pub exe: Option<PathBuf>,
    /// Processes in the dumped tree.
    pub tree_size: usize,
    /// Their PIDs, root first: a tree outside its own PID namespace needs them free on restore.
    #[serde(default)]
    pub tree_pids: Vec<i32>,
    pub rss_bytes: u64,
}

/// The machine a checkpoint was taken on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestHost {
    pub hostname: String,
    pub kernel: String,
    pub arch: String,
}

/// The CRIU that wrote the images and the options they need on restore.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestCriu {
    pub version: String,
    pub shell_job: bool,
    pub tcp_established: bool,
    pub tcp_close: bool,
    pub ext_unix_sk: bool,
    /// The tree was the init of its own PID namespace (restorable side by side).
    pub pid_namespace: bool,
}

/// `manifest.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub agent_version: String,
    pub process: ManifestProcess,
    pub host: ManifestHost,
    pub criu: ManifestCriu,
    pub cpu: Option<CpuInfo>,
    pub compression: Compression,
    /// Every entry but the manifest itself.
    pub entries: Vec<Entry>,
    /// The folder the checkpoint carries (its files are the `files/` entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<crate::files::ManifestFiles>,
}

impl Manifest {
    /// Total uncompressed size of the entries.
    pub fn total_size(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }
}

/// Size, CRC-32 and SHA-256 of a file's contents, computed while it was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digest {
    pub size: u64,
    pub crc: u32,
    pub sha256: String,
}

/// Reads a file as it grows (see [`Writer::add`] for `complete`) and returns its digest. With
/// `writeback`, each range read is also handed to the kernel for writeback, so that syncing the
/// file later has little left to do.
pub fn digest_following(
    path: &Path,
    complete: &dyn Fn() -> bool,
    writeback: bool,
    progress: &dyn Progress,
) -> Result<Digest, ArchiveError> {
    let rerr = |source| ArchiveError::ReadInput {
        path: path.to_path_buf(),
        source,
    };
    let mut src = File::open(path).map_err(rerr)?;
    let mut crc = crc32fast::Hasher::new();
    let mut pipe = HashPipe::new();
    let mut size = 0u64;
    let mut buf = pipe.buffer();
    while let Some(n) = read_following(&mut src, &mut buf, complete).map_err(rerr)? {
        crc.update(&buf);
        if writeback {
            // SAFETY: a plain syscall on an fd we own; failure only means no early writeback.
            unsafe {
                libc::sync_file_range(
                    src.as_raw_fd(),
                    size as i64,
                    n as i64,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
        }
        size += n as u64;
        progress.advance(n as u64);
        pipe.hash(buf);
        buf = pipe.buffer();
    }
    Ok(Digest {
        size,
        crc: crc.finalize(),
        sha256: pipe.finish(),
    })
}

/// Fills `buf` from `src`; at end of file waits (polling) until `complete()` and reads once
/// more, so nothing written before completion is missed. `None` at the true end.
fn read_following(
    src: &mut File,
    buf: &mut Vec<u8>,
    complete: &dyn Fn() -> bool,
) -> std::io::Result<Option<usize>> {
    loop {
        let n = hashing::fill(src, buf)?;
        if n > 0 {
            return Ok(Some(n));
        }
        if complete() {
            let n = hashing::fill(src, buf)?;
            return Ok((n > 0).then_some(n));
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// An archive being written: under a temporary name in its final folder (or in a staging
/// folder on the same filesystem) until [`Writer::finish`] syncs it and gives it its name; or
/// into a [`zipout::Sink`] that commits it at the end. Dropped unfinished, it leaves nothing.
pub struct Writer {
    dest: Dest,
    zip: ZipOut,
    compression: Compression,
    entries: Vec<Entry>,
}

/// Where a [`Writer`]'s archive goes.
enum Dest {
    Folder {
        dir: PathBuf,
        tmp: tempfile::TempPath,
    },
    /// `label` names the archive in errors.
    Sink { label: PathBuf },
}

/// Where a finished archive is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finished {
    /// A file.
    File(PathBuf),
    /// The name a [`zipout::Sink`] committed it under (an object in the object store), and
    /// its size.
    Committed { name: String, bytes: u64 },
}

impl Writer {
    /// Starts an archive in `dir`; `stem` only names the temporary file.
    pub fn new(dir: &Path, stem: &str, compression: Compression) -> Result<Self, ArchiveError> {
        let werr = |source| ArchiveError::Write {
            path: dir.to_path_buf(),
            source,
        };
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{stem}."))
            .suffix(".partial")
            .tempfile_in(dir)
            .map_err(werr)?;
        let (file, tmp) = tmp.into_parts();
        Ok(Writer {
            dest: Dest::Folder {
                dir: dir.to_path_buf(),
                tmp,
            },
            zip: ZipOut::new(file),
            compression,
            entries: Vec::new(),
        })
    }

    /// Starts an archive written to `sink` front to back; `label` names it in errors. Stored
    /// entries of complete files get their sizes in their local header; the sizes of followed
    /// ones (page images stored while CRIU writes them) are handed to the sink on commit. So
    /// the archive can be read front to back as it arrives (see [`extract_stream`]).
    pub fn to_sink(sink: Box<dyn zipout::Sink>, label: &str, compression: Compression) -> Self {
        Writer {
            dest: Dest::Sink {
                label: PathBuf::from(label),
            },
            zip: ZipOut::to(zipout::Output::Sink(sink)),
            compression,
            entries: Vec::new(),
        }
    }

    /// Makes the file at `path` (on the same filesystem as `dir`) the archive, its contents the
    /// stored entry `name`, without copying them (see [`ZipOut::adopt`]). Returns `Ok(None)`
    /// where the filesystem cannot do that; the file is then unchanged.
    pub fn adopt(
        dir: &Path,
        path: &Path,
        name: &str,
        digest: &Digest,
    ) -> Result<Option<Self>, ArchiveError> {
        let werr = |source| ArchiveError::Write {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(werr)?;
        match ZipOut::adopt(file, name, digest.size, digest.crc) {
            Ok(zip) => Ok(Some(Writer {
                dest: Dest::Folder {
                    dir: dir.to_path_buf(),
                    tmp: tempfile::TempPath::try_from_path(path).map_err(werr)?,
                },
                zip,
                compression: Compression::None,
                entries: vec![Entry {
                    name: name.into(),
                    size: digest.size,
                    sha256: digest.sha256.clone(),
                }],
            })),
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => Ok(None),
            Err(e) => Err(werr(e)),
        }
    }

    /// Whether the archive goes to a sink rather than a file.
    pub fn is_sink(&self) -> bool {
        matches!(self.dest, Dest::Sink { .. })
    }

    fn label(&self) -> PathBuf {
        match &self.dest {
            Dest::Folder { tmp, .. } => tmp.to_path_buf(),
            Dest::Sink { label } => label.clone(),
        }
    }

    fn werr(&self, source: std::io::Error) -> ArchiveError {
        ArchiveError::Write {
            path: self.label(),
            source,
        }
    }

    /// Adds the file at `path` as entry `name`, compressed as the archive says. With
    /// `complete`, the file may still be growing: at its end the writer waits until
    /// `complete()` is true, then takes what remains. This lets CRIU's page images stream into
    /// the archive while CRIU still writes them.
    pub fn add(
        &mut self,
        name: &str,
        path: &Path,
        complete: Option<&dyn Fn() -> bool>,
        progress: &dyn Progress,
    ) -> Result<u64, ArchiveError> {
        if self.compression == Compression::None && complete.is_none() && self.is_sink() {
            // A complete file into a sink: digested first, so that its local header can carry
            // its size and CRC-32 (the copy checks the CRC-32 again).
            let digest = digest_following(path, &|| true, false, &NoProgress)?;
            self.copy_in(name, path, &digest, true, progress)?;
            return Ok(digest.size);
        }
        let rerr = |source| ArchiveError::ReadInput {
            path: path.to_path_buf(),
            source,
        };
        // A followed image (one CRIU is writing) that streams out to a sink is not needed once
        // read: its ranges are dropped behind the reader, so it never takes more than a few
        // MiB of memory and never reaches the disk.
        let mut punch = self.is_sink() && complete.is_some();
        let mut src = std::fs::OpenOptions::new()
            .read(true)
            .write(punch)
            .open(path)
            .map_err(rerr)?;
        let done = || true;
        let complete = complete.unwrap_or(&done);
        if self.compression == Compression::None && self.is_sink() {
            return self.add_stored_to_sink(name, &mut src, complete, punch, progress);
        }
        let method = match self.compression {
            Compression::None => zipout::STORED,
            Compression::Zstd => zipout::ZSTD,
            Compression::Deflate => zipout::DEFLATED,
        };
        self.zip
            .begin_entry(name, method)
            .map_err(|e| self.werr(e))?;
        let start = self.zip.position();
        let mut crc = crc32fast::Hasher::new();
        let mut pipe = HashPipe::new();
        let mut written = 0u64;
        let label = self.label();
        let mut sink =
            Sink::new(self.compression, self.zip.data()).map_err(|e| ArchiveError::Write {
                path: label.clone(),
                source: e,
            })?;
        let mut buf = pipe.buffer();
        let result = (|| -> Result<(), ArchiveError> {
            while let Some(n) = read_following(&mut src, &mut buf, complete).map_err(rerr)? {
                crc.update(&buf);
                sink.write_all(&buf).map_err(|source| ArchiveError::Write {
                    path: label.clone(),
                    source,
                })?;
                if punch {
                    use nix::fcntl::{fallocate, FallocateFlags as F};
                    let flags = F::FALLOC_FL_PUNCH_HOLE | F::FALLOC_FL_KEEP_SIZE;
                    punch = fallocate(&src, flags, written as i64, n as i64).is_ok();
                }
                written += n as u64;
                progress.advance(n as u64);
                pipe.hash(std::mem::take(&mut buf));
                buf = pipe.buffer();
            }
            sink.finish().map_err(|source| ArchiveError::Write {
                path: label.clone(),
                source,
            })
        })();
        result?;
        let csize = self.zip.position() - start;
        self.zip
            .end_entry(crc.finalize(), written, csize)
            .map_err(|e| self.werr(e))?;
        self.entries.push(Entry {
            name: name.to_string(),
            size: written,
            sha256: pipe.finish(),
        });
        Ok(written)
    }

    /// [`Writer::add`] of a stored entry to a sink: each piece read is handed on as it is (no
    /// copy), hashed on another thread meanwhile; with `punch`, dropped from the file once read.
    fn add_stored_to_sink(
        &mut self,
        name: &str,
        src: &mut File,
        complete: &dyn Fn() -> bool,
        mut punch: bool,
        progress: &dyn Progress,
    ) -> Result<u64, ArchiveError> {
        self.zip
            .begin_entry(name, zipout::STORED)
            .map_err(|e| self.werr(e))?;
        let mut crc = crc32fast::Hasher::new();
        let mut hash = hashing::BytesHasher::new();
        let mut written = 0u64;
        loop {
            let mut buf = Vec::with_capacity(CHUNK);
            let n = match read_following(src, &mut buf, complete) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => return Err(self.werr(e)),
            };
            let b = bytes::Bytes::from(buf);
            crc.update(&b);
            hash.hash(b.clone());
            if punch {
                use nix::fcntl::{fallocate, FallocateFlags as F};
                let flags = F::FALLOC_FL_PUNCH_HOLE | F::FALLOC_FL_KEEP_SIZE;
                punch = fallocate(&*src, flags, written as i64, n as i64).is_ok();
            }
            self.zip.data_bytes(b).map_err(|e| self.werr(e))?;
            written += n as u64;
            progress.advance(n as u64);
        }
        self.zip
            .end_entry(crc.finalize(), written, written)
            .map_err(|e| self.werr(e))?;
        self.entries.push(Entry {
            name: name.to_string(),
            size: written,
            sha256: hex::encode(hash.finish()),
        });
        Ok(written)
    }

    /// Adds a complete file whose digest is known, stored (copied by the kernel into a file).
    pub fn add_digested(
        &mut self,
        name: &str,
        path: &Path,
        digest: &Digest,
        progress: &dyn Progress,
    ) -> Result<(), ArchiveError> {
        self.copy_in(name, path, digest, false, progress)
    }

    fn copy_in(
        &mut self,
        name: &str,
        path: &Path,
        digest: &Digest,
        check: bool,
        progress: &dyn Progress,
    ) -> Result<(), ArchiveError> {
        let mut src = File::open(path).map_err(|source| ArchiveError::ReadInput {
            path: path.to_path_buf(),
            source,
        })?;
        self.zip
            .copy_stored(name, &mut src, digest.size, digest.crc, check)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::Other | std::io::ErrorKind::UnexpectedEof => {
                    ArchiveError::ReadInput {
                        path: path.to_path_buf(),
                        source: e,
                    }
                }
                _ => self.werr(e),
            })?;
        progress.advance(digest.size);
        self.entries.push(Entry {
            name: name.to_string(),
            size: digest.size,
            sha256: digest.sha256.clone(),
        });
        Ok(())
    }

    /// Whether entry `name` was added.
    pub fn has(&self, name: &str) -> bool {
        self.entries.iter().any(|e| e.name == name)
    }

    /// Writes the manifest (with the entries' sizes and checksums) and ends the archive: a
    /// file is synced and renamed to `<stem>.zip` in its folder, or `<stem>_N.zip` if taken
    /// (it never replaces a file); a sink commits it under a name made from `stem`.
    pub fn finish(mut self, manifest: &mut Manifest, stem: &str) -> Result<Finished, ArchiveError> {
        manifest.entries = std::mem::take(&mut self.entries);
        manifest.compression = self.compression;
        let json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
        let label = self.label();
        let werr = |source| ArchiveError::Write {
            path: label.clone(),
            source,
        };
        self.zip.add_bytes(MANIFEST, &json).map_err(werr)?;
        let stored_sizes = self.zip.stored_sizes();
        let (out, bytes) = self.zip.finish().map_err(werr)?;
        let (dir, tmp) = match (out, self.dest) {
            (zipout::Output::Sink(sink), _) => {
                return sink
                    .commit(stem, &stored_sizes)
                    .map(|name| Finished::Committed { name, bytes })
                    .map_err(werr)
            }
            (zipout::Output::File(file), Dest::Folder { dir, tmp }) => {
                let file = file.into_inner().map_err(|e| werr(e.into_error()))?;
                file.sync_all().map_err(werr)?;
                (dir, tmp)
            }
            (zipout::Output::File(_), Dest::Sink { .. }) => {
                unreachable!("a sink writer writes to its sink")
            }
        };
        let mut tmp = tmp;
        for n in 0..1000 {
            let dest = dir.join(if n == 0 {
                format!("{stem}.zip")
            } else {
                format!("{stem}_{n}.zip")
            });
            match tmp.persist_noclobber(&dest) {
                Ok(()) => {
                    if let Ok(d) = File::open(&dir) {
                        let _ = d.sync_all();
                    }
                    return Ok(Finished::File(dest));
                }
                Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => tmp = e.path,
                Err(e) => {
                    return Err(ArchiveError::Write {
                        path: dest,
                        source: e.error,
                    })
                }
            }
        }
        Err(ArchiveError::Write {
            path: dir.join(format!("{stem}.zip")),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "1000 archives with this name exist",
            ),
        })
    }
}

/// Where an entry's data goes: straight into the zip, or through a compressor.
enum Sink<'a> {
    Stored(zipout::DataWriter<'a>),
    Zstd(zstd::stream::write::Encoder<'static, zipout::DataWriter<'a>>),
    Deflate(flate2::write::DeflateEncoder<zipout::DataWriter<'a>>),
}

impl<'a> Sink<'a> {
    fn new(c: Compression, w: zipout::DataWriter<'a>) -> std::io::Result<Self> {
        Ok(match c {
            Compression::None => Sink::Stored(w),
            Compression::Zstd => {
                let mut e = zstd::stream::write::Encoder::new(w, 1)?;
                let workers = std::thread::available_parallelism()
                    .map(|n| n.get() as u32)
                    .unwrap_or(1);
                if workers > 1 {
                    e.multithread(workers)?;
                }
                Sink::Zstd(e)
            }
            Compression::Deflate => Sink::Deflate(flate2::write::DeflateEncoder::new(
                w,
                flate2::Compression::new(6),
            )),
        })
    }
    fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Stored(w) => w.write_all(b),
            Sink::Zstd(w) => w.write_all(b),
            Sink::Deflate(w) => w.write_all(b),
        }
    }
    fn finish(self) -> std::io::Result<()> {
        match self {
            Sink::Stored(mut w) => w.flush(),
            Sink::Zstd(w) => w.finish().map(|_| ()),
            Sink::Deflate(w) => w.finish().map(|_| ()),
        }
    }
}

/// Checks that an entry name is a plain relative path under `images/` or `files/` (or is the
/// manifest).
pub fn safe_entry_name(name: &str) -> bool {
    if name == MANIFEST {
        return true;
    }
    if name.is_empty() || name.starts_with('/') || name.contains('\\') || name.contains('\0') {
        return false;
    }
    let mut parts = name.split('/');
    let top = parts.next();
    if top != Some(IMAGES_DIR) && top != Some(crate::files::FILES_DIR) {
        return false;
    }
    let rest: Vec<&str> = parts.collect();
    !rest.is_empty()
        && rest
            .iter()
            .all(|p| !p.is_empty() && *p != "." && *p != "..")
}

/// Reads and checks an archive's manifest and entry list without extracting anything.
pub fn inspect(path: &Path) -> Result<Manifest, ArchiveError> {
    let mut zip = open_zip(path)?;
    let manifest = read_manifest(path, &mut zip)?;
    check_listing(path, &mut zip, &manifest)?;
    Ok(manifest)
}

/// An archive whose images were verified and extracted into a private temporary folder,
/// removed when this is dropped.
#[derive(Debug)]
pub struct Extracted {
    pub manifest: Manifest,
    dir: tempfile::TempDir,
}

impl Extracted {
    /// The folder holding CRIU's images.
    pub fn images_dir(&self) -> PathBuf {
        self.dir.path().join(IMAGES_DIR)
    }
    /// The folder holding the carried files (see [`crate::files`]).
    pub fn files_dir(&self) -> PathBuf {
        self.dir.path().join(crate::files::FILES_DIR)
    }
    /// Keeps the folder on disk (for debugging) and returns its path.
    pub fn keep(self) -> PathBuf {
        self.dir.keep()
    }
}

/// Verifies an archive and extracts its images under `staging` (a fresh private folder).
/// Names, sizes and checksums are checked against the manifest while extracting; on any
/// mismatch the folder is removed and nothing else has been touched.
pub fn extract(
    path: &Path,
    staging: &Path,
    progress: &dyn Progress,
) -> Result<Extracted, ArchiveError> {
    let mut zip = open_zip(path)?;
    let manifest = read_manifest(path, &mut zip)?;
    let index = check_listing(path, &mut zip, &manifest)?;
    let dir = tempfile::Builder::new()
        .prefix(".cedana-restore-")
        .tempdir_in(staging)
        .map_err(|source| ArchiveError::Write {
            path: staging.to_path_buf(),
            source,
        })?;
    let images = dir.path().join(IMAGES_DIR);
    std::fs::create_dir(&images).map_err(|source| ArchiveError::Write {
        path: images.clone(),
        source,
    })?;
    progress.stage("verifying and extracting", Some(manifest.total_size()));
    for entry in &manifest.entries {
        let corrupt = |reason: String| ArchiveError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let idx = index[&entry.name];
        let dest = dir.path().join(&entry.name);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|source| ArchiveError::Write {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        let raw = zip
            .by_index_raw(idx)
            .map(|f| (f.compression(), f.data_start(), f.compressed_size()));
        if let Ok((zip::CompressionMethod::Stored, start, csize)) = raw {
            if csize == entry.size {
                let sum = copy_and_hash(path, start, entry.size, &dest, progress)?;
                if sum != entry.sha256 {
                    return Err(mismatch(path, entry, "SHA-256", entry.sha256.clone(), sum));
                }
                continue;
            }
        }
        let mut zf = zip
            .by_index(idx)
            .map_err(|e| corrupt(format!("{}: {e}", entry.name)))?;
        let mut out = BufWriter::with_capacity(CHUNK, {
            let werr = |source| ArchiveError::Write {
                path: dest.clone(),
                source,
            };
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&dest)
                .map_err(werr)?
        });
        let mut pipe = HashPipe::new();
        let mut size = 0u64;
        loop {
            let mut buf = pipe.buffer();
            let n = hashing::fill(&mut zf, &mut buf)
                .map_err(|e| corrupt(format!("{}: {e}", entry.name)))?;
            if n == 0 {
                break;
            }
            size += n as u64;
            if size > entry.size {
                return Err(mismatch(
                    path,
                    entry,
                    "more than",
                    entry.size.to_string(),
                    "bytes".into(),
                ));
            }
            out.write_all(&buf).map_err(|source| ArchiveError::Write {
                path: dest.clone(),
                source,
            })?;
            progress.advance(n as u64);
            pipe.hash(buf);
        }
        out.flush().map_err(|source| ArchiveError::Write {
            path: dest.clone(),
            source,
        })?;
        if size != entry.size {
            return Err(mismatch(
                path,
                entry,
                "size",
                entry.size.to_string(),
                size.to_string(),
            ));
        }
        let sum = pipe.finish();
        if sum != entry.sha256 {
            return Err(mismatch(path, entry, "SHA-256", entry.sha256.clone(), sum));
        }
    }
    Ok(Extracted { manifest, dir })
}

/// Verifies an archive read front to back from `src` (as it arrives from the object store) and
/// extracts it under `staging` (a fresh private folder) in the same pass: each entry is written
/// to its place while its size, CRC-32 and SHA-256 are computed; at the end the central
/// directory must match the entries read, and the manifest's version, listing, sizes and
/// checksums must match too. Entry names are checked before anything is written for them. On
/// any failure the folder is removed and nothing else has been touched. `label` names the
/// archive in errors; `stored_sizes` are the sizes its writer gave for stored entries with
/// data descriptors (local header offset → size; see [`zipout::Sink::commit`]): without one,
/// such an entry is [`ArchiveError::Unstreamable`] (read the archive from a file instead).
pub fn extract_stream(
    src: &mut dyn zipin::ChunkSource,
    label: &Path,
    stored_sizes: &BTreeMap<u64, u64>,
    staging: &Path,
    progress: &dyn Progress,
) -> Result<Extracted, ArchiveError> {
    let dir = tempfile::Builder::new()
        .prefix(".cedana-restore-")
        .tempdir_in(staging)
        .map_err(|source| ArchiveError::Write {
            path: staging.to_path_buf(),
            source,
        })?;
    let root = dir.path().to_path_buf();
    std::fs::create_dir(root.join(IMAGES_DIR)).map_err(|source| ArchiveError::Write {
        path: root.join(IMAGES_DIR),
        source,
    })?;
    progress.stage("receiving, verifying and extracting", None);
    let mut place = |h: &zipin::LocalHeader| -> Result<zipin::Place, ArchiveError> {
        if !safe_entry_name(&h.name) {
            return Err(ArchiveError::UnsafeEntry {
                path: label.to_path_buf(),
                name: h.name.clone(),
            });
        }
        if h.name == MANIFEST {
            // A manifest is a few KiB; refuse an absurd one.
            return Ok(zipin::Place::Memory(16 << 20));
        }
        let dest = root.join(&h.name);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|source| ArchiveError::Write {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&dest)
        {
            Ok(f) => Ok(zipin::Place::File(f, dest)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(ArchiveError::Corrupt {
                path: label.to_path_buf(),
                reason: format!("entry {:?} appears twice", h.name),
            }),
            Err(source) => Err(ArchiveError::Write { path: dest, source }),
        }
    };
    let listing = zipin::read(src, label, stored_sizes, &mut place, progress)?;
    let mut manifests = listing.entries.iter().filter(|e| e.name == MANIFEST);
    let text = match (manifests.next(), manifests.next()) {
        (Some(m), None) => m.data.as_deref().unwrap_or_default(),
        (None, _) => {
            return Err(ArchiveError::NoManifest {
                path: label.to_path_buf(),
            })
        }
        (Some(_), Some(_)) => {
            return Err(ArchiveError::Corrupt {
                path: label.to_path_buf(),
                reason: format!("entry {MANIFEST:?} appears twice"),
            })
        }
    };
    let manifest = parse_manifest(label, text)?;
    let names: Vec<(String, bool)> = listing
        .entries
        .iter()
        .map(|e| (e.name.clone(), listing.not_files.contains(&e.name)))
        .collect();
    let index = check_names(label, &names, &manifest)?;
    for entry in &manifest.entries {
        let got = &listing.entries[index[&entry.name]];
        if got.usize != entry.size {
            return Err(mismatch(
                label,
                entry,
                "size",
                entry.size.to_string(),
                got.usize.to_string(),
            ));
        }
        if got.sha256 != entry.sha256 {
            return Err(mismatch(
                label,
                entry,
                "SHA-256",
                entry.sha256.clone(),
                got.sha256.clone(),
            ));
        }
    }
    Ok(Extracted { manifest, dir })
}

/// Copies `len` bytes at `start` of the archive into `dest` by the kernel (`copy_file_range`)
/// while this thread hashes the same bytes; returns their SHA-256.
fn copy_and_hash(
    archive: &Path,
    start: u64,
    len: u64,
    dest: &Path,
    progress: &dyn Progress,
) -> Result<String, ArchiveError> {
    use sha2::Digest as _;
    use std::os::unix::fs::FileExt;
    let corrupt = |e: std::io::Error| ArchiveError::Corrupt {
        path: archive.to_path_buf(),
        reason: e.to_string(),
    };
    let src = File::open(archive).map_err(|source| ArchiveError::Open {
        path: archive.to_path_buf(),
        source,
    })?;
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .map_err(|source| ArchiveError::Write {
            path: dest.to_path_buf(),
            source,
        })?;
    std::thread::scope(|s| {
        let copier = s.spawn(|| -> std::io::Result<()> {
            // std's copy uses copy_file_range where it can and falls back by itself (across
            // filesystems, for instance).
            let mut from = File::open(archive)?;
            from.seek(std::io::SeekFrom::Start(start))?;
            let mut to = &out;
            let copied = std::io::copy(&mut from.take(len), &mut to)?;
            if copied != len {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            Ok(())
        });
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let mut pos = 0u64;
        while pos < len {
            let want = (len - pos).min(CHUNK as u64) as usize;
            let n = src
                .read_at(&mut buf[..want], start + pos)
                .map_err(corrupt)?;
            if n == 0 {
                return Err(corrupt(std::io::ErrorKind::UnexpectedEof.into()));
            }
            h.update(&buf[..n]);
            pos += n as u64;
            progress.advance(n as u64);
        }
        match copier.join().expect("copy thread does not panic") {
            Ok(()) => Ok(hex::encode(h.finalize())),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(corrupt(e)),
            Err(source) => Err(ArchiveError::Write {
                path: dest.to_path_buf(),
                source,
            }),
        }
    })
}

fn mismatch(
    path: &Path,
    e: &Entry,
    what: &'static str,
    expected: String,
    actual: String,
) -> ArchiveError {
    ArchiveError::Mismatch {
        path: path.to_path_buf(),
        name: e.name.clone(),
        what,
        expected,
        actual,
    }
}

type Zip = zip::ZipArchive<BufReader<File>>;

fn open_zip(path: &Path) -> Result<Zip, ArchiveError> {
    let f = File::open(path).map_err(|source| ArchiveError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let mut r = BufReader::with_capacity(CHUNK, f);
    r.rewind().map_err(|source| ArchiveError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    zip::ZipArchive::new(r).map_err(|e| ArchiveError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn read_manifest(path: &Path, zip: &mut Zip) -> Result<Manifest, ArchiveError> {
    let mut text = Vec::new();
    {
        let f = match zip.by_name(MANIFEST) {
            Ok(f) => f,
            Err(zip::result::ZipError::FileNotFound) => {
                return Err(ArchiveError::NoManifest {
                    path: path.to_path_buf(),
                })
            }
            Err(e) => {
                return Err(ArchiveError::Corrupt {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })
            }
        };
        // A manifest is a few KiB; refuse to read an absurd one into memory.
        f.take(16 << 20)
            .read_to_end(&mut text)
            .map_err(|e| ArchiveError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("{MANIFEST}: {e}"),
            })?;
    }
    parse_manifest(path, &text)
}

/// The manifest from its bytes: its format version is checked before anything else is read.
fn parse_manifest(path: &Path, text: &[u8]) -> Result<Manifest, ArchiveError> {
    let bad = |reason: String| ArchiveError::BadManifest {
        path: path.to_path_buf(),
        reason,
    };
    let value: serde_json::Value = serde_json::from_slice(text).map_err(|e| bad(e.to_string()))?;
    let version = value
        .get("format_version")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| bad("no format_version".into()))?;
    if version != FORMAT_VERSION as u64 {
        return Err(ArchiveError::UnsupportedVersion {
            path: path.to_path_buf(),
            found: version,
        });
    }
    serde_json::from_value(value).map_err(|e| bad(e.to_string()))
}

/// Checks every zip entry against the manifest; returns entry name → zip index.
fn check_listing(
    path: &Path,
    zip: &mut Zip,
    manifest: &Manifest,
) -> Result<BTreeMap<String, usize>, ArchiveError> {
    let mut names = Vec::with_capacity(zip.len());
    for i in 0..zip.len() {
        let f = zip.by_index_raw(i).map_err(|e| ArchiveError::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        names.push((f.name().to_string(), f.is_dir() || f.is_symlink()));
    }
    check_names(path, &names, manifest)
}

/// Checks an archive's entries (name, and whether it is a folder or link rather than a file)
/// against the manifest: safe names, each listed entry present once, nothing unlisted, the
/// carried files exactly the `files/` entries. Returns entry name → position in `names`.
fn check_names(
    path: &Path,
    names: &[(String, bool)],
    manifest: &Manifest,
) -> Result<BTreeMap<String, usize>, ArchiveError> {
    let listed: BTreeSet<&str> = manifest.entries.iter().map(|e| e.name.as_str()).collect();
    for e in &manifest.entries {
        if !safe_entry_name(&e.name) || e.name == MANIFEST {
            return Err(ArchiveError::UnsafeEntry {
                path: path.to_path_buf(),
                name: e.name.clone(),
            });
        }
    }
    let mut index = BTreeMap::new();
    for (i, (name, not_file)) in names.iter().enumerate() {
        if !safe_entry_name(name) {
            return Err(ArchiveError::UnsafeEntry {
                path: path.to_path_buf(),
                name: name.clone(),
            });
        }
        if name == MANIFEST {
            continue;
        }
        if !listed.contains(name.as_str()) || *not_file {
            return Err(ArchiveError::UnlistedEntry {
                path: path.to_path_buf(),
                name: name.clone(),
            });
        }
        if index.insert(name.clone(), i).is_some() {
            return Err(ArchiveError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("entry {name:?} appears twice"),
            });
        }
    }
    for name in &listed {
        if !index.contains_key(*name) {
            return Err(ArchiveError::MissingEntry {
                path: path.to_path_buf(),
                name: name.to_string(),
            });
        }
    }
    // Carried files: safe paths, and exactly one `files/` entry per listed file.
    let carried: BTreeSet<String> = match &manifest.files {
        Some(files) => {
            crate::files::check(files).map_err(|e| ArchiveError::UnsafeEntry {
                path: path.to_path_buf(),
                name: e.to_string(),
            })?;
            files
                .items
                .iter()
                .filter(|i| i.kind == crate::files::ItemKind::File)
                .map(|i| format!("{}/{}", crate::files::FILES_DIR, i.path))
                .collect()
        }
        None => BTreeSet::new(),
    };
    let prefix = format!("{}/", crate::files::FILES_DIR);
    for name in carried.iter().map(String::as_str) {
        if !listed.contains(name) {
            return Err(ArchiveError::MissingEntry {
                path: path.to_path_buf(),
                name: name.to_string(),
            });
        }
    }
    if let Some(name) = listed
        .iter()
        .find(|n| n.starts_with(&prefix) && !carried.contains(**n))
    {
        return Err(ArchiveError::UnlistedEntry {
            path: path.to_path_buf(),
            name: name.to_string(),
        });
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;

    /// Where the first entry's data starts in a sink archive: after its local header (with a
    /// ZIP64 extra field, as followed entries have).
    const FIRST_DATA: usize = 30 + "images/pages-1.img".len() + 20;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn empty_manifest() -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            created_at: String::new(),
            agent_version: String::new(),
            process: ManifestProcess::default(),
            host: ManifestHost::default(),
            criu: ManifestCriu::default(),
            cpu: None,
            compression: Compression::None,
            entries: vec![],
            files: None,
        }
    }

    /// A sink writing into a file, committed under the file's name.
    struct FileSink(File, PathBuf);

    impl Write for FileSink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.0.flush()
        }
    }

    impl zipout::Sink for FileSink {
        fn copy_from(
            &mut self,
            src: &mut File,
            len: u64,
            crc: Option<&mut crc32fast::Hasher>,
        ) -> std::io::Result<u64> {
            let mut b = Vec::new();
            src.take(len).read_to_end(&mut b)?;
            if let Some(c) = crc {
                c.update(&b);
            }
            self.0.write_all(&b)?;
            Ok(b.len() as u64)
        }
        fn commit(self: Box<Self>, _stem: &str, sizes: &[(u64, u64)]) -> std::io::Result<String> {
            let list: Vec<String> = sizes.iter().map(|(o, s)| format!("{o}:{s}")).collect();
            std::fs::write(self.1.with_extension("sizes"), list.join(","))?;
            Ok(self.1.display().to_string())
        }
    }

    /// Pseudo-random bytes (incompressible enough).
    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Images as a dump has them: large page images, small ones, an empty one.
    fn images(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let imgs = vec![
            ("pages-1.img".to_string(), noise(5 << 20, 1)),
            ("core-1.img".to_string(), b"core".repeat(1000)),
            ("empty.img".to_string(), Vec::new()),
            ("pagemap-1.img".to_string(), noise(70_000, 2)),
            ("pages-2.img".to_string(), noise(300_000, 3)),
        ];
        for (n, b) in &imgs {
            std::fs::write(dir.join(n), b).unwrap();
        }
        imgs
    }

    /// An archive of `images` written to a sink as the object store path writes them (the
    /// first page image followed as if CRIU were writing it, the second digested first), or to
    /// a file as `cedana-agent dump` writes them. Returns it and the stored sizes the sink was
    /// given.
    fn archive_of(dir: &Path, c: Compression, to_sink: bool) -> (PathBuf, BTreeMap<u64, u64>) {
        let src = dir.join("src");
        std::fs::create_dir_all(&src).unwrap();
        let imgs = images(&src);
        let out = dir.join(format!("a-{c:?}-{to_sink}.zip"));
        let mut w = if to_sink {
            let f = File::create(&out).unwrap();
            Writer::to_sink(Box::new(FileSink(f, out.clone())), "a", c)
        } else {
            Writer::new(dir, "a", c).unwrap()
        };
        for (n, _) in &imgs {
            let name = format!("{IMAGES_DIR}/{n}");
            let path = src.join(n);
            match n.as_str() {
                "pages-1.img" => {
                    let done = || true;
                    w.add(&name, &path, Some(&done), &NoProgress).unwrap();
                }
                "pages-2.img" if c == Compression::None => {
                    let d = digest_following(&path, &|| true, false, &NoProgress).unwrap();
                    w.add_digested(&name, &path, &d, &NoProgress).unwrap();
                }
                _ => {
                    w.add(&name, &path, None, &NoProgress).unwrap();
                }
            }
        }
        match w.finish(&mut empty_manifest(), "a").unwrap() {
            Finished::File(p) => {
                std::fs::rename(&p, &out).unwrap();
                (out, BTreeMap::new())
            }
            Finished::Committed { name, bytes } => {
                assert_eq!(std::fs::metadata(&name).unwrap().len(), bytes);
                let text = std::fs::read_to_string(out.with_extension("sizes")).unwrap();
                let sizes = text
                    .split(',')
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let (o, n) = p.split_once(':').unwrap();
                        (o.parse().unwrap(), n.parse().unwrap())
                    })
                    .collect();
                (out, sizes)
            }
        }
    }

    fn staging_is_empty(staging: &Path) -> bool {
        std::fs::read_dir(staging).unwrap().next().is_none()
    }

    /// Archives written to a sink read back front to back, in pieces of any size, with the same
    /// result as reading them from a file; and stay readable by the zip crate and `extract`.
    #[test]
    fn sink_archives_stream_back_in_any_piece_size() {
        for c in [Compression::None, Compression::Zstd, Compression::Deflate] {
            let dir = tempfile::tempdir().unwrap();
            let (path, sizes) = archive_of(dir.path(), c, true);
            assert_eq!(sizes.len(), usize::from(c == Compression::None), "{c:?}");
            let want = images(&dir.path().join("src"));
            let staging = tempfile::tempdir().unwrap();
            let from_file = extract(&path, staging.path(), &NoProgress).unwrap();
            for piece in [1usize, 7, 4096, 1 << 20] {
                let mut src = zipin::ReadChunks {
                    reader: File::open(&path).unwrap(),
                    size: piece,
                };
                let x = extract_stream(&mut src, &path, &sizes, staging.path(), &NoProgress)
                    .unwrap_or_else(|e| panic!("{c:?} in pieces of {piece}: {e}"));
                assert_eq!(x.manifest, from_file.manifest);
                for (n, b) in &want {
                    let got = std::fs::read(x.images_dir().join(n)).unwrap();
                    assert!(got == *b, "{c:?}, pieces of {piece}: {n} differs");
                }
            }
        }
    }

    /// A stored entry of unknown size cannot be read front to back: not in a file archive
    /// (stored entries with data descriptors), nor in a sink archive whose sizes were lost. The
    /// reader says so (the caller then reads it from a file) and leaves nothing behind.
    #[test]
    fn stored_entries_of_unknown_size_are_unstreamable() {
        let dir = tempfile::tempdir().unwrap();
        for (path, first) in [
            (
                archive_of(dir.path(), Compression::None, false).0,
                "images/pages-1.img",
            ),
            (
                archive_of(dir.path(), Compression::None, true).0,
                "images/pages-1.img",
            ),
        ] {
            let staging = tempfile::tempdir().unwrap();
            let mut src = zipin::ReadChunks::new(File::open(&path).unwrap());
            match extract_stream(
                &mut src,
                &path,
                &BTreeMap::new(),
                staging.path(),
                &NoProgress,
            ) {
                Err(ArchiveError::Unstreamable { name, .. }) => assert_eq!(name, first),
                other => panic!("{:?}", other.map(|x| x.manifest)),
            }
            assert!(staging_is_empty(staging.path()));
            // The same archive reads from its file.
            extract(&path, staging.path(), &NoProgress).unwrap();
        }
    }

    /// Gives `pieces` of the archive, then fails (as a broken connection or a failed digest
    /// check does).
    struct FailingAfter(zipin::ReadChunks<File>, usize);

    impl zipin::ChunkSource for FailingAfter {
        fn next_chunk(&mut self) -> std::io::Result<Option<bytes::Bytes>> {
            if self.1 == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "wrong digest",
                ));
            }
            self.1 -= 1;
            self.0.next_chunk()
        }
    }

    /// Every way a stream can go wrong is refused, and the private staging folder is gone
    /// afterwards (nothing else was written).
    #[test]
    fn bad_streams_are_refused_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (path, sizes) = archive_of(dir.path(), Compression::None, true);
        let good = std::fs::read(&path).unwrap();
        let at = |needle: &[u8]| {
            good.windows(needle.len())
                .position(|w| w == needle)
                .expect("present")
        };
        let run_with = |bytes: &[u8], sizes: &BTreeMap<u64, u64>| {
            let staging = tempfile::tempdir().unwrap();
            let mut src = zipin::ReadChunks {
                reader: std::io::Cursor::new(bytes.to_vec()),
                size: 64 << 10,
            };
            let r = extract_stream(
                &mut src,
                Path::new("obj.zip"),
                sizes,
                staging.path(),
                &NoProgress,
            );
            assert!(staging_is_empty(staging.path()), "staging left behind");
            match r {
                Ok(_) => panic!("accepted"),
                Err(e) => e.to_string(),
            }
        };
        let run = |bytes: &[u8]| run_with(bytes, &sizes);
        // A wrong size for the followed page image: its data descriptor disagrees.
        let wrong: BTreeMap<u64, u64> = sizes.iter().map(|(o, n)| (*o, n - 4096)).collect();
        let msg = run_with(&good, &wrong);
        assert!(msg.contains("corrupt") || msg.contains("CRC-32"), "{msg}");
        // A byte of the page image flipped (the local CRC-32 catches it first).
        let mut b = good.clone();
        b[FIRST_DATA + 1000] ^= 1;
        assert!(run(&b).contains("CRC-32"), "{}", run(&b));
        // Truncated, at several places.
        for cut in [10, 3 << 20, good.len() - 30] {
            assert!(
                run(&good[..cut]).contains("corrupt or truncated"),
                "cut {cut}"
            );
        }
        // Bytes after the end record.
        let mut b = good.clone();
        b.extend_from_slice(b"junk");
        assert!(run(&b).contains("follow its end"), "{}", run(&b));
        // An entry name escaping its folder: refused before anything is written for it.
        let mut b = good.clone();
        let i = at(b"images/core-1.img");
        b[i..i + 17].copy_from_slice(b"images/../../x.im");
        let msg = run(&b);
        assert!(msg.contains("unsafe entry name"), "{msg}");
        // The central directory disagreeing with a local header.
        let mut b = good.clone();
        let name = b"images/pagemap-1.img";
        let last = good
            .windows(name.len())
            .rposition(|w| w == name)
            .expect("central record");
        b[last + 7] = b'P';
        let msg = run(&b);
        assert!(msg.contains("central directory"), "{msg}");
        // The source failing part way (the object store's digest check, a lost connection).
        let staging = tempfile::tempdir().unwrap();
        let mut src = FailingAfter(
            zipin::ReadChunks {
                reader: File::open(&path).unwrap(),
                size: 1 << 20,
            },
            3,
        );
        let e = extract_stream(&mut src, &path, &sizes, staging.path(), &NoProgress).unwrap_err();
        assert!(e.to_string().contains("wrong digest"), "{e}");
        assert!(staging_is_empty(staging.path()));
    }

    /// A file that grows in bursts while the writer follows it, as CRIU's page images do:
    /// the writer waits at each end of file and still gets every byte.
    #[test]
    fn follows_a_growing_file_to_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("pages-1.img");
        std::fs::write(&src, b"").unwrap();
        let chunk: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let done = AtomicBool::new(false);
        let mut w = Writer::new(dir.path(), "t", Compression::Zstd).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut f = std::fs::OpenOptions::new().append(true).open(&src).unwrap();
                for _ in 0..20 {
                    f.write_all(&chunk).unwrap();
                    std::thread::sleep(std::time::Duration::from_millis(15));
                }
                done.store(true, Ordering::SeqCst);
            });
            let complete = || done.load(Ordering::SeqCst);
            let n = w
                .add("images/pages-1.img", &src, Some(&complete), &NoProgress)
                .unwrap();
            assert_eq!(n, 20 * chunk.len() as u64);
        });
        let mut m = Manifest {
            format_version: FORMAT_VERSION,
            created_at: String::new(),
            agent_version: String::new(),
            process: ManifestProcess::default(),
            host: ManifestHost::default(),
            criu: ManifestCriu::default(),
            cpu: None,
            compression: Compression::None,
            entries: vec![],
            files: None,
        };
        let Finished::File(path) = w.finish(&mut m, "t").unwrap() else {
            panic!("a file archive")
        };
        let staging = tempfile::tempdir().unwrap();
        let x = extract(&path, staging.path(), &NoProgress).unwrap();
        let back = std::fs::read(x.images_dir().join("pages-1.img")).unwrap();
        assert_eq!(back, chunk.repeat(20));
        assert_eq!(x.manifest.compression, Compression::Zstd);
    }

    #[test]
    fn entry_names() {
        for ok in ["manifest.json", "images/core-1.img", "images/sub/x"] {
            assert!(safe_entry_name(ok), "{ok}");
        }
        for bad in [
            "/etc/passwd",
            "../x",
            "images/../../x",
            "images/",
            "images//x",
            "x.img",
            "images\\x",
            "images/./x",
            "",
        ] {
            assert!(!safe_entry_name(bad), "{bad}");
        }
    }
}
