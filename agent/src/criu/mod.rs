//! A client of CRIU's RPC interface: each request runs in its own `criu swrk` child over a
//! `SOCK_SEQPACKET` socket pair, one protobuf message per packet. The one exception is the
//! streamed restore ([`Criu::restore_streamed`]): `criu restore --stream` as a command.
//!
//! Architecture invariant: this module is the only place in the workspace that starts CRIU.

pub mod images;
pub mod proto;

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use cedana_protocol::{CgroupMode, CriuOptions, NetworkLock, TcpMode};
use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockType};
use prost::Message;
use serde::Serialize;
use tracing::{debug, warn};

use proto::{Req, ReqType, Resp};

/// The oldest CRIU this agent accepts: 4.2 handles the vDSO layout of Linux 6.13+ and the socket
/// options Linux 6.16 restricted.
pub const MIN_VERSION: CriuVersion = CriuVersion {
    major: 4,
    minor: 2,
    sublevel: 0,
};

/// Errors of the CRIU client.
#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error("no CRIU binary found (looked for {looked}); install CRIU >= {MIN_VERSION} (README: \"Install\") or point --criu, CEDANA_CRIU or criu.path in the config at it")]
    NotFound { looked: String },
    #[error("cannot start {path} swrk: {source}")]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to CRIU ({path}) failed: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CRIU ({path}) sent a message that is not a valid criu_resp: {source}")]
    Decode {
        path: PathBuf,
        source: prost::DecodeError,
    },
    #[error("CRIU ({path}) closed the connection without answering{stderr}")]
    NoAnswer { path: PathBuf, stderr: String },
    #[error("CRIU {request} failed{errno}{errmsg}{log}")]
    Failed {
        request: &'static str,
        errno: String,
        errmsg: String,
        /// The tail of CRIU's log, quoted.
        log: String,
        /// Where CRIU's full log is, if it was kept.
        log_path: Option<PathBuf>,
    },
}

impl CriuError {
    /// The full log CRIU wrote for a failed request, if one was kept.
    pub fn log_path(&self) -> Option<&Path> {
        match self {
            CriuError::Failed { log_path, .. } => log_path.as_deref(),
            _ => None,
        }
    }
}

/// CRIU's version triple.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct CriuVersion {
    pub major: i32,
    pub minor: i32,
    pub sublevel: i32,
}

impl std::fmt::Display for CriuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)?;
        if self.sublevel != 0 {
            write!(f, ".{}", self.sublevel)?;
        }
        Ok(())
    }
}

/// Kernel and CRIU features CRIU reports through `FEATURE_CHECK`.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Features {
    /// Memory change tracking (soft-dirty bits): iterative pre-dumps.
    pub mem_track: bool,
    /// Lazy restore through userfaultfd.
    pub lazy_pages: bool,
    /// pidfd store (PID reuse detection across pre-dumps).
    pub pidfd_store: bool,
}

/// Options of a dump request.
#[derive(Clone, Debug, Default)]
pub struct DumpRequest {
    pub pid: i32,
    pub images_dir: PathBuf,
    pub leave_running: bool,
    /// Leave the tree frozen (SIGSTOP) after the dump instead of killing it.
    pub leave_stopped: bool,
    pub shell_job: bool,
    /// The tree has a user namespace and a minimal mount tree of its own
    /// ([`crate::exec::ExecOptions::userns`]): its mounts are external, bind mounts of ours.
    pub user_namespace: bool,
    /// Its tree's mounts of the task's folders: external, each under a key of its own.
    pub user_namespace_mounts: Vec<PathBuf>,
    /// TCP, unix sockets, cgroups, network lock, externals (see [`CriuOptions`]).
    pub criu: CriuOptions,
}

/// Options of a restore request.
#[derive(Clone, Debug, Default)]
pub struct RestoreRequest {
    pub images_dir: PathBuf,
    pub shell_job: bool,
    /// The tree had a user namespace and a minimal mount tree of its own: CRIU runs in such
    /// a tree (root filesystem, `/dev`, `/proc`) and restores the task's mounts onto it.
    pub user_namespace: bool,
    /// The other mounts of that tree (the task's folders), bound at the same paths.
    pub user_namespace_mounts: Vec<PathBuf>,
    /// TCP, unix sockets, cgroups, network lock, externals (see [`CriuOptions`]); the
    /// dump-only ones are ignored.
    pub criu: CriuOptions,
    /// Restore the tree as a child of the calling process (needs a subreaper to reap it);
    /// otherwise it is a child of `criu` and is reparented when `criu` exits.
    pub as_sibling: bool,
    /// Leave private anonymous memory to CRIU's lazy-pages daemon (already listening on the
    /// images folder's `lazy-pages.socket`): the tree runs before that memory is back.
    pub lazy_pages: bool,
}

