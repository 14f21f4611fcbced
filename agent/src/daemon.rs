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
//! [`Event::SpotNotice`] with the checkpoints; a rebalance recommendation is only reported.
//! Each is acted on once. CRIU runs one dump or restore at a time (see `Worker::criu_lock`),
//! so a notice's checkpoints and a command's take turns; each archive streams into the object
//! store while its dump runs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, object_store};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::archive::{self, ArchiveError};
use crate::imds::{self, Imds};
use crate::progress::NoProgress;
use crate::{exec, objstore, Criu};
use cedana_protocol::{
    self as protocol, Command, CommandEnvelope, Event, EventEnvelope, Reply, SpotCheckpoint,
    SpotFailure, SpotKind, WorkerRecord,
};
use cedana_protocol::{ensure_layout, Layout, Secret};

/// How a daemon runs.
#[derive(Clone, Debug)]
pub struct DaemonOptions {
    /// One URL or a comma-separated list (a cluster).
    pub nats_url: String,
    pub token: Secret,
    pub job: String,
    pub worker: String,
    /// The worker's folder: task logs, checkpoints on their way, commands' working directory.
    pub work_dir: PathBuf,
    pub heartbeat: Duration,
    /// A folder every worker of the job mounts (the original's `shared_storage`): checkpoints
    /// are written there as `<job>/<name>.zip` instead of going through the object store.
    pub shared_storage: Option<PathBuf>,
    /// Watch EC2 instance metadata for spot notices (off: no IMDS is contacted).
    pub spot: Option<SpotOptions>,
}

/// How spot notices are watched.
#[derive(Clone, Debug)]
pub struct SpotOptions {
    /// IMDS, `http://HOST[:PORT]` ([`imds::DEFAULT_ENDPOINT`] on EC2).
    pub endpoint: String,
    /// Time between polls.
    pub poll: Duration,
}

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("no NATS token: set CEDANA_NATS_TOKEN (or connection.auth_token in the config); the agent never connects without one")]
    NoToken,
    #[error("job id {0:?} or worker id is not usable: use letters, digits, - and _ (at most 64)")]
    BadId(String),
    #[error("NATS at {url} refused the token (authorization violation); check CEDANA_NATS_TOKEN against the server's")]
    Auth { url: String },
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

/// Exit statuses of children, for whoever registered interest in a PID.
#[derive(Default)]
struct Reaper {
    inner: Mutex<Waits>,
}

/// Who waits for which PID, and exits nobody waited for yet.
#[derive(Default)]
struct Waits {
    waiting: HashMap<i32, oneshot::Sender<ExitStatus>>,
    unclaimed: HashMap<i32, ExitStatus>,
}

