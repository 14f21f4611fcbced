//! One running job: its workers, its task, its checkpoints and its record. Both ways a job
//! runs (the script's own code, and the managed flow) act through this.
//!
//! [`Job`]'s methods are synchronous (the Rhai engine and the managed flow call them); each
//! runs what it awaits (providers, the wire) on the job's one runtime with `block_on`, and
//! only here. Waits end on what they wait for (a registration, a task's exit, a worker gone,
//! the job taken down) as soon as it happens.

pub mod managed;
pub mod orphan;
pub mod policy;
pub mod ports;
pub mod record;
pub mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cedana_protocol::{self as protocol, Command, Reply};
use tracing::{info, warn};

use crate::coord::{CoordError, Coordinator, Exit};
use crate::job::record::{CheckpointInfo, JobRecord, JobState, TaskInfo, WorkerInfo, WorkerState};
use crate::providers::{self, Bootstrap, Instance, Offer, Provider};
pub use crate::providers::{same_offer, Spec};
use crate::util::Flag;

/// A worker silent this long is lost (heartbeats come every 2 s; the margin covers a NATS
/// server restart).
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(20);

/// How often a launch waiting for spot capacity asks again (at most).
pub const SPOT_POLL: Duration = Duration::from_secs(30);

/// Errors of job operations.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Coord(#[from] CoordError),
    #[error(transparent)]
    Provider(#[from] providers::ProviderError),
    #[error("no offer fits the job's spec {spec}{why}")]
    NoOffer { spec: String, why: String },
    #[error("worker {worker}: {message}")]
    Worker { worker: String, message: String },
    #[error("worker {worker} was lost: {reason}")]
    Lost { worker: String, reason: String },
    /// A checkpoint that cannot be restored: part of it is missing or damaged.
    #[error("worker {worker}: {message}")]
    BadCheckpoint {
        worker: String,
        checkpoint: String,
        message: String,
    },
    #[error("no worker {0} in this job")]
    NoWorker(String),
    #[error("the job was taken down")]
    Down,
    /// Every spot offer is out of capacity and the policy waits for one (never leaves
    /// [`Job::launch_among`]).
    #[error("every spot offer is out of capacity; waiting for one")]
    SpotWait,
    #[error("worker {worker} answered {reply}, not what {what} expects")]
    Unexpected {
        worker: String,
        what: &'static str,
        reply: String,
    },
}

/// A worker as scripts see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Worker {
    pub id: String,
}

/// A task as scripts see it: its name and the worker it runs on now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    pub name: String,
    pub worker: String,
}

/// A checkpoint of a task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub object: String,
    pub task: String,
    /// The SHA-256 of its manifest, which its restore checks ([`Command::Restore`]).
    pub manifest: Option<String>,
}

impl From<&CheckpointInfo> for Checkpoint {
    fn from(c: &CheckpointInfo) -> Self {
        Checkpoint {
            object: c.object.clone(),
            task: c.task.clone(),
            manifest: c.manifest.clone(),
        }
    }
}

/// The running job.
pub struct Job {
    pub id: String,
    pub rt: tokio::runtime::Handle,
    pub coord: Coordinator,
    pub nats_url: String,
    token: cedana_protocol::config::Secret,
    /// The job's folder.
    pub dir: PathBuf,
    /// The path every worker sees its own folder at.
    pub work_path: PathBuf,
    pub shared_storage: Option<PathBuf>,
    /// The job's part of its checkpoint store, if it has one (checkpoints go there as chunks).
    pub store: Option<cedana_store::StoreUrl>,
    /// Where workers come from.
    pub providers: Vec<Provider>,
    pub workers: BTreeMap<String, Instance>,
    pub record: JobRecord,
    /// Set by `down` or a signal: every wait ends.
    pub down: Flag,
    /// Where the job tells the user what it does ([`report::Silent`] until set).
    pub reporter: report::SharedReporter,
    next_worker: u32,
    next_task: u32,
    pruned: std::collections::BTreeSet<String>,
    /// The job's decisions (offers avoided, preemptions seen), on the clock of [`Job::now`].
    pub policy: policy::Policy,
    /// When this driver took the job (the policy's clock starts there).
    started: Instant,
    /// Since when launches have found every spot offer out of capacity (on the policy's
    /// clock), while the policy waits for one.
    waiting_for_spot: Option<Duration>,
    /// The embedded NATS server's process id, kept current by its supervisor.
    pub nats_pid: Arc<std::sync::atomic::AtomicU32>,
    /// The embedded server's users: each worker gets its own, allowed its own subjects only
    /// (`None`: an external server, or a job folder from before users; workers share the
    /// token).
    pub nats_users: Option<crate::coord::nats::Users>,
    /// A move's checkpoint published ahead of its chunks (post-copy): its worker, checkpoint
    /// and task, until [`Job::settle_copy`] hears how its storing ended.
    pending_copy: Option<(String, String, String)>,
    /// The checkpoint each task was last restored from (a failed lazy restore condemns it).
    pub restored_from: BTreeMap<String, String>,
}

