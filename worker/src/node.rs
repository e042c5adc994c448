//! The worker process: registers with the control plane, heartbeats its load and instances,
//! follows plan epochs (creating the instances a plan wants here, letting the others go idle),
//! and serves expert work and peer weight fetches over QUIC. It keeps no durable state: a
//! restarted worker registers again and is given work again.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use data_plane::engine::read_config;
use data_plane::error::LoadError;
use data_plane::expert::ExpertWeights;
use data_plane::instances::InstanceManager;
use data_plane::store::{FallbackStore, LoadedExpert, LocalStore, WeightStore};
use pki::grpc::GrpcTls;
use proto::engine as epb;
use proto::worker as wpb;
use shared::ExpertKey;
use tokio::sync::watch;
use transport::{Client, Handler, Identity, Limits, Message, Server};

use crate::control::ControlClient;
use crate::exec::{ExecError, Executor};
use crate::wire::{ErrorCode, Frame};

/// How a worker is started (`moeless worker`).
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Non-zero, unique in the cluster.
    pub id: u64,
    /// Control-plane gRPC addresses (every voter, or any of them).
    pub control: Vec<String>,
    /// QUIC listen address (port 0 = any).
    pub listen: SocketAddr,
    /// Address engines and peers dial; defaults to the bound listen address.
    pub advertise: Option<String>,
    /// Instance memory budget.
    pub memory_bytes: u64,
    /// Compute threads for expert work (0 = all cores).
    pub threads: usize,
    /// How long an instance the plan no longer wants stays warm.
    pub keep_alive: Duration,
    pub heartbeat: Duration,
    /// Fetch weights from a peer that holds the expert warm before reading the weight store.
    pub peer_fetch: bool,
    pub limits: Limits,
    /// Mutual TLS to the control plane (`None`: plaintext, loopback development only).
    pub control_tls: Option<GrpcTls>,
    /// Where expert instances compute (`data_plane::device::select`: CPU or a CUDA device).
    pub backend: Arc<dyn data_plane::backend::Backend>,
}

/// Weights from a peer worker that holds the expert warm (after a plan moved it away from it).
struct PeerStore {
    client: Client,
    runtime: tokio::runtime::Handle,
    config: Arc<data_plane::config::ModelConfig>,
    /// Expert -> peers that held it in the previous plan.
    hints: Arc<Mutex<HashMap<ExpertKey, Vec<SocketAddr>>>>,
    timeout: Duration,
}

impl WeightStore for PeerStore {
    fn load(&self, key: ExpertKey) -> Result<LoadedExpert, LoadError> {
        let peers = self
            .hints
            .lock()
            .map(|h| h.get(&key).cloned().unwrap_or_default())
            .unwrap_or_default();
        let mut last = format!("no peer holds {key} warm");
        for peer in peers {
            let req = Frame::FetchExpert { id: 0, key }.encode();
            let fetched = self
                .runtime
                .block_on(self.client.request(peer, req, self.timeout))
                .map_err(|e| e.to_string())
                .and_then(|m| Frame::decode_chunks(m.chunks()).map_err(|e| e.to_string()));
            match fetched {
                Ok(Frame::Weights { bytes, .. }) => {
                    let weights = ExpertWeights::decode(&bytes, &self.config, key)?;
                    return Ok(LoadedExpert {
                        weights,
                        bytes_read: bytes.len() as u64,
                        source: format!("peer:{peer}"),
                    });
                }
                Ok(Frame::Error { message, .. }) => last = format!("peer {peer}: {message}"),
                Ok(_) => last = format!("peer {peer} answered with an unexpected frame"),
                Err(e) => last = format!("peer {peer}: {e}"),
            }
        }
        Err(LoadError::config("peer", last))
    }

    fn describe(&self) -> String {
        "peers holding the expert warm".into()
    }
}

/// What the worker serves right now.
struct Active {
    executor: Arc<Executor>,
    hints: Arc<Mutex<HashMap<ExpertKey, Vec<SocketAddr>>>>,
}

struct State {
    opts: WorkerOptions,
    active: RwLock<Option<Active>>,
    applied_epoch: AtomicU64,
    latest_epoch: AtomicU64,
    /// The epoch of the last plan reconciled here (plans of other models that place nothing
    /// here are passed over: a worker serves one model at a time).
    reconciled_epoch: AtomicU64,
    /// Whether the newest plan of the model served here places any instance here.
    named_in_latest: AtomicBool,
    /// Set once a graceful drain starts: the worker no longer (re-)registers, which would mark
    /// it active again.
    draining: AtomicBool,
    /// When the worker last received work (expert requests or weight fetches).
    last_request: Mutex<Instant>,
    peers: Client,
}

