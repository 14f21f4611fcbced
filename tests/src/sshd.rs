//! A real OpenSSH server for tests: Debian's `sshd` (openssh-server, installed by
//! tools/deps.sh) run in the foreground (`-D -e`) from a private config folder on a free
//! loopback port, with a host key and a user key generated for it. Root may log in with that
//! key only. Killed by PID on drop.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's openssh-server puts the daemon.
pub const SSHD: &str = "/usr/sbin/sshd";

/// A key pair written by `ssh-keygen` (`path`, `path.pub`).
#[derive(Clone, Debug)]
pub struct KeyFiles {
    pub private: PathBuf,
    /// The OpenSSH public key line.
    pub public: String,
}

impl KeyFiles {
    /// The public key's fingerprint as `ssh-keygen -l` prints it (`SHA256:…`).
    pub fn fingerprint(&self) -> String {
        let out = Command::new("ssh-keygen")
            .args(["-l", "-E", "sha256", "-f"])
            .arg(self.private.with_extension("pub"))
            .output()
            .expect("ssh-keygen");
        assert!(out.status.success(), "ssh-keygen -l: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .expect("fingerprint field")
            .to_string()
    }
}

/// Generates a key of `kind` (`ed25519`, `rsa`, `ecdsa`) at `path` with no passphrase.
pub fn keygen(path: &Path, kind: &str) -> KeyFiles {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", kind, "-N", "", "-C", "cedana-test", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .expect("ssh-keygen (openssh-client) on PATH: run tools/deps.sh");
    assert!(out.status.success(), "ssh-keygen: {out:?}");
    let public = std::fs::read_to_string(path.with_extension("pub"))
        .expect("public key")
        .trim()
        .to_string();
    KeyFiles {
        private: path.to_path_buf(),
        public,
    }
}

/// A running `sshd`.
pub struct Sshd {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub host_key: KeyFiles,
    /// A key root may log in with.
    pub user_key: KeyFiles,
    log: PathBuf,
}

impl Sshd {
    /// Starts sshd with an ed25519 host key. Panics (with its log) when it cannot: the tests
    /// that use it need root and openssh-server, which CI has.
    pub fn start() -> Sshd {
        Self::start_with("ed25519")
    }

    /// Starts sshd with a host key of `host_key_kind`.
    pub fn start_with(host_key_kind: &str) -> Sshd {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the sshd tests need root (sshd's privilege separation, root login); CI runs as root"
        );
        assert!(
            Path::new(SSHD).is_file(),
            "{SSHD} is missing: run tools/deps.sh (it installs openssh-server)"
        );
        // sshd refuses to start without its privilege separation folder (systemd makes it).
        std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
        let dir = tempfile::Builder::new()
            .prefix("cedana-sshd")
            .tempdir()
            .expect("temp dir");
        let host_key = keygen(
            &dir.path().join(format!("ssh_host_{host_key_kind}_key")),
            host_key_kind,
        );
        let user_key = keygen(&dir.path().join("user_key"), "ed25519");
        std::fs::write(
            dir.path().join("authorized_keys"),
            format!("{}\n", user_key.public),
        )
        .expect("authorized_keys");
        let log = dir.path().join("sshd.log");
        let mut last = String::new();
        for _ in 0..3 {
            let port = crate::free_port();
            let config = dir.path().join("sshd_config");
            std::fs::write(
                &config,
                format!(
                    "Port {port}\n\
                     ListenAddress 127.0.0.1\n\
                     AddressFamily inet\n\
                     HostKey {host}\n\
                     PidFile {dir}/sshd.pid\n\
                     AuthorizedKeysFile {dir}/authorized_keys\n\
                     PermitRootLogin prohibit-password\n\
                     PubkeyAuthentication yes\n\
                     PasswordAuthentication no\n\
                     KbdInteractiveAuthentication no\n\
                     UsePAM no\n\
                     StrictModes no\n\
                     PrintMotd no\n\
                     MaxAuthTries 10\n\
                     LogLevel VERBOSE\n\
                     Subsystem sftp internal-sftp\n",
                    host = host_key.private.display(),
                    dir = dir.path().display(),
                ),
            )
            .expect("sshd_config");
            let child = Command::new(SSHD)
                .args(["-D", "-e", "-f"])
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("log"))
                .spawn()
                .expect("start sshd");
            let mut child = child;
            match wait_ready(&mut child, port, Duration::from_secs(10)) {
                Ok(()) => {
                    return Sshd {
                        child,
                        port,
                        dir,
                        host_key,
                        user_key,
                        log,
                    }
                }
                Err(e) => {
                    stop_child(&mut child);
                    last = format!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
                    // Another test may have taken the port between free_port and bind: again.
                }
            }
        }
        panic!("sshd did not start: {last}");
    }

    /// sshd's PID.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The host key as an OpenSSH public key line.
    pub fn host_public(&self) -> &str {
        &self.host_key.public
    }

    /// A `known_hosts` line for this server (`[127.0.0.1]:PORT ALGORITHM KEY`).
    pub fn known_hosts_line(&self) -> String {
        let mut f = self.host_key.public.split_whitespace();
        format!(
            "[127.0.0.1]:{} {} {}",
            self.port,
            f.next().unwrap_or_default(),
            f.next().unwrap_or_default()
        )
    }

    /// What sshd logged so far (`-e`: to stderr, kept in a file).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// SIGTERM, a bounded wait, then SIGKILL: by PID, only the process this harness started.
fn stop_child(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits until sshd answers with its SSH banner.
fn wait_ready(child: &mut Child, port: u16, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("sshd exited: {status}"));
        }
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 8];
            if s.read_exact(&mut buf).is_ok() && buf.starts_with(b"SSH-2.0") {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "sshd did not answer on port {port} within {timeout:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
