//! The HTTP server: routes, authentication, body limits, streaming, and graceful shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use data_plane::engine::Engine;
use futures_util::Stream;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::api::*;
use crate::error::ApiError;
use crate::generation::{
    chat_logprobs, check_prompt, completion_logprobs, ChoiceUpdate, GenParams, Generation, Limits,
};
use crate::logprobs;
use crate::scheduler::{self, SchedulerConfig, SchedulerHandle, SchedulerStats};
use crate::tokenizer::TextTokenizer;

/// Everything `moeless serve` can set, validated once by [`Server::start`].
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub model_name: String,
    pub api_key: Option<String>,
    pub max_num_seqs: usize,
    /// Sequences that may wait for their first step before new requests get 429.
    pub max_queued: usize,
    /// Defaults to the model's maximum positions.
    pub max_model_len: Option<usize>,
    pub max_num_batched_tokens: usize,
    pub block_size: usize,
    /// KV blocks; defaults to what `kv_cache_bytes` holds.
    pub num_kv_blocks: Option<usize>,
    pub kv_cache_bytes: usize,
    /// Reuse the KV blocks of prompt prefixes already computed (vLLM's automatic prefix
    /// caching).
    pub prefix_caching: bool,
    pub max_body_bytes: usize,
    pub max_n: usize,
    pub shutdown_timeout: Duration,
    /// Serve HTTPS with these settings (`--ssl-certfile`/`--ssl-keyfile`); `None` is HTTP.
    pub tls: Option<Arc<pki::https::ServerConfig>>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            model_name: "moeless".into(),
            api_key: None,
            max_num_seqs: 64,
            max_queued: 1024,
            max_model_len: None,
            max_num_batched_tokens: 2048,
            block_size: 16,
            num_kv_blocks: None,
            kv_cache_bytes: 2 << 30,
            prefix_caching: true,
            max_body_bytes: 8 << 20,
            max_n: 16,
            tls: None,
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid serve configuration: {0}")]
    Config(String),
    #[error("server I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("the engine died: {0}")]
    EngineDied(String),
}

struct AppState {
    model_name: String,
    created: u64,
    limits: Limits,
    eos: Vec<u32>,
    tokenizer: Option<Arc<TextTokenizer>>,
    scheduler: SchedulerHandle,
    api_key: Option<String>,
}

