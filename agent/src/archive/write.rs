//! Writing an archive: [`Writer`] (to a file under a temporary name, synced and renamed
//! without replacing anything, or into a [`Sink`] front to back) and [`digest_following`]
//! (a page image hashed while CRIU writes it).

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::format::{ArchiveError, Compression, Digest, Entry, Manifest, MANIFEST};
use crate::hashing::{self, HashPipe, CHUNK};
use crate::progress::{NoProgress, Progress};
use crate::zipfmt::write::{DataWriter, Output, ZipOut};
use crate::zipfmt::{self, Sink};

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

/// The checksums of an entry spliced into `file` from `start` on, as its length grows (each
/// length sent on `grown`; the channel closed at its end): its length, CRC-32 and BLAKE3. The
/// bytes are hashed where they lie in the page cache (mapped, not copied), on this thread and a
/// second one, both at the lowest priority: CRIU, whose time the task is frozen for, comes
/// first, and the hashing takes the CPU it leaves. With `writeback`, writeback of each range
/// starts as it is hashed.
fn digest_spliced(
    file: &File,
    start: u64,
    writeback: bool,
    grown: std::sync::mpsc::Receiver<u64>,
) -> std::io::Result<(u64, u32, String)> {
    const WINDOW: u64 = 64 << 20;
    // SAFETY: plain syscalls on this thread.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19);
    }
    let page = 4096u64;
    let mut crc = crc32fast::Hasher::new();
    let mut blake3 = blake3::Hasher::new();
    let mut read = 0u64;
    while let Ok(mut written) = grown.recv() {
        while let Ok(w) = grown.try_recv() {
            written = w;
        }
        while read < written {
            let len = (written - read).min(WINDOW);
            let at = start + read;
            let aligned = at - at % page;
            let map_len = (at + len - aligned) as usize;
            // SAFETY: a read-only shared mapping of bytes already written to the file (it
            // only grows while this runs), unmapped below before anything else uses it.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    map_len,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    aligned as libc::off_t,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: the mapping above, `map_len` bytes long.
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    (ptr as *const u8).add((at - aligned) as usize),
                    len as usize,
                )
            };
            std::thread::scope(|s| {
                if len >= 4 << 20 {
                    s.spawn(|| {
                        // SAFETY: as above, for this thread.
                        unsafe {
                            libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19);
                        }
                        crc.update(bytes);
                    });
                } else {
                    crc.update(bytes);
                }
                blake3.update(bytes);
            });
            // SAFETY: the mapping made above, no longer used.
            unsafe {
                libc::munmap(ptr, map_len);
            }
            if !writeback {
                read += len;
                continue;
            }
            // SAFETY: a plain syscall on an fd we hold; failure only means no early writeback.
            unsafe {
                libc::sync_file_range(
                    file.as_raw_fd(),
                    at as i64,
                    len as i64,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
            read += len;
        }
    }
    Ok((read, crc.finalize(), blake3.finalize().to_hex().to_string()))
}

/// How long a FIFO may stay open and silent once its writer is done ([`Writer::add_from_fifo`]).
pub const STALL: std::time::Duration = std::time::Duration::from_secs(10);

