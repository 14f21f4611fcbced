//! Reading an archive back: [`inspect`] (manifest and listing), [`extract`] (from a file,
//! reading with the `zip` crate) and [`extract_stream`] (front to back as it arrives, through
//! [`crate::zipfmt::read`]), and the checks they share. Nothing leaves the private staging
//! folder they extract into before every entry name, size and checksum was verified.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use super::format::{
    safe_entry_name, ArchiveError, Entry, Manifest, FORMAT_VERSION, IMAGES_DIR, MANIFEST,
};
use crate::files;
use crate::hashing::{self, Alg, HashPipe, CHUNK};
use crate::progress::Progress;
use crate::zipfmt::read::{self as zipread, LocalHeader, Place};
use crate::zipfmt::ChunkSource;

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
    /// The SHA-256 of `manifest.json` as read ([`super::format::manifest_sha256`]); none for
    /// a checkpoint from a store (its own manifest names its chunks by hash).
    pub manifest_sha256: Option<String>,
    dir: crate::staging::Held,
}

impl Extracted {
    /// The folder holding CRIU's images.
    pub fn images_dir(&self) -> PathBuf {
        self.dir.path().join(IMAGES_DIR)
    }
    /// The folder holding the carried files (see [`crate::files`]).
    pub fn files_dir(&self) -> PathBuf {
        self.dir.path().join(files::FILES_DIR)
    }
    /// Images and files already checked and written into `dir` (a checkpoint from a store).
    pub(crate) fn from_parts(manifest: Manifest, dir: crate::staging::Held) -> Self {
        Extracted {
            manifest,
            manifest_sha256: None,
            dir,
        }
    }

