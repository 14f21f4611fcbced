//! The command line as a user meets it: exit codes, JSON output, config file, errors that name
//! their input, failed dumps that leave earlier archives alone.

use std::path::Path;
use std::time::Duration;

use cedana_tests::*;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn the_binary_under_test_is_static_when_required() {
    // The README's test command builds the agent fully static and sets CEDANA_REQUIRE_STATIC=1.
    if std::env::var_os("CEDANA_REQUIRE_STATIC").is_none_or(|v| v != "1") {
        eprintln!("NOTE: CEDANA_REQUIRE_STATIC is not 1; checking the static build is left to the README's test command");
        return;
    }
    let out = std::process::Command::new("ldd")
        .arg(agent_bin())
        .output()
        .expect("run ldd");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(
        text.contains("not a dynamic executable") || text.contains("statically linked"),
        "ldd says: {text}"
    );
}

#[test]
fn help_explains_commands_and_exit_codes() {
    let sb = Sandbox::new();
    let out = sb.agent(["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for word in ["dump", "restore", "exec", "check", "Exit codes", "RUST_LOG"] {
        assert!(text.contains(word), "--help lacks {word}: {text}");
    }
    let out = sb.agent(["dump", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for word in [
        "--leave-running",
        "--compress",
        "--tcp-established",
        "--tcp-close",
        "--json",
        "dump_storage_dir",
    ] {
        assert!(text.contains(word), "dump --help lacks {word}: {text}");
    }
}

#[test]
fn check_reports_a_working_machine() {
    if !criu_ready("check_reports_a_working_machine") {
        return;
    }
    let sb = Sandbox::new();
    let out = sb.agent(["check", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert!(v["criu_version"]["major"].as_i64().unwrap() >= 4);
    let names: Vec<&str> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    for n in ["criu version", "criu check", "soft-dirty", "userfaultfd"] {
        assert!(names.contains(&n), "check reports {n}: {names:?}");
    }
    let text = String::from_utf8_lossy(&sb.agent(["check"]).stdout).into_owned();
    assert!(text.contains("will work"), "{text}");
}

#[test]
fn check_without_criu_says_what_to_do() {
    let sb = Sandbox::new();
    let out = sb.agent(["--criu", "/nonexistent/criu", "check"]);
    assert_eq!(out.status.code(), Some(5));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("/nonexistent/criu") && text.contains("install CRIU"),
        "{text}"
    );
}

#[test]
fn dump_of_a_missing_process() {
    let sb = Sandbox::new();
    let out = sb.agent(["dump", "-p", "4999999", "-d", "."]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no process with PID 4999999"),
        "{}",
        stderr(&out)
    );
    let out = sb.agent(["dump", "-p", "4999999", "-d", ".", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["kind"], "input");
}

#[test]
fn dump_into_a_missing_folder() {
    let sb = Sandbox::new();
    let out = sb.agent([
        "dump",
        "-p",
        &std::process::id().to_string(),
        "-d",
        "/nonexistent/dumps",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains("/nonexistent/dumps"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn restore_of_a_missing_archive() {
    let sb = Sandbox::new();
    let out = sb.agent(["restore", "/nonexistent/x.zip"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains("/nonexistent/x.zip"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn exec_of_a_missing_program() {
    let sb = Sandbox::new();
    let out = sb.agent(["exec", "--", "/nonexistent/program"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("/nonexistent/program"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn config_dump_storage_dir_is_the_default_folder() {
    if !criu_ready("config_dump_storage_dir_is_the_default_folder") {
        return;
    }
    let sb = Sandbox::new();
    let dumps = sb.path().join("from-config");
    std::fs::create_dir(&dumps).unwrap();
    let config = sb.path().join("cedana_config.json");
    // The original's format, with keys this agent does not know.
    std::fs::write(
        &config,
        serde_json::json!({
            "self_serve": true,
            "shared_storage": {"mount_point": "/mnt", "dump_storage_dir": dumps},
            "connection": {"nats_url": "", "nats_port": 4222, "auth_token": "t"},
            "something_new": 1
        })
        .to_string(),
    )
    .unwrap();
    let task = sb.exec("cfg.log", &["sh", "-c", "while :; do sleep 0.1; done"]);
    let out = sb
        .agent_cmd(["dump", "-p", &task.pid.to_string()])
        .env("CEDANA_CONFIG", &config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let archive = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        Path::new(&archive).starts_with(&dumps),
        "{archive} is in dump_storage_dir"
    );
}

#[test]
fn config_with_a_wrong_type_is_refused_clearly() {
    let sb = Sandbox::new();
    let config = sb.path().join("cedana_config.json");
    std::fs::write(
        &config,
        "{\n  \"shared_storage\": {\n    \"dump_storage_dir\": [1, 2]\n  }\n}\n",
    )
    .unwrap();
    let out = sb
        .agent_cmd(["dump", "-p", &std::process::id().to_string()])
        .env("CEDANA_CONFIG", &config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let e = stderr(&out);
    assert!(
        e.contains(&config.display().to_string())
            && e.contains("shared_storage.dump_storage_dir")
            && e.contains("line 3"),
        "{e}"
    );
}

#[test]
fn json_output_of_dump_and_restore() {
    if !criu_ready("json_output_of_dump_and_restore") {
        return;
    }
    let sb = Sandbox::new();
    let task = sb.exec("j.log", &["sh", "-c", "while :; do sleep 0.1; done"]);
    let dir = sb.path().display().to_string();
    let out = sb.agent([
        "dump",
        "-p",
        &task.pid.to_string(),
        "-d",
        &dir,
        "--json",
        "--compress",
        "deflate",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let archive = v["archive"].as_str().unwrap().to_string();
    assert_eq!(
        v["archive_bytes"].as_u64().unwrap(),
        std::fs::metadata(&archive).unwrap().len()
    );
    assert_eq!(v["manifest"]["compression"], "deflate");
    assert!(v["manifest"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["sha256"].as_str().unwrap().len() == 64));
    wait_until(Duration::from_secs(10), "task gone", || !task.alive());
    let out = sb.agent(["restore", &archive, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let restored = Task::new(v["pid"].as_i64().unwrap() as i32);
    assert!(restored.alive());
}

/// A process with an established TCP connection cannot be dumped without a TCP flag: CRIU
/// fails, and that failure must leave the earlier archive untouched and no new one.
#[test]
fn failed_dump_leaves_earlier_archive_intact() {
    if !criu_ready("failed_dump_leaves_earlier_archive_intact") {
        return;
    }
    let sb = Sandbox::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let script = format!(
        "import socket, time\ns = socket.create_connection(('127.0.0.1', {port}))\nprint('connected', flush=True)\nwhile True: time.sleep(0.1)\n"
    );
    let py = python();
    let task = sb.exec("tcp.log", &[py.to_str().unwrap(), "-c", &script]);
    let (_conn, _) = listener.accept().unwrap();
    wait_until(Duration::from_secs(20), "connected", || {
        std::fs::read_to_string(sb.path().join("tcp.log"))
            .unwrap_or_default()
            .contains("connected")
    });
    // An earlier checkpoint, taken with the connection closed on restore.
    let earlier = sb.dump(task.pid, &["--leave-running", "--tcp-close"]);
    let before = std::fs::read(&earlier).unwrap();
    std::thread::sleep(Duration::from_millis(1100)); // a new second: a new archive name
    let dir = sb.path().display().to_string();
    let out = sb.agent(["dump", "-p", &task.pid.to_string(), "-d", &dir]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "CRIU failure exit code: {}",
        stderr(&out)
    );
    let e = stderr(&out);
    assert!(
        e.contains("CRIU's log says") && e.contains("Error"),
        "CRIU's log is quoted: {e}"
    );
    assert!(e.contains("dump-failed.log"), "the full log is kept: {e}");
    assert!(task.alive(), "a failed dump leaves the process running");
    let zips: Vec<_> = std::fs::read_dir(sb.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".zip"))
        .collect();
    assert_eq!(
        zips,
        vec![earlier.file_name().unwrap().to_string_lossy().into_owned()],
        "only the earlier archive"
    );
    assert_eq!(
        std::fs::read(&earlier).unwrap(),
        before,
        "the earlier archive is untouched"
    );
    assert!(sb.staging_leftovers().is_empty());
}

/// When the archive cannot be written (here: a full disk), the frozen process is thawed and
/// goes on as if nothing happened, and no partial archive is left.
#[test]
fn archive_failure_thaws_the_process() {
    if !criu_ready("archive_failure_thaws_the_process") {
        return;
    }
    let sb = Sandbox::new();
    let small = sb.path().join("small");
    let _mounted = Tmpfs::mount(&small, "64k");
    let log = sb.path().join("thaw.log");
    let task = sb.exec(
        "thaw.log",
        &[
            "sh",
            "-c",
            "i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done",
        ],
    );
    wait_for_numbers(&log, 5);
    let out = sb.agent([
        "dump",
        "-p",
        &task.pid.to_string(),
        "-d",
        small.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "an I/O failure: {}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("No space left"), "{}", stderr(&out));
    let at = numbers(&log).len();
    wait_for_numbers(&log, at + 10);
    assert!(task.alive(), "the process runs on");
    assert_unbroken(&numbers(&log), "counter across the failed dump");
    let left: Vec<_> = std::fs::read_dir(&small)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "nothing left in the dump folder: {left:?}");
    assert!(sb.staging_leftovers().is_empty());
}

/// Interrupting the agent while the tree is frozen (here: a slow deflate archive of 256 MiB of
/// random memory) thaws the tree: the process runs on, nothing is lost.
#[test]
fn interrupted_dump_thaws_the_process() {
    if !criu_ready("interrupted_dump_thaws_the_process") {
        return;
    }
    let sb = Sandbox::new();
    let script = "import os, time\nb = bytearray(os.urandom(256 << 20))\nn = 0\nwhile True:\n    n += 1\n    print(n, flush=True)\n    time.sleep(0.05)\n";
    let py = python();
    let task = sb.exec("int.log", &[py.to_str().unwrap(), "-c", script]);
    let log = sb.path().join("int.log");
    wait_until(Duration::from_secs(60), "allocation done", || {
        numbers(&log).len() >= 3
    });
    let dir = sb.path().display().to_string();
    let child = sb
        .agent_cmd([
            "dump",
            "-p",
            &task.pid.to_string(),
            "-d",
            &dir,
            "--compress",
            "deflate",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(stderr(&out).contains("left running"), "{}", stderr(&out));
    let at = numbers(&log).len();
    wait_for_numbers(&log, at + 10);
    assert!(task.alive());
    assert_unbroken(&numbers(&log), "counter across the interrupted dump");
}

/// A job started from a shell on a terminal (the original's "wrap it in setsid" gotcha): its
/// checkpoint could only come back on that terminal, so the dump is refused and the process
/// keeps running (it used to be killed into an archive that never restored).
#[test]
fn a_shell_job_on_a_terminal_is_left_running() {
    if !criu_ready("a_shell_job_on_a_terminal_is_left_running") {
        return;
    }
    let sb = Sandbox::new();
    // `script` gives the shell a terminal of its own (a pseudo-terminal); the shell runs
    // `sleep` as a job of its session. stdin stays open so `script` does not end.
    let mut script = std::process::Command::new("script")
        .args(["-qfc", "sleep 4321.5; true", "/dev/null"])
        .env("SHELL", "/bin/sh")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start script (util-linux)");
    let mut sleeper = None;
    wait_until(Duration::from_secs(10), "the job to start", || {
        sleeper = std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            (cmd == b"sleep\x004321.5\x00").then_some(pid)
        });
        sleeper.is_some()
    });
    let pid = sleeper.unwrap();
    let out = sb.agent(["dump", "-p", &pid.to_string(), "-d", "."]);
    let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = script.kill();
    let _ = script.wait();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(alive, "the process was killed: {}", stderr(&out));
    assert!(
        stderr(&out).contains("/dev/pts/") && stderr(&out).contains("cedana-agent exec"),
        "{}",
        stderr(&out)
    );
    let zips = std::fs::read_dir(sb.path())
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "zip"))
        .count();
    assert_eq!(zips, 0, "no archive is left");
}

/// The original's spelling, `client dump -p PID -d DIR` and `client restore ZIP`, works as
/// `dump` and `restore`.
#[test]
fn the_originals_client_spelling_dumps_and_restores() {
    if !criu_ready("the_originals_client_spelling_dumps_and_restores") {
        return;
    }
    let sb = Sandbox::new();
    let log = sb.path().join("count.log");
    let task = sb.exec(
        "count.log",
        &[
            "sh",
            "-c",
            "i=0; while true; do i=$((i+1)); echo $i; sleep 0.05; done",
        ],
    );
    wait_for_numbers(&log, 5);
    let dir = sb.path().join("ckpt");
    std::fs::create_dir_all(&dir).unwrap();
    let out = sb.agent([
        "client",
        "dump",
        "-p",
        &task.pid.to_string(),
        "-d",
        dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let zip = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        zip.ends_with(".zip") && std::path::Path::new(&zip).is_file(),
        "{zip}"
    );
    let out = sb.agent(["client", "restore", &zip]);
    assert!(out.status.success(), "{}", stderr(&out));
    let restored = Task::new(parse_pid(&out));
    let n = numbers(&log).len();
    wait_for_numbers(&log, n + 5);
    assert_unbroken(&numbers(&log), "the count across client dump and restore");
    restored.kill();
}

/// `kill -9` of `dump` while CRIU's leaves the tree stopped: the dump's guardian resumes the
/// tree (it used to stay in state T for good), and the next dump removes the staging folder
/// and the partial archive the killed one left.
#[test]
fn a_killed_dump_leaves_no_stopped_tree_and_its_leftovers_are_swept() {
    if !criu_ready("a_killed_dump_leaves_no_stopped_tree") {
        return;
    }
    let sb = Sandbox::new();
    let log = sb.path().join("big.log");
    let py = python();
    let task = sb.exec(
        "big.log",
        &[
            py.to_str().unwrap(),
            "-c",
            "import os, time\nb = os.urandom(300 << 20)\ni = 0\nwhile True:\n    i += 1\n    print(i, flush=True)\n    time.sleep(0.05)",
        ],
    );
    wait_for_numbers(&log, 5);
    let dir = sb.path().join("out");
    std::fs::create_dir_all(&dir).unwrap();
    let mut dump = sb
        .agent_cmd([
            "dump",
            "-p",
            &task.pid.to_string(),
            "-d",
            dir.to_str().unwrap(),
            "--compress",
            "zstd",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let state = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, r)| r.trim_start().chars().next())
            })
            .flatten()
    };
    let start = std::time::Instant::now();
    while state(task.pid) != Some('T') {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the tree was never left stopped"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = dump.kill();
    let _ = dump.wait();
    wait_until(
        Duration::from_secs(5),
        "the guardian to resume the tree",
        || state(task.pid).is_some_and(|s| s != 'T'),
    );
    let n = numbers(&log).len();
    wait_for_numbers(&log, n + 5);
    assert_unbroken(&numbers(&log), "the count after the killed dump");
    let leftovers = |d: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".cedana-dump-") || n.ends_with(".partial"))
            .collect()
    };
    assert!(
        !leftovers(&dir).is_empty(),
        "the killed dump left nothing to sweep"
    );
    // The next dump sweeps them (and works).
    let out = sb.agent([
        "dump",
        "-p",
        &task.pid.to_string(),
        "-d",
        dir.to_str().unwrap(),
        "--leave-running",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(leftovers(&dir), Vec::<String>::new());
}

/// An agent killed while CRIU's page images stream into the archive through their FIFOs (the
/// default, stored archive): CRIU's writes into the FIFOs fail, the tree runs on with its count
/// unbroken, and the next dump sweeps the staging folder (FIFOs included) and the partial
/// archive, then succeeds; `--no-sync` archives restore too.
#[test]
fn an_agent_killed_mid_page_image_leaves_the_task_running_and_its_leftovers_swept() {
    if !criu_ready("an_agent_killed_mid_page_image") {
        return;
    }
    let sb = Sandbox::new();
    let log = sb.path().join("fifo.log");
    let py = python();
    let task = sb.exec(
        "fifo.log",
        &[
            py.to_str().unwrap(),
            "-c",
            "import os, time\nb = os.urandom(400 << 20)\ni = 0\nwhile True:\n    i += 1\n    print(i, flush=True)\n    time.sleep(0.05)",
        ],
    );
    wait_for_numbers(&log, 5);
    let dir = sb.path().join("out");
    std::fs::create_dir_all(&dir).unwrap();
    let partial = |d: &Path| -> Option<u64> {
        std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .max()
    };
    let mut dump = sb
        .agent_cmd([
            "dump",
            "-p",
            &task.pid.to_string(),
            "-d",
            dir.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Killed once part of the page image is in the archive, before all of it is.
    let start = std::time::Instant::now();
    while partial(&dir).is_none_or(|n| n < 32 << 20) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no page image arrived in the archive"
        );
        assert!(dump.try_wait().unwrap().is_none(), "the dump ended first");
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = dump.kill();
    let _ = dump.wait();
    let staged: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".cedana-dump-") || n.ends_with(".partial"))
        .collect();
    assert!(!staged.is_empty(), "the killed dump left nothing to sweep");
    let n = numbers(&log).len();
    wait_for_numbers(&log, n + 10);
    assert!(task.alive(), "the task runs on");
    assert_unbroken(&numbers(&log), "the count after the killed dump");
    let out = sb.agent([
        "dump",
        "-p",
        &task.pid.to_string(),
        "-d",
        dir.to_str().unwrap(),
        "--no-sync",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".zip"))
        .collect();
    assert_eq!(
        left,
        Vec::<String>::new(),
        "swept: staging, FIFOs, partial archive"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pages: Vec<&serde_json::Value> = v["manifest"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"].as_str().unwrap().starts_with("images/pages-"))
        .collect();
    assert!(!pages.is_empty());
    assert!(
        pages
            .iter()
            .all(|e| e["blake3"].as_str().unwrap().len() == 64),
        "page images carry a BLAKE3: {pages:?}"
    );
    wait_until(Duration::from_secs(10), "task gone", || !task.alive());
    let archive = v["archive"].as_str().unwrap().to_string();
    let out = sb.agent(["restore", &archive, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let restored = Task::new(v["pid"].as_i64().unwrap() as i32);
    let n = numbers(&log).len();
    wait_for_numbers(&log, n + 5);
    assert!(restored.alive());
}

/// A stopped target (Ctrl-Z, a killed dump) is not checkpointed: it would come back stopped.
#[test]
fn a_stopped_target_is_refused_and_left_as_it_is() {
    if !criu_ready("a_stopped_target_is_refused_and_left_as_it_is") {
        return;
    }
    let sb = Sandbox::new();
    let log = sb.path().join("s.log");
    let task = sb.exec(
        "s.log",
        &["sh", "-c", "while true; do echo x; sleep 0.05; done"],
    );
    wait_for_numbers(&log, 0);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(task.pid),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let out = sb.agent(["dump", "-p", &task.pid.to_string(), "-d", "."]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("kill -CONT"), "{}", stderr(&out));
    assert!(task.alive());
    let zips = std::fs::read_dir(sb.path())
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "zip"))
        .count();
    assert_eq!(zips, 0);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(task.pid),
        nix::sys::signal::Signal::SIGCONT,
    );
}

/// `check` names the capabilities CRIU needs that root lacks here, and what follows (this
/// machine's root lacks CAP_SYS_RESOURCE; one more is dropped for the test).
#[test]
fn check_names_missing_capabilities() {
    if !criu_ready("check_names_missing_capabilities") {
        return;
    }
    let run = |drop: Option<&str>| -> serde_json::Value {
        let mut c = match drop {
            Some(cap) => {
                let mut c = std::process::Command::new("setpriv");
                c.args(["--bounding-set", &format!("-{cap}")])
                    .arg(agent_bin());
                c
            }
            None => std::process::Command::new(agent_bin()),
        };
        let out = c
            .args(["check", "--json"])
            .env("CEDANA_CONFIG", "/nonexistent/cedana_config.json")
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let caps = |r: &serde_json::Value| {
        r["findings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == "capabilities")
            .cloned()
            .expect("a capabilities finding")
    };
    let eff = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("CapEff:")
                .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
        })
        .unwrap();
    let plain = caps(&run(None));
    let has_resource = eff & (1 << 24) != 0;
    assert_eq!(
        plain["detail"]
            .as_str()
            .unwrap()
            .contains("CAP_SYS_RESOURCE"),
        !has_resource,
        "{plain}"
    );
    let dropped = caps(&run(Some("net_admin")));
    assert_eq!(dropped["ok"], false, "{dropped}");
    let d = dropped["detail"].as_str().unwrap();
    assert!(
        d.contains("CAP_NET_ADMIN") && d.contains("TCP connections"),
        "{d}"
    );
}

/// A restored process that ends right away is reported (exit 1), not counted a success.
#[test]
fn a_restore_whose_process_ends_at_once_is_reported() {
    if !criu_ready("a_restore_whose_process_ends_at_once_is_reported") {
        return;
    }
    let sb = Sandbox::new();
    let flag = sb.path().join("flag");
    std::fs::write(&flag, "").unwrap();
    let task = sb.exec(
        "f.log",
        &[
            "sh",
            "-c",
            &format!("while [ -e {} ]; do sleep 0.02; done", flag.display()),
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    let archive = sb.dump(task.pid, &[]);
    std::fs::remove_file(&flag).unwrap();
    let out = sb.agent(["restore", archive.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("ended right away"),
        "{}",
        stderr(&out)
    );
}
