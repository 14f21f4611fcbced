//! Providers: where workers come from. Every provider lists offers for a job's spec (machine
//! type, size, place, price per hour, spot or on-demand, and where the price came from),
//! launches a worker from an offer with what the worker needs to join the job, and ends it.
//! The driver takes the cheapest offer that fits across the enabled providers, moving on to
//! the next when a provider has no capacity.
//!
//! Providers: `local` (this machine), `paperspace` and, with the `aws` feature, `aws`. Cloud
//! workers boot from an image that has `cedana-agent` and run [`worker_boot_script`] once.
//!
//! [`Provider`] and [`Instance`] are enums over the providers and their workers with async
//! methods, run on the caller's runtime (the one the runner makes; providers make none). A
//! worker's end is awaitable ([`Gone`]). What every provider speaks (specs, offers, what a new
//! worker needs, errors) is in [`common`], re-exported here; the providers use it from there,
//! so this module can name them without an import cycle.

use std::path::PathBuf;
use std::time::Duration;

#[cfg(feature = "aws")]
pub mod aws;
pub mod catalog;
pub mod common;
pub mod local;
pub mod paperspace;

pub use common::{
    loopback_only, same_offer, sh_quote, worker_boot_script, Bootstrap, Gone, Offer, ProviderError,
    Spec, BOOT_TOKEN_PATH, DEFAULT_BOOT_TIMEOUT,
};

/// A launched worker, as its provider sees it: an enum over the providers' workers, as
/// [`Provider`] is over the providers.
pub enum Instance {
    Local(local::LocalWorker),
    Paperspace(paperspace::PaperspaceWorker),
    #[cfg(feature = "aws")]
    Aws(aws::AwsWorker),
}

impl Instance {
    /// The provider's id for it (a PID, an instance id).
    pub fn instance_id(&self) -> String {
        match self {
            Instance::Local(w) => format!("pid {}", w.pid),
            Instance::Paperspace(w) => w.instance_id(),
            #[cfg(feature = "aws")]
            Instance::Aws(w) => w.instance_id(),
        }
    }

    /// Its folder on this machine, for providers that have one (uploads go there).
    pub fn local_dir(&self) -> Option<PathBuf> {
        match self {
            Instance::Local(w) => Some(w.dir.clone()),
            _ => None,
        }
    }

    /// Its network namespace, if it has one of its own on this machine.
    pub fn netns(&self) -> Option<String> {
        match self {
            Instance::Local(w) => w.netns.as_ref().map(|n| n.name.clone()),
            _ => None,
        }
    }

    /// This machine's address and port forwarded to NATS for it (local workers in a
    /// namespace).
    pub fn forward(&self) -> Option<(std::net::Ipv4Addr, u16)> {
        match self {
            Instance::Local(w) => w.forward,
            _ => None,
        }
    }

    /// The address this machine reaches the worker at, if known (a local worker's namespace
    /// address, or this machine's loopback for one without a namespace; a cloud machine's
    /// public address, else its private one, once its API said).
    pub fn address(&self) -> Option<std::net::IpAddr> {
        match self {
            Instance::Local(w) => Some(match &w.netns {
                Some(ns) => std::net::IpAddr::V4(ns.worker_ip()),
                None => std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            }),
            Instance::Paperspace(w) => w.address(),
            #[cfg(feature = "aws")]
            Instance::Aws(w) => w.address(),
        }
    }

    /// Asks a cloud provider for the worker's address now (known at once for local ones).
    pub async fn learn_address(&self) {
        match self {
            Instance::Local(_) => {}
            Instance::Paperspace(w) => w.learn_address().await,
            #[cfg(feature = "aws")]
            Instance::Aws(w) => w.learn_address().await,
        }
    }

    /// What turns true when the provider knows the worker is gone.
    pub fn gone(&self) -> Gone {
        match self {
            Instance::Local(w) => w.gone(),
            Instance::Paperspace(w) => w.gone(),
            #[cfg(feature = "aws")]
            Instance::Aws(w) => w.gone(),
        }
    }

