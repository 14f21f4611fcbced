//! The `paperspace` provider: workers are Paperspace machines, made through Paperspace's public
//! REST API (<https://api.paperspace.com/v1>, reference at
//! <https://docs.digitalocean.com/reference/paperspace/api-reference/>).
//!
//! What is called: `GET /machine-availability` (is a type free in a region now),
//! `GET /custom-templates` and `GET /os-templates` (find the template a worker boots from),
//! `POST /startup-scripts` (the script that starts `cedana-agent daemon` on first boot),
//! `POST /machines` (with `startupScriptId`), `GET /machines/{id}` and
//! `GET /machine-events/{id}` (is it still there), `DELETE /machines/{id}` and
//! `DELETE /startup-scripts/{id}` (terminate). Every request carries
//! `Authorization: Bearer <api key>`; lists are followed page by page (`hasMore`, `nextPage`,
//! `?after=`); errors are read as the reference's `{code, message}`; HTTP 429 is retried after
//! the `Retry-After` the server asks for, a bounded number of times.
//!
//! Paperspace publishes no price API, so offers come from the price catalog
//! ([`crate::providers::catalog`]) for the enabled regions, less the types the API says are not available
//! right now. The API key never reaches logs or error messages; the job's NATS token is sent
//! only inside the startup script's body.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cedana_protocol::config::{PaperspaceConfig, Secret};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::providers::catalog::Catalog;
use crate::providers::Spec;
use crate::providers::{loopback_only, Bootstrap, Instance, Offer, Provider, ProviderError};

/// The public API.
pub const DEFAULT_URL: &str = "https://api.paperspace.com/v1";
/// Environment variable with another base URL (a test server).
pub const URL_ENV: &str = "CEDANA_PAPERSPACE_URL";
/// Environment variable with the template workers boot from (ID or name).
pub const TEMPLATE_ENV: &str = "CEDANA_PAPERSPACE_TEMPLATE";
/// Environment variable with the disk size of new machines in GB.
pub const DISK_ENV: &str = "CEDANA_PAPERSPACE_DISK_GB";
/// Environment variable with the agent's command on the machines.
pub const AGENT_ENV: &str = "CEDANA_PAPERSPACE_AGENT";

const NAME: &str = "paperspace";
/// Disk sizes Paperspace offers, in GB.
const DISK_SIZES: [u32; 8] = [50, 100, 250, 500, 1000, 2000, 5000, 10000];
/// Lists longer than this many pages are refused rather than followed forever.
const MAX_PAGES: usize = 1000;

/// Paperspace's regions: the console's name (what the original's config holds in
/// `paperspace.enabled_regions`) and the API's name.
pub const REGIONS: [(&str, &str); 3] = [
    ("East Coast (NY2)", "ny2"),
    ("West Coast (CA1)", "ca1"),
    ("Europe (AMS1)", "ams1"),
];

/// The API's name of a region given either way (`East Coast (NY2)`, `NY2`, `ny2`).
pub fn api_region(name: &str) -> Option<&'static str> {
    let n = name.trim();
    REGIONS
        .iter()
        .find(|(long, short)| n.eq_ignore_ascii_case(long) || n.eq_ignore_ascii_case(short))
        .map(|(_, short)| *short)
}

// ---------------------------------------------------------------------------------------------
// The API client
// ---------------------------------------------------------------------------------------------

/// Errors of the Paperspace API. None of them holds the API key.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The API answered with an error (`{code, message}`).
    #[error("paperspace API {method} {path}: HTTP {status} {code}: {message}")]
    Status {
        method: String,
        path: String,
        status: u16,
        code: String,
        message: String,
    },
    #[error("paperspace API {method} {path}: {message}")]
    Transport {
        method: String,
        path: String,
        message: String,
    },
    #[error("paperspace API {method} {path}: answer not understood: {message}")]
    Decode {
        method: String,
        path: String,
        message: String,
    },
    #[error("paperspace API {method} {path}: still rate limited (HTTP 429) after {attempts} attempts; try again later")]
    RateLimited {
        method: String,
        path: String,
        attempts: u32,
    },
    #[error("paperspace API GET {path}: the list did not end ({why})")]
    Paging { path: String, why: String },
}

impl ApiError {
    /// HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            ApiError::RateLimited { .. } => Some(429),
            _ => None,
        }
    }

    /// The key was refused.
    pub fn is_auth(&self) -> bool {
        matches!(self.status(), Some(401 | 403))
    }

    /// No such resource.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// The machine type cannot be had now. The reference lists no error code for this, so it
    /// is read from the message (the old Core API said creation fails on "machine
    /// availability"); `GET /machine-availability` is asked first anyway.
    pub fn is_capacity(&self) -> bool {
        let ApiError::Status { code, message, .. } = self else {
            return false;
        };
        let text = format!("{code} {message}").to_lowercase();
        [
            "capacity",
            "no availability",
            "not available",
            "unavailable",
            "out of stock",
            "insufficient",
            "sold out",
        ]
        .iter()
        .any(|p| text.contains(p))
    }
}

