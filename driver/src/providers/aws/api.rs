//! The EC2 calls the driver makes, over `aws-sdk-ec2`, with errors that name the call, the
//! region and what to do next. Endpoint, credentials and region come the standard AWS ways
//! (`AWS_ENDPOINT_URL`/`AWS_ENDPOINT_URL_EC2`, `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`,
//! `AWS_PROFILE` and `~/.aws/{config,credentials}`, SSO, `credential_process`, `AWS_REGION`) or
//! from [`ConnectOptions`] (tests point it at moto with them).
//!
//! Calls are retried by the SDK's standard retry strategy with backoff, throttling
//! (`RequestLimitExceeded`) included; `RunInstances` carries a client token, so a retried launch
//! never starts a second machine. An [`Ec2`] and the clients it makes must be used from one
//! tokio runtime (their connection pool lives on it).

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    ArchitectureValues, Filter, HttpTokensState, ImageState, InstanceInterruptionBehavior,
    InstanceMarketOptionsRequest, InstanceMetadataEndpointState, InstanceMetadataOptionsRequest,
    InstanceStateName, InstanceType, IpPermission, IpRange, KeyFormat, KeyType,
    LaunchTemplateHttpTokensState, LaunchTemplateInstanceMetadataOptionsRequest,
    LaunchTemplateSpecification, LaunchTemplateTagSpecificationRequest, MarketType, Placement,
    RequestLaunchTemplateData, ResourceType, SpotInstanceType, SpotMarketOptions, Tag,
    TagSpecification,
};
use aws_sdk_ec2::Client;
use cedana_protocol::config::Secret;

/// Region used when neither the options, `AWS_REGION` nor the profile name one.
pub const FALLBACK_REGION: &str = "us-east-1";
/// Pages of a list followed at most (a list that does not end is an error).
const MAX_PAGES: usize = 1000;

