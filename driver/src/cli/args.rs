//! The command line's arguments (clap): the commands and their flags, the help texts.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// What `--help` says after the commands: the exit codes ([`Exit`](super::exit::Exit)), where
/// jobs are kept, how to see logs.
pub const AFTER: &str = "Exit codes: `run` ends with the task's exit status (0 when it succeeded, 128+N when signal N ended it); \
otherwise 0 ok; 1 job or command failed; 2 bad command line or job file (file:line:column given); 3 bad config; \
4 no such job, or its driver did not answer; 5 no offer fits (`price`, `run` of a managed job); 130 job taken down (`down`, Ctrl-C).\n\
Jobs keep their folders in $CEDANA_STATE_DIR or ~/.cedana/jobs. Logs: RUST_LOG=debug.";

/// `run`'s examples and exit codes.
pub const RUN_AFTER: &str = "Examples:\n  cedana-driver run scripts/examples/managed.rhai\n  cedana-driver run --checkpoint-every 300 train.yml\n  cedana-driver run -d train.yml    # prints the job's id; `attach` follows it\n\n\
Exit codes: the task's exit status (0 when it succeeded, 128+N when signal N ended it); 1 job failed; \
2 bad command line or job file; 3 bad config; 4 the job's controller is gone (`resume` brings it back); \
5 no offer fits; 129/143 stopped following on SIGHUP/SIGTERM (the job goes on); 130 job taken down.";
/// `attach`'s examples and exit codes.
pub const ATTACH_AFTER: &str =
    "Examples:\n  cedana-driver attach train-3f2a1c\n  cedana-driver attach --all train\n\n\
Exit codes: the job's (as `run`'s); 4 no such job, or its controller is gone.";
/// `resume`'s examples and exit codes.
pub const RESUME_AFTER: &str = "Examples:\n  cedana-driver resume train-3f2a1c\n  cedana-driver resume --standby -d train-3f2a1c   # on a second machine\n\n\
Exit codes: the job's (as `run`'s); 1 it cannot be resumed (a controller runs it, or a script drives it); \
4 no such job, or it has ended.";
/// `status`'s examples and exit codes.
pub const STATUS_AFTER: &str = "Examples:\n  cedana-driver status\n  cedana-driver status --json train | jq '.[0].shown_state'\n\n\
Exit codes: 0 ok; 3 bad config; 4 no such job, or the prefix names several.";
/// `logs`' examples and exit codes.
pub const LOGS_AFTER: &str = "Examples:\n  cedana-driver logs -f train-3f2a1c\n\nExit codes: 0 ok; 1 the output cannot be read; 4 no such job.";
/// `checkpoint` and `migrate`: examples and exit codes.
pub const CONTROL_AFTER: &str = "Examples:\n  cedana-driver checkpoint train-3f2a1c\n  cedana-driver migrate train\n\n\
Exit codes: 0 done; 1 the job refused or failed it; 4 no such job, it is not running, or its controller did not answer.";
/// `down`'s examples and exit codes.
pub const DOWN_AFTER: &str = "Examples:\n  cedana-driver down train-3f2a1c\n\n\
Exit codes: 0 done; 1 workers still run (a provider not enabled); 3 bad config; 4 no such job or not running.";
/// `port`'s examples and exit codes.
pub const PORT_AFTER: &str = "Examples:\n  cedana-driver port train-3f2a1c 8888      # then open http://127.0.0.1:8888\n  cedana-driver port --local 9000 train 8888\n\n\
Exit codes: 0 the job ended; 1 the local port cannot be used; 4 no such job; 130 Ctrl-C.";
/// `rm` and `prune`: examples and exit codes.
pub const RM_AFTER: &str =
    "Examples:\n  cedana-driver rm train-3f2a1c\n  cedana-driver prune --older-than 7\n\n\
Exit codes: 0 done; 1 the job is not over, or a folder cannot be removed; 4 no such job.";

