//! The Paperspace provider against a fake of Paperspace's public API (`tests/fakes/paperspace.py`).
//!
//! No real Paperspace API can run here; the fake follows the published reference (Bearer key,
//! `{code, message}` errors, `hasMore`/`nextPage` pagination, machines, events, availability,
//! templates, startup scripts) and records every request, so these tests check what the
//! driver sends as much as what it makes of the answers. They need no root and no CRIU.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cedana_driver::job::Spec;
use cedana_driver::providers::catalog::Catalog;
use cedana_driver::providers::paperspace::{
    api_region, Client, PaperspaceProvider, Retry, Settings,
};
use cedana_driver::providers::{ranked, Bootstrap, Offer, Provider, ProviderError};
use cedana_protocol::config::Secret;
use cedana_tests::{python, repo_root, wait_until};
use serde_json::{json, Value};

/// Runs a provider's call to its end on this test binary's runtime (the tests are
/// synchronous, as the job's facade is).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Runtime::new().unwrap())
        .block_on(f)
}

const KEY: &str = "ps-key-8f3a1c0d9e7b";

// ---------------------------------------------------------------------------------------------
// The fake
// ---------------------------------------------------------------------------------------------

/// The fake API on a loopback port; stopped (by its PID) when dropped, and by itself when its
/// stdin closes or its lifetime ends.
struct FakePaperspace {
    child: Child,
    port: u16,
}

impl FakePaperspace {
    fn start() -> Self {
        let script = repo_root().join("tests/fakes/paperspace.py");
        let mut child = Command::new(python())
            .arg(&script)
            .args(["--key", KEY, "--lifetime", "300"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the fake Paperspace API");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the fake's port");
        let port = line.trim().parse().unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("the fake printed {line:?}, not a port")
        });
        FakePaperspace { child, port }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    /// One request to the fake's test controls.
    fn control(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut c = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            c,
            "{method} {path} HTTP/1.1\r\nHost: fake\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer)
            .expect("read the fake's answer");
        let (_, json_body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
        serde_json::from_str(json_body).expect("JSON from the fake")
    }

    fn config(&self, v: Value) {
        self.control("POST", "/_fake/config", Some(v));
    }

    fn requests(&self) -> Vec<Value> {
        self.control("GET", "/_fake/requests", None)
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn state(&self) -> Value {
        self.control("GET", "/_fake/state", None)
    }

    fn machine_state(&self, id: &str) -> Option<String> {
        self.state()["machines"]
            .as_array()?
            .iter()
            .find(|m| m["id"] == id)
            .and_then(|m| m["state"].as_str().map(str::to_string))
    }
}

impl Drop for FakePaperspace {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Requests with this method whose path starts with `path`.
fn sent<'a>(reqs: &'a [Value], method: &str, path: &str) -> Vec<&'a Value> {
    reqs.iter()
        .filter(|r| r["method"] == method && r["path"].as_str().unwrap_or("").starts_with(path))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Everything the driver logs in this test process (all levels), to check no secret is in it.
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
        let buf = Arc::new(Mutex::new(Vec::new()));
        let b = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing_subscriber::filter::LevelFilter::TRACE)
            .with_ansi(false)
            .with_writer(move || W(b.clone()))
            .try_init();
        buf
    })
    .clone()
}

fn logged() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap()).into_owned()
}

fn settings(fake: &FakePaperspace, key: &str) -> Settings {
    let mut s = Settings::new(Secret::new(key));
    s.base_url = fake.url();
    s.regions = vec![api_region("East Coast (NY2)").unwrap().to_string()];
    s.template = Some("tubuntu2204".into());
    s.poll_every = Duration::from_millis(200);
    s.retry = Retry {
        attempts: 4,
        first_wait: Duration::from_millis(100),
        max_wait: Duration::from_secs(5),
    };
    s
}

fn provider(fake: &FakePaperspace) -> PaperspaceProvider {
    logs();
    PaperspaceProvider::new(settings(fake, KEY), Catalog::builtin()).expect("provider")
}

/// A client for the test's own calls (as someone else would use the account).
fn outside_client(fake: &FakePaperspace) -> Client {
    Client::new(&fake.url(), Secret::new(KEY), Retry::default()).unwrap()
}

