//! `cedana-driver bootstrap`: writes `~/.cedana/cedana_config.json` in the original Cedana's
//! format, from answers given as flags or at prompts on a terminal.
//!
//! An existing file is read first (the original's own files included, with either spelling of
//! the launch template key) and its values are the defaults; keys this command does not ask
//! about (including ones it does not know) are kept as they were. The file is written whole
//! and renamed into place, readable by its owner only, since it holds the NATS token and the
//! Paperspace API key. Secrets are never taken as flag values (they would show in `ps` and in
//! shell history): the Paperspace key comes from `$PAPERSPACE_API_KEY`, a file or a prompt
//! that does not echo, and a NATS token can be generated.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use cedana_protocol::config::Secret;
use serde_json::{json, Map, Value};

/// Errors of `bootstrap`.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a config file bootstrap can update: {message}; fix or move it first")]
    Invalid { path: PathBuf, message: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {message}")]
    Answer { what: String, message: String },
    #[error("reading the answer to {question:?}: {source}")]
    Prompt {
        question: String,
        source: std::io::Error,
    },
}

/// What the config will hold. `None` keeps what the existing file has.
#[derive(Clone, Debug, Default)]
pub struct Answers {
    pub providers: Option<Vec<String>>,
    pub aws_regions: Option<Vec<String>>,
    pub aws_families: Option<Vec<String>>,
    pub aws_ssh_key_path: Option<PathBuf>,
    pub aws_launch_template: Option<String>,
    pub paperspace_api_key: Option<Secret>,
    pub paperspace_ssh_key_path: Option<PathBuf>,
    pub paperspace_regions: Option<Vec<String>>,
    pub paperspace_template: Option<String>,
    pub nats_url: Option<String>,
    pub nats_port: Option<u16>,
    pub auth_token: Option<Secret>,
    pub checkpoint_interval: Option<u64>,
    pub shared_storage: Option<PathBuf>,
}

/// Providers this driver knows.
pub const PROVIDERS: [&str; 3] = ["local", "aws", "paperspace"];

/// Reads the config at `path` as JSON (an empty object when there is none) and checks that the
/// driver can load it.
pub fn read_existing(path: &Path) -> Result<Value, BootstrapError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(json!({})),
        Err(source) => {
            return Err(BootstrapError::Read {
                path: path.into(),
                source,
            })
        }
    };
    cedana_protocol::Config::parse(&text, path).map_err(|e| BootstrapError::Invalid {
        path: path.into(),
        message: e.to_string(),
    })?;
    let v: Value = serde_json::from_str(&text).map_err(|e| BootstrapError::Invalid {
        path: path.into(),
        message: e.to_string(),
    })?;
    if !v.is_object() {
        return Err(BootstrapError::Invalid {
            path: path.into(),
            message: "the top level is not a JSON object".into(),
        });
    }
    Ok(v)
}

fn block<'a>(v: &'a mut Value, key: &str) -> &'a mut Map<String, Value> {
    let obj = v.as_object_mut().expect("the config is an object");
    let slot = obj.entry(key).or_insert_with(|| json!({}));
    if !slot.is_object() {
        *slot = json!({});
    }
    slot.as_object_mut().expect("just made an object")
}

fn strings(v: &[String]) -> Value {
    Value::Array(v.iter().map(|s| Value::String(s.clone())).collect())
}

