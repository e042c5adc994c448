//! What the control-plane benchmarks share: a three-node group on loopback and percentiles.

use std::collections::BTreeMap;
use std::time::Duration;

use control_plane::{NodeConfig, RunningNode, StorageKind};

pub fn free_port() -> anyhow::Result<u16> {
    Ok(chaos_tests::ports::free_port([127, 0, 0, 1].into())?)
}

/// The `p`-quantile of sorted samples (nearest rank), in milliseconds.
pub fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1e3
}

/// Three nodes on loopback, each with its own directory under `dir` and its own admin port,
/// every node given the full peer list (ports are bound first to learn them).
pub async fn three_nodes(kind: StorageKind, dir: &std::path::Path) -> anyhow::Result<Vec<RunningNode>> {
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect::<anyhow::Result<_>>()?;
    let peers: BTreeMap<u64, String> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| (i as u64 + 1, format!("127.0.0.1:{p}")))
        .collect();
    let mut nodes = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let mut c = NodeConfig::new(i as u64 + 1, dir.join(format!("node{}", i + 1)));
        c.raft_addr = format!("127.0.0.1:{port}").parse()?;
        c.admin_addr = format!("127.0.0.1:{}", free_port()?).parse()?;
        c.peers = peers.clone();
        c.storage = kind;
        c.reconciler = false;
        nodes.push(control_plane::start(c).await?);
    }
    Ok(nodes)
}
