//! The EC2 instance simulator: boots, on this machine, every instance moto's EC2 server reports
//! `running`, so the driver's AWS provider can be tested end to end against moto.
//!
//! moto answers the EC2 API but runs nothing. The simulator watches its `DescribeInstances`
//! (a thread polling every few hundred milliseconds) and, for each running instance:
//!
//! - **Network**: a network namespace (`ec2sim-<instance id>`) whose `eth0` carries the
//!   instance's moto `PrivateIpAddress` (and its public address, if moto gave one), joined to
//!   this machine by a veth pair with a host route to each address, so this machine reaches the
//!   instance at the address EC2 reports. The instance's default route leads to
//!   [`GATEWAY`] (198.18.0.1, from the range RFC 2544 sets aside for network tests), an
//!   address on an interface of this machine (`ec2sim0`): servers the instances must reach (the job's
//!   NATS server) listen there. Nothing is forwarded: instances reach this machine, not each
//!   other or the outside.
//! - **Instance metadata**: a fake IMDSv2 ([`crate::imds`]) at 169.254.169.254:80 inside the
//!   namespace: token, `instance-id`, `instance-type`, `ami-id`, `local-ipv4`, placement,
//!   `instance-life-cycle`, the key pair's public key, user-data, the identity document, and
//!   `spot/instance-action` / `events/recommendations/rebalance`, 404 until the test calls
//!   [`Simulator::spot_notice`] or [`Simulator::rebalance`].
//! - **The machine**: a PID namespace (killing its init ends every process of the instance), a
//!   UTS namespace (hostname `ip-a-b-c-d`) and a private mount namespace over this machine's
//!   files where the instance's own "disk" (`<sim dir>/<instance id>/`) shows at `/usr/local`,
//!   `/opt`, `/var`, `/root` and `/home`, `/etc` is an overlay (the instance's writes land on
//!   its disk), `/usr` is read-only, `/tmp` and `/run` are fresh tmpfs, `/proc` and `/sys` are
//!   the namespaces' own. The image decides what the disk starts with: a **stock** image has
//!   sshd and nothing of Cedana's; a **baked** image (the AMI ids in
//!   [`SimConfig::baked_images`]) also has `/usr/local/bin/cedana-agent` (the agent under test)
//!   and CRIU (`/usr/local/sbin/criu` and its prefix under `/opt`, as `tools/deps.sh` installs
//!   it); an image moto made with `CreateImage` from a simulated instance carries that
//!   instance's disk as it was.
//! - **Boot**: sshd on port 22 (host keys from a `#cloud-config`'s `ssh_keys`, else generated
//!   as cloud-init does; authorized keys from `ssh_authorized_keys` and the instance's key
//!   pair; root logs in by key only), then the user-data, once per instance as cloud-init
//!   does: a `#!` script is run as root (output in `/var/log/cloud-init-output.log` on its
//!   disk), a `#cloud-config`'s `runcmd` too.
//!
//! An instance moto reports anything but `running` (or no longer reports) is torn down: its
//! init is killed (by a pidfd, so never a reused PID), which ends every process in it, and its
//! namespace goes with its veth and routes. The disks stay until the simulator is dropped,
//! which tears everything down. Instances also die with the thread that booted them (parent
//! death signal), so a test that crashes leaves no instance running.
//!
//! Only one simulator runs on a machine at a time (moto hands out the same private addresses
//! to every server): [`Simulator::start`] takes an exclusive lock, waiting (bounded) for
//! another test's simulator to end, and removes what a crashed one left behind.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_ec2::types::{Filter, InstanceAttributeName, InstanceLifecycleType};

use crate::imds::{FakeImds, ImdsState};

/// The address of this machine the instances reach (their default gateway), on the
/// interface [`GATEWAY_IF`].
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The interface holding [`GATEWAY`] while a simulator runs: one end of a veth pair whose
/// other end (`ec2sim0p`) stays on this machine too (the kernel here may lack the dummy
/// driver).
pub const GATEWAY_IF: &str = "ec2sim0";
/// Network namespaces of instances are named this plus the instance id.
pub const NETNS_PREFIX: &str = "ec2sim-";
/// The instance metadata address.
pub const IMDS_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The machine-wide lock one simulator holds.
const LOCK_PATH: &str = "/run/lock/cedana-ec2sim.lock";
/// The account moto reports.
const ACCOUNT: &str = "123456789012";
/// PATH on an instance (Debian's default for root).
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The folders of an instance's disk and where the instance sees them.
const DISK_MOUNTS: [(&str, &str); 5] = [
    ("usr-local", "/usr/local"),
    ("opt", "/opt"),
    ("var", "/var"),
    ("root", "/root"),
    ("home", "/home"),
];

/// Errors of the simulator. Each names what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("the instance simulator needs root (network, PID and mount namespaces)")]
    NotRoot,
    #[error("cannot take the simulator lock {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another instance simulator held {path} for {waited:?}: let the other test end, or remove the lock if its process is gone")]
    LockTimeout { path: PathBuf, waited: Duration },
    #[error("`ip {args}` failed: {message}")]
    Ip { args: String, message: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("moto {call} in {region}: {message} (is moto running at the simulator's endpoint?)")]
    Moto {
        call: &'static str,
        region: String,
        message: String,
    },
    #[error("no simulated instance {0}: it has not been seen running (see Simulator::instances)")]
    NoInstance(String),
    #[error("instance {id} is not running in the simulator ({state:?})")]
    NotRunning { id: String, state: SimState },
    #[error("instance {id}: {message}")]
    Boot { id: String, message: String },
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout { timeout: Duration, what: String },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SimError {
    let path = path.to_path_buf();
    move |source| SimError::Io { what, path, source }
}

/// What an instance's image holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageKind {
    /// sshd, nothing of Cedana's.
    Stock,
    /// sshd, the agent under test and CRIU.
    Baked,
    /// Made by `CreateImage` from simulated instance `from`: its disk as it was (and the agent
    /// and CRIU of a baked image when `from` had them).
    Snapshot { from: String, baked: bool },
}

/// Where a simulated instance is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimState {
    /// Booted: its init runs.
    Running,
    /// It could not boot, or its init ended by itself (the reason, with the end of its console).
    Failed(String),
    /// moto reports it stopped (or stopping): torn down, its disk kept.
    Stopped,
    /// moto reports it terminated (or shutting down, or no longer reports it): torn down.
    Terminated,
}

/// What the instance's user-data was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserData {
    None,
    /// A `#!` script.
    Script,
    /// A `#cloud-config` document.
    CloudConfig,
    /// Something else (not run; the console says so).
    Unsupported(String),
}

/// A simulated instance as the tests see it.
#[derive(Clone, Debug)]
pub struct SimInstance {
    pub id: String,
    pub region: String,
    pub image_id: String,
    pub image: ImageKind,
    pub instance_type: String,
    pub zone: String,
    pub private_ip: Ipv4Addr,
    pub public_ip: Option<Ipv4Addr>,
    pub spot: bool,
    pub key_name: Option<String>,
    pub tags: BTreeMap<String, String>,
    pub user_data: UserData,
    /// Its network namespace.
    pub netns: String,
    /// Its disk on this machine.
    pub disk: PathBuf,
    pub state: SimState,
    /// This machine's PID of its init while it runs.
    pub init_pid: Option<i32>,
    /// How many times it booted.
    pub boots: u32,
    /// When moto was first seen reporting it running, and when its init started.
    pub seen_running: Option<Instant>,
    pub booted: Option<Instant>,
}

/// Settings of a simulator.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// moto's endpoint (`http://127.0.0.1:PORT`).
    pub endpoint: String,
    /// Regions watched.
    pub regions: Vec<String>,
    /// AMI ids whose instances have the agent and CRIU (others are stock).
    pub baked_images: Vec<String>,
    /// The agent a baked image has at `/usr/local/bin/cedana-agent` [default: the agent under
    /// test].
    pub agent: PathBuf,
    /// CRIU's launcher a baked image has at the same path [default: `$CEDANA_CRIU_WRAPPER`,
    /// `/usr/local/sbin/criu`].
    pub criu: PathBuf,
    /// CRIU's prefix a baked image has at the same path [default: `$CEDANA_CRIU_PREFIX`,
    /// `/opt/cedana/criu`]; must be under `/opt`.
    pub criu_prefix: PathBuf,
    /// The sshd images have.
    pub sshd: PathBuf,
    /// This machine's address the instances reach.
    pub gateway: Ipv4Addr,
    /// How often moto is asked.
    pub poll: Duration,
    /// Serve a freshly generated host key instead of the one in the user-data (to test that
    /// SSH clients refuse it).
    pub wrong_host_key: bool,
    /// How long [`Simulator::start`] waits for another simulator to end.
    pub lock_timeout: Duration,
    /// Environment added to the user-data's (for example `RUST_LOG` while debugging).
    pub env: Vec<(String, String)>,
    /// The rate of the link between this machine and each instance, both ways, in Mbit/s
    /// (`tc` token bucket on both ends of the veth pair); unlimited when `None`. Stands in for
    /// the network between a driver and a cloud (no added latency: this kernel may lack netem).
    pub link_mbit: Option<u32>,
    /// Credentials for moto (it accepts any).
    pub access_key: String,
    pub secret_key: String,
}

