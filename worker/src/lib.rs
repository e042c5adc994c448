//! The data-plane worker and the engine's remote dispatcher.
//!
//! A worker process holds instances of expert functions (`data_plane::instances`), follows the
//! control plane's placement plans, and serves expert work over QUIC (`transport`) in the
//! binary frames of [`wire`]. The engine side, [`remote::RemoteExperts`], implements the
//! engine's expert-function seam by sending each layer's tokens, one message per worker, to the
//! instances of the active plan, re-dispatching work when a worker fails.

pub mod control;
pub mod exec;
pub mod node;
pub mod remote;
pub mod wire;

pub use node::{start, DrainOutcome, RunningWorker, WorkerOptions};
