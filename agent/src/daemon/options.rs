//! How a daemon runs: [`DaemonOptions`], [`SpotOptions`], and the work folder's layout.

use std::path::PathBuf;
use std::time::Duration;

use cedana_protocol::Secret;

/// How a daemon runs.
#[derive(Clone, Debug)]
pub struct DaemonOptions {
    /// One URL or a comma-separated list (a cluster).
    pub nats_url: String,
    pub token: Secret,
    pub job: String,
    pub worker: String,
    /// The worker's folder: task logs, checkpoints on their way, commands' working directory.
    pub work_dir: PathBuf,
    pub heartbeat: Duration,
    /// A folder every worker of the job mounts (the original's `shared_storage`): checkpoints
    /// are written there as `<job>/<name>.zip` instead of going through the object store.
    pub shared_storage: Option<PathBuf>,
    /// A checkpoint store (`s3://…`, `file:///…`; see [`crate::chunked`]): checkpoints go
    /// there as chunks, and only what it lacks is sent. Takes precedence over
    /// `shared_storage` and the NATS object store.
    pub store: Option<cedana_store::StoreUrl>,
    /// The job's checkpoint bucket in the NATS object store (the driver names it:
    /// [`cedana_protocol::job_checkpoints_bucket`]; the shared one of old jobs otherwise).
    pub bucket: String,
    /// Restore a store's checkpoints in full before the task runs, not lazily (see
    /// [`crate::lazy`]).
    pub full_restore: bool,
    /// Watch EC2 instance metadata for spot notices (off: no IMDS is contacted).
    pub spot: Option<SpotOptions>,
}

/// How spot notices are watched.
#[derive(Clone, Debug)]
pub struct SpotOptions {
    /// IMDS, `http://HOST[:PORT]` ([`crate::imds::DEFAULT_ENDPOINT`] on EC2).
    pub endpoint: String,
    /// Time between polls.
    pub poll: Duration,
}

/// Folder inside the work folder where checkpoints are written and downloaded (never carried).
pub const CHECKPOINTS_DIR: &str = ".checkpoints";

/// Folder inside the work folder where the daemon keeps what it knows of its tasks (never
/// carried): per task `<task>.json` (its PID and start time, for a restarted daemon to take
/// it back), `<task>.sent` (how much of its log was published) and `<task>.exit` (the exit
/// status its shell writes as it ends, which a daemon that did not start it cannot learn
/// from the kernel).
pub const TASKS_DIR: &str = ".cedana-tasks";
