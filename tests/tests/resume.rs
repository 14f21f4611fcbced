//! A job outlives its controller (issue 12), with real CRIU, a real nats-server and local
//! workers in their own namespaces: the controller `kill -9`ed and resumed (with and without
//! its NATS server), the attached `run` killed or hung up on, `run -d` and `attach`, `down` of
//! a job without a controller, and the embedded NATS server killed mid-job.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cedana_tests::*;

/// A managed job counting to `n`, a number every 0.1 s, into counter.txt; prints the file at
/// its end after a `--- counter.txt` line.
fn counter_job(sb: &Sandbox, n: u32) -> PathBuf {
    let p = sb.path().join("count.rhai");
    std::fs::write(
        &p,
        format!(
            r#"
fn instance_specs() {{ #{{ cpu_cores: 1, memory_gb: 1 }} }}
fn setup(w) {{ }}
fn work(w) {{
    w.spawn("i=0; while [ $i -lt {n} ]; do i=$((i+1)); echo $i >> counter.txt; sleep 0.1; done; echo '--- counter.txt'; cat counter.txt")
}}
fn restored_task(w, task) {{ }}
"#
        ),
    )
    .unwrap();
    p
}

fn kill(pid: i64, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

fn driver(sb: &Sandbox, args: &[&str]) -> std::process::Output {
    driver_cmd(sb.path()).args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The count the task printed at its end: 1..=n, no gap, no repeat.
fn assert_counted_to(stdout: &str, n: usize) {
    let nums = numbers_after(stdout, "--- counter.txt");
    assert_eq!(nums.len(), n, "stdout:\n{stdout}");
    assert_unbroken(&nums, "the task's count");
}

fn checkpoints(r: &serde_json::Value) -> usize {
    r["checkpoints"].as_array().map(Vec::len).unwrap_or(0)
}

/// The job's folder.
fn job_dir(sb: &Sandbox, r: &serde_json::Value) -> PathBuf {
    sb.path().join(r["job"].as_str().unwrap())
}

/// Processes whose command line names `needle`, or whose current folder is under `dir`.
fn processes_of(needle: &str, dir: &Path) -> Vec<(i32, String)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            if pid == std::process::id() as i32 {
                return None;
            }
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok();
            (cmd.contains(needle) || cwd.is_some_and(|c| c.starts_with(dir))).then_some((pid, cmd))
        })
        .collect()
}

/// The controller is killed with SIGKILL mid-job (and with it, in the second case, the
/// embedded NATS server); `resume` takes the job back and the count ends unbroken.
fn controller_killed_then_resumed(kill_nats_too: bool) {
    let sb = Sandbox::new();
    let script = counter_job(&sb, 150);
    let mut d = BackgroundDriver::start(sb.path(), None, &["--checkpoint-every", "2"], &script);
    let r = d.wait_record(Duration::from_secs(60), "two checkpoints", |r| {
        checkpoints(r) >= 2
    });
    let job = r["job"].as_str().unwrap().to_string();
    let controller = r["driver_pid"].as_i64().unwrap();
    let nats = r["nats_pid"].as_i64().unwrap();
    assert!(nats > 0, "{r}");
    kill(controller, nix::sys::signal::Signal::SIGKILL);
    if kill_nats_too {
        kill(nats, nix::sys::signal::Signal::SIGKILL);
    }
    // The attached `run` says what happened and how to go on.
    let code = d.wait(Duration::from_secs(30));
    assert_eq!(code, Some(4), "stderr: {}", d.stderr());
    assert!(
        d.stderr().contains(&format!("cedana-driver resume {job}")),
        "{}",
        d.stderr()
    );
    let out = driver(&sb, &["status", "--json", &job]);
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        all.as_array().map(Vec::len),
        Some(1),
        "a list of one: {all}"
    );
    let s = &all[0];
    assert_eq!(s["shown_state"], "orphaned", "{s}");
    assert_eq!(s["driver_alive"], false, "{s}");
    assert_eq!(s["driver_pid"], controller, "{s}");
    let out = driver(&sb, &["status"]);
    assert!(
        text(&out.stdout).contains("resume"),
        "{}",
        text(&out.stdout)
    );
    // Commands for a running job say how to bring it back.
    let out = driver(&sb, &["checkpoint", &job]);
    assert_eq!(out.status.code(), Some(4));
    assert!(
        text(&out.stderr).contains("resume"),
        "{}",
        text(&out.stderr)
    );

    let out = driver_cmd(sb.path())
        .args(["resume", &job])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_counted_to(&text(&out.stdout), 150);
    let r = d.record().unwrap();
    assert_eq!(r["state"], "succeeded", "{r}");
    assert_eq!(r["recoveries"], 0, "no work was lost or redone: {r}");
    assert_ne!(r["driver_pid"], controller, "{r}");
    // The task kept running on its worker the whole time: one worker.
    assert_eq!(r["task"]["worker"], "w1", "{r}");
    // Nothing of the job is left running.
    let left = processes_of(&job, &job_dir(&sb, &r));
    assert!(left.is_empty(), "left running: {left:?}");
}

