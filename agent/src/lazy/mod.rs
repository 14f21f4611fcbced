//! Lazy restore: the task runs again before its memory is back.
//!
//! Everything but the task's private anonymous memory (the pages CRIU may restore lazily) is
//! fetched and checked first, as for a full restore: the small images, the carried files, and
//! the parts of the page images CRIU reads itself. The page images that hold lazy memory are
//! made as sparse files of their full size. Then the agent listens on a loopback port as a
//! page server ([`server`]), starts `criu lazy-pages --page-server` on that port, and has CRIU
//! restore the tree with `--lazy-pages`: the tree runs as soon as its state is back, and each
//! page it touches is asked of the agent, which fetches the chunk holding it, checks it
//! against its name, writes it into the page image and answers from there. Meanwhile the
//! agent fetches every other chunk in the background, and CRIU's daemon copies the rest of the
//! memory in, then says it is done (`PS_IOV_CLOSE`).
//!
//! A task never runs on a page that was not checked: a chunk that cannot be had or is not what
//! its name says, a request the checkpoint cannot answer, or the daemon going away before it
//! is done all end the restored tree (SIGKILL, before the connection is dropped: once CRIU's
//! daemon lets go of the task's userfaultfd, the kernel would fill untouched pages with
//! zeros), and the error names the chunk.
//!
//! Where lazy restore cannot work (no userfaultfd, a checkpoint without lazy memory, a plain
//! archive, CRIU's daemon not starting) the restore is a full one, and says so.

mod server;
mod source;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cedana_store::ChunkRef;
use serde::Serialize;
use tracing::{debug, info, warn};

pub use source::{ChunkError, ChunkSource, ChunkTrouble, StoreSource, ZipSource};

use crate::archive::{self, ArchiveError, Manifest};
use crate::criu::images::{read_pagemap, PageMap};
use crate::criu::Criu;
use crate::dump::millis;
use crate::progress::Progress;
use crate::restore::{self, RestoreError, RestoreOptions, RestoreOutcome};
use crate::staging;
use server::{Iov, Layout, Request};

/// The most pages one answer carries (CRIU's daemon asks again for the rest).
const MAX_ANSWER_PAGES: u64 = 1024;
/// Threads fetching the chunks nobody asked for yet.
const PREFETCHERS: usize = 4;
/// How long CRIU's lazy-pages daemon may take to start listening and to connect.
const DAEMON_START: Duration = Duration::from_secs(20);
/// The daemon's log, in the images folder.
pub const LAZY_LOG: &str = "lazy-pages.log";

/// Why the lazily restored tree was ended.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LazyError {
    #[error("{0}; the restored task was ended (it must not run on memory that is not its own)")]
    Chunk(ChunkError),
    #[error("CRIU's lazy-pages daemon {reason} before every page of the task was back; the restored task was ended (the daemon's log: {log})")]
    Daemon { reason: String, log: PathBuf },
    #[error("CRIU's lazy-pages daemon asked for {0}; the restored task was ended")]
    Protocol(String),
}

/// What serving the memory took, once every page is back.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Served {
    /// From the tree running again to every page back.
    #[serde(with = "millis")]
    pub resident_time: Duration,
    /// Requests answered, bytes of memory sent.
    pub requests: u64,
    pub bytes_served: u64,
    /// Chunks fetched after the tree ran again, and their bytes.
    pub chunks_fetched: u64,
    pub bytes_fetched: u64,
}

/// A restore by [`restore`].
pub struct LazyRestore {
    pub outcome: RestoreOutcome,
    /// Serving the memory still on its way; `None` when the restore was a full one.
    pub serving: Option<Serving>,
    /// Why the restore was a full one, when it was.
    pub full_because: Option<String>,
}

/// One page image whose lazy memory arrives chunk by chunk.
struct LazyImage {
    name: String,
    file: File,
    slots: Vec<Slot>,
}

/// A chunk of a page image: where it starts, and whether it is in the file yet.
struct Slot {
    offset: u64,
    chunk: ChunkRef,
    done: OnceLock<Result<(), ChunkError>>,
}

