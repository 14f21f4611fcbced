//! moto's EC2 server for the tests: the AWS API the AWS provider (and the instance simulator)
//! talk to. `tools/deps.sh` installs moto (pinned) in a venv at `/opt/cedana/moto`
//! (`$CEDANA_MOTO_PREFIX` names another one); a test fails, saying how to install it, when it is
//! missing.
//!
//! ```no_run
//! let moto = cedana_tests::moto::MotoServer::start();
//! moto.reset();
//! let mut cmd = std::process::Command::new("cedana-driver");
//! moto.apply_env(&mut cmd); // AWS_ENDPOINT_URL, test credentials, AWS_REGION
//! ```

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Environment variable naming moto's venv (default `/opt/cedana/moto`).
pub const MOTO_PREFIX_ENV: &str = "CEDANA_MOTO_PREFIX";
/// Where `tools/deps.sh` puts moto's venv.
pub const DEFAULT_MOTO_PREFIX: &str = "/opt/cedana/moto";
/// The credentials the tests use (moto accepts any).
pub const ACCESS_KEY_ID: &str = "AKIDCEDANATESTING01";
pub const SECRET_ACCESS_KEY: &str = "cedana+test+secret/0123456789abcdefSECRET";
/// The region the tests use unless they say otherwise.
pub const REGION: &str = "us-east-1";

/// `moto_server` from the venv `tools/deps.sh` installs.
pub fn moto_server_bin() -> PathBuf {
    let prefix = std::env::var_os(MOTO_PREFIX_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_MOTO_PREFIX));
    let bin = prefix.join("bin").join("moto_server");
    assert!(
        bin.is_file(),
        "{} is missing: run tools/deps.sh (it installs moto[server,ec2] in {}), or set ${MOTO_PREFIX_ENV} to a venv that has it",
        bin.display(),
        prefix.display()
    );
    bin
}

