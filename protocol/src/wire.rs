//! The wire protocol between the driver and agent daemons over NATS JetStream: subjects,
//! stream and bucket names, and the versioned message types. Every message is JSON with a
//! `v` field; a receiver refuses versions it does not know.
//!
//! Subjects are namespaced by job and worker (as the original's `CEDANA.<job>.<client>.*`):
//!
//! | subject | stream | what |
//! |---|---|---|
//! | `CEDANA.<job>.<worker>.commands` | `CEDANA_COMMANDS` | [`CommandEnvelope`], driver → agent |
//! | `CEDANA.<job>.<worker>.state` | `CEDANA_EVENTS` | [`EventEnvelope`]: replies, task exits, heartbeats, spot notices |
//! | `CEDANA.<job>.<worker>.logs` | `CEDANA_EVENTS` | [`EventEnvelope`] with [`Event::Log`] |
//!
//! KV `cedana_workers` holds a [`WorkerRecord`] per `<job>.<worker>`; KV `cedana_replies`
//! holds each command's reply under `<job>.<worker>.<command id>` so a repeated id is answered
//! from it, not run again; the object store `cedana_checkpoints` holds archives as
//! `<job>/<name>.zip`.
//!
//! | event (`type`) | subject | when |
//! |---|---|---|
//! | `reply {id, reply}` | state | a command was served (or repeated) |
//! | `task_exited {task, code, signal}` | state | a task ended (not when a checkpoint stopped it) |
//! | `heartbeat {tasks}` | state | every `--heartbeat-secs` |
//! | `log {task, data}` | logs | a task wrote whole lines |
//! | `spot_notice {kind, action, at, checkpoints, failed}` | state | EC2 instance metadata (IMDSv2) showed a spot interruption notice (`kind` `instance-action`: every running task was first checkpointed, one dump at a time, left running, zstd, with the work folder; `checkpoints` lists `{task, object}`, `failed` lists `{task, message}`) or a rebalance recommendation (`kind` `rebalance`: nothing is checkpointed); each once per daemon run, only when the daemon watches (`--watch-spot`, `--imds-endpoint`) |

use serde::{Deserialize, Serialize};

/// How a checkpoint's entries are compressed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Stored as is: fastest, largest.
    #[default]
    None,
    /// Zstandard (zip method 93): fast and small.
    Zstd,
    /// Deflate: what every unzip reads; slow.
    Deflate,
}

/// Version of every message type in this module.
pub const VERSION: u32 = 1;
/// A command to one worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommandEnvelope {
    pub v: u32,
    /// Unique per command; a repeated id gets the first reply again.
    pub id: String,
    pub command: Command,
}

/// What a worker is asked to do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    /// Answer with [`Reply::Pong`].
    Ping,
    /// Run `sh -c cmd` in the worker's folder and return its output and exit code.
    Sh {
        cmd: String,
        timeout_secs: Option<u64>,
    },
    /// Start the task `task` checkpoint-friendly (as `cedana-agent exec`), output streamed.
    Spawn {
        task: String,
        cmd: String,
        /// Also a user namespace and a minimal mount tree of its own (`exec --userns`): for a
        /// task that drops root. Added compatibly (older senders leave it out).
        #[serde(default, skip_serializing_if = "is_false")]
        userns: bool,
    },
    /// Checkpoint task `task` into the object store.
    Checkpoint {
        task: String,
        leave_running: bool,
        compression: Compression,
        /// The id of the object's chunks (its NUID, see [`valid_chunks_id`]), chosen by the
        /// sender so that another worker, told with [`Command::Prefetch`], can read the
        /// checkpoint while it is stored. Absent: the worker picks one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        chunks: Option<String>,
        /// CRIU's options; absent: the worker's for tasks (TCP connections left out, back
        /// closed after a restore; see the agent's `task_criu_options`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        criu: Option<crate::criu::CriuOptions>,
        /// A move (post-copy; the task stops, `leave_running` false, into a checkpoint store):
        /// answered as soon as the checkpoint's manifest is published ahead of its chunks
        /// ([`Reply::Checkpointed`] with `post_copy`), and the task is gone from this worker
        /// then; [`Event::CheckpointStored`] says when every chunk is stored, or that storing
        /// failed. Workers without a store take a whole checkpoint as usual.
        #[serde(default, skip_serializing_if = "is_false")]
        post_copy: bool,
    },
    /// Start reading the checkpoint whose chunks are `chunks` while another worker stores it
    /// (verified and extracted as it arrives into this worker's staging folder). Answered at
    /// once with [`Reply::Prefetching`]; a later [`Command::Restore`] of that checkpoint uses
    /// what was read (once the object is stored, whole, under the name it gives) instead of
    /// reading it again. Without that restore, it is dropped after a minute without chunks.
    Prefetch { chunks: String },
    /// Restore a checkpoint from the object store as task `task`.
    Restore {
        task: String,
        object: String,
        /// The SHA-256 (hex) of the checkpoint's manifest as its worker wrote it
        /// ([`Reply::Checkpointed`]): a checkpoint whose manifest differs (replaced after it
        /// was stored, by anyone who may write the store) is refused before anything is
        /// restored. The manifest holds every entry's SHA-256, so this pins the whole
        /// checkpoint. Absent: not checked (a checkpoint from an older agent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        manifest: Option<String>,
        /// The checkpoint is still being stored (post-copy): its published manifest is read,
        /// and each chunk is waited for; the task runs lazily.
        #[serde(default, skip_serializing_if = "is_false")]
        pending: bool,
    },
    /// Kill task `task`.
    Stop { task: String },
}

