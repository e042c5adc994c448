//! Hugging Face `config.json` parsed into one normalised description of an MoE decoder.
//!
//! Each supported architecture differs in a handful of switches (norm kind, attention variant,
//! router formula, expert layout, shared experts); everything downstream reads only
//! [`ModelConfig`], never the raw JSON.

use serde_json::Value;

use crate::error::LoadError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
    Olmoe,
    DeepseekV3,
    Phimoe,
    GptOss,
}

impl Arch {
    pub const ALL: [Arch; 7] = [
        Arch::Mixtral,
        Arch::Qwen2Moe,
        Arch::Qwen3Moe,
        Arch::Olmoe,
        Arch::DeepseekV3,
        Arch::Phimoe,
        Arch::GptOss,
    ];

    /// The `model_type` string of the Hugging Face config.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Mixtral => "mixtral",
            Arch::Qwen2Moe => "qwen2_moe",
            Arch::Qwen3Moe => "qwen3_moe",
            Arch::Olmoe => "olmoe",
            Arch::DeepseekV3 => "deepseek_v3",
            Arch::Phimoe => "phimoe",
            Arch::GptOss => "gpt_oss",
        }
    }

    pub fn from_model_type(s: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.model_type() == s)
    }

    /// The `architectures[0]` class name a Hugging Face checkpoint of this arch carries.
    pub fn class_name(self) -> &'static str {
        match self {
            Arch::Mixtral => "MixtralForCausalLM",
            Arch::Qwen2Moe => "Qwen2MoeForCausalLM",
            Arch::Qwen3Moe => "Qwen3MoeForCausalLM",
            Arch::Olmoe => "OlmoeForCausalLM",
            Arch::DeepseekV3 => "DeepseekV3ForCausalLM",
            Arch::Phimoe => "PhimoeForCausalLM",
            Arch::GptOss => "GptOssForCausalLM",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    Rms,
    /// LayerNorm with weight and bias (Phi-3.5-MoE).
    Layer,
}

