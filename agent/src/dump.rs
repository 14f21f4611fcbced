//! `dump`: checkpoint a process tree with CRIU into a new archive.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde::Serialize;
use tracing::{info, warn};

use crate::archive::{
    self, host_info, ArchiveError, Compression, Digest, Manifest, ManifestCriu, ManifestProcess,
};
use crate::criu::{self, images, Criu, CriuError, DumpRequest};
use crate::process::{ProcessError, ProcessInfo};
use crate::progress::Progress;
use crate::{capture, files, staging};

pub use cedana_protocol::{CriuOptions, TcpMode};

/// Options of a dump.
#[derive(Clone, Debug)]
pub struct DumpOptions {
    pub pid: i32,
    /// Folder the archive goes into.
    pub dir: PathBuf,
    pub leave_running: bool,
    pub compression: Compression,
    /// TCP connections, external unix sockets, cgroups, externals… (`CriuOptions::check`ed).
    pub criu: CriuOptions,
    /// Where CRIU writes images before they are archived (see [`staging::root`]).
    pub staging: Option<PathBuf>,
    /// A folder to carry in the checkpoint as of the dump (see [`crate::files`]).
    pub files: Option<PathBuf>,
    /// Top-level names in that folder not to carry.
    pub files_exclude: Vec<String>,
    /// Files of that folder to copy while the tree is stopped whatever their size (seen
    /// written in place by the task before; see [`files::snapshot`]).
    pub files_copy: Vec<PathBuf>,
    /// Whether an archive file is on the disk (fsync) before the dump returns (and before a
    /// stopped tree is killed).
    pub sync: bool,
}

/// The result of a successful dump.
#[derive(Clone, Debug, Serialize)]
pub struct DumpOutcome {
    /// The archive file, or for a dump into a sink the name it was committed under.
    pub archive: PathBuf,
    /// For a dump into a sink ([`dump_into`]): the name it was committed under.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    pub archive_bytes: u64,
    pub images_bytes: u64,
    #[serde(with = "millis")]
    pub criu_time: Duration,
    #[serde(with = "millis")]
    pub archive_time: Duration,
    /// Of `archive_time`: writing the manifest and making the archive durable (sync and
    /// rename, or the sink's commit).
    #[serde(with = "millis")]
    pub finish_time: Duration,
    pub manifest: Manifest,
    /// The SHA-256 of the archive's `manifest.json` (it lists every entry's SHA-256): what a
    /// restore can be told to expect ([`crate::archive::manifest_sha256`]).
    pub manifest_sha256: String,
}

