//! Model shapes read from Hugging Face `config.json` files (`../shared/data/model-configs`).

use serde_json::Value;

use crate::SimError;

/// What the cost model needs of a MoE model. Sizes in elements; bytes use `weight_bytes`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    pub name: String,
    pub hidden: usize,
    pub num_layers: usize,
    /// Decoder-layer indices of the MoE layers.
    pub moe_layers: Vec<usize>,
    pub num_experts: usize,
    pub top_k: usize,
    /// Intermediate size of one routed expert (gated FFN: 3 matrices hidden x this).
    pub expert_intermediate: usize,
    /// Intermediate size of the dense MLP of non-MoE layers.
    pub dense_intermediate: usize,
    /// Total intermediate size of the shared experts of a MoE layer (0: none).
    pub shared_intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Per-token per-layer KV cache elements (2 x kv_heads x head_dim, or MLA's latent).
    pub kv_elems_per_token_layer: usize,
    pub vocab: usize,
    pub tied_embeddings: bool,
    /// Bytes per weight and activation element (2 for bf16).
    pub weight_bytes: usize,
}

fn get(v: &Value, keys: &[&str]) -> Option<usize> {
    keys.iter()
        .find_map(|k| v.get(*k).and_then(Value::as_u64))
        .map(|x| x as usize)
}

impl ModelShape {
    /// Parse a Hugging Face `config.json` of a MoE model (Mixtral, Qwen2/3-MoE, OLMoE,
    /// DeepSeek-V2/V3, Phi-3.5-MoE, Llama-4, ...). Missing or zero essential fields are errors.
    pub fn from_config_json(text: &str, weight_bytes: usize) -> Result<Self, SimError> {
        let v: Value = serde_json::from_str(text).map_err(|e| SimError::ModelConfig(format!("not JSON: {e}")))?;
        let v = v.get("text_config").cloned().unwrap_or(v);
        let need = |keys: &[&str]| -> Result<usize, SimError> {
            match get(&v, keys) {
                Some(x) if x > 0 => Ok(x),
                _ => Err(SimError::ModelConfig(format!(
                    "missing or zero field `{}`",
                    keys.join("` / `")
                ))),
            }
        };
        let hidden = need(&["hidden_size", "d_model"])?;
        let num_layers = need(&["num_hidden_layers", "num_layers"])?;
        let num_experts = need(&["num_local_experts", "num_experts", "n_routed_experts"])?;
        let top_k = need(&["num_experts_per_tok", "moe_topk", "top_k"])?;
        if top_k > num_experts {
            return Err(SimError::ModelConfig(format!(
                "top-k {top_k} exceeds the {num_experts} experts"
            )));
        }
        let heads = need(&["num_attention_heads"])?;
        let kv_heads = get(&v, &["num_key_value_heads"]).filter(|&x| x > 0).unwrap_or(heads);
        let head_dim = get(&v, &["head_dim"]).filter(|&x| x > 0).unwrap_or(hidden / heads);
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("").to_string();
        let inter = need(&["intermediate_size", "ffn_dim"])?;
        let expert_intermediate = get(&v, &["moe_intermediate_size"]).filter(|&x| x > 0).unwrap_or(inter);
        let dense_intermediate = get(&v, &["intermediate_size_mlp"]).unwrap_or(inter);
        // Which decoder layers are MoE.
        let moe_layers: Vec<usize> = if let Some(step) = get(&v, &["interleave_moe_layer_step"]).filter(|&s| s > 1) {
            (0..num_layers).filter(|i| (i + 1) % step == 0).collect()
        } else if let Some(k) = get(&v, &["first_k_dense_replace"]) {
            let freq = get(&v, &["moe_layer_freq"]).unwrap_or(1).max(1);
            (k..num_layers).filter(|i| i % freq == 0).collect()
        } else if let Some(step) = get(&v, &["decoder_sparse_step"]).filter(|&s| s > 1) {
            (0..num_layers).filter(|i| (i + 1) % step == 0).collect()
        } else {
            (0..num_layers).collect()
        };
        if moe_layers.is_empty() {
            return Err(SimError::ModelConfig("no MoE layers".into()));
        }
        let shared_intermediate = if model_type.starts_with("llama4") {
            expert_intermediate
        } else if let Some(n) = get(&v, &["n_shared_experts"]) {
            n * expert_intermediate
        } else {
            get(&v, &["shared_expert_intermediate_size"]).unwrap_or(0)
        };
        let kv_elems_per_token_layer = match get(&v, &["kv_lora_rank"]) {
            Some(r) => r + get(&v, &["qk_rope_head_dim"]).unwrap_or(64),
            None => 2 * kv_heads * head_dim,
        };
        let vocab = need(&["vocab_size"])?;
        let tied_embeddings = v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false);
        if weight_bytes == 0 {
            return Err(SimError::ModelConfig(
                "weight bytes per element must be at least 1".into(),
            ));
        }
        Ok(ModelShape {
            name: if model_type.is_empty() {
                "moe".into()
            } else {
                model_type
            },
            hidden,
            num_layers,
            moe_layers,
            num_experts,
            top_k,
            expert_intermediate,
            dense_intermediate,
            shared_intermediate,
            heads,
            kv_heads,
            head_dim,
            kv_elems_per_token_layer,
            vocab,
            tied_embeddings,
            weight_bytes,
        })
    }

    /// The dimensions operator times depend on, as a key for measured profiles
    /// ([`crate::gpu::MeasuredOps::shape`]).
    pub fn shape_key(&self) -> String {
        format!(
            "h{}-i{}-q{}-kv{}-d{}-e{}-k{}-b{}",
            self.hidden,
            self.expert_intermediate,
            self.heads,
            self.kv_heads,
            self.head_dim,
            self.num_experts,
            self.top_k,
            self.weight_bytes
        )
    }

    /// Bytes of one routed expert (gate, up, down).
    pub fn expert_bytes(&self) -> f64 {
        (3 * self.hidden * self.expert_intermediate * self.weight_bytes) as f64
    }

    /// Attention projection elements of one layer (q, k, v, o).
    pub fn attention_params(&self) -> usize {
        let q = self.heads * self.head_dim;
        let kv = self.kv_heads * self.head_dim;
        self.hidden * (2 * q + 2 * kv)
    }

    /// Bytes every serving GPU holds besides routed experts: embeddings, LM head, attention,
    /// routers, shared experts, dense MLPs (attention is data-parallel, so each GPU has a copy).
    pub fn non_expert_bytes(&self) -> f64 {
        let moe = self.moe_layers.len();
        let dense = self.num_layers - moe;
        let emb = self.vocab * self.hidden * if self.tied_embeddings { 1 } else { 2 };
        let params = emb
            + self.num_layers * self.attention_params()
            + moe * (self.hidden * self.num_experts + 3 * self.hidden * self.shared_intermediate)
            + dense * 3 * self.hidden * self.dense_intermediate;
        (params * self.weight_bytes) as f64
    }

    /// KV cache bytes per token (all layers).
    pub fn kv_bytes_per_token(&self) -> f64 {
        (self.num_layers * self.kv_elems_per_token_layer * self.weight_bytes) as f64
    }
}
