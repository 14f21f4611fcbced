//! The `local` provider: workers are agent daemons started on this machine, priced at zero.
//! Every worker of a job shares the job's work folder, as workers on real machines share the
//! same path, so a restored task finds its files where it left them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A local worker: the daemon process and the tasks it reported.
pub struct LocalWorker {
    pub id: String,
    child: Child,
    pub task_pids: Vec<i32>,
}

/// Errors launching a local worker.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("cannot start the agent daemon {agent}: {source}")]
    Spawn {
        agent: PathBuf,
        source: std::io::Error,
    },
}

/// The agent binary: `$CEDANA_AGENT_BIN`, next to this driver, or `cedana-agent` on PATH.
pub fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CEDANA_AGENT_BIN") {
        return PathBuf::from(p);
    }
    if let Some(beside) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("cedana-agent")))
    {
        if beside.is_file() {
            return beside;
        }
    }
    PathBuf::from("cedana-agent")
}

impl LocalWorker {
    /// Starts `cedana-agent daemon` for `job`/`id` against the NATS at `url`.
    pub fn launch(
        job: &str,
        id: &str,
        url: &str,
        token: &str,
        work_dir: &Path,
        log_dir: &Path,
    ) -> Result<Self, LocalError> {
        let agent = agent_binary();
        let log = std::fs::File::create(log_dir.join(format!("{id}.log"))).map_err(|source| {
            LocalError::Spawn {
                agent: agent.clone(),
                source,
            }
        })?;
        let child = Command::new(&agent)
            .args([
                "daemon",
                "--job",
                job,
                "--worker",
                id,
                "--nats-url",
                url,
                "--heartbeat-secs",
                "2",
            ])
            .arg("--work-dir")
            .arg(work_dir)
            .env("CEDANA_NATS_TOKEN", token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|source| LocalError::Spawn { agent, source })?;
        Ok(LocalWorker {
            id: id.into(),
            child,
            task_pids: Vec::new(),
        })
    }

    /// Ends the worker as an instance ends: its tasks and the daemon are killed.
    pub fn terminate(&mut self) {
        for pid in self.task_pids.drain(..) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        stop_child(&mut self.child);
    }
}

/// Asks a child to stop (SIGTERM), and kills it if it has not within 2 s.
pub fn stop_child(child: &mut Child) {
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

impl Drop for LocalWorker {
    fn drop(&mut self) {
        self.terminate();
    }
}
