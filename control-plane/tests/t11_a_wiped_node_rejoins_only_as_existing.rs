//! `--initial-cluster-state`: node 1 (the node that bootstraps a group from an empty store)
//! loses its disk while the other two carry on. Started as `new` it must refuse to found a
//! second group and say why; started as `existing` it rejoins, catches up on every acknowledged
//! write, and votes again once caught up (the group then survives losing its leader, which
//! needs node 1's vote). A blank `existing` node withholds its vote until then.
//!
//! Node processes: see `common::cluster`.

mod common;

use std::time::Duration;

use common::cluster::{assert_acknowledged, node_main, setup_model_and_worker, write_any, Cluster};
use control_plane::client::AdminClient;
use control_plane::network::{group_status, raft_client};
use control_plane::{InitialClusterState, NodeConfig, StorageKind};
use proto::raft::RaftMessage;

/// The body of a node process (see `common::cluster`).
#[test]
fn node_process() {
    node_main();
}

async fn write_n(clients: &[AdminClient], prefix: &str, n: usize, acked: &mut Vec<(String, u64)>) {
    for k in 0..n {
        let tag = format!("{prefix}-{k}");
        let epoch = write_any(clients, &tag, k)
            .await
            .unwrap_or_else(|| panic!("write {tag} acknowledged"));
        acked.push((tag, epoch));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_bootstrap_node_refuses_new_and_rejoins_as_existing() {
    let mut c = Cluster::new(StorageKind::Redb);
    for i in 0..3 {
        c.start(i);
    }
    let leader = c.leader(None, Duration::from_secs(20)).await;
    setup_model_and_worker(&c, (leader - 1) as usize).await;
    let clients: Vec<AdminClient> = (0..3).map(|i| c.client(i)).collect();
    let mut acked = Vec::new();
    write_n(&clients, "before", 20, &mut acked).await;

    // Node 1 loses its disk; the other two elect a leader (if node 1 led) and keep committing.
    c.kill(0);
    c.wipe(0);
    let leader = c.leader(Some(1), Duration::from_secs(20)).await;
    write_n(&clients[1..], "without-1", 10, &mut acked).await;

    // As `new`, blank node 1 would bootstrap a second group: it refuses, naming a peer's group.
    c.start(0);
    let status = c
        .wait_exit(0, Duration::from_secs(15))
        .await
        .expect("a blank node 1 started as `new` exits");
    assert!(!status.success(), "it exits non-zero: {status:?}");
    assert!(
        c.stderr(0).contains("already belongs to a Raft group"),
        "it says why: {}",
        c.stderr(0)
    );
    // It founded nothing: the peers' group is untouched and still has the same leader's term.
    let gs = group_status(&c.raft[(leader - 1) as usize].to_string(), None, Duration::from_secs(2))
        .await
        .expect("the leader answers GroupStatus");
    assert!(gs.initialized && gs.leader == Some(leader), "{gs:?}");

    // As `existing`, it rejoins and catches up on every acknowledged write.
    c.start_joining(0);
    let latest = write_any(&clients[1..], "after-rejoin", 0)
        .await
        .expect("the group commits while node 1 catches up");
    acked.push(("after-rejoin".into(), latest));
    c.wait_epoch(0, latest, Duration::from_secs(20)).await;
    assert_acknowledged(&c, (leader - 1) as usize, &acked).await;
    // Caught up: the catch-up marker is gone (within the guard's 100 ms check).
    let marker = c.data_dir(0).join(control_plane::network::CatchUp::MARKER);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while marker.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "node 1 still catching up after applying everything"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Node 1 votes again: kill the leader; the survivors (node 1 and one other) can elect only
    // if node 1 grants or wins a vote.
    let li = (leader - 1) as usize;
    c.kill(li);
    let new_leader = c.leader(Some(leader), Duration::from_secs(20)).await;
    let survivors: Vec<AdminClient> = (0..3).filter(|&i| i != li).map(|i| c.client(i)).collect();
    let epoch = write_any(&survivors, "after-leader-loss", 0)
        .await
        .expect("node 1 and the other survivor commit");
    assert!(epoch > latest);
    eprintln!("node 1 rejoined blank; node {new_leader} leads after node {leader} was killed");
}

/// Vote and PreVote to `addr` with a well-formed request from a candidate (node 2, term 5,
/// empty log).
async fn ask_for_votes(addr: &str) -> Vec<(&'static str, Result<tonic::Response<RaftMessage>, tonic::Status>)> {
    let mut client = raft_client(addr, None).unwrap();
    let vote = serde_json::to_value(openraft::raft::VoteRequest::<control_plane::TypeConfig>::new(
        openraft::Vote::new(5, 2),
        None,
    ))
    .unwrap();
    let msg = || RaftMessage {
        payload: vote.to_string().into_bytes(),
        data: vec![],
    };
    vec![
        ("Vote", client.vote(msg()).await),
        ("PreVote", client.pre_vote(msg()).await),
    ]
}

fn refused(answers: Vec<(&'static str, Result<tonic::Response<RaftMessage>, tonic::Status>)>) {
    for (rpc, answer) in answers {
        let err = answer.expect_err(&format!("{rpc} is refused"));
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{rpc}: {err}");
        assert!(
            err.message().contains("does not vote until it has caught up"),
            "{rpc}: {err}"
        );
    }
}

fn config(id: u64, dir: &std::path::Path, initial: InitialClusterState) -> NodeConfig {
    let mut cfg = NodeConfig::new(id, dir.to_path_buf());
    // Its peers exist only on paper (nothing listens there).
    cfg.peers = [(1, "127.0.0.1:1".to_string()), (2, "127.0.0.1:2".to_string())]
        .into_iter()
        .collect();
    cfg.reconciler = false;
    cfg.initial_state = initial;
    cfg
}

/// A blank node started as `existing` refuses Vote and PreVote until a leader has brought it up
/// to date (here no leader ever reaches it), and keeps refusing after a restart in the middle of
/// catching up, whatever it is restarted as: the marker in its data directory says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blank_existing_node_withholds_its_vote() {
    let dir = tempfile::tempdir().unwrap();
    let node = control_plane::start(config(1, dir.path(), InitialClusterState::Existing))
        .await
        .expect("start");
    let addr = node.raft_addr.to_string();
    let status = group_status(&addr, None, Duration::from_secs(2))
        .await
        .expect("GroupStatus");
    assert!(!status.initialized, "it bootstrapped nothing: {status:?}");
    refused(ask_for_votes(&addr).await);
    assert!(dir.path().join(control_plane::network::CatchUp::MARKER).exists());
    node.shutdown().await;

    let node = control_plane::start(config(1, dir.path(), InitialClusterState::New))
        .await
        .expect("restart");
    refused(ask_for_votes(&node.raft_addr.to_string()).await);
    node.shutdown().await;

    // A `new` node (not the bootstrapper) with an empty store answers: it votes.
    let dir = tempfile::tempdir().unwrap();
    let node = control_plane::start(config(2, dir.path(), InitialClusterState::New))
        .await
        .expect("start");
    for (rpc, answer) in ask_for_votes(&node.raft_addr.to_string()).await {
        let answer = answer.unwrap_or_else(|e| panic!("a `new` node answers {rpc}: {e}"));
        let resp: serde_json::Value = serde_json::from_slice(&answer.into_inner().payload).unwrap();
        assert!(resp.get("vote").is_some(), "{rpc}: {resp}");
    }
    node.shutdown().await;

    // `existing` without peers has no group to join: a configuration error, not a silent hang.
    let dir = tempfile::tempdir().unwrap();
    let mut alone = config(1, dir.path(), InitialClusterState::Existing);
    alone.peers.clear();
    match control_plane::start(alone).await {
        Err(control_plane::NodeError::Config(m)) => assert!(m.contains("--peers"), "{m}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("`existing` without peers started"),
    }
}
