//! The `aws` provider (cargo feature `aws`): workers are EC2 instances, launched from the
//! configured launch template or AMI with user-data that starts `cedana-agent daemon` for the
//! job ([`crate::providers::common::worker_boot_script`], with `--watch-spot`).
//!
//! Offers: the instance types of each enabled region (`DescribeInstanceTypes`, cached) in the
//! enabled families that run the image's architecture and fit the job's spec; spot prices per
//! zone from `DescribeSpotPriceHistory` (the newest Linux entry of each zone); on-demand prices
//! from the price catalog ([`crate::providers::catalog`]; `driver/catalog/aws.json` under the user's
//! `~/.cedana/catalog.json`). A type without a catalog price still gets its spot offers. When
//! the spot price query fails, spot prices of the catalog (as `price --refresh` writes them)
//! stand in.
//!
//! A worker is one `RunInstances` (spot market options for a spot offer, the offer's zone,
//! tags `cedana:job`, `cedana:worker`, `Name`, IMDSv2 required); capacity errors make the job
//! try its next offer. A background poll of `DescribeInstances` marks the worker gone when its
//! instance is shutting down, stopped, terminated or no longer known; terminating (or dropping)
//! the worker terminates the instance.
//!
//! The provider reaches EC2 at its first call, on the runtime that call runs on (the job's);
//! a worker's poll runs on the job's runtime too, and dropping a worker terminates its
//! instance there.
//!
//! The EC2 calls themselves, usable on their own (`bootstrap`, `bake`), are in [`api`].

pub mod api;
pub mod prices;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_ec2::Client;
use cedana_protocol::config::AwsConfig;

pub use api::{
    base64_decode, base64_encode, create_image, describe_image, describe_instance, ensure_key_pair,
    ensure_launch_template, ensure_security_group, find_launch_template, instance_user_data,
    instances_tagged, launch_template_image, run_instance, terminate, wait_image_available,
    wait_running, AwsError, ConnectOptions, Ec2, ImageView, InstanceView, KeyPairOutcome,
    RunRequest, TemplateRequest,
};
pub use prices::{family_matches, newest_per_zone, SpotQuote, TypeInfo, SPOT_SOURCE};

use crate::providers::catalog::{Catalog, CatalogEntry, Timestamp};
use crate::providers::common::{
    finish_in_drop, loopback_only, worker_boot_script, Address, Bootstrap, Gone, Offer,
    ProviderError, Spec,
};

/// The provider's name.
pub const NAME: &str = "aws";

/// Environment variable naming the launch template (name or `lt-` id), over the config's.
pub const LAUNCH_TEMPLATE_ENV: &str = "CEDANA_AWS_LAUNCH_TEMPLATE";
/// Environment variable naming the AMI, over the config's.
pub const IMAGE_ENV: &str = "CEDANA_AWS_IMAGE_ID";
/// Environment variable with the agent's path on the image.
pub const AGENT_ENV: &str = "CEDANA_AWS_AGENT";
/// Environment variable with the boot timeout in seconds.
pub const BOOT_TIMEOUT_ENV: &str = "CEDANA_AWS_BOOT_TIMEOUT";
/// Where a baked image has the agent.
pub const DEFAULT_AGENT: &str = "/usr/local/bin/cedana-agent";
/// How long a new instance gets to boot and register by default.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// Tags every worker instance carries.
pub const TAG_JOB: &str = "cedana:job";
pub const TAG_WORKER: &str = "cedana:worker";

