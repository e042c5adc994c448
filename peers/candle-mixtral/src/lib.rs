//! Benchmark peer: candle-transformers' Mixtral on a Hugging Face checkpoint directory, on
//! candle's CPU device.
//!
//! `moeless bench engine` uses this to measure our engine side by side with candle in the same
//! run, on the same checkpoint. The crate is a workspace member but not a default member, so a
//! plain `cargo build` does not compile candle.
//!
//! # How candle's Mixtral is driven
//!
//! * `candle_transformers::models::mixtral::Model::forward(input_ids, seqlen_offset)` takes a
//!   `(batch, seq_len)` tensor and returns the logits of the *last* position, `(batch, 1, vocab)`.
//!   Batches are supported: the causal mask is broadcast over the batch and each layer keeps one
//!   KV cache `(batch, kv_heads, len, head_dim)`, concatenated along the sequence. All sequences of
//!   a batch therefore advance in lockstep and share one `seqlen_offset`; there is no padding or
//!   per-sequence length, so batched runs use equal-length prompts.
//! * The model has no public way to clear its KV cache. A pristine copy is kept and cloned for
//!   every run (the clone shares the weight storage, so it is cheap): each repetition starts with
//!   an empty cache.
//! * candle derives `head_dim = hidden_size / num_attention_heads`; checkpoints whose `head_dim`
//!   says otherwise are rejected with an error rather than silently mis-loaded.
//! * RoPE is the Hugging Face rotate-half layout, with the table built up to
//!   `max_position_embeddings`; `prompt_len + decode_steps` must fit in it.
//! * `sliding_window: null` (no sliding window) becomes `max_position_embeddings`, which never
//!   masks anything because no sequence can be longer.
//! * **bf16 does not run with candle-transformers 0.11.1** (the newest release): its
//!   `SparseMoeBlock::forward` builds the per-expert routing weights as an f32 tensor and
//!   `broadcast_mul`s them with the expert outputs, which are bf16, so every bf16 forward fails
//!   with "dtype mismatch in mul, lhs: BF16, rhs: F32". [`run_mixtral`] with
//!   [`PeerDtype::Bf16`] therefore returns that error (with this explanation attached); it is
//!   kept in the API so that a candle release with the missing `to_dtype` works unchanged.
//! * Were bf16 to run, candle builds the RoPE table in bf16 too (positions are cast to bf16
//!   before multiplying by the frequencies), so positions above 256 are rounded; fine for
//!   throughput, not for accuracy checks. f32 is the comparison this peer can make today.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::mixtral::{Config, Model};
use serde_json::{json, Value};

/// Why [`PeerDtype::Bf16`] fails with candle-transformers 0.11.1 (see the crate docs).
const BF16_CAVEAT: &str = "candle-transformers 0.11.1's Mixtral multiplies bf16 expert outputs by \
     f32 routing weights in SparseMoeBlock::forward and fails with a dtype mismatch; use f32";

/// Throughput of one measured configuration (medians over the repetitions).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeerTimings {
    /// `batch * prompt_len` / seconds of the batched prefill forward.
    pub prefill_tokens_per_s: f64,
    /// `batch * decode_steps` / seconds of all decode steps.
    pub decode_tokens_per_s: f64,
}

/// Element type candle computes in (the checkpoint is converted on load).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerDtype {
    F32,
    Bf16,
}

impl PeerDtype {
    fn candle(self) -> DType {
        match self {
            PeerDtype::F32 => DType::F32,
            PeerDtype::Bf16 => DType::BF16,
        }
    }
}

