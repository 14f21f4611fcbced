//! [`Reporter`]: how the library tells the user what a job does. The library never prints;
//! the command line gives a reporter that writes lines to the terminal, other users of the
//! library one that keeps or drops them.

use std::sync::{Arc, Mutex};

/// Where the job's own lines go.
pub trait Reporter: Send + Sync {
    /// A step of the job, or a problem it worked around (one line, for people).
    fn note(&self, line: &str);
    /// A line the job file printed (`print` in a Rhai script).
    fn print(&self, line: &str);
    /// A line the job file logged (`log`, `debug` in a Rhai script).
    fn log(&self, line: &str);
}

/// Drops everything.
#[derive(Clone, Copy, Debug, Default)]
pub struct Silent;

impl Reporter for Silent {
    fn note(&self, _: &str) {}
    fn print(&self, _: &str) {}
    fn log(&self, _: &str) {}
}

/// Keeps every line, for tests and for callers that show them later.
#[derive(Debug, Default)]
pub struct Collect(pub Mutex<Vec<String>>);

impl Collect {
    /// The lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().expect("lines").clone()
    }
}

impl Reporter for Collect {
    fn note(&self, line: &str) {
        self.0.lock().expect("lines").push(line.to_string());
    }
    fn print(&self, line: &str) {
        self.note(line)
    }
    fn log(&self, line: &str) {
        self.note(line)
    }
}

/// A reporter shared by the job and its front ends.
pub type SharedReporter = Arc<dyn Reporter>;
