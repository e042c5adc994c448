//! A control-plane disk that fails to fsync (failpoint `append-before-write=error`): the node
//! with the failing disk never acknowledges what it did not persist, stops Raft and exits 1 with
//! a clear message (no panic, so a supervisor restarts it), and the other two carry on. For
//! each storage backend.
//!
//! Node processes: see `common::cluster`. The two tests take turns.

mod common;

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use common::cluster::{assert_acknowledged, node_main, setup_model_and_worker, write_any, Cluster};
use control_plane::client::AdminClient;
use control_plane::StorageKind;
use serde_json::json;

static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The body of a node process (see `common::cluster`).
#[test]
fn node_process() {
    node_main();
}

/// Node `i` exited 1 on its own with the storage error on stderr, and did not panic.
fn assert_clean_storage_exit(c: &Cluster, i: usize, status: Option<ExitStatus>) {
    let stderr = c.stderr(i);
    let status = status.unwrap_or_else(|| panic!("node {} kept running on a failing disk:\n{stderr}", i + 1));
    assert_eq!(status.code(), Some(1), "node {} exit: {status:?}\n{stderr}", i + 1);
    assert!(
        stderr.contains("raft stopped on a fatal error") && stderr.contains("injected I/O error"),
        "node {} says why it stopped:\n{stderr}",
        i + 1
    );
    assert!(!stderr.contains("panicked"), "node {} panicked:\n{stderr}", i + 1);
}

async fn fsync_failure(storage: StorageKind) {
    let _turn = TURN.lock().await;
    let started = Instant::now();
    let mut c = Cluster::new(storage);
    for i in 0..3 {
        c.start(i);
    }
    let clients: Vec<AdminClient> = (0..3).map(|i| c.client(i)).collect();
    let leader = c.leader(None, Duration::from_secs(20)).await;
    let li = (leader - 1) as usize;
    setup_model_and_worker(&c, li).await;
    let mut acked = Vec::new();
    for n in 0..5 {
        let tag = format!("before-{n}");
        let epoch = write_any(&clients, &tag, li).await.expect("healthy cluster commits");
        acked.push((tag, epoch));
    }

    // A follower's disk fails while the other follower is down: the leader's only possible
    // quorum partner is the failing node, so a write can be acknowledged only if that node
    // acknowledges an append it did not persist.
    let failing = (li + 1) % 3;
    let other = (li + 2) % 3;
    c.kill(other);
    c.arm(failing, json!({"append-before-write": "error"})).await;
    let write = tokio::time::timeout(
        Duration::from_secs(3),
        c.client(li)
            .post("/v1/placement", Some(&common::cluster::tagged_plan("unpersisted"))),
    )
    .await;
    assert!(
        !matches!(write, Ok(Ok(_))),
        "a write was acknowledged through a node whose disk failed: {write:?}"
    );
    let status = c.wait_exit(failing, Duration::from_secs(10)).await;
    assert_clean_storage_exit(&c, failing, status);

    // The other follower comes back: leader and it carry on without the failing node.
    c.start(other);
    for n in 0..5 {
        let tag = format!("degraded-{n}");
        let epoch = write_any(&clients, &tag, li).await.expect("two healthy nodes commit");
        acked.push((tag, epoch));
    }

    // Restarted on the same failing disk (armed from MOELESS_FAILPOINTS), it fails its first
    // append again and exits the same way: a supervisor's restart loop, not a panic loop.
    c.start_with_failpoints(failing, "append-before-write=error");
    let status = c.wait_exit(failing, Duration::from_secs(20)).await;
    assert_clean_storage_exit(&c, failing, status);

    // With a working disk it catches up from what it persisted.
    c.start(failing);
    let latest = acked.last().map(|(_, e)| *e).expect("acked");
    c.wait_epoch(failing, latest, Duration::from_secs(20)).await;

    // The leader's disk fails: its write is not acknowledged, it exits, the other two elect a
    // leader and commit.
    let leader = c.leader(None, Duration::from_secs(20)).await;
    let li = (leader - 1) as usize;
    c.arm(li, json!({"append-before-write": "error"})).await;
    let write = tokio::time::timeout(
        Duration::from_secs(3),
        c.client(li).post(
            "/v1/placement",
            Some(&common::cluster::tagged_plan("leader-unpersisted")),
        ),
    )
    .await;
    assert!(
        !matches!(write, Ok(Ok(_))),
        "a leader acknowledged a write its disk failed to persist: {write:?}"
    );
    let status = c.wait_exit(li, Duration::from_secs(10)).await;
    assert_clean_storage_exit(&c, li, status);
    let new_leader = c.leader(Some(leader), Duration::from_secs(20)).await;
    for n in 0..5 {
        let tag = format!("after-leader-failure-{n}");
        let epoch = write_any(&clients, &tag, (new_leader - 1) as usize)
            .await
            .expect("the other two commit");
        acked.push((tag, epoch));
    }
    let nli = (new_leader - 1) as usize;
    assert_acknowledged(&c, nli, &acked).await;

    // Back with a working disk, the old leader catches up too.
    c.start(li);
    let latest = acked.last().map(|(_, e)| *e).expect("acked");
    c.wait_epoch(li, latest, Duration::from_secs(20)).await;
    eprintln!(
        "{storage}: fsync failures on a follower and on the leader, cluster served throughout ({:?})",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redb_fsync_failure_stops_the_node_and_the_cluster_keeps_serving() {
    fsync_failure(StorageKind::Redb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_fsync_failure_stops_the_node_and_the_cluster_keeps_serving() {
    fsync_failure(StorageKind::Sled).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_fsync_failure_stops_the_node_and_the_cluster_keeps_serving() {
    fsync_failure(StorageKind::Wal).await;
}
