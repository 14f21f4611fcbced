//! Job scripts in Rhai: the sandboxed engine, the host API scripts drive workers with, and the
//! two ways a script runs (its own top-level code, or the managed flow of its hooks).
//!
//! Architecture invariant: scripts reach the outside world only through the functions
//! registered here. No `eval`, no modules from outside the script's folder, bounded operations,
//! strings, arrays, maps and call depth.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rhai::{Dynamic, Engine, EvalAltResult, Map, NativeCallContext, Position, AST};

use crate::job::managed::{FlowError, Hooks, Shared};
use crate::job::{Checkpoint, JobError, Spec, Task, Worker};

/// Operations a script may run before it is stopped (a runaway loop ends in about a second).
pub const MAX_OPERATIONS: u64 = 20_000_000;

/// Errors of a job script, each with where it happened.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    #[error("cannot read job script {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: syntax error: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Runtime {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Other { path: PathBuf, message: String },
}

impl From<ScriptError> for FlowError {
    fn from(e: ScriptError) -> Self {
        FlowError::JobFile(Box::new(e))
    }
}

type Res<T> = Result<T, Box<EvalAltResult>>;

fn err<T>(msg: impl Into<String>) -> Res<T> {
    Err(Box::new(EvalAltResult::ErrorRuntime(
        Dynamic::from(msg.into()),
        Position::NONE,
    )))
}

/// A job error as a script error (the script's position is added by Rhai).
fn rhai_err(e: JobError) -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorRuntime(
        Dynamic::from(e.to_string()),
        Position::NONE,
    ))
}

/// A spec from a script's map (`#{cpu_cores: 2, memory_gb: 4}`).
pub fn spec_from_map(m: &Map) -> Res<Spec> {
    let num = |k: &str, v: &Dynamic| -> Res<f64> {
        v.as_float()
            .ok()
            .or_else(|| v.as_int().ok().map(|i| i as f64))
            .ok_or_else(|| {
                format!("instance spec: {k} must be a number, not {}", v.type_name()).into()
            })
    };
    let mut spec = Spec::default();
    for (k, v) in m {
        match k.as_str() {
            "cpu_cores" => spec.cpu_cores = Some(num(k, v)?),
            "memory_gb" => spec.memory_gb = Some(num(k, v)?),
            "vram_gb" => spec.vram_gb = Some(num(k, v)?),
            "max_price_usd_hour" => spec.max_price_usd_hour = Some(num(k, v)?),
            "gpu_count" => spec.gpu_count = Some(num(k, v)? as u32),
            "gpu" => spec.gpu = Some(v.to_string()),
            other => {
                return err(format!(
                    "instance spec: unknown key {other:?} (keys: cpu_cores, memory_gb, gpu, gpu_count, vram_gb, max_price_usd_hour)"
                ))
            }
        }
    }
    Ok(spec)
}

fn launch(job: &Shared, spec: Map) -> Res<Worker> {
    let spec = spec_from_map(&spec)?;
    job.borrow_mut().launch(&spec).map_err(rhai_err)
}

/// The sandboxed engine without the host API (enough to compile a script).
pub fn sandbox(script_dir: &Path) -> Engine {
    let mut e = Engine::new();
    e.set_max_operations(MAX_OPERATIONS);
    e.set_max_call_levels(64);
    e.set_max_expr_depths(64, 32);
    e.set_max_string_size(1 << 20);
    e.set_max_array_size(100_000);
    e.set_max_map_size(10_000);
    e.disable_symbol("eval");
    // `spawn` is reserved in Rhai for a future feature; job scripts name a method after it.
    // (Rhai marks this hook "volatile", not deprecated in earnest.)
    #[allow(deprecated)]
    e.on_parse_token(|token, _, _| match token {
        rhai::Token::Reserved(ref s) if s.as_str() == "spawn" => rhai::Token::Identifier(s.clone()),
        t => t,
    });
    e.set_max_modules(MAX_MODULES);
    e.set_module_resolver(FolderResolver::new(script_dir));
    limit_operations(&mut e, None);
    e
}

/// Modules a script may import, and how deep imports may nest (a module that imports itself
/// would recurse until the stack overflows).
pub const MAX_MODULES: usize = 64;
/// See [`MAX_MODULES`].
pub const MAX_MODULE_DEPTH: usize = 8;