/// The config with `a` applied, in the original's layout: every block the original wrote is
/// there, unknown keys are kept.
pub fn apply(mut v: Value, a: &Answers) -> Value {
    {
        let top = v.as_object_mut().expect("the config is an object");
        top.entry("self_serve").or_insert(json!(true));
        top.entry("cedana_managed").or_insert(json!(false));
        if let Some(p) = &a.providers {
            top.insert("enabled_providers".into(), strings(p));
        }
        top.entry("enabled_providers").or_insert(json!(["local"]));
    }
    {
        let c = block(&mut v, "checkpoint");
        if let Some(s) = a.checkpoint_interval {
            c.insert("heartbeat_enabled".into(), json!(s > 0));
            c.insert("heartbeat_interval_seconds".into(), json!(s.max(1)));
        }
        c.entry("heartbeat_enabled").or_insert(json!(true));
        c.entry("heartbeat_interval_seconds").or_insert(json!(60));
    }
    {
        let s = block(&mut v, "shared_storage");
        if let Some(dir) = &a.shared_storage {
            let d = json!(dir.display().to_string());
            s.insert("mount_point".into(), d.clone());
            s.insert("dump_storage_dir".into(), d);
        }
        s.entry("mount_point").or_insert(json!(""));
        s.entry("dump_storage_dir").or_insert(json!(""));
    }
    let uses = |name: &str, v: &Value| {
        v["enabled_providers"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|p| p.as_str() == Some(name)))
    };
    if uses("aws", &v) || v.get("aws").is_some() {
        let aws = block(&mut v, "aws");
        if let Some(r) = &a.aws_regions {
            aws.insert("enabled_regions".into(), strings(r));
        }
        if let Some(f) = &a.aws_families {
            aws.insert("enabled_instance_families".into(), strings(f));
        }
        if let Some(p) = &a.aws_ssh_key_path {
            aws.insert("ssh_key_path".into(), json!(p.display().to_string()));
        }
        // The original wrote `launch_template_name` (its documentation says `launch_template`):
        // an existing key keeps its spelling.
        let lt_key = if aws.contains_key("launch_template") {
            "launch_template"
        } else {
            "launch_template_name"
        };
        if let Some(t) = &a.aws_launch_template {
            aws.insert(lt_key.into(), json!(t));
        }
        aws.entry("enabled_regions").or_insert(json!(["us-east-1"]));
        aws.entry("enabled_instance_families")
            .or_insert(json!(["t3", "m5", "c5"]));
        aws.entry("ssh_key_path").or_insert(json!(""));
        aws.entry(lt_key).or_insert(json!(""));
    }
    if uses("paperspace", &v) || v.get("paperspace").is_some() {
        let ps = block(&mut v, "paperspace");
        if let Some(k) = &a.paperspace_api_key {
            ps.insert("api_key".into(), json!(k.expose()));
        }
        if let Some(p) = &a.paperspace_ssh_key_path {
            ps.insert("ssh_key_path".into(), json!(p.display().to_string()));
        }
        if let Some(r) = &a.paperspace_regions {
            ps.insert("enabled_regions".into(), strings(r));
        }
        if let Some(t) = a
            .paperspace_template
            .as_ref()
            .filter(|t| !t.trim().is_empty())
        {
            ps.insert("template".into(), json!(t));
        }
        ps.entry("api_key").or_insert(json!(""));
        ps.entry("ssh_key_path").or_insert(json!(""));
        ps.entry("enabled_regions")
            .or_insert(json!(["East Coast (NY2)"]));
    }
    {
        let c = block(&mut v, "connection");
        if let Some(u) = &a.nats_url {
            c.insert("nats_url".into(), json!(u));
        }
        if let Some(p) = a.nats_port {
            c.insert("nats_port".into(), json!(p));
        }
        if let Some(t) = &a.auth_token {
            c.insert("auth_token".into(), json!(t.expose()));
        }
        c.entry("nats_url").or_insert(json!(""));
        c.entry("nats_port").or_insert(json!(4222));
        c.entry("auth_token").or_insert(json!(""));
    }
    v
}

/// Checks what a user would regret only later: known providers, a token for a configured
/// NATS server, an API key for Paperspace.
pub fn check(v: &Value, path: &Path) -> Result<cedana_protocol::Config, BootstrapError> {
    let text = serde_json::to_string_pretty(v).expect("serializes");
    let config =
        cedana_protocol::Config::parse(&text, path).map_err(|e| BootstrapError::Invalid {
            path: path.into(),
            message: e.to_string(),
        })?;
    for p in &config.enabled_providers {
        if !PROVIDERS.contains(&p.to_lowercase().as_str()) {
            return Err(BootstrapError::Answer {
                what: format!("provider {p:?}"),
                message: format!("not one this driver has ({})", PROVIDERS.join(", ")),
            });
        }
    }
    let uses = |name: &str| {
        config
            .enabled_providers
            .iter()
            .any(|p| p.eq_ignore_ascii_case(name))
    };
    if uses("paperspace")
        && config
            .paperspace
            .as_ref()
            .is_none_or(|p| p.api_key.is_empty())
    {
        return Err(BootstrapError::Answer {
            what: "paperspace.api_key".into(),
            message: "Paperspace is enabled without an API key; set $PAPERSPACE_API_KEY or give --paperspace-api-key-file".into(),
        });
    }
    if !config.connection.nats_url.trim().is_empty() && config.connection.auth_token.is_empty() {
        return Err(BootstrapError::Answer {
            what: "connection.auth_token".into(),
            message: "a NATS server without a token is open to anyone who reaches it; give --auth-token-file or --generate-token".into(),
        });
    }
    if uses("aws") || uses("paperspace") {
        let c = &config.connection;
        if let Err(message) = cloud_nats(&c.nats_url, c.nats_port) {
            return Err(BootstrapError::Answer {
                what: "connection.nats_url".into(),
                message,
            });
        }
    }
    Ok(config)
}

