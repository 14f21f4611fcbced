//! Checkpoints in a store ([`cedana_store`]): the same manifest as an archive's, with each
//! entry's chunks instead of its SHA-256 (format version [`FORMAT_VERSION`]), and the chunks
//! beside it in the store.
//!
//! Dump: CRIU writes its images into a staging folder and the tree runs again (or is frozen,
//! if it is to be stopped) as soon as CRIU is done; the carried folder is copied while the tree
//! is still stopped. Everything else (cutting, hashing, compressing, sending only the chunks
//! the store lacks) happens after, while the task runs. A tree that is to stop stays frozen
//! until the manifest is written, and is thawed if anything fails.
//!
//! Restore: the manifest is checked whole (names, sizes, chunk lists, the room it needs)
//! before any chunk is fetched; each chunk is checked against its name as it arrives, into a
//! private staging folder; then the CPU check and CRIU, as for an archive.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cedana_store::{Piece, Store, StoreError, StoreUrl, Uploaded, Wanted, Writing};
use nix::sys::signal::Signal;
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::archive::{self, ArchiveError, Entry, Manifest};
use crate::criu::{self, images, Criu};
use crate::dump::{self, millis, DumpError, DumpOptions};
use crate::progress::Progress;
use crate::restore::{self, RestoreError, RestoreOptions, RestoreOutcome};
use crate::{files, staging};

/// `work` on a thread of its own (and the threads it starts) at the lowest CPU priority: a
/// move's work after the task runs elsewhere yields to the restore and the task when they
/// share the CPUs (two workers on one machine), and costs nothing when they do not.
fn in_background<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: a plain syscall about this thread.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19);
            }
            work()
        })
        .join()
        .expect("background work does not panic")
    })
}

/// The manifest format of a checkpoint in a store.
pub const FORMAT_VERSION: u32 = 2;
/// zstd level of chunks unless told otherwise: fast, and random memory costs little.
pub const DEFAULT_LEVEL: i32 = 1;

/// The result of a dump into a store.
#[derive(Clone, Debug, Serialize)]
pub struct StoreDumpOutcome {
    /// The checkpoint's name in the store.
    pub name: String,
    pub store: String,
    /// How long the tree was stopped: CRIU's dump, and the carried folder's copy.
    #[serde(with = "millis")]
    pub frozen_time: Duration,
    #[serde(with = "millis")]
    pub criu_time: Duration,
    /// Cutting, hashing, compressing and sending, after the tree ran again.
    #[serde(with = "millis")]
    pub upload_time: Duration,
    pub images_bytes: u64,
    #[serde(flatten)]
    pub uploaded: Uploaded,
    #[serde(skip)]
    pub manifest: Manifest,
}

/// Dumps `opts.pid` into `store` as a new checkpoint named `<name>_<YYYYMMDD_HHMMSS>`, chunks
/// sealed at zstd `level`. `opts.dir` holds the staging folder (unless `opts.staging` says
/// otherwise) and any failed CRIU log. Runs the store's requests on `rt`.
pub fn dump_to_store(
    criu: &Criu,
    opts: &DumpOptions,
    store: &StoreUrl,
    level: i32,
    rt: &tokio::runtime::Handle,
    progress: &dyn Progress,
) -> Result<StoreDumpOutcome, DumpError> {
    dump_to_store_then(criu, opts, store, level, rt, progress, |_, _| Ok(()))
}

/// [`dump_to_store`], with `then` called once the checkpoint is in the store (its name and
/// manifest) and before a tree that is to stop is killed: if it fails, the tree is thawed and
/// runs on, as for any failed checkpoint.
pub(crate) fn dump_to_store_then(
    criu: &Criu,
    opts: &DumpOptions,
    store: &StoreUrl,
    level: i32,
    rt: &tokio::runtime::Handle,
    progress: &dyn Progress,
    then: impl FnOnce(&str, &Manifest) -> Result<(), DumpError>,
) -> Result<StoreDumpOutcome, DumpError> {
    dump_inner(criu, opts, store, level, rt, progress, then, None)
}

/// What a post-copy dump tells as soon as its manifest is published: the checkpoint's name.
pub type Published<'a> = Box<dyn FnOnce(&str) + Send + 'a>;

