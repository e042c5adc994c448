//! One module per subcommand family; each turns parsed arguments into library calls.

pub mod engine;
pub mod policy;
