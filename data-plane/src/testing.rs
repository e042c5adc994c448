//! Random-weight checkpoints in Hugging Face format, for tests (so the core suite runs where
//! the reference data is absent), benchmarks and the built-in demo model.
//!
//! The generator does not keep its own list of tensor names: it loads the model through a
//! [`TensorSource`] that invents each tensor when asked and records it, then writes what was
//! recorded. The checkpoint is therefore exactly what the loader reads.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use safetensors::Dtype;
use serde_json::{json, Value};
use shared::ExpertKey;

use crate::backend::CpuBackend;
use crate::checkpoint::{save_safetensors, RawTensor, TensorSource};
use crate::config::{Arch, ModelConfig};
use crate::error::LoadError;
use crate::expert::ExpertWeights;
use crate::model::Model;
use crate::tensor::Tensor;

/// Shape of a generated model; every architecture maps it onto its own config fields.
#[derive(Debug, Clone, Copy)]
pub struct ModelShape {
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub experts: usize,
    pub top_k: usize,
    pub expert_intermediate: usize,
    pub dense_intermediate: usize,
    pub max_positions: usize,
}

impl ModelShape {
    /// A few hundred thousand parameters: fast enough for debug-build tests.
    pub fn tiny() -> Self {
        ModelShape {
            vocab: 96,
            hidden: 32,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            experts: 8,
            top_k: 2,
            expert_intermediate: 48,
            dense_intermediate: 64,
            max_positions: 128,
        }
    }
}

/// The `config.json` a Hugging Face checkpoint of `arch` with this shape carries.
pub fn config_json(arch: Arch, s: &ModelShape) -> Value {
    let mut c = json!({
        "architectures": [arch.class_name()],
        "model_type": arch.model_type(),
        "vocab_size": s.vocab,
        "hidden_size": s.hidden,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.head_dim,
        "num_experts_per_tok": s.top_k,
        "max_position_embeddings": s.max_positions,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "bos_token_id": 1,
        "eos_token_id": null,
        "hidden_act": "silu",
        "dtype": "float32",
    });
    let extra = match arch {
        Arch::Mixtral => {
            json!({"num_local_experts": s.experts, "intermediate_size": s.expert_intermediate, "sliding_window": null})
        }
        Arch::Qwen2Moe => json!({
            "num_experts": s.experts, "moe_intermediate_size": s.expert_intermediate,
            "shared_expert_intermediate_size": s.dense_intermediate, "intermediate_size": s.dense_intermediate,
            "norm_topk_prob": false, "qkv_bias": true, "decoder_sparse_step": 1, "mlp_only_layers": []
        }),
        Arch::Qwen3Moe => json!({
            "num_experts": s.experts, "moe_intermediate_size": s.expert_intermediate,
            "intermediate_size": s.dense_intermediate, "norm_topk_prob": true, "attention_bias": false,
            "decoder_sparse_step": 1, "mlp_only_layers": []
        }),
        Arch::Olmoe => {
            json!({"num_experts": s.experts, "intermediate_size": s.expert_intermediate, "norm_topk_prob": false, "clip_qkv": null})
        }
        Arch::Phimoe => json!({
            "num_local_experts": s.experts, "intermediate_size": s.expert_intermediate, "router_jitter_noise": 0.01,
            "attention_bias": true, "lm_head_bias": true, "num_experts_per_tok": 2
        }),
        Arch::GptOss => json!({
            "num_local_experts": s.experts, "intermediate_size": s.expert_intermediate, "attention_bias": true,
            "sliding_window": 4,
            "layer_types": (0..s.layers).map(|i| if i % 2 == 0 { "sliding_attention" } else { "full_attention" }).collect::<Vec<_>>(),
            "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                              "beta_fast": 32.0, "beta_slow": 1.0, "truncate": false},
            "rope_theta": 150000.0
        }),
        Arch::DeepseekV3 => json!({
            "n_routed_experts": s.experts, "moe_intermediate_size": s.expert_intermediate,
            "intermediate_size": s.dense_intermediate, "n_group": 2, "topk_group": 1, "n_shared_experts": 1,
            "first_k_dense_replace": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": true,
            "q_lora_rank": s.hidden / 2, "kv_lora_rank": s.hidden / 4, "qk_rope_head_dim": s.head_dim,
            "qk_nope_head_dim": s.head_dim * 2, "v_head_dim": s.head_dim * 2, "rope_interleave": true,
            "num_key_value_heads": s.heads, "head_dim": s.head_dim
        }),
    };
    if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            c.insert(k.clone(), v.clone());
        }
    }
    c
}

/// Invents a deterministic tensor for every name it is asked for, and remembers it.
pub struct RandomWeights {
    seed: u64,
    made: RefCell<BTreeMap<String, Tensor>>,
}