/// Errors of a dump.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error(
        "dump folder {path} does not exist or is not a folder; create it or pass another with -d"
    )]
    NoDir { path: PathBuf },
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("cannot create a staging folder in {path}: {source}; set CEDANA_STAGING_DIR to a writable folder")]
    Staging {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("PID {pid} ({name}) runs on the terminal {terminal} of a shell outside it: its checkpoint could only be restored onto that terminal, so it was not taken and the process was left running; start the process with `cedana-agent exec` (or setsid, with its output in a file), or dump with --leave-running to keep it running whatever happens")]
    Terminal {
        pid: i32,
        name: String,
        terminal: String,
    },
    #[error("PID {pid} ({name}) has a stopped process (PID {stopped}, state T; an agent killed during a dump, or a job stopped with Ctrl-Z, leaves it so): its checkpoint would come back stopped, so none was taken; `kill -CONT {stopped}` resumes it, then dump again")]
    Stopped {
        pid: i32,
        name: String,
        stopped: i32,
    },
    #[error("checkpoint of PID {pid} ({name}) failed: {source}{kept}")]
    Criu {
        pid: i32,
        name: String,
        source: Box<CriuError>,
        kept: String,
    },
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Files(#[from] files::FilesError),
    #[error(transparent)]
    Store(#[from] cedana_store::StoreError),
}

/// A dump's target, checked: the process, the archive's name and its time.
pub(crate) struct Target {
    pub info: ProcessInfo,
    pub stem: String,
    pub stamp: cedana_protocol::Stamp,
    pub shell_job: bool,
}

impl Target {
    /// Checks that `opts.pid` can be dumped so that it comes back: the folder exists, the
    /// tree is not a shell's job on a terminal (unless it is left running), nothing in it is
    /// stopped.
    pub(crate) fn check(opts: &DumpOptions) -> Result<Target, DumpError> {
        if !opts.dir.is_dir() {
            return Err(DumpError::NoDir {
                path: opts.dir.clone(),
            });
        }
        let info = ProcessInfo::inspect(opts.pid)?;
        // Never kill a tree whose archive cannot come back.
        if let (false, Some(terminal)) = (opts.leave_running, info.shell_job_terminal()) {
            return Err(DumpError::Terminal {
                pid: info.pid,
                name: info.name.clone(),
                terminal,
            });
        }
        // A stopped target would be archived stopped, and come back stopped.
        if let Some(stopped) = crate::process::descendants(info.pid)
            .into_iter()
            .find(|p| crate::process::is_stopped(*p))
        {
            return Err(DumpError::Stopped {
                pid: info.pid,
                name: info.name.clone(),
                stopped,
            });
        }
        let stamp = cedana_protocol::Stamp::now();
        let stem = format!("{}_{}", info.file_stem(), stamp.file);
        let shell_job = info.needs_shell_job();
        Ok(Target {
            info,
            stem,
            stamp,
            shell_job,
        })
    }

    /// The dump's staging folder, held, after what killed agents left there (folders no live
    /// agent holds, partial archives no writer holds) was swept.
    pub(crate) fn staging(&self, opts: &DumpOptions) -> Result<staging::Held, DumpError> {
        let staging_root = staging::root(opts.staging.as_deref(), &opts.dir);
        staging::sweep(&staging_root);
        if staging_root != opts.dir {
            staging::sweep(&opts.dir);
        }
        staging::Held::create(&staging_root, ".cedana-dump-").map_err(|source| DumpError::Staging {
            path: staging_root.clone(),
            source,
        })
    }
}

impl Target {
    /// CRIU's request for this dump into `images`, and whether the agent resumes the tree
    /// itself (carried files must be read while the tree is stopped; it is then resumed by
    /// the agent rather than by CRIU).
    pub(crate) fn request(&self, opts: &DumpOptions, images: &Path) -> (DumpRequest, bool) {
        let resume_after_files = opts.leave_running && opts.files.is_some();
        let req = DumpRequest {
            pid: opts.pid,
            images_dir: images.to_path_buf(),
            leave_running: opts.leave_running && !resume_after_files,
            leave_stopped: !opts.leave_running || resume_after_files,
            shell_job: self.shell_job,
            user_namespace: self.info.user_namespace,
            user_namespace_mounts: self.info.user_namespace_mounts.clone(),
            criu: opts.criu.clone(),
        };
        (req, resume_after_files)
    }

    /// Before CRIU runs: the guardian of a tree CRIU will leave stopped (if the agent dies
    /// before it killed or resumed it, the guardian resumes it), and CRIU's version.
    pub(crate) fn prepare(
        &self,
        criu: &Criu,
        req: &DumpRequest,
    ) -> Result<(Option<crate::guard::Guard>, String), DumpError> {
        let guard = match req.leave_stopped {
            true => crate::guard::Guard::start(req.pid),
            false => None,
        };
        let version = criu
            .version()
            .map_err(|source| criu_err(&self.info, source, String::new()))?;
        Ok((guard, version.to_string()))
    }

    /// The manifest of this dump (entries to be filled in by the writer).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn manifest(
        &self,
        format_version: u32,
        images: &Path,
        criu_version: String,
        req: &DumpRequest,
        cpu: Option<images::CpuInfo>,
        compression: Compression,
        files: Option<files::ManifestFiles>,
    ) -> Manifest {
        let info = &self.info;
        let (tree_size, tree_pids) = dumped_tree(images, info);
        Manifest {
            format_version,
            created_at: self.stamp.rfc3339.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            process: ManifestProcess {
                name: info.name.clone(),
                pid: info.pid,
                cmdline: info.cmdline.clone(),
                cwd: info.cwd.clone(),
                exe: info.exe.clone(),
                tree_size,
                tree_pids,
                rss_bytes: info.tree_rss_bytes,
            },
            host: host_info(),
            criu: ManifestCriu {
                version: criu_version,
                shell_job: self.shell_job,
                tcp_established: req.criu.tcp == TcpMode::Established,
                tcp_close: req.criu.tcp == TcpMode::Close,
                ext_unix_sk: req.criu.ext_unix_sk,
                manage_cgroups: req.criu.manage_cgroups,
                network_lock: req.criu.network_lock,
                external: req.criu.external.clone(),
                pid_namespace: info.pid_namespace_init,
                user_namespace: info.user_namespace,
                user_namespace_mounts: info.user_namespace_mounts.clone(),
            },
            cpu,
            compression,
            entries: Vec::new(),
            files,
        }
    }
}

