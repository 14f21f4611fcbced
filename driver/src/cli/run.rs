//! `cedana-driver run` and `resume`: the job's controller runs in a process of its own (its
//! own session, output in the job's folder); the command starts it and follows it
//! ([`super::attach`]).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cedana_driver::job::managed::FlowError;
use cedana_driver::job::record::{self, JobRecord};
use cedana_driver::job::JobError;
use cedana_driver::jobfile::script::ScriptError;
use cedana_driver::runner::{RunError, RunOptions};

use super::attach::{self, Follow, CONTROLLER_ERR, CONTROLLER_OUT};
use super::exit::Exit;

/// `run`'s arguments, as the command line gave them.
pub struct Run {
    pub script: PathBuf,
    pub checkpoint_every: Option<u64>,
    pub image: Option<PathBuf>,
    pub arbitrage_every: Option<u64>,
    pub arbitrage_margin: Option<f64>,
    pub wait_for_spot: Option<u64>,
    pub detach: bool,
    pub expose: Vec<(u16, u16)>,
    pub controller_for: Option<String>,
}

/// Runs the job: as its controller (`--controller-for`), or by starting the controller and
/// following it.
pub fn run(
    args: Run,
    config: cedana_driver::Config,
    config_path: Option<PathBuf>,
    state_dir: PathBuf,
) -> Exit {
    let reporter: cedana_driver::job::report::SharedReporter =
        std::sync::Arc::new(super::report::Terminal);
    if let Some(id) = args.controller_for {
        let dir = cedana_driver::runner::job_dir(&state_dir, &id);
        let opts = RunOptions {
            script: args.script,
            config,
            config_path,
            state_dir,
            checkpoint_every: args.checkpoint_every,
            image: args.image,
            arbitrage_every: args.arbitrage_every,
            arbitrage_margin: args.arbitrage_margin,
            wait_for_spot: args.wait_for_spot,
            reporter,
            job_id: Some(id),
            expose: args.expose,
        };
        return finish(&dir, cedana_driver::runner::run(opts));
    }
    // Mistakes in the job file and the config reach the terminal before anything starts.
    if let Err(e) =
        cedana_driver::runner::check(&args.script, &config, args.image.as_deref(), &*reporter)
    {
        super::error(&e);
        return exit_of(&e);
    }
    let id = match cedana_driver::runner::new_job_id(&args.script) {
        Ok(id) => id,
        Err(e) => {
            super::error(&e);
            return Exit::Failed;
        }
    };
    let dir = cedana_driver::runner::job_dir(&state_dir, &id);
    let mut controller_args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    controller_args.push("--controller-for".into());
    controller_args.push(id.clone().into());
    start_and_follow(&dir, &id, controller_args, args.detach)
}

/// How `resume` was asked to run.
pub struct ResumeHow {
    pub detach: bool,
    pub standby: bool,
    pub controller: bool,
}

/// `resume JOB`: as the controller (`--controller`), or by starting one and following it.
pub fn resume(
    job: &str,
    how: ResumeHow,
    config: cedana_driver::Config,
    state_dir: PathBuf,
) -> Exit {
    let reporter: cedana_driver::job::report::SharedReporter =
        std::sync::Arc::new(super::report::Terminal);
    let found = if how.standby {
        // A standby waits for the controller it would replace: only the job must be there,
        // unfinished, on the managed flow.
        record::find(&state_dir, job)
            .map_err(RunError::from)
            .and_then(|(dir, r)| {
                if r.state.is_final() {
                    Err(RunError::Ended {
                        job: r.job.clone(),
                        state: r.shown_state(),
                    })
                } else if !r.managed {
                    Err(RunError::NotResumable { job: r.job.clone() })
                } else {
                    Ok((dir, r))
                }
            })
    } else {
        cedana_driver::runner::resumable(&state_dir, job)
    };
    let (dir, rec) = match found {
        Ok(found) => found,
        Err(e) => {
            super::error(&e);
            return match e {
                RunError::State(_) | RunError::Ended { .. } => Exit::NoJob,
                _ => Exit::Failed,
            };
        }
    };
    if how.controller {
        let opts = cedana_driver::runner::ResumeOptions {
            state_dir,
            job: rec.job.clone(),
            config,
            reporter,
            takeover: None,
        };
        return match how.standby {
            true => match cedana_driver::runner::standby(opts) {
                // Not this one's to finish: the job's code is what its controller wrote.
                Err(RunError::EndedElsewhere { exit_status, .. }) => {
                    Exit::Task(exit_status.unwrap_or(1))
                }
                r => finish(&dir, r),
            },
            false => finish(&dir, cedana_driver::runner::resume(opts)),
        };
    }
    let detach = how.detach;
    let mut controller_args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    controller_args.push("--controller".into());
    start_and_follow(&dir, &rec.job, controller_args, detach)
}

/// Starts `cedana-driver ARGS` as the job's controller (a session of its own, no terminal,
/// output appended to the job's controller files) and follows it.
fn start_and_follow(dir: &Path, id: &str, args: Vec<std::ffi::OsString>, detach: bool) -> Exit {
    let logs = dir.join("logs");
    if let Err(e) = std::fs::create_dir_all(&logs) {
        super::error(format!("cannot create {}: {e}", logs.display()));
        return Exit::Failed;
    }
    let open = |name: &str| {
        let path = logs.join(name);
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map(|f| (f, path))
    };
    let (out, err) = match (open(CONTROLLER_OUT), open(CONTROLLER_ERR)) {
        (Ok(o), Ok(e)) => (o, e),
        (Err(e), _) | (_, Err(e)) => {
            super::error(format!(
                "cannot create the job's output files in {}: {e}",
                logs.display()
            ));
            return Exit::Failed;
        }
    };
    // Where the files end now: a resumed job's earlier output was shown before.
    let from = (
        out.0.metadata().map(|m| m.len()).unwrap_or(0),
        err.0.metadata().map(|m| m.len()).unwrap_or(0),
    );
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("cedana-driver"));
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out.0)
        .stderr(err.0);
    // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            super::error(format!("cannot start the job's controller: {e}"));
            return Exit::Failed;
        }
    };
    attach::follow(Follow {
        dir: dir.to_path_buf(),
        job: id.to_string(),
        child: Some(child),
        detach,
        from,
    })
}

/// The controller's end: the exit code, written into the job's record for `attach`.
fn finish(dir: &Path, result: Result<i64, RunError>) -> Exit {
    let exit = match result {
        Ok(code) => Exit::task(code),
        Err(e) => {
            super::error(&e);
            exit_of(&e)
        }
    };
    if let Ok(mut r) = JobRecord::load(dir) {
        r.exit_status = Some(exit.code());
        if let Err(e) = r.save(dir) {
            super::error(e);
        }
    }
    exit
}

/// The exit code for a job that could not run to its end.
fn exit_of(e: &RunError) -> Exit {
    match e {
        RunError::Script(ScriptError::Syntax { .. } | ScriptError::Read { .. })
        | RunError::Unsupported { .. } => Exit::Usage,
        RunError::SharedStorage { .. } => Exit::Config,
        RunError::Down { .. } => Exit::Down,
        RunError::Flow(FlowError::Job(JobError::NoOffer { .. })) => Exit::NoOffer,
        RunError::State(_) | RunError::Ended { .. } => Exit::NoJob,
        _ => Exit::Failed,
    }
}
