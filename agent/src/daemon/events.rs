//! [`Events`]: what the daemon tells the driver (replies, logs, exits, heartbeats, spot
//! notices), published to JetStream and retried until stored, each with a message id that
//! makes a retry a duplicate JetStream drops.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use tracing::warn;

use cedana_protocol::{self as protocol, Event, EventEnvelope};

/// Publishes the events of one worker of one job.
pub(super) struct Events {
    js: jetstream::Context,
    job: String,
    worker: String,
    /// Numbers events for their message ids.
    next_event: AtomicU64,
    /// Distinguishes this run of the daemon from earlier ones (message ids stay unique).
    incarnation: String,
}

impl Events {
    pub(super) fn new(js: jetstream::Context, job: &str, worker: &str) -> Self {
        Events {
            js,
            job: job.to_string(),
            worker: worker.to_string(),
            next_event: Default::default(),
            incarnation: format!("{}-{}", std::process::id(), protocol::now()),
        }
    }

    /// Publishes `event` on the worker's logs or state subject.
    pub(super) async fn publish(&self, event: Event) {
        let subject = match event {
            Event::Log { .. } => protocol::logs_subject(&self.job, &self.worker),
            _ => protocol::state_subject(&self.job, &self.worker),
        };
        let env = EventEnvelope {
            v: protocol::VERSION,
            job: self.job.clone(),
            worker: self.worker.clone(),
            at: protocol::now(),
            event,
        };
        let payload = json(&env);
        // Retrying cannot make a message fit: say so at once (log events are cut to fit; a
        // server set to a tiny limit could still refuse one).
        let limit = self.js.client().server_info().max_payload;
        if limit > 0 && payload.len() > limit {
            warn!(
                bytes = payload.len(),
                limit,
                "event larger than the NATS server's max_payload; dropped (raise max_payload)"
            );
            return;
        }
        // Retried until JetStream stores it (the server may be restarting); the message id makes
        // a retry of an event that was stored after all a duplicate JetStream drops.
        let n = self.next_event.fetch_add(1, Ordering::Relaxed);
        let msg_id = format!("{}.{}.{}.{n}", self.job, self.worker, self.incarnation);
        for attempt in 0..240u32 {
            match protocol::publish_stored(&self.js, subject.clone(), payload.clone(), &msg_id)
                .await
            {
                Ok(_) => return,
                Err(e) => {
                    if attempt % 10 == 0 {
                        warn!(error = %e, attempt, "event not stored by JetStream yet; retrying");
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        warn!("event dropped after two minutes of retries");
    }
}

/// A wire message (an event, a reply, the worker's record) as the JSON bytes NATS carries.
pub(super) fn json(value: &impl serde::Serialize) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("serializes"))
}
