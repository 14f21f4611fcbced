//! The AWS provider and its EC2 calls against moto's EC2 server (real HTTP, the real SDK; no
//! mocks). moto serves real instance type data and a constant spot price, launches any type it
//! knows, and keeps instances, key pairs, security groups, launch templates and images; a small
//! proxy in front of it (`cedana_tests::moto::RefusingProxy`) answers some launches with EC2's
//! capacity errors and throttling. They need moto (tools/deps.sh installs it), not CRIU; one
//! (the driver's trace log) runs a NATS server on a veth address of its own, so needs root.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use cedana_driver::job::Spec;
use cedana_driver::providers::aws::{
    self, api, prices, AwsError, AwsProvider, ConnectOptions, Ec2, KeyPairOutcome, RunRequest,
    Settings, TemplateRequest,
};
use cedana_driver::providers::catalog::Catalog;
use cedana_driver::providers::{ranked, Bootstrap, Offer, Provider, ProviderError};
use cedana_protocol::config::Secret;
use cedana_tests::moto::{MotoServer, Refusal, RefusingProxy, ACCESS_KEY_ID, SECRET_ACCESS_KEY};
use cedana_tests::{repo_root, wait_until};

/// Runs a provider's call to its end on this test binary's runtime (the tests are
/// synchronous, as the job's facade is).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Runtime::new().unwrap())
        .block_on(f)
}

/// An x86_64 Ubuntu AMI moto has in every region.
const AMI: &str = "ami-1e749f67";
/// An arm64 AMI moto has in every region.
const ARM_AMI: &str = "ami-0e9271c829888680e";
/// The job's NATS token in these tests: it must reach user-data and nothing else.
const NATS_TOKEN: &str = "nats-tok-7f1c9a2be4d05";
/// moto's constant spot price and its time stamp (2006-01-02T15:04:05Z).
const MOTO_SPOT: f64 = 0.00001;
const MOTO_SPOT_AT: u64 = 1_136_214_245;

/// Everything the driver's library logs in this test binary, through the same filter the
/// driver's binary uses (`log_event_allowed`), at every level.
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        struct W(Arc<Mutex<Vec<u8>>>);
        impl Write for W {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        let buf = Arc::new(Mutex::new(Vec::new()));
        let b = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("trace")
            .with_writer(move || W(b.clone()))
            .with_ansi(false)
            .finish()
            .with(tracing_subscriber::filter::filter_fn(
                cedana_driver::log_event_allowed,
            ))
            .try_init();
        buf
    })
    .clone()
}

fn logged() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap()).into_owned()
}

/// Connection to `url` with the test credentials.
fn connect(url: &str) -> ConnectOptions {
    ConnectOptions {
        region: Some("us-east-1".into()),
        endpoint_url: Some(url.into()),
        credentials: Some((ACCESS_KEY_ID.into(), Secret::new(SECRET_ACCESS_KEY))),
        max_attempts: 2,
        ..Default::default()
    }
}

/// Provider settings against `url`: the given regions and families, booting from `AMI`.
fn settings(url: &str, regions: &[&str], families: &[&str]) -> Settings {
    logs();
    Settings {
        connect: connect(url),
        regions: regions.iter().map(|s| s.to_string()).collect(),
        families: families.iter().map(|s| s.to_string()).collect(),
        image_id: Some(AMI.into()),
        poll_every: Duration::from_millis(200),
        ..Default::default()
    }
}

/// A runtime and EC2 access for calling the async API directly.
fn ec2_at(url: &str) -> (tokio::runtime::Runtime, Ec2) {
    logs();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ec2 = rt.block_on(Ec2::connect(&connect(url))).unwrap();
    (rt, ec2)
}

fn boot<'a>(
    rt: &'a tokio::runtime::Handle,
    job: &'a str,
    worker: &'a str,
    nats: &'a str,
) -> Bootstrap<'a> {
    Bootstrap {
        job,
        worker,
        nats_url: nats,
        token: NATS_TOKEN,
        job_dir: std::path::Path::new("/nonexistent"),
        shared_storage: None,
        store: None,
        bucket: None,
        rt,
    }
}

