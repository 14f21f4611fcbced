//! Following a job's controller: its output files copied to this terminal as they grow,
//! until the job ends (then its exit code), the controller is gone (then how to resume), or
//! this process is told to stop following.
//!
//! Ctrl-C asks the controller to take the job down (a second one stops following at once);
//! SIGHUP (a closed terminal) and SIGTERM only stop following: the job goes on.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cedana_driver::job::record::{self, JobRecord};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::exit::Exit;

/// The controller's stdout (the task's output, the job file's `print`) in `logs/`.
pub const CONTROLLER_OUT: &str = "controller.out";
/// The controller's stderr (the job's steps, warnings) in `logs/`.
pub const CONTROLLER_ERR: &str = "controller.err";

/// What to follow.
pub struct Follow {
    pub dir: PathBuf,
    pub job: String,
    /// The controller, when this process started it.
    pub child: Option<std::process::Child>,
    /// Return once the task runs.
    pub detach: bool,
    /// Where to start reading (stdout file, stderr file).
    pub from: (u64, u64),
}

/// `attach JOB`: follows the job from its last lines (or the whole output with `all`).
pub fn attach(state_dir: &Path, job: &str, all: bool) -> Exit {
    let (dir, rec) = match super::status::find(state_dir, job) {
        Ok(f) => f,
        Err(code) => return code,
    };
    let logs = dir.join("logs");
    let start = |name: &str| {
        let path = logs.join(name);
        if all {
            0
        } else {
            tail_start(&path, 40)
        }
    };
    follow(Follow {
        dir,
        job: rec.job,
        child: None,
        detach: false,
        from: (start(CONTROLLER_OUT), start(CONTROLLER_ERR)),
    })
}

/// Where the last `lines` lines of `path` start.
fn tail_start(path: &Path, lines: usize) -> u64 {
    let Ok(mut f) = std::fs::File::open(path) else {
        return 0;
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let back = len.min(64 * 1024);
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(len - back)).is_err() || f.read_to_end(&mut buf).is_err() {
        return 0;
    }
    let mut seen = 0;
    for (i, b) in buf.iter().enumerate().rev() {
        if *b == b'\n' && i + 1 < buf.len() {
            seen += 1;
            if seen == lines {
                return len - back + i as u64 + 1;
            }
        }
    }
    if back < len {
        // Start at a line.
        buf.iter()
            .position(|b| *b == b'\n')
            .map(|i| len - back + i as u64 + 1)
            .unwrap_or(len)
    } else {
        0
    }
}

/// A file followed from an offset.
struct Tail {
    path: PathBuf,
    at: u64,
}

impl Tail {
    /// Copies what was added since the last look to `to`.
    fn pump(&mut self, to: &mut dyn Write) {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return;
        };
        if f.seek(SeekFrom::Start(self.at)).is_err() {
            return;
        }
        let mut buf = [0u8; 64 * 1024];
        loop {
            match f.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let _ = to.write_all(&buf[..n]);
                    self.at += n as u64;
                }
            }
        }
        let _ = to.flush();
    }
}

