//! Admin REST API (axum): JSON in and out, bearer token on every route but `/health`,
//! errors as `{"error": {"message", "type", "code"}}`.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::failpoint::FailpointError;
use crate::liveness::InstanceState;
use crate::node::{Node, NodeError};
use crate::state::{ModelSpec, PlanIntent, PlanOrigin, PolicyConfig, PredictorUpdate, WorkerHealth};
use crate::types::{Command, CommandResponse, NodeInfo};

const WRITE_WAIT: Duration = Duration::from_secs(3);

/// Largest request body accepted (a plan for every expert of a large model fits easily);
/// bodies over it are refused with 413 while being read, never buffered whole.
pub const MAX_BODY_BYTES: usize = 16 << 20;

/// A request body, or why it could not be read (too large, cut off).
type Body = Result<Bytes, BytesRejection>;

/// An API error with its HTTP status and stable type label.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
        }
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

#[derive(Serialize, Deserialize, Debug)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub code: u16,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        metrics::counter!("moeless_admin_errors_total", "type" => self.kind).increment(1);
        let body = ErrorBody {
            error: ErrorDetail {
                message: self.message,
                kind: self.kind.to_string(),
                code: self.status.as_u16(),
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        let status = match &e {
            NodeError::Rejected(_) => StatusCode::CONFLICT,
            NodeError::NotLeader { .. } | NodeError::NoLeader => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let kind = match &e {
            NodeError::Rejected(_) => "rejected",
            NodeError::NotLeader { .. } => "not_leader",
            NodeError::NoLeader => "no_leader",
            NodeError::Storage(_) | NodeError::Fatal(_) => "storage_error",
            _ => "raft_error",
        };
        ApiError::new(status, kind, e.to_string())
    }
}

type ApiResult = Result<Response, ApiError>;

/// Parses a JSON body, answering 413 over [`MAX_BODY_BYTES`] and 400 on malformed input,
/// both as JSON errors.
fn parse<T: DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("request body exceeds {MAX_BODY_BYTES} bytes"),
            )
        } else {
            ApiError::bad_request(format!("reading the request body: {}", e.body_text()))
        }
    })?;
    if body.is_empty() {
        return Err(ApiError::bad_request("request body is empty; expected JSON"));
    }
    serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))
}

fn ok<T: Serialize>(value: T) -> ApiResult {
    Ok(Json(value).into_response())
}

async fn require_token(State(node): State<Node>, req: Request, next: Next) -> Response {
    if let Some(token) = node.admin_token() {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let valid = given.is_some_and(|g| shared::secret::constant_time_eq(g.as_bytes(), token.as_bytes()));
        if !valid {
            let message = if given.is_some() {
                "invalid bearer token"
            } else {
                "missing bearer token"
            };
            return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
        }
    }
    next.run(req).await
}

pub fn router(node: Node) -> Router {
    // The process's one recorder (shared with an endpoint in the same process).
    let _ = pki::https::prometheus();
    let protected = Router::new()
        .route("/v1/cluster", get(cluster))
        .route("/v1/policy", get(get_policy).put(put_policy))
        .route("/v1/placement", get(latest_plan).post(commit_plan))
        .route("/v1/placement/{epoch}", get(plan_by_epoch))
        .route("/v1/workers", get(workers))
        .route("/v1/workers/{id}/drain", post(drain_worker))
        .route("/v1/workers/{id}/instances", get(worker_instances))
        .route("/v1/instances", get(instances))
        .route("/v1/models", get(models).post(put_model))
        .route("/v1/predictor", get(get_predictor).put(put_predictor))
        .route("/v1/rebalance", post(rebalance))
        .route("/v1/cost", get(cost))
        .route("/v1/decisions", get(decisions))
        .route("/v1/loads", get(loads))
        .route("/v1/members", post(add_member))
        .route("/v1/members/{id}", delete(remove_member))
        .route("/v1/debug/failpoints", get(get_failpoints).put(put_failpoints))
        .route("/metrics", get(render_metrics))
        .route("/openapi.json", get(openapi))
        .route_layer(middleware::from_fn_with_state(node.clone(), require_token));
    Router::new()
        .route("/health", get(health))
        .merge(protected)
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(node)
}

async fn health(State(node): State<Node>) -> ApiResult {
    let view = node.cluster();
    ok(json!({"status": "ok", "id": view.id, "state": view.state, "leader": view.leader}))
}

