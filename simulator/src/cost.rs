//! Time and money of one step, from a roofline of the GPU corrected by measured efficiencies.
//!
//! - A GEMM-like kernel takes `max(flops / (peak x compute_eff), bytes / (hbm x memory_eff))`
//!   plus a launch overhead (`kernel_overhead_s` of the profile). Efficiencies come from Vidur's
//!   measured MLP profiles (see [`crate::gpu`]).
//! - A routed expert with `n` tokens on a GPU: gated FFN, `2 x n x 3 x hidden x inter` FLOPs,
//!   its weights plus activations in bytes, three kernels. A GPU's expert time in a layer is the
//!   sum over the instances it holds that received tokens; the layer waits for the slowest GPU.
//! - Attention on a GPU: q/k/v/o projections for its tokens (weights streamed once), score and
//!   value products against the cached context (prefill: `4 x heads x head_dim x chunk x
//!   (past + chunk/2)` FLOPs; decode: the context's KV bytes read from HBM), router and shared
//!   experts; dense layers add their MLP. The LM head runs once per step.
//! - Dispatch and combine (all-to-all): each GPU sends its tokens' hidden states to the GPUs
//!   holding the chosen instances and receives the outputs back; the time is one link latency
//!   plus the busiest GPU's bytes over its link bandwidth (NVLink/PCIe within a node,
//!   InfiniBand/Ethernet across nodes, in proportion to the peers in each).
//! - With central attention (an engine device in front of expert-only devices, as `moeless
//!   serve` with workers runs), the engine sends every token once to each device running one
//!   of its experts and receives one summed output per token from each: the engine's link is
//!   the busiest.
//! - A profile may carry operator times measured on the device for this model's shape
//!   ([`crate::gpu::MeasuredOps`]): then they, not the roofline, give an expert's time by token
//!   count, a decoder layer's non-expert time, the serving engine's own time per step
//!   (scheduling, sampling, streaming) and per request (HTTP, tokenizing; added to its
//!   latencies); the CPU validation measures them.
//! - A cold start copies one expert's weights from host memory: bytes over the host-to-device
//!   bandwidth plus a fixed overhead.

use crate::gpu::{GpuProfile, MeasuredOps};
use crate::model::ModelShape;

/// The work one GPU's attention does in a step.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AttentionWork {
    /// Prefill tokens of this step and the sum over chunks of `chunk x (past + chunk / 2)`.
    pub prefill_tokens: usize,
    pub prefill_context_products: f64,
    /// Decode tokens (one per running request) and the sum of their context lengths.
    pub decode_tokens: usize,
    pub decode_context: usize,
}

impl AttentionWork {
    pub fn tokens(&self) -> usize {
        self.prefill_tokens + self.decode_tokens
    }
}

/// Times (seconds) for one model on one GPU type, in an expert-parallel group of `group_gpus`.
#[derive(Debug, Clone)]
pub struct CostModel {
    pub gpu: GpuProfile,
    pub model: ModelShape,
    pub group_gpus: usize,
    /// Attention runs on one engine device in front of the group (see
    /// [`crate::SimConfig::central_attention`]): dispatch crosses a link even with one GPU.
    pub central_attention: bool,
    /// The profile's measured operator times, when they were measured for this model's shape.
    measured: Option<MeasuredOps>,
}

impl CostModel {
    pub fn new(gpu: GpuProfile, model: ModelShape, group_gpus: usize) -> Self {
        let key = model.shape_key();
        let measured = gpu.measured.clone().filter(|m| m.shape == key);
        Self {
            gpu,
            model,
            group_gpus,
            central_attention: false,
            measured,
        }
    }

    /// Whether measured operator times (not the roofline) give expert and layer times.
    pub fn uses_measured_ops(&self) -> bool {
        self.measured.is_some()
    }

    /// Roofline time of `kernels` kernels doing `flops` and moving `bytes`.
    pub fn kernel_time(&self, flops: f64, bytes: f64, kernels: usize) -> f64 {
        let c = flops / (self.gpu.peak_flops * self.gpu.compute_efficiency);
        let m = bytes / (self.gpu.hbm_bandwidth * self.gpu.memory_efficiency);
        c.max(m) + kernels as f64 * self.gpu.kernel_overhead_s
    }

    /// A gated FFN of intermediate size `inter` on `n` tokens (0 tokens: no time).
    pub fn ffn_time(&self, n: usize, inter: usize) -> f64 {
        if n == 0 || inter == 0 {
            return 0.0;
        }
        let (h, b) = (self.model.hidden as f64, self.model.weight_bytes as f64);
        let (n, i) = (n as f64, inter as f64);
        let flops = 2.0 * n * 3.0 * h * i;
        let bytes = 3.0 * h * i * b + n * (2.0 * h + 2.0 * i) * b;
        self.kernel_time(flops, bytes, 3)
    }

    /// One routed expert instance executing `n` tokens.
    pub fn expert_time(&self, n: usize) -> f64 {
        match &self.measured {
            Some(m) => m.expert_time(n),
            None => self.ffn_time(n, self.model.expert_intermediate),
        }
    }

