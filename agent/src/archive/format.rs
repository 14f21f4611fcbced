//! The archive format: what a checkpoint archive holds and how it is named. `manifest.json`
//! ([`Manifest`] and its parts), the entry names allowed ([`safe_entry_name`]), the [`Digest`]
//! of an entry, and [`ArchiveError`], the errors of writing and reading archives (the zip
//! layer's [`ZipError`] maps into it).

use std::path::{Path, PathBuf};

use cedana_protocol::{CgroupMode, CriuOptions, NetworkLock, TcpMode};
use serde::{Deserialize, Serialize};

use crate::criu::images::CpuInfo;
use crate::files::{self, ManifestFiles};
use crate::zipfmt::ZipError;

/// The manifest format this agent writes and the only one it restores.
pub const FORMAT_VERSION: u32 = 1;
/// Name of the manifest entry.
pub const MANIFEST: &str = "manifest.json";

/// The bytes of `manifest.json` for `manifest`, as an archive holds them.
pub fn manifest_bytes(manifest: &Manifest) -> Vec<u8> {
    serde_json::to_vec_pretty(manifest).expect("manifest serializes")
}

/// The SHA-256 (hex) of a manifest's bytes: what pins a checkpoint (its manifest lists every
/// entry's SHA-256), named in a restore command so that a replaced checkpoint is refused.
pub fn manifest_sha256(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Folder of CRIU's images inside the archive.
pub const IMAGES_DIR: &str = "images";

/// Errors writing or reading an archive. Each names the archive.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("cannot open archive {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("archive {path} is corrupt or truncated ({reason}); it cannot be restored, use an earlier checkpoint")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "archive {path} has no manifest.json; it was not written by cedana-agent or is damaged"
    )]
    NoManifest { path: PathBuf },
    #[error("archive {path} has an unreadable manifest.json: {reason}")]
    BadManifest { path: PathBuf, reason: String },
    #[error("archive {path} has manifest format version {found}, this agent reads version {FORMAT_VERSION}; restore it with a cedana-agent of the matching version")]
    UnsupportedVersion { path: PathBuf, found: u64 },
    #[error("archive {path} has an unsafe entry name {name:?} (absolute, `..`, outside images/ and files/, or longer than a file name may be); refusing to restore it")]
    UnsafeEntry { path: PathBuf, name: String },
    #[error("archive {path} holds entry {name:?}, which its manifest does not list; refusing to restore it")]
    UnlistedEntry { path: PathBuf, name: String },
    #[error("archive {path} lacks entry {name:?} that its manifest lists; it is incomplete")]
    MissingEntry { path: PathBuf, name: String },
    #[error("archive {path}: entry {name:?} has {what} {actual}, the manifest says {expected}; the archive was altered or damaged")]
    Mismatch {
        path: PathBuf,
        name: String,
        what: &'static str,
        expected: String,
        actual: String,
    },
    #[error("checkpoint {path} is not the one its worker stored: its manifest's SHA-256 is {got}, the worker wrote {want}; it was replaced after it was stored (by whoever may write the checkpoint store); refusing to restore it")]
    Replaced {
        path: PathBuf,
        want: String,
        got: String,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("archive {path} cannot be read front to back: its stored entry {name:?} has no size in its header (written by an older agent); read it from a file")]
    Unstreamable { path: PathBuf, name: String },
    #[error("archive {path} expands to {need} bytes, but {staging} has {free} free; free space there or set CEDANA_STAGING_DIR to a folder with room (nothing was written)")]
    NoRoom {
        path: PathBuf,
        need: u64,
        free: u64,
        staging: PathBuf,
    },
    #[error("archive {path} expands past {limit} bytes at entry {name:?}, more than the staging folder's filesystem has free (less a twentieth kept free); free space there or set CEDANA_STAGING_DIR to a folder with room (nothing was kept)")]
    TooLarge {
        path: PathBuf,
        name: String,
        limit: u64,
    },
    #[error("cannot read {path}: {source}")]
    ReadInput {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ArchiveError {
    /// The same error naming the archive `label` (say, the object a downloaded file came from).
    pub fn relabel(mut self, label: &Path) -> Self {
        use ArchiveError::*;
        match &mut self {
            Open { path, .. }
            | Corrupt { path, .. }
            | NoManifest { path }
            | BadManifest { path, .. }
            | UnsupportedVersion { path, .. }
            | UnsafeEntry { path, .. }
            | UnlistedEntry { path, .. }
            | MissingEntry { path, .. }
            | Mismatch { path, .. }
            | Replaced { path, .. }
            | Unstreamable { path, .. }
            | NoRoom { path, .. }
            | TooLarge { path, .. } => *path = label.to_path_buf(),
            // The file written or read is what these are about.
            Write { .. } | ReadInput { .. } => {}
        }
        self
    }
}

impl From<ZipError> for ArchiveError {
    fn from(e: ZipError) -> Self {
        match e {
            ZipError::Corrupt { path, reason } => ArchiveError::Corrupt { path, reason },
            ZipError::Write { path, source } => ArchiveError::Write { path, source },
            ZipError::Unstreamable { path, name } => ArchiveError::Unstreamable { path, name },
            ZipError::TooLarge { path, name, limit } => {
                ArchiveError::TooLarge { path, name, limit }
            }
        }
    }
}

pub use cedana_protocol::Compression;

/// Size and checksum of one archive entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    pub size: u64,
    /// In an archive (format 1) made before BLAKE3.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sha256: String,
    /// In an archive (format 1): the checksum checked when there is one (see
    /// [`Entry::checksum`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub blake3: String,
    /// In a store (format 2, [`crate::chunked`]): the entry's chunks in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<Vec<cedana_store::ChunkRef>>,
}

