//! Chunked, content-addressed checkpoints in an object store.
//!
//! A checkpoint is a manifest plus chunks. Each chunk is a piece of one file (a CRIU image, a
//! carried file), compressed on its own with zstd and named by the BLAKE3 hash of its
//! uncompressed bytes, so any chunk can be read and verified alone and a chunk already in the
//! store is never sent again. The layout under a store's prefix (one prefix per job):
//!
//! ```text
//! chunks/<blake3 hex>              zstd frame of the chunk's bytes
//! checkpoints/<name>.json          the manifest, written last and never replaced
//! uploads/<id>.json                a checkpoint being written (see [`gc`])
//! gc/lock                          a prune removing chunks (see [`gc`])
//! ```
//!
//! What a manifest holds beyond each entry's chunk list is the writer's business (the agent's
//! process, host and CRIU description); this crate reads only `entries[].chunks[]`.
//!
//! Invariants:
//! - a manifest is written only after every chunk it names is in the store, and is written with
//!   a create-only put (a checkpoint is never replaced);
//! - a chunk's bytes are checked against its name before anything uses them;
//! - a prune never deletes a chunk a kept manifest names, also when it races a checkpoint being
//!   written or is killed halfway (see [`gc`]).

pub mod chunk;
pub mod gc;
pub mod location;
pub mod store;
pub mod transfer;

pub use chunk::{ChunkId, ChunkRef};
pub use gc::{prune, Keep, PruneOutcome, Writing};
pub use location::StoreUrl;
pub use store::{valid_name, CheckpointInfo, Store};
pub use transfer::{
    download, name_rest, plan, upload, upload_first, upload_named, Piece, Uploaded, UploadedEntry,
    Wanted,
};

/// Errors of a store. Each names the store (and the object) it is about.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("checkpoint store {url:?} is not usable: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("checkpoint store {store}: {op} {object}: {source}")]
    Io {
        store: String,
        op: &'static str,
        object: String,
        source: Box<object_store::Error>,
    },
    #[error("checkpoint store {store}: checkpoint {name:?} does not exist; `cedana-agent checkpoints --store {store}` lists what does")]
    NoCheckpoint { store: String, name: String },
    #[error("checkpoint store {store}: checkpoint {name:?} already exists; nothing was replaced")]
    Exists { store: String, name: String },
    #[error("checkpoint store {store}: chunk {chunk} of checkpoint {checkpoint:?} is missing; that checkpoint cannot be restored, use an earlier one")]
    MissingChunk {
        store: String,
        checkpoint: String,
        chunk: String,
    },
    #[error("checkpoint store {store}: chunk {chunk} of checkpoint {checkpoint:?} is damaged ({reason}); that checkpoint cannot be restored, use an earlier one")]
    BadChunk {
        store: String,
        checkpoint: String,
        chunk: String,
        reason: String,
    },
    #[error("checkpoint store {store}: checkpoint {name:?} has an unreadable manifest: {reason}")]
    BadManifest {
        store: String,
        name: String,
        reason: String,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Milliseconds since the epoch, now.
pub(crate) fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}
