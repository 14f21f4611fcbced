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
use crate::progress::Progress;
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
    #[error("cannot read {path}: {source}")]
    ReadInput {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How entries are compressed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Stored as is: fastest, largest.
    #[default]
    None,
    /// Zstandard (zip method 93): fast and small.
    Zstd,
    /// Deflate: what every unzip reads; slow.
    Deflate,
}

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

/// Reads a file as it grows (see [`Writer::add`] for `complete`) and returns its digest. Each
/// range read is also handed to the kernel for writeback, so that syncing the file later has
/// little left to do.
pub fn digest_following(
    path: &Path,
    complete: &dyn Fn() -> bool,
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
        // SAFETY: a plain syscall on an fd we own; failure only means no early writeback.
        unsafe {
            libc::sync_file_range(
                src.as_raw_fd(),
                size as i64,
                n as i64,
                libc::SYNC_FILE_RANGE_WRITE,
            );
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
/// folder on the same filesystem) until [`Writer::finish`] syncs it and gives it its name.
/// Dropped unfinished, it leaves nothing.
pub struct Writer {
    dir: PathBuf,
    tmp: tempfile::TempPath,
    zip: ZipOut,
    compression: Compression,
    entries: Vec<Entry>,
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
            dir: dir.to_path_buf(),
            tmp,
            zip: ZipOut::new(file),
            compression,
            entries: Vec::new(),
        })
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
                dir: dir.to_path_buf(),
                tmp: tempfile::TempPath::try_from_path(path).map_err(werr)?,
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

    fn werr(&self, source: std::io::Error) -> ArchiveError {
        ArchiveError::Write {
            path: self.tmp.to_path_buf(),
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
        let rerr = |source| ArchiveError::ReadInput {
            path: path.to_path_buf(),
            source,
        };
        let mut src = File::open(path).map_err(rerr)?;
        let done = || true;
        let complete = complete.unwrap_or(&done);
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
        let mut sink =
            Sink::new(self.compression, self.zip.data()).map_err(|e| ArchiveError::Write {
                path: self.tmp.to_path_buf(),
                source: e,
            })?;
        let mut buf = pipe.buffer();
        let result = (|| -> Result<(), ArchiveError> {
            while let Some(n) = read_following(&mut src, &mut buf, complete).map_err(rerr)? {
                crc.update(&buf);
                sink.write_all(&buf).map_err(|source| ArchiveError::Write {
                    path: path.to_path_buf(),
                    source,
                })?;
                written += n as u64;
                progress.advance(n as u64);
                pipe.hash(std::mem::take(&mut buf));
                buf = pipe.buffer();
            }
            sink.finish().map_err(|source| ArchiveError::Write {
                path: path.to_path_buf(),
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

    /// Adds a complete file whose digest is known, stored, copied by the kernel.
    pub fn add_digested(
        &mut self,
        name: &str,
        path: &Path,
        digest: &Digest,
        progress: &dyn Progress,
    ) -> Result<(), ArchiveError> {
        let rerr = |source| ArchiveError::ReadInput {
            path: path.to_path_buf(),
            source,
        };
        let mut src = File::open(path).map_err(rerr)?;
        self.zip
            .copy_stored(name, &mut src, digest.size, digest.crc)
            .map_err(|e| self.werr(e))?;
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

    /// Writes the manifest (with the entries' sizes and checksums), syncs, and renames the
    /// archive to `<stem>.zip` in its folder, or `<stem>_N.zip` if taken: it never replaces a
    /// file.
    pub fn finish(mut self, manifest: &mut Manifest, stem: &str) -> Result<PathBuf, ArchiveError> {
        manifest.entries = std::mem::take(&mut self.entries);
        manifest.compression = self.compression;
        let json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
        let werr = |source| ArchiveError::Write {
            path: self.tmp.to_path_buf(),
            source,
        };
        self.zip
            .begin_entry(MANIFEST, zipout::STORED)
            .map_err(werr)?;
        self.zip.data().write_all(&json).map_err(werr)?;
        self.zip
            .end_entry(crc32fast::hash(&json), json.len() as u64, json.len() as u64)
            .map_err(werr)?;
        let file = self.zip.finish().map_err(werr)?;
        file.sync_all().map_err(werr)?;
        drop(file);
        let mut tmp = self.tmp;
        for n in 0..1000 {
            let dest = self.dir.join(if n == 0 {
                format!("{stem}.zip")
            } else {
                format!("{stem}_{n}.zip")
            });
            match tmp.persist_noclobber(&dest) {
                Ok(()) => {
                    if let Ok(d) = File::open(&self.dir) {
                        let _ = d.sync_all();
                    }
                    return Ok(dest);
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
            path: self.dir.join(format!("{stem}.zip")),
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
    let bad = |reason: String| ArchiveError::BadManifest {
        path: path.to_path_buf(),
        reason,
    };
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
    let value: serde_json::Value = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
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
    for i in 0..zip.len() {
        let f = zip.by_index_raw(i).map_err(|e| ArchiveError::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let name = f.name().to_string();
        if !safe_entry_name(&name) {
            return Err(ArchiveError::UnsafeEntry {
                path: path.to_path_buf(),
                name,
            });
        }
        if name == MANIFEST {
            continue;
        }
        if !listed.contains(name.as_str()) || f.is_dir() || f.is_symlink() {
            return Err(ArchiveError::UnlistedEntry {
                path: path.to_path_buf(),
                name,
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
    use std::sync::atomic::{AtomicBool, Ordering};

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
        let path = w.finish(&mut m, "t").unwrap();
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
