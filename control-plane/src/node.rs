//! One control-plane node: storage, the Raft instance, the gRPC server (Raft transport, worker
//! and engine services) and the admin REST server, started together and stopped together.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::raft::ReadPolicy;
use openraft::{ChangeMembers, Config, ServerState};
use pki::grpc::GrpcTls;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::failpoint::Failpoints;
use crate::liveness::{InstanceReport, Liveness, WorkerObservation};
use crate::network::{
    group_status, raft_client, write_local, CatchUp, ForwardedWrite, GrpcNetwork, RaftServer, MAX_MESSAGE_BYTES,
};
use crate::state::{ClusterState, WorkerHealth, WorkerSpec};
use crate::store::{open_backend, LogStore, StateMachineStore, StorageKind};
use crate::types::{Command, CommandResponse, NodeId, NodeInfo, Raft};

/// How a node is started. Built by the CLI (`moeless control-plane`) or by tests.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: NodeId,
    /// Where peers, workers and engines reach this node (gRPC). Port 0 picks a free port.
    pub raft_addr: SocketAddr,
    /// Admin REST API. Port 0 picks a free port.
    pub admin_addr: SocketAddr,
    /// Raft addresses of every voter, this node included; empty means a single-node group.
    pub peers: BTreeMap<NodeId, String>,
    pub data_dir: PathBuf,
    /// Bearer token for the admin API; `None` leaves it open (loopback development only).
    pub admin_token: Option<String>,
    pub heartbeat_ms: u64,
    pub election_timeout_ms: (u64, u64),
    /// Snapshot (and compact the log) after this many applied entries.
    pub snapshot_every: u64,
    /// A worker without a heartbeat for this long is dead (its instances are re-placed).
    pub worker_timeout_ms: u64,
    /// Run the leader's reconciler (dead-worker re-placement, initial plans, the scaling loop).
    /// Tests that commit every plan by hand turn it off.
    pub reconciler: bool,
    /// Where the log, vote and state machine live (`--storage`).
    pub storage: StorageKind,
    /// Crash, I/O-error and stall injection on the storage path (disabled by default).
    pub failpoints: Failpoints,
    /// Mutual TLS on the gRPC listener (clients must present a certificate from the cluster
    /// CA) and on every gRPC client this node opens to its peers. `None` is plaintext, which
    /// the CLI allows only on loopback unless told `--insecure`.
    pub tls: Option<GrpcTls>,
    /// Whether this node may bootstrap a new group (`--initial-cluster-state`).
    pub initial_state: InitialClusterState,
    /// Serve the admin API over HTTPS with these settings (`--admin-https`); `None` is HTTP.
    pub admin_tls: Option<Arc<pki::https::ServerConfig>>,
}

/// How a node with an empty store starts (`--initial-cluster-state`, as etcd names it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum InitialClusterState {
    /// A new group: the lowest-numbered voter bootstraps it, unless a peer already belongs to
    /// one (then it refuses to start rather than found a second group).
    #[default]
    New,
    /// Join the group that already exists: never bootstrap, and vote only after catching up
    /// (a member whose disk was replaced, or one added through `POST /v1/members`).
    Existing,
}

impl InitialClusterState {
    pub fn as_str(self) -> &'static str {
        match self {
            InitialClusterState::New => "new",
            InitialClusterState::Existing => "existing",
        }
    }
}

impl std::fmt::Display for InitialClusterState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown initial cluster state {0:?} (new, existing)")]
pub struct UnknownInitialClusterState(String);

impl std::str::FromStr for InitialClusterState {
    type Err = UnknownInitialClusterState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "new" => Ok(InitialClusterState::New),
            "existing" => Ok(InitialClusterState::Existing),
            _ => Err(UnknownInitialClusterState(s.to_string())),
        }
    }
}

impl NodeConfig {
    pub fn new(id: NodeId, data_dir: PathBuf) -> Self {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            id,
            raft_addr: loopback,
            admin_addr: loopback,
            peers: BTreeMap::new(),
            data_dir,
            admin_token: None,
            heartbeat_ms: 50,
            election_timeout_ms: (200, 400),
            snapshot_every: 1000,
            worker_timeout_ms: 1000,
            reconciler: true,
            storage: StorageKind::default(),
            failpoints: Failpoints::default(),
            tls: None,
            initial_state: InitialClusterState::New,
            admin_tls: None,
        }
    }
}

