//! Requests to a running job's driver from other processes (`cedana-driver checkpoint|migrate|down
//! JOB`): core NATS request/reply on [`crate::control_subject`].

use serde::{Deserialize, Serialize};

/// What is asked of the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Checkpoint the task now.
    Checkpoint,
    /// Move the task to a new worker.
    Migrate,
    /// Stop the task and end every worker.
    Down,
}

/// A request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Request {
    pub v: u32,
    pub action: Action,
}

/// The answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Answer {
    pub v: u32,
    pub ok: bool,
    pub message: String,
}