/// How often and how long to wait on HTTP 429 (and, for reads and deletes, on 502/503/504 and
/// broken connections).
#[derive(Clone, Copy, Debug)]
pub struct Retry {
    /// Requests in all, the first included.
    pub attempts: u32,
    /// Wait when the server names none; doubled each time.
    pub first_wait: Duration,
    /// No wait is longer than this, whatever `Retry-After` says.
    pub max_wait: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 5,
            first_wait: Duration::from_secs(1),
            max_wait: Duration::from_secs(30),
        }
    }
}

/// A machine as the API describes it (the fields the driver reads).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Machine {
    pub id: String,
    #[serde(default)]
    pub name: String,
    /// `off`, `starting`, `stopping`, `restarting`, `serviceready`, `ready`, `upgrading`,
    /// `provisioning`.
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub machine_type: String,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub public_ip: Option<String>,
    #[serde(default)]
    pub private_ip: Option<String>,
    #[serde(default)]
    pub dt_deleted: Option<serde_json::Value>,
}

impl Machine {
    /// Whether the API says it was deleted.
    pub fn deleted(&self) -> bool {
        match &self.dt_deleted {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Object(o)) => !o.is_empty(),
            Some(serde_json::Value::String(s)) => !s.is_empty(),
            Some(_) => true,
        }
    }
}

/// An asynchronous operation on a machine.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MachineEvent {
    pub id: String,
    #[serde(default)]
    pub name: String,
    /// `new`, `in progress`, `done`, `error`, `cancelled`.
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub error: Option<String>,
}

/// A machine type a template can run on.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateMachineType {
    pub machine_type_label: String,
    #[serde(default)]
    pub is_available: bool,
}

/// An OS or custom template.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Template {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub operating_system_label: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub default_size_gb: Option<f64>,
    #[serde(default)]
    pub available_machine_types: Vec<TemplateMachineType>,
}

impl Template {
    /// Whether machines of `machine_type` can be made from it (when it says).
    pub fn allows(&self, machine_type: &str) -> bool {
        self.available_machine_types.is_empty()
            || self
                .available_machine_types
                .iter()
                .any(|t| t.is_available && t.machine_type_label.eq_ignore_ascii_case(machine_type))
    }
}

/// A startup script (the API does not send the script text back).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StartupScript {
    pub id: String,
    #[serde(default)]
    pub name: String,
}

/// `POST /machines`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateMachine {
    pub name: String,
    pub machine_type: String,
    pub template_id: String,
    pub disk_size: u32,
    pub region: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub startup_script_id: Option<String>,
    pub public_ip_type: String,
    pub start_on_create: bool,
    pub email_password: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Page<T> {
    #[serde(default)]
    has_more: bool,
    #[serde(default)]
    next_page: Option<String>,
    items: Vec<T>,
}

/// The answer to machine operations: the machine and the event to follow.
#[derive(Deserialize)]
struct WithEvent<T> {
    data: T,
    #[serde(default)]
    event: Option<MachineEvent>,
}

#[derive(Deserialize)]
struct Availability {
    available: bool,
}

/// A client of Paperspace's public API. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    key: Secret,
    retry: Retry,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("key", &self.key)
            .finish()
    }
}

/// Percent-encodes one path segment (ids come from the API, but are not trusted).
fn seg(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A `Retry-After` value: seconds, or an HTTP date.
fn retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    // IMF-fixdate: "Sun, 06 Nov 1994 08:49:37 GMT".
    let parts: Vec<&str> = v.split_whitespace().collect();
    if parts.len() != 6 || parts[5] != "GMT" {
        return None;
    }
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| *m == parts[2])? + 1;
    let at = crate::providers::catalog::parse_rfc3339(&format!(
        "{}-{month:02}-{:0>2}T{}Z",
        parts[3], parts[1], parts[4]
    ))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    Some(Duration::from_secs(at.saturating_sub(now)))
}