/// Errors of node operations, mapped to HTTP and gRPC statuses at the edges.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("not the leader; the leader is node {leader_id} at {raft_addr} (admin {admin_addr})")]
    NotLeader {
        leader_id: NodeId,
        raft_addr: String,
        admin_addr: String,
    },
    #[error("no leader is known yet (election in progress)")]
    NoLeader,
    #[error("rejected by the state machine: {0}")]
    Rejected(String),
    #[error("raft: {0}")]
    Raft(String),
    #[error("storage: {0}")]
    Storage(String),
    /// Raft stopped on this node (a storage write failed); it serves nothing until restarted.
    #[error("raft stopped on a fatal error: {0}; restart the node so it recovers from what its disk holds")]
    Fatal(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error("TLS on the gRPC listener: {0}")]
    Tls(String),
    /// `--initial-cluster-state new` on an empty store while a peer already belongs to a group:
    /// bootstrapping would found a second group beside it.
    #[error(
        "this node's store is empty but peer {peer} at {addr} already belongs to a Raft group (term {term}); \
         refusing to bootstrap a second group. If this node lost its data, remove it (DELETE /v1/members/{node}), \
         re-add it (POST /v1/members) and start it with --initial-cluster-state existing"
    )]
    GroupExists {
        node: NodeId,
        peer: NodeId,
        addr: String,
        term: u64,
    },
    #[error("binding {what} on {addr}: {message}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        message: String,
    },
}

/// Per-expert token counts reported by workers and engines, kept on the node that received them
/// (observed state, not replicated; the leader's scaling loop reads it).
#[derive(Debug, Default, Clone, Serialize)]
pub struct LoadBoard {
    /// (layer, expert) -> tokens in the latest reports, summed over reporters.
    pub tokens: BTreeMap<(u32, u32), u64>,
    pub reports: u64,
    /// worker -> epoch it says it has reconciled to.
    pub worker_epochs: BTreeMap<u64, u64>,
    /// (layer, expert) -> tokens reported since the last scaling round (its load window).
    pub recent: BTreeMap<(u32, u32), u64>,
    /// The window before: what the last round planned from, i.e. its forecast of this window.
    #[serde(skip)]
    pub previous: BTreeMap<(u32, u32), u64>,
}

/// A worker as this node sees it: the replicated record and the latest heartbeat it received.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerView {
    #[serde(flatten)]
    pub spec: WorkerSpec,
    /// Health as seen by this node (see `Liveness::health`).
    pub health: WorkerHealth,
    /// Health in the replicated state.
    pub replicated_health: WorkerHealth,
    /// Milliseconds since its last heartbeat reached this node; `None` if none did.
    pub heartbeat_age_ms: Option<u64>,
    pub applied_epoch: u64,
    pub memory_used_bytes: u64,
    pub memory_budget_bytes: u64,
    /// Instances its latest heartbeat reported.
    pub instances: usize,
}

struct Shared {
    id: NodeId,
    info: NodeInfo,
    raft: Raft,
    sm: StateMachineStore,
    loads: Mutex<LoadBoard>,
    liveness: Mutex<Liveness>,
    /// (term, when this node was first seen leading in it).
    leader_since: Mutex<Option<(u64, Instant)>>,
    /// Serialises scaling rounds (loop and POST /v1/rebalance); holds when the last one ran.
    scaling: tokio::sync::Mutex<Instant>,
    admin_token: Option<String>,
    /// Fresh idempotency keys: `node-ID-NONCE-SEQ`, the nonce drawn at start so a restarted
    /// node never reuses its previous keys.
    boot_nonce: u64,
    write_seq: std::sync::atomic::AtomicU64,
    failpoints: Failpoints,
    tls: Option<GrpcTls>,
    /// True once the node stops: long-lived server streams (WatchPlan) end, so that the gRPC
    /// server's graceful stop does not wait on clients that would hold them forever.
    stopping: watch::Sender<bool>,
}

