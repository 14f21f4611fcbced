//! The dump's guardian: while CRIU has left a process tree stopped (a dump that kills it once
//! its archive is safe, or one that carries the task's files), a small process of its own
//! (`cedana-agent guard`, started from this binary) watches the agent; if the agent dies
//! before it has killed or resumed the tree, the guardian resumes it (SIGCONT to every
//! process), so a killed agent never leaves a tree stopped for good. The agent ends the
//! guardian when it is done with the tree.
//!
//! A lazy restore's guardian ([`LazyGuard`], `cedana-agent guard --lazy`) keeps the other
//! promise: a lazily restored tree never runs on memory that did not arrive. It holds a copy
//! of the page server's connection, so the agent's death does not end CRIU's lazy-pages daemon
//! (which would let the kernel fill the missing pages with zeros): the tree's faults wait. It
//! learns the tree's root and the end of the transfer through a pipe from the agent; when the
//! pipe closes before the end (the agent died), it kills the tree, then lets the connection go.

use std::io::{BufRead, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
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

/// The guardian of a lazily restored tree (see the module's documentation); told the tree's
/// root once CRIU gave it, and that every page is back. Ended when dropped.
pub struct LazyGuard {
    child: Child,
    pipe: Option<ChildStdin>,
}

impl LazyGuard {
    /// Starts one holding `connection` (the page server's end), if this process is the
    /// `cedana-agent` binary.
    pub fn start(connection: &std::net::TcpStream) -> Option<LazyGuard> {
        let exe = std::env::current_exe().ok()?;
        if !exe
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("cedana-agent"))
        {
            return None;
        }
        let held = connection.try_clone().ok()?;
        let mut child = Command::new(exe)
            .args(["guard", "--lazy"])
            .stdin(Stdio::piped())
            // Its stdout is the connection: held open, never written.
            .stdout(Stdio::from(std::os::fd::OwnedFd::from(held)))
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| tracing::warn!(error = %e, "no guardian for the lazily restored tree"))
            .ok()?;
        let pipe = child.stdin.take();
        Some(LazyGuard { child, pipe })
    }

    /// The restored tree's root.
    pub fn tree(&mut self, root: i32) {
        if let Some(p) = self.pipe.as_mut() {
            let _ = writeln!(p, "tree {root}");
        }
    }

    /// Every page is back (or the tree was ended): the guardian leaves the tree alone.
    pub fn done(&mut self) {
        if let Some(mut p) = self.pipe.take() {
            let _ = writeln!(p, "done");
        }
        let _ = self.child.wait();
    }
}

impl Drop for LazyGuard {
    fn drop(&mut self) {
        if self.pipe.is_some() {
            self.done();
        }
    }
}

/// `cedana-agent guard --lazy`: reads the tree's root and `done` from stdin; if stdin ends
/// before `done` (the agent died), kills the tree under the root. Stdout is the held
/// connection.
pub fn run_lazy() {
    let mut root = None;
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        match line.split_once(' ') {
            Some(("tree", pid)) => root = pid.trim().parse::<i32>().ok(),
            _ if line == "done" => return,
            _ => {}
        }
    }
    if let Some(root) = root {
        for pid in crate::process::descendants(root).into_iter().rev() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}