/// Errors of EC2 calls. None holds a credential, a private key or user-data.
#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    /// No capacity for this request now (`InsufficientInstanceCapacity`, `SpotMaxPriceTooLow`,
    /// `MaxSpotInstanceCountExceeded`, `InstanceLimitExceeded`, `VcpuLimitExceeded`,
    /// `Unsupported`, ...): another type, zone or market may work.
    #[error("EC2 {call} in {region}: no capacity ({code}): {message}")]
    Capacity {
        call: &'static str,
        region: String,
        code: String,
        message: String,
    },
    /// The credentials were refused or lack a permission.
    #[error("EC2 {call} in {region}: {code}: {message}; check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/credentials) and that they allow ec2:{call} (docs/providers.md lists the permissions)")]
    Auth {
        call: &'static str,
        region: String,
        code: String,
        message: String,
    },
    /// Still throttled after the retries.
    #[error("EC2 {call} in {region}: throttled by AWS ({code}) after the retries; wait a minute and try again, or make fewer calls (fewer regions or families)")]
    Throttled {
        call: &'static str,
        region: String,
        code: String,
    },
    /// Any other error EC2 answered with.
    #[error("EC2 {call} in {region}: {code}: {message}")]
    Api {
        call: &'static str,
        region: String,
        code: String,
        message: String,
    },
    /// No credentials could be found, or the request could not be made.
    #[error("EC2 {call} in {region}: {message}; set AWS credentials the standard way (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with ~/.aws/credentials or SSO)")]
    Credentials {
        call: &'static str,
        region: String,
        message: String,
    },
    /// The endpoint could not be reached or did not answer in time.
    #[error("EC2 {call} in {region}: cannot reach the EC2 endpoint: {message}; check the network, and AWS_ENDPOINT_URL/AWS_ENDPOINT_URL_EC2 if set")]
    Transport {
        call: &'static str,
        region: String,
        message: String,
    },
    /// The answer was not what the API reference describes.
    #[error("EC2 {call} in {region}: unexpected answer: {message}")]
    Unexpected {
        call: &'static str,
        region: String,
        message: String,
    },
    /// A wait ran out of time.
    #[error("EC2 {what} {id} in {region} is still {state} after {secs} s; look at it in the EC2 console")]
    Timeout {
        what: &'static str,
        id: String,
        region: String,
        state: String,
        secs: u64,
    },
    /// An instance ended (or an image failed) while waited on.
    #[error("EC2 {what} {id} in {region} is {state}{reason}")]
    Ended {
        what: &'static str,
        id: String,
        region: String,
        state: String,
        reason: String,
    },
    /// A request the caller built cannot be sent.
    #[error("{0}")]
    Invalid(String),
    /// A key pair exists in EC2 but its private key file would be replaced, or the other way.
    #[error("key pair {name} in {region}: {message}")]
    KeyPair {
        name: String,
        region: String,
        message: String,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// EC2 error codes that mean "not now, not here": another offer may work.
pub const CAPACITY_CODES: [&str; 12] = [
    "InsufficientInstanceCapacity",
    "InsufficientCapacity",
    "InsufficientHostCapacity",
    "InsufficientReservedInstanceCapacity",
    "InsufficientCapacityOnOutpost",
    "SpotMaxPriceTooLow",
    "MaxSpotInstanceCountExceeded",
    "InstanceLimitExceeded",
    "VcpuLimitExceeded",
    "Unsupported",
    "UnsupportedInstanceType",
    "ReservationCapacityExceeded",
];

const AUTH_CODES: [&str; 9] = [
    "AuthFailure",
    "UnauthorizedOperation",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "RequestExpired",
    "OptInRequired",
    "Blocked",
    "PendingVerification",
];

const THROTTLE_CODES: [&str; 4] = [
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "TooManyRequestsException",
];

impl AwsError {
    /// Another offer (type, zone, market) may work where this one did not.
    pub fn is_capacity(&self) -> bool {
        matches!(self, AwsError::Capacity { .. })
    }

    /// EC2's error code, when EC2 answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            AwsError::Capacity { code, .. }
            | AwsError::Auth { code, .. }
            | AwsError::Throttled { code, .. }
            | AwsError::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The error of a service answer with `code` and `message`.
    pub fn from_code(call: &'static str, region: &str, code: &str, message: &str) -> Self {
        let region = region.to_string();
        let (code, message) = (code.to_string(), message.to_string());
        if CAPACITY_CODES.contains(&code.as_str()) {
            AwsError::Capacity {
                call,
                region,
                code,
                message,
            }
        } else if AUTH_CODES.contains(&code.as_str()) {
            AwsError::Auth {
                call,
                region,
                code,
                message,
            }
        } else if THROTTLE_CODES.contains(&code.as_str()) {
            AwsError::Throttled { call, region, code }
        } else {
            AwsError::Api {
                call,
                region,
                code,
                message,
            }
        }
    }

    fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> AwsError {
        let path = path.to_path_buf();
        move |source| AwsError::Io { what, path, source }
    }
}

/// An error and its causes, `: `-separated, by their `Display` only (the SDK's `Debug` holds
/// whole responses).
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if !text.is_empty() && !parts.last().is_some_and(|p| p.ends_with(&text)) {
            parts.push(text);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// A credential chain's failure, said plainly: the SDK lists every provider it tried, one
/// line each; what matters is that none had credentials, and the first line says why.
fn plain_credentials(message: &str) -> String {
    let first = message.lines().next().unwrap_or("").trim();
    let first: String = first.chars().take(200).collect();
    if message.contains("no credentials found") || message.contains("loading credentials") {
        format!("no AWS credentials found ({first})")
    } else {
        first
    }
}

/// Maps an SDK error of `call` in `region`.
pub fn sdk_error<E, R>(call: &'static str, region: &str, e: SdkError<E, R>) -> AwsError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + 'static,
{
    let region_s = region.to_string();
    match &e {
        SdkError::ServiceError(_) => {
            let code = e.code().unwrap_or("Unknown").to_string();
            let message = e.message().unwrap_or("(no message)").to_string();
            AwsError::from_code(call, region, &code, &message)
        }
        SdkError::TimeoutError(_) => AwsError::Transport {
            call,
            region: region_s,
            message: "timed out".into(),
        },
        SdkError::DispatchFailure(_) => {
            let message = causes(&e);
            if message.contains("credential") || message.contains("identity") {
                AwsError::Credentials {
                    call,
                    region: region_s,
                    message: plain_credentials(&message),
                }
            } else {
                AwsError::Transport {
                    call,
                    region: region_s,
                    message,
                }
            }
        }
        SdkError::ConstructionFailure(_) => AwsError::Credentials {
            call,
            region: region_s,
            message: causes(&e),
        },
        _ => AwsError::Unexpected {
            call,
            region: region_s,
            message: causes(&e),
        },
    }
}

/// The region a client calls.
pub fn region_of(client: &Client) -> String {
    client
        .config()
        .region()
        .map(|r| r.as_ref().to_string())
        .unwrap_or_else(|| FALLBACK_REGION.to_string())
}

// ---------------------------------------------------------------------------------------------
// Connecting
// ---------------------------------------------------------------------------------------------

/// How to reach EC2. The default takes everything from the standard AWS settings.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Default region [default: `AWS_REGION`, the profile's, else us-east-1].
    pub region: Option<String>,
    /// Another endpoint (moto) [default: `AWS_ENDPOINT_URL_EC2`, `AWS_ENDPOINT_URL`, AWS's].
    pub endpoint_url: Option<String>,
    /// Static credentials (access key id, secret) instead of the standard chain.
    pub credentials: Option<(String, Secret)>,
    /// Attempts per call, the first included (throttling and transient errors are retried
    /// with exponential backoff).
    pub max_attempts: u32,
    /// The longest wait between two attempts.
    pub max_backoff: Duration,
    /// Time for one attempt.
    pub attempt_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            region: None,
            endpoint_url: None,
            credentials: None,
            max_attempts: 6,
            max_backoff: Duration::from_secs(20),
            attempt_timeout: Duration::from_secs(60),
        }
    }
}

impl From<&ConnectOptions> for ConnectOptions {
    fn from(o: &ConnectOptions) -> Self {
        o.clone()
    }
}

/// The config's `aws` block: the standard AWS settings, the first enabled region as the
/// default one.
impl From<&cedana_protocol::config::AwsConfig> for ConnectOptions {
    fn from(c: &cedana_protocol::config::AwsConfig) -> Self {
        ConnectOptions {
            region: c
                .enabled_regions
                .first()
                .map(|r| r.trim().to_string())
                .filter(|r| !r.is_empty()),
            ..ConnectOptions::default()
        }
    }
}

/// EC2 access: the shared SDK configuration and one client per region.
pub struct Ec2 {
    sdk: aws_config::SdkConfig,
    default_region: String,
    clients: Mutex<HashMap<String, Client>>,
}

impl std::fmt::Debug for Ec2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ec2")
            .field("default_region", &self.default_region)
            .field("endpoint_url", &self.sdk.endpoint_url())
            .finish()
    }
}