/// Puts `o` into CRIU's options; `dump`: the dump-only ones too. Established connections are
/// locked with nftables unless another method is named (iptables is often missing).
fn apply(opts: &mut proto::Opts, o: &CriuOptions, dump: bool) {
    opts.tcp_established = Some(o.tcp == TcpMode::Established);
    opts.tcp_close = Some(o.tcp == TcpMode::Close);
    opts.ext_unix_sk = Some(o.ext_unix_sk);
    opts.network_lock = match (o.network_lock, o.tcp) {
        (Some(m), _) => Some(m.rpc()),
        (None, TcpMode::Established) => Some(NetworkLock::Nftables.rpc()),
        (None, _) => None,
    };
    if let Some(m) = o.manage_cgroups {
        opts.manage_cgroups = Some(true);
        opts.manage_cgroups_mode = Some(m.rpc());
    }
    opts.external = o.external.clone();
    if dump {
        if o.link_remap {
            opts.link_remap = Some(true);
        }
        opts.ghost_limit = o.ghost_limit;
        if o.skip_in_flight {
            opts.tcp_skip_in_flight = Some(true);
        }
    }
}

/// Shuts a connection down when dropped.
struct ShutOnDrop(Option<std::os::unix::net::UnixStream>);

impl Drop for ShutOnDrop {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A restore's options on CRIU's command line (see [`apply`] for the RPC's).
fn cli_restore_options(o: &CriuOptions) -> Vec<String> {
    let mut v = Vec::new();
    match o.tcp {
        TcpMode::Established => v.push("--tcp-established".to_string()),
        TcpMode::Close => v.push("--tcp-close".to_string()),
        TcpMode::Refuse => {}
    }
    if o.ext_unix_sk {
        v.push("--ext-unix-sk".into());
    }
    let lock = match (o.network_lock, o.tcp) {
        (Some(m), _) => Some(m),
        (None, TcpMode::Established) => Some(NetworkLock::Nftables),
        (None, _) => None,
    };
    if let Some(m) = lock {
        v.push("--network-lock".into());
        v.push(
            match m {
                NetworkLock::Iptables => "iptables",
                NetworkLock::Nftables => "nftables",
                NetworkLock::Skip => "skip",
            }
            .into(),
        );
    }
    if let Some(m) = o.manage_cgroups {
        let mode = match m {
            CgroupMode::Ignore => "ignore",
            CgroupMode::None => "none",
            CgroupMode::Props => "props",
            CgroupMode::Soft => "soft",
            CgroupMode::Full => "full",
            CgroupMode::Strict => "strict",
        };
        v.push(format!("--manage-cgroups={mode}"));
    }
    for e in &o.external {
        v.push("--external".into());
        v.push(e.clone());
    }
    v
}

/// A CRIU installation driven through `criu swrk`.
#[derive(Clone, Debug)]
pub struct Criu {
    path: PathBuf,
    /// Its version, asked once (every dump and lazy restore needs it; a CRIU swapped under a
    /// running agent is not seen until the agent starts again).
    version: std::sync::Arc<std::sync::OnceLock<CriuVersion>>,
}

/// Name of the log CRIU writes into the images directory.
pub const DUMP_LOG: &str = "dump.log";
/// Name of the log CRIU writes into the images directory on restore.
pub const RESTORE_LOG: &str = "restore.log";
/// The socket `criu restore --stream` connects to in its images folder.
pub const STREAMER_SOCKET: &str = "streamer-serve.sock";
/// Where a streamed restore's CRIU writes the restored root's PID, in the images folder.
const RESTORED_PID: &str = "restored.pid";
/// The statistics CRIU writes into its folder once a restored tree runs.
const RESTORE_STATS: &str = "stats-restore";
const LOG_TAIL_LINES: usize = 12;

impl Criu {
    /// Uses the CRIU binary at `path` as given.
    pub fn at(path: impl Into<PathBuf>) -> Self {
        Criu {
            path: path.into(),
            version: Default::default(),
        }
    }

    /// Finds CRIU: the explicit path (flag, env or config, first wins), else `criu` on `PATH`,
    /// else the usual install locations.
    pub fn locate(explicit: Option<&Path>) -> Result<Self, CriuError> {
        if let Some(p) = explicit {
            if p.is_file() {
                return Ok(Criu::at(p));
            }
            return Err(CriuError::NotFound {
                looked: p.display().to_string(),
            });
        }
        let mut looked = Vec::new();
        let path_var = std::env::var_os("PATH").unwrap_or_default();
        let candidates = std::env::split_paths(&path_var)
            .map(|d| d.join("criu"))
            .chain(["/usr/local/sbin/criu", "/usr/sbin/criu", "/sbin/criu"].map(PathBuf::from));
        for c in candidates {
            if c.is_file() {
                return Ok(Criu::at(c));
            }
            looked.push(c.display().to_string());
        }
        looked.dedup();
        Err(CriuError::NotFound {
            looked: format!("criu on PATH and in {}", looked.join(", ")),
        })
    }

    /// The binary this client runs.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// CRIU's version (`VERSION` request).
    pub fn version(&self) -> Result<CriuVersion, CriuError> {
        if let Some(v) = self.version.get() {
            return Ok(*v);
        }
        let resp = self.call(req(ReqType::Version, None), "version", None)?;
        let v = resp.version.unwrap_or_default();
        let v = CriuVersion {
            major: v.major_number,
            minor: v.minor_number,
            sublevel: v.sublevel.unwrap_or(0),
        };
        Ok(*self.version.get_or_init(|| v))
    }

    /// `criu check`: whether CRIU can work on this kernel at all.
    pub fn check(&self) -> Result<(), CriuError> {
        let dir = tempfile::tempdir().map_err(|source| self.io(source))?;
        let mut r = req(ReqType::Check, Some(log_opts(dir.path(), "check.log")));
        r.keep_open = None;
        self.call(r, "check", Some(&dir.path().join("check.log")))
            .map(|_| ())
    }

    /// Which optional features the kernel and CRIU support.
    pub fn features(&self) -> Result<Features, CriuError> {
        let mut r = req(ReqType::FeatureCheck, None);
        r.features = Some(proto::Features {
            mem_track: Some(true),
            lazy_pages: Some(true),
            pidfd_store: Some(true),
        });
        let f = self
            .call(r, "feature check", None)?
            .features
            .unwrap_or_default();
        Ok(Features {
            mem_track: f.mem_track.unwrap_or(false),
            lazy_pages: f.lazy_pages.unwrap_or(false),
            pidfd_store: f.pidfd_store.unwrap_or(false),
        })
    }

    /// Dumps a process tree into `req.images_dir`. CRIU's log stays there as [`DUMP_LOG`].
    pub fn dump(
        &self,
        req_opts: &DumpRequest,
        on_notify: &mut dyn FnMut(&str),
    ) -> Result<(), CriuError> {
        let mut opts = log_opts(&req_opts.images_dir, DUMP_LOG);
        opts.pid = Some(req_opts.pid);
        opts.leave_running = Some(req_opts.leave_running);
        opts.leave_stopped = Some(req_opts.leave_stopped && !req_opts.leave_running);
        opts.shell_job = Some(req_opts.shell_job);
        opts.file_locks = Some(true);
        opts.notify_scripts = Some(true);
        apply(&mut opts, &req_opts.criu, true);
        if req_opts.user_namespace {
            opts.auto_ext_mnt = Some(true);
            opts.ext_masters = Some(true);
            // The task's folders by a key, which the restore maps to the same paths of its
            // own tree (auto-detected, they would be bound from the same directory of the
            // filesystem: another worker's folder).
            for (i, m) in req_opts.user_namespace_mounts.iter().enumerate() {
                opts.external
                    .push(format!("mnt[{}]:{}", m.display(), folder_key(i)));
            }
        }
        let log = req_opts.images_dir.join(DUMP_LOG);
        self.call_notify(
            req(ReqType::Dump, Some(opts)),
            "dump",
            Some(&log),
            on_notify,
        )
        .map(|_| ())
    }

    /// Restores the tree whose images are in `req.images_dir` and returns the PID of its root.
    pub fn restore(
        &self,
        r: &RestoreRequest,
        on_notify: &mut dyn FnMut(&str),
    ) -> Result<i32, CriuError> {
        let mut opts = log_opts(&r.images_dir, RESTORE_LOG);
        opts.shell_job = Some(r.shell_job);
        opts.file_locks = Some(true);
        opts.notify_scripts = Some(true);
        opts.rst_sibling = Some(r.as_sibling);
        if r.lazy_pages {
            opts.lazy_pages = Some(true);
        }
        apply(&mut opts, &r.criu, false);
        // CRIU runs in a minimal mount tree (see `Session::start`) where the images folder
        // may not be at its path: it is handed over open, and found through our /proc.
        let images = match r.user_namespace {
            true => Some(std::fs::File::open(&r.images_dir).map_err(|e| self.io(e))?),
            false => None,
        };
        if let Some(dir) = &images {
            for (i, m) in r.user_namespace_mounts.iter().enumerate() {
                opts.external
                    .push(format!("mnt[{}]:{}", folder_key(i), m.display()));
            }
            opts.images_dir_fd = dir.as_raw_fd();
            opts.images_dir = None;
            opts.root = Some("/".into());
            opts.mntns_compat_mode = Some(true);
            opts.auto_ext_mnt = Some(true);
            opts.ext_masters = Some(true);
        }
        let log = r.images_dir.join(RESTORE_LOG);
        let tree = match r.user_namespace {
            true => Some(
                crate::minroot::MinimalRoot::new(&r.user_namespace_mounts, false)
                    .map_err(|e| self.io(e))?,
            ),
            false => None,
        };
        let resp = self.call_notify_in(
            req(ReqType::Restore, Some(opts)),
            "restore",
            Some(&log),
            on_notify,
            tree.as_ref(),
        );
        drop(images);
        if r.user_namespace {
            remove_tmpfs_yards(&log);
        }
        let resp = resp?;
        match resp.restore {
            Some(rr) => Ok(rr.pid),
            None => Err(CriuError::Failed {
                request: "restore",
                errno: String::new(),
                errmsg: ": CRIU reported success but no PID".into(),
                log: String::new(),
                log_path: Some(log),
            }),
        }
    }

    /// Restores as [`Self::restore`] does, but CRIU asks `serve` for every image instead of
    /// reading the images folder: `criu restore --stream`, CRIU's image-streamer protocol,
    /// which its RPC cannot use, so CRIU runs here as a command. `serve` gets the one
    /// connection CRIU makes to [`STREAMER_SOCKET`] in `r.images_dir`, and answers until it
    /// ends (see [`crate::streamer`]); the connection is shut once CRIU has exited. Not for
    /// lazy restores or trees with a user namespace of their own (they need the RPC).
    pub fn restore_streamed(
        &self,
        r: &RestoreRequest,
        serve: &(dyn Fn(std::os::unix::net::UnixStream) + Sync),
    ) -> Result<i32, CriuError> {
        use std::os::unix::net::UnixListener;
        use std::sync::atomic::{AtomicBool, Ordering};
        if r.lazy_pages || r.user_namespace {
            return Err(self.io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a lazy or user-namespace restore cannot stream its images",
            )));
        }
        let dir = std::fs::File::open(&r.images_dir).map_err(|e| self.io(e))?;
        let socket = r.images_dir.join(STREAMER_SOCKET);
        let _ = std::fs::remove_file(&socket);
        // Bound through the folder's descriptor: a socket's path is limited to 107 bytes, the
        // staging folder's is not. CRIU runs in the folder and connects to `./NAME`.
        let listener = UnixListener::bind(format!(
            "/proc/self/fd/{}/{STREAMER_SOCKET}",
            dir.as_raw_fd()
        ))
        .map_err(|e| self.io(e))?;
        listener.set_nonblocking(true).map_err(|e| self.io(e))?;
        // Absolute: CRIU runs in the images folder.
        let pidfile =
            std::path::absolute(r.images_dir.join(RESTORED_PID)).map_err(|e| self.io(e))?;
        let _ = std::fs::remove_file(&pidfile);
        // CRIU writes its statistics once the tree runs: what tells success where a
        // subreaper's reaper (the daemon's) took CRIU's exit status first.
        let stats = r.images_dir.join(RESTORE_STATS);
        let _ = std::fs::remove_file(&stats);
        let mut cmd = Command::new(&self.path);
        cmd.current_dir(&r.images_dir)
            .args(["restore", "--stream", "-D", ".", "-o", RESTORE_LOG])
            .arg(format!("-v{}", log_level()))
            .args(["--file-locks", "-d", "--pidfile"])
            .arg(&pidfile)
            .args(cli_restore_options(&r.criu))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if r.shell_job {
            cmd.arg("--shell-job");
        }
        if r.as_sibling {
            cmd.arg("--restore-sibling");
        }
        let mut child = cmd.spawn().map_err(|source| CriuError::Spawn {
            path: self.path.clone(),
            source,
        })?;
        let mut stderr = child.stderr.take();
        let criu_done = AtomicBool::new(false);
        let conn_slot: std::sync::Mutex<Option<std::os::unix::net::UnixStream>> =
            std::sync::Mutex::new(None);
        let (status, said) = std::thread::scope(|s| {
            let said = s.spawn(move || {
                let mut text = String::new();
                if let Some(e) = stderr.as_mut() {
                    let _ = e.read_to_string(&mut text);
                }
                text
            });
            let (criu_done, conn_slot) = (&criu_done, &conn_slot);
            // Owns the listener: however serving ends (a failed accept too), the socket goes
            // with it, and CRIU cannot connect to nobody.
            let server = s.spawn(move || loop {
                match listener.accept() {
                    Ok((conn, _)) => {
                        if conn.set_nonblocking(false).is_err() {
                            return;
                        }
                        if let Ok(c) = conn.try_clone() {
                            *conn_slot.lock().expect("not poisoned") = Some(c);
                        }
                        // CRIU may have ended between the accept and the slot being filled.
                        if criu_done.load(Ordering::SeqCst) {
                            let _ = conn.shutdown(std::net::Shutdown::Both);
                        }
                        // However `serve` ends (a panic too), CRIU is told: the copy kept
                        // above would otherwise hold the connection open, CRIU waiting on it.
                        let _end = ShutOnDrop(conn.try_clone().ok());
                        serve(conn);
                        return;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if criu_done.load(Ordering::SeqCst) {
                            return;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(2));
                    }
                    Err(e) => {
                        warn!(error = %e, "image streamer socket failed");
                        return;
                    }
                }
            });
            let status = child.wait();
            criu_done.store(true, Ordering::SeqCst);
            // The restored tree does not keep CRIU's end; this ends the serving anyway.
            if let Some(c) = conn_slot.lock().expect("not poisoned").as_ref() {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
            let _ = server.join();
            (status, said.join().unwrap_or_default())
        });
        let _ = std::fs::remove_file(&socket);
        for line in said.lines().filter(|l| !l.trim().is_empty()) {
            debug!(line, "criu stderr");
        }
        let log = r.images_dir.join(RESTORE_LOG);
        let succeeded = match status {
            Ok(status) => status.success(),
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => stats.is_file(),
            Err(e) => return Err(self.io(e)),
        };
        if !succeeded {
            let mut err = failure("restore", &Resp::default(), Some(&log));
            // Failing before its log was open (its options), CRIU said why on stderr.
            if let CriuError::Failed { errmsg, .. } = &mut err {
                let said = said.trim();
                if errmsg.is_empty() && !said.is_empty() {
                    *errmsg = format!(": {}", said.lines().last().unwrap_or(said));
                }
            }
            return Err(err);
        }
        let text = std::fs::read_to_string(&pidfile).unwrap_or_default();
        text.trim().parse().map_err(|_| CriuError::Failed {
            request: "restore",
            errno: String::new(),
            errmsg: format!(": CRIU reported success but wrote no PID ({text:?})"),
            log: String::new(),
            log_path: Some(log),
        })
    }

    /// Writes this CPU's description (`cpuinfo.img`) into `images_dir`.
    pub fn cpuinfo_dump(&self, images_dir: &Path) -> Result<(), CriuError> {
        let opts = log_opts(images_dir, "cpuinfo-dump.log");
        let log = images_dir.join("cpuinfo-dump.log");
        self.call(
            req(ReqType::CpuinfoDump, Some(opts)),
            "CPU description dump",
            Some(&log),
        )?;
        let _ = std::fs::remove_file(log);
        Ok(())
    }

    /// Asks CRIU whether this CPU can run images whose `cpuinfo.img` is in `images_dir`.
    pub fn cpuinfo_check(&self, images_dir: &Path) -> Result<(), CriuError> {
        let opts = log_opts(images_dir, "cpuinfo-check.log");
        let log = images_dir.join("cpuinfo-check.log");
        self.call(
            req(ReqType::CpuinfoCheck, Some(opts)),
            "CPU compatibility check",
            Some(&log),
        )
        .map(|_| ())
    }

    fn io(&self, source: std::io::Error) -> CriuError {
        CriuError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn call(&self, r: Req, what: &'static str, log: Option<&Path>) -> Result<Resp, CriuError> {
        self.call_notify(r, what, log, &mut |_| {})
    }

    /// Sends one request in a fresh `criu swrk`, answers its notifications, returns its reply.
    fn call_notify(
        &self,
        r: Req,
        what: &'static str,
        log: Option<&Path>,
        on_notify: &mut dyn FnMut(&str),
    ) -> Result<Resp, CriuError> {
        self.call_notify_in(r, what, log, on_notify, None)
    }

    /// [`Self::call_notify`], with `criu` in minimal mount tree `tree` if given (see
    /// [`crate::minroot`]).
    fn call_notify_in(
        &self,
        r: Req,
        what: &'static str,
        log: Option<&Path>,
        on_notify: &mut dyn FnMut(&str),
        tree: Option<&crate::minroot::MinimalRoot>,
    ) -> Result<Resp, CriuError> {
        let want = r.r#type;
        let mut session = Session::start(&self.path, tree)?;
        session.send(&r).map_err(|e| self.io(e))?;
        let result = loop {
            let resp = match session.recv() {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    break Err(CriuError::NoAnswer {
                        path: self.path.clone(),
                        stderr: session.stderr_tail(),
                    })
                }
                Err(RecvError::Io(e)) => break Err(self.io(e)),
                Err(RecvError::Decode(source)) => {
                    break Err(CriuError::Decode {
                        path: self.path.clone(),
                        source,
                    })
                }
            };
            if resp.r#type == ReqType::Notify as i32 {
                let script = resp
                    .notify
                    .as_ref()
                    .and_then(|n| n.script.clone())
                    .unwrap_or_default();
                debug!(script, "criu notify");
                on_notify(&script);
                let ack = Req {
                    r#type: ReqType::Notify as i32,
                    notify_success: Some(true),
                    ..Default::default()
                };
                if let Err(e) = session.send(&ack) {
                    break Err(self.io(e));
                }
                continue;
            }
            if resp.r#type != want {
                warn!(
                    got = resp.r#type,
                    want, "criu answered a different request type"
                );
            }
            if !resp.success {
                break Err(failure(what, &resp, log));
            }
            break Ok(resp);
        };
        session.finish();
        result
    }
}

