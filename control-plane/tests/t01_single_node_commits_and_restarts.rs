//! A single node commits writes to disk before acknowledging them: after a restart from the same
//! directory every acknowledged write is there (including across a snapshot and log compaction),
//! and plan epochs continue where they stopped.

mod common;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_commits_and_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    // Small snapshot interval so the restart goes through snapshot + log replay.
    cfg.snapshot_every = 5;

    let node = start_single(cfg.clone()).await;
    let api = admin(&node);
    register_worker(node.raft_addr, 7).await;
    api.post("/v1/models", Some(&model())).await.expect("model");
    let policy = json!({"placement": "eplb", "predictor": "temporal", "rebalance_interval_ms": 5000, "keep_alive_ms": 1000, "max_replicas_per_expert": 3});
    api.put("/v1/policy", &policy).await.expect("policy");
    for i in 1..=12u64 {
        let r = api
            .post("/v1/placement", Some(&plan(&format!("plan {i}"))))
            .await
            .expect("plan");
        assert_eq!(r["epoch"], i, "epochs increase by one");
    }
    api.put("/v1/predictor", &json!({"name": "ema", "parameters": {"alpha": 0.3}}))
        .await
        .expect("predictor");
    let before = node.node.state_machine().state().await;
    node.shutdown().await;

    // Same directory, fresh ports.
    let node = start_single(cfg).await;
    let api = admin(&node);
    let after = node.node.state_machine().state().await;
    assert_eq!(before, after, "restart keeps every acknowledged write");
    assert_eq!(api.get("/v1/policy").await.expect("policy")["placement"], "eplb");
    assert_eq!(api.get("/v1/placement").await.expect("latest")["epoch"], 12);
    assert_eq!(api.get("/v1/placement/3").await.expect("by epoch")["reason"], "plan 3");
    assert_eq!(api.get("/v1/workers").await.expect("workers")[0]["id"], 7);
    assert_eq!(api.get("/v1/predictor").await.expect("predictor")["version"], 1);
    let r = api
        .post("/v1/placement", Some(&plan("after restart")))
        .await
        .expect("plan");
    assert_eq!(r["epoch"], 13, "epochs continue after a restart");
    // The latest plan of one model; a model without plans has none.
    let of = api
        .get("/v1/placement?model=mixtral-tiny")
        .await
        .expect("latest of the model");
    assert_eq!(
        (of["epoch"].as_u64(), of["reason"].as_str()),
        (Some(13), Some("after restart"))
    );
    let none = api.get("/v1/placement?model=nobody").await.expect_err("no plans");
    assert!(none.to_string().contains("404"), "{none}");
    // Stale compare-and-set is rejected and takes no epoch.
    let mut stale = plan("stale");
    stale["expected_epoch"] = json!(5);
    let err = api.post("/v1/placement", Some(&stale)).await.expect_err("stale plan");
    assert!(err.to_string().contains("409"), "{err}");
    assert_eq!(api.get("/v1/placement").await.expect("latest")["epoch"], 13);
    node.shutdown().await;
}
