//! Checkpoints in a store (`dump --store`, `restore --store`, `checkpoints`, `prune`), end to
//! end: the real agent, real CRIU and real processes, against a folder store and against
//! moto's S3 server. A second checkpoint sends only what changed; the newest checkpoint
//! restores and the task goes on from where it was; a damaged or missing chunk is refused
//! without a trace; prune keeps what it should; an agent killed mid-upload leaves the task
//! running and its chunks to a later prune.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use cedana_tests::moto::MotoServer;
use cedana_tests::*;
use serde_json::Value;

/// A Python task holding `argv[1]` MiB of random bytes (every page distinct), changing one
/// page of them and printing a counter every 50 ms.
const WORKLOAD: &str = r#"
import sys, time
N = int(sys.argv[1]) << 20
buf = bytearray(N)
mv = memoryview(buf)
with open("/dev/urandom", "rb", buffering=0) as f:
    off = 0
    while off < N:
        off += f.readinto(mv[off:off + (16 << 20)])
print("ready", flush=True)
i = 0
while True:
    i += 1
    buf[(i * 4096) % N] ^= 1
    print(i, flush=True)
    time.sleep(0.05)
"#;

/// One test's sandbox and store: a folder in the sandbox, or a bucket of a moto server.
struct Env {
    sb: Sandbox,
    url: String,
    moto: Option<MotoServer>,
}

impl Env {
    /// A folder store given as a plain absolute path.
    fn folder() -> Env {
        let sb = Sandbox::new();
        let url = sb.path().join("store").display().to_string();
        Env {
            sb,
            url,
            moto: None,
        }
    }

    /// A bucket of a fresh moto S3 server, under a prefix.
    fn s3() -> Env {
        let moto = MotoServer::start();
        moto.create_bucket("cedana-ckpt");
        Env {
            sb: Sandbox::new(),
            url: "s3://cedana-ckpt/jobs/job-1".into(),
            moto: Some(moto),
        }
    }

    /// The folder of a folder store.
    fn dir(&self) -> PathBuf {
        assert!(self.moto.is_none(), "not a folder store");
        PathBuf::from(&self.url)
    }

