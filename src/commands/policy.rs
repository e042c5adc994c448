//! `plan`, `replay` and `predict-eval`: file handling around the pure policies of `shared`.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};

use shared::eplb::{rebalance_experts, EplbShape};
use shared::plan::{static_ep, LayerPlan, LoadMatrix};
use shared::predict::{PredictorKind, PredictorParams};
use shared::replay::{moeless_plan, moeless_plan_with_threads, replay, PolicyKind, ReplayConfig, ReplayReport};
use shared::source::{load_steps, RoutingFormat, RoutingSteps, SourceOptions, Split};
use shared::trace::Phase;

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// Placement policy: static or eplb.
    #[arg(long, env = "MOELESS_POLICY")]
    pub policy: String,
    /// JSON file `{"loads": [[float; E] per layer]}`.
    #[arg(long, env = "MOELESS_LOADS")]
    pub loads: PathBuf,
    #[arg(long, env = "MOELESS_GPUS")]
    pub gpus: usize,
    #[arg(long, env = "MOELESS_SLOTS_PER_GPU")]
    pub slots_per_gpu: usize,
    /// EPLB expert groups (hierarchical policy when groups divide evenly over nodes).
    #[arg(long, env = "MOELESS_EPLB_GROUPS", default_value_t = 1)]
    pub eplb_groups: usize,
    #[arg(long, env = "MOELESS_EPLB_NODES", default_value_t = 1)]
    pub eplb_nodes: usize,
    /// Output `{"layers": [{"instances": [{"expert", "gpu", "share"}]}]}`.
    #[arg(long, env = "MOELESS_OUT")]
    pub out: PathBuf,
    /// MoEless: instances per layer at most (experts + redundant slots), when fewer than
    /// GPUs x slots.
    #[arg(long, env = "MOELESS_INSTANCE_BUDGET")]
    pub instance_budget: Option<usize>,
    /// Plan this many times and report the median and best planning time.
    #[arg(long, env = "MOELESS_REPEAT", default_value_t = 1)]
    pub repeat: usize,
    /// MoEless: threads the layers are planned on (0: every core). The plan is the same for
    /// any count; 1 times the serial planner.
    #[arg(long, env = "MOELESS_PLAN_THREADS", default_value_t = 0)]
    pub threads: usize,
}

/// Which routing file to read and how to turn it into steps.
#[derive(Args, Debug, Clone)]
pub struct TraceArgs {
    /// Routing data: a per-token trace (Llama-4 top-1 CSV, FLAME-MoE top-k CSV, vLLM route
    /// JSONL) or aggregate data that calibrates a seeded synthetic trace (expert counts,
    /// co-activation counts, Qwen3 per-layer fractions).
    #[arg(long, env = "MOELESS_TRACE")]
    pub trace: PathBuf,
    /// llama4-top1, flame-topk, vllm-jsonl, expert-counts, coactivation or layer-fractions;
    /// detected from the file name when left out.
    #[arg(long, env = "MOELESS_TRACE_FORMAT")]
    pub format: Option<String>,
    /// Routed experts of the traced model (default: 128 for llama4-top1, 64 for flame-topk,
    /// from the file otherwise).
    #[arg(long, env = "MOELESS_NUM_EXPERTS")]
    pub num_experts: Option<usize>,
    /// Aggregate data: the series to use, `model,domain,selection` (counts, co-activation) or
    /// the language (fractions); default the first in sorted order.
    #[arg(long, env = "MOELESS_TRACE_SERIES")]
    pub series: Option<String>,
    /// Aggregate data: routing top-k of the model, where the file does not say it.
    #[arg(long, env = "MOELESS_TOP_K")]
    pub top_k: Option<usize>,
    /// Aggregate data: synthetic groups of `--batch` queries.
    #[arg(long, env = "MOELESS_SYNTH_GROUPS", default_value_t = 4)]
    pub synth_groups: usize,
    /// Aggregate data: decode steps per synthetic group.
    #[arg(long, env = "MOELESS_SYNTH_STEPS", default_value_t = 100)]
    pub synth_steps: usize,
    /// Aggregate data: seed of the synthetic trace.
    #[arg(long, env = "MOELESS_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Which batches to use: `all`, or `first-half` / `second-half` of them in trace order
    /// (Llama-4 MMLU: sorted by subject, so the halves hold mostly different subjects). Tune
    /// knobs on one half and check them on the other.
    #[arg(long, env = "MOELESS_SPLIT", default_value = "all")]
    pub split: String,
}

