//! Where CRIU's images are written before they go into an archive, and extracted to before a
//! restore.
//!
//! By default on the same filesystem as the archive: there a page image can become the archive
//! without a copy (see `zipfmt::write::ZipOut::adopt`), and no memory is spent on a second copy of a
//! large process. (On the machines this was measured on, tmpfs was also slower to fill than
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
