//! The command line: what only the binary does (arguments, printing, exit codes).

use std::io::Write;

pub mod args;
pub mod attach;
#[cfg(feature = "aws")]
pub mod bake;
pub mod control;
pub mod exit;
pub mod price;
pub mod readiness;
pub mod replay;
pub mod report;
pub mod run;
pub mod setup;
pub mod status;

/// Tells the user why the command failed: `cedana-driver: error: …` on stderr.
pub fn error(e: impl std::fmt::Display) {
    // Never a panic when stderr cannot be written (a controller's file on a full disk).
    let _ = writeln!(std::io::stderr(), "cedana-driver: error: {e}");
}

/// An error and its causes, `: `-separated.
#[cfg(feature = "aws")]
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// The runtime for a command that talks to servers (`checkpoint`, `migrate`, `down`, `bake`,
/// `bootstrap --aws-create`): the binary makes one and lends it to the library.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}
