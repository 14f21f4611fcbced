//! Where a lazy restore's chunks come from: a checkpoint store, or a chunked archive read in
//! place (its chunks are stored entries, each read by its offset).

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cedana_store::{chunk, ChunkId, ChunkRef, Store, StoreError};

use crate::archive::{ArchiveError, MANIFEST};
use crate::chunkzip::CHUNKS;

pub use crate::restore::{ChunkError, ChunkTrouble};

/// Gives a checkpoint's chunks by name.
pub trait ChunkSource: Send + Sync {
    /// The chunk's bytes, decompressed and checked against its name (never bytes that were
    /// not).
    fn fetch(&self, r: &ChunkRef) -> Result<Vec<u8>, ChunkError>;
    /// The checkpoint, for messages: `STORE/NAME` or the archive's path.
    fn label(&self) -> String;
}

/// Chunks of checkpoint `name` in a store.
pub struct StoreSource {
    store: Store,
    name: String,
    rt: tokio::runtime::Handle,
    /// A checkpoint still being stored (post-copy): how long a missing chunk is waited for.
    wait_for: Option<Duration>,
}

impl StoreSource {
    pub fn new(store: Store, name: &str, rt: tokio::runtime::Handle) -> Self {
        StoreSource {
            store,
            name: name.to_string(),
            rt,
            wait_for: None,
        }
    }

    /// A source for a checkpoint whose chunks are still being stored: a chunk not there yet
    /// is asked for again until it is, for at most `wait_for` (then it is missing).
    pub fn pending(
        store: Store,
        name: &str,
        rt: tokio::runtime::Handle,
        wait_for: Duration,
    ) -> Self {
        StoreSource {
            wait_for: Some(wait_for),
            ..StoreSource::new(store, name, rt)
        }
    }

    fn get(&self, r: &ChunkRef) -> Result<Vec<u8>, StoreError> {
        let Some(wait_for) = self.wait_for else {
            return self.rt.block_on(self.store.get_chunk(&self.name, r));
        };
        let t0 = std::time::Instant::now();
        let mut pause = Duration::from_millis(20);
        loop {
            match self.rt.block_on(self.store.get_chunk(&self.name, r)) {
                Err(StoreError::MissingChunk { .. }) if t0.elapsed() < wait_for => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(250));
                }
                other => return other,
            }
        }
    }
}

impl ChunkSource for StoreSource {
    fn fetch(&self, r: &ChunkRef) -> Result<Vec<u8>, ChunkError> {
        self.get(r).map_err(|e| {
            let (trouble, reason) = match e {
                StoreError::MissingChunk { .. } => (
                    ChunkTrouble::Missing,
                    self.wait_for
                        .map(|w| {
                            format!(
                                "not stored within {} s while its checkpoint was being stored",
                                w.as_secs()
                            )
                        })
                        .unwrap_or_default(),
                ),
                StoreError::BadChunk { reason, .. } => (ChunkTrouble::Damaged, reason),
                other => (ChunkTrouble::Unreachable, other.to_string()),
            };
            ChunkError {
                chunk: r.id.to_string(),
                checkpoint: self.label(),
                trouble,
                reason,
            }
        })
    }

    fn label(&self) -> String {
        format!("{}/{}", self.store.url(), self.name)
    }
}

/// The most entries a chunked archive may hold (as its reader elsewhere allows).
const MAX_ENTRIES: usize = 4_000_000;
/// The most a chunk may take in an archive: zstd's worst case over the largest chunk.
const MAX_SEALED: u64 = chunk::MAX_CHUNK + chunk::MAX_CHUNK / 64 + 4096;

/// Chunks of a chunked archive (`dump --chunked`), read where they lie in the zip.
pub struct ZipSource {
    file: File,
    path: PathBuf,
    /// Each chunk's data: offset and length in the file.
    index: HashMap<ChunkId, (u64, u64)>,
}

impl ZipSource {
    /// Opens the archive at `path`: its central directory (every entry a stored chunk, the
    /// manifest or the restore script) and its manifest's bytes.
    pub fn open(path: &Path) -> Result<(ZipSource, Vec<u8>), ArchiveError> {
        let corrupt = |reason: String| ArchiveError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let open = || File::open(path);
        let file = open().map_err(|source| ArchiveError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut zip = zip::ZipArchive::new(open().map_err(|source| ArchiveError::Open {
            path: path.to_path_buf(),
            source,
        })?)
        .map_err(|e| corrupt(e.to_string()))?;
        if zip.len() > MAX_ENTRIES {
            return Err(corrupt(format!("more than {MAX_ENTRIES} entries")));
        }
        let mut index = HashMap::new();
        let mut manifest = None;
        for i in 0..zip.len() {
            let mut f = zip.by_index_raw(i).map_err(|e| corrupt(e.to_string()))?;
            let name = f.name().to_string();
            if name == MANIFEST {
                let mut bytes = Vec::new();
                if f.compression() != zip::CompressionMethod::Stored {
                    return Err(corrupt(format!("entry {name:?} is compressed")));
                }
                (&mut f)
                    .take(16 << 20)
                    .read_to_end(&mut bytes)
                    .map_err(|e| corrupt(format!("entry {name:?}: {e}")))?;
                manifest = Some(bytes);
                continue;
            }
            if name == crate::chunkzip::SCRIPT {
                continue;
            }
            let id = name
                .strip_prefix(CHUNKS)
                .and_then(ChunkId::parse)
                .ok_or_else(|| ArchiveError::UnlistedEntry {
                    path: path.to_path_buf(),
                    name: name.clone(),
                })?;
            if f.compression() != zip::CompressionMethod::Stored || !f.is_file() {
                return Err(corrupt(format!(
                    "entry {name:?} is not a stored file; a chunked archive's chunks are"
                )));
            }
            let (start, size) = (f.data_start(), f.compressed_size());
            if size > MAX_SEALED || start.checked_add(size).is_none_or(|end| end > len) {
                return Err(corrupt(format!(
                    "entry {name:?} lies past the archive's end or is larger than a chunk may be"
                )));
            }
            if index.insert(id, (start, size)).is_some() {
                return Err(corrupt(format!("entry {name:?} is there twice")));
            }
        }
        let manifest = manifest.ok_or(ArchiveError::NoManifest {
            path: path.to_path_buf(),
        })?;
        Ok((
            ZipSource {
                file,
                path: path.to_path_buf(),
                index,
            },
            manifest,
        ))
    }
}

impl ChunkSource for ZipSource {
    fn fetch(&self, r: &ChunkRef) -> Result<Vec<u8>, ChunkError> {
        let err = |trouble, reason: String| ChunkError {
            chunk: r.id.to_string(),
            checkpoint: self.label(),
            trouble,
            reason,
        };
        let (start, size) = *self
            .index
            .get(&r.id)
            .ok_or_else(|| err(ChunkTrouble::Missing, String::new()))?;
        let mut sealed = vec![0u8; size as usize];
        self.file
            .read_exact_at(&mut sealed, start)
            .map_err(|e| err(ChunkTrouble::Unreachable, e.to_string()))?;
        chunk::open(r, &sealed).map_err(|e| err(ChunkTrouble::Damaged, e.to_string()))
    }

    fn label(&self) -> String {
        self.path.display().to_string()
    }
}