impl Job {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: String,
        rt: tokio::runtime::Handle,
        coord: Coordinator,
        nats_url: String,
        token: cedana_protocol::config::Secret,
        dir: PathBuf,
        shared_storage: Option<PathBuf>,
        record: JobRecord,
    ) -> Self {
        Job {
            id,
            rt,
            coord,
            nats_url,
            token,
            work_path: dir.join("work"),
            dir,
            shared_storage,
            store: None,
            providers: Vec::new(),
            workers: BTreeMap::new(),
            record,
            down: Flag::new(),
            reporter: Arc::new(report::Silent),
            next_worker: 0,
            next_task: 0,
            pruned: Default::default(),
            policy: policy::Policy::new(policy::PolicyOptions {
                interval: None,
                arbitrage: None,
                adaptive: true,
                wait_for_spot: None,
                overheads: policy::Overheads::default(),
            }),
            started: Instant::now(),
            waiting_for_spot: None,
            nats_pid: Default::default(),
            nats_users: None,
            pending_copy: None,
            restored_from: BTreeMap::new(),
        }
    }

    /// Takes back the workers of a record left by a driver that died (`resume`): each worker
    /// the record has running is adopted (one that is gone turns lost at the next look), and
    /// the worker and task counters go on from the record's.
    pub fn adopt_workers(&mut self) -> Result<(), JobError> {
        let number = |s: &str, prefix: &str| {
            s.strip_prefix(prefix)
                .and_then(|n| n.parse::<u32>().ok())
                .unwrap_or(0)
        };
        self.next_worker = self
            .record
            .workers
            .iter()
            .map(|w| number(&w.id, "w"))
            .max()
            .unwrap_or(0);
        self.next_task = self
            .record
            .task
            .iter()
            .map(|t| number(&t.name, "task"))
            .max()
            .unwrap_or(0);
        let running: Vec<WorkerInfo> = self
            .record
            .workers
            .iter()
            .filter(|w| w.state == WorkerState::Running)
            .cloned()
            .collect();
        for info in running {
            let offer_type = info.offer.as_ref().map(|o| o.instance_type.as_str());
            if offer_type == Some("local-container") {
                return Err(JobError::Worker {
                    worker: info.id.clone(),
                    message: format!(
                        "a local worker in a container cannot be taken back by a resumed driver in this release; `cedana-driver down {}` ends the job",
                        self.id
                    ),
                });
            }
            if info.provider != providers::local::NAME {
                let region = info
                    .offer
                    .as_ref()
                    .map(|o| o.region.clone())
                    .unwrap_or_default();
                let Some(p) = self.providers.iter().find(|p| p.name() == info.provider) else {
                    return Err(JobError::Worker {
                        worker: info.id.clone(),
                        message: format!(
                            "it runs on {}, which the config does not enable; enable it to resume, or `cedana-driver down {}`",
                            info.provider, self.id
                        ),
                    });
                };
                let w = self
                    .rt
                    .block_on(p.adopt(&info.instance, &region, &self.rt))?;
                self.workers.insert(info.id.clone(), w);
                self.coord.expect(&info.id);
                continue;
            }
            let task_pids = self
                .record
                .task
                .iter()
                .filter(|t| t.worker == info.id)
                .map(|t| t.pid)
                .collect();
            let w = providers::local::LocalWorker::adopt(providers::local::Adopt {
                job: &self.id,
                id: &info.id,
                pid: info.pid,
                dir: &info.dir,
                netns: info.netns.as_deref(),
                forward: info.forward,
                nats_url: &self.nats_url,
                task_pids,
                rt: &self.rt,
            })
            .map_err(|e| JobError::Worker {
                worker: info.id.clone(),
                message: e.to_string(),
            })?;
            self.workers.insert(info.id.clone(), Instance::Local(w));
            self.coord.expect(&info.id);
        }
        Ok(())
    }

    /// The tasks running on `worker`, as it says (`None`: it did not answer).
    pub fn tasks_on(&self, worker: &str) -> Option<Vec<protocol::RunningTask>> {
        match self.call(worker, Command::Ping, 30) {
            Ok(Reply::Pong { tasks, .. }) => Some(tasks),
            _ => None,
        }
    }

    /// Records a change: `job.json` now, and the KV bucket (best effort).
    pub fn save(&mut self) {
        let now = protocol::now();
        self.record.updated_at = now;
        self.record.nats_pid = self.nats_pid.load(std::sync::atomic::Ordering::SeqCst);
        (self.record.events_seq, self.record.output_seq) = self.coord.positions();
        // What the workers have cost so far, at their offers' prices.
        self.record.cost_usd = self
            .record
            .workers
            .iter()
            .map(|w| {
                let price = w.offer.as_ref().map(|o| o.price_usd_hour).unwrap_or(0.0);
                let secs = w.ended_at.unwrap_or(now).saturating_sub(w.launched_at);
                price * secs as f64 / 3600.0
            })
            .sum();
        // Where each running worker is reached, as its provider last said (a cloud machine's
        // address is learned by its poller and may change).
        for info in &mut self.record.workers {
            if let Some(a) = self.workers.get(&info.id).and_then(|w| w.address()) {
                info.address = Some(a);
            }
        }
        if let Err(e) = self.record.save(&self.dir) {
            warn!(error = %e, "cannot save the job record");
        }
        let coord = self.coord.clone();
        let id = self.record.job.clone();
        let record = bytes::Bytes::from(serde_json::to_vec(&self.record).expect("serializes"));
        let _ = self.rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(2), coord.put_job(&id, record)).await
        });
    }

    pub fn set_state(&mut self, state: JobState) {
        self.record.state = state;
        self.save();
    }

    /// Launches a worker on the cheapest offer that fits `spec` (the next one when a provider
    /// has no capacity) and waits until it registered.
    pub fn launch(&mut self, spec: &Spec) -> Result<Worker, JobError> {
        self.launch_among(spec, None)
    }

    /// The time on the policy's clock: since this driver took the job.
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// The offers fitting `spec`, best first as the policy ranks them ([`policy::Policy::rank`]:
    /// the avoided ones left out unless only they fit), and why others were left out.
    pub fn offers(&mut self, spec: &Spec) -> (Vec<Offer>, Vec<String>) {
        let (offers, why) = self.rt.block_on(providers::ranked(&self.providers, spec));
        let now = self.now();
        (self.policy.rank(now, offers), why)
    }

    /// Launches on other offers than `offer` for `how_long` (unless nothing else fits).
    pub fn avoid(&mut self, offer: &Offer, how_long: Duration) {
        let now = self.now();
        self.policy.avoid(offer, now, how_long);
    }

    /// The offer `worker` was launched on.
    pub fn offer_of(&self, worker: &str) -> Option<Offer> {
        self.record
            .workers
            .iter()
            .find(|w| w.id == worker)
            .and_then(|w| w.offer.clone())
    }

    /// Like [`Job::launch`], on one of `among` only (in the policy's order) when given: a move
    /// to a cheaper offer goes to an offer that is cheaper, or nowhere.
    /// A worker that does not come up (it exits, or does not register within its provider's
    /// boot time) is ended and its offer passed over for 10 minutes; the next offer is tried,
    /// three launches at most.
    pub fn launch_among(
        &mut self,
        spec: &Spec,
        among: Option<&[Offer]>,
    ) -> Result<Worker, JobError> {
        let mut last = None;
        let mut attempts = 0;
        while attempts < 3 {
            attempts += 1;
            match self.launch_once(spec, among) {
                Ok(w) => {
                    self.waiting_for_spot = None;
                    return Ok(w);
                }
                Err((JobError::SpotWait, _)) => {
                    // Spot is full everywhere: wait a little and ask again (not an attempt).
                    attempts -= 1;
                    let down = self.down.clone();
                    let poll = self.policy.options().wait_for_spot.map_or(SPOT_POLL, |w| {
                        (w / 4).clamp(Duration::from_millis(200), SPOT_POLL)
                    });
                    let stopped = self.rt.block_on(async {
                        tokio::select! {
                            _ = down.wait() => true,
                            _ = tokio::time::sleep(poll) => false,
                        }
                    });
                    if stopped {
                        return Err(JobError::Down);
                    }
                }
                Err((e, Some(offer))) if !matches!(e, JobError::Down) => {
                    info!(error = %e, "the worker did not come up; trying the next offer");
                    self.reporter.note(&format!("{e}; trying the next offer"));
                    self.avoid(&offer, Duration::from_secs(600));
                    last = Some(e);
                }
                // Nothing else to try: what went wrong with the one that was tried says more.
                Err((JobError::NoOffer { .. }, None)) if last.is_some() => break,
                Err((e, _)) => return Err(e),
            }
        }
        Err(last.expect("a launch was tried"))
    }

    /// One launch: `Err((error, Some(offer)))` when a worker was launched on `offer` but did
    /// not come up.
    fn launch_once(
        &mut self,
        spec: &Spec,
        among: Option<&[Offer]>,
    ) -> Result<Worker, (JobError, Option<Box<Offer>>)> {
        self.next_worker += 1;
        let id = format!("w{}", self.next_worker);
        let (mut offers, why) = self.offers(spec);
        if let Some(among) = among {
            offers.retain(|o| among.iter().any(|a| same_offer(a, o)));
        }
        if offers.is_empty() {
            return Err((
                JobError::NoOffer {
                    spec: serde_json::to_string(spec).unwrap_or_default(),
                    why: if why.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", why.join("; "))
                    },
                },
                None,
            ));
        }
        let log = self.dir.join("logs").join(format!("{id}.log"));
        let mut launched = None;
        let mut boot_timeout = providers::DEFAULT_BOOT_TIMEOUT;
        let mut spot_full = false;
        for offer in offers {
            // Every spot offer tried is full: on-demand only once the policy stops waiting.
            if spot_full && !offer.spot {
                let now = self.now();
                let since = *self.waiting_for_spot.get_or_insert(now);
                if self.policy.wait_for_spot(now, since) {
                    if since == now {
                        self.reporter.note(&format!(
                            "no spot capacity; waiting up to {} s for some before on-demand",
                            self.policy
                                .options()
                                .wait_for_spot
                                .unwrap_or_default()
                                .as_secs()
                        ));
                    }
                    return Err((JobError::SpotWait, None));
                }
            }
            let Some(p) = self
                .providers
                .iter_mut()
                .find(|p| p.name() == offer.provider)
            else {
                continue;
            };
            // The worker's own credential: a user on the embedded server, a user minted with
            // the account's seed on a server the user runs, else the shared token.
            let minted = cedana_protocol::NatsCredential::parse(&self.token).mint_worker(
                &self.id,
                &id,
                self.record.settings.bucket(),
            );
            let credential = match &self.nats_users {
                Some(users) => match self.rt.block_on(users.add_worker(&id)) {
                    Ok(c) => c,
                    Err(e) => {
                        return Err((
                            JobError::Worker {
                                worker: id.clone(),
                                message: e.to_string(),
                            },
                            None,
                        ))
                    }
                },
                None => match minted {
                    Some(Ok(c)) => c.to_secret(),
                    Some(Err(e)) => {
                        return Err((
                            JobError::Worker {
                                worker: id.clone(),
                                message: format!("cannot make the worker's NATS user: {e}"),
                            },
                            None,
                        ))
                    }
                    None => self.token.clone(),
                },
            };
            let boot = Bootstrap {
                job: &self.id,
                worker: &id,
                nats_url: &self.nats_url,
                token: credential.expose(),
                job_dir: &self.dir,
                shared_storage: self.shared_storage.as_deref(),
                store: self.store.as_ref().map(|s| s.as_str()),
                bucket: self.record.settings.checkpoint_bucket.as_deref(),
                rt: &self.rt,
            };
            match self.rt.block_on(p.launch(&offer, &boot)) {
                Ok(w) => {
                    boot_timeout = p.boot_timeout();
                    launched = Some((w, offer));
                    break;
                }
                Err(e @ providers::ProviderError::Capacity { .. }) => {
                    spot_full |= offer.spot;
                    info!(error = %e, "no capacity; trying the next offer");
                    self.reporter.note(&format!("{e}; trying the next offer"));
                }
                Err(e) => return Err((e.into(), None)),
            }
        }
        let Some((w, offer)) = launched else {
            return Err((
                JobError::NoOffer {
                    spec: serde_json::to_string(spec).unwrap_or_default(),
                    why: ": every fitting offer is out of capacity".into(),
                },
                None,
            ));
        };
        info!(worker = %id, provider = %offer.provider, instance_type = %offer.instance_type, price = offer.price_usd_hour, "launching");
        self.reporter.note(&format!(
            "worker {id}: launching {} at ${:.4}/h ({})",
            offer.name(),
            offer.price_usd_hour,
            offer.price_source
        ));
        let launched_at = Instant::now();
        self.record.workers.push(WorkerInfo {
            id: id.clone(),
            provider: offer.provider.clone(),
            pid: w
                .instance_id()
                .strip_prefix("pid ")
                .and_then(|p| p.parse().ok())
                .unwrap_or(0),
            dir: w.local_dir().unwrap_or_default(),
            netns: w.netns(),
            launched_at: protocol::now(),
            state: WorkerState::Running,
            instance: w.instance_id(),
            offer: Some(offer.clone()),
            ended_at: None,
            forward: w.forward(),
            address: w.address(),
        });
        self.workers.insert(id.clone(), w);
        self.save();
        let coord = self.coord.clone();
        let gone = self.workers[&id].gone();
        let down = self.down.clone();
        let registered = self.rt.block_on(async {
            tokio::select! {
                // A cloud machine may take minutes to boot: taking the job down does not wait.
                _ = down.wait() => Err(JobError::Down),
                r = coord.wait_registered(&id, boot_timeout.as_secs().max(1)) => r.map_err(JobError::from),
                _ = gone.wait() => Err(JobError::Lost {
                    worker: id.clone(),
                    reason: format!(
                        "it exited before registering; its log says: {}",
                        last_lines(&log, 3)
                    ),
                }),
            }
        });
        if let Err(e) = registered {
            self.end_worker(&id, WorkerState::Lost);
            return Err((e, Some(Box::new(offer))));
        }
        // A cloud machine's address is known once it runs: `port` and `status` need it (the
        // record takes it, and any later change, on each save).
        self.rt.block_on(self.workers[&id].learn_address());
        self.save();
        info!(worker = %id, "worker launched");
        self.reporter.note(&format!(
            "worker {id}: up in {:.1} s",
            launched_at.elapsed().as_secs_f64()
        ));
        Ok(Worker { id })
    }

    /// Why `worker` is lost, if it is: its daemon exited, or it has been silent too long.
    pub fn lost(&self, worker: &str) -> Option<String> {
        let w = self.workers.get(worker)?;
        lost_reason(w.gone().is_set(), self.coord.silence(worker))
    }

    /// Sends a command to `worker` and waits for its reply (an error reply is an error).
    pub fn call(&self, worker: &str, command: Command, secs: u64) -> Result<Reply, JobError> {
        let gone = self
            .workers
            .get(worker)
            .map(|w| w.gone())
            .ok_or_else(|| JobError::NoWorker(worker.into()))?;
        let coord = self.coord.clone();
        let down = self.down.clone();
        let lost = move || {
            if down.is_set() {
                return Some("the job is being taken down".to_string());
            }
            lost_reason(gone.is_set(), coord.silence(worker))
        };
        let coord = self.coord.clone();
        match self.rt.block_on(coord.call(worker, command, secs, &lost)) {
            Ok(Reply::Error { message }) => Err(JobError::Worker {
                worker: worker.into(),
                message,
            }),
            Ok(r) => Ok(r),
            Err(CoordError::Lost { reason, .. }) => Err(JobError::Lost {
                worker: worker.into(),
                reason,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Runs `sh -c cmd` on the worker: (exit code, stdout, stderr).
    pub fn sh(&self, w: &Worker, cmd: &str) -> Result<(i32, String, String), JobError> {
        match self.call(
            &w.id,
            Command::Sh {
                cmd: cmd.into(),
                timeout_secs: Some(3600),
            },
            3700,
        )? {
            Reply::Sh {
                exit_code,
                stdout,
                stderr,
            } => Ok((exit_code, stdout, stderr)),
            other => Err(unexpected(&w.id, "sh", other)),
        }
    }

    /// Starts the job's task on `w` (with a user namespace and a minimal mount tree of its own
    /// if `userns`: for a task that drops root).
    pub fn spawn(&mut self, w: &Worker, cmd: &str, userns: bool) -> Result<Task, JobError> {
        self.next_task += 1;
        let name = format!("task{}", self.next_task);
        self.coord.reset_exit(&w.id, &name);
        match self.call(
            &w.id,
            Command::Spawn {
                task: name.clone(),
                cmd: cmd.into(),
                userns,
            },
            60,
        )? {
            Reply::Spawned { pid, .. } => {
                self.track_task(&name, &w.id, pid);
                Ok(Task {
                    name,
                    worker: w.id.clone(),
                })
            }
            other => Err(unexpected(&w.id, "spawn", other)),
        }
    }

    fn track_task(&mut self, name: &str, worker: &str, pid: i32) {
        if let Some(w) = self.workers.get_mut(worker) {
            w.note_task(pid);
        }
        self.record.task = Some(TaskInfo {
            name: name.into(),
            worker: worker.into(),
            pid,
        });
        self.save();
    }

    /// Checkpoints `t` (its files included) into the object store or shared storage.
    pub fn checkpoint(&mut self, t: &Task, leave_running: bool) -> Result<Checkpoint, JobError> {
        self.checkpoint_for(t, leave_running, None)
    }

    /// Checkpoints `t`, as [`Job::checkpoint`]; with `reader` on another machine, the worker
    /// that will restore it reads it while it is stored ([`Command::Prefetch`]), so that a
    /// move's downtime is not the upload followed by the download. Not between two local
    /// workers: they share this machine's CPUs, and reading while storing only slows the
    /// upload there (tools/bench-migrate.sh, `none` against `none-after`). A reader that
    /// cannot prefetch (shared storage, an error) only loses that: its restore reads the
    /// stored object.
    pub fn checkpoint_for(
        &mut self,
        t: &Task,
        leave_running: bool,
        reader: Option<&Worker>,
    ) -> Result<Checkpoint, JobError> {
        let is_local = |w: &str| self.offer_of(w).is_some_and(|o| o.provider == "local");
        let one_machine = reader.is_some_and(|to| is_local(&to.id) && is_local(&t.worker));
        let no_prefetch = self.shared_storage.is_some() || self.store.is_some() || one_machine;
        // A move into a checkpoint store: the new worker starts the task as soon as the
        // manifest is published; the chunks follow (post-copy).
        let post_copy =
            !leave_running && self.store.is_some() && reader.is_some_and(|to| to.id != t.worker);
        let chunks = match (reader, no_prefetch) {
            (Some(to), false) => {
                let chunks = protocol::new_chunks_id();
                let cmd = Command::Prefetch {
                    chunks: chunks.clone(),
                };
                match self.call(&to.id, cmd, 60) {
                    Ok(_) => Some(chunks),
                    Err(e) => {
                        warn!(worker = %to.id, error = %e, "the new worker cannot read the checkpoint while it is stored; it will read it afterwards");
                        None
                    }
                }
            }
            _ => None,
        };
        let cmd = Command::Checkpoint {
            task: t.name.clone(),
            leave_running,
            compression: cedana_protocol::Compression::Zstd,
            chunks,
            criu: None,
            post_copy,
        };
        let started = Instant::now();
        match self.call(&t.worker, cmd, 3600)? {
            Reply::Checkpointed {
                object,
                post_copy: true,
                ..
            } => {
                self.reporter.note(&format!(
                    "checkpoint {object}: published in {:.2} s, its memory follows (post-copy)",
                    started.elapsed().as_secs_f64()
                ));
                self.pending_copy = Some((t.worker.clone(), object.clone(), t.name.clone()));
                Ok(Checkpoint {
                    object,
                    task: t.name.clone(),
                    manifest: None,
                })
            }
            Reply::Checkpointed {
                object,
                bytes,
                manifest,
                ..
            } => {
                self.reporter.note(&format!(
                    "checkpoint {object}: {:.1} MiB in {:.2} s",
                    bytes as f64 / 1048576.0,
                    started.elapsed().as_secs_f64()
                ));
                self.record.checkpoints.push(CheckpointInfo {
                    object: object.clone(),
                    task: t.name.clone(),
                    worker: t.worker.clone(),
                    at: protocol::now(),
                    bytes,
                    manifest: manifest.clone(),
                });
                self.save();
                Ok(Checkpoint {
                    object,
                    task: t.name.clone(),
                    manifest,
                })
            }
            other => Err(unexpected(&t.worker, "checkpoint", other)),
        }
    }

    /// Records a checkpoint a worker took by itself (on a spot notice).
    pub fn record_checkpoint(&mut self, c: &Checkpoint, worker: &str) {
        self.record.checkpoints.push(CheckpointInfo {
            object: c.object.clone(),
            task: c.task.clone(),
            worker: worker.into(),
            at: protocol::now(),
            bytes: 0,
            manifest: c.manifest.clone(),
        });
        self.save();
    }

    /// Whether `object` is a move's checkpoint still being stored (post-copy).
    pub fn is_pending_copy(&self, object: &str) -> bool {
        self.pending_copy.as_ref().is_some_and(|p| p.1 == object)
    }

    /// Forgets the move's checkpoint being stored: it is not waited for nor recorded.
    pub fn abandon_copy(&mut self) {
        self.pending_copy = None;
    }

    /// Waits until the move's checkpoint published ahead of its chunks (post-copy) is stored,
    /// and records it; if it never will be (its worker failed or went silent), says so: the
    /// task restored from it is ended by its worker when a chunk does not come, and recovers
    /// from the checkpoint before.
    pub fn settle_copy(&mut self) {
        let Some((worker, object, task)) = self.pending_copy.take() else {
            return;
        };
        let mut watch = self.coord.stored_watch(&worker, &object);
        let t0 = Instant::now();
        let outcome = loop {
            if let Some(r) = watch.borrow_and_update().clone() {
                break r;
            }
            if let Some(reason) = self.lost(&worker) {
                break Err(format!("worker {worker} was lost ({reason})"));
            }
            if self.down.is_set() {
                break Err("the job was taken down".into());
            }
            if t0.elapsed() > Duration::from_secs(2 * 3600) {
                break Err("not stored within 2 hours".into());
            }
            let _ = self.rt.block_on(async {
                tokio::time::timeout(Duration::from_millis(500), watch.changed()).await
            });
        };
        match outcome {
            Ok(bytes) => {
                self.reporter.note(&format!(
                    "checkpoint {object}: {:.1} MiB stored {:.1} s after the task ran again",
                    bytes as f64 / 1048576.0,
                    t0.elapsed().as_secs_f64()
                ));
                self.record.checkpoints.push(CheckpointInfo {
                    object,
                    task,
                    worker,
                    at: protocol::now(),
                    bytes,
                    manifest: None,
                });
                self.save();
            }
            Err(why) => {
                warn!(checkpoint = %object, %why, "a post-copy checkpoint was not stored");
                self.reporter.note(&format!(
                    "checkpoint {object} could not be stored ({why}); the task restored from it cannot get its memory and will be recovered"
                ));
            }
        }
    }

    /// Restores `c` on `w` (its files first).
    pub fn restore(&mut self, c: &Checkpoint, w: &Worker) -> Result<Task, JobError> {
        self.coord.reset_exit(&w.id, &c.task);
        let pending = self.pending_copy.as_ref().is_some_and(|p| p.1 == c.object);
        match self.call(
            &w.id,
            Command::Restore {
                task: c.task.clone(),
                object: c.object.clone(),
                pending,
                manifest: c.manifest.clone(),
            },
            3600,
        )? {
            Reply::Restored {
                pid,
                read_while_stored,
                lazy,
                ..
            } => {
                if read_while_stored {
                    self.reporter
                        .note(&format!("{} read the checkpoint while it was stored", w.id));
                }
                if lazy {
                    self.reporter.note(&format!(
                        "{} runs task {} before its memory is back (lazy restore)",
                        w.id, c.task
                    ));
                }
                self.track_task(&c.task, &w.id, pid);
                self.restored_from.insert(c.task.clone(), c.object.clone());
                Ok(Task {
                    name: c.task.clone(),
                    worker: w.id.clone(),
                })
            }
            Reply::BadCheckpoint { message, .. } => Err(JobError::BadCheckpoint {
                worker: w.id.clone(),
                checkpoint: c.object.clone(),
                message,
            }),
            other => Err(unexpected(&w.id, "restore", other)),
        }
    }

    /// Kills task `t`.
    pub fn stop(&self, t: &Task) -> Result<(), JobError> {
        self.call(
            &t.worker,
            Command::Stop {
                task: t.name.clone(),
            },
            60,
        )
        .map(|_| ())
    }

    /// Ends a worker as an instance ends.
    pub fn terminate(&mut self, w: &Worker) {
        self.end_worker(&w.id, WorkerState::Terminated);
    }

    /// Ends a worker and records how it ended (`Terminated` or `Lost`). A lost worker is
    /// fenced first ([`Job::fence`]).
    pub fn end_worker(&mut self, id: &str, how: WorkerState) {
        if how == WorkerState::Lost && self.workers.contains_key(id) {
            self.fence(id);
        }
        if let Some(mut lw) = self.workers.remove(id) {
            match how {
                WorkerState::Lost => self.rt.block_on(lw.lose()),
                _ => self.rt.block_on(lw.terminate()),
            }
        }
        // A terminated worker's user goes with it: whatever it left running cannot speak on
        // NATS again. A lost one keeps its user, to read its revocation if it comes back.
        if let (Some(users), false) = (&self.nats_users, how == WorkerState::Lost) {
            if let Err(e) = users.remove_worker(id) {
                warn!(worker = id, error = %e, "cannot remove the worker's NATS user");
            }
        }
        if let Some(info) = self.record.workers.iter_mut().find(|w| w.id == id) {
            if info.state == WorkerState::Running {
                info.state = how;
                info.ended_at = Some(protocol::now());
            }
        }
        self.save();
    }

    /// Fences a lost worker before its task runs anywhere else: its lease is revoked (its
    /// agent kills its tasks once it reaches NATS again), and the driver waits until the lease
    /// has run out by its own clock (the last time it heard from the worker, plus the lease
    /// and a margin): by then an agent cut off from NATS has frozen its tasks. Ending the
    /// worker through its provider comes after, and is not relied on.
    pub fn fence(&self, worker: &str) {
        let coord = self.coord.clone();
        let revoked = self.rt.block_on(async {
            for _ in 0..10 {
                match tokio::time::timeout(Duration::from_secs(2), coord.revoke(worker)).await {
                    Ok(Ok(())) => return true,
                    _ => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
            false
        });
        if !revoked {
            warn!(worker, "cannot revoke the lost worker's lease; its agent, if it lives, freezes its tasks when its lease runs out");
        }
        let Some(seen) = self.coord.last_seen(worker) else {
            return;
        };
        let until = seen + Duration::from_secs(protocol::LEASE_SECS + protocol::LEASE_MARGIN_SECS);
        let wait = until.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            info!(
                worker,
                secs = wait.as_secs_f64(),
                "waiting for the lost worker's lease to run out"
            );
            let down = self.down.clone();
            self.rt.block_on(async {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = down.wait() => {}
                }
            });
        }
    }

    /// Waits until `t` exits. Ends early if its worker is lost or the job is taken down.
    pub fn wait(&self, t: &Task) -> Result<Exit, JobError> {
        let gone = self.workers.get(&t.worker).map(Instance::gone);
        self.rt.block_on(async {
            let mut exit = self.coord.exit_watch(&t.worker, &t.name);
            loop {
                if let Some(e) = exit.borrow_and_update().clone() {
                    return Ok(e);
                }
                if self.down.is_set() {
                    return Err(JobError::Down);
                }
                if let Some(reason) = self.lost(&t.worker) {
                    return Err(JobError::Lost {
                        worker: t.worker.clone(),
                        reason,
                    });
                }
                // Silence is looked at again when the worker could first have been silent
                // too long; anything else wakes the wait when it happens.
                let silence = match self.coord.silence(&t.worker) {
                    Some(silent) => {
                        HEARTBEAT_TIMEOUT.saturating_sub(silent) + Duration::from_millis(100)
                    }
                    None => crate::coord::PROBE_EVERY,
                };
                tokio::select! {
                    changed = exit.changed() => {
                        if changed.is_err() {
                            // Its exit was reset: follow the new one.
                            exit = self.coord.exit_watch(&t.worker, &t.name);
                        }
                    }
                    _ = self.down.wait() => {}
                    _ = async {
                        match &gone {
                            Some(g) => g.wait().await,
                            None => std::future::pending().await,
                        }
                    } => {}
                    _ = tokio::time::sleep(silence) => {}
                }
            }
        })
    }

    /// Copies a file or folder from this machine into worker `w`'s folder.
    pub fn upload(&self, w: &Worker, from: &Path) -> Result<(), JobError> {
        let dir = self
            .workers
            .get(&w.id)
            .ok_or_else(|| JobError::NoWorker(w.id.clone()))?
            .local_dir()
            .ok_or_else(|| JobError::Worker {
                worker: w.id.clone(),
                message: "this worker has no folder on this machine to upload into".into(),
            })?;
        let name = from.file_name().ok_or_else(|| JobError::Worker {
            worker: w.id.clone(),
            message: format!("upload needs a file or folder path, not {}", from.display()),
        })?;
        copy_tree(from, &dir.join(name)).map_err(|e| JobError::Worker {
            worker: w.id.clone(),
            message: format!("upload of {}: {e}", from.display()),
        })
    }

    /// Deletes all but the newest `keep` checkpoints from the store (they stay in the record,
    /// marked by their absence from `kept`).
    pub fn prune_checkpoints(&mut self, keep: usize) {
        if let Some(url) = &self.store {
            // Whatever the record holds, the store's newest `keep` stay (a spot notice's
            // checkpoint too), and the chunks only they name.
            // And the newest the record names (a spot notice's checkpoint may have come in
            // after it).
            let keep = cedana_store::Keep {
                newest: keep,
                names: self
                    .record
                    .checkpoints
                    .last()
                    .map(|c| c.object.clone())
                    .into_iter()
                    .collect(),
            };
            let result = cedana_store::Store::open(url).and_then(|st| {
                self.rt
                    .block_on(async move { cedana_store::prune(&st, &keep).await })
            });
            match result {
                Ok(out) => {
                    tracing::debug!(removed = out.removed.len(), chunks_removed = out.chunks_removed, deferred = ?out.chunks_deferred, "pruned the checkpoint store");
                    self.pruned.extend(out.removed);
                }
                Err(e) => warn!(error = %e, "cannot prune the checkpoint store"),
            }
            return;
        }
        let n = self.record.checkpoints.len();
        if n <= keep {
            return;
        }
        let old: Vec<String> = self.record.checkpoints[..n - keep]
            .iter()
            .map(|c| c.object.clone())
            .filter(|o| !self.pruned.contains(o))
            .collect();
        for object in old {
            let result = match &self.shared_storage {
                Some(dir) => std::fs::remove_file(dir.join(&object)).map_err(|e| e.to_string()),
                None => {
                    let coord = self.coord.clone();
                    self.rt
                        .block_on(async move { coord.delete_checkpoint(&object).await })
                        .map_err(|e| e.to_string())
                }
            };
            if let Err(e) = result {
                warn!(error = %e, "cannot delete an old checkpoint");
            }
        }
        self.pruned.extend(
            self.record.checkpoints[..n - keep]
                .iter()
                .map(|c| c.object.clone()),
        );
    }

    /// What the job's workers would have cost at on-demand prices (the catalog's price of
    /// each spot machine type; a spot type the catalog does not price counts at its own).
    pub fn on_demand_cost(&self) -> f64 {
        let catalog = providers::catalog::Catalog::load()
            .unwrap_or_else(|_| providers::catalog::Catalog::builtin());
        let now = protocol::now();
        self.record
            .workers
            .iter()
            .filter_map(|w| {
                let o = w.offer.as_ref()?;
                let price = catalog.on_demand_price(o).unwrap_or(o.price_usd_hour);
                let secs = w.ended_at.unwrap_or(now).saturating_sub(w.launched_at);
                Some(price * secs as f64 / 3600.0)
            })
            .sum()
    }

    /// One line on how the job went: how long, checkpoints, recoveries, moves, cost.
    pub fn summary(&self) -> String {
        let r = &self.record;
        let secs = protocol::now().saturating_sub(r.started_at);
        let moves = r.migrations;
        format!(
            "{} in {}h{:02}m{:02}s: {} checkpoint{}, {} recover{}, {} move{} ({} to a cheaper offer, {} on a spot notice); cost ${:.4} (${:.4} at on-demand prices)",
            serde_json::to_value(r.state)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            secs / 3600,
            secs / 60 % 60,
            secs % 60,
            r.checkpoints.len(),
            if r.checkpoints.len() == 1 { "" } else { "s" },
            r.recoveries,
            if r.recoveries == 1 { "y" } else { "ies" },
            moves,
            if moves == 1 { "" } else { "s" },
            r.arbitrage_moves,
            r.spot_notices,
            r.cost_usd + 0.0,
            self.on_demand_cost() + 0.0
        )
    }

    /// Ends every worker (the job is over).
    pub fn end(&mut self) {
        let ids: Vec<String> = self.workers.keys().cloned().collect();
        for id in ids {
            self.end_worker(&id, WorkerState::Terminated);
        }
    }
}

/// Why a worker is lost: its agent exited, or it has been silent too long while the NATS
/// server stored what it was sent (a server that cannot store silences every worker).
fn lost_reason(exited: bool, silence: Option<Duration>) -> Option<String> {
    if exited {
        return Some("its agent exited".into());
    }
    match silence {
        Some(d) if d > HEARTBEAT_TIMEOUT => Some(format!("no heartbeat for {} s", d.as_secs())),
        _ => None,
    }
}

/// The last `n` lines of a log file, on one line.
fn last_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(n).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

fn unexpected(worker: &str, what: &'static str, reply: Reply) -> JobError {
    JobError::Unexpected {
        worker: worker.into(),
        what,
        reply: format!("{reply:?}"),
    }
}

/// Copies a file, or a folder recursively.
pub fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    let meta = std::fs::metadata(from)?;
    if meta.is_dir() {
        std::fs::create_dir_all(to)?;
        for e in std::fs::read_dir(from)? {
            let e = e?;
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        }
        Ok(())
    } else {
        std::fs::copy(from, to).map(|_| ())
    }
}
