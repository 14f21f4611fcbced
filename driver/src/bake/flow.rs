//! The cloud side of `bake`: launch the bake instance, connect over SSH, upload and install,
//! check, make the image and the launch template, terminate the instance (see the module
//! documentation of [`crate::bake`]).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::bake::error::BakeError;
use crate::bake::files::{
    bake_cloud_config, check_image_name, check_template_name, cleanup_script, criu_bundle,
    criu_wrapper, inspect_agent, install_script, same_machine, template_user_data, unit_file,
    utc_stamp, AgentBinary, CriuBundle, AGENT_PATH, CRIU_COMMAND, UNIT_NAME,
};
use crate::job::report::Reporter;
use crate::providers::aws::{self, Ec2, InstanceView, RunRequest, TemplateRequest};
use crate::util::ssh::{
    sh_quote, Auth, ConnectOptions, HostKeyPolicy, PublicKey, Remote, SshError, Upload,
    UploadSource,
};

/// Which of the instance's addresses to connect to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConnectVia {
    /// The public address if EC2 gave one, else the private one.
    #[default]
    Auto,
    Public,
    Private,
}

/// Everything `bake` needs, resolved (the command line resolves its arguments into this).
#[derive(Clone, Debug)]
pub struct BakeOptions {
    pub region: String,
    /// The stock image to start from (AMI id).
    pub base_image: String,
    pub instance_type: String,
    /// EC2 key pair for the bake instance (and the template), if any.
    pub key_name: Option<String>,
    pub security_group_ids: Vec<String>,
    pub ssh_user: String,
    pub ssh_port: u16,
    pub auth: Auth,
    /// Public keys allowed to log in to the bake instance (the user's).
    pub authorized_keys: Vec<PublicKey>,
    /// Verify the host with this known_hosts file instead of the key the driver generated.
    pub known_hosts: Option<PathBuf>,
    pub connect_via: ConnectVia,
    pub agent: PathBuf,
    /// A CRIU prefix (tools/deps.sh's layout) or a CRIU executable.
    pub criu: PathBuf,
    /// Default: `cedana-worker-<agent version>-<UTC time>`.
    pub image_name: Option<String>,
    pub template_name: String,
    /// Until the instance runs.
    pub boot_timeout: Duration,
    /// Until SSH lets us in once it runs.
    pub ssh_timeout: Duration,
    /// Until the image is available.
    pub image_timeout: Duration,
}

/// What `bake` made.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Baked {
    pub region: String,
    pub image_id: String,
    pub image_name: String,
    pub launch_template_id: String,
    pub launch_template_name: String,
    pub base_image: String,
    /// The bake instance (terminated).
    pub bake_instance: String,
    pub agent_version: String,
    pub criu_version: String,
    /// What `cedana-agent check` printed on the bake instance.
    pub check: String,
    /// Things worth knowing that did not stop the bake.
    pub warnings: Vec<String>,
}

