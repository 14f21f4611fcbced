//! The managed flow end to end, with real CRIU and a real nats-server: a worker killed with
//! SIGKILL mid-job, a NATS server restarted mid-job, the original's YAML job spec, and the
//! commands that act on a running job (`status`, `logs`, `checkpoint`, `migrate`, `down`).

use std::path::Path;
use std::time::Duration;

use cedana_tests::*;

fn example(name: &str) -> std::path::PathBuf {
    repo_root().join("scripts/examples").join(name)
}

fn kill9(pid: i64) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

fn checkpoints(r: &serde_json::Value) -> usize {
    r["checkpoints"].as_array().map(Vec::len).unwrap_or(0)
}

/// The count the task printed at its end, which must be 1..=n with no gap and no repeat.
fn assert_counted_to(stdout: &str, n: usize) {
    let nums = numbers_after(stdout, "--- counter.txt");
    assert_eq!(nums.len(), n, "stdout:\n{stdout}");
    assert_unbroken(&nums, "the task's count");
}

#[test]
fn worker_killed_mid_job_resumes_from_the_newest_checkpoint() {
    if !criu_ready("worker_killed_mid_job_resumes_from_the_newest_checkpoint") {
        return;
    }
    let sb = Sandbox::new();
    let mut d = BackgroundDriver::start(
        sb.path(),
        None,
        &["--checkpoint-every", "2"],
        &example("managed.rhai"),
    );
    let r = d.wait_record(Duration::from_secs(60), "two checkpoints", |r| {
        checkpoints(r) >= 2
    });
    // The machine is lost: its agent and its task die at once.
    let daemon = r["workers"][0]["pid"].as_i64().expect("worker pid");
    let task = r["task"]["pid"].as_i64().expect("task pid");
    kill9(task);
    kill9(daemon);
    let code = d.wait(Duration::from_secs(120));
    assert_eq!(code, Some(0), "stderr: {}", d.stderr());
    assert_counted_to(&d.stdout(), 60);
    let r = d.record().expect("record");
    assert_eq!(r["recoveries"], 1, "{r}");
    assert_eq!(r["workers"][0]["state"], "lost", "{r}");
    assert_eq!(r["task"]["worker"], "w2", "{r}");
    assert_eq!(r["state"], "succeeded", "{r}");
    // Resumed from a checkpoint, not restarted: the restored folder already had numbers.
    let err = d.stderr();
    let restored_lines: u64 = err
        .split("counter.txt has ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no restored_task line in: {err}"));
    assert!(
        restored_lines >= 2,
        "restored with {restored_lines} lines: {err}"
    );
    assert!(err.contains("worker w1 lost"), "{err}");
    // `logs` has the task's output, the count at its end included.
    let out = driver(&sb, &["logs", r["job"].as_str().unwrap()]);
    assert_counted_to(&String::from_utf8_lossy(&out.stdout), 60);
}

fn config_for(sb: &Sandbox, nats: &NatsServer) -> std::path::PathBuf {
    let cfg = sb.path().join("cedana_config.json");
    std::fs::write(
        &cfg,
        serde_json::json!({
            "connection": {"nats_url": "127.0.0.1", "nats_port": nats.port, "auth_token": nats.token},
            "checkpoint": {"heartbeat_enabled": true, "heartbeat_interval_seconds": 2},
        })
        .to_string(),
    )
    .unwrap();
    cfg
}

#[test]
fn nats_server_restarted_mid_job_loses_nothing() {
    if !criu_ready("nats_server_restarted_mid_job_loses_nothing") {
        return;
    }
    let sb = Sandbox::new();
    let nats = NatsServer::start();
    let cfg = config_for(&sb, &nats);
    let mut d = BackgroundDriver::start(sb.path(), Some(&cfg), &[], &example("managed.rhai"));
    let r = d.wait_record(Duration::from_secs(60), "a checkpoint", |r| {
        checkpoints(r) >= 1
    });
    let before = checkpoints(&r);
    let (token, port, store) = nats.stop();
    std::thread::sleep(Duration::from_secs(3));
    let _nats = NatsServer::start_with(token, port, store);
    let code = d.wait(Duration::from_secs(120));
    assert_eq!(code, Some(0), "stderr: {}", d.stderr());
    assert_counted_to(&d.stdout(), 60);
    let r = d.record().expect("record");
    assert_eq!(r["recoveries"], 0, "the worker was never lost: {r}");
    assert!(
        checkpoints(&r) > before,
        "checkpoints went on after the restart: {r}"
    );
}