/// The whole chain of an error's causes, without the URL.
fn transport_message(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

impl Client {
    /// A client of the API at `base_url` (`https://api.paperspace.com/v1`) with `key`.
    pub fn new(base_url: &str, key: Secret, retry: Retry) -> Result<Self, ApiError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .user_agent(concat!("cedana-driver/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ApiError::Transport {
                method: "-".into(),
                path: "-".into(),
                message: transport_message(e),
            })?;
        Ok(Client {
            http,
            base: base_url.trim_end_matches('/').to_string(),
            key,
            retry,
        })
    }

    /// The base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The error of a non-2xx answer: the reference's `{code, message}` when the body has it.
    fn status_error(
        &self,
        method: &Method,
        path: &str,
        status: StatusCode,
        body: &str,
    ) -> ApiError {
        let parsed: Option<serde_json::Value> = serde_json::from_str(body).ok();
        let field = |k: &str| {
            parsed
                .as_ref()
                .and_then(|v| v.get(k))
                .and_then(|v| v.as_str())
                .map(str::to_string)
        };
        let code = field("code").unwrap_or_else(|| {
            status
                .canonical_reason()
                .unwrap_or("ERROR")
                .to_uppercase()
                .replace(' ', "_")
        });
        let mut message = field("message").unwrap_or_else(|| {
            let t: String = body.trim().chars().take(300).collect();
            if t.is_empty() {
                "(no message)".into()
            } else {
                t
            }
        });
        // Whatever the server says, the key is not repeated.
        let key = self.key.expose();
        if key.len() >= 4 && message.contains(key) {
            message = message.replace(key, "<redacted>");
        }
        ApiError::Status {
            method: method.to_string(),
            path: path.to_string(),
            status: status.as_u16(),
            code,
            message,
        }
    }

    /// One API call, retried on HTTP 429 (and, when safe, on transient failures).
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&serde_json::Value>,
    ) -> Result<T, ApiError> {
        let url = format!("{}{path}", self.base);
        let idempotent = method == Method::GET || method == Method::DELETE;
        let attempts = self.retry.attempts.max(1);
        let mut wait = self.retry.first_wait;
        for attempt in 1..=attempts {
            let last = attempt == attempts;
            let mut req = self
                .http
                .request(method.clone(), &url)
                .bearer_auth(self.key.expose())
                .header(reqwest::header::ACCEPT, "application/json");
            if !query.is_empty() {
                req = req.query(query);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            tracing::debug!(%method, path, attempt, "paperspace request");
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) if idempotent && !last => {
                    tracing::debug!(%method, path, error = %transport_message(e), "paperspace request failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(self.retry.max_wait);
                    continue;
                }
                Err(e) => {
                    return Err(ApiError::Transport {
                        method: method.to_string(),
                        path: path.to_string(),
                        message: transport_message(e),
                    })
                }
            };
            let status = resp.status();
            if status == StatusCode::TOO_MANY_REQUESTS {
                if last {
                    break;
                }
                let asked = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(retry_after);
                let pause = asked.unwrap_or(wait).min(self.retry.max_wait);
                tracing::info!(%method, path, wait_secs = pause.as_secs_f64(), "paperspace rate limit (HTTP 429); waiting as asked");
                tokio::time::sleep(pause).await;
                wait = (wait * 2).min(self.retry.max_wait);
                continue;
            }
            if idempotent && !last && matches!(status.as_u16(), 502..=504) {
                tracing::debug!(%method, path, status = status.as_u16(), "paperspace unavailable; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(self.retry.max_wait);
                continue;
            }
            let text = resp.text().await.map_err(|e| ApiError::Transport {
                method: method.to_string(),
                path: path.to_string(),
                message: transport_message(e),
            })?;
            if !status.is_success() {
                return Err(self.status_error(&method, path, status, &text));
            }
            return serde_json::from_str(&text).map_err(|e| ApiError::Decode {
                method: method.to_string(),
                path: path.to_string(),
                message: e.to_string(),
            });
        }
        Err(ApiError::RateLimited {
            method: method.to_string(),
            path: path.to_string(),
            attempts,
        })
    }

    /// Every item of a paginated list, page after page.
    async fn list<T: DeserializeOwned>(
        &self,
        path: &str,
        filters: &[(&str, String)],
    ) -> Result<Vec<T>, ApiError> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        let mut cursors = HashSet::new();
        for _ in 0..MAX_PAGES {
            let mut q: Vec<(&str, String)> = filters.to_vec();
            q.push(("limit", "120".into()));
            if let Some(a) = &after {
                q.push(("after", a.clone()));
            }
            let page: Page<T> = self.call(Method::GET, path, &q, None).await?;
            out.extend(page.items);
            match page.next_page.filter(|n| page.has_more && !n.is_empty()) {
                None => return Ok(out),
                Some(next) if cursors.insert(next.clone()) => after = Some(next),
                Some(next) => {
                    return Err(ApiError::Paging {
                        path: path.into(),
                        why: format!("cursor {next:?} came back twice"),
                    })
                }
            }
        }
        Err(ApiError::Paging {
            path: path.into(),
            why: format!("more than {MAX_PAGES} pages"),
        })
    }

    /// `GET /machines` with filters (`name`, `region`, `machineType`, `agentType`), all pages.
    pub async fn list_machines(
        &self,
        filters: &[(&str, String)],
    ) -> Result<Vec<Machine>, ApiError> {
        self.list("/machines", filters).await
    }

    /// `GET /machines/{id}`.
    pub async fn get_machine(&self, id: &str) -> Result<Machine, ApiError> {
        self.call(Method::GET, &format!("/machines/{}", seg(id)), &[], None)
            .await
    }

    /// `POST /machines`: the machine and the event that follows its creation.
    pub async fn create_machine(
        &self,
        req: &CreateMachine,
    ) -> Result<(Machine, Option<MachineEvent>), ApiError> {
        let body = serde_json::to_value(req).map_err(|e| ApiError::Decode {
            method: "POST".into(),
            path: "/machines".into(),
            message: e.to_string(),
        })?;
        let r: WithEvent<Machine> = self
            .call(Method::POST, "/machines", &[], Some(&body))
            .await?;
        Ok((r.data, r.event))
    }

    async fn machine_action(&self, id: &str, action: &str) -> Result<Machine, ApiError> {
        let r: WithEvent<Machine> = self
            .call(
                Method::PATCH,
                &format!("/machines/{}/{action}", seg(id)),
                &[],
                Some(&serde_json::json!({})),
            )
            .await?;
        Ok(r.data)
    }

    /// `PATCH /machines/{id}/start`.
    pub async fn start_machine(&self, id: &str) -> Result<Machine, ApiError> {
        self.machine_action(id, "start").await
    }

    /// `PATCH /machines/{id}/stop`.
    pub async fn stop_machine(&self, id: &str) -> Result<Machine, ApiError> {
        self.machine_action(id, "stop").await
    }

    /// `DELETE /machines/{id}`.
    pub async fn delete_machine(&self, id: &str) -> Result<(), ApiError> {
        let _: serde_json::Value = self
            .call(Method::DELETE, &format!("/machines/{}", seg(id)), &[], None)
            .await?;
        Ok(())
    }

    /// `GET /machine-events/{id}`.
    pub async fn get_event(&self, id: &str) -> Result<MachineEvent, ApiError> {
        self.call(
            Method::GET,
            &format!("/machine-events/{}", seg(id)),
            &[],
            None,
        )
        .await
    }

    /// `GET /machine-availability`: whether `machine_type` can be had in `region` now.
    pub async fn availability(&self, machine_type: &str, region: &str) -> Result<bool, ApiError> {
        let a: Availability = self
            .call(
                Method::GET,
                "/machine-availability",
                &[
                    ("machineType", machine_type.to_string()),
                    ("region", region.to_string()),
                ],
                None,
            )
            .await?;
        Ok(a.available)
    }

    /// `GET /os-templates`, all pages.
    pub async fn list_os_templates(&self) -> Result<Vec<Template>, ApiError> {
        self.list("/os-templates", &[]).await
    }

    /// `GET /custom-templates`, all pages.
    pub async fn list_custom_templates(&self) -> Result<Vec<Template>, ApiError> {
        self.list("/custom-templates", &[]).await
    }

    /// `POST /startup-scripts`. The script is sent and never logged.
    pub async fn create_startup_script(
        &self,
        name: &str,
        script: &str,
        run_once: bool,
    ) -> Result<StartupScript, ApiError> {
        let body = serde_json::json!({ "name": name, "script": script, "isRunOnce": run_once });
        self.call(Method::POST, "/startup-scripts", &[], Some(&body))
            .await
    }

    /// `DELETE /startup-scripts/{id}`.
    pub async fn delete_startup_script(&self, id: &str) -> Result<(), ApiError> {
        let _: serde_json::Value = self
            .call(
                Method::DELETE,
                &format!("/startup-scripts/{}", seg(id)),
                &[],
                None,
            )
            .await?;
        Ok(())
    }

    /// The custom or OS template whose ID or name is `wanted` (custom templates first).
    pub async fn find_template(&self, wanted: &str) -> Result<Option<Template>, ApiError> {
        let matches = |t: &Template| t.id == wanted || t.name == wanted;
        if let Some(t) = self
            .list_custom_templates()
            .await?
            .into_iter()
            .find(matches)
        {
            return Ok(Some(t));
        }
        Ok(self.list_os_templates().await?.into_iter().find(matches))
    }
}