fn spec(cpu: f64, mem: f64) -> Spec {
    Spec {
        cpu_cores: Some(cpu),
        memory_gb: Some(mem),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Offers and prices
// ---------------------------------------------------------------------------------------------

/// Offers come from moto's instance types in the enabled families, only those that fit; spot
/// offers per zone priced by DescribeSpotPriceHistory, on-demand ones by the catalog; and the
/// ranking puts them cheapest first.
#[test]
fn offers_follow_families_spec_and_prices() {
    let moto = MotoServer::start();
    let catalog = Catalog::builtin();
    let p = AwsProvider::new(
        settings(&moto.url(), &["us-east-1", "us-west-1"], &["t2", "m5"]),
        catalog.clone(),
    )
    .unwrap();
    let want = spec(2.0, 4.0);
    let offers = block_on(p.offers(&want)).unwrap();
    assert!(!offers.is_empty());
    for o in &offers {
        assert_eq!(o.provider, "aws");
        assert!(
            o.instance_type.starts_with("t2.") || o.instance_type.starts_with("m5."),
            "{o:?}"
        );
        assert!(
            o.misfit(&want).is_none(),
            "an offer that does not fit: {o:?}"
        );
        assert!(
            ["us-east-1", "us-west-1"].contains(&o.region.as_str()),
            "{o:?}"
        );
        if o.spot {
            let zone = o.zone.as_deref().expect("spot offers name their zone");
            assert!(zone.starts_with(&o.region), "{o:?}");
            assert_eq!(o.price_source, aws::SPOT_SOURCE);
            assert_eq!(o.price_usd_hour, MOTO_SPOT);
            assert_eq!(o.priced_at, Some(MOTO_SPOT_AT));
        } else {
            assert_eq!(o.zone, None);
            assert!(o.price_source.starts_with("catalog: "), "{o:?}");
            // The price is the catalog's for this type and region.
            let c = catalog
                .entries
                .iter()
                .find(|e| {
                    e.provider == "aws"
                        && e.instance_type == o.instance_type
                        && e.region == o.region
                        && !e.spot
                })
                .expect("on-demand offers come from catalog entries");
            assert_eq!(o.price_usd_hour, c.price_usd_hour);
        }
    }
    // t2.micro (1 vCPU, 1 GB) does not fit; t2.medium (2, 4) does, in both markets and
    // regions, priced from the catalog on demand.
    assert!(!offers.iter().any(|o| o.instance_type == "t2.micro"));
    let t2m = |region: &str, spot: bool| {
        offers
            .iter()
            .filter(|o| o.instance_type == "t2.medium" && o.region == region && o.spot == spot)
            .count()
    };
    assert_eq!(t2m("us-east-1", false), 1);
    assert_eq!(t2m("us-west-1", false), 1);
    assert!(t2m("us-east-1", true) >= 2, "one spot offer per zone");
    let od = offers
        .iter()
        .find(|o| o.instance_type == "t2.medium" && o.region == "us-east-1" && !o.spot)
        .unwrap();
    assert_eq!(od.price_usd_hour, 0.0464);
    assert_eq!((od.vcpus, od.memory_gb), (2.0, 4.0));
    // A type the catalog does not price still has its spot offers.
    assert!(!catalog
        .entries
        .iter()
        .any(|e| e.instance_type == "m5.metal"));
    assert!(offers
        .iter()
        .any(|o| o.instance_type == "m5.metal" && o.spot));
    assert!(!offers
        .iter()
        .any(|o| o.instance_type == "m5.metal" && !o.spot));

    // Ranked: cheapest first; a price cap leaves out what costs more.
    let providers: Vec<Provider> = vec![p.into()];
    let capped = Spec {
        max_price_usd_hour: Some(0.05),
        ..want.clone()
    };
    let (fit, why) = block_on(ranked(&providers, &capped));
    assert!(fit
        .windows(2)
        .all(|w| w[0].price_usd_hour <= w[1].price_usd_hour));
    assert!(fit.iter().all(|o| o.price_usd_hour <= 0.05));
    assert!(fit
        .iter()
        .any(|o| o.instance_type == "t2.medium" && !o.spot));
    assert!(
        why.iter()
            .any(|w| w.contains("m5.large") && w.contains("at most $0.05/h")),
        "{why:?}"
    );
}

/// GPU specs pick GPU types by name, count and memory (from DescribeInstanceTypes' GpuInfo).
#[test]
fn gpu_specs_pick_gpu_types() {
    let moto = MotoServer::start();
    let p = AwsProvider::new(
        settings(&moto.url(), &["us-east-1"], &["g4dn", "g5", "m5"]),
        Catalog::builtin(),
    )
    .unwrap();
    let want = Spec {
        gpu: Some("T4".into()),
        gpu_count: Some(4),
        ..Default::default()
    };
    let offers = block_on(p.offers(&want)).unwrap();
    assert!(!offers.is_empty());
    for o in &offers {
        assert!(o.instance_type.starts_with("g4dn."), "{o:?}");
        assert!(o.gpu_count >= 4 && o.vram_gb >= 64.0, "{o:?}");
        assert_eq!(o.gpu.as_deref(), Some("NVIDIA T4"));
    }
    assert!(offers
        .iter()
        .any(|o| o.instance_type == "g4dn.12xlarge" && !o.spot && o.price_usd_hour == 3.912));
    let a10 = Spec {
        vram_gb: Some(20.0),
        gpu: Some("a10g".into()),
        ..Default::default()
    };
    let offers = block_on(p.offers(&a10)).unwrap();
    assert!(!offers.is_empty() && offers.iter().all(|o| o.instance_type.starts_with("g5.")));
    // Nothing fits: an error that says what was asked for.
    let huge = spec(100_000.0, 1.0);
    let err = block_on(p.offers(&huge)).unwrap_err().to_string();
    assert!(err.contains("us-east-1") && err.contains("100000"), "{err}");
}

/// An arm64 image gets arm64 types only, an x86_64 image x86_64 ones (the image's architecture
/// is looked up with DescribeImages).
#[test]
fn offers_follow_the_image_architecture() {
    let moto = MotoServer::start();
    let mut s = settings(&moto.url(), &["us-east-1"], &["t4g", "t3"]);
    s.image_id = Some(ARM_AMI.into());
    let p = AwsProvider::new(s, Catalog::builtin()).unwrap();
    let offers = block_on(p.offers(&spec(2.0, 1.0))).unwrap();
    assert!(!offers.is_empty());
    assert!(
        offers.iter().all(|o| o.instance_type.starts_with("t4g.")),
        "{offers:?}"
    );
    let p = AwsProvider::new(
        settings(&moto.url(), &["us-east-1"], &["t4g", "t3"]),
        Catalog::builtin(),
    )
    .unwrap();
    let offers = block_on(p.offers(&spec(2.0, 1.0))).unwrap();
    assert!(
        offers.iter().all(|o| o.instance_type.starts_with("t3.")),
        "{offers:?}"
    );
    // An image a region does not have: that region offers nothing, and says why.
    let mut s = settings(&moto.url(), &["us-east-1"], &["t3"]);
    s.image_id = Some("ami-00000000000000000".into());
    let p = AwsProvider::new(s, Catalog::builtin()).unwrap();
    let err = block_on(p.offers(&spec(1.0, 1.0))).unwrap_err().to_string();
    assert!(
        err.contains("ami-00000000000000000") && err.contains("us-east-1"),
        "{err}"
    );
}

/// DescribeSpotPriceHistory through the API layer: one quote per type and zone, for the types
/// asked about only.
#[test]
fn spot_quotes_are_one_per_type_and_zone() {
    let moto = MotoServer::start();
    let (rt, ec2) = ec2_at(&moto.url());
    let types = vec!["t2.micro".to_string(), "m5.large".to_string()];
    let q = rt
        .block_on(prices::spot_quotes(
            &ec2.client("us-west-1"),
            &types,
            Duration::from_secs(3600),
        ))
        .unwrap();
    assert!(!q.is_empty());
    let mut keys: Vec<(String, String)> = q
        .iter()
        .map(|q| (q.instance_type.clone(), q.zone.clone()))
        .collect();
    let n = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), n, "one quote per type and zone");
    assert!(q.iter().all(|q| types.contains(&q.instance_type)));
    assert!(q.iter().all(|q| q.zone.starts_with("us-west-1")));
    assert!(q.iter().any(|q| q.instance_type == "m5.large"));
}