fn small_spec() -> Spec {
    Spec {
        cpu_cores: Some(2.0),
        memory_gb: Some(4.0),
        ..Default::default()
    }
}

/// The cheapest offer the provider makes for `spec`.
fn cheapest(p: PaperspaceProvider, spec: &Spec) -> (Provider, Offer) {
    let providers: Vec<Provider> = vec![p.into()];
    let (fit, why) = block_on(ranked(&providers, spec));
    let offer = fit
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no offer fits: {why:?}"));
    let p = providers.into_iter().next().unwrap();
    (p, offer)
}

fn catalog_offer(instance_type: &str) -> Offer {
    Catalog::builtin()
        .offers("paperspace", &["ny2".into()])
        .into_iter()
        .find(|o| o.instance_type == instance_type)
        .expect("a catalog entry")
}

struct Boot {
    rt: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    job: String,
    worker: String,
    nats_url: String,
    token: String,
}

impl Boot {
    fn new(worker: &str) -> Self {
        let token = format!(
            "nats-token-{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        );
        Boot {
            rt: tokio::runtime::Runtime::new().unwrap(),
            dir: tempfile::tempdir().unwrap(),
            job: "pspace-job-1a2b3c".into(),
            worker: worker.into(),
            // A machine must reach NATS: not a loopback address.
            nats_url: "nats://nats.example.org:4222".into(),
            token,
        }
    }

    fn get(&self) -> Bootstrap<'_> {
        Bootstrap {
            job: &self.job,
            worker: &self.worker,
            nats_url: &self.nats_url,
            token: &self.token,
            job_dir: self.dir.path(),
            shared_storage: None,
            store: None,
            bucket: None,
            rt: self.rt.handle(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// Offers come from the catalog, only in the enabled regions, priced with their source and
/// date, less the types the API says are not available; availability is asked only for
/// offers that fit, with the API's region names and the key.
#[test]
fn offers_come_from_the_catalog_for_the_enabled_regions() {
    let fake = FakePaperspace::start();
    fake.config(json!({"no_capacity": ["C6"]}));
    let p = provider(&fake);
    let spec = Spec {
        cpu_cores: Some(8.0),
        memory_gb: Some(16.0),
        ..Default::default()
    };
    let offers = block_on(p.offers(&spec)).expect("offers");
    assert!(!offers.is_empty());
    assert!(offers.iter().all(|o| o.region == "ny2"), "{offers:?}");
    assert!(offers.iter().all(|o| o.provider == "paperspace"));
    assert!(offers
        .iter()
        .all(|o| o.price_source.starts_with("catalog: ") && o.priced_at.is_some()));
    assert!(
        !offers.iter().any(|o| o.instance_type == "C6"),
        "C6 has no capacity: {offers:?}"
    );
    // Types the template does not list are not offered either (the fake's template has no
    // P4000).
    assert!(!offers.iter().any(|o| o.instance_type == "P4000"));
    assert!(offers.iter().any(|o| o.instance_type == "A4000"));
    // Offers too small for the spec come back for the ranking to say why.
    assert!(offers.iter().any(|o| o.instance_type == "C4"));

    let reqs = fake.requests();
    assert!(reqs
        .iter()
        .all(|r| r["authorization"] == format!("Bearer {KEY}")));
    let asked = sent(&reqs, "GET", "/v1/machine-availability");
    assert!(!asked.is_empty());
    for r in &asked {
        assert_eq!(r["query"]["region"], "ny2", "{r}");
        let t = r["query"]["machineType"].as_str().unwrap();
        assert!(t != "C4" && t != "C5", "{t} does not fit; no need to ask");
    }

    let (_p, best) = cheapest(p, &spec);
    let cheapest_fitting = Catalog::builtin()
        .offers("paperspace", &["ny2".into()])
        .into_iter()
        .filter(|o| o.misfit(&spec).is_none() && o.instance_type != "C6")
        .filter(|o| o.instance_type != "P4000")
        .map(|o| o.price_usd_hour)
        .fold(f64::INFINITY, f64::min);
    assert_eq!(best.price_usd_hour, cheapest_fitting, "{best:?}");
}

/// Launch makes a startup script that starts the agent for this worker, then a machine from
/// the template with that script; the token is in the script's body and nowhere else, not in
/// the logs either. Terminate deletes the machine and the script.
#[test]
fn launch_sends_the_startup_script_and_terminate_deletes_the_machine() {
    let fake = FakePaperspace::start();
    let (mut p, offer) = cheapest(provider(&fake), &small_spec());
    let boot = Boot::new("w3");
    let mut w = block_on(p.launch(&offer, &boot.get())).expect("launch");
    let id = w.instance_id();
    assert!(id.starts_with("ps"), "{id}");
    assert!(w.local_dir().is_none() && w.netns().is_none());

    let reqs = fake.requests();
    let scripts = sent(&reqs, "POST", "/v1/startup-scripts");
    assert_eq!(scripts.len(), 1);
    let script = scripts[0]["body"]["script"].as_str().unwrap();
    for want in [
        "daemon --job 'pspace-job-1a2b3c' --worker 'w3'",
        "--nats-url 'nats://nats.example.org:4222'",
        "--token-file /var/lib/cedana/nats-token",
        &boot.token,
    ] {
        assert!(script.contains(want), "{want:?} not in {script}");
    }
    assert_eq!(scripts[0]["body"]["isRunOnce"], true);

    let state = fake.state();
    let script_id = state["startupScripts"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let creates = sent(&reqs, "POST", "/v1/machines");
    assert_eq!(creates.len(), 1);
    let body = &creates[0]["body"];
    assert_eq!(body["startupScriptId"], script_id.as_str());
    assert_eq!(body["templateId"], "tubuntu2204");
    assert_eq!(body["region"], "ny2");
    assert_eq!(body["machineType"], offer.instance_type.as_str());
    assert_eq!(body["name"], "cedana-pspace-job-1a2b3c-w3");
    assert_eq!(body["diskSize"], 50);
    assert_eq!(body["startOnCreate"], true);

    // The key on every request, the token in one body only.
    assert!(reqs
        .iter()
        .all(|r| r["authorization"] == format!("Bearer {KEY}")));
    let with_token: Vec<_> = reqs
        .iter()
        .filter(|r| r.to_string().contains(&boot.token))
        .collect();
    assert_eq!(with_token.len(), 1, "{with_token:?}");
    assert_eq!(with_token[0]["path"], "/v1/startup-scripts");

    wait_until(Duration::from_secs(10), "the machine to be ready", || {
        fake.machine_state(&id).as_deref() == Some("ready")
    });
    std::thread::sleep(Duration::from_millis(500));
    let gone = w.gone();
    assert!(!gone.is_set(), "a ready machine is not gone");

    block_on(w.terminate());
    assert!(gone.is_set());
    let reqs = fake.requests();
    assert_eq!(
        sent(&reqs, "DELETE", &format!("/v1/machines/{id}")).len(),
        1
    );
    assert_eq!(
        sent(&reqs, "DELETE", &format!("/v1/startup-scripts/{script_id}")).len(),
        1
    );
    // Terminating twice (or dropping) asks for nothing more.
    block_on(w.terminate());
    drop(w);
    assert_eq!(fake.requests().len(), reqs.len());
    let left = boot
        .rt
        .block_on(outside_client(&fake).list_machines(&[]))
        .unwrap();
    assert!(left.iter().all(|m| m.id != id), "{left:?}");
    assert_eq!(fake.state()["startupScripts"], json!([]));

    let logs = logged();
    assert!(logs.contains("paperspace machine created"), "{logs}");
    assert!(!logs.contains(&boot.token), "the token reached the logs");
    assert!(!logs.contains(KEY), "the API key reached the logs");
}

/// A machine that stops, or is deleted, behind the driver's back is gone; a worker dropped
/// without terminate still deletes its machine.
#[test]
fn machines_stopped_or_deleted_elsewhere_are_gone() {
    let fake = FakePaperspace::start();
    let (mut p, offer) = cheapest(provider(&fake), &small_spec());
    let (b1, b2) = (Boot::new("w1"), Boot::new("w2"));
    let stopped = block_on(p.launch(&offer, &b1.get())).expect("launch w1");
    let deleted = block_on(p.launch(&offer, &b2.get())).expect("launch w2");
    let (s_id, d_id) = (stopped.instance_id(), deleted.instance_id());
    wait_until(Duration::from_secs(10), "both machines ready", || {
        fake.machine_state(&s_id).as_deref() == Some("ready")
            && fake.machine_state(&d_id).as_deref() == Some("ready")
    });
    let outside = outside_client(&fake);
    b1.rt.block_on(outside.stop_machine(&s_id)).expect("stop");
    b1.rt
        .block_on(outside.delete_machine(&d_id))
        .expect("delete");
    let (sg, dg) = (stopped.gone(), deleted.gone());
    wait_until(
        Duration::from_secs(10),
        "the stopped machine to be gone",
        || sg.is_set(),
    );
    wait_until(
        Duration::from_secs(10),
        "the deleted machine to be gone",
        || dg.is_set(),
    );
    // At most one look every poll interval (200 ms) per machine, plus its event.
    let gets = sent(&fake.requests(), "GET", &format!("/v1/machines/{s_id}")).len();
    assert!(gets < 60, "{gets} looks at one machine");

    drop(stopped);
    drop(deleted);
    let reqs = fake.requests();
    assert_eq!(
        sent(&reqs, "DELETE", &format!("/v1/machines/{s_id}")).len(),
        1
    );
    assert_eq!(fake.state()["startupScripts"], json!([]));
}

/// No availability before creating, or a create refused for capacity, is
/// `ProviderError::Capacity` (the driver moves on to the next offer) and leaves nothing behind.
#[test]
fn no_capacity_is_a_capacity_error() {
    let fake = FakePaperspace::start();
    let mut p = provider(&fake);
    let boot = Boot::new("w1");
    let c5 = catalog_offer("C5");

    fake.config(json!({"no_capacity": ["C5"]}));
    match block_on(p.launch(&c5, &boot.get())) {
        Err(ProviderError::Capacity { instance_type, .. }) => assert_eq!(instance_type, "C5"),
        Err(e) => panic!("not a capacity error: {e}"),
        Ok(_) => panic!("launched without capacity"),
    }
    let reqs = fake.requests();
    assert!(sent(&reqs, "POST", "/v1/").is_empty(), "nothing made");

    // The API said yes, then the create was refused: still a capacity error, and the
    // startup script made for it is deleted.
    fake.config(json!({"no_capacity": [], "capacity_race": ["C5"]}));
    let err = match block_on(p.launch(&c5, &boot.get())) {
        Err(e @ ProviderError::Capacity { .. }) => e.to_string(),
        Err(e) => panic!("not a capacity error: {e}"),
        Ok(_) => panic!("launched without capacity"),
    };
    assert!(err.contains("out of capacity"), "{err}");
    let reqs = fake.requests();
    let creates = sent(&reqs, "POST", "/v1/machines");
    assert_eq!(creates.len(), 1);
    assert_eq!(creates[0]["status"], 400);
    assert_eq!(sent(&reqs, "DELETE", "/v1/startup-scripts/").len(), 1);
    assert_eq!(fake.state()["startupScripts"], json!([]));
    assert_eq!(fake.state()["machines"], json!([]));

    // Another type still launches.
    let mut w = block_on(p.launch(&catalog_offer("C7"), &boot.get())).expect("C7");
    block_on(w.terminate());
}

/// Lists are followed page after page with the `nextPage` cursor: the template is found on
/// the last page of custom templates, and every machine is listed.
#[test]
fn lists_follow_the_cursor_across_pages() {
    let fake = FakePaperspace::start();
    fake.config(json!({"page_size": 2}));
    for i in 0..5 {
        fake.control(
            "POST",
            "/_fake/custom-templates",
            Some(json!({"id": format!("tpl{i}"), "name": format!("cedana-worker-{i}")})),
        );
    }
    let mut s = settings(&fake, KEY);
    s.template = Some("cedana-worker-0".into());
    let mut p = PaperspaceProvider::new(s, Catalog::builtin()).unwrap();
    let offers = block_on(p.offers(&small_spec())).expect("offers");
    let reqs = fake.requests();
    let pages = sent(&reqs, "GET", "/v1/custom-templates");
    assert_eq!(pages.len(), 3, "{pages:?}");
    assert_eq!(pages[0]["query"].get("after"), None);
    assert_eq!(pages[1]["query"]["after"], "tpl3");
    assert_eq!(pages[2]["query"]["after"], "tpl1");
    assert!(
        sent(&reqs, "GET", "/v1/os-templates").is_empty(),
        "found among custom ones"
    );

    let boot = Boot::new("w1");
    let c5 = offers.iter().find(|o| o.instance_type == "C5").unwrap();
    let mut w = block_on(p.launch(c5, &boot.get())).expect("launch");
    let creates = sent(&fake.requests(), "POST", "/v1/machines")
        .into_iter()
        .cloned()
        .collect::<Vec<_>>();
    assert_eq!(creates[0]["body"]["templateId"], "tpl0");

    let outside = outside_client(&fake);
    let mut others = Vec::new();
    for i in 0..4 {
        let (m, _) = boot
            .rt
            .block_on(outside.create_machine(
                &cedana_driver::providers::paperspace::CreateMachine {
                    name: format!("other-{i}"),
                    machine_type: "C4".into(),
                    template_id: "tubuntu2204".into(),
                    disk_size: 50,
                    region: "ny2".into(),
                    startup_script_id: None,
                    public_ip_type: "none".into(),
                    start_on_create: false,
                    email_password: false,
                },
            ))
            .expect("create");
        others.push(m.id);
    }
    let mut ids = others.clone();
    ids.push(w.instance_id());
    let before = fake.requests().len();
    let all = boot.rt.block_on(outside.list_machines(&[])).expect("list");
    let mut listed: Vec<String> = all.into_iter().map(|m| m.id).collect();
    listed.sort();
    ids.sort();
    assert_eq!(listed, ids);
    let list_pages = fake.requests()[before..]
        .iter()
        .filter(|r| r["path"] == "/v1/machines" && r["method"] == "GET")
        .count();
    assert_eq!(list_pages, 3);
    block_on(w.terminate());
    for id in &others {
        boot.rt.block_on(outside.delete_machine(id)).unwrap();
    }
}

/// HTTP 429 is retried after the `Retry-After` the server names, a bounded number of times.
#[test]
fn rate_limits_are_waited_out_within_bounds() {
    let fake = FakePaperspace::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let quick = Retry {
        attempts: 3,
        first_wait: Duration::from_millis(50),
        max_wait: Duration::from_secs(5),
    };
    let client = Client::new(&fake.url(), Secret::new(KEY), quick).unwrap();

    fake.config(json!({"rate_limit": {"GET /v1/machines": 1}, "retry_after": "1"}));
    let t = Instant::now();
    rt.block_on(client.list_machines(&[]))
        .expect("list after one 429");
    // The server asked for a second; the client's own first wait is 50 ms.
    assert!(
        t.elapsed() >= Duration::from_millis(950),
        "{:?}",
        t.elapsed()
    );
    let statuses: Vec<Value> = sent(&fake.requests(), "GET", "/v1/machines")
        .iter()
        .map(|r| r["status"].clone())
        .collect();
    assert_eq!(statuses, [json!(429), json!(200)]);

    // Always 429: the client gives up after its attempts, with an error saying so.
    fake.config(json!({"rate_limit": {"POST /v1/startup-scripts": 100}, "retry_after": "0"}));
    let err = rt
        .block_on(client.create_startup_script("s", "echo", true))
        .unwrap_err();
    assert_eq!(err.status(), Some(429));
    assert!(err.to_string().contains("after 3 attempts"), "{err}");
    assert_eq!(
        sent(&fake.requests(), "POST", "/v1/startup-scripts").len(),
        3
    );
}

/// A wrong key is refused with a clear error that names the config key to fix and does not
/// repeat the key, in offers, in launch, in the client and in the logs.
#[test]
fn a_wrong_key_is_a_clear_error_without_the_key() {
    let fake = FakePaperspace::start();
    logs();
    let wrong = "ps-wrong-key-5e6f7a8b9c0d";
    let mut p = PaperspaceProvider::new(settings(&fake, wrong), Catalog::builtin()).unwrap();
    let err = block_on(p.offers(&small_spec())).unwrap_err().to_string();
    assert!(err.contains("paperspace.api_key"), "{err}");
    assert!(err.contains("401") && err.contains("UNAUTHORIZED"), "{err}");
    assert!(!err.contains(wrong), "{err}");

    let providers: Vec<Provider> =
        vec![
            PaperspaceProvider::new(settings(&fake, wrong), Catalog::builtin())
                .unwrap()
                .into(),
        ];
    let (fit, why) = block_on(ranked(&providers, &small_spec()));
    assert!(fit.is_empty());
    assert!(
        why.iter().any(|w| w.contains("paperspace.api_key")),
        "{why:?}"
    );

    let boot = Boot::new("w1");
    let err = match block_on(p.launch(&catalog_offer("C5"), &boot.get())) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("launched with a wrong key"),
    };
    assert!(
        err.contains("paperspace.api_key") && !err.contains(wrong),
        "{err}"
    );

    let client = Client::new(&fake.url(), Secret::new(wrong), Retry::default()).unwrap();
    let err = boot
        .rt
        .block_on(client.get_machine("psnothere"))
        .unwrap_err();
    assert!(err.is_auth());
    assert!(!err.to_string().contains(wrong) && !format!("{err:?}").contains(wrong));
    assert!(!format!("{client:?}").contains(wrong));
    let reqs = fake.requests();
    assert!(reqs.iter().all(|r| r["status"] == 401));
    assert!(reqs
        .iter()
        .all(|r| r["authorization"] == format!("Bearer {wrong}")));
    assert!(!logged().contains(wrong), "the key reached the logs");
}

/// `cedana-driver run` with `paperspace` enabled and no key fails before any worker, naming
/// the config key.
#[test]
fn driver_run_names_the_missing_api_key() {
    let state = tempfile::tempdir().unwrap();
    let config = state.path().join("cedana_config.json");
    std::fs::write(
        &config,
        r#"{"enabled_providers": ["paperspace"], "paperspace": {"enabled_regions": ["East Coast (NY2)"]}}"#,
    )
    .unwrap();
    let out = cedana_tests::driver_cmd(state.path())
        .env("CEDANA_CONFIG", &config)
        .arg("run")
        .arg(repo_root().join("scripts/examples/counter.rhai"))
        .output()
        .expect("run cedana-driver");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("paperspace.api_key"), "{stderr}");
}

/// `down` of a job whose controller died deletes the Paperspace machines its record names,
/// through the API, and says so.
#[test]
fn down_of_an_orphaned_job_deletes_its_machines() {
    let fake = FakePaperspace::start();
    let (mut p, offer) = cheapest(provider(&fake), &small_spec());
    let boot = Boot::new("w1");
    let w = block_on(p.launch(&offer, &boot.get())).expect("launch");
    let id = w.instance_id();
    // The controller died: nothing of it ends the machine.
    std::mem::forget(w);
    wait_until(Duration::from_secs(10), "the machine to be ready", || {
        fake.machine_state(&id).as_deref() == Some("ready")
    });
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("pspace-job-1a2b3c");
    std::fs::create_dir_all(&dir).unwrap();
    let dead = {
        let mut c = Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    };
    std::fs::write(
        dir.join("job.json"),
        json!({
            "v": 1, "job": "pspace-job-1a2b3c", "script": "/x/j.rhai", "state": "running",
            "started_at": 1, "updated_at": 1, "driver_pid": dead,
            "nats_url": "nats://nats.example.org:4222", "embedded_nats": false, "managed": true,
            "workers": [{"id": "w1", "provider": "paperspace", "pid": 0, "dir": "",
                         "launched_at": 1, "state": "running", "instance": id}],
            "task": null, "checkpoints": [], "recoveries": 0, "migrations": 0,
            "cost_usd": 0.0, "exit_code": null, "error": null
        })
        .to_string(),
    )
    .unwrap();
    let config = state.path().join("cedana_config.json");
    std::fs::write(
        &config,
        json!({
            "enabled_providers": ["paperspace"],
            "paperspace": {"api_key": KEY, "enabled_regions": ["East Coast (NY2)"]}
        })
        .to_string(),
    )
    .unwrap();
    let out = cedana_tests::driver_cmd(state.path())
        .env("CEDANA_CONFIG", &config)
        .env("CEDANA_PAPERSPACE_URL", fake.url())
        .env("CEDANA_PAPERSPACE_TEMPLATE", "tubuntu2204")
        .args(["down", "pspace-job-1a2b3c"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains(&format!("machine {id} deleted")), "{said}");
    assert_eq!(
        sent(&fake.requests(), "DELETE", &format!("/v1/machines/{id}")).len(),
        1
    );
    let r: Value = serde_json::from_slice(&std::fs::read(dir.join("job.json")).unwrap()).unwrap();
    assert_eq!(r["state"], "down", "{r}");
}