impl Ec2 {
    /// Loads the AWS configuration (standard chain, overridden by `opts`: a
    /// [`ConnectOptions`] or the config's `aws` block).
    pub async fn connect(opts: impl Into<ConnectOptions>) -> Result<Ec2, AwsError> {
        let opts: ConnectOptions = opts.into();
        use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
        // HTTPS with rustls on ring (the workspace compiles no other TLS); plain HTTP too.
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(opts.max_attempts.max(1))
                    .with_initial_backoff(Duration::from_millis(500))
                    .with_max_backoff(opts.max_backoff),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .operation_attempt_timeout(opts.attempt_timeout)
                    .build(),
            );
        if let Some(r) = &opts.region {
            loader = loader.region(Region::new(r.clone()));
        }
        if let Some(u) = &opts.endpoint_url {
            loader = loader.endpoint_url(u.clone());
        }
        if let Some((id, secret)) = &opts.credentials {
            loader = loader.credentials_provider(aws_sdk_ec2::config::Credentials::new(
                id.clone(),
                secret.expose().to_string(),
                None,
                None,
                "cedana-config",
            ));
        }
        let sdk = loader.load().await;
        let default_region = sdk
            .region()
            .map(|r| r.as_ref().to_string())
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| FALLBACK_REGION.to_string());
        Ok(Ec2 {
            sdk,
            default_region,
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// The region used when none is named.
    pub fn default_region(&self) -> &str {
        &self.default_region
    }

    /// The client of `region` (made once; cheap to clone).
    pub fn client(&self, region: &str) -> Client {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients
            .entry(region.to_string())
            .or_insert_with(|| {
                let conf = aws_sdk_ec2::config::Builder::from(&self.sdk)
                    .region(Region::new(region.to_string()))
                    .build();
                Client::from_conf(conf)
            })
            .clone()
    }
}

// ---------------------------------------------------------------------------------------------
// Instances
// ---------------------------------------------------------------------------------------------

/// What to launch.
#[derive(Clone, Default)]
pub struct RunRequest {
    /// The AMI (overrides the launch template's).
    pub image_id: Option<String>,
    /// A launch template, by name or by id (`lt-...`); its default version is used.
    pub launch_template: Option<String>,
    pub instance_type: String,
    /// Availability zone (`us-east-1a`); EC2 picks one when empty.
    pub zone: Option<String>,
    /// A spot instance (one-time, terminated on interruption).
    pub spot: bool,
    /// Highest spot price in $/h [default: the on-demand price].
    pub max_price: Option<f64>,
    /// User-data as plain text (sent base64-encoded; never logged).
    pub user_data: String,
    pub key_name: Option<String>,
    pub security_group_ids: Vec<String>,
    pub tags: Vec<(String, String)>,
    /// Idempotency token (at most 64 ASCII characters) [default: a random one]: a retried
    /// request with the same token starts no second instance.
    pub client_token: Option<String>,
}

impl std::fmt::Debug for RunRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunRequest")
            .field("image_id", &self.image_id)
            .field("launch_template", &self.launch_template)
            .field("instance_type", &self.instance_type)
            .field("zone", &self.zone)
            .field("spot", &self.spot)
            .field("max_price", &self.max_price)
            .field("user_data", &format!("<{} bytes>", self.user_data.len()))
            .field("key_name", &self.key_name)
            .field("security_group_ids", &self.security_group_ids)
            .field("tags", &self.tags)
            .finish()
    }
}

/// An instance as DescribeInstances reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceView {
    pub id: String,
    /// `pending`, `running`, `shutting-down`, `terminated`, `stopping`, `stopped`.
    pub state: String,
    /// Why it changed state, when EC2 says (`Server.SpotInstanceTermination: ...`).
    pub state_reason: Option<String>,
    pub instance_type: String,
    pub image_id: Option<String>,
    pub zone: Option<String>,
    pub private_ip: Option<String>,
    pub public_ip: Option<String>,
    pub spot: bool,
    pub tags: Vec<(String, String)>,
}

impl InstanceView {
    /// The value of tag `key`.
    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the instance is ending or ended (it will not run work again).
    pub fn is_gone(&self) -> bool {
        matches!(
            self.state.as_str(),
            "shutting-down" | "terminated" | "stopping" | "stopped"
        )
    }
}