    /// The agent with the sandbox's staging folder, and the S3 settings of moto (none of the
    /// machine's AWS settings otherwise).
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = self.sb.agent_cmd(args);
        c.env_remove("CEDANA_STORE")
            .env_remove("AWS_ENDPOINT_URL")
            .env_remove("AWS_ENDPOINT")
            .env_remove("AWS_DEFAULT_REGION");
        if let Some(m) = &self.moto {
            m.apply_env(&mut c);
        }
        c
    }

    fn agent(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run cedana-agent")
    }

    /// `dump -p PID --store URL --json EXTRA…`, which must succeed; its JSON.
    fn dump(&self, pid: i32, extra: &[&str]) -> Value {
        let pid = pid.to_string();
        let mut args = vec!["dump", "-p", &pid, "--store", &self.url, "--json"];
        args.extend_from_slice(extra);
        let out = self.agent(&args);
        assert!(
            out.status.success(),
            "dump of {pid} into {} failed ({}): {}\n{}",
            self.url,
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "dump --json printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        for field in [
            "name",
            "store",
            "frozen_time",
            "criu_time",
            "upload_time",
            "images_bytes",
            "bytes",
            "chunks",
            "chunks_sent",
            "raw_sent",
            "stored_sent",
        ] {
            assert!(!v[field].is_null(), "dump --json lacks {field}: {v}");
        }
        assert_eq!(v["store"], self.url.as_str(), "{v}");
        v
    }

    /// `restore --store URL NAME`.
    fn restore_cmd(&self, name: &str) -> Output {
        self.agent(&["restore", "--store", &self.url, name])
    }

    /// Restores `name`, which must succeed and leave the staging folder empty.
    fn restore(&self, name: &str) -> Task {
        let out = self.restore_cmd(name);
        assert!(
            out.status.success(),
            "restore of {name} from {} failed ({}): {}",
            self.url,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let task = Task::new(parse_pid(&out));
        assert!(task.alive(), "restored PID {} is not running", task.pid);
        assert_no_staging_left(&self.sb);
        task
    }

    /// The checkpoints' names, oldest first (`checkpoints --json`).
    fn checkpoints(&self) -> Vec<String> {
        let out = self.agent(&["checkpoints", "--store", &self.url, "--json"]);
        assert!(
            out.status.success(),
            "checkpoints failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("checkpoints --json");
        v.as_array()
            .unwrap_or_else(|| panic!("checkpoints --json is not a list: {v}"))
            .iter()
            .map(|c| {
                assert!(c["manifest_bytes"].as_u64().unwrap_or(0) > 0, "{c}");
                assert!(c["written_ms"].as_i64().unwrap_or(0) > 0, "{c}");
                c["name"].as_str().expect("a name").to_string()
            })
            .collect()
    }

    /// `prune --keep N --json`, which must succeed; its JSON.
    fn prune(&self, keep: usize) -> Value {
        let keep = keep.to_string();
        let out = self.agent(&["prune", "--store", &self.url, "--keep", &keep, "--json"]);
        assert!(
            out.status.success(),
            "prune failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "prune --json printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// The chunk ids a checkpoint's manifest names (folder store), distinct, in order.
    fn manifest_chunks(&self, name: &str) -> Vec<String> {
        let path = self.dir().join("checkpoints").join(format!("{name}.json"));
        let m: Value = serde_json::from_slice(
            &std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        )
        .expect("a manifest is JSON");
        assert_eq!(m["format_version"], 2, "{}", path.display());
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for e in m["entries"].as_array().expect("entries") {
            for c in e["chunks"].as_array().expect("chunks") {
                let id = c["id"].as_str().expect("chunk id").to_string();
                if seen.insert(id.clone()) {
                    out.push(id);
                }
            }
        }
        out
    }

    /// The chunks in a folder store (file names of 64 hex digits).
    fn chunk_files(&self) -> BTreeSet<String> {
        chunk_files(&self.dir())
    }
}

fn chunk_files(store: &Path) -> BTreeSet<String> {
    std::fs::read_dir(store.join("chunks"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| is_chunk_name(n))
                .collect()
        })
        .unwrap_or_default()
}

fn is_chunk_name(n: &str) -> bool {
    n.len() == 64
        && n.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn assert_no_staging_left(sb: &Sandbox) {
    assert!(
        sb.staging_leftovers().is_empty(),
        "staging not cleaned: {:?}",
        sb.staging_leftovers()
    );
}

/// A running workload of `mib` MiB; its script (a path unique to the sandbox, which names
/// every process of it, the restored ones too) and its log.
struct Workload {
    task: Task,
    script: PathBuf,
    log: PathBuf,
}

fn start_workload(sb: &Sandbox, mib: u32) -> Workload {
    let script = sb.path().join("workload.py");
    std::fs::write(&script, WORKLOAD).expect("write the workload");
    let py = python();
    let task = sb.exec(
        "task.log",
        &[
            py.to_str().expect("utf-8"),
            script.to_str().expect("utf-8"),
            &mib.to_string(),
        ],
    );
    let log = sb.path().join("task.log");
    wait_until(
        Duration::from_secs(60),
        &format!("{mib} MiB workload to be ready"),
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("ready")
        },
    );
    wait_for_numbers(&log, 3);
    Workload { task, script, log }
}

impl Workload {
    fn last(&self) -> u64 {
        numbers(&self.log).last().copied().unwrap_or(0)
    }
    /// Waits until it printed `n` more numbers.
    fn advance(&self, n: usize) {
        wait_for_numbers(&self.log, numbers(&self.log).len() + n);
    }
    /// The live processes running its script.
    fn processes(&self) -> Vec<i32> {
        processes_running(&self.script)
    }
    /// Dumps it into the store, left running, noting the counter before and after.
    fn dump(&self, env: &Env) -> Dumped {
        let before = self.last();
        let out = env.dump(self.task.pid, &["--leave-running"]);
        let after = self.last();
        assert!(self.task.alive(), "--leave-running keeps the task running");
        Dumped { out, before, after }
    }
    /// Restores checkpoint `d` (the original must be gone) and checks the counter goes on
    /// from where it was at that dump (the restored task is killed after).
    fn restore_and_check(&self, env: &Env, d: &Dumped) {
        assert!(
            self.processes().is_empty(),
            "the workload still runs: {:?}",
            self.processes()
        );
        let at = numbers(&self.log).len();
        let restored = env.restore(d.name());
        wait_for_numbers(&self.log, at + 10);
        restored.kill();
        let nums = numbers(&self.log);
        assert_goes_on(&nums[at..], d.before, d.after);
    }
}

/// A checkpoint made by [`Workload::dump`]: the agent's JSON and the last number the task
/// had printed before and after the dump.
struct Dumped {
    out: Value,
    before: u64,
    after: u64,
}

impl Dumped {
    fn name(&self) -> &str {
        self.out["name"].as_str().expect("name")
    }
    fn get(&self, field: &str) -> u64 {
        self.out[field]
            .as_u64()
            .unwrap_or_else(|| panic!("{field} in {}", self.out))
    }
}

/// What a restored counter printed goes on from where the checkpoint was taken: its first
/// number follows the last one printed before the dump (and is at most one past the last
/// one printed when the dump returned), and the rest follow one by one.
fn assert_goes_on(new: &[u64], before: u64, after: u64) {
    assert!(!new.is_empty(), "the restored task printed nothing");
    assert!(
        new[0] > before && new[0] <= after + 1,
        "the restored counter starts at {} but was between {before} and {after} at the dump (restarted?): {new:?}",
        new[0]
    );
    for w in new.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "the restored counter skips or repeats: {new:?}"
        );
    }
}

/// Live processes whose command line holds `marker`.
fn processes_running(marker: &Path) -> Vec<i32> {
    let marker = marker.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|pid| {
                    std::fs::read(format!("/proc/{pid}/cmdline"))
                        .map(|c| String::from_utf8_lossy(&c).contains(&marker))
                        .unwrap_or(false)
                })
                .filter(|pid| is_alive(*pid))
                .collect()
        })
        .unwrap_or_default()
}

