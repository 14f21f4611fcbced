//! Files into a store as chunks ([`upload`]) and back ([`download`]).
//!
//! Upload: every chunk is read, hashed and compressed on the blocking pool (at most one per
//! core at a time), and sent only if the store lacks it; up to [`IO_PARALLEL`] requests are in
//! flight. Download: each distinct chunk is fetched once (also when several places hold the
//! same bytes), checked against its name and written at its offsets.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::chunk::{self, ChunkId, ChunkRef, MAX_CHUNK};
use crate::{Store, StoreError};

/// Requests in flight at once.
pub const IO_PARALLEL: usize = 16;
/// The most a move's first round ([`upload_first`]) sends without listing the store.
pub const FIRST_ROUND_UNLISTED: u64 = 32 << 20;
/// The chunk size where a file has no cuts of its own.
pub const FIXED_CHUNK: u64 = 1 << 20;

/// A file to upload: where it is, the name the manifest gives it, and where it is cut (the
/// sizes of its chunks in order, summing to its size; empty: [`FIXED_CHUNK`] pieces).
#[derive(Clone, Debug, Default)]
pub struct Piece {
    pub name: String,
    pub path: PathBuf,
    pub cuts: Vec<u64>,
    /// Byte ranges a restore reading while the upload runs needs before the rest: their
    /// chunks are sent with the other pieces' (in piece order), the rest of this piece's
    /// after every piece's first ones. None: all of it is needed first.
    pub first: Option<Vec<(u64, u64)>>,
}

impl Piece {
    /// Whether the chunk at `at`, `len` bytes long, goes in the first round.
    fn first(&self, at: u64, len: u64) -> bool {
        match &self.first {
            None => true,
            Some(ranges) => ranges
                .iter()
                .any(|(start, n)| *start < at + len && at < start + n),
        }
    }
}

/// An uploaded file as a manifest lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadedEntry {
    pub name: String,
    pub size: u64,
    pub chunks: Vec<ChunkRef>,
}

/// What an upload did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Uploaded {
    #[serde(skip)]
    pub entries: Vec<UploadedEntry>,
    /// Bytes of the files.
    pub bytes: u64,
    pub chunks: u64,
    /// Chunks sent (the rest were in the store already, or repeated within the upload).
    pub chunks_sent: u64,
    /// Bytes of the chunks sent, uncompressed and as stored.
    pub raw_sent: u64,
    pub stored_sent: u64,
}

/// Whether a chunk must still be sent: shared by the upload's tasks.
struct Sent {
    /// In the store and not condemned by a prune.
    present: HashSet<ChunkId>,
    /// Claimed by a task of this upload.
    claimed: Mutex<HashSet<ChunkId>>,
}

fn cuts_of(size: u64, cuts: &[u64]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = 0;
    if cuts.iter().sum::<u64>() == size && cuts.iter().all(|c| *c > 0 && *c <= MAX_CHUNK) {
        for c in cuts {
            out.push((at, *c));
            at += c;
        }
    } else {
        while at < size {
            let len = FIXED_CHUNK.min(size - at);
            out.push((at, len));
            at += len;
        }
    }
    out
}

/// The entries `pieces` make, each chunk named by its hash, without sending anything: what a
/// checkpoint's manifest lists before its chunks are stored (post-copy). Read and hashed on
/// one thread per core; [`upload`] of the same unchanged files makes the same entries.
pub fn plan(pieces: &[Piece]) -> Result<Vec<UploadedEntry>, StoreError> {
    let mut jobs = Vec::new();
    let mut entries = Vec::with_capacity(pieces.len());
    for (file_index, piece) in pieces.iter().enumerate() {
        let size = std::fs::metadata(&piece.path)
            .map_err(|source| StoreError::Read {
                path: piece.path.clone(),
                source,
            })?
            .len();
        for (ci, (at, len)) in cuts_of(size, &piece.cuts).into_iter().enumerate() {
            jobs.push((file_index, ci, at, len));
        }
        entries.push(UploadedEntry {
            name: piece.name.clone(),
            size,
            chunks: Vec::new(),
        });
    }
    let ids = hash_jobs(pieces, &jobs)?;
    for ((file_index, _, _, len), id) in jobs.iter().zip(ids) {
        entries[*file_index]
            .chunks
            .push(ChunkRef { id, size: *len });
    }
    Ok(entries)
}