fn tags_of(tags: &[Tag]) -> Vec<(String, String)> {
    tags.iter()
        .map(|t| {
            (
                t.key().unwrap_or_default().to_string(),
                t.value().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn view(i: &aws_sdk_ec2::types::Instance) -> InstanceView {
    InstanceView {
        id: i.instance_id().unwrap_or_default().to_string(),
        state: i
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_string())
            .unwrap_or_else(|| "unknown".into()),
        state_reason: i
            .state_reason()
            .and_then(|r| r.message())
            .map(str::to_string)
            .or_else(|| i.state_transition_reason().map(str::to_string))
            .filter(|r| !r.is_empty()),
        instance_type: i
            .instance_type()
            .map(|t| t.as_str().to_string())
            .unwrap_or_default(),
        image_id: i.image_id().map(str::to_string),
        zone: i
            .placement()
            .and_then(|p| p.availability_zone())
            .map(str::to_string),
        private_ip: i.private_ip_address().map(str::to_string),
        public_ip: i.public_ip_address().map(str::to_string),
        spot: i.instance_lifecycle().is_some_and(|l| l.as_str() == "spot"),
        tags: tags_of(i.tags()),
    }
}

/// A launch template reference: `lt-...` is an id, anything else a name.
fn template_spec(lt: &str) -> LaunchTemplateSpecification {
    let b = LaunchTemplateSpecification::builder().version("$Default");
    if lt.starts_with("lt-") {
        b.launch_template_id(lt).build()
    } else {
        b.launch_template_name(lt).build()
    }
}

fn ec2_tags(tags: &[(String, String)]) -> Vec<Tag> {
    tags.iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

/// A random token for idempotent requests.
fn random_token() -> String {
    cedana_protocol::random_hex(16).unwrap_or_else(|_| {
        format!(
            "{:x}{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        )
    })
}

/// `RunInstances` for one instance: its id. Capacity errors are [`AwsError::Capacity`].
pub async fn run_instance(client: &Client, req: &RunRequest) -> Result<String, AwsError> {
    const CALL: &str = "RunInstances";
    let region = region_of(client);
    if req.image_id.is_none() && req.launch_template.is_none() {
        return Err(AwsError::Invalid(format!(
            "EC2 {CALL} in {region}: neither an image nor a launch template to boot from; set aws.launch_template (or aws.image_id) in the config"
        )));
    }
    if req.instance_type.trim().is_empty() {
        return Err(AwsError::Invalid(format!(
            "EC2 {CALL} in {region}: no instance type"
        )));
    }
    let token = req.client_token.clone().unwrap_or_else(random_token);
    if token.len() > 64 || !token.is_ascii() {
        return Err(AwsError::Invalid(format!(
            "EC2 {CALL}: client token {token:?} is not at most 64 ASCII characters"
        )));
    }
    let mut b = client
        .run_instances()
        .min_count(1)
        .max_count(1)
        .instance_type(InstanceType::from(req.instance_type.as_str()))
        .client_token(token)
        .metadata_options(
            InstanceMetadataOptionsRequest::builder()
                .http_endpoint(InstanceMetadataEndpointState::Enabled)
                .http_tokens(HttpTokensState::Required)
                .build(),
        );
    if let Some(image) = &req.image_id {
        b = b.image_id(image);
    }
    if let Some(lt) = &req.launch_template {
        b = b.launch_template(template_spec(lt));
    }
    if let Some(zone) = &req.zone {
        b = b.placement(Placement::builder().availability_zone(zone).build());
    }
    if req.spot {
        let mut spot = SpotMarketOptions::builder()
            .spot_instance_type(SpotInstanceType::OneTime)
            .instance_interruption_behavior(InstanceInterruptionBehavior::Terminate);
        if let Some(p) = req.max_price {
            if !(p.is_finite() && p > 0.0) {
                return Err(AwsError::Invalid(format!(
                    "EC2 {CALL}: spot max price {p} is not a price above zero"
                )));
            }
            spot = spot.max_price(format!("{p}"));
        }
        b = b.instance_market_options(
            InstanceMarketOptionsRequest::builder()
                .market_type(MarketType::Spot)
                .spot_options(spot.build())
                .build(),
        );
    }
    if !req.user_data.is_empty() {
        b = b.user_data(base64_encode(req.user_data.as_bytes()));
    }
    if let Some(k) = &req.key_name {
        b = b.key_name(k);
    }
    for sg in &req.security_group_ids {
        b = b.security_group_ids(sg);
    }
    if !req.tags.is_empty() {
        b = b.tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Instance)
                .set_tags(Some(ec2_tags(&req.tags)))
                .build(),
        );
    }
    tracing::debug!(%region, instance_type = %req.instance_type, zone = ?req.zone, spot = req.spot, "EC2 RunInstances");
    let out = b.send().await.map_err(|e| sdk_error(CALL, &region, e))?;
    let id = out
        .instances()
        .first()
        .and_then(|i| i.instance_id())
        .ok_or_else(|| AwsError::Unexpected {
            call: CALL,
            region: region.clone(),
            message: "no instance in the answer".into(),
        })?;
    tracing::info!(%region, instance = id, instance_type = %req.instance_type, spot = req.spot, "EC2 instance launched");
    Ok(id.to_string())
}

/// `DescribeInstances` of one instance; `None` when EC2 does not know it (any more, or yet:
/// EC2 is eventually consistent just after a launch).
pub async fn describe_instance(
    client: &Client,
    id: &str,
) -> Result<Option<InstanceView>, AwsError> {
    const CALL: &str = "DescribeInstances";
    let region = region_of(client);
    match client.describe_instances().instance_ids(id).send().await {
        Ok(out) => Ok(out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find(|i| i.instance_id() == Some(id))
            .map(view)),
        Err(e) => match sdk_error(CALL, &region, e) {
            AwsError::Api { code, .. } if code == "InvalidInstanceID.NotFound" => Ok(None),
            other => Err(other),
        },
    }
}

/// `DescribeInstances` of the instances with tag `key` = `value` (all pages).
pub async fn instances_tagged(
    client: &Client,
    key: &str,
    value: &str,
) -> Result<Vec<InstanceView>, AwsError> {
    const CALL: &str = "DescribeInstances";
    let region = region_of(client);
    let mut pages = client
        .describe_instances()
        .filters(
            Filter::builder()
                .name(format!("tag:{key}"))
                .values(value)
                .build(),
        )
        .into_paginator()
        .send();
    let mut out = Vec::new();
    let mut n = 0;
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| sdk_error(CALL, &region, e))?;
        out.extend(
            page.reservations()
                .iter()
                .flat_map(|r| r.instances())
                .map(view),
        );
        n += 1;
        if n > MAX_PAGES {
            return Err(AwsError::Unexpected {
                call: CALL,
                region,
                message: format!("more than {MAX_PAGES} pages"),
            });
        }
    }
    Ok(out)
}

/// Waits until `id` runs (polling every 2 s, at most `timeout`). An instance that ends first
/// is [`AwsError::Ended`] with EC2's reason.
pub async fn wait_running(
    client: &Client,
    id: &str,
    timeout: Duration,
) -> Result<InstanceView, AwsError> {
    let region = region_of(client);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut state = "unknown (not yet visible)".to_string();
    loop {
        if let Some(v) = describe_instance(client, id).await? {
            if v.state == InstanceStateName::Running.as_str() {
                return Ok(v);
            }
            if v.is_gone() {
                return Err(AwsError::Ended {
                    what: "instance",
                    id: id.into(),
                    region,
                    state: v.state.clone(),
                    reason: v
                        .state_reason
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default(),
                });
            }
            state = v.state;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(AwsError::Timeout {
                what: "instance",
                id: id.into(),
                region,
                state,
                secs: timeout.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_secs(2).min(timeout)).await;
    }
}

/// `TerminateInstances` of one instance; an instance EC2 no longer knows counts as done.
pub async fn terminate(client: &Client, id: &str) -> Result<(), AwsError> {
    const CALL: &str = "TerminateInstances";
    let region = region_of(client);
    match client.terminate_instances().instance_ids(id).send().await {
        Ok(_) => {
            tracing::info!(%region, instance = id, "EC2 instance terminated");
            Ok(())
        }
        Err(e) => match sdk_error(CALL, &region, e) {
            AwsError::Api { code, .. } if code == "InvalidInstanceID.NotFound" => Ok(()),
            other => Err(other),
        },
    }
}

/// The user-data of an instance (`DescribeInstanceAttribute userData`), decoded; empty when
/// it has none.
pub async fn instance_user_data(client: &Client, id: &str) -> Result<String, AwsError> {
    const CALL: &str = "DescribeInstanceAttribute";
    let region = region_of(client);
    let out = client
        .describe_instance_attribute()
        .instance_id(id)
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
        .send()
        .await
        .map_err(|e| sdk_error(CALL, &region, e))?;
    let Some(b64) = out.user_data().and_then(|u| u.value()) else {
        return Ok(String::new());
    };
    let raw = base64_decode(b64).ok_or_else(|| AwsError::Unexpected {
        call: CALL,
        region: region.clone(),
        message: "userData is not base64".into(),
    })?;
    String::from_utf8(raw).map_err(|_| AwsError::Unexpected {
        call: CALL,
        region,
        message: "userData is not UTF-8 text".into(),
    })
}

// ---------------------------------------------------------------------------------------------
// Bootstrap: key pair, security group, launch template
// ---------------------------------------------------------------------------------------------

/// What [`ensure_key_pair`] did.
#[derive(Clone, Debug, PartialEq)]
pub enum KeyPairOutcome {
    /// Made now; its private key was written to `path` (mode 0600).
    Created {
        name: String,
        key_pair_id: String,
        fingerprint: String,
        path: PathBuf,
    },
    /// It existed already. `path` is the private key file when it is there (EC2 cannot give the
    /// private key again: without the file, SSH needs another key).
    Existing {
        name: String,
        key_pair_id: String,
        fingerprint: String,
        path: Option<PathBuf>,
    },
}

/// Makes key pair `name` when EC2 has none by that name and writes its private key to
/// `save_to` (a new file, mode 0600; parent folders are made 0700). An existing file is never
/// replaced: when the key pair is missing but `save_to` exists, nothing is done and the error
/// says so. The private key is never logged.
pub async fn ensure_key_pair(
    client: &Client,
    name: &str,
    save_to: &Path,
) -> Result<KeyPairOutcome, AwsError> {
    let region = region_of(client);
    let found = client.describe_key_pairs().key_names(name).send().await;
    match found {
        Ok(out) => {
            if let Some(k) = out.key_pairs().iter().find(|k| k.key_name() == Some(name)) {
                return Ok(KeyPairOutcome::Existing {
                    name: name.into(),
                    key_pair_id: k.key_pair_id().unwrap_or_default().into(),
                    fingerprint: k.key_fingerprint().unwrap_or_default().into(),
                    path: save_to.exists().then(|| save_to.to_path_buf()),
                });
            }
        }
        Err(e) => match sdk_error("DescribeKeyPairs", &region, e) {
            AwsError::Api { code, .. } if code == "InvalidKeyPair.NotFound" => {}
            other => return Err(other),
        },
    }
    if save_to.exists() {
        return Err(AwsError::KeyPair {
            name: name.into(),
            region,
            message: format!(
                "EC2 has no key pair by this name but {} exists; it is not replaced. Import its public key (aws ec2 import-key-pair), or choose another key name or path",
                save_to.display()
            ),
        });
    }
    if let Some(dir) = save_to.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(AwsError::io("cannot create", dir))?;
    }
    let out = client
        .create_key_pair()
        .key_name(name)
        .key_type(KeyType::Rsa)
        .key_format(KeyFormat::Pem)
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::KeyPair)
                .tags(Tag::builder().key("cedana:managed").value("true").build())
                .build(),
        )
        .send()
        .await
        .map_err(|e| sdk_error("CreateKeyPair", &region, e))?;
    let material = Secret::new(out.key_material().unwrap_or_default());
    let key_pair_id = out.key_pair_id().unwrap_or_default().to_string();
    let fingerprint = out.key_fingerprint().unwrap_or_default().to_string();
    if material.is_empty() {
        return Err(AwsError::Unexpected {
            call: "CreateKeyPair",
            region,
            message: "no key material in the answer".into(),
        });
    }
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(save_to)?;
        f.write_all(material.expose().as_bytes())?;
        if !material.expose().ends_with('\n') {
            f.write_all(b"\n")?;
        }
        f.sync_all()
    })();
    if let Err(source) = written {
        // The private key exists nowhere else: the key pair goes, so a retry can make it again.
        let _ = std::fs::remove_file(save_to);
        if let Err(e) = client.delete_key_pair().key_name(name).send().await {
            tracing::warn!(key = name, %region, error = %causes(&e), "cannot delete the key pair whose private key could not be saved");
        }
        return Err(AwsError::Io {
            what: "cannot write the private key to",
            path: save_to.to_path_buf(),
            source,
        });
    }
    tracing::info!(key = name, %region, path = %save_to.display(), "EC2 key pair created; private key saved");
    Ok(KeyPairOutcome::Created {
        name: name.into(),
        key_pair_id,
        fingerprint,
        path: save_to.to_path_buf(),
    })
}

