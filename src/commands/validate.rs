//! `moeless sim-validate`: the cluster simulator against the real engine (issue 4, item 7).
//!
//! One small workload runs twice, and the simulator's error is reported per metric:
//! 1. **Real**: the OpenAI endpoint of `moeless serve` (continuous batching, paged KV cache) in
//!    this process, every routed expert on N `moeless worker` processes over QUIC with mutual
//!    TLS (static placement), requests sent over HTTP at the arrival times of a real trace with
//!    the trace's lengths scaled down for a CPU.
//! 2. **Simulated**: `simulator::simulate` with static placement, attention on one engine
//!    device in front of N expert devices (`SimConfig::central_attention`), the same requests,
//!    and a device profile measured here first (`simulator::gpu::MeasuredOps`): the expert FFN
//!    by token count, a layer's non-expert time, the endpoint's own time per step and per
//!    request, the QUIC round trip to a worker, and the worker's time per expert task beyond
//!    the FFN (the roofline fitted to the FFN points is kept in the profile for other shapes).
//!
//! Both sides route from the same trace ([`PoolRouting`]): the engine's routing is forced, per
//! sequence of a batch, from a trace query chosen by a seeded hash, taking its prefill tokens
//! for prompt chunks and its decode tokens for decode steps, as the simulator does per request.

use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use data_plane::backend::{Backend, CpuBackend};
use data_plane::checkpoint::Checkpoint;
use data_plane::config::ModelConfig;
use data_plane::engine::{read_config, Engine};
use data_plane::expert::{ExpertError, ExpertFunction, ExpertTask, ExpertWeights, ShareSource};
use data_plane::model::{Model, RoutingOverride, RowSpan};
use data_plane::tensor::Tensor;
use data_plane::testing::{ModelShape as CkptShape, SaveDtype};
use endpoint::bench::{BenchConfig, BenchRequest};
use serde_json::json;
use shared::replay::PolicyKind;
use shared::ExpertKey;
use simulator::cost::CostModel;
use simulator::gpu::MeasuredOps;
use simulator::report::Percentiles;
use simulator::routing::{splitmix64, RoutingPool};
use simulator::{arrivals, svg, GpuProfile, ModelShape, SimConfig};

use super::bench::{ensure_checkpoint, median};
use super::bench_dp::{init_logs, shared_dir};
use super::cluster::{LocalCluster, PlanKind};
use worker::remote::RemoteExperts;

#[derive(Args, Debug)]
pub struct SimValidateArgs {
    /// Worker processes holding the routed experts (static placement).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Compute threads of the engine and of each worker (the simulated devices are alike).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Arrivals (Azure LLM 2023 CSV or Mooncake JSONL). Default: the Azure conversation trace
    /// under $MOELESS_SHARED_DIR (or ../shared).
    #[arg(long)]
    pub arrivals: Option<PathBuf>,
    /// Seconds of arrivals replayed.
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Arrival rate multiplier (gaps divided by it).
    #[arg(long, default_value_t = 1.0)]
    pub rate_scale: f64,
    /// Prompt and output lengths of the trace are multiplied by this (at least 1 token).
    #[arg(long, default_value_t = 0.05)]
    pub length_scale: f64,
    /// Routing trace (per-token CSV or per-layer fractions). Default: the Llama-4-Maverick
    /// MMLU per-token trace; the model takes its first `--layers` MoE layers.
    #[arg(long)]
    pub routing_trace: Option<PathBuf>,
    #[arg(long, default_value_t = 512)]
    pub hidden: usize,
    /// Expert FFN (intermediate) size.
    #[arg(long, default_value_t = 512)]
    pub ffn: usize,
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    /// Experts per layer (the routing trace's: 128 for Llama-4).
    #[arg(long, default_value_t = 128)]
    pub experts: usize,
    #[arg(long, default_value_t = 1)]
    pub top_k: usize,
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    #[arg(long, default_value_t = 2)]
    pub kv_heads: usize,
    /// Engine limits, the same on both sides (vLLM's names).
    #[arg(long, default_value_t = 32)]
    pub max_num_seqs: usize,
    #[arg(long, default_value_t = 512)]
    pub max_num_batched_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where generated checkpoints are kept (reused when the shape matches).
    #[arg(long, default_value = "target/bench-models")]
    pub model_dir: PathBuf,
    /// Output directory: validation.json, profile.json, CDF plots.
    #[arg(long)]
    pub out: PathBuf,
}

/// The engine's routing forced from the simulator's pool (see the module comment). Pass `p`
/// (counted at the first MoE layer) gives its `s`-th sequence query `query_of(p << 20 | s)`.
#[derive(Debug)]
struct PoolRouting {
    pool: Arc<RoutingPool>,
    /// Decoder layer -> MoE layer index.
    moe_index: Vec<Option<usize>>,
    seed: u64,
    pass: AtomicU64,
}

impl RoutingOverride for PoolRouting {
    fn route(&self, layer: usize, spans: &[RowSpan], k: usize) -> Option<Vec<u32>> {
        let m = (*self.moe_index.get(layer)?)?;
        if k != self.pool.top_k {
            return None;
        }
        let pass = if m == 0 {
            self.pass.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.pass.load(Ordering::Relaxed)
        };
        let mut ids = Vec::with_capacity(spans.iter().map(|s| s.1).sum::<usize>() * k);
        for (i, &(_, rows, pos)) in spans.iter().enumerate() {
            let q = self.pool.query_of((pass << 20) | i as u64, self.seed);
            // One new row past the prompt is a decode step; anything else a prompt chunk.
            let prefill = !(rows == 1 && pos > 0);
            for r in 0..rows {
                let tok = self.pool.token(q, prefill, pos + r);
                ids.extend(self.pool.experts(tok, m));
            }
        }
        Some(ids)
    }
}

/// Times every MoE layer's expert call (dispatch, remote execution, combine) and records what
/// it carried, so each real call can also be priced by the simulator's cost model.
struct TimedExperts {
    inner: Arc<dyn ExpertFunction>,
    /// The worker of each expert instance (static placement: one per expert).
    worker_of: std::collections::HashMap<ExpertKey, u32>,
    workers: usize,
    calls: Mutex<Vec<CallRecord>>,
}

/// One real MoE-layer call: its time and, per worker, the distinct tokens sent to it (a token
/// travels once per worker) and the rows of each of its expert tasks; its layer and tasks
/// `(instance, token ids, rows)` to replay its shape on an idle cluster.
#[derive(Debug, Clone)]
struct CallRecord {
    seconds: f64,
    tokens_per_worker: Vec<u32>,
    task_rows_per_worker: Vec<Vec<u32>>,
    layer: usize,
    tasks: Vec<(shared::InstanceId, Vec<u32>, usize)>,
}

impl TimedExperts {
    /// What a call carries (its time still 0).
    fn describe(&self, layer: usize, tasks: &[ExpertTask]) -> CallRecord {
        let mut ids: Vec<std::collections::HashSet<u32>> = vec![Default::default(); self.workers];
        // Rows without token ids travel each on their own.
        let mut anonymous = vec![0u32; self.workers];
        let mut rows = vec![Vec::new(); self.workers];
        for t in tasks {
            let w = (self.worker_of.get(&t.instance.key).copied().unwrap_or(0) as usize).min(self.workers - 1);
            let n = t.input.rows() as u32;
            rows[w].push(n);
            if t.tokens.is_empty() {
                anonymous[w] += n;
            } else {
                ids[w].extend(t.tokens.iter().copied());
            }
        }
        CallRecord {
            seconds: 0.0,
            tokens_per_worker: ids.iter().zip(&anonymous).map(|(s, &a)| s.len() as u32 + a).collect(),
            task_rows_per_worker: rows,
            layer,
            tasks: tasks
                .iter()
                .map(|t| (t.instance, t.tokens.clone(), t.input.rows()))
                .collect(),
        }
    }

    fn push(&self, mut call: CallRecord, seconds: f64) {
        call.seconds = seconds;
        if let Ok(mut v) = self.calls.lock() {
            v.push(call);
        }
    }
}

impl ExpertFunction for TimedExperts {
    fn execute(&self, layer: usize, tasks: Vec<ExpertTask>) -> Result<Vec<Tensor>, ExpertError> {
        let call = self.describe(layer, &tasks);
        let t = Instant::now();
        let out = self.inner.execute(layer, tasks);
        self.push(call, t.elapsed().as_secs_f64());
        out
    }

    fn execute_into(&self, layer: usize, tasks: Vec<ExpertTask>, out: &mut Tensor) -> Result<(), ExpertError> {
        let call = self.describe(layer, &tasks);
        let t = Instant::now();
        let r = self.inner.execute_into(layer, tasks, out);
        self.push(call, t.elapsed().as_secs_f64());
        r
    }
}

