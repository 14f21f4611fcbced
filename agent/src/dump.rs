//! `dump`: checkpoint a process tree with CRIU into a new archive.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::{info, warn};

use crate::archive::{self, ArchiveError, Compression, Manifest, ManifestCriu, ManifestProcess};
use crate::criu::{self, images, Criu, CriuError, DumpRequest};
use crate::process::{ProcessError, ProcessInfo};
use crate::progress::Progress;
use crate::{host_info, staging};

/// What happens to established TCP connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TcpMode {
    /// A tree with established connections cannot be dumped (CRIU's default).
    #[default]
    Refuse,
    /// Dump them with their state (`tcp_established`); restore needs the same addresses.
    Established,
    /// Close them on restore (`tcp_close`).
    Close,
}

/// Options of a dump.
#[derive(Clone, Debug)]
pub struct DumpOptions {
    pub pid: i32,
    /// Folder the archive goes into.
    pub dir: PathBuf,
    pub leave_running: bool,
    pub compression: Compression,
    pub tcp: TcpMode,
    /// Let CRIU dump connections to unix sockets outside the tree.
    pub ext_unix_sk: bool,
    /// Where CRIU writes images before they are archived (see [`staging::root`]).
    pub staging: Option<PathBuf>,
}

/// The result of a successful dump.
#[derive(Clone, Debug, Serialize)]
pub struct DumpOutcome {
    pub archive: PathBuf,
    pub archive_bytes: u64,
    pub images_bytes: u64,
    #[serde(with = "millis")]
    pub criu_time: Duration,
    #[serde(with = "millis")]
    pub archive_time: Duration,
    pub manifest: Manifest,
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
    #[error("checkpoint of PID {pid} ({name}) failed: {source}{kept}")]
    Criu {
        pid: i32,
        name: String,
        source: Box<CriuError>,
        kept: String,
    },
    #[error(transparent)]
    Archive(#[from] ArchiveError),
}

/// Dumps `opts.pid` and its descendants into `opts.dir/<name>_<YYYYMMDD_HHMMSS>.zip`.
///
/// On failure no archive is created, nothing in `opts.dir` is replaced, and CRIU's log is
/// kept in `opts.dir` as `<name>_<time>.dump-failed.log` and quoted in the error.
pub fn dump(
    criu: &Criu,
    opts: &DumpOptions,
    progress: &dyn Progress,
) -> Result<DumpOutcome, DumpError> {
    if !opts.dir.is_dir() {
        return Err(DumpError::NoDir {
            path: opts.dir.clone(),
        });
    }
    let info = ProcessInfo::inspect(opts.pid)?;
    let stamp = crate::timestamp();
    let stem = format!("{}_{}", info.file_stem(), stamp.file);
    let staging_root = staging::root(opts.staging.as_deref(), info.tree_rss_bytes, &opts.dir);
    let work = tempfile::Builder::new()
        .prefix("cedana-dump-")
        .tempdir_in(&staging_root)
        .map_err(|source| DumpError::Staging {
            path: staging_root.clone(),
            source,
        })?;
    let shell_job = info.needs_shell_job();
    let req = DumpRequest {
        pid: opts.pid,
        images_dir: work.path().to_path_buf(),
        leave_running: opts.leave_running,
        tcp_established: opts.tcp == TcpMode::Established,
        tcp_close: opts.tcp == TcpMode::Close,
        shell_job,
        ext_unix_sk: opts.ext_unix_sk,
    };
    info!(pid = opts.pid, name = %info.name, images = %work.path().display(), shell_job, "dumping");
    progress.stage("checkpointing with CRIU", Some(info.tree_rss_bytes));
    let version = criu
        .version()
        .map_err(|source| criu_err(&info, source, String::new()))?;
    let t0 = Instant::now();
    if let Err(source) = dump_watching(criu, &req, progress) {
        let kept = keep_log(
            &work.path().join(criu::DUMP_LOG),
            &opts.dir.join(format!("{stem}.dump-failed.log")),
        );
        progress.finish();
        return Err(criu_err(&info, source, kept));
    }
    let criu_time = t0.elapsed();

    let cpu = match criu
        .cpuinfo_dump(work.path())
        .map_err(|e| e.to_string())
        .and_then(|()| images::read_cpuinfo(work.path()).map_err(|e| e.to_string()))
    {
        Ok(c) => Some(c),
        Err(e) => {
            warn!(error = %e, "no CPU description in the dump");
            None
        }
    };
    // The tree as CRIU saw it: /proc, read before the dump, can miss short-lived children.
    let (tree_size, tree_pids) = match images::read_pstree(work.path()) {
        Ok(entries) => {
            let pids: std::collections::BTreeSet<i32> = entries
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
    };
    let mut files: Vec<(String, PathBuf)> = std::fs::read_dir(work.path())
        .map_err(|source| DumpError::Staging {
            path: work.path().to_path_buf(),
            source,
        })?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
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
    files.sort();
    let images_bytes = files
        .iter()
        .filter_map(|(_, p)| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let mut manifest = Manifest {
        format_version: archive::FORMAT_VERSION,
        created_at: stamp.rfc3339,
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
            version: version.to_string(),
            shell_job,
            tcp_established: req.tcp_established,
            tcp_close: req.tcp_close,
            ext_unix_sk: req.ext_unix_sk,
            pid_namespace: info.pid_namespace_init,
        },
        cpu,
        compression: opts.compression,
        entries: Vec::new(),
    };
    let t1 = Instant::now();
    let dest = write_unique(
        &opts.dir,
        &stem,
        &mut manifest,
        &files,
        opts.compression,
        progress,
    )?;
    let archive_time = t1.elapsed();
    progress.finish();
    let archive_bytes = std::fs::metadata(&dest).map(|m| m.len()).unwrap_or(0);
    info!(archive = %dest.display(), archive_bytes, ?criu_time, ?archive_time, "dump complete");
    Ok(DumpOutcome {
        archive: dest,
        archive_bytes,
        images_bytes,
        criu_time,
        archive_time,
        manifest,
    })
}

/// Runs CRIU's dump while a watcher reports the images' growth as progress.
fn dump_watching(criu: &Criu, req: &DumpRequest, progress: &dyn Progress) -> Result<(), CriuError> {
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut reported = 0u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let now = dir_bytes(&req.images_dir);
                if now > reported {
                    progress.advance(now - reported);
                    reported = now;
                }
                std::thread::sleep(Duration::from_millis(150));
            }
        });
        let r = criu.dump(req, &mut |_| {});
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        r
    })
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

