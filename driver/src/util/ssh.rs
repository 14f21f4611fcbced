//! SSH to machines the driver set up (`bake`), on libssh2 through the `ssh2` crate.
//!
//! The host key is always verified before anything else is sent: either against the exact key
//! the caller expects (one the driver generated and gave the instance in its user-data) or
//! against a `known_hosts` file. An unknown host or a different key is an error naming the host
//! and the fingerprints (`SHA256:…`, as OpenSSH prints them); nothing is ever trusted on first
//! use. Authentication is by public key only: a private key file or the keys in `ssh-agent`.
//!
//! [`Ssh`] is blocking (libssh2 is); every call is bounded by the session's I/O timeout and
//! commands by their own. [`Remote`] wraps it for async callers: each call runs on tokio's
//! blocking pool.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use cedana_protocol::config::Secret;
use sha2::Digest;
use ssh2::{CheckResult, ErrorCode, KnownHostFileKind, MethodType, Session};
use tracing::debug;

/// Output kept per stream of a command; the rest is counted, not stored.
const MAX_OUTPUT: usize = 4 << 20;

const ERR_TIMEOUT: i32 = -9;
const ERR_SOCKET_DISCONNECT: i32 = -13;
const ERR_AUTHENTICATION_FAILED: i32 = -18;
const ERR_PUBLICKEY_UNVERIFIED: i32 = -19;
const ERR_SOCKET_TIMEOUT: i32 = -30;
const ERR_SOCKET_RECV: i32 = -43;
const ERR_SOCKET_SEND: i32 = -7;

/// Errors of SSH connections, commands and uploads. None of them carries key material.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("cannot resolve SSH host {host}: {source}")]
    Resolve {
        host: String,
        source: std::io::Error,
    },
    #[error("cannot connect to {addr} (SSH): {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("SSH handshake with {host} failed: {message}")]
    Handshake { host: String, message: String },
    #[error("{what} on {host} took longer than {secs} s; giving up")]
    Timeout {
        host: String,
        what: String,
        secs: u64,
    },
    #[error("host key of {host} does not match: it presented {presented} ({algorithm}) but {expected} was expected; someone may be intercepting the connection, or this is not the machine you meant, so nothing was sent to it")]
    HostKeyMismatch {
        host: String,
        algorithm: String,
        presented: String,
        expected: String,
    },
    #[error("host {host} is not in {known_hosts}: it presented {presented} ({algorithm}); nothing is trusted on first use: check that fingerprint out of band, then add the host's key to that file (for example from `ssh-keyscan`)")]
    UnknownHost {
        host: String,
        known_hosts: PathBuf,
        algorithm: String,
        presented: String,
    },
    #[error("host key of {host} ({presented}) is marked @revoked in {known_hosts}; refusing it")]
    RevokedHostKey {
        host: String,
        known_hosts: PathBuf,
        presented: String,
    },
    #[error("cannot read known hosts file {path}: {source}")]
    KnownHostsRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{host} sent no usable host key")]
    NoHostKey { host: String },
    #[error("bad SSH public key {what}: {message}")]
    BadPublicKey { what: String, message: String },
    #[error("{host} refused {user}'s key ({how}): the key is not in that user's authorized_keys there, or the user is wrong (--ssh-user)")]
    AuthRejected {
        host: String,
        user: String,
        how: String,
    },
    #[error("cannot use private key {path}: {message}; if it is passphrase-protected, load it into ssh-agent (`ssh-add`) and do not give a key file")]
    KeyFile { path: PathBuf, message: String },
    #[error("no SSH key to log in to {host} with: set aws.ssh_key_path in the config (or pass --ssh-key), or load a key into ssh-agent (SSH_AUTH_SOCK)")]
    NoKey { host: String },
    #[error("ssh-agent: {message}")]
    Agent { message: String },
    #[error("running `{command}` on {host}: {message}")]
    Exec {
        host: String,
        command: String,
        message: String,
    },
    #[error("cannot read {path}: {source}")]
    Local {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("uploading to {remote} on {host}: {message}")]
    Upload {
        host: String,
        remote: String,
        message: String,
    },
    #[error("{host}: {message}")]
    Session { host: String, message: String },
    #[error("cannot generate an SSH key with ssh-keygen: {message}; install OpenSSH's client tools (Debian: openssh-client)")]
    Keygen { message: String },
}

impl SshError {
    /// True for failures that may pass when tried again a little later: the machine is still
    /// booting (nothing listening yet, connection reset, no banner). Host key and
    /// authentication failures are not transient.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            SshError::Connect { .. } | SshError::Handshake { .. } | SshError::Timeout { .. }
        )
    }
}

/// An SSH public key: algorithm, the key blob (wire format) and a comment.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    algorithm: String,
    blob: Vec<u8>,
    comment: String,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({} {})", self.algorithm, self.fingerprint())
    }
}

