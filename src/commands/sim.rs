//! `moeless sim`: the cluster simulator over real arrival and routing traces.

use std::fs;
use std::io::{BufReader, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use shared::replay::PolicyKind;
use simulator::report::PolicyReport;
use simulator::routing::RoutingPool;
use simulator::{arrivals, svg, GpuProfile, GpuType, ModelShape, SimConfig};

#[derive(Args, Debug)]
pub struct SimArgs {
    /// Hugging Face `config.json` of the simulated MoE model.
    #[arg(long, env = "MOELESS_MODEL_CONFIG")]
    pub model_config: PathBuf,
    /// Routing trace: per-token top-k CSV (Llama-4 MMLU) or per-layer fractions (Qwen3; synthesised).
    #[arg(long, env = "MOELESS_ROUTING_TRACE")]
    pub routing_trace: PathBuf,
    /// Arrivals: Azure LLM 2023 CSV, Mooncake JSONL, or a ServeGen client directory (e.g.
    /// `servegen/language/m-large`: arrivals generated from its fitted per-client statistics).
    #[arg(long, env = "MOELESS_ARRIVALS")]
    pub arrivals: PathBuf,
    /// ServeGen only: second of the 14 recorded days where the simulated window starts
    /// (e.g. 72000 for 20:00 on day one).
    #[arg(long, default_value_t = 0.0)]
    pub arrivals_start: f64,
    #[arg(long, env = "MOELESS_GPUS")]
    pub gpus: usize,
    /// a6000, a100, h100 or h200.
    #[arg(long, env = "MOELESS_GPU_TYPE", required_unless_present = "device_profile")]
    pub gpu_type: Option<String>,
    /// A device profile as JSON instead of --gpu-type (the fields of `simulator::GpuProfile`;
    /// `moeless sim-validate` writes one measured on this machine as `profile.json`).
    #[arg(long, conflicts_with = "gpu_type")]
    pub device_profile: Option<PathBuf>,
    /// Run attention on one engine device per group in front of expert-only GPUs (the
    /// deployment of `moeless serve` with workers), instead of data-parallel on the GPUs.
    #[arg(long)]
    pub central_attention: bool,
    /// Comma-separated: static, eplb, moeless, oracle.
    #[arg(long, env = "MOELESS_POLICIES", default_value = "static,eplb,moeless,oracle")]
    pub policies: String,
    /// Simulated seconds of arrivals (requests finish after it).
    #[arg(long, env = "MOELESS_DURATION", allow_hyphen_values = true)]
    pub duration: f64,
    /// Replay the arrival trace this many times as fast (scaling studies).
    #[arg(long, default_value_t = 1.0)]
    pub rate_scale: f64,
    /// GPUs per expert-parallel group (default: the largest that divides GPUs and experts).
    #[arg(long)]
    pub ep_size: Option<usize>,
    /// Expert slots per GPU and MoE layer (default: 9/8 of the experts over the group).
    #[arg(long)]
    pub slots_per_gpu: Option<usize>,
    #[arg(long, default_value_t = 2048)]
    pub token_budget_per_gpu: usize,
    #[arg(long, default_value_t = 128)]
    pub max_seqs_per_gpu: usize,
    /// Bytes per weight element (2: bf16, 1: fp8).
    #[arg(long, default_value_t = 2)]
    pub weight_bytes: usize,
    #[arg(long, default_value_t = 2.0)]
    pub usd_per_gpu_hour: f64,
    #[arg(long, default_value_t = 10.0)]
    pub keep_alive_s: f64,
    /// MoEless scale-to-zero after this many idle seconds (negative: never).
    #[arg(long, default_value_t = 60.0, allow_hyphen_values = true)]
    pub scale_to_zero_after_s: f64,
    #[arg(long, default_value_t = 1000)]
    pub eplb_window: usize,
    #[arg(long, default_value_t = 3000)]
    pub eplb_interval: usize,
    /// Every N-th step carries per-token routes to count the dispatch's token copies (one per
    /// distinct GPU of a token's experts); 1: every step, 0: one copy per expert choice.
    /// Data-parallel attention only.
    #[arg(long, default_value_t = 64)]
    pub fanout_sample_every: usize,
    /// Simulate only N of the model's MoE layers, spread evenly, each standing for
    /// `MoE layers / N` of them (time, instances, memory, cold starts scaled); several times
    /// faster for long horizons and large clusters. Default: every layer (exact).
    #[arg(long, env = "MOELESS_SAMPLE_MOE_LAYERS")]
    pub sample_moe_layers: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, env = "MOELESS_OUT")]
    pub out: PathBuf,
}

