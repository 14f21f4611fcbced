//! The `cedana-agent` command line: parsing and output over the `cedana_agent` library.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use cedana_agent::archive::ArchiveError;
use cedana_agent::dump::DumpError;
use cedana_agent::progress::{NoProgress, Progress};
use cedana_agent::restore::RestoreError;
use cedana_agent::{check, exec, Compression, Config, TcpMode};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  unexpected failure (I/O and the like)
  2  bad command line
  3  input refused: no such process, bad archive, bad config file
  4  CRIU failed (its log is quoted and kept)
  5  this machine is not ready: no usable CRIU, not root (see `cedana-agent check`)
  6  the NATS server refused the token (daemon)

Logs: set RUST_LOG (e.g. RUST_LOG=debug) for tracing output on stderr.";

/// Checkpoint and restore Linux processes with CRIU.
///
/// Dumps go into zip archives named like the original Cedana's (`<process>_<YYYYMMDD_HHMMSS>.zip`)
/// holding CRIU's images and a manifest with a SHA-256 per entry. Restores verify the whole
/// archive before they touch the system.
#[derive(Parser)]
#[command(name = "cedana-agent", version, after_help = EXIT_CODES)]
struct Cli {
    /// CRIU binary to use [default: $CEDANA_CRIU, criu.path in the config, criu on PATH]
    #[arg(long, global = true, value_name = "PATH")]
    criu: Option<PathBuf>,
    /// Config file [default: $CEDANA_CONFIG, ~/.cedana/cedana_config.json]
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Checkpoint a process and its children into a zip archive; prints the archive's path.
    Dump(DumpArgs),
    /// Verify an archive and restore the process it holds; prints the restored PID.
    Restore(RestoreArgs),
    /// List the checkpoints in a store (see `dump --store`), oldest first.
    Checkpoints(StoreArgs),
    /// Remove a store's checkpoints but the newest --keep, then every chunk no remaining
    /// checkpoint names. A checkpoint being written meanwhile is never harmed (its chunks wait
    /// for a later prune).
    Prune(PruneArgs),
    /// Start a command so that it can be checkpointed: own PID and IPC namespaces (its SysV
    /// shared memory goes with it) and session, stdin
    /// from /dev/null, output to a log file. Prints its PID.
    Exec(ExecArgs),
    /// Report whether checkpoints work on this machine and what is missing.
    Check(CheckArgs),
    /// Serve a job's commands over NATS JetStream (token from CEDANA_NATS_TOKEN or the config).
    Daemon(DaemonArgs),
    /// A dump's guardian (started by the agent itself): resumes the tree under --tree if the
    /// agent --agent dies before it did.
    #[command(hide = true)]
    Guard {
        #[arg(long, required_unless_present = "lazy")]
        tree: Option<i32>,
        #[arg(long, required_unless_present = "lazy")]
        agent: Option<i32>,
        #[arg(long, required_unless_present = "lazy")]
        agent_start: Option<u64>,
        /// Guard a lazily restored tree (see `guard::run_lazy`)
        #[arg(long)]
        lazy: bool,
    },
    /// The original's spelling: `client dump …` and `client restore …` are `dump` and
    /// `restore`.
    #[command(hide = true)]
    Client {
        #[command(subcommand)]
        command: ClientCommand,
    },
}

/// `cedana-agent client …`, as the original's `cedana client …`.
#[derive(Subcommand)]
enum ClientCommand {
    /// Same as `cedana-agent dump`.
    Dump(DumpArgs),
    /// Same as `cedana-agent restore`.
    Restore(RestoreArgs),
}

