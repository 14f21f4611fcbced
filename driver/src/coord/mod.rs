//! The driver's side of the wire protocol: sends commands to workers and routes their events
//! (replies to the waiting caller, task output to stdout, exits to whoever waits on a task).

pub mod control;
pub mod nats;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use cedana_protocol::{self as protocol, Command, CommandEnvelope, Event, EventEnvelope, Reply};
use futures::StreamExt;
use tokio::sync::{oneshot, watch};

/// Errors talking to workers.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("NATS: {0}")]
    Nats(String),
    #[error("worker {worker} did not answer command {id} within {secs} s")]
    Timeout {
        worker: String,
        id: String,
        secs: u64,
    },
    #[error("worker {worker} did not register within {secs} s")]
    NotRegistered { worker: String, secs: u64 },
    #[error("worker {worker} was lost ({reason}) while running command {id}")]
    Lost {
        worker: String,
        id: String,
        reason: String,
    },
}

/// How a task ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// Ended by its worker because its lazy restore failed (the checkpoint cannot be
    /// trusted): why.
    pub restore_failed: Option<String>,
}

#[derive(Default)]
struct Routes {
    replies: HashMap<String, oneshot::Sender<Reply>>,
    exits: HashMap<String, watch::Sender<Option<Exit>>>,
    /// Post-copy checkpoints, by `worker/object`: stored (their bytes) or failed (why).
    stored: HashMap<String, watch::Sender<Option<Result<u64, String>>>>,
    /// When each worker was last heard from.
    seen: HashMap<String, std::time::Instant>,
    /// Spot notices per worker, in order.
    spot: HashMap<String, Vec<SpotNotice>>,
}

/// A spot notice a worker reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpotNotice {
    pub kind: protocol::SpotKind,
    /// When the instance goes (RFC 3339), if IMDS said.
    pub at: Option<String>,
    /// The checkpoints taken because of the notice.
    pub checkpoints: Vec<protocol::SpotCheckpoint>,
    /// Tasks whose checkpoint failed.
    pub failed: Vec<String>,
}

/// A connection to the job's NATS, with the event router running.
#[derive(Clone)]
pub struct Coordinator {
    pub job: String,
    pub client: async_nats::Client,
    js: jetstream::Context,
    workers: jetstream::kv::Store,
    replies: jetstream::kv::Store,
    jobs: jetstream::kv::Store,
    routes: Arc<Mutex<Routes>>,
    /// Where task output is appended (the job's output log), besides stdout.
    output: Arc<Mutex<Option<Output>>>,
    next_id: Arc<std::sync::atomic::AtomicU64>,
    prefix: String,
    /// Whether the job's NATS server stores what it is sent (see [`Coordinator::silence`]).
    health: Arc<Mutex<Health>>,
    /// The stream sequence of the next event to read (kept in the job's record, so that a
    /// resumed driver reads on from there).
    next_seq: Arc<std::sync::atomic::AtomicU64>,
    /// The sequence of the newest log event written to the output file.
    output_seq: Arc<std::sync::atomic::AtomicU64>,
    /// The stream's last sequence when the driver connected.
    backlog: u64,
    /// Set when another controller took the job over.
    superseded: crate::util::Flag,
    /// The job's checkpoint bucket ([`Coordinator::use_checkpoints`]).
    bucket: Arc<Mutex<String>>,
}

/// The job's output file, and the file that holds the stream sequence of the newest log event
/// written to it (8 bytes, little-endian; a resumed driver writes on from there).
pub struct Output {
    pub file: std::fs::File,
    pub seq: Option<std::fs::File>,
}

