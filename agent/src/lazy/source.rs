//! Where a lazy restore's chunks come from: a checkpoint store, or a chunked archive read in
//! place (its chunks are stored entries, each read by its offset).

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cedana_store::{chunk, ChunkId, ChunkRef, Store, StoreError};

use crate::archive::{ArchiveError, Entry, Manifest, MANIFEST};
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
    /// Its entries as the restore read them, where chunks may still stand in for names
    /// ([`ChunkId::unnamed`]).
    layout: Vec<Entry>,
    /// Every chunk's name by entry, once the writer published them.
    named: Mutex<Option<Vec<Vec<ChunkRef>>>>,
}

impl StoreSource {
    pub fn new(store: Store, name: &str, rt: tokio::runtime::Handle) -> Self {
        StoreSource {
            store,
            name: name.to_string(),
            rt,
            wait_for: None,
            layout: Vec::new(),
            named: Mutex::new(None),
        }
    }

    /// A source for a checkpoint whose chunks are still being stored, read from its published
    /// `manifest`: a chunk not there yet is asked for again until it is, and a chunk not named
    /// yet waits for the manifest published again with its name, each for at most `wait_for`
    /// (then it is missing). That manifest must say what this one said, names added.
    pub fn pending(
        store: Store,
        name: &str,
        rt: tokio::runtime::Handle,
        wait_for: Duration,
        manifest: &Manifest,
    ) -> Self {
        StoreSource {
            wait_for: Some(wait_for),
            layout: manifest.entries.clone(),
            ..StoreSource::new(store, name, rt)
        }
    }

