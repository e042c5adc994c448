//! Benchmarks of the distributed data plane (issue 6):
//!
//! - `moeless bench dispatch`: one MoE layer's `ExpertFunction::execute` in process
//!   (`LocalExperts`) against `RemoteExperts` over 1 and 2 local worker processes.
//! - `moeless bench cold-start`: raw read bandwidth against instance cold starts
//!   (`data_plane::store::cold_start_bench`).
//! - `moeless bench decode-workers`: decode tokens/s over 1, 2, 4 workers with routing replayed
//!   from a real trace, static placement against MoEless placement.

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use control_plane::placement::{balancedness, load_matrix, policy_plan, ExpertLoads, Placement};
use control_plane::state::{ExpertInstance, ModelSpec};
use data_plane::backend::{Backend, CpuBackend};
use data_plane::checkpoint::Checkpoint;
use data_plane::config::{FfnKind, ModelConfig};
use data_plane::engine::{argmax, read_config, Engine};
use data_plane::expert::{ExpertError, ExpertFunction, ExpertTask, LocalExperts, SingleInstance};
use data_plane::model::{LogitsWanted, Model, RoutingOverride, RowSpan};
use data_plane::tensor::Tensor;
use data_plane::testing::{ModelShape, SaveDtype};
use serde_json::json;
use shared::source::{load_steps, RoutingFormat, SourceOptions};
use shared::{ExpertKey, Phase, Step};
use worker::remote::{DispatchStats, RemoteExperts};

use super::bench::{ensure_checkpoint, median};
use super::cluster::{LocalCluster, PlanKind};

/// The checkpoint the dispatch and decode benchmarks run on.
#[derive(Args, Debug, Clone)]
pub struct ShapeArgs {
    /// Checkpoint directory to use instead of a generated one.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value_t = 1024)]
    pub hidden: usize,
    /// Expert FFN (intermediate) size.
    #[arg(long, default_value_t = 2816)]
    pub ffn: usize,
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    #[arg(long, default_value_t = 8)]
    pub experts: usize,
    #[arg(long, default_value_t = 2)]
    pub top_k: usize,
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    #[arg(long, default_value_t = 2)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 4096)]
    pub vocab: usize,
    /// Where generated checkpoints are kept (reused when the shape matches).
    #[arg(long, default_value = "target/bench-models")]
    pub dir: PathBuf,
    /// Memory budget of each worker for expert instances, in GiB.
    #[arg(long, default_value_t = 8.0)]
    pub worker_memory_gb: f64,
}

impl ShapeArgs {
    fn shape(&self) -> ModelShape {
        ModelShape {
            vocab: self.vocab,
            hidden: self.hidden,
            layers: self.layers,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.hidden / self.heads.max(1),
            experts: self.experts,
            top_k: self.top_k,
            expert_intermediate: self.ffn,
            dense_intermediate: self.ffn,
            max_positions: 4096,
        }
    }

    /// The checkpoint directory: `--model`, or a generated f32 Mixtral of the shape.
    fn checkpoint(&self) -> anyhow::Result<PathBuf> {
        if let Some(m) = &self.model {
            return Ok(m.clone());
        }
        anyhow::ensure!(
            self.heads > 0 && self.hidden.is_multiple_of(self.heads),
            "--hidden {} must be a multiple of --heads {}",
            self.hidden,
            self.heads
        );
        let dir = self.dir.join(format!(
            "mixtral-h{}-l{}-e{}-k{}-f{}-v{}-f32",
            self.hidden, self.layers, self.experts, self.top_k, self.ffn, self.vocab
        ));
        ensure_checkpoint(&dir, &self.shape(), SaveDtype::F32)?;
        Ok(dir)
    }
}

