//! `~/.cedana/cedana_config.json`, in the original Cedana's format.
//!
//! Every key is optional and unknown keys are ignored, so a file the original wrote loads as is;
//! a key with the wrong type is an error naming the file, the key path, line and column.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Environment variable that overrides the config file's location.
pub const CONFIG_ENV: &str = "CEDANA_CONFIG";

/// Errors loading the config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: `{key}` {message} (line {line}, column {column}); fix the value or remove the key to use the default")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
        line: usize,
        column: usize,
    },
    #[error("config {path} (--config) does not exist; give the path of an existing file, or leave --config out to use $CEDANA_CONFIG or ~/.cedana/cedana_config.json")]
    Missing { path: PathBuf },
}

/// A string that never shows in logs or `Debug` output (tokens, API keys).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// True when no value is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("\"\"")
        } else {
            f.write_str("\"<redacted>\"")
        }
    }
}

/// The whole config file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    pub self_serve: Option<bool>,
    pub cedana_managed: Option<bool>,
    pub checkpoint: CheckpointConfig,
    pub enabled_providers: Vec<String>,
    pub shared_storage: SharedStorage,
    pub aws: Option<AwsConfig>,
    pub paperspace: Option<PaperspaceConfig>,
    pub connection: Connection,
    /// Cedana-rs addition: where CRIU is.
    pub criu: CriuConfig,
    /// Cedana-rs addition: moving a running job to cheaper offers.
    pub arbitrage: ArbitrageConfig,
    /// Cedana-rs addition: where checkpoints go as chunks (`s3://…`, `gs://…`, `az://…`,
    /// `file:///…`); absent: the NATS object store (or `shared_storage`).
    pub checkpoint_store: Option<CheckpointStoreConfig>,
}

/// `checkpoint_store` block (Cedana-rs addition; the original ignores it).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct CheckpointStoreConfig {
    /// `s3://BUCKET/PREFIX`, `gs://BUCKET/PREFIX`, `az://CONTAINER/PREFIX` or `file:///PATH`;
    /// each job's checkpoints go under `<url>/<job>`.
    pub url: String,
}

/// `arbitrage` block (Cedana-rs addition; off unless enabled): every `interval_seconds` the
/// driver prices the job's spec again across the enabled providers, and when an offer is
/// cheaper than the one the job runs on by more than `margin_percent`, the job migrates there.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ArbitrageConfig {
    pub enabled: Option<bool>,
    /// Seconds between pricings [default: 600].
    pub interval_seconds: Option<u64>,
    /// How much cheaper, in percent of the current price, an offer must be [default: 20].
    pub margin_percent: Option<f64>,
}

/// `checkpoint` block.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct CheckpointConfig {
    pub heartbeat_enabled: Option<bool>,
    pub heartbeat_interval_seconds: Option<u64>,
}

/// `shared_storage` block.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SharedStorage {
    pub mount_point: Option<PathBuf>,
    pub dump_storage_dir: Option<PathBuf>,
}

/// `aws` block.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct AwsConfig {
    pub enabled_regions: Vec<String>,
    pub enabled_instance_families: Vec<String>,
    pub ssh_key_path: Option<PathBuf>,
    /// The original wrote both `launch_template` and `launch_template_name`.
    #[serde(alias = "launch_template_name")]
    pub launch_template: Option<String>,
    /// Cedana-rs additions (left out of the file when unset). The AMI workers boot from when
    /// there is no launch template.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    /// EC2 key pair and security groups for workers launched from `image_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_name: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub security_group_ids: Vec<String>,
    /// `cedana-agent` on the image [default: /usr/local/bin/cedana-agent].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_path: Option<String>,
    /// Seconds a new instance gets to boot and register [default: 300].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_timeout_seconds: Option<u64>,
    /// Offer spot instances [default: true].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spot: Option<bool>,
}

/// `paperspace` block.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PaperspaceConfig {
    pub api_key: Secret,
    pub ssh_key_path: Option<PathBuf>,
    pub enabled_regions: Vec<String>,
    /// Cedana-rs addition (left out of the file when unset): the template workers boot from,
    /// an ID or name ($CEDANA_PAPERSPACE_TEMPLATE overrides it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
}

/// `connection` block: the NATS server.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Connection {
    pub nats_url: String,
    pub nats_port: Option<u16>,
    pub auth_token: Secret,
}

/// `criu` block (Cedana-rs addition).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct CriuConfig {
    pub path: Option<PathBuf>,
}

