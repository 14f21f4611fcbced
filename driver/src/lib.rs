//! cedana-driver: runs jobs (Rhai scripts or the original's YAML job specs) on workers,
//! keeping them alive by checkpointing, recovering and migrating their tasks, on the cheapest
//! machine that fits: `local` workers, Paperspace machines, or (feature `aws`) EC2 instances.

// The layers, each using only those below it (tests/tests/layers.rs checks):
//   runner, bootstrap, bake, price,  what the commands do
//   replay, readiness
//   jobfile                          Rhai scripts and YAML job specs
//   job                              a job: workers, task, checkpoints, record, managed flow
//   coord                            the driver's side of the wire; the embedded nats-server
//   providers                        Spec and Offer, the catalog, local, aws, paperspace
//   util                             quoting, whole-file writes, SSH
pub mod bake;
pub mod bootstrap;
pub mod coord;
pub mod job;
pub mod jobfile;
pub mod price;
pub mod providers;
pub mod readiness;
pub mod replay;
pub mod runner;
pub mod util;

pub use cedana_protocol::Config;

/// Whether the driver's log shows an event: everything the log level allows, except the AWS
/// SDK's and its HTTP stack's own output below ERROR: its debug and trace output holds whole
/// requests (their signed headers, and user-data that carries the job's NATS token), and its
/// warnings (a credential provider that failed, with the raw response) repeat what the
/// driver's own error then says plainly.
pub fn log_event_allowed(meta: &tracing::Metadata<'_>) -> bool {
    const SDK: [&str; 9] = [
        "aws_smithy",
        "aws_sdk",
        "aws_config",
        "aws_runtime",
        "aws_sigv4",
        "aws_credential_types",
        "hyper",
        "h2",
        "rustls",
    ];
    *meta.level() <= tracing::Level::ERROR || !SDK.iter().any(|p| meta.target().starts_with(p))
}