/// A cheap handle to a running node, used by the admin API and the gRPC services.
#[derive(Clone)]
pub struct Node {
    shared: Arc<Shared>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Member {
    pub id: NodeId,
    pub raft_addr: String,
    pub admin_addr: String,
    pub voter: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterView {
    pub id: NodeId,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub state: String,
    pub members: Vec<Member>,
    pub last_applied: Option<u64>,
    pub epoch: u64,
}

impl Node {
    pub fn id(&self) -> NodeId {
        self.shared.id
    }
    pub fn info(&self) -> &NodeInfo {
        &self.shared.info
    }
    pub fn raft(&self) -> &Raft {
        &self.shared.raft
    }
    pub fn state_machine(&self) -> &StateMachineStore {
        &self.shared.sm
    }

    /// Resolves once the node has begun to stop.
    pub async fn stopping(&self) {
        let mut rx = self.shared.stopping.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }
    pub fn admin_token(&self) -> Option<&str> {
        self.shared.admin_token.as_deref()
    }
    pub fn failpoints(&self) -> &Failpoints {
        &self.shared.failpoints
    }
    /// The TLS settings of this node's gRPC links (`None`: plaintext).
    pub fn grpc_tls(&self) -> Option<&GrpcTls> {
        self.shared.tls.as_ref()
    }

    pub fn cluster(&self) -> ClusterView {
        let m = self.shared.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, n)| Member {
                id: *id,
                raft_addr: n.raft_addr.clone(),
                admin_addr: n.admin_addr.clone(),
                voter: voters.contains(id),
            })
            .collect();
        ClusterView {
            id: self.shared.id,
            leader: m.current_leader,
            term: m.current_term,
            state: format!("{:?}", m.state),
            members,
            last_applied: m.last_applied.as_ref().map(|l| l.index()),
            epoch: *self.shared.sm.watch_epoch().borrow(),
        }
    }

    /// The leader this node knows of, with its addresses (`None` during an election).
    pub fn leader_info(&self) -> Option<(NodeId, NodeInfo)> {
        let m = self.shared.raft.metrics().borrow_watched().clone();
        let leader = m.current_leader?;
        let info = m
            .membership_config
            .membership()
            .nodes()
            .find(|(id, _)| **id == leader)
            .map(|(_, n)| n.clone())?;
        Some((leader, info))
    }

    /// When this node became leader of the current term; `None` unless it leads now.
    pub fn leader_since(&self) -> Option<Instant> {
        let m = self.shared.raft.metrics().borrow_watched().clone();
        let mut since = self.shared.leader_since.lock().ok()?;
        if m.state != ServerState::Leader {
            *since = None;
            return None;
        }
        match *since {
            Some((term, at)) if term == m.current_term => Some(at),
            _ => {
                let now = Instant::now();
                *since = Some((m.current_term, now));
                Some(now)
            }
        }
    }

    pub(crate) fn leader_error(&self) -> NodeError {
        let m = self.shared.raft.metrics().borrow_watched().clone();
        match m.current_leader {
            Some(leader_id) => {
                let node = m
                    .membership_config
                    .membership()
                    .nodes()
                    .find(|(id, _)| **id == leader_id)
                    .map(|(_, n)| n.clone());
                let node = node.unwrap_or_default();
                NodeError::NotLeader {
                    leader_id,
                    raft_addr: node.raft_addr,
                    admin_addr: node.admin_addr,
                }
            }
            None => NodeError::NoLeader,
        }
    }

    /// Commits `cmd` through Raft: locally on the leader, forwarded over gRPC from a follower.
    /// Waits up to `wait` for a leader when an election is in progress.
    pub async fn write(&self, cmd: Command, wait: Duration) -> Result<(u64, CommandResponse), NodeError> {
        self.write_keyed(None, cmd, wait).await
    }