impl PublicKey {
    /// Parses an OpenSSH public key line: `ALGORITHM BASE64 [COMMENT]`. `what` names the input
    /// in errors (a file, a setting).
    pub fn parse(line: &str, what: &str) -> Result<PublicKey, SshError> {
        let bad = |message: String| SshError::BadPublicKey {
            what: what.to_string(),
            message,
        };
        let mut parts = line.split_whitespace();
        let (Some(algorithm), Some(b64)) = (parts.next(), parts.next()) else {
            return Err(bad(
                "expected `ALGORITHM BASE64 [COMMENT]`, as in a .pub file".into(),
            ));
        };
        let comment = parts.collect::<Vec<_>>().join(" ");
        let blob = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| bad(format!("the key is not base64: {e}")))?;
        let key = PublicKey::from_blob(&blob).map_err(bad)?;
        if key.algorithm != algorithm {
            return Err(bad(format!(
                "the line says {algorithm} but the key inside is {}",
                key.algorithm
            )));
        }
        Ok(PublicKey { comment, ..key })
    }

    /// A key from its wire-format blob (which starts with the algorithm's name).
    pub fn from_blob(blob: &[u8]) -> Result<PublicKey, String> {
        let algorithm = blob_algorithm(blob).ok_or("not an SSH key blob")?;
        Ok(PublicKey {
            algorithm: algorithm.to_string(),
            blob: blob.to_vec(),
            comment: String::new(),
        })
    }

    /// `ssh-ed25519`, `ssh-rsa`, `ecdsa-sha2-nistp256`, ...
    pub fn algorithm(&self) -> &str {
        &self.algorithm
    }

    /// The key in wire format.
    pub fn blob(&self) -> &[u8] {
        &self.blob
    }

    /// The base64 field of the OpenSSH line.
    pub fn base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.blob)
    }

    /// `SHA256:…` as `ssh-keygen -l` and OpenSSH's prompts print it.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.blob)
    }

    /// The OpenSSH line (`ALGORITHM BASE64 [COMMENT]`).
    pub fn to_openssh(&self) -> String {
        if self.comment.is_empty() {
            format!("{} {}", self.algorithm, self.base64())
        } else {
            format!("{} {} {}", self.algorithm, self.base64(), self.comment)
        }
    }

    /// The same key with another comment.
    pub fn with_comment(mut self, comment: &str) -> PublicKey {
        self.comment = comment.to_string();
        self
    }
}

/// `SHA256:` and the unpadded base64 of the blob's SHA-256, as OpenSSH prints fingerprints.
pub fn fingerprint(blob: &[u8]) -> String {
    format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(sha2::Sha256::digest(blob))
    )
}

/// The algorithm name a key blob starts with (an SSH string: u32 length, bytes).
fn blob_algorithm(blob: &[u8]) -> Option<&str> {
    let len = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
    let name = blob.get(4..4 + len)?;
    let name = std::str::from_utf8(name).ok()?;
    (!name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic())).then_some(name)
}

/// Host key algorithms to ask the server for, for a key of `algorithm`: the server then
/// presents that key (and not, say, its RSA one when ed25519 is expected).
fn hostkey_methods(algorithm: &str) -> &'static [&'static str] {
    match algorithm {
        "ssh-ed25519" => &["ssh-ed25519"],
        "ecdsa-sha2-nistp256" => &["ecdsa-sha2-nistp256"],
        "ecdsa-sha2-nistp384" => &["ecdsa-sha2-nistp384"],
        "ecdsa-sha2-nistp521" => &["ecdsa-sha2-nistp521"],
        "ssh-rsa" => &["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"],
        _ => &[],
    }
}

/// How the server's identity is checked.
#[derive(Clone, Debug)]
pub enum HostKeyPolicy {
    /// Exactly this key (for example the one the driver generated and gave the instance).
    Expect(PublicKey),
    /// The entries of an OpenSSH `known_hosts` file (a missing file has none).
    KnownHosts(PathBuf),
}

impl HostKeyPolicy {
    /// `~/.ssh/known_hosts`.
    pub fn default_known_hosts() -> Option<PathBuf> {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".ssh").join("known_hosts"))
    }
}

/// How to log in.
#[derive(Clone, Debug)]
pub enum Auth {
    /// A private key file (OpenSSH or PEM format, no passphrase).
    KeyFile(PathBuf),
    /// The identities of the running ssh-agent (`SSH_AUTH_SOCK`), tried in turn.
    Agent,
}

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Address or name.
    pub host: String,
    pub port: u16,
    pub user: String,
    pub host_key: HostKeyPolicy,
    pub auth: Auth,
    /// Bound on the TCP connect and on the handshake.
    pub connect_timeout: Duration,
    /// Bound on every later blocking SSH call (opening a channel, writing a block, ...).
    pub io_timeout: Duration,
}

impl ConnectOptions {
    /// Defaults: port 22, 10 s to connect, 60 s per I/O call.
    pub fn new(host: &str, user: &str, host_key: HostKeyPolicy, auth: Auth) -> Self {
        ConnectOptions {
            host: host.to_string(),
            port: 22,
            user: user.to_string(),
            host_key,
            auth,
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(60),
        }
    }