fn name_seed(seed: u64, name: &str) -> u64 {
    // FNV-1a: stable across runs and platforms (std's hasher is not guaranteed to be).
    let mut h = 0xcbf29ce484222325u64 ^ seed;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

impl RandomWeights {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            made: RefCell::new(BTreeMap::new()),
        }
    }

    fn make(&self, name: &str, shape: &[usize]) -> Tensor {
        if let Some(t) = self.made.borrow().get(name) {
            return t.clone();
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(name_seed(self.seed, name));
        let n: usize = shape.iter().product();
        // (center, half-width of a uniform distribution)
        let (center, width) = if name.ends_with("norm.weight") {
            (1.0, 0.17)
        } else if name.ends_with("bias") {
            (0.0, 0.035)
        } else if name.ends_with("sinks") {
            (0.0, 0.9)
        } else if name.contains("embed_tokens") {
            (0.0, 1.7)
        } else {
            let fan_in = if shape.len() == 3 {
                shape[1]
            } else {
                *shape.last().unwrap_or(&1)
            };
            (0.0, 1.7 / (fan_in.max(1) as f32).sqrt())
        };
        let data: Vec<f32> = (0..n).map(|_| center + rng.gen_range(-width..=width)).collect();
        let t = Tensor::new(shape.to_vec(), data).expect("shape product matches data length");
        self.made.borrow_mut().insert(name.to_string(), t.clone());
        t
    }

    /// Everything handed out so far.
    pub fn into_tensors(self) -> BTreeMap<String, Tensor> {
        self.made.into_inner()
    }
}

impl TensorSource for RandomWeights {
    fn tensor(&self, name: &str, expected: &[usize]) -> Result<Tensor, LoadError> {
        Ok(self.make(name, expected))
    }

    fn tensor_slab(&self, name: &str, expected: &[usize], index: usize) -> Result<Tensor, LoadError> {
        let full = self.make(name, expected);
        let slab: usize = expected[1..].iter().product();
        Tensor::new(
            expected[1..].to_vec(),
            full.data()[index * slab..(index + 1) * slab].to_vec(),
        )
        .map_err(|e| LoadError::config(name, e.to_string()))
    }

    fn contains(&self, _name: &str) -> bool {
        true
    }
}

/// Element type of a written checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    Bf16,
    F16,
}

fn encode(t: &Tensor, dtype: SaveDtype) -> Vec<u8> {
    match dtype {
        SaveDtype::F32 => t.data().iter().flat_map(|v| v.to_le_bytes()).collect(),
        SaveDtype::Bf16 => t
            .data()
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        SaveDtype::F16 => t
            .data()
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
    }
}

/// Writes named f32 tensors as a safetensors file in the given element type.
pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, Tensor>, dtype: SaveDtype) -> Result<(), LoadError> {
    let dt = match dtype {
        SaveDtype::F32 => Dtype::F32,
        SaveDtype::Bf16 => Dtype::BF16,
        SaveDtype::F16 => Dtype::F16,
    };
    let raw: Vec<RawTensor> = tensors
        .iter()
        .map(|(n, t)| RawTensor {
            name: n.clone(),
            dtype: dt,
            shape: t.shape().to_vec(),
            bytes: encode(t, dtype),
        })
        .collect();
    save_safetensors(path, &raw)
}

/// Writes `config.json` and `model.safetensors` of a random-weight `arch` model into `dir`.
pub fn write_random_checkpoint(
    dir: &Path,
    arch: Arch,
    shape: &ModelShape,
    seed: u64,
    dtype: SaveDtype,
) -> Result<ModelConfig, LoadError> {
    let mut cfg_json = config_json(arch, shape);
    cfg_json["dtype"] = json!(match dtype {
        SaveDtype::F32 => "float32",
        SaveDtype::Bf16 => "bfloat16",
        SaveDtype::F16 => "float16",
    });
    let cfg = ModelConfig::from_value(&cfg_json)?;
    let src = RandomWeights::new(seed);
    Model::load(&src, cfg.clone(), Arc::new(CpuBackend))?;
    for layer in cfg.moe_layers() {
        for e in 0..cfg.moe.num_experts {
            ExpertWeights::load(&src, &cfg, ExpertKey::new(layer, e))?;
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| LoadError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let cfg_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&cfg_json).map_err(|e| LoadError::config("config.json", e.to_string()))?;
    std::fs::write(&cfg_path, text).map_err(|source| LoadError::Io { path: cfg_path, source })?;
    write_safetensors(&dir.join("model.safetensors"), &src.into_tensors(), dtype)?;
    Ok(cfg)
}
