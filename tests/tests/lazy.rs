//! Lazy restore (`cedana-agent restore --lazy`), end to end with real CRIU and real processes:
//! the task runs again before its memory is back, its memory ends whole (a checksum the task
//! computes over all of it, again and again), and a chunk that is not what its name says or a
//! store that stops answering ends the restored task rather than letting it run on memory that
//! is not its own.

use std::io::{BufRead, BufReader, Read as _};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cedana_tests::moto::MotoServer;
use cedana_tests::*;
use serde_json::Value;

/// A Python task holding `argv[1]` MiB of random bytes and their SHA-256; prints a counter
/// every 50 ms and, every 10th time, whether all its bytes still hash the same (`N sum ok`). A
/// crash (memory that is not its own) is said in its log (`Fatal Python error`).
const WORKLOAD: &str = r#"
import faulthandler, hashlib, sys, time
faulthandler.enable()
N = int(sys.argv[1]) << 20
buf = bytearray(N)
mv = memoryview(buf)
with open("/dev/urandom", "rb", buffering=0) as f:
    off = 0
    while off < N:
        off += f.readinto(mv[off:off + (16 << 20)])
want = hashlib.sha256(buf).digest()
print("ready", flush=True)
i = 0
while True:
    i += 1
    if i % 10 == 0:
        print(i, "sum", "ok" if hashlib.sha256(buf).digest() == want else "BAD", flush=True)
    else:
        print(i, flush=True)
    time.sleep(0.05)
"#;

/// The workload started with `cedana-agent exec`, holding `mib` MiB, once it is ready.
fn start(sb: &Sandbox, mib: u32) -> (Task, PathBuf) {
    let script = sb.path().join("w.py");
    std::fs::write(&script, WORKLOAD).unwrap();
    let log = sb.path().join("w.log");
    let mib = mib.to_string();
    let task = sb.exec(
        log.to_str().unwrap(),
        &["python3", script.to_str().unwrap(), &mib],
    );
    wait_until(Duration::from_secs(60), "the workload to be ready", || {
        std::fs::read_to_string(&log).is_ok_and(|s| s.contains("ready"))
    });
    // A few lines, so that the checkpoint has a counter to go on from.
    wait_until(Duration::from_secs(20), "the workload to count", || {
        counters(&log).last().is_some_and(|n| *n >= 3)
    });
    (task, log)
}

/// The counters in the workload's log, in order (the first number of each line).
fn counters(log: &Path) -> Vec<u64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

/// The log's lines.
fn lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Waits until the restored workload, past the log's first `skip` lines, has counted on from
/// one of `from` (where the checkpoint was) and checked its whole memory at least once; no
/// check may have failed.
fn assert_runs_on_whole(log: &Path, skip: usize, from: std::ops::RangeInclusive<u64>) {
    let new = || lines(log).into_iter().skip(skip).collect::<Vec<_>>();
    wait_until(
        Duration::from_secs(90),
        "the restored workload to check its memory",
        || new().iter().any(|l| l.contains("sum")),
    );
    let new = new();
    assert!(
        new.iter().all(|l| !l.contains("BAD")),
        "the restored workload's memory differs from what it was: {new:?}"
    );
    let c: Vec<u64> = new
        .iter()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(
        c.first().is_some_and(|n| from.contains(&(n - 1))),
        "the counter goes on from {from:?}: {c:?}"
    );
    assert!(
        c.windows(2).all(|w| w[1] == w[0] + 1),
        "the counter goes on unbroken: {c:?}"
    );
}

/// Parses `restore --lazy --json`'s output, which must be a lazy restore that served pages.
fn lazy_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "restore --lazy failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "restore --lazy --json printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(v["lazy"], true, "the restore was lazy: {v}");
    assert!(v["served"]["requests"].as_u64().unwrap_or(0) > 0, "{v}");
    assert!(v["served"]["bytes_served"].as_u64().unwrap_or(0) > 0, "{v}");
    assert!(v["running_after_ms"].as_u64().is_some(), "{v}");
    assert!(v["served"]["resident_time"].as_u64().is_some(), "{v}");
    v
}

