//! The command line: what only the binary does (arguments, printing, exit codes).

pub mod report;
