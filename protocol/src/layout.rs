//! The NATS layout both sides make if it is missing: the command and event streams, the KV
//! buckets and the checkpoint object store; and [`publish_stored`], the one way both sides
//! publish into a stream.

use async_nats::jetstream::{self, kv, object_store, stream};
use tracing::warn;

use crate::names::{
    events_subjects, COMMANDS_STREAM, COMMANDS_SUBJECTS, EVENTS_STREAM, REPLIES_BUCKET,
    WORKERS_BUCKET,
};

/// What could not be made, and why.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct LayoutError {
    /// The step: "creating the commands stream", "creating a KV bucket", ...
    pub what: &'static str,
    pub reason: String,
}

/// The streams and buckets of the layout (a job's checkpoints are in a bucket of their own:
/// [`ensure_checkpoints`]).
pub struct Layout {
    pub commands: stream::Stream,
    pub workers: kv::Store,
    pub replies: kv::Store,
}

/// Creates the streams and buckets if they are missing (the driver and every daemon call it).
/// On a cluster (the server says it is part of one) they are made with three replicas, so the
/// job survives the loss of a node; where the cluster is too small for that, with one.
pub async fn ensure_layout(js: &jetstream::Context) -> Result<Layout, LayoutError> {
    let clustered = js.client().server_info().cluster.is_some();
    let fail = |what| move |reason| LayoutError { what, reason };
    let commands = replicated(clustered, |replicas| {
        js.get_or_create_stream(stream::Config {
            name: COMMANDS_STREAM.into(),
            subjects: vec![COMMANDS_SUBJECTS.into()],
            num_replicas: replicas,
            ..Default::default()
        })
    })
    .await
    .map_err(fail("creating the commands stream"))?;
    replicated(clustered, |replicas| {
        js.get_or_create_stream(stream::Config {
            name: EVENTS_STREAM.into(),
            subjects: events_subjects(),
            num_replicas: replicas,
            ..Default::default()
        })
    })
    .await
    .map_err(fail("creating the events stream"))?;
    let workers = kv_bucket(js, WORKERS_BUCKET, clustered).await?;
    let replies = kv_bucket(js, REPLIES_BUCKET, clustered).await?;
    Ok(Layout {
        commands,
        workers,
        replies,
    })
}

/// The checkpoint object store `bucket` ([`crate::job_checkpoints_bucket`]), made as
/// [`ensure_layout`] makes its buckets if it is missing (by the driver: a worker may not make
/// one).
pub async fn ensure_checkpoints(
    js: &jetstream::Context,
    bucket: &str,
) -> Result<object_store::ObjectStore, LayoutError> {
    if let Ok(s) = js.get_object_store(bucket).await {
        return Ok(s);
    }
    let clustered = js.client().server_info().cluster.is_some();
    replicated(clustered, |replicas| {
        js.create_object_store(object_store::Config {
            bucket: bucket.into(),
            num_replicas: replicas,
            ..Default::default()
        })
    })
    .await
    .map_err(|reason| LayoutError {
        what: "creating the checkpoint store",
        reason,
    })
}

/// The KV bucket `name` (one value per key), made as [`ensure_layout`] makes its buckets if
/// it is missing.
pub async fn ensure_kv(
    js: &jetstream::Context,
    name: &'static str,
) -> Result<kv::Store, LayoutError> {
    kv_bucket(js, name, js.client().server_info().cluster.is_some()).await
}

/// `make(3)` on a cluster, then `make(1)` if that failed (a cluster of fewer than three
/// nodes); `make(1)` on a single server.
async fn replicated<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
    clustered: bool,
    make: impl Fn(usize) -> F,
) -> Result<T, String> {
    if clustered {
        match make(3).await {
            Ok(x) => return Ok(x),
            Err(e) => {
                warn!(error = %e, "cannot keep three replicas on this cluster; keeping one (the loss of a node can lose the job)")
            }
        }
    }
    make(1).await.map_err(|e| e.to_string())
}

async fn kv_bucket(
    js: &jetstream::Context,
    name: &'static str,
    clustered: bool,
) -> Result<kv::Store, LayoutError> {
    match js.get_key_value(name).await {
        Ok(s) => Ok(s),
        Err(_) => replicated(clustered, |replicas| {
            js.create_key_value(kv::Config {
                bucket: name.into(),
                history: 1,
                num_replicas: replicas,
                ..Default::default()
            })
        })
        .await
        .map_err(|reason| LayoutError {
            what: "creating a KV bucket",
            reason,
        }),
    }
}

/// Publishes `payload` to JetStream with message id `msg_id` and waits until it is stored. A
/// retry with the same id is dropped by JetStream as a duplicate, so callers may retry freely.
pub async fn publish_stored(
    js: &jetstream::Context,
    subject: String,
    payload: bytes::Bytes,
    msg_id: &str,
) -> Result<(), String> {
    js.send_publish(
        subject,
        jetstream::message::PublishMessage::build()
            .payload(payload)
            .message_id(msg_id),
    )
    .await
    .map_err(|e| e.to_string())?
    .await
    .map(|_| ())
    .map_err(|e| e.to_string())
}
