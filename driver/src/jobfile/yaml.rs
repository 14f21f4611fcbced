//! The original's YAML job spec, run on the managed flow:
//!
//! ```yaml
//! instance_specs: { cpu_cores: 2, memory_gb: 4, max_price_usd_hour: 0.2 }
//! work_dir: "./project"          # copied into each new worker's folder before setup
//! setup:         { run: ["pip install -r requirements.txt"] }
//! task:          { run: ["python train.py"] }
//! restored_task: { run: ["echo restored"] }
//! ```
//!
//! `setup.run` commands run one by one on every new worker (a failing one fails the job);
//! `task.run` commands run in order in one shell, stopping at the first that fails, as the
//! job's task (one process tree, checkpointed as a whole); `restored_task.run` commands run
//! after the task was restored on a new worker. Keys this driver does not know are reported
//! and ignored, so specs written for the original run unchanged.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::job::managed::{FlowError, Hooks, Shared};
use crate::job::report::Reporter;
use crate::job::{Spec, Task, Worker};
use crate::jobfile::script::ScriptError;

/// A list of shell commands.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Commands {
    #[serde(default)]
    pub run: Vec<String>,
}

/// The job spec.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct JobSpec {
    #[serde(default)]
    pub instance_specs: Spec,
    pub work_dir: Option<PathBuf>,
    #[serde(default)]
    pub setup: Commands,
    #[serde(default)]
    pub task: Commands,
    #[serde(default)]
    pub restored_task: Commands,
}

const KNOWN: &[&str] = &[
    "instance_specs",
    "work_dir",
    "setup",
    "task",
    "restored_task",
];

/// Reads a job spec; errors name the file, line and column.
pub fn load(path: &Path, reporter: &dyn Reporter) -> Result<JobSpec, ScriptError> {
    let text = std::fs::read_to_string(path).map_err(|source| ScriptError::Read {
        path: path.into(),
        source,
    })?;
    let syntax = |e: serde_yaml::Error| {
        let loc = e.location();
        ScriptError::Syntax {
            path: path.into(),
            line: loc.as_ref().map(|l| l.line()).unwrap_or(0),
            column: loc.as_ref().map(|l| l.column()).unwrap_or(0),
            message: e.to_string(),
        }
    };
    let value: serde_yaml::Value = serde_yaml::from_str(&text).map_err(syntax)?;
    if let Some(map) = value.as_mapping() {
        for key in map.keys().filter_map(|k| k.as_str()) {
            if !KNOWN.contains(&key) {
                tracing::warn!(file = %path.display(), key, "unknown key in the job spec; ignored");
                reporter.note(&format!(
                    "{}: key {key:?} is not used by this driver; ignored",
                    path.display()
                ));
            }
        }
    }
    let spec: JobSpec = serde_yaml::from_str(&text).map_err(syntax)?;
    if spec.task.run.iter().all(|c| c.trim().is_empty()) {
        return Err(ScriptError::Other {
            path: path.into(),
            message: "task.run lists no command: nothing to run".into(),
        });
    }
    Ok(spec)
}

/// The spec's commands as the managed flow's hooks.
pub struct YamlHooks {
    pub spec: JobSpec,
    /// The spec's folder (relative `work_dir`s are relative to it).
    pub base: PathBuf,
}

fn commands(list: &[String]) -> impl Iterator<Item = &str> {
    list.iter().map(|c| c.trim()).filter(|c| !c.is_empty())
}

impl YamlHooks {
    fn run_each(
        &self,
        job: &Shared,
        w: &Worker,
        what: &str,
        list: &[String],
    ) -> Result<(), FlowError> {
        for cmd in commands(list) {
            let reporter = job.borrow().reporter.clone();
            reporter.note(&format!("{what} on {}: {cmd}", w.id));
            let (code, stdout, stderr) = job.borrow().sh(w, cmd)?;
            stdout.lines().for_each(|l| reporter.print(l));
            stderr.lines().for_each(|l| reporter.log(l));
            if code != 0 {
                return Err(FlowError::Hook {
                    what: format!("{what} command {cmd:?} on worker {}", w.id),
                    message: format!("exit status {code}"),
                });
            }
        }
        Ok(())
    }
}

impl Hooks for YamlHooks {
    fn spec(&mut self) -> Result<Spec, FlowError> {
        Ok(self.spec.instance_specs.clone())
    }
    fn setup(&mut self, job: &Shared, w: &Worker) -> Result<(), FlowError> {
        if let Some(dir) = &self.spec.work_dir {
            let dir = self.base.join(dir);
            let j = job.borrow();
            let to = &j.workers.get(&w.id).and_then(|i| i.local_dir());
            if to.is_none() {
                // Never skipped silently: a task that needs the folder would fail later, far
                // from the cause.
                return Err(FlowError::Hook {
                    what: format!("work_dir {}", dir.display()),
                    message: format!(
                        "worker {} is a cloud machine and this release copies work_dir only to local workers; put the files in the worker image, or fetch them in setup.run (e.g. git clone), and drop work_dir",
                        w.id
                    ),
                });
            }
            if let Some(to) = to {
                // The folder's contents, not the folder: the task runs where they land.
                for e in std::fs::read_dir(&dir).map_err(|e| FlowError::Hook {
                    what: format!("work_dir {}", dir.display()),
                    message: e.to_string(),
                })? {
                    let e = e.map_err(|e| FlowError::Hook {
                        what: format!("work_dir {}", dir.display()),
                        message: e.to_string(),
                    })?;
                    crate::job::copy_tree(&e.path(), &to.join(e.file_name())).map_err(|err| {
                        FlowError::Hook {
                            what: format!("copying {} to worker {}", e.path().display(), w.id),
                            message: err.to_string(),
                        }
                    })?;
                }
            }
        }
        let list = self.spec.setup.run.clone();
        self.run_each(job, w, "setup", &list)
    }
    fn work(&mut self, job: &Shared, w: &Worker) -> Result<Task, FlowError> {
        let script = format!(
            "set -e\n{}",
            commands(&self.spec.task.run).collect::<Vec<_>>().join("\n")
        );
        Ok(job.borrow_mut().spawn(w, &script)?)
    }
    fn restored_task(&mut self, job: &Shared, w: &Worker, _t: &Task) -> Result<(), FlowError> {
        let list = self.spec.restored_task.run.clone();
        self.run_each(job, w, "restored_task", &list)
    }
}