/// The id of security group `name` (in the default VPC), made when missing, allowing TCP from
/// anywhere (0.0.0.0/0) on each of `tcp_ports` (rules already there are kept).
pub async fn ensure_security_group(
    client: &Client,
    name: &str,
    description: &str,
    tcp_ports: &[u16],
) -> Result<String, AwsError> {
    let region = region_of(client);
    let out = client
        .describe_security_groups()
        .filters(Filter::builder().name("group-name").values(name).build())
        .send()
        .await
        .map_err(|e| sdk_error("DescribeSecurityGroups", &region, e))?;
    let existing = out
        .security_groups()
        .iter()
        .find(|g| g.group_name() == Some(name))
        .cloned();
    let (id, allowed): (String, Vec<u16>) = match existing {
        Some(g) => {
            let allowed = g
                .ip_permissions()
                .iter()
                .filter(|p| p.ip_protocol() == Some("tcp") || p.ip_protocol() == Some("-1"))
                .filter(|p| {
                    p.ip_ranges()
                        .iter()
                        .any(|r| r.cidr_ip() == Some("0.0.0.0/0"))
                })
                .flat_map(|p| {
                    if p.ip_protocol() == Some("-1") {
                        return tcp_ports.to_vec();
                    }
                    let (from, to) = (p.from_port().unwrap_or(0), p.to_port().unwrap_or(-1));
                    tcp_ports
                        .iter()
                        .copied()
                        .filter(|port| i32::from(*port) >= from && i32::from(*port) <= to)
                        .collect()
                })
                .collect();
            (g.group_id().unwrap_or_default().to_string(), allowed)
        }
        None => {
            let made = client
                .create_security_group()
                .group_name(name)
                .description(description)
                .tag_specifications(
                    TagSpecification::builder()
                        .resource_type(ResourceType::SecurityGroup)
                        .tags(Tag::builder().key("cedana:managed").value("true").build())
                        .build(),
                )
                .send()
                .await
                .map_err(|e| sdk_error("CreateSecurityGroup", &region, e))?;
            let id = made.group_id().ok_or_else(|| AwsError::Unexpected {
                call: "CreateSecurityGroup",
                region: region.clone(),
                message: "no group id in the answer".into(),
            })?;
            tracing::info!(group = name, id, %region, "EC2 security group created");
            (id.to_string(), Vec::new())
        }
    };
    let missing: Vec<u16> = tcp_ports
        .iter()
        .copied()
        .filter(|p| !allowed.contains(p))
        .collect();
    if !missing.is_empty() {
        let perms: Vec<IpPermission> = missing
            .iter()
            .map(|p| {
                IpPermission::builder()
                    .ip_protocol("tcp")
                    .from_port(i32::from(*p))
                    .to_port(i32::from(*p))
                    .ip_ranges(
                        IpRange::builder()
                            .cidr_ip("0.0.0.0/0")
                            .description("cedana")
                            .build(),
                    )
                    .build()
            })
            .collect();
        match client
            .authorize_security_group_ingress()
            .group_id(&id)
            .set_ip_permissions(Some(perms))
            .send()
            .await
        {
            Ok(_) => {}
            Err(e) => match sdk_error("AuthorizeSecurityGroupIngress", &region, e) {
                AwsError::Api { code, .. } if code == "InvalidPermission.Duplicate" => {}
                other => return Err(other),
            },
        }
    }
    Ok(id)
}

