//! cedana-driver: runs job scripts on workers, keeping the job alive by checkpointing and
//! migrating it. This release has the `local` provider, the embedded NATS server and the Rhai
//! host API; providers with prices, the managed flow's recovery and the rest of the commands
//! come next.

pub mod coordinator;
pub mod local;
pub mod nats;
pub mod run;
pub mod script;

pub use cedana_agent::Config;