/// A `moto_server` on a free loopback port, killed (by its PID) on drop. Its output goes to a
/// log file whose last lines a failed start shows.
pub struct MotoServer {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl MotoServer {
    /// Starts moto with its defaults and waits until it answers.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts moto with extra environment variables for the server (for example
    /// `("MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION", "true")`).
    pub fn start_with(env: &[(&str, &str)]) -> Self {
        let bin = moto_server_bin();
        let dir = tempfile::Builder::new()
            .prefix("cedana-moto-")
            .tempdir()
            .expect("moto temp dir");
        let log = dir.path().join("moto.log");
        let mut last_err = String::new();
        // A free port can be taken between finding it and binding it: a few tries.
        for _ in 0..5 {
            let port = crate::free_port();
            let out = std::fs::File::create(&log).expect("moto log");
            let err = out.try_clone().expect("moto log");
            let mut cmd = Command::new(&bin);
            cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .current_dir(dir.path())
                // moto must not pick up anything from the machine's AWS setup.
                .env("AWS_CONFIG_FILE", dir.path().join("no-aws-config"))
                .env(
                    "AWS_SHARED_CREDENTIALS_FILE",
                    dir.path().join("no-aws-credentials"),
                )
                .env_remove("AWS_PROFILE");
            for (k, v) in env {
                cmd.env(k, v);
            }
            let mut child = cmd.spawn().unwrap_or_else(|e| {
                panic!("cannot start {}: {e}", bin.display());
            });
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last_err = format!("moto_server exited ({status}): {}", tail(&log, 15));
                    break;
                }
                if http(
                    port,
                    "GET",
                    "/moto-api/data.json?service=ec2&resource=nothing",
                )
                .map(|(s, _)| s == 200)
                .unwrap_or(false)
                {
                    return MotoServer { child, port, dir };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "moto_server on port {port} did not answer within 30 s: {}",
                        tail(&log, 15)
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        panic!("cannot start moto_server: {last_err}");
    }

    /// `http://127.0.0.1:PORT`: the endpoint of every service moto serves.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Clears all of moto's state (`POST /moto-api/reset`).
    pub fn reset(&self) {
        let (status, body) = http(self.port, "POST", "/moto-api/reset")
            .unwrap_or_else(|e| panic!("moto reset: {e}"));
        assert_eq!(status, 200, "moto reset answered {status}: {body}");
    }

    /// The environment a program (the driver) needs to use this moto with the standard AWS
    /// settings: endpoint, test credentials, region, and none of the machine's own AWS files
    /// or instance metadata.
    pub fn env(&self) -> Vec<(String, String)> {
        let none = self.dir.path().join("none");
        vec![
            ("AWS_ENDPOINT_URL".into(), self.url()),
            ("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY_ID.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), SECRET_ACCESS_KEY.into()),
            ("AWS_REGION".into(), REGION.into()),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
            (
                "AWS_CONFIG_FILE".into(),
                none.join("config").display().to_string(),
            ),
            (
                "AWS_SHARED_CREDENTIALS_FILE".into(),
                none.join("credentials").display().to_string(),
            ),
        ]
    }

    /// Sets [`MotoServer::env`] on `cmd` (and removes `AWS_PROFILE`, `AWS_SESSION_TOKEN`,
    /// `AWS_ENDPOINT_URL_EC2`).
    pub fn apply_env(&self, cmd: &mut Command) {
        cmd.env_remove("AWS_PROFILE")
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_ENDPOINT_URL_EC2");
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
    }

    /// Creates the S3 bucket `bucket` (at least 3 characters) with a plain `PUT /<bucket>`
    /// (moto takes unsigned requests).
    pub fn create_bucket(&self, bucket: &str) {
        let (status, body) = http(self.port, "PUT", &format!("/{bucket}"))
            .unwrap_or_else(|e| panic!("moto: create bucket {bucket}: {e}"));
        assert_eq!(
            status, 200,
            "moto: creating bucket {bucket} answered {status}: {body}"
        );
    }

    /// The keys of `bucket` under `prefix` (a plain `GET /<bucket>?list-type=2`; up to 1000).
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let (status, body) = http(
            self.port,
            "GET",
            &format!(
                "/{bucket}?list-type=2&prefix={}",
                prefix.replace('/', "%2F")
            ),
        )
        .unwrap_or_else(|e| panic!("moto: list {bucket}/{prefix}: {e}"));
        assert_eq!(
            status, 200,
            "moto: listing {bucket} answered {status}: {body}"
        );
        body.split("<Key>")
            .skip(1)
            .filter_map(|k| k.split_once("</Key>").map(|(k, _)| k.to_string()))
            .collect()
    }

    /// moto's output so far (its last `lines` lines).
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.dir.path().join("moto.log"), lines)
    }

    /// The server's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `n` lines of a file.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One HTTP/1.1 request without a body to 127.0.0.1:`port`: (status, body).
fn http(port: u16, method: &str, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            format!(
                "not an HTTP answer: {:?}",
                text.chars().take(100).collect::<String>()
            )
        })?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A request the proxy answers with an EC2 error instead of passing it on.
#[derive(Clone, Debug)]
pub struct Refusal {
    /// The EC2 action (`RunInstances`).
    pub action: String,
    /// Only requests for this instance type (`InstanceType`), when set.
    pub instance_type: Option<String>,
    /// EC2's error code (`InsufficientInstanceCapacity`, `RequestLimitExceeded`).
    pub code: String,
    /// HTTP status (EC2 sends 400 for client errors, 503 for `RequestLimitExceeded`).
    pub status: u16,
    /// How many matching requests are refused (then they pass); every one when `None`.
    pub times: Option<usize>,
    /// Only spot requests (`Some(true)`) or only on-demand ones (`Some(false)`), when set.
    pub spot: Option<bool>,
}

/// A proxy in front of moto that answers chosen requests with EC2 errors (as EC2 sends them: an
/// HTTP error status and an `<Errors>` document) and passes every other request through. moto
/// launches any type it knows and is never throttled, so this is how tests meet "no capacity"
/// and `RequestLimitExceeded`.
pub struct RefusingProxy {
    pub port: u16,
    refused: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

type Rules = std::sync::Arc<std::sync::Mutex<Vec<(Refusal, usize)>>>;

impl RefusingProxy {
    /// Refuses every `RunInstances` of each `(instance type, EC2 error code)` with HTTP 400.
    pub fn start(moto: &MotoServer, refuse: &[(&str, &str)]) -> Self {
        Self::start_with(
            moto,
            refuse
                .iter()
                .map(|(t, c)| Refusal {
                    action: "RunInstances".into(),
                    instance_type: Some(t.to_string()),
                    code: c.to_string(),
                    status: 400,
                    times: None,
                    spot: None,
                })
                .collect(),
        )
    }

