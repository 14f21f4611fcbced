//! Each worker's own NATS user on the job's embedded server (issue 15, item 1). A task runs as
//! root on its worker, so it can read its agent's credential (here from the agent's
//! `/proc/PID/environ`, as such a task would). With it, it must not command another worker
//! (before: a forged `sh` ran a root shell there), speak for another worker (before: a forged
//! `task_exited` made the driver end the job with 42), read the job's records or listen to
//! other subjects; and the driver must ignore an event whose subject is not its worker's.

use std::path::Path;
use std::time::Duration;

use cedana_protocol::{CommandEnvelope, Event, EventEnvelope, NatsCredential, Secret};
use cedana_tests::*;

/// The job: a healthy task on w1 that ends with 0, and a second worker, w2, whose credential
/// the attacker has.
const SCRIPT: &str = r#"
let w1 = launch();
let task = w1.spawn("sleep 40; echo healthy");
let w2 = launch();
w2.sh("true");
log("both workers up");
let code = task.wait();
log(`healthy task ended with ${code} on ${task.worker.id}`);
code
"#;

/// `CEDANA_NATS_TOKEN` from process `pid`'s environment as it was started.
fn credential_of(pid: i64) -> Secret {
    let env = std::fs::read(format!("/proc/{pid}/environ")).expect("read the agent's environ");
    env.split(|b| *b == 0)
        .find_map(|e| e.strip_prefix(b"CEDANA_NATS_TOKEN="))
        .map(|t| Secret::new(String::from_utf8_lossy(t).into_owned()))
        .expect("the agent was started with CEDANA_NATS_TOKEN")
}

fn event(job: &str, worker: &str, event: Event) -> bytes::Bytes {
    serde_json::to_vec(&EventEnvelope {
        v: cedana_protocol::VERSION,
        job: job.into(),
        worker: worker.into(),
        at: cedana_protocol::now(),
        event,
    })
    .expect("serializes")
    .into()
}

/// Publishes to JetStream and waits (bounded) for the stream's acknowledgement: whether it
/// was stored.
async fn stored(
    js: &async_nats::jetstream::Context,
    subject: String,
    payload: bytes::Bytes,
) -> bool {
    let ack = async { js.publish(subject, payload).await.ok()?.await.ok() };
    matches!(
        tokio::time::timeout(Duration::from_secs(6), ack).await,
        Ok(Some(_))
    )
}

#[test]
fn a_workers_credential_commands_no_other_worker_and_speaks_for_no_other() {
    if !criu_ready("a_workers_credential_commands_no_other_worker_and_speaks_for_no_other") {
        return;
    }
    let sb = Sandbox::new();
    let state = sb.path().join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    let mut driver = start_two_workers(&sb, &state, None);
    let job = attack_from_w2(&sb, &mut driver, "user:", None);
    let log = std::fs::read_to_string(Path::new(&state).join(&job).join("logs").join("nats.log"))
        .expect("the server's log");
    server_refused(&job, &log);
}