/// Replays a window of up to `max` consecutive real calls (from the middle of the run) on the
/// now idle cluster, in their order, each once, with inputs of the same shapes and token ids,
/// first back to back, then each after [`LAYER_GAP`] of busy work on this thread (as the
/// engine computes attention between MoE layers): returns `(index, back to back s, after
/// work s)`.
fn replay_calls(
    remote: &RemoteExperts,
    hidden: usize,
    calls: &[CallRecord],
    max: usize,
) -> anyhow::Result<Vec<(usize, f64, f64)>> {
    let start = calls.len().saturating_sub(max) / 2;
    let window = start..(start + max).min(calls.len());
    let tasks = |i: usize| -> Vec<ExpertTask> {
        calls[i]
            .tasks
            .iter()
            .map(|(inst, tokens, n)| ExpertTask {
                instance: *inst,
                input: rows(*n, hidden, i as u64),
                tokens: tokens.clone(),
                weights: vec![1.0; if tokens.is_empty() { 0 } else { *n }],
            })
            .collect()
    };
    let replay = |i: usize, gap: Duration| -> anyhow::Result<f64> {
        busy_work(gap);
        let ts = tasks(i);
        let t0 = Instant::now();
        std::hint::black_box(remote.execute(calls[i].layer, ts)?);
        Ok(t0.elapsed().as_secs_f64())
    };
    let back_to_back = window
        .clone()
        .map(|i| replay(i, Duration::ZERO))
        .collect::<anyhow::Result<Vec<_>>>()?;
    window
        .zip(back_to_back)
        .map(|(i, t)| Ok((i, t, replay(i, LAYER_GAP)?)))
        .collect()
}

/// The simulator's price of one real call (the MoE-layer formula of `simulator::engine` with
/// central attention): dispatch and combine of every token copy the engine sends, what each
/// further worker reached adds, plus the busiest worker's expert tasks run one after another.
fn priced_call(cost: &CostModel, c: &CallRecord) -> f64 {
    let sent: u32 = c.tokens_per_worker.iter().sum();
    let reached = c.tokens_per_worker.iter().filter(|&&n| n > 0).count();
    let comm = 2.0 * cost.all_to_all_time(f64::from(sent)) + cost.fanout_time(reached);
    let experts = c
        .task_rows_per_worker
        .iter()
        .map(|rows| rows.iter().map(|&n| cost.expert_time(n as usize)).sum::<f64>())
        .fold(0.0, f64::max);
    comm + experts
}

/// Median seconds of `f` over `reps` calls after two warm-ups.
fn time_median(reps: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    for _ in 0..2 {
        f()?;
    }
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64());
    }
    Ok(median(v))
}

fn rows(n: usize, hidden: usize, seed: u64) -> Tensor {
    let data = (0..n * hidden)
        .map(|i| ((splitmix64(seed ^ i as u64) % 2000) as f32 / 1000.0 - 1.0) * 0.1)
        .collect();
    Tensor::new(vec![n, hidden], data).unwrap_or_else(|_| unreachable!("n x hidden values"))
}

/// Token counts the expert FFN is timed at.
const FFN_TOKENS: [usize; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];

/// Fit peak FLOP/s, bandwidth and per-kernel overhead of `base` (efficiencies 1) so that the
/// simulator's own `CostModel::expert_time` matches the measured `(tokens, seconds)`, by least
/// squares on log time: a coarse log grid, then a finer one around its best point.
fn fit_roofline(base: &GpuProfile, model: &ModelShape, measured: &[(usize, f64)]) -> (GpuProfile, f64) {
    let mut cost = CostModel::new(base.clone(), model.clone(), 1);
    let mut err = |f: f64, b: f64, o: f64| {
        cost.gpu.peak_flops = f;
        cost.gpu.hbm_bandwidth = b;
        cost.gpu.kernel_overhead_s = o;
        measured
            .iter()
            .map(|&(n, t)| (cost.expert_time(n) / t).ln().powi(2))
            .sum::<f64>()
    };
    let mut best = (f64::INFINITY, 1e10, 1e10, 0.0);
    let grid = |lo: f64, hi: f64, steps: usize| -> Vec<f64> {
        (0..=steps)
            .map(|i| lo * (hi / lo).powf(i as f64 / steps as f64))
            .collect()
    };
    let overheads: Vec<f64> = std::iter::once(0.0).chain(grid(1e-7, 1e-3, 40)).collect();
    for &f in &grid(1e8, 1e13, 100) {
        for &b in &grid(1e8, 1e12, 80) {
            for &o in &overheads {
                let e = err(f, b, o);
                if e < best.0 {
                    best = (e, f, b, o);
                }
            }
        }
    }
    let (_, f0, b0, o0) = best;
    let near = |x: f64, step: f64| grid(x / step, x * step, 40);
    for &f in &near(f0, 1.13) {
        for &b in &near(b0, 1.13) {
            for &o in &near(o0.max(1e-8), 1.3) {
                let e = err(f, b, o);
                if e < best.0 {
                    best = (e, f, b, o);
                }
            }
        }
    }
    let mut p = base.clone();
    p.peak_flops = best.1;
    p.hbm_bandwidth = best.2;
    p.kernel_overhead_s = best.3;
    let rms = (best.0 / measured.len().max(1) as f64).sqrt();
    (p, rms)
}

/// Returns zeros for every task at no cost: the engine's forward pass without expert work.
struct ZeroExperts {
    hidden: usize,
    calls: AtomicU64,
}

impl ExpertFunction for ZeroExperts {
    fn execute(&self, _layer: usize, tasks: Vec<ExpertTask>) -> Result<Vec<Tensor>, ExpertError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        Ok(tasks
            .iter()
            .map(|t| Tensor::zeros(vec![t.input.rows(), self.hidden]))
            .collect())
    }
}

/// A decoder layer's non-expert time as `fixed + per_token x tokens + per_context x decode
/// context + per_prefill_product x chunk x (past + chunk / 2)`, fitted to timed forward passes.
struct LayerFit {
    coef: [f64; 4],
    rms: f64,
    /// `(tokens, decode context, prefill products, seconds per layer)` measured.
    points: Vec<(usize, usize, f64, f64)>,
}

/// The real engine on `model` with experts that cost nothing (and count their calls).
fn free_expert_engine(model: Arc<Model>) -> (Engine, Arc<ZeroExperts>) {
    let zero = Arc::new(ZeroExperts {
        hidden: model.config.hidden_size,
        calls: AtomicU64::new(0),
    });
    let engine = Engine::new(model, zero.clone(), Arc::new(data_plane::expert::SingleInstance));
    (engine, zero)
}

/// Requests for the endpoint at `base_url` (the server's only model, no key, no SLOs).
fn bench_config(base_url: &str, requests: Vec<BenchRequest>) -> BenchConfig {
    BenchConfig {
        base_url: base_url.to_string(),
        model: None,
        api_key: None,
        requests,
        slo_ttft_ms: None,
        slo_tpot_ms: None,
    }
}

fn measure_layers(model: Arc<Model>) -> anyhow::Result<LayerFit> {
    let layers = model.config.num_layers as f64;
    let (engine, _) = free_expert_engine(model);
    let tok = |i: usize| (97 + (i * 7) % 26) as u32;
    let mut points = Vec::new();
    // Prefill: one prompt of n tokens on an empty cache.
    for n in [4usize, 16, 64, 256] {
        let prompt: Vec<u32> = (0..n).map(tok).collect();
        let t = time_median(11, || {
            let mut caches = vec![engine.new_cache()];
            engine.step(&mut caches, &[&prompt], data_plane::model::LogitsWanted::Last)?;
            Ok(())
        })?;
        points.push((n, 0, n as f64 * n as f64 / 2.0, t / layers));
    }
    // Decode: b sequences with `ctx` tokens cached each, one new token each.
    for (b, ctx) in [(1usize, 32usize), (8, 32), (32, 32), (8, 256), (32, 256)] {
        let prompt: Vec<u32> = (0..ctx).map(tok).collect();
        let mut caches: Vec<_> = (0..b).map(|_| engine.new_cache()).collect();
        let prompts: Vec<&[u32]> = (0..b).map(|_| prompt.as_slice()).collect();
        engine.step(&mut caches, &prompts, data_plane::model::LogitsWanted::Last)?;
        let one = [tok(ctx)];
        let next: Vec<&[u32]> = (0..b).map(|_| &one[..]).collect();
        let t = time_median(11, || {
            engine.step(&mut caches, &next, data_plane::model::LogitsWanted::Last)?;
            Ok(())
        })?;
        // The cache grows by one per call (13 calls): the middle context.
        points.push((b, b * (ctx + 7), 0.0, t / layers));
    }
    // Least squares on relative error (each row divided by its time), coefficients >= 0.
    let rows: Vec<([f64; 4], f64)> = points
        .iter()
        .map(|&(n, c, p, t)| ([1.0 / t, n as f64 / t, c as f64 / t, p / t], 1.0))
        .collect();
    let coef = nonneg_least_squares(&rows);
    let rel = |&(n, c, p, t): &(usize, usize, f64, f64)| {
        (coef[0] + coef[1] * n as f64 + coef[2] * c as f64 + coef[3] * p) / t - 1.0
    };
    let rms = (points.iter().map(|x| rel(x).powi(2)).sum::<f64>() / points.len() as f64).sqrt();
    Ok(LayerFit { coef, rms, points })
}