/// The state letter of `pid` (`R`, `S`, `T`, …) from /proc.
fn state(pid: i32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(") ")?.1.chars().next()
}

/// Two checkpoints of a task left running, the second sending little; the original killed,
/// the newest restored, going on from where it was. Then `prune --keep 1` on that store.
fn incremental_then_restore(env: &Env) {
    let w = start_workload(&env.sb, 64);
    let first = w.dump(env);
    assert!(
        first.get("raw_sent") >= 64 << 20 && first.get("stored_sent") >= 60 << 20,
        "the first checkpoint sends the 64 MiB of random memory: {}",
        first.out
    );
    assert!(first.get("images_bytes") >= 64 << 20, "{}", first.out);
    w.advance(5);
    let second = w.dump(env);
    let (chunks, sent) = (second.get("chunks"), second.get("chunks_sent"));
    assert!(chunks >= 64, "{}", second.out);
    assert!(
        sent * 3 < chunks,
        "the second checkpoint sends only the changed chunks: {sent} of {chunks}: {}",
        second.out
    );
    assert!(
        second.get("raw_sent") * 2 < second.get("bytes"),
        "the second checkpoint sends less than half of its bytes: {}",
        second.out
    );
    assert_ne!(first.name(), second.name());
    assert_eq!(
        env.checkpoints(),
        vec![first.name().to_string(), second.name().to_string()],
        "checkpoints lists both, oldest first"
    );
    w.task.kill();
    w.restore_and_check(env, &second);

    // The older one goes, and the chunks only it named; the newest stays whole.
    let p = env.prune(1);
    assert_eq!(p["kept"], serde_json::json!([second.name()]), "{p}");
    assert_eq!(p["removed"], serde_json::json!([first.name()]), "{p}");
    assert!(p["chunks_deferred"].is_null(), "{p}");
    assert!(p["chunks_removed"].as_u64().unwrap() > 0, "{p}");
    assert!(p["stored_bytes_removed"].as_u64().unwrap() > 0, "{p}");
    assert!(p["chunks_kept"].as_u64().unwrap() > 0, "{p}");
    assert_eq!(env.checkpoints(), vec![second.name().to_string()]);
    let again = env.prune(1);
    assert_eq!(again["removed"], serde_json::json!([]), "{again}");
    assert_eq!(again["chunks_removed"], 0, "{again}");
    assert_eq!(again["chunks_kept"], p["chunks_kept"], "{again}");
}

#[test]
fn folder_store_second_checkpoint_sends_little_and_restores() {
    if !criu_ready("folder_store_second_checkpoint_sends_little_and_restores") {
        return;
    }
    let env = Env::folder();
    incremental_then_restore(&env);
    // What is left in the folder: the kept checkpoint's chunks, nothing being written.
    let name = env.checkpoints().remove(0);
    assert_eq!(
        env.chunk_files(),
        env.manifest_chunks(&name).into_iter().collect(),
        "after the prune the store holds exactly the kept checkpoint's chunks"
    );
    assert!(files_in(&env.dir().join("uploads")).is_empty());
    assert!(!env.dir().join("gc/lock").exists());
}

#[test]
fn s3_store_second_checkpoint_sends_little_and_restores() {
    if !criu_ready("s3_store_second_checkpoint_sends_little_and_restores") {
        return;
    }
    let env = Env::s3();
    incremental_then_restore(&env);
    let out = env.restore_cmd("no-such-checkpoint");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("no-such-checkpoint"), "{err}");
}

/// Restores `name`, expects exit 3 naming the checkpoint and `chunk`, with `what` said, and
/// checks nothing came of it.
fn assert_refused(env: &Env, w: &Workload, name: &str, chunk: &str, what: &str) {
    let out = env.restore_cmd(name);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "restore of {name} with a {what} chunk: expected exit 3, got {}: {err}",
        out.status
    );
    assert!(err.contains(name), "the error names the checkpoint: {err}");
    assert!(err.contains(chunk), "the error names chunk {chunk}: {err}");
    assert!(
        err.contains(what),
        "the error says the chunk is {what}: {err}"
    );
    assert!(out.stdout.is_empty(), "no PID printed");
    assert!(
        w.processes().is_empty(),
        "a refused restore started processes: {:?}",
        w.processes()
    );
    assert_no_staging_left(&env.sb);
}