    /// Notes a task it runs (some providers end tasks themselves on terminate).
    pub fn note_task(&mut self, pid: i32) {
        if let Instance::Local(w) = self {
            w.task_pids.push(pid);
        }
    }

    /// Ends a worker that was lost (a local one may be left running: see
    /// [`local::LocalWorker::lose`]).
    pub async fn lose(&mut self) {
        match self {
            Instance::Local(w) => w.lose(),
            other => other.terminate().await,
        }
    }

    /// Ends it, as losing the machine would (for a cloud worker: its machine is deleted).
    pub async fn terminate(&mut self) {
        match self {
            Instance::Local(w) => w.terminate(),
            Instance::Paperspace(w) => w.terminate().await,
            #[cfg(feature = "aws")]
            Instance::Aws(w) => w.terminate().await,
        }
    }
}

/// A source of workers.
///
/// An enum over the providers, with async methods, rather than a trait object: the providers
/// are a closed set the driver knows (the runner names each one), an enum's async methods need
/// no boxed futures, and no provider needs to be named outside this crate. The methods run on
/// the caller's runtime (the one the runner makes); a provider keeps no runtime of its own,
/// and its workers keep the handle of [`Bootstrap::rt`] for what they do in the background.
// A job has a provider or two, made once: their sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Provider {
    Local(local::LocalProvider),
    Paperspace(paperspace::PaperspaceProvider),
    #[cfg(feature = "aws")]
    Aws(aws::AwsProvider),
}

impl From<local::LocalProvider> for Provider {
    fn from(p: local::LocalProvider) -> Self {
        Provider::Local(p)
    }
}

impl From<paperspace::PaperspaceProvider> for Provider {
    fn from(p: paperspace::PaperspaceProvider) -> Self {
        Provider::Paperspace(p)
    }
}

#[cfg(feature = "aws")]
impl From<aws::AwsProvider> for Provider {
    fn from(p: aws::AwsProvider) -> Self {
        Provider::Aws(p)
    }
}

impl Provider {
    /// Ends the machines this provider runs for `job`, a job whose controller died (`down`):
    /// AWS finds them by their `cedana:job` tag; Paperspace deletes the machines `ids` the
    /// job's record names. A line per machine; local workers are ended elsewhere.
    pub async fn end_job(&self, job: &str, ids: &[String]) -> Vec<String> {
        // Only AWS finds machines by the job (Paperspace's are named by the record).
        #[cfg(not(feature = "aws"))]
        let _ = job;
        match self {
            Provider::Local(_) => Vec::new(),
            Provider::Paperspace(p) => {
                let mut said = Vec::new();
                for id in ids {
                    said.push(match p.client().delete_machine(id).await {
                        Ok(()) => format!("paperspace: machine {id} deleted"),
                        Err(e) if e.is_not_found() => {
                            format!("paperspace: machine {id} was already gone")
                        }
                        Err(e) => format!("paperspace: cannot delete machine {id}: {e}"),
                    });
                }
                said
            }
            #[cfg(feature = "aws")]
            Provider::Aws(p) => p.end_job(job).await,
        }
    }

    /// Takes back a cloud worker a driver that died launched (`resume`): `instance` is the
    /// provider's id for it, `region` where it runs. Local workers are adopted by
    /// [`local::LocalWorker::adopt`].
    pub async fn adopt(
        &self,
        instance: &str,
        region: &str,
        rt: &tokio::runtime::Handle,
    ) -> Result<Instance, ProviderError> {
        // Only AWS needs the region (a Paperspace machine id is global).
        #[cfg(not(feature = "aws"))]
        let _ = region;
        match self {
            Provider::Local(_) => Err(ProviderError::Failed {
                provider: local::NAME.into(),
                message: "local workers are adopted from their process".into(),
            }),
            Provider::Paperspace(p) => Ok(Instance::Paperspace(p.adopt(instance, rt))),
            #[cfg(feature = "aws")]
            Provider::Aws(p) => p.adopt(instance, region, rt).await.map(Instance::Aws),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Provider::Local(_) => local::NAME,
            Provider::Paperspace(_) => paperspace::NAME,
            #[cfg(feature = "aws")]
            Provider::Aws(_) => aws::NAME,
        }
    }

