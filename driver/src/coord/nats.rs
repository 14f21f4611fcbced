//! The embedded NATS server: with no `connection.nats_url` configured, the driver starts its own
//! `nats-server` with JetStream on a free loopback port, with a generated token (passed in a
//! private config file, never on the command line), and stops it when done.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cedana_protocol::config::Secret;

/// Errors starting the embedded server.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("cannot start nats-server ({binary}): {source}; install it (tools/deps.sh) or set connection.nats_url in the config")]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error(
        "nats-server did not accept connections on 127.0.0.1:{port} within 15 s; its log: {log}"
    )]
    NotReady { port: u16, log: String },
    #[error("cannot prepare the embedded NATS server's folder: {0}")]
    Io(#[from] std::io::Error),
}

/// A running `nats-server`, stopped on drop.
pub struct EmbeddedNats {
    child: Child,
    pub url: String,
    pub token: Secret,
    _dir: tempfile::TempDir,
}

impl EmbeddedNats {
    /// Starts the server and waits until it listens.
    pub fn start() -> Result<Self, NatsError> {
        let binary = std::env::var("CEDANA_NATS_SERVER").unwrap_or_else(|_| "nats-server".into());
        let dir = tempfile::Builder::new().prefix("cedana-nats-").tempdir()?;
        let token = Secret::new(cedana_protocol::random_hex(24)?);
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let conf = dir.path().join("nats.conf");
        let store = dir.path().join("jetstream");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&conf)?;
        writeln!(
            f,
            "listen: 127.0.0.1:{port}\njetstream {{ store_dir: {:?} }}\nauthorization {{ token: {:?} }}",
            store.display().to_string(),
            token.expose()
        )?;
        drop(f);
        let log: PathBuf = dir.path().join("nats.log");
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .map_err(|source| NatsError::Spawn {
                binary: binary.clone(),
                source,
            })?;
        let mut me = EmbeddedNats {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            token,
            _dir: dir,
        };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if start.elapsed() > Duration::from_secs(15)
                || matches!(me.child.try_wait(), Ok(Some(_)))
            {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let _ = me.child.kill();
                return Err(NatsError::NotReady {
                    port,
                    log: text.lines().rev().take(5).collect::<Vec<_>>().join(" | "),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(me)
    }
}

impl Drop for EmbeddedNats {
    fn drop(&mut self) {
        // Asked to stop, then killed if it has not within 2 s.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        for _ in 0..40 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
