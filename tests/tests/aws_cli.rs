//! The AWS side of the command line against moto's EC2 server: `price` with AWS offers and
//! `--refresh`, and `bootstrap --aws-create` making the key pair, security group and launch
//! template, then writing a config that points at them.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use cedana_driver::providers::aws::{self, ConnectOptions, Ec2};
use cedana_tests::moto::MotoServer;
use cedana_tests::*;

const AMI: &str = "ami-1e749f67";

fn driver(sb: &Sandbox, moto: &MotoServer, catalog: &Path, args: &[&str]) -> std::process::Output {
    let mut c = driver_cmd(sb.path());
    moto.apply_env(&mut c);
    c.env("CEDANA_CATALOG", catalog)
        .env("CEDANA_AWS_IMAGE_ID", AMI)
        .env_remove("PAPERSPACE_API_KEY")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run cedana-driver")
}

fn aws_config(sb: &Sandbox) -> std::path::PathBuf {
    let cfg = sb.path().join("cedana_config.json");
    std::fs::write(
        &cfg,
        r#"{"enabled_providers": ["aws"],
            "aws": {"enabled_regions": ["us-east-1"], "enabled_instance_families": ["t2"]},
            "connection": {"nats_url": "nats.example.org", "nats_port": 4222, "auth_token": "tok"}}"#,
    )
    .unwrap();
    cfg
}