/// The carried folder (`opts.files`), read while the tree `pid` is stopped; kept first in
/// `work/carried` if the tree is to go on (see [`files::snapshot`]: files open for writing
/// and small ones copied, the others linked and checked unchanged before the commit).
pub(crate) fn carry(
    opts: &DumpOptions,
    work: &Path,
    pid: i32,
) -> Result<Option<(files::Collected, Option<files::Snapshot>)>, DumpError> {
    let Some(root) = opts.files.as_deref() else {
        return Ok(None);
    };
    let exclude: Vec<&str> = opts.files_exclude.iter().map(String::as_str).collect();
    let mut c = files::collect(root, &exclude)?;
    let mut kept = None;
    if opts.leave_running {
        let snap = work.join("carried");
        std::fs::create_dir(&snap).map_err(|source| DumpError::Staging {
            path: snap.clone(),
            source,
        })?;
        kept = Some(files::snapshot(&mut c, &snap, Some(pid), &opts.files_copy)?);
    }
    Ok(Some((c, kept)))
}

/// CRIU's description of this machine's CPU, for the manifest (none if CRIU cannot say).
pub(crate) fn cpu_description(criu: &Criu, images: &Path) -> Option<images::CpuInfo> {
    match criu
        .cpuinfo_dump(images)
        .map_err(|e| e.to_string())
        .and_then(|()| images::read_cpuinfo(images).map_err(|e| e.to_string()))
    {
        Ok(c) => Some(c),
        Err(e) => {
            warn!(error = %e, "no CPU description in the dump");
            None
        }
    }
}

/// [`cpu_description`] on a thread of its own, started as CRIU starts dumping: the second
/// CRIU's start (tens of milliseconds) overlaps the dump instead of following it while the
/// tree is frozen.
pub(crate) struct CpuDescribing(Option<std::thread::JoinHandle<Option<images::CpuInfo>>>);

impl CpuDescribing {
    pub(crate) fn start(criu: &Criu, images: &Path) -> Self {
        let (criu, images) = (criu.clone(), images.to_path_buf());
        CpuDescribing(Some(std::thread::spawn(move || {
            cpu_description(&criu, &images)
        })))
    }

    pub(crate) fn join(mut self) -> Option<images::CpuInfo> {
        self.0.take().and_then(|t| t.join().ok().flatten())
    }
}