// ---------------------------------------------------------------------------------------------
// The provider
// ---------------------------------------------------------------------------------------------

/// What the provider needs: the original's `paperspace` block, the environment, defaults.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The API [default: `$CEDANA_PAPERSPACE_URL`, the public API].
    pub base_url: String,
    pub api_key: Secret,
    /// API region names (`ny2`, `ca1`, `ams1`) offers are made in.
    pub regions: Vec<String>,
    /// ID or name of the template workers boot from (`$CEDANA_PAPERSPACE_TEMPLATE`): a custom
    /// template with `cedana-agent` installed.
    pub template: Option<String>,
    /// Disk size of new machines in GB, at least the template's (`$CEDANA_PAPERSPACE_DISK_GB`).
    pub disk_gb: u32,
    /// The agent's command on the machines (`$CEDANA_PAPERSPACE_AGENT`).
    pub agent: String,
    /// How often a worker's machine is looked at.
    pub poll_every: Duration,
    pub retry: Retry,
    /// Ask `GET /machine-availability` before offering and launching.
    pub check_availability: bool,
    /// Launch even when the job's NATS URL is a loopback address (tests only: a real machine
    /// cannot reach it).
    pub allow_loopback_nats: bool,
}

impl Settings {
    /// Defaults for `api_key`: every region, the public API, no template.
    pub fn new(api_key: Secret) -> Self {
        Settings {
            base_url: DEFAULT_URL.into(),
            api_key,
            regions: REGIONS.iter().map(|(_, r)| r.to_string()).collect(),
            template: None,
            disk_gb: 50,
            agent: "cedana-agent".into(),
            poll_every: Duration::from_secs(5),
            retry: Retry::default(),
            check_availability: true,
            allow_loopback_nats: false,
        }
    }