impl Config {
    /// The default location: `$CEDANA_CONFIG`, else `~/.cedana/cedana_config.json`.
    pub fn default_path() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os(CONFIG_ENV) {
            return Some(PathBuf::from(p));
        }
        std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".cedana").join("cedana_config.json"))
    }

    /// Loads the file at `path`; a missing file gives the defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Loads the file at `path` if given (it must exist: the user named it), else at
    /// [`Config::default_path`] (missing: the defaults).
    pub fn load_default(path: Option<&Path>) -> Result<Self, ConfigError> {
        if let Some(p) = path {
            if !p.exists() {
                return Err(ConfigError::Missing { path: p.into() });
            }
        }
        match path.map(Path::to_path_buf).or_else(Self::default_path) {
            Some(p) => Self::load(&p),
            None => Ok(Config::default()),
        }
    }

    /// Parses config text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let message = inner.to_string();
            // serde_json appends " at line L column C"; we report those separately.
            let message = match message.rfind(" at line ") {
                Some(i) => message[..i].to_string(),
                None => message,
            };
            let message = plain_types(&message);
            ConfigError::Invalid {
                path: path.to_path_buf(),
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                message,
                line: inner.line(),
                column: inner.column(),
            }
        })
    }

    /// Where dumps go when `-d` is not given: `shared_storage.dump_storage_dir`, if set.
    pub fn dump_dir(&self) -> Option<&Path> {
        self.shared_storage
            .dump_storage_dir
            .as_deref()
            .filter(|p| !p.as_os_str().is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGINAL: &str = r#"{
   "self_serve": true,
   "cedana_managed": true,
   "checkpoint": { "heartbeat_enabled": true, "heartbeat_interval_seconds": 60 },
   "enabled_providers": ["aws", "paperspace"],
   "shared_storage": { "mount_point": "/home/ubuntu/.cedana/", "dump_storage_dir": "/home/ubuntu/.cedana/" },
   "aws": { "enabled_regions": ["us-east-1","us-west-1"], "enabled_instance_families": ["t2"],
            "ssh_key_path": "/Users/x/.cedana/test.pem", "launch_template_name": "caltech-test" },
   "paperspace": { "api_key": "someapikey", "ssh_key_path": "/home/x/.ssh/id_ed25519",
                   "enabled_regions": ["East Coast (NY2)"] },
   "connection": { "nats_url": "", "nats_port": 4222, "auth_token": "test" },
   "some_future_key": {"nested": [1, 2, 3]}
}"#;

    #[test]
    fn loads_the_originals_config_and_ignores_unknown_keys() {
        let c = Config::parse(ORIGINAL, Path::new("c.json")).unwrap();
        assert_eq!(c.dump_dir(), Some(Path::new("/home/ubuntu/.cedana/")));
        assert_eq!(c.checkpoint.heartbeat_interval_seconds, Some(60));
        assert_eq!(
            c.aws.as_ref().unwrap().launch_template.as_deref(),
            Some("caltech-test")
        );
        assert_eq!(c.connection.nats_port, Some(4222));
        assert_eq!(c.connection.auth_token.expose(), "test");
        assert_eq!(c.enabled_providers, ["aws", "paperspace"]);
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let c = Config::parse(ORIGINAL, Path::new("c.json")).unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("someapikey"), "{dbg}");
        assert!(!dbg.contains("\"test\""), "{dbg}");
        assert!(dbg.contains("<redacted>"));
    }

    #[test]
    fn wrong_type_names_file_key_line_and_column() {
        let text = "{\n  \"shared_storage\": {\n    \"dump_storage_dir\": 5\n  }\n}";
        let err = Config::parse(text, Path::new("/x/cedana_config.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/x/cedana_config.json"), "{err}");
        assert!(err.contains("shared_storage.dump_storage_dir"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("invalid type: integer `5`"), "{err}");
    }

    #[test]
    fn malformed_json_is_an_error_with_position() {
        let err = Config::parse("{\"checkpoint\": {", Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("c.json") && err.contains("line 1"), "{err}");
    }

    #[test]
    fn missing_file_gives_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let c = Config::load(&dir.path().join("absent.json")).unwrap();
        assert!(c.dump_dir().is_none());
    }

    #[test]
    fn empty_dump_dir_means_unset() {
        let c = Config::parse(
            r#"{"shared_storage": {"dump_storage_dir": ""}}"#,
            Path::new("c"),
        )
        .unwrap();
        assert!(c.dump_dir().is_none());
    }
}

/// A parser's message with Rust's type names said in words (`expected f64`: a number).
pub fn plain_types(message: &str) -> String {
    let mut out = message.to_string();
    for (rust, words) in [
        ("f64", "a number"),
        ("f32", "a number"),
        ("u64", "a whole number of 0 or more"),
        ("u32", "a whole number of 0 or more"),
        ("u16", "a whole number from 0 to 65535"),
        ("u8", "a whole number from 0 to 255"),
        ("usize", "a whole number of 0 or more"),
        ("i64", "a whole number"),
        ("i32", "a whole number"),
        ("a boolean", "true or false"),
        ("a string", "text in quotes"),
    ] {
        // Whole words only (`u8` is not in `u80`).
        let mut rebuilt = String::new();
        let mut rest = out.as_str();
        while let Some(i) = rest.find(rust) {
            let before = rest[..i].chars().last();
            let after = rest[i + rust.len()..].chars().next();
            let word = |c: Option<char>| c.is_none_or(|c| !c.is_ascii_alphanumeric() && c != '_');
            rebuilt.push_str(&rest[..i]);
            rebuilt.push_str(if word(before) && word(after) {
                words
            } else {
                rust
            });
            rest = &rest[i + rust.len()..];
        }
        rebuilt.push_str(rest);
        out = rebuilt;
    }
    out
}

#[cfg(test)]
mod plain_tests {
    #[test]
    fn rust_type_names_become_words() {
        assert_eq!(
            super::plain_types("invalid type: string \"x\", expected f64"),
            "invalid type: string \"x\", expected a number"
        );
        assert_eq!(
            super::plain_types("expected u64 or u80_x"),
            "expected a whole number of 0 or more or u80_x"
        );
    }
}
