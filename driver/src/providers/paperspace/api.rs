//! The client of Paperspace's public REST API (<https://api.paperspace.com/v1>): requests with
//! `Authorization: Bearer <api key>`, lists followed page by page (`hasMore`, `nextPage`,
//! `?after=`), errors read as the reference's `{code, message}` ([`ApiError`], which never
//! holds the key), HTTP 429 retried after the `Retry-After` the server asks for (seconds or
//! an HTTP date), reads and deletes also on 502/503/504 and broken connections, a bounded
//! number of times ([`Retry`]).

use std::collections::HashSet;
use std::time::Duration;

use cedana_protocol::config::Secret;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Lists longer than this many pages are refused rather than followed forever.
const MAX_PAGES: usize = 1000;

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

/// A `Retry-After` value: seconds, or an HTTP date (how long until then).
fn retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
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

#[cfg(test)]
mod tests {
    use super::*;

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
