//! `cedana-driver run FILE`: one job from start to end.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::coordinator::Coordinator;
use crate::nats::EmbeddedNats;
use crate::script::{self, Host, ScriptError};

/// Errors of a run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Script(#[from] ScriptError),
    #[error(transparent)]
    Nats(#[from] crate::nats::NatsError),
    #[error(transparent)]
    Coord(#[from] crate::coordinator::CoordError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: only Rhai job scripts (.rhai) run in this release; YAML job specs come with the next one")]
    Unsupported { path: PathBuf },
}

/// Options of a run.
pub struct RunOptions {
    pub script: PathBuf,
    pub config: cedana_agent::Config,
    /// Where jobs keep their folders [default: $CEDANA_STATE_DIR, ~/.cedana/jobs].
    pub state_dir: PathBuf,
}

/// The default state folder.
pub fn default_state_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("CEDANA_STATE_DIR") {
        return PathBuf::from(p);
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/cedana"))
        .join(".cedana")
        .join("jobs")
}

/// Runs the job; returns the exit status it ends with (the task's, or the script's integer
/// result).
pub fn run(opts: RunOptions) -> Result<i64, RunError> {
    let path = &opts.script;
    if path.extension().and_then(|e| e.to_str()) != Some("rhai") {
        return Err(RunError::Unsupported { path: path.clone() });
    }
    let stem = path
        .file_stem()
        .map(|s| cedana_agent::process::sanitize(&s.to_string_lossy()))
        .unwrap_or_else(|| "job".into());
    let stem: String = stem
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(40)
        .collect();
    let job = format!(
        "{stem}-{}",
        crate::nats::random_hex(3).map_err(|source| RunError::Io {
            what: "random",
            path: "/dev/urandom".into(),
            source
        })?
    );
    let job_dir = opts.state_dir.join(&job);
    let work_dir = job_dir.join("work");
    let log_dir = job_dir.join("logs");
    for d in [&work_dir, &log_dir] {
        std::fs::create_dir_all(d).map_err(|source| RunError::Io {
            what: "cannot create",
            path: d.clone(),
            source,
        })?;
    }
    let script_dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();

    // Syntax errors surface before anything starts.
    script::compile(&script::sandbox(&script_dir), path)?;

    let (url, token, _embedded) = if opts.config.connection.nats_url.is_empty() {
        let n = EmbeddedNats::start()?;
        (n.url.clone(), n.token.expose().to_string(), Some(n))
    } else {
        let c = &opts.config.connection;
        let url = match c.nats_port {
            Some(port) if !c.nats_url.contains(':') => format!("nats://{}:{port}", c.nats_url),
            _ => c.nats_url.clone(),
        };
        (url, c.auth_token.expose().to_string(), None)
    };
    let rt = tokio::runtime::Runtime::new().map_err(|source| RunError::Io {
        what: "cannot start the runtime for",
        path: path.clone(),
        source,
    })?;
    let coord = rt.block_on(Coordinator::connect(&url, &token, &job, true))?;
    eprintln!("[cedana] job {job}: folder {}", job_dir.display());
    let host = Rc::new(RefCell::new(Host::new(
        rt.handle().clone(),
        coord,
        url,
        token,
        work_dir,
        log_dir,
    )));
    let engine = script::engine(host.clone(), &script_dir);
    let ast = script::compile(&engine, path)?;
    let result = if script::is_managed(&ast) {
        script::run_managed(&engine, &ast, &host, path)
    } else {
        engine
            .eval_ast::<rhai::Dynamic>(&ast)
            .map(|v| v.as_int().unwrap_or(0))
            .map_err(|e| script::runtime_error(path, e))
    };
    // Workers end with the job.
    for (_, mut w) in host.borrow_mut().workers.drain() {
        w.terminate();
    }
    drop(rt);
    Ok(result?)
}
