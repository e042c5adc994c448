//! The engine's side of the distributed data plane: [`RemoteExperts`] implements the engine's
//! expert-function seam ([`ExpertFunction`] and [`ShareSource`]) over worker processes.
//!
//! It follows the control plane's placement plans. A newly committed plan becomes *active* only
//! once every live worker it names reports that plan's epoch applied (its instances warm), or
//! after an activation timeout; until then dispatch keeps using the previous plan, whose
//! instances stay warm (idle) on their workers. Each layer's tokens go out as one message per
//! worker, all in flight at once; a worker that fails or stops answering has its work
//! re-dispatched to another instance of the same expert, or to any live worker (which
//! cold-starts the expert on demand). Work for a worker that lives in this process skips the
//! network (in-process fast path).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use data_plane::expert::{add_weighted_rows, ExpertError, ExpertFunction, ExpertTask, ShareSource};
use data_plane::tensor::Tensor;
use pki::grpc::GrpcTls;
use proto::engine as epb;
use serde::Serialize;
use shared::{ExpertKey, InstanceId};
use transport::{Client, Identity, Limits};

use crate::control::ControlClient;
use crate::exec::Executor;
use crate::wire::{encode_request, encode_request_combined, encode_request_shared, Dtype, Frame, TaskRef};

/// How an engine reaches its workers.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// Control-plane gRPC addresses.
    pub control: Vec<String>,
    /// The model whose plans this engine follows.
    pub model: String,
    /// Element type of activations on the wire (f32 keeps outputs bit-identical).
    pub dtype: Dtype,
    /// A worker that has not answered a layer's message within this is treated as failed.
    pub request_timeout: Duration,
    /// How often plans and worker liveness are read from the control plane.
    pub poll: Duration,
    /// Longest a new plan waits for its instances to be warm before it is used anyway.
    pub activation_timeout: Duration,
    /// How long a worker that failed a request is avoided.
    pub suspect_for: Duration,
    pub limits: Limits,
    /// Mutual TLS to the control plane (`None`: plaintext, loopback development only).
    pub control_tls: Option<GrpcTls>,
}

impl RemoteOptions {
    pub fn new(control: Vec<String>, model: impl Into<String>) -> Self {
        Self {
            control,
            model: model.into(),
            dtype: Dtype::F32,
            request_timeout: Duration::from_secs(2),
            poll: Duration::from_millis(50),
            activation_timeout: Duration::from_secs(60),
            suspect_for: Duration::from_secs(2),
            limits: Limits::default(),
            control_tls: None,
        }
    }
}

/// A plan as the dispatcher uses it: each expert's instances (worker, share) in plan order.
#[derive(Debug, Default)]
struct PlanView {
    epoch: u64,
    by_key: HashMap<ExpertKey, Vec<(u64, f32)>>,
}

impl PlanView {
    fn from_proto(p: &epb::PlacementPlan) -> Self {
        let mut by_key: HashMap<ExpertKey, Vec<(u64, f32)>> = HashMap::new();
        for i in &p.instances {
            by_key
                .entry(ExpertKey {
                    layer: i.layer,
                    expert: i.expert,
                })
                .or_default()
                .push((i.worker_id, i.share as f32));
        }
        Self { epoch: p.epoch, by_key }
    }

    fn workers(&self) -> HashSet<u64> {
        self.by_key.values().flatten().map(|(w, _)| *w).collect()
    }
}

#[derive(Debug, Clone)]
struct WorkerView {
    addr: Option<SocketAddr>,
    alive: bool,
    applied: u64,
}

#[derive(Default)]
struct View {
    active: Option<Arc<PlanView>>,
    pending: Option<(Arc<PlanView>, Instant)>,
    workers: BTreeMap<u64, WorkerView>,
}

