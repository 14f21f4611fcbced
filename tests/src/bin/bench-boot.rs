//! `bench-boot`: how long a job takes from `cedana-driver run` to its task running on the `aws`
//! provider, with a **baked** image (the launch template's AMI has the agent and CRIU; the
//! worker's user-data starts the agent) against **the original's path** (a stock image; once
//! the instance runs: wait for SSH, upload the agent and CRIU over SSH, run the setup commands,
//! start the agent over SSH). Both run in the same process against the same moto server and
//! instance simulator, alternating, `BENCH_RUNS` times each; medians and their ratio are
//! printed as a Markdown table.
//!
//! In both runs the same driver binary runs the same job with the same config but for the
//! launch template. In the SSH runs the driver launches from the stock image, whose user-data
//! cannot start an agent that is not there; this program then plays the original's
//! provisioning step: it sees the instance run (as the original polled DescribeInstances),
//! connects, verifying the host key the instance printed at boot (as cloud-init prints its fingerprints to the console; never trust on first
//! use) with the driver's own SSH client (`cedana_driver::util::ssh`, as `bake` uses), uploads the
//! agent and a tar of CRIU over SFTP, runs the setup (unpacking CRIU, `cedana-agent check`),
//! and starts the agent with the job's settings (the boot script the driver gave the
//! instance, uploaded and run). The driver meanwhile waits for the worker to
//! register, as it would for a slow boot.
//!
//! Run by `tools/bench-boot.sh`. Environment: `BENCH_RUNS` (default 5), `BENCH_LINK_MBIT`
//! (the link's rate to the instances; unlimited by default), `BENCH_DIR` (work folder), `BENCH_PIDS` (every process started is noted there as `PID STARTTIME`, so the
//! script can end leftovers), `CEDANA_AGENT_BIN` (the static agent), `CEDANA_DRIVER_BIN`.
//! Every wait is bounded.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use aws_sdk_ec2::types::RequestLaunchTemplateData;
use cedana_tests::ec2sim::{SimConfig, SimState, Simulator};
use cedana_tests::moto::MotoServer;
use cedana_tests::NatsServer;

const REGION: &str = "us-east-1";
const MARKER: &str = "task-is-running";

/// One run's figures, seconds from the driver's start.
#[derive(Debug, Default, Clone)]
struct Run {
    /// The instance booted in the simulator (moto said running).
    booted: f64,
    /// SSH path: sshd answered, the files were uploaded, setup ran, the agent was started.
    ssh_open: Option<f64>,
    uploaded: Option<f64>,
    setup: Option<f64>,
    agent_started: Option<f64>,
    /// The task's first output line reached the driver's stdout.
    task: f64,
}

