//! One decoder definition for every supported MoE architecture.
//!
//! The model owns everything except the routed experts: embeddings, attention, norms,
//! routers, shared experts and dense layers. Routed experts are reached only through the
//! [`ExpertFunction`] seam, so they can live in other processes.

use std::sync::Arc;

use shared::colocate::{Assignment, TokenAssigner};
use shared::{ExpertKey, InstanceId};

use crate::backend::{AttentionShape, Backend};
use crate::checkpoint::TensorSource;
use crate::config::{AttentionKind, FfnKind, ModelConfig, NormKind, QkNorm, RouterKind, SharedExpert};
use crate::error::{EngineError, LoadError};
use crate::expert::{split_counts, ExpertFunction, ExpertTask, ShareSource};
use crate::kv_cache::{KvCache, KvPool, KvPoolConfig};
use crate::rope::{yarn_mscale, Rope};
use crate::tensor::Tensor;
use crate::weight::Weight;

#[derive(Debug)]
struct Norm {
    w: Tensor,
    b: Option<Tensor>,
    eps: f32,
}

impl Norm {
    fn load(ckpt: &dyn TensorSource, prefix: &str, dim: usize, kind: NormKind, eps: f32) -> Result<Self, LoadError> {
        Ok(Norm {
            w: ckpt.tensor(&format!("{prefix}.weight"), &[dim])?,
            b: match kind {
                NormKind::Rms => None,
                NormKind::Layer => Some(ckpt.tensor(&format!("{prefix}.bias"), &[dim])?),
            },
            eps,
        })
    }

    fn apply(&self, be: &dyn Backend, x: &Tensor) -> Tensor {
        match &self.b {
            None => be.rms_norm(x, &self.w, self.eps),
            Some(b) => be.layer_norm(x, &self.w, b, self.eps),
        }
    }
}

#[derive(Debug)]
struct Linear {
    w: Weight,
    b: Option<Tensor>,
}

impl Linear {
    fn load(ckpt: &dyn TensorSource, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Self, LoadError> {
        Ok(Linear {
            w: ckpt.weight(&format!("{prefix}.weight"), &[out, inp])?,
            b: if bias {
                Some(ckpt.tensor(&format!("{prefix}.bias"), &[out])?)
            } else {
                None
            },
        })
    }

    fn apply(&self, be: &dyn Backend, x: &Tensor) -> Tensor {
        be.linear(x, &self.w, self.b.as_ref())
    }
}

/// A gated MLP `down(silu(gate x) * up x)`: dense layers and shared experts.
#[derive(Debug)]
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn load(ckpt: &dyn TensorSource, prefix: &str, hidden: usize, inter: usize) -> Result<Self, LoadError> {
        Ok(Mlp {
            gate: Linear::load(ckpt, &format!("{prefix}.gate_proj"), inter, hidden, false)?,
            up: Linear::load(ckpt, &format!("{prefix}.up_proj"), inter, hidden, false)?,
            down: Linear::load(ckpt, &format!("{prefix}.down_proj"), hidden, inter, false)?,
        })
    }

    fn apply(&self, be: &dyn Backend, x: &Tensor) -> Tensor {
        match (&self.gate.b, &self.up.b, &self.down.b) {
            (None, None, None) => be.swiglu_ffn(x, &self.gate.w, &self.up.w, &self.down.w),
            _ => {
                let a = be.silu_mul(&self.gate.apply(be, x), &self.up.apply(be, x));
                self.down.apply(be, &a)
            }
        }
    }
}

#[derive(Debug)]
struct StandardAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    qk_norm: QkNorm,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    sinks: Option<Tensor>,
    clip_qkv: Option<f32>,
}

#[derive(Debug)]
struct MlaAttention {
    /// Either `q_proj` (no q LoRA) or `q_b_proj(q_a_layernorm(q_a_proj x))`.
    q_a: Option<(Linear, Norm)>,
    q_b: Linear,
    kv_a: Linear,
    kv_a_norm: Norm,
    kv_b: Linear,
    o: Linear,
    kv_lora_rank: usize,
    nope: usize,
    rope_dim: usize,
    v_dim: usize,
}

#[derive(Debug)]
enum Attention {
    Standard(StandardAttention),
    Mla(MlaAttention),
}

#[derive(Debug)]
struct MoeBlock {
    router: Linear,
    correction_bias: Option<Tensor>,
    shared: Option<Mlp>,
    shared_gate: Option<Linear>,
}

#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per layer, built once
enum Ffn {
    Dense(Mlp),
    Moe(MoeBlock),
}

#[derive(Debug)]
struct Layer {
    input_norm: Norm,
    attn: Attention,
    post_norm: Norm,
    ffn: Ffn,
    window: Option<usize>,
}

