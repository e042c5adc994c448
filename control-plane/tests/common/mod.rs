//! Helpers shared by the control-plane integration tests: real nodes on loopback, real disks.
#![allow(dead_code)]

pub mod cluster;

use std::time::{Duration, Instant};

use control_plane::client::AdminClient;
use control_plane::{NodeConfig, RunningNode};
use serde_json::{json, Value};

pub const TOKEN: &str = "test-token";

pub fn config(dir: &std::path::Path) -> NodeConfig {
    let mut c = NodeConfig::new(1, dir.to_path_buf());
    c.admin_token = Some(TOKEN.into());
    c.election_timeout_ms = (150, 300);
    c.heartbeat_ms = 50;
    // These tests commit every plan by hand; t04 turns the reconciler on.
    c.reconciler = false;
    c
}

pub async fn start_single(c: NodeConfig) -> RunningNode {
    let node = control_plane::start(c).await.expect("node starts");
    wait_leader(&node, Duration::from_secs(10)).await;
    node
}

pub async fn wait_leader(node: &RunningNode, within: Duration) {
    let deadline = Instant::now() + within;
    while node.node.cluster().leader != Some(node.node.id()) || !node.node.is_leader() {
        assert!(
            Instant::now() < deadline,
            "node {} did not become leader",
            node.node.id()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn admin(node: &RunningNode) -> AdminClient {
    AdminClient::new(&node.admin_addr.to_string(), Some(TOKEN.into())).expect("client")
}

pub fn model() -> Value {
    json!({"name": "mixtral-tiny", "architecture": "mixtral", "num_layers": 2, "num_experts": 4, "top_k": 2, "weights": "/models/tiny"})
}

pub fn plan(reason: &str) -> Value {
    json!({
        "model": "mixtral-tiny",
        "reason": reason,
        "instances": [
            {"layer": 0, "expert": 1, "worker": 7, "gpu": 0, "share": 0.5},
            {"layer": 0, "expert": 1, "worker": 7, "gpu": 1, "share": 0.5},
            {"layer": 1, "expert": 3, "worker": 7, "gpu": 0, "share": 1.0}
        ]
    })
}

pub async fn register_worker(raft_addr: std::net::SocketAddr, id: u64) {
    let mut c = proto::worker::worker_service_client::WorkerServiceClient::connect(format!("http://{raft_addr}"))
        .await
        .expect("connect worker service");
    c.register(proto::worker::RegisterRequest {
        worker_id: id,
        address: "127.0.0.1:9000".into(),
        devices: vec![proto::worker::Device {
            index: 0,
            kind: "cpu".into(),
            memory_bytes: 1 << 30,
        }],
        memory_bytes: 1 << 30,
    })
    .await
    .expect("register");
}
