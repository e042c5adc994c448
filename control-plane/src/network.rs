//! Raft transport over tonic gRPC: openraft messages are serialized to JSON and carried as bytes
//! in `proto::raft::RaftMessage`; snapshots travel as a stream of pieces. The server side also
//! accepts writes forwarded by followers.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::v2::RaftNetworkV2;
use openraft::network::RPCOption;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::type_config::alias::VoteOf;
use openraft::{OptionalSend, RaftNetworkFactory};
use pki::grpc::GrpcTls;
use proto::raft::raft_service_client::RaftServiceClient;
use proto::raft::raft_service_server::RaftService;
use proto::raft::RaftMessage;
use serde::{Deserialize, Serialize};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::store::Snapshot;
use crate::types::{Command, CommandResponse, NodeId, NodeInfo, Raft, TypeConfig};

/// Largest gRPC message accepted on the Raft service (an AppendEntries batch or a forwarded
/// write; snapshots come in pieces of [`SNAPSHOT_CHUNK_BYTES`]).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Size of one piece of a streamed snapshot.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// Largest snapshot a node accepts (the whole control-plane state; today's are kilobytes to a
/// few megabytes).
pub const MAX_SNAPSHOT_BYTES: u64 = 4 << 30;

fn to_bytes<T: Serialize>(value: &T) -> Result<Vec<u8>, Status> {
    serde_json::to_vec(value).map_err(|e| Status::internal(format!("encoding: {e}")))
}

fn from_bytes<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T, Status> {
    serde_json::from_slice(bytes).map_err(|e| Status::invalid_argument(format!("malformed {what}: {e}")))
}

/// A lazily connected channel to another control-plane node at `addr` (HOST:PORT), with mutual
/// TLS when `tls` is given; connection errors surface per call.
pub fn peer_channel(addr: &str, tls: Option<&GrpcTls>, connect_timeout: Duration) -> Result<Channel, String> {
    Ok(pki::grpc::endpoint(addr, tls)?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .connect_lazy())
}

/// A lazily connected Raft client to `addr` (HOST:PORT); connection errors surface per call.
pub fn raft_client(addr: &str, tls: Option<&GrpcTls>) -> Result<RaftServiceClient<Channel>, String> {
    Ok(raft_client_on(peer_channel(addr, tls, Duration::from_millis(500))?))
}

/// The Raft client on an established (or lazy) channel, with the service's message limits.
pub fn raft_client_on(channel: Channel) -> RaftServiceClient<Channel> {
    RaftServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// Opens a channel to a peer's Raft address in place of TCP (the simulated network of the
/// turmoil partition tests uses one).
pub type Dialer = Arc<dyn Fn(&str) -> Result<Channel, String> + Send + Sync>;

/// Creates one gRPC connection per peer: over TCP, with mutual TLS when `tls` is set, or through
/// `dialer` when one is given.
#[derive(Clone, Default)]
pub struct GrpcNetwork {
    pub tls: Option<GrpcTls>,
    pub dialer: Option<Dialer>,
}

impl RaftNetworkFactory<TypeConfig> for GrpcNetwork {
    type Network = GrpcConnection;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> Self::Network {
        GrpcConnection {
            target,
            addr: node.raft_addr.clone(),
            tls: self.tls.clone(),
            dialer: self.dialer.clone(),
            client: None,
        }
    }
}

pub struct GrpcConnection {
    target: NodeId,
    addr: String,
    tls: Option<GrpcTls>,
    dialer: Option<Dialer>,
    client: Option<RaftServiceClient<Channel>>,
}

fn status_to_rpc(target: NodeId, s: Status) -> RPCError<TypeConfig> {
    let msg = format!("node {target}: {}: {}", s.code(), s.message());
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
            RPCError::Unreachable(Unreachable::from_string(msg))
        }
        _ => RPCError::Network(NetworkError::from_string(msg)),
    }
}

impl GrpcConnection {
    fn client(&mut self) -> Result<RaftServiceClient<Channel>, RPCError<TypeConfig>> {
        if self.client.is_none() {
            let c = match &self.dialer {
                Some(dial) => dial(&self.addr).map(raft_client_on),
                None => raft_client(&self.addr, self.tls.as_ref()),
            }
            .map_err(|e| RPCError::Unreachable(Unreachable::from_string(e)))?;
            self.client = Some(c);
        }
        self.client
            .clone()
            .ok_or_else(|| RPCError::Unreachable(Unreachable::from_string("no client")))
    }

