//! The spot watcher: with [`super::SpotOptions`], EC2 instance metadata (IMDSv2,
//! [`crate::imds`]) polled in a task of its own. On a spot interruption notice every running
//! task is checkpointed right away (left running, through the same path as the `checkpoint`
//! command) and [`Event::SpotNotice`] published with the checkpoints; a rebalance
//! recommendation is only reported. Each is acted on once.

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};

use cedana_protocol::{Compression, Event, Reply, SpotCheckpoint, SpotFailure, SpotKind};

use super::worker::Worker;
use crate::imds::{self, Imds};

/// Polls instance metadata every `poll` until an interruption notice was acted on. IMDS
/// failures are logged (the first at `warn`, repeats at `debug`) and never stop the daemon.
pub(super) async fn watch_spot(w: Arc<Worker>, mut imds: Imds, poll: Duration) {
    info!(endpoint = %imds.endpoint(), poll_ms = poll.as_millis() as u64, "watching for spot notices");
    let mut rebalance_seen = false;
    let mut failing = false;
    loop {
        let polled = async {
            if let Some(notice) = imds.instance_action().await? {
                return Ok(Some(notice));
            }
            if !rebalance_seen {
                if let Some(r) = imds.rebalance().await? {
                    rebalance_seen = true;
                    warn!(notice_time = ?r.notice_time, "rebalance recommendation: the instance is at elevated risk of interruption");
                    w.events
                        .publish(Event::SpotNotice {
                            kind: SpotKind::Rebalance,
                            action: None,
                            at: r.notice_time,
                            checkpoints: Vec::new(),
                            failed: Vec::new(),
                        })
                        .await;
                }
            }
            Ok::<_, imds::ImdsError>(None)
        };
        match polled.await {
            Ok(Some(notice)) => {
                spot_interruption(&w, notice).await;
                info!("spot interruption notice acted on; no more polling");
                return;
            }
            Ok(None) => {
                if failing {
                    info!(endpoint = %imds.endpoint(), "instance metadata answers again");
                    failing = false;
                }
            }
            Err(e) if !failing => {
                warn!(error = %e, "instance metadata not available; spot notices are not seen until it is (polling on)");
                failing = true;
            }
            Err(e) => debug!(error = %e, "instance metadata still not available"),
        }
        tokio::time::sleep(poll).await;
    }
}

/// A spot interruption notice: checkpoints every running task right away (left running,
/// with the work folder; the dumps take turns, each streaming into the object store) and
/// publishes the notice with the checkpoints.
async fn spot_interruption(w: &Arc<Worker>, notice: imds::InstanceAction) {
    let tasks: Vec<String> = w
        .tasks()
        .iter()
        .filter(|(_, t)| !t.checkpointed)
        .map(|(name, _)| name.clone())
        .collect();
    warn!(action = %notice.action, time = ?notice.time, tasks = ?tasks,
        "spot interruption notice: checkpointing every task now");
    let results = futures::future::join_all(tasks.into_iter().map(|task| async move {
        let r = w
            .checkpoint(
                task.clone(),
                true,
                Compression::Zstd,
                None,
                super::worker::How {
                    criu: super::worker::task_criu_options(),
                    post_copy: false,
                },
            )
            .await;
        (task, r)
    }))
    .await;
    let (mut checkpoints, mut failed) = (Vec::new(), Vec::new());
    for (task, result) in results {
        match result {
            Ok(Reply::Checkpointed {
                object, manifest, ..
            }) => checkpoints.push(SpotCheckpoint {
                task,
                object,
                manifest,
            }),
            Ok(other) => failed.push(SpotFailure {
                task,
                message: format!("unexpected outcome {other:?}"),
            }),
            Err(message) => {
                // A task that ended or was stopped by a command's checkpoint meanwhile is
                // not a failure: there is nothing left to save.
                let running = w.tasks().get(&task).is_some_and(|t| !t.checkpointed);
                if running {
                    warn!(task = %task, error = %message, "checkpoint on the spot notice failed");
                    failed.push(SpotFailure { task, message });
                } else {
                    info!(task = %task, "task ended before its checkpoint on the spot notice");
                }
            }
        }
    }
    info!(
        checkpoints = checkpoints.len(),
        failed = failed.len(),
        "spot notice handled"
    );
    w.events
        .publish(Event::SpotNotice {
            kind: SpotKind::InstanceAction,
            action: Some(notice.action),
            at: notice.time,
            checkpoints,
            failed,
        })
        .await;
}
