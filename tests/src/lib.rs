//! Helpers for the end-to-end tests: the agent binary under test, tasks that clean up after
//! themselves, bounded waits.
//!
//! Tests that need root and CRIU fail loudly when either is missing; they are skipped only when
//! `CEDANA_SKIP_CRIU_TESTS=1` is set, and then say so on stderr.

pub mod moto;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod ec2sim;
pub mod imds;
pub mod sshd;

/// The `cedana-agent` binary under test: `$CEDANA_AGENT_BIN` (the README's test command points
/// it at the static build), else the one cargo built next to this test.
pub fn agent_bin() -> PathBuf {
    workspace_bin("cedana-agent", "CEDANA_AGENT_BIN")
}

/// `$env` if set, else the binary `name` cargo built next to this test.
fn workspace_bin(name: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        // Relative to the workspace root (cargo runs tests from the crate's folder).
        let p = PathBuf::from(p);
        return if p.is_relative() && p.components().count() > 1 {
            repo_root().join(p)
        } else {
            p
        };
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join(name);
    assert!(
        bin.is_file(),
        "{} is missing: build it first (`cargo build --bins`, or run the README's test command)",
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

/// A real `nats-server` with JetStream and token auth on a free loopback port; killed on drop.
pub struct NatsServer {
    child: std::process::Child,
    /// The address it listens on (loopback unless started with [`NatsServer::start_on`]).
    pub host: std::net::IpAddr,
    pub port: u16,
    pub token: String,
    pub store: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a server with a random token.
    pub fn start() -> Self {
        Self::start_with(
            random_token(),
            free_port(),
            tempfile::tempdir().expect("store dir"),
        )
    }

    /// Starts a server with a random token listening on `host` (an address of this machine,
    /// such as the instance simulator's gateway), on a port free there.
    pub fn start_on(host: std::net::IpAddr) -> Self {
        let port = std::net::TcpListener::bind((host, 0))
            .and_then(|l| l.local_addr())
            .unwrap_or_else(|e| panic!("no free port on {host}: {e}"))
            .port();
        Self::start_at(
            host,
            random_token(),
            port,
            tempfile::tempdir().expect("store dir"),
        )
    }

    /// Starts a server on a given port and store (to restart one).
    pub fn start_with(token: String, port: u16, store: tempfile::TempDir) -> Self {
        Self::start_at(
            std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            token,
            port,
            store,
        )
    }

    fn start_at(
        host: std::net::IpAddr,
        token: String,
        port: u16,
        store: tempfile::TempDir,
    ) -> Self {
        let child = Command::new("nats-server")
            .args([
                "-js",
                "-a",
                &host.to_string(),
                "-p",
                &port.to_string(),
                "--auth",
                &token,
                "--store_dir",
            ])
            .arg(store.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server on PATH (the README's test command installs it)");
        wait_until(Duration::from_secs(15), "nats-server to listen", || {
            std::net::TcpStream::connect((host, port)).is_ok()
        });
        NatsServer {
            child,
            host,
            port,
            token,
            store,
        }
    }

    /// Starts a server on loopback port `port` with config file `conf` (its own auth, such as
    /// `bootstrap --nats-account` writes), its log in `log`; `token` is left empty.
    pub fn start_config(port: u16, conf: &Path, log: &Path) -> Self {
        let store = tempfile::tempdir().expect("store dir");
        let log = std::fs::File::create(log).expect("the server's log");
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-c"])
            .arg(conf)
            .arg("--store_dir")
            .arg(store.path())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server on PATH (the README's test command installs it)");
        wait_until(Duration::from_secs(15), "nats-server to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        NatsServer {
            child,
            host: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            port,
            token: String::new(),
            store,
        }
    }

    pub fn url(&self) -> String {
        format!("nats://{}:{}", self.host, self.port)
    }

    /// The server's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the server, keeping its store, and returns what a restart needs.
    pub fn stop(mut self) -> (String, u16, tempfile::TempDir) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let store = std::mem::replace(&mut self.store, tempfile::tempdir().expect("dir"));
        (self.token.clone(), self.port, store)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A cluster of real `nats-server`s with JetStream on loopback, one token for all, routes
/// between them (loopback only); each node killed on drop.
pub struct NatsCluster {
    nodes: Vec<Option<std::process::Child>>,
    pub ports: Vec<u16>,
    pub token: String,
    _stores: Vec<tempfile::TempDir>,
}

impl NatsCluster {
    /// Starts `n` nodes and waits (bounded) until JetStream answers on every one of them.
    pub fn start(n: usize) -> Self {
        let token = random_token();
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes = routes_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = Vec::new();
        let mut stores = Vec::new();
        for i in 0..n {
            let store = tempfile::tempdir().expect("store dir");
            let child = Command::new("nats-server")
                .args(["-js", "-a", "127.0.0.1", "-p", &ports[i].to_string()])
                .args(["--auth", &token, "--store_dir"])
                .arg(store.path())
                .args(["--server_name", &format!("cedana-test-{i}")])
                .args(["--cluster_name", "cedana-test"])
                .args([
                    "--cluster",
                    &format!("nats://127.0.0.1:{}", routes_ports[i]),
                ])
                .args(["--routes", &routes])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("nats-server on PATH (the README's test command installs it)");
            nodes.push(Some(child));
            stores.push(store);
        }
        let cluster = NatsCluster {
            nodes,
            ports,
            token,
            _stores: stores,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        for port in &cluster.ports {
            let url = format!("nats://127.0.0.1:{port}");
            let token = cluster.token.clone();
            let ready = rt.block_on(async move {
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs(60) {
                    if let Ok(c) = async_nats::ConnectOptions::with_token(token.clone())
                        .connect(url.as_str())
                        .await
                    {
                        let js = async_nats::jetstream::new(c);
                        if js.query_account().await.is_ok() {
                            return true;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                false
            });
            assert!(ready, "JetStream did not come up on cluster node {port}");
        }
        cluster
    }

    /// `nats://127.0.0.1:P1,nats://127.0.0.1:P2,...`: a cluster URL list.
    pub fn urls(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every stream's name and configured replicas (asked of the last node).
    pub fn stream_replicas(&self) -> Vec<(String, usize)> {
        let url = format!("nats://127.0.0.1:{}", self.ports[self.ports.len() - 1]);
        let token = self.token.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            use futures::StreamExt;
            let c = async_nats::ConnectOptions::with_token(token)
                .connect(url.as_str())
                .await
                .expect("connect to the cluster");
            let js = async_nats::jetstream::new(c);
            let mut out = Vec::new();
            let mut streams = js.streams();
            while let Some(s) = streams.next().await {
                let s = s.expect("stream info");
                out.push((s.config.name.clone(), s.config.num_replicas));
            }
            out
        })
    }

    /// Kills node `i` (SIGKILL), as a machine that is lost.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// A random token (`tok` and 32 hex digits from /dev/urandom).
pub fn random_token() -> String {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("read /dev/urandom");
    format!("tok{}", hex::encode(b))
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A `cedana-agent daemon` process; stopped (SIGTERM, then SIGKILL) on drop.
pub struct AgentDaemon {
    pub child: std::process::Child,
    pub stderr_path: PathBuf,
}

impl AgentDaemon {
    pub fn start(nats: &NatsServer, token: &str, job: &str, worker: &str, work_dir: &Path) -> Self {
        Self::start_with(nats, token, job, worker, work_dir, &[])
    }

    /// [`AgentDaemon::start`] with `extra` arguments; spot watching comes only from them, never
    /// from this process's environment.
    pub fn start_with(
        nats: &NatsServer,
        token: &str,
        job: &str,
        worker: &str,
        work_dir: &Path,
        extra: &[&str],
    ) -> Self {
        let stderr_path = work_dir.with_extension("daemon.log");
        let child = Command::new(agent_bin())
            .args([
                "daemon",
                "--job",
                job,
                "--worker",
                worker,
                "--heartbeat-secs",
                "1",
                "--nats-url",
                &nats.url(),
            ])
            .arg("--work-dir")
            .arg(work_dir)
            .args(extra)
            .env("CEDANA_NATS_TOKEN", token)
            .env("CEDANA_CONFIG", "/nonexistent/cedana_config.json")
            .env_remove("CEDANA_WATCH_SPOT")
            .env_remove("CEDANA_IMDS_ENDPOINT")
            .env("RUST_LOG", "cedana_agent=debug")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).expect("daemon log"))
            .spawn()
            .expect("start cedana-agent daemon");
        AgentDaemon { child, stderr_path }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Waits (bounded) for the daemon to exit by itself; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            assert!(
                start.elapsed() < timeout,
                "daemon did not exit within {timeout:?}: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The direct children of `pid` (every thread's), from /proc.
pub fn children_of(pid: i32) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
                .flat_map(|c| {
                    c.split_whitespace()
                        .filter_map(|p| p.parse().ok())
                        .collect::<Vec<i32>>()
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Drop for AgentDaemon {
    fn drop(&mut self) {
        // The tasks it started or restored are its children (each the init of its own PID
        // namespace, so killing it ends everything inside); a daemon that stops leaves them
        // running, as on a real worker, so the test's tasks are ended here.
        for task in children_of(self.child.id() as i32) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(task),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `cedana-driver` binary under test: `$CEDANA_DRIVER_BIN`, else the one cargo built.
pub fn driver_bin() -> PathBuf {
    workspace_bin("cedana-driver", "CEDANA_DRIVER_BIN")
}

/// The repository's root (for example scripts).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Runs `cedana-driver run SCRIPT` with job folders in `state` and the agent under test.
pub fn run_driver(script: &Path, state: &Path) -> Output {
    Command::new(driver_bin())
        .arg("run")
        .arg(script)
        .env("CEDANA_STATE_DIR", state)
        .env("CEDANA_AGENT_BIN", agent_bin())
        .env("CEDANA_CONFIG", "/nonexistent/cedana_config.json")
        .output()
        .expect("run cedana-driver")
}

/// `cedana-driver` with job folders in `state`, the agent under test and no user config.
pub fn driver_cmd(state: &Path) -> Command {
    let mut c = Command::new(driver_bin());
    c.env("CEDANA_STATE_DIR", state)
        .env("CEDANA_AGENT_BIN", agent_bin())
        .env("CEDANA_CONFIG", "/nonexistent/cedana_config.json");
    c
}

/// A `cedana-driver run` in the background, its output in files; taken down on drop.
pub struct BackgroundDriver {
    pub child: std::process::Child,
    pub state: PathBuf,
    out: PathBuf,
    err: PathBuf,
}

impl BackgroundDriver {
    /// Starts `cedana-driver [global args] run [run args] SCRIPT`.
    pub fn start(state: &Path, config: Option<&Path>, run_args: &[&str], script: &Path) -> Self {
        Self::start_env(state, config, run_args, script, &[])
    }

    /// Like [`BackgroundDriver::start`], with more environment for the driver.
    pub fn start_env(
        state: &Path,
        config: Option<&Path>,
        run_args: &[&str],
        script: &Path,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Self {
        let out = state.join("driver.stdout");
        let err = state.join("driver.stderr");
        let mut c = driver_cmd(state);
        if let Some(cfg) = config {
            c.env("CEDANA_CONFIG", cfg);
        }
        c.envs(env.iter().copied());
        let child = c
            .arg("run")
            .args(run_args)
            .arg(script)
            .stdout(std::fs::File::create(&out).expect("stdout file"))
            .stderr(std::fs::File::create(&err).expect("stderr file"))
            .spawn()
            .expect("start cedana-driver");
        BackgroundDriver {
            child,
            state: state.to_path_buf(),
            out,
            err,
        }
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// The job's record (`job.json`), once the driver has written it.
    pub fn record(&self) -> Option<serde_json::Value> {
        let dir = std::fs::read_dir(&self.state)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.join("job.json").is_file())?;
        serde_json::from_slice(&std::fs::read(dir.join("job.json")).ok()?).ok()
    }

    /// Waits until the record satisfies `f` (bounded); returns it.
    pub fn wait_record(
        &self,
        timeout: Duration,
        what: &str,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let start = Instant::now();
        loop {
            if let Some(r) = self.record() {
                if f(&r) {
                    return r;
                }
            }
            assert!(
                start.elapsed() < timeout,
                "timed out waiting for {what}; record: {:?}\nstderr: {}",
                self.record(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits (bounded) for the driver to end; returns its exit code.
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            assert!(
                start.elapsed() < timeout,
                "driver did not end within {timeout:?}\nstdout: {}\nstderr: {}",
                self.stdout(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for BackgroundDriver {
    /// Takes the job down as Ctrl-C does (the controller is a process of its own, which a
    /// killed `run` leaves running); what is still left is ended by `cedana-driver down`.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            for _ in 0..300 {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        down_all(&self.state);
    }
}

/// Ends every job under `state` that is not over (`cedana-driver down`, which also ends what
/// a job whose controller died left running).
pub fn down_all(state: &Path) {
    let Ok(dirs) = std::fs::read_dir(state) else {
        return;
    };
    for d in dirs.flatten() {
        let Ok(bytes) = std::fs::read(d.path().join("job.json")) else {
            continue;
        };
        let Ok(r) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            continue;
        };
        if matches!(r["state"].as_str(), Some("succeeded" | "failed" | "down")) {
            continue;
        }
        if let Some(job) = r["job"].as_str() {
            let _ = driver_cmd(state)
                .args(["down", job])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The numbers printed after a `--- NAME` marker line (the example jobs print their output
/// file that way at the end).
pub fn numbers_after(text: &str, marker: &str) -> Vec<u64> {
    text.split(marker)
        .nth(1)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Publishes a spot interruption notice for `worker` of `job` as its agent would (no
/// checkpoints in it), through JetStream on `nats`.
pub fn publish_spot_notice(nats: &NatsServer, job: &str, worker: &str) {
    use cedana_protocol::{self as protocol, Event, EventEnvelope, SpotKind};
    let env = EventEnvelope {
        v: protocol::VERSION,
        job: job.into(),
        worker: worker.into(),
        at: protocol::now(),
        event: Event::SpotNotice {
            kind: SpotKind::InstanceAction,
            action: Some("terminate".into()),
            at: Some("2026-11-21T01:02:03Z".into()),
            checkpoints: vec![],
            failed: vec![],
        },
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let client = async_nats::ConnectOptions::with_token(nats.token.clone())
            .connect(nats.url())
            .await
            .expect("connect to NATS");
        let js = async_nats::jetstream::new(client);
        js.publish(
            protocol::state_subject(job, worker),
            serde_json::to_vec(&env).expect("serializes").into(),
        )
        .await
        .expect("publish")
        .await
        .expect("stored");
    });
}

/// A tmpfs of `size` (mount's `size=`, e.g. `16m`) mounted on `dir` (made if missing), unmounted
/// when dropped (lazily if it is still busy). Needs root, as the tests that use it do.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).expect("make the mount point");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mount a {size} tmpfs on {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// One HTTP GET of `path` through 127.0.0.1:`port`; the body, if the answer was 200.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.0 200").then(|| body.to_string())
}

/// Flips a byte in chunk `pick(count)` of the largest page image of checkpoint `object` in the
/// folder store at `store` (the task's private memory); returns the chunk's name.
pub fn damage_a_page_chunk(
    store: &std::path::Path,
    object: &str,
    pick: impl Fn(usize) -> usize,
) -> String {
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(store.join("checkpoints").join(format!("{object}.json"))).unwrap(),
    )
    .unwrap();
    let pages = manifest["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"].as_str().unwrap().starts_with("images/pages-"))
        .max_by_key(|e| e["size"].as_u64().unwrap())
        .unwrap()
        .clone();
    let chunks = pages["chunks"].as_array().unwrap();
    let victim = chunks[pick(chunks.len())]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let path = store.join("chunks").join(&victim);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(&path, bytes).unwrap();
    victim
}
