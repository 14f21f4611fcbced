//! [`Store`]: one job's checkpoints and chunks under a prefix of an object store.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};

use crate::chunk::{self, ChunkId, ChunkRef, MAX_CHUNK};
use crate::{StoreError, StoreUrl};

/// The largest manifest read. A manifest lists about 100 bytes per MiB of checkpoint: 64 MiB
/// covers a checkpoint of hundreds of TiB.
pub const MAX_MANIFEST: u64 = 64 << 20;

/// A checkpoint in a store.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CheckpointInfo {
    pub name: String,
    /// The manifest's size.
    pub manifest_bytes: u64,
    /// When the manifest was written, by the store's clock (ms since the epoch).
    pub written_ms: i64,
}

/// A chunk as listed.
#[derive(Clone, Copy, Debug)]
pub struct Listed {
    pub stored_bytes: u64,
    pub written_ms: i64,
}

/// One job's part of an object store.
#[derive(Clone)]
pub struct Store {
    url: StoreUrl,
    inner: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.url)
    }
}

/// Whether `name` may name a checkpoint: letters, digits, `.`, `_`, `-`, not starting with a
/// dot, at most 200 characters.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Store {
    /// The store at `url` (no request is made yet).
    pub fn open(url: &StoreUrl) -> Result<Self, StoreError> {
        let (inner, prefix) = url.open()?;
        Ok(Store {
            url: url.clone(),
            inner,
            prefix,
        })
    }

    pub fn url(&self) -> &StoreUrl {
        &self.url
    }

    fn path(&self, rest: &str) -> ObjectPath {
        let mut p = self.prefix.clone();
        for part in rest.split('/') {
            p = p.child(part);
        }
        p
    }

    fn chunk_path(&self, id: &ChunkId) -> ObjectPath {
        self.path(&format!("chunks/{id}"))
    }

    fn manifest_path(&self, name: &str) -> ObjectPath {
        self.path(&format!("checkpoints/{name}.json"))
    }

    fn io(&self, op: &'static str, object: &ObjectPath, e: object_store::Error) -> StoreError {
        StoreError::Io {
            store: self.url.to_string(),
            op,
            object: object.to_string(),
            source: Box::new(e),
        }
    }

    fn check_name(&self, name: &str) -> Result<(), StoreError> {
        match valid_name(name) {
            true => Ok(()),
            false => Err(StoreError::NoCheckpoint {
                store: self.url.to_string(),
                name: name.to_string(),
            }),
        }
    }

    /// Every object under `dir` (under the prefix): its file name, size and when it was
    /// written (ms since the epoch, the store's clock).
    async fn list(&self, dir: &str) -> Result<Vec<(String, u64, i64)>, StoreError> {
        let dir = self.path(dir);
        let mut out = Vec::new();
        let mut list = self.inner.list(Some(&dir));
        while let Some(meta) = list
            .try_next()
            .await
            .map_err(|e| self.io("list", &dir, e))?
        {
            if let Some(f) = meta.location.filename() {
                out.push((
                    f.to_string(),
                    meta.size,
                    meta.last_modified.timestamp_millis(),
                ));
            }
        }
        Ok(out)
    }

    /// Every chunk in the store, with its size and when it was written.
    pub async fn list_chunks(&self) -> Result<HashMap<ChunkId, Listed>, StoreError> {
        let mut out = HashMap::new();
        for (file, size, written_ms) in self.list("chunks").await? {
            // An empty file is no chunk (a zstd frame is never empty): a folder store's write
            // cut short by a crash, sent again.
            if size == 0 {
                continue;
            }
            if let Some(id) = ChunkId::parse(&file) {
                out.insert(
                    id,
                    Listed {
                        stored_bytes: size,
                        written_ms,
                    },
                );
            }
        }
        Ok(out)
    }

    /// Stores a sealed chunk (see [`chunk::seal`]). Writing one that exists rewrites the same
    /// bytes.
    pub async fn put_chunk(&self, id: &ChunkId, sealed: Bytes) -> Result<(), StoreError> {
        let path = self.chunk_path(id);
        self.inner
            .put(&path, PutPayload::from_bytes(sealed))
            .await
            .map_err(|e| self.io("put", &path, e))?;
        Ok(())
    }

    /// A chunk of `checkpoint`, read, decompressed and checked against its name.
    pub async fn get_chunk(&self, checkpoint: &str, r: &ChunkRef) -> Result<Vec<u8>, StoreError> {
        let path = self.chunk_path(&r.id);
        let bad = |reason: String| StoreError::BadChunk {
            store: self.url.to_string(),
            checkpoint: checkpoint.to_string(),
            chunk: r.id.to_string(),
            reason,
        };
        if r.size > MAX_CHUNK {
            return Err(bad(format!(
                "the manifest declares {} bytes, more than the {MAX_CHUNK} a chunk may hold",
                r.size
            )));
        }
        let got = match self.inner.get(&path).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(StoreError::MissingChunk {
                    store: self.url.to_string(),
                    checkpoint: checkpoint.to_string(),
                    chunk: r.id.to_string(),
                })
            }
            Err(e) => return Err(self.io("get", &path, e)),
        };
        // zstd's worst case is a little over the input: a stored chunk larger than that is
        // not one this crate wrote.
        let limit = MAX_CHUNK + MAX_CHUNK / 64 + 4096;
        if got.meta.size > limit {
            return Err(bad(format!("it is {} bytes stored", got.meta.size)));
        }
        let sealed = got.bytes().await.map_err(|e| self.io("get", &path, e))?;
        let r = *r;
        tokio::task::spawn_blocking(move || chunk::open(&r, &sealed))
            .await
            .map_err(|e| bad(e.to_string()))?
            .map_err(|e| bad(e.to_string()))
    }

    /// A folder store: makes what was written durable (the folder's whole filesystem, one
    /// `syncfs`), so a manifest never outlives a power cut that its chunks did not. Object
    /// stores are durable once they answered.
    pub async fn sync(&self) -> Result<(), StoreError> {
        let Some(dir) = self.url.folder().map(std::path::Path::to_path_buf) else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            use std::os::fd::AsRawFd;
            let f = std::fs::File::open(&dir).map_err(|source| StoreError::Write {
                path: dir.clone(),
                source,
            })?;
            // SAFETY: syncfs on a descriptor this function owns for the call's duration.
            if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
                return Err(StoreError::Write {
                    path: dir,
                    source: std::io::Error::last_os_error(),
                });
            }
            Ok(())
        })
        .await
        .expect("syncing does not panic")
    }

    /// Writes a checkpoint's manifest, never replacing one.
    pub async fn put_manifest(&self, name: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        if !valid_name(name) {
            return Err(StoreError::BadUrl {
                url: self.url.to_string(),
                reason: format!("{name:?} cannot name a checkpoint"),
            });
        }
        let path = self.manifest_path(name);
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self.inner.put_opts(&path, bytes.into(), opts).await {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => Err(StoreError::Exists {
                store: self.url.to_string(),
                name: name.to_string(),
            }),
            Err(e) => Err(self.io("put", &path, e)),
        }
    }

    /// A checkpoint's manifest, as written.
    pub async fn get_manifest(&self, name: &str) -> Result<Bytes, StoreError> {
        self.check_name(name)?;
        let path = self.manifest_path(name);
        let got = match self.inner.get(&path).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(StoreError::NoCheckpoint {
                    store: self.url.to_string(),
                    name: name.to_string(),
                })
            }
            Err(e) => return Err(self.io("get", &path, e)),
        };
        if got.meta.size > MAX_MANIFEST {
            return Err(StoreError::BadManifest {
                store: self.url.to_string(),
                name: name.to_string(),
                reason: format!(
                    "it is {} bytes, more than the {MAX_MANIFEST} a manifest may be",
                    got.meta.size
                ),
            });
        }
        got.bytes().await.map_err(|e| self.io("get", &path, e))
    }

    /// The manifest a writer published before its chunks are all stored ([`crate::Writing::publish_pending`]),
    /// else (the writing ended) the checkpoint's own. A post-copy restore reads it and waits
    /// for the chunks it names.
    pub async fn get_pending_manifest(&self, name: &str) -> Result<Bytes, StoreError> {
        self.check_name(name)?;
        match self.get_small(&pending_path(name)).await? {
            Some((bytes, _)) if bytes.len() as u64 > MAX_MANIFEST => Err(StoreError::BadManifest {
                store: self.url.to_string(),
                name: name.to_string(),
                reason: format!(
                    "it is {} bytes, more than the {MAX_MANIFEST} a manifest may be",
                    bytes.len()
                ),
            }),
            Some((bytes, _)) => Ok(bytes),
            None => self.get_manifest(name).await,
        }
    }

    /// The checkpoints in the store, oldest first.
    pub async fn list_checkpoints(&self) -> Result<Vec<CheckpointInfo>, StoreError> {
        let mut out = Vec::new();
        for (file, manifest_bytes, written_ms) in self.list("checkpoints").await? {
            match file.strip_suffix(".json") {
                Some(name) if valid_name(name) => out.push(CheckpointInfo {
                    name: name.to_string(),
                    manifest_bytes,
                    written_ms,
                }),
                _ => {}
            }
        }
        out.sort_by(|a, b| (a.written_ms, &a.name).cmp(&(b.written_ms, &b.name)));
        Ok(out)
    }

    /// Removes a checkpoint's manifest (its chunks go in a later prune, see [`crate::gc`]).
    pub async fn delete_checkpoint(&self, name: &str) -> Result<(), StoreError> {
        self.check_name(name)?;
        let path = self.manifest_path(name);
        self.delete(&path).await
    }

    pub(crate) async fn delete_chunk(&self, id: &ChunkId) -> Result<(), StoreError> {
        let path = self.chunk_path(id);
        self.delete(&path).await
    }

    async fn delete(&self, path: &ObjectPath) -> Result<(), StoreError> {
        match self.inner.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.io("delete", path, e)),
        }
    }

    /// A small JSON object at `rest` (under the prefix), or `None` if there is none.
    pub(crate) async fn get_small(&self, rest: &str) -> Result<Option<(Bytes, i64)>, StoreError> {
        let path = self.path(rest);
        match self.inner.get(&path).await {
            Ok(g) => {
                let at = g.meta.last_modified.timestamp_millis();
                if g.meta.size > 1 << 20 {
                    return Ok(Some((Bytes::new(), at)));
                }
                let b = g.bytes().await.map_err(|e| self.io("get", &path, e))?;
                Ok(Some((b, at)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.io("get", &path, e)),
        }
    }

    /// Writes a small object at `rest`; `create`: only if there is none (false when there was).
    pub(crate) async fn put_small(
        &self,
        rest: &str,
        bytes: Vec<u8>,
        create: bool,
    ) -> Result<bool, StoreError> {
        let path = self.path(rest);
        let opts = PutOptions {
            mode: match create {
                true => PutMode::Create,
                false => PutMode::Overwrite,
            },
            ..Default::default()
        };
        match self.inner.put_opts(&path, bytes.into(), opts).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.io("put", &path, e)),
        }
    }

    pub(crate) async fn delete_small(&self, rest: &str) -> Result<(), StoreError> {
        let path = self.path(rest);
        self.delete(&path).await
    }

    /// Objects under `dir` (under the prefix): file name and when written.
    pub(crate) async fn list_small(&self, dir: &str) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(self
            .list(dir)
            .await?
            .into_iter()
            .map(|(file, _, at)| (file, at))
            .collect())
    }
}

/// Where a writer publishes a checkpoint's manifest before its chunks are all stored.
pub(crate) fn pending_path(name: &str) -> String {
    format!("pending/{name}.json")
}