/// The catalog refresh writes EC2's spot prices per type and zone in the catalog's format,
/// which reads back and prices offers when EC2's spot prices cannot be had.
#[test]
fn refreshed_spot_prices_make_a_catalog() {
    let moto = MotoServer::start();
    let p = AwsProvider::new(
        settings(&moto.url(), &["us-east-1"], &["t2.micro", "t2.small"]),
        Catalog::builtin(),
    )
    .unwrap();
    let entries = block_on(p.refresh_catalog()).unwrap();
    assert!(!entries.is_empty());
    for e in &entries {
        assert!(e.spot && e.provider == "aws" && e.region == "us-east-1");
        assert!(
            ["t2.micro", "t2.small"].contains(&e.instance_type.as_str()),
            "{e:?}"
        );
        assert!(e
            .zone
            .as_deref()
            .is_some_and(|z| z.starts_with("us-east-1")));
        assert_eq!(e.source, aws::SPOT_SOURCE);
        assert_eq!(e.updated_at.epoch(), MOTO_SPOT_AT);
        assert_eq!(e.price_usd_hour, MOTO_SPOT);
    }
    let text = Catalog {
        entries: entries.clone(),
    }
    .to_json();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.json");
    std::fs::write(&path, &text).unwrap();
    let back = Catalog::from_file(&path).unwrap();
    assert_eq!(back.entries, entries);

    // When EC2's spot prices cannot be had (here: moto is gone once the provider knows the
    // types and the image), the catalog's spot entries price the spot offers.
    let mut catalog = Catalog::builtin();
    let mut mine = back.clone();
    for e in &mut mine.entries {
        e.price_usd_hour = 0.0042;
        e.source = "refreshed by a test".into();
    }
    catalog.overlay(mine);
    let p = AwsProvider::new(
        settings(&moto.url(), &["us-east-1"], &["t2.micro"]),
        catalog,
    )
    .unwrap();
    // Types are cached by the first call; then moto goes away.
    let live = block_on(p.offers(&spec(1.0, 1.0))).unwrap();
    assert!(live
        .iter()
        .any(|o| o.spot && o.price_source == aws::SPOT_SOURCE));
    drop(moto);
    let fallback = block_on(p.offers(&spec(1.0, 1.0))).unwrap();
    let spot: Vec<&Offer> = fallback.iter().filter(|o| o.spot).collect();
    assert!(!spot.is_empty());
    assert!(spot
        .iter()
        .all(|o| o.price_usd_hour == 0.0042 && o.price_source == "catalog: refreshed by a test"));
}

// ---------------------------------------------------------------------------------------------
// Launching
// ---------------------------------------------------------------------------------------------

/// A spot offer launches a spot instance in the offer's zone, tagged with job and worker,
/// whose user-data starts the agent for the job (read back with DescribeInstanceAttribute);
/// an on-demand offer launches an on-demand one.
#[test]
fn launches_spot_and_on_demand_with_tags_and_user_data() {
    let moto = MotoServer::start();
    let mut p = AwsProvider::new(
        settings(&moto.url(), &["us-east-1"], &["t2"]),
        Catalog::builtin(),
    )
    .unwrap();
    let offers = block_on(p.offers(&spec(1.0, 1.0))).unwrap();
    let spot = offers
        .iter()
        .find(|o| o.spot && o.instance_type == "t2.micro")
        .unwrap()
        .clone();
    let od = offers
        .iter()
        .find(|o| !o.spot && o.instance_type == "t2.small")
        .unwrap()
        .clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let nats = "nats://10.77.0.1:4222";
    let w1 = block_on(p.launch(&spot, &boot(rt.handle(), "train-abc123", "w1", nats))).unwrap();
    let w2 = block_on(p.launch(&od, &boot(rt.handle(), "train-abc123", "w2", nats))).unwrap();
    assert!(w1.instance_id().starts_with("i-"));
    let (art, ec2) = ec2_at(&moto.url());
    let c = ec2.client("us-east-1");
    let v1 = art
        .block_on(api::describe_instance(&c, &w1.instance_id()))
        .unwrap()
        .expect("the instance exists");
    assert_eq!(v1.instance_type, "t2.micro");
    assert!(v1.spot, "{v1:?}");
    assert_eq!(v1.zone, spot.zone);
    assert_eq!(v1.image_id.as_deref(), Some(AMI));
    assert_eq!(v1.tag(aws::TAG_JOB), Some("train-abc123"));
    assert_eq!(v1.tag(aws::TAG_WORKER), Some("w1"));
    assert_eq!(v1.tag("Name"), Some("cedana-train-abc123-w1"));
    let v2 = art
        .block_on(api::describe_instance(&c, &w2.instance_id()))
        .unwrap()
        .unwrap();
    assert!(!v2.spot && v2.instance_type == "t2.small");
    assert_eq!(v2.tag(aws::TAG_WORKER), Some("w2"));

    let ud = art
        .block_on(api::instance_user_data(&c, &w1.instance_id()))
        .unwrap();
    assert!(ud.starts_with("#!/bin/sh\n"), "{ud}");
    assert!(ud.contains("'/usr/local/bin/cedana-agent' daemon --job 'train-abc123' --worker 'w1' --nats-url 'nats://10.77.0.1:4222' --token-file /var/lib/cedana/nats-token"), "{ud}");
    assert!(ud.contains("'--watch-spot'"), "{ud}");
    // The token is written with a shell builtin, once, never as a program's argument.
    assert_eq!(ud.matches(NATS_TOKEN).count(), 1, "{ud}");
    assert!(ud.contains(&format!(
        "printf '%s\\n' '{NATS_TOKEN}' > /var/lib/cedana/nats-token"
    )));
    assert!(
        !logged().contains(NATS_TOKEN),
        "the NATS token reached the logs"
    );
}

/// The configured launch template boots the workers (its image), by name or by id.
#[test]
fn launch_template_boots_workers() {
    let moto = MotoServer::start();
    let (art, ec2) = ec2_at(&moto.url());
    let c = ec2.client("us-east-1");
    let lt = art
        .block_on(api::ensure_launch_template(
            &c,
            &TemplateRequest {
                name: "cedana-workers".into(),
                image_id: "ami-785db401".into(),
                user_data: "#!/bin/sh\necho baked\n".into(),
                ..Default::default()
            },
        ))
        .unwrap();
    assert!(lt.starts_with("lt-"));
    for reference in ["cedana-workers".to_string(), lt.clone()] {
        let mut s = settings(&moto.url(), &["us-east-1"], &["t3"]);
        s.image_id = None;
        s.launch_template = Some(reference.clone());
        let mut p = AwsProvider::new(s, Catalog::builtin()).unwrap();
        let offer = block_on(p.offers(&spec(2.0, 1.0)))
            .unwrap()
            .into_iter()
            .find(|o| o.instance_type == "t3.micro" && !o.spot)
            .unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let w = block_on(p.launch(
            &offer,
            &boot(rt.handle(), "lt-job", "w1", "nats://10.77.0.1:4222"),
        ))
        .unwrap();
        let v = art
            .block_on(api::describe_instance(&c, &w.instance_id()))
            .unwrap()
            .unwrap();
        assert_eq!(v.image_id.as_deref(), Some("ami-785db401"), "{reference}");
        assert_eq!(v.tag("aws:ec2launchtemplate:id"), Some(lt.as_str()));
        // Each worker gets its own user-data, not the template's.
        let ud = art
            .block_on(api::instance_user_data(&c, &w.instance_id()))
            .unwrap();
        assert!(
            ud.contains("--worker 'w1'") && !ud.contains("echo baked"),
            "{ud}"
        );
    }
    // A template missing in a region: no offers there, and a reason that names it.
    let mut s = settings(&moto.url(), &["us-west-1"], &["t3"]);
    s.image_id = None;
    s.launch_template = Some("cedana-workers".into());
    let p = AwsProvider::new(s, Catalog::builtin()).unwrap();
    let err = block_on(p.offers(&spec(1.0, 1.0))).unwrap_err().to_string();
    assert!(
        err.contains("cedana-workers") && err.contains("us-west-1"),
        "{err}"
    );
}

