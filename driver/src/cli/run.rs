//! `cedana-driver run`: runs a job file until its task ends; exits with the task's status.

use std::path::PathBuf;

use cedana_driver::job::managed::FlowError;
use cedana_driver::job::JobError;
use cedana_driver::jobfile::script::ScriptError;
use cedana_driver::runner::{RunError, RunOptions};

use super::exit::Exit;

/// `run`'s arguments, as the command line gave them.
pub struct Run {
    pub script: PathBuf,
    pub checkpoint_every: Option<u64>,
    pub image: Option<PathBuf>,
    pub arbitrage_every: Option<u64>,
    pub arbitrage_margin: Option<f64>,
}

/// Runs the job; the task's status, or what went wrong.
pub fn run(args: Run, config: cedana_driver::Config, state_dir: PathBuf) -> Exit {
    let opts = RunOptions {
        script: args.script,
        config,
        state_dir,
        checkpoint_every: args.checkpoint_every,
        image: args.image,
        arbitrage_every: args.arbitrage_every,
        arbitrage_margin: args.arbitrage_margin,
        reporter: std::sync::Arc::new(super::report::Terminal),
    };
    match cedana_driver::runner::run(opts) {
        Ok(code) => Exit::task(code),
        Err(e) => {
            super::error(&e);
            exit_of(&e)
        }
    }
}

/// The exit code for a job that could not run to its end.
fn exit_of(e: &RunError) -> Exit {
    match e {
        RunError::Script(ScriptError::Syntax { .. } | ScriptError::Read { .. })
        | RunError::Unsupported { .. } => Exit::Usage,
        RunError::Down { .. } => Exit::Down,
        RunError::Flow(FlowError::Job(JobError::NoOffer { .. })) => Exit::NoOffer,
        _ => Exit::Failed,
    }
}