/// How a child ended.
#[derive(Clone, Copy, Debug)]
pub struct ExitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl Reaper {
    /// Starts the thread that reaps every child of this process.
    fn start() -> Arc<Self> {
        let r = Arc::new(Reaper::default());
        let me = r.clone();
        std::thread::spawn(move || loop {
            use nix::sys::wait::{waitpid, WaitStatus};
            match waitpid(None, None) {
                Ok(WaitStatus::Exited(pid, code)) => me.deliver(
                    pid.as_raw(),
                    ExitStatus {
                        code: Some(code),
                        signal: None,
                    },
                ),
                Ok(WaitStatus::Signaled(pid, sig, _)) => me.deliver(
                    pid.as_raw(),
                    ExitStatus {
                        code: None,
                        signal: Some(sig as i32),
                    },
                ),
                Ok(_) => {}
                Err(nix::errno::Errno::ECHILD) => std::thread::sleep(Duration::from_millis(50)),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        });
        r
    }

    fn deliver(&self, pid: i32, st: ExitStatus) {
        let mut g = self.inner.lock().expect("reaper lock");
        match g.waiting.remove(&pid) {
            Some(tx) => {
                let _ = tx.send(st);
            }
            None => {
                g.unclaimed.insert(pid, st);
            }
        }
    }

    /// A future of `pid`'s exit (which may already have happened).
    fn watch(&self, pid: i32) -> oneshot::Receiver<ExitStatus> {
        let (tx, rx) = oneshot::channel();
        let mut g = self.inner.lock().expect("reaper lock");
        match g.unclaimed.remove(&pid) {
            Some(st) => {
                let _ = tx.send(st);
            }
            None => {
                g.waiting.insert(pid, tx);
            }
        }
        rx
    }
}

/// Folder inside the work folder where checkpoints are written and downloaded (never carried).
pub const CHECKPOINTS_DIR: &str = ".checkpoints";

struct Task {
    pid: i32,
    /// Set when a checkpoint stopped it on purpose: its exit is not the task ending.
    checkpointed: bool,
}

struct Worker {
    opts: DaemonOptions,
    criu: Criu,
    js: jetstream::Context,
    replies: kv::Store,
    checkpoints: objstore::Bucket,
    reaper: Arc<Reaper>,
    tasks: Arc<Mutex<HashMap<String, Task>>>,
    /// Held while CRIU dumps or restores. Two dumps never overlap: not of one task, and not of
    /// two tasks either, since all tasks share the work folder as their working directory and
    /// CRIU's parasite mounts a proc of the task's PID namespace at `proc.crtools` there (a
    /// second dump meanwhile fails with EEXIST). A restore does not run during a dump either:
    /// it puts carried files back into the folder the dump is reading.
    criu_lock: tokio::sync::Mutex<()>,
    /// Held while an archive's object name is chosen and claimed.
    naming: Arc<tokio::sync::Mutex<()>>,
    /// Checkpoints being read while another worker stores them ([`Command::Prefetch`]), by
    /// chunks id.
    prefetches: Mutex<HashMap<String, Prefetch>>,
    /// Numbers events for their message ids.
    next_event: std::sync::atomic::AtomicU64,
    /// Distinguishes this run of the daemon from earlier ones (message ids stay unique).
    incarnation: String,
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
    std::fs::create_dir_all(&opts.work_dir).map_err(|source| DaemonError::WorkDir {
        path: opts.work_dir.clone(),
        source,
    })?;
    // A bad endpoint is a bad command line; an absent IMDS is not an error (no notices).
    let imds = match &opts.spot {
        Some(spot) => Some((Imds::new(&spot.endpoint)?, spot.poll)),
        None => None,
    };
    // SAFETY: prctl with constant arguments.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
    let reaper = Reaper::start();
    let url = opts.nats_url.clone();
    let client = async_nats::ConnectOptions::with_token(opts.token.expose().to_string())
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
        checkpoints,
    } = ensure_layout(&js)
        .await
        .map_err(|e| jerr(e.what)(&e.reason))?;
    let checkpoints = objstore::Bucket::open(&js, checkpoints, protocol::CHECKPOINTS_BUCKET)
        .await
        .map_err(|e| jerr("opening the checkpoint store")(&e))?;

    let record = WorkerRecord {
        v: protocol::VERSION,
        job: opts.job.clone(),
        worker: opts.worker.clone(),
        hostname: crate::host_info().hostname,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        criu_version: criu.version().map(|v| v.to_string()).unwrap_or_default(),
        started_at: protocol::now(),
        last_heartbeat: protocol::now(),
        pid: std::process::id(),
    };
    let key = protocol::worker_key(&opts.job, &opts.worker);
    workers
        .put(
            &key,
            Bytes::from(serde_json::to_vec(&record).expect("serializes")),
        )
        .await
        .map_err(|e| jerr("registering the worker")(&e))?;
    info!(job = %opts.job, worker = %opts.worker, url = %url, "registered");

    let consumer: consumer::PullConsumer = commands
        .get_or_create_consumer(
            &format!("w_{}_{}", opts.job, opts.worker),
            consumer::pull::Config {
                durable_name: Some(format!("w_{}_{}", opts.job, opts.worker)),
                filter_subject: protocol::commands_subject(&opts.job, &opts.worker),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(600),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| jerr("creating the command consumer")(&e))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| jerr("reading commands")(&e))?;

