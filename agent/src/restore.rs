//! `restore`: verify an archive, then restore its process tree with CRIU.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::info;

use cedana_protocol::{CgroupMode, CriuOptions, NetworkLock, TcpMode};

use crate::archive::{self, ArchiveError, Manifest, ManifestCriu};
use crate::criu::{self, Criu, CriuError, RestoreRequest};
use crate::dump::{keep_log, millis};
use crate::progress::Progress;
use crate::staging;

/// Options of a restore.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    pub archive: PathBuf,
    /// Where images are extracted before CRIU reads them (see [`staging::root`]).
    pub staging: Option<PathBuf>,
    /// Make the restored tree a child of this process (which must then reap it).
    pub as_child: bool,
    /// Put the files the checkpoint carries back under this folder (normally the folder they
    /// were carried from) before CRIU runs; without it they are not put back.
    pub files_to: Option<PathBuf>,
    /// The restorer's own CRIU choices, over what the checkpoint asks for.
    pub criu: RestoreCriu,
}

/// CRIU options a restore chooses itself, over those the checkpoint's manifest records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreCriu {
    /// Connections dumped established come back closed (`--tcp-close`): what a restore on
    /// another host needs.
    pub tcp_close: bool,
    /// `--manage-cgroups MODE` [default: the dump's].
    pub manage_cgroups: Option<CgroupMode>,
    /// `--network-lock METHOD` [default: the dump's].
    pub network_lock: Option<NetworkLock>,
    /// `--external` resources in the restore's spelling (`mnt[KEY]:PATH`, …); needed when the
    /// dump declared some.
    pub external: Vec<String>,
}