#[test]
fn price_shows_aws_offers_and_refresh_keeps_spot_prices_in_the_catalog() {
    let moto = MotoServer::start();
    let sb = Sandbox::new();
    let cfg = aws_config(&sb);
    let cat = sb.path().join("home/.cedana/catalog.json");
    let cfg_s = cfg.to_str().unwrap();
    let out = driver(
        &sb,
        &moto,
        &cat,
        &[
            "--config",
            cfg_s,
            "price",
            "--cpu",
            "1",
            "--refresh",
            "--json",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("prices written to") && err.contains("catalog.json"),
        "{err}"
    );
    // The file holds the spot prices per type and zone, in the catalog format.
    let written =
        cedana_driver::providers::catalog::Catalog::from_file(&cat).expect("a valid catalog");
    assert!(!written.entries.is_empty());
    for e in &written.entries {
        assert!(
            e.provider == "aws" && e.spot && e.instance_type.starts_with("t2."),
            "{e:?}"
        );
        assert!(
            e.zone
                .as_deref()
                .is_some_and(|z| z.starts_with("us-east-1")),
            "{e:?}"
        );
        assert_eq!(e.source, aws::SPOT_SOURCE);
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let offers = v["offers"].as_array().unwrap();
    assert!(!offers.is_empty(), "{v}");
    // Only t2, each fitting, cheapest first, each saying where its price is from.
    let mut last = 0.0;
    for o in offers {
        assert_eq!(o["provider"], "aws");
        assert!(
            o["instance_type"].as_str().unwrap().starts_with("t2."),
            "{o}"
        );
        assert!(o["vcpus"].as_f64().unwrap() >= 1.0);
        let p = o["price_usd_hour"].as_f64().unwrap();
        assert!(p >= last, "not cheapest first: {v}");
        last = p;
        let source = o["price_source"].as_str().unwrap();
        assert!(
            source == aws::SPOT_SOURCE || source.starts_with("catalog: "),
            "{source}"
        );
        assert!(o["age_seconds"].is_u64(), "{o}");
    }
    assert!(offers.iter().any(|o| o["spot"] == true));
    assert!(
        offers.iter().any(|o| o["spot"] == false),
        "on-demand from the built-in catalog: {v}"
    );

    // A user's own entries survive a refresh.
    let mut c = written.clone();
    c.entries
        .push(cedana_driver::providers::catalog::CatalogEntry {
            provider: "paperspace".into(),
            instance_type: "C5".into(),
            region: "ny2".into(),
            zone: None,
            vcpus: 4.0,
            memory_gb: 8.0,
            gpu: None,
            gpu_count: 0,
            vram_gb: 0.0,
            price_usd_hour: 0.08,
            spot: false,
            source: "mine".into(),
            updated_at: cedana_driver::providers::catalog::Timestamp::from_epoch(1_790_000_000),
        });
    std::fs::write(&cat, c.to_json()).unwrap();
    let out = driver(&sb, &moto, &cat, &["--config", cfg_s, "price", "--refresh"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = cedana_driver::providers::catalog::Catalog::from_file(&cat).unwrap();
    assert_eq!(
        again.entries.len(),
        c.entries.len(),
        "replaced, not added twice"
    );
    assert!(again.entries.iter().any(|e| e.source == "mine"));
    // The table names AWS offers with their market.
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.lines().nth(1).is_some_and(|l| l.starts_with("aws")),
        "{table}"
    );

    // Without a provider that publishes prices, --refresh says so.
    let local = sb.path().join("local.json");
    std::fs::write(&local, r#"{"enabled_providers": ["local"]}"#).unwrap();
    let out = driver(
        &sb,
        &moto,
        &cat,
        &["--config", local.to_str().unwrap(), "price", "--refresh"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no enabled provider has a price API"));
}

#[test]
fn bootstrap_makes_what_aws_workers_need_and_points_the_config_at_it() {
    let moto = MotoServer::start();
    let sb = Sandbox::new();
    let cfg = sb.path().join("home/.cedana/cedana_config.json");
    let cat = sb.path().join("catalog.json");
    let args = [
        "--config",
        cfg.to_str().unwrap(),
        "bootstrap",
        "--provider",
        "aws",
        "--aws-region",
        "us-east-1",
        "--aws-family",
        "t3",
        "--nats-url",
        "nats.example.org",
        "--generate-token",
        "--aws-create",
        "--aws-image",
        AMI,
        "--aws-launch-template",
        "cedana-test-workers",
    ];
    let out = driver(&sb, &moto, &cat, &args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let key = cfg.parent().unwrap().join("cedana.pem");
    let mode = std::fs::metadata(&key)
        .expect("private key saved")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let pem = std::fs::read_to_string(&key).unwrap();
    assert!(pem.contains("PRIVATE KEY"));
    assert!(
        !err.contains(pem.lines().nth(1).unwrap()),
        "the private key was printed"
    );
    assert!(
        err.contains("key pair cedana (made; private key in"),
        "{err}"
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    assert_eq!(v["aws"]["ssh_key_path"], key.display().to_string());
    assert_eq!(v["aws"]["launch_template_name"], "cedana-test-workers");
    assert_eq!(
        v["aws"]["enabled_instance_families"],
        serde_json::json!(["t3"])
    );

    // What moto now has: the key pair, the group with SSH open, the template on the image.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ec2 = rt
        .block_on(Ec2::connect(ConnectOptions {
            region: Some("us-east-1".into()),
            endpoint_url: Some(moto.url()),
            credentials: Some((
                cedana_tests::moto::ACCESS_KEY_ID.into(),
                cedana_protocol::config::Secret::new(cedana_tests::moto::SECRET_ACCESS_KEY),
            )),
            ..Default::default()
        }))
        .unwrap();
    let client = ec2.client("us-east-1");
    let (lt, version) = rt
        .block_on(aws::find_launch_template(&client, "cedana-test-workers"))
        .unwrap()
        .expect("launch template made");
    assert_eq!(version, 1);
    let image = rt
        .block_on(aws::launch_template_image(&client, &lt))
        .unwrap();
    assert_eq!(image.as_deref(), Some(AMI));
    let groups = rt
        .block_on(
            client
                .describe_security_groups()
                .group_names("cedana-workers")
                .send(),
        )
        .expect("security group made");
    let sg = &groups.security_groups()[0];
    assert!(sg
        .ip_permissions()
        .iter()
        .any(|p| p.from_port() == Some(22) && p.to_port() == Some(22)));
    let keys = rt
        .block_on(client.describe_key_pairs().key_names("cedana").send())
        .unwrap();
    assert_eq!(keys.key_pairs().len(), 1);

    // Again: nothing new is made, the key file is kept, the template gets a new version.
    let out = driver(&sb, &moto, &cat, &args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("key pair cedana (there; private key in"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&key).unwrap(), pem);
    let (_, version) = rt
        .block_on(aws::find_launch_template(&client, "cedana-test-workers"))
        .unwrap()
        .unwrap();
    assert_eq!(version, 2);

    // A bad answer is refused before anything is made in AWS.
    let bad = [
        "--config",
        cfg.to_str().unwrap(),
        "bootstrap",
        "--provider",
        "gcp",
        "--aws-create",
        "--aws-key-name",
        "never-made",
    ];
    let out = driver(&sb, &moto, &cat, &bad);
    assert_eq!(out.status.code(), Some(2));
    let keys = rt.block_on(client.describe_key_pairs().send()).unwrap();
    assert!(keys
        .key_pairs()
        .iter()
        .all(|k| k.key_name() != Some("never-made")));
}

/// `down` of a job whose controller died ends its AWS instances, found by their `cedana:job`
/// tag (also one the record does not list: launched just before the controller died), and
/// leaves other jobs' instances alone.
#[test]
fn down_of_an_orphaned_job_terminates_its_instances_by_tag() {
    let moto = MotoServer::start();
    let sb = Sandbox::new();
    let cfg = aws_config(&sb);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ec2 = rt
        .block_on(Ec2::connect(ConnectOptions {
            region: Some("us-east-1".into()),
            endpoint_url: Some(moto.url()),
            credentials: Some((
                cedana_tests::moto::ACCESS_KEY_ID.into(),
                cedana_protocol::config::Secret::new(cedana_tests::moto::SECRET_ACCESS_KEY),
            )),
            ..Default::default()
        }))
        .unwrap();
    let c = ec2.client("us-east-1");
    let launch = |job: &str, worker: &str| {
        rt.block_on(aws::run_instance(
            &c,
            &aws::RunRequest {
                image_id: Some(AMI.into()),
                instance_type: "t2.micro".into(),
                user_data: "#!/bin/sh\n".into(),
                tags: vec![
                    (aws::TAG_JOB.into(), job.into()),
                    ("cedana:worker".into(), worker.into()),
                ],
                ..Default::default()
            },
        ))
        .unwrap()
    };
    let listed = launch("orph-1a2b3c", "w1");
    let unlisted = launch("orph-1a2b3c", "w2");
    let other = launch("other-000000", "w1");
    // The record a controller left when it was killed: worker w1 running on AWS.
    let dir = sb.path().join("orph-1a2b3c");
    std::fs::create_dir_all(&dir).unwrap();
    let dead = {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    };
    std::fs::write(
        dir.join("job.json"),
        serde_json::json!({
            "v": 1, "job": "orph-1a2b3c", "script": "/x/orph.rhai", "state": "running",
            "started_at": 1, "updated_at": 1, "driver_pid": dead,
            "nats_url": "nats://nats.example.org:4222", "embedded_nats": false, "managed": true,
            "workers": [{"id": "w1", "provider": "aws", "pid": 0, "dir": "", "launched_at": 1,
                         "state": "running", "instance": listed}],
            "task": {"name": "task1", "worker": "w1", "pid": 0},
            "checkpoints": [], "recoveries": 0, "migrations": 0, "cost_usd": 0.0,
            "exit_code": null, "error": null
        })
        .to_string(),
    )
    .unwrap();
    let catalog = sb.path().join("catalog.json");
    std::fs::write(&catalog, r#"{"entries": []}"#).unwrap();
    let out = driver(
        &sb,
        &moto,
        &catalog,
        &["--config", cfg.to_str().unwrap(), "down", "orph-1a2b3c"],
    );
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for id in [&listed, &unlisted] {
        assert!(
            said.contains(&format!("instance {id} in us-east-1 terminated")),
            "{said}"
        );
        let v = rt
            .block_on(aws::describe_instance(&c, id))
            .unwrap()
            .unwrap();
        assert!(v.is_gone(), "{id} is {}", v.state);
    }
    let v = rt
        .block_on(aws::describe_instance(&c, &other))
        .unwrap()
        .unwrap();
    assert_eq!(v.state, "running", "another job's instance was ended");
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("job.json")).unwrap()).unwrap();
    assert_eq!(r["state"], "down", "{r}");
    assert_eq!(r["workers"][0]["state"], "terminated", "{r}");
}

/// `cedana-driver check`: each provider usable or not and why, one line each; the NATS server
/// cloud workers need; `price` without credentials says so once and exits 3.
#[test]
fn check_says_which_providers_are_usable_and_why() {
    let moto = MotoServer::start();
    let sb = Sandbox::new();
    let cat = sb.path().join("home/.cedana/catalog.json");
    let cfg = sb.path().join("check.json");
    std::fs::create_dir_all(cat.parent().unwrap()).unwrap();
    std::fs::write(&cat, r#"{"entries": []}"#).unwrap();
    std::fs::write(
        &cfg,
        r#"{"enabled_providers": ["local", "aws", "paperspace"],
            "aws": {"enabled_regions": ["us-east-1"], "enabled_instance_families": ["t2"]},
            "checkpoint_store": {"url": "/nonexistent-parent/store"}}"#,
    )
    .unwrap();
    let out = driver(
        &sb,
        &moto,
        &cat,
        &["--config", cfg.to_str().unwrap(), "check", "--json"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let find = |name: &str| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {v}"))
            .clone()
    };
    let aws = find("aws");
    assert_eq!(
        (aws["enabled"].as_bool(), aws["ok"].as_bool()),
        (Some(true), Some(true)),
        "{aws}"
    );
    assert!(
        aws["detail"]
            .as_str()
            .unwrap()
            .contains("offers in us-east-1"),
        "{aws}"
    );
    let ps = find("paperspace");
    assert_eq!(ps["ok"], false);
    assert!(
        ps["detail"].as_str().unwrap().contains("no API key"),
        "{ps}"
    );
    // Cloud workers and no NATS server in the config: said, with what to give.
    let nats = find("nats");
    assert_eq!(nats["ok"], false);
    assert!(
        nats["detail"]
            .as_str()
            .unwrap()
            .contains("connection.nats_url"),
        "{nats}"
    );
    let local = find("local");
    assert_eq!(local["enabled"], true);
    if nix::unistd::geteuid().is_root() && criu_ready("check_says_which_providers_are_usable") {
        assert_eq!(local["ok"], true, "{local}");
    }
    assert!(
        v.as_array().unwrap().iter().any(|f| f["name"] == "store"),
        "{v}"
    );

    // The text form: one line per finding, the failing ones marked.
    let out = driver(
        &sb,
        &moto,
        &cat,
        &["--config", cfg.to_str().unwrap(), "check"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(text.lines().any(|l| l.starts_with("[ok  ] aws")), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("[FAIL] paperspace")),
        "{text}"
    );
    assert!(text.lines().any(|l| l.starts_with("[FAIL] nats")), "{text}");

    // AWS alone, no credentials anywhere: `check` and `price` say so plainly, once.
    std::fs::write(
        &cfg,
        r#"{"enabled_providers": ["aws"],
            "aws": {"enabled_regions": ["us-east-1"], "enabled_instance_families": ["t2"]},
            "connection": {"nats_url": "nats.example.org", "nats_port": 4222, "auth_token": "tok"}}"#,
    )
    .unwrap();
    let no_creds = |args: &[&str]| {
        let mut c = driver_cmd(sb.path());
        moto.apply_env(&mut c);
        c.env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env("CEDANA_CATALOG", &cat)
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .output()
            .unwrap()
    };
    let out = no_creds(&["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let aws_line = text.lines().find(|l| l.contains("] aws")).unwrap();
    assert!(
        aws_line.starts_with("[FAIL]") && aws_line.contains("no AWS credentials found"),
        "{text}"
    );
    let out = no_creds(&["price"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert_eq!(err.matches("no AWS credentials found").count(), 1, "{err}");
    assert!(err.contains("no provider could be asked"), "{err}");
    assert!(!err.contains("no offer fits"), "{err}");
    assert!(!err.contains("WARN"), "no SDK warnings: {err}");
}