fn req(t: ReqType, opts: Option<proto::Opts>) -> Req {
    Req {
        r#type: t as i32,
        opts,
        ..Default::default()
    }
}

fn log_opts(dir: &Path, log_file: &str) -> proto::Opts {
    proto::Opts {
        images_dir_fd: -1,
        images_dir: Some(dir.to_string_lossy().into_owned()),
        log_level: Some(log_level()),
        log_file: Some(log_file.to_string()),
        ..Default::default()
    }
}

/// CRIU's log level: `$CEDANA_CRIU_LOG_LEVEL` (0-4), else 2 (errors and warnings: enough for
/// the quoted failure; 4 writes tens of thousands of lines for a large process).
fn log_level() -> i32 {
    std::env::var("CEDANA_CRIU_LOG_LEVEL")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|l| (0..=4).contains(l))
        .unwrap_or(2)
}

fn failure(what: &'static str, resp: &Resp, log: Option<&Path>) -> CriuError {
    let errno = match resp.cr_errno {
        Some(e) if e != 0 => format!(" ({})", nix::errno::Errno::from_raw(e).desc()),
        _ => String::new(),
    };
    let full = log
        .and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    // CRIU's message is the first error it logged, which here is often a harmless one (it
    // cannot raise its own descriptor limit): then the first error that is not leads.
    let first_real = error_lines(&full)
        .into_iter()
        .find(|l| !is_harmless(l))
        .map(strip_log_prefix);
    let errmsg = match resp.cr_errmsg.as_deref() {
        Some(m) if !m.is_empty() && !is_harmless(m) => format!(": {m}"),
        _ => first_real.map(|m| format!(": {m}")).unwrap_or_default(),
    };
    let hint = remedy(&full)
        .map(|r| format!("\n  What to do: {r}"))
        .unwrap_or_default();
    let log_text = log.map(log_tail).unwrap_or_default();
    CriuError::Failed {
        request: what,
        errno,
        errmsg,
        log: format!("{hint}{log_text}"),
        log_path: log.map(Path::to_path_buf),
    }
}

