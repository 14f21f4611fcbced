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

/// The largest job spec read (a real one is a few KiB; 100 MB of small nodes took 10 GB).
pub const MAX_SPEC_BYTES: u64 = 1 << 20;
/// How deep a job spec may nest, counted before parsing (the parser's own limit came only
/// after a scan quadratic in the depth).
pub const MAX_SPEC_DEPTH: usize = 32;
/// The longest command (and the task's commands together): it travels to the worker in one
/// message, and NATS takes at most 1 MiB.
pub const MAX_COMMAND_BYTES: usize = 256 << 10;

/// Reads a job spec; errors name the file, line and column.
pub fn load(path: &Path, reporter: &dyn Reporter) -> Result<JobSpec, ScriptError> {
    let read = |source| ScriptError::Read {
        path: path.into(),
        source,
    };
    let other = |message: String| ScriptError::Other {
        path: path.into(),
        message,
    };
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(std::fs::File::open(path).map_err(read)?, MAX_SPEC_BYTES + 1),
        &mut bytes,
    )
    .map_err(read)?;
    if bytes.len() as u64 > MAX_SPEC_BYTES {
        return Err(other(format!(
            "the job spec is larger than {} KiB; a job spec lists commands, put data and scripts in work_dir",
            MAX_SPEC_BYTES >> 10
        )));
    }
    let text = String::from_utf8(bytes)
        .map_err(|e| read(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
    if let Some((line, depth)) = too_deep(&text, MAX_SPEC_DEPTH) {
        return Err(ScriptError::Syntax {
            path: path.into(),
            line,
            column: 1,
            message: format!(
                "nests {depth} levels deep here, more than the {MAX_SPEC_DEPTH} a job spec may"
            ),
        });
    }
    let syntax = |e: serde_yaml::Error| {
        let loc = e.location();
        ScriptError::Syntax {
            path: path.into(),
            line: loc.as_ref().map(|l| l.line()).unwrap_or(0),
            column: loc.as_ref().map(|l| l.column()).unwrap_or(0),
            message: cedana_protocol::config::plain_types(&e.to_string()),
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
    for (list, what) in [
        (&spec.setup.run, "setup.run"),
        (&spec.task.run, "task.run"),
        (&spec.restored_task.run, "restored_task.run"),
    ] {
        for (i, c) in list.iter().enumerate() {
            if c.len() > MAX_COMMAND_BYTES {
                let start: String = c.trim().chars().take(40).collect();
                return Err(other(format!(
                    "{what}[{i}] ({start:?}…) is {} KiB, more than the {} KiB a command may be; put it in a script in work_dir and run that",
                    c.len() >> 10,
                    MAX_COMMAND_BYTES >> 10
                )));
            }
        }
    }
    let task: usize = commands(&spec.task.run).map(|c| c.len() + 1).sum();
    if task > MAX_COMMAND_BYTES {
        return Err(other(format!(
            "task.run's commands are {} KiB together, more than the {} KiB the task's command may be; put them in a script in work_dir and run that",
            task >> 10,
            MAX_COMMAND_BYTES >> 10
        )));
    }
    Ok(spec)
}

/// The first line where `text` nests deeper than `max` (block indentation, `- ` items and
/// flow brackets together), and the depth there; one pass, before any parsing. Over-counts
/// rather than under-counts: comments and quoted text are skipped, block scalars' lines too.
fn too_deep(text: &str, max: usize) -> Option<(usize, usize)> {
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    let mut scalar_above: Option<usize> = None;
    for (n, line) in text.lines().enumerate() {
        let indent = line.len() - line.trim_start_matches(' ').len();
        let body = line.trim();
        if let Some(at) = scalar_above {
            if body.is_empty() || indent > at {
                continue; // a block scalar's text
            }
            scalar_above = None;
        }
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        if flow == 0 {
            while indents.last().is_some_and(|&i| i >= indent) {
                indents.pop();
            }
            indents.push(indent);
        }
        let mut items = 0;
        let mut rest = body;
        while let Some(r) = rest
            .strip_prefix("- ")
            .or_else(|| (rest == "-").then_some(""))
        {
            items += 1;
            rest = r.trim_start();
        }
        let mut deepest = flow;
        let mut quote: Option<char> = None;
        let mut prev = ' ';
        for c in rest.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '#') if prev == ' ' => break,
                (None, '[' | '{') => {
                    flow += 1;
                    deepest = deepest.max(flow);
                }
                (None, ']' | '}') => flow = flow.saturating_sub(1),
                _ => {}
            }
            prev = c;
        }
        let depth = indents.len() + items + deepest;
        if depth > max {
            return Some((n + 1, depth));
        }
        let tail = rest.trim_end();
        if flow == 0
            && (tail.ends_with('|')
                || tail.ends_with('>')
                || tail.ends_with("|-")
                || tail.ends_with("|+")
                || tail.ends_with(">-")
                || tail.ends_with(">+"))
        {
            scalar_above = Some(indent);
        }
    }
    None
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
                    message: cedana_protocol::config::plain_types(&e.to_string()),
                })? {
                    let e = e.map_err(|e| FlowError::Hook {
                        what: format!("work_dir {}", dir.display()),
                        message: cedana_protocol::config::plain_types(&e.to_string()),
                    })?;
                    crate::job::copy_tree(&e.path(), &to.join(e.file_name())).map_err(|err| {
                        FlowError::Hook {
                            what: format!("copying {} to worker {}", e.path().display(), w.id),
                            message: cedana_protocol::config::plain_types(&err.to_string()),
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
        Ok(job.borrow_mut().spawn(w, &script, false)?)
    }
    fn restored_task(&mut self, job: &Shared, w: &Worker, _t: &Task) -> Result<(), FlowError> {
        let list = self.spec.restored_task.run.clone();
        self.run_each(job, w, "restored_task", &list)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::report::Silent;

    fn load_text(text: &str) -> Result<JobSpec, String> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("job.yml");
        std::fs::write(&p, text).unwrap();
        load(&p, &Silent).map_err(|e| e.to_string())
    }

    const SEED: &str = "instance_specs: { cpu_cores: 2, memory_gb: 4 }\nsetup:\n  run:\n    - \"echo setting up\"\ntask:\n  run: [\"python3 -c 'print(1)'\"]\nrestored_task:\n  run:\n    - |\n      echo restored\n          if true; then\n              echo deep text is no nesting\n          fi\n";

    #[test]
    fn a_usual_spec_loads() {
        let example =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/examples/seed-job.yml");
        load(&example, &Silent).unwrap();
        let s = load_text(SEED).unwrap();
        assert_eq!(s.task.run.len(), 1);
        assert_eq!(s.restored_task.run.len(), 1);
    }

    #[test]
    fn an_oversized_spec_is_refused_before_parsing() {
        let big = format!("{SEED}# {}\n", "x".repeat(MAX_SPEC_BYTES as usize));
        let err = load_text(&big).unwrap_err();
        assert!(
            err.contains("job.yml") && err.contains("larger than 1024 KiB"),
            "{err}"
        );
    }

    #[test]
    fn deep_nesting_is_refused_at_once_with_its_line() {
        let flow = format!(
            "task:\n  run: {}\"x\"{}\n",
            "[".repeat(5000),
            "]".repeat(5000)
        );
        let err = load_text(&flow).unwrap_err();
        assert!(
            err.contains("job.yml:2:") && err.contains("more than the 32"),
            "{err}"
        );
        let mut block = String::from("task:\n  run: [x]\nextra:\n");
        for i in 0..40 {
            block.push_str(&format!("{}k{i}:\n", " ".repeat(2 * (i + 1))));
        }
        let err = load_text(&block).unwrap_err();
        assert!(err.contains("more than the 32"), "{err}");
        let items = format!("task:\n  run: [x]\nextra:\n{}x\n", "- ".repeat(40));
        let err = load_text(&items).unwrap_err();
        assert!(err.contains("job.yml:4:"), "{err}");
    }

    #[test]
    fn an_oversized_command_is_refused_naming_it() {
        let long = format!("echo {}", "a".repeat(MAX_COMMAND_BYTES));
        let err = load_text(&format!(
            "setup:\n  run: [\"true\", \"{long}\"]\ntask:\n  run: [x]\n"
        ))
        .unwrap_err();
        assert!(
            err.contains("setup.run[1]") && err.contains("\"echo aaaa"),
            "{err}"
        );
        let half = format!("echo {}", "a".repeat(MAX_COMMAND_BYTES / 2));
        let err = load_text(&format!("task:\n  run: [\"{half}\", \"{half}\"]\n")).unwrap_err();
        assert!(err.contains("task.run's commands are"), "{err}");
    }
}
