//! `cedana-driver run` end to end: the embedded NATS server, local workers, the Rhai host API,
//! and the sandbox's errors with file, line and column.

use cedana_tests::*;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn counter_example_migrates_with_an_unbroken_sequence() {
    if !criu_ready("counter_example_migrates_with_an_unbroken_sequence") {
        return;
    }
    let sb = Sandbox::new();
    let out = run_driver(
        &repo_root().join("scripts/examples/counter.rhai"),
        sb.path(),
    );
    assert!(
        out.status.success(),
        "driver failed ({}): {}",
        out.status,
        stderr(&out)
    );
    let nums: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert_eq!(
        nums.len(),
        40,
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_unbroken(&nums, "counter printed by the driver");
    let e = stderr(&out);
    assert!(
        e.contains("moving the task from w1 to w2") && e.contains("ended with 0 on w2"),
        "{e}"
    );
}

fn script(sb: &Sandbox, name: &str, text: &str) -> std::path::PathBuf {
    let p = sb.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn syntax_error_names_file_line_and_column() {
    let sb = Sandbox::new();
    let p = script(&sb, "broken.rhai", "let a = 1;\nlet b = (a + ;\n");
    let out = run_driver(&p, sb.path());
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains(&format!("{}:2:", p.display())) && e.contains("syntax error"),
        "{e}"
    );
}

#[test]
fn endless_loop_is_stopped_by_the_operation_limit() {
    let sb = Sandbox::new();
    let p = script(&sb, "loop.rhai", "let x = 0;\nloop {\n  x += 1;\n}\n");
    let out = run_driver(&p, sb.path());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains("loop.rhai:3:") && e.contains("limit of") && e.contains("operations"),
        "{e}"
    );
}

