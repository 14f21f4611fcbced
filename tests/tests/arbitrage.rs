//! Prices and arbitrage: `cedana-driver price` over the enabled providers, a running job
//! moving to an offer that became cheaper, and a spot notice sending the task to another offer
//! than the one that was interrupted. The offers are `local` machine types priced in a catalog
//! file (the same file format the cloud providers' on-demand prices come from), so the prices
//! can change while a job runs; the workers are real agent daemons with real CRIU.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cedana_tests::*;

fn example(name: &str) -> PathBuf {
    repo_root().join("scripts/examples").join(name)
}

/// A catalog of two local machine types at these prices per hour.
fn write_catalog(path: &Path, a: f64, b: f64) {
    let entry = |t: &str, p: f64, spot: bool, at: &str| {
        serde_json::json!({
            "provider": "local", "instance_type": t, "region": "local",
            "vcpus": 2, "memory_gb": 2, "price_usd_hour": p, "spot": spot,
            "source": "test prices", "updated_at": at
        })
    };
    let text = serde_json::json!({"entries": [
        entry("local-a", a, false, "2026-11-20T00:00:00Z"),
        entry("local-b", b, true, "2026-11-21T00:00:00Z"),
    ]})
    .to_string();
    // Written whole, then renamed: a driver reading it never sees half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn price(sb: &Sandbox, catalog: &Path, args: &[&str]) -> std::process::Output {
    driver_cmd(sb.path())
        .env("CEDANA_CATALOG", catalog)
        .arg("price")
        .args(args)
        .output()
        .expect("run cedana-driver price")
}

