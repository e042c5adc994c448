//! `moeless forward` and `moeless generate`: the engine on a Hugging Face checkpoint.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use data_plane::checkpoint::{save_safetensors, RawTensor};
use data_plane::engine::Engine;
use data_plane::expert::UnevenSplit;
use data_plane::prompts::parse_prompts;

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
}

fn load(args: &ModelArgs) -> anyhow::Result<(Engine, Vec<Vec<u32>>)> {
    let prompts = match &args.prompts {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading prompts file {}", path.display()))?;
            parse_prompts(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => ["Hello, MoEless!", "Serverless experts scale to zero.", "1 2 3"]
            .iter()
            .map(|s| s.bytes().map(u32::from).collect())
            .collect(),
    };
    let mut engine = match &args.model {
        Some(dir) => Engine::load_local(dir).with_context(|| format!("loading model from {}", dir.display()))?,
        None => {
            eprintln!(
                "no --model given: using the built-in random-weight demo model (its output is not meaningful text)"
            );
            Engine::builtin().context("building the built-in model")?
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
    let (engine, prompts) = load(&args.common)?;
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
    let (engine, prompts) = load(&args.common)?;
    let gen = engine
        .generate_greedy(&prompts, args.max_new_tokens)
        .context("generating")?;
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
