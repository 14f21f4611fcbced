//! The embedded NATS server: with no `connection.nats_url` configured, the driver starts its own
//! `nats-server` with JetStream on a free loopback port, with a generated token (passed in a
//! private config file, never on the command line).
//!
//! Everything it needs lives in the job's folder (`<job>/nats/`: `nats.conf` 0600 with the
//! port and token, the JetStream store; its log in `<job>/logs/nats.log`), so it can be started
//! again on the same port, token and store: by the job's controller when it dies (see
//! [`EmbeddedNats::supervise`]), or by `resume` after the controller died. The store (and the
//! checkpoints in it) stays until the job's folder is removed.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cedana_protocol::config::Secret;

/// The server's folder in the job's folder.
pub const NATS_DIR: &str = "nats";
/// Its config file there.
pub const CONF_FILE: &str = "nats.conf";

/// Errors starting the embedded server.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("cannot start nats-server ({binary}): {source}; install it (tools/deps.sh) or set connection.nats_url in the config")]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error(
        "nats-server did not accept connections on 127.0.0.1:{port} within 15 s; its log ({log_path}): {log}"
    )]
    NotReady {
        port: u16,
        log: String,
        log_path: PathBuf,
    },
    #[error("cannot prepare the embedded NATS server's folder {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not the embedded NATS server's config (no `listen: 127.0.0.1:PORT` line); the job's folder was changed by hand")]
    BadConf { path: PathBuf },
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> NatsError {
    let path = path.to_path_buf();
    move |source| NatsError::Io { path, source }
}

/// A running `nats-server` of a job.
pub struct EmbeddedNats {
    child: Option<Child>,
    pub url: String,
    pub token: Secret,
    pub port: u16,
    conf: PathBuf,
    log: PathBuf,
}

/// The `nats-server` binary: `$CEDANA_NATS_SERVER` or `nats-server` on PATH.
fn binary() -> String {
    std::env::var("CEDANA_NATS_SERVER").unwrap_or_else(|_| "nats-server".into())
}