#[derive(Args, Debug)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub source: TraceArgs,
    #[arg(long, env = "MOELESS_GPUS")]
    pub gpus: usize,
    #[arg(long, env = "MOELESS_BATCH")]
    pub batch: usize,
    /// prefill or decode.
    #[arg(long, env = "MOELESS_PHASE", default_value = "decode")]
    pub phase: String,
    /// One or more of static, eplb, moeless, oracle (comma-separated), or `all`.
    #[arg(long, env = "MOELESS_POLICY", value_delimiter = ',')]
    pub policy: Vec<String>,
    #[arg(long, env = "MOELESS_SLOTS_PER_GPU")]
    pub slots_per_gpu: usize,
    #[arg(long, env = "MOELESS_OUT")]
    pub out: PathBuf,
    /// One JSON line per (policy, step, layer) with the instances and shares used.
    #[arg(long, env = "MOELESS_DUMP_PLANS")]
    pub dump_plans: Option<PathBuf>,
    /// Write SVG plots here: balancedness over steps per policy, and per policy a heatmap of
    /// each layer's balancedness (mean/max GPU tokens) over steps.
    #[arg(long, env = "MOELESS_PLOTS")]
    pub plots: Option<PathBuf>,
    #[command(flatten)]
    pub tuning: TuningArgs,
}

/// Knobs shared by replay and predict-eval; defaults are the ones the reports use.
#[derive(Args, Debug, Clone)]
pub struct TuningArgs {
    /// Steps from deciding an instance to it being usable.
    #[arg(long, env = "MOELESS_CREATION_DELAY", default_value_t = 1)]
    pub creation_delay: usize,
    /// Steps an unneeded MoEless replica stays warm.
    #[arg(long, env = "MOELESS_KEEP_ALIVE", default_value_t = 20)]
    pub keep_alive: usize,
    /// Drop an expert's last instance after this many idle steps (default: never).
    #[arg(long, env = "MOELESS_SCALE_TO_ZERO_AFTER")]
    pub scale_to_zero_after: Option<usize>,
    /// Layer-time proxy charged per cold-start stall (token-equivalents).
    #[arg(long, env = "MOELESS_STALL_PENALTY", default_value_t = 64.0)]
    pub stall_penalty: f64,
    /// EPLB history window in steps (vLLM default 1000).
    #[arg(long, env = "MOELESS_EPLB_WINDOW", default_value_t = 1000)]
    pub eplb_window: usize,
    /// Steps between EPLB rebalances (vLLM default 3000).
    #[arg(long, env = "MOELESS_EPLB_INTERVAL", default_value_t = 3000)]
    pub eplb_interval: usize,
    /// Use a decayed history with this per-step factor instead of the window.
    #[arg(long, env = "MOELESS_EPLB_DECAY")]
    pub eplb_decay: Option<f64>,
    #[arg(long, env = "MOELESS_EPLB_GROUPS", default_value_t = 1)]
    pub eplb_groups: usize,
    #[arg(long, env = "MOELESS_EPLB_NODES", default_value_t = 1)]
    pub eplb_nodes: usize,
    /// MoEless predictor: decayed, window, temporal, affinity, combined.
    #[arg(long, env = "MOELESS_PREDICTOR", default_value = "temporal")]
    pub predictor: String,
    /// Temporal predictor: per-step factor of its decayed history, in (0, 1].
    #[arg(long, env = "MOELESS_TEMPORAL_DECAY", default_value_t = 0.9)]
    pub temporal_decay: f64,
    /// Temporal predictor: weight of the history in its mix with the previous step, in [0, 1].
    #[arg(long, env = "MOELESS_TEMPORAL_HISTORY", default_value_t = 0.3)]
    pub temporal_history: f64,
    /// MoEless dispatch shares from the layer's router output (`routed`) or the prediction.
    #[arg(long, env = "MOELESS_DISPATCH", default_value = "routed")]
    pub dispatch: String,
    /// MoEless replicates until predicted per-GPU load is within this factor of the mean.
    #[arg(long, env = "MOELESS_BALANCE_TOLERANCE", default_value_t = 1.05)]
    pub balance_tolerance: f64,
    /// MoEless spends free slots replicating experts above this predicted load per instance
    /// (0 disables), giving routed dispatch load it can move.
    #[arg(long, env = "MOELESS_FLUID_TOKENS", default_value_t = 1.0)]
    pub fluid_tokens: f64,
    /// Ablation: give static, EPLB and the oracle MoEless's min-max dispatch over routed counts
    /// instead of equal shares per replica.
    #[arg(long, env = "MOELESS_BASELINE_MIN_MAX_DISPATCH")]
    pub baseline_min_max_dispatch: bool,
    /// Ablation: MoEless without co-location of co-activated experts (replicas on the least
    /// loaded GPU, tokens matched to instances in order).
    #[arg(long, env = "MOELESS_NO_COLOCATE")]
    pub no_colocate: bool,
    /// How far above the least loaded GPU (fraction of the mean GPU load) MoEless may place a
    /// replica next to the experts its tokens also pick.
    #[arg(long, env = "MOELESS_COLOCATE_SLACK", default_value_t = 0.0)]
    pub colocate_slack: f64,
    /// Steps between MoEless re-homing co-activated experts onto shared GPUs (0: never; moves
    /// cut dispatch copies further at some cost in balance and instance loads).
    #[arg(long, env = "MOELESS_REHOME_INTERVAL", default_value_t = 0)]
    pub rehome_interval: usize,
    /// Re-homing keeps each GPU's summed expert load within this factor of the mean.
    #[arg(long, env = "MOELESS_REHOME_TOLERANCE", default_value_t = 1.0)]
    pub rehome_tolerance: f64,
}

