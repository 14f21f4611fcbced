//! `down` of a job whose controller died: what it left is found from its record and ended
//! here, by process ids checked against what they must be (a PID is reused): its tasks, the
//! workers' agent daemons, their network namespaces and containers, the embedded NATS
//! server. Its store stays in the job's folder.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::job::record::{JobRecord, JobState, WorkerState};
use crate::providers::local;

fn alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

/// Ends everything the job in `dir` left running; the record is marked `down`. Returns a
/// line per thing ended (or that could not be).
pub fn end(dir: &Path, record: &mut JobRecord) -> Vec<String> {
    let mut said = Vec::new();
    let job = record.job.clone();
    for w in record
        .workers
        .iter_mut()
        .filter(|w| w.state == WorkerState::Running)
    {
        if w.provider != local::NAME {
            // Cloud machines: `end_cloud`.
            continue;
        }
        if w.offer
            .as_ref()
            .is_some_and(|o| o.instance_type == "local-container")
        {
            let id = format!("cedana-{job}-{}", w.id);
            let root = dir.join("runc");
            let ok = std::process::Command::new("runc")
                .arg("--root")
                .arg(&root)
                .args(["delete", "--force", &id])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            said.push(if ok {
                format!("worker {}: container {id} deleted", w.id)
            } else {
                format!("worker {}: no container {id}", w.id)
            });
        } else if local::is_worker_daemon(w.pid, &job, &w.id) {
            // The tasks first (each is the first process of a PID namespace: its whole tree
            // goes with it), then the daemon.
            let tasks = crate::util::descendants(w.pid);
            for p in &tasks {
                let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
            }
            let _ = kill(Pid::from_raw(w.pid), Signal::SIGTERM);
            let start = Instant::now();
            while local::is_worker_daemon(w.pid, &job, &w.id)
                && start.elapsed() < Duration::from_secs(2)
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            if local::is_worker_daemon(w.pid, &job, &w.id) {
                let _ = kill(Pid::from_raw(w.pid), Signal::SIGKILL);
            }
            said.push(format!(
                "worker {}: agent (PID {}) and {} process{} of its tasks ended",
                w.id,
                w.pid,
                tasks.len(),
                if tasks.len() == 1 { "" } else { "es" }
            ));
        } else {
            said.push(format!("worker {}: its agent was already gone", w.id));
        }
        // A task left by an agent that died before it (reparented, no longer under it).
        if let Some(t) = record.task.as_ref().filter(|t| t.worker == w.id) {
            if t.pid > 0 && alive(t.pid) && works_in(t.pid, dir) {
                let _ = kill(Pid::from_raw(t.pid), Signal::SIGKILL);
                said.push(format!("task {} (PID {}) ended", t.name, t.pid));
            }
        }
        if let Some(ns) = &w.netns {
            if Path::new("/run/netns").join(ns).exists() {
                match local::netns::ip(&["netns", "del", ns]) {
                    Ok(()) => said.push(format!("network namespace {ns} removed")),
                    Err(e) => said.push(format!("cannot remove network namespace {ns}: {e}")),
                }
            }
        }
        w.state = WorkerState::Terminated;
        w.ended_at = Some(cedana_protocol::now());
    }
    if record
        .workers
        .iter()
        .any(|w| w.state == WorkerState::Running && w.provider != local::NAME)
    {
        said.push(format!(
            "job {job} has cloud workers its providers must end: see below"
        ));
    }
    if record.embedded_nats && crate::coord::nats::end_orphan(dir, record.nats_pid) {
        said.push(format!(
            "the job's NATS server (PID {}) stopped; its store stays in {}",
            record.nats_pid,
            dir.join(crate::coord::nats::NATS_DIR).display()
        ));
    }
    record.nats_pid = 0;
    if !record
        .workers
        .iter()
        .any(|w| w.state == WorkerState::Running && w.provider != local::NAME)
    {
        record.state = JobState::Down;
    }
    record.exit_status = Some(130);
    record.updated_at = cedana_protocol::now();
    if let Err(e) = record.save(dir) {
        said.push(format!("cannot save the job's record: {e}"));
    }
    said
}

/// Whether `pid` works in the job's folder (its current directory there): a check that the
/// PID is still the task's before it is killed.
fn works_in(pid: i32, job_dir: &Path) -> bool {
    std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(job_dir))
}

/// Ends a controller-less job's cloud machines through `providers` (every machine of the job
/// each provider knows of, not only those the record lists) and marks the record's cloud
/// workers ended and the job down. A line per machine.
pub async fn end_cloud(
    dir: &Path,
    record: &mut JobRecord,
    providers: &[crate::providers::Provider],
) -> Vec<String> {
    let mut said = Vec::new();
    for p in providers {
        let ids: Vec<String> = record
            .workers
            .iter()
            .filter(|w| w.provider == p.name() && w.state == WorkerState::Running)
            .map(|w| w.instance.clone())
            .collect();
        said.extend(p.end_job(&record.job, &ids).await);
    }
    for w in record.workers.iter_mut() {
        if w.state == WorkerState::Running && providers.iter().any(|p| p.name() == w.provider) {
            w.state = WorkerState::Terminated;
            w.ended_at = Some(cedana_protocol::now());
        }
    }
    let left: Vec<String> = record
        .workers
        .iter()
        .filter(|w| w.state == WorkerState::Running)
        .map(|w| format!("{} ({} {})", w.id, w.provider, w.instance))
        .collect();
    if left.is_empty() {
        record.state = JobState::Down;
        record.exit_status = Some(130);
    } else {
        said.push(format!(
            "workers {} are on providers not enabled in the config; enable them and run `down` again",
            left.join(", ")
        ));
    }
    if let Err(e) = record.save(dir) {
        said.push(format!("cannot save the job's record: {e}"));
    }
    said
}