/// [`dump_to_store`] for a move (post-copy): once CRIU is done and every chunk is named (read
/// and hashed, nothing sent yet), the manifest is published ahead of its chunks
/// ([`cedana_store::Writing::publish_pending`]), `published` is told the checkpoint's name, and
/// a tree that is to stop is killed then (a restore elsewhere may run it from then on, so it
/// can never be thawed here); the chunks follow, and the checkpoint is committed under that
/// name. If storing fails after that, the checkpoint is lost: a restore waiting on its chunks
/// ends its task, and the one before is what is left.
pub fn dump_to_store_post_copy(
    criu: &Criu,
    opts: &DumpOptions,
    store: &StoreUrl,
    level: i32,
    rt: &tokio::runtime::Handle,
    progress: &dyn Progress,
    published: Published<'_>,
) -> Result<StoreDumpOutcome, DumpError> {
    dump_inner(
        criu,
        opts,
        store,
        level,
        rt,
        progress,
        |_, _| Ok(()),
        Some(published),
    )
}

#[allow(clippy::too_many_arguments)]
fn dump_inner(
    criu: &Criu,
    opts: &DumpOptions,
    store: &StoreUrl,
    level: i32,
    rt: &tokio::runtime::Handle,
    progress: &dyn Progress,
    then: impl FnOnce(&str, &Manifest) -> Result<(), DumpError>,
    mut published: Option<Published<'_>>,
) -> Result<StoreDumpOutcome, DumpError> {
    let target = dump::Target::check(opts)?;
    let info = &target.info;
    let st = Store::open(store)?;
    let work = target.staging(opts)?;
    let (req, resume_after_files) = target.request(opts, work.path());
    info!(pid = opts.pid, name = %info.name, store = %store, "dumping into a store");
    let (_guard, version) = target.prepare(criu, &req)?;
    progress.stage("checkpointing", Some(info.tree_rss_bytes));
    let t0 = Instant::now();
    // Whatever happens from here (a panic too), a tree CRIU left stopped is resumed unless
    // it was killed on purpose.
    let mut thaw = Thaw {
        pid: info.pid,
        armed: req.leave_stopped,
    };
    let mut cpu = Some(dump::CpuDescribing::start(criu, work.path()));
    if let Err(source) = criu.dump(&req, &mut |_| {}) {
        progress.finish();
        let kept = dump::keep_log(
            &work.path().join(criu::DUMP_LOG),
            &opts.dir.join(format!("{}.dump-failed.log", target.stem)),
        );
        return Err(dump::criu_err(info, source, kept));
    }
    let criu_time = t0.elapsed();
    let carried = dump::carry(opts, work.path(), info.pid);
    if resume_after_files {
        dump::signal_tree(info.pid, Signal::SIGCONT);
        thaw.armed = false;
    }
    let frozen_time = t0.elapsed();
    let frozen = !opts.leave_running;
    let t_upload = Instant::now();
    // Set once a post-copy dump published its manifest (the tree is gone then).
    let mut published_at: Option<Duration> = None;
    let finish = || -> Result<(Manifest, Uploaded, u64, String), DumpError> {
        let (carried, kept) = match carried? {
            Some((c, k)) => (Some(c), k),
            None => (None, None),
        };
        let cpu = cpu.take().and_then(dump::CpuDescribing::join);
        debug!(
            ms = t0.elapsed().as_millis() as u64,
            "dump: CRIU done, CPU described"
        );
        let mut cuts = images::page_image_cuts(work.path());
        let mut eager = images::page_image_eager_ranges(work.path());
        for (file, hot) in images::page_image_hot_ranges(work.path()) {
            if let Some(e) = eager.get_mut(&file) {
                e.extend(hot);
            }
        }
        let mut pieces: Vec<Piece> = dump::image_files(work.path())?
            .into_iter()
            .map(|(name, path)| {
                let file = name.rsplit('/').next().unwrap_or_default().to_string();
                Piece {
                    name,
                    path,
                    first: eager.remove(&file),
                    cuts: cuts.remove(&file).unwrap_or_default(),
                }
            })
            .collect();
        let images_bytes = pieces
            .iter()
            .map(|p| std::fs::metadata(&p.path).map_or(0, |m| m.len()))
            .sum();
        let files = carried.map(|c| {
            for (name, path) in c.sources {
                pieces.push(Piece {
                    name,
                    path,
                    cuts: Vec::new(),
                    first: None,
                });
            }
            c.files
        });
        let total: u64 = pieces
            .iter()
            .map(|p| std::fs::metadata(&p.path).map_or(0, |m| m.len()))
            .sum();
        progress.stage("storing", Some(total));
        let bar = |n| progress.advance(n);
        let mut manifest = target.manifest(
            FORMAT_VERSION,
            work.path(),
            version.to_string(),
            &req,
            cpu,
            archive::Compression::Zstd,
            files,
        );
        let stem = target.stem.clone();
        // The small images first, then the carried files, the page images last: a restore
        // reading while they are stored (post-copy) needs them in that order.
        pieces.sort_by_key(|p| p.name.starts_with("images/pages-"));
        let mut writing = rt.block_on(Writing::begin(&st))?;
        let mut planned = None;
        if let Some(tell) = published.take() {
            if let Some(Err(e)) = kept.as_ref().map(files::Snapshot::check) {
                rt.block_on(writing.abandon());
                return Err(e.into());
            }
            // While the tree is still frozen: what a restore needs before the task runs (the
            // small images, the memory CRIU reads itself, the pages touched first), named and
            // stored; the rest listed under stand-ins.
            debug!(
                ms = t0.elapsed().as_millis() as u64,
                "dump: storing the first round"
            );
            let first = match rt.block_on(cedana_store::upload_first(&writing, &pieces, level)) {
                Ok(f) => f,
                Err(e) => {
                    rt.block_on(writing.abandon());
                    return Err(e.into());
                }
            };
            debug!(
                ms = t0.elapsed().as_millis() as u64,
                "dump: first round stored"
            );
            manifest.entries = entries_of(&first.entries);
            let bytes = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
            let name = match rt.block_on(async {
                let name = free_name(&st, &stem).await?;
                writing.publish_pending(&name, bytes).await?;
                Ok::<_, StoreError>(name)
            }) {
                Ok(n) => n,
                Err(e) => {
                    rt.block_on(writing.abandon());
                    return Err(e.into());
                }
            };
            if frozen {
                // From here a restore elsewhere may run the task: this copy must never run
                // again.
                thaw.armed = false;
                dump::signal_tree(info.pid, Signal::SIGKILL);
            }
            published_at = Some(t0.elapsed());
            info!(name = %name, "manifest published ahead of its chunks (post-copy)");
            tell(&name);
            // The rest named, and the manifest published again with the names: a restore
            // that needs one of them waits for this.
            let named = in_background(|| cedana_store::name_rest(&pieces, &first.entries))
                .and_then(|named| {
                    manifest.entries = entries_of(&named);
                    let bytes = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
                    rt.block_on(writing.publish_pending(&name, bytes))?;
                    Ok(named)
                });
            let named = match named {
                Ok(n) => n,
                Err(e) => {
                    rt.block_on(writing.abandon());
                    return Err(e.into());
                }
            };
            debug!(
                ms = t0.elapsed().as_millis() as u64,
                "dump: every chunk named and published"
            );
            planned = Some((name, named, first));
        }
        let up = match &planned {
            Some((_, named, first)) => rt.block_on(cedana_store::upload_named(
                &writing,
                &pieces,
                named,
                first,
                level,
                Some(&bar),
            )),
            None => rt.block_on(cedana_store::upload(&writing, &pieces, level, Some(&bar))),
        };
        let up = match up {
            Ok(up) => up,
            Err(e) => {
                rt.block_on(writing.abandon());
                return Err(e.into());
            }
        };
        if let Some((_, named, _)) = &planned {
            if &up.entries != named {
                rt.block_on(writing.abandon());
                return Err(DumpError::Store(StoreError::BadManifest {
                    store: st.url().to_string(),
                    name: stem.clone(),
                    reason: "the checkpoint's files changed between naming their chunks and storing them".into(),
                }));
            }
        }
        // A linked file written in place meanwhile: this checkpoint would not match.
        if let Some(Err(e)) = kept.as_ref().map(files::Snapshot::check) {
            rt.block_on(writing.abandon());
            return Err(e.into());
        }
        let (uploaded, name) = rt.block_on(async {
            manifest.entries = up
                .entries
                .iter()
                .map(|e| Entry {
                    name: e.name.clone(),
                    size: e.size,
                    sha256: String::new(),
                    blake3: String::new(),
                    chunks: Some(e.chunks.clone()),
                })
                .collect();
            let bytes = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
            if let Some((name, _, _)) = &planned {
                return writing
                    .commit(name, bytes)
                    .await
                    .map(|()| (up, name.clone()));
            }
            // Two checkpoints of one process in one second: the second gets `_2`, and so on.
            let mut n = 1;
            loop {
                let name = match n {
                    1 => stem.clone(),
                    n => format!("{stem}_{n}"),
                };
                match writing.commit(&name, bytes.clone()).await {
                    Err(StoreError::Exists { .. }) if n < 100 => n += 1,
                    Err(e) => return Err(e),
                    Ok(()) => return Ok::<_, StoreError>((up, name)),
                }
            }
        })?;
        Ok((manifest, uploaded, images_bytes, name))
    };
    let result = finish().and_then(|r| then(&r.3, &r.0).map(|()| r));
    progress.finish();
    let (manifest, uploaded, images_bytes, name) = match result {
        Ok(r) => r,
        Err(e) => {
            if frozen && published_at.is_none() {
                warn!(
                    pid = info.pid,
                    "checkpoint failed: thawing the process tree"
                );
                dump::signal_tree(info.pid, Signal::SIGCONT);
            }
            return Err(e);
        }
    };
    if frozen && published_at.is_none() {
        thaw.armed = false;
        dump::signal_tree(info.pid, Signal::SIGKILL);
    }
    let upload_time = t_upload.elapsed();
    info!(name = %name, store = %store, ?criu_time, ?frozen_time, ?upload_time,
        chunks = uploaded.chunks, sent = uploaded.chunks_sent, "checkpoint stored");
    Ok(StoreDumpOutcome {
        name,
        store: store.to_string(),
        frozen_time: match (frozen, published_at) {
            (true, Some(at)) => at,
            (true, None) => t0.elapsed(),
            (false, _) => frozen_time,
        },
        criu_time,
        upload_time,
        images_bytes,
        uploaded,
        manifest,
    })
}