/// Follows the job until it ends; returns the exit code to end with.
pub fn follow(mut f: Follow) -> Exit {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            super::error(e);
            return Exit::Failed;
        }
    };
    let logs = f.dir.join("logs");
    let mut out = Tail {
        path: logs.join(CONTROLLER_OUT),
        at: f.from.0,
    };
    let mut err = Tail {
        path: logs.join(CONTROLLER_ERR),
        at: f.from.1,
    };
    // Detached, stdout is the job's id alone (for scripts): the task's output is not shown.
    let detach = f.detach;
    let pump = |out: &mut Tail, err: &mut Tail| {
        if !detach {
            out.pump(&mut std::io::stdout().lock());
        }
        err.pump(&mut std::io::stderr().lock());
    };
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            super::error("cannot handle signals");
            return Exit::Failed;
        };
        let mut interrupted = false;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = int.recv() => {
                    if interrupted {
                        eprintln!("[cedana] stopped following; job {} is being taken down (`cedana-driver status {}`)", f.job, f.job);
                        return Exit::Down;
                    }
                    interrupted = true;
                    let pid = controller_pid(&f);
                    if let Some(pid) = pid {
                        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGINT);
                    }
                    eprintln!("[cedana] taking job {} down (Ctrl-C again to stop following)", f.job);
                    continue;
                }
                _ = term.recv() => return detached(&f, 143),
                _ = hup.recv() => return detached(&f, 129),
            }
            pump(&mut out, &mut err);
            let rec = JobRecord::load(&f.dir).ok();
            // A controller this process started: its end is known exactly.
            if let Some(child) = f.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    pump(&mut out, &mut err);
                    match rec.as_ref().filter(|r| r.state.is_final()) {
                        Some(r) => return recorded_exit(r),
                        None => match (status.code(), &rec) {
                            // Killed, or superseded: a standby may go on with the job.
                            (None | Some(75), Some(r)) => {
                                f.child = None;
                                if !wait_for_takeover(&f, r.driver_pid, &mut out, &mut err) {
                                    return gone(&f.job, &f.dir);
                                }
                                continue;
                            }
                            (Some(c), _) => return Exit::Task(c.clamp(0, 255) as u8),
                            (None, None) => return gone(&f.job, &f.dir),
                        },
                    }
                }
            }
            let Some(rec) = rec else {
                if f.child.is_none() {
                    super::error(format!("job {}'s record is gone", f.job));
                    return Exit::NoJob;
                }
                continue;
            };
            if f.detach && (rec.task.is_some() || rec.state.is_final() || (!rec.managed && rec.state != record::JobState::Starting)) {
                if rec.state.is_final() {
                    return recorded_exit(&rec);
                }
                println!("{}", f.job);
                eprintln!(
                    "[cedana] job {} runs in the background (controller PID {}); follow it with `cedana-driver attach {}` (or `logs -f`, `status`), end it with `cedana-driver down {}`",
                    f.job, rec.driver_pid, f.job, f.job
                );
                return Exit::Ok;
            }
            if f.child.is_none() && !record::controller_alive(rec.driver_pid) {
                pump(&mut out, &mut err);
                if rec.state.is_final() {
                    return recorded_exit(&rec);
                }
                if !wait_for_takeover(&f, rec.driver_pid, &mut out, &mut err) {
                    return gone(&f.job, &f.dir);
                }
            }
        }
    })
}

/// The controller `dead` is gone with the job unfinished: waits a while for a standby to take
/// the job over (the record names a living controller then); whether one did.
fn wait_for_takeover(f: &Follow, dead: u32, out: &mut Tail, err: &mut Tail) -> bool {
    let grace = cedana_driver::coord::TAKEOVER_AFTER + Duration::from_secs(6);
    eprintln!(
        "[cedana] job {}'s controller (PID {dead}) is gone; waiting {} s for a standby to take over",
        f.job,
        grace.as_secs()
    );
    let start = std::time::Instant::now();
    while start.elapsed() < grace {
        out.pump(&mut std::io::stdout().lock());
        err.pump(&mut std::io::stderr().lock());
        if let Ok(r) = JobRecord::load(&f.dir) {
            if r.state.is_final()
                || (r.driver_pid != dead && record::controller_alive(r.driver_pid))
            {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// The controller's process id, as this process knows it.
fn controller_pid(f: &Follow) -> Option<u32> {
    match &f.child {
        Some(c) => Some(c.id()),
        None => JobRecord::load(&f.dir).ok().map(|r| r.driver_pid),
    }
}

/// Stopped following on a signal: the job goes on.
fn detached(f: &Follow, code: u8) -> Exit {
    eprintln!(
        "[cedana] stopped following; job {} goes on (`cedana-driver attach {}` follows it again)",
        f.job, f.job
    );
    Exit::Task(code)
}

/// The controller died with the job unfinished.
fn gone(job: &str, dir: &Path) -> Exit {
    let why = JobRecord::load(dir)
        .ok()
        .and_then(|r| r.error)
        .map(|e| format!(" (last error: {e})"))
        .unwrap_or_default();
    super::error(format!(
        "job {job}'s controller is gone{why}; `cedana-driver resume {job}` brings it back, `cedana-driver down {job}` ends it"
    ));
    Exit::NoJob
}

/// The exit code a job that ended has, from its record (for a record from before
/// `exit_status` was kept: its state and the task's status).
pub fn recorded_exit(r: &JobRecord) -> Exit {
    if let Some(code) = r.exit_status {
        return Exit::Task(code);
    }
    match (r.state, r.exit_code) {
        (record::JobState::Down, _) => Exit::Down,
        (_, Some(code)) => Exit::task(code),
        _ => Exit::Failed,
    }
}