/// Counts every operation of a script run, its callbacks' too, and stops it past
/// [`MAX_OPERATIONS`] (or when `down` is set). Rhai's own limit does not hold inside a
/// callback such as `sort`'s comparator: its operations are counted apart and its errors
/// ignored, so an endless comparator ran on. Rhai numbers a run's operations from 1 (each
/// `eval` and hook call), so the count starts again there.
fn limit_operations(e: &mut Engine, down: Option<crate::util::Flag>) {
    let spent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    e.on_progress(move |ops| {
        use std::sync::atomic::Ordering::Relaxed;
        if ops == 1 {
            spent.store(0, Relaxed);
        }
        if spent.fetch_add(1, Relaxed) + 1 > MAX_OPERATIONS {
            return Some(Dynamic::from(too_many_operations()));
        }
        down.as_ref()
            .filter(|d| d.is_set())
            .map(|_| Dynamic::from("the job was taken down"))
    });
}

fn too_many_operations() -> String {
    format!("the script exceeded its limit of {MAX_OPERATIONS} operations (an endless loop?) and was stopped")
}

/// The sandboxed engine with the host API.
pub fn engine(host: Shared, script_dir: &Path) -> Engine {
    let mut e = sandbox(script_dir);
    let reporter = host.borrow().reporter.clone();
    let r = reporter.clone();
    e.on_print(move |s| r.print(s));
    let r = reporter.clone();
    e.on_debug(move |s, _, pos| r.log(&format!("debug {pos}: {s}")));

    e.register_type_with_name::<Worker>("Worker")
        .register_get("id", |w: &mut Worker| w.id.clone())
        .register_type_with_name::<Task>("Task")
        .register_get("name", |t: &mut Task| t.name.clone())
        .register_get("worker", |t: &mut Task| Worker {
            id: t.worker.clone(),
        })
        .register_type_with_name::<Checkpoint>("Checkpoint")
        .register_get("object", |c: &mut Checkpoint| c.object.clone());

    let h = host.clone();
    e.register_fn("launch", move || launch(&h, Map::new()));
    let h = host.clone();
    e.register_fn("launch", move |spec: Map| launch(&h, spec));
    let h = host.clone();
    e.register_fn("sh", move |w: &mut Worker, cmd: &str| -> Res<Map> {
        let (code, stdout, stderr) = h.borrow().sh(w, cmd).map_err(rhai_err)?;
        let mut m = Map::new();
        m.insert("code".into(), (code as i64).into());
        m.insert("stdout".into(), stdout.into());
        m.insert("stderr".into(), stderr.into());
        Ok(m)
    });
    let h = host.clone();
    e.register_fn("spawn", move |w: &mut Worker, cmd: &str| {
        h.borrow_mut().spawn(w, cmd, false).map_err(rhai_err)
    });
    // `w.spawn(cmd, #{ userns: true })`: a task that drops root (a database server) gets a
    // user namespace and a minimal mount tree of its own, so that it can be checkpointed.
    let h = host.clone();
    e.register_fn(
        "spawn",
        move |w: &mut Worker, cmd: &str, opts: Map| -> Res<Task> {
            let mut userns = false;
            for (key, value) in &opts {
                match (key.as_str(), value.as_bool()) {
                    ("userns", Ok(b)) => userns = b,
                    ("userns", Err(t)) => {
                        return Err(
                            format!("spawn option userns must be true or false, not {t}").into(),
                        )
                    }
                    (other, _) => {
                        return Err(format!("unknown spawn option {other:?} (known: userns)").into())
                    }
                }
            }
            h.borrow_mut().spawn(w, cmd, userns).map_err(rhai_err)
        },
    );
    let h = host.clone();
    e.register_fn("upload", move |w: &mut Worker, path: &str| -> Res<()> {
        h.borrow().upload(w, Path::new(path)).map_err(rhai_err)
    });
    let h = host.clone();
    e.register_fn("terminate", move |w: &mut Worker| {
        h.borrow_mut().terminate(w)
    });
    let h = host.clone();
    e.register_fn("checkpoint", move |t: &mut Task| {
        h.borrow_mut().checkpoint(t, true).map_err(rhai_err)
    });
    let h = host.clone();
    e.register_fn("restore", move |c: Checkpoint, w: Worker| {
        h.borrow_mut().restore(&c, &w).map_err(rhai_err)
    });
    let h = host.clone();
    e.register_fn("migrate", move |ctx: NativeCallContext, t: &mut Task, to: Worker| -> Res<Task> {
        let from = Worker { id: t.worker.clone() };
        let c = h.borrow_mut().checkpoint_for(t, false, Some(&to)).map_err(rhai_err)?;
        let moved = h.borrow_mut().restore(&c, &to).map_err(rhai_err)?;
        match ctx.call_fn::<Dynamic>("restored_task", (to.clone(), moved.clone())) {
            Ok(_) => {}
            Err(e) if matches!(*e, EvalAltResult::ErrorFunctionNotFound(ref f, _) if f.starts_with("restored_task")) => {}
            Err(e) => return Err(e),
        }
        // Post-copy: the old worker stays until the checkpoint is stored whole.
        h.borrow_mut().settle_copy();
        h.borrow_mut().terminate(&from);
        h.borrow_mut().record.migrations += 1;
        *t = moved.clone();
        Ok(moved)
    });
    let h = host.clone();
    e.register_fn("wait", move |t: &mut Task| -> Res<i64> {
        let exit = h.borrow().wait(t).map_err(rhai_err)?;
        // A task its worker ended because its lazy restore failed did not end by itself:
        // the script is told (it may restore an earlier checkpoint), not handed a status.
        if let Some(why) = &exit.restore_failed {
            return err(format!(
                "task {} on {} was ended by its worker: its lazy restore failed ({why}); that checkpoint cannot be used, restore an earlier one",
                t.name, t.worker
            ));
        }
        Ok(crate::job::managed::status(exit))
    });
    let h = host.clone();
    e.register_fn("stop", move |t: &mut Task| -> Res<()> {
        h.borrow().stop(t).map_err(rhai_err)
    });
    let down = host.borrow().down.clone();
    let d = down.clone();
    e.register_fn("sleep", move |secs: f64| sleep(&d, secs));
    let d = down.clone();
    e.register_fn("sleep", move |secs: i64| sleep(&d, secs as f64));
    // `down` (or Ctrl-C) stops a script between any two operations.
    limit_operations(&mut e, Some(down));
    e.register_fn("log", move |msg: &str| reporter.log(msg));
    e
}