/// A manifest's entries from an upload's (or a plan's).
fn entries_of(up: &[cedana_store::UploadedEntry]) -> Vec<Entry> {
    up.iter()
        .map(|e| Entry {
            name: e.name.clone(),
            size: e.size,
            sha256: String::new(),
            blake3: String::new(),
            chunks: Some(e.chunks.clone()),
        })
        .collect()
}

/// The first of `stem`, `stem_2`, … that names no checkpoint in `st` yet.
async fn free_name(st: &Store, stem: &str) -> Result<String, StoreError> {
    for n in 1..100 {
        let name = match n {
            1 => stem.to_string(),
            n => format!("{stem}_{n}"),
        };
        match st.get_pending_manifest(&name).await {
            Err(StoreError::NoCheckpoint { .. }) => return Ok(name),
            Err(e) => return Err(e),
            Ok(_) => {}
        }
    }
    Err(StoreError::Exists {
        store: st.url().to_string(),
        name: stem.to_string(),
    })
}

/// Resumes a stopped tree when dropped armed (see [`dump_to_store`]).
struct Thaw {
    pid: i32,
    armed: bool,
}

impl Drop for Thaw {
    fn drop(&mut self) {
        if self.armed {
            dump::signal_tree(self.pid, Signal::SIGCONT);
        }
    }
}

