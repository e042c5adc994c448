//! GPU profiles: vendor datasheet peaks plus efficiencies measured by Vidur.
//!
//! Sources (dense bf16 tensor throughput, no structured sparsity; memory bandwidth; capacity):
//! - **RTX A6000**: NVIDIA RTX A6000 datasheet: 309.7 TFLOPS tensor *with sparsity* -> 154.8
//!   dense; 48 GB GDDR6, 768 GB/s; PCIe Gen4 x16 (32 GB/s per direction); no NVSwitch (the
//!   NVLink bridge joins pairs only), so GPUs talk over PCIe; nodes over 100 Gb/s Ethernet.
//! - **A100 SXM4 80GB**: NVIDIA A100 datasheet: 312 TFLOPS bf16 dense, 80 GB HBM2e, 2,039 GB/s;
//!   NVLink 3 600 GB/s total (300 per direction); HDR InfiniBand 200 Gb/s per GPU between nodes;
//!   PCIe Gen4 to the host.
//! - **H100 SXM5 80GB**: NVIDIA H100 datasheet: 989 TFLOPS bf16 dense (1,979 with sparsity),
//!   80 GB HBM3, 3.35 TB/s; NVLink 4 900 GB/s total (450 per direction); NDR InfiniBand
//!   400 Gb/s per GPU; PCIe Gen5 to the host.
//! - **H200 SXM 141GB**: NVIDIA H200 datasheet: 989 TFLOPS bf16 dense, 141 GB HBM3e, 4.8 TB/s;
//!   NVLink 900 GB/s; NDR 400 Gb/s; PCIe Gen5.
//!
//! Efficiencies (achieved / peak) come from Vidur's measured MLP profiles
//! (`../shared/data/profiles/vidur`): A100 Llama-3-8B gated MLP (up+act+down) reaches 0.70 of
//! peak FLOP/s at 32k tokens and 0.75 of HBM bandwidth at 1-4 tokens (weight streaming); H100
//! Llama-2-70B reaches 0.66 of peak at 4k tokens and 0.86 of bandwidth at 1-4 tokens. H200 uses
//! H100's (same compute die); A6000 has no measurement and uses A100's (an assumption). Vidur's
//! H100 DGX send/recv profile gives the link latency (17 us for messages up to 18 KB) and 0.77
//! of NVLink's nominal bandwidth for 64 MB messages (193 us); the same efficiency is applied to
//! every link (an assumption for PCIe and InfiniBand).
//!
//! A profile can also be *measured*: `moeless sim-validate` times this machine's operators
//! ([`MeasuredOps`]: expert FFN, a layer's non-expert time, the serving engine's own time per
//! step and request) and the QUIC round trip to a worker process, and writes the profile as
//! JSON ([`GpuProfile::from_json`]); `moeless sim --device-profile FILE` reads it.

use std::fmt;
use std::str::FromStr;

use crate::SimError;

/// The GPU types the simulator knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuType {
    A6000,
    A100,
    H100,
    H200,
}

impl GpuType {
    pub const ALL: [GpuType; 4] = [GpuType::A6000, GpuType::A100, GpuType::H100, GpuType::H200];