/// What a launch template holds.
#[derive(Clone, Default)]
pub struct TemplateRequest {
    pub name: String,
    pub image_id: String,
    pub instance_type: Option<String>,
    pub key_name: Option<String>,
    pub security_group_ids: Vec<String>,
    /// Plain text (sent base64-encoded; never logged).
    pub user_data: String,
}

impl std::fmt::Debug for TemplateRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TemplateRequest")
            .field("name", &self.name)
            .field("image_id", &self.image_id)
            .field("instance_type", &self.instance_type)
            .field("key_name", &self.key_name)
            .field("security_group_ids", &self.security_group_ids)
            .field("user_data", &format!("<{} bytes>", self.user_data.len()))
            .finish()
    }
}

/// A launch template's id and default version, when it exists.
pub async fn find_launch_template(
    client: &Client,
    name_or_id: &str,
) -> Result<Option<(String, i64)>, AwsError> {
    const CALL: &str = "DescribeLaunchTemplates";
    let region = region_of(client);
    let b = client.describe_launch_templates();
    let b = if name_or_id.starts_with("lt-") {
        b.launch_template_ids(name_or_id)
    } else {
        b.launch_template_names(name_or_id)
    };
    match b.send().await {
        Ok(out) => Ok(out.launch_templates().first().map(|t| {
            (
                t.launch_template_id().unwrap_or_default().to_string(),
                t.default_version_number().unwrap_or(1),
            )
        })),
        Err(e) => match sdk_error(CALL, &region, e) {
            AwsError::Api { code, .. }
                if code.starts_with("InvalidLaunchTemplateName.NotFound")
                    || code.starts_with("InvalidLaunchTemplateId.NotFound")
                    || code == "InvalidLaunchTemplateId.Malformed" =>
            {
                Ok(None)
            }
            other => Err(other),
        },
    }
}

