//! The engine: a loaded model plus the expert function and dispatch shares it runs with;
//! batched prompt forward passes and greedy generation with the KV cache.

use std::path::Path;
use std::sync::Arc;

use crate::backend::{Backend, CpuBackend};
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::{EngineError, LoadError};
use crate::expert::{ExpertFunction, LocalExperts, ShareSource, SingleInstance};
use crate::kv_cache::{KvCache, KvPool};
use crate::model::{BatchOutput, LayerRouting, LogitsWanted, Model, SeqInput};
use crate::tensor::Tensor;

pub struct Engine {
    model: Arc<Model>,
    experts: Arc<dyn ExpertFunction>,
    shares: Arc<dyn ShareSource>,
}

/// Full-prompt forward pass of one prompt.
#[derive(Debug)]
pub struct PromptForward {
    /// `[T, vocab]`.
    pub logits: Tensor,
    pub routing: Vec<LayerRouting>,
    /// With `capture_hidden`: embeddings, each decoder layer's raw output, and the final-normed
    /// last output (`num_layers + 2` tensors of `[T, hidden]`).
    pub hidden: Vec<Tensor>,
}

/// Seed of the built-in model's random weights.
pub const BUILTIN_SEED: u64 = 20261125;

/// Shape of the built-in model: a small Mixtral-shaped MoE with a 256-token (byte) vocabulary.
pub fn builtin_shape() -> crate::testing::ModelShape {
    crate::testing::ModelShape {
        vocab: 256,
        hidden: 64,
        layers: 4,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        experts: 8,
        top_k: 2,
        expert_intermediate: 128,
        dense_intermediate: 128,
        max_positions: 2048,
    }
}

/// Reads `config.json` of a checkpoint directory.
pub fn read_config(dir: &Path) -> Result<ModelConfig, LoadError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| LoadError::Io { path, source })?;
    ModelConfig::from_json_str(&text)
}

/// Greedy choice: the highest logit, ties to the lower token id (as `torch.argmax`).
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

fn split_routing(r: &LayerRouting, spans: &[(usize, usize)]) -> Vec<LayerRouting> {
    let k = r.top_k;
    spans
        .iter()
        .map(|&(row, n)| LayerRouting {
            layer: r.layer,
            top_k: k,
            ids: r.ids[row * k..(row + n) * k].to_vec(),
            weights: r.weights[row * k..(row + n) * k].to_vec(),
            router_logits: r.router_logits.slice_rows(row, row + n),
        })
        .collect()
}

impl Engine {
    pub fn new(model: Arc<Model>, experts: Arc<dyn ExpertFunction>, shares: Arc<dyn ShareSource>) -> Self {
        Self { model, experts, shares }
    }

    /// Loads a Hugging Face checkpoint directory with every expert in this process.
    pub fn load_local(dir: &Path) -> Result<Self, LoadError> {
        Self::load_local_with(dir, Arc::new(CpuBackend))
    }