/// CRIU errors seen on every failure on some machines that are not the cause (CRIU goes on
/// after them).
const HARMLESS: &[&str] = &["Can't setup RLIMIT_NOFILE for self"];

fn is_harmless(line: &str) -> bool {
    HARMLESS.iter().any(|h| line.contains(h))
}

fn error_lines(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| l.contains("Error (") || l.contains("Error:"))
        .collect()
}

/// `(00.012345) Error (criu/sk-inet.c:204): inet: Connected TCP socket, ...` → the message.
fn strip_log_prefix(line: &str) -> String {
    match line.find("): ") {
        Some(i) if line[..i].contains("Error (") => line[i + 3..].trim().to_string(),
        _ => line.trim().to_string(),
    }
}

/// What the user can do about the failures CRIU's log names, for the causes met in practice.
fn remedy(log: &str) -> Option<&'static str> {
    const KNOWN: &[(&str, &str)] = &[
        (
            "consider using --tcp-established",
            "the process has an established TCP connection: dump with --tcp-close (it comes back closed and the peer reconnects) or --tcp-established (it comes back open on this host; elsewhere restore with --tcp-close)",
        ),
        (
            "Don't have tty to inherit session from",
            "the process was started from a terminal (a shell job): start it with `cedana-agent exec` (or under setsid, with its output in a file) so that it can be restored without that terminal",
        ),
        (
            "doesn't live in IPC ns",
            "the process uses SysV shared memory outside an IPC namespace of its own, which CRIU cannot dump: start it with `cedana-agent exec`, which gives it an IPC namespace of its own (or `unshare --ipc`)",
        ),
        (
            "whose /proc doesn't belong to it",
            "the process dropped root (setpriv, su, a server switching users): start it with `cedana-agent exec --userns` (a job: `w.spawn(cmd, #{ userns: true })`), which gives it a user namespace, a /proc and a mount tree of its own",
        ),
        (
            "Can't get proc fd",
            "the process dropped root inside a PID namespace without a /proc of its own: start it with `cedana-agent exec --userns` (a job: `w.spawn(cmd, #{ userns: true })`), which gives it a user namespace, a /proc and a mount tree of its own",
        ),
        (
            "Can't get rlimit",
            "the process runs as another user than root and CRIU lacks CAP_SYS_RESOURCE here (a container): start it with `cedana-agent exec --userns` (a job: `w.spawn(cmd, #{ userns: true })`), in a user namespace root owns",
        ),
        (
            "External socket is used",
            "the process holds a UNIX socket connected outside its tree: dump with --ext-unix-sk",
        ),
        (
            "increase limit",
            "the process keeps a deleted file open that is larger than CRIU carries by default (1 MiB): dump with --ghost-limit BYTES above its size",
        ),
        (
            "Use link-remap option",
            "the process keeps a file open whose name was removed while another link to it remains: dump with --link-remap (the file is linked back under a temporary name until the restore)",
        ),
    ];
    KNOWN
        .iter()
        .find(|(needle, _)| log.contains(needle))
        .map(|(_, what)| *what)
}

