//! A job on the `aws` provider, end to end: `cedana-driver run` on the original's YAML job spec
//! with a config that enables only `aws`, against a real moto EC2 server, a real token-protected
//! nats-server, real CRIU, and the instance simulator booting every instance moto runs from its
//! user-data (a baked image: the user-data starts the agent, which watches instance metadata).
//!
//! The cheapest offer is launched (checked in moto: type, zone, spot, tags); the task counts
//! into a file on the instance; a spot interruption notice on that instance makes the agent
//! checkpoint at once and the driver move the job to the next offer (another capacity pool: the
//! interrupted one goes to the back of the ranking), where `restored_task` runs; the job
//! finishes with its count unbroken, and every instance it launched is terminated.

use std::time::Duration;

use aws_sdk_ec2::types::{InstanceLifecycleType, RequestLaunchTemplateData};
use cedana_driver::job::same_offer;
use cedana_driver::providers::Offer;
use cedana_tests::ec2sim::{SimConfig, SimState, Simulator};
use cedana_tests::moto::MotoServer;
use cedana_tests::*;

const REGION: &str = "us-east-1";
const COUNT: u64 = 200;

/// The original's job spec: a counter into a file in the worker's folder.
fn job_yaml() -> String {
    format!(
        r#"# A job of the original's format on the aws provider.
instance_specs:
  cpu_cores: 2
  memory_gb: 1
  max_price_usd_hour: 0.5
setup:
  run:
    - "test -x /usr/local/bin/cedana-agent"
task:
  run:
    - "i=0; while [ $i -lt {COUNT} ]; do i=$((i+1)); echo $i >> counter.txt; sleep 0.1; done"
    - "echo '--- counter.txt'"
    - "cat counter.txt"
restored_task:
  run:
    - "echo restored on $(cat /proc/sys/kernel/hostname) after $(wc -l < counter.txt) >> restored.txt"
"#
    )
}

/// On-demand prices, distinct (moto's spot prices are all the same).
fn catalog_json() -> String {
    let entry = |t: &str, cpu: u32, mem: f64, price: f64| {
        format!(
            r#"{{"provider": "aws", "instance_type": "{t}", "region": "{REGION}", "vcpus": {cpu}, "memory_gb": {mem}, "price_usd_hour": {price}, "source": "test catalog", "updated_at": "2026-01-01T00:00:00Z"}}"#
        )
    };
    format!(
        "{{\"entries\": [{}, {}, {}]}}",
        entry("t3.micro", 2, 1.0, 0.0104),
        entry("t3.small", 2, 2.0, 0.0208),
        entry("t3.medium", 2, 4.0, 0.0416)
    )
}

/// What moto says of an instance: (type, zone, spot, state, tags).
struct MotoView {
    instance_type: String,
    zone: String,
    spot: bool,
    state: String,
    tags: std::collections::BTreeMap<String, String>,
}

fn moto_view(sim: &Simulator, id: &str) -> MotoView {
    let out = sim
        .block_on(
            sim.client(REGION)
                .describe_instances()
                .instance_ids(id)
                .send(),
        )
        .expect("DescribeInstances");
    let i = &out.reservations()[0].instances()[0];
    MotoView {
        instance_type: i.instance_type().unwrap().as_str().to_string(),
        zone: i
            .placement()
            .and_then(|p| p.availability_zone())
            .unwrap_or_default()
            .to_string(),
        spot: i.instance_lifecycle() == Some(&InstanceLifecycleType::Spot),
        state: i
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_string())
            .unwrap_or_default(),
        tags: i
            .tags()
            .iter()
            .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
            .collect(),
    }
}

/// The worker record `id` of the job record, once it has an instance.
fn worker<'a>(record: &'a serde_json::Value, id: &str) -> Option<&'a serde_json::Value> {
    record["workers"]
        .as_array()?
        .iter()
        .find(|w| w["id"] == id && w["instance"].as_str().is_some_and(|i| i.starts_with("i-")))
}

fn offer_of(w: &serde_json::Value) -> Offer {
    serde_json::from_value(w["offer"].clone()).expect("the worker's offer")
}

/// moto, the simulator, nats-server on its gateway, a baked image and its launch template, the
/// config enabling only `aws`, the catalog, the job, and the offers as `price --json` ranks them.
struct AwsJob {
    sim: Simulator,
    _moto: MotoServer,
    _nats: NatsServer,
    sb: Sandbox,
    config: std::path::PathBuf,
    job: std::path::PathBuf,
    env: Vec<(String, String)>,
    expected: Vec<Offer>,
}