/// Closed bursts through the endpoint: `(sequences, forward passes, wall seconds, forward
/// seconds timed, forward seconds predicted by the layer fit, mean TTFT)` per burst.
type Burst = (usize, u64, f64, f64, f64, f64);

/// What the bursts give: the endpoint's time per step (`fixed + per_sequence x b`) and per
/// request (outside steps).
struct Overheads {
    step_fixed: f64,
    step_per_sequence: f64,
    request: f64,
    bursts: Vec<Burst>,
}

/// The endpoint's own time per step outside the forward pass (scheduling, sampling, streaming):
/// closed bursts of `b` requests (all sent at once; `P` prompt and `O` new tokens each) through
/// the endpoint with experts that cost nothing; the wall time minus the forward passes (timed
/// by the scheduler), per pass; `b` = 1, 4 and 16 give `fixed + per_sequence x b`. A lone
/// request's TTFT minus its first step (prefill pass and step overhead) is the time per request.
fn measure_overheads(
    runtime: &tokio::runtime::Runtime,
    model: Arc<Model>,
    fit: &LayerFit,
    serve: &endpoint::server::ServeConfig,
) -> anyhow::Result<Overheads> {
    const P: usize = 16;
    const O: usize = 24;
    let moe = model.config.moe_layers().len().max(1) as u64;
    let layers = model.config.num_layers as f64;
    let (engine, zero) = free_expert_engine(model);
    let [f0, f_tok, f_ctx, f_prod] = fit.coef;
    let prefill = |b: f64| f0 + f_tok * b * P as f64 + f_prod * b * (P * P) as f64 / 2.0;
    let predicted = |b: usize, passes: u64| {
        let b = b as f64;
        let prefill = prefill(b);
        let decode: f64 = (1..O).map(|j| f0 + f_tok * b + f_ctx * b * (P + j) as f64).sum();
        // Passes beyond the nominal O (requests that arrived a step apart) add fixed costs.
        layers * (prefill + decode + passes.saturating_sub(O as u64) as f64 * f0)
    };
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let server = endpoint::server::Server::start(
            engine,
            Some(endpoint::tokenizer::TextTokenizer::bytes()),
            serve.clone(),
            listener,
        )
        .await?;
        let base_url = format!("http://{}", server.local_addr());
        let mut bursts = Vec::new();
        // A warm-up pair, then each size five times, interleaved.
        let sizes: Vec<usize> = [1usize, 16]
            .into_iter()
            .chain((0..5).flat_map(|_| [1usize, 4, 16]))
            .collect();
        for b in sizes {
            let requests = (0..b)
                .map(|i| BenchRequest {
                    prompt: (0..P).map(|j| (b'a' + ((i * 7 + j * 3) % 26) as u8) as char).collect(),
                    max_tokens: O,
                    at: Duration::ZERO,
                })
                .collect();
            let cfg = bench_config(&base_url, requests);
            let before = zero.calls.load(Ordering::Relaxed);
            let forward_before = server.stats().forward_nanos.load(Ordering::Relaxed);
            let (r, outcomes) = endpoint::bench::run_detailed(&cfg).await?;
            anyhow::ensure!(r.failed == 0, "calibration burst failed: {:?}", r.errors);
            let passes = (zero.calls.load(Ordering::Relaxed) - before) / moe;
            let forward = (server.stats().forward_nanos.load(Ordering::Relaxed) - forward_before) as f64 * 1e-9;
            let ttft = outcomes.iter().map(|o| o.ttft).sum::<f64>() / outcomes.len().max(1) as f64;
            bursts.push((b, passes, r.duration_s, forward, predicted(b, passes), ttft));
        }
        server.shutdown().await?;
        // Past the warm-up pair: the median time per pass outside the forward passes of each
        // size, less a request's own time once per burst, then `fixed + per_sequence x b`
        // through them (least squares, both >= 0). The request's time is a lone request's
        // TTFT minus its first step, which needs the step's overhead: two rounds (the first
        // without the request's time).
        let fit = |request: f64| {
            let rows: Vec<([f64; 4], f64)> = [1usize, 4, 16]
                .into_iter()
                .map(|b| {
                    let per_pass = median(
                        bursts[2..]
                            .iter()
                            .filter(|x| x.0 == b)
                            .map(|x| (x.2 - x.3 - request) / x.1.max(1) as f64)
                            .collect(),
                    );
                    ([1.0, b as f64, 0.0, 0.0], per_pass)
                })
                .collect();
            nonneg_least_squares(&rows)
        };
        let request_given = |c: [f64; 4]| {
            let first_step = layers * prefill(1.0) + c[0] + c[1];
            median(
                bursts[2..]
                    .iter()
                    .filter(|x| x.0 == 1)
                    .map(|x| x.5 - first_step)
                    .collect(),
            )
            .max(0.0)
        };
        let request = request_given(fit(0.0));
        let c = fit(request);
        anyhow::Ok(Overheads {
            step_fixed: c[0],
            step_per_sequence: c[1],
            request,
            bursts,
        })
    })
}

/// Least squares `min |A x - y|` over `x >= 0` for four unknowns: every subset of free
/// coefficients solved by normal equations, the best feasible solution kept.
fn nonneg_least_squares(rows: &[([f64; 4], f64)]) -> [f64; 4] {
    let mut best = ([0.0; 4], f64::INFINITY);
    for mask in 1u32..16 {
        let free: Vec<usize> = (0..4).filter(|i| mask & (1 << i) != 0).collect();
        let k = free.len();
        // Normal equations on the free columns.
        let mut m = vec![vec![0.0f64; k + 1]; k];
        for (a, y) in rows {
            for (r, &i) in free.iter().enumerate() {
                for (c, &j) in free.iter().enumerate() {
                    m[r][c] += a[i] * a[j];
                }
                m[r][k] += a[i] * y;
            }
        }
        let Some(sol) = solve(m) else { continue };
        if sol.iter().any(|&v| v < 0.0 || !v.is_finite()) {
            continue;
        }
        let mut x = [0.0; 4];
        for (&i, v) in free.iter().zip(sol) {
            x[i] = v;
        }
        let err: f64 = rows
            .iter()
            .map(|(a, y)| (a.iter().zip(&x).map(|(p, q)| p * q).sum::<f64>() - y).powi(2))
            .sum();
        if err < best.1 {
            best = (x, err);
        }
    }
    best.0
}

/// Gaussian elimination with partial pivoting on an augmented `k x (k + 1)` matrix.
fn solve(mut m: Vec<Vec<f64>>) -> Option<Vec<f64>> {
    let k = m.len();
    for c in 0..k {
        let p = (c..k).max_by(|&a, &b| m[a][c].abs().total_cmp(&m[b][c].abs()))?;
        if m[p][c].abs() < 1e-300 {
            return None;
        }
        m.swap(c, p);
        let pivot = m[c].clone();
        for (r, row) in m.iter_mut().enumerate() {
            if r != c {
                let f = row[c] / pivot[c];
                for (x, &y) in row[c..].iter_mut().zip(&pivot[c..]) {
                    *x -= f * y;
                }
            }
        }
    }
    Some((0..k).map(|r| m[r][k] / m[r][r]).collect())
}

