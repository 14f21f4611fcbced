//! Dump and restore real processes with real CRIU; each test checks the restored process goes
//! on from where it was, with its state intact.

use std::ffi::OsStr;
use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use cedana_tests::*;

const COUNTER: &str = "i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done";

/// Dumps (killing the task), checks it is gone, restores, and returns the restored task.
fn dump_kill_restore(sb: &Sandbox, task: &Task) -> (Task, std::path::PathBuf) {
    let archive = sb.dump(task.pid, &[]);
    wait_until(Duration::from_secs(10), "dumped task to be gone", || {
        !task.alive()
    });
    let restored = sb.restore(&archive);
    assert!(
        restored.alive(),
        "restored PID {} is not running",
        restored.pid
    );
    assert!(
        sb.staging_leftovers().is_empty(),
        "staging not cleaned: {:?}",
        sb.staging_leftovers()
    );
    (restored, archive)
}

#[test]
fn shell_counter_continues_after_restore() {
    if !criu_ready("shell_counter_continues_after_restore") {
        return;
    }
    let sb = Sandbox::new();
    let log = sb.path().join("counter.log");
    let task = sb.exec("counter.log", &["sh", "-c", COUNTER]);
    wait_for_numbers(&log, 10);
    let (restored, archive) = dump_kill_restore(&sb, &task);
    let at_dump = numbers(&log).len();
    wait_for_numbers(&log, at_dump + 20);
    restored.kill();
    let nums = numbers(&log);
    assert!(nums.len() >= at_dump + 20);
    assert_unbroken(&nums, "counter across dump and restore");
    // The seed's naming: <process name>_<YYYYMMDD_HHMMSS>.zip
    let name = archive.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("sh_")
            && name.ends_with(".zip")
            && name.len() == "sh_20260101_000000.zip".len(),
        "{name}"
    );
}

#[test]
fn plain_process_started_the_originals_way() {
    // The original's gotcha: `setsid CMD < /dev/null &> log &`. Such a process shares the PID
    // namespace with everything else, so it is restored with its own PID.
    if !criu_ready("plain_process_started_the_originals_way") {
        return;
    }
    let sb = Sandbox::new();
    let log = sb.path().join("plain.log");
    let mut child = std::process::Command::new("setsid")
        .args(["sh", "-c", COUNTER])
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let task = Task::new(child.id() as i32);
    wait_for_numbers(&log, 5);
    let archive = sb.dump(task.pid, &[]);
    let _ = child.wait(); // reap it, so its PID is free for the restore
    let restored = sb.restore(&archive);
    assert_eq!(
        restored.pid, task.pid,
        "a process outside a PID namespace comes back with its PID"
    );
    let at = numbers(&log).len();
    wait_for_numbers(&log, at + 10);
    restored.kill();
    assert_unbroken(&numbers(&log), "plain counter");
}

#[test]
fn listening_tcp_socket_keeps_serving_with_its_state() {
    if !criu_ready("listening_tcp_socket_keeps_serving_with_its_state") {
        return;
    }
    let sb = Sandbox::new();
    let server = r#"
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0))
s.listen(16)
print("port", s.getsockname()[1], flush=True)
n = 0
while True:
    c, _ = s.accept()
    n += 1
    c.sendall(b"hello %d\n" % n)
    c.close()
"#;
    let py = python();
    let task = sb.exec("server.log", &[py.to_str().unwrap(), "-c", server]);
    let log = sb.path().join("server.log");
    let mut port = 0u16;
    wait_until(Duration::from_secs(20), "server port", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        port = text
            .lines()
            .find_map(|l| l.strip_prefix("port ")?.trim().parse().ok())
            .unwrap_or(0);
        port != 0
    });
    let ask = || {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok::<_, std::io::Error>(out)
    };
    assert_eq!(ask().unwrap(), "hello 1\n");
    assert_eq!(ask().unwrap(), "hello 2\n");
    let archive = sb.dump(task.pid, &[]);
    wait_until(Duration::from_secs(10), "server gone", || !task.alive());
    assert!(
        ask().is_err(),
        "nothing listens while the server is checkpointed"
    );
    let restored = sb.restore(&archive);
    assert_eq!(
        ask().unwrap(),
        "hello 3\n",
        "the restored server keeps its count"
    );
    restored.kill();
}