#[derive(Args)]
#[command(after_help = EXIT_CODES)]
struct DaemonArgs {
    /// Job this worker belongs to
    #[arg(long, env = "CEDANA_JOB")]
    job: String,
    /// This worker's id
    #[arg(long, env = "CEDANA_WORKER")]
    worker: String,
    /// NATS server URL, or several separated by commas [default: connection.nats_url and
    /// connection.nats_port from the config]
    #[arg(long, env = "CEDANA_NATS_URL")]
    nats_url: Option<String>,
    /// File holding the NATS token, or a NATS user's credential written `user:NAME:PASSWORD`
    /// (what the driver's embedded server gives each worker) [default: $CEDANA_NATS_TOKEN,
    /// connection.auth_token]
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// The worker's folder
    #[arg(long, default_value = "/var/lib/cedana/work", env = "CEDANA_WORK_DIR")]
    work_dir: PathBuf,
    /// Seconds between heartbeats
    #[arg(long, default_value_t = 5)]
    heartbeat_secs: u64,
    /// A folder all workers of the job mount (shared_storage): checkpoints go there instead of
    /// the NATS object store
    #[arg(long, value_name = "DIR", env = "CEDANA_SHARED_STORAGE")]
    shared_storage: Option<PathBuf>,
    /// A checkpoint store for the job's checkpoints (s3://BUCKET/PREFIX, gs://…, az://…,
    /// file:///PATH): they go there as chunks and only what the store lacks is sent; workers
    /// need no shared folder. Credentials the cloud's standard way
    #[arg(long, value_name = "URL", env = "CEDANA_STORE")]
    store: Option<String>,
    /// The job's checkpoint bucket in the NATS object store (the driver gives each job its
    /// own) [default: cedana_checkpoints, shared by jobs from before]
    #[arg(long, value_name = "NAME", env = "CEDANA_CHECKPOINT_BUCKET")]
    checkpoint_bucket: Option<String>,
    /// Restore the store's checkpoints in full before the task runs again. By default they
    /// are restored lazily (the task runs once its state is back, its memory follows, each
    /// chunk checked before use) where this machine can (userfaultfd)
    #[arg(long, env = "CEDANA_FULL_RESTORE", value_parser = clap::builder::BoolishValueParser::new())]
    full_restore: bool,
    /// Watch EC2 instance metadata (IMDSv2) for spot interruption notices: on one, every task
    /// is checkpointed right away (left running) and a spot_notice event names the checkpoints;
    /// rebalance recommendations are reported too
    #[arg(long, env = "CEDANA_WATCH_SPOT", value_parser = clap::builder::BoolishValueParser::new())]
    watch_spot: bool,
    /// Instance metadata endpoint (plain HTTP); giving one turns --watch-spot on
    /// [default: http://169.254.169.254]
    #[arg(long, value_name = "URL", env = "CEDANA_IMDS_ENDPOINT")]
    imds_endpoint: Option<String>,
    /// Seconds between polls of instance metadata
    #[arg(long, value_name = "N", default_value_t = 2)]
    spot_poll_secs: u64,
}

#[derive(Args)]
#[command(after_help = EXIT_CODES)]
struct DumpArgs {
    /// PID of the process to checkpoint (its descendants come along)
    #[arg(short, long)]
    pid: i32,
    /// Folder for the archive [default: shared_storage.dump_storage_dir from the config, else
    /// the current folder]
    #[arg(short = 'd', long = "dir", value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Keep the process running after the checkpoint (default: it is stopped)
    #[arg(long)]
    leave_running: bool,
    /// Compression of the archive's entries
    #[arg(long, value_enum, default_value_t = Compression::None)]
    compress: Compression,
    /// Checkpoint established TCP connections with their state: they come back open, which
    /// needs the same addresses (restore with --tcp-close elsewhere)
    #[arg(long, conflicts_with = "tcp_close")]
    tcp_established: bool,
    /// Leave established TCP connections out: they come back closed and the peers reconnect
    /// (what a move to another host needs)
    #[arg(long)]
    tcp_close: bool,
    /// Allow connections to unix sockets outside the process tree (e.g. /dev/log)
    #[arg(long)]
    ext_unix_sk: bool,
    /// Leave half-open (in-flight) TCP connections out of the checkpoint
    #[arg(long)]
    skip_in_flight: bool,
    /// Open files whose name was deleted or replaced are linked back under a new name
    /// instead of failing the dump
    #[arg(long)]
    link_remap: bool,
    /// Largest deleted-but-open file carried in the checkpoint, bytes [CRIU's default: 1 MiB]
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u32).range(1..))]
    ghost_limit: Option<u32>,
    #[command(flatten)]
    both: CriuBoth,
    /// Where CRIU writes images before archiving [default: $CEDANA_STAGING_DIR, else DIR]
    #[arg(long, value_name = "DIR")]
    staging_dir: Option<PathBuf>,
    /// Do not wait for the archive to reach the disk (no fsync): as fast as raw `criu dump`
    /// on a disk, but an OS crash soon after may lose the archive. Worth it where the disk
    /// goes with the machine anyway (a cloud instance's local disk, tmpfs)
    #[arg(long, conflicts_with_all = ["store", "chunked"])]
    no_sync: bool,
    /// Carry this folder (the task's work folder) in the checkpoint as it is at the dump, so
    /// the task finds its files after a restore elsewhere (`restore --files-to`)
    #[arg(long, value_name = "FOLDER")]
    with_files: Option<PathBuf>,
    /// Put the checkpoint into a store instead of an archive: s3://BUCKET/PREFIX,
    /// gs://BUCKET/PREFIX, az://CONTAINER/PREFIX, file:///PATH. It goes in as chunks, and only
    /// the chunks the store lacks are sent; prints the checkpoint's name. Credentials the
    /// cloud's standard way (AWS_* variables or the instance's role; AWS_ENDPOINT_URL for an
    /// S3-compatible server)
    #[arg(
        long,
        value_name = "URL",
        env = "CEDANA_STORE",
        conflicts_with = "compress"
    )]
    store: Option<String>,
    /// Write the archive in the store's format: manifest.json (format 2), restore.sh and
    /// chunks/<blake3> (zstd frames), so it restores alone, with `unzip` and a shell (`sh
    /// restore.sh`), or goes into a store as it is. The process runs again (or is frozen, to
    /// be stopped) as soon as CRIU is done; cutting and compressing follow
    #[arg(long, conflicts_with_all = ["compress", "store"])]
    chunked: bool,
    /// zstd level of a store's chunks (1 fast .. 19 small)
    #[arg(long, value_name = "N", default_value_t = cedana_agent::chunked::DEFAULT_LEVEL,
          value_parser = clap::value_parser!(i32).range(-7..=19))]
    level: i32,
    /// Print the result as JSON on stdout
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
#[command(after_help = EXIT_CODES)]
struct RestoreArgs {
    /// The archive written by `dump`, or with --store the checkpoint's name
    archive: PathBuf,
    /// Restore checkpoint ARCHIVE from this store (see `dump --store`): its chunks are fetched
    /// and each checked against its name before CRIU runs
    #[arg(long, value_name = "URL", env = "CEDANA_STORE")]
    store: Option<String>,
    /// Where images are extracted before the restore [default: $CEDANA_STAGING_DIR, else next
    /// to the archive, else the temp folder]
    #[arg(long, value_name = "DIR")]
    staging_dir: Option<PathBuf>,
    /// Put the files the checkpoint carries (`dump --with-files`) back under this folder before
    /// restoring; normally the folder they came from. Files there with the same names are
    /// replaced.
    #[arg(long, value_name = "FOLDER")]
    files_to: Option<PathBuf>,
    /// Established TCP connections the checkpoint holds come back closed (the peers
    /// reconnect): for a checkpoint dumped with --tcp-established restored on another host
    #[arg(long)]
    tcp_close: bool,
    #[command(flatten)]
    both: CriuBoth,
    /// Restore lazily: the process runs again as soon as its state is back, and its memory
    /// follows, each page fetched (and checked) when first touched and the rest in the
    /// background. Needs a chunked checkpoint (`dump --chunked` or `dump --store`) and a
    /// kernel with userfaultfd; otherwise the restore is a full one, and says so. Prints the
    /// PID once the process runs and returns once all its memory is back; a chunk that fails
    /// its check ends the process (it never runs on memory that is not its own)
    #[arg(long)]
    lazy: bool,
    /// Print the result as JSON on stdout
    #[arg(long)]
    json: bool,
}