/// Busy work on this thread for `d` (not sleep: the engine computes between MoE layers).
fn busy_work(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

/// What the engine computes between two MoE layers of a small step here (a layer's attention,
/// norms and router: about 0.4 ms on this model), during which the workers wait.
const LAYER_GAP: Duration = Duration::from_micros(400);

/// The QUIC round trip to a worker: one expert call of 1, 16, 64 and 256 tokens, remote and in
/// process (on a pool thread) [`alternated`]; the median extra time per size is fitted to
/// `2 x latency + 2 x bytes / bandwidth` by least squares. Each
/// remote call follows [`LAYER_GAP`] of busy work, as in a real step: the workers' threads
/// have gone idle and must wake (replayed real calls took -6% to +21% longer so, median +7%).
/// Returns `(latency s, bandwidth B/s, [(tokens, remote s, in process s)])`.
#[allow(clippy::type_complexity)]
fn measure_link(
    remote: &RemoteExperts,
    key: ExpertKey,
    weights: &ExpertWeights,
    backend: &dyn Backend,
    hidden: usize,
    pool: &rayon::ThreadPool,
) -> anyhow::Result<(f64, f64, Vec<(usize, f64, f64)>)> {
    let inst = remote.shares(key)[0].0;
    let mut link = Vec::new();
    let mut extra = Vec::new();
    for n in [1usize, 16, 64, 256] {
        let x = rows(n, hidden, 7 + n as u64);
        let once_remote = || -> anyhow::Result<f64> {
            busy_work(LAYER_GAP);
            let task = ExpertTask {
                instance: inst,
                input: x.clone(),
                tokens: Vec::new(),
                weights: Vec::new(),
            };
            let t = Instant::now();
            std::hint::black_box(remote.execute(key.layer as usize, vec![task])?);
            Ok(t.elapsed().as_secs_f64())
        };
        let once_local = || {
            Ok(pool.install(|| {
                let t = Instant::now();
                std::hint::black_box(weights.forward(backend, &x));
                t.elapsed().as_secs_f64()
            }))
        };
        let pairs = alternated(once_remote, once_local)?;
        let med = |f: &dyn Fn(&(f64, f64)) -> f64| median(pairs.iter().map(f).collect());
        link.push((n, med(&|p| p.0), med(&|p| p.1)));
        extra.push((n as f64, med(&|p| p.0 - p.1)));
    }
    // Least squares line through (tokens, extra seconds).
    let k = extra.len() as f64;
    let (mx, my) = (
        extra.iter().map(|p| p.0).sum::<f64>() / k,
        extra.iter().map(|p| p.1).sum::<f64>() / k,
    );
    let sxx: f64 = extra.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = extra.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let slope = (sxy / sxx).max(1e-12);
    let intercept = (my - slope * mx).max(2e-6);
    let bw = 2.0 * (hidden * 4) as f64 / slope;
    Ok((intercept / 2.0, bw, link))
}

/// Serves `requests` at their times through the endpoint on `engine` (after an uncounted
/// warm-up, which also clears `timed`): the summary and every request's outcome.
fn serve_workload(
    runtime: &tokio::runtime::Runtime,
    engine: Engine,
    serve_cfg: endpoint::server::ServeConfig,
    requests: Vec<BenchRequest>,
    timed: &TimedExperts,
) -> anyhow::Result<(endpoint::bench::BenchReport, Vec<endpoint::bench::Outcome>)> {
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let server = endpoint::server::Server::start(
            engine,
            Some(endpoint::tokenizer::TextTokenizer::bytes()),
            serve_cfg,
            listener,
        )
        .await?;
        let base_url = format!("http://{}", server.local_addr());
        // Warm-up (first steps, HTTP connections), not counted.
        let warm = (0..4)
            .map(|i| BenchRequest {
                prompt: "warm up".repeat(4),
                max_tokens: 4,
                at: Duration::from_millis(50 * i),
            })
            .collect();
        endpoint::bench::run(&bench_config(&base_url, warm)).await?;
        if let Ok(mut t) = timed.calls.lock() {
            t.clear();
        }
        let cfg = bench_config(&base_url, requests);
        let progress_total = cfg.requests.len();
        let ticker = tokio::spawn(async move {
            let t0 = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                eprintln!(
                    "  real run: {:.0} s elapsed ({progress_total} requests scheduled)",
                    t0.elapsed().as_secs_f64()
                );
            }
        });
        let out = endpoint::bench::run_detailed(&cfg).await;
        ticker.abort();
        server.shutdown().await?;
        anyhow::Ok(out?)
    })
}

/// What [`calibrate`] needs: the model, a layer's experts, the endpoint settings and
/// the running cluster.
struct CalibrationContext<'a> {
    /// The model without routing override (its non-expert layers are timed).
    model: Arc<Model>,
    backend: Arc<dyn Backend>,
    /// Every expert of the first MoE layer (the FFN is timed on each in turn).
    experts: &'a [ExpertWeights],
    runtime: &'a tokio::runtime::Runtime,
    serve_cfg: &'a endpoint::server::ServeConfig,
    remote: &'a RemoteExperts,
    /// The expert the link is timed with.
    key: ExpertKey,
    /// Experts of the key's layer on the key's worker (the key first): one message carrying a
    /// task for each times the worker's per-task work.
    same_worker: Vec<u32>,
    /// One expert of the key's layer on each worker (the key first): a call reaching every
    /// worker times what each further worker adds to a call.
    one_per_worker: Vec<u32>,
}

/// Calibration passes before the real run, and again after it.
const CALIBRATIONS_EACH_SIDE: usize = 2;

/// One pass of measurements on this machine.
struct Calibration {
    /// `(tokens, seconds)` of one expert FFN, each call on another expert of a layer (a step
    /// touches many experts: weights come from memory, not cache).
    ffn: Vec<(usize, f64)>,
    /// A layer's non-expert time coefficients (see [`LayerFit`]) and the fit's rms error.
    layer: [f64; 4],
    layer_rms: f64,
    layer_points: Vec<(usize, usize, f64, f64)>,
    step_fixed: f64,
    step_per_sequence: f64,
    request: f64,
    bursts: Vec<Burst>,
    latency: f64,
    bandwidth: f64,
    link: Vec<(usize, f64, f64)>,
    /// Worker time per expert task beyond its in-process FFN (decoding, scheduling, framing).
    task_overhead: f64,
    /// What each further worker reached adds to a layer's call (one more message each way:
    /// framing, encryption and the wait for the slower of the workers).
    per_extra_worker: f64,
}

impl Calibration {
    /// Point by point and coefficient by coefficient middle of several passes (the mean of
    /// the middle two for an even count): one pass disturbed by this VM's neighbours does not
    /// move it, as it moved a mean.
    fn middle(passes: &[Calibration]) -> Calibration {
        let m = |f: &dyn Fn(&Calibration) -> f64| {
            let mut v: Vec<f64> = passes.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            let k = v.len();
            if k.is_multiple_of(2) {
                (v[k / 2 - 1] + v[k / 2]) / 2.0
            } else {
                v[k / 2]
            }
        };
        let first = &passes[0];
        Calibration {
            ffn: (0..first.ffn.len())
                .map(|i| (first.ffn[i].0, m(&|c| c.ffn[i].1)))
                .collect(),
            layer: std::array::from_fn(|i| m(&|c| c.layer[i])),
            layer_rms: m(&|c| c.layer_rms),
            layer_points: Vec::new(),
            step_fixed: m(&|c| c.step_fixed),
            step_per_sequence: m(&|c| c.step_per_sequence),
            request: m(&|c| c.request),
            bursts: Vec::new(),
            latency: m(&|c| c.latency),
            bandwidth: m(&|c| c.bandwidth),
            link: Vec::new(),
            task_overhead: m(&|c| c.task_overhead),
            per_extra_worker: m(&|c| c.per_extra_worker),
        }
    }

    fn to_json(&self) -> serde_json::Value {
        json!({
            "ffn_s": self.ffn,
            "layer_coefficients": self.layer,
            "layer_fit_rms_relative_error": self.layer_rms,
            "layer_points": self.layer_points,
            "step_fixed_s": self.step_fixed,
            "step_per_sequence_s": self.step_per_sequence,
            "request_overhead_s": self.request,
            "overhead_bursts": self.bursts.iter().map(|(b, p, w, f, pf, t)| json!({"sequences": b, "passes": p,
                "wall_s": w, "forward_s": f, "predicted_forward_s": pf, "mean_ttft_s": t})).collect::<Vec<_>>(),
            "link_latency_s": self.latency,
            "link_bandwidth": self.bandwidth,
            "link_measured_s": self.link.iter().map(|(n, r, l)| json!({"tokens": n, "remote": r, "in_process": l})).collect::<Vec<_>>(),
            "expert_task_overhead_s": self.task_overhead,
            "per_extra_worker_s": self.per_extra_worker,
        })
    }
}

