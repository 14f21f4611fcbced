//! The `local` provider: workers are agent daemons started on this machine, priced at zero.
//!
//! Each worker has a folder of its own (`<job>/workers/<id>`), as each machine has its own
//! disk. Restored tasks reopen their files by path, so every worker must show its folder at
//! the same path, as the same path exists on every machine: as root, each daemon runs in a
//! mount namespace of its own where its folder is bind-mounted on the job's work path
//! (`<job>/work`), and in a network namespace of its own (a separate host), joined to this
//! machine by a veth pair; the driver forwards a port on the host side of that pair to the NATS
//! server, so the worker reaches NATS as a remote machine would. Without root, workers share
//! `<job>/work` and this machine's network, and say so.

pub mod container;
pub mod netns;

pub use netns::NetNs;
use netns::{forward, ip};

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::providers::common::{Bootstrap, Gone, Offer, ProviderError, Spec};

/// The provider's name.
pub const NAME: &str = "local";

/// A local worker: the daemon process and the tasks it reported.
pub struct LocalWorker {
    pub id: String,
    pub pid: i32,
    /// The worker's own folder on this machine (what it sees at the job's work path).
    pub dir: PathBuf,
    /// Whether the worker runs in its own mount namespace.
    pub isolated: bool,
    /// Set when the daemon has exited.
    exited: Gone,
    pub task_pids: Vec<i32>,
    /// The worker's network namespace, if it has one (removed when the worker ends).
    pub netns: Option<NetNs>,
    forwarder: Option<tokio::task::AbortHandle>,
    /// Forwards a loopback S3-compatible endpoint of the checkpoint store (see
    /// [`loopback_store_endpoint`]).
    store_forwarder: Option<tokio::task::AbortHandle>,
    /// This machine's address on the veth pair and the port forwarded there to NATS.
    pub forward: Option<(std::net::Ipv4Addr, u16)>,
    /// runc's state folder and the container id, for a container worker.
    container: Option<(PathBuf, String)>,
    /// Left as it was when lost ([`LocalWorker::abandon`]).
    abandoned: bool,
    /// Set when the driver ends the daemon.
    ending: std::sync::Arc<std::sync::atomic::AtomicBool>,
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
    #[error(transparent)]
    Container(#[from] container::ContainerError),
    #[error("container workers need root and network namespaces: {0}")]
    NoIsolation(String),
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
    /// The job's checkpoint store, for the daemon's `--store`.
    pub store: Option<&'a str>,
    /// The job's checkpoint bucket, for the daemon's `--checkpoint-bucket`.
    pub bucket: Option<&'a str>,
    /// Runs the NATS forwarder of a worker in its own network namespace.
    pub rt: &'a tokio::runtime::Handle,
    /// Boot the worker as a runc container from this OCI image layout instead of a process.
    pub image: Option<&'a Path>,
}

/// `cedana-agent daemon` arguments for a worker (the token goes in the environment).
fn daemon_args(s: &LaunchSpec, nats_url: &str, work_dir: &Path) -> Vec<String> {
    [
        "daemon",
        "--job",
        s.job,
        "--worker",
        s.id,
        "--nats-url",
        nats_url,
        "--heartbeat-secs",
        "2",
        "--work-dir",
    ]
    .iter()
    .map(|a| a.to_string())
    .chain(std::iter::once(work_dir.display().to_string()))
    .chain(
        s.shared_storage
            .iter()
            .flat_map(|d| ["--shared-storage".to_string(), d.display().to_string()]),
    )
    .chain(
        s.store
            .iter()
            .flat_map(|u| ["--store".to_string(), u.to_string()]),
    )
    .chain(
        s.bucket
            .iter()
            .flat_map(|b| ["--checkpoint-bucket".to_string(), b.to_string()]),
    )
    .collect()
}

/// For an `s3://` store whose `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT`) is on this machine's
/// loopback (a test server, a local MinIO): its scheme and `host:port`, which a worker in its
/// own network namespace reaches only through a forwarder.
fn loopback_store_endpoint(store: Option<&str>) -> Option<(String, String)> {
    if !store?.starts_with("s3") {
        return None;
    }
    let ep = std::env::var("AWS_ENDPOINT_URL")
        .or_else(|_| std::env::var("AWS_ENDPOINT"))
        .ok()?;
    let url = reqwest::Url::parse(&ep).ok()?;
    let host = url.host_str()?;
    let loopback = host == "localhost"
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback());
    let port = url.port_or_known_default()?;
    // Plain HTTP only: a TLS server's name would not match the forwarder's address.
    (loopback && url.scheme() == "http")
        .then(|| (url.scheme().to_string(), format!("{host}:{port}")))
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
        // A separate host where the machine allows: its own network namespace, NATS reached
        // through a forwarded port.
        let mut nats_url = s.nats_url.to_string();
        let mut netns = None;
        let mut forwarder = None;
        let mut forward_at = None;
        let mut netns_fd = None;
        let mut store_forwarder = None;
        let mut store_endpoint = None;
        if isolated {
            let name = format!("cedana-{}-{}", s.job, s.id);
            let setup = (|| -> std::io::Result<_> {
                let ns = NetNs::create(&name)?;
                let to = cedana_protocol::NatsUrl::parse(s.nats_url).addrs();
                if to.is_empty() {
                    return Err(std::io::Error::other("cannot read the NATS URL"));
                }
                let listener = std::net::TcpListener::bind((ns.host_ip, 0))?;
                listener.set_nonblocking(true)?;
                let listener = {
                    let _rt = s.rt.enter();
                    tokio::net::TcpListener::from_std(listener)?
                };
                let port = listener.local_addr()?.port();
                let fd = std::fs::File::open(format!("/run/netns/{name}"))?;
                Ok((ns, listener, port, to, fd))
            })();
            match setup {
                Ok((ns, listener, port, to, fd)) => {
                    // A store's S3-compatible server on this machine's loopback is out of the
                    // worker's reach: forwarded like NATS.
                    if let Some((scheme, addr)) = loopback_store_endpoint(s.store) {
                        let bound = std::net::TcpListener::bind((ns.host_ip, 0)).and_then(|l| {
                            l.set_nonblocking(true)?;
                            let _rt = s.rt.enter();
                            tokio::net::TcpListener::from_std(l)
                        });
                        match bound.and_then(|l| Ok((l.local_addr()?.port(), l))) {
                            Ok((p, l)) => {
                                store_endpoint = Some(format!("{scheme}://{}:{p}", ns.host_ip));
                                store_forwarder =
                                    Some(s.rt.spawn(forward(l, vec![addr])).abort_handle());
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot forward the checkpoint store's endpoint to the worker")
                            }
                        }
                    }
                    nats_url = format!("nats://{}:{port}", ns.host_ip);
                    forward_at = Some((ns.host_ip, port));
                    forwarder = Some(s.rt.spawn(forward(listener, to)).abort_handle());
                    netns = Some(ns);
                    netns_fd = Some(fd);
                }
                Err(e) => {
                    let _ = ip(&["netns", "del", &name]);
                    if s.image.is_some() {
                        return Err(LocalError::NoIsolation(e.to_string()));
                    }
                    tracing::warn!(error = %e, worker = s.id, "no network namespace for the worker; it shares this machine's network");
                }
            }
        } else if s.image.is_some() {
            return Err(LocalError::NoIsolation("run the driver as root".into()));
        }
        if let (Some(image), Some(ns)) = (s.image, netns.as_ref()) {
            let runc_root = s.work_path.parent().unwrap_or(Path::new("/")).join("runc");
            let id = format!("cedana-{}-{}", s.job, s.id);
            let bundle = s.dir.with_extension("bundle");
            let store_folder: Option<PathBuf> = s
                .store
                .and_then(|u| cedana_store::StoreUrl::parse(u).ok())
                .and_then(|u| u.folder().map(Path::to_path_buf));
            if let Some(f) = &store_folder {
                std::fs::create_dir_all(f).map_err(derr(f))?;
            }
            let mut args = vec!["/usr/local/bin/cedana-agent".to_string()];
            args.extend(daemon_args(s, &nats_url, Path::new(container::WORK_PATH)));
            let mut env = vec![
                ("CEDANA_NATS_TOKEN".to_string(), s.token.to_string()),
                ("CEDANA_CRIU".to_string(), "/usr/sbin/criu".to_string()),
            ];
            if let Ok(l) = std::env::var("RUST_LOG") {
                env.push(("RUST_LOG".into(), l));
            }
            // The store's credentials and endpoint, the standard way.
            for (k, v) in std::env::vars() {
                let cloud =
                    k.starts_with("AWS_") || k.starts_with("AZURE_") || k.starts_with("GOOGLE_");
                if s.store.is_some() && cloud {
                    env.push((k, v));
                }
            }
            if let Some(ep) = &store_endpoint {
                env.retain(|(k, _)| k != "AWS_ENDPOINT_URL" && k != "AWS_ENDPOINT");
                env.push(("AWS_ENDPOINT_URL".into(), ep.clone()));
            }
            let mut child = container::start(container::ContainerSpec {
                image,
                bundle: &bundle,
                runc_root: &runc_root,
                id: &id,
                args,
                env,
                work_dir: s.dir,
                // A folder store is the shared folder of a container worker.
                shared: s.shared_storage.or(store_folder.as_deref()),
                netns: ns,
                log,
            })?;
            let pid = child.id() as i32;
            let exited = Gone::new();
            let flag = exited.clone();
            std::thread::spawn(move || {
                let _ = child.wait();
                flag.set();
            });
            return Ok(LocalWorker {
                id: s.id.into(),
                pid,
                dir: s.dir.to_path_buf(),
                isolated: true,
                exited,
                task_pids: Vec::new(),
                netns,
                forwarder,
                store_forwarder: store_forwarder.take(),
                forward: forward_at,
                container: Some((runc_root, id)),
                abandoned: false,
                ending: Default::default(),
            });
        }
        let mut cmd = Command::new(&agent);
        if let Some(ep) = &store_endpoint {
            cmd.env_remove("AWS_ENDPOINT").env("AWS_ENDPOINT_URL", ep);
        }
        cmd.args(daemon_args(s, &nats_url, s.work_path))
            .env("CEDANA_NATS_TOKEN", s.token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if isolated {
            let cstr = |p: &Path| CString::new(p.as_os_str().as_bytes()).expect("no NUL in paths");
            let (src, dst) = (cstr(s.dir), cstr(s.work_path));
            let net = netns_fd.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
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
                    ))?;
                    if let Some(fd) = net {
                        check(libc::setns(fd, libc::CLONE_NEWNET))?;
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .spawn()
            .map_err(|source| LocalError::Spawn { agent, source })?;
        let pid = child.id() as i32;
        let exited = Gone::new();
        let flag = exited.clone();
        let worker = s.id.to_string();
        let log_path = s.log.to_path_buf();
        let ending = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ended_by_us = ending.clone();
        std::thread::spawn(move || {
            let status = child.wait();
            if !ended_by_us.load(std::sync::atomic::Ordering::SeqCst) {
                // Not ended by the driver (that sets the flag first): say how, for the record.
                let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(3).collect();
                tracing::warn!(worker, ?status, log = ?tail, "the worker's agent exited by itself");
            }
            flag.set();
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
            netns,
            forwarder,
            store_forwarder: store_forwarder.take(),
            forward: forward_at,
            container: None,
            abandoned: false,
            ending,
        })
    }