#[test]
fn damaged_or_missing_chunk_is_refused_and_the_previous_checkpoint_restores() {
    if !criu_ready("damaged_or_missing_chunk_is_refused_and_the_previous_checkpoint_restores") {
        return;
    }
    let env = Env::folder();
    let w = start_workload(&env.sb, 64);
    let first = w.dump(&env);
    w.advance(5);
    let second = w.dump(&env);
    w.task.kill();
    let older: BTreeSet<String> = env.manifest_chunks(first.name()).into_iter().collect();
    let only_newest: Vec<String> = env
        .manifest_chunks(second.name())
        .into_iter()
        .filter(|c| !older.contains(c))
        .collect();
    assert!(
        only_newest.len() >= 2,
        "the newest checkpoint has chunks of its own: {only_newest:?}"
    );
    let chunk_path = |id: &str| env.dir().join("chunks").join(id);

    // Damaged: a chunk's file holds another chunk's bytes (a valid frame, the wrong content).
    let victim = &only_newest[0];
    let good = std::fs::read(chunk_path(victim)).expect("the victim chunk");
    let other = older
        .iter()
        .next()
        .expect("a chunk of the older checkpoint");
    std::fs::copy(chunk_path(other), chunk_path(victim)).expect("overwrite the chunk");
    assert_refused(&env, &w, second.name(), victim, "damaged");
    std::fs::write(chunk_path(victim), &good).expect("put the chunk back");

    // Missing.
    let gone = &only_newest[1];
    std::fs::remove_file(chunk_path(gone)).expect("remove a chunk");
    assert_refused(&env, &w, second.name(), gone, "missing");

    // The previous checkpoint shares neither and still restores.
    w.restore_and_check(&env, &first);
    assert_no_staging_left(&env.sb);
}

#[test]
fn prune_keeps_the_newest_which_still_restores() {
    if !criu_ready("prune_keeps_the_newest_which_still_restores") {
        return;
    }
    let env = Env::folder();
    let w = start_workload(&env.sb, 64);
    let mut dumps = Vec::new();
    for _ in 0..3 {
        w.advance(3);
        dumps.push(w.dump(&env));
    }
    w.task.kill();
    let names: Vec<String> = dumps.iter().map(|d| d.name().to_string()).collect();
    assert_eq!(env.checkpoints(), names, "three checkpoints, oldest first");
    let before = env.chunk_files();

    let p = env.prune(1);
    assert_eq!(p["kept"], serde_json::json!([names[2]]), "{p}");
    let mut removed: Vec<String> = p["removed"]
        .as_array()
        .expect("removed")
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    removed.sort();
    let mut older = names[..2].to_vec();
    older.sort();
    assert_eq!(removed, older, "{p}");
    assert!(p["chunks_deferred"].is_null(), "{p}");
    let after = env.chunk_files();
    assert!(
        after.len() < before.len(),
        "the chunk count drops: {} then {}",
        before.len(),
        after.len()
    );
    assert_eq!(
        after,
        env.manifest_chunks(&names[2]).into_iter().collect(),
        "exactly the kept checkpoint's chunks are left"
    );
    assert_eq!(p["chunks_kept"], after.len() as u64, "{p}");
    assert_eq!(
        p["chunks_removed"],
        (before.len() - after.len()) as u64,
        "{p}"
    );
    assert_eq!(env.checkpoints(), vec![names[2].clone()]);
    assert_eq!(
        files_in(&env.dir().join("checkpoints")),
        vec![format!("{}.json", names[2])]
    );

    w.restore_and_check(&env, &dumps[2]);

    let again = env.prune(1);
    assert_eq!(again["kept"], serde_json::json!([names[2]]), "{again}");
    assert_eq!(again["removed"], serde_json::json!([]), "{again}");
    assert_eq!(again["chunks_removed"], 0, "{again}");
    assert_eq!(env.chunk_files(), after, "a second prune removes nothing");
}