/// A running server: its address, live counters, and the way to stop it.
pub struct Server {
    addr: SocketAddr,
    scheduler: SchedulerHandle,
    stop_tx: Option<tokio::sync::oneshot::Sender<()>>,
    serve_task: tokio::task::JoinHandle<std::io::Result<()>>,
    engine_thread: Option<std::thread::JoinHandle<Result<(), String>>>,
    shutdown_timeout: Duration,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Server {
    /// Starts serving `engine` on `listener` (the scheduler thread takes the engine).
    /// `tokenizer: None` accepts token-id prompts only and returns no text.
    pub async fn start(
        engine: Engine,
        tokenizer: Option<TextTokenizer>,
        cfg: ServeConfig,
        listener: tokio::net::TcpListener,
    ) -> Result<Server, ServeError> {
        let mc = engine.config();
        let max_model_len = cfg.max_model_len.unwrap_or(mc.max_position_embeddings);
        if max_model_len < 2 || max_model_len > mc.max_position_embeddings {
            return Err(ServeError::Config(format!(
                "max_model_len {max_model_len} must be in [2, {}] (the model's maximum positions)",
                mc.max_position_embeddings
            )));
        }
        if cfg.max_num_seqs == 0 || cfg.max_num_batched_tokens == 0 || cfg.block_size == 0 || cfg.max_n == 0 {
            return Err(ServeError::Config(
                "max_num_seqs, max_num_batched_tokens, block_size and max_n must be positive".into(),
            ));
        }
        let per_block = engine.new_cache().bytes_per_position().max(1) * cfg.block_size;
        let num_blocks = cfg.num_kv_blocks.unwrap_or(cfg.kv_cache_bytes / per_block);
        if num_blocks * cfg.block_size < max_model_len {
            return Err(ServeError::Config(format!(
                "{num_blocks} KV blocks of {} positions cannot hold one sequence of max_model_len {max_model_len}",
                cfg.block_size
            )));
        }
        let mut eos = mc.eos_token_ids.clone();
        if let Some(t) = &tokenizer {
            eos.extend(t.eos_token_ids().iter().filter(|id| !mc.eos_token_ids.contains(id)));
        }
        let limits = Limits {
            max_model_len,
            vocab: mc.vocab_size,
            max_n: cfg.max_n,
        };
        // Install the recorder before the scheduler takes its metric handles.
        let _ = crate::metrics::prometheus();
        let (sched, engine_thread) = scheduler::spawn(
            engine,
            SchedulerConfig {
                max_num_seqs: cfg.max_num_seqs,
                max_num_batched_tokens: cfg.max_num_batched_tokens,
                max_model_len,
                max_queued: cfg.max_queued,
                block_size: cfg.block_size,
                num_blocks,
                prefix_caching: cfg.prefix_caching,
                model_name: cfg.model_name.clone(),
            },
        )?;
        let state = Arc::new(AppState {
            model_name: cfg.model_name.clone(),
            created: unix_now(),
            limits,
            eos,
            tokenizer: tokenizer.map(Arc::new),
            scheduler: sched.clone(),
            api_key: cfg.api_key.clone().filter(|k| !k.is_empty()),
        });
        let app = router(state, cfg.max_body_bytes);
        let addr = listener.local_addr()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let tls = cfg.tls.clone();
        let serve_task = tokio::spawn(pki::https::serve(listener, app, tls, async {
            let _ = stop_rx.await;
        }));
        tracing::info!(%addr, max_model_len, num_blocks, "serving");
        Ok(Server {
            addr,
            scheduler: sched,
            stop_tx: Some(stop_tx),
            serve_task,
            engine_thread: Some(engine_thread),
            shutdown_timeout: cfg.shutdown_timeout,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> &Arc<SchedulerStats> {
        self.scheduler.stats()
    }

    /// Stops accepting, lets in-flight requests finish within the shutdown timeout, aborts
    /// the rest, and stops the engine. Errors if the engine had died.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        if tokio::time::timeout(self.shutdown_timeout, &mut self.serve_task)
            .await
            .is_err()
        {
            tracing::warn!("shutdown timeout passed: aborting in-flight requests");
            self.scheduler.abort_all();
            if tokio::time::timeout(Duration::from_secs(5), &mut self.serve_task)
                .await
                .is_err()
            {
                self.serve_task.abort();
            }
        }
        self.scheduler.shutdown();
        let joined = match self.engine_thread.take() {
            Some(t) => tokio::task::spawn_blocking(move || t.join()).await.ok(),
            None => None,
        };
        match joined {
            Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(message))) => Err(ServeError::EngineDied(message)),
            Some(Err(_)) | None => Err(ServeError::EngineDied("the scheduler thread panicked".into())),
        }
    }
}

fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    let protected = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics_route))
        .route("/version", get(version))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), require_api_key));
    Router::new()
        .route("/health", get(health))
        .merge(protected)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::Extension(BodyLimit(max_body_bytes)))
        .with_state(state)
}

async fn require_api_key(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !shared::secret::constant_time_eq(given.trim().as_bytes(), key.as_bytes()) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// JSON body with OpenAI-shaped rejections (413 over the limit, 400 for bad JSON).
struct ApiJson<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let limit = req.extensions().get::<BodyLimit>().map(|l| l.0).unwrap_or_default();
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::body_too_large(limit)
            } else {
                ApiError::bad_request(format!("reading the request body: {}", e.body_text()))
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
    }
}

/// The configured body limit, for the 413 message.
#[derive(Clone, Copy)]
struct BodyLimit(usize);

async fn not_found(uri: Uri) -> ApiError {
    ApiError::route_not_found(uri.path())
}

async fn health(State(st): State<Arc<AppState>>) -> StatusCode {
    if st.scheduler.is_alive() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn openapi(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(crate::openapi::document(st.limits.max_n, crate::generation::MAX_STOPS))
}

async fn version() -> Json<Value> {
    Json(serde_json::json!({ "version": env!("CARGO_PKG_VERSION") }))
}

async fn models(State(st): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: st.model_name.clone(),
            object: "model",
            created: st.created,
            owned_by: "moeless",
            max_model_len: st.limits.max_model_len,
        }],
    })
}

async fn metrics_route() -> Response {
    match crate::metrics::prometheus() {
        Some(h) => {
            h.run_upkeep();
            (
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                h.render(),
            )
                .into_response()
        }
        None => ApiError::unavailable("metrics are recorded by another recorder in this process").into_response(),
    }
}