/// Bakes an image: see the module documentation. `report` gets one note per step.
pub async fn bake(
    ec2: &Ec2,
    opts: &BakeOptions,
    report: &dyn Reporter,
) -> Result<Baked, BakeError> {
    // Everything that can be checked here is checked before anything is launched.
    check_template_name(&opts.template_name)?;
    if opts.authorized_keys.is_empty() {
        return Err(BakeError::Invalid(
            "no public key to authorize on the bake instance: give --ssh-key (with its .pub next to it) or load a key into ssh-agent".into(),
        ));
    }
    let mut warnings = Vec::new();
    let agent = inspect_agent(&opts.agent, &mut warnings)?;
    let criu = criu_bundle(&opts.criu)?;
    let image_name = match &opts.image_name {
        Some(n) => n.clone(),
        None => format!(
            "cedana-worker-{}-{}",
            agent.version,
            utc_stamp(cedana_protocol::now())
        ),
    };
    check_image_name(&image_name)?;
    for w in &warnings {
        report.note(&format!("warning: {w}"));
    }
    report.note(&format!(
        "agent {} ({}), CRIU {} ({} files)",
        agent.version,
        agent.path.display(),
        criu.version,
        criu.files.len()
    ));

    let client = ec2.client(&opts.region);
    match aws::describe_image(&client, &opts.base_image).await? {
        None => {
            return Err(BakeError::Invalid(format!(
                "base image {} does not exist in {} (or this account cannot see it): check --base-image and --region",
                opts.base_image, opts.region
            )))
        }
        Some(img) => {
            if let Some(arch) = img.architecture.as_deref() {
                if !same_machine(arch, &agent.elf.machine) {
                    return Err(BakeError::Agent {
                        path: agent.path.clone(),
                        message: format!(
                            "it is built for {} but base image {} is {arch}: give --agent built for {arch}, or a base image for {}",
                            agent.elf.machine, opts.base_image, agent.elf.machine
                        ),
                    });
                }
            }
        }
    }

    let host_key = crate::util::ssh::generate_ed25519(&format!("cedana-bake {image_name}"))?;
    let user_data = bake_cloud_config(&host_key, &opts.authorized_keys);
    let request = RunRequest {
        image_id: Some(opts.base_image.clone()),
        launch_template: None,
        instance_type: opts.instance_type.clone(),
        zone: None,
        spot: false,
        max_price: None,
        user_data,
        key_name: opts.key_name.clone(),
        security_group_ids: opts.security_group_ids.clone(),
        tags: vec![
            ("Name".into(), format!("cedana-bake {image_name}")),
            ("cedana:bake".into(), image_name.clone()),
        ],
        ..Default::default()
    };
    // Ctrl-C or SIGTERM from here on ends the bake with its instance terminated: the
    // handlers are in place before the launch (a signal during it is seen right after).
    let signal = |kind: tokio::signal::unix::SignalKind| {
        tokio::signal::unix::signal(kind)
            .map_err(|e| BakeError::Invalid(format!("cannot watch for Ctrl-C and SIGTERM: {e}")))
    };
    let mut sigint = signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = signal(tokio::signal::unix::SignalKind::terminate())?;
    let instance = aws::run_instance(&client, &request).await?;
    report.note(&format!(
        "launched bake instance {instance} ({}, {}) in {}",
        opts.base_image, opts.instance_type, opts.region
    ));

    let work = after_launch(
        &client,
        opts,
        &instance,
        &host_key.public,
        &agent,
        &criu,
        &image_name,
        report,
    );
    let result = tokio::select! {
        r = work => r,
        _ = sigint.recv() => Err(BakeError::Interrupted { instance: instance.clone() }),
        _ = sigterm.recv() => Err(BakeError::Interrupted { instance: instance.clone() }),
    };
    // The bake instance goes in every case.
    match aws::terminate(&client, &instance).await {
        Ok(()) => report.note(&format!("terminated bake instance {instance}")),
        Err(e) => {
            let m = format!(
                "could not terminate bake instance {instance}: {e}; terminate it yourself (it is tagged cedana:bake)"
            );
            tracing::warn!("{m}");
            report.note(&format!("warning: {m}"));
            warnings.push(m);
        }
    }
    let (image_id, launch_template_id, check) = result?;
    Ok(Baked {
        region: opts.region.clone(),
        image_id,
        image_name,
        launch_template_id,
        launch_template_name: opts.template_name.clone(),
        base_image: opts.base_image.clone(),
        bake_instance: instance,
        agent_version: agent.version,
        criu_version: criu.version,
        check,
        warnings,
    })
}