    fn label(&self) -> String {
        if self.port == 22 {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// A command's result.
#[derive(Clone, Debug, Default)]
pub struct ExecOutput {
    pub stdout: String,
    pub stderr: String,
    /// The exit status (`-1` when the command ended by a signal).
    pub status: i32,
    /// The signal that ended the command, if one did (`TERM`, `KILL`, ...).
    pub signal: Option<String>,
}

impl ExecOutput {
    /// True when the command exited with status 0.
    pub fn success(&self) -> bool {
        self.status == 0 && self.signal.is_none()
    }

    /// The last lines of stderr, else stdout: what to show a user when the command failed.
    pub fn tail(&self, lines: usize) -> String {
        let text = if self.stderr.trim().is_empty() {
            &self.stdout
        } else {
            &self.stderr
        };
        let all: Vec<&str> = text.trim_end().lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// A file to upload.
#[derive(Clone, Debug)]
pub struct Upload {
    pub source: UploadSource,
    /// Absolute path on the remote machine.
    pub remote: String,
    /// Permission bits, e.g. `0o755`.
    pub mode: u32,
}

/// Where an upload's bytes come from.
#[derive(Clone)]
pub enum UploadSource {
    File(PathBuf),
    Bytes(Vec<u8>),
}

impl std::fmt::Debug for UploadSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UploadSource::File(p) => write!(f, "File({})", p.display()),
            UploadSource::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
        }
    }
}

impl UploadSource {
    fn len(&self) -> Result<u64, SshError> {
        match self {
            UploadSource::File(p) => {
                std::fs::metadata(p)
                    .map(|m| m.len())
                    .map_err(|source| SshError::Local {
                        path: p.clone(),
                        source,
                    })
            }
            UploadSource::Bytes(b) => Ok(b.len() as u64),
        }
    }
}

/// A progress bar for `total` bytes drawn on stderr when it is a terminal, hidden otherwise.
pub fn progress_bar(total: u64, message: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(message.to_string());
    bar
}

/// An authenticated SSH session (blocking).
pub struct Ssh {
    session: Session,
    fd: RawFd,
    host: String,
    io_timeout: Duration,
}

impl std::fmt::Debug for Ssh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ssh").field("host", &self.host).finish()
    }
}

fn ssh_message(e: &ssh2::Error) -> String {
    e.message().to_string()
}

fn session_code(e: &ssh2::Error) -> Option<i32> {
    match e.code() {
        ErrorCode::Session(c) => Some(c),
        ErrorCode::SFTP(_) => None,
    }
}

impl Ssh {
    /// Connects, verifies the host key, logs in. Nothing but the handshake reaches a host
    /// whose key does not check out.
    pub fn connect(opts: &ConnectOptions) -> Result<Ssh, SshError> {
        let label = opts.label();
        let addrs: Vec<SocketAddr> = (opts.host.as_str(), opts.port)
            .to_socket_addrs()
            .map_err(|source| SshError::Resolve {
                host: opts.host.clone(),
                source,
            })?
            .collect();
        let mut last = None;
        let mut stream = None;
        for addr in &addrs {
            match TcpStream::connect_timeout(addr, opts.connect_timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    last = Some(SshError::Timeout {
                        host: label.clone(),
                        what: "connecting".into(),
                        secs: opts.connect_timeout.as_secs(),
                    })
                }
                Err(source) => {
                    last = Some(SshError::Connect {
                        addr: addr.to_string(),
                        source,
                    })
                }
            }
        }
        let Some(stream) = stream else {
            return Err(last.unwrap_or_else(|| SshError::Resolve {
                host: opts.host.clone(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses"),
            }));
        };
        let _ = stream.set_nodelay(true);
        let fd = stream.as_raw_fd();
        let mut session = Session::new().map_err(|e| SshError::Session {
            host: label.clone(),
            message: ssh_message(&e),
        })?;
        session.set_tcp_stream(stream);
        session.set_timeout(millis(opts.connect_timeout));

        // Which host key to ask for, and (known_hosts) what the file says about this host.
        let check = match &opts.host_key {
            HostKeyPolicy::Expect(key) => {
                prefer_hostkeys(&session, &[key.algorithm()]);
                Check::Expect(key)
            }
            HostKeyPolicy::KnownHosts(path) => {
                let k = KnownHostsFile::load(path)?;
                let algorithms = k.algorithms_for(&opts.host, opts.port);
                let algorithms: Vec<&str> = algorithms.iter().map(String::as_str).collect();
                prefer_hostkeys(&session, &algorithms);
                Check::Known(k)
            }
        };

        session.handshake().map_err(|e| match session_code(&e) {
            Some(ERR_TIMEOUT | ERR_SOCKET_TIMEOUT) => SshError::Timeout {
                host: label.clone(),
                what: "the SSH handshake".into(),
                secs: opts.connect_timeout.as_secs(),
            },
            _ => SshError::Handshake {
                host: label.clone(),
                message: ssh_message(&e),
            },
        })?;

        let (blob, _) = session.host_key().ok_or_else(|| SshError::NoHostKey {
            host: label.clone(),
        })?;
        let presented = PublicKey::from_blob(blob).map_err(|_| SshError::NoHostKey {
            host: label.clone(),
        })?;
        match check {
            Check::Expect(expected) => {
                if expected.blob() != presented.blob() {
                    return Err(SshError::HostKeyMismatch {
                        host: label,
                        algorithm: presented.algorithm().to_string(),
                        presented: presented.fingerprint(),
                        expected: format!("{} ({})", expected.fingerprint(), expected.algorithm()),
                    });
                }
            }
            Check::Known(k) => k.verify(&opts.host, opts.port, &label, &presented)?,
        }
        debug!(host = %label, key = %presented.fingerprint(), "host key verified");

        authenticate(&session, opts, &label)?;
        session.set_timeout(millis(opts.io_timeout));
        Ok(Ssh {
            session,
            fd,
            host: label,
            io_timeout: opts.io_timeout,
        })
    }

