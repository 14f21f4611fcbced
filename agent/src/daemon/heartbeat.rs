//! Heartbeats: every [`super::DaemonOptions::heartbeat`], the worker's record in the
//! `cedana_workers` KV bucket gets a fresh `last_heartbeat`, and an [`Event::Heartbeat`] names
//! the tasks running here.

use std::sync::Arc;

use async_nats::jetstream::kv;
use tracing::warn;

use cedana_protocol::{self as protocol, Event, WorkerRecord};

use super::events::json;
use super::worker::Worker;

/// Heartbeats until aborted.
pub(super) async fn heartbeat(w: Arc<Worker>, workers: kv::Store, mut record: WorkerRecord) {
    let key = protocol::worker_key(&w.opts.job, &w.opts.worker);
    loop {
        tokio::time::sleep(w.opts.heartbeat).await;
        record.last_heartbeat = protocol::now();
        if let Err(e) = workers.put(&key, json(&record)).await {
            warn!(error = %e, "heartbeat failed");
        }
        let tasks = w.tasks().keys().cloned().collect();
        w.events.publish(Event::Heartbeat { tasks }).await;
    }
}