/// The AMI of a launch template's default version, if it names one.
pub async fn launch_template_image(
    client: &Client,
    template_id: &str,
) -> Result<Option<String>, AwsError> {
    const CALL: &str = "DescribeLaunchTemplateVersions";
    let region = region_of(client);
    let out = client
        .describe_launch_template_versions()
        .launch_template_id(template_id)
        .versions("$Default")
        .send()
        .await
        .map_err(|e| sdk_error(CALL, &region, e))?;
    Ok(out
        .launch_template_versions()
        .first()
        .and_then(|v| v.launch_template_data())
        .and_then(|d| d.image_id())
        .map(str::to_string))
}

/// Makes launch template `req.name`, or, when it exists, adds a version made of `req` and
/// makes it the default. Its id.
pub async fn ensure_launch_template(
    client: &Client,
    req: &TemplateRequest,
) -> Result<String, AwsError> {
    let region = region_of(client);
    if req.name.trim().is_empty() || req.image_id.trim().is_empty() {
        return Err(AwsError::Invalid(format!(
            "launch template in {region}: a name and an image id are needed"
        )));
    }
    let mut data = RequestLaunchTemplateData::builder()
        .image_id(&req.image_id)
        .metadata_options(
            LaunchTemplateInstanceMetadataOptionsRequest::builder()
                .http_tokens(LaunchTemplateHttpTokensState::Required)
                .build(),
        )
        .tag_specifications(
            LaunchTemplateTagSpecificationRequest::builder()
                .resource_type(ResourceType::Instance)
                .tags(Tag::builder().key("cedana:managed").value("true").build())
                .build(),
        );
    if let Some(t) = &req.instance_type {
        data = data.instance_type(InstanceType::from(t.as_str()));
    }
    if let Some(k) = &req.key_name {
        data = data.key_name(k);
    }
    for sg in &req.security_group_ids {
        data = data.security_group_ids(sg);
    }
    if !req.user_data.is_empty() {
        data = data.user_data(base64_encode(req.user_data.as_bytes()));
    }
    let data = data.build();
    match find_launch_template(client, &req.name).await? {
        None => {
            let out = client
                .create_launch_template()
                .launch_template_name(&req.name)
                .version_description("cedana-driver")
                .launch_template_data(data)
                .client_token(random_token())
                .send()
                .await
                .map_err(|e| sdk_error("CreateLaunchTemplate", &region, e))?;
            let id = out
                .launch_template()
                .and_then(|t| t.launch_template_id())
                .ok_or_else(|| AwsError::Unexpected {
                    call: "CreateLaunchTemplate",
                    region: region.clone(),
                    message: "no launch template id in the answer".into(),
                })?;
            tracing::info!(template = %req.name, id, %region, "EC2 launch template created");
            Ok(id.to_string())
        }
        Some((id, _)) => {
            let out = client
                .create_launch_template_version()
                .launch_template_id(&id)
                .version_description("cedana-driver")
                .launch_template_data(data)
                .client_token(random_token())
                .send()
                .await
                .map_err(|e| sdk_error("CreateLaunchTemplateVersion", &region, e))?;
            let version = out
                .launch_template_version()
                .and_then(|v| v.version_number())
                .ok_or_else(|| AwsError::Unexpected {
                    call: "CreateLaunchTemplateVersion",
                    region: region.clone(),
                    message: "no version number in the answer".into(),
                })?;
            client
                .modify_launch_template()
                .launch_template_id(&id)
                .default_version(version.to_string())
                .send()
                .await
                .map_err(|e| sdk_error("ModifyLaunchTemplate", &region, e))?;
            tracing::info!(template = %req.name, id, version, %region, "EC2 launch template: new default version");
            Ok(id)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------------------------

/// An AMI as DescribeImages reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageView {
    pub id: String,
    pub name: Option<String>,
    /// `pending`, `available`, `failed`, ...
    pub state: String,
    pub state_reason: Option<String>,
    /// `x86_64`, `arm64`, ...
    pub architecture: Option<String>,
}

/// `DescribeImages` of one AMI; `None` when this region has no such image.
pub async fn describe_image(client: &Client, id: &str) -> Result<Option<ImageView>, AwsError> {
    const CALL: &str = "DescribeImages";
    let region = region_of(client);
    match client.describe_images().image_ids(id).send().await {
        Ok(out) => Ok(out
            .images()
            .iter()
            .find(|i| i.image_id() == Some(id))
            .map(|i| ImageView {
                id: id.to_string(),
                name: i.name().map(str::to_string),
                state: i
                    .state()
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_else(|| "unknown".into()),
                state_reason: i
                    .state_reason()
                    .and_then(|r| r.message())
                    .map(str::to_string),
                architecture: i
                    .architecture()
                    .map(ArchitectureValues::as_str)
                    .map(str::to_string),
            })),
        Err(e) => match sdk_error(CALL, &region, e) {
            AwsError::Api { code, .. }
                if code == "InvalidAMIID.NotFound"
                    || code == "InvalidAMIID.Unavailable"
                    || code == "InvalidAMIID.Malformed" =>
            {
                Ok(None)
            }
            other => Err(other),
        },
    }
}

/// `CreateImage` of an instance: the new AMI's id (it becomes usable later; see
/// [`wait_image_available`]).
pub async fn create_image(
    client: &Client,
    instance_id: &str,
    name: &str,
    description: &str,
) -> Result<String, AwsError> {
    const CALL: &str = "CreateImage";
    let region = region_of(client);
    let out = client
        .create_image()
        .instance_id(instance_id)
        .name(name)
        .description(description)
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Image)
                .tags(Tag::builder().key("cedana:managed").value("true").build())
                .build(),
        )
        .send()
        .await
        .map_err(|e| sdk_error(CALL, &region, e))?;
    let id = out.image_id().ok_or_else(|| AwsError::Unexpected {
        call: CALL,
        region: region.clone(),
        message: "no image id in the answer".into(),
    })?;
    tracing::info!(image = id, instance = instance_id, %region, "EC2 image requested");
    Ok(id.to_string())
}

