//! Receiving a checkpoint from the object store for a restore: verified and extracted as it
//! arrives, taken from a prefetch of its chunks if one was started, or (an archive that cannot
//! be read front to back) downloaded into a file first.

use std::path::{Path, PathBuf};

use tracing::{info, warn};

use super::prefetch::Prefetches;
use crate::archive::{self, ArchiveError};
use crate::objstore;
use crate::progress::NoProgress;

/// Fetches `object` from the object store, verifying and extracting it under `staging` as
/// it arrives, or takes it from a prefetch of its chunks if one was started. An archive
/// that cannot be read front to back (from an older agent) is downloaded into a file and
/// read from there. True with the archive if it came from a prefetch.
pub(super) async fn receive(
    checkpoints: &objstore::Bucket,
    prefetches: &Prefetches,
    object: &str,
    staging: &Path,
) -> Result<(archive::Extracted, bool), String> {
    let label = PathBuf::from(object);
    let fetch = checkpoints.fetch(object).await?;
    if let Some(p) = prefetches.take(&fetch.info.nuid) {
        match p.finish(fetch.info.clone()).await {
            Ok(x) => {
                info!(object = %object, bytes = fetch.info.size, "checkpoint received (read while it was stored)");
                return Ok((x, true));
            }
            Err(e) => {
                warn!(object = %object, error = %e, "reading the checkpoint while it was stored failed; reading it again");
            }
        }
    }
    let sizes = fetch.stored_sizes();
    let (tx, mut rx) = fetch.channel(false);
    let (into, name) = (staging.to_path_buf(), label.clone());
    let extract = tokio::task::spawn_blocking(move || {
        archive::extract_stream(&mut rx, &name, &sizes, &into, &NoProgress)
    });
    let size = fetch.info.size as u64;
    if let Ok(bytes) = fetch.pump(tx).await {
        if bytes == size {
            info!(object = %object, bytes, "checkpoint received");
        }
    }
    match extract.await.map_err(|e| e.to_string())? {
        Ok(x) => return Ok((x, false)),
        Err(ArchiveError::Unstreamable { .. }) => {
            info!(object = %object, "archive from an older agent: downloading it before reading it");
        }
        Err(e) => return Err(e.to_string()),
    }
    let tmp = tempfile::Builder::new()
        .prefix(".download-")
        .suffix(".zip")
        .tempfile_in(staging)
        .map_err(|e| format!("cannot write in {}: {e}", staging.display()))?;
    let (file, path) = tmp.into_parts();
    objstore::download(checkpoints.fetch(object).await?, file)
        .await
        .map_err(|e| format!("cannot download {object}: {e}"))?;
    let staging = staging.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let x = extract_file(&path, &staging);
        drop(path);
        x
    })
    .await
    .map_err(|e| e.to_string())?
    .map(|x| (x, false))
    .map_err(|e| e.relabel(&label).to_string())
}

/// Verifies the archive file at `path` and extracts it under `staging`.
pub(super) fn extract_file(
    path: &Path,
    staging: &Path,
) -> Result<archive::Extracted, ArchiveError> {
    archive::inspect(path)?;
    archive::extract(path, staging, &NoProgress)
}