/// Without an image or template, launching says what to configure.
#[test]
fn launch_without_an_image_says_what_to_set() {
    let moto = MotoServer::start();
    let mut s = settings(&moto.url(), &["us-east-1"], &["t2"]);
    s.image_id = None;
    let mut p = AwsProvider::new(s, Catalog::builtin()).unwrap();
    let offer = block_on(p.offers(&spec(1.0, 1.0))).unwrap().remove(0);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let err = block_on(p.launch(
        &offer,
        &boot(rt.handle(), "j", "w1", "nats://10.77.0.1:4222"),
    ))
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("aws.launch_template") && err.contains("bake"),
        "{err}"
    );
}

/// The gone flag turns true when the instance is terminated behind the worker's back;
/// terminating a worker terminates its instance; so does dropping it.
#[test]
fn gone_flag_terminate_and_drop() {
    let moto = MotoServer::start();
    let mut p = AwsProvider::new(
        settings(&moto.url(), &["us-east-1"], &["t2.nano"]),
        Catalog::builtin(),
    )
    .unwrap();
    let offer = block_on(p.offers(&Spec::default()))
        .unwrap()
        .into_iter()
        .find(|o| !o.spot)
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let nats = "nats://10.77.0.1:4222";
    let (art, ec2) = ec2_at(&moto.url());
    let c = ec2.client("us-east-1");
    let state = |id: &str| {
        art.block_on(api::describe_instance(&c, id))
            .unwrap()
            .map(|v| v.state)
            .unwrap_or_else(|| "unknown".into())
    };

    // Lost: terminated by someone else (a spot interruption, the console).
    let lost = block_on(p.launch(&offer, &boot(rt.handle(), "g", "w1", nats))).unwrap();
    let flag = lost.gone();
    std::thread::sleep(Duration::from_millis(700));
    assert!(!flag.is_set(), "a running instance is not gone");
    art.block_on(api::terminate(&c, &lost.instance_id()))
        .unwrap();
    wait_until(Duration::from_secs(20), "the gone flag", || flag.is_set());

    // Ended by the job.
    let mut ended = block_on(p.launch(&offer, &boot(rt.handle(), "g", "w2", nats))).unwrap();
    let id = ended.instance_id();
    assert_eq!(
        art.block_on(api::wait_running(&c, &id, Duration::from_secs(30)))
            .unwrap()
            .id,
        id
    );
    block_on(ended.terminate());
    assert!(ended.gone().is_set());
    assert!(
        ["shutting-down", "terminated"].contains(&state(&id).as_str()),
        "{}",
        state(&id)
    );

    // Dropped (a job that ends without terminating): no instance is left behind, also when
    // dropped inside a runtime.
    let dropped = block_on(p.launch(&offer, &boot(rt.handle(), "g", "w3", nats))).unwrap();
    let id3 = dropped.instance_id();
    assert_eq!(state(&id3), "running");
    drop(dropped);
    assert!(["shutting-down", "terminated"].contains(&state(&id3).as_str()));
    let inside = block_on(p.launch(&offer, &boot(rt.handle(), "g", "w4", nats))).unwrap();
    let id4 = inside.instance_id();
    rt.block_on(async move { drop(inside) });
    assert!(["shutting-down", "terminated"].contains(&state(&id4).as_str()));

    // The provider and a worker dropped together inside async code: the instance is
    // terminated and nothing panics.
    let last = block_on(p.launch(&offer, &boot(rt.handle(), "g", "w5", nats))).unwrap();
    let id5 = last.instance_id();
    rt.block_on(async move {
        drop(last);
        drop(p);
    });
    assert!(["shutting-down", "terminated"].contains(&state(&id5).as_str()));

    // Waiting for an instance that ended says so.
    let err = art
        .block_on(api::wait_running(&c, &id, Duration::from_secs(5)))
        .unwrap_err();
    assert!(matches!(err, AwsError::Ended { .. }), "{err}");
}