/// An agent started in the background; killed (by its PID) if a failed test leaves it.
struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `dump --store` of the workload into `store` (a folder), kills the agent (SIGKILL,
/// by its PID) once chunks are in the store but no manifest, and checks what a killed writer
/// must leave: the task running, no checkpoint, chunks a prune defers while the writer's
/// marker is live and removes (with the marker) once it is stale.
fn kill_mid_upload(env: &Env, w: &Workload, store: &Path, leave_running: bool) {
    let url = store.display().to_string();
    let pid = w.task.pid.to_string();
    let mut args = vec!["dump", "-p", &pid, "--store", &url];
    if leave_running {
        args.push("--leave-running");
    }
    let err_path = env.sb.path().join("killed-dump.stderr");
    let mut agent = Agent(
        env.cmd(&args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err_path).expect("stderr file"))
            .spawn()
            .expect("start the dump"),
    );
    let agent = &mut agent.0;
    let manifests = || files_in(&store.join("checkpoints"));
    let start = Instant::now();
    loop {
        if !chunk_files(store).is_empty() {
            break;
        }
        if let Ok(Some(status)) = agent.try_wait() {
            panic!(
                "the dump ended ({status}) before any chunk was seen: {}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no chunk in {} within 60 s",
            store.display()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    if !leave_running {
        assert_eq!(
            state(w.task.pid),
            Some('T'),
            "a dump that stops the task keeps it stopped while it uploads"
        );
    }
    // SIGKILL by its PID; the guardian it started (when the task is stopped) lives on.
    agent.kill().expect("kill the agent");
    let status = agent.wait().expect("reap the agent");
    assert!(
        status.code().is_none(),
        "the agent was killed, not finished ({status}): {}",
        std::fs::read_to_string(&err_path).unwrap_or_default()
    );
    assert!(
        manifests().is_empty(),
        "the upload had finished when the agent was killed: {:?}",
        manifests()
    );
    let orphans = chunk_files(store);
    assert!(!orphans.is_empty());
    eprintln!(
        "agent killed with {} chunk(s) in {} (leave_running: {leave_running})",
        orphans.len(),
        store.display()
    );
    assert_eq!(
        files_in(&store.join("uploads")).len(),
        1,
        "the killed writer's marker is left"
    );

    // The task runs (the guardian resumed it if it was stopped), and its counter goes on.
    wait_until(
        Duration::from_secs(10),
        "the task to run again after the agent was killed",
        || state(w.task.pid).is_some_and(|s| s != 'T' && s != 't'),
    );
    assert!(w.task.alive(), "the task survived the killed dump");
    w.advance(5);
    assert!(
        state(w.task.pid).is_some_and(|s| s != 'T' && s != 't'),
        "the task is stopped: {:?}",
        state(w.task.pid)
    );

    let st = Env {
        sb: Sandbox::new(),
        url,
        moto: None,
    };
    assert!(st.checkpoints().is_empty(), "no checkpoint is listed");
    // The writer's marker is live: no chunk goes.
    let p = st.prune(1);
    assert_eq!(p["chunks_removed"], 0, "{p}");
    assert!(
        p["chunks_deferred"]
            .as_str()
            .is_some_and(|s| s.contains("being written")),
        "the prune says why it removed no chunk: {p}"
    );
    assert_eq!(
        chunk_files(store),
        orphans,
        "an immediate prune removes no chunk"
    );
    // Stale (written 40 minutes ago): the next prune removes the orphans and the marker.
    let long_ago = SystemTime::now() - Duration::from_secs(40 * 60);
    for m in files_in(&store.join("uploads")) {
        let path = store.join("uploads").join(&m);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(long_ago))
            .unwrap_or_else(|e| panic!("set the mtime of {}: {e}", path.display()));
    }
    let p = st.prune(1);
    assert!(p["chunks_deferred"].is_null(), "{p}");
    assert_eq!(p["chunks_removed"], orphans.len() as u64, "{p}");
    assert_eq!(p["chunks_kept"], 0, "{p}");
    assert!(
        chunk_files(store).is_empty(),
        "orphan chunks are left: {:?}",
        chunk_files(store)
    );
    assert!(
        files_in(&store.join("uploads")).is_empty(),
        "the stale marker is left: {:?}",
        files_in(&store.join("uploads"))
    );
    assert!(st.checkpoints().is_empty());
}

#[test]
fn agent_killed_mid_upload_leaves_the_task_running_and_chunks_for_a_later_prune() {
    if !criu_ready("agent_killed_mid_upload_leaves_the_task_running_and_chunks_for_a_later_prune") {
        return;
    }
    let env = Env::folder();
    let w = start_workload(&env.sb, 512);
    // Each in a store of its own: a second dump into the first store would find most of its
    // chunks there already and send too little to be caught mid-upload.
    kill_mid_upload(&env, &w, &env.sb.path().join("store-running"), true);
    kill_mid_upload(&env, &w, &env.sb.path().join("store-stopped"), false);
    w.task.kill();
}

#[test]
fn bad_store_urls_and_unknown_checkpoints_are_refused() {
    if !criu_ready("bad_store_urls_and_unknown_checkpoints_are_refused") {
        return;
    }
    let env = Env::folder();
    let task = env.sb.exec(
        "counter.log",
        &[
            "sh",
            "-c",
            "i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done",
        ],
    );
    let log = env.sb.path().join("counter.log");
    wait_for_numbers(&log, 3);
    let pid = task.pid.to_string();
    for url in ["ftp://x", "s3://AKID:secret@bucket/p"] {
        for args in [
            vec!["dump", "-p", &pid, "--store", url],
            vec!["dump", "-p", &pid, "--store", url, "--json"],
            vec!["restore", "--store", url, "some-checkpoint"],
            vec!["checkpoints", "--store", url],
            vec!["prune", "--store", url, "--keep", "1"],
        ] {
            let out = env.agent(&args);
            let err = String::from_utf8_lossy(&out.stderr);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert_eq!(out.status.code(), Some(3), "{args:?}: {err}");
            assert!(
                err.contains("s3://BUCKET/PREFIX"),
                "{args:?} says what a store URL is: {err}"
            );
            assert!(
                !err.contains("secret") && !stdout.contains("secret"),
                "{args:?} shows the secret: {err}{stdout}"
            );
        }
    }
    // The task was not touched.
    assert!(task.alive());
    let n = numbers(&log).len();
    wait_for_numbers(&log, n + 3);
    assert_unbroken(&numbers(&log), "the counter of a task no dump touched");

    let out = env.restore_cmd("no-such-checkpoint");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("no-such-checkpoint"), "{err}");
    assert!(out.stdout.is_empty());
    assert_no_staging_left(&env.sb);
    task.kill();
}

/// An agent killed while it uploads into S3 (moto): no checkpoint is listed, the task runs on,
/// a prune right away removes none of the killed writer's chunks (its marker is live), and
/// once the marker is stale (a 1 s limit for the test, `CEDANA_STORE_MARKER_TTL_SECS`) a prune
/// removes them and the marker.
#[test]
fn s3_agent_killed_mid_upload_leaves_chunks_a_later_prune_removes() {
    if !criu_ready("s3_agent_killed_mid_upload_leaves_chunks_a_later_prune_removes") {
        return;
    }
    let env = Env::s3();
    let moto = env.moto.as_ref().unwrap();
    let w = start_workload(&env.sb, 512);
    let pid = w.task.pid.to_string();
    let mut agent = Agent(
        env.cmd(&["dump", "-p", &pid, "--store", &env.url, "--leave-running"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the dump"),
    );
    let chunks = || {
        moto.keys("cedana-ckpt", "jobs/job-1/chunks/")
            .into_iter()
            .collect::<BTreeSet<_>>()
    };
    let start = Instant::now();
    while chunks().is_empty() {
        assert!(
            agent.0.try_wait().unwrap().is_none(),
            "the dump ended before any chunk was seen"
        );
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no chunk within 60 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    agent.0.kill().expect("kill the agent");
    agent.0.wait().expect("reap the agent");
    assert!(
        moto.keys("cedana-ckpt", "jobs/job-1/checkpoints/")
            .is_empty(),
        "the upload had finished when the agent was killed"
    );
    let orphans = chunks();
    assert!(!orphans.is_empty());
    assert_eq!(moto.keys("cedana-ckpt", "jobs/job-1/uploads/").len(), 1);
    assert!(w.task.alive());
    w.advance(3);
    assert!(env.checkpoints().is_empty());
    let p = env.prune(1);
    assert_eq!(p["chunks_removed"], 0, "{p}");
    assert!(
        p["chunks_deferred"]
            .as_str()
            .is_some_and(|s| s.contains("being written")),
        "{p}"
    );
    // A killed agent's upload may still be finishing a request or two: what is there now.
    let orphans = chunks();
    std::thread::sleep(Duration::from_secs(2));
    let out = env
        .cmd(&["prune", "--store", &env.url, "--keep", "1", "--json"])
        .env("CEDANA_STORE_MARKER_TTL_SECS", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(p["chunks_deferred"].is_null(), "{p}");
    assert_eq!(p["chunks_removed"], orphans.len() as u64, "{p}");
    assert!(
        chunks().is_empty(),
        "orphan chunks are left: {:?}",
        chunks()
    );
    assert!(moto.keys("cedana-ckpt", "jobs/job-1/uploads/").is_empty());
    // The store works on: a checkpoint now is whole and restores.
    let d = env.dump(w.task.pid, &["--leave-running"]);
    w.task.kill();
    let restored = env.restore(d["name"].as_str().unwrap());
    restored.kill();
}

/// Forged manifests in the store (a hostile or broken writer): each is refused with exit 3
/// naming the checkpoint and what is wrong, before any chunk is fetched or anything is written
/// outside the staging folder, and the genuine checkpoint still restores.
#[test]
fn forged_manifests_are_refused_before_anything_is_written() {
    if !criu_ready("forged_manifests_are_refused_before_anything_is_written") {
        return;
    }
    let env = Env::folder();
    let w = start_workload(&env.sb, 8);
    let d = env.dump(w.task.pid, &["--leave-running"]);
    let name = d["name"].as_str().unwrap().to_string();
    let dir = env.dir().join("checkpoints");
    let genuine: Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.json"))).unwrap()).unwrap();
    let outside = env.sb.path().join("escaped");
    let forge = |forged: &str, edit: &dyn Fn(&mut Value)| {
        let mut m = genuine.clone();
        edit(&mut m);
        std::fs::write(dir.join(format!("{forged}.json")), m.to_string()).unwrap();
    };
    let first_chunk = genuine["entries"][0]["chunks"][0].clone();
    type Edit<'a> = Box<dyn Fn(&mut Value) + 'a>;
    let cases: Vec<(&str, &str, Edit)> = vec![
        (
            "escape",
            "unsafe entry name",
            Box::new(|m: &mut Value| {
                m["entries"][0]["name"] = Value::from(format!("images/../../{}", "escaped"));
            }),
        ),
        (
            "absolute",
            "unsafe entry name",
            Box::new(|m: &mut Value| {
                m["entries"][0]["name"] = Value::from(outside.display().to_string());
            }),
        ),
        (
            "sizes",
            "add up to",
            Box::new(|m: &mut Value| {
                let size = m["entries"][0]["size"].as_u64().unwrap();
                m["entries"][0]["size"] = Value::from(size + 4096);
            }),
        ),
        (
            "huge",
            "oversized chunk",
            Box::new(|m: &mut Value| {
                m["entries"][0]["chunks"][0]["size"] = Value::from(1u64 << 40);
                m["entries"][0]["size"] = Value::from(1u64 << 40);
            }),
        ),
        (
            "twice",
            "listed twice",
            Box::new(|m: &mut Value| {
                let e = m["entries"][0].clone();
                m["entries"].as_array_mut().unwrap().push(e);
            }),
        ),
        (
            "nochunks",
            "lists no chunks",
            Box::new(|m: &mut Value| {
                m["entries"][0].as_object_mut().unwrap().remove("chunks");
            }),
        ),
        (
            "badid",
            "not a chunk name",
            Box::new(|m: &mut Value| {
                m["entries"][0]["chunks"][0]["id"] = Value::from("../../../etc/passwd");
            }),
        ),
        (
            "version",
            "format version",
            Box::new(|m: &mut Value| m["format_version"] = Value::from(1)),
        ),
    ];
    assert!(first_chunk.is_object());
    for (forged, says, edit) in &cases {
        forge(forged, edit.as_ref());
        let out = env.restore_cmd(forged);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{forged}: {err}");
        assert!(
            err.contains(forged),
            "{forged}: the error names the checkpoint: {err}"
        );
        assert!(
            err.contains(says),
            "{forged}: the error says {says:?}: {err}"
        );
        assert!(out.stdout.is_empty(), "{forged}: no PID printed");
        assert!(
            !outside.exists(),
            "{forged}: wrote outside the staging folder"
        );
        assert_no_staging_left(&env.sb);
    }
    // A name that is not a checkpoint name (a path) is refused as unknown.
    let out = env.restore_cmd("../checkpoints/x");
    assert_eq!(out.status.code(), Some(3));
    w.task.kill();
    let t = env.restore(&name);
    t.kill();
}

/// Chunks follow the address space: new memory mapped below a large buffer (which shifts
/// every later offset in CRIU's page image) does not make the next checkpoint send the
/// buffer again; only the new pages (and small images) go.
#[test]
fn new_memory_elsewhere_does_not_resend_what_did_not_change() {
    if !criu_ready("new_memory_elsewhere_does_not_resend_what_did_not_change") {
        return;
    }
    let env = Env::folder();
    let script = env.sb.path().join("grow.py");
    let trigger = env.sb.path().join("grow-now");
    std::fs::write(
        &script,
        format!(
            "import ctypes, os, time\nlibc = ctypes.CDLL(None, use_errno=True)\nlibc.mmap.restype = ctypes.c_void_p\nlibc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]\nbig = bytearray(os.urandom(64 << 20))\nat = ctypes.addressof(ctypes.c_char.from_buffer(big))\nsize = (8 << 20) + 12288\ngrown = False\nprint('ready', flush=True)\nwhile True:\n    if os.path.exists({t:?}) and not grown:\n        # Below the buffer: every later offset in the page image moves by a size that is\n        # no multiple of a chunk.\n        hint = (at & ~0xfff) - (128 << 20)\n        p = libc.mmap(hint, size, 3, 0x22, -1, 0)\n        assert p == hint, (hex(p), hex(at))\n        ctypes.memmove(p, os.urandom(size), size)\n        grown = True\n        print('grown', flush=True)\n    time.sleep(0.02)\n",
            t = trigger.display().to_string()
        ),
    )
    .unwrap();
    let task = env.sb.exec(
        "grow.log",
        &[python().to_str().unwrap(), script.to_str().unwrap()],
    );
    let log = env.sb.path().join("grow.log");
    let has = |s: &str| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(s)
    };
    wait_until(Duration::from_secs(60), "the 64 MiB buffer", || {
        has("ready")
    });
    let first = env.dump(task.pid, &["--leave-running"]);
    assert!(first["raw_sent"].as_u64().unwrap() >= 64 << 20, "{first}");
    std::fs::write(&trigger, b"").unwrap();
    wait_until(Duration::from_secs(30), "the new mapping", || has("grown"));
    let second = env.dump(task.pid, &["--leave-running"]);
    let sent = second["raw_sent"].as_u64().unwrap();
    eprintln!("second checkpoint sent {sent} bytes");
    assert!(
        sent < 24 << 20,
        "8 MiB of new memory made the checkpoint send {} MiB: {second}",
        sent >> 20
    );
    task.kill();
}

/// The CRIU binary the agent uses (`cedana-agent check --json`).
fn criu_path(sb: &Sandbox) -> PathBuf {
    let out = sb.agent(["check", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("check --json");
    PathBuf::from(v["criu_path"].as_str().expect("criu_path"))
}

/// `dump --chunked`: one zip holding the store's manifest and chunks, mode 0600, that
/// restores with `unzip`, `sh restore.sh` and raw CRIU, and with the agent, the counter going
/// on from the checkpoint each time; a damaged chunk is refused naming the archive and the
/// chunk (exit 3, nothing restored, nothing left behind); an entry that is not a chunk is
/// refused too.
#[test]
fn chunked_zip_restores_alone_and_with_unzip_and_a_shell() {
    if !criu_ready("chunked_zip_restores_alone_and_with_unzip_and_a_shell") {
        return;
    }
    let sb = Sandbox::new();
    let w = start_workload(&sb, 16);
    let before = w.last();
    let pid = w.task.pid.to_string();
    let dir = sb.path().to_str().unwrap().to_string();
    let out = sb.agent(["dump", "-p", &pid, "-d", &dir, "--chunked", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = w.last();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let zip_path = PathBuf::from(v["archive"].as_str().unwrap());
    assert!(v["chunks"].as_u64().unwrap() > 10, "{v}");
    assert!(!w.task.alive(), "the task is stopped by the dump");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&zip_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the archive holds the process's memory");

    // What is in it: the manifest first, the script, then chunks only.
    let mut z = zip::ZipArchive::new(std::fs::File::open(&zip_path).unwrap()).unwrap();
    let names: Vec<String> = (0..z.len())
        .map(|i| z.by_index(i).unwrap().name().to_string())
        .collect();
    assert_eq!(names[0], "manifest.json");
    assert_eq!(names[1], "restore.sh");
    assert!(names[2..]
        .iter()
        .all(|n| n.strip_prefix("chunks/").is_some_and(is_chunk_name)));
    let manifest: Value = {
        let mut text = String::new();
        use std::io::Read;
        z.by_name("manifest.json")
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        serde_json::from_str(&text).unwrap()
    };
    assert_eq!(manifest["format_version"], 2);

    // unzip and a shell: the images rebuilt entry by entry, then raw CRIU restores them.
    let shell = sb.path().join("by-hand");
    std::fs::create_dir(&shell).unwrap();
    let ok = Command::new("unzip")
        .args([
            "-q",
            zip_path.to_str().unwrap(),
            "-d",
            shell.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(ok.success());
    let rebuilt = Command::new("sh")
        .arg("restore.sh")
        .current_dir(&shell)
        .output()
        .unwrap();
    assert!(
        rebuilt.status.success(),
        "{}",
        String::from_utf8_lossy(&rebuilt.stderr)
    );
    for e in manifest["entries"].as_array().unwrap() {
        let p = shell.join(e["name"].as_str().unwrap());
        assert_eq!(
            std::fs::metadata(&p).map(|m| m.len()).ok(),
            e["size"].as_u64(),
            "{} rebuilt whole",
            p.display()
        );
    }
    let at = numbers(&w.log).len();
    let criu = Command::new(criu_path(&sb))
        .args([
            "restore",
            "-D",
            "images",
            "--restore-detached",
            "-o",
            "restore.log",
        ])
        .current_dir(&shell)
        .output()
        .unwrap();
    assert!(
        criu.status.success(),
        "raw CRIU restores the rebuilt images: {}",
        std::fs::read_to_string(shell.join("images/restore.log")).unwrap_or_default()
    );
    wait_for_numbers(&w.log, at + 10);
    for p in w.processes() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    wait_until(Duration::from_secs(10), "the task to end", || {
        w.processes().is_empty()
    });
    assert_goes_on(&numbers(&w.log)[at..], before, after);

    // A damaged chunk: refused before the task runs (CRIU reads the memory chunk by chunk,
    // each checked before it goes), naming the archive and the chunk.
    let bad = sb.path().join("damaged.zip");
    std::fs::copy(&zip_path, &bad).unwrap();
    let (chunk, offset) = {
        let mut z = zip::ZipArchive::new(std::fs::File::open(&bad).unwrap()).unwrap();
        let f = z.by_index(names.len() / 2).unwrap();
        (
            f.name().trim_start_matches("chunks/").to_string(),
            f.data_start() + 4,
        )
    };
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&bad).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.write_all(b"\xff\x00\xff\x00").unwrap();
    }
    let out = sb.agent(["restore", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("damaged.zip"), "{err}");
    assert!(
        err.contains(&chunk) || err.contains("CRC"),
        "names the chunk: {err}"
    );
    assert!(w.processes().is_empty(), "nothing restored");
    assert_no_staging_left(&sb);

    // The archive itself restores with the agent, its memory handed to CRIU chunk by chunk
    // as it reads, the counter going on again.
    let at = numbers(&w.log).len();
    let out = sb.agent(["restore", zip_path.to_str().unwrap(), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["streamed"], true, "{v}");
    let restored = Task::new(v["pid"].as_i64().unwrap() as i32);
    wait_for_numbers(&w.log, at + 10);
    restored.kill();
    assert_goes_on(&numbers(&w.log)[at..], before, after);
    assert_no_staging_left(&sb);

    // An entry that is not a chunk (here a path out of the folder) refuses the archive.
    let evil = sb.path().join("evil.zip");
    {
        let mut zw = zip::ZipWriter::new(std::fs::File::create(&evil).unwrap());
        let stored = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        let mut src = zip::ZipArchive::new(std::fs::File::open(&zip_path).unwrap()).unwrap();
        zw.raw_copy_file(src.by_name("manifest.json").unwrap())
            .unwrap();
        zw.start_file("chunks/../../escaped", stored).unwrap();
        use std::io::Write;
        zw.write_all(b"x").unwrap();
        zw.finish().unwrap();
    }
    let out = sb.agent(["restore", evil.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("evil.zip") && err.contains("escaped"), "{err}");
    assert!(!sb.path().join("escaped").exists());
    assert_no_staging_left(&sb);
}