    /// From the config's `paperspace` block and the environment.
    pub fn from_config(c: &PaperspaceConfig) -> Result<Self, ProviderError> {
        let failed = |message: String| ProviderError::Failed {
            provider: NAME.into(),
            message,
        };
        if c.api_key.is_empty() {
            return Err(failed("no API key: set `paperspace.api_key` in the config (~/.cedana/cedana_config.json or $CEDANA_CONFIG) to a key from console.paperspace.com".into()));
        }
        let mut s = Settings::new(c.api_key.clone());
        if !c.enabled_regions.is_empty() {
            s.regions = Vec::new();
            for r in &c.enabled_regions {
                let api = api_region(r).ok_or_else(|| {
                    failed(format!(
                        "`paperspace.enabled_regions` has {r:?}, which is not a Paperspace region; use {}",
                        REGIONS.map(|(l, _)| format!("{l:?}")).join(", ")
                    ))
                })?;
                if !s.regions.iter().any(|x| x == api) {
                    s.regions.push(api.into());
                }
            }
        }
        if let Ok(u) = std::env::var(URL_ENV) {
            if !u.trim().is_empty() {
                s.base_url = u.trim().into();
            }
        }
        s.template = std::env::var(TEMPLATE_ENV)
            .ok()
            .filter(|t| !t.trim().is_empty());
        if let Ok(d) = std::env::var(DISK_ENV) {
            s.disk_gb = d
                .trim()
                .parse()
                .map_err(|_| failed(format!("${DISK_ENV} is {d:?}, not a size in GB")))?;
        }
        if let Ok(a) = std::env::var(AGENT_ENV) {
            if !a.trim().is_empty() {
                s.agent = a.trim().into();
            }
        }
        Ok(s)
    }
}

/// The `paperspace` provider.
pub struct PaperspaceProvider {
    settings: Settings,
    client: Client,
    catalog: Catalog,
    /// The provider's own runtime: the `Provider` trait is synchronous and `offers` has no
    /// runtime at hand.
    rt: Arc<tokio::runtime::Runtime>,
    template: OnceLock<Template>,
}

fn failed(message: impl Into<String>) -> ProviderError {
    ProviderError::Failed {
        provider: NAME.into(),
        message: message.into(),
    }
}

/// A provider error for an API error, with what to do about a refused key.
fn api_failed(e: ApiError) -> ProviderError {
    if e.is_auth() {
        failed(format!(
            "the API key was refused ({e}); set `paperspace.api_key` in the config to a valid key from console.paperspace.com"
        ))
    } else {
        failed(e.to_string())
    }
}

/// The startup script that makes the machine a worker of the job
/// ([`crate::providers::worker_boot_script`]). It holds the job's token: it is sent to the API
/// once and never logged.
pub fn startup_script(agent: &str, boot: &Bootstrap) -> String {
    crate::providers::worker_boot_script(agent, boot, &[])
}

impl PaperspaceProvider {
    /// A provider with `settings`, pricing from `catalog`.
    pub fn new(settings: Settings, catalog: Catalog) -> Result<Self, ProviderError> {
        let client = Client::new(&settings.base_url, settings.api_key.clone(), settings.retry)
            .map_err(api_failed)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("paperspace")
            .enable_all()
            .build()
            .map_err(|e| failed(format!("cannot start a runtime for the API client: {e}")))?;
        Ok(PaperspaceProvider {
            settings,
            client,
            catalog,
            rt: Arc::new(rt),
            template: OnceLock::new(),
        })
    }