/// Reads and checks the manifest of checkpoint `name` in `store`: the chunked format, safe
/// names, each entry's chunks adding up to its size, no chunk larger than a chunk may be.
pub fn read_manifest(
    st: &Store,
    name: &str,
    rt: &tokio::runtime::Handle,
) -> Result<Manifest, RestoreError> {
    let label = PathBuf::from(format!("{}/{name}", st.url()));
    let bytes = rt.block_on(st.get_manifest(name)).map_err(store_err)?;
    check_manifest(&bytes, &label)
}

/// [`read_manifest`] of a checkpoint still being stored (post-copy): its published manifest,
/// or the checkpoint's own once it is stored.
pub fn read_pending_manifest(
    st: &Store,
    name: &str,
    rt: &tokio::runtime::Handle,
) -> Result<Manifest, RestoreError> {
    let label = PathBuf::from(format!("{}/{name}", st.url()));
    let bytes = rt
        .block_on(st.get_pending_manifest(name))
        .map_err(store_err)?;
    check_manifest(&bytes, &label)
}

/// [`read_manifest`] of a manifest's bytes; errors name `label`.
pub fn check_manifest(bytes: &[u8], label: &std::path::Path) -> Result<Manifest, RestoreError> {
    let label = label.to_path_buf();
    let bad = |reason: String| {
        RestoreError::Archive(ArchiveError::BadManifest {
            path: label.clone(),
            reason,
        })
    };
    let manifest: Manifest = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    if manifest.format_version != FORMAT_VERSION {
        return Err(bad(format!(
            "format version {}, a checkpoint in a store has version {FORMAT_VERSION}",
            manifest.format_version
        )));
    }
    let names: Vec<(String, bool)> = manifest
        .entries
        .iter()
        .map(|e| (e.name.clone(), false))
        .collect();
    archive::check_names(&label, &names, &manifest)?;
    // A chunk is one size wherever it is listed (else a forged manifest could write past an
    // entry's end).
    let mut sizes = std::collections::HashMap::new();
    for c in manifest
        .entries
        .iter()
        .flat_map(|e| e.chunks.iter().flatten())
    {
        if *sizes.entry(c.id).or_insert(c.size) != c.size {
            return Err(bad(format!("chunk {} is listed with two sizes", c.id)));
        }
    }
    for e in &manifest.entries {
        let Some(chunks) = &e.chunks else {
            return Err(bad(format!("entry {:?} lists no chunks", e.name)));
        };
        let sum = chunks
            .iter()
            .try_fold(0u64, |a, c| {
                (c.size <= cedana_store::chunk::MAX_CHUNK)
                    .then_some(())
                    .and(a.checked_add(c.size))
            })
            .ok_or_else(|| bad(format!("entry {:?} lists an oversized chunk", e.name)))?;
        if sum != e.size {
            return Err(bad(format!(
                "entry {:?} is {} bytes but its chunks add up to {sum}",
                e.name, e.size
            )));
        }
    }
    Ok(manifest)
}

