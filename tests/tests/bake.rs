//! `cedana-driver bake` end to end against moto's EC2 API and the instance simulator: the bake
//! instance boots from the driver's `#cloud-config` (sshd with exactly the host key the driver
//! generated), the agent and CRIU go up over SSH, `cedana-agent check` runs there, then
//! CreateImage and the launch template; a worker started from that template runs the agent and
//! CRIU with no setup step. And the refusals: a host key that is not the one given (nothing is
//! uploaded, nothing made) and a failing check (no image). Needs root, moto and openssh-server
//! (tools/deps.sh); CI has them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use cedana_tests::ec2sim::{SimConfig, SimState, Simulator};
use cedana_tests::moto::MotoServer;
use cedana_tests::sshd::{keygen, KeyFiles};

const REGION: &str = "us-east-1";
const TEMPLATE: &str = "cedana-bake-test";

/// Dropped in this order: the simulator before the moto it watches.
struct Env {
    sim: Simulator,
    moto: MotoServer,
    dir: tempfile::TempDir,
    user_key: KeyFiles,
    base: String,
}

fn setup(wrong_host_key: bool) -> Env {
    let moto = MotoServer::start();
    let mut cfg = SimConfig::new(moto.url());
    cfg.wrong_host_key = wrong_host_key;
    let sim = Simulator::start(cfg).expect("instance simulator");
    // A stock image: sshd, nothing of Cedana's.
    let base = sim
        .register_image(REGION, "debian-12-stock", false)
        .expect("register a stock image");
    let dir = tempfile::tempdir().unwrap();
    let user_key = keygen(&dir.path().join("id_ed25519"), "ed25519");
    Env {
        sim,
        moto,
        dir,
        user_key,
        base,
    }
}

/// A binary of the tests crate (next to this test's binary's folder).
fn test_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        p.is_file(),
        "{} missing: cargo builds it with the tests",
        p.display()
    );
    p
}

/// Runs `cedana-driver bake` against moto with no user config, at most 10 minutes.
fn bake(env: &Env, agent: &Path, image_name: &str) -> Output {
    let mut cmd = Command::new(cedana_tests::driver_bin());
    env.moto.apply_env(&mut cmd);
    cmd.env("CEDANA_CONFIG", env.dir.path().join("no-config.json"))
        .env("HOME", env.dir.path())
        .env_remove("SSH_AUTH_SOCK")
        .env("RUST_LOG", "cedana_driver=debug")
        .args([
            "bake",
            "--base-image",
            &env.base,
            "--region",
            REGION,
            "--ssh-key",
        ])
        .arg(&env.user_key.private)
        .arg("--agent")
        .arg(agent)
        .args([
            "--image-name",
            image_name,
            "--launch-template",
            TEMPLATE,
            "--boot-timeout",
            "180",
            "--image-timeout",
            "120",
            "--json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("start cedana-driver bake");
    let pid = child.id();
    // Bounded: a watchdog ends the bake (by its PID) if it hangs.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(600) {
                if done.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            eprintln!("bake did not end within 10 minutes: killing it");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        })
    };
    let out = child.wait_with_output().expect("wait for bake");
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    watchdog.join().unwrap();
    eprintln!(
        "--- bake stderr ---\n{}\n--- bake stdout ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    out
}

/// The instances moto knows tagged as bake instances of `image_name`.
fn bake_instances(env: &Env, image_name: &str) -> Vec<(String, String)> {
    let client = env.sim.client(REGION);
    let out = env
        .sim
        .block_on(
            client
                .describe_instances()
                .filters(
                    aws_sdk_ec2::types::Filter::builder()
                        .name("tag:cedana:bake")
                        .values(image_name)
                        .build(),
                )
                .send(),
        )
        .expect("DescribeInstances");
    out.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .map(|i| {
            (
                i.instance_id().unwrap_or_default().to_string(),
                i.state()
                    .and_then(|s| s.name())
                    .map(|n| n.as_str().to_string())
                    .unwrap_or_default(),
            )
        })
        .collect()
}

/// Images this account made (moto's own public AMIs left out).
fn own_images(env: &Env) -> Vec<(String, String)> {
    let client = env.sim.client(REGION);
    let out = env
        .sim
        .block_on(client.describe_images().owners("self").send())
        .expect("DescribeImages");
    out.images()
        .iter()
        .map(|i| {
            (
                i.image_id().unwrap_or_default().to_string(),
                i.name().unwrap_or_default().to_string(),
            )
        })
        .filter(|(id, _)| *id != env.base)
        .collect()
}

