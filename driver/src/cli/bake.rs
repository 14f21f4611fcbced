//! `cedana-driver bake`: its arguments, resolved against the config; the bake's steps as
//! `==> …` lines on stderr; what was made on stdout (text, or JSON with `--json`).

use std::path::PathBuf;
use std::time::Duration;

use cedana_driver::bake::{self, BakeError, BakeOptions, Baked, DEFAULT_CRIU_PREFIX};
use cedana_driver::job::report::Reporter;
use cedana_driver::util::ssh::{self, Auth, HostKeyPolicy, SshError};

use super::exit::Exit;

/// The `cedana-driver bake` command line.
#[derive(clap::Args, Clone, Debug)]
pub struct BakeArgs {
    /// The stock image to start from (AMI id): a Linux image with cloud-init and sshd
    /// (Debian, Ubuntu, Amazon Linux)
    #[arg(long, value_name = "AMI")]
    pub base_image: String,
    /// Region [default: the first of aws.enabled_regions, else AWS_REGION]
    #[arg(long)]
    pub region: Option<String>,
    /// Instance type of the bake instance
    #[arg(long, default_value = "t3.small")]
    pub instance_type: String,
    /// EC2 key pair for the bake instance and the template
    #[arg(long, value_name = "NAME")]
    pub key_name: Option<String>,
    /// Security group (id) for the bake instance and the template; it must let this
    /// machine reach port 22 [repeatable]
    #[arg(long = "security-group", value_name = "SG")]
    pub security_groups: Vec<String>,
    /// User to log in as (cloud-init lets root in with your key)
    #[arg(long, default_value = "root")]
    pub ssh_user: String,
    /// Private key to log in with [default: aws.ssh_key_path, else ssh-agent's keys]; its
    /// public half (PATH.pub, or derived) is given to the bake instance
    #[arg(long, value_name = "PATH")]
    pub ssh_key: Option<PathBuf>,
    /// Verify the bake instance's host key with this known_hosts file (alone:
    /// ~/.ssh/known_hosts) instead of the key the driver generates for it
    #[arg(long, value_name = "PATH", num_args = 0..=1)]
    pub known_hosts: Option<Option<PathBuf>>,
    /// Which address of the instance to connect to
    #[arg(long, value_enum, default_value_t = ConnectVia::Auto)]
    pub connect_via: ConnectVia,
    /// The agent to install [default: cedana-agent next to this program]; the static
    /// build (tools/lib.sh build_static_agent) runs on any image
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,
    /// CRIU to install: the prefix tools/deps.sh unpacks it into, or a CRIU executable
    #[arg(long, value_name = "PATH", env = "CEDANA_CRIU_PREFIX", default_value = DEFAULT_CRIU_PREFIX)]
    pub criu: PathBuf,
    /// Name of the image [default: cedana-worker-<agent version>-<UTC time>]
    #[arg(long, value_name = "NAME")]
    pub image_name: Option<String>,
    /// Launch template to create, or to give a new default version [default:
    /// aws.launch_template, else cedana-worker]
    #[arg(long, value_name = "NAME")]
    pub launch_template: Option<String>,
    /// Seconds to wait for the instance to run and then for SSH
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub boot_timeout: u64,
    /// Seconds to wait for the image to become available
    #[arg(long, value_name = "SECS", default_value_t = 3600)]
    pub image_timeout: u64,
    /// Print the result as JSON on stdout
    #[arg(long)]
    pub json: bool,
}

/// Which of the instance's addresses to connect to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ConnectVia {
    /// The public address if EC2 gave one, else the private one.
    #[default]
    Auto,
    Public,
    Private,
}

impl From<ConnectVia> for bake::ConnectVia {
    fn from(v: ConnectVia) -> Self {
        match v {
            ConnectVia::Auto => bake::ConnectVia::Auto,
            ConnectVia::Public => bake::ConnectVia::Public,
            ConnectVia::Private => bake::ConnectVia::Private,
        }
    }
}