    /// The host as given (with the port when not 22).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Runs `command` (through the login shell) and collects its output and exit status; each
    /// line is logged at debug as it arrives. Gives up after `timeout` (the command may go on
    /// running on the remote machine). The command itself is logged at debug too: pass
    /// secrets in uploaded files, never on the command line.
    pub fn exec(&self, command: &str, timeout: Duration) -> Result<ExecOutput, SshError> {
        let exec_err = |message: String| SshError::Exec {
            host: self.host.clone(),
            command: command.to_string(),
            message,
        };
        let deadline = Instant::now() + timeout;
        self.session.set_blocking(true);
        let mut channel = self
            .session
            .channel_session()
            .map_err(|e| exec_err(format!("cannot open a channel: {}", ssh_message(&e))))?;
        channel
            .exec(command)
            .map_err(|e| exec_err(format!("the server refused to run it: {}", ssh_message(&e))))?;
        debug!(host = %self.host, %command, "exec");

        self.session.set_blocking(false);
        let mut out = Collected::new("stdout", &self.host);
        let mut err = Collected::new("stderr", &self.host);
        let mut buf = vec![0u8; 32 * 1024];
        let read_result: Result<(), SshError> = loop {
            let mut progressed = false;
            let mut failure = None;
            for (stream_id, sink) in [(0, &mut out), (1, &mut err)] {
                let mut stream = channel.stream(stream_id);
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            sink.push(&buf[..n]);
                            progressed = true;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    }
                }
            }
            if let Some(e) = failure {
                break Err(exec_err(format!("reading its output: {e}")));
            }
            if channel.eof() {
                break Ok(());
            }
            if progressed {
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                break Err(SshError::Timeout {
                    host: self.host.clone(),
                    what: format!("`{command}`"),
                    secs: timeout.as_secs(),
                });
            }
            self.wait_socket((deadline - now).min(Duration::from_millis(500)));
        };
        out.finish();
        err.finish();
        if let Err(e) = read_result {
            // Still non-blocking: the close is sent without waiting for the server, which
            // answers only once the command's output ends (perhaps never); libssh2 frees the
            // channel with the session.
            let _ = channel.close();
            drop(channel);
            self.session.set_blocking(true);
            return Err(e);
        }
        self.session.set_blocking(true);
        let _ = channel.close();
        channel
            .wait_close()
            .map_err(|e| exec_err(format!("closing the channel: {}", ssh_message(&e))))?;
        let status = channel
            .exit_status()
            .map_err(|e| exec_err(format!("no exit status: {}", ssh_message(&e))))?;
        let signal = channel.exit_signal().ok().and_then(|s| s.exit_signal);
        debug!(host = %self.host, %command, status, ?signal, "exit");
        Ok(ExecOutput {
            stdout: out.text(),
            stderr: err.text(),
            status: if signal.is_some() { -1 } else { status },
            signal,
        })
    }

    /// Waits until the socket is ready in the direction libssh2 is blocked on, at most `max`.
    fn wait_socket(&self, max: Duration) {
        let dirs = self.session.block_directions();
        let mut events = 0;
        if matches!(
            dirs,
            ssh2::BlockDirections::Inbound | ssh2::BlockDirections::Both
        ) {
            events |= libc::POLLIN;
        }
        if matches!(
            dirs,
            ssh2::BlockDirections::Outbound | ssh2::BlockDirections::Both
        ) {
            events |= libc::POLLOUT;
        }
        if events == 0 {
            events = libc::POLLIN;
        }
        let mut pfd = libc::pollfd {
            fd: self.fd,
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd; the descriptor belongs to the session, which is alive.
        unsafe {
            libc::poll(&mut pfd, 1, max.as_millis().min(i32::MAX as u128) as i32);
        }
    }

    /// Uploads files over SFTP: each is written under a temporary name next to its target,
    /// given its mode and renamed into place. `bar` counts the bytes (see [`progress_bar`]).
    pub fn upload(&self, files: &[Upload], bar: &indicatif::ProgressBar) -> Result<u64, SshError> {
        self.session.set_blocking(true);
        let sftp = self.session.sftp().map_err(|e| SshError::Session {
            host: self.host.clone(),
            message: format!(
                "cannot start SFTP (is the sftp subsystem enabled in sshd_config?): {}",
                ssh_message(&e)
            ),
        })?;
        let mut total = 0;
        for f in files {
            total += self.upload_one(&sftp, f, bar)?;
        }
        Ok(total)
    }

    fn upload_one(
        &self,
        sftp: &ssh2::Sftp,
        f: &Upload,
        bar: &indicatif::ProgressBar,
    ) -> Result<u64, SshError> {
        let up_err = |message: String| SshError::Upload {
            host: self.host.clone(),
            remote: f.remote.clone(),
            message,
        };
        if !f.remote.starts_with('/') {
            return Err(up_err("the remote path must be absolute".into()));
        }
        let len = f.source.len()?;
        let mut reader: Box<dyn Read> = match &f.source {
            UploadSource::File(p) => {
                Box::new(std::fs::File::open(p).map_err(|source| SshError::Local {
                    path: p.clone(),
                    source,
                })?)
            }
            UploadSource::Bytes(b) => Box::new(std::io::Cursor::new(b.clone())),
        };
        let target = Path::new(&f.remote);
        let name = target
            .file_name()
            .ok_or_else(|| up_err("no file name".into()))?
            .to_string_lossy();
        let temp = target.with_file_name(format!(".{name}.cedana-upload"));
        let mut remote = sftp
            .open_mode(
                &temp,
                ssh2::OpenFlags::WRITE | ssh2::OpenFlags::CREATE | ssh2::OpenFlags::TRUNCATE,
                0o600,
                ssh2::OpenType::File,
            )
            .map_err(|e| {
                up_err(format!(
                    "cannot create {}: {}",
                    temp.display(),
                    sftp_msg(&e)
                ))
            })?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut sent = 0u64;
        let result = (|| -> Result<(), SshError> {
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(source) => {
                        return Err(SshError::Local {
                            path: match &f.source {
                                UploadSource::File(p) => p.clone(),
                                UploadSource::Bytes(_) => PathBuf::from("(memory)"),
                            },
                            source,
                        })
                    }
                };
                remote.write_all(&buf[..n]).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::TimedOut {
                        SshError::Timeout {
                            host: self.host.clone(),
                            what: format!("writing {}", f.remote),
                            secs: self.io_timeout.as_secs(),
                        }
                    } else {
                        up_err(format!("write failed: {e}"))
                    }
                })?;
                sent += n as u64;
                bar.inc(n as u64);
            }
            if sent != len {
                return Err(up_err(format!(
                    "the local file changed size while uploading ({len} then {sent} bytes)"
                )));
            }
            // Not every server has the fsync extension; the rename below is what matters.
            let _ = remote.fsync();
            remote
                .close()
                .map_err(|e| up_err(format!("close failed: {}", sftp_msg(&e))))?;
            sftp.setstat(
                &temp,
                ssh2::FileStat {
                    size: None,
                    uid: None,
                    gid: None,
                    perm: Some(f.mode),
                    atime: None,
                    mtime: None,
                },
            )
            .map_err(|e| up_err(format!("cannot set mode {:o}: {}", f.mode, sftp_msg(&e))))?;
            // SFTP v3 servers (OpenSSH) refuse to rename onto an existing file.
            if sftp.rename(&temp, target, None).is_err() {
                let _ = sftp.unlink(target);
                sftp.rename(&temp, target, None).map_err(|e| {
                    up_err(format!(
                        "cannot rename {} into place: {}",
                        temp.display(),
                        sftp_msg(&e)
                    ))
                })?;
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = sftp.unlink(&temp);
        }
        result?;
        debug!(host = %self.host, remote = %f.remote, bytes = sent, mode = format!("{:o}", f.mode), "uploaded");
        Ok(sent)
    }
}