/// CRIU's image files in a staging folder as `(entry name, path)`, sorted.
pub(crate) fn image_files(work: &Path) -> Result<Vec<(String, PathBuf)>, DumpError> {
    let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(work)
        .map_err(|source| DumpError::Staging {
            path: work.to_path_buf(),
            source,
        })?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter(|e| e.file_name() != staging::LOCK)
        .map(|e| {
            (
                format!(
                    "{}/{}",
                    archive::IMAGES_DIR,
                    e.file_name().to_string_lossy()
                ),
                e.path(),
            )
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Dumps `opts.pid` and its descendants into `opts.dir/<name>_<YYYYMMDD_HHMMSS>.zip`.
///
/// CRIU's page images stream into the archive while CRIU writes them. Unless the caller asked
/// to leave the tree running, CRIU leaves it frozen; it is killed only once the archive is
/// complete and synced, and thawed again if writing the archive fails, so a failed dump loses
/// nothing. On failure no archive is created, nothing in `opts.dir` is replaced, and CRIU's log
/// is kept as `<name>_<time>.dump-failed.log` in `opts.dir` and quoted in the error.
pub fn dump(
    criu: &Criu,
    opts: &DumpOptions,
    progress: &dyn Progress,
) -> Result<DumpOutcome, DumpError> {
    dump_into(criu, opts, None, progress)
}

/// [`dump`], with the archive written to `sink` instead of a file in `opts.dir` (which then
/// only holds the staging folder, unless `opts.staging` says otherwise): the archive streams
/// out while it is made, page images included as CRIU writes them (stored ones too: their
/// sizes, unknown when their entries start, go to the sink on commit), and a page image is
/// dropped from the staging folder as it is read. The tree stays frozen until the sink has
/// committed the archive, and is thawed if anything fails; a sink dropped uncommitted leaves
/// nothing.
pub fn dump_into(
    criu: &Criu,
    opts: &DumpOptions,
    sink: Option<Box<dyn crate::zipfmt::Sink>>,
    progress: &dyn Progress,
) -> Result<DumpOutcome, DumpError> {
    let target = Target::check(opts)?;
    let work = target.staging(opts)?;
    let (info, stem, shell_job) = (&target.info, &target.stem, target.shell_job);
    let (req, resume_after_files) = target.request(opts, work.path());
    info!(pid = opts.pid, name = %info.name, images = %work.path().display(), shell_job, "dumping");
    let (_guard, version) = target.prepare(criu, &req)?;
    progress.stage("checkpointing", Some(info.tree_rss_bytes));
    let t0 = Instant::now();
    let cpu = CpuDescribing::start(criu, work.path());
    // Stored archives: hash CRIU's page images as they are written; the largest then becomes
    // the archive in place. Compressed ones: compress the page images into the archive as
    // they are written.
    let mut writer = None;
    let mut digests: Vec<(String, Digest)> = Vec::new();
    let mut sink = sink;
    let new_writer =
        |sink: &mut Option<Box<dyn crate::zipfmt::Sink>>, compression| match sink.take() {
            Some(s) => Ok(archive::Writer::to_sink(s, stem, compression)),
            None => archive::Writer::new(&opts.dir, stem, compression),
        };
    // Into a sink, stored page images stream out as CRIU writes them too (their sizes go to
    // the sink at the end, see `zipfmt::Sink::commit`).
    // Stored into a file: CRIU's page images go straight into the archive through FIFOs
    // (see [`capture`]); where FIFOs cannot be made, followed as files as below.
    let fifos = match (opts.compression, &sink) {
        (Compression::None, None) => {
            match capture::Fifos::make(work.path(), info.tree.len() + 16) {
                Ok(f) => Some(f),
                Err(e) => {
                    warn!(error = %e, "no FIFOs for the page images: they are written twice");
                    None
                }
            }
        }
        _ => None,
    };
    let (criu_result, criu_time, streamed) = if let Some(fifos) = fifos {
        let w = writer.insert(archive::Writer::new(&opts.dir, stem, Compression::None)?);
        w.set_sync(opts.sync);
        capture_page_images(criu, &req, fifos, w, progress)
    } else if opts.compression == Compression::None && sink.is_none() {
        follow_page_images(criu, &req, |name, path, complete| {
            digests.push((
                name.to_string(),
                archive::digest_following(path, complete, true, progress)?,
            ));
            Ok(())
        })
    } else {
        match new_writer(&mut sink, opts.compression) {
            Ok(w) => {
                let w = writer.insert(w);
                follow_page_images(criu, &req, |name, path, complete| {
                    w.add(
                        &format!("{}/{name}", archive::IMAGES_DIR),
                        path,
                        Some(complete),
                        progress,
                    )?;
                    Ok(())
                })
            }
            Err(e) => return Err(e.into()),
        }
    };
    if let Err(source) = criu_result {
        progress.finish();
        // A page image that could not be stored fails CRIU too (its FIFO closed): the
        // archive's error says why.
        if let (true, Err(e)) = (writer.is_some(), streamed) {
            return Err(e);
        }
        let kept = keep_log(
            &work.path().join(criu::DUMP_LOG),
            &opts.dir.join(format!("{stem}.dump-failed.log")),
        );
        return Err(criu_err(info, source, kept));
    }
    let carried = carry(opts, work.path(), info.pid);
    if resume_after_files {
        signal_tree(info.pid, Signal::SIGCONT);
    }
    // From here on the tree is frozen (or running, with --leave-running): any failure thaws it.
    let frozen = !opts.leave_running;
    let finish = || -> Result<(archive::Finished, Manifest, u64, Duration), DumpError> {
        streamed?;
        let carried = carried?;
        let cpu = cpu.join();
        let mut writer = match writer.take() {
            Some(w) => w,
            None => stored_writer(&opts.dir, work.path(), stem, &digests, progress)?,
        };
        let rest: Vec<(String, PathBuf)> = image_files(work.path())?
            .into_iter()
            .filter(|(name, _)| !writer.has(name))
            .collect();
        for (name, path) in &rest {
            writer.add(name, path, None, progress)?;
        }
        let (carried, kept) = match carried {
            Some((c, kept)) => {
                for (name, path) in &c.sources {
                    writer.add(name, path, None, progress)?;
                }
                (Some(c.files), kept)
            }
            None => (None, None),
        };
        // A linked file written in place meanwhile: this archive would not match.
        if let Some(k) = &kept {
            k.check()?;
        }
        let images_bytes = dir_bytes(work.path());
        let mut manifest = target.manifest(
            archive::FORMAT_VERSION,
            work.path(),
            version.to_string(),
            &req,
            cpu,
            opts.compression,
            carried,
        );
        let t_finish = Instant::now();
        writer.set_sync(opts.sync);
        let dest = writer.finish(&mut manifest, stem)?;
        Ok((dest, manifest, images_bytes, t_finish.elapsed()))
    };
    let result = finish();
    progress.finish();
    let (dest, manifest, images_bytes, finish_time) = match result {
        Ok(r) => r,
        Err(e) => {
            if frozen {
                warn!(pid = info.pid, "archive failed: thawing the process tree");
                signal_tree(info.pid, Signal::SIGCONT);
            }
            return Err(e);
        }
    };
    if frozen {
        signal_tree(info.pid, Signal::SIGKILL);
    }
    let total_time = t0.elapsed();
    let (archive, object, archive_bytes) = match dest {
        archive::Finished::File(path) => {
            let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            (path, None, bytes)
        }
        archive::Finished::Committed { name, bytes } => (PathBuf::from(&name), Some(name), bytes),
    };
    info!(archive = %archive.display(), archive_bytes, ?criu_time, ?finish_time, ?total_time, "dump complete");
    Ok(DumpOutcome {
        archive,
        object,
        archive_bytes,
        images_bytes,
        criu_time,
        archive_time: total_time.saturating_sub(criu_time),
        finish_time,
        manifest_sha256: archive::manifest_sha256(&archive::manifest_bytes(&manifest)),
        manifest,
    })
}

/// Runs CRIU's dump on a second thread while this one runs `work`, which is handed a check that
/// turns true once CRIU has finished. Returns CRIU's result, how long CRIU took, and `work`'s.
fn beside_criu<T>(
    criu: &Criu,
    req: &DumpRequest,
    work: impl FnOnce(&dyn Fn() -> bool) -> T,
) -> (Result<(), CriuError>, Duration, T) {
    let criu_done = AtomicBool::new(false);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        let handle = s.spawn(|| {
            let r = criu.dump(req, &mut |_| {});
            let took = t0.elapsed();
            criu_done.store(true, Ordering::SeqCst);
            (r, took)
        });
        let result = work(&|| criu_done.load(Ordering::SeqCst));
        let (r, took) = handle.join().expect("CRIU thread does not panic");
        (r, took, result)
    })
}

/// Runs CRIU's dump while this thread hands each page image to `each` as soon as CRIU creates
/// it, with a `complete` check that turns true once CRIU has closed it (inotify) or finished.
/// Returns CRIU's result, how long CRIU took, and the result of `each`.
fn follow_page_images(
    criu: &Criu,
    req: &DumpRequest,
    mut each: impl FnMut(&str, &Path, &dyn Fn() -> bool) -> Result<(), DumpError>,
) -> (Result<(), CriuError>, Duration, Result<(), DumpError>) {
    let dir = &req.images_dir;
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
        .and_then(|i| i.add_watch(dir, AddWatchFlags::IN_CLOSE_WRITE).map(|_| i));
    let closed = std::cell::RefCell::new(BTreeSet::<String>::new());
    beside_criu(criu, req, |criu_done| {
        let is_closed = |name: &str| {
            if let Ok(i) = &inotify {
                while let Ok(events) = i.read_events() {
                    if events.is_empty() {
                        break;
                    }
                    let names = events
                        .into_iter()
                        .filter_map(|e| e.name)
                        .map(|n| n.to_string_lossy().into_owned());
                    closed.borrow_mut().extend(names);
                }
            }
            closed.borrow().contains(name)
        };
        // After a CRIU failure the page images may be partial; the caller discards them.
        let mut seen = BTreeSet::new();
        loop {
            let done = criu_done();
            match page_images(dir).into_iter().find(|n| !seen.contains(n)) {
                Some(name) => {
                    let complete = || criu_done() || is_closed(&name);
                    each(&name, &dir.join(&name), &complete)?;
                    seen.insert(name);
                }
                None if done => return Ok(()),
                None => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    })
}

/// Runs CRIU's dump while this thread splices each page image CRIU writes into a FIFO of
/// `fifos` into the archive `w`. Returns CRIU's result, how long CRIU took, and the archive's
/// result.
fn capture_page_images(
    criu: &Criu,
    req: &DumpRequest,
    fifos: capture::Fifos,
    w: &mut archive::Writer,
    progress: &dyn Progress,
) -> (Result<(), CriuError>, Duration, Result<(), DumpError>) {
    beside_criu(criu, req, move |done| {
        let mut fifos = fifos;
        fifos.follow(done, |name, fd| {
            w.add_from_fifo(
                &format!("{}/{name}", archive::IMAGES_DIR),
                fd,
                done,
                progress,
            )
            .map(|_| ())
            .map_err(DumpError::from)
        })
        // After a failure here CRIU may be writing into a FIFO nobody reads: `fifos` goes
        // here, before CRIU is waited for, and with every read end closed its writes fail
        // and it ends.
    })
}

/// A stored archive of page images already digested: the largest image becomes the archive
/// file in place when the filesystem allows, the others are copied in by the kernel.
fn stored_writer(
    dir: &Path,
    images: &Path,
    stem: &str,
    digests: &[(String, Digest)],
    progress: &dyn Progress,
) -> Result<archive::Writer, DumpError> {
    let entry = |name: &str| format!("{}/{name}", archive::IMAGES_DIR);
    let same_fs = std::fs::metadata(dir).ok().map(|m| m.dev())
        == std::fs::metadata(images).ok().map(|m| m.dev());
    let largest = digests
        .iter()
        .max_by_key(|(_, d)| d.size)
        .filter(|_| same_fs);
    let mut adopted = None;
    let mut writer = match largest {
        Some((name, d)) => {
            match archive::Writer::adopt(dir, &images.join(name), &entry(name), d)? {
                Some(w) => {
                    adopted = Some(name.as_str());
                    w
                }
                None => archive::Writer::new(dir, stem, Compression::None)?,
            }
        }
        None => archive::Writer::new(dir, stem, Compression::None)?,
    };
    for (name, d) in digests.iter().filter(|(n, _)| Some(n.as_str()) != adopted) {
        writer.add_digested(&entry(name), &images.join(name), d, progress)?;
    }
    Ok(writer)
}

/// CRIU's page images in `dir`, in the order CRIU writes them.
fn page_images(dir: &Path) -> Vec<String> {
    let mut names: Vec<(u64, String)> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    let id = n
                        .strip_prefix("pages-")?
                        .strip_suffix(".img")?
                        .parse()
                        .ok()?;
                    Some((id, n))
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.into_iter().map(|(_, n)| n).collect()
}

/// The tree as CRIU saw it (size, PIDs with threads): /proc, read before the dump, can miss
/// short-lived children.
pub(crate) fn dumped_tree(dir: &Path, info: &ProcessInfo) -> (usize, Vec<i32>) {
    match images::read_pstree(dir) {
        Ok(entries) => {
            let pids: BTreeSet<i32> = entries
                .iter()
                .flat_map(|e| std::iter::once(e.pid).chain(e.threads.iter().copied()))
                .map(|p| p as i32)
                .collect();
            (entries.len(), pids.into_iter().collect())
        }
        Err(e) => {
            warn!(error = %e, "cannot read the dumped process tree");
            (info.tree.len(), info.tree.clone())
        }
    }
}

/// Sends `sig` to `root` and every descendant (the tree is frozen, so the list is stable).
pub(crate) fn signal_tree(root: i32, sig: Signal) {
    for pid in crate::process::descendants(root).into_iter().rev() {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

pub(crate) fn criu_err(info: &ProcessInfo, source: CriuError, kept: String) -> DumpError {
    DumpError::Criu {
        pid: info.pid,
        name: info.name.clone(),
        source: Box::new(source),
        kept,
    }
}

/// Copies CRIU's log to `dest` (or `dest` with `_1`, `_2`… before its extension when that is
/// taken: two failures in one second never overwrite each other's log); returns a sentence
/// for the error message, or nothing when there is no log to keep (none, or empty).
pub(crate) fn keep_log(log: &Path, dest: &Path) -> String {
    let Ok(text) = std::fs::read(log) else {
        return String::new();
    };
    if text.is_empty() {
        return String::new();
    }
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = [".dump-failed.log", ".restore-failed.log"]
        .into_iter()
        .find(|e| name.ends_with(e))
        .or_else(|| name.rfind('.').map(|i| &name[i..]))
        .unwrap_or("");
    let stem = &name[..name.len() - ext.len()];
    for n in 0..1000 {
        let candidate = if n == 0 {
            dest.to_path_buf()
        } else {
            dest.with_file_name(format!("{stem}_{n}{ext}"))
        };
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&candidate);
        match file {
            Ok(mut f) => {
                return match std::io::Write::write_all(&mut f, &text) {
                    Ok(()) => format!("\n  full CRIU log kept at {}", candidate.display()),
                    Err(_) => {
                        let _ = std::fs::remove_file(&candidate);
                        String::new()
                    }
                };
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(_) => return String::new(),
        }
    }
    String::new()
}

#[cfg(test)]
mod keep_log_tests {
    use super::*;

    #[test]
    fn failed_logs_are_kept_apart_and_only_when_there_is_one() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("criu.log");
        let dest = dir
            .path()
            .join("python3.11_20260101_000000.dump-failed.log");
        assert_eq!(keep_log(&log, &dest), "", "no log, nothing kept");
        std::fs::write(&log, "").unwrap();
        assert_eq!(keep_log(&log, &dest), "", "an empty log is not kept");
        assert!(!dest.exists());
        std::fs::write(&log, "first").unwrap();
        let a = keep_log(&log, &dest);
        std::fs::write(&log, "second").unwrap();
        let b = keep_log(&log, &dest);
        let second = dir
            .path()
            .join("python3.11_20260101_000000_1.dump-failed.log");
        assert!(a.ends_with(&dest.display().to_string()), "{a}");
        assert!(b.ends_with(&second.display().to_string()), "{b}");
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "first");
        assert_eq!(std::fs::read_to_string(&second).unwrap(), "second");
    }
}

pub(crate) mod millis {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u128(d.as_millis())
    }
}
