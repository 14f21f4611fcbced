//! The managed flow: for a job that only defines hooks (a Rhai script with `setup`, `work` and
//! `restored_task`, or a YAML job spec). The driver launches a worker, runs `setup` and `work`
//! (which starts the task), checkpoints the task every interval, and when the worker is lost
//! launches another, restores the newest checkpoint there and runs `restored_task`. It also
//! serves `checkpoint`, `migrate` and `down` from the command line.
//!
//! Invariant: a failed checkpoint never replaces the newest good one; recovery always restores
//! the newest checkpoint that succeeded.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::coord::control::{Action, Answer, Pending};
use crate::coord::Exit;
use crate::job::policy::{Overheads, Policy, PolicyOptions};
use crate::job::record::{JobState, WorkerState};
use crate::job::{Checkpoint, Job, JobError, Spec, Task, Worker};

/// A job's hooks.
pub trait Hooks {
    /// What the job's workers need.
    fn spec(&mut self) -> Result<Spec, FlowError>;
    /// Prepares a new worker (every worker, the first and those that replace a lost one).
    fn setup(&mut self, job: &Shared, w: &Worker) -> Result<(), FlowError>;
    /// Starts the task on the first worker.
    fn work(&mut self, job: &Shared, w: &Worker) -> Result<Task, FlowError>;
    /// Runs after the task was restored on a new worker.
    fn restored_task(&mut self, job: &Shared, w: &Worker, t: &Task) -> Result<(), FlowError>;
}

/// The job, shared with the script engine.
pub type Shared = Rc<RefCell<Job>>;

/// Errors that end a managed job.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    /// The job file's own error (a Rhai script's, with file, line and column), from the layer
    /// above through the hooks.
    #[error(transparent)]
    JobFile(Box<dyn std::error::Error + Send + Sync + 'static>),
    #[error(transparent)]
    Job(#[from] JobError),
    #[error("{what} failed: {message}")]
    Hook { what: String, message: String },
    #[error("worker lost {attempts} times in a row while recovering; giving up (last: {last})")]
    Recovery { attempts: u32, last: String },
}

/// How the managed flow runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Checkpoint the task this often (`checkpoint.heartbeat_interval_seconds`); `None`: never
    /// on a timer.
    pub interval: Option<Duration>,
    /// Newest checkpoints kept in the store; older ones are deleted.
    pub keep: usize,
    /// Attempts at bringing the task back after a worker is lost.
    pub attempts: u32,
    /// Move the job to cheaper offers (off when `None`).
    pub arbitrage: Option<Arbitrage>,
    /// Learn from preemptions ([`super::policy::PolicyOptions::adaptive`]).
    pub adaptive: bool,
    /// Wait this long for spot capacity before on-demand ([`PolicyOptions::wait_for_spot`]).
    pub wait_for_spot: Option<Duration>,
}

impl Options {
    /// The decisions these options ask for.
    pub fn policy(&self) -> PolicyOptions {
        PolicyOptions {
            interval: self.interval,
            arbitrage: self.arbitrage.clone(),
            adaptive: self.adaptive,
            wait_for_spot: self.wait_for_spot,
            overheads: Overheads::default(),
        }
    }
}

pub use super::policy::{Arbitrage, AVOID_AFTER_NOTICE};

