//! What every provider speaks: a job's [`Spec`], the [`Offer`]s that fit it, what a new worker
//! needs ([`Bootstrap`], [`worker_boot_script`]), how a provider fails ([`ProviderError`]) and
//! how a worker's end is known ([`Gone`]). Re-exported by [`crate::providers`].

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::util::sh_quote;

/// What a job asks of a worker's machine (the original's `instance_specs`).
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct Spec {
    pub cpu_cores: Option<f64>,
    pub memory_gb: Option<f64>,
    pub gpu: Option<String>,
    pub gpu_count: Option<u32>,
    pub vram_gb: Option<f64>,
    pub max_price_usd_hour: Option<f64>,
}

/// Whether two offers are the same machine type at the same place and market (prices aside).
pub fn same_offer(a: &Offer, b: &Offer) -> bool {
    a.provider == b.provider
        && a.instance_type == b.instance_type
        && a.region == b.region
        && a.zone == b.zone
        && a.spot == b.spot
}

/// A machine a provider can launch, at a price.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    pub provider: String,
    pub instance_type: String,
    pub vcpus: f64,
    pub memory_gb: f64,
    #[serde(default)]
    pub gpu: Option<String>,
    #[serde(default)]
    pub gpu_count: u32,
    #[serde(default)]
    pub vram_gb: f64,
    pub region: String,
    #[serde(default)]
    pub zone: Option<String>,
    pub price_usd_hour: f64,
    pub spot: bool,
    /// Where the price came from (an API, a catalog file, or "free").
    pub price_source: String,
    /// When the price was observed (seconds since the epoch), if known.
    #[serde(default)]
    pub priced_at: Option<u64>,
}

impl Offer {
    /// `provider type in place (spot)`, for messages.
    pub fn name(&self) -> String {
        format!(
            "{} {} in {}{}",
            self.provider,
            self.instance_type,
            self.zone.as_deref().unwrap_or(&self.region),
            if self.spot { " (spot)" } else { "" }
        )
    }

    /// Why the offer does not fit `spec`, if it does not.
    pub fn misfit(&self, spec: &Spec) -> Option<String> {
        if let Some(c) = spec.cpu_cores.filter(|c| *c > self.vcpus) {
            return Some(format!("{} vCPUs, {c} wanted", self.vcpus));
        }
        if let Some(m) = spec.memory_gb.filter(|m| *m > self.memory_gb) {
            return Some(format!("{} GB memory, {m} wanted", self.memory_gb));
        }
        let gpus_wanted = spec.gpu_count.unwrap_or(u32::from(spec.gpu.is_some()));
        if gpus_wanted > self.gpu_count {
            return Some(format!("{} GPUs, {gpus_wanted} wanted", self.gpu_count));
        }
        if let (Some(want), Some(have)) = (&spec.gpu, &self.gpu) {
            if !have.to_lowercase().contains(&want.to_lowercase()) {
                return Some(format!("GPU {have}, {want} wanted"));
            }
        }
        if let Some(v) = spec.vram_gb.filter(|v| *v > self.vram_gb) {
            return Some(format!("{} GB of GPU memory, {v} wanted", self.vram_gb));
        }
        if let Some(p) = spec.max_price_usd_hour.filter(|p| *p < self.price_usd_hour) {
            return Some(format!("${}/h, at most ${p}/h wanted", self.price_usd_hour));
        }
        None
    }
}

/// What a new worker needs to join its job.
pub struct Bootstrap<'a> {
    pub job: &'a str,
    pub worker: &'a str,
    pub nats_url: &'a str,
    pub token: &'a str,
    /// The job's folder on this machine (local providers keep workers' folders there).
    pub job_dir: &'a Path,
    pub shared_storage: Option<&'a Path>,
    /// The job's checkpoint store (its part of it), for the worker's `--store`.
    pub store: Option<&'a str>,
    /// The job's checkpoint bucket in the NATS object store, for the worker's
    /// `--checkpoint-bucket` (`None`: the agent's default, the bucket old jobs share).
    pub bucket: Option<&'a str>,
    /// The job's runtime: what a worker does in the background runs there.
    pub rt: &'a tokio::runtime::Handle,
}

/// Where this machine reaches a cloud worker: its public address, else its private one (a
/// driver in the same network), as the provider's API last said; kept by the worker's poller.
#[derive(Clone, Debug, Default)]
pub struct Address(std::sync::Arc<std::sync::Mutex<Option<std::net::IpAddr>>>);

impl Address {
    /// The address, if the API gave one.
    pub fn get(&self) -> Option<std::net::IpAddr> {
        *self.0.lock().expect("address")
    }