/// The tasks' memory as the checkpoint has it.
struct Memory {
    page: u64,
    /// Each task's pagemap and its image's index in `images`.
    tasks: HashMap<u64, (PageMap, usize)>,
    images: Vec<LazyImage>,
    source: Arc<dyn ChunkSource>,
    requests: AtomicU64,
    bytes_served: AtomicU64,
    chunks_fetched: AtomicU64,
    bytes_fetched: AtomicU64,
    /// Count fetches from now on (after the tree runs).
    counting: AtomicBool,
}

impl Memory {
    /// Makes sure bytes `start..end` of image `img` are in its file, fetching and checking the
    /// chunks that hold them (each once, whoever asks first).
    fn ensure(&self, img: usize, start: u64, end: u64) -> Result<(), ChunkError> {
        let image = &self.images[img];
        let first = image
            .slots
            .partition_point(|s| s.offset + s.chunk.size <= start);
        for s in &image.slots[first..] {
            if s.offset >= end {
                break;
            }
            s.done
                .get_or_init(|| {
                    let bytes = self.source.fetch(&s.chunk)?;
                    image
                        .file
                        .write_all_at(&bytes, s.offset)
                        .map_err(|e| ChunkError {
                            chunk: s.chunk.id.to_string(),
                            checkpoint: self.source.label(),
                            trouble: ChunkTrouble::Unreachable,
                            reason: format!("cannot write it into the staging folder: {e}"),
                        })?;
                    if self.counting.load(Ordering::Relaxed) {
                        self.chunks_fetched.fetch_add(1, Ordering::Relaxed);
                        self.bytes_fetched
                            .fetch_add(s.chunk.size, Ordering::Relaxed);
                    }
                    Ok(())
                })
                .clone()?;
        }
        Ok(())
    }

