//! `cedana-driver bootstrap`: the config file in the original's format, from flags and from
//! answers typed at a terminal (a real pseudo-terminal, with secrets read without echo).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use cedana_tests::*;

fn bootstrap(
    sb: &Sandbox,
    cfg: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> std::process::Output {
    driver_cmd(sb.path())
        .env_remove("PAPERSPACE_API_KEY")
        .envs(env.iter().copied())
        .arg("--config")
        .arg(cfg)
        .arg("bootstrap")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run cedana-driver bootstrap")
}

fn read(cfg: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(cfg).expect("config written")).expect("JSON")
}

#[test]
fn flags_write_the_originals_format_privately_and_a_second_run_keeps_the_rest() {
    let sb = Sandbox::new();
    let cfg = sb.path().join("home/.cedana/cedana_config.json");
    let token = sb.path().join("token");
    std::fs::write(&token, "s3cret-nats-token\n").unwrap();
    let key = sb.path().join("ps-key");
    std::fs::write(&key, "ps-api-key-123\n").unwrap();
    let out = bootstrap(
        &sb,
        &cfg,
        &[
            "--provider",
            "aws",
            "--provider",
            "paperspace",
            "--aws-region",
            "us-east-1",
            "--aws-region",
            "eu-west-1",
            "--aws-family",
            "c5",
            "--aws-launch-template",
            "cedana-worker",
            "--paperspace-api-key-file",
            key.to_str().unwrap(),
            "--nats-url",
            "nats.example.org",
            "--nats-port",
            "4222",
            "--auth-token-file",
            token.to_str().unwrap(),
            "--checkpoint-every",
            "30",
        ],
        &[],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        !text.contains("s3cret") && !text.contains("ps-api-key"),
        "a secret was printed: {text}"
    );
    let mode = std::fs::metadata(&cfg).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "config mode {mode:o}");
    let dir_mode = std::fs::metadata(cfg.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700);
    let v = read(&cfg);
    assert_eq!(
        v["enabled_providers"],
        serde_json::json!(["aws", "paperspace"])
    );
    assert_eq!(
        v["aws"]["enabled_regions"],
        serde_json::json!(["us-east-1", "eu-west-1"])
    );
    assert_eq!(v["aws"]["launch_template_name"], "cedana-worker");
    assert_eq!(v["paperspace"]["api_key"], "ps-api-key-123");
    assert_eq!(v["connection"]["auth_token"], "s3cret-nats-token");
    assert_eq!(v["connection"]["nats_port"], 4222);
    assert_eq!(v["checkpoint"]["heartbeat_interval_seconds"], 30);
    assert_eq!(v["self_serve"], true);
    // The driver loads what was written.
    let c = cedana_driver::Config::load(&cfg).unwrap();
    assert_eq!(
        c.aws.unwrap().launch_template.as_deref(),
        Some("cedana-worker")
    );

    // Again with one change: the rest stays.
    let out = bootstrap(&sb, &cfg, &["--checkpoint-every", "0"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v2 = read(&cfg);
    assert_eq!(v2["checkpoint"]["heartbeat_enabled"], false);
    assert_eq!(v2["aws"], v["aws"]);
    assert_eq!(v2["connection"], v["connection"]);
}

#[test]
fn an_originals_file_is_read_with_its_spelling_and_unknown_keys_kept() {
    let sb = Sandbox::new();
    let cfg = sb.path().join("cedana_config.json");
    std::fs::write(
        &cfg,
        r#"{"self_serve": true, "cedana_managed": true, "enabled_providers": ["aws"],
            "aws": {"enabled_regions": ["us-west-1"], "enabled_instance_families": ["t2"],
                    "ssh_key_path": "/k.pem", "launch_template": "caltech-test"},
            "connection": {"nats_url": "10.0.0.5", "nats_port": 4222, "auth_token": "test"},
            "some_future_key": {"nested": [1, 2, 3]}}"#,
    )
    .unwrap();
    let out = bootstrap(&sb, &cfg, &["--aws-family", "g5", "--json"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json");
    assert_eq!(printed["enabled_providers"], serde_json::json!(["aws"]));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("\"test\""));
    let v = read(&cfg);
    assert_eq!(v["aws"]["launch_template"], "caltech-test");
    assert!(v["aws"].get("launch_template_name").is_none());
    assert_eq!(
        v["aws"]["enabled_instance_families"],
        serde_json::json!(["g5"])
    );
    assert_eq!(v["some_future_key"]["nested"], serde_json::json!([1, 2, 3]));
    assert_eq!(v["cedana_managed"], true);
}

#[test]
fn bad_answers_are_refused_and_the_file_is_left_alone() {
    let sb = Sandbox::new();
    let cfg = sb.path().join("cedana_config.json");
    let before =
        r#"{"enabled_providers": ["local"], "connection": {"nats_url": "", "auth_token": ""}}"#;
    std::fs::write(&cfg, before).unwrap();
    // A cloud provider without a NATS server the workers reach.
    let out = bootstrap(&sb, &cfg, &["--provider", "aws"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--nats-url"));
    // ... or with one on loopback, which cloud workers cannot reach.
    let out = bootstrap(
        &sb,
        &cfg,
        &[
            "--provider",
            "aws",
            "--nats-url",
            "127.0.0.1",
            "--generate-token",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
    // An SSH key that is not there.
    let out = bootstrap(
        &sb,
        &cfg,
        &[
            "--provider",
            "aws",
            "--nats-url",
            "n.example.org",
            "--generate-token",
            "--aws-ssh-key",
            "/nonexistent/key.pem",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/key.pem"));
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), before);
    // An unknown provider.
    let out = bootstrap(&sb, &cfg, &["--provider", "gcp"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"gcp\""));
    // Paperspace with no key anywhere.
    let out = bootstrap(
        &sb,
        &cfg,
        &[
            "--provider",
            "paperspace",
            "--nats-url",
            "n.example.org",
            "--generate-token",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PAPERSPACE_API_KEY"));
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), before);
    // ... and from the environment it is taken.
    let out = bootstrap(
        &sb,
        &cfg,
        &[
            "--provider",
            "paperspace",
            "--nats-url",
            "n.example.org",
            "--generate-token",
        ],
        &[("PAPERSPACE_API_KEY", "from-env-key")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = read(&cfg);
    assert_eq!(v["paperspace"]["api_key"], "from-env-key");
    assert_eq!(
        v["connection"]["auth_token"].as_str().unwrap().len(),
        64,
        "generated token"
    );
    // A config that is not JSON is named and not overwritten.
    std::fs::write(&cfg, "{ not json").unwrap();
    let out = bootstrap(&sb, &cfg, &["--checkpoint-every", "5"], &[]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cedana_config.json"));
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), "{ not json");
}

/// Answers prompts on a real pseudo-terminal, one at a time, and returns what the terminal
/// showed.
const PTY_DRIVER: &str = r#"
import os, pty, sys, time, select
argv = sys.argv[1:]
answers = [("Providers", "local,paperspace"), ("Paperspace API key", "typed-secret-key"),
           ("Paperspace regions", ""), ("SSH private key", ""),
           ("Paperspace template", "cedana-worker-tpl"), ("NATS server", "nats.example.org"),
           ("NATS token", ""), ("Seconds between checkpoints", "15")]
pid, fd = pty.fork()
if pid == 0:
    os.execvp(argv[0], argv)
seen = b""
deadline = time.time() + 30
def waiting(prompt):
    # The whole prompt, up to the ": " it ends with, before answering.
    last = seen.split(b"\n")[-1]
    return not (prompt.encode() in last and last.rstrip(b" ").endswith(b":"))
for prompt, answer in answers:
    while waiting(prompt) and time.time() < deadline:
        r, _, _ = select.select([fd], [], [], 0.5)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    time.sleep(0.2)
    os.write(fd, (answer + "\n").encode())
while time.time() < deadline:
    try:
        chunk = os.read(fd, 4096)
    except OSError:
        break
    if not chunk:
        break
    seen += chunk
# A prompt never answered leaves the program waiting: it is ended, and the test fails.
status = None
for _ in range(25):
    done, st = os.waitpid(pid, os.WNOHANG)
    if done:
        status = st
        break
    time.sleep(0.2)
if status is None:
    os.kill(pid, 9)
    _, status = os.waitpid(pid, 0)
sys.stdout.write(seen.decode(errors="replace"))
sys.exit(os.waitstatus_to_exitcode(status))
"#;

#[test]
fn a_terminal_is_asked_and_secrets_are_not_echoed() {
    let sb = Sandbox::new();
    let cfg = sb.path().join("cedana_config.json");
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(PTY_DRIVER)
        .arg(driver_bin())
        .arg("--config")
        .arg(&cfg)
        .arg("bootstrap")
        .env("CEDANA_STATE_DIR", sb.path())
        .env_remove("PAPERSPACE_API_KEY")
        .output()
        .expect("python3");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{shown}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        shown.contains("Providers to use (local, aws, paperspace) [local]: "),
        "{shown}"
    );
    assert!(shown.contains("generated a NATS token"), "{shown}");
    assert!(
        !shown.contains("typed-secret-key"),
        "the API key was echoed: {shown}"
    );
    // The ordinary answers were echoed as typed.
    assert!(shown.contains("local,paperspace"), "{shown}");
    let v = read(&cfg);
    assert_eq!(
        v["enabled_providers"],
        serde_json::json!(["local", "paperspace"])
    );
    assert_eq!(v["paperspace"]["api_key"], "typed-secret-key");
    assert_eq!(
        v["paperspace"]["enabled_regions"],
        serde_json::json!(["East Coast (NY2)"])
    );
    assert_eq!(v["checkpoint"]["heartbeat_interval_seconds"], 15);
    assert_eq!(v["paperspace"]["template"], "cedana-worker-tpl");
    // It ends with what to do next, the token not shown.
    assert!(
        shown.contains("next:") && shown.contains("nats-server --jetstream"),
        "{shown}"
    );
    let token = v["connection"]["auth_token"].as_str().unwrap();
    assert_eq!(token.len(), 64);
    assert!(!shown.contains(token), "the token was shown");
}