/// CRIU options of both a dump and a restore (a restore takes the dump's by default).
#[derive(Args, Clone)]
struct CriuBoth {
    /// How CRIU handles the tree's cgroups (`--manage-cgroups`) [default: CRIU's, soft; a
    /// restore: the dump's]
    #[arg(long, value_enum, value_name = "MODE")]
    manage_cgroups: Option<cedana_agent::CgroupMode>,
    /// How the network is locked while the tree is dumped or restored (`--network-lock`)
    /// [default: nftables with --tcp-established; a restore: the dump's]
    #[arg(long, value_enum, value_name = "METHOD")]
    network_lock: Option<cedana_agent::NetworkLock>,
    /// A resource outside the tree, as CRIU spells it (`--external`), repeatable: at the dump
    /// e.g. `mnt[/data]:data`, `dev[8/1]:disk`, `unix[INO]`; the restore names each again its
    /// own way (`mnt[data]:/data`). Recorded in the checkpoint, so a restore that forgets
    /// them is refused before anything changes
    #[arg(long = "external", value_name = "RESOURCE")]
    external: Vec<String>,
}

#[derive(Args)]
#[command(after_help = EXIT_CODES)]
struct ExecArgs {
    /// File that receives the command's stdout and stderr (appended) [default:
    /// ./<command>.log]
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
    /// Working directory of the command [default: the current one]
    #[arg(long, value_name = "DIR")]
    cwd: Option<PathBuf>,
    /// Also give the command a user namespace (root's, every id mapped as it is) and a mount
    /// tree of its own (the root filesystem, /dev, /proc, a fresh /dev/shm and the mounts its
    /// log and working directory are on; nothing else): a command that drops root (setpriv,
    /// su, a database server) can then be checkpointed where CRIU lacks CAP_SYS_RESOURCE (in
    /// a container)
    #[arg(long)]
    userns: bool,
    /// Print the result as JSON on stdout
    #[arg(long)]
    json: bool,
    /// The command and its arguments
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

#[derive(Args)]
#[command(after_help = EXIT_CODES)]
struct StoreArgs {
    /// The store: s3://BUCKET/PREFIX, gs://…, az://…, file:///PATH
    #[arg(long, value_name = "URL", env = "CEDANA_STORE")]
    store: String,
    /// Print the result as JSON on stdout
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
#[command(after_help = EXIT_CODES)]
struct PruneArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// How many of the newest checkpoints to keep
    #[arg(long, value_name = "N", default_value_t = 2)]
    keep: usize,
}

#[derive(Args)]
struct CheckArgs {
    /// Print the report as JSON on stdout
    #[arg(long)]
    json: bool,
}

/// An error with the exit code it maps to.
struct Failure {
    code: u8,
    kind: &'static str,
    error: anyhow::Error,
}

impl Failure {
    fn new(code: u8, kind: &'static str, error: impl Into<anyhow::Error>) -> Self {
        Failure {
            code,
            kind,
            error: error.into(),
        }
    }
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    // The original's `client dump|restore` is the same command.
    if let Command::Client { command } = cli.command {
        cli.command = match command {
            ClientCommand::Dump(a) => Command::Dump(a),
            ClientCommand::Restore(a) => Command::Restore(a),
        };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal (a worker's log is a file).
        .with_ansi(std::io::stderr().is_terminal())
        // A log that cannot be written (its disk is full) must not end the daemon: the
        // subscriber's own report of that would panic on the same full stderr.
        .log_internal_errors(false)
        .init();
    let json = match &cli.command {
        Command::Dump(a) => a.json,
        Command::Restore(a) => a.json,
        Command::Exec(a) => a.json,
        Command::Check(a) => a.json,
        Command::Checkpoints(a) => a.json,
        Command::Prune(a) => a.store.json,
        Command::Daemon(_) | Command::Client { .. } | Command::Guard { .. } => false,
    };
    match run(cli) {
        Ok(code) => code,
        Err(f) => {
            if json {
                let v =
                    serde_json::json!({"ok": false, "error": f.error.to_string(), "kind": f.kind});
                println!("{v}");
            }
            // Never a panic when stderr cannot be written (a log on a full disk).
            let _ = writeln!(std::io::stderr(), "cedana-agent: error: {}", f.error);
            ExitCode::from(f.code)
        }
    }
}

fn load_config(cli: &Cli) -> Result<Config, Failure> {
    Config::load_default(cli.config.as_deref()).map_err(|e| Failure::new(3, "config", e))
}

fn criu(cli: &Cli, config: &Config) -> Result<cedana_agent::Criu, Failure> {
    cedana_agent::locate_criu(cli.criu.as_deref(), config)
        .map_err(|e| Failure::new(5, "environment", e))
}

/// The CRIU options `dump` was given, checked.
fn dump_criu_options(a: &DumpArgs) -> Result<cedana_agent::CriuOptions, Failure> {
    let o = cedana_agent::CriuOptions {
        tcp: if a.tcp_established {
            TcpMode::Established
        } else if a.tcp_close {
            TcpMode::Close
        } else {
            TcpMode::Refuse
        },
        ext_unix_sk: a.ext_unix_sk,
        link_remap: a.link_remap,
        ghost_limit: a.ghost_limit,
        skip_in_flight: a.skip_in_flight,
        manage_cgroups: a.both.manage_cgroups,
        network_lock: a.both.network_lock,
        external: a.both.external.clone(),
    };
    o.check().map_err(|e| Failure::new(2, "usage", e))?;
    Ok(o)
}

fn run(cli: Cli) -> Result<ExitCode, Failure> {
    match &cli.command {
        Command::Dump(a) => {
            let config = load_config(&cli)?;
            let criu = criu(&cli, &config)?;
            let dir = match (&a.dir, config.dump_dir()) {
                (Some(d), _) => d.clone(),
                (None, Some(d)) => d.to_path_buf(),
                (None, None) => PathBuf::from("."),
            };
            let mut opts = cedana_agent::DumpOptions {
                pid: a.pid,
                dir,
                leave_running: a.leave_running,
                compression: a.compress,
                criu: dump_criu_options(a)?,
                staging: a.staging_dir.clone(),
                files: a.with_files.clone(),
                files_exclude: Vec::new(),
                files_copy: Vec::new(),
                sync: !a.no_sync,
            };
            thaw_on_signal(a.pid);
            let bar = Bar::new();
            if let Some(url) = &a.store {
                let url = store_url(url)?;
                let rt = runtime()?;
                let out = retry_copying(&mut opts, |opts| {
                    cedana_agent::chunked::dump_to_store(
                        &criu,
                        opts,
                        &url,
                        a.level,
                        rt.handle(),
                        bar.as_progress(),
                    )
                })
                .map_err(dump_failure)?;
                if a.json {
                    print_json(&out);
                } else {
                    println!("{}", out.name);
                    eprintln!(
                        "{} chunks, {} sent ({} of {} bytes); the task was stopped for {} ms",
                        out.uploaded.chunks,
                        out.uploaded.chunks_sent,
                        out.uploaded.stored_sent,
                        out.uploaded.bytes,
                        out.frozen_time.as_millis()
                    );
                }
                return Ok(ExitCode::SUCCESS);
            }
            if a.chunked {
                let rt = runtime()?;
                let out = retry_copying(&mut opts, |opts| {
                    cedana_agent::chunkzip::dump_to_zip(
                        &criu,
                        opts,
                        a.level,
                        rt.handle(),
                        bar.as_progress(),
                    )
                })
                .map_err(dump_failure)?;
                if a.json {
                    print_json(&out);
                } else {
                    println!("{}", out.archive.display());
                }
                return Ok(ExitCode::SUCCESS);
            }
            let out = retry_copying(&mut opts, |opts| {
                cedana_agent::dump(&criu, opts, bar.as_progress())
            })
            .map_err(dump_failure)?;
            if a.json {
                print_json(&out);
            } else {
                println!("{}", out.archive.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Restore(a) => {
            let config = load_config(&cli)?;
            let criu = criu(&cli, &config)?;
            let opts = cedana_agent::RestoreOptions {
                archive: a.archive.clone(),
                staging: a.staging_dir.clone(),
                as_child: false,
                files_to: a.files_to.clone(),
                criu: cedana_agent::RestoreCriu {
                    tcp_close: a.tcp_close,
                    manage_cgroups: a.both.manage_cgroups,
                    network_lock: a.both.network_lock,
                    external: a.both.external.clone(),
                },
            };
            let bar = Bar::new();
            // A chunked archive's chunks are read where they lie in the zip, lazily or not; a
            // store's checkpoint lazily through the same path.
            let chunked = a.store.is_none() && cedana_agent::chunkzip::is_chunked(&a.archive);
            if chunked || (a.lazy && a.store.is_some()) {
                return restore_lazily(a, &criu, &opts, &bar, !a.lazy);
            }
            if a.lazy {
                tracing::warn!(archive = %a.archive.display(), "restoring in full, not lazily: a plain archive's memory is not in chunks; `dump --chunked` or `dump --store` take checkpoints that restore lazily");
            }
            let out = match &a.store {
                Some(url) => {
                    let url = store_url(url)?;
                    let rt = runtime()?;
                    let name = a.archive.to_string_lossy();
                    cedana_agent::chunked::restore_from_store(
                        &criu,
                        &url,
                        &name,
                        &opts,
                        rt.handle(),
                        bar.as_progress(),
                    )
                }
                None => cedana_agent::restore(&criu, &opts, bar.as_progress()),
            }
            .map_err(restore_failure)?;
            settle(out.pid)?;
            if a.json {
                print_json(&out);
            } else {
                println!("{}", out.pid);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Checkpoints(a) => {
            let url = store_url(&a.store)?;
            let rt = runtime()?;
            let list = cedana_agent::chunked::list(&url, rt.handle())
                .map_err(|e| Failure::new(1, "store", e))?;
            if a.json {
                print_json(&list);
            } else {
                for c in &list {
                    println!("{}", c.name);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Prune(a) => {
            let url = store_url(&a.store.store)?;
            let rt = runtime()?;
            let store = cedana_store::Store::open(&url).map_err(|e| Failure::new(3, "input", e))?;
            let keep = cedana_store::Keep {
                newest: a.keep,
                ..Default::default()
            };
            let out = rt
                .block_on(cedana_store::prune(&store, &keep))
                .map_err(|e| Failure::new(1, "store", e))?;
            if a.store.json {
                print_json(&out);
            } else {
                println!(
                    "kept {} checkpoint(s), removed {}; removed {} chunk(s) ({} bytes), kept {}",
                    out.kept.len(),
                    out.removed.len(),
                    out.chunks_removed,
                    out.stored_bytes_removed,
                    out.chunks_kept
                );
                if let Some(why) = &out.chunks_deferred {
                    eprintln!("no chunk removed this time: {why}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Exec(a) => {
            let (program, args) = a.command.split_first().expect("clap requires a command");
            let log = a.log.clone().unwrap_or_else(|| {
                let base = std::path::Path::new(program)
                    .file_name()
                    .unwrap_or(program.as_os_str());
                PathBuf::from(format!(
                    "{}.log",
                    cedana_agent::process::sanitize(&base.to_string_lossy())
                ))
            });
            let log = std::path::absolute(&log).unwrap_or(log);
            let opts = exec::ExecOptions {
                program: program.clone(),
                args: args.to_vec(),
                log: log.clone(),
                cwd: a.cwd.clone(),
                userns: a.userns,
            };
            let pid = exec::spawn(&opts).map_err(|e| match e {
                exec::ExecError::Clone { .. } | exec::ExecError::Userns { .. } => {
                    Failure::new(5, "environment", e)
                }
                exec::ExecError::UsernsFolder { .. } => Failure::new(3, "input", e),
                _ => Failure::new(1, "exec", e),
            })?;
            if a.json {
                print_json(&serde_json::json!({"ok": true, "pid": pid.as_raw(), "log": log}));
            } else {
                println!("{pid}");
                eprintln!("output goes to {}", log.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Daemon(a) => daemon(&cli, a),
        Command::Client { .. } => unreachable!("mapped to dump or restore in main"),
        Command::Guard {
            tree,
            agent,
            agent_start,
            lazy,
        } => {
            match (lazy, tree, agent, agent_start) {
                (true, ..) => cedana_agent::guard::run_lazy(),
                (false, Some(t), Some(a), Some(s)) => cedana_agent::guard::run(*t, *a, *s),
                _ => {}
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check(a) => {
            let config = load_config(&cli)?;
            let located = cedana_agent::locate_criu(cli.criu.as_deref(), &config);
            let report = check::run(located.as_ref().map_err(|e| e.to_string()));
            if a.json {
                print_json(&report);
            } else {
                for f in &report.findings {
                    let mark = if f.ok {
                        "ok  "
                    } else if f.fatal {
                        "FAIL"
                    } else {
                        "warn"
                    };
                    println!("[{mark}] {:<15} {}", f.name, f.detail);
                }
                println!();
                println!(
                    "{}",
                    if report.ok {
                        "Checkpoint and restore will work on this machine."
                    } else {
                        "Checkpoint and restore will NOT work on this machine: fix the FAIL lines above."
                    }
                );
            }
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(5)
            })
        }
    }
}

fn daemon(cli: &Cli, a: &DaemonArgs) -> Result<ExitCode, Failure> {
    let config = load_config(cli)?;
    let criu = criu(cli, &config)?;
    let token = match (&a.token_file, std::env::var("CEDANA_NATS_TOKEN")) {
        (Some(f), _) => std::fs::read_to_string(f)
            .map(|t| cedana_protocol::Secret::new(t.trim()))
            .map_err(|e| {
                Failure::new(
                    3,
                    "input",
                    anyhow::anyhow!("cannot read token file {}: {e}", f.display()),
                )
            })?,
        (None, Ok(t)) if !t.is_empty() => cedana_protocol::Secret::new(t),
        _ => config.connection.auth_token.clone(),
    };
    // Tasks, `sh` commands and CRIU inherit this process's environment: the token leaves it
    // (no thread runs yet that could read the environment meanwhile).
    std::env::remove_var("CEDANA_NATS_TOKEN");
    // The checkpoint store's credentials likewise: kept for the store, out of the environment.
    cedana_store::location::capture_env();
    let nats_url = match &a.nats_url {
        Some(u) => u.clone(),
        None if !config.connection.nats_url.is_empty() => cedana_protocol::NatsUrl::from_config(
            &config.connection.nats_url,
            config.connection.nats_port,
        )
        .to_string(),
        None => {
            return Err(Failure::new(
                3,
                "input",
                anyhow::anyhow!("no NATS server: pass --nats-url, set CEDANA_NATS_URL, or connection.nats_url in the config"),
            ))
        }
    };
    let opts = cedana_agent::daemon::DaemonOptions {
        nats_url,
        token,
        job: a.job.clone(),
        worker: a.worker.clone(),
        work_dir: a.work_dir.clone(),
        heartbeat: std::time::Duration::from_secs(a.heartbeat_secs.max(1)),
        shared_storage: a.shared_storage.clone(),
        store: a.store.as_deref().map(store_url).transpose()?,
        bucket: a
            .checkpoint_bucket
            .clone()
            .unwrap_or_else(|| cedana_protocol::CHECKPOINTS_BUCKET.into()),
        full_restore: a.full_restore,
        spot: match a.imds_endpoint.as_deref().map(str::trim) {
            Some(endpoint) if !endpoint.is_empty() => Some(endpoint.to_string()),
            _ if a.watch_spot => Some(cedana_agent::imds::DEFAULT_ENDPOINT.to_string()),
            _ => None,
        }
        .map(|endpoint| cedana_agent::daemon::SpotOptions {
            endpoint,
            poll: std::time::Duration::from_secs(a.spot_poll_secs.max(1)),
        }),
    };
    let rt = tokio::runtime::Runtime::new().map_err(|e| Failure::new(1, "io", e))?;
    let result = rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        let stop = async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        // Whatever the daemon is doing (connecting, a command), a stop ends it at once; its
        // tasks run on, for the next run of the daemon to take back.
        tokio::select! {
            r = cedana_agent::daemon::run(opts, criu, std::future::pending::<()>()) => r,
            _ = stop => {
                tracing::info!("stopping; tasks are left running for the next run to take back");
                Ok(())
            }
        }
    });
    // Work still on the runtime's threads (a dump, a log being read) is not waited for.
    rt.shutdown_timeout(std::time::Duration::from_millis(300));
    result.map_err(|e| match e {
        cedana_agent::daemon::DaemonError::NoToken
        | cedana_agent::daemon::DaemonError::BadId(_)
        | cedana_agent::daemon::DaemonError::BadBucket(_)
        | cedana_agent::daemon::DaemonError::Imds(_) => Failure::new(3, "input", e),
        cedana_agent::daemon::DaemonError::Auth { .. } => Failure::new(6, "auth", e),
        _ => Failure::new(1, "nats", e),
    })?;
    Ok(ExitCode::SUCCESS)
}

/// During a dump the tree may be frozen; if the user interrupts the agent (Ctrl-C, SIGTERM,
/// SIGHUP), thaw it before exiting so nothing is lost. (CRIU, cut off mid-dump, thaws the tree
/// itself.) Must run before any other thread starts: they inherit the blocked signals.
fn thaw_on_signal(pid: i32) {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    if set.thread_block().is_err() {
        return;
    }
    std::thread::spawn(move || {
        if let Ok(sig) = set.wait() {
            for p in cedana_agent::process::descendants(pid).into_iter().rev() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), Signal::SIGCONT);
            }
            eprintln!(
                "cedana-agent: interrupted ({sig}): dump abandoned, process {pid} left running"
            );
            std::process::exit(130);
        }
    });
}

fn print_json(v: &impl serde::Serialize) {
    let mut value = serde_json::to_value(v).expect("output serializes");
    if let Some(obj) = value.as_object_mut() {
        obj.entry("ok").or_insert(serde_json::Value::Bool(true));
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&value).expect("output serializes")
    );
}

/// A dump, taken again (at most twice more) when a large carried file was written in place
/// while it was stored, copying that file while the tree is stopped the next time.
fn retry_copying<T>(
    opts: &mut cedana_agent::DumpOptions,
    mut dump: impl FnMut(&cedana_agent::DumpOptions) -> Result<T, DumpError>,
) -> Result<T, DumpError> {
    let mut tries = 0;
    loop {
        match dump(opts) {
            Err(DumpError::Files(cedana_agent::files::FilesError::Changed { path }))
                if tries < 2 =>
            {
                eprintln!(
                    "{} was written in place during the checkpoint: taking it again, copying that file while the process is stopped",
                    path.display()
                );
                opts.files_copy.push(path);
                tries += 1;
            }
            other => return other,
        }
    }
}

/// Restored is not running: a tree that ends at once (its terminal, a file, a peer it needs is
/// gone) is reported, not counted a success.
fn settle(pid: i32) -> Result<(), Failure> {
    let settled = std::time::Instant::now();
    while settled.elapsed() < std::time::Duration::from_millis(200) {
        if cedana_agent::process::start_time(pid).is_none() {
            return Err(Failure::new(
                1,
                "restore",
                anyhow::anyhow!(
                    "the process restored as PID {pid} ended right away (within 0.2 s of the restore): the checkpoint came back but did not keep running; something it needs may be gone here (its terminal, a file, a connection); see its output"
                ),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(())
}

/// The result of `restore --lazy`.
#[derive(serde::Serialize)]
struct LazyOutput {
    pid: i32,
    archive: PathBuf,
    /// Fetching and checking what CRIU needs before it starts.
    verify_time_ms: u128,
    criu_time_ms: u128,
    lazy: bool,
    /// Why the restore was a full one, when it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    full_because: Option<String>,
    /// A full restore handed CRIU its memory chunk by chunk as it read (none written first).
    streamed: bool,
    /// From the start to the process running again.
    running_after_ms: u128,
    #[serde(skip_serializing_if = "Option::is_none")]
    served: Option<cedana_agent::lazy::Served>,
}

/// `restore [--lazy]` of a chunked archive, `restore --lazy` of a store's checkpoint; `full`:
/// not lazily.
fn restore_lazily(
    a: &RestoreArgs,
    criu: &cedana_agent::Criu,
    opts: &cedana_agent::RestoreOptions,
    bar: &Bar,
    full: bool,
) -> Result<ExitCode, Failure> {
    use cedana_agent::lazy::{self, ChunkSource};
    let t0 = std::time::Instant::now();
    let rt = runtime()?;
    let (source, manifest, root, failed_log): (std::sync::Arc<dyn ChunkSource>, _, _, _) = match &a
        .store
    {
        Some(url) => {
            let url = store_url(url)?;
            let st = cedana_store::Store::open(&url)
                .map_err(|e| restore_failure(RestoreError::Store(Box::new(e))))?;
            let name = a.archive.to_string_lossy().into_owned();
            let manifest = cedana_agent::chunked::read_manifest(&st, &name, rt.handle())
                .map_err(restore_failure)?;
            let root = cedana_agent::staging::root(
                opts.staging.as_deref(),
                &std::env::current_dir().unwrap_or_else(|_| "/tmp".into()),
            );
            let failed = root.join(format!("{name}.restore-failed.log"));
            let src = lazy::StoreSource::new(st, &name, rt.handle().clone());
            (std::sync::Arc::new(src) as _, manifest, root, failed)
        }
        None => {
            let (src, bytes) = lazy::ZipSource::open(&a.archive)
                .map_err(|e| restore_failure(RestoreError::Archive(e)))?;
            let manifest = cedana_agent::chunked::check_manifest(&bytes, &a.archive)
                .map_err(restore_failure)?;
            let root = cedana_agent::restore::staging_root_for(opts).map_err(restore_failure)?;
            let failed = cedana_agent::restore::failed_log_path(&a.archive);
            (std::sync::Arc::new(src) as _, manifest, root, failed)
        }
    };
    let opts = cedana_agent::RestoreOptions {
        archive: match &a.store {
            Some(url) => PathBuf::from(format!("{url}/{}", a.archive.display())),
            None => a.archive.clone(),
        },
        ..opts.clone()
    };
    let restored = lazy::restore_as(
        criu,
        source,
        manifest,
        &root,
        &opts,
        &failed_log,
        bar.as_progress(),
        full,
    )
    .map_err(restore_failure)?;
    let running_after_ms = t0.elapsed().as_millis();
    let pid = restored.outcome.pid;
    if !a.json {
        println!("{pid}");
        let _ = std::io::stdout().flush();
    }
    let served = match restored.serving {
        Some(serving) => {
            if !a.json {
                eprintln!(
                    "restored as PID {pid} after {running_after_ms} ms; its memory is arriving"
                );
            }
            Some(serving.wait().map_err(|e| {
                let code = match &e {
                    lazy::LazyError::Chunk(c) if c.trouble != lazy::ChunkTrouble::Unreachable => 3,
                    _ => 1,
                };
                Failure::new(code, "restore", e)
            })?)
        }
        None => {
            settle(pid)?;
            None
        }
    };
    if a.json {
        print_json(&LazyOutput {
            lazy: served.is_some(),
            pid,
            archive: opts.archive.clone(),
            verify_time_ms: restored.outcome.verify_time.as_millis(),
            criu_time_ms: restored.outcome.criu_time.as_millis(),
            full_because: restored.full_because,
            streamed: restored.outcome.streamed,
            running_after_ms,
            served,
        });
    } else if let Some(s) = &served {
        eprintln!(
            "all its memory is back after {} ms more ({} requests answered, {} chunks fetched after it ran)",
            s.resident_time.as_millis(),
            s.requests,
            s.chunks_fetched
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn store_url(text: &str) -> Result<cedana_store::StoreUrl, Failure> {
    cedana_store::StoreUrl::parse(text).map_err(|e| Failure::new(3, "input", e))
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(1, "io", e))
}

/// A store's error: bad input when it is about the checkpoint (missing, damaged, refused),
/// else the store's or this machine's trouble.
fn store_failure_code(e: &cedana_store::StoreError) -> u8 {
    use cedana_store::StoreError::*;
    match e {
        BadUrl { .. }
        | NoCheckpoint { .. }
        | MissingChunk { .. }
        | BadChunk { .. }
        | BadManifest { .. } => 3,
        Exists { .. } | Io { .. } | Read { .. } | Write { .. } => 1,
    }
}

fn dump_failure(e: DumpError) -> Failure {
    match e {
        DumpError::NoDir { .. }
        | DumpError::Process(_)
        | DumpError::Terminal { .. }
        | DumpError::Stopped { .. } => Failure::new(3, "input", e),
        DumpError::Criu { .. } => Failure::new(4, "criu", e),
        DumpError::Staging { .. } | DumpError::Archive(_) | DumpError::Files(_) => {
            Failure::new(1, "io", e)
        }
        DumpError::Store(ref s) => {
            let code = match s {
                cedana_store::StoreError::BadUrl { .. } => 3,
                _ => 1,
            };
            Failure::new(code, "store", e)
        }
    }
}

fn restore_failure(e: RestoreError) -> Failure {
    match e {
        RestoreError::Archive(ArchiveError::Write { .. })
        | RestoreError::Archive(ArchiveError::NoRoom { .. })
        | RestoreError::Archive(ArchiveError::TooLarge { .. })
        | RestoreError::Staging { .. }
        | RestoreError::Files {
            source: cedana_agent::files::FilesError::Write { .. },
            ..
        } => Failure::new(1, "io", e),
        RestoreError::Archive(_)
        | RestoreError::Cpu { .. }
        | RestoreError::NoCpuInfo { .. }
        | RestoreError::PidTaken { .. }
        | RestoreError::ExternalsNeeded { .. }
        | RestoreError::Options { .. }
        | RestoreError::Files { .. } => Failure::new(3, "input", e),
        RestoreError::Criu { .. } => Failure::new(4, "criu", e),
        RestoreError::Store(ref s) => Failure::new(store_failure_code(s), "store", e),
        RestoreError::Chunk(ref c) => match c.trouble {
            cedana_agent::lazy::ChunkTrouble::Unreachable => Failure::new(1, "store", e),
            _ => Failure::new(3, "input", e),
        },
    }
}

/// A progress bar on stderr when it is a terminal; silent otherwise.
struct Bar {
    pb: Option<ProgressBar>,
}

impl Bar {
    fn new() -> Self {
        let pb = std::io::stderr().is_terminal().then(|| {
            let pb = ProgressBar::new_spinner();
            pb.enable_steady_tick(std::time::Duration::from_millis(120));
            pb
        });
        Bar { pb }
    }
    fn as_progress(&self) -> &dyn Progress {
        if self.pb.is_some() {
            self
        } else {
            &NoProgress
        }
    }
}

impl Progress for Bar {
    fn stage(&self, name: &str, total: Option<u64>) {
        let Some(pb) = &self.pb else { return };
        pb.reset();
        match total {
            Some(t) => {
                pb.set_length(t);
                pb.set_style(
                    ProgressStyle::with_template(
                        "{msg:28} [{bar:32}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    )
                    .expect("template")
                    .progress_chars("=> "),
                );
            }
            _ => pb.set_style(
                ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("template"),
            ),
        }
        pb.set_message(name.to_string());
    }
    fn advance(&self, bytes: u64) {
        if let Some(pb) = &self.pb {
            pb.inc(bytes);
        }
    }
    fn finish(&self) {
        if let Some(pb) = &self.pb {
            pb.finish_and_clear();
        }
    }
}