fn main() -> Result<()> {
    let runs: usize = std::env::var("BENCH_RUNS")
        .unwrap_or_else(|_| "5".into())
        .parse()
        .context("BENCH_RUNS is not a number")?;
    if runs == 0 {
        bail!("BENCH_RUNS must be at least 1");
    }
    let dir = PathBuf::from(std::env::var("BENCH_DIR").context("BENCH_DIR is not set")?);
    let driver = PathBuf::from(std::env::var("CEDANA_DRIVER_BIN").context("CEDANA_DRIVER_BIN")?);
    let agent = PathBuf::from(std::env::var("CEDANA_AGENT_BIN").context("CEDANA_AGENT_BIN")?);

    let link: Option<u32> = match std::env::var("BENCH_LINK_MBIT") {
        Ok(v) if !v.is_empty() => Some(v.parse().context("BENCH_LINK_MBIT is not a number")?),
        _ => None,
    };
    let moto = MotoServer::start();
    note_pid(moto.pid());
    let sim = Simulator::start(SimConfig {
        agent: agent.clone(),
        link_mbit: link,
        ..SimConfig::new(moto.url())
    })
    .map_err(|e| anyhow!("simulator: {e}"))?;
    let nats = NatsServer::start_on(sim.gateway().into());
    note_pid(nats.pid());
    let client = sim.client(REGION);

    // The user's key pair (the original logged in with it), the two images and templates.
    let key = dir.join("id_ed25519");
    keygen(&key)?;
    let public = std::fs::read_to_string(key.with_extension("pub"))?;
    sim.block_on(
        client
            .import_key_pair()
            .key_name("bench")
            .public_key_material(aws_sdk_ec2::primitives::Blob::new(public.trim().as_bytes()))
            .send(),
    )
    .map_err(|e| {
        anyhow!(
            "ImportKeyPair: {}",
            aws_sdk_ec2::error::DisplayErrorContext(e)
        )
    })?;
    for (name, baked) in [("bench-baked", true), ("bench-stock", false)] {
        let ami = sim
            .register_image(REGION, name, baked)
            .map_err(|e| anyhow!("{e}"))?;
        sim.block_on(
            client
                .create_launch_template()
                .launch_template_name(name)
                .launch_template_data(
                    RequestLaunchTemplateData::builder()
                        .image_id(ami)
                        .key_name("bench")
                        .build(),
                )
                .send(),
        )
        .map_err(|e| {
            anyhow!(
                "CreateLaunchTemplate: {}",
                aws_sdk_ec2::error::DisplayErrorContext(e)
            )
        })?;
    }
    let catalog = dir.join("catalog.json");
    std::fs::write(
        &catalog,
        format!(
            r#"{{"entries": [{{"provider": "aws", "instance_type": "t3.micro", "region": "{REGION}", "vcpus": 2, "memory_gb": 1, "price_usd_hour": 0.0104, "source": "bench", "updated_at": "2026-01-01T00:00:00Z"}}]}}"#
        ),
    )?;
    let job = dir.join("job.yml");
    std::fs::write(
        &job,
        format!(
            "instance_specs: {{cpu_cores: 2, memory_gb: 1}}\n\
             task:\n  run:\n    - \"echo {MARKER}; sleep 1\"\n"
        ),
    )?;

    let mut baked = Vec::new();
    let mut ssh = Vec::new();
    for i in 0..runs {
        for (template, out) in [("bench-baked", &mut baked), ("bench-stock", &mut ssh)] {
            let r = one_run(
                &sim, &moto, &nats, &driver, &agent, &dir, &catalog, &job, &key, template, i,
            )
            .with_context(|| format!("run {} with {template}", i + 1))?;
            eprintln!("bench-boot: {template} run {}: {r:?}", i + 1);
            out.push(r);
        }
    }
    report(&baked, &ssh, link);
    drop(sim);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn one_run(
    sim: &Simulator,
    moto: &MotoServer,
    nats: &NatsServer,
    driver: &Path,
    agent: &Path,
    dir: &Path,
    catalog: &Path,
    job: &Path,
    key: &Path,
    template: &str,
    i: usize,
) -> Result<Run> {
    let run_dir = dir.join(format!("{template}-{i}"));
    std::fs::create_dir_all(&run_dir)?;
    let config = run_dir.join("cedana_config.json");
    std::fs::write(
        &config,
        serde_json::json!({
            "enabled_providers": ["aws"],
            "aws": {
                "enabled_regions": [REGION],
                "enabled_instance_families": ["t3.micro"],
                "launch_template": template,
                "spot": false,
            },
            "connection": {
                "nats_url": sim.gateway().to_string(),
                "nats_port": nats.port,
                "auth_token": nats.token,
            },
        })
        .to_string(),
    )?;
    let known: Vec<String> = sim.instances().into_iter().map(|i| i.id).collect();
    let stdout = run_dir.join("driver.stdout");
    let mut cmd = Command::new(driver);
    cmd.arg("run")
        .arg("--checkpoint-every")
        .arg("0")
        .arg(job)
        .env("CEDANA_CONFIG", &config)
        .env("CEDANA_STATE_DIR", run_dir.join("state"))
        .env("CEDANA_CATALOG", catalog)
        .env_remove("CEDANA_AGENT_BIN")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout)?)
        .stderr(std::fs::File::create(run_dir.join("driver.stderr"))?);
    moto.apply_env(&mut cmd);
    let start = Instant::now();
    let mut child = ChildGuard(cmd.spawn().context("start cedana-driver")?);
    note_pid(child.0.id());

    let secs = |t: Instant| t.duration_since(start).as_secs_f64();
    let mut r = Run::default();
    // The new instance, once the simulator booted it.
    let inst = loop {
        if let Some(i) = sim
            .instances()
            .into_iter()
            .find(|i| !known.contains(&i.id) && i.state == SimState::Running)
        {
            break i;
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!(
                "no instance ran within 120 s; driver: {}",
                tail(&run_dir.join("driver.stderr"))
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    r.booted = secs(inst.booted.unwrap_or_else(Instant::now));
    if template == "bench-stock" {
        let steps = provision(sim, agent, key, &inst.id, inst.private_ip)?;
        r.ssh_open = Some(secs(steps[0]));
        r.uploaded = Some(secs(steps[1]));
        r.setup = Some(secs(steps[2]));
        r.agent_started = Some(secs(steps[3]));
    }
    loop {
        let out = std::fs::read_to_string(&stdout).unwrap_or_default();
        if out.lines().any(|l| l.trim() == MARKER) {
            r.task = secs(Instant::now());
            break;
        }
        if start.elapsed() > Duration::from_secs(300) {
            bail!(
                "the task did not run within 300 s; driver: {}",
                tail(&run_dir.join("driver.stderr"))
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = child.0.try_wait()? {
            if !status.success() {
                bail!(
                    "the driver failed ({status}): {}",
                    tail(&run_dir.join("driver.stderr"))
                );
            }
            break;
        }
        if Instant::now() > deadline {
            bail!("the driver did not end within 120 s of the task");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    sim.wait_gone(&inst.id, Duration::from_secs(60))
        .map_err(|e| anyhow!("{e}"))?;
    Ok(r)
}

/// The driver: killed (by its PID) if it still runs when the run ends, say on an error.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// The original's provisioning over SSH (the driver's `ssh` module: ssh2, host key checked);
/// the times sshd answered, the uploads ended, setup ended and the agent was started.
fn provision(
    sim: &Simulator,
    agent: &Path,
    key: &Path,
    id: &str,
    ip: Ipv4Addr,
) -> Result<[Instant; 4]> {
    use cedana_driver::util::ssh::{
        Auth, ConnectOptions, HostKeyPolicy, PublicKey, Ssh, Upload, UploadSource,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect_timeout(&SocketAddr::from((ip, 22)), Duration::from_millis(200))
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("sshd of {id} did not answer within 60 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // The host key the instance printed at boot (cloud-init's console fingerprints).
    let host_key = sim
        .host_key(id)
        .ok_or_else(|| anyhow!("{id} has no host key"))?;
    let expected = PublicKey::parse(&host_key, "the instance's host key")?;
    let opts = ConnectOptions::new(
        &ip.to_string(),
        "root",
        HostKeyPolicy::Expect(expected),
        Auth::KeyFile(key.to_path_buf()),
    );
    let ssh = Ssh::connect(&opts)?;
    let open = Instant::now();
    let run = |cmd: &str| -> Result<()> {
        let out = ssh.exec(cmd, Duration::from_secs(120))?;
        if !out.success() {
            bail!("{cmd:?} on {id}: {}", out.tail(10));
        }
        Ok(())
    };
    // The agent, and CRIU as tools/deps.sh installs it (a tar of its launcher and prefix).
    let tar = Command::new("tar")
        .args([
            "-C",
            "/",
            "-cf",
            "-",
            "usr/local/sbin/criu",
            "opt/cedana/criu",
        ])
        .output()?;
    if !tar.status.success() {
        bail!("tar of CRIU: {}", String::from_utf8_lossy(&tar.stderr));
    }
    ssh.upload(
        &[
            Upload {
                source: UploadSource::File(agent.to_path_buf()),
                remote: "/usr/local/bin/cedana-agent".into(),
                mode: 0o755,
            },
            Upload {
                source: UploadSource::Bytes(tar.stdout),
                remote: "/root/criu.tar".into(),
                mode: 0o600,
            },
        ],
        &indicatif::ProgressBar::hidden(),
    )?;
    run("tar -C / -xf /root/criu.tar && rm /root/criu.tar")?;
    let uploaded = Instant::now();
    // Setup: what the original ran before it could start its daemon.
    run("mkdir -p /var/lib/cedana && cedana-agent check >/dev/null")?;
    let setup = Instant::now();
    // The agent, started with the job's settings (the boot script the driver made).
    let boot = sim
        .block_on(
            sim.client(REGION)
                .describe_instance_attribute()
                .instance_id(id)
                .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
                .send(),
        )
        .map_err(|e| {
            anyhow!(
                "DescribeInstanceAttribute: {}",
                aws_sdk_ec2::error::DisplayErrorContext(e)
            )
        })?;
    let script = boot
        .user_data()
        .and_then(|u| u.value())
        .and_then(cedana_tests::ec2sim::base64_decode)
        .ok_or_else(|| anyhow!("{id} has no user-data"))?;
    ssh.upload(
        &[Upload {
            source: UploadSource::Bytes(script),
            remote: "/var/lib/cedana/start.sh".into(),
            mode: 0o700,
        }],
        &indicatif::ProgressBar::hidden(),
    )?;
    run("/var/lib/cedana/start.sh")?;
    let started = Instant::now();
    Ok([open, uploaded, setup, started])
}

/// Notes `pid` and its start time in `$BENCH_PIDS` (the script ends what is left of them).
fn note_pid(pid: u32) {
    let Some(file) = std::env::var_os("BENCH_PIDS") else {
        return;
    };
    let start = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(") ")
                .and_then(|(_, rest)| rest.split_whitespace().nth(19).map(str::to_string))
        });
    if let (Some(start), Ok(mut f)) = (
        start,
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(file),
    ) {
        let _ = writeln!(f, "{pid} {start}");
    }
}

fn keygen(path: &Path) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "bench-boot", "-f"])
        .arg(path)
        .output()
        .context("ssh-keygen")?;
    if !out.status.success() {
        bail!("ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn report(baked: &[Run], ssh: &[Run], link: Option<u32>) {
    let m = |rs: &[Run], f: &dyn Fn(&Run) -> Option<f64>| {
        let xs: Vec<f64> = rs.iter().filter_map(f).collect();
        (!xs.is_empty()).then(|| median(xs))
    };
    let cell = |x: Option<f64>| x.map(|v| format!("{v:.2}")).unwrap_or_else(|| "".into());
    println!(
        "\n### `cedana-driver run` to the task running on the aws provider (moto + instance simulator), {}, median of {}\n",
        match link {
            Some(m) => format!("{m} Mbit/s link to the instances"),
            None => "unlimited link".to_string(),
        },
        baked.len()
    );
    println!("| path | instance booted s | sshd answers s | agent + CRIU uploaded s | setup done s | agent started s | task running s | min | max |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (name, rs) in [
        ("baked image (user-data starts the agent)", baked),
        ("stock image + SSH (the original's path)", ssh),
    ] {
        let tasks: Vec<f64> = rs.iter().map(|r| r.task).collect();
        println!(
            "| {name} | {} | {} | {} | {} | {} | **{}** | {:.2} | {:.2} |",
            cell(m(rs, &|r| Some(r.booted))),
            cell(m(rs, &|r| r.ssh_open)),
            cell(m(rs, &|r| r.uploaded)),
            cell(m(rs, &|r| r.setup)),
            cell(m(rs, &|r| r.agent_started)),
            cell(m(rs, &|r| Some(r.task))),
            tasks.iter().cloned().fold(f64::INFINITY, f64::min),
            tasks.iter().cloned().fold(0.0, f64::max),
        );
    }
    let (b, s) = (
        median(baked.iter().map(|r| r.task).collect()),
        median(ssh.iter().map(|r| r.task).collect()),
    );
    println!(
        "\nstock + SSH / baked: **{:.2}x** ({s:.2} s against {b:.2} s; {:.2} s saved per worker)",
        s / b,
        s - b
    );
}