    pub fn label(self) -> &'static str {
        match self {
            GpuType::A6000 => "a6000",
            GpuType::A100 => "a100",
            GpuType::H100 => "h100",
            GpuType::H200 => "h200",
        }
    }

    pub fn profile(self) -> GpuProfile {
        const GB: f64 = 1e9;
        let p = match self {
            GpuType::A6000 => DatasheetProfile {
                name: self.label(),
                peak_flops: 154.8e12,
                hbm_bandwidth: 768.0 * GB,
                memory_bytes: 48.0 * GB,
                compute_efficiency: 0.70,
                memory_efficiency: 0.75,
                intra_node_bandwidth: 32.0 * GB,
                inter_node_bandwidth: 12.5 * GB,
                host_to_device_bandwidth: 25.0 * GB,
                gpus_per_node: 8,
            },
            GpuType::A100 => DatasheetProfile {
                name: self.label(),
                peak_flops: 312e12,
                hbm_bandwidth: 2039.0 * GB,
                memory_bytes: 80.0 * GB,
                compute_efficiency: 0.70,
                memory_efficiency: 0.75,
                intra_node_bandwidth: 300.0 * GB,
                inter_node_bandwidth: 25.0 * GB,
                host_to_device_bandwidth: 25.0 * GB,
                gpus_per_node: 8,
            },
            GpuType::H100 => DatasheetProfile {
                name: self.label(),
                peak_flops: 989e12,
                hbm_bandwidth: 3350.0 * GB,
                memory_bytes: 80.0 * GB,
                compute_efficiency: 0.66,
                memory_efficiency: 0.86,
                intra_node_bandwidth: 450.0 * GB,
                inter_node_bandwidth: 50.0 * GB,
                host_to_device_bandwidth: 50.0 * GB,
                gpus_per_node: 8,
            },
            GpuType::H200 => DatasheetProfile {
                name: self.label(),
                peak_flops: 989e12,
                hbm_bandwidth: 4800.0 * GB,
                memory_bytes: 141.0 * GB,
                compute_efficiency: 0.66,
                memory_efficiency: 0.86,
                intra_node_bandwidth: 450.0 * GB,
                inter_node_bandwidth: 50.0 * GB,
                host_to_device_bandwidth: 50.0 * GB,
                gpus_per_node: 8,
            },
        };
        p.into()
    }
}

impl fmt::Display for GpuType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

impl FromStr for GpuType {
    type Err = SimError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        GpuType::ALL
            .into_iter()
            .find(|g| g.label() == s.to_ascii_lowercase())
            .ok_or_else(|| SimError::UnknownGpu(s.to_string()))
    }
}

/// The datasheet part of a GPU profile; the overheads below are the same for every GPU.
struct DatasheetProfile {
    name: &'static str,
    peak_flops: f64,
    hbm_bandwidth: f64,
    memory_bytes: f64,
    compute_efficiency: f64,
    memory_efficiency: f64,
    intra_node_bandwidth: f64,
    inter_node_bandwidth: f64,
    host_to_device_bandwidth: f64,
    gpus_per_node: usize,
}

impl From<DatasheetProfile> for GpuProfile {
    fn from(d: DatasheetProfile) -> Self {
        GpuProfile {
            name: d.name.to_string(),
            peak_flops: d.peak_flops,
            hbm_bandwidth: d.hbm_bandwidth,
            memory_bytes: d.memory_bytes,
            compute_efficiency: d.compute_efficiency,
            memory_efficiency: d.memory_efficiency,
            intra_node_bandwidth: d.intra_node_bandwidth,
            inter_node_bandwidth: d.inter_node_bandwidth,
            host_to_device_bandwidth: d.host_to_device_bandwidth,
            gpus_per_node: d.gpus_per_node,
            kernel_overhead_s: KERNEL_OVERHEAD_S,
            link_latency_s: LINK_LATENCY_S,
            link_efficiency: LINK_EFFICIENCY,
            cold_start_overhead_s: COLD_START_OVERHEAD_S,
            measured: None,
        }
    }
}

