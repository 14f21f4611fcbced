//! The agent daemon against a real nats-server: token auth, registration, idempotent commands,
//! tasks with their output and exit codes, and a checkpoint that moves a running counter from
//! one worker to another through the JetStream object store.

use std::time::Duration;

use async_nats::jetstream;
use cedana_agent::protocol::{self, Command, CommandEnvelope, Event, EventEnvelope, Reply};
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
                signal: None
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
    let _w2 = AgentDaemon::start(&nats, &nats.token, "job4", "w2", &work);
    let log = work.join("counter.log");
    rt().block_on(async {
        let mut drv = Driver::connect(&nats, "job4").await;
        drv.wait_registered("w1").await;
        drv.wait_registered("w2").await;
        let cmd = "i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done";
        let r = drv
            .call(
                "w1",
                "spawn",
                Command::Spawn {
                    task: "counter".into(),
                    cmd: cmd.into(),
                },
                20,
            )
            .await;
        assert!(matches!(r, Reply::Spawned { .. }), "{r:?}");
        tokio::time::sleep(Duration::from_millis(700)).await;
        let r = drv
            .call(
                "w1",
                "ckpt",
                Command::Checkpoint {
                    task: "counter".into(),
                    leave_running: false,
                    compression: cedana_agent::Compression::Zstd,
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
                },
                60,
            )
            .await;
        assert!(matches!(r, Reply::Restored { .. }), "{r:?}");
        let on_w2 = drv
            .next(20, |e| {
                e.worker == "w2" && matches!(&e.event, Event::Log { task, .. } if task == "counter")
            })
            .await;
        assert_eq!(on_w2.worker, "w2", "w2 streams the restored task's output");
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