    async fn call<Req: Serialize, Resp: for<'de> Deserialize<'de>, F, Fut>(
        &mut self,
        req: &Req,
        ttl: Duration,
        f: F,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        F: FnOnce(RaftServiceClient<Channel>, RaftMessage) -> Fut,
        Fut: Future<Output = Result<Response<RaftMessage>, Status>>,
    {
        let target = self.target;
        let payload = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let client = self.client()?;
        let msg = RaftMessage {
            payload,
            data: Vec::new(),
        };
        let resp = match tokio::time::timeout(ttl, f(client, msg)).await {
            Ok(Ok(r)) => r,
            Ok(Err(s)) => {
                let e = status_to_rpc(target, s);
                if matches!(e, RPCError::Unreachable(_)) {
                    self.client = None;
                }
                return Err(e);
            }
            Err(_) => {
                // A connection whose packets vanish (a partition that dropped them, a peer
                // gone without a reset) would stall every later call: dial afresh next time.
                self.client = None;
                return Err(RPCError::Unreachable(Unreachable::from_string(format!(
                    "node {target}: timeout"
                ))));
            }
        };
        serde_json::from_slice(&resp.into_inner().payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }
}

impl RaftNetworkV2<TypeConfig> for GrpcConnection {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(
            &rpc,
            option.hard_ttl(),
            |mut c, m| async move { c.append_entries(m).await },
        )
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(&rpc, option.hard_ttl(), |mut c, m| async move { c.vote(m).await })
            .await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(&rpc, option.hard_ttl(), |mut c, m| async move { c.pre_vote(m).await })
            .await
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TypeConfig>,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let target = self.target;
        let header = SnapshotHeader {
            vote,
            meta: snapshot.meta,
            total_bytes: snapshot.snapshot.len() as u64,
        };
        let pieces = snapshot_messages(&header, &snapshot.snapshot).map_err(|e| NetworkError::new(&e))?;
        let mut client = self.client().map_err(|_| Unreachable::from_string("no client"))?;
        let ttl = option.hard_ttl().max(Duration::from_secs(10));
        let send = tokio::time::timeout(ttl, client.install_snapshot(tokio_stream::iter(pieces)));
        let resp = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            r = send => match r {
                Ok(Ok(resp)) => resp,
                Ok(Err(s)) => return Err(NetworkError::from_string(format!("node {target}: {s}")).into()),
                Err(_) => {
                    self.client = None;
                    return Err(Unreachable::from_string(format!("node {target}: snapshot timeout")).into());
                }
            },
        };
        Ok(serde_json::from_slice(&resp.into_inner().payload).map_err(|e| NetworkError::new(&e))?)
    }
}

/// A snapshot as the messages of the InstallSnapshot stream: the header with the first piece,
/// then one message per further [`SNAPSHOT_CHUNK_BYTES`] of `data`.
fn snapshot_messages(header: &SnapshotHeader, data: &[u8]) -> Result<Vec<RaftMessage>, serde_json::Error> {
    let mut pieces: Vec<RaftMessage> = data
        .chunks(SNAPSHOT_CHUNK_BYTES)
        .map(|c| RaftMessage {
            payload: Vec::new(),
            data: c.to_vec(),
        })
        .collect();
    if pieces.is_empty() {
        pieces.push(RaftMessage::default());
    }
    pieces[0].payload = serde_json::to_vec(header)?;
    Ok(pieces)
}

/// Reassembles a streamed snapshot: the header from the first message, the bytes from all of
/// them, checked against the announced size (bounded by [`MAX_SNAPSHOT_BYTES`]).
async fn receive_snapshot<S>(mut stream: S) -> Result<(SnapshotHeader, Vec<u8>), Status>
where
    S: tokio_stream::Stream<Item = Result<RaftMessage, Status>> + Unpin,
{
    let first = stream
        .next()
        .await
        .ok_or_else(|| Status::invalid_argument("InstallSnapshot: empty stream"))??;
    let header: SnapshotHeader = from_bytes("InstallSnapshot", &first.payload)?;
    if header.total_bytes > MAX_SNAPSHOT_BYTES {
        return Err(Status::resource_exhausted(format!(
            "InstallSnapshot: {} bytes announced, at most {MAX_SNAPSHOT_BYTES} accepted",
            header.total_bytes
        )));
    }
    let total = header.total_bytes as usize;
    // Grown as pieces arrive: a peer's announced size alone does not reserve gigabytes.
    let mut data = Vec::with_capacity(total.min(64 * SNAPSHOT_CHUNK_BYTES));
    let mut piece = first.data;
    loop {
        if data.len() + piece.len() > total {
            return Err(Status::invalid_argument(format!(
                "InstallSnapshot: more than the {total} bytes announced"
            )));
        }
        data.extend_from_slice(&piece);
        match stream.next().await {
            Some(msg) => piece = msg?.data,
            None => break,
        }
    }
    if data.len() != total {
        return Err(Status::invalid_argument(format!(
            "InstallSnapshot: stream ended after {} of {total} bytes",
            data.len()
        )));
    }
    Ok((header, data))
}

