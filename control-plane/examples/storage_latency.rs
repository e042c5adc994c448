//! Storage backends side by side: the latency of one durable log append (the backend alone) and
//! of one committed write through a three-node group on loopback (each node on its own disk),
//! redb and sled interleaved in rounds so both see the same machine load.
//!
//! `cargo run -p control-plane --example storage_latency -- [WRITES_PER_ROUND] [ROUNDS]`

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use control_plane::state::PolicyConfig;
use control_plane::store::open_backend;
use control_plane::{Command, Failpoints, StorageKind};

mod common;
use common::{percentile_ms, three_nodes};

fn summary(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    format!(
        "n={} p50={:.2}ms p99={:.2}ms mean={:.2}ms",
        samples.len(),
        percentile_ms(&samples, 0.50),
        percentile_ms(&samples, 0.99),
        mean.as_secs_f64() * 1e3
    )
}

fn append_latency(kind: StorageKind, writes: usize) -> anyhow::Result<Vec<Duration>> {
    let dir = tempfile::tempdir()?;
    let backend = open_backend(kind, dir.path(), Failpoints::default())?;
    let entry = vec![7u8; 256];
    let mut out = Vec::with_capacity(writes);
    for i in 1..=writes as u64 {
        let t = Instant::now();
        backend.append(&[(i, entry.clone())])?;
        out.push(t.elapsed());
    }
    Ok(out)
}

async fn commit_latency(kind: StorageKind, writes: usize) -> anyhow::Result<Vec<Duration>> {
    let dir = tempfile::tempdir()?;
    let nodes = three_nodes(kind, dir.path()).await?;
    let policy = |n: usize| {
        Command::SetPolicy(PolicyConfig {
            placement: format!("bench-{n}"),
            ..PolicyConfig::default()
        })
    };
    // The first write waits out the election.
    nodes[0].node.write(policy(0), Duration::from_secs(20)).await?;
    let mut out = Vec::with_capacity(writes);
    for n in 1..=writes {
        let t = Instant::now();
        nodes[0].node.write(policy(n), Duration::from_secs(5)).await?;
        out.push(t.elapsed());
    }
    for n in nodes {
        n.shutdown().await;
    }
    Ok(out)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let writes: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(200);
    let rounds: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(3);
    let kinds = [StorageKind::Redb, StorageKind::Sled];
    let mut append: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    let mut commit: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    for round in 0..rounds {
        // Alternate which backend goes first.
        for k in 0..2 {
            let kind = kinds[(round + k) % 2];
            let a = tokio::task::spawn_blocking(move || append_latency(kind, writes)).await??;
            append.entry(kind.as_str()).or_default().extend(a);
            let c = commit_latency(kind, writes).await?;
            commit.entry(kind.as_str()).or_default().extend(c);
        }
    }
    for kind in kinds {
        let k = kind.as_str();
        println!("{k:5} backend append (fsync): {}", summary(append[k].clone()));
        println!("{k:5} 3-node commit:          {}", summary(commit[k].clone()));
    }
    Ok(())
}
