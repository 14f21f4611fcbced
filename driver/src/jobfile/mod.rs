//! Job files: Rhai scripts ([`script`]) and the original's YAML job specs ([`yaml`]), each a
//! front end over the job layer's managed flow ([`crate::job::managed::Hooks`]).

pub mod script;
pub mod yaml;

pub use script::ScriptError;