/// Capacity errors are told apart: the provider reports `Capacity` (so the job tries its next
/// offer) and the next offer launches; other errors are failures.
#[test]
fn capacity_errors_move_on_to_the_next_offer() {
    let moto = MotoServer::start();
    let proxy = RefusingProxy::start(
        &moto,
        &[
            ("t2.small", "InsufficientInstanceCapacity"),
            ("t2.medium", "SpotMaxPriceTooLow"),
            ("t2.large", "AuthFailure"),
        ],
    );
    let mut p = AwsProvider::new(
        settings(
            &proxy.url(),
            &["us-east-1"],
            &["t2.micro", "t2.small", "t2.medium", "t2.large"],
        ),
        Catalog::builtin(),
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let offers = block_on(p.offers(&Spec::default())).unwrap();
    let pick = |t: &str, spot: bool| {
        offers
            .iter()
            .find(|o| o.instance_type == t && o.spot == spot)
            .unwrap()
            .clone()
    };
    // The job's walk down its ranking, as Job::launch does it: capacity errors move on.
    let walk = [
        pick("t2.small", false),
        pick("t2.medium", true),
        pick("t2.micro", false),
    ];
    let mut refusals = Vec::new();
    let mut launched = None;
    for o in &walk {
        match block_on(p.launch(o, &boot(rt.handle(), "cap", "w1", "nats://10.77.0.1:4222"))) {
            Ok(w) => {
                launched = Some((w, o.clone()));
                break;
            }
            Err(ProviderError::Capacity {
                instance_type,
                message,
                ..
            }) => refusals.push((instance_type, message)),
            Err(e) => panic!("not a capacity error: {e}"),
        }
    }
    assert_eq!(refusals.len(), 2, "{refusals:?}");
    assert_eq!(refusals[0].0, "t2.small");
    assert!(
        refusals[0].1.contains("InsufficientInstanceCapacity"),
        "{:?}",
        refusals[0]
    );
    assert_eq!(refusals[1].0, "t2.medium");
    assert!(
        refusals[1].1.contains("SpotMaxPriceTooLow") && refusals[1].1.contains("us-east-1"),
        "{:?}",
        refusals[1]
    );
    assert_eq!(proxy.refused(), 2, "capacity errors are not retried");
    let (w, o) = launched.expect("the third offer launches");
    assert_eq!(o.instance_type, "t2.micro");
    let (art, ec2) = ec2_at(&moto.url());
    let v = art
        .block_on(api::describe_instance(
            &ec2.client("us-east-1"),
            &w.instance_id(),
        ))
        .unwrap()
        .unwrap();
    assert_eq!(v.instance_type, "t2.micro");
    // AuthFailure is no capacity problem: the job stops with it, saying what to check.
    match block_on(p.launch(
        &pick("t2.large", false),
        &boot(rt.handle(), "cap", "w2", "nats://10.77.0.1:4222"),
    )) {
        Err(ProviderError::Failed { message, .. }) => assert!(
            message.contains("AuthFailure") && message.contains("credentials"),
            "{message}"
        ),
        Err(e) => panic!("expected a failure, got {e}"),
        Ok(_) => panic!("expected a failure"),
    }
}

/// A job named `name` whose workers come from `p`, its coordinator on `nats` (no agent ever
/// registers: no instance simulator here).
fn launch_job(
    name: &str,
    p: AwsProvider,
    nats: &cedana_tests::NatsServer,
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
) -> cedana_driver::job::Job {
    use cedana_driver::coord::Coordinator;
    use cedana_driver::job::record::{JobRecord, JobState};
    use cedana_driver::job::Job;
    let coord = rt
        .block_on(Coordinator::connect(&nats.url(), &nats.token, name, false))
        .unwrap();
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let record = JobRecord {
        v: 1,
        job: name.into(),
        script: format!("{name}.rhai").into(),
        state: JobState::Starting,
        started_at: 0,
        updated_at: 0,
        driver_pid: std::process::id(),
        nats_url: "nats://10.77.0.1:4222".into(),
        embedded_nats: false,
        managed: false,
        workers: Vec::new(),
        task: None,
        checkpoints: Vec::new(),
        recoveries: 0,
        migrations: 0,
        spot_notices: 0,
        arbitrage_moves: 0,
        cost_usd: 0.0,
        exit_code: None,
        error: None,
        nats_pid: 0,
        events_seq: 0,
        output_seq: 0,
        settings: Default::default(),
        exit_status: None,
    };
    let mut job = Job::new(
        name.into(),
        rt.handle().clone(),
        coord,
        "nats://10.77.0.1:4222".into(),
        Secret::new(nats.token.clone()),
        dir.to_path_buf(),
        None,
        record,
    );
    job.providers = vec![p.into()];
    job
}

/// With `run --wait-for-spot`, a launch that finds every spot offer full waits for one
/// instead of taking on-demand: spot requests refused for two rounds are asked again, and
/// the worker goes to spot. When the wait runs out, on-demand.
#[test]
fn a_launch_waits_for_spot_before_on_demand() {
    use cedana_driver::job::policy::{Overheads, Policy, PolicyOptions};
    let moto = MotoServer::start();
    let nats = cedana_tests::NatsServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let spot_offers = {
        let s = settings(&moto.url(), &["us-east-1"], &["t2.micro"]);
        let p = AwsProvider::new(s, Catalog::builtin()).unwrap();
        let offers = rt.block_on(p.offers(&Spec::default())).unwrap();
        assert!(
            offers.iter().any(|o| !o.spot),
            "an on-demand offer: {offers:?}"
        );
        offers.iter().filter(|o| o.spot).count()
    };
    assert!(spot_offers >= 1, "moto prices t2.micro spot");
    let wait = |secs| {
        Policy::new(PolicyOptions {
            interval: None,
            arbitrage: None,
            adaptive: true,
            wait_for_spot: Some(Duration::from_secs(secs)),
            overheads: Overheads::default(),
        })
    };
    let spot_full = |times| Refusal {
        action: "RunInstances".into(),
        instance_type: None,
        code: "InsufficientInstanceCapacity".into(),
        status: 400,
        times,
        spot: Some(true),
    };
    let launch = |name: &str, proxy: &RefusingProxy, policy: Policy| {
        let mut s = settings(&proxy.url(), &["us-east-1"], &["t2.micro"]);
        s.boot_timeout = Duration::from_secs(1);
        let p = AwsProvider::new(s, Catalog::builtin()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut job = launch_job(name, p, &nats, &rt, dir.path());
        job.policy = policy;
        let started = std::time::Instant::now();
        // No agent registers here: the launch ends in a boot timeout; what matters is where
        // the first worker went.
        let _ = job.launch(&Spec::default());
        (job.record.workers.clone(), started.elapsed())
    };

    // Spot full for two rounds of every spot offer, then there.
    let proxy = RefusingProxy::start_with(&moto, vec![spot_full(Some(2 * spot_offers))]);
    let (workers, _) = launch("waitspot", &proxy, wait(60));
    let first = workers[0].offer.as_ref().unwrap();
    assert!(first.spot, "the first worker waited for spot: {first:?}");
    assert_eq!(
        proxy.refused(),
        2 * spot_offers,
        "every spot offer asked twice, then again"
    );

    // Spot never there: on-demand once the 2 s wait is over, not before.
    let proxy = RefusingProxy::start_with(&moto, vec![spot_full(None)]);
    let (workers, took) = launch("waitod", &proxy, wait(2));
    let first = workers[0].offer.as_ref().unwrap();
    assert!(!first.spot, "on-demand after the wait: {first:?}");
    assert!(
        proxy.refused() >= 2 * spot_offers,
        "spot asked again while waiting ({} refusals)",
        proxy.refused()
    );
    assert!(took >= Duration::from_secs(2), "waited {took:?}");

    // Without the option (the default), on-demand at once.
    let proxy = RefusingProxy::start_with(&moto, vec![spot_full(None)]);
    let mut p = wait(0);
    p = Policy::new(PolicyOptions {
        wait_for_spot: None,
        ..p.options().clone()
    });
    let (workers, _) = launch("nowait", &proxy, p);
    assert!(!workers[0].offer.as_ref().unwrap().spot);
    // Each spot offer asked once before it (and again by the next attempt, after the
    // on-demand worker never registered).
    assert!(proxy.refused() >= spot_offers);
}

/// `Job::launch` itself walks down the ranking past a capacity error: the cheapest offer is
/// refused, the next one is launched and recorded; as no agent registers here (no instance
/// simulator), the launch ends at the provider's boot timeout and the instance is terminated.
#[test]
fn job_launch_moves_past_capacity_errors() {
    let moto = MotoServer::start();
    let proxy = RefusingProxy::start(&moto, &[("t2.micro", "InsufficientInstanceCapacity")]);
    let mut s = settings(&proxy.url(), &["us-east-1"], &["t2.micro", "t2.small"]);
    s.spot = false;
    s.boot_timeout = Duration::from_secs(2);
    let p = AwsProvider::new(s, Catalog::builtin()).unwrap();
    let nats = cedana_tests::NatsServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut job = launch_job("capjob", p, &nats, &rt, dir.path());
    let err = job.launch(&Spec::default()).unwrap_err().to_string();
    assert!(err.contains("did not register within 2 s"), "{err}");
    // The cheapest offer is refused; t2.small is launched and never registers, so it is
    // passed over and the cheapest is asked again (refused again): nothing else is left.
    assert_eq!(
        proxy.refused(),
        2,
        "the cheapest offer was tried before and after"
    );
    assert_eq!(job.record.workers.len(), 1);
    let w = &job.record.workers[0];
    let offer = w.offer.as_ref().unwrap();
    assert_eq!(
        (offer.instance_type.as_str(), offer.spot),
        ("t2.small", false)
    );
    assert_eq!(w.state, "lost");
    let (art, ec2) = ec2_at(&moto.url());
    let v = art
        .block_on(api::describe_instance(
            &ec2.client("us-east-1"),
            &w.instance,
        ))
        .unwrap()
        .unwrap();
    assert_eq!(v.instance_type, "t2.small");
    assert!(
        ["shutting-down", "terminated"].contains(&v.state.as_str()),
        "{v:?}"
    );
}

/// Throttling (`RequestLimitExceeded`) is retried with backoff until the call goes through;
/// still throttled after every attempt, the error says so and what to do, and offers fall back
/// to what the catalog knows.
#[test]
fn throttling_is_retried_then_reported() {
    let moto = MotoServer::start();
    let throttle = |action: &str, times| Refusal {
        action: action.into(),
        instance_type: None,
        code: "RequestLimitExceeded".into(),
        status: 503,
        times,
        spot: None,
    };
    let proxy = RefusingProxy::start_with(
        &moto,
        vec![
            throttle("DescribeInstanceTypes", Some(2)),
            throttle("DescribeSpotPriceHistory", None),
        ],
    );
    let mut s = settings(&proxy.url(), &["us-east-1"], &["t2.micro"]);
    s.connect.max_attempts = 4;
    s.connect.max_backoff = Duration::from_secs(1);
    let p = AwsProvider::new(s, Catalog::builtin()).unwrap();
    let offers = block_on(p.offers(&Spec::default())).unwrap();
    // Instance types came through on the third attempt; spot prices never did, so only the
    // catalog's on-demand price is offered.
    assert_eq!(offers.len(), 1, "{offers:?}");
    assert!(!offers[0].spot && offers[0].instance_type == "t2.micro");
    assert_eq!(
        proxy.refused(),
        2 + 4,
        "2 throttled type listings, 4 spot price attempts"
    );
    assert!(logged().contains("no live spot prices"));

    let (rt, ec2) = ec2_at(&proxy.url());
    let err = rt
        .block_on(prices::spot_quotes(
            &ec2.client("us-east-1"),
            &["t2.micro".to_string()],
            Duration::from_secs(3600),
        ))
        .unwrap_err();
    assert!(matches!(err, AwsError::Throttled { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("DescribeSpotPriceHistory")
            && text.contains("us-east-1")
            && text.contains("try again"),
        "{text}"
    );
}

/// A loopback or missing NATS URL is refused with what to set (cloud machines cannot reach
/// this machine's loopback).
#[test]
fn loopback_nats_is_refused() {
    let moto = MotoServer::start();
    let mut p = AwsProvider::new(
        settings(&moto.url(), &["us-east-1"], &["t2.micro"]),
        Catalog::builtin(),
    )
    .unwrap();
    let offer = block_on(p.offers(&Spec::default())).unwrap().remove(0);
    let rt = tokio::runtime::Runtime::new().unwrap();
    for url in ["nats://127.0.0.1:4222", "nats://localhost:1", ""] {
        let err = block_on(p.launch(&offer, &boot(rt.handle(), "j", "w1", url)))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("connection.nats_url"), "{err}");
    }
    let (art, ec2) = ec2_at(&moto.url());
    let all = art
        .block_on(api::instances_tagged(
            &ec2.client("us-east-1"),
            aws::TAG_JOB,
            "j",
        ))
        .unwrap();
    assert!(all.is_empty(), "nothing was launched: {all:?}");
}

// ---------------------------------------------------------------------------------------------
// Bootstrap and bake calls
// ---------------------------------------------------------------------------------------------

/// The key pair is made once; its private key goes to a new 0600 file and never to the logs;
/// an existing file is never replaced.
#[test]
fn key_pair_is_made_once_and_saved_privately() {
    let moto = MotoServer::start();
    let (rt, ec2) = ec2_at(&moto.url());
    let c = ec2.client("us-east-1");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys").join("cedana.pem");
    let made = rt
        .block_on(aws::ensure_key_pair(&c, "cedana-test", &path))
        .unwrap();
    let KeyPairOutcome::Created {
        path: saved,
        fingerprint,
        ..
    } = &made
    else {
        panic!("not created: {made:?}");
    };
    assert_eq!(saved, &path);
    assert!(!fingerprint.is_empty());
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let dir_mode = std::fs::metadata(path.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700);
    let key = std::fs::read_to_string(&path).unwrap();
    assert!(
        key.starts_with("-----BEGIN RSA PRIVATE KEY-----"),
        "not a PEM key"
    );
    // No line of the key reaches the logs.
    let log = logged();
    assert!(log.contains("key pair created"), "the log was captured");
    for line in key.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!log.contains(line), "private key material reached the logs");
    }
    // Again: it exists, the file is named, nothing is written.
    let again = rt
        .block_on(aws::ensure_key_pair(&c, "cedana-test", &path))
        .unwrap();
    assert!(
        matches!(&again, KeyPairOutcome::Existing { path: Some(p), .. } if p == &path),
        "{again:?}"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), key);
    // A key pair EC2 does not have, with a file already there: refused, file untouched.
    let err = rt
        .block_on(aws::ensure_key_pair(&c, "another", &path))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("another") && err.contains("not replaced"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), key);
}