/// What the cost model needs to know about one device (SI units: FLOP/s, bytes/s, bytes, s).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GpuProfile {
    /// `a6000`, `a100`, `h100`, `h200`, or the name a measured profile gives itself.
    pub name: String,
    pub peak_flops: f64,
    pub hbm_bandwidth: f64,
    pub memory_bytes: f64,
    /// Achieved fraction of `peak_flops` on large GEMMs (Vidur measurements).
    pub compute_efficiency: f64,
    /// Achieved fraction of `hbm_bandwidth` when streaming weights (Vidur measurements).
    pub memory_efficiency: f64,
    /// Per direction, between GPUs of one node (NVLink, or PCIe for the A6000).
    pub intra_node_bandwidth: f64,
    /// Per GPU and direction, between nodes (InfiniBand / Ethernet).
    pub inter_node_bandwidth: f64,
    /// Host memory to GPU (PCIe), for loading expert weights on a cold start.
    pub host_to_device_bandwidth: f64,
    pub gpus_per_node: usize,
    /// Fixed cost per kernel ([`KERNEL_OVERHEAD_S`] for GPUs).
    pub kernel_overhead_s: f64,
    /// Latency of one message between devices ([`LINK_LATENCY_S`] for GPUs).
    pub link_latency_s: f64,
    /// Achieved fraction of a link's nominal bandwidth ([`LINK_EFFICIENCY`] for GPUs).
    pub link_efficiency: f64,
    /// Fixed cost of creating an instance besides copying weights ([`COLD_START_OVERHEAD_S`]).
    pub cold_start_overhead_s: f64,
    /// Operator times measured on this device for one model shape; they replace the roofline
    /// for that shape (and only that one).
    #[serde(default)]
    pub measured: Option<MeasuredOps>,
}

/// Operator times measured on a device for one model shape (as Vidur profiles operators
/// instead of trusting a roofline): the expert FFN by token count, and the non-expert time of a
/// decoder layer (attention, norms, router, the engine's dispatch bookkeeping, the LM head
/// spread over the layers) as a linear fit.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MeasuredOps {
    /// The shape measured ([`crate::ModelShape::shape_key`]).
    pub shape: String,
    /// `(tokens, seconds)` of one routed expert, tokens increasing; interpolated linearly in
    /// between, proportionally past the last point.
    pub expert_ffn_s: Vec<(usize, f64)>,
    /// Non-expert seconds of one decoder layer: `fixed + per_token x tokens + per_context x
    /// decode context tokens + per_prefill_product x sum of chunk x (past + chunk / 2)`.
    pub layer_fixed_s: f64,
    pub layer_per_token_s: f64,
    pub layer_per_context_s: f64,
    pub layer_per_prefill_product_s: f64,
    /// The serving engine's time per step outside the forward pass (scheduling, sampling,
    /// streaming tokens out): `step_fixed_s + step_per_sequence_s x sequences in the step`.
    #[serde(default)]
    pub step_fixed_s: f64,
    #[serde(default)]
    pub step_per_sequence_s: f64,
    /// Time a request spends in the serving front end outside engine steps (HTTP, tokenizing,
    /// delivering its first and last streamed events), added to its TTFT and E2E.
    #[serde(default)]
    pub request_overhead_s: f64,
    /// A remote worker's time per expert task beyond the FFN itself (decoding the task from
    /// its message, scheduling it, framing its output), added to every expert call.
    #[serde(default)]
    pub expert_task_overhead_s: f64,
    /// What each further expert device a layer's tokens reach adds to the layer, beyond the
    /// first (one more message each way for the engine to frame, protect, send and collect),
    /// when attention runs on an engine device in front of remote expert workers.
    #[serde(default)]
    pub per_extra_worker_s: f64,
}

impl MeasuredOps {
    /// One expert on `n` tokens from the measured points.
    pub fn expert_time(&self, n: usize) -> f64 {
        if n == 0 {
            return 0.0;
        }
        self.ffn_time(n) + self.expert_task_overhead_s
    }

    /// The FFN alone, interpolated from the measured points.
    fn ffn_time(&self, n: usize) -> f64 {
        let pts = &self.expert_ffn_s;
        let (Some(&first), Some(&last)) = (pts.first(), pts.last()) else {
            return 0.0;
        };
        if n <= first.0 {
            return first.1;
        }
        if n >= last.0 {
            return last.1 * n as f64 / last.0 as f64;
        }
        let i = pts.partition_point(|p| p.0 <= n);
        let (a, b) = (pts[i - 1], pts[i]);
        a.1 + (b.1 - a.1) * (n - a.0) as f64 / (b.0 - a.0) as f64
    }

