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
//! The API client is [`api`]; this module is the provider: offers, launches, and workers
//! whose machines are followed (`GET /machines/{id}`, its event) until they are gone.
//!
//! Paperspace publishes no price API, so offers come from the price catalog
//! ([`crate::providers::catalog`]) for the enabled regions, less the types the API says are not available
//! right now. The API key never reaches logs or error messages; the job's NATS token is sent
//! only inside the startup script's body.

pub mod api;

use std::sync::OnceLock;
use std::time::Duration;

use cedana_protocol::config::{PaperspaceConfig, Secret};

pub use api::{
    ApiError, Client, CreateMachine, Machine, MachineEvent, Retry, StartupScript, Template,
    TemplateMachineType,
};

use crate::providers::catalog::Catalog;
use crate::providers::common::{
    loopback_only, worker_boot_script, Address, Bootstrap, Gone, Offer, ProviderError, Spec,
};

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

/// The provider's name.
pub const NAME: &str = "paperspace";
/// Disk sizes Paperspace offers, in GB.
const DISK_SIZES: [u32; 8] = [50, 100, 250, 500, 1000, 2000, 5000, 10000];

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
            .filter(|t| !t.trim().is_empty())
            .or_else(|| c.template.clone().filter(|t| !t.trim().is_empty()));
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
/// ([`crate::providers::common::worker_boot_script`]). It holds the job's token: it is sent to the API
/// once and never logged.
pub fn startup_script(agent: &str, boot: &Bootstrap) -> String {
    worker_boot_script(agent, boot, &[])
}

