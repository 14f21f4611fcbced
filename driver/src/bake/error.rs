//! The errors of `bake`.

use std::path::PathBuf;

/// Errors of `bake`. None carries key material.
#[derive(Debug, thiserror::Error)]
pub enum BakeError {
    #[error("agent {path}: {message}")]
    Agent { path: PathBuf, message: String },
    #[error("CRIU {path}: {message}")]
    Criu { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Ssh(#[from] crate::util::ssh::SshError),
    #[cfg(feature = "aws")]
    #[error(transparent)]
    Aws(#[from] crate::providers::aws::AwsError),
    #[error("bake instance {instance}: {message}")]
    Remote { instance: String, message: String },
    #[error(
        "`cedana-agent check` failed on bake instance {instance} (no image was made):\n{output}"
    )]
    CheckFailed { instance: String, output: String },
    #[error("interrupted; bake instance {instance} was terminated and no image was made")]
    Interrupted { instance: String },
    #[error("image {image} was made, but {message}")]
    AfterImage { image: String, message: String },
}
