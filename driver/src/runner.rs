//! `cedana-driver run FILE`: one job from start to end.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use crate::coord::nats::EmbeddedNats;
use crate::coord::Coordinator;
use crate::job::managed::{self, FlowError};
use crate::job::record::{JobRecord, JobState, Settings, OUTPUT_FILE, OUTPUT_SEQ_FILE, TOKEN_FILE};
use crate::job::{Job, JobError};
use crate::jobfile::script::{self, ScriptError};

/// Errors of a run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Script(#[from] ScriptError),
    #[error("checkpoint_store.url in the config or --store: {0}")]
    Store(Box<cedana_store::StoreError>),
    #[error(transparent)]
    Nats(#[from] crate::coord::nats::NatsError),
    #[error(transparent)]
    Coord(#[from] crate::coord::CoordError),
    #[error(transparent)]
    Flow(FlowError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: a job is a Rhai script (.rhai) or a YAML job spec (.yml, .yaml)")]
    Unsupported { path: PathBuf },
    #[error("job {job} was taken down")]
    Down { job: String },
    #[error("shared_storage.dump_storage_dir {path} is in a folder that does not exist here; point it at a folder every worker mounts, or remove the key to keep checkpoints in NATS")]
    SharedStorage { path: PathBuf },
    #[error(transparent)]
    State(#[from] crate::job::record::StateError),
    #[error("job {job} has ended ({state}); there is nothing to resume")]
    Ended { job: String, state: String },
    #[error("job {job} is running under its controller (PID {pid}); `cedana-driver attach {job}` follows it")]
    Controlled { job: String, pid: u32 },
    #[error("job {job} ended under another controller")]
    EndedElsewhere {
        job: String,
        exit_status: Option<u8>,
    },
    #[error("job {job} runs a script's own code, which cannot be picked up halfway; only jobs on the managed flow (hooks, YAML specs) can be resumed; `cedana-driver down {job}` ends it")]
    NotResumable { job: String },
    #[error("none of the enabled providers {enabled:?} is available in this release; add \"local\" to enabled_providers in the config")]
    NoProvider { enabled: Vec<String> },
    #[error("provider {provider} launches cloud machines, which cannot reach the job's NATS server ({url}); set connection.nats_url (and connection.auth_token) in the config to a NATS server with JetStream the machines can reach (docs/providers.md)")]
    NatsUnreachable { provider: String, url: String },
    #[error("provider {provider} is not built into this driver; build it with the cargo feature `{feature}` (on by default)")]
    NotBuiltIn {
        provider: String,
        feature: &'static str,
    },
}

impl From<FlowError> for RunError {
    fn from(e: FlowError) -> Self {
        match e {
            FlowError::JobFile(e) => match e.downcast::<ScriptError>() {
                Ok(s) => RunError::Script(*s),
                Err(e) => RunError::Flow(FlowError::JobFile(e)),
            },
            other => RunError::Flow(other),
        }
    }
}

/// Options of a run.
pub struct RunOptions {
    pub script: PathBuf,
    pub config: cedana_protocol::Config,
    /// Where jobs keep their folders [default: $CEDANA_STATE_DIR, ~/.cedana/jobs].
    pub state_dir: PathBuf,
    /// Checkpoint interval of the managed flow, overriding the config (0: none).
    pub checkpoint_every: Option<u64>,
    /// Boot local workers as runc containers from this worker image (OCI layout).
    pub image: Option<PathBuf>,
    /// Price the spec again this often and move to a cheaper offer, overriding the config's
    /// `arbitrage` block (0: off).
    pub arbitrage_every: Option<u64>,
    /// The margin (percent) an offer must be cheaper by, overriding the config.
    pub arbitrage_margin: Option<f64>,
    /// Seconds to wait for spot capacity before launching on-demand.
    pub wait_for_spot: Option<u64>,
    /// Where the job's lines for the user go.
    pub reporter: crate::job::report::SharedReporter,
    /// The config file named on the command line (kept in the record for `resume`).
    pub config_path: Option<PathBuf>,
    /// The job's id, chosen by the front end that follows the job (a new one if `None`).
    pub job_id: Option<String>,
    /// Task ports forwarded from this machine's loopback: (local, task's).
    pub expose: Vec<(u16, u16)>,
}

/// The arbitrage settings of the command line over the config's `arbitrage` block.
pub fn arbitrage(
    config: &cedana_protocol::config::ArbitrageConfig,
    every: Option<u64>,
    margin: Option<f64>,
) -> Option<managed::Arbitrage> {
    let secs = match every {
        Some(0) => return None,
        Some(s) => s,
        None if config.enabled != Some(true) => return None,
        None => config.interval_seconds.unwrap_or(600).max(1),
    };
    let percent = margin.or(config.margin_percent).unwrap_or(20.0);
    Some(managed::Arbitrage {
        every: Duration::from_secs(secs),
        margin: (percent / 100.0).clamp(0.0, 1.0),
    })
}

/// The default state folder.
pub fn default_state_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("CEDANA_STATE_DIR") {
        return PathBuf::from(p);
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/cedana"))
        .join(".cedana")
        .join("jobs")
}

enum Kind {
    Rhai,
    Yaml,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RunError {
    let path = path.to_path_buf();
    move |source| RunError::Io { what, path, source }
}

/// A job file and the providers' settings, checked before anything starts.
pub struct Checked {
    yaml: Option<crate::jobfile::yaml::JobSpec>,
    script_dir: PathBuf,
    pub providers: Vec<crate::providers::Provider>,
}

/// Checks the job file (syntax errors with file, line and column) and the providers'
/// settings (a missing key, a cloud provider without a NATS server the machines can reach):
/// what `run` does before anything starts; the front end that starts the job's controller
/// does it first too, so that these errors reach the terminal.
pub fn check(
    path: &Path,
    config: &cedana_protocol::Config,
    image: Option<&Path>,
    reporter: &dyn crate::job::report::Reporter,
) -> Result<Checked, RunError> {
    let kind = match path.extension().and_then(|e| e.to_str()) {
        Some("rhai") => Kind::Rhai,
        Some("yml" | "yaml") => Kind::Yaml,
        _ => return Err(RunError::Unsupported { path: path.into() }),
    };
    let script_dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let yaml = match kind {
        Kind::Rhai => {
            script::compile(&script::sandbox(&script_dir), path)?;
            None
        }
        Kind::Yaml => Some(crate::jobfile::yaml::load(path, reporter)?),
    };
    if let Some(c) = &config.checkpoint_store {
        cedana_store::StoreUrl::parse(&c.url).map_err(|e| RunError::Store(Box::new(e)))?;
    }
    if let Some(dir) = shared_storage(config) {
        // The original's default was under /home/ubuntu: a folder whose parent is missing is
        // a config from another machine, not a place to create.
        let parent_missing = dir
            .parent()
            .is_some_and(|p| !p.as_os_str().is_empty() && !p.is_dir());
        if parent_missing {
            return Err(RunError::SharedStorage { path: dir });
        }
    }
    let providers = providers(config, image, reporter)?;
    for p in &providers {
        if p.name() != "local" {
            cloud_needs_nats(config, p.name())?;
        }
    }
    Ok(Checked {
        yaml,
        script_dir,
        providers,
    })
}

/// A new job id for the job file `path`: its name and six random hex digits.
pub fn new_job_id(path: &Path) -> Result<String, RunError> {
    let stem: String = path
        .file_stem()
        .map(|s| cedana_protocol::sanitize(&s.to_string_lossy()))
        .unwrap_or_else(|| "job".into())
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(40)
        .collect();
    Ok(format!(
        "{stem}-{}",
        cedana_protocol::random_hex(3)
            .map_err(io("random", Path::new(cedana_protocol::ids::RANDOM_SOURCE)))?
    ))
}

/// The folder of job `id` under `state_dir` (absolute: the job's servers and workers are
/// started with paths in it).
pub fn job_dir(state_dir: &Path, id: &str) -> PathBuf {
    let dir = state_dir.join(id);
    std::path::absolute(&dir).unwrap_or(dir)
}

/// The managed flow's options as the record keeps them.
fn flow_options(s: &Settings) -> managed::Options {
    managed::Options {
        interval: s.interval_secs.map(Duration::from_secs),
        keep: s.keep.max(1),
        attempts: 3,
        arbitrage: s.arbitrage.map(|(every, margin)| managed::Arbitrage {
            every: Duration::from_secs(every.max(1)),
            margin,
        }),
        adaptive: true,
        wait_for_spot: s.wait_for_spot_secs.map(Duration::from_secs),
    }
}

/// Opens the job's output file (appending) and its sequence file.
fn open_output(job_dir: &Path) -> Result<crate::coord::Output, RunError> {
    let output = job_dir.join("logs").join(OUTPUT_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&output)
        .map_err(io("cannot create", &output))?;
    let seq_path = job_dir.join("logs").join(OUTPUT_SEQ_FILE);
    let seq = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&seq_path)
        .map_err(io("cannot create", &seq_path))?;
    Ok(crate::coord::Output {
        file,
        seq: Some(seq),
    })
}

/// Runs the job; returns the exit status it ends with (the task's, or the script's integer
/// result).
pub fn run(opts: RunOptions) -> Result<i64, RunError> {
    let path = &opts.script;
    let checked = check(path, &opts.config, opts.image.as_deref(), &*opts.reporter)?;
    let job_id = match &opts.job_id {
        Some(id) => id.clone(),
        None => new_job_id(path)?,
    };
    let job_dir = job_dir(&opts.state_dir, &job_id);
    for d in [job_dir.join("work"), job_dir.join("logs")] {
        std::fs::create_dir_all(&d).map_err(io("cannot create", &d))?;
    }

    let interval = match opts.checkpoint_every {
        Some(0) => None,
        Some(s) => Some(s),
        None if opts.config.checkpoint.heartbeat_enabled == Some(false) => None,
        None => Some(
            opts.config
                .checkpoint
                .heartbeat_interval_seconds
                .unwrap_or(60)
                .max(1),
        ),
    };
    let settings = Settings {
        interval_secs: interval,
        keep: 2,
        arbitrage: arbitrage(
            &opts.config.arbitrage,
            opts.arbitrage_every,
            opts.arbitrage_margin,
        )
        .map(|a| (a.every.as_secs(), a.margin)),
        image: opts
            .image
            .as_ref()
            .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())),
        config: opts
            .config_path
            .as_ref()
            .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())),
        expose: opts.expose.clone(),
        store: checkpoint_store(&opts.config).map(|u| u.to_string()),
        wait_for_spot_secs: opts.wait_for_spot.filter(|s| *s > 0),
        checkpoint_bucket: Some(cedana_protocol::job_checkpoints_bucket(&job_id)),
    };

    let (url, token, embedded) = if opts.config.connection.nats_url.is_empty() {
        let n = EmbeddedNats::create(
            &job_id,
            settings.bucket(),
            &job_dir,
            &job_dir.join(TOKEN_FILE),
        )?;
        (n.url.clone(), n.token.clone(), Some(n))
    } else {
        let c = &opts.config.connection;
        (
            cedana_protocol::NatsUrl::from_config(&c.nats_url, c.nats_port).to_string(),
            c.auth_token.clone(),
            None,
        )
    };
    let rt = tokio::runtime::Runtime::new().map_err(io("cannot start the runtime for", path))?;
    let coord = rt.block_on(Coordinator::connect(&url, token.expose(), &job_id, true))?;
    rt.block_on(coord.use_checkpoints(settings.bucket()))?;
    coord.set_output(open_output(&job_dir)?);
    opts.reporter
        .note(&format!("job {job_id}: folder {}", job_dir.display()));
    let store = checkpoint_store(&opts.config);
    opts.reporter.note(&match (&store, &embedded) {
        (Some(store), _) => format!(
            "checkpoints go to {} as chunks ({}; `cedana-agent prune --store URL --keep 0` removes them once the job is over)",
            store.join(&job_id),
            match opts.config.checkpoint_store.as_ref().is_some_and(|c| !c.url.is_empty()) {
                true => "checkpoint_store",
                false => "shared_storage.dump_storage_dir",
            }
        ),
        (None, Some(_)) => format!(
            "checkpoints go to the job's NATS store, {} (`cedana-driver rm {job_id}` removes them once the job is over)",
            job_dir.join(crate::coord::nats::NATS_DIR).display()
        ),
        (None, None) => format!(
            "checkpoints go to the job's object store {} of {url}",
            settings.bucket()
        ),
    });
    let record = JobRecord {
        v: 1,
        job: job_id.clone(),
        script: std::path::absolute(path).unwrap_or_else(|_| path.clone()),
        state: JobState::Starting,
        started_at: cedana_protocol::now(),
        updated_at: cedana_protocol::now(),
        driver_pid: std::process::id(),
        nats_url: url.clone(),
        embedded_nats: embedded.is_some(),
        managed: false,
        workers: Vec::new(),
        task: None,
        checkpoints: Vec::new(),
        recoveries: 0,
        migrations: 0,
        spot_notices: 0,
        arbitrage_moves: 0,
        cost_usd: 0.0,
        exit_code: None,
        error: None,
        nats_pid: embedded.as_ref().and_then(EmbeddedNats::pid).unwrap_or(0),
        events_seq: 0,
        output_seq: 0,
        settings,
        exit_status: None,
    };
    drive(Drive {
        rt,
        coord,
        url,
        token,
        job_dir,
        record,
        embedded,
        checked,
        script: path.clone(),
        // The shared folder is a folder store now (see `checkpoint_store`).
        shared_storage: None,
        reporter: opts.reporter,
        resumed: false,
    })
}