async fn cluster(State(node): State<Node>) -> ApiResult {
    ok(node.cluster())
}

/// The state for a read: linearizable on the leader, else this node's applied state, which may
/// lag. The `x-moeless-read` header (`linearizable` or `local`) tells clients which they got.
async fn read(node: &Node) -> (crate::state::ClusterState, ReadKind) {
    match node.linearizable_state().await {
        Ok(s) => (s, ReadKind("linearizable")),
        Err(_) => (node.state_machine().state().await, ReadKind("local")),
    }
}

#[derive(Clone, Copy)]
struct ReadKind(&'static str);

impl ReadKind {
    fn answer(self, r: ApiResult) -> ApiResult {
        let mut resp = match r {
            Ok(resp) => resp,
            Err(e) => e.into_response(),
        };
        resp.headers_mut()
            .insert("x-moeless-read", header::HeaderValue::from_static(self.0));
        Ok(resp)
    }
}

async fn get_policy(State(node): State<Node>) -> ApiResult {
    let (state, kind) = read(&node).await;
    kind.answer(ok(state.policy))
}

/// The `Idempotency-Key` of a write: a client that retries a write after an ambiguous answer
/// (a timeout, a 503) sends the same key and the command is applied once, answering what the
/// first application answered. Without it, a retried write may apply twice.
const IDEMPOTENCY_KEY: &str = "idempotency-key";
const MAX_IDEMPOTENCY_KEY_BYTES: usize = 200;

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY_BYTES && k.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY_BYTES} visible ASCII characters"
            ))
        })?;
    // Client keys live in their own namespace, apart from the keys nodes draw for themselves.
    Ok(Some(format!("client-{key}")))
}

async fn write(node: &Node, headers: &HeaderMap, cmd: Command) -> Result<(u64, CommandResponse), ApiError> {
    let key = idempotency_key(headers)?;
    let started = std::time::Instant::now();
    let r = node.write_keyed(key, cmd, WRITE_WAIT).await;
    metrics::histogram!("moeless_commit_seconds").record(started.elapsed().as_secs_f64());
    Ok(r?)
}

async fn put_policy(State(node): State<Node>, headers: HeaderMap, body: Body) -> ApiResult {
    let policy: PolicyConfig = parse(body)?;
    let (log_index, _) = write(&node, &headers, Command::SetPolicy(policy.clone())).await?;
    ok(json!({"log_index": log_index, "policy": policy}))
}

/// The latest plan, or with `?model=NAME` the latest plan of that model (epochs are shared by
/// every model's plans).
async fn latest_plan(State(node): State<Node>, RawQuery(query): RawQuery) -> ApiResult {
    let mut model: Option<String> = None;
    for (key, value) in form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        match (key.as_ref(), value) {
            ("model", v) if !v.is_empty() => model = Some(v.into_owned()),
            ("model", _) => return Err(ApiError::bad_request("model= needs a model name")),
            (other, _) => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?} (model)"
                )))
            }
        }
    }
    let (state, kind) = read(&node).await;
    let latest = match &model {
        Some(m) => state.latest_plan_of(m),
        None => state.latest_plan(),
    };
    kind.answer(match (latest, &model) {
        (Some(p), _) => ok(p),
        (None, Some(m)) => Err(ApiError::not_found(format!(
            "no plan of model {m:?} has been committed yet"
        ))),
        (None, None) => Err(ApiError::not_found("no plan has been committed yet")),
    })
}

async fn plan_by_epoch(State(node): State<Node>, Path(epoch): Path<String>) -> ApiResult {
    let epoch: u64 = epoch
        .parse()
        .map_err(|_| ApiError::bad_request(format!("epoch {epoch:?} is not an integer")))?;
    let (state, kind) = read(&node).await;
    kind.answer(match state.plans.get(&epoch) {
        Some(p) => ok(p),
        None => Err(ApiError::not_found(format!("no plan with epoch {epoch}"))),
    })
}

#[derive(Deserialize)]
struct CommitPlanBody {
    #[serde(flatten)]
    intent: PlanIntent,
    #[serde(default)]
    expected_epoch: Option<u64>,
}