    /// [`Node::write`] under an idempotency key: `None` draws a fresh one, so this call's own
    /// retries (after a forward that timed out, or a leader that lost its term after appending)
    /// apply the command once; a client that retries across calls passes its own key
    /// (`Idempotency-Key` on the admin API) and gets the first answer back.
    pub async fn write_keyed(
        &self,
        key: Option<String>,
        cmd: Command,
        wait: Duration,
    ) -> Result<(u64, CommandResponse), NodeError> {
        let key = key.unwrap_or_else(|| {
            let seq = self.shared.write_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            format!("node-{}-{}-{seq}", self.shared.id, self.shared.boot_nonce)
        });
        let cmd = cmd.keyed(key);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let outcome = match write_local(&self.shared.raft, cmd.clone()).await {
                ForwardedWrite::NotLeader {
                    leader: Some((leader_id, info)),
                } if leader_id != self.shared.id => {
                    forward(&info, &cmd, self.grpc_tls())
                        .await
                        .unwrap_or(ForwardedWrite::NotLeader {
                            leader: Some((leader_id, info)),
                        })
                }
                other => other,
            };
            match outcome {
                ForwardedWrite::Done {
                    log_index,
                    response: CommandResponse::Rejected { reason },
                } => {
                    tracing::debug!(log_index, %reason, "command rejected");
                    return Err(NodeError::Rejected(reason));
                }
                ForwardedWrite::Done { log_index, response } => return Ok((log_index, response)),
                ForwardedWrite::Failed { message } => return Err(NodeError::Raft(message)),
                ForwardedWrite::NotLeader { leader } => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(match leader {
                            Some((leader_id, info)) => NodeError::NotLeader {
                                leader_id,
                                raft_addr: info.raft_addr,
                                admin_addr: info.admin_addr,
                            },
                            None => NodeError::NoLeader,
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// The applied state after a ReadIndex round on the leader (linearizable); on a follower,
    /// `NotLeader`/`NoLeader`.
    pub async fn linearizable_state(&self) -> Result<ClusterState, NodeError> {
        match self.shared.raft.ensure_linearizable(ReadPolicy::ReadIndex).await {
            Ok(_) => Ok(self.shared.sm.state().await),
            Err(e) if e.forward_to_leader().is_some() => Err(self.leader_error()),
            Err(e) => Err(NodeError::Raft(e.to_string())),
        }
    }

    /// Linearizable on the leader, the local applied state on a follower (which may lag).
    pub async fn read_state(&self) -> ClusterState {
        match self.linearizable_state().await {
            Ok(s) => s,
            Err(_) => self.shared.sm.state().await,
        }
    }

    pub async fn add_member(&self, id: NodeId, info: NodeInfo) -> Result<(), NodeError> {
        let raft = &self.shared.raft;
        let map = |e: openraft::errors::RaftError<_, openraft::errors::ClientWriteError<_>>| {
            if e.forward_to_leader().is_some() {
                self.leader_error()
            } else {
                NodeError::Raft(e.to_string())
            }
        };
        raft.add_learner(id, info, true).await.map_err(map)?;
        raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(map)?;
        Ok(())
    }

    pub async fn remove_member(&self, id: NodeId) -> Result<(), NodeError> {
        let raft = &self.shared.raft;
        let res = raft
            .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) if e.forward_to_leader().is_some() => Err(self.leader_error()),
            Err(e) => Err(NodeError::Raft(e.to_string())),
        }
    }

    pub fn record_loads(&self, loads: impl IntoIterator<Item = ((u32, u32), u64)>) {
        if let Ok(mut board) = self.shared.loads.lock() {
            board.reports += 1;
            for (key, tokens) in loads {
                *board.tokens.entry(key).or_default() += tokens;
                *board.recent.entry(key).or_default() += tokens;
            }
        }
    }

    /// The loads reported since the last call (the scaling round's window), emptying it, and the
    /// window the previous call returned (the forecast a round plans from is its window).
    pub fn take_recent_loads(&self) -> (crate::placement::ExpertLoads, crate::placement::ExpertLoads) {
        self.shared
            .loads
            .lock()
            .map(|mut b| {
                let recent = std::mem::take(&mut b.recent);
                let previous = std::mem::replace(&mut b.previous, recent.clone());
                (recent, previous)
            })
            .unwrap_or_default()
    }

    /// Records a heartbeat that reached this node now.
    pub fn record_heartbeat(&self, worker: u64, observation: WorkerObservation) {
        self.record_worker_epoch(worker, observation.applied_epoch);
        if let Ok(mut l) = self.shared.liveness.lock() {
            l.record(worker, observation);
        }
    }

    /// Runs `f` on this node's heartbeat observations.
    pub fn with_liveness<T>(&self, f: impl FnOnce(&Liveness) -> T) -> Option<T> {
        self.shared.liveness.lock().ok().map(|l| f(&l))
    }

    /// The instances the latest heartbeat of `worker` reported to this node.
    pub fn worker_instances(&self, worker: u64) -> Option<Vec<InstanceReport>> {
        self.with_liveness(|l| l.observation(worker).map(|o| o.instances.clone()))
            .flatten()
    }

    /// Every registered worker of `state` with its liveness as seen by this node.
    pub fn worker_views(&self, state: &ClusterState) -> Vec<WorkerView> {
        let since = self.leader_since();
        let now = Instant::now();
        self.with_liveness(|l| {
            state
                .workers
                .values()
                .map(|w| {
                    let seen = l.observation(w.spec.id);
                    WorkerView {
                        spec: w.spec.clone(),
                        health: l.health(w.spec.id, w.health, since, now),
                        replicated_health: w.health,
                        heartbeat_age_ms: l.age(w.spec.id, now).map(|a| a.as_millis() as u64),
                        applied_epoch: seen.map_or(0, |o| o.applied_epoch),
                        memory_used_bytes: seen.map_or(0, |o| o.memory_used_bytes),
                        memory_budget_bytes: seen.map_or(0, |o| o.memory_budget_bytes),
                        instances: seen.map_or(0, |o| o.instances.len()),
                    }
                })
                .collect()
        })
        .unwrap_or_default()
    }

    /// Locks the scaling round; holds when the previous round ran.
    pub(crate) async fn scaling_round(&self) -> tokio::sync::MutexGuard<'_, Instant> {
        self.shared.scaling.lock().await
    }

    pub fn record_worker_epoch(&self, worker: u64, epoch: u64) {
        if let Ok(mut board) = self.shared.loads.lock() {
            board.worker_epochs.insert(worker, epoch);
        }
    }

    pub fn loads(&self) -> LoadBoard {
        self.shared.loads.lock().map(|b| b.clone()).unwrap_or_default()
    }

    /// If this node leads: transfers leadership to the voter with the most replicated log and
    /// waits until another node leads (or `wait` passes). Answers whether leadership moved.
    pub async fn step_down(&self, wait: Duration) -> bool {
        let raft = &self.shared.raft;
        let m = raft.metrics().borrow_watched().clone();
        if m.state != ServerState::Leader {
            return false;
        }
        let voters: BTreeSet<NodeId> = m.membership_config.membership().voter_ids().collect();
        let target = m.replication.as_ref().and_then(|r| {
            r.iter()
                .filter(|(id, _)| **id != self.shared.id && voters.contains(id))
                .max_by_key(|(_, matched)| matched.as_ref().map(|l| l.index()))
                .map(|(id, _)| *id)
        });
        let Some(target) = target else {
            return false;
        };
        tracing::info!(
            id = self.shared.id,
            to = target,
            "stepping down: transferring leadership"
        );
        if let Err(e) = raft.trigger().transfer_leader(target).await {
            tracing::warn!(error = %e, "leadership transfer");
            return false;
        }
        let moved = raft
            .wait(Some(wait))
            .metrics(
                |m| m.current_leader.is_some_and(|l| l != self.shared.id),
                "another node leads",
            )
            .await
            .is_ok();
        if !moved {
            tracing::warn!(to = target, "leadership did not move within {wait:?}; stopping anyway");
        }
        moved
    }

    pub fn is_leader(&self) -> bool {
        let m = self.shared.raft.metrics().borrow_watched().clone();
        m.state == ServerState::Leader
    }
}

const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);

