//! `bench-migrate`: figures for moving a task between two agent daemons through the NATS
//! object store, with raw CRIU (dump, `cp -r`, restore) measured in the same run; the time from
//! `cedana-driver run` to the task's first output; a command's round trip through NATS; and the
//! object store's upload and download alone. Run by `tools/bench-migrate.sh`, which builds the
//! binaries, sets the environment below and turns the JSON lines printed on stdout into tables.
//!
//! Arguments: the sections to run (`ping`, `migrate`, `store`, `driver`; default all). Environment:
//! `BENCH_DIR` (work folder on disk), `BENCH_MB`, `BENCH_RUNS`, `BENCH_KINDS`, `BENCH_VARIANTS`, `BENCH_PINGS`,
//! `BENCH_DRIVER_RUNS`, `BENCH_PIDS` (every process started is noted there as `PID STARTTIME`,
//! so the script can kill leftovers), `CEDANA_AGENT_BIN`, `CEDANA_DRIVER_BIN`, `CEDANA_CRIU`.
//! Every wait is bounded; errors end the run (release builds abort on panic, so nothing here
//! panics: guards stop what was started on the way out).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use async_nats::jetstream::{self, object_store};
use cedana_agent::Compression;
use cedana_protocol::{self as protocol, Command, CommandEnvelope, Event, EventEnvelope, Reply};
use futures::StreamExt;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

const JOB: &str = "bench";

/// Holds memory, says `ready`, then prints the wall clock every 10 ms (the task's own view
/// of how long it was stopped). "compressible" is log-like text, as in bench-agent.sh.
const ALLOC: &str = r#"import os, sys, time
kind, size = sys.argv[1], int(sys.argv[2]) << 20
buf, pos, i = bytearray(size), 0, 0
while pos < size:
    if kind == "random":
        piece = os.urandom(1 << 20)
    else:
        lines = []
        while len(lines) < 16000:
            lines.append(b"%012d INFO worker-%d processed request id=%x status=%d\n" % (i, i % 7, i * 2654435761 % 2**32, 200 + i % 3))
            i += 1
        piece = b"".join(lines)
    n = min(len(piece), size - pos)
    buf[pos:pos + n] = piece[:n]
    pos += n
print("ready", flush=True)
while True:
    print("%.6f" % time.time(), flush=True)
    time.sleep(0.01)
"#;

struct Cfg {
    agent: PathBuf,
    driver: PathBuf,
    criu: PathBuf,
    dir: PathBuf,
    mb: u64,
    runs: u32,
    kinds: Vec<String>,
    /// Migration variants run (raw-criu always).
    variants: Vec<String>,
    pings: usize,
    driver_runs: u32,
    pids: Option<PathBuf>,
    /// Limit for one dump, copy, restore or command.
    step: Duration,
}

fn env_num(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

fn env_path(name: &str) -> Result<PathBuf> {
    std::env::var_os(name)
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("{name} is not set (tools/bench-migrate.sh sets it)"))
}

fn emit(v: Value) {
    println!("{v}");
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Notes a started process as `PID STARTTIME` for the script's cleanup.
fn note_pid(cfg: &Cfg, pid: i32) {
    let (Some(file), Some(start)) = (&cfg.pids, start_time(pid)) else {
        return;
    };
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
    {
        let _ = writeln!(f, "{pid} {start}");
    }
}

/// Field 22 of `/proc/PID/stat`: when the process started, in clock ticks since boot.
fn start_time(pid: i32) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(
        s.rsplit_once(") ")?
            .1
            .split_whitespace()
            .nth(19)?
            .to_string(),
    )
}

/// CPU time, s, of `pid` and its reaped children (utime + stime + cutime + cstime).
fn cpu_secs(pid: i32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<f64> = s
        .rsplit_once(") ")?
        .1
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    // Clock ticks: 100 per second on Linux.
    Some(f.iter().sum::<f64>() / 100.0)
}

/// Waits (up to 5 s) until `pid` is gone from /proc: reaped, its CPU time counted in its
/// parent's.
async fn wait_reaped(pid: i32) {
    for _ in 0..100 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child we started and stop on the way out: SIGTERM (SIGINT for the driver), then SIGKILL.
struct Guard(std::process::Child, Signal);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0.id() as i32), self.1);
        for _ in 0..200 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A task (not our child) killed on the way out unless it was seen gone.
struct TaskGuard(Option<i32>);