impl TuningArgs {
    fn config(&self, gpus: usize, slots_per_gpu: usize) -> Result<ReplayConfig> {
        let mut c = ReplayConfig::new(gpus, slots_per_gpu);
        c.creation_delay = self.creation_delay;
        c.keep_alive = self.keep_alive;
        c.scale_to_zero_after = self.scale_to_zero_after;
        if !(self.stall_penalty.is_finite() && self.stall_penalty >= 0.0) {
            bail!("--stall-penalty must be finite and >= 0");
        }
        c.stall_penalty = self.stall_penalty;
        c.eplb_window = self.eplb_window;
        c.eplb_interval = self.eplb_interval;
        if let Some(d) = self.eplb_decay {
            if !(0.0..=1.0).contains(&d) {
                bail!("--eplb-decay must be within [0, 1]");
            }
        }
        c.eplb_decay = self.eplb_decay;
        c.eplb_groups = self.eplb_groups;
        c.eplb_nodes = self.eplb_nodes;
        c.predictor = self.predictor.parse().map_err(anyhow::Error::msg)?;
        c.predictor_params = PredictorParams {
            temporal_decay: self.temporal_decay,
            temporal_history: self.temporal_history,
        };
        c.predictor_params
            .check()
            .map_err(|m| anyhow::anyhow!("--temporal-decay / --temporal-history: {m}"))?;
        c.dispatch = self.dispatch.parse().map_err(anyhow::Error::msg)?;
        if !(self.colocate_slack.is_finite() && self.colocate_slack >= 0.0) {
            bail!("--colocate-slack must be finite and >= 0");
        }
        c.colocate = !self.no_colocate;
        c.colocate_slack = self.colocate_slack;
        if !(self.rehome_tolerance.is_finite() && self.rehome_tolerance >= 1.0) {
            bail!("--rehome-tolerance must be finite and >= 1");
        }
        c.rehome_interval = self.rehome_interval;
        c.rehome_tolerance = self.rehome_tolerance;
        if !(self.balance_tolerance.is_finite() && self.balance_tolerance >= 1.0) {
            bail!("--balance-tolerance must be >= 1");
        }
        c.balance_tolerance = self.balance_tolerance;
        if !(self.fluid_tokens.is_finite() && self.fluid_tokens >= 0.0) {
            bail!("--fluid-tokens must be finite and >= 0");
        }
        c.fluid_tokens = self.fluid_tokens;
        c.baseline_min_max_dispatch = self.baseline_min_max_dispatch;
        Ok(c)
    }
}

