//! Spot interruption notices: the agent daemon watching a fake EC2 instance metadata service
//! (IMDSv2, as published: session tokens from `PUT /latest/api/token`, 401 without a valid
//! token, 404 while there is no notice) with a real nats-server, real tasks and real CRIU.
//!
//! The fake (`cedana_tests::imds`) stands in for IMDS because no real one runs here; it follows
//! the AWS documentation of `spot/instance-action` and `events/recommendations/rebalance`.

use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use cedana_protocol::{
    self as protocol, Command, CommandEnvelope, Event, EventEnvelope, Reply, SpotCheckpoint,
    SpotKind,
};
use cedana_tests::imds::{raw_request, FakeImds, INSTANCE_ACTION, REBALANCE};
use cedana_tests::*;
use futures::StreamExt;

/// One raw request to the fake; its status code.
fn raw_status(fake: &FakeImds, request: &str) -> u16 {
    raw_request(fake.addr(), request).0
}

// ---------------------------------------------------------------------------------------------
// The driver's side, as in tests/daemon.rs

struct Driver {
    js: jetstream::Context,
    events: async_nats::Subscriber,
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

    async fn wait_registered(&self, worker: &str) {
        let key = format!("{}.{worker}", self.job);
        for _ in 0..200 {
            if let Ok(kv) = self.js.get_key_value(protocol::WORKERS_BUCKET).await {
                if let Ok(Some(_)) = kv.get(&key).await {
                    return;
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

    /// The next event satisfying `want` within `secs` (others are kept for later calls), or
    /// `None` when none came.
    async fn within(
        &mut self,
        secs: u64,
        mut want: impl FnMut(&EventEnvelope) -> bool,
    ) -> Option<EventEnvelope> {
        if let Some(i) = self.seen.iter().position(&mut want) {
            return self.seen.remove(i);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let msg = match tokio::time::timeout_at(deadline, self.events.next()).await {
                Err(_) => return None,
                Ok(m) => m.expect("subscription open"),
            };
            if msg.subject.ends_with(".commands") {
                continue;
            }
            let env: EventEnvelope = protocol::decode(&msg.payload).expect("event decodes");
            if want(&env) {
                return Some(env);
            }
            self.seen.push_back(env);
        }
    }

    async fn next(&mut self, secs: u64, want: impl FnMut(&EventEnvelope) -> bool) -> EventEnvelope {
        self.within(secs, want).await.unwrap_or_else(|| {
            panic!(
                "no awaited event within {secs} s; the last others: {:?}",
                self.seen.iter().rev().take(5).collect::<Vec<_>>()
            )
        })
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

    /// Names of the job's objects in the checkpoint store (deleted ones excluded).
    async fn objects(&self) -> Vec<String> {
        let store = self
            .js
            .get_object_store(protocol::CHECKPOINTS_BUCKET)
            .await
            .expect("checkpoint store");
        let mut list = store.list().await.expect("list objects");
        let mut names = Vec::new();
        while let Some(o) = list.next().await {
            let o = o.expect("object info");
            if !o.deleted && o.name.starts_with(&format!("{}/", self.job)) {
                names.push(o.name);
            }
        }
        names
    }

    async fn object_size(&self, name: &str) -> usize {
        let store = self
            .js
            .get_object_store(protocol::CHECKPOINTS_BUCKET)
            .await
            .expect("checkpoint store");
        store.info(name).await.expect("object exists").size
    }
}

fn is_spot(e: &EventEnvelope) -> bool {
    matches!(e.event, Event::SpotNotice { .. })
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A daemon of the test's job with `extra` arguments.
fn daemon(nats: &NatsServer, job: &str, worker: &str, work: &Path, extra: &[&str]) -> AgentDaemon {
    AgentDaemon::start_with(nats, &nats.token, job, worker, work, extra)
}

const COUNTER: &str = "i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done";

// ---------------------------------------------------------------------------------------------

/// No notice: the daemon polls with a token (the fake refuses requests without one) and does
/// nothing else; an expired token is replaced; a rebalance recommendation is reported once,
/// with no checkpoint.
#[test]
fn no_notice_means_no_event_and_no_checkpoint() {
    if !criu_ready("no_notice_means_no_event_and_no_checkpoint") {
        return;
    }
    let fake = FakeImds::start();
    // The fake holds to the published API: no token, no metadata; a token needs a TTL.
    assert_eq!(
        raw_status(
            &fake,
            &format!("GET {INSTANCE_ACTION} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        ),
        401
    );
    assert_eq!(
        raw_status(
            &fake,
            "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
        400
    );
    let refused_before = fake.with(|s| s.without_token);

    let nats = NatsServer::start();
    let sb = Sandbox::new();
    let work = sb.path().join("w1");
    let d = daemon(
        &nats,
        "spot1",
        "w1",
        &work,
        &["--imds-endpoint", &fake.url(), "--spot-poll-secs", "1"],
    );
    rt().block_on(async {
        let mut drv = Driver::connect(&nats, "spot1").await;
        drv.wait_registered("w1").await;
        let r = drv
            .call(
                "w1",
                "spawn",
                Command::Spawn {
                    task: "counter".into(),
                    cmd: COUNTER.into(),
                    userns: false,
                },
                20,
            )
            .await;
        assert!(matches!(r, Reply::Spawned { .. }), "{r:?}");

        // Several polls of both items, each with a valid token.
        let (a0, r0) = (fake.served(INSTANCE_ACTION), fake.served(REBALANCE));
        fake.wait_served(INSTANCE_ACTION, a0, 3);
        fake.wait_served(REBALANCE, r0, 3);
        assert!(
            drv.within(1, is_spot).await.is_none(),
            "no notice, no spot event"
        );
        assert_eq!(
            drv.objects().await,
            Vec::<String>::new(),
            "and no checkpoint"
        );
        fake.with(|s| {
            assert_eq!(
                s.without_token, refused_before,
                "the daemon never asks without a token"
            );
            assert_eq!(s.bad_token_requests, 1, "only the test's own bad request");
            assert_eq!(s.issued, 1, "one token serves many requests");
        });

        // Tokens expire (or IMDS forgets them): a 401, then a new token, then polling goes on.
        fake.with(|s| s.tokens.clear());
        let a1 = fake.served(INSTANCE_ACTION);
        fake.wait_served(INSTANCE_ACTION, a1, 2);
        fake.with(|s| {
            assert!(s.bad_token >= 1, "the old token was refused");
            assert_eq!(s.issued, 2, "and replaced once");
        });

        // A rebalance recommendation is reported, once, and checkpoints nothing.
        fake.with(|s| s.rebalance = Some(r#"{"noticeTime": "2026-11-21T01:00:00Z"}"#.into()));
        let e = drv.next(20, is_spot).await;
        assert_eq!(e.worker, "w1");
        assert_eq!(
            e.event,
            Event::SpotNotice {
                kind: SpotKind::Rebalance,
                action: None,
                at: Some("2026-11-21T01:00:00Z".into()),
                checkpoints: vec![],
                failed: vec![],
            }
        );
        let a2 = fake.served(INSTANCE_ACTION);
        fake.wait_served(INSTANCE_ACTION, a2, 3);
        assert!(
            drv.within(1, is_spot).await.is_none(),
            "a recommendation is reported once"
        );
        assert_eq!(drv.objects().await, Vec::<String>::new());
        let r = drv.call("w1", "ping", Command::Ping, 20).await;
        assert!(matches!(r, Reply::Pong { .. }), "{r:?}");
    });
    assert!(
        d.stderr().contains("watching for spot notices"),
        "{}",
        d.stderr()
    );
    assert!(
        !work.join(cedana_agent::daemon::CHECKPOINTS_DIR).exists()
            || std::fs::read_dir(work.join(cedana_agent::daemon::CHECKPOINTS_DIR))
                .unwrap()
                .next()
                .is_none(),
        "no archive on the worker either"
    );
}

/// An interruption notice: every task is checkpointed at once (a command checkpoint of the same
/// task at the same moment waits its turn and gets its own object), the event names the
/// checkpoints, and the counter restored from one on another worker, after the first is gone
/// with its folder, counts on with no gap.
#[test]
fn notice_checkpoints_every_task_and_the_checkpoint_restores() {
    if !criu_ready("notice_checkpoints_every_task_and_the_checkpoint_restores") {
        return;
    }
    let fake = FakeImds::start();
    let nats = NatsServer::start();
    let sb = Sandbox::new();
    // The folder every worker of the job has at the same path (as on real machines).
    let work = sb.path().join("job");
    let log = work.join("counter.log");
    let w1 = daemon(
        &nats,
        "spot2",
        "w1",
        &work,
        &["--imds-endpoint", &fake.url(), "--spot-poll-secs", "1"],
    );
    rt().block_on(async {
        let mut drv = Driver::connect(&nats, "spot2").await;
        drv.wait_registered("w1").await;
        for (task, cmd) in [
            ("counter", COUNTER),
            ("idle", "while :; do sleep 0.2; done"),
        ] {
            let r = drv
                .call(
                    "w1",
                    &format!("spawn-{task}"),
                    Command::Spawn {
                        task: task.into(),
                        cmd: cmd.into(),
                        userns: false,
                    },
                    20,
                )
                .await;
            assert!(matches!(r, Reply::Spawned { .. }), "{r:?}");
        }
        wait_for_numbers(&log, 10);
        let a0 = fake.served(INSTANCE_ACTION);
        fake.wait_served(INSTANCE_ACTION, a0, 1);

        // The notice, and at the same moment a command checkpoint of the counter.
        fake.with(|s| {
            s.instance_action =
                Some(r#"{"action": "terminate", "time": "2026-11-21T01:02:03Z"}"#.into())
        });
        drv.send(
            "w1",
            "ckpt",
            Command::Checkpoint {
                task: "counter".into(),
                leave_running: true,
                compression: cedana_agent::Compression::Zstd,
                chunks: None,
                criu: None,
                post_copy: false,
            },
        )
        .await;
        let e = drv.next(90, is_spot).await;
        let Event::SpotNotice {
            kind,
            action,
            at,
            mut checkpoints,
            failed,
        } = e.event
        else {
            unreachable!()
        };
        assert_eq!(kind, SpotKind::InstanceAction);
        assert_eq!(action.as_deref(), Some("terminate"));
        assert_eq!(at.as_deref(), Some("2026-11-21T01:02:03Z"));
        assert!(failed.is_empty(), "{failed:?}");
        checkpoints.sort_by(|a, b| a.task.cmp(&b.task));
        let tasks: Vec<&str> = checkpoints.iter().map(|c| c.task.as_str()).collect();
        assert_eq!(tasks, ["counter", "idle"], "every task is checkpointed");
        let SpotCheckpoint { object, .. } = checkpoints[0].clone();
        let r = drv.reply("ckpt", 90).await;
        let Reply::Checkpointed {
            object: by_command, ..
        } = r
        else {
            panic!("the command checkpoint: {r:?}")
        };
        assert_ne!(
            by_command, object,
            "two checkpoints of one task never share an object"
        );
        let mut stored = drv.objects().await;
        stored.sort();
        let mut expected = vec![
            by_command.clone(),
            object.clone(),
            checkpoints[1].object.clone(),
        ];
        expected.sort();
        assert_eq!(stored, expected, "the objects named exist in the store");
        assert!(drv.object_size(&object).await > 0);

        // Left running; commands are still served; the notice is acted on once.
        let n = numbers(&log).len();
        wait_for_numbers(&log, n + 5);
        let r = drv.call("w1", "ping", Command::Ping, 20).await;
        assert!(matches!(r, Reply::Pong { .. }), "{r:?}");
        assert!(
            drv.within(3, is_spot).await.is_none(),
            "the notice is acted on once"
        );

        // The instance goes: its tasks, its daemon and its folder.
        for task in ["counter", "idle"] {
            let r = drv
                .call(
                    "w1",
                    &format!("stop-{task}"),
                    Command::Stop { task: task.into() },
                    20,
                )
                .await;
            assert!(matches!(r, Reply::Stopped { .. }), "{r:?}");
            drv.next(
                20,
                |e| matches!(&e.event, Event::TaskExited { task: t, .. } if t == task),
            )
            .await;
        }
        drop(w1);
        std::fs::remove_dir_all(&work).expect("remove the first worker's folder");

        // Another worker restores the counter from the spot checkpoint.
        let _w2 = daemon(&nats, "spot2", "w2", &work, &[]);
        drv.wait_registered("w2").await;
        let r = drv
            .call(
                "w2",
                "restore",
                Command::Restore {
                    task: "counter".into(),
                    object,
                    pending: false,
                    manifest: None,
                },
                90,
            )
            .await;
        assert!(matches!(r, Reply::Restored { .. }), "{r:?}");
        let at_restore = numbers(&log).len();
        assert!(at_restore >= 10, "the folder came back with the checkpoint");
        wait_for_numbers(&log, at_restore + 10);
        let r = drv
            .call(
                "w2",
                "stop-restored",
                Command::Stop {
                    task: "counter".into(),
                },
                20,
            )
            .await;
        assert!(matches!(r, Reply::Stopped { .. }), "{r:?}");
    });
    assert_unbroken(&numbers(&log), "counter restored from the spot checkpoint");
}

/// No IMDS (nobody listens), or one that never answers: the daemon serves commands as ever and
/// says once that it cannot see notices. A malformed endpoint is refused at start.
#[test]
fn unreachable_imds_does_not_stop_the_daemon() {
    if !criu_ready("unreachable_imds_does_not_stop_the_daemon") {
        return;
    }
    let nats = NatsServer::start();
    let sb = Sandbox::new();
    let nobody = format!("http://127.0.0.1:{}", free_port());
    // Accepts connections (the kernel does) and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let d1 = daemon(
        &nats,
        "spot3",
        "w1",
        &sb.path().join("w1"),
        &["--imds-endpoint", &nobody, "--spot-poll-secs", "1"],
    );
    let d2 = daemon(
        &nats,
        "spot3",
        "w2",
        &sb.path().join("w2"),
        &["--imds-endpoint", &silent_url, "--spot-poll-secs", "1"],
    );
    rt().block_on(async {
        let mut drv = Driver::connect(&nats, "spot3").await;
        drv.wait_registered("w1").await;
        drv.wait_registered("w2").await;
        for round in 0..4 {
            for w in ["w1", "w2"] {
                let start = Instant::now();
                let r = drv
                    .call(w, &format!("ping-{w}-{round}"), Command::Ping, 20)
                    .await;
                assert!(matches!(r, Reply::Pong { .. }), "{r:?}");
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "{w} answered late"
                );
            }
            let r = drv
                .call(
                    "w2",
                    &format!("sh-{round}"),
                    Command::Sh {
                        cmd: "echo ok".into(),
                        timeout_secs: Some(10),
                    },
                    20,
                )
                .await;
            assert!(
                matches!(r, Reply::Sh { ref stdout, .. } if stdout == "ok\n"),
                "{r:?}"
            );
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        assert!(drv.within(1, is_spot).await.is_none());
    });
    for d in [&d1, &d2] {
        let log = d.stderr();
        let warned = log
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("instance metadata not available"))
            .count();
        assert_eq!(warned, 1, "said once, at warn level:\n{log}");
    }
    assert!(d1.stderr().contains("cannot reach IMDS"), "{}", d1.stderr());
    assert!(d2.stderr().contains("did not answer"), "{}", d2.stderr());
    drop(silent);

    let mut bad = daemon(
        &nats,
        "spot3",
        "w3",
        &sb.path().join("w3"),
        &["--imds-endpoint", "https://169.254.169.254"],
    );
    assert_eq!(
        bad.wait_exit(Duration::from_secs(20)),
        Some(3),
        "{}",
        bad.stderr()
    );
    assert!(bad.stderr().contains("plain HTTP"), "{}", bad.stderr());
}
