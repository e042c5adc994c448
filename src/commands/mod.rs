//! One module per subcommand family; each turns parsed arguments into library calls.

pub mod bench;
pub mod bench_dp;
pub mod bench_gpu;
pub mod chaos;
pub mod cluster;
pub mod control;
pub mod engine;
pub mod policy;
pub mod serve;
pub mod signals;
pub mod sim;
pub mod tls;
pub mod validate;
pub mod worker;
