//! cedana-protocol: the only code that knows the wire between Cedana's driver and its agents.
//!
//! - [`names`]: every stream, bucket and subject name;
//! - [`wire`]: the versioned messages (commands, replies, events, worker records);
//! - [`layout`]: the streams and buckets both sides make, and the stored publish;
//! - [`auth`]: credentials ([`NatsCredential`]) and what a worker may do ([`worker_permissions`]);
//! - [`jwt`]: the operator, account and user JWTs of a NATS server the user runs;
//! - [`config`]: the original's `cedana_config.json`, and [`Secret`];
//! - [`url`]: [`NatsUrl`], the one parser of NATS URL lists;
//! - [`criu`]: CRIU's options a dump or restore asks for (command line, commands, manifest);
//! - [`ids`]: ids and the randomness they are made of; [`stamp`]: time stamps.
//!
//! Neither the agent nor the driver spells a subject or a message of its own; both depend on
//! this crate, and the driver on nothing else of the agent's.

pub mod auth;
pub mod config;
pub mod control;
pub mod criu;
pub mod ids;
pub mod jwt;
pub mod layout;
pub mod names;
pub mod stamp;
pub mod url;
pub mod wire;

pub use auth::{
    inbox_prefix, worker_permissions, worker_user, NatsCredential, Permissions, DRIVER_USER,
};
pub use config::{Config, Secret};
pub use criu::{CgroupMode, CriuOptions, CriuOptionsError, NetworkLock, TcpMode};
pub use ids::{
    new_chunks_id, random_bytes, random_hex, sanitize, valid_chunks_id, valid_id, valid_object_part,
};
pub use layout::{
    ensure_checkpoints, ensure_kv, ensure_layout, publish_stored, Layout, LayoutError,
};
pub use names::*;
pub use stamp::{now, parse_rfc3339, Stamp, Timestamp};
pub use url::NatsUrl;
pub use wire::*;