#[derive(Args, Debug)]
pub struct PredictEvalArgs {
    #[command(flatten)]
    pub source: TraceArgs,
    #[arg(long, env = "MOELESS_BATCH")]
    pub batch: usize,
    #[arg(long, env = "MOELESS_PHASE", default_value = "decode")]
    pub phase: String,
    /// GPUs and slots for the balancedness the predictors' plans reach.
    #[arg(long, env = "MOELESS_GPUS", default_value_t = 8)]
    pub gpus: usize,
    #[arg(long, env = "MOELESS_SLOTS_PER_GPU", default_value_t = 18)]
    pub slots_per_gpu: usize,
    #[arg(long, env = "MOELESS_OUT")]
    pub out: PathBuf,
    #[command(flatten)]
    pub tuning: TuningArgs,
}

/// Open the routing file in its format (given or detected) and cut it into steps.
fn read_steps(a: &TraceArgs, phase: &str, batch: usize) -> Result<RoutingSteps> {
    let path = &a.trace;
    let format = match &a.format {
        Some(f) => f.parse::<RoutingFormat>()?,
        None => {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            RoutingFormat::detect(&name).ok_or(shared::source::SourceError::Undetected(name))?
        }
    };
    let phase: Phase = phase.parse().map_err(anyhow::Error::msg)?;
    let split: Split = a.split.parse()?;
    let mut opts = SourceOptions::new(phase, batch);
    opts.num_experts = a.num_experts.or(match format {
        RoutingFormat::Llama4Top1 => Some(128),
        RoutingFormat::FlameTopK => Some(64),
        _ => None,
    });
    opts.series.clone_from(&a.series);
    opts.top_k = a.top_k;
    opts.synth_groups = a.synth_groups;
    opts.synth_steps = a.synth_steps;
    opts.seed = a.seed;
    let f = File::open(path).with_context(|| format!("opening trace {}", path.display()))?;
    let mut r = load_steps(format, BufReader::new(f), &opts)
        .with_context(|| format!("reading {} as {}", path.display(), format.label()))?;
    split.apply(&mut r.steps)?;
    eprintln!(
        "{} ({}): {} steps, {} layers, {} experts, top-{}; {}",
        path.display(),
        format.label(),
        r.steps.len(),
        r.layer_ids.len(),
        r.num_experts,
        r.top_k,
        r.description
    );
    Ok(r)
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::new(f);
    serde_json::to_writer(&mut w, v)?;
    w.write_all(b"\n")?;
    w.flush().with_context(|| format!("writing {}", path.display()))
}

fn layer_plan_json(p: &LayerPlan) -> Value {
    json!({"instances": p.instances.iter().map(|i| json!({
        "expert": i.expert, "gpu": i.gpu, "share": i.share})).collect::<Vec<_>>()})
}

