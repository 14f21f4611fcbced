//! Command handling: the [`Worker`] (the daemon's state: tasks, CRIU, the checkpoint bucket,
//! stored replies) and its [`Worker::handle`], which serves one command message: from the
//! stored reply if its id was seen, else by running it (`ping`, `sh`, `spawn`, `checkpoint`,
//! `prefetch`, `restore`, `stop`) and storing the reply before it is published.
//!
//! CRIU runs one dump or restore at a time (see `Worker::criu_lock`), so a spot notice's
//! checkpoints and a command's take turns; each archive streams into the object store while
//! its dump runs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::jetstream::kv;
use tracing::{debug, error, info, warn};

use cedana_protocol::{self as protocol, Command, CommandEnvelope, Compression, Event, Reply};

use super::events::{json, Events};
use super::logs::tail_log;
use super::options::{DaemonOptions, CHECKPOINTS_DIR, TASKS_DIR};
use super::prefetch::Prefetches;
use super::reaper::Reaper;
use super::receive::{extract_file, receive};
use crate::criu::Criu;
use crate::dump::{self, CriuOptions, DumpOptions, TcpMode};
use crate::progress::NoProgress;
use crate::restore::{self, RestoreCriu, RestoreError, RestoreOptions};
use crate::zipfmt::Sink;
use crate::{exec, objstore};

/// A task this worker started or restored.
pub(super) struct Task {
    pid: i32,
    /// Set when a checkpoint stopped it on purpose: its exit is not the task ending.
    pub(super) checkpointed: bool,
}

/// The daemon's state, shared by the command loop, heartbeats, the spot watcher and the
/// tasks' watchers.
pub(super) struct Worker {
    pub(super) opts: DaemonOptions,
    criu: Criu,
    pub(super) events: Arc<Events>,
    replies: kv::Store,
    checkpoints: objstore::Bucket,
    reaper: Arc<Reaper>,
    tasks: Arc<Mutex<HashMap<String, Task>>>,
    /// Held while CRIU dumps or restores. Two dumps never overlap: not of one task, and not of
    /// two tasks either, since all tasks share the work folder as their working directory and
    /// CRIU's parasite mounts a proc of the task's PID namespace at `proc.crtools` there (a
    /// second dump meanwhile fails with EEXIST). A restore does not run during a dump either:
    /// it puts carried files back into the folder the dump is reading.
    criu_lock: tokio::sync::Mutex<()>,
    /// Held while an archive's object name is chosen and claimed.
    naming: Arc<tokio::sync::Mutex<()>>,
    /// Checkpoints being read while another worker stores them ([`Command::Prefetch`]).
    prefetches: Prefetches,
    /// Whether the tasks are frozen (the lease ran out; see [`super::lease`]).
    frozen: std::sync::atomic::AtomicBool,
    /// Large carried files a task was seen writing in place while a checkpoint was stored:
    /// copied while it is stopped from then on (see [`crate::files::snapshot`]).
    volatile: Mutex<Vec<PathBuf>>,
    /// Lazily restored tasks ended because their memory could not all be had: why (said with
    /// their exit).
    restore_failures: Arc<Mutex<HashMap<String, String>>>,
}

impl Worker {
    pub(super) fn new(
        opts: DaemonOptions,
        criu: Criu,
        events: Arc<Events>,
        replies: kv::Store,
        checkpoints: objstore::Bucket,
        reaper: Arc<Reaper>,
    ) -> Self {
        Worker {
            opts,
            criu,
            events,
            replies,
            checkpoints,
            reaper,
            tasks: Arc::new(Mutex::new(HashMap::new())),
            criu_lock: Default::default(),
            naming: Default::default(),
            prefetches: Default::default(),
            frozen: Default::default(),
            volatile: Default::default(),
            restore_failures: Default::default(),
        }
    }

    /// Stops every process of every task (the lease ran out); whether it did so now.
    pub(super) fn freeze(&self) -> bool {
        use std::sync::atomic::Ordering;
        if self.frozen.swap(true, Ordering::SeqCst) {
            return false;
        }
        for pid in self.task_pids() {
            signal_tree(pid, nix::sys::signal::Signal::SIGSTOP);
        }
        true
    }

    /// Lets frozen tasks run again (the lease was renewed); whether they were frozen.
    pub(super) fn thaw(&self) -> bool {
        use std::sync::atomic::Ordering;
        if !self.frozen.swap(false, Ordering::SeqCst) {
            return false;
        }
        for pid in self.task_pids() {
            signal_tree(pid, nix::sys::signal::Signal::SIGCONT);
        }
        true
    }

    /// Kills every task (the job revoked the lease: they run elsewhere now); their ends are
    /// not reported. Returns their names.
    pub(super) fn fence(&self) -> Vec<String> {
        let mut killed = Vec::new();
        for (name, t) in self.tasks().iter_mut() {
            if t.checkpointed {
                continue;
            }
            t.checkpointed = true;
            // The first process of the task's PID namespace: the namespace goes with it.
            kill(t.pid);
            killed.push(name.clone());
        }
        self.frozen
            .store(false, std::sync::atomic::Ordering::SeqCst);
        killed
    }

