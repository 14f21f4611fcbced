//! cedana-driver: runs jobs (Rhai scripts or the original's YAML job specs) on workers,
//! keeping them alive by checkpointing, recovering and migrating their tasks. This release has
//! the `local` provider and the embedded NATS server; cloud providers and prices come next.

pub mod catalog;
pub mod container;
pub mod control;
pub mod coordinator;
pub mod job;
pub mod local;
pub mod managed;
pub mod nats;
pub mod paperspace;
pub mod provider;
pub mod run;
pub mod script;
pub mod ssh;
pub mod state;
pub mod yaml;

pub use cedana_agent::Config;
