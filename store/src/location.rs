//! Where a store is: `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`
//! (also `azure://`, `abfs://`), `file:///path`, or a plain absolute path. Credentials come the
//! standard way of each cloud (for S3: `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/
//! `AWS_SESSION_TOKEN`, `AWS_REGION`, the instance's role through IMDS; `AWS_ENDPOINT_URL` names
//! an S3-compatible server; GCS: `GOOGLE_APPLICATION_CREDENTIALS` or the instance's account;
//! Azure: `AZURE_STORAGE_ACCOUNT_NAME` and a key, SAS or managed identity).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;

use crate::StoreError;

/// The cloud variables taken out of the environment by [`capture_env`].
static CAPTURED: OnceLock<Vec<(String, String)>> = OnceLock::new();

/// Whether a variable is a cloud's setting (credentials, region, endpoint).
fn is_cloud_var(k: &str) -> bool {
    k.starts_with("AWS_") || k.starts_with("AZURE_") || k.starts_with("GOOGLE_")
}

/// Takes the clouds' variables (`AWS_*`, `AZURE_*`, `GOOGLE_*`) out of this process's
/// environment and keeps them for the stores opened later, so that nothing this process starts
/// (a task, a shell command, CRIU) inherits a credential. Call it before any other thread
/// runs (the environment is not safe to change while another thread may read it).
pub fn capture_env() {
    let vars: Vec<(String, String)> = std::env::vars().filter(|(k, _)| is_cloud_var(k)).collect();
    for (k, _) in &vars {
        // SAFETY (edition 2021: not an unsafe fn): the caller runs this before other threads.
        std::env::remove_var(k);
    }
    let _ = CAPTURED.set(vars);
}

/// The clouds' variables: those [`capture_env`] took, else the environment's.
fn cloud_env() -> Vec<(String, String)> {
    match CAPTURED.get() {
        Some(v) => v.clone(),
        None => std::env::vars().filter(|(k, _)| is_cloud_var(k)).collect(),
    }
}

/// Environment variable: how long, in seconds, a request to a cloud store is retried before it
/// fails (a store that stops answering fails a checkpoint, and ends a lazily restored task,
/// after that long). Default [`DEFAULT_RETRY_SECS`].
pub const RETRY_ENV: &str = "CEDANA_STORE_RETRY_SECS";
/// Default of [`RETRY_ENV`].
pub const DEFAULT_RETRY_SECS: u64 = 60;

/// Retries of a cloud store's requests: exponential backoff from 100 ms, for at most
/// [`RETRY_ENV`] seconds.
fn retry() -> object_store::RetryConfig {
    let secs = std::env::var(RETRY_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(DEFAULT_RETRY_SECS)
        .clamp(1, 600);
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: std::time::Duration::from_millis(100),
            max_backoff: std::time::Duration::from_secs(secs.min(15)),
            base: 2.0,
        },
        max_retries: 10,
        retry_timeout: std::time::Duration::from_secs(secs),
    }
}

fn var(env: &[(String, String)], name: &str) -> Option<String> {
    env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

/// A parsed store URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreUrl {
    kind: Kind,
    /// The URL as given (no credentials are ever part of it).
    text: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    S3 { bucket: String, prefix: String },
    Gcs { bucket: String, prefix: String },
    Azure { url: String, prefix: String },
    Folder(PathBuf),
}