    /// From the config's `paperspace` block, the environment and the price catalog
    /// (`~/.cedana/catalog.json` over the built-in one).
    pub fn from_config(c: &PaperspaceConfig) -> Result<Self, ProviderError> {
        let settings = Settings::from_config(c)?;
        let catalog = Catalog::load().map_err(|e| failed(e.to_string()))?;
        Self::new(settings, catalog)
    }

    /// The API client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The settings in use.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The template workers boot from, looked up once.
    fn template(&self) -> Result<Template, ProviderError> {
        if let Some(t) = self.template.get() {
            return Ok(t.clone());
        }
        let Some(wanted) = self.settings.template.clone() else {
            return Err(failed(format!(
                "no template to boot workers from: set ${TEMPLATE_ENV} to the ID or name of a Paperspace template with cedana-agent installed (see docs/providers.md)"
            )));
        };
        let client = self.client.clone();
        let found = self
            .rt
            .block_on(async move { client.find_template(&wanted).await })
            .map_err(api_failed)?;
        let t = found.ok_or_else(|| {
            failed(format!(
                "template {:?} (${TEMPLATE_ENV}) is neither a custom template nor an OS template of this account",
                self.settings.template.as_deref().unwrap_or_default()
            ))
        })?;
        let _ = self.template.set(t.clone());
        Ok(t)
    }

    /// The disk size for a machine from `template`: the setting, at least the template's,
    /// rounded up to a size Paperspace offers.
    fn disk_size(&self, template: &Template) -> u32 {
        let want = template
            .default_size_gb
            .map(|d| d.ceil() as u32)
            .unwrap_or(0)
            .max(self.settings.disk_gb);
        DISK_SIZES
            .iter()
            .copied()
            .find(|s| *s >= want)
            .unwrap_or(want)
    }
}

impl Provider for PaperspaceProvider {
    fn name(&self) -> &str {
        NAME
    }

    /// A Paperspace machine is provisioned and booted before its startup script runs.
    fn boot_timeout(&self) -> Duration {
        Duration::from_secs(600)
    }

    fn offers(&self, spec: &Spec) -> Result<Vec<Offer>, ProviderError> {
        let template = self.template()?;
        let offers: Vec<Offer> = self
            .catalog
            .offers(NAME, &self.settings.regions)
            .into_iter()
            .filter(|o| {
                let ok = template.allows(&o.instance_type);
                if !ok {
                    tracing::debug!(instance_type = %o.instance_type, template = %template.id, "the template does not run on this type");
                }
                ok
            })
            .collect();
        if !self.settings.check_availability {
            return Ok(offers);
        }
        // Only offers that fit are worth asking about; the others go back as they are, for
        // the ranking to say why they do not fit. A few questions at a time, not to be rate
        // limited.
        let client = self.client.clone();
        let checked: Vec<(Offer, Result<bool, ApiError>)> = self.rt.block_on(async move {
            use futures::StreamExt;
            let asks = offers.into_iter().map(|o| {
                let client = client.clone();
                async move {
                    if o.misfit(spec).is_some() {
                        return (o, Ok(true));
                    }
                    let r = client.availability(&o.instance_type, &o.region).await;
                    (o, r)
                }
            });
            futures::stream::iter(asks)
                .buffer_unordered(4)
                .collect()
                .await
        });
        let mut out = Vec::new();
        for (o, r) in checked {
            match r {
                Ok(true) => out.push(o),
                Ok(false) => {
                    tracing::info!(instance_type = %o.instance_type, region = %o.region, "paperspace has no availability for this type now; not offered")
                }
                Err(e) if e.is_auth() => return Err(api_failed(e)),
                Err(e) => {
                    tracing::warn!(instance_type = %o.instance_type, region = %o.region, error = %e, "cannot ask paperspace about availability; offering it anyway");
                    out.push(o);
                }
            }
        }
        Ok(out)
    }