async fn forward(leader: &NodeInfo, cmd: &Command, tls: Option<&GrpcTls>) -> Option<ForwardedWrite> {
    let mut client = raft_client(&leader.raft_addr, tls).ok()?;
    let payload = serde_json::to_vec(cmd).ok()?;
    let msg = proto::raft::RaftMessage {
        payload,
        data: Vec::new(),
    };
    // Shorter than a failover: a write stuck on a leader that died is retried on the new one
    // (safe, the command is keyed) instead of outliving the election.
    let resp = tokio::time::timeout(FORWARD_TIMEOUT, client.forward_write(msg))
        .await
        .ok()?
        .ok()?;
    serde_json::from_slice(&resp.into_inner().payload).ok()
}

/// A running node and its server tasks.
pub struct RunningNode {
    pub node: Node,
    pub raft_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    stop: Vec<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
    /// Set once if Raft stops on a fatal error.
    fatal: watch::Receiver<Option<String>>,
}

impl RunningNode {
    /// Stops the servers and Raft and releases the storage files.
    /// A graceful stop (SIGTERM, SIGINT, a rolling restart): a leader first hands leadership
    /// to the most caught-up voter and waits (up to `wait`) until it has, so the group does not
    /// sit through an election timeout and writes in flight here are forwarded to the new
    /// leader (they are keyed, so none applies twice); then [`RunningNode::shutdown`].
    pub async fn stop_gracefully(self, wait: Duration) {
        self.node.step_down(wait).await;
        self.shutdown().await
    }

