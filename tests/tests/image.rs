//! The worker image (`images/build.sh`): reproducible to the byte, readable by skopeo and umoci,
//! and runnable with runc, where `cedana-agent check` passes with the image's own CRIU and a task
//! survives a checkpoint round trip inside the container.
//!
//! The image's inputs are the agent under test (it must be the static build) and CRIU from
//! `tools/deps.sh`; these tests fail when those are missing, unless `CEDANA_SKIP_CRIU_TESTS=1`.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cedana_tests::*;
use serde_json::{json, Value};
use sha2::Digest;

const BUILD_LIMIT: Duration = Duration::from_secs(300);
const TOOL_LIMIT: Duration = Duration::from_secs(60);
const ENTRYPOINT: [&str; 2] = ["/usr/local/bin/cedana-agent", "daemon"];

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `cmd` in its own process group with stdout and stderr in files under `dir`; kills the
/// group and panics if it takes longer than `limit`.
fn run_bounded(cmd: &mut Command, dir: &Path, limit: Duration, what: &str) -> Output {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let (out_path, err_path) = (
        dir.join(format!("cmd{n}.out")),
        dir.join(format!("cmd{n}.err")),
    );
    let mut child = cmd
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start {what}: {e} (tools/deps.sh installs what the tests use)")
        });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if start.elapsed() > limit {
            let group = nix::unistd::Pid::from_raw(-(child.id() as i32));
            let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
            panic!(
                "{what} did not finish within {limit:?}; stderr:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = Output {
        status,
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
    };
    let _ = std::fs::remove_file(out_path);
    let _ = std::fs::remove_file(err_path);
    out
}

/// Runs a tool and returns its stdout; panics with its stderr when it fails.
fn tool(cmd: &mut Command, dir: &Path, what: &str) -> String {
    let out = run_bounded(cmd, dir, TOOL_LIMIT, what);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// True when the image's inputs (CRIU from tools/deps.sh, busybox) are here; otherwise panics
/// with what to do, unless CEDANA_SKIP_CRIU_TESTS=1 (then says SKIPPED).
fn image_inputs_ready(test: &str) -> bool {
    let prefix = std::env::var_os("CEDANA_CRIU_PREFIX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/cedana/criu"));
    let missing: Vec<String> = [prefix.join("usr/sbin/criu"), PathBuf::from("/bin/busybox")]
        .into_iter()
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let reason = format!("the image's inputs are missing: {}", missing.join(", "));
    if std::env::var_os("CEDANA_SKIP_CRIU_TESTS").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED {test}: {reason} (CEDANA_SKIP_CRIU_TESTS=1)");
        return false;
    }
    panic!("{test} needs CRIU >= 4.2 and busybox-static: {reason}\nRun tools/deps.sh (the README's test command does), or set CEDANA_SKIP_CRIU_TESTS=1 to skip these tests knowingly.");
}

/// `images/build.sh --agent AGENT --out OUT --json` with every timestamp at `epoch`; its summary.
fn build(sb: &Sandbox, agent: &Path, out: &Path, epoch: u64) -> Value {
    let output = build_raw(sb, agent, out, epoch, &["--json"]);
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "build.sh --json printed no JSON ({e}):\n{}",
            text(&output.stdout)
        )
    })
}

fn build_raw(sb: &Sandbox, agent: &Path, out: &Path, epoch: u64, extra: &[&str]) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("images/build.sh"))
        .arg("--agent")
        .arg(agent)
        .arg("--out")
        .arg(out)
        .args(extra)
        .env("SOURCE_DATE_EPOCH", epoch.to_string());
    let output = run_bounded(&mut cmd, sb.path(), BUILD_LIMIT, "images/build.sh");
    assert!(
        output.status.success(),
        "images/build.sh failed ({}):\n{}{}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
    output
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no string {key} in {v}"))
}

/// The agent under test, as an absolute path (a relative `CEDANA_AGENT_BIN` is taken from the
/// workspace root, where the README's commands run; cargo runs tests in `tests/`).
fn agent_path() -> PathBuf {
    let p = agent_bin();
    if p.is_relative() && !p.exists() {
        repo_root().join(p)
    } else {
        std::fs::canonicalize(&p).unwrap_or(p)
    }
}