/// The security group is made once, in the default VPC, and the ports asked for are opened
/// (again: only the missing ones).
#[test]
fn security_group_is_made_once_with_its_ports() {
    let moto = MotoServer::start();
    let (rt, ec2) = ec2_at(&moto.url());
    let c = ec2.client("us-east-1");
    let id = rt
        .block_on(aws::ensure_security_group(
            &c,
            "cedana",
            "Cedana workers",
            &[22],
        ))
        .unwrap();
    assert!(id.starts_with("sg-"));
    let again = rt
        .block_on(aws::ensure_security_group(
            &c,
            "cedana",
            "Cedana workers",
            &[22, 4222],
        ))
        .unwrap();
    assert_eq!(again, id);
    let out = rt
        .block_on(c.describe_security_groups().group_ids(&id).send())
        .unwrap();
    let g = &out.security_groups()[0];
    assert_eq!(g.group_name(), Some("cedana"));
    let mut ports: Vec<i32> = g
        .ip_permissions()
        .iter()
        .filter(|p| p.ip_protocol() == Some("tcp"))
        .filter(|p| {
            p.ip_ranges()
                .iter()
                .any(|r| r.cidr_ip() == Some("0.0.0.0/0"))
        })
        .filter_map(|p| p.from_port())
        .collect();
    ports.sort();
    assert_eq!(ports, [22, 4222]);
}

