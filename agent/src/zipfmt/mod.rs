//! The zip layer: our own ZIP64 writer ([`write`](mod@write)) and a reader going front to
//! back as an archive arrives ([`read`](mod@read)). It knows zip files only, nothing of
//! checkpoints, manifests or where entries may go (the archive layer, [`crate::archive`],
//! decides that and maps [`ZipError`] into its own errors).
//!
//! This file holds what both directions share: the compression methods, the record
//! signatures, the [`Sink`] an archive is written to when not to a file, the [`ChunkSource`] one
//! is read from, and [`ZipError`].

pub mod read;
pub mod write;

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;

use bytes::Bytes;

/// Stored (no compression).
pub const STORED: u16 = 0;
/// Deflate.
pub const DEFLATED: u16 = 8;
/// Zstandard (APPNOTE method 93).
pub const ZSTD: u16 = 93;

const LOCAL_SIG: u32 = 0x0403_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const DESCRIPTOR_SIG: u32 = 0x0807_4b50;
const EOCD_SIG: u32 = 0x0605_4b50;
const EOCD64_SIG: u32 = 0x0606_4b50;
const LOCATOR64_SIG: u32 = 0x0706_4b50;
/// General purpose bit 3: sizes and CRC-32 follow the data in a data descriptor.
const FLAG_DESCRIPTOR: u16 = 1 << 3;
/// Header id of the ZIP64 extra field.
const EXTRA_ZIP64: u16 = 0x0001;
/// Header id of the padding field that aligns an entry's data (`zipalign`'s).
const EXTRA_ALIGN: u16 = 0xd935;
/// Where in-place entries' data starts: a page boundary.
const ALIGN: u64 = 4096;
const U32_MAX: u64 = u32::MAX as u64;

/// Errors reading a zip front to back. Each names the archive by the label its reader was
/// given.
#[derive(Debug, thiserror::Error)]
pub enum ZipError {
    #[error("zip archive {path} is corrupt or truncated ({reason})")]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("zip archive {path} cannot be read front to back: its stored entry {name:?} has no size in its header")]
    Unstreamable { path: PathBuf, name: String },
    #[error("zip archive {path} expands past {limit} bytes (at entry {name:?})")]
    TooLarge {
        path: PathBuf,
        name: String,
        limit: u64,
    },
}

/// Where an archive's bytes go when not to a file: front to back, no seeking.
pub trait Sink: Write + Send {
    /// Appends `len` bytes read from `src` at its current position, feeding them to `crc` if
    /// given; returns how many were copied (fewer only at the end of `src`).
    fn copy_from(
        &mut self,
        src: &mut File,
        len: u64,
        crc: Option<&mut crc32fast::Hasher>,
    ) -> io::Result<u64>;
    /// Appends `b`, which the sink may keep instead of copying.
    fn write_bytes(&mut self, b: Bytes) -> io::Result<()> {
        self.write_all(&b)
    }
    /// Told, right before the data descriptor of a stored entry is written, that entry's local
    /// header offset and size (for readers going front to back while the archive is still
    /// being written, who cannot otherwise tell where its data ends).
    fn note_stored_size(&mut self, _offset: u64, _size: u64) {}
    /// Called once the whole archive was written: makes it durable under a name made from
    /// `stem` (never replacing anything) and returns that name. `stored_sizes` are the offset
    /// and size of every stored entry whose size only its data descriptor gives (see
    /// [`write::ZipOut::stored_sizes`]); a sink keeps them with the archive for readers going
    /// front to back. A sink dropped without a commit must leave nothing behind.
    fn commit(self: Box<Self>, stem: &str, stored_sizes: &[(u64, u64)]) -> io::Result<String>;
}

/// Where an archive's bytes come from, in order.
pub trait ChunkSource {
    /// The next piece of the archive; `None` at its end. An error ends the reading.
    fn next_chunk(&mut self) -> io::Result<Option<Bytes>>;
    /// The size of the stored entry whose local header is at `offset`, if the pieces read so
    /// far announced it.
    fn stored_size(&self, _offset: u64) -> Option<u64> {
        None
    }
    /// Whether the pieces announce the size of every stored entry with a data descriptor in
    /// the piece where that descriptor starts, or earlier. A reader may then take a whole
    /// piece as an entry's data as long as the entry's size is not yet known.
    fn announces_sizes(&self) -> bool {
        false
    }
}