/// Writes the archive as `stem.zip`, or `stem_N.zip` when that name is taken: never replaces.
fn write_unique(
    dir: &Path,
    stem: &str,
    manifest: &mut Manifest,
    files: &[(String, PathBuf)],
    compression: Compression,
    progress: &dyn Progress,
) -> Result<PathBuf, ArchiveError> {
    for n in 0..1000 {
        let name = if n == 0 {
            format!("{stem}.zip")
        } else {
            format!("{stem}_{n}.zip")
        };
        let dest = dir.join(name);
        if dest.exists() {
            continue;
        }
        match archive::write(&dest, manifest, files, compression, progress) {
            Err(ArchiveError::Write { source, .. })
                if source.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                continue
            }
            r => return r.map(|()| dest),
        }
    }
    Err(ArchiveError::Write {
        path: dir.join(format!("{stem}.zip")),
        source: std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "1000 archives with this name already exist",
        ),
    })
}

fn criu_err(info: &ProcessInfo, source: CriuError, kept: String) -> DumpError {
    DumpError::Criu {
        pid: info.pid,
        name: info.name.clone(),
        source: Box::new(source),
        kept,
    }
}

/// Copies CRIU's log to `dest`; returns a sentence for the error message.
pub(crate) fn keep_log(log: &Path, dest: &Path) -> String {
    match std::fs::copy(log, dest) {
        Ok(_) => format!("\n  full CRIU log kept at {}", dest.display()),
        Err(_) => String::new(),
    }
}

pub(crate) mod millis {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u128(d.as_millis())
    }
}
