//! Prefetches ([`cedana_protocol::Command::Prefetch`]): a checkpoint read while another worker
//! still stores it (an [`objstore::Follow`] of its chunks), verified and extracted as it
//! arrives, finished once a restore hands over the stored object's info.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use async_nats::jetstream::object_store;
use tokio::sync::oneshot;
use tracing::debug;

use crate::archive;
use crate::objstore;
use crate::progress::NoProgress;

/// Checkpoints being read while another worker stores them, by chunks id.
#[derive(Default)]
pub(super) struct Prefetches {
    reading: Mutex<HashMap<String, Prefetch>>,
}

/// A checkpoint being read while it is stored: where to hand its info once stored, and the
/// reading, which ends with the extracted archive.
pub(super) struct Prefetch {
    info: oneshot::Sender<object_store::ObjectInfo>,
    done: tokio::task::JoinHandle<Result<archive::Extracted, String>>,
}

impl Prefetch {
    /// Hands over the stored object's `info` and waits for the reading to end.
    pub(super) async fn finish(
        self,
        info: object_store::ObjectInfo,
    ) -> Result<archive::Extracted, String> {
        let _ = self.info.send(info);
        self.done.await.map_err(|e| e.to_string()).and_then(|r| r)
    }
}

impl Prefetches {
    /// Starts reading the checkpoint whose chunks are `chunks` from `bucket` into `staging`,
    /// unless it is being read already.
    pub(super) fn start(&self, bucket: &objstore::Bucket, chunks: &str, staging: PathBuf) {
        let mut prefetches = self.reading.lock().expect("prefetches");
        // Those that ended without a restore (their writer failed or nobody asked) go.
        prefetches.retain(|_, p| !p.done.is_finished());
        if prefetches.contains_key(chunks) {
            return;
        }
        let follow = bucket.follow(chunks);
        let (tx, mut rx) = follow.channel(false);
        let (info_tx, info_rx) = oneshot::channel();
        let label = PathBuf::from(format!("the checkpoint with chunks {chunks}"));
        let extract = tokio::task::spawn_blocking(move || {
            archive::extract_stream(&mut rx, &label, &Default::default(), &staging, &NoProgress)
        });
        let id = chunks.to_string();
        let done = tokio::spawn(async move {
            let pumped = follow.pump(info_rx, tx).await;
            let extracted = extract.await.map_err(|e| e.to_string())?;
            pumped.map_err(|e| e.to_string())?;
            let x = extracted.map_err(|e| e.to_string())?;
            debug!(chunks = %id, "prefetched checkpoint read whole");
            Ok(x)
        });
        prefetches.insert(
            chunks.to_string(),
            Prefetch {
                info: info_tx,
                done,
            },
        );
        debug!(chunks = %chunks, "prefetching a checkpoint as it is stored");
    }

    /// The prefetch of the checkpoint whose chunks are `chunks`, if one was started; taken.
    pub(super) fn take(&self, chunks: &str) -> Option<Prefetch> {
        self.reading.lock().expect("prefetches").remove(chunks)
    }
}