    pub async fn shutdown(mut self) {
        self.node.shared.stopping.send_replace(true);
        for s in self.stop.drain(..) {
            let _ = s.send(());
        }
        if let Err(e) = self.node.shared.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        for t in self.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }

    /// Resolves when Raft has stopped on a fatal error (a storage write failed): the node can
    /// no longer persist anything, so the caller should exit and let a supervisor restart it.
    pub fn fatal(&self) -> impl std::future::Future<Output = NodeError> + Send + 'static {
        let mut rx = self.fatal.clone();
        async move {
            let reason = rx
                .wait_for(Option::is_some)
                .await
                .map(|r| r.clone().unwrap_or_default());
            match reason {
                Ok(reason) => NodeError::Fatal(reason),
                // Raft stopped normally (shutdown): never fatal.
                Err(_) => std::future::pending().await,
            }
        }
    }

    /// Runs until Raft stops on a fatal error (returned) or the servers stop.
    pub async fn wait(mut self) -> Result<(), NodeError> {
        let fatal = self.fatal();
        let tasks = futures_util::future::join_all(self.tasks.drain(..));
        tokio::select! {
            e = fatal => Err(e),
            _ = tasks => Ok(()),
        }
    }
}

/// Watches Raft's metrics and reports a fatal stop (anything but a requested shutdown).
fn watch_fatal(raft: &Raft, id: NodeId) -> watch::Receiver<Option<String>> {
    let (tx, rx) = watch::channel(None);
    let mut metrics = raft.metrics();
    tokio::spawn(async move {
        loop {
            let running = metrics.borrow_watched().running_state.clone();
            if let Err(fatal) = running {
                if !matches!(fatal, openraft::errors::Fatal::Stopped) {
                    tracing::error!(id, error = %fatal, "raft stopped on a fatal error");
                    let _ = tx.send(Some(fatal.to_string()));
                }
                return;
            }
            if metrics.changed().await.is_err() {
                return;
            }
        }
    });
    rx
}

/// Opens the node's storage (log, vote, state machine) and starts Raft on it over `network`:
/// the Raft layer of [`start`] without its listeners (the turmoil partition tests run it on a
/// simulated network).
pub async fn open_raft(config: &NodeConfig, network: GrpcNetwork) -> Result<(Raft, StateMachineStore), NodeError> {
    let dir = config.data_dir.clone();
    let (kind, failpoints) = (config.storage, config.failpoints.clone());
    let backend = tokio::task::spawn_blocking(move || open_backend(kind, &dir, failpoints))
        .await
        .map_err(|e| NodeError::Storage(e.to_string()))?
        .map_err(|e| NodeError::Storage(e.to_string()))?;
    let sm = StateMachineStore::open(Arc::clone(&backend), config.failpoints.clone())
        .await
        .map_err(|e| NodeError::Storage(e.to_string()))?;
    let log = LogStore::new(backend, config.failpoints.clone());

    let raft_config = Config {
        cluster_name: "moeless".into(),
        heartbeat_interval: config.heartbeat_ms,
        election_timeout_min: config.election_timeout_ms.0,
        election_timeout_max: config.election_timeout_ms.1,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.snapshot_every),
        max_in_snapshot_log_to_keep: 100,
        ..Default::default()
    };
    let raft_config = Arc::new(raft_config.validate().map_err(|e| NodeError::Raft(e.to_string()))?);
    let raft = Raft::new(config.id, raft_config, network, log, sm.clone())
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?;
    Ok((raft, sm))
}