    /// [`Memory::ensure`] of every range (image, start, end), the chunks fetched by several
    /// threads at once; the first failure is returned.
    fn fill(&self, ranges: &[(usize, u64, u64)]) -> Result<(), ChunkError> {
        let slots: Vec<(usize, u64, u64)> = ranges
            .iter()
            .flat_map(|&(img, start, end)| {
                self.images[img]
                    .slots
                    .iter()
                    .filter(move |s| s.offset < end && s.offset + s.chunk.size > start)
                    .map(move |s| (img, s.offset, s.offset + s.chunk.size))
            })
            .collect();
        let next = AtomicUsize::new(0);
        let failed: Mutex<Option<ChunkError>> = Mutex::new(None);
        let threads = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .clamp(2, 8);
        std::thread::scope(|sc| {
            for _ in 0..threads {
                sc.spawn(|| loop {
                    if failed.lock().expect("not poisoned").is_some() {
                        return;
                    }
                    let Some(&(img, start, end)) = slots.get(next.fetch_add(1, Ordering::SeqCst))
                    else {
                        return;
                    };
                    if let Err(e) = self.ensure(img, start, end) {
                        failed.lock().expect("not poisoned").get_or_insert(e);
                        return;
                    }
                });
            }
        });
        match failed.into_inner().expect("not poisoned") {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The answer to a request for `nr_pages` pages of task `pid` from `vaddr`: how many
    /// pages (fewer when the run ends sooner) and their bytes.
    fn serve(&self, pid: u64, vaddr: u64, nr_pages: u64) -> Result<(u64, Vec<u8>), LazyError> {
        let (map, img) = self.tasks.get(&pid).ok_or_else(|| {
            LazyError::Protocol(format!(
                "pages of task {pid}, which the checkpoint does not hold"
            ))
        })?;
        let run = vaddr
            .is_multiple_of(self.page)
            .then(|| map.find(vaddr, self.page))
            .flatten()
            .ok_or_else(|| {
                LazyError::Protocol(format!(
                    "address {vaddr:#x} of task {pid}, which the checkpoint holds no page at"
                ))
            })?;
        let index = (vaddr - run.vaddr) / self.page;
        let n = nr_pages.min(run.pages - index).min(MAX_ANSWER_PAGES);
        if n == 0 {
            return Err(LazyError::Protocol("no pages".into()));
        }
        let start = run.offset + index * self.page;
        let len = n * self.page;
        if !self.counting.load(Ordering::Relaxed) {
            debug!(pid, vaddr = %format_args!("{vaddr:#x}"), pages = n, "pages asked for while CRIU restores");
        }
        self.ensure(*img, start, start + len)
            .map_err(LazyError::Chunk)?;
        let mut buf = vec![0u8; len as usize];
        self.images[*img]
            .file
            .read_exact_at(&mut buf, start)
            .map_err(|e| {
                LazyError::Protocol(format!(
                    "pages that cannot be read back from {}: {e}",
                    self.images[*img].name
                ))
            })?;
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.bytes_served.fetch_add(len, Ordering::Relaxed);
        Ok((n, buf))
    }
}

type FailureHook = Box<dyn Fn(&LazyError) + Send + Sync>;

/// What the page server, the fetchers and the caller share.
struct Shared {
    memory: Memory,
    /// The restored tree's root, once CRIU said it.
    tree: AtomicI32,
    failure: Mutex<Option<LazyError>>,
    stream: Mutex<Option<TcpStream>>,
    /// Kills the tree if this process dies before every page is back.
    guard: Mutex<Option<crate::guard::LazyGuard>>,
    /// Told of a failure before the tree is ended ([`Serving::on_failure`]).
    on_failure: Mutex<Option<FailureHook>>,
    stop: AtomicBool,
    next_slot: AtomicUsize,
}

impl Shared {
    /// Ends the restored tree, then the connection: the first failure is the one reported.
    fn fail(&self, e: LazyError) {
        let first = {
            let mut f = self.failure.lock().expect("not poisoned");
            let first = f.is_none();
            if first {
                warn!(error = %e, "lazy restore failed");
                *f = Some(e.clone());
            }
            first
        };
        if first {
            if let Some(hook) = self.on_failure.lock().expect("not poisoned").as_ref() {
                hook(&e);
            }
        }
        self.kill_tree();
        self.stop.store(true, Ordering::SeqCst);
        if let Some(s) = self.stream.lock().expect("not poisoned").as_ref() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn kill_tree(&self) {
        let root = self.tree.load(Ordering::SeqCst);
        if root > 0 {
            for pid in crate::process::descendants(root).into_iter().rev() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    /// Starts the tree's guardian, holding a copy of `connection`; told the tree if it is
    /// known already.
    fn guard(&self, connection: &TcpStream) {
        let mut g = self.guard.lock().expect("not poisoned");
        *g = crate::guard::LazyGuard::start(connection);
        let root = self.tree.load(Ordering::SeqCst);
        if let (Some(g), true) = (g.as_mut(), root > 0) {
            g.tree(root);
        }
    }

    /// The tree's root is known: to the guardian too.
    fn set_tree(&self, root: i32) {
        let mut g = self.guard.lock().expect("not poisoned");
        self.tree.store(root, Ordering::SeqCst);
        if let Some(g) = g.as_mut() {
            g.tree(root);
        }
    }

    /// The guardian is no longer needed.
    fn release_guard(&self) {
        if let Some(mut g) = self.guard.lock().expect("not poisoned").take() {
            g.done();
        }
    }

    fn failure(&self) -> Option<LazyError> {
        self.failure.lock().expect("not poisoned").clone()
    }

    /// Fetches chunks nobody asked for yet, in order, until all are in or the restore ends.
    fn prefetch(&self) {
        let slots: Vec<(usize, u64, u64)> = self
            .memory
            .images
            .iter()
            .enumerate()
            .flat_map(|(i, im)| {
                im.slots
                    .iter()
                    .map(move |s| (i, s.offset, s.offset + s.chunk.size))
            })
            .collect();
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            let k = self.next_slot.fetch_add(1, Ordering::SeqCst);
            let Some(&(img, start, end)) = slots.get(k) else {
                return;
            };
            if let Err(e) = self.memory.ensure(img, start, end) {
                self.fail(LazyError::Chunk(e));
                return;
            }
        }
    }

    /// Answers CRIU's lazy-pages daemon until it says it is done.
    fn serve(&self, mut s: TcpStream, layout: Layout, log: &Path) -> Result<(), LazyError> {
        let daemon = |reason: &str| LazyError::Daemon {
            reason: reason.to_string(),
            log: log.to_path_buf(),
        };
        loop {
            let iov = match server::read_iov(&mut s, layout) {
                Ok(Some(iov)) => iov,
                Ok(None) => return Err(self.failure().unwrap_or_else(|| daemon("ended"))),
                Err(e) => {
                    return Err(self
                        .failure()
                        .unwrap_or_else(|| daemon(&format!("lost its connection ({e})"))))
                }
            };
            match iov.request().map_err(LazyError::Protocol)? {
                Request::Get {
                    pid,
                    vaddr,
                    nr_pages,
                } => {
                    let (n, pages) = self.memory.serve(pid, vaddr, nr_pages)?;
                    if let Err(e) = server::send_pages(
                        &mut s,
                        layout,
                        &Iov::pages(n, vaddr, iov.dst_id),
                        &pages,
                    ) {
                        return Err(self
                            .failure()
                            .unwrap_or_else(|| daemon(&format!("lost its connection ({e})"))));
                    }
                }
                Request::Close => {
                    let _ = std::io::Write::write_all(&mut s, &0i32.to_ne_bytes());
                    return Ok(());
                }
            }
        }
    }
}

/// The memory of a lazily restored tree on its way in; [`Serving::wait`] until it is all back.
pub struct Serving {
    shared: Arc<Shared>,
    server: JoinHandle<Result<(), LazyError>>,
    prefetchers: Vec<JoinHandle<()>>,
    daemon: Child,
    running_since: Instant,
    log: PathBuf,
    /// The staging folder, kept until every page is back.
    _extracted: archive::Extracted,
}

impl Serving {
    /// The restored tree's root.
    pub fn pid(&self) -> i32 {
        self.shared.tree.load(Ordering::SeqCst)
    }

    /// Calls `hook` with the failure, if the restore fails, before the tree is ended (at
    /// once if it failed already).
    pub fn on_failure(&self, hook: impl Fn(&LazyError) + Send + Sync + 'static) {
        let mut h = self.shared.on_failure.lock().expect("not poisoned");
        if let Some(e) = self.shared.failure() {
            hook(&e);
        }
        *h = Some(Box::new(hook));
    }

    /// Waits until every page of the tree is back (then the tree runs on its own), or until
    /// the restore failed (then the tree was ended).
    pub fn wait(mut self) -> Result<Served, LazyError> {
        let served = self
            .server
            .join()
            .unwrap_or_else(|_| Err(LazyError::Protocol("a page server that panicked".into())));
        let served = served.inspect_err(|e| self.shared.fail(e.clone()));
        self.shared.stop.store(true, Ordering::SeqCst);
        for p in self.prefetchers.drain(..) {
            let _ = p.join();
        }
        // Its exit status, when it can be had: a daemon process that reaps every child (the
        // agent's own) may have taken it first; then the protocol's end says it finished.
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            match self.daemon.try_wait() {
                Ok(Some(st)) => break Some(st),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Ok(None) => {
                    let _ = self.daemon.kill();
                    let _ = self.daemon.wait();
                    break None;
                }
                Err(_) => break None,
            }
        };
        // Every page is back, or the tree was ended: the guardian may go.
        self.shared.release_guard();
        served?;
        if let Some(e) = self.shared.failure() {
            return Err(e);
        }
        if status.is_some_and(|s| !s.success()) {
            let e = LazyError::Daemon {
                reason: format!("ended with {status:?}"),
                log: self.log.clone(),
            };
            self.shared.fail(e.clone());
            return Err(e);
        }
        let m = &self.shared.memory;
        Ok(Served {
            resident_time: self.running_since.elapsed(),
            requests: m.requests.load(Ordering::Relaxed),
            bytes_served: m.bytes_served.load(Ordering::Relaxed),
            chunks_fetched: m.chunks_fetched.load(Ordering::Relaxed),
            bytes_fetched: m.bytes_fetched.load(Ordering::Relaxed),
        })
    }
}

/// Why lazy restore cannot work on this machine, if it cannot.
pub fn unavailable() -> Option<String> {
    // SAFETY: userfaultfd(2) takes flags and returns a new descriptor or -1; nothing else.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Some(format!("this kernel gives no userfaultfd ({e})"));
    }
    // SAFETY: `fd` was just returned to us and is closed once.
    unsafe { libc::close(fd as i32) };
    None
}

/// Restores the checkpoint `manifest` (checked, format 2) whose chunks `source` gives, lazily
/// where it can (see the module's documentation); `root` holds the staging folder, CRIU's log
/// of a failed restore goes to `failed_log`. `opts.archive` names the checkpoint in errors.
pub fn restore(
    criu: &Criu,
    source: Arc<dyn ChunkSource>,
    manifest: Manifest,
    root: &Path,
    opts: &RestoreOptions,
    failed_log: &Path,
    progress: &dyn Progress,
) -> Result<LazyRestore, RestoreError> {
    restore_as(
        criu, source, manifest, root, opts, failed_log, progress, false,
    )
}

/// [`restore`], in full when `full` (every chunk fetched and checked before CRIU runs).
#[allow(clippy::too_many_arguments)]
pub fn restore_as(
    criu: &Criu,
    source: Arc<dyn ChunkSource>,
    manifest: Manifest,
    root: &Path,
    opts: &RestoreOptions,
    failed_log: &Path,
    progress: &dyn Progress,
    full: bool,
) -> Result<LazyRestore, RestoreError> {
    let t0 = Instant::now();
    let label = opts.archive.clone();
    staging::sweep(root);
    let held = staging::Held::create(root, ".cedana-restore-").map_err(|source| {
        RestoreError::Staging {
            path: root.to_path_buf(),
            source,
        }
    })?;
    archive::check_room(&label, &manifest, held.path())?;
    let corrupt = |reason: String| {
        RestoreError::Archive(ArchiveError::Corrupt {
            path: label.clone(),
            reason,
        })
    };
    let mut full_because = match full {
        true => Some("a full restore was asked for".to_string()),
        false if manifest.criu.user_namespace => Some(
            "the task has a user namespace of its own (exec --userns): CRIU restores it from a mount tree of its own, which CRIU's lazy-pages daemon is not in".to_string(),
        ),
        false => unavailable(),
    };
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    let images_prefix = format!("{}/pages-", archive::IMAGES_DIR);
    let pages_id = |name: &str| {
        name.strip_prefix(&images_prefix)
            .and_then(|r| r.strip_suffix(".img"))
            .and_then(|id| id.parse::<u32>().ok())
    };

    // Everything but the page images, whole and checked; first those CRIU's lazy-pages
    // daemon reads as it starts (the inventory, the tree, its ids), and the daemon starts
    // then, while the rest is fetched (CRIU takes tens of milliseconds to start).
    progress.stage("fetching the images", None);
    let images = held.path().join(archive::IMAGES_DIR);
    std::fs::create_dir_all(&images).map_err(|source| RestoreError::Staging {
        path: images.clone(),
        source,
    })?;
    let read_at_start = |name: &str| {
        let file = name.rsplit('/').next().unwrap_or_default();
        name.starts_with(&format!("{}/", archive::IMAGES_DIR))
            && (file == "inventory.img" || file == "pstree.img" || file.starts_with("ids-"))
    };
    let mut small: Vec<&archive::Entry> = manifest
        .entries
        .iter()
        .filter(|e| pages_id(&e.name).is_none())
        .collect();
    small.sort_by_key(|e| !read_at_start(&e.name));
    let mut early_daemon = None;
    let start_early = |early: &mut Option<Daemon>| {
        if early.is_none() && full_because.is_none() {
            let (criu, images) = (criu.clone(), images.clone());
            *early = Some(Daemon(Some(std::thread::spawn(move || {
                start_daemon(&criu, &images)
            }))));
        }
    };
    for e in small {
        if !read_at_start(&e.name) {
            start_early(&mut early_daemon);
        }
        write_whole(&*source, e, held.path())?;
    }
    start_early(&mut early_daemon);
    debug!(
        ms = t0.elapsed().as_millis() as u64,
        "restore: small images fetched and checked"
    );
    let maps = task_pagemaps(&images, page).map_err(corrupt)?;
    let lazy_ids: HashSet<u32> = maps
        .values()
        .filter(|m| m.runs.iter().any(|r| r.lazy))
        .map(|m| m.pages_id)
        .collect();
    if full_because.is_none() && lazy_ids.is_empty() {
        full_because = Some("the checkpoint holds no memory CRIU restores lazily".into());
    }
    // A daemon started for a restore that turns out not to be lazy is stopped here.
    if full_because.is_some() {
        early_daemon = None;
    }

    // The page images, made sparse and filled chunk by chunk (by several threads): the ones
    // without lazy memory (or all, for a full restore) now, the others with what CRIU reads
    // itself.
    let mut lazy_images = Vec::new();
    let mut image_of = HashMap::new();
    let mut whole = Vec::new();
    for e in &manifest.entries {
        let Some(id) = pages_id(&e.name) else {
            continue;
        };
        let lazy = full_because.is_none() && lazy_ids.contains(&id);
        if lazy {
            let size = maps
                .values()
                .find(|m| m.pages_id == id)
                .map_or(0, |m| m.size(page));
            if size != e.size {
                return Err(corrupt(format!(
                    "{} is {} bytes, its pagemap says {size}",
                    e.name, e.size
                )));
            }
            image_of.insert(id, lazy_images.len());
        } else {
            whole.push(lazy_images.len());
        }
        let path = held.path().join(&e.name);
        let file = create(&path)?;
        file.set_len(e.size).map_err(|source| ArchiveError::Write {
            path: path.clone(),
            source,
        })?;
        let mut offset = 0;
        let slots = e
            .chunks
            .iter()
            .flatten()
            .map(|c| {
                let s = Slot {
                    offset,
                    chunk: *c,
                    done: OnceLock::new(),
                };
                offset += c.size;
                s
            })
            .collect();
        lazy_images.push(LazyImage {
            name: e.name.clone(),
            file,
            slots,
        });
    }
    let tasks: HashMap<u64, (PageMap, usize)> = maps
        .into_iter()
        .filter_map(|(pid, m)| image_of.get(&m.pages_id).map(|i| (pid, (m, *i))))
        .collect();
    let memory = Memory {
        page,
        tasks,
        images: lazy_images,
        source: source.clone(),
        requests: AtomicU64::new(0),
        bytes_served: AtomicU64::new(0),
        chunks_fetched: AtomicU64::new(0),
        bytes_fetched: AtomicU64::new(0),
        counting: AtomicBool::new(false),
    };
    // What CRIU reads itself: the images without lazy memory, and from the others the runs
    // it does not leave to the daemon.
    let mut ranges: Vec<(usize, u64, u64)> = whole.iter().map(|i| (*i, 0, u64::MAX)).collect();
    for (map, img) in memory.tasks.values() {
        for r in map.runs.iter().filter(|r| !r.lazy) {
            ranges.push((*img, r.offset, r.offset + r.pages * page));
        }
    }
    // And the pages the tree touches first (CRIU too, as it re-registers rseq areas): fetched
    // now, alongside the rest, not on the fault.
    if full_because.is_none() {
        for (file, hot) in crate::criu::images::page_image_hot_ranges(&images) {
            let id = file
                .strip_prefix("pages-")
                .and_then(|r| r.strip_suffix(".img"))
                .and_then(|id| id.parse::<u32>().ok());
            if let Some(img) = id.and_then(|id| image_of.get(&id)) {
                ranges.extend(hot.into_iter().map(|(at, n)| (*img, at, at + n)));
            }
        }
    }
    // A restore in full from the start hands CRIU its memory chunk by chunk as it reads
    // (each checked before it goes, nothing written here; see `crate::streamer`).
    let stream = full_because.is_some() && restore::streams(&manifest, opts);
    let extracted = archive::Extracted::from_parts(manifest, held);
    if !stream {
        // CRIU's word on the CPU while the memory it reads itself is fetched.
        let (filled, cpu) = std::thread::scope(|s| {
            let cpu = s.spawn(|| restore::check_cpu(criu, &extracted, opts, progress));
            let filled = memory.fill(&ranges);
            (filled, cpu.join().expect("the CPU check does not panic"))
        });
        filled.map_err(chunk_err)?;
        cpu?;
    }
    progress.finish();
    debug!(
        ms = t0.elapsed().as_millis() as u64,
        "restore: CPU checked, memory CRIU reads itself fetched"
    );

    if stream {
        let why = full_because.unwrap_or_default();
        match full {
            true => info!(checkpoint = %label.display(), "restoring in full"),
            false => {
                warn!(checkpoint = %label.display(), "restoring in full, not lazily: {why}")
            }
        }
        let pages = memory
            .images
            .iter()
            .map(|i| (i.name.clone(), i.slots.iter().map(|s| s.chunk).collect()))
            .collect();
        let fetch = |c: &ChunkRef| source.fetch(c).map_err(RestoreError::Chunk);
        let server = crate::streamer::ImageServer::of_chunks(
            extracted.images_dir(),
            Some(&fetch),
            pages,
            progress,
        );
        let outcome =
            restore::run_streamed(criu, extracted, &server, opts, t0, failed_log, progress)?;
        return Ok(LazyRestore {
            outcome,
            serving: None,
            full_because: Some(why),
        });
    }
    let mut req = restore::prepare_cpu_checked(&extracted, opts, progress)?;
    let verify_time = t0.elapsed();
    debug!(
        ms = t0.elapsed().as_millis() as u64,
        "restore: carried files put back"
    );
    let daemon = match (&full_because, early_daemon) {
        (None, Some(mut d)) => match d.take() {
            Ok(d) => Some(d),
            Err(why) => {
                full_because = Some(why);
                None
            }
        },
        _ => None,
    };
    let Some((listener, daemon, layout)) = daemon else {
        let why = full_because.unwrap_or_default();
        if full {
            info!(checkpoint = %label.display(), "restoring in full");
        } else {
            warn!(checkpoint = %label.display(), "restoring in full, not lazily: {why}");
        }
        // The memory not fetched yet, now.
        let all: Vec<(usize, u64, u64)> =
            (0..memory.images.len()).map(|i| (i, 0, u64::MAX)).collect();
        memory.fill(&all).map_err(chunk_err)?;
        let (pid, criu_time) =
            restore::run_criu(criu, &req, opts, verify_time, failed_log, progress)?;
        return Ok(LazyRestore {
            outcome: restore::outcome(
                pid,
                extracted.manifest.clone(),
                opts,
                verify_time,
                criu_time,
            ),
            serving: None,
            full_because: Some(why),
        });
    };

    let log = req.images_dir.join(LAZY_LOG);
    let shared = Arc::new(Shared {
        memory,
        tree: AtomicI32::new(0),
        failure: Mutex::new(None),
        stream: Mutex::new(None),
        guard: Mutex::new(None),
        on_failure: Mutex::new(None),
        stop: AtomicBool::new(false),
        next_slot: AtomicUsize::new(0),
    });
    let daemon_pid = daemon.id();
    let server = {
        let shared = shared.clone();
        let log = log.clone();
        std::thread::spawn(move || {
            let going = || !shared.stop.load(Ordering::SeqCst);
            let served = server::accept_from(&listener, daemon_pid, DAEMON_START, &going)
                .map_err(|e| LazyError::Daemon {
                    reason: format!("did not connect ({e})"),
                    log: log.clone(),
                })
                .and_then(|s| {
                    if let Ok(c) = s.try_clone() {
                        *shared.stream.lock().expect("not poisoned") = Some(c);
                    }
                    shared.guard(&s);
                    shared.serve(s, layout, &log)
                });
            if let Err(e) = &served {
                // The tree ends now, not when someone waits.
                shared.fail(e.clone());
            }
            served
        })
    };
    req.lazy_pages = true;
    debug!(
        ms = t0.elapsed().as_millis() as u64,
        "restore: lazy-pages daemon listening"
    );
    let mut daemon = daemon;
    let restored = restore::run_criu(criu, &req, opts, verify_time, failed_log, progress);
    let (pid, criu_time) = match restored {
        Ok(r) => r,
        Err(e) => {
            shared.stop.store(true, Ordering::SeqCst);
            if let Some(s) = shared.stream.lock().expect("not poisoned").as_ref() {
                let _ = s.shutdown(Shutdown::Both);
            }
            let _ = daemon.kill();
            let _ = daemon.wait();
            let _ = server.join();
            shared.release_guard();
            return Err(e);
        }
    };
    let running_since = Instant::now();
    shared.set_tree(pid);
    shared.memory.counting.store(true, Ordering::Relaxed);
    // A failure while CRIU was still restoring could not end the tree: it ends now.
    if shared.failure().is_some() {
        shared.kill_tree();
    }
    info!(pid, checkpoint = %label.display(), "restored lazily: the task runs, its memory follows");
    let prefetchers = (0..PREFETCHERS)
        .map(|_| {
            let shared = shared.clone();
            std::thread::spawn(move || shared.prefetch())
        })
        .collect();
    let outcome = restore::outcome(
        pid,
        extracted.manifest.clone(),
        opts,
        verify_time,
        criu_time,
    );
    Ok(LazyRestore {
        outcome,
        serving: Some(Serving {
            shared,
            server,
            prefetchers,
            daemon,
            running_since,
            log,
            _extracted: extracted,
        }),
        full_because: None,
    })
}

/// `criu lazy-pages` starting on a thread of its own; stopped if the restore ends before
/// taking it.
struct Daemon(Option<JoinHandle<Result<Started, String>>>);

/// A started `criu lazy-pages`: the agent's page-server socket, the daemon, its layout.
type Started = (TcpListener, Child, Layout);

impl Daemon {
    /// The started daemon, or why it did not start.
    fn take(&mut self) -> Result<Started, String> {
        match self.0.take().map(|t| t.join()) {
            Some(Ok(started)) => started,
            _ => Err("`criu lazy-pages` did not start (its starter panicked)".into()),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(Ok(Ok((_, mut child, _)))) = self.0.take().map(|t| t.join()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn chunk_err(e: ChunkError) -> RestoreError {
    RestoreError::Chunk(e)
}

/// Creates `path` for writing, new, private, not through a link.
fn create(path: &Path) -> Result<File, RestoreError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ArchiveError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|source| {
            RestoreError::Archive(ArchiveError::Write {
                path: path.to_path_buf(),
                source,
            })
        })
}

/// Writes entry `e` whole under `dir`, each chunk checked.
fn write_whole(
    source: &dyn ChunkSource,
    e: &archive::Entry,
    dir: &Path,
) -> Result<(), RestoreError> {
    let path = dir.join(&e.name);
    let file = create(&path)?;
    let mut offset = 0;
    for c in e.chunks.iter().flatten() {
        let bytes = source.fetch(c).map_err(chunk_err)?;
        file.write_all_at(&bytes, offset)
            .map_err(|source| ArchiveError::Write {
                path: path.clone(),
                source,
            })?;
        offset += c.size;
    }
    Ok(())
}

/// The tasks' pagemaps in `images` (`pagemap-<pid>.img`; shared memory's are not a task's),
/// by task id.
fn task_pagemaps(images: &Path, page: u64) -> Result<HashMap<u64, PageMap>, String> {
    let mut out = HashMap::new();
    let dir = std::fs::read_dir(images).map_err(|e| e.to_string())?;
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("pagemap-")
            .and_then(|r| r.strip_suffix(".img"))
            .and_then(|p| p.parse::<u64>().ok())
        else {
            continue;
        };
        let bytes = std::fs::read(e.path()).map_err(|e| format!("{name}: {e}"))?;
        let map = read_pagemap(&bytes, &name, page).map_err(|e| e.to_string())?;
        out.insert(pid, map);
    }
    Ok(out)
}

/// Starts `criu lazy-pages` for `images`, asking the agent's page server on a new loopback
/// port, and waits until it listens for the restore. Why not, when it cannot.
fn start_daemon(criu: &Criu, images: &Path) -> Result<Started, String> {
    let layout = match criu.version() {
        Ok(v) => Layout::for_criu(v.major, v.minor),
        Err(e) => return Err(format!("CRIU's version cannot be read ({e})")),
    };
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no loopback port ({e})"))?;
    let port = listener
        .local_addr()
        .map_err(|e| format!("no loopback port ({e})"))?
        .port();
    let mut child = std::process::Command::new(criu.path())
        .arg("lazy-pages")
        .arg("-D")
        .arg(images)
        .arg("-W")
        .arg(images)
        .args(["--page-server", "--address", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .args(["-o", LAZY_LOG, "-v4"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("`criu lazy-pages` does not start ({e})"))?;
    let socket = images.join("lazy-pages.socket");
    let deadline = Instant::now() + DAEMON_START;
    while !socket.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!(
                "`criu lazy-pages` ended at once ({st}; see {})",
                images.join(LAZY_LOG).display()
            ));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err("`criu lazy-pages` did not start listening".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok((listener, child, layout))
}