#[test]
fn a_lazily_restored_gib_process_runs_on_with_all_its_memory() {
    if !criu_ready("a_lazily_restored_gib_process_runs_on_with_all_its_memory") {
        return;
    }
    let sb = Sandbox::new();
    let (task, log) = start(&sb, 1024);
    let archive = sb.dump(task.pid, &["--chunked"]);
    assert!(!task.alive(), "dump stops the task");
    let (skip, from) = (lines(&log).len(), *counters(&log).last().unwrap());
    let out = sb.agent([
        "restore".as_ref(),
        "--lazy".as_ref(),
        "--json".as_ref(),
        archive.as_os_str(),
    ]);
    let v = lazy_json(&out);
    // Every page came through the page server: the served bytes cover the GiB.
    assert!(
        v["served"]["bytes_served"].as_u64().unwrap() >= 1 << 30,
        "{v}"
    );
    let restored = Task::new(v["pid"].as_i64().unwrap() as i32);
    assert!(restored.alive(), "the restored task runs");
    assert_runs_on_whole(&log, skip, from..=from);
    assert!(
        sb.staging_leftovers().is_empty(),
        "{:?}",
        sb.staging_leftovers()
    );
}

#[test]
fn a_counter_restores_lazily_from_a_folder_store() {
    if !criu_ready("a_counter_restores_lazily_from_a_folder_store") {
        return;
    }
    let sb = Sandbox::new();
    let store = sb.path().join("store");
    let store = store.to_str().unwrap();
    let (task, log) = start(&sb, 64);
    let pid = task.pid.to_string();
    let out = sb.agent(["dump", "-p", &pid, "--store", store, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let name = serde_json::from_slice::<Value>(&out.stdout).unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string();
    let (skip, from) = (lines(&log).len(), *counters(&log).last().unwrap());
    let v = lazy_json(&sb.agent(["restore", "--lazy", "--json", "--store", store, &name]));
    let _restored = Task::new(v["pid"].as_i64().unwrap() as i32);
    assert_runs_on_whole(&log, skip, from..=from);
    assert!(
        sb.staging_leftovers().is_empty(),
        "{:?}",
        sb.staging_leftovers()
    );
}

/// Where chunk `id`'s bytes lie in the zip at `archive`.
fn chunk_data(archive: &Path, id: &str) -> (u64, u64) {
    let mut z = zip::ZipArchive::new(std::fs::File::open(archive).unwrap()).unwrap();
    let f = z
        .by_name(&format!("chunks/{id}"))
        .expect("the chunk is in the zip");
    (f.data_start(), f.compressed_size())
}

/// The chunks of the largest page image in a chunked archive's manifest.
fn page_chunks(archive: &Path) -> Vec<String> {
    let mut z = zip::ZipArchive::new(std::fs::File::open(archive).unwrap()).unwrap();
    let mut text = String::new();
    z.by_name("manifest.json")
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    let m: Value = serde_json::from_str(&text).unwrap();
    let pages = m["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"].as_str().unwrap().starts_with("images/pages-"))
        .max_by_key(|e| e["size"].as_u64().unwrap())
        .expect("a page image")
        .clone();
    pages["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect()
}

/// Runs `cmd` (stdout piped), waits for the PID it prints once the task runs, calls `then`,
/// and waits (bounded) for it to end: the PID, and its output.
fn run_past_pid(mut cmd: Command, then: impl FnOnce()) -> (i32, std::process::ExitStatus, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cedana-agent");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let pid: i32 = line.trim().parse().unwrap_or_else(|_| {
        let _ = child.kill();
        let mut err = String::new();
        let _ = stderr.read_to_string(&mut err);
        panic!("no PID printed ({line:?}): {err}")
    });
    then();
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("restore --lazy did not end");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    stderr.read_to_string(&mut err).unwrap();
    (pid, status, err)
}

/// The chunk is altered in the archive before the restore; it holds memory of the task that
/// CRIU leaves to the page server, so it is first read once the task runs again: the task is
/// ended, and the error names the chunk.
#[test]
fn a_chunk_altered_under_a_lazy_restore_ends_the_task_naming_the_chunk() {
    if !criu_ready("a_chunk_altered_under_a_lazy_restore_ends_the_task_naming_the_chunk") {
        return;
    }
    let sb = Sandbox::new();
    let (task, _log) = start(&sb, 256);
    let archive = sb.dump(task.pid, &["--chunked"]);
    let chunks = page_chunks(&archive);
    assert!(chunks.len() > 100, "{} chunks", chunks.len());
    let victim = chunks[chunks.len() / 2].clone();
    let (start, size) = chunk_data(&archive, &victim);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&archive)
        .unwrap();
    let at = start + size / 2;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
    drop(f);

    let cmd = sb.agent_cmd(["restore".as_ref(), "--lazy".as_ref(), archive.as_os_str()]);
    let (pid, status, err) = run_past_pid(cmd, || {});
    let restored = Task::new(pid);
    assert_eq!(status.code(), Some(3), "exit 3 (bad input): {err}");
    assert!(
        err.contains(&victim),
        "the error names chunk {victim}: {err}"
    );
    assert!(err.contains("damaged"), "{err}");
    wait_until(
        Duration::from_secs(10),
        "the restored task to be ended",
        || !restored.alive(),
    );
    assert!(
        sb.staging_leftovers().is_empty(),
        "{:?}",
        sb.staging_leftovers()
    );
}