impl StoreUrl {
    pub fn parse(text: &str) -> Result<Self, StoreError> {
        let bad = |reason: &str| {
            StoreError::BadUrl {
            url: redact(text),
            reason: format!(
                "{reason}; use s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, az://CONTAINER/PREFIX or file:///PATH"
            ),
        }
        };
        if text.starts_with('/') {
            return Ok(StoreUrl {
                kind: Kind::Folder(PathBuf::from(text)),
                text: text.to_string(),
            });
        }
        // Checked on the text: the URL parser resolves `..` away.
        let after_scheme = text.split_once("://").map_or(text, |(_, rest)| rest);
        if after_scheme.split('/').any(|p| p == ".." || p == ".") {
            return Err(bad("its path has `.` or `..` parts"));
        }
        let url = url::Url::parse(text).map_err(|e| bad(&e.to_string()))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad(
                "it holds credentials; give them the cloud's standard way (environment, profile, instance role) instead",
            ));
        }
        let bucket = || -> Result<String, StoreError> {
            match url.host_str() {
                Some(h) if !h.is_empty() => Ok(h.to_string()),
                _ => Err(bad("it names no bucket")),
            }
        };
        let prefix = url.path().trim_matches('/').to_string();
        let kind = match url.scheme() {
            "s3" | "s3a" => Kind::S3 {
                bucket: bucket()?,
                prefix,
            },
            "gs" => Kind::Gcs {
                bucket: bucket()?,
                prefix,
            },
            "az" | "azure" | "abfs" | "abfss" => Kind::Azure {
                url: format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default()),
                prefix,
            },
            "file" => {
                let path = url
                    .to_file_path()
                    .map_err(|()| bad("it is not an absolute local path"))?;
                Kind::Folder(path)
            }
            other => return Err(bad(&format!("its scheme {other:?} is not a known store"))),
        };
        Ok(StoreUrl {
            kind,
            text: text.trim_end_matches('/').to_string(),
        })
    }

    /// The URL as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The same store, under `part` (a job's own prefix).
    pub fn join(&self, part: &str) -> StoreUrl {
        let add = |prefix: &str| match prefix.is_empty() {
            true => part.to_string(),
            false => format!("{prefix}/{part}"),
        };
        let kind = match &self.kind {
            Kind::S3 { bucket, prefix } => Kind::S3 {
                bucket: bucket.clone(),
                prefix: add(prefix),
            },
            Kind::Gcs { bucket, prefix } => Kind::Gcs {
                bucket: bucket.clone(),
                prefix: add(prefix),
            },
            Kind::Azure { url, prefix } => Kind::Azure {
                url: url.clone(),
                prefix: add(prefix),
            },
            Kind::Folder(p) => Kind::Folder(p.join(part)),
        };
        StoreUrl {
            kind,
            text: format!("{}/{part}", self.text),
        }
    }

    /// A local folder store's folder.
    pub fn folder(&self) -> Option<&std::path::Path> {
        match &self.kind {
            Kind::Folder(p) => Some(p),
            _ => None,
        }
    }

    /// The object store and the prefix inside it. Builds clients only (no request is made);
    /// a local folder is created if missing.
    pub(crate) fn open(&self) -> Result<(Arc<dyn ObjectStore>, ObjectPath), StoreError> {
        let fail = |e: object_store::Error| StoreError::BadUrl {
            url: self.text.clone(),
            reason: e.to_string(),
        };
        Ok(match &self.kind {
            Kind::S3 { bucket, prefix } => {
                use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
                let env = cloud_env();
                let mut b = AmazonS3Builder::new();
                for (k, v) in &env {
                    if let Ok(key) = k.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
                        b = b.with_config(key, v);
                    }
                }
                b = b.with_bucket_name(bucket).with_retry(retry());
                // An S3-compatible server on plain HTTP (a test server, a local MinIO).
                if var(&env, "AWS_ENDPOINT_URL")
                    .or_else(|| var(&env, "AWS_ENDPOINT"))
                    .is_some_and(|e| e.starts_with("http://"))
                {
                    b = b.with_allow_http(true);
                }
                match (var(&env, "AWS_REGION"), var(&env, "AWS_DEFAULT_REGION")) {
                    (Some(_), _) => {}
                    (None, Some(r)) => b = b.with_region(r),
                    (None, None) => b = b.with_region("us-east-1"),
                }
                (
                    Arc::new(b.build().map_err(fail)?),
                    ObjectPath::from(prefix.as_str()),
                )
            }
            Kind::Gcs { bucket, prefix } => {
                use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
                let mut b = GoogleCloudStorageBuilder::new();
                for (k, v) in cloud_env() {
                    if let Ok(key) = k.to_ascii_lowercase().parse::<GoogleConfigKey>() {
                        b = b.with_config(key, v);
                    }
                }
                let b = b.with_bucket_name(bucket).with_retry(retry());
                (
                    Arc::new(b.build().map_err(fail)?),
                    ObjectPath::from(prefix.as_str()),
                )
            }
            Kind::Azure { url, prefix } => {
                use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
                let mut b = MicrosoftAzureBuilder::new();
                for (k, v) in cloud_env() {
                    if let Ok(key) = k.to_ascii_lowercase().parse::<AzureConfigKey>() {
                        b = b.with_config(key, v);
                    }
                }
                let b = b.with_url(url).with_retry(retry());
                (
                    Arc::new(b.build().map_err(fail)?),
                    ObjectPath::from(prefix.as_str()),
                )
            }
            Kind::Folder(path) => {
                std::fs::create_dir_all(path).map_err(|e| StoreError::BadUrl {
                    url: self.text.clone(),
                    reason: format!("cannot create the folder: {e}"),
                })?;
                let fs =
                    object_store::local::LocalFileSystem::new_with_prefix(path).map_err(fail)?;
                (Arc::new(fs), ObjectPath::default())
            }
        })
    }
}

/// `text` with anything that could be a credential (`user:password@`) cut out.
fn redact(text: &str) -> String {
    match (text.find("://"), text.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://…{}", &text[..s], &text[at..]),
        _ => text.to_string(),
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_bad_ones_say_why() {
        let u = StoreUrl::parse("s3://bkt/some/prefix/").unwrap();
        assert_eq!(
            u.kind,
            Kind::S3 {
                bucket: "bkt".into(),
                prefix: "some/prefix".into()
            }
        );
        assert_eq!(u.join("job1").as_str(), "s3://bkt/some/prefix/job1");
        let f = StoreUrl::parse("file:///var/ckpt").unwrap();
        assert_eq!(f.folder(), Some(std::path::Path::new("/var/ckpt")));
        assert_eq!(
            StoreUrl::parse("/var/ckpt").unwrap().folder(),
            Some(std::path::Path::new("/var/ckpt"))
        );
        for bad in [
            "ftp://x/y",
            "s3:///nobucket",
            "s3://AKID:secret@bkt/p",
            "s3://bkt/a/../b",
            "relative/path",
        ] {
            let e = StoreUrl::parse(bad).unwrap_err().to_string();
            assert!(e.contains("s3://BUCKET/PREFIX"), "{bad}: {e}");
            assert!(!e.contains("secret"), "{e}");
        }
    }
}
