//! Where CRIU's images are written before they go into an archive (and extracted before a
//! restore): memory-backed `/dev/shm` when it has room to spare, else a folder on disk.

use std::path::{Path, PathBuf};

use procfs::Current;

/// Environment variable naming the staging folder explicitly.
pub const STAGING_ENV: &str = "CEDANA_STAGING_DIR";
const SHM: &str = "/dev/shm";

/// Picks the staging root for `bytes` of images: `explicit`, else `$CEDANA_STAGING_DIR`, else
/// `/dev/shm` if both it and the machine's available memory have room for twice the images,
/// else `fallback` (a folder on disk, usually next to the archive).
pub fn root(explicit: Option<&Path>, bytes: u64, fallback: &Path) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os(STAGING_ENV) {
        return PathBuf::from(p);
    }
    let need = bytes.saturating_mul(2).saturating_add(64 << 20);
    let shm_free = nix::sys::statvfs::statvfs(SHM)
        .map(|s| s.blocks_available() * s.fragment_size())
        .unwrap_or(0);
    let mem_free = procfs::Meminfo::current()
        .ok()
        .and_then(|m| m.mem_available)
        .unwrap_or(0);
    if shm_free >= need && mem_free >= need {
        PathBuf::from(SHM)
    } else {
        fallback.to_path_buf()
    }
}