/// Restores checkpoint `name` from `store` (see the module's documentation). `opts.archive`
/// is ignored; errors name the store and the checkpoint.
pub fn restore_from_store(
    criu: &Criu,
    store: &StoreUrl,
    name: &str,
    opts: &RestoreOptions,
    rt: &tokio::runtime::Handle,
    progress: &dyn Progress,
) -> Result<RestoreOutcome, RestoreError> {
    restore_inner(criu, store, name, opts, rt, progress, |_| 0).map(|(out, _)| out)
}

fn restore_inner<T>(
    criu: &Criu,
    store: &StoreUrl,
    name: &str,
    opts: &RestoreOptions,
    rt: &tokio::runtime::Handle,
    progress: &dyn Progress,
    before: impl FnOnce(&Manifest) -> T,
) -> Result<(RestoreOutcome, T), RestoreError> {
    let t0 = Instant::now();
    let st = Store::open(store).map_err(store_err)?;
    let label = PathBuf::from(format!("{store}/{name}"));
    progress.stage("reading the manifest", None);
    let manifest = read_manifest(&st, name, rt)?;
    let staging_root = match &opts.staging {
        Some(s) => staging::root(Some(s), s),
        None => staging::root(
            None,
            &std::env::current_dir().unwrap_or_else(|_| "/tmp".into()),
        ),
    };
    staging::sweep(&staging_root);
    let held = staging::Held::create(&staging_root, ".cedana-restore-").map_err(|source| {
        RestoreError::Staging {
            path: staging_root.clone(),
            source,
        }
    })?;
    archive::check_room(&label, &manifest, held.path())?;
    let wanted: Vec<Wanted> = manifest
        .entries
        .iter()
        .map(|e| Wanted {
            path: PathBuf::from(&e.name),
            size: e.size,
            chunks: e.chunks.clone().unwrap_or_default(),
        })
        .collect();
    progress.stage("fetching", Some(manifest.total_size()));
    let bar = |n| progress.advance(n);
    let fetched = rt.block_on(cedana_store::download(
        &st,
        name,
        &wanted,
        held.path(),
        Some(&bar),
    ));
    progress.finish();
    fetched.map_err(store_err)?;
    // Every image folder CRIU reads exists even when the checkpoint has no entry in it.
    let _ = std::fs::create_dir_all(held.path().join(archive::IMAGES_DIR));
    let told = before(&manifest);
    let extracted = archive::Extracted::from_parts(manifest, held);
    let opts = RestoreOptions {
        archive: label.clone(),
        ..opts.clone()
    };
    restore::restore_extracted(
        criu,
        extracted,
        &opts,
        t0.elapsed(),
        &staging_root.join(format!("{name}.restore-failed.log")),
        progress,
    )
    .map(|out| (out, told))
}

/// The checkpoints in `store`, oldest first.
pub fn list(
    store: &StoreUrl,
    rt: &tokio::runtime::Handle,
) -> Result<Vec<cedana_store::CheckpointInfo>, StoreError> {
    let st = Store::open(store)?;
    rt.block_on(st.list_checkpoints())
}

/// A store error as a restore's: a missing or damaged chunk or manifest is bad input (the
/// checkpoint), anything else is the store's or this machine's trouble.
fn store_err(e: StoreError) -> RestoreError {
    RestoreError::Store(Box::new(e))
}
