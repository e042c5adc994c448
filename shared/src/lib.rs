//! Domain types and pure policies shared by the control plane, the data plane and the simulator.
//!
//! Invariant: no I/O in the core logic, no async, no protobuf types. Everything here is a
//! function of its inputs so that the control plane, the engine and the simulator agree.

pub mod types;

pub use types::{ExpertKey, InstanceId, WorkerId};