impl SimConfig {
    /// Defaults for moto at `endpoint`: region `us-east-1`, no baked image.
    pub fn new(endpoint: impl Into<String>) -> Self {
        let env_path = |var: &str, default: &str| {
            std::env::var_os(var)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(default))
        };
        SimConfig {
            endpoint: endpoint.into(),
            regions: vec!["us-east-1".into()],
            baked_images: Vec::new(),
            agent: crate::agent_bin(),
            criu: env_path("CEDANA_CRIU_WRAPPER", "/usr/local/sbin/criu"),
            criu_prefix: env_path("CEDANA_CRIU_PREFIX", "/opt/cedana/criu"),
            sshd: PathBuf::from("/usr/sbin/sshd"),
            gateway: GATEWAY,
            poll: Duration::from_millis(250),
            wrong_host_key: false,
            lock_timeout: Duration::from_secs(900),
            env: Vec::new(),
            link_mbit: None,
            access_key: "AKIDEC2SIMTESTING01".into(),
            secret_key: "ec2sim+test+secret".into(),
        }
    }

    pub fn baked(mut self, ami: &str) -> Self {
        self.baked_images.push(ami.into());
        self
    }
}

/// An EC2 client of moto at `endpoint` in `region`, with test credentials.
pub fn ec2_client(endpoint: &str, region: &str, key: &str, secret: &str) -> aws_sdk_ec2::Client {
    use aws_smithy_http_client::tls;
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let conf = aws_sdk_ec2::Config::builder()
        .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
        .region(aws_sdk_ec2::config::Region::new(region.to_string()))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            key, secret, None, None, "ec2sim",
        ))
        .http_client(http)
        .build();
    aws_sdk_ec2::Client::from_conf(conf)
}

/// An instance as moto reports it.
#[derive(Clone, Debug)]
struct View {
    id: String,
    state: String,
    image_id: String,
    instance_type: String,
    zone: String,
    private_ip: Option<Ipv4Addr>,
    public_ip: Option<Ipv4Addr>,
    spot: bool,
    key_name: Option<String>,
    tags: BTreeMap<String, String>,
    launched: Option<i64>,
}

/// A booted instance's resources.
struct Live {
    launcher: Child,
    init: i32,
    pidfd: OwnedFd,
    imds: FakeImds,
    net: Net,
}

struct Entry {
    info: SimInstance,
    live: Option<Live>,
}

/// What the simulator knows, shared by its thread and the test.
#[derive(Default)]
struct Inner {
    instances: BTreeMap<String, Entry>,
    /// Snapshot images (AMI id → the instance they were made from, whether it had a baked
    /// image's files).
    snapshots: BTreeMap<String, (String, bool)>,
    /// Images already looked at.
    images_seen: BTreeSet<String>,
    /// AMI ids whose instances have the agent and CRIU.
    baked: BTreeSet<String>,
    /// moto errors, newest last (a few).
    errors: Vec<String>,
    next_if: u32,
}

/// The simulator. Tears everything down on drop.
pub struct Simulator {
    cfg: SimConfig,
    dir: tempfile::TempDir,
    inner: Arc<Mutex<Inner>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    rt: Arc<tokio::runtime::Runtime>,
    clients: BTreeMap<String, aws_sdk_ec2::Client>,
    gateway_if: Option<GatewayIf>,
    _lock: nix::fcntl::Flock<File>,
}