/// Counters of the dispatcher since it started.
#[derive(Debug, Default, Clone, Serialize)]
pub struct DispatchStats {
    pub layer_calls: u64,
    pub messages: u64,
    pub local_tasks: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Token rows not sent because their message already carried them (a token picked by
    /// several experts held on one worker travels once).
    pub rows_shared: u64,
    /// Output rows not sent back because a worker summed a token's expert outputs (a token
    /// answered once per worker, not once per expert).
    pub rows_summed: u64,
    /// Messages that failed and whose tasks were sent elsewhere.
    pub failed_messages: u64,
    pub redispatched_tasks: u64,
    /// Plans that became active.
    pub activations: u64,
    pub active_epoch: u64,
}

#[derive(Default)]
struct Counters {
    layer_calls: AtomicU64,
    messages: AtomicU64,
    local_tasks: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    rows_shared: AtomicU64,
    rows_summed: AtomicU64,
    failed_messages: AtomicU64,
    redispatched_tasks: AtomicU64,
    activations: AtomicU64,
}

/// Adds `n` to a dispatcher counter and to its Prometheus twin (`moeless_dispatch_*_total`,
/// exported by `moeless serve` / `up` with workers on `/metrics`).
fn bump(counter: &AtomicU64, metric: &'static str, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
    metrics::counter!(metric).increment(n);
}

/// Routed experts executed on worker processes.
pub struct RemoteExperts {
    opts: RemoteOptions,
    runtime: tokio::runtime::Runtime,
    client: Client,
    view: Arc<RwLock<View>>,
    suspect: Mutex<HashMap<u64, Instant>>,
    local: Option<(u64, Arc<Executor>)>,
    counters: Arc<Counters>,
    next_id: AtomicU64,
}

/// What a worker (or the in-process fast path) answered for some of a layer's tasks.
enum Answer {
    /// One output per task.
    PerTask(Vec<Tensor>),
    /// A combining request's answer: per distinct token (in `tokens` order), the weighted sum
    /// of its rows' outputs.
    Summed { tokens: Vec<u32>, sums: Tensor },
}

/// What the sender of a message expects back.
enum Expect {
    PerTask(usize),
    Summed(Vec<u32>),
}

/// What one message to one worker produced.
enum Outcome {
    Done(Answer),
    /// Another worker may succeed.
    Retry(String),
    /// No worker will succeed (malformed work).
    Fatal(String),
}

impl RemoteExperts {
    /// Starts following the control plane and waits (up to `wait`) for a first active plan.
    /// `local`: a worker hosted in this process (id and executor), reached without the network.
    pub fn connect(
        opts: RemoteOptions,
        identity: &Identity,
        local: Option<(u64, Arc<Executor>)>,
        wait: Duration,
    ) -> anyhow::Result<Arc<Self>> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("moeless-dispatch")
            .enable_all()
            .build()?;
        let client = {
            let _guard = runtime.enter();
            Client::new(identity, opts.limits.clone())?
        };
        let me = Arc::new(Self {
            opts,
            runtime,
            client,
            view: Arc::default(),
            suspect: Mutex::default(),
            local,
            counters: Arc::default(),
            next_id: AtomicU64::new(1),
        });
        let control = ControlClient::new(me.opts.control.clone(), me.opts.control_tls.clone());
        me.runtime
            .spawn(follow(control, me.opts.clone(), me.view.clone(), me.counters.clone()));
        anyhow::ensure!(
            me.wait_active(1, wait),
            "no placement plan for model {:?} became active within {wait:?}",
            me.opts.model
        );
        Ok(me)
    }

    /// Epoch of the plan dispatch uses now (0: none).
    pub fn active_epoch(&self) -> u64 {
        self.view
            .read()
            .ok()
            .and_then(|v| v.active.as_ref().map(|p| p.epoch))
            .unwrap_or(0)
    }