    /// Notes the addresses the API reports (an unparsable one is ignored).
    pub fn note(&self, public: Option<&str>, private: Option<&str>) {
        let parse = |a: Option<&str>| a.and_then(|a| a.trim().parse().ok());
        if let Some(a) = parse(public).or_else(|| parse(private)) {
            *self.0.lock().expect("address") = Some(a);
        }
    }
}

/// Errors of a provider.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// No capacity for this offer now: the driver tries the next one.
    #[error("{provider} has no capacity for {instance_type}: {message}")]
    Capacity {
        provider: String,
        instance_type: String,
        message: String,
    },
    #[error("{provider}: {message}")]
    Failed { provider: String, message: String },
}

/// Turns true, once, when the provider knows a worker is gone (its machine was taken back,
/// its daemon exited, it was terminated); waited for with [`Gone::wait`].
pub type Gone = crate::util::Flag;

/// Runs `work` (a cloud worker's deletion) to its end from a `Drop`, on `rt`, the runtime the
/// worker was launched on: here when no runtime runs on this thread; with the thread handed
/// over to the runtime's other workers ([`tokio::task::block_in_place`]) inside a
/// multi-threaded runtime; in the background inside a current-thread runtime, which cannot
/// be waited for from its own thread.
#[cfg_attr(not(feature = "aws"), allow(dead_code))]
pub(crate) fn finish_in_drop<F>(rt: &tokio::runtime::Handle, work: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    match tokio::runtime::Handle::try_current() {
        Err(_) => rt.block_on(work),
        Ok(here) if here.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| rt.block_on(work))
        }
        Ok(_) => {
            rt.spawn(work);
        }
    }
}

/// How long a worker of `local` gets to register with the job.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a worker's boot script puts the job's NATS token (root only).
pub const BOOT_TOKEN_PATH: &str = "/var/lib/cedana/nats-token";

/// The `#!/bin/sh` script that makes a fresh cloud machine a worker of the job: it writes the
/// job's NATS token to a root-only file with a shell builtin (never on a command line) and
/// starts `AGENT daemon` for the job and worker in the background, its output in
/// `/var/log/cedana-agent.log`. `extra` arguments go to the daemon (`--watch-spot`). The script
/// holds the token: it goes to the provider's API once and is never logged.
pub fn worker_boot_script(agent: &str, boot: &Bootstrap, extra: &[&str]) -> String {
    let mut daemon = format!(
        "{} daemon --job {} --worker {} --nats-url {} --token-file {BOOT_TOKEN_PATH}",
        sh_quote(agent),
        sh_quote(boot.job),
        sh_quote(boot.worker),
        sh_quote(boot.nats_url),
    );
    if let Some(dir) = boot.shared_storage {
        daemon.push_str(&format!(
            " --shared-storage {}",
            sh_quote(&dir.display().to_string())
        ));
    }
    if let Some(store) = boot.store {
        daemon.push_str(&format!(" --store {}", sh_quote(store)));
    }
    if let Some(bucket) = boot.bucket {
        daemon.push_str(&format!(" --checkpoint-bucket {}", sh_quote(bucket)));
    }
    for a in extra {
        daemon.push(' ');
        daemon.push_str(&sh_quote(a));
    }
    format!(
        "#!/bin/sh\n\
         # Written by cedana-driver: makes this machine worker {worker} of job {job}.\n\
         set -eu\n\
         umask 077\n\
         mkdir -p /var/lib/cedana\n\
         # printf is a shell builtin: the token is not on any command line.\n\
         printf '%s\\n' {token} > {BOOT_TOKEN_PATH}\n\
         nohup {daemon} >>/var/log/cedana-agent.log 2>&1 &\n",
        worker = boot.worker,
        job = boot.job,
        token = sh_quote(boot.token),
    )
}

/// Whether every server of a NATS URL list is on loopback (or the list names none): a cloud
/// machine cannot reach it.
pub fn loopback_only(url: &str) -> bool {
    cedana_protocol::NatsUrl::parse(url).loopback_only()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cloud_worker_is_reached_at_its_public_address_else_its_private_one() {
        let a = Address::default();
        assert_eq!(a.get(), None);
        a.note(None, Some("10.0.0.7"));
        assert_eq!(a.get(), Some("10.0.0.7".parse().unwrap()));
        a.note(Some("203.0.113.9"), Some("10.0.0.7"));
        assert_eq!(a.get(), Some("203.0.113.9".parse().unwrap()));
        // An answer without an address (or an unparsable one) keeps the last.
        a.note(Some("not an address"), None);
        assert_eq!(a.get(), Some("203.0.113.9".parse().unwrap()));
    }
}
