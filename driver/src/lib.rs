//! cedana-driver: picks the cheapest machine for a job, launches workers and keeps the job alive
//! through preemption by checkpointing and migrating it.
//!
//! This crate is a skeleton until the driver issue; it already shares the agent's config type so
//! both read `~/.cedana/cedana_config.json` the same way.

pub use cedana_agent::Config;