/// The expert FFN, a layer's non-expert time, the endpoint's overheads and the link, once.
fn calibrate(c: &CalibrationContext<'_>) -> anyhow::Result<Calibration> {
    let hidden = c.model.config.hidden_size;
    // On a compute pool's own thread, as a worker runs its tasks (a call from outside a pool
    // would hand every parallel operation over to the pool's thread and back).
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let mut ffn = Vec::new();
    for &n in &FFN_TOKENS {
        let x = rows(n, hidden, n as u64);
        let mut next = 0usize;
        let t = pool.install(|| {
            time_median(41, || {
                next = (next + 1) % c.experts.len();
                std::hint::black_box(c.experts[next].forward(c.backend.as_ref(), &x));
                Ok(())
            })
        })?;
        ffn.push((n, t));
    }
    let layer = measure_layers(c.model.clone())?;
    let over = measure_overheads(c.runtime, c.model.clone(), &layer, c.serve_cfg)?;
    let (latency, bandwidth, link) = measure_link(c.remote, c.key, &c.experts[0], c.backend.as_ref(), hidden, &pool)?;
    let task_overhead = measure_task_overhead(c, bandwidth, &pool)?;
    let per_extra_worker = measure_fanout(c)?;
    Ok(Calibration {
        ffn,
        layer: layer.coef,
        layer_rms: layer.rms,
        layer_points: layer.points,
        step_fixed: over.step_fixed,
        step_per_sequence: over.step_per_sequence,
        request: over.request,
        bursts: over.bursts,
        latency,
        bandwidth,
        link,
        task_overhead,
        per_extra_worker,
    })
}

/// A layer's call with a 1-token task on one expert of every worker against the same on one
/// worker, [`alternated`] (each call after [`LAYER_GAP`] of busy work): the median
/// extra time per further worker (0 with one worker). The workers compute in parallel, so
/// this is what a further message pair costs the engine, beyond what the single-worker link
/// calibration sees.
fn measure_fanout(c: &CalibrationContext<'_>) -> anyhow::Result<f64> {
    let w = c.one_per_worker.len();
    if w < 2 {
        return Ok(0.0);
    }
    let x = rows(1, c.model.config.hidden_size, 13);
    let layer = c.key.layer as usize;
    let call = |n: usize| -> anyhow::Result<f64> {
        let tasks = one_token_tasks(c, &c.one_per_worker[..n], &x, Some(0))?;
        busy_work(LAYER_GAP);
        let t = Instant::now();
        std::hint::black_box(c.remote.execute(layer, tasks)?);
        Ok(t.elapsed().as_secs_f64())
    };
    let pairs = alternated(|| call(1), || call(w))?;
    let d = pairs.iter().map(|(one, all)| all - one).collect();
    Ok((median(d) / (w - 1) as f64).max(0.0))
}

/// A task on one row `x` for each of `experts` (of the key's layer), on its first instance;
/// with `token`, the row is that token of the layer's batch (it travels once per worker).
fn one_token_tasks(
    c: &CalibrationContext<'_>,
    experts: &[u32],
    x: &Tensor,
    token: Option<u32>,
) -> anyhow::Result<Vec<ExpertTask>> {
    experts
        .iter()
        .map(|&e| {
            let key = ExpertKey::new(c.key.layer as usize, e as usize);
            let inst = c.remote.shares(key).first().map(|s| s.0);
            Ok(ExpertTask {
                instance: inst.ok_or_else(|| anyhow::anyhow!("no instance of {key}"))?,
                input: x.clone(),
                tokens: token.into_iter().collect(),
                weights: token.map(|_| 1.0).into_iter().collect(),
            })
        })
        .collect()
}

/// `pairs` of `(a(), b())` timings in alternation, after two uncounted pairs: alternating
/// cancels this VM's drift, which separately timed medians do not.
fn alternated(
    mut a: impl FnMut() -> anyhow::Result<f64>,
    mut b: impl FnMut() -> anyhow::Result<f64>,
) -> anyhow::Result<Vec<(f64, f64)>> {
    for _ in 0..2 {
        a()?;
        b()?;
    }
    (0..ALTERNATED_PAIRS).map(|_| Ok((a()?, b()?))).collect()
}

/// Timed pairs per [`alternated`] measurement.
const ALTERNATED_PAIRS: usize = 31;

/// One message with a 1-token task for each of `c.same_worker`'s experts against one with a
/// single task, both minus the same FFN calls in process: what each extra task costs the
/// worker beyond its FFN and bytes (0 when fewer than two experts share the worker).
fn measure_task_overhead(c: &CalibrationContext<'_>, bandwidth: f64, pool: &rayon::ThreadPool) -> anyhow::Result<f64> {
    let m = c.same_worker.len();
    if m < 2 {
        return Ok(0.0);
    }
    let hidden = c.model.config.hidden_size;
    let x = rows(1, hidden, 11);
    let layer = c.key.layer as usize;
    let remote = |n: usize| {
        time_median(25, || {
            let tasks = one_token_tasks(c, &c.same_worker[..n], &x, None)?;
            std::hint::black_box(c.remote.execute(layer, tasks)?);
            Ok(())
        })
    };
    let local = |n: usize| {
        pool.install(|| {
            time_median(25, || {
                for &e in &c.same_worker[..n] {
                    std::hint::black_box(c.experts[e as usize].forward(c.backend.as_ref(), &x));
                }
                Ok(())
            })
        })
    };
    let extra_one = remote(1)? - local(1)?;
    let extra_all = remote(m)? - local(m)?;
    let bytes = 2.0 * (m - 1) as f64 * (hidden * 4) as f64 / bandwidth.max(1.0);
    Ok(((extra_all - extra_one - bytes) / (m - 1) as f64).max(0.0))
}

fn report_calibration(step: &dyn Fn(&str), when: &str, c: &Calibration) {
    step(&format!(
        "{when}: FFN {:.0} us at 1 token, {:.0} us at 256; layer {:.0} us + {:.1} us/token (rms {:.3}); \
         endpoint {:.0} us + {:.0} us/sequence per step, {:.0} us per request; link {:.0} us, {:.2} GB/s; \
         {:.0} us per remote task, {:.0} us per further worker",
        c.ffn[0].1 * 1e6,
        c.ffn[c.ffn.len() - 1].1 * 1e6,
        c.layer[0] * 1e6,
        c.layer[1] * 1e6,
        c.layer_rms,
        c.step_fixed * 1e6,
        c.step_per_sequence * 1e6,
        c.request * 1e6,
        c.latency * 1e6,
        c.bandwidth / 1e9,
        c.task_overhead * 1e6,
        c.per_extra_worker * 1e6
    ));
}

fn error_pct(sim: f64, real: f64) -> f64 {
    if real == 0.0 {
        f64::NAN
    } else {
        100.0 * (sim - real) / real
    }
}

/// The requests both sides serve and the routing both sides follow.
struct Workload {
    arrivals_path: PathBuf,
    requests: Vec<simulator::arrivals::Request>,
    trace_path: PathBuf,
    pool: Arc<RoutingPool>,
}

/// Arrivals (the first `--duration` seconds, lengths scaled) and the routing trace (its first
/// `--layers` MoE layers), defaults from the reference data.
fn load_workload(a: &SimValidateArgs) -> anyhow::Result<Workload> {
    let arrivals_path = a
        .arrivals
        .clone()
        .unwrap_or_else(|| shared_dir().join("data/arrivals/azure-llm-2023/AzureLLMInferenceTrace_conv.csv"));
    let text = std::fs::read_to_string(&arrivals_path)
        .with_context(|| format!("reading arrivals {}", arrivals_path.display()))?;
    let all = arrivals::parse_auto(&text).with_context(|| format!("reading arrivals {}", arrivals_path.display()))?;
    let scale = |n: usize| ((n as f64 * a.length_scale).round() as usize).max(1);
    let requests: Vec<simulator::arrivals::Request> = arrivals::window(&all, a.duration, a.rate_scale)?
        .into_iter()
        .map(|r| simulator::arrivals::Request {
            arrival_s: r.arrival_s,
            prompt_tokens: scale(r.prompt_tokens),
            output_tokens: scale(r.output_tokens),
        })
        .collect();
    let trace_path = a
        .routing_trace
        .clone()
        .unwrap_or_else(|| shared_dir().join("data/routing/llama4-maverick-mmlu/top1_per_token.csv"));
    let f = std::fs::File::open(&trace_path).with_context(|| format!("opening {}", trace_path.display()))?;
    let pool = RoutingPool::read(BufReader::new(f), a.experts, a.top_k, a.seed)
        .with_context(|| format!("reading routing trace {}", trace_path.display()))?;
    let pool = Arc::new(if pool.layers > a.layers {
        pool.first_layers(a.layers)?
    } else {
        pool
    });
    Ok(Workload {
        arrivals_path,
        requests,
        trace_path,
        pool,
    })
}

