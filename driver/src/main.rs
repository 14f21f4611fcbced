//! The `cedana-driver` command line.

use std::io::{IsTerminal, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use cedana_driver::coord::control::{self, Action};
use cedana_driver::job::managed::FlowError;
use cedana_driver::job::record::{self, JobRecord, OUTPUT_FILE, TOKEN_FILE};
use cedana_driver::job::JobError;
use cedana_driver::jobfile::script::ScriptError;
use cedana_driver::runner::{RunError, RunOptions};
use clap::{Parser, Subcommand};

mod cli;

const AFTER: &str = "Exit codes: `run` ends with the task's exit status (0 when it succeeded, 128+N when signal N ended it); \
otherwise 0 ok; 1 job or command failed; 2 bad command line or job file (file:line:column given); 3 bad config; \
4 no such job, or its driver did not answer; 5 no offer fits (`price`, `run` of a managed job); 130 job taken down (`down`, Ctrl-C).\n\
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
        /// Arbitrage (managed flow): price the job's spec again every SECS seconds and move
        /// the task when an offer is cheaper than its current one by more than the margin
        /// (0: off) [default: the config's `arbitrage` block; off without one]
        #[arg(long, value_name = "SECS")]
        arbitrage_every: Option<u64>,
        /// How much cheaper an offer must be to move to it, in percent of the current price
        /// [default: arbitrage.margin_percent, else 20]
        #[arg(long, value_name = "PERCENT", value_parser = parse_percent)]
        arbitrage_margin: Option<f64>,
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
    /// Write the config file (~/.cedana/cedana_config.json, or --config) in the original
    /// Cedana's format: asks on a terminal, takes flags otherwise.
    ///
    /// An existing file's values are the defaults, and keys not asked about are kept. Secrets
    /// are never flag values: the Paperspace key comes from $PAPERSPACE_API_KEY, a file or a
    /// prompt; the NATS token from a file, a prompt, or --generate-token. With --aws-create it
    /// also makes the AWS key pair, security group and launch template workers need.
    Bootstrap(Box<BootstrapArgs>),
    /// Show the offers that fit a machine across the enabled providers, cheapest first, with
    /// where each price came from and how old it is.
    ///
    /// Prices come from the providers' APIs where they have one (AWS spot prices) and from the
    /// price catalog otherwise (~/.cedana/catalog.json over the built-in one; see
    /// docs/providers.md). Exits with 5 when nothing fits.
    Price {
        /// vCPUs wanted (at least)
        #[arg(long, value_name = "N")]
        cpu: Option<f64>,
        /// Memory wanted in GB (at least)
        #[arg(long, value_name = "GB")]
        memory: Option<f64>,
        /// GPU wanted: a name (matched in the offer's GPU model) and optionally a count
        #[arg(long, value_name = "NAME[:COUNT]")]
        gpu: Option<String>,
        /// GPU memory wanted in GB (at least)
        #[arg(long, value_name = "GB")]
        vram: Option<f64>,
        /// Highest price per hour in USD
        #[arg(long, value_name = "USD")]
        max_price: Option<f64>,
        /// Show only the N cheapest offers
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// Print JSON ({spec, offers, left_out}) on stdout
        #[arg(long)]
        json: bool,
        /// First fetch the prices providers publish (AWS spot prices per type and zone) into
        /// the catalog file (~/.cedana/catalog.json or $CEDANA_CATALOG)
        #[arg(long)]
        refresh: bool,
    },
}