impl AwsJob {
    fn setup() -> AwsJob {
        let moto = MotoServer::start();
        let sim = Simulator::start(SimConfig::new(moto.url())).unwrap_or_else(|e| panic!("{e}"));
        let nats = NatsServer::start_on(sim.gateway().into());
        let sb = Sandbox::new();

        // What the user made with `bake`: an image with the agent and a launch template for it.
        let ami = sim
            .register_image(REGION, "cedana-worker", true)
            .expect("an image");
        let client = sim.client(REGION);
        sim.block_on(
            client
                .create_launch_template()
                .launch_template_name("cedana-e2e")
                .launch_template_data(RequestLaunchTemplateData::builder().image_id(&ami).build())
                .send(),
        )
        .expect("CreateLaunchTemplate");

        // The original's config file, with only aws enabled.
        let config = sb.path().join("cedana_config.json");
        std::fs::write(
            &config,
            serde_json::json!({
                "self_serve": true,
                "enabled_providers": ["aws"],
                "aws": {
                    "enabled_regions": [REGION],
                    "enabled_instance_families": ["t3.micro", "t3.small"],
                    "launch_template": "cedana-e2e",
                },
                "connection": {
                    "nats_url": sim.gateway().to_string(),
                    "nats_port": nats.port,
                    "auth_token": nats.token,
                },
            })
            .to_string(),
        )
        .unwrap();
        let catalog = sb.path().join("catalog.json");
        std::fs::write(&catalog, catalog_json()).unwrap();
        let job = sb.path().join("job.yml");
        std::fs::write(&job, job_yaml()).unwrap();

        // The ranking the driver makes from the same config, catalog and moto.
        let env: Vec<(String, String)> = moto
            .env()
            .into_iter()
            .chain([
                ("CEDANA_CATALOG".to_string(), catalog.display().to_string()),
                ("CEDANA_CONFIG".to_string(), config.display().to_string()),
            ])
            .collect();
        let price = driver_cmd(sb.path())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .args([
                "price",
                "--cpu",
                "2",
                "--memory",
                "1",
                "--max-price",
                "0.5",
                "--json",
            ])
            .output()
            .expect("cedana-driver price");
        assert!(
            price.status.success(),
            "price: {}",
            String::from_utf8_lossy(&price.stderr)
        );
        let prices: serde_json::Value =
            serde_json::from_slice(&price.stdout).expect("price --json");
        let expected: Vec<Offer> =
            serde_json::from_value(prices["offers"].clone()).expect("offers");
        assert!(expected.len() >= 2, "at least two offers: {prices}");
        AwsJob {
            sim,
            _moto: moto,
            _nats: nats,
            sb,
            config,
            job,
            env,
            expected,
        }
    }

    /// `cedana-driver run job.yml` in the background.
    fn run(&self) -> BackgroundDriver {
        self.run_with(&self.job, &[])
    }

    /// `cedana-driver run [ARGS] JOB` in the background.
    fn run_with(&self, job: &std::path::Path, args: &[&str]) -> BackgroundDriver {
        let state = self.sb.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let driver_env: Vec<(&str, &std::ffi::OsStr)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), std::ffi::OsStr::new(v.as_str())))
            .chain([("RUST_LOG", std::ffi::OsStr::new("cedana_driver=info"))])
            .collect();
        BackgroundDriver::start_env(&state, Some(&self.config), args, job, &driver_env)
    }

    /// Waits for worker `id` on an instance; the record, the worker and its instance.
    fn worker(
        &self,
        driver: &BackgroundDriver,
        id: &str,
    ) -> (serde_json::Value, serde_json::Value, String) {
        let record = driver.wait_record(
            Duration::from_secs(180),
            &format!("worker {id} on an instance"),
            |r| worker(r, id).is_some(),
        );
        let w = worker(&record, id).unwrap().clone();
        let instance = w["instance"].as_str().unwrap().to_string();
        (record, w, instance)
    }

    /// Waits until the task counted `n` numbers on instance `id`.
    fn counting(&self, driver: &BackgroundDriver, id: &str, n: usize) {
        let inst = self
            .sim
            .wait_running(id, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e}\n{}", driver.stderr()));
        let counter = inst.disk.join("var/lib/cedana/work/counter.txt");
        wait_until(
            Duration::from_secs(120),
            "the task to count on the instance",
            || numbers(&counter).len() >= n,
        );
    }

    /// The job ended well with its count unbroken, `restored_task` ran on the last worker, and
    /// every instance it launched is terminated.
    fn finished_intact(&self, driver: &mut BackgroundDriver) -> serde_json::Value {
        let code = driver.wait(Duration::from_secs(300));
        let out = driver.stdout();
        let err = driver.stderr();
        assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
        let nums = numbers_after(&out, "--- counter.txt");
        assert_eq!(nums.len() as u64, COUNT, "stdout:\n{out}");
        assert_unbroken(&nums, "the count across the spot interruption");
        assert!(err.contains("spot interruption notice"), "{err}");
        let record = driver.record().expect("the job's record");
        let instances: Vec<String> = record["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|w| w["instance"].as_str())
            .filter(|i| i.starts_with("i-"))
            .map(str::to_string)
            .collect();
        let last = self
            .sim
            .instance(instances.last().expect("a worker"))
            .expect("simulated");
        let restored = std::fs::read_to_string(last.disk.join("var/lib/cedana/work/restored.txt"))
            .expect("restored_task ran on the last worker");
        let host = format!("ip-{}", last.private_ip.to_string().replace('.', "-"));
        assert!(
            restored.contains(&format!("restored on {host}")),
            "{restored}"
        );
        for id in &instances {
            assert_eq!(moto_view(&self.sim, id).state, "terminated", "{id}");
            let gone = self
                .sim
                .wait_gone(id, Duration::from_secs(30))
                .expect("torn down");
            assert_eq!(gone.state, SimState::Terminated);
        }
        record
    }
}