pub fn run(a: SimValidateArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    init_logs();
    anyhow::ensure!(a.workers >= 1, "--workers must be at least 1");
    anyhow::ensure!(a.threads >= 1, "--threads must be at least 1");
    anyhow::ensure!(
        a.length_scale.is_finite() && a.length_scale > 0.0,
        "--length-scale must be positive"
    );
    anyhow::ensure!(
        a.heads > 0 && a.hidden.is_multiple_of(a.heads) && a.heads.is_multiple_of(a.kv_heads.max(1)),
        "--hidden must be a multiple of --heads, and --heads of --kv-heads"
    );
    anyhow::ensure!(
        a.experts.is_multiple_of(a.workers),
        "--experts {} must be a multiple of --workers {} (static placement)",
        a.experts,
        a.workers
    );
    // The engine's compute threads (the workers get theirs from --threads).
    if rayon::ThreadPoolBuilder::new()
        .num_threads(a.threads)
        .build_global()
        .is_err()
    {
        eprintln!("warning: the compute pool was already set up; --threads applies to workers only");
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let step = |what: &str| eprintln!("[{:>6.1}s] {what}", started.elapsed().as_secs_f64());

    // Inputs: arrivals (lengths scaled), routing, checkpoint.
    let Workload {
        arrivals_path,
        requests,
        trace_path,
        pool,
    } = load_workload(&a)?;
    let longest = requests
        .iter()
        .map(|r| r.prompt_tokens + r.output_tokens)
        .max()
        .unwrap_or(1);
    let shape = CkptShape {
        vocab: 256,
        hidden: a.hidden,
        layers: a.layers,
        heads: a.heads,
        kv_heads: a.kv_heads,
        head_dim: a.hidden / a.heads,
        experts: a.experts,
        top_k: a.top_k,
        expert_intermediate: a.ffn,
        dense_intermediate: a.ffn,
        max_positions: longest.next_power_of_two().max(1024),
    };
    let dir = a.model_dir.join(format!(
        "validate-h{}-l{}-e{}-k{}-f{}-p{}-f32",
        a.hidden, a.layers, a.experts, a.top_k, a.ffn, shape.max_positions
    ));
    step(&format!(
        "{} requests in {} s of {} (lengths x {}), routing {}; checkpoint {}",
        requests.len(),
        a.duration,
        arrivals_path.display(),
        a.length_scale,
        pool.source,
        dir.display()
    ));
    anyhow::ensure!(!requests.is_empty(), "no arrivals in the first {} s", a.duration);
    ensure_checkpoint(&dir, &shape, SaveDtype::F32)?;
    let config: ModelConfig = read_config(&dir)?;
    let ckpt = Checkpoint::open(&dir).with_context(|| format!("opening {}", dir.display()))?;
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend);
    let config_text = std::fs::read_to_string(dir.join("config.json"))?;
    let sim_model = ModelShape::from_config_json(&config_text, 4)?;
    anyhow::ensure!(
        pool.layers == sim_model.moe_layers.len(),
        "the routing trace has {} MoE layers, the model {}",
        pool.layers,
        sim_model.moe_layers.len()
    );
    let moe_layers = config.moe_layers();

    // 1. The cluster, then a first calibration on this machine (its workers idle, warm).
    let key = ExpertKey::new(moe_layers[0], 0);
    let experts: Vec<ExpertWeights> = (0..a.experts)
        .map(|e| ExpertWeights::load(&ckpt, &config, ExpertKey::new(moe_layers[0], e)))
        .collect::<Result<_, _>>()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let serve_cfg = endpoint::server::ServeConfig {
        model_name: "validate".into(),
        max_num_seqs: a.max_num_seqs,
        max_num_batched_tokens: a.max_num_batched_tokens,
        max_model_len: Some(shape.max_positions),
        prefix_caching: false,
        max_queued: 1 << 16,
        ..Default::default()
    };
    step(&format!("starting {} worker processes ...", a.workers));
    let cluster = LocalCluster::start(a.workers, &dir, &config, 8.0, "cpu", a.threads)?;
    let static_plan = cluster.plan(PlanKind::Static, 0);
    let key_worker = static_plan
        .iter()
        .find(|i| i.layer as usize == key.layer as usize && i.expert as usize == key.expert as usize)
        .map(|i| i.worker);
    let same_worker: Vec<u32> = static_plan
        .iter()
        .filter(|i| i.layer as usize == key.layer as usize && Some(i.worker) == key_worker)
        .map(|i| i.expert)
        .filter(|&e| (e as usize) < experts.len())
        .take(16)
        .collect();
    let mut one_per_worker: Vec<u32> = vec![key.expert];
    let mut seen = vec![key_worker];
    for i in &static_plan {
        if i.layer as usize == key.layer as usize
            && !seen.contains(&Some(i.worker))
            && (i.expert as usize) < experts.len()
        {
            seen.push(Some(i.worker));
            one_per_worker.push(i.expert);
        }
    }
    // Expert -> index of its worker (0..workers) for the per-call records.
    let mut worker_ids: Vec<_> = static_plan.iter().map(|i| i.worker).collect();
    worker_ids.sort_unstable();
    worker_ids.dedup();
    let static_plan_workers: std::collections::HashMap<ExpertKey, u32> = static_plan
        .iter()
        .map(|i| {
            let w = worker_ids.binary_search(&i.worker).unwrap_or(0) as u32;
            (ExpertKey::new(i.layer as usize, i.expert as usize), w)
        })
        .collect();
    let epoch = cluster.commit(static_plan, "sim-validate")?;
    let remote = cluster.remote()?;
    anyhow::ensure!(
        remote.wait_active(epoch, Duration::from_secs(300)),
        "plan {epoch} did not become active"
    );
    let ctx = CalibrationContext {
        model: Arc::new(Model::load(&ckpt, config.clone(), backend.clone())?),
        backend: backend.clone(),
        experts: &experts,
        runtime: &runtime,
        serve_cfg: &serve_cfg,
        remote: remote.as_ref(),
        key,
        same_worker,
        one_per_worker,
    };
    step("calibrating (expert FFN, layer, endpoint overheads, link) ...");
    let mut passes = Vec::new();
    let calibrate_side = |when: &str, passes: &mut Vec<Calibration>| -> anyhow::Result<()> {
        for i in 1..=CALIBRATIONS_EACH_SIDE {
            let c = calibrate(&ctx)?;
            report_calibration(&step, &format!("{when} ({i})"), &c);
            passes.push(c);
        }
        Ok(())
    };
    calibrate_side("before", &mut passes)?;

    // 3. The real run: endpoint in this process, experts on the workers, HTTP load.
    let mut model = Model::load(&ckpt, config.clone(), backend.clone())?;
    let mut moe_index = vec![None; config.num_layers];
    for (m, &l) in moe_layers.iter().enumerate() {
        moe_index[l] = Some(m);
    }
    model.set_routing_override(Some(Arc::new(PoolRouting {
        pool: pool.clone(),
        moe_index,
        seed: a.seed,
        pass: AtomicU64::new(0),
    })));
    let timed = Arc::new(TimedExperts {
        inner: remote.clone(),
        worker_of: static_plan_workers,
        workers: a.workers,
        calls: Mutex::new(Vec::new()),
    });
    let engine = Engine::new(Arc::new(model), timed.clone(), remote.clone());
    let mut rng_state = a.seed ^ 0x5eed;
    let mut prompt = |n: usize| -> String {
        (0..n)
            .map(|_| {
                rng_state = splitmix64(rng_state);
                (b'a' + (rng_state % 26) as u8) as char
            })
            .collect()
    };
    let bench_requests: Vec<BenchRequest> = requests
        .iter()
        .map(|r| BenchRequest {
            prompt: prompt(r.prompt_tokens),
            max_tokens: r.output_tokens,
            at: Duration::from_secs_f64(r.arrival_s),
        })
        .collect();
    step(&format!(
        "real run: {} requests over {:.0} s against the endpoint ...",
        requests.len(),
        a.duration
    ));
    let (report, outcomes) = serve_workload(&runtime, engine, serve_cfg.clone(), bench_requests, &timed)?;
    if report.failed > 0 {
        bail!(
            "{} of {} requests failed on the real engine: {:?}",
            report.failed,
            requests.len(),
            report.errors
        );
    }
    let mismatched = outcomes
        .iter()
        .zip(&requests)
        .filter(|(o, r)| o.input_tokens != r.prompt_tokens || o.output_tokens != r.output_tokens)
        .count();
    if mismatched > 0 {
        eprintln!("warning: {mismatched} requests had other token counts than asked (tokenizer specials?)");
    }
    let calls = timed.calls.lock().map(|t| t.clone()).unwrap_or_default();
    let layer_times: Vec<f64> = calls.iter().map(|c| c.seconds).collect();

    // 2b. The same calibrations again after the real run: this VM's speed drifts (up to 2x
    //     over minutes), so the profile is the middle of all passes, bracketing the run.
    step("replaying a sample of the real MoE-layer calls on the idle cluster ...");
    let replayed = replay_calls(remote.as_ref(), config.hidden_size, &calls, 400)?;
    step("calibrating again after the real run ...");
    calibrate_side("after", &mut passes)?;
    drop(cluster);
    let cal = Calibration::middle(&passes);
    let base = GpuProfile {
        name: format!("cpu-{}-thread", a.threads),
        peak_flops: 1e10,
        hbm_bandwidth: 1e10,
        memory_bytes: 16e9,
        compute_efficiency: 1.0,
        memory_efficiency: 1.0,
        intra_node_bandwidth: 1e9,
        inter_node_bandwidth: 1e9,
        host_to_device_bandwidth: 1e9,
        gpus_per_node: a.workers,
        kernel_overhead_s: 0.0,
        link_latency_s: 0.0,
        link_efficiency: 1.0,
        cold_start_overhead_s: 0.0,
        measured: None,
    };
    let (mut profile, ffn_rms) = fit_roofline(&base, &sim_model, &cal.ffn);
    profile.host_to_device_bandwidth = profile.hbm_bandwidth;
    profile.link_latency_s = cal.latency;
    profile.intra_node_bandwidth = cal.bandwidth;
    profile.inter_node_bandwidth = cal.bandwidth;
    profile.measured = Some(MeasuredOps {
        shape: sim_model.shape_key(),
        expert_ffn_s: cal.ffn.clone(),
        layer_fixed_s: cal.layer[0],
        layer_per_token_s: cal.layer[1],
        layer_per_context_s: cal.layer[2],
        layer_per_prefill_product_s: cal.layer[3],
        step_fixed_s: cal.step_fixed,
        step_per_sequence_s: cal.step_per_sequence,
        request_overhead_s: cal.request,
        expert_task_overhead_s: cal.task_overhead,
        per_extra_worker_s: cal.per_extra_worker,
    });
    step(&format!(
        "FFN roofline (kept for other shapes): {:.2} GFLOP/s, {:.2} GB/s, {:.1} us per kernel (rms log error {ffn_rms:.3})",
        profile.peak_flops / 1e9,
        profile.hbm_bandwidth / 1e9,
        profile.kernel_overhead_s * 1e6
    ));
    profile.check()?;
    std::fs::write(a.out.join("profile.json"), serde_json::to_string_pretty(&profile)?)?;

    // 4. The simulator on the same requests with the measured profile.
    step("simulating the same workload ...");
    let mut sim_cfg = SimConfig::new(a.workers, profile.clone());
    sim_cfg.central_attention = true;
    sim_cfg.ep_size = Some(a.workers);
    sim_cfg.slots_per_gpu = Some(a.experts / a.workers);
    sim_cfg.token_budget_per_gpu = a.max_num_batched_tokens;
    sim_cfg.max_seqs_per_gpu = a.max_num_seqs;
    sim_cfg.seed = a.seed;
    sim_cfg.sample_every_s = (a.duration / 100.0).max(1.0);
    let mut quiet = |_: &str, _: f64, _: f64| {};
    let mut reps = simulator::simulate(
        &sim_cfg,
        &sim_model,
        &pool,
        &requests,
        a.duration,
        &[PolicyKind::Static],
        &mut quiet,
    )?;
    let sim = reps.remove(0);
    let sim_sum = sim.summary.clone().context("the simulator gave no summary")?;

    // 4b. Every real MoE-layer call priced by the same cost model: separates an error of the
    //     per-call model from one of the batches the simulator forms.
    let mut cost = CostModel::new(profile.clone(), sim_model.clone(), a.workers);
    cost.central_attention = true;
    let priced = per_call_error(&cost, &calls, &replayed);

    // 5. Compare: the same definitions on both sides (seconds from arrival; TPOT over
    //    requests with more than one output token).
    let ok: Vec<(&endpoint::bench::Outcome, &simulator::arrivals::Request)> = outcomes.iter().zip(&requests).collect();
    let real_ttft: Vec<f64> = ok.iter().map(|(o, _)| o.ttft).collect();
    let real_e2e: Vec<f64> = ok.iter().map(|(o, _)| o.e2e).collect();
    let real_tpot: Vec<f64> = ok
        .iter()
        .filter(|(o, _)| o.output_tokens > 1)
        .map(|(o, _)| (o.e2e - o.ttft) / (o.output_tokens - 1) as f64)
        .collect();
    let real = json!({
        "ttft_s": Percentiles::of(&mut real_ttft.clone()),
        "tpot_s": Percentiles::of(&mut real_tpot.clone()),
        "e2e_s": Percentiles::of(&mut real_e2e.clone()),
        "moe_layer_time_s": Percentiles::of(&mut layer_times.clone()),
        "moe_layer_calls": layer_times.len(),
        "output_tokens_per_s": report.output_throughput,
        "duration_s": report.duration_s,
    });
    let simulated = json!({
        "ttft_s": sim_sum.ttft_s,
        "tpot_s": sim_sum.tpot_s,
        "e2e_s": sim_sum.e2e_s,
        "moe_layer_time_s": {"mean": sim_sum.moe_layer_time_mean_s, "p99": sim_sum.moe_layer_time_p99_s},
        "moe_layer_calls": sim.moe_layer_s.len(),
        "requests_completed": sim_sum.requests_completed,
        "sim_end_s": sim.sim_end_s,
    });
    let rp = |v: &[f64]| Percentiles::of(&mut v.to_vec());
    let (rt, rtp, re, rl) = (rp(&real_ttft), rp(&real_tpot), rp(&real_e2e), rp(&layer_times));
    let real_out: usize = requests.iter().map(|r| r.output_tokens).sum();
    let sim_tps = real_out as f64 / sim.sim_end_s.max(1e-9);
    let real_tps = real_out as f64 / report.duration_s.max(1e-9);
    let metrics: Vec<(&str, f64, f64)> = vec![
        ("moe_layer_time_mean_s", rl.mean, sim_sum.moe_layer_time_mean_s),
        ("moe_layer_time_p99_s", rl.p99, sim_sum.moe_layer_time_p99_s),
        ("e2e_mean_s", re.mean, sim_sum.e2e_s.mean),
        ("e2e_p50_s", re.p50, sim_sum.e2e_s.p50),
        ("e2e_p90_s", re.p90, sim_sum.e2e_s.p90),
        ("e2e_p99_s", re.p99, sim_sum.e2e_s.p99),
        ("ttft_mean_s", rt.mean, sim_sum.ttft_s.mean),
        ("ttft_p50_s", rt.p50, sim_sum.ttft_s.p50),
        ("ttft_p99_s", rt.p99, sim_sum.ttft_s.p99),
        ("tpot_mean_s", rtp.mean, sim_sum.tpot_s.mean),
        ("tpot_p50_s", rtp.p50, sim_sum.tpot_s.p50),
        ("output_tokens_per_s_over_run", real_tps, sim_tps),
    ];
    let errors: serde_json::Map<String, serde_json::Value> = metrics
        .iter()
        .map(|(k, r, s)| {
            (
                k.to_string(),
                json!({"real": r, "sim": s, "error_pct": error_pct(*s, *r)}),
            )
        })
        .collect();
    let doc = json!({
        "workload": {
            "arrivals": arrivals_path, "duration_s": a.duration, "rate_scale": a.rate_scale,
            "length_scale": a.length_scale, "requests": requests.len(),
            "prompt_tokens": requests.iter().map(|r| r.prompt_tokens).sum::<usize>(),
            "output_tokens": real_out,
            "routing_trace": trace_path, "routing_source": pool.source,
            "model": {"hidden": a.hidden, "ffn": a.ffn, "layers": a.layers, "experts": a.experts,
                      "top_k": a.top_k, "heads": a.heads, "kv_heads": a.kv_heads, "dtype": "f32"},
            "workers": a.workers, "threads": a.threads, "max_num_seqs": a.max_num_seqs,
            "max_num_batched_tokens": a.max_num_batched_tokens, "seed": a.seed,
        },
        "profile": profile,
        "ffn_roofline_fit_rms_log_error": ffn_rms,
        "calibration": passes.iter().map(Calibration::to_json).collect::<Vec<_>>(),
        "real": real,
        "sim": simulated,
        "metrics": errors,
        "real_calls_priced": priced,
        "wall_s": started.elapsed().as_secs_f64(),
    });
    let path = a.out.join("validation.json");
    std::fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
    write_plots(
        &a.out,
        &real_e2e,
        &sim.e2e_s,
        &real_ttft,
        &sim.ttft_s,
        &layer_times,
        &sim.moe_layer_s,
    )?;

    let mut so = std::io::stdout().lock();
    writeln!(
        so,
        "simulator vs real engine ({} workers, {} requests):",
        a.workers,
        requests.len()
    )?;
    writeln!(so, "{:<30} {:>12} {:>12} {:>9}", "metric", "real", "simulated", "error")?;
    for (k, r, s) in &metrics {
        writeln!(so, "{k:<30} {r:>12.6} {s:>12.6} {:>8.1}%", error_pct(*s, *r))?;
    }
    writeln!(
        so,
        "real MoE-layer calls priced by the simulator's cost model (by tokens sent):"
    )?;
    writeln!(
        so,
        "{:<12} {:>7} {:>12} {:>12} {:>9} {:>9} {:>12} {:>12} {:>12} {:>12}",
        "tokens", "calls", "real mean", "priced mean", "error", "replayed", "in run", "idle", "after work", "priced"
    )?;
    for b in priced.as_array().into_iter().flatten() {
        let (r, p) = (
            b["real_mean_s"].as_f64().unwrap_or(0.0),
            b["priced_mean_s"].as_f64().unwrap_or(0.0),
        );
        writeln!(
            so,
            "{:<12} {:>7} {:>12.6} {:>12.6} {:>8.1}% {:>9} {:>12.6} {:>12.6} {:>12.6} {:>12.6}",
            b["tokens"].as_str().unwrap_or("?"),
            b["calls"],
            r,
            p,
            error_pct(p, r),
            b["replayed"],
            b["replayed_in_run_mean_s"].as_f64().unwrap_or(0.0),
            b["replayed_idle_mean_s"].as_f64().unwrap_or(0.0),
            b["replayed_after_work_mean_s"].as_f64().unwrap_or(0.0),
            b["replayed_priced_mean_s"].as_f64().unwrap_or(0.0)
        )?;
    }
    step(&format!("wrote {} and plots", path.display()));
    Ok(())
}