/// The names of the chunks `jobs` (piece index, chunk index, offset, length) point at, in
/// order: read and hashed on one thread per core.
fn hash_jobs(
    pieces: &[Piece],
    jobs: &[(usize, usize, u64, u64)],
) -> Result<Vec<ChunkId>, StoreError> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let ids: Vec<Vec<(usize, ChunkId)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> Result<Vec<(usize, ChunkId)>, StoreError> {
                    let mut out = Vec::new();
                    let mut buf = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&(file_index, _, at, len)) = jobs.get(i) else {
                            return Ok(out);
                        };
                        let path = &pieces[file_index].path;
                        buf.resize(len as usize, 0);
                        std::fs::File::open(path)
                            .and_then(|f| f.read_exact_at(&mut buf, at))
                            .map_err(|source| StoreError::Read {
                                path: path.clone(),
                                source,
                            })?;
                        out.push((i, ChunkId::of(&buf)));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("hashing does not panic"))
            .collect::<Result<_, _>>()
    })?;
    let mut by_job = vec![None; jobs.len()];
    for (i, id) in ids.into_iter().flatten() {
        by_job[i] = Some(id);
    }
    Ok(by_job
        .into_iter()
        .map(|id| id.expect("every job hashed"))
        .collect())
}

/// Uploads `pieces` to `store` as chunks sealed at zstd `level`, as part of `writing` (a
/// checkpoint being written, see [`crate::gc::Writing`]: while it lives no prune removes a
/// chunk). Chunks the store has are not sent again. `progress` is told each file byte as it
/// is done.
pub async fn upload(
    writing: &crate::gc::Writing,
    pieces: &[Piece],
    level: i32,
    progress: Option<&(dyn Fn(u64) + Sync)>,
) -> Result<Uploaded, StoreError> {
    let (results, sizes) = upload_pass(
        writing.store(),
        pieces,
        level,
        progress,
        &|_, _, _| true,
        None,
        true,
    )
    .await?;
    // Every chunk was selected: none is missing.
    Ok(uploaded(pieces, &sizes, results, |fi, ci| ChunkRef {
        id: ChunkId::unnamed(fi as u32, ci as u32),
        size: 0,
    }))
}

/// The first round of a move's upload (post-copy): the chunks a restore needs before the
/// task runs (every chunk of a piece without [`Piece::first`] ranges, those overlapping them
/// in the others), named and stored. The entries list every chunk, the others under stand-ins
/// ([`ChunkId::unnamed`]) until [`name_rest`] names them.
pub async fn upload_first(
    writing: &crate::gc::Writing,
    pieces: &[Piece],
    level: i32,
) -> Result<Uploaded, StoreError> {
    let first = |fi: usize, at: u64, len: u64| pieces[fi].first(at, len);
    // This round runs while the task is frozen: a few MiB are sent without listing the store
    // first (a large store's listing takes longer); more (a large carried folder) only
    // where the store lacks them.
    let mut bytes = 0;
    for (fi, p) in pieces.iter().enumerate() {
        let size = std::fs::metadata(&p.path).map_or(0, |m| m.len());
        bytes += cuts_of(size, &p.cuts)
            .into_iter()
            .filter(|(at, len)| first(fi, *at, *len))
            .map(|(_, len)| len)
            .sum::<u64>();
    }
    let list = bytes > FIRST_ROUND_UNLISTED;
    let (results, sizes) =
        upload_pass(writing.store(), pieces, level, None, &first, None, list).await?;
    Ok(uploaded(pieces, &sizes, results, |fi, ci| ChunkRef {
        id: ChunkId::unnamed(fi as u32, ci as u32),
        size: 0,
    }))
}

/// `entries` (from [`upload_first`]) with every stand-in replaced by its chunk's name: read
/// and hashed on one thread per core, nothing sent.
pub fn name_rest(
    pieces: &[Piece],
    entries: &[UploadedEntry],
) -> Result<Vec<UploadedEntry>, StoreError> {
    let mut out = entries.to_vec();
    let mut jobs = Vec::new();
    for (fi, e) in entries.iter().enumerate() {
        let mut at = 0;
        for (ci, c) in e.chunks.iter().enumerate() {
            if c.id.unnamed_at().is_some() {
                jobs.push((fi, ci, at, c.size));
            }
            at += c.size;
        }
    }
    let named = hash_jobs(pieces, &jobs)?;
    for ((fi, ci, _, _), id) in jobs.iter().zip(named) {
        out[*fi].chunks[*ci].id = id;
    }
    Ok(out)
}