/// The error lines of a CRIU log, or its last lines when none is marked as an error.
pub fn log_tail(path: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(path) else {
        return String::new();
    };
    let errors: Vec<&str> = error_lines(&text)
        .into_iter()
        .filter(|l| !is_harmless(l))
        .collect();
    let lines: Vec<&str> = if errors.is_empty() {
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(LOG_TAIL_LINES)..].to_vec()
    } else {
        errors[errors.len().saturating_sub(LOG_TAIL_LINES)..].to_vec()
    };
    if lines.is_empty() {
        return String::new();
    }
    let mut out = String::from("\n  CRIU's log says:");
    for l in lines {
        out.push_str("\n    ");
        out.push_str(l.trim_end());
    }
    out
}

enum RecvError {
    Io(std::io::Error),
    Decode(prost::DecodeError),
}

/// The key under which a user-namespace task's folder mount `i` is external.
fn folder_key(i: usize) -> String {
    format!("cedana-folder-{i}")
}

/// Removes the empty folders CRIU made to fill the tmpfs mounts of a task with a mount tree
/// of its own and could not remove while that tree was still mounted (its log says
/// "mnt: Unable to remove /tmp/cr-tmpfs.XXXXXX: ..."). Only an empty folder of exactly that
/// form, right in `/tmp`, goes.
fn remove_tmpfs_yards(log: &Path) {
    let Ok(text) = std::fs::read_to_string(log) else {
        return;
    };
    for line in text.lines() {
        let Some(rest) = line.split("mnt: Unable to remove /tmp/cr-tmpfs.").nth(1) else {
            continue;
        };
        let suffix = rest.split(':').next().unwrap_or_default();
        if suffix.len() == 6 && suffix.bytes().all(|b| b.is_ascii_alphanumeric()) {
            let _ = std::fs::remove_dir(format!("/tmp/cr-tmpfs.{suffix}"));
        }
    }
}