/// The routing decisions of one MoE layer for a batch, in canonical order (descending
/// selection score, ties to the lower expert id).
#[derive(Debug, Clone)]
pub struct LayerRouting {
    /// Decoder layer index.
    pub layer: usize,
    pub top_k: usize,
    /// `[tokens * top_k]`.
    pub ids: Vec<u32>,
    /// `[tokens * top_k]`, the combine weights as applied.
    pub weights: Vec<f32>,
    /// `[tokens, experts]` raw router logits.
    pub router_logits: Tensor,
}

/// What a forward pass over a batch returns.
#[derive(Debug)]
pub struct BatchOutput {
    /// Per sequence: `[t, vocab]` (all new positions) or `[1, vocab]` (last position only).
    pub logits: Vec<Tensor>,
    /// Per MoE layer, rows concatenated in sequence order.
    pub routing: Vec<LayerRouting>,
    /// When asked for: the embeddings, the raw output of every decoder layer, then the
    /// final-normed last layer output (`num_layers + 2` tensors of `[rows, hidden]`).
    pub hidden: Option<Vec<Tensor>>,
}

/// One sequence's part of a batch: its cache and the tokens appended this step.
pub struct SeqInput<'a> {
    pub cache: &'a mut KvCache,
    pub tokens: &'a [u32],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    All,
    Last,
    /// All positions, and every layer's hidden states too (for parity checks).
    AllWithHidden,
}

#[derive(Debug)]
pub struct Model {
    pub config: ModelConfig,
    backend: Arc<dyn Backend>,
    embed: Tensor,
    layers: Vec<Layer>,
    final_norm: Norm,
    lm_head: Linear,
    rope: Rope,
    attn_scale: f32,
    routing_override: Option<Arc<dyn RoutingOverride>>,
}

/// One sequence's rows in a batch: `(first row, rows, position of the first row)`.
pub type RowSpan = (usize, usize, usize);

/// Forces the experts a MoE layer routes to (trace replay in benchmarks and the simulator's
/// validation): when it answers, its ids replace the router's top-k and every chosen expert
/// gets the combine weight `1 / k`.
pub trait RoutingOverride: Send + Sync + std::fmt::Debug {
    /// The `k` expert ids of each row at decoder layer `layer` (`rows * k` ids, row-major; ids
    /// are taken modulo the layer's expert count), or `None` to keep the router. `spans` says
    /// which rows belong to which sequence of the batch, in row order.
    fn route(&self, layer: usize, spans: &[RowSpan], k: usize) -> Option<Vec<u32>>;
}

