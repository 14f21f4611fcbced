//! A job's state: what `status`, `logs`, `checkpoint`, `migrate` and `down` read. The driver
//! keeps it in `<state dir>/<job>/job.json` (written atomically on every change) and in the KV
//! bucket `cedana_jobs` under the job's id.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// KV bucket of job records.
pub use cedana_protocol::JOBS_BUCKET;
/// The record's file in the job's folder.
pub const RECORD_FILE: &str = "job.json";
/// The embedded NATS server's token, for the commands that talk to a running job (0600).
pub const TOKEN_FILE: &str = "nats.token";
/// Task output of the whole job, in order.
pub const OUTPUT_FILE: &str = "output.log";
/// Beside it: the stream sequence of the newest log event written to it.
pub const OUTPUT_SEQ_FILE: &str = "output.seq";

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Starting,
    Running,
    Checkpointing,
    Recovering,
    Migrating,
    Succeeded,
    Failed,
    Down,
}

impl JobState {
    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Down
        )
    }
}

/// Where a worker is in its life; in the record as `running`, `lost` or `terminated`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    Running,
    /// It went away (its machine was taken back, its daemon exited, it did not come up).
    Lost,
    /// The job ended it.
    Terminated,
}

impl WorkerState {
    /// As the record has it.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Running => "running",
            WorkerState::Lost => "lost",
            WorkerState::Terminated => "terminated",
        }
    }
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Compares with the record's string form (`state == "running"`).
impl PartialEq<&str> for WorkerState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// A worker of the job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub id: String,
    pub provider: String,
    /// The daemon's process id (local workers).
    pub pid: i32,
    /// Its folder on this machine (local workers).
    pub dir: PathBuf,
    /// Its network namespace (local workers, as root).
    #[serde(default)]
    pub netns: Option<String>,
    pub launched_at: u64,
    /// `running`, `lost` or `terminated`.
    pub state: WorkerState,
    /// The provider's id for it.
    #[serde(default)]
    pub instance: String,
    /// What was launched, at what price.
    #[serde(default)]
    pub offer: Option<crate::providers::Offer>,
    #[serde(default)]
    pub ended_at: Option<u64>,
    /// This machine's address on the worker's veth pair and the port forwarded there to the
    /// NATS server (local workers in a namespace; a resumed driver forwards it again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward: Option<(std::net::Ipv4Addr, u16)>,
    /// The address this machine reaches the worker at (its tasks' ports are there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<std::net::IpAddr>,
}

/// The job's task now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskInfo {
    pub name: String,
    pub worker: String,
    pub pid: i32,
}

/// A checkpoint taken.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    pub object: String,
    pub task: String,
    pub worker: String,
    pub at: u64,
    pub bytes: u64,
    /// The SHA-256 of its manifest as its worker wrote it: a restore refuses a checkpoint
    /// replaced since (absent for store checkpoints and older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
}

/// `job.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub v: u32,
    pub job: String,
    pub script: PathBuf,
    pub state: JobState,
    pub started_at: u64,
    pub updated_at: u64,
    pub driver_pid: u32,
    pub nats_url: String,
    /// Whether the driver runs its own NATS server (its token is in [`TOKEN_FILE`]).
    pub embedded_nats: bool,
    /// The managed flow (checkpoints, recovery, `checkpoint`/`migrate` commands) or the
    /// script's own code.
    pub managed: bool,
    pub workers: Vec<WorkerInfo>,
    pub task: Option<TaskInfo>,
    pub checkpoints: Vec<CheckpointInfo>,
    pub recoveries: u32,
    pub migrations: u32,
    /// Spot interruption notices acted on.
    #[serde(default)]
    pub spot_notices: u32,
    /// Moves to a cheaper offer (arbitrage).
    #[serde(default)]
    pub arbitrage_moves: u32,
    /// What the job has cost so far (zero on `local`).
    pub cost_usd: f64,
    pub exit_code: Option<i64>,
    pub error: Option<String>,
    /// The embedded NATS server's process id (0: none, or not known).
    #[serde(default)]
    pub nats_pid: u32,
    /// The stream sequence of the next event the driver reads, and that of the newest log
    /// event in the output file: where a resumed driver reads on from.
    #[serde(default)]
    pub events_seq: u64,
    #[serde(default)]
    pub output_seq: u64,
    /// How the job was started, for `resume`.
    #[serde(default)]
    pub settings: Settings,
    /// The exit code `cedana-driver run` (and `attach`) ends with for this job, once it ended.
    #[serde(default)]
    pub exit_status: Option<u8>,
}

