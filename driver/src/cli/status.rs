//! `cedana-driver status` and `logs`: what the job folders say, printed.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cedana_driver::job::record::{self, JobRecord, OUTPUT_FILE};

use super::exit::Exit;

/// The job `job` names (its id or a unique prefix), or why there is none.
pub fn find(state_dir: &Path, job: &str) -> Result<(PathBuf, JobRecord), Exit> {
    record::find(state_dir, job).map_err(|e| {
        super::error(e);
        Exit::NoJob
    })
}

/// `status`: one job, or all of them; a table, or the records as JSON.
pub fn status(state_dir: &Path, job: Option<&str>, json: bool) -> Exit {
    let jobs = match job {
        Some(j) => match find(state_dir, j) {
            Ok(found) => vec![found],
            Err(code) => return code,
        },
        None => record::list(state_dir),
    };
    if json {
        let records: Vec<serde_json::Value> = jobs
            .iter()
            .map(|(_, r)| {
                let mut v = serde_json::to_value(r).expect("serializes");
                v["shown_state"] = r.shown_state().into();
                v["driver_alive"] = r.driver_alive().into();
                v
            })
            .collect();
        // One shape whatever the argument: a list (of one job when one is named).
        let out = serde_json::Value::Array(records);
        println!(
            "{}",
            serde_json::to_string_pretty(&out).expect("serializes")
        );
        return Exit::Ok;
    }
    if jobs.is_empty() {
        println!("no jobs in {}", state_dir.display());
        return Exit::Ok;
    }
    println!(
        "{:<24} {:<13} {:<8} {:<15} {:<10} {:>6} {:>9} {:>5} {:>9} {:>8}  LAST CHECKPOINT",
        "JOB",
        "STATE",
        "WORKER",
        "ADDRESS",
        "TASK",
        "CKPTS",
        "RECOVERED",
        "MOVED",
        "COST $",
        "NOW $/H"
    );
    let now = cedana_protocol::now();
    for (_, r) in &jobs {
        let running = r
            .workers
            .iter()
            .rev()
            .find(|w| w.state == record::WorkerState::Running);
        let worker = running.map(|w| w.id.as_str()).unwrap_or("-");
        let address = running
            .and_then(|w| w.address)
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".into());
        let rate = running
            .and_then(|w| w.offer.as_ref())
            .map(|o| format!("{:.4}", o.price_usd_hour))
            .unwrap_or_else(|| "-".into());
        let task = r.task.as_ref().map(|t| t.name.as_str()).unwrap_or("-");
        let last = r
            .checkpoints
            .last()
            .map(|c| {
                format!(
                    "{} s ago, {:.1} MiB",
                    now.saturating_sub(c.at),
                    c.bytes as f64 / 1048576.0
                )
            })
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<24} {:<13} {:<8} {:<15} {:<10} {:>6} {:>9} {:>5} {:>9.4} {:>8}  {last}",
            r.job,
            r.shown_state(),
            worker,
            address,
            task,
            r.checkpoints.len(),
            r.recoveries,
            r.migrations,
            r.cost_usd + 0.0,
            rate
        );
    }
    // What a user does next about a job that needs it.
    for (_, r) in &jobs {
        if !r.state.is_final() && !r.driver_alive() {
            println!(
                "  {}: its controller (PID {}) is gone; `cedana-driver resume {}` brings it back, `cedana-driver down {}` ends it",
                r.job, r.driver_pid, r.job, r.job
            );
        } else if let (record::JobState::Failed, Some(e)) = (r.state, &r.error) {
            println!("  {}: failed: {e}", r.job);
        }
    }
    Exit::Ok
}

/// `logs`: the task's output so far, and with `follow` until the job ends.
pub fn logs(state_dir: &Path, job: &str, follow: bool) -> Exit {
    let (dir, _) = match find(state_dir, job) {
        Ok(f) => f,
        Err(code) => return code,
    };
    let path = dir.join("logs").join(OUTPUT_FILE);
    let mut f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) => {
            super::error(format!("cannot read {}: {e}", path.display()));
            return Exit::Failed;
        }
    };
    let mut out = std::io::stdout().lock();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if f.read_to_end(&mut buf).is_ok() && !buf.is_empty() {
            let _ = out.write_all(&buf);
            let _ = out.flush();
        }
        if !follow {
            return Exit::Ok;
        }
        let ended = JobRecord::load(&dir)
            .map(|r| !r.driver_alive())
            .unwrap_or(true);
        if ended {
            // What was written last.
            buf.clear();
            let _ = f.read_to_end(&mut buf);
            let _ = out.write_all(&buf);
            return Exit::Ok;
        }
        let _ = f.stream_position();
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// On a NATS server the user runs, the ended job's own checkpoint bucket (the embedded
/// server's store goes with the job's folder): deleted, or said why not (the folder is removed
/// all the same; the bucket's name and server are printed for removing it by hand).
fn remove_bucket(r: &JobRecord, config: &cedana_driver::Config) {
    let Some(bucket) = r.settings.checkpoint_bucket.as_deref() else {
        return;
    };
    if r.embedded_nats {
        return;
    }
    let token = config.connection.auth_token.clone();
    let (url, bucket_name) = (r.nats_url.clone(), bucket.to_string());
    let deleted = super::runtime().map_err(|e| e.to_string()).and_then(|rt| {
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(15), async {
                let client = cedana_protocol::NatsCredential::parse(&token)
                    .connect_options()
                    .connection_timeout(Duration::from_secs(5))
                    .connect(cedana_protocol::NatsUrl::parse(&url).servers().to_vec())
                    .await
                    .map_err(|e| e.to_string())?;
                let js = async_nats::jetstream::new(client);
                match js.delete_object_store(&bucket_name).await {
                    Ok(_) => Ok(()),
                    // Already gone (or never made): nothing left.
                    Err(e) if e.to_string().contains("not found") => Ok(()),
                    Err(e) => Err(e.to_string()),
                }
            })
            .await
            .unwrap_or_else(|_| Err("no answer within 15 s".into()))
        })
    });
    match deleted {
        Ok(()) => println!("removed its checkpoints (bucket {bucket} on {})", r.nats_url),
        Err(e) => super::error(format!(
            "cannot remove job {}'s checkpoints, bucket {bucket} on {} ({e}); remove them with `nats object rm {bucket}` once the server answers",
            r.job, r.nats_url
        )),
    }
}