/// One `criu swrk` child and our end of its socket.
struct Session {
    sock: OwnedFd,
    child: Child,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Session {
    fn start(path: &Path, tree: Option<&crate::minroot::MinimalRoot>) -> Result<Self, CriuError> {
        let spawn_err = |source| CriuError::Spawn {
            path: path.to_path_buf(),
            source,
        };
        let (ours, theirs) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| spawn_err(e.into()))?;
        let fd = theirs.as_raw_fd();
        let mut cmd = Command::new(path);
        cmd.arg("swrk")
            .arg(fd.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // The child gets its own copy of the tree's paths (made here, before the fork).
        let minimal = tree.map(crate::minroot::MinimalRoot::plan);
        // SAFETY: only async-signal-safe calls between fork and exec: fcntl on an fd we own,
        // and the raw system calls of `MinimalRoot::enter`.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(m) = &minimal {
                    m.enter().map_err(|_| std::io::Error::last_os_error())?;
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(spawn_err)?;
        drop(theirs);
        let stderr = child.stderr.take().map(|mut s| {
            std::thread::spawn(move || {
                let mut buf = String::new();
                let _ = s.read_to_string(&mut buf);
                buf
            })
        });
        Ok(Session {
            sock: ours,
            child,
            stderr,
        })
    }

    fn send(&self, r: &Req) -> std::io::Result<()> {
        let buf = r.encode_to_vec();
        socket::send(self.sock.as_raw_fd(), &buf, MsgFlags::empty())?;
        Ok(())
    }

    fn recv(&self) -> Result<Option<Resp>, RecvError> {
        let fd = self.sock.as_raw_fd();
        // Peek with MSG_TRUNC for the packet's real size, then read it whole.
        let mut probe = [0u8; 1];
        let size = loop {
            match socket::recv(fd, &mut probe, MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC) {
                Err(nix::errno::Errno::EINTR) => continue,
                r => break r.map_err(|e| RecvError::Io(e.into()))?,
            }
        };
        if size == 0 {
            return Ok(None);
        }
        let mut buf = vec![0u8; size];
        let n =
            socket::recv(fd, &mut buf, MsgFlags::empty()).map_err(|e| RecvError::Io(e.into()))?;
        Resp::decode(&buf[..n]).map(Some).map_err(RecvError::Decode)
    }

    fn stderr_tail(&mut self) -> String {
        let _ = self.child.wait();
        let text = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let text = text.trim();
        if text.is_empty() {
            String::new()
        } else {
            format!("; it said: {text}")
        }
    }

    fn finish(mut self) {
        drop(self.sock);
        let _ = self.child.wait();
        if let Some(h) = self.stderr.take() {
            let text = h.join().unwrap_or_default();
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                debug!(line, "criu stderr");
            }
        }
    }
}