    /// Attention (+ router and shared experts for MoE layers) of one decoder layer on one GPU.
    pub fn attention_time(&self, w: &AttentionWork, moe_layer: bool) -> f64 {
        let n = w.tokens();
        if n == 0 {
            return 0.0;
        }
        if let Some(ms) = &self.measured {
            // Measured on a model whose layers are all MoE; a dense layer adds its MLP.
            let dense = if moe_layer {
                0.0
            } else {
                self.ffn_time(n, self.model.dense_intermediate)
            };
            return ms.layer_fixed_s
                + ms.layer_per_token_s * n as f64
                + ms.layer_per_context_s * w.decode_context as f64
                + ms.layer_per_prefill_product_s * w.prefill_context_products
                + dense;
        }
        let m = &self.model;
        let (h, b) = (m.hidden as f64, m.weight_bytes as f64);
        let proj = m.attention_params() as f64;
        let qd = (m.heads * m.head_dim) as f64;
        let mut t = self.kernel_time(2.0 * n as f64 * proj, proj * b + n as f64 * 4.0 * h * b, 4);
        // Scores and values: prefill compute-bound on the chunk, decode reads the KV cache.
        let kv_per_tok = m.kv_elems_per_token_layer as f64 * b;
        let flops = 4.0 * qd * (w.prefill_context_products + w.decode_context as f64);
        let bytes = kv_per_tok * (w.decode_context + w.prefill_tokens) as f64;
        t += self.kernel_time(flops, bytes, 1);
        if moe_layer {
            t += self.kernel_time(
                2.0 * n as f64 * h * m.num_experts as f64,
                h * m.num_experts as f64 * b,
                1,
            );
            t += self.ffn_time(n, m.shared_intermediate);
        } else {
            t += self.ffn_time(n, m.dense_intermediate);
        }
        t
    }

    /// The serving engine's own time per step besides the forward pass, for `seqs` sequences
    /// (measured profiles only; the roofline has none).
    pub fn step_overhead(&self, seqs: usize) -> f64 {
        match &self.measured {
            Some(m) if seqs > 0 => m.step_fixed_s + m.step_per_sequence_s * seqs as f64,
            _ => 0.0,
        }
    }

    /// The serving front end's time per request outside engine steps (measured profiles only).
    pub fn request_overhead(&self) -> f64 {
        self.measured.as_ref().map_or(0.0, |m| m.request_overhead_s)
    }

    /// LM head over the step's tokens on one GPU (only the last prefill token and decode tokens
    /// need logits; we charge `n` rows).
    pub fn lm_head_time(&self, n: usize) -> f64 {
        // Measured layer times already carry the LM head, spread over the layers.
        if n == 0 || self.measured.is_some() {
            return 0.0;
        }
        let (h, v, b) = (
            self.model.hidden as f64,
            self.model.vocab as f64,
            self.model.weight_bytes as f64,
        );
        self.kernel_time(2.0 * n as f64 * h * v, h * v * b, 1)
    }

    /// Effective per-GPU bandwidth (bytes/s) of all-to-all traffic over the group.
    pub fn all_to_all_bandwidth(&self) -> f64 {
        let g = self.group_gpus.max(1);
        let node = self.gpu.gpus_per_node.max(1);
        if g <= node {
            return self.gpu.intra_node_bandwidth * self.gpu.link_efficiency;
        }
        // Peers spread uniformly: a fraction of each GPU's traffic stays in its node.
        let peers = (g - 1) as f64;
        let f_intra = (node - 1) as f64 / peers;
        let f_inter = 1.0 - f_intra;
        // Both link types run in parallel; the slower share sets the pace.
        let t_per_byte = (f_intra / self.gpu.intra_node_bandwidth).max(f_inter / self.gpu.inter_node_bandwidth);
        self.gpu.link_efficiency / t_per_byte
    }

    /// One all-to-all (dispatch, or combine) where each GPU sends `send[g]` and receives
    /// `recv[g]` token vectors from other GPUs: latency plus the busiest GPU's bytes.
    pub fn all_to_all_time(&self, max_vectors_per_gpu: f64) -> f64 {
        // Within one GPU nothing travels, unless attention runs on an engine device of its own.
        if (self.group_gpus <= 1 && !self.central_attention) || max_vectors_per_gpu <= 0.0 {
            return 0.0;
        }
        let bytes = max_vectors_per_gpu * (self.model.hidden * self.model.weight_bytes) as f64;
        self.gpu.link_latency_s + bytes / self.all_to_all_bandwidth()
    }

    /// What reaching `devices` expert devices in one MoE layer costs beyond reaching one
    /// (measured profiles with attention on an engine device only: remote workers reached by
    /// a message each; an all-to-all among GPUs has no such term).
    pub fn fanout_time(&self, devices: usize) -> f64 {
        match &self.measured {
            Some(m) if self.central_attention && devices > 1 => m.per_extra_worker_s * (devices - 1) as f64,
            _ => 0.0,
        }
    }

    /// Loading one expert's weights onto a GPU.
    pub fn cold_start_time(&self) -> f64 {
        self.model.expert_bytes() / self.gpu.host_to_device_bandwidth + self.gpu.cold_start_overhead_s
    }
}

/// How a policy is billed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Billing {
    /// The cluster is reserved: every GPU for the whole run, memory preallocated (weights plus a
    /// KV cache pool up to `gpu_memory_utilization`, as vLLM does).
    Serverful,
    /// Pay for memory actually held: non-expert weights, warm expert instances, KV cache in use.
    Serverless,
}

/// Money from the two currencies: GPU-seconds reserved and GB-seconds of GPU memory held.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pricing {
    pub usd_per_gpu_hour: f64,
    pub gpu_memory_gb: f64,
}

impl Pricing {
    /// Serverful: GPU-seconds times the hourly price.
    pub fn serverful_usd(&self, gpu_s: f64) -> f64 {
        gpu_s * self.usd_per_gpu_hour / 3600.0
    }
    /// Serverless: memory held, priced as the same fraction of a GPU-hour (a GPU's whole memory
    /// for one hour costs one GPU-hour).
    pub fn serverless_usd(&self, gb_s: f64) -> f64 {
        gb_s / self.gpu_memory_gb * self.usd_per_gpu_hour / 3600.0
    }
}