    fn launch(
        &mut self,
        offer: &Offer,
        boot: &Bootstrap,
    ) -> Result<Box<dyn Instance>, ProviderError> {
        let capacity = |message: String| ProviderError::Capacity {
            provider: NAME.into(),
            instance_type: offer.instance_type.clone(),
            message,
        };
        if !self.settings.allow_loopback_nats && loopback_only(boot.nats_url) {
            return Err(failed(format!(
                "the job's NATS server ({}) is on loopback, which a Paperspace machine cannot reach; set connection.nats_url in the config to an address the machines can reach",
                boot.nats_url
            )));
        }
        let template = self.template()?;
        if !template.allows(&offer.instance_type) {
            return Err(capacity(format!(
                "template {} does not run on this type",
                template.id
            )));
        }
        let name = format!("cedana-{}-{}", boot.job, boot.worker);
        let script = startup_script(&self.settings.agent, boot);
        let create = CreateMachine {
            name: name.clone(),
            machine_type: offer.instance_type.clone(),
            template_id: template.id.clone(),
            disk_size: self.disk_size(&template),
            region: offer.region.clone(),
            startup_script_id: None,
            public_ip_type: "dynamic".into(),
            start_on_create: true,
            email_password: false,
        };
        let client = self.client.clone();
        let check = self.settings.check_availability;
        let (machine, event, script_id) = self.rt.block_on(async {
            if check {
                match client
                    .availability(&create.machine_type, &create.region)
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => {
                        return Err(capacity(format!(
                            "no availability in {} right now",
                            create.region
                        )))
                    }
                    Err(e) if e.is_auth() => return Err(api_failed(e)),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot ask paperspace about availability; trying anyway")
                    }
                }
            }
            let s = client
                .create_startup_script(&name, &script, true)
                .await
                .map_err(api_failed)?;
            let mut create = create;
            create.startup_script_id = Some(s.id.clone());
            match client.create_machine(&create).await {
                Ok((m, ev)) => Ok((m, ev, s.id)),
                Err(e) => {
                    if let Err(d) = client.delete_startup_script(&s.id).await {
                        tracing::warn!(script = %s.id, error = %d, "cannot delete the startup script of a machine that was not made");
                    }
                    if e.is_capacity() {
                        Err(capacity(e.to_string()))
                    } else {
                        Err(api_failed(e))
                    }
                }
            }
        })?;
        tracing::info!(machine = %machine.id, name = %name, machine_type = %offer.instance_type, region = %offer.region, "paperspace machine created");
        let gone = Arc::new(AtomicBool::new(false));
        let poller = self
            .rt
            .spawn(watch(
                self.client.clone(),
                machine.id.clone(),
                event.map(|e| e.id),
                self.settings.poll_every,
                gone.clone(),
            ))
            .abort_handle();
        Ok(Box::new(PaperspaceWorker {
            id: machine.id,
            script_id: Some(script_id),
            client: self.client.clone(),
            rt: self.rt.clone(),
            gone,
            poller: Some(poller),
            ended: false,
        }))
    }
}

/// Follows a worker's machine until it is gone: deleted, off or stopping after it ran, failed,
/// or its creation ended in error. At most one look every `every`.
async fn watch(
    client: Client,
    id: String,
    mut event: Option<String>,
    every: Duration,
    gone: Arc<AtomicBool>,
) {
    let mut ran = false;
    let mut created = event.is_none();
    loop {
        tokio::time::sleep(every).await;
        if let Some(ev) = event.clone() {
            match client.get_event(&ev).await {
                Ok(e) if e.state == "error" || e.state == "cancelled" => {
                    tracing::warn!(machine = %id, state = %e.state, error = e.error.as_deref().unwrap_or(""), "creating the paperspace machine failed");
                    gone.store(true, Ordering::SeqCst);
                    return;
                }
                Ok(e) if e.state == "done" => {
                    event = None;
                    created = true;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(machine = %id, error = %e, "cannot read the machine's event")
                }
            }
        }
        match client.get_machine(&id).await {
            Ok(m) if m.deleted() => {
                tracing::info!(machine = %id, "paperspace machine deleted");
                gone.store(true, Ordering::SeqCst);
                return;
            }
            Ok(m) => match m.state.as_str() {
                "provisioning" | "starting" | "ready" | "serviceready" | "restarting"
                | "upgrading" => ran = true,
                "off" | "stopping" if ran || created => {
                    tracing::info!(machine = %id, state = %m.state, "paperspace machine stopped");
                    gone.store(true, Ordering::SeqCst);
                    return;
                }
                "failed" | "error" => {
                    tracing::warn!(machine = %id, state = %m.state, "paperspace machine failed");
                    gone.store(true, Ordering::SeqCst);
                    return;
                }
                _ => {}
            },
            Err(e) if e.is_not_found() => {
                tracing::info!(machine = %id, "paperspace machine no longer exists");
                gone.store(true, Ordering::SeqCst);
                return;
            }
            Err(e) => {
                tracing::warn!(machine = %id, error = %e, "cannot read the paperspace machine's state")
            }
        }
    }
}

/// A worker on a Paperspace machine. Terminating (or dropping) it deletes the machine and its
/// startup script.
pub struct PaperspaceWorker {
    id: String,
    script_id: Option<String>,
    client: Client,
    rt: Arc<tokio::runtime::Runtime>,
    gone: Arc<AtomicBool>,
    poller: Option<tokio::task::AbortHandle>,
    ended: bool,
}