/// An archive being written: under a temporary name in its final folder (or in a staging
/// folder on the same filesystem) until [`Writer::finish`] syncs it and gives it its name; or
/// into a [`Sink`] that commits it at the end. Dropped unfinished, it leaves nothing.
pub struct Writer {
    dest: Dest,
    zip: ZipOut,
    compression: Compression,
    entries: Vec<Entry>,
    /// Whether the file is synced (and written back as it goes) before it gets its name.
    sync: bool,
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
    /// The name a [`Sink`] committed it under (an object in the object store), and
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
        // Held while written: a sweep removes only partial archives no writer holds.
        file.try_lock()
            .map_err(|e| werr(std::io::Error::other(e)))?;
        Ok(Writer {
            dest: Dest::Folder {
                dir: dir.to_path_buf(),
                tmp,
            },
            zip: ZipOut::new(file),
            compression,
            entries: Vec::new(),
            sync: true,
        })
    }

    /// Starts an archive written to `sink` front to back; `label` names it in errors. Stored
    /// entries of complete files get their sizes in their local header; the sizes of followed
    /// ones (page images stored while CRIU writes them) are handed to the sink on commit. So
    /// the archive can be read front to back as it arrives (see [`super::extract_stream`]).
    pub fn to_sink(sink: Box<dyn Sink>, label: &str, compression: Compression) -> Self {
        Writer {
            dest: Dest::Sink {
                label: PathBuf::from(label),
            },
            zip: ZipOut::to(Output::Sink(sink)),
            compression,
            entries: Vec::new(),
            sync: true,
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
                    blake3: String::new(),
                    chunks: None,
                }],
                sync: true,
            })),
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => Ok(None),
            Err(e) => Err(werr(e)),
        }
    }

    /// Whether a file archive is synced before [`Writer::finish`] names it (the default), and
    /// written back as page images arrive.
    pub fn set_sync(&mut self, sync: bool) {
        self.sync = sync;
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
            Compression::None => zipfmt::STORED,
            Compression::Zstd => zipfmt::ZSTD,
            Compression::Deflate => zipfmt::DEFLATED,
        };
        self.zip
            .begin_entry(name, method)
            .map_err(|e| self.werr(e))?;
        let start = self.zip.position();
        let mut crc = crc32fast::Hasher::new();
        let mut pipe = HashPipe::new();
        let mut written = 0u64;
        let label = self.label();
        let werr = |source| ArchiveError::Write {
            path: label.clone(),
            source,
        };
        let mut sink = Encoder::new(self.compression, self.zip.data()).map_err(werr)?;
        let mut buf = pipe.buffer();
        let result = (|| -> Result<(), ArchiveError> {
            while let Some(n) = read_following(&mut src, &mut buf, complete).map_err(rerr)? {
                crc.update(&buf);
                sink.write_all(&buf).map_err(werr)?;
                if punch {
                    punch = punch_hole(&src, written, n);
                }
                written += n as u64;
                progress.advance(n as u64);
                pipe.hash(std::mem::take(&mut buf));
                buf = pipe.buffer();
            }
            sink.finish().map_err(werr)
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
            blake3: String::new(),
            chunks: None,
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
            .begin_entry(name, zipfmt::STORED)
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
                punch = punch_hole(src, written, n);
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
            blake3: String::new(),
            chunks: None,
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
            blake3: String::new(),
            chunks: None,
        });
        Ok(())
    }

    /// Adds the stored entry `name` from the FIFO `fifo` (non-blocking, its writer connected)
    /// as it is written: the kernel splices it straight into the archive file, and
    /// [`digest_spliced`] hashes it where it lies in the page cache. Ends when the writer closes the FIFO. Once
    /// `done()` says the writer has finished, a FIFO still open and silent for [`STALL`] is
    /// an error. Returns the entry's size.
    pub fn add_from_fifo(
        &mut self,
        name: &str,
        fifo: std::os::fd::BorrowedFd<'_>,
        done: &dyn Fn() -> bool,
        progress: &dyn Progress,
    ) -> Result<u64, ArchiveError> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        self.zip.begin_in_place(name).map_err(|e| self.werr(e))?;
        let start = self.zip.position();
        let (out, back) = match self.zip.file() {
            Ok(file) => (file.as_raw_fd(), file.try_clone()),
            Err(e) => (-1, Err(e)),
        };
        let back = back.map_err(|e| self.werr(e))?;
        let (tx, rx) = std::sync::mpsc::channel::<u64>();
        let writeback = self.sync;
        let reader = std::thread::spawn(move || digest_spliced(&back, start, writeback, rx));
        let mut size = 0u64;
        let mut silent: Option<std::time::Instant> = None;
        let spliced = loop {
            // SAFETY: splice between two fds we hold open, no offsets (the FIFO has none, the
            // archive's advances).
            let n = unsafe {
                libc::splice(
                    fifo.as_raw_fd(),
                    std::ptr::null_mut(),
                    out,
                    std::ptr::null_mut(),
                    CHUNK,
                    libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
                )
            };
            if n > 0 {
                size += n as u64;
                self.zip.grown(n as u64);
                progress.advance(n as u64);
                let _ = tx.send(size);
                silent = None;
                continue;
            }
            if n == 0 {
                break Ok(());
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => {
                    if done()
                        && silent.get_or_insert_with(std::time::Instant::now).elapsed() > STALL
                    {
                        break Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("CRIU finished but {name} stayed open and silent"),
                        ));
                    }
                    let mut p = [PollFd::new(fifo, PollFlags::POLLIN)];
                    let _ = poll(&mut p, PollTimeout::from(50u16));
                }
                _ => break Err(e),
            }
        };
        drop(tx);
        let digest = reader
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the hashing thread panicked")));
        spliced.map_err(|e| self.werr(e))?;
        let (read, crc, blake3) = digest.map_err(|e| self.werr(e))?;
        if read != size {
            return Err(self.werr(std::io::Error::other(format!(
                "{name}: {size} bytes spliced, {read} read back"
            ))));
        }
        self.zip.end_in_place(crc, size).map_err(|e| self.werr(e))?;
        self.entries.push(Entry {
            name: name.to_string(),
            size,
            sha256: String::new(),
            blake3,
            chunks: None,
        });
        Ok(size)
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
        let json = super::format::manifest_bytes(manifest);
        let label = self.label();
        let werr = |source| ArchiveError::Write {
            path: label.clone(),
            source,
        };
        self.zip.add_bytes(MANIFEST, &json).map_err(werr)?;
        let stored_sizes = self.zip.stored_sizes();
        let (out, bytes) = self.zip.finish().map_err(werr)?;
        let (dir, tmp) = match (out, self.dest) {
            (Output::Sink(sink), _) => {
                return sink
                    .commit(stem, &stored_sizes)
                    .map(|name| Finished::Committed { name, bytes })
                    .map_err(werr)
            }
            (Output::File(file), Dest::Folder { dir, tmp }) => {
                let file = file.into_inner().map_err(|e| werr(e.into_error()))?;
                // The process's memory: its owner's alone, whichever way the file was made (an
                // adopted page image has CRIU's mode).
                file.set_permissions(std::fs::Permissions::from_mode(0o600))
                    .map_err(werr)?;
                if self.sync {
                    file.sync_all().map_err(werr)?;
                }
                (dir, tmp)
            }
            (Output::File(_), Dest::Sink { .. }) => {
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
                    if let (true, Ok(d)) = (self.sync, File::open(&dir)) {
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

/// Drops `len` bytes at `offset` of `file` (read already, not needed again) from the disk and
/// the page cache, keeping its size; false where the filesystem cannot (then stop trying).
fn punch_hole(file: &File, offset: u64, len: usize) -> bool {
    use nix::fcntl::{fallocate, FallocateFlags as F};
    let flags = F::FALLOC_FL_PUNCH_HOLE | F::FALLOC_FL_KEEP_SIZE;
    fallocate(file, flags, offset as i64, len as i64).is_ok()
}

/// Where an entry's data goes: straight into the zip, or through a compressor.
enum Encoder<'a> {
    Stored(DataWriter<'a>),
    Zstd(zstd::stream::write::Encoder<'static, DataWriter<'a>>),
    Deflate(flate2::write::DeflateEncoder<DataWriter<'a>>),
}

impl<'a> Encoder<'a> {
    fn new(c: Compression, w: DataWriter<'a>) -> std::io::Result<Self> {
        Ok(match c {
            Compression::None => Encoder::Stored(w),
            Compression::Zstd => {
                let mut e = zstd::stream::write::Encoder::new(w, 1)?;
                let workers = std::thread::available_parallelism()
                    .map(|n| n.get() as u32)
                    .unwrap_or(1);
                if workers > 1 {
                    e.multithread(workers)?;
                }
                Encoder::Zstd(e)
            }
            Compression::Deflate => Encoder::Deflate(flate2::write::DeflateEncoder::new(
                w,
                flate2::Compression::new(6),
            )),
        })
    }
    fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Encoder::Stored(w) => w.write_all(b),
            Encoder::Zstd(w) => w.write_all(b),
            Encoder::Deflate(w) => w.write_all(b),
        }
    }
    fn finish(self) -> std::io::Result<()> {
        match self {
            Encoder::Stored(mut w) => w.flush(),
            Encoder::Zstd(w) => w.finish().map(|_| ()),
            Encoder::Deflate(w) => w.finish().map(|_| ()),
        }
    }
}
