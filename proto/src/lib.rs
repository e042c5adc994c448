//! Wire types of MoEless, generated from `proto/*.proto`. Nothing else lives here: conversion to
//! domain types happens at the edge in the crates that own those types.

/// Raft transport between control-plane nodes (openraft messages as opaque bytes).
pub mod raft {
    tonic::include_proto!("moeless.raft");
}

/// Engine-facing control-plane service: plans and load reports.
pub mod engine {
    tonic::include_proto!("moeless.engine");
}

/// Worker-facing control-plane service: registration, heartbeats, plan stream.
pub mod worker {
    tonic::include_proto!("moeless.worker");
}

/// Largest message a WorkerService or EngineService server or client accepts (either way): a
/// plan for every expert of a large model fits with room to spare; larger messages are refused
/// with `OUT_OF_RANGE` from their length prefix, before they are buffered. (Raft traffic,
/// which carries whole snapshots, has its own larger limit in the control plane.)
pub const MAX_SERVICE_MESSAGE_BYTES: usize = 16 << 20;