    /// Waits until the active plan's epoch is at least `epoch`.
    pub fn wait_active(&self, epoch: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.active_epoch() >= epoch {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn stats(&self) -> DispatchStats {
        let c = &self.counters;
        DispatchStats {
            layer_calls: c.layer_calls.load(Ordering::Relaxed),
            messages: c.messages.load(Ordering::Relaxed),
            local_tasks: c.local_tasks.load(Ordering::Relaxed),
            bytes_sent: c.bytes_sent.load(Ordering::Relaxed),
            bytes_received: c.bytes_received.load(Ordering::Relaxed),
            rows_shared: c.rows_shared.load(Ordering::Relaxed),
            rows_summed: c.rows_summed.load(Ordering::Relaxed),
            failed_messages: c.failed_messages.load(Ordering::Relaxed),
            redispatched_tasks: c.redispatched_tasks.load(Ordering::Relaxed),
            activations: c.activations.load(Ordering::Relaxed),
            active_epoch: self.active_epoch(),
        }
    }

    fn snapshot(&self) -> (Option<Arc<PlanView>>, BTreeMap<u64, WorkerView>) {
        match self.view.read() {
            Ok(v) => (v.active.clone(), v.workers.clone()),
            Err(_) => (None, BTreeMap::new()),
        }
    }

    fn is_suspect(&self, w: u64) -> bool {
        self.suspect
            .lock()
            .ok()
            .and_then(|s| s.get(&w).map(|t| t.elapsed() < self.opts.suspect_for))
            .unwrap_or(false)
    }

    fn mark_suspect(&self, w: u64) {
        if let Ok(mut s) = self.suspect.lock() {
            s.insert(w, Instant::now());
        }
    }

    /// Where a task goes: its planned instance first, then the expert's other instances, then
    /// every other live worker (which cold-starts the expert), skipping `failed`.
    fn choose(
        &self,
        inst: InstanceId,
        plan: Option<&PlanView>,
        workers: &BTreeMap<u64, WorkerView>,
        failed: &HashSet<u64>,
    ) -> Option<u64> {
        let mut order: Vec<u64> = Vec::new();
        if let Some(list) = plan.and_then(|p| p.by_key.get(&inst.key)) {
            if let Some((w, _)) = list.get(inst.replica as usize) {
                order.push(*w);
            }
            order.extend(list.iter().map(|(w, _)| *w));
        }
        let all: Vec<u64> = workers.keys().copied().collect();
        if !all.is_empty() {
            let start = (inst.key.layer as usize * 31 + inst.key.expert as usize) % all.len();
            order.extend(all[start..].iter().chain(&all[..start]));
        }
        let reachable = |w: &u64| {
            !failed.contains(w)
                && (self.local.as_ref().is_some_and(|(id, _)| id == w)
                    || workers.get(w).is_some_and(|v| v.addr.is_some()))
        };
        let healthy = |w: &u64| reachable(w) && workers.get(w).is_none_or(|v| v.alive) && !self.is_suspect(*w);
        order
            .iter()
            .copied()
            .find(healthy)
            .or_else(|| order.iter().copied().find(reachable))
    }

    async fn send(
        client: Client,
        addr: SocketAddr,
        request: bytes::Bytes,
        timeout: Duration,
        expect: Expect,
    ) -> Outcome {
        match client.request(addr, request, timeout).await {
            Ok(message) => match (Frame::decode_chunks(message.chunks()), expect) {
                (Ok(Frame::ExpertResponse { outputs, .. }), Expect::PerTask(n)) if outputs.len() == n => {
                    Outcome::Done(Answer::PerTask(outputs))
                }
                (Ok(Frame::ExpertResponse { mut outputs, .. }), Expect::Summed(tokens))
                    if outputs.len() == 1 && outputs[0].rows() == tokens.len() =>
                {
                    let sums = outputs.remove(0);
                    Outcome::Done(Answer::Summed { tokens, sums })
                }
                (Ok(Frame::ExpertResponse { outputs, .. }), _) => Outcome::Retry(format!(
                    "worker {addr} answered {} outputs of {:?} rows, not what was asked",
                    outputs.len(),
                    outputs.iter().map(|o| o.rows()).collect::<Vec<_>>()
                )),
                (Ok(Frame::Error { code, message, .. }), _) if code.retry_elsewhere() => {
                    Outcome::Retry(format!("worker {addr}: {message}"))
                }
                (Ok(Frame::Error { message, .. }), _) => Outcome::Fatal(format!("worker {addr}: {message}")),
                (Ok(_), _) => Outcome::Retry(format!("worker {addr} answered with an unexpected frame")),
                (Err(e), _) => Outcome::Retry(format!("worker {addr} sent a bad frame: {e}")),
            },
            Err(e) => {
                client.forget(addr);
                Outcome::Retry(format!("worker {addr}: {e}"))
            }
        }
    }

    /// The message for one worker: combining (a token's expert outputs summed on the worker)
    /// when `combine`, else per task, with rows shared between tasks travelling once.
    fn encode(&self, layer: usize, tasks: &[ExpertTask], idx: &[usize], combine: bool) -> (bytes::Bytes, Expect) {
        let refs: Vec<TaskRef> = idx
            .iter()
            .map(|&i| {
                let t = &tasks[i];
                TaskRef {
                    key: t.instance.key,
                    replica: t.instance.replica,
                    input: &t.input,
                    tokens: &t.tokens,
                    weights: &t.weights,
                }
            })
            .collect();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (layer, dtype) = (layer as u32, self.opts.dtype);
        let encoded = match combine {
            true => encode_request_combined(id, layer, dtype, &refs),
            false => encode_request_shared(id, layer, dtype, &refs),
        };
        match encoded {
            Some(e) => {
                bump(
                    &self.counters.rows_shared,
                    "moeless_dispatch_rows_shared_total",
                    e.rows_saved as u64,
                );
                let expect = match combine {
                    true => Expect::Summed(e.tokens),
                    false => Expect::PerTask(idx.len()),
                };
                (e.bytes, expect)
            }
            None => (encode_request(id, layer, dtype, &refs), Expect::PerTask(idx.len())),
        }
    }

    /// Runs a layer's tasks on the workers, re-dispatching failed messages, and returns each
    /// message's answer with the task indices it covers. Tasks without rows are left out.
    fn run_layer(
        &self,
        layer: usize,
        tasks: &[ExpertTask],
        combine: bool,
    ) -> Result<Vec<(Vec<usize>, Answer)>, ExpertError> {
        bump(&self.counters.layer_calls, "moeless_dispatch_layer_calls_total", 1);
        let (plan, workers) = self.snapshot();
        let mut answers = Vec::new();
        let mut pending: Vec<usize> = (0..tasks.len()).filter(|&i| tasks[i].input.rows() > 0).collect();
        let mut failed: HashSet<u64> = HashSet::new();
        let mut last_error = String::new();
        for round in 0..MAX_ROUNDS {
            if pending.is_empty() {
                break;
            }
            if round > 0 {
                bump(
                    &self.counters.redispatched_tasks,
                    "moeless_dispatch_redispatched_tasks_total",
                    pending.len() as u64,
                );
            }
            let mut groups: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
            for &i in &pending {
                let w = self
                    .choose(tasks[i].instance, plan.as_deref(), &workers, &failed)
                    .ok_or_else(|| {
                        ExpertError::Transport(format!(
                            "no worker can run {} (tried {failed:?}; last error: {last_error})",
                            tasks[i].instance.key
                        ))
                    })?;
                groups.entry(w).or_default().push(i);
            }
            let (tx, rx) = mpsc::channel::<(u64, Vec<usize>, Outcome)>();
            let mut local_group = None;
            // Per worker, the tasks sent to it this round and not answered yet.
            let mut outstanding: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
            for (w, idx) in groups {
                if self.local.as_ref().is_some_and(|(id, _)| *id == w) {
                    local_group = Some((w, idx));
                    continue;
                }
                let Some(addr) = workers.get(&w).and_then(|v| v.addr) else {
                    failed.insert(w);
                    continue;
                };
                let (request, expect) = self.encode(layer, tasks, &idx, combine);
                bump(
                    &self.counters.bytes_sent,
                    "moeless_dispatch_bytes_sent_total",
                    request.len() as u64,
                );
                bump(&self.counters.messages, "moeless_dispatch_messages_total", 1);
                let (client, timeout, tx) = (self.client.clone(), self.opts.request_timeout, tx.clone());
                outstanding.insert(w, idx.clone());
                self.runtime.spawn(async move {
                    let out = Self::send(client, addr, request, timeout, expect).await;
                    let _ = tx.send((w, idx, out));
                });
            }
            let mut next = Vec::new();
            if let Some((w, idx)) = local_group {
                let exec = self.local.as_ref().map(|(_, e)| e.clone());
                let refs: Vec<(ExpertKey, &Tensor)> =
                    idx.iter().map(|&i| (tasks[i].instance.key, &tasks[i].input)).collect();
                bump(
                    &self.counters.local_tasks,
                    "moeless_dispatch_local_tasks_total",
                    idx.len() as u64,
                );
                match exec.map(|e| e.run(layer as u32, &refs)) {
                    Some(Ok(outs)) => answers.push((idx, Answer::PerTask(outs))),
                    Some(Err(e)) if !e.code.retry_elsewhere() => return Err(ExpertError::Transport(e.message)),
                    Some(Err(e)) => {
                        last_error = e.message;
                        failed.insert(w);
                        next.extend(idx);
                    }
                    None => {
                        failed.insert(w);
                        next.extend(idx);
                    }
                }
            }
            drop(tx);
            while !outstanding.is_empty() {
                let (w, idx, outcome) = match rx.recv_timeout(DEAD_WORKER_CHECK) {
                    Ok(answer) => answer,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        // A worker killed mid-request sends no reset over QUIC; rather than wait
                        // out the request timeout, give up on it as soon as the control plane
                        // declares it dead (its answer, should one still come, is ignored).
                        let dead: Vec<u64> = match self.view.read() {
                            Ok(v) => outstanding
                                .keys()
                                .copied()
                                .filter(|w| v.workers.get(w).is_some_and(|wv| !wv.alive))
                                .collect(),
                            Err(_) => Vec::new(),
                        };
                        for w in dead {
                            if let Some(idx) = outstanding.remove(&w) {
                                tracing::warn!(worker = w, layer, "worker declared dead mid-request; re-dispatching");
                                bump(
                                    &self.counters.failed_messages,
                                    "moeless_dispatch_failed_messages_total",
                                    1,
                                );
                                self.mark_suspect(w);
                                failed.insert(w);
                                last_error = format!("worker {w} declared dead by the control plane");
                                next.extend(idx);
                            }
                        }
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                };
                if outstanding.remove(&w).is_none() {
                    continue; // given up on already
                }
                match outcome {
                    Outcome::Done(answer) => {
                        let hidden = tasks[idx[0]].input.cols();
                        let received = match &answer {
                            Answer::PerTask(outs) => {
                                for (&i, o) in idx.iter().zip(outs) {
                                    if o.rows() != tasks[i].input.rows() || o.cols() != hidden {
                                        return Err(ExpertError::Transport(format!(
                                            "worker {w} returned shape {:?} for {} rows",
                                            o.shape(),
                                            tasks[i].input.rows()
                                        )));
                                    }
                                }
                                outs.iter().map(|o| o.len()).sum::<usize>()
                            }
                            Answer::Summed { sums, .. } if sums.rows() > 0 && sums.cols() != hidden => {
                                return Err(ExpertError::Transport(format!(
                                    "worker {w} returned sums of shape {:?} for width {hidden}",
                                    sums.shape()
                                )));
                            }
                            Answer::Summed { sums, .. } => {
                                let rows: usize = idx.iter().map(|&i| tasks[i].input.rows()).sum();
                                let summed = rows.saturating_sub(sums.rows()) as u64;
                                bump(&self.counters.rows_summed, "moeless_dispatch_rows_summed_total", summed);
                                sums.len()
                            }
                        };
                        bump(
                            &self.counters.bytes_received,
                            "moeless_dispatch_bytes_received_total",
                            4 * received as u64,
                        );
                        answers.push((idx, answer));
                    }
                    Outcome::Retry(e) => {
                        tracing::warn!(worker = w, layer, error = %e, "re-dispatching a layer's work");
                        bump(
                            &self.counters.failed_messages,
                            "moeless_dispatch_failed_messages_total",
                            1,
                        );
                        self.mark_suspect(w);
                        failed.insert(w);
                        last_error = e;
                        next.extend(idx);
                    }
                    Outcome::Fatal(e) => return Err(ExpertError::Transport(e)),
                }
            }
            pending = next;
        }
        if !pending.is_empty() {
            return Err(ExpertError::Transport(format!(
                "{} tasks of layer {layer} found no worker after {MAX_ROUNDS} rounds: {last_error}",
                pending.len()
            )));
        }
        // Answers in the order of their first task, whatever order they arrived in, so that
        // combining adds in the same order on every run.
        answers.sort_by_key(|(idx, _)| idx[0]);
        Ok(answers)
    }
}

/// Most rounds of re-dispatch for one layer before giving up.
const MAX_ROUNDS: usize = 6;

/// How often a layer waiting on workers looks at whether the control plane declared one dead.
const DEAD_WORKER_CHECK: Duration = Duration::from_millis(20);

impl ExpertFunction for RemoteExperts {
    fn execute(&self, layer: usize, tasks: Vec<ExpertTask>) -> Result<Vec<Tensor>, ExpertError> {
        let mut outputs: Vec<Tensor> = tasks
            .iter()
            .map(|t| Tensor::matrix(0, t.input.cols(), vec![]))
            .collect();
        for (idx, answer) in self.run_layer(layer, &tasks, false)? {
            match answer {
                Answer::PerTask(outs) => idx.into_iter().zip(outs).for_each(|(i, o)| outputs[i] = o),
                Answer::Summed { .. } => {
                    return Err(ExpertError::Transport(
                        "a worker summed work it was asked per task".into(),
                    ))
                }
            }
        }
        Ok(outputs)
    }

    /// Each worker sums its tokens' expert outputs and answers one row per token; the
    /// in-process fast path and workers answering per task are combined here. With one worker
    /// the additions happen in the same order as in process, so outputs are bit-identical.
    fn execute_into(&self, layer: usize, tasks: Vec<ExpertTask>, out: &mut Tensor) -> Result<(), ExpertError> {
        for (idx, answer) in self.run_layer(layer, &tasks, true)? {
            match answer {
                Answer::PerTask(outs) => {
                    for (i, y) in idx.into_iter().zip(&outs) {
                        add_weighted_rows(out, y, &tasks[i].tokens, &tasks[i].weights)?;
                    }
                }
                Answer::Summed { tokens, sums } => {
                    add_weighted_rows(out, &sums, &tokens, &vec![1.0; tokens.len()])?;
                }
            }
        }
        Ok(())
    }
}

impl ShareSource for RemoteExperts {
    fn shares(&self, key: ExpertKey) -> Vec<(InstanceId, f32)> {
        let plan = self.view.read().ok().and_then(|v| v.active.clone());
        match plan.as_ref().and_then(|p| p.by_key.get(&key)) {
            Some(list) if !list.is_empty() => list
                .iter()
                .enumerate()
                .map(|(r, (_, share))| (InstanceId { key, replica: r as u32 }, *share))
                .collect(),
            _ => vec![(InstanceId { key, replica: 0 }, 1.0)],
        }
    }

    /// The worker the active plan puts the instance on.
    fn site(&self, instance: InstanceId) -> Option<u64> {
        let plan = self.view.read().ok().and_then(|v| v.active.clone())?;
        let list = plan.by_key.get(&instance.key)?;
        list.get(instance.replica as usize).map(|(w, _)| *w)
    }
}

/// Polls the control plane for the latest plan and the workers' liveness, and activates a new
/// plan once its workers report it applied.
async fn follow(control: ControlClient, opts: RemoteOptions, view: Arc<RwLock<View>>, counters: Arc<Counters>) {
    loop {
        if let Err(e) = poll_once(&control, &opts, &view, &counters).await {
            tracing::debug!(error = %e, "reading plans from the control plane");
            control.rotate();
        }
        tokio::time::sleep(opts.poll).await;
    }
}

async fn poll_once(
    control: &ControlClient,
    opts: &RemoteOptions,
    view: &RwLock<View>,
    counters: &Counters,
) -> anyhow::Result<()> {
    let mut engine = control.engine().await?;
    let workers = engine
        .list_workers(epb::ListWorkersRequest {})
        .await?
        .into_inner()
        .workers;
    // Plans are served linearizably by the leader; a follower refuses and we rotate.
    let plan = engine
        .get_plan(epb::GetPlanRequest {
            epoch: 0,
            model: opts.model.clone(),
        })
        .await?
        .into_inner()
        .plan
        .filter(|p| p.model == opts.model);
    let mut v = view.write().map_err(|_| anyhow::anyhow!("view poisoned"))?;
    v.workers = workers
        .into_iter()
        .map(|w| {
            (
                w.worker_id,
                WorkerView {
                    addr: w.address.parse().ok(),
                    alive: w.health != "dead",
                    applied: w.applied_epoch,
                },
            )
        })
        .collect();
    let active_epoch = v.active.as_ref().map_or(0, |p| p.epoch);
    if let Some(p) = plan {
        let newer_than_pending = v.pending.as_ref().is_none_or(|(q, _)| q.epoch < p.epoch);
        if p.epoch > active_epoch && newer_than_pending {
            v.pending = Some((Arc::new(PlanView::from_proto(&p)), Instant::now()));
        }
    }
    if let Some((p, since)) = v.pending.clone() {
        let ready = p.workers().iter().all(|w| match v.workers.get(w) {
            Some(wv) => !wv.alive || wv.applied >= p.epoch,
            None => true,
        });
        if ready || since.elapsed() >= opts.activation_timeout {
            tracing::info!(epoch = p.epoch, ready, "plan active");
            v.active = Some(p);
            v.pending = None;
            bump(&counters.activations, "moeless_dispatch_plan_activations_total", 1);
        }
    }
    Ok(())
}