impl PaperspaceWorker {
    fn end(&mut self) {
        if self.ended {
            return;
        }
        self.ended = true;
        if let Some(p) = self.poller.take() {
            p.abort();
        }
        let client = self.client.clone();
        let id = self.id.clone();
        let script = self.script_id.take();
        let work = async move {
            match client.delete_machine(&id).await {
                Ok(()) => tracing::info!(machine = %id, "paperspace machine deleted"),
                Err(e) if e.is_not_found() => {}
                Err(e) => {
                    tracing::error!(machine = %id, error = %e, "cannot delete the paperspace machine; delete it in the console to stop paying for it");
                    tracing::error!("cannot delete paperspace machine {id}: {e}; delete it in the console to stop paying for it");
                }
            }
            if let Some(s) = script {
                match client.delete_startup_script(&s).await {
                    Ok(()) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => {
                        tracing::warn!(script = %s, error = %e, "cannot delete the worker's startup script")
                    }
                }
            }
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            // Inside some runtime nothing may block: the deletion goes on in the background.
            self.rt.spawn(work);
        } else {
            self.rt.block_on(work);
        }
        self.gone.store(true, Ordering::SeqCst);
    }
}

impl Instance for PaperspaceWorker {
    fn instance_id(&self) -> String {
        self.id.clone()
    }
    fn gone_flag(&self) -> Arc<AtomicBool> {
        self.gone.clone()
    }
    fn terminate(&mut self) {
        self.end();
    }
}

impl Drop for PaperspaceWorker {
    fn drop(&mut self) {
        self.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_map_to_api_names() {
        assert_eq!(api_region("East Coast (NY2)"), Some("ny2"));
        assert_eq!(api_region(" west coast (ca1) "), Some("ca1"));
        assert_eq!(api_region("Europe (AMS1)"), Some("ams1"));
        assert_eq!(api_region("NY2"), Some("ny2"));
        assert_eq!(api_region("ams1"), Some("ams1"));
        assert_eq!(api_region("us-east-1"), None);
    }

    #[test]
    fn settings_name_the_missing_key_and_bad_regions() {
        let err = Settings::from_config(&PaperspaceConfig::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("paperspace.api_key"), "{err}");
        let c = PaperspaceConfig {
            api_key: Secret::new("k-123456"),
            enabled_regions: vec!["East Coast (NY2)".into(), "Mars (MRS1)".into()],
            ..Default::default()
        };
        let err = Settings::from_config(&c).unwrap_err().to_string();
        assert!(
            err.contains("Mars (MRS1)") && err.contains("East Coast (NY2)"),
            "{err}"
        );
        assert!(!err.contains("k-123456"));
        let c = PaperspaceConfig {
            enabled_regions: vec![
                "East Coast (NY2)".into(),
                "NY2".into(),
                "Europe (AMS1)".into(),
            ],
            ..c
        };
        assert_eq!(Settings::from_config(&c).unwrap().regions, ["ny2", "ams1"]);
    }

    #[test]
    fn startup_script_starts_the_agent_for_the_worker() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let boot = Bootstrap {
            job: "counter-abc123",
            worker: "w2",
            nats_url: "nats://nats.example.org:4222",
            token: "to'ken",
            job_dir: std::path::Path::new("/tmp/x"),
            shared_storage: None,
            rt: rt.handle(),
        };
        let s = startup_script("cedana-agent", &boot);
        assert!(s.starts_with("#!/bin/sh\n"));
        assert!(s.contains("'cedana-agent' daemon --job 'counter-abc123' --worker 'w2' --nats-url 'nats://nats.example.org:4222' --token-file /var/lib/cedana/nats-token"), "{s}");
        assert!(
            s.contains(r"printf '%s\n' 'to'\''ken' > /var/lib/cedana/nats-token"),
            "{s}"
        );
        // The token is written by a builtin, never passed as an argument to a program.
        assert_eq!(s.matches("to'\\''ken").count(), 1);
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        assert_eq!(retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(retry_after("-1"), None);
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        let later = retry_after("Fri, 31 Dec 9999 23:59:59 GMT").unwrap();
        assert!(later > Duration::from_secs(86_400));
        assert_eq!(retry_after("soon"), None);
    }

    #[test]
    fn capacity_errors_are_told_apart() {
        let e = |code: &str, message: &str| ApiError::Status {
            method: "POST".into(),
            path: "/machines".into(),
            status: 400,
            code: code.into(),
            message: message.into(),
        };
        assert!(e("BAD_REQUEST", "Out of capacity for A100 in ny2").is_capacity());
        assert!(e(
            "BAD_REQUEST",
            "Machine type is not available in this region"
        )
        .is_capacity());
        assert!(!e("BAD_REQUEST", "diskSize must be one of 50, 100").is_capacity());
        assert!(!e("UNAUTHORIZED", "Invalid API key").is_capacity());
        assert!(!e("UNAUTHORIZED", "x").is_auth());
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(seg("psabc123"), "psabc123");
        assert_eq!(seg("../x y"), "..%2Fx%20y");
    }
}