/// Bootstraps a new group when this node is the lowest-numbered voter of `config.peers` (or
/// alone) and its store holds no Raft state yet; any other node waits to be contacted.
pub async fn initialize_if_first(raft: &Raft, config: &NodeConfig, info: &NodeInfo) -> Result<(), NodeError> {
    let initialized = raft
        .is_initialized()
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?;
    if initialized || !bootstraps(config) {
        return Ok(());
    }
    let mut members: BTreeMap<NodeId, NodeInfo> = config
        .peers
        .iter()
        .map(|(id, addr)| {
            (
                *id,
                NodeInfo {
                    raft_addr: addr.clone(),
                    admin_addr: String::new(),
                },
            )
        })
        .collect();
    members.insert(config.id, info.clone());
    tracing::info!(id = config.id, voters = members.len(), "initializing a new Raft group");
    raft.initialize(members)
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))
}

/// Whether this node bootstraps the group when its store is empty: `new` and the lowest id.
fn bootstraps(config: &NodeConfig) -> bool {
    let lowest = config.peers.keys().next().copied().unwrap_or(config.id);
    lowest == config.id && config.initial_state == InitialClusterState::New
}

/// Called on the bootstrapping node with an empty store before it serves anything: either the
/// cluster is new, or this node lost its disk while its peers carried on. Peers that answer
/// tell which; no peer can belong to a group this node has not founded yet, so a fresh cluster
/// never trips this, whatever order its nodes start in.
async fn refuse_second_group(config: &NodeConfig) -> Result<(), NodeError> {
    for (peer, addr) in config.peers.iter().filter(|(p, _)| **p != config.id) {
        if let Some(status) = group_status(addr, config.tls.as_ref(), Duration::from_secs(1)).await {
            if status.initialized {
                return Err(NodeError::GroupExists {
                    node: config.id,
                    peer: *peer,
                    addr: addr.clone(),
                    term: status.term,
                });
            }
        }
    }
    Ok(())
}

