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