/// A task running on a worker, as its `pong` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningTask {
    pub task: String,
    pub pid: i32,
}

/// What a command produced.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Pong {
        agent_version: String,
        /// The tasks running on the worker (not those a checkpoint stopped); added
        /// compatibly: older agents leave it out.
        #[serde(default)]
        tasks: Vec<RunningTask>,
    },
    Sh {
        exit_code: i32,
        stdout: String,
        stderr: String,
    },
    Spawned {
        task: String,
        pid: i32,
    },
    Checkpointed {
        task: String,
        object: String,
        bytes: u64,
        criu_ms: u64,
        /// Answered before the chunks are stored (post-copy; `bytes` is then 0): see
        /// [`Event::CheckpointStored`].
        #[serde(default, skip_serializing_if = "is_false")]
        post_copy: bool,
        /// The SHA-256 (hex) of the checkpoint's manifest, for [`Command::Restore`]'s
        /// `manifest` (older agents leave it out).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        manifest: Option<String>,
    },
    Restored {
        task: String,
        pid: i32,
        /// The checkpoint had been read while it was stored ([`Command::Prefetch`]).
        #[serde(default)]
        read_while_stored: bool,
        /// The task runs before its memory is back: the worker serves it as it is touched
        /// (lazy restore), and ends the task if a chunk fails its check.
        #[serde(default)]
        lazy: bool,
    },
    Prefetching {
        chunks: String,
    },
    Stopped {
        task: String,
    },
    Error {
        message: String,
    },
    /// [`Command::Restore`] refused the checkpoint itself: part of it is missing or damaged
    /// (the message names it). An earlier checkpoint may restore.
    BadCheckpoint {
        task: String,
        message: String,
    },
}

/// Something a worker tells the driver.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The answer to command `id`.
    Reply { id: String, reply: Reply },
    /// A task ended: its exit code, or the signal that killed it.
    TaskExited {
        task: String,
        code: Option<i32>,
        signal: Option<i32>,
        /// The task was restored lazily and ended by its worker because part of its memory
        /// could not be had (a chunk that failed its check, a store that stopped answering):
        /// why. The checkpoint it came from cannot be trusted; the task did not fail.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        restore_failed: Option<String>,
    },
    /// Output of a task (lines, in order).
    Log { task: String, data: String },
    /// The worker is alive.
    Heartbeat { tasks: Vec<String> },
    /// A post-copy checkpoint ([`Command::Checkpoint`] `post_copy`) is stored whole (`error`
    /// none; `bytes` its size), or never will be (`error`: why; a restore waiting on it ends
    /// its task).
    CheckpointStored {
        task: String,
        object: String,
        bytes: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// EC2 instance metadata showed a spot interruption notice or a rebalance recommendation.
    /// For an interruption notice every running task was checkpointed first (left running);
    /// the driver should restore these elsewhere before the instance goes.
    SpotNotice {
        kind: SpotKind,
        /// The notice's `action` (`terminate`, `stop` or `hibernate`); none for a rebalance
        /// recommendation.
        action: Option<String>,
        /// The notice's time (`time`, or `noticeTime` of a recommendation), as IMDS wrote it
        /// (UTC, RFC 3339).
        at: Option<String>,
        /// The checkpoints taken because of the notice.
        checkpoints: Vec<SpotCheckpoint>,
        /// Tasks whose checkpoint failed.
        #[serde(default)]
        failed: Vec<SpotFailure>,
    },
}