#[test]
fn a_job_on_aws_survives_a_spot_interruption_on_the_next_offer() {
    if !criu_ready("a_job_on_aws_survives_a_spot_interruption_on_the_next_offer") {
        return;
    }
    let aws = AwsJob::setup();
    let (sim, expected) = (&aws.sim, &aws.expected);
    let mut driver = aws.run();

    // The cheapest offer is launched, as moto sees it.
    let (record, w1, first) = aws.worker(&driver, "w1");
    let chosen = offer_of(&w1);
    assert!(
        same_offer(&chosen, &expected[0]) && chosen.price_usd_hour == expected[0].price_usd_hour,
        "the cheapest offer first: {chosen:?}, ranking {expected:?}"
    );
    let m = moto_view(sim, &first);
    assert_eq!(m.instance_type, chosen.instance_type);
    assert_eq!(Some(&m.zone), chosen.zone.as_ref(), "in the offer's zone");
    assert_eq!(m.spot, chosen.spot, "spot as offered");
    assert!(m.spot, "the cheapest offers are spot ones");
    let job_id = record["job"].as_str().expect("job id").to_string();
    assert_eq!(m.tags.get("cedana:job"), Some(&job_id));
    assert_eq!(m.tags.get("cedana:worker").map(String::as_str), Some("w1"));
    assert!(
        m.tags.get("Name").is_some_and(|n| n.contains(&job_id)),
        "{:?}",
        m.tags
    );

    // The work runs on that instance.
    aws.counting(&driver, &first, 20);

    // EC2 gives notice: the job moves to the next offer.
    sim.spot_notice(&first).expect("spot notice");
    let record = driver.wait_record(
        Duration::from_secs(180),
        "the job to move after the spot notice",
        |r| r["migrations"].as_u64() >= Some(1) && worker(r, "w2").is_some(),
    );
    assert_eq!(record["spot_notices"], 1, "{record}");
    let w2 = worker(&record, "w2").unwrap().clone();
    let second = w2["instance"].as_str().unwrap().to_string();
    assert_ne!(second, first, "a new instance");
    let next = offer_of(&w2);
    let after = expected
        .iter()
        .find(|o| !same_offer(o, &chosen))
        .expect("another offer");
    assert!(
        same_offer(&next, after),
        "the next offer, not the interrupted one: {next:?}, ranking {expected:?}"
    );
    assert!(
        next.instance_type != chosen.instance_type || next.zone != chosen.zone,
        "another capacity pool: {next:?}"
    );
    let m2 = moto_view(sim, &second);
    assert_eq!(m2.instance_type, next.instance_type);
    assert_eq!(Some(&m2.zone), next.zone.as_ref());
    assert_eq!(m2.tags.get("cedana:worker").map(String::as_str), Some("w2"));
    // The interrupted instance is terminated (by the driver, not by EC2 here).
    sim.wait_gone(&first, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", driver.stderr()));
    assert_eq!(moto_view(sim, &first).state, "terminated");

    // The job finishes on the second instance with its count intact; no instance outlives it.
    let record = aws.finished_intact(&mut driver);
    let last = record["workers"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["instance"], second, "it ended on the second instance");
    assert_eq!(record["recoveries"], 0, "moved, not recovered: {record}");
    // Two machines: the new worker read the checkpoint while the old one stored it.
    let err = driver.stderr();
    assert!(
        err.contains("w2 read the checkpoint while it was stored"),
        "{err}"
    );
}

/// EC2 takes the instance back right after the agent's checkpoint for the notice, before the
/// job could move in an orderly way: the job carries on from that checkpoint on another
/// instance and still finishes with its count intact.
#[test]
fn a_job_on_aws_survives_its_instance_reclaimed_right_after_the_notice() {
    if !criu_ready("a_job_on_aws_survives_its_instance_reclaimed_right_after_the_notice") {
        return;
    }
    let aws = AwsJob::setup();
    let mut driver = aws.run();
    let (_, _, first) = aws.worker(&driver, "w1");
    aws.counting(&driver, &first, 20);
    aws.sim.spot_notice(&first).expect("spot notice");
    // The driver has the notice, with the agent's checkpoint, once it counts it.
    driver.wait_record(
        Duration::from_secs(120),
        "the driver to act on the notice",
        |r| r["spot_notices"] == 1,
    );
    aws.sim
        .reclaim(&first)
        .expect("EC2 takes the instance back");
    aws.sim
        .wait_gone(&first, Duration::from_secs(30))
        .expect("torn down");
    let record = aws.finished_intact(&mut driver);
    let instances: Vec<&str> = record["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["instance"].as_str())
        .collect();
    assert_ne!(
        instances.last(),
        Some(&first.as_str()),
        "it ended elsewhere"
    );
    // Whether the move finished first or the instance went while it was under way, the
    // worker the move launched took the task: no third instance started (and paid for).
    assert_eq!(instances.len(), 2, "{record}");
    let moved =
        record["migrations"].as_u64().unwrap_or(0) + record["recoveries"].as_u64().unwrap_or(0);
    assert!(moved >= 1, "{record}");
}

/// The controller of a job on AWS is killed mid-job; `resume` takes its instance back (found
/// by its id in the record, followed in EC2 again), the task goes on where it runs, and the
/// job ends with its count unbroken on that one instance, which is then terminated.
#[test]
fn a_job_on_aws_is_resumed_after_its_controller_is_killed() {
    let job = AwsJob::setup();
    let mut d = job.run();
    let (_, _, instance) = job.worker(&d, "w1");
    job.counting(&d, &instance, 20);
    let r = d.record().expect("record");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(r["driver_pid"].as_i64().unwrap() as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    assert_eq!(d.wait(Duration::from_secs(60)), Some(4), "{}", d.stderr());
    let out = driver_cmd(&d.state)
        .envs(job.env.iter().map(|(k, v)| (k, v)))
        .args(["resume", r["job"].as_str().unwrap()])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let nums = numbers_after(&stdout, "--- counter.txt");
    assert_eq!(nums.len() as u64, COUNT, "stdout:\n{stdout}");
    assert_unbroken(&nums, "the count across the resume");
    let r = d.record().unwrap();
    assert_eq!(
        r["workers"].as_array().unwrap().len(),
        1,
        "one instance: {r}"
    );
    assert_eq!(r["recoveries"], 0, "{r}");
    assert_eq!(moto_view(&job.sim, &instance).state, "terminated");
}

/// A server in a task on an AWS worker (a notebook, a dashboard) is reached from this machine:
/// the job's record carries the instance's address as EC2 reports it (public, else private), and
/// `run --expose` forwards a local port to the task there.
#[test]
fn a_task_on_aws_is_reached_through_its_exposed_port() {
    if !criu_ready("a_task_on_aws_is_reached_through_its_exposed_port") {
        return;
    }
    let aws = AwsJob::setup();
    let spec = aws.sb.path().join("server.yml");
    let task_port = 18555;
    std::fs::write(
        &spec,
        format!(
            r#"instance_specs:
  cpu_cores: 2
  memory_gb: 1
  max_price_usd_hour: 0.5
task:
  run:
    - "echo hello-from-the-instance > hello.txt"
    - "exec python3 -m http.server {task_port} --bind 0.0.0.0"
"#
        ),
    )
    .unwrap();
    let local = free_port();
    let expose = format!("{local}:{task_port}");
    let mut driver = aws.run_with(&spec, &["--checkpoint-every", "0", "--expose", &expose]);
    let (_, _, instance) = aws.worker(&driver, "w1");
    let inst = aws
        .sim
        .wait_running(&instance, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", driver.stderr()));
    let want = inst.public_ip.unwrap_or(inst.private_ip).to_string();
    let record = driver.wait_record(Duration::from_secs(120), "w1's address", |r| {
        worker(r, "w1").is_some_and(|w| w["address"].is_string())
    });
    assert_eq!(
        worker(&record, "w1").unwrap()["address"].as_str(),
        Some(want.as_str()),
        "the record has the instance's address"
    );
    wait_until(
        Duration::from_secs(120),
        "the task's server through the exposed port",
        || http_get(local, "/hello.txt").is_some_and(|b| b.contains("hello-from-the-instance")),
    );
    let job = record["job"].as_str().unwrap().to_string();
    let down = driver_cmd(&aws.sb.path().join("state"))
        .envs(aws.env.iter().map(|(k, v)| (k, v)))
        .args(["down", &job])
        .output()
        .expect("cedana-driver down");
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    driver.wait(Duration::from_secs(120));
    assert_eq!(moto_view(&aws.sim, &instance).state, "terminated");
}