/// What the job was started with that a resumed driver needs again (no secrets: the config
/// file is named, not copied).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Seconds between checkpoints (`None`: none on a timer).
    pub interval_secs: Option<u64>,
    /// Checkpoints kept in the store.
    pub keep: usize,
    /// Arbitrage: (every seconds, margin as a fraction).
    pub arbitrage: Option<(u64, f64)>,
    /// Local workers boot from this worker image.
    pub image: Option<PathBuf>,
    /// The config file the job was started with, if one was named.
    pub config: Option<PathBuf>,
    /// Ports of the task forwarded from this machine's loopback (`run --expose`): (local,
    /// task's).
    #[serde(default)]
    pub expose: Vec<(u16, u16)>,
    /// The checkpoint store (`run --store`, `checkpoint_store.url`), without the job's part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// Seconds to wait for spot capacity before on-demand (`run --wait-for-spot`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_for_spot_secs: Option<u64>,
    /// The job's own checkpoint bucket in the NATS object store; absent in jobs from before
    /// each job had one (they use the shared one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_bucket: Option<String>,
}

impl Settings {
    /// The NATS object store bucket the job's checkpoints go to.
    pub fn bucket(&self) -> &str {
        self.checkpoint_bucket
            .as_deref()
            .unwrap_or(cedana_protocol::CHECKPOINTS_BUCKET)
    }
}

/// Errors reading job state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("no job {job:?} in {dir}; `cedana-driver status` lists the jobs there")]
    NoJob { job: String, dir: PathBuf },
    #[error("{job:?} names more than one job ({}); give more of the id", matches.join(", "))]
    Ambiguous { job: String, matches: Vec<String> },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a job record: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl JobRecord {
    /// Writes the record to `dir/job.json` atomically.
    pub fn save(&self, dir: &Path) -> Result<(), StateError> {
        let path = dir.join(RECORD_FILE);
        let werr = |source| StateError::Write {
            path: path.clone(),
            source,
        };
        // 0600 as the temporary file it was written through before: the record names the
        // job's workers and checkpoints.
        crate::util::write_atomic(
            &path,
            &serde_json::to_vec_pretty(self).expect("serializes"),
            0o600,
        )
        .map_err(werr)
    }

    /// Reads `dir/job.json`.
    pub fn load(dir: &Path) -> Result<Self, StateError> {
        let path = dir.join(RECORD_FILE);
        let bytes = std::fs::read(&path).map_err(|source| StateError::Read {
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|source| StateError::Parse { path, source })
    }

    /// Whether the driver that runs the job (its controller) is still alive: a record left by
    /// a driver that died says `running` but is not. The process must be a `cedana-driver`
    /// (a PID is reused).
    pub fn driver_alive(&self) -> bool {
        !self.state.is_final() && controller_alive(self.driver_pid)
    }

    /// The state to show: a job whose driver is gone is `orphaned`.
    pub fn shown_state(&self) -> String {
        if !self.state.is_final() && !self.driver_alive() {
            "orphaned".into()
        } else {
            serde_json::to_value(self.state)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default()
        }
    }
}

/// Whether process `pid` lives and is a `cedana-driver`.
pub fn controller_alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // A zombie (`Z`) or dead (`X`) process no longer runs anything.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    if matches!(state, Some('Z' | 'X') | None) {
        return false;
    }
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .and_then(|c| {
            c.split(|b| *b == 0)
                .next()
                .map(|a| a.ends_with(b"cedana-driver"))
        })
        .unwrap_or(false)
}

/// Every job record under `state_dir`, newest first.
pub fn list(state_dir: &Path) -> Vec<(PathBuf, JobRecord)> {
    let mut jobs: Vec<(PathBuf, JobRecord)> = std::fs::read_dir(state_dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let dir = e.path();
                    JobRecord::load(&dir).ok().map(|r| (dir, r))
                })
                .collect()
        })
        .unwrap_or_default();
    jobs.sort_by_key(|j| std::cmp::Reverse(j.1.started_at));
    jobs
}

/// The folder and record of `job` (its full id, or a unique prefix of it).
pub fn find(state_dir: &Path, job: &str) -> Result<(PathBuf, JobRecord), StateError> {
    let exact = state_dir.join(job);
    if let Ok(r) = JobRecord::load(&exact) {
        return Ok((exact, r));
    }
    let mut matches: Vec<_> = list(state_dir)
        .into_iter()
        .filter(|(_, r)| r.job.starts_with(job))
        .collect();
    if matches.len() == 1 {
        return Ok(matches.remove(0));
    }
    if matches.len() > 1 {
        return Err(StateError::Ambiguous {
            job: job.into(),
            matches: matches.into_iter().map(|(_, r)| r.job).collect(),
        });
    }
    Err(StateError::NoJob {
        job: job.into(),
        dir: state_dir.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_states_read_and_write_the_old_strings() {
        for (state, text) in [
            (WorkerState::Running, "running"),
            (WorkerState::Lost, "lost"),
            (WorkerState::Terminated, "terminated"),
        ] {
            let old = format!(
                r#"{{"id":"w1","provider":"local","pid":42,"dir":"/j/workers/w1","netns":null,"launched_at":1700000000,"state":"{text}","instance":"pid 42","offer":null,"ended_at":null}}"#
            );
            let w: WorkerInfo = serde_json::from_str(&old).unwrap();
            assert_eq!(w.state, state);
            assert_eq!(w.state, text);
            assert_eq!(serde_json::to_string(&w).unwrap(), old);
        }
        assert!(serde_json::from_str::<WorkerState>(r#""Running""#).is_err());
    }
}