#[derive(Debug, Serialize, Deserialize)]
struct SnapshotHeader {
    vote: VoteOf<TypeConfig>,
    meta: openraft::type_config::alias::SnapshotMetaOf<TypeConfig>,
    /// Bytes of snapshot data across the whole stream.
    total_bytes: u64,
}

/// Outcome of a write forwarded to the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ForwardedWrite {
    Done { log_index: u64, response: CommandResponse },
    NotLeader { leader: Option<(NodeId, NodeInfo)> },
    Failed { message: String },
}

/// Writes `cmd` through the local Raft node, reporting "not leader" with the leader it knows.
pub async fn write_local(raft: &Raft, cmd: Command) -> ForwardedWrite {
    match raft.client_write(cmd).await {
        Ok(r) => ForwardedWrite::Done {
            log_index: r.log_id.index(),
            response: r.data,
        },
        Err(e) => match e.forward_to_leader() {
            Some(f) => ForwardedWrite::NotLeader {
                leader: f.leader_id.zip(f.leader_node.clone()),
            },
            None => ForwardedWrite::Failed { message: e.to_string() },
        },
    }
}

/// What `RaftService.GroupStatus` answers: whether a node already belongs to a Raft group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub node_id: NodeId,
    /// It holds log entries or has seen a vote: it is a member of some group.
    pub initialized: bool,
    pub term: u64,
    pub leader: Option<NodeId>,
}

/// Asks the node at `addr` whether it already belongs to a Raft group; `None` if it does not
/// answer within `within` (not started yet, unreachable).
pub async fn group_status(addr: &str, tls: Option<&GrpcTls>, within: Duration) -> Option<GroupStatus> {
    let mut client = raft_client(addr, tls).ok()?;
    let answer = tokio::time::timeout(within, client.group_status(RaftMessage::default()))
        .await
        .ok()?
        .ok()?;
    from_bytes("GroupStatus", &answer.into_inner().payload).ok()
}

/// Withholds this node's vote after it joined an existing group with an empty store
/// (`--initial-cluster-state existing`, e.g. a member whose disk was replaced), until it holds
/// everything the group had committed when a leader reached it.
///
/// Raft's safety rests on every voter remembering its vote and its log. A member that lost both
/// would grant its vote to any candidate (an empty log is never more up to date), and a
/// candidate missing a committed entry could then win with it; the entry would be lost. Until
/// the node has applied the commit index of the highest-term leader whose AppendEntries it
/// accepted (or a snapshot covering it), Vote and PreVote are refused (FAILED_PRECONDITION, which
/// a candidate counts as no vote) and the node does not stand for election itself (the node
/// turns its election timer off, see `node::start`). A marker file in the data directory keeps
/// this mode across a restart in the middle of catching up. The guard narrows, but cannot close,
/// one gap: a deposed leader that reaches the blank node before the real one sets a lower
/// target. The safe way back for a member that lost its disk is therefore remove-member, start
/// it with `existing`, add-member: it returns as a learner and Raft promotes it once caught up.
#[derive(Debug)]
pub struct CatchUp {
    /// (term, one past the commit index) of the highest-term leader heard from.
    target: std::sync::Mutex<Option<(u64, u64)>>,
    done: std::sync::atomic::AtomicBool,
    /// Present while catching up; removed once caught up.
    marker: std::path::PathBuf,
}

impl CatchUp {
    /// The marker file's name in the data directory.
    pub const MARKER: &'static str = "catching-up";

    pub fn new(data_dir: &std::path::Path) -> Self {
        Self {
            target: std::sync::Mutex::new(None),
            done: std::sync::atomic::AtomicBool::new(false),
            marker: data_dir.join(Self::MARKER),
        }
    }

    /// Whether a node found `data_dir` in the middle of catching up (it restarted then).
    pub fn pending(data_dir: &std::path::Path) -> bool {
        data_dir.join(Self::MARKER).exists()
    }

