//! The `cedana-driver` command line.

use std::io::{IsTerminal, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use cedana_driver::control::{self, Action};
use cedana_driver::run::{RunError, RunOptions};
use cedana_driver::script::ScriptError;
use cedana_driver::state::{self, JobRecord, OUTPUT_FILE, TOKEN_FILE};
use clap::{Parser, Subcommand};

const AFTER: &str = "Exit codes: `run` ends with the task's exit status (0 when it succeeded, 128+N when signal N ended it); \
otherwise 0 ok; 1 job or command failed; 2 bad command line or job file (file:line:column given); 3 bad config; \
4 no such job, or its driver did not answer; 130 job taken down (`down`, Ctrl-C).\n\
Jobs keep their folders in $CEDANA_STATE_DIR or ~/.cedana/jobs. Logs: RUST_LOG=debug.";

/// Run long jobs on the cheapest machine that fits and keep them alive across preemption.
///
/// A job is a Rhai script (scripts/examples/) or the original Cedana's YAML job spec. With no
/// config the driver runs it on `local` workers (agent daemons on this machine) with a NATS
/// server of its own; checkpoints are taken every `checkpoint.heartbeat_interval_seconds`
/// (60 s by default) and a lost worker is replaced from the newest one.
#[derive(Parser)]
#[command(name = "cedana-driver", version, after_help = AFTER)]
struct Cli {
    /// Config file [default: $CEDANA_CONFIG, ~/.cedana/cedana_config.json]
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Where jobs keep their folders [default: $CEDANA_STATE_DIR, ~/.cedana/jobs]
    #[arg(long, global = true, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a job (.rhai script or .yml job spec) until its task ends; streams the task's
    /// output and exits with its status.
    Run {
        /// The job file
        script: PathBuf,
        /// Checkpoint the task every SECS seconds (managed flow; 0: never) [default:
        /// checkpoint.heartbeat_interval_seconds from the config, else 60]
        #[arg(long, value_name = "SECS")]
        checkpoint_every: Option<u64>,
        /// Boot each local worker as a runc container from this worker image (an OCI layout, as
        /// `images/build.sh` writes; `DIR` or `DIR:TAG`) instead of as a process
        #[arg(long, value_name = "DIR", env = "CEDANA_WORKER_IMAGE")]
        image: Option<PathBuf>,
    },
    /// Show jobs: state, workers, task, checkpoints, cost.
    Status {
        /// One job (its id or a unique prefix); all jobs if omitted
        job: Option<String>,
        /// Print JSON (the job records) on stdout
        #[arg(long)]
        json: bool,
    },
    /// Print a job's task output.
    Logs {
        job: String,
        /// Keep printing as the task writes, until the job ends
        #[arg(short, long)]
        follow: bool,
    },
    /// Checkpoint a running managed job's task now.
    Checkpoint { job: String },
    /// Move a running managed job's task to a new worker.
    Migrate { job: String },
    /// Stop a job: its task is killed and its workers end.
    Down { job: String },
    /// Bake a worker image (AMI) and a launch template from a stock image: the agent, CRIU and
    /// a systemd unit installed over SSH (host key verified), `cedana-agent check` passed there.
    #[cfg(feature = "aws")]
    Bake(Box<cedana_driver::bake::BakeArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_writer(std::io::stderr)
            .finish()
            // The AWS SDK's own debug output holds whole requests: it is never shown.
            .with(tracing_subscriber::filter::filter_fn(
                cedana_driver::log_event_allowed,
            ))
            .init();
    }
    let config = match cedana_driver::Config::load_default(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cedana-driver: error: {e}");
            return ExitCode::from(3);
        }
    };
    let state_dir = cli
        .state_dir
        .clone()
        .unwrap_or_else(cedana_driver::run::default_state_dir);
    match cli.command {
        Cmd::Run {
            script,
            checkpoint_every,
            image,
        } => {
            let opts = RunOptions {
                script,
                config,
                state_dir,
                checkpoint_every,
                image,
            };
            match cedana_driver::run::run(opts) {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(e) => {
                    eprintln!("cedana-driver: error: {e}");
                    ExitCode::from(match e {
                        RunError::Script(ScriptError::Syntax { .. } | ScriptError::Read { .. })
                        | RunError::Unsupported { .. } => 2,
                        RunError::Down { .. } => 130,
                        _ => 1,
                    })
                }
            }
        }
        Cmd::Status { job, json } => status(&state_dir, job.as_deref(), json),
        Cmd::Logs { job, follow } => logs(&state_dir, &job, follow),
        Cmd::Checkpoint { job } => send(&state_dir, &config, &job, Action::Checkpoint),
        Cmd::Migrate { job } => send(&state_dir, &config, &job, Action::Migrate),
        Cmd::Down { job } => send(&state_dir, &config, &job, Action::Down),
        #[cfg(feature = "aws")]
        Cmd::Bake(args) => match cedana_driver::bake::run_bake(*args, &config) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cedana-driver: error: {e:#}");
                let invalid = matches!(
                    e.downcast_ref::<cedana_driver::bake::BakeError>(),
                    Some(cedana_driver::bake::BakeError::Invalid(_))
                );
                ExitCode::from(if invalid { 2 } else { 1 })
            }
        },
    }
}

