//! `moeless forward` and `moeless generate`: the engine on a Hugging Face checkpoint.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use data_plane::checkpoint::{save_safetensors, RawTensor};
use data_plane::engine::Engine;
use data_plane::expert::UnevenSplit;
use data_plane::prompts::parse_prompts;

use super::cluster::{LocalCluster, PlanKind};

#[derive(Args, Debug)]
pub struct ModelArgs {
    /// Hugging Face checkpoint directory (config.json + model.safetensors or a sharded index).
    /// Without it, the built-in random-weight demo model is used (no meaningful text).
    #[arg(long, env = "MOELESS_MODEL")]
    pub model: Option<PathBuf>,
    /// JSON file `{"prompts": [[token ids...], ...]}`. Without it, three built-in prompts.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Spread every expert's tokens over K instances with uneven shares (exercises the
    /// expert-function seam; outputs do not change).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub experts_split: u32,
    /// Run every routed expert on N local worker processes over QUIC (0: in this process).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=64))]
    pub workers: u64,
    /// Placement of experts on the workers.
    #[arg(long, value_enum, default_value = "static")]
    pub plan: PlanKind,
    /// Memory budget of each worker for expert instances, in GiB.
    #[arg(long, default_value_t = 4.0)]
    pub worker_memory_gb: f64,
    /// Where the engine's tensor math runs: auto (GPU 0 when CUDA is usable, else CPU), cpu,
    /// cuda, cuda:N.
    #[arg(long, env = "MOELESS_DEVICE", default_value = "auto")]
    pub device: String,
}

#[derive(Args, Debug)]
pub struct ForwardArgs {
    #[command(flatten)]
    pub common: ModelArgs,
    /// Output safetensors: per prompt p and MoE layer i, `p{p}.logits`, `p{p}.expert_ids.{i}`,
    /// `p{p}.expert_weights.{i}`.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub common: ModelArgs,
    #[arg(long, default_value_t = 16)]
    pub max_new_tokens: usize,
    /// Output JSON `{"prompts": [{"prompt_ids": [...], "new_ids": [...]}]}`; stdout if omitted.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// With --workers: commit a new plan (shifted placement) before every K-th decode step and
    /// wait until it is active (0: never).
    #[arg(long, default_value_t = 0)]
    pub replan_every: usize,
    /// Fault injection with --workers: SIGKILL worker 1 before this decode step.
    #[arg(long)]
    pub kill_worker_at_step: Option<usize>,
}

/// The engine with its experts on a local cluster of worker processes.
struct Distributed {
    cluster: LocalCluster,
    remote: Arc<worker::remote::RemoteExperts>,
}

impl Distributed {
    fn report(&self) {
        eprintln!(
            "dispatch: {}",
            serde_json::to_string(&self.remote.stats()).unwrap_or_default()
        );
    }
}

fn load_distributed(args: &ModelArgs) -> anyhow::Result<(Engine, Distributed)> {
    super::bench_dp::init_logs();
    let dir = args
        .model
        .as_ref()
        .context("--workers needs --model (workers read expert weights from the checkpoint directory)")?;
    let (engine, cluster, remote) = super::cluster::distributed_engine(
        dir,
        args.workers as usize,
        args.plan,
        args.worker_memory_gb,
        select_device(args)?,
    )?;
    Ok((engine, Distributed { cluster, remote }))
}

fn select_device(args: &ModelArgs) -> anyhow::Result<Arc<dyn data_plane::backend::Backend>> {
    let d = data_plane::device::select(&args.device)?;
    eprintln!("device: {}", d.description);
    Ok(d.backend)
}

