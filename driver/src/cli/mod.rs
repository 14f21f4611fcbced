//! The command line: what only the binary does (arguments, printing, exit codes).

pub mod args;
pub mod control;
pub mod exit;
pub mod price;
pub mod report;
pub mod run;
pub mod setup;
pub mod status;

/// Tells the user why the command failed: `cedana-driver: error: …` on stderr.
pub fn error(e: impl std::fmt::Display) {
    eprintln!("cedana-driver: error: {e}");
}

/// The runtime for a command that talks to servers (`checkpoint`, `migrate`, `down`): the
/// binary makes one and lends it to the library.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}