/// Where the job's checkpoints go as chunks: the config's `checkpoint_store.url` (usable:
/// [`check`] refused it otherwise), else the original's `shared_storage.dump_storage_dir` as a
/// folder store (every worker mounts it).
fn checkpoint_store(config: &cedana_protocol::Config) -> Option<cedana_store::StoreUrl> {
    match config
        .checkpoint_store
        .as_ref()
        .filter(|c| !c.url.is_empty())
    {
        Some(c) => cedana_store::StoreUrl::parse(&c.url).ok(),
        None => shared_storage(config)
            .map(|d| std::path::absolute(&d).unwrap_or(d))
            .and_then(|d| cedana_store::StoreUrl::parse(&d.to_string_lossy()).ok()),
    }
}

/// The config's `shared_storage.dump_storage_dir`, if set.
fn shared_storage(config: &cedana_protocol::Config) -> Option<PathBuf> {
    config
        .shared_storage
        .dump_storage_dir
        .clone()
        .filter(|p| !p.as_os_str().is_empty())
}

/// Options of `resume`.
pub struct ResumeOptions {
    pub state_dir: PathBuf,
    /// The job's id or a unique prefix of it.
    pub job: String,
    pub config: cedana_protocol::Config,
    pub reporter: crate::job::report::SharedReporter,
    /// The revision of the controller lease a standby took over (`None`: a plain resume,
    /// after the controller's process was found dead on this machine).
    pub takeover: Option<u64>,
}