#[test]
fn eval_and_modules_outside_the_folder_are_refused() {
    let sb = Sandbox::new();
    let p = script(&sb, "eval.rhai", "eval(\"1 + 1\")\n");
    let out = run_driver(&p, sb.path());
    assert!(!out.status.success());
    assert!(stderr(&out).contains("eval.rhai:1:"), "{}", stderr(&out));
    let p = script(&sb, "escape.rhai", "import \"../../etc/passwd\" as x;\n");
    let out = run_driver(&p, sb.path());
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("only from the script's folder"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_spec_no_offer_fits_is_a_clear_error() {
    let sb = Sandbox::new();
    let p = script(
        &sb,
        "gpu.rhai",
        "let w = launch(#{gpu: \"A100\", gpu_count: 2});\n",
    );
    let out = run_driver(&p, sb.path());
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(
        e.contains("gpu.rhai:1:") && e.contains("no offer fits") && e.contains("GPUs, 2 wanted"),
        "{e}"
    );
}

/// Papercuts of the job commands: a prefix that names two jobs says so and lists them;
/// `status --json` is a list whatever its argument; `--config` naming a missing file is an
/// error; a bad value in the config is described without Rust's type names.
#[test]
fn job_prefixes_json_shape_and_config_errors() {
    let sb = Sandbox::new();
    for job in ["train-aaaaaa", "train-bbbbbb"] {
        let dir = sb.path().join(job);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("job.json"),
            serde_json::json!({
                "v": 1, "job": job, "script": "/x/train.rhai", "state": "succeeded",
                "started_at": 1, "updated_at": 1, "driver_pid": 0,
                "nats_url": "nats://127.0.0.1:1", "embedded_nats": true, "managed": true,
                "workers": [], "task": null, "checkpoints": [], "recoveries": 0,
                "migrations": 0, "cost_usd": -0.0, "exit_code": 0, "error": null
            })
            .to_string(),
        )
        .unwrap();
    }
    let run = |args: &[&str]| driver_cmd(sb.path()).args(args).output().unwrap();
    let out = run(&["status", "train-"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains("more than one job") && e.contains("train-aaaaaa") && e.contains("train-bbbbbb"),
        "{e}"
    );
    let out = run(&["status", "--json", "train-a"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v[0]["job"], "train-aaaaaa");
    let out = run(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(2), "{v}");
    let out = run(&["status"]);
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!table.contains("-0.0000"), "{table}");

    let missing = sb.path().join("nope.json");
    let out = run(&["--config", missing.to_str().unwrap(), "status"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
    let bad = sb.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"checkpoint": {"heartbeat_interval_seconds": "often"}}"#,
    )
    .unwrap();
    let out = run(&["--config", bad.to_str().unwrap(), "status"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains("heartbeat_interval_seconds") && !e.contains("u64"),
        "{e}"
    );
}

/// The original's config copied from another machine names a shared storage folder under a
/// parent that does not exist here: `run` refuses it before anything starts (it used to make
/// the folder as root and keep every checkpoint there without a word). `prune` removes ended
/// jobs and leaves others.
#[test]
fn a_shared_storage_folder_from_elsewhere_is_refused_and_prune_removes_ended_jobs() {
    let sb = Sandbox::new();
    let cfg = sb.path().join("cedana_config.json");
    std::fs::write(
        &cfg,
        r#"{"shared_storage": {"dump_storage_dir": "/home/nobody-here-xyz/.cedana/checkpoints"}}"#,
    )
    .unwrap();
    let out = driver_cmd(sb.path())
        .env("CEDANA_CONFIG", &cfg)
        .arg("run")
        .arg(repo_root().join("scripts/examples/managed.rhai"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("dump_storage_dir"),
        "{}",
        stderr(&out)
    );
    assert!(!std::path::Path::new("/home/nobody-here-xyz").exists());

    for (job, state) in [("old-aaaaaa", "succeeded"), ("live-bbbbbb", "running")] {
        let dir = sb.path().join(job);
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        std::fs::write(
            dir.join("job.json"),
            serde_json::json!({
                "v": 1, "job": job, "script": "/x/j.rhai", "state": state,
                "started_at": 1, "updated_at": 1, "driver_pid": 0,
                "nats_url": "nats://127.0.0.1:1", "embedded_nats": true, "managed": true,
                "workers": [], "task": null, "checkpoints": [], "recoveries": 0,
                "migrations": 0, "cost_usd": 0.0, "exit_code": 0, "error": null
            })
            .to_string(),
        )
        .unwrap();
    }
    let out = driver_cmd(sb.path()).arg("prune").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!sb.path().join("old-aaaaaa").exists());
    assert!(sb.path().join("live-bbbbbb").join("job.json").is_file());
}

/// A task that detaches a daemon of its own (`setsid … &`): nothing of it outlives the job,
/// and the worker's network namespace goes with it.
#[test]
fn processes_a_task_detaches_end_with_the_job() {
    if !criu_ready("processes_a_task_detaches_end_with_the_job") {
        return;
    }
    let sb = Sandbox::new();
    let p = sb.path().join("detach.rhai");
    std::fs::write(
        &p,
        r#"
fn instance_specs() { #{ cpu_cores: 1, memory_gb: 1 } }
fn setup(w) { w.sh("setsid sleep 4321.25 > /dev/null 2>&1 < /dev/null &"); }
fn work(w) { w.spawn("setsid sleep 4321.75 > /dev/null 2>&1 < /dev/null & sleep 1; echo done") }
fn restored_task(w, task) { }
"#,
    )
    .unwrap();
    let out = driver_cmd(sb.path())
        .args(["run", "--checkpoint-every", "0"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let left: Vec<i32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let c = std::fs::read(e.path().join("cmdline")).ok()?;
            (c == b"sleep\x004321.25\x00" || c == b"sleep\x004321.75\x00")
                .then(|| e.file_name().to_string_lossy().parse().ok())
                .flatten()
        })
        .collect();
    for pid in &left {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert!(left.is_empty(), "processes outlived the job: {left:?}");
    let job = std::fs::read_dir(sb.path())
        .unwrap()
        .flatten()
        .find(|e| e.path().join("job.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .unwrap();
    let netns = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().contains(&job))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(netns, 0, "the job's namespaces are left");
}

/// A task that drops root, started by a job with `w.spawn(cmd, #{ userns: true })`, moves to
/// another worker: it runs there as the same user and its counter goes on unbroken (the
/// worker's folder, bind-mounted on the job's work path, is part of its minimal tree on both).
/// A spawn option the driver does not know is refused, naming it.
#[test]
fn a_task_that_drops_root_migrates_between_workers() {
    if !criu_ready("a_task_that_drops_root_migrates_between_workers") {
        return;
    }
    let sb = Sandbox::new();
    let job = script(
        &sb,
        "drops-root.rhai",
        r#"
let w1 = launch();
w1.sh("touch counter.txt && chmod 666 counter.txt");
let task = w1.spawn("setpriv --reuid 1000 --regid 1000 --clear-groups sh -c 'i=0; while [ $i -lt 30 ]; do i=$((i+1)); echo $i >> counter.txt; sleep 0.1; done; echo uid=$(id -u) >> counter.txt'", #{ userns: true });
sleep(1.5);
let w2 = launch();
log(`moving the task from ${w1.id} to ${w2.id}`);
task.migrate(w2);
let code = task.wait();
log(`task ended with ${code} on ${task.worker.id}`);
print(w2.sh("cat counter.txt").stdout);
code
"#,
    );
    let out = run_driver(&job, sb.path());
    let (stdout, e) = (String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(out.status.success(), "driver failed ({}): {e}", out.status);
    let nums: Vec<u64> = stdout
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert_eq!(nums.len(), 30, "{stdout}");
    assert_unbroken(&nums, "the counter of a task that dropped root");
    assert!(
        stdout.contains("uid=1000"),
        "it ran as uid 1000 to the end: {stdout}"
    );
    assert!(e.contains("ended with 0 on w2"), "{e}");

    let bad = script(
        &sb,
        "bad-option.rhai",
        "let w = launch();\nw.spawn(\"true\", #{ usern: true });\n",
    );
    let out = run_driver(&bad, sb.path());
    let e = stderr(&out);
    assert!(!out.status.success());
    assert!(
        e.contains("unknown spawn option \"usern\"") && e.contains("bad-option.rhai:2:"),
        "{e}"
    );
}
