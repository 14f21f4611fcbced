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
    e.set_module_resolver(FolderResolver(
        rhai::module_resolvers::FileModuleResolver::new_with_path(script_dir),
    ));
    e
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
        h.borrow_mut().spawn(w, cmd).map_err(rhai_err)
    });
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
        h.borrow_mut().terminate(&from);
        h.borrow_mut().record.migrations += 1;
        *t = moved.clone();
        Ok(moved)
    });
    let h = host.clone();
    e.register_fn("wait", move |t: &mut Task| -> Res<i64> {
        let exit = h.borrow().wait(t).map_err(rhai_err)?;
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
    e.on_progress(move |_| {
        down.is_set()
            .then(|| Dynamic::from("the job was taken down"))
    });
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
struct FolderResolver(rhai::module_resolvers::FileModuleResolver);

impl rhai::ModuleResolver for FolderResolver {
    fn resolve(
        &self,
        engine: &Engine,
        source: Option<&str>,
        path: &str,
        pos: Position,
    ) -> Result<rhai::Shared<rhai::Module>, Box<EvalAltResult>> {
        if path.starts_with('/') || path.split('/').any(|p| p == "..") {
            // Not ErrorModuleNotFound: Rhai would replace that with a message of its own.
            let msg =
                format!("module {path:?} refused: modules load only from the script's folder");
            return Err(Box::new(EvalAltResult::ErrorRuntime(msg.into(), pos)));
        }
        self.0.resolve(engine, source, path, pos)
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
        EvalAltResult::ErrorTooManyOperations(_) => {
            format!("the script exceeded its limit of {MAX_OPERATIONS} operations (an endless loop?) and was stopped")
        }
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