/// The answers given now (flags, prompts) checked on their own: an SSH key named must exist.
/// Values the config file already had are not (it may come from another machine, and `run`
/// needs no SSH key).
pub fn check_answers(a: &Answers) -> Result<(), BootstrapError> {
    let keys = [
        ("aws.ssh_key_path", &a.aws_ssh_key_path),
        ("paperspace.ssh_key_path", &a.paperspace_ssh_key_path),
    ];
    for (what, key) in keys {
        if let Some(k) = key {
            ssh_key(&k.display().to_string()).map_err(|message| BootstrapError::Answer {
                what: what.into(),
                message,
            })?;
        }
    }
    Ok(())
}

/// Whether `url` (with `port`) is a NATS server cloud workers can reach: given, and not a
/// loopback address.
pub fn cloud_nats(url: &str, port: Option<u16>) -> Result<(), String> {
    let full = cedana_protocol::NatsUrl::from_config(url, port).to_string();
    if url.trim().is_empty() {
        return Err("cloud workers need a NATS server they can reach; give --nats-url (see README, \"Running on a cloud\")".into());
    }
    if crate::providers::loopback_only(&full) {
        return Err(format!("{full} is a loopback address: cloud workers cannot reach it; give the address they reach this server at"));
    }
    Ok(())
}

/// Whether `path` (empty: none) is an SSH private key file that exists.
pub fn ssh_key(path: &str) -> Result<(), String> {
    if path.trim().is_empty() {
        return Ok(());
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(format!("{path} is not a file; give the private key file")),
        Err(e) => Err(format!("{path}: {e}; give an existing private key file (`bootstrap --aws-create` makes one for AWS)")),
    }
}

/// What to do after `bootstrap` for `config` (written at `path`), one line each.
pub fn next_steps(config: &cedana_protocol::Config, path: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let uses = |name: &str| {
        config
            .enabled_providers
            .iter()
            .any(|p| p.eq_ignore_ascii_case(name))
    };
    let c = &config.connection;
    let account = matches!(
        cedana_protocol::NatsCredential::parse(&c.auth_token),
        cedana_protocol::NatsCredential::Account { .. }
    );
    if !c.nats_url.trim().is_empty() && account {
        let port = c.nats_port.unwrap_or(4222);
        out.push(format!(
            "start the NATS server the workers reach with the operator and account: nats-server --jetstream --port {port} -c {} (or include that file in your server's config)",
            nats_account_conf(path).display()
        ));
    } else if !c.nats_url.trim().is_empty() {
        let port = c.nats_port.unwrap_or(4222);
        out.push(format!(
            "start the NATS server the workers reach, with the token from the config: nats-server --jetstream --port {port} --auth \"$(jq -r .connection.auth_token {})\"",
            path.display()
        ));
    }
    if uses("aws") {
        let aws = config.aws.clone().unwrap_or_default();
        let template = aws
            .launch_template
            .as_deref()
            .is_some_and(|t| !t.trim().is_empty());
        if !template && aws.image_id.is_none() {
            out.push("AWS has no launch template yet: make the worker image with `cedana-driver bake --base-image AMI` (or `bootstrap --aws-create --aws-image AMI`)".into());
        }
    }
    if uses("paperspace")
        && config
            .paperspace
            .as_ref()
            .is_none_or(|p| p.template.is_none())
        && std::env::var(crate::providers::paperspace::TEMPLATE_ENV).is_err()
    {
        out.push("Paperspace has no template yet: give `--paperspace-template ID` (a custom template with cedana-agent installed)".into());
    }
    out.push("check what is usable from here: cedana-driver check".into());
    out
}

/// Writes `v` to `path`: whole, then renamed into place, mode 0600 in a 0700 folder.
pub fn write(path: &Path, v: &Value) -> Result<(), BootstrapError> {
    let text = serde_json::to_string_pretty(v).expect("serializes") + "\n";
    write_file(path, text.as_bytes(), 0o600)
}