fn find(state_dir: &Path, job: &str) -> Result<(PathBuf, JobRecord), ExitCode> {
    state::find(state_dir, job).map_err(|e| {
        eprintln!("cedana-driver: error: {e}");
        ExitCode::from(4)
    })
}

fn status(state_dir: &Path, job: Option<&str>, json: bool) -> ExitCode {
    let jobs = match job {
        Some(j) => match find(state_dir, j) {
            Ok(found) => vec![found],
            Err(code) => return code,
        },
        None => state::list(state_dir),
    };
    if json {
        let records: Vec<serde_json::Value> = jobs
            .iter()
            .map(|(_, r)| {
                let mut v = serde_json::to_value(r).expect("serializes");
                v["shown_state"] = r.shown_state().into();
                v
            })
            .collect();
        let out = match job {
            Some(_) => records.into_iter().next().unwrap_or_default(),
            None => serde_json::Value::Array(records),
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&out).expect("serializes")
        );
        return ExitCode::SUCCESS;
    }
    if jobs.is_empty() {
        println!("no jobs in {}", state_dir.display());
        return ExitCode::SUCCESS;
    }
    println!(
        "{:<24} {:<13} {:<8} {:<10} {:>6} {:>9} {:>9}  LAST CHECKPOINT",
        "JOB", "STATE", "WORKER", "TASK", "CKPTS", "RECOVERED", "COST $"
    );
    let now = cedana_agent::protocol::now();
    for (_, r) in &jobs {
        let worker = r
            .workers
            .iter()
            .rev()
            .find(|w| w.state == "running")
            .map(|w| w.id.as_str())
            .unwrap_or("-");
        let task = r.task.as_ref().map(|t| t.name.as_str()).unwrap_or("-");
        let last = r
            .checkpoints
            .last()
            .map(|c| {
                format!(
                    "{} s ago, {:.1} MiB",
                    now.saturating_sub(c.at),
                    c.bytes as f64 / 1048576.0
                )
            })
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<24} {:<13} {:<8} {:<10} {:>6} {:>9} {:>9.4}  {last}",
            r.job,
            r.shown_state(),
            worker,
            task,
            r.checkpoints.len(),
            r.recoveries,
            r.cost_usd
        );
    }
    ExitCode::SUCCESS
}

fn logs(state_dir: &Path, job: &str, follow: bool) -> ExitCode {
    let (dir, _) = match find(state_dir, job) {
        Ok(f) => f,
        Err(code) => return code,
    };
    let path = dir.join("logs").join(OUTPUT_FILE);
    let mut f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("cedana-driver: error: cannot read {}: {e}", path.display());
            return ExitCode::from(1);
        }
    };
    let mut out = std::io::stdout().lock();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if f.read_to_end(&mut buf).is_ok() && !buf.is_empty() {
            let _ = out.write_all(&buf);
            let _ = out.flush();
        }
        if !follow {
            return ExitCode::SUCCESS;
        }
        let ended = JobRecord::load(&dir)
            .map(|r| !r.driver_alive())
            .unwrap_or(true);
        if ended {
            // What was written last.
            buf.clear();
            let _ = f.read_to_end(&mut buf);
            let _ = out.write_all(&buf);
            return ExitCode::SUCCESS;
        }
        let _ = f.stream_position();
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn send(state_dir: &Path, config: &cedana_driver::Config, job: &str, action: Action) -> ExitCode {
    let (dir, record) = match find(state_dir, job) {
        Ok(f) => f,
        Err(code) => return code,
    };
    if !record.driver_alive() {
        eprintln!(
            "cedana-driver: error: job {} is not running (state {})",
            record.job,
            record.shown_state()
        );
        return ExitCode::from(4);
    }
    let token = if record.embedded_nats {
        match std::fs::read_to_string(dir.join(TOKEN_FILE)) {
            Ok(t) => t.trim().to_string(),
            Err(e) => {
                eprintln!(
                    "cedana-driver: error: cannot read job {}'s NATS token: {e}",
                    record.job
                );
                return ExitCode::from(4);
            }
        }
    } else {
        config.connection.auth_token.expose().to_string()
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cedana-driver: error: {e}");
            return ExitCode::from(1);
        }
    };
    let spinner = std::io::stderr().is_terminal().then(|| {
        let pb = indicatif::ProgressBar::new_spinner();
        pb.set_message(format!("{action:?} {}", record.job).to_lowercase());
        pb.enable_steady_tick(Duration::from_millis(120));
        pb
    });
    let result = rt.block_on(control::request(
        &record.nats_url,
        &token,
        &record.job,
        action,
        if action == Action::Down { 60 } else { 3600 },
    ));
    if let Some(pb) = spinner {
        pb.finish_and_clear();
    }
    match result {
        Ok(a) => {
            println!("{}", a.message);
            ExitCode::SUCCESS
        }
        Err(e @ control::ControlError::Refused { .. }) => {
            eprintln!("cedana-driver: error: {e}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("cedana-driver: error: {e}");
            ExitCode::from(4)
        }
    }
}
