//! The command line's [`Reporter`]: the job's notes as `[cedana] …` lines on stderr, the job
//! file's `print` on stdout, its `log` as `[job] …` lines on stderr.

use std::io::Write;

use cedana_driver::job::report::Reporter;

/// Writes the job's lines to the terminal (or wherever stdout and stderr go).
pub struct Terminal;

impl Reporter for Terminal {
    fn note(&self, line: &str) {
        let _ = writeln!(std::io::stderr().lock(), "[cedana] {line}");
    }
    fn print(&self, line: &str) {
        let _ = writeln!(std::io::stdout().lock(), "{line}");
    }
    fn log(&self, line: &str) {
        let _ = writeln!(std::io::stderr().lock(), "[job] {line}");
    }
}