impl AppState {
    fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(m) if m != self.model_name => Err(ApiError::model_not_found(m)),
            _ => Ok(()),
        }
    }

    fn tokenizer(&self, what: &str) -> Result<&Arc<TextTokenizer>, ApiError> {
        self.tokenizer.as_ref().ok_or_else(|| {
            ApiError::bad_request(format!(
                "this model was served without a tokenizer: {what} needs one (send token ids to /v1/completions)"
            ))
        })
    }

    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ApiError> {
        self.tokenizer("text input")?
            .encode(text, add_special_tokens)
            .map_err(|e| ApiError::bad_request(e.to_string()))
    }

    fn submit(
        &self,
        prompts: Vec<(Vec<u32>, usize)>,
        params: &GenParams,
        arrival: Instant,
    ) -> Result<Generation, ApiError> {
        Generation::submit(
            &self.scheduler,
            self.tokenizer.clone(),
            &self.model_name,
            prompts,
            params,
            &self.eos,
            arrival,
        )
    }
}

fn request_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

async fn completions(State(st): State<Arc<AppState>>, ApiJson(req): ApiJson<CompletionRequest>) -> Response {
    match completions_inner(st, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn completions_inner(st: Arc<AppState>, req: CompletionRequest) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    st.check_model(req.gen.model.as_deref())?;
    let mut params = GenParams::validate(&req.gen, None, &st.limits)?;
    params.logprobs = completion_logprobs(req.gen.logprobs.as_ref())?;
    if req.echo && params.logprobs.is_some() {
        // The prompt's log-probabilities too (what evaluation harnesses score with).
        if params.stream {
            return Err(ApiError::invalid_param(
                "logprobs",
                "logprobs with echo are returned whole: set stream to false",
            ));
        }
        params.prompt_logprobs = params.logprobs;
    }
    // `echo`: each choice's text starts with its prompt (as given, or decoded from its ids).
    let echo: Vec<String> = if req.echo {
        let decode = |ids: &[u32]| -> Result<String, ApiError> {
            match &st.tokenizer {
                Some(t) => t
                    .decode(ids)
                    .map_err(|e| ApiError::invalid_param("prompt", e.to_string())),
                None => Ok(String::new()),
            }
        };
        match &req.prompt {
            PromptInput::Text(s) => vec![s.clone()],
            PromptInput::Texts(v) => v.clone(),
            PromptInput::Ids(v) => vec![decode(v)?],
            PromptInput::IdLists(v) => v.iter().map(|ids| decode(ids)).collect::<Result<_, _>>()?,
        }
    } else {
        Vec::new()
    };
    let raw: Vec<Vec<u32>> = match req.prompt {
        PromptInput::Text(s) => vec![st.encode(&s, true)?],
        PromptInput::Texts(v) => v.iter().map(|s| st.encode(s, true)).collect::<Result<_, _>>()?,
        PromptInput::Ids(v) => vec![v],
        PromptInput::IdLists(v) => v,
    };
    if raw.is_empty() {
        return Err(ApiError::invalid_param("prompt", "the prompt must not be empty"));
    }
    let mut prompts = Vec::new();
    for p in raw {
        let mt = check_prompt(&p, params.max_tokens, &st.limits, "prompt")?;
        prompts.push((p, mt));
    }
    let prompt_ids: Vec<Vec<u32>> = if params.return_token_ids || params.prompt_logprobs.is_some() {
        prompts.iter().map(|(p, _)| p.clone()).collect()
    } else {
        Vec::new()
    };
    let mut gen = st.submit(prompts, &params, arrival)?;
    let id = request_id("cmpl");
    let (model, created) = (st.model_name.clone(), unix_now());
    let n = params.n;
    let with_logprobs = params.logprobs.is_some();
    let tok = st.tokenizer.clone();
    if params.stream {
        // Character offset of each choice's next token in its text.
        let mut offsets = vec![0usize; gen.num_choices()];
        let include_usage = params.include_usage;
        let return_ids = params.return_token_ids;
        let chunk = move |choices: Vec<CompletionChoice>, usage: Option<Usage>| CompletionResponse {
            id: id.clone(),
            object: "text_completion",
            created,
            model: model.clone(),
            choices,
            usage,
        };
        let usage_chunk = chunk.clone();
        let echo_chunk = chunk.clone();
        let opening = move || {
            (0..echo.len() * n)
                .map(|i| {
                    echo_chunk(
                        vec![CompletionChoice {
                            index: i,
                            text: echo[i / n].clone(),
                            logprobs: None,
                            finish_reason: None,
                            prompt_token_ids: None,
                            token_ids: None,
                        }],
                        None,
                    )
                })
                .collect()
        };
        let stream = sse_stream(
            gen,
            include_usage,
            opening,
            move |u: ChoiceUpdate| {
                let logprobs = with_logprobs.then(|| {
                    let offset = &mut offsets[u.index];
                    logprobs::completion(tok.as_deref(), &u.token_ids, &u.logprobs, offset)
                });
                chunk(
                    vec![CompletionChoice {
                        index: u.index,
                        text: u.text,
                        logprobs,
                        finish_reason: u.finish,
                        prompt_token_ids: None,
                        token_ids: return_ids.then_some(u.token_ids),
                    }],
                    None,
                )
            },
            move |usage| serde_json::to_string(&usage_chunk(vec![], Some(usage))).unwrap_or_default(),
        );
        return Ok(Sse::new(stream).into_response());
    }
    let (mut texts, reasons) = collect_choices(&mut gen).await?;
    let choices = (0..texts.len())
        .map(|i| CompletionChoice {
            index: i,
            text: match echo.get(i / n) {
                Some(prompt) => format!("{prompt}{}", texts[i]),
                None => std::mem::take(&mut texts[i]),
            },
            logprobs: with_logprobs.then(|| match params.prompt_logprobs.and(prompt_ids.get(i / n)) {
                Some(p) => logprobs::completion_echo(
                    tok.as_deref(),
                    p,
                    gen.prompt_logprobs(i),
                    &gen.token_ids(i),
                    gen.logprobs(i),
                ),
                None => logprobs::completion(tok.as_deref(), &gen.token_ids(i), gen.logprobs(i), &mut 0),
            }),
            finish_reason: reasons[i],
            prompt_token_ids: params
                .return_token_ids
                .then(|| prompt_ids.get(i / n).cloned())
                .flatten(),
            token_ids: params.return_token_ids.then(|| gen.token_ids(i)),
        })
        .collect();
    Ok(Json(CompletionResponse {
        id,
        object: "text_completion",
        created,
        model,
        choices,
        usage: Some(gen.usage()),
    })
    .into_response())
}

/// Server-sent events of a generation: optional opening chunks, one chunk per update, an error
/// event for a failed choice, the usage chunk when asked, then `[DONE]`.
/// Drains a non-streaming generation: each choice's full text and finish reason. Fails only
/// when every choice failed.
async fn collect_choices(gen: &mut Generation) -> Result<(Vec<String>, Vec<Option<FinishReason>>), ApiError> {
    let k = gen.num_choices();
    let mut texts = vec![String::new(); k];
    let mut reasons = vec![None; k];
    let mut last_error = None;
    while let Some(u) = gen.next().await {
        texts[u.index].push_str(&u.text);
        if u.finish.is_some() {
            reasons[u.index] = u.finish;
        }
        if let Some(e) = u.error {
            last_error = Some(e);
        }
    }
    match last_error.filter(|_| reasons.iter().all(|r| *r == Some(FinishReason::Error))) {
        Some(e) => Err(ApiError::internal(e)),
        None => Ok((texts, reasons)),
    }
}

fn sse_stream<C, O, F, U>(
    gen: Generation,
    include_usage: bool,
    opening: O,
    chunk: F,
    usage_chunk: U,
) -> impl Stream<Item = Result<Event, Infallible>>
where
    C: serde::Serialize,
    O: FnOnce() -> Vec<C> + Send + 'static,
    F: FnMut(ChoiceUpdate) -> C + Send + 'static,
    U: Fn(Usage) -> String + Send + 'static,
{
    enum Phase {
        Body,
        Usage,
        Done,
        End,
    }
    let first: std::collections::VecDeque<Event> = opening()
        .into_iter()
        .map(|c| Event::default().data(serde_json::to_string(&c).unwrap_or_default()))
        .collect();
    let state = (gen, first, Phase::Body, chunk, usage_chunk);
    futures_util::stream::unfold(
        state,
        move |(mut gen, mut pending, mut phase, mut chunk, usage_chunk)| async move {
            loop {
                if let Some(ev) = pending.pop_front() {
                    return Some((Ok(ev), (gen, pending, phase, chunk, usage_chunk)));
                }
                match phase {
                    Phase::Body => match gen.next().await {
                        Some(mut u) => {
                            if let Some(message) = u.error.take() {
                                let err = ApiError::internal(message);
                                pending.push_back(Event::default().data(err.to_json()));
                            }
                            pending
                                .push_back(Event::default().data(serde_json::to_string(&chunk(u)).unwrap_or_default()));
                        }
                        None => phase = Phase::Usage,
                    },
                    Phase::Usage => {
                        if include_usage {
                            pending.push_back(Event::default().data(usage_chunk(gen.usage())));
                        }
                        phase = Phase::Done;
                    }
                    Phase::Done => {
                        pending.push_back(Event::default().data("[DONE]"));
                        phase = Phase::End;
                    }
                    Phase::End => return None,
                }
            }
        },
    )
}

fn message_to_template(m: ChatMessage) -> Result<Value, ApiError> {
    let content = match m.content {
        None => Value::Null,
        Some(MessageContent::Text(s)) => Value::String(s),
        Some(MessageContent::Parts(parts)) => {
            let mut texts = Vec::new();
            for p in parts {
                match (p.kind.as_str(), p.text) {
                    ("text", Some(t)) => texts.push(t),
                    (kind, _) => {
                        return Err(ApiError::invalid_param(
                            "messages",
                            format!("content part of type `{kind}` is not supported (text only)"),
                        ))
                    }
                }
            }
            Value::String(texts.join("\n"))
        }
    };
    let mut obj = m.extra;
    obj.insert("role".into(), Value::String(m.role));
    obj.insert("content".into(), content);
    Ok(Value::Object(obj))
}

async fn chat_completions(State(st): State<Arc<AppState>>, ApiJson(req): ApiJson<ChatRequest>) -> Response {
    match chat_inner(st, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat_inner(st: Arc<AppState>, req: ChatRequest) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    st.check_model(req.gen.model.as_deref())?;
    let mut params = GenParams::validate(&req.gen, req.max_completion_tokens, &st.limits)?;
    params.logprobs = chat_logprobs(req.gen.logprobs.as_ref(), req.top_logprobs.as_ref())?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid_param("messages", "messages must not be empty"));
    }
    let tok = st.tokenizer("/v1/chat/completions")?.clone();
    let messages = req
        .messages
        .into_iter()
        .map(message_to_template)
        .collect::<Result<Vec<_>, _>>()?;
    let text = tok
        .template()
        .render(
            &messages,
            req.tools.as_ref(),
            req.add_generation_prompt.unwrap_or(true),
            req.chat_template_kwargs.as_ref(),
        )
        .map_err(|e| ApiError::invalid_param("messages", e.to_string()))?;
    // The template already holds any BOS token.
    let prompt = st.encode(&text, false)?;
    let mt = check_prompt(&prompt, params.max_tokens, &st.limits, "messages")?;
    let prompt_ids = params.return_token_ids.then(|| prompt.clone());
    let mut gen = st.submit(vec![(prompt, mt)], &params, arrival)?;
    let id = request_id("chatcmpl");
    let (model, created) = (st.model_name.clone(), unix_now());
    let with_logprobs = params.logprobs.is_some();
    let tok = st.tokenizer.clone();
    if params.stream {
        let return_ids = params.return_token_ids;
        let k = gen.num_choices();
        let chunk = move |choices: Vec<ChatChunkChoice>, usage: Option<Usage>| ChatChunk {
            id: id.clone(),
            object: "chat.completion.chunk",
            created,
            model: model.clone(),
            choices,
            usage,
        };
        let opening_chunk = chunk.clone();
        let usage_chunk = chunk.clone();
        let opening = move || {
            (0..k)
                .map(|index| {
                    opening_chunk(
                        vec![ChatChunkChoice {
                            index,
                            delta: Delta {
                                role: Some("assistant"),
                                content: Some(String::new()),
                            },
                            logprobs: None,
                            finish_reason: None,
                            token_ids: None,
                        }],
                        None,
                    )
                })
                .collect()
        };
        let stream = sse_stream(
            gen,
            params.include_usage,
            opening,
            move |u: ChoiceUpdate| {
                chunk(
                    vec![ChatChunkChoice {
                        index: u.index,
                        delta: Delta {
                            role: None,
                            content: (!u.text.is_empty() || u.finish.is_none()).then_some(u.text),
                        },
                        logprobs: with_logprobs.then(|| logprobs::chat(tok.as_deref(), &u.token_ids, &u.logprobs)),
                        finish_reason: u.finish,
                        token_ids: return_ids.then_some(u.token_ids),
                    }],
                    None,
                )
            },
            move |usage| serde_json::to_string(&usage_chunk(vec![], Some(usage))).unwrap_or_default(),
        );
        return Ok(Sse::new(stream).into_response());
    }
    let (mut texts, reasons) = collect_choices(&mut gen).await?;
    let choices = (0..texts.len())
        .map(|i| ChatChoice {
            index: i,
            message: AssistantMessage {
                role: "assistant",
                content: std::mem::take(&mut texts[i]),
            },
            logprobs: with_logprobs.then(|| logprobs::chat(tok.as_deref(), &gen.token_ids(i), gen.logprobs(i))),
            finish_reason: reasons[i],
            token_ids: params.return_token_ids.then(|| gen.token_ids(i)),
        })
        .collect();
    Ok(Json(ChatResponse {
        id,
        object: "chat.completion",
        created,
        model,
        choices,
        usage: gen.usage(),
        prompt_token_ids: prompt_ids,
    })
    .into_response())
}