    /// Refuses what `rules` say (the first matching rule with refusals left applies).
    pub fn start_with(moto: &MotoServer, rules: Vec<Refusal>) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::{Arc, Mutex};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let upstream = moto.port;
        let rules: Rules = Arc::new(Mutex::new(rules.into_iter().map(|r| (r, 0)).collect()));
        let refused = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r2, s2) = (refused.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let rules = rules.clone();
                        let r3 = r2.clone();
                        std::thread::spawn(move || {
                            let _ = serve_proxied(conn, upstream, &rules, &r3);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        RefusingProxy {
            port,
            refused,
            stop,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// How many requests were refused so far.
    pub fn refused(&self) -> usize {
        self.refused.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for RefusingProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One HTTP request from `r`: (head lines, body); `None` at the end of the connection.
fn read_request(
    r: &mut std::io::BufReader<TcpStream>,
) -> std::io::Result<Option<(Vec<String>, Vec<u8>)>> {
    use std::io::BufRead;
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if line.is_empty() {
            if head.is_empty() {
                continue;
            }
            break;
        }
        head.push(line);
    }
    let len = head
        .iter()
        .filter_map(|h| h.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    Ok(Some((head, body)))
}

/// Decodes one `application/x-www-form-urlencoded` value.
fn form_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(v) => {
                    out.push(v);
                    i += 2;
                }
                Err(_) => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn serve_proxied(
    conn: TcpStream,
    upstream: u16,
    rules: &Rules,
    refused: &std::sync::atomic::AtomicUsize,
) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut reader = std::io::BufReader::new(conn.try_clone()?);
    let mut out = conn;
    while let Some((head, body)) = read_request(&mut reader)? {
        let form: Vec<(String, String)> = String::from_utf8_lossy(&body)
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (form_decode(k), form_decode(v)))
            .collect();
        let get = |k: &str| form.iter().find(|(x, _)| x == k).map(|(_, v)| v.as_str());
        let refusal = {
            let mut rules = rules.lock().unwrap_or_else(|e| e.into_inner());
            rules
                .iter_mut()
                .find(|(r, used)| {
                    Some(r.action.as_str()) == get("Action")
                        && r.instance_type
                            .as_deref()
                            .is_none_or(|t| Some(t) == get("InstanceType"))
                        && r.times.is_none_or(|n| *used < n)
                        && r.spot.is_none_or(|spot| {
                            spot == (get("InstanceMarketOptions.MarketType") == Some("spot"))
                        })
                })
                .map(|(r, used)| {
                    *used += 1;
                    r.clone()
                })
        };
        if let Some(r) = refusal {
            refused.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let what = r.instance_type.as_deref().unwrap_or("this");
            let xml = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{}</Code><Message>Refused by the test proxy: {} for {what} ({}).</Message></Error></Errors><RequestID>cedana-test-refusal</RequestID></Response>",
                r.code, r.code, r.action
            );
            write!(
                out,
                "HTTP/1.1 {} Refused\r\nContent-Type: text/xml;charset=UTF-8\r\nContent-Length: {}\r\n\r\n{xml}",
                r.status,
                xml.len()
            )?;
            out.flush()?;
            continue;
        }
        // Through to moto, one connection per request.
        let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
        up.set_read_timeout(Some(Duration::from_secs(120)))?;
        let mut req = Vec::new();
        for (i, h) in head.iter().enumerate() {
            if i > 0 {
                if let Some((k, _)) = h.split_once(':') {
                    if k.trim().eq_ignore_ascii_case("connection") {
                        continue;
                    }
                }
            }
            req.extend_from_slice(h.as_bytes());
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"Connection: close\r\n\r\n");
        req.extend_from_slice(&body);
        up.write_all(&req)?;
        let mut resp = Vec::new();
        up.read_to_end(&mut resp)?;
        out.write_all(&resp)?;
        out.flush()?;
    }
    Ok(())
}
