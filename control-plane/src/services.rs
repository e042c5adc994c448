//! WorkerService and EngineService over gRPC, and the conversions between protobuf messages and
//! control-plane types (the only place the two meet).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::Stream;
use proto::engine as pb;
use proto::worker as wpb;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::liveness::{InstanceReport, InstanceState, WorkerObservation};
use crate::node::{Node, NodeError};
use crate::state::{Device, ExpertInstance, ModelSpec, PlacementPlan, WorkerSpec};
use crate::types::{Command, CommandResponse};

const WRITE_WAIT: Duration = Duration::from_secs(3);

impl From<&ExpertInstance> for pb::ExpertInstance {
    fn from(i: &ExpertInstance) -> Self {
        Self {
            layer: i.layer,
            expert: i.expert,
            worker_id: i.worker,
            gpu: i.gpu,
            share: i.share,
        }
    }
}

impl From<&PlacementPlan> for pb::PlacementPlan {
    fn from(p: &PlacementPlan) -> Self {
        Self {
            epoch: p.epoch,
            model: p.model.clone(),
            instances: p.instances.iter().map(Into::into).collect(),
            reason: p.reason.clone(),
        }
    }
}

impl TryFrom<wpb::RegisterRequest> for WorkerSpec {
    type Error = Status;
    fn try_from(r: wpb::RegisterRequest) -> Result<Self, Status> {
        if r.worker_id == 0 {
            return Err(Status::invalid_argument("worker_id must be non-zero"));
        }
        if r.address.is_empty() {
            return Err(Status::invalid_argument("address is empty"));
        }
        Ok(WorkerSpec {
            id: r.worker_id,
            address: r.address,
            devices: r
                .devices
                .into_iter()
                .map(|d| Device {
                    index: d.index,
                    kind: d.kind,
                    memory_bytes: d.memory_bytes,
                })
                .collect(),
            memory_bytes: r.memory_bytes,
        })
    }
}

impl TryFrom<wpb::InstanceStatus> for InstanceReport {
    type Error = Status;
    fn try_from(i: wpb::InstanceStatus) -> Result<Self, Status> {
        let state: InstanceState = i
            .state
            .parse()
            .map_err(|e| Status::invalid_argument(format!("instance ({}, {}): {e}", i.layer, i.expert)))?;
        if !i.cold_start_ms.is_finite() || i.cold_start_ms < 0.0 {
            return Err(Status::invalid_argument(format!(
                "instance ({}, {}): cold_start_ms {} must be finite and >= 0",
                i.layer, i.expert, i.cold_start_ms
            )));
        }
        Ok(InstanceReport {
            layer: i.layer,
            expert: i.expert,
            state,
            bytes: i.bytes,
            cold_start_ms: i.cold_start_ms,
            tokens: i.tokens,
            source: i.source,
        })
    }
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::Rejected(m) => Status::failed_precondition(m),
            NodeError::NotLeader { .. } | NodeError::NoLeader => Status::unavailable(e.to_string()),
            other => Status::internal(other.to_string()),
        }
    }
}

fn loads(items: &[pb::ExpertLoad]) -> impl Iterator<Item = ((u32, u32), u64)> + '_ {
    items.iter().map(|l| ((l.layer, l.expert), l.tokens))
}

type PlanStream = Pin<Box<dyn Stream<Item = Result<pb::PlacementPlan, Status>> + Send>>;

/// Streams every committed plan with an epoch above `after`, as plans are applied on this node.
fn plan_stream(node: Node, after: u64) -> PlanStream {
    let mut rx = node.state_machine().watch_epoch();
    let stream = async_stream(move |tx| async move {
        let mut sent = after;
        loop {
            let plans: Vec<pb::PlacementPlan> = node
                .state_machine()
                .read(|s| s.plans.range(sent + 1..).map(|(_, p)| p.into()).collect())
                .await;
            for p in plans {
                sent = p.epoch;
                if tx.send(Ok(p)).await.is_err() {
                    return;
                }
            }
            // A stopping node ends the stream; the client follows plans from another node.
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                () = node.stopping() => return,
            }
        }
    });
    Box::pin(stream)
}

/// A stream fed by a task through a bounded channel.
fn async_stream<T, F, Fut>(f: F) -> tokio_stream::wrappers::ReceiverStream<T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Metadata key marking a message relayed by a follower, so it is never relayed again.
const RELAYED: &str = "x-moeless-relayed";
const RELAY_TIMEOUT: Duration = Duration::from_millis(500);

/// A lazily connected channel to the current leader's gRPC server. Followers relay heartbeats
/// and load reports through it, so that the leader's liveness view and load board, which drive
/// placement, see every report whichever node received it.
#[derive(Clone, Default)]
struct LeaderLink {
    cached: Arc<Mutex<Option<(String, Channel)>>>,
}

