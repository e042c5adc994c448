//! Crash the leader (failpoint `abort`) while clients stream writes, once before its log append
//! is flushed and once after the flush but before the append is acknowledged, then SIGKILL and
//! restart all three nodes from disk: every acknowledged write is there, at the epoch it was
//! acknowledged with, and the cluster keeps committing. For each storage backend.
//!
//! Node processes: see `common::cluster`. The two tests take turns (three processes each on a
//! 2-core CI machine are enough).

mod common;

use std::os::unix::process::ExitStatusExt;
use std::sync::{Arc, Mutex};
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

/// Writers that commit tagged plans through any node and record what was acknowledged.
struct Stream {
    acked: Arc<Mutex<Vec<(String, u64)>>>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Stream {
    fn start(clients: Vec<AdminClient>, writers: usize) -> Self {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let tasks = (0..writers)
            .map(|w| {
                let (clients, acked, stopped) = (clients.clone(), Arc::clone(&acked), stopped.clone());
                tokio::spawn(async move {
                    let mut n = 0usize;
                    while !*stopped.borrow() {
                        n += 1;
                        let tag = format!("w{w}-{n}");
                        match write_any(&clients, &tag, w + n).await {
                            Some(epoch) => acked.lock().expect("acked").push((tag, epoch)),
                            // No node answers yet (an election, restarts): do not spin.
                            None => tokio::time::sleep(Duration::from_millis(20)).await,
                        }
                    }
                })
            })
            .collect();
        Self { acked, stop, tasks }
    }

    fn count(&self) -> usize {
        self.acked.lock().expect("acked").len()
    }

    /// Waits until `more` writes beyond the current count are acknowledged.
    async fn wait_more(&self, more: usize, within: Duration, what: &str) {
        let target = self.count() + more;
        let deadline = Instant::now() + within;
        while self.count() < target {
            assert!(
                Instant::now() < deadline,
                "{what}: only {} of {target} writes acknowledged within {within:?}",
                self.count()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn finish(self) -> Vec<(String, u64)> {
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.await.expect("writer");
        }
        let acked = self.acked.lock().expect("acked").clone();
        acked
    }
}

/// Arms `point=abort` on the leader and waits for it to crash there, with writes flowing before
/// and after; returns the crashed node's index.
async fn crash_leader_at(c: &mut Cluster, stream: &Stream, point: &str) -> usize {
    let leader = c.leader(None, Duration::from_secs(20)).await;
    let li = (leader - 1) as usize;
    stream.wait_more(15, Duration::from_secs(20), "before the crash").await;
    c.arm(li, json!({ point: "abort" })).await;
    let status = c
        .wait_exit(li, Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("leader {leader} did not reach {point} within 10 s"));
    assert_eq!(
        status.signal(),
        Some(6),
        "leader {leader} aborted (SIGABRT): {status:?}"
    );
    assert!(
        c.stderr(li).contains(&format!("failpoint {point}: abort")),
        "the crash was the failpoint's: {}",
        c.stderr(li)
    );
    // The other two elect a leader and go on committing.
    c.leader(Some(leader), Duration::from_secs(20)).await;
    stream
        .wait_more(15, Duration::from_secs(20), &format!("after the crash at {point}"))
        .await;
    li
}

async fn crash_around_flush(storage: StorageKind) {
    let _turn = TURN.lock().await;
    let started = Instant::now();
    let mut c = Cluster::new(storage);
    for i in 0..3 {
        c.start(i);
    }
    let leader = c.leader(None, Duration::from_secs(20)).await;
    setup_model_and_worker(&c, (leader - 1) as usize).await;
    let clients: Vec<AdminClient> = (0..3).map(|i| c.client(i)).collect();
    let stream = Stream::start(clients, 3);

    let crashed = crash_leader_at(&mut c, &stream, "append-before-flush").await;
    c.start(crashed);
    let crashed = crash_leader_at(&mut c, &stream, "append-before-ack").await;
    c.start(crashed);
    stream.wait_more(15, Duration::from_secs(20), "with all three up").await;

    // SIGKILL everything mid-stream, then restart all three from their disks.
    for i in 0..3 {
        c.kill(i);
    }
    let acked = stream.finish().await;
    for i in 0..3 {
        c.start(i);
    }
    let leader = c.leader(None, Duration::from_secs(20)).await;
    let li = (leader - 1) as usize;
    assert_acknowledged(&c, li, &acked).await;
    let latest = acked.iter().map(|(_, e)| *e).max().expect("some writes acknowledged");
    let clients: Vec<AdminClient> = (0..3).map(|i| c.client(i)).collect();
    let epoch = write_any(&clients, "after full restart", li)
        .await
        .expect("the restarted cluster commits");
    assert!(epoch > latest, "epoch {epoch} after {latest}");
    // Every node, crashed twice or not, converges on the same history.
    for i in 0..3 {
        c.wait_epoch(i, epoch, Duration::from_secs(20)).await;
    }
    eprintln!(
        "{storage}: {} acknowledged writes survived two leader crashes and a full restart ({:?})",
        acked.len(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redb_leader_crash_before_and_after_flush_keeps_acknowledged_writes() {
    crash_around_flush(StorageKind::Redb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_leader_crash_before_and_after_flush_keeps_acknowledged_writes() {
    crash_around_flush(StorageKind::Sled).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_leader_crash_before_and_after_flush_keeps_acknowledged_writes() {
    crash_around_flush(StorageKind::Wal).await;
}