/// Real calls grouped by the token copies they sent (all, then 1-8, 9-64, 65+): mean real
/// and mean priced seconds per group, and the same of the group's replayed calls with their
/// replay times.
fn per_call_error(cost: &CostModel, calls: &[CallRecord], replayed: &[(usize, f64, f64)]) -> serde_json::Value {
    let groups: [(&str, u32, u32); 4] = [
        ("all", 0, u32::MAX),
        ("1-8", 1, 8),
        ("9-64", 9, 64),
        ("65+", 65, u32::MAX),
    ];
    // Per call: token copies sent, and its price.
    let sent: Vec<u32> = calls.iter().map(|c| c.tokens_per_worker.iter().sum()).collect();
    let price: Vec<f64> = calls.iter().map(|c| priced_call(cost, c)).collect();
    let rows: Vec<serde_json::Value> = groups
        .iter()
        .map(|&(name, lo, hi)| {
            let (mut n, mut real, mut priced) = (0usize, 0.0, 0.0);
            for (i, c) in calls.iter().enumerate() {
                if (lo..=hi).contains(&sent[i]) {
                    n += 1;
                    real += c.seconds;
                    priced += price[i];
                }
            }
            let d = n.max(1) as f64;
            // The replayed sample of this group: its times in the run and on the idle cluster.
            let (mut m, mut in_run, mut idle, mut after_work, mut priced_r) = (0usize, 0.0, 0.0, 0.0, 0.0);
            for &(i, t, w) in replayed {
                if (lo..=hi).contains(&sent[i]) {
                    m += 1;
                    in_run += calls[i].seconds;
                    idle += t;
                    after_work += w;
                    priced_r += price[i];
                }
            }
            let e = m.max(1) as f64;
            json!({"tokens": name, "calls": n, "real_mean_s": real / d, "priced_mean_s": priced / d,
                   "replayed": m, "replayed_in_run_mean_s": in_run / e, "replayed_idle_mean_s": idle / e,
                   "replayed_after_work_mean_s": after_work / e, "replayed_priced_mean_s": priced_r / e})
        })
        .collect();
    serde_json::Value::Array(rows)
}