fn sftp_msg(e: &ssh2::Error) -> String {
    match e.code() {
        ErrorCode::SFTP(2) => "no such file or directory".into(),
        ErrorCode::SFTP(3) => "permission denied".into(),
        ErrorCode::SFTP(c) => format!("SFTP error {c}"),
        ErrorCode::Session(_) => ssh_message(e),
    }
}

fn millis(d: Duration) -> u32 {
    d.as_millis().clamp(1, u32::MAX as u128) as u32
}

/// Asks the server for host keys of these algorithms (those libssh2 supports); no preference
/// when none is given.
fn prefer_hostkeys(session: &Session, algorithms: &[&str]) {
    let supported = session
        .supported_algs(MethodType::HostKey)
        .unwrap_or_default();
    let mut wanted: Vec<&str> = Vec::new();
    for a in algorithms {
        for m in hostkey_methods(a) {
            if supported.contains(m) && !wanted.contains(m) {
                wanted.push(m);
            }
        }
    }
    if !wanted.is_empty() {
        if let Err(e) = session.method_pref(MethodType::HostKey, &wanted.join(",")) {
            debug!(error = %e, "host key preference not set");
        }
    }
}

fn authenticate(session: &Session, opts: &ConnectOptions, label: &str) -> Result<(), SshError> {
    let rejected = |how: String| SshError::AuthRejected {
        host: label.to_string(),
        user: opts.user.clone(),
        how,
    };
    match &opts.auth {
        Auth::KeyFile(path) => {
            std::fs::File::open(path).map_err(|source| SshError::Local {
                path: path.clone(),
                source,
            })?;
            match session.userauth_pubkey_file(&opts.user, None, path, None) {
                Ok(()) if session.authenticated() => Ok(()),
                Ok(()) => Err(rejected(format!("key file {}", path.display()))),
                Err(e) => match session_code(&e) {
                    Some(ERR_AUTHENTICATION_FAILED | ERR_PUBLICKEY_UNVERIFIED) => {
                        Err(rejected(format!("key file {}", path.display())))
                    }
                    Some(
                        ERR_TIMEOUT
                        | ERR_SOCKET_TIMEOUT
                        | ERR_SOCKET_RECV
                        | ERR_SOCKET_SEND
                        | ERR_SOCKET_DISCONNECT,
                    ) => Err(SshError::Handshake {
                        host: label.to_string(),
                        message: format!("connection lost while logging in: {}", ssh_message(&e)),
                    }),
                    _ => Err(SshError::KeyFile {
                        path: path.clone(),
                        message: ssh_message(&e),
                    }),
                },
            }
        }
        Auth::Agent => {
            let mut agent = session.agent().map_err(|e| SshError::Agent {
                message: ssh_message(&e),
            })?;
            agent.connect().map_err(|e| SshError::Agent {
                message: format!(
                    "cannot reach it (is SSH_AUTH_SOCK set?): {}",
                    ssh_message(&e)
                ),
            })?;
            agent.list_identities().map_err(|e| SshError::Agent {
                message: ssh_message(&e),
            })?;
            let ids = agent.identities().map_err(|e| SshError::Agent {
                message: ssh_message(&e),
            })?;
            if ids.is_empty() {
                return Err(SshError::NoKey {
                    host: label.to_string(),
                });
            }
            let mut tried = Vec::new();
            for id in &ids {
                tried.push(fingerprint(id.blob()));
                if agent.userauth(&opts.user, id).is_ok() && session.authenticated() {
                    let _ = agent.disconnect();
                    return Ok(());
                }
            }
            let _ = agent.disconnect();
            Err(rejected(format!("ssh-agent keys {}", tried.join(", "))))
        }
    }
}

