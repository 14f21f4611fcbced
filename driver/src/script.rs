//! Job scripts in Rhai: the sandboxed engine, the host API scripts drive workers with, and the
//! two ways a script runs (its own top-level code, or the managed flow of its hooks).
//!
//! Architecture invariant: scripts reach the outside world only through the functions
//! registered here. No `eval`, no modules from outside the script's folder, bounded operations,
//! strings, arrays, maps and call depth.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use cedana_agent::protocol::{Command, Reply};
use rhai::{Dynamic, Engine, EvalAltResult, Map, NativeCallContext, Position, AST};

use crate::coordinator::Coordinator;
use crate::local::LocalWorker;

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

/// A worker as a script sees it.
#[derive(Clone, Debug)]
pub struct Worker {
    pub id: String,
}

/// A task as a script sees it: its name and the worker it runs on now.
#[derive(Clone, Debug)]
pub struct Task {
    pub name: String,
    pub worker: String,
}

/// A checkpoint in the object store.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub object: String,
    pub task: String,
}

/// What the host API works with.
pub struct Host {
    pub rt: tokio::runtime::Handle,
    pub coord: Coordinator,
    pub nats_url: String,
    pub token: String,
    pub work_dir: PathBuf,
    pub log_dir: PathBuf,
    pub workers: HashMap<String, LocalWorker>,
    next_worker: u32,
    next_task: u32,
}

impl Host {
    pub fn new(
        rt: tokio::runtime::Handle,
        coord: Coordinator,
        nats_url: String,
        token: String,
        work_dir: PathBuf,
        log_dir: PathBuf,
    ) -> Self {
        Host {
            rt,
            coord,
            nats_url,
            token,
            work_dir,
            log_dir,
            workers: HashMap::new(),
            next_worker: 0,
            next_task: 0,
        }
    }
}

type Shared = Rc<RefCell<Host>>;
type Res<T> = Result<T, Box<EvalAltResult>>;

fn err<T>(msg: impl Into<String>) -> Res<T> {
    Err(Box::new(EvalAltResult::ErrorRuntime(
        Dynamic::from(msg.into()),
        Position::NONE,
    )))
}

fn call(host: &Shared, worker: &str, command: Command, secs: u64) -> Res<Reply> {
    let (rt, coord) = {
        let h = host.borrow();
        (h.rt.clone(), h.coord.clone())
    };
    match rt.block_on(coord.call(worker, command, secs)) {
        Ok(Reply::Error { message }) => err(format!("worker {worker}: {message}")),
        Ok(r) => Ok(r),
        Err(e) => err(e.to_string()),
    }
}

fn launch(host: &Shared, _spec: Map) -> Res<Worker> {
    let (id, coord, rt) = {
        let mut h = host.borrow_mut();
        h.next_worker += 1;
        let id = format!("w{}", h.next_worker);
        let w = LocalWorker::launch(
            &h.coord.job,
            &id,
            &h.nats_url,
            &h.token,
            &h.work_dir,
            &h.log_dir,
        )
        .map_err(|e| e.to_string())?;
        h.workers.insert(id.clone(), w);
        (id, h.coord.clone(), h.rt.clone())
    };
    rt.block_on(coord.wait_registered(&id, 30))
        .map_err(|e| e.to_string())?;
    tracing::info!(worker = %id, "worker launched");
    Ok(Worker { id })
}

fn spawn(host: &Shared, w: &Worker, cmd: &str) -> Res<Task> {
    let name = {
        let mut h = host.borrow_mut();
        h.next_task += 1;
        format!("task{}", h.next_task)
    };
    host.borrow().coord.reset_exit(&name);
    match call(
        host,
        &w.id,
        Command::Spawn {
            task: name.clone(),
            cmd: cmd.into(),
        },
        60,
    )? {
        Reply::Spawned { pid, .. } => {
            if let Some(lw) = host.borrow_mut().workers.get_mut(&w.id) {
                lw.task_pids.push(pid);
            }
            Ok(Task {
                name,
                worker: w.id.clone(),
            })
        }
        other => err(format!("unexpected reply {other:?}")),
    }
}

fn checkpoint(host: &Shared, t: &Task, leave_running: bool) -> Res<Checkpoint> {
    let cmd = Command::Checkpoint {
        task: t.name.clone(),
        leave_running,
        compression: cedana_agent::Compression::Zstd,
    };
    match call(host, &t.worker, cmd, 3600)? {
        Reply::Checkpointed { object, .. } => Ok(Checkpoint {
            object,
            task: t.name.clone(),
        }),
        other => err(format!("unexpected reply {other:?}")),
    }
}

fn restore(host: &Shared, c: &Checkpoint, w: &Worker) -> Res<Task> {
    host.borrow().coord.reset_exit(&c.task);
    match call(
        host,
        &w.id,
        Command::Restore {
            task: c.task.clone(),
            object: c.object.clone(),
        },
        3600,
    )? {
        Reply::Restored { pid, .. } => {
            if let Some(lw) = host.borrow_mut().workers.get_mut(&w.id) {
                lw.task_pids.push(pid);
            }
            Ok(Task {
                name: c.task.clone(),
                worker: w.id.clone(),
            })
        }
        other => err(format!("unexpected reply {other:?}")),
    }
}