/// The launch template is made, then given a new default version when it exists.
#[test]
fn launch_template_is_made_then_versioned() {
    let moto = MotoServer::start();
    let (rt, ec2) = ec2_at(&moto.url());
    let c = ec2.client("us-east-1");
    let sg = rt
        .block_on(aws::ensure_security_group(
            &c,
            "cedana",
            "Cedana workers",
            &[22],
        ))
        .unwrap();
    let req = TemplateRequest {
        name: "cedana-worker".into(),
        image_id: AMI.into(),
        instance_type: Some("t3.micro".into()),
        key_name: None,
        security_group_ids: vec![sg.clone()],
        user_data: "#!/bin/sh\nexec /usr/local/bin/cedana-agent daemon\n".into(),
    };
    let id = rt.block_on(aws::ensure_launch_template(&c, &req)).unwrap();
    assert_eq!(
        rt.block_on(aws::find_launch_template(&c, "cedana-worker"))
            .unwrap(),
        Some((id.clone(), 1))
    );
    let v2 = TemplateRequest {
        image_id: "ami-785db401".into(),
        ..req.clone()
    };
    let again = rt.block_on(aws::ensure_launch_template(&c, &v2)).unwrap();
    assert_eq!(again, id);
    assert_eq!(
        rt.block_on(aws::find_launch_template(&c, &id)).unwrap(),
        Some((id.clone(), 2))
    );
    assert_eq!(
        rt.block_on(aws::launch_template_image(&c, &id))
            .unwrap()
            .as_deref(),
        Some("ami-785db401")
    );
    let data = rt
        .block_on(
            c.describe_launch_template_versions()
                .launch_template_id(&id)
                .versions("$Default")
                .send(),
        )
        .unwrap();
    let d = data.launch_template_versions()[0]
        .launch_template_data()
        .unwrap();
    assert_eq!(d.instance_type().map(|t| t.as_str()), Some("t3.micro"));
    assert_eq!(d.security_group_ids(), [sg]);
    let ud = aws::base64_decode(d.user_data().unwrap()).unwrap();
    assert_eq!(String::from_utf8(ud).unwrap(), req.user_data);
    assert_eq!(
        rt.block_on(aws::find_launch_template(&c, "nope")).unwrap(),
        None
    );
}

/// CreateImage of a running instance gives an AMI that becomes available and can boot workers.
#[test]
fn create_image_and_wait_until_available() {
    let moto = MotoServer::start();
    let (rt, ec2) = ec2_at(&moto.url());
    let c = ec2.client("us-east-1");
    let id = rt
        .block_on(aws::run_instance(
            &c,
            &RunRequest {
                image_id: Some(AMI.into()),
                instance_type: "t3.micro".into(),
                user_data: "#cloud-config\n{}\n".into(),
                tags: vec![("Name".into(), "bake".into())],
                ..Default::default()
            },
        ))
        .unwrap();
    rt.block_on(aws::wait_running(&c, &id, Duration::from_secs(30)))
        .unwrap();
    let ami = rt
        .block_on(aws::create_image(
            &c,
            &id,
            "cedana-worker-test",
            "baked by a test",
        ))
        .unwrap();
    assert!(ami.starts_with("ami-"));
    let img = rt
        .block_on(aws::wait_image_available(&c, &ami, Duration::from_secs(60)))
        .unwrap();
    assert_eq!(img.state, "available");
    assert_eq!(img.name.as_deref(), Some("cedana-worker-test"));
    let err = rt
        .block_on(aws::wait_image_available(
            &c,
            "ami-0123456789abcdef0",
            Duration::from_secs(1),
        ))
        .unwrap_err();
    assert!(matches!(err, AwsError::Timeout { .. }), "{err}");
    // The new image boots workers.
    let mut s = settings(&moto.url(), &["us-east-1"], &["t3.micro"]);
    s.image_id = Some(ami.clone());
    let mut p = AwsProvider::new(s, Catalog::builtin()).unwrap();
    let offer = block_on(p.offers(&Spec::default())).unwrap().remove(0);
    let hrt = tokio::runtime::Runtime::new().unwrap();
    let w = block_on(p.launch(
        &offer,
        &boot(hrt.handle(), "img", "w1", "nats://10.77.0.1:4222"),
    ))
    .unwrap();
    let v = rt
        .block_on(aws::describe_instance(&c, &w.instance_id()))
        .unwrap()
        .unwrap();
    assert_eq!(v.image_id.as_deref(), Some(ami.as_str()));
}

/// Errors of the API layer name the call and the region, and a wrong request is refused
/// before anything is sent.
#[test]
fn api_errors_name_call_and_region() {
    let moto = MotoServer::start();
    let (rt, ec2) = ec2_at(&moto.url());
    let c = ec2.client("eu-west-1");
    let err = rt
        .block_on(aws::run_instance(
            &c,
            &RunRequest {
                instance_type: "t3.micro".into(),
                ..Default::default()
            },
        ))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("RunInstances")
            && err.contains("eu-west-1")
            && err.contains("aws.launch_template"),
        "{err}"
    );
    // Nothing listens here: a transport error that names the endpoint settings.
    let dead = cedana_tests::free_port();
    let (rt2, dead_ec2) = ec2_at(&format!("http://127.0.0.1:{dead}"));
    let err = rt2
        .block_on(aws::describe_instance(
            &dead_ec2.client("us-east-1"),
            "i-0123456789abcdef0",
        ))
        .unwrap_err();
    assert!(matches!(err, AwsError::Transport { .. }), "{err}");
    assert!(
        err.to_string().contains("DescribeInstances")
            && err.to_string().contains("AWS_ENDPOINT_URL")
    );
    // An instance EC2 does not know is None, not an error; terminating it is done already.
    assert_eq!(
        rt.block_on(aws::describe_instance(&c, "i-0123456789abcdef0"))
            .unwrap(),
        None
    );
    rt.block_on(aws::terminate(&c, "i-0123456789abcdef0"))
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// The driver binary
// ---------------------------------------------------------------------------------------------