/// The rest of a move's upload: every chunk of `entries` (all named, see [`name_rest`]) the
/// store lacks, read and sealed under the name it was given (not hashed again: a chunk that
/// changed since is refused by whoever reads it). What the whole upload did, `first` (the
/// first round's [`Uploaded`]) included.
pub async fn upload_named(
    writing: &crate::gc::Writing,
    pieces: &[Piece],
    entries: &[UploadedEntry],
    first: &Uploaded,
    level: i32,
    progress: Option<&(dyn Fn(u64) + Sync)>,
) -> Result<Uploaded, StoreError> {
    // What the first round stored: the chunks it selected.
    let rest = |fi: usize, at: u64, len: u64| !pieces[fi].first(at, len);
    let (results, sizes) = upload_pass(
        writing.store(),
        pieces,
        level,
        progress,
        &rest,
        Some(entries),
        true,
    )
    .await?;
    let mut out = uploaded(pieces, &sizes, results, |fi, ci| entries[fi].chunks[ci]);
    out.chunks_sent += first.chunks_sent;
    out.raw_sent += first.raw_sent;
    out.stored_sent += first.stored_sent;
    Ok(out)
}

/// One chunk's upload: which piece, where, and its name when already known.
type Done = (usize, u64, ChunkRef, u64);

/// Reads, names (unless `known` names them), seals and sends the chunks of `pieces` that
/// `select` (piece index, offset, length) takes; what was done with each, and the pieces'
/// sizes.
async fn upload_pass(
    store: &Store,
    pieces: &[Piece],
    level: i32,
    progress: Option<&(dyn Fn(u64) + Sync)>,
    select: &(dyn Fn(usize, u64, u64) -> bool + Sync),
    known: Option<&[UploadedEntry]>,
    list: bool,
) -> Result<(Vec<Done>, Vec<u64>), StoreError> {
    // Unlisted, every selected chunk is sent (one the store has is written again, the same
    // bytes): a listing of a large store takes longer than a few chunks do.
    let present: HashSet<ChunkId> = match list {
        true => store.list_chunks().await?.into_keys().collect(),
        false => HashSet::new(),
    };
    let sent = Arc::new(Sent {
        present,
        claimed: Mutex::new(HashSet::new()),
    });
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let cpu = Arc::new(Semaphore::new(cpus));
    let mut jobs = Vec::new();
    let mut sizes = Vec::new();
    for (file_index, piece) in pieces.iter().enumerate() {
        let size = std::fs::metadata(&piece.path)
            .map_err(|source| StoreError::Read {
                path: piece.path.clone(),
                source,
            })?
            .len();
        sizes.push(size);
        // Each chunk opens its file: a folder of thousands of files never holds thousands
        // of descriptors at once.
        for (ci, (at, len)) in cuts_of(size, &piece.cuts).into_iter().enumerate() {
            if !select(file_index, at, len) {
                continue;
            }
            let id = match known {
                None => None,
                Some(k) => match k.get(file_index).and_then(|e| e.chunks.get(ci)) {
                    Some(c) if c.size == len && c.id.unnamed_at().is_none() => Some(c.id),
                    _ => {
                        return Err(StoreError::Read {
                            path: piece.path.clone(),
                            source: std::io::Error::other(format!(
                                "chunk {ci} at {at} has no name of {len} bytes"
                            )),
                        })
                    }
                },
            };
            jobs.push((file_index, piece.path.clone(), at, len, id));
        }
    }
    // What a restore needs before the rest goes first (a stable sort keeps the order within).
    jobs.sort_by_key(|(file_index, _, at, len, _)| !pieces[*file_index].first(*at, *len));
    let results: Vec<Done> = futures::stream::iter(jobs)
        .map(|(file_index, path, at, len, id)| {
            let (sent, cpu) = (sent.clone(), cpu.clone());
            async move {
                // A named chunk the store has is not read at all.
                if let Some(id) = id {
                    let new = !sent.present.contains(&id)
                        && sent.claimed.lock().expect("not poisoned").insert(id);
                    if !new {
                        if let Some(p) = progress {
                            p(len);
                        }
                        return Ok((file_index, at, ChunkRef { id, size: len }, 0));
                    }
                }
                let permit = cpu.acquire_owned().await.expect("never closed");
                let sealed = tokio::task::spawn_blocking(move || {
                    let _permit = permit;
                    let mut buf = vec![0u8; len as usize];
                    std::fs::File::open(&path)
                        .and_then(|file| file.read_exact_at(&mut buf, at))
                        .map_err(|source| StoreError::Read { path, source })?;
                    if let Some(id) = id {
                        return Ok((id, Some(chunk::seal_named(&buf, level))));
                    }
                    let id = ChunkId::of(&buf);
                    let new = !sent.present.contains(&id)
                        && sent.claimed.lock().expect("not poisoned").insert(id);
                    let sealed = new.then(|| chunk::seal(&buf, level).1);
                    Ok::<_, StoreError>((id, sealed))
                })
                .await
                .expect("sealing does not panic")?;
                let (id, sealed) = sealed;
                let mut stored = 0;
                if let Some(sealed) = sealed {
                    stored = sealed.len() as u64;
                    store.put_chunk(&id, Bytes::from(sealed)).await?;
                }
                if let Some(p) = progress {
                    p(len);
                }
                Ok::<_, StoreError>((file_index, at, ChunkRef { id, size: len }, stored))
            }
        })
        .buffered(IO_PARALLEL)
        .try_collect()
        .await?;
    Ok((results, sizes))
}