/// A command's output as it arrives: kept (up to [`MAX_OUTPUT`]) and logged line by line.
struct Collected<'a> {
    name: &'static str,
    host: &'a str,
    kept: Vec<u8>,
    dropped: usize,
    line: Vec<u8>,
}

impl<'a> Collected<'a> {
    fn new(name: &'static str, host: &'a str) -> Self {
        Collected {
            name,
            host,
            kept: Vec::new(),
            dropped: 0,
            line: Vec::new(),
        }
    }

    fn push(&mut self, data: &[u8]) {
        let room = MAX_OUTPUT.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&data[..data.len().min(room)]);
        self.dropped += data.len().saturating_sub(room);
        for &b in data {
            if b == b'\n' {
                self.flush_line();
            } else if self.line.len() < 4096 {
                self.line.push(b);
            }
        }
    }

    fn flush_line(&mut self) {
        debug!(host = %self.host, stream = self.name, "{}", String::from_utf8_lossy(&self.line));
        self.line.clear();
    }

    fn finish(&mut self) {
        if !self.line.is_empty() {
            self.flush_line();
        }
    }

    fn text(&self) -> String {
        let mut s = String::from_utf8_lossy(&self.kept).into_owned();
        if self.dropped > 0 {
            s.push_str(&format!("\n[{} more bytes not kept]\n", self.dropped));
        }
        s
    }
}

/// What the presented host key is checked against.
enum Check<'a> {
    Expect(&'a PublicKey),
    Known(KnownHostsFile),
}

/// A `known_hosts` file, read line by line (a line libssh2 cannot use, such as a
/// certificate authority, is skipped rather than ending the read).
struct KnownHostsFile {
    path: PathBuf,
    /// Every usable entry.
    all: ssh2::KnownHosts,
    /// Each entry on its own, to learn which apply to a host.
    entries: Vec<Entry>,
    _session: Session,
}

struct Entry {
    revoked: bool,
    key: PublicKey,
    alone: ssh2::KnownHosts,
}

