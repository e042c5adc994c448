//! Raft transport over tonic gRPC: openraft messages are serialized to JSON and carried as bytes
//! in `proto::raft::RaftMessage`. The server side also accepts writes forwarded by followers.

use std::future::Future;
use std::time::Duration;

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
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::store::Snapshot;
use crate::types::{Command, CommandResponse, NodeId, NodeInfo, Raft, TypeConfig};

/// Largest gRPC message accepted: snapshots travel in one message.
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

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
    let channel = peer_channel(addr, tls, Duration::from_millis(500))?;
    Ok(RaftServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// Creates one gRPC connection per peer, with mutual TLS when `tls` is set.
#[derive(Clone, Default)]
pub struct GrpcNetwork {
    pub tls: Option<GrpcTls>,
}

impl RaftNetworkFactory<TypeConfig> for GrpcNetwork {
    type Network = GrpcConnection;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> Self::Network {
        GrpcConnection {
            target,
            addr: node.raft_addr.clone(),
            tls: self.tls.clone(),
            client: None,
        }
    }
}

pub struct GrpcConnection {
    target: NodeId,
    addr: String,
    tls: Option<GrpcTls>,
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
            let c = raft_client(&self.addr, self.tls.as_ref())
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
            Ok(r) => r.map_err(|s| status_to_rpc(target, s))?,
            Err(_) => {
                return Err(RPCError::Unreachable(Unreachable::from_string(format!(
                    "node {target}: timeout"
                ))))
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
        _cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let target = self.target;
        let header = SnapshotHeader {
            vote,
            meta: snapshot.meta,
        };
        let payload = serde_json::to_vec(&header).map_err(|e| NetworkError::new(&e))?;
        let mut client = self.client().map_err(|_| Unreachable::from_string("no client"))?;
        let msg = RaftMessage {
            payload,
            data: snapshot.snapshot,
        };
        let ttl = option.hard_ttl().max(Duration::from_secs(10));
        let resp = tokio::time::timeout(ttl, client.install_snapshot(msg))
            .await
            .map_err(|_| Unreachable::from_string(format!("node {target}: snapshot timeout")))?
            .map_err(|s| NetworkError::from_string(format!("node {target}: {s}")))?;
        Ok(serde_json::from_slice(&resp.into_inner().payload).map_err(|e| NetworkError::new(&e))?)
    }
}

#[derive(Serialize, Deserialize)]
struct SnapshotHeader {
    vote: VoteOf<TypeConfig>,
    meta: openraft::type_config::alias::SnapshotMetaOf<TypeConfig>,
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

/// The gRPC server side of the Raft transport.
pub struct RaftServer {
    pub raft: Raft,
}

fn fatal(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("raft node stopped: {e}"))
}

#[tonic::async_trait]
impl RaftService for RaftServer {
    async fn append_entries(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = from_bytes("AppendEntries", &req.into_inner().payload)?;
        let resp = self.raft.append_entries(rpc).await.map_err(fatal)?;
        Ok(Response::new(RaftMessage {
            payload: to_bytes(&resp)?,
            data: Vec::new(),
        }))
    }

    async fn vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc: VoteRequest<TypeConfig> = from_bytes("Vote", &req.into_inner().payload)?;
        let resp = self.raft.vote(rpc).await.map_err(fatal)?;
        Ok(Response::new(RaftMessage {
            payload: to_bytes(&resp)?,
            data: Vec::new(),
        }))
    }

    async fn pre_vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc: VoteRequest<TypeConfig> = from_bytes("PreVote", &req.into_inner().payload)?;
        let resp = self.raft.pre_vote(rpc).await.map_err(fatal)?;
        Ok(Response::new(RaftMessage {
            payload: to_bytes(&resp)?,
            data: Vec::new(),
        }))
    }

    async fn install_snapshot(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let msg = req.into_inner();
        let header: SnapshotHeader = from_bytes("InstallSnapshot", &msg.payload)?;
        let snapshot = Snapshot {
            meta: header.meta,
            snapshot: msg.data,
        };
        let resp = self
            .raft
            .install_full_snapshot(header.vote, snapshot)
            .await
            .map_err(fatal)?;
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
}