/// Opens storage, starts Raft and both servers, and bootstraps a new group if this node is the
/// lowest-numbered voter and the store is empty.
pub async fn start(config: NodeConfig) -> Result<RunningNode, NodeError> {
    let bind = |what: &'static str, addr: SocketAddr| async move {
        TcpListener::bind(addr).await.map_err(|e| NodeError::Bind {
            what,
            addr,
            message: e.to_string(),
        })
    };
    if config.initial_state == InitialClusterState::Existing && config.peers.is_empty() {
        return Err(NodeError::Config(
            "--initial-cluster-state existing needs --peers: a node alone has no group to join".into(),
        ));
    }
    let raft_listener = bind("raft gRPC", config.raft_addr).await?;
    let admin_listener = bind("admin API", config.admin_addr).await?;
    let local = |l: &TcpListener, what, addr| {
        l.local_addr().map_err(|e| NodeError::Bind {
            what,
            addr,
            message: e.to_string(),
        })
    };
    let raft_addr = local(&raft_listener, "raft gRPC", config.raft_addr)?;
    let admin_addr = local(&admin_listener, "admin API", config.admin_addr)?;

    let network = GrpcNetwork {
        tls: config.tls.clone(),
        dialer: None,
    };
    let (raft, sm) = open_raft(&config, network).await?;
    let fatal = watch_fatal(&raft, config.id);
    let empty_store = !raft
        .is_initialized()
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?;
    if empty_store && bootstraps(&config) {
        if let Err(e) = refuse_second_group(&config).await {
            let _ = raft.shutdown().await;
            return Err(e);
        }
    }
    // Catching up: joined with an empty store, or restarted before it had caught up.
    let catch_up = (CatchUp::pending(&config.data_dir)
        || (empty_store && config.initial_state == InitialClusterState::Existing))
        .then(|| Arc::new(CatchUp::new(&config.data_dir)));
    let raft_server = match &catch_up {
        Some(c) => {
            c.mark()
                .map_err(|e| NodeError::Storage(format!("writing the catch-up marker: {e}")))?;
            // Neither vote for others nor stand for election until caught up.
            raft.runtime_config().elect(false);
            tracing::info!(
                id = config.id,
                "joining an existing group: no vote and no candidacy until caught up"
            );
            RaftServer::joining(raft.clone(), config.id, c.clone())
        }
        None => RaftServer::new(raft.clone(), config.id),
    };

    // How peers, workers and engines reach this node: its own --peers entry when there is one
    // (a DNS name, or an address other than a wildcard bind such as 0.0.0.0), else the bound one.
    let info = NodeInfo {
        raft_addr: config
            .peers
            .get(&config.id)
            .cloned()
            .unwrap_or_else(|| raft_addr.to_string()),
        admin_addr: admin_addr.to_string(),
    };
    let node = Node {
        shared: Arc::new(Shared {
            id: config.id,
            info: info.clone(),
            raft: raft.clone(),
            sm,
            loads: Mutex::new(LoadBoard::default()),
            liveness: Mutex::new(Liveness::new(Duration::from_millis(config.worker_timeout_ms))),
            leader_since: Mutex::new(None),
            scaling: tokio::sync::Mutex::new(Instant::now()),
            admin_token: config.admin_token.clone(),
            boot_nonce: rand::random(),
            write_seq: std::sync::atomic::AtomicU64::new(0),
            failpoints: config.failpoints.clone(),
            tls: config.tls.clone(),
            stopping: watch::Sender::new(false),
        }),
    };

    let mut stop = Vec::new();
    let mut tasks = Vec::new();

    let (tx, rx) = oneshot::channel::<()>();
    stop.push(tx);
    let mut grpc = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        grpc = grpc
            .tls_config(tls.server_config())
            .map_err(|e| NodeError::Tls(e.to_string()))?;
    }
    let grpc = grpc
        .add_service(
            proto::raft::raft_service_server::RaftServiceServer::new(raft_server)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            proto::worker::worker_service_server::WorkerServiceServer::new(crate::services::WorkerApi::new(
                node.clone(),
            ))
            .max_decoding_message_size(proto::MAX_SERVICE_MESSAGE_BYTES)
            .max_encoding_message_size(proto::MAX_SERVICE_MESSAGE_BYTES),
        )
        .add_service(
            proto::engine::engine_service_server::EngineServiceServer::new(crate::services::EngineApi::new(
                node.clone(),
            ))
            .max_decoding_message_size(proto::MAX_SERVICE_MESSAGE_BYTES)
            .max_encoding_message_size(proto::MAX_SERVICE_MESSAGE_BYTES),
        );
    // TCP_NODELAY on every accepted connection (as on the client side): a small response
    // held back by Nagle behind a delayed ACK stalls a Raft round trip by 40 ms.
    let incoming = tonic::transport::server::TcpIncoming::from(raft_listener).with_nodelay(Some(true));
    tasks.push(tokio::spawn(async move {
        if let Err(e) = grpc
            .serve_with_incoming_shutdown(incoming, async { rx.await.unwrap_or(()) })
            .await
        {
            tracing::error!(error = %e, "gRPC server stopped");
        }
    }));

    let (tx, rx) = oneshot::channel::<()>();
    stop.push(tx);
    let app = crate::admin::router(node.clone());
    let admin_tls = config.admin_tls.clone();
    tasks.push(tokio::spawn(async move {
        let stopped = async { rx.await.unwrap_or(()) };
        if let Err(e) = pki::https::serve(admin_listener, app, admin_tls, stopped).await {
            tracing::error!(error = %e, "admin server stopped");
        }
    }));

    if let Some(c) = catch_up {
        // The one place that decides "caught up": votes are granted and elections run from then on.
        let (tx, mut rx) = oneshot::channel::<()>();
        stop.push(tx);
        let raft = raft.clone();
        tasks.push(tokio::spawn(async move {
            while !c.check(&raft) {
                tokio::select! {
                    _ = &mut rx => return,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
            raft.runtime_config().elect(true);
        }));
    }

    if config.reconciler {
        let (tx, rx) = oneshot::channel::<()>();
        stop.push(tx);
        tasks.push(tokio::spawn(crate::reconciler::run(node.clone(), rx)));
    }

    initialize_if_first(&raft, &config, &info).await?;
    tracing::info!(id = config.id, %raft_addr, %admin_addr, storage = %config.storage, "control-plane node started");
    Ok(RunningNode {
        node,
        raft_addr,
        admin_addr,
        stop,
        tasks,
        fatal,
    })
}