fn top_k_desc(scores: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

fn softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Routes one token: returns `(ids, weights)` in canonical order (ties go to the lower id).
/// Public so the GPU router kernels can be checked against it.
pub fn route(router: &RouterKind, k: usize, logits: &[f32], correction_bias: Option<&[f32]>) -> (Vec<usize>, Vec<f32>) {
    match router {
        RouterKind::SoftmaxTopK { renormalize } => {
            let p = softmax(logits);
            let ids = top_k_desc(&p, k);
            let mut w: Vec<f32> = ids.iter().map(|&i| p[i]).collect();
            if *renormalize {
                let s: f32 = w.iter().sum();
                w.iter_mut().for_each(|x| *x /= s);
            }
            (ids, w)
        }
        RouterKind::SigmoidGrouped {
            n_group,
            topk_group,
            renormalize,
            scaling,
        } => {
            let s: Vec<f32> = logits.iter().map(|&l| sigmoid(l)).collect();
            let mut c: Vec<f32> = match correction_bias {
                Some(b) => s.iter().zip(b).map(|(x, y)| x + y).collect(),
                None => s.clone(),
            };
            let per = logits.len() / n_group;
            let group_scores: Vec<f32> = (0..*n_group)
                .map(|g| {
                    let grp = &c[g * per..(g + 1) * per];
                    top_k_desc(grp, 2).iter().map(|&i| grp[i]).sum()
                })
                .collect();
            let keep = top_k_desc(&group_scores, *topk_group);
            for g in 0..*n_group {
                if !keep.contains(&g) {
                    c[g * per..(g + 1) * per].iter_mut().for_each(|x| *x = 0.0);
                }
            }
            let ids = top_k_desc(&c, k);
            let mut w: Vec<f32> = ids.iter().map(|&i| s[i]).collect();
            if *renormalize {
                let sum: f32 = w.iter().sum::<f32>() + 1e-20;
                w.iter_mut().for_each(|x| *x /= sum);
            }
            w.iter_mut().for_each(|x| *x *= scaling);
            (ids, w)
        }
        RouterKind::SparseMixer { jitter_eps } => {
            let thr = 2.0 * jitter_eps;
            let slot = |masked: &[f32]| -> (usize, f32) {
                let i = top_k_desc(masked, 1)[0];
                let m = masked[i];
                let gated: Vec<f32> = masked
                    .iter()
                    .zip(logits)
                    .map(|(&mv, &l)| {
                        let factor = l.abs().max(m);
                        if (m - l) / factor > thr {
                            f32::NEG_INFINITY
                        } else {
                            mv
                        }
                    })
                    .collect();
                (i, softmax(&gated)[i])
            };
            let (i1, w1) = slot(logits);
            let mut second = logits.to_vec();
            second[i1] = f32::NEG_INFINITY;
            let (i2, w2) = slot(&second);
            (vec![i1, i2], vec![w1, w2])
        }
        RouterKind::TopKSoftmax => {
            let ids = top_k_desc(logits, k);
            let vals: Vec<f32> = ids.iter().map(|&i| logits[i]).collect();
            (ids, softmax(&vals))
        }
    }
}

impl Model {
    /// Loads everything but the routed experts from a checkpoint.
    pub fn load(ckpt: &dyn TensorSource, config: ModelConfig, backend: Arc<dyn Backend>) -> Result<Self, LoadError> {
        let c = &config;
        let (h, v) = (c.hidden_size, c.vocab_size);
        let embed = ckpt.tensor("model.embed_tokens.weight", &[v, h])?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let attn = match &c.attention {
                AttentionKind::Standard {
                    qkv_bias,
                    o_bias,
                    qk_norm,
                    sinks,
                    clip_qkv,
                } => {
                    let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
                    let a = format!("{p}.self_attn");
                    let (qn, kn) = match qk_norm {
                        QkNorm::None => (None, None),
                        QkNorm::PerHead => (
                            Some(ckpt.tensor(&format!("{a}.q_norm.weight"), &[c.head_dim])?),
                            Some(ckpt.tensor(&format!("{a}.k_norm.weight"), &[c.head_dim])?),
                        ),
                        QkNorm::Whole => (
                            Some(ckpt.tensor(&format!("{a}.q_norm.weight"), &[qd])?),
                            Some(ckpt.tensor(&format!("{a}.k_norm.weight"), &[kvd])?),
                        ),
                    };
                    Attention::Standard(StandardAttention {
                        q: Linear::load(ckpt, &format!("{a}.q_proj"), qd, h, *qkv_bias)?,
                        k: Linear::load(ckpt, &format!("{a}.k_proj"), kvd, h, *qkv_bias)?,
                        v: Linear::load(ckpt, &format!("{a}.v_proj"), kvd, h, *qkv_bias)?,
                        o: Linear::load(ckpt, &format!("{a}.o_proj"), h, qd, *o_bias)?,
                        qk_norm: *qk_norm,
                        q_norm: qn,
                        k_norm: kn,
                        sinks: if *sinks {
                            Some(ckpt.tensor(&format!("{a}.sinks"), &[c.num_heads])?)
                        } else {
                            None
                        },
                        clip_qkv: *clip_qkv,
                    })
                }
                AttentionKind::Mla {
                    q_lora_rank,
                    kv_lora_rank,
                    qk_nope_head_dim,
                    qk_rope_head_dim,
                    v_head_dim,
                } => {
                    let a = format!("{p}.self_attn");
                    let nh = c.num_heads;
                    let qk = qk_nope_head_dim + qk_rope_head_dim;
                    let (q_a, q_b) = match q_lora_rank {
                        Some(r) => (
                            Some((
                                Linear::load(ckpt, &format!("{a}.q_a_proj"), *r, h, false)?,
                                Norm::load(ckpt, &format!("{a}.q_a_layernorm"), *r, NormKind::Rms, c.norm_eps)?,
                            )),
                            Linear::load(ckpt, &format!("{a}.q_b_proj"), nh * qk, *r, false)?,
                        ),
                        None => (None, Linear::load(ckpt, &format!("{a}.q_proj"), nh * qk, h, false)?),
                    };
                    Attention::Mla(MlaAttention {
                        q_a,
                        q_b,
                        kv_a: Linear::load(
                            ckpt,
                            &format!("{a}.kv_a_proj_with_mqa"),
                            kv_lora_rank + qk_rope_head_dim,
                            h,
                            false,
                        )?,
                        kv_a_norm: Norm::load(
                            ckpt,
                            &format!("{a}.kv_a_layernorm"),
                            *kv_lora_rank,
                            NormKind::Rms,
                            c.norm_eps,
                        )?,
                        kv_b: Linear::load(
                            ckpt,
                            &format!("{a}.kv_b_proj"),
                            nh * (qk_nope_head_dim + v_head_dim),
                            *kv_lora_rank,
                            false,
                        )?,
                        o: Linear::load(ckpt, &format!("{a}.o_proj"), h, nh * v_head_dim, false)?,
                        kv_lora_rank: *kv_lora_rank,
                        nope: *qk_nope_head_dim,
                        rope_dim: *qk_rope_head_dim,
                        v_dim: *v_head_dim,
                    })
                }
            };
            let ffn = match c.layer_ffn[i] {
                FfnKind::Dense { intermediate } => Ffn::Dense(Mlp::load(ckpt, &format!("{p}.mlp"), h, intermediate)?),
                FfnKind::Moe => {
                    let mp = c.moe_prefix(i);
                    let e = c.moe.num_experts;
                    let router_name = if c.moe.router == RouterKind::TopKSoftmax {
                        format!("{mp}.router")
                    } else {
                        format!("{mp}.gate")
                    };
                    let (shared, shared_gate) = match c.moe.shared {
                        SharedExpert::None => (None, None),
                        SharedExpert::Gated { intermediate } => (
                            Some(Mlp::load(ckpt, &format!("{mp}.shared_expert"), h, intermediate)?),
                            Some(Linear::load(ckpt, &format!("{mp}.shared_expert_gate"), 1, h, false)?),
                        ),
                        SharedExpert::Ungated { intermediate } => (
                            Some(Mlp::load(ckpt, &format!("{mp}.shared_experts"), h, intermediate)?),
                            None,
                        ),
                    };
                    Ffn::Moe(MoeBlock {
                        router: Linear::load(ckpt, &router_name, e, h, c.moe.router_bias)?,
                        correction_bias: match c.moe.router {
                            RouterKind::SigmoidGrouped { .. } => {
                                ckpt.optional(&format!("{mp}.gate.e_score_correction_bias"), &[e])?
                            }
                            _ => None,
                        },
                        shared,
                        shared_gate,
                    })
                }
            };
            layers.push(Layer {
                input_norm: Norm::load(ckpt, &format!("{p}.input_layernorm"), h, c.norm, c.norm_eps)?,
                attn,
                post_norm: Norm::load(ckpt, &format!("{p}.post_attention_layernorm"), h, c.norm, c.norm_eps)?,
                ffn,
                window: c.layer_windows[i],
            });
        }
        let final_norm = Norm::load(ckpt, "model.norm", h, c.norm, c.norm_eps)?;
        let lm_head = if c.tie_word_embeddings && !ckpt.contains("lm_head.weight") {
            Linear {
                w: Weight::F32(embed.clone()),
                b: None,
            }
        } else {
            Linear::load(ckpt, "lm_head", v, h, c.lm_head_bias)?
        };
        let rope = Rope::new(&c.rope);
        let attn_scale = match &c.attention {
            AttentionKind::Standard { .. } => (c.head_dim as f32).powf(-0.5),
            AttentionKind::Mla {
                qk_nope_head_dim,
                qk_rope_head_dim,
                ..
            } => {
                let mut s = ((qk_nope_head_dim + qk_rope_head_dim) as f64).powf(-0.5);
                if let Some(y) = &c.rope.yarn {
                    if let Some(m) = y.mscale_all_dim.filter(|m| *m != 0.0) {
                        let ms = yarn_mscale(y.factor, m);
                        s *= ms * ms;
                    }
                }
                s as f32
            }
        };
        Ok(Model {
            config,
            backend,
            embed,
            layers,
            final_norm,
            lm_head,
            rope,
            attn_scale,
            routing_override: None,
        })
    }

    /// Replaces routing by `o` (trace replay); `None` (the default) routes by the router.
    pub fn set_routing_override(&mut self, o: Option<Arc<dyn RoutingOverride>>) {
        self.routing_override = o;
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// A fresh KV cache shaped for this model.
    pub fn new_cache(&self) -> KvCache {
        let (k_dim, v_dim, heads) = self.kv_geometry();
        KvCache::new(self.config.num_layers, heads * k_dim, heads * v_dim)
    }

    /// A pool of `num_blocks` KV blocks of `block_size` positions shaped for this model; its
    /// caches (`KvPool::new_cache`) run through `forward` like owned ones.
    pub fn new_kv_pool(&self, block_size: usize, num_blocks: usize, prefix_caching: bool) -> Arc<KvPool> {
        let (k_dim, v_dim, heads) = self.kv_geometry();
        KvPool::new(KvPoolConfig {
            num_layers: self.config.num_layers,
            k_width: heads * k_dim,
            v_width: heads * v_dim,
            block_size,
            num_blocks,
            prefix_caching,
        })
    }

    /// `(key dim per head, value dim per head, cached heads)`.
    fn kv_geometry(&self) -> (usize, usize, usize) {
        match &self.config.attention {
            AttentionKind::Standard { .. } => (self.config.head_dim, self.config.head_dim, self.config.num_kv_heads),
            AttentionKind::Mla {
                qk_nope_head_dim,
                qk_rope_head_dim,
                v_head_dim,
                ..
            } => (qk_nope_head_dim + qk_rope_head_dim, *v_head_dim, self.config.num_heads),
        }
    }

    /// Runs one step for a batch of sequences: appends each sequence's new tokens to its
    /// cache and returns logits and the routing of every MoE layer.
    pub fn forward(
        &self,
        seqs: &mut [SeqInput<'_>],
        experts: &dyn ExpertFunction,
        shares: &dyn ShareSource,
        wanted: LogitsWanted,
    ) -> Result<BatchOutput, EngineError> {
        let c = &self.config;
        let be = self.backend.as_ref();
        for s in seqs.iter() {
            if s.tokens.is_empty() {
                return Err(EngineError::EmptySequence);
            }
            if let Some(&id) = s.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                return Err(EngineError::TokenOutOfRange {
                    id,
                    vocab: c.vocab_size,
                });
            }
            let len = s.cache.len() + s.tokens.len();
            if len > c.max_position_embeddings {
                return Err(EngineError::TooLong {
                    len,
                    max: c.max_position_embeddings,
                });
            }
        }
        for s in seqs.iter_mut() {
            s.cache.begin_step(s.tokens.len())?;
        }
        let tokens: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        let mut x = self
            .embed
            .gather_rows(&tokens.iter().map(|&t| t as usize).collect::<Vec<_>>());
        let spans: Vec<RowSpan> = {
            // (first row, rows, position of first row)
            let mut row = 0;
            seqs.iter()
                .map(|s| {
                    let span = (row, s.tokens.len(), s.cache.len());
                    row += s.tokens.len();
                    span
                })
                .collect()
        };
        let mut routing = Vec::new();
        let mut hidden = (wanted == LogitsWanted::AllWithHidden).then(|| vec![x.clone()]);
        for (li, layer) in self.layers.iter().enumerate() {
            let h = layer.input_norm.apply(be, &x);
            let a = self.attention(li, layer, &h, seqs, &spans);
            x.add_assign(&a);
            let h = layer.post_norm.apply(be, &x);
            let f = match &layer.ffn {
                Ffn::Dense(mlp) => mlp.apply(be, &h),
                Ffn::Moe(moe) => {
                    let (out, r) = self.moe(li, moe, &h, &spans, experts, shares)?;
                    routing.push(r);
                    out
                }
            };
            x.add_assign(&f);
            if let Some(h) = hidden.as_mut() {
                h.push(x.clone());
            }
        }
        for s in seqs.iter_mut() {
            s.cache.commit(s.tokens);
        }
        let rows: Vec<usize> = match wanted {
            LogitsWanted::All | LogitsWanted::AllWithHidden => (0..x.rows()).collect(),
            LogitsWanted::Last => spans.iter().map(|&(r, n, _)| r + n - 1).collect(),
        };
        let x = self.final_norm.apply(be, &x.gather_rows(&rows));
        let logits = self.lm_head.apply(be, &x);
        if let Some(h) = hidden.as_mut() {
            h.push(x);
        }
        let out = match wanted {
            LogitsWanted::All | LogitsWanted::AllWithHidden => {
                spans.iter().map(|&(r, n, _)| logits.slice_rows(r, r + n)).collect()
            }
            LogitsWanted::Last => (0..spans.len()).map(|i| logits.slice_rows(i, i + 1)).collect(),
        };
        Ok(BatchOutput {
            logits: out,
            routing,
            hidden,
        })
    }

    fn attention(
        &self,
        li: usize,
        layer: &Layer,
        h: &Tensor,
        seqs: &mut [SeqInput<'_>],
        spans: &[(usize, usize, usize)],
    ) -> Tensor {
        let c = &self.config;
        let be = self.backend.as_ref();
        let rope = &self.rope;
        // Produce per-token q [heads, qk], k [kv_heads, qk], v [kv_heads, v], rotated.
        let (q, k, v, shape, sinks, o) = match &layer.attn {
            Attention::Standard(a) => {
                let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
                let mut q = a.q.apply(be, h);
                let mut k = a.k.apply(be, h);
                let mut v = a.v.apply(be, h);
                match a.qk_norm {
                    QkNorm::None => {}
                    QkNorm::Whole => {
                        q = be.rms_norm(&q, a.q_norm.as_ref().expect("loaded with QkNorm::Whole"), c.norm_eps);
                        k = be.rms_norm(&k, a.k_norm.as_ref().expect("loaded with QkNorm::Whole"), c.norm_eps);
                    }
                    QkNorm::PerHead => {
                        let n = q.rows();
                        let qh = Tensor::matrix(n * nh, hd, q.into_data());
                        let kh = Tensor::matrix(n * nkv, hd, k.into_data());
                        let qh = be.rms_norm(&qh, a.q_norm.as_ref().expect("loaded with QkNorm::PerHead"), c.norm_eps);
                        let kh = be.rms_norm(&kh, a.k_norm.as_ref().expect("loaded with QkNorm::PerHead"), c.norm_eps);
                        q = Tensor::matrix(n, nh * hd, qh.into_data());
                        k = Tensor::matrix(n, nkv * hd, kh.into_data());
                    }
                }
                if let Some(clip) = a.clip_qkv {
                    for t in [&mut q, &mut k, &mut v] {
                        t.data_mut().iter_mut().for_each(|x| *x = x.clamp(-clip, clip));
                    }
                }
                for (&(row, n, pos0), _) in spans.iter().zip(seqs.iter()) {
                    for i in 0..n {
                        let (cos, sin) = rope.cos_sin(pos0 + i);
                        for head in q.row_mut(row + i).chunks_mut(hd) {
                            rope.rotate(head, &cos, &sin);
                        }
                        for head in k.row_mut(row + i).chunks_mut(hd) {
                            rope.rotate(head, &cos, &sin);
                        }
                    }
                }
                let shape = AttentionShape {
                    heads: nh,
                    kv_heads: nkv,
                    qk_dim: hd,
                    v_dim: hd,
                    scale: self.attn_scale,
                    window: layer.window,
                };
                (q, k, v, shape, a.sinks.as_ref(), &a.o)
            }
            Attention::Mla(a) => {
                let nh = c.num_heads;
                let qk = a.nope + a.rope_dim;
                let q = match &a.q_a {
                    Some((qa, norm)) => a.q_b.apply(be, &norm.apply(be, &qa.apply(be, h))),
                    None => a.q_b.apply(be, h),
                };
                let ckv = a.kv_a.apply(be, h);
                let n = h.rows();
                let w = a.kv_lora_rank + a.rope_dim;
                let latent = Tensor::matrix(
                    n,
                    a.kv_lora_rank,
                    (0..n).flat_map(|r| ckv.row(r)[..a.kv_lora_rank].to_vec()).collect(),
                );
                let kv = a.kv_b.apply(be, &a.kv_a_norm.apply(be, &latent)); // [n, nh*(nope+v)]
                let mut q = q;
                let mut k = Tensor::zeros(vec![n, nh * qk]);
                let mut v = Tensor::zeros(vec![n, nh * a.v_dim]);
                for &(row, cnt, pos0) in spans {
                    for i in 0..cnt {
                        let r = row + i;
                        let (cos, sin) = rope.cos_sin(pos0 + i);
                        let mut k_rot = ckv.data()[r * w + a.kv_lora_rank..(r + 1) * w].to_vec();
                        rope.rotate(&mut k_rot, &cos, &sin);
                        for head in q.row_mut(r).chunks_mut(qk) {
                            rope.rotate(&mut head[a.nope..], &cos, &sin);
                        }
                        let kvr = kv.row(r);
                        let krow = k.row_mut(r);
                        for hh in 0..nh {
                            let src = &kvr[hh * (a.nope + a.v_dim)..(hh + 1) * (a.nope + a.v_dim)];
                            krow[hh * qk..hh * qk + a.nope].copy_from_slice(&src[..a.nope]);
                            krow[hh * qk + a.nope..(hh + 1) * qk].copy_from_slice(&k_rot);
                        }
                        let vrow = v.row_mut(r);
                        for hh in 0..nh {
                            let src = &kvr[hh * (a.nope + a.v_dim)..(hh + 1) * (a.nope + a.v_dim)];
                            vrow[hh * a.v_dim..(hh + 1) * a.v_dim].copy_from_slice(&src[a.nope..]);
                        }
                    }
                }
                let shape = AttentionShape {
                    heads: nh,
                    kv_heads: nh,
                    qk_dim: qk,
                    v_dim: a.v_dim,
                    scale: self.attn_scale,
                    window: layer.window,
                };
                (q, k, v, shape, None, &a.o)
            }
        };
        let mut outs = Vec::with_capacity(seqs.len());
        for (s, &(row, n, pos0)) in seqs.iter_mut().zip(spans) {
            let kc = k.slice_rows(row, row + n);
            let vc = v.slice_rows(row, row + n);
            s.cache.append(li, kc.data(), vc.data());
            let qs = &q.data()[row * q.cols()..(row + n) * q.cols()];
            outs.push(
                s.cache
                    .with_layer(li, |kv| be.attention(qs, kv, pos0, sinks.map(|t| t.data()), &shape)),
            );
        }
        o.apply(be, &Tensor::concat_rows(&outs))
    }

    fn moe(
        &self,
        li: usize,
        moe: &MoeBlock,
        h: &Tensor,
        spans: &[RowSpan],
        experts: &dyn ExpertFunction,
        shares: &dyn ShareSource,
    ) -> Result<(Tensor, LayerRouting), EngineError> {
        let c = &self.config;
        let be = self.backend.as_ref();
        let (n, k, e) = (h.rows(), c.moe.top_k, c.moe.num_experts);
        let logits = moe.router.apply(be, h);
        let mut ids = Vec::with_capacity(n * k);
        let mut weights = Vec::with_capacity(n * k);
        // Per expert: (token row, combine weight), in token order.
        let mut per_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e];
        let forced = (self.routing_override.as_ref())
            .and_then(|o| o.route(li, spans, k))
            .filter(|f| f.len() == n * k);
        for t in 0..n {
            let (ti, tw) = match &forced {
                Some(f) => (
                    f[t * k..(t + 1) * k].iter().map(|&i| i as usize % e).collect(),
                    vec![1.0 / k as f32; k],
                ),
                None => route(
                    &c.moe.router,
                    k,
                    logits.row(t),
                    moe.correction_bias.as_ref().map(|b| b.data()),
                ),
            };
            for (&i, &w) in ti.iter().zip(&tw) {
                per_expert[i].push((t, w));
                ids.push(i as u32);
                weights.push(w);
            }
        }
        // Per expert with tokens: its instances and how many tokens each gets.
        let mut placed: Vec<(usize, Vec<(InstanceId, usize)>)> = Vec::new();
        for (ex, rows) in per_expert.iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let inst = shares.shares(ExpertKey::new(li, ex));
            let counts = split_counts(rows.len(), &inst.iter().map(|s| s.1).collect::<Vec<_>>());
            placed.push((ex, inst.iter().map(|s| s.0).zip(counts).collect()));
        }
        let rows_of = colocated_rows(&placed, &ids, k, e, shares).unwrap_or_else(|| {
            // In token order: an instance takes the next `count` of its expert's tokens.
            let mut out = Vec::new();
            for (ex, inst) in &placed {
                let rows: Vec<usize> = per_expert[*ex].iter().map(|r| r.0).collect();
                let mut start = 0;
                for &(_, cnt) in inst {
                    out.push(rows[start..start + cnt].to_vec());
                    start += cnt;
                }
            }
            out
        });
        let mut tasks = Vec::new();
        let instances = placed
            .iter()
            .flat_map(|(ex, inst)| inst.iter().map(move |i| (*ex, i.0)));
        for ((ex, instance), rows) in instances.zip(rows_of) {
            if rows.is_empty() {
                continue;
            }
            // The combine weight of this token's choice of `ex`.
            let weight = |t: usize| {
                (0..k)
                    .find(|&j| ids[t * k + j] as usize == ex)
                    .map_or(0.0, |j| weights[t * k + j])
            };
            tasks.push(ExpertTask {
                instance,
                input: h.gather_rows(&rows),
                tokens: rows.iter().map(|&t| t as u32).collect(),
                weights: rows.iter().map(|&t| weight(t)).collect(),
            });
        }
        let mut out = Tensor::zeros(vec![n, c.hidden_size]);
        experts.execute_into(li, tasks, &mut out)?;
        if let Some(sh) = &moe.shared {
            let mut s = sh.apply(be, h);
            if let Some(g) = &moe.shared_gate {
                let gate = g.apply(be, h);
                for r in 0..n {
                    let gv = sigmoid(gate.row(r)[0]);
                    s.row_mut(r).iter_mut().for_each(|x| *x *= gv);
                }
            }
            out.add_assign(&s);
        }
        Ok((
            out,
            LayerRouting {
                layer: li,
                top_k: k,
                ids,
                weights,
                router_logits: logits,
            },
        ))
    }
}