/// Run long jobs on the cheapest machine that fits and keep them alive across preemption.
///
/// A job is a Rhai script (scripts/examples/) or the original Cedana's YAML job spec. With no
/// config the driver runs it on `local` workers (agent daemons on this machine) with a NATS
/// server of its own; checkpoints are taken every `checkpoint.heartbeat_interval_seconds`
/// (60 s by default) and a lost worker is replaced from the newest one.
#[derive(Parser)]
#[command(name = "cedana-driver", version, after_help = AFTER)]
pub struct Cli {
    /// Config file [default: $CEDANA_CONFIG, ~/.cedana/cedana_config.json]
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Where jobs keep their folders [default: $CEDANA_STATE_DIR, ~/.cedana/jobs]
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run a job (.rhai script or .yml job spec) until its task ends; streams the task's
    /// output and exits with its status.
    ///
    /// The job has a controller of its own (a background process, output in the job's
    /// folder); `run` starts it and follows it. Ctrl-C takes the job down; a closed terminal
    /// or a killed `run` only stops following: the job goes on (`attach` follows it again).
    /// A controller that died (`kill -9`, a reboot) is brought back with `resume`.
    #[command(after_help = RUN_AFTER)]
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
        /// When every spot offer is out of capacity, wait up to SECS seconds for one (the
        /// task waiting in its checkpoint) before launching on-demand [default: on-demand at
        /// once]
        #[arg(long, value_name = "SECS")]
        wait_for_spot: Option<u64>,
        /// Start the job and return once its task runs, printing the job's id (follow it
        /// with `attach`, `logs -f`, `status`)
        #[arg(short, long)]
        detach: bool,
        /// Forward 127.0.0.1:PORT on this machine to the task's PORT (or LOCAL to the task's
        /// TASK) wherever it runs, re-aimed after each move; repeat for several
        #[arg(long, value_name = "PORT|LOCAL:TASK", value_parser = cedana_driver::job::ports::parse_expose)]
        expose: Vec<(u16, u16)>,
        /// Put the job's checkpoints into this store as chunks, sending only what changed
        /// since the last (s3://BUCKET/PREFIX, gs://…, az://…, file:///PATH; each job under
        /// its id; AWS_ENDPOINT_URL names an S3-compatible server) [default:
        /// checkpoint_store.url from the config, else the NATS object store]
        #[arg(long, value_name = "URL")]
        store: Option<String>,
        /// Be the controller of job ID (what `run` starts in the background)
        #[arg(long, value_name = "ID", hide = true)]
        controller_for: Option<String>,
    },
    /// Follow a job: its task's output and the job's steps from now on (the last lines
    /// first); exits with the job's exit code once it ends, also for a job that has ended.
    /// Ctrl-C takes the job down, as in `run`.
    #[command(after_help = ATTACH_AFTER)]
    Attach {
        /// The job: its id as `run` printed it, or a unique prefix of it (`status` lists them)
        job: String,
        /// Print the job's whole output so far first, not only its last lines
        #[arg(long)]
        all: bool,
    },
    /// Bring back a job whose controller died (`status` shows it `orphaned`): its NATS server
    /// is started again if it is gone, its workers are taken back, what happened meanwhile is
    /// read from the stored events, and the job goes on (managed jobs: hooks or YAML specs).
    /// Follows the job as `run` does.
    #[command(after_help = RESUME_AFTER)]
    Resume {
        /// The job: its id as `run` printed it, or a unique prefix of it (`status` lists them)
        job: String,
        /// Return once the job is taken back, printing its id
        #[arg(short, long)]
        detach: bool,
        /// Stand by while the job's controller runs (on this machine or another that reaches
        /// the job's NATS server) and take the job over within 10 s of its controller dying;
        /// only one controller acts at a time
        #[arg(long)]
        standby: bool,
        /// Be the job's controller (what `resume` starts in the background)
        #[arg(long, hide = true)]
        controller: bool,
    },
    /// Show jobs: state, workers, task, checkpoints, cost.
    #[command(after_help = STATUS_AFTER)]
    Status {
        /// One job: its id as `run` printed it, or a unique prefix of it; all jobs if omitted
        job: Option<String>,
        /// Print JSON (the job records) on stdout
        #[arg(long)]
        json: bool,
    },
    /// Print a job's task output.
    #[command(after_help = LOGS_AFTER)]
    Logs {
        /// The job: its id as `run` printed it, or a unique prefix of it (`status` lists them)
        job: String,
        /// Keep printing as the task writes, until the job ends
        #[arg(short, long)]
        follow: bool,
    },
    /// Checkpoint a running managed job's task now.
    #[command(after_help = CONTROL_AFTER)]
    Checkpoint {
        /// The job: its id as `run` printed it, or a unique prefix of it (`status` lists them)
        job: String,
    },
    /// Move a running managed job's task to a new worker.
    #[command(after_help = CONTROL_AFTER)]
    Migrate {
        /// The job: its id as `run` printed it, or a unique prefix of it (`status` lists them)
        job: String,
    },
    /// Forward a port of this machine's loopback to a port of the job's task, wherever it
    /// runs (a notebook, a server in the task): re-aimed after each move, until the job ends
    /// or Ctrl-C.
    #[command(after_help = PORT_AFTER)]
    Port {
        /// The job: its id as `run` printed it, or a unique prefix of it (`status` lists them)
        job: String,
        /// The task's port
        port: u16,
        /// The local port [default: the task's; 0: any free one, printed]
        #[arg(long, value_name = "PORT")]
        local: Option<u16>,
    },
    /// Remove an ended job's folder: its record, logs, workers' folders, and with the
    /// embedded NATS server its store and checkpoints. A job not over is refused (`down` it
    /// first).
    #[command(after_help = RM_AFTER)]
    Rm {
        /// The job: its id as `run` printed it, or a unique prefix of it (`status` lists them)
        job: String,
    },
    /// Remove every ended job's folder (as `rm` does), or those that ended more than DAYS
    /// days ago.
    #[command(after_help = RM_AFTER)]
    Prune {
        /// Only jobs that ended more than DAYS days ago
        #[arg(long, value_name = "DAYS")]
        older_than: Option<u64>,
    },
    /// Stop a job: its task is killed and its workers end. A job whose controller died is
    /// ended here: its tasks, workers, network namespaces and NATS server; says what it ended.
    #[command(after_help = DOWN_AFTER)]
    Down {
        /// The job: its id as `run` printed it, or a unique prefix of it (`status` lists them)
        job: String,
    },
    /// Bake a worker image (AMI) and a launch template from a stock image: the agent, CRIU and
    /// a systemd unit installed over SSH (host key verified), `cedana-agent check` passed there.
    #[cfg(feature = "aws")]
    Bake(Box<super::bake::BakeArgs>),
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
    /// docs/providers.md). Exits with 5 when nothing fits, and with 3 when no enabled provider
    /// could be asked (no credentials, unreachable: `cedana-driver check` says why).
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
    /// Replay the driver's decisions on spot traces, beside other policies, on a simulated
    /// clock: does checkpoint/restore-based arbitrage pay, and how much?
    ///
    /// TRACES are files or folders of spot traces in the format of SkyPilot's collection
    /// (github.com/skypilot-org/spot-traces): `<zone>_<device>.json` holding
    /// {"metadata": {"gap_seconds": N}, "data": [spot instances available per tick], "prices":
    /// [spot $/h per tick]?}. The zones of one folder and device are the places the job may
    /// run; on-demand is always available in their regions. For each set, the job is replayed
    /// from --starts start points under: on-demand only; spot restarted from scratch after a
    /// preemption (SkyPilot managed jobs); spot with an application checkpoint every hour;
    /// the driver before the replay (fixed interval, cheapest offer first); the driver
    /// (preemption-aware: Young's checkpoint interval, offers weighed by their preemptions,
    /// arbitrage onto offers that are cheaper only); the offline optimum (knowing the trace,
    /// the cheapest plan paying the same starts, checkpoints and restores); and a lower bound
    /// below it (the cheapest ticks, no overheads). Prints per set and overall the cost, cost over
    /// on-demand and over the optimum, finish time, work redone, moves and recoveries.
    /// Exits with 3 when a trace cannot be read.
    Replay(Box<ReplayArgs>),
    /// Say which providers are usable from here and why not, one line each (as `sky check`
    /// does): local (root, the agent's own `check`, nats-server), aws and paperspace (their
    /// settings and credentials, then their offers asked for), the NATS server the config
    /// names (reachable, and not loopback for cloud workers) and the checkpoint store.
    ///
    /// Exits with 0 when everything enabled is usable, 1 when something enabled is not.
    Check {
        /// Print the findings as JSON ([{name, enabled, ok, detail}]) on stdout
        #[arg(long)]
        json: bool,
    },
}