impl Entry {
    /// The checksum an archive's entry is checked against: its BLAKE3 if it has one, else its
    /// SHA-256.
    pub fn checksum(&self) -> (crate::hashing::Alg, &str) {
        match self.blake3.is_empty() {
            false => (crate::hashing::Alg::Blake3, &self.blake3),
            true => (crate::hashing::Alg::Sha256, &self.sha256),
        }
    }
}

/// The process a checkpoint holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestProcess {
    pub name: String,
    pub pid: i32,
    pub cmdline: Vec<String>,
    pub cwd: PathBuf,
    pub exe: Option<PathBuf>,
    /// Processes in the dumped tree.
    pub tree_size: usize,
    /// Their PIDs, root first: a tree outside its own PID namespace needs them free on restore.
    #[serde(default)]
    pub tree_pids: Vec<i32>,
    pub rss_bytes: u64,
}

/// The machine a checkpoint was taken on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestHost {
    pub hostname: String,
    pub kernel: String,
    pub arch: String,
}

/// This machine, for manifests.
pub fn host_info() -> ManifestHost {
    let uts = nix::sys::utsname::uname().ok();
    ManifestHost {
        hostname: uts
            .as_ref()
            .map(|u| u.nodename().to_string_lossy().into_owned())
            .unwrap_or_default(),
        kernel: uts
            .as_ref()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        arch: std::env::consts::ARCH.to_string(),
    }
}

/// The CRIU that wrote the images and the options they need on restore.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestCriu {
    pub version: String,
    pub shell_job: bool,
    pub tcp_established: bool,
    pub tcp_close: bool,
    pub ext_unix_sk: bool,
    /// The tree was the init of its own PID namespace (restorable side by side).
    pub pid_namespace: bool,
    /// The tree had a user namespace and a minimal mount tree of its own (`exec --userns`):
    /// CRIU restores it from such a tree too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub user_namespace: bool,
    /// Its tree's mounts besides `/`, `/dev`, `/dev/shm` and `/proc`: the restore binds the
    /// same paths of its own tree.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_namespace_mounts: Vec<PathBuf>,
    /// `--manage-cgroups` mode of the dump; the restore uses it too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manage_cgroups: Option<CgroupMode>,
    /// `--network-lock` method of the dump; the restore unlocks with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_lock: Option<NetworkLock>,
    /// Resources the dump declared external (`--external`): the restore must name them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external: Vec<String>,
}

impl ManifestCriu {
    /// What the restore needs, before the restorer's own choices.
    pub fn restore_options(&self) -> CriuOptions {
        CriuOptions {
            tcp: if self.tcp_established {
                TcpMode::Established
            } else if self.tcp_close {
                TcpMode::Close
            } else {
                TcpMode::Refuse
            },
            ext_unix_sk: self.ext_unix_sk,
            manage_cgroups: self.manage_cgroups,
            network_lock: self.network_lock,
            external: self.external.clone(),
            ..CriuOptions::default()
        }
    }
}

/// `manifest.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub agent_version: String,
    pub process: ManifestProcess,
    pub host: ManifestHost,
    pub criu: ManifestCriu,
    pub cpu: Option<CpuInfo>,
    pub compression: Compression,
    /// Every entry but the manifest itself.
    pub entries: Vec<Entry>,
    /// The folder the checkpoint carries (its files are the `files/` entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<ManifestFiles>,
}

impl Manifest {
    /// Total uncompressed size of the entries.
    pub fn total_size(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }
}

/// Size, CRC-32 and SHA-256 of a file's contents, computed while it was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digest {
    pub size: u64,
    pub crc: u32,
    pub sha256: String,
}

/// Checks that an entry name is a plain relative path under `images/` or `files/` (or is the
/// manifest).
pub fn safe_entry_name(name: &str) -> bool {
    if name == MANIFEST {
        return true;
    }
    if name.is_empty() || name.starts_with('/') || name.contains('\\') || name.contains('\0') {
        return false;
    }
    let mut parts = name.split('/');
    let top = parts.next();
    if top != Some(IMAGES_DIR) && top != Some(files::FILES_DIR) {
        return false;
    }
    let rest: Vec<&str> = parts.collect();
    // Each part must be a file name this machine can make (255 bytes), the whole a path.
    name.len() <= 1024
        && !rest.is_empty()
        && rest
            .iter()
            .all(|p| !p.is_empty() && *p != "." && *p != ".." && p.len() <= 255)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names() {
        for ok in ["manifest.json", "images/core-1.img", "images/sub/x"] {
            assert!(safe_entry_name(ok), "{ok}");
        }
        for bad in [
            "/etc/passwd",
            "../x",
            "images/../../x",
            "images/",
            "images//x",
            "x.img",
            "images\\x",
            "images/./x",
            "",
        ] {
            assert!(!safe_entry_name(bad), "{bad}");
        }
    }
}