    /// Writes the marker (before the node serves anything).
    pub fn mark(&self) -> std::io::Result<()> {
        std::fs::write(&self.marker, b"joined an existing group; not caught up yet\n")
    }

    /// Records a leader's commit index after this node accepted its AppendEntries (or snapshot):
    /// a higher term replaces the target, the same term can only raise it.
    fn saw_leader(&self, term: u64, commit: Option<u64>) {
        let target = commit.map_or(0, |i| i + 1);
        if let Ok(mut t) = self.target.lock() {
            match *t {
                Some((old_term, old)) if old_term > term || (old_term == term && old >= target) => {}
                _ => *t = Some((term, target)),
            }
        }
    }

    pub fn is_done(&self) -> bool {
        self.done.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether this node has caught up (and from then on always): its state machine holds the
    /// target. The first time, removes the marker and says so. Called by the node's catch-up
    /// task (`node::start`), which turns elections back on; votes read [`CatchUp::is_done`].
    pub fn check(&self, raft: &Raft) -> bool {
        if self.is_done() {
            return true;
        }
        let Some((_, target)) = self.target.lock().ok().and_then(|t| *t) else {
            return false;
        };
        let applied = raft
            .metrics()
            .borrow_watched()
            .last_applied
            .as_ref()
            .map_or(0, |l| l.index() + 1);
        if applied < target {
            return false;
        }
        if let Err(e) = std::fs::remove_file(&self.marker) {
            if e.kind() != std::io::ErrorKind::NotFound {
                // Staying in catch-up mode is safe; voting with the marker left would not be
                // after a restart, so do not call it done.
                tracing::warn!(error = %e, marker = %self.marker.display(), "cannot remove the catch-up marker");
                return false;
            }
        }
        tracing::info!(
            applied,
            "caught up with the group; voting and standing for election from now on"
        );
        self.done.store(true, std::sync::atomic::Ordering::Release);
        true
    }
}

/// The gRPC server side of the Raft transport.
pub struct RaftServer {
    pub raft: Raft,
    pub node_id: NodeId,
    /// Set when this node joined an existing group with an empty store (see [`CatchUp`]).
    pub catch_up: Option<Arc<CatchUp>>,
}

impl RaftServer {
    /// A server for a node that votes from the start (its store is its own history, or it
    /// bootstraps a new group).
    pub fn new(raft: Raft, node_id: NodeId) -> Self {
        Self {
            raft,
            node_id,
            catch_up: None,
        }
    }

    /// A server for a node that joined an existing group with an empty store: no vote until it
    /// has caught up (see [`CatchUp`]).
    pub fn joining(raft: Raft, node_id: NodeId, catch_up: Arc<CatchUp>) -> Self {
        Self {
            raft,
            node_id,
            catch_up: Some(catch_up),
        }
    }

    fn check_may_vote(&self) -> Result<(), Status> {
        match &self.catch_up {
            Some(c) if !c.is_done() => Err(Status::failed_precondition(format!(
                "node {} joined an existing group with an empty store and does not vote until it has caught up",
                self.node_id
            ))),
            _ => Ok(()),
        }
    }
}

fn fatal(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("raft node stopped: {e}"))
}

#[tonic::async_trait]
impl RaftService for RaftServer {
    async fn append_entries(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = from_bytes("AppendEntries", &req.into_inner().payload)?;
        let leader = (rpc.vote.leader_id.term, rpc.leader_commit.as_ref().map(|l| l.index()));
        let resp = self.raft.append_entries(rpc).await.map_err(fatal)?;
        if let Some(c) = &self.catch_up {
            // Accepted unless this node has seen a higher vote: the sender leads its term.
            if !matches!(resp, AppendEntriesResponse::HigherVote(_)) {
                c.saw_leader(leader.0, leader.1);
            }
        }
        Ok(Response::new(RaftMessage {
            payload: to_bytes(&resp)?,
            data: Vec::new(),
        }))
    }