impl RestoreCriu {
    /// What CRIU is asked for: the manifest's options with these over them. A dump that
    /// declared external resources needs them named again (in the restore's spelling).
    pub fn over(&self, m: &ManifestCriu, path: &Path) -> Result<CriuOptions, RestoreError> {
        let mut o = m.restore_options();
        if self.tcp_close && o.tcp == TcpMode::Established {
            o.tcp = TcpMode::Close;
        }
        o.manage_cgroups = self.manage_cgroups.or(o.manage_cgroups);
        o.network_lock = self.network_lock.or(o.network_lock);
        if !m.external.is_empty() && self.external.is_empty() {
            return Err(RestoreError::ExternalsNeeded {
                path: path.to_path_buf(),
                declared: m.external.join(" "),
            });
        }
        o.external = self.external.clone();
        o.check().map_err(|e| RestoreError::Options {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(o)
    }
}

/// The result of a successful restore.
#[derive(Clone, Debug, Serialize)]
pub struct RestoreOutcome {
    /// PID of the restored tree's root, in this machine's PID namespace.
    pub pid: i32,
    pub archive: PathBuf,
    #[serde(with = "millis")]
    pub verify_time: Duration,
    #[serde(with = "millis")]
    pub criu_time: Duration,
    /// From the restore's start until CRIU had the tree running again.
    #[serde(with = "millis")]
    pub running_after: Duration,
    /// CRIU read the page images from the archive as it went ([`crate::streamer`]), not
    /// from copies.
    pub streamed: bool,
    pub manifest: Manifest,
}

/// Errors of a restore.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error("archive {path} was made on a CPU whose features this machine lacks{model}; restore it on a machine with the same CPU features\n  {source}")]
    Cpu {
        path: PathBuf,
        source: Box<CriuError>,
        model: String,
    },
    #[error("archive {path} holds no cpuinfo.img (CRIU's description of the CPU it was taken on): it is incomplete or was not made by `cedana-agent dump`; restore an earlier checkpoint or take a new one")]
    NoCpuInfo { path: PathBuf },
    #[error("restore of {path} failed: {source}{kept}")]
    Criu {
        path: PathBuf,
        source: Box<CriuError>,
        kept: String,
    },
    #[error("archive {path} holds a process that must get back its PID {pid}, which {holder} uses now; stop that process, or start tasks with `cedana-agent exec` (own PID namespace) so restores need no particular PID")]
    PidTaken {
        path: PathBuf,
        pid: i32,
        holder: String,
    },
    #[error("cannot create a staging folder in {path}: {source}; set CEDANA_STAGING_DIR to a writable folder")]
    Staging {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(Box<cedana_store::StoreError>),
    /// A chunk of a checkpoint read chunk by chunk ([`crate::lazy`]).
    #[error(transparent)]
    Chunk(ChunkError),
    #[error("archive {path} was dumped with external resources ({declared}): name each again with --external in the restore's spelling (a mount dumped as mnt[PATH]:KEY is restored with mnt[KEY]:PATH); nothing was changed")]
    ExternalsNeeded { path: PathBuf, declared: String },
    #[error("restore of {path}: {reason}")]
    Options { path: PathBuf, reason: String },
    #[error("archive {path}: {source}")]
    Files {
        path: PathBuf,
        source: crate::files::FilesError,
    },
}

/// Verifies `opts.archive`, checks the CPU, then restores. Nothing outside a private staging
/// folder is touched before the archive has passed every check, but for CRIU building the tree
/// while it reads page images streamed from the archive ([`streams`]): a refused image fails
/// CRIU, which kills the tree before it ever ran.
pub fn restore(
    criu: &Criu,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreOutcome, RestoreError> {
    let path = &opts.archive;
    let t0 = Instant::now();
    let manifest = archive::inspect(path)?;
    let staging_root = staging_root_for(opts)?;
    // Held with a read lease while its page images are streamed from it.
    let leased = match streams(&manifest, opts) {
        true => leased(path),
        false => None,
    };
    let (extracted, pages) =
        archive::extract_leaving_pages(path, &staging_root, leased.is_some(), progress)
            .inspect_err(|_| progress.finish())?;
    let failed_log = failed_log_path(path);
    let (Some(file), false) = (leased, pages.is_empty()) else {
        return restore_extracted(criu, extracted, opts, t0.elapsed(), &failed_log, progress);
    };
    let server =
        crate::streamer::ImageServer::new(path, file, extracted.images_dir(), pages, progress);
    run_streamed(criu, extracted, &server, opts, t0, &failed_log, progress)
}

/// `path` open with a read lease ([`crate::streamer::lease`]), or why not (then the page
/// images are copied out and checked before CRIU runs, as without streaming).
fn leased(path: &Path) -> Option<std::fs::File> {
    let file = std::fs::File::open(path).ok()?;
    match crate::streamer::lease(&file) {
        Ok(()) => Some(file),
        Err(e) => {
            info!(archive = %path.display(), error = %e, "no read lease on the archive (open for writing, or a filesystem without leases): its page images are copied out and checked first");
            None
        }
    }
}

/// CRIU's restore of `extracted` (its small images checked into the staging folder), every
/// image read through `server` (`criu restore --stream`). CRIU starts while the CPU is
/// checked and the carried files go back; it is answered only once they are done, so nothing
/// is restored on a CPU that cannot run it. `t0`: when the restore began.
pub(crate) fn run_streamed(
    criu: &Criu,
    extracted: archive::Extracted,
    server: &crate::streamer::ImageServer<'_, RestoreError>,
    opts: &RestoreOptions,
    t0: Instant,
    failed_log: &Path,
    progress: &dyn Progress,
) -> Result<RestoreOutcome, RestoreError> {
    let path = &opts.archive;
    let req = request(&extracted, opts, progress)?;
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<bool>(1);
    let ready_rx = std::sync::Mutex::new(ready_rx);
    let (checked, result, verify_time, criu_time) = std::thread::scope(|s| {
        let extracted = &extracted;
        // Owns the sender: however it ends (a panic too), CRIU's side stops waiting.
        let checker = s.spawn(move || {
            let r = check_cpu(criu, extracted, opts, progress)
                .and_then(|()| put_back(extracted, opts, progress));
            let _ = ready_tx.send(r.is_ok());
            (r, t0.elapsed())
        });
        let t1 = Instant::now();
        let result = criu.restore_streamed(&req, &|conn| {
            let ready = ready_rx.lock().expect("not poisoned").recv();
            if ready == Ok(true) {
                progress.stage(
                    "restoring with CRIU (memory read as it goes)",
                    Some(server.page_bytes()),
                );
                server.serve(conn);
            }
        });
        let criu_time = t1.elapsed();
        let (checked, verify_time) = checker.join().expect("checks do not panic");
        (checked, result, verify_time, criu_time)
    });
    let running_after = t0.elapsed();
    progress.finish();
    checked?;
    match result {
        Ok(pid) => {
            if let Some(e) = server.failure() {
                // CRIU cannot finish without the bytes a refused image holds back; should it
                // have, the tree does not run on.
                for p in crate::process::descendants(pid).into_iter().rev() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                return Err(e);
            }
            info!(pid, archive = %path.display(), ?verify_time, ?criu_time, streamed = true, "restored");
            let mut out = outcome(pid, extracted.manifest, opts, verify_time, criu_time);
            out.running_after = running_after;
            out.streamed = true;
            Ok(out)
        }
        // A page image that failed its check is why CRIU failed.
        Err(source) => match server.failure() {
            Some(e) => Err(e),
            None => Err(criu_failed(path, &req, source, failed_log)),
        },
    }
}

/// Whether a full restore of a checkpoint with this manifest hands CRIU its page images as it
/// reads them (`criu restore --stream`, see [`crate::streamer`]) rather than from copies
/// checked beforehand: yes unless
/// - files are to be put back: they go back before CRIU reads the memory, and nothing outside
///   the staging folder may change before every byte of the checkpoint was checked;
/// - the tree has a user namespace of its own (its restore needs CRIU's RPC);
/// - `CEDANA_RESTORE_STREAM=0`.
pub(crate) fn streams(m: &Manifest, opts: &RestoreOptions) -> bool {
    let puts_back =
        opts.files_to.is_some() && m.files.as_ref().is_some_and(|f| !f.items.is_empty());
    !puts_back
        && !m.criu.user_namespace
        && std::env::var("CEDANA_RESTORE_STREAM").as_deref() != Ok("0")
}

/// Where a restore of `opts.archive` stages (created): `opts.staging`, else
/// `$CEDANA_STAGING_DIR`, else next to the archive when that folder is writable, else the
/// temp folder.
pub fn staging_root_for(opts: &RestoreOptions) -> Result<PathBuf, RestoreError> {
    let near = opts
        .archive
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let fallback = if tempfile::tempfile_in(near).is_ok() {
        near.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let root = staging::root(opts.staging.as_deref(), &fallback);
    std::fs::create_dir_all(&root).map_err(|source| RestoreError::Staging {
        path: root.clone(),
        source,
    })?;
    Ok(root)
}

/// The rest of a restore once the archive was verified and extracted (by
/// [`archive::extract`] or [`archive::extract_stream`]): the CPU check, the carried files put
/// back (to `opts.files_to`), CRIU. `opts.archive` names the archive in errors; CRIU's log is
/// kept at `failed_log` if it fails.
pub fn restore_extracted(
    criu: &Criu,
    extracted: archive::Extracted,
    opts: &RestoreOptions,
    verify_time: Duration,
    failed_log: &Path,
    progress: &dyn Progress,
) -> Result<RestoreOutcome, RestoreError> {
    let req = prepare(criu, &extracted, opts, progress)?;
    run_criu(criu, &req, opts, verify_time, failed_log, progress)
        .map(|(pid, criu_time)| outcome(pid, extracted.manifest, opts, verify_time, criu_time))
}

/// What comes before CRIU in [`restore_extracted`]: the CPU check, the carried files put
/// back, the tree's PIDs free; CRIU's request.
pub(crate) fn prepare(
    criu: &Criu,
    extracted: &archive::Extracted,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreRequest, RestoreError> {
    let req = request(extracted, opts, progress)?;
    check_cpu(criu, extracted, opts, progress)?;
    put_back(extracted, opts, progress)?;
    Ok(req)
}

/// [`prepare`] once [`check_cpu`] passed (a caller that ran it alongside other work).
pub(crate) fn prepare_cpu_checked(
    extracted: &archive::Extracted,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreRequest, RestoreError> {
    let req = request(extracted, opts, progress)?;
    put_back(extracted, opts, progress)?;
    Ok(req)
}

/// CRIU's request for `extracted`: its options checked, its CPU description present.
fn request(
    extracted: &archive::Extracted,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreRequest, RestoreError> {
    let path = &opts.archive;
    let images = extracted.images_dir();
    let m = &extracted.manifest;
    let criu_opts = opts.criu.over(&m.criu, path)?;
    if !images.join(criu::images::CPUINFO_IMG).is_file() {
        progress.finish();
        return Err(RestoreError::NoCpuInfo { path: path.clone() });
    }
    Ok(RestoreRequest {
        images_dir: images,
        shell_job: m.criu.shell_job,
        user_namespace: m.criu.user_namespace,
        user_namespace_mounts: m.criu.user_namespace_mounts.clone(),
        criu: criu_opts,
        as_sibling: opts.as_child,
        lazy_pages: false,
    })
}

/// This machine's CPU as CRIU describes it (`criu cpuinfo dump`'s image), once
/// [`describe_this_cpu`] has run.
static THIS_CPU: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();

/// Takes this machine's CPU description, on a thread of its own (a daemon does at start): a
/// checkpoint described the same, byte for byte, needs no CRIU check before it is restored
/// here (CRIU's check compares that description with this CPU: it would pass). Where it
/// fails, every restore is checked by CRIU.
pub fn describe_this_cpu(criu: &Criu) {
    let criu = criu.clone();
    std::thread::spawn(move || {
        let Ok(dir) = tempfile::Builder::new().prefix(".cedana-cpu-").tempdir() else {
            return;
        };
        let described = criu
            .cpuinfo_dump(dir.path())
            .map_err(|e| e.to_string())
            .and_then(|()| {
                std::fs::read(dir.path().join(criu::images::CPUINFO_IMG)).map_err(|e| e.to_string())
            });
        match described {
            Ok(bytes) => {
                let _ = THIS_CPU.set(bytes);
            }
            Err(e) => {
                tracing::debug!(error = %e, "no description of this CPU: every restore is checked by CRIU")
            }
        }
    });
}

/// Whether the CPU description in `images` is this machine's ([`describe_this_cpu`]).
fn described_here(images: &Path) -> bool {
    THIS_CPU.get().is_some_and(|here| {
        std::fs::read(images.join(criu::images::CPUINFO_IMG)).is_ok_and(|b| b == *here)
    })
}

/// CRIU's word on whether this CPU can run the checkpoint.
pub(crate) fn check_cpu(
    criu: &Criu,
    extracted: &archive::Extracted,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<(), RestoreError> {
    progress.stage("checking CPU compatibility", None);
    let images = extracted.images_dir();
    if described_here(&images) {
        tracing::debug!("the checkpoint's CPU is this machine's, as CRIU describes them");
        return Ok(());
    }
    let Err(source) = criu.cpuinfo_check(&images) else {
        return Ok(());
    };
    progress.finish();
    let model = match &extracted.manifest.cpu {
        Some(c) => format!(
            " (it was taken on {} family {} model {})",
            c.model_name, c.family, c.model
        ),
        None => String::new(),
    };
    Err(RestoreError::Cpu {
        path: opts.archive.clone(),
        source: Box::new(source),
        model,
    })
}

/// The first changes to the system: the carried files put back; then the tree's PIDs must be
/// free.
fn put_back(
    extracted: &archive::Extracted,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<(), RestoreError> {
    let path = &opts.archive;
    let m = &extracted.manifest;
    if let (Some(files), Some(to)) = (&m.files, &opts.files_to) {
        progress.stage("putting back the carried files", None);
        info!(to = %to.display(), items = files.items.len(), "putting back carried files");
        crate::files::put_back(files, &extracted.files_dir(), to).map_err(|source| {
            RestoreError::Files {
                path: path.clone(),
                source,
            }
        })?;
    }
    if !m.criu.pid_namespace {
        wait_for_free_pids(path, &m.process.tree_pids)?;
    }
    Ok(())
}

/// CRIU's restore of `req`: the restored tree's PID and how long CRIU took. CRIU's log is kept
/// at `failed_log` if it fails.
pub(crate) fn run_criu(
    criu: &Criu,
    req: &RestoreRequest,
    opts: &RestoreOptions,
    verify_time: Duration,
    failed_log: &Path,
    progress: &dyn Progress,
) -> Result<(i32, Duration), RestoreError> {
    let path = &opts.archive;
    progress.stage("restoring with CRIU", None);
    let t1 = Instant::now();
    let result = criu.restore(req, &mut |_| {});
    progress.finish();
    match result {
        Ok(pid) => {
            let criu_time = t1.elapsed();
            info!(pid, archive = %path.display(), ?verify_time, ?criu_time, lazy = req.lazy_pages, "restored");
            Ok((pid, criu_time))
        }
        Err(source) => Err(criu_failed(path, req, source, failed_log)),
    }
}

/// CRIU's failure to restore `req`, its log kept at `failed_log`.
fn criu_failed(
    path: &Path,
    req: &RestoreRequest,
    source: CriuError,
    failed_log: &Path,
) -> RestoreError {
    let kept = keep_log(&req.images_dir.join(criu::RESTORE_LOG), failed_log);
    RestoreError::Criu {
        path: path.to_path_buf(),
        source: Box::new(source),
        kept,
    }
}

pub(crate) fn outcome(
    pid: i32,
    manifest: Manifest,
    opts: &RestoreOptions,
    verify_time: Duration,
    criu_time: Duration,
) -> RestoreOutcome {
    RestoreOutcome {
        pid,
        archive: opts.archive.clone(),
        verify_time,
        criu_time,
        running_after: verify_time + criu_time,
        streamed: false,
        manifest,
    }
}

/// A tree restored outside its own PID namespace gets its original PIDs back. A just-killed
/// tree's orphans can linger as zombies until init reaps them (seconds on some machines), so
/// wait a little before calling a PID taken.
fn wait_for_free_pids(path: &Path, pids: &[i32]) -> Result<(), RestoreError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let taken = pids
            .iter()
            .copied()
            .find(|p| Path::new(&format!("/proc/{p}")).exists());
        match taken {
            None => return Ok(()),
            Some(pid) if Instant::now() >= deadline => {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                let holder = format!("process {pid} ({})", comm.trim());
                return Err(RestoreError::PidTaken {
                    path: path.to_path_buf(),
                    pid,
                    holder,
                });
            }
            Some(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// `<archive>.restore-failed.log` next to the archive, or in the temp folder if that is
/// read-only.
pub fn failed_log_path(archive: &Path) -> PathBuf {
    let name = format!(
        "{}.restore-failed.log",
        archive
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "archive".into())
    );
    let dir = archive
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let probe = tempfile::tempfile_in(dir);
    if probe.is_ok() {
        dir.join(name)
    } else {
        std::env::temp_dir().join(name)
    }
}

/// Why a chunk could not be had.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkTrouble {
    /// It is not where the manifest says it is.
    Missing,
    /// It is there but is not what its name says.
    Damaged,
    /// Its store did not answer.
    Unreachable,
}

/// A chunk that could not be had: names it and the checkpoint it belongs to.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{}", self.describe())]
pub struct ChunkError {
    pub chunk: String,
    /// The checkpoint: `STORE/NAME` or the archive's path.
    pub checkpoint: String,
    pub trouble: ChunkTrouble,
    pub reason: String,
}

impl ChunkError {
    fn describe(&self) -> String {
        match self.trouble {
            ChunkTrouble::Missing => format!(
                "checkpoint {}: chunk {} is missing{}; that checkpoint cannot be restored, use an earlier one",
                self.checkpoint,
                self.chunk,
                match self.reason.is_empty() {
                    true => String::new(),
                    false => format!(" ({})", self.reason),
                }
            ),
            ChunkTrouble::Damaged => format!(
                "checkpoint {}: chunk {} is damaged ({}); that checkpoint cannot be restored, use an earlier one",
                self.checkpoint, self.chunk, self.reason
            ),
            ChunkTrouble::Unreachable => format!(
                "checkpoint {}: chunk {} could not be read: {}",
                self.checkpoint, self.chunk, self.reason
            ),
        }
    }
}

#[cfg(test)]
mod cpu_tests {
    use super::*;

    /// Only a description equal byte for byte to this machine's skips CRIU's check; one bit
    /// off, or none at all, and CRIU decides.
    #[test]
    fn only_this_machines_own_cpu_description_skips_the_check() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join(criu::images::CPUINFO_IMG);
        assert!(!described_here(dir.path()), "no description of either");
        let here = b"a CPU description as CRIU writes it".to_vec();
        THIS_CPU.set(here.clone()).unwrap();
        assert!(!described_here(dir.path()), "the checkpoint has none");
        std::fs::write(&img, &here).unwrap();
        assert!(described_here(dir.path()));
        let mut other = here.clone();
        other[3] ^= 1;
        std::fs::write(&img, &other).unwrap();
        assert!(!described_here(dir.path()));
        std::fs::write(&img, &here[..here.len() - 1]).unwrap();
        assert!(!described_here(dir.path()));
    }
}