    /// Whether the tasks are frozen now.
    pub(super) fn is_frozen(&self) -> bool {
        self.frozen.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn task_pids(&self) -> Vec<i32> {
        self.tasks()
            .values()
            .filter(|t| !t.checkpointed)
            .map(|t| t.pid)
            .collect()
    }

    /// The tasks running here, by name.
    pub(super) fn tasks(&self) -> MutexGuard<'_, HashMap<String, Task>> {
        self.tasks.lock().expect("tasks")
    }

    /// No task `task` runs here, or the error that says one does.
    fn not_running(&self, task: &str) -> Result<(), String> {
        match self.tasks().contains_key(task) {
            true => Err(format!("task {task:?} already runs on this worker")),
            false => Ok(()),
        }
    }

    /// Where checkpoints are written and downloaded in the work folder.
    fn checkpoints_dir(&self) -> PathBuf {
        self.opts.work_dir.join(CHECKPOINTS_DIR)
    }

    /// Serves one command message: from the stored reply if its id was seen, else by running it.
    pub(super) async fn handle(self: &Arc<Self>, payload: &[u8]) {
        let env: CommandEnvelope = match protocol::decode(payload) {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "dropping a command that cannot be decoded");
                return;
            }
        };
        if !protocol::valid_id(&env.id) {
            warn!(id = %env.id, "dropping a command whose id is not usable as a key");
            return;
        }
        let key = protocol::reply_key(&self.opts.job, &self.opts.worker, &env.id);
        if let Ok(Some(stored)) = self.replies.get(&key).await {
            if let Ok(reply) = serde_json::from_slice::<Reply>(&stored) {
                debug!(id = %env.id, "repeated command: answering from the stored reply");
                self.events
                    .publish(Event::Reply { id: env.id, reply })
                    .await;
                return;
            }
        }
        debug!(id = %env.id, command = ?env.command, "running command");
        let reply = match self.execute(env.command).await {
            Ok(r) => r,
            Err(message) => Reply::Error { message },
        };
        if let Err(e) = self.replies.put(&key, json(&reply)).await {
            warn!(error = %e, "cannot store the reply; a repeat of this command would run again");
        }
        self.events
            .publish(Event::Reply { id: env.id, reply })
            .await;
    }

    async fn execute(self: &Arc<Self>, command: Command) -> Result<Reply, String> {
        match command {
            Command::Ping => {
                let mut tasks: Vec<protocol::RunningTask> = self
                    .tasks()
                    .iter()
                    .filter(|(_, t)| !t.checkpointed)
                    .map(|(name, t)| protocol::RunningTask {
                        task: name.clone(),
                        pid: t.pid,
                    })
                    .collect();
                tasks.sort_by(|a, b| a.task.cmp(&b.task));
                Ok(Reply::Pong {
                    agent_version: env!("CARGO_PKG_VERSION").into(),
                    tasks,
                })
            }
            Command::Sh { cmd, timeout_secs } => self.sh(cmd, timeout_secs.unwrap_or(600)).await,
            Command::Spawn { task, cmd, userns } => self.spawn(task, cmd, userns).await,
            Command::Checkpoint {
                task,
                leave_running,
                compression,
                chunks,
                criu,
                post_copy,
            } => {
                let criu = criu.unwrap_or_else(task_criu_options);
                if let Err(e) = criu.check() {
                    return Err(format!("checkpoint of task {task:?}: {e}"));
                }
                let how = How {
                    criu,
                    post_copy: post_copy && !leave_running,
                };
                self.checkpoint(task, leave_running, compression, chunks, how)
                    .await
            }
            Command::Prefetch { chunks } => self.prefetch(chunks),
            Command::Restore {
                task,
                object,
                pending,
                manifest,
            } => self.restore(task, object, pending, manifest).await,
            Command::Stop { task } => {
                let pid = self.task_pid(&task)?;
                kill(pid);
                Ok(Reply::Stopped { task })
            }
        }
    }

    fn task_pid(&self, task: &str) -> Result<i32, String> {
        self.tasks()
            .get(task)
            .map(|t| t.pid)
            .ok_or_else(|| format!("no task {task:?} on this worker"))
    }

    async fn sh(&self, cmd: String, timeout_secs: u64) -> Result<Reply, String> {
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(&cmd)
            .current_dir(&self.opts.work_dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run sh: {e}"))?;
        let pid = child.id() as i32;
        let exited = self.reaper.watch(pid);
        // Each stream read on a thread of its own into a bounded buffer: read to its end
        // (a background process the command started may hold it open long after), but the
        // reply does not wait for that.
        let out = ShOutput::follow(child.stdout.take());
        let err = ShOutput::follow(child.stderr.take());
        let status = match tokio::time::timeout(Duration::from_secs(timeout_secs), exited).await {
            Ok(Ok(st)) => st,
            Ok(Err(_)) => return Err("lost track of the command".into()),
            Err(_) => {
                kill(pid);
                return Err(format!(
                    "command timed out after {timeout_secs} s and was killed"
                ));
            }
        };
        // What the shell wrote is all there once its own end is read: a little time for that,
        // not for the processes it left in the background.
        for _ in 0..20 {
            if out.done() && err.done() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Reply::Sh {
            exit_code: status.code.unwrap_or(128 + status.signal.unwrap_or(0)),
            stdout: out.text(),
            stderr: err.text(),
        })
    }

    fn log_path(&self, task: &str) -> PathBuf {
        self.opts.work_dir.join(format!("{task}.log"))
    }

    async fn spawn(
        self: &Arc<Self>,
        task: String,
        cmd: String,
        userns: bool,
    ) -> Result<Reply, String> {
        if !protocol::valid_id(&task) {
            return Err(format!(
                "task name {task:?} is not usable: use letters, digits, - and _"
            ));
        }
        self.not_running(&task)?;
        let log = self.log_path(&task);
        create_dir(&self.tasks_dir())?;
        // The shell writes its exit status as it ends (also after a restore elsewhere: the
        // work folder is at the same path on every worker), for a daemon that takes the task
        // back and so cannot learn it from the kernel.
        let exit_file = self.task_file(&task, "exit");
        let _ = std::fs::remove_file(&exit_file);
        let script = match exit_file.to_str() {
            Some(p) if !p.contains(['"', '$', '`', '\\', '\'', '\n']) => {
                format!("trap 'printf %s \"$?\" > \"{p}\"' EXIT\n{cmd}")
            }
            _ => cmd,
        };
        let opts = exec::ExecOptions {
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            log: log.clone(),
            cwd: Some(self.opts.work_dir.clone()),
            userns,
        };
        let pid = tokio::task::spawn_blocking(move || exec::spawn(&opts))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?
            .as_raw();
        self.track(task.clone(), pid, log, 0);
        Ok(Reply::Spawned { task, pid })
    }

    /// The folder of the daemon's task files.
    fn tasks_dir(&self) -> PathBuf {
        self.opts.work_dir.join(TASKS_DIR)
    }

    /// One of task `task`'s files (`json`, `sent`, `exit`).
    fn task_file(&self, task: &str, ext: &str) -> PathBuf {
        self.tasks_dir().join(format!("{task}.{ext}"))
    }

    /// Records a running task (also in its task file), streams its log from `offset`, and
    /// reports its exit.
    fn track(self: &Arc<Self>, task: String, pid: i32, log: PathBuf, offset: u64) {
        let record = TaskFile {
            task: task.clone(),
            pid,
            start_time: crate::process::start_time(pid).unwrap_or(0),
        };
        let _ = create_dir(&self.tasks_dir()).and_then(|_| {
            write_file(
                &self.task_file(&task, "json"),
                &serde_json::to_vec(&record).unwrap_or_default(),
            )
        });
        let _ = std::fs::remove_file(self.task_file(&task, "sent"));
        let exited = self.reaper.watch(pid);
        self.follow(record, log, offset, async move {
            exited.await.ok().map(|st| (st.code, st.signal))
        });
    }

    /// Tracks task `t` until `exited` says how it ended: its log streamed from `offset`, its
    /// exit reported (unless a checkpoint stopped it), its task files removed.
    fn follow(
        self: &Arc<Self>,
        t: TaskFile,
        log: PathBuf,
        offset: u64,
        exited: impl std::future::Future<Output = Option<(Option<i32>, Option<i32>)>> + Send + 'static,
    ) {
        let task = t.task.clone();
        self.tasks().insert(
            task.clone(),
            Task {
                pid: t.pid,
                checkpointed: false,
            },
        );
        let me = self.clone();
        tokio::spawn(async move {
            let (done_tx, done_rx) = tokio::sync::watch::channel(false);
            let tail = tokio::spawn(tail_log(
                me.events.clone(),
                task.clone(),
                log,
                offset,
                done_rx,
                Some(me.task_file(&task, "sent")),
            ));
            let status = exited.await;
            let _ = done_tx.send(true);
            let _ = tail.await;
            let checkpointed = me.tasks().remove(&task).is_some_and(|t| t.checkpointed);
            let restore_failed = me
                .restore_failures
                .lock()
                .expect("not poisoned")
                .remove(&task);
            if let (Some((code, signal)), false) = (status, checkpointed) {
                me.events
                    .publish(Event::TaskExited {
                        task: task.clone(),
                        code,
                        signal,
                        restore_failed,
                    })
                    .await;
            }
            for ext in ["json", "sent", "exit"] {
                let _ = std::fs::remove_file(me.task_file(&task, ext));
            }
        });
    }

    /// Takes back the tasks a previous run of this daemon (same job, worker and work
    /// folder) started and left running: each is tracked again (its log from where the last
    /// run stopped publishing, its exit from the status its shell writes). A task that ended
    /// while no daemon ran has its exit reported now. Returns the names taken back.
    pub(super) fn adopt_tasks(self: &Arc<Self>) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(self.tasks_dir()) else {
            return Vec::new();
        };
        let mut adopted = Vec::new();
        for entry in dir.flatten().take(1024) {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let Some(t) = std::fs::read(&path)
                .ok()
                .filter(|b| b.len() <= 4096)
                .and_then(|b| serde_json::from_slice::<TaskFile>(&b).ok())
                .filter(|t| protocol::valid_id(&t.task) && t.pid > 0)
            else {
                let _ = std::fs::remove_file(&path);
                continue;
            };
            if self.tasks().contains_key(&t.task) {
                continue;
            }
            let sent = std::fs::read(self.task_file(&t.task, "sent"))
                .ok()
                .and_then(|b| b.get(..8).and_then(|b| b.try_into().ok()))
                .map(u64::from_le_bytes)
                .unwrap_or(0);
            let log = self.log_path(&t.task);
            let exit_file = self.task_file(&t.task, "exit");
            let alive =
                t.start_time != 0 && crate::process::start_time(t.pid) == Some(t.start_time);
            // Frozen by the previous run (its lease ran out): frozen here too, so that the
            // next renewal thaws it (or a revocation kills it) rather than it staying stopped.
            if alive && crate::process::is_stopped(t.pid) {
                self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            info!(task = %t.task, pid = t.pid, alive, "taking back a task of the previous run");
            adopted.push(t.task.clone());
            let (pid, born) = (t.pid, t.start_time);
            self.follow(t, log, sent, async move {
                // Not this process's child: its end is seen by looking, its status read from
                // what its shell wrote.
                while alive && crate::process::start_time(pid) == Some(born) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let code = std::fs::read_to_string(&exit_file)
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok());
                Some((code, None))
            });
        }
        adopted
    }

    pub(super) async fn checkpoint(
        self: &Arc<Self>,
        task: String,
        leave_running: bool,
        compression: Compression,
        chunks: Option<String>,
        how: How,
    ) -> Result<Reply, String> {
        let mut tries = 0;
        loop {
            let once = self
                .checkpoint_once(
                    task.clone(),
                    leave_running,
                    compression,
                    chunks.clone(),
                    how.clone(),
                )
                .await;
            match once {
                Ok(reply) => return Ok(reply),
                // A large carried file the task wrote in place while it was stored (the tree
                // was running: `leave_running`): copied while the tree is stopped from now on,
                // and the checkpoint taken again.
                Err(Failed::Changed(path, message)) => {
                    info!(path = %path.display(), "a carried file was written in place during the checkpoint: copying it while the task is stopped from now on");
                    self.volatile.lock().expect("not poisoned").push(path);
                    tries += 1;
                    if tries > 2 {
                        return Err(message);
                    }
                }
                Err(Failed::Other(message)) => return Err(message),
            }
        }
    }

    async fn checkpoint_once(
        self: &Arc<Self>,
        task: String,
        leave_running: bool,
        compression: Compression,
        chunks: Option<String>,
        how: How,
    ) -> Result<Reply, Failed> {
        if let Some(c) = &chunks {
            check_chunks_id(c)?;
        }
        let files_copy = self.volatile.lock().expect("not poisoned").clone();
        // A frozen task would be checkpointed stopped, and restored stopped.
        if self.is_frozen() {
            return Err(Failed::Other(
                "the worker's tasks are frozen (its lease ran out); try again once it renewed it"
                    .into(),
            ));
        }
        // A command's checkpoint and a spot notice's may meet: one dump at a time.
        let criu_turn = self.criu_lock.lock().await;
        let pid = match self.tasks().get(&task) {
            None => return Err(format!("no task {task:?} on this worker").into()),
            Some(t) if t.checkpointed => {
                return Err(format!(
                    "task {task:?} was stopped by a checkpoint and no longer runs here"
                )
                .into())
            }
            Some(t) => t.pid,
        };
        let dir = match &self.opts.shared_storage {
            Some(shared) => shared.join(&self.opts.job),
            None => self.checkpoints_dir(),
        };
        create_dir(&dir)?;
        if !leave_running {
            if let Some(t) = self.tasks().get_mut(&task) {
                t.checkpointed = true;
            }
        }
        if let Some(store) = self.opts.store.clone() {
            return self
                .checkpoint_to_store(task, pid, leave_running, store, files_copy, criu_turn, how)
                .await;
        }
        let opts = DumpOptions {
            pid,
            dir: dir.clone(),
            leave_running,
            compression,
            criu: how.criu,
            staging: None,
            // The task's files travel with it.
            files: Some(self.opts.work_dir.clone()),
            files_exclude: vec![CHECKPOINTS_DIR.into(), TASKS_DIR.into()],
            files_copy,
            sync: true,
        };
        // Into the shared folder as a file, or streamed into the object store as it is made
        // (the tree stays frozen until the object is stored).
        let (sink, cleaned) = match &self.opts.shared_storage {
            Some(_) => (None, None),
            None => {
                let (upload, cleaned) =
                    self.checkpoints
                        .upload(&self.opts.job, self.naming.clone(), chunks);
                (Some(Box::new(upload) as Box<dyn Sink>), Some(cleaned))
            }
        };
        let criu = self.criu.clone();
        let dumped =
            tokio::task::spawn_blocking(move || dump::dump_into(&criu, &opts, sink, &NoProgress))
                .await;
        // An abandoned upload's chunks are purged before the reply.
        if let Some(cleaned) = cleaned {
            let _ = cleaned.await;
        }
        let out = match dumped {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => {
                if let Some(t) = self.tasks().get_mut(&task) {
                    t.checkpointed = false;
                }
                return Err(e.into());
            }
            Err(e) => return Err(e.to_string().into()),
        };
        drop(criu_turn);
        let object = match out.object {
            Some(object) => object,
            None => {
                let file_name = out
                    .archive
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                format!("{}/{file_name}", self.opts.job)
            }
        };
        info!(task = %task, object = %object, bytes = out.archive_bytes, "checkpoint stored");
        Ok(Reply::Checkpointed {
            task,
            object,
            bytes: out.archive_bytes,
            criu_ms: out.criu_time.as_millis() as u64,
            post_copy: false,
            manifest: Some(out.manifest_sha256),
        })
    }

    /// [`Self::checkpoint`] into the job's store: the task runs again (or is stopped, frozen
    /// until the checkpoint is stored) once CRIU is done; the rest happens after.
    #[allow(clippy::too_many_arguments)]
    async fn checkpoint_to_store(
        self: &Arc<Self>,
        task: String,
        pid: i32,
        leave_running: bool,
        store: cedana_store::StoreUrl,
        files_copy: Vec<PathBuf>,
        criu_turn: tokio::sync::MutexGuard<'_, ()>,
        how: How,
    ) -> Result<Reply, Failed> {
        let dir = self.checkpoints_dir();
        create_dir(&dir)?;
        let opts = DumpOptions {
            pid,
            dir,
            leave_running,
            compression: Compression::Zstd,
            criu: how.criu,
            staging: None,
            files: Some(self.opts.work_dir.clone()),
            files_exclude: vec![CHECKPOINTS_DIR.into(), TASKS_DIR.into()],
            files_copy,
            sync: true,
        };
        let criu = self.criu.clone();
        let rt = tokio::runtime::Handle::current();
        if how.post_copy {
            return self
                .checkpoint_post_copy(task, opts, store, criu_turn)
                .await;
        }
        let out = tokio::task::spawn_blocking(move || {
            crate::chunked::dump_to_store(
                &criu,
                &opts,
                &store,
                crate::chunked::DEFAULT_LEVEL,
                &rt,
                &NoProgress,
            )
        })
        .await
        .map_err(|e| e.to_string())?;
        drop(criu_turn);
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                if let Some(t) = self.tasks().get_mut(&task) {
                    t.checkpointed = false;
                }
                return Err(e.into());
            }
        };
        info!(task = %task, name = %out.name, chunks = out.uploaded.chunks,
            sent = out.uploaded.chunks_sent, frozen = ?out.frozen_time, "checkpoint stored");
        Ok(Reply::Checkpointed {
            task,
            object: out.name,
            bytes: out.uploaded.stored_sent,
            criu_ms: out.frozen_time.as_millis() as u64,
            post_copy: false,
            manifest: None,
        })
    }

    /// [`Self::checkpoint_to_store`] for a move (post-copy): answered once the manifest is
    /// published ahead of its chunks (the task is gone from here then); the chunks follow, and
    /// [`Event::CheckpointStored`] tells how that ended.
    async fn checkpoint_post_copy(
        self: &Arc<Self>,
        task: String,
        opts: DumpOptions,
        store: cedana_store::StoreUrl,
        criu_turn: tokio::sync::MutexGuard<'_, ()>,
    ) -> Result<Reply, Failed> {
        let (tx, rx) = tokio::sync::oneshot::channel::<String>();
        let criu = self.criu.clone();
        let rt = tokio::runtime::Handle::current();
        let t0 = std::time::Instant::now();
        let storing = tokio::task::spawn_blocking(move || {
            crate::chunked::dump_to_store_post_copy(
                &criu,
                &opts,
                &store,
                crate::chunked::DEFAULT_LEVEL,
                &rt,
                &NoProgress,
                Box::new(move |name: &str| {
                    let _ = tx.send(name.to_string());
                }),
            )
        });
        let name = match rx.await {
            Ok(name) => name,
            // Failed before its manifest was published: the task runs on, as for any failed
            // checkpoint.
            Err(_) => {
                let out = storing.await.map_err(|e| e.to_string())?;
                drop(criu_turn);
                if let Some(t) = self.tasks().get_mut(&task) {
                    t.checkpointed = false;
                }
                return Err(match out {
                    Err(e) => e.into(),
                    Ok(_) => "the checkpoint was stored without being published"
                        .to_string()
                        .into(),
                });
            }
        };
        drop(criu_turn);
        let published_ms = t0.elapsed().as_millis() as u64;
        let (me, t, object) = (self.clone(), task.clone(), name.clone());
        tokio::spawn(async move {
            let (bytes, error) = match storing.await {
                Ok(Ok(out)) => {
                    info!(task = %t, name = %out.name, chunks = out.uploaded.chunks,
                        sent = out.uploaded.chunks_sent, "post-copy checkpoint stored");
                    (out.uploaded.stored_sent, None)
                }
                Ok(Err(e)) => {
                    error!(task = %t, name = %object, error = %e, "post-copy checkpoint failed after it was published");
                    (0, Some(e.to_string()))
                }
                Err(e) => (0, Some(e.to_string())),
            };
            me.events
                .publish(Event::CheckpointStored {
                    task: t,
                    object,
                    bytes,
                    error,
                })
                .await;
        });
        info!(task = %task, name = %name, ms = published_ms, "post-copy checkpoint published; its chunks follow");
        Ok(Reply::Checkpointed {
            task,
            object: name,
            bytes: 0,
            criu_ms: published_ms,
            post_copy: true,
            manifest: None,
        })
    }

    async fn restore(
        self: &Arc<Self>,
        task: String,
        object: String,
        pending: bool,
        manifest: Option<String>,
    ) -> Result<Reply, String> {
        self.not_running(&task)?;
        if !object.split('/').all(protocol::valid_object_part) {
            return Err(format!("checkpoint name {object:?} is not usable"));
        }
        let staging = self.checkpoints_dir();
        create_dir(&staging)?;
        if let Some(store) = self.opts.store.clone() {
            return self
                .restore_from_store(task, object, store, staging, pending)
                .await;
        }
        let t0 = std::time::Instant::now();
        // Verified and extracted (into a private folder inside the work folder, so carried
        // files are renamed into place) from the shared folder's file, or from the object store
        // as it arrives; nothing else is touched until then.
        let mut opts = RestoreOptions {
            archive: PathBuf::from(&object),
            staging: Some(staging.clone()),
            as_child: true,
            files_to: Some(self.opts.work_dir.clone()),
            criu: task_restore_criu(),
        };
        let extracted = match &self.opts.shared_storage {
            Some(shared) => {
                opts.archive = shared.join(&object);
                let (path, staging) = (opts.archive.clone(), staging.clone());
                tokio::task::spawn_blocking(move || extract_file(&path, &staging))
                    .await
                    .map_err(|e| e.to_string())?
                    .map(|x| (x, false))
                    .map_err(|e| e.to_string())?
            }
            None => receive(&self.checkpoints, &self.prefetches, &object, &staging).await?,
        };
        let read_while_stored = extracted.1;
        let extracted = extracted.0;
        // The checkpoint its worker stored, not one put in its place since.
        if let Some(want) = &manifest {
            extracted
                .check_manifest(Path::new(&object), want)
                .map_err(|e| e.to_string())?;
        }
        // Where the task's log stands at the checkpoint, measured before CRIU resumes the task:
        // all it writes from then on is streamed, its first line too (measured after the
        // restore, a line the task wrote at once was lost). The log as carried in the
        // checkpoint when it is (it is put back before CRIU runs), else as it is here.
        let log = self.log_path(&task);
        let log_name = format!("{task}.log");
        let carried = extracted
            .manifest
            .files
            .as_ref()
            .is_some_and(|f| f.items.iter().any(|i| i.path == log_name));
        let offset = if carried {
            extracted.files_dir().join(&log_name)
        } else {
            log.clone()
        };
        let offset = std::fs::metadata(&offset).map(|m| m.len()).unwrap_or(0);
        let verify_time = t0.elapsed();
        let failed_log = match &self.opts.shared_storage {
            Some(_) => restore::failed_log_path(&opts.archive),
            None => staging.join(format!(
                "{}.restore-failed.log",
                object.rsplit('/').next().unwrap_or("checkpoint")
            )),
        };
        let criu_turn = self.criu_lock.lock().await;
        let criu = self.criu.clone();
        let out = tokio::task::spawn_blocking(move || {
            restore::restore_extracted(
                &criu,
                extracted,
                &opts,
                verify_time,
                &failed_log,
                &NoProgress,
            )
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        self.track(task.clone(), out.pid, log, offset);
        drop(criu_turn);
        Ok(Reply::Restored {
            task,
            pid: out.pid,
            read_while_stored,
            lazy: false,
        })
    }

    /// [`Self::restore`] of checkpoint `name` from the job's store.
    async fn restore_from_store(
        self: &Arc<Self>,
        task: String,
        name: String,
        store: cedana_store::StoreUrl,
        staging: PathBuf,
        pending: bool,
    ) -> Result<Reply, String> {
        let log = self.log_path(&task);
        let opts = RestoreOptions {
            archive: PathBuf::from(&name),
            staging: Some(staging),
            as_child: true,
            files_to: Some(self.opts.work_dir.clone()),
            criu: task_restore_criu(),
        };
        let criu_turn = self.criu_lock.lock().await;
        let criu = self.criu.clone();
        let rt = tokio::runtime::Handle::current();
        // Where the task's log stands at the checkpoint: the carried log's size, read from the
        // manifest before CRIU resumes the task (see `restore`).
        let log_name = format!("{task}.log");
        let local_log = log.clone();
        let full = self.opts.full_restore;
        let restored = tokio::task::spawn_blocking(move || {
            let failed_log = opts
                .staging
                .clone()
                .unwrap_or_default()
                .join(format!("{name}.restore-failed.log"));
            let st =
                cedana_store::Store::open(&store).map_err(|e| Refused::Other(e.to_string()))?;
            let manifest = match pending {
                true => crate::chunked::read_pending_manifest(&st, &name, &rt),
                false => crate::chunked::read_manifest(&st, &name, &rt),
            }
            .map_err(|e| match bad_checkpoint(&e) {
                true => Refused::Checkpoint(e.to_string()),
                false => Refused::Other(e.to_string()),
            })?;
            let carried = format!("{}/{log_name}", crate::files::FILES_DIR);
            let offset = manifest
                .entries
                .iter()
                .find(|e| e.name == carried)
                .map(|e| e.size)
                .unwrap_or_else(|| std::fs::metadata(&local_log).map_or(0, |m| m.len()));
            let opts = RestoreOptions {
                archive: PathBuf::from(format!("{store}/{name}")),
                ..opts
            };
            let source = Arc::new(match pending {
                true => {
                    crate::lazy::StoreSource::pending(st, &name, rt, post_copy_wait(), &manifest)
                }
                false => crate::lazy::StoreSource::new(st, &name, rt),
            });
            let root = opts.staging.clone().unwrap_or_default();
            crate::lazy::restore_as(
                &criu,
                source,
                manifest,
                &root,
                &opts,
                &failed_log,
                &NoProgress,
                full,
            )
            .map(|r| (r, offset))
            .map_err(|e| match bad_checkpoint(&e) {
                true => Refused::Checkpoint(e.to_string()),
                false => Refused::Other(e.to_string()),
            })
        })
        .await
        .map_err(|e| e.to_string())?;
        let restored = match restored {
            Ok(r) => r,
            Err(Refused::Checkpoint(message)) => return Ok(Reply::BadCheckpoint { task, message }),
            Err(Refused::Other(message)) => return Err(message),
        };
        let (restored, offset) = restored;
        let pid = restored.outcome.pid;
        if let Some(serving) = &restored.serving {
            // Said with the task's exit: set before the task is ended.
            let (failures, t) = (self.restore_failures.clone(), task.clone());
            serving.on_failure(move |e| {
                failures
                    .lock()
                    .expect("not poisoned")
                    .insert(t.clone(), e.to_string());
            });
        }
        self.track(task.clone(), pid, log, offset);
        drop(criu_turn);
        let lazy = restored.serving.is_some();
        if let Some(serving) = restored.serving {
            // The task runs; its memory follows. A failure has ended it (its end is reported
            // as any task's); the reason goes to the log.
            let t = task.clone();
            std::thread::spawn(move || match serving.wait() {
                Ok(s) => {
                    info!(task = %t, pid, resident_ms = s.resident_time.as_millis() as u64, requests = s.requests, "all the restored task's memory is back")
                }
                Err(e) => {
                    error!(task = %t, pid, error = %e, "lazy restore failed: the task was ended")
                }
            });
        }
        Ok(Reply::Restored {
            task,
            pid,
            read_while_stored: false,
            lazy,
        })
    }

    /// Starts reading the checkpoint whose chunks are `chunks` while another worker stores it
    /// (see [`Command::Prefetch`] and [`super::prefetch`]): verified and extracted as it
    /// arrives into the staging folder, finished once a restore hands over the stored object's
    /// info.
    fn prefetch(self: &Arc<Self>, chunks: String) -> Result<Reply, String> {
        check_chunks_id(&chunks)?;
        // From a store a restore reads only the chunks this worker lacks: nothing to do now.
        if self.opts.store.is_some() {
            return Ok(Reply::Prefetching { chunks });
        }
        if self.opts.shared_storage.is_some() {
            return Err("this worker reads checkpoints from shared storage, not the object store; nothing to prefetch".into());
        }
        let staging = self.checkpoints_dir();
        create_dir(&staging)?;
        self.prefetches.start(&self.checkpoints, &chunks, staging);
        Ok(Reply::Prefetching { chunks })
    }
}

/// Why a restore from a store failed: the checkpoint itself (missing or damaged), or anything
/// else.
enum Refused {
    Checkpoint(String),
    Other(String),
}

/// Whether a restore failed on the checkpoint itself (a chunk or manifest missing or damaged):
/// an earlier checkpoint may restore.
/// CRIU options of a task's checkpoint when the command names none: its TCP connections are
/// left out, so a task with a client connected (a notebook's browser, a database's client) or
/// a connection of its own (a metrics service) is checkpointed, and they come back closed
/// wherever it is restored (its peers reconnect); a worker's address is never another's.
pub(crate) fn task_criu_options() -> CriuOptions {
    CriuOptions {
        tcp: TcpMode::Close,
        ..CriuOptions::default()
    }
}

/// How a task is checkpointed: CRIU's options, and whether as a move (post-copy).
#[derive(Clone, Debug)]
pub(crate) struct How {
    pub criu: CriuOptions,
    pub post_copy: bool,
}

/// How long a post-copy restore waits for a chunk still being stored
/// (`CEDANA_POST_COPY_WAIT_SECS`, default 120): past it the source is taken for lost and the
/// task is ended.
fn post_copy_wait() -> Duration {
    Duration::from_secs(
        std::env::var("CEDANA_POST_COPY_WAIT_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(120),
    )
}

/// Restores on a worker bring established connections back closed (see
/// [`task_criu_options`]).
fn task_restore_criu() -> RestoreCriu {
    RestoreCriu {
        tcp_close: true,
        ..Default::default()
    }
}

fn bad_checkpoint(e: &RestoreError) -> bool {
    use crate::archive::ArchiveError as A;
    use cedana_store::StoreError as S;
    use RestoreError as R;
    match e {
        R::Chunk(c) => c.trouble != crate::lazy::ChunkTrouble::Unreachable,
        R::Store(s) => matches!(
            **s,
            S::MissingChunk { .. }
                | S::BadChunk { .. }
                | S::BadManifest { .. }
                | S::NoCheckpoint { .. }
        ),
        R::Archive(a) => !matches!(
            a,
            A::Write { .. } | A::NoRoom { .. } | A::TooLarge { .. } | A::Open { .. }
        ),
        R::NoCpuInfo { .. } => true,
        _ => false,
    }
}

/// Why a checkpoint failed: a carried file written in place while it was stored (worth taking
/// again, copying that file), or anything else.
enum Failed {
    Changed(PathBuf, String),
    Other(String),
}

impl From<String> for Failed {
    fn from(s: String) -> Self {
        Failed::Other(s)
    }
}

impl From<dump::DumpError> for Failed {
    fn from(e: dump::DumpError) -> Self {
        match e {
            dump::DumpError::Files(crate::files::FilesError::Changed { ref path }) => {
                Failed::Changed(path.clone(), e.to_string())
            }
            e => Failed::Other(e.to_string()),
        }
    }
}

/// A command's chunks id, or the error that says what it must be.
fn check_chunks_id(chunks: &str) -> Result<(), String> {
    match protocol::valid_chunks_id(chunks) {
        true => Ok(()),
        false => Err(format!(
            "chunks id {chunks:?} is not usable: use 16 to 64 letters and digits"
        )),
    }
}

/// The most of a `sh` command's stdout (and of its stderr) a reply carries: the last bytes,
/// so that a reply stays far under a NATS server's message limit.
pub const SH_OUTPUT_MAX: usize = 256 << 10;

/// A stream of a `sh` command, read on a thread into a buffer that keeps its last
/// [`SH_OUTPUT_MAX`] bytes.
struct ShOutput {
    buf: Arc<Mutex<(Vec<u8>, u64)>>,
    done: Arc<std::sync::atomic::AtomicBool>,
}

impl ShOutput {
    fn follow(stream: Option<impl std::io::Read + Send + 'static>) -> Self {
        let buf = Arc::new(Mutex::new((Vec::new(), 0u64)));
        let done = Arc::new(std::sync::atomic::AtomicBool::new(stream.is_none()));
        if let Some(mut stream) = stream {
            let (b, d) = (buf.clone(), done.clone());
            std::thread::spawn(move || {
                let mut chunk = vec![0u8; 64 << 10];
                while let Ok(n) = stream.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    let mut g = b.lock().expect("sh output");
                    g.0.extend_from_slice(&chunk[..n]);
                    if g.0.len() > SH_OUTPUT_MAX {
                        let cut = g.0.len() - SH_OUTPUT_MAX;
                        g.0.drain(..cut);
                        g.1 += cut as u64;
                    }
                }
                d.store(true, std::sync::atomic::Ordering::SeqCst);
            });
        }
        ShOutput { buf, done }
    }

    fn done(&self) -> bool {
        self.done.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// What was read so far, with a note of what was dropped from its front.
    fn text(&self) -> String {
        let g = self.buf.lock().expect("sh output");
        let text = String::from_utf8_lossy(&g.0).into_owned();
        match g.1 {
            0 => text,
            dropped => format!("[{dropped} bytes before this were dropped]\n{text}"),
        }
    }
}

/// Sends `sig` to `pid` and every process under it (twice over: a process that forked
/// meanwhile is caught the second time).
fn signal_tree(pid: i32, sig: nix::sys::signal::Signal) {
    for _ in 0..2 {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        let parents: Vec<(i32, i32)> = std::fs::read_dir("/proc")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| {
                        let p: i32 = e.file_name().to_str()?.parse().ok()?;
                        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
                        let ppid = stat
                            .rsplit_once(')')?
                            .1
                            .split_whitespace()
                            .nth(1)?
                            .parse()
                            .ok()?;
                        Some((p, ppid))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut frontier = vec![pid];
        let mut seen = 0usize;
        while let Some(p) = frontier.pop() {
            for (child, _) in parents.iter().filter(|(_, pp)| *pp == p) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*child), sig);
                frontier.push(*child);
                seen += 1;
                if seen > 100_000 {
                    return;
                }
            }
        }
    }
}

/// A task as its file in [`TASKS_DIR`] has it.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct TaskFile {
    task: String,
    pid: i32,
    /// When the process started (clock ticks after boot, `/proc/PID/stat`): a PID is reused.
    start_time: u64,
}

/// Writes `bytes` to `path` whole (a temporary file renamed over it).
fn write_file(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Kills `pid` (SIGKILL); one already gone is no error.
fn kill(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Creates the folder `dir` (and its parents), or says it cannot.
fn create_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))
}
