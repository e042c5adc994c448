//! Trace-driven discrete-event simulator of an MoE serving cluster.
//!
//! Requests arrive from real traces ([`arrivals`]); one engine per expert-parallel group runs
//! continuous batching under a token budget (chunked prefill, then one decode token per running
//! request and step; [`engine`]). Every step's tokens take their expert choices from a routing
//! trace ([`routing`]); the placement policy (static EP, EPLB, MoEless, oracle: the very code in
//! `shared::replay`) dispatches them to GPUs; the [`cost`] model turns per-GPU token counts into
//! time (the slowest GPU sets each MoE layer's pace) and memory into money.
//!
//! Invariant: depends only on `shared` (policies, trace readers); never on the data plane, the
//! control plane or an async runtime. No I/O besides the readers, which take `BufRead`.

pub mod arrivals;
pub mod cost;
pub mod engine;
pub mod gpu;
pub mod model;
pub mod report;
pub mod routing;
pub mod svg;

use thiserror::Error;

pub use engine::{simulate, SimConfig};
pub use gpu::{GpuProfile, GpuType};
pub use model::ModelShape;

/// Everything that can go wrong before or while simulating; never a panic.
#[derive(Debug, Error)]
pub enum SimError {
    #[error("unknown GPU type `{0}` (known: a6000, a100, h100, h200)")]
    UnknownGpu(String),
    #[error("model config: {0}")]
    ModelConfig(String),
    #[error("arrivals line {line}: {msg}")]
    Arrivals { line: usize, msg: String },
    #[error("arrivals: the trace holds no requests{0}")]
    EmptyArrivals(String),
    #[error("routing trace: {0}")]
    Routing(String),
    #[error("routing trace has {trace} experts per layer but the model config has {model}")]
    ExpertMismatch { trace: usize, model: usize },
    #[error("routing trace has {trace} MoE layers but the model config has {model}")]
    LayerMismatch { trace: usize, model: usize },
    #[error("duration must be a positive number of seconds, got {0}")]
    BadDuration(f64),
    #[error("configuration: {0}")]
    Config(String),
    #[error("the model does not fit: {0}")]
    DoesNotFit(String),
    #[error("placement policy: {0}")]
    Plan(#[from] shared::PlanError),
    #[error(transparent)]
    Trace(#[from] shared::TraceError),
    #[error(transparent)]
    Synth(#[from] shared::synth::SynthError),
    #[error("reading {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}