#[test]
fn a_killed_controller_is_resumed_and_the_count_is_unbroken() {
    if !criu_ready("a_killed_controller_is_resumed_and_the_count_is_unbroken") {
        return;
    }
    controller_killed_then_resumed(false);
}

#[test]
fn a_killed_controller_and_nats_server_are_resumed_and_the_count_is_unbroken() {
    if !criu_ready("a_killed_controller_and_nats_server_are_resumed") {
        return;
    }
    controller_killed_then_resumed(true);
}

/// The attached `run` is killed (SIGKILL), or its terminal closes (SIGHUP): the job goes on,
/// and `attach` follows it to its end and returns its exit code.
#[test]
fn a_killed_or_hung_up_run_leaves_the_job_running() {
    if !criu_ready("a_killed_or_hung_up_run_leaves_the_job_running") {
        return;
    }
    for sig in [
        nix::sys::signal::Signal::SIGKILL,
        nix::sys::signal::Signal::SIGHUP,
    ] {
        let sb = Sandbox::new();
        let script = counter_job(&sb, 60);
        let mut d = BackgroundDriver::start(sb.path(), None, &["--checkpoint-every", "0"], &script);
        let r = d.wait_record(Duration::from_secs(60), "the task", |r| {
            r["task"].is_object()
        });
        let job = r["job"].as_str().unwrap().to_string();
        kill(d.child.id() as i64, sig);
        let code = d.wait(Duration::from_secs(10));
        if sig == nix::sys::signal::Signal::SIGHUP {
            assert_eq!(code, Some(129), "{}", d.stderr());
            assert!(d.stderr().contains("goes on"), "{}", d.stderr());
        }
        std::thread::sleep(Duration::from_millis(500));
        let r = d.record().unwrap();
        assert_eq!(r["state"], "running", "{sig:?}: {r}");
        assert!(
            is_alive(r["driver_pid"].as_i64().unwrap() as i32),
            "{sig:?}: the controller died with the terminal"
        );
        let out = driver(&sb, &["attach", "--all", &job]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert_counted_to(&text(&out.stdout), 60);
        // Once the job has ended, `attach` returns its exit code at once.
        let out = driver(&sb, &["attach", &job]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    }
}

/// `run -d` prints the job's id and returns once the task runs; the task's exit code is what
/// `attach` returns.
#[test]
fn run_detached_returns_once_the_task_runs_and_attach_returns_its_code() {
    if !criu_ready("run_detached_returns_once_the_task_runs") {
        return;
    }
    let sb = Sandbox::new();
    let p = sb.path().join("exits.rhai");
    std::fs::write(
        &p,
        r#"
fn instance_specs() { #{ cpu_cores: 1, memory_gb: 1 } }
fn setup(w) { }
fn work(w) { w.spawn("for i in 1 2 3 4 5 6 7 8 9 10; do echo tick $i; sleep 0.3; done; exit 7") }
fn restored_task(w, task) { }
"#,
    )
    .unwrap();
    let out = driver_cmd(sb.path())
        .args(["run", "-d", "--checkpoint-every", "0"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let job = text(&out.stdout).trim().to_string();
    assert!(job.starts_with("exits-"), "stdout: {job}");
    assert!(
        text(&out.stderr).contains(&format!("cedana-driver attach {job}")),
        "{}",
        text(&out.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sb.path().join(&job).join("job.json")).unwrap())
            .unwrap();
    assert!(r["task"].is_object(), "returned before the task ran: {r}");
    let out = driver(&sb, &["attach", &job]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("tick 10"),
        "{}",
        text(&out.stdout)
    );
}

/// `down` of a job whose controller died ends everything it left: tasks, agents, network
/// namespaces, the NATS server; and says what it ended.
#[test]
fn down_of_an_orphaned_job_leaves_nothing_behind() {
    if !criu_ready("down_of_an_orphaned_job_leaves_nothing_behind") {
        return;
    }
    let sb = Sandbox::new();
    let script = counter_job(&sb, 100_000);
    let mut d = BackgroundDriver::start(sb.path(), None, &["--checkpoint-every", "2"], &script);
    let r = d.wait_record(Duration::from_secs(60), "a checkpoint", |r| {
        checkpoints(r) >= 1
    });
    let job = r["job"].as_str().unwrap().to_string();
    let dir = job_dir(&sb, &r);
    kill(
        r["driver_pid"].as_i64().unwrap(),
        nix::sys::signal::Signal::SIGKILL,
    );
    d.wait(Duration::from_secs(30));
    let before = processes_of(&job, &dir);
    assert!(
        before.len() >= 3,
        "the agent, the task and nats-server run on: {before:?}"
    );
    let netns = r["workers"][0]["netns"].as_str().map(String::from);
    if let Some(ns) = &netns {
        assert!(Path::new("/run/netns").join(ns).exists());
    }
    let out = driver(&sb, &["down", &job]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(said.contains("agent"), "{said}");
    assert!(said.contains("NATS server"), "{said}");
    wait_until(
        Duration::from_secs(10),
        "everything of the job to end",
        || processes_of(&job, &dir).is_empty(),
    );
    if let Some(ns) = &netns {
        assert!(
            !Path::new("/run/netns").join(ns).exists(),
            "network namespace {ns} left"
        );
        assert!(said.contains(ns.as_str()), "{said}");
    }
    let r = d.record().unwrap();
    assert_eq!(r["state"], "down", "{r}");
    // Nothing of the job outside its folder (its NATS store is in it).
    assert!(dir.join("nats").join("jetstream").is_dir());
    let out = driver(&sb, &["attach", &job]);
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
}

/// The embedded nats-server killed mid-job: the controller starts it again on the same port,
/// token and store; the job ends unbroken and its checkpoints are still in the store after.
#[test]
fn a_killed_nats_server_is_restarted_and_the_checkpoints_survive() {
    if !criu_ready("a_killed_nats_server_is_restarted_and_the_checkpoints_survive") {
        return;
    }
    let sb = Sandbox::new();
    let script = counter_job(&sb, 120);
    let mut d = BackgroundDriver::start(sb.path(), None, &["--checkpoint-every", "2"], &script);
    let r = d.wait_record(Duration::from_secs(60), "a checkpoint", |r| {
        checkpoints(r) >= 1
    });
    let first = r["nats_pid"].as_i64().unwrap();
    kill(first, nix::sys::signal::Signal::SIGKILL);
    let code = d.wait(Duration::from_secs(120));
    assert_eq!(code, Some(0), "stderr: {}", d.stderr());
    assert_counted_to(&d.stdout(), 120);
    assert!(
        d.stderr().contains("NATS server exited") && d.stderr().contains("runs again"),
        "{}",
        d.stderr()
    );
    assert!(
        d.stderr()
            .contains("checkpoints go to the job's NATS store"),
        "{}",
        d.stderr()
    );
    let r = d.record().unwrap();
    assert_eq!(r["recoveries"], 0, "the task was never taken for lost: {r}");
    assert!(checkpoints(&r) >= 2, "checkpoints went on: {r}");
    // The kept checkpoints (the newest two) are in the store in the job's folder: the
    // server started on it again lists them.
    let dir = job_dir(&sb, &r);
    let mut nats = cedana_driver::coord::nats::EmbeddedNats::open(&dir, &dir.join("nats.token"))
        .expect("the job's server config");
    nats.spawn().expect("the job's server starts again");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let kept: Vec<String> = r["checkpoints"].as_array().unwrap()[checkpoints(&r) - 2..]
        .iter()
        .map(|c| c["object"].as_str().unwrap().to_string())
        .collect();
    rt.block_on(async {
        let client = cedana_protocol::NatsCredential::parse(&nats.token)
            .connect_options()
            .connect(nats.url.as_str())
            .await
            .unwrap();
        let js = async_nats::jetstream::new(client);
        // The job's own bucket, as its record names it.
        let bucket = r["settings"]["checkpoint_bucket"]
            .as_str()
            .expect("the job's checkpoint bucket");
        let store = js.get_object_store(bucket).await.unwrap();
        for object in &kept {
            let info = store.info(object).await;
            assert!(
                info.is_ok_and(|i| i.size > 0),
                "checkpoint {object} is gone"
            );
        }
    });
    nats.stop();
}

/// `resume` refuses what it cannot take back, and says why.
#[test]
fn resume_refuses_a_running_or_ended_job() {
    if !criu_ready("resume_refuses_a_running_or_ended_job") {
        return;
    }
    let sb = Sandbox::new();
    let script = counter_job(&sb, 30);
    let mut d = BackgroundDriver::start(sb.path(), None, &["--checkpoint-every", "0"], &script);
    let r = d.wait_record(Duration::from_secs(60), "the task", |r| {
        r["task"].is_object()
    });
    let job = r["job"].as_str().unwrap().to_string();
    let out = driver(&sb, &["resume", &job]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("is running under its controller"),
        "{}",
        text(&out.stderr)
    );
    // `rm` refuses a job that is not over.
    let out = driver(&sb, &["rm", &job]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(sb.path().join(&job).join("job.json").is_file());
    assert_eq!(d.wait(Duration::from_secs(60)), Some(0), "{}", d.stderr());
    let out = driver(&sb, &["resume", &job]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("has ended"),
        "{}",
        text(&out.stderr)
    );
    let out = driver(&sb, &["resume", "no-such-job"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    // Once it ended, `rm` removes its folder, store and checkpoints included.
    assert!(sb.path().join(&job).join("nats").is_dir());
    let out = driver(&sb, &["rm", &job]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("removed job"),
        "{}",
        text(&out.stdout)
    );
    assert!(!sb.path().join(&job).exists());
}

/// Where the active controller is killed while a standby waits.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    BetweenCheckpoints,
    DuringCheckpoint,
    DuringMigration,
    /// After a random delay (the seed is printed).
    Random(u64),
}

/// `resume --standby` takes the job over when the active controller is killed at `at`; the
/// job ends unbroken under the standby, and only one controller acted at a time (one copy of
/// the task: the count in the final folder is 1..=n once).
fn standby_takes_over(at: KillAt) {
    let sb = Sandbox::new();
    let n = 300;
    let script = counter_job(&sb, n);
    let out = driver_cmd(sb.path())
        .args(["run", "-d", "--checkpoint-every", "2"])
        .arg(&script)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let job = text(&out.stdout).trim().to_string();
    let record = || -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(sb.path().join(&job).join("job.json")).unwrap())
            .unwrap()
    };
    let standby_out = sb.path().join("standby.out");
    let standby_err = sb.path().join("standby.err");
    let mut standby = driver_cmd(sb.path())
        .args(["resume", "--standby", &job])
        .stdout(std::fs::File::create(&standby_out).unwrap())
        .stderr(std::fs::File::create(&standby_err).unwrap())
        .spawn()
        .unwrap();
    let active = record()["driver_pid"].as_i64().unwrap();
    wait_until(Duration::from_secs(60), "a checkpoint", || {
        checkpoints(&record()) >= 1
    });
    let mut migrate = None;
    match at {
        KillAt::BetweenCheckpoints => {
            let c = checkpoints(&record());
            wait_until(Duration::from_secs(30), "the next checkpoint", || {
                checkpoints(&record()) > c
            });
            std::thread::sleep(Duration::from_millis(500));
        }
        KillAt::DuringCheckpoint => {
            let start = std::time::Instant::now();
            while record()["state"] != "checkpointing" {
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "no checkpoint seen"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        KillAt::DuringMigration => {
            migrate = Some(
                driver_cmd(sb.path())
                    .args(["migrate", &job])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap(),
            );
            let start = std::time::Instant::now();
            while record()["state"] != "migrating" {
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "no migration seen"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        KillAt::Random(seed) => {
            // A small generator of its own: the delay from the seed, 0 to 8 s.
            let ms = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407)
                >> 33;
            std::thread::sleep(Duration::from_millis(ms % 8000));
        }
    }
    let killed_at = std::time::Instant::now();
    let state_at_kill = record()["state"].clone();
    kill(active, nix::sys::signal::Signal::SIGKILL);
    wait_until(Duration::from_secs(30), "the standby to take over", || {
        let r = record();
        r["driver_pid"] != active || r["state"] == "succeeded"
    });
    let took = killed_at.elapsed();
    eprintln!("{at:?}: killed in state {state_at_kill}; standby in charge after {took:?}");
    let start = std::time::Instant::now();
    let code = loop {
        if let Ok(Some(st)) = standby.try_wait() {
            break st.code();
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "the job did not end under the standby: {}",
            std::fs::read_to_string(&standby_err).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    if let Some(mut m) = migrate {
        let _ = m.kill();
        let _ = m.wait();
    }
    let err = std::fs::read_to_string(&standby_err).unwrap_or_default();
    assert_eq!(code, Some(0), "{at:?}: {err}");
    let r = record();
    assert_eq!(r["state"], "succeeded", "{at:?}: {r}");
    let out = driver(&sb, &["logs", &job]);
    assert_counted_to(&text(&out.stdout), n as usize);
    // One copy: every worker's count but the final one stopped where the task moved on.
    let left = processes_of(&job, &job_dir(&sb, &r));
    assert!(left.is_empty(), "{at:?}: left running: {left:?}");
}

#[test]
fn a_standby_takes_over_when_the_controller_dies_between_checkpoints() {
    if !criu_ready("a_standby_takes_over_between_checkpoints") {
        return;
    }
    standby_takes_over(KillAt::BetweenCheckpoints);
}

#[test]
fn a_standby_takes_over_when_the_controller_dies_during_a_checkpoint() {
    if !criu_ready("a_standby_takes_over_during_a_checkpoint") {
        return;
    }
    standby_takes_over(KillAt::DuringCheckpoint);
}

#[test]
fn a_standby_takes_over_when_the_controller_dies_during_a_migration() {
    if !criu_ready("a_standby_takes_over_during_a_migration") {
        return;
    }
    standby_takes_over(KillAt::DuringMigration);
}

#[test]
fn a_standby_takes_over_when_the_controller_dies_at_a_random_point() {
    if !criu_ready("a_standby_takes_over_at_a_random_point") {
        return;
    }
    let seed = std::env::var("CEDANA_STANDBY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("CEDANA_STANDBY_SEED={seed}");
    standby_takes_over(KillAt::Random(seed));
}

/// The disk under the job's folder (and its NATS store) fills up mid-job: the driver tells a
/// server that cannot store from a silent worker (the worker is not taken for lost, nothing
/// is killed), says so, restarts the server once it has stored nothing for a while, and the
/// job goes on once there is space again.
#[test]
fn a_nats_server_whose_disk_is_full_is_told_apart_from_a_silent_worker() {
    if !criu_ready("a_nats_server_whose_disk_is_full_is_told_apart_from_a_silent_worker") {
        return;
    }
    let sb = Sandbox::new();
    let small = sb.path().join("small");
    let _mounted = Tmpfs::mount(&small, "96m");
    // The task counts into a file outside the full disk: what must not break is the task.
    let counter = sb.path().join("outside-counter.txt");
    let p = sb.path().join("full.rhai");
    std::fs::write(
        &p,
        format!(
            r#"
fn instance_specs() {{ #{{ cpu_cores: 1, memory_gb: 1 }} }}
fn setup(w) {{ }}
fn work(w) {{
    w.spawn("i=0; while [ $i -lt 500 ]; do i=$((i+1)); echo $i >> {}; sleep 0.1; done")
}}
fn restored_task(w, task) {{ }}
"#,
            counter.display()
        ),
    )
    .unwrap();
    let mut d = BackgroundDriver::start(&small, None, &["--checkpoint-every", "3"], &p);
    d.wait_record(Duration::from_secs(60), "a checkpoint", |r| {
        checkpoints(r) >= 1
    });
    // Fill the disk.
    let filler = small.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 1 << 20];
        while f.write_all(&block).is_ok() {}
    }
    // Past the 20 s a silent worker is given.
    std::thread::sleep(Duration::from_secs(28));
    let err = d.stderr();
    assert!(err.contains("does not store"), "{err}");
    assert!(!err.contains("lost"), "a worker was taken for lost: {err}");
    std::fs::remove_file(&filler).unwrap();
    let code = d.wait(Duration::from_secs(180));
    let err = d.stderr();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("stores again"), "{err}");
    let r = d.record().unwrap();
    let w1_log = std::fs::read_to_string(
        small
            .join(r["job"].as_str().unwrap())
            .join("logs")
            .join("w1.log"),
    )
    .unwrap_or_default();
    assert_eq!(r["recoveries"], 0, "{err}\nw1: {w1_log}");
    let nums = numbers(&counter);
    assert_eq!(nums.len(), 500);
    assert_unbroken(&nums, "the task's count through the full disk");
}

/// A server in the task (a notebook, a dashboard) is reached from this machine through
/// `run --expose` and `cedana-driver port`, on the worker it runs on, and again after it
/// moved to another worker; `status` shows the worker's address.
#[test]
fn a_task_s_port_is_reached_wherever_the_task_runs() {
    if !criu_ready("a_task_s_port_is_reached_wherever_the_task_runs") {
        return;
    }
    let sb = Sandbox::new();
    let task_port = free_port();
    let exposed = free_port();
    let p = sb.path().join("serve.rhai");
    std::fs::write(
        &p,
        format!(
            r#"
fn instance_specs() {{ #{{ cpu_cores: 1, memory_gb: 1 }} }}
fn setup(w) {{ }}
fn work(w) {{
    w.spawn("echo served-by-the-task > hello.txt; exec {} -m http.server {task_port} --bind 0.0.0.0")
}}
fn restored_task(w, task) {{ }}
"#,
            python().display()
        ),
    )
    .unwrap();
    let expose = format!("{exposed}:{task_port}");
    let d = BackgroundDriver::start(
        sb.path(),
        None,
        &["--checkpoint-every", "0", "--expose", &expose],
        &p,
    );
    let r = d.wait_record(Duration::from_secs(60), "the task", |r| {
        r["task"].is_object()
    });
    let job = r["job"].as_str().unwrap().to_string();
    let get = |port: u16| {
        let mut body = None;
        wait_until(
            Duration::from_secs(20),
            "the task's server to answer",
            || {
                body = http_get(port, "/hello.txt");
                body.is_some()
            },
        );
        body.unwrap()
    };
    assert_eq!(get(exposed), "served-by-the-task\n");
    let out = driver(&sb, &["status"]);
    let addr = r["workers"][0]["address"]
        .as_str()
        .expect("an address")
        .to_string();
    assert!(text(&out.stdout).contains(&addr), "{}", text(&out.stdout));
    // `port` too, on a port of its own.
    let mine = free_port();
    let mut port_cmd = driver_cmd(sb.path())
        .args([
            "port",
            "--local",
            &mine.to_string(),
            &job,
            &task_port.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert_eq!(get(mine), "served-by-the-task\n");
    // The task moves; both ports follow it.
    let out = driver(&sb, &["migrate", &job]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let r = d.record().unwrap();
    assert_eq!(r["task"]["worker"], "w2", "{r}");
    assert_ne!(r["workers"][1]["address"], addr, "{r}");
    assert_eq!(get(exposed), "served-by-the-task\n");
    assert_eq!(get(mine), "served-by-the-task\n");
    let _ = port_cmd.kill();
    let _ = port_cmd.wait();
}
