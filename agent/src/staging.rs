//! Where CRIU's images are written before they go into an archive, and extracted to before a
//! restore.
//!
//! By default on the same filesystem as the archive: page images that cannot go straight into
//! it (see [`crate::capture`]) can become the archive without a copy there (see
//! `zipfmt::write::ZipOut::adopt`), and no memory is spent on a second copy of a large process. (On the machines this was measured on, tmpfs was also slower to fill than
//! the disk's page cache.)

use std::path::{Path, PathBuf};

/// Environment variable naming the staging folder explicitly.
pub const STAGING_ENV: &str = "CEDANA_STAGING_DIR";

/// The staging root: `explicit`, else `$CEDANA_STAGING_DIR`, else `default`.
pub fn root(explicit: Option<&Path>, default: &Path) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os(STAGING_ENV) {
        return PathBuf::from(p);
    }
    default.to_path_buf()
}

/// The name of the lock file inside a staging folder in use.
pub const LOCK: &str = ".lock";

/// A staging folder of one dump or restore, held (a `flock` on its `.lock`) for as long as
/// this value lives: a sweep tells a folder a live agent uses from one a killed agent left.
#[derive(Debug)]
pub struct Held {
    dir: tempfile::TempDir,
    _lock: std::fs::File,
}

impl Held {
    /// Makes a new folder named `prefix…` in `root` and holds it.
    pub fn create(root: &Path, prefix: &str) -> std::io::Result<Held> {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir_in(root)?;
        let lock = std::fs::File::create(dir.path().join(LOCK))?;
        lock.try_lock().map_err(std::io::Error::other)?;
        Ok(Held { dir, _lock: lock })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Keeps the folder (not removed on drop, no longer held); its path.
    pub fn keep(self) -> PathBuf {
        let _ = std::fs::remove_file(self.dir.path().join(LOCK));
        self.dir.keep()
    }
}

/// What an agent names its staging folders and partial archives with.
const OURS: [&str; 2] = [".cedana-dump-", ".cedana-restore-"];

/// Removes what killed agents left in `dir`: staging folders no live agent holds, and
/// partial archives (`.<name>.partial`) and downloads no writer holds open. Returns what was
/// removed. Bounded: the first 10,000 entries of `dir` are looked at.
pub fn sweep(dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for e in first_entries(dir) {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        let Ok(t) = e.file_type() else { continue };
        let stale = if t.is_dir() && OURS.iter().any(|p| name.starts_with(p)) {
            match std::fs::File::open(path.join(LOCK)) {
                // Held by a live agent: its lock cannot be taken.
                Ok(f) => f.try_lock().is_ok(),
                // Made before the lock was: old enough to be nobody's.
                Err(_) => older_than(&path, std::time::Duration::from_secs(3600)),
            }
        } else if t.is_file() && name.starts_with('.') && name.ends_with(".partial") {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .is_ok_and(|f| f.try_lock().is_ok())
        } else if t.is_file() && name.starts_with(".download-") {
            // Read again by path after it was written: only an old one is nobody's.
            older_than(&path, std::time::Duration::from_secs(3600))
        } else {
            false
        };
        if !stale {
            continue;
        }
        let gone = if t.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        if gone.is_ok() {
            tracing::info!(path = %path.display(), "removed what a killed agent left");
            removed.push(path);
        }
    }
    removed
}

/// What a killed agent (or CRIU under it) can leave in the temporary folder: the folder a
/// minimal mount tree is built on (`exec --userns`, a restore into a user namespace; see
/// [`crate::minroot`]) and CRIU's yard for tmpfs mounts. Both are empty seen from here (their
/// mounts live in the task's own mount namespace) and are removed by the agent that made them
/// once it is done.
const YARDS: [&str; 2] = [".cedana-root-", "cr-tmpfs."];

/// How old a yard must be to be nobody's: a tree is built and CRIU's yard used within seconds.
pub const YARD_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes the empty yards ([`YARDS`]) in `dir` (the temporary folder) older than `age`, which
/// killed agents left; a folder with anything in it is left alone. Returns what was removed.
/// Bounded: the first 10,000 entries of `dir` are looked at.
pub fn sweep_yards(dir: &Path, age: std::time::Duration) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for e in first_entries(dir) {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if !YARDS.iter().any(|p| name.starts_with(p))
            || !e.file_type().is_ok_and(|t| t.is_dir())
            || !older_than(&path, age)
        {
            continue;
        }
        // Only an empty folder goes (rmdir refuses anything else).
        if std::fs::remove_dir(&path).is_ok() {
            tracing::info!(path = %path.display(), "removed the empty yard a killed agent left");
            removed.push(path);
        }
    }
    removed
}

/// The first 10,000 entries of `dir` (none if it cannot be read): what a sweep looks at.
fn first_entries(dir: &Path) -> impl Iterator<Item = std::fs::DirEntry> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .take(10_000)
}

fn older_than(path: &Path, age: std::time::Duration) -> bool {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|e| e > age)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sets `path`'s modification time `secs` seconds back.
    fn age(path: &Path, secs: i64) {
        let t = nix::sys::time::TimeSpec::new(
            nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME)
                .unwrap()
                .tv_sec()
                - secs,
            0,
        );
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            path,
            &t,
            &t,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
    }

    #[test]
    fn only_old_empty_yards_are_swept() {
        let tmp = tempfile::tempdir().unwrap();
        let d = |n: &str| {
            let p = tmp.path().join(n);
            std::fs::create_dir(&p).unwrap();
            p
        };
        let old_root = d(".cedana-root-a1");
        let old_criu = d("cr-tmpfs.Xy12ab");
        let fresh = d(".cedana-root-b2");
        let busy = d(".cedana-root-c3");
        std::fs::write(busy.join("f"), b"x").unwrap();
        let other = d("cr-something-else");
        for p in [&old_root, &old_criu, &busy, &other] {
            age(p, 7200);
        }
        let mut gone = sweep_yards(tmp.path(), YARD_AGE);
        gone.sort();
        assert_eq!(gone, vec![old_root.clone(), old_criu.clone()]);
        assert!(!old_root.exists() && !old_criu.exists());
        assert!(fresh.exists(), "a yard in use now is kept");
        assert!(busy.exists(), "a folder with something in it is kept");
        assert!(other.exists(), "only the yards' names");
    }
}