impl KnownHostsFile {
    fn load(path: &Path) -> Result<KnownHostsFile, SshError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(SshError::KnownHostsRead {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let session_err = |e: ssh2::Error| SshError::KnownHostsRead {
            path: path.to_path_buf(),
            source: std::io::Error::other(ssh_message(&e)),
        };
        let session = Session::new().map_err(session_err)?;
        let mut all = session.known_hosts().map_err(session_err)?;
        let mut entries = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (marker, rest) = match line.strip_prefix('@') {
                Some(m) => {
                    let mut it = m.splitn(2, char::is_whitespace);
                    (
                        it.next().unwrap_or(""),
                        it.next().unwrap_or("").trim_start(),
                    )
                }
                None => ("", line),
            };
            let revoked = match marker {
                "" => false,
                "revoked" => true,
                _ => {
                    debug!(path = %path.display(), line = n + 1, marker, "known_hosts marker not supported; line skipped");
                    continue;
                }
            };
            let mut fields = rest.split_whitespace();
            let (Some(_hosts), Some(alg), Some(b64)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let Ok(key) = PublicKey::parse(&format!("{alg} {b64}"), "known_hosts") else {
                debug!(path = %path.display(), line = n + 1, "known_hosts line not understood; skipped");
                continue;
            };
            let mut alone = session.known_hosts().map_err(session_err)?;
            if alone.read_str(rest, KnownHostFileKind::OpenSSH).is_err() {
                debug!(path = %path.display(), line = n + 1, "known_hosts line not usable by libssh2; skipped");
                continue;
            }
            if !revoked {
                all.read_str(rest, KnownHostFileKind::OpenSSH)
                    .map_err(session_err)?;
            }
            entries.push(Entry {
                revoked,
                key,
                alone,
            });
        }
        Ok(KnownHostsFile {
            path: path.to_path_buf(),
            all,
            entries,
            _session: session,
        })
    }

    /// The entries for `host:port` (hashed names included).
    fn for_host<'a>(&'a self, host: &'a str, port: u16) -> impl Iterator<Item = &'a Entry> + 'a {
        self.entries.iter().filter(move |e| {
            matches!(
                e.alone.check_port(host, port, e.key.blob()),
                CheckResult::Match
            )
        })
    }

    /// The key algorithms the file has for this host (not revoked).
    fn algorithms_for(&self, host: &str, port: u16) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for e in self.for_host(host, port) {
            if !e.revoked && !v.iter().any(|a| a == e.key.algorithm()) {
                v.push(e.key.algorithm().to_string());
            }
        }
        v
    }

    fn verify(
        &self,
        host: &str,
        port: u16,
        label: &str,
        presented: &PublicKey,
    ) -> Result<(), SshError> {
        let path = self.path.as_path();
        if self
            .entries
            .iter()
            .any(|e| e.revoked && e.key.blob() == presented.blob())
        {
            return Err(SshError::RevokedHostKey {
                host: label.to_string(),
                known_hosts: path.to_path_buf(),
                presented: presented.fingerprint(),
            });
        }
        match self.all.check_port(host, port, presented.blob()) {
            CheckResult::Match => Ok(()),
            CheckResult::NotFound => Err(SshError::UnknownHost {
                host: label.to_string(),
                known_hosts: self.path.clone(),
                algorithm: presented.algorithm().to_string(),
                presented: presented.fingerprint(),
            }),
            CheckResult::Mismatch | CheckResult::Failure => {
                let known: Vec<String> = self
                    .for_host(host, port)
                    .filter(|e| !e.revoked)
                    .map(|e| format!("{} ({})", e.key.fingerprint(), e.key.algorithm()))
                    .collect();
                Err(SshError::HostKeyMismatch {
                    host: label.to_string(),
                    algorithm: presented.algorithm().to_string(),
                    presented: presented.fingerprint(),
                    expected: if known.is_empty() {
                        format!("the key in {}", path.display())
                    } else {
                        format!("{} from {}", known.join(" or "), path.display())
                    },
                })
            }
        }
    }
}

/// A fresh ed25519 key pair, made by `ssh-keygen` in a private temporary folder that is removed
/// at once. The private half is a [`Secret`] (OpenSSH format).
pub struct KeyPair {
    pub private_openssh: Secret,
    pub public: PublicKey,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &self.public)
            .field("private_openssh", &self.private_openssh)
            .finish()
    }
}