/// 256 MiB where every 4 KiB page is distinct: a byte pattern with the page's index in front.
const BIG_MEMORY: &str = r#"
import hashlib, os, sys, time
N = 256 << 20
pat = bytes((i * 7 + 13) & 0xff for i in range(4096))
buf = bytearray(pat * (N // 4096))
for page in range(N // 4096):
    buf[page * 4096 : page * 4096 + 8] = page.to_bytes(8, "little")
print("ready", flush=True)
while True:
    if os.path.exists("trigger"):
        os.remove("trigger")
        print("sha", hashlib.sha256(buf).hexdigest(), flush=True)
    time.sleep(0.05)
"#;

fn expected_big_memory_sha() -> String {
    use sha2::{Digest, Sha256};
    let pat: Vec<u8> = (0..4096u32).map(|i| ((i * 7 + 13) & 0xff) as u8).collect();
    let mut h = Sha256::new();
    let mut page = pat.clone();
    for i in 0..(256u64 << 20) / 4096 {
        page[..8].copy_from_slice(&i.to_le_bytes());
        h.update(&page);
    }
    hex::encode(h.finalize())
}

fn memory_sha(sb: &Sandbox, log: &Path) -> String {
    let before = std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches("sha ")
        .count();
    std::fs::write(sb.path().join("trigger"), b"").unwrap();
    let mut sha = String::new();
    wait_until(Duration::from_secs(60), "memory checksum", || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let shas: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("sha "))
            .collect();
        if shas.len() > before {
            sha = shas[shas.len() - 1].trim().to_string();
            true
        } else {
            false
        }
    });
    sha
}

#[test]
fn python_with_256_mib_keeps_its_memory() {
    if !criu_ready("python_with_256_mib_keeps_its_memory") {
        return;
    }
    let sb = Sandbox::new();
    let py = python();
    let task = sb.exec("big.log", &[py.to_str().unwrap(), "-c", BIG_MEMORY]);
    let log = sb.path().join("big.log");
    wait_until(Duration::from_secs(60), "256 MiB allocated", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("ready")
    });
    let expected = expected_big_memory_sha();
    assert_eq!(
        memory_sha(&sb, &log),
        expected,
        "the pattern before the dump"
    );
    let archive = sb.dump(task.pid, &["--compress", "zstd"]);
    let manifest = read_manifest(&archive);
    assert!(manifest["process"]["rss_bytes"].as_u64().unwrap() >= 256 << 20);
    assert!(
        std::fs::metadata(&archive).unwrap().len() < 64 << 20,
        "zstd shrinks the repetitive pattern"
    );
    wait_until(Duration::from_secs(10), "dumped task gone", || {
        !task.alive()
    });
    let restored = sb.restore(&archive);
    assert_eq!(
        memory_sha(&sb, &log),
        expected,
        "the pattern after the restore"
    );
    restored.kill();
}

/// A plain archive's page images are read by CRIU from the archive itself, each checked before
/// its last page goes (`criu restore --stream`); the way before (copied out and checked
/// first) stays behind `CEDANA_RESTORE_STREAM=0`. Both give back every page.
#[test]
fn memory_read_from_the_archive_in_place_comes_back_whole() {
    if !criu_ready("memory_read_from_the_archive_in_place_comes_back_whole") {
        return;
    }
    let sb = Sandbox::new();
    let py = python();
    let task = sb.exec("big.log", &[py.to_str().unwrap(), "-c", BIG_MEMORY]);
    let log = sb.path().join("big.log");
    wait_until(Duration::from_secs(60), "256 MiB allocated", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("ready")
    });
    let expected = expected_big_memory_sha();
    let mut pid = task.pid;
    for stream in ["1", "0"] {
        let archive = sb.dump(pid, &[]);
        wait_until(Duration::from_secs(10), "dumped task gone", || {
            !Task::new(pid).alive()
        });
        let out = sb
            .agent_cmd([
                OsStr::new("restore"),
                archive.as_os_str(),
                OsStr::new("--json"),
            ])
            .env("CEDANA_RESTORE_STREAM", stream)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["streamed"], stream == "1", "{v}");
        pid = v["pid"].as_i64().unwrap() as i32;
        assert_eq!(
            memory_sha(&sb, &log),
            expected,
            "the pattern after the restore (streamed: {stream})"
        );
        assert!(sb.staging_leftovers().is_empty());
    }
    Task::new(pid).kill();
}

