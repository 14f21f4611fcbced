//! cedana-agent: checkpoint and restore Linux process trees with CRIU.
//!
//! The binary (`main.rs`) is argument parsing and output over this library; tests call the
//! library directly. See ARCHITECTURE.md for the map.

pub mod archive;
pub mod capture;
pub mod check;
pub mod chunked;
pub mod chunkzip;
pub mod criu;
pub mod daemon;
pub mod dump;
pub mod exec;
pub mod files;
pub mod guard;
pub mod hashing;
pub mod imds;
pub mod lazy;
pub mod minroot;
pub mod objstore;
pub mod process;
pub mod progress;
pub mod restore;
pub mod staging;
pub mod streamer;
pub mod zipfmt;

use std::path::{Path, PathBuf};

pub use archive::{host_info, Manifest};
pub use cedana_protocol::{CgroupMode, Compression, Config, CriuOptions, NetworkLock};
pub use criu::Criu;
pub use dump::{dump, DumpOptions, DumpOutcome, TcpMode};
pub use restore::{restore, RestoreCriu, RestoreOptions, RestoreOutcome};

/// Environment variable naming the CRIU binary.
pub const CRIU_ENV: &str = "CEDANA_CRIU";

/// Finds CRIU: `flag`, else `$CEDANA_CRIU`, else `criu.path` from the config, else the usual
/// places.
pub fn locate_criu(flag: Option<&Path>, config: &Config) -> Result<Criu, criu::CriuError> {
    let env = std::env::var_os(CRIU_ENV).map(PathBuf::from);
    let explicit = flag
        .map(Path::to_path_buf)
        .or(env)
        .or_else(|| config.criu.path.clone());
    Criu::locate(explicit.as_deref())
}
