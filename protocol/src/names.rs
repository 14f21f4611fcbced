//! Every name on the wire: streams, buckets and subjects. No other code spells one.

/// Stream of commands.
pub const COMMANDS_STREAM: &str = "CEDANA_COMMANDS";
/// Stream of events (replies, exits, heartbeats, logs).
pub const EVENTS_STREAM: &str = "CEDANA_EVENTS";
/// KV bucket of worker registrations.
pub const WORKERS_BUCKET: &str = "cedana_workers";
/// KV bucket of command replies, for idempotency.
pub const REPLIES_BUCKET: &str = "cedana_replies";
/// Object store bucket of checkpoint archives shared by every job: jobs from before each job
/// had its own ([`job_checkpoints_bucket`]), and agents not told another (`--checkpoint-bucket`).
pub const CHECKPOINTS_BUCKET: &str = "cedana_checkpoints";

/// The object store bucket of job `job`'s checkpoints: a job's workers may touch its own
/// bucket only, so that on a server several jobs share, no job's worker can read, replace or
/// purge another job's checkpoints.
pub fn job_checkpoints_bucket(job: &str) -> String {
    format!("{CHECKPOINTS_BUCKET}_{job}")
}

/// Whether `name` can be an object store bucket (letters, digits, `-`, `_`; at most 200).
pub fn valid_bucket(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}
/// KV bucket of job records (the driver's).
pub const JOBS_BUCKET: &str = "cedana_jobs";

/// The subjects [`COMMANDS_STREAM`] keeps: every worker's commands.
pub const COMMANDS_SUBJECTS: &str = "CEDANA.*.*.commands";

/// The subjects [`EVENTS_STREAM`] keeps: every worker's state and logs.
pub fn events_subjects() -> Vec<String> {
    vec!["CEDANA.*.*.state".into(), "CEDANA.*.*.logs".into()]
}

/// `CEDANA.<job>.<worker>.commands`.
pub fn commands_subject(job: &str, worker: &str) -> String {
    format!("CEDANA.{job}.{worker}.commands")
}
/// `CEDANA.<job>.<worker>.state`.
pub fn state_subject(job: &str, worker: &str) -> String {
    format!("CEDANA.{job}.{worker}.state")
}
/// `CEDANA.<job>.<worker>.logs`.
pub fn logs_subject(job: &str, worker: &str) -> String {
    format!("CEDANA.{job}.{worker}.logs")
}
/// `CEDANA.<job>.*.state` and `CEDANA.<job>.*.logs`: every event of a job.
pub fn job_events_subjects(job: &str) -> Vec<String> {
    vec![
        format!("CEDANA.{job}.*.state"),
        format!("CEDANA.{job}.*.logs"),
    ]
}
/// `CEDANA.<job>.driver.control`: requests to a running job's driver.
pub fn control_subject(job: &str) -> String {
    format!("CEDANA.{job}.driver.control")
}

/// `$O.<bucket>.C.<chunks>`: the chunks of one object in the object store's own layout.
pub fn object_chunks_subject(bucket: &str, chunks: &str) -> String {
    format!("$O.{bucket}.C.{chunks}")
}
/// `$O.<bucket>.M.<encoded name>`: an object's info (the name URL-safe base64 encoded by the
/// caller, as the object store does).
pub fn object_info_subject(bucket: &str, encoded_name: &str) -> String {
    format!("$O.{bucket}.M.{encoded_name}")
}
/// The KV key of a worker: `<job>.<worker>`.
pub fn worker_key(job: &str, worker: &str) -> String {
    format!("{job}.{worker}")
}
/// The KV key of a worker's lease (renewed every second by its agent): `<job>.<worker>.lease`.
pub fn lease_key(job: &str, worker: &str) -> String {
    format!("{job}.{worker}.lease")
}
/// The durable consumer a worker reads its commands through: `w_<job>_<worker>`.
pub fn command_consumer(job: &str, worker: &str) -> String {
    format!("w_{job}_{worker}")
}
/// The KV key (in the workers bucket) that revokes a worker's lease: the job moved its tasks
/// elsewhere, and the worker's agent kills them when it sees this: `<job>.<worker>.revoked`.
pub fn revoked_key(job: &str, worker: &str) -> String {
    format!("{job}.{worker}.revoked")
}

/// How long a worker's tasks may run without its agent renewing its lease (a write to the
/// workers bucket the server acknowledged, counted from when it was sent). Past it the agent
/// freezes them; the driver recovers a lost worker's task only after it.
pub const LEASE_SECS: u64 = 10;

/// What the driver waits beyond a lease before it takes it for run out: clock rates differ
/// (by far less), the agent looks every 100 ms.
pub const LEASE_MARGIN_SECS: u64 = 2;

/// The KV key of a command's stored reply: `<job>.<worker>.<command id>`.
pub fn reply_key(job: &str, worker: &str, id: &str) -> String {
    format!("{job}.{worker}.{id}")
}