/// `rm`: removes an ended job's folder (and its checkpoint bucket on a server the user runs).
pub fn rm(state_dir: &Path, job: &str, config: &cedana_driver::Config) -> Exit {
    let (dir, r) = match find(state_dir, job) {
        Ok(f) => f,
        Err(code) => return code,
    };
    if !r.state.is_final() {
        super::error(format!(
            "job {} is not over (state {}); `cedana-driver down {}` ends it first",
            r.job,
            r.shown_state(),
            r.job
        ));
        return Exit::Failed;
    }
    // Only a folder directly in the state folder, named by the job.
    if dir.parent() != Some(state_dir) || dir.file_name() != Some(std::ffi::OsStr::new(&r.job)) {
        super::error(format!(
            "{} is not job {}'s folder in {}; not removed",
            dir.display(),
            r.job,
            state_dir.display()
        ));
        return Exit::Failed;
    }
    let bytes = folder_size(&dir);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {
            println!(
                "removed job {} ({:.1} MiB)",
                r.job,
                bytes as f64 / 1048576.0
            );
            remove_bucket(&r, config);
            // A checkpoint store is the user's: what the job left there is said, not removed.
            if let Some(store) = &r.settings.store {
                println!(
                    "its checkpoints stay in {store}/{}; `cedana-agent prune --store {store}/{} --keep 0` removes them",
                    r.job, r.job
                );
            }
            Exit::Ok
        }
        Err(e) => {
            super::error(format!("cannot remove {}: {e}", dir.display()));
            Exit::Failed
        }
    }
}

/// `prune`: removes every ended job's folder (ended more than `older_than` days ago), as `rm`
/// does.
pub fn prune(state_dir: &Path, older_than: Option<u64>, config: &cedana_driver::Config) -> Exit {
    let now = cedana_protocol::now();
    let (mut removed, mut bytes, mut failed) = (0, 0u64, false);
    for (dir, r) in record::list(state_dir) {
        let old_enough = older_than.is_none_or(|d| now.saturating_sub(r.updated_at) > d * 86_400);
        if !r.state.is_final() || !old_enough || dir.parent() != Some(state_dir) {
            continue;
        }
        let size = folder_size(&dir);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {
                println!("removed job {} ({:.1} MiB)", r.job, size as f64 / 1048576.0);
                remove_bucket(&r, config);
                removed += 1;
                bytes += size;
            }
            Err(e) => {
                super::error(format!("cannot remove {}: {e}", dir.display()));
                failed = true;
            }
        }
    }
    println!(
        "{removed} job{} removed, {:.1} MiB freed",
        if removed == 1 { "" } else { "s" },
        bytes as f64 / 1048576.0
    );
    if failed {
        Exit::Failed
    } else {
        Exit::Ok
    }
}

/// The bytes of the files under `dir` (links not followed).
fn folder_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => total += e.metadata().map(|m| m.len()).unwrap_or(0),
                _ => {}
            }
        }
    }
    total
}

/// `port`: forwards 127.0.0.1:`local` to the task's `port` until the job ends or Ctrl-C.
pub fn port(state_dir: &Path, job: &str, port: u16, local: Option<u16>) -> Exit {
    let (dir, r) = match find(state_dir, job) {
        Ok(f) => f,
        Err(code) => return code,
    };
    if r.state.is_final() {
        super::error(format!("job {} has ended ({})", r.job, r.shown_state()));
        return Exit::NoJob;
    }
    let rt = match super::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            super::error(e);
            return Exit::Failed;
        }
    };
    let local = local.unwrap_or(port);
    let listener = match rt.block_on(tokio::net::TcpListener::bind(("127.0.0.1", local))) {
        Ok(l) => l,
        Err(e) => {
            super::error(format!(
                "cannot listen on 127.0.0.1:{local}: {e}; pick another with --local"
            ));
            return Exit::Failed;
        }
    };
    let bound = listener.local_addr().map(|a| a.port()).unwrap_or(local);
    let now = cedana_driver::job::ports::task_address(&dir)
        .map(|(w, a)| format!(" (now on worker {w}, {a}:{port})"))
        .unwrap_or_default();
    println!("127.0.0.1:{bound} -> job {}'s task port {port}{now}", r.job);
    let _ = std::io::stdout().flush();
    rt.spawn(cedana_driver::job::ports::forward(
        listener,
        dir.clone(),
        port,
    ));
    rt.block_on(async {
        let Ok(mut int) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        else {
            return Exit::Failed;
        };
        loop {
            tokio::select! {
                _ = int.recv() => return Exit::Down,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            if JobRecord::load(&dir)
                .map(|r| r.state.is_final())
                .unwrap_or(true)
            {
                return Exit::Ok;
            }
        }
    })
}