#[derive(clap::Args)]
struct BootstrapArgs {
    /// Never ask; take flags and the existing file only (also when stdin is not a terminal)
    #[arg(long)]
    non_interactive: bool,
    /// A provider to enable (local, aws, paperspace); repeat for several
    #[arg(long = "provider", value_name = "NAME")]
    providers: Vec<String>,
    /// AWS region to use; repeat for several
    #[arg(long = "aws-region", value_name = "REGION")]
    aws_regions: Vec<String>,
    /// AWS instance family to use (t3, m5, g5...); repeat for several
    #[arg(long = "aws-family", value_name = "FAMILY")]
    aws_families: Vec<String>,
    /// SSH private key for AWS instances (bake connects with it)
    #[arg(long, value_name = "PATH")]
    aws_ssh_key: Option<PathBuf>,
    /// Launch template workers start from (name or id)
    #[arg(long, value_name = "NAME")]
    aws_launch_template: Option<String>,
    /// File holding the Paperspace API key [default: $PAPERSPACE_API_KEY]
    #[arg(long, value_name = "FILE")]
    paperspace_api_key_file: Option<PathBuf>,
    /// SSH private key for Paperspace machines
    #[arg(long, value_name = "PATH")]
    paperspace_ssh_key: Option<PathBuf>,
    /// Paperspace region ("East Coast (NY2)", ny2...); repeat for several
    #[arg(long = "paperspace-region", value_name = "REGION")]
    paperspace_regions: Vec<String>,
    /// NATS server workers reach (host, host:port or nats:// URL; a comma-separated list for
    /// a cluster); empty: the driver starts its own (local workers only)
    #[arg(long, value_name = "URL")]
    nats_url: Option<String>,
    /// NATS port for entries of --nats-url without one
    #[arg(long, value_name = "PORT")]
    nats_port: Option<u16>,
    /// File holding the NATS token
    #[arg(long, value_name = "FILE", conflicts_with = "generate_token")]
    auth_token_file: Option<PathBuf>,
    /// Make a new random NATS token (to start your nats-server with)
    #[arg(long)]
    generate_token: bool,
    /// Seconds between checkpoints (0: none)
    #[arg(long, value_name = "SECS")]
    checkpoint_every: Option<u64>,
    /// A folder every worker mounts: checkpoints go there instead of the NATS object store
    #[arg(long, value_name = "DIR")]
    shared_storage: Option<PathBuf>,
    /// Make what AWS workers need in the first AWS region: a key pair (private key saved
    /// under ~/.cedana/), a security group allowing SSH (for bake) and, with --aws-image, a
    /// launch template; the config then points at them. Safe to run again.
    #[arg(long)]
    aws_create: bool,
    /// Key pair name for --aws-create
    #[arg(long, value_name = "NAME", default_value = "cedana")]
    aws_key_name: String,
    /// Security group name for --aws-create
    #[arg(long, value_name = "NAME", default_value = "cedana-workers")]
    aws_security_group: String,
    /// Image (AMI) the --aws-create launch template starts workers from (`bake` makes one)
    #[arg(long, value_name = "AMI")]
    aws_image: Option<String>,
    /// Instance type the launch template names (the driver picks one per launch anyway)
    #[arg(long, value_name = "TYPE")]
    aws_instance_type: Option<String>,
    /// Print what was written as JSON (secrets left out)
    #[arg(long)]
    json: bool,
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
    // `bootstrap` reads and repairs the config itself.
    let config = if matches!(cli.command, Cmd::Bootstrap(_)) {
        Ok(cedana_driver::Config::default())
    } else {
        cedana_driver::Config::load_default(cli.config.as_deref())
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cedana-driver: error: {e}");
            return ExitCode::from(3);
        }
    };
    if matches!(
        cli.command,
        Cmd::Status { .. } | Cmd::Logs { .. } | Cmd::Price { .. }
    ) {
        // Commands that only print end quietly when their reader goes (`| head`). Commands
        // that talk to servers keep SIGPIPE ignored: a closed socket is an error, not death.
        // SAFETY: no other thread runs yet; SIG_DFL is a valid disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let state_dir = cli
        .state_dir
        .clone()
        .unwrap_or_else(cedana_driver::runner::default_state_dir);
    match cli.command {
        Cmd::Run {
            script,
            checkpoint_every,
            image,
            arbitrage_every,
            arbitrage_margin,
        } => {
            let opts = RunOptions {
                script,
                config,
                state_dir,
                checkpoint_every,
                image,
                arbitrage_every,
                arbitrage_margin,
                reporter: std::sync::Arc::new(cli::report::Terminal),
            };
            match cedana_driver::runner::run(opts) {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(e) => {
                    eprintln!("cedana-driver: error: {e}");
                    ExitCode::from(match e {
                        RunError::Script(ScriptError::Syntax { .. } | ScriptError::Read { .. })
                        | RunError::Unsupported { .. } => 2,
                        RunError::Down { .. } => 130,
                        RunError::Flow(FlowError::Job(JobError::NoOffer { .. })) => 5,
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
                use cedana_driver::bake::BakeError;
                ExitCode::from(match e.downcast_ref::<BakeError>() {
                    Some(BakeError::Invalid(_)) => 2,
                    Some(BakeError::Interrupted { .. }) => 130,
                    _ => 1,
                })
            }
        },
        Cmd::Bootstrap(args) => bootstrap(cli.config.as_deref(), *args),
        Cmd::Price {
            cpu,
            memory,
            gpu,
            vram,
            max_price,
            limit,
            json,
            refresh,
        } => {
            if refresh {
                match cedana_driver::price::refresh(&config) {
                    Ok((path, n)) => eprintln!("{n} prices written to {}", path.display()),
                    Err(e) => {
                        eprintln!("cedana-driver: error: {e}");
                        return ExitCode::from(1);
                    }
                }
            }
            let (gpu, gpu_count) = match gpu.as_deref().map(cedana_driver::price::parse_gpu) {
                None => (None, None),
                Some(Ok((name, count))) => (Some(name), count),
                Some(Err(e)) => {
                    eprintln!("cedana-driver: error: {e}");
                    return ExitCode::from(2);
                }
            };
            let spec = cedana_driver::job::Spec {
                cpu_cores: cpu,
                memory_gb: memory,
                gpu,
                gpu_count,
                vram_gb: vram,
                max_price_usd_hour: max_price,
            };
            price(&config, &spec, limit, json)
        }
    }
}

fn price(
    config: &cedana_driver::Config,
    spec: &cedana_driver::job::Spec,
    limit: Option<usize>,
    json: bool,
) -> ExitCode {
    let providers = match cedana_driver::runner::providers(config, None, &cli::report::Terminal) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("cedana-driver: error: {e}");
            return ExitCode::from(3);
        }
    };
    let mut prices = cedana_driver::price::prices(&providers, spec);
    if let Some(n) = limit {
        prices.offers.truncate(n);
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&prices).expect("serializes")
        );
    } else if !prices.offers.is_empty() {
        print!("{}", cedana_driver::price::table(&prices));
    }
    if prices.offers.is_empty() {
        eprintln!("cedana-driver: no offer fits {}", spec_text(spec));
        for why in &prices.left_out {
            eprintln!("  {why}");
        }
        return ExitCode::from(5);
    }
    if !json && !prices.left_out.is_empty() {
        eprintln!(
            "({} offers left out; --json lists why)",
            prices.left_out.len()
        );
    }
    ExitCode::SUCCESS
}