impl LeaderLink {
    /// The channel to the leader; `None` on the leader itself or while no leader is known.
    fn channel(&self, node: &Node) -> Option<Channel> {
        let (leader, info) = node.leader_info()?;
        if leader == node.id() {
            return None;
        }
        let mut cached = self.cached.lock().ok()?;
        if let Some((_, c)) = cached.as_ref().filter(|(addr, _)| *addr == info.raft_addr) {
            return Some(c.clone());
        }
        let c = crate::network::peer_channel(&info.raft_addr, node.grpc_tls(), RELAY_TIMEOUT).ok()?;
        *cached = Some((info.raft_addr, c.clone()));
        Some(c)
    }
}

/// `msg` marked as relayed, with the relay timeout.
fn relayed<T>(msg: T) -> Request<T> {
    let mut request = Request::new(msg);
    request
        .metadata_mut()
        .insert(RELAYED, tonic::metadata::MetadataValue::from_static("1"));
    request.set_timeout(RELAY_TIMEOUT);
    request
}

/// WorkerService: registration, heartbeats (liveness, instances, loads) and the plan stream.
pub struct WorkerApi {
    node: Node,
    leader: LeaderLink,
}

impl WorkerApi {
    /// The service of `node`.
    pub fn new(node: Node) -> Self {
        Self {
            node,
            leader: LeaderLink::default(),
        }
    }

    /// Passes a heartbeat on to the leader in the background: the worker's answer does not wait.
    fn relay_to_leader(&self, req: wpb::HeartbeatRequest) {
        let Some(channel) = self.leader.channel(&self.node) else {
            return;
        };
        tokio::spawn(async move {
            let mut client = wpb::worker_service_client::WorkerServiceClient::new(channel)
                .max_decoding_message_size(proto::MAX_SERVICE_MESSAGE_BYTES);
            if let Err(e) = client.heartbeat(relayed(req)).await {
                tracing::debug!(error = %e, "relaying a heartbeat to the leader");
            }
        });
    }
}

#[tonic::async_trait]
impl wpb::worker_service_server::WorkerService for WorkerApi {
    async fn register(&self, req: Request<wpb::RegisterRequest>) -> Result<Response<wpb::RegisterResponse>, Status> {
        let spec = WorkerSpec::try_from(req.into_inner())?;
        let id = spec.id;
        self.node.write(Command::RegisterWorker(spec), WRITE_WAIT).await?;
        let current_epoch = *self.node.state_machine().watch_epoch().borrow();
        Ok(Response::new(wpb::RegisterResponse {
            worker_id: id,
            current_epoch,
        }))
    }

    async fn heartbeat(&self, req: Request<wpb::HeartbeatRequest>) -> Result<Response<wpb::HeartbeatResponse>, Status> {
        let relayed = req.metadata().contains_key(RELAYED);
        let r = req.into_inner();
        let draining = self
            .node
            .state_machine()
            .read(|s| {
                s.workers
                    .get(&r.worker_id)
                    .map(|w| w.health == crate::state::WorkerHealth::Draining)
            })
            .await
            .ok_or_else(|| Status::not_found(format!("worker {} is not registered", r.worker_id)))?;
        let instances = r
            .instances
            .iter()
            .cloned()
            .map(InstanceReport::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        self.node.record_loads(loads(&r.loads));
        self.node.record_heartbeat(
            r.worker_id,
            WorkerObservation {
                last_heartbeat: Instant::now(),
                applied_epoch: r.applied_epoch,
                instances,
                memory_used_bytes: r.memory_used_bytes,
                memory_budget_bytes: r.memory_budget_bytes,
            },
        );
        if !relayed {
            self.relay_to_leader(r);
        }
        let view = self.node.cluster();
        Ok(Response::new(wpb::HeartbeatResponse {
            current_epoch: view.epoch,
            leader_id: view.leader.unwrap_or(0),
            draining,
        }))
    }

    async fn get_model(&self, req: Request<wpb::GetModelRequest>) -> Result<Response<wpb::ModelInfo>, Status> {
        let name = req.into_inner().name;
        let model = self
            .node
            .state_machine()
            .read(|s| s.models.get(&name).cloned())
            .await
            .ok_or_else(|| Status::not_found(format!("model {name:?} is not registered")))?;
        Ok(Response::new(wpb::ModelInfo {
            name: model.name,
            architecture: model.architecture,
            num_layers: model.num_layers,
            num_experts: model.num_experts,
            top_k: model.top_k,
            weights: model.weights,
        }))
    }

    type WatchPlanStream = PlanStream;

    async fn watch_plan(&self, req: Request<wpb::WatchPlanRequest>) -> Result<Response<PlanStream>, Status> {
        Ok(Response::new(plan_stream(
            self.node.clone(),
            req.into_inner().after_epoch,
        )))
    }

    async fn drain(&self, req: Request<wpb::DrainRequest>) -> Result<Response<wpb::DrainResponse>, Status> {
        let worker = req.into_inner().worker_id;
        self.node.write(Command::DrainWorker { worker }, WRITE_WAIT).await?;
        Ok(Response::new(wpb::DrainResponse {
            current_epoch: *self.node.state_machine().watch_epoch().borrow(),
        }))
    }
}

/// EngineService: plans, worker liveness and load reports for engines.
pub struct EngineApi {
    node: Node,
    leader: LeaderLink,
}

impl EngineApi {
    /// The service of `node`.
    pub fn new(node: Node) -> Self {
        Self {
            node,
            leader: LeaderLink::default(),
        }
    }
}

#[tonic::async_trait]
impl pb::engine_service_server::EngineService for EngineApi {
    async fn register_model(
        &self,
        req: Request<pb::RegisterModelRequest>,
    ) -> Result<Response<pb::RegisterModelResponse>, Status> {
        let r = req.into_inner();
        let spec = ModelSpec {
            name: r.name,
            architecture: r.architecture,
            num_layers: r.num_layers,
            num_experts: r.num_experts,
            top_k: r.top_k,
            weights: r.weights,
        };
        // One command: the state machine compares with what is registered and writes (or
        // rejects: FAILED_PRECONDITION, which engines do not retry) in the same step.
        let created = match self.node.write(Command::RegisterModel(spec), WRITE_WAIT).await? {
            (_, CommandResponse::ModelRegistered { created }) => created,
            (_, other) => {
                return Err(Status::internal(format!(
                    "unexpected answer to register-model: {other:?}"
                )))
            }
        };
        Ok(Response::new(pb::RegisterModelResponse {
            created,
            current_epoch: self.node.cluster().epoch,
        }))
    }

