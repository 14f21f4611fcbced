//! The checkpoint archive: a zip holding CRIU's images under `images/` and `manifest.json`
//! (format version, process, host, CRIU, CPU, and the size and SHA-256 of every other entry).
//!
//! Invariants: an archive appears under its final name only when complete and synced (it is
//! written under a temporary name in the same directory, then renamed without replacing
//! anything); nothing from an archive reaches the system before every entry name, size and
//! checksum has been verified.
//!
//! The layers: `format` (the manifest, entry names, [`ArchiveError`]), `write` ([`Writer`],
//! [`digest_following`]) and `verify` ([`inspect`], [`extract`], [`extract_stream`]), over the
//! zip layer ([`crate::zipfmt`]). This file only names what the crate's users see.

mod format;
mod verify;
mod write;

#[cfg(test)]
mod tests;

pub use format::{
    host_info, manifest_bytes, manifest_sha256, safe_entry_name, ArchiveError, Compression, Digest,
    Entry, Manifest, ManifestCriu, ManifestHost, ManifestProcess, FORMAT_VERSION, IMAGES_DIR,
    MANIFEST,
};
pub(crate) use verify::{check_names, check_room, mismatch};
pub use verify::{extract, extract_leaving_pages, extract_stream, inspect, Extracted};
pub use write::{digest_following, Finished, Writer};