/// Sleeps, ending early if the job is taken down.
fn sleep(down: &crate::util::Flag, secs: f64) -> Res<()> {
    let d = Duration::from_secs_f64(secs.max(0.0));
    if !d.is_zero() && down.wait_timeout(d) {
        return err("the job was taken down");
    }
    Ok(())
}

/// Loads modules only from the script's folder: no absolute paths, no `..`.
struct FolderResolver {
    files: rhai::module_resolvers::FileModuleResolver,
    /// The script's folder, links resolved.
    root: Option<PathBuf>,
    /// Imports being resolved now, nested in one another.
    depth: std::sync::atomic::AtomicUsize,
}

impl FolderResolver {
    fn new(script_dir: &Path) -> Self {
        FolderResolver {
            files: rhai::module_resolvers::FileModuleResolver::new_with_path(script_dir),
            root: std::fs::canonicalize(script_dir).ok(),
            depth: Default::default(),
        }
    }
}

impl rhai::ModuleResolver for FolderResolver {
    fn resolve(
        &self,
        engine: &Engine,
        source: Option<&str>,
        path: &str,
        pos: Position,
    ) -> Result<rhai::Shared<rhai::Module>, Box<EvalAltResult>> {
        // Not ErrorModuleNotFound: Rhai would replace that with a message of its own.
        let refuse = |msg: String| Err(Box::new(EvalAltResult::ErrorRuntime(msg.into(), pos)));
        if path.starts_with('/') || path.split('/').any(|p| p == "..") {
            return refuse(format!(
                "module {path:?} refused: modules load only from the script's folder"
            ));
        }
        // Where the file really is, links followed: it must stay inside the folder.
        let file = self.files.get_file_path(path, None);
        if let (Some(root), Ok(real)) = (&self.root, std::fs::canonicalize(&file)) {
            if !real.starts_with(root) {
                return refuse(format!(
                    "module {path:?} refused: it is a link to {}, outside the script's folder",
                    real.display()
                ));
            }
        }
        use std::sync::atomic::Ordering::SeqCst;
        let depth = self.depth.fetch_add(1, SeqCst) + 1;
        let result = if depth > MAX_MODULE_DEPTH {
            refuse(format!(
                "module {path:?} refused: imports nest more than {MAX_MODULE_DEPTH} deep (does a module import itself?)"
            ))
        } else {
            self.files.resolve(engine, source, path, pos)
        };
        self.depth.fetch_sub(1, SeqCst);
        result
    }
}

/// Compiles a script, reporting syntax errors with file, line and column.
pub fn compile(engine: &Engine, path: &Path) -> Result<AST, ScriptError> {
    let text = std::fs::read_to_string(path).map_err(|source| ScriptError::Read {
        path: path.into(),
        source,
    })?;
    engine.compile(&text).map_err(|e| ScriptError::Syntax {
        path: path.into(),
        line: e.1.line().unwrap_or(0),
        column: e.1.position().unwrap_or(0),
        message: e.0.to_string(),
    })
}

