//! The `cedana-driver` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Run long jobs on the cheapest machine that fits and keep them alive across preemption.
///
/// This release runs Rhai job scripts on `local` workers (agent daemons on this machine) with an
/// embedded NATS server; cloud providers, prices and the other commands come next.
#[derive(Parser)]
#[command(
    name = "cedana-driver",
    version,
    after_help = "Exit codes: the task's exit status on success; 1 job failed; 2 bad command line or script (file:line:column given); 3 bad config.\nLogs: RUST_LOG=debug."
)]
struct Cli {
    /// Config file [default: $CEDANA_CONFIG, ~/.cedana/cedana_config.json]
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a job script: with no config, on local workers and a NATS server of its own.
    Run {
        /// The job script (.rhai)
        script: PathBuf,
        /// Where jobs keep their folders [default: $CEDANA_STATE_DIR, ~/.cedana/jobs]
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = match cedana_driver::Config::load_default(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cedana-driver: error: {e}");
            return ExitCode::from(3);
        }
    };
    match cli.command {
        Cmd::Run { script, state_dir } => {
            let opts = cedana_driver::run::RunOptions {
                script,
                config,
                state_dir: state_dir.unwrap_or_else(cedana_driver::run::default_state_dir),
            };
            match cedana_driver::run::run(opts) {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(e) => {
                    eprintln!("cedana-driver: error: {e}");
                    let code = match e {
                        cedana_driver::run::RunError::Script(
                            cedana_driver::script::ScriptError::Syntax { .. },
                        )
                        | cedana_driver::run::RunError::Unsupported { .. } => 2,
                        _ => 1,
                    };
                    ExitCode::from(code)
                }
            }
        }
    }
}