impl State {
    fn executor(&self) -> Option<Arc<Executor>> {
        self.active.read().ok()?.as_ref().map(|a| a.executor.clone())
    }
}

struct WorkerHandler {
    state: Arc<State>,
}

fn error_frame(id: u64, e: ExecError) -> Bytes {
    Frame::Error {
        id,
        code: e.code,
        message: e.message,
    }
    .encode()
}

impl WorkerHandler {
    async fn answer(&self, request: Message) -> Bytes {
        let frame = match Frame::decode_chunks(request.chunks()) {
            Ok(f) => f,
            Err(e) => {
                metrics::counter!("moeless_worker_bad_frames_total").increment(1);
                return error_frame(0, ExecError::new(ErrorCode::BadFrame, e.to_string()));
            }
        };
        let id = frame.id();
        if let Ok(mut last) = self.state.last_request.lock() {
            *last = Instant::now();
        }
        let Some(exec) = self.state.executor() else {
            return error_frame(id, ExecError::new(ErrorCode::WrongModel, "no model is loaded yet"));
        };
        match frame {
            Frame::ExpertRequest { layer, tasks, sums, .. } => {
                let started = Instant::now();
                let result = tokio::task::spawn_blocking(move || {
                    let refs: Vec<(ExpertKey, &data_plane::tensor::Tensor)> =
                        tasks.iter().map(|t| (t.key, &t.input)).collect();
                    if sums == 0 {
                        return exec.run(layer, &refs);
                    }
                    let combine: Vec<&[(u32, f32)]> = tasks.iter().map(|t| t.combine.as_slice()).collect();
                    exec.run_summed(layer, &refs, &combine, sums).map(|s| vec![s])
                })
                .await;
                metrics::histogram!("moeless_worker_layer_seconds").record(started.elapsed().as_secs_f64());
                match result {
                    Ok(Ok(outputs)) => Frame::ExpertResponse { id, outputs }.encode(),
                    Ok(Err(e)) => error_frame(id, e),
                    Err(e) => error_frame(id, ExecError::new(ErrorCode::Internal, e.to_string())),
                }
            }
            Frame::FetchExpert { key, .. } => {
                // Only a resident instance is shipped; fetching does not count as use.
                let Some(w) = exec.instances.resident(key) else {
                    let state = exec.instances.state(key);
                    return error_frame(
                        id,
                        ExecError::new(ErrorCode::NotWarm, format!("{key} is {state:?} here")),
                    );
                };
                match tokio::task::spawn_blocking(move || w.encode()).await {
                    Ok(bytes) => Frame::Weights {
                        id,
                        bytes: Bytes::from(bytes),
                    }
                    .encode(),
                    Err(e) => error_frame(id, ExecError::new(ErrorCode::Internal, e.to_string())),
                }
            }
            _ => error_frame(id, ExecError::new(ErrorCode::BadFrame, "not a request frame")),
        }
    }
}

impl Handler for WorkerHandler {
    fn handle(
        &self,
        _peer: SocketAddr,
        request: Message,
    ) -> Pin<Box<dyn std::future::Future<Output = Bytes> + Send + '_>> {
        Box::pin(self.answer(request))
    }
}

/// A running worker.
pub struct RunningWorker {
    pub addr: SocketAddr,
    server: Server,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stop: watch::Sender<bool>,
    state: Arc<State>,
    control: ControlClient,
}

/// How a graceful drain ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrainOutcome {
    /// A committed plan no longer names this worker and no work arrived for the quiet period.
    Drained,
    /// The deadline passed first; `why` says which step was still pending.
    TimedOut { why: String },
}