async fn commit_plan(State(node): State<Node>, headers: HeaderMap, body: Body) -> ApiResult {
    let mut b: CommitPlanBody = parse(body)?;
    // Whatever the body says: a plan committed here is the operator's, which the reconciler
    // never replaces with its static spread.
    b.intent.origin = PlanOrigin::Operator;
    let (log_index, resp) = write(
        &node,
        &headers,
        Command::CommitPlan {
            intent: b.intent,
            expected_epoch: b.expected_epoch,
        },
    )
    .await?;
    match resp {
        CommandResponse::PlanCommitted { epoch } => {
            metrics::gauge!("moeless_plan_epoch").set(epoch as f64);
            Ok((
                StatusCode::CREATED,
                Json(json!({"epoch": epoch, "log_index": log_index})),
            )
                .into_response())
        }
        other => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("unexpected {other:?}"),
        )),
    }
}

async fn workers(State(node): State<Node>) -> ApiResult {
    let s = node.read_state().await;
    ok(node.worker_views(&s))
}

fn worker_id(id: &str) -> Result<u64, ApiError> {
    id.parse()
        .map_err(|_| ApiError::bad_request(format!("worker id {id:?} is not an integer")))
}

/// The instances the latest heartbeat of one worker reported to this node.
async fn worker_instances(State(node): State<Node>, Path(id): Path<String>) -> ApiResult {
    let worker = worker_id(&id)?;
    let registered = node.state_machine().read(|s| s.workers.contains_key(&worker)).await;
    if !registered {
        return Err(ApiError::not_found(format!("worker {worker} is not registered")));
    }
    ok(node.worker_instances(worker).unwrap_or_default())
}

/// Every reported instance on every worker, optionally only those in `?state=...`.
async fn instances(State(node): State<Node>, RawQuery(query): RawQuery) -> ApiResult {
    let mut wanted: Option<InstanceState> = None;
    for pair in query.as_deref().unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("state", v)) => {
                wanted = Some(
                    v.parse()
                        .map_err(|e: crate::liveness::UnknownInstanceState| ApiError::bad_request(e.to_string()))?,
                )
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {pair:?} (state)"
                )))
            }
        }
    }
    #[derive(Serialize)]
    struct WorkerInstance {
        worker: u64,
        #[serde(flatten)]
        instance: crate::liveness::InstanceReport,
    }
    let all = node
        .with_liveness(|l| {
            l.observations()
                .flat_map(|(worker, o)| {
                    o.instances
                        .iter()
                        .filter(|i| wanted.is_none_or(|w| i.state == w))
                        .map(move |i| WorkerInstance {
                            worker,
                            instance: i.clone(),
                        })
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    ok(all)
}

async fn drain_worker(State(node): State<Node>, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let worker = worker_id(&id)?;
    let (log_index, _) = write(&node, &headers, Command::DrainWorker { worker }).await?;
    ok(json!({"worker": worker, "health": "draining", "log_index": log_index}))
}

async fn models(State(node): State<Node>) -> ApiResult {
    ok(node.read_state().await.models.into_values().collect::<Vec<_>>())
}

async fn put_model(State(node): State<Node>, headers: HeaderMap, body: Body) -> ApiResult {
    let model: ModelSpec = parse(body)?;
    let (log_index, _) = write(&node, &headers, Command::PutModel(model.clone())).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"log_index": log_index, "model": model})),
    )
        .into_response())
}

async fn get_predictor(State(node): State<Node>) -> ApiResult {
    match node.read_state().await.predictor {
        Some(p) => ok(p),
        None => Err(ApiError::not_found("no predictor state has been committed yet")),
    }
}

async fn put_predictor(State(node): State<Node>, headers: HeaderMap, body: Body) -> ApiResult {
    let update: PredictorUpdate = parse(body)?;
    let (log_index, resp) = write(&node, &headers, Command::UpdatePredictor(update)).await?;
    let version = match resp {
        CommandResponse::PredictorVersion { version } => Some(version),
        _ => None,
    };
    ok(json!({"log_index": log_index, "version": version}))
}

/// Runs one scaling round now (on the leader); answers the committed epoch, or `null` and why not
/// per model.
async fn rebalance(State(node): State<Node>) -> ApiResult {
    ok(crate::reconciler::rebalance(&node).await?)
}

async fn cost(State(node): State<Node>) -> ApiResult {
    let entries = node.read_state().await.cost;
    let gpu_seconds: f64 = entries.iter().map(|e| e.gpu_seconds).sum();
    let cold_starts: u64 = entries.iter().map(|e| e.cold_starts).sum();
    ok(json!({"total_gpu_seconds": gpu_seconds, "total_cold_starts": cold_starts, "entries": entries}))
}

