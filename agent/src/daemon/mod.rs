//! `cedana-agent daemon`: a worker that takes commands over NATS JetStream.
//!
//! It connects with a token (never without one), registers in the `cedana_workers` KV bucket,
//! heartbeats, and serves the commands of [`cedana_protocol`] one at a time from a durable
//! JetStream consumer, so commands sent while it was away or reconnecting are not lost. Each
//! reply is stored in `cedana_replies` before the command is acknowledged: a repeated command
//! id is answered from there, not run again. Checkpoints stream into the `cedana_checkpoints`
//! object store while they are made and are verified and extracted as they come back out
//! ([`crate::objstore`], [`crate::archive::extract_stream`]). The daemon is a child
//! subreaper and reaps every child itself, so the exit codes of tasks it starts or restores
//! are known and reported.
//!
//! With [`DaemonOptions::spot`] it also polls EC2 instance metadata (IMDSv2, [`crate::imds`])
//! in a task of its own: on a spot interruption notice it checkpoints every running task right
//! away (left running, through the same path as the `checkpoint` command) and publishes
//! [`cedana_protocol::Event::SpotNotice`] with the checkpoints; a rebalance recommendation is
//! only reported. Each is acted on once. CRIU runs one dump or restore at a time, so a
//! notice's checkpoints and a command's take turns; each archive streams into the object store
//! while its dump runs.
//!
//! This file holds [`run`] (connect, register, serve commands) and [`DaemonError`]; the rest
//! is in its own files: `options` ([`DaemonOptions`]), `worker` (the command handling),
//! `reaper` (the only `waitpid`), `events` (publishing events until stored), `logs` (task
//! log tailing), `heartbeat`, `spot` (the spot watcher), `prefetch` and `receive`
//! (checkpoints read back from the object store).

mod events;
mod heartbeat;
mod lease;
mod logs;
mod options;
mod prefetch;
mod reaper;
mod receive;
mod spot;
mod worker;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use tracing::{info, warn};

use cedana_protocol::{self as protocol, ensure_layout, Layout, WorkerRecord};

use self::events::{json, Events};
use self::heartbeat::heartbeat;
use self::reaper::Reaper;
use self::spot::watch_spot;
use self::worker::Worker;
use crate::archive;
use crate::criu::Criu;
use crate::imds::{self, Imds};
use crate::objstore;

/// How long the server waits for a command's ack before it delivers it again; a running
/// command renews it every third of it.
const ACK_WAIT: Duration = Duration::from_secs(20);

pub use self::options::{DaemonOptions, SpotOptions, CHECKPOINTS_DIR, TASKS_DIR};
pub use self::reaper::ExitStatus;

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("no NATS token: set CEDANA_NATS_TOKEN (or connection.auth_token in the config); the agent never connects without one")]
    NoToken,
    #[error("job id {0:?} or worker id is not usable: use letters, digits, - and _ (at most 64)")]
    BadId(String),
    #[error("NATS at {url} refused the token (authorization violation); check CEDANA_NATS_TOKEN against the server's")]
    Auth { url: String },
    #[error("checkpoint bucket {0:?} is not usable: use letters, digits, - and _ (at most 200)")]
    BadBucket(String),
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error(
        "NATS JetStream at {url}: {what}: {reason}; is JetStream enabled on the server (-js)?"
    )]
    JetStream {
        url: String,
        what: &'static str,
        reason: String,
    },
    #[error("cannot use work folder {path}: {source}")]
    WorkDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Imds(#[from] imds::ImdsError),
}