/// `cedana-driver replay`'s flags.
#[derive(clap::Args)]
pub struct ReplayArgs {
    /// Trace files or folders (searched to any depth)
    #[arg(required = true, value_name = "TRACES")]
    pub traces: Vec<PathBuf>,
    /// Hours of work the job needs
    #[arg(long, default_value_t = 24.0, value_name = "HOURS")]
    pub job_hours: f64,
    /// The job's memory in GiB (what each checkpoint holds)
    #[arg(long, default_value_t = 16.0, value_name = "GIB")]
    pub memory_gib: f64,
    /// The job must finish this many hours after it starts (on-demand when only it can)
    #[arg(long, value_name = "HOURS")]
    pub deadline_hours: Option<f64>,
    /// Replays per trace set, their start points spread over the set
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub starts: usize,
    /// From a launch until the job's setup is done on the new instance, every policy (the
    /// paper's measured changeover delay: 0.2 h)
    #[arg(long, default_value_t = 720.0, value_name = "SECS")]
    pub start_secs: f64,
    /// Spot interruption notice on AWS
    #[arg(long, default_value_t = 120.0, value_name = "SECS")]
    pub notice_aws_secs: f64,
    /// Preemption notice on GCP
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    pub notice_gcp_secs: f64,
    /// Time a checkpoint stops the task per GiB (CRIU's dump; measured here: 0.45)
    #[arg(long, default_value_t = 0.45, value_name = "SECS")]
    pub frozen_secs_per_gib: f64,
    /// Time to store a GiB of changed memory, the task running meanwhile
    #[arg(long, default_value_t = 1.5, value_name = "SECS")]
    pub upload_secs_per_gib: f64,
    /// Time to fetch and restore a GiB on a new instance
    #[arg(long, default_value_t = 4.5, value_name = "SECS")]
    pub restore_secs_per_gib: f64,
    /// Share of the task's memory rewritten per hour (what incremental checkpoints send)
    #[arg(long, default_value_t = 0.25, value_name = "FRACTION")]
    pub dirty_per_hour: f64,
    /// The driver's periodic checkpoint interval
    #[arg(long, default_value_t = 600.0, value_name = "SECS")]
    pub interval_secs: f64,
    /// The driver prices the job again this often (arbitrage)
    #[arg(long, default_value_t = 600.0, value_name = "SECS")]
    pub arbitrage_every_secs: f64,
    /// ...and moves when an offer is cheaper by more than this many percent
    #[arg(long, default_value_t = 20.0, value_name = "PERCENT")]
    pub arbitrage_margin: f64,
    /// The application checkpoint baseline's period
    #[arg(long, default_value_t = 3600.0, value_name = "SECS")]
    pub app_checkpoint_secs: f64,
    /// Without a deadline, the driver waits this long for spot capacity before on-demand
    /// (`run --wait-for-spot`); with one, as long as the deadline allows
    #[arg(long, default_value_t = 1800.0, value_name = "SECS")]
    pub wait_for_spot_secs: f64,
    /// On-demand $/h (for devices the built-in table does not know, or to override it)
    #[arg(long, value_name = "USD")]
    pub on_demand_price: Option<f64>,
    /// Spot $/h where a trace has no prices
    #[arg(long, value_name = "USD")]
    pub spot_price: Option<f64>,
    /// Prices over time, over the traces' own: CSV rows `seconds,place,market,usd_per_hour`
    /// (seconds from the traces' first tick; a zone for spot, a region for on-demand;
    /// market `spot` or `on-demand`), each holding until the next for its place and market
    #[arg(long, value_name = "CSV")]
    pub prices: Option<PathBuf>,
    /// Also replay the driver with each of its changes alone undone (driver-no-wait: never
    /// waits for spot; driver-fixed: no preemption-aware interval or ranking)
    #[arg(long)]
    pub ablation: bool,
    /// Print the whole report as JSON on stdout
    #[arg(long)]
    pub json: bool,
    /// Draw each set's first run (cost and work over time per policy) into DIR/<set>.svg
    #[arg(long, value_name = "DIR")]
    pub plot: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct BootstrapArgs {
    /// Never ask; take flags and the existing file only (also when stdin is not a terminal)
    #[arg(long)]
    pub non_interactive: bool,
    /// A provider to enable (local, aws, paperspace); repeat for several
    #[arg(long = "provider", value_name = "NAME")]
    pub providers: Vec<String>,
    /// AWS region to use; repeat for several
    #[arg(long = "aws-region", value_name = "REGION")]
    pub aws_regions: Vec<String>,
    /// AWS instance family to use (t3, m5, g5...); repeat for several
    #[arg(long = "aws-family", value_name = "FAMILY")]
    pub aws_families: Vec<String>,
    /// SSH private key for AWS instances (bake connects with it)
    #[arg(long, value_name = "PATH")]
    pub aws_ssh_key: Option<PathBuf>,
    /// Launch template workers start from (name or id)
    #[arg(long, value_name = "NAME")]
    pub aws_launch_template: Option<String>,
    /// File holding the Paperspace API key [default: $PAPERSPACE_API_KEY]
    #[arg(long, value_name = "FILE")]
    pub paperspace_api_key_file: Option<PathBuf>,
    /// SSH private key for Paperspace machines
    #[arg(long, value_name = "PATH")]
    pub paperspace_ssh_key: Option<PathBuf>,
    /// Paperspace template workers boot from (an ID or name of a custom template with
    /// cedana-agent installed); kept in the config as `paperspace.template`
    #[arg(long, value_name = "ID")]
    pub paperspace_template: Option<String>,
    /// Paperspace region ("East Coast (NY2)", ny2...); repeat for several
    #[arg(long = "paperspace-region", value_name = "REGION")]
    pub paperspace_regions: Vec<String>,
    /// NATS server workers reach (host, host:port or nats:// URL; a comma-separated list for
    /// a cluster); empty: the driver starts its own (local workers only)
    #[arg(long, value_name = "URL")]
    pub nats_url: Option<String>,
    /// NATS port for entries of --nats-url without one
    #[arg(long, value_name = "PORT")]
    pub nats_port: Option<u16>,
    /// File holding the NATS token
    #[arg(long, value_name = "FILE", conflicts_with = "generate_token")]
    pub auth_token_file: Option<PathBuf>,
    /// Make a new random NATS token (to start your nats-server with)
    #[arg(long)]
    pub generate_token: bool,
    /// Give your nats-server decentralized auth instead of a token: make a NATS operator and
    /// an account, write the server's part (nats-account.conf beside the config; start the
    /// server with `-c` on it, or include it) and keep the account's seed as the config's
    /// token. The driver then gives each worker a user of its own that can touch only its
    /// own subjects, as on the embedded server.
    #[arg(long, conflicts_with_all = ["generate_token", "auth_token_file"])]
    pub nats_account: bool,
    /// Seconds between checkpoints (0: none)
    #[arg(long, value_name = "SECS")]
    pub checkpoint_every: Option<u64>,
    /// A folder every worker mounts: checkpoints go there instead of the NATS object store
    #[arg(long, value_name = "DIR")]
    pub shared_storage: Option<PathBuf>,
    /// Make what AWS workers need in the first AWS region: a key pair (private key saved
    /// under ~/.cedana/), a security group allowing SSH (for bake) and, with --aws-image, a
    /// launch template; the config then points at them. Safe to run again.
    #[arg(long)]
    pub aws_create: bool,
    /// Key pair name for --aws-create
    #[arg(long, value_name = "NAME", default_value = "cedana")]
    pub aws_key_name: String,
    /// Security group name for --aws-create
    #[arg(long, value_name = "NAME", default_value = "cedana-workers")]
    pub aws_security_group: String,
    /// Image (AMI) the --aws-create launch template starts workers from (`bake` makes one)
    #[arg(long, value_name = "AMI")]
    pub aws_image: Option<String>,
    /// Instance type the launch template names (the driver picks one per launch anyway)
    #[arg(long, value_name = "TYPE")]
    pub aws_instance_type: Option<String>,
    /// Print what was written as JSON (secrets left out)
    #[arg(long)]
    pub json: bool,
}

/// `--arbitrage-margin`: a percentage from 0 to 100 (a trailing `%` allowed).
pub fn parse_percent(s: &str) -> Result<f64, String> {
    match s.trim_end_matches('%').parse::<f64>() {
        Ok(p) if (0.0..100.0).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a percentage from 0 to 100 (e.g. 20)")),
    }
}

#[cfg(test)]
mod tests {
    /// Every command on a job explains `JOB`, shows examples and lists its exit codes.
    #[test]
    fn job_commands_explain_job_and_list_exit_codes() {
        let cli = <super::Cli as clap::CommandFactory>::command();
        let mut seen = 0;
        for sub in cli.get_subcommands() {
            let Some(job) = sub.get_arguments().find(|a| a.get_id() == "job") else {
                continue;
            };
            seen += 1;
            let help = job.get_help().map(|h| h.to_string()).unwrap_or_default();
            assert!(
                help.contains("unique prefix"),
                "`{}`: JOB has no help: {help:?}",
                sub.get_name()
            );
            let after = sub
                .get_after_help()
                .map(|h| h.to_string())
                .unwrap_or_default();
            assert!(
                after.contains("Examples:") && after.contains("Exit codes:"),
                "`{} --help` has no examples or exit codes: {after:?}",
                sub.get_name()
            );
        }
        assert!(seen >= 8, "only {seen} commands take a job");
        let run = cli.find_subcommand("run").expect("run");
        assert!(run
            .get_after_help()
            .is_some_and(|h| h.to_string().contains("Exit codes:")));
    }
}
