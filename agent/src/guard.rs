//! The dump's guardian: while CRIU has left a process tree stopped (a dump that kills it once
//! its archive is safe, or one that carries the task's files), a small process of its own
//! (`cedana-agent guard`, started from this binary) watches the agent; if the agent dies
//! before it has killed or resumed the tree, the guardian resumes it (SIGCONT to every
//! process), so a killed agent never leaves a tree stopped for good. The agent ends the
//! guardian when it is done with the tree.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A running guardian; ended (SIGKILL) when dropped.
pub struct Guard(Child);

impl Guard {
    /// Starts a guardian of the tree under `root` for this process, if this process is the
    /// `cedana-agent` binary (a library user that is not has none).
    pub fn start(root: i32) -> Option<Guard> {
        let exe = std::env::current_exe().ok()?;
        if !exe
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("cedana-agent"))
        {
            return None;
        }
        let me = std::process::id() as i32;
        let born = crate::process::start_time(me)?;
        let child = Command::new(exe)
            .args([
                "guard",
                "--tree",
                &root.to_string(),
                "--agent",
                &me.to_string(),
                "--agent-start",
                &born.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| tracing::warn!(error = %e, "no guardian for the dumped tree"))
            .ok()?;
        Some(Guard(child))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        // In the daemon its exit is reaped by the daemon's reaper; here, if not.
        let _ = self.0.try_wait();
    }
}

/// `cedana-agent guard`: waits while agent `agent` (started at `agent_start`, clock ticks
/// after boot) lives; if it dies first, resumes every process of the tree under `tree`.
/// Ends when the tree is gone, or after 7 days.
pub fn run(tree: i32, agent: i32, agent_start: u64) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(7 * 24 * 3600) {
        if crate::process::start_time(tree).is_none() {
            return;
        }
        if crate::process::start_time(agent) != Some(agent_start) {
            for pid in crate::process::descendants(tree) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