/// Loads `dir` (config.json + model.safetensors of a MixtralForCausalLM, written by our generator) with candle-transformers' Mixtral,
/// then: prefill `prompt_len` tokens for each of `batch` sequences (one batched forward with seqlen=prompt_len), then decode `decode_steps` steps
/// of one token per sequence with the KV cache (batched, batch x 1 input). Returns throughput: prefill = batch*prompt_len / prefill seconds,
/// decode = batch*decode_steps / decode seconds. Greedy (argmax) next tokens. Median of `repeats` repetitions (fresh cache each).
///
/// The prompts are deterministic pseudo-random token ids, different for every sequence. Loading
/// is not timed and there is no separate warm-up run: callers wanting one can pass one more
/// repetition (the median discards an outlier). candle's CPU kernels use all cores (rayon).
pub fn run_mixtral(
    dir: &Path,
    dtype: PeerDtype,
    batch: usize,
    prompt_len: usize,
    decode_steps: usize,
    repeats: usize,
) -> Result<PeerTimings> {
    if batch == 0 || prompt_len == 0 || repeats == 0 {
        bail!("batch, prompt_len and repeats must be positive (got {batch}, {prompt_len}, {repeats})");
    }
    let peer = Peer::load(dir, dtype.candle())?;
    peer.check_positions(prompt_len + decode_steps)?;
    let prompts: Vec<u32> = (0..batch)
        .flat_map(|b| (0..prompt_len).map(move |i| prompt_token(b, i, peer.vocab)))
        .collect();

    let mut prefill = Vec::with_capacity(repeats);
    let mut decode = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let run = peer
            .run_batch(&prompts, batch, prompt_len, decode_steps)
            .with_context(|| match dtype {
                PeerDtype::F32 => "candle Mixtral run (f32)".to_string(),
                PeerDtype::Bf16 => format!("candle Mixtral run (bf16): {BF16_CAVEAT}"),
            })?;
        prefill.push((batch * prompt_len) as f64 / run.prefill_s.max(1e-12));
        decode.push(if decode_steps == 0 {
            0.0
        } else {
            (batch * decode_steps) as f64 / run.decode_s.max(1e-12)
        });
    }
    Ok(PeerTimings {
        prefill_tokens_per_s: median(prefill),
        decode_tokens_per_s: median(decode),
    })
}

/// Greedy generation of one prompt, for a correctness cross-check against our engine (f32).
///
/// Returns only the `max_new_tokens` generated tokens (like our engine's `generate_greedy`); it
/// never stops early (no end-of-sequence handling). Ties in the argmax go to the lowest id.
pub fn greedy_mixtral(dir: &Path, prompt: &[u32], max_new_tokens: usize) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        bail!("greedy_mixtral needs a non-empty prompt");
    }
    if max_new_tokens == 0 {
        return Ok(Vec::new());
    }
    let peer = Peer::load(dir, DType::F32)?;
    peer.check_positions(prompt.len() + max_new_tokens - 1)?;
    if let Some(t) = prompt.iter().find(|&&t| t as usize >= peer.vocab) {
        bail!("prompt token {t} is outside the vocabulary ({})", peer.vocab);
    }
    let mut run = peer.run_batch(prompt, 1, prompt.len(), max_new_tokens - 1)?;
    Ok(run.tokens.swap_remove(0))
}

/// Result of [`Peer::run_batch`]: `tokens[b]` holds the `1 + decode_steps` greedy tokens of row `b`.
struct BatchRun {
    prefill_s: f64,
    decode_s: f64,
    tokens: Vec<Vec<u32>>,
}

/// A loaded model that has never run (its KV caches are empty).
struct Peer {
    model: Model,
    device: Device,
    vocab: usize,
    max_positions: usize,
}

impl Peer {
    fn load(dir: &Path, dtype: DType) -> Result<Self> {
        let device = Device::Cpu;
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?;
        let hf: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", cfg_path.display()))?;
        let cfg_json = candle_config(&hf).with_context(|| format!("{}", cfg_path.display()))?;
        let vocab = as_usize(&cfg_json, "vocab_size")?;
        let max_positions = as_usize(&cfg_json, "max_position_embeddings")?;
        let config: Config =
            serde_json::from_value(cfg_json).context("building candle-transformers' mixtral Config")?;

        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for file in safetensors_files(dir)? {
            let part = candle_core::safetensors::load(&file, &device)
                .with_context(|| format!("reading {}", file.display()))?;
            tensors.extend(part);
        }
        // candle's Mixtral always reads `lm_head.weight`; tied checkpoints do not store it.
        if !tensors.contains_key("lm_head.weight") {
            if let Some(emb) = tensors.get("model.embed_tokens.weight").cloned() {
                tensors.insert("lm_head.weight".to_string(), emb);
            }
        }
        let vb = VarBuilder::from_tensors(tensors, dtype, &device);
        let model =
            Model::new(&config, vb).with_context(|| format!("loading candle Mixtral from {}", dir.display()))?;
        Ok(Self {
            model,
            device,
            vocab,
            max_positions,
        })
    }

