//! Pruning, and how it stays out of the way of checkpoints being written.
//!
//! A checkpoint's writer relies on chunks already in the store: it must never see a chunk,
//! decide not to send it, and then have a prune remove it before its manifest names it. Two
//! small objects keep the two apart, in the way of a mutual exclusion over a strongly
//! consistent store (S3, GCS and Azure are; so is a folder):
//!
//! - a writer first puts `uploads/<id>.json` (its marker, rewritten every
//!   [`MARKER_RENEW`]), then looks for `gc/lock`, and while a live one exists it waits (at most
//!   [`LOCK_TTL`]) before it lists anything; it removes its marker once its manifest is written;
//! - a prune first creates `gc/lock` (create-only; renewed every [`LOCK_RENEW`]), then looks
//!   for markers, and removes no chunk while a live one exists (the chunks are collected by a
//!   later prune).
//!
//! Whichever writes first, the other sees it. Manifests go first and chunks after, and a chunk
//! is removed only when no manifest listed after the manifests went names it, so a prune killed
//! anywhere leaves every kept checkpoint whole (at worst, chunks that the next prune removes).
//! A killed writer leaves chunks no manifest names and a marker that stops being live after
//! [`MARKER_TTL`]; the first prune after that removes both. A killed prune leaves its lock,
//! which stops being live after [`LOCK_TTL`].

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkId, ChunkRef};
use crate::{now_ms, Store, StoreError};

/// A prune's lock is live this long after it was last written.
pub const LOCK_TTL: Duration = Duration::from_secs(30);
pub const LOCK_RENEW: Duration = Duration::from_secs(10);
/// A writer's marker is live this long after it was last written (unless
/// [`MARKER_TTL_ENV`] says otherwise).
pub const MARKER_TTL: Duration = Duration::from_secs(30 * 60);
/// Seconds a writer's marker stays live, instead of [`MARKER_TTL`]: for a prune that must
/// collect a killed writer's chunks sooner (and for tests). Keep it well above the longest
/// upload.
pub const MARKER_TTL_ENV: &str = "CEDANA_STORE_MARKER_TTL_SECS";

fn marker_ttl() -> Duration {
    std::env::var(MARKER_TTL_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(MARKER_TTL)
}
pub const MARKER_RENEW: Duration = Duration::from_secs(5 * 60);

const LOCK: &str = "gc/lock";

fn live(written_ms: i64, ttl: Duration) -> bool {
    now_ms().saturating_sub(written_ms) < ttl.as_millis() as i64
}

fn unique_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    format!(
        "{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        blake3::hash(format!("{nanos}{:?}", std::thread::current().id()).as_bytes())
            .to_hex()
            .get(..12)
            .unwrap_or_default()
    )
}

#[derive(Serialize, Deserialize)]
struct Marker {
    host: String,
    pid: u32,
    written_ms: i64,
}

fn marker_bytes() -> Vec<u8> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    serde_json::to_vec(&Marker {
        host,
        pid: std::process::id(),
        written_ms: now_ms(),
    })
    .expect("serializes")
}

/// A checkpoint being written: while it lives, no prune removes a chunk from its store. Made by
/// [`Writing::begin`], ended by [`Writing::commit`] (or dropped: its marker is removed in the
/// background, or goes stale).
pub struct Writing {
    store: Store,
    marker: String,
    renew: tokio::task::JoinHandle<()>,
    ended: bool,
}

impl Writing {
    /// Puts this writer's marker, then waits while a live prune holds the lock.
    pub async fn begin(store: &Store) -> Result<Writing, StoreError> {
        let marker = format!("uploads/{}.json", unique_id());
        store.put_small(&marker, marker_bytes(), false).await?;
        let renew = {
            let (store, marker) = (store.clone(), marker.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(MARKER_RENEW).await;
                    if let Err(e) = store.put_small(&marker, marker_bytes(), false).await {
                        tracing::warn!(error = %e, "cannot renew the checkpoint's marker");
                    }
                }
            })
        };
        let writing = Writing {
            store: store.clone(),
            marker,
            renew,
            ended: false,
        };
        let deadline = Instant::now() + LOCK_TTL + Duration::from_secs(2);
        let mut told = false;
        while let Some((_, at)) = store.get_small(LOCK).await? {
            if !live(at, LOCK_TTL) || Instant::now() > deadline {
                break;
            }
            if !told {
                tracing::info!(store = %store.url(), "a prune is removing chunks: waiting for it");
                told = true;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Ok(writing)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Writes the checkpoint's manifest (never replacing one) and ends the writing; if the
    /// name is taken ([`StoreError::Exists`]) the writing goes on, for another name.
    pub async fn commit(&mut self, name: &str, manifest: Vec<u8>) -> Result<(), StoreError> {
        let result = self.store.put_manifest(name, manifest).await;
        if !matches!(result, Err(StoreError::Exists { .. })) {
            self.end().await;
        }
        result
    }

    /// Ends the writing without a manifest (its chunks go in a later prune).
    pub async fn abandon(mut self) {
        self.end().await;
    }

    async fn end(&mut self) {
        self.renew.abort();
        self.ended = true;
        if let Err(e) = self.store.delete_small(&self.marker).await {
            tracing::warn!(error = %e, "cannot remove the checkpoint's marker; it goes stale");
        }
    }
}

impl Drop for Writing {
    fn drop(&mut self) {
        self.renew.abort();
        if !self.ended {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let (store, marker) = (self.store.clone(), self.marker.clone());
                rt.spawn(async move {
                    let _ = store.delete_small(&marker).await;
                });
            }
        }
    }
}