#[allow(clippy::too_many_arguments)]
async fn after_launch(
    client: &aws_sdk_ec2::Client,
    opts: &BakeOptions,
    instance: &str,
    host_key: &PublicKey,
    agent: &AgentBinary,
    criu: &CriuBundle,
    image_name: &str,
    report: &dyn Reporter,
) -> Result<(String, String, String), BakeError> {
    let view = aws::wait_running(client, instance, opts.boot_timeout).await?;
    let address = address_of(&view, opts.connect_via).ok_or_else(|| BakeError::Remote {
        instance: instance.to_string(),
        message: format!(
            "EC2 reports no {} address for it",
            match opts.connect_via {
                ConnectVia::Public => "public",
                ConnectVia::Private => "private",
                ConnectVia::Auto => "public or private",
            }
        ),
    })?;
    report.note(&format!(
        "{instance} is running at {address}; connecting as {} (host key {})",
        opts.ssh_user,
        match &opts.known_hosts {
            Some(p) => format!("from {}", p.display()),
            None => host_key.fingerprint(),
        }
    ));
    let policy = match &opts.known_hosts {
        Some(p) => HostKeyPolicy::KnownHosts(p.clone()),
        None => HostKeyPolicy::Expect(host_key.clone()),
    };
    let mut connect = ConnectOptions::new(&address, &opts.ssh_user, policy, opts.auth.clone());
    connect.port = opts.ssh_port;
    let remote = connect_when_up(connect, opts.ssh_timeout)
        .await
        .map_err(|e| match e {
            BakeError::Ssh(e) if e.is_transient() => BakeError::Remote {
                instance: instance.to_string(),
                message: format!(
                    "no SSH at {address} port {} within {} s ({e}): check that a security group lets this machine reach that port, that the address is reachable from here (--connect-via), and that the image runs sshd and cloud-init",
                    opts.ssh_port,
                    opts.ssh_timeout.as_secs()
                ),
            },
            other => other,
        })?;

    let check = provision(&remote, opts, instance, agent, criu, report).await?;
    drop(remote);

    report.note(&format!("creating image {image_name} from {instance}"));
    let description = format!(
        "Cedana worker: cedana-agent {} with CRIU {}, from {} (cedana-driver bake)",
        agent.version, criu.version, opts.base_image
    );
    let image = aws::create_image(client, instance, image_name, &description).await?;
    aws::wait_image_available(client, &image, opts.image_timeout)
        .await
        .map_err(|e| BakeError::AfterImage {
            image: image.clone(),
            message: format!("it did not become available: {e}"),
        })?;
    report.note(&format!("image {image} is available"));

    let template = aws::ensure_launch_template(
        client,
        &TemplateRequest {
            name: opts.template_name.clone(),
            image_id: image.clone(),
            instance_type: None,
            key_name: opts.key_name.clone(),
            security_group_ids: opts.security_group_ids.clone(),
            user_data: template_user_data(&agent.version, &criu.version),
        },
    )
    .await
    .map_err(|e| BakeError::AfterImage {
        image: image.clone(),
        message: format!("launch template {} failed: {e}", opts.template_name),
    })?;
    report.note(&format!(
        "launch template {} ({template}) now starts workers from {image}",
        opts.template_name
    ));
    Ok((image, template, check))
}

fn address_of(view: &InstanceView, via: ConnectVia) -> Option<String> {
    let public = view.public_ip.clone().filter(|s| !s.is_empty());
    let private = view.private_ip.clone().filter(|s| !s.is_empty());
    match via {
        ConnectVia::Auto => public.or(private),
        ConnectVia::Public => public,
        ConnectVia::Private => private,
    }
}