pub fn run(a: SimArgs) -> Result<()> {
    let started = Instant::now();
    let profile = match (&a.gpu_type, &a.device_profile) {
        (_, Some(path)) => {
            let text =
                fs::read_to_string(path).with_context(|| format!("reading device profile {}", path.display()))?;
            GpuProfile::from_json(&text).with_context(|| format!("reading device profile {}", path.display()))?
        }
        (Some(t), None) => t.parse::<GpuType>()?.profile(),
        (None, None) => bail!("give --gpu-type or --device-profile"),
    };
    let gpu = profile.name.clone();
    let policies = a
        .policies
        .split(',')
        .map(|p| p.trim().parse::<PolicyKind>().map_err(anyhow::Error::msg))
        .collect::<Result<Vec<_>>>()?;
    let text = fs::read_to_string(&a.model_config)
        .with_context(|| format!("reading model config {}", a.model_config.display()))?;
    let model = ModelShape::from_config_json(&text, a.weight_bytes)
        .with_context(|| format!("reading model config {}", a.model_config.display()))?;
    let f = fs::File::open(&a.routing_trace)
        .with_context(|| format!("opening routing trace {}", a.routing_trace.display()))?;
    let routing = RoutingPool::read(BufReader::new(f), model.num_experts, model.top_k, a.seed)
        .with_context(|| format!("reading routing trace {}", a.routing_trace.display()))?;
    let requests = if a.arrivals.is_dir() {
        let pool = arrivals::read_servegen_dir(&a.arrivals)
            .with_context(|| format!("reading ServeGen clients {}", a.arrivals.display()))?;
        pool.generate(a.arrivals_start, a.duration, a.rate_scale, a.seed)
            .map_err(simulator::SimError::from)
            .with_context(|| format!("generating arrivals from {}", a.arrivals.display()))?
    } else {
        if a.arrivals_start != 0.0 {
            bail!("--arrivals-start applies to ServeGen directories only");
        }
        let text =
            fs::read_to_string(&a.arrivals).with_context(|| format!("reading arrivals {}", a.arrivals.display()))?;
        let all = arrivals::parse_auto(&text).with_context(|| format!("reading arrivals {}", a.arrivals.display()))?;
        arrivals::window(&all, a.duration, a.rate_scale)?
    };
    let mut cfg = SimConfig::new(a.gpus, profile);
    cfg.central_attention = a.central_attention;
    cfg.ep_size = a.ep_size;
    cfg.slots_per_gpu = a.slots_per_gpu;
    cfg.token_budget_per_gpu = a.token_budget_per_gpu;
    cfg.max_seqs_per_gpu = a.max_seqs_per_gpu;
    cfg.pricing_usd_per_gpu_hour = a.usd_per_gpu_hour;
    cfg.keep_alive_s = a.keep_alive_s;
    cfg.scale_to_zero_after_s = (a.scale_to_zero_after_s >= 0.0).then_some(a.scale_to_zero_after_s);
    cfg.eplb_window = a.eplb_window;
    cfg.eplb_interval = a.eplb_interval;
    cfg.sample_moe_layers = a.sample_moe_layers;
    cfg.seed = a.seed;
    cfg.fanout_sample_every = a.fanout_sample_every;
    cfg.sample_every_s = (a.duration / 200.0).max(1.0);
    let lay = simulator::engine::layout(&cfg, &model)?;
    eprintln!(
        "sim: {} ({} experts x {} MoE layers, top-{}), {} x {gpu}, {} group(s) of {}, {} slots/GPU/layer, \
         {} KV tokens/GPU; {} requests in {} s; routing: {} ({} queries)",
        model.name,
        model.num_experts,
        match a.sample_moe_layers.filter(|&n| n < model.moe_layers.len()) {
            Some(n) => format!("{} ({n} simulated)", model.moe_layers.len()),
            None => model.moe_layers.len().to_string(),
        },
        model.top_k,
        a.gpus,
        lay.groups,
        lay.ep_size,
        lay.slots_per_gpu,
        lay.kv_tokens_per_gpu,
        requests.len(),
        a.duration,
        routing.source,
        routing.num_queries()
    );
    let mut progress = |label: &str, t: f64, total: f64| {
        eprintln!(
            "  [{:>7.1}s wall] {label}: {:5.1}% ({t:.0}/{total:.0} simulated s)",
            started.elapsed().as_secs_f64(),
            100.0 * t / total
        );
    };
    let reports = simulator::simulate(&cfg, &model, &routing, &requests, a.duration, &policies, &mut progress)?;
    fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let summaries: Vec<_> = reports.iter().filter_map(|r| r.summary.clone()).collect();
    let report = json!({
        "config": {
            "model": model.name, "model_config": a.model_config, "routing_trace": a.routing_trace,
            "routing_source": routing.source, "arrivals": a.arrivals, "arrivals_start_s": a.arrivals_start, "gpus": a.gpus, "gpu_type": gpu, "central_attention": a.central_attention, "fanout_sample_every": a.fanout_sample_every,
            "sample_moe_layers": a.sample_moe_layers,
            "ep_size": lay.ep_size, "groups": lay.groups, "slots_per_gpu": lay.slots_per_gpu,
            "kv_tokens_per_gpu": lay.kv_tokens_per_gpu, "duration_s": a.duration, "rate_scale": a.rate_scale,
            "requests": requests.len(), "token_budget_per_gpu": a.token_budget_per_gpu,
            "weight_bytes": a.weight_bytes, "usd_per_gpu_hour": a.usd_per_gpu_hour, "seed": a.seed,
        },
        "wall_s": started.elapsed().as_secs_f64(),
        "policies": summaries,
    });
    let path = a.out.join("report.json");
    fs::write(&path, serde_json::to_string_pretty(&report)?).with_context(|| format!("writing {}", path.display()))?;
    write_plots(&a.out, &reports)?;
    let mut so = std::io::stdout().lock();
    writeln!(
        so,
        "{:<8} {:>9} {:>9} {:>9} {:>10} {:>10} {:>9} {:>12} {:>9} {:>6} {:>7}",
        "policy", "e2e_mean", "e2e_p99", "ttft_p50", "moe_mean", "moe_p99", "tok/s", "mem_GB_s", "usd", "bal", "colds"
    )?;
    for s in &summaries {
        writeln!(
            so,
            "{:<8} {:>9.3} {:>9.3} {:>9.3} {:>10.6} {:>10.6} {:>9.0} {:>12.0} {:>9.3} {:>6.3} {:>7}",
            s.policy,
            s.e2e_s.mean,
            s.e2e_s.p99,
            s.ttft_s.p50,
            s.moe_layer_time_mean_s,
            s.moe_layer_time_p99_s,
            s.throughput_tokens_per_s,
            s.cost_gpu_mem_gb_s,
            s.cost_usd,
            s.balancedness_mean,
            s.cold_starts
        )?;
    }
    eprintln!(
        "sim: wrote {} and plots in {:.1} s",
        path.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn write_plots(dir: &std::path::Path, reports: &[PolicyReport]) -> Result<()> {
    let sums: Vec<_> = reports.iter().filter_map(|r| r.summary.as_ref()).collect();
    let series = |f: &dyn Fn(&PolicyReport) -> Vec<(f64, f64)>| -> Vec<(String, Vec<(f64, f64)>)> {
        reports.iter().map(|r| (r.policy.clone(), f(r))).collect()
    };
    let files = [
        (
            "latency_cdf_e2e.svg",
            svg::line_chart(
                "E2E latency CDF",
                "seconds",
                "fraction of requests",
                &series(&|r| svg::cdf(&r.e2e_s)),
            ),
        ),
        (
            "latency_cdf_ttft.svg",
            svg::line_chart(
                "TTFT CDF",
                "seconds",
                "fraction of requests",
                &series(&|r| svg::cdf(&r.ttft_s)),
            ),
        ),
        (
            "latency_cdf_tpot.svg",
            svg::line_chart(
                "TPOT CDF",
                "seconds",
                "fraction of requests",
                &series(&|r| svg::cdf(&r.tpot_s)),
            ),
        ),
        (
            "balancedness_over_time.svg",
            svg::line_chart(
                "Balancedness over time",
                "simulated s",
                "mean/max tokens per GPU",
                &series(&|r| {
                    r.summary.as_ref().map_or_else(Vec::new, |s| {
                        s.balancedness_over_time.iter().map(|p| (p[0], p[1])).collect()
                    })
                }),
            ),
        ),
        (
            "instances_over_time.svg",
            svg::line_chart(
                "Expert instances per MoE layer (per group)",
                "simulated s",
                "instances",
                &series(&|r| {
                    r.summary.as_ref().map_or_else(Vec::new, |s| {
                        s.instances_over_time.iter().map(|p| (p[0], p[1])).collect()
                    })
                }),
            ),
        ),
        (
            "cost_breakdown.svg",
            svg::stacked_bars(
                "GPU memory held (GB-s)",
                "GB-s",
                &[
                    "non-expert weights",
                    "expert instances",
                    "KV cache in use",
                    "reserved, unused",
                ],
                &sums
                    .iter()
                    .map(|s| {
                        let used = s.mem_non_expert_gb_s + s.mem_expert_gb_s + s.mem_kv_gb_s;
                        (
                            s.policy.clone(),
                            vec![
                                s.mem_non_expert_gb_s,
                                s.mem_expert_gb_s,
                                s.mem_kv_gb_s,
                                (s.cost_gpu_mem_gb_s - used).max(0.0),
                            ],
                        )
                    })
                    .collect::<Vec<_>>(),
            ),
        ),
    ];
    for (name, body) in files {
        let p = dir.join(name);
        fs::write(&p, body).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