/// What the provider needs: the original's `aws` block, the environment, defaults.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How to reach EC2 (endpoint, credentials, retries).
    pub connect: ConnectOptions,
    /// Regions offers are made in [default: the SDK's region: AWS_REGION, the profile's, else
    /// us-east-1].
    pub regions: Vec<String>,
    /// Families (`t2`) or types (`t2.micro`) offered; all when empty.
    pub families: Vec<String>,
    /// Launch template workers boot from (name or `lt-` id), in every enabled region.
    pub launch_template: Option<String>,
    /// AMI workers boot from (overrides the template's).
    pub image_id: Option<String>,
    pub key_name: Option<String>,
    pub security_group_ids: Vec<String>,
    /// The agent on the image.
    pub agent: String,
    /// Architecture of the image when it cannot be looked up [default: x86_64].
    pub architecture: String,
    /// Make spot offers.
    pub spot: bool,
    /// Highest spot price asked for [default: none, EC2 caps at the on-demand price].
    pub spot_max_price: Option<f64>,
    /// How long a new instance gets to register with the job.
    pub boot_timeout: Duration,
    /// How often a worker's instance is looked at.
    pub poll_every: Duration,
    /// How far back spot prices are asked for.
    pub spot_window: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            connect: ConnectOptions::default(),
            regions: Vec::new(),
            families: Vec::new(),
            launch_template: None,
            image_id: None,
            key_name: None,
            security_group_ids: Vec::new(),
            agent: DEFAULT_AGENT.into(),
            architecture: "x86_64".into(),
            spot: true,
            spot_max_price: None,
            boot_timeout: DEFAULT_BOOT_TIMEOUT,
            poll_every: Duration::from_secs(5),
            spot_window: Duration::from_secs(3600),
        }
    }
}

fn failed(message: impl Into<String>) -> ProviderError {
    ProviderError::Failed {
        provider: NAME.into(),
        message: message.into(),
    }
}

/// Whether `r` looks like an AWS region name (`us-east-1`, `us-gov-west-1`, `ap-southeast-4`).
pub fn is_region_name(r: &str) -> bool {
    let parts: Vec<&str> = r.split('-').collect();
    parts.len() >= 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
        && parts[0].len() == 2
        && parts[parts.len() - 1].bytes().all(|b| b.is_ascii_digit())
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

impl Settings {
    /// From the config's `aws` block and the environment (`CEDANA_AWS_*` over the config).
    pub fn from_config(c: &AwsConfig) -> Result<Self, ProviderError> {
        let mut s = Settings::default();
        for r in &c.enabled_regions {
            let r = r.trim();
            if !is_region_name(r) {
                return Err(failed(format!(
                    "`aws.enabled_regions` has {r:?}, which is not an AWS region name; use names such as \"us-east-1\""
                )));
            }
            if !s.regions.iter().any(|x| x == r) {
                s.regions.push(r.to_string());
            }
        }
        for f in &c.enabled_instance_families {
            let f = f.trim();
            if f.is_empty()
                || !f
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
            {
                return Err(failed(format!(
                    "`aws.enabled_instance_families` has {f:?}, which is not an instance family such as \"t2\" or \"m5\" (or a type such as \"t2.micro\")"
                )));
            }
            s.families.push(f.to_lowercase());
        }
        s.launch_template = env_nonempty(LAUNCH_TEMPLATE_ENV).or_else(|| {
            c.launch_template
                .as_deref()
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_string)
        });
        s.image_id = env_nonempty(IMAGE_ENV).or_else(|| {
            c.image_id
                .as_deref()
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_string)
        });
        if let Some(img) = &s.image_id {
            if !img.starts_with("ami-") {
                return Err(failed(format!(
                    "the image id {img:?} (aws.image_id or ${IMAGE_ENV}) is not an AMI id such as \"ami-0abc...\""
                )));
            }
        }
        s.key_name = c.key_name.clone().filter(|k| !k.trim().is_empty());
        s.security_group_ids = c.security_group_ids.clone();
        if let Some(a) = env_nonempty(AGENT_ENV).or_else(|| c.agent_path.clone()) {
            s.agent = a;
        }
        s.spot = c.spot.unwrap_or(true);
        let boot = match env_nonempty(BOOT_TIMEOUT_ENV) {
            Some(v) => Some(v.parse::<u64>().map_err(|_| {
                failed(format!(
                    "${BOOT_TIMEOUT_ENV} is {v:?}, not a number of seconds"
                ))
            })?),
            None => c.boot_timeout_seconds,
        };
        if let Some(secs) = boot {
            if secs == 0 {
                return Err(failed(
                    "the boot timeout (aws.boot_timeout_seconds or $CEDANA_AWS_BOOT_TIMEOUT) must be at least 1 second",
                ));
            }
            s.boot_timeout = Duration::from_secs(secs);
        }
        Ok(s)
    }
}