/// Writes `bytes` to `path` whole, then renamed into place, with `mode`; its folder is made
/// (0700) if missing.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), BootstrapError> {
    use std::os::unix::fs::DirBuilderExt;
    let err = |source| BootstrapError::Write {
        path: path.into(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)?;
    }
    crate::util::write_atomic(path, bytes, mode).map_err(err)
}

/// A fresh NATS token: 32 random bytes, hex.
pub fn generate_token() -> Result<Secret, BootstrapError> {
    cedana_protocol::random_hex(32)
        .map(Secret::new)
        .map_err(|source| BootstrapError::Read {
            path: cedana_protocol::ids::RANDOM_SOURCE.into(),
            source,
        })
}

/// The file of a NATS server's operator and account, beside the config at `config`.
pub fn nats_account_conf(config: &Path) -> PathBuf {
    config
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
        .join(NATS_ACCOUNT_CONF)
}

/// Its name.
pub const NATS_ACCOUNT_CONF: &str = "nats-account.conf";

/// A new NATS operator and account for a server the user runs: the account's seed (the
/// driver's credential), where the server's part goes (beside the config at `config`), and
/// that part.
pub fn nats_account(config: &Path) -> Result<(Secret, PathBuf, String), BootstrapError> {
    let (trust, key) = cedana_protocol::jwt::new_operator_and_account("cedana").map_err(|e| {
        BootstrapError::Answer {
            what: "--nats-account".into(),
            message: e.to_string(),
        }
    })?;
    let seed = key.seed().map_err(|e| BootstrapError::Answer {
        what: "--nats-account".into(),
        message: e.to_string(),
    })?;
    let conf = cedana_protocol::jwt::server_config(&trust);
    Ok((Secret::new(seed), nats_account_conf(config), conf))
}

/// Reads a secret from the first line of `path`.
pub fn secret_from_file(path: &Path) -> Result<Secret, BootstrapError> {
    let text = std::fs::read_to_string(path).map_err(|source| BootstrapError::Read {
        path: path.into(),
        source,
    })?;
    let s = text.lines().next().unwrap_or("").trim().to_string();
    if s.is_empty() {
        return Err(BootstrapError::Answer {
            what: path.display().to_string(),
            message: "the file is empty; it should hold the secret on its first line".into(),
        });
    }
    Ok(Secret::new(s))
}

/// Questions on a terminal.
pub struct Prompter<R: BufRead, W: Write> {
    pub input: R,
    pub output: W,
    /// Whether secrets are read with echo off (a real terminal on stdin).
    pub hide_secrets: bool,
}

impl<R: BufRead, W: Write> Prompter<R, W> {
    fn line(&mut self, question: &str) -> Result<String, BootstrapError> {
        let _ = self.output.flush();
        let mut s = String::new();
        let n = self
            .input
            .read_line(&mut s)
            .map_err(|source| BootstrapError::Prompt {
                question: question.into(),
                source,
            })?;
        if n == 0 {
            return Err(BootstrapError::Prompt {
                question: question.into(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "input ended; give the answers as flags instead (see --help)",
                ),
            });
        }
        Ok(s.trim().to_string())
    }

    /// Asks `question`; an empty answer takes `default`.
    pub fn ask(&mut self, question: &str, default: &str) -> Result<String, BootstrapError> {
        if default.is_empty() {
            let _ = write!(self.output, "{question}: ");
        } else {
            let _ = write!(self.output, "{question} [{default}]: ");
        }
        let a = self.line(question)?;
        Ok(if a.is_empty() { default.to_string() } else { a })
    }

    /// Asks until the answer passes `check` (whose error is said before asking again), five
    /// times at most; the answers given before are kept either way.
    pub fn ask_valid(
        &mut self,
        question: &str,
        default: &str,
        check: impl Fn(&str) -> Result<(), String>,
    ) -> Result<String, BootstrapError> {
        let mut last = String::new();
        for _ in 0..5 {
            let a = self.ask(question, default)?;
            match check(&a) {
                Ok(()) => return Ok(a),
                Err(why) => {
                    let _ = writeln!(self.output, "  {why}");
                    last = why;
                }
            }
        }
        Err(BootstrapError::Answer {
            what: question.into(),
            message: last,
        })
    }

    /// Asks for a comma-separated list.
    pub fn ask_list(
        &mut self,
        question: &str,
        default: &[String],
    ) -> Result<Vec<String>, BootstrapError> {
        let a = self.ask(question, &default.join(","))?;
        Ok(a.split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect())
    }