fn write_json(path: &Option<PathBuf>, doc: serde_json::Value) -> anyhow::Result<()> {
    if let Some(out) = path {
        std::fs::write(out, serde_json::to_vec_pretty(&doc)?).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

/// Logs to stderr at `warn` (or `RUST_LOG`), for commands that print their own progress.
pub(super) fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,openraft=error")),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

fn local_parts(dir: &Path) -> anyhow::Result<(ModelConfig, Checkpoint, Arc<dyn Backend>)> {
    let config = read_config(dir)?;
    let ckpt = Checkpoint::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    Ok((config, ckpt, Arc::new(CpuBackend)))
}

/// Starts a local cluster, commits `instances` and waits until dispatch uses them.
fn start_cluster(
    n: usize,
    dir: &Path,
    config: &ModelConfig,
    memory_gb: f64,
) -> anyhow::Result<(LocalCluster, Arc<RemoteExperts>)> {
    let cluster = LocalCluster::start(n, dir, config, memory_gb, "cpu", 0)?;
    let epoch = cluster.commit(cluster.plan(PlanKind::Static, 0), "bench")?;
    let remote = cluster.remote()?;
    anyhow::ensure!(
        remote.wait_active(epoch, Duration::from_secs(120)),
        "plan {epoch} did not become active"
    );
    Ok((cluster, remote))
}

// ---------------------------------------------------------------------------------------------
// dispatch

#[derive(Args, Debug)]
pub struct DispatchBenchArgs {
    #[command(flatten)]
    pub shape: ShapeArgs,
    /// Tokens of the layer call (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    pub tokens: Vec<usize>,
    /// Local worker processes of the remote runs (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub workers: Vec<usize>,
    /// Decoder layer whose tasks are timed.
    #[arg(long, default_value_t = 0)]
    pub layer: usize,
    /// Timed calls per run (after 3 untimed ones); a run's value is their median.
    #[arg(long, default_value_t = 30)]
    pub calls: usize,
    /// Runs, interleaved local / remote; medians of the runs are reported.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Passes work on to `inner` and keeps the tasks of the first call for `layer`.
struct Recorder {
    inner: Arc<LocalExperts>,
    layer: usize,
    captured: Mutex<Option<Vec<ExpertTask>>>,
}

impl ExpertFunction for Recorder {
    fn execute(&self, layer: usize, tasks: Vec<ExpertTask>) -> Result<Vec<Tensor>, ExpertError> {
        if layer == self.layer {
            if let Ok(mut c) = self.captured.lock() {
                c.get_or_insert_with(|| tasks.clone());
            }
        }
        self.inner.execute(layer, tasks)
    }
}

/// Median wall time of `calls` calls of `execute_into(layer, tasks, ..)` (run and combine one
/// layer's expert work) in microseconds.
fn time_calls(f: &dyn ExpertFunction, layer: usize, tasks: &[ExpertTask], calls: usize) -> anyhow::Result<f64> {
    let tokens = tasks
        .iter()
        .flat_map(|t| &t.tokens)
        .max()
        .map_or(0, |&t| t as usize + 1);
    let hidden = tasks.first().map_or(0, |t| t.input.cols());
    let mut times = Vec::with_capacity(calls);
    for i in 0..calls + 3 {
        let work = tasks.to_vec();
        let mut out = Tensor::zeros(vec![tokens, hidden]);
        let t = Instant::now();
        f.execute_into(layer, work, &mut out)?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        std::hint::black_box(&out);
        if i >= 3 {
            times.push(us);
        }
    }
    Ok(median(times))
}

pub fn dispatch(a: DispatchBenchArgs) -> anyhow::Result<()> {
    init_logs();
    let dir = a.shape.checkpoint()?;
    let (config, ckpt, backend) = local_parts(&dir)?;
    anyhow::ensure!(
        a.layer < config.num_layers && config.layer_ffn[a.layer] == FfnKind::Moe,
        "--layer {} is not a MoE layer",
        a.layer
    );
    eprintln!("loading every expert in process ...");
    let local = Arc::new(LocalExperts::load_all(&ckpt, &config, backend.clone())?);
    let model = Arc::new(Model::load(&ckpt, config.clone(), backend)?);
    // The tasks of one layer call, built by the engine itself from random tokens' hidden states.
    let mut tasks_by_tokens = Vec::new();
    for (i, &n) in a.tokens.iter().enumerate() {
        let recorder = Arc::new(Recorder {
            inner: local.clone(),
            layer: a.layer,
            captured: Mutex::new(None),
        });
        let engine = Engine::new(model.clone(), recorder.clone(), Arc::new(SingleInstance));
        let prompt: Vec<u32> = (0..n)
            .map(|t| ((t * 7919 + i * 104729 + 17) % config.vocab_size) as u32)
            .collect();
        engine.step(&mut [engine.new_cache()], &[&prompt], LogitsWanted::Last)?;
        let tasks = recorder
            .captured
            .lock()
            .map_err(|_| anyhow::anyhow!("recorder poisoned"))?
            .take()
            .context("the engine made no call for the layer")?;
        eprintln!(
            "  {n} tokens: {} tasks ({} rows) at layer {}",
            tasks.len(),
            tasks.iter().map(|t| t.input.rows()).sum::<usize>(),
            a.layer
        );
        tasks_by_tokens.push((n, tasks));
    }

    let mut rows = Vec::new();
    println!(
        "One MoE layer's execute_into() (run and combine), median of {} runs x median of {} calls; hidden {}, expert FFN {}, {} experts, top-{}.",
        a.repeats, a.calls, config.hidden_size, config.moe.expert_intermediate, config.moe.num_experts, config.moe.top_k
    );
    println!(
        "| tokens | workers | in-process µs | remote µs | overhead µs | remote/local | messages/call | KiB sent/call | KiB received/call |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for &w in &a.workers {
        eprintln!("starting a local cluster of {w} workers (static plan) ...");
        let (cluster, remote) = start_cluster(w, &dir, &config, a.shape.worker_memory_gb)?;
        for (n, tasks) in &tasks_by_tokens {
            let (mut loc, mut rem) = (Vec::new(), Vec::new());
            let s0 = remote.stats();
            for rep in 0..a.repeats {
                loc.push(time_calls(local.as_ref(), a.layer, tasks, a.calls)?);
                rem.push(time_calls(remote.as_ref(), a.layer, tasks, a.calls)?);
                eprintln!(
                    "  {w} workers, {n} tokens, run {}: local {:.0} µs, remote {:.0} µs",
                    rep + 1,
                    loc[rep],
                    rem[rep]
                );
            }
            let s1 = remote.stats();
            let calls = (s1.layer_calls - s0.layer_calls).max(1) as f64;
            let msgs = (s1.messages - s0.messages) as f64 / calls;
            let kib = (s1.bytes_sent - s0.bytes_sent) as f64 / calls / 1024.0;
            let kib_in = (s1.bytes_received - s0.bytes_received) as f64 / calls / 1024.0;
            let (l, r) = (median(loc.clone()), median(rem.clone()));
            println!(
                "| {n} | {w} | {l:.0} | {r:.0} | {:.0} | {:.2} | {msgs:.1} | {kib:.1} | {kib_in:.1} |",
                r - l,
                r / l
            );
            rows.push(
                json!({"tokens": n, "workers": w, "local_us": l, "remote_us": r, "overhead_us": r - l,
                "ratio": r / l, "messages_per_call": msgs, "kib_sent_per_call": kib, "kib_received_per_call": kib_in,
                "local_us_runs": loc, "remote_us_runs": rem}),
            );
        }
        drop(remote);
        drop(cluster);
    }
    write_json(
        &a.json,
        json!({"checkpoint": dir, "layer": a.layer, "calls": a.calls, "repeats": a.repeats,
        "hidden": config.hidden_size, "expert_ffn": config.moe.expert_intermediate,
        "experts": config.moe.num_experts, "top_k": config.moe.top_k, "results": rows}),
    )
}

// ---------------------------------------------------------------------------------------------
// cold start

#[derive(Args, Debug)]
pub struct ColdStartBenchArgs {
    /// Checkpoint directory to measure instead of generated ones.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Weight types of the generated checkpoints (comma-separated: f32, bf16).
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16")]
    pub dtypes: Vec<String>,
    #[arg(long, default_value_t = 2048)]
    pub hidden: usize,
    #[arg(long, default_value_t = 1408)]
    pub ffn: usize,
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    #[arg(long, default_value_t = 8)]
    pub experts: usize,
    /// Timed passes of each kind; medians are reported.
    #[arg(long, default_value_t = 9)]
    pub repeats: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

fn all_experts(config: &ModelConfig) -> Vec<ExpertKey> {
    config
        .moe_layers()
        .into_iter()
        .flat_map(|l| (0..config.moe.num_experts).map(move |e| ExpertKey::new(l, e)))
        .collect()
}

pub fn cold_start(a: ColdStartBenchArgs) -> anyhow::Result<()> {
    let tmp = tempfile::Builder::new().prefix("moeless-bench-cold-start").tempdir()?;
    let mut runs: Vec<(String, PathBuf)> = Vec::new();
    match &a.model {
        Some(m) => runs.push(("given".into(), m.clone())),
        None => {
            let shape = ModelShape {
                vocab: 256,
                hidden: a.hidden,
                layers: a.layers,
                heads: 16,
                kv_heads: 4,
                head_dim: a.hidden / 16,
                experts: a.experts,
                top_k: 2,
                expert_intermediate: a.ffn,
                dense_intermediate: a.ffn,
                max_positions: 256,
            };
            for dt in &a.dtypes {
                let dtype = match dt.as_str() {
                    "f32" => SaveDtype::F32,
                    "bf16" => SaveDtype::Bf16,
                    other => anyhow::bail!("unknown dtype '{other}' (f32, bf16)"),
                };
                let dir = tmp.path().join(format!("mixtral-{dt}"));
                eprintln!("generating {} ...", dir.display());
                data_plane::testing::write_random_checkpoint(
                    &dir,
                    data_plane::config::Arch::Mixtral,
                    &shape,
                    3,
                    dtype,
                )?;
                runs.push((dt.clone(), dir));
            }
        }
    }
    println!(
        "Median of {} passes over every routed expert, page-cache warm.",
        a.repeats
    );
    println!("| checkpoint | experts | MB/pass | raw read GB/s | raw (reused buffer) GB/s | cold start GB/s | cold/raw | cold/reused | ms/expert | >= 80% |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for (name, dir) in runs {
        let config = read_config(&dir)?;
        let keys = all_experts(&config);
        eprintln!("measuring {name}: {} experts x {} passes ...", keys.len(), a.repeats);
        let r = data_plane::store::cold_start_bench(&dir, &keys, a.repeats)
            .with_context(|| format!("cold-start bench on {}", dir.display()))?;
        println!(
            "| {name} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
            r.experts,
            r.bytes_per_pass as f64 / 1e6,
            r.raw_read_gbps,
            r.raw_read_reused_gbps,
            r.instance_gbps,
            r.ratio,
            r.ratio_to_reused,
            r.cold_start_ms_median,
            if r.ratio >= 0.8 { "yes" } else { "no" }
        );
        if !r.cache_warm {
            eprintln!("  note: {}", r.note);
        }
        rows.push(json!({"checkpoint": name, "report": r}));
    }
    write_json(&a.json, json!({"results": rows}))
}

// ---------------------------------------------------------------------------------------------
// decode over workers with replayed routing

#[derive(Args, Debug)]
pub struct DecodeWorkersBenchArgs {
    #[command(flatten)]
    pub shape: ShapeArgs,
    /// Worker counts (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub workers: Vec<usize>,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Timed decode steps per run.
    #[arg(long, default_value_t = 8)]
    pub steps: usize,
    /// Prompt tokens per sequence (prefill, untimed).
    #[arg(long, default_value_t = 4)]
    pub prompt_len: usize,
    /// Runs per (workers, policy), interleaved static / MoEless; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Routing trace (any format `moeless replay` reads). Default: the Llama-4-Maverick MMLU
    /// per-token trace under $MOELESS_SHARED_DIR (or ../shared).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Experts of the trace's model (required by the per-token CSVs).
    #[arg(long, default_value_t = 128)]
    pub trace_experts: usize,
    /// First trace decode step replayed.
    #[arg(long, default_value_t = 0)]
    pub trace_start: usize,
    /// Also measure all experts in this process (no workers) with the same routing.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub in_process: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Routing forced from trace steps: engine step `s` uses trace step `start + s` (cyclically);
/// model MoE layer `m` uses trace MoE layer `m mod L_trace`; slot `j` of token `t` takes the
/// trace's `(t * k + j)`-th choice of that step and layer (cyclically), and the model takes the
/// expert id modulo its own expert count.
#[derive(Debug)]
struct TraceRouting {
    steps: Vec<Step>,
    /// Decoder layer -> MoE layer index.
    moe_index: Vec<Option<usize>>,
    step: AtomicUsize,
}

impl TraceRouting {
    fn ids(&self, step: usize, moe_layer: usize, tokens: usize, k: usize) -> Vec<u32> {
        let s = &self.steps[step % self.steps.len()];
        let r = &s.routes[moe_layer % s.routes.len()];
        (0..tokens * k).map(|i| r[i % r.len()]).collect()
    }
}

impl RoutingOverride for TraceRouting {
    fn route(&self, layer: usize, spans: &[RowSpan], k: usize) -> Option<Vec<u32>> {
        let m = (*self.moe_index.get(layer)?)?;
        let tokens = spans.iter().map(|s| s.1).sum();
        Some(self.ids(self.step.load(Ordering::Relaxed), m, tokens, k))
    }
}

/// The reference data: `$MOELESS_SHARED_DIR`, else `../shared`.
pub(super) fn shared_dir() -> PathBuf {
    std::env::var_os("MOELESS_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("../shared"))
}

fn default_trace() -> PathBuf {
    shared_dir().join("data/routing/llama4-maverick-mmlu/top1_per_token.csv")
}

/// Decode tokens/s: prefill (untimed), then `steps` timed decode steps, with trace step `s`
/// forcing the routing of engine step `s`.
/// With `remote`, also the dispatch traffic of the timed steps (messages, bytes sent, received).
fn decode_run(
    engine: &Engine,
    routing: &TraceRouting,
    a: &DecodeWorkersBenchArgs,
    rep: usize,
    remote: Option<&RemoteExperts>,
) -> anyhow::Result<(f64, (u64, u64, u64))> {
    let vocab = engine.config().vocab_size;
    let prompts: Vec<Vec<u32>> = (0..a.batch)
        .map(|b| {
            (0..a.prompt_len)
                .map(|i| ((i * 7919 + b * 104729 + rep * 31) % vocab) as u32)
                .collect()
        })
        .collect();
    let mut caches: Vec<_> = prompts.iter().map(|_| engine.new_cache()).collect();
    routing.step.store(a.trace_start, Ordering::Relaxed);
    let toks: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
    let (logits, _) = engine.step(&mut caches, &toks, LogitsWanted::Last)?;
    let mut next: Vec<[u32; 1]> = logits.iter().map(|l| [argmax(l.row(0))]).collect();
    let s0 = remote.map(|r| r.stats());
    let t = Instant::now();
    for s in 1..=a.steps {
        routing.step.store(a.trace_start + s, Ordering::Relaxed);
        let toks: Vec<&[u32]> = next.iter().map(|n| n.as_slice()).collect();
        let (logits, _) = engine.step(&mut caches, &toks, LogitsWanted::Last)?;
        next = logits.iter().map(|l| [argmax(l.row(0))]).collect();
    }
    let tps = (a.batch * a.steps) as f64 / t.elapsed().as_secs_f64();
    let traffic = match (s0, remote) {
        (Some(s0), Some(r)) => stats_delta(&s0, &r.stats()),
        _ => (0, 0, 0),
    };
    Ok((tps, traffic))
}

fn stats_delta(a: &DispatchStats, b: &DispatchStats) -> (u64, u64, u64) {
    (
        b.messages - a.messages,
        b.bytes_sent - a.bytes_sent,
        b.bytes_received - a.bytes_received,
    )
}

pub fn decode_workers(a: DecodeWorkersBenchArgs) -> anyhow::Result<()> {
    init_logs();
    let dir = a.shape.checkpoint()?;
    let (config, ckpt, backend) = local_parts(&dir)?;
    let k = config.moe.top_k;
    let trace = a.trace.clone().unwrap_or_else(default_trace);
    let name = trace
        .file_name()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_string();
    let format = RoutingFormat::detect(&name).with_context(|| format!("cannot tell the routing format of {name}"))?;
    let file = std::fs::File::open(&trace).with_context(|| format!("opening {}", trace.display()))?;
    let mut opts = SourceOptions::new(Phase::Decode, a.batch * k);
    opts.num_experts = Some(a.trace_experts);
    let loaded =
        load_steps(format, BufReader::new(file), &opts).with_context(|| format!("reading {}", trace.display()))?;
    // Only full steps: a smaller last group would replay fewer distinct choices.
    let full = a.batch * k * loaded.top_k;
    let steps: Vec<Step> = loaded
        .steps
        .into_iter()
        .filter(|s| s.routes.iter().all(|r| r.len() >= full))
        .collect();
    anyhow::ensure!(
        !steps.is_empty(),
        "the trace has no decode step of {} tokens",
        a.batch * k
    );
    let moe_layers: Vec<usize> = config.moe_layers();
    let mut moe_index = vec![None; config.num_layers];
    for (m, &l) in moe_layers.iter().enumerate() {
        moe_index[l] = Some(m);
    }
    let routing = Arc::new(TraceRouting {
        steps,
        moe_index,
        step: AtomicUsize::new(0),
    });
    eprintln!(
        "trace {}: {} ({} full steps of {} choices), top-{} of {} experts over {} MoE layers -> model top-{k} of {} over {}",
        trace.display(),
        loaded.description,
        routing.steps.len(),
        full,
        loaded.top_k,
        loaded.num_experts,
        loaded.layer_ids.len(),
        config.moe.num_experts,
        moe_layers.len()
    );
    // MoEless placement from the loads of every full step of the trace, mapped as replayed.
    let e = config.moe.num_experts;
    let mut loads: ExpertLoads = ExpertLoads::new();
    for step in 0..routing.steps.len() {
        for (m, &l) in moe_layers.iter().enumerate() {
            for id in routing.ids(step, m, a.batch, k) {
                *loads.entry((l as u32, id % e as u32)).or_default() += 1;
            }
        }
    }
    let spec = ModelSpec {
        name: "bench".into(),
        architecture: config.arch.model_type().to_string(),
        num_layers: config.num_layers as u32,
        num_experts: e as u32,
        top_k: k as u32,
        weights: dir.to_string_lossy().into_owned(),
    };
    let matrix = load_matrix(&spec, &loads)?;
    let hottest: Vec<f64> = (0..matrix.num_layers())
        .filter(|&l| matrix.layer(l).iter().sum::<f64>() > 0.0)
        .map(|l| {
            let row = matrix.layer(l);
            let mean = row.iter().sum::<f64>() / row.len() as f64;
            row.iter().copied().fold(0.0, f64::max) / mean
        })
        .collect();
    eprintln!(
        "  replayed loads: hottest expert / mean per layer = {:?}",
        hottest.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>()
    );

    let mut model = Model::load(&ckpt, config.clone(), backend.clone())?;
    model.set_routing_override(Some(routing.clone()));
    let model = Arc::new(model);
    let mut rows = Vec::new();
    println!(
        "Decode, batch {}, {} timed steps, median of {} runs; routing replayed from {name}; hidden {}, expert FFN {}, {} layers, {} experts, top-{k}.",
        a.batch,
        a.steps,
        a.repeats,
        config.hidden_size,
        config.moe.expert_intermediate,
        config.num_layers,
        e
    );
    println!("| workers | placement | instances | planned balancedness | tok/s | MoEless/static | messages/step | KiB sent/step | KiB received/step |");
    println!("|---|---|---|---|---|---|---|---|---|");
    if a.in_process {
        eprintln!("in process: loading every expert ...");
        let local = Arc::new(LocalExperts::load_all(&ckpt, &config, backend.clone())?);
        let engine = Engine::new(model.clone(), local, Arc::new(SingleInstance));
        let mut runs = Vec::new();
        for rep in 0..a.repeats {
            runs.push(decode_run(&engine, &routing, &a, rep, None)?.0);
            eprintln!("  in process, run {}: {:.2} tok/s", rep + 1, runs[rep]);
        }
        let tps = median(runs.clone());
        println!(
            "| 0 (in process) | - | {} | - | {tps:.2} | - | - | - | - |",
            moe_layers.len() * e
        );
        rows.push(json!({"workers": 0, "placement": "in-process", "tokens_per_s": tps, "runs": runs}));
    }
    for &w in &a.workers {
        eprintln!("starting a local cluster of {w} workers ...");
        let (cluster, remote) = start_cluster(w, &dir, &config, a.shape.worker_memory_gb)?;
        let plans: Vec<(&str, Vec<ExpertInstance>)> = vec![
            ("static", cluster.plan(PlanKind::Static, 0)),
            (
                "moeless",
                policy_plan(Placement::Moeless, &spec, &loads, &cluster.worker_ids)
                    .context("planning MoEless placement")?,
            ),
        ];
        let engine = Engine::new(model.clone(), remote.clone(), remote.clone());
        let mut runs: Vec<Vec<f64>> = vec![Vec::new(); plans.len()];
        let mut traffic: Vec<(u64, u64, u64)> = vec![(0, 0, 0); plans.len()];
        for rep in 0..a.repeats {
            for (p, (policy, instances)) in plans.iter().enumerate() {
                let epoch = cluster.commit(instances.clone(), policy)?;
                anyhow::ensure!(
                    remote.wait_active(epoch, Duration::from_secs(120)),
                    "plan {epoch} ({policy}) did not become active"
                );
                // One untimed run warms every instance of the new plan.
                if rep == 0 {
                    decode_run(&engine, &routing, &a, rep, None)?;
                }
                let (tps, d) = decode_run(&engine, &routing, &a, rep, Some(remote.as_ref()))?;
                runs[p].push(tps);
                traffic[p] = (traffic[p].0 + d.0, traffic[p].1 + d.1, traffic[p].2 + d.2);
                eprintln!("  {w} workers, {policy}, run {}: {:.2} tok/s", rep + 1, runs[p][rep]);
            }
        }
        let static_tps = median(runs[0].clone());
        // Timed decode steps of every run.
        let steps_total = (a.steps * a.repeats) as f64;
        for (p, (policy, instances)) in plans.iter().enumerate() {
            let tps = median(runs[p].clone());
            let bal = balancedness(instances, &matrix, &cluster.worker_ids);
            let (m, sent, recv) = traffic[p];
            println!(
                "| {w} | {policy} | {} | {bal:.3} | {tps:.2} | {} | {:.1} | {:.1} | {:.1} |",
                instances.len(),
                if p == 0 {
                    "-".to_string()
                } else {
                    format!("{:.2}", tps / static_tps)
                },
                m as f64 / steps_total,
                sent as f64 / steps_total / 1024.0,
                recv as f64 / steps_total / 1024.0
            );
            rows.push(json!({"workers": w, "placement": policy, "instances": instances.len(),
                "planned_balancedness": bal, "tokens_per_s": tps, "ratio_to_static": tps / static_tps,
                "runs": runs[p], "messages": m, "bytes_sent": sent, "bytes_received": recv,
                "steps_counted": steps_total}));
        }
        eprintln!(
            "  dispatch: {}",
            serde_json::to_string(&remote.stats()).unwrap_or_default()
        );
        drop(engine);
        drop(remote);
        drop(cluster);
    }
    write_json(
        &a.json,
        json!({"checkpoint": dir, "trace": trace, "batch": a.batch, "steps": a.steps, "repeats": a.repeats,
        "prompt_len": a.prompt_len, "hottest_over_mean": hottest, "results": rows}),
    )
}
