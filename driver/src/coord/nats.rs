//! The embedded NATS server: with no `connection.nats_url` configured, the driver starts its own
//! `nats-server` with JetStream on a free loopback port, with a generated token (passed in a
//! private config file, never on the command line).
//!
//! Everything it needs lives in the job's folder (`<job>/nats/`: `nats.conf` 0600 with the
//! port and token, the JetStream store; its log in `<job>/logs/nats.log`), so it can be started
//! again on the same port, token and store: by the job's controller when it dies (see
//! [`EmbeddedNats::supervise`]), or by `resume` after the controller died. The store (and the
//! checkpoints in it) stays until the job's folder is removed.
//!
//! Its users (`users.conf`, included by `nats.conf`, written from `users.json`, both 0600):
//! the driver's own ([`DRIVER_USER`], every permission; its credential is in the job's token
//! file) and one per worker, made when the worker is launched and removed when it ends, with
//! [`cedana_protocol::worker_permissions`]: a worker, or a task that read its credential,
//! can neither command another worker nor speak for one. The server is told to reload the file
//! (SIGHUP) after each change. A job folder from before users (a bare token in `nats.conf`)
//! keeps its token, shared by its workers.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cedana_protocol::config::Secret;
use cedana_protocol::{NatsCredential, DRIVER_USER};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// The server's folder in the job's folder.
pub const NATS_DIR: &str = "nats";
/// Its config file there.
pub const CONF_FILE: &str = "nats.conf";
/// Its users, included by [`CONF_FILE`].
pub const USERS_FILE: &str = "users.conf";
/// What [`USERS_FILE`] is written from: the job, the driver's password, each worker's.
pub const USERS_STATE: &str = "users.json";

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
    #[error("the job's NATS server (PID {pid}) did not take worker {worker}'s user within 10 s of being told to reload {path}; its log says why")]
    Reload {
        pid: u32,
        worker: String,
        path: PathBuf,
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
    /// Makes the server's folder in `job_dir` for job `job`, whose checkpoints go to `bucket`
    /// (a free port, the driver's user with a new password, no worker's yet) and starts it.
    /// The driver's credential is also written to `token_file` (0600) for the job's other
    /// commands.
    pub fn create(
        job: &str,
        bucket: &str,
        job_dir: &Path,
        token_file: &Path,
    ) -> Result<Self, NatsError> {
        let dir = job_dir.join(NATS_DIR);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io_at(&dir))?;
        let driver = new_password()?;
        let token = NatsCredential::User {
            name: DRIVER_USER.into(),
            password: driver.clone(),
        }
        .to_secret();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(io_at(Path::new("127.0.0.1:0")))?
            .port();
        let conf = dir.join(CONF_FILE);
        let store = dir.join("jetstream");
        write_users(
            &dir,
            &UsersState {
                job: job.to_string(),
                bucket: bucket.to_string(),
                driver,
                workers: BTreeMap::new(),
            },
        )?;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&conf)
            .and_then(|mut f| {
                writeln!(
                    f,
                    "listen: 127.0.0.1:{port}\njetstream {{ store_dir: {:?} }}\nauthorization {{\n  include {USERS_FILE:?}\n}}",
                    store.display().to_string(),
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

    /// The server's users, to add and remove workers' through; `None` for a job folder
    /// from before users (its workers share the token). `pid` follows the server's process.
    pub fn users(&self, pid: Arc<AtomicU32>) -> Option<Users> {
        let dir = self.conf.parent()?.to_path_buf();
        dir.join(USERS_STATE).exists().then(|| Users {
            dir,
            url: self.url.clone(),
            pid,
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
    pid: Arc<AtomicU32>,
    stop: crate::util::Flag,
    note: impl Fn(&str) + Send + 'static,
    store_problem: impl Fn() -> Option<(String, Duration)> + Send + 'static,
) -> std::thread::JoinHandle<()> {
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

/// A new random password.
fn new_password() -> Result<Secret, NatsError> {
    cedana_protocol::random_hex(24)
        .map(Secret::new)
        .map_err(io_at(Path::new(cedana_protocol::ids::RANDOM_SOURCE)))
}

/// What the server's users are made from.
#[derive(serde::Serialize, serde::Deserialize)]
struct UsersState {
    /// The job (its workers' permissions name it).
    job: String,
    /// The job's checkpoint bucket (the shared one in folders from before each job had one).
    #[serde(default = "shared_bucket")]
    bucket: String,
    /// The driver's password.
    driver: Secret,
    /// Each worker's password, by worker id.
    workers: BTreeMap<String, Secret>,
}

fn shared_bucket() -> String {
    cedana_protocol::CHECKPOINTS_BUCKET.into()
}

/// `users.json` and the `users.conf` made from it, each written whole beside and renamed
/// over the last (0600): the server never reads half a file.
fn write_users(dir: &Path, state: &UsersState) -> Result<(), NatsError> {
    let json = serde_json::to_vec_pretty(state).expect("serializes");
    write_private(&dir.join(USERS_STATE), &json)?;
    write_private(&dir.join(USERS_FILE), render_users(state).as_bytes())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), NatsError> {
    let tmp = path.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(io_at(path))
}

/// The `users = [...]` block of the server's authorization: the driver with every
/// permission, each worker with its own.
fn render_users(state: &UsersState) -> String {
    let list = |v: &[String]| {
        v.iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = String::from("users = [\n");
    out += &format!(
        "  {{ user: {DRIVER_USER:?}, password: {:?} }}\n",
        state.driver.expose()
    );
    for (worker, password) in &state.workers {
        let p = cedana_protocol::worker_permissions(&state.job, worker, &state.bucket);
        out += &format!(
            "  {{ user: {:?}, password: {:?}, permissions: {{ publish: {{ allow: [{}] }}, subscribe: {{ allow: [{}] }} }} }}\n",
            cedana_protocol::worker_user(worker),
            password.expose(),
            list(&p.publish),
            list(&p.subscribe),
        );
    }
    out + "]\n"
}

/// The users of a job's embedded server: a worker's is added before it is launched and
/// removed when it ends (the server closes its connections then).
#[derive(Clone)]
pub struct Users {
    dir: PathBuf,
    url: String,
    pid: Arc<AtomicU32>,
}

impl Users {
    fn read(&self) -> Result<UsersState, NatsError> {
        let path = self.dir.join(USERS_STATE);
        let bytes = std::fs::read(&path).map_err(io_at(&path))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| io_at(&path)(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
    }

    /// Makes worker `worker`'s user (or keeps the one it has), has the server take it, and
    /// returns the worker's credential. Waits (at most 10 s) until the server lets the user
    /// in.
    pub async fn add_worker(&self, worker: &str) -> Result<Secret, NatsError> {
        let mut state = self.read()?;
        let password = match state.workers.get(worker) {
            Some(p) => p.clone(),
            None => {
                let p = new_password()?;
                state.workers.insert(worker.to_string(), p.clone());
                write_users(&self.dir, &state)?;
                p
            }
        };
        let credential = NatsCredential::User {
            name: cedana_protocol::worker_user(worker),
            password,
        };
        let start = Instant::now();
        let mut told = None::<Instant>;
        loop {
            if told.is_none_or(|t| t.elapsed() > Duration::from_secs(2)) {
                self.reload();
                told = Some(Instant::now());
            }
            let tried = credential
                .connect_options()
                .connection_timeout(Duration::from_secs(2))
                .connect(
                    cedana_protocol::NatsUrl::parse(&self.url)
                        .servers()
                        .to_vec(),
                )
                .await;
            if let Ok(client) = tried {
                drop(client);
                return Ok(credential.to_secret());
            }
            if start.elapsed() > Duration::from_secs(10) {
                return Err(NatsError::Reload {
                    pid: self.pid.load(Ordering::SeqCst),
                    worker: worker.into(),
                    path: self.dir.join(USERS_FILE),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Removes worker `worker`'s user; the server drops its connections.
    pub fn remove_worker(&self, worker: &str) -> Result<(), NatsError> {
        let mut state = self.read()?;
        if state.workers.remove(worker).is_some() {
            write_users(&self.dir, &state)?;
            self.reload();
        }
        Ok(())
    }

    /// Tells the server to read its config again (a server being restarted reads it anyway).
    fn reload(&self) {
        let pid = self.pid.load(Ordering::SeqCst);
        if pid != 0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGHUP,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_name_the_driver_and_each_worker_with_its_permissions() {
        let state = UsersState {
            job: "j1".into(),
            bucket: cedana_protocol::job_checkpoints_bucket("j1"),
            driver: Secret::new("dpw"),
            workers: [("w1".to_string(), Secret::new("p1"))].into(),
        };
        let text = render_users(&state);
        assert!(
            text.contains(r#"{ user: "cedana-driver", password: "dpw" }"#),
            "{text}"
        );
        assert!(
            text.contains(r#"user: "w-w1", password: "p1", permissions"#),
            "{text}"
        );
        assert!(text.contains(r#""CEDANA.j1.w1.state""#), "{text}");
        assert!(
            text.contains(r#"subscribe: { allow: ["_INBOX_w-w1.>"] }"#),
            "{text}"
        );
    }
}