    /// One timed run on a fresh copy of the model: a batched prefill of `prompts`
    /// (`batch` rows of `prompt_len` ids), then `decode_steps` batched greedy steps.
    fn run_batch(&self, prompts: &[u32], batch: usize, prompt_len: usize, decode_steps: usize) -> Result<BatchRun> {
        let mut model = self.model.clone();
        let input = Tensor::from_slice(prompts, (batch, prompt_len), &self.device)?;
        let t0 = Instant::now();
        let logits = model.forward(&input, 0)?;
        let mut next = argmax_rows(&logits)?;
        let prefill_s = t0.elapsed().as_secs_f64();
        let mut tokens: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();

        let t1 = Instant::now();
        for step in 0..decode_steps {
            let input = Tensor::from_vec(next, (batch, 1), &self.device)?;
            let logits = model.forward(&input, prompt_len + step)?;
            next = argmax_rows(&logits)?;
            for (seq, &t) in tokens.iter_mut().zip(&next) {
                seq.push(t);
            }
        }
        let decode_s = t1.elapsed().as_secs_f64();
        Ok(BatchRun {
            prefill_s,
            decode_s,
            tokens,
        })
    }

    fn check_positions(&self, needed: usize) -> Result<()> {
        if needed > self.max_positions {
            bail!(
                "{needed} positions needed but candle's RoPE table has max_position_embeddings = {}",
                self.max_positions
            );
        }
        Ok(())
    }
}

/// The checkpoint's weight files: `model.safetensors`, or every `*.safetensors` shard.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no .safetensors files in {}", dir.display());
    }
    Ok(files)
}

fn as_usize(v: &Value, key: &str) -> Result<usize> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| anyhow!("config field `{key}` missing or not a non-negative integer"))
}

/// Maps a Hugging Face Mixtral `config.json` onto the fields candle's `Config` deserialises,
/// filling Hugging Face's defaults for absent optional fields.
fn candle_config(hf: &Value) -> Result<Value> {
    if let Some(mt) = hf.get("model_type").and_then(Value::as_str) {
        if mt != "mixtral" {
            bail!("model_type is `{mt}`, candle's Mixtral peer only runs `mixtral` checkpoints");
        }
    }
    let req = |k: &str| as_usize(hf, k);
    let opt_usize = |k: &str, d: usize| -> Result<usize> {
        match hf.get(k) {
            None | Some(Value::Null) => Ok(d),
            Some(_) => as_usize(hf, k),
        }
    };
    let opt_f64 = |v: Option<&Value>, d: f64| v.and_then(Value::as_f64).unwrap_or(d);

    let hidden = req("hidden_size")?;
    let heads = req("num_attention_heads")?;
    if heads == 0 || hidden % heads != 0 {
        bail!("hidden_size {hidden} is not a multiple of num_attention_heads {heads}");
    }
    if let Some(hd) = hf.get("head_dim").and_then(Value::as_u64) {
        if hd as usize != hidden / heads {
            bail!(
                "head_dim {hd} != hidden_size / num_attention_heads = {}; candle's Mixtral derives \
                 head_dim from hidden_size and cannot load this checkpoint",
                hidden / heads
            );
        }
    }
    let kv_heads = opt_usize("num_key_value_heads", heads)?;
    if kv_heads == 0 || heads % kv_heads != 0 {
        bail!("num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}");
    }
    let max_positions = opt_usize("max_position_embeddings", 4096 * 32)?;
    let sliding_window = opt_usize("sliding_window", max_positions)?;
    // Newer transformers move rope_theta into `rope_parameters`.
    let rope_theta = opt_f64(
        hf.get("rope_theta")
            .or_else(|| hf.get("rope_parameters").and_then(|r| r.get("rope_theta"))),
        1e6,
    );
    if let Some(rs) = hf.get("rope_scaling").filter(|v| !v.is_null()) {
        bail!("rope_scaling {rs} is not supported by candle's Mixtral");
    }
    let hidden_act = hf.get("hidden_act").and_then(Value::as_str).unwrap_or("silu");
    Ok(json!({
        "vocab_size": req("vocab_size")?,
        "hidden_size": hidden,
        "intermediate_size": req("intermediate_size")?,
        "num_hidden_layers": req("num_hidden_layers")?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": hidden_act,
        "max_position_embeddings": max_positions,
        "rms_norm_eps": opt_f64(hf.get("rms_norm_eps"), 1e-5),
        "rope_theta": rope_theta,
        "sliding_window": sliding_window,
        "num_experts_per_tok": opt_usize("num_experts_per_tok", 2)?,
        "num_local_experts": opt_usize("num_local_experts", 8)?,
        "use_flash_attn": false,
    }))
}