    /// The chunk `r` stands for, once named ([`ChunkId::unnamed`]); `r` itself if named.
    fn resolve(&self, r: &ChunkRef) -> Result<ChunkRef, ChunkError> {
        let Some((entry, index)) = r.id.unnamed_at() else {
            return Ok(*r);
        };
        let (entry, index) = (entry as usize, index as usize);
        let err = |trouble, reason: String| ChunkError {
            chunk: format!(
                "{index} of {} (not named yet)",
                self.layout
                    .get(entry)
                    .map_or("an entry", |e| e.name.as_str())
            ),
            checkpoint: self.label(),
            trouble,
            reason,
        };
        let t0 = Instant::now();
        let wait_for = self.wait_for.unwrap_or_default();
        let mut pause = Duration::from_millis(10);
        loop {
            if let Some(named) = self.named.lock().expect("not poisoned").as_ref() {
                return named
                    .get(entry)
                    .and_then(|e| e.get(index))
                    .copied()
                    .ok_or_else(|| err(ChunkTrouble::Damaged, "no such chunk".into()));
            }
            let bytes = self
                .rt
                .block_on(self.store.get_pending_manifest(&self.name))
                .map_err(|e| err(ChunkTrouble::Unreachable, e.to_string()))?;
            if let Some(named) = self.names_in(&bytes).map_err(|reason| {
                err(
                    ChunkTrouble::Damaged,
                    format!("the checkpoint's manifest changed while it was restored: {reason}"),
                )
            })? {
                *self.named.lock().expect("not poisoned") = Some(named);
                continue;
            }
            if t0.elapsed() >= wait_for {
                return Err(err(
                    ChunkTrouble::Missing,
                    format!(
                        "not named within {} s while its checkpoint was being stored",
                        wait_for.as_secs()
                    ),
                ));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// Every chunk's name from manifest `bytes`, if it names them all; an error if it does
    /// not say what the manifest first read said (entries, sizes, chunk sizes, names).
    fn names_in(&self, bytes: &[u8]) -> Result<Option<Vec<Vec<ChunkRef>>>, String> {
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if m.entries.len() != self.layout.len() {
            return Err(format!(
                "{} entries, not {}",
                m.entries.len(),
                self.layout.len()
            ));
        }
        let mut all = true;
        let mut out = Vec::with_capacity(m.entries.len());
        for (now, was) in m.entries.into_iter().zip(&self.layout) {
            let (chunks, before) = (now.chunks.unwrap_or_default(), was.chunks.as_deref());
            let before = before.unwrap_or_default();
            let same = now.name == was.name
                && now.size == was.size
                && chunks.len() == before.len()
                && chunks.iter().zip(before).all(|(c, b)| {
                    c.size == b.size && (b.id.unnamed_at().is_some() || c.id == b.id)
                });
            if !same {
                return Err(format!("entry {:?} is not what it was", was.name));
            }
            all &= chunks.iter().all(|c| c.id.unnamed_at().is_none());
            out.push(chunks);
        }
        Ok(all.then_some(out))
    }

    fn get(&self, r: &ChunkRef) -> Result<Vec<u8>, StoreError> {
        let Some(wait_for) = self.wait_for else {
            return self.rt.block_on(self.store.get_chunk(&self.name, r));
        };
        let t0 = Instant::now();
        let mut pause = Duration::from_millis(10);
        loop {
            match self.rt.block_on(self.store.get_chunk(&self.name, r)) {
                Err(StoreError::MissingChunk { .. }) if t0.elapsed() < wait_for => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                other => return other,
            }
        }
    }
}

impl ChunkSource for StoreSource {
    fn fetch(&self, r: &ChunkRef) -> Result<Vec<u8>, ChunkError> {
        let r = &self.resolve(r)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use cedana_store::{StoreUrl, Writing};

    fn manifest(entries: Vec<Entry>) -> Manifest {
        Manifest {
            format_version: crate::chunked::FORMAT_VERSION,
            created_at: String::new(),
            agent_version: String::new(),
            process: Default::default(),
            host: Default::default(),
            criu: Default::default(),
            cpu: None,
            compression: crate::archive::Compression::Zstd,
            entries,
            files: None,
        }
    }

    fn entry(name: &str, chunks: Vec<ChunkRef>) -> Entry {
        Entry {
            name: name.into(),
            size: chunks.iter().map(|c| c.size).sum(),
            sha256: String::new(),
            blake3: String::new(),
            chunks: Some(chunks),
        }
    }

    /// A restore of a move reads a manifest with stand-ins for chunks not named yet: a fetch
    /// of one waits for the manifest published again with the names (and then for the chunk),
    /// refuses a manifest that says something else, and gives up after its wait.
    #[test]
    fn a_chunk_not_named_yet_is_fetched_once_named_and_a_changed_manifest_is_refused() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let url = StoreUrl::parse(dir.path().join("store").to_str().unwrap()).unwrap();
        let store = Store::open(&url).unwrap();
        let (a, b) = (vec![1u8; 5000], vec![2u8; 7000]);
        let (ida, sealed_a) = chunk::seal(&a, 1);
        let (idb, sealed_b) = chunk::seal(&b, 1);
        let named_a = ChunkRef {
            id: ida,
            size: 5000,
        };
        let named_b = ChunkRef {
            id: idb,
            size: 7000,
        };
        let stand_in = ChunkRef {
            id: ChunkId::unnamed(0, 1),
            size: 7000,
        };
        let first = manifest(vec![entry("images/pages-1.img", vec![named_a, stand_in])]);
        let named = manifest(vec![entry("images/pages-1.img", vec![named_a, named_b])]);
        let mut w = rt.block_on(Writing::begin(&store)).unwrap();
        rt.block_on(store.put_chunk(&ida, sealed_a.into())).unwrap();
        let json = |m: &Manifest| serde_json::to_vec(m).unwrap();
        rt.block_on(w.publish_pending("moved", json(&first)))
            .unwrap();
        let pending = |wait_for| {
            StoreSource::pending(
                store.clone(),
                "moved",
                rt.handle().clone(),
                wait_for,
                &first,
            )
        };
        let source = pending(Duration::from_secs(10));
        assert_eq!(source.fetch(&named_a).unwrap(), a);
        // Named 150 ms later, stored 150 ms after that.
        let got = std::thread::scope(|s| {
            let fetching = s.spawn(|| source.fetch(&stand_in));
            std::thread::sleep(Duration::from_millis(150));
            rt.block_on(w.publish_pending("moved", json(&named)))
                .unwrap();
            std::thread::sleep(Duration::from_millis(150));
            rt.block_on(store.put_chunk(&idb, sealed_b.into())).unwrap();
            fetching.join().unwrap()
        });
        assert_eq!(got.unwrap(), b);

        // A manifest published again with another size: refused, naming the chunk.
        let source = pending(Duration::from_secs(10));
        let mut other = named.clone();
        other.entries[0].size += 1;
        rt.block_on(w.publish_pending("moved", json(&other)))
            .unwrap();
        let e = source.fetch(&stand_in).unwrap_err();
        assert_eq!(e.trouble, ChunkTrouble::Damaged, "{e}");
        let said = e.to_string();
        assert!(said.contains("1 of images/pages-1.img"), "{said}");
        assert!(said.contains("changed while it was restored"), "{said}");

        // Never named: missing after the wait.
        rt.block_on(w.publish_pending("moved", json(&first)))
            .unwrap();
        let source = pending(Duration::from_millis(300));
        let e = source.fetch(&stand_in).unwrap_err();
        assert_eq!(e.trouble, ChunkTrouble::Missing, "{e}");
        assert!(e.to_string().contains("not named within"), "{e}");
        rt.block_on(w.abandon());
    }
}