impl TaskGuard {
    async fn stop(&mut self) -> Result<()> {
        if let Some(pid) = self.0.take() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            wait_gone(pid).await?;
        }
        Ok(())
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0.filter(|p| cedana_tests::is_alive(*p)) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

async fn wait_gone(pid: i32) -> Result<()> {
    for _ in 0..400 {
        if !cedana_tests::is_alive(pid) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("PID {pid} still alive 20 s after SIGKILL")
}

/// Runs a command to completion within `limit`; its stdout.
async fn run_step(
    cmd: &mut tokio::process::Command,
    limit: Duration,
    what: &str,
) -> Result<String> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .map_err(|_| anyhow!("{what} timed out after {limit:?}"))??;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Waits until the task's log says `ready` (it holds its memory).
async fn wait_ready(log: &Path, pid: i32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.lines().any(|l| l == "ready") {
            return Ok(());
        }
        if !cedana_tests::is_alive(pid) {
            bail!("test process {pid} died while allocating: {text}");
        }
        if Instant::now() > deadline {
            bail!("test process {pid} not ready after 600 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checks a restored task holds (nearly) all its memory, lets it tick for a moment, and returns
/// the longest pause between its ticks (the stop as the task saw it).
async fn check_restored(cfg: &Cfg, pid: i32, log: &Path) -> Result<f64> {
    // A lazily restored task's memory arrives after it runs: up to 60 s for it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let rss_mb = loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("restored PID {pid} is gone"))?;
        let rss_mb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            / 1024;
        if rss_mb * 10 >= cfg.mb * 9 || Instant::now() > deadline {
            break rss_mb;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if rss_mb * 10 < cfg.mb * 9 {
        bail!(
            "restored PID {pid} holds only {rss_mb} MiB of {} MiB",
            cfg.mb
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = std::fs::read_to_string(log)?;
    let ticks: Vec<f64> = text
        .lines()
        .skip_while(|l| *l != "ready")
        .filter_map(|l| l.parse().ok())
        .collect();
    let gap = ticks.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
    if ticks.last().is_none_or(|t| *t < wall() - 5.0) {
        bail!("restored PID {pid} does not tick in {}", log.display());
    }
    Ok(gap)
}

/// Wall clock, seconds since the epoch.
fn wall() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn random_hex(n: usize) -> Result<String> {
    use std::io::Read;
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(hex::encode(b))
}

/// `nats-server` with JetStream (store on disk) and a token, from a private config file.
fn start_nats(cfg: &Cfg, token: &str) -> Result<(Guard, String)> {
    let port = cedana_tests::free_port();
    let conf = cfg.dir.join("nats.conf");
    let store = cfg.dir.join("jetstream");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&conf)?;
        writeln!(
            f,
            "listen: 127.0.0.1:{port}\njetstream {{ store_dir: {store:?} }}\nauthorization {{ token: {token:?} }}"
        )?;
    }
    let child = std::process::Command::new("nats-server")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start nats-server (is it on PATH?)")?;
    note_pid(cfg, child.id() as i32);
    let guard = Guard(child, Signal::SIGTERM);
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if start.elapsed() > Duration::from_secs(15) {
            bail!("nats-server does not listen on port {port} after 15 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((guard, format!("nats://127.0.0.1:{port}")))
}

/// `cedana-agent daemon` with debug logs (timestamps of each step) in `<dir>/<worker>.log`.
fn start_daemon(
    cfg: &Cfg,
    url: &str,
    token: &str,
    worker: &str,
    work: &Path,
    shared: Option<&Path>,
    store: Option<(&Path, bool)>,
) -> Result<Guard> {
    let log = std::fs::File::create(cfg.dir.join(format!("{worker}.log")))?;
    let mut cmd = std::process::Command::new(&cfg.agent);
    cmd.args([
        "daemon",
        "--job",
        JOB,
        "--worker",
        worker,
        "--nats-url",
        url,
    ])
    .arg("--work-dir")
    .arg(work);
    if let Some(dir) = shared {
        cmd.arg("--shared-storage").arg(dir);
    }
    if let Some((dir, full)) = store {
        cmd.arg("--store").arg(dir);
        if full {
            cmd.arg("--full-restore");
        }
    }
    let child = cmd
        .env("CEDANA_NATS_TOKEN", token)
        .env("CEDANA_CONFIG", "/nonexistent/cedana_config.json")
        .env("RUST_LOG", "cedana_agent=debug")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("cannot start cedana-agent daemon")?;
    note_pid(cfg, child.id() as i32);
    Ok(Guard(child, Signal::SIGTERM))
}

/// The driver's side of the protocol, as tests/tests/daemon.rs speaks it.
struct Client {
    js: jetstream::Context,
    events: async_nats::Subscriber,
    next_id: u64,
}

impl Client {
    async fn connect(url: &str, token: &str) -> Result<Self> {
        let client = async_nats::ConnectOptions::with_token(token.into())
            .connect(url)
            .await?;
        let events = client.subscribe(format!("CEDANA.{JOB}.>")).await?;
        Ok(Client {
            js: jetstream::new(client),
            events,
            next_id: 0,
        })
    }

    async fn wait_registered(&self, worker: &str) -> Result<()> {
        let key = format!("{JOB}.{worker}");
        for _ in 0..300 {
            if let Ok(kv) = self.js.get_key_value(protocol::WORKERS_BUCKET).await {
                if let Ok(Some(_)) = kv.get(&key).await {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("worker {key} did not register within 30 s")
    }

    /// Sends a command; its id.
    async fn send(&mut self, worker: &str, command: Command) -> Result<String> {
        self.next_id += 1;
        let id = format!("c{}", self.next_id);
        let env = CommandEnvelope {
            v: protocol::VERSION,
            id: id.clone(),
            command,
        };
        self.js
            .publish(
                protocol::commands_subject(JOB, worker),
                serde_json::to_vec(&env)?.into(),
            )
            .await?
            .await?;
        Ok(id)
    }

    /// Reads events until `f` returns something, within `limit`.
    async fn until<T>(
        &mut self,
        limit: Duration,
        mut f: impl FnMut(&EventEnvelope) -> Option<T>,
    ) -> Result<T> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.events.next())
                .await
                .map_err(|_| anyhow!("no awaited event within {limit:?}"))?
                .ok_or_else(|| anyhow!("event subscription closed"))?;
            if msg.subject.ends_with(".commands") {
                continue;
            }
            if let Some(t) = f(&protocol::decode(&msg.payload)?) {
                return Ok(t);
            }
        }
    }

    /// Sends a command and waits for its reply; `also` sees every event read meanwhile.
    async fn call(
        &mut self,
        worker: &str,
        command: Command,
        limit: Duration,
        mut also: impl FnMut(&EventEnvelope),
    ) -> Result<Reply> {
        let id = self.send(worker, command).await?;
        self.until(limit, |e| {
            also(e);
            match &e.event {
                Event::Reply { id: i, reply } if *i == id => Some(reply.clone()),
                _ => None,
            }
        })
        .await
    }
}

async fn ping_section(cfg: &Cfg, c: &mut Client) -> Result<()> {
    let mut ms = Vec::new();
    for i in 0..cfg.pings + 20 {
        let t = Instant::now();
        let r = c
            .call("w1", Command::Ping, Duration::from_secs(30), |_| {})
            .await?;
        if !matches!(r, Reply::Pong { .. }) {
            bail!("ping answered {r:?}");
        }
        // The first 20 warm up the connections and the consumer.
        if i >= 20 {
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    emit(json!({"section": "ping", "ms": ms}));
    Ok(())
}

/// A daemon log line's timestamp (seconds since midnight UTC) and its fields, for the last
/// line since `from` whose message is `msg`.
fn log_line(log: &Path, from: u64, msg: &str) -> Option<(f64, String)> {
    let text = std::fs::read(log).ok()?;
    let text = String::from_utf8_lossy(text.get(from as usize..)?).into_owned();
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains(&format!(": {msg}")))?;
    let time = line.split_whitespace().next()?.split('T').nth(1)?;
    let mut hms = time.trim_end_matches('Z').split(':');
    let (h, m, s): (f64, f64, f64) = (
        hms.next()?.parse().ok()?,
        hms.next()?.parse().ok()?,
        hms.next()?.parse().ok()?,
    );
    Some((h * 3600.0 + m * 60.0 + s, line.to_string()))
}

/// A `Duration`'s Debug form (`1.5s`, `20.3ms`, `7µs`) in field `key=` of a log line, seconds.
fn dur_field(line: &str, key: &str) -> Option<f64> {
    let v = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))?;
    let split = v.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let n: f64 = v[..split].parse().ok()?;
    let scale = match &v[split..] {
        "s" => 1.0,
        "ms" => 1e-3,
        "µs" => 1e-6,
        "ns" => 1e-9,
        _ => return None,
    };
    Some(n * scale)
}

/// `b - a` for seconds since midnight, across midnight too.
fn since(a: f64, b: f64) -> f64 {
    let d = b - a;
    if d < -43200.0 {
        d + 86400.0
    } else {
        d
    }
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Which daemons a migration goes between, and how the checkpoint travels.
struct Route<'a> {
    from: &'a str,
    to: &'a str,
    /// The daemons' `--shared-storage` folder; else the object store.
    shared: Option<&'a Path>,
    /// The variant's name when the daemons use a checkpoint store (`--store`).
    store: Option<&'a str>,
    /// PIDs of the two daemons and of nats-server, for their CPU time.
    pids: [i32; 3],
}

/// Migration variants, in the order they run: raw CRIU; through the object store, the
/// restoring worker reading the checkpoint while it is stored (`none`, `zstd`) or after
/// (`-after`); through a shared folder; through a checkpoint store (a folder), restored
/// lazily (the task runs, its memory follows) or in full, or post-copy (the restore starts
/// once the manifest is published, before the chunks are stored).
const VARIANTS: [&str; 10] = [
    "raw-criu",
    "none",
    "zstd",
    "none-after",
    "zstd-after",
    "shared-none",
    "shared-zstd",
    "store-lazy",
    "store-full",
    "store-postcopy",
];

/// One migration: spawn, checkpoint (task stopped), restore; timed and split. With
/// `prefetch`, the restoring worker reads the checkpoint while it is stored (as the driver
/// moves a task: `Command::Prefetch` to it before the checkpoint); without, only afterwards.
#[allow(clippy::too_many_arguments)]
async fn migrate_run(
    cfg: &Cfg,
    c: &mut Client,
    store: &object_store::ObjectStore,
    work: &Path,
    route: &Route<'_>,
    kind: &str,
    compression: Compression,
    prefetch: bool,
    run: u32,
) -> Result<Value> {
    let (from, to) = (route.from, route.to);
    let variant = match route.store {
        Some(name) => name.to_string(),
        None => format!(
            "{}-{}{}",
            if route.shared.is_some() {
                "shared"
            } else {
                "cedana"
            },
            serde_json::to_value(compression)?.as_str().unwrap_or("?"),
            if route.shared.is_none() && !prefetch {
                "-after"
            } else {
                ""
            }
        ),
    };
    let task = format!("mem{run}-{kind}-{variant}");
    let post_copy = route.store == Some("store-postcopy");
    // A post-copy checkpoint's size and end, from its `CheckpointStored` event.
    let stored: std::cell::Cell<Option<u64>> = std::cell::Cell::new(None);
    let note_stored = |e: &EventEnvelope| {
        if let Event::CheckpointStored { bytes, error, .. } = &e.event {
            if e.worker == from && error.is_none() {
                stored.set(Some(*bytes));
            }
        }
    };
    let limit = cfg.step;
    let cmd = format!("exec /usr/bin/python3 alloc.py {kind} {}", cfg.mb);
    let r = c
        .call(
            from,
            Command::Spawn {
                task: task.clone(),
                cmd,
                userns: false,
            },
            limit,
            |_| {},
        )
        .await?;
    let Reply::Spawned { pid, .. } = r else {
        bail!("spawn answered {r:?}")
    };
    note_pid(cfg, pid);
    let mut orig = TaskGuard(Some(pid));
    let log = work.join(format!("{task}.log"));
    wait_ready(&log, pid).await?;
    let (log1, log2) = (
        cfg.dir.join(format!("{from}.log")),
        cfg.dir.join(format!("{to}.log")),
    );
    let (from1, from2) = (file_len(&log1), file_len(&log2));
    nix::unistd::sync();

    // CPU time of both daemons (CRIU included: they reap it) and of nats-server, less the
    // task's own, which the first daemon reaps when it kills the task.
    let task_cpu = cpu_secs(pid).unwrap_or(0.0);
    let cpu0: Vec<f64> = route
        .pids
        .iter()
        .map(|p| cpu_secs(*p).unwrap_or(0.0))
        .collect();
    let chunks = match prefetch && route.shared.is_none() {
        true => {
            let chunks = protocol::new_chunks_id();
            let command = Command::Prefetch {
                chunks: chunks.clone(),
            };
            let r = c.call(to, command, limit, |_| {}).await?;
            if !matches!(r, Reply::Prefetching { .. }) {
                bail!("prefetch answered {r:?}");
            }
            Some(chunks)
        }
        false => None,
    };
    let sent_wall = wall() % 86400.0;
    let t0 = Instant::now();
    let command = Command::Checkpoint {
        task: task.clone(),
        leave_running: false,
        compression,
        chunks,
        criu: None,
        post_copy,
    };
    let r = c.call(from, command, limit, note_stored).await?;
    let t1 = Instant::now();
    let checkpoint_id = c.next_id;
    let Reply::Checkpointed { object, bytes, .. } = r else {
        bail!("checkpoint answered {r:?}")
    };
    let mut first_log = None;
    let mut seen = |e: &EventEnvelope| {
        note_stored(e);
        if first_log.is_none()
            && e.worker == to
            && matches!(&e.event, Event::Log { task: t, .. } if *t == task)
        {
            first_log = Some(Instant::now());
        }
    };
    let command = Command::Restore {
        task: task.clone(),
        object: object.clone(),
        pending: post_copy,
        manifest: None,
    };
    let r = c.call(to, command, limit, &mut seen).await?;
    let t2 = Instant::now();
    let restore_id = c.next_id;
    let Reply::Restored { pid: rpid, .. } = r else {
        bail!("restore answered {r:?}")
    };
    note_pid(cfg, rpid);
    let mut restored = TaskGuard(Some(rpid));
    if first_log.is_none() {
        let w2_log = |e: &EventEnvelope| {
            note_stored(e);
            (e.worker == to && matches!(&e.event, Event::Log { task: t, .. } if *t == task))
                .then(Instant::now)
        };
        first_log = Some(c.until(Duration::from_secs(30), w2_log).await?);
    }
    // Post-copy: the old worker's work ends when the checkpoint is stored whole (its CPU
    // time counts until then).
    if post_copy && stored.get().is_none() {
        let done = |e: &EventEnvelope| {
            note_stored(e);
            stored.get()
        };
        c.until(limit, done).await?;
    }
    let bytes = if post_copy {
        stored.get().unwrap_or(bytes)
    } else {
        bytes
    };
    let t3 = first_log.unwrap_or(t2);
    let gap = check_restored(cfg, rpid, &log).await?;
    orig.stop().await?;
    wait_reaped(pid).await;
    let cpu1: Vec<f64> = route
        .pids
        .iter()
        .map(|p| cpu_secs(*p).unwrap_or(0.0))
        .collect();
    let cpu_nats = cpu1[2] - cpu0[2];
    let cpu = cpu1.iter().zip(&cpu0).map(|(b, a)| b - a).sum::<f64>() - task_cpu;
    let r = c.call(to, Command::Stop { task }, limit, |_| {}).await?;
    if !matches!(r, Reply::Stopped { .. }) {
        bail!("stop answered {r:?}");
    }
    restored.stop().await?;
    match (route.shared, route.store) {
        (Some(dir), _) => std::fs::remove_file(dir.join(&object))?,
        // The checkpoint store's folder goes with the benchmark's.
        (None, Some(_)) => {}
        (None, None) => store.delete(&object).await?,
    }

    // The parts, from the daemons' log timestamps.
    let cmd1 = log_line(
        &log1,
        from1,
        &format!("running command id=c{checkpoint_id} "),
    );
    let dumped = log_line(&log1, from1, "dump complete");
    let stored = log_line(&log1, from1, "checkpoint stored");
    let cmd2 = log_line(&log2, from2, &format!("running command id=c{restore_id} "));
    let received = log_line(&log2, from2, "checkpoint received");
    let put_back = log_line(&log2, from2, "putting back carried files");
    let done = log_line(&log2, from2, "restored");
    let parts = (|| {
        let (cmd1, dumped, stored) = (cmd1?, dumped?, stored?);
        let (cmd2, put_back, done) = (cmd2?, put_back?, done?);
        let criu_dump = dur_field(&dumped.1, "criu_time")?;
        let dump_total = dur_field(&dumped.1, "total_time")?;
        // Making the archive durable: fsync and rename, or the object store's last
        // acknowledgements and the object's info.
        let finish = dur_field(&dumped.1, "finish_time")?;
        let criu_restore = dur_field(&done.1, "criu_time")?;
        // Streamed from the object store: the download ends with the last chunk (and the
        // object's digest checked), the extraction with it; what follows are the final checks.
        // From a file: download (if any), then verification and extraction.
        let (download, verify) = match received {
            Some(r) => (since(cmd2.0, r.0), since(r.0, put_back.0)),
            None => {
                let verify = dur_field(&done.1, "verify_time")?;
                (since(cmd2.0, put_back.0) - verify, verify)
            }
        };
        Some(json!({
            "to_w1": since(sent_wall, cmd1.0),
            "criu_dump": criu_dump,
            "archive": dump_total - criu_dump - finish,
            "upload": finish + since(dumped.0, stored.0),
            "download": download,
            "verify": verify,
            "criu_restore": criu_restore,
            "put_back": since(put_back.0, done.0) - criu_restore,
        }))
    })();
    Ok(json!({
        "section": "migrate", "kind": kind, "variant": variant, "run": run,
        "downtime": secs(t2 - t0), "checkpoint": secs(t1 - t0), "restore": secs(t2 - t1),
        "total": secs(t3 - t0), "gap": gap, "bytes": bytes, "parts": parts,
        "cpu": cpu, "cpu_nats": cpu_nats,
    }))
}

/// Raw CRIU on the same kind of task: dump, `cp -r`, restore.
async fn raw_run(cfg: &Cfg, kind: &str, run: u32) -> Result<Value> {
    let dir = cfg.dir.join("raw");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("alloc.py"), ALLOC)?;
    let (a, b, log) = (dir.join("dirA"), dir.join("dirB"), dir.join("task.log"));
    std::fs::create_dir(&a)?;
    let out = run_step(
        tokio::process::Command::new(&cfg.agent)
            .args(["exec", "--log"])
            .arg(&log)
            .arg("--cwd")
            .arg(&dir)
            .args([
                "--",
                "/usr/bin/python3",
                "alloc.py",
                kind,
                &cfg.mb.to_string(),
            ])
            .env("CEDANA_CONFIG", "/nonexistent/cedana_config.json"),
        Duration::from_secs(30),
        "cedana-agent exec",
    )
    .await?;
    let pid: i32 = out
        .trim()
        .parse()
        .context("cedana-agent exec printed no PID")?;
    note_pid(cfg, pid);
    let mut orig = TaskGuard(Some(pid));
    wait_ready(&log, pid).await?;
    nix::unistd::sync();

    let me = std::process::id() as i32;
    let cpu0 = cpu_secs(me).unwrap_or(0.0);
    let t0 = Instant::now();
    let criu = |args: &[&str], dir: &Path| {
        let mut c = tokio::process::Command::new(&cfg.criu);
        c.args(args).arg("-D").arg(dir);
        c
    };
    let pid_s = pid.to_string();
    let dump_args = ["dump", "-t", &pid_s, "-o", "dump.log", "--file-locks"];
    run_step(&mut criu(&dump_args, &a), cfg.step, "criu dump").await?;
    let t1 = Instant::now();
    let mut cp = tokio::process::Command::new("cp");
    cp.arg("-r").arg(&a).arg(&b);
    run_step(&mut cp, cfg.step, "cp -r").await?;
    let t2 = Instant::now();
    let pidfile = dir.join("restored.pid");
    let mut restore = criu(&["restore", "-d", "-o", "restore.log", "--file-locks"], &b);
    restore.arg("--pidfile").arg(&pidfile);
    run_step(&mut restore, cfg.step, "criu restore").await?;
    let t3 = Instant::now();
    // criu and cp, reaped by this process (the tasks are not its children).
    let cpu = cpu_secs(me).unwrap_or(0.0) - cpu0;

    let rpid: i32 = std::fs::read_to_string(&pidfile)?.trim().parse()?;
    note_pid(cfg, rpid);
    let mut restored = TaskGuard(Some(rpid));
    let gap = check_restored(cfg, rpid, &log).await?;
    orig.stop().await?;
    restored.stop().await?;
    let bytes: u64 = std::fs::read_dir(&a)?
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(json!({
        "section": "migrate", "kind": kind, "variant": "raw-criu", "run": run,
        "downtime": secs(t3 - t0), "checkpoint": secs(t1 - t0), "restore": secs(t3 - t1),
        "total": secs(t3 - t0), "gap": gap, "bytes": bytes, "cpu": cpu, "cpu_nats": 0.0,
        "parts": {"criu_dump": secs(t1 - t0), "copy": secs(t2 - t1), "criu_restore": secs(t3 - t2)},
    }))
}

/// The object store alone, `runs` times: a file of `mb` random MiB up and down, as the daemon
/// moves checkpoints (`cedana_agent::objstore`: 128 KiB chunks, many in
/// flight; read back as the chunks arrive, size and SHA-256 checked, bytes dropped) and as
/// async-nats's own `put` and `get` do (128 KiB chunks, each acknowledged before the next;
/// read into a buffer); a plain `cp` for scale. CPU time of this process and nats-server.
async fn store_section(cfg: &Cfg, js: &jetstream::Context, nats_pid: i32) -> Result<()> {
    use tokio::io::AsyncReadExt;
    let blob = cfg.dir.join("blob");
    {
        let mut src = tokio::fs::File::open("/dev/urandom").await?;
        let mut dst = tokio::fs::File::create(&blob).await?;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..cfg.mb {
            src.read_exact(&mut buf).await?;
            dst.write_all(&buf).await?;
        }
        dst.sync_all().await?;
    }
    let os = js
        .create_object_store(object_store::Config {
            bucket: "cedana_bench".into(),
            ..Default::default()
        })
        .await?;
    let bucket = cedana_agent::objstore::Bucket::open(js, os.clone(), "cedana_bench")
        .await
        .map_err(|e| anyhow!(e))?;
    let me = std::process::id() as i32;
    let cpu = || {
        (
            cpu_secs(me).unwrap_or(0.0),
            cpu_secs(nats_pid).unwrap_or(0.0),
        )
    };
    let step = |step: &str, run: u32, t: Instant, c0: (f64, f64)| {
        let c1 = cpu();
        emit(
            json!({"section": "store", "step": step, "run": run, "s": secs(t.elapsed()),
            "cpu": c1.0 - c0.0, "cpu_nats": c1.1 - c0.1}),
        );
    };
    for run in 1..=cfg.runs {
        // Up and down as the daemon.
        nix::unistd::sync();
        let (c0, t) = (cpu(), Instant::now());
        let (upload, done) = bucket.upload("bench", Default::default(), None);
        let path = blob.clone();
        let name = tokio::task::spawn_blocking(move || -> Result<String> {
            use cedana_agent::zipfmt::Sink;
            let mut up: Box<dyn Sink> = Box::new(upload);
            let len = std::fs::metadata(&path)?.len();
            up.copy_from(&mut std::fs::File::open(&path)?, len, None)?;
            Ok(up.commit(&format!("blob{run}"), &[])?)
        })
        .await??;
        let _ = done.await;
        step(
            "put as the daemon (128 KiB chunks, 64 in flight)",
            run,
            t,
            c0,
        );
        let (c0, t) = (cpu(), Instant::now());
        let fetch = bucket.fetch(&name).await.map_err(|e| anyhow!(e))?;
        let (tx, mut rx) = fetch.channel(true);
        let reader = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
            use cedana_agent::zipfmt::ChunkSource;
            let mut n = 0;
            while let Some(b) = rx.next_chunk()? {
                n += b.len() as u64;
            }
            Ok(n)
        });
        fetch.pump(tx).await?;
        let n = reader.await??;
        if n != cfg.mb << 20 {
            bail!("read back {n} bytes of {}", cfg.mb << 20);
        }
        step(
            "get as the daemon (chunks handed on as they arrive)",
            run,
            t,
            c0,
        );
        os.delete(&name).await?;

        // Up and down through async-nats's put and get.
        nix::unistd::sync();
        let (c0, t) = (cpu(), Instant::now());
        let mut f = tokio::fs::File::open(&blob).await?;
        if let Err(e) = os.put("blob", &mut f).await {
            bail!("object store put: {e}");
        }
        step("async-nats put (128 KiB chunks, one at a time)", run, t, c0);
        let (c0, t) = (cpu(), Instant::now());
        let mut obj = os.get("blob").await?;
        let mut buf = Vec::with_capacity(4 << 20);
        let mut n = 0u64;
        loop {
            buf.clear();
            let k = obj.read_buf(&mut buf).await?;
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        if n != cfg.mb << 20 {
            bail!("read back {n} bytes of {}", cfg.mb << 20);
        }
        step("async-nats get (into a buffer)", run, t, c0);
        os.delete("blob").await?;

        nix::unistd::sync();
        let (c0, t) = (cpu(), Instant::now());
        let mut cp = tokio::process::Command::new("cp");
        cp.arg(&blob).arg(cfg.dir.join("blob.cp"));
        run_step(&mut cp, cfg.step, "cp").await?;
        step("cp (same disk)", run, t, c0);
        std::fs::remove_file(cfg.dir.join("blob.cp"))?;
    }
    js.delete_object_store("cedana_bench").await?;
    std::fs::remove_file(&blob)?;
    Ok(())
}

/// Two daemons on one NATS server: the ping, migrate and store sections.
async fn nats_sections(cfg: &Cfg, sections: &[&str]) -> Result<()> {
    let token = random_hex(16)?;
    let (_nats, url) = start_nats(cfg, &token)?;
    let (url, token) = (url.as_str(), token.as_str());
    // Both workers use one folder: restored tasks reopen their files by path, which on real
    // machines is the same job folder on every worker (tests/tests/daemon.rs does the same).
    let work = cfg.dir.join("job");
    std::fs::create_dir_all(&work)?;
    std::fs::write(work.join("alloc.py"), ALLOC)?;
    // s1 and s2 pass checkpoints through a shared folder instead (no object store).
    let shared = cfg.dir.join("shared");
    std::fs::create_dir_all(&shared)?;
    // l1 and l2 through a checkpoint store (a folder), restoring lazily; f1 and f2 the same,
    // restoring in full.
    let ckpt_store = cfg.dir.join("ckptstore");
    std::fs::create_dir_all(&ckpt_store)?;
    let mut daemons = Vec::new();
    const WORKERS: [&str; 8] = ["w1", "w2", "s1", "s2", "l1", "l2", "f1", "f2"];
    for w in WORKERS {
        let storage = w.starts_with('s').then_some(shared.as_path());
        let store = match &w[..1] {
            "l" => Some((ckpt_store.as_path(), false)),
            "f" => Some((ckpt_store.as_path(), true)),
            _ => None,
        };
        daemons.push(start_daemon(cfg, url, token, w, &work, storage, store)?);
    }
    let pid_of = |g: &Guard| g.0.id() as i32;
    let nats_pid = pid_of(&_nats);
    let mut c = Client::connect(url, token).await?;
    for w in WORKERS {
        c.wait_registered(w).await?;
    }
    let by_store = Route {
        from: "w1",
        to: "w2",
        shared: None,
        store: None,
        pids: [pid_of(&daemons[0]), pid_of(&daemons[1]), nats_pid],
    };
    let by_folder = Route {
        from: "s1",
        to: "s2",
        shared: Some(&shared),
        store: None,
        pids: [pid_of(&daemons[2]), pid_of(&daemons[3]), nats_pid],
    };
    let lazily = Route {
        from: "l1",
        to: "l2",
        shared: None,
        store: Some("store-lazy"),
        pids: [pid_of(&daemons[4]), pid_of(&daemons[5]), nats_pid],
    };
    let post_copied = Route {
        from: "l1",
        to: "l2",
        shared: None,
        store: Some("store-postcopy"),
        pids: lazily.pids,
    };
    let in_full = Route {
        from: "f1",
        to: "f2",
        shared: None,
        store: Some("store-full"),
        pids: [pid_of(&daemons[6]), pid_of(&daemons[7]), nats_pid],
    };
    if sections.contains(&"ping") {
        eprintln!("ping: {} round trips to w1", cfg.pings);
        ping_section(cfg, &mut c).await?;
    }
    let store = c.js.get_object_store(protocol::CHECKPOINTS_BUCKET).await?;
    let runs = if sections.contains(&"migrate") {
        cfg.runs
    } else {
        0
    };
    for run in 1..=runs {
        for kind in &cfg.kinds {
            for variant in VARIANTS {
                if !cfg.variants.iter().any(|v| v == variant) {
                    continue;
                }
                let route = match variant {
                    v if v.starts_with("shared") => &by_folder,
                    "store-lazy" => &lazily,
                    "store-full" => &in_full,
                    "store-postcopy" => &post_copied,
                    _ => &by_store,
                };
                let compression = if variant.contains("zstd") {
                    Compression::Zstd
                } else {
                    Compression::None
                };
                let row = match variant {
                    "raw-criu" => raw_run(cfg, kind, run).await?,
                    _ => {
                        let prefetch = !variant.ends_with("-after");
                        migrate_run(
                            cfg,
                            &mut c,
                            &store,
                            &work,
                            route,
                            kind,
                            compression,
                            prefetch,
                            run,
                        )
                        .await?
                    }
                };
                eprintln!(
                    "  {kind} {variant} run {run}: downtime {:.2}s (checkpoint {:.2}s, restore {:.2}s)",
                    row["downtime"].as_f64().unwrap_or(0.0),
                    row["checkpoint"].as_f64().unwrap_or(0.0),
                    row["restore"].as_f64().unwrap_or(0.0)
                );
                emit(row);
            }
        }
    }
    if sections.contains(&"store") {
        eprintln!("object store alone: {} MiB up and down", cfg.mb);
        store_section(cfg, &c.js, nats_pid).await?;
    }
    Ok(())
}

/// `cedana-driver run` of a tiny script: time to the task's first line on its stdout.
async fn driver_section(cfg: &Cfg) -> Result<()> {
    let dir = cfg.dir.join("driver");
    std::fs::create_dir_all(&dir)?;
    let script = dir.join("job.rhai");
    std::fs::write(
        &script,
        "let w = launch();\nlet t = w.spawn(\"echo started; sleep 1\");\nt.wait()\n",
    )?;
    for run in 1..=cfg.driver_runs {
        let state = dir.join(format!("state{run}"));
        let t0 = Instant::now();
        let mut child = tokio::process::Command::new(&cfg.driver)
            .args(["run", "--checkpoint-every", "0"])
            .arg(&script)
            .env("CEDANA_STATE_DIR", &state)
            .env("CEDANA_AGENT_BIN", &cfg.agent)
            .env("CEDANA_CRIU", &cfg.criu)
            .env("CEDANA_CONFIG", "/nonexistent/cedana_config.json")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join(format!("driver{run}.log")))?)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start cedana-driver")?;
        let pid = child.id().unwrap_or(0) as i32;
        note_pid(cfg, pid);
        let mut lines = tokio::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
        let outcome = tokio::time::timeout(Duration::from_secs(120), async {
            let mut started = None;
            while let Some(l) = lines.next_line().await? {
                if l == "started" && started.is_none() {
                    started = Some(t0.elapsed());
                }
            }
            let status = child.wait().await?;
            anyhow::Ok((started, status, t0.elapsed()))
        })
        .await;
        let (started, status, total) = match outcome {
            Ok(r) => r?,
            Err(_) => {
                // Ctrl-C takes the job down (workers, NATS) before the driver exits.
                let _ = kill(Pid::from_raw(pid), Signal::SIGINT);
                let _ = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
                bail!("cedana-driver run did not finish within 120 s");
            }
        };
        let started =
            started.ok_or_else(|| anyhow!("the driver never printed `started` ({status})"))?;
        if !status.success() {
            bail!("cedana-driver run exited with {status}");
        }
        eprintln!(
            "  driver run {run}: task running after {:.3}s",
            secs(started)
        );
        emit(
            json!({"section": "driver", "run": run, "to_running": secs(started), "total": secs(total)}),
        );
        let _ = std::fs::remove_dir_all(&state);
    }
    Ok(())
}

fn main() -> Result<()> {
    let mb = env_num("BENCH_MB", 1024)?;
    let cfg = Cfg {
        agent: env_path("CEDANA_AGENT_BIN")?,
        driver: env_path("CEDANA_DRIVER_BIN")?,
        criu: env_path("CEDANA_CRIU").unwrap_or_else(|_| "criu".into()),
        dir: env_path("BENCH_DIR")?,
        mb,
        runs: env_num("BENCH_RUNS", 1)? as u32,
        kinds: std::env::var("BENCH_KINDS")
            .unwrap_or_else(|_| "random compressible".into())
            .split_whitespace()
            .map(String::from)
            .collect(),
        variants: std::env::var("BENCH_VARIANTS")
            .unwrap_or_else(|_| {
                "none zstd none-after zstd-after shared-none shared-zstd store-lazy store-full store-postcopy"
                    .into()
            })
            .split_whitespace()
            .map(String::from)
            .chain(["raw-criu".to_string()])
            .collect(),
        pings: env_num("BENCH_PINGS", 200)? as usize,
        driver_runs: env_num("BENCH_DRIVER_RUNS", 5)? as u32,
        pids: std::env::var_os("BENCH_PIDS").map(PathBuf::from),
        step: Duration::from_secs(300 + mb / 2),
    };
    if let Some(k) = cfg
        .kinds
        .iter()
        .find(|k| !matches!(k.as_str(), "random" | "compressible"))
    {
        bail!("unknown BENCH_KINDS entry {k:?}: use random and/or compressible");
    }
    if let Some(v) = cfg.variants.iter().find(|v| {
        !matches!(
            v.as_str(),
            v if VARIANTS.contains(&v)
        )
    }) {
        bail!("unknown BENCH_VARIANTS entry {v:?}: use none, zstd, none-after, zstd-after, shared-none, shared-zstd, store-lazy, store-full, store-postcopy");
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut sections: Vec<&str> = args.iter().map(String::as_str).collect();
    if sections.is_empty() {
        sections = vec!["ping", "migrate", "store", "driver"];
    }
    if let Some(s) = sections
        .iter()
        .find(|s| !matches!(**s, "ping" | "migrate" | "store" | "driver"))
    {
        bail!("unknown section {s:?}: use ping, migrate, store, driver");
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        if sections.iter().any(|s| *s != "driver") {
            nats_sections(&cfg, &sections).await?;
        }
        if sections.contains(&"driver") {
            eprintln!("driver: {} runs of `cedana-driver run`", cfg.driver_runs);
            driver_section(&cfg).await?;
        }
        anyhow::Ok(())
    })
}