    /// Takes back a worker a driver that died launched (for `resume`): daemon `pid` must
    /// still be that worker's agent (`--job JOB --worker ID` on its command line), else the
    /// worker is gone. Its NATS port is forwarded again at `forward`, to `nats_url`.
    pub fn adopt(a: Adopt) -> Result<Self, LocalError> {
        let exited = Gone::new();
        let alive = is_worker_daemon(a.pid, a.job, a.id);
        if !alive {
            exited.set();
        }
        let mut forwarder = None;
        if let (Some((host_ip, port)), true) = (a.forward, alive) {
            let to = cedana_protocol::NatsUrl::parse(a.nats_url).addrs();
            let listener = std::net::TcpListener::bind((host_ip, port))
                .and_then(|l| l.set_nonblocking(true).map(|_| l))
                .and_then(|l| {
                    let _rt = a.rt.enter();
                    tokio::net::TcpListener::from_std(l)
                })
                .map_err(|source| LocalError::Dir {
                    path: PathBuf::from(format!("{host_ip}:{port}")),
                    source,
                })?;
            forwarder = Some(a.rt.spawn(forward(listener, to)).abort_handle());
        }
        // The daemon is not this process's child: its end is seen by looking.
        if alive {
            let (flag, pid, job, id) = (exited.clone(), a.pid, a.job.to_string(), a.id.to_string());
            std::thread::spawn(move || {
                while !flag.is_set() {
                    if !is_worker_daemon(pid, &job, &id) {
                        flag.set();
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            });
        }
        Ok(LocalWorker {
            id: a.id.into(),
            pid: a.pid,
            dir: a.dir.to_path_buf(),
            isolated: a.netns.is_some(),
            exited,
            task_pids: a.task_pids,
            netns: a.netns.map(|name| NetNs {
                name: name.to_string(),
                host_ip: a
                    .forward
                    .map(|f| f.0)
                    .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
            }),
            forwarder,
            store_forwarder: None,
            forward: a.forward,
            container: None,
            abandoned: false,
            ending: Default::default(),
        })
    }

    /// What turns true when the daemon exits (or the worker is terminated).
    pub fn gone(&self) -> Gone {
        self.exited.clone()
    }

    /// Whether the daemon has exited.
    pub fn exited(&self) -> bool {
        self.exited.is_set()
    }

    /// Ends a lost worker, as its provider would: with `CEDANA_LOCAL_LEAVE_LOST=1` it is
    /// left running instead ([`LocalWorker::abandon`]), standing for a provider that cannot
    /// end a machine (its API fails, the machine is cut off): what the lease (fencing) must
    /// cover, and what its tests use.
    pub fn lose(&mut self) {
        if std::env::var_os("CEDANA_LOCAL_LEAVE_LOST").is_some_and(|v| v == "1") {
            tracing::warn!(worker = %self.id, "CEDANA_LOCAL_LEAVE_LOST: the lost worker is left running");
            self.abandon();
        } else {
            self.terminate();
        }
    }

    /// Leaves the worker running as it is: its daemon, tasks, namespace and NATS forwarder.
    pub fn abandon(&mut self) {
        self.abandoned = true;
        if let Some(ns) = self.netns.take() {
            std::mem::forget(ns);
        }
        // Not aborted: the worker reaches NATS again when its link comes back.
        self.forwarder = None;
        self.task_pids.clear();
        self.container = None;
    }

    /// Ends the worker as an instance ends: its tasks and the daemon are killed, its network
    /// namespace removed.
    pub fn terminate(&mut self) {
        if self.abandoned {
            return;
        }
        self.stop_processes();
        // Processes left in the worker's namespace after its agent died (no longer under it).
        if let Some(ns) = &self.netns {
            if let Ok(out) = Command::new("ip")
                .args(["netns", "pids", &ns.name])
                .output()
            {
                for pid in String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
        if let Some(f) = self.forwarder.take() {
            f.abort();
        }
        if let Some(f) = self.store_forwarder.take() {
            f.abort();
        }
        self.netns.take();
    }

    fn stop_processes(&mut self) {
        if let Some((root, id)) = self.container.take() {
            // The container's processes all die with it (PIDs there are not this machine's).
            self.task_pids.clear();
            container::remove(&root, &id);
            self.exited.wait_timeout(Duration::from_secs(5));
            return;
        }
        for pid in self.task_pids.drain(..) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        // Everything else the worker started (what a command left in the background, a
        // daemon a task detached: the agent is their subreaper), so nothing outlives it or
        // keeps its network namespace alive.
        if !self.exited() {
            for pid in crate::util::descendants(self.pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        if self.exited() {
            return;
        }
        // Ended by the driver: the watcher does not report it as an agent that exited.
        self.ending.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGTERM);
        if self.exited.wait_timeout(Duration::from_secs(2)) {
            return;
        }
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        self.exited.wait_timeout(Duration::from_secs(2));
    }
}

impl Drop for LocalWorker {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// What a resumed driver knows of a local worker (from the job's record).
pub struct Adopt<'a> {
    pub job: &'a str,
    pub id: &'a str,
    pub pid: i32,
    pub dir: &'a Path,
    pub netns: Option<&'a str>,
    pub forward: Option<(std::net::Ipv4Addr, u16)>,
    pub nats_url: &'a str,
    pub task_pids: Vec<i32>,
    pub rt: &'a tokio::runtime::Handle,
}

/// Whether `pid` is the agent daemon of worker `id` of `job` (and not a zombie).
pub fn is_worker_daemon(pid: i32, job: &str, id: &str) -> bool {
    if pid <= 0 {
        return false;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    if matches!(
        stat.rsplit_once(')')
            .and_then(|(_, r)| r.trim_start().chars().next()),
        Some('Z' | 'X') | None
    ) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let has = |flag: &[u8], value: &str| {
        args.windows(2)
            .any(|w| w[0] == flag && w[1] == value.as_bytes())
    };
    has(b"--job", job) && has(b"--worker", id)
}

/// The `local` provider: one offer, this machine, free. The price catalog may also name
/// `local` machine types with prices (`"provider": "local"`): then those are the offers, each
/// launching a worker on this machine. That lets a job try price-driven behaviour (`price`,
/// arbitrage) without a cloud; the catalog is read again at every pricing, so a changed
/// price is seen by a running job.
pub struct LocalProvider {
    /// Boot workers as containers from this worker image instead of as processes.
    pub image: Option<PathBuf>,
}

/// This machine's memory in GB (from /proc/meminfo).
fn memory_gb() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(0.0)
}

impl LocalProvider {
    /// Its offers (every one of them: the ranking says which fit).
    pub fn offers(&self, _spec: &Spec) -> Result<Vec<Offer>, ProviderError> {
        let priced = crate::providers::catalog::Catalog::load()
            .map_err(|e| ProviderError::Failed {
                provider: "local".into(),
                message: e.to_string(),
            })?
            .offers("local", &[]);
        if !priced.is_empty() {
            return Ok(priced);
        }
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        Ok(vec![Offer {
            provider: "local".into(),
            instance_type: if self.image.is_some() {
                "local-container".into()
            } else {
                "local".into()
            },
            vcpus: cpus as f64,
            memory_gb: (memory_gb() * 10.0).round() / 10.0,
            gpu: None,
            gpu_count: 0,
            vram_gb: 0.0,
            region: "local".into(),
            zone: None,
            price_usd_hour: 0.0,
            spot: false,
            price_source: "free (this machine)".into(),
            priced_at: None,
        }])
    }

    /// Starts a worker's daemon on this machine (it blocks until the daemon is started).
    pub fn launch(&mut self, _offer: &Offer, b: &Bootstrap) -> Result<LocalWorker, ProviderError> {
        let dir = b.job_dir.join("workers").join(b.worker);
        let log = b.job_dir.join("logs").join(format!("{}.log", b.worker));
        let w = LocalWorker::launch(&LaunchSpec {
            job: b.job,
            id: b.worker,
            nats_url: b.nats_url,
            token: b.token,
            work_path: &b.job_dir.join("work"),
            dir: &dir,
            log: &log,
            shared_storage: b.shared_storage,
            store: b.store,
            bucket: b.bucket,
            rt: b.rt,
            image: self.image.as_deref(),
        })
        .map_err(|e| ProviderError::Failed {
            provider: "local".into(),
            message: e.to_string(),
        })?;
        if !w.isolated {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                tracing::warn!(
                    "not root: local workers share the job's folder and this machine's network"
                )
            });
        }
        Ok(w)
    }
}