async fn decisions(State(node): State<Node>) -> ApiResult {
    ok(node.read_state().await.decisions)
}

async fn loads(State(node): State<Node>) -> ApiResult {
    let board = node.loads();
    let tokens: Vec<_> = board
        .tokens
        .iter()
        .map(|((layer, expert), t)| json!({"layer": layer, "expert": expert, "tokens": t}))
        .collect();
    ok(json!({"reports": board.reports, "tokens": tokens, "worker_epochs": board.worker_epochs}))
}

#[derive(Deserialize)]
struct AddMemberBody {
    id: u64,
    raft_addr: String,
    #[serde(default)]
    admin_addr: String,
}

async fn add_member(State(node): State<Node>, body: Body) -> ApiResult {
    let b: AddMemberBody = parse(body)?;
    if !crate::types::is_host_port(&b.raft_addr) {
        return Err(ApiError::bad_request(format!(
            "raft_addr {:?} is not HOST:PORT",
            b.raft_addr
        )));
    }
    node.add_member(
        b.id,
        NodeInfo {
            raft_addr: b.raft_addr,
            admin_addr: b.admin_addr,
        },
    )
    .await?;
    ok(node.cluster())
}

async fn remove_member(State(node): State<Node>, Path(id): Path<String>) -> ApiResult {
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::bad_request(format!("member id {id:?} is not an integer")))?;
    node.remove_member(id).await?;
    ok(node.cluster())
}

async fn get_failpoints(State(node): State<Node>) -> ApiResult {
    let fp = node.failpoints();
    if !fp.is_enabled() {
        return Err(ApiError::not_found(FailpointError::Disabled.to_string()));
    }
    ok(fp.list())
}