fn terminate(host: &Shared, w: &Worker) {
    if let Some(mut lw) = host.borrow_mut().workers.remove(&w.id) {
        lw.terminate();
    }
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
    e.on_print(|s| println!("{s}"));
    e.on_debug(|s, _, pos| eprintln!("debug {pos}: {s}"));
    e
}

/// The sandboxed engine with the host API.
pub fn engine(host: Shared, script_dir: &Path) -> Engine {
    let mut e = sandbox(script_dir);

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
        match call(
            &h,
            &w.id,
            Command::Sh {
                cmd: cmd.into(),
                timeout_secs: Some(3600),
            },
            3700,
        )? {
            Reply::Sh {
                exit_code,
                stdout,
                stderr,
            } => {
                let mut m = Map::new();
                m.insert("code".into(), (exit_code as i64).into());
                m.insert("stdout".into(), stdout.into());
                m.insert("stderr".into(), stderr.into());
                Ok(m)
            }
            other => err(format!("unexpected reply {other:?}")),
        }
    });
    let h = host.clone();
    e.register_fn("spawn", move |w: &mut Worker, cmd: &str| spawn(&h, w, cmd));
    let h = host.clone();
    e.register_fn("upload", move |w: &mut Worker, path: &str| -> Res<()> {
        let hb = h.borrow();
        let src = Path::new(path);
        let name = src.file_name().ok_or("upload needs a file path")?;
        std::fs::copy(src, hb.work_dir.join(name))
            .map_err(|e| format!("upload of {path} to {}: {e}", w.id))?;
        Ok(())
    });
    let h = host.clone();
    e.register_fn("terminate", move |w: &mut Worker| terminate(&h, w));
    let h = host.clone();
    e.register_fn("checkpoint", move |t: &mut Task| checkpoint(&h, t, true));
    let h = host.clone();
    e.register_fn("restore", move |c: Checkpoint, w: Worker| {
        restore(&h, &c, &w)
    });
    let h = host.clone();
    e.register_fn("migrate", move |ctx: NativeCallContext, t: &mut Task, to: Worker| -> Res<Task> {
        let from = Worker { id: t.worker.clone() };
        let c = checkpoint(&h, t, false)?;
        let moved = restore(&h, &c, &to)?;
        match ctx.call_fn::<Dynamic>("restored_task", (to.clone(), moved.clone())) {
            Ok(_) => {}
            Err(e) if matches!(*e, EvalAltResult::ErrorFunctionNotFound(ref f, _) if f.starts_with("restored_task")) => {}
            Err(e) => return Err(e),
        }
        terminate(&h, &from);
        *t = moved.clone();
        Ok(moved)
    });
    let h = host.clone();
    e.register_fn("wait", move |t: &mut Task| -> i64 {
        let (rt, coord) = {
            let hb = h.borrow();
            (hb.rt.clone(), hb.coord.clone())
        };
        let exit = rt.block_on(coord.wait_exit(&t.name));
        exit.code
            .map(i64::from)
            .unwrap_or(128 + exit.signal.unwrap_or(0) as i64)
    });
    let h = host.clone();
    e.register_fn("stop", move |t: &mut Task| -> Res<()> {
        call(
            &h,
            &t.worker,
            Command::Stop {
                task: t.name.clone(),
            },
            60,
        )
        .map(|_| ())
    });
    e.register_fn("sleep", |secs: f64| {
        std::thread::sleep(Duration::from_secs_f64(secs.max(0.0)))
    });
    e.register_fn("sleep", |secs: i64| {
        std::thread::sleep(Duration::from_secs(secs.max(0) as u64))
    });
    e.register_fn("log", |msg: &str| eprintln!("[job] {msg}"));
    e
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

/// Runs the managed flow: launch a worker, `setup(w)`, `work(w)` returns the task, wait for it.
pub fn run_managed(
    engine: &Engine,
    ast: &AST,
    host: &Shared,
    path: &Path,
) -> Result<i64, ScriptError> {
    let mut scope = rhai::Scope::new();
    let w = launch(host, Map::new()).map_err(|e| runtime_error(path, e))?;
    if ast.iter_functions().any(|f| f.name == "setup") {
        let _ = engine
            .call_fn::<Dynamic>(&mut scope, ast, "setup", (w.clone(),))
            .map_err(|e| runtime_error(path, e))?;
    }
    let task: Task = engine
        .call_fn(&mut scope, ast, "work", (w,))
        .map_err(|e| runtime_error(path, e))?;
    let (rt, coord) = {
        let h = host.borrow();
        (h.rt.clone(), h.coord.clone())
    };
    let exit = rt.block_on(coord.wait_exit(&task.name));
    Ok(exit
        .code
        .map(i64::from)
        .unwrap_or(128 + exit.signal.unwrap_or(0) as i64))
}
