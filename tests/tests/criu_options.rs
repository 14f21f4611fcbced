//! CRIU's options through `cedana-agent dump` and `restore`: what a workload needs that CRIU's
//! defaults refuse (a client connected to a server, a large deleted file held open, a file
//! whose name was removed), what the checkpoint records for its restore (cgroup mode, network
//! lock, external resources), and the refusals of options that are wrong.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use cedana_tests::*;

fn manifest_of(archive: &Path) -> serde_json::Value {
    let f = std::fs::File::open(archive).unwrap();
    let mut zip = zip::ZipArchive::new(f).unwrap();
    let mut text = String::new();
    zip.by_name("manifest.json")
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A server with a client connected: CRIU's default refuses it (the error names both ways
/// out), `--tcp-established` takes the connection with its state, and `restore --tcp-close`
/// brings it back closed (what another host needs): the server sees its end closed and
/// serves the next client.
#[test]
fn a_server_with_a_client_is_dumped_and_restored_with_its_connection_closed() {
    if !criu_ready("a_server_with_a_client_is_dumped_and_restored_with_its_connection_closed") {
        return;
    }
    let sb = Sandbox::new();
    let port = free_port();
    let script = sb.path().join("server.py");
    std::fs::write(
        &script,
        format!(
            "import socket, threading, time\n\
             s = socket.socket()\n\
             s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.bind(('127.0.0.1', {port}))\n\
             s.listen(8)\n\
             def serve(c):\n    n = 0\n    try:\n        while True:\n            n += 1\n            c.sendall(b'%d\\n' % n)\n            time.sleep(0.05)\n    except OSError as e:\n        print('connection ended', flush=True)\n\
             while True:\n    c, _ = s.accept()\n    print('accepted', flush=True)\n    threading.Thread(target=serve, args=(c,), daemon=True).start()\n"
        ),
    )
    .unwrap();
    let log = sb.path().join("server.log");
    let server = sb.exec(
        "server.log",
        &[python().to_str().unwrap(), script.to_str().unwrap()],
    );
    let connect = || {
        let t0 = std::time::Instant::now();
        loop {
            match std::net::TcpStream::connect(("127.0.0.1", port)) {
                Ok(c) => return c,
                Err(e) if t0.elapsed() > Duration::from_secs(10) => panic!("connect: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    };
    let mut client = connect();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(client.read(&mut buf).unwrap() > 0);

    let pid = server.pid.to_string();
    let dir = sb.path().to_str().unwrap();
    let out = sb.agent(["dump", "-p", &pid, "-d", dir]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--tcp-close") && stderr(&out).contains("--tcp-established"),
        "{}",
        stderr(&out)
    );
    assert!(server.alive(), "a refused dump leaves the server running");

    let archive = sb.dump(server.pid, &["--tcp-established"]);
    assert_eq!(manifest_of(&archive)["criu"]["tcp_established"], true);
    wait_until(Duration::from_secs(10), "the dumped server gone", || {
        !server.alive()
    });
    drop(client);
    let out = sb.agent(["restore", "--tcp-close", archive.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let restored = Task::new(parse_pid(&out));
    let mut next = connect();
    next.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(
        next.read(&mut buf).unwrap() > 0,
        "the restored server serves"
    );
    wait_until(Duration::from_secs(10), "the old connection's end", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("connection ended")
    });
    let _ = next.write_all(b"bye");
    restored.kill();
}

const HOLDER: &str = r#"import hashlib, os, sys, time
data = os.urandom(3 << 20)
with open('held', 'wb') as f:
    f.write(data)
if sys.argv[1] == 'linked':
    os.link('held', 'held.bak')
f = open('held', 'rb')
os.unlink('held')
want = hashlib.sha256(data).hexdigest()
i = 0
while True:
    f.seek(0)
    if hashlib.sha256(f.read()).hexdigest() != want:
        print('changed', flush=True)
        sys.exit(1)
    i += 1
    print(i, flush=True)
    time.sleep(0.05)
"#;

/// A process holding a file open whose name is gone: deleted (3 MiB, over CRIU's 1 MiB
/// ghost limit) it needs `--ghost-limit`; removed while another link remains it needs
/// `--link-remap`. Each refusal names its option, and with it the restored process reads its
/// file unchanged.
#[test]
fn files_held_open_without_their_name_need_ghost_limit_or_link_remap() {
    if !criu_ready("files_held_open_without_their_name_need_ghost_limit_or_link_remap") {
        return;
    }
    for (mode, option, value) in [
        ("deleted", "--ghost-limit", Some("8388608")),
        ("linked", "--link-remap", None),
    ] {
        let sb = Sandbox::new();
        let script = sb.path().join("holder.py");
        std::fs::write(&script, HOLDER).unwrap();
        let log = sb.path().join("holder.log");
        let mut c = sb.agent_cmd([
            "exec",
            "--log",
            "holder.log",
            "--",
            python().to_str().unwrap(),
            script.to_str().unwrap(),
            mode,
        ]);
        let out = c.output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let task = Task::new(parse_pid(&out));
        wait_for_numbers(&log, 3);
        let pid = task.pid.to_string();
        let dir = sb.path().to_str().unwrap();
        let out = sb.agent(["dump", "-p", &pid, "-d", dir]);
        assert_eq!(out.status.code(), Some(4), "{mode}: {}", stderr(&out));
        assert!(stderr(&out).contains(option), "{mode}: {}", stderr(&out));
        assert!(task.alive(), "{mode}: a refused dump leaves it running");
        let mut args = vec![option];
        args.extend(value);
        let archive = sb.dump(task.pid, &args);
        wait_until(Duration::from_secs(10), "the dumped process gone", || {
            !task.alive()
        });
        let n = numbers(&log).len();
        let restored = sb.restore(&archive);
        wait_for_numbers(&log, n + 5);
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(!text.contains("changed"), "{mode}: {text}");
        assert_unbroken(&numbers(&log), mode);
        restored.kill();
    }
}

/// `--manage-cgroups`, `--network-lock` and `--external` are recorded in the checkpoint; a
/// restore uses the dump's modes, and one that does not name the external resources again is
/// refused before anything runs; named, the tree comes back.
#[test]
fn what_the_restore_needs_is_recorded_and_asked_for() {
    if !criu_ready("what_the_restore_needs_is_recorded_and_asked_for") {
        return;
    }
    let sb = Sandbox::new();
    let log = sb.path().join("counter.log");
    let task = sb.exec(
        "counter.log",
        &[
            "sh",
            "-c",
            "i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done",
        ],
    );
    wait_for_numbers(&log, 3);
    let archive = sb.dump(
        task.pid,
        &[
            "--manage-cgroups",
            "ignore",
            "--network-lock",
            "skip",
            "--external",
            "dev[1/3]:null",
        ],
    );
    let m = manifest_of(&archive);
    assert_eq!(m["criu"]["manage_cgroups"], "ignore", "{m}");
    assert_eq!(m["criu"]["network_lock"], "skip", "{m}");
    assert_eq!(m["criu"]["external"][0], "dev[1/3]:null", "{m}");
    let n = numbers(&log).len();
    let out = sb.agent(["restore", archive.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("dev[1/3]:null") && stderr(&out).contains("--external"),
        "{}",
        stderr(&out)
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        numbers(&log).len(),
        n,
        "nothing runs after a refused restore"
    );
    assert!(
        sb.staging_leftovers().is_empty(),
        "{:?}",
        sb.staging_leftovers()
    );
    let out = sb.agent([
        "restore",
        "--external",
        "dev[null]:/dev/null",
        archive.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let restored = Task::new(parse_pid(&out));
    wait_for_numbers(&log, n + 5);
    assert_unbroken(&numbers(&log), "counter restored with its external named");
    restored.kill();
}

/// Options that are wrong are refused before anything is dumped (exit 2, naming them), and a
/// manifest whose recorded options are forged is refused as a bad archive (exit 3).
#[test]
fn wrong_options_and_forged_recorded_options_are_refused() {
    if !criu_ready("wrong_options_and_forged_recorded_options_are_refused") {
        return;
    }
    let sb = Sandbox::new();
    let log = sb.path().join("counter.log");
    let task = sb.exec(
        "counter.log",
        &[
            "sh",
            "-c",
            "i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done",
        ],
    );
    wait_for_numbers(&log, 3);
    let pid = task.pid.to_string();
    let dir = sb.path().to_str().unwrap();
    for (args, says) in [
        (vec!["--external", "not-a-resource"], "not-a-resource"),
        (vec!["--external", "mnt[x]junk"], "mnt[x]junk"),
        (vec!["--ghost-limit", "0"], "ghost-limit"),
        (vec!["--manage-cgroups", "sometimes"], "sometimes"),
    ] {
        let mut full = vec!["dump", "-p", &pid, "-d", dir];
        full.extend(args.iter().copied());
        let out = sb.agent(&full);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
        assert!(task.alive());
    }
    let archive = sb.dump(task.pid, &[]);
    // The manifest rewritten with an external resource holding a newline (CRIU's options are
    // a protocol message, but restore.sh and logs are lines).
    let forged = sb.path().join("forged.zip");
    {
        let mut src = zip::ZipArchive::new(std::fs::File::open(&archive).unwrap()).unwrap();
        let mut dst = zip::ZipWriter::new(std::fs::File::create(&forged).unwrap());
        for i in 0..src.len() {
            let f = src.by_index(i).unwrap();
            if f.name() == "manifest.json" {
                let name = f.name().to_string();
                let mut m: serde_json::Value = serde_json::from_reader(f).unwrap();
                m["criu"]["external"] = serde_json::json!(["mnt[/x]:y\nrm -rf /"]);
                dst.start_file(name, zip::write::SimpleFileOptions::default())
                    .unwrap();
                dst.write_all(m.to_string().as_bytes()).unwrap();
            } else {
                dst.raw_copy_file(f).unwrap();
            }
        }
        dst.finish().unwrap();
    }
    let out = sb.agent(["restore", forged.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("CRIU options"), "{}", stderr(&out));
    assert!(sb.staging_leftovers().is_empty());
}