fn driver_config(dir: &std::path::Path, body: &str) -> std::path::PathBuf {
    let path = dir.join("cedana_config.json");
    std::fs::write(&path, body).unwrap();
    path
}

/// `cedana-driver run` with `aws` enabled and no (or a loopback) `connection.nats_url` fails
/// before any instance, saying what to set.
#[test]
fn driver_run_needs_a_reachable_nats_url() {
    let moto = MotoServer::start();
    let state = tempfile::tempdir().unwrap();
    for connection in [
        "",
        r#", "connection": {"nats_url": "127.0.0.1", "nats_port": 4222, "auth_token": "x"}"#,
    ] {
        let config = driver_config(
            state.path(),
            &format!(
                r#"{{"enabled_providers": ["aws"], "aws": {{"enabled_regions": ["us-east-1"], "enabled_instance_families": ["t2"], "launch_template": "caltech-test"}}{connection}}}"#
            ),
        );
        let mut cmd = cedana_tests::driver_cmd(state.path());
        moto.apply_env(&mut cmd);
        let out = cmd
            .env("CEDANA_CONFIG", &config)
            .arg("run")
            .arg(repo_root().join("scripts/examples/counter.rhai"))
            .output()
            .expect("run cedana-driver");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains("connection.nats_url"), "{stderr}");
    }
    let (rt, ec2) = ec2_at(&moto.url());
    let all = rt.block_on(c_instances(&ec2.client("us-east-1"))).unwrap();
    assert!(all.is_empty(), "no instance may be launched: {all:?}");
}

async fn c_instances(c: &aws_sdk_ec2::Client) -> Result<Vec<String>, AwsError> {
    let out = c
        .describe_instances()
        .send()
        .await
        .map_err(|e| api::sdk_error("DescribeInstances", "us-east-1", e))?;
    Ok(out
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter_map(|i| i.instance_id().map(str::to_string))
        .collect())
}

/// A non-loopback address of this machine for the test's NATS server (what the "cloud" would
/// reach): on a veth pair of the test's own (needs root), removed on drop.
struct HostAddress {
    ifname: String,
    addr: std::net::Ipv4Addr,
}

impl HostAddress {
    fn new() -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test makes a network interface: run it as root (CI does)"
        );
        let pid = std::process::id();
        let ifname = format!("cdnaws{}", pid % 100_000);
        let peer = format!("cdnawp{}", pid % 100_000);
        let addr = std::net::Ipv4Addr::new(198, 18, (pid % 250) as u8, 1 + (pid / 250 % 250) as u8);
        let run = |args: &[&str]| {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .expect("ip");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "link", "add", &ifname, "type", "veth", "peer", "name", &peer,
        ]);
        let me = HostAddress { ifname, addr };
        run(&["addr", "add", &format!("{addr}/32"), "dev", &me.ifname]);
        run(&["link", "set", &me.ifname, "up"]);
        run(&["link", "set", &peer, "up"]);
        me
    }
}

impl Drop for HostAddress {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.ifname])
            .status();
    }
}

/// A `cedana-driver run` on `aws` with `RUST_LOG=trace` launches an instance (and, as no agent
/// registers, gives up and terminates it) without AWS keys, the NATS token or user-data in
/// its output.
#[test]
fn driver_logs_hold_no_secrets_and_leave_no_instance() {
    let host = HostAddress::new();
    let addr = host.addr;
    let moto = MotoServer::start();
    let port = cedana_tests::free_port();
    let store = tempfile::tempdir().unwrap();
    let token = "SeCrEtNaTsToKeN-4b7d1e";
    let mut nats = std::process::Command::new("nats-server")
        .args([
            "-js",
            "-a",
            &addr.to_string(),
            "-p",
            &port.to_string(),
            "--auth",
            token,
            "--store_dir",
        ])
        .arg(store.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("nats-server (tools/deps.sh installs it)");
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = Kill(&mut nats);
    wait_until(Duration::from_secs(15), "nats-server", || {
        std::net::TcpStream::connect((addr, port)).is_ok()
    });
    let state = tempfile::tempdir().unwrap();
    let config = driver_config(
        state.path(),
        &format!(
            r#"{{"enabled_providers": ["aws"],
                "aws": {{"enabled_regions": ["us-east-1"], "enabled_instance_families": ["t2.micro"], "image_id": "{AMI}"}},
                "connection": {{"nats_url": "{addr}", "nats_port": {port}, "auth_token": "{token}"}}}}"#
        ),
    );
    let mut cmd = cedana_tests::driver_cmd(state.path());
    moto.apply_env(&mut cmd);
    let out = cmd
        .env("CEDANA_CONFIG", &config)
        .env("RUST_LOG", "trace")
        .env(aws::BOOT_TIMEOUT_ENV, "3")
        .arg("run")
        .arg(repo_root().join("scripts/examples/counter.rhai"))
        .output()
        .expect("run cedana-driver");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "no agent registers, so the job fails: {all}"
    );
    // The run did call EC2 and was traced.
    assert!(
        all.contains("EC2 RunInstances") && all.contains("TRACE"),
        "{all}"
    );
    assert!(
        all.contains("registered") || all.contains("register"),
        "{all}"
    );
    for secret in [SECRET_ACCESS_KEY, ACCESS_KEY_ID, token] {
        assert!(
            !all.contains(secret),
            "{secret} reached the driver's output"
        );
    }
    assert!(
        !all.contains("UserData"),
        "a request body reached the driver's output"
    );
    // No agent registers here: the launch is tried on the next offers (three launches at
    // most), and every instance was terminated when the job failed.
    let (rt, ec2) = ec2_at(&moto.url());
    let c = ec2.client("us-east-1");
    let ids = rt.block_on(c_instances(&c)).unwrap();
    assert!(
        (1..=3).contains(&ids.len()),
        "at most three launches: {ids:?}"
    );
    for id in &ids {
        let v = rt
            .block_on(aws::describe_instance(&c, id))
            .unwrap()
            .unwrap();
        assert!(
            ["shutting-down", "terminated"].contains(&v.state.as_str()),
            "{v:?}"
        );
    }
}