/// `connection.nats_url` as a cluster URL list: three real nodes (JetStream, token auth), the
/// job's streams and buckets kept on three of them; one node is killed mid-job and the job goes
/// on to the end, checkpoints included, without losing its worker.
#[test]
fn a_cluster_loses_a_node_mid_job_and_the_job_goes_on() {
    if !criu_ready("a_cluster_loses_a_node_mid_job_and_the_job_goes_on") {
        return;
    }
    let sb = Sandbox::new();
    let mut cluster = NatsCluster::start(3);
    let cfg = sb.path().join("cedana_config.json");
    std::fs::write(
        &cfg,
        serde_json::json!({
            "connection": {"nats_url": cluster.urls(), "auth_token": cluster.token},
            "checkpoint": {"heartbeat_enabled": true, "heartbeat_interval_seconds": 2},
        })
        .to_string(),
    )
    .unwrap();
    // The managed example counting to 120 (30 s), so that checkpoints have time to go on
    // after the cluster elected new leaders.
    let script = sb.path().join("managed120.rhai");
    let text = std::fs::read_to_string(example("managed.rhai")).unwrap();
    assert!(text.contains("$i -lt 60"));
    std::fs::write(&script, text.replace("$i -lt 60", "$i -lt 120")).unwrap();
    let mut d = BackgroundDriver::start(sb.path(), Some(&cfg), &[], &script);
    let r = d.wait_record(Duration::from_secs(90), "a checkpoint", |r| {
        checkpoints(r) >= 1
    });
    let before = checkpoints(&r);
    // The job's streams are kept on all three nodes.
    for (stream, replicas) in cluster.stream_replicas() {
        assert_eq!(replicas, 3, "stream {stream}");
    }
    cluster.kill(0);
    let code = d.wait(Duration::from_secs(180));
    assert_eq!(code, Some(0), "stderr: {}", d.stderr());
    assert_counted_to(&d.stdout(), 120);
    let r = d.record().expect("record");
    let w1_log = std::fs::read_to_string(
        sb.path()
            .join(r["job"].as_str().unwrap_or_default())
            .join("logs/w1.log"),
    )
    .unwrap_or_default();
    assert_eq!(
        r["recoveries"],
        0,
        "the worker was never lost: {r}\nw1: {w1_log}\ndriver: {}",
        d.stderr()
    );
    assert!(
        checkpoints(&r) > before,
        "checkpoints went on after the node was lost: {r}\ndriver: {}",
        d.stderr()
    );
}

#[test]
fn configured_server_with_a_wrong_token_is_refused() {
    let sb = Sandbox::new();
    let nats = NatsServer::start();
    let cfg = sb.path().join("bad.json");
    std::fs::write(
        &cfg,
        serde_json::json!({"connection": {"nats_url": nats.url(), "auth_token": "wrong"}})
            .to_string(),
    )
    .unwrap();
    let out = driver_cmd(sb.path())
        .env("CEDANA_CONFIG", &cfg)
        .arg("run")
        .arg(example("managed.rhai"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot connect to NATS") && err.to_lowercase().contains("authorization"),
        "{err}"
    );
    assert!(
        !err.contains("wrong"),
        "the token reached the output: {err}"
    );
}

#[test]
fn the_originals_yaml_job_runs() {
    if !criu_ready("the_originals_yaml_job_runs") {
        return;
    }
    let sb = Sandbox::new();
    let out = driver_cmd(sb.path())
        .args(["run", "--checkpoint-every", "1"])
        .arg(example("seed-job.yml"))
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("foo"), "setup ran: {stdout}");
    assert!(
        stdout.contains("input has 3 lines"),
        "work_dir copied: {stdout}"
    );
    assert_counted_to(&stdout, 30);
}

#[test]
fn yaml_mistakes_name_file_line_and_column() {
    let sb = Sandbox::new();
    let p = sb.path().join("bad.yml");
    std::fs::write(&p, "task:\n  run: [\"echo hi\"\n  oops: 1\n").unwrap();
    let out = driver_cmd(sb.path()).arg("run").arg(&p).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("{}:3:", p.display())), "{err}");
    // A wrong type, too.
    std::fs::write(
        &p,
        "instance_specs:\n  cpu_cores: many\ntask:\n  run: [\"true\"]\n",
    )
    .unwrap();
    let out = driver_cmd(sb.path()).arg("run").arg(&p).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("{}:2:", p.display())) && err.contains("cpu_cores"),
        "{err}"
    );
}