/// A spec as a user would write it on the command line.
fn spec_text(spec: &cedana_driver::job::Spec) -> String {
    let mut parts = Vec::new();
    if let Some(c) = spec.cpu_cores {
        parts.push(format!("--cpu {c}"));
    }
    if let Some(m) = spec.memory_gb {
        parts.push(format!("--memory {m}"));
    }
    if let Some(g) = &spec.gpu {
        parts.push(match spec.gpu_count {
            Some(n) => format!("--gpu {g}:{n}"),
            None => format!("--gpu {g}"),
        });
    }
    if let Some(v) = spec.vram_gb {
        parts.push(format!("--vram {v}"));
    }
    if let Some(p) = spec.max_price_usd_hour {
        parts.push(format!("--max-price {p}"));
    }
    if parts.is_empty() {
        "(any machine)".into()
    } else {
        parts.join(" ")
    }
}

fn parse_percent(s: &str) -> Result<f64, String> {
    match s.trim_end_matches('%').parse::<f64>() {
        Ok(p) if (0.0..100.0).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a percentage from 0 to 100 (e.g. 20)")),
    }
}

fn find(state_dir: &Path, job: &str) -> Result<(PathBuf, JobRecord), ExitCode> {
    record::find(state_dir, job).map_err(|e| {
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
        None => record::list(state_dir),
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
        "{:<24} {:<13} {:<8} {:<10} {:>6} {:>9} {:>5} {:>9} {:>8}  LAST CHECKPOINT",
        "JOB", "STATE", "WORKER", "TASK", "CKPTS", "RECOVERED", "MOVED", "COST $", "NOW $/H"
    );
    let now = cedana_protocol::now();
    for (_, r) in &jobs {
        let running = r.workers.iter().rev().find(|w| w.state == "running");
        let worker = running.map(|w| w.id.as_str()).unwrap_or("-");
        let rate = running
            .and_then(|w| w.offer.as_ref())
            .map(|o| format!("{:.4}", o.price_usd_hour))
            .unwrap_or_else(|| "-".into());
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
            "{:<24} {:<13} {:<8} {:<10} {:>6} {:>9} {:>5} {:>9.4} {:>8}  {last}",
            r.job,
            r.shown_state(),
            worker,
            task,
            r.checkpoints.len(),
            r.recoveries,
            r.migrations,
            r.cost_usd,
            rate
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

fn bootstrap(config_path: Option<&Path>, args: BootstrapArgs) -> ExitCode {
    use cedana_driver::bootstrap as b;
    let Some(path) = config_path
        .map(Path::to_path_buf)
        .or_else(cedana_driver::Config::default_path)
    else {
        eprintln!("cedana-driver: error: no config path: set HOME or give --config");
        return ExitCode::from(3);
    };
    let fail = |e: b::BootstrapError, code: u8| {
        eprintln!("cedana-driver: error: {e}");
        ExitCode::from(code)
    };
    let existing = match b::read_existing(&path) {
        Ok(v) => v,
        Err(e) => return fail(e, 3),
    };
    let list = |v: Vec<String>| (!v.is_empty()).then_some(v);
    let mut answers = b::Answers {
        providers: list(args.providers),
        aws_regions: list(args.aws_regions),
        aws_families: list(args.aws_families),
        aws_ssh_key_path: args.aws_ssh_key,
        aws_launch_template: args.aws_launch_template,
        paperspace_regions: list(args.paperspace_regions),
        paperspace_ssh_key_path: args.paperspace_ssh_key,
        nats_url: args.nats_url,
        nats_port: args.nats_port,
        checkpoint_interval: args.checkpoint_every,
        shared_storage: args.shared_storage,
        ..Default::default()
    };
    if let Some(f) = &args.paperspace_api_key_file {
        match b::secret_from_file(f) {
            Ok(s) => answers.paperspace_api_key = Some(s),
            Err(e) => return fail(e, 2),
        }
    } else if let Some(k) = std::env::var("PAPERSPACE_API_KEY")
        .ok()
        .filter(|k| !k.trim().is_empty())
    {
        answers.paperspace_api_key = Some(cedana_protocol::config::Secret::new(k.trim()));
    }
    if let Some(f) = &args.auth_token_file {
        match b::secret_from_file(f) {
            Ok(s) => answers.auth_token = Some(s),
            Err(e) => return fail(e, 2),
        }
    } else if args.generate_token {
        match b::generate_token() {
            Ok(s) => answers.auth_token = Some(s),
            Err(e) => return fail(e, 1),
        }
    }
    let interactive = !args.non_interactive && std::io::stdin().is_terminal();
    if interactive {
        let mut p = b::Prompter {
            input: std::io::stdin().lock(),
            output: std::io::stderr(),
            hide_secrets: true,
        };
        answers = match b::interview(&mut p, &existing, answers) {
            Ok(a) => a,
            Err(e) => return fail(e, 2),
        };
    }
    // Checked before anything is made in AWS, and again with what was made.
    if let Err(e) = b::check(&b::apply(existing.clone(), &answers), &path) {
        return fail(e, 2);
    }
    let mut created = None;
    if args.aws_create {
        let region = answers
            .aws_regions
            .as_ref()
            .and_then(|r| r.first().cloned())
            .or_else(|| {
                existing["aws"]["enabled_regions"][0]
                    .as_str()
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "us-east-1".into());
        let home = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let want = b::AwsCreate {
            key_path: home.join(format!("{}.pem", args.aws_key_name)),
            region,
            key_name: args.aws_key_name.clone(),
            security_group: args.aws_security_group.clone(),
            template: answers
                .aws_launch_template
                .clone()
                .unwrap_or_else(|| "cedana-worker".into()),
            image: args.aws_image.clone(),
            instance_type: args.aws_instance_type.clone(),
        };
        #[cfg(feature = "aws")]
        let made = b::create_aws_resources(&want);
        #[cfg(not(feature = "aws"))]
        let made: Result<b::AwsCreated, b::BootstrapError> = Err(b::BootstrapError::Answer {
            what: "--aws-create".into(),
            message: format!(
                "this driver was built without its `aws` feature (region {})",
                want.region
            ),
        });
        match made {
            Ok(c) => {
                if let Some(p) = &c.key_path {
                    answers.aws_ssh_key_path = Some(p.clone());
                }
                if let Some(t) = &c.launch_template {
                    answers.aws_launch_template = Some(t.clone());
                }
                if !args.json {
                    eprintln!(
                        "AWS {}: key pair {} ({}), security group {}{}",
                        c.region,
                        c.key_name,
                        match (&c.key_path, c.key_created) {
                            (Some(p), true) => format!("made; private key in {}", p.display()),
                            (Some(p), false) => format!("there; private key in {}", p.display()),
                            (None, _) => "there; its private key is not on this machine".into(),
                        },
                        c.security_group_id,
                        match &c.launch_template_id {
                            Some(id) => format!(", launch template {id}"),
                            None => ", no launch template (give --aws-image, or run `cedana-driver bake`)".into(),
                        }
                    );
                }
                created = Some(c);
            }
            Err(e) => return fail(e, 1),
        }
    }
    let v = b::apply(existing, &answers);
    let config = match b::check(&v, &path) {
        Ok(c) => c,
        Err(e) => return fail(e, 2),
    };
    if let Err(e) = b::write(&path, &v) {
        return fail(e, 1);
    }
    if args.json {
        let out = serde_json::json!({
            "config": path,
            "enabled_providers": config.enabled_providers,
            "nats_url": config.connection.nats_url,
            "aws_created": created,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&out).expect("serializes")
        );
    } else {
        println!(
            "wrote {} (providers: {})",
            path.display(),
            config.enabled_providers.join(", ")
        );
    }
    ExitCode::SUCCESS
}