fn write_plots(
    dir: &Path,
    real_e2e: &[f64],
    sim_e2e: &[f64],
    real_ttft: &[f64],
    sim_ttft: &[f64],
    real_layer: &[f64],
    sim_layer: &[f32],
) -> anyhow::Result<()> {
    let sim_layer: Vec<f64> = sim_layer.iter().map(|&x| x as f64).collect();
    let pair = |r: &[f64], s: &[f64]| {
        vec![
            ("real engine".to_string(), svg::cdf(r)),
            ("simulator".to_string(), svg::cdf(s)),
        ]
    };
    for (file, title, r, s) in [
        ("validation_e2e_cdf.svg", "E2E latency CDF", real_e2e, sim_e2e),
        ("validation_ttft_cdf.svg", "TTFT CDF", real_ttft, sim_ttft),
        (
            "validation_moe_layer_cdf.svg",
            "MoE-layer time CDF",
            real_layer,
            &sim_layer[..],
        ),
    ] {
        let p = dir.join(file);
        std::fs::write(&p, svg::line_chart(title, "seconds", "fraction", &pair(r, s)))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_routing_follows_one_query_per_sequence_through_every_layer() {
        let pop: Vec<Vec<f64>> = (0..2)
            .map(|l| (0..8).map(|e| 1.0 + ((e * 3 + l) % 5) as f64).collect())
            .collect();
        let pool = Arc::new(RoutingPool::from_popularity(&pop, 2, 3, "test".into()).unwrap());
        let r = PoolRouting {
            pool: pool.clone(),
            moe_index: vec![Some(0), None, Some(1)],
            seed: 9,
            pass: AtomicU64::new(0),
        };
        // A prompt chunk of 3 rows at position 0, then a decode row at position 5.
        let spans = [(0, 3, 0), (3, 1, 5)];
        assert_eq!(r.route(1, &spans, 2), None, "dense layers keep their router");
        assert_eq!(r.route(0, &spans, 3), None, "another top-k keeps the router");
        let expected = |pass: u64, layer: usize| -> Vec<u32> {
            let (q0, q1) = (pool.query_of(pass << 20, 9), pool.query_of((pass << 20) | 1, 9));
            let mut ids = Vec::new();
            for p in 0..3 {
                ids.extend(pool.experts(pool.token(q0, true, p), layer));
            }
            ids.extend(pool.experts(pool.token(q1, false, 5), layer));
            ids
        };
        // Pass 1: both MoE layers route the same tokens, each at its own layer.
        assert_eq!(r.route(0, &spans, 2).unwrap(), expected(1, 0));
        assert_eq!(r.route(2, &spans, 2).unwrap(), expected(1, 1));
        // The next forward pass draws again.
        assert_eq!(r.route(0, &spans, 2).unwrap(), expected(2, 0));
    }

    #[test]
    fn nonnegative_least_squares_recovers_exact_and_clamps_negative_coefficients() {
        let truth = [2.0, 0.5, 0.0, 3.0];
        let rows: Vec<([f64; 4], f64)> = (0..12)
            .map(|i| {
                let a = [1.0, i as f64, (i * i % 7) as f64, ((i * 5) % 11) as f64];
                (a, a.iter().zip(&truth).map(|(p, q)| p * q).sum())
            })
            .collect();
        let x = nonneg_least_squares(&rows);
        for (a, b) in x.iter().zip(&truth) {
            assert!((a - b).abs() < 1e-9, "{x:?}");
        }
        // y = 1 - t: the best fit with t >= 0 leaves the slope at 0.
        let rows: Vec<([f64; 4], f64)> = (0..5).map(|t| ([1.0, t as f64, 0.0, 0.0], 1.0 - t as f64)).collect();
        let x = nonneg_least_squares(&rows);
        assert!(x.iter().all(|&v| v >= 0.0) && x[1] == 0.0, "{x:?}");
    }

    #[test]
    fn the_roofline_fit_recovers_a_known_profile() {
        let cfg = r#"{"model_type": "mixtral", "hidden_size": 512, "intermediate_size": 512,
            "num_hidden_layers": 2, "num_attention_heads": 8, "num_local_experts": 8,
            "num_experts_per_tok": 2, "vocab_size": 256}"#;
        let model = ModelShape::from_config_json(cfg, 4).unwrap();
        let mut truth = simulator::GpuType::A100.profile();
        truth.compute_efficiency = 1.0;
        truth.memory_efficiency = 1.0;
        truth.peak_flops = 4e10;
        truth.hbm_bandwidth = 8e9;
        truth.kernel_overhead_s = 5e-6;
        let c = CostModel::new(truth.clone(), model.clone(), 1);
        let measured: Vec<(usize, f64)> = FFN_TOKENS.iter().map(|&n| (n, c.expert_time(n))).collect();
        let (fit, rms) = fit_roofline(&truth, &model, &measured);
        assert!(rms < 0.02, "rms {rms}");
        let rel = |a: f64, b: f64| (a / b - 1.0).abs();
        assert!(rel(fit.peak_flops, 4e10) < 0.05, "{}", fit.peak_flops);
        assert!(rel(fit.hbm_bandwidth, 8e9) < 0.05, "{}", fit.hbm_bandwidth);
    }
}