    /// Asks for a secret without echoing it; an empty answer keeps the current one.
    pub fn ask_secret(
        &mut self,
        question: &str,
        have: bool,
    ) -> Result<Option<Secret>, BootstrapError> {
        let hint = if have { " [keep the current one]" } else { "" };
        let _ = write!(self.output, "{question}{hint}: ");
        let echo = self.hide_secrets.then(no_echo);
        let a = self.line(question);
        drop(echo);
        if self.hide_secrets {
            let _ = writeln!(self.output);
        }
        let a = a?;
        Ok((!a.is_empty()).then(|| Secret::new(a)))
    }
}

/// Terminal echo off on stdin until dropped.
struct NoEcho(Option<nix::sys::termios::Termios>);

fn no_echo() -> NoEcho {
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    let stdin = std::io::stdin();
    let Ok(saved) = tcgetattr(&stdin) else {
        return NoEcho(None);
    };
    let mut t = saved.clone();
    t.local_flags.remove(LocalFlags::ECHO);
    let _ = tcsetattr(&stdin, SetArg::TCSANOW, &t);
    NoEcho(Some(saved))
}

impl Drop for NoEcho {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                t,
            );
        }
    }
}

/// Fills what flags left open by asking, with the existing config's values as defaults.
pub fn interview<R: BufRead, W: Write>(
    p: &mut Prompter<R, W>,
    existing: &Value,
    mut a: Answers,
) -> Result<Answers, BootstrapError> {
    let list = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|xs| {
                xs.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let text = |v: &Value| v.as_str().unwrap_or("").to_string();
    let _ = writeln!(
        p.output,
        "Cedana setup: answers go to the config file; Enter keeps the value in brackets."
    );
    if a.providers.is_none() {
        let current = list(&existing["enabled_providers"]);
        let default = if current.is_empty() {
            vec!["local".to_string()]
        } else {
            current
        };
        a.providers = Some(p.ask_list(
            &format!("Providers to use ({})", PROVIDERS.join(", ")),
            &default,
        )?);
    }
    let providers = a.providers.clone().unwrap_or_default();
    let uses = |n: &str| providers.iter().any(|p| p.eq_ignore_ascii_case(n));
    if uses("aws") {
        let aws = &existing["aws"];
        if a.aws_regions.is_none() {
            let mut d = list(&aws["enabled_regions"]);
            if d.is_empty() {
                d = vec!["us-east-1".into()];
            }
            a.aws_regions = Some(p.ask_list("AWS regions", &d)?);
        }
        if a.aws_families.is_none() {
            let mut d = list(&aws["enabled_instance_families"]);
            if d.is_empty() {
                d = vec!["t3".into(), "m5".into(), "c5".into()];
            }
            a.aws_families = Some(p.ask_list("AWS instance families", &d)?);
        }
        if a.aws_ssh_key_path.is_none() {
            let current = text(&aws["ssh_key_path"]);
            let k = p.ask_valid(
                "SSH private key for AWS instances (for bake)",
                &current,
                |k| if k == current { Ok(()) } else { ssh_key(k) },
            )?;
            a.aws_ssh_key_path = (!k.is_empty() && k != current).then(|| PathBuf::from(k));
        }
        if a.aws_launch_template.is_none() {
            let current = if aws["launch_template"].is_string() {
                text(&aws["launch_template"])
            } else {
                text(&aws["launch_template_name"])
            };
            let t = p.ask(
                "Launch template workers start from (bake makes one)",
                &current,
            )?;
            a.aws_launch_template = (!t.is_empty()).then_some(t);
        }
    }
    if uses("paperspace") {
        let ps = &existing["paperspace"];
        if a.paperspace_api_key.is_none() {
            a.paperspace_api_key =
                p.ask_secret("Paperspace API key", !text(&ps["api_key"]).is_empty())?;
        }
        if a.paperspace_regions.is_none() {
            let mut d = list(&ps["enabled_regions"]);
            if d.is_empty() {
                d = vec!["East Coast (NY2)".into()];
            }
            a.paperspace_regions = Some(p.ask_list("Paperspace regions", &d)?);
        }
        if a.paperspace_ssh_key_path.is_none() {
            let current = text(&ps["ssh_key_path"]);
            let k = p.ask_valid("SSH private key for Paperspace machines", &current, |k| {
                if k == current {
                    Ok(())
                } else {
                    ssh_key(k)
                }
            })?;
            a.paperspace_ssh_key_path = (!k.is_empty() && k != current).then(|| PathBuf::from(k));
        }
        if a.paperspace_template.is_none() {
            let t = p.ask(
                "Paperspace template workers boot from (ID or name; cedana-agent installed)",
                &text(&ps["template"]),
            )?;
            a.paperspace_template = (!t.is_empty()).then_some(t);
        }
    }
    let conn = &existing["connection"];
    if a.nats_url.is_none() {
        let question = if uses("aws") || uses("paperspace") {
            "NATS server the workers reach (host or nats:// URL)"
        } else {
            "NATS server (empty: the driver starts its own)"
        };
        let cloud = uses("aws") || uses("paperspace");
        let port = a.nats_port;
        a.nats_url = Some(p.ask_valid(question, &text(&conn["nats_url"]), |u| {
            if cloud {
                cloud_nats(u, port)
            } else {
                Ok(())
            }
        })?);
    }
    let url_set = a.nats_url.as_deref().is_some_and(|u| !u.trim().is_empty());
    if url_set && a.auth_token.is_none() {
        let have = !text(&conn["auth_token"]).is_empty();
        a.auth_token = p.ask_secret("NATS token (empty: generate one)", have)?;
        if a.auth_token.is_none() && !have {
            a.auth_token = Some(generate_token()?);
            let _ = writeln!(
                p.output,
                "generated a NATS token (it is in the config file)"
            );
        }
    }
    if a.checkpoint_interval.is_none() {
        let current = existing["checkpoint"]["heartbeat_interval_seconds"]
            .as_u64()
            .unwrap_or(60);
        let s = p.ask(
            "Seconds between checkpoints (0: none)",
            &current.to_string(),
        )?;
        a.checkpoint_interval = Some(s.parse().map_err(|_| BootstrapError::Answer {
            what: "seconds between checkpoints".into(),
            message: format!("{s:?} is not a whole number"),
        })?);
    }
    Ok(a)
}

/// What `--aws-create` makes in the first enabled region.
#[derive(Clone, Debug)]
pub struct AwsCreate {
    pub region: String,
    /// Key pair name; its private key goes to `key_path` when it is made.
    pub key_name: String,
    pub key_path: PathBuf,
    /// Security group allowing SSH (for `bake`).
    pub security_group: String,
    /// Launch template, made only when `image` is given.
    pub template: String,
    pub image: Option<String>,
    pub instance_type: Option<String>,
}

/// What `--aws-create` made or found.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AwsCreated {
    pub region: String,
    pub key_name: String,
    pub key_created: bool,
    /// The private key file, when there is one.
    pub key_path: Option<PathBuf>,
    pub security_group_id: String,
    pub launch_template_id: Option<String>,
    pub launch_template: Option<String>,
}