#[cfg(test)]
mod failure_tests {
    use super::*;

    #[test]
    fn the_cause_leads_not_the_harmless_rlimit_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("dump.log");
        std::fs::write(
            &log,
            "(00.000812) Error (criu/util.c:1594): rlimit: Can't setup RLIMIT_NOFILE for self\n\
             (00.041000) Warn  (criu/x.c:1): something\n\
             (00.052110) Error (criu/sk-inet.c:204): inet: Connected TCP socket, consider using --tcp-established option.\n\
             (00.052200) Error (criu/cr-dump.c:1600): Dumping FAILED.\n",
        )
        .unwrap();
        let resp = Resp {
            cr_errmsg: Some("rlimit: Can't setup RLIMIT_NOFILE for self".into()),
            ..Default::default()
        };
        let text = failure("dump", &resp, Some(&log)).to_string();
        let headline = text.lines().next().unwrap();
        assert_eq!(
            headline,
            "CRIU dump failed: inet: Connected TCP socket, consider using --tcp-established option."
        );
        assert!(
            text.contains(
                "What to do: the process has an established TCP connection: dump with --tcp-close"
            ),
            "{text}"
        );
        assert!(!text.contains("RLIMIT"), "{text}");
    }

    #[test]
    fn a_task_of_another_user_is_sent_to_exec_userns() {
        let log = "(00.1) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n\
                   (00.2) Error (criu/cr-dump.c:1201): Can't get rlimit 0 for 9: Operation not permitted\n";
        let what = remedy(log).expect("advice");
        assert!(what.contains("exec --userns"), "{what}");
        assert!(remedy("(00.1) rlimit: Can't setup RLIMIT_NOFILE for self\n").is_none());
        let log = "pie: 1: Error (criu/pie/parasite.c:657): Can't get /proc fd\n\
                   Error (criu/cr-dump.c:1494): Can't get proc fd (pid: 16617)\n";
        assert!(remedy(log).expect("advice").contains("exec --userns"));
    }

    #[test]
    fn a_real_first_error_is_kept_and_unknown_causes_get_no_advice() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("restore.log");
        std::fs::write(
            &log,
            "(00.1) Error (criu/files.c:9): files: Can't open thing\n",
        )
        .unwrap();
        let resp = Resp {
            cr_errmsg: Some("files: Can't open thing".into()),
            ..Default::default()
        };
        let text = failure("restore", &resp, Some(&log)).to_string();
        assert!(
            text.starts_with("CRIU restore failed: files: Can't open thing"),
            "{text}"
        );
        assert!(!text.contains("What to do"), "{text}");
    }
}