/// Argmax of each row of `(batch, 1, vocab)` logits; ties go to the lowest id.
fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    let rows = logits.squeeze(1)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    Ok(rows
        .iter()
        .map(|row| {
            let mut best = 0;
            for (i, v) in row.iter().enumerate() {
                if *v > row[best] {
                    best = i;
                }
            }
            best as u32
        })
        .collect())
}

/// Deterministic, well-spread token ids for prompt `b`, position `i`.
fn prompt_token(b: usize, i: usize, vocab: usize) -> u32 {
    let h = (b as u64)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((i as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add(1);
    let h = (h ^ (h >> 31)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((h ^ (h >> 29)) % vocab.max(1) as u64) as u32
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    /// The batched path (one forward for all rows, shared KV-cache offsets) gives every row the
    /// tokens it gets alone.
    #[test]
    fn batched_rows_match_single_rows() {
        use data_plane::testing::{write_random_checkpoint, ModelShape, SaveDtype};
        let dir = tempfile::tempdir().unwrap();
        let shape = ModelShape {
            hidden: 64,
            head_dim: 16,
            ..ModelShape::tiny()
        };
        write_random_checkpoint(
            dir.path(),
            data_plane::config::Arch::Mixtral,
            &shape,
            11,
            SaveDtype::F32,
        )
        .unwrap();
        let peer = Peer::load(dir.path(), DType::F32).unwrap();
        let (batch, len, steps) = (3, 5, 6);
        let prompts: Vec<u32> = (0..batch)
            .flat_map(|b| (0..len).map(move |i| prompt_token(b, i, shape.vocab)))
            .collect();
        let run = peer.run_batch(&prompts, batch, len, steps).unwrap();
        assert_eq!(run.tokens.len(), batch);
        for (b, row) in run.tokens.iter().enumerate() {
            let alone = greedy_mixtral(dir.path(), &prompts[b * len..(b + 1) * len], steps + 1);
            assert_eq!(row, &alone.unwrap(), "row {b}");
        }
        // Documents candle-transformers 0.11.1's bf16 Mixtral bug; if a candle upgrade makes
        // this fail, bf16 works: drop BF16_CAVEAT and check the timings instead.
        let bf16 = run_mixtral(dir.path(), PeerDtype::Bf16, 2, 4, 3, 1);
        assert!(format!("{:#}", bf16.unwrap_err()).contains("dtype mismatch"));
        assert!(run_mixtral(dir.path(), PeerDtype::F32, 1, 100, 29, 1).is_err());
    }

    #[test]
    fn config_fills_defaults_and_checks_head_dim() {
        let hf = json!({
            "model_type": "mixtral", "vocab_size": 10, "hidden_size": 64, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 4, "head_dim": 16,
            "max_position_embeddings": 32, "sliding_window": null
        });
        let c = candle_config(&hf).unwrap();
        assert_eq!(c["sliding_window"], 32);
        assert_eq!(c["num_key_value_heads"], 4);
        assert_eq!(c["hidden_act"], "silu");
        let _: Config = serde_json::from_value(c).unwrap();
        let mut bad = hf.clone();
        bad["head_dim"] = json!(8);
        assert!(candle_config(&bad).is_err());
    }
}