/// Runs the daemon until `shutdown` resolves or the connection is lost for good.
pub async fn run(
    opts: DaemonOptions,
    criu: Criu,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    if opts.token.is_empty() {
        return Err(DaemonError::NoToken);
    }
    for id in [&opts.job, &opts.worker] {
        if !protocol::valid_id(id) {
            return Err(DaemonError::BadId(id.clone()));
        }
    }
    if !protocol::valid_bucket(&opts.bucket) {
        return Err(DaemonError::BadBucket(opts.bucket.clone()));
    }
    std::fs::create_dir_all(&opts.work_dir).map_err(|source| DaemonError::WorkDir {
        path: opts.work_dir.clone(),
        source,
    })?;
    // A bad endpoint is a bad command line; an absent IMDS is not an error (no notices).
    let imds = match &opts.spot {
        Some(spot) => Some((Imds::new(&spot.endpoint)?, spot.poll)),
        None => None,
    };
    let reaper = Reaper::start();
    let url = opts.nats_url.clone();
    let client = protocol::NatsCredential::parse(&opts.token)
        .connect_options()
        .name(format!("cedana-agent {}/{}", opts.job, opts.worker))
        .connection_timeout(Duration::from_secs(10))
        .connect(protocol::NatsUrl::parse(&url).servers().to_vec())
        .await
        .map_err(|e| match e.kind() {
            async_nats::ConnectErrorKind::AuthorizationViolation => {
                DaemonError::Auth { url: url.clone() }
            }
            _ => DaemonError::Connect {
                url: url.clone(),
                reason: e.to_string(),
            },
        })?;
    let js = jetstream::new(client.clone());
    let jerr = |what: &'static str| {
        let url = url.clone();
        move |e: &dyn std::fmt::Display| DaemonError::JetStream {
            url: url.clone(),
            what,
            reason: e.to_string(),
        }
    };
    let Layout {
        commands,
        workers,
        replies,
    } = ensure_layout(&js)
        .await
        .map_err(|e| jerr(e.what)(&e.reason))?;
    let checkpoints = protocol::ensure_checkpoints(&js, &opts.bucket)
        .await
        .map_err(|e| jerr(e.what)(&e.reason))?;
    let checkpoints = objstore::Bucket::open(&js, checkpoints, &opts.bucket)
        .await
        .map_err(|e| jerr("opening the checkpoint store")(&e))?;

    // Restores of checkpoints taken on a CPU like this one skip CRIU's separate check.
    crate::restore::describe_this_cpu(&criu);
    let record = WorkerRecord {
        v: protocol::VERSION,
        job: opts.job.clone(),
        worker: opts.worker.clone(),
        hostname: archive::host_info().hostname,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        criu_version: criu.version().map(|v| v.to_string()).unwrap_or_default(),
        started_at: protocol::now(),
        last_heartbeat: protocol::now(),
        pid: std::process::id(),
    };
    let key = protocol::worker_key(&opts.job, &opts.worker);
    // A bucket just made on a cluster may have no leader yet ("no stream found"): the
    // registration is tried again for a while before the daemon gives up.
    let mut tries = 0u32;
    loop {
        match workers.put(&key, json(&record)).await {
            Ok(_) => break,
            Err(e) if tries < 30 => {
                tries += 1;
                warn!(error = %e, "cannot register yet; trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(jerr("registering the worker")(&e)),
        }
    }
    info!(job = %opts.job, worker = %opts.worker, url = %url, "registered");

    let consumer_name = protocol::command_consumer(&opts.job, &opts.worker);
    let consumer_config = consumer::pull::Config {
        durable_name: Some(consumer_name.clone()),
        filter_subject: protocol::commands_subject(&opts.job, &opts.worker),
        ack_policy: consumer::AckPolicy::Explicit,
        // Short, with progress acks while a command runs (below): a command delivered to a
        // previous run's outstanding pull request (a daemon killed and started again) comes
        // back within this, not after the longest command.
        ack_wait: ACK_WAIT,
        ..Default::default()
    };
    let consumer: consumer::PullConsumer = commands
        .get_or_create_consumer(&consumer_name, consumer_config.clone())
        .await
        .map_err(|e| jerr("creating the command consumer")(&e))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| jerr("reading commands")(&e))?;

    let events = Arc::new(Events::new(js.clone(), &opts.job, &opts.worker));
    let worker = Arc::new(Worker::new(
        opts.clone(),
        criu,
        events,
        replies,
        checkpoints,
        reaper,
    ));
    let adopted = worker.adopt_tasks();
    if !adopted.is_empty() {
        info!(tasks = ?adopted, "took back the tasks of the previous run");
    }
    let lease = tokio::spawn(lease::keep_lease(worker.clone(), workers.clone()));
    let hb = tokio::spawn(heartbeat(worker.clone(), workers, record));
    let spot = imds.map(|(imds, poll)| tokio::spawn(watch_spot(worker.clone(), imds, poll)));
    tokio::pin!(shutdown);
    let mut errors = 0u32;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            msg = messages.next() => {
                let anew = match msg {
                    Some(Ok(msg)) => {
                        errors = 0;
                        // While the command runs, the server is told it is in progress.
                        let handling = worker.handle(&msg.payload);
                        tokio::pin!(handling);
                        let mut tick = tokio::time::interval(ACK_WAIT / 3);
                        tick.tick().await;
                        loop {
                            tokio::select! {
                                _ = &mut handling => break,
                                _ = tick.tick() => {
                                    let _ = msg.ack_with(jetstream::AckKind::Progress).await;
                                }
                            }
                        }
                        if let Err(e) = msg.ack().await {
                            warn!(error = %e, "ack failed; the command may be delivered again and answered from the stored reply");
                        }
                        false
                    }
                    Some(Err(e)) => {
                        errors += 1;
                        warn!(error = %e, "command stream error");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        errors >= 5
                    }
                    None => true,
                };
                // The stream of commands ended or keeps failing (the server restarted, its
                // store failed): read them anew; the daemon never gives up (its tasks run on).
                if anew {
                    warn!("the command stream ended; reading commands anew");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    match commands
                        .get_or_create_consumer(&consumer_name, consumer_config.clone())
                        .await
                    {
                        Ok(c) => match c.messages().await {
                            Ok(m) => {
                                messages = m;
                                errors = 0;
                            }
                            Err(e) => warn!(error = %e, "cannot read commands yet"),
                        },
                        Err(e) => warn!(error = %e, "cannot reach the command consumer yet"),
                    }
                }
            }
        }
    }
    hb.abort();
    lease.abort();
    if let Some(spot) = spot {
        spot.abort();
    }
    info!("daemon stopping");
    Ok(())
}