/// Waits (polling every 5 s, at most `timeout`) until AMI `id` is available. A failed image
/// is [`AwsError::Ended`] with EC2's reason.
pub async fn wait_image_available(
    client: &Client,
    id: &str,
    timeout: Duration,
) -> Result<ImageView, AwsError> {
    let region = region_of(client);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut state = "unknown (not yet visible)".to_string();
    loop {
        if let Some(img) = describe_image(client, id).await? {
            if img.state == ImageState::Available.as_str() {
                return Ok(img);
            }
            if matches!(
                img.state.as_str(),
                "failed" | "error" | "invalid" | "deregistered"
            ) {
                return Err(AwsError::Ended {
                    what: "image",
                    id: id.into(),
                    region,
                    state: img.state.clone(),
                    reason: img
                        .state_reason
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default(),
                });
            }
            state = img.state;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(AwsError::Timeout {
                what: "image",
                id: id.into(),
                region,
                state,
                secs: timeout.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_secs(5).min(timeout)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Base64 (user-data)
// ---------------------------------------------------------------------------------------------

/// Standard base64; decoding takes it with or without padding, and lenient trailing bits.
const B64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// Standard base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    use base64::Engine;
    B64.encode(data)
}

/// Decodes standard base64 (padding optional, whitespace ignored); `None` when it is not.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    B64.decode(compact).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
            ("#!/bin/sh\n", "IyEvYmluL3NoCg=="),
        ] {
            assert_eq!(base64_encode(plain.as_bytes()), enc);
            assert_eq!(base64_decode(enc).unwrap(), plain.as_bytes());
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(base64_decode(&base64_encode(&all)).unwrap(), all);
        assert_eq!(base64_decode("Zm9v\nYmFy\n").unwrap(), b"foobar");
        assert!(base64_decode("Zm9v!").is_none());
        assert!(base64_decode("Zg==Zg").is_none());
    }

    #[test]
    fn error_codes_are_told_apart() {
        for code in [
            "InsufficientInstanceCapacity",
            "SpotMaxPriceTooLow",
            "MaxSpotInstanceCountExceeded",
            "InstanceLimitExceeded",
            "Unsupported",
        ] {
            let e = AwsError::from_code("RunInstances", "us-east-1", code, "m");
            assert!(e.is_capacity(), "{code}");
            assert_eq!(e.code(), Some(code));
            let text = e.to_string();
            assert!(
                text.contains("RunInstances") && text.contains("us-east-1"),
                "{text}"
            );
        }
        let auth = AwsError::from_code(
            "DescribeInstances",
            "eu-west-1",
            "UnauthorizedOperation",
            "no",
        );
        assert!(matches!(auth, AwsError::Auth { .. }));
        assert!(auth.to_string().contains("ec2:DescribeInstances"), "{auth}");
        let t = AwsError::from_code(
            "DescribeSpotPriceHistory",
            "us-east-1",
            "RequestLimitExceeded",
            "x",
        );
        assert!(matches!(t, AwsError::Throttled { .. }) && !t.is_capacity());
        let other = AwsError::from_code("RunInstances", "us-east-1", "InvalidAMIID.NotFound", "x");
        assert!(matches!(other, AwsError::Api { .. }) && !other.is_capacity());
    }

    #[test]
    fn run_requests_do_not_show_user_data() {
        let r = RunRequest {
            user_data: "printf '%s' 'secret-token'".into(),
            ..Default::default()
        };
        assert!(!format!("{r:?}").contains("secret-token"));
        let t = TemplateRequest {
            user_data: "secret-token".into(),
            ..Default::default()
        };
        assert!(!format!("{t:?}").contains("secret-token"));
    }
}