    fn check(&self) -> Result<(), String> {
        if self.expert_ffn_s.is_empty() {
            return Err("measured.expert_ffn_s is empty".into());
        }
        if self.expert_ffn_s.windows(2).any(|w| w[0].0 >= w[1].0) || self.expert_ffn_s[0].0 == 0 {
            return Err("measured.expert_ffn_s token counts must be positive and increasing".into());
        }
        if self.expert_ffn_s.iter().any(|p| !(p.1.is_finite() && p.1 > 0.0)) {
            return Err("measured.expert_ffn_s times must be positive".into());
        }
        for v in [
            self.layer_fixed_s,
            self.layer_per_token_s,
            self.layer_per_context_s,
            self.layer_per_prefill_product_s,
            self.step_fixed_s,
            self.step_per_sequence_s,
            self.request_overhead_s,
            self.expert_task_overhead_s,
            self.per_extra_worker_s,
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!(
                    "measured layer and step coefficients must be finite and >= 0, got {v}"
                ));
            }
        }
        Ok(())
    }
}

impl GpuProfile {
    /// A profile from JSON (the fields of [`GpuProfile`]), checked: every rate and size
    /// positive and finite, efficiencies in (0, 1], overheads finite and not negative.
    pub fn from_json(text: &str) -> Result<Self, SimError> {
        let p: GpuProfile = serde_json::from_str(text).map_err(|e| SimError::Config(format!("device profile: {e}")))?;
        p.check()?;
        Ok(p)
    }

    /// Checks the values (see [`GpuProfile::from_json`]).
    pub fn check(&self) -> Result<(), SimError> {
        let bad = |what: &str, v: f64| SimError::Config(format!("device profile `{}`: {what} = {v}", self.name));
        for (what, v) in [
            ("peak_flops", self.peak_flops),
            ("hbm_bandwidth", self.hbm_bandwidth),
            ("memory_bytes", self.memory_bytes),
            ("intra_node_bandwidth", self.intra_node_bandwidth),
            ("inter_node_bandwidth", self.inter_node_bandwidth),
            ("host_to_device_bandwidth", self.host_to_device_bandwidth),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(bad(what, v));
            }
        }
        for (what, v) in [
            ("compute_efficiency", self.compute_efficiency),
            ("memory_efficiency", self.memory_efficiency),
            ("link_efficiency", self.link_efficiency),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                return Err(bad(what, v));
            }
        }
        for (what, v) in [
            ("kernel_overhead_s", self.kernel_overhead_s),
            ("link_latency_s", self.link_latency_s),
            ("cold_start_overhead_s", self.cold_start_overhead_s),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(bad(what, v));
            }
        }
        if self.gpus_per_node == 0 {
            return Err(bad("gpus_per_node", 0.0));
        }
        if let Some(m) = &self.measured {
            m.check()
                .map_err(|e| SimError::Config(format!("device profile `{}`: {e}", self.name)))?;
        }
        Ok(())
    }
}

/// Link latency per message (Vidur H100 DGX send/recv, messages up to 18 KB: 17 us).
pub const LINK_LATENCY_S: f64 = 17e-6;
/// Achieved fraction of a link's nominal bandwidth (Vidur H100 DGX send/recv, 64 MB: 0.77).
pub const LINK_EFFICIENCY: f64 = 0.77;
/// Fixed cost per GEMM kernel launch (an assumption; Vidur's smallest MLP timings are
/// bandwidth-bound, so the launch cost hides below them).
pub const KERNEL_OVERHEAD_S: f64 = 5e-6;
/// Fixed cost of creating an expert instance besides copying its weights (allocation,
/// registration with the engine; an assumption).
pub const COLD_START_OVERHEAD_S: f64 = 2e-3;