/// The first tag: the agent's version.
fn version_tag(summary: &Value) -> String {
    summary["tags"][0].as_str().expect("a tag").to_string()
}

/// `umoci unpack` of the image into `bundle`.
fn unpack(sb: &Sandbox, summary: &Value, bundle: &Path) {
    let image = format!("{}:{}", s(summary, "oci_layout"), version_tag(summary));
    let mut cmd = Command::new("umoci");
    cmd.arg("unpack");
    if !nix::unistd::geteuid().is_root() {
        cmd.arg("--rootless");
    }
    cmd.arg("--image").arg(&image).arg(bundle);
    tool(&mut cmd, sb.path(), "umoci unpack");
}

fn entries(tar_gz: &Path, sb: &Sandbox) -> Vec<String> {
    let listing = tool(
        Command::new("tar")
            .args(["--numeric-owner", "--full-time", "-tvzf"])
            .arg(tar_gz),
        sb.path(),
        "tar -tvzf",
    );
    listing.lines().map(str::to_string).collect()
}

#[test]
fn two_builds_give_the_same_bytes_and_a_changed_agent_changes_the_digest() {
    if !image_inputs_ready("two_builds_give_the_same_bytes_and_a_changed_agent_changes_the_digest")
    {
        return;
    }
    let sb = Sandbox::new();
    let agent = sb.path().join("cedana-agent");
    std::fs::copy(agent_path(), &agent).expect("copy the agent");
    let (one, two) = (sb.path().join("one"), sb.path().join("two"));
    let a = build(&sb, &agent, &one, 0);
    let b = build(&sb, &agent, &two, 0);
    assert!(s(&a, "manifest_digest").starts_with("sha256:"), "{a}");
    assert_eq!(a["manifest_digest"], b["manifest_digest"], "{a}\n{b}");
    assert_eq!(a["config_digest"], b["config_digest"]);
    assert_eq!(a["layers"], b["layers"]);
    // Not only the digests: every file of the layout and the docker archive, byte for byte.
    for rel in ["oci/index.json", "oci/oci-layout", "cedana-worker.tar"] {
        assert!(
            std::fs::read(one.join(rel)).unwrap() == std::fs::read(two.join(rel)).unwrap(),
            "{rel} differs between two builds of the same inputs"
        );
    }
    let blobs = |dir: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(dir.join("oci/blobs/sha256"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(blobs(&one), blobs(&two));
    assert_eq!(blobs(&one).len(), 4, "manifest, config and two layers");

    // Every entry of every layer: owner 0/0 by number, time at the epoch.
    for layer in a["layers"].as_array().unwrap() {
        let blob = one
            .join("oci/blobs/sha256")
            .join(&s(layer, "digest")["sha256:".len()..]);
        for line in entries(&blob, &sb) {
            assert!(
                line.contains(" 0/0 ") && line.contains(" 1970-01-01 00:00:00 "),
                "layer entry not normalised: {line}"
            );
        }
    }

    // The human summary names the same digest.
    let human = build_raw(&sb, &agent, &one, 0, &[]);
    assert!(
        text(&human.stdout).contains(s(&a, "manifest_digest")),
        "{}",
        text(&human.stdout)
    );

    // One more byte in the agent: a different image, with the base layer (CRIU, rootfs) shared.
    let mut bytes = std::fs::read(&agent).unwrap();
    bytes.push(0);
    std::fs::write(&agent, bytes).unwrap();
    let c = build(&sb, &agent, &sb.path().join("three"), 0);
    assert_ne!(a["manifest_digest"], c["manifest_digest"]);
    assert_eq!(
        a["layers"][0], c["layers"][0],
        "base layer should not change"
    );
    assert_ne!(a["layers"][1]["digest"], c["layers"][1]["digest"]);
    assert_ne!(
        a["labels"]["dev.cedana.agent.sha256"],
        c["labels"]["dev.cedana.agent.sha256"]
    );
}

#[test]
fn skopeo_inspects_it_and_umoci_unpacks_it() {
    if !image_inputs_ready("skopeo_inspects_it_and_umoci_unpacks_it") {
        return;
    }
    let sb = Sandbox::new();
    let summary = build(&sb, &agent_path(), &sb.path().join("image"), 0);
    let layout = s(&summary, "oci_layout").to_string();
    let version = version_tag(&summary);
    assert_eq!(summary["tags"], json!([version, "latest"]));

    for tag in [version.as_str(), "latest"] {
        let out = tool(
            Command::new("skopeo")
                .arg("inspect")
                .arg(format!("oci:{layout}:{tag}")),
            sb.path(),
            "skopeo inspect",
        );
        let v: Value = serde_json::from_str(&out).expect("skopeo's JSON");
        assert_eq!(v["Digest"], summary["manifest_digest"], "{out}");
        assert_eq!(v["Labels"]["dev.cedana.agent.version"], json!(version));
        let criu = v["Labels"]["dev.cedana.criu.version"].as_str().unwrap();
        assert!(criu.starts_with("4."), "CRIU {criu} in the image");
        assert_eq!(v["Created"], "1970-01-01T00:00:00Z");
    }
    let config: Value = serde_json::from_str(&tool(
        Command::new("skopeo")
            .args(["inspect", "--config"])
            .arg(format!("oci:{layout}:{version}")),
        sb.path(),
        "skopeo inspect --config",
    ))
    .unwrap();
    assert_eq!(config["config"]["Entrypoint"], json!(ENTRYPOINT));
    assert!(config["config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e.as_str().unwrap().starts_with("PATH=")));
    // The docker archive is readable too, with the same configuration.
    let archive: Value = serde_json::from_str(&tool(
        Command::new("skopeo")
            .arg("inspect")
            .arg(format!("docker-archive:{}", s(&summary, "docker_archive"))),
        sb.path(),
        "skopeo inspect docker-archive",
    ))
    .unwrap();
    assert_eq!(archive["Labels"], summary["labels"]);
    // What `docker load` checks: its tags, and each layer's SHA-256 against the config's diff_ids.
    let unpacked = sb.path().join("docker-archive");
    std::fs::create_dir(&unpacked).unwrap();
    tool(
        Command::new("tar")
            .arg("-xf")
            .arg(s(&summary, "docker_archive"))
            .arg("-C")
            .arg(&unpacked),
        sb.path(),
        "tar -xf docker archive",
    );
    let docker: Value =
        serde_json::from_slice(&std::fs::read(unpacked.join("manifest.json")).unwrap()).unwrap();
    let docker = &docker[0];
    assert_eq!(
        docker["RepoTags"],
        json!([
            format!("cedana-worker:{version}"),
            "cedana-worker:latest".to_string()
        ])
    );
    let docker_config: Value =
        serde_json::from_slice(&std::fs::read(unpacked.join(s(docker, "Config"))).unwrap())
            .unwrap();
    let layers = docker["Layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    for (i, layer) in layers.iter().enumerate() {
        let data = std::fs::read(unpacked.join(layer.as_str().unwrap())).unwrap();
        let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&data)));
        assert_eq!(docker_config["rootfs"]["diff_ids"][i], json!(digest));
    }

    let bundle = sb.path().join("bundle");
    unpack(&sb, &summary, &bundle);
    let rootfs = bundle.join("rootfs");
    assert!(
        std::fs::read(rootfs.join("usr/local/bin/cedana-agent")).unwrap()
            == std::fs::read(agent_path()).unwrap(),
        "the image's agent is not the agent under test"
    );
    let mode = |p: &str| {
        std::fs::symlink_metadata(rootfs.join(p))
            .unwrap_or_else(|e| panic!("{p} is not in the image: {e}"))
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("tmp"), 0o1777);
    assert_eq!(mode("usr/sbin/criu"), 0o755);
    for p in [
        "proc",
        "sys",
        "dev",
        "run",
        "work",
        "var/lib/cedana",
        "etc/passwd",
        "etc/group",
        "etc/ssl/certs/ca-certificates.crt",
        "usr/lib/x86_64-linux-gnu/libc.so.6",
        "bin/sh",
    ] {
        mode(p);
    }
    let loader = std::fs::canonicalize(rootfs.join("lib64/ld-linux-x86-64.so.2")).unwrap();
    assert!(
        loader.starts_with(&rootfs) && loader.is_file(),
        "{loader:?}"
    );
    let runtime: Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
    assert_eq!(runtime["process"]["args"], json!(ENTRYPOINT));
}

/// Turns umoci's bundle into a worker container: `args` run as root with every capability this
/// process holds, its own PID, mount and network namespaces, a writable root and `/proc/sys`
/// (CRIU sets `ns_last_pid`), `/dev/net/tun` (`criu check` opens it), no terminal.
fn make_worker_bundle(bundle: &Path, args: &[&str]) {
    let path = bundle.join("config.json");
    let mut c: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let caps = json!(cedana_driver::providers::local::container::bounding_caps());
    c["process"]["args"] = json!(args);
    c["process"]["terminal"] = json!(false);
    c["process"]["capabilities"] = json!({
        "bounding": caps, "effective": caps, "permitted": caps,
    });
    c["root"]["readonly"] = json!(false);
    c["hostname"] = json!("cedana-worker");
    let linux = &mut c["linux"];
    linux["namespaces"] = json!([
        {"type": "pid"}, {"type": "mount"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}
    ]);
    if let Some(ro) = linux["readonlyPaths"].as_array_mut() {
        ro.retain(|p| p != "/proc/sys");
    }
    linux["devices"] = json!([{
        "path": "/dev/net/tun", "type": "c", "major": 10, "minor": 200,
        "fileMode": 0o666, "uid": 0, "gid": 0
    }]);
    linux["resources"]["devices"] = json!([
        {"allow": false, "access": "rwm"},
        {"allow": true, "type": "c", "major": 10, "minor": 200, "access": "rwm"}
    ]);
    std::fs::write(&path, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
}

/// A runc container with a private state folder; deleted (forced) on drop.
struct Container {
    id: String,
    state: PathBuf,
}

impl Container {
    fn new(sb: &Sandbox, test: &str) -> Self {
        let state = sb.path().join("runc-state");
        std::fs::create_dir_all(&state).unwrap();
        Container {
            id: format!("cedana-{test}-{}", std::process::id()),
            state,
        }
    }
    /// `runc run` in the foreground: the container's output and exit status.
    fn run(&self, sb: &Sandbox, bundle: &Path) -> Output {
        run_bounded(
            Command::new("runc")
                .arg("--root")
                .arg(&self.state)
                .arg("run")
                .arg("--bundle")
                .arg(bundle)
                .arg(&self.id),
            sb.path(),
            Duration::from_secs(120),
            "runc run",
        )
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("runc")
            .arg("--root")
            .arg(&self.state)
            .args(["delete", "--force", &self.id])
            .output();
    }
}

/// True when runc tests can run: root, CRIU working on the host, the image's inputs.
fn runc_ready(test: &str) -> bool {
    criu_ready(test) && image_inputs_ready(test)
}

#[test]
fn agent_check_passes_inside_a_runc_container() {
    if !runc_ready("agent_check_passes_inside_a_runc_container") {
        return;
    }
    let sb = Sandbox::new();
    let summary = build(&sb, &agent_path(), &sb.path().join("image"), 0);
    let bundle = sb.path().join("bundle");
    unpack(&sb, &summary, &bundle);
    make_worker_bundle(&bundle, &["/usr/local/bin/cedana-agent", "check"]);
    let container = Container::new(&sb, "image-check");
    let out = container.run(&sb, &bundle);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "cedana-agent check in the container exited {}:\n{stdout}{}",
        out.status,
        text(&out.stderr)
    );
    let criu = s(&summary["labels"], "dev.cedana.criu.version");
    assert!(
        stdout.contains(&format!("CRIU {criu} at /usr/sbin/criu")),
        "the image's CRIU {criu} is not the one checked:\n{stdout}"
    );
    assert!(stdout.contains("will work"), "{stdout}");
}

#[test]
fn a_task_survives_a_checkpoint_round_trip_inside_the_container() {
    if !runc_ready("a_task_survives_a_checkpoint_round_trip_inside_the_container") {
        return;
    }
    let sb = Sandbox::new();
    let summary = build(&sb, &agent_path(), &sb.path().join("image"), 0);
    let bundle = sb.path().join("bundle");
    unpack(&sb, &summary, &bundle);
    // Everything below runs inside the container, with the image's busybox and CRIU.
    let script = r#"set -e
P=$(cedana-agent exec --log /work/count.log -- sh -c 'i=0; while :; do i=$((i+1)); echo $i; sleep 0.1; done')
while [ "$(wc -l < /work/count.log)" -lt 5 ]; do sleep 0.1; done
A=$(cedana-agent dump -p "$P" -d /work)
wc -l < /work/count.log > /work/at-dump
R=$(cedana-agent restore "$A")
n=$(cat /work/at-dump)
while [ "$(wc -l < /work/count.log)" -lt $((n + 5)) ]; do sleep 0.1; done
kill -9 "$R"
echo "restored $A as $R"
"#;
    make_worker_bundle(&bundle, &["/bin/sh", "-c", script]);
    let container = Container::new(&sb, "image-roundtrip");
    let out = container.run(&sb, &bundle);
    assert!(
        out.status.success(),
        "the round trip in the container failed ({}):\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    let work = bundle.join("rootfs/work");
    let at_dump: usize = std::fs::read_to_string(work.join("at-dump"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let nums = numbers(&work.join("count.log"));
    assert!(nums.len() >= at_dump + 5, "{nums:?} (at dump: {at_dump})");
    assert_unbroken(&nums, "counter checkpointed and restored in the container");
}

/// The counter migration with container workers: each worker boots from the image as a runc
/// container (its own PID, mount and network namespaces), nothing installed at launch, and the
/// task moves between two of them with its state intact.
#[test]
fn a_job_migrates_between_two_container_workers() {
    if !runc_ready("a_job_migrates_between_two_container_workers") {
        return;
    }
    let sb = Sandbox::new();
    let out_dir = sb.path().join("image");
    let summary = build(&sb, &agent_path(), &out_dir, 1);
    let state = sb.path().join("jobs");
    std::fs::create_dir(&state).unwrap();
    let out = driver_cmd(&state)
        .arg("run")
        .arg("--image")
        .arg(s(&summary, "oci_layout"))
        .arg(repo_root().join("scripts/examples/counter.rhai"))
        .output()
        .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "driver failed: {stderr}");
    let nums: Vec<u64> = stdout
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert_eq!(nums.len(), 40, "{stdout}");
    assert_unbroken(&nums, "counter across container workers");
    assert!(stderr.contains("ended with 0 on w2"), "{stderr}");
    let job_dir = std::fs::read_dir(&state)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("job.json").is_file())
        .expect("job folder");
    let record: Value =
        serde_json::from_slice(&std::fs::read(job_dir.join("job.json")).unwrap()).unwrap();
    assert_eq!(
        record["workers"][0]["offer"]["instance_type"], "local-container",
        "{record}"
    );
    // Each worker's root filesystem is the image's, untouched: the agent and CRIU came with it.
    for w in ["w1", "w2"] {
        let rootfs = job_dir
            .join("workers")
            .join(format!("{w}.bundle"))
            .join("rootfs");
        assert!(
            rootfs.join("usr/sbin/criu").is_file(),
            "{}",
            rootfs.display()
        );
        assert!(rootfs.join("usr/local/bin/cedana-agent").is_file());
    }
    // No container outlives the job.
    let list = Command::new("runc")
        .arg("--root")
        .arg(job_dir.join("runc"))
        .args(["list", "-q"])
        .output()
        .unwrap();
    assert!(
        text(&list.stdout).trim().is_empty(),
        "{}",
        text(&list.stdout)
    );
}