fn driver(sb: &Sandbox, args: &[&str]) -> std::process::Output {
    driver_cmd(sb.path()).args(args).output().unwrap()
}

#[test]
fn a_running_job_is_checkpointed_migrated_and_taken_down_from_the_command_line() {
    if !criu_ready("a_running_job_is_checkpointed_migrated_and_taken_down") {
        return;
    }
    let sb = Sandbox::new();
    let mut d = BackgroundDriver::start(
        sb.path(),
        None,
        &["--checkpoint-every", "0"],
        &example("managed.rhai"),
    );
    let r = d.wait_record(Duration::from_secs(60), "the task", |r| {
        r["state"] == "running" && r["task"].is_object()
    });
    let job = r["job"].as_str().unwrap().to_string();
    let prefix = &job[..job.len() - 2];
    // A local worker is a separate host: its own mount and network namespaces.
    let daemon = r["workers"][0]["pid"].as_i64().unwrap();
    for ns in ["net", "mnt"] {
        let theirs = std::fs::read_link(format!("/proc/{daemon}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(
            theirs, ours,
            "worker w1 shares this machine's {ns} namespace"
        );
    }
    let netns = r["workers"][0]["netns"]
        .as_str()
        .expect("netns recorded")
        .to_string();
    assert!(Path::new("/run/netns").join(&netns).exists());

    let out = driver(&sb, &["checkpoint", prefix]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("checkpoint "));
    assert_eq!(checkpoints(&d.record().unwrap()), 1);

    let out = driver(&sb, &["migrate", &job]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = d.record().unwrap();
    assert_eq!(r["task"]["worker"], "w2", "{r}");
    assert_eq!(r["migrations"], 1, "{r}");
    let w1 = r["workers"][0]["pid"].as_i64().unwrap();
    assert!(!is_alive(w1 as i32), "the old worker was terminated");

    let out = driver(&sb, &["status", "--json"]);
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(all[0]["job"], job.as_str());
    assert_eq!(all[0]["shown_state"], "running");
    let out = driver(&sb, &["status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&job));

    // The count goes on in the new worker's folder, unbroken.
    let counter = Path::new(r["workers"][1]["dir"].as_str().unwrap()).join("counter.txt");
    let n = numbers(&counter).len();
    wait_for_numbers(&counter, n + 4);
    assert_unbroken(&numbers(&counter), "count across the migration");

    let out = driver(&sb, &["down", &job]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.wait(Duration::from_secs(30)), Some(130), "{}", d.stderr());
    let r = d.record().unwrap();
    assert_eq!(r["state"], "down", "{r}");
    let w2 = r["workers"][1]["pid"].as_i64().unwrap();
    let task = r["task"]["pid"].as_i64().unwrap();
    wait_until(Duration::from_secs(5), "worker and task gone", || {
        !is_alive(w2 as i32) && !is_alive(task as i32)
    });
    assert!(
        !Path::new("/run/netns").join(&netns).exists(),
        "the worker's network namespace was removed"
    );

    let out = driver(&sb, &["logs", &job]);
    assert!(out.status.success());
    // `down` on a finished job, and an unknown job: exit 4.
    assert_eq!(driver(&sb, &["down", &job]).status.code(), Some(4));
    assert_eq!(driver(&sb, &["status", "nosuchjob"]).status.code(), Some(4));
}

#[test]
fn checkpoints_go_to_shared_storage_when_configured() {
    if !criu_ready("checkpoints_go_to_shared_storage_when_configured") {
        return;
    }
    let sb = Sandbox::new();
    let shared = sb.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let cfg = sb.path().join("cedana_config.json");
    std::fs::write(
        &cfg,
        serde_json::json!({"shared_storage": {"mount_point": shared, "dump_storage_dir": shared}})
            .to_string(),
    )
    .unwrap();
    let mut d = BackgroundDriver::start(
        sb.path(),
        Some(&cfg),
        &["--checkpoint-every", "1"],
        &example("managed.rhai"),
    );
    let r = d.wait_record(Duration::from_secs(60), "three checkpoints", |r| {
        checkpoints(r) >= 3
    });
    let job = r["job"].as_str().unwrap().to_string();
    // The newest are in the shared folder, a folder store (the two newest are kept), not the
    // object store.
    let manifests = || -> Vec<String> {
        std::fs::read_dir(shared.join(&job).join("checkpoints"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".json"))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(
        !manifests().is_empty() && manifests().len() <= 3,
        "{:?}",
        manifests()
    );
    assert!(shared.join(&job).join("chunks").read_dir().unwrap().count() > 0);
    // Recovery restores from there.
    let daemon = r["workers"][0]["pid"].as_i64().unwrap();
    kill9(r["task"]["pid"].as_i64().unwrap());
    kill9(daemon);
    assert_eq!(d.wait(Duration::from_secs(120)), Some(0), "{}", d.stderr());
    assert_counted_to(&d.stdout(), 60);
    assert_eq!(d.record().unwrap()["recoveries"], 1);
}

#[test]
fn a_configured_server_list_is_used_past_a_dead_server() {
    if !criu_ready("a_configured_server_list_is_used_past_a_dead_server") {
        return;
    }
    let sb = Sandbox::new();
    let nats = NatsServer::start();
    let cfg = sb.path().join("cedana_config.json");
    // The first server of the list is down (the original's nats_port fills in missing ports).
    let dead = free_port();
    std::fs::write(
        &cfg,
        serde_json::json!({"connection": {
            "nats_url": format!("nats://127.0.0.1:{dead}, 127.0.0.1"),
            "nats_port": nats.port,
            "auth_token": nats.token}})
        .to_string(),
    )
    .unwrap();
    let out = driver_cmd(sb.path())
        .env("CEDANA_CONFIG", &cfg)
        .arg("run")
        .arg(repo_root().join("scripts/examples/counter.rhai"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nums: Vec<u64> = stdout
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert_eq!(nums.len(), 40, "{stdout}");
    assert_unbroken(&nums, "counter through a server list");
}

/// What a worker's agent publishes when EC2 says the spot instance goes (see tests/spot.rs for
/// the agent's side, with a fake instance metadata service).
#[test]
fn a_spot_notice_moves_the_task_before_the_worker_goes() {
    if !criu_ready("a_spot_notice_moves_the_task_before_the_worker_goes") {
        return;
    }
    let sb = Sandbox::new();
    let nats = NatsServer::start();
    let cfg = config_for(&sb, &nats);
    let mut d = BackgroundDriver::start(
        sb.path(),
        Some(&cfg),
        &["--checkpoint-every", "0"],
        &example("managed.rhai"),
    );
    let r = d.wait_record(Duration::from_secs(60), "the task running", |r| {
        r["state"] == "running" && r["task"].is_object()
    });
    let job = r["job"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_secs(2));
    publish_spot_notice(&nats, &job, "w1");
    let r = d.wait_record(Duration::from_secs(60), "the task on w2", |r| {
        r["task"]["worker"] == "w2" && r["migrations"] == 1
    });
    assert_eq!(r["spot_notices"], 1, "{r}");
    assert_eq!(r["workers"][0]["state"], "terminated", "{r}");
    assert_eq!(d.wait(Duration::from_secs(120)), Some(0), "{}", d.stderr());
    assert_counted_to(&d.stdout(), 60);
    assert_eq!(d.record().unwrap()["recoveries"], 0);
    assert!(d
        .stderr()
        .contains("spot interruption notice for worker w1"));
}

/// `checkpoint_store` in the config: the job's checkpoints go into a folder store as chunks
/// (a later one sends only what changed), the store keeps the newest two and the chunks they
/// name, and a lost worker's task comes back from there.
#[test]
fn checkpoints_go_to_a_checkpoint_store_as_chunks_and_recovery_reads_them_back() {
    if !criu_ready("checkpoints_go_to_a_checkpoint_store_as_chunks_and_recovery_reads_them_back") {
        return;
    }
    let sb = Sandbox::new();
    let store = sb.path().join("store");
    let cfg = sb.path().join("cedana_config.json");
    std::fs::write(
        &cfg,
        serde_json::json!({"checkpoint_store": {"url": format!("file://{}", store.display())}})
            .to_string(),
    )
    .unwrap();
    let mut d = BackgroundDriver::start(
        sb.path(),
        Some(&cfg),
        &["--checkpoint-every", "1"],
        &example("managed.rhai"),
    );
    let r = d.wait_record(Duration::from_secs(60), "four checkpoints", |r| {
        checkpoints(r) >= 4
    });
    let job = r["job"].as_str().unwrap().to_string();
    let manifests = || -> Vec<String> {
        std::fs::read_dir(store.join(&job).join("checkpoints"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let names = manifests();
    assert!(
        !names.is_empty() && names.len() <= 3,
        "the newest two are kept (one more may be on its way): {names:?}"
    );
    assert!(store.join(&job).join("chunks").read_dir().unwrap().count() > 0);
    // Chunks are shared: the kept checkpoints name chunks in common (the pages that did not
    // change), each stored once.
    let ids = |name: &str| -> std::collections::BTreeSet<String> {
        let m: serde_json::Value = serde_json::from_slice(
            &std::fs::read(store.join(&job).join("checkpoints").join(name)).unwrap(),
        )
        .unwrap();
        assert_eq!(m["format_version"], 2, "{m}");
        m["entries"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|e| e["chunks"].as_array().unwrap().clone())
            .map(|c| c["id"].as_str().unwrap().to_string())
            .collect()
    };
    let names = manifests();
    let (a, b) = (ids(&names[0]), ids(&names[names.len() - 1]));
    assert!(
        names.len() >= 2 && a.intersection(&b).count() > 0,
        "no chunk shared between {names:?}"
    );
    // Recovery restores from the store.
    kill9(r["task"]["pid"].as_i64().unwrap());
    kill9(r["workers"][0]["pid"].as_i64().unwrap());
    assert_eq!(d.wait(Duration::from_secs(120)), Some(0), "{}", d.stderr());
    assert_counted_to(&d.stdout(), 60);
    // The task ran again before its memory was back (the worker serves it from the store).
    assert!(
        d.stderr()
            .contains("before its memory is back (lazy restore)")
            || d.stdout()
                .contains("before its memory is back (lazy restore)"),
        "{}",
        d.stderr()
    );
    let r = d.record().unwrap();
    assert_eq!(r["recoveries"], 1, "{r}");
    let restored = r["checkpoints"].as_array().unwrap();
    assert!(
        restored
            .iter()
            .all(|c| !c["object"].as_str().unwrap().ends_with(".zip")),
        "{r}"
    );
}

/// `run --store s3://…` against moto's S3 server on this machine's loopback (forwarded into
/// each local worker's network namespace): periodic checkpoints go there, a migration reads
/// one back on another worker, the store is pruned to the newest two, and a lost worker's task
/// comes back from there. No task sees the store's credentials.
#[test]
fn a_job_checkpoints_into_s3_migrates_and_recovers_from_it() {
    if !criu_ready("a_job_checkpoints_into_s3_migrates_and_recovers_from_it") {
        return;
    }
    let sb = Sandbox::new();
    let moto = cedana_tests::moto::MotoServer::start();
    moto.create_bucket("cedana-jobs");
    let env: Vec<(String, String)> = moto.env();
    let env_os: Vec<(&str, &std::ffi::OsStr)> = env
        .iter()
        .map(|(k, v)| (k.as_str(), std::ffi::OsStr::new(v.as_str())))
        .collect();
    let mut d = BackgroundDriver::start_env(
        sb.path(),
        None,
        &[
            "--checkpoint-every",
            "1",
            "--store",
            "s3://cedana-jobs/ckpt",
        ],
        &example("managed.rhai"),
        &env_os,
    );
    let r = d.wait_record(Duration::from_secs(60), "three checkpoints", |r| {
        checkpoints(r) >= 3
    });
    let job = r["job"].as_str().unwrap().to_string();
    // The task's environment holds no credential of the store.
    let task = r["task"]["pid"].as_i64().unwrap();
    let environ = std::fs::read(format!("/proc/{task}/environ")).unwrap_or_default();
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        !environ.contains(cedana_tests::moto::SECRET_ACCESS_KEY) && !environ.contains("AWS_"),
        "the task's environment: {environ}"
    );
    // What the store holds, through the agent's own listing.
    let list = || -> Vec<String> {
        let mut c = std::process::Command::new(agent_bin());
        moto.apply_env(&mut c);
        let out = c
            .args([
                "checkpoints",
                "--store",
                &format!("s3://cedana-jobs/ckpt/{job}"),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    };
    let listed = list();
    assert!(
        !listed.is_empty() && listed.len() <= 3,
        "the newest two are kept (one more may be on its way): {listed:?}"
    );
    // A move to another worker reads the checkpoint back from S3.
    let out = driver(&sb, &["migrate", &job]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = d.wait_record(
        Duration::from_secs(60),
        "the move and a checkpoint after it",
        |r| {
            r["migrations"] == 1
                && r["checkpoints"]
                    .as_array()
                    .is_some_and(|c| c.last().is_some_and(|c| c["worker"] == "w2"))
        },
    );
    assert_eq!(r["task"]["worker"], "w2", "{r}");
    // The new worker is lost: recovery from S3.
    kill9(r["task"]["pid"].as_i64().unwrap());
    kill9(r["workers"][1]["pid"].as_i64().unwrap());
    assert_eq!(d.wait(Duration::from_secs(120)), Some(0), "{}", d.stderr());
    assert_counted_to(&d.stdout(), 60);
    // The migration's and the recovery's restores ran the task before its memory was back.
    let said = format!("{}{}", d.stdout(), d.stderr());
    assert!(
        said.matches("before its memory is back (lazy restore)")
            .count()
            >= 2,
        "{said}"
    );
    let r = d.record().unwrap();
    assert_eq!(r["recoveries"], 1, "{r}");
    assert_eq!(r["migrations"], 1, "{r}");
    let listed = list();
    assert!(
        !listed.is_empty() && listed.len() <= 3,
        "pruned to the newest: {listed:?}"
    );
}

/// A lazy restore that fails (the newest checkpoint's own chunks damaged in the store): the
/// worker ends the restored task and says why, and the driver recovers from the checkpoint
/// before it rather than calling the task failed; the count goes on unbroken.
#[test]
fn a_failed_lazy_restore_recovers_from_the_checkpoint_before() {
    if !criu_ready("a_failed_lazy_restore_recovers_from_the_checkpoint_before") {
        return;
    }
    let sb = Sandbox::new();
    let store = sb.path().join("store");
    let cfg = sb.path().join("cedana_config.json");
    std::fs::write(
        &cfg,
        serde_json::json!({"checkpoint_store": {"url": format!("file://{}", store.display())}})
            .to_string(),
    )
    .unwrap();
    let mut d = BackgroundDriver::start(
        sb.path(),
        Some(&cfg),
        &["--checkpoint-every", "1"],
        &example("managed.rhai"),
    );
    d.wait_record(Duration::from_secs(60), "three checkpoints", |r| {
        checkpoints(r) >= 3
    });
    // The worker's agent is stopped first, so that no checkpoint is taken while the newest is
    // damaged; the newest is the one the job's record counts on.
    let r = d.record().unwrap();
    let daemon = r["workers"][0]["pid"].as_i64().unwrap();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon as i32),
        nix::sys::signal::Signal::SIGSTOP,
    );
    std::thread::sleep(Duration::from_millis(300));
    let r = d.record().unwrap();
    let job = r["job"].as_str().unwrap().to_string();
    let dir = store.join(&job);
    let manifest = |name: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("checkpoints").join(name)).unwrap()).unwrap()
    };
    let chunks = |m: &serde_json::Value, pages_only: bool| -> std::collections::BTreeSet<String> {
        m["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| !pages_only || e["name"].as_str().unwrap().starts_with("images/pages-"))
            .flat_map(|e| e["chunks"].as_array().unwrap().clone())
            .map(|c| c["id"].as_str().unwrap().to_string())
            .collect()
    };
    let damaged = r["checkpoints"].as_array().unwrap().last().unwrap()["object"]
        .as_str()
        .unwrap()
        .to_string();
    let names: Vec<String> = std::fs::read_dir(dir.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.len() >= 2 && names.contains(&format!("{damaged}.json")),
        "{damaged} among {names:?}"
    );
    let newest = manifest(&format!("{damaged}.json"));
    let mut older = std::collections::BTreeSet::new();
    for n in names.iter().filter(|n| **n != format!("{damaged}.json")) {
        older.extend(chunks(&manifest(n), false));
    }
    // The newest checkpoint's own memory: what no other checkpoint names.
    let own: Vec<String> = chunks(&newest, true).difference(&older).cloned().collect();
    assert!(
        !own.is_empty(),
        "the newest checkpoint has memory of its own"
    );
    for id in &own {
        let path = dir.join("chunks").join(id);
        let mut b = std::fs::read(&path).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0x5a;
        std::fs::write(&path, b).unwrap();
    }
    kill9(r["task"]["pid"].as_i64().unwrap());
    kill9(daemon);
    assert_eq!(d.wait(Duration::from_secs(180)), Some(0), "{}", d.stderr());
    assert_counted_to(&d.stdout(), 60);
    let said = format!("{}{}", d.stdout(), d.stderr());
    assert!(
        said.contains("cannot be restored (") && said.contains("recovering from"),
        "the failed restore is said, and the recovery: {said}"
    );
    let r = d.record().unwrap();
    assert!(r["recoveries"].as_u64().unwrap() >= 1, "{r}");
    assert!(
        r["checkpoints"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["object"].as_str() != Some(damaged.as_str())),
        "the damaged checkpoint {damaged} is no longer one the job counts on: {r}"
    );
}

/// A scripted job (no managed loop): a task restored lazily from a checkpoint whose memory is
/// damaged in the store is ended by its worker, and the script's `wait` raises an error that
/// says so (the script catches it and could restore an earlier checkpoint) instead of
/// handing back the exit status of a task that never ended by itself.
#[test]
fn a_script_waiting_on_a_task_whose_lazy_restore_failed_is_told() {
    if !criu_ready("a_script_waiting_on_a_task_whose_lazy_restore_failed_is_told") {
        return;
    }
    let sb = Sandbox::new();
    let store = sb.path().join("store");
    let cfg = sb.path().join("cedana_config.json");
    std::fs::write(
        &cfg,
        serde_json::json!({"checkpoint_store": {"url": format!("file://{}", store.display())}})
            .to_string(),
    )
    .unwrap();
    let py = sb.path().join("mem.py");
    std::fs::write(
        &py,
        "import time\nb = bytearray(os_size := 48 << 20)\nfor i in range(0, os_size, 4096):\n    b[i] = i % 251\ni = 0\nwhile True:\n    i += 1\n    print(i, flush=True)\n    time.sleep(0.05)\n",
    )
    .unwrap();
    let flag = sb.path().join("damaged");
    let script = sb.path().join("job.rhai");
    std::fs::write(
        &script,
        format!(
            r#"let w1 = launch();
let t = w1.spawn("exec python3 {py}");
sleep(2.0);
let c = t.checkpoint();
print(`CKPT ${{c.object}}`);
w1.sh("i=0; while [ ! -e {flag} ] && [ $i -lt 600 ]; do i=$((i+1)); sleep 0.1; done");
t.stop();
let w2 = launch();
let t2 = restore(c, w2);
try {{
    let code = t2.wait();
    print(`NOT TOLD: ${{code}}`);
}} catch (e) {{
    print(`TOLD: ${{e}}`);
}}
0
"#,
            py = py.display(),
            flag = flag.display()
        ),
    )
    .unwrap();
    let mut d = BackgroundDriver::start(sb.path(), Some(&cfg), &[], &script);
    let t0 = std::time::Instant::now();
    let object = loop {
        if let Some(l) = d.stdout().lines().find(|l| l.starts_with("CKPT ")) {
            break l["CKPT ".len()..].trim().to_string();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no checkpoint: {}",
            d.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let job = d.record().unwrap()["job"].as_str().unwrap().to_string();
    let dir = store.join(&job);
    // A chunk in the middle of the largest page image: the task's own memory, fetched after
    // the task runs again.
    let victim = damage_a_page_chunk(&dir, &object, |n| n / 2);
    let victim = victim.as_str();
    std::fs::write(&flag, "").unwrap();
    assert_eq!(d.wait(Duration::from_secs(120)), Some(0), "{}", d.stderr());
    let out = d.stdout();
    assert!(
        out.contains("TOLD: ") && out.contains("lazy restore failed") && out.contains(victim),
        "the script is told why, naming the chunk: {out}\n{}",
        d.stderr()
    );
    assert!(!out.contains("NOT TOLD"), "{out}");
}

/// A managed job whose task holds `mb` MiB of random memory and counts to 80 into
/// counter.txt (four a second), printing the file at the end as managed.rhai does.
fn memory_counter_job(sb: &Sandbox, mb: u32) -> std::path::PathBuf {
    let py = sb.path().join("memcount.py");
    std::fs::write(
        &py,
        format!(
            "import os, time\nb = bytearray(os.urandom({mb} << 20))\n\
             for i in range(1, 81):\n    with open('counter.txt', 'a') as f:\n        f.write('%d\\n' % i)\n    time.sleep(0.25)\n\
             print('--- counter.txt', flush=True)\nprint(open('counter.txt').read(), end='', flush=True)\n"
        ),
    )
    .unwrap();
    let script = sb.path().join("memjob.rhai");
    std::fs::write(
        &script,
        format!(
            "fn work(w) {{ w.spawn(\"exec python3 {}\") }}\n",
            py.display()
        ),
    )
    .unwrap();
    script
}

fn store_config(sb: &Sandbox) -> (std::path::PathBuf, std::path::PathBuf) {
    let store = sb.path().join("store");
    let cfg = sb.path().join("cedana_config.json");
    std::fs::write(
        &cfg,
        serde_json::json!({"checkpoint_store": {"url": format!("file://{}", store.display())}})
            .to_string(),
    )
    .unwrap();
    (cfg, store)
}

/// A move through a checkpoint store is post-copy: the new worker runs the task as soon as
/// the checkpoint's manifest is published, its memory following from the store; the old
/// worker stays until the checkpoint is stored whole, which the job then counts on.
#[test]
fn a_move_through_a_store_runs_the_task_before_its_checkpoint_is_stored() {
    if !criu_ready("a_move_through_a_store_runs_the_task_before_its_checkpoint_is_stored") {
        return;
    }
    let sb = Sandbox::new();
    let (cfg, _store) = store_config(&sb);
    let script = memory_counter_job(&sb, 200);
    let mut d =
        BackgroundDriver::start(sb.path(), Some(&cfg), &["--checkpoint-every", "0"], &script);
    let r = d.wait_record(Duration::from_secs(60), "the task running", |r| {
        r["state"] == "running" && r["task"].is_object()
    });
    let job = r["job"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_secs(3));
    let out = driver(&sb, &["migrate", &job]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.wait(Duration::from_secs(120)), Some(0), "{}", d.stderr());
    let nums = numbers_after(&d.stdout(), "--- counter.txt");
    assert_eq!(nums.len(), 80, "{}", d.stdout());
    assert_unbroken(&nums, "the count across a post-copy move");
    let said = format!("{}{}", d.stdout(), d.stderr());
    assert!(said.contains("its memory follows (post-copy)"), "{said}");
    assert!(said.contains("after the task ran again"), "{said}");
    assert!(
        said.contains("before its memory is back (lazy restore)"),
        "{said}"
    );
    let r = d.record().unwrap();
    assert_eq!(r["migrations"], 1, "{r}");
    assert_eq!(r["recoveries"], 0, "{r}");
    let moved = r["checkpoints"].as_array().unwrap();
    assert!(
        moved
            .iter()
            .any(|c| c["worker"] == "w1" && c["bytes"].as_u64() > Some(0)),
        "the move's checkpoint is recorded once stored: {r}"
    );
}

/// The old worker stops (its agent frozen) after publishing the move's manifest and before
/// the chunks are stored: the new worker's task never gets that memory, is ended by its
/// worker rather than run on missing pages, and the job recovers from the checkpoint before
/// the move; the count goes on unbroken.
#[test]
fn a_move_whose_old_worker_dies_before_the_checkpoint_is_stored_recovers() {
    if !criu_ready("a_move_whose_old_worker_dies_before_the_checkpoint_is_stored_recovers") {
        return;
    }
    let sb = Sandbox::new();
    let (cfg, _store) = store_config(&sb);
    let script = memory_counter_job(&sb, 400);
    let wait = std::ffi::OsStr::new("4");
    let mut d = BackgroundDriver::start_env(
        sb.path(),
        Some(&cfg),
        &["--checkpoint-every", "3"],
        &script,
        &[("CEDANA_POST_COPY_WAIT_SECS", wait)],
    );
    let r = d.wait_record(Duration::from_secs(90), "a checkpoint", |r| {
        checkpoints(r) >= 1
    });
    let job = r["job"].as_str().unwrap().to_string();
    let daemon = r["workers"][0]["pid"].as_i64().unwrap();
    let migrate = driver_cmd(sb.path())
        .args(["migrate", &job])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !d.stderr().contains("its memory follows (post-copy)")
        && !d.stdout().contains("its memory follows (post-copy)")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no post-copy: {}",
            d.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon as i32),
        nix::sys::signal::Signal::SIGSTOP,
    );
    assert_eq!(d.wait(Duration::from_secs(240)), Some(0), "{}", d.stderr());
    kill9(daemon);
    let mut migrate = migrate;
    let _ = migrate.kill();
    let _ = migrate.wait();
    let nums = numbers_after(&d.stdout(), "--- counter.txt");
    assert_eq!(nums.len(), 80, "{}", d.stdout());
    assert_unbroken(&nums, "the count across a failed post-copy move");
    let said = format!("{}{}", d.stdout(), d.stderr());
    assert!(
        said.contains("could not be stored") || said.contains("cannot be restored"),
        "{said}"
    );
    let r = d.record().unwrap();
    assert!(r["recoveries"].as_u64().unwrap() >= 1, "{r}");
}