impl RunningWorker {
    /// Gracefully leaves the cluster: asks the control plane to drain this worker (its instances
    /// move elsewhere in a new plan), keeps serving while engines still use plans that name it,
    /// and returns once the newest plan does not name it and no work has arrived for `quiet`,
    /// or at `timeout`. The caller then shuts the worker down.
    pub async fn drain(&self, quiet: Duration, timeout: Duration) -> DrainOutcome {
        let deadline = tokio::time::Instant::now() + timeout;
        let state = &self.state;
        state.draining.store(true, Ordering::SeqCst);
        let drain_epoch = loop {
            let req = wpb::DrainRequest {
                worker_id: state.opts.id,
            };
            match self.control.worker().await {
                Ok(mut c) => match c.drain(req).await {
                    Ok(r) => break r.into_inner().current_epoch,
                    Err(e) => {
                        tracing::warn!(error = %e, "asking the control plane to drain this worker");
                        self.control.rotate();
                    }
                },
                Err(e) => tracing::warn!(error = %e, "reaching the control plane to drain"),
            }
            if tokio::time::Instant::now() >= deadline {
                return DrainOutcome::TimedOut {
                    why: "the control plane did not accept the drain".into(),
                };
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        tracing::info!(epoch = drain_epoch, "draining: waiting for a plan without this worker");
        loop {
            // The plan stream has caught up with the drain and the newest plan leaves us out.
            let moved = state.latest_epoch.load(Ordering::SeqCst) >= drain_epoch
                && !state.named_in_latest.load(Ordering::SeqCst);
            let idle_for = state.last_request.lock().map(|t| t.elapsed()).unwrap_or_default();
            if moved && idle_for >= quiet {
                tracing::info!("drained: no plan names this worker and no work arrives");
                return DrainOutcome::Drained;
            }
            if tokio::time::Instant::now() >= deadline {
                let why = if moved {
                    format!("work still arrived {} ms ago", idle_for.as_millis())
                } else {
                    "no plan without this worker was committed".into()
                };
                return DrainOutcome::TimedOut { why };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
        self.server.shutdown().await;
    }
}

/// Starts the QUIC server and the control loop. Must run inside a tokio runtime.
pub async fn start(opts: WorkerOptions, identity: &Identity) -> anyhow::Result<RunningWorker> {
    anyhow::ensure!(opts.id != 0, "worker id must be non-zero");
    anyhow::ensure!(!opts.control.is_empty(), "no control-plane address given");
    let peers = Client::new(identity, opts.limits.clone())?;
    let state = Arc::new(State {
        opts: opts.clone(),
        active: RwLock::new(None),
        applied_epoch: AtomicU64::new(0),
        latest_epoch: AtomicU64::new(0),
        reconciled_epoch: AtomicU64::new(0),
        named_in_latest: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        last_request: Mutex::new(Instant::now()),
        peers,
    });
    let server = Server::bind(
        opts.listen,
        identity,
        opts.limits.clone(),
        Arc::new(WorkerHandler { state: state.clone() }),
    )?;
    let addr = server.local_addr();
    let advertise = opts.advertise.clone().unwrap_or_else(|| addr.to_string());
    let control = ControlClient::new(opts.control.clone(), opts.control_tls.clone());
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(plan_loop(
        state.clone(),
        control.clone(),
        advertise.clone(),
    )));
    tasks.push(tokio::spawn(heartbeat_loop(
        state.clone(),
        control.clone(),
        advertise,
        stop_rx,
    )));
    let ticker = state.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Some(exec) = ticker.executor() {
                let _ = tokio::task::spawn_blocking(move || exec.instances.tick()).await;
            }
        }
    }));
    tracing::info!(id = opts.id, %addr, "worker serving expert functions over QUIC");
    Ok(RunningWorker {
        addr,
        server,
        tasks,
        stop,
        state,
        control,
    })
}

fn register_request(opts: &WorkerOptions, advertise: &str) -> wpb::RegisterRequest {
    wpb::RegisterRequest {
        worker_id: opts.id,
        address: advertise.to_string(),
        devices: vec![wpb::Device {
            index: 0,
            kind: "cpu".into(),
            memory_bytes: opts.memory_bytes,
        }],
        memory_bytes: opts.memory_bytes,
    }
}