    /// How long a launched worker may take to register with the job before it counts as lost
    /// (a cloud machine boots for minutes; a local worker for seconds).
    pub fn boot_timeout(&self) -> Duration {
        match self {
            Provider::Local(_) => DEFAULT_BOOT_TIMEOUT,
            Provider::Paperspace(p) => p.boot_timeout(),
            #[cfg(feature = "aws")]
            Provider::Aws(p) => p.boot_timeout(),
        }
    }

    /// Offers that fit `spec`, any order.
    pub async fn offers(&self, spec: &Spec) -> Result<Vec<Offer>, ProviderError> {
        match self {
            Provider::Local(p) => p.offers(spec),
            Provider::Paperspace(p) => p.offers(spec).await,
            #[cfg(feature = "aws")]
            Provider::Aws(p) => p.offers(spec).await,
        }
    }

    /// Launches a worker from `offer`.
    pub async fn launch(
        &mut self,
        offer: &Offer,
        boot: &Bootstrap<'_>,
    ) -> Result<Instance, ProviderError> {
        Ok(match self {
            Provider::Local(p) => Instance::Local(p.launch(offer, boot)?),
            Provider::Paperspace(p) => Instance::Paperspace(p.launch(offer, boot).await?),
            #[cfg(feature = "aws")]
            Provider::Aws(p) => Instance::Aws(p.launch(offer, boot).await?),
        })
    }
}

/// Every fitting offer of `providers`, cheapest first (on-demand before spot at the same
/// price, then by name, so the order is stable). Also the reasons offers were turned down.
/// The providers are asked one after the other.
pub async fn ranked(providers: &[Provider], spec: &Spec) -> (Vec<Offer>, Vec<String>) {
    let r = ranking(providers, spec).await;
    (r.offers, r.unusable.into_iter().chain(r.left_out).collect())
}

/// The fitting offers, cheapest first, the offers that do not fit (and why), and the
/// providers that could not be asked (and why).
#[derive(Debug, Default)]
pub struct Ranking {
    pub offers: Vec<Offer>,
    pub left_out: Vec<String>,
    pub unusable: Vec<String>,
}

/// [`Ranking`] of `providers` for `spec`, asked one after the other.
pub async fn ranking(providers: &[Provider], spec: &Spec) -> Ranking {
    let mut answers = Vec::new();
    for p in providers {
        answers.push(p.offers(spec).await);
    }
    let (offers, left_out, unusable) = rank(answers, spec);
    Ranking {
        offers,
        left_out,
        unusable,
    }
}

/// [`ranking`] of the providers' answers: (fitting offers, misfits, providers' errors).
fn rank(
    answers: Vec<Result<Vec<Offer>, ProviderError>>,
    spec: &Spec,
) -> (Vec<Offer>, Vec<String>, Vec<String>) {
    let mut fit = Vec::new();
    let mut why = Vec::new();
    let mut unusable = Vec::new();
    for answer in answers {
        match answer {
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
            Err(e) => unusable.push(e.to_string()),
        }
    }
    fit.sort_by(|a, b| {
        a.price_usd_hour
            .total_cmp(&b.price_usd_hour)
            .then(a.spot.cmp(&b.spot))
            .then(a.provider.cmp(&b.provider))
            .then(a.instance_type.cmp(&b.instance_type))
    });
    (fit, why, unusable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

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

    #[test]
    fn cheapest_fitting_offer_comes_first() {
        let answers = vec![Ok(vec![
            offer("big", 8.0, 32.0, 0.40),
            offer("small", 1.0, 2.0, 0.01),
            offer("mid", 2.0, 8.0, 0.05),
            offer("mid-pricey", 4.0, 16.0, 0.30),
        ])];
        let spec = Spec {
            cpu_cores: Some(2.0),
            memory_gb: Some(4.0),
            max_price_usd_hour: Some(0.35),
            ..Default::default()
        };
        let (fit, why, unusable) = rank(answers, &spec);
        assert!(unusable.is_empty());
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
            store: None,
            bucket: None,
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