/// Generates an ed25519 key pair with `ssh-keygen` (no passphrase), `comment` in its public
/// half.
pub fn generate_ed25519(comment: &str) -> Result<KeyPair, SshError> {
    let dir = tempfile::Builder::new()
        .prefix(".cedana-key")
        .tempdir()
        .map_err(|e| SshError::Keygen {
            message: format!("cannot make a temporary folder: {e}"),
        })?;
    let path = dir.path().join("key");
    let out = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(&path)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| SshError::Keygen {
            message: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(SshError::Keygen {
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| SshError::Keygen {
            message: format!("cannot read what it wrote: {e}"),
        })
    };
    let private = read(&path)?;
    let public = PublicKey::parse(&read(&path.with_extension("pub"))?, "ssh-keygen's output")?;
    drop(dir);
    Ok(KeyPair {
        private_openssh: Secret::new(private),
        public,
    })
}

/// The public half of a private key file: `PATH.pub` when it is there, else what
/// `ssh-keygen -y` derives (which asks for the passphrase on a terminal if there is one).
pub fn public_key_of(private: &Path) -> Result<PublicKey, SshError> {
    let mut pub_path = private.as_os_str().to_owned();
    pub_path.push(".pub");
    let pub_path = PathBuf::from(pub_path);
    if let Ok(text) = std::fs::read_to_string(&pub_path) {
        return PublicKey::parse(&text, &pub_path.display().to_string());
    }
    std::fs::File::open(private).map_err(|source| SshError::Local {
        path: private.to_path_buf(),
        source,
    })?;
    let out = std::process::Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(private)
        .output()
        .map_err(|e| SshError::Keygen {
            message: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(SshError::KeyFile {
            path: private.to_path_buf(),
            message: format!(
                "ssh-keygen -y cannot read it: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    PublicKey::parse(
        &String::from_utf8_lossy(&out.stdout),
        &format!("the public key of {}", private.display()),
    )
}

/// The public keys the running ssh-agent holds (`SSH_AUTH_SOCK`).
pub fn agent_public_keys() -> Result<Vec<PublicKey>, SshError> {
    let agent_err = |e: ssh2::Error| SshError::Agent {
        message: format!(
            "cannot list its keys (is SSH_AUTH_SOCK set?): {}",
            ssh_message(&e)
        ),
    };
    let session = Session::new().map_err(agent_err)?;
    let mut agent = session.agent().map_err(agent_err)?;
    agent.connect().map_err(agent_err)?;
    agent.list_identities().map_err(agent_err)?;
    let keys = agent
        .identities()
        .map_err(agent_err)?
        .iter()
        .filter_map(|id| {
            PublicKey::from_blob(id.blob())
                .ok()
                .map(|k| k.with_comment(id.comment()))
        })
        .collect();
    let _ = agent.disconnect();
    Ok(keys)
}

/// An [`Ssh`] session for async code: every call runs on tokio's blocking pool, one at a time.
#[derive(Clone, Debug)]
pub struct Remote {
    inner: Arc<Mutex<Ssh>>,
    host: String,
}

fn joined<T>(
    r: Result<Result<T, SshError>, tokio::task::JoinError>,
    host: &str,
) -> Result<T, SshError> {
    r.unwrap_or_else(|e| {
        Err(SshError::Session {
            host: host.to_string(),
            message: format!("the SSH worker thread failed: {e}"),
        })
    })
}

impl Remote {
    /// [`Ssh::connect`] on the blocking pool.
    pub async fn connect(opts: ConnectOptions) -> Result<Remote, SshError> {
        let host = opts.label();
        let ssh = joined(
            tokio::task::spawn_blocking(move || Ssh::connect(&opts)).await,
            &host,
        )?;
        Ok(Remote {
            host: ssh.host().to_string(),
            inner: Arc::new(Mutex::new(ssh)),
        })
    }

    /// The host as given (with the port when not 22).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// [`Ssh::exec`] on the blocking pool.
    pub async fn exec(&self, command: &str, timeout: Duration) -> Result<ExecOutput, SshError> {
        let inner = self.inner.clone();
        let command = command.to_string();
        joined(
            tokio::task::spawn_blocking(move || {
                let ssh = inner.lock().unwrap_or_else(|p| p.into_inner());
                ssh.exec(&command, timeout)
            })
            .await,
            &self.host,
        )
    }

    /// [`Ssh::upload`] on the blocking pool.
    pub async fn upload(
        &self,
        files: Vec<Upload>,
        bar: indicatif::ProgressBar,
    ) -> Result<u64, SshError> {
        let inner = self.inner.clone();
        joined(
            tokio::task::spawn_blocking(move || {
                let ssh = inner.lock().unwrap_or_else(|p| p.into_inner());
                ssh.upload(&files, &bar)
            })
            .await,
            &self.host,
        )
    }
}

/// The total size of uploads (for a progress bar).
pub fn total_len(files: &[Upload]) -> Result<u64, SshError> {
    files.iter().map(|f| f.source.len()).sum()
}

/// Quotes `s` for a POSIX shell (single quotes).
pub use super::sh_quote;

#[cfg(test)]
mod tests {
    use super::*;

    const ED: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl a comment";

    #[test]
    fn public_keys_parse_and_print_like_openssh() {
        let k = PublicKey::parse(ED, "test").unwrap();
        assert_eq!(k.algorithm(), "ssh-ed25519");
        assert_eq!(k.to_openssh(), ED);
        assert!(k.fingerprint().starts_with("SHA256:"));
        // 32 bytes of SHA-256 are 43 characters of unpadded base64.
        assert_eq!(k.fingerprint().len(), "SHA256:".len() + 43);
        assert!(!k.fingerprint().ends_with('='));
    }

    #[test]
    fn bad_public_keys_are_named() {
        let e = PublicKey::parse("ssh-ed25519", "key.pub")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key.pub"), "{e}");
        let e = PublicKey::parse(
            "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl",
            "k",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("says ssh-rsa"), "{e}");
        let e = PublicKey::parse("ssh-ed25519 !!!", "k")
            .unwrap_err()
            .to_string();
        assert!(e.contains("base64"), "{e}");
    }

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(sh_quote("a'b"), r"'a'\''b'");
    }
}