impl PaperspaceProvider {
    /// A provider with `settings`, pricing from `catalog`.
    pub fn new(settings: Settings, catalog: Catalog) -> Result<Self, ProviderError> {
        let client = Client::new(&settings.base_url, settings.api_key.clone(), settings.retry)
            .map_err(api_failed)?;
        Ok(PaperspaceProvider {
            settings,
            client,
            catalog,
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
    async fn template(&self) -> Result<Template, ProviderError> {
        if let Some(t) = self.template.get() {
            return Ok(t.clone());
        }
        let Some(wanted) = self.settings.template.clone() else {
            return Err(failed(format!(
                "no template to boot workers from: set ${TEMPLATE_ENV} to the ID or name of a Paperspace template with cedana-agent installed (see docs/providers.md)"
            )));
        };
        let found = self
            .client
            .find_template(&wanted)
            .await
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

impl PaperspaceProvider {
    /// How long a new machine gets to register with the job: a Paperspace machine is
    /// provisioned and booted before its startup script runs.
    pub fn boot_timeout(&self) -> Duration {
        Duration::from_secs(600)
    }

    /// The catalog's offers in the enabled regions that the template runs on, less those the
    /// API says are not available now.
    pub async fn offers(&self, spec: &Spec) -> Result<Vec<Offer>, ProviderError> {
        let template = self.template().await?;
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
        let checked: Vec<(Offer, Result<bool, ApiError>)> = {
            use futures::StreamExt;
            let asks = offers.into_iter().map(|o| {
                let client = self.client.clone();
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
        };
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

    /// Makes a machine for `offer` that becomes worker `boot.worker` of the job; its state is
    /// then followed on `boot.rt`.
    pub async fn launch(
        &mut self,
        offer: &Offer,
        boot: &Bootstrap<'_>,
    ) -> Result<PaperspaceWorker, ProviderError> {
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
        let template = self.template().await?;
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
        let (machine, event, script_id) = async {
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
        }
        .await?;
        tracing::info!(machine = %machine.id, name = %name, machine_type = %offer.instance_type, region = %offer.region, "paperspace machine created");
        let gone = Gone::new();
        let address = Address::default();
        address.note(machine.public_ip.as_deref(), machine.private_ip.as_deref());
        let poller = boot
            .rt
            .spawn(watch(
                self.client.clone(),
                machine.id.clone(),
                event.map(|e| e.id),
                self.settings.poll_every,
                gone.clone(),
                address.clone(),
            ))
            .abort_handle();
        Ok(PaperspaceWorker {
            id: machine.id,
            script_id: Some(script_id),
            client: self.client.clone(),
            rt: boot.rt.clone(),
            gone,
            address,
            poller: Some(poller),
            ended: false,
        })
    }
}

/// Follows a worker's machine until it is gone: deleted, off or stopping after it ran, failed,
/// or its creation ended in error. At most one look every `every`; notes its address in
/// `address` meanwhile.
async fn watch(
    client: Client,
    id: String,
    mut event: Option<String>,
    every: Duration,
    gone: Gone,
    address: Address,
) {
    let mut ran = false;
    let mut created = event.is_none();
    loop {
        tokio::time::sleep(every).await;
        if let Some(ev) = event.clone() {
            match client.get_event(&ev).await {
                Ok(e) if e.state == "error" || e.state == "cancelled" => {
                    tracing::warn!(machine = %id, state = %e.state, error = e.error.as_deref().unwrap_or(""), "creating the paperspace machine failed");
                    gone.set();
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
        let machine = client.get_machine(&id).await;
        if let Ok(m) = &machine {
            address.note(m.public_ip.as_deref(), m.private_ip.as_deref());
        }
        match machine {
            Ok(m) if m.deleted() => {
                tracing::info!(machine = %id, "paperspace machine deleted");
                gone.set();
                return;
            }
            Ok(m) => match m.state.as_str() {
                "provisioning" | "starting" | "ready" | "serviceready" | "restarting"
                | "upgrading" => ran = true,
                "off" | "stopping" if ran || created => {
                    tracing::info!(machine = %id, state = %m.state, "paperspace machine stopped");
                    gone.set();
                    return;
                }
                "failed" | "error" => {
                    tracing::warn!(machine = %id, state = %m.state, "paperspace machine failed");
                    gone.set();
                    return;
                }
                _ => {}
            },
            Err(e) if e.is_not_found() => {
                tracing::info!(machine = %id, "paperspace machine no longer exists");
                gone.set();
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
    /// The runtime it was launched on: its poller runs there, and so does the deletion when
    /// it is dropped.
    rt: tokio::runtime::Handle,
    gone: Gone,
    address: Address,
    poller: Option<tokio::task::AbortHandle>,
    ended: bool,
}

impl PaperspaceProvider {
    /// Takes back the worker on machine `id` that a driver that died launched (`resume`):
    /// followed again until it is gone; terminating it deletes the machine.
    pub fn adopt(&self, id: &str, rt: &tokio::runtime::Handle) -> PaperspaceWorker {
        let gone = Gone::new();
        let address = Address::default();
        let poller = rt
            .spawn(watch(
                self.client.clone(),
                id.to_string(),
                None,
                self.settings.poll_every,
                gone.clone(),
                address.clone(),
            ))
            .abort_handle();
        PaperspaceWorker {
            id: id.to_string(),
            script_id: None,
            client: self.client.clone(),
            rt: rt.clone(),
            gone,
            address,
            poller: Some(poller),
            ended: false,
        }
    }
}

impl PaperspaceWorker {
    /// Where this machine reaches the machine, once the API said (public address first).
    pub fn address(&self) -> Option<std::net::IpAddr> {
        self.address.get()
    }

    /// Asks the API for the machine's address now (the poller also notes it as it goes).
    pub async fn learn_address(&self) {
        if let Ok(m) = self.client.get_machine(&self.id).await {
            self.address
                .note(m.public_ip.as_deref(), m.private_ip.as_deref());
        }
    }

    /// The machine's id.
    pub fn instance_id(&self) -> String {
        self.id.clone()
    }

    /// What turns true when the machine is gone (or the worker was terminated).
    pub fn gone(&self) -> Gone {
        self.gone.clone()
    }

    /// Deletes the machine and its startup script (once), waiting for the API's answers.
    pub async fn terminate(&mut self) {
        if let Some(work) = self.end() {
            work.await;
            self.gone.set();
        }
    }

    /// The deletion still to do, once: the poller is stopped.
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
        let script = self.script_id.take();
        Some(async move {
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
        })
    }
}

impl Drop for PaperspaceWorker {
    fn drop(&mut self) {
        if let Some(work) = self.end() {
            if tokio::runtime::Handle::try_current().is_ok() {
                // Inside some runtime nothing may block: the deletion goes on in the
                // background, on the worker's runtime.
                self.rt.spawn(work);
            } else {
                self.rt.block_on(work);
            }
            self.gone.set();
        }
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
            store: None,
            bucket: None,
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
}