    /// Refuses this checkpoint unless its manifest's SHA-256 is `want` (what its worker
    /// wrote): one replaced after it was stored.
    pub fn check_manifest(&self, label: &Path, want: &str) -> Result<(), ArchiveError> {
        match &self.manifest_sha256 {
            Some(got) if got.eq_ignore_ascii_case(want) => Ok(()),
            got => Err(ArchiveError::Replaced {
                path: label.to_path_buf(),
                want: want.to_string(),
                got: got.clone().unwrap_or_else(|| "none".into()),
            }),
        }
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
    extract_leaving_pages(path, staging, false, progress).map(|(e, _)| e)
}

/// [`extract`], but with `leave_pages` the page images stored uncompressed (`images/pages-*.img`)
/// are neither copied nor checked here: they are returned, to be served to CRIU from the
/// archive and checked as they are ([`crate::streamer`]).
pub fn extract_leaving_pages(
    path: &Path,
    staging: &Path,
    leave_pages: bool,
    progress: &dyn Progress,
) -> Result<(Extracted, Vec<crate::streamer::InPlace>), ArchiveError> {
    let mut left = Vec::new();
    let mut zip = open_zip(path)?;
    let (manifest, manifest_sha256) = read_manifest_hashed(path, &mut zip)?;
    let index = check_listing(path, &mut zip, &manifest)?;
    check_room(path, &manifest, staging)?;
    let dir = private_folder(staging)?;
    progress.stage("verifying and extracting", Some(manifest.total_size()));
    for entry in &manifest.entries {
        let corrupt = |reason: String| ArchiveError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let idx = index[&entry.name];
        let dest = dir.path().join(&entry.name);
        create_parent(&dest)?;
        let raw = zip.by_index_raw(idx).map(|f| {
            (
                f.compression(),
                f.data_start(),
                f.compressed_size(),
                f.crc32(),
            )
        });
        if let Ok((zip::CompressionMethod::Stored, start, csize, crc)) = raw {
            if leave_pages && csize == entry.size && is_page_image(&entry.name) {
                left.push(crate::streamer::InPlace {
                    entry: entry.clone(),
                    start,
                });
                continue;
            }
            if csize == entry.size {
                let (alg, want) = entry.checksum();
                let (sum, actual_crc) =
                    copy_and_hash(path, start, entry.size, &dest, alg, progress)?;
                if sum != want {
                    return Err(mismatch(path, entry, alg.name(), want.to_string(), sum));
                }
                if actual_crc != crc {
                    return Err(corrupt(format!(
                        "entry {:?} has CRC-32 {actual_crc:08x}, its zip headers say {crc:08x}",
                        entry.name
                    )));
                }
                continue;
            }
        }
        let mut zf = zip
            .by_index(idx)
            .map_err(|e| corrupt(format!("{}: {e}", entry.name)))?;
        let file = create_new(&dest).map_err(|source| ArchiveError::Write {
            path: dest.clone(),
            source,
        })?;
        let mut out = BufWriter::with_capacity(CHUNK, file);
        let (alg, want) = entry.checksum();
        let mut pipe = HashPipe::with(alg);
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
        if sum != want {
            return Err(mismatch(path, entry, alg.name(), want.to_string(), sum));
        }
    }
    Ok((
        Extracted {
            manifest,
            manifest_sha256: Some(manifest_sha256),
            dir,
        },
        left,
    ))
}

/// `images/pages-<id>.img`: a page image, CRIU's copy of a process's memory.
fn is_page_image(name: &str) -> bool {
    name.strip_prefix(IMAGES_DIR)
        .and_then(|n| n.strip_prefix("/pages-"))
        .and_then(|n| n.strip_suffix(".img"))
        .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
}

/// Verifies an archive read front to back from `src` (as it arrives from the object store) and
/// extracts it under `staging` (a fresh private folder) in the same pass: each entry is written
/// to its place while its size, CRC-32 and SHA-256 are computed; at the end the central
/// directory must match the entries read, and the manifest's version, listing, sizes and
/// checksums must match too. Entry names are checked before anything is written for them. On
/// any failure the folder is removed and nothing else has been touched. `label` names the
/// archive in errors; `stored_sizes` are the sizes its writer gave for stored entries with
/// data descriptors (local header offset → size; see [`crate::zipfmt::Sink::commit`]):
/// without one, such an entry is [`ArchiveError::Unstreamable`] (read the archive from a file
/// instead).
pub fn extract_stream(
    src: &mut dyn ChunkSource,
    label: &Path,
    stored_sizes: &BTreeMap<u64, u64>,
    staging: &Path,
    progress: &dyn Progress,
) -> Result<Extracted, ArchiveError> {
    let dir = private_folder(staging)?;
    let root = dir.path().to_path_buf();
    progress.stage("receiving, verifying and extracting", None);
    let mut place = |h: &LocalHeader| -> Result<Place, ArchiveError> {
        if !safe_entry_name(&h.name) {
            return Err(ArchiveError::UnsafeEntry {
                path: label.to_path_buf(),
                name: h.name.clone(),
            });
        }
        if h.name == MANIFEST {
            // A manifest is a few KiB; refuse an absurd one.
            return Ok(Place::Memory(16 << 20));
        }
        let dest = root.join(&h.name);
        create_parent(&dest)?;
        match create_new(&dest) {
            Ok(f) => Ok(Place::File(f, dest)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(ArchiveError::Corrupt {
                path: label.to_path_buf(),
                reason: format!("entry {:?} appears twice", h.name),
            }),
            Err(source) => Err(ArchiveError::Write { path: dest, source }),
        }
    };
    // Where the manifest (at the end) cannot bound what is written, the free space does:
    // the entries may take what the staging folder's filesystem has free, less a twentieth.
    let budget = nix::sys::statvfs::statvfs(&root)
        .map(|fs| {
            let free = fs.blocks_available().saturating_mul(fs.fragment_size());
            free - free / 20
        })
        .unwrap_or(u64::MAX);
    let listing = zipread::read_with(src, label, stored_sizes, &mut place, budget, progress)?;
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
    let manifest_sha256 = super::format::manifest_sha256(text);
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
        // A streamed archive is checked with the SHA-256 taken as it went by (the manifest,
        // which says which checksum an entry has, comes last): one with BLAKE3 checksums only
        // (a standalone dump) cannot be checked this way, and is refused.
        if got.sha256 != entry.sha256 {
            let (alg, want) = entry.checksum();
            return Err(mismatch(
                label,
                entry,
                "SHA-256",
                match alg {
                    Alg::Sha256 => want.to_string(),
                    Alg::Blake3 => "a SHA-256 (it has only a BLAKE3; restore it from a file: `cedana-agent restore ZIP`)".to_string(),
                },
                got.sha256.clone(),
            ));
        }
    }
    Ok(Extracted {
        manifest,
        manifest_sha256: Some(manifest_sha256),
        dir,
    })
}

/// Copies `len` bytes at `start` of the archive into `dest` by the kernel (`copy_file_range`)
/// while this thread hashes the same bytes; returns their `alg` digest and CRC-32.
fn copy_and_hash(
    archive: &Path,
    start: u64,
    len: u64,
    dest: &Path,
    alg: Alg,
    progress: &dyn Progress,
) -> Result<(String, u32), ArchiveError> {
    use std::os::unix::fs::FileExt;
    let corrupt = |e: std::io::Error| ArchiveError::Corrupt {
        path: archive.to_path_buf(),
        reason: e.to_string(),
    };
    let src = File::open(archive).map_err(|source| ArchiveError::Open {
        path: archive.to_path_buf(),
        source,
    })?;
    let out = create_new(dest).map_err(|source| ArchiveError::Write {
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
        let mut h = hashing::Hasher::new(alg);
        let mut crc = crc32fast::Hasher::new();
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
            crc.update(&buf[..n]);
            pos += n as u64;
            progress.advance(n as u64);
        }
        match copier.join().expect("copy thread does not panic") {
            Ok(()) => Ok((h.hex(), crc.finalize())),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(corrupt(e)),
            Err(source) => Err(ArchiveError::Write {
                path: dest.to_path_buf(),
                source,
            }),
        }
    })
}

