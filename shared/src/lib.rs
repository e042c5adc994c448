//! Domain types and pure policies shared by the control plane, the data plane and the simulator.
//!
//! Invariant: no I/O in the core logic, no async, no protobuf types. Everything here is a
//! function of its inputs so that the control plane, the engine and the simulator agree.

pub mod arrivals;
pub mod colocate;
pub mod eplb;
pub mod plan;
pub mod predict;
pub mod replay;
pub mod secret;
pub mod servegen;
pub mod source;
pub mod synth;
pub mod trace;
pub mod trace_formats;
pub mod types;

pub use plan::{Instance, LayerPlan, LoadMatrix, Plan, PlanError};
pub use trace::{Phase, Step, TokenTrace, TraceError};
pub use types::{ExpertKey, InstanceId, WorkerId};
