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
//! Whichever writes first, the other sees it. Ages are told on the store's clock alone (an
//! object's time against a time the store just gave an object of ours, plus time measured
//! here on a monotonic clock), so a machine whose clock is off neither waits wrongly nor
//! takes a live marker or lock for a dead one. A prune stops removing chunks as soon as its
//! lock has not been renewed for longer than is safe; it removes only a lock holding its own
//! token; a lock found stale is removed and the chunks wait for the next prune.
//! Manifests go first and chunks after, and a chunk
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

/// How often a live writer rewrites its marker: well within its time to live.
fn marker_renew() -> Duration {
    MARKER_RENEW
        .min(marker_ttl() / 3)
        .max(Duration::from_millis(200))
}
pub const MARKER_RENEW: Duration = Duration::from_secs(5 * 60);

const LOCK: &str = "gc/lock";

/// Whether an object written at `written_ms` (the store's clock) is younger than `ttl` at
/// the store's time `store_now_ms`.
fn live_at(written_ms: i64, store_now_ms: i64, ttl: Duration) -> bool {
    store_now_ms.saturating_sub(written_ms) < ttl.as_millis() as i64
}

/// The store's time now: when it writes a small object of ours.
async fn store_now(store: &Store) -> Result<i64, StoreError> {
    let probe = format!("gc/clock-{}", unique_id());
    store.put_small(&probe, Vec::new(), false).await?;
    let at = store.get_small(&probe).await?.map(|(_, at)| at);
    store.delete_small(&probe).await?;
    Ok(at.unwrap_or_else(now_ms))
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
    /// The manifest published ahead of the chunks, removed when the writing ends.
    pending: Option<String>,
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
                    tokio::time::sleep(marker_renew()).await;
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
            pending: None,
        };
        // The store's time now: when it wrote the marker.
        let since = Instant::now();
        let store_now = match store.get_small(&writing.marker).await? {
            Some((_, at)) => at,
            None => now_ms(),
        };
        let mut told = false;
        // As long as a prune renews its lock: a dead prune's goes stale.
        while let Some((_, at)) = store.get_small(LOCK).await? {
            let now = store_now + since.elapsed().as_millis() as i64;
            if !live_at(at, now, LOCK_TTL) {
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
        // The chunks durable before the manifest that names them; then the manifest.
        self.store.sync().await?;
        let mut result = self.store.put_manifest(name, manifest).await;
        if result.is_ok() {
            result = self.store.sync().await;
        }
        if !matches!(result, Err(StoreError::Exists { .. })) {
            self.end().await;
        }
        result
    }

    /// Publishes checkpoint `name`'s manifest before its chunks are all stored (post-copy: a
    /// restore reads it and waits for each chunk it needs). It is not a checkpoint: listings and
    /// prunes ignore it, and it is removed when the writing ends (committed or not).
    pub async fn publish_pending(
        &mut self,
        name: &str,
        manifest: Vec<u8>,
    ) -> Result<(), StoreError> {
        if !crate::valid_name(name) {
            return Err(StoreError::BadUrl {
                url: self.store.url().to_string(),
                reason: format!("{name:?} cannot name a checkpoint"),
            });
        }
        let path = crate::store::pending_path(name);
        self.store.put_small(&path, manifest, false).await?;
        self.pending = Some(path);
        Ok(())
    }

    /// Ends the writing without a manifest (its chunks go in a later prune).
    pub async fn abandon(mut self) {
        self.end().await;
    }

    async fn end(&mut self) {
        self.renew.abort();
        self.ended = true;
        if let Some(p) = self.pending.take() {
            if let Err(e) = self.store.delete_small(&p).await {
                tracing::warn!(error = %e, "cannot remove the published manifest; a prune removes it");
            }
        }
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
                let pending = self.pending.take();
                rt.spawn(async move {
                    let _ = store.delete_small(&marker).await;
                    if let Some(p) = pending {
                        let _ = store.delete_small(&p).await;
                    }
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
    // The lock: one prune at a time, and none while a checkpoint is written. It holds this
    // prune's token.
    let token = unique_id().into_bytes();
    if !store.put_small(LOCK, token.clone(), true).await? {
        let now = store_now(store).await?;
        out.chunks_deferred = Some(match store.get_small(LOCK).await? {
            Some((_, at)) if !live_at(at, now, LOCK_TTL) => {
                // A dead prune's: removed, and the chunks wait for the next prune (one that
                // took it over now could race another doing the same).
                store.delete_small(LOCK).await?;
                "a dead prune's lock was in the way (removed now)".into()
            }
            _ => "another prune is removing chunks".into(),
        });
        return Ok(out);
    }
    let since = Instant::now();
    let store_now = match store.get_small(LOCK).await? {
        Some((_, at)) => at,
        None => now_ms(),
    };
    // When the lock was last renewed for sure (a renewal that fails leaves it as it was).
    let renewed = std::sync::Arc::new(std::sync::Mutex::new(Instant::now()));
    let renew = {
        let (store, token, renewed) = (store.clone(), token.clone(), renewed.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(LOCK_RENEW).await;
                let before = Instant::now();
                if store.put_small(LOCK, token.clone(), false).await.is_ok() {
                    *renewed.lock().expect("not poisoned") = before;
                }
            }
        })
    };
    let holds = move || {
        renewed.lock().expect("not poisoned").elapsed() + Duration::from_secs(10) < LOCK_TTL
    };
    let result = collect(store, &mut out, store_now, since, &holds).await;
    renew.abort();
    // Only this prune's lock is removed.
    if let Some((held, _)) = store.get_small(LOCK).await? {
        if held.as_ref() == token.as_slice() {
            store.delete_small(LOCK).await?;
        }
    }
    result?;
    Ok(out)
}

async fn collect(
    store: &Store,
    out: &mut PruneOutcome,
    store_now: i64,
    since: Instant,
    holds: &(dyn Fn() -> bool + Sync),
) -> Result<(), StoreError> {
    let mut writing = 0;
    let now = store_now + since.elapsed().as_millis() as i64;
    for (file, at) in store.list_small("uploads").await? {
        if live_at(at, now, marker_ttl()) {
            writing += 1;
        } else {
            // A killed writer's.
            store.delete_small(&format!("uploads/{file}")).await?;
        }
    }
    // A killed writer's published manifest (post-copy) is as old as its marker: gone with it.
    for (file, at) in store.list_small("pending").await? {
        if !live_at(at, now, marker_ttl()) {
            store.delete_small(&format!("pending/{file}")).await?;
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
    let removed = futures::stream::iter(doomed)
        .map(|(id, bytes)| async move {
            // Never past the lock: a prune whose renewals stopped landing stops here.
            if !holds() {
                return Ok(None);
            }
            store.delete_chunk(&id).await.map(|()| Some(bytes))
        })
        .buffer_unordered(crate::transfer::IO_PARALLEL)
        .try_collect::<Vec<Option<u64>>>()
        .await?;
    out.chunks_removed = removed.iter().flatten().count() as u64;
    out.stored_bytes_removed = removed.iter().flatten().sum();
    if out.chunks_removed < removed.len() as u64 {
        out.chunks_deferred =
            Some("the prune's lock could not be renewed; it stopped removing chunks".into());
    }
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