/// Token rows per instance (in `placed` order) when a layer's instances all have sites and some
/// replicated expert spans several: each token of a replicated expert goes to an instance on a
/// site its other experts already send it to where that instance has room
/// (`shared::colocate::TokenAssigner`, the matching the simulator counts), otherwise to the
/// instance with the most room; every instance gets exactly its count. `None`: split in order.
fn colocated_rows(
    placed: &[(usize, Vec<(InstanceId, usize)>)],
    ids: &[u32],
    k: usize,
    experts: usize,
    shares: &dyn ShareSource,
) -> Option<Vec<Vec<usize>>> {
    let mut sites: Vec<u64> = Vec::new();
    let mut gpu = Vec::new();
    let mut tokens = Vec::new();
    let mut by_expert: Vec<Vec<usize>> = vec![Vec::new(); experts];
    let mut spans_sites = false;
    for (ex, inst) in placed {
        let first = gpu.len();
        for &(i, cnt) in inst {
            let site = shares.site(i)?;
            let dense = match sites.iter().position(|&s| s == site) {
                Some(d) => d,
                None => {
                    sites.push(site);
                    sites.len() - 1
                }
            };
            by_expert[*ex].push(gpu.len());
            gpu.push(dense as u32);
            tokens.push(cnt as u32);
        }
        let used: Vec<u32> = (first..gpu.len()).filter(|&i| tokens[i] > 0).map(|i| gpu[i]).collect();
        spans_sites |= used.iter().any(|&g| g != used[0]);
    }
    if !spans_sites {
        return None;
    }
    let mut chosen = Vec::new();
    TokenAssigner::default().assign(ids, k, &gpu, &tokens, &by_expert, Assignment::Colocated, &mut chosen);
    let mut rows = vec![Vec::new(); gpu.len()];
    for (entry, &i) in chosen.iter().enumerate() {
        rows.get_mut(i as usize)?.push(entry / k);
    }
    // Each instance must get exactly its share (the assigner guarantees it when counts add up).
    rows.iter()
        .zip(&tokens)
        .all(|(r, &n)| r.len() == n as usize)
        .then_some(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sites from a table; shares unused.
    struct Sites(Vec<((usize, u32), u64)>);

    impl ShareSource for Sites {
        fn shares(&self, key: ExpertKey) -> Vec<(InstanceId, f32)> {
            vec![(InstanceId { key, replica: 0 }, 1.0)]
        }
        fn site(&self, i: InstanceId) -> Option<u64> {
            let at = (i.key.expert as usize, i.replica);
            self.0.iter().find(|(k, _)| *k == at).map(|x| x.1)
        }
    }

    #[test]
    fn replicated_experts_take_tokens_where_their_other_experts_are() {
        let inst = |e: usize, r: u32| InstanceId {
            key: ExpertKey::new(0, e),
            replica: r,
        };
        // Expert 0 on site 10, expert 2 on site 20, expert 1 on both (2 tokens each). Tokens
        // 0, 1 pick (2, 1), tokens 2, 3 pick (0, 1).
        let placed = vec![
            (0, vec![(inst(0, 0), 2)]),
            (1, vec![(inst(1, 0), 2), (inst(1, 1), 2)]),
            (2, vec![(inst(2, 0), 2)]),
        ];
        let ids = [2, 1, 2, 1, 0, 1, 0, 1];
        let sites = Sites(vec![((0, 0), 10), ((1, 0), 10), ((1, 1), 20), ((2, 0), 20)]);
        let rows = colocated_rows(&placed, &ids, 2, 3, &sites).unwrap();
        assert_eq!(rows, vec![vec![2, 3], vec![2, 3], vec![0, 1], vec![0, 1]]);
        // In order, expert 1's first instance would take tokens 0, 1 (on the other site).
        // Unknown sites, or a replicated expert on one site: split in order.
        assert!(colocated_rows(&placed, &ids, 2, 3, &crate::expert::SingleInstance).is_none());
        let one_site = Sites(vec![((0, 0), 10), ((1, 0), 10), ((1, 1), 10), ((2, 0), 20)]);
        assert!(colocated_rows(&placed, &ids, 2, 3, &one_site).is_none());
    }

    /// A standby instance (share 0: warmed up ahead of need) gets no token, even on the site
    /// where a token's other expert already goes.
    #[test]
    fn standby_instances_take_no_tokens() {
        let inst = |e: usize, r: u32| InstanceId {
            key: ExpertKey::new(0, e),
            replica: r,
        };
        let placed = vec![
            (0, vec![(inst(0, 0), 2)]),
            (1, vec![(inst(1, 0), 4), (inst(1, 1), 0)]),
            (2, vec![(inst(2, 0), 2)]),
        ];
        let ids = [2, 1, 2, 1, 0, 1, 0, 1];
        let sites = Sites(vec![((0, 0), 10), ((1, 0), 10), ((1, 1), 20), ((2, 0), 20)]);
        // Only instances with tokens count: no expert is split over sites, so the tokens go
        // in order by count, and the standby's count is 0.
        assert!(colocated_rows(&placed, &ids, 2, 3, &sites).is_none());
        // With a second standby on site 10, expert 0 spread for real: the matching still
        // gives each instance exactly its count.
        let placed = vec![
            (0, vec![(inst(0, 0), 1), (inst(0, 1), 1)]),
            (1, vec![(inst(1, 0), 4), (inst(1, 1), 0)]),
            (2, vec![(inst(2, 0), 2)]),
        ];
        let sites = Sites(vec![
            ((0, 0), 10),
            ((0, 1), 20),
            ((1, 0), 10),
            ((1, 1), 20),
            ((2, 0), 20),
        ]);
        let rows = colocated_rows(&placed, &ids, 2, 3, &sites).expect("expert 0 spans two sites");
        let lens: Vec<usize> = rows.iter().map(Vec::len).collect();
        assert_eq!(lens, vec![1, 1, 4, 0, 2], "{rows:?}");
    }

    #[test]
    fn top_k_ties_go_to_lower_id() {
        assert_eq!(top_k_desc(&[1.0, 3.0, 3.0, 2.0], 2), vec![1, 2]);
    }

    #[test]
    fn grouped_router_masks_groups_with_zero() {
        // Two groups of two; group 1 wins on its top-2 sum; k = 2 picks from it only.
        let r = RouterKind::SigmoidGrouped {
            n_group: 2,
            topk_group: 1,
            renormalize: true,
            scaling: 2.0,
        };
        let (ids, w) = route(&r, 2, &[5.0, -5.0, 1.0, 1.5], None);
        assert_eq!(ids, vec![3, 2]);
        assert!((w.iter().sum::<f32>() - 2.0).abs() < 1e-5);
    }

    #[test]
    fn sparsemixer_first_slot_is_argmax() {
        let (ids, w) = route(
            &RouterKind::SparseMixer { jitter_eps: 0.01 },
            2,
            &[0.1, 2.0, 1.0, -1.0],
            None,
        );
        assert_eq!(ids, vec![1, 2]);
        // Far apart logits: each slot's softmax keeps only its own expert.
        assert_eq!(w, vec![1.0, 1.0]);
    }
}