impl EmbeddedNats {
    /// Makes the server's folder in `job_dir` (a free port, a new token) and starts it. The
    /// token is also written to `token_file` (0600) for the job's other commands.
    pub fn create(job_dir: &Path, token_file: &Path) -> Result<Self, NatsError> {
        let dir = job_dir.join(NATS_DIR);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io_at(&dir))?;
        let token = Secret::new(
            cedana_protocol::random_hex(24)
                .map_err(io_at(Path::new(cedana_protocol::ids::RANDOM_SOURCE)))?,
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(io_at(Path::new("127.0.0.1:0")))?
            .port();
        let conf = dir.join(CONF_FILE);
        let store = dir.join("jetstream");
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&conf)
            .and_then(|mut f| {
                writeln!(
                    f,
                    "listen: 127.0.0.1:{port}\njetstream {{ store_dir: {:?} }}\nauthorization {{ token: {:?} }}",
                    store.display().to_string(),
                    token.expose()
                )
            })
            .map_err(io_at(&conf))?;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(token_file)
            .and_then(|mut f| f.write_all(token.expose().as_bytes()))
            .map_err(io_at(token_file))?;
        let mut me = EmbeddedNats {
            child: None,
            url: format!("nats://127.0.0.1:{port}"),
            token,
            port,
            conf,
            log: job_dir.join("logs").join("nats.log"),
        };
        me.spawn()?;
        Ok(me)
    }

    /// The server of the job in `job_dir` as its folder has it (same port, token and store),
    /// not started: [`EmbeddedNats::adopt`] or [`EmbeddedNats::spawn`] next.
    pub fn open(job_dir: &Path, token_file: &Path) -> Result<Self, NatsError> {
        let conf = job_dir.join(NATS_DIR).join(CONF_FILE);
        let text = std::fs::read_to_string(&conf).map_err(io_at(&conf))?;
        let port = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("listen: 127.0.0.1:"))
            .and_then(|p| p.trim().parse::<u16>().ok())
            .ok_or_else(|| NatsError::BadConf { path: conf.clone() })?;
        let token = std::fs::read_to_string(token_file).map_err(io_at(token_file))?;
        Ok(EmbeddedNats {
            child: None,
            url: format!("nats://127.0.0.1:{port}"),
            token: Secret::new(token.trim().to_string()),
            port,
            conf,
            log: job_dir.join("logs").join("nats.log"),
        })
    }

    /// Whether process `pid` is this job's server (started on this config file).
    pub fn is_ours(&self, pid: u32) -> bool {
        is_server_of(pid, &self.conf)
    }

    /// Starts the server on its config (again), and waits until it listens.
    pub fn spawn(&mut self) -> Result<(), NatsError> {
        let binary = binary();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(io_at(&self.log))?;
        let start_len = log.metadata().map(|m| m.len()).unwrap_or(0);
        let mut cmd = Command::new(&binary);
        cmd.arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // Its own process group: a Ctrl-C meant for the driver does not reach it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().map_err(|source| NatsError::Spawn {
            binary: binary.clone(),
            source,
        })?;
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if start.elapsed() > Duration::from_secs(15) || matches!(child.try_wait(), Ok(Some(_)))
            {
                let text = std::fs::read(&self.log).unwrap_or_default();
                let text = String::from_utf8_lossy(&text[(start_len as usize).min(text.len())..])
                    .to_string();
                let _ = child.kill();
                let _ = child.wait();
                return Err(NatsError::NotReady {
                    port: self.port,
                    log: text.lines().rev().take(5).collect::<Vec<_>>().join(" | "),
                    log_path: self.log.clone(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child = Some(child);
        Ok(())
    }

    /// The server's process id, if this driver started it.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the server this driver started has exited (and how); reaps it.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Stops the server this driver started: asked to stop, killed if it has not within 2 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        for _ in 0..40 {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Whether process `pid` is a `nats-server` started on config file `conf`.
pub fn is_server_of(pid: u32, conf: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let conf = conf.as_os_str().as_encoded_bytes();
    cmdline
        .split(|b| *b == 0)
        .any(|a| a == conf || (a.len() > conf.len() && a.ends_with(conf)))
        && cmdline
            .split(|b| *b == 0)
            .next()
            .is_some_and(|a| a.ends_with(b"nats-server"))
}

/// Ends the server of the job in `job_dir` running as `pid` (a driver that died left it), if
/// it is that server; whether it was.
pub fn end_orphan(job_dir: &Path, pid: u32) -> bool {
    let conf = job_dir.join(NATS_DIR).join(CONF_FILE);
    if pid == 0 || !is_server_of(pid, &conf) {
        return false;
    }
    let p = nix::unistd::Pid::from_raw(pid as i32);
    let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGTERM);
    for _ in 0..40 {
        if !is_server_of(pid, &conf) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
    true
}

/// How long the server may fail to store before it is restarted.
pub const STORE_RESTART_AFTER: Duration = Duration::from_secs(10);

/// Keeps the job's server running until `stop` is set, then stops it: when it exits it is
/// started again on the same port, token and store (every second until it starts). `pid`
/// follows its process id (0 while it is down); `note` tells the user.
pub fn supervise(
    mut nats: EmbeddedNats,
    pid: std::sync::Arc<std::sync::atomic::AtomicU32>,
    stop: crate::util::Flag,
    note: impl Fn(&str) + Send + 'static,
    store_problem: impl Fn() -> Option<(String, Duration)> + Send + 'static,
) -> std::thread::JoinHandle<()> {
    use std::sync::atomic::Ordering;
    pid.store(nats.pid().unwrap_or(0), Ordering::SeqCst);
    let mut last_restart = Instant::now();
    std::thread::spawn(move || {
        while !stop.wait_timeout(Duration::from_millis(250)) {
            // A server that runs but has not stored for a while (its disk was full: its
            // store keeps failing after a write error until it starts again) is restarted,
            // at most every 30 s, until it stores again.
            if let Some((problem, for_how_long)) = store_problem() {
                if for_how_long > STORE_RESTART_AFTER
                    && last_restart.elapsed() > Duration::from_secs(30)
                    && nats.pid().is_some()
                {
                    last_restart = Instant::now();
                    note(&format!(
                        "the job's NATS server has stored nothing for {} s ({problem}); if its disk is full, free space in {}; restarting it on the same store (every 30 s until it stores again); workers' silence is not taken for a loss meanwhile",
                        for_how_long.as_secs(),
                        nats.conf.parent().map(|d| d.display().to_string()).unwrap_or_default()
                    ));
                    nats.stop();
                    pid.store(0, Ordering::SeqCst);
                    if nats.spawn().is_ok() {
                        pid.store(nats.pid().unwrap_or(0), Ordering::SeqCst);
                    }
                    continue;
                }
            }
            let Some(status) = nats.exited() else {
                if nats.pid().is_some() {
                    continue;
                }
                // Not running (it could not be started again): try once more.
                if nats.spawn().is_ok() {
                    pid.store(nats.pid().unwrap_or(0), Ordering::SeqCst);
                    note(&format!(
                        "the job's NATS server runs again on port {}",
                        nats.port
                    ));
                }
                stop.wait_timeout(Duration::from_secs(1));
                continue;
            };
            nats.child = None;
            pid.store(0, Ordering::SeqCst);
            tracing::info!(%status, "the job's NATS server exited; starting it again");
            note(&format!(
                "the job's NATS server exited ({status}); starting it again on port {} with the same store",
                nats.port
            ));
            match nats.spawn() {
                Ok(()) => {
                    pid.store(nats.pid().unwrap_or(0), Ordering::SeqCst);
                    note(&format!(
                        "the job's NATS server runs again on port {}",
                        nats.port
                    ));
                }
                Err(e) => {
                    tracing::info!(error = %e, "cannot start the job's NATS server again");
                    note(&format!(
                        "cannot start the job's NATS server again ({e}); retrying every second"
                    ));
                }
            }
        }
        nats.stop();
        pid.store(0, Ordering::SeqCst);
    })
}