    /// As [`Engine::load_local`], on the given backend (e.g. the CUDA backend).
    pub fn load_local_with(dir: &Path, backend: Arc<dyn Backend>) -> Result<Self, LoadError> {
        let config = read_config(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        let experts = LocalExperts::load_all(&ckpt, &config, backend.clone())?;
        let model = Model::load(&ckpt, config, backend)?;
        Ok(Self::new(Arc::new(model), Arc::new(experts), Arc::new(SingleInstance)))
    }

    /// The built-in model: a small Mixtral-shaped MoE with deterministic random weights and a
    /// 256-token (byte-level) vocabulary, built in memory. It needs no download and produces
    /// no meaningful text; it exists so every command works on a fresh machine.
    pub fn builtin() -> Result<Self, LoadError> {
        Self::builtin_with(Arc::new(CpuBackend))
    }

    /// As [`Engine::builtin`], on the given backend.
    pub fn builtin_with(backend: Arc<dyn Backend>) -> Result<Self, LoadError> {
        let config = ModelConfig::from_value(&crate::testing::config_json(
            crate::config::Arch::Mixtral,
            &builtin_shape(),
        ))?;
        let weights = crate::testing::RandomWeights::new(BUILTIN_SEED);
        let experts = LocalExperts::load_all(&weights, &config, backend.clone())?;
        let model = Model::load(&weights, config, backend)?;
        Ok(Self::new(Arc::new(model), Arc::new(experts), Arc::new(SingleInstance)))
    }

    /// Writes the built-in model as a Hugging Face checkpoint (for workers, which read expert
    /// weights from a directory); the weights are the ones [`Engine::builtin`] builds.
    pub fn write_builtin(dir: &Path) -> Result<ModelConfig, LoadError> {
        crate::testing::write_random_checkpoint(
            dir,
            crate::config::Arch::Mixtral,
            &builtin_shape(),
            BUILTIN_SEED,
            crate::testing::SaveDtype::F32,
        )
    }

    pub fn with_shares(mut self, shares: Arc<dyn ShareSource>) -> Self {
        self.shares = shares;
        self
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// The expert functions every routed expert runs through.
    pub fn experts(&self) -> &Arc<dyn ExpertFunction> {
        &self.experts
    }

    pub fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    pub fn new_cache(&self) -> KvCache {
        self.model.new_cache()
    }

    /// A shared pool of paged KV blocks for this engine's sequences (see `Model::new_kv_pool`).
    pub fn new_kv_pool(&self, block_size: usize, num_blocks: usize, prefix_caching: bool) -> Arc<KvPool> {
        self.model.new_kv_pool(block_size, num_blocks, prefix_caching)
    }

    /// One batched step: appends `tokens[i]` to `caches[i]` for every `i`.
    pub fn step(
        &self,
        caches: &mut [KvCache],
        tokens: &[&[u32]],
        wanted: LogitsWanted,
    ) -> Result<(Vec<Tensor>, Vec<LayerRouting>), EngineError> {
        let out = self.step_full(caches, tokens, wanted)?;
        Ok((out.logits, out.routing))
    }

    fn step_full(
        &self,
        caches: &mut [KvCache],
        tokens: &[&[u32]],
        wanted: LogitsWanted,
    ) -> Result<BatchOutput, EngineError> {
        let mut seqs: Vec<SeqInput<'_>> = caches
            .iter_mut()
            .zip(tokens)
            .map(|(cache, t)| SeqInput { cache, tokens: t })
            .collect();
        self.model
            .forward(&mut seqs, self.experts.as_ref(), self.shares.as_ref(), wanted)
    }

    /// Forward passes of whole prompts (no cache reuse), batched into one step.
    pub fn forward_prompts(
        &self,
        prompts: &[Vec<u32>],
        capture_hidden: bool,
    ) -> Result<Vec<PromptForward>, EngineError> {
        if prompts.is_empty() {
            return Ok(vec![]);
        }
        let mut caches: Vec<KvCache> = prompts.iter().map(|_| self.new_cache()).collect();
        let toks: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
        let wanted = if capture_hidden {
            LogitsWanted::AllWithHidden
        } else {
            LogitsWanted::All
        };
        let BatchOutput {
            logits,
            routing,
            hidden,
        } = self.step_full(&mut caches, &toks, wanted)?;
        let mut spans = Vec::new();
        let mut row = 0;
        for p in prompts {
            spans.push((row, p.len()));
            row += p.len();
        }
        let per_layer: Vec<Vec<LayerRouting>> = routing.iter().map(|r| split_routing(r, &spans)).collect();
        Ok(logits
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                let (row, n) = spans[i];
                PromptForward {
                    logits: l,
                    routing: per_layer.iter().map(|v| v[i].clone()).collect(),
                    hidden: hidden.iter().flatten().map(|h| h.slice_rows(row, row + n)).collect(),
                }
            })
            .collect())
    }

    /// Greedy decoding with the KV cache; all prompts decode together as one batch.
    /// Returns the new token ids of each prompt, stopping early at an EOS token.
    pub fn generate_greedy(&self, prompts: &[Vec<u32>], max_new_tokens: usize) -> Result<Vec<Vec<u32>>, EngineError> {
        self.generate_greedy_with(prompts, max_new_tokens, &mut |_| {})
    }

    /// [`Engine::generate_greedy`], calling `before_step(k)` before decode step `k` (1-based; the
    /// prompt pass is step 0), e.g. to change the placement plan between steps.
    pub fn generate_greedy_with(
        &self,
        prompts: &[Vec<u32>],
        max_new_tokens: usize,
        before_step: &mut dyn FnMut(usize),
    ) -> Result<Vec<Vec<u32>>, EngineError> {
        let eos = &self.model.config.eos_token_ids;
        let mut caches: Vec<KvCache> = prompts.iter().map(|_| self.new_cache()).collect();
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
        if max_new_tokens == 0 || prompts.is_empty() {
            return Ok(out);
        }
        let toks: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
        let (logits, _) = self.step(&mut caches, &toks, LogitsWanted::Last)?;
        let mut active: Vec<usize> = Vec::new();
        for (i, l) in logits.iter().enumerate() {
            let t = argmax(l.row(0));
            out[i].push(t);
            if !eos.contains(&t) && max_new_tokens > 1 {
                active.push(i);
            }
        }
        let mut step = 0;
        while !active.is_empty() {
            step += 1;
            before_step(step);
            let last: Vec<[u32; 1]> = active.iter().map(|&i| [*out[i].last().unwrap_or(&0)]).collect();
            let toks: Vec<&[u32]> = last.iter().map(|t| t.as_slice()).collect();
            // Move the active caches out so the step sees exactly the batch it runs.
            let mut batch: Vec<KvCache> = active
                .iter()
                .map(|&i| std::mem::replace(&mut caches[i], KvCache::new(0, 1, 1)))
                .collect();
            let res = self.step(&mut batch, &toks, LogitsWanted::Last);
            for (&i, c) in active.iter().zip(batch) {
                caches[i] = c;
            }
            let (logits, _) = res?;
            let mut still = Vec::new();
            for (&i, l) in active.iter().zip(&logits) {
                let t = argmax(l.row(0));
                out[i].push(t);
                if !eos.contains(&t) && out[i].len() < max_new_tokens {
                    still.push(i);
                }
            }
            active = still;
        }
        Ok(out)
    }
}