/// A TCP forwarder to `to` that can be stopped: its listener closes and every connection
/// through it is cut (the store stops answering; the server behind it keeps its data).
struct Forwarder {
    port: u16,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl Forwarder {
    fn start(to: u16) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let accept = {
            let (stop, conns) = (stop.clone(), conns.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let Ok((a, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    let _ = a.set_nonblocking(false);
                    let Ok(b) = TcpStream::connect(("127.0.0.1", to)) else {
                        continue;
                    };
                    let mut list = conns.lock().unwrap();
                    for (mut from, mut into) in [
                        (a.try_clone().unwrap(), b.try_clone().unwrap()),
                        (b.try_clone().unwrap(), a.try_clone().unwrap()),
                    ] {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut into);
                            let _ = into.shutdown(Shutdown::Write);
                        });
                    }
                    list.push(a);
                    list.push(b);
                }
            })
        };
        Forwarder {
            port,
            stop,
            conns,
            accept: Some(accept),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn a_store_that_stops_answering_ends_the_task_and_the_earlier_checkpoint_restores() {
    if !criu_ready("a_store_that_stops_answering_ends_the_task_and_the_earlier_checkpoint_restores")
    {
        return;
    }
    let moto = MotoServer::start();
    moto.create_bucket("cedana-lazy");
    let url = "s3://cedana-lazy/job";
    let sb = Sandbox::new();
    let agent = |args: &[&str], endpoint: &str| {
        let mut c = sb.agent_cmd(args);
        c.env_remove("CEDANA_STORE");
        moto.apply_env(&mut c);
        c.env("AWS_ENDPOINT_URL", endpoint)
            .env("CEDANA_STORE_RETRY_SECS", "2");
        c
    };
    let dump = |pid: i32, extra: &[&str]| {
        let pid = pid.to_string();
        let mut args = vec!["dump", "-p", &pid, "--store", url, "--json"];
        args.extend_from_slice(extra);
        let out = agent(&args, &moto.url()).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["name"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (task, log) = start(&sb, 256);
    let before = *counters(&log).last().unwrap();
    let first = dump(task.pid, &["--leave-running"]);
    let first_count = *counters(&log).last().unwrap();
    wait_until(Duration::from_secs(20), "the workload to count on", || {
        counters(&log).last().is_some_and(|n| *n > first_count + 5)
    });
    // The names are to the second: the second checkpoint must not take the first one's.
    std::thread::sleep(Duration::from_millis(1100));
    let second = dump(task.pid, &[]);
    assert_ne!(first, second);

    let mut fwd = Forwarder::start(moto.url().rsplit(':').next().unwrap().parse().unwrap());
    let cmd = agent(&["restore", "--lazy", "--store", url, &second], &fwd.url());
    let (pid, status, err) = run_past_pid(cmd, || fwd.stop());
    let restored = Task::new(pid);
    assert_eq!(status.code(), Some(1), "exit 1 (the store): {err}");
    assert!(
        err.contains(&second),
        "the error names the checkpoint: {err}"
    );
    assert!(err.contains("chunk"), "the error names a chunk: {err}");
    wait_until(
        Duration::from_secs(10),
        "the restored task to be ended",
        || !restored.alive(),
    );
    drop(restored);

    // The earlier checkpoint, straight from the store: it restores and runs on, whole.
    let skip = lines(&log).len();
    let out = agent(
        &["restore", "--lazy", "--json", "--store", url, &first],
        &moto.url(),
    )
    .output()
    .unwrap();
    let v = lazy_json(&out);
    let _again = Task::new(v["pid"].as_i64().unwrap() as i32);
    assert_runs_on_whole(&log, skip, before..=first_count);
    assert!(
        sb.staging_leftovers().is_empty(),
        "{:?}",
        sb.staging_leftovers()
    );
}

/// The processes whose command line mentions `text`.
fn processes_mentioning(text: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(text))
        })
        .collect()
}

