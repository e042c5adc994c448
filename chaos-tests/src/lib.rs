//! Fault injection for MoEless: a real cluster of `moeless` processes on this machine, load on
//! its APIs, injected faults (SIGKILL, SIGSTOP, partitions, graceful restarts) and invariant
//! checks over the recorded history (linearizability, no acknowledged write lost, unique plan
//! epochs, failover and recovery times).
//!
//! The harness is black-box: it reaches the system only through the `moeless` binary, the admin
//! REST API and the kernel, so it tests what operators run.

pub mod cluster;
pub mod data_plane;
pub mod linearizability;
pub mod net;
pub mod ports;
pub mod scenario;
pub mod workload;

pub use scenario::{run, Config, Scenario, ScenarioReport};
