//! What the agent learns about a live process tree from `/proc` before dumping it.

use std::collections::BTreeSet;
use std::path::PathBuf;

use procfs::process::Process;
use serde::{Deserialize, Serialize};

/// Errors inspecting a process.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("no process with PID {pid}; check the PID with `ps -p {pid}`")]
    NotFound { pid: i32 },
    #[error(
        "cannot inspect process {pid} through /proc: {source}; the agent needs root (try sudo)"
    )]
    Proc { pid: i32, source: procfs::ProcError },
}

/// A snapshot of the facts about a process tree that go into a checkpoint's manifest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: i32,
    /// `comm`: the kernel's short name of the process.
    pub name: String,
    pub cmdline: Vec<String>,
    pub cwd: PathBuf,
    pub exe: Option<PathBuf>,
    /// Session id; when the session leader is outside the tree, CRIU needs `shell_job`.
    pub session: i32,
    /// True when the root is PID 1 of its own PID namespace (started by `cedana-agent exec`).
    pub pid_namespace_init: bool,
    /// True when the root is in a user namespace other than this process's (`exec --userns`).
    #[serde(default)]
    pub user_namespace: bool,
    /// With `user_namespace`: the mounts of its minimal tree besides `/`, `/dev`, `/dev/shm`
    /// and `/proc` (the folders it was given), which its restore binds too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_namespace_mounts: Vec<PathBuf>,
    /// The controlling terminal's device number (`tty_nr`), 0 when it has none.
    #[serde(default)]
    pub tty_nr: i32,
    /// PIDs of the whole tree, root first.
    pub tree: Vec<i32>,
    /// Resident memory of the whole tree in bytes.
    pub tree_rss_bytes: u64,
}

impl ProcessInfo {
    /// Reads `/proc` for `pid` and its descendants.
    pub fn inspect(pid: i32) -> Result<Self, ProcessError> {
        let wrap = |source: procfs::ProcError| match source {
            procfs::ProcError::NotFound(_) => ProcessError::NotFound { pid },
            source => ProcessError::Proc { pid, source },
        };
        let p = Process::new(pid).map_err(wrap)?;
        let stat = p.stat().map_err(wrap)?;
        let cmdline = p.cmdline().map_err(wrap)?;
        let cwd = p.cwd().map_err(wrap)?;
        let exe = p.exe().ok();
        let status = p.status().map_err(wrap)?;
        let pid_namespace_init = status
            .nspid
            .as_ref()
            .is_some_and(|ns| ns.len() > 1 && ns.last() == Some(&1));
        let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/user")).ok();
        let user_namespace = match (ns(&pid.to_string()), ns("self")) {
            (Some(theirs), Some(ours)) => theirs != ours,
            _ => false,
        };
        let tree = descendants(pid);
        let page = procfs::page_size();
        let tree_rss_bytes = tree
            .iter()
            .filter_map(|&p| Process::new(p).ok()?.stat().ok())
            .map(|s| s.rss * page)
            .sum();
        Ok(ProcessInfo {
            pid,
            name: stat.comm,
            cmdline,
            cwd,
            exe,
            session: stat.session,
            pid_namespace_init,
            user_namespace,
            user_namespace_mounts: match user_namespace {
                true => crate::minroot::extra_mounts_of(pid),
                false => Vec::new(),
            },
            tty_nr: stat.tty_nr,
            tree,
            tree_rss_bytes,
        })
    }

    /// Whether CRIU must treat the tree as a shell job: its session leader is outside the tree.
    pub fn needs_shell_job(&self) -> bool {
        !self.tree.contains(&self.session)
    }

    /// The controlling terminal of a shell job (a process started with `&` from an interactive
    /// shell), as a path where the kernel's numbering says one: CRIU restores such a tree only
    /// onto a terminal it inherits, so its archive does not come back elsewhere. None for a
    /// tree with no terminal, or one that owns its session.
    pub fn shell_job_terminal(&self) -> Option<String> {
        if !self.needs_shell_job() || self.tty_nr == 0 {
            return None;
        }
        let dev = self.tty_nr as u32;
        let (major, minor) = ((dev >> 8) & 0xfff, (dev & 0xff) | ((dev >> 12) & 0xfff00));
        Some(match major {
            136..=143 => format!("/dev/pts/{}", (major - 136) * 256 + minor),
            4 if minor < 64 => format!("/dev/tty{minor}"),
            _ => format!("the terminal {major}:{minor}"),
        })
    }

    /// The process name made safe for a file name.
    pub fn file_stem(&self) -> String {
        sanitize(&self.name)
    }
}

pub use cedana_protocol::ids::sanitize;

/// The PIDs of `root` and all its descendants, root first.
pub fn descendants(root: i32) -> Vec<i32> {
    let mut out = vec![root];
    let mut seen = BTreeSet::from([root]);
    let mut i = 0;
    while i < out.len() {
        let pid = out[i];
        i += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let Ok(children) = std::fs::read_to_string(t.path().join("children")) else {
                continue;
            };
            for c in children
                .split_whitespace()
                .filter_map(|c| c.parse::<i32>().ok())
            {
                if seen.insert(c) {
                    out.push(c);
                }
            }
        }
    }
    out
}

/// When process `pid` started (field 22 of `/proc/PID/stat`), if it lives (a zombie does not).
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace();
    if matches!(fields.next(), Some("Z" | "X")) {
        return None;
    }
    // After the state: ppid is field 4; starttime is field 22, the 19th after the state.
    fields.nth(18)?.parse().ok()
}

/// Whether process `pid` is stopped (state `T`: SIGSTOP, a shell's Ctrl-Z, a dump that left
/// it so); not a traced stop (`t`).
pub fn is_stopped(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('T'))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_keeps_names_file_safe() {
        assert_eq!(sanitize("python3"), "python3");
        assert_eq!(sanitize("kworker/0:1"), "kworker_0_1");
        assert_eq!(sanitize("..x"), "x");
        assert_eq!(sanitize(""), "process");
    }

    #[test]
    fn inspects_this_process() {
        let me = ProcessInfo::inspect(std::process::id() as i32).unwrap();
        assert_eq!(me.tree[0], me.pid);
        assert!(me.tree_rss_bytes > 0);
        assert!(!me.cmdline.is_empty());
    }

    #[test]
    fn missing_process_is_not_found() {
        // PID max is at most 2^22, so this PID cannot exist.
        let err = ProcessInfo::inspect(5_000_000).unwrap_err();
        assert!(
            matches!(err, ProcessError::NotFound { pid: 5_000_000 }),
            "{err}"
        );
    }
}