/// Makes (or finds) the key pair, the security group and, with an image, the launch template
/// workers start from. Run again, it changes nothing that is there (a template gets a new
/// default version). The AWS calls run on the caller's runtime (`rt`: a multi-thread one, since
/// a handle's `block_on` drives no I/O of a current-thread runtime).
#[cfg(feature = "aws")]
pub fn create_aws_resources(
    c: &AwsCreate,
    rt: &tokio::runtime::Handle,
) -> Result<AwsCreated, BootstrapError> {
    use crate::providers::aws::{self, ConnectOptions, Ec2, KeyPairOutcome, TemplateRequest};
    let fail = |e: aws::AwsError| BootstrapError::Answer {
        what: format!("AWS in {}", c.region),
        message: e.to_string(),
    };
    rt.block_on(async {
        let ec2 = Ec2::connect(ConnectOptions {
            region: Some(c.region.clone()),
            ..Default::default()
        })
        .await
        .map_err(fail)?;
        let client = ec2.client(&c.region);
        let (key_created, key_path) = match aws::ensure_key_pair(&client, &c.key_name, &c.key_path)
            .await
            .map_err(fail)?
        {
            KeyPairOutcome::Created { path, .. } => (true, Some(path)),
            KeyPairOutcome::Existing { path, .. } => (false, path),
        };
        let sg = aws::ensure_security_group(
            &client,
            &c.security_group,
            "Cedana workers: SSH for cedana-driver bake",
            &[22],
        )
        .await
        .map_err(fail)?;
        let template = match &c.image {
            Some(image) => Some(
                aws::ensure_launch_template(
                    &client,
                    &TemplateRequest {
                        name: c.template.clone(),
                        image_id: image.clone(),
                        instance_type: c.instance_type.clone(),
                        key_name: Some(c.key_name.clone()),
                        security_group_ids: vec![sg.clone()],
                        // Each worker's own user-data (its job, NATS server and token) is
                        // given when it is launched.
                        user_data: String::new(),
                    },
                )
                .await
                .map_err(fail)?,
            ),
            None => None,
        };
        Ok(AwsCreated {
            region: c.region.clone(),
            key_name: c.key_name.clone(),
            key_created,
            key_path,
            security_group_id: sg,
            launch_template: template.as_ref().map(|_| c.template.clone()),
            launch_template_id: template,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGINAL: &str = r#"{
   "self_serve": true,
   "cedana_managed": true,
   "checkpoint": { "heartbeat_enabled": true, "heartbeat_interval_seconds": 60 },
   "enabled_providers": ["aws"],
   "shared_storage": { "mount_point": "/home/ubuntu/.cedana/", "dump_storage_dir": "/home/ubuntu/.cedana/" },
   "aws": { "enabled_regions": ["us-east-1","us-west-1"], "enabled_instance_families": ["t2"],
            "ssh_key_path": "/Users/x/.cedana/test.pem", "launch_template_name": "caltech-test" },
   "connection": { "nats_url": "nats.example.org", "nats_port": 4222, "auth_token": "test" },
   "some_future_key": {"nested": [1, 2, 3]}
}"#;

    #[test]
    fn an_originals_config_keeps_its_keys_and_spelling() {
        let path = Path::new("/x/cedana_config.json");
        let v: Value = serde_json::from_str(ORIGINAL).unwrap();
        let a = Answers {
            aws_launch_template: Some("cedana-worker".into()),
            checkpoint_interval: Some(30),
            ..Default::default()
        };
        let out = apply(v, &a);
        assert_eq!(out["aws"]["launch_template_name"], "cedana-worker");
        assert!(out["aws"].get("launch_template").is_none());
        assert_eq!(out["aws"]["enabled_instance_families"], json!(["t2"]));
        assert_eq!(out["some_future_key"]["nested"], json!([1, 2, 3]));
        assert_eq!(out["checkpoint"]["heartbeat_interval_seconds"], 30);
        assert_eq!(out["cedana_managed"], true);
        let c = check(&out, path).unwrap();
        assert_eq!(
            c.aws.unwrap().launch_template.as_deref(),
            Some("cedana-worker")
        );
    }

    #[test]
    fn the_documented_spelling_stays_too() {
        let v = json!({"enabled_providers": ["aws"], "aws": {"launch_template": "old"}});
        let out = apply(
            v,
            &Answers {
                aws_launch_template: Some("new".into()),
                ..Default::default()
            },
        );
        assert_eq!(out["aws"]["launch_template"], "new");
        assert!(out["aws"].get("launch_template_name").is_none());
    }

    #[test]
    fn a_fresh_config_has_every_block_of_the_original() {
        let out = apply(json!({}), &Answers::default());
        for key in [
            "self_serve",
            "cedana_managed",
            "checkpoint",
            "enabled_providers",
            "shared_storage",
            "connection",
        ] {
            assert!(out.get(key).is_some(), "{key} missing in {out}");
        }
        assert_eq!(out["enabled_providers"], json!(["local"]));
        check(&out, Path::new("c.json")).unwrap();
    }

    #[test]
    fn mistakes_are_refused_with_what_to_do() {
        let p = Path::new("c.json");
        let out = apply(
            json!({}),
            &Answers {
                providers: Some(vec!["gcp".into()]),
                ..Default::default()
            },
        );
        assert!(check(&out, p).unwrap_err().to_string().contains("\"gcp\""));
        let out = apply(
            json!({}),
            &Answers {
                providers: Some(vec!["paperspace".into()]),
                nats_url: Some("nats.example.org".into()),
                auth_token: Some(Secret::new("t")),
                ..Default::default()
            },
        );
        assert!(check(&out, p)
            .unwrap_err()
            .to_string()
            .contains("PAPERSPACE_API_KEY"));
        let out = apply(
            json!({}),
            &Answers {
                nats_url: Some("nats.example.org".into()),
                ..Default::default()
            },
        );
        assert!(check(&out, p)
            .unwrap_err()
            .to_string()
            .contains("--generate-token"));
        let out = apply(
            json!({}),
            &Answers {
                providers: Some(vec!["aws".into()]),
                ..Default::default()
            },
        );
        assert!(check(&out, p)
            .unwrap_err()
            .to_string()
            .contains("--nats-url"));
    }

    #[test]
    fn the_interview_takes_defaults_and_answers() {
        let existing: Value = serde_json::from_str(ORIGINAL).unwrap();
        // providers, regions (default), families, ssh key (default), template, NATS url
        // (default), token (keep), checkpoint seconds.
        let input = "aws,local\n\nc5, m5\n\nmy-template\n\n\n45\n";
        let mut p = Prompter {
            input: input.as_bytes(),
            output: Vec::new(),
            hide_secrets: false,
        };
        let a = interview(&mut p, &existing, Answers::default()).unwrap();
        assert_eq!(
            a.providers.as_deref(),
            Some(&["aws".to_string(), "local".into()][..])
        );
        assert_eq!(
            a.aws_regions.as_deref(),
            Some(&["us-east-1".to_string(), "us-west-1".into()][..])
        );
        assert_eq!(
            a.aws_families.as_deref(),
            Some(&["c5".to_string(), "m5".into()][..])
        );
        assert_eq!(a.aws_launch_template.as_deref(), Some("my-template"));
        assert_eq!(a.nats_url.as_deref(), Some("nats.example.org"));
        assert!(a.auth_token.is_none(), "kept the current token");
        assert_eq!(a.checkpoint_interval, Some(45));
        let asked = String::from_utf8(p.output).unwrap();
        assert!(
            asked.contains("AWS regions [us-east-1,us-west-1]: "),
            "{asked}"
        );
        assert!(!asked.contains("test\n"), "the token was shown: {asked}");
        // Input that ends early is an error that says what to do.
        let mut p = Prompter {
            input: "aws\n".as_bytes(),
            output: Vec::new(),
            hide_secrets: false,
        };
        let e = interview(&mut p, &json!({}), Answers::default()).unwrap_err();
        assert!(e.to_string().contains("give the answers as flags"), "{e}");
    }

    #[test]
    fn answers_are_checked_when_given_and_kept() {
        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("k.pem");
        std::fs::write(&key, "key").unwrap();
        // providers, regions, families, an SSH key that is not there then one that is, no
        // template, a loopback NATS server then a reachable one, a generated token, the
        // interval.
        let input = format!(
            "aws\n\n\n/nonexistent/k.pem\n{}\n\n127.0.0.1\n10.0.0.5\n\n\n",
            key.display()
        );
        let mut p = Prompter {
            input: input.as_bytes(),
            output: Vec::new(),
            hide_secrets: false,
        };
        let a = interview(&mut p, &json!({}), Answers::default()).unwrap();
        let said = String::from_utf8(p.output).unwrap();
        assert!(said.contains("/nonexistent/k.pem: No such file"), "{said}");
        assert!(said.contains("loopback address"), "{said}");
        assert_eq!(a.aws_ssh_key_path.as_deref(), Some(key.as_path()));
        assert_eq!(a.nats_url.as_deref(), Some("10.0.0.5"));
        assert!(a.auth_token.is_some(), "a token was generated");
        assert_eq!(
            a.aws_regions.as_deref(),
            Some(&["us-east-1".to_string()][..])
        );

        // The config they make passes; a loopback server for cloud workers would not.
        let path = d.path().join("c.json");
        let config = check(&apply(json!({}), &a), &path).unwrap();
        let mut bad = a.clone();
        bad.nats_url = Some("localhost".into());
        let e = check(&apply(json!({}), &bad), &path).unwrap_err();
        assert!(e.to_string().contains("loopback"), "{e}");
        // A key named on the command line must exist.
        let flags = Answers {
            aws_ssh_key_path: Some("/nonexistent/k.pem".into()),
            ..Default::default()
        };
        assert!(check_answers(&flags)
            .unwrap_err()
            .to_string()
            .contains("k.pem"));

        // What to do next: the NATS server's command line reads the token from the file.
        let steps = next_steps(&config, &path).join("\n");
        assert!(
            steps.contains("nats-server --jetstream --port 4222"),
            "{steps}"
        );
        assert!(steps.contains(&format!("jq -r .connection.auth_token {}", path.display())));
        assert!(
            !steps.contains(a.auth_token.as_ref().unwrap().expose()),
            "no secret: {steps}"
        );
        assert!(steps.contains("bake"), "no launch template yet: {steps}");
    }
}