/// The agent killed while the memory is on its way: the restored task must not run on with
/// memory that never came (CRIU's daemon, once its page server is gone, would let the kernel
/// fill it with zeros). It is ended; CRIU's daemon goes; the next restore sweeps what was left.
#[test]
fn an_agent_killed_during_a_lazy_restore_takes_the_task_with_it() {
    if !criu_ready("an_agent_killed_during_a_lazy_restore_takes_the_task_with_it") {
        return;
    }
    // The restored task, orphaned when CRIU exits, becomes this process's child: how it ended
    // can be seen (killed by the guardian, or crashed on memory that never came).
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes an integer flag and changes nothing else.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) }, 0);
    let sb = Sandbox::new();
    let (task, log) = start(&sb, 1024);
    let archive = sb.dump(task.pid, &["--chunked"]);
    let cmd = sb.agent_cmd(["restore".as_ref(), "--lazy".as_ref(), archive.as_os_str()]);
    let mut child = {
        let mut cmd = cmd;
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let restored = Task::new(line.trim().parse().expect("a PID"));
    // A moment for the task to run on what it touches at once; most of the GiB is still on
    // its way.
    std::thread::sleep(Duration::from_millis(200));
    child.kill().unwrap();
    let at_kill = lines(&log).len();
    let status = child.wait().unwrap();
    assert!(!status.success(), "the agent was killed before it finished");
    // Killed (SIGKILL), not crashed.
    let deadline = Instant::now() + Duration::from_secs(10);
    let how = loop {
        let mut st = 0;
        // SAFETY: waitpid on a PID with a valid status pointer.
        let r = unsafe { libc::waitpid(restored.pid, &mut st, libc::WNOHANG) };
        if r == restored.pid {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the restored task {} was not ended (waitpid: {r})",
            restored.pid
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        libc::WIFSIGNALED(how) && libc::WTERMSIG(how) == libc::SIGKILL,
        "the restored task ended otherwise than killed: status {how:#x} (signal {})",
        libc::WTERMSIG(how)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("BAD") && !text.contains("Fatal Python error"),
        "the task ran on memory that never came:\n{text}"
    );
    // Ended at once, not when it next touched what never came (it prints every 50 ms and
    // reads all its memory every 500 ms).
    let after = lines(&log).len() - at_kill;
    assert!(
        after <= 2,
        "the task ran on for {after} lines after the agent died:\n{text}"
    );
    let staging = sb.staging.to_string_lossy().into_owned();
    wait_until(
        Duration::from_secs(10),
        "CRIU's lazy-pages daemon to go",
        || processes_mentioning(&staging).is_empty(),
    );
    // The next run sweeps the killed agent's staging folder, and restores.
    let out = sb.agent([
        "restore".as_ref(),
        "--lazy".as_ref(),
        "--json".as_ref(),
        archive.as_os_str(),
    ]);
    let v = lazy_json(&out);
    let _again = Task::new(v["pid"].as_i64().unwrap() as i32);
    assert!(
        sb.staging_leftovers().is_empty(),
        "{:?}",
        sb.staging_leftovers()
    );
}

/// A plain archive's memory is not in chunks: `restore --lazy` restores it in full, says so
/// once, and the process runs on.
#[test]
fn a_plain_archive_asked_to_restore_lazily_restores_in_full_and_says_so() {
    if !criu_ready("a_plain_archive_asked_to_restore_lazily_restores_in_full_and_says_so") {
        return;
    }
    let sb = Sandbox::new();
    let (task, log) = start(&sb, 16);
    let archive = sb.dump(task.pid, &[]);
    let (skip, from) = (lines(&log).len(), *counters(&log).last().unwrap());
    let out = sb.agent(["restore".as_ref(), "--lazy".as_ref(), archive.as_os_str()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(
        err.matches("restoring in full, not lazily").count(),
        1,
        "said once: {err}"
    );
    assert!(err.contains("plain archive"), "{err}");
    let _restored = Task::new(parse_pid(&out));
    assert_runs_on_whole(&log, skip, from..=from);
    assert!(
        sb.staging_leftovers().is_empty(),
        "{:?}",
        sb.staging_leftovers()
    );
}
