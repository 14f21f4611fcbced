//! Progress reporting from long library operations; the binary draws it, tests ignore it.

/// Receives progress of a long operation. All methods have no-op defaults.
pub trait Progress: Sync {
    /// A new stage begins; `total_bytes` when its size is known.
    fn stage(&self, _name: &str, _total_bytes: Option<u64>) {}
    /// `bytes` more of the current stage are done.
    fn advance(&self, _bytes: u64) {}
    /// The operation is over (successfully or not).
    fn finish(&self) {}
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {}