    async fn vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.check_may_vote()?;
        let rpc: VoteRequest<TypeConfig> = from_bytes("Vote", &req.into_inner().payload)?;
        let resp = self.raft.vote(rpc).await.map_err(fatal)?;
        Ok(Response::new(RaftMessage {
            payload: to_bytes(&resp)?,
            data: Vec::new(),
        }))
    }

    async fn pre_vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.check_may_vote()?;
        let rpc: VoteRequest<TypeConfig> = from_bytes("PreVote", &req.into_inner().payload)?;
        let resp = self.raft.pre_vote(rpc).await.map_err(fatal)?;
        Ok(Response::new(RaftMessage {
            payload: to_bytes(&resp)?,
            data: Vec::new(),
        }))
    }

    async fn install_snapshot(&self, req: Request<Streaming<RaftMessage>>) -> Result<Response<RaftMessage>, Status> {
        let (header, data) = receive_snapshot(req.into_inner()).await?;
        let leader = (
            header.vote.leader_id.term,
            header.meta.last_log_id.as_ref().map(|l| l.index()),
        );
        let header_vote = header.vote;
        let snapshot = Snapshot {
            meta: header.meta,
            snapshot: data,
        };
        let resp = self
            .raft
            .install_full_snapshot(header.vote, snapshot)
            .await
            .map_err(fatal)?;
        if let Some(c) = &self.catch_up {
            // A leader that sends a snapshot has committed at least what it covers.
            if resp.vote <= header_vote {
                c.saw_leader(leader.0, leader.1);
            }
        }
        Ok(Response::new(RaftMessage {
            payload: to_bytes(&resp)?,
            data: Vec::new(),
        }))
    }

    async fn forward_write(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let cmd: Command = from_bytes("ForwardWrite", &req.into_inner().payload)?;
        let out = write_local(&self.raft, cmd).await;
        Ok(Response::new(RaftMessage {
            payload: to_bytes(&out)?,
            data: Vec::new(),
        }))
    }

    async fn group_status(&self, _req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let initialized = self.raft.is_initialized().await.map_err(fatal)?;
        let m = self.raft.metrics().borrow_watched().clone();
        let status = GroupStatus {
            node_id: self.node_id,
            initialized,
            term: m.current_term,
            leader: m.current_leader,
        };
        Ok(Response::new(RaftMessage {
            payload: to_bytes(&status)?,
            data: Vec::new(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::type_config::alias::SnapshotMetaOf;

    fn header(total_bytes: u64) -> SnapshotHeader {
        SnapshotHeader {
            vote: VoteOf::<TypeConfig>::new(1, 1),
            meta: SnapshotMetaOf::<TypeConfig>::default(),
            total_bytes,
        }
    }

    fn stream(msgs: Vec<RaftMessage>) -> impl tokio_stream::Stream<Item = Result<RaftMessage, Status>> + Unpin {
        tokio_stream::iter(msgs.into_iter().map(Ok))
    }

    #[tokio::test]
    async fn a_snapshot_travels_in_pieces_and_is_reassembled() {
        let data: Vec<u8> = (0..(5 * SNAPSHOT_CHUNK_BYTES / 2)).map(|i| (i % 251) as u8).collect();
        let msgs = snapshot_messages(&header(data.len() as u64), &data).unwrap();
        assert_eq!(msgs.len(), 3);
        assert!(msgs.iter().all(|m| m.data.len() <= SNAPSHOT_CHUNK_BYTES));
        assert!(msgs[1..].iter().all(|m| m.payload.is_empty()));
        let (h, got) = receive_snapshot(stream(msgs)).await.unwrap();
        assert_eq!(h.total_bytes, data.len() as u64);
        assert_eq!(got, data);

        let empty = snapshot_messages(&header(0), &[]).unwrap();
        assert_eq!(empty.len(), 1);
        assert!(receive_snapshot(stream(empty)).await.unwrap().1.is_empty());
    }

    #[tokio::test]
    async fn broken_snapshot_streams_are_refused() {
        let data = vec![7u8; SNAPSHOT_CHUNK_BYTES + 10];
        let mut msgs = snapshot_messages(&header(data.len() as u64), &data).unwrap();
        // Cut short.
        msgs.pop();
        let err = receive_snapshot(stream(msgs.clone())).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        // More than announced.
        msgs.push(RaftMessage {
            payload: Vec::new(),
            data: vec![1; 11],
        });
        let err = receive_snapshot(stream(msgs)).await.unwrap_err();
        assert!(err.message().contains("more than"), "{err}");
        // Absurd size, garbage header, nothing at all.
        let huge = snapshot_messages(&header(MAX_SNAPSHOT_BYTES + 1), &[]).unwrap();
        let err = receive_snapshot(stream(huge)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        let garbage = vec![RaftMessage {
            payload: b"{not json".to_vec(),
            data: Vec::new(),
        }];
        let err = receive_snapshot(stream(garbage)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        let err = receive_snapshot(stream(Vec::new())).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }
}