/// The sequence kept in an output's sequence file (0 if there is none).
pub fn read_output_seq(path: &std::path::Path) -> u64 {
    std::fs::read(path)
        .ok()
        .and_then(|b| b.get(..8).and_then(|b| b.try_into().ok()))
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

/// What the driver knows of the NATS server's storage.
#[derive(Debug)]
struct Health {
    /// Since when it has stored the driver's probes without a failure (`None`: it fails now).
    since: Option<std::time::Instant>,
    /// Why it failed last.
    problem: Option<String>,
    /// When the controller lease was last renewed (when the renewal was sent).
    renewed: Option<std::time::Instant>,
    /// Since when the server has failed to store, if it does now.
    failing_since: Option<std::time::Instant>,
}

/// How often the controller renews its lease (a conditional write of its mark to the jobs
/// bucket; also the check that the NATS server stores).
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// A controller that could not renew its lease for this long does nothing to the job until
/// it has again.
pub const CONTROLLER_STOP: Duration = Duration::from_secs(4);
/// A standby takes the job over when the controller lease has not changed for this long (by
/// its own clock): the active controller stopped acting before.
pub const TAKEOVER_AFTER: Duration = Duration::from_secs(6);

/// The controller's mark in the jobs bucket.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ControllerMark {
    pub pid: u32,
    pub host: String,
    pub at: u64,
    /// Random, one per controller process: tells its own writes from another's.
    #[serde(default)]
    pub id: String,
}

/// This process's controller id (see [`ControllerMark::id`]).
fn controller_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        protocol::random_hex(8).unwrap_or_else(|_| format!("pid{}", std::process::id()))
    })
}

impl ControllerMark {
    /// This process's mark.
    pub fn mine() -> bytes::Bytes {
        serde_json::to_vec(&ControllerMark {
            pid: std::process::id(),
            host: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            at: protocol::now(),
            id: controller_id().to_string(),
        })
        .expect("serializes")
        .into()
    }

    /// Whether `bytes` is a mark this process wrote.
    pub fn is_mine(bytes: &[u8]) -> bool {
        serde_json::from_slice::<ControllerMark>(bytes).is_ok_and(|m| m.id == controller_id())
    }
}