/// Why a region has no offers.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error(transparent)]
    Aws(#[from] AwsError),
    #[error("launch template {template:?} (aws.launch_template) does not exist in {region}; make it there (cedana-driver bake --region {region}) or remove the region from aws.enabled_regions")]
    NoTemplate { template: String, region: String },
    #[error("image {image} (aws.image_id) does not exist in {region}; AMIs are regional: copy it there (aws ec2 copy-image) or remove the region from aws.enabled_regions")]
    NoImage { image: String, region: String },
    #[error("the launch template's image {image} does not exist in {region}")]
    NoTemplateImage { image: String, region: String },
    #[error("no {arch} instance type of {families} in {region} fits {spec}")]
    NoFit {
        arch: String,
        families: String,
        region: String,
        spec: String,
    },
    #[error("{fit} instance types in {region} fit, but none has a price: no spot price from EC2 and no on-demand price in the catalog (add entries to ~/.cedana/catalog.json)")]
    NoPrice { fit: usize, region: String },
}

/// EC2 and the regions offers are made in.
struct Connection {
    ec2: Arc<Ec2>,
    regions: Vec<String>,
}

/// The `aws` provider.
pub struct AwsProvider {
    settings: Settings,
    catalog: Catalog,
    /// EC2, reached at the first call that needs it, on the runtime that call runs on.
    conn: tokio::sync::OnceCell<Connection>,
    types: Mutex<HashMap<String, Arc<Vec<TypeInfo>>>>,
    /// Per region: the architecture of the image workers boot from there (checked once).
    arches: Mutex<HashMap<String, String>>,
}

impl AwsProvider {
    /// A provider with `settings`, on-demand prices from `catalog`. It reaches EC2 (the SDK's
    /// configuration: region, credentials) at the first call that needs it, on the runtime
    /// that call runs on; its EC2 clients live there, and it is used there from then on.
    pub fn new(settings: Settings, catalog: Catalog) -> Result<Self, ProviderError> {
        Ok(AwsProvider {
            settings,
            catalog,
            conn: tokio::sync::OnceCell::new(),
            types: Mutex::new(HashMap::new()),
            arches: Mutex::new(HashMap::new()),
        })
    }

    /// From the config's `aws` block, the environment and the price catalog.
    pub fn from_config(c: &AwsConfig) -> Result<Self, ProviderError> {
        let settings = Settings::from_config(c)?;
        let catalog = Catalog::load().map_err(|e| failed(e.to_string()))?;
        Self::new(settings, catalog)
    }

    /// EC2 and the regions, reached once.
    async fn connection(&self) -> Result<&Connection, ProviderError> {
        self.conn
            .get_or_try_init(|| async {
                let ec2 = Ec2::connect(&self.settings.connect)
                    .await
                    .map_err(|e| failed(e.to_string()))?;
                let regions = if self.settings.regions.is_empty() {
                    vec![ec2.default_region().to_string()]
                } else {
                    self.settings.regions.clone()
                };
                Ok(Connection {
                    ec2: Arc::new(ec2),
                    regions,
                })
            })
            .await
    }

    /// The client of `region`; only after [`AwsProvider::connection`].
    fn client(&self, region: &str) -> Client {
        self.conn
            .get()
            .expect("connected before any region is asked")
            .ec2
            .client(region)
    }