/// What an upload did, from its chunks' `results`: each piece's chunks in the order of its
/// bytes (whatever order they were sent in); a chunk not among the results is `missing`'s
/// (piece index, chunk index), with its size set here.
fn uploaded(
    pieces: &[Piece],
    sizes: &[u64],
    results: Vec<Done>,
    missing: impl Fn(usize, usize) -> ChunkRef,
) -> Uploaded {
    let mut done: HashMap<(usize, u64), (ChunkRef, u64)> = results
        .into_iter()
        .map(|(fi, at, r, stored)| ((fi, at), (r, stored)))
        .collect();
    let mut out = Uploaded::default();
    for (fi, (p, size)) in pieces.iter().zip(sizes).enumerate() {
        let mut entry = UploadedEntry {
            name: p.name.clone(),
            size: *size,
            chunks: Vec::new(),
        };
        for (ci, (at, len)) in cuts_of(*size, &p.cuts).into_iter().enumerate() {
            out.chunks += 1;
            out.bytes += len;
            match done.remove(&(fi, at)) {
                Some((r, stored)) => {
                    if stored > 0 {
                        out.chunks_sent += 1;
                        out.raw_sent += r.size;
                        out.stored_sent += stored;
                    }
                    entry.chunks.push(r);
                }
                None => entry.chunks.push(ChunkRef {
                    size: len,
                    ..missing(fi, ci)
                }),
            }
        }
        out.entries.push(entry);
    }
    out
}

/// A file to download: the relative path it is written to and its chunks.
#[derive(Clone, Debug)]
pub struct Wanted {
    pub path: PathBuf,
    pub size: u64,
    pub chunks: Vec<ChunkRef>,
}

/// Downloads `files` of `checkpoint` into `dir` (which must exist and hold none of them: each
/// is created new, never through a link). Each distinct chunk is fetched once, checked against
/// its name and written at every offset that holds it. A chunk missing or damaged fails the
/// download, naming the chunk; the caller removes `dir`.
pub async fn download(
    store: &Store,
    checkpoint: &str,
    files: &[Wanted],
    dir: &Path,
    progress: Option<&(dyn Fn(u64) + Sync)>,
) -> Result<u64, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut opened = Vec::new();
    for f in files {
        let path = dir.join(&f.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| StoreError::Write {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|source| StoreError::Write {
                path: path.clone(),
                source,
            })?;
        file.set_len(f.size).map_err(|source| StoreError::Write {
            path: path.clone(),
            source,
        })?;
        opened.push(path);
    }
    // Where each distinct chunk goes.
    let mut places: HashMap<ChunkId, (ChunkRef, Vec<(usize, u64)>)> = HashMap::new();
    let mut order = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let mut at = 0;
        for r in &f.chunks {
            let e = places.entry(r.id).or_insert_with(|| {
                order.push(r.id);
                (*r, Vec::new())
            });
            e.1.push((i, at));
            at += r.size;
        }
    }
    let places = Arc::new(places);
    let opened = Arc::new(opened);
    let total: Vec<u64> = futures::stream::iter(order)
        .map(|id| {
            let (places, opened) = (places.clone(), opened.clone());
            async move {
                let (r, _) = places[&id];
                let bytes = store.get_chunk(checkpoint, &r).await?;
                let n = tokio::task::spawn_blocking(move || {
                    let mut n = 0;
                    for (file, at) in &places[&id].1 {
                        let path = &opened[*file];
                        std::fs::OpenOptions::new()
                            .write(true)
                            .custom_flags(libc::O_NOFOLLOW)
                            .open(path)
                            .and_then(|f| f.write_all_at(&bytes, *at))
                            .map_err(|source| StoreError::Write {
                                path: path.clone(),
                                source,
                            })?;
                        n += bytes.len() as u64;
                    }
                    Ok::<_, StoreError>(n)
                })
                .await
                .expect("writing does not panic")?;
                if let Some(p) = progress {
                    p(n);
                }
                Ok::<_, StoreError>(n)
            }
        })
        .buffer_unordered(IO_PARALLEL)
        .try_collect()
        .await?;
    Ok(total.iter().sum())
}
