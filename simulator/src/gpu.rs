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
        match self {
            GpuType::A6000 => GpuProfile {
                gpu: self,
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
            GpuType::A100 => GpuProfile {
                gpu: self,
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
            GpuType::H100 => GpuProfile {
                gpu: self,
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
            GpuType::H200 => GpuProfile {
                gpu: self,
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
        }
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

/// What the cost model needs to know about one GPU (SI units: FLOP/s, bytes/s, bytes).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuProfile {
    pub gpu: GpuType,
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