    let worker = Arc::new(Worker {
        opts: opts.clone(),
        criu,
        js: js.clone(),
        replies,
        checkpoints,
        reaper,
        tasks: Arc::new(Mutex::new(HashMap::new())),
        criu_lock: Default::default(),
        naming: Default::default(),
        prefetches: Default::default(),
        next_event: Default::default(),
        incarnation: format!("{}-{}", std::process::id(), protocol::now()),
    });
    let hb = tokio::spawn(heartbeat(worker.clone(), workers, record));
    let spot = imds.map(|(imds, poll)| tokio::spawn(watch_spot(worker.clone(), imds, poll)));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            msg = messages.next() => match msg {
                None => break,
                Some(Err(e)) => warn!(error = %e, "command stream error"),
                Some(Ok(msg)) => {
                    worker.handle(&msg.payload).await;
                    if let Err(e) = msg.ack().await {
                        warn!(error = %e, "ack failed; the command may be delivered again and answered from the stored reply");
                    }
                }
            }
        }
    }
    hb.abort();
    if let Some(spot) = spot {
        spot.abort();
    }
    info!("daemon stopping");
    Ok(())
}

async fn heartbeat(w: Arc<Worker>, workers: kv::Store, mut record: WorkerRecord) {
    let key = protocol::worker_key(&w.opts.job, &w.opts.worker);
    loop {
        tokio::time::sleep(w.opts.heartbeat).await;
        record.last_heartbeat = protocol::now();
        if let Err(e) = workers
            .put(
                &key,
                Bytes::from(serde_json::to_vec(&record).expect("serializes")),
            )
            .await
        {
            warn!(error = %e, "heartbeat failed");
        }
        let tasks = w.tasks.lock().expect("tasks").keys().cloned().collect();
        w.publish(Event::Heartbeat { tasks }).await;
    }
}