/// Where q/k normalisation sits, if anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// RMSNorm over each head's `head_dim` (Qwen3-MoE).
    PerHead,
    /// RMSNorm over the whole q / k projection, before splitting heads (OLMoE).
    Whole,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AttentionKind {
    /// Multi-head / grouped-query attention.
    Standard {
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: QkNorm,
        /// Per-head learned softmax sinks (GPT-OSS).
        sinks: bool,
        /// OLMoE's optional clamp of q, k and v.
        clip_qkv: Option<f32>,
    },
    /// DeepSeek multi-head latent attention.
    Mla {
        q_lora_rank: Option<usize>,
        kv_lora_rank: usize,
        qk_nope_head_dim: usize,
        qk_rope_head_dim: usize,
        v_head_dim: usize,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: f64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub truncate: bool,
    pub attention_factor: Option<f64>,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    /// Number of rotated dimensions per head.
    pub dim: usize,
    /// DeepSeek's interleaved layout: de-interleave before the rotate-half rotation.
    pub interleave: bool,
    pub yarn: Option<Yarn>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RouterKind {
    /// softmax over all experts, top-k, optionally renormalised (Mixtral always renormalises).
    SoftmaxTopK { renormalize: bool },
    /// DeepSeek-V3: sigmoid scores, correction bias for selection, group-limited top-k.
    SigmoidGrouped {
        n_group: usize,
        topk_group: usize,
        renormalize: bool,
        scaling: f32,
    },
    /// Phi-3.5-MoE's sparsemixer in inference mode (k = 2).
    SparseMixer { jitter_eps: f32 },
    /// GPT-OSS: top-k over raw logits (router has a bias), softmax over the k selected.
    TopKSoftmax,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertLayout {
    /// Separate gate/up/down `nn.Linear` per expert, `down(silu(gate x) * up x)`.
    SwiGlu,
    /// GPT-OSS fused `gate_up_proj [E, H, 2I]` (interleaved), biases, clamped activation.
    GptOssFused,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedExpert {
    None,
    /// Qwen2-MoE: one shared expert scaled by `sigmoid(x . w_sg)`.
    Gated {
        intermediate: usize,
    },
    /// DeepSeek: `n_shared_experts` fused into one ungated MLP.
    Ungated {
        intermediate: usize,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub top_k: usize,
    pub expert_intermediate: usize,
    pub router: RouterKind,
    pub router_bias: bool,
    pub layout: ExpertLayout,
    pub shared: SharedExpert,
}

/// What the feed-forward half of a decoder layer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfnKind {
    Dense { intermediate: usize },
    Moe,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub norm: NormKind,
    pub norm_eps: f32,
    pub attention: AttentionKind,
    pub rope: RopeConfig,
    /// Sliding window per decoder layer (`None`: full attention).
    pub layer_windows: Vec<Option<usize>>,
    pub layer_ffn: Vec<FfnKind>,
    pub moe: MoeConfig,
    pub tie_word_embeddings: bool,
    pub lm_head_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// Typed accessors over the raw JSON that name the missing or malformed field.
struct Fields<'a>(&'a Value);

impl Fields<'_> {
    fn raw(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }
    fn usize(&self, key: &str) -> Result<usize, LoadError> {
        let v = self.raw(key).ok_or_else(|| LoadError::config(key, "missing"))?;
        v.as_u64()
            .map(|x| x as usize)
            .ok_or_else(|| LoadError::config(key, format!("expected a non-negative integer, got {v}")))
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>, LoadError> {
        match self.raw(key) {
            None => Ok(None),
            Some(_) => self.usize(key).map(Some),
        }
    }
    fn usize_or(&self, key: &str, default: usize) -> Result<usize, LoadError> {
        Ok(self.opt_usize(key)?.unwrap_or(default))
    }
    fn f64(&self, key: &str) -> Result<f64, LoadError> {
        let v = self.raw(key).ok_or_else(|| LoadError::config(key, "missing"))?;
        v.as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| LoadError::config(key, format!("expected a finite number, got {v}")))
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>, LoadError> {
        match self.raw(key) {
            None => Ok(None),
            Some(_) => self.f64(key).map(Some),
        }
    }
    fn f64_or(&self, key: &str, default: f64) -> Result<f64, LoadError> {
        Ok(self.opt_f64(key)?.unwrap_or(default))
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool, LoadError> {
        match self.raw(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| LoadError::config(key, format!("expected a boolean, got {v}"))),
        }
    }
    fn str(&self, key: &str) -> Option<&str> {
        self.raw(key).and_then(|v| v.as_str())
    }
    fn token_ids(&self, key: &str) -> Result<Vec<u32>, LoadError> {
        match self.raw(key) {
            None => Ok(vec![]),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(|x| vec![x as u32])
                .ok_or_else(|| LoadError::config(key, "expected a token id")),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64()
                        .map(|x| x as u32)
                        .ok_or_else(|| LoadError::config(key, "expected token ids"))
                })
                .collect(),
            Some(v) => Err(LoadError::config(
                key,
                format!("expected a token id or a list, got {v}"),
            )),
        }
    }
}

impl ModelConfig {
    /// Parses the text of a Hugging Face `config.json`.
    pub fn from_json_str(text: &str) -> Result<Self, LoadError> {
        let v: Value = serde_json::from_str(text).map_err(|e| LoadError::config("config.json", e.to_string()))?;
        if !v.is_object() {
            return Err(LoadError::config("config.json", "expected a JSON object"));
        }
        Self::from_value(&v)
    }

    pub fn from_value(v: &Value) -> Result<Self, LoadError> {
        let f = Fields(v);
        let model_type = f
            .str("model_type")
            .ok_or_else(|| LoadError::config("model_type", "missing"))?;
        let arch = Arch::from_model_type(model_type).ok_or_else(|| LoadError::UnknownArchitecture {
            model_type: model_type.to_string(),
            supported: Arch::ALL.iter().map(|a| a.model_type()).collect::<Vec<_>>().join(", "),
        })?;

        let hidden_size = f.usize("hidden_size")?;
        let num_heads = f.usize("num_attention_heads")?;
        let num_layers = f.usize("num_hidden_layers")?;
        let vocab_size = f.usize("vocab_size")?;
        if num_heads == 0 || hidden_size == 0 || num_layers == 0 || vocab_size == 0 {
            return Err(LoadError::config(
                "hidden_size/num_attention_heads/num_hidden_layers/vocab_size",
                "must all be positive",
            ));
        }
        let num_kv_heads = f.usize_or("num_key_value_heads", num_heads)?;
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(LoadError::config(
                "num_key_value_heads",
                format!("{num_kv_heads} does not divide num_attention_heads {num_heads}"),
            ));
        }
        let head_dim = f.usize_or("head_dim", hidden_size / num_heads)?;
        let norm_eps = f.f64_or("rms_norm_eps", 1e-6)? as f32;
        let rope_theta = f.f64_or("rope_theta", 10000.0)?;
        let max_position_embeddings = f.usize_or("max_position_embeddings", 4096)?;

        let yarn = match f.raw("rope_scaling") {
            None => None,
            Some(rs) => {
                let r = Fields(rs);
                let ty = r.str("rope_type").or_else(|| r.str("type")).unwrap_or("default");
                match ty {
                    "default" => None,
                    "yarn" => Some(Yarn {
                        factor: r.f64("factor")?,
                        original_max_position_embeddings: r
                            .f64_or("original_max_position_embeddings", max_position_embeddings as f64)?,
                        beta_fast: r.f64_or("beta_fast", 32.0)?,
                        beta_slow: r.f64_or("beta_slow", 1.0)?,
                        truncate: r.bool_or("truncate", true)?,
                        attention_factor: r.opt_f64("attention_factor")?,
                        mscale: r.opt_f64("mscale")?,
                        mscale_all_dim: r.opt_f64("mscale_all_dim")?,
                    }),
                    other => {
                        return Err(LoadError::config(
                            "rope_scaling.rope_type",
                            format!("'{other}' is not supported (supported: default, yarn)"),
                        ))
                    }
                }
            }
        };

        let num_experts_key = match arch {
            Arch::Mixtral | Arch::Phimoe | Arch::GptOss => "num_local_experts",
            Arch::DeepseekV3 => "n_routed_experts",
            _ => "num_experts",
        };
        let num_experts = f.usize(num_experts_key)?;
        let top_k = f.usize("num_experts_per_tok")?;
        if top_k == 0 || top_k > num_experts {
            return Err(LoadError::config(
                "num_experts_per_tok",
                format!("{top_k} must be between 1 and the number of experts ({num_experts})"),
            ));
        }
        let norm_topk = f.bool_or("norm_topk_prob", false)?;

        let standard = |qkv_bias: bool, o_bias: bool, qk_norm: QkNorm, sinks: bool, clip_qkv: Option<f32>| {
            AttentionKind::Standard {
                qkv_bias,
                o_bias,
                qk_norm,
                sinks,
                clip_qkv,
            }
        };
        let sliding = f.opt_usize("sliding_window")?;
        let all_layers = |w: Option<usize>| vec![w; num_layers];
        let all_moe = vec![FfnKind::Moe; num_layers];

        let mut rope = RopeConfig {
            theta: rope_theta,
            dim: head_dim,
            interleave: false,
            yarn,
        };
        let (norm, attention, layer_windows, layer_ffn, moe);
        match arch {
            Arch::Mixtral => {
                norm = NormKind::Rms;
                attention = standard(false, false, QkNorm::None, false, None);
                layer_windows = all_layers(sliding);
                layer_ffn = all_moe;
                moe = MoeConfig {
                    num_experts,
                    top_k,
                    expert_intermediate: f.usize("intermediate_size")?,
                    router: RouterKind::SoftmaxTopK { renormalize: true },
                    router_bias: false,
                    layout: ExpertLayout::SwiGlu,
                    shared: SharedExpert::None,
                };
            }
            Arch::Qwen2Moe | Arch::Qwen3Moe => {
                norm = NormKind::Rms;
                attention = if arch == Arch::Qwen2Moe {
                    standard(f.bool_or("qkv_bias", true)?, false, QkNorm::None, false, None)
                } else {
                    let b = f.bool_or("attention_bias", false)?;
                    standard(b, b, QkNorm::PerHead, false, None)
                };
                let use_sw = f.bool_or("use_sliding_window", false)?;
                let max_window_layers = f.usize_or("max_window_layers", num_layers)?;
                layer_windows = (0..num_layers)
                    .map(|i| {
                        if use_sw && i >= max_window_layers {
                            sliding
                        } else {
                            None
                        }
                    })
                    .collect();
                let step = f.usize_or("decoder_sparse_step", 1)?.max(1);
                let mlp_only: Vec<usize> = match f.raw("mlp_only_layers") {
                    None => vec![],
                    Some(a) => serde_json::from_value(a.clone())
                        .map_err(|e| LoadError::config("mlp_only_layers", e.to_string()))?,
                };
                let dense = f.usize("intermediate_size")?;
                layer_ffn = (0..num_layers)
                    .map(|i| {
                        if !mlp_only.contains(&i) && num_experts > 0 && (i + 1) % step == 0 {
                            FfnKind::Moe
                        } else {
                            FfnKind::Dense { intermediate: dense }
                        }
                    })
                    .collect();
                moe = MoeConfig {
                    num_experts,
                    top_k,
                    expert_intermediate: f.usize("moe_intermediate_size")?,
                    router: RouterKind::SoftmaxTopK { renormalize: norm_topk },
                    router_bias: false,
                    layout: ExpertLayout::SwiGlu,
                    shared: if arch == Arch::Qwen2Moe {
                        match f.usize_or("shared_expert_intermediate_size", 0)? {
                            0 => SharedExpert::None,
                            n => SharedExpert::Gated { intermediate: n },
                        }
                    } else {
                        SharedExpert::None
                    },
                };
            }
            Arch::Olmoe => {
                norm = NormKind::Rms;
                let b = f.bool_or("attention_bias", false)?;
                attention = standard(b, b, QkNorm::Whole, false, f.opt_f64("clip_qkv")?.map(|x| x as f32));
                layer_windows = all_layers(None);
                layer_ffn = all_moe;
                moe = MoeConfig {
                    num_experts,
                    top_k,
                    expert_intermediate: f.usize("intermediate_size")?,
                    router: RouterKind::SoftmaxTopK { renormalize: norm_topk },
                    router_bias: false,
                    layout: ExpertLayout::SwiGlu,
                    shared: SharedExpert::None,
                };
            }
            Arch::Phimoe => {
                norm = NormKind::Layer;
                let b = f.bool_or("attention_bias", false)?;
                attention = standard(b, b, QkNorm::None, false, None);
                layer_windows = all_layers(sliding);
                layer_ffn = all_moe;
                if top_k != 2 {
                    return Err(LoadError::config(
                        "num_experts_per_tok",
                        "phimoe's sparsemixer requires 2",
                    ));
                }
                moe = MoeConfig {
                    num_experts,
                    top_k,
                    expert_intermediate: f.usize("intermediate_size")?,
                    router: RouterKind::SparseMixer {
                        jitter_eps: f.f64_or("router_jitter_noise", 0.01)? as f32,
                    },
                    router_bias: false,
                    layout: ExpertLayout::SwiGlu,
                    shared: SharedExpert::None,
                };
            }
            Arch::GptOss => {
                norm = NormKind::Rms;
                let b = f.bool_or("attention_bias", true)?;
                attention = standard(b, b, QkNorm::None, true, None);
                layer_windows = match f.raw("layer_types") {
                    None => all_layers(None),
                    Some(lt) => {
                        let types: Vec<String> = serde_json::from_value(lt.clone())
                            .map_err(|e| LoadError::config("layer_types", e.to_string()))?;
                        if types.len() != num_layers {
                            return Err(LoadError::config(
                                "layer_types",
                                format!("has {} entries for {num_layers} layers", types.len()),
                            ));
                        }
                        types
                            .iter()
                            .map(|t| match t.as_str() {
                                "sliding_attention" => sliding
                                    .map(Some)
                                    .ok_or_else(|| LoadError::config("sliding_window", "missing for sliding layers")),
                                "full_attention" => Ok(None),
                                other => Err(LoadError::config(
                                    "layer_types",
                                    format!("unknown layer type '{other}'"),
                                )),
                            })
                            .collect::<Result<_, _>>()?
                    }
                };
                layer_ffn = all_moe;
                moe = MoeConfig {
                    num_experts,
                    top_k,
                    expert_intermediate: f.usize("intermediate_size")?,
                    router: RouterKind::TopKSoftmax,
                    router_bias: true,
                    layout: ExpertLayout::GptOssFused,
                    shared: SharedExpert::None,
                };
            }
            Arch::DeepseekV3 => {
                norm = NormKind::Rms;
                let qk_rope_head_dim = f.usize("qk_rope_head_dim")?;
                attention = AttentionKind::Mla {
                    q_lora_rank: f.opt_usize("q_lora_rank")?,
                    kv_lora_rank: f.usize("kv_lora_rank")?,
                    qk_nope_head_dim: f.usize("qk_nope_head_dim")?,
                    qk_rope_head_dim,
                    v_head_dim: f.usize("v_head_dim")?,
                };
                rope.dim = qk_rope_head_dim;
                rope.interleave = f.bool_or("rope_interleave", true)?;
                layer_windows = all_layers(None);
                let first_dense = f.usize_or("first_k_dense_replace", 0)?;
                let dense = f.usize("intermediate_size")?;
                let moe_freq = f.usize_or("moe_layer_freq", 1)?.max(1);
                layer_ffn = (0..num_layers)
                    .map(|i| {
                        if i >= first_dense && i % moe_freq == 0 {
                            FfnKind::Moe
                        } else {
                            FfnKind::Dense { intermediate: dense }
                        }
                    })
                    .collect();
                let n_group = f.usize_or("n_group", 1)?;
                let topk_group = f.usize_or("topk_group", n_group)?;
                if n_group == 0 || num_experts % n_group != 0 || topk_group == 0 || topk_group > n_group {
                    return Err(LoadError::config(
                        "n_group/topk_group",
                        format!("{n_group} groups / {topk_group} kept do not fit {num_experts} experts"),
                    ));
                }
                if num_experts / n_group < 2 {
                    return Err(LoadError::config(
                        "n_group",
                        "group scoring needs at least 2 experts per group",
                    ));
                }
                let moe_i = f.usize("moe_intermediate_size")?;
                moe = MoeConfig {
                    num_experts,
                    top_k,
                    expert_intermediate: moe_i,
                    router: RouterKind::SigmoidGrouped {
                        n_group,
                        topk_group,
                        renormalize: norm_topk,
                        scaling: f.f64_or("routed_scaling_factor", 1.0)? as f32,
                    },
                    router_bias: false,
                    layout: ExpertLayout::SwiGlu,
                    shared: match f.usize_or("n_shared_experts", 0)? {
                        0 => SharedExpert::None,
                        n => SharedExpert::Ungated {
                            intermediate: moe_i * n,
                        },
                    },
                };
            }
        }
        if !rope.dim.is_multiple_of(2) {
            return Err(LoadError::config(
                "head_dim",
                format!("rotary dimension {} must be even", rope.dim),
            ));
        }
        Ok(ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            max_position_embeddings,
            norm,
            norm_eps,
            attention,
            rope,
            layer_windows,
            layer_ffn,
            moe,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            lm_head_bias: f.bool_or("lm_head_bias", false)?,
            bos_token_id: f.opt_usize("bos_token_id")?.map(|x| x as u32),
            eos_token_ids: f.token_ids("eos_token_id")?,
        })
    }

    /// Decoder layers whose feed-forward half is an MoE block.
    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.num_layers)
            .filter(|&i| self.layer_ffn[i] == FfnKind::Moe)
            .collect()
    }

    /// The tensor-name prefix of a layer's MoE block.
    pub fn moe_prefix(&self, layer: usize) -> String {
        match self.arch {
            Arch::Mixtral | Arch::Phimoe => format!("model.layers.{layer}.block_sparse_moe"),
            _ => format!("model.layers.{layer}.mlp"),
        }
    }

    /// Names of one routed expert's `(gate, up, down)` weights for [`ExpertLayout::SwiGlu`].
    pub fn expert_tensor_names(&self, layer: usize, expert: usize) -> [String; 3] {
        let p = format!("{}.experts.{expert}", self.moe_prefix(layer));
        match self.arch {
            Arch::Mixtral | Arch::Phimoe => [
                format!("{p}.w1.weight"),
                format!("{p}.w3.weight"),
                format!("{p}.w2.weight"),
            ],
            _ => [
                format!("{p}.gate_proj.weight"),
                format!("{p}.up_proj.weight"),
                format!("{p}.down_proj.weight"),
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_architecture_is_named() {
        let e = ModelConfig::from_json_str(r#"{"model_type": "llama"}"#).unwrap_err();
        assert!(e.to_string().contains("llama"), "{e}");
    }

    #[test]
    fn missing_field_is_named() {
        let e = ModelConfig::from_json_str(r#"{"model_type": "mixtral", "hidden_size": 8}"#).unwrap_err();
        assert!(e.to_string().contains("num_attention_heads"), "{e}");
    }

    #[test]
    fn wrong_type_is_named() {
        let e =
            ModelConfig::from_json_str(r#"{"model_type": "mixtral", "hidden_size": "big", "num_attention_heads": 2}"#)
                .unwrap_err();
        assert!(e.to_string().contains("hidden_size"), "{e}");
    }

    #[test]
    fn not_json_is_an_error() {
        assert!(ModelConfig::from_json_str("{nope").is_err());
        assert!(ModelConfig::from_json_str("[1,2]").is_err());
    }
}