/// Whether the script is hooks only (managed flow) rather than its own top-level code.
pub fn is_managed(ast: &AST) -> bool {
    ast.statements().is_empty() && ast.iter_functions().any(|f| f.name == "work")
}

/// Turns a Rhai runtime error into a [`ScriptError`] with the position it happened at.
pub fn runtime_error(path: &Path, e: impl std::ops::Deref<Target = EvalAltResult>) -> ScriptError {
    let pos = e.position();
    let message = match &*e {
        EvalAltResult::ErrorTooManyOperations(_) => too_many_operations(),
        // What `limit_operations` stopped it for.
        EvalAltResult::ErrorTerminated(why, _) => why.to_string(),
        other => other.to_string().replace(&format!(" ({pos})"), ""),
    };
    ScriptError::Runtime {
        path: path.into(),
        line: pos.line().unwrap_or(0),
        column: pos.position().unwrap_or(0),
        message,
    }
}

/// A hooks-only script's hooks, for the managed flow.
pub struct RhaiHooks<'a> {
    pub engine: &'a Engine,
    pub ast: &'a AST,
    pub path: &'a Path,
    pub scope: rhai::Scope<'static>,
}

impl RhaiHooks<'_> {
    fn has(&self, name: &str) -> bool {
        self.ast.iter_functions().any(|f| f.name == name)
    }

    fn call<T: rhai::Variant + Clone>(
        &mut self,
        name: &str,
        args: impl rhai::FuncArgs,
    ) -> Result<T, FlowError> {
        self.engine
            .call_fn::<T>(&mut self.scope, self.ast, name, args)
            .map_err(|e| runtime_error(self.path, e).into())
    }
}

impl Hooks for RhaiHooks<'_> {
    fn spec(&mut self) -> Result<Spec, FlowError> {
        if !self.has("instance_specs") {
            return Ok(Spec::default());
        }
        let m: Map = self.call("instance_specs", ())?;
        spec_from_map(&m).map_err(|e| runtime_error(self.path, e).into())
    }
    fn setup(&mut self, _job: &Shared, w: &Worker) -> Result<(), FlowError> {
        if self.has("setup") {
            let _ = self.call::<Dynamic>("setup", (w.clone(),))?;
        }
        Ok(())
    }
    fn work(&mut self, _job: &Shared, w: &Worker) -> Result<Task, FlowError> {
        self.call("work", (w.clone(),))
    }
    fn restored_task(&mut self, _job: &Shared, w: &Worker, t: &Task) -> Result<(), FlowError> {
        if self.has("restored_task") {
            let _ = self.call::<Dynamic>("restored_task", (w.clone(), t.clone()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_in(dir: &Path, script: &str) -> Result<i64, String> {
        let dir = dir.to_path_buf();
        let script = script.to_string();
        // Bounded: a script that escapes the limits fails the test instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .stack_size(8 << 20)
            .spawn(move || {
                let e = sandbox(&dir);
                let result = e.eval::<i64>(&script);
                let _ = tx
                    .send(result.map_err(|e| runtime_error(Path::new("job.rhai"), e).to_string()));
            })
            .unwrap();
        rx.recv_timeout(Duration::from_secs(120))
            .expect("the script was not stopped within 120 s")
    }

    #[test]
    fn a_module_that_imports_itself_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.rhai"),
            "import \"a\" as a;\nexport const X = 1;\n",
        )
        .unwrap();
        let err = run_in(dir.path(), "import \"a\" as a; a::X").unwrap_err();
        assert!(err.contains("nest"), "{err}");
    }

    #[test]
    fn modules_do_not_follow_links_out_of_the_folder() {
        let outer = tempfile::tempdir().unwrap();
        std::fs::write(outer.path().join("secret.rhai"), "export const X = 42;\n").unwrap();
        let dir = outer.path().join("job");
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::symlink("../secret.rhai", dir.join("s.rhai")).unwrap();
        std::fs::write(dir.join("ok.rhai"), "export const Y = 7;\n").unwrap();
        let err = run_in(&dir, "import \"s\" as s; s::X").unwrap_err();
        assert!(err.contains("outside the script's folder"), "{err}");
        // A module in the folder still loads.
        let y = run_in(&dir, "import \"ok\" as ok; ok::Y").unwrap();
        assert_eq!(y, 7);
    }

    #[test]
    fn an_endless_sort_comparator_is_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let err = run_in(
            dir.path(),
            "let a = [3, 2, 1]; a.sort(|x, y| { loop { } }); a.len()",
        )
        .unwrap_err();
        assert!(
            err.contains("job.rhai:1:") && err.contains("limit of 20000000 operations"),
            "{err}"
        );
    }
}