pub fn plan(a: PlanArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.loads).with_context(|| format!("reading loads {}", a.loads.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing loads {} as JSON", a.loads.display()))?;
    let rows = v
        .get("loads")
        .and_then(Value::as_array)
        .context("loads file needs a `loads` array of per-layer arrays")?;
    let mut loads = Vec::with_capacity(rows.len());
    for (l, row) in rows.iter().enumerate() {
        let row = row.as_array().with_context(|| format!("loads[{l}] is not an array"))?;
        let mut r = Vec::with_capacity(row.len());
        for (e, x) in row.iter().enumerate() {
            r.push(
                x.as_f64()
                    .with_context(|| format!("loads[{l}][{e}] is not a number: {x}"))?,
            );
        }
        loads.push(r);
    }
    let loads = LoadMatrix::new(loads).context("validating loads")?;
    let policy: PolicyKind = a.policy.parse().map_err(anyhow::Error::msg)?;
    let e = loads.num_experts();
    if a.gpus == 0 || a.gpus * a.slots_per_gpu < e {
        bail!(
            "budget too small: {} GPUs x {} slots cannot hold {e} experts",
            a.gpus,
            a.slots_per_gpu
        );
    }
    let mut times = Vec::with_capacity(a.repeat.max(1));
    let mut layers: Vec<LayerPlan> = Vec::new();
    for _ in 0..a.repeat.max(1) {
        let start = Instant::now();
        layers = plan_once(&a, policy, &loads)?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    write_json(
        &a.out,
        &json!({"layers": layers.iter().map(layer_plan_json).collect::<Vec<_>>()}),
    )?;
    eprintln!(
        "planned {} layers x {e} experts on {} GPUs: median {:.3} ms, best {:.3} ms over {} runs",
        layers.len(),
        a.gpus,
        times[times.len() / 2],
        times[0],
        times.len()
    );
    Ok(())
}

fn plan_once(a: &PlanArgs, policy: PolicyKind, loads: &LoadMatrix) -> Result<Vec<LayerPlan>> {
    let e = loads.num_experts();
    Ok(match policy {
        PolicyKind::Static => {
            let p = static_ep(e, a.gpus)?;
            vec![p; loads.num_layers()]
        }
        PolicyKind::Eplb => {
            let shape = EplbShape {
                num_physical: a.gpus * a.slots_per_gpu,
                num_groups: a.eplb_groups,
                num_nodes: a.eplb_nodes,
                num_gpus: a.gpus,
            };
            (0..loads.num_layers())
                .map(|l| {
                    rebalance_experts(loads.layer(l), shape)
                        .map(|x| x.to_layer_plan())
                        .with_context(|| format!("planning layer {l}"))
                })
                .collect::<Result<_>>()?
        }
        PolicyKind::Moeless => {
            let mut cfg = ReplayConfig::new(a.gpus, a.slots_per_gpu);
            cfg.instance_budget = a.instance_budget;
            match a.threads {
                0 => moeless_plan(loads, &cfg),
                n => moeless_plan_with_threads(loads, &cfg, n),
            }
            .context("planning MoEless instances")?
            .layers
        }
        PolicyKind::Oracle => {
            bail!("`plan` supports static, eplb and moeless; the oracle needs a trace (use `replay`)")
        }
    })
}

fn parse_policies(names: &[String]) -> Result<Vec<PolicyKind>> {
    if names.is_empty() {
        bail!("--policy needs at least one of static, eplb, moeless, oracle");
    }
    let mut out = Vec::new();
    for n in names {
        if n == "all" {
            out.extend(PolicyKind::ALL);
        } else {
            out.push(n.parse().map_err(anyhow::Error::msg)?);
        }
    }
    Ok(out)
}

/// Distinct GPUs a token is sent to per layer, on average (null without routes).
fn fanout(r: &ReplayReport) -> Option<f64> {
    (r.dispatch_token_layers > 0).then(|| r.dispatch_gpu_copies as f64 / r.dispatch_token_layers as f64)
}

fn totals_json(r: &ReplayReport) -> Value {
    json!({
        "policy": r.policy,
        "steps": r.steps,
        "layers": r.layers,
        "balancedness_mean": r.balancedness_mean,
        "balancedness_fractional": r.balancedness_fractional,
        "layer_time_proxy": r.layer_time_proxy,
        "instance_slot_steps": r.instance_slot_steps,
        "instances_created": r.instances_created,
        "cold_start_stalls": r.cold_start_stalls,
        "peak_gpu_slots": r.peak_gpu_slots,
        "dispatch_gpu_copies": r.dispatch_gpu_copies,
        "dispatch_fanout_mean": fanout(r),
    })
}

pub fn run_replay(a: ReplayArgs) -> Result<()> {
    let trace = read_steps(&a.source, &a.phase, a.batch)?;
    let steps = &trace.steps;
    let policies = parse_policies(&a.policy)?;
    let mut cfg = a.tuning.config(a.gpus, a.slots_per_gpu)?;
    cfg.record_plans = a.dump_plans.is_some();
    let mut dump = match &a.dump_plans {
        Some(p) => Some(BufWriter::new(
            File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    let mut reports = Vec::new();
    let mut runs: Vec<ReplayReport> = Vec::new();
    for p in policies {
        let start = Instant::now();
        let r = replay(steps, trace.num_experts, trace.top_k, p, &cfg)
            .with_context(|| format!("replaying policy {}", p.label()))?;
        eprintln!(
            "{:8} balancedness {:.4} (fractional {:.4})  layer_time_proxy {:.0}  slot_steps {}  created {}  stalls {}  fanout {:.3}  ({:.2}s)",
            r.policy,
            r.balancedness_mean,
            r.balancedness_fractional,
            r.layer_time_proxy,
            r.instance_slot_steps,
            r.instances_created,
            r.cold_start_stalls,
            fanout(&r).unwrap_or(f64::NAN),
            start.elapsed().as_secs_f64()
        );
        if let Some(w) = dump.as_mut() {
            for (i, plan) in r.plans.iter().enumerate() {
                let line = json!({
                    "policy": r.policy,
                    "step": i / r.layers,
                    "layer": i % r.layers,
                    "instances": layer_plan_json(plan)["instances"],
                });
                serde_json::to_writer(&mut *w, &line)?;
                w.write_all(b"\n")?;
            }
        }
        let mut v = totals_json(&r);
        v["step_balancedness"] = json!(r.step_balancedness);
        v["gpu_tokens"] = json!(r.gpu_tokens);
        reports.push(v);
        runs.push(r);
    }
    if let Some(mut w) = dump {
        w.flush().context("writing the plan dump")?;
    }
    if let Some(dir) = &a.plots {
        write_plots(dir, &runs, a.gpus)?;
    }
    write_json(
        &a.out,
        &json!({
            "trace": a.source.trace.display().to_string(),
            "source": trace.description,
            "num_experts": trace.num_experts,
            "top_k": trace.top_k,
            "phase": a.phase,
            "split": a.source.split,
            "batch": a.batch,
            "gpus": a.gpus,
            "slots_per_gpu": a.slots_per_gpu,
            "layer_ids": trace.layer_ids,
            "config": format!("{cfg:?}"),
            "policies": reports,
        }),
    )
}

pub fn predict_eval(a: PredictEvalArgs) -> Result<()> {
    let trace = read_steps(&a.source, &a.phase, a.batch)?;
    let steps = &trace.steps;
    let base = a.tuning.config(a.gpus, a.slots_per_gpu)?;
    let (layers, e) = (trace.layer_ids.len(), trace.num_experts);
    let mut out = Vec::new();
    for kind in PredictorKind::ALL {
        let eval = shared::predict::evaluate(kind, &base.predictor_params, steps, layers, e, trace.top_k);
        let mut cfg = base.clone();
        cfg.predictor = kind;
        let r = replay(steps, e, trace.top_k, PolicyKind::Moeless, &cfg)?;
        eprintln!(
            "{:9} tv_error {:.4}  hot_recall {:.4}  balancedness {:.4}",
            kind.label(),
            eval.tv_error_mean,
            eval.hot_recall,
            r.balancedness_mean
        );
        out.push(json!({
            "predictor": kind.label(),
            "tv_error_mean": eval.tv_error_mean,
            "hot_recall": eval.hot_recall,
            "hot_experts": eval.hot_total,
            "balancedness_mean": r.balancedness_mean,
            "instance_slot_steps": r.instance_slot_steps,
            "instances_created": r.instances_created,
            "cold_start_stalls": r.cold_start_stalls,
        }));
    }
    write_json(
        &a.out,
        &json!({
            "trace": a.source.trace.display().to_string(),
            "source": trace.description,
            "phase": a.phase,
            "split": a.source.split,
            "batch": a.batch,
            "gpus": a.gpus,
            "slots_per_gpu": a.slots_per_gpu,
            "temporal_decay": base.predictor_params.temporal_decay,
            "temporal_history": base.predictor_params.temporal_history,
            "predictors": out,
        }),
    )
}

/// Hand-written SVG (no plotting dependency): one line chart of per-step balancedness for all
/// policies, and one heatmap per policy of layer balancedness (rows: layers, columns: steps).
fn write_plots(dir: &Path, runs: &[ReplayReport], gpus: usize) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    const COLORS: [&str; 6] = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];
    let (w, h, m) = (900.0, 400.0, 50.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" \
         font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{m}\" y=\"20\">balancedness (mean/max GPU tokens, mean over layers) per step</text>\n"
    );
    for t in [0.0, 0.25, 0.5, 0.75, 1.0] {
        let y = h - m - t * (h - 2.0 * m);
        svg += &format!(
            "<line x1=\"{m}\" x2=\"{}\" y1=\"{y}\" y2=\"{y}\" stroke=\"#ddd\"/><text x=\"10\" y=\"{}\">{t:.2}</text>\n",
            w - m,
            y + 4.0
        );
    }
    for (k, r) in runs.iter().enumerate() {
        let n = r.step_balancedness.len().max(2) - 1;
        let pts: Vec<String> = r
            .step_balancedness
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let x = m + i as f64 / n as f64 * (w - 2.0 * m);
                let y = h - m - b.clamp(0.0, 1.0) * (h - 2.0 * m);
                format!("{x:.1},{y:.1}")
            })
            .collect();
        let c = COLORS[k % COLORS.len()];
        svg += &format!(
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"1\" points=\"{}\"/>\n\
             <text x=\"{}\" y=\"{}\" fill=\"{c}\">{} ({:.3})</text>\n",
            pts.join(" "),
            w - m - 150.0,
            m + 15.0 * k as f64,
            r.policy,
            r.balancedness_mean
        );
    }
    svg += &format!("<text x=\"{}\" y=\"{}\">step</text>\n</svg>\n", w / 2.0, h - 15.0);
    let path = dir.join("balancedness_over_steps.svg");
    std::fs::write(&path, svg).with_context(|| format!("writing {}", path.display()))?;

    for r in runs {
        let (steps, layers) = (r.gpu_tokens.len(), r.layers);
        let cw = (800.0 / steps.max(1) as f64).max(0.5);
        let ch = 12.0;
        let (pw, ph) = (m + cw * steps as f64 + 20.0, 40.0 + ch * layers as f64 + 30.0);
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{pw:.0}\" height=\"{ph:.0}\" \
             font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"{m}\" y=\"20\">{}: layer balancedness per step (dark = max GPU far above mean)</text>\n",
            r.policy
        );
        for l in 0..layers {
            let y = 30.0 + ch * l as f64;
            svg += &format!("<text x=\"5\" y=\"{:.1}\">L{l}</text>\n", y + ch - 2.0);
            for (t, per_layer) in r.gpu_tokens.iter().enumerate() {
                let g = &per_layer[l];
                let total: u32 = g.iter().sum();
                let max = g.iter().copied().max().unwrap_or(0);
                let b = if max == 0 {
                    1.0
                } else {
                    f64::from(total) / gpus as f64 / f64::from(max)
                };
                let v = (255.0 * b.clamp(0.0, 1.0)) as u8;
                svg += &format!(
                    "<rect x=\"{:.2}\" y=\"{y:.1}\" width=\"{:.2}\" height=\"{ch}\" fill=\"rgb(255,{v},{v})\"/>\n",
                    m + cw * t as f64,
                    cw + 0.05
                );
            }
        }
        svg += "</svg>\n";
        let path = dir.join(format!("layer_heatmap_{}.svg", r.policy));
        std::fs::write(&path, svg).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