    /// Linearizable: served by the leader after a ReadIndex round; a follower answers UNAVAILABLE
    /// naming the leader.
    async fn get_plan(&self, req: Request<pb::GetPlanRequest>) -> Result<Response<pb::GetPlanResponse>, Status> {
        let pb::GetPlanRequest { epoch, model } = req.into_inner();
        let state = self.node.linearizable_state().await?;
        let plan = match epoch {
            0 if model.is_empty() => state.latest_plan(),
            0 => state.latest_plan_of(&model),
            _ => state.plans.get(&epoch),
        };
        if epoch != 0 && plan.is_none() {
            return Err(Status::not_found(format!("no plan with epoch {epoch}")));
        }
        Ok(Response::new(pb::GetPlanResponse {
            plan: plan.map(Into::into),
        }))
    }

    type WatchPlanStream = PlanStream;

    async fn watch_plan(&self, req: Request<pb::WatchPlanRequest>) -> Result<Response<PlanStream>, Status> {
        Ok(Response::new(plan_stream(
            self.node.clone(),
            req.into_inner().after_epoch,
        )))
    }

    async fn list_workers(
        &self,
        _req: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let state = self.node.state_machine().state().await;
        // Liveness as seen by this node: the leader's view is complete (followers relay
        // heartbeats to it); a follower knows the ages of the heartbeats sent to it only.
        let workers = self
            .node
            .worker_views(&state)
            .into_iter()
            .map(|w| pb::WorkerInfo {
                worker_id: w.spec.id,
                address: w.spec.address,
                health: w.health.label().into(),
                applied_epoch: w.applied_epoch,
                heartbeat_age_ms: w.heartbeat_age_ms.unwrap_or(u64::MAX),
            })
            .collect();
        Ok(Response::new(pb::ListWorkersResponse { workers }))
    }

    async fn report_load(
        &self,
        req: Request<pb::ReportLoadRequest>,
    ) -> Result<Response<pb::ReportLoadResponse>, Status> {
        let relay = !req.metadata().contains_key(RELAYED);
        let r = req.into_inner();
        self.node.record_loads(loads(&r.loads));
        if let Some(channel) = self.leader.channel(&self.node).filter(|_| relay) {
            tokio::spawn(async move {
                let mut client = pb::engine_service_client::EngineServiceClient::new(channel)
                    .max_decoding_message_size(proto::MAX_SERVICE_MESSAGE_BYTES);
                if let Err(e) = client.report_load(relayed(r)).await {
                    tracing::debug!(error = %e, "relaying a load report to the leader");
                }
            });
        }
        Ok(Response::new(pb::ReportLoadResponse {
            current_epoch: self.node.cluster().epoch,
        }))
    }
}