/// Registers, then follows every committed plan; reconnects on any failure.
async fn plan_loop(state: Arc<State>, control: ControlClient, advertise: String) {
    let mut previous: Option<epb::PlacementPlan> = None;
    loop {
        if let Err(e) = follow_plans(&state, &control, &advertise, &mut previous).await {
            tracing::warn!(error = %e, "following plans; retrying");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn follow_plans(
    state: &Arc<State>,
    control: &ControlClient,
    advertise: &str,
    previous: &mut Option<epb::PlacementPlan>,
) -> anyhow::Result<()> {
    let mut wc = control.worker().await?;
    if !state.draining.load(Ordering::SeqCst) {
        wc.register(register_request(&state.opts, advertise)).await?;
    }
    let after = state.latest_epoch.load(Ordering::SeqCst);
    let mut stream = wc
        .watch_plan(wpb::WatchPlanRequest {
            worker_id: state.opts.id,
            after_epoch: after,
        })
        .await?
        .into_inner();
    while let Some(first) = stream.message().await? {
        // Plans already queued (history replayed to a fresh or restarted worker) are taken
        // together: only one is reconciled.
        let mut queued = vec![first];
        loop {
            use futures_util::FutureExt;
            match stream.message().now_or_never() {
                Some(Ok(Some(next))) => queued.push(next),
                Some(Ok(None)) | None => break,
                Some(Err(e)) => return Err(e.into()),
            }
        }
        let seen = state.latest_epoch.load(Ordering::SeqCst);
        queued.retain(|p| p.epoch > seen);
        let Some(newest) = queued.iter().map(|p| p.epoch).max() else {
            continue;
        };
        let serving = state.executor().map(|e| e.model.clone());
        let chosen = choose_plan(&queued, state.opts.id, serving.as_deref());
        state.latest_epoch.store(newest, Ordering::SeqCst);
        let Some(i) = chosen else {
            // Other models' plans with nothing for this worker: applied as they are, once
            // what was last reconciled here is warm.
            if state.applied_epoch.load(Ordering::SeqCst) >= state.reconciled_epoch.load(Ordering::SeqCst) {
                state.applied_epoch.fetch_max(newest, Ordering::SeqCst);
            }
            continue;
        };
        let plan = queued.swap_remove(i);
        // The plan of the same model before it says where experts are warm.
        if let Some(before) = queued
            .into_iter()
            .filter(|p| p.model == plan.model && p.epoch < plan.epoch)
            .max_by_key(|p| p.epoch)
        {
            *previous = Some(before);
        }
        let me = state.opts.id;
        state
            .named_in_latest
            .store(plan.instances.iter().any(|i| i.worker_id == me), Ordering::SeqCst);
        state.reconciled_epoch.store(plan.epoch, Ordering::SeqCst);
        if let Err(e) = reconcile(state, control, &plan, previous.as_ref()).await {
            tracing::warn!(epoch = plan.epoch, error = %e, "reconciling to plan");
        }
        *previous = Some(plan);
    }
    anyhow::bail!("plan stream ended")
}

/// Which of `plans` (new, in epoch order) the worker reconciles to: a worker holds one model's
/// instances at a time. The newest plan of the model it serves (`serving`) if that plan still
/// places instances here or no other model's does; else the newest plan of another model that
/// places instances here (the worker switches models); else none (nothing asks anything of it).
fn choose_plan(plans: &[epb::PlacementPlan], me: u64, serving: Option<&str>) -> Option<usize> {
    let places_here = |p: &epb::PlacementPlan| p.instances.iter().any(|i| i.worker_id == me);
    let newest_of = |model: &str| {
        plans
            .iter()
            .enumerate()
            .filter(|(_, p)| p.model == model)
            .max_by_key(|(_, p)| p.epoch)
            .map(|(i, _)| i)
    };
    let own = serving.and_then(newest_of);
    if let Some(i) = own.filter(|&i| places_here(&plans[i])) {
        return Some(i);
    }
    // The newest plan of each other model; the newest of those that places instances here.
    let elsewhere = plans
        .iter()
        .enumerate()
        .filter(|(_, p)| Some(p.model.as_str()) != serving)
        .filter(|(i, p)| newest_of(&p.model) == Some(*i) && places_here(p))
        .max_by_key(|(_, p)| p.epoch)
        .map(|(i, _)| i);
    elsewhere.or(own).or_else(|| {
        // A fresh worker in a one-model cluster loads the model even when nothing is placed on
        // it yet (the engine may cold-start an instance here).
        let model = &plans.first()?.model;
        (serving.is_none() && plans.iter().all(|p| &p.model == model)).then(|| newest_of(model))?
    })
}

/// Loads the plan's model if needed, points the instance manager at the instances the plan
/// wants here, and reports the epoch applied once they are warm.
async fn reconcile(
    state: &Arc<State>,
    control: &ControlClient,
    plan: &epb::PlacementPlan,
    previous: Option<&epb::PlacementPlan>,
) -> anyhow::Result<()> {
    let me = state.opts.id;
    let current = state.executor();
    if current.as_ref().map(|e| e.model.as_str()) != Some(plan.model.as_str()) {
        let model = control
            .worker()
            .await?
            .get_model(wpb::GetModelRequest {
                name: plan.model.clone(),
            })
            .await?
            .into_inner();
        let active = load_model(state, model).await?;
        if let Ok(mut a) = state.active.write() {
            *a = Some(active);
        }
    }
    let (exec, hints) = {
        let a = state
            .active
            .read()
            .map_err(|_| anyhow::anyhow!("worker state poisoned"))?;
        let a = a.as_ref().ok_or_else(|| anyhow::anyhow!("no model loaded"))?;
        (a.executor.clone(), a.hints.clone())
    };
    let wanted: BTreeSet<ExpertKey> = plan
        .instances
        .iter()
        .filter(|i| i.worker_id == me)
        .map(|i| ExpertKey {
            layer: i.layer,
            expert: i.expert,
        })
        .collect();
    if state.opts.peer_fetch {
        if let Some(prev) = previous.filter(|p| p.model == plan.model) {
            let addrs = control.worker_addresses().await.unwrap_or_default();
            let mut h: HashMap<ExpertKey, Vec<SocketAddr>> = HashMap::new();
            for i in prev.instances.iter().filter(|i| i.worker_id != me) {
                let key = ExpertKey {
                    layer: i.layer,
                    expert: i.expert,
                };
                if wanted.contains(&key) {
                    if let Some(a) = addrs.get(&i.worker_id) {
                        h.entry(key).or_default().push(*a);
                    }
                }
            }
            if let Ok(mut hints) = hints.lock() {
                *hints = h;
            }
        }
    }
    let epoch = plan.epoch;
    let st = state.clone();
    tokio::task::spawn_blocking(move || {
        let mut started = wanted.clone();
        for e in exec.instances.set_wanted(&wanted) {
            tracing::warn!(error = %e, "instance could not start");
            started.remove(&e.key());
        }
        // Only the instances that started: one that never will (out of memory) would end the
        // wait at once, reporting the epoch applied while the others are still loading.
        exec.instances.wait_warm(&started, Duration::from_secs(300));
        // Applied even if some instance failed to load: work for it cold-starts on demand or
        // is re-dispatched by the engine.
        // Unless a newer plan is being reconciled; plans passed over since (other models')
        // are applied with it.
        if st.reconciled_epoch.load(Ordering::SeqCst) == epoch {
            st.applied_epoch
                .fetch_max(st.latest_epoch.load(Ordering::SeqCst), Ordering::SeqCst);
            tracing::info!(epoch, instances = wanted.len(), "plan applied");
        }
    });
    Ok(())
}

async fn load_model(state: &Arc<State>, model: wpb::ModelInfo) -> anyhow::Result<Active> {
    let dir = std::path::PathBuf::from(&model.weights);
    let name = model.name.clone();
    let (local, config) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let config = read_config(Path::new(&dir))?;
        Ok((LocalStore::open(&dir)?, config))
    })
    .await??;
    let config = Arc::new(config);
    let hints = Arc::new(Mutex::new(HashMap::new()));
    let mut stores: Vec<Arc<dyn WeightStore>> = Vec::new();
    if state.opts.peer_fetch {
        stores.push(Arc::new(PeerStore {
            client: state.peers.clone(),
            runtime: tokio::runtime::Handle::current(),
            config: config.clone(),
            hints: hints.clone(),
            // A peer that cannot ship an expert this fast is slower than the weight store.
            timeout: Duration::from_secs(5),
        }));
    }
    stores.push(Arc::new(local));
    let instances = Arc::new(InstanceManager::new(
        config.clone(),
        Arc::new(FallbackStore(stores)),
        state.opts.memory_bytes,
        state.opts.keep_alive,
        2,
    ));
    tracing::info!(model = %name, weights = %model.weights, "model loaded (experts start cold)");
    Ok(Active {
        executor: Arc::new(Executor::new(
            name,
            config,
            instances,
            state.opts.backend.clone(),
            state.opts.threads,
        )),
        hints,
    })
}

fn heartbeat(state: &State) -> wpb::HeartbeatRequest {
    let (loads, instances, used, budget) = match state.executor() {
        Some(exec) => {
            let loads = exec
                .take_loads()
                .into_iter()
                .map(|(k, tokens)| epb::ExpertLoad {
                    layer: k.layer,
                    expert: k.expert,
                    tokens,
                })
                .collect();
            let instances = exec
                .instances
                .snapshot()
                .into_iter()
                .map(|i| wpb::InstanceStatus {
                    layer: i.key.layer,
                    expert: i.key.expert,
                    state: i.state.as_str().into(),
                    bytes: i.bytes,
                    cold_start_ms: i.cold_start_ms.unwrap_or(0.0),
                    tokens: i.tokens,
                    source: i.source,
                })
                .collect();
            (loads, instances, exec.instances.memory_used(), exec.instances.budget())
        }
        None => (vec![], vec![], 0, state.opts.memory_bytes),
    };
    wpb::HeartbeatRequest {
        worker_id: state.opts.id,
        applied_epoch: state.applied_epoch.load(Ordering::SeqCst),
        loads,
        instances,
        memory_used_bytes: used,
        memory_budget_bytes: budget,
    }
}

/// Heartbeats every control-plane node (so whichever becomes leader has fresh liveness), and
/// re-registers where the worker is unknown.
/// Heartbeats every control-plane node, each on its own cadence: a node that accepts
/// connections but never answers (stopped, overloaded) must not delay the heartbeats the leader
/// counts on, or the leader declares a live worker dead (it did, under leader-pause, when the
/// nodes were called one after another).
async fn heartbeat_loop(state: Arc<State>, control: ControlClient, advertise: String, stop: watch::Receiver<bool>) {
    let mut each = tokio::task::JoinSet::new();
    for addr in control.addresses() {
        let (state, control, advertise, mut stop) = (state.clone(), control.clone(), advertise.clone(), stop.clone());
        each.spawn(async move {
            // A call left unanswered this long is given up; the next one goes out on time.
            let limit = (state.opts.heartbeat * 4).max(Duration::from_millis(500));
            loop {
                let hb = heartbeat(&state);
                let call = async {
                    let mut c = control.worker_at(addr.clone()).await?;
                    match c.heartbeat(hb).await {
                        Ok(_) => {}
                        Err(s) if s.code() == tonic::Code::NotFound && !state.draining.load(Ordering::SeqCst) => {
                            c.register(register_request(&state.opts, &advertise)).await?;
                        }
                        Err(s) => tracing::debug!(%addr, error = %s, "heartbeat"),
                    }
                    anyhow::Ok(())
                };
                match tokio::time::timeout(limit, call).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(%addr, error = %e, "heartbeat"),
                    Err(_) => tracing::debug!(%addr, ?limit, "heartbeat unanswered"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(state.opts.heartbeat) => {}
                    _ = stop.changed() => return,
                }
            }
        });
    }
    drop(stop);
    while each.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(epoch: u64, model: &str, workers: &[u64]) -> epb::PlacementPlan {
        epb::PlacementPlan {
            epoch,
            model: model.into(),
            instances: workers
                .iter()
                .map(|&w| epb::ExpertInstance {
                    worker_id: w,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn another_models_plan_that_places_nothing_here_is_passed_over() {
        let plans = [plan(5, "served", &[1, 2]), plan(6, "other", &[])];
        assert_eq!(choose_plan(&plans, 1, Some("served")), Some(0));
        assert_eq!(choose_plan(&plans[1..], 1, Some("served")), None);
        // A fresh worker replaying both takes the model that places something on it.
        assert_eq!(choose_plan(&plans, 2, None), Some(0));
        // Nothing for worker 3 in a two-model history: nothing to load.
        assert_eq!(choose_plan(&plans, 3, None), None);
    }

    #[test]
    fn the_newest_plan_of_the_served_model_wins_and_can_empty_the_worker() {
        let plans = [plan(5, "served", &[1]), plan(6, "other", &[]), plan(7, "served", &[2])];
        // Moved off: the served model's newest plan, which drops the instances here.
        assert_eq!(choose_plan(&plans, 1, Some("served")), Some(2));
        // An older plan of another model that placed instances here does not bring it back.
        let plans = [plan(5, "other", &[1]), plan(6, "other", &[]), plan(7, "served", &[1])];
        assert_eq!(choose_plan(&plans, 1, Some("served")), Some(2));
    }

    #[test]
    fn a_plan_of_another_model_placing_instances_here_switches_models() {
        let plans = [plan(5, "served", &[]), plan(6, "other", &[1])];
        assert_eq!(choose_plan(&plans, 1, Some("served")), Some(1));
        // One model only: a fresh worker loads it even with nothing placed on it yet.
        assert_eq!(choose_plan(&[plan(3, "m", &[2])], 1, None), Some(0));
    }
}