impl Simulator {
    /// Starts watching moto. Takes the machine's simulator lock first (waiting for another
    /// simulator to end), removes what a crashed one left, puts [`SimConfig::gateway`] on a
    /// veth of its own.
    pub fn start(cfg: SimConfig) -> Result<Self, SimError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(SimError::NotRoot);
        }
        if !cfg.criu_prefix.starts_with("/opt") {
            return Err(SimError::Boot {
                id: "(config)".into(),
                message: format!(
                    "CRIU's prefix {} is not under /opt: baked images cannot have it there",
                    cfg.criu_prefix.display()
                ),
            });
        }
        let lock = take_lock(cfg.lock_timeout)?;
        clean_leftovers();
        let gateway_if = GatewayIf::create(cfg.gateway)?;
        // Not under a folder an instance sees as its own (overlayfs refuses nested layers).
        let dir = tempfile::Builder::new()
            .prefix("cedana-ec2sim-")
            .tempdir_in("/tmp")
            .map_err(io_err(
                "cannot create the simulator's folder in",
                Path::new("/tmp"),
            ))?;
        std::fs::create_dir(dir.path().join("images"))
            .map_err(io_err("cannot create", &dir.path().join("images")))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ec2sim-sdk")
            .enable_all()
            .build()
            .map_err(io_err(
                "cannot start a runtime for",
                Path::new("the EC2 client"),
            ))?;
        let clients = cfg
            .regions
            .iter()
            .map(|r| {
                (
                    r.clone(),
                    ec2_client(&cfg.endpoint, r, &cfg.access_key, &cfg.secret_key),
                )
            })
            .collect();
        let inner = Inner {
            baked: cfg.baked_images.iter().cloned().collect(),
            ..Inner::default()
        };
        let mut sim = Simulator {
            cfg,
            dir,
            inner: Arc::new(Mutex::new(inner)),
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
            rt: Arc::new(rt),
            clients,
            gateway_if: Some(gateway_if),
            _lock: lock,
        };
        let watcher = Watcher {
            cfg: sim.cfg.clone(),
            dir: sim.dir.path().to_path_buf(),
            inner: sim.inner.clone(),
            stop: sim.stop.clone(),
            rt: sim.rt.clone(),
            clients: sim.clients.clone(),
        };
        sim.thread = Some(
            std::thread::Builder::new()
                .name("ec2sim".into())
                .spawn(move || watcher.run())
                .map_err(io_err(
                    "cannot start the watcher thread for",
                    Path::new("moto"),
                ))?,
        );
        Ok(sim)
    }

    /// Counts `ami` as baked from now on: its instances have the agent and CRIU.
    pub fn mark_baked(&self, ami: &str) {
        self.inner
            .lock()
            .expect("simulator state")
            .baked
            .insert(ami.to_string());
    }

    /// Registers an image in moto in `region` (RegisterImage, x86_64, EBS-backed) and returns
    /// its id; `baked` images have the agent and CRIU in the simulator.
    pub fn register_image(
        &self,
        region: &str,
        name: &str,
        baked: bool,
    ) -> Result<String, SimError> {
        use aws_sdk_ec2::types::{ArchitectureValues, BlockDeviceMapping, EbsBlockDevice};
        let client = self.client(region);
        let out = self
            .rt
            .block_on(
                client
                    .register_image()
                    .name(name)
                    .architecture(ArchitectureValues::X8664)
                    .root_device_name("/dev/xvda")
                    .virtualization_type("hvm")
                    .block_device_mappings(
                        BlockDeviceMapping::builder()
                            .device_name("/dev/xvda")
                            .ebs(EbsBlockDevice::builder().volume_size(8).build())
                            .build(),
                    )
                    .send(),
            )
            .map_err(|e| SimError::Moto {
                call: "RegisterImage",
                region: region.into(),
                message: aws_sdk_ec2::error::DisplayErrorContext(e).to_string(),
            })?;
        let ami = out.image_id().unwrap_or_default().to_string();
        self.inner
            .lock()
            .expect("simulator state")
            .images_seen
            .insert(ami.clone());
        if baked {
            self.mark_baked(&ami);
        }
        Ok(ami)
    }

    /// This machine's address the instances reach (serve what they need there).
    pub fn gateway(&self) -> Ipv4Addr {
        self.cfg.gateway
    }

    /// An EC2 client of moto in `region` (one the simulator watches).
    pub fn client(&self, region: &str) -> aws_sdk_ec2::Client {
        self.clients.get(region).cloned().unwrap_or_else(|| {
            ec2_client(
                &self.cfg.endpoint,
                region,
                &self.cfg.access_key,
                &self.cfg.secret_key,
            )
        })
    }

    /// Runs `f` on the simulator's runtime (for calls to moto from synchronous tests).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Every instance seen running, in any state since.
    pub fn instances(&self) -> Vec<SimInstance> {
        let inner = self.inner.lock().expect("simulator state");
        inner.instances.values().map(|e| e.info.clone()).collect()
    }

    /// One instance.
    pub fn instance(&self, id: &str) -> Option<SimInstance> {
        let inner = self.inner.lock().expect("simulator state");
        inner.instances.get(id).map(|e| e.info.clone())
    }

    /// moto errors the watcher met (the newest few).
    pub fn errors(&self) -> Vec<String> {
        self.inner.lock().expect("simulator state").errors.clone()
    }

    /// Waits until `id` runs (booted by the simulator); fails at once if it failed to boot.
    pub fn wait_running(&self, id: &str, timeout: Duration) -> Result<SimInstance, SimError> {
        let start = Instant::now();
        // Running, and booted: its init has mounted its disks (it prints "up:" after the last
        // mount), so what a test runs there sees the instance's /etc, not this machine's.
        self.wait_for(id, timeout, "to run and finish booting", |i| {
            match &i.state {
                SimState::Running if self.console(id).contains(" up: ") => Some(Ok(i.clone())),
                SimState::Running if start.elapsed() > timeout => Some(Err(SimError::Boot {
                    id: id.into(),
                    message: format!(
                        "running, but its init did not finish booting; console:\n{}",
                        self.console(id)
                    ),
                })),
                SimState::Failed(m) => Some(Err(SimError::Boot {
                    id: id.into(),
                    message: m.clone(),
                })),
                _ => None,
            }
        })
    }

    /// Waits until `id` is torn down (terminated or stopped in moto).
    pub fn wait_gone(&self, id: &str, timeout: Duration) -> Result<SimInstance, SimError> {
        self.wait_for(id, timeout, "to be torn down", |i| {
            matches!(i.state, SimState::Terminated | SimState::Stopped).then(|| Ok(i.clone()))
        })
    }

    fn wait_for(
        &self,
        id: &str,
        timeout: Duration,
        what: &str,
        f: impl Fn(&SimInstance) -> Option<Result<SimInstance, SimError>>,
    ) -> Result<SimInstance, SimError> {
        let start = Instant::now();
        loop {
            if let Some(r) = self.instance(id).as_ref().and_then(&f) {
                return r;
            }
            if start.elapsed() > timeout {
                return Err(SimError::Timeout {
                    timeout,
                    what: format!(
                        "instance {id} {what} (now {:?}; moto errors: {:?})",
                        self.instance(id).map(|i| i.state),
                        self.errors()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Applies `f` to the running instance's metadata service.
    fn with_imds<T>(&self, id: &str, f: impl FnOnce(&mut ImdsState) -> T) -> Result<T, SimError> {
        let inner = self.inner.lock().expect("simulator state");
        let e = inner
            .instances
            .get(id)
            .ok_or_else(|| SimError::NoInstance(id.into()))?;
        match &e.live {
            Some(l) => Ok(l.imds.with(f)),
            None => Err(SimError::NotRunning {
                id: id.into(),
                state: e.info.state.clone(),
            }),
        }
    }

    /// A spot interruption notice for `id`, as EC2 gives one: `spot/instance-action` answers
    /// `{"action": "terminate", "time": <two minutes from now>}`. Returns that time. EC2 would
    /// reclaim the instance then; the simulator leaves that to the test
    /// ([`Simulator::reclaim`]).
    pub fn spot_notice(&self, id: &str) -> Result<String, SimError> {
        let at = rfc3339(SystemTime::now() + Duration::from_secs(120));
        let body = format!(r#"{{"action": "terminate", "time": "{at}"}}"#);
        self.with_imds(id, |s| s.instance_action = Some(body))?;
        eprintln!("[ec2sim] spot interruption notice for {id} (terminate at {at})");
        Ok(at)
    }

    /// A rebalance recommendation for `id` (`events/recommendations/rebalance`).
    pub fn rebalance(&self, id: &str) -> Result<(), SimError> {
        let now = rfc3339(SystemTime::now());
        self.with_imds(id, |s| {
            s.rebalance = Some(format!(r#"{{"noticeTime": "{now}"}}"#))
        })
    }

    /// How many metadata GETs of `path` the instance's IMDS served with a valid token.
    pub fn imds_served(&self, id: &str, path: &str) -> Result<usize, SimError> {
        self.with_imds(id, |s| s.served.get(path).copied().unwrap_or(0))
    }

    /// Terminates `id` in moto, as EC2 reclaims a spot instance (the simulator then tears it
    /// down).
    pub fn reclaim(&self, id: &str) -> Result<(), SimError> {
        let region = self
            .instance(id)
            .map(|i| i.region)
            .ok_or_else(|| SimError::NoInstance(id.into()))?;
        let client = self.client(&region);
        self.rt
            .block_on(client.terminate_instances().instance_ids(id).send())
            .map_err(|e| SimError::Moto {
                call: "TerminateInstances",
                region,
                message: aws_sdk_ec2::error::DisplayErrorContext(e).to_string(),
            })?;
        Ok(())
    }

    /// Runs `sh -c script` as root inside the running instance (its network, mount, UTS and
    /// PID namespaces), with the instance's PATH and nothing of this process's environment.
    pub fn exec(&self, id: &str, script: &str) -> Result<Output, SimError> {
        let init = self
            .instance(id)
            .and_then(|i| i.init_pid.filter(|_| i.state == SimState::Running))
            .ok_or_else(|| SimError::NotRunning {
                id: id.into(),
                state: self
                    .instance(id)
                    .map(|i| i.state)
                    .unwrap_or(SimState::Terminated),
            })?;
        Command::new("nsenter")
            .args(["--target", &init.to_string()])
            .args(["--net", "--mount", "--uts", "--pid", "--", "/bin/sh", "-c"])
            .arg(script)
            .env_clear()
            .env("PATH", PATH)
            .env("HOME", "/root")
            .current_dir("/")
            .stdin(Stdio::null())
            .output()
            .map_err(io_err("cannot run nsenter for", Path::new(id)))
    }

    /// The instance's console: what its boot printed.
    pub fn console(&self, id: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(id).join("console.log")).unwrap_or_default()
    }

    /// The output of its user-data script (`/var/log/cloud-init-output.log`).
    pub fn user_data_output(&self, id: &str) -> String {
        std::fs::read_to_string(
            self.dir
                .path()
                .join(id)
                .join("var/log/cloud-init-output.log"),
        )
        .unwrap_or_default()
    }

    /// The public half of the ed25519 host key its sshd serves (`ssh-ed25519 AAAA...`).
    pub fn host_key(&self, id: &str) -> Option<String> {
        std::fs::read_to_string(
            self.dir
                .path()
                .join(id)
                .join("etc.upper/ssh/ssh_host_ed25519_key.pub"),
        )
        .ok()
        .map(|k| k.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
    }

    /// The simulator's folder (disks under `<id>/`, snapshot images under `images/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // The watcher tears everything down when it stops; this is for a watcher that panicked.
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for e in inner.instances.values_mut() {
            if let Some(live) = e.live.take() {
                teardown(&e.info.id, live);
            }
        }
        drop(inner);
        self.gateway_if.take();
    }
}

// ---------------------------------------------------------------------------------------------
// The watcher

struct Watcher {
    cfg: SimConfig,
    dir: PathBuf,
    inner: Arc<Mutex<Inner>>,
    stop: Arc<AtomicBool>,
    rt: Arc<tokio::runtime::Runtime>,
    clients: BTreeMap<String, aws_sdk_ec2::Client>,
}

impl Watcher {
    fn run(self) {
        while !self.stop.load(Ordering::SeqCst) {
            for (region, client) in &self.clients {
                if let Err(e) = self.tick(region, client) {
                    let mut inner = self.inner.lock().expect("simulator state");
                    let msg = e.to_string();
                    if inner.errors.last() != Some(&msg) {
                        eprintln!("[ec2sim] {msg}");
                        inner.errors.push(msg);
                        let n = inner.errors.len();
                        inner.errors.drain(..n.saturating_sub(20));
                    }
                }
            }
            let next = Instant::now() + self.cfg.poll;
            while Instant::now() < next && !self.stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let mut inner = self.inner.lock().expect("simulator state");
        for e in inner.instances.values_mut() {
            if let Some(live) = e.live.take() {
                teardown(&e.info.id, live);
                e.info.state = SimState::Terminated;
                e.info.init_pid = None;
            }
        }
    }

    /// One look at moto in `region`: snapshots of new images, teardown of instances that no
    /// longer run, boot of new running ones.
    fn tick(&self, region: &str, client: &aws_sdk_ec2::Client) -> Result<(), SimError> {
        let views = self.rt.block_on(describe_all(client, region))?;
        self.snapshot_new_images(region, client)?;
        let by_id: BTreeMap<&str, &View> = views.iter().map(|v| (v.id.as_str(), v)).collect();
        // Ends first: moto hands a terminated instance's address to the next one.
        {
            let mut inner = self.inner.lock().expect("simulator state");
            for e in inner.instances.values_mut() {
                if e.info.region != region {
                    continue;
                }
                let state = by_id.get(e.info.id.as_str()).map(|v| v.state.as_str());
                if let Some(live) = e.live.as_mut() {
                    if state == Some("running") {
                        // Its init ended by itself: the boot failed.
                        if let Ok(Some(status)) = live.launcher.try_wait() {
                            let tail = tail(&self.dir.join(&e.info.id).join("console.log"), 15);
                            eprintln!(
                                "[ec2sim] {} stopped by itself ({status}):\n{tail}",
                                e.info.id
                            );
                            let live = e.live.take().expect("live");
                            teardown(&e.info.id, live);
                            e.info.state = SimState::Failed(format!(
                                "its init ended ({status}); console:\n{tail}"
                            ));
                            e.info.init_pid = None;
                        }
                        continue;
                    }
                    let live = e.live.take().expect("live");
                    teardown(&e.info.id, live);
                    e.info.init_pid = None;
                    e.info.state = match state {
                        Some("stopping") | Some("stopped") => SimState::Stopped,
                        _ => SimState::Terminated,
                    };
                    eprintln!(
                        "[ec2sim] {} torn down (moto: {})",
                        e.info.id,
                        state.unwrap_or("gone")
                    );
                } else if matches!(e.info.state, SimState::Failed(_))
                    && state.is_none_or(|s| s != "running")
                {
                    e.info.state = SimState::Terminated;
                }
            }
        }
        for v in views.iter().filter(|v| v.state == "running") {
            let (boot, first) = {
                let inner = self.inner.lock().expect("simulator state");
                match inner.instances.get(&v.id) {
                    None => (true, true),
                    Some(e) => (
                        e.live.is_none()
                            && matches!(e.info.state, SimState::Stopped | SimState::Terminated),
                        false,
                    ),
                }
            };
            if !boot {
                continue;
            }
            self.boot(region, client, v, first);
        }
        Ok(())
    }

    /// Boots `v`; records it running or failed.
    fn boot(&self, region: &str, client: &aws_sdk_ec2::Client, v: &View, first: bool) {
        let seen = Instant::now();
        let image = {
            let inner = self.inner.lock().expect("simulator state");
            if let Some((from, baked)) = inner.snapshots.get(&v.image_id) {
                ImageKind::Snapshot {
                    from: from.clone(),
                    baked: *baked,
                }
            } else if inner.baked.contains(&v.image_id) {
                ImageKind::Baked
            } else {
                ImageKind::Stock
            }
        };
        let mut info = SimInstance {
            id: v.id.clone(),
            region: region.into(),
            image_id: v.image_id.clone(),
            image,
            instance_type: v.instance_type.clone(),
            zone: v.zone.clone(),
            private_ip: v.private_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
            public_ip: v.public_ip,
            spot: v.spot,
            key_name: v.key_name.clone(),
            tags: v.tags.clone(),
            user_data: UserData::None,
            netns: format!("{NETNS_PREFIX}{}", v.id),
            disk: self.dir.join(&v.id),
            state: SimState::Running,
            init_pid: None,
            boots: 0,
            seen_running: Some(seen),
            booted: None,
        };
        if let Some(old) = self
            .inner
            .lock()
            .expect("simulator state")
            .instances
            .get(&v.id)
        {
            info.boots = old.info.boots;
            info.user_data = old.info.user_data.clone();
            info.image = old.info.image.clone();
            info.seen_running = Some(seen);
        }
        let result = self.boot_inner(client, v, &mut info, first);
        let live = match result {
            Ok(live) => {
                info.boots += 1;
                info.init_pid = Some(live.init);
                info.booted = Some(Instant::now());
                eprintln!(
                    "[ec2sim] {} ({} in {}, {:?}, {}{}) booted at {} in {:?}",
                    v.id,
                    v.instance_type,
                    v.zone,
                    info.image,
                    v.image_id,
                    if v.spot { ", spot" } else { "" },
                    info.private_ip,
                    seen.elapsed()
                );
                Some(live)
            }
            Err(e) => {
                eprintln!("[ec2sim] {} failed to boot: {e}", v.id);
                info.state = SimState::Failed(e.to_string());
                None
            }
        };
        let mut inner = self.inner.lock().expect("simulator state");
        inner.instances.insert(v.id.clone(), Entry { info, live });
    }

    fn boot_inner(
        &self,
        client: &aws_sdk_ec2::Client,
        v: &View,
        info: &mut SimInstance,
        first: bool,
    ) -> Result<Live, SimError> {
        let berr = |message: String| SimError::Boot {
            id: v.id.clone(),
            message,
        };
        let private_ip = v
            .private_ip
            .ok_or_else(|| berr("moto reports no private address".into()))?;
        let region = info.region.clone();
        let user_data = self.rt.block_on(user_data(client, &region, &v.id))?;
        let public_key = match &v.key_name {
            Some(k) => self.rt.block_on(key_pair_public_key(client, &region, k))?,
            None => None,
        };
        {
            let inner = self.inner.lock().expect("simulator state");
            if let Some(other) = inner.instances.values().find(|e| {
                e.live.is_some()
                    && e.info.id != v.id
                    && (e.info.private_ip == private_ip
                        || v.public_ip.is_some_and(|p| Some(p) == e.info.public_ip))
            }) {
                return Err(berr(format!(
                    "its address {private_ip} is taken by simulated instance {} (another region?): the simulator routes each address to one instance",
                    other.info.id
                )));
            }
        }
        let disk = info.disk.clone();
        let kind = classify(&user_data);
        info.user_data = kind.clone();
        if first {
            prepare_disk(&disk, &v.image_id, &info.image, &self.dir)?;
        }
        // The user-data's folder (root only: it holds the job's token).
        let cloud = disk.join("var/lib/cloud/instance");
        std::fs::create_dir_all(&cloud).map_err(io_err("cannot create", &cloud))?;
        set_mode(&disk.join("var/lib/cloud"), 0o700)?;
        write_file(&cloud.join("user-data.txt"), user_data.as_bytes(), 0o600)?;
        let mut cloud_config = CloudConfig::default();
        match &kind {
            UserData::CloudConfig => {
                cloud_config = CloudConfig::parse(&user_data).map_err(|e| {
                    berr(format!(
                        "its #cloud-config user-data is not valid YAML: {e}"
                    ))
                })?
            }
            UserData::Unsupported(what) => {
                append_console(&disk, &format!("user-data not run: {what}\n"));
            }
            _ => {}
        }
        let sshd = self.cfg.sshd.is_file();
        if !sshd {
            if !cloud_config.ssh_keys.is_empty() || !cloud_config.authorized_keys.is_empty() {
                return Err(berr(format!(
                    "its #cloud-config asks for SSH but {} is missing: install openssh-server (tools/deps.sh does)",
                    self.cfg.sshd.display()
                )));
            }
        } else if first {
            // Host keys and authorized keys are made once per instance, as cloud-init does.
            self.prepare_sshd(&disk, &cloud_config, public_key.as_deref(), info)?;
        }
        let run_user_data = first && matches!(kind, UserData::Script);
        let runcmd = first && !cloud_config.runcmd.is_empty();
        if runcmd {
            let script = format!("#!/bin/sh\n{}\n", cloud_config.runcmd.join("\n"));
            write_file(&cloud.join("runcmd"), script.as_bytes(), 0o700)?;
        }
        if run_user_data {
            set_mode(&cloud.join("user-data.txt"), 0o700)?;
        }

        let host_if = {
            let mut inner = self.inner.lock().expect("simulator state");
            inner.next_if += 1;
            format!("ec2sim{}", inner.next_if)
        };
        let net = Net::create(
            &info.netns,
            &host_if,
            private_ip,
            v.public_ip,
            self.cfg.gateway,
        )?;
        if let Some(mbit) = self.cfg.link_mbit {
            net.limit(mbit)?;
        }
        let listener = bind_in_netns(&info.netns, SocketAddr::from((IMDS_ADDR, 80)))?;
        let imds = FakeImds::serve(
            listener,
            imds_state(v, &region, &user_data, public_key.as_deref()),
        );

        let script = boot_script(BootScript {
            id: &v.id,
            disk: &disk,
            image: &info.image,
            cfg: &self.cfg,
            private_ip,
            sshd,
            user_data: run_user_data,
            runcmd,
        });
        let boot = disk.join("boot.sh");
        write_file(&boot, script.as_bytes(), 0o700)?;
        let console = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(disk.join("console.log"))
            .map_err(io_err("cannot open the console of", &disk))?;
        let console2 = console
            .try_clone()
            .map_err(io_err("cannot open the console of", &disk))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &info.netns])
            .args([
                "unshare",
                "--pid",
                "--fork",
                "--kill-child",
                "--mount",
                "--uts",
                "--propagation",
                "private",
                "--mount-proc",
                "--",
                "/bin/bash",
            ])
            .arg(&boot)
            .env_clear()
            .env("PATH", PATH)
            .env("HOME", "/root")
            .env("LANG", "C.UTF-8")
            .envs(self.cfg.env.iter().map(|(k, v)| (k, v)))
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(console2);
        // SAFETY: prctl is async-signal-safe. The instance dies with the watcher thread.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let mut launcher = cmd
            .spawn()
            .map_err(io_err("cannot start `ip netns exec … unshare` in", &disk))?;
        // The instance's init is the launcher's only child.
        let start = Instant::now();
        let init = loop {
            let lp = launcher.id();
            let children = std::fs::read_to_string(format!("/proc/{lp}/task/{lp}/children"))
                .unwrap_or_default();
            if let Some(pid) = children
                .split_whitespace()
                .next()
                .and_then(|p| p.parse::<i32>().ok())
            {
                break pid;
            }
            if let Ok(Some(status)) = launcher.try_wait() {
                return Err(berr(format!(
                    "its init did not start ({status}): {}",
                    tail(&disk.join("console.log"), 10)
                )));
            }
            if start.elapsed() > Duration::from_secs(10) {
                let _ = launcher.kill();
                let _ = launcher.wait();
                return Err(berr("its init did not start within 10 s".into()));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let pidfd =
            pidfd_open(init).map_err(io_err("cannot open a pidfd of the init of", &disk))?;
        Ok(Live {
            launcher,
            init,
            pidfd,
            imds,
            net,
        })
    }

    /// Host keys, authorized keys and the config of the image's sshd.
    fn prepare_sshd(
        &self,
        disk: &Path,
        cc: &CloudConfig,
        key_pair: Option<&str>,
        info: &SimInstance,
    ) -> Result<(), SimError> {
        let ssh = disk.join("etc.upper/ssh");
        std::fs::create_dir_all(&ssh).map_err(io_err("cannot create", &ssh))?;
        // As cloud-init does on a new instance (ssh_deletekeys): no host key of the image
        // survives.
        for e in std::fs::read_dir(&ssh)
            .map_err(io_err("cannot read", &ssh))?
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with("ssh_host_") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let mut types = Vec::new();
        if !self.cfg.wrong_host_key {
            for (name, value) in &cc.ssh_keys {
                let Some((kind, part)) = name.rsplit_once('_') else {
                    continue;
                };
                if !["rsa", "ecdsa", "ed25519"].contains(&kind) {
                    append_console(disk, &format!("ssh_keys: {name} ignored\n"));
                    continue;
                }
                match part {
                    "private" => {
                        let mut key = value.clone();
                        if !key.ends_with('\n') {
                            key.push('\n');
                        }
                        write_file(
                            &ssh.join(format!("ssh_host_{kind}_key")),
                            key.as_bytes(),
                            0o600,
                        )?;
                        types.push(kind.to_string());
                    }
                    "public" => write_file(
                        &ssh.join(format!("ssh_host_{kind}_key.pub")),
                        format!("{}\n", value.trim()).as_bytes(),
                        0o644,
                    )?,
                    _ => append_console(disk, &format!("ssh_keys: {name} ignored\n")),
                }
            }
        }
        if types.is_empty() {
            let key = ssh.join("ssh_host_ed25519_key");
            let out = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C"])
                .arg(format!("root@{}", hostname(info.private_ip)))
                .arg("-f")
                .arg(&key)
                .stdin(Stdio::null())
                .output()
                .map_err(io_err("cannot run ssh-keygen for", &key))?;
            if !out.status.success() {
                return Err(SimError::Boot {
                    id: info.id.clone(),
                    message: format!(
                        "ssh-keygen failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                });
            }
            types.push("ed25519".into());
        }
        let mut config = String::from(
            "# The simulated image's sshd (written by the instance simulator).\n\
             Port 22\nListenAddress 0.0.0.0\n",
        );
        for t in &types {
            config.push_str(&format!("HostKey /etc/ssh/ssh_host_{t}_key\n"));
        }
        config.push_str(
            "PermitRootLogin prohibit-password\nPubkeyAuthentication yes\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             AuthorizedKeysFile .ssh/authorized_keys\nPidFile /run/sshd.pid\nLogLevel VERBOSE\n\
             Subsystem sftp /usr/lib/openssh/sftp-server\n",
        );
        write_file(&ssh.join("sshd_config"), config.as_bytes(), 0o644)?;
        let mut keys: Vec<String> = cc.authorized_keys.clone();
        keys.extend(key_pair.map(str::to_string));
        let dot_ssh = disk.join("root/.ssh");
        std::fs::create_dir_all(&dot_ssh).map_err(io_err("cannot create", &dot_ssh))?;
        set_mode(&dot_ssh, 0o700)?;
        if !keys.is_empty() {
            let path = dot_ssh.join("authorized_keys");
            let mut have = std::fs::read_to_string(&path).unwrap_or_default();
            for k in keys {
                if !have.lines().any(|l| l.trim() == k.trim()) {
                    have.push_str(k.trim());
                    have.push('\n');
                }
            }
            write_file(&path, have.as_bytes(), 0o600)?;
        }
        Ok(())
    }

    /// Records images moto made from simulated instances (`CreateImage`) with a copy of that
    /// instance's disk.
    fn snapshot_new_images(
        &self,
        region: &str,
        client: &aws_sdk_ec2::Client,
    ) -> Result<(), SimError> {
        let moto = |call: &'static str| {
            let region = region.to_string();
            move |e: String| SimError::Moto {
                call,
                region,
                message: e,
            }
        };
        let images = self
            .rt
            .block_on(client.describe_images().owners("self").send())
            .map_err(|e| aws_sdk_ec2::error::DisplayErrorContext(e).to_string())
            .map_err(moto("DescribeImages"))?;
        let new: Vec<String> = {
            let inner = self.inner.lock().expect("simulator state");
            images
                .images()
                .iter()
                .filter_map(|i| i.image_id())
                .filter(|id| !inner.images_seen.contains(*id))
                .map(str::to_string)
                .collect()
        };
        if new.is_empty() {
            return Ok(());
        }
        let known: Vec<(String, bool)> = {
            let inner = self.inner.lock().expect("simulator state");
            inner
                .instances
                .values()
                .filter(|e| e.info.region == region)
                .map(|e| {
                    let baked = matches!(
                        e.info.image,
                        ImageKind::Baked | ImageKind::Snapshot { baked: true, .. }
                    );
                    (e.info.id.clone(), baked)
                })
                .collect()
        };
        for (instance, baked) in &known {
            let made = self
                .rt
                .block_on(
                    client
                        .describe_images()
                        // Not by image id as well: moto then ignores the filters.
                        .owners("self")
                        .filters(
                            Filter::builder()
                                .name("source-instance-id")
                                .values(instance)
                                .build(),
                        )
                        .send(),
                )
                .map_err(|e| aws_sdk_ec2::error::DisplayErrorContext(e).to_string())
                .map_err(moto("DescribeImages"))?;
            for ami in made
                .images()
                .iter()
                .filter_map(|i| i.image_id())
                .filter(|ami| new.iter().any(|n| n == ami))
            {
                snapshot_disk(&self.dir, instance, ami)?;
                eprintln!("[ec2sim] image {ami} made from {instance}: its disk copied");
                self.inner
                    .lock()
                    .expect("simulator state")
                    .snapshots
                    .insert(ami.to_string(), (instance.clone(), *baked));
            }
        }
        self.inner
            .lock()
            .expect("simulator state")
            .images_seen
            .extend(new);
        Ok(())
    }
}

/// Ends a booted instance: its init is killed (so every process in its PID namespace), the
/// launcher reaped, its metadata service stopped, its namespace removed.
fn teardown(id: &str, mut live: Live) {
    if let Ok(None) = live.launcher.try_wait() {
        let _ = pidfd_kill(&live.pidfd);
    }
    let start = Instant::now();
    loop {
        match live.launcher.try_wait() {
            Ok(Some(_)) | Err(_) => break,
            Ok(None) if start.elapsed() > Duration::from_secs(10) => {
                eprintln!(
                    "[ec2sim] {id}: init {} did not end within 10 s; killing its launcher",
                    live.init
                );
                let _ = live.launcher.kill();
                let _ = live.launcher.wait();
                break;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    drop(live.imds);
    drop(live.net);
}

// ---------------------------------------------------------------------------------------------
// moto

async fn describe_all(client: &aws_sdk_ec2::Client, region: &str) -> Result<Vec<View>, SimError> {
    let mut out = Vec::new();
    let mut token = None;
    for _ in 0..100 {
        let page = client
            .describe_instances()
            .set_next_token(token)
            .send()
            .await
            .map_err(|e| SimError::Moto {
                call: "DescribeInstances",
                region: region.into(),
                message: aws_sdk_ec2::error::DisplayErrorContext(e).to_string(),
            })?;
        for r in page.reservations() {
            for i in r.instances() {
                out.push(View {
                    id: i.instance_id().unwrap_or_default().to_string(),
                    state: i
                        .state()
                        .and_then(|s| s.name())
                        .map(|n| n.as_str().to_string())
                        .unwrap_or_default(),
                    image_id: i.image_id().unwrap_or_default().to_string(),
                    instance_type: i
                        .instance_type()
                        .map(|t| t.as_str().to_string())
                        .unwrap_or_default(),
                    zone: i
                        .placement()
                        .and_then(|p| p.availability_zone())
                        .unwrap_or_default()
                        .to_string(),
                    private_ip: i.private_ip_address().and_then(|a| a.parse().ok()),
                    public_ip: i.public_ip_address().and_then(|a| a.parse().ok()),
                    spot: i.instance_lifecycle() == Some(&InstanceLifecycleType::Spot),
                    key_name: i.key_name().map(str::to_string),
                    tags: i
                        .tags()
                        .iter()
                        .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
                        .collect(),
                    launched: i.launch_time().map(|t| t.secs()),
                });
            }
        }
        token = page.next_token().map(str::to_string);
        if token.is_none() {
            break;
        }
    }
    Ok(out)
}

/// The instance's user-data, decoded (empty if none).
async fn user_data(
    client: &aws_sdk_ec2::Client,
    region: &str,
    id: &str,
) -> Result<String, SimError> {
    let out = client
        .describe_instance_attribute()
        .instance_id(id)
        .attribute(InstanceAttributeName::UserData)
        .send()
        .await
        .map_err(|e| SimError::Moto {
            call: "DescribeInstanceAttribute(userData)",
            region: region.into(),
            message: aws_sdk_ec2::error::DisplayErrorContext(e).to_string(),
        })?;
    let Some(b64) = out.user_data().and_then(|u| u.value()) else {
        return Ok(String::new());
    };
    let bytes = base64_decode(b64).ok_or_else(|| SimError::Boot {
        id: id.into(),
        message: "moto's user-data is not base64".into(),
    })?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The public key of key pair `name` (EC2 puts it in the default user's authorized keys).
async fn key_pair_public_key(
    client: &aws_sdk_ec2::Client,
    region: &str,
    name: &str,
) -> Result<Option<String>, SimError> {
    match client
        .describe_key_pairs()
        .key_names(name)
        .include_public_key(true)
        .send()
        .await
    {
        Ok(out) => Ok(out
            .key_pairs()
            .first()
            .and_then(|k| k.public_key())
            .map(|k| k.trim().to_string())),
        // A key pair that does not exist (moto does not check RunInstances' KeyName).
        Err(e) if format!("{e:?}").contains("NotFound") => Ok(None),
        Err(e) => Err(SimError::Moto {
            call: "DescribeKeyPairs",
            region: region.into(),
            message: aws_sdk_ec2::error::DisplayErrorContext(e).to_string(),
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// The instance's disk, user-data and boot

fn classify(user_data: &str) -> UserData {
    if user_data.trim().is_empty() {
        UserData::None
    } else if user_data.starts_with("#!") {
        UserData::Script
    } else if user_data.starts_with("#cloud-config") {
        UserData::CloudConfig
    } else {
        let first = user_data.lines().next().unwrap_or_default();
        UserData::Unsupported(format!(
            "the simulator runs `#!` scripts and `#cloud-config` only, not {:?}",
            first.chars().take(40).collect::<String>()
        ))
    }
}

/// What the simulator does with a `#cloud-config`.
#[derive(Default, Debug)]
struct CloudConfig {
    ssh_keys: BTreeMap<String, String>,
    authorized_keys: Vec<String>,
    runcmd: Vec<String>,
}

impl CloudConfig {
    fn parse(text: &str) -> Result<Self, serde_yaml::Error> {
        let doc: serde_yaml::Value = serde_yaml::from_str(text)?;
        let mut cc = CloudConfig::default();
        if let Some(keys) = doc.get("ssh_keys").and_then(|k| k.as_mapping()) {
            for (k, v) in keys {
                if let (Some(k), Some(v)) = (k.as_str(), v.as_str()) {
                    cc.ssh_keys.insert(k.to_string(), v.to_string());
                }
            }
        }
        if let Some(keys) = doc.get("ssh_authorized_keys").and_then(|k| k.as_sequence()) {
            cc.authorized_keys = keys
                .iter()
                .filter_map(|k| k.as_str().map(str::to_string))
                .collect();
        }
        if let Some(cmds) = doc.get("runcmd").and_then(|k| k.as_sequence()) {
            for c in cmds {
                match c {
                    serde_yaml::Value::String(s) => cc.runcmd.push(s.clone()),
                    serde_yaml::Value::Sequence(argv) => cc.runcmd.push(
                        argv.iter()
                            .filter_map(|a| a.as_str())
                            .map(sh_quote)
                            .collect::<Vec<_>>()
                            .join(" "),
                    ),
                    _ => {}
                }
            }
        }
        Ok(cc)
    }
}

use cedana_driver::providers::sh_quote;

/// A new disk: the image's folders (a snapshot's copied in).
fn prepare_disk(disk: &Path, ami: &str, image: &ImageKind, sim_dir: &Path) -> Result<(), SimError> {
    if let ImageKind::Snapshot { .. } = image {
        copy_tree(&sim_dir.join("images").join(ami), disk)?;
    }
    for d in [
        "usr-local/bin",
        "usr-local/sbin",
        "usr-local/lib",
        "usr-local/share",
        "usr-local/etc",
        "opt",
        "etc.upper",
        "etc.work",
        "var/lib/cedana",
        "var/lib/cloud/instance",
        "var/log",
        "var/cache",
        "var/spool",
        "var/tmp",
        "root",
        "home",
    ] {
        let p = disk.join(d);
        std::fs::create_dir_all(&p).map_err(io_err("cannot create", &p))?;
    }
    set_mode(&disk.join("root"), 0o700)?;
    set_mode(&disk.join("var/tmp"), 0o1777)?;
    for (name, to) in [("var/run", "/run"), ("var/lock", "/run/lock")] {
        let p = disk.join(name);
        if std::fs::symlink_metadata(&p).is_err() {
            std::os::unix::fs::symlink(to, &p).map_err(io_err("cannot create", &p))?;
        }
    }
    Ok(())
}

/// Copies `instance`'s disk as the image `ami` (under `images/<ami>`).
fn snapshot_disk(sim_dir: &Path, instance: &str, ami: &str) -> Result<(), SimError> {
    let src = sim_dir.join(instance);
    let dst = sim_dir.join("images").join(ami);
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).map_err(io_err("cannot create", &dst))?;
    for (d, _) in DISK_MOUNTS {
        copy_tree(&src.join(d), &dst.join(d))?;
    }
    copy_tree(&src.join("etc.upper"), &dst.join("etc.upper"))?;
    // The instance's own state does not travel with its image.
    let _ = std::fs::remove_dir_all(dst.join("var/lib/cloud"));
    Ok(())
}

/// `cp -a src/. dst` (permissions, links, overlay whiteouts kept).
fn copy_tree(src: &Path, dst: &Path) -> Result<(), SimError> {
    if !src.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dst).map_err(io_err("cannot create", dst))?;
    let out = Command::new("cp")
        .arg("-a")
        .arg(src.join("."))
        .arg(dst)
        .output()
        .map_err(io_err("cannot run cp for", src))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(SimError::Io {
            what: "cannot copy",
            path: src.to_path_buf(),
            source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        })
    }
}

struct BootScript<'a> {
    id: &'a str,
    disk: &'a Path,
    image: &'a ImageKind,
    cfg: &'a SimConfig,
    private_ip: Ipv4Addr,
    sshd: bool,
    user_data: bool,
    runcmd: bool,
}

/// The instance's init: its file system, hostname, sshd, the user-data, then reaping orphans
/// forever.
fn boot_script(b: BootScript) -> String {
    let q = |p: &Path| sh_quote(&p.display().to_string());
    let disk = b.disk;
    let mut s = format!(
        "# The init of simulated instance {id} (written by the instance simulator).\n\
         set -u\n\
         fail() {{ echo \"[ec2sim] boot of {id} failed: $*\"; exit 1; }}\n",
        id = b.id
    );
    // Baked images: the agent and CRIU, read-only, placed on the disk before it is mounted.
    let baked = matches!(
        b.image,
        ImageKind::Baked | ImageKind::Snapshot { baked: true, .. }
    );
    if baked {
        let prefix_rel = b
            .cfg
            .criu_prefix
            .strip_prefix("/opt")
            .unwrap_or(Path::new("cedana/criu"));
        let binds = [
            (
                b.cfg.agent.clone(),
                disk.join("usr-local/bin/cedana-agent"),
                false,
            ),
            (b.cfg.criu.clone(), disk.join("usr-local/sbin/criu"), false),
            (
                b.cfg.criu_prefix.clone(),
                disk.join("opt").join(prefix_rel),
                true,
            ),
        ];
        for (src, dst, is_dir) in binds {
            if is_dir {
                s.push_str(&format!("mkdir -p {d}\n", d = q(&dst)));
            } else {
                s.push_str(&format!("[ -e {d} ] || : > {d}\n", d = q(&dst)));
            }
            s.push_str(&format!(
                "mount --bind -o ro {src} {dst} || fail 'the image file {src_plain}'\n",
                src = q(&src),
                dst = q(&dst),
                src_plain = src.display()
            ));
        }
    }
    s.push_str(&format!(
        "mount --bind /usr /usr && mount -o remount,bind,ro /usr || fail 'read-only /usr'\n\
         mount --rbind {ul} /usr/local || fail /usr/local\n\
         mount --rbind {opt} /opt || fail /opt\n\
         mount -t overlay overlay -o lowerdir=/etc,upperdir={up},workdir={work} /etc || fail /etc\n\
         mount --rbind {var} /var || fail /var\n\
         mount --rbind {root} /root || fail /root\n\
         mount --rbind {home} /home || fail /home\n\
         mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run || fail /run\n\
         mkdir -p /run/lock /run/sshd && chmod 0755 /run/sshd\n\
         mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp || fail /tmp\n\
         echo {host} > /proc/sys/kernel/hostname\n\
         echo \"[ec2sim] {id} up: $(uname -r), $(nproc) CPUs\"\n",
        ul = q(&disk.join("usr-local")),
        opt = q(&disk.join("opt")),
        up = disk.join("etc.upper").display(),
        work = disk.join("etc.work").display(),
        var = q(&disk.join("var")),
        root = q(&disk.join("root")),
        home = q(&disk.join("home")),
        host = hostname(b.private_ip),
        id = b.id,
    ));
    if b.sshd {
        s.push_str(&format!(
            "{sshd} -f /etc/ssh/sshd_config -E /var/log/sshd.log || echo '[ec2sim] sshd did not start'\n",
            sshd = q(&b.cfg.sshd)
        ));
    }
    if b.user_data {
        s.push_str(
            "echo '[ec2sim] running the user-data'\n\
             (cd / && exec /var/lib/cloud/instance/user-data.txt) </dev/null >>/var/log/cloud-init-output.log 2>&1 &\n",
        );
    }
    if b.runcmd {
        s.push_str(
            "echo '[ec2sim] running runcmd'\n\
             (cd / && exec /bin/sh /var/lib/cloud/instance/runcmd) </dev/null >>/var/log/cloud-init-output.log 2>&1 &\n",
        );
    }
    // PID 1 reaps every orphan (bash reaps any child on SIGCHLD).
    s.push_str("while :; do sleep 3600 & wait $!; done\n");
    s
}

fn hostname(ip: Ipv4Addr) -> String {
    format!("ip-{}", ip.to_string().replace('.', "-"))
}

/// What the instance's metadata service serves.
fn imds_state(v: &View, region: &str, user_data: &str, public_key: Option<&str>) -> ImdsState {
    let mut s = ImdsState::default();
    let ip = v.private_ip.map(|i| i.to_string()).unwrap_or_default();
    let host = format!(
        "{}.ec2.internal",
        hostname(v.private_ip.unwrap_or(Ipv4Addr::UNSPECIFIED))
    );
    let mut put = |k: &str, v: String| {
        s.metadata.insert(k.to_string(), v);
    };
    put("ami-id", v.image_id.clone());
    put("instance-id", v.id.clone());
    put("instance-type", v.instance_type.clone());
    put("local-ipv4", ip.clone());
    put("hostname", host.clone());
    put("local-hostname", host);
    put("placement/availability-zone", v.zone.clone());
    put("placement/region", region.to_string());
    put(
        "instance-life-cycle",
        if v.spot { "spot" } else { "on-demand" }.into(),
    );
    put("services/domain", "amazonaws.com".into());
    if let Some(p) = v.public_ip {
        put("public-ipv4", p.to_string());
    }
    if let Some(k) = public_key {
        put("public-keys/0/openssh-key", k.to_string());
    }
    if !user_data.is_empty() {
        s.user_data = Some(user_data.to_string());
    }
    let pending = v
        .launched
        .map(|t| rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64)))
        .unwrap_or_default();
    s.identity = Some(
        serde_json::json!({
            "accountId": ACCOUNT,
            "architecture": "x86_64",
            "availabilityZone": v.zone,
            "imageId": v.image_id,
            "instanceId": v.id,
            "instanceType": v.instance_type,
            "pendingTime": pending,
            "privateIp": ip,
            "region": region,
            "version": "2017-09-30",
        })
        .to_string(),
    );
    s
}

// ---------------------------------------------------------------------------------------------
// Networking

fn ip(args: &[&str]) -> Result<(), SimError> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| SimError::Ip {
            args: args.join(" "),
            message: format!("cannot run ip: {e} (install iproute2)"),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(SimError::Ip {
            args: args.join(" "),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// An instance's network namespace; removed (with its veth pair and routes) on drop.
struct Net {
    ns: String,
    host_if: String,
}

impl Net {
    fn create(
        ns: &str,
        host_if: &str,
        private_ip: Ipv4Addr,
        public_ip: Option<Ipv4Addr>,
        gateway: Ipv4Addr,
    ) -> Result<Net, SimError> {
        // A namespace of the same name can only be a leftover of this instance's last boot.
        if Path::new("/run/netns").join(ns).exists() {
            let _ = ip(&["netns", "del", ns]);
        }
        ip(&["netns", "add", ns])?;
        let net = Net {
            ns: ns.into(),
            host_if: host_if.into(),
        };
        let gw = gateway.to_string();
        ip(&[
            "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        ip(&["link", "set", host_if, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{IMDS_ADDR}/32"),
            "dev",
            "lo",
        ])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        let mut addrs = vec![private_ip];
        addrs.extend(public_ip);
        for a in &addrs {
            ip(&["-n", ns, "addr", "add", &format!("{a}/32"), "dev", "eth0"])?;
        }
        ip(&[
            "-n", ns, "route", "add", &gw, "dev", "eth0", "scope", "link",
        ])?;
        ip(&[
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &gw,
            "dev",
            "eth0",
            "src",
            &private_ip.to_string(),
        ])?;
        for a in &addrs {
            ip(&[
                "route",
                "add",
                &format!("{a}/32"),
                "dev",
                host_if,
                "src",
                &gw,
            ])?;
        }
        Ok(net)
    }
}

impl Net {
    /// Limits the pair to `mbit` Mbit/s each way.
    fn limit(&self, mbit: u32) -> Result<(), SimError> {
        let rate = format!("{mbit}mbit");
        for (ns, dev) in [
            (None, self.host_if.as_str()),
            (Some(self.ns.as_str()), "eth0"),
        ] {
            let mut args: Vec<&str> = Vec::new();
            if let Some(ns) = ns {
                args.extend(["-n", ns]);
            }
            args.extend([
                "qdisc", "add", "dev", dev, "root", "tbf", "rate", &rate, "burst", "256kbit",
                "latency", "100ms",
            ]);
            let out = Command::new("tc")
                .args(&args)
                .output()
                .map_err(|e| SimError::Ip {
                    args: format!("tc {}", args.join(" ")),
                    message: format!("cannot run tc: {e} (install iproute2)"),
                })?;
            if !out.status.success() {
                return Err(SimError::Ip {
                    args: format!("tc {}", args.join(" ")),
                    message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                });
            }
        }
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // The pair and its routes go now; a namespace's own devices go only once the kernel
        // frees it, which can be later.
        if Path::new("/sys/class/net").join(&self.host_if).exists() {
            if let Err(e) = ip(&["link", "del", &self.host_if]) {
                eprintln!("[ec2sim] cannot remove {}: {e}", self.host_if);
            }
        }
        if let Err(e) = ip(&["netns", "del", &self.ns]) {
            eprintln!("[ec2sim] cannot remove network namespace {}: {e}", self.ns);
        }
    }
}

/// The interface with the gateway address; removed (with its peer) on drop.
struct GatewayIf;

impl GatewayIf {
    fn create(gateway: Ipv4Addr) -> Result<Self, SimError> {
        let peer = format!("{GATEWAY_IF}p");
        ip(&[
            "link", "add", GATEWAY_IF, "type", "veth", "peer", "name", &peer,
        ])?;
        let g = GatewayIf;
        ip(&["addr", "add", &format!("{gateway}/32"), "dev", GATEWAY_IF])?;
        ip(&["link", "set", &peer, "up"])?;
        ip(&["link", "set", GATEWAY_IF, "up"])?;
        Ok(g)
    }
}

impl Drop for GatewayIf {
    fn drop(&mut self) {
        if let Err(e) = ip(&["link", "del", GATEWAY_IF]) {
            eprintln!("[ec2sim] cannot remove {GATEWAY_IF}: {e}");
        }
    }
}

/// Removes what a simulator that did not end cleanly left (the caller holds the lock, so no
/// other simulator owns them).
fn clean_leftovers() {
    let list = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for ns in list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(NETNS_PREFIX))
    {
        eprintln!("[ec2sim] removing network namespace {ns} left by an earlier run");
        let _ = ip(&["netns", "del", ns]);
    }
    if Path::new("/sys/class/net").join(GATEWAY_IF).exists() {
        eprintln!("[ec2sim] removing {GATEWAY_IF} left by an earlier run");
        let _ = ip(&["link", "del", GATEWAY_IF]);
    }
}

/// A listening socket bound to `addr` inside network namespace `ns`.
fn bind_in_netns(ns: &str, addr: SocketAddr) -> Result<TcpListener, SimError> {
    let path = Path::new("/run/netns").join(ns);
    let fd = File::open(&path).map_err(io_err("cannot open network namespace", &path))?;
    // A thread of its own enters the namespace; the socket stays in it.
    std::thread::spawn(move || -> std::io::Result<TcpListener> {
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)?;
        TcpListener::bind(addr)
    })
    .join()
    .map_err(|_| SimError::Io {
        what: "the thread binding IMDS panicked in",
        path: path.clone(),
        source: std::io::Error::other("panic"),
    })?
    .map_err(io_err("cannot bind 169.254.169.254:80 in", &path))
}

// ---------------------------------------------------------------------------------------------
// Small things

/// The machine-wide simulator lock, waiting up to `timeout` for another simulator.
fn take_lock(timeout: Duration) -> Result<nix::fcntl::Flock<File>, SimError> {
    let path = Path::new(LOCK_PATH);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
    }
    let start = Instant::now();
    let mut said = false;
    loop {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|source| SimError::Lock {
                path: path.into(),
                source,
            })?;
        match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                let _ = lock.set_len(0);
                let _ = writeln!(lock, "{}", std::process::id());
                return Ok(lock);
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                if start.elapsed() > timeout {
                    return Err(SimError::LockTimeout {
                        path: path.into(),
                        waited: timeout,
                    });
                }
                if !said {
                    eprintln!("[ec2sim] waiting for another test's instance simulator to end");
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Err((_, e)) => {
                return Err(SimError::Lock {
                    path: path.into(),
                    source: e.into(),
                })
            }
        }
    }
}

fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: a plain system call; a non-negative result is a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: see above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn pidfd_kill(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: a plain system call on a descriptor we own.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), SimError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
    }
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(mode)
        .open(path)
        .map_err(io_err("cannot write", path))?;
    f.write_all(data).map_err(io_err("cannot write", path))?;
    set_mode(path, mode)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), SimError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_err("cannot set the mode of", path))
}

fn append_console(disk: &Path, line: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(disk.join("console.log"))
    {
        let _ = f.write_all(format!("[ec2sim] {line}").as_bytes());
    }
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `YYYY-MM-DDThh:mm:ssZ` (UTC).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    cedana_driver::providers::catalog::Timestamp::from_epoch(secs)
        .as_str()
        .to_string()
}

/// Standard base64 with padding (EC2's encoding of user-data).
pub fn base64_encode(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Standard base64, padded or not (whitespace ignored); `None` if it is not base64.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    use base64::Engine as _;
    const ANY_PADDING: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let clean: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    ANY_PADDING.decode(clean).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_times() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_741_323);
        assert_eq!(rfc3339(t), "2026-11-27T01:02:03Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn decodes_base64() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8").unwrap(), b"hello");
        assert_eq!(base64_decode("IyEvYmluL3No\nCg==").unwrap(), b"#!/bin/sh\n");
        assert!(base64_decode("a$b").is_none());
        for s in ["", "a", "ab", "abc", "abcd", "#!/bin/sh\necho hi\n"] {
            assert_eq!(
                base64_decode(&base64_encode(s.as_bytes())).unwrap(),
                s.as_bytes()
            );
        }
        assert_eq!(base64_encode(b"hello"), "aGVsbG8=");
    }

    #[test]
    fn reads_cloud_config() {
        let cc = CloudConfig::parse(
            "#cloud-config\nssh_keys:\n  ed25519_private: |\n    -----BEGIN OPENSSH PRIVATE KEY-----\n    abc\n    -----END OPENSSH PRIVATE KEY-----\n  ed25519_public: ssh-ed25519 AAAA host\nssh_authorized_keys:\n  - ssh-ed25519 BBBB user\nruncmd:\n  - echo hi\n  - [touch, /tmp/it's]\n",
        )
        .unwrap();
        assert!(cc.ssh_keys["ed25519_private"].contains("abc\n"));
        assert_eq!(cc.ssh_keys["ed25519_public"], "ssh-ed25519 AAAA host");
        assert_eq!(cc.authorized_keys, ["ssh-ed25519 BBBB user"]);
        assert_eq!(cc.runcmd, ["echo hi", r"'touch' '/tmp/it'\''s'"]);
        assert_eq!(classify("#!/bin/sh\n"), UserData::Script);
        assert_eq!(classify("#cloud-config\n"), UserData::CloudConfig);
        assert_eq!(classify(""), UserData::None);
        assert!(matches!(
            classify("Content-Type: multipart"),
            UserData::Unsupported(_)
        ));
    }
}