impl Worker {
    async fn publish(&self, event: Event) {
        let subject = match event {
            Event::Log { .. } => protocol::logs_subject(&self.opts.job, &self.opts.worker),
            _ => protocol::state_subject(&self.opts.job, &self.opts.worker),
        };
        let env = EventEnvelope {
            v: protocol::VERSION,
            job: self.opts.job.clone(),
            worker: self.opts.worker.clone(),
            at: protocol::now(),
            event,
        };
        let payload = Bytes::from(serde_json::to_vec(&env).expect("serializes"));
        // Retried until JetStream stores it (the server may be restarting); the message id makes
        // a retry of an event that was stored after all a duplicate JetStream drops.
        let n = self
            .next_event
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let msg_id = format!(
            "{}.{}.{}.{n}",
            self.opts.job, self.opts.worker, self.incarnation
        );
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

    /// Serves one command message: from the stored reply if its id was seen, else by running it.
    async fn handle(self: &Arc<Self>, payload: &[u8]) {
        let env: CommandEnvelope = match protocol::decode(payload) {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "dropping a command that cannot be decoded");
                return;
            }
        };
        if !protocol::valid_id(&env.id) {
            warn!(id = %env.id, "dropping a command whose id is not usable as a key");
            return;
        }
        let key = protocol::reply_key(&self.opts.job, &self.opts.worker, &env.id);
        if let Ok(Some(stored)) = self.replies.get(&key).await {
            if let Ok(reply) = serde_json::from_slice::<Reply>(&stored) {
                debug!(id = %env.id, "repeated command: answering from the stored reply");
                self.publish(Event::Reply { id: env.id, reply }).await;
                return;
            }
        }
        debug!(id = %env.id, command = ?env.command, "running command");
        let reply = match self.execute(env.command).await {
            Ok(r) => r,
            Err(message) => Reply::Error { message },
        };
        if let Err(e) = self
            .replies
            .put(
                &key,
                Bytes::from(serde_json::to_vec(&reply).expect("serializes")),
            )
            .await
        {
            warn!(error = %e, "cannot store the reply; a repeat of this command would run again");
        }
        self.publish(Event::Reply { id: env.id, reply }).await;
    }

    async fn execute(self: &Arc<Self>, command: Command) -> Result<Reply, String> {
        match command {
            Command::Ping => Ok(Reply::Pong {
                agent_version: env!("CARGO_PKG_VERSION").into(),
            }),
            Command::Sh { cmd, timeout_secs } => self.sh(cmd, timeout_secs.unwrap_or(600)).await,
            Command::Spawn { task, cmd } => self.spawn(task, cmd).await,
            Command::Checkpoint {
                task,
                leave_running,
                compression,
                chunks,
            } => {
                self.checkpoint(task, leave_running, compression, chunks)
                    .await
            }
            Command::Prefetch { chunks } => self.prefetch(chunks),
            Command::Restore { task, object } => self.restore(task, object).await,
            Command::Stop { task } => {
                let pid = self.task_pid(&task)?;
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                Ok(Reply::Stopped { task })
            }
        }
    }

    fn task_pid(&self, task: &str) -> Result<i32, String> {
        self.tasks
            .lock()
            .expect("tasks")
            .get(task)
            .map(|t| t.pid)
            .ok_or_else(|| format!("no task {task:?} on this worker"))
    }

    async fn sh(&self, cmd: String, timeout_secs: u64) -> Result<Reply, String> {
        let child = std::process::Command::new("sh")
            .arg("-c")
            .arg(&cmd)
            .current_dir(&self.opts.work_dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run sh: {e}"))?;
        let pid = child.id() as i32;
        let exited = self.reaper.watch(pid);
        let (mut out, mut err) = (child.stdout.expect("piped"), child.stderr.expect("piped"));
        let read = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let (mut o, mut e) = (String::new(), String::new());
            let t = std::thread::spawn(move || {
                let _ = err.read_to_string(&mut e);
                e
            });
            let _ = out.read_to_string(&mut o);
            (o, t.join().unwrap_or_default())
        });
        let status = match tokio::time::timeout(Duration::from_secs(timeout_secs), exited).await {
            Ok(Ok(st)) => st,
            Ok(Err(_)) => return Err("lost track of the command".into()),
            Err(_) => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                return Err(format!(
                    "command timed out after {timeout_secs} s and was killed"
                ));
            }
        };
        let (stdout, stderr) = read.await.unwrap_or_default();
        Ok(Reply::Sh {
            exit_code: status.code.unwrap_or(128 + status.signal.unwrap_or(0)),
            stdout,
            stderr,
        })
    }

    fn log_path(&self, task: &str) -> PathBuf {
        self.opts.work_dir.join(format!("{task}.log"))
    }

    async fn spawn(self: &Arc<Self>, task: String, cmd: String) -> Result<Reply, String> {
        if !protocol::valid_id(&task) {
            return Err(format!(
                "task name {task:?} is not usable: use letters, digits, - and _"
            ));
        }
        if self.tasks.lock().expect("tasks").contains_key(&task) {
            return Err(format!("task {task:?} already runs on this worker"));
        }
        let log = self.log_path(&task);
        let opts = exec::ExecOptions {
            program: "sh".into(),
            args: vec!["-c".into(), cmd.into()],
            log: log.clone(),
            cwd: Some(self.opts.work_dir.clone()),
        };
        let pid = tokio::task::spawn_blocking(move || exec::spawn(&opts))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?
            .as_raw();
        self.track(task.clone(), pid, log, 0);
        Ok(Reply::Spawned { task, pid })
    }

    /// Records a running task, streams its log from `offset`, and reports its exit.
    fn track(self: &Arc<Self>, task: String, pid: i32, log: PathBuf, offset: u64) {
        self.tasks.lock().expect("tasks").insert(
            task.clone(),
            Task {
                pid,
                checkpointed: false,
            },
        );
        let exited = self.reaper.watch(pid);
        let me = self.clone();
        tokio::spawn(async move {
            let (done_tx, done_rx) = tokio::sync::watch::channel(false);
            let tail = tokio::spawn(tail_log(me.clone(), task.clone(), log, offset, done_rx));
            let status = exited.await.ok();
            let _ = done_tx.send(true);
            let _ = tail.await;
            let checkpointed = me
                .tasks
                .lock()
                .expect("tasks")
                .remove(&task)
                .is_some_and(|t| t.checkpointed);
            if let (Some(st), false) = (status, checkpointed) {
                me.publish(Event::TaskExited {
                    task,
                    code: st.code,
                    signal: st.signal,
                })
                .await;
            }
        });
    }

    async fn checkpoint(
        self: &Arc<Self>,
        task: String,
        leave_running: bool,
        compression: crate::Compression,
        chunks: Option<String>,
    ) -> Result<Reply, String> {
        if let Some(c) = &chunks {
            check_chunks_id(c)?;
        }
        // A command's checkpoint and a spot notice's may meet: one dump at a time.
        let criu_turn = self.criu_lock.lock().await;
        let pid = match self.tasks.lock().expect("tasks").get(&task) {
            None => return Err(format!("no task {task:?} on this worker")),
            Some(t) if t.checkpointed => {
                return Err(format!(
                    "task {task:?} was stopped by a checkpoint and no longer runs here"
                ))
            }
            Some(t) => t.pid,
        };
        let dir = match &self.opts.shared_storage {
            Some(shared) => shared.join(&self.opts.job),
            None => self.opts.work_dir.join(CHECKPOINTS_DIR),
        };
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        if !leave_running {
            if let Some(t) = self.tasks.lock().expect("tasks").get_mut(&task) {
                t.checkpointed = true;
            }
        }
        let criu = self.criu.clone();
        let opts = crate::DumpOptions {
            pid,
            dir: dir.clone(),
            leave_running,
            compression,
            tcp: crate::TcpMode::Refuse,
            ext_unix_sk: false,
            staging: None,
            // The task's files travel with it.
            files: Some(self.opts.work_dir.clone()),
            files_exclude: vec![CHECKPOINTS_DIR.into()],
        };
        // Into the shared folder as a file, or streamed into the object store as it is made
        // (the tree stays frozen until the object is stored).
        let (sink, cleaned) = match &self.opts.shared_storage {
            Some(_) => (None, None),
            None => {
                let (upload, cleaned) =
                    self.checkpoints
                        .upload(&self.opts.job, self.naming.clone(), chunks);
                (
                    Some(Box::new(upload) as Box<dyn crate::zipfmt::Sink>),
                    Some(cleaned),
                )
            }
        };
        let dumped = tokio::task::spawn_blocking(move || {
            crate::dump::dump_into(&criu, &opts, sink, &NoProgress)
        })
        .await;
        // An abandoned upload's chunks are purged before the reply.
        if let Some(cleaned) = cleaned {
            let _ = cleaned.await;
        }
        let out = match dumped {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => {
                if let Some(t) = self.tasks.lock().expect("tasks").get_mut(&task) {
                    t.checkpointed = false;
                }
                return Err(e.to_string());
            }
            Err(e) => return Err(e.to_string()),
        };
        drop(criu_turn);
        let object = match out.object {
            Some(object) => object,
            None => {
                let file_name = out
                    .archive
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                format!("{}/{file_name}", self.opts.job)
            }
        };
        info!(task = %task, object = %object, bytes = out.archive_bytes, "checkpoint stored");
        Ok(Reply::Checkpointed {
            task,
            object,
            bytes: out.archive_bytes,
            criu_ms: out.criu_time.as_millis() as u64,
        })
    }

    /// A spot interruption notice: checkpoints every running task right away (left running,
    /// with the work folder; the dumps take turns, each streaming into the object store) and
    /// publishes the notice with the checkpoints.
    async fn spot_interruption(self: &Arc<Self>, notice: imds::InstanceAction) {
        let tasks: Vec<String> = self
            .tasks
            .lock()
            .expect("tasks")
            .iter()
            .filter(|(_, t)| !t.checkpointed)
            .map(|(name, _)| name.clone())
            .collect();
        warn!(action = %notice.action, time = ?notice.time, tasks = ?tasks,
            "spot interruption notice: checkpointing every task now");
        let results = futures::future::join_all(tasks.into_iter().map(|task| async move {
            let r = self
                .checkpoint(task.clone(), true, crate::Compression::Zstd, None)
                .await;
            (task, r)
        }))
        .await;
        let (mut checkpoints, mut failed) = (Vec::new(), Vec::new());
        for (task, result) in results {
            match result {
                Ok(Reply::Checkpointed { object, .. }) => {
                    checkpoints.push(SpotCheckpoint { task, object })
                }
                Ok(other) => failed.push(SpotFailure {
                    task,
                    message: format!("unexpected outcome {other:?}"),
                }),
                Err(message) => {
                    // A task that ended or was stopped by a command's checkpoint meanwhile is
                    // not a failure: there is nothing left to save.
                    let running = self
                        .tasks
                        .lock()
                        .expect("tasks")
                        .get(&task)
                        .is_some_and(|t| !t.checkpointed);
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
        self.publish(Event::SpotNotice {
            kind: SpotKind::InstanceAction,
            action: Some(notice.action),
            at: notice.time,
            checkpoints,
            failed,
        })
        .await;
    }

    async fn restore(self: &Arc<Self>, task: String, object: String) -> Result<Reply, String> {
        if self.tasks.lock().expect("tasks").contains_key(&task) {
            return Err(format!("task {task:?} already runs on this worker"));
        }
        if !object.split('/').all(protocol::valid_object_part) {
            return Err(format!("checkpoint name {object:?} is not usable"));
        }
        let staging = self.opts.work_dir.join(CHECKPOINTS_DIR);
        std::fs::create_dir_all(&staging)
            .map_err(|e| format!("cannot create {}: {e}", staging.display()))?;
        let t0 = std::time::Instant::now();
        // Verified and extracted (into a private folder inside the work folder, so carried
        // files are renamed into place) from the shared folder's file, or from the object store
        // as it arrives; nothing else is touched until then.
        let mut opts = crate::RestoreOptions {
            archive: PathBuf::from(&object),
            staging: Some(staging.clone()),
            as_child: true,
            files_to: Some(self.opts.work_dir.clone()),
        };
        let extracted = match &self.opts.shared_storage {
            Some(shared) => {
                opts.archive = shared.join(&object);
                let (path, staging) = (opts.archive.clone(), staging.clone());
                tokio::task::spawn_blocking(move || {
                    archive::inspect(&path)?;
                    archive::extract(&path, &staging, &NoProgress)
                })
                .await
                .map_err(|e| e.to_string())?
                .map(|x| (x, false))
                .map_err(|e| e.to_string())?
            }
            None => self.receive(&object, &staging).await?,
        };
        let read_while_stored = extracted.1;
        let extracted = extracted.0;
        let verify_time = t0.elapsed();
        let failed_log = match &self.opts.shared_storage {
            Some(_) => crate::restore::failed_log_path(&opts.archive),
            None => staging.join(format!(
                "{}.restore-failed.log",
                object.rsplit('/').next().unwrap_or("checkpoint")
            )),
        };
        let criu_turn = self.criu_lock.lock().await;
        let criu = self.criu.clone();
        let out = tokio::task::spawn_blocking(move || {
            crate::restore::restore_extracted(
                &criu,
                extracted,
                &opts,
                verify_time,
                &failed_log,
                &NoProgress,
            )
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        // Logs go on where the original left them: stream from the current end.
        let log = self.log_path(&task);
        let offset = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        self.track(task.clone(), out.pid, log, offset);
        drop(criu_turn);
        Ok(Reply::Restored {
            task,
            pid: out.pid,
            read_while_stored,
        })
    }

    /// Starts reading the checkpoint whose chunks are `chunks` while another worker stores it
    /// (see [`Command::Prefetch`]): verified and extracted as it arrives into the staging
    /// folder, finished once a restore hands over the stored object's info.
    fn prefetch(self: &Arc<Self>, chunks: String) -> Result<Reply, String> {
        check_chunks_id(&chunks)?;
        if self.opts.shared_storage.is_some() {
            return Err("this worker reads checkpoints from shared storage, not the object store; nothing to prefetch".into());
        }
        let staging = self.opts.work_dir.join(CHECKPOINTS_DIR);
        std::fs::create_dir_all(&staging)
            .map_err(|e| format!("cannot create {}: {e}", staging.display()))?;
        let mut prefetches = self.prefetches.lock().expect("prefetches");
        // Those that ended without a restore (their writer failed or nobody asked) go.
        prefetches.retain(|_, p| !p.done.is_finished());
        if prefetches.contains_key(&chunks) {
            return Ok(Reply::Prefetching { chunks });
        }
        let follow = self.checkpoints.follow(&chunks);
        let (tx, mut rx) = follow.channel(false);
        let (info_tx, info_rx) = oneshot::channel();
        let label = PathBuf::from(format!("the checkpoint with chunks {chunks}"));
        let extract = tokio::task::spawn_blocking(move || {
            archive::extract_stream(&mut rx, &label, &Default::default(), &staging, &NoProgress)
        });
        let id = chunks.clone();
        let done = tokio::spawn(async move {
            let pumped = follow.pump(info_rx, tx).await;
            let extracted = extract.await.map_err(|e| e.to_string())?;
            pumped.map_err(|e| e.to_string())?;
            let x = extracted.map_err(|e| e.to_string())?;
            debug!(chunks = %id, "prefetched checkpoint read whole");
            Ok(x)
        });
        prefetches.insert(
            chunks.clone(),
            Prefetch {
                info: info_tx,
                done,
            },
        );
        debug!(chunks = %chunks, "prefetching a checkpoint as it is stored");
        Ok(Reply::Prefetching { chunks })
    }

    /// Fetches `object` from the object store, verifying and extracting it under `staging` as
    /// it arrives, or takes it from a prefetch of its chunks if one was started. An archive
    /// that cannot be read front to back (from an older agent) is downloaded into a file and
    /// read from there. True with the archive if it came from a prefetch.
    async fn receive(
        &self,
        object: &str,
        staging: &Path,
    ) -> Result<(archive::Extracted, bool), String> {
        let label = PathBuf::from(object);
        let fetch = self.checkpoints.fetch(object).await?;
        let prefetch = self
            .prefetches
            .lock()
            .expect("prefetches")
            .remove(&fetch.info.nuid);
        if let Some(p) = prefetch {
            let _ = p.info.send(fetch.info.clone());
            match p.done.await.map_err(|e| e.to_string()).and_then(|r| r) {
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
        objstore::download(self.checkpoints.fetch(object).await?, file)
            .await
            .map_err(|e| format!("cannot download {object}: {e}"))?;
        let staging = staging.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let x = archive::inspect(&path)
                .and_then(|_| archive::extract(&path, &staging, &NoProgress));
            drop(path);
            x
        })
        .await
        .map_err(|e| e.to_string())?
        .map(|x| (x, false))
        .map_err(|e| e.relabel(&label).to_string())
    }
}

/// A command's chunks id, or the error that says what it must be.
fn check_chunks_id(chunks: &str) -> Result<(), String> {
    match protocol::valid_chunks_id(chunks) {
        true => Ok(()),
        false => Err(format!(
            "chunks id {chunks:?} is not usable: use 16 to 64 letters and digits"
        )),
    }
}

/// A checkpoint being read while it is stored: where to hand its info once stored, and the
/// reading, which ends with the extracted archive.
struct Prefetch {
    info: oneshot::Sender<object_store::ObjectInfo>,
    done: tokio::task::JoinHandle<Result<archive::Extracted, String>>,
}

/// Polls instance metadata every `poll` until an interruption notice was acted on. IMDS
/// failures are logged (the first at `warn`, repeats at `debug`) and never stop the daemon.
async fn watch_spot(w: Arc<Worker>, mut imds: Imds, poll: Duration) {
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
                    w.publish(Event::SpotNotice {
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
                w.spot_interruption(notice).await;
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

/// Publishes a task's log as it grows, until the task ended and the end of the log is reached.
async fn tail_log(
    w: Arc<Worker>,
    task: String,
    log: PathBuf,
    mut offset: u64,
    done: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut pending = Vec::new();
    loop {
        let finished = *done.borrow();
        if let Ok(mut f) = tokio::fs::File::open(&log).await {
            if f.seek(std::io::SeekFrom::Start(offset)).await.is_ok() {
                let mut buf = Vec::new();
                if let Ok(n) = f.read_to_end(&mut buf).await {
                    offset += n as u64;
                    pending.extend_from_slice(&buf);
                }
            }
        }
        // Whole lines only, unless the task is over.
        let cut = if finished {
            pending.len()
        } else {
            pending
                .iter()
                .rposition(|b| *b == b'\n')
                .map(|i| i + 1)
                .unwrap_or(0)
        };
        if cut > 0 {
            let data: Vec<u8> = pending.drain(..cut).collect();
            w.publish(Event::Log {
                task: task.clone(),
                data: String::from_utf8_lossy(&data).into_owned(),
            })
            .await;
        }
        if finished {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
