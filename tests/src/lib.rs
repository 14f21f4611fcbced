//! Helpers for the end-to-end tests: the agent binary under test, tasks that clean up after
//! themselves, bounded waits.
//!
//! Tests that need root and CRIU fail loudly when either is missing; they are skipped only when
//! `CEDANA_SKIP_CRIU_TESTS=1` is set, and then say so on stderr.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The `cedana-agent` binary under test: `$CEDANA_AGENT_BIN` (the README's test command points
/// it at the static build), else the one cargo built next to this test.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CEDANA_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> → target/<profile>/cedana-agent
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("cedana-agent");
    assert!(
        bin.is_file(),
        "{} is missing: build it first (`cargo build -p cedana-agent`, or run the README's test command)",
        bin.display()
    );
    bin
}

/// Python for test workloads: Debian's, which CI installs, else whatever is on PATH.
pub fn python() -> PathBuf {
    let debian = Path::new("/usr/bin/python3");
    if debian.is_file() {
        debian.to_path_buf()
    } else {
        PathBuf::from("python3")
    }
}

/// True when CRIU tests can run. Panics with the reason when they cannot, unless the skip
/// variable is set (then says SKIPPED on stderr and returns false).
pub fn criu_ready(test: &str) -> bool {
    let reason = if !nix::unistd::geteuid().is_root() {
        Some("not running as root".to_string())
    } else {
        let out = Command::new(agent_bin())
            .args(["check", "--json"])
            .output()
            .expect("run cedana-agent check");
        if out.status.success() {
            None
        } else {
            Some(format!(
                "`cedana-agent check` fails:\n{}",
                String::from_utf8_lossy(&out.stdout)
            ))
        }
    };
    match reason {
        None => true,
        Some(r) if std::env::var_os("CEDANA_SKIP_CRIU_TESTS").is_some_and(|v| v == "1") => {
            eprintln!("SKIPPED {test}: {r} (CEDANA_SKIP_CRIU_TESTS=1)");
            false
        }
        Some(r) => panic!(
            "{test} needs root and CRIU >= 4.2: {r}\nRun the README's test command (it installs CRIU), or set CEDANA_SKIP_CRIU_TESTS=1 to skip these tests knowingly."
        ),
    }
}

/// A folder for one test, with a private staging folder so tests can check it is left empty.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
    pub staging: PathBuf,
}

impl Sandbox {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("cedana-test-")
            .tempdir_in("/var/tmp")
            .expect("temp dir");
        let staging = dir.path().join("staging");
        std::fs::create_dir(&staging).expect("staging dir");
        Sandbox { dir, staging }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    /// Runs the agent with this sandbox's staging folder and no user config.
    pub fn agent<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.agent_cmd(args).output().expect("run cedana-agent")
    }
    pub fn agent_cmd<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = Command::new(agent_bin());
        c.args(args)
            .env("CEDANA_STAGING_DIR", &self.staging)
            .env("CEDANA_CONFIG", self.path().join("no-config.json"))
            .current_dir(self.path());
        c
    }
    /// Starts `cmd` with `cedana-agent exec`, output to `log` in the sandbox.
    pub fn exec(&self, log: &str, cmd: &[&str]) -> Task {
        let mut args = vec!["exec", "--log", log, "--"];
        args.extend_from_slice(cmd);
        let out = self.agent(&args);
        assert!(
            out.status.success(),
            "exec {cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Task::new(parse_pid(&out))
    }
    /// Dumps `pid` into the sandbox; returns the archive's path.
    pub fn dump(&self, pid: i32, extra: &[&str]) -> PathBuf {
        let pid_s = pid.to_string();
        let mut args = vec!["dump", "-p", &pid_s, "-d"];
        let dir = self.path().to_str().expect("utf-8 path");
        args.push(dir);
        args.extend_from_slice(extra);
        let out = self.agent(&args);
        assert!(
            out.status.success(),
            "dump of {pid} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        assert!(path.is_file(), "dump printed {path:?}, which is not a file");
        path
    }
    /// Restores an archive; returns the restored tree's root.
    pub fn restore(&self, archive: &Path) -> Task {
        let out = self.agent([OsStr::new("restore"), archive.as_os_str()]);
        assert!(
            out.status.success(),
            "restore of {} failed ({}): {}",
            archive.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Task::new(parse_pid(&out))
    }
    /// Files left in the staging folder (should be none after any command).
    pub fn staging_leftovers(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.staging)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

/// The first line of stdout as a PID.
pub fn parse_pid(out: &Output) -> i32 {
    let s = String::from_utf8_lossy(&out.stdout);
    s.lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no PID in output {s:?}"))
}

/// A process tree the test started; killed (SIGKILL) when dropped.
pub struct Task {
    pub pid: i32,
}

impl Task {
    pub fn new(pid: i32) -> Self {
        Task { pid }
    }
    pub fn alive(&self) -> bool {
        is_alive(self.pid)
    }
    /// Kills it and waits (bounded) until it is gone.
    pub fn kill(&self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        wait_until(Duration::from_secs(20), "killed task to disappear", || {
            !is_alive(self.pid)
        });
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Whether `pid` exists and is not a zombie.
pub fn is_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
        Err(_) => false,
    }
}

/// Polls `f` every 50 ms until it is true; panics after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The numbers in a file, one per line (other lines ignored).
pub fn numbers(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Asserts `nums` is 1, 2, 3, … with no gap or repeat.
pub fn assert_unbroken(nums: &[u64], what: &str) {
    for (i, n) in nums.iter().enumerate() {
        assert_eq!(
            *n,
            i as u64 + 1,
            "{what}: expected an unbroken 1..N sequence, got {nums:?}"
        );
    }
}

/// Waits until the file holds at least `n` numbers.
pub fn wait_for_numbers(path: &Path, n: usize) {
    wait_until(
        Duration::from_secs(30),
        &format!("{n} numbers in {}", path.display()),
        || numbers(path).len() >= n,
    );
}