/// Which instance metadata item a [`Event::SpotNotice`] comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SpotKind {
    /// `spot/instance-action`: the instance is stopped, hibernated or terminated in about two
    /// minutes.
    InstanceAction,
    /// `events/recommendations/rebalance`: the instance is at elevated risk of interruption.
    Rebalance,
}

/// A checkpoint taken on a spot notice: restore `object` as `task` (as in
/// [`Command::Restore`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpotCheckpoint {
    pub task: String,
    pub object: String,
    /// Its manifest's SHA-256, as in [`Reply::Checkpointed`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
}

/// A task whose checkpoint on a spot notice failed, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpotFailure {
    pub task: String,
    pub message: String,
}

/// An event with its origin.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope {
    pub v: u32,
    pub job: String,
    pub worker: String,
    /// Seconds since the Unix epoch.
    pub at: u64,
    pub event: Event,
}

/// A worker's registration in [`WORKERS_BUCKET`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub v: u32,
    pub job: String,
    pub worker: String,
    pub hostname: String,
    pub agent_version: String,
    pub criu_version: String,
    pub started_at: u64,
    pub last_heartbeat: u64,
    /// The daemon's process id on its machine.
    #[serde(default)]
    pub pid: u32,
}

/// Errors decoding a message.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("message is not valid JSON for this protocol: {0}")]
    Json(#[from] serde_json::Error),
    #[error(
        "message has protocol version {found}, this agent speaks {VERSION}; upgrade the older side"
    )]
    Version { found: u64 },
}

/// Decodes a message, checking its `v` before its shape.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let value: serde_json::Value = serde_json::from_slice(bytes)?;
    let v = value.get("v").and_then(|v| v.as_u64()).unwrap_or(0);
    if v != VERSION as u64 {
        return Err(DecodeError::Version { found: v });
    }
    Ok(serde_json::from_value(value)?)
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_and_look_as_documented() {
        let c = CommandEnvelope {
            v: VERSION,
            id: "c1".into(),
            command: Command::Sh {
                cmd: "echo hi".into(),
                timeout_secs: Some(5),
            },
        };
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(
            json,
            r#"{"v":1,"id":"c1","command":{"type":"sh","cmd":"echo hi","timeout_secs":5}}"#
        );
        assert_eq!(decode::<CommandEnvelope>(json.as_bytes()).unwrap(), c);
    }

    #[test]
    fn spot_notices_look_as_documented() {
        let e = Event::SpotNotice {
            kind: SpotKind::InstanceAction,
            action: Some("terminate".into()),
            at: Some("2026-11-21T01:02:03Z".into()),
            checkpoints: vec![SpotCheckpoint {
                task: "t".into(),
                object: "j/sh_20261121_010000.zip".into(),
                manifest: Some("ab12".into()),
            }],
            failed: vec![],
        };
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(
            json,
            r#"{"type":"spot_notice","kind":"instance-action","action":"terminate","at":"2026-11-21T01:02:03Z","checkpoints":[{"task":"t","object":"j/sh_20261121_010000.zip","manifest":"ab12"}],"failed":[]}"#
        );
        assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), e);
        let r: Event = serde_json::from_str(
            r#"{"type":"spot_notice","kind":"rebalance","action":null,"at":null,"checkpoints":[]}"#,
        )
        .unwrap();
        assert!(matches!(
            r,
            Event::SpotNotice {
                kind: SpotKind::Rebalance,
                ..
            }
        ));
    }

    #[test]
    fn unknown_versions_are_refused() {
        let err = decode::<CommandEnvelope>(br#"{"v":2,"id":"x","command":{"type":"ping"}}"#)
            .unwrap_err();
        assert!(err.to_string().contains("version 2"), "{err}");
    }
}