/// Keeps the controller lease: its mark written every [`PROBE_EVERY`], each write
/// conditional on the revision this controller wrote last (`rev`; `None`: taken
/// unconditionally first). A write refused for its revision means another controller took
/// over: `superseded` is set. Failed writes otherwise mean the server does not store.
async fn keep_controller_lease(
    jobs: jetstream::kv::Store,
    key: String,
    health: Arc<Mutex<Health>>,
    mut rev: Option<u64>,
    superseded: crate::util::Flag,
) {
    use jetstream::kv::UpdateErrorKind;
    loop {
        let sent = std::time::Instant::now();
        let r = match rev {
            None => tokio::time::timeout(
                Duration::from_secs(3),
                jobs.put(&key, ControllerMark::mine()),
            )
            .await
            .map(|r| r.map_err(|e| (false, e.to_string()))),
            Some(n) => tokio::time::timeout(
                Duration::from_secs(3),
                jobs.update(&key, ControllerMark::mine(), n),
            )
            .await
            .map(|r| {
                r.map_err(|e| {
                    (
                        e.kind() == UpdateErrorKind::WrongLastRevision,
                        e.to_string(),
                    )
                })
            }),
        };
        let problem = match r {
            Ok(Ok(n)) => {
                rev = Some(n);
                None
            }
            Ok(Err((true, e))) => {
                // A write whose answer was lost may have been stored after all: then the
                // lease is still this controller's, at the revision stored.
                match jobs.entry(&key).await {
                    // Written again at once with that revision: only a write answered counts
                    // as a renewal.
                    Ok(Some(entry)) if ControllerMark::is_mine(&entry.value) => {
                        rev = Some(entry.revision);
                        continue;
                    }
                    Ok(_) => {
                        tracing::warn!("another controller took the job over");
                        superseded.set();
                        return;
                    }
                    Err(read) => Some(format!("{e}; and reading the lease: {read}")),
                }
            }
            Ok(Err((false, e))) => Some(e),
            Err(_) => Some("no answer within 3 s".to_string()),
        };
        {
            let mut h = health.lock().expect("health");
            match problem {
                None => {
                    h.renewed = Some(sent);
                    h.failing_since = None;
                    if h.since.is_none() {
                        tracing::info!("the NATS server stores again");
                        h.since = Some(std::time::Instant::now());
                        h.problem = None;
                    }
                }
                Some(p) => {
                    if h.since.is_some() {
                        tracing::info!(problem = %p, "the NATS server does not store what the driver sends; workers' silence is not taken for a loss meanwhile");
                    }
                    h.since = None;
                    h.problem = Some(p);
                    h.failing_since.get_or_insert_with(std::time::Instant::now);
                }
            }
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// The key in the jobs bucket where the job's controller marks that it lives.
pub fn controller_key(job: &str) -> String {
    format!("{job}.controller")
}

/// Longer than workers go without an event (they heartbeat every few seconds): a consumer
/// quiet for this long is replaced.
const EVENTS_SILENCE: Duration = Duration::from_secs(8);

/// Why the job's events cannot be read.
#[derive(Debug, thiserror::Error)]
enum ConsumerError {
    #[error(transparent)]
    Stream(#[from] jetstream::context::GetStreamError),
    #[error(transparent)]
    Create(#[from] jetstream::stream::ConsumerError),
    #[error(transparent)]
    Messages(#[from] consumer::StreamError),
}

/// An ordered consumer of the job's events from stream sequence `from`.
async fn event_consumer(
    js: &jetstream::Context,
    job: &str,
    from: u64,
) -> Result<consumer::pull::Ordered, ConsumerError> {
    Ok(js
        .get_stream(protocol::EVENTS_STREAM)
        .await?
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subjects: protocol::job_events_subjects(job),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from,
            },
            ..Default::default()
        })
        .await?
        .messages()
        .await?)
}

impl Coordinator {
    /// Connects, creates the streams and buckets, and starts routing events.
    pub async fn connect(
        url: &str,
        token: &str,
        job: &str,
        echo_logs: bool,
    ) -> Result<Self, CoordError> {
        Self::connect_from(url, token, job, echo_logs, None, 0, None).await
    }

    /// Like [`Coordinator::connect`], reading events from stream sequence `from` (a resumed
    /// job's, from its record) rather than from now; log events up to `output_seq` are
    /// already in the output file and are not written again. `lease_rev`: the revision of
    /// the controller lease this driver took over (a standby's), else it is taken as is.
    pub async fn connect_from(
        url: &str,
        token: &str,
        job: &str,
        echo_logs: bool,
        from: Option<u64>,
        output_seq: u64,
        lease_rev: Option<u64>,
    ) -> Result<Self, CoordError> {
        let client = cedana_protocol::NatsCredential::parse(&cedana_protocol::Secret::new(token))
            .connect_options()
            .name(format!("cedana-driver {job}"))
            .connection_timeout(Duration::from_secs(10))
            .connect(cedana_protocol::NatsUrl::parse(url).servers().to_vec())
            .await
            .map_err(|e| CoordError::Connect {
                url: url.into(),
                reason: e.to_string(),
            })?;
        let js = jetstream::new(client.clone());
        let cedana_protocol::Layout {
            workers, replies, ..
        } = cedana_protocol::ensure_layout(&js)
            .await
            .map_err(|e| CoordError::Nats(e.to_string()))?;
        let jobs = cedana_protocol::ensure_kv(&js, cedana_protocol::JOBS_BUCKET)
            .await
            .map_err(|e| CoordError::Nats(e.to_string()))?;
        // Events come through an ordered JetStream consumer from the stream's end as of now;
        // when it breaks (a reconnect, a restarted server, a lost cluster node) or goes quiet
        // for longer than workers stay silent, a new one resumes right after the last event
        // seen, so none is lost.
        let last = js
            .get_stream(protocol::EVENTS_STREAM)
            .await
            .map_err(|e| CoordError::Nats(e.to_string()))?
            .info()
            .await
            .map_err(|e| CoordError::Nats(e.to_string()))?
            .state
            .last_sequence;
        let mut next_seq = from.filter(|f| *f > 0).unwrap_or(last + 1);
        let shared_seq = Arc::new(std::sync::atomic::AtomicU64::new(next_seq));
        let seq_out = shared_seq.clone();
        let output_seq = Arc::new(std::sync::atomic::AtomicU64::new(output_seq));
        let written = output_seq.clone();
        let mut sub = event_consumer(&js, job, next_seq)
            .await
            .map_err(|e| CoordError::Nats(e.to_string()))?;
        let routes = Arc::new(Mutex::new(Routes::default()));
        let r = routes.clone();
        let output = Arc::new(Mutex::new(None::<Output>));
        let out = output.clone();
        let (events_js, events_job) = (js.clone(), job.to_string());
        tokio::spawn(async move {
            let mut errors = 0u32;
            loop {
                let msg = match tokio::time::timeout(EVENTS_SILENCE, sub.next()).await {
                    Ok(Some(Ok(msg))) => msg,
                    // A few errors in a row: start over too (never spinning on them).
                    Ok(Some(Err(e))) if errors < 3 => {
                        errors += 1;
                        tracing::debug!(error = %e, "event consumer error");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    // Ended, or quiet for longer than any worker's heartbeat: start over
                    // after the last event seen.
                    end => {
                        errors = 0;
                        if end.is_ok() {
                            tracing::warn!(
                                "the event consumer ended or kept failing; resuming after the last event"
                            );
                        }
                        match event_consumer(&events_js, &events_job, next_seq).await {
                            Ok(s) => sub = s,
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot read events yet; retrying");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        }
                        continue;
                    }
                };
                errors = 0;
                let mut seq = 0;
                if let Ok(info) = msg.info() {
                    if info.stream_sequence < next_seq {
                        continue;
                    }
                    seq = info.stream_sequence;
                    next_seq = seq + 1;
                }
                use std::sync::atomic::Ordering;
                let env = match protocol::decode::<EventEnvelope>(&msg.payload) {
                    Ok(env) => env,
                    Err(e) => {
                        tracing::debug!(error = %e, "undecodable event");
                        continue;
                    }
                };
                // An event speaks for the worker whose subject it came on, and no other
                // (a worker's own NATS user may publish on its own subjects only).
                if env.job != events_job
                    || (msg.subject.as_str() != protocol::state_subject(&env.job, &env.worker)
                        && msg.subject.as_str() != protocol::logs_subject(&env.job, &env.worker))
                {
                    tracing::warn!(subject = %msg.subject, worker = %env.worker, job = %env.job, "an event names a worker or job other than its subject's; ignored");
                    continue;
                }
                tracing::trace!(worker = %env.worker, event = ?env.event, "event");
                // An event of the backlog a resumed driver reads was heard when it was sent.
                let heard = if seq != 0 && seq <= last {
                    let age = protocol::now().saturating_sub(env.at);
                    std::time::Instant::now()
                        .checked_sub(Duration::from_secs(age))
                        .unwrap_or_else(std::time::Instant::now)
                } else {
                    std::time::Instant::now()
                };
                r.lock()
                    .expect("routes")
                    .seen
                    .entry(env.worker.clone())
                    .and_modify(|t| *t = (*t).max(heard))
                    .or_insert(heard);
                match env.event {
                    Event::Reply { id, reply } => {
                        let route = format!("{}/{id}", env.worker);
                        if let Some(tx) = r.lock().expect("routes").replies.remove(&route) {
                            let _ = tx.send(reply);
                        }
                    }
                    // Written once: a resumed driver reads again what its predecessor read
                    // after it last saved the record.
                    Event::Log { .. } if seq != 0 && seq <= written.load(Ordering::SeqCst) => {}
                    Event::Log { data, .. } => {
                        use std::io::Write;
                        if let Some(o) = out.lock().expect("output").as_mut() {
                            let _ = o.file.write_all(data.as_bytes());
                            if let (Some(f), true) = (&o.seq, seq != 0) {
                                use std::os::unix::fs::FileExt;
                                let _ = f.write_at(&seq.to_le_bytes(), 0);
                            }
                        }
                        written.store(seq, Ordering::SeqCst);
                        if echo_logs {
                            let mut o = std::io::stdout().lock();
                            let _ = o.write_all(data.as_bytes());
                            let _ = o.flush();
                        }
                    }
                    Event::TaskExited {
                        task,
                        code,
                        signal,
                        restore_failed,
                    } => {
                        let tx = r
                            .lock()
                            .expect("routes")
                            .exits
                            .entry(format!("{}/{task}", env.worker))
                            .or_insert_with(|| watch::channel(None).0)
                            .clone();
                        // `send` stores nothing while no one is subscribed; `send_replace` always does.
                        tx.send_replace(Some(Exit {
                            code,
                            signal,
                            restore_failed,
                        }));
                    }
                    Event::Heartbeat { .. } => {}
                    Event::CheckpointStored {
                        object,
                        bytes,
                        error,
                        ..
                    } => {
                        let tx = r
                            .lock()
                            .expect("routes")
                            .stored
                            .entry(format!("{}/{object}", env.worker))
                            .or_insert_with(|| watch::channel(None).0)
                            .clone();
                        tx.send_replace(Some(match error {
                            None => Ok(bytes),
                            Some(e) => Err(e),
                        }));
                    }
                    Event::SpotNotice {
                        kind,
                        action,
                        at,
                        checkpoints,
                        failed,
                    } => {
                        tracing::warn!(worker = %env.worker, ?kind, ?action, ?at, "spot notice");
                        r.lock()
                            .expect("routes")
                            .spot
                            .entry(env.worker.clone())
                            .or_default()
                            .push(SpotNotice {
                                kind,
                                at,
                                checkpoints,
                                failed: failed.into_iter().map(|f| f.task).collect(),
                            });
                    }
                }
                seq_out.store(next_seq, Ordering::SeqCst);
            }
        });
        let prefix = cedana_protocol::random_hex(4).unwrap_or_default();
        let health = Arc::new(Mutex::new(Health {
            since: Some(std::time::Instant::now()),
            problem: None,
            renewed: Some(std::time::Instant::now()),
            failing_since: None,
        }));
        let superseded = crate::util::Flag::new();
        tokio::spawn(keep_controller_lease(
            jobs.clone(),
            controller_key(job),
            health.clone(),
            lease_rev,
            superseded.clone(),
        ));
        Ok(Coordinator {
            job: job.into(),
            client,
            js,
            workers,
            replies,
            jobs,
            routes,
            output,
            next_id: Default::default(),
            prefix,
            health,
            next_seq: shared_seq,
            output_seq,
            backlog: last,
            superseded,
            bucket: Arc::new(Mutex::new(protocol::CHECKPOINTS_BUCKET.into())),
        })
    }

    /// Whether this driver is in charge of the job now: its controller lease was renewed
    /// within [`CONTROLLER_STOP`] and no other controller took it. A driver not in charge
    /// does nothing to the job (a standby may be taking over).
    pub fn in_charge(&self) -> bool {
        !self.superseded.is_set()
            && self
                .health
                .lock()
                .expect("health")
                .renewed
                .is_some_and(|t| t.elapsed() < CONTROLLER_STOP)
    }

    /// Set when another controller took the job over (this one must stop at once, touching
    /// nothing).
    pub fn superseded(&self) -> crate::util::Flag {
        self.superseded.clone()
    }

    /// Waits (at most `timeout`) until every event stored before the driver connected has
    /// been read: what a resumed driver knows before it acts.
    pub async fn caught_up(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.next_seq.load(std::sync::atomic::Ordering::SeqCst) <= self.backlog {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    /// How long `worker` has been silent while the NATS server stored what it was sent:
    /// `None` if it was never heard from, or if the server does not store now (then no one
    /// can be heard, and silence says nothing about the worker).
    pub fn silence(&self, worker: &str) -> Option<Duration> {
        let seen = self.last_seen(worker)?;
        let since = self.health.lock().expect("health").since?;
        Some(seen.max(since).elapsed())
    }

    /// Why the NATS server does not store now, and for how long it has not, if it does not.
    pub fn store_problem(&self) -> Option<(String, Duration)> {
        let h = self.health.lock().expect("health");
        Some((h.problem.clone()?, h.failing_since?.elapsed()))
    }

    /// (the stream sequence of the next event to read, that of the newest log event written
    /// to the output file): what a resumed driver starts from.
    pub fn positions(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        (
            self.next_seq.load(Ordering::SeqCst),
            self.output_seq.load(Ordering::SeqCst),
        )
    }

    /// Waits until `worker` has registered: its key in the workers bucket is watched, and
    /// looked at once the watch is set up (so a registration in between is not missed).
    pub async fn wait_registered(&self, worker: &str, secs: u64) -> Result<(), CoordError> {
        let key = format!("{}.{worker}", self.job);
        let registered = async {
            loop {
                let watch = self.workers.watch(&key).await;
                if let Ok(Some(_)) = self.workers.get(&key).await {
                    return;
                }
                if let Ok(mut watch) = watch {
                    while let Some(Ok(entry)) = watch.next().await {
                        if entry.operation == jetstream::kv::Operation::Put {
                            return;
                        }
                    }
                }
                // The server cannot be asked now (a reconnect): again after a pause.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(secs), registered)
            .await
            .map_err(|_| CoordError::NotRegistered {
                worker: worker.into(),
                secs,
            })
    }

    /// Sends a command and waits for its reply, giving up early if `lost` says the worker is
    /// gone. The command is published with a message id (a retried publish is stored once);
    /// the reply is also looked up in the replies bucket, in case its event was missed.
    pub async fn call(
        &self,
        worker: &str,
        command: Command,
        secs: u64,
        lost: &dyn Fn() -> Option<String>,
    ) -> Result<Reply, CoordError> {
        let n = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{}-{n}", self.prefix);
        // A reply counts only from the worker asked (see the event reader).
        let route = format!("{worker}/{id}");
        let (tx, mut rx) = oneshot::channel();
        self.routes
            .lock()
            .expect("routes")
            .replies
            .insert(route.clone(), tx);
        let env = CommandEnvelope {
            v: protocol::VERSION,
            id: id.clone(),
            command,
        };
        let payload = bytes::Bytes::from(serde_json::to_vec(&env).expect("serializes"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        let subject = protocol::commands_subject(&self.job, worker);
        let fail = |this: &Self, e: CoordError| {
            this.routes.lock().expect("routes").replies.remove(&route);
            Err(e)
        };
        // Publish until JetStream has it (the server may be restarting).
        let mut attempt = 0u32;
        loop {
            match protocol::publish_stored(&self.js, subject.clone(), payload.clone(), &id).await {
                Ok(_) => break,
                Err(e) => {
                    attempt += 1;
                    if tokio::time::Instant::now() >= deadline {
                        return fail(self, CoordError::Nats(e));
                    }
                    if let Some(reason) = lost() {
                        return fail(
                            self,
                            CoordError::Lost {
                                worker: worker.into(),
                                id: id.clone(),
                                reason,
                            },
                        );
                    }
                    tracing::warn!(error = %e, attempt, "command not yet stored by JetStream; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        let key = protocol::reply_key(&self.job, worker, &id);
        let mut ticks = 0u32;
        loop {
            match tokio::time::timeout(Duration::from_millis(500), &mut rx).await {
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(_)) => {}
                Err(_) => {}
            }
            ticks += 1;
            if ticks.is_multiple_of(4) {
                if let Ok(Some(stored)) = self.replies.get(&key).await {
                    if let Ok(r) = serde_json::from_slice::<Reply>(&stored) {
                        self.routes.lock().expect("routes").replies.remove(&route);
                        return Ok(r);
                    }
                }
            }
            if let Some(reason) = lost() {
                return fail(
                    self,
                    CoordError::Lost {
                        worker: worker.into(),
                        id: id.clone(),
                        reason,
                    },
                );
            }
            if tokio::time::Instant::now() >= deadline {
                return fail(
                    self,
                    CoordError::Timeout {
                        worker: worker.into(),
                        id: id.clone(),
                        secs,
                    },
                );
            }
        }
    }

    /// Revokes `worker`'s lease: its agent kills its tasks as soon as it sees this (see
    /// `cedana_protocol::revoked_key`).
    pub async fn revoke(&self, worker: &str) -> Result<(), CoordError> {
        self.workers
            .put(
                protocol::revoked_key(&self.job, worker),
                protocol::now().to_string().into(),
            )
            .await
            .map(|_| ())
            .map_err(|e| CoordError::Nats(e.to_string()))
    }

    /// Counts `worker` as heard from now if it never was (a resumed driver's adopted
    /// workers: their silence counts from the resume).
    pub fn expect(&self, worker: &str) {
        self.routes
            .lock()
            .expect("routes")
            .seen
            .entry(worker.to_string())
            .or_insert_with(std::time::Instant::now);
    }

    /// Stores a job's record (as JSON) in the jobs bucket under the job's id.
    pub async fn put_job(&self, job: &str, record: bytes::Bytes) {
        if let Err(e) = self.jobs.put(job, record).await {
            tracing::debug!(error = %e, "cannot store the job record in KV");
        }
    }

    /// The first interruption notice (`instance-action`) `worker` reported, if any.
    pub fn interruption(&self, worker: &str) -> Option<SpotNotice> {
        self.routes
            .lock()
            .expect("routes")
            .spot
            .get(worker)
            .and_then(|v| {
                v.iter()
                    .find(|n| n.kind == protocol::SpotKind::InstanceAction)
                    .cloned()
            })
    }

    /// When `worker` was last heard from (any event).
    pub fn last_seen(&self, worker: &str) -> Option<std::time::Instant> {
        self.routes
            .lock()
            .expect("routes")
            .seen
            .get(worker)
            .copied()
    }

    /// Appends task output to `file` from now on.
    pub fn set_output(&self, output: Output) {
        *self.output.lock().expect("output") = Some(output);
    }

    /// Forgets an earlier exit of `task` on `worker` (before it starts there again).
    pub fn reset_exit(&self, worker: &str, task: &str) {
        self.routes
            .lock()
            .expect("routes")
            .exits
            .insert(format!("{worker}/{task}"), watch::channel(None).0);
    }

    /// Follows how `task` on `worker` ends: `Some` once it has (the receiver ends when the
    /// exit is reset by [`Coordinator::reset_exit`]).
    pub fn exit_watch(&self, worker: &str, task: &str) -> watch::Receiver<Option<Exit>> {
        self.routes
            .lock()
            .expect("routes")
            .exits
            .entry(format!("{worker}/{task}"))
            .or_insert_with(|| watch::channel(None).0)
            .subscribe()
    }

    /// Follows post-copy checkpoint `object` of `worker` until it is stored (`Ok`: its bytes)
    /// or failed (`Err`: why).
    pub fn stored_watch(
        &self,
        worker: &str,
        object: &str,
    ) -> watch::Receiver<Option<Result<u64, String>>> {
        self.routes
            .lock()
            .expect("routes")
            .stored
            .entry(format!("{worker}/{object}"))
            .or_insert_with(|| watch::channel(None).0)
            .subscribe()
    }

    /// How `task` on `worker` ended, if it has.
    pub fn exit_of(&self, worker: &str, task: &str) -> Option<Exit> {
        self.routes
            .lock()
            .expect("routes")
            .exits
            .get(&format!("{worker}/{task}"))
            .and_then(|tx| tx.borrow().clone())
    }

    /// Makes the job's checkpoint bucket if it is missing (its workers may not), and uses it
    /// from now on.
    pub async fn use_checkpoints(&self, bucket: &str) -> Result<(), CoordError> {
        cedana_protocol::ensure_checkpoints(&self.js, bucket)
            .await
            .map_err(|e| CoordError::Nats(e.to_string()))?;
        *self.bucket.lock().expect("bucket") = bucket.to_string();
        Ok(())
    }

    /// Deletes a checkpoint from the object store.
    pub async fn delete_checkpoint(&self, object: &str) -> Result<(), CoordError> {
        let bucket = self.bucket.lock().expect("bucket").clone();
        let store = self
            .js
            .get_object_store(bucket)
            .await
            .map_err(|e| CoordError::Nats(e.to_string()))?;
        store
            .delete(object)
            .await
            .map_err(|e| CoordError::Nats(e.to_string()))
    }
}