/// Runs the flow to the task's end; returns its exit status. With `resumed`, the job's
/// record is that of a driver that died and its workers were adopted
/// ([`Job::adopt_workers`]): the flow goes on from where the task is now ([`pick_up`]).
pub fn run(
    job: &Shared,
    hooks: &mut dyn Hooks,
    opts: &Options,
    control: &std::sync::mpsc::Receiver<Pending>,
    resumed: bool,
) -> Result<i64, FlowError> {
    let spec = hooks.spec()?;
    job.borrow_mut().policy = Policy::new(opts.policy());
    let mut newest: Option<Checkpoint> = None;
    let (mut w, mut task) = if resumed {
        newest = job.borrow().record.checkpoints.last().map(Checkpoint::from);
        match pick_up(job)? {
            Some(found) => found,
            None => {
                // The task is nowhere: a move its controller did not finish (the task was
                // stopped for the checkpoint) or a worker lost meanwhile.
                job.borrow().reporter.note(&format!(
                    "the task runs on no worker; recovering from {}",
                    newest
                        .as_ref()
                        .map(|c| c.object.as_str())
                        .unwrap_or("the start (no checkpoint yet)")
                ));
                {
                    let mut j = job.borrow_mut();
                    j.record.recoveries += 1;
                    j.set_state(JobState::Recovering);
                }
                bring_up(job, hooks, &spec, &mut newest)?
            }
        }
    } else {
        bring_up(job, hooks, &spec, &mut None)?
    };
    job.borrow_mut().set_state(JobState::Running);
    let mut next = next_checkpoint(job, &w);
    let mut next_pricing = opts.arbitrage.as_ref().map(|a| Instant::now() + a.every);
    let mut noticed = std::collections::BTreeSet::new();
    loop {
        let exit = job.borrow().coord.exit_of(&task.worker, &task.name);
        // A lazily restored task ended by its worker: part of its memory could not be had
        // from the checkpoint (a chunk failed its check, the store stopped answering). The
        // task did not fail: it comes back from the checkpoint before that one (or the start)
        // on a new worker, and the one that failed is not used again.
        if let Some(reason) = exit.as_ref().and_then(|e| e.restore_failed.clone()) {
            warn!(worker = %w.id, %reason, "the task's lazy restore failed");
            // The checkpoint it was restored from (a move's, or a recovery's).
            let failed = job
                .borrow()
                .restored_from
                .get(&task.name)
                .cloned()
                .or_else(|| newest.as_ref().map(|c| c.object.clone()))
                .unwrap_or_default();
            newest = drop_checkpoint(job, &failed, &reason);
            {
                let mut j = job.borrow_mut();
                j.end_worker(&w.id, WorkerState::Terminated);
                j.record.recoveries += 1;
                j.set_state(JobState::Recovering);
            }
            (w, task) = bring_up(job, hooks, &spec, &mut newest)?;
            job.borrow_mut().set_state(JobState::Running);
            next = next_checkpoint(job, &w);
            continue;
        }
        if let Some(e) = exit {
            return Ok(status(e));
        }
        if job.borrow().down.is_set() {
            return Err(JobError::Down.into());
        }
        // Not in charge (the controller lease could not be renewed): nothing is done to the
        // job until it is again, or until another controller took it over.
        if !job.borrow().coord.in_charge() {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let lost = job.borrow().lost(&w.id);
        if let Some(reason) = lost {
            info!(worker = %w.id, %reason, "worker lost; recovering from the newest checkpoint");
            job.borrow().reporter.note(&format!(
                "worker {} lost ({reason}); recovering from {}",
                w.id,
                newest
                    .as_ref()
                    .map(|c| c.object.as_str())
                    .unwrap_or("the start (no checkpoint yet)")
            ));
            {
                let mut j = job.borrow_mut();
                if let Some(o) = j.offer_of(&w.id) {
                    let now = j.now();
                    j.policy.preempted(&o, now);
                }
                j.end_worker(&w.id, WorkerState::Lost);
                j.record.recoveries += 1;
                j.set_state(JobState::Recovering);
            }
            (w, task) = bring_up(job, hooks, &spec, &mut newest)?;
            job.borrow_mut().set_state(JobState::Running);
            next = next_checkpoint(job, &w);
            continue;
        }
        // A spot interruption notice: the worker goes in about two minutes. Its checkpoint is
        // the safety net; the task moves now with a fresh one (no work lost), and if the
        // worker is gone first the next turn recovers from the notice's checkpoint.
        let notice = job.borrow().coord.interruption(&w.id);
        if let Some(n) = notice.filter(|_| !noticed.contains(&w.id)) {
            noticed.insert(w.id.clone());
            if let Some(sc) = n.checkpoints.iter().find(|c| c.task == task.name) {
                let c = Checkpoint {
                    object: sc.object.clone(),
                    task: task.name.clone(),
                    manifest: sc.manifest.clone(),
                };
                job.borrow_mut().record_checkpoint(&c, &w.id);
                newest = Some(c);
            }
            job.borrow().reporter.note(&format!(
                "spot interruption notice for worker {} (instance goes at {}); moving the task",
                w.id,
                n.at.as_deref().unwrap_or("an unknown time")
            ));
            job.borrow_mut().record.spot_notices += 1;
            // The next worker goes elsewhere: this market just took one back.
            let interrupted = job.borrow().offer_of(&w.id);
            if let Some(o) = interrupted {
                let mut j = job.borrow_mut();
                let now = j.now();
                j.policy.preempted(&o, now);
            }
            if let Err(e) = migrate(job, hooks, &spec, &mut w, &mut task, None, newest.as_ref()) {
                info!(error = %e, "moving the task after a spot notice failed; recovering if the worker goes");
                job.borrow().reporter.note(&format!("moving the task failed ({e}); it is recovered from the notice's checkpoint when the worker goes"));
            }
            next = next_checkpoint(job, &w);
            continue;
        }
        while let Ok((action, answer)) = control.try_recv() {
            let reply = match action {
                Action::Checkpoint => match take_checkpoint(job, &task, &mut newest, opts) {
                    Ok(c) => ok(format!("checkpoint {}", c.object)),
                    Err(e) => fail(e.to_string()),
                },
                Action::Migrate => {
                    match migrate(job, hooks, &spec, &mut w, &mut task, None, newest.as_ref()) {
                        Ok(()) => ok(format!("task {} now runs on worker {}", task.name, w.id)),
                        Err(e) => fail(e.to_string()),
                    }
                }
                Action::Down => ok("taking the job down".into()),
            };
            let _ = answer.send(reply);
        }
        if let (Some(a), Some(at)) = (&opts.arbitrage, next_pricing) {
            if Instant::now() >= at {
                if let Some(better) = cheaper_offer(job, &spec, &w) {
                    let (from, among) = better;
                    let to = &among[0];
                    info!(from = %offer_name(&from), to = %offer_name(to), "moving to a cheaper offer");
                    job.borrow().reporter.note(&format!(
                        "{} at ${:.4}/h is more than {:.0}% cheaper than {} at ${:.4}/h; moving the task",
                        offer_name(to),
                        to.price_usd_hour,
                        a.margin * 100.0,
                        offer_name(&from),
                        from.price_usd_hour
                    ));
                    match migrate(
                        job,
                        hooks,
                        &spec,
                        &mut w,
                        &mut task,
                        Some(&among),
                        newest.as_ref(),
                    ) {
                        Ok(()) => job.borrow_mut().record.arbitrage_moves += 1,
                        Err(e) => {
                            info!(error = %e, "moving to a cheaper offer failed; staying");
                            job.borrow().reporter.note(&format!("moving to the cheaper offer failed ({e}); the task stays where it was"));
                        }
                    }
                    next = next_checkpoint(job, &w);
                }
                next_pricing = Some(Instant::now() + a.every);
            }
        }
        if next.is_some_and(|n| Instant::now() >= n) {
            // A failure keeps the previous checkpoint; a lost worker is seen on the next turn.
            if let Err(e) = take_checkpoint(job, &task, &mut newest, opts) {
                info!(error = %e, "periodic checkpoint failed; the previous one is kept");
                job.borrow().reporter.note(&format!(
                    "checkpoint failed ({e}); keeping the previous one"
                ));
            }
            next = next_checkpoint(job, &w);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Where a resumed job's task is: the worker that runs it (asked, not guessed from the
/// record: the driver may have died halfway through a move), or whose agent reported its
/// exit meanwhile. Workers that do not have it (a move's new worker that got nothing yet)
/// are ended; a second copy (a move's restore not yet recorded) is stopped, the newest worker
/// keeping its own. `None`: the task runs nowhere.
fn pick_up(job: &Shared) -> Result<Option<(Worker, Task)>, FlowError> {
    let Some(t) = job.borrow().record.task.clone() else {
        return Ok(None);
    };
    let ids: Vec<String> = job.borrow().workers.keys().cloned().collect();
    let mut holders = Vec::new();
    for id in &ids {
        let exited = job.borrow().coord.exit_of(id, &t.name).is_some();
        if exited && *id == t.worker {
            holders.push(id.clone());
            continue;
        }
        if job.borrow().lost(id).is_some() {
            continue;
        }
        let tasks = job.borrow().tasks_on(id);
        match tasks {
            Some(tasks) if tasks.iter().any(|r| r.task == t.name) => holders.push(id.clone()),
            // A worker whose agent does not answer: the flow sees it lost if it stays so.
            None if *id == t.worker => holders.push(id.clone()),
            _ => {}
        }
    }
    // Newest worker first (ids count up: w10 after w9).
    holders.sort_by_key(|id| std::cmp::Reverse(id[1..].parse::<u32>().unwrap_or(0)));
    let keep = holders.first().cloned();
    for id in ids {
        if Some(&id) == keep.as_ref() {
            continue;
        }
        if holders.contains(&id) {
            warn!(worker = %id, task = %t.name, "a second copy of the task; stopping it");
            let _ = job.borrow().stop(&Task {
                name: t.name.clone(),
                worker: id.clone(),
            });
        }
        let how = if job.borrow().lost(&id).is_some() {
            WorkerState::Lost
        } else {
            WorkerState::Terminated
        };
        info!(worker = %id, "ending a worker the task does not run on");
        job.borrow_mut().end_worker(&id, how);
    }
    Ok(keep.map(|id| {
        if id != t.worker {
            job.borrow().reporter.note(&format!(
                "task {} runs on worker {id} (a move finished while no controller ran)",
                t.name
            ));
            let mut j = job.borrow_mut();
            j.record.task = Some(crate::job::record::TaskInfo {
                worker: id.clone(),
                ..t.clone()
            });
            j.record.migrations += 1;
            j.save();
        }
        (
            Worker { id: id.clone() },
            Task {
                name: t.name.clone(),
                worker: id,
            },
        )
    }))
}

/// `provider type place market`, for messages.
pub fn offer_name(o: &crate::providers::Offer) -> String {
    o.name()
}

/// When the next periodic checkpoint is due for the task on `w` ([`Policy::checkpoint_interval`]).
fn next_checkpoint(job: &Shared, w: &Worker) -> Option<Instant> {
    let j = job.borrow();
    let offer = j.offer_of(&w.id);
    j.policy
        .checkpoint_interval(j.now(), offer.as_ref())
        .map(|i| Instant::now() + i)
}

/// The offers to move to from the one `w` runs on (at its price now), if the policy would
/// move ([`Policy::moves`]): (the current offer as priced now, the offers to move to).
fn cheaper_offer(
    job: &Shared,
    spec: &Spec,
    w: &Worker,
) -> Option<(crate::providers::Offer, Vec<crate::providers::Offer>)> {
    let current = job.borrow().offer_of(&w.id)?;
    let (offers, _) = job.borrow_mut().offers(spec);
    // The current offer's price now, if it is still offered; else the price it launched at.
    let current = offers
        .iter()
        .find(|o| crate::job::same_offer(o, &current))
        .cloned()
        .unwrap_or(current);
    let j = job.borrow();
    let to = j.policy.moves(j.now(), &current, &offers);
    (!to.is_empty()).then_some((current, to))
}

/// The task's exit status as a shell reports it.
pub fn status(e: Exit) -> i64 {
    e.code
        .map(i64::from)
        .unwrap_or(128 + e.signal.unwrap_or(0) as i64)
}

fn ok(message: String) -> Answer {
    Answer {
        v: cedana_protocol::VERSION,
        ok: true,
        message,
    }
}

fn fail(message: String) -> Answer {
    Answer {
        v: cedana_protocol::VERSION,
        ok: false,
        message,
    }
}

/// Launches a worker, runs `setup`, then starts the task (`work`) or restores `from` and runs
/// `restored_task`. A worker lost on the way is replaced, a few times at most.
fn bring_up(
    job: &Shared,
    hooks: &mut dyn Hooks,
    spec: &Spec,
    from: &mut Option<Checkpoint>,
) -> Result<(Worker, Task), FlowError> {
    let attempts = 3;
    let mut last = String::new();
    let mut attempt = 0;
    while attempt < attempts {
        attempt += 1;
        let w = job.borrow_mut().launch(spec)?;
        let result = (|| -> Result<Task, FlowError> {
            hooks.setup(job, &w)?;
            match from.as_ref() {
                None => hooks.work(job, &w),
                Some(c) => {
                    let t = job.borrow_mut().restore(c, &w)?;
                    hooks.restored_task(job, &w, &t)?;
                    Ok(t)
                }
            }
        })();
        match result {
            Ok(t) => {
                if from.is_some() {
                    info!(worker = %w.id, task = %t.name, "task restored");
                    job.borrow()
                        .reporter
                        .note(&format!("task {} restored on worker {}", t.name, w.id));
                }
                return Ok((w, t));
            }
            Err(FlowError::Job(JobError::BadCheckpoint {
                checkpoint,
                message,
                ..
            })) => {
                // Not the worker's fault: the checkpoint before (or the start) on a new one.
                job.borrow_mut().end_worker(&w.id, WorkerState::Terminated);
                *from = drop_checkpoint(job, &checkpoint, &message);
                attempt -= 1;
            }
            Err(e) => {
                let lost = job.borrow().lost(&w.id);
                match lost {
                    Some(reason) => {
                        warn!(worker = %w.id, %reason, attempt, "worker lost while starting");
                        last = format!("worker {}: {reason}", w.id);
                        job.borrow_mut().end_worker(&w.id, WorkerState::Lost);
                    }
                    None => {
                        job.borrow_mut().end_worker(&w.id, WorkerState::Terminated);
                        return Err(e);
                    }
                }
            }
        }
    }
    Err(FlowError::Recovery { attempts, last })
}

/// Checkpoint `failed` cannot be restored (`why`): it is no longer used, and the newest one
/// before it (none: the start) is returned, said.
fn drop_checkpoint(job: &Shared, failed: &str, why: &str) -> Option<Checkpoint> {
    let mut j = job.borrow_mut();
    j.record.checkpoints.retain(|c| c.object != failed);
    let before = j.record.checkpoints.last().map(Checkpoint::from);
    warn!(checkpoint = failed, %why, "a checkpoint cannot be restored; using the one before");
    j.reporter.note(&format!(
        "checkpoint {failed} cannot be restored ({why}); recovering from {}",
        before.as_ref().map_or("the start", |c| c.object.as_str())
    ));
    j.save();
    before
}

/// Checkpoints the task, leaving it running; keeps the newest `opts.keep` checkpoints.
fn take_checkpoint(
    job: &Shared,
    task: &Task,
    newest: &mut Option<Checkpoint>,
    opts: &Options,
) -> Result<Checkpoint, JobError> {
    job.borrow_mut().set_state(JobState::Checkpointing);
    let t0 = Instant::now();
    let result = job.borrow_mut().checkpoint(task, true);
    job.borrow_mut().set_state(JobState::Running);
    let c = result?;
    info!(object = %c.object, ms = t0.elapsed().as_millis() as u64, "checkpoint taken");
    *newest = Some(c.clone());
    job.borrow_mut().prune_checkpoints(opts.keep);
    Ok(c)
}

/// Moves the task to a new worker (on one of `among` when given, else the best offer):
/// launch, setup, checkpoint (stopping the task), restore there, `restored_task`, terminate
/// the old worker. If the new worker cannot take it, the task is restored where it was. If
/// the old worker is lost before its checkpoint (a spot notice's worker gone), the new worker
/// restores `newest` instead: it is up and set up, and another would take a start more.
fn migrate(
    job: &Shared,
    hooks: &mut dyn Hooks,
    spec: &Spec,
    w: &mut Worker,
    task: &mut Task,
    among: Option<&[crate::providers::Offer]>,
    newest: Option<&Checkpoint>,
) -> Result<(), FlowError> {
    job.borrow_mut().set_state(JobState::Migrating);
    let result = (|| -> Result<(), FlowError> {
        let to = job.borrow_mut().launch_among(spec, among)?;
        if let Err(e) = hooks.setup(job, &to) {
            job.borrow_mut().terminate(&to);
            return Err(e);
        }
        let stopped = Instant::now();
        let checkpoint = job.borrow_mut().checkpoint_for(task, false, Some(&to));
        let c = match checkpoint {
            Ok(c) => c,
            Err(e) => {
                let lost = job.borrow().lost(&w.id);
                if let (Some(reason), Some(c)) = (lost, newest) {
                    return recover_onto(job, hooks, spec, w, task, to, c, &reason);
                }
                // The task stays where it was: the new worker is not left running, and
                // billed, for nothing.
                job.borrow_mut().terminate(&to);
                return Err(e.into());
            }
        };
        let restored = job.borrow_mut().restore(&c, &to);
        let moved = match restored {
            Ok(t) => t,
            // A post-copy checkpoint the new worker could not read: the task is gone from the
            // old worker, so it comes back from the checkpoint before, as after a loss.
            Err(e) if job.borrow().is_pending_copy(&c.object) => {
                job.borrow_mut().abandon_copy();
                let reason = format!("the move's checkpoint {} cannot be read: {e}", c.object);
                warn!(%reason, "post-copy restore failed");
                let _ = drop_checkpoint(job, &c.object, &e.to_string());
                match newest {
                    Some(before) => {
                        return recover_onto(job, hooks, spec, w, task, to, before, &reason)
                    }
                    None => {
                        job.borrow_mut().terminate(&to);
                        return Err(e.into());
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "restore on the new worker failed; restoring where it was");
                job.borrow_mut().terminate(&to);
                let back = job.borrow_mut().restore(&c, w)?;
                *task = back;
                return Err(e.into());
            }
        };
        let stopped = stopped.elapsed();
        hooks.restored_task(job, &to, &moved)?;
        job.borrow().reporter.note(&format!(
            "task {} moved from worker {} to {} ({:.1} s stopped)",
            moved.name,
            w.id,
            to.id,
            stopped.as_secs_f64()
        ));
        // Post-copy: the old worker stays until the checkpoint is stored whole.
        job.borrow_mut().settle_copy();
        let old = std::mem::replace(w, to);
        job.borrow_mut().terminate(&old);
        job.borrow_mut().record.migrations += 1;
        *task = moved;
        Ok(())
    })();
    job.borrow_mut().set_state(JobState::Running);
    result
}

/// The worker `w` was lost while its task was being moved to `to` (up and set up): `c`, the
/// newest checkpoint, is restored there, as a recovery (or on another worker if that fails).
#[allow(clippy::too_many_arguments)]
fn recover_onto(
    job: &Shared,
    hooks: &mut dyn Hooks,
    spec: &Spec,
    w: &mut Worker,
    task: &mut Task,
    to: Worker,
    c: &Checkpoint,
    reason: &str,
) -> Result<(), FlowError> {
    info!(worker = %w.id, %reason, "worker lost while moving its task; restoring the newest checkpoint on the new worker");
    job.borrow().reporter.note(&format!(
        "worker {} lost while moving its task ({reason}); recovering from {} on worker {}",
        w.id, c.object, to.id
    ));
    {
        let mut j = job.borrow_mut();
        j.end_worker(&w.id, WorkerState::Lost);
        j.record.recoveries += 1;
    }
    let restored = job.borrow_mut().restore(c, &to);
    match restored {
        Ok(t) => {
            hooks.restored_task(job, &to, &t)?;
            *w = to;
            *task = t;
        }
        Err(e) => {
            warn!(error = %e, worker = %to.id, "restore on the new worker failed; recovering on another");
            job.borrow_mut().terminate(&to);
            (*w, *task) = bring_up(job, hooks, spec, &mut Some(c.clone()))?;
        }
    }
    Ok(())
}