fn template_exists(env: &Env) -> bool {
    let client = env.sim.client(REGION);
    env.sim
        .block_on(
            client
                .describe_launch_templates()
                .launch_template_names(TEMPLATE)
                .send(),
        )
        .map(|o| !o.launch_templates().is_empty())
        .unwrap_or(false)
}

fn decode_b64(s: &str) -> String {
    use base64::Engine as _;
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .expect("base64"),
    )
    .expect("utf-8")
}

/// The bake instance must be gone in moto and torn down in the simulator.
fn assert_terminated(env: &Env, id: &str, state: &str) {
    assert!(
        state == "terminated" || state == "shutting-down",
        "bake instance {id} is {state}"
    );
    env.sim
        .wait_gone(id, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn bake_makes_an_image_and_a_template_whose_workers_need_no_setup() {
    let env = setup(false);
    let agent = cedana_tests::agent_bin();
    let image_name = "cedana-worker-bake-test";
    let out = bake(&env, &agent, image_name);
    assert!(out.status.success(), "bake failed: {:?}", out.status);
    let baked: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let image = baked["image_id"].as_str().unwrap().to_string();
    let template = baked["launch_template_id"].as_str().unwrap().to_string();
    assert!(image.starts_with("ami-"), "{baked}");
    assert!(template.starts_with("lt-"), "{baked}");
    assert_eq!(baked["image_name"], image_name);
    assert_eq!(baked["launch_template_name"], TEMPLATE);
    assert_eq!(baked["base_image"], env.base.as_str());
    let version = String::from_utf8(
        Command::new(&agent)
            .arg("--version")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(
        baked["agent_version"].as_str().unwrap(),
        version.split_whitespace().nth(1).unwrap()
    );
    assert!(
        baked["check"].as_str().unwrap().contains("will work"),
        "{baked}"
    );
    // The static agent (the README's test command) draws no warning.
    if std::env::var_os("CEDANA_REQUIRE_STATIC").is_some_and(|v| v == "1") {
        assert_eq!(baked["warnings"], serde_json::json!([]), "{baked}");
    }

    // The image is in moto under its name.
    let images = own_images(&env);
    assert_eq!(images, vec![(image.clone(), image_name.to_string())]);

    // The template's default version starts workers from it with the agent-starting user-data.
    let client = env.sim.client(REGION);
    let versions = env
        .sim
        .block_on(
            client
                .describe_launch_template_versions()
                .launch_template_id(&template)
                .versions("$Default")
                .send(),
        )
        .expect("DescribeLaunchTemplateVersions");
    let data = versions.launch_template_versions()[0]
        .launch_template_data()
        .expect("template data");
    assert_eq!(data.image_id(), Some(image.as_str()));
    let user_data = decode_b64(data.user_data().expect("template user-data"));
    assert_eq!(
        user_data,
        cedana_driver::bake::template_user_data(
            baked["agent_version"].as_str().unwrap(),
            baked["criu_version"].as_str().unwrap()
        )
    );
    assert!(user_data.starts_with("#!/bin/sh\n"), "{user_data}");
    assert!(user_data.contains("systemctl start --no-block cedana-agent.service"));

    // The bake instance: launched with the driver's #cloud-config, terminated now.
    let instances = bake_instances(&env, image_name);
    assert_eq!(instances.len(), 1, "{instances:?}");
    let (bake_id, state) = &instances[0];
    assert_eq!(baked["bake_instance"], bake_id.as_str());
    assert_terminated(&env, bake_id, state);
    let attr = env
        .sim
        .block_on(
            client
                .describe_instance_attribute()
                .instance_id(bake_id)
                .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
                .send(),
        )
        .expect("DescribeInstanceAttribute");
    let cloud_config = decode_b64(attr.user_data().and_then(|v| v.value()).unwrap());
    assert!(
        cloud_config.starts_with("#cloud-config\n"),
        "{cloud_config}"
    );
    assert!(cloud_config.contains("ed25519_private: |"));
    let user_blob = env.user_key.public.split_whitespace().nth(1).unwrap();
    assert!(cloud_config.contains(user_blob));
    // The host private key went to EC2 only: not in the driver's output or logs (debug).
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let private_lines: Vec<&str> = cloud_config
        .lines()
        .map(str::trim)
        .skip_while(|l| !l.starts_with("-----BEGIN OPENSSH PRIVATE KEY"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    assert!(private_lines.len() >= 3, "{cloud_config}");
    for l in &private_lines {
        assert!(
            !printed.contains(l),
            "the host private key leaked into the output"
        );
    }

    // What the bake left on the instance's disk (the image is that disk): the files, and none
    // of the bake's traces.
    let disk = env.sim.instance(bake_id).unwrap().disk;
    let agent_copy = disk.join("usr-local/bin/cedana-agent");
    assert_eq!(
        std::fs::read(&agent_copy).unwrap(),
        std::fs::read(&agent).unwrap(),
        "the agent on the image is not the one given"
    );
    assert!(disk.join("usr-local/lib/cedana/criu/criu").is_file());
    assert!(disk.join("usr-local/bin/criu").is_file());
    let unit = std::fs::read_to_string(disk.join("etc.upper/systemd/system/cedana-agent.service"))
        .expect("the unit");
    assert_eq!(unit, cedana_driver::bake::unit_file());
    assert!(disk
        .join("etc.upper/systemd/system/multi-user.target.wants/cedana-agent.service")
        .symlink_metadata()
        .is_ok());
    // (The disk's /etc is an overlay's upper folder: a removed file of the image below shows
    // there as a whiteout, a character device, not as a file.)
    let host_keys: Vec<_> = std::fs::read_dir(disk.join("etc.upper/ssh"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("ssh_host_"))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        host_keys.is_empty(),
        "host keys left on the image: {host_keys:?}"
    );
    assert!(
        !disk.join("var/lib/cloud/instance").exists()
            && !disk.join("var/lib/cloud/instances").join(bake_id).exists(),
        "cloud-init's copy of the user-data (with the host private key) is still on the image"
    );
    let authorized =
        std::fs::read_to_string(disk.join("root/.ssh/authorized_keys")).unwrap_or_default();
    assert!(!authorized.contains(user_blob), "{authorized}");

    // A worker from the template: the agent and CRIU work there with no setup step.
    let run = env
        .sim
        .block_on(
            client
                .run_instances()
                .launch_template(
                    aws_sdk_ec2::types::LaunchTemplateSpecification::builder()
                        .launch_template_name(TEMPLATE)
                        .build(),
                )
                .instance_type(aws_sdk_ec2::types::InstanceType::T3Small)
                .min_count(1)
                .max_count(1)
                .send(),
        )
        .expect("RunInstances from the template");
    let worker = run.instances()[0].instance_id().unwrap().to_string();
    let w = env
        .sim
        .wait_running(&worker, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(w.image_id, image);
    // Its init has started; wait (bounded) until it has mounted the instance's file system.
    let start = Instant::now();
    while !env.sim.console(&worker).contains(" up: ") {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "worker {worker} did not finish booting: {}",
            env.sim.console(&worker)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = env
        .sim
        .exec(
            &worker,
            "CEDANA_CRIU=/usr/local/bin/criu /usr/local/bin/cedana-agent check",
        )
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let criu = env
            .sim
            .exec(
                &worker,
                "criu check -v4 -o /dev/stdout 2>&1 | tail -40; mount | head -50",
            )
            .unwrap();
        panic!(
            "check on a worker from the template: {text}{}\n--- criu check there ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&criu.stdout)
        );
    }
    assert!(text.contains("will work"), "{text}");
    // Its CRIU is the bundle the bake installed, not this machine's.
    let out = env
        .sim
        .exec(&worker, "criu --version; command -v criu")
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("/usr/local/bin/criu"), "{text}");
    assert!(
        text.contains(&format!(
            "Version: {}",
            baked["criu_version"].as_str().unwrap()
        )),
        "{text}"
    );

    // The template's user-data starts the agent once the worker's settings are there (what a
    // worker's own user-data writes): it registers with the job's NATS server, using the
    // image's CRIU.
    let nats = GatewayNats::start(env.sim.gateway());
    let env_file = cedana_driver::bake::worker_env("bake-job", "w1", &nats.url(), None).unwrap();
    let script = format!(
        "set -e\nmkdir -p /etc/cedana /var/lib/cedana\n\
         cat > {env} <<'EOF'\n{env_file}EOF\n\
         printf '%s\\n' {token} > {token_file}\n\
         /var/lib/cloud/instance/user-data.txt\n",
        env = cedana_driver::bake::WORKER_ENV,
        token = nats.token,
        token_file = cedana_driver::bake::TOKEN_FILE,
    );
    let out = env.sim.exec(&worker, &script).unwrap();
    assert!(out.status.success(), "{out:?}");
    let record = nats.wait_worker("bake-job.w1", Duration::from_secs(60), || {
        env.sim
            .exec(&worker, "cat /var/log/cedana-agent.log")
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    });
    assert_eq!(
        record["criu_version"].as_str(),
        baked["criu_version"].as_str(),
        "{record}"
    );
    assert_eq!(record["agent_version"], baked["agent_version"], "{record}");
}

/// A token-protected nats-server with JetStream on the simulator's gateway address (where
/// instances reach this machine); killed by PID on drop.
struct GatewayNats {
    child: std::process::Child,
    addr: std::net::Ipv4Addr,
    port: u16,
    token: String,
    _store: tempfile::TempDir,
}

impl GatewayNats {
    fn start(addr: std::net::Ipv4Addr) -> Self {
        let store = tempfile::tempdir().unwrap();
        let token = format!("bake{}", std::process::id());
        let port = {
            let l = std::net::TcpListener::bind((addr, 0)).expect("bind on the gateway");
            l.local_addr().unwrap().port()
        };
        let child = Command::new("nats-server")
            .args([
                "-js",
                "-a",
                &addr.to_string(),
                "-p",
                &port.to_string(),
                "--auth",
                &token,
                "--store_dir",
            ])
            .arg(store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (tools/deps.sh installs it)");
        let start = Instant::now();
        while std::net::TcpStream::connect((addr, port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "nats-server did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        GatewayNats {
            child,
            addr,
            port,
            token,
            _store: store,
        }
    }

    fn url(&self) -> String {
        format!("nats://{}:{}", self.addr, self.port)
    }

    /// The worker's registration (KV `cedana_workers`), waited for at most `within`.
    fn wait_worker(
        &self,
        key: &str,
        within: Duration,
        log: impl Fn() -> String,
    ) -> serde_json::Value {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let client = async_nats::ConnectOptions::with_token(self.token.clone())
                .connect(self.url())
                .await
                .expect("connect to nats");
            let js = async_nats::jetstream::new(client);
            let start = Instant::now();
            loop {
                if let Ok(kv) = js.get_key_value(cedana_protocol::WORKERS_BUCKET).await {
                    if let Ok(Some(v)) = kv.get(key).await {
                        return serde_json::from_slice(&v).expect("a worker record");
                    }
                }
                assert!(
                    start.elapsed() < within,
                    "worker {key} did not register within {within:?}; its agent's log:\n{}",
                    log()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    }
}

impl Drop for GatewayNats {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn bake_refuses_a_host_key_other_than_the_one_it_gave_and_makes_nothing() {
    let env = setup(true);
    let image_name = "cedana-worker-wrong-key";
    let out = bake(&env, &cedana_tests::agent_bin(), image_name);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not match"), "{stderr}");

    let instances = bake_instances(&env, image_name);
    assert_eq!(instances.len(), 1, "{instances:?}");
    let (bake_id, state) = &instances[0];
    // The key the simulator served (not the one in the user-data) is named.
    let served = env.sim.host_key(bake_id).expect("the served host key");
    let served = cedana_driver::util::ssh::PublicKey::parse(&served, "served").unwrap();
    assert!(stderr.contains(&served.fingerprint()), "{stderr}");
    assert_terminated(&env, bake_id, state);

    // Nothing made, nothing uploaded.
    assert!(own_images(&env).is_empty(), "{:?}", own_images(&env));
    assert!(!template_exists(&env));
    let disk = env.sim.instance(bake_id).unwrap().disk;
    assert!(!disk.join("usr-local/bin/cedana-agent").exists());
    assert!(!disk.join("usr-local/lib/cedana").exists());
    // The stdout has no JSON result.
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn bake_makes_no_image_when_the_check_fails_there() {
    let env = setup(false);
    let image_name = "cedana-worker-failing-check";
    let out = bake(&env, &test_bin("failing-agent"), image_name);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`cedana-agent check` failed"), "{stderr}");
    // The check's own output is shown.
    assert!(
        stderr.contains("this agent's check always fails"),
        "{stderr}"
    );

    let instances = bake_instances(&env, image_name);
    assert_eq!(instances.len(), 1, "{instances:?}");
    let (bake_id, state) = &instances[0];
    assert_terminated(&env, bake_id, state);
    assert!(own_images(&env).is_empty(), "{:?}", own_images(&env));
    assert!(!template_exists(&env));
    assert!(matches!(
        env.sim.instance(bake_id).unwrap().state,
        SimState::Terminated
    ));
}

#[test]
fn the_criu_bundle_runs_on_its_own_libraries() {
    let prefix = std::env::var_os("CEDANA_CRIU_PREFIX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(cedana_driver::bake::DEFAULT_CRIU_PREFIX));
    let bundle = cedana_driver::bake::criu_bundle(&prefix)
        .unwrap_or_else(|e| panic!("{e} (tools/deps.sh installs CRIU there)"));
    assert!(bundle.with_loader);
    let dir = tempfile::tempdir().unwrap();
    for (src, name, mode) in &bundle.files {
        let dst = dir.path().join(name);
        std::fs::copy(src, &dst).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(*mode)).unwrap();
    }
    let loader = dir.path().join("ld-linux-x86-64.so.2");
    let criu = dir.path().join("criu");
    // Every library CRIU loads resolves inside the bundle.
    let out = Command::new(&loader)
        .arg("--library-path")
        .arg(dir.path())
        .arg("--list")
        .arg(&criu)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let list = String::from_utf8_lossy(&out.stdout);
    let mut resolved = 0;
    for line in list.lines() {
        let mut f = line.split_whitespace();
        if let (Some(name), Some("=>"), Some(path)) = (f.next(), f.next(), f.next()) {
            assert!(
                Path::new(path).starts_with(dir.path()),
                "{name} resolves outside the bundle: {line}"
            );
            // The loader's own line (its path as CRIU names it) is not a library.
            if !name.starts_with('/') {
                resolved += 1;
            }
        }
    }
    assert!(resolved >= 5, "{list}");
    assert_eq!(resolved + 2, bundle.files.len(), "{list}");
    // And it runs: the version the bundle reports, then CRIU's own kernel check.
    let run = |args: &[&str]| {
        Command::new(&loader)
            .arg("--library-path")
            .arg(dir.path())
            .arg(&criu)
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["--version"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("Version: {}", bundle.version)),
        "{out:?}"
    );
    let out = run(&["check"]);
    assert!(out.status.success(), "criu check from the bundle: {out:?}");

    // The wrapper installed as `criu` runs exactly that.
    let wrapper = cedana_driver::bake::criu_wrapper(&bundle);
    assert!(
        wrapper.contains("--library-path \"$D\" \"$D/criu\" \"$@\""),
        "{wrapper}"
    );
}

#[test]
fn an_interrupted_bake_terminates_its_instance_and_makes_nothing() {
    // With the simulator, so that every address the bake may connect to is on this machine.
    let env = setup(false);
    let image_name = "cedana-interrupted";
    let mut cmd = Command::new(cedana_tests::driver_bin());
    env.moto.apply_env(&mut cmd);
    let mut child = cmd
        .env("CEDANA_CONFIG", env.dir.path().join("no-config.json"))
        .env("HOME", env.dir.path())
        .env_remove("SSH_AUTH_SOCK")
        .args([
            "bake",
            "--base-image",
            &env.base,
            "--region",
            REGION,
            "--ssh-key",
        ])
        .arg(&env.user_key.private)
        .arg("--agent")
        .arg(cedana_tests::agent_bin())
        .args(["--image-name", image_name, "--boot-timeout", "120"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cedana-driver bake");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("launched bake instance") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    // As soon as the instance is launched, interrupt the bake as Ctrl-C would.
    let launched = rx.recv_timeout(Duration::from_secs(120));
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("bake did not end within 60 s of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = reader.join().unwrap();
    eprintln!("{stderr}");
    assert!(launched.is_ok(), "bake launched nothing");
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    let instances = bake_instances(&env, image_name);
    assert_eq!(instances.len(), 1, "{instances:?}");
    let (id, state) = &instances[0];
    assert!(
        state == "terminated" || state == "shutting-down",
        "bake instance {id} is {state}"
    );
    assert!(own_images(&env).is_empty(), "{:?}", own_images(&env));
    assert!(!template_exists(&env));
}