/// Which checkpoints a prune keeps: the `newest` ones, and any named in `names`.
#[derive(Clone, Debug, Default)]
pub struct Keep {
    pub newest: usize,
    pub names: HashSet<String>,
}

/// What a prune did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PruneOutcome {
    pub kept: Vec<String>,
    pub removed: Vec<String>,
    pub chunks_kept: u64,
    pub chunks_removed: u64,
    pub stored_bytes_removed: u64,
    /// Why no chunk was removed this time, if none was for a reason (they go next time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunks_deferred: Option<String>,
}

/// The chunks a manifest names (only `entries[].chunks[]` is read).
pub fn referenced(manifest: &[u8]) -> Result<Vec<ChunkRef>, String> {
    #[derive(Deserialize)]
    struct Refs {
        entries: Vec<RefEntry>,
    }
    #[derive(Deserialize)]
    struct RefEntry {
        #[serde(default)]
        chunks: Vec<ChunkRef>,
    }
    let refs: Refs = serde_json::from_slice(manifest).map_err(|e| e.to_string())?;
    Ok(refs.entries.into_iter().flat_map(|e| e.chunks).collect())
}

/// Removes the checkpoints `keep` does not keep, then every chunk no remaining checkpoint
/// names (unless a checkpoint is being written, see the module's documentation).
pub async fn prune(store: &Store, keep: &Keep) -> Result<PruneOutcome, StoreError> {
    let mut out = PruneOutcome::default();
    let all = store.list_checkpoints().await?;
    let newest_from = all.len().saturating_sub(keep.newest);
    for (i, c) in all.iter().enumerate() {
        if i >= newest_from || keep.names.contains(&c.name) {
            out.kept.push(c.name.clone());
        } else {
            store.delete_checkpoint(&c.name).await?;
            out.removed.push(c.name.clone());
        }
    }
    // The lock: one prune at a time, and none while a checkpoint is written.
    let mut locked = store.put_small(LOCK, marker_bytes(), true).await?;
    if !locked {
        if let Some((_, at)) = store.get_small(LOCK).await? {
            if !live(at, LOCK_TTL) {
                store.delete_small(LOCK).await?;
                locked = store.put_small(LOCK, marker_bytes(), true).await?;
            }
        }
    }
    if !locked {
        out.chunks_deferred = Some("another prune is removing chunks".into());
        return Ok(out);
    }
    let renew = {
        let store = store.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(LOCK_RENEW).await;
                let _ = store.put_small(LOCK, marker_bytes(), false).await;
            }
        })
    };
    let result = collect(store, &mut out).await;
    renew.abort();
    store.delete_small(LOCK).await?;
    result?;
    Ok(out)
}

async fn collect(store: &Store, out: &mut PruneOutcome) -> Result<(), StoreError> {
    let mut writing = 0;
    for (file, at) in store.list_small("uploads").await? {
        if live(at, marker_ttl()) {
            writing += 1;
        } else {
            // A killed writer's.
            store.delete_small(&format!("uploads/{file}")).await?;
        }
    }
    if writing > 0 {
        out.chunks_deferred = Some(format!(
            "{writing} checkpoint(s) being written; their chunks may not be named yet"
        ));
        return Ok(());
    }
    let mut named = HashSet::new();
    for c in store.list_checkpoints().await? {
        let bytes = match store.get_manifest(&c.name).await {
            Ok(b) => b,
            // Removed by someone else meanwhile: it names nothing any more.
            Err(StoreError::NoCheckpoint { .. }) => continue,
            Err(e) => return Err(e),
        };
        match referenced(&bytes) {
            Ok(refs) => named.extend(refs.into_iter().map(|r| r.id)),
            Err(reason) => {
                // Never remove a chunk without knowing what every checkpoint names.
                out.chunks_deferred = Some(format!(
                    "checkpoint {:?} has an unreadable manifest ({reason})",
                    c.name
                ));
                return Ok(());
            }
        }
    }
    // A folder store writes each chunk under `<id>#<n>` first and renames it: a writer
    // killed meanwhile leaves that name, which listings hide. Removed once as old as a stale
    // marker (no live writer is still renaming it then).
    if let Some(dir) = store.url().folder() {
        remove_partial_chunks(&dir.join("chunks"));
    }
    let chunks = store.list_chunks().await?;
    let doomed: Vec<(ChunkId, u64)> = chunks
        .iter()
        .filter(|(id, _)| !named.contains(*id))
        .map(|(id, l)| (*id, l.stored_bytes))
        .collect();
    out.chunks_kept = (chunks.len() - doomed.len()) as u64;
    out.chunks_removed = doomed.len() as u64;
    out.stored_bytes_removed = doomed.iter().map(|(_, b)| b).sum();
    futures::stream::iter(doomed)
        .map(|(id, _)| async move { store.delete_chunk(&id).await })
        .buffer_unordered(crate::transfer::IO_PARALLEL)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

fn remove_partial_chunks(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let partial = name.split_once('#').is_some_and(|(id, n)| {
            ChunkId::parse(id).is_some() && n.bytes().all(|b| b.is_ascii_digit())
        });
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > MARKER_TTL));
        if partial && old {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
