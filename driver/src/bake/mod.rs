//! `cedana-driver bake`: a worker image (AMI) and a launch template made from a stock base
//! image, so that workers need no setup step at launch.
//!
//! The flow: check what will be uploaded (the agent, CRIU with exactly the libraries it loads)
//! before anything costs money; generate an ed25519 host key for the bake instance; launch the
//! base image with a `#cloud-config` user-data carrying that host key and the user's public key;
//! wait until it runs; connect over SSH verifying exactly that host key (or a `known_hosts`
//! file); upload and install the agent, CRIU and a systemd unit; run `cedana-agent check` there
//! (the bake fails with its output if it does not pass); remove the temporary host keys,
//! cloud-init's copy of the user-data and the user's key; CreateImage; a launch template whose
//! user-data starts the agent; terminate the bake instance (always, also when something failed).
//!
//! On the image:
//!
//! | path | what |
//! |---|---|
//! | `/usr/local/bin/cedana-agent` | the agent |
//! | `/usr/local/lib/cedana/criu/` | CRIU, its loader and the libraries it loads |
//! | `/usr/local/bin/criu` | runs that CRIU with those libraries |
//! | `/etc/systemd/system/cedana-agent.service` | the agent's unit (enabled) |
//!
//! The unit reads the worker's settings from [`WORKER_ENV`] (`CEDANA_JOB`, `CEDANA_WORKER`,
//! `CEDANA_NATS_URL`, `CEDANA_WATCH_SPOT`, optionally `CEDANA_SHARED_STORAGE`) and the NATS
//! token from [`TOKEN_FILE`]: the user-data of each worker writes both and starts the unit
//! (see [`worker_env`]), so one image serves every job. Without that file the unit does not
//! start.
//!
//! [`files`] generates what goes on the image (pure functions, and the checks of the agent and
//! CRIU before they are uploaded); `flow` (feature `aws`) does the cloud part. The library
//! reports each step through a [`Reporter`](crate::job::report::Reporter) and never prints.

mod error;
pub mod files;
#[cfg(feature = "aws")]
pub mod flow;

pub use error::BakeError;
pub use files::*;
#[cfg(feature = "aws")]
pub use flow::*;
