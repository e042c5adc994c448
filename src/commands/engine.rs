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
    #[arg(long, env = "MOELESS_MODEL")]
    pub model: PathBuf,
    /// JSON file `{"prompts": [[token ids...], ...]}`.
    #[arg(long)]
    pub prompts: PathBuf,
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
    /// Output JSON `{"prompts": [{"prompt_ids": [...], "new_ids": [...]}]}`.
    #[arg(long)]
    pub out: PathBuf,
}

fn load(args: &ModelArgs) -> anyhow::Result<(Engine, Vec<Vec<u32>>)> {
    let text = std::fs::read_to_string(&args.prompts)
        .with_context(|| format!("reading prompts file {}", args.prompts.display()))?;
    let prompts =
        parse_prompts(&text).with_context(|| format!("parsing {}", args.prompts.display()))?;
    let mut engine = Engine::load_local(&args.model)
        .with_context(|| format!("loading model from {}", args.model.display()))?;
    if args.experts_split > 1 {
        engine = engine.with_shares(Arc::new(UnevenSplit {
            k: args.experts_split,
        }));
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
    write_file(&args.out, &json)?;
    eprintln!(
        "generated {} sequences into {}",
        gen.len(),
        args.out.display()
    );
    Ok(())
}