/// Whether job `job` can be resumed: its folder and record, or why not.
pub fn resumable(state_dir: &Path, job: &str) -> Result<(PathBuf, JobRecord), RunError> {
    let (dir, record) = crate::job::record::find(state_dir, job)?;
    if record.state.is_final() {
        return Err(RunError::Ended {
            job: record.job.clone(),
            state: record.shown_state(),
        });
    }
    if record.driver_alive() {
        return Err(RunError::Controlled {
            job: record.job.clone(),
            pid: record.driver_pid,
        });
    }
    if !record.managed {
        return Err(RunError::NotResumable {
            job: record.job.clone(),
        });
    }
    Ok((dir, record))
}

/// Takes back a job whose controller died: its NATS server started again (the embedded one,
/// on the same port, token and store) if it is gone, its workers adopted, what happened
/// meanwhile read from the stored events, and the managed flow goes on.
pub fn resume(opts: ResumeOptions) -> Result<i64, RunError> {
    let (job_dir, mut record) = match opts.takeover {
        None => resumable(&opts.state_dir, &opts.job)?,
        // A standby took the lease: the controller it replaces may live on another machine.
        Some(_) => crate::job::record::find(&opts.state_dir, &opts.job)?,
    };
    let job_dir = std::path::absolute(&job_dir).unwrap_or(job_dir);
    let path = record.script.clone();
    let checked = check(
        &path,
        &opts.config,
        record.settings.image.as_deref(),
        &*opts.reporter,
    )?;
    let (url, token, embedded) = if record.embedded_nats {
        // A server the dead driver left running is stopped and started again as this
        // driver's own, on the same port, token and store.
        crate::coord::nats::end_orphan(&job_dir, record.nats_pid);
        let mut n = EmbeddedNats::open(&job_dir, &job_dir.join(TOKEN_FILE))?;
        n.spawn()?;
        (n.url.clone(), n.token.clone(), Some(n))
    } else {
        let c = &opts.config.connection;
        (record.nats_url.clone(), c.auth_token.clone(), None)
    };
    let rt = tokio::runtime::Runtime::new().map_err(io("cannot start the runtime for", &path))?;
    let output_seq = crate::coord::read_output_seq(&job_dir.join("logs").join(OUTPUT_SEQ_FILE));
    let coord = rt.block_on(Coordinator::connect_from(
        &url,
        token.expose(),
        &record.job,
        true,
        Some(record.events_seq),
        output_seq,
        opts.takeover,
    ))?;
    rt.block_on(coord.use_checkpoints(record.settings.bucket()))?;
    coord.set_output(open_output(&job_dir)?);
    rt.block_on(coord.caught_up(Duration::from_secs(30)));
    opts.reporter.note(&format!(
        "job {}: {} (its controller, PID {}, was gone); folder {}",
        record.job,
        if opts.takeover.is_some() {
            "taken over by the standby"
        } else {
            "resumed"
        },
        record.driver_pid,
        job_dir.display()
    ));
    record.driver_pid = std::process::id();
    record.nats_pid = embedded.as_ref().and_then(EmbeddedNats::pid).unwrap_or(0);
    drive(Drive {
        rt,
        coord,
        url,
        token,
        job_dir,
        record,
        embedded,
        checked,
        script: path,
        // The shared folder is a folder store now (see `checkpoint_store`).
        shared_storage: None,
        reporter: opts.reporter,
        resumed: true,
    })
}