/// Sets failpoints on this node only: `{"append-before-flush": "abort", ...}`; answers the armed
/// points. All settings are checked before any is applied.
async fn put_failpoints(State(node): State<Node>, body: Body) -> ApiResult {
    let fp = node.failpoints();
    if !fp.is_enabled() {
        return Err(ApiError::not_found(FailpointError::Disabled.to_string()));
    }
    let wanted: std::collections::BTreeMap<String, String> = parse(body)?;
    let settings = wanted
        .iter()
        .map(|(name, action)| crate::failpoint::parse_setting(name, action))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    for (name, action) in settings {
        fp.set(name, action).map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    ok(fp.list())
}

async fn render_metrics(State(node): State<Node>) -> ApiResult {
    let view = node.cluster();
    let id = view.id.to_string();
    metrics::gauge!("moeless_raft_term", "node" => id.clone()).set(view.term as f64);
    metrics::gauge!("moeless_raft_is_leader", "node" => id.clone()).set(f64::from(u8::from(node.is_leader())));
    metrics::gauge!("moeless_raft_last_applied", "node" => id.clone()).set(view.last_applied.unwrap_or(0) as f64);
    metrics::gauge!("moeless_plan_epoch", "node" => id.clone()).set(view.epoch as f64);
    let state = node.state_machine().state().await;
    let views = node.worker_views(&state);
    for health in [WorkerHealth::Active, WorkerHealth::Draining, WorkerHealth::Dead] {
        let n = views.iter().filter(|w| w.health == health).count();
        metrics::gauge!("moeless_workers", "node" => id.clone(), "health" => health.label()).set(n as f64);
    }
    // Expert instances as each worker's latest heartbeat to this node reported them (workers
    // expose no metrics endpoint of their own: the control plane is where they are scraped).
    for w in &views {
        let worker = w.spec.id.to_string();
        let reported = node.worker_instances(w.spec.id).unwrap_or_default();
        for st in crate::liveness::InstanceState::ALL {
            let n = reported.iter().filter(|i| i.state == st).count();
            metrics::gauge!("moeless_worker_instances", "node" => id.clone(), "worker" => worker.clone(), "state" => st.label())
                .set(n as f64);
        }
        let slowest = reported.iter().map(|i| i.cold_start_ms).fold(0.0, f64::max);
        metrics::gauge!("moeless_worker_cold_start_ms_max", "node" => id.clone(), "worker" => worker.clone())
            .set(slowest);
    }
    let text = pki::https::prometheus().map(|h| h.render()).unwrap_or_default();
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

async fn openapi() -> ApiResult {
    ok(openapi_document())
}

/// The OpenAPI 3.1 description of this API.
pub fn openapi_document() -> serde_json::Value {
    let err = json!({"$ref": "#/components/responses/Error"});
    let op = |summary: &str| json!({"summary": summary, "responses": {"200": {"description": "OK"}, "default": err}});
    let idempotency = json!({
        "name": "Idempotency-Key", "in": "header", "required": false,
        "description": "Retrying a write with the same key applies it at most once and answers the first result",
        "schema": {"type": "string", "maxLength": MAX_IDEMPOTENCY_KEY_BYTES}
    });
    let body_op = |summary: &str, schema: &str| {
        json!({
            "summary": summary,
            "parameters": [idempotency],
            "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}},
            "responses": {"200": {"description": "OK"}, "201": {"description": "Created"}, "default": err}
        })
    };
    json!({
        "openapi": "3.1.0",
        "info": {"title": "MoEless control plane admin API", "version": env!("CARGO_PKG_VERSION")},
        "security": [{"bearer": []}],
        "paths": {
            "/health": {"get": {"summary": "Liveness (no token)", "security": [], "responses": {"200": {"description": "OK"}}}},
            "/v1/cluster": {"get": op("Leader, term and members")},
            "/v1/policy": {"get": op("Policy configuration"), "put": body_op("Replace the policy configuration", "PolicyConfig")},
            "/v1/placement": {"get": op("Latest committed plan (`?model=NAME`: of that model)"), "post": body_op("Commit a plan under the next epoch", "PlanIntent")},
            "/v1/placement/{epoch}": {"get": op("Plan by epoch")},
            "/v1/workers": {"get": op("Registered workers with liveness as seen by this node: health (active, draining, dead), heartbeat_age_ms, applied_epoch, memory used/budget")},
            "/v1/workers/{id}/instances": {"get": op("Instances the worker's latest heartbeat reported: state, bytes, cold_start_ms, tokens, source")},
            "/v1/instances": {"get": {"summary": "Reported instances of every worker", "parameters": [{"name": "state", "in": "query", "required": false, "schema": {"type": "string", "enum": ["loading", "warm", "idle", "evicted"]}}], "responses": {"200": {"description": "OK"}, "default": err}}},
            "/v1/workers/{id}/drain": {"post": op("Mark a worker draining")},
            "/v1/models": {"get": op("Registered models"), "post": body_op("Register a model", "ModelSpec")},
            "/v1/predictor": {"get": op("Predictor state"), "put": body_op("New predictor version", "PredictorUpdate")},
            "/v1/rebalance": {"post": op("Run one scaling round now on the leader: the policy's placement over the loads reported since the last round; answers the committed epoch or why no plan (under MoEless, a candidate that helps by more than half the threshold but not all of it is committed as share-0 standby instances: warm-up ahead of need)")},
            "/v1/cost": {"get": op("Cost ledger")},
            "/v1/decisions": {"get": op("Decision log")},
            "/v1/loads": {"get": op("Load reports received by this node")},
            "/v1/members": {"post": body_op("Add a voter", "Member")},
            "/v1/members/{id}": {"delete": op("Remove a voter")},
            "/v1/debug/failpoints": {"get": op("Armed failpoints of this node (404 unless it was started with MOELESS_FAILPOINTS set)"), "put": body_op("Arm failpoints on this node: {\"append-before-flush\": \"abort\"}; actions off, abort, error, sleep(MS)", "Failpoints")},
            "/metrics": {"get": op("Prometheus metrics")},
            "/openapi.json": {"get": op("This document")}
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {"Error": {"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "required": ["message", "type", "code"], "properties": {"message": {"type": "string"}, "type": {"type": "string"}, "code": {"type": "integer"}}}}},
                "PolicyConfig": {"type": "object", "required": ["placement", "predictor", "rebalance_interval_ms", "keep_alive_ms", "max_replicas_per_expert"]},
                "PlanIntent": {"type": "object", "required": ["model", "instances"], "properties": {"expected_epoch": {"type": "integer"}, "reason": {"type": "string"}}},
                "ModelSpec": {"type": "object", "required": ["name", "architecture", "num_layers", "num_experts", "top_k", "weights"]},
                "PredictorUpdate": {"type": "object", "required": ["name", "parameters"]},
                "Member": {"type": "object", "required": ["id", "raft_addr"], "properties": {"admin_addr": {"type": "string"}}},
                "Failpoints": {"type": "object", "additionalProperties": {"type": "string"}}
            }
        }
    })
}