/// Connects once sshd answers: connection failures are retried (the machine is booting),
/// a refused login for a while (cloud-init may write the key after sshd starts), a wrong
/// host key never.
async fn connect_when_up(opts: ConnectOptions, within: Duration) -> Result<Remote, BakeError> {
    let deadline = Instant::now() + within;
    let mut refused_since: Option<Instant> = None;
    loop {
        match Remote::connect(opts.clone()).await {
            Ok(r) => return Ok(r),
            Err(e) => {
                let now = Instant::now();
                let retry = match &e {
                    e if e.is_transient() => true,
                    SshError::AuthRejected { .. } => {
                        let since = *refused_since.get_or_insert(now);
                        now.duration_since(since) < Duration::from_secs(60)
                    }
                    _ => false,
                };
                if !retry || now >= deadline {
                    return Err(e.into());
                }
                tracing::debug!(error = %e, "SSH not ready yet");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

const STEP: Duration = Duration::from_secs(120);

async fn run(
    remote: &Remote,
    instance: &str,
    command: &str,
    timeout: Duration,
) -> Result<crate::util::ssh::ExecOutput, BakeError> {
    let out = remote.exec(command, timeout).await?;
    if out.success() {
        Ok(out)
    } else {
        Err(BakeError::Remote {
            instance: instance.to_string(),
            message: format!(
                "`{command}` failed (status {}{}):\n{}",
                out.status,
                out.signal
                    .as_deref()
                    .map(|s| format!(", signal {s}"))
                    .unwrap_or_default(),
                out.tail(30)
            ),
        })
    }
}

/// Uploads, installs, checks, cleans up; returns the check's output.
async fn provision(
    remote: &Remote,
    opts: &BakeOptions,
    instance: &str,
    agent: &AgentBinary,
    criu: &CriuBundle,
    report: &dyn Reporter,
) -> Result<String, BakeError> {
    let facts = run(
        remote,
        instance,
        "uname -m; id -u; printf '%s\\n' \"$HOME\"",
        STEP,
    )
    .await?;
    let mut lines = facts.stdout.lines();
    let (machine, uid, home) = (
        lines.next().unwrap_or_default().to_string(),
        lines.next().unwrap_or_default().trim().to_string(),
        lines.next().unwrap_or("/root").to_string(),
    );
    if !same_machine(&machine, &agent.elf.machine) {
        return Err(BakeError::Remote {
            instance: instance.to_string(),
            message: format!(
                "it is {} but the agent {} is built for {}: bake an image of the agent's architecture or give --agent for {}",
                machine.trim(),
                agent.path.display(),
                agent.elf.machine,
                machine.trim()
            ),
        });
    }
    let sudo = if uid == "0" {
        ""
    } else {
        run(remote, instance, "sudo -n true", STEP).await.map_err(|_| {
            BakeError::Remote {
                instance: instance.to_string(),
                message: format!(
                    "{} is not root and cannot use sudo without a password: use --ssh-user root or a user with passwordless sudo",
                    opts.ssh_user
                ),
            }
        })?;
        "sudo -n "
    };
    // cloud-init may still be finishing (it rewrites files we are about to change).
    let _ = remote
        .exec(
            &format!("if command -v cloud-init >/dev/null 2>&1 && [ -d /run/cloud-init ]; then {sudo}cloud-init status --wait >/dev/null 2>&1; fi; true"),
            Duration::from_secs(600),
        )
        .await;

    let staging = run(
        remote,
        instance,
        "mktemp -d /tmp/cedana-bake.XXXXXXXX",
        STEP,
    )
    .await?
    .stdout
    .trim()
    .to_string();
    if !staging.starts_with("/tmp/cedana-bake.") {
        return Err(BakeError::Remote {
            instance: instance.to_string(),
            message: format!("mktemp printed {staging:?}"),
        });
    }
    run(
        remote,
        instance,
        &format!("mkdir {}/criu", sh_quote(&staging)),
        STEP,
    )
    .await?;
    let mut files = vec![Upload {
        source: UploadSource::File(agent.path.clone()),
        remote: format!("{staging}/cedana-agent"),
        mode: 0o755,
    }];
    for (local, name, mode) in &criu.files {
        files.push(Upload {
            source: UploadSource::File(local.clone()),
            remote: format!("{staging}/criu/{name}"),
            mode: *mode,
        });
    }
    let generated = [
        ("criu-wrapper", criu_wrapper(criu), 0o755),
        (UNIT_NAME, unit_file(), 0o644),
        ("install.sh", install_script(criu), 0o755),
        (
            "cleanup.sh",
            cleanup_script(instance, &opts.authorized_keys, &home),
            0o755,
        ),
    ];
    for (name, text, mode) in generated {
        files.push(Upload {
            source: UploadSource::Bytes(text.into_bytes()),
            remote: format!("{staging}/{name}"),
            mode,
        });
    }
    let total = crate::util::ssh::total_len(&files)?;
    report.note(&format!(
        "uploading the agent and CRIU ({:.1} MiB)",
        total as f64 / 1_048_576.0
    ));
    let bar = crate::util::ssh::progress_bar(total, "upload");
    remote.upload(files, bar.clone()).await?;
    bar.finish_and_clear();

    run(
        remote,
        instance,
        &format!("{sudo}sh {}/install.sh", sh_quote(&staging)),
        STEP,
    )
    .await?;
    report.note("installed; running `cedana-agent check` there");
    let check = remote
        .exec(
            &format!("{sudo}env CEDANA_CRIU={CRIU_COMMAND} {AGENT_PATH} check"),
            STEP,
        )
        .await?;
    let output = format!("{}{}", check.stdout, check.stderr);
    if !check.success() {
        return Err(BakeError::CheckFailed {
            instance: instance.to_string(),
            output: output.trim_end().to_string(),
        });
    }
    report.note("check passed; removing the temporary host keys and the bake's own traces");
    run(
        remote,
        instance,
        &format!("{sudo}sh {}/cleanup.sh", sh_quote(&staging)),
        STEP,
    )
    .await?;
    Ok(output)
}

/// Connects to EC2 in the options' region and bakes there (see [`bake`]).
pub async fn connect_and_bake(
    opts: &BakeOptions,
    report: &dyn Reporter,
) -> Result<Baked, BakeError> {
    let ec2 = Ec2::connect(&aws::ConnectOptions {
        region: Some(opts.region.clone()),
        ..Default::default()
    })
    .await?;
    bake(&ec2, opts, report).await
}
