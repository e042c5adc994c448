//! The MoEless control plane: a Raft-replicated metadata store (openraft 0.10 on redb or sled), the
//! worker and engine gRPC services, and the admin REST API.
//!
//! Never touches tensors; protobuf types stop at `services` and `network`.

pub mod admin;
pub mod client;
pub mod failpoint;
pub mod liveness;
pub mod network;
pub mod node;
pub mod placement;
pub mod reconciler;
pub mod services;
pub mod state;
pub mod store;
pub mod types;

pub use failpoint::Failpoints;
pub use node::{initialize_if_first, open_raft, start, InitialClusterState, Node, NodeConfig, NodeError, RunningNode};
pub use store::StorageKind;
pub use types::{is_host_port, Command, CommandResponse, NodeInfo, TypeConfig};
