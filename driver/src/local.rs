//! The `local` provider: workers are agent daemons started on this machine, priced at zero.
//!
//! Each worker has a folder of its own (`<job>/workers/<id>`), as each machine has its own
//! disk. Restored tasks reopen their files by path, so every worker must show its folder at
//! the same path, as the same path exists on every machine: as root, each daemon runs in a
//! mount namespace of its own where its folder is bind-mounted on the job's work path
//! (`<job>/work`). Without root, workers share `<job>/work` and say so.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A local worker: the daemon process and the tasks it reported.
pub struct LocalWorker {
    pub id: String,
    pub pid: i32,
    /// The worker's own folder on this machine (what it sees at the job's work path).
    pub dir: PathBuf,
    /// Whether the worker runs in its own mount namespace.
    pub isolated: bool,
    exited: Arc<AtomicBool>,
    pub task_pids: Vec<i32>,
}

/// Errors launching a local worker.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("cannot start the agent daemon {agent}: {source}; set CEDANA_AGENT_BIN or put cedana-agent next to cedana-driver")]
    Spawn {
        agent: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot prepare worker folder {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The agent binary: `$CEDANA_AGENT_BIN`, next to this driver, or `cedana-agent` on PATH.
pub fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CEDANA_AGENT_BIN") {
        return PathBuf::from(p);
    }
    if let Some(beside) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("cedana-agent")))
    {
        if beside.is_file() {
            return beside;
        }
    }
    PathBuf::from("cedana-agent")
}

/// Where a local worker lives.
pub struct LaunchSpec<'a> {
    pub job: &'a str,
    pub id: &'a str,
    pub nats_url: &'a str,
    pub token: &'a str,
    /// The job's work path, the same for every worker.
    pub work_path: &'a Path,
    /// This worker's own folder.
    pub dir: &'a Path,
    pub log: &'a Path,
    pub shared_storage: Option<&'a Path>,
}

/// Whether workers can have mount namespaces of their own here.
pub fn can_isolate() -> bool {
    nix::unistd::geteuid().is_root() && std::env::var_os("CEDANA_LOCAL_SHARED").is_none()
}

impl LocalWorker {
    /// Starts `cedana-agent daemon` for the worker.
    pub fn launch(s: &LaunchSpec) -> Result<Self, LocalError> {
        let agent = agent_binary();
        let derr = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LocalError::Dir { path, source }
        };
        std::fs::create_dir_all(s.dir).map_err(derr(s.dir))?;
        std::fs::create_dir_all(s.work_path).map_err(derr(s.work_path))?;
        let isolated = can_isolate();
        let log = std::fs::File::create(s.log).map_err(derr(s.log))?;
        let mut cmd = Command::new(&agent);
        cmd.args([
            "daemon",
            "--job",
            s.job,
            "--worker",
            s.id,
            "--nats-url",
            s.nats_url,
            "--heartbeat-secs",
            "2",
        ])
        .arg("--work-dir")
        .arg(s.work_path)
        .env("CEDANA_NATS_TOKEN", s.token)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
        if let Some(shared) = s.shared_storage {
            cmd.arg("--shared-storage").arg(shared);
        }
        if isolated {
            let cstr = |p: &Path| CString::new(p.as_os_str().as_bytes()).expect("no NUL in paths");
            let (src, dst) = (cstr(s.dir), cstr(s.work_path));
            // SAFETY: between fork and exec only async-signal-safe system calls are made, on
            // strings prepared before the fork.
            unsafe {
                use std::os::unix::process::CommandExt;
                cmd.pre_exec(move || {
                    let check = |r: libc::c_int| {
                        if r == 0 {
                            Ok(())
                        } else {
                            Err(std::io::Error::last_os_error())
                        }
                    };
                    check(libc::unshare(libc::CLONE_NEWNS))?;
                    check(libc::mount(
                        c"none".as_ptr(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ))?;
                    check(libc::mount(
                        src.as_ptr(),
                        dst.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ))
                });
            }
        }
        let mut child = cmd
            .spawn()
            .map_err(|source| LocalError::Spawn { agent, source })?;
        let pid = child.id() as i32;
        let exited = Arc::new(AtomicBool::new(false));
        let flag = exited.clone();
        std::thread::spawn(move || {
            let _ = child.wait();
            flag.store(true, Ordering::SeqCst);
        });
        Ok(LocalWorker {
            id: s.id.into(),
            pid,
            dir: if isolated {
                s.dir.to_path_buf()
            } else {
                s.work_path.to_path_buf()
            },
            isolated,
            exited,
            task_pids: Vec::new(),
        })
    }

    /// A flag that turns true when the daemon exits.
    pub fn exited_arc(&self) -> Arc<AtomicBool> {
        self.exited.clone()
    }

    /// Whether the daemon has exited.
    pub fn exited(&self) -> bool {
        self.exited.load(Ordering::SeqCst)
    }

    /// Ends the worker as an instance ends: its tasks and the daemon are killed.
    pub fn terminate(&mut self) {
        for pid in self.task_pids.drain(..) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if self.exited() {
            return;
        }
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGTERM);
        for _ in 0..40 {
            if self.exited() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        for _ in 0..40 {
            if self.exited() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for LocalWorker {
    fn drop(&mut self) {
        self.terminate();
    }
}
