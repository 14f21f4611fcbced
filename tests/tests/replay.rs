//! `cedana-driver replay` as users run it: a folder of traces in the collection's format (made
//! here; the collection itself has no license to copy), the table, `--json`, `--plot`, and
//! bad traces or flags refused with the file and the fix named.

use std::path::Path;
use std::process::{Command, Output};

use cedana_tests::driver_bin;

fn replay(args: &[&str]) -> Output {
    Command::new(driver_bin())
        .arg("replay")
        .args(args)
        .env("CEDANA_CONFIG", "/nonexistent/cedana_config.json")
        .output()
        .expect("run cedana-driver replay")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Writes `<dir>/<folder>/<zone>_<device>.json`.
fn trace(dir: &Path, folder: &str, zone: &str, device: &str, gap: u32, data: &[u32]) {
    let d = dir.join(folder);
    std::fs::create_dir_all(&d).unwrap();
    let body = serde_json::json!({"metadata": {"gap_seconds": gap}, "data": data});
    std::fs::write(d.join(format!("{zone}_{device}.json")), body.to_string()).unwrap();
}

/// Three AWS V100 zones over four days at 5-minute ticks: one always there, one preempted
/// every few hours, one never; and a GCP set.
fn traces(dir: &Path) {
    let ticks = 4 * 24 * 12;
    let steady = vec![1; ticks];
    let flaky: Vec<u32> = (0..ticks).map(|i| u32::from(i % 40 >= 6)).collect();
    let never = vec![0; ticks];
    trace(dir, "aws-01-01-2026", "us-east-1a", "v100_1", 300, &flaky);
    trace(dir, "aws-01-01-2026", "us-east-1b", "v100_1", 300, &steady);
    trace(dir, "aws-01-01-2026", "us-west-2a", "v100_1", 300, &never);
    trace(dir, "gcp-01-01-2026", "us-central1-a", "c3-88", 300, &flaky);
}

#[test]
fn replay_reports_every_policy_as_a_table_json_and_plots() {
    let d = tempfile::tempdir().unwrap();
    traces(d.path());
    let out = replay(&[
        d.path().to_str().unwrap(),
        "--starts",
        "2",
        "--deadline-hours",
        "36",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    for policy in [
        "on-demand",
        "spot-restart",
        "spot-app-checkpoint",
        "driver-before",
        "driver",
        "optimum",
        "lower-bound",
    ] {
        assert!(stdout.contains(policy), "{policy} missing:\n{stdout}");
    }
    assert!(
        stdout.contains("aws-01-01-2026/v100_1 (p3.2xlarge, 3 zones"),
        "{stdout}"
    );
    assert!(
        stdout.contains("gcp-01-01-2026/c3-88 (c3-highcpu-88"),
        "{stdout}"
    );

    let plots = d.path().join("plots");
    let out = replay(&[
        d.path().to_str().unwrap(),
        "--starts",
        "2",
        "--deadline-hours",
        "36",
        "--json",
        "--plot",
        plots.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let sets = v["sets"].as_array().unwrap();
    assert_eq!(sets.len(), 2);
    for set in sets {
        for run in set["runs"].as_array().unwrap() {
            let o = run["outcomes"].as_array().unwrap();
            let cost = |i: usize| o[i]["cost"].as_f64().unwrap();
            // No policy beats the optimum, nor the optimum its lower bound; on-demand is
            // the most any finishing policy should pay here; the deadline holds for the
            // driver and the optimum.
            assert_eq!(
                (&o[5]["policy"], &o[6]["policy"]),
                (&"optimum".into(), &"lower-bound".into())
            );
            for i in 0..5 {
                assert!(
                    cost(i) >= cost(5) - 1e-9,
                    "{} below the optimum: {o:?}",
                    o[i]["policy"]
                );
            }
            assert!(
                cost(5) >= cost(6) - 1e-9,
                "the optimum below its bound: {o:?}"
            );
            assert_eq!(o[5]["met_deadline"], true, "{o:?}");
            assert!(
                cost(4) < cost(0),
                "the driver pays less than on-demand: {o:?}"
            );
            assert_eq!(o[4]["policy"], "driver");
            assert_eq!(o[4]["met_deadline"], true, "{o:?}");
            assert!(o[4]["finished_hours"].as_f64().unwrap() <= 36.0);
        }
    }
    let summary = v["summary"].as_array().unwrap();
    assert_eq!(summary.len(), 7);
    assert_eq!(summary[4]["missed_deadline"], 0);
    for name in ["aws-01-01-2026_v100_1.svg", "gcp-01-01-2026_c3-88.svg"] {
        let svg = std::fs::read_to_string(plots.join(name)).expect(name);
        assert!(svg.starts_with("<svg"), "{name}");
        // A line per policy in each of the two panels.
        assert!(svg.matches("<polyline").count() >= 14, "{name}: {svg:.300}");
        assert!(svg.contains("driver") && svg.contains("optimum"), "{name}");
    }
}

#[test]
fn bad_traces_and_flags_are_refused_naming_them() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("aws-x");
    std::fs::create_dir_all(&f).unwrap();
    std::fs::write(
        f.join("us-east-1a_v100_1.json"),
        r#"{"metadata":{"gap_seconds":60},"data":[1,1,"x"]}"#,
    )
    .unwrap();
    let out = replay(&[d.path().to_str().unwrap()]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("us-east-1a_v100_1.json") && err.contains("not a spot trace"),
        "{err}"
    );

    let huge = d.path().join("aws-y");
    std::fs::create_dir_all(&huge).unwrap();
    let big = huge.join("us-east-1a_v100_1.json");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(65 << 20)
        .unwrap();
    let out = replay(&[big.to_str().unwrap()]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("at most"), "{err}");

    let out = replay(&["/nonexistent/traces"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out.stderr).contains("/nonexistent/traces"));

    traces(d.path());
    for (flags, want) in [
        (
            &["--deadline-hours", "10"][..],
            "at least the job's 24 hours",
        ),
        (&["--job-hours=-1"][..], "--job-hours -1"),
        (&["--starts", "0"][..], "--starts 0"),
        (&["--memory-gib", "NaN"][..], "--memory-gib NaN"),
    ] {
        let mut args = vec![d
            .path()
            .join("aws-01-01-2026")
            .to_str()
            .unwrap()
            .to_string()];
        args.extend(flags.iter().map(|s| s.to_string()));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = replay(&a);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {err}");
        assert!(err.contains(want), "{flags:?}: {err}");
    }
}
