//! The agent daemon against a real nats-server: token auth, registration, idempotent commands,
//! tasks with their output and exit codes, and a checkpoint that moves a running counter from
//! one worker to another through the JetStream object store.

use std::time::Duration;

use async_nats::jetstream;
use cedana_protocol::{self as protocol, Command, CommandEnvelope, Event, EventEnvelope, Reply};
use cedana_tests::*;
use futures::StreamExt;

struct Driver {
    js: jetstream::Context,
    events: async_nats::Subscriber,
    /// Events read while waiting for others, in order.
    seen: std::collections::VecDeque<EventEnvelope>,
    job: String,
}

impl Driver {
    async fn connect(nats: &NatsServer, job: &str) -> Self {
        let client = async_nats::ConnectOptions::with_token(nats.token.clone())
            .connect(nats.url())
            .await
            .expect("connect");
        let events = client
            .subscribe(format!("CEDANA.{job}.>"))
            .await
            .expect("subscribe");
        Driver {
            js: jetstream::new(client),
            events,
            seen: Default::default(),
            job: job.into(),
        }
    }

    async fn wait_registered(&self, worker: &str) -> serde_json::Value {
        let key = format!("{}.{worker}", self.job);
        for _ in 0..200 {
            if let Ok(kv) = self.js.get_key_value(protocol::WORKERS_BUCKET).await {
                if let Ok(Some(v)) = kv.get(&key).await {
                    return serde_json::from_slice(&v).unwrap();
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("worker {key} did not register");
    }

    async fn send(&self, worker: &str, id: &str, command: Command) {
        let env = CommandEnvelope {
            v: protocol::VERSION,
            id: id.into(),
            command,
        };
        self.js
            .publish(
                protocol::commands_subject(&self.job, worker),
                serde_json::to_vec(&env).unwrap().into(),
            )
            .await
            .expect("publish")
            .await
            .expect("JetStream ack");
    }

    /// The next event satisfying `want` (earlier events that did not are kept for later
    /// calls; `want` sees each event at most once), within `secs`.
    async fn next(
        &mut self,
        secs: u64,
        mut want: impl FnMut(&EventEnvelope) -> bool,
    ) -> EventEnvelope {
        let mut kept = std::collections::VecDeque::new();
        while let Some(e) = self.seen.pop_front() {
            if want(&e) {
                kept.extend(self.seen.drain(..));
                self.seen = kept;
                return e;
            }
            kept.push_back(e);
        }
        self.seen = kept;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let msg = tokio::time::timeout_at(deadline, self.events.next())
                .await
                .expect("timed out waiting for an event")
                .expect("subscription open");
            if msg.subject.ends_with(".commands") {
                continue;
            }
            let env: EventEnvelope = protocol::decode(&msg.payload).expect("event decodes");
            if want(&env) {
                return env;
            }
            self.seen.push_back(env);
        }
    }

    async fn reply(&mut self, id: &str, secs: u64) -> Reply {
        match self
            .next(
                secs,
                |e| matches!(&e.event, Event::Reply { id: i, .. } if i == id),
            )
            .await
            .event
        {
            Event::Reply { reply, .. } => reply,
            _ => unreachable!(),
        }
    }

    async fn call(&mut self, worker: &str, id: &str, command: Command, secs: u64) -> Reply {
        self.send(worker, id, command).await;
        self.reply(id, secs).await
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn wrong_or_missing_token_is_refused() {
    let nats = NatsServer::start();
    let sb = Sandbox::new();
    let mut d = AgentDaemon::start(&nats, "not-the-token", "job1", "w1", &sb.path().join("w1"));
    assert_eq!(
        d.wait_exit(Duration::from_secs(20)),
        Some(6),
        "{}",
        d.stderr()
    );
    assert!(d.stderr().contains("refused the token"), "{}", d.stderr());
    assert!(
        !d.stderr().contains(&nats.token),
        "the token never shows in logs"
    );
    let mut d = AgentDaemon::start(&nats, "", "job1", "w1", &sb.path().join("w1"));
    assert_eq!(
        d.wait_exit(Duration::from_secs(20)),
        Some(3),
        "{}",
        d.stderr()
    );
    assert!(d.stderr().contains("no NATS token"), "{}", d.stderr());
}

#[test]
fn registers_and_runs_each_command_id_once() {
    if !criu_ready("registers_and_runs_each_command_id_once") {
        return;
    }
    let nats = NatsServer::start();
    let sb = Sandbox::new();
    let work = sb.path().join("w1");
    let _d = AgentDaemon::start(&nats, &nats.token, "job1", "w1", &work);
    rt().block_on(async {
        let mut drv = Driver::connect(&nats, "job1").await;
        let rec = drv.wait_registered("w1").await;
        assert_eq!(rec["agent_version"], env!("CARGO_PKG_VERSION"));
        assert!(rec["criu_version"].as_str().unwrap().starts_with('4'));
        let append = Command::Sh {
            cmd: "echo run >> runs.txt; wc -l < runs.txt".into(),
            timeout_secs: Some(10),
        };
        let first = drv.call("w1", "c1", append.clone(), 20).await;
        assert_eq!(
            first,
            Reply::Sh {
                exit_code: 0,
                stdout: "1\n".into(),
                stderr: String::new()
            }
        );
        let again = drv.call("w1", "c1", append.clone(), 20).await;
        assert_eq!(again, first, "a repeated id gets the first reply");
        assert_eq!(
            std::fs::read_to_string(work.join("runs.txt")).unwrap(),
            "run\n",
            "and is not run again"
        );
        let other = drv.call("w1", "c2", append, 20).await;
        assert!(
            matches!(other, Reply::Sh { ref stdout, .. } if stdout == "2\n"),
            "{other:?}"
        );
        let failing = drv
            .call(
                "w1",
                "c3",
                Command::Sh {
                    cmd: "echo oops >&2; exit 7".into(),
                    timeout_secs: None,
                },
                20,
            )
            .await;
        assert_eq!(
            failing,
            Reply::Sh {
                exit_code: 7,
                stdout: String::new(),
                stderr: "oops\n".into()
            }
        );
        let hb = drv
            .next(10, |e| matches!(e.event, Event::Heartbeat { .. }))
            .await;
        assert_eq!(hb.worker, "w1");
    });
}

#[test]
fn task_output_and_exit_code_are_reported() {
    if !criu_ready("task_output_and_exit_code_are_reported") {
        return;
    }
    let nats = NatsServer::start();
    let sb = Sandbox::new();
    let _d = AgentDaemon::start(&nats, &nats.token, "job2", "w1", &sb.path().join("w1"));
    rt().block_on(async {
        let mut drv = Driver::connect(&nats, "job2").await;
        drv.wait_registered("w1").await;
        let r = drv
            .call(
                "w1",
                "s1",
                Command::Spawn {
                    task: "t1".into(),
                    cmd: "echo hello; sleep 0.3; echo bye; exit 3".into(),
                    userns: false,
                },
                20,
            )
            .await;
        assert!(
            matches!(r, Reply::Spawned { ref task, pid } if task == "t1" && pid > 0),
            "{r:?}"
        );
        let mut logs = String::new();
        let exit = drv
            .next(20, |e| match &e.event {
                Event::Log { task, data } if task == "t1" => {
                    logs.push_str(data);
                    false
                }
                Event::TaskExited { task, .. } => task == "t1",
                _ => false,
            })
            .await;
        assert_eq!(
            exit.event,
            Event::TaskExited {
                task: "t1".into(),
                code: Some(3),
                signal: None,
                restore_failed: None,
            }
        );
        assert_eq!(logs, "hello\nbye\n");
    });
}

#[test]
fn commands_sent_while_the_daemon_is_away_are_served_when_it_returns() {
    if !criu_ready("commands_sent_while_the_daemon_is_away_are_served_when_it_returns") {
        return;
    }
    let nats = NatsServer::start();
    let sb = Sandbox::new();
    let work = sb.path().join("w1");
    let d = AgentDaemon::start(&nats, &nats.token, "job3", "w1", &work);
    rt().block_on(async {
        let mut drv = Driver::connect(&nats, "job3").await;
        drv.wait_registered("w1").await;
        drop(d);
        drv.send(
            "w1",
            "late",
            Command::Sh {
                cmd: "echo served".into(),
                timeout_secs: None,
            },
        )
        .await;
        let _d = AgentDaemon::start(&nats, &nats.token, "job3", "w1", &work);
        let r = drv.reply("late", 30).await;
        assert!(
            matches!(r, Reply::Sh { ref stdout, .. } if stdout == "served\n"),
            "{r:?}"
        );
    });
}

/// A counter checkpointed on one worker and restored on another through the object store
/// counts on with no gap and no repeat.
/// Output the way tasks really write it: a burst of 300,003 lines (2 MB at once, over NATS's
/// 1 MiB message limit) and a 3 MB line with no newline, then a progress bar's `\r`. Every
/// byte reaches the driver, in events of at most 128 KiB, and the exit comes right after.
#[test]
fn bursts_and_endless_lines_reach_the_driver_whole() {
    if !criu_ready("bursts_and_endless_lines_reach_the_driver_whole") {
        return;
    }
    let nats = NatsServer::start();
    let sb = Sandbox::new();
    let _d = AgentDaemon::start(&nats, &nats.token, "job2b", "w1", &sb.path().join("w1"));
    rt().block_on(async {
        let mut drv = Driver::connect(&nats, "job2b").await;
        drv.wait_registered("w1").await;
        let cmd =
            "seq 1 300003; head -c 3000000 /dev/zero | tr '\\0' a; printf 'tail\\n10%%\\r20%%\\r'";
        let r = drv
            .call(
                "w1",
                "s1",
                Command::Spawn {
                    task: "big".into(),
                    cmd: cmd.into(),
                    userns: false,
                },
                20,
            )
            .await;
        assert!(matches!(r, Reply::Spawned { .. }), "{r:?}");
        let mut logs = String::new();
        let mut largest = 0;
        let exit = drv
            .next(60, |e| match &e.event {
                Event::Log { task, data } if task == "big" => {
                    largest = largest.max(data.len());
                    logs.push_str(data);
                    false
                }
                Event::TaskExited { task, .. } => task == "big",
                _ => false,
            })
            .await;
        assert!(
            matches!(exit.event, Event::TaskExited { code: Some(0), .. }),
            "{:?}",
            exit.event
        );
        assert!(largest <= 128 << 10, "an event carried {largest} bytes");
        let lines: Vec<&str> = logs.split('\n').collect();
        assert_eq!(lines.len(), 300_003 + 2, "lines: {}", lines.len());
        for (i, l) in lines[..300_003].iter().enumerate() {
            assert_eq!(*l, (i + 1).to_string(), "line {}", i + 1);
        }
        let long = lines[300_003];
        assert_eq!(long.len(), 3_000_000 + "tail".len());
        assert!(long.ends_with("aaatail") && long.bytes().take(3_000_000).all(|b| b == b'a'));
        assert_eq!(lines[300_004], "10%\r20%\r");
    });
}

#[test]
fn checkpoint_moves_a_task_between_workers() {
    if !criu_ready("checkpoint_moves_a_task_between_workers") {
        return;
    }
    let nats = NatsServer::start();
    let sb = Sandbox::new();
    // Both workers use one folder: restored tasks reopen their files by path, which on real
    // machines is the same job folder on every worker.
    let work = sb.path().join("job");
    let _w1 = AgentDaemon::start(&nats, &nats.token, "job4", "w1", &work);
    let w2 = AgentDaemon::start(&nats, &nats.token, "job4", "w2", &work);
    let log = work.join("counter.log");
    rt().block_on(async {
        let mut drv = Driver::connect(&nats, "job4").await;
        drv.wait_registered("w1").await;
        drv.wait_registered("w2").await;
        let cmd = "i=0; while :; do i=$((i+1)); echo $i; sleep 0.001; done";
        let r = drv
            .call(
                "w1",
                "spawn",
                Command::Spawn {
                    task: "counter".into(),
                    cmd: cmd.into(),
                    userns: false,
                },
                20,
            )
            .await;
        assert!(matches!(r, Reply::Spawned { .. }), "{r:?}");
        tokio::time::sleep(Duration::from_millis(700)).await;
        // As the driver moves a task: w2 reads the checkpoint while w1 stores it.
        let chunks = protocol::new_chunks_id();
        let r = drv
            .call(
                "w2",
                "pre",
                Command::Prefetch {
                    chunks: chunks.clone(),
                },
                20,
            )
            .await;
        assert!(matches!(r, Reply::Prefetching { .. }), "{r:?}");
        let r = drv
            .call(
                "w1",
                "ckpt",
                Command::Checkpoint {
                    task: "counter".into(),
                    leave_running: false,
                    compression: cedana_agent::Compression::Zstd,
                    chunks: Some(chunks),
                    criu: None,
                    post_copy: false,
                },
                60,
            )
            .await;
        let Reply::Checkpointed { object, bytes, .. } = r else {
            panic!("{r:?}")
        };
        assert!(
            object.starts_with("job4/sh_") && bytes > 0,
            "{object} {bytes}"
        );
        let at = numbers(&log).len();
        assert!(at >= 5);
        let r = drv
            .call(
                "w2",
                "rst",
                Command::Restore {
                    task: "counter".into(),
                    object,
                    pending: false,
                    manifest: None,
                },
                60,
            )
            .await;
        assert!(
            matches!(
                r,
                Reply::Restored {
                    read_while_stored: true,
                    ..
                }
            ),
            "w2 restores what it read while w1 stored it: {r:?}\n{}",
            w2.stderr()
        );
        let on_w2 = drv
            .next(20, |e| {
                e.worker == "w2" && matches!(&e.event, Event::Log { task, .. } if task == "counter")
            })
            .await;
        assert_eq!(on_w2.worker, "w2", "w2 streams the restored task's output");
        // From the first line the restored task wrote: it used to be lost when the task wrote
        // it before the daemon had measured the log.
        let Event::Log { data, .. } = &on_w2.event else {
            unreachable!()
        };
        let first: usize = data
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("a number first: {data:?}"));
        assert_eq!(
            first,
            at + 1,
            "w2's first output after the restore follows the checkpoint's last line {at}: {data:?}"
        );
        wait_for_numbers(&log, at + 10);
        let r = drv
            .call(
                "w2",
                "stop",
                Command::Stop {
                    task: "counter".into(),
                },
                20,
            )
            .await;
        assert_eq!(
            r,
            Reply::Stopped {
                task: "counter".into()
            }
        );
        let exit = drv
            .next(
                20,
                |e| matches!(&e.event, Event::TaskExited { task, .. } if task == "counter"),
            )
            .await;
        assert_eq!(
            exit.worker, "w2",
            "w1 does not report the checkpointed task as exited"
        );
    });
    assert_unbroken(&numbers(&log), "counter moved from w1 to w2");
}

/// The checkpoint store as another client sees it.
async fn store(drv: &Driver) -> jetstream::object_store::ObjectStore {
    drv.js
        .get_object_store(protocol::CHECKPOINTS_BUCKET)
        .await
        .expect("checkpoint store")
}

/// Whole object, read with async-nats's own `get` (which checks the object's digest).
async fn get_object(drv: &Driver, name: &str) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut obj = store(drv).await.get(name).await.expect("object exists");
    let mut bytes = Vec::new();
    obj.read_to_end(&mut bytes)
        .await
        .expect("object reads whole");
    bytes
}

/// Entries left in a worker's checkpoint folder (staging, downloads): none after a command.
fn checkpoint_leftovers(work: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(work.join(cedana_agent::daemon::CHECKPOINTS_DIR))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Checkpoints stream into the object store and come back out of it verified as they arrive:
/// what the daemon stored is a plain object another client reads (digest and all) and a valid
/// archive; a tampered copy (its per-entry checksum wrong, its object digest right) and an
/// object whose bytes do not match its digest are refused after streaming, with the task not
/// restored, the carried files not put back and no staging left; the genuine one then moves
/// the counter on.
#[test]
fn bad_objects_are_refused_and_change_nothing() {
    if !criu_ready("bad_objects_are_refused_and_change_nothing") {
        return;
    }
    let nats = NatsServer::start();
    let sb = Sandbox::new();
    let work = sb.path().join("job");
    let _w1 = AgentDaemon::start(&nats, &nats.token, "job5", "w1", &work);
    let _w2 = AgentDaemon::start(&nats, &nats.token, "job5", "w2", &work);
    let log = work.join("counter.log");
    let marker = work.join("marker.txt");
    rt().block_on(async {
        let mut drv = Driver::connect(&nats, "job5").await;
        drv.wait_registered("w1").await;
        drv.wait_registered("w2").await;
        std::fs::create_dir_all(&work).unwrap();
        std::fs::write(&marker, "as checkpointed").unwrap();
        let cmd = "i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done";
        let r = drv
            .call(
                "w1",
                "spawn",
                Command::Spawn {
                    task: "counter".into(),
                    cmd: cmd.into(),
                    userns: false,
                },
                20,
            )
            .await;
        assert!(matches!(r, Reply::Spawned { .. }), "{r:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let r = drv
            .call(
                "w1",
                "ckpt",
                Command::Checkpoint {
                    task: "counter".into(),
                    leave_running: false,
                    compression: cedana_agent::Compression::None,
                    chunks: None,
                    criu: None,
                    post_copy: false,
                },
                60,
            )
            .await;
        let Reply::Checkpointed {
            object,
            bytes,
            manifest,
            ..
        } = r
        else {
            panic!("{r:?}")
        };
        let manifest = manifest.expect("the checkpoint's manifest SHA-256");
        std::fs::write(&marker, "changed since").unwrap();
        assert!(
            checkpoint_leftovers(&work).is_empty(),
            "{:?}",
            checkpoint_leftovers(&work)
        );

        // Another client reads it whole, and it is an archive like any other.
        let good = get_object(&drv, &object).await;
        assert_eq!(good.len() as u64, bytes);
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(good.clone())).unwrap();
        let pages = (0..zip.len())
            .filter_map(|i| {
                let f = zip.by_index(i).unwrap();
                f.name()
                    .starts_with("images/pages-")
                    .then(|| (f.data_start(), f.size()))
            })
            .max_by_key(|(_, size)| *size)
            .expect("a page image");
        assert!(zip.by_name("manifest.json").is_ok());

        // A byte of the page image changed, stored as a new object with the same metadata
        // (its digest matches its bytes).
        let mut info = store(&drv).await.info(&object).await.unwrap();
        let mut forged = good.clone();
        forged[(pages.0 + pages.1 / 2) as usize] ^= 0x40;
        let meta = jetstream::object_store::ObjectMetadata {
            name: "job5/forged.zip".into(),
            metadata: info.metadata.clone(),
            ..Default::default()
        };
        store(&drv)
            .await
            .put(meta, &mut std::io::Cursor::new(forged))
            .await
            .unwrap();
        // The genuine chunks under an info whose size is not theirs. (A restore does not
        // recompute the object's SHA-256: it checks each entry's, and the size.)
        info.name = "job5/wrong-size.zip".into();
        info.size -= 1;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Rollup", "sub");
        let subject = {
            use base64::Engine;
            format!(
                "$O.{}.M.{}",
                protocol::CHECKPOINTS_BUCKET,
                base64::engine::general_purpose::URL_SAFE.encode(&info.name)
            )
        };
        drv.js
            .publish_with_headers(subject, headers, serde_json::to_vec(&info).unwrap().into())
            .await
            .unwrap()
            .await
            .unwrap();

        // A whole, valid checkpoint of another process put in the checkpoint's place (what
        // anyone who may write the bucket can do): refused by the manifest's SHA-256 its
        // worker reported.
        let other = sb.exec("other.log", &["sleep", "100"]);
        let other_zip = sb.dump(other.pid, &[]);
        let meta = jetstream::object_store::ObjectMetadata {
            name: "job5/replaced.zip".into(),
            ..Default::default()
        };
        store(&drv)
            .await
            .put(
                meta,
                &mut std::io::Cursor::new(std::fs::read(&other_zip).unwrap()),
            )
            .await
            .unwrap();

        let before = numbers(&log).len();
        for (id, bad, why, pin) in [
            ("rst-forged", "job5/forged.zip", "CRC-32", None),
            ("rst-size", "job5/wrong-size.zip", "its info says", None),
            (
                "rst-replaced",
                "job5/replaced.zip",
                "replaced after it was stored",
                Some(manifest.clone()),
            ),
        ] {
            let r = drv
                .call(
                    "w2",
                    id,
                    Command::Restore {
                        task: "counter".into(),
                        object: bad.into(),
                        pending: false,
                        manifest: pin,
                    },
                    60,
                )
                .await;
            match &r {
                Reply::Error { message } => {
                    assert!(message.contains(bad) && message.contains(why), "{message}")
                }
                other => panic!("{bad} was restored: {other:?}"),
            }
            assert!(
                checkpoint_leftovers(&work).is_empty(),
                "{bad}: {:?}",
                checkpoint_leftovers(&work)
            );
            assert_eq!(
                std::fs::read_to_string(&marker).unwrap(),
                "changed since",
                "{bad}: carried files were put back"
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(numbers(&log).len(), before, "no counter runs");

        let r = drv
            .call(
                "w2",
                "rst",
                Command::Restore {
                    task: "counter".into(),
                    object,
                    pending: false,
                    manifest: Some(manifest),
                },
                60,
            )
            .await;
        assert!(matches!(r, Reply::Restored { .. }), "{r:?}");
        assert_eq!(std::fs::read_to_string(&marker).unwrap(), "as checkpointed");
        wait_for_numbers(&log, before + 10);
        assert!(
            checkpoint_leftovers(&work).is_empty(),
            "{:?}",
            checkpoint_leftovers(&work)
        );
        let r = drv
            .call(
                "w2",
                "stop",
                Command::Stop {
                    task: "counter".into(),
                },
                20,
            )
            .await;
        assert!(matches!(r, Reply::Stopped { .. }), "{r:?}");
    });
    assert_unbroken(&numbers(&log), "counter moved from w1 to w2");
}

/// An archive written by `cedana-agent dump` to a file (stored entries of unknown size, as
/// every archive before streaming had) and put into the store by another client still
/// restores through the daemon: it is downloaded, then read from the file.
#[test]
fn archives_that_cannot_stream_still_restore() {
    if !criu_ready("archives_that_cannot_stream_still_restore") {
        return;
    }
    let nats = NatsServer::start();
    let sb = Sandbox::new();
    let _w2 = AgentDaemon::start(&nats, &nats.token, "job6", "w2", &sb.path().join("w2"));
    let task = sb.exec(
        "counter.log",
        &[
            "sh",
            "-c",
            "i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done",
        ],
    );
    let log = sb.path().join("counter.log");
    wait_for_numbers(&log, 5);
    let archive = sb.dump(task.pid, &["--compress", "none"]);
    wait_until(Duration::from_secs(10), "dumped task gone", || {
        !task.alive()
    });
    let at = numbers(&log).len();
    rt().block_on(async {
        let mut drv = Driver::connect(&nats, "job6").await;
        drv.wait_registered("w2").await;
        let mut f = tokio::fs::File::open(&archive).await.unwrap();
        store(&drv).await.put("job6/old.zip", &mut f).await.unwrap();
        let r = drv
            .call(
                "w2",
                "rst",
                Command::Restore {
                    task: "counter".into(),
                    object: "job6/old.zip".into(),
                    pending: false,
                    manifest: None,
                },
                60,
            )
            .await;
        let Reply::Restored { pid, .. } = r else {
            panic!("{r:?}")
        };
        wait_for_numbers(&log, at + 10);
        assert!(checkpoint_leftovers(&sb.path().join("w2")).is_empty());
        let _restored = Task::new(pid);
    });
    assert_unbroken(
        &numbers(&log),
        "counter restored from an object put by another client",
    );
}

/// The object store writer on its own: an upload abandoned part way leaves no chunks in the
/// stream; committed ones never replace an object (a taken name gets `_1`, a deleted one is
/// reused) and read back whole through async-nats's `get`.
#[test]
fn uploads_never_replace_objects_and_abandoned_ones_leave_nothing() {
    let nats = NatsServer::start();
    rt().block_on(async {
        let drv = Driver::connect(&nats, "job7").await;
        let os = cedana_protocol::ensure_checkpoints(&drv.js, protocol::CHECKPOINTS_BUCKET)
            .await
            .unwrap();
        let bucket =
            cedana_agent::objstore::Bucket::open(&drv.js, os, protocol::CHECKPOINTS_BUCKET)
                .await
                .unwrap();
        let mut stream = drv
            .js
            .get_stream(format!("OBJ_{}", protocol::CHECKPOINTS_BUCKET))
            .await
            .unwrap();
        let data = |seed: u8| -> Vec<u8> {
            (0..(3 << 20) + 777)
                .map(|i: u32| (i as u8).wrapping_mul(seed))
                .collect()
        };
        let upload = |stem: &'static str, bytes: Vec<u8>, commit: bool| {
            let (up, done) = bucket.upload("job7", Default::default(), None);
            let task = tokio::task::spawn_blocking(move || {
                use cedana_agent::zipfmt::Sink;
                use std::io::Write;
                let mut up: Box<dyn Sink> = Box::new(up);
                up.write_all(&bytes).unwrap();
                commit.then(|| up.commit(stem, &[]).unwrap())
            });
            async move {
                let name = task.await.unwrap();
                done.await.unwrap();
                name
            }
        };
        assert_eq!(upload("abandoned", data(3), false).await, None);
        let mut info = stream.info().await.unwrap().clone();
        assert_eq!(
            info.state.messages, 0,
            "chunks of an abandoned upload remain"
        );

        let a = upload("x", data(5), true).await.unwrap();
        let b = upload("x", data(7), true).await.unwrap();
        assert_eq!((a.as_str(), b.as_str()), ("job7/x.zip", "job7/x_1.zip"));
        assert_eq!(get_object(&drv, &a).await, data(5));
        assert_eq!(get_object(&drv, &b).await, data(7));
        store(&drv).await.delete(&a).await.unwrap();
        let c = upload("x", data(9), true).await.unwrap();
        assert_eq!(c, "job7/x.zip", "a deleted name is free again");
        assert_eq!(get_object(&drv, &c).await, data(9));
        assert_eq!(get_object(&drv, &b).await, data(7));
        info = stream.info().await.unwrap().clone();
        assert!(info.state.messages > 0);
    });
}

/// An archive read while it is stored (`Command::Prefetch`'s path): stored entries of unknown
/// size whose data ends exactly at a chunk's end, just before it, in the middle, or is empty,
/// and one handed over as one large piece, all come out whole. A follower handed the info of
/// another object, or none, stops with an error.
#[test]
fn archives_are_read_while_they_are_stored() {
    use cedana_agent::objstore::{self, Bucket};
    use cedana_agent::zipfmt::read::{self as zipin, Place};
    use cedana_agent::zipfmt::write::{Output, ZipOut};

    let nats = NatsServer::start();
    rt().block_on(async {
        let drv = Driver::connect(&nats, "job8").await;
        let os = cedana_protocol::ensure_checkpoints(&drv.js, protocol::CHECKPOINTS_BUCKET)
            .await
            .unwrap();
        let bucket = Bucket::open(&drv.js, os, protocol::CHECKPOINTS_BUCKET)
            .await
            .unwrap();
        let chunk = objstore::MAX_CHUNK as u64;
        let chunks = protocol::new_chunks_id();
        let follow = bucket.follow(&chunks);
        let (tx, mut rx) = follow.channel(true);
        let (info_tx, info_rx) = tokio::sync::oneshot::channel();
        let pump = tokio::spawn(follow.pump(info_rx, tx));
        let reader = tokio::task::spawn_blocking(move || {
            let mut place = |_: &zipin::LocalHeader| Ok(Place::Memory(16 << 20));
            zipin::read(
                &mut rx,
                std::path::Path::new("followed"),
                &Default::default(),
                &mut place,
                &cedana_agent::progress::NoProgress,
            )
        });

        let (up, stored) = bucket.upload("job8", Default::default(), Some(chunks.clone()));
        let writer = tokio::task::spawn_blocking(move || {
            let mut zip = ZipOut::to(Output::Sink(Box::new(up)));
            let mut written = Vec::new();
            // Data ends: at a chunk's end, 3 bytes before one (the descriptor straddles it),
            // mid-chunk, nothing at all, and a 1 MiB piece handed over whole.
            let names = [
                "at-boundary",
                "before-boundary",
                "mid-chunk",
                "empty",
                "large-piece",
            ];
            for (i, name) in names.iter().enumerate() {
                zip.begin_entry(name, 0).unwrap();
                let pos = zip.position();
                let n = match *name {
                    "at-boundary" => 2 * chunk - pos % chunk,
                    "before-boundary" => 2 * chunk - pos % chunk - 3,
                    "mid-chunk" => 1000,
                    "empty" => 0,
                    _ => 1 << 20,
                } as usize;
                let data: Vec<u8> = (0..n).map(|j| (j * 31 + i * 7) as u8).collect();
                let mut crc = crc32fast::Hasher::new();
                crc.update(&data);
                if *name == "large-piece" {
                    zip.data_bytes(bytes::Bytes::from(data.clone())).unwrap();
                } else {
                    // In pieces, with pauses, so the reader waits for data more than once.
                    for piece in data.chunks(50_000) {
                        std::io::Write::write_all(&mut zip.data(), piece).unwrap();
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                zip.end_entry(crc.finalize(), n as u64, n as u64).unwrap();
                if *name == "at-boundary" {
                    assert_eq!(zip.position() % chunk, 24, "the data ends at a chunk's end");
                }
                written.push((name.to_string(), data));
            }
            let (out, _) = zip.finish().unwrap();
            let Output::Sink(sink) = out else {
                unreachable!()
            };
            // No sizes in the object's info: the reader may only use the chunks' headers.
            let name = sink.commit("followed", &[]).unwrap();
            (name, written)
        });
        let (name, written) = writer.await.unwrap();
        stored.await.unwrap();
        let info = bucket.fetch(&name).await.unwrap().info;
        assert_eq!(info.nuid, chunks);
        info_tx.send(info.clone()).unwrap();
        let bytes = pump.await.unwrap().unwrap();
        assert_eq!(bytes, info.size as u64);
        let listing = reader.await.unwrap().unwrap();
        let read: Vec<(String, Vec<u8>)> = listing
            .entries
            .into_iter()
            .map(|e| (e.name, e.data.unwrap_or_default()))
            .collect();
        assert_eq!(read.len(), written.len());
        for ((rn, rd), (wn, wd)) in read.iter().zip(&written) {
            assert_eq!(rn, wn);
            assert!(
                rd == wd,
                "entry {wn} differs ({} bytes read, {} written)",
                rd.len(),
                wd.len()
            );
        }

        // The same chunks again, checked against a digest that is not theirs: refused at the end.
        let follow = bucket.follow(&chunks);
        let (tx, mut rx) = follow.channel(true);
        let (info_tx, info_rx) = tokio::sync::oneshot::channel();
        let pump = tokio::spawn(follow.pump(info_rx, tx));
        let mut wrong = info.clone();
        wrong.digest = Some(format!("SHA-256={}", "A".repeat(43) + "="));
        info_tx.send(wrong).unwrap();
        let drained = tokio::task::spawn_blocking(move || {
            use cedana_agent::zipfmt::ChunkSource;
            while rx.next_chunk()?.is_some() {}
            Ok::<_, std::io::Error>(())
        });
        pump.await.unwrap().unwrap();
        let e = drained.await.unwrap().unwrap_err().to_string();
        assert!(e.contains("wrong digest"), "{e}");

        // The info of another object: refused. No info at all: the reading stops.
        let other = protocol::new_chunks_id();
        let follow = bucket.follow(&other);
        let (tx, _rx) = follow.channel(true);
        let (info_tx, info_rx) = tokio::sync::oneshot::channel();
        let pump = tokio::spawn(follow.pump(info_rx, tx));
        info_tx.send(info.clone()).unwrap();
        let e = pump.await.unwrap().unwrap_err().to_string();
        assert!(e.contains("is not the checkpoint with chunks"), "{e}");
        let follow = bucket.follow(&other);
        let (tx, _rx) = follow.channel(true);
        let (info_tx, info_rx) =
            tokio::sync::oneshot::channel::<async_nats::jetstream::object_store::ObjectInfo>();
        let pump = tokio::spawn(follow.pump(info_rx, tx));
        drop(info_tx);
        let e = pump.await.unwrap().unwrap_err().to_string();
        assert!(e.contains("no restore asked for it"), "{e}");
    });
}

/// A daemon killed with SIGKILL and started again takes back the task its previous run
/// started: the new daemon lists it, checkpoints it, and reports its exit with its code. A
/// daemon asked to stop (SIGTERM) ends at once and leaves its task running for the next.
#[test]
fn a_restarted_daemon_takes_back_its_tasks() {
    if !criu_ready("a_restarted_daemon_takes_back_its_tasks") {
        return;
    }
    let nats = NatsServer::start();
    let sb = Sandbox::new();
    let work = sb.path().join("w1");
    let mut d = AgentDaemon::start(&nats, &nats.token, "job9", "w1", &work);
    rt().block_on(async {
        let mut drv = Driver::connect(&nats, "job9").await;
        drv.wait_registered("w1").await;
        let r = drv
            .call(
                "w1",
                "s1",
                Command::Spawn {
                    task: "t1".into(),
                    cmd: "i=0; while [ $i -lt 60 ]; do i=$((i+1)); echo $i >> n.txt; echo line $i; sleep 0.1; done; exit 5".into(),
                    userns: false,
                },
                20,
            )
            .await;
        let Reply::Spawned { pid, .. } = r else {
            panic!("{r:?}")
        };
        let task = Task::new(pid);
        wait_for_numbers(&work.join("n.txt"), 5);
        let _ = d.child.kill();
        let _ = d.child.wait();
        assert!(task.alive(), "the task died with its agent");

        let mut d2 = AgentDaemon::start(&nats, &nats.token, "job9", "w1", &work);
        // A command can reach the killed run's outstanding pull request (the server has not
        // dropped it yet): it comes back to the new run once its ack wait (20 s) is over.
        let r = drv.call("w1", "p1", Command::Ping, 90).await;
        let Reply::Pong { tasks, .. } = r else {
            panic!("{r:?}")
        };
        assert_eq!(
            tasks,
            vec![protocol::RunningTask {
                task: "t1".into(),
                pid
            }],
            "{}",
            d2.stderr()
        );
        let r = drv
            .call(
                "w1",
                "c1",
                Command::Checkpoint {
                    task: "t1".into(),
                    leave_running: true,
                    compression: protocol::Compression::Zstd,
                    chunks: None,
                    criu: None,
                    post_copy: false,
                },
                60,
            )
            .await;
        assert!(matches!(r, Reply::Checkpointed { .. }), "{r:?}");
        assert!(task.alive());
        // Asked to stop, the daemon ends at once; the task runs on.
        let t0 = std::time::Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(d2.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        d2.wait_exit(Duration::from_secs(10));
        let stopped_in = t0.elapsed();
        assert!(
            stopped_in < Duration::from_secs(3),
            "SIGTERM took {stopped_in:?}"
        );
        assert!(task.alive(), "the task died with the stopped agent");

        let _d3 = AgentDaemon::start(&nats, &nats.token, "job9", "w1", &work);
        let mut lines = String::new();
        let exit = drv
            .next(60, |e| match &e.event {
                Event::Log { task, data } if task == "t1" => {
                    lines.push_str(data);
                    false
                }
                Event::TaskExited { task, .. } => task == "t1",
                _ => false,
            })
            .await;
        assert_eq!(
            exit.event,
            Event::TaskExited {
                task: "t1".into(),
                code: Some(5),
                signal: None,
                restore_failed: None,
            }
        );
        assert!(lines.contains("line 60\n"), "{lines}");
        assert_unbroken(&numbers(&work.join("n.txt")), "the task's count");
    });
}

/// Tasks and `sh` commands get no secret of the agent's: the NATS token is in neither's
/// environment (the daemon got it in its own).
#[test]
fn tasks_and_commands_do_not_get_the_nats_token() {
    if !criu_ready("tasks_and_commands_do_not_get_the_nats_token") {
        return;
    }
    let nats = NatsServer::start();
    let sb = Sandbox::new();
    let work = sb.path().join("w1");
    let _d = AgentDaemon::start(&nats, &nats.token, "jobt", "w1", &work);
    rt().block_on(async {
        let mut drv = Driver::connect(&nats, "jobt").await;
        drv.wait_registered("w1").await;
        let r = drv
            .call(
                "w1",
                "s1",
                Command::Sh {
                    cmd: "env; cat /proc/self/environ | tr '\\0' '\\n'".into(),
                    timeout_secs: Some(30),
                },
                30,
            )
            .await;
        let Reply::Sh { stdout, .. } = r else {
            panic!("{r:?}")
        };
        assert!(stdout.contains("PATH="), "{stdout}");
        assert!(!stdout.contains(&nats.token), "a sh command got the token");
        assert!(!stdout.contains("CEDANA_NATS_TOKEN"), "{stdout}");
        let r = drv
            .call(
                "w1",
                "s2",
                Command::Spawn {
                    task: "t1".into(),
                    cmd: "env > env.txt; sleep 30".into(),
                    userns: false,
                },
                30,
            )
            .await;
        let Reply::Spawned { pid, .. } = r else {
            panic!("{r:?}")
        };
        let _task = Task::new(pid);
        wait_until(Duration::from_secs(10), "the task's env", || {
            std::fs::metadata(work.join("env.txt")).is_ok_and(|m| m.len() > 0)
        });
        let env = std::fs::read_to_string(work.join("env.txt")).unwrap();
        assert!(!env.contains(&nats.token), "the task got the token");
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        assert!(
            !String::from_utf8_lossy(&environ).contains(&nats.token),
            "the task's initial environment holds the token"
        );
    });
}

/// The lease: a daemon that cannot reach NATS for longer than its lease freezes its task (not
/// killed); killed while it is frozen and started again once NATS is back, the next run takes
/// the frozen task back and thaws it after renewing the lease (it was not revoked).
#[test]
fn a_task_frozen_by_its_lease_is_thawed_by_the_next_run() {
    if !criu_ready("a_task_frozen_by_its_lease_is_thawed_by_the_next_run") {
        return;
    }
    let nats = NatsServer::start();
    let sb = Sandbox::new();
    let work = sb.path().join("w1");
    let mut d = AgentDaemon::start(&nats, &nats.token, "jobl", "w1", &work);
    let pid = rt().block_on(async {
        let mut drv = Driver::connect(&nats, "jobl").await;
        drv.wait_registered("w1").await;
        let r = drv
            .call(
                "w1",
                "s1",
                Command::Spawn {
                    task: "t1".into(),
                    cmd: "i=0; while true; do i=$((i+1)); echo $i >> n.txt; sleep 0.1; done".into(),
                    userns: false,
                },
                20,
            )
            .await;
        let Reply::Spawned { pid, .. } = r else {
            panic!("{r:?}")
        };
        pid
    });
    let task = Task::new(pid);
    wait_for_numbers(&work.join("n.txt"), 5);
    let (token, port, store) = nats.stop();
    let state = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, r)| r.trim_start().chars().next())
            })
            .flatten()
    };
    wait_until(Duration::from_secs(30), "the task to be frozen", || {
        state(pid) == Some('T')
    });
    let n = numbers(&work.join("n.txt")).len();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        numbers(&work.join("n.txt")).len(),
        n,
        "a frozen task counts on"
    );
    let _ = d.child.kill();
    let _ = d.child.wait();
    let nats = NatsServer::start_with(token, port, store);
    let _d2 = AgentDaemon::start(&nats, &nats.token, "jobl", "w1", &work);
    wait_for_numbers(&work.join("n.txt"), n + 5);
    assert!(task.alive());
    assert_unbroken(&numbers(&work.join("n.txt")), "the count across the freeze");
}

/// A `sh` command that leaves a process in the background answers when the shell ends, not
/// when the background process does (it holds the output pipes); its output is bounded.
#[test]
fn sh_answers_when_the_shell_ends_and_its_output_is_bounded() {
    if !criu_ready("sh_answers_when_the_shell_ends") {
        return;
    }
    let nats = NatsServer::start();
    let sb = Sandbox::new();
    let work = sb.path().join("w1");
    let _d = AgentDaemon::start(&nats, &nats.token, "jobsh", "w1", &work);
    rt().block_on(async {
        let mut drv = Driver::connect(&nats, "jobsh").await;
        drv.wait_registered("w1").await;
        let t0 = std::time::Instant::now();
        let r = drv
            .call(
                "w1",
                "bg",
                Command::Sh {
                    cmd: "sleep 25.5 & echo x".into(),
                    timeout_secs: Some(60),
                },
                60,
            )
            .await;
        let took = t0.elapsed();
        assert!(
            matches!(&r, Reply::Sh { stdout, exit_code: 0, .. } if stdout == "x\n"),
            "{r:?}"
        );
        assert!(
            took < Duration::from_secs(10),
            "waited {took:?} for the background sleep"
        );
        let r = drv
            .call(
                "w1",
                "big",
                Command::Sh {
                    cmd: "head -c 3000000 /dev/zero | tr '\\0' a; echo; echo end".into(),
                    timeout_secs: Some(60),
                },
                60,
            )
            .await;
        let Reply::Sh { stdout, .. } = r else {
            panic!("{r:?}")
        };
        assert!(stdout.len() < 300 << 10, "{} bytes", stdout.len());
        assert!(stdout.starts_with('[') && stdout.contains("bytes before this were dropped"));
        assert!(stdout.ends_with("end\n"));
    });
    // The background sleep is the test's to end.
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            if c == b"sleep\x0025.5\x00" {
                if let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }
}

/// A task that rewrites a large file in place over and over (opened, written, closed: mostly
/// not open at the freeze) is checkpointed left running anyway: a try that linked the file
/// finds it changed since the freeze and is not kept, the daemon takes it again copying that
/// file while the task is stopped; and the carried file is whole (one version of it, not a mix).
#[test]
fn a_task_rewriting_a_large_file_in_place_is_checkpointed_anyway() {
    if !criu_ready("a_task_rewriting_a_large_file_in_place_is_checkpointed_anyway") {
        return;
    }
    let nats = NatsServer::start();
    let sb = Sandbox::new();
    let work = sb.path().join("job");
    std::fs::create_dir_all(&work).unwrap();
    let _w1 = AgentDaemon::start(&nats, &nats.token, "jobrw", "w1", &work);
    // 4 MiB of one repeated digit, rewritten in place with the next digit every few ms.
    let py = work.join("rw.py");
    std::fs::write(
        &py,
        "import time\nv = [str(d).encode() * (4 << 20) for d in range(10)]\nopen('big.bin', 'wb').write(v[0])\nn = 0\nwhile True:\n    n = (n + 1) % 10\n    with open('big.bin', 'r+b') as f:\n        f.write(v[n])\n    time.sleep(0.01)\n",
    )
    .unwrap();
    rt().block_on(async {
        let mut drv = Driver::connect(&nats, "jobrw").await;
        drv.wait_registered("w1").await;
        let r = drv
            .call(
                "w1",
                "spawn",
                Command::Spawn {
                    task: "rw".into(),
                    cmd: format!("exec python3 {}", py.display()),
                    userns: false,
                },
                20,
            )
            .await;
        assert!(matches!(r, Reply::Spawned { .. }), "{r:?}");
        let big = work.join("big.bin");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::fs::metadata(&big).map_or(true, |m| m.len() < 4 << 20) {
            assert!(
                std::time::Instant::now() < deadline,
                "big.bin never written"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A try that freezes the task while it has the file open copies it (no rewrite to
        // meet): checkpoints are taken until one linked it and met the rewrite, each one
        // checked whole.
        let log_file = work.with_extension("daemon.log");
        let met = || {
            std::fs::read_to_string(&log_file)
                .unwrap_or_default()
                .contains("written in place during the checkpoint")
        };
        for n in 0..10 {
            let r = drv
                .call(
                    "w1",
                    &format!("ckpt{n}"),
                    Command::Checkpoint {
                        task: "rw".into(),
                        leave_running: true,
                        compression: cedana_agent::Compression::Zstd,
                        chunks: None,
                        criu: None,
                        post_copy: false,
                    },
                    120,
                )
                .await;
            let Reply::Checkpointed { object, .. } = r else {
                panic!("checkpoint {n} failed: {r:?}")
            };
            // The carried file is one version: 4 MiB of a single digit.
            let archive = sb.path().join(format!("ckpt{n}.zip"));
            std::fs::write(&archive, get_object(&drv, &object).await).unwrap();
            let mut zip = zip::ZipArchive::new(std::fs::File::open(&archive).unwrap()).unwrap();
            let mut f = zip.by_name("files/big.bin").expect("big.bin carried");
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut bytes).unwrap();
            assert_eq!(bytes.len(), 4 << 20);
            assert!(
                bytes.iter().all(|b| *b == bytes[0]),
                "big.bin is a mix of versions in checkpoint {n}"
            );
            if met() {
                break;
            }
        }
    });
    // The daemon found it written in place and took the checkpoint again (the writer rewrites
    // it every 10 ms, while archiving takes longer).
    let log = std::fs::read_to_string(work.with_extension("daemon.log")).unwrap_or_default();
    assert!(
        log.contains("written in place during the checkpoint"),
        "no try met the rewrite: {log}"
    );
}

/// A worker with a checkpoint store restores lazily; a chunk of the task's memory damaged in
/// the store ends the restored task, and its exit says why (naming the chunk), so the driver
/// recovers from an earlier checkpoint instead of calling the task failed.
#[test]
fn a_lazy_restore_that_meets_a_damaged_chunk_ends_the_task_and_says_why() {
    if !criu_ready("a_lazy_restore_that_meets_a_damaged_chunk_ends_the_task_and_says_why") {
        return;
    }
    let nats = NatsServer::start();
    let sb = Sandbox::new();
    let work = sb.path().join("job");
    std::fs::create_dir_all(&work).unwrap();
    let store = sb.path().join("store");
    let store_s = store.to_str().unwrap();
    let _w1 = AgentDaemon::start_with(
        &nats,
        &nats.token,
        "joblz",
        "w1",
        &work,
        &["--store", store_s],
    );
    let work2 = sb.path().join("job2");
    std::fs::create_dir_all(&work2).unwrap();
    let w2 = AgentDaemon::start_with(
        &nats,
        &nats.token,
        "joblz",
        "w2",
        &work2,
        &["--store", store_s],
    );
    let py = work.join("mem.py");
    std::fs::write(
        &py,
        "import os, time\nbuf = bytearray(os.urandom(128 << 20))\nprint('ready', flush=True)\nwhile True:\n    time.sleep(0.1)\n    print(sum(buf[::4096]), flush=True)\n",
    )
    .unwrap();
    rt().block_on(async {
        let mut drv = Driver::connect(&nats, "joblz").await;
        drv.wait_registered("w1").await;
        drv.wait_registered("w2").await;
        let r = drv
            .call(
                "w1",
                "spawn",
                Command::Spawn {
                    task: "mem".into(),
                    cmd: format!("exec python3 {}", py.display()),
                    userns: false,
                },
                20,
            )
            .await;
        assert!(matches!(r, Reply::Spawned { .. }), "{r:?}");
        let log = work.join("mem.log");
        wait_until(Duration::from_secs(30), "the task to be ready", || {
            std::fs::read_to_string(&log).is_ok_and(|s| s.contains("ready"))
        });
        let r = drv
            .call(
                "w1",
                "ckpt",
                Command::Checkpoint {
                    task: "mem".into(),
                    leave_running: false,
                    compression: cedana_agent::Compression::Zstd,
                    chunks: None,
                    criu: None,
                    post_copy: false,
                },
                120,
            )
            .await;
        let Reply::Checkpointed { object, .. } = r else {
            panic!("the checkpoint failed: {r:?}")
        };
        // A chunk in the middle of the largest page image: the task's private memory.
        let victim = damage_a_page_chunk(&store, &object, |n| n / 2);

        let r = drv
            .call(
                "w2",
                "restore",
                Command::Restore {
                    task: "mem".into(),
                    object,
                    pending: false,
                    manifest: None,
                },
                120,
            )
            .await;
        assert!(
            matches!(r, Reply::Restored { lazy: true, .. }),
            "w2 restores lazily: {r:?}\n{}",
            w2.stderr()
        );
        let exit = drv
            .next(
                60,
                |e| matches!(&e.event, Event::TaskExited { task, .. } if task == "mem"),
            )
            .await;
        let Event::TaskExited {
            restore_failed: Some(why),
            ..
        } = &exit.event
        else {
            panic!("the exit says the restore failed: {exit:?}")
        };
        assert!(why.contains(&victim), "names the chunk {victim}: {why}");
        assert_eq!(exit.worker, "w2");
    });
}

/// A worker asked to restore in full (`--full-restore`) brings a store's checkpoint back with
/// its memory whole; once one of its chunks is damaged in the store, the same checkpoint is
/// refused naming the chunk, and no second task runs.
#[test]
fn a_full_restore_from_a_store_comes_back_whole_and_refuses_a_damaged_chunk() {
    if !criu_ready("a_full_restore_from_a_store_comes_back_whole_and_refuses_a_damaged_chunk") {
        return;
    }
    let nats = NatsServer::start();
    let sb = Sandbox::new();
    let work = sb.path().join("job");
    std::fs::create_dir_all(&work).unwrap();
    let store = sb.path().join("store");
    let store_s = store.to_str().unwrap();
    let _w1 = AgentDaemon::start_with(
        &nats,
        &nats.token,
        "jobfull",
        "w1",
        &work,
        &["--store", store_s],
    );
    let w2 = AgentDaemon::start_with(
        &nats,
        &nats.token,
        "jobfull",
        "w2",
        &work,
        &["--store", store_s, "--full-restore"],
    );
    let py = work.join("mem.py");
    std::fs::write(
        &py,
        "import os, time\nbuf = bytearray(os.urandom(64 << 20))\nprint('ready', flush=True)\nwhile True:\n    time.sleep(0.1)\n    print('sum', sum(buf[::4096]), flush=True)\n",
    )
    .unwrap();
    let log = work.join("mem.log");
    let sums = || -> Vec<String> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("sum ").map(str::to_string))
            .collect()
    };
    rt().block_on(async {
        let mut drv = Driver::connect(&nats, "jobfull").await;
        drv.wait_registered("w1").await;
        drv.wait_registered("w2").await;
        let r = drv
            .call(
                "w1",
                "spawn",
                Command::Spawn {
                    task: "mem".into(),
                    cmd: format!("exec python3 {}", py.display()),
                    userns: false,
                },
                20,
            )
            .await;
        assert!(matches!(r, Reply::Spawned { .. }), "{r:?}");
        wait_until(Duration::from_secs(30), "the task to sum", || {
            !sums().is_empty()
        });
        let checkpoint = |leave_running: bool| Command::Checkpoint {
            task: "mem".into(),
            leave_running,
            compression: cedana_agent::Compression::Zstd,
            chunks: None,
            criu: None,
            post_copy: false,
        };
        let restore = |task: &str, object: &str| Command::Restore {
            task: task.into(),
            object: object.to_string(),
            pending: false,
            manifest: None,
        };
        let r = drv.call("w1", "ckpt", checkpoint(false), 120).await;
        let Reply::Checkpointed { object, .. } = r else {
            panic!("the checkpoint failed: {r:?}")
        };
        let before = sums();
        let last = before.last().unwrap().clone();
        let r = drv.call("w2", "good", restore("mem", &object), 120).await;
        assert!(
            matches!(r, Reply::Restored { lazy: false, .. }),
            "w2 restores in full: {r:?}\n{}",
            w2.stderr()
        );
        wait_until(Duration::from_secs(30), "the restored task to sum", || {
            sums().len() > before.len() + 3
        });
        let after = sums();
        assert!(
            after[before.len()..].iter().all(|s| *s == last),
            "the memory came back whole: {last} before, {:?} after",
            &after[before.len()..]
        );

        // One chunk of its memory damaged in the store: the checkpoint is refused.
        let victim = damage_a_page_chunk(&store, &object, |n| n * 3 / 4);
        let r = drv.call("w2", "bad", restore("again", &object), 120).await;
        match &r {
            Reply::BadCheckpoint { message, .. } | Reply::Error { message } => {
                assert!(
                    message.contains(&victim),
                    "names the chunk {victim}: {message}"
                )
            }
            other => panic!("a damaged chunk restored: {other:?}\n{}", w2.stderr()),
        }
        let running = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read(e.path().join("cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(py.to_str().unwrap()))
            })
            .count();
        assert_eq!(running, 1, "only the first restored task runs");
    });
}

/// A task holding a TCP connection (to a metrics service, a client's to its server): a
/// checkpoint asked to refuse connections fails and leaves it running; by default the
/// connection is left out, the checkpoint is taken, and after the restore on another worker the
/// connection is back closed and the task reconnects.
#[test]
fn a_task_with_a_tcp_connection_is_checkpointed_and_reconnects_after_the_move() {
    if !criu_ready("a_task_with_a_tcp_connection_is_checkpointed_and_reconnects_after_the_move") {
        return;
    }
    use std::io::Read;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let nats = NatsServer::start();
    let sb = Sandbox::new();
    let work = sb.path().join("job");
    std::fs::create_dir_all(&work).unwrap();
    let _w1 = AgentDaemon::start(&nats, &nats.token, "jobtcp", "w1", &work);
    let w2 = AgentDaemon::start(&nats, &nats.token, "jobtcp", "w2", &work);
    // The service the task reports to: counts the connections it is given.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    {
        let accepted = accepted.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().take(16) {
                let Ok(mut conn) = conn else { continue };
                accepted.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
                });
            }
        });
    }
    std::fs::write(
        work.join("reporter.py"),
        format!(
            "import socket, time\n\
             def connect():\n    return socket.create_connection(('127.0.0.1', {port}))\n\
             s = connect()\n\
             i = 0\n\
             while True:\n    i += 1\n    print(i, flush=True)\n\
             \x20   try:\n        s.sendall(b'%d\\n' % i)\n\
             \x20   except OSError as e:\n        print('reconnecting after', e, flush=True)\n        s = connect()\n\
             \x20   time.sleep(0.05)\n"
        ),
    )
    .unwrap();
    let log = work.join("reporter.log");
    let wait_accepted = |n: usize| {
        let t0 = std::time::Instant::now();
        while accepted.load(Ordering::SeqCst) < n && t0.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(50));
        }
        accepted.load(Ordering::SeqCst)
    };
    rt().block_on(async {
        let mut drv = Driver::connect(&nats, "jobtcp").await;
        drv.wait_registered("w1").await;
        drv.wait_registered("w2").await;
        let r = drv
            .call(
                "w1",
                "spawn",
                Command::Spawn {
                    task: "reporter".into(),
                    cmd: "exec python3 reporter.py".into(),
                    userns: false,
                },
                20,
            )
            .await;
        assert!(matches!(r, Reply::Spawned { .. }), "{r:?}");
        assert_eq!(wait_accepted(1), 1, "the task connects");
        wait_for_numbers(&log, 5);
        // Asked to refuse connections, CRIU refuses, and says what would do.
        let r = drv
            .call(
                "w1",
                "ckpt-refuse",
                Command::Checkpoint {
                    task: "reporter".into(),
                    leave_running: false,
                    compression: cedana_agent::Compression::Zstd,
                    chunks: None,
                    criu: Some(protocol::CriuOptions::default()),
                    post_copy: false,
                },
                60,
            )
            .await;
        let Reply::Error { message } = &r else {
            panic!("a connection refused by the options: {r:?}")
        };
        assert!(message.contains("--tcp-established"), "{message}");
        let n = numbers(&log).len();
        wait_for_numbers(&log, n + 5);
        // By default the connection is left out of the checkpoint.
        let r = drv
            .call(
                "w1",
                "ckpt",
                Command::Checkpoint {
                    task: "reporter".into(),
                    leave_running: false,
                    compression: cedana_agent::Compression::Zstd,
                    chunks: None,
                    criu: None,
                    post_copy: false,
                },
                60,
            )
            .await;
        let Reply::Checkpointed { object, .. } = r else {
            panic!("{r:?}")
        };
        let r = drv
            .call(
                "w2",
                "rst",
                Command::Restore {
                    task: "reporter".into(),
                    object,
                    pending: false,
                    manifest: None,
                },
                60,
            )
            .await;
        assert!(
            matches!(r, Reply::Restored { .. }),
            "{r:?}\n{}",
            w2.stderr()
        );
        let n = numbers(&log).len();
        wait_for_numbers(&log, n + 10);
    });
    assert_eq!(
        wait_accepted(2),
        2,
        "the restored task reconnects: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("reconnecting after"), "{text}");
    assert_unbroken(&numbers(&log), "the reporter's count across the move");
}