fn read_prompts(args: &ModelArgs) -> anyhow::Result<Vec<Vec<u32>>> {
    Ok(match &args.prompts {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading prompts file {}", path.display()))?;
            parse_prompts(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => ["Hello, MoEless!", "Serverless experts scale to zero.", "1 2 3"]
            .iter()
            .map(|s| s.bytes().map(u32::from).collect())
            .collect(),
    })
}

fn load_any(args: &ModelArgs) -> anyhow::Result<(Engine, Vec<Vec<u32>>, Option<Distributed>)> {
    if args.workers > 0 {
        anyhow::ensure!(
            args.experts_split == 1,
            "--experts-split applies to in-process experts; use --plan"
        );
        let prompts = read_prompts(args)?;
        let (engine, d) = load_distributed(args)?;
        return Ok((engine, prompts, Some(d)));
    }
    let (engine, prompts) = load(args)?;
    Ok((engine, prompts, None))
}

fn load(args: &ModelArgs) -> anyhow::Result<(Engine, Vec<Vec<u32>>)> {
    let prompts = read_prompts(args)?;
    let backend = select_device(args)?;
    let mut engine = match &args.model {
        Some(dir) => {
            Engine::load_local_with(dir, backend).with_context(|| format!("loading model from {}", dir.display()))?
        }
        None => {
            eprintln!(
                "no --model given: using the built-in random-weight demo model (its output is not meaningful text)"
            );
            Engine::builtin_with(backend).context("building the built-in model")?
        }
    };
    if args.experts_split > 1 {
        engine = engine.with_shares(Arc::new(UnevenSplit { k: args.experts_split }));
    }
    Ok((engine, prompts))
}

fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

pub fn forward(args: ForwardArgs) -> anyhow::Result<()> {
    let (engine, prompts, distributed) = load_any(&args.common)?;
    let out = engine
        .forward_prompts(&prompts, false)
        .context("running the forward pass")?;
    let mut tensors = Vec::new();
    for (p, f) in out.iter().enumerate() {
        tensors.push(RawTensor::f32(
            format!("p{p}.logits"),
            f.logits.shape().to_vec(),
            f.logits.data(),
        ));
        for r in &f.routing {
            let t = r.ids.len() / r.top_k;
            let ids: Vec<i64> = r.ids.iter().map(|&x| x as i64).collect();
            tensors.push(RawTensor::i64(
                format!("p{p}.expert_ids.{}", r.layer),
                vec![t, r.top_k],
                &ids,
            ));
            tensors.push(RawTensor::f32(
                format!("p{p}.expert_weights.{}", r.layer),
                vec![t, r.top_k],
                &r.weights,
            ));
        }
    }
    if let Some(d) = &distributed {
        d.report();
    }
    save_safetensors(&args.out, &tensors)?;
    eprintln!(
        "wrote {} tensors for {} prompts to {}",
        tensors.len(),
        prompts.len(),
        args.out.display()
    );
    Ok(())
}

pub fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let (engine, prompts, mut distributed) = load_any(&args.common)?;
    anyhow::ensure!(
        distributed.is_some() || (args.replan_every == 0 && args.kill_worker_at_step.is_none()),
        "--replan-every and --kill-worker-at-step need --workers"
    );
    let mut failure: Option<anyhow::Error> = None;
    let mut before_step = |step: usize| {
        let Some(d) = distributed.as_mut() else { return };
        if failure.is_some() {
            return;
        }
        let result = (|| -> anyhow::Result<()> {
            if args.kill_worker_at_step == Some(step) {
                d.cluster.kill_worker(0)?;
                eprintln!("fault injection: worker 1 killed before step {step}");
            }
            if args.replan_every > 0 && step.is_multiple_of(args.replan_every) {
                let epoch = d.cluster.commit(d.cluster.plan(args.common.plan, step), "replan")?;
                anyhow::ensure!(
                    d.remote.wait_active(epoch, std::time::Duration::from_secs(60)),
                    "plan {epoch} did not become active"
                );
            }
            Ok(())
        })();
        if let Err(e) = result {
            failure = Some(e);
        }
    };
    let gen = engine
        .generate_greedy_with(&prompts, args.max_new_tokens, &mut before_step)
        .context("generating")?;
    if let Some(e) = failure {
        return Err(e);
    }
    if let Some(d) = &distributed {
        d.report();
    }
    let items: Vec<serde_json::Value> = prompts
        .iter()
        .zip(&gen)
        .map(|(p, g)| serde_json::json!({"prompt_ids": p, "new_ids": g}))
        .collect();
    let json = serde_json::to_vec_pretty(&serde_json::json!({ "prompts": items }))?;
    match &args.out {
        Some(path) => {
            write_file(path, &json)?;
            eprintln!("generated {} sequences into {}", gen.len(), path.display());
        }
        None => println!("{}", serde_json::to_string(&serde_json::json!({ "prompts": items }))?),
    }
    Ok(())
}