    /// Terminates every instance tagged for `job` (`cedana:job`) in the enabled regions that
    /// is not gone yet: what `down` does for a job whose controller died. A line per
    /// instance, or per region that could not be asked.
    pub async fn end_job(&self, job: &str) -> Vec<String> {
        let regions = match self.regions().await {
            Ok(r) => r.to_vec(),
            Err(e) => return vec![format!("aws: cannot reach EC2 ({e}); end job {job}'s instances (tag {TAG_JOB}={job}) by hand")],
        };
        let mut said = Vec::new();
        for region in regions {
            let client = self.client(&region);
            match instances_tagged(&client, TAG_JOB, job).await {
                Ok(found) => {
                    for v in found.into_iter().filter(|v| !v.is_gone()) {
                        said.push(match terminate(&client, &v.id).await {
                            Ok(()) => format!("aws: instance {} in {region} terminated", v.id),
                            Err(e) => {
                                format!("aws: cannot terminate instance {} in {region}: {e}", v.id)
                            }
                        });
                    }
                }
                Err(e) => said.push(format!(
                    "aws: cannot list job {job}'s instances in {region}: {e}"
                )),
            }
        }
        said
    }

    /// The settings in use.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The regions offers are made in (the settings', else the SDK's default region).
    pub async fn regions(&self) -> Result<&[String], ProviderError> {
        Ok(&self.connection().await?.regions)
    }

    /// The EC2 access the provider uses (its calls run on the runtime of the provider's first
    /// call).
    pub async fn ec2(&self) -> Result<&Arc<Ec2>, ProviderError> {
        Ok(&self.connection().await?.ec2)
    }

    /// The region's instance types (asked once).
    async fn types(&self, region: &str) -> Result<Arc<Vec<TypeInfo>>, AwsError> {
        if let Some(t) = self
            .types
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(region)
        {
            return Ok(t.clone());
        }
        let t = Arc::new(prices::instance_types(&self.client(region)).await?);
        self.types
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(region.to_string(), t.clone());
        Ok(t)
    }

    /// The architecture of what workers in `region` boot from, checked against EC2 (the
    /// template and the image exist there; positive answers are kept). `Ok(None)` when nothing
    /// is configured; `Err` says why the region cannot be used.
    async fn source(&self, region: &str) -> Result<Option<String>, RegionError> {
        if self.settings.launch_template.is_none() && self.settings.image_id.is_none() {
            return Ok(None);
        }
        if let Some(a) = self
            .arches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(region)
        {
            return Ok(Some(a.clone()));
        }
        let client = self.client(region);
        let mut image = self.settings.image_id.clone();
        if let Some(lt) = &self.settings.launch_template {
            let found = find_launch_template(&client, lt).await?;
            let Some((id, _)) = found else {
                return Err(RegionError::NoTemplate {
                    template: lt.clone(),
                    region: region.to_string(),
                });
            };
            if image.is_none() {
                image = launch_template_image(&client, &id).await?;
            }
        }
        let mut architecture = self.settings.architecture.clone();
        if let Some(img) = &image {
            match describe_image(&client, img).await? {
                Some(v) => {
                    if let Some(a) = v.architecture {
                        architecture = a;
                    }
                }
                None if self.settings.image_id.is_some() => {
                    return Err(RegionError::NoImage {
                        image: img.clone(),
                        region: region.to_string(),
                    })
                }
                None => {
                    return Err(RegionError::NoTemplateImage {
                        image: img.clone(),
                        region: region.to_string(),
                    })
                }
            }
        }
        self.arches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(region.to_string(), architecture.clone());
        Ok(Some(architecture))
    }