/// A fresh private folder under `staging` to extract into (removed when dropped), with its
/// `images/` folder.
fn private_folder(staging: &Path) -> Result<crate::staging::Held, ArchiveError> {
    // What killed agents left here goes first.
    crate::staging::sweep(staging);
    let dir = crate::staging::Held::create(staging, ".cedana-restore-").map_err(|source| {
        ArchiveError::Write {
            path: staging.to_path_buf(),
            source,
        }
    })?;
    let images = dir.path().join(IMAGES_DIR);
    std::fs::create_dir(&images).map_err(|source| ArchiveError::Write {
        path: images,
        source,
    })?;
    Ok(dir)
}

/// Creates the folder an entry's file `dest` goes into.
fn create_parent(dest: &Path) -> Result<(), ArchiveError> {
    match dest.parent() {
        Some(parent) => std::fs::create_dir_all(parent).map_err(|source| ArchiveError::Write {
            path: parent.to_path_buf(),
            source,
        }),
        None => Ok(()),
    }
}

/// Creates `path` for writing; an existing file is an error (`AlreadyExists`).
fn create_new(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

pub(crate) fn mismatch(
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
    read_manifest_hashed(path, zip).map(|(m, _)| m)
}

/// [`read_manifest`], and the SHA-256 of its bytes.
fn read_manifest_hashed(path: &Path, zip: &mut Zip) -> Result<(Manifest, String), ArchiveError> {
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
    let manifest = parse_manifest(path, &text)?;
    Ok((manifest, super::format::manifest_sha256(&text)))
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
    let corrupt = |reason: String| ArchiveError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    // The zip crate keeps one entry per name (the last): count the central directory's
    // records ourselves, so a name that appears twice is refused, not merged.
    let records = central_directory_records(path).map_err(|e| corrupt(e.to_string()))?;
    if records != zip.len() as u64 {
        return Err(corrupt(format!(
            "its central directory has {records} records for {} names: an entry appears twice",
            zip.len()
        )));
    }
    let mut names = Vec::with_capacity(zip.len());
    // Where each entry lies in the file (local header to the end of its data): entries
    // sharing bytes would let a small archive expand many times over.
    let mut spans: Vec<(u64, u64, String)> = Vec::with_capacity(zip.len());
    let mut file = File::open(path).map_err(|source| ArchiveError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    for i in 0..zip.len() {
        let f = zip.by_index_raw(i).map_err(|e| corrupt(e.to_string()))?;
        check_local_header(&mut file, &f).map_err(|reason| {
            corrupt(format!("entry {:?}: its local header {reason}", f.name()))
        })?;
        spans.push((
            f.header_start(),
            f.data_start().saturating_add(f.compressed_size()),
            f.name().to_string(),
        ));
        names.push((f.name().to_string(), f.is_dir() || f.is_symlink()));
    }
    spans.sort();
    if let Some(w) = spans.windows(2).find(|w| w[1].0 < w[0].1) {
        return Err(corrupt(format!(
            "entries {:?} and {:?} overlap in the file",
            w[0].2, w[1].2
        )));
    }
    check_names(path, &names, manifest)
}

/// Whether what the manifest says the archive expands to fits in the staging folder's
/// filesystem, before anything is written (every entry is then held to its listed size).
pub(crate) fn check_room(
    path: &Path,
    manifest: &Manifest,
    staging: &Path,
) -> Result<(), ArchiveError> {
    let need = manifest
        .entries
        .iter()
        .fold(0u64, |a, e| a.saturating_add(e.size));
    let Ok(fs) = nix::sys::statvfs::statvfs(staging) else {
        return Ok(()); // the write fails later, naming the folder
    };
    let free = fs.blocks_available().saturating_mul(fs.fragment_size());
    if need > free {
        return Err(ArchiveError::NoRoom {
            path: path.to_path_buf(),
            need,
            free,
            staging: staging.to_path_buf(),
        });
    }
    Ok(())
}

/// How many records the central directory has, as its end record (or the ZIP64 one) says.
fn central_directory_records(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    let tail_len = len.min(65_535 + 22);
    let mut tail = vec![0u8; tail_len as usize];
    f.read_exact_at(&mut tail, len - tail_len)?;
    let at = (0..=tail.len().saturating_sub(22))
        .rev()
        .find(|&i| tail[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])
        .ok_or_else(|| bad("no end of central directory record"))?;
    let total = u16::from_le_bytes([tail[at + 10], tail[at + 11]]);
    if total != 0xFFFF {
        return Ok(u64::from(total));
    }
    // ZIP64: the locator sits right before the end record and points at the ZIP64 record.
    let locator = at
        .checked_sub(20)
        .filter(|&l| tail[l..l + 4] == [0x50, 0x4b, 0x06, 0x07])
        .ok_or_else(|| bad("no ZIP64 end of central directory locator"))?;
    let mut off = [0u8; 8];
    off.copy_from_slice(&tail[locator + 8..locator + 16]);
    let mut rec = [0u8; 40];
    f.read_exact_at(&mut rec, u64::from_le_bytes(off))?;
    if rec[..4] != [0x50, 0x4b, 0x06, 0x06] {
        return Err(bad("no ZIP64 end of central directory record"));
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&rec[32..40]);
    Ok(u64::from_le_bytes(n))
}

/// Whether an entry's local header says what the central directory says of it: the same name
/// and method, and (without a data descriptor) the same CRC-32 and sizes.
fn check_local_header(
    file: &mut File,
    f: &zip::read::ZipFile<'_, BufReader<File>>,
) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let mut h = [0u8; 30];
    file.read_exact_at(&mut h, f.header_start())
        .map_err(|e| format!("cannot be read: {e}"))?;
    if h[..4] != [0x50, 0x4b, 0x03, 0x04] {
        return Err("is missing".into());
    }
    let le16 = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
    let le32 = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let mut name = vec![0u8; le16(26) as usize];
    file.read_exact_at(&mut name, f.header_start() + 30)
        .map_err(|e| format!("cannot be read: {e}"))?;
    if name != f.name_raw() {
        return Err(format!(
            "names it {:?}, the central directory {:?}",
            String::from_utf8_lossy(&name),
            f.name()
        ));
    }
    let method = match f.compression() {
        zip::CompressionMethod::Stored => 0,
        zip::CompressionMethod::Deflated => 8,
        zip::CompressionMethod::Zstd => 93,
        _ => le16(8),
    };
    if le16(8) != method {
        return Err(format!(
            "says method {}, the central directory {method}",
            le16(8)
        ));
    }
    let descriptor = le16(6) & 0x8 != 0;
    if !descriptor {
        let (crc, csize, size) = (le32(14), le32(18), le32(22));
        if crc != f.crc32() {
            return Err(format!(
                "says CRC-32 {crc:08x}, the central directory {:08x}",
                f.crc32()
            ));
        }
        // 0xFFFFFFFF: the sizes are in its ZIP64 extra field.
        if csize != u32::MAX
            && (u64::from(csize) != f.compressed_size() || u64::from(size) != f.size())
        {
            return Err(format!(
                "says {csize} bytes stored ({size} whole), the central directory {} ({})",
                f.compressed_size(),
                f.size()
            ));
        }
    }
    Ok(())
}

/// Checks an archive's entries (name, and whether it is a folder or link rather than a file)
/// against the manifest: safe names, each listed entry present once, nothing unlisted, the
/// carried files exactly the `files/` entries. Returns entry name → position in `names`.
pub(crate) fn check_names(
    path: &Path,
    names: &[(String, bool)],
    manifest: &Manifest,
) -> Result<BTreeMap<String, usize>, ArchiveError> {
    let listed: BTreeSet<&str> = manifest.entries.iter().map(|e| e.name.as_str()).collect();
    if listed.len() != manifest.entries.len() {
        let mut seen = BTreeSet::new();
        let twice = manifest
            .entries
            .iter()
            .find(|e| !seen.insert(e.name.as_str()))
            .map(|e| e.name.clone())
            .unwrap_or_default();
        return Err(ArchiveError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("its manifest has entry {twice:?} listed twice"),
        });
    }
    manifest
        .criu
        .restore_options()
        .check()
        .map_err(|e| ArchiveError::BadManifest {
            path: path.to_path_buf(),
            reason: format!("its CRIU options: {e}"),
        })?;
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
            files::check(files).map_err(|e| ArchiveError::UnsafeEntry {
                path: path.to_path_buf(),
                name: e.to_string(),
            })?;
            files
                .items
                .iter()
                .filter(|i| i.kind == files::ItemKind::File)
                .map(|i| format!("{}/{}", files::FILES_DIR, i.path))
                .collect()
        }
        None => BTreeSet::new(),
    };
    let prefix = format!("{}/", files::FILES_DIR);
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