/// The same on a NATS server the user runs, with the operator and account
/// `cedana-driver bootstrap --nats-account` made: the driver mints each worker a user JWT.
#[test]
fn on_a_server_the_user_runs_each_worker_gets_a_user_minted_from_the_account() {
    if !criu_ready("on_a_server_the_user_runs_each_worker_gets_a_user_minted_from_the_account") {
        return;
    }
    let sb = Sandbox::new();
    let state = sb.path().join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    let cfg = sb.path().join("cedana_config.json");
    let port = free_port();
    let out = driver_cmd(&state)
        .arg("--config")
        .arg(&cfg)
        .args(["bootstrap", "--nats-account", "--nats-url", "127.0.0.1"])
        .args([
            "--nats-port",
            &port.to_string(),
            "--non-interactive",
            "--json",
        ])
        .output()
        .expect("run bootstrap");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json");
    let conf = Path::new(
        said["nats_account_conf"]
            .as_str()
            .expect("the server's part"),
    )
    .to_path_buf();
    let text = std::fs::read_to_string(&conf).expect("the server's part");
    let config = std::fs::read_to_string(&cfg).expect("the config");
    let seed = serde_json::from_str::<serde_json::Value>(&config).expect("json")["connection"]
        ["auth_token"]
        .as_str()
        .expect("a seed")
        .to_string();
    assert!(
        seed.starts_with("SA"),
        "the config keeps the account's seed"
    );
    assert!(!text.contains(&seed), "the server's part holds no seed");
    let log = sb.path().join("nats.log");
    let _nats = NatsServer::start_config(port, &conf, &log);
    // Nothing but a user the account signed is let in.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let token = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(6),
            NatsCredential::Token(Secret::new("anything"))
                .connect_options()
                .connect(format!("nats://127.0.0.1:{port}")),
        )
        .await
    });
    assert!(!matches!(token, Ok(Ok(_))), "a token is let in");
    // Another job's checkpoint on the same server.
    let account = NatsCredential::parse(&Secret::new(seed));
    let victim = cedana_protocol::job_checkpoints_bucket("victim-1");
    let url = format!("nats://127.0.0.1:{port}");
    rt.block_on(async {
        let client = account
            .connect_options()
            .connect(&url)
            .await
            .expect("the account's user");
        let js = async_nats::jetstream::new(client);
        let store = cedana_protocol::ensure_checkpoints(&js, &victim)
            .await
            .expect("bucket");
        store
            .put("victim-1/ckpt.zip", &mut &b"the victim's memory"[..])
            .await
            .expect("put");
    });
    let mut driver = start_two_workers(&sb, &state, Some(&cfg));
    let job = attack_from_w2(&sb, &mut driver, "jwt:", Some(&victim));
    let log = std::fs::read_to_string(&log).expect("the server's log");
    server_refused(&job, &log);
    assert!(
        log.contains(&format!("$JS.API.STREAM.INFO.OBJ_{victim}")),
        "{log}"
    );
    // The job's own checkpoints were in a bucket of its own; the victim's is whole.
    rt.block_on(async {
        let client = account
            .connect_options()
            .connect(&url)
            .await
            .expect("the account's user");
        let js = async_nats::jetstream::new(client);
        let mut data = Vec::new();
        let mut obj = js
            .get_object_store(&victim)
            .await
            .expect("bucket")
            .get("victim-1/ckpt.zip")
            .await
            .expect("the victim's checkpoint");
        tokio::io::AsyncReadExt::read_to_end(&mut obj, &mut data)
            .await
            .expect("read");
        assert_eq!(data, b"the victim's memory");
        js.get_object_store(cedana_protocol::job_checkpoints_bucket(&job))
            .await
            .expect("the job's own bucket");
    });
    // `rm` of the ended job removes its bucket from the server too; the victim's stays.
    let rm = driver_cmd(&state)
        .arg("--config")
        .arg(&cfg)
        .args(["rm", &job])
        .output()
        .expect("run rm");
    let said = String::from_utf8_lossy(&rm.stdout);
    assert!(
        rm.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&rm.stderr)
    );
    assert!(said.contains("removed its checkpoints"), "{said}");
    rt.block_on(async {
        let client = account
            .connect_options()
            .connect(&url)
            .await
            .expect("the account's user");
        let js = async_nats::jetstream::new(client);
        assert!(
            js.get_object_store(cedana_protocol::job_checkpoints_bucket(&job))
                .await
                .is_err(),
            "the job's bucket is gone"
        );
        js.get_object_store(&victim)
            .await
            .expect("the victim's bucket stays");
    });
}

/// Starts the job of [`SCRIPT`] and waits until both its workers are up.
fn start_two_workers(sb: &Sandbox, state: &Path, config: Option<&Path>) -> BackgroundDriver {
    let script = sb.path().join("two.rhai");
    std::fs::write(&script, SCRIPT).expect("write script");
    let driver = BackgroundDriver::start(state, config, &[], &script);
    driver.wait_record(Duration::from_secs(60), "two workers", |r| {
        r["workers"].as_array().is_some_and(|w| w.len() == 2)
    });
    wait_until(Duration::from_secs(30), "both workers up", || {
        driver.stderr().contains("both workers up")
    });
    driver
}