impl BakeArgs {
    /// Resolves the arguments against the config and the environment.
    pub fn options(&self, config: &cedana_driver::Config) -> Result<BakeOptions, BakeError> {
        let aws_cfg = config.aws.clone().unwrap_or_default();
        let region = self
            .region
            .clone()
            .or_else(|| aws_cfg.enabled_regions.first().cloned())
            .or_else(|| std::env::var("AWS_REGION").ok())
            .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
            .filter(|r| !r.is_empty())
            .ok_or_else(|| {
                BakeError::Invalid(
                    "no region: give --region, or set aws.enabled_regions in the config or AWS_REGION".into(),
                )
            })?;
        let key = self.ssh_key.clone().or(aws_cfg.ssh_key_path.clone());
        let (auth, authorized_keys) = match key {
            Some(path) => {
                let public = ssh::public_key_of(&path)?;
                (Auth::KeyFile(path), vec![public])
            }
            None if std::env::var_os("SSH_AUTH_SOCK").is_some() => {
                (Auth::Agent, ssh::agent_public_keys()?)
            }
            None => {
                return Err(SshError::NoKey {
                    host: "the bake instance".into(),
                }
                .into())
            }
        };
        let known_hosts = match &self.known_hosts {
            None => None,
            Some(Some(p)) => Some(p.clone()),
            Some(None) => Some(HostKeyPolicy::default_known_hosts().ok_or_else(|| {
                BakeError::Invalid("--known-hosts without a path needs $HOME".into())
            })?),
        };
        let agent = match &self.agent {
            Some(p) => p.clone(),
            None => bake::default_agent().ok_or_else(|| BakeError::Agent {
                path: PathBuf::from("cedana-agent"),
                message: "there is none next to cedana-driver: give --agent (tools/lib.sh build_static_agent builds the static one)".into(),
            })?,
        };
        let template_name = self
            .launch_template
            .clone()
            .or(aws_cfg.launch_template.clone())
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| "cedana-worker".into());
        Ok(BakeOptions {
            region,
            base_image: self.base_image.clone(),
            instance_type: self.instance_type.clone(),
            key_name: self.key_name.clone(),
            security_group_ids: self.security_groups.clone(),
            ssh_user: self.ssh_user.clone(),
            ssh_port: 22,
            auth,
            authorized_keys,
            known_hosts,
            connect_via: self.connect_via.into(),
            agent,
            criu: self.criu.clone(),
            image_name: self.image_name.clone(),
            template_name,
            boot_timeout: Duration::from_secs(self.boot_timeout),
            ssh_timeout: Duration::from_secs(self.boot_timeout),
            image_timeout: Duration::from_secs(self.image_timeout),
        })
    }
}

/// The bake's steps as `==> …` lines on stderr.
struct Steps;

impl Reporter for Steps {
    fn note(&self, line: &str) {
        eprintln!("==> {line}");
    }
    fn print(&self, line: &str) {
        println!("{line}");
    }
    fn log(&self, line: &str) {
        eprintln!("==> {line}");
    }
}

/// Why `bake` failed.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Bake(#[from] BakeError),
    #[error(transparent)]
    Runtime(std::io::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// `cedana-driver bake`: resolves the options, bakes, prints the ids (text or `--json`).
pub fn run(args: BakeArgs, config: &cedana_driver::Config) -> Exit {
    match bake_and_show(&args, config) {
        Ok(_) => Exit::Ok,
        Err(e) => {
            super::error(super::chain(&e));
            match e {
                Failure::Bake(BakeError::Invalid(_)) => Exit::Usage,
                Failure::Bake(BakeError::Interrupted { .. }) => Exit::Down,
                _ => Exit::Failed,
            }
        }
    }
}

fn bake_and_show(args: &BakeArgs, config: &cedana_driver::Config) -> Result<Baked, Failure> {
    let opts = args.options(config)?;
    let rt = super::runtime().map_err(Failure::Runtime)?;
    let aws_cfg = config.aws.clone().unwrap_or_default();
    let baked = rt.block_on(bake::connect_and_bake(&opts, &Steps))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&baked)?);
    } else {
        println!("image            {} ({})", baked.image_id, baked.image_name);
        println!(
            "launch template  {} ({})",
            baked.launch_template_id, baked.launch_template_name
        );
        println!("region           {}", baked.region);
        println!(
            "agent {}, CRIU {}; bake instance {} terminated",
            baked.agent_version, baked.criu_version, baked.bake_instance
        );
        if aws_cfg.launch_template.as_deref() != Some(baked.launch_template_name.as_str()) {
            println!(
                "To launch workers from it, set \"launch_template\": \"{}\" in the aws block of your cedana_config.json.",
                baked.launch_template_name
            );
        }
    }
    Ok(baked)
}