/// `resume --standby`: waits while the job's controller holds its lease (renewed every
/// second in the jobs bucket); when the lease has not changed for
/// [`crate::coord::TAKEOVER_AFTER`], takes it (a write conditional on the revision seen, so
/// only one standby wins) and goes on as [`resume`]. Returns when the job ends, under this
/// controller or another.
pub fn standby(opts: ResumeOptions) -> Result<i64, RunError> {
    let (dir, record) = crate::job::record::find(&opts.state_dir, &opts.job)?;
    if !record.managed {
        return Err(RunError::NotResumable { job: record.job });
    }
    let job = record.job.clone();
    let token = if record.embedded_nats {
        let t = dir.join(TOKEN_FILE);
        std::fs::read_to_string(&t)
            .map_err(io("cannot read", &t))?
            .trim()
            .to_string()
    } else {
        opts.config.connection.auth_token.expose().to_string()
    };
    let rt = tokio::runtime::Runtime::new().map_err(io("cannot start the runtime for", &dir))?;
    opts.reporter.note(&format!(
        "job {job}: standing by while its controller (PID {}) holds the job",
        record.driver_pid
    ));
    let key = crate::coord::controller_key(&job);
    let url = record.nats_url.clone();
    let taken: Option<u64> = rt.block_on(async {
        let mut store = None;
        let mut last: Option<(u64, std::time::Instant)> = None;
        let mut unreachable_since = std::time::Instant::now();
        loop {
            if let Ok(r) = JobRecord::load(&dir) {
                if r.state.is_final() {
                    return None;
                }
                // The server died with the controller (the embedded one, on this machine):
                // no lease can be seen, and none can be renewed; the controller is gone.
                if store.is_none()
                    && r.embedded_nats
                    && !crate::job::record::controller_alive(r.driver_pid)
                    && unreachable_since.elapsed() > crate::coord::TAKEOVER_AFTER
                {
                    return Some(0);
                }
            }
            if store.is_none() {
                let connected = cedana_protocol::NatsCredential::parse(
                    &cedana_protocol::Secret::new(token.clone()),
                )
                .connect_options()
                .name(format!("cedana-driver standby {job}"))
                .connection_timeout(Duration::from_secs(2))
                .retry_on_initial_connect()
                .connect(cedana_protocol::NatsUrl::parse(&url).servers().to_vec())
                .await;
                if let Ok(client) = connected {
                    let js = async_nats::jetstream::new(client);
                    store = js.get_key_value(cedana_protocol::JOBS_BUCKET).await.ok();
                }
            }
            let entry = match &store {
                Some(s) => tokio::time::timeout(Duration::from_secs(2), s.entry(&key))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .flatten(),
                None => None,
            };
            match entry {
                Some(e) => {
                    unreachable_since = std::time::Instant::now();
                    match last {
                        Some((rev, since)) if rev == e.revision => {
                            if since.elapsed() > crate::coord::TAKEOVER_AFTER {
                                let s = store.as_ref().expect("read from it");
                                if let Ok(n) = s
                                    .update(&key, crate::coord::ControllerMark::mine(), rev)
                                    .await
                                {
                                    return Some(n);
                                }
                            }
                        }
                        _ => last = Some((e.revision, std::time::Instant::now())),
                    }
                }
                None => {
                    if store.is_some() {
                        unreachable_since = std::time::Instant::now();
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    drop(rt);
    match taken {
        None => {
            let r = JobRecord::load(&dir)?;
            opts.reporter.note(&format!(
                "job {job} ended under its controller; standby done"
            ));
            Err(RunError::EndedElsewhere {
                job,
                exit_status: r.exit_status,
            })
        }
        Some(rev) => resume(ResumeOptions {
            takeover: if rev == 0 { None } else { Some(rev) },
            ..opts
        }),
    }
}

/// What a run or a resume hands to [`drive`].
struct Drive {
    rt: tokio::runtime::Runtime,
    coord: Coordinator,
    url: String,
    token: cedana_protocol::Secret,
    job_dir: PathBuf,
    record: JobRecord,
    embedded: Option<EmbeddedNats>,
    checked: Checked,
    script: PathBuf,
    shared_storage: Option<PathBuf>,
    reporter: crate::job::report::SharedReporter,
    resumed: bool,
}

/// Runs (or goes on with) the job to its end, then ends its workers and its NATS server.
fn drive(d: Drive) -> Result<i64, RunError> {
    let Drive {
        rt,
        coord,
        url,
        token,
        job_dir,
        record,
        embedded,
        checked,
        script: path,
        shared_storage,
        reporter,
        resumed,
    } = d;
    let path = &path;
    let job_id = record.job.clone();
    let flow_opts = flow_options(&record.settings);
    let job = Rc::new(RefCell::new(Job::new(
        job_id.clone(),
        rt.handle().clone(),
        coord.clone(),
        url,
        token,
        job_dir,
        shared_storage,
        record,
    )));
    {
        let mut j = job.borrow_mut();
        j.store = j
            .record
            .settings
            .store
            .as_deref()
            .and_then(|u| cedana_store::StoreUrl::parse(u).ok())
            .map(|u| u.join(&job_id));
    }
    let Checked {
        yaml,
        script_dir,
        providers,
    } = checked;
    job.borrow_mut().providers = providers;
    job.borrow_mut().reporter = reporter.clone();
    {
        let mut j = job.borrow_mut();
        j.nats_users = embedded.as_ref().and_then(|n| n.users(j.nats_pid.clone()));
    }
    let down = job.borrow().down.clone();
    // The embedded server is kept running: started again on the same port, token and store
    // when it dies.
    let nats_stop = crate::util::Flag::new();
    let supervisor = embedded.map(|n| {
        let r = reporter.clone();
        let c = coord.clone();
        crate::coord::nats::supervise(
            n,
            job.borrow().nats_pid.clone(),
            nats_stop.clone(),
            move |line| r.note(line),
            move || c.store_problem(),
        )
    });
    // Another controller took the job over (this one lost its lease): stop at once,
    // touching nothing of the job, which is the other one's now.
    {
        let superseded = coord.superseded();
        let reporter = reporter.clone();
        std::thread::spawn(move || {
            while !superseded.wait_timeout(Duration::from_secs(3600)) {}
            reporter.note("another controller took the job over; this one stops");
            std::process::exit(75);
        });
    }
    // The user hears of a server that does not store, once per episode.
    {
        let (c, r, stop) = (coord.clone(), reporter.clone(), nats_stop.clone());
        std::thread::spawn(move || {
            let mut told = false;
            while !stop.wait_timeout(Duration::from_secs(1)) {
                match c.store_problem() {
                    Some((problem, d)) if !told && d > Duration::from_secs(3) => {
                        told = true;
                        r.note(&format!("the job's NATS server does not store ({problem}); workers' silence is not taken for a loss until it does"));
                    }
                    None if told => {
                        told = false;
                        r.note("the job's NATS server stores again");
                    }
                    _ => {}
                }
            }
        });
    }
    if resumed {
        job.borrow_mut().adopt_workers()?;
    }
    job.borrow_mut().save();
    // The task's ports, from this machine's loopback, wherever the task runs.
    let exposed = job.borrow().record.settings.expose.clone();
    for (local, task_port) in exposed {
        let bound = std::net::TcpListener::bind(("127.0.0.1", local))
            .and_then(|l| l.set_nonblocking(true).map(|_| l))
            .and_then(|l| {
                let _rt = rt.enter();
                tokio::net::TcpListener::from_std(l)
            });
        match bound {
            Ok(l) => {
                reporter.note(&format!(
                    "127.0.0.1:{local} reaches the task's port {task_port}, wherever it runs"
                ));
                rt.spawn(crate::job::ports::forward(
                    l,
                    job.borrow().dir.clone(),
                    task_port,
                ));
            }
            Err(e) => reporter.note(&format!(
                "cannot listen on 127.0.0.1:{local} for the task's port {task_port}: {e}"
            )),
        }
    }
    // Ctrl-C and SIGTERM take the job down cleanly: workers do not outlive it. SIGHUP is
    // ignored: the controller has no terminal (`run` follows it from another process), so
    // a closed terminal does not end the job.
    {
        let down = down.clone();
        let reporter = reporter.clone();
        rt.spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut i), Ok(mut t), Ok(mut h)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
                signal(SignalKind::hangup()),
            ) else {
                return;
            };
            loop {
                tokio::select! {
                    _ = i.recv() => break,
                    _ = t.recv() => break,
                    _ = h.recv() => continue,
                }
            }
            reporter.note("signal received: taking the job down");
            down.set();
        });
    }

    let (tx, rx) = std::sync::mpsc::channel();
    let result: Result<i64, RunError> = match yaml {
        Some(spec) => {
            job.borrow_mut().record.managed = true;
            rt.block_on(crate::coord::control::serve(
                coord.client.clone(),
                job_id.clone(),
                Some(tx),
                down.clone(),
            ))
            .map_err(|e| crate::coord::CoordError::Nats(e.to_string()))?;
            let mut hooks = crate::jobfile::yaml::YamlHooks {
                spec,
                base: script_dir.clone(),
            };
            managed::run(&job, &mut hooks, &flow_opts, &rx, resumed).map_err(RunError::from)
        }
        None => {
            let engine = script::engine(job.clone(), &script_dir);
            let ast = script::compile(&engine, path)?;
            let is_managed = script::is_managed(&ast);
            job.borrow_mut().record.managed = is_managed;
            rt.block_on(crate::coord::control::serve(
                coord.client.clone(),
                job_id.clone(),
                is_managed.then_some(tx),
                down.clone(),
            ))
            .map_err(|e| crate::coord::CoordError::Nats(e.to_string()))?;
            if is_managed {
                let mut hooks = script::RhaiHooks {
                    engine: &engine,
                    ast: &ast,
                    path,
                    scope: rhai::Scope::new(),
                };
                managed::run(&job, &mut hooks, &flow_opts, &rx, resumed).map_err(RunError::from)
            } else {
                job.borrow_mut().set_state(JobState::Running);
                engine
                    .eval_ast::<rhai::Dynamic>(&ast)
                    .map(|v| v.as_int().unwrap_or(0))
                    .map_err(|e| script::runtime_error(path, e).into())
            }
        }
    };
    let taken_down = down.is_set();
    let result = match result {
        Err(_) | Ok(_) if taken_down => Err(RunError::Down { job: job_id }),
        r => r,
    };
    // Workers end with the job.
    {
        let mut j = job.borrow_mut();
        // Ending a worker kills its tasks too.
        j.end();
        match &result {
            Ok(code) => {
                j.record.exit_code = Some(*code);
                j.set_state(if *code == 0 {
                    JobState::Succeeded
                } else {
                    JobState::Failed
                });
            }
            Err(RunError::Down { .. }) => j.set_state(JobState::Down),
            Err(e) => {
                // Plain text: a message quoting a program's output may hold its colours.
                j.record.error = Some(crate::util::strip_ansi(&e.to_string()));
                j.set_state(JobState::Failed);
            }
        }
    }
    {
        let j = job.borrow();
        j.reporter.note(&format!("job {}: {}", j.id, j.summary()));
    }
    // Answers to control requests go out before the connection closes.
    let client = coord.client.clone();
    let _ =
        rt.block_on(
            async move { tokio::time::timeout(Duration::from_secs(2), client.flush()).await },
        );
    // The server stops (its store stays in the job's folder).
    nats_stop.set();
    if let Some(s) = supervisor {
        let _ = s.join();
    }
    job.borrow_mut()
        .nats_pid
        .store(0, std::sync::atomic::Ordering::SeqCst);
    job.borrow_mut().record.nats_pid = 0;
    if let Err(e) = job.borrow().record.save(&job.borrow().dir) {
        tracing::warn!(error = %e, "cannot save the job record");
    }
    drop(job);
    drop(rt);
    result
}

/// Cloud machines cannot reach a NATS server on this machine's loopback (the embedded one):
/// with a cloud provider, `connection.nats_url` must name a server they can reach.
fn cloud_needs_nats(config: &cedana_protocol::Config, provider: &str) -> Result<(), RunError> {
    let c = &config.connection;
    let url = cedana_protocol::NatsUrl::from_config(&c.nats_url, c.nats_port).to_string();
    if url.is_empty() || crate::providers::loopback_only(&url) {
        return Err(RunError::NatsUnreachable {
            provider: provider.into(),
            url: if url.is_empty() {
                "none: the driver would start its own on loopback".into()
            } else {
                url
            },
        });
    }
    Ok(())
}

/// The providers `enabled_providers` names (`local` when it names none). Local workers boot
/// from `image` when one is given.
pub fn providers(
    config: &cedana_protocol::Config,
    image: Option<&Path>,
    reporter: &dyn crate::job::report::Reporter,
) -> Result<Vec<crate::providers::Provider>, RunError> {
    let enabled = if config.enabled_providers.is_empty() {
        vec!["local".to_string()]
    } else {
        config.enabled_providers.clone()
    };
    let mut out: Vec<crate::providers::Provider> = Vec::new();
    for name in &enabled {
        match name.to_lowercase().as_str() {
            "local" => out.push(
                crate::providers::local::LocalProvider {
                    image: image.map(Path::to_path_buf),
                }
                .into(),
            ),
            "paperspace" => {
                let config = config.paperspace.clone().unwrap_or_default();
                let p = crate::providers::paperspace::PaperspaceProvider::from_config(&config)
                    .map_err(|e| RunError::from(JobError::Provider(e)))?;
                out.push(p.into());
            }
            #[cfg(feature = "aws")]
            "aws" => {
                let config = config.aws.clone().unwrap_or_default();
                let p = crate::providers::aws::AwsProvider::from_config(&config)
                    .map_err(|e| RunError::from(JobError::Provider(e)))?;
                out.push(p.into());
            }
            #[cfg(not(feature = "aws"))]
            "aws" => {
                return Err(RunError::NotBuiltIn {
                    provider: "aws".into(),
                    feature: "aws",
                })
            }
            other => {
                tracing::warn!(
                    provider = other,
                    "provider not available in this release; skipped"
                );
                reporter.note(&format!("provider {other:?} is not available in this release of the driver; skipped (enabled_providers)"));
            }
        }
    }
    if out.is_empty() {
        return Err(RunError::NoProvider { enabled });
    }
    Ok(out)
}

impl From<JobError> for RunError {
    fn from(e: JobError) -> Self {
        RunError::Flow(FlowError::Job(e))
    }
}
