//! `cedana-driver run FILE`: one job from start to end.

use std::cell::RefCell;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use crate::coord::nats::EmbeddedNats;
use crate::coord::Coordinator;
use crate::job::managed::{self, FlowError};
use crate::job::record::{JobRecord, JobState, OUTPUT_FILE, TOKEN_FILE};
use crate::job::{Job, JobError};
use crate::jobfile::script::{self, ScriptError};

/// Errors of a run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Script(#[from] ScriptError),
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
    /// Where the job's lines for the user go.
    pub reporter: crate::job::report::SharedReporter,
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

/// Runs the job; returns the exit status it ends with (the task's, or the script's integer
/// result).
pub fn run(opts: RunOptions) -> Result<i64, RunError> {
    let path = &opts.script;
    let kind = match path.extension().and_then(|e| e.to_str()) {
        Some("rhai") => Kind::Rhai,
        Some("yml" | "yaml") => Kind::Yaml,
        _ => return Err(RunError::Unsupported { path: path.clone() }),
    };
    let script_dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    // Mistakes in the job surface before anything starts.
    let yaml = match kind {
        Kind::Rhai => {
            script::compile(&script::sandbox(&script_dir), path)?;
            None
        }
        Kind::Yaml => Some(crate::jobfile::yaml::load(path, &*opts.reporter)?),
    };
    // So do mistakes in the providers' settings (a missing key, a cloud provider without a
    // NATS server the machines can reach).
    let providers = providers(&opts.config, opts.image.as_deref(), &*opts.reporter)?;
    for p in &providers {
        if p.name() != "local" {
            cloud_needs_nats(&opts.config, p.name())?;
        }
    }

    let stem: String = path
        .file_stem()
        .map(|s| cedana_protocol::sanitize(&s.to_string_lossy()))
        .unwrap_or_else(|| "job".into())
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(40)
        .collect();
    let job_id = format!(
        "{stem}-{}",
        cedana_protocol::random_hex(3)
            .map_err(io("random", Path::new(cedana_protocol::ids::RANDOM_SOURCE)))?
    );
    let job_dir = opts.state_dir.join(&job_id);
    for d in [job_dir.join("work"), job_dir.join("logs")] {
        std::fs::create_dir_all(&d).map_err(io("cannot create", &d))?;
    }

    let (url, token, embedded) = if opts.config.connection.nats_url.is_empty() {
        let n = EmbeddedNats::start()?;
        let token_file = job_dir.join(TOKEN_FILE);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&token_file)
            .and_then(|mut f| f.write_all(n.token.expose().as_bytes()))
            .map_err(io("cannot write", &token_file))?;
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
    let output = job_dir.join("logs").join(OUTPUT_FILE);
    coord.set_output(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&output)
            .map_err(io("cannot create", &output))?,
    );
    opts.reporter
        .note(&format!("job {job_id}: folder {}", job_dir.display()));

    let interval = match opts.checkpoint_every {
        Some(0) => None,
        Some(s) => Some(Duration::from_secs(s)),
        None if opts.config.checkpoint.heartbeat_enabled == Some(false) => None,
        None => Some(Duration::from_secs(
            opts.config
                .checkpoint
                .heartbeat_interval_seconds
                .unwrap_or(60)
                .max(1),
        )),
    };
    let shared_storage = opts
        .config
        .shared_storage
        .dump_storage_dir
        .clone()
        .filter(|p| !p.as_os_str().is_empty());
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
    };
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
    job.borrow_mut().providers = providers;
    job.borrow_mut().reporter = opts.reporter.clone();
    let down = job.borrow().down.clone();
    // Ctrl-C, SIGTERM and SIGHUP take the job down cleanly: workers do not outlive the driver.
    {
        let down = down.clone();
        let reporter = opts.reporter.clone();
        rt.spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut i), Ok(mut t), Ok(mut h)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
                signal(SignalKind::hangup()),
            ) else {
                return;
            };
            tokio::select! {
                _ = i.recv() => {}
                _ = t.recv() => {}
                _ = h.recv() => {}
            }
            reporter.note("signal received: taking the job down");
            down.set();
        });
    }

    let (tx, rx) = std::sync::mpsc::channel();
    let flow_opts = managed::Options {
        interval,
        keep: 2,
        attempts: 3,
        arbitrage: arbitrage(
            &opts.config.arbitrage,
            opts.arbitrage_every,
            opts.arbitrage_margin,
        ),
    };
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
            managed::run(&job, &mut hooks, &flow_opts, &rx).map_err(RunError::from)
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
                managed::run(&job, &mut hooks, &flow_opts, &rx).map_err(RunError::from)
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
    drop(job);
    // Answers to control requests go out before the connection closes.
    let client = coord.client.clone();
    let _ =
        rt.block_on(
            async move { tokio::time::timeout(Duration::from_secs(2), client.flush()).await },
        );
    drop(rt);
    drop(embedded);
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