/// What a task on w2 tries with w2's credential (whose string starts with `kind`); the job
/// then ends as its healthy task does. Returns the job's id.
fn attack_from_w2(
    sb: &Sandbox,
    driver: &mut BackgroundDriver,
    kind: &str,
    victim: Option<&str>,
) -> String {
    let record = driver.record().expect("the job's record");
    let job = record["job"].as_str().expect("job id").to_string();
    let url = record["nats_url"].as_str().expect("nats url").to_string();
    let w2_pid = record["workers"][1]["pid"]
        .as_i64()
        .expect("w2's agent pid");
    let secret = credential_of(w2_pid);
    assert!(
        secret.expose().starts_with(kind),
        "w2's credential is not a {kind} one"
    );
    let credential = NatsCredential::parse(&secret);
    assert_eq!(credential.user(), Some("w-w2"), "w2 has a user of its own");
    let marker = sb.path().join("pwned");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let client = credential
            .connect_options()
            .connect(url.as_str())
            .await
            .expect("w2's credential connects");
        let js = async_nats::jetstream::new(client.clone());
        // What w2 may do: speak for itself.
        assert!(
            stored(
                &js,
                cedana_protocol::state_subject(&job, "w2"),
                event(&job, "w2", Event::Heartbeat { tasks: vec![] })
            )
            .await,
            "w2 publishes its own events"
        );
        // A root shell on w1, through a forged command.
        let sh = CommandEnvelope {
            v: cedana_protocol::VERSION,
            id: "forged-1".into(),
            command: serde_json::from_value(serde_json::json!({
                "type": "sh",
                "cmd": format!("touch {}", marker.display()),
            }))
            .expect("an sh command"),
        };
        assert!(
            !stored(
                &js,
                cedana_protocol::commands_subject(&job, "w1"),
                serde_json::to_vec(&sh).expect("serializes").into()
            )
            .await,
            "w2 must not command w1"
        );
        // w1's task reported dead, on w1's subject.
        let exit42 = || Event::TaskExited {
            task: "task1".into(),
            code: Some(42),
            signal: None,
            restore_failed: None,
        };
        assert!(
            !stored(
                &js,
                cedana_protocol::state_subject(&job, "w1"),
                event(&job, "w1", exit42())
            )
            .await,
            "w2 must not publish on w1's subjects"
        );
        // The job's records, w1's commands through a consumer of its own, everyone's events.
        let jobs = tokio::time::timeout(
            Duration::from_secs(6),
            js.get_key_value(cedana_protocol::JOBS_BUCKET),
        )
        .await;
        assert!(
            !matches!(jobs, Ok(Ok(_))),
            "w2 must not open the job records"
        );
        let steal = tokio::time::timeout(
            Duration::from_secs(6),
            js.create_consumer_on_stream(
                async_nats::jetstream::consumer::pull::Config {
                    durable_name: Some("steal".into()),
                    filter_subject: cedana_protocol::commands_subject(&job, "w1"),
                    ..Default::default()
                },
                cedana_protocol::COMMANDS_STREAM,
            ),
        )
        .await;
        assert!(
            !matches!(steal, Ok(Ok(_))),
            "w2 must not read w1's commands"
        );
        let listen = async {
            let sub = client.subscribe("CEDANA.>").await;
            let _ = client.flush().await;
            sub
        };
        let _sub = tokio::time::timeout(Duration::from_secs(5), listen).await;
        // Another job's checkpoints (on a server jobs share): neither read nor replaced.
        if let Some(bucket) = victim {
            let open =
                tokio::time::timeout(Duration::from_secs(6), js.get_object_store(bucket)).await;
            assert!(
                !matches!(open, Ok(Ok(_))),
                "w2 must not open another job's checkpoints"
            );
            assert!(
                !stored(
                    &js,
                    format!("$O.{bucket}.C.forged"),
                    bytes::Bytes::from_static(b"forged")
                )
                .await,
                "w2 must not write into another job's checkpoints"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Last, as it would end the job at once if the driver believed it: the same exit
        // on w2's own subject, naming w1: stored, but the driver must not believe it.
        assert!(
            stored(
                &js,
                cedana_protocol::state_subject(&job, "w2"),
                event(&job, "w1", exit42())
            )
            .await
        );
    });

    let code = driver.wait(Duration::from_secs(120));
    let err = driver.stderr();
    assert_eq!(code, Some(0), "the job ends as its task does: {err}");
    assert!(err.contains("healthy task ended with 0 on w1"), "{err}");
    assert!(!marker.exists(), "the forged command ran on w1");
    job
}

/// The server's log names each refusal.
fn server_refused(job: &str, log: &str) {
    for refused in [
        format!("Publish Violation - Subject \"CEDANA.{job}.w1.commands\""),
        format!("Publish Violation - Subject \"CEDANA.{job}.w1.state\""),
        "Publish Violation - Subject \"$JS.API.STREAM.INFO.KV_cedana_jobs\"".to_string(),
        "Subscription Violation - Subject \"CEDANA.>\"".to_string(),
        "Publish Violation - Subject \"$JS.API.CONSUMER.CREATE.CEDANA_COMMANDS.steal".to_string(),
    ] {
        assert!(
            log.contains(&refused),
            "{refused} not in the server's log:\n{log}"
        );
    }
}