    /// The offers of one region; `Err` says why the region has none.
    async fn region_offers(&self, region: &str, spec: &Spec) -> Result<Vec<Offer>, RegionError> {
        let arch = self
            .source(region)
            .await?
            .unwrap_or_else(|| self.settings.architecture.clone());
        let types = self.types(region).await?;
        let hardware_only = Spec {
            max_price_usd_hour: None,
            ..spec.clone()
        };
        let fit: Vec<&TypeInfo> = types
            .iter()
            .filter(|t| family_matches(&self.settings.families, &t.name))
            .filter(|t| t.runs(&arch))
            .filter(|t| {
                t.offer(region, None, 0.0, false, String::new(), None)
                    .misfit(&hardware_only)
                    .is_none()
            })
            .collect();
        if fit.is_empty() {
            let families = if self.settings.families.is_empty() {
                "any family".to_string()
            } else {
                format!("families {:?}", self.settings.families)
            };
            return Err(RegionError::NoFit {
                arch,
                families,
                region: region.to_string(),
                spec: serde_json::to_string(&hardware_only).unwrap_or_default(),
            });
        }
        let mut offers = Vec::new();
        // Spot: the newest price per zone, or the catalog's when EC2 cannot say.
        if self.settings.spot {
            let names: Vec<String> = fit
                .iter()
                .filter(|t| t.spot)
                .map(|t| t.name.clone())
                .collect();
            match prices::spot_quotes(&self.client(region), &names, self.settings.spot_window).await
            {
                Ok(quotes) => {
                    for q in quotes {
                        if let Some(t) = fit.iter().find(|t| t.name == q.instance_type) {
                            offers.push(t.offer(
                                region,
                                Some(&q.zone),
                                q.price,
                                true,
                                SPOT_SOURCE.into(),
                                Some(q.at),
                            ));
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(%region, error = %e, "no live spot prices; using the catalog's");
                    for c in self.catalog_entries(region, true) {
                        if let Some(t) = fit.iter().find(|t| t.name == c.instance_type) {
                            offers.push(t.offer(
                                region,
                                c.zone.as_deref(),
                                c.price_usd_hour,
                                true,
                                format!("catalog: {}", c.source),
                                Some(c.updated_at.epoch()),
                            ));
                        }
                    }
                }
            }
        }
        // On demand: the catalog's price for the region.
        for c in self.catalog_entries(region, false) {
            if let Some(t) = fit
                .iter()
                .find(|t| t.name == c.instance_type && t.on_demand)
            {
                offers.push(t.offer(
                    region,
                    None,
                    c.price_usd_hour,
                    false,
                    format!("catalog: {}", c.source),
                    Some(c.updated_at.epoch()),
                ));
            }
        }
        if offers.is_empty() {
            return Err(RegionError::NoPrice {
                fit: fit.len(),
                region: region.to_string(),
            });
        }
        Ok(offers)
    }

    fn catalog_entries(&self, region: &str, spot: bool) -> Vec<&CatalogEntry> {
        self.catalog
            .entries
            .iter()
            .filter(|e| e.provider == NAME && e.region == region && e.spot == spot)
            .filter(|e| spot || e.zone.is_none())
            .collect()
    }

    /// The current spot prices of the enabled families in the enabled regions, as catalog
    /// entries (provider `aws`, per type and zone, `spot: true`, source
    /// `aws:DescribeSpotPriceHistory`, the time EC2 gives the price), for
    /// `cedana-driver price --refresh` to keep.
    pub async fn refresh_catalog(&self) -> Result<Vec<CatalogEntry>, ProviderError> {
        let c = self.connection().await?;
        refresh_catalog(&c.ec2, &self.settings, &c.regions)
            .await
            .map_err(|e| failed(e.to_string()))
    }
}

/// The current spot prices of `settings.families` in `regions` as catalog entries (see
/// [`AwsProvider::refresh_catalog`]).
pub async fn refresh_catalog(
    ec2: &Ec2,
    settings: &Settings,
    regions: &[String],
) -> Result<Vec<CatalogEntry>, AwsError> {
    let mut out = Vec::new();
    for region in regions {
        let client = ec2.client(region);
        let types: Vec<TypeInfo> = prices::instance_types(&client)
            .await?
            .into_iter()
            .filter(|t| t.spot && family_matches(&settings.families, &t.name))
            .collect();
        let names: Vec<String> = types.iter().map(|t| t.name.clone()).collect();
        for q in prices::spot_quotes(&client, &names, settings.spot_window).await? {
            let Some(t) = types.iter().find(|t| t.name == q.instance_type) else {
                continue;
            };
            out.push(CatalogEntry {
                provider: NAME.into(),
                instance_type: t.name.clone(),
                region: region.clone(),
                zone: Some(q.zone),
                vcpus: t.vcpus,
                memory_gb: t.memory_gb,
                gpu: t.gpu.clone(),
                gpu_count: t.gpu_count,
                vram_gb: t.vram_gb,
                price_usd_hour: q.price,
                spot: true,
                source: SPOT_SOURCE.into(),
                updated_at: Timestamp::from_epoch(q.at),
            });
        }
    }
    Ok(out)
}

impl AwsProvider {
    /// How long a new instance gets to boot and register with the job.
    pub fn boot_timeout(&self) -> Duration {
        self.settings.boot_timeout
    }

    /// The offers of the enabled regions (asked at the same time) that fit `spec`'s hardware.
    pub async fn offers(&self, spec: &Spec) -> Result<Vec<Offer>, ProviderError> {
        let regions = &self.connection().await?.regions;
        let results =
            futures::future::join_all(regions.iter().map(|r| self.region_offers(r, spec))).await;
        let mut offers = Vec::new();
        let mut why = Vec::new();
        for r in results {
            match r {
                Ok(o) => offers.extend(o),
                Err(e) => why.push(e),
            }
        }
        if offers.is_empty() && !why.is_empty() {
            let why: Vec<String> = why.iter().map(ToString::to_string).collect();
            return Err(failed(why.join("; ")));
        }
        for w in &why {
            tracing::warn!(reason = %w, "aws: a region has no offers");
        }
        Ok(offers)
    }

    /// Launches an instance for `offer` that becomes worker `boot.worker` of the job; its
    /// state is then followed on `boot.rt`.
    pub async fn launch(
        &mut self,
        offer: &Offer,
        boot: &Bootstrap<'_>,
    ) -> Result<AwsWorker, ProviderError> {
        if loopback_only(boot.nats_url) {
            return Err(failed(format!(
                "the job's NATS server ({}) is not reachable from EC2 instances (loopback or no address); set connection.nats_url (and connection.auth_token) in the config to a NATS server the instances can reach (docs/providers.md)",
                if boot.nats_url.is_empty() { "none" } else { boot.nats_url }
            )));
        }
        if self.settings.launch_template.is_none() && self.settings.image_id.is_none() {
            return Err(failed(format!(
                "no image to boot workers from: set aws.launch_template in the config to the template `cedana-driver bake` made (or ${LAUNCH_TEMPLATE_ENV}), or aws.image_id to an AMI with cedana-agent at {}",
                self.settings.agent
            )));
        }
        let region = offer.region.clone();
        self.connection().await?;
        let client = self.client(&region);
        let user_data = worker_boot_script(&self.settings.agent, boot, &["--watch-spot"]);
        let token = cedana_protocol::random_hex(16)
            .map_err(|e| failed(format!("cannot read /dev/urandom: {e}")))?;
        let req = RunRequest {
            image_id: self.settings.image_id.clone(),
            launch_template: self.settings.launch_template.clone(),
            instance_type: offer.instance_type.clone(),
            zone: offer.zone.clone(),
            spot: offer.spot,
            max_price: if offer.spot {
                self.settings.spot_max_price
            } else {
                None
            },
            user_data,
            key_name: self.settings.key_name.clone(),
            security_group_ids: self.settings.security_group_ids.clone(),
            tags: vec![
                (TAG_JOB.into(), boot.job.into()),
                (TAG_WORKER.into(), boot.worker.into()),
                (
                    "Name".into(),
                    format!("cedana-{}-{}", boot.job, boot.worker),
                ),
            ],
            client_token: Some(format!("cedana-{token}")),
        };
        if let Err(why) = self.source(&region).await {
            return Err(failed(why.to_string()));
        }
        let id = run_instance(&client, &req).await.map_err(|e| {
            if e.is_capacity() {
                ProviderError::Capacity {
                    provider: NAME.into(),
                    instance_type: offer.instance_type.clone(),
                    message: format!(
                        "{}{}",
                        offer
                            .zone
                            .as_deref()
                            .map(|z| format!("{z}, "))
                            .unwrap_or_default(),
                        e
                    ),
                }
            } else {
                failed(e.to_string())
            }
        })?;
        let gone = Gone::new();
        let address = Address::default();
        let poller = boot
            .rt
            .spawn(watch(
                client.clone(),
                id.clone(),
                self.settings.poll_every,
                gone.clone(),
                address.clone(),
            ))
            .abort_handle();
        Ok(AwsWorker {
            id,
            region,
            client,
            rt: boot.rt.clone(),
            gone,
            address,
            poller: Some(poller),
            ended: false,
        })
    }
}

impl AwsProvider {
    /// Takes back the worker on instance `id` in `region` that a driver that died launched
    /// (`resume`): followed again until it is gone; terminating it terminates the instance.
    pub async fn adopt(
        &self,
        id: &str,
        region: &str,
        rt: &tokio::runtime::Handle,
    ) -> Result<AwsWorker, ProviderError> {
        self.connection().await?;
        let client = self.client(region);
        let gone = Gone::new();
        let address = Address::default();
        let poller = rt
            .spawn(watch(
                client.clone(),
                id.to_string(),
                self.settings.poll_every,
                gone.clone(),
                address.clone(),
            ))
            .abort_handle();
        Ok(AwsWorker {
            id: id.to_string(),
            region: region.to_string(),
            client,
            rt: rt.clone(),
            gone,
            address,
            poller: Some(poller),
            ended: false,
        })
    }
}

/// How long an instance EC2 has never shown may stay unknown before it counts as gone (EC2 is
/// eventually consistent just after a launch).
const UNSEEN_GRACE: Duration = Duration::from_secs(120);

/// Follows a worker's instance until it is gone: shutting down, stopping, stopped, terminated,
/// or unknown to EC2 (after it was seen, or for longer than [`UNSEEN_GRACE`]); notes its
/// address in `address` meanwhile.
async fn watch(client: Client, id: String, every: Duration, gone: Gone, address: Address) {
    let started = tokio::time::Instant::now();
    let mut seen = false;
    loop {
        tokio::time::sleep(every).await;
        match describe_instance(&client, &id).await {
            Ok(Some(v)) if v.is_gone() => {
                tracing::info!(instance = %id, state = %v.state, reason = v.state_reason.as_deref().unwrap_or(""), "EC2 instance is gone");
                gone.set();
                return;
            }
            Ok(Some(v)) => {
                seen = true;
                address.note(v.public_ip.as_deref(), v.private_ip.as_deref());
            }
            Ok(None) if seen || started.elapsed() > UNSEEN_GRACE => {
                tracing::info!(instance = %id, "EC2 no longer knows the instance");
                gone.set();
                return;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(instance = %id, error = %e, "cannot read the instance's state")
            }
        }
    }
}

/// A worker on an EC2 instance. Terminating (or dropping) it terminates the instance.
pub struct AwsWorker {
    id: String,
    region: String,
    client: Client,
    /// The runtime it was launched on: its poller runs there, and so does the termination
    /// when it is dropped.
    rt: tokio::runtime::Handle,
    gone: Gone,
    address: Address,
    poller: Option<tokio::task::AbortHandle>,
    ended: bool,
}

impl AwsWorker {
    /// Where this machine reaches the instance, once EC2 said (public address first).
    pub fn address(&self) -> Option<std::net::IpAddr> {
        self.address.get()
    }

    /// Asks EC2 for the instance's address now (the poller also notes it as it goes).
    pub async fn learn_address(&self) {
        if let Ok(Some(v)) = describe_instance(&self.client, &self.id).await {
            self.address
                .note(v.public_ip.as_deref(), v.private_ip.as_deref());
        }
    }

    /// The instance's id.
    pub fn instance_id(&self) -> String {
        self.id.clone()
    }

    /// The instance's region.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// What turns true when the instance is gone (or the worker was terminated).
    pub fn gone(&self) -> Gone {
        self.gone.clone()
    }

    /// Terminates the instance (once), waiting for EC2's answer (at most 120 s).
    pub async fn terminate(&mut self) {
        if let Some(work) = self.end() {
            work.await;
            self.gone.set();
        }
    }

    /// The termination still to do, once: the poller is stopped.
    fn end(&mut self) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        if self.ended {
            return None;
        }
        self.ended = true;
        if let Some(p) = self.poller.take() {
            p.abort();
        }
        let client = self.client.clone();
        let id = self.id.clone();
        let region = self.region.clone();
        Some(async move {
            let r = tokio::time::timeout(Duration::from_secs(120), terminate(&client, &id)).await;
            let err = match r {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer within 120 s".to_string(),
            };
            tracing::error!(instance = %id, %region, error = %err, "cannot terminate the EC2 instance; terminate it in the console to stop paying for it");
            tracing::error!("cannot terminate EC2 instance {id} in {region}: {err}; terminate it in the EC2 console to stop paying for it");
        })
    }
}

impl Drop for AwsWorker {
    fn drop(&mut self) {
        if let Some(work) = self.end() {
            finish_in_drop(&self.rt, work);
            self.gone.set();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_names_are_checked() {
        for ok in [
            "us-east-1",
            "us-gov-west-1",
            "ap-southeast-4",
            "eu-central-2",
        ] {
            assert!(is_region_name(ok), "{ok}");
        }
        for bad in [
            "East Coast (NY2)",
            "us-east",
            "US-EAST-1",
            "us-east-1a",
            "",
            "us--1",
        ] {
            assert!(!is_region_name(bad), "{bad}");
        }
    }

    #[test]
    fn settings_name_bad_input() {
        let c = AwsConfig {
            enabled_regions: vec!["us-east-1".into(), "Virginia".into()],
            ..Default::default()
        };
        let e = Settings::from_config(&c).unwrap_err().to_string();
        assert!(
            e.contains("aws.enabled_regions") && e.contains("Virginia"),
            "{e}"
        );
        let c = AwsConfig {
            enabled_instance_families: vec!["t2; rm -rf".into()],
            ..Default::default()
        };
        let e = Settings::from_config(&c).unwrap_err().to_string();
        assert!(e.contains("aws.enabled_instance_families"), "{e}");
        let c = AwsConfig {
            image_id: Some("ubuntu".into()),
            ..Default::default()
        };
        let e = Settings::from_config(&c).unwrap_err().to_string();
        assert!(e.contains("aws.image_id") && e.contains("ubuntu"), "{e}");
        let c = AwsConfig {
            enabled_regions: vec!["us-east-1".into(), "us-west-1".into(), "us-east-1".into()],
            enabled_instance_families: vec!["T2".into()],
            launch_template: Some("caltech-test".into()),
            boot_timeout_seconds: Some(600),
            ..Default::default()
        };
        let s = Settings::from_config(&c).unwrap();
        assert_eq!(s.regions, ["us-east-1", "us-west-1"]);
        assert_eq!(s.families, ["t2"]);
        assert_eq!(s.launch_template.as_deref(), Some("caltech-test"));
        assert_eq!(s.boot_timeout, Duration::from_secs(600));
        assert_eq!(s.agent, DEFAULT_AGENT);
        assert!(s.spot);
    }
}