#[test]
fn price_lists_fitting_offers_cheapest_first_with_source_and_age() {
    let sb = Sandbox::new();
    let cat = sb.path().join("catalog.json");
    write_catalog(&cat, 0.30, 0.12);
    let out = price(&sb, &cat, &["--cpu", "2", "--memory", "1.5", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let offers = v["offers"].as_array().expect("offers");
    let types: Vec<&str> = offers
        .iter()
        .map(|o| o["instance_type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["local-b", "local-a"], "{v}");
    assert_eq!(offers[0]["spot"], true);
    assert_eq!(offers[0]["price_usd_hour"], 0.12);
    assert_eq!(offers[0]["price_source"], "catalog: test prices");
    // Age: from the entry's date to now, in seconds.
    let age = offers[1]["age_seconds"].as_u64().expect("age");
    let now = cedana_protocol::now();
    let expected =
        now - cedana_driver::providers::catalog::parse_rfc3339("2026-11-20T00:00:00Z").unwrap();
    assert!(
        age.abs_diff(expected) < 60,
        "age {age}, expected {expected}"
    );
    assert_eq!(v["spec"]["cpu_cores"], 2.0);

    // The table names the same offers in the same order, with market and source.
    let out = price(&sb, &cat, &["--cpu", "2"]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<&str> = table.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(
        rows[0].contains("local-b") && rows[0].contains("spot") && rows[0].contains("0.1200"),
        "{table}"
    );
    assert!(
        rows[1].contains("local-a")
            && rows[1].contains("on-demand")
            && rows[1].contains("test prices"),
        "{table}"
    );

    // --max-price and --limit narrow it.
    let out = price(&sb, &cat, &["--max-price", "0.2", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["offers"].as_array().unwrap().len(), 1, "{v}");
    assert!(
        v["left_out"][0].as_str().unwrap().contains("local-a"),
        "{v}"
    );
    let out = price(&sb, &cat, &["--limit", "1", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["offers"][0]["instance_type"], "local-b", "{v}");
    assert_eq!(v["offers"].as_array().unwrap().len(), 1);
}

#[test]
fn price_says_why_nothing_fits_and_exits_5() {
    let sb = Sandbox::new();
    let cat = sb.path().join("catalog.json");
    write_catalog(&cat, 0.30, 0.12);
    let out = price(&sb, &cat, &["--cpu", "2", "--gpu", "A100:2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("no offer fits --cpu 2 --gpu A100:2"), "{err}");
    assert!(err.contains("local-a: 0 GPUs, 2 wanted"), "{err}");
    assert!(out.stdout.is_empty());

    let out = price(&sb, &cat, &["--gpu", "A100:two"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--gpu \"A100:two\""));

    // A broken catalog is named with line and column, and nothing is offered: no provider
    // could be asked, a config problem (3).
    std::fs::write(&cat, "{\"entries\": [{\"provider\": 1}]}").unwrap();
    let out = price(&sb, &cat, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("no provider could be asked"), "{err}");
    assert!(
        err.contains("catalog.json") && err.contains("line 1"),
        "{err}"
    );
}

fn record_worker<'a>(r: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    r["workers"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["id"] == id))
        .unwrap_or_else(|| panic!("no worker {id} in {r}"))
}

#[test]
fn a_job_moves_when_another_offer_becomes_cheaper_by_the_margin() {
    if !criu_ready("a_job_moves_when_another_offer_becomes_cheaper_by_the_margin") {
        return;
    }
    let sb = Sandbox::new();
    let cat = sb.path().join("catalog.json");
    write_catalog(&cat, 0.10, 0.30);
    let mut d = BackgroundDriver::start_env(
        sb.path(),
        None,
        &[
            "--checkpoint-every",
            "0",
            "--arbitrage-every",
            "1",
            "--arbitrage-margin",
            "20",
        ],
        &example("managed.rhai"),
        &[("CEDANA_CATALOG", cat.as_os_str())],
    );
    let r = d.wait_record(Duration::from_secs(60), "the task running", |r| {
        r["state"] == "running" && r["task"].is_object()
    });
    assert_eq!(
        record_worker(&r, "w1")["offer"]["instance_type"],
        "local-a",
        "{r}"
    );
    // Cheaper, but not by the margin: the job stays.
    write_catalog(&cat, 0.10, 0.09);
    std::thread::sleep(Duration::from_secs(3));
    let r = d.record().unwrap();
    assert_eq!(r["migrations"], 0, "moved for less than the margin: {r}");
    // Now 90 % cheaper: the job moves there.
    write_catalog(&cat, 0.10, 0.01);
    let r = d.wait_record(
        Duration::from_secs(60),
        "the task on the cheaper offer",
        |r| r["migrations"] == 1 && r["task"]["worker"] == "w2",
    );
    assert_eq!(
        record_worker(&r, "w2")["offer"]["instance_type"],
        "local-b",
        "{r}"
    );
    assert_eq!(record_worker(&r, "w1")["state"], "terminated", "{r}");
    assert_eq!(d.wait(Duration::from_secs(120)), Some(0), "{}", d.stderr());
    let nums = numbers_after(&d.stdout(), "--- counter.txt");
    assert_eq!(nums.len(), 60, "{}", d.stdout());
    assert_unbroken(&nums, "the count across the move");
    let r = d.record().unwrap();
    assert_eq!(r["arbitrage_moves"], 1, "{r}");
    assert_eq!(r["recoveries"], 0, "{r}");
    assert!(r["cost_usd"].as_f64().unwrap() > 0.0, "{r}");
    let err = d.stderr();
    assert!(err.contains("local local-b in local (spot) at $0.0100/h is more than 20% cheaper than local local-a in local at $0.1000/h"), "{err}");
}

#[test]
fn a_spot_notice_sends_the_task_to_another_offer() {
    if !criu_ready("a_spot_notice_sends_the_task_to_another_offer") {
        return;
    }
    let sb = Sandbox::new();
    let cat = sb.path().join("catalog.json");
    // The spot offer is the cheapest; after its notice the job goes on-demand.
    write_catalog(&cat, 0.30, 0.10);
    let nats = NatsServer::start();
    let cfg = sb.path().join("cedana_config.json");
    std::fs::write(
        &cfg,
        serde_json::json!({"connection": {"nats_url": nats.url(), "auth_token": nats.token}})
            .to_string(),
    )
    .unwrap();
    let mut d = BackgroundDriver::start_env(
        sb.path(),
        Some(&cfg),
        &["--checkpoint-every", "0"],
        &example("managed.rhai"),
        &[("CEDANA_CATALOG", cat.as_os_str())],
    );
    let r = d.wait_record(Duration::from_secs(60), "the task running", |r| {
        r["state"] == "running" && r["task"].is_object()
    });
    assert_eq!(
        record_worker(&r, "w1")["offer"]["instance_type"],
        "local-b",
        "{r}"
    );
    let job = r["job"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_secs(1));
    publish_spot_notice(&nats, &job, "w1");
    let r = d.wait_record(Duration::from_secs(60), "the task on w2", |r| {
        r["task"]["worker"] == "w2" && r["migrations"] == 1
    });
    assert_eq!(
        record_worker(&r, "w2")["offer"]["instance_type"],
        "local-a",
        "{r}"
    );
    assert_eq!(d.wait(Duration::from_secs(120)), Some(0), "{}", d.stderr());
    let nums = numbers_after(&d.stdout(), "--- counter.txt");
    assert_eq!(nums.len(), 60);
    assert_unbroken(&nums, "the count across the spot move");
}