#[test]
fn multithreaded_process_resumes_every_thread() {
    if !criu_ready("multithreaded_process_resumes_every_thread") {
        return;
    }
    let sb = Sandbox::new();
    let script = r#"
import threading, time, sys
def work(k):
    n = 0
    while True:
        n += 1
        sys.stdout.write("t%d %d\n" % (k, n))
        sys.stdout.flush()
        time.sleep(0.05)
for k in range(4):
    threading.Thread(target=work, args=(k,), daemon=True).start()
while True:
    time.sleep(1)
"#;
    let py = python();
    let task = sb.exec("threads.log", &[py.to_str().unwrap(), "-u", "-c", script]);
    let log = sb.path().join("threads.log");
    let per_thread = |k: usize| -> Vec<u64> {
        let prefix = format!("t{k} ");
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
            .collect()
    };
    wait_until(Duration::from_secs(20), "all threads counting", || {
        (0..4).all(|k| per_thread(k).len() >= 5)
    });
    let (restored, _) = dump_kill_restore(&sb, &task);
    let threads = threads_of(restored.pid);
    assert_eq!(threads, 5, "main thread and four workers after restore");
    let at: Vec<usize> = (0..4).map(|k| per_thread(k).len()).collect();
    wait_until(Duration::from_secs(20), "threads counting on", || {
        (0..4).all(|k| per_thread(k).len() >= at[k] + 5)
    });
    restored.kill();
    for k in 0..4 {
        assert_unbroken(&per_thread(k), &format!("thread {k}"));
    }
}

fn threads_of(pid: i32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:")?.trim().parse().ok())
        .unwrap()
}

#[test]
fn process_tree_joined_by_a_pipe() {
    if !criu_ready("process_tree_joined_by_a_pipe") {
        return;
    }
    let sb = Sandbox::new();
    let cmd = format!("{COUNTER} | while read l; do echo $l; done");
    let task = sb.exec("pipe.log", &["sh", "-c", &cmd]);
    let log = sb.path().join("pipe.log");
    wait_for_numbers(&log, 10);
    let archive = sb.dump(task.pid, &[]);
    let manifest = read_manifest(&archive);
    assert!(
        manifest["process"]["tree_size"].as_u64().unwrap() >= 3,
        "sh and both ends of the pipe: {manifest}"
    );
    wait_until(Duration::from_secs(10), "tree gone", || !task.alive());
    let restored = sb.restore(&archive);
    let at = numbers(&log).len();
    wait_for_numbers(&log, at + 20);
    restored.kill();
    assert_unbroken(&numbers(&log), "numbers through the pipe");
}

#[test]
fn process_appending_to_a_file() {
    if !criu_ready("process_appending_to_a_file") {
        return;
    }
    let sb = Sandbox::new();
    let script = r#"
import time
f = open("data.txt", "a")
n = 0
while True:
    n += 1
    f.write("%d\n" % n)
    f.flush()
    time.sleep(0.05)
"#;
    let py = python();
    let task = sb.exec("append.log", &[py.to_str().unwrap(), "-c", script]);
    let data = sb.path().join("data.txt");
    wait_for_numbers(&data, 10);
    let (restored, _) = dump_kill_restore(&sb, &task);
    let at = numbers(&data).len();
    wait_for_numbers(&data, at + 20);
    restored.kill();
    assert_unbroken(&numbers(&data), "lines appended across dump and restore");
}

