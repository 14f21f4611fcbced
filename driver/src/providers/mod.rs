//! Providers: where workers come from. Every provider lists offers for a job's spec (machine
//! type, size, place, price per hour, spot or on-demand, and where the price came from),
//! launches a worker from an offer with what the worker needs to join the job, and ends it.
//! The driver takes the cheapest offer that fits across the enabled providers, moving on to
//! the next when a provider has no capacity.
//!
//! Providers: `local` (this machine), `paperspace` and, with the `aws` feature, `aws`. Cloud
//! workers boot from an image that has `cedana-agent` and run [`worker_boot_script`] once.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::util::sh_quote;

#[cfg(feature = "aws")]
pub mod aws;
pub mod catalog;
pub mod local;
pub mod paperspace;

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
    pub rt: &'a tokio::runtime::Handle,
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

/// A launched worker, as its provider sees it.
pub trait Instance {
    /// The provider's id for it (a PID, an instance id).
    fn instance_id(&self) -> String;
    /// Its folder on this machine, for providers that have one (uploads go there).
    fn local_dir(&self) -> Option<PathBuf> {
        None
    }
    /// Its network namespace, if it has one of its own on this machine.
    fn netns(&self) -> Option<String> {
        None
    }
    /// A flag that turns true when the provider knows the worker is gone.
    fn gone_flag(&self) -> Arc<AtomicBool>;
    /// Notes a task it runs (some providers end tasks themselves on terminate).
    fn note_task(&mut self, _pid: i32) {}
    /// Ends it, as losing the machine would.
    fn terminate(&mut self);
}

/// How long a worker of `local` gets to register with the job.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(30);

/// A source of workers.
pub trait Provider {
    fn name(&self) -> &str;
    /// How long a launched worker may take to register with the job before it counts as lost
    /// (a cloud machine boots for minutes; a local worker for seconds).
    fn boot_timeout(&self) -> Duration {
        DEFAULT_BOOT_TIMEOUT
    }
    /// Offers that fit `spec`, any order.
    fn offers(&self, spec: &Spec) -> Result<Vec<Offer>, ProviderError>;
    /// Launches a worker from `offer`.
    fn launch(
        &mut self,
        offer: &Offer,
        boot: &Bootstrap,
    ) -> Result<Box<dyn Instance>, ProviderError>;
}

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

/// Every fitting offer of `providers`, cheapest first (on-demand before spot at the same
/// price, then by name, so the order is stable). Also the reasons offers were turned down.
pub fn ranked(providers: &[Box<dyn Provider>], spec: &Spec) -> (Vec<Offer>, Vec<String>) {
    let mut fit = Vec::new();
    let mut why = Vec::new();
    for p in providers {
        match p.offers(spec) {
            Ok(offers) => {
                for o in offers {
                    match o.misfit(spec) {
                        None => fit.push(o),
                        Some(reason) => {
                            why.push(format!("{} {}: {reason}", o.provider, o.instance_type))
                        }
                    }
                }
            }
            Err(e) => why.push(e.to_string()),
        }
    }
    fit.sort_by(|a, b| {
        a.price_usd_hour
            .total_cmp(&b.price_usd_hour)
            .then(a.spot.cmp(&b.spot))
            .then(a.provider.cmp(&b.provider))
            .then(a.instance_type.cmp(&b.instance_type))
    });
    (fit, why)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(t: &str, cpu: f64, mem: f64, price: f64) -> Offer {
        Offer {
            provider: "p".into(),
            instance_type: t.into(),
            vcpus: cpu,
            memory_gb: mem,
            gpu: None,
            gpu_count: 0,
            vram_gb: 0.0,
            region: "r".into(),
            zone: None,
            price_usd_hour: price,
            spot: false,
            price_source: "test".into(),
            priced_at: None,
        }
    }

    struct Fixed(Vec<Offer>);
    impl Provider for Fixed {
        fn name(&self) -> &str {
            "p"
        }
        fn offers(&self, _: &Spec) -> Result<Vec<Offer>, ProviderError> {
            Ok(self.0.clone())
        }
        fn launch(&mut self, _: &Offer, _: &Bootstrap) -> Result<Box<dyn Instance>, ProviderError> {
            unreachable!()
        }
    }

    #[test]
    fn cheapest_fitting_offer_comes_first() {
        let providers: Vec<Box<dyn Provider>> = vec![Box::new(Fixed(vec![
            offer("big", 8.0, 32.0, 0.40),
            offer("small", 1.0, 2.0, 0.01),
            offer("mid", 2.0, 8.0, 0.05),
            offer("mid-pricey", 4.0, 16.0, 0.30),
        ]))];
        let spec = Spec {
            cpu_cores: Some(2.0),
            memory_gb: Some(4.0),
            max_price_usd_hour: Some(0.35),
            ..Default::default()
        };
        let (fit, why) = ranked(&providers, &spec);
        let names: Vec<&str> = fit.iter().map(|o| o.instance_type.as_str()).collect();
        assert_eq!(names, ["mid", "mid-pricey"]);
        assert_eq!(why.len(), 2, "{why:?}");
        assert!(why
            .iter()
            .any(|w| w.contains("small") && w.contains("vCPUs")));
        assert!(why
            .iter()
            .any(|w| w.contains("big") && w.contains("$0.4/h")));
    }

    #[test]
    fn boot_scripts_pass_extra_arguments_and_hide_the_token_from_command_lines() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let boot = Bootstrap {
            job: "j-1",
            worker: "w3",
            nats_url: "nats://10.0.0.5:4222",
            token: "t0k'en",
            job_dir: Path::new("/x"),
            shared_storage: Some(Path::new("/mnt/shared")),
            rt: rt.handle(),
        };
        let s = worker_boot_script("/usr/local/bin/cedana-agent", &boot, &["--watch-spot"]);
        assert!(s.starts_with("#!/bin/sh\n"));
        assert!(s.contains("'/usr/local/bin/cedana-agent' daemon --job 'j-1' --worker 'w3' --nats-url 'nats://10.0.0.5:4222' --token-file /var/lib/cedana/nats-token --shared-storage '/mnt/shared' '--watch-spot' >>"), "{s}");
        let token_lines: Vec<&str> = s.lines().filter(|l| l.contains("t0k")).collect();
        assert_eq!(
            token_lines,
            [r"printf '%s\n' 't0k'\''en' > /var/lib/cedana/nats-token"]
        );
    }

    #[test]
    fn unreachable_nats_urls() {
        for u in [
            "",
            "nats://127.0.0.1:4222",
            "localhost",
            "nats://0.0.0.0:4222",
            "nats://[::1]:1",
        ] {
            assert!(loopback_only(u), "{u}");
        }
        for u in [
            "nats://10.0.0.5:4222",
            "nats://127.0.0.1:1,nats://nats.example.org:4222",
        ] {
            assert!(!loopback_only(u), "{u}");
        }
    }

    #[test]
    fn gpus_must_match() {
        let mut o = offer("g", 8.0, 32.0, 1.0);
        let spec = Spec {
            gpu: Some("A100".into()),
            ..Default::default()
        };
        assert!(o.misfit(&spec).is_some());
        o.gpu = Some("NVIDIA A100-SXM4".into());
        o.gpu_count = 1;
        assert_eq!(o.misfit(&spec), None);
        let two = Spec {
            gpu_count: Some(2),
            ..spec
        };
        assert!(o.misfit(&two).unwrap().contains("GPUs"));
    }
}