#[test]
fn side_by_side_restores_from_one_archive() {
    if !criu_ready("side_by_side_restores_from_one_archive") {
        return;
    }
    let sb = Sandbox::new();
    let task = sb.exec("side.log", &["sh", "-c", COUNTER]);
    wait_for_numbers(&sb.path().join("side.log"), 5);
    let archive = sb.dump(task.pid, &["--leave-running"]);
    assert!(task.alive(), "--leave-running keeps the original running");
    let a = sb.restore(&archive);
    let b = sb.restore(&archive);
    let pids = [task.pid, a.pid, b.pid];
    assert!(
        pids[0] != pids[1] && pids[1] != pids[2] && pids[0] != pids[2],
        "{pids:?}"
    );
    std::thread::sleep(Duration::from_millis(500));
    for pid in pids {
        assert!(is_alive(pid), "copy {pid} is running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
        assert!(
            nspid.trim_end().ends_with("\t1"),
            "copy {pid} is PID 1 of its own namespace: {nspid}"
        );
    }
    let manifest = read_manifest(&archive);
    assert_eq!(manifest["criu"]["pid_namespace"], true);
}

/// The manifest of an archive as JSON.
pub fn read_manifest(archive: &Path) -> serde_json::Value {
    let mut z = zip::ZipArchive::new(std::fs::File::open(archive).unwrap()).unwrap();
    let mut s = String::new();
    z.by_name("manifest.json")
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
    serde_json::from_str(&s).unwrap()
}

#[test]
fn staging_on_another_filesystem() {
    // Images staged on tmpfs while the archive lives on disk: copies cross filesystems.
    if !criu_ready("staging_on_another_filesystem") {
        return;
    }
    let sb = Sandbox::new();
    let shm = tempfile::Builder::new()
        .prefix("cedana-test-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let log = sb.path().join("xfs.log");
    let task = sb.exec("xfs.log", &["sh", "-c", COUNTER]);
    wait_for_numbers(&log, 5);
    let dir = sb.path().display().to_string();
    let dump = sb
        .agent_cmd(["dump", "-p", &task.pid.to_string(), "-d", &dir])
        .env("CEDANA_STAGING_DIR", shm.path())
        .output()
        .unwrap();
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let archive = String::from_utf8_lossy(&dump.stdout).trim().to_string();
    wait_until(Duration::from_secs(10), "task gone", || !task.alive());
    let out = sb
        .agent_cmd(["restore", &archive])
        .env("CEDANA_STAGING_DIR", shm.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let restored = Task::new(parse_pid(&out));
    let at = numbers(&log).len();
    wait_for_numbers(&log, at + 10);
    restored.kill();
    assert_unbroken(&numbers(&log), "counter staged on tmpfs");
    assert_eq!(
        std::fs::read_dir(shm.path()).unwrap().count(),
        0,
        "staging cleaned"
    );
}

/// A task that writes files in its folder: the checkpoint carries the folder as of the dump,
/// and the restore puts it back, so the task goes on even after the folder was lost (as on a
/// new machine) or changed after the dump.
#[test]
fn carried_files_come_back_with_the_task() {
    if !criu_ready("carried_files_come_back_with_the_task") {
        return;
    }
    let sb = Sandbox::new();
    let job = sb.path().join("job");
    std::fs::create_dir_all(job.join("data")).unwrap();
    std::fs::write(job.join("data/input.txt"), "seed\n").unwrap();
    let out_file = job.join("data/out.txt");
    // The task keeps out.txt open and appends to it; its stdout log is in the folder too.
    let script = format!(
        "exec 3>>{out}; i=0; while :; do i=$((i+1)); echo $i >&3; echo $i; sleep 0.05; done",
        out = out_file.display()
    );
    let task = sb.exec("job/task.log", &["sh", "-c", &script]);
    wait_for_numbers(&out_file, 10);
    let job_s = job.to_str().unwrap();
    let archive = sb.dump(task.pid, &["--with-files", job_s]);
    wait_until(Duration::from_secs(10), "dumped task to be gone", || {
        !task.alive()
    });
    let at_dump = numbers(&out_file);
    // The folder is lost, as on a machine that never saw it.
    std::fs::remove_dir_all(&job).unwrap();
    let out = sb.agent(["restore", archive.to_str().unwrap(), "--files-to", job_s]);
    assert!(
        out.status.success(),
        "restore failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let restored = Task::new(parse_pid(&out));
    assert_eq!(
        std::fs::read_to_string(job.join("data/input.txt")).unwrap(),
        "seed\n"
    );
    wait_for_numbers(&out_file, at_dump.len() + 10);
    restored.kill();
    let nums = numbers(&out_file);
    assert_eq!(&nums[..at_dump.len()], &at_dump[..]);
    assert_unbroken(
        &nums,
        "file written across dump, loss of the folder and restore",
    );
    assert_unbroken(&numbers(&job.join("task.log")), "task's log");

    // Without --files-to nothing is put back, and the task cannot find its files.
    std::fs::remove_dir_all(&job).unwrap();
    let out = sb.agent(["restore", archive.to_str().unwrap()]);
    assert!(!out.status.success(), "restore without its files succeeded");
    assert!(!job.exists(), "files were put back without --files-to");
}

/// An archive holds the process's memory: only its owner may read it, whatever the
/// compression (stored page images used to keep CRIU's 0644).
#[test]
fn archives_are_private_whatever_the_compression() {
    use std::os::unix::fs::PermissionsExt;
    if !criu_ready("archives_are_private_whatever_the_compression") {
        return;
    }
    let sb = Sandbox::new();
    let task = sb.exec("counter.log", &["sh", "-c", COUNTER]);
    wait_for_numbers(&sb.path().join("counter.log"), 5);
    for compression in ["none", "zstd", "deflate"] {
        let archive = sb.dump(task.pid, &["--leave-running", "--compress", compression]);
        let mode = std::fs::metadata(&archive).unwrap().permissions().mode() & 0o7777;
        assert_eq!(
            mode,
            0o600,
            "--compress {compression}: {} has mode {mode:o}",
            archive.display()
        );
    }
    task.kill();
}

/// SysV shared memory (what PostgreSQL always makes): a task started with `cedana-agent exec`
/// has its own IPC namespace, so CRIU takes its segment along; the counter kept in the
/// segment goes on unbroken after the restore.
#[test]
fn sysv_shared_memory_survives_a_round_trip() {
    if !criu_ready("sysv_shared_memory_survives_a_round_trip") {
        return;
    }
    let sb = Sandbox::new();
    let script = sb.path().join("shm.py");
    std::fs::write(
        &script,
        "import ctypes, time\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         libc.shmat.restype = ctypes.c_void_p\n\
         shmid = libc.shmget(0, 4096, 0o600 | 0o1000)\n\
         assert shmid >= 0, ctypes.get_errno()\n\
         cell = (ctypes.c_long * 1).from_address(libc.shmat(shmid, None, 0))\n\
         while True:\n    cell[0] += 1\n    print(cell[0], flush=True)\n    time.sleep(0.05)\n",
    )
    .unwrap();
    let log = sb.path().join("shm.log");
    let task = sb.exec(
        "shm.log",
        &[python().to_str().unwrap(), script.to_str().unwrap()],
    );
    wait_for_numbers(&log, 5);
    let archive = sb.dump(task.pid, &[]);
    let restored = sb.restore(&archive);
    let n = numbers(&log).len();
    wait_for_numbers(&log, n + 5);
    assert_unbroken(&numbers(&log), "the counter kept in SysV shared memory");
    restored.kill();
}

/// The uid of process `pid` (real), from its status.
fn uid_of(pid: i32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("a Uid line")
}

/// `/tmp/cr-tmpfs.*` folders (what CRIU leaves after restoring a tmpfs it could not unmount).
fn criu_tmpfs_leftovers() -> Vec<String> {
    std::fs::read_dir("/tmp")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("cr-tmpfs."))
                .collect()
        })
        .unwrap_or_default()
}

/// Starts `cmd` with `exec --userns`, its output to `log`, in `cwd` (the sandbox's otherwise).
fn exec_userns(sb: &Sandbox, log: &Path, cwd: Option<&Path>, cmd: &[&str]) -> Task {
    let mut args = vec!["exec", "--userns", "--log", log.to_str().unwrap()];
    if let Some(c) = cwd {
        args.extend(["--cwd", c.to_str().unwrap()]);
    }
    args.push("--");
    args.extend_from_slice(cmd);
    let out = sb.agent(&args);
    assert!(
        out.status.success(),
        "exec --userns failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Task::new(parse_pid(&out))
}

/// A task that drops root (issue 14, item 6): started with `exec --userns`, it runs as uid 1000
/// in a user namespace of its own (root's), with a minimal mount tree. Where CRIU lacks
/// CAP_SYS_RESOURCE (this machine's containers) such a task could not be dumped at all
/// (`Can't get rlimit`); with its own user namespace it round-trips, still uid 1000, its counter
/// unbroken, nothing left in /tmp.
#[test]
fn a_task_that_drops_root_round_trips_in_its_own_user_namespace() {
    if !criu_ready("a_task_that_drops_root_round_trips_in_its_own_user_namespace") {
        return;
    }
    let sb = Sandbox::new();
    let log = sb.path().join("drops-root.log");
    let before = criu_tmpfs_leftovers();
    let task = exec_userns(
        &sb,
        &log,
        None,
        &[
            "setpriv",
            "--reuid",
            "1000",
            "--regid",
            "1000",
            "--clear-groups",
            "sh",
            "-c",
            COUNTER,
        ],
    );
    wait_for_numbers(&log, 5);
    assert_eq!(uid_of(task.pid), 1000, "the task dropped root");
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/user")).unwrap();
    assert_ne!(
        ns(&task.pid.to_string()),
        ns("self"),
        "its own user namespace"
    );
    let (restored, _) = dump_kill_restore(&sb, &task);
    assert_eq!(uid_of(restored.pid), 1000, "restored as the user it was");
    let n = numbers(&log).len();
    wait_for_numbers(&log, n + 5);
    assert_unbroken(&numbers(&log), "the counter of a task that dropped root");
    restored.kill();
    let after: Vec<String> = criu_tmpfs_leftovers()
        .into_iter()
        .filter(|n| !before.contains(n))
        .collect();
    assert!(after.is_empty(), "CRIU's tmpfs folders left: {after:?}");
}

/// `exec --userns` with its log and working folder on another filesystem (a tmpfs mounted in
/// the sandbox, as a worker's folder is bind-mounted on the job's work path): that mount is
/// bound into the task's minimal tree, recorded in the checkpoint and bound again for the
/// restore, so the task writes to the same file before and after.
#[test]
fn a_userns_task_keeps_its_folder_on_another_mount() {
    if !criu_ready("a_userns_task_keeps_its_folder_on_another_mount") {
        return;
    }
    let sb = Sandbox::new();
    let dir = sb.path().join("elsewhere");
    std::fs::create_dir(&dir).unwrap();
    let _tmpfs = Tmpfs::mount(&dir, "4m");
    let log = dir.join("count.log");
    let task = exec_userns(&sb, &log, Some(&dir), &["sh", "-c", COUNTER]);
    wait_for_numbers(&log, 5);
    let (restored, archive) = dump_kill_restore(&sb, &task);
    let n = numbers(&log).len();
    wait_for_numbers(&log, n + 5);
    assert_unbroken(&numbers(&log), "the counter in a folder on another mount");
    let manifest = {
        let f = std::fs::File::open(&archive).unwrap();
        let mut z = zip::ZipArchive::new(f).unwrap();
        let mut text = String::new();
        z.by_name("manifest.json")
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        text
    };
    assert!(
        manifest.contains(dir.to_str().unwrap()),
        "the checkpoint names the mount: {manifest}"
    );
    restored.kill();
}

/// PostgreSQL's binaries (`/usr/lib/postgresql/<version>/bin`, Debian's layout).
fn postgres_bin() -> std::path::PathBuf {
    std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|d| {
            d.flatten()
                .map(|e| e.path().join("bin"))
                .find(|b| b.join("postgres").is_file())
        })
        .expect("PostgreSQL under /usr/lib/postgresql (tools/deps.sh installs postgresql-15)")
}

/// A command run as the `postgres` user.
fn as_postgres(program: &Path) -> std::process::Command {
    let mut c = std::process::Command::new("setpriv");
    c.args([
        "--reuid",
        "postgres",
        "--regid",
        "postgres",
        "--init-groups",
    ])
    .arg(program);
    c
}

/// A database under write load (issue 14, items 5 and 6): PostgreSQL drops root to its own
/// user and keeps SysV and POSIX shared memory, so it runs under `exec --userns` (its own user,
/// IPC and mount namespaces). A client in the same tree inserts 1, 2, 3, … one transaction
/// each, printing each number once it is committed. The tree is dumped (and so killed) and
/// restored mid-load; the load goes on, and every number printed is a row of the table:
/// no committed row is lost, and none is there twice (the primary key would refuse it).
#[test]
fn postgres_under_write_load_loses_no_committed_row() {
    if !criu_ready("postgres_under_write_load_loses_no_committed_row") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let bin = postgres_bin();
    let sb = Sandbox::new();
    std::fs::set_permissions(sb.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let pg = sb.path().join("pg");
    std::fs::create_dir(&pg).unwrap();
    let user = nix::unistd::User::from_name("postgres")
        .unwrap()
        .expect("a postgres user (the postgresql package makes it)");
    nix::unistd::chown(&pg, Some(user.uid), Some(user.gid)).unwrap();
    std::fs::set_permissions(&pg, std::fs::Permissions::from_mode(0o700)).unwrap();
    let init = as_postgres(&bin.join("initdb"))
        .args(["-U", "postgres", "--auth=trust", "-D"])
        .arg(pg.join("data"))
        .output()
        .expect("run initdb");
    assert!(
        init.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let port = free_port().to_string();
    let (b, d) = (bin.display(), pg.display());
    let script = sb.path().join("load.sh");
    std::fs::write(
        &script,
        format!(
            "{b}/postgres -D {d}/data -k {d} -c listen_addresses= -p {port} > {d}/server.log 2>&1 &\n\
             until {b}/pg_isready -q -h {d} -p {port}; do sleep 0.1; done\n\
             psql() {{ {b}/psql -X -q -h {d} -p {port} -U postgres \"$@\"; }}\n\
             psql -c 'create table t(i int primary key)'\n\
             # One client session, as an application keeps: each insert commits on its own,\n\
             # then its number is printed.\n\
             i=0\n\
             while [ ! -e {d}/stop ]; do\n\
               i=$((i+1)); printf 'insert into t values (%s);\\n\\\\echo %s\\n' $i $i; sleep 0.01\n\
             done | psql -v ON_ERROR_STOP=1\n\
             echo stopped\n\
             wait\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = sb.path().join("load.log");
    let task = exec_userns(
        &sb,
        &log,
        None,
        &[
            "setpriv",
            "--reuid",
            "postgres",
            "--regid",
            "postgres",
            "--init-groups",
            "sh",
            script.to_str().unwrap(),
        ],
    );
    wait_for_numbers(&log, 50);
    let (restored, _) = dump_kill_restore(&sb, &task);
    let n = numbers(&log).len();
    wait_for_numbers(&log, n + 50);
    // The load stops (after the insert in progress) and the table is read.
    std::fs::write(pg.join("stop"), "").unwrap();
    wait_until(Duration::from_secs(30), "the load to stop", || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("stopped"))
    });
    let printed = numbers(&log);
    assert_unbroken(&printed, "the committed inserts");
    let query = as_postgres(&bin.join("psql"))
        .args(["-X", "-At", "-h"])
        .arg(&pg)
        .args([
            "-p",
            &port,
            "-U",
            "postgres",
            "-c",
            "select i from t order by i",
        ])
        .output()
        .expect("run psql");
    assert!(
        query.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&query.stderr)
    );
    let rows: Vec<u64> = String::from_utf8_lossy(&query.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let missing: Vec<u64> = printed
        .iter()
        .filter(|i| rows.binary_search(i).is_err())
        .copied()
        .collect();
    assert!(
        missing.is_empty(),
        "committed rows lost across the checkpoint: {missing:?}"
    );
    assert_eq!(
        rows.len(),
        printed.len(),
        "the table holds exactly the inserts that were reported committed"
    );
    restored.kill();
}

/// `exec --userns` with a log under /dev (the task gets a fresh /dev/shm and /dev bound whole,
/// so it would not write where asked) is refused before anything is made, naming the path
/// (exit 3).
#[test]
fn exec_userns_refuses_a_folder_under_dev() {
    let sb = Sandbox::new();
    let dir = tempfile::Builder::new()
        .prefix("cedana-test-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let log = dir.path().join("x.log");
    let out = sb.agent([
        "exec",
        "--userns",
        "--log",
        log.to_str().unwrap(),
        "--",
        "true",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains(log.to_str().unwrap()), "{err}");
    assert!(!log.exists(), "the log was made before the refusal");
}
